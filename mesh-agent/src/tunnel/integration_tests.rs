//! In-process tunnel tests on loopback: outbound (127.0.0.1) → HBONE → inbound (127.0.0.2) →
//! echo "pod" (127.0.0.2). Listeners bind port 0; waits are polls with deadlines.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    inbound::Inbound,
    listener::bind_exclusive,
    outbound::Outbound,
    pool::{Pool, PoolKey},
    *,
};
use crate::identity::{
    CertCache, CertificateProvider, LocalCa, SpiffeId,
    tls::{PeerCertError, client_config, peer_cert_error, placeholder_server_name, server_config},
};

const TD: &str = "cluster.local";
const DEADLINE: Duration = Duration::from_secs(30);

fn id(s: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/default/sa/{s}")
        .parse()
        .expect("test identity")
}

fn test_config() -> TunnelConfig {
    TunnelConfig {
        // Short enough that the timeout tests finish quickly, long enough for debug-build
        // handshakes on a loaded 2-core CI machine.
        handshake_timeout: Duration::from_secs(5),
        first_request_timeout: Duration::from_secs(5),
        drain_deadline: Duration::from_secs(5),
        ..TunnelConfig::default()
    }
}

/// Polls `cond` until true or the deadline (the copy tests use it too).
pub(super) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects an "app" to `addr`, writes a byte and reads until the tunnel closes it: the number
/// of bytes the app received first. A tunnel that refuses closes the app's connection at once,
/// with a reset, and on a loaded machine the reset can arrive before `connect()` has returned
/// (the handshake completed in the kernel, the refusal came before the client task ran): that
/// is the same outcome, zero bytes, not a test failure.
async fn bytes_before_close(addr: SocketAddr) -> usize {
    let mut app = match TcpStream::connect(addr).await {
        Ok(app) => app,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return 0,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    let _ = app.write_all(b"x").await;
    let mut buf = [0u8; 64];
    tokio::time::timeout(DEADLINE, app.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0)
}

/// Echo "pod": returns every byte, then closes its write side after the peer's FIN.
async fn echo_server(ip: [u8; 4]) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.split();
                let mut r = tokio::io::BufReader::with_capacity(256 * 1024, r);
                if tokio::io::copy_buf(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

struct FixedRedirect(Redirect);

impl RedirectSource for FixedRedirect {
    fn redirect(&self, _: SocketAddr, _: SocketAddr) -> Result<Redirect, String> {
        Ok(self.0.clone())
    }
}

struct Mesh {
    _dir: tempfile::TempDir,
    ca: Arc<LocalCa>,
    certs: Arc<CertCache>,
    client: SpiffeId,
    server: SpiffeId,
    echo: SocketAddr,
    inbound: Arc<Inbound>,
    inbound_addr: SocketAddr,
    outbound: Arc<Outbound>,
    outbound_addr: SocketAddr,
    trigger: Option<drain::Trigger>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct MeshOptions {
    config: TunnelConfig,
    inbound_authz: Arc<dyn Authorizer>,
    /// Where the inbound listens: the pod's address (ztunnel style) or a node address.
    inbound_ip: [u8; 4],
    /// Bind both listeners with `SO_REUSEPORT` on loopback addresses of this process's own
    /// (`config.shards` > 1 needs it: the shards bind beside them).
    reuseport: bool,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            config: test_config(),
            inbound_authz: Arc::new(AllowAll),
            inbound_ip: [127, 0, 0, 2],
            reuseport: false,
        }
    }
}

fn server_workload(ip: SocketAddr, identity: &SpiffeId) -> LocalWorkload {
    LocalWorkload {
        name: "server".into(),
        namespace: "default".into(),
        identity: identity.clone(),
        ip: ip.ip(),
    }
}

impl Mesh {
    async fn start(opts: MeshOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(LocalCa::open(dir.path(), TD).expect("ca"));
        let certs = Arc::new(CertCache::new(ca.clone()));
        let (client, server) = (id("client"), id("server"));
        let echo = echo_server([127, 0, 0, 2]).await;
        // The client pod's address (nothing listens there): what `forwarded` may name.
        let client_pod = LocalWorkload {
            name: "client".into(),
            namespace: "default".into(),
            identity: client.clone(),
            ip: CLIENT_POD_IP.into(),
        };
        let workloads: Arc<dyn LocalWorkloads> = Arc::new(
            StaticWorkloads::default()
                .with(server_workload(echo, &server))
                .with(client_pod),
        );
        let (trigger, watch) = drain::channel();

        let inbound_listener = if opts.reuseport {
            listener::bind_reuseport_free(24, 1024)
        } else {
            bind_exclusive(SocketAddr::from((opts.inbound_ip, 0)), 1024).expect("bind inbound")
        };
        let inbound_addr = inbound_listener.local_addr().expect("addr");
        let destination = Destination::Workload(Endpoint {
            addr: echo,
            identity: server.clone(),
            location: Location::Remote {
                hbone: inbound_addr,
            },
        });
        let resolver = Arc::new(StaticResolver([(echo, destination)].into_iter().collect()));
        let redirects = Arc::new(FixedRedirect(Redirect {
            original_dst: echo,
            source: client.clone(),
            baggage: Some("k8s.namespace.name=default,k8s.deployment.name=client".into()),
        }));
        let outbound_listener = if opts.reuseport {
            listener::bind_reuseport_free(24, 1024)
        } else {
            bind_exclusive(SocketAddr::from(([127, 0, 0, 1], 0)), 1024).expect("bind outbound")
        };
        let running = start(
            opts.config,
            certs.clone(),
            Seams {
                redirects,
                resolver,
                workloads,
                authorizer: opts.inbound_authz,
            },
            inbound_listener,
            outbound_listener,
            watch,
        )
        .expect("start");
        let (inbound, outbound, outbound_addr, tasks) = (
            running.inbound,
            running.outbound,
            running.outbound_addr,
            running.tasks,
        );
        Self {
            _dir: dir,
            ca,
            certs,
            client,
            server,
            echo,
            inbound,
            inbound_addr,
            outbound,
            outbound_addr,
            trigger: Some(trigger),
            tasks,
        }
    }

    /// A TLS+h2 connection to the inbound as `source`, with the `h2` crate directly.
    async fn h2_client(&self, source: &SpiffeId) -> h2::client::SendRequest<Bytes> {
        let cert = self.certs.get(source).await.expect("cert");
        let cfg = client_config(&cert, &self.certs.trust_bundle(), &self.server).expect("config");
        let tcp = TcpStream::connect(self.inbound_addr)
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(placeholder_server_name(), tcp)
            .await
            .expect("tls");
        let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send
    }
}

/// Deterministic test data: byte `i` of the stream is `PATTERN[i % PATTERN.len()]`; the length
/// is prime so a lost, repeated or reordered chunk shows up.
fn pattern() -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..1_048_573)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sends `total` bytes through `stream` and checks the echo byte for byte.
async fn round_trip(stream: TcpStream, total: u64) {
    let pat = Arc::new(pattern());
    let (mut r, mut w) = stream.into_split();
    let wpat = pat.clone();
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < total {
            let off = (sent % wpat.len() as u64) as usize;
            let n = ((total - sent) as usize).min(wpat.len() - off);
            w.write_all(&wpat[off..off + n]).await.expect("write");
            sent += n as u64;
        }
        w.shutdown().await.expect("shutdown");
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        // Compare whole runs against the pattern (memcmp), not byte by byte: fast in debug.
        let mut checked = 0;
        while checked < n {
            let pos = ((got + checked as u64) % pat.len() as u64) as usize;
            let run = (n - checked).min(pat.len() - pos);
            if buf[checked..checked + run] != pat[pos..pos + run] {
                let i = (0..run)
                    .find(|&i| buf[checked + i] != pat[pos + i])
                    .unwrap_or(0);
                panic!("byte {} differs", got + (checked + i) as u64);
            }
            checked += run;
        }
        got += n as u64;
    }
    writer.await.expect("writer");
    assert_eq!(got, total, "echoed byte count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_64_mib_byte_exact() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 64 << 20).await;
    eventually("streams to end", || mesh.inbound.active_streams() == 0).await;
}

