//! The Helm chart `charts/nodemesh`, checked the way operators meet it:
//!
//! - offline (no root): `helm lint --strict` and `helm template` over the values matrix
//!   (`charts/nodemesh/ci/*.yaml`), every rendering validated strictly against the OpenAPI schemas
//!   of two Kubernetes versions (`kubernetes-validate`), bad values refused by the schema naming
//!   the value, the agent's capabilities equal to `mesh_agent::privileges` and never
//!   `privileged`, and the DaemonSet, Deployment and Services shaped as issue 14 asks;
//! - against the real kube-apiserver (root: its own network namespace): `helm install`, the
//!   example policies of docs/ applied, `helm upgrade` that changes a CRD, `helm uninstall`
//!   keeping the CRDs and the policies, and a reinstall; and the agent started as a process the
//!   way a kubelet would start the rendered container (its arguments, environment, host paths,
//!   only its capabilities, the installed ServiceAccount's token), serving `/readyz` with a pod
//!   enrolled.
//!
//! Needs the pinned helm (`cargo xtask k8s build`) and kubernetes-validate (`cargo xtask setup`).

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use nodemesh_tests::{
    agent_exe,
    chart::{
        chart_dir, check_agent_privileges, container_process, documents, find, helm, render,
        validate, values_matrix,
    },
    http_in_netns,
    k8s::{ControlPlane, workspace_root},
    k8s_cluster::{KCluster, NODE_A, TUNNEL_A, until},
    metric_sum, probe_exe, require_root, unique_prefix,
};
use serde_json::{Value, json};

const NS: &str = "nodemesh-system";
/// The chart's minimum Kubernetes (Chart.yaml `kubeVersion`) and the pinned API server's.
const SCHEMA_VERSIONS: [&str; 2] = ["1.30.0", "1.34.0"];

fn default_docs() -> Result<Vec<Value>> {
    documents(&render(&chart_dir(), NS, &[])?)
}

