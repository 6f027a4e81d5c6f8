//! A real Kubernetes control plane for the tests: etcd and kube-apiserver (built from the Go
//! module proxy by `cargo xtask k8s build`), never a fake.
//!
//! [`ControlPlane::start`] runs both inside a fresh network namespace of its own, on fixed ports
//! there ([`API_PORT`], [`ETCD_PORT`]), so parallel test processes never collide.
//! [`ControlPlane::start_with`] can use an existing namespace instead (a lab node's, so agents
//! reach the API on the node's address: give that address in [`Options::extra_sans`]), or the
//! host's (what `cargo xtask k8s up` runs through `nm-k8s`).
//!
//! What runs: kube-apiserver with RBAC authorization, client certificates from a test CA, a
//! service-account signing key and issuer ([`ISSUER`]) so TokenRequest and TokenReview are real,
//! the ServiceAccount admission plugin off (no controller manager creates `default` accounts),
//! and `--endpoint-reconciler-type=none`. No controllers run: namespaces stay Terminating after
//! delete (use a fresh namespace per test), owner references are not collected, Services get no
//! EndpointSlices and DaemonSets no pods (tests write those).
//!
//! The binaries are found in `$NODEMESH_K8S_BIN` (set by `cargo xtask test`) or in the directory
//! recorded in `target/k8s-bin-dir` by `cargo xtask k8s build`.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use nodemesh_tests::k8s::{ControlPlane, kube_client};
//! let cp = ControlPlane::start("mytest")?;
//! cp.create_service_account("demo", "agent")?;
//! let kubeconfig = cp.service_account_kubeconfig("demo", "agent", None)?;
//! let version = cp.block_on(|| async move {
//!     let client = kube_client(&kubeconfig).await?;
//!     Ok(client.apiserver_version().await?.git_version)
//! })?;
//! println!("kube-apiserver {version}");
//! # Ok(()) }
//! ```

use std::{
    fs,
    future::Future,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::{fd::AsFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use nix::sched::{CloneFlags, setns};

use crate::NetNs;

/// The environment variable naming the directory of the four binaries.
pub const BIN_ENV: &str = "NODEMESH_K8S_BIN";
/// kube-apiserver's port inside its network namespace (and the default of `k8s up`).
pub const API_PORT: u16 = 6443;
/// etcd's client port inside the namespace; its peer port is the next one.
pub const ETCD_PORT: u16 = 2379;
/// The service-account issuer, also the audience of tokens for the API itself.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The Service ClusterIP range (the apiserver's own Service would be 10.96.0.1).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// How long the API may take to become ready (a loaded 2-core machine, a cold page cache).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The marker file in a state directory this module created (never remove one without it).
const MARKER: &str = ".nodemesh-k8s";

/// The directory holding `kube-apiserver`, `etcd`, `kubectl` and `helm`.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// `$NODEMESH_K8S_BIN`, else the directory `cargo xtask k8s build` recorded in
    /// `target/k8s-bin-dir`. Fails with the command to run when they are missing.
    pub fn locate() -> Result<Self> {
        let hint = "run `cargo xtask k8s build` (the first build takes about 10 minutes; later \
                    runs reuse the cache)";
        let dir = match std::env::var_os(BIN_ENV).filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                let pointer = workspace_root().join("target/k8s-bin-dir");
                let text = fs::read_to_string(&pointer).with_context(|| {
                    format!(
                        "the Kubernetes binaries are not built: neither ${BIN_ENV} nor {} is \
                         set; {hint}",
                        pointer.display()
                    )
                })?;
                PathBuf::from(text.trim())
            }
        };
        for b in ["kube-apiserver", "etcd", "kubectl", "helm"] {
            ensure!(
                dir.join(b).is_file(),
                "{b} not found in {}: {hint}",
                dir.display()
            );
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }
    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }
    pub fn kubectl(&self) -> PathBuf {
        self.dir.join("kubectl")
    }
    pub fn helm(&self) -> PathBuf {
        self.dir.join("helm")
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The Kubernetes versions pinned in `xtask/k8s/versions.env` (`KEY` → value), for tests that
/// check what runs.
pub fn pinned_version(key: &str) -> Result<String> {
    let path = workspace_root().join("xtask/k8s/versions.env");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("{} has no {key}", path.display()))
}

