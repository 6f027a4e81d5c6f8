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
