//! The Helm chart (`charts/nodemesh`) as the chart tests (`tests/chart.rs`) handle it: rendering
//! with the pinned helm, parsing what it renders, the values matrix (`ci/*.yaml`), offline
//! validation with `kubernetes-validate`, and turning the rendered agent container into a process
//! the way a kubelet would (arguments with `$(VAR)` expanded, container paths mapped to the host
//! paths of their volumes, the container's capabilities as the bounding set).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::k8s::{Binaries, pinned_version, workspace_root};

/// The environment variable naming `kubernetes-validate` (set by `cargo xtask test`).
pub const VALIDATE_ENV: &str = "NODEMESH_KUBERNETES_VALIDATE";
/// Where `cargo xtask setup` records it, relative to the workspace root.
const VALIDATE_POINTER: &str = "target/kubernetes-validate";

/// The chart directory.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/nodemesh")
}

/// The values files every check runs over: `charts/nodemesh/ci/*.yaml`, sorted.
pub fn values_matrix() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "charts/nodemesh/ci holds no values file");
    Ok(files)
}

/// Runs the pinned helm (from `cargo xtask k8s build`) with its state in a temporary directory.
pub fn helm(args: &[&str]) -> Result<Output> {
    let bins = Binaries::locate()?;
    let home = tempfile::tempdir()?;
    Command::new(bins.helm())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env_remove("KUBECONFIG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run helm")
}

/// `helm template nodemesh CHART -n NAMESPACE --kube-version <pinned>` with `extra` arguments
/// (`-f FILE`, `--set K=V`); fails with helm's message.
pub fn render(chart: &Path, namespace: &str, extra: &[&str]) -> Result<String> {
    let kube = pinned_version("KUBERNETES_VERSION")?;
    let chart = chart.to_string_lossy();
    let mut args = vec![
        "template",
        "nodemesh",
        &*chart,
        "--namespace",
        namespace,
        "--kube-version",
        &kube,
    ];
    args.extend(extra);
    let out = helm(&args)?;
    ensure!(
        out.status.success(),
        "`helm {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every non-empty document of a multi-document YAML stream, as JSON values.
pub fn documents(yaml: &str) -> Result<Vec<Value>> {
    use k8s_openapi::serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc).context("helm rendered YAML that does not parse")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The one object of `kind` (and name suffix) among `docs`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> Result<&'a Value> {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind)
        .filter(|d| {
            d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(name_suffix))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => bail!("no {kind} *{name_suffix} rendered"),
        _ => bail!("{} objects {kind} *{name_suffix} rendered", found.len()),
    }
}

/// The `kubernetes-validate` executable: `$NODEMESH_KUBERNETES_VALIDATE`, else the one `cargo
/// xtask setup` recorded.
pub fn kubernetes_validate() -> Result<PathBuf> {
    let hint = "run `cargo xtask setup` (it installs kubernetes-validate from PyPI, pinned in \
                xtask/python/requirements.txt)";
    let exe = match std::env::var_os(VALIDATE_ENV).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let pointer = workspace_root().join(VALIDATE_POINTER);
            let text = std::fs::read_to_string(&pointer).with_context(|| {
                format!(
                    "kubernetes-validate is not installed ({} missing): {hint}",
                    pointer.display()
                )
            })?;
            PathBuf::from(text.trim())
        }
    };
    ensure!(exe.is_file(), "{} not found: {hint}", exe.display());
    Ok(exe)
}

/// Validates the manifests in `file` against Kubernetes `version`'s OpenAPI schemas, strictly
/// (unknown fields refused); custom resources without a schema only warn. Returns the output.
pub fn validate(file: &Path, version: &str) -> Result<String> {
    let out = Command::new(kubernetes_validate()?)
        .args(["--strict", "--quiet", "--no-warn", "-k", version])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .context("cannot run kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "kubernetes-validate -k {version} refuses {}:\n{text}",
        file.display()
    );
    Ok(text)
}

