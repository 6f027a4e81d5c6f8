//! The lab's two nodes in Kubernetes mode, end to end (root, real eBPF, a real kube-apiserver):
//! `mesh-agent node` on each node, fed by the API server with the `nodemesh-agent`
//! ServiceAccount's own token and the chart's RBAC; pods made the way a kubelet makes them
//! (`nodemesh_tests::k8s_cluster`). Every assertion is made through real connections from a pod:
//! a connection went through the mesh when the server sees it coming from its node's tunnel
//! address, and around it when it sees the client pod's address.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use nodemesh_tests::{
    cluster::Echo,
    k8s_cluster::{ENROLL, KCluster, NS, TUNNEL_A, TUNNEL_B, until},
};

const CONVERGE: Duration = Duration::from_secs(20);

fn at(ip: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(ip.parse()?, port))
}

/// The source address `echo` saw for one round trip from `from` to `dst` (none: it failed).
fn seen_from(c: &KCluster, echo: &Echo, from: &str, dst: SocketAddr) -> Result<String> {
    c.roundtrip(from, dst)?;
    Ok(echo.next_peer()?.ip().to_string())
}

const DENY_CLIENT: &str = r#"apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
"#;

#[test]
fn pods_policies_and_endpoints_converge_on_both_nodes() -> Result<()> {
    let mut c = KCluster::up(true)?;
    c.add_pod("client", "client", "client", 0)?;
    c.add_pod("server-a", "server", "server", 0)?;
    c.add_pod("server-b", "server", "server", 1)?;
    c.start_agents()?;
    let echo_a = Echo::start(&c.pod("server-a")?.pod, 8080)?;
    let echo_b = Echo::start(&c.pod("server-b")?.pod, 8080)?;
    let server_b = at(&c.pod("server-b")?.pod.ip, 8080)?;
    let server_a = at(&c.pod("server-a")?.pod.ip, 8080)?;

    // Captured: cross node through both tunnels, same node through node a's.
    let from = seen_from(&c, &echo_b, "client", server_b).with_context(|| c.logs())?;
    assert_eq!(from, TUNNEL_B, "cross node, through the mesh\n{}", c.logs());
    let from = seen_from(&c, &echo_a, "client", server_a).with_context(|| c.logs())?;
    assert_eq!(from, TUNNEL_A, "same node, through the mesh\n{}", c.logs());

    // A DENY policy converges on both nodes: refused cross node and same node.
    c.cp.apply(DENY_CLIENT)?;
    until("the DENY to take effect on both nodes", CONVERGE, || {
        Ok(c.roundtrip("client", server_b).is_err() && c.roundtrip("client", server_a).is_err())
    })
    .with_context(|| c.logs())?;
    c.cp.kubectl(&["delete", "authorizationpolicy", "deny-client", "-n", NS])?;
    until("the DENY's removal to take effect", CONVERGE, || {
        Ok(c.roundtrip("client", server_b).is_ok() && c.roundtrip("client", server_a).is_ok())
    })
    .with_context(|| c.logs())?;
    echo_a.accepted();
    echo_b.accepted();

    // A Service whose endpoints change: the VIP follows its EndpointSlice.
    let vip = at("10.96.0.50", 80)?;
    c.cp.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: {NS}}}\n\
         spec:\n  clusterIP: 10.96.0.50\n  selector: {{app: server}}\n  ports:\n  \
         - {{port: 80, targetPort: 8080, protocol: TCP}}\n"
    ))?;
    let slice = |pods: &[&str]| -> Result<String> {
        let mut eps = String::new();
        for p in pods {
            let pod = c.pod(p)?;
            eps.push_str(&format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {}\n  \
                 targetRef: {{kind: Pod, name: {p}, namespace: {NS}, uid: {}}}\n",
                pod.pod.ip,
                ["node-a", "node-b"][pod.node],
                pod.uid
            ));
        }
        Ok(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  \
             namespace: {NS}\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\n\
             ports:\n- {{port: 8080, protocol: TCP}}\nendpoints:\n{eps}"
        ))
    };
    c.cp.apply(&slice(&["server-b"])?)?;
    until("the VIP to reach server-b", CONVERGE, || {
        Ok(c.roundtrip("client", vip).is_ok())
    })
    .with_context(|| c.logs())?;
    for _ in 0..6 {
        c.roundtrip("client", vip)?;
    }
    assert_eq!(echo_a.accepted(), 0, "only server-b is an endpoint");
    assert!(echo_b.accepted() >= 7);
    c.cp.apply(&slice(&["server-a"])?)?;
    until("the VIP to move to server-a", CONVERGE, || {
        c.roundtrip("client", vip)?;
        Ok(echo_a.accepted() > 0)
    })
    .with_context(|| c.logs())?;
    echo_b.accepted();
    for _ in 0..6 {
        c.roundtrip("client", vip)?;
    }
    assert_eq!(echo_b.accepted(), 0, "server-b is no longer an endpoint");

    // A pod deleted and added again on the other node (a new UID, a new address): reached
    // through the mesh at its new place.
    drop(echo_b);
    c.delete_pod("server-b")?;
    c.add_pod("server-b2", "server", "server", 0)?;
    let echo_b2 = Echo::start(&c.pod("server-b2")?.pod, 8080)?;
    let moved = at(&c.pod("server-b2")?.pod.ip, 8080)?;
    until(
        "the re-added pod to be reached through the mesh",
        CONVERGE,
        || Ok(seen_from(&c, &echo_b2, "client", moved)? == TUNNEL_A),
    )
    .with_context(|| c.logs())?;
    Ok(())
}

