//! The mesh CA (`mesh_agent::ca`) against a real kube-apiserver, in-process, with the agent's
//! CA client (`mesh_agent::identity::ca_client`) as the caller. The CA runs with the
//! `nodemesh-controller` ServiceAccount's own token and the chart's RBAC, the client reads the
//! bundle ConfigMap with the `nodemesh-agent` ServiceAccount's, so a missing verb fails a test.
//! Tokens come from the TokenRequest API (pod-bound, audience `nodemesh-ca`), or are forged
//! with the control plane's service-account signing key (an expired one: TokenRequest's
//! minimum lifetime is 600 s).
//!
//! Which test fails when a check is broken (the CA's checks in order, docs/architecture.md):
//! - TokenReview `authenticated` (and the audience): `node_authorization…` (the expired
//!   forged token, the token for the API's audience).
//! - the caller allow-list: `node_authorization…` (the `shop/web` token).
//! - pod-bound token: `node_authorization…` (the agent's unbound token).
//! - the caller's pod exists with the token's UID: the API server's TokenReview refuses those
//!   tokens first (`node_authorization…`: deleted and recreated pods), so our own check is
//!   covered by `ca::authorize::tests::each_caller_check_refuses_with_its_reason`.
//! - the trust domain: `node_authorization…` (`other.td`).
//! - a pod of the service account on the caller's node: `node_authorization…` (`shop/db`
//!   from node-a).
//! - the CSR signature: `ca::csr::tests::refuses_bad_signatures_and_other_sans`.
//! - the validity cap: `node_authorization…` (a 10-day request gets at most one hour).
//!
//! Needs root (network namespaces) and the binaries of `cargo xtask k8s build`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use mesh_agent::{
    ca::{self, CaConfig, CaMetrics},
    identity::{
        CertificateProvider, SpiffeId, TrustBundle, WorkloadCert,
        ca_client::{BundleWatch, CaClient, CaClientConfig, watch_bundle},
        local_ca,
        tls::verify_chain,
    },
    readiness::Readiness,
};
use nodemesh_tests::{
    k8s::{ControlPlane, ISSUER, kube_client},
    require_root, unique_prefix,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};

const NS: &str = "nodemesh-system";
const AGENT_SA: &str = "nodemesh-agent";
const TD: &str = "cluster.local";
const SERVER_NAME: &str = "nodemesh-ca.nodemesh-system.svc";

struct Env {
    cp: ControlPlane,
    dir: tempfile::TempDir,
    controller_kc: PathBuf,
    agent_kc: PathBuf,
}

fn pod_yaml(ns: &str, name: &str, sa: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  \
         serviceAccountName: {sa}\n  nodeName: {node}\n  containers:\n  - name: c\n    \
         image: example.invalid/{name}\n---\n"
    )
}

/// A control plane with the chart installed in `nodemesh-system`, agent pods `agent-a` (node-a)
/// and `agent-b` (node-b), and workloads `shop/web-1` (node-a) and `shop/db-1` (node-b).
fn setup() -> Result<Env> {
    require_root();
    let cp = ControlPlane::start(&unique_prefix())?;
    cp.install_chart(NS)?;
    cp.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n")?;
    cp.apply(
        &[
            pod_yaml(NS, "agent-a", AGENT_SA, "node-a"),
            pod_yaml(NS, "agent-b", AGENT_SA, "node-b"),
            pod_yaml("shop", "web-1", "web", "node-a"),
            pod_yaml("shop", "db-1", "db", "node-b"),
        ]
        .concat(),
    )?;
    cp.create_service_account("shop", "web")?;
    let controller_kc = cp.service_account_kubeconfig(NS, "nodemesh-controller", None)?;
    let agent_kc = cp.service_account_kubeconfig(NS, AGENT_SA, None)?;
    Ok(Env {
        cp,
        dir: tempfile::tempdir()?,
        controller_kc,
        agent_kc,
    })
}

