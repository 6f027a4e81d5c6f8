//! The mesh's certificate authority, served by every controller replica: Istio's CA API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, gRPC over TLS, wire format in
//! [`crate::identity::ca_client::wire`]) with Istio's node authorization ([`authorize`]): a node
//! agent gets certificates only for service accounts that have a running pod on its own node.
//!
//! [`serve`] is the seam the controller calls: it loads (or creates) the root in a Secret,
//! publishes the trust bundle ConfigMap ([`roots`]), starts a pod reflector (pods reduced to the
//! four fields the checks read, so memory stays bounded), and answers on the listener it is
//! given until `shutdown`. Its readiness [`Gate`] clears once all of that is up. Changes to the
//! Secret (a rotation step) are picked up by a watch: the signer and the bundle follow.
//!
//! Every refusal is logged with its reason and counted in
//! `nodemesh_ca_certificates_refused_total{reason}`; every signature in
//! `nodemesh_ca_certificates_signed_total`.

pub mod authorize;
mod csr;
pub mod roots;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::StreamExt;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::{ConfigMap, Pod, PodSpec, PodStatus, Secret},
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use crate::{
    identity::{
        DEFAULT_CERT_TTL, IdentityError, LocalCa, TrustBundle,
        ca_client::wire::{self, CertificateRequest, CertificateResponse, Code},
        tls::verify_chain,
    },
    readiness::Readiness,
};

use authorize::{PodFacts, PodIndex, Refusal, Review};

/// The audience agents request their projected token for, and the CA reviews it with.
pub const DEFAULT_AUDIENCE: &str = "nodemesh-ca";
/// The Secret holding the signing root (Istio `cacerts` layout).
pub const DEFAULT_SECRET: &str = "nodemesh-cacerts";
/// The ConfigMap holding the trust bundle.
pub const DEFAULT_BUNDLE_CONFIGMAP: &str = "nodemesh-ca-root";
/// The CA's Service name (its serving certificate names `<service>.<namespace>.svc`).
pub const DEFAULT_SERVICE: &str = "nodemesh-ca";
/// The CA's port (Istio's istiod serves its CA on 15012).
pub const DEFAULT_PORT: u16 = 15012;
/// The longest certificate the CA signs, whatever the request asks: 24 h, Istio's default
/// workload lifetime. Rotation waits this long before dropping an old root.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Leaves are back-dated by this much for clock skew between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// The serving certificate's lifetime; it is renewed at half of it and on every root change.
const SERVING_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a client may take for its TLS handshake and its request body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The CA's settings (flags of `mesh-agent controller`).
#[derive(Clone, Debug)]
pub struct CaConfig {
    /// Where the Secret and the ConfigMap live (the release namespace).
    pub namespace: String,
    pub trust_domain: String,
    pub secret: String,
    pub bundle_configmap: String,
    /// The audience of the tokens it accepts.
    pub audience: String,
    /// Usernames allowed to ask, `system:serviceaccount:<ns>:<name>`.
    pub allowed_callers: Vec<String>,
    /// The serving certificate's DNS names.
    pub dns_names: Vec<String>,
    pub max_ttl: Duration,
}

impl CaConfig {
    /// Defaults for a release in `namespace`: callers `system:serviceaccount:<namespace>:nodemesh-agent`,
    /// serving names `nodemesh-ca.<namespace>.svc` (and the shorter and longer forms).
    pub fn new(namespace: &str, trust_domain: &str) -> Self {
        Self {
            namespace: namespace.into(),
            trust_domain: trust_domain.into(),
            secret: DEFAULT_SECRET.into(),
            bundle_configmap: DEFAULT_BUNDLE_CONFIGMAP.into(),
            audience: DEFAULT_AUDIENCE.into(),
            allowed_callers: vec![format!("system:serviceaccount:{namespace}:nodemesh-agent")],
            dns_names: service_dns_names(DEFAULT_SERVICE, namespace),
            max_ttl: DEFAULT_MAX_TTL,
        }
    }