fn helm_fails(args: &[&str]) -> Result<String> {
    let out = helm(args)?;
    ensure!(!out.status.success(), "`helm {}` succeeded", args.join(" "));
    // lint reports on stdout, template on stderr.
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[test]
fn helm_lint_strict_passes_for_every_values_file() -> Result<()> {
    let chart = chart_dir();
    let kube = nodemesh_tests::k8s::pinned_version("KUBERNETES_VERSION")?;
    for file in values_matrix()? {
        let out = helm(&[
            "lint",
            "--strict",
            &chart.to_string_lossy(),
            "--kube-version",
            &kube,
            "-f",
            &file.to_string_lossy(),
        ])?;
        ensure!(
            out.status.success(),
            "helm lint --strict -f {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn every_values_file_renders_objects_valid_for_two_kubernetes_versions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for file in values_matrix()? {
        let yaml = render(&chart_dir(), NS, &["-f", &file.to_string_lossy()])?;
        let docs = documents(&yaml)?;
        ensure!(
            docs.iter().any(|d| d["kind"] == "DaemonSet"),
            "{}: no DaemonSet",
            file.display()
        );
        let out = dir.path().join(file.file_name().context("a file name")?);
        std::fs::write(&out, &yaml)?;
        for version in SCHEMA_VERSIONS {
            validate(&out, version).with_context(|| format!("values {}", file.display()))?;
        }
    }
    // The validator can fail: an unknown field in the pod spec is refused.
    let mut docs = default_docs()?;
    let ds = docs
        .iter_mut()
        .find(|d| d["kind"] == "DaemonSet")
        .context("a DaemonSet")?;
    ds["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    let bad = dir.path().join("typo.yaml");
    std::fs::write(&bad, serde_json::to_string(ds)?)?;
    let refused = validate(&bad, SCHEMA_VERSIONS[1]).expect_err("a misspelt field is refused");
    assert!(
        format!("{refused:#}").contains("hostNetwrok"),
        "{refused:#}"
    );
    Ok(())
}

#[test]
fn bad_values_are_refused_by_the_schema_naming_the_value() -> Result<()> {
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    for (set, names) in [
        (
            "agent.logFormat=xml",
            ["/agent/logFormat", "'text', 'json'"],
        ),
        (
            "agent.ports.metrics=-1",
            ["/agent/ports/metrics", "minimum"],
        ),
        (
            "controller.ports.ca=70000",
            ["/controller/ports/ca", "maximum"],
        ),
        (
            "agent.caProvider=vault",
            ["/agent/caProvider", "'local', 'controller'"],
        ),
        (
            "agent.logFromat=json",
            ["/agent", "'logFromat' not allowed"],
        ),
        (
            "controller.replicas=two",
            ["/controller/replicas", "want integer"],
        ),
    ] {
        let kube = "1.34.4";
        for verb in ["template", "lint"] {
            let mut args = vec![verb];
            if verb == "template" {
                args.push("nodemesh");
            }
            args.extend([&*chart, "--kube-version", kube, "--set", set]);
            let err = helm_fails(&args)?;
            for name in names {
                assert!(
                    err.contains(name),
                    "`helm {verb} --set {set}` should name {name:?}:\n{err}"
                );
            }
        }
    }
    // Combinations a template's `fail` refuses (which `helm lint` does not run): the default
    // agent.caProvider=controller without the controller (nobody to ask), and ServiceMonitors
    // without the Services they select (they would scrape nothing, silently).
    for (sets, says) in [
        (
            &["controller.enabled=false"][..],
            &[
                "agent.caProvider=controller needs the controller",
                "agent.caProvider=local",
            ][..],
        ),
        (
            &[
                "metrics.service.enabled=false",
                "metrics.serviceMonitor.enabled=true",
            ],
            &["metrics.serviceMonitor.enabled=true needs the metrics Services"],
        ),
    ] {
        let mut args = vec!["template", "nodemesh", &*chart, "--kube-version", "1.34.4"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let err = helm_fails(&args)?;
        for said in says {
            assert!(
                err.contains(said),
                "`--set {sets:?}` should say {said:?}:\n{err}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_agent_gets_exactly_the_listed_capabilities_and_is_never_privileged() -> Result<()> {
    let listed = mesh_agent::privileges::agent_capability_names();
    for file in values_matrix()? {
        let docs = documents(&render(&chart_dir(), NS, &["-f", &file.to_string_lossy()])?)?;
        let ds = find(&docs, "DaemonSet", "-agent")?;
        check_agent_privileges(ds, &listed)
            .with_context(|| format!("values {}", file.display()))?;
        for d in &docs {
            let text = serde_json::to_string(d)?;
            assert!(
                !text.contains(r#""privileged":true"#),
                "{} renders a privileged container",
                file.display()
            );
        }
    }
    // The check fails on a capability added without a reason, on one missing, on privileged.
    let docs = default_docs()?;
    let ds = find(&docs, "DaemonSet", "-agent")?;
    let container = |f: &dyn Fn(&mut Value)| {
        let mut d = ds.clone();
        f(&mut d["spec"]["template"]["spec"]["containers"][0]);
        d
    };
    let extra = container(&|c| {
        c["securityContext"]["capabilities"]["add"]
            .as_array_mut()
            .expect("a list")
            .push(json!("SYS_MODULE"))
    });
    let err = check_agent_privileges(&extra, &listed).expect_err("an unlisted capability");
    assert!(format!("{err}").contains("SYS_MODULE"), "{err}");
    let fewer = &listed[1..];
    let err = check_agent_privileges(ds, fewer).expect_err("a capability not listed");
    assert!(format!("{err}").contains(listed[0]), "{err}");
    let privileged = container(&|c| c["securityContext"]["privileged"] = json!(true));
    let err = check_agent_privileges(&privileged, &listed).expect_err("privileged");
    assert!(format!("{err}").contains("privileged"), "{err}");
    let no_drop = container(&|c| c["securityContext"]["capabilities"]["drop"] = json!([]));
    check_agent_privileges(&no_drop, &listed).expect_err("capabilities not dropped");
    Ok(())
}

#[test]
fn the_workloads_are_shaped_for_operators() -> Result<()> {
    let docs = default_docs()?;
    let ds = find(&docs, "DaemonSet", "-agent")?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["hostNetwork"], json!(true));
    assert!(
        pod.get("hostPID").is_none(),
        "the host's /proc is mounted instead"
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        json!(1)
    );
    // Longer than the agent's drain deadline, so the kubelet never kills it mid-drain.
    let drain = mesh_agent::app::AgentOptions::default().drain_deadline;
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .context("a grace period")?;
    assert!(
        Duration::from_secs(grace) > drain,
        "grace {grace}s <= drain deadline {drain:?}"
    );
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e)))
        .collect();
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("HOST_IP", "status.hostIP"),
    ] {
        assert_eq!(
            env.get(name)
                .map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
            Some(&json!(field)),
            "{name} from the downward API"
        );
    }
    assert!(
        env.get("GLIBC_TUNABLES")
            .and_then(|e| e["value"].as_str())
            .is_some_and(|v| v.contains("x86_rep_movsb_threshold")),
        "the glibc tunable of docs/performance.md"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"], json!(path));
        assert_eq!(c[probe]["httpGet"]["port"], json!(15020));
    }
    let token = pod["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .find_map(|v| v["projected"]["sources"][0].get("serviceAccountToken"))
        .context("a projected ServiceAccount token")?;
    assert_eq!(token["audience"], json!("nodemesh-ca"));
    let args: Vec<&str> = c["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args[0], "node");
    for want in [
        "--bpffs=/sys/fs/bpf",
        "--cgroup=/run/nodemesh/cgroupv2",
        "--proc-root=/host/proc",
        "--metrics-addr=$(HOST_IP):15020",
        "--root-namespace=nodemesh-system",
    ] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }

    let deploy = find(&docs, "Deployment", "-controller")?;
    assert_eq!(deploy["spec"]["replicas"], json!(2));
    let cpod = &deploy["spec"]["template"]["spec"];
    assert!(
        cpod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    assert_eq!(cpod["securityContext"]["runAsNonRoot"], json!(true));
    assert_eq!(
        cpod["containers"][0]["securityContext"]["capabilities"],
        json!({"drop": ["ALL"]})
    );
    let pdb = find(&docs, "PodDisruptionBudget", "-controller")?;
    assert_eq!(pdb["spec"]["minAvailable"], json!(1));
    let svc = find(&docs, "Service", "-ca")?;
    let ports: Vec<&Value> = svc["spec"]["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .collect();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "grpc-ca" && p["port"] == 15012)
    );
    let metrics = find(&docs, "Service", "-agent-metrics")?;
    assert_eq!(metrics["spec"]["clusterIP"], json!("None"));
    assert!(
        !docs.iter().any(|d| d["kind"] == "ServiceMonitor"),
        "optional, off by default"
    );

    // With the controller's CA: the agents dial the CA Service by the name its certificate
    // carries and present the projected token from where it is mounted.
    let ca = documents(&render(
        &chart_dir(),
        NS,
        &["--set", "agent.caProvider=controller"],
    )?)?;
    let ds_ca = find(&ca, "DaemonSet", "-agent")?;
    let c_ca = &ds_ca["spec"]["template"]["spec"]["containers"][0];
    let ca_args: Vec<&str> = c_ca["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ca_args.contains(&"--ca-address=nodemesh-ca.nodemesh-system.svc:15012"),
        "{ca_args:?}"
    );
    assert!(
        !ca_args.iter().any(|a| a.starts_with("--ca-dir")),
        "{ca_args:?}"
    );
    let token_file = ca_args
        .iter()
        .find_map(|a| a.strip_prefix("--ca-token-file="))
        .context("--ca-token-file")?;
    let mount = c_ca["volumeMounts"]
        .as_array()
        .context("mounts")?
        .iter()
        .find(|m| m["name"] == "ca-token")
        .context("the token's mount")?;
    let token_path = ds_ca["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .find(|v| v["name"] == "ca-token")
        .and_then(|v| v["projected"]["sources"][0]["serviceAccountToken"]["path"].as_str())
        .context("the token's path")?;
    assert_eq!(
        token_file,
        format!(
            "{}/{token_path}",
            mount["mountPath"].as_str().unwrap_or_default()
        )
    );
    let controller_args = find(&ca, "Deployment", "-controller")?["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .to_string();
    assert!(
        controller_args.contains("--ca-service=nodemesh-ca"),
        "{controller_args}"
    );
    let with_monitor = documents(&render(
        &chart_dir(),
        NS,
        &["--set", "metrics.serviceMonitor.enabled=true"],
    )?)?;
    assert_eq!(
        with_monitor
            .iter()
            .filter(|d| d["kind"] == "ServiceMonitor")
            .count(),
        2
    );
    // `metrics.service.enabled=false` removes both metrics Services (the agents' and the
    // controllers'), and nothing else.
    let metrics_services = |docs: &[Value]| {
        docs.iter()
            .filter(|d| d["kind"] == "Service")
            .filter(|d| d["spec"]["ports"][0]["name"] == "http-monitoring")
            .count()
    };
    let without = documents(&render(
        &chart_dir(),
        NS,
        &["--set", "metrics.service.enabled=false"],
    )?)?;
    assert_eq!(
        metrics_services(&docs),
        2,
        "the agents' and the controllers'"
    );
    assert_eq!(metrics_services(&without), 0);
    assert_eq!(without.len(), docs.len() - 2);

    // The CRDs: rendered (so upgrades change them), kept on uninstall.
    let crds: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 2);
    for crd in crds {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            json!("keep")
        );
    }
    assert!(
        !chart_dir().join("crds").exists(),
        "Helm never upgrades a chart's crds/ directory: the CRDs are templates"
    );

    // The image: the chart's appVersion, which is the agent's version.
    let chart_yaml = std::fs::read_to_string(chart_dir().join("Chart.yaml"))?;
    let app_version = chart_yaml
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .context("appVersion")?
        .trim()
        .trim_matches('"');
    assert_eq!(
        app_version,
        env!("CARGO_PKG_VERSION"),
        "appVersion = the crate version"
    );
    assert_eq!(
        c["image"],
        json!(format!("ghcr.io/nodemesh/mesh-agent:{app_version}"))
    );
    Ok(())
}

/// Copies the chart to `to` with one more printer column on the AuthorizationPolicy CRD and
/// the chart's version bumped: a CRD change as an upgrade brings it.
fn changed_chart(to: &Path) -> Result<()> {
    let from = chart_dir();
    let status = std::process::Command::new("cp")
        .args(["-a"])
        .arg(&from)
        .arg(to)
        .status()?;
    ensure!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
    let crd = to.join("files/crds/authorizationpolicies.security.nodemesh.io.yaml");
    let text = std::fs::read_to_string(&crd)?;
    let anchor = "  - additionalPrinterColumns:\n";
    ensure!(
        text.contains(anchor),
        "no printer columns in {}",
        crd.display()
    );
    let text = text.replacen(
        anchor,
        &format!("{anchor}    - jsonPath: .metadata.generation\n      name: Generation\n      type: integer\n"),
        1,
    );
    std::fs::write(&crd, text)?;
    let chart = to.join("Chart.yaml");
    let text = std::fs::read_to_string(&chart)?.replace("\nversion: 0.1.0\n", "\nversion: 0.1.1\n");
    std::fs::write(&chart, text)?;
    Ok(())
}

fn printer_columns(cp: &ControlPlane) -> Result<String> {
    cp.kubectl(&[
        "get",
        "crd",
        "authorizationpolicies.security.nodemesh.io",
        "-o",
        "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}",
    ])
}

#[test]
fn helm_install_upgrade_and_uninstall_against_the_api_server() -> Result<()> {
    require_root();
    let cp = ControlPlane::start(&unique_prefix())?;
    let chart = chart_dir();
    let installed = cp.helm(&[
        "install",
        "nodemesh",
        &chart.to_string_lossy(),
        "--namespace",
        NS,
        "--create-namespace",
    ])?;
    // NOTES.txt: how to check the agents, enroll a namespace and see it work.
    for want in [
        "kubectl -n nodemesh-system get daemonset nodemesh-agent",
        "kubectl label namespace NAMESPACE nodemesh.io/dataplane=enabled",
        "/api/v1/namespaces/nodemesh-system/pods/AGENT_POD:15020/proxy/metrics",
        "nodemesh_workloads_enrolled",
    ] {
        assert!(
            installed.contains(want),
            "NOTES should say {want:?}:\n{installed}"
        );
    }
    let objects = cp.kubectl(&[
        "get",
        "daemonset,deployment,pdb,service,serviceaccount",
        "-n",
        NS,
        "-o",
        "name",
    ])?;
    for want in [
        "daemonset.apps/nodemesh-agent",
        "deployment.apps/nodemesh-controller",
        "poddisruptionbudget.policy/nodemesh-controller",
        "service/nodemesh-ca",
        "service/nodemesh-controller",
        "service/nodemesh-agent-metrics",
        "serviceaccount/nodemesh-agent",
        "serviceaccount/nodemesh-controller",
    ] {
        assert!(
            objects.lines().any(|l| l == want),
            "{want} not installed:\n{objects}"
        );
    }
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/authorizationpolicies.security.nodemesh.io",
        "crd/peerauthentications.security.nodemesh.io",
    ])?;

    // docs/examples, as a user would apply them.
    let examples = workspace_root().join("docs/examples");
    let mut applied = 0;
    let mut namespaces = std::collections::BTreeSet::new();
    let mut files: Vec<_> = std::fs::read_dir(&examples)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        for doc in documents(&text)? {
            if let Some(ns) = doc["metadata"]["namespace"].as_str()
                && namespaces.insert(ns.to_owned())
            {
                cp.apply(&format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
                ))?;
            }
        }
        cp.kubectl(&["apply", "-f", &file.to_string_lossy()])
            .with_context(|| format!("the API server refuses {}", file.display()))?;
        applied += documents(&text)?.len();
    }
    ensure!(applied >= 3, "only {applied} example objects");
    let policies = || -> Result<usize> {
        Ok(cp
            .kubectl(&[
                "get",
                "authorizationpolicies,peerauthentications",
                "-A",
                "-o",
                "name",
            ])?
            .lines()
            .count())
    };
    assert_eq!(policies()?, applied);

    // An upgrade that changes a CRD and the agents' arguments.
    assert!(!printer_columns(&cp)?.contains("Generation"));
    let tmp = tempfile::tempdir()?;
    let changed = tmp.path().join("nodemesh");
    changed_chart(&changed)?;
    cp.helm(&[
        "upgrade",
        "nodemesh",
        &changed.to_string_lossy(),
        "--namespace",
        NS,
        "--set",
        "agent.logFormat=json",
    ])?;
    let columns = printer_columns(&cp)?;
    assert!(
        columns.contains("Generation"),
        "the upgrade did not change the CRD: {columns}"
    );
    let args = cp.kubectl(&[
        "get",
        "daemonset",
        "nodemesh-agent",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ])?;
    assert!(args.contains("--log-format=json"), "{args}");
    let history = cp.helm(&["history", "nodemesh", "--namespace", NS, "-o", "json"])?;
    let history: Value = serde_json::from_str(&history)?;
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");
    assert_eq!(policies()?, applied, "the upgrade kept every policy");

    // Uninstall: the workloads go; the CRDs and the users' policies stay.
    cp.helm(&["uninstall", "nodemesh", "--namespace", NS])?;
    let left = cp.kubectl(&[
        "get",
        "daemonset,deployment,service,clusterrole",
        "-A",
        "-o",
        "name",
    ])?;
    assert!(!left.contains("nodemesh"), "left behind:\n{left}");
    let crds = cp.kubectl(&["get", "crd", "-o", "name"])?;
    assert_eq!(
        crds.lines()
            .filter(|l| l.contains("security.nodemesh.io"))
            .count(),
        2,
        "{crds}"
    );
    assert_eq!(policies()?, applied, "uninstall kept every policy");

    // Installing again adopts the kept CRDs.
    cp.helm(&[
        "install",
        "nodemesh",
        &chart.to_string_lossy(),
        "--namespace",
        NS,
    ])?;
    assert!(
        !printer_columns(&cp)?.contains("Generation"),
        "the reinstall wrote the chart's CRD"
    );
    Ok(())
}

#[test]
fn the_agent_runs_with_the_charts_arguments_capabilities_and_token() -> Result<()> {
    let mut c = KCluster::up(true)?;
    c.add_pod("client", "client", "client", 0)?;
    let node = &c.nodes[0];
    let instance = format!("{}-chart", unique_prefix());
    let state = c.dir.path().join("host-state");
    let token_dir = c.dir.path().join("ca-token");
    std::fs::create_dir_all(&token_dir)?;
    // The values a node's host paths would have; everything else is the chart's default.
    let sets: Vec<String> = [
        format!("agent.instance={instance}"),
        format!(
            "agent.hostPaths.cgroupRoot={}",
            node.cgroup.path().display()
        ),
        format!("agent.hostPaths.state={}", state.display()),
        format!("agent.tunnelIPv4={TUNNEL_A}"),
        // The controller's CA is the default; its client is covered by k8s_mode's CA test
        // (the Service's DNS name does not resolve in the lab), so this agent signs locally.
        "agent.caProvider=local".to_owned(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_owned(), s])
    .collect();
    let set_refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let yaml = render(&chart_dir(), NS, &set_refs)?;
    let docs = documents(&yaml)?;
    let ds = find(&docs, "DaemonSet", "-agent")?;
    let fields = BTreeMap::from([
        ("spec.nodeName", "node-a".to_owned()),
        ("status.hostIP", NODE_A.to_owned()),
        ("metadata.name", "nodemesh-agent-x1".to_owned()),
        ("metadata.namespace", NS.to_owned()),
        (
            "metadata.uid",
            "00000000-0000-0000-0000-000000000001".to_owned(),
        ),
        ("spec.serviceAccountName", "nodemesh-agent".to_owned()),
    ]);
    let projected = BTreeMap::from([("ca-token", token_dir)]);
    let process = container_process(ds, "agent", &fields, &projected)?;
    assert!(
        process
            .args
            .contains(&format!("--cgroup={}", node.cgroup.path().display())),
        "container paths mapped to host paths: {:?}",
        process.args
    );
    // The installed ServiceAccount's token, as the in-cluster mount would give it.
    let kubeconfig =
        c.cp.service_account_kubeconfig(NS, "nodemesh-agent", Some(NODE_A.parse()?))?;
    let log = c.dir.path().join("chart-agent.log");
    let mut child = kubelet_start(node, &process)?
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("cannot start the agent")?;
    let _cleanup = Cleanup(instance.clone());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let stats = SocketAddr::new(NODE_A.parse()?, 15020);
    let result = until(
        "the agent's /readyz to answer 200",
        Duration::from_secs(60),
        || {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the agent exited ({status}):\n{}", logs());
            }
            Ok(http_in_netns(&node.ns.path(), stats, "GET", "/readyz")
                .is_ok_and(|(code, _)| code == 200))
        },
    );
    let metrics = http_in_netns(&node.ns.path(), stats, "GET", "/metrics").map(|(_, b)| b);
    let _ = child.kill();
    let _ = child.wait();
    result.with_context(|| format!("args {:?}\n{}", process.args, logs()))?;
    let metrics = metrics?;
    // The pod's namespace was found through /proc and joined: SYS_PTRACE and SYS_ADMIN held.
    assert_eq!(
        metric_sum(&metrics, "nodemesh_workloads_enrolled", &[]),
        1,
        "{}",
        logs()
    );

    // The cleanup step of docs/install.md: the same values with `agent.cleanup=true`; its init
    // containers remove the pins and the tunnel interface the agent left (on purpose).
    let pins = Path::new("/sys/fs/bpf/nodemesh").join(&instance);
    assert!(pins.exists(), "the agent pinned into {}", pins.display());
    assert!(node.ns.exec(&["ip", "link", "show", "nm-tunnel"]).is_ok());
    let mut sets = sets;
    sets.extend(["--set".to_owned(), "agent.cleanup=true".to_owned()]);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let docs = documents(&render(&chart_dir(), NS, &sets)?)?;
    let ds = find(&docs, "DaemonSet", "-agent")?;
    for name in ["remove-pins", "remove-tunnel-interface"] {
        let step = container_process(ds, name, &fields, &projected)?;
        let out = kubelet_start(node, &step)?.output()?;
        ensure!(
            out.status.success(),
            "cleanup step {name} {step:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!pins.exists(), "{} left after the cleanup", pins.display());
    assert!(
        node.ns.exec(&["ip", "link", "show", "nm-tunnel"]).is_err(),
        "nm-tunnel left after the cleanup"
    );
    Ok(())
}

#[test]
fn two_controllers_run_with_the_charts_arguments_user_and_token() -> Result<()> {
    let c = KCluster::up(false)?;
    let docs = documents(&render(&chart_dir(), NS, &[])?)?;
    let deploy = find(&docs, "Deployment", "-controller")?;
    let replicas = deploy["spec"]["replicas"].as_u64().context("replicas")?;
    assert_eq!(replicas, 2);
    let pod = &deploy["spec"]["template"]["spec"];
    let uid = pod["securityContext"]["runAsUser"]
        .as_u64()
        .context("runAsUser")?;
    // The installed ServiceAccount's token, readable by the container's user.
    let kubeconfig =
        c.cp.service_account_kubeconfig(NS, "nodemesh-controller", Some(NODE_A.parse()?))?;
    let shared = c.dir.path().join("controller");
    std::fs::create_dir_all(&shared)?;
    let readable = shared.join("kubeconfig");
    std::fs::copy(&kubeconfig, &readable)?;
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (c.dir.path(), 0o755),
        (shared.as_path(), 0o755),
        (readable.as_path(), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    // One replica per node (the anti-affinity), each in its node's network namespace.
    let mut children = Vec::new();
    let mut guards = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let fields = BTreeMap::from([
            ("metadata.name", format!("nodemesh-controller-{i}")),
            ("metadata.namespace", NS.to_owned()),
        ]);
        let process = container_process(deploy, "controller", &fields, &BTreeMap::new())?;
        assert!(
            process.capabilities.is_empty(),
            "{:?}",
            process.capabilities
        );
        let log = c.dir.path().join(format!("controller-{i}.log"));
        let child = kubelet_start_as(node, &process, Some(uid))?
            .env("KUBECONFIG", &readable)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start a controller")?;
        guards.push(Kill(child.id()));
        children.push((node, log, child));
    }
    let logs = |children: &[(
        &nodemesh_tests::cluster::Node,
        std::path::PathBuf,
        std::process::Child,
    )]| {
        children
            .iter()
            .map(|(_, l, _)| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let addrs = [NODE_A, nodemesh_tests::k8s_cluster::NODE_B];
    until(
        "both controllers' /readyz to answer 200",
        Duration::from_secs(60),
        || {
            for (n, (node, _, child)) in children.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("controller {n} exited ({status})");
                }
                let at = SocketAddr::new(addrs[n].parse()?, 15014);
                if !http_in_netns(&node.ns.path(), at, "GET", "/readyz")
                    .is_ok_and(|(c, _)| c == 200)
                {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .with_context(|| logs(&children))?;
    // Exactly one leader.
    let mut leaders = 0;
    until("one leader", Duration::from_secs(30), || {
        leaders = 0;
        for (n, (node, _, _)) in children.iter().enumerate() {
            let at = SocketAddr::new(addrs[n].parse()?, 15014);
            let (_, body) = http_in_netns(&node.ns.path(), at, "GET", "/metrics")?;
            leaders += body
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_once(' '))
                .filter(|(name, v)| name.ends_with("controller_leader") && v.trim() == "1")
                .count();
        }
        Ok(leaders == 1)
    })
    .with_context(|| logs(&children))?;
    Ok(())
}

/// Kills a process when the test ends.
struct Kill(u32);

impl Drop for Kill {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            // SAFETY: kill(2) takes plain integers; the pid is a child this test started (an
            // error only means it is gone already).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// [`kubelet_start_as`] as root (the agent's `runAsUser: 0`).
fn kubelet_start(
    node: &nodemesh_tests::cluster::Node,
    process: &nodemesh_tests::chart::ContainerProcess,
) -> Result<std::process::Command> {
    kubelet_start_as(node, process, None)
}

/// The container's process as a kubelet would start it on `node` (its network namespace and
/// cgroup): its command (default the image's entrypoint, `mesh-agent`) and arguments, only its
/// environment, only its capabilities (the bounding set, as a container runtime sets it for a
/// root process), and its user (`runAsUser`) when not root.
fn kubelet_start_as(
    node: &nodemesh_tests::cluster::Node,
    process: &nodemesh_tests::chart::ContainerProcess,
    user: Option<u64>,
) -> Result<std::process::Command> {
    let bounding: String = std::iter::once("-all".to_owned())
        .chain(
            process
                .capabilities
                .iter()
                .map(|c| format!("+{}", c.to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = std::process::Command::new(probe_exe()?);
    cmd.arg(node.cgroup.path())
        .arg(node.ns.path())
        .args(["exec", "setpriv"]);
    if let Some(uid) = user {
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups");
    }
    cmd.arg(format!("--bounding-set={bounding}"))
        .args(["--inh-caps=-all", "--"]);
    match process.command.split_first() {
        Some((program, rest)) => cmd.arg(program).args(rest),
        None => cmd.arg(agent_exe()?),
    };
    cmd.args(&process.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&process.env)
        .stdin(std::process::Stdio::null());
    Ok(cmd)
}

/// Removes the agent's pins (its programs detach) once the test is done.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(agent) = agent_exe() {
            let _ = std::process::Command::new(agent)
                .args(["uninstall", "--instance", &self.0])
                .output();
        }
    }
}