/// The acceptance size: 1 GiB each way through outbound, TLS, inbound and an echo server (about
/// 20 s in a debug build on 2 cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_1_gib_byte_exact() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 1 << 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_share_few_connections() {
    const N: usize = 1000;
    raise_fd_limit();
    let mesh = Mesh::start(MeshOptions::default()).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let (addr, barrier) = (mesh.outbound_addr, barrier.clone());
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let msg = format!("hello {i}\n");
            s.write_all(msg.as_bytes()).await.expect("write");
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).await.expect("echo");
            assert_eq!(buf, msg.as_bytes());
            // Everyone holds their stream open until all have one: N concurrent streams.
            barrier.wait().await;
            s.shutdown().await.expect("shutdown");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("eof");
            assert!(rest.is_empty());
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("stream task");
    }
    let pool = mesh.outbound.pool();
    let conns = pool.connection_count();
    // Spread over up to one connection per worker, then stacked up to the stream limit.
    let max = N
        .div_ceil(test_config().pool_max_streams_per_connection)
        .max(pool.max_connections_per_key());
    assert!(
        (1..=max).contains(&conns),
        "{N} streams used {conns} connections (at most {max} expected)"
    );
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass, which lives on our stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_principal_gets_401_and_the_app_socket_is_closed() {
    let client = id("client");
    let mesh = Mesh::start(MeshOptions {
        inbound_authz: Arc::new(DenyIdentities(vec![client.clone()])),
        ..MeshOptions::default()
    })
    .await;
    // Through the pool: the peer answers 401.
    let key = PoolKey {
        source: client,
        hbone: mesh.inbound_addr,
        expected: mesh.server.clone(),
    };
    let stream = mesh
        .outbound
        .pool()
        .open(&key, mesh.echo, &http::HeaderMap::new())
        .await
        .expect("stream");
    assert_eq!(stream.response.status(), http::StatusCode::UNAUTHORIZED);
    drop(stream);
    // Through the outbound listener: the app sees its socket closed.
    let mut s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "a denied connection gets no data, only a close");
    // Another identity is allowed on the same server.
    let mut other = mesh
        .h2_client(&id("other"))
        .await
        .ready()
        .await
        .expect("ready");
    let req = pool::connect_request(mesh.echo, &http::HeaderMap::new()).expect("req");
    let (resp, _send) = other.send_request(req, false).expect("send");
    assert_eq!(resp.await.expect("resp").status(), http::StatusCode::OK);
}