    fn policy(&self) -> authorize::Policy {
        authorize::Policy {
            audience: self.audience.clone(),
            allowed_callers: self.allowed_callers.clone(),
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// `<service>.<ns>.svc`, `<service>.<ns>`, `<service>.<ns>.svc.cluster.local`.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "cannot {action} {object}: {source} (check the controller's RBAC in charts/nodemesh and that the API server is reachable)"
    )]
    Api {
        /// The verb (`get`, `create`, `update`, `list`, `watch`, `tokenreview`).
        action: &'static str,
        /// The resource's plural.
        resource: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("the CA's root is unusable: {0}")]
    Identity(#[source] IdentityError),
    #[error("the CA's serving certificate: {0}")]
    Tls(#[from] rustls::Error),
    #[error(
        "the pod reflector stopped before its first list (check the controller may list and watch pods)"
    )]
    PodsNotSynced,
    #[error("accepting connections failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// Where the CA reports a failed API call: `(operation, resource, HTTP status or 0)`.
pub type ApiErrorHook = Arc<dyn Fn(&'static str, &'static str, u16) + Send + Sync>;

/// The CA's metrics; clones share them.
#[derive(Clone, Default)]
pub struct CaMetrics {
    signed: Counter,
    refused: Family<[(&'static str, &'static str); 1], Counter>,
    api_errors: Option<ApiErrorHook>,
}

impl std::fmt::Debug for CaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMetrics")
            .field("signed", &self.signed.get())
            .finish_non_exhaustive()
    }
}

impl CaMetrics {
    /// Registers `ca_certificates_signed` and `ca_certificates_refused` (in the `nodemesh`
    /// sub-registry: `nodemesh_ca_certificates_*_total`).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ca_certificates_signed",
            "Workload certificates the CA signed",
            m.signed.clone(),
        );
        registry.register(
            "ca_certificates_refused",
            "Certificate requests the CA refused, by reason",
            m.refused.clone(),
        );
        for reason in Refusal::REASONS
            .iter()
            .chain(&["token_review_failed", "internal"])
        {
            let _ = m.refused.get_or_create(&[("reason", reason)]);
        }
        m
    }

    /// Also report failed API calls to `hook` (the controller counts them in
    /// `nodemesh_controller_kubernetes_errors_total`).
    pub fn with_api_errors(mut self, hook: ApiErrorHook) -> Self {
        self.api_errors = Some(hook);
        self
    }

    fn api_error(&self, operation: &'static str, resource: &'static str, e: &kube::Error) {
        if let Some(hook) = &self.api_errors {
            hook(operation, resource, code_of(e));
        }
    }

    fn watch_error(&self, resource: &'static str, e: &watcher::Error) {
        let (operation, err) = match e {
            watcher::Error::InitialListFailed(e) => ("list", e),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => ("watch", e),
            watcher::Error::WatchError(s) => {
                if let Some(hook) = &self.api_errors {
                    hook("watch", resource, s.code);
                }
                return;
            }
            _ => return,
        };
        self.api_error(operation, resource, err);
    }

    pub fn signed(&self) -> u64 {
        self.signed.get()
    }

    pub fn refused(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&[("reason", reason)]).get()
    }
}

/// The pod reflector's store as the checks' [`PodIndex`].
struct Pods(Store<Pod>);

fn facts(pod: &Pod) -> PodFacts {
    let spec = pod.spec.as_ref();
    PodFacts {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        terminated: matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
    }
}

impl PodIndex for Pods {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.0
            .get(&ObjectRef::new(name).within(namespace))
            .map(|p| facts(&p))
    }

    fn has_running_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        // A scan of the store: at most a few thousand small objects, once per signature.
        self.0.state().iter().any(|p| {
            p.metadata.namespace.as_deref() == Some(namespace) && {
                let f = facts(p);
                f.node == node && f.service_account == service_account && !f.terminated
            }
        })
    }
}

/// Keeps only what [`facts`] reads, so the store's memory is a few hundred bytes per pod.
fn slim(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        service_account_name: spec.service_account_name,
        node_name: spec.node_name,
        ..PodSpec::default()
    });
    let phase = pod.status.take().and_then(|s| s.phase);
    pod.status = Some(PodStatus {
        phase,
        ..PodStatus::default()
    });
}

