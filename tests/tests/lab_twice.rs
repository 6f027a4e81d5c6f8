//! `lab up` (the `nm-lab` binary `cargo xtask lab` runs) typed a second time while the lab is up:
//! it fails saying so, and the first lab keeps
//! serving (every namespace there, `status` up, the demo traffic still echoed). A failed start
//! never removes what it did not create. Root; own prefix `nmlabu` (runs beside `lab.rs`'s
//! `nmlabt` and a user's `nm-lab`).

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use nodemesh_tests::{
    lab::{self, Lab},
    require_root, run,
};

const PREFIX: &str = "nmlabu";

/// `nm-lab --prefix … --state-dir … up --config FILE`, as `cargo xtask lab up` runs it.
fn nm_lab(lab: &Lab, config: &Path) -> Result<std::process::Output> {
    Command::new(env!("CARGO_BIN_EXE_nm-lab"))
        .args(["--prefix", lab.prefix(), "--state-dir"])
        .arg(lab.state_dir())
        .args(["up", "--config"])
        .arg(config)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .context("cannot run nm-lab")
}

fn namespaces() -> Result<Vec<String>> {
    let mut out: Vec<String> = run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(str::to_owned)
        .collect();
    out.sort();
    Ok(out)
}

fn all_rows_ok(lab: &Lab) -> Result<()> {
    let rows = lab::demo(lab)?;
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
    Ok(())
}

#[test]
fn a_second_lab_up_fails_and_leaves_the_first_lab_serving() -> Result<()> {
    require_root();
    let tmp = tempfile::tempdir()?;
    let config = lab::files_for_prefix(tmp.path(), PREFIX)?;
    let lab = Lab::new(PREFIX, tmp.path().join("state"))?;
    lab.down()?;

    let result = (|| -> Result<()> {
        let first = nm_lab(&lab, &config)?;
        ensure!(
            first.status.success(),
            "the first `nm-lab up` succeeds:\n{}{}",
            String::from_utf8_lossy(&first.stdout),
            String::from_utf8_lossy(&first.stderr)
        );
        all_rows_ok(&lab).context("the first lab serves")?;
        let before = namespaces()?;
        ensure!(before.len() >= 6, "two nodes and four pods: {before:?}");

        let second = nm_lab(&lab, &config)?;
        let err = String::from_utf8_lossy(&second.stderr);
        ensure!(
            !second.status.success(),
            "a second `up` while the lab is up must fail"
        );
        ensure!(
            err.contains("already up") && err.contains("nothing was changed"),
            "the second `up` says the lab is already up: {err}"
        );

        ensure!(
            namespaces()? == before,
            "every namespace of the first lab is still there"
        );
        ensure!(lab.status()?.is_some(), "`status` still says up");
        ensure!(lab.is_running()?, "the first lab's processes still run");
        for node in ["node-a", "node-b"] {
            let ready = lab.state_dir().join(node).join("ready");
            ensure!(ready.exists(), "{} still there", ready.display());
            let pins = Path::new("/sys/fs/bpf/nodemesh").join(lab.node_ns(node));
            ensure!(pins.exists(), "{} still there", pins.display());
        }
        all_rows_ok(&lab).context("the first lab still serves after the failed second `up`")
    })();
    let down = lab.down();
    result?;
    down
}
