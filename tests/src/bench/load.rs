//! The load of `nm-bench`: one server and three clients, each a plain blocking program with
//! std threads (lean, so that the generator is not what a measurement measures). Every one runs
//! as its own process that first joins a cgroup and a network namespace ([`join_place`]), the
//! way a container runtime places a pod's process: in a pod's cgroup its connections go through
//! the mesh, in a cgroup outside the lab's node cgroups they take the raw path.
//!
//! A client's first byte picks what the server does with the connection:
//! - [`MODE_SINK`]: read and discard until EOF, then answer the byte count (u64 LE);
//! - [`MODE_ECHO`]: echo every byte back (TCP_NODELAY) until EOF;
//! - [`MODE_CRR`]: the byte is the request: answer one byte and close.
//!
//! Clients print one JSON line with their result.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::Path,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

pub const MODE_SINK: u8 = b'S';
pub const MODE_ECHO: u8 = b'E';
pub const MODE_CRR: u8 = b'C';

/// Threads accepting on the server's socket: a CRR connection is answered by its acceptor (no
/// thread spawn per connection), so enough of them that 8 clients never queue behind one.
const ACCEPTORS: usize = 8;
/// The bulk write size (the server reads with the same size).
const BULK_CHUNK: usize = 256 * 1024;
/// Round trips before the timed ones (the first ones of a mesh connection set up its path).
const RR_WARMUP: usize = 200;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Moves this process into `cgroup` and this thread into the network namespace `netns`. Call
/// it before starting any thread: threads inherit the namespace of the thread that starts them.
pub fn join_place(cgroup: &Path, netns: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(b"0"))
        .with_context(|| format!("cannot join the cgroup {}", cgroup.display()))?;
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns {}", netns.display()))?;
    Ok(())
}

/// Serves `addr` until killed; prints `ready` once it listens.
pub fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut threads = Vec::new();
    for _ in 0..ACCEPTORS {
        let l = listener.try_clone()?;
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                match conn {
                    Ok(c) => accept(c),
                    // EMFILE and the like: back off briefly instead of spinning.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    bail!("every acceptor of {addr} ended")
}

fn accept(mut c: TcpStream) {
    let _ = c.set_nodelay(true);
    let _ = c.set_read_timeout(Some(CONNECT_TIMEOUT));
    let mut mode = [0u8; 1];
    if c.read_exact(&mut mode).is_err() || c.set_read_timeout(None).is_err() {
        return;
    }
    match mode[0] {
        // Dropping `c` closes it: the server closes first, so TIME_WAIT stays on its side and
        // the clients' ephemeral ports are free again at once.
        MODE_CRR => {
            let _ = c.write_all(b"c");
        }
        MODE_SINK => {
            std::thread::spawn(move || sink(c));
        }
        MODE_ECHO => {
            std::thread::spawn(move || echo(c));
        }
        _ => {}
    }
}

fn sink(mut c: TcpStream) {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut total = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = c.write_all(&total.to_le_bytes());
}

fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn connect(dst: SocketAddr) -> Result<TcpStream> {
    TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT).with_context(|| format!("connect {dst}"))
}

/// Bulk transfer on `flows` connections for `secs`; the result counts the bytes the server
/// received, timed until it acknowledged them all.
pub fn stream(dst: SocketAddr, flows: usize, secs: f64) -> Result<serde_json::Value> {
    ensure!(flows > 0, "at least one flow");
    let barrier = Arc::new(Barrier::new(flows));
    let mut threads = Vec::new();
    for _ in 0..flows {
        let mut c = connect(dst)?;
        c.write_all(&[MODE_SINK])?;
        let barrier = barrier.clone();
        threads.push(std::thread::spawn(move || -> Result<(u64, f64)> {
            let buf = vec![0x5au8; BULK_CHUNK];
            barrier.wait();
            let start = Instant::now();
            let until = start + Duration::from_secs_f64(secs);
            while Instant::now() < until {
                c.write_all(&buf).context("bulk write")?;
            }
            c.shutdown(Shutdown::Write)?;
            let mut ack = [0u8; 8];
            c.read_exact(&mut ack)
                .context("the server did not acknowledge the bytes")?;
            Ok((u64::from_le_bytes(ack), start.elapsed().as_secs_f64()))
        }));
    }
    let (mut bytes, mut took) = (0u64, 0f64);
    for t in threads {
        let (b, s) = t.join().map_err(|_| anyhow::anyhow!("a flow panicked"))??;
        bytes += b;
        took = took.max(s);
    }
    Ok(serde_json::json!({
        "bytes": bytes, "secs": took, "gbit_s": bytes as f64 * 8.0 / took / 1e9,
    }))
}

