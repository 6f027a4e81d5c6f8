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
/// small and grow only for bulk transfers. Byte counts stay readable if the copy is cancelled.
pub(super) async fn same_node_copy(
    app: &mut tokio::net::TcpStream,
    pod: &mut tokio::net::TcpStream,
    max_buffer: usize,
    counters: &Counters,
) -> std::io::Result<()> {
    let (app_r, app_w) = app.split();
    let (pod_r, pod_w) = pod.split();
    tokio::try_join!(
        pump(app_r, pod_w, max_buffer, &counters.tcp_to_stream),
        pump(pod_r, app_w, max_buffer, &counters.stream_to_tcp),
    )?;
    Ok(())
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    max_buffer: usize,
    counter: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    let max_buffer = max_buffer.max(SAME_NODE_FIRST_BUFFER);
    let mut buf = BytesMut::with_capacity(SAME_NODE_FIRST_BUFFER);
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if n == buf.capacity() && n < max_buffer {
            buf.clear();
            buf.reserve((n * 2).min(max_buffer));
        }
    }
}
