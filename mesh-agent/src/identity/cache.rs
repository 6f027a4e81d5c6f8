//! One certificate per identity, renewed at half-life.
//!
//! A lookup that finds a certificate past its refresh time asks the provider for a new one; if
//! that fails the old certificate is kept until it expires (the CA may be briefly down), and
//! lookups use it without asking again for a backoff (1 s doubling to 30 s, never past the
//! expiry), so a CA that is down does not delay every new connection by the provider's own
//! retries. The half-life counts from when the certificate arrived (or its `notBefore`, if
//! later), not from the back-dated `notBefore`: with the 5-minute back-dating a short-lived
//! certificate would otherwise be past its half-life the moment it is issued. Concurrent first lookups of one identity share one request to the
//! provider (a per-identity async lock, held across the provider call only, never across a
//! TLS handshake).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{CertificateProvider, IdentityError, SpiffeId, TrustBundle, WorkloadCert};

type IssueFuture = Pin<Box<dyn Future<Output = Result<WorkloadCert, IdentityError>> + Send>>;
type IssueFn = dyn Fn(SpiffeId) -> IssueFuture + Send + Sync;

type Entry = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// First wait after a failed renewal; doubles per failure up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A cached certificate and when to ask the provider again.
struct Cached {
    cert: Arc<WorkloadCert>,
    refresh_at: SystemTime,
    failures: u32,
}

