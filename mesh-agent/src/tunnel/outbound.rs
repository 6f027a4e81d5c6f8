//! Outbound listener (port 15001): redirected app connections → HBONE streams.
//!
//! Per connection: recover the original destination and source identity ([`RedirectSource`];
//! a miss refuses the connection, never a guess), resolve it ([`Resolver`]), pick an endpoint
//! ([`Balancer`]), then either connect directly (same node: no TLS, but the [`Authorizer`]
//! decides first) or open a `CONNECT` stream over the [`Pool`] and copy. One access-log line per
//! connection.
//!
//! Endpoint failures: for a service, an endpoint that cannot be reached (same-node connect
//! refused or timed out, peer node's connect or handshake failed, or the peer's inbound answered
//! 503 because the pod refused) is ejected from the [`Balancer`] for `ejection_time` and the
//! connection is retried on another endpoint, at most [`MAX_ATTEMPTS`] endpoints in all. Retrying
//! is safe because nothing has been read from the app's socket yet: its bytes wait in the kernel
//! for whichever endpoint answers, so none is lost or replayed. A pod address (no alternative)
//! is not retried or ejected. When every attempt failed the app's socket is reset, the nearest
//! thing to the `ECONNREFUSED` it would have had without the mesh; other refusals (401, 400,
//! same-node deny) close it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use http::{HeaderMap, HeaderValue};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{info, warn};

use super::{
    Authorizer, AuthzDecision, AuthzRequest, Destination, Endpoint, LocalWorkloads, Location,
    Redirect, RedirectSource, Resolver, Side, Transport, TunnelConfig,
    balance::Balancer,
    connections::{Authorized, ConnectionManager},
    copy, drain, forwarded_for,
    metrics::{Reporter, Series, TrafficLabels, TunnelMetrics, flags},
    pool::{Pool, PoolKey},
};

/// Endpoints a service connection tries before giving up: the first choice and two others. Each
/// attempt may cost up to a connect timeout, so the bound keeps a dead service from holding the
/// app for long; ejection makes later connections skip the failed ones anyway.
pub const MAX_ATTEMPTS: usize = 3;

pub struct Outbound {
    config: TunnelConfig,
    pool: Arc<Pool>,
    redirects: Arc<dyn RedirectSource>,
    resolver: Arc<dyn Resolver>,
    workloads: Arc<dyn LocalWorkloads>,
    authorizer: Arc<dyn Authorizer>,
    balancer: Arc<Balancer>,
    active: AtomicUsize,
    connections: Arc<ConnectionManager>,
    metrics: TunnelMetrics,
    same_node: super::splice::SameNode,
    /// `max_outbound_connections`, shared by every listener serving this outbound (the shards).
    limit: Arc<tokio::sync::Semaphore>,
}

struct Gauge<'a>(&'a AtomicUsize);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// W3C `traceparent` for a new connection (random trace and span ids, sampled flag off):
/// `00-<32 hex>-<16 hex>-00`, written into one header value without intermediate strings (this
/// runs once per connection).
fn new_traceparent() -> HeaderValue {
    use rand::Rng;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut ids = [0u8; 24];
    // The thread's generator (seeded from the OS, reseeded periodically): no syscall per id.
    rand::rng().fill_bytes(&mut ids);
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    out[53..].copy_from_slice(b"00");
    for (i, byte) in ids.iter().enumerate() {
        // Trace id at 3..35, span id at 36..52 (after the second dash).
        let at = if i < 16 { 3 + 2 * i } else { 4 + 2 * i };
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0xf)];
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

struct Outcome {
    dst_identity: Option<String>,
    endpoint: Option<SocketAddr>,
    hbone: Option<SocketAddr>,
    bytes: copy::Transferred,
    result: String,
    /// The metrics series of a connection established end to end (its close is recorded
    /// there); `None`: it failed.
    opened: Option<Series>,
    /// Istio `response_flags` when not established.
    flag: &'static str,
}

