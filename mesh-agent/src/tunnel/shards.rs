//! Tunnel shards: one thread per core, each with its own single-threaded tokio runtime, its own
//! `SO_REUSEPORT` listeners on 15001 and 15008, and its own HBONE connections in the pool.
//!
//! Why (issue 15, docs/performance.md "Shards"): on tokio's work-stealing runtime a connection's
//! tasks (app socket copy, HBONE connection driver, stream handler) wake each other across
//! worker threads, and an idle worker is woken to steal every time work is queued; a profile
//! of the new-connection path showed ~20% of the agents' CPU in context switches and wake-ups.
//! In a shard a connection is accepted, authorized, carried over HBONE and closed on one thread:
//! a wake-up is a queue push, never a futex, and the kernel's `SO_REUSEPORT` hash spreads
//! connections (app connections on 15001, peers' HBONE connections on 15008) over the shards.
//!
//! What is shared stays shared: [`super::inbound::Inbound`], [`super::outbound::Outbound`]
//! (their metrics, connection registries for re-authorization, limits) and the certificate
//! cache are one object used by every shard. The pool is one object too, but its connections
//! are keyed by the shard that opened them ([`shard_id::current`]), so a stream never rides a connection
//! driven by another thread.
//!
//! Shard 0 serves the listeners the caller bound; shards 1.. bind their own at the same
//! addresses, which only works on `SO_REUSEPORT` listeners (`listener::bind_reuseport`).
//!
//! Inbound HBONE connections are few and long-lived (a peer's shards each keep one per key), so
//! the kernel's hash alone could put every busy one on one shard. Each shard's 15008 listener
//! therefore only accepts: the connection goes to the shard serving the fewest inbound
//! connections (the accepting shard on a tie), handed over once as a socket; from then on it
//! stays on that shard. App connections on 15001 are many and short: the hash spreads them
//! well and they are served where they were accepted. (Handing each to the shard with the
//! fewest live app connections was built and measured: no gain for four bulk flows on two
//! cores, 5–8% more agent CPU per new connection; docs/performance.md, "Shards".)

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    drain,
    inbound::{Handed, Inbound},
    listener,
    outbound::Outbound,
    shard_id::{self, Loads},
};

/// Started shards: one task per shard (on the caller's runtime) that ends when the shard's
/// listeners are drained and its connections have ended, and the shards' runtimes (metrics).
pub(super) struct Started {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub runtimes: Vec<tokio::runtime::Handle>,
}

