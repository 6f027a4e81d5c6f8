//! One certificate per identity, renewed at half-life.
//!
//! A lookup that finds a certificate past its refresh time asks the provider for a new one; if
//! that fails the old certificate is kept until it expires (the CA may be briefly down), and the
//! next lookup tries again. Concurrent first lookups of one identity share one request to the
//! provider (a per-identity async lock, held across the provider call only, never across a
//! TLS handshake).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tracing::{info, warn};

use super::{CertificateProvider, IdentityError, SpiffeId, TrustBundle, WorkloadCert};

type IssueFuture = Pin<Box<dyn Future<Output = Result<WorkloadCert, IdentityError>> + Send>>;
type IssueFn = dyn Fn(SpiffeId) -> IssueFuture + Send + Sync;

type Entry = Arc<tokio::sync::Mutex<Option<Arc<WorkloadCert>>>>;

/// Certificates by identity, from one provider.
pub struct CertCache {
    issue: Box<IssueFn>,
    bundle: Box<dyn Fn() -> TrustBundle + Send + Sync>,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache").finish_non_exhaustive()
    }
}

impl CertCache {
    pub fn new<P: CertificateProvider + 'static>(provider: Arc<P>) -> Self {
        let for_bundle = provider.clone();
        Self {
            issue: Box::new(move |id: SpiffeId| {
                let provider = provider.clone();
                Box::pin(async move { provider.issue(&id).await })
            }),
            bundle: Box::new(move || for_bundle.trust_bundle()),
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        (self.bundle)()
    }

    /// The current certificate of `identity`, fetched or renewed when due.
    pub async fn get(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        let entry = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.entry(identity.clone()).or_default().clone()
        };
        let mut slot = entry.lock().await;
        let now = SystemTime::now();
        if let Some(cert) = slot.as_ref()
            && now < cert.refresh_at()
        {
            return Ok(cert.clone());
        }
        match (self.issue)(identity.clone()).await {
            Ok(cert) => {
                let cert = Arc::new(cert);
                info!(%identity, not_after = ?cert.not_after, "workload certificate issued");
                *slot = Some(cert.clone());
                Ok(cert)
            }
            Err(e) => match slot.as_ref() {
                Some(old) if now < old.not_after => {
                    warn!(%identity, error = %e, not_after = ?old.not_after,
                        "certificate renewal failed; keeping the current one until it expires");
                    Ok(old.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// Fetches certificates for `identities` now (the workloads on this node), so their first
    /// connection does not wait for the CA. Failures are logged; lookups retry later.
    pub async fn prefetch(&self, identities: &[SpiffeId]) {
        for id in identities {
            if let Err(e) = self.get(id).await {
                warn!(identity = %id, error = %e, "certificate prefetch failed; will retry on use");
            }
        }
    }

    /// Renews every cached certificate that is past half-life, every `every`, so idle
    /// identities never reach expiry. Runs until the returned task is aborted.
    pub fn spawn_refresher(
        self: Arc<Self>,
        every: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ids: Vec<SpiffeId> = self
                    .entries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                // `get` renews only what is due; the rest are cache hits.
                self.prefetch(&ids).await;
            }
        })
    }

    /// Identities with a cached certificate and its expiry (for the admin dump).
    pub fn snapshot(&self) -> Vec<(SpiffeId, Option<SystemTime>)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .map(|(id, e)| {
                let exp = e
                    .try_lock()
                    .ok()
                    .and_then(|c| c.as_ref().map(|c| c.not_after));
                (id.clone(), exp)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;
    use crate::identity::LocalCa;

    struct Counting {
        ca: LocalCa,
        calls: AtomicUsize,
        ttl: Duration,
    }

    impl CertificateProvider for Counting {
        async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = SystemTime::now();
            self.ca.issue_with_validity(identity, now, now + self.ttl)
        }
        fn trust_bundle(&self) -> TrustBundle {
            self.ca.trust_bundle()
        }
    }

    #[tokio::test]
    async fn caches_and_renews_at_half_life() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let provider = Arc::new(Counting {
            ca: LocalCa::open(dir.path(), "cluster.local").expect("ca"),
            calls: AtomicUsize::new(0),
            ttl: Duration::from_secs(3600),
        });
        let cache = CertCache::new(provider.clone());
        let a = cache.get(&id).await.expect("first");
        let b = cache.get(&id).await.expect("second");
        assert!(
            Arc::ptr_eq(&a, &b),
            "second lookup is served from the cache"
        );
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1);

        // A zero-length lifetime is always past half-life: every lookup renews.
        let short = Arc::new(Counting {
            ca: LocalCa::open(dir.path(), "cluster.local").expect("ca"),
            calls: AtomicUsize::new(0),
            ttl: Duration::ZERO,
        });
        let cache = CertCache::new(short.clone());
        cache.get(&id).await.expect("first");
        cache.get(&id).await.expect("second");
        assert_eq!(short.calls.load(Ordering::SeqCst), 2);

        // The refresher renews cached identities without any lookup.
        let cache = Arc::new(cache);
        let task = cache.clone().spawn_refresher(Duration::from_millis(5));
        let start = std::time::Instant::now();
        while short.calls.load(Ordering::SeqCst) < 5 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "refresher did not run"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        task.abort();
    }
}
