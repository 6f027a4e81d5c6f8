//! Same-node connections spliced in the kernel.
//!
//! After the outbound has authorized a same-node connection and connected to the destination
//! pod, it hands both sockets to a [`Splicer`] (the datapath's sockhash and stream-verdict
//! program, [`crate::splice`]): from then on the kernel passes every segment one socket receives
//! to the other's send side and the payload never crosses user space. The tunnel keeps both
//! sockets and waits only for what needs it:
//!
//! - **Half-close**: a read of 0 on one socket (its peer sent FIN) → wait until every byte the
//!   kernel took from it has entered the other socket's send queue ([`SplicedPair::flushed`]:
//!   the redirect is asynchronous), then shut the other socket's write side.
//! - **Policy revocation and drain**: the caller drops the future (as for the user-space copy);
//!   the pair is unspliced and both sockets close.
//! - **Bytes** for the access log and the Istio metrics come from the verdict program's
//!   per-socket counters ([`SplicedPair::bytes`]), recorded also when the future is dropped.
//!
//! - **Backpressure**: the kernel's splice queue has none (a pod that does not read would let
//!   the app queue without bound in kernel memory: 638 MiB in 3 s when measured). Each
//!   direction gets redirect credit ([`crate::splice::SPLICE_WINDOW`], 16 MiB); when it runs
//!   out the program leaves segments on the socket, whose receive buffer fills so TCP's window
//!   stops the sender. The socket turns readable; the tunnel waits until the kernel's queue
//!   has drained into the other socket, forwards the bytes left to it in order (the program
//!   redirects nothing more until it has), and grants a new window. While bytes move, the
//!   credit is kept a window ahead of what has drained (checked every 2 ms, backing off to
//!   5 s when idle), so a peer that keeps up does not run out.
//!
//! Which path serves same-node connections is decided once at start ([`SameNode::choose`];
//! the default is `copy` until the splice's connection rate is fixed, see [`PathChoice`]):
//! `auto` runs [`self_test`] (a spliced pair on loopback: early bytes, 1 MiB each way, counters,
//! nothing readable in user space, half-close both ways) and falls back to the user-space copy
//! if it fails; `copy` forces the copy. A connection the splicer refuses (its maps full) is
//! copied in user space and counted — never passed around the tunnel; one whose side had
//! already closed (the kernel splices established sockets only) is copied too, not counted.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use super::copy;

/// The kernel side of the splice (implemented over the datapath's maps).
pub trait Splicer: Send + Sync {
    /// Splices `app` (the accepted app socket) and `pod` (the socket to the destination pod).
    /// `Err` leaves both sockets as they were (the caller copies in user space).
    fn splice(&self, app: &TcpStream, pod: &TcpStream) -> Result<Box<dyn SplicedPair>, NotSpliced>;
}

/// Why a same-node connection was not spliced; it is copied in user space either way.
#[derive(Debug)]
pub enum NotSpliced {
    /// One side had already closed when the tunnel came to splice (the app wrote its request
    /// and half-closed before the pod connection was up): normal for short connections.
    Closing(String),
    /// The splicer refused it (its maps full, or another kernel error): counted and logged.
    Refused(String),
}

impl std::fmt::Display for NotSpliced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotSpliced::Closing(why) | NotSpliced::Refused(why) => f.write_str(why),
        }
    }
}

/// One spliced connection; dropping it unsplices.
pub trait SplicedPair: Send + Sync {
    /// Bytes the kernel redirected app → pod and pod → app.
    fn bytes(&self) -> (u64, u64);
    /// Bytes the kernel left on the app's and on the pod's socket for the tunnel.
    fn passed(&self) -> (u64, u64);
    /// Redirect credit for the app's (`from_app`) or the pod's socket: the kernel redirects
    /// while its count stays at or below `allowed` and the tunnel has forwarded (`consumed`)
    /// every byte the kernel left on that socket.
    fn grant(&self, from_app: bool, allowed: u64, consumed: u64) -> Result<(), String>;
}

