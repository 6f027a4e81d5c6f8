//! The tunnel: HBONE (HTTP/2 `CONNECT` over mutual TLS 1.3) between node agents.
//!
//! - [`outbound`] (15001) accepts connections the datapath redirected, recovers the original
//!   destination, picks an endpoint ([`balance`]) and opens a `CONNECT` stream over the [`pool`]
//!   to the destination's HBONE address, presenting the **source** workload's certificate. A
//!   destination on this node is reached directly, without TLS but with authorization.
//! - [`inbound`] (15008) terminates mTLS with the **destination** workload's certificate,
//!   checks the `:authority`, asks the [`Authorizer`], connects to the local pod and copies
//!   ([`copy`]) both ways.
//! - [`drain`]: a shutdown signal stops accepting, lets in-flight streams finish up to a
//!   deadline, then closes them. Listeners are bound with `SO_REUSEPORT` ([`listener`]) so a new
//!   agent can start beside a draining one.
//!
//! The tunnel is fed through traits, so it knows nothing of where data comes from:
//! [`RedirectSource`] (the datapath's original destinations), [`Resolver`] (destination address →
//! endpoints), [`LocalWorkloads`] (which workloads live on this node) and [`Authorizer`] (the
//! policy engine).

pub mod access;
pub mod balance;
pub mod connections;
pub mod copy;
pub mod drain;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod shard_id;
pub mod shards;
pub mod splice;
pub mod state;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use crate::identity::SpiffeId;

/// Every tunable of the tunnel, with the reason for its default. Tests shrink the timeouts.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// TCP connect + TLS + HTTP/2 handshake, either side. 10 s: a healthy peer on a cluster
    /// network answers in milliseconds; this only bounds a stalled or malicious peer.
    pub handshake_timeout: Duration,
    /// Time a new inbound connection may take to send its first `CONNECT` (a peer that
    /// handshakes and then says nothing holds a task and a socket).
    pub first_request_timeout: Duration,
    /// An inbound connection with no open stream for this long is closed (GOAWAY). Twice the
    /// pool's idle timeout, so the client side normally closes first (a server-side close can
    /// race a client opening a new stream; the pool retries once, but why race).
    pub inbound_idle_timeout: Duration,
    /// Connecting to the local pod (inbound) or a same-node destination (outbound). 10 s.
    pub upstream_connect_timeout: Duration,
    /// Waiting for the `CONNECT` response on the outbound side (the peer connects to its pod
    /// before answering, so this is upstream connect time plus one round trip).
    pub response_timeout: Duration,
    /// HTTP/2 flow control, as ztunnel (interoperability and proven throughput): 4 MiB per
    /// stream, 1 MiB frames. Larger windows let one stream fill a 10 Gb/s link at cross-node
    /// round trips; memory per stream is bounded by the window.
    pub stream_window: u32,
    /// The smallest HTTP/2 connection window (16 MiB, ztunnel's). The window a side
    /// advertises is [`TunnelConfig::connection_window_for`] its stream limit: never less than
    /// one stream window per stream it accepts.
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Largest header block accepted (CONNECT requests carry a few short headers). 16 KiB.
    pub max_header_list_size: u32,
    /// Streams a server accepts per connection (ztunnel: 200). Beyond it the peer waits.
    pub server_max_streams: u32,
    /// Streams the pool puts on one connection before opening another (ztunnel: 100). Below the
    /// server's limit so the pool never queues on a peer's `SETTINGS`.
    pub pool_max_streams_per_connection: usize,
    /// Spreading (issue 15): a new request goes to the pooled connection of its key with the
    /// fewest streams; while that one already carries `pool_spread_streams` or more and the key
    /// has fewer than `pool_max_connections_per_key` connections, another connection is opened
    /// instead. Every connection is driven by its own task, so busy streams to one peer are
    /// encrypted on all cores rather than serialised on one TLS connection. 1: a second
    /// concurrent stream already gets its own connection (a handshake per extra connection,
    /// then kept for `pool_idle_timeout`).
    pub pool_spread_streams: usize,
    /// The bound for spreading: connections per key the pool opens before it stacks streams
    /// (up to `pool_max_streams_per_connection` each). 0: as many as the runtime has worker
    /// threads (the CPUs that can encrypt in parallel), else the machine's CPUs.
    pub pool_max_connections_per_key: usize,
    /// An unused pooled connection is closed after this long (ztunnel: 5 min).
    pub pool_idle_timeout: Duration,
    /// Threads that carry traffic ([`shards`]): each runs its own runtime, listeners and HBONE
    /// connections. 1: the tunnel's tasks run on the caller's runtime (tests, and listeners
    /// bound without `SO_REUSEPORT`). The agent sets its `--worker-threads`.
    pub shards: usize,
    /// HTTP/2 keepalive: a PING every `keepalive_interval`; no answer within
    /// `keepalive_timeout` closes the connection (ztunnel: 10 s / 20 s). Detects dead peers
    /// behind NAT or a crashed node faster than TCP keepalive.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Copy buffer per direction. 256 KiB: large reads amortise syscalls and TLS records
    /// (ztunnel grows to 256 KiB); allocated once per stream and reused.
    pub copy_buffer_size: usize,
    /// How long a failed endpoint is skipped by the load balancer.
    pub ejection_time: Duration,
    /// Drain: how long in-flight streams may finish after shutdown before being closed.
    pub drain_deadline: Duration,
    /// Listen backlog for 15001/15008.
    pub listen_backlog: u32,
    /// Concurrent inbound connections (TLS handshakes included). Past it the listener stops
    /// accepting until one ends and the kernel backlog absorbs the burst: a flood of
    /// handshakes cannot exhaust memory or file descriptors.
    pub max_inbound_connections: usize,
    /// Concurrent app connections on the outbound listener (each holds two sockets).
    pub max_outbound_connections: usize,
    /// Source address of connections to local pods (inbound delivery and same-node): the
    /// tunnel address, which the datapath's plaintext guard recognises as "through the mesh".
    /// `None`: the kernel picks (tests without a guard).
    pub delivery_source: Option<IpAddr>,
    /// The identity the inbound presents to a client that names no local identity in SNI (no
    /// SNI, as clients dialling an IP address send none, or an unknown name) on an address that
    /// is no workload's, such as the node address. Such a connection may then reach any local
    /// workload; authorization decides each stream as always. `None`: they are refused.
    pub node_identity: Option<SpiffeId>,
    /// TLS handshake and connect metrics, shared by inbound and the pool (a cheap handle; the
    /// wiring registers it, tests read it).
    pub handshake_metrics: metrics::HandshakeMetrics,
}

