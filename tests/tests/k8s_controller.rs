//! `mesh-agent controller` (as `nm-agent controller`) against a real kube-apiserver
//! (`nodemesh_tests::k8s`), with the chart installed and each controller process running on a
//! ServiceAccount's own token: the leader writes `Accepted` with `observedGeneration` (why not,
//! for a policy the agents refuse), a stand-by never writes, a leader whose Lease is taken
//! stops writing, a SIGKILLed leader is replaced within the Lease duration and status keeps
//! being written, SIGTERM releases the Lease, and every verb of the controller's RBAC
//! (`mesh_agent::rbac::CONTROLLER`) is needed: without any one of them the controller reports
//! the refusal (403) and fails at its job.
//!
//! Needs root (the control plane runs in its own network namespace) and the binaries of
//! `cargo xtask k8s build`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use mesh_agent::rbac::{CONTROLLER, Permission};
use nodemesh_tests::{
    agent_exe, http_in_netns, k8s::ControlPlane, metric_sum, require_root, unique_prefix,
};
use serde_json::Value;

/// The release namespace: the controller's ServiceAccount, Role and Lease live here.
const NS: &str = "nodemesh-system";
/// Where the test's policies live.
const SHOP: &str = "shop";
/// The controller's default Lease duration (client-go's), which these tests use.
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// Polls `f` until it returns `Ok`, at most `timeout`; returns the last error otherwise.
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not within {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))
}

/// One `nm-agent controller` process in the control plane's namespace; killed on drop.
struct Ctl {
    child: Child,
    name: String,
    addr: SocketAddr,
    log: PathBuf,
    netns: PathBuf,
}