impl Splicer for crate::splice::SockSplice {
    fn splice(&self, app: &TcpStream, pod: &TcpStream) -> Result<Box<dyn SplicedPair>, NotSpliced> {
        crate::splice::SockSplice::splice(self, app, pod)
            .map(|s| Box::new(s) as Box<dyn SplicedPair>)
            .map_err(|e| match e {
                crate::splice::SpliceError::Closing { .. } => NotSpliced::Closing(e.to_string()),
                _ => NotSpliced::Refused(e.to_string()),
            })
    }
}

impl SplicedPair for crate::splice::Spliced {
    fn bytes(&self) -> (u64, u64) {
        crate::splice::Spliced::bytes(self)
    }
    fn passed(&self) -> (u64, u64) {
        crate::splice::Spliced::passed(self)
    }
    fn grant(&self, from_app: bool, allowed: u64, consumed: u64) -> Result<(), String> {
        crate::splice::Spliced::grant(self, from_app, allowed, consumed).map_err(|e| e.to_string())
    }
}

/// How same-node connections are carried (`--same-node-path`). The default is `Copy` for now:
/// the splice is correct and cuts request latency and CPU per byte, but its per-connection cost
/// (splice/unsplice map updates, the FIN hand-over waiting for the kernel's work queue) lowers
/// the short-connection rate (docs/performance.md, "Same-node splice").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathChoice {
    /// Splice when the start-up self-test passes, else copy in user space.
    Auto,
    /// Always copy in user space.
    #[default]
    Copy,
}

impl std::str::FromStr for PathChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "copy" => Ok(Self::Copy),
            other => Err(format!(
                "same-node path `{other}`: expected `auto` (splice in the kernel when the start-up self-test passes) or `copy` (user space)"
            )),
        }
    }
}

/// The path in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameNodePath {
    Splice,
    Copy,
}

impl SameNodePath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
}

type PathLabel = [(&'static str, &'static str); 1];

/// Same-node path metrics (`nodemesh_same_node_*`); clones share them.
#[derive(Clone, Debug, Default)]
pub struct SameNodeMetrics {
    path: Family<PathLabel, Gauge>,
    connections: Family<PathLabel, Counter>,
    bytes: Family<PathLabel, Counter>,
    splice_refused: Counter,
}

impl SameNodeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "same_node_path",
            "Which path carries same-node connections: 1 for the one in use (splice: in the kernel; copy: user space)",
            self.path.clone(),
        );
        registry.register(
            "same_node_connections",
            "Same-node connections carried, by path",
            self.connections.clone(),
        );
        registry.register(
            "same_node_bytes",
            "Same-node payload bytes, both directions, by path (splice: moved by the kernel; copy: carried by the tunnel's copy)",
            self.bytes.clone(),
        );
        registry.register(
            "same_node_splice_refused",
            "Same-node connections the kernel splice refused (maps full): copied in user space instead",
            self.splice_refused.clone(),
        );
    }

    fn set_path(&self, path: SameNodePath) {
        for p in [SameNodePath::Splice, SameNodePath::Copy] {
            self.path
                .get_or_create(&[("path", p.as_str())])
                .set(i64::from(p == path));
        }
    }

    fn add(&self, path: SameNodePath, bytes: u64) {
        self.connections
            .get_or_create(&[("path", path.as_str())])
            .inc();
        self.bytes
            .get_or_create(&[("path", path.as_str())])
            .inc_by(bytes);
    }

    /// Bytes copied in user space on same-node connections (tests: 0 on the spliced path).
    pub fn copied_bytes(&self) -> u64 {
        self.bytes.get_or_create(&[("path", "copy")]).get()
    }

    /// Bytes moved by the kernel on same-node connections.
    pub fn spliced_bytes(&self) -> u64 {
        self.bytes.get_or_create(&[("path", "splice")]).get()
    }

    /// Same-node connections the splicer refused (its maps full or a kernel error).
    pub fn refused(&self) -> u64 {
        self.splice_refused.get()
    }

    /// Same-node connections carried on `path`.
    pub fn connections(&self, path: SameNodePath) -> u64 {
        self.connections
            .get_or_create(&[("path", path.as_str())])
            .get()
    }
}