/// Checks the agent DaemonSet against `listed` (mesh_agent::privileges): no container or init
/// container is privileged, each drops ALL; the agent container (`agent`) adds exactly `listed`,
/// any other (the cleanup step's) a part of it.
pub fn check_agent_privileges(ds: &Value, listed: &[&str]) -> Result<()> {
    let spec = &ds["spec"]["template"]["spec"];
    let containers = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten());
    let mut seen = 0;
    for c in containers {
        seen += 1;
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        ensure!(
            sc["privileged"] != Value::Bool(true),
            "container {name} is privileged: the agent runs with the capabilities of \
             mesh-agent/src/privileges.rs instead"
        );
        let list = |v: &Value| -> Vec<String> {
            let mut l: Vec<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect();
            l.sort();
            l
        };
        let drop = list(&sc["capabilities"]["drop"]);
        ensure!(
            drop == ["ALL"],
            "container {name} drops {drop:?}, not [ALL]"
        );
        let add = list(&sc["capabilities"]["add"]);
        let mut want: Vec<String> = listed.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        let extra: Vec<&String> = add.iter().filter(|a| !want.contains(a)).collect();
        let missing: Vec<&String> = want.iter().filter(|w| !add.contains(w)).collect();
        let missing: Vec<&String> = if name == "agent" { missing } else { Vec::new() };
        ensure!(
            extra.is_empty() && missing.is_empty(),
            "container {name} adds capabilities {add:?}; mesh-agent/src/privileges.rs lists \
             {want:?} (not listed there, with the code and the reason: {extra:?}; listed but not \
             granted: {missing:?})"
        );
    }
    ensure!(seen > 0, "the DaemonSet has no container");
    Ok(())
}

/// What a kubelet would pass to a container's process: its command line and environment.
#[derive(Debug)]
pub struct ContainerProcess {
    /// `command` (empty: the image's entrypoint, `mesh-agent`).
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `securityContext.capabilities.add`.
    pub capabilities: Vec<String>,
}

/// Container (or init container) `name` of the workload `obj` as a process: environment values, downward-API
/// fields from `fields` (`spec.nodeName` → `node-a`), projected volumes from `projected` (volume
/// name → host directory), `$(VAR)` expanded in the arguments, and every argument path below a
/// volume's mount path mapped to the volume's host path.
pub fn container_process(
    obj: &Value,
    name: &str,
    fields: &BTreeMap<&str, String>,
    projected: &BTreeMap<&str, PathBuf>,
) -> Result<ContainerProcess> {
    let spec = &obj["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .with_context(|| format!("no container {name}"))?;
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env without a name")?.to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            fields
                .get(path)
                .with_context(|| format!("env {name}: no test value for the field {path}"))?
                .clone()
        } else {
            bail!("env {name}: neither a value nor a fieldRef");
        };
        env.insert(name, value);
    }
    // Volume name → host directory.
    let mut host: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().context("volume without a name")?;
        if let Some(p) = v["hostPath"]["path"].as_str() {
            host.insert(name.to_owned(), PathBuf::from(p));
        } else if let Some(dir) = projected.get(name) {
            host.insert(name.to_owned(), dir.clone());
        }
    }
    // Mount path → host directory, longest first.
    let mut mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let dir = host.get(m["name"].as_str()?)?;
            Some((m["mountPath"].as_str()?.to_owned(), dir.clone()))
        })
        .collect();
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let mut args = Vec::new();
    for a in c["args"].as_array().into_iter().flatten() {
        let mut a = a.as_str().context("a non-string argument")?.to_owned();
        for (k, v) in &env {
            a = a.replace(&format!("$({k})"), v);
        }
        if let Some((flag, value)) = a.split_once('=')
            && let Some((mount, dir)) = mounts
                .iter()
                .find(|(m, _)| value == m || value.starts_with(&format!("{m}/")))
        {
            let rest = value[mount.len()..].trim_start_matches('/');
            let mapped = if rest.is_empty() {
                dir.clone()
            } else {
                dir.join(rest)
            };
            a = format!("{flag}={}", mapped.display());
        }
        args.push(a);
    }
    let capabilities = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect();
    let command = c["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect();
    Ok(ContainerProcess {
        command,
        args,
        env,
        capabilities,
    })
}