impl Ctl {
    fn spawn(
        cp: &ControlPlane,
        kubeconfig: &Path,
        name: &str,
        lease: &str,
        port: u16,
    ) -> Result<Self> {
        let log = cp.dir().join(format!("controller-{name}.log"));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let child = cp
            .command(agent_exe()?)?
            .arg("controller")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--metrics-addr", &addr.to_string()])
            // Its CA: a port of its own, and a root and bundle of its own (the RBAC test needs
            // each replica to create them).
            .args(["--ca-listen", "127.0.0.1:0", "--ca-namespace", NS])
            .args(["--ca-secret", &format!("{name}-ca")])
            .args(["--ca-bundle-configmap", &format!("{name}-ca")])
            .args([
                "--lease-namespace",
                NS,
                "--lease-name",
                lease,
                "--identity",
                name,
            ])
            .env("RUST_LOG", "info,kube_lease_manager=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start nm-agent controller")?;
        Ok(Ctl {
            child,
            name: name.to_owned(),
            addr,
            log,
            netns: cp
                .netns()
                .context("the control plane has its own namespace")?
                .to_path_buf(),
        })
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&mut self, path: &str) -> Result<(u16, String)> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "controller {} exited ({status}):\n{}",
                self.name,
                self.logs()
            );
        }
        http_in_netns(&self.netns, self.addr, "GET", path)
    }

    fn metrics(&mut self) -> Result<String> {
        let (code, body) = self.get("/metrics")?;
        ensure!(code == 200, "/metrics: {code}");
        Ok(body)
    }

    fn metric(&mut self, name: &str, labels: &[&str]) -> Result<u64> {
        Ok(metric_sum(&self.metrics()?, name, labels))
    }

    fn is_leader(&mut self) -> Result<bool> {
        Ok(self.metric("nodemesh_controller_leader", &[])? == 1)
    }

    fn wait_ready(&mut self) -> Result<()> {
        self.wait_ready_within(Duration::from_secs(30))
    }

    fn wait_ready_within(&mut self, timeout: Duration) -> Result<()> {
        eventually(&format!("controller {} ready", self.name), timeout, || {
            let (code, body) = self.get("/readyz")?;
            ensure!(code == 200, "/readyz {code}: {body}");
            Ok(())
        })
        .with_context(|| self.logs())
    }

    /// Sends `signal` (`libc::SIGTERM`, `libc::SIGKILL`) to the process.
    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped (we hold its
        // `Child` and wait only through it), so the pid cannot name another process.
        let rc = unsafe { libc::kill(pid, signal) };
        ensure!(rc == 0, "kill {pid}: {}", std::io::Error::last_os_error());
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let name = self.name.clone();
        eventually(&format!("controller {name} exits"), timeout, || {
            self.child.try_wait()?.context("still running")
        })
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn apply_policy(cp: &ControlPlane, kind: &str, name: &str, spec: &str) -> Result<()> {
    cp.apply(&format!(
        "apiVersion: security.nodemesh.io/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n  \
         namespace: {SHOP}\nspec:\n{spec}"
    ))?;
    Ok(())
}

const GOOD_AP: &str =
    "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [web]\n";
/// Passes the CRD's schema (CIDRs are the agent's job) but not the agent's validation.
const BAD_AP: &str =
    "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/33]\n";
const GOOD_PA: &str = "  mtls:\n    mode: STRICT\n";

/// The object's generation and its `Accepted` condition (`None` until one is written).
fn accepted(cp: &ControlPlane, kind: &str, name: &str) -> Result<(i64, Option<Value>)> {
    let obj = json(&cp.kubectl(&["get", kind, name, "-n", SHOP, "-o", "json"])?)?;
    let generation = obj["metadata"]["generation"]
        .as_i64()
        .context("generation")?;
    let condition = obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted"))
        .cloned();
    if let Some(c) = &condition {
        ensure!(
            obj["status"]["observedGeneration"] == c["observedGeneration"],
            "status.observedGeneration differs from the condition's: {obj}"
        );
    }
    Ok((generation, condition))
}

/// Waits until `kind/name`'s current generation has an `Accepted` condition; returns it.
fn wait_accepted(cp: &ControlPlane, kind: &str, name: &str, timeout: Duration) -> Result<Value> {
    eventually(
        &format!("{kind} {name} has Accepted for its generation"),
        timeout,
        || {
            let (generation, condition) = accepted(cp, kind, name)?;
            let c = condition.context("no Accepted condition")?;
            ensure!(
                c["observedGeneration"] == generation,
                "stale: {c} (generation {generation})"
            );
            Ok(c)
        },
    )
}

fn setup(prefix: &str) -> Result<(ControlPlane, PathBuf)> {
    let cp = ControlPlane::start(prefix)?;
    cp.install_chart(NS)?;
    cp.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SHOP}\n"
    ))?;
    let kubeconfig = cp.service_account_kubeconfig(NS, "nodemesh-controller", None)?;
    Ok((cp, kubeconfig))
}

fn lease(cp: &ControlPlane) -> Result<Value> {
    json(&cp.kubectl(&[
        "get",
        "lease",
        "nodemesh-controller",
        "-n",
        NS,
        "-o",
        "json",
    ])?)
}

fn micro_time(lease: &Value, field: &str) -> Result<Timestamp> {
    let text = lease["spec"][field]
        .as_str()
        .with_context(|| format!("no {field} in {lease}"))?;
    Ok(text.parse()?)
}