const CLIENT_POD_IP: [u8; 4] = [127, 0, 0, 9];

/// Records the source address each decision saw.
#[derive(Default)]
struct RecordSources(std::sync::Mutex<Vec<SocketAddr>>);

impl Authorizer for RecordSources {
    fn authorize(&self, req: &AuthzRequest<'_>) -> AuthzDecision {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req.source_addr);
        AuthzDecision::Allow
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_see_the_forwarded_pod_address_only_when_it_is_the_peers() {
    let record = Arc::new(RecordSources::default());
    let mesh = Mesh::start(MeshOptions {
        inbound_authz: record.clone(),
        ..MeshOptions::default()
    })
    .await;
    let pod = SocketAddr::from((CLIENT_POD_IP, 5000));
    let forwarded = |addr: SocketAddr| {
        let mut h = http::HeaderMap::new();
        h.insert(
            "forwarded",
            format!("for=\"{addr}\"").parse().expect("header value"),
        );
        h
    };
    let open = |source: SpiffeId, headers: http::HeaderMap| {
        let mesh = &mesh;
        async move {
            let mut s = mesh.h2_client(&source).await.ready().await.expect("ready");
            let req = pool::connect_request(mesh.echo, &headers).expect("req");
            let (resp, _body) = s.send_request(req, false).expect("send");
            resp.await.expect("response").status()
        }
    };
    // The client identity owns the pod address: policies see it (`ipBlocks` on pod IPs work).
    assert_eq!(
        open(mesh.client.clone(), forwarded(pod)).await,
        http::StatusCode::OK
    );
    // Another identity claiming that address, an unknown address, no header: the peer's address.
    assert_eq!(
        open(id("other"), forwarded(pod)).await,
        http::StatusCode::OK
    );
    assert_eq!(
        open(
            mesh.client.clone(),
            forwarded(SocketAddr::from(([127, 0, 0, 10], 5000)))
        )
        .await,
        http::StatusCode::OK
    );
    assert_eq!(
        open(mesh.client.clone(), http::HeaderMap::new()).await,
        http::StatusCode::OK
    );
    let seen: Vec<_> = record
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(SocketAddr::ip)
        .collect();
    let peer: IpAddr = [127, 0, 0, 1].into();
    assert_eq!(seen, vec![pod.ip(), peer, peer, peer]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_h2_client_connects_and_bad_requests_get_400_503() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let send = mesh.h2_client(&mesh.client).await;

    // CONNECT with `:authority` = ip:port, data both ways, END_STREAM both ways.
    let mut s = send.clone().ready().await.expect("ready");
    let mut headers = http::HeaderMap::new();
    headers.insert("forwarded", "for=\"10.1.1.1:5000\"".parse().expect("hv"));
    headers.insert("baggage", "k8s.namespace.name=default".parse().expect("hv"));
    let req = pool::connect_request(mesh.echo, &headers).expect("req");
    let (resp, mut body) = s.send_request(req, false).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), http::StatusCode::OK);
    body.send_data(Bytes::from_static(b"ping"), true)
        .expect("data");
    let mut recv = resp.into_body();
    let mut echoed = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("chunk");
        let _ = recv.flow_control().release_capacity(chunk.len());
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, b"ping");

    let status = |req: http::Request<()>| {
        let send = send.clone();
        async move {
            let mut s = send.ready().await.expect("ready");
            let (resp, _body) = s.send_request(req, false).expect("send");
            resp.await.expect("response").status()
        }
    };
    // Not CONNECT.
    let get = http::Request::get(format!("https://{}/", mesh.echo))
        .body(())
        .expect("req");
    assert_eq!(status(get).await, http::StatusCode::BAD_REQUEST);
    // Authority is a host name, not ip:port.
    let by_name = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("echo.default.svc:80")
        .body(())
        .expect("req");
    assert_eq!(status(by_name).await, http::StatusCode::BAD_REQUEST);
    // Authority names another IP than the workload this connection is for.
    let other_ip = SocketAddr::from(([127, 0, 0, 3], mesh.echo.port()));
    let mismatch = pool::connect_request(other_ip, &http::HeaderMap::new()).expect("req");
    assert_eq!(status(mismatch).await, http::StatusCode::BAD_REQUEST);
    // The tunnel's own port: no HBONE inside HBONE.
    let own = SocketAddr::from(([127, 0, 0, 2], mesh.inbound_addr.port()));
    let looped = pool::connect_request(own, &http::HeaderMap::new()).expect("req");
    assert_eq!(status(looped).await, http::StatusCode::BAD_REQUEST);
    // Nothing listens on the port: 503.
    let closed = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    let dead = pool::connect_request(closed_addr, &http::HeaderMap::new()).expect("req");
    assert_eq!(status(dead).await, http::StatusCode::SERVICE_UNAVAILABLE);
}