impl TunnelConfig {
    /// The HTTP/2 connection window of a side that takes up to `streams` concurrent streams per
    /// connection: at least `connection_window`, and at least `streams` stream windows. A
    /// stream whose reader stalls keeps up to one stream window of data unreleased, which also
    /// counts against the connection's window; with fewer than one stream window per stream, a
    /// few stalled readers use the whole connection window up and every other stream of the
    /// connection stops for good, read or not (found by `tests/tests/faults.rs`,
    /// `slow_readers_are_backpressured`: 16 stalled streams froze a seventeenth). Memory per
    /// connection stays bounded by `streams` × `stream_window`, the bound per stream times
    /// the streams allowed; capped at HTTP/2's largest window (2³¹ − 1).
    pub fn connection_window_for(&self, streams: u32) -> u32 {
        let all = u64::from(self.stream_window) * u64::from(streams.max(1));
        let window = all.max(u64::from(self.connection_window));
        u32::try_from(window.min(i32::MAX as u64)).unwrap_or(i32::MAX as u32)
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            inbound_idle_timeout: Duration::from_secs(600),
            upstream_connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            server_max_streams: 200,
            pool_max_streams_per_connection: 100,
            pool_spread_streams: 1,
            pool_max_connections_per_key: 0,
            pool_idle_timeout: Duration::from_secs(300),
            shards: 1,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            copy_buffer_size: 256 * 1024,
            ejection_time: Duration::from_secs(30),
            drain_deadline: Duration::from_secs(30),
            listen_backlog: 1024,
            max_inbound_connections: 16 * 1024,
            max_outbound_connections: 32 * 1024,
            delivery_source: None,
            node_identity: None,
            handshake_metrics: metrics::HandshakeMetrics::default(),
        }
    }
}

