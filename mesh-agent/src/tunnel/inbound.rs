//! Inbound HBONE server (port 15008).
//!
//! Per connection: the address it arrived on must be a local workload's; we present that
//! workload's certificate and require the client's (mesh roots, our trust domain). Per stream:
//! `CONNECT` only (else 400); `:authority` must be `ip:port` with the ip of the workload the
//! connection arrived on (else 400: a peer may not use one pod's identity to reach another);
//! the [`Authorizer`] decides (deny: 401 and the stream ends); the pod is connected (failure:
//! 503); then 200 and a bidirectional copy. One access-log line per stream.
//!
//! Bounds on bad peers: handshake timeout, first-request timeout, header list size, streams per
//! connection; nothing on the per-connection path panics on peer input.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinSet,
};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{debug, info, warn};

use super::{
    Authorizer, AuthzDecision, AuthzRequest, LocalWorkload, LocalWorkloads, Side, Transport,
    TunnelConfig,
    connections::{Authorized, ConnectionManager},
    copy, drain,
    metrics::{Direction, HandshakeFailure, Reporter, TrafficLabels, TunnelMetrics, flags},
    parse_forwarded_for,
    shard_id::Claim,
};
use crate::identity::{
    CertCache, SpiffeId, WorkloadCert,
    tls::{peer_cert_error, server_config, spiffe_id_of},
};

/// Ports a CONNECT may not target: the tunnel's own listeners (a loop, or a way around
/// authorization), as ztunnel.
const TUNNEL_PORTS: [u16; 2] = [mesh_common::OUTBOUND_PORT, mesh_common::INBOUND_HBONE_PORT];

/// A server config with the certificate and the trust bundle's roots it was built from
/// (rebuilt when the cache renews the certificate or the bundle changes: a root rotation reaches
/// the next handshake without a restart).
type ServerConfigEntry = (
    Arc<WorkloadCert>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    Arc<rustls::ServerConfig>,
);

/// Everything the inbound server needs.
pub struct Inbound {
    config: TunnelConfig,
    certs: Arc<CertCache>,
    workloads: Arc<dyn LocalWorkloads>,
    authorizer: Arc<dyn Authorizer>,
    server_configs: Mutex<HashMap<SpiffeId, ServerConfigEntry>>,
    active_connections: AtomicUsize,
    active_streams: AtomicUsize,
    connections: Arc<ConnectionManager>,
    metrics: TunnelMetrics,
    /// `max_inbound_connections`, shared by every listener serving this inbound (the shards).
    limit: Arc<tokio::sync::Semaphore>,
}

/// A connection accepted on one shard's listener and handed to another shard, counted on the
/// shard it was handed to.
pub(super) type Handed = (std::net::TcpStream, SocketAddr, Claim);

/// Where an inbound serve loop gets its connections.
enum Incoming {
    Listener(TcpListener),
    Handed(tokio::sync::mpsc::UnboundedReceiver<Handed>),
}

impl Incoming {
    /// The next connection once a slot under `limit` is free; `None` when handed connections
    /// end. Cancel-safe (used in `select!`): a dropped call loses no connection.
    async fn next_within(
        &mut self,
        limit: &Arc<tokio::sync::Semaphore>,
    ) -> (
        Option<std::io::Result<(tokio::net::TcpStream, SocketAddr, Option<Claim>)>>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        match self {
            Incoming::Listener(l) => {
                let (accepted, permit) = super::accept_within(l, limit).await;
                (Some(accepted.map(|(t, peer)| (t, peer, None))), permit)
            }
            Incoming::Handed(rx) => {
                let permit = limit.clone().acquire_owned().await.ok();
                let next = rx.recv().await.map(|(tcp, peer, claim)| {
                    tokio::net::TcpStream::from_std(tcp).map(|t| (t, peer, Some(claim)))
                });
                (next, permit)
            }
        }
    }
}

/// Which workload identity an inbound connection speaks for.
enum Target {
    /// Named by the client's SNI ([`crate::identity::tls::identity_server_name`]): the
    /// connection reaches any local workload of that identity (a peer dialled the node address).
    Identity(SpiffeId),
    /// No usable SNI: the workload whose address the connection arrived on (ztunnel style).
    Arrival(Arc<LocalWorkload>),
    /// No usable SNI on an address that is no workload's (a generic client dialling the node
    /// address): the node's identity ([`super::TunnelConfig::node_identity`]); any local
    /// workload may be named.
    Node(SpiffeId),
}

