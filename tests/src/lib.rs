//! Helpers for nodemesh's root integration tests: throw-away network namespaces wired with veth
//! pairs, child cgroups, and a probe process that acts as an application inside a "pod".
//!
//! Everything a helper creates is named `nmt-<pid>-<n>-…` and removed by its guard's `Drop`, so a
//! failing test cleans up too. Nothing is ever attached to the machine's root cgroup.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail, ensure};

pub mod bench;
pub mod chart;
pub mod cluster;
pub mod faults;
pub mod k8s;
pub mod k8s_cluster;
pub mod lab;
pub mod lab_k8s;

pub use k8s::block_on_in_netns;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A unique short prefix for one test's objects (interface names must stay under 16 bytes).
pub fn unique_prefix() -> String {
    format!(
        "nmt{}x{}",
        std::process::id() % 100_000,
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics with instructions unless the test runs as root. Root tests are never silently skipped.
pub fn require_root() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!(
            "this test loads eBPF programs and creates network namespaces and cgroups: it needs \
             root. Run `sudo -E cargo xtask test`."
        );
    }
}

/// Runs a command and fails with its full command line and stderr if it does not succeed.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{cmd}` (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Tunnel settings for an IPv4-only tunnel at `addr`, liveness not checked.
pub fn tunnel_v4(addr: SocketAddr) -> mesh_agent::maps::TunnelSettings {
    let ip4 = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(_) => panic!("tunnel_v4 needs an IPv4 address, got {addr}"),
    };
    mesh_agent::maps::TunnelSettings {
        ip4,
        ip6: None,
        port: addr.port(),
        stale_after: None,
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `setns`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it (and so their peers).
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Connects `a` and `b` with a veth pair and gives each end an address (`ip/prefix`).
pub fn veth(
    a: &NetNs,
    a_if: &str,
    a_addr: &str,
    b: &NetNs,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.exec(&["ip", "addr", "add", addr, "dev", ifname])?;
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A child cgroup of the cgroup v2 hierarchy, removed on drop.
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    pub fn new(name: &str) -> Result<Self> {
        let root = mesh_agent::cgroup::cgroup2_mount()?;
        let path = root.join(name);
        ensure!(path != root, "refusing to use the cgroup root");
        fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // Probe processes have exited and been reaped, so the cgroup is empty.
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("cleanup: cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

/// What the probe reported after a successful connect.
#[derive(Debug)]
pub struct ProbeConnect {
    /// The probe socket's local address (the pod side of the 4-tuple).
    pub local: SocketAddr,
}

/// Runs the probe as an application inside `netns` and `cgroup`: it connects to `dst`, sends
/// `payload` and exits. Returns once the connection is established and the payload written.
pub fn probe_connect(
    cgroup: &Path,
    netns: &NetNs,
    dst: SocketAddr,
    payload: &str,
) -> Result<ProbeConnect> {
    let out = Command::new(env_probe()?)
        .arg(cgroup)
        .arg(netns.path())
        .arg("connect")
        .arg(dst.to_string())
        .arg(payload)
        .output()
        .context("cannot start nm-probe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "probe connect to {dst} from {} failed: {}{}",
            netns.name(),
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let local = stdout
        .lines()
        .find_map(|l| l.strip_prefix("local="))
        .context("probe did not print its local address")?
        .parse()
        .context("probe printed a bad local address")?;
    Ok(ProbeConnect { local })
}

/// Runs the probe as an application inside `netns` and `cgroup` connecting a UDP socket to
/// `dst`; the error carries the probe's message (e.g. "Connection refused").
pub fn probe_udp_connect(cgroup: &Path, netns: &NetNs, dst: SocketAddr) -> Result<()> {
    probe_udp(cgroup, netns, "udp-connect", dst)
}

/// As [`probe_udp_connect`], sending one datagram with `sendto` on an unconnected socket.
pub fn probe_udp_send(cgroup: &Path, netns: &NetNs, dst: SocketAddr) -> Result<()> {
    probe_udp(cgroup, netns, "udp-send", dst)
}

fn probe_udp(cgroup: &Path, netns: &NetNs, verb: &str, dst: SocketAddr) -> Result<()> {
    let out = Command::new(env_probe()?)
        .arg(cgroup)
        .arg(netns.path())
        .arg(verb)
        .arg(dst.to_string())
        .output()
        .context("cannot start nm-probe")?;
    if !out.status.success() {
        bail!(
            "probe {verb} to {dst} failed: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// The `nm-probe` binary (built with this crate's tests).
pub fn probe_exe() -> Result<PathBuf> {
    env_probe()
}

/// The `nm-agent` binary: the node agent (`mesh_agent::cli`), built as a binary of this crate so
/// nextest builds it with the tests (cargo exposes only a package's own binaries to its tests).
pub fn agent_exe() -> Result<PathBuf> {
    own_bin("nm-agent")
}

/// A binary of this crate in `target/<profile>/`: beside the running binary, or one level up
/// from a test executable in `target/<profile>/deps/`.
fn own_bin(name: &str) -> Result<PathBuf> {
    let current = std::env::current_exe()?;
    let mut dir = current.parent().context("no target dir")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("no target dir")?;
    }
    let exe = dir.join(name);
    ensure!(
        exe.is_file(),
        "{name} binary not found at {} (build the tests crate's binaries)",
        exe.display()
    );
    Ok(exe)
}

fn env_probe() -> Result<PathBuf> {
    // Set by cargo for integration tests of this package.
    let exe = option_env!("CARGO_BIN_EXE_nm-probe").map(PathBuf::from);
    let exe = match exe {
        Some(p) => p,
        None => return own_bin("nm-probe"),
    };
    ensure!(
        exe.is_file(),
        "nm-probe binary not found at {}",
        exe.display()
    );
    Ok(exe)
}

/// The node's tunnel addresses in [`Node`] topologies (on the node namespace's `lo`).
pub const TUNNEL_IP4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 77, 1);
pub const TUNNEL_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd77, 0xff, 0, 0, 0, 0, 0, 1);

/// One pod of a [`Node`]: its namespace and addresses.
pub struct Pod {
    pub ns: NetNs,
    pub ip4: std::net::Ipv4Addr,
    pub ip6: std::net::Ipv6Addr,
    /// The node side of the pod's veth (its gateway).
    pub gw4: std::net::Ipv4Addr,
    pub gw6: std::net::Ipv6Addr,
}

/// A node namespace with `n` pods, each on its own veth pair, dual-stack:
/// pod i (from 1) is `10.77.i.2/24` + `fd77:i::2/64`, its gateway `10.77.i.1` + `fd77:i::1`.
/// The tunnel addresses [`TUNNEL_IP4`]/[`TUNNEL_IP6`] are host routes on the node's `lo`.
/// IPv6 duplicate-address detection is off in every namespace so addresses work at once; the
/// node forwards between pods.
pub struct Node {
    pub pods: Vec<Pod>,
    pub ns: NetNs,
}

impl Node {
    pub fn new(prefix: &str, n: u8) -> Result<Self> {
        ensure!((1..=200).contains(&n), "1..=200 pods");
        let ns = NetNs::new(&format!("{prefix}-node"))?;
        no_dad(&ns)?;
        // The node routes between pods.
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            ns.exec(&["sysctl", "-q", "-w", key])?;
        }
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{TUNNEL_IP4}/32"),
            "dev",
            "lo",
        ])?;
        ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{TUNNEL_IP6}/128"),
            "dev",
            "lo",
        ])?;
        let mut pods = Vec::new();
        for i in 1..=n {
            let pod = NetNs::new(&format!("{prefix}-p{i}"))?;
            no_dad(&pod)?;
            let gw4 = std::net::Ipv4Addr::new(10, 77, i, 1);
            let ip4 = std::net::Ipv4Addr::new(10, 77, i, 2);
            let gw6 = std::net::Ipv6Addr::new(0xfd77, u16::from(i), 0, 0, 0, 0, 0, 1);
            let ip6 = std::net::Ipv6Addr::new(0xfd77, u16::from(i), 0, 0, 0, 0, 0, 2);
            veth(
                &ns,
                &format!("v{i}"),
                &format!("{gw4}/24"),
                &pod,
                "eth0",
                &format!("{ip4}/24"),
            )?;
            ns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{gw6}/64"),
                "dev",
                &format!("v{i}"),
                "nodad",
            ])?;
            pod.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            pod.exec(&["ip", "route", "add", "default", "via", &gw4.to_string()])?;
            pod.exec(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw6.to_string(),
            ])?;
            pods.push(Pod {
                ns: pod,
                ip4,
                ip6,
                gw4,
                gw6,
            });
        }
        Ok(Self { pods, ns })
    }

    /// Binds a listener in the node namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<std::net::TcpListener> {
        Ok(mesh_agent::netns::in_netns(&self.ns.path(), move || {
            std::net::TcpListener::bind(addr)
        })?)
    }
}

