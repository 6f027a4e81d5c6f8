//! HBONE connection pool.
//!
//! Invariants:
//! - A connection serves one [`PoolKey`]: (source identity, destination HBONE address, expected
//!   destination identity). Connections present the source workload's certificate, so two
//!   sources never share one.
//! - At most `pool_max_streams_per_connection` streams are reserved on a connection. A request
//!   reserves a slot under the pool mutex (a short, synchronous critical section), and releases
//!   it when its stream ends.
//! - Spreading ([`choose`]): a request takes the key's least loaded usable connection (the
//!   oldest among equals); if that one carries `pool_spread_streams` or more streams and the key
//!   has fewer than [`Pool::max_connections_per_key`] usable connections, a new connection is
//!   opened instead. Each connection has its own task (TLS and HTTP/2 framing), so concurrent
//!   busy streams to one peer use every runtime worker instead of one TLS connection. Past the
//!   bound streams stack on the least loaded connection; only when all are full (the stream
//!   limit) does the pool open more.
//! - The mutex is never held across I/O. A new connection is inserted in state `Connecting`
//!   with the creating request's slot reserved, and its handshake runs in its own task;
//!   concurrent requests reserve further slots on it and wait for its state to change, so a
//!   burst of N requests opens ceil(N / max) connections, not N, and a slow handshake to one
//!   peer never blocks requests to another (ztunnel holds a per-key lock across the handshake;
//!   see research/ztunnel.md §7).
//! - A connection leaves the pool when it fails, closes, or has been idle (no reserved slot) for
//!   `pool_idle_timeout`; eviction marks it under the mutex so no request can reserve it after.
//! - Each connection sends HTTP/2 PINGs every `keepalive_interval`; a missing PONG after
//!   `keepalive_timeout` closes it.
//! - A connection takes no new stream once the certificate either side presented in its
//!   handshake has expired (streams already on it finish); it closes when its last stream
//!   ends. A new stream then needs a new handshake, with a renewed certificate or none (the
//!   request fails with the certificate error): an expired identity never opens a connection.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Request, Response};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{
    TunnelConfig,
    metrics::{Direction, HandshakeFailure},
};
use crate::identity::{
    CertCache, SpiffeId,
    tls::{client_config, identity_sni, peer_cert_error},
};

/// An HBONE `CONNECT` request: `:authority` = `ip:port`, no scheme or path.
pub fn connect_request(
    authority: SocketAddr,
    headers: &http::HeaderMap,
) -> Result<Request<()>, PoolError> {
    let mut req = Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .map_err(|e| PoolError::Stream {
            hbone: authority,
            reason: format!("internal: cannot build the CONNECT request: {e}"),
        })?;
    req.headers_mut().extend(headers.clone());
    Ok(req)
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub hbone: SocketAddr,
    pub expected: SpiffeId,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum PoolError {
    #[error("internal: no certificate for source {identity}: {reason}")]
    Certificate { identity: SpiffeId, reason: String },
    #[error(
        "upstream {hbone}: TCP connect failed: {reason} (is the node agent running and port 15008 reachable?)"
    )]
    Connect { hbone: SocketAddr, reason: String },
    #[error("upstream {hbone}: TLS handshake failed: {reason}")]
    Tls { hbone: SocketAddr, reason: String },
    #[error("upstream {hbone}: HTTP/2 handshake failed: {reason}")]
    H2Handshake { hbone: SocketAddr, reason: String },
    #[error("upstream {hbone}: handshake timed out after {timeout:?}")]
    HandshakeTimeout {
        hbone: SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("upstream {hbone}: the pooled connection closed before the stream was opened")]
    Closed { hbone: SocketAddr },
    #[error("upstream {hbone}: opening the stream failed: {reason}")]
    Stream { hbone: SocketAddr, reason: String },
    #[error("upstream {hbone}: no CONNECT response within {timeout:?}")]
    ResponseTimeout {
        hbone: SocketAddr,
        timeout: std::time::Duration,
    },
}

impl PoolError {
    /// True when the destination node could not be reached at all (eject the endpoint).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            PoolError::Connect { .. }
                | PoolError::Tls { .. }
                | PoolError::H2Handshake { .. }
                | PoolError::HandshakeTimeout { .. }
        )
    }
}

