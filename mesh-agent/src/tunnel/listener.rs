//! Listening sockets for 15001/15008.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Binds `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), so a new agent can bind beside a
/// draining one during an upgrade and the kernel spreads new connections over both until the
/// old one closes its listener.
///
/// Port 0 is refused: the kernel may give two `SO_REUSEPORT` sockets of the same user the same
/// ephemeral port, and then connections meant for one process are spread over both (parallel
/// test processes reset each other's connections this way). Tests that want a kernel-chosen
/// port use [`bind_exclusive`].
pub fn bind_reuseport(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    if addr.port() == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "refusing to bind {addr} with SO_REUSEPORT on port 0: the kernel may hand the same \
                 ephemeral port to another process of this user and connections would be shared \
                 with it; give a fixed port (or use bind_exclusive for a kernel-chosen one)"
            ),
        ));
    }
    bind(addr, backlog, true)
}

/// Binds `addr` without `SO_REUSEPORT`: no other socket can share the port, so a kernel-chosen
/// port (0) is this process's alone. What tests and one-off listeners use.
pub fn bind_exclusive(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    bind(addr, backlog, false)
}

fn bind(addr: SocketAddr, backlog: u32, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these from the listener (the kernel copies the listener's TCP
    // options into each child), which saves five setsockopt calls per accepted connection.
    set_options(&socket);
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// TCP keepalive on every tunnel socket (HBONE connections also have HTTP/2 PINGs): probes after
/// 180 s idle, every 180 s, 9 probes, as ztunnel. Finds peers that vanished without a FIN
/// (a deleted pod, a rebooted node) so their tasks and sockets are released.
pub const TCP_KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(180);
pub const TCP_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(180);
pub const TCP_KEEPALIVE_RETRIES: u32 = 9;

/// Sets `TCP_NODELAY` (the tunnel forwards what it reads at once; Nagle would add latency to
/// small request/response exchanges) and TCP keepalive. Failures are ignored: both are
/// optimizations, and a socket that cannot take them still carries data.
/// Sockets accepted from listeners of this module have both already ([`bind`] sets them on the
/// listener); this is for sockets the tunnel connects.
pub fn tune(stream: &tokio::net::TcpStream) {
    set_options(&socket2::SockRef::from(stream));
}

fn set_options(socket: &Socket) {
    let _ = socket.set_tcp_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let _ = socket.set_tcp_keepalive(&keepalive);
}

/// Connects to `dst`, from `source` (port chosen by the kernel) when given.
///
/// The port is chosen at `connect`, not at `bind` (`IP_BIND_ADDRESS_NO_PORT`): a port picked by
/// `bind(addr, 0)` is the socket's alone until it is fully closed, whatever the destination, so
/// every delivery of a node — to all its pods, on all their ports — would share one ephemeral
/// range (28,232 ports by default), and the ports of connections the agent closed first stay
/// taken for `TIME_WAIT`'s 60 s: past about 470 such connections per second the node's
/// deliveries failed with `EADDRINUSE`. Chosen at `connect`, a port only has to be unique per
/// destination address and port, as for any client.
pub async fn connect_from(
    dst: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(src) = source.filter(|s| s.is_ipv4() == dst.is_ipv4()) else {
        return tokio::net::TcpStream::connect(dst).await;
    };
    let socket = if dst.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // An IP-level option that IPv6 sockets take too; without it (kernels before 4.2) the bind
    // still works, with the old sharing.
    if let Err(e) = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    ) {
        tracing::debug!(error = %e, "IP_BIND_ADDRESS_NO_PORT not set");
    }
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(dst).await
}

/// What an operator should check when a connection to a local pod failed with `e` (for the
/// access log's `result` and the warning).
pub fn connect_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, ConnectionRefused};
    match e.kind() {
        ConnectionRefused => "is the pod listening on this port?",
        AddrInUse | AddrNotAvailable => {
            "the node has no ephemeral port left toward this pod: see \
             net.ipv4.ip_local_port_range and the sockets in TIME_WAIT (ss -tn state time-wait)"
        }
        _ => "is the pod running, and its network up?",
    }
}