/// Where the control plane's processes run.
#[derive(Clone, Debug, Default)]
pub enum Network {
    /// A fresh network namespace owned (and deleted) by the [`ControlPlane`].
    #[default]
    Fresh,
    /// An existing namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`); the caller keeps it.
    /// One control plane per namespace (the ports are fixed).
    Existing(PathBuf),
    /// The host's namespace, listening on 127.0.0.1 only (`cargo xtask k8s up`).
    Host,
}

/// How to start a [`ControlPlane`].
#[derive(Clone, Debug)]
pub struct Options {
    /// A short prefix for the namespace (`NAME-k8s`) and the temporary directory.
    pub name: String,
    pub network: Network,
    /// More IP addresses the serving certificate must carry (besides 127.0.0.1 and 10.96.0.1),
    /// e.g. the lab node's address the agents use.
    pub extra_sans: Vec<IpAddr>,
    /// A state directory to use (created; must be empty or one of ours). `None`: a temporary
    /// directory removed with the control plane.
    pub dir: Option<PathBuf>,
    pub api_port: u16,
    pub etcd_port: u16,
    /// Print what is happening to stderr (for `k8s up`).
    pub progress: bool,
}

impl Options {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            network: Network::Fresh,
            extra_sans: Vec::new(),
            dir: None,
            api_port: API_PORT,
            etcd_port: ETCD_PORT,
            progress: false,
        }
    }
}

/// etcd plus kube-apiserver. Dropping it (or [`stop`](Self::stop)) kills both and removes the
/// namespace it created and its temporary directory, also when a test fails.
pub struct ControlPlane {
    bins: Binaries,
    opts: Options,
    /// The namespace file; `None` for the host.
    netns_path: Option<PathBuf>,
    dir: PathBuf,
    admin_kubeconfig: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// Processes left running on purpose (`k8s up`).
    detached: bool,
    // Dropped after the processes are gone (see `Drop`).
    _tmp: Option<tempfile::TempDir>,
    _owned_ns: Option<NetNs>,
}

impl ControlPlane {
    /// A control plane in a fresh network namespace named `NAME-k8s` (use
    /// [`crate::unique_prefix`] for NAME in tests).
    pub fn start(name: &str) -> Result<Self> {
        Self::start_with(Options::new(name))
    }

    pub fn start_with(opts: Options) -> Result<Self> {
        let bins = Binaries::locate()?;
        ensure!(
            Command::new("openssl")
                .arg("version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "the `openssl` CLI is missing (it makes the control plane's certificates): run \
             `cargo xtask setup` or install openssl"
        );
        let (owned_ns, netns_path) = match &opts.network {
            Network::Fresh => {
                let ns = NetNs::new(&format!("{}-k8s", opts.name))?;
                let path = ns.path();
                (Some(ns), Some(path))
            }
            Network::Existing(p) => {
                ensure!(
                    p.exists(),
                    "network namespace {} does not exist",
                    p.display()
                );
                (None, Some(p.clone()))
            }
            Network::Host => (None, None),
        };
        let (tmp, dir) = match &opts.dir {
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix(&format!("{}-k8s-", opts.name))
                    .tempdir()
                    .context("cannot create a temporary directory")?;
                let dir = tmp.path().to_path_buf();
                (Some(tmp), dir)
            }
            Some(d) => {
                claim_state_dir(d)?;
                (None, d.clone())
            }
        };
        let mut cp = Self {
            bins,
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            opts,
            netns_path,
            dir,
            etcd: None,
            apiserver: None,
            detached: false,
            _tmp: tmp,
            _owned_ns: owned_ns,
        };
        cp.progress("making certificates (openssl)");
        make_pki(&cp.dir, &cp.sans())?;
        let admin = Credentials::ClientCert {
            cert: fs::read(cp.dir.join("admin.crt"))?,
            key: fs::read(cp.dir.join("admin.key"))?,
        };
        write_kubeconfig(&cp.admin_kubeconfig, &cp.server(None), &cp.dir, &admin)?;
        cp.start_etcd()?;
        cp.start_apiserver()?;
        Ok(cp)
    }

    fn progress(&self, what: &str) {
        if self.opts.progress {
            eprintln!("k8s: {what}");
        }
    }

    fn sans(&self) -> Vec<IpAddr> {
        let mut sans = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
        ];
        for ip in &self.opts.extra_sans {
            if !sans.contains(ip) {
                sans.push(*ip);
            }
        }
        sans
    }