fn lease_holder(cp: &ControlPlane, lease: &str) -> Result<Option<String>> {
    let l = json(&cp.kubectl(&["get", "lease", lease, "-n", NS, "-o", "json"])?)?;
    Ok(l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

/// (a) The leader writes `Accepted=True` for valid policies and `False` with the agents' reason
/// for one they refuse, each with its `observedGeneration`, through server-side apply as
/// `nodemesh-controller`; a new generation gets a new verdict; SIGTERM releases the Lease.
#[test]
fn the_leader_writes_accepted_with_the_observed_generation() -> Result<()> {
    require_root();
    let (cp, kubeconfig) = setup(&unique_prefix())?;
    apply_policy(&cp, "AuthorizationPolicy", "good", GOOD_AP)?;
    apply_policy(&cp, "AuthorizationPolicy", "bad", BAD_AP)?;
    apply_policy(&cp, "PeerAuthentication", "strict", GOOD_PA)?;
    let mut ctl = Ctl::spawn(&cp, &kubeconfig, "ctl-a", "nodemesh-controller", 15014)?;
    ctl.wait_ready()?;
    eventually("leader", LEASE_DURATION, || {
        ensure_true(ctl.is_leader()?, "not leader")
    })?;
    assert_eq!(
        lease_holder(&cp, "nodemesh-controller")?.as_deref(),
        Some("ctl-a")
    );

    let t = Duration::from_secs(20);
    let good = wait_accepted(&cp, "authorizationpolicy", "good", t)?;
    assert_eq!(
        (good["status"].as_str(), good["reason"].as_str()),
        (Some("True"), Some("Accepted")),
        "{good}"
    );
    assert_eq!(good["observedGeneration"], 1);
    let bad = wait_accepted(&cp, "authorizationpolicy", "bad", t)?;
    assert_eq!(
        (bad["status"].as_str(), bad["reason"].as_str()),
        (Some("False"), Some("Invalid")),
        "{bad}"
    );
    let why = bad["message"].as_str().unwrap_or_default();
    assert!(
        why.contains(
            "spec.rules[0].from[0].source.ipBlocks[0]: `10.0.0.0/33` is not an IP address or CIDR"
        ) && why.contains("fail closed"),
        "{why}"
    );
    let pa = wait_accepted(&cp, "peerauthentication", "strict", t)?;
    assert_eq!(pa["status"], "True", "{pa}");

    // Written by server-side apply on the status subresource, as nodemesh-controller.
    let obj = json(&cp.kubectl(&[
        "get",
        "authorizationpolicy",
        "good",
        "-n",
        SHOP,
        "-o",
        "json",
        "--show-managed-fields",
    ])?)?;
    let managers: Vec<(&str, &str, &str)> = obj["metadata"]["managedFields"]
        .as_array()
        .context("managedFields")?
        .iter()
        .map(|m| {
            (
                m["manager"].as_str().unwrap_or_default(),
                m["operation"].as_str().unwrap_or_default(),
                m["subresource"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("nodemesh-controller", "Apply", "status")),
        "{managers:?}"
    );

    // A new generation: the good policy broken, the bad one fixed.
    apply_policy(&cp, "AuthorizationPolicy", "good", BAD_AP)?;
    apply_policy(&cp, "AuthorizationPolicy", "bad", GOOD_AP)?;
    let now_bad = wait_accepted(&cp, "authorizationpolicy", "good", t)?;
    assert_eq!(
        (
            now_bad["status"].as_str(),
            now_bad["observedGeneration"].as_i64()
        ),
        (Some("False"), Some(2))
    );
    let now_good = wait_accepted(&cp, "authorizationpolicy", "bad", t)?;
    assert_eq!(
        (
            now_good["status"].as_str(),
            now_good["observedGeneration"].as_i64()
        ),
        (Some("True"), Some(2))
    );
    eventually("policies counted by condition", t, || {
        let m = ctl.metrics()?;
        let n = |kind: &str, accepted: &str| {
            metric_sum(
                &m,
                "nodemesh_controller_policies",
                &[
                    &format!("kind=\"{kind}\""),
                    &format!("accepted=\"{accepted}\""),
                ],
            )
        };
        ensure!(
            (
                n("AuthorizationPolicy", "true"),
                n("AuthorizationPolicy", "false"),
                n("PeerAuthentication", "true")
            ) == (1, 1, 1),
            "{m}"
        );
        Ok(())
    })?;
    assert!(
        ctl.metric(
            "nodemesh_controller_status_writes_total",
            &["result=\"success\""]
        )? >= 5
    );
    assert_eq!(
        ctl.metric(
            "nodemesh_controller_status_writes_total",
            &["result=\"error\""]
        )?,
        0
    );

    // SIGTERM: a clean exit that gives the Lease up.
    ctl.signal(libc::SIGTERM)?;
    let status = ctl.wait_exit(Duration::from_secs(20))?;
    assert!(status.success(), "{status}:\n{}", ctl.logs());
    assert_eq!(
        lease_holder(&cp, "nodemesh-controller")?,
        None,
        "{}",
        ctl.logs()
    );
    Ok(())
}

fn ensure_true(b: bool, what: &str) -> Result<()> {
    ensure!(b, "{what}");
    Ok(())
}

/// A leader whose Lease is taken from it (another holder written into the Lease, as a
/// replica that believed it expired would) notices at its next renewal, stops writing (it still
/// judges policies, but a new generation's status stays unwritten), and takes the Lease back
/// and writes again once the other holder lets it expire.
#[test]
fn a_leader_that_loses_its_lease_stops_writing() -> Result<()> {
    require_root();
    let (cp, kubeconfig) = setup(&unique_prefix())?;
    apply_policy(&cp, "AuthorizationPolicy", "p", GOOD_AP)?;
    let mut ctl = Ctl::spawn(&cp, &kubeconfig, "ctl-a", "nodemesh-controller", 15014)?;
    ctl.wait_ready()?;
    wait_accepted(&cp, "authorizationpolicy", "p", Duration::from_secs(20))?;
    assert!(ctl.is_leader()?);

    let now = serde_json::to_string(&MicroTime(Timestamp::now()))?;
    cp.kubectl(&[
        "patch",
        "lease",
        "nodemesh-controller",
        "-n",
        NS,
        "--type=merge",
        "-p",
        &format!(
            r#"{{"spec":{{"holderIdentity":"intruder","acquireTime":{now},"renewTime":{now}}}}}"#
        ),
    ])?;
    // The leader renews every 5 s; its renewal finds the other holder.
    eventually("the leader notices", Duration::from_secs(10), || {
        ensure_true(!ctl.is_leader()?, "still leader")
    })
    .with_context(|| ctl.logs())?;
    let writes = ctl.metric("nodemesh_controller_status_writes_total", &[])?;
    apply_policy(&cp, "AuthorizationPolicy", "p", BAD_AP)?;
    // The pass over the new generation has run (the verdict is counted) ...
    eventually("the new generation judged", Duration::from_secs(10), || {
        let refused = ctl.metric("nodemesh_controller_policies", &["accepted=\"false\""])?;
        ensure!(refused == 1, "not yet");
        Ok(())
    })?;
    // ... and wrote nothing.
    let (generation, condition) = accepted(&cp, "authorizationpolicy", "p")?;
    assert_eq!(generation, 2);
    let condition = condition.context("the old condition")?;
    assert_eq!(
        (
            condition["observedGeneration"].as_i64(),
            condition["status"].as_str()
        ),
        (Some(1), Some("True"))
    );
    assert_eq!(
        ctl.metric("nodemesh_controller_status_writes_total", &[])?,
        writes
    );
    assert_eq!(
        lease_holder(&cp, "nodemesh-controller")?.as_deref(),
        Some("intruder")
    );

    // The intruder never renews: the Lease expires and the controller takes it back.
    let c = wait_accepted(
        &cp,
        "authorizationpolicy",
        "p",
        LEASE_DURATION + Duration::from_secs(10),
    )
    .with_context(|| ctl.logs())?;
    assert_eq!(
        (c["status"].as_str(), c["observedGeneration"].as_i64()),
        (Some("False"), Some(2))
    );
    assert!(ctl.is_leader()?);
    assert_eq!(
        ctl.metric("nodemesh_controller_leader_acquired_total", &[])?,
        2
    );
    Ok(())
}

/// (b) Two replicas: exactly one leader, the stand-by writes nothing; the leader is SIGKILLed
/// (no release) and the stand-by takes over within the Lease duration of the last renewal
/// (plus the library's random wait of at most 1 s), then writes status for a new generation.
#[test]
fn a_killed_leader_is_replaced_within_the_lease_duration() -> Result<()> {
    require_root();
    let (cp, kubeconfig) = setup(&unique_prefix())?;
    let mut a = Ctl::spawn(&cp, &kubeconfig, "ctl-a", "nodemesh-controller", 15014)?;
    let mut b = Ctl::spawn(&cp, &kubeconfig, "ctl-b", "nodemesh-controller", 15015)?;
    a.wait_ready()?;
    b.wait_ready()?;
    let (mut leader, mut standby) = eventually("exactly one leader", LEASE_DURATION, || {
        match (a.is_leader()?, b.is_leader()?) {
            (true, false) => Ok(true),
            (false, true) => Ok(false),
            other => bail!("leaders (a, b): {other:?}"),
        }
    })
    .map(|a_leads| if a_leads { (a, b) } else { (b, a) })?;
    assert_eq!(
        lease_holder(&cp, "nodemesh-controller")?.as_deref(),
        Some(leader.name.as_str())
    );

    apply_policy(&cp, "AuthorizationPolicy", "p", GOOD_AP)?;
    let c = wait_accepted(&cp, "authorizationpolicy", "p", Duration::from_secs(20))?;
    assert_eq!(c["status"], "True");
    assert!(leader.metric("nodemesh_controller_status_writes_total", &[])? >= 1);
    // The stand-by judged the policy too (its caches are synced) but wrote nothing.
    eventually(
        "the stand-by counts the policy",
        Duration::from_secs(10),
        || {
            let m = standby.metrics()?;
            ensure!(
                metric_sum(&m, "nodemesh_controller_policies", &["accepted=\"true\""]) == 1,
                "{m}"
            );
            Ok(())
        },
    )?;
    assert_eq!(
        standby.metric("nodemesh_controller_status_writes_total", &[])?,
        0
    );
    assert!(!standby.is_leader()?);

    assert_eq!(lease(&cp)?["spec"]["leaseDurationSeconds"], 15);
    leader.signal(libc::SIGKILL)?;
    let killed = Instant::now();
    leader.wait_exit(Duration::from_secs(5))?;
    // The dead leader's last renewal (nobody can take the Lease for 10 s after it).
    let before = lease(&cp)?;
    let last_renewal = micro_time(&before, "renewTime")?;
    // The leader renews with 10 s left, so its last renewal was at most 5 s before the kill.
    eventually(
        "the stand-by takes over",
        LEASE_DURATION + Duration::from_secs(5),
        || ensure_true(standby.is_leader()?, "not yet"),
    )
    .with_context(|| standby.logs())?;
    let took = killed.elapsed();
    let after = lease(&cp)?;
    assert_eq!(
        after["spec"]["holderIdentity"].as_str(),
        Some(standby.name.as_str())
    );
    // Taken within the Lease duration of the last renewal, plus the library's random wait
    // before taking an expired Lease (at most 1 s) and the API calls.
    let gap = Duration::try_from(micro_time(&after, "acquireTime")? - last_renewal)?;
    assert!(
        gap <= LEASE_DURATION + Duration::from_secs(2),
        "taken {gap:?} after the last renewal: {before} → {after}"
    );

    // Status keeps being written, by the new leader, for a new generation.
    apply_policy(&cp, "AuthorizationPolicy", "p", BAD_AP)?;
    let c = wait_accepted(&cp, "authorizationpolicy", "p", Duration::from_secs(20))?;
    assert_eq!(
        (c["status"].as_str(), c["observedGeneration"].as_i64()),
        (Some("False"), Some(2))
    );
    assert!(
        standby.metric(
            "nodemesh_controller_status_writes_total",
            &["result=\"success\""]
        )? >= 1
    );
    eprintln!(
        "leader {} killed; {} took over {took:?} after the kill, {gap:?} after the last renewal",
        leader.name, standby.name
    );
    Ok(())
}

/// Without the policy CRDs the controller runs, says why it is not ready (the list answers 404,
/// counted; `/readyz` names the kinds not synced), and becomes ready and writes status once the
/// CRDs are installed.
#[test]
fn the_controller_waits_for_the_crds() -> Result<()> {
    require_root();
    let cp = ControlPlane::start(&unique_prefix())?;
    cp.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SHOP}\n"))?;
    let kubeconfig = account_without(&cp, "ctl", None)?;
    let mut ctl = Ctl::spawn(&cp, &kubeconfig, "ctl", "nodemesh-controller", 15014)?;
    eventually(
        "the missing CRD is reported",
        Duration::from_secs(20),
        || {
            let n = ctl.metric(
                "nodemesh_controller_kubernetes_errors_total",
                &[
                    "operation=\"list\"",
                    "resource=\"authorizationpolicies\"",
                    "code=\"404\"",
                ],
            )?;
            ensure!(n > 0, "not yet");
            Ok(())
        },
    )?;
    let (code, body) = ctl.get("/readyz")?;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("authorizationpolicies-synced")
            && body.contains("peerauthentications-synced"),
        "{body}"
    );
    assert!(
        ctl.logs()
            .contains("CRD (security.nodemesh.io/v1alpha1) is not installed"),
        "{}",
        ctl.logs()
    );

    let crds = nodemesh_tests::k8s::workspace_root().join("charts/nodemesh/files/crds");
    for entry in std::fs::read_dir(crds)? {
        cp.apply(&std::fs::read_to_string(entry?.path())?)?;
    }
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/authorizationpolicies.security.nodemesh.io",
        "crd/peerauthentications.security.nodemesh.io",
    ])?;
    // The reflectors retry with kube's backoff (up to about 30 s between attempts by then).
    ctl.wait_ready_within(Duration::from_secs(60))?;
    apply_policy(&cp, "AuthorizationPolicy", "p", GOOD_AP)?;
    let c = wait_accepted(&cp, "authorizationpolicy", "p", Duration::from_secs(20))?;
    assert_eq!(c["status"], "True");
    Ok(())
}

