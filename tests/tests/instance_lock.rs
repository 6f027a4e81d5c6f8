//! One agent per instance: a second `mesh-agent local` started with the instance (and the state
//! directory) of a running one, on other stats and admin ports, fails at once, saying another
//! agent runs it, and leaves the first serving: its ready file, pins and tunnel interface stay,
//! traffic still flows. `uninstall` of the running instance refuses too. Root.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodemesh_tests::{
    agent_exe,
    cluster::{self, Cluster, Echo, Pod, addr},
    probe_exe,
};

const NET: cluster::Net = cluster::Net {
    node_a: "10.150.0.1",
    node_b: "10.150.0.2",
    tunnel_a: "169.254.150.1",
    tunnel_b: "169.254.150.2",
    pods_a: 51,
    pods_b: 52,
};
const ECHO_PORT: u16 = 8080;

fn config(client: &Pod, server_a: &Pod, server_b: &Pod) -> String {
    format!(
        "{}{}{}{}",
        NET.cluster_head(),
        cluster::workload(client, "client", "client", "", "a"),
        cluster::workload(server_a, "server-a", "server", "", "a"),
        cluster::workload(server_b, "server-b", "server", "", "b"),
    )
}

#[test]
fn a_second_agent_of_a_running_instance_fails_and_leaves_the_first_serving() -> Result<()> {
    let c = Cluster::up(NET, &[], config)?;
    let _echo = Echo::start(&c.server_b, ECHO_PORT)?;
    let dst = addr(&c.server_b.ip, ECHO_PORT)?;
    c.roundtrip(dst, "before the second agent")
        .with_context(|| format!("first round trip:\n{}", c.logs()))?;

    let first = &c.agents[0];
    let state = c.dir.path().join(&c.node_a.name);
    let ready_before = fs::read_to_string(state.join("ready")).context("first agent's ready")?;
    let pins = Path::new("/sys/fs/bpf/nodemesh").join(first.instance());
    let log = c.dir.path().join("second.log");
    // The same node, instance and state directory, as a second `mesh-agent local` typed by
    // mistake would have.
    let mut second = Command::new(probe_exe()?)
        .arg(c.node_a.cgroup.path())
        .arg(c.node_a.ns.path())
        .arg("exec")
        .arg(agent_exe()?)
        .args(["local", "--config"])
        .arg(c.config_path())
        .args(["--node", &c.node_a.name, "--state-dir"])
        .arg(&state)
        .arg("--ca-dir")
        .arg(c.dir.path().join("ca"))
        .arg("--cgroup")
        .arg(c.node_a.cgroup.path())
        .args(["--instance", first.instance()])
        // Other stats and admin ports: without them the second agent would stop at a port
        // conflict; with them only the instance claim stands between it and the first one's
        // ready file, pins and listeners.
        .args(["--metrics-addr", &format!("{}:15990", NET.node_a)])
        .args(["--admin-addr", "127.0.0.1:15991"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            bail!(
                "the second agent did not exit within 20 s:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = fs::read_to_string(&log)?;
    ensure!(!status.success(), "the second agent must fail: {err}");
    ensure!(
        err.contains(&format!(
            "another agent runs instance `{}`",
            first.instance()
        )),
        "the second agent says why: {err}"
    );

    ensure!(
        fs::read_to_string(state.join("ready")).ok().as_deref() == Some(ready_before.as_str()),
        "the first agent's ready file is untouched"
    );
    ensure!(pins.is_dir(), "{} still there", pins.display());
    // Nor does `uninstall` take the pins of a running agent.
    let uninstall = Command::new(agent_exe()?)
        .args(["uninstall", "--instance", first.instance()])
        .output()?;
    ensure!(
        !uninstall.status.success() && pins.is_dir(),
        "uninstall refuses while the agent runs: {}",
        String::from_utf8_lossy(&uninstall.stderr)
    );
    c.node_a
        .ns
        .exec(&["ip", "link", "show", "nm-tunnel"])
        .context("the first agent's tunnel interface is still there")?;
    c.roundtrip(dst, "after the second agent failed")
        .with_context(|| format!("round trip after the failed second agent:\n{}", c.logs()))?;
    Ok(())
}