/// The seams the tunnel is fed through.
#[derive(Clone)]
pub struct Seams {
    pub redirects: Arc<dyn RedirectSource>,
    pub resolver: Arc<dyn Resolver>,
    pub workloads: Arc<dyn LocalWorkloads>,
    pub authorizer: Arc<dyn Authorizer>,
}

/// A running tunnel: both servers and where they listen.
pub struct Running {
    pub inbound: Arc<inbound::Inbound>,
    pub outbound: Arc<outbound::Outbound>,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    /// Both serve loops (or one task per shard); they return once drained.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The shards' runtimes (empty when the tunnel runs on the caller's runtime).
    pub runtimes: Vec<tokio::runtime::Handle>,
}

/// Starts inbound and outbound on already bound listeners (bind them with
/// [`listener::bind_reuseport`]; tests bind port 0). Stops on `drain`.
pub fn start(
    config: TunnelConfig,
    certs: Arc<crate::identity::CertCache>,
    seams: Seams,
    inbound_listener: tokio::net::TcpListener,
    outbound_listener: tokio::net::TcpListener,
    drain: drain::Watch,
) -> std::io::Result<Running> {
    let inbound_addr = inbound_listener.local_addr()?;
    let outbound_addr = outbound_listener.local_addr()?;
    let inbound = inbound::Inbound::new(
        config.clone(),
        certs.clone(),
        seams.workloads.clone(),
        seams.authorizer.clone(),
    );
    let pool = pool::Pool::new(config.clone(), certs);
    let (shard_count, backlog) = (config.shards, config.listen_backlog);
    let outbound = outbound::Outbound::new(
        config,
        pool,
        seams.redirects,
        seams.resolver,
        seams.workloads,
        seams.authorizer,
    );
    let (tasks, runtimes) = if shard_count > 1 {
        let started = shards::start(
            shard_count,
            &inbound,
            &outbound,
            (inbound_listener, outbound_listener),
            backlog,
            &drain,
        )?;
        (started.tasks, started.runtimes)
    } else {
        let tasks = vec![
            tokio::spawn(inbound.clone().serve(inbound_listener, drain.clone())),
            tokio::spawn(outbound.clone().serve(outbound_listener, drain)),
        ];
        (tasks, Vec::new())
    };
    Ok(Running {
        inbound,
        outbound,
        inbound_addr,
        outbound_addr,
        tasks,
        runtimes,
    })
}

/// Which side of the tunnel an error concerns, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The peer that connected to us (the app on outbound, the remote agent on inbound).
    Downstream,
    /// What we connected to (the remote agent on outbound, the pod on inbound).
    Upstream,
    /// Our own state (no certificate, bad configuration).
    Internal,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        })
    }
}

/// A workload running on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalWorkload {
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub ip: IpAddr,
}

/// Which workloads are on this node, by address.
pub trait LocalWorkloads: Send + Sync {
    fn by_ip(&self, ip: IpAddr) -> Option<Arc<LocalWorkload>>;

    /// The identity of a local workload whose SNI form
    /// ([`crate::identity::tls::identity_server_name`]) is `server_name`.
    fn identity_for_sni(&self, server_name: &str) -> Option<SpiffeId> {
        let _ = server_name;
        None
    }

    /// The identity of the workload (on any node) that owns `ip`: lets the inbound side trust a
    /// peer's `forwarded: for=` address only when it belongs to the identity the peer proved.
    fn identity_of_ip(&self, ip: IpAddr) -> Option<SpiffeId> {
        self.by_ip(ip).map(|w| w.identity.clone())
    }
}

/// The identity among `workloads` whose SNI form is `server_name`.
pub fn identity_by_sni<'a>(
    workloads: impl IntoIterator<Item = &'a Arc<LocalWorkload>>,
    server_name: &str,
) -> Option<SpiffeId> {
    if !server_name.ends_with(crate::identity::tls::SNI_SUFFIX) {
        return None;
    }
    workloads
        .into_iter()
        .find(|w| crate::identity::tls::identity_server_name(&w.identity) == server_name)
        .map(|w| w.identity.clone())
}