#[test]
fn labelling_a_namespace_enrolls_running_pods_without_resetting_their_connections() -> Result<()> {
    let mut c = KCluster::up(false)?;
    c.add_pod("client", "client", "client", 0)?;
    c.add_pod("server-b", "server", "server", 1)?;
    c.start_agents()?;
    let echo = Echo::start(&c.pod("server-b")?.pod, 8080)?;
    let server = at(&c.pod("server-b")?.pod.ip, 8080)?;
    let client_ip = c.pod("client")?.pod.ip.clone();

    // Not enrolled: direct.
    assert_eq!(seen_from(&c, &echo, "client", server)?, client_ip);
    let mut before = c.hold("client", server)?;
    assert_eq!(echo.next_peer()?.ip().to_string(), client_ip);
    echo_round(&mut before, b"before")?;

    // Enrolled by the label: new connections through the mesh, the open one untouched.
    c.cp.kubectl(&["label", "namespace", NS, ENROLL])?;
    until("new connections to go through the mesh", CONVERGE, || {
        Ok(seen_from(&c, &echo, "client", server)? == TUNNEL_B)
    })
    .with_context(|| c.logs())?;
    echo_round(&mut before, b"still-open")?;
    let mut meshed = c.hold("client", server)?;
    echo.accepted();
    echo_round(&mut meshed, b"meshed")?;

    // Un-enrolled: new connections direct again; both open ones keep working.
    c.cp.kubectl(&["label", "namespace", NS, "nodemesh.io/dataplane-"])?;
    until("new connections to go direct again", CONVERGE, || {
        Ok(seen_from(&c, &echo, "client", server)? == client_ip)
    })
    .with_context(|| c.logs())?;
    echo_round(&mut before, b"plain-survives")?;
    echo_round(&mut meshed, b"mesh-survives")?;
    Ok(())
}

#[test]
fn apiserver_restart_keeps_traffic_and_converges_after() -> Result<()> {
    let mut c = KCluster::up(true)?;
    c.add_pod("client", "client", "client", 0)?;
    c.add_pod("server-b", "server", "server", 1)?;
    c.start_agents()?;
    let echo = Echo::start(&c.pod("server-b")?.pod, 8080)?;
    let server = at(&c.pod("server-b")?.pod.ip, 8080)?;
    assert_eq!(seen_from(&c, &echo, "client", server)?, TUNNEL_B);

    c.cp.restart_apiserver()?;
    // While the watches reconnect, nothing was cleared: still through the mesh.
    for _ in 0..5 {
        assert_eq!(
            seen_from(&c, &echo, "client", server).with_context(|| c.logs())?,
            TUNNEL_B
        );
    }
    // And the agents converge on what changed since.
    c.cp.apply(DENY_CLIENT)?;
    until(
        "the DENY after the restart",
        Duration::from_secs(60),
        || Ok(c.roundtrip("client", server).is_err()),
    )
    .with_context(|| c.logs())?;
    for a in &c.agents {
        ensure!(
            !a.logs().contains("panicked"),
            "an agent panicked:\n{}",
            a.logs()
        );
    }
    Ok(())
}

fn ca_log(c: &KCluster) -> String {
    c.ca.as_ref().map(|ca| ca.logs()).unwrap_or_default()
}

/// The CA's Secret (`nodemesh-cacerts`) as file name → PEM text, read as admin.
fn ca_files(c: &KCluster) -> Result<serde_json::Map<String, serde_json::Value>> {
    let json: serde_json::Value = serde_json::from_str(&c.cp.kubectl(&[
        "get",
        "secret",
        "nodemesh-cacerts",
        "-n",
        "nodemesh-system",
        "-o",
        "json",
    ])?)?;
    json["data"]
        .as_object()
        .cloned()
        .context("the CA Secret has no data")
}

