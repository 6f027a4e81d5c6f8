//! Copying between a TCP socket and an HTTP/2 stream, both ways, with half-close.
//!
//! TCP → h2: reads into one buffer (16 KiB at first, doubling while reads fill it, up to
//! `buffer_size`), hands the filled part to h2 as a
//! `Bytes` (no copy) and sends only as much as the peer's flow-control window allows; when h2
//! has released the previous chunk, the buffer's memory is reused (`BytesMut::reserve` reclaims
//! a uniquely owned allocation), so steady state does not allocate per chunk. TCP EOF becomes
//! END_STREAM.
//!
//! h2 → TCP: writes each received `Bytes` as is and releases flow-control capacity only after
//! the write, so a slow pod pushes back on the sender. END_STREAM becomes a TCP write shutdown
//! (FIN). The copy ends when both directions have ended; an error in either ends both.

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Side;

/// Reads smaller than this trigger a refill of the buffer (avoids tiny reads at its end).
const MIN_READ_SPACE: usize = 16 * 1024;
/// The TCP → h2 buffer starts at this size and doubles while reads fill it, up to the
/// configured `copy_buffer_size`: a request/response or idle connection holds 16 KiB instead of
/// 256 KiB, and only bulk streams reach the size that is served by its own `mmap`.
const FIRST_BUFFER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{side} TCP read failed: {source}")]
    TcpRead {
        side: Side,
        #[source]
        source: std::io::Error,
    },
    #[error("{side} TCP write failed: {source}")]
    TcpWrite {
        side: Side,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 stream failed ({side}): {source}")]
    Stream {
        side: Side,
        #[source]
        source: h2::Error,
    },
    #[error("HTTP/2 stream closed by the {side} before the data was sent")]
    StreamClosed { side: Side },
}

impl CopyError {
    pub fn side(&self) -> Side {
        match self {
            CopyError::TcpRead { side, .. }
            | CopyError::TcpWrite { side, .. }
            | CopyError::Stream { side, .. }
            | CopyError::StreamClosed { side } => *side,
        }
    }
}

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// TCP → h2.
    pub tcp_to_stream: u64,
    /// h2 → TCP.
    pub stream_to_tcp: u64,
}

async fn tcp_to_stream<R: AsyncRead + Unpin>(
    mut tcp: R,
    mut send: SendStream<Bytes>,
    buffer_size: usize,
    tcp_side: Side,
    stream_side: Side,
    counter: &std::sync::atomic::AtomicU64,
) -> Result<(), CopyError> {
    let max_buffer = buffer_size.max(FIRST_BUFFER);
    let mut target = FIRST_BUFFER;
    let mut buf = BytesMut::with_capacity(target);
    loop {
        if buf.capacity() - buf.len() < MIN_READ_SPACE {
            buf.reserve(target);
        }
        let space = buf.capacity() - buf.len();
        let n = tcp
            .read_buf(&mut buf)
            .await
            .map_err(|source| CopyError::TcpRead {
                side: tcp_side,
                source,
            })?;
        if n == space && target < max_buffer {
            target = (target * 2).min(max_buffer);
        }
        if n == 0 {
            send.send_data(Bytes::new(), true)
                .map_err(|source| CopyError::Stream {
                    side: stream_side,
                    source,
                })?;
            return Ok(());
        }
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(cap)) => cap,
                Some(Err(source)) => {
                    return Err(CopyError::Stream {
                        side: stream_side,
                        source,
                    });
                }
                None => return Err(CopyError::StreamClosed { side: stream_side }),
            };
            if cap == 0 {
                continue;
            }
            let part = chunk.split_to(cap.min(chunk.len()));
            send.send_data(part, false)
                .map_err(|source| CopyError::Stream {
                    side: stream_side,
                    source,
                })?;
        }
    }
}