/// A fixed table of local workloads (tests, and the local mode until the config source lands).
#[derive(Default, Debug)]
pub struct StaticWorkloads(pub HashMap<IpAddr, Arc<LocalWorkload>>);

impl StaticWorkloads {
    pub fn with(mut self, w: LocalWorkload) -> Self {
        self.0.insert(w.ip, Arc::new(w));
        self
    }
}

impl LocalWorkloads for StaticWorkloads {
    fn by_ip(&self, ip: IpAddr) -> Option<Arc<LocalWorkload>> {
        self.0.get(&ip).cloned()
    }

    fn identity_for_sni(&self, server_name: &str) -> Option<SpiffeId> {
        identity_by_sni(self.0.values(), server_name)
    }
}

/// How the source reached the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Through HBONE: the source identity was proven by its certificate.
    Mtls,
    /// Same node, no TLS: the source identity comes from the datapath's enrollment record.
    SameNode,
}

/// What the policy engine decides on.
#[derive(Clone, Debug)]
pub struct AuthzRequest<'a> {
    /// The source workload's identity; `None` when the source is not a mesh workload.
    pub source_identity: Option<&'a SpiffeId>,
    /// The source address as seen by the deciding side (TCP peer).
    pub source_addr: SocketAddr,
    /// The original destination, `ip:port` of the pod.
    pub destination: SocketAddr,
    pub destination_workload: &'a LocalWorkload,
    pub transport: Transport,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthzDecision {
    Allow,
    /// `reason` names the policy (it goes to the access log, never to the peer).
    Deny {
        reason: String,
    },
}

/// L4 authorization, implemented by the policy engine (adapted to this trait).
pub trait Authorizer: Send + Sync {
    fn authorize(&self, req: &AuthzRequest<'_>) -> AuthzDecision;

    /// The check of a connection that is already open, after the policies or the model changed
    /// ([`connections::ConnectionManager::reauthorize`]). The same decision by default; an
    /// implementation may keep a connection whose destination has left the mesh (mesh policy no
    /// longer governs it, and closing it would reset an application that did nothing).
    fn reauthorize(&self, req: &AuthzRequest<'_>) -> AuthzDecision {
        self.authorize(req)
    }
}

/// Allows everything (no policies configured).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: &AuthzRequest<'_>) -> AuthzDecision {
        AuthzDecision::Allow
    }
}

/// Denies listed source identities and allows the rest (tests, and a simple kill switch).
#[derive(Clone, Debug, Default)]
pub struct DenyIdentities(pub Vec<SpiffeId>);

impl Authorizer for DenyIdentities {
    fn authorize(&self, req: &AuthzRequest<'_>) -> AuthzDecision {
        match req.source_identity {
            Some(id) if self.0.contains(id) => AuthzDecision::Deny {
                reason: format!("{id} is on the deny list"),
            },
            _ => AuthzDecision::Allow,
        }
    }
}

/// A redirected connection: where the app wanted to go, and who the app is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub original_dst: SocketAddr,
    pub source: SpiffeId,
    /// W3C `baggage` describing the source workload (`k8s.namespace.name=..,k8s.deployment.name=..`),
    /// sent on the CONNECT as HBONE does, when the enrollment record has it.
    pub baggage: Option<String>,
}

/// Recovers a redirected connection's original destination and source identity (the
/// datapath's `OrigDstReader` plus the enrollment table). A miss must refuse the connection.
pub trait RedirectSource: Send + Sync {
    fn redirect(&self, peer: SocketAddr, local: SocketAddr) -> Result<Redirect, String>;

