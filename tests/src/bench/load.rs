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
