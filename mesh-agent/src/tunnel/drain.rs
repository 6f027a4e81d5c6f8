//! Graceful shutdown.
//!
//! [`channel`] returns a [`Trigger`] (kept by whoever handles SIGTERM) and a [`Watch`] (cloned
//! into every listener and every connection task). [`Trigger::drain`] announces draining
//! (listeners stop accepting, HTTP/2 servers send GOAWAY), waits until every `Watch` is dropped
//! or the deadline passes, then announces a forced close (tasks drop their connections) and
//! waits for the tasks to go.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Running,
    Draining,
    Forced,
}

/// Held by every listener and in-flight connection; dropping it says "done".
#[derive(Clone, Debug)]
pub struct Watch {
    state: watch::Receiver<State>,
    _alive: mpsc::Sender<()>,
}

/// Starts the drain.
#[derive(Debug)]
pub struct Trigger {
    state: watch::Sender<State>,
    alive: mpsc::Receiver<()>,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Everything finished before the deadline.
    Clean,
    /// The deadline passed and remaining work was closed.
    Forced,
}

pub fn channel() -> (Trigger, Watch) {
    let (state_tx, state_rx) = watch::channel(State::Running);
    let (alive_tx, alive_rx) = mpsc::channel(1);
    (
        Trigger {
            state: state_tx,
            alive: alive_rx,
        },
        Watch {
            state: state_rx,
            _alive: alive_tx,
        },
    )
}

impl Watch {
    async fn reached(&self, target: State) {
        let mut rx = self.state.clone();
        // An error means the trigger is gone: treat as forced so nothing waits forever.
        let _ = rx.wait_for(|s| *s >= target).await;
    }

    /// Resolves when draining starts: stop accepting new work.
    pub async fn draining(&self) {
        self.reached(State::Draining).await;
    }

    /// Resolves when the deadline passed: drop what is left.
    pub async fn forced(&self) {
        self.reached(State::Forced).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.state.borrow() >= State::Draining
    }
}

impl Trigger {
    /// Drains: see the module comment. The caller must have dropped its own [`Watch`] clones.
    pub async fn drain(mut self, deadline: Duration) -> DrainOutcome {
        info!(deadline = ?deadline, "draining: no new connections, in-flight ones may finish");
        let _ = self.state.send(State::Draining);
        if tokio::time::timeout(deadline, self.alive.recv())
            .await
            .is_ok()
        {
            info!("drain complete");
            return DrainOutcome::Clean;
        }
        warn!(deadline = ?deadline, "drain deadline passed: closing remaining connections");
        let _ = self.state.send(State::Forced);
        // Forced tasks drop their sockets promptly; bound the wait anyway.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.alive.recv()).await;
        DrainOutcome::Forced
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (a terminal). `main` awaits it,
/// then calls [`Trigger::drain`].
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