/// Half-life of `cert` counted from `received` (or its `notBefore`, if later).
fn renew_time(cert: &WorkloadCert, received: SystemTime) -> SystemTime {
    let start = cert.not_before.max(received);
    let life = cert.not_after.duration_since(start).unwrap_or_default();
    start + life / 2
}

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
        if let Some(c) = slot.as_ref()
            && now < c.refresh_at
        {
            return Ok(c.cert.clone());
        }
        match (self.issue)(identity.clone()).await {
            Ok(cert) => {
                let cert = Arc::new(cert);
                info!(%identity, not_after = ?cert.not_after, "workload certificate issued");
                *slot = Some(Cached {
                    refresh_at: renew_time(&cert, SystemTime::now()),
                    cert: cert.clone(),
                    failures: 0,
                });
                Ok(cert)
            }
            Err(e) => match slot.as_mut() {
                Some(old) if now < old.cert.not_after => {
                    old.failures = old.failures.saturating_add(1);
                    let backoff = RETRY_MIN
                        .saturating_mul(1 << (old.failures - 1).min(5))
                        .min(RETRY_MAX);
                    old.refresh_at = (now + backoff).min(old.cert.not_after);
                    warn!(%identity, error = %e, not_after = ?old.cert.not_after,
                        retry_in = ?backoff,
                        "certificate renewal failed; keeping the current one until it expires");
                    Ok(old.cert.clone())
                }
                Some(_) => {
                    warn!(%identity, error = %e,
                        "certificate expired and its renewal failed: connections of this identity are refused until the CA issues one");
                    Err(e)
                }
                None => Err(e),
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
    pub fn spawn_refresher(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
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

    /// Every cached identity and its current certificate, sorted by identity (for the admin
    /// dump and the expiry gauge). `cert` is `None` while the first issue is pending or failed;
    /// an entry being renewed right now shows no certificate (the scrape never waits on a CA).
    pub fn snapshot(&self) -> Vec<CachedCert> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<CachedCert> = entries
            .iter()
            .map(|(id, e)| CachedCert {
                identity: id.clone(),
                cert: e
                    .try_lock()
                    .ok()
                    .and_then(|c| c.as_ref().map(|c| c.cert.clone())),
            })
            .collect();
        out.sort_by_key(|c| c.identity.to_string());
        out
    }
}

/// One entry of [`CertCache::snapshot`].
#[derive(Clone, Debug)]
pub struct CachedCert {
    pub identity: SpiffeId,
    pub cert: Option<Arc<WorkloadCert>>,
}

impl CachedCert {
    pub fn not_after(&self) -> Option<SystemTime> {
        self.cert.as_ref().map(|c| c.not_after)
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

    /// Issues certificates back-dated by 5 minutes, as both CAs do, valid `ttl` from now;
    /// refuses while `down` is set.
    struct Backdated {
        ca: LocalCa,
        calls: AtomicUsize,
        ttl: Duration,
        down: std::sync::atomic::AtomicBool,
    }

    impl CertificateProvider for Backdated {
        async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(IdentityError::Provider {
                    identity: identity.to_string(),
                    reason: "down".into(),
                });
            }
            let now = SystemTime::now();
            self.ca
                .issue_with_validity(identity, now - Duration::from_secs(300), now + self.ttl)
        }
        fn trust_bundle(&self) -> TrustBundle {
            self.ca.trust_bundle()
        }
    }

    #[tokio::test]
    async fn short_lived_certificates_renew_at_half_life_and_failures_back_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let provider = Arc::new(Backdated {
            ca: LocalCa::open(dir.path(), "cluster.local").expect("ca"),
            calls: AtomicUsize::new(0),
            ttl: Duration::from_secs(2),
            down: false.into(),
        });
        let cache = CertCache::new(provider.clone());
        let first = cache.get(&id).await.expect("first");
        let again = cache.get(&id).await.expect("second");
        assert!(
            Arc::ptr_eq(&first, &again),
            "a back-dated short-lived certificate is reused before its half-life"
        );
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1);

        // Past the half-life with the CA down: the current certificate is kept, and the next
        // lookups do not ask again until the backoff (1 s) has passed.
        provider.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let kept = cache.get(&id).await.expect("kept while valid");
        assert!(Arc::ptr_eq(&first, &kept));
        let calls = provider.calls.load(Ordering::SeqCst);
        assert_eq!(calls, 2, "one renewal attempt");
        cache.get(&id).await.expect("kept");
        assert_eq!(provider.calls.load(Ordering::SeqCst), calls, "backing off");

        // Expired with the CA still down: refused.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let err = cache.get(&id).await.expect_err("expired and not renewed");
        assert!(err.to_string().contains("down"), "{err}");

        // The CA is back: a new certificate.
        provider.down.store(false, Ordering::SeqCst);
        let renewed = cache.get(&id).await.expect("renewed");
        assert!(!Arc::ptr_eq(&first, &renewed));
    }

    #[tokio::test]
    async fn snapshot_shows_serial_and_validity_of_the_current_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = Arc::new(Counting {
            ca: LocalCa::open(dir.path(), "cluster.local").expect("ca"),
            calls: AtomicUsize::new(0),
            ttl: Duration::from_secs(3600),
        });
        let cache = CertCache::new(provider);
        let b: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let a: SpiffeId = "spiffe://cluster.local/ns/a/sa/a".parse().expect("id");
        let cert_b = cache.get(&b).await.expect("b");
        let cert_a = cache.get(&a).await.expect("a");
        let snap = cache.snapshot();
        let ids: Vec<String> = snap.iter().map(|c| c.identity.to_string()).collect();
        assert_eq!(ids, [a.to_string(), b.to_string()], "sorted by identity");
        assert_eq!(snap[0].not_after(), Some(cert_a.not_after));
        let serial_a = snap[0]
            .cert
            .as_ref()
            .and_then(|c| c.serial_hex())
            .expect("serial a");
        let serial_b = snap[1]
            .cert
            .as_ref()
            .and_then(|c| c.serial_hex())
            .expect("serial b");
        assert_ne!(serial_a, serial_b, "each certificate has its own serial");
        assert!(
            serial_a
                .split(':')
                .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok()),
            "{serial_a}"
        );
        // The serial is the one in the DER the peers see.
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, leaf) = X509Certificate::from_der(cert_b.chain[0].as_ref()).expect("parse");
        assert_eq!(
            serial_b.replace(':', "").trim_start_matches('0'),
            format!("{:x}", leaf.serial)
        );
    }
}
