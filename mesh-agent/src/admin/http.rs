//! The HTTP/1.1 plumbing both servers share: accept loop, per-connection limits, shutdown.
//!
//! Limits, and why: at most [`MAX_CONNECTIONS`] connections at once (scrapers and operators
//! need a few; beyond that a misbehaving client only waits); the request head must arrive
//! within [`HEADER_READ_TIMEOUT`] and fit [`MAX_HEAD_BYTES`] (hyper answers 431 or 400 and
//! closes); no handler reads a request body; a connection lives at most [`MAX_CONNECTION_AGE`].

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, warn};

pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's minimum read buffer is 8 KiB; 16 KiB leaves room for a long `/logging` filter.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// After shutdown, in-flight requests get this long to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub type Body = Full<Bytes>;

pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

/// Serves `handler` on `listener` until `shutdown` completes; then stops accepting (the
/// listener is closed on return), lets each open connection finish the request it is reading
/// or answering (idle keep-alive connections close at once) and returns when all are done, or
/// after [`SHUTDOWN_GRACE`], when the remaining connections are dropped.
pub async fn serve<H>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()> + Send,
    server: &'static str,
) where
    H: Fn(Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(server, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let r = handler(req);
                async move { Ok::<_, Infallible>(r) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = tokio::time::timeout(MAX_CONNECTION_AGE, conn.as_mut()) => r.ok(),
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await.ok()
                }
            };
            if let Some(Err(e)) = result {
                debug!(server, error = %e, "connection ended with an error");
            }
        });
    }
    let _ = stop_tx.send(true);
    drop(listener);
    // Every connection task holds a slot: all slots back means all connections are done.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    match tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all)).await {
        Ok(_) => debug!(server, "stopped; every connection finished"),
        Err(_) => {
            warn!(server, grace = ?SHUTDOWN_GRACE, "stopped; connections still open after the grace period are dropped")
        }
    }
}

/// `%XX` and `+` decoding of one query value; `None` if it is not UTF-8 after decoding.
pub fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    let raw = query?.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })?;
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value(Some("a=1&level=info%2Cmesh_agent%3Ddebug"), "level").as_deref(),
            Some("info,mesh_agent=debug")
        );
        assert_eq!(
            query_value(Some("level=a+b"), "level").as_deref(),
            Some("a b")
        );
        assert_eq!(
            query_value(Some("level=100%"), "level").as_deref(),
            Some("100%")
        );
        assert_eq!(
            query_value(Some("level=%zz"), "level").as_deref(),
            Some("%zz")
        );
        assert_eq!(query_value(Some("other=1"), "level"), None);
        assert_eq!(query_value(None, "level"), None);
        assert_eq!(query_value(Some("level=%ff"), "level"), None);
    }
}
