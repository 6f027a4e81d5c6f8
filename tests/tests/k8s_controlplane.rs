//! The test harness's Kubernetes control plane (`nodemesh_tests::k8s`) is a real one: the pinned
//! kube-apiserver on etcd with RBAC, real TokenRequest/TokenReview, CRDs, helm, restarts that
//! keep data (and that a kube-rs watcher survives), and control planes isolated from each other
//! by network namespaces.
//!
//! Needs root (network namespaces) and the binaries of `cargo xtask k8s build` (`cargo xtask
//! test` builds them first).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use nodemesh_tests::{
    NetNs, block_on_in_netns,
    k8s::{ControlPlane, Network, Options, kube_client, pinned_version},
    require_root, unique_prefix,
};
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A TokenReview of `token` for `audiences` (empty: the API's own), as admin.
fn token_review(cp: &ControlPlane, token: &str, audiences: &[&str]) -> Result<Value> {
    let mut spec = format!("  token: {token}\n");
    if !audiences.is_empty() {
        spec.push_str(&format!("  audiences: [{}]\n", audiences.join(", ")));
    }
    let yaml = format!("apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec:\n{spec}");
    let out = cp.kubectl_output(
        cp.admin_kubeconfig(),
        &["create", "-f", "-", "-o", "json"],
        Some(&yaml),
    )?;
    anyhow::ensure!(
        out.status.success(),
        "TokenReview failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(json(&String::from_utf8_lossy(&out.stdout)))
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.nodemesh.io
spec:
  group: test.nodemesh.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
"#;

/// Polls `f` until it returns `Ok`, at most `timeout`; returns the last error otherwise.
fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn pinned_version_rbac_tokens_and_crds() -> Result<()> {
    require_root();
    let cp = ControlPlane::start(&unique_prefix())?;
    let pinned = pinned_version("KUBERNETES_VERSION")?;

    // /version reports the pinned release (not v0.0.0-master).
    let version = json(&cp.kubectl(&["get", "--raw=/version"])?);
    assert_eq!(version["gitVersion"], pinned.as_str(), "{version}");

    // Anonymous requests authenticate as system:anonymous, which RBAC refuses (kube-rs in the
    // namespace: kubectl would prompt for credentials).
    let anon = cp.token_kubeconfig("anonymous", None, None)?;
    let refused = cp.block_on(|| async {
        let client = kube_client(&anon).await?;
        let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
        Ok(api.list(&Default::default()).await.err())
    })?;
    match refused {
        Some(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains("system:anonymous"), "{status:?}");
        }
        other => panic!("expected a 403 for system:anonymous, got {other:?}"),
    }

    // A ServiceAccount token from TokenRequest authenticates as that ServiceAccount.
    cp.create_service_account("demo", "agent")?;
    let sa_kc = cp.service_account_kubeconfig("demo", "agent", None)?;
    let whoami = json(&cp.kubectl_as(&sa_kc, &["auth", "whoami", "-o", "json"])?);
    assert_eq!(
        whoami["status"]["userInfo"]["username"], "system:serviceaccount:demo:agent",
        "{whoami}"
    );
    let token = cp.token("demo", "agent", None, None)?;
    let review = token_review(&cp, &token, &[])?;
    assert_eq!(review["status"]["authenticated"], true, "{review}");
    assert_eq!(
        review["status"]["user"]["username"], "system:serviceaccount:demo:agent",
        "{review}"
    );
    let forged = token_review(&cp, &format!("{token}x"), &[])?;
    assert_ne!(forged["status"]["authenticated"], true, "{forged}");

    // A token bound to a pod and an audience names the pod; other audiences refuse it.
    cp.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  \
         serviceAccountName: agent\n  nodeName: node-a\n  containers:\n  - name: c\n    \
         image: example.invalid/web\n",
    )?;
    let bound = cp.token("demo", "agent", Some("nodemesh-ca"), Some("web"))?;
    let review = token_review(&cp, &bound, &["nodemesh-ca"])?;
    assert_eq!(review["status"]["authenticated"], true, "{review}");
    assert_eq!(
        review["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"][0], "web",
        "{review}"
    );
    let wrong = token_review(&cp, &bound, &["someone-else"])?;
    assert_ne!(wrong["status"]["authenticated"], true, "{wrong}");

    // RBAC: forbidden before a Role and RoleBinding, allowed after, and only what was granted.
    let out = cp.kubectl_output(&sa_kc, &["get", "configmaps", "-n", "demo"], None)?;
    assert!(
        !out.status.success(),
        "listing configmaps before any grant succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Forbidden"), "expected a 403, got: {err}");
    cp.apply(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: read-cm\n  \
         namespace: demo\nrules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  verbs: [get, \
         list, watch]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
         metadata:\n  name: agent-read-cm\n  namespace: demo\nroleRef:\n  apiGroup: \
         rbac.authorization.k8s.io\n  kind: Role\n  name: read-cm\nsubjects:\n- kind: \
         ServiceAccount\n  name: agent\n  namespace: demo\n",
    )?;
    eventually(Duration::from_secs(10), || {
        cp.kubectl_as(&sa_kc, &["get", "configmaps", "-n", "demo"])
    })
    .context("the RoleBinding did not take effect")?;
    let out = cp.kubectl_output(&sa_kc, &["get", "secrets", "-n", "demo"], None)?;
    assert!(
        !out.status.success(),
        "secrets were readable without a grant"
    );

    // A CRD becomes Established and serves its custom resources.
    cp.apply(WIDGET_CRD)?;
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.test.nodemesh.io",
        "--timeout=60s",
    ])?;
    cp.apply(
        "apiVersion: test.nodemesh.io/v1\nkind: Widget\nmetadata:\n  name: w1\n  namespace: \
         demo\nspec:\n  size: 3\n",
    )?;
    let w = json(&cp.kubectl(&["get", "widget", "w1", "-n", "demo", "-o", "json"])?);
    assert_eq!(w["spec"]["size"], 3, "{w}");

    // helm talks to it (a release is a Secret in the namespace; nothing waits for pods).
    let chart = cp.dir().join("chart");
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: probe\nversion: 0.1.0\n",
    )?;
    std::fs::write(
        chart.join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-helm\ndata:\n  k: v\n",
    )?;
    let chart_path = chart.display().to_string();
    cp.helm(&["install", "probe", &chart_path, "-n", "demo"])?;
    assert!(cp.helm(&["list", "-n", "demo"])?.contains("probe"));
    cp.kubectl(&["get", "configmap", "from-helm", "-n", "demo"])?;

    // An in-process kube-rs client, on a runtime inside the namespace, with the SA's token.
    let git_version = cp.block_on(|| async {
        let client = kube_client(&sa_kc).await?;
        Ok(client.apiserver_version().await?.git_version)
    })?;
    assert_eq!(git_version, pinned);
    cp.stop()
}

