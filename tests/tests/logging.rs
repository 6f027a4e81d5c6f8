//! The verifier accepts every program with kernel logging off (the default: log statements are
//! pruned) and on; when on, records reach the agent.

use anyhow::Result;
use mesh_agent::{
    datapath::{Datapath, LoadOptions},
    netns::netns_cookie,
};
use mesh_common::{EnrolledPod, FailMode};
use nodemesh_tests::{ChildCgroup, NetNs, probe_connect, require_root, unique_prefix};

/// A fail-closed pod with no tunnel configured: its connect is refused, which logs at debug.
fn refused_connect(dp: &mut Datapath) -> Result<()> {
    let p = unique_prefix();
    let pod = NetNs::new(&format!("{p}-a"))?;
    let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;
    pod.exec(&["ip", "addr", "add", "10.79.0.1/32", "dev", "lo"])?;
    dp.attach(cgroup.path())?;
    dp.enroll(
        netns_cookie(&pod.path())?,
        EnrolledPod {
            fail_mode: FailMode::Closed as u8,
            ..Default::default()
        },
    )?;
    let err = probe_connect(cgroup.path(), &pod, "10.79.0.1:9".parse()?, "x")
        .expect_err("a fail-closed pod without a tunnel must be refused");
    assert!(err.to_string().contains("Connection refused"), "{err:#}");
    Ok(())
}

#[test]
fn programs_load_with_logging_off_and_on_and_records_arrive() -> Result<()> {
    require_root();
    let mut quiet = Datapath::load()?;
    assert!(quiet.ebpf_log_fd().is_none());
    refused_connect(&mut quiet)?;
    assert_eq!(quiet.flush_ebpf_logs(), 0);
    drop(quiet);

    for level in [aya_log::Level::Error, aya_log::Level::Trace] {
        Datapath::load_with(
            None,
            &LoadOptions {
                ebpf_log_level: Some(level),
                ..Default::default()
            },
        )?;
    }
    let mut loud = Datapath::load_with(
        None,
        &LoadOptions {
            ebpf_log_level: Some(aya_log::Level::Debug),
            ..Default::default()
        },
    )?;
    assert!(loud.ebpf_log_fd().is_some());
    refused_connect(&mut loud)?;
    // The record was written before connect() returned; flush reads it without blocking.
    assert!(loud.flush_ebpf_logs() >= 1, "no kernel log record arrived");
    assert_eq!(loud.counters()?["refused_unconfigured"], 1);
    Ok(())
}