async fn stream_to_tcp<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    mut tcp: W,
    tcp_side: Side,
    stream_side: Side,
    counter: &std::sync::atomic::AtomicU64,
) -> Result<(), CopyError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|source| CopyError::Stream {
            side: stream_side,
            source,
        })?;
        let n = chunk.len();
        tcp.write_all(&chunk)
            .await
            .map_err(|source| CopyError::TcpWrite {
                side: tcp_side,
                source,
            })?;
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        recv.flow_control()
            .release_capacity(n)
            .map_err(|source| CopyError::Stream {
                side: stream_side,
                source,
            })?;
    }
    tcp.shutdown().await.map_err(|source| CopyError::TcpWrite {
        side: tcp_side,
        source,
    })
}

/// Live byte counters of one copy (readable while it runs, e.g. when it is cancelled).
#[derive(Debug, Default)]
pub struct Counters {
    pub tcp_to_stream: std::sync::atomic::AtomicU64,
    pub stream_to_tcp: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Transferred {
        use std::sync::atomic::Ordering::Relaxed;
        Transferred {
            tcp_to_stream: self.tcp_to_stream.load(Relaxed),
            stream_to_tcp: self.stream_to_tcp.load(Relaxed),
        }
    }
}

/// Copies both ways until both directions end. `tcp_side` and `stream_side` name the peers for
/// errors (outbound: the app is downstream, the stream upstream; inbound the reverse).
pub async fn bidirectional(
    tcp: &mut tokio::net::TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    buffer_size: usize,
    tcp_side: Side,
    stream_side: Side,
    counters: &Counters,
) -> Result<Transferred, CopyError> {
    let (r, w) = tcp.split();
    tokio::try_join!(
        tcp_to_stream(
            r,
            send,
            buffer_size,
            tcp_side,
            stream_side,
            &counters.tcp_to_stream
        ),
        stream_to_tcp(recv, w, tcp_side, stream_side, &counters.stream_to_tcp),
    )?;
    Ok(counters.snapshot())
}

/// First buffer of a same-node copy direction; it doubles while reads fill it, up to the
/// configured `copy_buffer_size`. Request/response traffic never grows it.
const SAME_NODE_FIRST_BUFFER: usize = 16 * 1024;

/// Copies app ↔ pod on one node until both directions end (a read EOF shuts the other side's
/// write). Unlike `tokio::io::copy_bidirectional_with_sizes`, whose buffers are zeroed
/// allocations of the full size per connection (two 256 KiB `memset`s were 22% of the agent's
/// CPU in the connection-rate benchmark), the buffers are uninitialised `BytesMut`s that start
/// small and grow only for bulk transfers. A direction whose reads fill the largest buffer is
/// bulk: it continues through a pipe with `splice(2)` (see [`pipe_pump`]), so its payload is
/// no longer copied through user space. Byte counts stay readable if the copy is cancelled.
pub(super) async fn same_node_copy(
    app: &mut tokio::net::TcpStream,
    pod: &mut tokio::net::TcpStream,
    max_buffer: usize,
    counters: &Counters,
) -> std::io::Result<()> {
    let (app_r, app_w) = app.split();
    let (pod_r, pod_w) = pod.split();
    tokio::try_join!(
        pump(app_r, pod_w, max_buffer, &PIPES, &counters.tcp_to_stream),
        pump(pod_r, app_w, max_buffer, &PIPES, &counters.stream_to_tcp),
    )?;
    Ok(())
}

/// How a same-node direction ended up moving its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    /// Read into and written from a user-space buffer (request/response, short transfers).
    Buffered,
    /// Bulk: after the buffer had grown to its largest, through a pipe with `splice(2)`.
    Piped,
}

