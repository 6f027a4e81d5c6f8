//! `nm-probe <cgroup-dir> <netns-file> connect <ip:port> <payload>`: acts as an application in a
//! test "pod". It moves itself into the cgroup, enters the network namespace, connects, writes the
//! payload, prints `local=<addr>` and exits 0; on any failure it prints the reason and exits 1.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    net::{SocketAddr, TcpStream},
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

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, netns, verb, dst, payload] = args.as_slice() else {
        return Err("usage: nm-probe <cgroup-dir> <netns-file> connect <ip:port> <payload>".into());
    };
    if verb != "connect" {
        return Err(format!("unknown verb {verb}"));
    }
    let dst: SocketAddr = dst.parse().map_err(|e| format!("bad address {dst}: {e}"))?;
    // Join the cgroup first: the netns switch does not change which cgroup files we can see, but
    // doing it in this order matches how a container runtime places a pod.
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