impl Env {
    /// A pod-bound token of the agent's ServiceAccount for the CA's audience, in a file.
    fn agent_token(&self, pod: &str) -> Result<PathBuf> {
        let token = self
            .cp
            .token(NS, AGENT_SA, Some(ca::DEFAULT_AUDIENCE), Some(pod))?;
        self.token_file(&format!("agent-{pod}"), &token)
    }

    fn token_file(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, token)?;
        Ok(path)
    }

    fn uid(&self, kind: &str, ns: &str, name: &str) -> Result<String> {
        Ok(self
            .cp
            .kubectl(&[
                "get",
                kind,
                name,
                "-n",
                ns,
                "-o",
                "jsonpath={.metadata.uid}",
            ])?
            .trim()
            .to_owned())
    }

    /// A token like the API server's pod-bound ones, signed with its service-account key.
    fn forge_token(&self, pod: &str, exp_from_now: i64) -> Result<String> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{NS}:{AGENT_SA}"),
            "aud": [ca::DEFAULT_AUDIENCE],
            "iat": now - 7200,
            "nbf": now - 7200,
            "exp": now + exp_from_now,
            "kubernetes.io": {
                "namespace": NS,
                "serviceaccount": {"name": AGENT_SA, "uid": self.uid("serviceaccount", NS, AGENT_SA)?},
                "pod": {"name": pod, "uid": self.uid("pod", NS, pod)?},
            },
        });
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        );
        let msg = self.dir.path().join("jwt-input");
        std::fs::write(&msg, &input)?;
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(self.cp.dir().join("sa.key"))
            .arg(&msg)
            .output()
            .context("cannot run openssl")?;
        ensure!(
            out.status.success(),
            "openssl dgst: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(format!("{input}.{}", b64(&out.stdout)))
    }
}

/// A CA started in the current runtime; stops when dropped.
struct RunningCa {
    addr: SocketAddr,
    metrics: CaMetrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ca::CaError>>,
}