/// One same-node direction `from` → `to` until `from`'s EOF, which half-closes `to`. The
/// buffered part goes through tokio's `AsyncRead`/`AsyncWrite` on purpose: they drop a
/// socket's readiness after a short read or write, so a request/response exchange does not
/// pay a read that can only return `EAGAIN` (with `readable()` + `try_read` instead, a
/// same-node 1-byte round trip measured 88–93 µs p50 in six runs against 53–89 µs). A bulk
/// direction takes its pipe from `pipes` ([`PIPES`] in the agent).
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    max_buffer: usize,
    pipes: &'static PipeBudget,
    counter: &std::sync::atomic::AtomicU64,
) -> std::io::Result<Moved> {
    let max_buffer = max_buffer.max(SAME_NODE_FIRST_BUFFER);
    let mut buf = BytesMut::with_capacity(SAME_NODE_FIRST_BUFFER);
    let mut pipe_refused = false;
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(Moved::Buffered);
        }
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if n == buf.capacity() {
            if n >= max_buffer {
                if pipe_refused {
                    continue;
                }
                match KernelPipe::new(pipes) {
                    Ok(pipe) => {
                        drop(buf);
                        pipe_pump(from.as_ref(), to.as_ref(), &pipe, counter).await?;
                        to.shutdown().await?;
                        return Ok(Moved::Piped);
                    }
                    Err(e) => {
                        // Out of pipes or descriptors: this direction stays in user space.
                        pipe_refused = true;
                        tracing::debug!(
                            error = %e,
                            "no pipe for a bulk same-node copy: copying in user space"
                        );
                    }
                }
            } else {
                buf.clear();
                buf.reserve((n * 2).min(max_buffer));
            }
        }
    }
}

/// What a piped direction moves per `splice(2)` call, and its pipe's size: 1 MiB (the default
/// `pipe-max-size`) cost 0.30–0.33 agent CPU-s per GB with four flows against 0.51–0.54 with
/// 256 KiB pipes (paired labs; performance.md). At most this much is in the pipe between the
/// two sockets' own buffers.
const PIPE_SIZE: usize = 1 << 20;

/// At most this many same-node directions move through a pipe at once (two descriptors each);
/// past it a bulk direction stays in user space. It keeps the descriptors the pipes take
/// bounded beside the sockets the connection limits allow (HAProxy bounds its splice pipes the
/// same way, `maxpipes`).
const MAX_PIPES: usize = 4096;
/// The agent's pipes (every same-node copy draws on it).
static PIPES: PipeBudget = PipeBudget::new(MAX_PIPES);

/// How many pipes may exist at once, and how many do.
struct PipeBudget {
    max: usize,
    in_use: std::sync::atomic::AtomicUsize,
}