/// Starts `count` shards serving `inbound` and `outbound` (`count` ≥ 1; the caller's listeners
/// go to shard 0).
pub(super) fn start(
    count: usize,
    inbound: &Arc<Inbound>,
    outbound: &Arc<Outbound>,
    listeners: (tokio::net::TcpListener, tokio::net::TcpListener),
    backlog: u32,
    drain: &drain::Watch,
) -> std::io::Result<Started> {
    let (inbound_listener, outbound_listener) = listeners;
    let inbound_addr = inbound_listener.local_addr()?;
    let outbound_addr = outbound_listener.local_addr()?;
    // Every shard's sockets are bound here, before any thread starts, so a bind failure is the
    // caller's error and no shard serves alone.
    let mut sockets = vec![(inbound_listener.into_std()?, outbound_listener.into_std()?)];
    for _ in 1..count {
        sockets.push((
            bind_std(inbound_addr, backlog, "inbound HBONE")?,
            bind_std(outbound_addr, backlog, "outbound")?,
        ));
    }
    let mut tasks = Vec::with_capacity(count);
    let (handles_tx, handles_rx) = std::sync::mpsc::channel();
    let loads = Loads::new(count);
    let (handed_tx, mut handed_rx): (Vec<_>, Vec<_>) = (0..count)
        .map(|_| mpsc::unbounded_channel::<Handed>())
        .unzip();
    let handed_tx = Arc::new(handed_tx);
    for (index, (inbound_socket, outbound_socket)) in sockets.into_iter().enumerate() {
        let own_handed = handed_rx.remove(0);
        let (loads, handed_tx) = (loads.clone(), handed_tx.clone());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (inbound, outbound, drain) = (inbound.clone(), outbound.clone(), drain.clone());
        let handle_tx = handles_tx.clone();
        std::thread::Builder::new()
            .name(format!("nm-shard-{index}"))
            .spawn(move || {
                shard_id::enter(index);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    // The shard's access lines are written when it goes idle (admin::logging).
                    .on_thread_park(crate::admin::logging::write_when_idle)
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!(shard = index, error = %e, "cannot build the shard's runtime; its listeners are closed");
                        return;
                    }
                };
                let _ = handle_tx.send(rt.handle().clone());
                drop(handle_tx);
                rt.block_on(async move {
                    // This thread's access lines are written in batches (admin::logging).
                    tokio::spawn(crate::admin::logging::batch_access_lines());
                    let (inbound_listener, outbound_listener) = match (
                        tokio::net::TcpListener::from_std(inbound_socket),
                        tokio::net::TcpListener::from_std(outbound_socket),
                    ) {
                        (Ok(i), Ok(o)) => (i, o),
                        (Err(e), _) | (_, Err(e)) => {
                            warn!(shard = index, error = %e, "cannot register the shard's listeners; they are closed");
                            return;
                        }
                    };
                    tokio::join!(
                        dispatch(index, inbound_listener, loads, handed_tx, drain.clone()),
                        inbound.serve_handed(own_handed, drain.clone()),
                        outbound.serve(outbound_listener, drain),
                    );
                });
                // Dropping the runtime here ends what the shard still drives (its idle pooled
                // connections); the serve loops above have already waited for every stream.
                drop(done_tx);
            })?;
        tasks.push(tokio::spawn(async move {
            let _ = done_rx.await;
        }));
    }
    drop(handles_tx);
    // Each shard sends its runtime's handle before serving (or drops its sender when its runtime
    // cannot be built): this ends after `count` quick steps.
    let runtimes: Vec<_> = handles_rx.iter().collect();
    info!(
        shards = runtimes.len(),
        inbound = %inbound_addr,
        outbound = %outbound_addr,
        "tunnel shards serving (one thread and one runtime each)"
    );
    Ok(Started { tasks, runtimes })
}

/// Accepts on one shard's inbound listener until drained and hands each connection to the
/// shard with the fewest inbound connections ([`Loads::pick`]).
async fn dispatch(
    index: usize,
    listener: tokio::net::TcpListener,
    loads: Loads,
    handed: Arc<Vec<mpsc::UnboundedSender<Handed>>>,
    drain: drain::Watch,
) {
    let local = listener.local_addr().ok();
    info!(listen = ?local, shard = index, "inbound HBONE server started");
    loop {
        tokio::select! {
            biased;
            () = drain.draining() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let to = loads.pick(index);
                    let sent = match (tcp.into_std(), handed.get(to)) {
                        (Ok(tcp), Some(channel)) => channel
                            .send((tcp, peer, loads.claim(to)))
                            .map_err(|_| "the shard has stopped".to_owned()),
                        (Err(e), _) => Err(e.to_string()),
                        (Ok(_), None) => Err("no such shard".to_owned()),
                    };
                    if let Err(reason) = sent {
                        warn!(%peer, shard = to, reason, "cannot hand an inbound connection to its shard; closed");
                    }
                }
                Err(e) => {
                    // EMFILE and friends: log and keep serving; the accept loop must not die.
                    warn!(error = %e, "inbound accept failed");
                    tokio::task::yield_now().await;
                }
            },
        }
    }
    drop(listener);
    info!(listen = ?local, shard = index, "inbound listener closed (draining)");
}

fn bind_std(addr: SocketAddr, backlog: u32, what: &str) -> std::io::Result<std::net::TcpListener> {
    let listener = listener::bind_reuseport(addr, backlog).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("a tunnel shard cannot listen on {addr} ({what}) beside the first: {e}"),
        )
    })?;
    listener.into_std()
}
