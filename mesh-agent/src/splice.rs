//! The same-node splice, kernel side: the tunnel's two sockets of an authorized same-node
//! connection (the accepted app socket and its socket to the destination pod) go into the
//! `NM_SPLICE_SOCK` sockhash and are linked to each other in `NM_SPLICE_LINK`; the
//! `mesh_splice_verdict` stream-verdict program then hands every segment either socket receives
//! to the other's send side, so the payload never reaches user space.
//!
//! The tunnel drives a spliced pair through [`crate::tunnel::splice`] (half-close, policy
//! revocation, drain); this module owns the maps and the kernel facts:
//!
//! - Data that reached a socket *before* it entered the sockhash sits in its receive queue and
//!   would only be redirected when the next segment arrives. A `recv` on a sockhash socket runs
//!   the verdict over a non-empty receive queue first (`tcp_bpf_recvmsg_parser`), so
//!   [`SockSplice::splice`] ends with a non-consuming `recv(MSG_PEEK | MSG_DONTWAIT)` on both
//!   sockets: the early bytes go out in order, ahead of anything that arrives later.
//! - The redirect is asynchronous (the kernel's psock work queue sends), so "the app closed its
//!   side" does not mean "every byte it sent has reached the pod's socket". Before the tunnel
//!   half-closes the other socket it waits until the bytes the verdict took from one socket
//!   have entered the other's send queue ([`bytes_queued`]: `tcpi_bytes_acked` + `SIOCOUTQ`,
//!   counted from its value before the splice, since a connecting socket's count starts at 1:
//!   its SYN was acknowledged).
//! - A FIN that arrives on its own (after its bytes were redirected) is an empty segment; the
//!   verdict drops it. Redirected, the peer's psock worker would "send" zero bytes, which the
//!   kernel takes as a broken pipe: EPIPE on the peer socket and its redirects stopped.
//! - The maps are not pinned: they hold this agent's sockets, which die with it.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{HashMap, MapData, MapError, SockHash},
    programs::sk_skb::SkSkbLink,
};
use mesh_common::{SpliceCtl, SpliceLink, maps};

/// Redirect credit per direction: the most bytes the kernel's splice queue may hold for a peer
/// that does not keep up (it has no backpressure of its own). When a direction runs out, the
/// program leaves segments on the socket (its receive buffer fills and TCP's window stops the
/// sender); the tunnel forwards them once the queue has drained and grants a new window.
pub const SPLICE_WINDOW: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("cannot read the socket cookie (SO_COOKIE): {0}")]
    Cookie(#[source] std::io::Error),
    /// The kernel splices established sockets only: one side already closed (its peer's FIN
    /// arrived before the splice, as with a request written and half-closed at once). Normal
    /// for short connections; the copy carries them.
    #[error(
        "the {side} socket is no longer established (its peer already closed its side); this \
         connection is copied in user space"
    )]
    Closing { side: &'static str },
    #[error(
        "eBPF map {name} refused the connection ({source}): full (more than {cap} spliced sockets) \
         or the socket cannot be spliced; this connection is copied in user space"
    )]
    Map {
        name: &'static str,
        cap: u32,
        #[source]
        source: MapError,
    },
}

struct Maps {
    socks: SockHash<MapData, u64>,
    links: HashMap<MapData, u64, SpliceLink>,
    ctl: HashMap<MapData, u64, SpliceCtl>,
}

struct Inner {
    maps: Mutex<Maps>,
    /// Keeps the verdict program attached to the sockhash.
    _verdict: SkSkbLink,
}

/// Handle to the splice maps and program ([`crate::datapath::Datapath::splicer`]). Clone freely.
#[derive(Clone)]
pub struct SockSplice {
    inner: Arc<Inner>,
}

impl SockSplice {
    pub(crate) fn new(
        socks: SockHash<MapData, u64>,
        links: HashMap<MapData, u64, SpliceLink>,
        ctl: HashMap<MapData, u64, SpliceCtl>,
        verdict: SkSkbLink,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                maps: Mutex::new(Maps { socks, links, ctl }),
                _verdict: verdict,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.inner
            .maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Splices `a` and `b` (connected TCP sockets of this process; the tunnel passes the app's
    /// socket and the pod's, which errors name so): from now on what either
    /// receives is sent by the other, in the kernel. Undone when the returned [`Spliced`] drops
    /// (drop it before closing the sockets' last descriptor, or right after: the kernel removes
    /// closed sockets from the sockhash itself). On an error nothing is left behind and the
    /// sockets are as they were.
    pub fn splice(&self, a: &impl AsFd, b: &impl AsFd) -> Result<Spliced, SpliceError> {
        let ca = socket_cookie(a).map_err(SpliceError::Cookie)?;
        let cb = socket_cookie(b).map_err(SpliceError::Cookie)?;
        let spliced = Spliced {
            a: ca,
            b: cb,
            splice: self.clone(),
        };
        {
            let mut m = self.lock();
            let link_err = |source| SpliceError::Map {
                name: maps::SPLICE_LINKS,
                cap: mesh_common::MAX_SPLICED_SOCKETS,
                source,
            };
            // EOPNOTSUPP: the kernel takes established TCP sockets only; this one's peer has
            // already closed its side (what is inserted so far is removed with `spliced`).
            let sock_err = |side: &'static str| {
                move |source: MapError| match &source {
                    MapError::SyscallError(e)
                        if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                    {
                        SpliceError::Closing { side }
                    }
                    _ => SpliceError::Map {
                        name: maps::SPLICE_SOCKS,
                        cap: mesh_common::MAX_SPLICED_SOCKETS,
                        source,
                    },
                }
            };
            let ctl_err = |source| SpliceError::Map {
                name: maps::SPLICE_CTL,
                cap: mesh_common::MAX_SPLICED_SOCKETS,
                source,
            };
            let first = SpliceCtl {
                allowed: SPLICE_WINDOW,
                consumed: 0,
            };
            m.ctl.insert(ca, first, 0).map_err(ctl_err)?;
            m.ctl.insert(cb, first, 0).map_err(ctl_err)?;
            // Links first: a socket in the sockhash without a link keeps its data (the verdict
            // passes it), so there is no moment where a segment could be lost.
            m.links
                .insert(
                    ca,
                    SpliceLink {
                        peer_cookie: cb,
                        bytes: 0,
                        passed: 0,
                    },
                    0,
                )
                .map_err(link_err)?;
            m.links
                .insert(
                    cb,
                    SpliceLink {
                        peer_cookie: ca,
                        bytes: 0,
                        passed: 0,
                    },
                    0,
                )
                .map_err(link_err)?;
            m.socks
                .insert(cb, b.as_fd().as_raw_fd(), 0)
                .map_err(sock_err("pod"))?;
            m.socks
                .insert(ca, a.as_fd().as_raw_fd(), 0)
                .map_err(sock_err("app"))?;
        }
        // Bytes that arrived before the sockets entered the map: run the verdict over them now
        // (see the module docs). Not consuming: a byte the verdict kept stays readable.
        kick(a);
        kick(b);
        Ok(spliced)
    }
}

/// A spliced pair; dropping it unsplices (links removed first, then the sockets).
pub struct Spliced {
    a: u64,
    b: u64,
    splice: SockSplice,
}

impl Spliced {
    /// Bytes the kernel redirected `a → b` and `b → a` so far (not counting what it left to
    /// the tunnel: see [`SpliceCtl`]).
    pub fn bytes(&self) -> (u64, u64) {
        let m = self.splice.lock();
        let get = |k: u64| m.links.get(&k, 0).map(|l| l.bytes).unwrap_or(0);
        (get(self.a), get(self.b))
    }

