//! Shards (issue 15): a tunnel with `shards: 2` serves on two threads, each with its own
//! `SO_REUSEPORT` listeners and its own HBONE connections, and drains like an unsharded one.

use super::*;

fn sharded() -> MeshOptions {
    let mut opts = MeshOptions {
        reuseport: true,
        ..MeshOptions::default()
    };
    opts.config.shards = 2;
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn connections_spread_over_shards_each_with_its_own_hbone_connection() {
    const N: usize = 64;
    let mesh = Mesh::start(sharded()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let addr = mesh.outbound_addr;
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let msg = format!("hello from connection {i}\n");
            s.write_all(msg.as_bytes()).await.expect("write");
            let mut buf = vec![0u8; msg.len()];
            tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
                .await
                .expect("echo in time")
                .expect("echo");
            assert_eq!(buf, msg.as_bytes());
            s
        });
    }
    let mut open = Vec::new();
    while let Some(s) = tasks.join_next().await {
        open.push(s.expect("connection task"));
    }
    // The kernel spread 64 connections over both outbound listeners (all on one: 2^-63), and
    // each shard carried its streams on a connection of its own.
    assert_eq!(mesh.outbound.pool().connection_count(), 2);
    // A byte-exact bulk transfer through a sharded tunnel.
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 8 << 20).await;
    drop(open);
    eventually("every stream ends", || {
        mesh.inbound.active_streams() == 0 && mesh.outbound.active_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_sharded_tunnel_drains_in_flight_and_refuses_new() {
    let mesh = Mesh::start(sharded()).await;
    assert_eq!(mesh.tasks.len(), 2, "one task per shard");
    // Every shard's listeners close (none accepts on either address), the in-flight connection
    // finishes, and each shard's task returns.
    drain_finishes_in_flight_and_refuses_new_on(mesh).await;
}
