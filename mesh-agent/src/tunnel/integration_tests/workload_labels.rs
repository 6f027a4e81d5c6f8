//! Istio workload labels on both reporters of a real tunneled connection: the outbound resolves
//! the app's address and the endpoint, the inbound the `forwarded: for=` and the authority, and
//! the inbound takes the service from `forwarded: host=`; all through the directory the wiring
//! installs, and no address ends up in a label.

use std::collections::HashMap;

use super::*;
use crate::tunnel::metrics::{WorkloadDirectory, WorkloadMeta};

struct Directory(HashMap<IpAddr, Arc<WorkloadMeta>>);

impl WorkloadDirectory for Directory {
    fn workload(&self, ip: IpAddr) -> Option<Arc<WorkloadMeta>> {
        self.0.get(&ip.to_canonical()).cloned()
    }
    fn is_service(&self, hostname: &str) -> bool {
        hostname == "echo.default.svc.cluster.local"
    }
}

fn meta(identity: &SpiffeId, name: &str, app: &str) -> Arc<WorkloadMeta> {
    let labels = [("app".to_owned(), app.to_owned())].into_iter().collect();
    Arc::new(WorkloadMeta::from_labels(
        identity.to_string(),
        name.into(),
        "default".into(),
        &labels,
    ))
}

fn has_all(text: &str, reporter: &str, want: &[&str]) -> bool {
    text.lines().any(|l| {
        l.starts_with(&format!(
            "istio_tcp_connections_closed_total{{reporter=\"{reporter}\""
        )) && want.iter().all(|w| l.contains(w))
            && l.ends_with(" 1")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_reporters_name_the_workloads_and_the_service() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let directory: Arc<dyn WorkloadDirectory> = Arc::new(Directory(
        [
            (
                IpAddr::from([127, 0, 0, 1]),
                meta(&mesh.client, "client-deploy", "shop"),
            ),
            (mesh.echo.ip(), meta(&mesh.server, "echo-deploy", "echo")),
        ]
        .into_iter()
        .collect(),
    ));
    mesh.outbound.metrics().set_directory(directory.clone());
    mesh.inbound.metrics().set_directory(directory.clone());

    // To the pod's address: no service.
    let s = TcpStream::connect(mesh.outbound_addr)
        .await
        .expect("connect");
    round_trip(s, 1000).await;
    eventually("both sides to record the close", || {
        mesh.outbound.metrics().totals().closed == 1 && mesh.inbound.metrics().totals().closed == 1
    })
    .await;
    let workloads = [
        "source_workload=\"client-deploy\"",
        "source_workload_namespace=\"default\"",
        "source_app=\"shop\"",
        "source_canonical_service=\"shop\"",
        "destination_workload=\"echo-deploy\"",
        "destination_workload_namespace=\"default\"",
        "destination_app=\"echo\"",
        "destination_canonical_revision=\"latest\"",
    ];
    let mut want = workloads.to_vec();
    want.push("destination_service=\"unknown\"");
    for (reporter, m) in [
        ("source", mesh.outbound.metrics()),
        ("destination", mesh.inbound.metrics()),
    ] {
        let text = m.render();
        assert!(has_all(&text, reporter, &want), "{reporter}:\n{text}");
        assert!(!text.contains("127.0.0."), "an address in a label:\n{text}");
    }

    // Through a service VIP: the outbound knows the service, and the inbound learns it from
    // the `forwarded` header.
    let vip = SocketAddr::from(([10, 96, 0, 1], 80));
    let ep = Endpoint {
        addr: mesh.echo,
        identity: mesh.server.clone(),
        location: Location::Remote {
            hbone: mesh.inbound_addr,
        },
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
            baggage: None,
        })),
        resolver,
        Arc::new(StaticWorkloads::default()),
        Arc::new(AllowAll),
    );
    outbound.metrics().set_directory(directory);
    let listener = bind_exclusive("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_trigger, watch) = drain::channel();
    tokio::spawn(outbound.clone().serve(listener, watch));
    let s = TcpStream::connect(addr).await.expect("connect");
    round_trip(s, 1000).await;
    eventually("both sides to record the second close", || {
        outbound.metrics().totals().closed == 1 && mesh.inbound.metrics().totals().closed == 2
    })
    .await;
    let mut want = workloads.to_vec();
    want.extend([
        "destination_service=\"echo.default.svc.cluster.local\"",
        "destination_service_name=\"echo\"",
        "destination_service_namespace=\"default\"",
    ]);
    for (reporter, text) in [
        ("source", outbound.metrics().render()),
        ("destination", mesh.inbound.metrics().render()),
    ] {
        assert!(has_all(&text, reporter, &want), "{reporter}:\n{text}");
    }
}