    /// Bytes the kernel left on `a` and on `b` for the tunnel (flow control) so far.
    pub fn passed(&self) -> (u64, u64) {
        let m = self.splice.lock();
        let get = |k: u64| m.links.get(&k, 0).map(|l| l.passed).unwrap_or(0);
        (get(self.a), get(self.b))
    }

    /// Grants `a` (`from_a`) or `b` redirect credit up to `allowed` redirected bytes and
    /// records that the tunnel has forwarded `consumed` bytes the program left on it.
    pub fn grant(&self, from_a: bool, allowed: u64, consumed: u64) -> Result<(), SpliceError> {
        let key = if from_a { self.a } else { self.b };
        self.splice
            .lock()
            .ctl
            .insert(key, SpliceCtl { allowed, consumed }, 0)
            .map_err(|source| SpliceError::Map {
                name: maps::SPLICE_CTL,
                cap: mesh_common::MAX_SPLICED_SOCKETS,
                source,
            })
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        let mut m = self.splice.lock();
        for k in [self.a, self.b] {
            let _ = m.links.remove(&k);
        }
        for k in [self.a, self.b] {
            let _ = m.ctl.remove(&k);
        }
        for k in [self.a, self.b] {
            let _ = m.socks.remove(&k);
        }
    }
}

/// `SO_COOKIE`: the socket's kernel cookie (what `bpf_get_socket_cookie` returns).
pub fn socket_cookie(s: &impl AsFd) -> std::io::Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on a descriptor borrowed for the call, writing at most `len` bytes
    // into `cookie`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A non-consuming, non-blocking `recv` (see the module docs); its result does not matter.
fn kick(s: &impl AsFd) {
    let mut byte = 0u8;
    // SAFETY: recv into a one-byte buffer that lives across the call, on a borrowed descriptor.
    let _ = unsafe {
        libc::recv(
            s.as_fd().as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
}

/// Bytes ever written into a TCP socket's send queue: acknowledged (`tcpi_bytes_acked`) plus
/// still queued (`SIOCOUTQ`: sent but unacknowledged, and not sent yet). Read in that order, so
/// an acknowledgement between the two reads can only make the sum smaller, never larger.
/// `tcpi_bytes_acked` counts sequence space: a socket that connected starts at 1 (its SYN), and
/// a FIN, once acknowledged, adds 1; compare against a value read before the bytes of interest.
pub fn bytes_queued(s: &impl AsFd) -> std::io::Result<u64> {
    let acked = tcp_info(s)?.tcpi_bytes_acked;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int into `outq`, which lives across the call.
    let rc = unsafe { libc::ioctl(s.as_fd().as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(outq).unwrap_or(0))
}

/// `TCP_INFO` of a socket.
pub fn tcp_info(s: &impl AsFd) -> std::io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; all zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::bytes_queued;

    /// The kernel fact the tunnel's flush waits rely on: `bytes_queued` counts sequence space,
    /// so the connecting end starts at 1 (its SYN was acknowledged) and the accepting end at 0;
    /// written bytes add to both as they enter the send queue.
    #[test]
    fn a_connected_socket_counts_its_syn_and_an_accepted_one_does_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut connected =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut accepted, _) = listener.accept().expect("accept");
        assert_eq!(bytes_queued(&connected).expect("connected"), 1);
        assert_eq!(bytes_queued(&accepted).expect("accepted"), 0);
        connected.write_all(b"four").expect("write");
        accepted.write_all(b"seven!!").expect("write");
        let mut got = [0u8; 7];
        connected.read_exact(&mut got).expect("read");
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).expect("read");
        assert_eq!(bytes_queued(&connected).expect("connected"), 1 + 4);
        assert_eq!(bytes_queued(&accepted).expect("accepted"), 7);
    }
}
