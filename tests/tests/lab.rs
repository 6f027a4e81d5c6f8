//! The lab as a new user runs it (`cargo xtask lab`, then `cargo xtask lab down`), on the real
//! lab file `tests/lab/lab.yaml` with its policies, under its own prefix so that it can run beside
//! a user's lab: every demo row behaves as expected, `lab.json` has the documented fields, the
//! pod network-namespace finder (`mesh_agent::podns`) finds every pod from its UID through the
//! kubelet-style cgroups the lab puts it in, and `down` leaves no namespace, cgroup, pin or
//! process behind. Root.

use std::{fs, os::unix::fs::MetadataExt, path::Path};

use anyhow::{Context, Result, ensure};
use mesh_agent::podns::{NetnsFinder, ProcScanner};
use nodemesh_tests::{
    lab::{self, Lab},
    require_root, run,
};

const PREFIX: &str = "nmlabt";

fn leftovers(lab: &Lab, pids: &[i32]) -> Result<Vec<String>> {
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
    for node in ["node-a", "node-b"] {
        let pins = Path::new("/sys/fs/bpf/nodemesh").join(lab.node_ns(node));
        if pins.exists() {
            left.push(format!("pins {}", pins.display()));
        }
    }
    for pid in pids {
        // The lab's processes are this test's children: killed ones stay zombies until reaped.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        if !matches!(state, None | Some('Z' | 'X')) {
            left.push(format!("process {pid}"));
        }
    }
    if lab.state_dir().exists() {
        left.push(format!("state {}", lab.state_dir().display()));
    }
    Ok(left)
}

#[test]
fn lab_up_demo_and_down_leave_nothing_behind() -> Result<()> {
    require_root();
    let tmp = tempfile::tempdir()?;
    let config = lab::files_for_prefix(tmp.path(), PREFIX)?;
    let lab = Lab::new(PREFIX, tmp.path().join("state"))?;
    // A previous crashed run of this test: start clean (down is idempotent).
    lab.down()?;

    let result = (|| -> Result<Vec<i32>> {
        let topo = lab.up(&config)?;
        for key in [
            "name",
            "netns",
            "ip",
            "tunnel_ip",
            "link_if",
            "metrics_url",
            "admin_url",
        ] {
            for n in topo["nodes"].as_array().context("nodes")? {
                ensure!(!n[key].is_null(), "node without {key}: {n}");
            }
        }
        let pods = topo["pods"].as_array().context("pods")?;
        ensure!(pods.len() >= 4, "at least four pods, got {}", pods.len());
        for key in [
            "name",
            "node",
            "namespace",
            "service_account",
            "netns",
            "ip",
            "cgroup",
            "uid",
        ] {
            for p in pods {
                ensure!(!p[key].is_null(), "pod without {key}: {p}");
            }
        }
        // Each pod's namespace found the way the agent finds it on a real node.
        let finder = ProcScanner::new("/proc");
        for p in pods {
            let (name, uid) = (p["name"].as_str(), p["uid"].as_str());
            let (Some(name), Some(uid)) = (name, uid) else {
                anyhow::bail!("pod without name or uid: {p}");
            };
            ensure!(uid == lab.pod_uid(name), "pod {name}: uid {uid}");
            let netns = p["netns"].as_str().context("netns")?;
            let found = finder.netns_of(uid).map_err(anyhow::Error::msg)?;
            ensure!(
                fs::metadata(&found)?.ino() == fs::metadata(netns)?.ino(),
                "pod {name} ({uid}): found {}, its namespace is {netns}",
                found.display()
            );
        }
        let svc = &topo["services"][0];
        ensure!(
            svc["endpoints"].as_array().map_or(0, Vec::len) == 2,
            "a service with two endpoints: {svc}"
        );
        let rows = lab::demo(&lab)?;
        ensure!(rows.len() == 4, "four demo rows, got {}", rows.len());
        for r in &rows {
            ensure!(
                r.ok,
                "demo row `{}`: expected {}, got {}",
                r.what,
                r.expected,
                r.outcome
            );
        }
        ensure!(
            rows.iter().any(|r| r.outcome.contains("refused")),
            "the denied row is refused"
        );
        let mut pids = Vec::new();
        lab::pids_in(
            &mesh_agent::cgroup::cgroup2_mount()?.join(PREFIX),
            &mut pids,
        );
        ensure!(
            pids.len() >= 4 + pods.len(),
            "two agents, two echo servers and a pause process per pod run, got {pids:?}"
        );
        Ok(pids)
    })();
    let down = lab.down();
    let pids = result?;
    down?;
    let left = leftovers(&lab, &pids)?;
    ensure!(left.is_empty(), "lab down left: {left:?}");
    Ok(())
}
