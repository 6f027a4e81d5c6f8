//! The agent's certificate source in Kubernetes mode: a [`CertificateProvider`] that asks the
//! mesh CA (`mesh-agent controller`, or any server of Istio's CA API) for each workload
//! certificate.
//!
//! Per certificate: a fresh ECDSA P-256 key made here (it never leaves the node), a CSR whose
//! only SAN is the workload's SPIFFE ID, and a unary gRPC call over TLS with the node agent's
//! projected ServiceAccount token (re-read from its file for every request: the kubelet rotates
//! it) as `authorization: Bearer …`. The CA's certificate is verified against the trust bundle
//! and the name given in [`CaClientConfig::server_name`]. A failed attempt is retried with
//! exponential backoff; the error of the last one names its cause (refused and why,
//! unreachable, a bad response). [`crate::identity::CertCache`] keeps the previous certificate
//! while renewals fail.
//!
//! The trust bundle comes from the CA's ConfigMap ([`watch_bundle`]); a change reaches every new
//! TLS handshake of the tunnel without a restart (the tunnel asks the provider for the bundle
//! per handshake).

pub mod wire;

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CertificateProvider, IdentityError, SpiffeId, TrustBundle, WorkloadCert, tls};
use wire::{CertificateRequest, CertificateResponse, Code};

/// The ConfigMap key holding the bundle (as the CA writes it).
pub const BUNDLE_KEY: &str = "root-cert.pem";
/// Where a projected token is usually mounted.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/nodemesh-ca";

/// How to reach the CA.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `host:port` (a DNS name or an address).
    pub address: String,
    /// The name the CA's certificate must carry (e.g. `nodemesh-ca.nodemesh-system.svc`).
    pub server_name: String,
    /// The projected ServiceAccount token, re-read for each request.
    pub token_path: PathBuf,
    /// Requested lifetime (the CA may cap it).
    pub ttl: Duration,
    /// Attempts per certificate (first included) and the first backoff (doubled each time).
    pub attempts: u32,
    pub backoff: Duration,
    /// Deadline of one attempt (connect, TLS, request, response).
    pub timeout: Duration,
}