impl Drop for RunningCa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn start_ca(kubeconfig: &Path, config: CaConfig) -> Result<RunningCa> {
    let client = kube_client(kubeconfig).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let metrics = CaMetrics::default();
    let readiness = Readiness::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(ca::serve(
        config,
        client,
        listener,
        metrics.clone(),
        ca::CaGates::register(&readiness),
        async move {
            let _ = stopped.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !readiness.is_ready() {
        if task.is_finished() {
            match task.await {
                Ok(Err(e)) => bail!("the CA failed to start: {e}"),
                other => bail!("the CA stopped before it was ready: {other:?}"),
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the CA was not ready within 30 s: {:?} pending",
            readiness.pending()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(RunningCa {
        addr,
        metrics,
        stop: Some(stop),
        task,
    })
}

fn config() -> CaConfig {
    let mut c = CaConfig::new(NS, TD);
    c.max_ttl = Duration::from_secs(3600);
    c
}

fn client_for(ca: &RunningCa, token: &Path, bundle: &BundleWatch) -> CaClient {
    let mut cfg = CaClientConfig::new(&ca.addr.to_string(), SERVER_NAME, token.to_path_buf());
    cfg.attempts = 1;
    CaClient::new(cfg, bundle.bundle.clone())
}

async fn bundle(env_agent_kc: &Path, configmap: &str) -> Result<BundleWatch> {
    let client = kube_client(env_agent_kc).await?;
    Ok(watch_bundle(client, NS, configmap, TD, Duration::from_secs(20)).await?)
}

fn id(s: &str) -> SpiffeId {
    s.parse().expect("valid SPIFFE ID")
}

async fn refused(client: &CaClient, identity: &str) -> String {
    match client.issue(&id(identity)).await {
        Ok(_) => panic!("{identity} was signed; it must be refused"),
        Err(e) => e.to_string(),
    }
}

/// Polls `f` until it is true or `within` passes.
async fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !f() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[test]
fn node_authorization_signs_only_for_pods_on_the_callers_node() -> Result<()> {
    let env = setup()?;
    let token_a = env.agent_token("agent-a")?;
    let token_b = env.agent_token("agent-b")?;
    let web_token = env
        .cp
        .token("shop", "web", Some(ca::DEFAULT_AUDIENCE), Some("web-1"))?;
    let web_token = env.token_file("web", &web_token)?;
    let unbound = env
        .cp
        .token(NS, AGENT_SA, Some(ca::DEFAULT_AUDIENCE), None)?;
    let unbound = env.token_file("unbound", &unbound)?;
    let api_audience = env.cp.token(NS, AGENT_SA, None, Some("agent-a"))?;
    let api_audience = env.token_file("api-audience", &api_audience)?;
    // The same forged token is accepted while valid and refused once expired: the refusal is
    // the expiry's, not the forgery's.
    let forged_valid = env.token_file("forged-valid", &env.forge_token("agent-a", 3600)?)?;
    let forged_expired = env.token_file("forged-expired", &env.forge_token("agent-a", -60)?)?;
    // Pods that will be deleted, and deleted then recreated, after their tokens were issued.
    env.cp.apply(
        &[
            pod_yaml(NS, "agent-gone", AGENT_SA, "node-a"),
            pod_yaml(NS, "agent-new", AGENT_SA, "node-a"),
        ]
        .concat(),
    )?;
    let token_gone = env.agent_token("agent-gone")?;
    let token_new = env.agent_token("agent-new")?;
    let (controller_kc, agent_kc) = (env.controller_kc.clone(), env.agent_kc.clone());
    let cp = &env.cp;

    cp.block_on(|| async move {
        let ca = start_ca(&controller_kc, config()).await?;
        let bundle = bundle(&agent_kc, ca::DEFAULT_BUNDLE_CONFIGMAP).await?;
        let roots = bundle.bundle.read().expect("lock").roots.clone();
        ensure!(roots.len() == 1, "a new CA publishes its one root");

        // Signed: web runs on node-a, the caller's node.
        let a = client_for(&ca, &token_a, &bundle);
        let cert = a
            .issue(&id("spiffe://cluster.local/ns/shop/sa/web"))
            .await?;
        check_cert(
            &cert,
            &bundle.bundle.read().expect("lock"),
            "spiffe://cluster.local/ns/shop/sa/web",
        )?;
        ensure!(ca.metrics.signed() == 1, "one signature counted");
        // The agent's own identity: its pod is on its node.
        a.issue(&id(
            "spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-agent",
        ))
        .await?;

        // Refused: db has no pod on node-a; node-b's agent gets it.
        let e = refused(&a, "spiffe://cluster.local/ns/shop/sa/db").await;
        ensure!(
            e.contains("no running pod") && e.contains("node-a") && e.contains("PermissionDenied"),
            "{e}"
        );
        ensure!(ca.metrics.refused("no_pod_on_node") == 1, "counted");
        let b = client_for(&ca, &token_b, &bundle);
        b.issue(&id("spiffe://cluster.local/ns/shop/sa/db")).await?;

        // Refused: another ServiceAccount's token, pod-bound and for the right audience.
        let e = refused(
            &client_for(&ca, &web_token, &bundle),
            "spiffe://cluster.local/ns/shop/sa/web",
        )
        .await;
        ensure!(
            e.contains("system:serviceaccount:shop:web") && e.contains("may not request"),
            "{e}"
        );
        ensure!(ca.metrics.refused("caller_not_allowed") == 1, "counted");

        // Refused: the agent's token not bound to a pod.
        let e = refused(
            &client_for(&ca, &unbound, &bundle),
            "spiffe://cluster.local/ns/shop/sa/web",
        )
        .await;
        ensure!(e.contains("not bound to a pod"), "{e}");
        ensure!(ca.metrics.refused("token_not_pod_bound") == 1, "counted");

        // Refused: a token for the API's audience.
        let e = refused(
            &client_for(&ca, &api_audience, &bundle),
            "spiffe://cluster.local/ns/shop/sa/web",
        )
        .await;
        ensure!(
            e.contains("Unauthenticated") && e.contains("nodemesh-ca"),
            "{e}"
        );

        // Forged with the signing key: valid → signed; expired → refused.
        client_for(&ca, &forged_valid, &bundle)
            .issue(&id("spiffe://cluster.local/ns/shop/sa/web"))
            .await
            .context("a forged but valid token (the control plane's own key) must be accepted")?;
        let e = refused(
            &client_for(&ca, &forged_expired, &bundle),
            "spiffe://cluster.local/ns/shop/sa/web",
        )
        .await;
        ensure!(
            e.contains("Unauthenticated") && e.contains("expired"),
            "{e}"
        );

        // Refused: an identity outside the trust domain.
        let e = refused(&a, "spiffe://other.td/ns/shop/sa/web").await;
        ensure!(e.contains("outside the trust domain"), "{e}");
        ensure!(ca.metrics.refused("foreign_trust_domain") == 1, "counted");

        // Capped: ten days asked, one hour given (plus the back-dating for clock skew).
        let mut long = CaClientConfig::new(&ca.addr.to_string(), SERVER_NAME, token_a.clone());
        long.ttl = Duration::from_secs(10 * 24 * 3600);
        let cert = CaClient::new(long, bundle.bundle.clone())
            .issue(&id("spiffe://cluster.local/ns/shop/sa/web"))
            .await?;
        let life = cert.not_after.duration_since(cert.not_before)?;
        ensure!(
            life <= Duration::from_secs(3600 + 300),
            "lifetime {life:?} exceeds the cap"
        );

        // Refused: the token's pod was deleted; its name recreated with a new UID.
        let token_ok = client_for(&ca, &token_gone, &bundle);
        token_ok
            .issue(&id("spiffe://cluster.local/ns/shop/sa/web"))
            .await?;
        cp.kubectl(&[
            "delete",
            "pod",
            "agent-gone",
            "-n",
            NS,
            "--grace-period=0",
            "--force",
        ])?;
        let e = refused(&token_ok, "spiffe://cluster.local/ns/shop/sa/web").await;
        ensure!(
            e.contains("Unauthenticated") || e.contains("does not exist"),
            "{e}"
        );
        cp.kubectl(&[
            "delete",
            "pod",
            "agent-new",
            "-n",
            NS,
            "--grace-period=0",
            "--force",
        ])?;
        cp.apply(&pod_yaml(NS, "agent-new", AGENT_SA, "node-a"))?;
        let e = refused(
            &client_for(&ca, &token_new, &bundle),
            "spiffe://cluster.local/ns/shop/sa/web",
        )
        .await;
        ensure!(
            e.contains("Unauthenticated") || e.contains("recreated"),
            "{e}"
        );
        Ok(())
    })
}

fn check_cert(cert: &WorkloadCert, bundle: &TrustBundle, identity: &str) -> Result<()> {
    verify_chain(bundle, &cert.chain, SystemTime::now())
        .map_err(|e| anyhow::anyhow!("{identity}: does not verify against the bundle: {e}"))?;
    let leaf = mesh_agent::identity::tls::spiffe_id_of(&cert.chain[0])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(leaf.to_string() == identity, "leaf is for {leaf}");
    Ok(())
}

fn pem_of(certs: &[CertificateDer<'_>]) -> String {
    local_ca_pem(certs)
}

fn local_ca_pem(certs: &[CertificateDer<'_>]) -> String {
    ca::roots::bundle_pem(certs)
}

/// Writes `files` into Secret `name` (created or replaced) as the CA's key material.
async fn put_secret(
    kubeconfig: &Path,
    name: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<()> {
    let client = kube_client(kubeconfig).await?;
    let api: Api<Secret> = Api::namespaced(client, NS);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        data: Some(
            files
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Secret::default()
    };
    match api.get_opt(name).await? {
        None => {
            api.create(&PostParams::default(), &secret).await?;
        }
        Some(_) => {
            api.patch(
                name,
                &PatchParams::apply("k8s-ca-test").force(),
                &Patch::Apply(serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "data": secret.data,
                })),
            )
            .await?;
        }
    }
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run `openssl` (install it: `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "`openssl {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A self-signed CA made by the openssl CLI, as Istio's tooling makes them.
fn openssl_root(dir: &Path, rsa: bool) -> Result<(Vec<u8>, Vec<u8>)> {
    std::fs::write(
        dir.join("ca.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nO = Istio\nCN = Root CA\n\
         [v3_ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, \
         cRLSign, digitalSignature\nsubjectKeyIdentifier = hash\n",
    )?;
    let newkey: &[&str] = if rsa {
        &["-newkey", "rsa:2048"]
    } else {
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    };
    let mut args = vec![
        "req",
        "-x509",
        "-nodes",
        "-days",
        "30",
        "-config",
        "ca.cnf",
        "-extensions",
        "v3_ca",
    ];
    args.extend_from_slice(newkey);
    args.extend_from_slice(&["-keyout", "root-key.pem", "-out", "root-cert.pem"]);
    openssl(dir, &args)?;
    Ok((
        std::fs::read(dir.join("root-cert.pem"))?,
        std::fs::read(dir.join("root-key.pem"))?,
    ))
}

#[test]
fn user_provided_rsa_and_ecdsa_roots_issue_certificates_openssl_accepts() -> Result<()> {
    let env = setup()?;
    let token_a = env.agent_token("agent-a")?;
    let (controller_kc, agent_kc) = (env.controller_kc.clone(), env.agent_kc.clone());
    let admin_kc = env.cp.admin_kubeconfig().to_path_buf();
    let dir = env.dir.path().to_path_buf();
    env.cp.block_on(|| async move {
        for (kind, rsa) in [("rsa", true), ("ecdsa", false)] {
            let work = dir.join(kind);
            std::fs::create_dir_all(&work)?;
            let (cert, key) = openssl_root(&work, rsa)?;
            // Istio's `cacerts` layout, put there by the user (as admin).
            let secret = format!("cacerts-{kind}");
            let files = BTreeMap::from([
                ("ca-cert.pem".to_string(), cert.clone()),
                ("ca-key.pem".to_string(), key),
                ("root-cert.pem".to_string(), cert.clone()),
            ]);
            put_secret(&admin_kc, &secret, &files).await?;
            let mut cfg = config();
            cfg.secret = secret.clone();
            cfg.bundle_configmap = format!("root-{kind}");
            let ca = start_ca(&controller_kc, cfg.clone()).await?;
            let bundle = bundle(&agent_kc, &cfg.bundle_configmap).await?;
            let roots: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&cert).collect::<Result<_, _>>()?;
            ensure!(
                bundle.bundle.read().expect("lock").roots == roots,
                "{kind}: the bundle is the user's root"
            );
            let issued = client_for(&ca, &token_a, &bundle)
                .issue(&id("spiffe://cluster.local/ns/shop/sa/web"))
                .await?;
            std::fs::write(work.join("leaf.pem"), pem_of(&issued.chain[..1]))?;
            let out = openssl(
                &work,
                &[
                    "verify",
                    "-CAfile",
                    "root-cert.pem",
                    "-purpose",
                    "sslclient",
                    "leaf.pem",
                ],
            )?;
            ensure!(
                out.contains("leaf.pem: OK"),
                "{kind}: openssl verify said {out}"
            );
            let text = openssl(
                &work,
                &[
                    "x509",
                    "-in",
                    "leaf.pem",
                    "-noout",
                    "-issuer",
                    "-ext",
                    "subjectAltName",
                ],
            )?;
            let flat = text.replace(' ', "");
            ensure!(
                flat.contains("issuer=O=Istio,CN=RootCA"),
                "{kind}: issuer is the root's subject: {text}"
            );
            ensure!(
                text.contains("URI:spiffe://cluster.local/ns/shop/sa/web"),
                "{kind}: {text}"
            );
            // A user-provided Secret is never rewritten by the CA.
            let client = kube_client(&admin_kc).await?;
            let stored = Api::<Secret>::namespaced(client, NS).get(&secret).await?;
            ensure!(
                ca::roots::files_of(&stored) == files,
                "{kind}: the Secret was changed"
            );
            drop(ca);
        }
        Ok(())
    })
}

#[test]
fn two_replicas_share_one_created_root_and_rotation_overlaps_old_and_new() -> Result<()> {
    let env = setup()?;
    let token_a = env.agent_token("agent-a")?;
    let (controller_kc, agent_kc) = (env.controller_kc.clone(), env.agent_kc.clone());
    let admin_kc = env.cp.admin_kubeconfig().to_path_buf();
    env.cp.block_on(|| async move {
        // Two replicas start together: one creates the root, both serve it.
        let (r1, r2) = tokio::join!(
            start_ca(&controller_kc, config()),
            start_ca(&controller_kc, config())
        );
        let (r1, r2) = (r1?, r2?);
        let bundle = bundle(&agent_kc, ca::DEFAULT_BUNDLE_CONFIGMAP).await?;
        let shared = bundle.bundle.clone();
        let old_root = shared.read().expect("lock").roots.clone();
        ensure!(old_root.len() == 1, "one root: {}", old_root.len());
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let from_r1 = client_for(&r1, &token_a, &bundle).issue(&web).await?;
        let from_r2 = client_for(&r2, &token_a, &bundle).issue(&web).await?;
        let only_old = TrustBundle::new(TD, old_root.clone());
        check_cert(&from_r1, &only_old, &web.to_string())?;
        check_cert(&from_r2, &only_old, &web.to_string())?;
        drop(r2);

        // Rotation, step 1: the new root joins the bundle; signing stays with the old one.
        let client = kube_client(&admin_kc).await?;
        let secrets: Api<Secret> = Api::namespaced(client, NS);
        let mut files = ca::roots::files_of(&secrets.get(ca::DEFAULT_SECRET).await?);
        let (new_cert, new_key) = local_ca::generate_root(TD)?;
        let old_pem = files.get("root-cert.pem").cloned().unwrap_or_default();
        files.insert(
            "root-cert.pem".into(),
            [old_pem.clone(), new_cert.clone().into_bytes()].concat(),
        );
        put_secret(&admin_kc, ca::DEFAULT_SECRET, &files).await?;
        until(
            Duration::from_secs(20),
            "the bundle to hold both roots",
            || shared.read().expect("lock").roots.len() == 2,
        )
        .await?;
        let new_root: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(new_cert.as_bytes()).collect::<Result<_, _>>()?;
        let still_old = client_for(&r1, &token_a, &bundle).issue(&web).await?;
        check_cert(&still_old, &only_old, &web.to_string())
            .context("step 1 signs with the old root")?;

        // Step 2: signing switches to the new root; both stay trusted.
        files.insert("ca-cert.pem".into(), new_cert.clone().into_bytes());
        files.insert("ca-key.pem".into(), new_key.into_bytes());
        put_secret(&admin_kc, ca::DEFAULT_SECRET, &files).await?;
        let only_new = TrustBundle::new(TD, new_root.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        let from_new = loop {
            let cert = client_for(&r1, &token_a, &bundle).issue(&web).await?;
            if verify_chain(&only_new, &cert.chain, SystemTime::now()).is_ok() {
                break cert;
            }
            ensure!(
                Instant::now() < deadline,
                "the CA did not switch to the new root"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let both = shared.read().expect("lock").clone();
        ensure!(
            both.roots.len() == 2,
            "both roots trusted during the overlap"
        );
        check_cert(&from_new, &both, &web.to_string())?;
        check_cert(&still_old, &both, &web.to_string())
            .context("old certificates stay valid during the overlap")?;

        // Step 3: the old root leaves the bundle; old certificates stop verifying.
        files.insert("root-cert.pem".into(), new_cert.into_bytes());
        put_secret(&admin_kc, ca::DEFAULT_SECRET, &files).await?;
        until(
            Duration::from_secs(20),
            "the bundle to drop the old root",
            || shared.read().expect("lock").roots == new_root,
        )
        .await?;
        let after = shared.read().expect("lock").clone();
        ensure!(
            verify_chain(&after, &still_old.chain, SystemTime::now()).is_err(),
            "the old root is gone"
        );
        check_cert(&from_new, &after, &web.to_string())?;
        Ok(())
    })
}

/// Runs `tests/interop/ca_client.py` (grpcio + protobuf) in the control plane's namespace.
fn python_call(
    env: &Env,
    addr: SocketAddr,
    roots: &Path,
    token: &Path,
    csr: &Path,
    validity: u64,
) -> Result<Command> {
    let script = nodemesh_tests::k8s::workspace_root().join("tests/interop/ca_client.py");
    let mut cmd = env.cp.command("/usr/bin/python3")?;
    cmd.arg(script)
        .arg(addr.to_string())
        .arg(SERVER_NAME)
        .arg(roots)
        .arg(token)
        .arg(csr)
        .arg(validity.to_string());
    Ok(cmd)
}

async fn run_python(mut cmd: Command) -> Result<serde_json::Value> {
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    ensure!(
        out.status.success(),
        "ca_client.py failed ({}): {} (it needs Debian's python3-grpcio and python3-protobuf: \
         `cargo xtask setup`)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn a_third_party_grpc_client_gets_certificates_and_refusals() -> Result<()> {
    let env = setup()?;
    let token_a = env.agent_token("agent-a")?;
    let work = env.dir.path().to_path_buf();
    // A CSR made by the openssl CLI (not by us): P-256, the SPIFFE ID as its only SAN.
    for (name, sa) in [("web", "web"), ("db", "db")] {
        openssl(
            &work,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/O=cluster.local",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-addext",
                &format!("subjectAltName=URI:spiffe://cluster.local/ns/shop/sa/{sa}"),
            ],
        )?;
    }
    let roots = work.join("bundle.pem");
    let (web_csr, db_csr) = (work.join("web.csr"), work.join("db.csr"));
    let controller_kc = env.controller_kc.clone();
    let env = &env;
    env.cp.block_on(|| async move {
        let ca = start_ca(&controller_kc, config()).await?;
        let client = kube_client(&controller_kc).await?;
        let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, NS)
            .get(ca::DEFAULT_BUNDLE_CONFIGMAP)
            .await?;
        let pem = cm
            .data
            .and_then(|d| d.get("root-cert.pem").cloned())
            .context("bundle")?;
        std::fs::write(&roots, &pem)?;

        let signed =
            run_python(python_call(env, ca.addr, &roots, &token_a, &web_csr, 3600)?).await?;
        ensure!(signed["code"] == 0, "signed: {signed}");
        let chain = signed["chain"].as_array().context("chain")?;
        ensure!(chain.len() == 2, "leaf and root: {signed}");
        let leaf_pem = chain[0].as_str().context("leaf")?;
        std::fs::write(work.join("leaf.pem"), leaf_pem)?;
        std::fs::write(work.join("root.pem"), chain[1].as_str().context("root")?)?;
        let out = openssl(&work, &["verify", "-CAfile", "bundle.pem", "leaf.pem"])?;
        ensure!(out.contains("leaf.pem: OK"), "{out}");
        ensure!(
            std::fs::read_to_string(work.join("root.pem"))?.trim() == pem.trim(),
            "the root comes last"
        );
        // The leaf carries the CSR's key.
        let leaf_key = openssl(&work, &["x509", "-in", "leaf.pem", "-noout", "-pubkey"])?;
        let csr_key = openssl(&work, &["req", "-in", "web.csr", "-noout", "-pubkey"])?;
        ensure!(leaf_key == csr_key, "the leaf's key is the CSR's");

        let refused =
            run_python(python_call(env, ca.addr, &roots, &token_a, &db_csr, 3600)?).await?;
        ensure!(
            refused["code"] == 7,
            "PERMISSION_DENIED expected: {refused}"
        );
        let details = refused["details"].as_str().unwrap_or_default();
        ensure!(
            details.contains("no running pod of ServiceAccount shop/db on node `node-a`"),
            "{refused}"
        );
        ensure!(
            ca.metrics.signed() == 1 && ca.metrics.refused("no_pod_on_node") == 1,
            "counted"
        );
        Ok(())
    })
}