/// An endpoint that could not be reached before any byte was forwarded.
struct Unreachable {
    reason: String,
    /// The peer node tried, if the endpoint is remote.
    hbone: Option<SocketAddr>,
}

impl Outcome {
    fn refused(result: String) -> Self {
        Self {
            dst_identity: None,
            endpoint: None,
            hbone: None,
            bytes: Default::default(),
            result,
            opened: None,
            flag: flags::BAD_REQUEST,
        }
    }
}

/// `(peer, endpoint)`: the source pod and the endpoint chosen, lookup hints for the workload
/// labels (`TunnelMetrics` resolves them; no address becomes a label).
fn traffic_labels(
    redirect: &Redirect,
    dst_identity: Option<&str>,
    service: Option<&str>,
    mtls: bool,
    response_flags: &'static str,
    (peer, endpoint): (SocketAddr, Option<SocketAddr>),
) -> TrafficLabels {
    TrafficLabels {
        reporter: Reporter::Source,
        source_principal: redirect.source.to_string(),
        destination_principal: dst_identity.unwrap_or("unknown").to_string(),
        destination_service: service.unwrap_or("unknown").to_string(),
        connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        response_flags,
        source_addr: Some(peer.ip()),
        destination_addr: endpoint.map(|e| e.ip()),
    }
}

impl Outbound {
    pub fn new(
        config: TunnelConfig,
        pool: Arc<Pool>,
        redirects: Arc<dyn RedirectSource>,
        resolver: Arc<dyn Resolver>,
        workloads: Arc<dyn LocalWorkloads>,
        authorizer: Arc<dyn Authorizer>,
    ) -> Arc<Self> {
        let balancer = Balancer::new(config.ejection_time);
        let limit = Arc::new(tokio::sync::Semaphore::new(config.max_outbound_connections));
        Arc::new(Self {
            config,
            pool,
            redirects,
            resolver,
            workloads,
            authorizer,
            balancer,
            active: AtomicUsize::new(0),
            connections: ConnectionManager::new(),
            metrics: TunnelMetrics::default(),
            same_node: super::splice::SameNode::new(),
            limit,
        })
    }

    /// App connections being served.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Re-checks live same-node connections after a policy change (cross-node ones are
    /// re-checked by the destination's inbound). Returns how many were closed.
    pub fn reauthorize(&self) -> usize {
        self.connections.reauthorize(&*self.authorizer)
    }

    /// This server's traffic metrics (`reporter="source"`).
    pub fn metrics(&self) -> &TunnelMetrics {
        &self.metrics
    }

    /// How same-node connections are carried (spliced in the kernel or copied); choose the
    /// path once at start with [`super::splice::SameNode::choose`].
    pub fn same_node_carrier(&self) -> &super::splice::SameNode {
        &self.same_node
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Whether the balancer skips `endpoint` now (it failed within the ejection time).
    pub fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        self.balancer.is_ejected(endpoint)
    }

