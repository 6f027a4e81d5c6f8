//! `cargo xtask deny`: `cargo deny check` (advisories, licences, bans, sources) on the workspace
//! with `xtask/deny/deny.toml`, without network access to GitHub.
//!
//! cargo-deny reads advisories from a git clone of the RustSec advisory database, which it
//! normally fetches from GitHub; CI reaches only package registries. So a snapshot of the
//! database (public domain, CC0; a few advisories imported from GitHub's database are CC-BY 4.0,
//! see its LICENSE.txt) is committed as `xtask/deny/advisory-db.tar.xz` with its source commit
//! in `xtask/deny/advisory-db.commit`. Each run unpacks it (once per snapshot) into
//! `target/deny/advisory-dbs/` as a one-commit git repository dated like the snapshot, and runs
//! cargo-deny with `--offline` (it reads the database there and fetches nothing). A check of
//! that set-up: a project pinned to `smallvec = "=1.6.0"` fails with RUSTSEC-2021-0003. Refreshing the snapshot: docs/development.md.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    setup,
    util::{exec, output, workspace_root},
};

#[derive(clap::Args, Default)]
pub struct Options {}

fn deny_dir() -> PathBuf {
    workspace_root().join("xtask/deny")
}

/// The directory cargo-deny opens (under `db-path`) for the database URL in `deny.toml`
/// (`db-urls`): the URL's last path segment and a hash of the URL. Found with cargo-deny 0.20.2;
/// a different name makes cargo-deny fail, naming the directory it wanted.
const DB_DIR_NAME: &str = "advisory-db-3157b0e258782691";

/// `<commit> <ISO date>` of the committed snapshot.
fn snapshot_id() -> Result<(String, String)> {
    let path = deny_dir().join("advisory-db.commit");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some(commit), Some(date)) => Ok((commit.to_owned(), date.to_owned())),
        _ => bail!("{} must hold `<commit> <date>`", path.display()),
    }
}

/// Unpacks the snapshot into `<root>/<DB_DIR_NAME>` unless that snapshot is already there.
fn prepare_db(root: &Path) -> Result<()> {
    let (commit, date) = snapshot_id()?;
    let db = root.join(DB_DIR_NAME);
    let stamp = db.join(".nodemesh-snapshot");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == commit) {
        return Ok(());
    }
    if db.exists() {
        std::fs::remove_dir_all(&db).with_context(|| format!("removing {}", db.display()))?;
    }
    std::fs::create_dir_all(&db).with_context(|| format!("creating {}", db.display()))?;
    let archive = deny_dir().join("advisory-db.tar.xz");
    exec(
        Command::new("tar")
            .arg("-xJf")
            .arg(&archive)
            .arg("-C")
            .arg(&db),
    )
    .context("unpacking the advisory database snapshot (needs tar and xz)")?;
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.current_dir(&db)
            .env("GIT_AUTHOR_NAME", "nodemesh xtask")
            .env("GIT_AUTHOR_EMAIL", "xtask@nodemesh.invalid")
            .env("GIT_COMMITTER_NAME", "nodemesh xtask")
            .env("GIT_COMMITTER_EMAIL", "xtask@nodemesh.invalid")
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .args([
                "-c",
                "init.defaultBranch=main",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args);
        output(&mut cmd).with_context(|| format!("git {} in {}", args.join(" "), db.display()))
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&[
        "commit",
        "-q",
        "-m",
        &format!("RustSec advisory-db snapshot {commit}"),
    ])?;
    std::fs::write(&stamp, format!("{commit}\n"))?;
    Ok(())
}

pub fn run(_opts: Options) -> Result<()> {
    setup::ensure_cargo_deny()?;
    let root = workspace_root();
    let dbs = root.join("target/deny/advisory-dbs");
    prepare_db(&dbs)?;
    // `--offline` (no GitHub) also keeps cargo-deny from downloading crates: fetch them first
    // (crates.io is reachable), which also refreshes cargo's index cache for the yanked check.
    exec(
        Command::new("cargo")
            .current_dir(&root)
            .args(["fetch", "--locked"]),
    )?;
    let (commit, date) = snapshot_id()?;
    println!("cargo deny: advisories from the committed RustSec snapshot {commit} ({date})");
    exec(
        Command::new("cargo")
            .current_dir(&root)
            .env("NODEMESH_ADVISORY_DBS", &dbs)
            .args(["deny", "--offline", "--locked", "--manifest-path"])
            .arg(root.join("Cargo.toml"))
            .arg("--config")
            .arg(deny_dir().join("deny.toml"))
            .arg("check"),
    )
    .context(
        "cargo deny found a problem (above): a vulnerable or unmaintained crate (update it, or \
         add an `ignore` with the reason to xtask/deny/deny.toml), a licence not allowed there, \
         a new duplicate version, or a crate from an unknown source",
    )
}