    /// As [`Self::redirect`], for the accepted socket itself: a source that keeps records in
    /// the socket's own storage (the datapath's sock_ops hand-off) reads them here.
    fn redirect_socket(
        &self,
        socket: &tokio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Redirect, String> {
        let _ = socket;
        self.redirect(peer, local)
    }
}

/// The enrollment table's numeric identity ids (as stored in the datapath's maps) → identities.
pub trait IdentityIds: Send + Sync {
    fn identity(&self, identity_id: u32) -> Option<SpiffeId>;
}

/// [`RedirectSource`] over the datapath: the kernel's original-destination record (consumed on
/// read) plus the source pod's identity from its enrollment record.
pub struct DatapathRedirects<I> {
    pub reader: crate::datapath::OrigDstReader,
    pub identities: I,
}

impl<I: IdentityIds> DatapathRedirects<I> {
    fn with_identity(&self, od: crate::datapath::OriginalDestination) -> Result<Redirect, String> {
        let source = self.identities.identity(od.identity_id).ok_or_else(|| {
            format!(
                "source pod (netns cookie {}) has identity id {}, which the enrollment table does not know",
                od.netns_cookie, od.identity_id
            )
        })?;
        Ok(Redirect {
            original_dst: od.addr,
            source,
            baggage: None,
        })
    }
}

impl<I: IdentityIds> RedirectSource for DatapathRedirects<I> {
    fn redirect(&self, peer: SocketAddr, local: SocketAddr) -> Result<Redirect, String> {
        let od = self.reader.lookup(peer, local).map_err(|e| e.to_string())?;
        self.with_identity(od)
    }

    fn redirect_socket(
        &self,
        socket: &tokio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Redirect, String> {
        let od = self
            .reader
            .original_destination_of(socket, peer, local)
            .map_err(|e| e.to_string())?;
        self.with_identity(od)
    }
}

/// Where an endpoint runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// On this node: connect directly (no TLS), after authorization.
    SameNode,
    /// Behind another node's HBONE listener.
    Remote { hbone: SocketAddr },
}

/// One destination workload endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Pod `ip:port`; the `:authority` of the CONNECT.
    pub addr: SocketAddr,
    pub identity: SpiffeId,
    pub location: Location,
}

/// What a destination address names.
#[derive(Clone, Debug)]
pub enum Destination {
    Workload(Endpoint),
    /// A service VIP: one endpoint is chosen per connection.
    Service {
        hostname: String,
        endpoints: Vec<Endpoint>,
    },
}

/// Destination address → endpoints (fed by the control plane).
pub trait Resolver: Send + Sync {
    fn resolve(&self, dst: SocketAddr) -> Option<Destination>;
}

/// A fixed resolver table.
#[derive(Default, Debug)]
pub struct StaticResolver(pub HashMap<SocketAddr, Destination>);

impl Resolver for StaticResolver {
    fn resolve(&self, dst: SocketAddr) -> Option<Destination> {
        self.0.get(&dst).cloned()
    }
}

/// Accepts one connection once a slot under `limit` is free. Cancel-safe (used in `select!`):
/// a dropped call releases its permit and `accept` loses nothing.
pub(crate) async fn accept_within(
    listener: &tokio::net::TcpListener,
    limit: &Arc<tokio::sync::Semaphore>,
) -> (
    std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let permit = limit.clone().acquire_owned().await.ok();
    (listener.accept().await, permit)
}

/// `for="<ip:port>"` as HBONE's `forwarded` header (RFC 7239 quoting; IPv6 in brackets, which
/// `SocketAddr`'s display already does).
pub fn forwarded_for(src: SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(h) => format!("for=\"{src}\";host={h}"),
        None => format!("for=\"{src}\""),
    }
}

/// The source address in a `forwarded` header, if it is well formed.
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips() {
        let v4: SocketAddr = "10.0.0.1:4000".parse().expect("addr");
        let v6: SocketAddr = "[fd00::1]:4000".parse().expect("addr");
        assert_eq!(forwarded_for(v4, None), "for=\"10.0.0.1:4000\"");
        assert_eq!(
            forwarded_for(v6, Some("echo.default.svc.cluster.local")),
            "for=\"[fd00::1]:4000\";host=echo.default.svc.cluster.local"
        );
        assert_eq!(parse_forwarded_for(&forwarded_for(v6, Some("h"))), Some(v6));
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }
}

#[cfg(test)]
mod integration_tests;
