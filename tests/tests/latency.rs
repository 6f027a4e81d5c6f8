//! Latency measurement of the early deny (not a CI gate: timings depend on the machine and its
//! load). Run with `cargo nextest run -p nodemesh-tests --run-ignored only deny_latency` as root;
//! it prints the percentiles and checks the target (p99 < 1 ms).

use std::process::Command;

use anyhow::{Context, Result};
use mesh_agent::{
    datapath::Datapath,
    map_model::{Action, Cidr, PeerIdentity, PolicyRule, Proto},
    maps::KernelMaps,
    netns::netns_cookie,
};
use mesh_common::EnrolledPod;
use nodemesh_tests::{ChildCgroup, NetNs, require_root, unique_prefix};

#[test]
#[ignore = "benchmark: run by hand, prints timings"]
fn deny_latency() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let pod = NetNs::new(&format!("{p}-a"))?;
    pod.exec(&["ip", "addr", "add", "10.81.0.1/32", "dev", "lo"])?;
    let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;
    let mut dp = Datapath::load()?;
    dp.attach(cgroup.path())?;
    dp.enroll(
        netns_cookie(&pod.path())?,
        EnrolledPod {
            identity_id: 2,
            ..Default::default()
        },
    )?;
    dp.set_identity(&Cidr::host("10.81.0.1".parse()?), 3)?;
    dp.set_policy(&PolicyRule {
        src_identity: 2,
        dst: PeerIdentity::Id(3),
        port: None,
        proto: Proto::Tcp,
        action: Action::Deny,
    })?;
    let exe = std::env::current_exe()?
        .parent()
        .and_then(std::path::Path::parent)
        .context("no target dir")?
        .join("nm-probe");
    let exe = option_env!("CARGO_BIN_EXE_nm-probe").map_or(exe, Into::into);
    let out = Command::new(exe)
        .arg(cgroup.path())
        .arg(pod.path())
        .args(["time-refused", "10000", "10.81.0.1:80"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("denied connect(): {}", stdout.trim());
    anyhow::ensure!(out.status.success(), "probe failed: {stdout}");
    let p99: u64 = stdout
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("p99_ns="))
        .context("no p99")?
        .parse()?;
    assert!(p99 < 1_000_000, "p99 {p99} ns ≥ 1 ms");
    assert_eq!(dp.counters()?["denied_policy"], 10_000);
    Ok(())
}
