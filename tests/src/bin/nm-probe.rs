//! Acts as an application in a test "pod". It moves itself into the cgroup, enters the network
//! namespace, then:
//!
//! - `nm-probe <cgroup-dir> <netns-file> connect <ip:port> <payload>`: connects, writes the
//!   payload, prints `local=<addr>` and exits 0.
//! - `nm-probe <cgroup-dir> <netns-file> many <count> <ip> <first-port> <ports>`: opens `count`
//!   connections to `<ip>:<first-port + i % ports>` and keeps them all open; on each it writes its
//!   destination and a newline. Prints `ready` once all are written, then exits when stdin closes.
//! - `nm-probe <cgroup-dir> <netns-file> serve <ip:port>...`: listens on every address (so the
//!   listening sockets belong to the pod's cgroup), prints `ready`, writes `ok\n` to every
//!   connection it accepts, and exits when stdin closes.
//!
//! - `nm-probe <cgroup-dir> <netns-file> udp-connect <ip:port>`: connects a UDP socket (no
//!   packet is sent) and prints `local=<addr>`.
//! - `nm-probe <cgroup-dir> <netns-file> udp-send <ip:port>`: sends one datagram with `sendto`
//!   from an unconnected UDP socket and prints `local=<addr>`.
//! - `nm-probe <cgroup-dir> <netns-file> time-refused <count> <ip:port>`: times `count` TCP
//!   connects that must each fail with ECONNREFUSED and prints `p50_ns=… p99_ns=… max_ns=…`.
//! - `nm-probe <cgroup-dir> <netns-file> echo <ip:port>`: listens, prints `ready`, then for each
//!   accepted connection prints `peer=<addr>` and echoes every byte back until the peer's EOF.
//!   Exits when stdin closes (with `--forever` after it: runs until killed, for the lab).
//! - `nm-probe <cgroup-dir> <netns-file> roundtrip <ip:port> <payload>`: connects, writes the
//!   payload, half-closes, reads until EOF and exits 0 only if it read back exactly the payload
//!   (prints `local=<addr>`).
//! - `nm-probe <cgroup-dir> <netns-file> exec <program> [args...]`: runs the program in the
//!   cgroup and namespace (replacing the probe).
//!
//! On any failure it prints the reason and exits 1.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsFd,
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: nm-probe <cgroup-dir> <netns-file> connect <ip:port> <payload> | \
                     many <count> <ip> <first-port> <ports> | serve <ip:port>... | \
                     udp-connect <ip:port> | udp-send <ip:port> | time-refused <count> <ip:port>";

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, netns, verb, rest @ ..] = args.as_slice() else {
        return Err(USAGE.into());
    };
    // Join the cgroup first: `ip netns exec`-style sysfs remounts would hide it, and this order
    // matches how a container runtime places a pod.
    let mut procs = OpenOptions::new()
        .write(true)
        .open(format!("{cgroup}/cgroup.procs"))
        .map_err(|e| format!("open {cgroup}/cgroup.procs: {e}"))?;
    procs
        .write_all(b"0")
        .map_err(|e| format!("join cgroup {cgroup}: {e}"))?;
    let ns = File::open(netns).map_err(|e| format!("open {netns}: {e}"))?;
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {netns}: {e}"))?;
    match (verb.as_str(), rest) {
        ("connect", [dst, payload]) => connect(dst, payload),
        ("many", [count, ip, first, ports]) => many(count, ip, first, ports),
        ("serve", addrs) if !addrs.is_empty() => serve(addrs),
        ("udp-connect", [dst]) => udp_connect(dst),
        ("udp-send", [dst]) => udp_send(dst),
        ("time-refused", [count, dst]) => time_refused(count, dst),
        ("echo", [addr]) => echo(addr, false),
        ("echo", [addr, flag]) if flag == "--forever" => echo(addr, true),
        ("roundtrip", [dst, payload]) => roundtrip(dst, payload),
        ("exec", [program, args @ ..]) => {
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new(program).args(args).exec();
            Err(format!("exec {program}: {e}"))
        }
        _ => Err(USAGE.into()),
    }
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| format!("bad {what} {s}: {e}"))
}

