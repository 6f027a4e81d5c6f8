//! The reload loop: poll, rebuild on change, publish only valid models.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ConfigErrors, LocalConfigSource, fingerprint};
use crate::model::ClusterModel;

/// How often the files are checked by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The outcome of the reloads so far, for logs, `/config_dump` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Reloads attempted after the first load (one per observed change of the files).
    pub attempts: u64,
    /// Models published after the first one.
    pub published: u64,
    /// The errors of the last attempt, `None` if it succeeded (or none was made yet).
    pub last_error: Option<Arc<ConfigErrors>>,
}

/// A running watcher. `models` always holds the last good model; clone it to hand it on. The
/// polling task runs until every receiver of `models` (this one and its clones) is dropped, or
/// until [`LocalConfigWatch::stop`].
#[derive(Debug)]
pub struct LocalConfigWatch {
    pub models: watch::Receiver<Arc<ClusterModel>>,
    pub status: watch::Receiver<ReloadStatus>,
    task: JoinHandle<()>,
}

impl LocalConfigWatch {
    /// Stops polling. The receivers keep the last values.
    pub fn stop(&self) {
        self.task.abort();
    }
}

pub(super) fn spawn(
    source: LocalConfigSource,
    interval: Duration,
) -> Result<LocalConfigWatch, ConfigErrors> {
    let first = source.attempt();
    let model = first.result?;
    for w in model.warnings() {
        tracing::warn!(path = %source.path.display(), "local config: {w}");
    }
    let (models_tx, models) = watch::channel(Arc::new(model));
    let (status_tx, status) = watch::channel(ReloadStatus::default());
    let task = tokio::spawn(run(
        source,
        interval,
        first.files,
        first.fingerprint,
        models_tx,
        status_tx,
    ));
    Ok(LocalConfigWatch {
        models,
        status,
        task,
    })
}

async fn run(
    source: LocalConfigSource,
    interval: Duration,
    mut files: Vec<PathBuf>,
    mut seen: u64,
    models: watch::Sender<Arc<ClusterModel>>,
    status: watch::Sender<ReloadStatus>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let source = Arc::new(source);
    loop {
        ticker.tick().await;
        if models.is_closed() {
            return;
        }
        let check = files.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&check)).await else {
            return;
        };
        if now == seen {
            continue;
        }
        let s = Arc::clone(&source);
        let Ok(attempt) = tokio::task::spawn_blocking(move || s.attempt()).await else {
            return;
        };
        files = attempt.files;
        seen = attempt.fingerprint;
        match attempt.result {
            Ok(model) => {
                for w in model.warnings() {
                    tracing::warn!(path = %source.path.display(), "local config: {w}");
                }
                let changed = models.send_if_modified(|current| {
                    if **current == model {
                        false
                    } else {
                        *current = Arc::new(model);
                        true
                    }
                });
                tracing::info!(
                    path = %source.path.display(),
                    changed,
                    "local config reloaded"
                );
                status.send_modify(|s| {
                    s.attempts += 1;
                    s.published += u64::from(changed);
                    s.last_error = None;
                });
            }
            Err(errors) => {
                tracing::error!(
                    path = %source.path.display(),
                    "local config rejected, keeping the last good one: {errors}"
                );
                status.send_modify(|s| {
                    s.attempts += 1;
                    s.last_error = Some(Arc::new(errors));
                });
            }
        }
    }
}