    /// Serves `listener` until drained; returns when every connection has ended.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watch) {
        let local = listener.local_addr().ok();
        info!(listen = ?local, "outbound listener started");
        // A listener on one address gives every accepted socket that local address: no
        // getsockname per connection. On a wildcard address each socket is asked.
        let fixed_local = local.filter(|l| !l.ip().is_unspecified());
        let mut conns = JoinSet::new();
        let limit = self.limit.clone();
        loop {
            tokio::select! {
                biased;
                () = drain.draining() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                (accepted, permit) = super::accept_within(&listener, &limit) => match accepted {
                    Ok((tcp, peer)) => {
                        self.active.fetch_add(1, Ordering::SeqCst);
                        let this = self.clone();
                        let watch = drain.clone();
                        conns.spawn(async move {
                            let _permit = permit;
                            let _gauge = Gauge(&this.active);
                            tokio::select! {
                                () = this.clone().serve_connection(tcp, peer, fixed_local) => {}
                                () = watch.forced() => {}
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "outbound accept failed");
                        tokio::task::yield_now().await;
                    }
                },
            }
        }
        drop(listener);
        info!(listen = ?local, "outbound listener closed (draining)");
        while conns.join_next().await.is_some() {}
    }

    async fn serve_connection(
        self: Arc<Self>,
        mut tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        fixed_local: Option<SocketAddr>,
    ) {
        let start = Instant::now();
        let local = match fixed_local.map_or_else(|| tcp.local_addr(), Ok) {
            Ok(l) => l,
            Err(e) => {
                warn!(%peer, error = %e, "outbound socket gone before the lookup");
                return;
            }
        };
        let redirect = match self.redirects.redirect_socket(&tcp, peer, local) {
            Ok(r) => r,
            Err(reason) => {
                warn!(%peer, %local, reason,
                    "refusing connection: no original destination recorded (not redirected by the datapath?)");
                return;
            }
        };
        let (outcome, service) = self.forward(&mut tcp, peer, &redirect).await;
        let labels = |flag| {
            traffic_labels(
                &redirect,
                outcome.dst_identity.as_deref(),
                service.as_deref(),
                outcome.hbone.is_some(),
                flag,
                (peer, outcome.endpoint),
            )
        };
        match &outcome.opened {
            Some(series) => series.closed(outcome.bytes.tcp_to_stream, outcome.bytes.stream_to_tcp),
            None => self.metrics.failed(&labels(outcome.flag)),
        }
        super::access::outbound(&super::access::Outbound {
            src: peer,
            src_identity: &redirect.source,
            dst: redirect.original_dst,
            endpoint: outcome.endpoint,
            dst_identity: outcome.dst_identity.as_deref(),
            hbone: outcome.hbone,
            bytes_sent: outcome.bytes.tcp_to_stream,
            bytes_received: outcome.bytes.stream_to_tcp,
            duration_ms: start.elapsed().as_millis() as u64,
            result: &outcome.result,
        });
    }

    async fn forward(
        &self,
        tcp: &mut tokio::net::TcpStream,
        peer: SocketAddr,
        redirect: &Redirect,
    ) -> (Outcome, Option<String>) {
        // The kernel redirects only destinations in NM_MESH_DST (every workload address and
        // service VIP); anything else goes out untouched without reaching us. This stays as the
        // defence for a stale map (a destination that left the model but not yet the trie, or a
        // trie not yet programmed: empty, it captures everything) and for a VIP's unknown port.
        let Some(dest) = self.resolver.resolve(redirect.original_dst) else {
            let outcome = Outcome::refused(format!(
                "refused: {} is neither a known workload nor a service",
                redirect.original_dst
            ));
            return (outcome, None);
        };
        let (candidates, host) = match dest {
            Destination::Workload(e) => (vec![e], None),
            Destination::Service {
                hostname,
                endpoints,
            } => (endpoints, Some(hostname)),
        };
        let service = host.is_some();
        let attempts = if service {
            MAX_ATTEMPTS.min(candidates.len()).max(1)
        } else {
            1
        };
        let mut tried = Vec::new();
        let mut last: Option<(Endpoint, Unreachable)> = None;
        for attempt in 1..=attempts {
            let Some((ep, _outstanding)) = self.balancer.pick(&candidates, &tried) else {
                break;
            };
            tried.push(ep.addr);
            let result = match &ep.location {
                Location::SameNode => {
                    self.same_node(tcp, peer, redirect, &ep, host.as_deref())
                        .await
                }
                Location::Remote { hbone } => {
                    self.via_hbone(tcp, peer, redirect, &ep, *hbone, host.as_deref())
                        .await
                }
            };
            let failure = match result {
                Ok(outcome) => return (outcome, host),
                Err(failure) => failure,
            };
            if service {
                self.balancer.eject(ep.addr, &failure.reason);
                if attempt < attempts {
                    warn!(%peer, dst = %redirect.original_dst, endpoint = %ep.addr,
                        reason = %failure.reason, retry = attempt, of = attempts - 1,
                        "service endpoint unreachable before any byte was forwarded: ejected, retrying on another endpoint");
                } else {
                    warn!(%peer, dst = %redirect.original_dst, endpoint = %ep.addr,
                        reason = %failure.reason, attempts,
                        "service endpoint unreachable: ejected; no attempts left, resetting the app's connection");
                }
            } else {
                warn!(%peer, dst = %redirect.original_dst, reason = %failure.reason,
                    "pod unreachable: resetting the app's connection (no other endpoint to try)");
            }
            last = Some((ep, failure));
        }
        // Every attempt failed (or there was no endpoint): a reset tells the app at once.
        if let Err(e) = tcp.set_zero_linger() {
            warn!(%peer, error = %e, "cannot arrange a reset; the app's socket is closed instead");
        }
        let outcome = match last {
            Some((ep, failure)) => Outcome {
                dst_identity: Some(ep.identity.to_string()),
                endpoint: Some(ep.addr),
                hbone: failure.hbone,
                bytes: Default::default(),
                result: if tried.len() > 1 {
                    format!("failed after {} endpoints: {}", tried.len(), failure.reason)
                } else {
                    format!("failed: {}", failure.reason)
                },
                opened: None,
                flag: flags::CONNECT,
            },
            None => Outcome {
                dst_identity: None,
                endpoint: None,
                hbone: None,
                bytes: Default::default(),
                result: "failed: the service has no endpoints".into(),
                opened: None,
                flag: flags::CONNECT,
            },
        };
        (outcome, host)
    }

    /// `Err`: the endpoint could not be reached and nothing was forwarded (another may be tried).
    async fn via_hbone(
        &self,
        tcp: &mut tokio::net::TcpStream,
        peer: SocketAddr,
        redirect: &Redirect,
        ep: &Endpoint,
        hbone: SocketAddr,
        host: Option<&str>,
    ) -> Result<Outcome, Unreachable> {
        let key = PoolKey {
            source: redirect.source.clone(),
            hbone,
            expected: ep.identity.clone(),
        };
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&forwarded_for(peer, host)) {
            headers.insert("forwarded", v);
        }
        if let Some(v) = redirect
            .baggage
            .as_deref()
            .and_then(|b| HeaderValue::from_str(b).ok())
        {
            headers.insert("baggage", v);
        }
        headers.insert("traceparent", new_traceparent());
        let outcome = |bytes, result: String, flag| Outcome {
            dst_identity: Some(ep.identity.to_string()),
            endpoint: Some(ep.addr),
            hbone: Some(hbone),
            bytes,
            result,
            opened: None,
            flag,
        };
        let stream = match self.pool.open(&key, ep.addr, &headers).await {
            Ok(s) => s,
            Err(e) if e.is_connect_failure() => {
                return Err(Unreachable {
                    reason: e.to_string(),
                    hbone: Some(hbone),
                });
            }
            Err(e) => {
                return Ok(outcome(
                    Default::default(),
                    format!("failed: {e}"),
                    flags::CONNECT,
                ));
            }
        };
        let status = stream.response.status();
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            // The peer's inbound could not connect to the pod (nothing listening, or a timeout).
            return Err(Unreachable {
                reason: format!(
                    "upstream {hbone} answered 503: the destination node could not reach the pod {}",
                    ep.addr
                ),
                hbone: Some(hbone),
            });
        }
        if status != http::StatusCode::OK {
            // Dropping `tcp` (by returning) closes the app's socket.
            let (why, flag) = match status.as_u16() {
                401 => ("denied by the destination's policy", flags::DENY),
                400 => (
                    "the destination refused the request as malformed",
                    flags::BAD_REQUEST,
                ),
                _ => ("unexpected status", flags::BAD_REQUEST),
            };
            return Ok(outcome(
                Default::default(),
                format!("upstream answered {status}: {why}"),
                flag,
            ));
        }
        let series = self.metrics.opened(&traffic_labels(
            redirect,
            Some(&ep.identity.to_string()),
            host,
            true,
            flags::NONE,
            (peer, Some(ep.addr)),
        ));
        let counters = copy::Counters::default();
        let result = copy::bidirectional(
            tcp,
            stream.send,
            stream.recv,
            self.config.copy_buffer_size,
            Side::Downstream,
            Side::Upstream,
            &counters,
        )
        .await;
        let result = match result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("copy ended with a {} error: {e}", e.side()),
        };
        Ok(Outcome {
            opened: Some(series),
            ..outcome(counters.snapshot(), result, flags::NONE)
        })
    }

    async fn same_node(
        &self,
        tcp: &mut tokio::net::TcpStream,
        peer: SocketAddr,
        redirect: &Redirect,
        ep: &Endpoint,
        service: Option<&str>,
    ) -> Result<Outcome, Unreachable> {
        let mut outcome = Outcome {
            dst_identity: Some(ep.identity.to_string()),
            endpoint: Some(ep.addr),
            hbone: None,
            bytes: Default::default(),
            result: String::new(),
            opened: None,
            flag: flags::BAD_REQUEST,
        };
        let Some(workload) = self.workloads.by_ip(ep.addr.ip()) else {
            outcome.result = format!(
                "refused: same-node endpoint {} is not a workload on this node (stale endpoint data?)",
                ep.addr
            );
            return Ok(outcome);
        };
        let decision = self.authorizer.authorize(&AuthzRequest {
            source_identity: Some(&redirect.source),
            source_addr: peer,
            destination: ep.addr,
            destination_workload: &workload,
            transport: Transport::SameNode,
        });
        if let AuthzDecision::Deny { reason } = decision {
            outcome.result = format!("denied: {reason}");
            outcome.flag = flags::DENY;
            return Ok(outcome);
        }
        let mut upstream = match tokio::time::timeout(
            self.config.upstream_connect_timeout,
            super::listener::connect_from(ep.addr, self.config.delivery_source),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Unreachable {
                    reason: format!(
                        "same-node connect to {} failed: {e} ({})",
                        ep.addr,
                        super::listener::connect_hint(&e)
                    ),
                    hbone: None,
                });
            }
            Err(_) => {
                return Err(Unreachable {
                    reason: format!(
                        "same-node connect to {} timed out after {:?}",
                        ep.addr, self.config.upstream_connect_timeout
                    ),
                    hbone: None,
                });
            }
        };
        super::listener::tune(&upstream);
        outcome.opened = Some(self.metrics.opened(&traffic_labels(
            redirect,
            Some(&ep.identity.to_string()),
            service,
            false,
            flags::NONE,
            (peer, Some(ep.addr)),
        )));
        let mut registration = self.connections.register(Authorized {
            source_identity: Some(redirect.source.clone()),
            source_addr: peer,
            destination: ep.addr,
            workload,
            transport: Transport::SameNode,
        });
        let counters = copy::Counters::default();
        tokio::select! {
            r = self.same_node.carry(tcp, &mut upstream, self.config.copy_buffer_size, &counters) => match r {
                Ok(()) => outcome.result = match self.same_node.path() {
                    super::splice::SameNodePath::Splice => "ok (same node, spliced)".into(),
                    super::splice::SameNodePath::Copy => "ok (same node)".into(),
                },
                Err(e) => outcome.result = format!("same-node copy ended with an error: {e}"),
            },
            Ok(reason) = &mut registration.revoked => {
                outcome.result = format!("closed: policy now denies it: {reason}");
            }
        }
        outcome.bytes = counters.snapshot();
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_shaped_and_random() {
        let a = new_traceparent();
        let a = a.to_str().expect("ascii");
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 4, "{a}");
        assert_eq!((parts[0], parts[3]), ("00", "00"), "{a}");
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{a}");
        let hex = |p: &str| {
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        assert!(hex(parts[1]) && hex(parts[2]), "{a}");
        assert_ne!(parts[1], "0".repeat(32), "a zero trace id is invalid: {a}");
        assert_ne!(
            new_traceparent().to_str().expect("ascii"),
            a,
            "ids are random"
        );
    }
}