impl CaClientConfig {
    pub fn new(address: &str, server_name: &str, token_path: PathBuf) -> Self {
        Self {
            address: address.into(),
            server_name: server_name.into(),
            token_path,
            ttl: super::DEFAULT_CERT_TTL,
            attempts: 5,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error(
        "cannot read the token {path}: {source} (the agent's projected ServiceAccount token, audience nodemesh-ca: check the DaemonSet's volume)"
    )]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA at {address} is unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the CA at {address} refused ({code:?}): {message}")]
    Refused {
        address: String,
        code: Code,
        message: String,
    },
    #[error("bad response from the CA at {address}: {reason}")]
    BadResponse { address: String, reason: String },
    #[error("making the key or CSR failed: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("the trust bundle ConfigMap {namespace}/{name}: {reason}")]
    Bundle {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// The bundle the client verifies the CA with and hands to the tunnel; replaced by
/// [`watch_bundle`].
pub type SharedBundle = Arc<RwLock<TrustBundle>>;

/// A [`CertificateProvider`] backed by the mesh CA.
#[derive(Debug)]
pub struct CaClient {
    config: CaClientConfig,
    bundle: SharedBundle,
}

impl CaClient {
    pub fn new(config: CaClientConfig, bundle: SharedBundle) -> Self {
        Self { config, bundle }
    }

    fn bundle(&self) -> TrustBundle {
        self.bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One request, no retry.
    pub async fn request(
        &self,
        csr_pem: &str,
    ) -> Result<Vec<CertificateDer<'static>>, CaClientError> {
        let cfg = &self.config;
        let token =
            std::fs::read_to_string(&cfg.token_path).map_err(|source| CaClientError::Token {
                path: cfg.token_path.clone(),
                source,
            })?;
        let unreachable = |reason: String| CaClientError::Unreachable {
            address: cfg.address.clone(),
            reason,
        };
        let bad = |reason: String| CaClientError::BadResponse {
            address: cfg.address.clone(),
            reason,
        };
        let bundle = self.bundle();
        let store = bundle
            .root_store()
            .map_err(|e| unreachable(format!("no trust bundle to verify it with: {e}")))?;
        let mut tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| unreachable(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
        tls_cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| unreachable(format!("bad server name `{}`: {e}", cfg.server_name)))?;

        let tcp = tokio::net::TcpStream::connect(&cfg.address)
            .await
            .map_err(|e| unreachable(format!("TCP connect: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                unreachable(format!(
                    "TLS: {e} (its certificate must chain to the trust bundle and name `{}`)",
                    cfg.server_name
                ))
            })?;
        let (mut send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| unreachable(format!("HTTP/2: {e}")))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let _abort = AbortOnDrop(driver);

        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!(
                "https://{}{}",
                cfg.server_name,
                wire::CREATE_CERTIFICATE_PATH
            ))
            .header(http::header::CONTENT_TYPE, wire::GRPC_CONTENT_TYPE)
            .header(http::header::TE, "trailers")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .body(())
            .map_err(|e| unreachable(format!("building the request: {e}")))?;
        let message = CertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: i64::try_from(cfg.ttl.as_secs()).unwrap_or(i64::MAX),
        };
        let (response, mut body) = send
            .send_request(request, false)
            .map_err(|e| unreachable(format!("sending the request: {e}")))?;
        body.send_data(wire::frame(&message.encode()), true)
            .map_err(|e| unreachable(format!("sending the request: {e}")))?;
        let response = response
            .await
            .map_err(|e| unreachable(format!("awaiting the response: {e}")))?;
        let (parts, mut body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(bad(format!("HTTP status {}", parts.status)));
        }
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| bad(format!("reading the body: {e}")))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
            if data.len() > wire::MAX_MESSAGE + 5 {
                return Err(bad("response too large".into()));
            }
        }
        // Trailers-only responses carry the status in the headers.
        let trailers = if parts.headers.contains_key("grpc-status") {
            parts.headers
        } else {
            body.trailers()
                .await
                .map_err(|e| bad(format!("reading the trailers: {e}")))?
                .unwrap_or_default()
        };
        let status = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| bad("no grpc-status".into()))?;
        if status != 0 {
            let message = trailers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map(wire::decode_message)
                .unwrap_or_default();
            return Err(CaClientError::Refused {
                address: cfg.address.clone(),
                code: Code::from_u32(status).unwrap_or(Code::Internal),
                message: if Code::from_u32(status).is_none() {
                    format!("gRPC status {status}: {message}")
                } else {
                    message
                },
            });
        }
        let response = wire::unframe(&data)
            .and_then(CertificateResponse::decode)
            .map_err(|e| bad(e.to_string()))?;
        response
            .cert_chain
            .iter()
            .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("a certificate is not PEM: {e}")))
    }

    /// Checks what the CA sent: the leaf names `identity`, carries our key and chains to the
    /// bundle. Returns the chain without the roots the bundle already has.
    fn accept(
        &self,
        identity: &SpiffeId,
        key: &KeyPair,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime, SystemTime), CaClientError> {
        let bad = |reason: String| CaClientError::BadResponse {
            address: self.config.address.clone(),
            reason,
        };
        let bundle = self.bundle();
        let chain: Vec<_> = chain
            .into_iter()
            .filter(|c| !bundle.roots.contains(c))
            .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| bad("an empty certificate chain".into()))?;
        let id = tls::spiffe_id_of(leaf).map_err(|e| bad(format!("the leaf: {e}")))?;
        if &id != identity {
            return Err(bad(format!("the leaf is for {id}, not {identity}")));
        }
        let (_, parsed) =
            X509Certificate::from_der(leaf.as_ref()).map_err(|e| bad(format!("the leaf: {e}")))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice()
        {
            return Err(bad("the leaf does not carry the key of our CSR".into()));
        }
        tls::verify_chain(&bundle, &chain, SystemTime::now()).map_err(|e| {
            bad(format!(
                "the certificate does not verify against the trust bundle: {e} (the bundle may \
                 lag a root rotation)"
            ))
        })?;
        let secs = |t: i64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or_default())
        };
        let validity = parsed.validity();
        let (nb, na) = (
            secs(validity.not_before.timestamp()),
            secs(validity.not_after.timestamp()),
        );
        Ok((chain, nb, na))
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn csr_for(identity: &SpiffeId) -> Result<(KeyPair, String), CaClientError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(identity.to_string())?)];
    let pem = params.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

