//! Unreachable endpoints: a service endpoint that refuses (same node: connect refused; remote:
//! the peer's inbound answers 503) is ejected and the connection is retried on another endpoint
//! with nothing lost; a pod address that refuses resets the app's connection at once.

use super::*;
use crate::tunnel::metrics::{Reporter, TrafficLabels, flags};

const VIP: ([u8; 4], u16) = ([10, 96, 0, 1], 80);
const HOST: &str = "echo.default.svc.cluster.local";

/// A port on 127.0.0.2 where nothing listens (bound, then closed): connects are refused.
async fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

/// An outbound of `mesh.client` whose only destination is `dst` → `destination`, serving on
/// its own listener until the returned trigger is dropped; the echo pod is a local workload
/// (same-node endpoints need one).
fn outbound(
    mesh: &Mesh,
    dst: SocketAddr,
    destination: Destination,
) -> (Arc<Outbound>, SocketAddr, drain::Trigger) {
    outbound_with(mesh, dst, destination, test_config(), None)
}

/// [`outbound`] with `config` and one more local workload.
fn outbound_with(
    mesh: &Mesh,
    dst: SocketAddr,
    destination: Destination,
    config: TunnelConfig,
    extra: Option<LocalWorkload>,
) -> (Arc<Outbound>, SocketAddr, drain::Trigger) {
    let config = TunnelConfig {
        // Longer than any test: an ejected endpoint stays ejected while we look.
        ejection_time: Duration::from_secs(600),
        ..config
    };
    let mut workloads = StaticWorkloads::default().with(server_workload(mesh.echo, &mesh.server));
    if let Some(w) = extra {
        workloads = workloads.with(w);
    }
    let outbound = Outbound::new(
        config.clone(),
        Pool::new(config, mesh.certs.clone()),
        Arc::new(FixedRedirect(Redirect {
            original_dst: dst,
            source: mesh.client.clone(),
            baggage: None,
        })),
        Arc::new(StaticResolver([(dst, destination)].into_iter().collect())),
        Arc::new(workloads),
        Arc::new(AllowAll),
    );
    let listener = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (trigger, watch) = drain::channel();
    tokio::spawn(outbound.clone().serve(listener, watch));
    (outbound, addr, trigger)
}

fn endpoint(mesh: &Mesh, addr: SocketAddr, remote: bool) -> Endpoint {
    Endpoint {
        addr,
        identity: mesh.server.clone(),
        location: if remote {
            Location::Remote {
                hbone: mesh.inbound_addr,
            }
        } else {
            Location::SameNode
        },
    }
}

fn service(endpoints: Vec<Endpoint>) -> Destination {
    Destination::Service {
        hostname: HOST.into(),
        endpoints,
    }
}