/// The RBAC rules of a ClusterRole (or Role) granting `perms`, one rule per triple.
fn rules(perms: &BTreeSet<Permission>) -> String {
    let mut out = String::from("rules:\n");
    for (group, resource, verb) in perms {
        out.push_str(&format!(
            "- apiGroups: [\"{group}\"]\n  resources: [\"{resource}\"]\n  verbs: [\"{verb}\"]\n"
        ));
    }
    if perms.is_empty() {
        out = "rules: []\n".to_owned();
    }
    out
}

/// A ServiceAccount `name` with the controller's grants minus `without`, and its kubeconfig.
fn account_without(cp: &ControlPlane, name: &str, without: Option<&Permission>) -> Result<PathBuf> {
    let keep = |set: BTreeSet<Permission>| -> BTreeSet<Permission> {
        set.into_iter().filter(|p| Some(p) != without).collect()
    };
    let cluster = rules(&keep(CONTROLLER.cluster_set()));
    let namespaced = rules(&keep(CONTROLLER.release_namespace_set()));
    cp.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n  namespace: {NS}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\n{cluster}---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {name}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {name}\n\
         subjects:\n- kind: ServiceAccount\n  name: {name}\n  namespace: {NS}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}\n  namespace: {NS}\n{namespaced}---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {name}\n  namespace: {NS}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {name}\n\
         subjects:\n- kind: ServiceAccount\n  name: {name}\n  namespace: {NS}\n"
    ))?;
    cp.service_account_kubeconfig(NS, name, None)
}