/// The same-node carrier of one outbound: the path in use and its metrics.
#[derive(Default)]
pub struct SameNode {
    splicer: OnceLock<Arc<dyn Splicer>>,
    metrics: SameNodeMetrics,
}

impl SameNode {
    pub fn new() -> Self {
        let s = Self::default();
        s.metrics.set_path(SameNodePath::Copy);
        s
    }

    pub fn metrics(&self) -> &SameNodeMetrics {
        &self.metrics
    }

    pub fn path(&self) -> SameNodePath {
        if self.splicer.get().is_some() {
            SameNodePath::Splice
        } else {
            SameNodePath::Copy
        }
    }

    /// Decides the path once: with `Auto` and a splicer, the self-test must pass. Returns the
    /// path chosen (logged, and in `nodemesh_same_node_path`).
    pub async fn choose(
        &self,
        choice: PathChoice,
        splicer: Result<Arc<dyn Splicer>, String>,
    ) -> SameNodePath {
        let path = match (choice, splicer) {
            (PathChoice::Copy, _) => {
                info!("same-node connections are copied in user space (--same-node-path copy)");
                SameNodePath::Copy
            }
            (PathChoice::Auto, Err(why)) => {
                warn!(reason = %why, "same-node splice unavailable: same-node connections are copied in user space");
                SameNodePath::Copy
            }
            (PathChoice::Auto, Ok(splicer)) => match self_test(&*splicer).await {
                Ok(()) => {
                    info!("same-node connections are spliced in the kernel (self-test passed)");
                    let _ = self.splicer.set(splicer);
                    SameNodePath::Splice
                }
                Err(why) => {
                    warn!(reason = %why, "same-node splice self-test failed: same-node connections are copied in user space");
                    SameNodePath::Copy
                }
            },
        };
        self.metrics.set_path(self.path());
        path
    }

    /// Carries an authorized same-node connection until both directions have ended. Bytes go
    /// into `counters` (app → pod as `tcp_to_stream`), also when the future is dropped.
    pub async fn carry(
        &self,
        app: &mut TcpStream,
        pod: &mut TcpStream,
        max_buffer: usize,
        counters: &copy::Counters,
    ) -> std::io::Result<()> {
        if let Some(splicer) = self.splicer.get() {
            let before = queued_before(app, pod);
            match splicer.splice(app, pod) {
                Ok(pair) => {
                    let guard = Recorded::new(pair, counters, &self.metrics, before);
                    return spliced(app, pod, &guard).await;
                }
                Err(NotSpliced::Closing(why)) => {
                    debug!(reason = %why, "same-node connection not spliced: copied in user space");
                }
                Err(NotSpliced::Refused(why)) => {
                    self.metrics.splice_refused.inc();
                    warn!(reason = %why, "same-node connection not spliced: copied in user space");
                }
            }
        }
        let result = copy::same_node_copy(app, pod, max_buffer, counters).await;
        self.metrics.add(
            SameNodePath::Copy,
            counters.tcp_to_stream.load(Ordering::Relaxed)
                + counters.stream_to_tcp.load(Ordering::Relaxed),
        );
        result
    }
}

/// A spliced pair whose byte counts are recorded when it drops (end of the connection, or the
/// future dropped on revocation or drain), then unspliced.
struct Recorded<'a> {
    pair: Box<dyn SplicedPair>,
    counters: &'a copy::Counters,
    metrics: &'a SameNodeMetrics,
    /// Bytes the kernel left to the tunnel (a direction's redirect credit ran out), app → pod
    /// and pod → app; forwarded by [`spliced`] and counted as copied.
    user: [AtomicU64; 2],
    /// Serialises credit grants (the forwarding directions and the refresher), so a grant
    /// never carries an older `consumed` than the last one.
    grant_lock: std::sync::Mutex<()>,
    /// [`crate::splice::bytes_queued`] of the pod's and of the app's socket (the receiving
    /// side of direction 0 and 1) before the splice: what the kernel counts there from then on
    /// is what the connection moved (a connected socket's count starts at 1, for its SYN).
    queued_before: [u64; 2],
}