/// Request/response of `size` bytes on one kept-alive TCP_NODELAY connection for `secs`.
pub fn rr(dst: SocketAddr, size: usize, secs: f64) -> Result<serde_json::Value> {
    ensure!(size > 0, "at least one byte");
    let mut c = connect(dst)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    c.write_all(&[MODE_ECHO])?;
    let out = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut once = |c: &mut TcpStream| -> Result<()> {
        c.write_all(&out).context("request")?;
        c.read_exact(&mut back).context("response")?;
        Ok(())
    };
    for _ in 0..RR_WARMUP {
        once(&mut c)?;
    }
    let mut ns: Vec<u64> = Vec::with_capacity(100_000);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    loop {
        let t = Instant::now();
        if t >= until {
            break;
        }
        once(&mut c)?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    ensure!(!ns.is_empty(), "no round trip within {secs} s");
    ns.sort_unstable();
    let pct = |q: usize| ns[(ns.len() * q / 100).min(ns.len() - 1)] as f64 / 1000.0;
    Ok(serde_json::json!({
        "count": ns.len(), "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99),
    }))
}

/// New connections: `clients` threads each connect, send one byte, read one back and close
/// (after the server's FIN) in a loop for `secs`.
pub fn crr(dst: SocketAddr, clients: usize, secs: f64) -> Result<serde_json::Value> {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut byte = [0u8; 1];
                while Instant::now() < until {
                    let mut once = || -> std::io::Result<()> {
                        let mut c = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)?;
                        c.set_nodelay(true)?;
                        c.set_read_timeout(Some(CONNECT_TIMEOUT))?;
                        c.write_all(&[MODE_CRR])?;
                        c.read_exact(&mut byte)?;
                        // Wait for the server's FIN: the connection is closed when this returns.
                        let _ = c.read(&mut byte)?;
                        Ok(())
                    };
                    match once() {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for t in threads {
        let (o, f) = t.join().map_err(|_| anyhow::anyhow!("a client panicked"))?;
        ok += o;
        failed += f;
    }
    let took = start.elapsed().as_secs_f64();
    ensure!(
        failed * 100 <= ok,
        "{failed} of {} connections to {dst} failed",
        ok + failed
    );
    Ok(serde_json::json!({
        "count": ok, "failed": failed, "secs": took, "conn_per_s": ok as f64 / took,
    }))
}

/// The soak's traffic ([`mix`]): what each kind does, per destination (same node and cross
/// node), paced so that a long run loads the machine steadily instead of saturating it.
pub mod mix_plan {
    use std::time::Duration;

    /// Request sizes of the keep-alive exchanges, in turn.
    pub const RR_SIZES: [usize; 4] = [1, 64, 1024, 16 * 1024];
    /// Exchanges per second on each kept-alive connection.
    pub const RR_PER_S: u32 = 100;
    /// Kept-alive connections per destination that live for the whole run.
    pub const RR_LONG: usize = 1;
    /// Kept-alive connections per destination that are closed and reopened every
    /// [`RR_RENEW`].
    pub const RR_RENEWED: usize = 1;
    pub const RR_RENEW: Duration = Duration::from_secs(20);
    /// New connections per second per destination (connect, one byte each way, close).
    pub const CHURN_PER_S: u32 = 100;
    /// A bulk burst (one flow at full speed) every [`BULK_EVERY`], alternating destinations.
    pub const BULK_EVERY: Duration = Duration::from_secs(10);
    pub const BULK_SECS: f64 = 2.0;
    /// How often the generator prints its counters.
    pub const REPORT_EVERY: Duration = Duration::from_secs(1);
}

/// The soak's counters ([`mix`]): cumulative since it started.
#[derive(Debug, Default)]
pub struct MixCounters {
    pub rr_ok: std::sync::atomic::AtomicU64,
    pub rr_failed: std::sync::atomic::AtomicU64,
    pub renewed: std::sync::atomic::AtomicU64,
    pub conn_ok: std::sync::atomic::AtomicU64,
    pub conn_failed: std::sync::atomic::AtomicU64,
    pub bulk_ok: std::sync::atomic::AtomicU64,
    pub bulk_failed: std::sync::atomic::AtomicU64,
    pub bulk_bytes: std::sync::atomic::AtomicU64,
}

impl MixCounters {
    fn json(&self, t: f64, done: bool) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "t": t, "done": done,
            "rr_ok": self.rr_ok.load(Relaxed), "rr_failed": self.rr_failed.load(Relaxed),
            "renewed": self.renewed.load(Relaxed),
            "conn_ok": self.conn_ok.load(Relaxed), "conn_failed": self.conn_failed.load(Relaxed),
            "bulk_ok": self.bulk_ok.load(Relaxed), "bulk_failed": self.bulk_failed.load(Relaxed),
            "bulk_bytes": self.bulk_bytes.load(Relaxed),
        })
    }
}

/// Sleeps until `next` (a pacing schedule), then moves it on by `step`; a schedule that fell
/// behind by more than a second restarts from now instead of bursting to catch up.
fn pace(next: &mut Instant, step: Duration, until: Instant) {
    let now = Instant::now();
    if *next > now {
        std::thread::sleep((*next).min(until).saturating_duration_since(now));
    } else if now - *next > Duration::from_secs(1) {
        *next = now;
    }
    *next += step;
}

