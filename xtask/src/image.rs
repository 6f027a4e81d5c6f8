//! `cargo xtask image`: the container image. Builds the eBPF object and `mesh-agent` (release
//! unless `--debug`), stages `charts/image/Dockerfile` and the binary in `target/image/`, and
//! builds the image there with the first container builder that works (docker with a running
//! daemon, podman, buildah). Without one it stops after staging and prints the command to run
//! elsewhere. The tag defaults to the chart's `appVersion`, the tag the chart deploys.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf,
    util::{cargo_target_dir, exec, output, which, workspace_root},
};

/// The Dockerfile, relative to the workspace root.
pub const DOCKERFILE: &str = "charts/image/Dockerfile";
/// The chart whose `values.yaml` names the repository and whose `Chart.yaml` the tag.
const CHART: &str = "charts/nodemesh";
/// The staged build context, relative to the workspace root.
const CONTEXT: &str = "target/image";

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Copy the debug build instead of building a release (quick checks only: 10x larger).
    #[arg(long)]
    pub debug: bool,
    /// The image name (default: the chart's `image.repository` and `appVersion`).
    #[arg(long)]
    pub tag: Option<String>,
    /// Only stage the build context, even when a container builder is present.
    #[arg(long)]
    pub no_build: bool,
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root();
    let tag = match opts.tag {
        Some(t) => t,
        None => default_tag(&root)?,
    };
    build_ebpf::run(build_ebpf::Options::default())?;
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(["build", "-p", "mesh-agent", "--bin", "mesh-agent"]);
    if !opts.debug {
        cargo.arg("--release");
    }
    exec(&mut cargo)?;
    let binary = cargo_target_dir()
        .join(if opts.debug { "debug" } else { "release" })
        .join("mesh-agent");
    let context = root.join(CONTEXT);
    if context.exists() {
        fs::remove_dir_all(&context)
            .with_context(|| format!("cannot clear {}", context.display()))?;
    }
    fs::create_dir_all(&context)?;
    fs::copy(root.join(DOCKERFILE), context.join("Dockerfile"))
        .with_context(|| format!("cannot copy {DOCKERFILE}"))?;
    fs::copy(&binary, context.join("mesh-agent"))
        .with_context(|| format!("cannot copy {}", binary.display()))?;
    println!(
        "image context: {} (Dockerfile, mesh-agent)",
        context.display()
    );
    if opts.no_build {
        println!(
            "not building (--no-build): `docker build -t {tag} {}`",
            context.display()
        );
        return Ok(());
    }
    let Some(builder) = container_builder() else {
        println!(
            "no container builder here (docker with a running daemon, podman or buildah): the \
             context is staged; build it elsewhere with `docker build -t {tag} {}`",
            context.display()
        );
        return Ok(());
    };
    let mut build = Command::new(builder);
    if builder == "buildah" {
        build.arg("bud");
    } else {
        build.arg("build");
    }
    exec(build.args(["-t", &tag]).arg(&context))?;
    println!("built image {tag} with {builder}");
    Ok(())
}

/// `<image.repository>:<appVersion>` from the chart.
pub fn default_tag(root: &Path) -> Result<String> {
    let chart = fs::read_to_string(root.join(CHART).join("Chart.yaml"))?;
    let values = fs::read_to_string(root.join(CHART).join("values.yaml"))?;
    let app_version = yaml_field(&chart, "appVersion", 0)
        .context("charts/nodemesh/Chart.yaml has no appVersion")?;
    // `image:` then its indented `repository:`.
    let repository = values
        .split_once("\nimage:\n")
        .and_then(|(_, rest)| yaml_field(rest, "repository", 2))
        .context("charts/nodemesh/values.yaml has no image.repository")?;
    if repository.is_empty() || app_version.is_empty() {
        bail!("the chart's image.repository or appVersion is empty");
    }
    Ok(format!("{repository}:{app_version}"))
}

/// The value of `key:` at exactly `indent` spaces in `text`, unquoted.
fn yaml_field(text: &str, key: &str, indent: usize) -> Option<String> {
    let prefix = format!("{}{key}:", " ".repeat(indent));
    text.lines().find_map(|l| {
        let v = l.strip_prefix(&prefix)?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_owned())
    })
}

fn container_builder() -> Option<&'static str> {
    if which("docker").is_some() && output(Command::new("docker").arg("info")).is_some() {
        return Some("docker");
    }
    ["podman", "buildah"]
        .into_iter()
        .find(|b| which(b).is_some() && output(Command::new(b).arg("--version")).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_tag_is_the_charts_repository_and_app_version() {
        let tag = default_tag(&workspace_root()).expect("the chart names both");
        assert!(
            tag.starts_with("ghcr.io/nodemesh/mesh-agent:") && tag.ends_with("0.1.0"),
            "{tag}"
        );
    }
}