/// The operation label the controller reports a refused call under, by resource and verb.
fn operation(resource: &str, verb: &str) -> &'static str {
    match (resource, verb) {
        ("leases", _) => "lease",
        ("tokenreviews", _) => "tokenreview",
        (r, _) if r.ends_with("/status") => "status-patch",
        (_, "list") => "list",
        (_, "watch") => "watch",
        // The CA's Secret and bundle ConfigMap.
        (_, "get") => "get",
        (_, "create") => "create",
        (_, "update") => "update",
        _ => "unknown",
    }
}

/// (c) Every verb the controller's RBAC grants is needed: with the grants minus any one verb,
/// the controller reports that call refused (403) and does not do its job (not ready, never
/// leader, or no status written); with all of them it reports no refusal and writes status.
/// So removing a verb from `rbac::CONTROLLER` (and the chart, which `rbac::tests` keeps equal)
/// fails the tests above, and a verb the controller does not use fails this one.
#[test]
fn every_verb_of_the_controllers_rbac_is_needed() -> Result<()> {
    require_root();
    let (cp, _) = setup(&unique_prefix())?;
    let mut all: Vec<Option<Permission>> = vec![None];
    all.extend(CONTROLLER.cluster_set().into_iter().map(Some));
    all.extend(CONTROLLER.release_namespace_set().into_iter().map(Some));
    let t = Duration::from_secs(30);
    for (i, without) in all.iter().enumerate() {
        let name = format!("ctl-minus-{i}");
        let case = match without {
            None => "every grant".to_owned(),
            Some((g, r, v)) => format!("without {v} {r}.{g}"),
        };
        let kubeconfig = account_without(&cp, &name, without.as_ref())?;
        // Fresh policies, so there is status to write.
        apply_policy(&cp, "AuthorizationPolicy", &name, GOOD_AP)?;
        apply_policy(&cp, "PeerAuthentication", &name, GOOD_PA)?;
        // The CA's bundle ConfigMap: absent when creating it is what is taken away, else
        // stale, so that updating it is needed too.
        if without
            .as_ref()
            .is_none_or(|(_, r, v)| !(r == "configmaps" && v == "create"))
        {
            cp.apply(&format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}-ca\n  \
                 namespace: {NS}\ndata:\n  root-cert.pem: stale\n"
            ))?;
        }
        let port = 15100 + u16::try_from(i)?;
        let mut ctl = Ctl::spawn(&cp, &kubeconfig, &name, &name, port)?;
        let result = (|| -> Result<()> {
            match without {
                None => {
                    ctl.wait_ready()?;
                    wait_accepted(&cp, "authorizationpolicy", &name, t)?;
                    wait_accepted(&cp, "peerauthentication", &name, t)?;
                    let refused = ctl.metric(
                        "nodemesh_controller_kubernetes_errors_total",
                        &["code=\"403\""],
                    )?;
                    ensure!(
                        refused == 0,
                        "refusals with every grant:\n{}",
                        ctl.metrics()?
                    );
                }
                Some((_, resource, verb)) => {
                    let labels = [
                        format!("operation=\"{}\"", operation(resource, verb)),
                        format!("resource=\"{resource}\""),
                        "code=\"403\"".to_owned(),
                    ];
                    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                    eventually("the refusal is reported", t, || {
                        let n =
                            ctl.metric("nodemesh_controller_kubernetes_errors_total", &labels)?;
                        ensure!(n > 0, "no {labels:?} in\n{}", ctl.metrics()?);
                        Ok(())
                    })?;
                    // And the job is not done.
                    let (code, ready) = ctl.get("/readyz")?;
                    let leader = ctl.is_leader()?;
                    let status_of = |kind: &str| accepted(&cp, kind, &name).map(|(_, c)| c);
                    let written = match resource.as_str() {
                        "authorizationpolicies/status" => {
                            status_of("authorizationpolicy")?.is_some()
                        }
                        "peerauthentications/status" => status_of("peerauthentication")?.is_some(),
                        _ => false,
                    };
                    match (resource.as_str(), verb.as_str()) {
                        (r, "list") => ensure!(
                            code == 503 && ready.contains(&format!("{r}-synced")),
                            "ready without list: {code} {ready}"
                        ),
                        (_, "watch") => {}
                        ("leases", "get" | "create") => ensure!(
                            code == 503 && ready.contains("leader-election") && !leader,
                            "ready or leader without the Lease: {code} {ready}"
                        ),
                        ("leases", _) => ensure!(!leader, "leader without patching the Lease"),
                        // The CA: not ready while it cannot load its root, review tokens or
                        // publish the bundle.
                        ("secrets" | "configmaps", _) => ensure!(
                            code == 503 && ready.contains("ca-root"),
                            "ready without the CA's root: {code} {ready}"
                        ),
                        ("tokenreviews", _) => ensure!(
                            code == 503 && ready.contains("ca-token-review"),
                            "ready without TokenReview: {code} {ready}"
                        ),
                        _ => ensure!(!written, "status written without the grant"),
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            bail!("{case}: {e:#}\n--- controller log ---\n{}", ctl.logs());
        }
        drop(ctl);
    }
    Ok(())
}