#[derive(Clone)]
enum ConnState {
    Connecting,
    Ready(SendRequest<Bytes>),
    Failed(PoolError),
    Closed,
}

struct Conn {
    id: u64,
    /// The [`super::shards`] shard whose runtime drives it; only that shard's requests use it.
    shard: usize,
    key: PoolKey,
    state: watch::Receiver<ConnState>,
    reserved: AtomicUsize,
    /// Set under the pool mutex; a set flag means no new reservation.
    evicted: AtomicBool,
    idle_since: Mutex<Instant>,
    /// The earlier `notAfter` of the two certificates of its handshake (set once ready).
    expires: Mutex<Option<SystemTime>>,
}

impl Conn {
    fn expired(&self) -> bool {
        self.expires
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| SystemTime::now() >= t)
    }

    /// Not evicted, failed, closed or expired: may take new streams (if below the limit).
    fn usable(&self) -> bool {
        !self.evicted.load(Ordering::SeqCst)
            && !self.expired()
            && !matches!(
                *self.state.borrow(),
                ConnState::Failed(_) | ConnState::Closed
            )
    }

    /// Reserves a stream slot. Called under the pool mutex.
    fn try_reserve(&self, max: usize) -> bool {
        if !self.usable() {
            return false;
        }
        self.reserved
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A reserved slot; released on drop.
struct Slot {
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.conn.reserved.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// An open CONNECT stream. Holds its connection slot until dropped.
pub struct PooledStream {
    pub response: Response<()>,
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Which pooled connection carries it (tests check reuse).
    pub connection_id: u64,
    _slot: SlotGuard,
}

/// Opaque holder of the slot.
pub struct SlotGuard(#[expect(dead_code, reason = "held for its Drop")] Slot);

/// What [`Pool::checkout`] does for a request, given the stream counts of the key's usable
/// connections (oldest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Reserve a slot on the connection at this index.
    Reuse(usize),
    /// Open another connection.
    Open,
}

/// The pool's placement policy (see the module doc): the least loaded connection (the oldest
/// among equals) while it carries fewer than `spread_streams` streams, or while the key already
/// has `max_connections` connections and it is below `max_streams`; otherwise a new connection.
pub fn choose(
    loads: &[usize],
    spread_streams: usize,
    max_connections: usize,
    max_streams: usize,
) -> Choice {
    let least = loads
        .iter()
        .enumerate()
        .min_by_key(|&(i, &load)| (load, i))
        .map(|(i, &load)| (i, load));
    match least {
        Some((i, load)) if load < spread_streams.max(1) && load < max_streams.max(1) => {
            Choice::Reuse(i)
        }
        Some((i, load)) if loads.len() >= max_connections.max(1) && load < max_streams.max(1) => {
            Choice::Reuse(i)
        }
        _ => Choice::Open,
    }
}

/// The pool's connections by (shard, key), oldest first.
type Connections = HashMap<(usize, PoolKey), Vec<Arc<Conn>>>;

pub struct Pool {
    config: TunnelConfig,
    certs: Arc<CertCache>,
    /// By (shard, key): a shard's requests only ride connections its own thread drives.
    conns: Mutex<Connections>,
    next_id: AtomicU64,
    max_connections_per_key: usize,
}

impl Pool {
    pub fn new(config: TunnelConfig, certs: Arc<CertCache>) -> Arc<Self> {
        let max_connections_per_key = match config.pool_max_connections_per_key {
            // A shard is one thread: more connections per key would not encrypt in parallel.
            0 if config.shards > 1 => 1,
            0 => tokio::runtime::Handle::try_current()
                .map(|h| h.metrics().num_workers())
                .ok()
                .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                .unwrap_or(1)
                .max(1),
            n => n,
        };
        Arc::new(Self {
            config,
            certs,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            max_connections_per_key,
        })
    }

    /// How many connections per key the pool spreads streams over before stacking them
    /// (`pool_max_connections_per_key`, 0 resolved to the runtime's worker threads).
    pub fn max_connections_per_key(&self) -> usize {
        self.max_connections_per_key
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections (any state) for all keys.
    pub fn connection_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Streams reserved on the pool's connections (open or being opened).
    pub fn stream_count(&self) -> usize {
        self.lock()
            .values()
            .flatten()
            .map(|c| c.reserved.load(Ordering::SeqCst))
            .sum()
    }

    /// Registers `nodemesh_pool_connections` and `nodemesh_pool_streams` (read at scrape time)
    /// in `registry` (the `nodemesh` sub-registry).
    pub fn register(registry: &mut prometheus_client::registry::Registry, pool: Arc<Pool>) {
        registry.register_collector(Box::new(PoolCollector(pool)));
    }

    /// Reserves a slot on a usable connection, or creates one (handshake spawned).
    fn checkout(self: &Arc<Self>, key: &PoolKey) -> Slot {
        let max = self.config.pool_max_streams_per_connection.max(1);
        let shard = super::shard_id::current();
        let mut conns = self.lock();
        let list = conns.entry((shard, key.clone())).or_default();
        // Reservations only happen under this mutex (releases may run concurrently and only
        // lower the counts), so the choice holds until the reservation below.
        let usable: Vec<&Arc<Conn>> = list.iter().filter(|c| c.usable()).collect();
        let loads: Vec<usize> = usable
            .iter()
            .map(|c| c.reserved.load(Ordering::SeqCst))
            .collect();
        if let Choice::Reuse(i) = choose(
            &loads,
            self.config.pool_spread_streams,
            self.max_connections_per_key,
            max,
        ) && usable[i].try_reserve(max)
        {
            return Slot {
                conn: usable[i].clone(),
            };
        }
        let (tx, rx) = watch::channel(ConnState::Connecting);
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            shard,
            key: key.clone(),
            state: rx,
            reserved: AtomicUsize::new(1),
            evicted: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            expires: Mutex::new(None),
        });
        list.push(conn.clone());
        drop(conns);
        let this = self.clone();
        let c = conn.clone();
        tokio::spawn(async move { this.run_connection(c, tx).await });
        Slot { conn }
    }

    fn unlist(conns: &mut Connections, conn: &Arc<Conn>) {
        let key = (conn.shard, conn.key.clone());
        if let Some(list) = conns.get_mut(&key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
            if list.is_empty() {
                conns.remove(&key);
            }
        }
    }

    fn remove(&self, conn: &Arc<Conn>) {
        let mut conns = self.lock();
        conn.evicted.store(true, Ordering::SeqCst);
        Self::unlist(&mut conns, conn);
    }

    /// Evicts `conn` if it is idle past the timeout. The check and the mark happen under the
    /// pool mutex, where reservations happen, so no request can slip in between.
    fn evict_if_idle(&self, conn: &Arc<Conn>) -> bool {
        let mut conns = self.lock();
        let idle_for = conn
            .idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if conn.reserved.load(Ordering::SeqCst) != 0
            || (idle_for < self.config.pool_idle_timeout && !conn.expired())
        {
            return false;
        }
        conn.evicted.store(true, Ordering::SeqCst);
        Self::unlist(&mut conns, conn);
        true
    }

    /// TCP, TLS and HTTP/2 handshakes; also returns when the connection's certificates expire.
    async fn handshake(
        &self,
        key: &PoolKey,
    ) -> Result<
        (
            (
                SendRequest<Bytes>,
                h2::client::Connection<
                    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
                    Bytes,
                >,
            ),
            SystemTime,
        ),
        PoolError,
    > {
        let hbone = key.hbone;
        let cert = self.certs.get(&key.source).await.map_err(|e| {
            self.config
                .handshake_metrics
                .handshake_failed(Direction::Outbound, HandshakeFailure::NoLocalCertificate);
            PoolError::Certificate {
                identity: key.source.clone(),
                reason: e.to_string(),
            }
        })?;
        let tls_config =
            client_config(&cert, &self.certs.trust_bundle(), &key.expected).map_err(|e| {
                self.config
                    .handshake_metrics
                    .handshake_failed(Direction::Outbound, HandshakeFailure::NoLocalCertificate);
                PoolError::Certificate {
                    identity: key.source.clone(),
                    reason: e.to_string(),
                }
            })?;
        let tcp = tokio::net::TcpStream::connect(hbone)
            .await
            .map_err(|e| PoolError::Connect {
                hbone,
                reason: e.to_string(),
            })?;
        super::listener::tune(&tcp);
        let hs = &self.config.handshake_metrics;
        let began = Instant::now();
        let tls = TlsConnector::from(tls_config)
            .connect(identity_sni(&key.expected), tcp)
            .await
            .map_err(|e| {
                hs.handshake_failed(Direction::Outbound, HandshakeFailure::of_tls_error(&e));
                PoolError::Tls {
                    hbone,
                    reason: peer_cert_error(&e).map_or_else(
                        || e.to_string(),
                        |r| format!("server certificate refused: {r}"),
                    ),
                }
            })?;
        hs.handshake(Direction::Outbound, began.elapsed().as_secs_f64());
        let peer_not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| {
                use x509_parser::prelude::{FromDer, X509Certificate};
                let (_, x) = X509Certificate::from_der(leaf.as_ref()).ok()?;
                let secs = u64::try_from(x.validity().not_after.timestamp()).ok()?;
                Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            });
        let expires = peer_not_after.map_or(cert.not_after, |t| t.min(cert.not_after));
        let pair = h2::client::Builder::new()
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window_for(
                u32::try_from(self.config.pool_max_streams_per_connection).unwrap_or(u32::MAX),
            ))
            .max_frame_size(self.config.max_frame_size)
            .max_header_list_size(self.config.max_header_list_size)
            .max_send_buffer_size(self.config.stream_window as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| PoolError::H2Handshake {
                hbone,
                reason: e.to_string(),
            })?;
        Ok((pair, expires))
    }

    /// Connects, publishes the state, then drives the connection until it closes or idles out.
    async fn run_connection(self: Arc<Self>, conn: Arc<Conn>, state: watch::Sender<ConnState>) {
        let timeout = self.config.handshake_timeout;
        let result = match tokio::time::timeout(timeout, self.handshake(&conn.key)).await {
            Ok(r) => r,
            Err(_) => {
                self.config
                    .handshake_metrics
                    .handshake_failed(Direction::Outbound, HandshakeFailure::Timeout);
                Err(PoolError::HandshakeTimeout {
                    hbone: conn.key.hbone,
                    timeout,
                })
            }
        };
        let (send, mut h2conn) = match result {
            Ok((pair, expires)) => {
                *conn.expires.lock().unwrap_or_else(|p| p.into_inner()) = Some(expires);
                pair
            }
            Err(e) => {
                warn!(source = %conn.key.source, hbone = %conn.key.hbone, error = %e,
                    "HBONE connection failed");
                self.remove(&conn);
                let _ = state.send(ConnState::Failed(e));
                return;
            }
        };
        debug!(id = conn.id, source = %conn.key.source, hbone = %conn.key.hbone,
            "HBONE connection established");
        let _ = state.send(ConnState::Ready(send));

        // Keepalive: PINGs run in their own task (PingPong needs the connection polled
        // concurrently, which this task does); a missed PONG ends the connection.
        let (dead_tx, mut dead_rx) = tokio::sync::oneshot::channel::<&'static str>();
        let pinger = h2conn.ping_pong().map(|mut pp| {
            let (interval, ka_timeout) = (
                self.config.keepalive_interval,
                self.config.keepalive_timeout,
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    match tokio::time::timeout(ka_timeout, pp.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => {
                            let _ = dead_tx.send("ping failed");
                            return;
                        }
                        Err(_) => {
                            let _ = dead_tx.send("no PONG within the keepalive timeout");
                            return;
                        }
                    }
                }
            })
        });
        let idle_check = (self.config.pool_idle_timeout / 4).clamp(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_secs(30),
        );
        let mut ticker = tokio::time::interval(idle_check);
        let reason = loop {
            tokio::select! {
                r = &mut h2conn => break match r {
                    Ok(()) => "closed by peer".to_string(),
                    Err(e) => format!("error: {e}"),
                },
                r = &mut dead_rx => {
                    if let Ok(why) = r { break why.to_string(); }
                }
                _ = ticker.tick() => {
                    if self.evict_if_idle(&conn) {
                        break if conn.expired() { "certificate expired" } else { "idle" }.to_string();
                    }
                }
            }
        };
        if let Some(p) = pinger {
            p.abort();
        }
        self.remove(&conn);
        let _ = state.send(ConnState::Closed);
        info!(id = conn.id, source = %conn.key.source, hbone = %conn.key.hbone, reason,
            "HBONE connection closed");
    }

    /// Opens a CONNECT stream to `authority` on a pooled connection for `key`, with `headers`
    /// (`forwarded`, `baggage`, `traceparent`...). One retry on a fresh connection if the chosen
    /// one closed meanwhile (GOAWAY from a draining peer).
    pub async fn open(
        self: &Arc<Self>,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &http::HeaderMap,
    ) -> Result<PooledStream, PoolError> {
        match self
            .open_once(key, connect_request(authority, headers)?)
            .await
        {
            Err(PoolError::Closed { .. } | PoolError::Stream { .. }) => {
                self.open_once(key, connect_request(authority, headers)?)
                    .await
            }
            r => r,
        }
    }

    async fn open_once(
        self: &Arc<Self>,
        key: &PoolKey,
        req: Request<()>,
    ) -> Result<PooledStream, PoolError> {
        let hbone = key.hbone;
        let slot = self.checkout(key);
        let mut rx = slot.conn.state.clone();
        let send = loop {
            let state = rx.borrow_and_update().clone();
            match state {
                ConnState::Ready(send) => break send,
                ConnState::Failed(e) => return Err(e),
                ConnState::Closed => return Err(PoolError::Closed { hbone }),
                ConnState::Connecting => {}
            }
            if rx.changed().await.is_err() {
                return Err(PoolError::Closed { hbone });
            }
        };
        let stream_err = |e: h2::Error| {
            // A connection that refuses new streams must not be picked again.
            self.remove(&slot.conn);
            PoolError::Stream {
                hbone,
                reason: e.to_string(),
            }
        };
        let mut send = send.ready().await.map_err(stream_err)?;
        let connect_began = Instant::now();
        let (response, send_stream) = send.send_request(req, false).map_err(stream_err)?;
        let timeout = self.config.response_timeout;
        let response = tokio::time::timeout(timeout, response)
            .await
            .map_err(|_| PoolError::ResponseTimeout { hbone, timeout })?
            .map_err(|e| PoolError::Stream {
                hbone,
                reason: e.to_string(),
            })?;
        self.config
            .handshake_metrics
            .connected(Direction::Outbound, connect_began.elapsed().as_secs_f64());
        let (parts, recv) = response.into_parts();
        Ok(PooledStream {
            response: Response::from_parts(parts, ()),
            send: send_stream,
            recv,
            connection_id: slot.conn.id,
            _slot: SlotGuard(slot),
        })
    }
}

