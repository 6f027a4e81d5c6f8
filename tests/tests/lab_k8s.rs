//! The lab in Kubernetes mode as a new user runs it (docs/kubernetes-mode.md, "Try it on the
//! lab"): `nm-lab up --kubernetes` (what `cargo xtask lab up --kubernetes` runs), `helm install`
//! of the real chart with the lab's admin kubeconfig, `kubectl rollout status`, the namespace
//! label, a connection from client-a to server-b through the mesh (the server sees its node's
//! tunnel address, both agents' access lines carry both SPIFFE IDs, the metrics count it), a DENY AuthorizationPolicy applied with kubectl
//! and the same connection refused, then `nm-lab down` leaving no namespace, cgroup, mount,
//! process or state behind. Root; own prefix `nmlabk` and state directory, so it runs beside a
//! user's lab and the other lab tests.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use nodemesh_tests::{
    k8s::Binaries,
    k8s_cluster::until,
    lab::{self, Lab},
    lab_k8s, require_root, run,
};

const PREFIX: &str = "nmlabk";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// `nm-lab --prefix … --state-dir … ARGS`, as `cargo xtask lab ARGS` runs it.
fn nm_lab(lab: &Lab, args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_nm-lab"))
        .args(["--prefix", lab.prefix(), "--state-dir"])
        .arg(lab.state_dir())
        .args(args)
        .current_dir(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .context("root")?,
        )
        .output()
        .context("cannot run nm-lab")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// helm as the user runs it: the lab's kubeconfig in KUBECONFIG.
fn helm(lab: &Lab, home: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(Binaries::locate()?.helm())
        .env("KUBECONFIG", lab_k8s::kubeconfig_path(lab))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .args(args)
        .output()
        .context("cannot run helm")?;
    ensure!(
        out.status.success(),
        "`helm {}` failed: {}",
        args.join(" "),
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Access lines of `log` with `direction` naming both identities.
fn access_lines(log: &Path, direction: &str) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("access") && l.contains(direction))
        .filter(|l| l.contains(CLIENT) && l.contains(SERVER))
        .map(str::to_owned)
        .collect()
}

fn logs(lab: &Lab) -> String {
    let mut all = String::new();
    for f in ["kubelet.log", "node-a.log", "node-b.log"] {
        let p = lab.state_dir().join(f);
        let t = fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        all.push_str(&format!(
            "--- {}\n{}\n",
            p.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        ));
    }
    all
}

/// Node a's `/metrics`, fetched in its network namespace as the guide does.
fn node_a_metrics(lab: &Lab, node_a_ip: &str) -> Result<String> {
    let out = nm_lab(
        lab,
        &[
            "exec",
            "node-a",
            "--",
            "curl",
            "-sS",
            &format!("http://{node_a_ip}:15020/metrics"),
        ],
    )?;
    Ok(text(&out))
}

#[test]
fn helm_install_on_the_kubernetes_lab_meshes_denies_and_counts_then_down_leaves_nothing()
-> Result<()> {
    require_root();
    // Under target/ (not /tmp): the controller runs as the chart's non-root user and must reach
    // its token through every parent directory.
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("root")?
        .join("target");
    fs::create_dir_all(&base)?;
    let tmp = tempfile::Builder::new()
        .prefix("lab_k8s-")
        .tempdir_in(&base)?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))?;
    let config = lab::files_for_prefix(tmp.path(), PREFIX)?;
    let lab = Lab::new(PREFIX, tmp.path().join("state"))?;
    lab.down()?;
    let host_pins_before = Path::new("/sys/fs/bpf/nodemesh/default").exists();

    let result = (|| -> Result<Vec<i32>> {
        let up = nm_lab(
            &lab,
            &["up", "--kubernetes", "--config", &config.to_string_lossy()],
        )?;
        ensure!(
            up.status.success(),
            "`up --kubernetes` succeeds:\n{}",
            text(&up)
        );
        let said = text(&up);
        ensure!(
            said.contains("helm install nodemesh charts/nodemesh")
                && said.contains(&lab_k8s::kubeconfig_path(&lab).display().to_string()),
            "`up` says how to go on:\n{said}"
        );
        // A second `up` refuses and changes nothing.
        let again = nm_lab(
            &lab,
            &["up", "--kubernetes", "--config", &config.to_string_lossy()],
        )?;
        ensure!(
            !again.status.success() && text(&again).contains("already up"),
            "a second `up` fails saying the lab is up:\n{}",
            text(&again)
        );

        let topo = lab.status()?.context("lab.json")?;
        let server_b = topo["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "server-b")
            .and_then(|p| p["ip"].as_str())
            .context("server-b's address")?
            .to_owned();
        let node_a_ip = topo["nodes"][0]["ip"]
            .as_str()
            .context("node a")?
            .to_owned();
        // The lab's objects are in the API, pods Running with their addresses.
        let pods = lab_k8s::kubectl(
            &lab,
            &[
                "get",
                "pods",
                "-n",
                "demo",
                "-o",
                "jsonpath={.items[*].status.podIP}",
            ],
            None,
        )?;
        ensure!(
            pods.contains(&server_b),
            "pods' addresses in the API: {pods}"
        );
        let nodes = lab_k8s::kubectl(
            &lab,
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[*].status.addresses[0].address}",
            ],
            None,
        )?;
        ensure!(nodes.contains(&node_a_ip), "nodes' InternalIPs: {nodes}");

        // Before the mesh: a plain connection (the server answers curl).
        let curl = |lab: &Lab| -> Result<Output> {
            nm_lab(
                lab,
                &[
                    "exec",
                    "client-a",
                    "--",
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    &format!("http://{server_b}:{}/", lab::ECHO_PORT),
                ],
            )
        };
        let plain = curl(&lab)?;
        ensure!(
            plain.status.success() && text(&plain).contains("hello from server-b"),
            "server-b answers curl: {}",
            text(&plain)
        );

        // The chart, as the guide installs it.
        let chart = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("root")?
            .join("charts/nodemesh");
        let home = tmp.path().join("helm");
        helm(
            &lab,
            &home,
            &[
                "install",
                "nodemesh",
                &chart.to_string_lossy(),
                "-n",
                "nodemesh-system",
                "--create-namespace",
                // The stand-in writes the workloads' status and the Deployment's ReplicaSet:
                // helm's readiness checks pass as on a cluster.
                "--wait",
                "--timeout=5m",
            ],
        )
        .with_context(|| logs(&lab))?;
        let rollout = lab_k8s::kubectl(
            &lab,
            &[
                "-n",
                "nodemesh-system",
                "rollout",
                "status",
                "daemonset/nodemesh-agent",
                "--timeout=240s",
            ],
            None,
        )
        .with_context(|| logs(&lab))?;
        ensure!(rollout.contains("successfully rolled out"), "{rollout}");
        lab_k8s::kubectl(
            &lab,
            &[
                "label",
                "namespace",
                "demo",
                "nodemesh.io/dataplane=enabled",
            ],
            None,
        )?;

        // Through the mesh: both agents log the connection with both identities.
        let (log_a, log_b) = (
            lab.state_dir().join("node-a.log"),
            lab.state_dir().join("node-b.log"),
        );
        until(
            "a meshed connection client-a → server-b",
            Duration::from_secs(60),
            || {
                let out = curl(&lab)?;
                // The server sees the connection come from its node's tunnel address.
                Ok(out.status.success()
                    && text(&out).contains(&format!(
                        "hello from server-b: you are {}:",
                        lab_k8s::CHART_TUNNEL_IP
                    ))
                    && !access_lines(&log_a, "outbound").is_empty()
                    && !access_lines(&log_b, "inbound").is_empty())
            },
        )
        .with_context(|| logs(&lab))?;

        // The metrics count it, on node a's agent (its metrics address in its namespace).
        let metrics = node_a_metrics(&lab, &node_a_ip)?;
        let opened = nodemesh_tests::metric_sum(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "source_workload=\"client-a\"",
                "destination_workload=\"server-b\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
        );
        ensure!(
            opened >= 1,
            "the connection in node a's metrics:\n{metrics}"
        );

        // A DENY policy: the same connection is refused.
        lab_k8s::apply(
            &lab,
            "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  \
             name: deny-clients\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      \
             app: server\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
             principals: [\"cluster.local/ns/demo/sa/client\"]\n",
        )?;
        // Refused: first perhaps by node b (HBONE 401, before node a has the policy), then in
        // node a's kernel, since the source's agent knows the destination's policy: curl cannot
        // connect (ECONNREFUSED), and node a's agent counts the refusal.
        until(
            "the DENY policy refuses client-a → server-b",
            Duration::from_secs(60),
            || {
                let out = curl(&lab)?;
                Ok(out.status.code() == Some(7) && text(&out).contains("Couldn't connect"))
            },
        )
        .with_context(|| logs(&lab))?;
        let metrics = node_a_metrics(&lab, &node_a_ip)?;
        let denied = nodemesh_tests::metric_sum(
            &metrics,
            "nodemesh_datapath_events_total",
            &["event=\"denied_policy\""],
        );
        ensure!(denied >= 1, "node a counts the refusal:\n{metrics}");

        let mut pids = Vec::new();
        lab::pids_in(
            &mesh_agent::cgroup::cgroup2_mount()?.join(PREFIX),
            &mut pids,
        );
        Ok(pids)
    })();

    let down = nm_lab(&lab, &["down"]);
    let pids = match result {
        Ok(p) => p,
        Err(e) => {
            // Leave nothing behind even when the test failed.
            let _ = lab.down();
            bail!("{e:#}");
        }
    };
    let down = down?;
    ensure!(down.status.success(), "`down` succeeds: {}", text(&down));

    let mut left = Vec::new();
    for line in run("ip", &["netns", "list"])?.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{PREFIX}-")) {
            left.push(format!("netns {name}"));
        }
    }
    let cg = mesh_agent::cgroup::cgroup2_mount()?.join(PREFIX);
    if cg.exists() {
        left.push(format!("cgroup {}", cg.display()));
    }
    for m in lab_k8s::mounts_below(tmp.path())? {
        left.push(format!("mount {}", m.display()));
    }
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        if !matches!(state, None | Some('Z' | 'X')) {
            left.push(format!("process {pid}"));
        }
    }
    if lab.state_dir().exists() {
        left.push(format!("state {}", lab.state_dir().display()));
    }
    if !host_pins_before && Path::new("/sys/fs/bpf/nodemesh/default").exists() {
        left.push("pins in the host's /sys/fs/bpf/nodemesh/default".to_owned());
    }
    ensure!(left.is_empty(), "`down` left {left:?}");
    Ok(())
}