/// Accepts one TLS connection with the inbound's server config and returns the server's error.
async fn server_side_rejection(mesh: &Mesh, client_cert: &crate::identity::WorkloadCert) -> String {
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_cert = mesh.certs.get(&mesh.server).await.expect("cert");
    let cfg = server_config(&server_cert, &mesh.certs.trust_bundle()).expect("server config");
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
            Ok(_) => "accepted".to_string(),
            Err(e) => peer_cert_error(&e).map_or_else(
                || format!("other: {e}"),
                |r| match r {
                    PeerCertError::WrongTrustDomain { .. } => format!("trust domain: {r}"),
                    PeerCertError::Expired(_) => format!("expired: {r}"),
                    _ => format!("other: {r}"),
                },
            ),
        }
    });
    let ccfg = client_config(client_cert, &mesh.certs.trust_bundle(), &mesh.server).expect("cfg");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    // TLS 1.3: the client may finish before the server has judged its certificate; either way
    // no data may flow.
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(ccfg)
        .connect(placeholder_server_name(), tcp)
        .await
    {
        let mut b = [0u8; 1];
        assert!(
            !matches!(tls.read(&mut b).await, Ok(1)),
            "a rejected client must not receive data"
        );
    }
    server.await.expect("server task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_trust_domain_and_expired_client_certs_are_rejected_with_reasons() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    // Another mesh: its own CA and trust domain.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_ca = LocalCa::open(other_dir.path(), "other.td").expect("ca");
    let foreign = other_ca
        .issue(
            &"spiffe://other.td/ns/default/sa/client"
                .parse()
                .expect("id"),
        )
        .await
        .expect("cert");
    let reason = server_side_rejection(&mesh, &foreign).await;
    assert!(reason.starts_with("trust domain:"), "{reason}");
    assert!(reason.contains("other.td"), "{reason}");

    // Our CA, but expired an hour ago.
    let now = SystemTime::now();
    let expired = mesh
        .ca
        .issue_with_validity(
            &mesh.client,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .expect("cert");
    let reason = server_side_rejection(&mesh, &expired).await;
    assert!(reason.starts_with("expired:"), "{reason}");

    // And the real listener refuses both without serving a stream.
    for cert in [&foreign, &expired] {
        let ccfg = client_config(cert, &mesh.certs.trust_bundle(), &mesh.server).expect("cfg");
        let tcp = TcpStream::connect(mesh.inbound_addr)
            .await
            .expect("connect");
        if let Ok(tls) = tokio_rustls::TlsConnector::from(ccfg)
            .connect(placeholder_server_name(), tcp)
            .await
        {
            // The h2 handshake needs the server's SETTINGS, which a rejected client never gets.
            assert!(
                h2::client::handshake(tls).await.is_err() || mesh.inbound.active_streams() == 0
            );
        }
    }
    eventually("rejected connections to be released", || {
        mesh.inbound.active_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_http1_and_truncated_handshakes_are_dropped_without_leaks() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let mut clients = Vec::new();
    // Garbage.
    let mut s = TcpStream::connect(mesh.inbound_addr)
        .await
        .expect("connect");
    s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(1024))
        .await
        .expect("write");
    clients.push(s);
    // Plaintext HTTP/1.
    let mut s = TcpStream::connect(mesh.inbound_addr)
        .await
        .expect("connect");
    s.write_all(
        format!(
            "CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            mesh.echo, mesh.echo
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    clients.push(s);
    // Half a real ClientHello, then silence (must hit the handshake timeout).
    let cert = mesh.certs.get(&mesh.client).await.expect("cert");
    let cfg = client_config(&cert, &mesh.certs.trust_bundle(), &mesh.server).expect("cfg");
    let mut conn = rustls::ClientConnection::new(cfg, placeholder_server_name()).expect("conn");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("hello");
    let mut s = TcpStream::connect(mesh.inbound_addr)
        .await
        .expect("connect");
    s.write_all(&hello[..hello.len() / 2]).await.expect("write");
    clients.push(s);
    // A full TLS+h2 handshake that never sends a request (first-request timeout).
    let idle = mesh.h2_client(&mesh.client).await;

    for (i, mut s) in clients.into_iter().enumerate() {
        let mut buf = [0u8; 4096];
        // The server closes; whatever it sent first (an alert) is not a TLS session.
        let closed = tokio::time::timeout(DEADLINE, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "client {i} was not disconnected");
    }
    eventually("every inbound connection task to end", || {
        mesh.inbound.active_connections() == 0
    })
    .await;
    drop(idle);
    // Still serving.
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 4096).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_and_refuses_new() {
    drain_finishes_in_flight_and_refuses_new_on(Mesh::start(MeshOptions::default()).await).await;
}

/// Drain on `mesh`: an open connection keeps working and ends normally, every listener stops
/// accepting, the drain is clean and every serve task returns.
async fn drain_finishes_in_flight_and_refuses_new_on(mut mesh: Mesh) {
    let mut s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    s.write_all(b"before drain;").await.expect("write");
    let mut buf = [0u8; 13];
    s.read_exact(&mut buf).await.expect("echo");

    let trigger = mesh.trigger.take().expect("trigger");
    let deadline = test_config().drain_deadline;
    let drained = tokio::spawn(trigger.drain(deadline));
    // New connections are refused once the listeners are closed.
    let (out, inb) = (mesh.outbound_addr, mesh.inbound_addr);
    let start = Instant::now();
    loop {
        let a = TcpStream::connect(out).await.is_err();
        let b = TcpStream::connect(inb).await.is_err();
        if a && b {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "listeners still accept while draining"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The in-flight connection still works and finishes normally.
    s.write_all(b"during drain").await.expect("write");
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.expect("echo during drain");
    assert_eq!(&buf, b"during drain");
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("eof");
    assert_eq!(
        drained.await.expect("drain task"),
        drain::DrainOutcome::Clean
    );
    for t in mesh.tasks.drain(..) {
        tokio::time::timeout(DEADLINE, t)
            .await
            .expect("server returns")
            .expect("join");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_stuck_connections() {
    let mut opts = MeshOptions::default();
    opts.config.drain_deadline = Duration::from_millis(200);
    let mut mesh = Mesh::start(opts).await;
    let mut s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("echo");
    let trigger = mesh.trigger.take().expect("trigger");
    let outcome = trigger.drain(Duration::from_millis(200)).await;
    assert_eq!(outcome, drain::DrainOutcome::Forced);
    let n = tokio::time::timeout(DEADLINE, s.read(&mut b))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "a forced drain closes the app's socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_skips_tls_but_not_authorization() {
    let server = id("server");
    let mesh = Mesh::start(MeshOptions::default()).await;
    let resolver = Arc::new(StaticResolver(
        [(
            mesh.echo,
            Destination::Workload(Endpoint {
                addr: mesh.echo,
                identity: server.clone(),
                location: Location::SameNode,
            }),
        )]
        .into_iter()
        .collect(),
    ));
    let workloads: Arc<dyn LocalWorkloads> =
        Arc::new(StaticWorkloads::default().with(server_workload(mesh.echo, &server)));
    let redirects = Arc::new(FixedRedirect(Redirect {
        original_dst: mesh.echo,
        source: mesh.client.clone(),
        baggage: None,
    }));
    for (authz, allowed) in [
        (Arc::new(AllowAll) as Arc<dyn Authorizer>, true),
        (Arc::new(DenyIdentities(vec![mesh.client.clone()])), false),
    ] {
        let pool = Pool::new(test_config(), mesh.certs.clone());
        let outbound = Outbound::new(
            test_config(),
            pool.clone(),
            redirects.clone(),
            resolver.clone(),
            workloads.clone(),
            authz,
        );
        let listener = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_trigger, watch) = drain::channel();
        tokio::spawn(outbound.clone().serve(listener, watch));
        if allowed {
            let s = TcpStream::connect(addr).await.expect("connect");
            // Large enough that the copy's buffers grow to their limit.
            const TOTAL: u64 = 16 << 20;
            round_trip(s, TOTAL).await;
            assert_eq!(
                pool.connection_count(),
                0,
                "same node opens no HBONE connection"
            );
            eventually("the connection to be counted closed with its bytes", || {
                let t = outbound.metrics().totals();
                t.closed == 1 && t.sent_bytes == TOTAL && t.received_bytes == TOTAL
            })
            .await;
        } else {
            let n = bytes_before_close(addr).await;
            assert_eq!(n, 0, "denied same-node connection is closed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_endpoint_is_ejected_and_another_is_tried() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_hbone = closed.local_addr().expect("addr");
    drop(closed);
    let dead = Endpoint {
        addr: SocketAddr::from(([127, 0, 0, 9], mesh.echo.port())),
        identity: mesh.server.clone(),
        location: Location::Remote { hbone: dead_hbone },
    };
    let good = Endpoint {
        addr: mesh.echo,
        identity: mesh.server.clone(),
        location: Location::Remote {
            hbone: mesh.inbound_addr,
        },
    };
    let vip = SocketAddr::from(([10, 96, 0, 1], 80));
    let resolver = Arc::new(StaticResolver(
        [(
            vip,
            Destination::Service {
                hostname: "echo.default.svc.cluster.local".into(),
                endpoints: vec![dead, good],
            },
        )]
        .into_iter()
        .collect(),
    ));
    let pool = Pool::new(test_config(), mesh.certs.clone());
    let outbound = Outbound::new(
        test_config(),
        pool,
        Arc::new(FixedRedirect(Redirect {
            original_dst: vip,
            source: mesh.client.clone(),
            baggage: None,
        })),
        resolver,
        Arc::new(StaticWorkloads::default()),
        Arc::new(AllowAll),
    );
    let listener = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_trigger, watch) = drain::channel();
    tokio::spawn(outbound.serve(listener, watch));
    // Every connection succeeds: the dead endpoint is either ejected or retried past.
    for _ in 0..8 {
        let s = TcpStream::connect(addr).await.expect("connect");
        round_trip(s, 1024).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_evicted_and_reused_before() {
    let mut opts = MeshOptions::default();
    opts.config.pool_idle_timeout = Duration::from_millis(300);
    // No spreading: both streams share the one connection.
    opts.config.pool_max_connections_per_key = 1;
    let mesh = Mesh::start(opts).await;
    let key = PoolKey {
        source: mesh.client.clone(),
        hbone: mesh.inbound_addr,
        expected: mesh.server.clone(),
    };
    let pool = mesh.outbound.pool().clone();
    let a = pool
        .open(&key, mesh.echo, &http::HeaderMap::new())
        .await
        .expect("first stream");
    let b = pool
        .open(&key, mesh.echo, &http::HeaderMap::new())
        .await
        .expect("second stream");
    assert_eq!(
        a.connection_id, b.connection_id,
        "one connection carries both"
    );
    assert_eq!(pool.connection_count(), 1);
    drop((a, b));
    eventually("the idle connection to be evicted", || {
        pool.connection_count() == 0
    })
    .await;
    // A new request opens a fresh connection.
    let c = pool
        .open(&key, mesh.echo, &http::HeaderMap::new())
        .await
        .expect("third stream");
    assert_eq!(c.response.status(), http::StatusCode::OK);
    assert_eq!(pool.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let key = PoolKey {
        source: mesh.client.clone(),
        hbone: mesh.inbound_addr,
        expected: id("someone-else"),
    };
    let err = mesh
        .outbound
        .pool()
        .open(&key, mesh.echo, &http::HeaderMap::new())
        .await
        .err()
        .expect("must fail");
    assert!(err.is_connect_failure(), "{err}");
    assert!(err.to_string().contains("someone-else"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_address_listener_picks_the_certificate_from_sni() {
    // The inbound listens on 127.0.0.3, which is no workload's address (a node address).
    let mesh = Mesh::start(MeshOptions {
        inbound_ip: [127, 0, 0, 3],
        ..MeshOptions::default()
    })
    .await;
    // The pool sends SNI naming the server identity: served, byte-exact.
    let app = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect outbound");
    round_trip(app, 64 * 1024).await;
    // Without SNI the arrival address names no workload: the handshake is refused.
    let cert = mesh.certs.get(&mesh.client).await.expect("cert");
    let cfg = client_config(&cert, &mesh.certs.trust_bundle(), &mesh.server).expect("config");
    let tcp = TcpStream::connect(mesh.inbound_addr)
        .await
        .expect("connect");
    let no_sni = tokio_rustls::TlsConnector::from(cfg)
        .connect(placeholder_server_name(), tcp)
        .await;
    assert!(
        no_sni.is_err(),
        "a node-address listener has no certificate to present without SNI"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sni_a_node_address_presents_the_node_identity() {
    // A generic client dialling the node address by IP sends no SNI: with a node identity
    // configured, the server presents it and the stream may name any local workload.
    let node = id("nodemesh-agent");
    let mut config = test_config();
    config.node_identity = Some(node.clone());
    let mesh = Mesh::start(MeshOptions {
        config,
        inbound_ip: [127, 0, 0, 3],
        ..MeshOptions::default()
    })
    .await;
    let cert = mesh.certs.get(&mesh.client).await.expect("cert");
    let connect = |expected: SpiffeId| {
        let cfg = client_config(&cert, &mesh.certs.trust_bundle(), &expected).expect("config");
        let addr = mesh.inbound_addr;
        async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            tokio_rustls::TlsConnector::from(cfg)
                .connect(placeholder_server_name(), tcp)
                .await
        }
    };
    // The presented identity is the node's: a client expecting the workload's refuses it.
    assert!(connect(mesh.server.clone()).await.is_err());
    let tls = connect(node).await.expect("the node identity is presented");
    let (send, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let req = pool::connect_request(mesh.echo, &http::HeaderMap::new()).expect("req");
    let (resp, mut body) = send.send_request(req, false).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), http::StatusCode::OK);
    body.send_data(Bytes::from_static(b"via node"), true)
        .expect("data");
    let mut recv = resp.into_body();
    let mut echoed = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("chunk");
        let _ = recv.flow_control().release_capacity(chunk.len());
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, b"via node");
    // An authority that is no local workload is still refused.
    let mut send = send.ready().await.expect("ready");
    let other = SocketAddr::from(([127, 0, 0, 77], 80));
    let req = pool::connect_request(other, &http::HeaderMap::new()).expect("req");
    let (resp, _body) = send.send_request(req, false).expect("send");
    assert_eq!(
        resp.await.expect("response").status(),
        http::StatusCode::BAD_REQUEST
    );
}

#[test]
fn identity_server_names_are_stable_dns_labels() {
    let name = crate::identity::tls::identity_server_name(&id("server"));
    let (label, suffix) = name.split_at(32);
    assert_eq!(suffix, crate::identity::tls::SNI_SUFFIX);
    assert!(
        label
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    );
    // Fixed: peers of different versions must agree (SHA-256 of the SPIFFE URI; reference
    // value from Python's hashlib).
    assert_eq!(name, "ac792962aa7770bbda5abb1d6291b078.id.nodemesh.invalid");
    assert_ne!(
        name,
        crate::identity::tls::identity_server_name(&id("client"))
    );
    let w = Arc::new(server_workload(
        "10.0.0.1:1".parse().expect("addr"),
        &id("server"),
    ));
    assert_eq!(identity_by_sni([&w], &name), Some(id("server")));
    assert_eq!(identity_by_sni([&w], "example.com"), None);
}

/// Allows until switched off.
struct Switch(std::sync::atomic::AtomicBool);

impl Authorizer for Switch {
    fn authorize(&self, _: &AuthzRequest<'_>) -> AuthzDecision {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            AuthzDecision::Allow
        } else {
            AuthzDecision::Deny {
                reason: "switched off".into(),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_closes_connections_the_new_policy_denies() {
    let switch = Arc::new(Switch(true.into()));
    let mesh = Mesh::start(MeshOptions {
        inbound_authz: switch.clone(),
        ..MeshOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    s.write_all(b"allowed").await.expect("write");
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(
        mesh.inbound.reauthorize(),
        0,
        "still allowed: nothing closed"
    );

    switch.0.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(mesh.inbound.reauthorize(), 1);
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut b))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the revoked connection is closed");
    eventually("the stream to end", || mesh.inbound.active_streams() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_sends_hbone_request_shape() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    // A bare h2 server with the server workload's certificate records what arrives.
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let hbone = listener.local_addr().expect("addr");
    let cert = mesh.certs.get(&mesh.server).await.expect("cert");
    let cfg = server_config(&cert, &mesh.certs.trust_bundle()).expect("cfg");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(cfg)
            .accept(tcp)
            .await
            .expect("tls");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut conn = h2::server::handshake(tls).await.expect("h2");
        let (req, mut respond) = conn.accept().await.expect("request").expect("ok");
        let _ = tx.send(req.map(|_| ()));
        let _ = respond.send_response(http::Response::new(()), true);
        while conn.accept().await.is_some() {}
    });
    let vip = SocketAddr::from(([10, 96, 0, 1], 80));
    let ep = Endpoint {
        addr: mesh.echo,
        identity: mesh.server.clone(),
        location: Location::Remote { hbone },
    };
    let resolver = Arc::new(StaticResolver(
        [(
            vip,
            Destination::Service {
                hostname: "echo.default.svc.cluster.local".into(),
                endpoints: vec![ep],
            },
        )]
        .into_iter()
        .collect(),
    ));
    let outbound = Outbound::new(
        test_config(),
        Pool::new(test_config(), mesh.certs.clone()),
        Arc::new(FixedRedirect(Redirect {
            original_dst: vip,
            source: mesh.client.clone(),
            baggage: Some("k8s.namespace.name=default".into()),
        })),
        resolver,
        Arc::new(StaticWorkloads::default()),
        Arc::new(AllowAll),
    );
    let listener = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_trigger, watch) = drain::channel();
    tokio::spawn(outbound.serve(listener, watch));
    let app = TcpStream::connect(addr).await.expect("connect");
    let app_addr = app.local_addr().expect("addr");
    let req = tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("request in time")
        .expect("request");
    assert_eq!(req.method(), http::Method::CONNECT);
    assert_eq!(
        req.uri().authority().map(|a| a.as_str().to_string()),
        Some(mesh.echo.to_string())
    );
    assert_eq!(req.uri().path_and_query(), None, "CONNECT has no :path");
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        h("forwarded").as_deref(),
        Some(format!("for=\"{app_addr}\";host=echo.default.svc.cluster.local").as_str())
    );
    assert_eq!(h("baggage").as_deref(), Some("k8s.namespace.name=default"));
    let tp = h("traceparent").expect("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len()),
        ("00", 32, 16),
        "{tp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_closes_a_connection_to_an_unresponsive_peer() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    // A peer that completes the handshakes and then never reads again (a hung node).
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let hbone = listener.local_addr().expect("addr");
    let cert = mesh.certs.get(&mesh.server).await.expect("cert");
    let cfg = server_config(&cert, &mesh.certs.trust_bundle()).expect("cfg");
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(cfg)
            .accept(tcp)
            .await
            .expect("tls");
        let conn = h2::server::handshake(tls).await.expect("h2");
        // Hold the connection without polling it until the test ends.
        let _ = hold_rx.await;
        drop(conn);
    });
    let config = TunnelConfig {
        // The response times out well before the first PING, so the request fails with
        // ResponseTimeout (not retried) and only the keepalive can close the connection. A
        // keepalive close first would fail the request as a closed connection, which `open`
        // retries on a fresh connection that this one-shot peer never answers.
        response_timeout: Duration::from_millis(100),
        keepalive_interval: Duration::from_millis(500),
        keepalive_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let pool = Pool::new(config, mesh.certs.clone());
    let key = PoolKey {
        source: mesh.client.clone(),
        hbone,
        expected: mesh.server.clone(),
    };
    let err = pool
        .open(&key, mesh.echo, &http::HeaderMap::new())
        .await
        .err()
        .expect("no answer from a hung peer");
    assert!(
        matches!(err, pool::PoolError::ResponseTimeout { .. }),
        "{err}"
    );
    eventually("keepalive to close the connection", || {
        pool.connection_count() == 0
    })
    .await;
    let _ = hold_tx.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_closes_connections_idle_without_streams() {
    let mut opts = MeshOptions::default();
    opts.config.inbound_idle_timeout = Duration::from_millis(200);
    let mesh = Mesh::start(opts).await;
    let mut send = mesh
        .h2_client(&mesh.client)
        .await
        .ready()
        .await
        .expect("ready");
    let req = pool::connect_request(mesh.echo, &http::HeaderMap::new()).expect("req");
    let (resp, mut body) = send.send_request(req, false).expect("send");
    assert_eq!(resp.await.expect("resp").status(), http::StatusCode::OK);
    body.send_data(Bytes::new(), true).expect("end");
    eventually("the idle connection to be closed", || {
        mesh.inbound.active_connections() == 0
    })
    .await;
}

/// Collects formatted log lines (thread-local subscriber; the test runs on one thread).
#[derive(Clone, Default)]
struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// Current-thread runtime: every task runs on this thread, so the thread-local subscriber sees
/// the verifier's and the inbound's logs.
#[tokio::test]
async fn rejected_certificates_are_logged_with_their_reason() {
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let mesh = Mesh::start(MeshOptions::default()).await;
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_ca = LocalCa::open(other_dir.path(), "other.td").expect("ca");
    let foreign = other_ca
        .issue(
            &"spiffe://other.td/ns/default/sa/client"
                .parse()
                .expect("id"),
        )
        .await
        .expect("cert");
    let now = SystemTime::now();
    let expired = mesh
        .ca
        .issue_with_validity(
            &mesh.client,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .expect("cert");
    for cert in [&foreign, &expired] {
        let ccfg = client_config(cert, &mesh.certs.trust_bundle(), &mesh.server).expect("cfg");
        let tcp = TcpStream::connect(mesh.inbound_addr)
            .await
            .expect("connect");
        if let Ok(mut tls) = tokio_rustls::TlsConnector::from(ccfg)
            .connect(placeholder_server_name(), tcp)
            .await
        {
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
        }
    }
    eventually("rejections to be handled", || {
        let t = logs.text();
        t.matches("inbound connection rejected").count() >= 2
    })
    .await;
    let text = logs.text();
    assert!(text.contains("rejected client certificate"), "{text}");
    assert!(text.contains("trust domain `other.td`"), "{text}");
    assert!(text.contains("certificate expired"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_bytes_and_denials() {
    use super::metrics::{Reporter, TrafficLabels, flags};
    let mesh = Mesh::start(MeshOptions::default()).await;
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 10_000).await;
    let labels = |reporter, response_flags| TrafficLabels {
        reporter,
        source_principal: mesh.client.to_string(),
        destination_principal: mesh.server.to_string(),
        destination_service: "unknown".into(),
        connection_security_policy: "mutual_tls",
        response_flags,
        source_addr: None,
        destination_addr: None,
    };
    let src = labels(Reporter::Source, flags::NONE);
    let dst = labels(Reporter::Destination, flags::NONE);
    eventually("both sides to record the close", || {
        mesh.outbound.metrics().get(&src).closed == 1
            && mesh.inbound.metrics().get(&dst).closed == 1
    })
    .await;
    for (m, l) in [
        (mesh.outbound.metrics(), &src),
        (mesh.inbound.metrics(), &dst),
    ] {
        let c = m.get(l);
        assert_eq!(
            (c.opened, c.sent_bytes, c.received_bytes),
            (1, 10_000, 10_000),
            "{l:?}"
        );
    }
    assert!(
        mesh.outbound
            .metrics()
            .render()
            .contains("istio_tcp_connections_closed_total{reporter=\"source\"")
    );

    // A denial is a failed connection on both sides, flagged DENY.
    let denied = Mesh::start(MeshOptions {
        inbound_authz: Arc::new(DenyIdentities(vec![id("client")])),
        ..MeshOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(denied.outbound_addr)
        .await
        .expect("connect");
    let mut b = [0u8; 1];
    let _ = tokio::time::timeout(DEADLINE, s.read(&mut b)).await;
    // Same identities in both meshes, so the same labels.
    let src = labels(Reporter::Source, flags::DENY);
    let dst = labels(Reporter::Destination, flags::DENY);
    eventually("both sides to count the denial", || {
        denied.outbound.metrics().get(&src).failed == 1
            && denied.inbound.metrics().get(&dst).failed == 1
    })
    .await;
}

mod endpoint_failures;
mod handshake_metrics;
mod metrics_endpoint;
mod outbound_handshake;
mod pool_spread;
mod sharded;
mod workload_labels;