/// One kept-alive connection of the soak: echo exchanges of [`mix_plan::RR_SIZES`] at
/// [`mix_plan::RR_PER_S`] until `until`, or until `renew` has passed (then it closes and the
/// caller opens the next). An error counts once and ends the connection.
fn rr_connection(
    dst: SocketAddr,
    until: Instant,
    renew: Option<Duration>,
    c: &MixCounters,
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut s = connect(dst)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    s.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    s.write_all(&[MODE_ECHO])?;
    let end = renew.map_or(until, |r| (Instant::now() + r).min(until));
    let step = Duration::from_secs(1) / mix_plan::RR_PER_S;
    let mut next = Instant::now();
    let largest = mix_plan::RR_SIZES.iter().copied().max().unwrap_or(1);
    let out = vec![0x42u8; largest];
    let mut back = vec![0u8; largest];
    for size in mix_plan::RR_SIZES.iter().copied().cycle() {
        pace(&mut next, step, end);
        if Instant::now() >= end {
            break;
        }
        s.write_all(&out[..size]).context("request")?;
        s.read_exact(&mut back[..size]).context("response")?;
        c.rr_ok.fetch_add(1, Relaxed);
    }
    Ok(())
}

/// One bulk burst: one flow for `secs` at full speed; returns the bytes the server counted.
fn bulk_once(dst: SocketAddr, secs: f64) -> Result<u64> {
    let mut c = connect(dst)?;
    c.set_write_timeout(Some(Duration::from_secs(30)))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(&[MODE_SINK])?;
    let buf = vec![0x5au8; BULK_CHUNK];
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < until {
        c.write_all(&buf).context("bulk write")?;
        sent += buf.len() as u64;
    }
    c.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    c.read_exact(&mut ack)
        .context("the server did not acknowledge the bytes")?;
    let got = u64::from_le_bytes(ack);
    ensure!(got == sent, "sent {sent} bytes, the server counted {got}");
    Ok(got)
}

/// The soak's mixed traffic to `dsts` (same node and cross node) for `secs`: per destination,
/// kept-alive request/response connections (some for the whole run, some renewed every
/// [`mix_plan::RR_RENEW`]), connection churn at [`mix_plan::CHURN_PER_S`], and a bulk burst
/// every [`mix_plan::BULK_EVERY`] (alternating destinations). Prints its counters as one JSON
/// line every [`mix_plan::REPORT_EVERY`] and a last one with `"done": true`. Failures are
/// counted, not fatal: the soak judges them.
pub fn mix(dsts: &[SocketAddr], secs: f64) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    ensure!(!dsts.is_empty(), "at least one destination");
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let c = Arc::new(MixCounters::default());
    let mut threads = Vec::new();
    for &dst in dsts {
        for renew in std::iter::repeat_n(None, mix_plan::RR_LONG).chain(std::iter::repeat_n(
            Some(mix_plan::RR_RENEW),
            mix_plan::RR_RENEWED,
        )) {
            let c = c.clone();
            threads.push(std::thread::spawn(move || {
                let mut first = true;
                while Instant::now() < until {
                    if !first && renew.is_some() {
                        c.renewed.fetch_add(1, Relaxed);
                    }
                    first = false;
                    if rr_connection(dst, until, renew, &c).is_err() {
                        c.rr_failed.fetch_add(1, Relaxed);
                        // Back off before reconnecting.
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }));
        }
        let c = c.clone();
        threads.push(std::thread::spawn(move || {
            let step = Duration::from_secs(1) / mix_plan::CHURN_PER_S;
            let mut next = Instant::now();
            loop {
                pace(&mut next, step, until);
                if Instant::now() >= until {
                    break;
                }
                let once = || -> std::io::Result<()> {
                    let mut s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
                    s.write_all(&[MODE_CRR])?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)?;
                    // The server's FIN: the connection is done when this returns.
                    let _ = s.read(&mut b)?;
                    Ok(())
                };
                match once() {
                    Ok(()) => c.conn_ok.fetch_add(1, Relaxed),
                    Err(_) => c.conn_failed.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    {
        let c = c.clone();
        let dsts = dsts.to_vec();
        threads.push(std::thread::spawn(move || {
            let mut next = Instant::now() + mix_plan::BULK_EVERY / 2;
            for dst in dsts.iter().cycle() {
                pace(&mut next, mix_plan::BULK_EVERY, until);
                let left = until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64();
                if left < mix_plan::BULK_SECS + 1.0 {
                    break;
                }
                match bulk_once(*dst, mix_plan::BULK_SECS) {
                    Ok(bytes) => {
                        c.bulk_ok.fetch_add(1, Relaxed);
                        c.bulk_bytes.fetch_add(bytes, Relaxed);
                    }
                    Err(_) => {
                        c.bulk_failed.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    let mut out = std::io::stdout();
    let mut next = Instant::now() + mix_plan::REPORT_EVERY;
    while Instant::now() < until {
        pace(&mut next, mix_plan::REPORT_EVERY, until);
        writeln!(out, "{}", c.json(start.elapsed().as_secs_f64(), false))?;
        out.flush()?;
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a soak traffic thread panicked"))?;
    }
    writeln!(out, "{}", c.json(start.elapsed().as_secs_f64(), true))?;
    out.flush()?;
    Ok(())
}