    /// The API's URL: `https://127.0.0.1:PORT`, or on `ip` (one of [`Options::extra_sans`]).
    pub fn server(&self, ip: Option<IpAddr>) -> String {
        let addr = SocketAddr::new(
            ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            self.opts.api_port,
        );
        format!("https://{addr}")
    }

    /// The admin (`system:masters`) kubeconfig; its server is 127.0.0.1 in the namespace.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The CA that signed the serving certificate (PEM file).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The network namespace file (`None`: the host's).
    pub fn netns(&self) -> Option<&Path> {
        self.netns_path.as_deref()
    }

    /// The state directory (certificates, kubeconfigs, logs `etcd.log`, `kube-apiserver.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// A command for `program` that runs in the control plane's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        if let Some(ns) = &self.netns_path {
            let file = fs::File::open(ns)
                .with_context(|| format!("cannot open network namespace {}", ns.display()))?;
            // SAFETY: the closure runs between fork and exec; it only calls setns(2), which is
            // async-signal-safe, and builds an io::Error from an errno without allocating.
            unsafe {
                cmd.pre_exec(move || {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                });
            }
        }
        Ok(cmd)
    }

    fn log_file(&self, name: &str) -> Result<fs::File> {
        let path = self.dir.join(format!("{name}.log"));
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))
    }

    fn spawn(&self, name: &str, program: PathBuf, args: &[String]) -> Result<Child> {
        let log = self.log_file(name)?;
        let mut cmd = self.command(&program)?;
        cmd.args(args).stdout(log.try_clone()?).stderr(log);
        if self.opts.dir.is_some() && matches!(self.opts.network, Network::Host) {
            // `k8s up`: outlive nm-k8s and its terminal's Ctrl-C.
            cmd.process_group(0);
        }
        cmd.spawn()
            .with_context(|| format!("cannot start {}", program.display()))
    }

    fn start_etcd(&mut self) -> Result<()> {
        let p = self.opts.etcd_port;
        let peer = p.checked_add(1).context("etcd port too high")?;
        let data = self.dir.join("etcd");
        let args = vec![
            "--name=nodemesh".into(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls=http://127.0.0.1:{p}"),
            format!("--advertise-client-urls=http://127.0.0.1:{p}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=nodemesh=http://127.0.0.1:{peer}"),
            "--initial-cluster-state=new".into(),
            // Test data: durability is not needed, speed is.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        self.progress(&format!("starting etcd on 127.0.0.1:{p}"));
        self.etcd = Some(self.spawn("etcd", self.bins.etcd(), &args)?);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last: String;
        loop {
            if let Some(child) = self.etcd.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "etcd exited ({status}) while starting (port {p} taken?); {}",
                    self.log_tail("etcd")
                );
            }
            match self.http_get(p, "/health") {
                Ok((200, body)) if body.contains("true") => break,
                Ok((code, body)) => last = format!("HTTP {code}: {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd not healthy after {READY_TIMEOUT:?} (last: {last}); {}",
                    self.log_tail("etcd")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.progress("etcd healthy");
        Ok(())
    }

    fn apiserver_args(&self) -> Vec<String> {
        let d = &self.dir;
        let host = matches!(self.opts.network, Network::Host);
        let bind = if host { "127.0.0.1" } else { "0.0.0.0" };
        let advertise = self
            .opts
            .extra_sans
            .iter()
            .find(|ip| ip.is_ipv4())
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.opts.etcd_port),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
            format!("--secure-port={}", self.opts.api_port),
            format!("--cert-dir={}", d.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", d.join("apiserver.crt").display()),
            format!(
                "--tls-private-key-file={}",
                d.join("apiserver.key").display()
            ),
            format!("--client-ca-file={}", d.join("ca.crt").display()),
            format!("--service-account-issuer={ISSUER}"),
            format!("--service-account-key-file={}", d.join("sa.pub").display()),
            format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ),
            "--authorization-mode=RBAC".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // Needs a `default` ServiceAccount that only the controller manager would create.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
            // A loopback advertise address makes the reconciler log errors forever.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ]
    }

    fn start_apiserver(&mut self) -> Result<()> {
        self.progress(&format!("starting kube-apiserver on {}", self.server(None)));
        let args = self.apiserver_args();
        self.apiserver = Some(self.spawn("kube-apiserver", self.bins.kube_apiserver(), &args)?);
        self.wait_ready()
    }

    /// Polls `/readyz` until it answers `ok`, the apiserver exits, or the deadline passes.
    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        let mut last = String::from("not listening yet");
        let mut listening = false;
        let mut reported = started;
        loop {
            if let Some(child) = self.apiserver.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "kube-apiserver exited ({status}) while starting (port {} taken?); {}",
                    self.opts.api_port,
                    self.log_tail("kube-apiserver")
                );
            }
            if !listening {
                listening = self.tcp_open(self.opts.api_port);
                if listening {
                    self.progress("kube-apiserver listening; waiting for /readyz");
                }
            }
            if listening {
                let out = self.kubectl_output(
                    &self.admin_kubeconfig,
                    &["get", "--raw=/readyz", "--request-timeout=5s"],
                    None,
                )?;
                if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                    self.progress(&format!(
                        "kube-apiserver ready after {:.1?}",
                        started.elapsed()
                    ));
                    return Ok(());
                }
                last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?} (last: {last}); {}",
                    self.log_tail("kube-apiserver")
                );
            }
            if reported.elapsed() > Duration::from_secs(5) {
                reported = Instant::now();
                self.progress(&format!(
                    "still waiting for kube-apiserver ({:.0?}): {last}",
                    started.elapsed()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let path = self.dir.join(format!("{name}.log"));
        let text = fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("the end of {}:\n{tail}", path.display())
    }

    /// Runs `f` on a thread in the control plane's namespace (or directly on the host).
    fn in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        match &self.netns_path {
            Some(ns) => Ok(mesh_agent::netns::in_netns(ns, f)?),
            None => Ok(f()?),
        }
    }

    fn tcp_open(&self, port: u16) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        self.in_ns(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .is_ok()
    }

    /// A plain-HTTP GET on 127.0.0.1:`port` in the namespace (etcd's `/health`).
    fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream =
            self.in_ns(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad HTTP answer from {addr}{path}: {head:?}"))?;
        Ok((code, body.to_owned()))
    }

    /// Runs kubectl as admin in the namespace; fails with its stderr unless it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.admin_kubeconfig, args)
    }

    /// Runs kubectl with `kubeconfig` in the namespace; fails with its stderr unless it
    /// succeeds.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(kubeconfig, args, None)?;
        ensure!(
            out.status.success(),
            "`kubectl {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl with `kubeconfig` in the namespace, `stdin` as its input, and returns what
    /// happened whether or not it succeeded (for tests that expect a refusal).
    pub fn kubectl_output(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output> {
        let mut cmd = self.command(self.bins.kubectl())?;
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().context("cannot start kubectl")?;
        if let Some(input) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            pipe.write_all(input.as_bytes())
                .context("cannot write kubectl's input")?;
        }
        child.wait_with_output().context("kubectl")
    }

    /// Installs the chart as the end-to-end tests and benchmarks use it: namespace `namespace`,
    /// then what `helm template` renders into it for the pinned Kubernetes version (the CRDs,
    /// ServiceAccounts, RBAC, and the agent DaemonSet and controller Deployment, which stay
    /// without pods: no controllers run), then waits until the CRDs are Established.
    pub fn install_chart(&self, namespace: &str) -> Result<()> {
        let chart = workspace_root().join("charts/nodemesh");
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"
        ))?;
        let rendered = self.helm(&[
            "template",
            "nodemesh",
            &chart.to_string_lossy(),
            "--namespace",
            namespace,
            "--kube-version",
            &pinned_version("KUBERNETES_VERSION")?,
        ])?;
        self.apply(&rendered)?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/authorizationpolicies.security.nodemesh.io",
            "crd/peerauthentications.security.nodemesh.io",
        ])?;
        Ok(())
    }

    /// Runs helm as admin in the namespace (its cache, config and data in the state directory);
    /// fails with its stderr unless it succeeds. No controllers run: never use `--wait`.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(self.bins.helm())?;
        cmd.env("KUBECONFIG", &self.admin_kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .args(args);
        let out = cmd.output().context("cannot start helm")?;
        ensure!(
            out.status.success(),
            "`helm {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml` as admin; returns kubectl's output.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let out = self.kubectl_output(&self.admin_kubeconfig, &["apply", "-f", "-"], Some(yaml))?;
        ensure!(
            out.status.success(),
            "`kubectl apply` failed ({}): {}\n--- input ---\n{yaml}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates namespace `ns` (if missing) and the ServiceAccount `name` in it.
    pub fn create_service_account(&self, ns: &str, name: &str) -> Result<()> {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
        ))?;
        Ok(())
    }

    /// A token for ServiceAccount `ns/sa` from the TokenRequest API (valid one hour), for
    /// `audience` (default: the API itself, [`ISSUER`]), bound to pod `ns/bound_pod` if given
    /// (the pod must exist; the token then dies with it and names it).
    pub fn token(
        &self,
        ns: &str,
        sa: &str,
        audience: Option<&str>,
        bound_pod: Option<&str>,
    ) -> Result<String> {
        let mut args = vec!["create", "token", sa, "-n", ns, "--duration=1h"];
        let aud;
        if let Some(a) = audience {
            aud = format!("--audience={a}");
            args.push(&aud);
        }
        let pod;
        if let Some(p) = bound_pod {
            pod = format!("--bound-object-name={p}");
            args.extend(["--bound-object-kind=Pod", &pod]);
        }
        Ok(self.kubectl(&args)?.trim().to_owned())
    }

    /// Writes `DIR/FILE_NAME.kubeconfig` authenticating with `token` (`None`: anonymous) to the
    /// API at `server_ip` (default 127.0.0.1) and returns its path. kubectl cannot use an
    /// anonymous one (it prompts for credentials); kube-rs can.
    pub fn token_kubeconfig(
        &self,
        file_name: &str,
        token: Option<&str>,
        server_ip: Option<IpAddr>,
    ) -> Result<PathBuf> {
        let path = self.dir.join(format!("{file_name}.kubeconfig"));
        let creds = match token {
            Some(t) => Credentials::Token(t.to_owned()),
            None => Credentials::Anonymous,
        };
        write_kubeconfig(&path, &self.server(server_ip), &self.dir, &creds)?;
        Ok(path)
    }

    /// A kubeconfig for ServiceAccount `ns/sa` (which must exist) with a fresh one-hour token
    /// for the API, so an agent runs with its own least-privilege identity.
    pub fn service_account_kubeconfig(
        &self,
        ns: &str,
        sa: &str,
        server_ip: Option<IpAddr>,
    ) -> Result<PathBuf> {
        let token = self.token(ns, sa, None, None)?;
        self.token_kubeconfig(&format!("sa-{ns}-{sa}"), Some(&token), server_ip)
    }

    /// Runs async code (e.g. a kube-rs client from [`kube_client`]) on a current-thread tokio
    /// runtime inside the control plane's namespace. See [`block_on_in_netns`].
    pub fn block_on<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<T>>,
        T: Send,
    {
        match &self.netns_path {
            Some(ns) => block_on_in_netns(ns, f),
            None => std::thread::scope(|s| {
                let h = s.spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(f())
                });
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
        }
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL after 5 s: with watches open a graceful
    /// shutdown takes over 30 s) and starts it again on the same etcd, certificates and signing
    /// key: data and tokens survive, watches and connections end as in a real restart.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        ensure!(
            !self.detached,
            "a detached control plane cannot be restarted"
        );
        if let Some(child) = self.apiserver.take() {
            terminate(child, Duration::from_secs(5))?;
        }
        self.start_apiserver()
    }

    /// Kills both processes and removes the namespace and temporary directory (as `Drop` does,
    /// but reporting errors).
    pub fn stop(mut self) -> Result<()> {
        self.kill_all()
    }

    fn kill_all(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for (name, child) in [
            ("kube-apiserver", self.apiserver.take()),
            ("etcd", self.etcd.take()),
        ] {
            if let Some(mut child) = child {
                // Nothing to keep: the data dies with the test.
                if let Err(e) = child.kill().and_then(|()| child.wait().map(|_| ())) {
                    errors.push(format!("{name}: {e}"));
                }
            }
        }
        ensure!(errors.is_empty(), "cannot stop {}", errors.join(", "));
        Ok(())
    }

    /// Leaves both processes running (for `k8s up`): writes their pid files into the state
    /// directory for [`stop_detached`].
    pub fn detach(mut self) -> Result<()> {
        ensure!(
            self.opts.dir.is_some(),
            "only a control plane with a state directory can be detached"
        );
        for (name, child) in [("kube-apiserver", &self.apiserver), ("etcd", &self.etcd)] {
            if let Some(c) = child {
                fs::write(self.dir.join(format!("{name}.pid")), c.id().to_string())?;
            }
        }
        self.detached = true;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if !self.detached
            && let Err(e) = self.kill_all()
        {
            eprintln!("cleanup: {e:#}");
        }
        // Then the fields: the namespace we created and the temporary directory.
    }
}

