//! Helpers of the fault-injection suite (`tests/faults.rs`): the test process as an application
//! of a pod, servers inside a pod's namespace that record who connected, link faults on the node
//! link (a blackhole, loss and delay), and the agent's memory and descriptors from `/proc`.
//!
//! Link faults use what the kernel has: `tc netem` when it exists; otherwise (this CI kernel is
//! built without `sch_netem`, `act_gact` and `sch_fq`) a clsact egress filter that redirects the
//! packets to drop to a veth end that is down (mirred drops them), chosen by a classic BPF
//! program reading the kernel's random number (`ld rand`) for loss, or every IP packet for a
//! blackhole, and a `tbf` shaper whose queue holds at most the delay's worth of bytes for
//! delay (a queueing delay up to that bound rather than a fixed one).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::NetNs;

/// The whole test process in `cgroup` (a pod's) until dropped, then back where it was: sockets
/// it creates meanwhile belong to that cgroup, so the node's programs see them as the pod's
/// (with the pod's network namespace entered per thread, see [`connect_from`]).
pub struct InCgroup {
    original: PathBuf,
}

impl InCgroup {
    pub fn enter(cgroup: &Path) -> Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let original = mesh_agent::cgroup::cgroup2_mount()?.join(rel.trim_start_matches('/'));
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("cannot move this test into {}", cgroup.display()))?;
        Ok(Self { original })
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(
            self.original.join("cgroup.procs"),
            std::process::id().to_string(),
        ) {
            eprintln!(
                "cleanup: cannot move this test back to {}: {e}",
                self.original.display()
            );
        }
    }
}

/// A TCP connection made from inside the network namespace `netns` (the socket keeps the
/// namespace; the calling thread does not change namespace).
pub fn connect_from(
    netns: &Path,
    dst: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    mesh_agent::netns::in_netns(netns, move || TcpStream::connect_timeout(&dst, timeout)).map_err(
        |e| match e {
            mesh_agent::netns::NetnsError::Inside { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        },
    )
}

/// `len` bytes of a xorshift sequence from `seed`: data that compression or a repeated pattern
/// cannot fake.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `payload` and reads it back (echo server) on `stream`, concurrently (a payload larger
/// than the socket buffers would otherwise deadlock); the bytes must come back equal.
pub fn echo_roundtrip(stream: TcpStream, payload: &[u8], timeout: Duration) -> Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let data = payload.to_vec();
    let w = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::with_capacity(payload.len());
    let read = (&stream).read_to_end(&mut back);
    let written = w
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?;
    written.context("write")?;
    read.context("read")?;
    ensure!(
        back.len() == payload.len(),
        "echo returned {} of {} bytes",
        back.len(),
        payload.len()
    );
    if let Some(i) = back.iter().zip(payload).position(|(a, b)| a != b) {
        bail!("echo differs from what was sent at byte {i}");
    }
    Ok(())
}

/// What a [`Server`] does with each accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Echo everything back; shut down its write side at EOF.
    Echo,
    /// Write a pattern as fast as the peer takes it, until an error.
    Push,
}

/// Counts shared by a server's tasks.
#[derive(Debug, Default)]
pub struct ServerStats {
    accepted: AtomicU64,
    pushed: AtomicU64,
    peers: Mutex<BTreeMap<IpAddr, u64>>,
}