struct Inner {
    config: CaConfig,
    client: Client,
    metrics: CaMetrics,
    pods: Pods,
    signer: RwLock<Arc<LocalCa>>,
    tls: RwLock<Arc<ServerConfig>>,
}

impl Inner {
    fn signer(&self) -> Arc<LocalCa> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn tls(&self) -> Arc<ServerConfig> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn serving_config(ca: &LocalCa, dns_names: &[String]) -> Result<ServerConfig, CaError> {
    let now = SystemTime::now();
    let (chain, key) = ca
        .issue_server(dns_names, now - CLOCK_SKEW, now + SERVING_TTL)
        .map_err(CaError::Identity)?;
    let mut cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(chain, PrivateKeyDer::Pkcs8(key))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

fn code_of(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        _ => 0,
    }
}

/// Readiness gates of the CA, each cleared by its stage.
pub const GATES: [&str; 4] = [
    "ca-root",
    "ca-token-review",
    "pods-synced",
    "secrets-synced",
];

/// The CA's readiness gates ([`GATES`]), registered before [`serve`] runs so `/readyz` never
/// answers 200 before the CA had a chance to say it is not ready.
#[derive(Debug)]
pub struct CaGates([crate::readiness::Gate; 4]);

impl CaGates {
    pub fn register(readiness: &Readiness) -> Self {
        Self(GATES.map(|g| readiness.register(g)))
    }
}

/// Retries `stage` with backoff (1 s doubling to 30 s) until it succeeds; `None` if `shutdown`
/// comes first. Each failure is logged (what failed and what to check) and reported.
async fn retry<T, F, Fut, S>(
    what: &str,
    metrics: &CaMetrics,
    shutdown: &mut std::pin::Pin<&mut S>,
    mut stage: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CaError>>,
    S: Future<Output = ()>,
{
    let mut delay = Duration::from_secs(1);
    loop {
        let result = tokio::select! {
            () = shutdown.as_mut() => return None,
            r = stage() => r,
        };
        match result {
            Ok(v) => return Some(v),
            Err(e) => {
                if let CaError::Api {
                    action,
                    resource,
                    source,
                    ..
                } = &e
                {
                    metrics.api_error(action, resource, source);
                }
                warn!(error = %e, retry_in = ?delay, "CA: {what} failed; retrying");
            }
        }
        tokio::select! {
            () = shutdown.as_mut() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Loads (or creates) the root and publishes the bundle.
async fn load_root(
    config: &CaConfig,
    secrets: &Api<Secret>,
    configmaps: &Api<ConfigMap>,
) -> Result<LocalCa, CaError> {
    let ns = &config.namespace;
    let secret = roots::load_or_create(secrets, ns, &config.secret, &config.trust_domain).await?;
    let ca = roots::open(&secret, ns, &config.secret, &config.trust_domain)?;
    roots::publish_bundle(
        configmaps,
        ns,
        &config.bundle_configmap,
        &roots::bundle_pem(ca.roots()),
    )
    .await?;
    Ok(ca)
}

/// Runs the CA on `listener` until `shutdown` resolves. Clears its readiness `gates`
/// ([`CaGates::register`]) stage by stage: `ca-root` (the root Secret read or created, the
/// bundle published), `ca-token-review` (a TokenReview is allowed: one for a made-up token at
/// start), `pods-synced` (the pod store listed), `secrets-synced` (the Secret
/// watch listed). Connections are served once the root and the pods are there. API errors are
/// retried with backoff (and reported through [`CaMetrics::with_api_errors`]), never fatal:
/// the CA stays not ready, saying why in its log.
pub async fn serve(
    config: CaConfig,
    client: Client,
    listener: TcpListener,
    metrics: CaMetrics,
    gates: CaGates,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CaError> {
    let [root_gate, review_gate, pods_gate, secrets_gate] = gates.0;
    let mut shutdown = std::pin::pin!(shutdown);
    let ns = config.namespace.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let Some(ca) = retry("loading the root", &metrics, &mut shutdown, || {
        load_root(&config, &secrets, &configmaps)
    })
    .await
    else {
        return Ok(());
    };
    drop(root_gate);
    let tls = serving_config(&ca, &config.dns_names)?;

    // May the CA review tokens? A review of a made-up token answers "not authenticated" when
    // it may, 403 when it may not: better known now than at the first agent's request.
    let Some(()) = retry("reviewing a token", &metrics, &mut shutdown, || async {
        token_review(&client, "nodemesh-ca-startup-probe", &config.audience)
            .await
            .map(|_| ())
            .map_err(|source| CaError::Api {
                action: "tokenreview",
                resource: "tokenreviews",
                object: "tokenreviews".into(),
                source,
            })
    })
    .await
    else {
        return Ok(());
    };
    drop(review_gate);

    let mut tasks = JoinSet::new();
    let (store, writer) = reflector::store::<Pod>();
    let pods_api: Api<Pod> = Api::all(client.clone());
    let pod_metrics = metrics.clone();
    tasks.spawn(async move {
        let stream = watcher(pods_api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(slim)
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        let mut gate = Some(pods_gate);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => drop(gate.take()),
                Ok(_) => {}
                Err(e) => {
                    pod_metrics.watch_error("pods", &e);
                    warn!(error = %e, "the CA's pod watch failed (may the controller list and \
                        watch pods?); retrying with backoff");
                }
            }
        }
    });
    tokio::select! {
        () = shutdown.as_mut() => return Ok(()),
        // Errs only when the writer is dropped, i.e. never while the reflector task runs.
        _ = store.wait_until_ready() => {}
    }

    let inner = Arc::new(Inner {
        config: config.clone(),
        client: client.clone(),
        metrics,
        pods: Pods(store),
        signer: RwLock::new(Arc::new(ca)),
        tls: RwLock::new(Arc::new(tls)),
    });
    tasks.spawn(follow_secret(
        inner.clone(),
        secrets,
        configmaps,
        secrets_gate,
    ));
    tasks.spawn(renew_serving(inner.clone()));

    let addr = listener.local_addr().map_err(CaError::Accept)?;
    info!(%addr, namespace = %ns, trust_domain = %config.trust_domain,
        dns_names = ?config.dns_names, allowed_callers = ?config.allowed_callers, "CA serving");

    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.as_mut() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let inner = inner.clone();
                    conns.spawn(async move { serve_connection(inner, stream, peer).await });
                }
                Err(e) => {
                    warn!(error = %e, "CA accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    info!("CA stopped");
    Ok(())
}

/// Reloads the signer and republishes the bundle whenever the Secret changes. A Secret that
/// does not open keeps the last good signer (and says why). `gate` clears at the first list.
async fn follow_secret(
    inner: Arc<Inner>,
    secrets: Api<Secret>,
    configmaps: Api<ConfigMap>,
    gate: crate::readiness::Gate,
) {
    let cfg = &inner.config;
    let by_name = watcher::Config::default().fields(&format!("metadata.name={}", cfg.secret));
    let stream = watcher(secrets, by_name).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut gate = Some(gate);
    while let Some(event) = stream.next().await {
        let secret = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
            Ok(watcher::Event::InitDone) => {
                drop(gate.take());
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                inner.metrics.watch_error("secrets", &e);
                warn!(error = %e, secret = %cfg.secret, "the CA's Secret watch failed (may the \
                    controller list and watch secrets in its namespace?); retrying");
                continue;
            }
        };
        let ca = match roots::open(&secret, &cfg.namespace, &cfg.secret, &cfg.trust_domain) {
            Ok(ca) => ca,
            Err(e) => {
                error!(error = %e, "the CA Secret changed but cannot be used; still signing with the previous root");
                continue;
            }
        };
        let bundle = roots::bundle_pem(ca.roots());
        match serving_config(&ca, &cfg.dns_names) {
            Ok(tls) => *inner.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls),
            Err(e) => error!(error = %e, "cannot renew the CA's serving certificate"),
        }
        info!(secret = %cfg.secret, roots = ca.roots().len(), "CA root (re)loaded from the Secret");
        *inner.signer.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ca);
        if let Err(e) =
            roots::publish_bundle(&configmaps, &cfg.namespace, &cfg.bundle_configmap, &bundle).await
        {
            if let CaError::Api {
                action,
                resource,
                source,
                ..
            } = &e
            {
                inner.metrics.api_error(action, resource, source);
            }
            error!(error = %e, "cannot publish the trust bundle; agents keep the previous one");
        }
    }
}

/// Renews the serving certificate at half its lifetime.
async fn renew_serving(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(SERVING_TTL / 2).await;
        match serving_config(&inner.signer(), &inner.config.dns_names) {
            Ok(tls) => *inner.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls),
            Err(e) => error!(error = %e, "cannot renew the CA's serving certificate"),
        }
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let acceptor = TlsAcceptor::from(inner.tls());
    let tls = match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "CA TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "CA TLS handshake timed out");
            return;
        }
    };
    let mut conn = match h2::server::handshake(tls).await {
        Ok(c) => c,
        Err(e) => {
            debug!(%peer, error = %e, "CA HTTP/2 handshake failed");
            return;
        }
    };
    let mut streams = JoinSet::new();
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                let inner = inner.clone();
                streams.spawn(async move { handle(inner, req, respond, peer).await });
            }
            Err(e) => {
                debug!(%peer, error = %e, "CA connection ended");
                break;
            }
        }
    }
    while streams.join_next().await.is_some() {}
}