/// Sends SIGTERM and waits up to `grace`, then SIGKILL.
fn terminate(mut child: Child, grace: Duration) -> Result<()> {
    signal(i32::try_from(child.id())?, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// Sends `sig` to `pid` (a process of ours; an error means it is gone already).
fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) };
}

/// Uses `dir` as a state directory: creates it, or accepts it when empty or one of ours.
fn claim_state_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let ours = dir.join(MARKER).exists();
        let empty = fs::read_dir(dir)?.next().is_none();
        ensure!(
            ours || empty,
            "{} exists and was not made by nodemesh's k8s harness: refusing to use it",
            dir.display()
        );
        if ours {
            // A previous run's leftovers (certificates, etcd data): start afresh.
            fs::remove_dir_all(dir)?;
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::write(dir.join(MARKER), "made by nodemesh_tests::k8s\n")?;
    Ok(())
}

/// Whether the process `pid` is alive and its command line mentions `dir` (so it is ours).
fn ours_alive(pid: i32, dir: &Path) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        .unwrap_or(false)
}

fn pid_file(dir: &Path, name: &str) -> Option<i32> {
    fs::read_to_string(dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// For `k8s status`: each process of a detached control plane in `dir` and whether it runs.
pub fn detached_processes(dir: &Path) -> Vec<(&'static str, Option<i32>, bool)> {
    ["etcd", "kube-apiserver"]
        .into_iter()
        .map(|name| {
            let pid = pid_file(dir, name);
            (name, pid, pid.is_some_and(|p| ours_alive(p, dir)))
        })
        .collect()
}

/// Stops a detached control plane (`k8s down`), also after a crash: kills the processes named
/// by the pid files in `dir` whose command lines mention `dir`, then removes `dir` if this
/// module made it. Returns whether there was anything to do.
pub fn stop_detached(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    ensure!(
        dir.join(MARKER).exists(),
        "{} was not made by `k8s up`: not touching it",
        dir.display()
    );
    for name in ["kube-apiserver", "etcd"] {
        let Some(pid) = pid_file(dir, name) else {
            continue;
        };
        if !ours_alive(pid, dir) {
            continue;
        }
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while ours_alive(pid, dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if ours_alive(pid, dir) {
            eprintln!("{name} (pid {pid}) ignored SIGTERM for 30 s: killing it");
            signal(pid, libc::SIGKILL);
        }
    }
    fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(true)
}

/// Runs `f`'s future to completion on a current-thread tokio runtime built on a fresh thread
/// that has joined the network namespace `netns`. Sockets belong to the namespace they are
/// created in, so clients made inside (e.g. [`kube_client`]) reach servers listening there.
/// A panic inside (a failed assertion) is re-raised in the caller.
pub fn block_on_in_netns<F, Fut, T>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    let file = fs::File::open(netns)
        .with_context(|| format!("cannot open network namespace {}", netns.display()))?;
    let path = netns.to_path_buf();
    std::thread::scope(|s| {
        let h = s.spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter network namespace {}", path.display()))?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build a tokio runtime")?
                .block_on(f())
        });
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A kube-rs client from a kubeconfig file (call it inside [`ControlPlane::block_on`]).
pub async fn kube_client(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("cannot read {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("bad kubeconfig {}", kubeconfig.display()))?;
    Ok(kube::Client::try_from(config)?)
}

enum Credentials {
    ClientCert { cert: Vec<u8>, key: Vec<u8> },
    Token(String),
    Anonymous,
}

/// Writes a self-contained kubeconfig (certificates inline) for `server`, trusting `dir`'s CA.
fn write_kubeconfig(path: &Path, server: &str, dir: &Path, creds: &Credentials) -> Result<()> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let ca = fs::read(dir.join("ca.crt"))?;
    let user = match creds {
        Credentials::ClientCert { cert, key } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(cert),
            b64(key)
        ),
        Credentials::Token(t) => format!("    token: {t}\n"),
        Credentials::Anonymous => String::new(),
    };
    let user = if user.is_empty() {
        "  user: {}\n".to_owned()
    } else {
        format!("  user:\n{user}")
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: nodemesh\n  cluster:\n    server: \
         {server}\n    certificate-authority-data: {}\nusers:\n- name: nodemesh\n{user}\
         contexts:\n- name: nodemesh\n  context:\n    cluster: nodemesh\n    user: nodemesh\n\
         current-context: nodemesh\n",
        b64(&ca)
    );
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `openssl` (install it: `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "`openssl {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The certificates, as X.509 v3 (rustls refuses v1 and checks IP SANs): a CA (`ca.crt`), the
/// serving certificate with `sans` and the usual `kubernetes.default…` names
/// (`apiserver.crt`), an admin client certificate in group `system:masters` (`admin.crt`), and
/// the service-account signing key pair (`sa.key`, `sa.pub`).
fn make_pki(dir: &Path, sans: &[IpAddr]) -> Result<()> {
    let mut alt: Vec<String> = sans.iter().map(|ip| format!("IP:{ip}")).collect();
    for dns in [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        alt.push(format!("DNS:{dns}"));
    }
    let conf = format!(
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n\
         [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign,\
         digitalSignature\nsubjectKeyIdentifier = hash\n\
         [server]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,\
         keyEncipherment\nextendedKeyUsage = serverAuth\nsubjectAltName = {}\n\
         subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
         [client]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,\
         keyEncipherment\nextendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
        alt.join(",")
    );
    fs::write(dir.join("openssl.cnf"), conf)?;
    let rsa = ["-newkey", "rsa:2048", "-nodes"];
    let mut ca = vec![
        "req",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "ca",
    ];
    ca.extend(rsa);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=nodemesh-k8s-ca",
    ]);
    openssl(dir, &ca)?;
    for (name, subject, ext) in [
        ("apiserver", "/CN=kube-apiserver", "server"),
        ("admin", "/O=system:masters/CN=nodemesh-admin", "client"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let crt = format!("{name}.crt");
        let mut req = vec!["req", "-new", "-config", "openssl.cnf"];
        req.extend(rsa);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                ext,
                "-out",
                &crt,
            ],
        )?;
    }
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}