/// A server inside a pod's network namespace, run by this test process on its own tokio
/// runtime (a task per connection, so 10,000 connections are cheap); records the address every
/// connection came from. Not under any node's cgroup, so no plaintext guard protects it: a
/// connection that bypassed the mesh would arrive from the client's own address and be counted.
pub struct Server {
    rt: Option<tokio::runtime::Runtime>,
    stats: Arc<ServerStats>,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(netns: &Path, addr: SocketAddr, mode: Mode) -> Result<Self> {
        let std_listener =
            mesh_agent::netns::in_netns(netns, move || std::net::TcpListener::bind(addr))
                .with_context(|| format!("cannot listen on {addr} in {}", netns.display()))?;
        // A deep accept queue: the 10,000-connection test connects in bursts. A second
        // listen() on a listening socket only changes its backlog.
        {
            use std::os::fd::AsRawFd;
            // SAFETY: listen(2) on a descriptor this process owns; no memory is passed.
            let rc = unsafe { libc::listen(std_listener.as_raw_fd(), 4096) };
            ensure!(rc == 0, "listen: {}", std::io::Error::last_os_error());
        }
        std_listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let stats = Arc::new(ServerStats::default());
        let s = stats.clone();
        rt.spawn(async move {
            loop {
                let (conn, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, say: retry, but not in a busy loop.
                        eprintln!("test server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                *s.peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(peer.ip())
                    .or_default() += 1;
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, mode, &s).await;
                });
            }
        });
        Ok(Self {
            rt: Some(rt),
            stats,
            addr,
        })
    }

    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Bytes written by [`Mode::Push`] connections so far.
    pub fn pushed(&self) -> u64 {
        self.stats.pushed.load(Ordering::SeqCst)
    }

    /// Accepted connections by the address they came from.
    pub fn peers(&self) -> BTreeMap<IpAddr, u64> {
        self.stats
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fails if any accepted connection came from elsewhere than `tunnel` (the destination
    /// node's tunnel address, from which the mesh delivers).
    pub fn only_from(&self, tunnel: IpAddr) -> Result<()> {
        let peers = self.peers();
        ensure!(
            peers.keys().all(|ip| *ip == tunnel),
            "the server was reached from outside the mesh (plaintext): peers {peers:?}, only \
             {tunnel} (the tunnel) may connect"
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn serve(
    mut conn: tokio::net::TcpStream,
    mode: Mode,
    stats: &ServerStats,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    match mode {
        Mode::Echo => {
            let (mut r, mut w) = conn.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        Mode::Push => {
            let chunk = pattern(7, 64 * 1024);
            loop {
                conn.write_all(&chunk).await?;
                stats.pushed.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The soft limit of open descriptors of process `pid` (`Max open files` in its limits).
pub fn nofile_soft_limit(pid: u32) -> Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no open-file limit in /proc/{pid}/limits"))
}

/// Sets this process's soft limit of open descriptors (`None`: to the hard limit); returns the
/// limit set.
pub fn set_nofile_soft(limit: Option<u64>) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass, which lives on our stack.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0,
            "getrlimit: {}",
            std::io::Error::last_os_error()
        );
        lim.rlim_cur = limit.map_or(lim.rlim_max, |l| l.min(lim.rlim_max));
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(lim.rlim_cur)
}

/// A fault on one interface of a namespace; removed on drop.
pub struct LinkFault<'a> {
    ns: &'a NetNs,
    dev: String,
    /// What was installed, for messages.
    pub describe: String,
}

/// The veth end packets are redirected to for dropping: kept down, so mirred drops them.
const SINK: &str = "nmfsink0";

fn ensure_sink(ns: &NetNs) -> Result<()> {
    if ns.exec(&["ip", "link", "show", SINK]).is_err() {
        ns.exec(&[
            "ip", "link", "add", SINK, "type", "veth", "peer", "name", "nmfsink1",
        ])?;
    }
    Ok(())
}

/// Every IP packet leaving `dev` in `ns` is dropped (ARP still works, so the peer's address
/// stays resolved: a silent blackhole, as a firewall DROP or a dead peer behind a switch).
pub fn blackhole<'a>(ns: &'a NetNs, dev: &str) -> Result<LinkFault<'a>> {
    ensure_sink(ns)?;
    ns.exec(&["tc", "qdisc", "add", "dev", dev, "clsact"])?;
    ns.exec(&[
        "tc", "filter", "add", "dev", dev, "egress", "protocol", "ip", "u32", "match", "u32", "0",
        "0", "action", "mirred", "egress", "redirect", "dev", SINK,
    ])?;
    Ok(LinkFault {
        ns,
        dev: dev.to_owned(),
        describe: format!("every IP packet out of {dev} dropped"),
    })
}

/// `loss_percent` of the packets leaving `dev` in `ns` dropped at random and `delay_ms` of
/// delay: `tc netem` if the kernel has it, else the fallback of the module comment.
pub fn lossy<'a>(
    ns: &'a NetNs,
    dev: &str,
    loss_percent: u32,
    delay_ms: u32,
) -> Result<LinkFault<'a>> {
    let loss = format!("{loss_percent}%");
    let delay = format!("{delay_ms}ms");
    if ns
        .exec(&[
            "tc", "qdisc", "add", "dev", dev, "root", "netem", "loss", &loss, "delay", &delay,
        ])
        .is_ok()
    {
        return Ok(LinkFault {
            ns,
            dev: dev.to_owned(),
            describe: format!("netem loss {loss} delay {delay} on {dev}"),
        });
    }
    ensure_sink(ns)?;
    ns.exec(&["tc", "qdisc", "add", "dev", dev, "clsact"])?;
    // ld rand; jgt threshold → no match; else match (redirect to the sink = drop).
    let threshold = (u64::from(u32::MAX) * u64::from(loss_percent) / 100).to_string();
    let program = format!("4,32 0 0 4294963256,37 1 0 {threshold},6 0 0 4294967295,6 0 0 0");
    ns.exec(&[
        "tc", "filter", "add", "dev", dev, "egress", "protocol", "ip", "bpf", "bytecode", &program,
        "action", "mirred", "egress", "redirect", "dev", SINK,
    ])?;
    // 20 Mbit/s with a queue of at most `delay` ms: queueing delay up to the bound.
    ns.exec(&[
        "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "20mbit", "burst", "32kbit",
        "latency", &delay,
    ])?;
    Ok(LinkFault {
        ns,
        dev: dev.to_owned(),
        describe: format!(
            "{loss} random loss (clsact + cBPF `ld rand`, no netem in this kernel) and a 20 Mbit/s \
             tbf queue of at most {delay} on {dev}"
        ),
    })
}

impl LinkFault<'_> {
    /// Removes the fault (also done on drop).
    pub fn clear(&self) {
        let _ = self
            .ns
            .exec(&["tc", "qdisc", "del", "dev", &self.dev, "clsact"]);
        let _ = self
            .ns
            .exec(&["tc", "qdisc", "del", "dev", &self.dev, "root"]);
    }
}

impl Drop for LinkFault<'_> {
    fn drop(&mut self) {
        self.clear();
    }
}