#[test]
fn two_control_planes_and_an_apiserver_restart() -> Result<()> {
    require_root();
    // A: its own fresh namespace. B: a namespace the test owns (as a lab node's), with an
    // address the serving certificate must name.
    let a = ControlPlane::start(&unique_prefix())?;
    let node = NetNs::new(&format!("{}-node", unique_prefix()))?;
    let node_ip = IpAddr::V4(Ipv4Addr::new(10, 123, 0, 1));
    node.exec(&["ip", "addr", "add", "10.123.0.1/32", "dev", "lo"])?;
    let mut opts = Options::new(&unique_prefix());
    opts.network = Network::Existing(node.path());
    opts.extra_sans = vec![node_ip];
    let mut b = ControlPlane::start_with(opts)?;

    // Same ports, separate namespaces: each holds only its own data.
    for (cp, name) in [(&a, "only-a"), (&b, "only-b")] {
        cp.kubectl(&["create", "namespace", "t"])?;
        cp.kubectl(&["create", "configmap", name, "-n", "t", "--from-literal=k=v"])?;
    }
    let names = |cp: &ControlPlane| -> Result<String> {
        cp.kubectl(&["get", "configmaps", "-n", "t", "-o", "name"])
    };
    let in_a = names(&a)?;
    let in_b = names(&b)?;
    assert!(
        in_a.contains("only-a") && !in_a.contains("only-b"),
        "{in_a}"
    );
    assert!(
        in_b.contains("only-b") && !in_b.contains("only-a"),
        "{in_b}"
    );

    // B on the node's address: TLS verifies the IP SAN; the ServiceAccount is who it says.
    b.create_service_account("t", "agent")?;
    let kc = b.service_account_kubeconfig("t", "agent", Some(node_ip))?;
    let whoami = json(&b.kubectl_as(&kc, &["auth", "whoami", "-o", "json"])?);
    assert_eq!(
        whoami["status"]["userInfo"]["username"], "system:serviceaccount:t:agent",
        "{whoami}"
    );

    // A kube-rs watcher on B (its own thread and runtime in B's namespace) sees the initial
    // list, survives the apiserver restart, and sees an object created after it.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let ns_path = b.netns().context("B runs in a namespace")?.to_path_buf();
    let admin = b.admin_kubeconfig().to_path_buf();
    let watch = std::thread::spawn(move || {
        block_on_in_netns(&ns_path, || async move {
            use futures::StreamExt;
            use kube::runtime::{WatchStreamExt, watcher};
            let client = kube_client(&admin).await?;
            let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, "t");
            let mut events =
                std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            // Errors while the apiserver is away are reported, then the watcher retries.
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = event {
                    let name = cm.metadata.name.unwrap_or_default();
                    let last = name == "after-restart";
                    if tx.send(name).is_err() || last {
                        return Ok(());
                    }
                }
            }
            anyhow::bail!("the watch stream ended")
        })
    });
    let seen = |want: &str| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(name) if name == want => return Ok(()),
                Ok(_) => {}
                Err(e) => anyhow::bail!("the watcher never reported {want}: {e}"),
            }
        }
    };
    seen("only-b")?;

    // Restarting B's apiserver keeps etcd's data and the signing key (old tokens still work).
    b.restart_apiserver()?;
    assert!(names(&b)?.contains("only-b"));
    b.kubectl(&["create", "configmap", "after-restart", "-n", "t"])?;
    seen("after-restart")?;
    watch
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    let whoami = json(&b.kubectl_as(&kc, &["auth", "whoami", "-o", "json"])?);
    assert_eq!(
        whoami["status"]["userInfo"]["username"], "system:serviceaccount:t:agent",
        "{whoami}"
    );
    // A was not disturbed.
    assert!(names(&a)?.contains("only-a"));
    b.stop()?;
    a.stop()
}