impl<'a> Recorded<'a> {
    fn new(
        pair: Box<dyn SplicedPair>,
        counters: &'a copy::Counters,
        metrics: &'a SameNodeMetrics,
        queued_before: [u64; 2],
    ) -> Self {
        Self {
            pair,
            counters,
            metrics,
            user: Default::default(),
            grant_lock: Default::default(),
            queued_before,
        }
    }

    /// Bytes that have entered direction `d`'s receiving socket `to` since the splice.
    fn queued(&self, d: usize, to: &TcpStream) -> std::io::Result<u64> {
        Ok(crate::splice::bytes_queued(to)?.saturating_sub(self.queued_before[d]))
    }
}

/// The send-queue counts of the pod's and the app's socket before a splice ([`Recorded`]); 0
/// when unreadable (the splice then fails on the same socket).
fn queued_before(app: &TcpStream, pod: &TcpStream) -> [u64; 2] {
    let count = |s: &TcpStream| crate::splice::bytes_queued(s).unwrap_or(0);
    [count(pod), count(app)]
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        let (to_pod, to_app) = self.pair.bytes();
        let user = [
            self.user[0].load(Ordering::Relaxed),
            self.user[1].load(Ordering::Relaxed),
        ];
        self.counters
            .tcp_to_stream
            .fetch_add(to_pod + user[0], Ordering::Relaxed);
        self.counters
            .stream_to_tcp
            .fetch_add(to_app + user[1], Ordering::Relaxed);
        self.metrics.add(SameNodePath::Splice, to_pod + to_app);
        if user[0] + user[1] > 0 {
            self.metrics
                .bytes
                .get_or_create(&[("path", "copy")])
                .inc_by(user[0] + user[1]);
        }
    }
}

/// Waits on each spliced socket and does what the kernel cannot (see the module docs), each
/// direction on its own, as the copy does (one direction waiting on a slow reader must not hold
/// up the other): a read of 0 → wait until the other socket has every byte, then half-close
/// it; bytes the kernel left on the socket (its redirect credit ran out: the other side is not
/// keeping up) → wait until the kernel's queue towards the other socket has drained, forward
/// them in order, and grant a new window. An error in either direction ends both.
async fn spliced(app: &TcpStream, pod: &TcpStream, rec: &Recorded<'_>) -> std::io::Result<()> {
    let both = async { tokio::try_join!(direction(app, pod, rec, 0), direction(pod, app, rec, 1)) };
    tokio::select! {
        r = both => r.map(|_| ()),
        () = refresh_credit(app, pod, rec) => Ok(()),
    }
}

/// Keeps each direction's redirect credit a window ahead of what has drained into the other
/// socket, so a peer that keeps up never runs out (running out costs a trip through the tunnel,
/// and a continuous stream then tends to stay on it). Checks every 2 ms while bytes move,
/// backing off to every 5 s when idle (an idle check is one map read: no credit was used);
/// never returns.
async fn refresh_credit(app: &TcpStream, pod: &TcpStream, rec: &Recorded<'_>) {
    const BUSY: Duration = Duration::from_millis(2);
    const IDLE: Duration = Duration::from_secs(5);
    let mut pause = BUSY;
    let mut last = (0, 0);
    loop {
        tokio::time::sleep(pause).await;
        let moved = rec.pair.bytes();
        if moved == last {
            pause = (pause * 2).min(IDLE);
            continue;
        }
        pause = BUSY;
        last = moved;
        let passed = rec.pair.passed();
        for (d, to, redirected, passed) in
            [(0, pod, moved.0, passed.0), (1, app, moved.1, passed.1)]
        {
            let _grant = rec.grant_lock.lock().unwrap_or_else(|p| p.into_inner());
            let consumed = rec.user[d].load(Ordering::Relaxed);
            if passed != consumed {
                continue; // the tunnel is forwarding what was left to it: it grants
            }
            let Ok(queued) = rec.queued(d, to) else {
                continue;
            };
            let drained = queued.saturating_sub(consumed).min(redirected);
            let _ = rec
                .pair
                .grant(d == 0, drained + crate::splice::SPLICE_WINDOW, consumed);
        }
    }
}