impl Target {
    /// The identity the server presented.
    fn identity(&self) -> &SpiffeId {
        match self {
            Target::Identity(id) | Target::Node(id) => id,
            Target::Arrival(w) => &w.identity,
        }
    }
}

/// Counts a live connection or stream; decrements on drop (also on panic or abort).
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn new(g: &'a AtomicUsize) -> Self {
        g.fetch_add(1, Ordering::SeqCst);
        Self(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(
        "connection arrived at {0}, which is not a workload on this node (check the HBONE address the peer was given)"
    )]
    NotAWorkload(SocketAddr),
    #[error("internal: no certificate for {identity}: {reason}")]
    NoCert { identity: SpiffeId, reason: String },
    #[error("downstream TLS handshake failed: {0}")]
    Tls(String),
    #[error("downstream did not complete the TLS and HTTP/2 handshakes within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("downstream HTTP/2 handshake failed: {0}")]
    H2(#[source] h2::Error),
    #[error("downstream sent no CONNECT within {0:?}")]
    FirstRequestTimeout(std::time::Duration),
}

impl Inbound {
    pub fn new(
        config: TunnelConfig,
        certs: Arc<CertCache>,
        workloads: Arc<dyn LocalWorkloads>,
        authorizer: Arc<dyn Authorizer>,
    ) -> Arc<Self> {
        let limit = Arc::new(tokio::sync::Semaphore::new(config.max_inbound_connections));
        Arc::new(Self {
            config,
            certs,
            workloads,
            authorizer,
            server_configs: Mutex::new(HashMap::new()),
            active_connections: AtomicUsize::new(0),
            active_streams: AtomicUsize::new(0),
            connections: ConnectionManager::new(),
            metrics: TunnelMetrics::default(),
            limit,
        })
    }

    /// Connections being served (TLS handshakes included).
    pub fn active_connections(&self) -> usize {
        self.active_connections.load(Ordering::SeqCst)
    }

    /// Re-checks every live stream with the authorizer (after a policy change) and closes the
    /// ones it now denies. Returns how many were closed.
    pub fn reauthorize(&self) -> usize {
        self.connections.reauthorize(&*self.authorizer)
    }

    /// This server's traffic metrics (`reporter="destination"`).
    pub fn metrics(&self) -> &TunnelMetrics {
        &self.metrics
    }

    /// Streams being served.
    pub fn active_streams(&self) -> usize {
        self.active_streams.load(Ordering::SeqCst)
    }

    /// Serves `listener` until drained. Returns when the listener is closed and every
    /// connection has ended (or been forced closed).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watch) {
        let local = listener.local_addr().ok();
        info!(listen = ?local, "inbound HBONE server started");
        self.serve_from(Incoming::Listener(listener), &drain).await;
        info!(listen = ?local, "inbound listener closed (draining)");
    }

    /// Serves the connections another thread accepted and handed over on `handed` (the shards'
    /// balancing, [`super::shards`]) until drained; each holds one count of `load` while it is
    /// served (the dispatcher counted it when handing it over).
    pub(super) async fn serve_handed(
        self: Arc<Self>,
        handed: tokio::sync::mpsc::UnboundedReceiver<Handed>,
        drain: drain::Watch,
    ) {
        self.serve_from(Incoming::Handed(handed), &drain).await;
    }

    async fn serve_from(self: Arc<Self>, mut incoming: Incoming, drain: &drain::Watch) {
        let mut conns = JoinSet::new();
        let limit = self.limit.clone();
        loop {
            tokio::select! {
                biased;
                () = drain.draining() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                (accepted, permit) = incoming.next_within(&limit) => match accepted {
                    Some(Ok((tcp, peer, claim))) => {
                        let this = self.clone();
                        let watch = drain.clone();
                        conns.spawn(async move {
                            let _permit = permit;
                            let _claim = claim;
                            this.serve_connection(tcp, peer, watch).await;
                        });
                    }
                    Some(Err(e)) => {
                        // EMFILE and friends: log and keep serving; the accept loop must not die.
                        warn!(error = %e, "inbound accept failed");
                        tokio::task::yield_now().await;
                    }
                    // Every dispatcher has stopped (they stop on drain too).
                    None => break,
                },
            }
        }
        drop(incoming);
        while conns.join_next().await.is_some() {}
    }

    fn server_config_for(
        &self,
        cert: &Arc<WorkloadCert>,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut configs = self
            .server_configs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let bundle = self.certs.trust_bundle();
        if let Some((c, roots, cfg)) = configs.get(&cert.identity)
            && Arc::ptr_eq(c, cert)
            && *roots == bundle.roots
        {
            return Ok(cfg.clone());
        }
        let cfg = server_config(cert, &bundle).map_err(|e| e.to_string())?;
        configs.insert(
            cert.identity.clone(),
            (cert.clone(), bundle.roots, cfg.clone()),
        );
        Ok(cfg)
    }

    async fn serve_connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        drain: drain::Watch,
    ) {
        let _gauge = Gauge::new(&self.active_connections);
        let result = tokio::select! {
            r = self.clone().run_connection(tcp, peer, &drain) => r,
            () = drain.forced() => Ok(()),
        };
        if let Err(e) = result {
            match &e {
                ConnError::Tls(_) | ConnError::HandshakeTimeout(_) | ConnError::H2(_) => {
                    info!(%peer, side = %Side::Downstream, error = %e, "inbound connection rejected")
                }
                _ => warn!(%peer, error = %e, "inbound connection rejected"),
            }
        }
    }

    async fn run_connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        drain: &drain::Watch,
    ) -> Result<(), ConnError> {
        let local = tcp
            .local_addr()
            .map_err(|e| ConnError::Tls(format!("socket gone before the handshake: {e}")))?;
        let timeout = self.config.handshake_timeout;
        let hs = &self.config.handshake_metrics;
        let began = Instant::now();
        // Set once TLS finished (success or failure recorded): a later timeout (h2) is not a
        // TLS handshake failure.
        let tls_recorded = std::sync::atomic::AtomicBool::new(false);
        let tls_failed = |e: &std::io::Error| {
            tls_recorded.store(true, Ordering::SeqCst);
            hs.handshake_failed(Direction::Inbound, HandshakeFailure::of_tls_error(e));
        };
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                .await
                .map_err(|e| {
                    tls_failed(&e);
                    ConnError::Tls(format!("reading the ClientHello: {e}"))
                })?;
            let sni = start.client_hello().server_name().map(str::to_owned);
            let target = match sni
                .as_deref()
                .and_then(|name| self.workloads.identity_for_sni(name))
            {
                Some(identity) => Target::Identity(identity),
                None => self.target_without_sni(local)?,
            };
            let identity = target.identity().clone();
            let cert = self.certs.get(&identity).await.map_err(|e| {
                tls_recorded.store(true, Ordering::SeqCst);
                hs.handshake_failed(Direction::Inbound, HandshakeFailure::NoLocalCertificate);
                ConnError::NoCert {
                    identity: identity.clone(),
                    reason: e.to_string(),
                }
            })?;
            let tls_config = self.server_config_for(&cert).map_err(|reason| {
                tls_recorded.store(true, Ordering::SeqCst);
                hs.handshake_failed(Direction::Inbound, HandshakeFailure::NoLocalCertificate);
                ConnError::NoCert {
                    identity: identity.clone(),
                    reason,
                }
            })?;
            let tls = start.into_stream(tls_config).await.map_err(|e| {
                tls_failed(&e);
                let reason = peer_cert_error(&e).map_or_else(
                    || e.to_string(),
                    |r| format!("client certificate refused: {r}"),
                );
                ConnError::Tls(reason)
            })?;
            tls_recorded.store(true, Ordering::SeqCst);
            hs.handshake(Direction::Inbound, began.elapsed().as_secs_f64());
            let source = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(spiffe_id_of)
                .and_then(Result::ok)
                .ok_or_else(|| ConnError::Tls("no verified client identity".into()))?;
            let conn = self.h2_handshake(tls).await?;
            Ok::<_, ConnError>((source, conn, target))
        };
        let (source, conn, target) =
            tokio::time::timeout(timeout, handshake)
                .await
                .map_err(|_| {
                    if !tls_recorded.load(Ordering::SeqCst) {
                        hs.handshake_failed(Direction::Inbound, HandshakeFailure::Timeout);
                    }
                    ConnError::HandshakeTimeout(timeout)
                })??;
        debug!(%peer, %source, workload = %target.identity(), "inbound HBONE connection established");
        self.serve_h2(conn, peer, local, source, target, drain)
            .await
    }

    /// Whom a connection without a usable SNI speaks for: the workload it arrived at, else the
    /// node (when configured).
    fn target_without_sni(&self, local: SocketAddr) -> Result<Target, ConnError> {
        match (self.workloads.by_ip(local.ip()), &self.config.node_identity) {
            (Some(w), _) => Ok(Target::Arrival(w)),
            (None, Some(node)) => Ok(Target::Node(node.clone())),
            (None, None) => Err(ConnError::NotAWorkload(local)),
        }
    }

    /// For the fuzz target `hbone_inbound` (`mesh-agent/fuzz`) only, not an API: serves `io` as
    /// an inbound connection arriving at `local` without SNI whose TLS handshake already
    /// happened and proved `source`. Everything after TLS is the production path: the HTTP/2
    /// handshake (under `handshake_timeout`), every stream and its CONNECT handling, the
    /// timeouts. Returns the connection's error as the log would show it.
    #[doc(hidden)]
    pub async fn serve_after_tls<IO>(
        self: Arc<Self>,
        io: IO,
        peer: SocketAddr,
        local: SocketAddr,
        source: SpiffeId,
        drain: &drain::Watch,
    ) -> Result<(), String>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let _gauge = Gauge::new(&self.active_connections);
        let run = async {
            let target = self.target_without_sni(local)?;
            let timeout = self.config.handshake_timeout;
            let conn = tokio::time::timeout(timeout, self.h2_handshake(io))
                .await
                .map_err(|_| ConnError::HandshakeTimeout(timeout))??;
            self.clone()
                .serve_h2(conn, peer, local, source, target, drain)
                .await
        };
        run.await.map_err(|e| e.to_string())
    }

    /// The server side of the HTTP/2 handshake on an established (TLS) stream.
    async fn h2_handshake<IO>(&self, io: IO) -> Result<h2::server::Connection<IO, Bytes>, ConnError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        h2::server::Builder::new()
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(
                self.config
                    .connection_window_for(self.config.server_max_streams),
            )
            .max_frame_size(self.config.max_frame_size)
            .max_header_list_size(self.config.max_header_list_size)
            .max_concurrent_streams(self.config.server_max_streams)
            .max_send_buffer_size(self.config.stream_window as usize)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(ConnError::H2)
    }

    /// Serves the streams of one HTTP/2 connection whose peer proved `source`, until the
    /// connection ends (or stays idle, or drains).
    async fn serve_h2<IO>(
        self: Arc<Self>,
        mut conn: h2::server::Connection<IO, Bytes>,
        peer: SocketAddr,
        local: SocketAddr,
        source: SpiffeId,
        target: Target,
        drain: &drain::Watch,
    ) -> Result<(), ConnError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let target = Arc::new(target);

        let source = Arc::new(source);
        let mut streams = JoinSet::new();
        // Before the first request: `first_request_timeout`; afterwards, whenever no stream is
        // open: `inbound_idle_timeout`, then GOAWAY.
        let idle_deadline = tokio::time::sleep(self.config.first_request_timeout);
        tokio::pin!(idle_deadline);
        let mut got_first = false;
        let mut shutting_down = false;
        loop {
            tokio::select! {
                req = conn.accept() => match req {
                    Some(Ok((req, respond))) => {
                        got_first = true;
                        let this = self.clone();
                        let (source, target) = (source.clone(), target.clone());
                        streams.spawn(async move {
                            this.serve_stream(req, respond, peer, local, source, target).await
                        });
                    }
                    Some(Err(e)) => {
                        if !e.is_go_away() && !e.is_io() {
                            info!(%peer, side = %Side::Downstream, error = %e, "inbound HTTP/2 connection error");
                        }
                        break;
                    }
                    None => break,
                },
                () = &mut idle_deadline, if streams.is_empty() && !shutting_down => {
                    if !got_first {
                        return Err(ConnError::FirstRequestTimeout(self.config.first_request_timeout));
                    }
                    debug!(%peer, "inbound connection idle: closing it");
                    conn.graceful_shutdown();
                    shutting_down = true;
                }
                () = drain.draining(), if !shutting_down => {
                    // GOAWAY: the peer opens no new streams here; in-flight ones continue.
                    conn.graceful_shutdown();
                    shutting_down = true;
                }
                Some(_) = streams.join_next(), if !streams.is_empty() => {
                    if streams.is_empty() {
                        idle_deadline
                            .as_mut()
                            .reset(tokio::time::Instant::now() + self.config.inbound_idle_timeout);
                    }
                }
            }
        }
        // The connection ended; a stream still running cannot make progress without it.
        streams.shutdown().await;
        Ok(())
    }

    async fn serve_stream(
        self: Arc<Self>,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: SocketAddr,
        local: SocketAddr,
        source: Arc<SpiffeId>,
        target: Arc<Target>,
    ) {
        let _gauge = Gauge::new(&self.active_streams);
        let start = Instant::now();
        let forwarded = req
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_for);
        let traceparent = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let baggage = req
            .headers()
            .get("baggage")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let authority = req.uri().authority().map(|a| a.as_str().to_owned());
        // Whom the stream reaches: the presented identity, or under the node's identity the
        // workload the authority names (what metrics and the access log report).
        let dst_identity = match &*target {
            Target::Node(node) => authority
                .as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .and_then(|d| self.workloads.by_ip(d.ip()))
                .map_or_else(|| node.clone(), |w| w.identity.clone()),
            other => other.identity().clone(),
        };
        // Label hints: the source pod (`forwarded: for=`), the pod addressed and the service the
        // source asked for (`forwarded: host=`); `TunnelMetrics` checks them against the model.
        let destination_addr = authority
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.ip());
        let service = req
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .and_then(super::metrics::forwarded_host);
        let labels = |response_flags| TrafficLabels {
            reporter: Reporter::Destination,
            source_principal: source.to_string(),
            destination_principal: dst_identity.to_string(),
            destination_service: service.clone().unwrap_or_else(|| "unknown".into()),
            connection_security_policy: "mutual_tls",
            response_flags,
            source_addr: forwarded.map(|f| f.ip()),
            destination_addr,
        };
        let log =
            |dst: Option<&str>, status: StatusCode, bytes: copy::Transferred, result: &str| {
                match status {
                    // Established: the caller records the close into the stream's series.
                    StatusCode::OK => {}
                    StatusCode::UNAUTHORIZED => self.metrics.failed(&labels(flags::DENY)),
                    StatusCode::SERVICE_UNAVAILABLE => self.metrics.failed(&labels(flags::CONNECT)),
                    _ => self.metrics.failed(&labels(flags::BAD_REQUEST)),
                }
                super::access::inbound(&super::access::Inbound {
                    src: peer,
                    forwarded,
                    src_identity: &source,
                    dst,
                    dst_identity: &dst_identity,
                    status: status.as_u16(),
                    bytes_sent: bytes.tcp_to_stream,
                    bytes_received: bytes.stream_to_tcp,
                    duration_ms: start.elapsed().as_millis() as u64,
                    traceparent: traceparent.as_deref(),
                    baggage: baggage.as_deref(),
                    result,
                });
            };
        let reply = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
            let mut resp = Response::new(());
            *resp.status_mut() = status;
            respond.send_response(resp, true).map(|_| ())
        };

        if req.method() != Method::CONNECT {
            let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
            log(
                None,
                StatusCode::BAD_REQUEST,
                Default::default(),
                &format!("method {} is not CONNECT", req.method()),
            );
            return;
        }
        let Some(dst) = authority
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
            log(
                authority.as_deref(),
                StatusCode::BAD_REQUEST,
                Default::default(),
                "authority is not ip:port",
            );
            return;
        };
        let workload = match &*target {
            Target::Arrival(w) if dst.ip() == local.ip() && dst.ip() == w.ip => Some(w.clone()),
            Target::Arrival(_) => None,
            Target::Identity(id) => self.workloads.by_ip(dst.ip()).filter(|w| &w.identity == id),
            Target::Node(_) => self.workloads.by_ip(dst.ip()),
        };
        let Some(workload) = workload else {
            let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
            log(
                Some(&dst.to_string()),
                StatusCode::BAD_REQUEST,
                Default::default(),
                &format!(
                    "authority ip is not a local workload of identity {dst_identity}, which the connection was opened for"
                ),
            );
            return;
        };
        if dst.port() == local.port() || TUNNEL_PORTS.contains(&dst.port()) {
            let _ = reply(&mut respond, StatusCode::BAD_REQUEST);
            log(
                Some(&dst.to_string()),
                StatusCode::BAD_REQUEST,
                Default::default(),
                "the authority names a tunnel port (HBONE inside HBONE is not allowed)",
            );
            return;
        }
        // The source address policies see (`ipBlocks`): the client pod's, from `forwarded`, when
        // that address belongs to the identity the peer proved; otherwise the peer's (a node).
        let source_addr = match forwarded {
            Some(f) if self.workloads.identity_of_ip(f.ip()).as_ref() == Some(&*source) => f,
            _ => peer,
        };
        let decision = self.authorizer.authorize(&AuthzRequest {
            source_identity: Some(&source),
            source_addr,
            destination: dst,
            destination_workload: &workload,
            transport: Transport::Mtls,
        });
        if let AuthzDecision::Deny { reason } = decision {
            let _ = reply(&mut respond, StatusCode::UNAUTHORIZED);
            log(
                Some(&dst.to_string()),
                StatusCode::UNAUTHORIZED,
                Default::default(),
                &format!("denied: {reason}"),
            );
            return;
        }
        let connect_began = Instant::now();
        let connect = tokio::time::timeout(
            self.config.upstream_connect_timeout,
            super::listener::connect_from(dst, self.config.delivery_source),
        )
        .await;
        let mut upstream = match connect {
            Ok(Ok(s)) => {
                self.config
                    .handshake_metrics
                    .connected(Direction::Inbound, connect_began.elapsed().as_secs_f64());
                s
            }
            Ok(Err(e)) => {
                let _ = reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                log(
                    Some(&dst.to_string()),
                    StatusCode::SERVICE_UNAVAILABLE,
                    Default::default(),
                    &format!(
                        "upstream connect failed: {e} ({})",
                        super::listener::connect_hint(&e)
                    ),
                );
                return;
            }
            Err(_) => {
                let _ = reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                log(
                    Some(&dst.to_string()),
                    StatusCode::SERVICE_UNAVAILABLE,
                    Default::default(),
                    "upstream connect timed out",
                );
                return;
            }
        };
        super::listener::tune(&upstream);
        // Counted as opened before the 200 goes out, so every `closed` has its `opened`.
        let series = self.metrics.opened(&labels(flags::NONE));
        let send = match respond.send_response(Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                series.closed(0, 0);
                log(
                    Some(&dst.to_string()),
                    StatusCode::OK,
                    Default::default(),
                    &format!("downstream stream gone before the response: {e}"),
                );
                return;
            }
        };
        let recv = req.into_body();
        let mut registration = self.connections.register(Authorized {
            source_identity: Some((*source).clone()),
            source_addr,
            destination: dst,
            workload: workload.clone(),
            transport: Transport::Mtls,
        });
        let counters = copy::Counters::default();
        let copy = copy::bidirectional(
            &mut upstream,
            send,
            recv,
            self.config.copy_buffer_size,
            Side::Upstream,
            Side::Downstream,
            &counters,
        );
        // From the stream's point of view: sent = pod → peer.
        let result = tokio::select! {
            r = copy => match r {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("copy ended with a {} error: {e}", e.side()),
            },
            Ok(reason) = &mut registration.revoked => format!("closed: policy now denies it: {reason}"),
        };
        let bytes = counters.snapshot();
        series.closed(bytes.stream_to_tcp, bytes.tcp_to_stream);
        log(Some(&dst.to_string()), StatusCode::OK, bytes, &result);
    }
}
