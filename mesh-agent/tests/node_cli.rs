//! Root test of the `mesh-agent node` process lifecycle: it pins and attaches, survives as pins
//! when killed with SIGKILL, a restart adopts them, and `node --uninstall` removes everything.
//! Attaches to a fresh child cgroup only; the instance name is unique to this test run.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Cleanup {
    cgroup: PathBuf,
    instance: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["node", "--uninstall", "--instance", &self.instance])
            .output();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn start(instance: &str, cgroup: &Path) -> Result<Child> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args([
            "node",
            "--datapath-only",
            "--instance",
            instance,
            "--cgroup",
        ])
        .arg(cgroup)
        .args(["--tunnel-ip4", "169.254.99.1", "--stale-after-ms", "3000"])
        .args(["--exclude", "10.96.0.1@443", "--exclude", "@53"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        let status = child.wait()?;
        return Err(format!("mesh-agent node did not come up ({status}): {line:?}").into());
    }
    Ok(child)
}

fn kill9(child: &mut Child) -> Result<()> {
    child.kill()?; // SIGKILL: no chance to clean up, like a crash
    child.wait()?;
    Ok(())
}

#[test]
fn node_process_pins_survive_a_kill_and_uninstall_removes_them() -> Result<()> {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test attaches eBPF programs: run it as root (`sudo -E cargo xtask test`)"
    );
    let instance = format!("nmt{}node", std::process::id());
    let cgroup = mesh_agent::cgroup::cgroup2_mount()?.join(format!("{instance}-pods"));
    std::fs::create_dir(&cgroup)?;
    let _cleanup = Cleanup {
        cgroup: cgroup.clone(),
        instance: instance.clone(),
    };
    let version_dir = Path::new("/sys/fs/bpf/nodemesh")
        .join(&instance)
        .join(format!("v{}", mesh_common::MAP_LAYOUT_VERSION));

    let mut agent = start(&instance, &cgroup)?;
    let links = version_dir.join("links");
    for prog in [
        "mesh_connect4",
        "mesh_connect6",
        "mesh_sockops",
        "mesh_guard_ingress",
    ] {
        assert!(links.join(prog).exists(), "link {prog} not pinned");
    }
    kill9(&mut agent)?;
    assert!(
        links.join("mesh_connect4").exists(),
        "pins vanished with the process"
    );

    // A restart adopts the pins (it would fail to pin over an existing link otherwise).
    let mut agent = start(&instance, &cgroup)?;
    kill9(&mut agent)?;

    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["node", "--uninstall", "--instance", &instance])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    assert!(!version_dir.exists(), "pins left after uninstall");
    assert!(
        !Path::new("/sys/fs/bpf/nodemesh").join(&instance).exists(),
        "instance directory left after uninstall"
    );
    Ok(())
}