/// Round trips through `addr` until `dead` is ejected: every one must succeed and be byte-exact
/// (the connection that hit `dead` was retried on the good endpoint, and the bytes the app wrote
/// at once, while the outbound was still trying `dead`, all reached the good one). Then more
/// round trips, all on the good one.
async fn every_connection_succeeds_and_the_refusing_endpoint_is_ejected(
    outbound: &Outbound,
    addr: SocketAddr,
    dead: SocketAddr,
) {
    // Power of two choices over two idle endpoints picks `dead` with probability 1/2 or more
    // per connection; 64 misses in a row would take odds of 2^-64.
    let mut n = 0;
    while !outbound.is_ejected(dead) {
        assert!(
            n < 64,
            "{dead} never tried (or never ejected) in {n} connections"
        );
        let s = TcpStream::connect(addr).await.expect("connect");
        round_trip(s, 64 * 1024).await;
        n += 1;
    }
    for _ in 0..8 {
        let s = TcpStream::connect(addr).await.expect("connect");
        round_trip(s, 64 * 1024).await;
    }
    eventually("every connection to be closed", || {
        outbound.active_connections() == 0
    })
    .await;
    let totals = outbound.metrics().totals();
    assert_eq!(
        (totals.failed, totals.closed),
        (0, n + 8),
        "a retried connection is one closed connection, not a failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_endpoint_refusing_is_ejected_and_the_connection_retried() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let dead = refusing_addr().await;
    let vip = SocketAddr::from(VIP);
    let endpoints = vec![
        endpoint(&mesh, dead, false),
        endpoint(&mesh, mesh.echo, false),
    ];
    let (outbound, addr, _trigger) = outbound(&mesh, vip, service(endpoints));
    every_connection_succeeds_and_the_refusing_endpoint_is_ejected(&outbound, addr, dead).await;
    assert!(
        !outbound.is_ejected(mesh.echo),
        "the good endpoint stays in"
    );
    assert_eq!(
        outbound.pool().connection_count(),
        0,
        "same node opens no HBONE connection"
    );
}

/// A port on 127.0.0.2 whose connects hang: a listener that never accepts, its accept queue
/// filled, so the kernel drops further SYNs. Keep the returned sockets while it must stay silent.
async fn silent_addr() -> (SocketAddr, Vec<TcpStream>, TcpListener) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut queued = Vec::new();
    loop {
        assert!(queued.len() < 64, "the accept queue never filled");
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            Ok(Err(e)) => panic!("connect to the silent listener: {e}"),
            Err(_) => return (addr, queued, listener),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_endpoint_timing_out_is_ejected_and_the_connection_retried() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let (silent, _queued, _listener) = silent_addr().await;
    let vip = SocketAddr::from(VIP);
    let endpoints = vec![
        endpoint(&mesh, silent, false),
        endpoint(&mesh, mesh.echo, false),
    ];
    let config = TunnelConfig {
        upstream_connect_timeout: Duration::from_millis(200),
        ..test_config()
    };
    let (outbound, addr, _trigger) = outbound_with(&mesh, vip, service(endpoints), config, None);
    every_connection_succeeds_and_the_refusing_endpoint_is_ejected(&outbound, addr, silent).await;
    assert!(
        !outbound.is_ejected(mesh.echo),
        "the good endpoint stays in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_endpoint_answering_503_is_ejected_and_the_connection_retried() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    // The peer's inbound serves both endpoints (the same pod IP); one port refuses, so the
    // inbound answers that CONNECT with 503.
    let dead = refusing_addr().await;
    let vip = SocketAddr::from(VIP);
    let endpoints = vec![
        endpoint(&mesh, dead, true),
        endpoint(&mesh, mesh.echo, true),
    ];
    let (outbound, addr, _trigger) = outbound(&mesh, vip, service(endpoints));
    every_connection_succeeds_and_the_refusing_endpoint_is_ejected(&outbound, addr, dead).await;
    assert!(
        !outbound.is_ejected(mesh.echo),
        "the good endpoint stays in"
    );
    // The destination answered (and counted) exactly one 503: after it, the endpoint was skipped.
    eventually("the destination to count its 503", || {
        mesh.inbound.metrics().totals().failed == 1
    })
    .await;
}

/// Connects to `addr` and reads until the socket ends, which must happen within `within`. On
/// loopback the reset may arrive before `connect` returns; then `connect` reports it.
async fn closed_promptly(addr: SocketAddr, within: Duration) -> std::io::Result<usize> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(DEADLINE, s.read(&mut b))
        .await
        .expect("the app's connection must end, not hang");
    assert!(
        start.elapsed() < within,
        "closed after {:?}, not promptly",
        start.elapsed()
    );
    assert!(!matches!(r, Ok(n) if n > 0), "no byte comes from nowhere");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_pod_refusing_resets_the_app_connection_promptly_without_ejection() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    for remote in [false, true] {
        let dead = refusing_addr().await;
        let (outbound, addr, _trigger) = outbound(
            &mesh,
            dead,
            Destination::Workload(endpoint(&mesh, dead, remote)),
        );
        let r = closed_promptly(addr, Duration::from_secs(5)).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "remote={remote}: the app's connection is reset, got {r:?}"
        );
        assert!(
            !outbound.is_ejected(dead),
            "remote={remote}: a pod address is not a load-balanced endpoint"
        );
        let labels = TrafficLabels {
            reporter: Reporter::Source,
            source_principal: mesh.client.to_string(),
            destination_principal: mesh.server.to_string(),
            destination_service: "unknown".into(),
            connection_security_policy: if remote { "mutual_tls" } else { "none" },
            response_flags: flags::CONNECT,
            source_addr: None,
            destination_addr: None,
        };
        eventually("the failure to be counted", || {
            outbound.metrics().get(&labels).failed == 1
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_with_every_endpoint_refusing_resets_after_trying_each_once() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let vip = SocketAddr::from(VIP);
    let dead = [
        refusing_addr().await,
        refusing_addr().await,
        refusing_addr().await,
        refusing_addr().await,
    ];
    let endpoints = vec![
        endpoint(&mesh, dead[0], false),
        endpoint(&mesh, dead[1], true),
        endpoint(&mesh, dead[2], false),
        endpoint(&mesh, dead[3], true),
    ];
    let (outbound, addr, _trigger) = outbound(&mesh, vip, service(endpoints));
    let r = closed_promptly(addr, Duration::from_secs(5)).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the app's connection is reset, got {r:?}"
    );
    let ejected = dead.iter().filter(|d| outbound.is_ejected(**d)).count();
    assert_eq!(
        ejected,
        outbound::MAX_ATTEMPTS,
        "each attempt tries (and ejects) a different endpoint, bounded"
    );
    eventually("one failed connection to be counted", || {
        outbound.metrics().totals().failed == 1
    })
    .await;
}
