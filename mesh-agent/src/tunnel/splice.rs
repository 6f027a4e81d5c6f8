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
//! Which path serves same-node connections is decided once at start ([`SameNode::choose`]):
//! `auto` runs [`self_test`] (a spliced pair on loopback: early bytes, 1 MiB each way, counters,
//! nothing readable in user space, half-close both ways) and falls back to the user-space copy
//! if it fails; `copy` forces the copy. A connection the splicer refuses (its maps full) is
//! copied in user space and counted — never passed around the tunnel.

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
use tracing::{info, warn};

use super::copy;

/// The kernel side of the splice (implemented over the datapath's maps).
pub trait Splicer: Send + Sync {
    /// Splices `app` (the accepted app socket) and `pod` (the socket to the destination pod).
    /// `Err` leaves both sockets as they were (the caller copies in user space).
    fn splice(&self, app: &TcpStream, pod: &TcpStream) -> Result<Box<dyn SplicedPair>, String>;
}

/// One spliced connection; dropping it unsplices.
pub trait SplicedPair: Send + Sync {
    /// Bytes the kernel moved app → pod and pod → app.
    fn bytes(&self) -> (u64, u64);
    /// Whether `moved` bytes have all entered `to`'s send queue.
    fn flushed(&self, to: &TcpStream, moved: u64) -> std::io::Result<bool>;
}

impl Splicer for crate::splice::SockSplice {
    fn splice(&self, app: &TcpStream, pod: &TcpStream) -> Result<Box<dyn SplicedPair>, String> {
        crate::splice::SockSplice::splice(self, app, pod)
            .map(|s| Box::new(s) as Box<dyn SplicedPair>)
            .map_err(|e| e.to_string())
    }
}

impl SplicedPair for crate::splice::Spliced {
    fn bytes(&self) -> (u64, u64) {
        crate::splice::Spliced::bytes(self)
    }
    fn flushed(&self, to: &TcpStream, moved: u64) -> std::io::Result<bool> {
        crate::splice::Spliced::flushed(to, moved)
    }
}

/// How same-node connections are carried (`--same-node-path`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathChoice {
    /// Splice when the start-up self-test passes, else copy in user space.
    #[default]
    Auto,
    /// Always copy in user space.
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
            "Same-node payload bytes, both directions, by path (splice: moved by the kernel; copy: copied in user space)",
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
            match splicer.splice(app, pod) {
                Ok(pair) => {
                    let guard = Recorded {
                        pair,
                        counters,
                        metrics: &self.metrics,
                        user: Default::default(),
                    };
                    return spliced(app, pod, &guard).await;
                }
                Err(why) => {
                    self.metrics.splice_refused.inc();
                    warn!(reason = %why, "same-node connection not spliced: copied in user space");
                }
            }
        }
        let result = super::outbound::same_node_copy(app, pod, max_buffer, counters).await;
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
    /// Bytes the kernel left to user space (the verdict passed them: never expected), app →
    /// pod and pod → app; forwarded by [`spliced`] and counted as copied.
    user: [AtomicU64; 2],
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

/// Waits for EOF on each spliced socket and propagates it (see the module docs).
async fn spliced(
    app: &mut TcpStream,
    pod: &mut TcpStream,
    rec: &Recorded<'_>,
) -> std::io::Result<()> {
    let mut app_open = true;
    let mut pod_open = true;
    let mut buf = vec![0u8; 16 * 1024];
    while app_open || pod_open {
        tokio::select! {
            r = app.readable(), if app_open => {
                r?;
                match app.try_read(&mut buf) {
                    Ok(0) => {
                        app_open = false;
                        wait_flushed(rec, pod, |(to_pod, _)| to_pod + rec.user[0].load(Ordering::Relaxed)).await;
                        pod.shutdown().await?;
                    }
                    Ok(n) => {
                        pod.write_all(&buf[..n]).await?;
                        rec.user[0].fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            r = pod.readable(), if pod_open => {
                r?;
                match pod.try_read(&mut buf) {
                    Ok(0) => {
                        pod_open = false;
                        wait_flushed(rec, app, |(_, to_app)| to_app + rec.user[1].load(Ordering::Relaxed)).await;
                        app.shutdown().await?;
                    }
                    Ok(n) => {
                        app.write_all(&buf[..n]).await?;
                        rec.user[1].fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Longest wait for the kernel to queue a direction's last bytes before its FIN is passed on.
/// The wait ends earlier when the receiving socket can no longer send.
const FLUSH_DEADLINE: Duration = Duration::from_secs(60);

/// Polls until every byte the kernel moved towards `to` is in `to`'s send queue (the redirect
/// runs on a kernel work queue, so it can trail the FIN that ended the reading side).
async fn wait_flushed(rec: &Recorded<'_>, to: &TcpStream, moved: impl Fn((u64, u64)) -> u64) {
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_CLOSE_WAIT: u8 = 8;
    let deadline = tokio::time::Instant::now() + FLUSH_DEADLINE;
    let mut pause = Duration::from_micros(100);
    loop {
        match rec.pair.flushed(to, moved(rec.pair.bytes())) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "cannot read a spliced socket's send queue; passing its FIN on");
                return;
            }
        }
        let state = crate::splice::tcp_info(to)
            .map(|i| i.tcpi_state)
            .unwrap_or(0);
        if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
            return; // it cannot send any more: nothing to wait for
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(deadline = ?FLUSH_DEADLINE, "spliced bytes still not queued on the other socket; passing the FIN on");
            return;
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
    let (mut a, _) = front.accept().await.map_err(e("accept"))?;
    let mut b = TcpStream::connect(back.local_addr().map_err(e("listener address"))?)
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
    let pair = splicer.splice(&a, &b)?;
    let rec = Recorded {
        pair,
        counters: &counters,
        metrics: &metrics,
        user: Default::default(),
    };
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
    let (carried, checked) = tokio::join!(spliced(&mut a, &mut b, &rec), test);
    carried.map_err(e("the spliced pair"))?;
    checked?;
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