impl PipeBudget {
    const fn new(max: usize) -> Self {
        Self {
            max,
            in_use: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Takes a slot, or says the budget is spent.
    fn take(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map(drop)
            .map_err(|_| std::io::Error::other(format!("all {} pipes in use", self.max)))
    }

    fn release(&self) {
        self.in_use
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A pipe for moving a bulk same-node direction with `splice(2)`: both ends non-blocking
/// (readiness comes from the sockets; the pipe is always emptied before the next fill). Holds
/// a slot of its [`PipeBudget`] until dropped.
struct KernelPipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    budget: &'static PipeBudget,
}

impl KernelPipe {
    fn new(budget: &'static PipeBudget) -> std::io::Result<Self> {
        use nix::fcntl::{FcntlArg, OFlag};
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Past the cap the new ends close here (once per direction: the caller stays buffered).
        budget.take()?;
        // Best effort: a pipe holds 64 KiB by default, and an agent without CAP_SYS_RESOURCE
        // over its user's pipe quota gets no more; the pipe then moves smaller chunks.
        let size = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        if let Err(e) = nix::fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(size)) {
            tracing::debug!(error = %e, size, "pipe size not raised");
        }
        Ok(Self {
            read,
            write,
            budget,
        })
    }
}

impl Drop for KernelPipe {
    fn drop(&mut self) {
        self.budget.release();
    }
}

/// Moves one direction `from` → `to` through `pipe` with `splice(2)` until `from`'s EOF (the
/// caller then half-closes `to`, as after the user-space copy): the kernel hands the received
/// segments' pages to the pipe and on to the other socket's send queue, so payload is not
/// copied through user space. Backpressure stays TCP's: the pipe is emptied into `to` before
/// the next fill, so at most one pipe's worth ([`PIPE_SIZE`]) is between the two sockets.
/// Bytes are counted when they enter `to`, as in the copy; a cancelled pump loses only what is
/// in the pipe, as a cancelled copy loses its buffer (the connection is being closed). A closed
/// or reset peer fails the splice with `EPIPE`/`ECONNRESET` (Rust's runtime ignores `SIGPIPE`).
async fn pipe_pump(
    from: &tokio::net::TcpStream,
    to: &tokio::net::TcpStream,
    pipe: &KernelPipe,
    counter: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use nix::fcntl::{SpliceFFlags, splice};
    use tokio::io::Interest;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from, None, &pipe.write, None, PIPE_SIZE, flags)
                    .map_err(std::io::Error::from)
            })
            .await?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = to
                .async_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, to, None, left, flags).map_err(std::io::Error::from)
                })
                .await?;
            left -= m;
            counter.fetch_add(m as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::integration_tests::eventually;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected loopback pair: (the end a client holds, the end the tunnel accepted).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Bytes waiting in `s`'s receive queue (`SIOCINQ`).
    fn queued_in(s: &TcpStream) -> usize {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD (SIOCINQ) writes one int through the valid pointer; the descriptor
        // is an open socket owned by `s`.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "SIOCINQ: {}", std::io::Error::last_os_error());
        usize::try_from(n).unwrap_or(0)
    }

    /// The app sends 8 MiB (bulk: its direction moves to the pipe once reads have filled the
    /// largest buffer) while the pod answers 3 KiB (request/response size: stays buffered);
    /// both arrive byte-exact, each FIN is passed on after its bytes, and the counters match.
    #[tokio::test]
    async fn a_bulk_direction_is_piped_in_the_kernel_and_arrives_whole_with_its_fin() {
        static BUDGET: PipeBudget = PipeBudget::new(2);
        assert_eq!(
            bulk_up_small_answer(&BUDGET).await,
            (Moved::Piped, Moved::Buffered)
        );
        assert_eq!(
            BUDGET.in_use.load(Ordering::Relaxed),
            0,
            "the pipe's slot came back"
        );
    }

    /// With every pipe in use a bulk direction stays in user space, and nothing is lost.
    #[tokio::test]
    async fn past_the_pipe_cap_a_bulk_direction_is_copied_whole_in_user_space() {
        static SPENT: PipeBudget = PipeBudget::new(0);
        assert_eq!(
            bulk_up_small_answer(&SPENT).await,
            (Moved::Buffered, Moved::Buffered)
        );
    }

    /// A pipe holds its budget's slot until it is dropped; past the cap none is made.
    #[test]
    fn pipes_are_bounded_and_return_their_slot() {
        static BUDGET: PipeBudget = PipeBudget::new(1);
        let first = KernelPipe::new(&BUDGET).expect("a first pipe");
        let refused = KernelPipe::new(&BUDGET)
            .err()
            .expect("a second pipe is refused");
        assert!(
            refused.to_string().contains("all 1 pipes in use"),
            "{refused}"
        );
        drop(first);
        assert_eq!(BUDGET.in_use.load(Ordering::Relaxed), 0);
        drop(KernelPipe::new(&BUDGET).expect("the slot came back"));
    }

    /// 8 MiB app → pod, then a 3 KiB answer, through [`pump`] with `pipes`: asserts both arrive
    /// whole, in order and counted, and returns how each direction moved.
    async fn bulk_up_small_answer(pipes: &'static PipeBudget) -> (Moved, Moved) {
        const UP: usize = 8 << 20;
        const DOWN: usize = 3 * 1024;
        const MAX_BUFFER: usize = 64 * 1024;
        let (mut app, mut tunnel_app) = pair().await;
        let (mut tunnel_pod, mut pod) = pair().await;
        let up = pattern(UP, 0x5a);
        let down = pattern(DOWN, 0xa5);
        let sender = {
            let up = up.clone();
            tokio::spawn(async move {
                app.write_all(&up).await.expect("app writes");
                app.shutdown().await.expect("app half-closes");
                let mut answer = Vec::new();
                app.read_to_end(&mut answer).await.expect("app reads");
                answer
            })
        };
        // Enough queued that the first reads (16, 32, 64 KiB) fill the buffer: the switch to
        // the pipe does not depend on scheduling.
        eventually("the app's bytes to queue", || {
            queued_in(&tunnel_app) >= 16 * 1024 + 32 * 1024 + 64 * 1024
        })
        .await;
        let (to_pod, to_app) = (AtomicU64::new(0), AtomicU64::new(0));
        let receiver = async {
            let mut got = Vec::new();
            pod.read_to_end(&mut got).await.expect("pod reads");
            pod.write_all(&down).await.expect("pod answers");
            pod.shutdown().await.expect("pod half-closes");
            got
        };
        let (app_r, app_w) = tunnel_app.split();
        let (pod_r, pod_w) = tunnel_pod.split();
        let copy = async {
            tokio::try_join!(
                pump(app_r, pod_w, MAX_BUFFER, pipes, &to_pod),
                pump(pod_r, app_w, MAX_BUFFER, pipes, &to_app),
            )
        };
        let (got, moved) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(receiver, copy)
        })
        .await
        .expect("the copy finished");
        let moved = moved.expect("the copy succeeded");
        assert!(
            got == up,
            "the pod got {} bytes, not the app's {UP} in order",
            got.len()
        );
        let answer = sender.await.expect("app task");
        assert_eq!(answer, down);
        assert_eq!(to_pod.load(Ordering::Relaxed), UP as u64);
        assert_eq!(to_app.load(Ordering::Relaxed), DOWN as u64);
        moved
    }

    /// A pod that resets while a piped transfer is under way ends the copy with an error at
    /// once (nothing waits for bytes that will never leave the pipe).
    #[tokio::test]
    async fn a_pod_that_resets_mid_transfer_ends_the_piped_copy_with_an_error() {
        const MAX_BUFFER: usize = 16 * 1024;
        let (mut app, mut tunnel_app) = pair().await;
        let (mut tunnel_pod, pod) = pair().await;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            // Writes until the tunnel's side fails and the app sees the connection end.
            while app.write_all(&chunk).await.is_ok() {}
        });
        eventually("the app's bytes to queue", || {
            queued_in(&tunnel_app) >= 64 * 1024
        })
        .await;
        let counter = AtomicU64::new(0);
        let result = {
            let copy = pump(
                tunnel_app.split().0,
                tunnel_pod.split().1,
                MAX_BUFFER,
                &PIPES,
                &counter,
            );
            tokio::pin!(copy);
            // The pod reads nothing: once the tunnel has moved to the pipe and filled the pod's
            // socket, the pod resets.
            let moved_some = eventually("the copy to move 64 KiB", || {
                counter.load(Ordering::Relaxed) >= 4 * MAX_BUFFER as u64
            });
            tokio::select! {
                r = &mut copy => panic!("the copy ended before the reset: {r:?}"),
                () = moved_some => {}
            }
            socket2::SockRef::from(&pod)
                .set_linger(Some(Duration::ZERO))
                .expect("linger 0");
            drop(pod);
            tokio::time::timeout(Duration::from_secs(10), copy)
                .await
                .expect("the copy ended after the reset")
        };
        assert!(
            result.is_err(),
            "a reset pod must fail the copy, got {result:?}"
        );
        drop(tunnel_app);
        writer.await.expect("writer");
    }
}