fn no_dad(ns: &NetNs) -> Result<()> {
    for key in [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ] {
        ns.exec(&["sysctl", "-q", "-w", key])?;
    }
    Ok(())
}

/// Accepts one connection, waiting at most `timeout` (polling; never a blind sleep).
pub fn accept_within(
    listener: &std::net::TcpListener,
    timeout: std::time::Duration,
) -> Result<Option<std::net::TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Accepts a connection that must already be queued (e.g. the probe returned only after its
/// connect completed), or reports that none arrived.
pub fn accept_now(listener: &std::net::TcpListener) -> Result<Option<std::net::TcpStream>> {
    accept_within(listener, std::time::Duration::ZERO)
}

/// A running `nm-probe many` or `serve` process; dropping it closes its stdin (it then exits)
/// and reaps it.
pub struct ManyProbe {
    child: std::process::Child,
}

impl ManyProbe {
    /// Starts listeners on `addrs` inside `netns`, owned by a process in `cgroup`.
    pub fn serve(cgroup: &Path, netns: &NetNs, addrs: &[SocketAddr]) -> Result<Self> {
        let child = Command::new(env_probe()?)
            .arg(cgroup)
            .arg(netns.path())
            .arg("serve")
            .args(addrs.iter().map(ToString::to_string))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot start nm-probe")?;
        Ok(Self { child })
    }

    /// Starts `count` connections from `netns` to `ip`:`first_port..first_port+ports`.
    pub fn start(
        cgroup: &Path,
        netns: &NetNs,
        count: usize,
        ip: std::net::IpAddr,
        first_port: u16,
        ports: u16,
    ) -> Result<Self> {
        let child = Command::new(env_probe()?)
            .arg(cgroup)
            .arg(netns.path())
            .arg("many")
            .arg(count.to_string())
            .arg(ip.to_string())
            .arg(first_port.to_string())
            .arg(ports.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot start nm-probe")?;
        Ok(Self { child })
    }

    /// Waits for the probe's `ready` line (all connections written) or its failure.
    pub fn wait_ready(&mut self) -> Result<()> {
        use std::io::BufRead;
        let out = self.child.stdout.take().context("probe stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        ensure!(line.trim() == "ready", "probe failed: {}", line.trim());
        Ok(())
    }
}

impl Drop for ManyProbe {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            // It exits as soon as stdin closes; wait() reaps it.
            let _ = self.child.wait();
        }
    }
}

/// Connects from inside `netns` to `dst`, from source address `src` when given (port chosen by
/// the kernel), and reads one line. `Ok(None)` when the connect timed out after `timeout` (the
/// SYN was dropped); other failures are errors.
pub fn connect_and_read(
    netns: &NetNs,
    src: Option<std::net::IpAddr>,
    dst: SocketAddr,
    timeout: std::time::Duration,
) -> Result<Option<String>> {
    let r = mesh_agent::netns::in_netns(&netns.path(), move || {
        use std::io::BufRead;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2) call; the result is checked and owned right away.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        // SAFETY: `tv` is valid for reads of its size; connect(2) honours SO_SNDTIMEO.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let with_fd = |addr: SocketAddr,
                       f: unsafe extern "C" fn(
            i32,
            *const libc::sockaddr,
            libc::socklen_t,
        ) -> i32| {
            let (storage, len) = sockaddr(addr);
            // SAFETY: `storage` holds a valid sockaddr of `len` bytes for the socket's family.
            let rc = unsafe { f(fd.as_raw_fd(), (&raw const storage).cast(), len) };
            if rc != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        if let Some(src) = src {
            with_fd(SocketAddr::new(src, 0), libc::bind)?;
        }
        match with_fd(dst, libc::connect) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINPROGRESS) | Some(libc::ETIMEDOUT)
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let stream = std::net::TcpStream::from(fd);
        stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        Ok(Some(line))
    })?;
    Ok(r)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (storage, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (storage, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Runs `f` with this whole test process moved into `cgroup`, then moves it back to the cgroup
/// it came from. Sockets created by `f` belong to `cgroup` for good (a listener's accepted
/// sockets too), which is how a test plays the tunnel process of a given cgroup.
pub fn with_process_in_cgroup<T>(cgroup: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    let original = mesh_agent::cgroup::cgroup2_mount()?.join(rel.trim_start_matches('/'));
    let pid = std::process::id().to_string();
    fs::write(cgroup.join("cgroup.procs"), &pid)
        .with_context(|| format!("cannot move this test into {}", cgroup.display()))?;
    let result = f();
    fs::write(original.join("cgroup.procs"), &pid).with_context(|| {
        format!(
            "cannot move this test back to {} (remove {} by hand)",
            original.display(),
            cgroup.display()
        )
    })?;
    result
}

/// One plain HTTP/1.1 request (empty body, `Connection: close`) sent from inside the network
/// namespace `netns` to `addr`, e.g. an agent's `/metrics`. Returns the status and the body.
pub fn http_in_netns(
    netns: &Path,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = mesh_agent::netns::in_netns(netns, move || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
    })
    .with_context(|| format!("cannot connect to {addr} in {}", netns.display()))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header from {addr}{path}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line from {addr}{path}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Sums every sample of the metric `name` in a Prometheus text exposition whose labels contain
/// each of `labels` (`key="value"` strings).
pub fn metric_sum(exposition: &str, name: &str, labels: &[&str]) -> u64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .map(|v| v as u64)
        .sum()
}
