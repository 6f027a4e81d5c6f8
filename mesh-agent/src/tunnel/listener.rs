//! Listening sockets for 15001/15008.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Binds `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), so a new agent can bind beside a
/// draining one during an upgrade and the kernel spreads new connections over both until the
/// old one closes its listener.
pub fn bind_reuseport(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
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
pub fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Connects to `dst`, from `source` (port chosen by the kernel) when given.
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
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(dst).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_listeners_share_a_port() {
        let a = bind_reuseport("127.0.0.1:0".parse().expect("addr"), 16).expect("first");
        let addr = a.local_addr().expect("addr");
        let b = bind_reuseport(addr, 16).expect("second agent binds beside the first");
        assert_eq!(b.local_addr().expect("addr"), addr);
    }
}
