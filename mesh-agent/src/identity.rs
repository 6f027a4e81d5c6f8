//! Workload identities and their certificates.
//!
//! A workload's identity is its SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`
//! ([`SpiffeId`]). Certificates come from a [`CertificateProvider`]: today the local CA
//! ([`local_ca::LocalCa`]), later the Kubernetes CA client. [`cache::CertCache`] keeps one
//! certificate per identity and renews it at half-life. [`tls`] builds the rustls configurations
//! the tunnel uses: peers are authenticated by SPIFFE ID, never by host name.
//!
//! This module knows nothing of the tunnel; the tunnel asks it for certificates and configs.

pub mod ca_client;
pub mod cache;
pub mod fault;
pub mod local_ca;
pub mod tls;

use std::{fmt, str::FromStr, sync::Arc, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use cache::{CachedCert, CertCache};
pub use local_ca::LocalCa;

/// Lifetime of a workload certificate when the caller does not choose one: 24 h, as Istio. Short
/// enough that a leaked key is useful for a day at most, long enough that a CA outage of a few
/// hours does not break traffic (certificates renew at half-life).
pub const DEFAULT_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// Trust domain used when none is configured (Istio's default, for interoperability).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Upper bound on the length of a SPIFFE ID we accept (the SPIFFE spec's limit is 2048 bytes).
const MAX_SPIFFE_ID_LEN: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID `{0}` does not start with `spiffe://`")]
    Scheme(String),
    #[error("SPIFFE ID `{0}` is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong(String),
    #[error(
        "SPIFFE ID `{0}` has an empty or invalid trust domain (lowercase letters, digits, `.`, `-`, `_`)"
    )]
    TrustDomain(String),
    #[error(
        "SPIFFE ID `{0}` has the wrong path: expected `/ns/<namespace>/sa/<service-account>` \
         (no query, fragment, port or user info)"
    )]
    Path(String),
    #[error(
        "SPIFFE ID `{id}`: {what} `{value}` is not a valid Kubernetes name \
         (lowercase letters, digits, `-`, `.`, at most 253 characters)"
    )]
    Segment {
        id: String,
        what: &'static str,
        value: String,
    },
}

/// A workload identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parsing is strict: the only accepted shape is Istio's, so a string that parses names exactly
/// one service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The identity without `spiffe://`, the form Istio's policies compare principals in.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Kubernetes DNS-1123 subdomain (namespaces are labels, a subset; service accounts subdomains).
fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.chars().take(64).collect()));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_trust_domain(td) {
            return Err(SpiffeIdError::TrustDomain(s.to_string()));
        }
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SpiffeIdError::Path(s.to_string()));
        };
        for (what, value) in [("namespace", ns), ("service account", sa)] {
            if !valid_k8s_name(value) {
                return Err(SpiffeIdError::Segment {
                    id: s.to_string(),
                    what,
                    value: value.to_string(),
                });
            }
        }
        Ok(Self {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "local CA directory {path}: {source} (check that it exists and is writable by the agent)"
    )]
    CaDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "CA file {file} refused: {reason} (the files and key types the local CA accepts: Identity in docs/architecture.md)"
    )]
    CaRejected {
        file: std::path::PathBuf,
        reason: String,
    },
    #[error("signing a certificate for {identity} failed: {source}")]
    Sign {
        identity: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("building the TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the trust bundle is empty: no root to verify peers against")]
    EmptyBundle,
    #[error("trust bundle root rejected: {0}")]
    BadRoot(String),
    #[error("certificate provider failed for {identity}: {reason}")]
    Provider { identity: String, reason: String },
}

/// A workload certificate with its chain and key.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: SpiffeId,
    /// Leaf first; the root is not included (peers have it in their bundle).
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    pub fn new(
        identity: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Self {
        Self {
            identity,
            chain,
            key,
            not_before,
            not_after,
        }
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The leaf's serial number as colon-separated hex bytes (`3a:0f:…`, as `openssl x509
    /// -serial` groups them), or `None` if the chain is empty or the leaf does not parse.
    pub fn serial_hex(&self) -> Option<String> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let leaf = self.chain.first()?;
        let (_, parsed) = X509Certificate::from_der(leaf.as_ref()).ok()?;
        let bytes = parsed.raw_serial();
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Some(hex.join(":"))
    }

    /// When the cache should replace this certificate: half-way through its lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// The roots peers' certificates must chain to. Several roots are allowed so a CA can rotate:
/// the new root is added to every bundle before any certificate is signed by it.
#[derive(Clone, Debug, Default)]
pub struct TrustBundle {
    pub trust_domain: String,
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn new(trust_domain: impl Into<String>, roots: Vec<CertificateDer<'static>>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            roots,
        }
    }

    pub(crate) fn root_store(&self) -> Result<rustls::RootCertStore, IdentityError> {
        if self.roots.is_empty() {
            return Err(IdentityError::EmptyBundle);
        }
        let mut store = rustls::RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| IdentityError::BadRoot(e.to_string()))?;
        }
        Ok(store)
    }
}

/// Where workload certificates come from: the local CA now, the Kubernetes CA client later.
pub trait CertificateProvider: Send + Sync {
    /// Signs a fresh certificate (and key) for `identity`. May be slow (a network round trip).
    fn issue(
        &self,
        identity: &SpiffeId,
    ) -> impl Future<Output = Result<WorkloadCert, IdentityError>> + Send;

    /// The roots peers are verified against.
    fn trust_bundle(&self) -> TrustBundle;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_shape() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
            .parse()
            .expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "client");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/client");
        assert_eq!(SpiffeId::new("cluster.local", "default", "client"), Ok(id));
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("https://cluster.local/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::Scheme(_))
            }),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::TrustDomain(_))
            }),
            ("spiffe://Cluster.local/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::TrustDomain(_))
            }),
            ("spiffe://td:443/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::TrustDomain(_))
            }),
            ("spiffe://user@td/ns/a/sa/b", |e| {
                matches!(e, SpiffeIdError::TrustDomain(_))
            }),
            ("spiffe://td", |e| matches!(e, SpiffeIdError::Path(_))),
            ("spiffe://td/ns/a/sa", |e| {
                matches!(e, SpiffeIdError::Path(_))
            }),
            ("spiffe://td/ns/a/sa/b/", |e| {
                matches!(e, SpiffeIdError::Path(_))
            }),
            ("spiffe://td/ns/a/sa/b/c", |e| {
                matches!(e, SpiffeIdError::Path(_))
            }),
            ("spiffe://td/sa/b/ns/a", |e| {
                matches!(e, SpiffeIdError::Path(_))
            }),
            ("spiffe://td/ns//sa/b", |e| {
                matches!(e, SpiffeIdError::Segment { .. })
            }),
            ("spiffe://td/ns/A/sa/b", |e| {
                matches!(e, SpiffeIdError::Segment { .. })
            }),
            ("spiffe://td/ns/a/sa/b?x=1", |e| {
                matches!(e, SpiffeIdError::Segment { .. })
            }),
            ("spiffe://td/ns/a/sa/-b", |e| {
                matches!(e, SpiffeIdError::Segment { .. })
            }),
        ];
        for (input, check) in cases {
            let err = input.parse::<SpiffeId>().expect_err(input);
            assert!(check(&err), "{input}: unexpected error {err:?}");
            assert!(err.to_string().contains("SPIFFE ID"), "{err}");
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(3000));
        assert!(matches!(
            long.parse::<SpiffeId>(),
            Err(SpiffeIdError::TooLong(_))
        ));
    }
}
