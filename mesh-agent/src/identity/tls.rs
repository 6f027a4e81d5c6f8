//! rustls configurations for the tunnel: TLS 1.3 only, ALPN `h2`, peers authenticated by SPIFFE ID.
//!
//! - Server ([`server_config`]): requires a client certificate chaining to the trust bundle whose
//!   SPIFFE ID is in our trust domain. Session tickets are off: resumption would skip the client
//!   certificate check we log and authorize on, and HBONE connections are long-lived and pooled, so
//!   a full handshake is rare.
//! - Client ([`client_config`]): verifies the server's chain, then requires the server's SPIFFE ID
//!   to equal the identity we expect at the destination. Host names and SNI are not used.
//!
//! Rejections carry a [`PeerCertError`] that says why (wrong trust domain, expired, no SPIFFE
//! SAN...), and are logged where they happen.

use std::{fmt, sync::Arc, time::SystemTime};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tracing::warn;

use super::{IdentityError, SpiffeId, SpiffeIdError, TrustBundle, WorkloadCert};

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer's certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerCertError {
    #[error("the certificate has no SPIFFE URI SAN (is it a mesh workload certificate?)")]
    NoSpiffeId,
    #[error("the certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[source] SpiffeIdError),
    #[error("the certificate has {0} SPIFFE URI SANs; a workload certificate has exactly one")]
    SeveralSpiffeIds(usize),
    #[error("peer {got} is in trust domain `{}`, we accept only `{want}` (another mesh, or a misconfigured CA?)", got.trust_domain())]
    WrongTrustDomain { got: SpiffeId, want: String },
    #[error(
        "peer presented {got}, expected {want} (wrong node for the destination, or stale endpoint data)"
    )]
    UnexpectedIdentity { got: SpiffeId, want: SpiffeId },
    #[error("the certificate is not parseable X.509: {0}")]
    Malformed(String),
    #[error("the certificate expired (check the peer's certificate renewal and both clocks): {0}")]
    Expired(String),
    #[error("the certificate is not valid yet (clock skew between nodes?): {0}")]
    NotYetValid(String),
    #[error(
        "the certificate does not chain to a trusted root (another CA, or the trust bundle lacks a rotated root): {0}"
    )]
    Untrusted(String),
}

impl PeerCertError {
    fn from_chain_error(e: rustls::Error) -> Self {
        match &e {
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => Self::Expired(e.to_string()),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => Self::NotYetValid(e.to_string()),
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding) => {
                Self::Malformed(e.to_string())
            }
            _ => Self::Untrusted(e.to_string()),
        }
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// Finds the reason a TLS error carries, if it is one of ours.
pub fn peer_cert_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a PeerCertError> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(p) = err.downcast_ref::<PeerCertError>() {
            return Some(p);
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            err.downcast_ref::<rustls::Error>()
        {
            return other.0.downcast_ref::<PeerCertError>();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            cur = Some(inner);
            continue;
        }
        cur = err.source();
    }
    None
}

/// The SPIFFE ID in a certificate's URI SAN. Exactly one `spiffe://` URI is required.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerCertError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| PeerCertError::Malformed(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| PeerCertError::Malformed(e.to_string()))?
        .ok_or(PeerCertError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(PeerCertError::NoSpiffeId),
        [one] => one.parse().map_err(PeerCertError::BadSpiffeId),
        many => Err(PeerCertError::SeveralSpiffeIds(many.len())),
    }
}

/// ring's provider with AES-128-GCM first. The client's order decides the suite (rustls servers
/// follow it, as do ztunnel's), so between two agents every connection uses AES-128-GCM, which
/// costs less CPU per byte than AES-256-GCM (ring's default first choice) at the same TLS 1.3
/// security level for this use; AES-256-GCM and ChaCha20-Poly1305 stay for peers that prefer
/// them (docs/performance.md, "Cipher suite").
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Verifies `chain` (leaf first) against the bundle at `now`. Used by the client verifier and
/// by tests.
pub fn verify_chain(
    bundle: &TrustBundle,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), PeerCertError> {
    let store = bundle
        .root_store()
        .map_err(|e| PeerCertError::Untrusted(e.to_string()))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| PeerCertError::Malformed("empty chain".into()))?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    check_chain(&store, leaf, intermediates, now)
}