/// Replaces the CA Secret's data (values base64, as `ca_files` returns them).
fn put_ca_files(c: &KCluster, data: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "nodemesh-cacerts", "namespace": "nodemesh-system"},
        "data": data,
    });
    let out = c.cp.kubectl_output(
        c.cp.admin_kubeconfig(),
        &["replace", "-f", "-"],
        Some(&secret.to_string()),
    )?;
    ensure!(
        out.status.success(),
        "kubectl replace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn b64(text: &str) -> serde_json::Value {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(text)
        .into()
}

fn unb64(v: &serde_json::Value) -> Result<String> {
    use base64::Engine as _;
    Ok(String::from_utf8(
        base64::engine::general_purpose::STANDARD.decode(v.as_str().context("not a string")?)?,
    )?)
}

#[test]
fn certificates_come_from_the_mesh_ca_and_a_root_rotation_refuses_no_connection() -> Result<()> {
    let mut c = KCluster::up(true)?;
    c.add_pod("client", "client", "client", 0)?;
    c.add_pod("server-b", "server", "server", 1)?;
    c.start_ca()?;
    c.start_agents()?;
    let echo = Echo::start(&c.pod("server-b")?.pod, 8080)?;
    let server = at(&c.pod("server-b")?.pod.ip, 8080)?;
    assert_eq!(
        seen_from(&c, &echo, "client", server).with_context(|| c.logs())?,
        TUNNEL_B
    );
    for id in [
        "spiffe://cluster.local/ns/demo/sa/client",
        "spiffe://cluster.local/ns/demo/sa/server",
    ] {
        ensure!(
            ca_log(&c)
                .lines()
                .any(|l| l.contains("certificate signed") && l.contains(id)),
            "the CA signed no certificate for {id}:\n{}",
            c.logs()
        );
    }
    for a in &c.agents {
        ensure!(
            a.logs().contains("certificates from the mesh CA") && !a.logs().contains("local CA"),
            "an agent did not use the mesh CA:\n{}",
            a.logs()
        );
    }
    let mut held = c.hold("client", server)?;
    echo_round(&mut held, b"before-rotation")?;

    // Traffic flows through the whole rotation: a connection held open, and new connections
    // one after the other from a second thread. Not one may fail.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = std::thread::scope(|s| -> Result<(usize, Vec<String>)> {
        let traffic = s.spawn(|| {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.roundtrip("client", server) {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            (ok, failed)
        });
        let result = (|| -> Result<()> {
            // Step 1: a new root joins the bundle; both agents see it.
            let mut files = ca_files(&c)?;
            let old_bundle = unb64(&files["root-cert.pem"])?;
            let (new_cert, new_key) =
                mesh_agent::identity::local_ca::generate_root("cluster.local")?;
            files.insert(
                "root-cert.pem".into(),
                b64(&format!("{old_bundle}{new_cert}")),
            );
            put_ca_files(&c, &files)?;
            until("both agents to trust both roots", CONVERGE, || {
                Ok(c.agents
                    .iter()
                    .all(|a| a.logs().contains("trust bundle updated")))
            })?;
            echo_round(&mut held, b"after-step-1")?;
            // Step 2: the CA signs with the new root; a new workload gets a new-root
            // certificate and talks to one holding an old-root certificate, both ways trusted.
            files.insert("ca-cert.pem".into(), b64(&new_cert));
            files.insert("ca-key.pem".into(), b64(&new_key));
            put_ca_files(&c, &files)?;
            until("the CA to sign with the new root", CONVERGE, || {
                Ok(ca_log(&c).matches("CA root (re)loaded").count() >= 3)
            })?;
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?;
        result.with_context(|| c.logs())?;
        Ok((ok, failed))
    })?;
    ensure!(
        failed.is_empty(),
        "{} of {} connections failed during the rotation: {:?}\n{}",
        failed.len(),
        ok + failed.len(),
        failed,
        c.logs()
    );
    ensure!(ok > 0, "no connection was made during the rotation");
    echo_round(&mut held, b"after-step-2")?;
    c.add_pod("client2", "client2", "client", 0)?;
    until(
        "a new-root workload to reach an old-root one",
        CONVERGE,
        || {
            c.roundtrip("client2", server)?;
            Ok(ca_log(&c).lines().any(|l| {
                l.contains("certificate signed")
                    && l.contains("spiffe://cluster.local/ns/demo/sa/client2")
            }))
        },
    )
    .with_context(|| c.logs())?;
    Ok(())
}

/// Writes `msg` on `s` and reads the echo back.
fn echo_round(s: &mut std::net::TcpStream, msg: &[u8]) -> Result<()> {
    use std::io::{Read, Write};
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)
        .with_context(|| format!("echo of {:?}", String::from_utf8_lossy(msg)))?;
    ensure!(buf == msg, "echo mismatch");
    Ok(())
}