async fn read_body(body: &mut RecvStream) -> Result<Vec<u8>, (Code, String)> {
    let mut buf = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk =
            chunk.map_err(|e| (Code::InvalidArgument, format!("reading the request: {e}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        if buf.len() > wire::MAX_MESSAGE + 5 {
            return Err((
                Code::ResourceExhausted,
                format!("request larger than {} bytes", wire::MAX_MESSAGE),
            ));
        }
    }
    Ok(buf)
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
) {
    let (parts, mut body) = req.into_parts();
    let result = if parts.method != http::Method::POST
        || parts.uri.path() != wire::CREATE_CERTIFICATE_PATH
    {
        Err((
            Code::Unimplemented,
            format!("unknown method {}", parts.uri.path()),
        ))
    } else {
        match tokio::time::timeout(REQUEST_TIMEOUT, read_body(&mut body)).await {
            Err(_) => Err((Code::InvalidArgument, "request body timed out".into())),
            Ok(Err(e)) => Err(e),
            Ok(Ok(buf)) => {
                let token = parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    })
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned);
                match wire::unframe(&buf).and_then(CertificateRequest::decode) {
                    Err(e) => Err((Code::InvalidArgument, format!("bad request message: {e}"))),
                    Ok(request) => create_certificate(&inner, token, request, peer).await,
                }
            }
        }
    };
    let _ = send(&mut respond, result);
}