fn check_chain(
    store: &RootCertStore,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), PeerCertError> {
    let parsed = ParsedCertificate::try_from(leaf).map_err(PeerCertError::from_chain_error)?;
    verify_server_cert_signed_by_trust_anchor(&parsed, store, intermediates, now, algorithms().all)
        .map_err(PeerCertError::from_chain_error)
}

/// Server side: client certificates must chain to the bundle and carry a SPIFFE ID in our
/// trust domain.
struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Identity first: "wrong trust domain" says more than "unknown issuer" for a peer mesh.
        let checked = spiffe_id_of(end_entity).and_then(|id| {
            if id.trust_domain() == self.trust_domain {
                Ok(id)
            } else {
                Err(PeerCertError::WrongTrustDomain {
                    got: id,
                    want: self.trust_domain.clone(),
                })
            }
        });
        let result = checked.and_then(|id| {
            self.inner
                .verify_client_cert(end_entity, intermediates, now)
                .map_err(PeerCertError::from_chain_error)
                .map(|ok| (id, ok))
        });
        match result {
            Ok((_, ok)) => Ok(ok),
            Err(e) => {
                warn!(side = "downstream", reason = %e, "rejected client certificate");
                Err(e.into_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server must chain to the bundle and be exactly `expected`.
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier")
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = spiffe_id_of(end_entity)
            .and_then(|id| {
                if id == self.expected {
                    Ok(())
                } else if id.trust_domain() != self.expected.trust_domain() {
                    // As on the server side: "another mesh" says more than "someone else".
                    Err(PeerCertError::WrongTrustDomain {
                        want: self.expected.trust_domain().to_owned(),
                        got: id,
                    })
                } else {
                    Err(PeerCertError::UnexpectedIdentity {
                        got: id,
                        want: self.expected.clone(),
                    })
                }
            })
            .and_then(|()| check_chain(&self.roots, end_entity, intermediates, now));
        match result {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                warn!(side = "upstream", reason = %e, expected = %self.expected,
                    "rejected server certificate");
                Err(e.into_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The HBONE server configuration presenting `cert`.
pub fn server_config(
    cert: &WorkloadCert,
    bundle: &TrustBundle,
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let roots = Arc::new(bundle.root_store()?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| IdentityError::BadRoot(e.to_string()))?;
    let verifier = Arc::new(MeshClientVerifier {
        inner,
        trust_domain: bundle.trust_domain.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: see the module comment.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The HBONE client configuration presenting `cert` (the source workload's) and accepting only a
/// server that proves `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    bundle: &TrustBundle,
    expected: &SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let verifier = Arc::new(MeshServerVerifier {
        roots: Arc::new(bundle.root_store()?),
        expected: expected.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // SNI carries `identity_server_name(expected)` so a server on a node address can pick the
    // destination workload's certificate (see `identity_server_name`).
    config.enable_sni = true;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name rustls requires when no identity is to be named (an IP address is never
/// sent as SNI, RFC 6066 §3).
pub fn placeholder_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// DNS suffix of identity server names: `.invalid` is reserved (RFC 2606), so the name can never
/// collide with a real host or be resolved.
pub const SNI_SUFFIX: &str = ".id.nodemesh.invalid";

/// The TLS server name (SNI) a client sends to ask a node's HBONE listener for the certificate
/// of `identity`: the first 16 bytes of SHA-256 over the SPIFFE URI, lowercase hex, then
/// [`SNI_SUFFIX`] (`<32 hex>.id.nodemesh.invalid`).
///
/// Why a digest and not the identity spelled out: SNI travels in clear text in the ClientHello,
/// so a digest does not advertise which workload is being reached; it always fits a 63-byte DNS
/// label whatever the lengths of namespace and service account; and the server never needs to
/// parse it: it compares it with the names of its local workloads' identities. A collision
/// could only pick a wrong certificate, which the client's identity check then refuses.
pub fn identity_server_name(identity: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, identity.to_string().as_bytes());
    let mut name = String::with_capacity(32 + SNI_SUFFIX.len());
    for b in digest.as_ref().iter().take(16) {
        name.push_str(&format!("{b:02x}"));
    }
    name.push_str(SNI_SUFFIX);
    name
}

/// [`identity_server_name`] as rustls's type.
pub fn identity_sni(identity: &SpiffeId) -> ServerName<'static> {
    ServerName::try_from(identity_server_name(identity))
        .unwrap_or_else(|_| placeholder_server_name())
}