struct PoolCollector(Arc<Pool>);

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolCollector")
    }
}

impl prometheus_client::collector::Collector for PoolCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric, metrics::gauge::ConstGauge};
        let gauges = [
            (
                "pool_connections",
                "Outbound HBONE connections in the pool (any state)",
                self.0.connection_count(),
            ),
            (
                "pool_streams",
                "Streams reserved on the pool's connections",
                self.0.stream_count(),
            ),
        ];
        for (name, help, value) in gauges {
            let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let enc = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(enc)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Choice, choose};

    #[test]
    fn first_request_opens() {
        assert_eq!(choose(&[], 1, 2, 100), Choice::Open);
    }

    #[test]
    fn idle_connection_is_reused() {
        assert_eq!(choose(&[0], 1, 2, 100), Choice::Reuse(0));
        assert_eq!(choose(&[1, 0], 1, 2, 100), Choice::Reuse(1));
    }

    #[test]
    fn busy_connections_spread_until_the_bound() {
        assert_eq!(choose(&[1], 1, 2, 100), Choice::Open);
        assert_eq!(
            choose(&[1, 1], 1, 2, 100),
            Choice::Reuse(0),
            "oldest of equals"
        );
        assert_eq!(choose(&[3, 2], 1, 2, 100), Choice::Reuse(1), "least loaded");
        assert_eq!(choose(&[1, 3], 2, 4, 100), Choice::Reuse(0), "below spread");
        assert_eq!(choose(&[2, 3], 2, 4, 100), Choice::Open);
    }

    #[test]
    fn full_connections_open_more_past_the_bound() {
        assert_eq!(choose(&[100, 100], 1, 2, 100), Choice::Open);
        assert_eq!(choose(&[100, 99], 1, 2, 100), Choice::Reuse(1));
    }

    #[test]
    fn zero_settings_behave_as_one() {
        // max_connections 0 = 1: stack on the one connection.
        assert_eq!(choose(&[5], 0, 0, 100), Choice::Reuse(0));
        // max_streams 0 = 1.
        assert_eq!(choose(&[1], 1, 1, 0), Choice::Open);
    }
}
