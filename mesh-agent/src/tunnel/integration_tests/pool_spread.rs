//! Pool spreading (issue 15): concurrent streams to one peer get their own HBONE connections up
//! to the per-key bound, then stack on the least loaded one; sequential streams reuse one
//! connection; a connection the peer closes is replaced by the next request that needs one.

use std::{collections::HashMap, sync::Mutex};

use super::*;
use crate::tunnel::pool::PooledStream;

fn key(mesh: &Mesh) -> PoolKey {
    PoolKey {
        source: mesh.client.clone(),
        hbone: mesh.inbound_addr,
        expected: mesh.server.clone(),
    }
}

async fn open(mesh: &Mesh, what: &str) -> PooledStream {
    let s = mesh
        .outbound
        .pool()
        .open(&key(mesh), mesh.echo, &http::HeaderMap::new())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(s.response.status(), http::StatusCode::OK, "{what}");
    s
}

/// Sends `msg` on the stream and reads the echo pod's answer back.
async fn echo(stream: &mut PooledStream, msg: &'static [u8]) {
    stream
        .send
        .send_data(Bytes::from_static(msg), false)
        .expect("send");
    let mut got = Vec::new();
    while got.len() < msg.len() {
        let chunk = tokio::time::timeout(DEADLINE, stream.recv.data())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("data");
        let _ = stream.recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, msg);
}

fn options(max_connections: usize, spread: usize) -> MeshOptions {
    let mut opts = MeshOptions::default();
    opts.config.pool_max_connections_per_key = max_connections;
    opts.config.pool_spread_streams = spread;
    opts
}

/// Shards (issue 15): a stream rides only connections its own shard's thread drives, so two
/// shards streaming to one peer at once hold one connection each even with a bound of one
/// connection per key, and each shard reuses its own.
#[test]
fn shards_never_share_a_connection() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mesh = Arc::new(rt.block_on(Mesh::start(options(1, 1))));
    let (ids_tx, ids_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let stop_rx = Arc::new(Mutex::new(stop_rx));
    let shards: Vec<_> = (0..2)
        .map(|shard| {
            let (mesh, ids_tx, stop_rx) = (mesh.clone(), ids_tx.clone(), stop_rx.clone());
            std::thread::spawn(move || {
                shard_id::act_as(shard + 1);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("shard runtime");
                rt.block_on(async {
                    let mut first = open(&mesh, &format!("shard {shard}, first")).await;
                    echo(&mut first, b"from a shard").await;
                    let id = first.connection_id;
                    drop(first);
                    let mut second = open(&mesh, &format!("shard {shard}, second")).await;
                    echo(&mut second, b"again").await;
                    ids_tx
                        .send((shard, id, second.connection_id))
                        .expect("report");
                    // Hold the stream (and this runtime, which drives the connection) until
                    // both shards have reported.
                    let _ = stop_rx.lock().map(|rx| rx.recv());
                });
            })
        })
        .collect();
    let mut ids: Vec<(usize, u64, u64)> = (0..2)
        .map(|_| ids_rx.recv_timeout(DEADLINE).expect("both shards stream"))
        .collect();
    ids.sort_unstable();
    for &(shard, first, second) in &ids {
        assert_eq!(
            first, second,
            "shard {shard} reuses its connection: {ids:?}"
        );
    }
    assert_ne!(
        ids[0].1, ids[1].1,
        "each shard has its own connection: {ids:?}"
    );
    assert_eq!(mesh.outbound.pool().connection_count(), 2);
    for _ in 0..2 {
        let _ = stop_tx.send(());
    }
    for t in shards {
        t.join().expect("shard thread");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_bound_is_the_runtime_workers() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    assert_eq!(mesh.outbound.pool().max_connections_per_key(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_streams_reuse_one_connection() {
    let mesh = Mesh::start(options(3, 1)).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut s = open(&mesh, &format!("stream {i}")).await;
        echo(&mut s, b"one at a time").await;
        ids.push(s.connection_id);
    }
    assert!(ids.iter().all(|&id| id == ids[0]), "connections {ids:?}");
    assert_eq!(mesh.outbound.pool().connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_spread_up_to_the_bound_then_balance() {
    let mesh = Mesh::start(options(3, 1)).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(open(&mesh, &format!("stream {i}")).await);
    }
    let first: Vec<u64> = held.iter().map(|s| s.connection_id).collect();
    assert!(
        first[0] != first[1] && first[1] != first[2] && first[0] != first[2],
        "three concurrent streams on three connections: {first:?}"
    );
    // Past the bound: no new connection, streams go to the least loaded one.
    for i in 3..10 {
        held.push(open(&mesh, &format!("stream {i}")).await);
    }
    assert_eq!(mesh.outbound.pool().connection_count(), 3, "bounded");
    let mut per_conn: HashMap<u64, usize> = HashMap::new();
    for s in &held {
        *per_conn.entry(s.connection_id).or_default() += 1;
    }
    let (lo, hi) = (
        per_conn.values().min().copied().unwrap_or(0),
        per_conn.values().max().copied().unwrap_or(0),
    );
    assert!(hi - lo <= 1, "10 streams balanced over 3: {per_conn:?}");
    for s in &mut held {
        echo(s, b"all carry data").await;
    }
    assert_eq!(mesh.outbound.pool().stream_count(), 10);
    drop(held);
    eventually("slots released", || {
        mesh.outbound.pool().stream_count() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_threshold_counts_streams_per_connection() {
    // A new connection only once the least loaded one carries two streams.
    let mesh = Mesh::start(options(4, 2)).await;
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(open(&mesh, &format!("stream {i}")).await);
    }
    let ids: Vec<u64> = held.iter().map(|s| s.connection_id).collect();
    assert_eq!(ids[0], ids[1], "{ids:?}");
    assert_ne!(ids[1], ids[2], "{ids:?}");
    assert_eq!(ids[2], ids[3], "{ids:?}");
    assert!(!ids[..4].contains(&ids[4]), "{ids:?}");
    assert_eq!(mesh.outbound.pool().connection_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_peer_closes_is_replaced() {
    let mut opts = options(2, 1);
    // The server closes connections without streams quickly; the pool would keep them.
    opts.config.inbound_idle_timeout = Duration::from_millis(300);
    opts.config.pool_idle_timeout = Duration::from_secs(600);
    let mesh = Mesh::start(opts).await;
    let pool = mesh.outbound.pool().clone();
    let mut a = open(&mesh, "a").await;
    let b = open(&mesh, "b").await;
    assert_ne!(a.connection_id, b.connection_id);
    assert_eq!(pool.connection_count(), 2);
    let closed = b.connection_id;
    drop(b);
    eventually("the peer's close to leave the pool", || {
        pool.connection_count() == 1
    })
    .await;
    // `a` still holds a stream on its connection, so the next one gets a fresh connection.
    let mut c = open(&mesh, "c").await;
    assert_ne!(c.connection_id, closed, "not the closed connection");
    assert_ne!(c.connection_id, a.connection_id, "spread, not stacked");
    assert_eq!(pool.connection_count(), 2);
    echo(&mut a, b"still served").await;
    echo(&mut c, b"replacement works").await;
}