impl CertificateProvider for CaClient {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        let provider_err = |e: CaClientError| IdentityError::Provider {
            identity: identity.to_string(),
            reason: e.to_string(),
        };
        let (key, csr) = csr_for(identity).map_err(provider_err)?;
        let mut delay = self.config.backoff;
        let mut attempt = 1;
        loop {
            let result = match tokio::time::timeout(self.config.timeout, self.request(&csr)).await {
                Ok(r) => r.and_then(|chain| self.accept(identity, &key, chain)),
                Err(_) => Err(CaClientError::Unreachable {
                    address: self.config.address.clone(),
                    reason: format!("no answer within {:?}", self.config.timeout),
                }),
            };
            match result {
                Ok((chain, not_before, not_after)) => {
                    return Ok(WorkloadCert::new(
                        identity.clone(),
                        chain,
                        PrivatePkcs8KeyDer::from(key.serialize_der()),
                        not_before,
                        not_after,
                    ));
                }
                Err(e) if attempt >= self.config.attempts => return Err(provider_err(e)),
                Err(e) => {
                    warn!(%identity, attempt, error = %e, retry_in = ?delay,
                        "certificate request failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
            }
        }
    }

    fn trust_bundle(&self) -> TrustBundle {
        self.bundle()
    }
}

/// Parses the bundle ConfigMap's `root-cert.pem`.
pub fn bundle_of(cm: &ConfigMap, trust_domain: &str) -> Result<TrustBundle, String> {
    let pem = cm
        .data
        .as_ref()
        .and_then(|d| d.get(BUNDLE_KEY))
        .ok_or_else(|| format!("it has no `{BUNDLE_KEY}`"))?;
    let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{BUNDLE_KEY}` is not PEM: {e}"))?;
    let bundle = TrustBundle::new(trust_domain, roots);
    bundle.root_store().map_err(|e| e.to_string())?;
    Ok(bundle)
}

/// Keeps the trust bundle ConfigMap's task running; aborted on drop.
#[derive(Debug)]
pub struct BundleWatch {
    pub bundle: SharedBundle,
    task: JoinHandle<()>,
}

impl Drop for BundleWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches ConfigMap `namespace/name` and keeps the returned bundle equal to its roots; returns
/// once a first valid bundle is read, or fails after `first_within` naming what is wrong. A
/// later invalid or deleted ConfigMap keeps the last good bundle (logged).
pub async fn watch_bundle(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    first_within: Duration,
) -> Result<BundleWatch, CaClientError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let (first_tx, mut first_rx) = tokio::sync::watch::channel::<Option<Result<(), String>>>(None);
    let bundle: SharedBundle = Arc::new(RwLock::new(TrustBundle::new(trust_domain, Vec::new())));
    let (ns, cm, td, shared) = (
        namespace.to_string(),
        name.to_string(),
        trust_domain.to_string(),
        bundle.clone(),
    );
    let task = tokio::spawn(async move {
        let by_name = watcher::Config::default().fields(&format!("metadata.name={cm}"));
        let stream = watcher(api, by_name).default_backoff().applied_objects();
        let mut stream = std::pin::pin!(stream);
        loop {
            match stream.try_next().await {
                Ok(Some(object)) => match bundle_of(&object, &td) {
                    Ok(b) => {
                        let n = b.roots.len();
                        let mut slot = shared.write().unwrap_or_else(|p| p.into_inner());
                        if slot.roots.is_empty() {
                            info!(configmap = %format!("{ns}/{cm}"), roots = n, "trust bundle loaded");
                            *slot = b;
                        } else if slot.roots != b.roots {
                            info!(configmap = %format!("{ns}/{cm}"), roots = n, "trust bundle updated");
                            *slot = b;
                        }
                        drop(slot);
                        first_tx.send_replace(Some(Ok(())));
                    }
                    Err(reason) => {
                        warn!(configmap = %format!("{ns}/{cm}"), %reason,
                            "trust bundle ConfigMap unusable; keeping the previous bundle");
                        if first_tx.borrow().is_none() {
                            first_tx.send_replace(Some(Err(reason)));
                        }
                    }
                },
                Ok(None) => return,
                Err(e) => {
                    warn!(configmap = %format!("{ns}/{cm}"), error = %e,
                        "trust bundle watch failed; retrying");
                    if first_tx.borrow().is_none() {
                        first_tx.send_replace(Some(Err(e.to_string())));
                    }
                }
            }
        }
    });
    let watch = BundleWatch { bundle, task };
    let err = |reason: String| CaClientError::Bundle {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    };
    let mut last = None;
    let wait = async {
        loop {
            if let Some(r) = first_rx.borrow_and_update().clone() {
                match r {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            if first_rx.changed().await.is_err() {
                return Err(());
            }
        }
    };
    match tokio::time::timeout(first_within, wait).await {
        Ok(Ok(())) => Ok(watch),
        _ => Err(err(match last {
            Some(e) => format!(
                "no usable trust bundle within {first_within:?}: {e} (is the controller running? \
                 may the agent list and watch configmaps in {namespace}?)"
            ),
            None => format!(
                "it did not appear within {first_within:?} (the controller publishes it: is it \
                 running?)"
            ),
        })),
    }
}