/// A `SO_REUSEPORT` listener on a free port of a loopback address no other test uses, for
/// tests: `127.<second>.<pid % 250 + 1>.<n>`, with `n` new for every call in this process. The
/// port is reserved with an exclusive bind, released, then bound with `SO_REUSEPORT`; a racing
/// bind of the same port fails loudly (EADDRINUSE) and is retried. The address must be fresh:
/// two reuse-port listeners of one process on one address could be handed the same released
/// port and would then share connections (a test's accept waits forever for a connection the
/// other test's listener took).
#[cfg(test)]
pub(crate) fn bind_reuseport_free(second: u8, backlog: u32) -> TcpListener {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 254 + 1;
    let ip = std::net::Ipv4Addr::new(127, second, (std::process::id() % 250) as u8 + 1, n);
    for _ in 0..50 {
        let port = bind_exclusive(SocketAddr::from((ip, 0)), 1)
            .and_then(|l| l.local_addr())
            .expect("reserve a port")
            .port();
        if let Ok(l) = bind_reuseport(SocketAddr::from((ip, port)), backlog) {
            return l;
        }
    }
    panic!("no free port on {ip} after 50 tries");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hint names the likely cause: a pod not listening, or the node out of ports.
    #[test]
    fn connect_failures_get_a_hint_for_their_cause() {
        use std::io::{Error, ErrorKind};
        let refused = connect_hint(&Error::from(ErrorKind::ConnectionRefused));
        assert!(refused.contains("listening"), "{refused}");
        for kind in [ErrorKind::AddrInUse, ErrorKind::AddrNotAvailable] {
            let hint = connect_hint(&Error::from(kind));
            assert!(hint.contains("ip_local_port_range"), "{kind:?}: {hint}");
        }
    }

    /// A connection from a given source address took its port at `connect`.
    #[tokio::test]
    async fn a_connection_from_a_source_address_takes_its_port_at_connect() {
        let listener = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 4).expect("bind");
        let dst = listener.local_addr().expect("addr");
        let stream = connect_from(dst, Some("127.0.0.1".parse().expect("ip")))
            .await
            .expect("connect");
        let deferred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::IpBindAddressNoPort)
                .expect("getsockopt");
        assert!(deferred, "IP_BIND_ADDRESS_NO_PORT was not set");
    }

    async fn reuseport_pair() -> (TcpListener, TcpListener) {
        let a = bind_reuseport_free(23, 16);
        let addr = a.local_addr().expect("addr");
        let b = bind_reuseport(addr, 16).expect("second agent binds beside the first");
        (a, b)
    }

    /// Accepted sockets get `TCP_NODELAY` and the keepalive settings from the listener, so the
    /// accept paths do not set them again.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        // The pair's second listener is closed first: with both open, the kernel would give it
        // half the connections and the accept below would wait for one it never gets.
        let (reuse, other) = reuseport_pair().await;
        drop(other);
        for listener in [
            bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("bind"),
            reuse,
        ] {
            let addr = listener.local_addr().expect("addr");
            let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (accepted, _) = listener.accept().await.expect("accept");
            assert!(
                !client.nodelay().expect("nodelay"),
                "the client sets nothing"
            );
            assert!(accepted.nodelay().expect("nodelay"), "{addr}: TCP_NODELAY");
            let sock = socket2::SockRef::from(&accepted);
            assert!(sock.keepalive().expect("keepalive"), "{addr}: SO_KEEPALIVE");
            assert_eq!(sock.tcp_keepalive_time().expect("idle"), TCP_KEEPALIVE_IDLE);
            assert_eq!(
                sock.tcp_keepalive_interval().expect("interval"),
                TCP_KEEPALIVE_INTERVAL
            );
            assert_eq!(
                sock.tcp_keepalive_retries().expect("retries"),
                TCP_KEEPALIVE_RETRIES
            );
        }
    }

    #[tokio::test]
    async fn two_listeners_share_a_port() {
        let (a, b) = reuseport_pair().await;
        assert_eq!(a.local_addr().expect("addr"), b.local_addr().expect("addr"));
    }

    /// The guard: a reuse-port listener on port 0 is refused, so a test that tries fails.
    #[test]
    fn reuseport_on_port_zero_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _enter = rt.enter();
        for addr in ["127.0.0.1:0", "[::1]:0", "0.0.0.0:0"] {
            let err = bind_reuseport(addr.parse().expect("addr"), 16)
                .expect_err("SO_REUSEPORT on port 0 must be refused");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::InvalidInput,
                "{addr}: {err}"
            );
            assert!(err.to_string().contains("port 0"), "{err}");
        }
        let l = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("exclusive");
        assert_ne!(l.local_addr().expect("addr").port(), 0);
    }
}