fn grpc_headers(code: Code, message: Option<&str>) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("grpc-status", http::HeaderValue::from(code as u8 as u32));
    if let Some(m) = message
        && let Ok(v) = http::HeaderValue::from_str(&wire::encode_message(m))
    {
        h.insert("grpc-message", v);
    }
    h
}

fn send(
    respond: &mut SendResponse<Bytes>,
    result: Result<CertificateResponse, (Code, String)>,
) -> Result<(), h2::Error> {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, wire::GRPC_CONTENT_TYPE);
    match result {
        Ok(resp) => {
            let response = builder.body(()).unwrap_or_default();
            let mut stream = respond.send_response(response, false)?;
            stream.send_data(wire::frame(&resp.encode()), false)?;
            stream.send_trailers(grpc_headers(Code::Ok, None))
        }
        Err((code, message)) => {
            // Trailers-only response: the status rides in the headers.
            if let Some(h) = builder.headers_mut() {
                h.extend(grpc_headers(code, Some(&message)));
            }
            let response = builder.body(()).unwrap_or_default();
            respond.send_response(response, true).map(|_| ())
        }
    }
}

/// The checks in order, then the signature.
async fn create_certificate(
    inner: &Inner,
    token: Option<String>,
    request: CertificateRequest,
    peer: SocketAddr,
) -> Result<CertificateResponse, (Code, String)> {
    let refuse = |refusal: Refusal, caller: Option<&authorize::Caller>| {
        let reason = refusal.reason();
        inner
            .metrics
            .refused
            .get_or_create(&[("reason", reason)])
            .inc();
        warn!(%peer, reason, caller_pod = caller.map(|c| format!("{}/{}", c.namespace, c.pod)),
            caller_node = caller.map(|c| c.node.clone()), "certificate refused: {refusal}");
        let code = if refusal.is_authentication() {
            Code::Unauthenticated
        } else if refusal.is_bad_request() {
            Code::InvalidArgument
        } else {
            Code::PermissionDenied
        };
        (code, refusal.to_string())
    };
    let policy = inner.config.policy();
    let Some(token) = token else {
        return Err(refuse(Refusal::TokenMissing, None));
    };
    let review = match token_review(&inner.client, &token, &inner.config.audience).await {
        Ok(r) => r,
        Err(e) => {
            inner
                .metrics
                .refused
                .get_or_create(&[("reason", "token_review_failed")])
                .inc();
            error!(%peer, error = %e, "TokenReview failed; the caller should retry");
            return Err((
                Code::Unavailable,
                format!("the CA cannot review tokens right now: {e}"),
            ));
        }
    };
    let caller = authorize::caller(&review, &inner.pods, &policy).map_err(|r| refuse(r, None))?;
    let csr = csr::parse(&request.csr).map_err(|r| refuse(r, Some(&caller)))?;
    let identity = authorize::identity(&caller, &csr.uri, &inner.pods, &policy)
        .map_err(|r| refuse(r, Some(&caller)))?;

    let asked = u64::try_from(request.validity_duration).unwrap_or(0);
    let ttl = if asked == 0 {
        DEFAULT_CERT_TTL.min(inner.config.max_ttl)
    } else {
        Duration::from_secs(asked).min(inner.config.max_ttl)
    };
    let signer = inner.signer();
    let now = SystemTime::now();
    let chain = signer
        .sign_public_key(&identity, &csr.public_key, now - CLOCK_SKEW, now + ttl)
        .map_err(|e| {
            inner
                .metrics
                .refused
                .get_or_create(&[("reason", "internal")])
                .inc();
            error!(%identity, error = %e, "signing failed");
            (Code::Internal, format!("signing failed: {e}"))
        })?;
    let root = root_of(&signer, &chain, now);
    inner.metrics.signed.inc();
    info!(%identity, caller_pod = %format!("{}/{}", caller.namespace, caller.pod),
        caller_node = %caller.node, ttl_secs = ttl.as_secs(), "certificate signed");
    let mut pems: Vec<String> = chain
        .iter()
        .chain(root.as_ref())
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect();
    pems.dedup();
    Ok(CertificateResponse { cert_chain: pems })
}

/// The root of the bundle that `chain` verifies against (sent last, as Istio does).
fn root_of(
    ca: &LocalCa,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Option<CertificateDer<'static>> {
    ca.roots()
        .iter()
        .find(|root| {
            let one = TrustBundle::new(String::new(), vec![(*root).clone()]);
            verify_chain(&one, chain, now).is_ok()
        })
        .cloned()
}

async fn token_review(client: &Client, token: &str, audience: &str) -> Result<Review, kube::Error> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let answer = api.create(&PostParams::default(), &review).await?;
    let status = answer.status.unwrap_or_default();
    let user = status.user.unwrap_or_default();
    let audience_ok = status
        .audiences
        .as_ref()
        .is_none_or(|a| a.iter().any(|x| x == audience));
    Ok(Review {
        authenticated: status.authenticated.unwrap_or(false) && audience_ok,
        error: status.error.unwrap_or_default(),
        username: user.username.unwrap_or_default(),
        extra: user.extra.unwrap_or_default(),
    })
}