/// Direction `d` (0: app → pod, 1: pod → app) until `from`'s FIN has been passed on.
async fn direction(
    from: &TcpStream,
    to: &TcpStream,
    rec: &Recorded<'_>,
    d: usize,
) -> std::io::Result<()> {
    let redirected = || {
        let (to_pod, to_app) = rec.pair.bytes();
        if d == 0 { to_pod } else { to_app }
    };
    // Small at first: most spliced connections read here only their FIN (a read of 0); a
    // direction whose credit runs out grows it while reads fill it. Never zeroed (zeroing
    // 256 KiB up front cost more than the rest of a short connection's splice).
    let mut buf = bytes::BytesMut::with_capacity(USER_BUFFER_START);
    loop {
        from.readable().await?;
        buf.clear();
        let room = buf.capacity();
        match from.try_read_buf(&mut buf) {
            Ok(0) => {
                let target = redirected() + rec.user[d].load(Ordering::Relaxed);
                wait_flushed(rec, d, to, target, Some(FLUSH_DEADLINE)).await;
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(());
            }
            Ok(n) => {
                // Everything redirected (and forwarded) before these bytes must be in `to`
                // first; the kernel redirects nothing more until they are forwarded.
                let before = redirected() + rec.user[d].load(Ordering::Relaxed);
                if !wait_flushed(rec, d, to, before, None).await {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "the spliced peer socket can no longer send",
                    ));
                }
                write_all(to, &buf[..n]).await?;
                if n == room && room < USER_BUFFER_MAX {
                    buf.clear();
                    buf.reserve((room * 2).min(USER_BUFFER_MAX));
                }
                let _grant = rec.grant_lock.lock().unwrap_or_else(|p| p.into_inner());
                let consumed = rec.user[d].fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                let allowed = redirected() + crate::splice::SPLICE_WINDOW;
                rec.pair
                    .grant(d == 0, allowed, consumed)
                    .map_err(std::io::Error::other)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// `write_all` through a shared reference (both directions use both sockets).
async fn write_all(to: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Longest wait for the kernel to queue a direction's last bytes before its FIN is passed on.
/// The wait ends earlier when the receiving socket can no longer send.
const FLUSH_DEADLINE: Duration = Duration::from_secs(60);

/// First and largest size of a spliced direction's user-space buffer ([`direction`]).
const USER_BUFFER_START: usize = 4 * 1024;
const USER_BUFFER_MAX: usize = 256 * 1024;

/// Polls until direction `d`'s receiving socket `to` has taken `target` bytes into its send
/// queue since the splice (the kernel's redirect runs on a work queue, so it trails what the
/// verdict counted). Returns false when `to` can no longer send (or the deadline passed):
/// nothing more will get there.
async fn wait_flushed(
    rec: &Recorded<'_>,
    d: usize,
    to: &TcpStream,
    target: u64,
    deadline: Option<Duration>,
) -> bool {
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_CLOSE_WAIT: u8 = 8;
    let deadline = deadline.map(|d| tokio::time::Instant::now() + d);
    let mut pause = Duration::from_micros(100);
    loop {
        match rec.queued(d, to) {
            Ok(queued) if queued >= target => return true,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot read a spliced socket's send queue");
                return false;
            }
        }
        let state = crate::splice::tcp_info(to)
            .map(|i| i.tcpi_state)
            .unwrap_or(0);
        if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
            return false; // it cannot send any more: nothing to wait for
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            warn!(deadline = ?FLUSH_DEADLINE, "spliced bytes still not queued on the other socket; passing the FIN on");
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The start-up self-test: a spliced pair on loopback, driven by the same code as real
/// connections. Checks bytes sent before the splice, 1 MiB each way byte-exact, the kernel's
/// counters, that nothing reached user space, and half-close in both directions.
pub async fn self_test(splicer: &dyn Splicer) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(10), self_test_inner(splicer))
        .await
        .map_err(|_| "timed out after 10 s (data or FIN stuck in the kernel)".to_string())?
}

async fn self_test_inner(splicer: &dyn Splicer) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: std::io::Error| format!("{what}: {err}")
    };
    let lo = SocketAddr::from(([127, 0, 0, 1], 0));
    let front = super::listener::bind_exclusive(lo, 4).map_err(e("bind on 127.0.0.1"))?;
    let back = super::listener::bind_exclusive(lo, 4).map_err(e("bind on 127.0.0.1"))?;
    let mut app = TcpStream::connect(front.local_addr().map_err(e("listener address"))?)
        .await
        .map_err(e("connect"))?;
    let (a, _) = front.accept().await.map_err(e("accept"))?;
    let b = TcpStream::connect(back.local_addr().map_err(e("listener address"))?)
        .await
        .map_err(e("connect"))?;
    let (mut pod, _) = back.accept().await.map_err(e("accept"))?;
    let early = b"sent before the splice";
    app.write_all(early).await.map_err(e("app write"))?;
    // Let the early bytes land in the tunnel socket's receive queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while crate::splice::tcp_info(&a)
        .map(|i| i.tcpi_bytes_received)
        .map_err(e("tcp_info"))?
        < early.len() as u64
    {
        if tokio::time::Instant::now() >= deadline {
            return Err("the early bytes never arrived".into());
        }
        tokio::task::yield_now().await;
    }
    let counters = copy::Counters::default();
    let metrics = SameNodeMetrics::default();
    let before = queued_before(&a, &b);
    let pair = splicer.splice(&a, &b).map_err(|e| e.to_string())?;
    let rec = Recorded::new(pair, &counters, &metrics, before);
    const N: usize = 1 << 20;
    let pattern = |i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    let data: Vec<u8> = (0..N).map(pattern).collect();
    let test = async {
        let (mut app_r, mut app_w) = app.split();
        let (mut pod_r, mut pod_w) = pod.split();
        let up = async {
            app_w.write_all(&data).await.map_err(e("app write"))?;
            app_w.shutdown().await.map_err(e("app shutdown"))?;
            let mut got = Vec::with_capacity(N + early.len());
            pod_r.read_to_end(&mut got).await.map_err(e("pod read"))?;
            if got.len() != N + early.len()
                || &got[..early.len()] != early
                || got[early.len()..] != data[..]
            {
                return Err(format!(
                    "app → pod: {} bytes arrived, {} expected, or not byte-exact",
                    got.len(),
                    N + early.len()
                ));
            }
            Ok::<_, String>(())
        };
        let down = async {
            pod_w.write_all(&data).await.map_err(e("pod write"))?;
            pod_w.shutdown().await.map_err(e("pod shutdown"))?;
            let mut got = Vec::with_capacity(N);
            app_r.read_to_end(&mut got).await.map_err(e("app read"))?;
            if got != data {
                return Err(format!(
                    "pod → app: {} bytes arrived, {N} expected, or not byte-exact",
                    got.len()
                ));
            }
            Ok::<_, String>(())
        };
        tokio::try_join!(up, down)
    };
    let (carried, checked) = tokio::join!(spliced(&a, &b, &rec), test);
    carried.map_err(e("the spliced pair"))?;
    checked?;
    // Both FINs crossed the pair: neither socket may be left broken (a FIN redirected as an
    // empty segment once left EPIPE on the other socket).
    for (name, s) in [("app", &a), ("pod", &b)] {
        if let Some(err) = s.take_error().map_err(e("SO_ERROR"))? {
            return Err(format!(
                "the tunnel's {name} socket was left with an error: {err}"
            ));
        }
    }
    let user = rec.user[0].load(Ordering::Relaxed) + rec.user[1].load(Ordering::Relaxed);
    let (to_pod, to_app) = rec.pair.bytes();
    if user != 0 {
        return Err(format!("{user} bytes reached user space"));
    }
    if (to_pod, to_app) != ((N + early.len()) as u64, N as u64) {
        return Err(format!(
            "kernel counters say {to_pod} / {to_app} bytes, expected {} / {N}",
            N + early.len()
        ));
    }
    Ok(())
}