fn connect(dst: &str, payload: &str) -> Result<(), String> {
    let dst: SocketAddr = parse("address", dst)?;
    let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        .map_err(|e| format!("connect {dst}: {e}"))?;
    stream
        .write_all(payload.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    println!("local={local}");
    Ok(())
}

fn echo(addr: &str, forever: bool) -> Result<(), String> {
    let addr: SocketAddr = parse("address", addr)?;
    // std listens with a backlog of 128; a server that takes bursts of hundreds of connections
    // (the fault suite opens 500 at a time, and the sharded tunnel delivers them from two
    // threads at once) listens deeper, as nginx (511) or Go (somaxconn) do. With 128 and this
    // accept loop spawning a thread per connection, SYNs were dropped and some of the tunnel's
    // connects to this pod outlasted its 10 s connect timeout.
    let listener = listen_deep(addr, 4096).map_err(|e| format!("listen on {addr}: {e}"))?;
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            if let Ok(peer) = conn.peer_addr() {
                println!("peer={peer}");
                let _ = std::io::stdout().flush();
            }
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    println!("ready");
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))?;
    if forever {
        loop {
            std::thread::park();
        }
    }
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

fn roundtrip(dst: &str, payload: &str) -> Result<(), String> {
    let dst: SocketAddr = parse("address", dst)?;
    let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        .map_err(|e| format!("connect {dst}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    println!("local={local}");
    stream
        .write_all(payload.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    stream
        .read_to_end(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back != payload.as_bytes() {
        return Err(format!(
            "echo mismatch: sent {} bytes, got {} bytes back: {:?}",
            payload.len(),
            back.len(),
            String::from_utf8_lossy(&back)
        ));
    }
    println!("echoed={}", back.len());
    Ok(())
}

fn many(count: &str, ip: &str, first: &str, ports: &str) -> Result<(), String> {
    let count: usize = parse("count", count)?;
    let ip: IpAddr = parse("address", ip)?;
    let first: u16 = parse("port", first)?;
    let ports: u16 = parse("port count", ports)?;
    let mut open = Vec::with_capacity(count);
    for i in 0..count {
        let port = first + (i % usize::from(ports.max(1))) as u16;
        let dst = SocketAddr::new(ip, port);
        let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .map_err(|e| format!("connect #{i} {dst}: {e}"))?;
        stream
            .write_all(format!("{dst}\n").as_bytes())
            .map_err(|e| format!("write #{i}: {e}"))?;
        open.push(stream);
    }
    println!("ready");
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))?;
    // Hold every connection open until the test is done with them.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(open);
    Ok(())
}

fn serve(addrs: &[String]) -> Result<(), String> {
    for addr in addrs {
        let addr: SocketAddr = parse("address", addr)?;
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(b"ok\n");
            }
        });
    }
    println!("ready");
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

fn udp_socket(dst: SocketAddr) -> Result<std::net::UdpSocket, String> {
    let any: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?
    } else {
        "[::]:0".parse().map_err(|e| format!("{e}"))?
    };
    std::net::UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))
}

fn udp_send(dst: &str) -> Result<(), String> {
    let dst: SocketAddr = parse("address", dst)?;
    let sock = udp_socket(dst)?;
    sock.send_to(b"x", dst)
        .map_err(|e| format!("udp sendto {dst}: {e}"))?;
    let local = sock.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    println!("local={local}");
    Ok(())
}

fn udp_connect(dst: &str) -> Result<(), String> {
    let dst: SocketAddr = parse("address", dst)?;
    let sock = udp_socket(dst)?;
    sock.connect(dst)
        .map_err(|e| format!("udp connect {dst}: {e}"))?;
    let local = sock.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    println!("local={local}");
    Ok(())
}

fn time_refused(count: &str, dst: &str) -> Result<(), String> {
    let count: usize = parse("count", count)?;
    let dst: SocketAddr = parse("address", dst)?;
    let mut ns = Vec::with_capacity(count);
    for i in 0..count {
        let start = std::time::Instant::now();
        let r = TcpStream::connect(dst);
        let took = start.elapsed();
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(format!("connect #{i} {dst}: {e}")),
            Ok(_) => return Err(format!("connect #{i} {dst} succeeded")),
        }
        ns.push(took.as_nanos());
    }
    ns.sort_unstable();
    let at = |q: usize| {
        ns.get((ns.len() * q / 100).min(ns.len().saturating_sub(1)))
            .copied()
    };
    println!(
        "p50_ns={} p99_ns={} max_ns={}",
        at(50).unwrap_or(0),
        at(99).unwrap_or(0),
        ns.last().copied().unwrap_or(0)
    );
    Ok(())
}

/// A listener on `addr` with `backlog` (std's `bind` fixes it at 128), `SO_REUSEADDR` as std sets.
fn listen_deep(addr: SocketAddr, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}
