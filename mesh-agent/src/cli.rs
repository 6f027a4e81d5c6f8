//! The `mesh-agent` command line: parses arguments, sets up logging and calls into the library.
//! Lives in the library so the binary stays a one-line `main` and the workspace tests can build
//! the same agent as a binary of their own crate (`nm-agent`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    datapath::{Datapath, LoadOptions, Pins, uninstall},
    maps::TunnelSettings,
    node::{self, NodeOptions},
};

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "nodemesh node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load every eBPF program into the kernel (running the verifier) and report, without
    /// attaching anything. Exits non-zero with the verifier's reason if a program is rejected.
    CheckKernel,
    /// Run the whole node agent (data path, identities, tunnel, policy, metrics, admin) fed by
    /// the Kubernetes API server (docs/kubernetes-mode.md): needs the node's name (`--node` or
    /// NODE_NAME) and a kubeconfig (`--kubeconfig`, KUBECONFIG, or the in-cluster service
    /// account). With `--datapath-only`: only the data path (pin and attach the programs,
    /// redirect enrolled pods to the tunnel address, beat the heartbeat; prints `ready`). Either
    /// way SIGTERM/SIGINT exits leaving the programs attached.
    Node(Box<NodeArgs>),
    /// Run the whole node agent (data path, identities, tunnel, policy) fed from a local YAML
    /// file instead of Kubernetes (docs/local-mode.md). Logs `nodemesh agent ready` and creates
    /// `<state-dir>/ready` once serving; SIGTERM drains and exits leaving the programs pinned.
    Local(LocalArgs),
    /// Run the cluster controller (docs/kubernetes-mode.md#the-controller): every replica
    /// watches the policy CRDs and serves /metrics, /healthz, /readyz; the replica holding the
    /// leader Lease writes each policy's `Accepted` status condition. SIGTERM stops writing and
    /// releases the Lease.
    Controller(ControllerArgs),
    /// Remove everything an agent instance pinned under bpffs: its programs detach (once no
    /// agent process of the instance is running) and its maps are freed. Idempotent.
    Uninstall {
        /// The agent instance whose pins to remove (`<bpffs>/nodemesh/<instance>`).
        #[arg(long)]
        instance: String,
        /// Where bpffs is mounted.
        #[arg(long, default_value = Pins::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Run the mesh CA alone (what `mesh-agent controller` serves on every replica), for tests
    /// and labs: Istio's CA API over TLS with node authorization (docs/architecture.md).
    #[command(hide = true)]
    Ca {
        #[command(flatten)]
        ca: CaArgs,
        /// A kubeconfig file; default KUBECONFIG, else the in-cluster service account.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Write the CustomResourceDefinitions generated from the policy types into a directory
    /// (`cargo xtask codegen` runs this for `charts/nodemesh/files/crds/`).
    #[command(hide = true)]
    WriteCrds {
        /// The directory to write `<plural>.<group>.yaml` files into.
        #[arg(long)]
        out_dir: PathBuf,
    },
}

/// The CA's flags (`mesh-agent controller`, and the hidden `mesh-agent ca`).
#[derive(clap::Args, Clone, Debug)]
pub struct CaArgs {
    /// Where the CA listens (TLS, Istio's CA API).
    #[arg(long = "ca-listen", default_value = "0.0.0.0:15012")]
    pub listen: std::net::SocketAddr,
    /// The release namespace: the root Secret and the bundle ConfigMap live there.
    #[arg(
        long = "ca-namespace",
        env = "POD_NAMESPACE",
        default_value = "nodemesh-system"
    )]
    pub namespace: String,
    /// Trust domain of the identities the CA signs.
    #[arg(long = "ca-trust-domain", default_value = crate::model::spec::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The Secret holding the root (Istio `cacerts` layout; created when absent).
    #[arg(long = "ca-secret", default_value = crate::ca::DEFAULT_SECRET)]
    pub secret: String,
    /// The ConfigMap the trust bundle is published in (`root-cert.pem`).
    #[arg(long = "ca-bundle-configmap", default_value = crate::ca::DEFAULT_BUNDLE_CONFIGMAP)]
    pub bundle_configmap: String,
    /// The audience callers' tokens must be for.
    #[arg(long = "ca-audience", default_value = crate::ca::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// A user allowed to request certificates (repeatable); default
    /// `system:serviceaccount:<namespace>:nodemesh-agent`.
    #[arg(long = "ca-allowed-caller")]
    pub allowed_callers: Vec<String>,
    /// The CA Service's name: the serving certificate names `<service>.<namespace>.svc`.
    #[arg(long = "ca-service", default_value = crate::ca::DEFAULT_SERVICE)]
    pub service: String,
    /// An extra DNS name for the serving certificate (repeatable).
    #[arg(long = "ca-dns-name")]
    pub dns_names: Vec<String>,
    /// The longest certificate lifetime the CA signs, in seconds.
    #[arg(long = "ca-max-ttl-secs", default_value_t = crate::ca::DEFAULT_MAX_TTL.as_secs())]
    pub max_ttl_secs: u64,
}

impl CaArgs {
    pub fn config(&self) -> crate::ca::CaConfig {
        let mut c = crate::ca::CaConfig::new(&self.namespace, &self.trust_domain);
        c.secret = self.secret.clone();
        c.bundle_configmap = self.bundle_configmap.clone();
        c.audience = self.audience.clone();
        if !self.allowed_callers.is_empty() {
            c.allowed_callers = self.allowed_callers.clone();
        }
        c.dns_names = crate::ca::service_dns_names(&self.service, &self.namespace);
        c.dns_names.extend(self.dns_names.iter().cloned());
        c.max_ttl = Duration::from_secs(self.max_ttl_secs.max(60));
        c
    }
}

fn run_ca(args: CaArgs, kubeconfig: Option<PathBuf>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e),
    };
    let result: anyhow::Result<()> = rt.block_on(async move {
        let client = crate::k8s::client(kubeconfig.as_deref()).await?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} for the CA: {e}", args.listen))?;
        let readiness = crate::readiness::Readiness::new();
        let shutdown = async {
            if let Err(e) = crate::tunnel::drain::shutdown_signal().await {
                tracing::warn!(error = %e, "no signal handler; running until killed");
                std::future::pending::<()>().await;
            }
        };
        let metrics = crate::ca::CaMetrics::default();
        let serve = crate::ca::serve(
            args.config(),
            client,
            listener,
            metrics,
            crate::ca::CaGates::register(&readiness),
            shutdown,
        );
        let mut serve = std::pin::pin!(serve);
        // `ready` on stdout once serving, for scripts and tests.
        loop {
            tokio::select! {
                r = &mut serve => return Ok(r?),
                () = tokio::time::sleep(Duration::from_millis(50)), if !readiness.is_ready() => {
                    if readiness.is_ready() {
                        println!("ready");
                    }
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The agent runtime's worker threads unless `--worker-threads` says otherwise.
pub const DEFAULT_WORKER_THREADS: u16 = 2;

#[derive(clap::Args)]
struct NodeArgs {
    /// Only the data path (no Kubernetes, tunnel, identities or policy): the programs, the
    /// tunnel address, exclusions and the heartbeat.
    #[arg(long)]
    datapath_only: bool,
    /// Agent instance: pins live in `<bpffs>/nodemesh/<instance>`.
    #[arg(long, default_value = "default")]
    instance: String,
    /// Where bpffs is mounted.
    #[arg(long, default_value = Pins::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// cgroup v2 directory to attach to (default: the hierarchy's root, found in /proc/self/mounts).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The tunnel's IPv4 address (link-local, node-local).
    #[arg(long, default_value = "169.254.7.1")]
    tunnel_ip4: Ipv4Addr,
    /// The tunnel's outbound listener port.
    #[arg(long, default_value_t = mesh_common::OUTBOUND_PORT)]
    tunnel_port: u16,
    /// Serve /metrics, /healthz and /readyz here (e.g. `0.0.0.0:15020`). Kubernetes mode:
    /// default `<node InternalIP>:15020`; `--datapath-only`: off by default.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Remove the instance's pins (detaching its programs) and exit.
    #[arg(long)]
    uninstall: bool,

    /// `--datapath-only`: the tunnel's IPv6 address; without it native IPv6 connects follow
    /// each pod's fail mode.
    #[arg(long, requires = "datapath_only")]
    tunnel_ip6: Option<Ipv6Addr>,
    /// `--datapath-only`: create this interface (dummy, else port-less bridge) holding the
    /// tunnel addresses (the whole agent always creates `nm-tunnel`).
    #[arg(long, requires = "datapath_only")]
    tunnel_iface: Option<String>,
    /// `--datapath-only`: a destination enrolled pods reach without the tunnel (repeatable):
    /// `10.96.0.0/12`, `10.96.0.1@443` (one port), `@53` (one port everywhere).
    #[arg(long = "exclude", requires = "datapath_only")]
    exclusions: Vec<crate::map_model::Exclusion>,
    /// `--datapath-only`: the tunnel counts as down when its heartbeat is older than this many
    /// milliseconds.
    #[arg(long, default_value_t = 5000, requires = "datapath_only")]
    stale_after_ms: u64,
    /// `--datapath-only`: kernel-side log level (error, warn, info, debug, trace); off by default.
    #[arg(long, value_parser = parse_level, requires = "datapath_only")]
    ebpf_log_level: Option<aya_log::Level>,

    /// This node's name, as in its pods' `spec.nodeName` (the downward API's `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// A kubeconfig file; default KUBECONFIG, else ~/.kube/config, else the in-cluster service
    /// account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Trust domain of the workloads' SPIFFE identities.
    #[arg(long, default_value = crate::model::spec::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Root namespace of the policies (mesh-wide policies live there).
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// The inbound HBONE port (the same on every node).
    #[arg(long, default_value_t = crate::model::spec::DEFAULT_HBONE_PORT)]
    hbone_port: u16,
    /// State directory (readiness file, CA unless `--ca-dir`); default /var/lib/nodemesh/<instance>.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The local CA's directory, shared by the agents of one cluster; default <state-dir>/ca.
    /// Used unless `--ca-address` is given.
    #[arg(long, conflicts_with = "ca_address")]
    ca_dir: Option<PathBuf>,
    /// The mesh CA (`host:port`, e.g. `nodemesh-ca.nodemesh-system.svc:15012`): workload
    /// certificates come from it instead of a local CA directory.
    #[arg(long)]
    ca_address: Option<String>,
    /// The name the CA's TLS certificate must carry; default the host of `--ca-address`.
    #[arg(long, requires = "ca_address")]
    ca_server_name: Option<String>,
    /// The agent's projected ServiceAccount token (audience `nodemesh-ca`), re-read per request.
    #[arg(long, default_value = crate::identity::ca_client::DEFAULT_TOKEN_PATH)]
    ca_token_file: PathBuf,
    /// The namespace of the CA's trust bundle ConfigMap (the release namespace).
    #[arg(long, default_value = "nodemesh-system")]
    ca_namespace: String,
    /// The trust bundle ConfigMap (`root-cert.pem`), watched: a change updates the tunnel's
    /// trust without a restart.
    #[arg(long, default_value = crate::ca::DEFAULT_BUNDLE_CONFIGMAP)]
    ca_bundle_configmap: String,
    /// Requested workload certificate lifetime in seconds (the CA may cap it).
    #[arg(long, default_value_t = crate::identity::DEFAULT_CERT_TTL.as_secs())]
    cert_ttl_secs: u64,
    /// Admin server (/config_dump, /logging, /quitquitquit), loopback only; default
    /// `127.0.0.1:15000`.
    #[arg(long)]
    admin_addr: Option<std::net::SocketAddr>,
    /// How same-node connections are carried: `auto` splices them in the kernel (sockhash +
    /// stream verdict) when the start-up self-test passes, else copies them in user space;
    /// `copy` (the default for now: the splice lowers the short-connection rate) always copies
    /// in user space.
    #[arg(long, default_value = "copy")]
    same_node_path: crate::tunnel::splice::PathChoice,
    /// How long a service endpoint that could not be reached is skipped, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    ejection_ms: u64,
    /// The host's processes, where this node's pods' network namespaces are found from the
    /// kubelet's cgroup names (`hostPID: true`, or the host's /proc mounted here).
    #[arg(long, default_value = crate::podns::DEFAULT_PROC_ROOT)]
    proc_root: PathBuf,
    /// Instead of scanning `--proc-root`: pods' network namespaces are `<dir>/<pod uid>`
    /// (bind-mounted namespace files).
    #[arg(long)]
    pod_netns_dir: Option<PathBuf>,
    /// Threads that carry the tunnel's traffic: the cores it can use at once. Each serves its
    /// own share of the connections from accept to close (its own listeners, runtime and HBONE
    /// connections), so a connection never hops between threads. 2 by default, as ztunnel's
    /// workers; raise it with the agent's CPU limit on nodes with heavy mesh traffic.
    #[arg(long, env = "NODEMESH_WORKER_THREADS", default_value_t = DEFAULT_WORKER_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// A/B setting: run the tunnel on one work-stealing runtime with `--worker-threads` workers
    /// (the layout before issue 15) instead of one thread per share.
    #[arg(long, env = "NODEMESH_SHARED_RUNTIME", hide = true)]
    shared_runtime: bool,
    /// Log lines as `text` or `json` (Kubernetes mode); the filter starts from RUST_LOG
    /// (default `info`) and `/logging?level=` replaces it.
    #[arg(long, default_value = "text")]
    log_format: crate::admin::LogFormat,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// A kubeconfig file; default KUBECONFIG, else ~/.kube/config, else the in-cluster service
    /// account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, default_value_t = crate::controller::DEFAULT_METRICS_ADDR)]
    metrics_addr: std::net::SocketAddr,
    /// The leader-election Lease's name.
    #[arg(long, default_value = crate::controller::leader::DEFAULT_LEASE_NAME)]
    lease_name: String,
    /// The Lease's namespace (the controller's own: the downward API's metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    lease_namespace: String,
    /// This replica's identity in the Lease; default POD_NAME (the downward API's
    /// metadata.name), else `<hostname>-<pid>`.
    #[arg(long)]
    identity: Option<String>,
    /// Seconds a Lease stays valid after its last renewal (client-go's default).
    #[arg(long, default_value_t = crate::controller::leader::DEFAULT_LEASE_DURATION.as_secs())]
    lease_duration: u64,
    /// The leader renews when this many seconds of validity are left (client-go's
    /// RenewDeadline); must be less than --lease-duration.
    #[arg(long, default_value_t = crate::controller::leader::DEFAULT_RENEW_DEADLINE.as_secs())]
    renew_deadline: u64,
    /// Root namespace of the policies (as the agents' --root-namespace).
    #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Log lines as `text` or `json`; the filter comes from RUST_LOG (default `info`).
    #[arg(long, default_value = "text")]
    log_format: crate::admin::LogFormat,
    /// The mesh CA every replica serves (docs/architecture.md, "The mesh CA").
    #[command(flatten)]
    ca: CaArgs,
}

#[derive(clap::Args)]
struct LocalArgs {
    /// The cluster file (docs/local-mode.md); re-read when it changes.
    #[arg(long)]
    config: PathBuf,
    /// This node's name (overrides the file's `thisNode`).
    #[arg(long)]
    node: Option<String>,
    /// State directory (readiness file, CA unless `--ca-dir`); default /var/lib/nodemesh/<instance>.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The local CA's directory, shared by the agents of one cluster; default <state-dir>/ca.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// cgroup v2 directory to attach to (default: the hierarchy's root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Agent instance: pins live in `<bpffs>/nodemesh/<instance>`.
    #[arg(long, default_value = "default")]
    instance: String,
    /// Where bpffs is mounted.
    #[arg(long, default_value = Pins::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// How same-node connections are carried: `auto` splices them in the kernel (sockhash +
    /// stream verdict) when the start-up self-test passes, else copies them in user space;
    /// `copy` (the default for now: the splice lowers the short-connection rate) always copies
    /// in user space.
    #[arg(long, default_value = "copy")]
    same_node_path: crate::tunnel::splice::PathChoice,
    /// How long a service endpoint that could not be reached is skipped, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    ejection_ms: u64,
    /// Stats server (/metrics, /healthz, /readyz); default `<node address>:<metricsPort>` (15020).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Admin server (/config_dump, /logging, /quitquitquit), loopback only; default
    /// `127.0.0.1:<adminPort>` (15000).
    #[arg(long)]
    admin_addr: Option<std::net::SocketAddr>,
    /// Threads that carry the tunnel's traffic: the cores it can use at once. Each serves its
    /// own share of the connections from accept to close (its own listeners, runtime and HBONE
    /// connections), so a connection never hops between threads. 2 by default, as ztunnel's
    /// workers; raise it with the agent's CPU limit on nodes with heavy mesh traffic.
    #[arg(long, env = "NODEMESH_WORKER_THREADS", default_value_t = DEFAULT_WORKER_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// A/B setting: run the tunnel on one work-stealing runtime with `--worker-threads` workers
    /// (the layout before issue 15) instead of one thread per share.
    #[arg(long, env = "NODEMESH_SHARED_RUNTIME", hide = true)]
    shared_runtime: bool,
    /// Log lines as `text` or `json`; the filter starts from RUST_LOG (default `info`) and
    /// `/logging?level=` replaces it.
    #[arg(long, default_value = "text")]
    log_format: crate::admin::LogFormat,
    /// Test setting: workload certificate lifetime in seconds (default 24 h).
    #[arg(long, hide = true)]
    cert_ttl_secs: Option<u64>,
    /// Fault injection for tests: while this file exists the local CA refuses to issue
    /// certificates, as an unreachable CA would.
    #[arg(long, hide = true)]
    ca_fault_file: Option<PathBuf>,
    /// Test setting: capacity of the enrolled-pods map (NM_ENROLLED) when this instance's pins
    /// are created (default 4096).
    #[arg(long, hide = true)]
    max_enrolled_pods: Option<u32>,
}

fn init_reloadable_logging(
    format: crate::admin::LogFormat,
) -> Option<crate::admin::logging::LogHandle> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    match crate::admin::logging::init(format, &filter) {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("warning: {e}; logging with the default filter");
            init_default_logging();
            None
        }
    }
}

fn run_local(args: LocalArgs) -> ExitCode {
    let logging = init_reloadable_logging(args.log_format);
    let threads = Threads::new(args.worker_threads, args.shared_runtime);
    let opts = crate::app::LocalOptions {
        agent: crate::app::AgentOptions {
            state_dir: args.state_dir,
            ca_dir: args.ca_dir,
            cgroup: args.cgroup,
            instance: args.instance,
            bpffs: args.bpffs,
            ejection_time: Duration::from_millis(args.ejection_ms),
            same_node_path: args.same_node_path,
            observability: crate::app::observability::ObservabilityOptions {
                metrics_addr: args.metrics_addr,
                admin_addr: args.admin_addr,
                logging,
            },
            cert_ttl: args.cert_ttl_secs.map(|s| Duration::from_secs(s.max(1))),
            ca_fault_file: args.ca_fault_file,
            max_enrolled_pods: args.max_enrolled_pods,
            tunnel_threads: threads.tunnel,
            ..Default::default()
        },
        config: args.config,
        node: args.node,
        poll_interval: Duration::from_millis(args.poll_ms.max(10)),
    };
    run_agent(threads, async move { crate::app::build(opts).await })
}

/// How often the agent looks for freed heap memory to hand back to the kernel.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Free heap memory below this is left to the allocator.
const TRIM_MIN_FREE: usize = 4 << 20;

/// Hands freed heap memory back to the kernel every few seconds once there is enough of it.
/// glibc keeps what the tunnel's buffers (copy buffers up to 256 KiB, h2's frame buffers of up to
/// 1 MiB, rustls's records) used under load: it raises its `mmap` threshold to the largest block
/// freed, so those buffers come from the heap, which `free` rarely shrinks; the bench's agents
/// stayed at twice their idle RSS after the load. With one arena ([`one_malloc_arena`])
/// `malloc_trim` releases the free pages and the heap's top (it cannot shrink the top of a
/// thread's arena), and the agents return to their idle RSS (docs/performance.md, "Memory after
/// load"). Fixing the `mmap` threshold instead returns the memory too, but costs a fresh `mmap`
/// and page faults per large buffer: 25% more CPU per GB in a paired run.
async fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    loop {
        tokio::time::sleep(TRIM_INTERVAL).await;
        let trimmed = tokio::task::spawn_blocking(|| {
            // SAFETY: mallinfo2 only reads the allocator's statistics.
            let free = unsafe { libc::mallinfo2() }.fordblks;
            // SAFETY: malloc_trim only releases pages of free chunks; no live allocation moves.
            (free >= TRIM_MIN_FREE).then(|| (free, unsafe { libc::malloc_trim(0) } == 1))
        })
        .await;
        if let Ok(Some((free, released))) = trimmed {
            tracing::debug!(
                free_bytes = free,
                released,
                "returned freed heap memory to the kernel"
            );
        }
    }
}

/// One malloc arena for the whole agent instead of one per thread: [`return_freed_memory`] can
/// then return all of it. The runtime's few threads allocate mostly from their thread caches, so
/// the shared arena's lock is not contended (CPU per GB and per connection unchanged in paired
/// runs).
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes an allocator parameter; called before the runtime's
        // threads exist.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
            tracing::warn!("mallopt(M_ARENA_MAX) refused; memory may stay high after load");
        }
    }
}

/// How the agent's threads are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Threads {
    /// Workers of the main runtime (control plane: model, certificates, metrics, admin).
    main: usize,
    /// Tunnel shards (`tunnel::shards`); 1: the tunnel runs on the main runtime.
    tunnel: usize,
}

impl Threads {
    /// `--worker-threads` tunnel shards beside a one-worker main runtime, or with
    /// `--shared-runtime` everything on one runtime of that many workers.
    fn new(workers: u16, shared_runtime: bool) -> Self {
        let workers = usize::from(workers.max(1));
        if shared_runtime || workers == 1 {
            Self {
                main: workers,
                tunnel: 1,
            }
        } else {
            Self {
                main: 1,
                tunnel: workers,
            }
        }
    }
}

/// Runs an agent built by `build` until SIGTERM/SIGINT (or `/quitquitquit`).
fn run_agent(
    threads: Threads,
    build: impl Future<Output = anyhow::Result<crate::app::Running>>,
) -> ExitCode {
    one_malloc_arena();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.main)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e),
    };
    rt.spawn(return_freed_memory());
    let result = rt.block_on(async {
        let shutdown = async {
            if let Err(e) = crate::tunnel::drain::shutdown_signal().await {
                tracing::warn!(error = %e, "no signal handler; running until killed");
                std::future::pending::<()>().await;
            }
        };
        let mut shutdown = std::pin::pin!(shutdown);
        let running = tokio::select! {
            running = build => running?,
            () = &mut shutdown => {
                tracing::info!("stopped before the agent was up");
                return Ok(());
            }
        };
        running.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mesh-agent node` without `--datapath-only`: the whole agent fed by Kubernetes.
fn run_kubernetes(args: NodeArgs) -> ExitCode {
    let logging = init_reloadable_logging(args.log_format);
    let threads = Threads::new(args.worker_threads, args.shared_runtime);
    let Some(node) = args.node.filter(|n| !n.is_empty()) else {
        eprintln!(
            "error: the node's name is needed: pass --node or set NODE_NAME (in a DaemonSet, \
             from the downward API's spec.nodeName); --datapath-only runs without Kubernetes"
        );
        return ExitCode::FAILURE;
    };
    let mut settings =
        crate::k8s::convert::Settings::new(node, std::net::IpAddr::V4(args.tunnel_ip4));
    settings.trust_domain = args.trust_domain.clone();
    settings.root_namespace = Some(args.root_namespace);
    settings.hbone_port = args.hbone_port;
    settings.outbound_port = args.tunnel_port;
    if let Some(m) = args.metrics_addr {
        settings.metrics_port = m.port();
    }
    if let Some(a) = args.admin_addr {
        settings.admin_port = a.port();
    }
    let ca_client = args.ca_address.as_ref().map(|address| {
        let server_name = args.ca_server_name.clone().unwrap_or_else(|| {
            address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
                .trim_matches(['[', ']'])
                .to_owned()
        });
        let mut client = crate::identity::ca_client::CaClientConfig::new(
            address,
            &server_name,
            args.ca_token_file.clone(),
        );
        client.ttl = Duration::from_secs(args.cert_ttl_secs.max(60));
        crate::app::CaClientOptions {
            client,
            kubeconfig: args.kubeconfig.clone(),
            namespace: args.ca_namespace.clone(),
            bundle_configmap: args.ca_bundle_configmap.clone(),
            bundle_timeout: Duration::from_secs(60),
        }
    });
    let agent = crate::app::AgentOptions {
        state_dir: args.state_dir,
        ca_dir: args.ca_dir,
        ca_client,
        cgroup: args.cgroup,
        instance: args.instance,
        bpffs: args.bpffs,
        ejection_time: Duration::from_millis(args.ejection_ms),
        same_node_path: args.same_node_path,
        trust_domain: Some(args.trust_domain),
        observability: crate::app::observability::ObservabilityOptions {
            metrics_addr: args.metrics_addr,
            admin_addr: args.admin_addr,
            logging,
        },
        tunnel_threads: threads.tunnel,
        ..Default::default()
    };
    // Pods' network namespaces: found through the host's /proc (the kubelet's cgroup names),
    // unless a directory of bind-mounted namespaces is given.
    let netns: std::sync::Arc<dyn crate::k8s::NetnsFinder> = match args.pod_netns_dir {
        Some(dir) => std::sync::Arc::new(crate::k8s::DirNetns(dir)),
        None => std::sync::Arc::new(crate::podns::ProcScanner::new(args.proc_root)),
    };
    let kubeconfig = args.kubeconfig;
    run_agent(
        threads,
        crate::app::build_with(agent, async move {
            let client = crate::k8s::client(kubeconfig.as_deref()).await?;
            let opts = crate::k8s::source::SourceOptions::new(settings);
            let watch = crate::k8s::source::start(client, opts, netns).await;
            Ok(crate::app::ModelFeed::kubernetes(watch))
        }),
    )
}

/// `mesh-agent controller`.
fn run_controller(args: ControllerArgs) -> ExitCode {
    // The handle only serves /logging, which the controller does not have.
    let _logging = init_reloadable_logging(args.log_format);
    let identity = args.identity.filter(|i| !i.is_empty()).unwrap_or_else(|| {
        crate::controller::leader::default_identity(std::env::var("POD_NAME").ok())
    });
    let opts = crate::controller::ControllerOptions {
        lease: crate::controller::leader::LeaseOptions {
            name: args.lease_name,
            namespace: args.lease_namespace,
            identity,
            duration: Duration::from_secs(args.lease_duration),
            renew_deadline: Duration::from_secs(args.renew_deadline),
        },
        root_namespace: args.root_namespace,
        metrics_addr: args.metrics_addr,
        resync: crate::controller::DEFAULT_RESYNC,
    };
    // Before connecting: a bad flag should not wait for the API server.
    if let Err(e) = opts.lease.validate() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e),
    };
    let kubeconfig = args.kubeconfig;
    let ca = args.ca;
    let result = rt.block_on(async move {
        let client = crate::k8s::client(kubeconfig.as_deref()).await?;
        let mut controller = crate::controller::Controller::new(client.clone(), opts)?;
        // The CA, on every replica: its metrics in the controller's registry, its API errors
        // counted with the controller's, its readiness gates in the controller's /readyz.
        let api_metrics = controller.metrics().clone();
        let ca_metrics =
            crate::ca::CaMetrics::new(controller.registry()).with_api_errors(std::sync::Arc::new(
                move |op, resource, code| api_metrics.api_error(op, resource, code),
            ));
        let listener = tokio::net::TcpListener::bind(ca.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {} for the CA: {e} (is another process using the port? \
                 choose another with --ca-listen)",
                    ca.listen
                )
            })?;
        let serve = crate::ca::serve(
            ca.config(),
            client,
            listener,
            ca_metrics,
            crate::ca::CaGates::register(controller.readiness()),
            controller.shutdown().wait(),
        );
        controller.add_component("ca", async move { Ok(serve.await?) });
        let running = controller.start().await?;
        let signal = async {
            if let Err(e) = crate::tunnel::drain::shutdown_signal().await {
                tracing::warn!(error = %e, "no signal handler; running until killed");
                std::future::pending::<()>().await;
            }
        };
        running.run_until(signal).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_level(s: &str) -> Result<aya_log::Level, String> {
    Ok(match s {
        "error" => aya_log::Level::Error,
        "warn" => aya_log::Level::Warn,
        "info" => aya_log::Level::Info,
        "debug" => aya_log::Level::Debug,
        "trace" => aya_log::Level::Trace,
        _ => {
            return Err(format!(
                "unknown level `{s}` (error, warn, info, debug, trace)"
            ));
        }
    })
}

fn run_uninstall(bpffs: PathBuf, instance: &str) -> ExitCode {
    match Pins::new(bpffs, instance).and_then(|pins| uninstall(&pins)) {
        Ok(true) => {
            println!("ok: removed the pins of instance {instance}");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("ok: instance {instance} had nothing pinned");
            ExitCode::SUCCESS
        }
        Err(e) => report(&e),
    }
}

fn run_node(args: NodeArgs) -> ExitCode {
    if args.uninstall {
        return run_uninstall(args.bpffs, &args.instance);
    }
    if !args.datapath_only {
        return run_kubernetes(args);
    }
    let opts = NodeOptions {
        instance: args.instance,
        bpffs: args.bpffs,
        cgroup: args.cgroup,
        tunnel: TunnelSettings {
            ip4: args.tunnel_ip4,
            ip6: args.tunnel_ip6,
            port: args.tunnel_port,
            stale_after: Some(Duration::from_millis(args.stale_after_ms.max(1))),
        },
        tunnel_iface: args.tunnel_iface,
        exclusions: args.exclusions,
        load: LoadOptions {
            ebpf_log_level: args.ebpf_log_level,
            ..Default::default()
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e),
    };
    let shutdown = async {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            // Without a SIGTERM handler, Ctrl-C still works.
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    // Bound before the data path comes up, so a taken port fails the start.
    let stats = match args.metrics_addr.map(std::net::TcpListener::bind) {
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => return report(&e),
        None => None,
    };
    let (stop_stats, stats_stopped) = tokio::sync::watch::channel(false);
    let mut stats_task = None;
    let ready = |dp: &std::sync::Arc<std::sync::Mutex<Datapath>>| {
        use std::io::Write;
        if let Some(listener) = stats {
            let mut stopped = stats_stopped;
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            match crate::app::observability::serve_node_stats(listener, dp.clone(), stop) {
                Ok(task) => stats_task = Some(task),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "no stats server"),
            }
        }
        println!("ready");
        let _ = std::io::stdout().flush();
    };
    let result = rt.block_on(node::run(opts, ready, shutdown));
    let _ = stop_stats.send(true);
    if let Some(task) = stats_task {
        let _ = rt.block_on(task);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

fn report(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    ExitCode::FAILURE
}

/// Runs the `mesh-agent` command line (arguments from the process).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let reloadable = match &cli.command {
        Command::Local(_) | Command::Controller(_) => true,
        Command::Node(n) => !n.datapath_only && !n.uninstall,
        _ => false,
    };
    if !reloadable {
        init_default_logging();
    }
    match cli.command {
        Command::CheckKernel => match Datapath::load() {
            Ok(_) => {
                println!("ok: the kernel accepted every nodemesh eBPF program");
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        },
        Command::Node(args) => run_node(*args),
        Command::Local(args) => run_local(args),
        Command::Controller(args) => run_controller(args),
        Command::Uninstall { instance, bpffs } => run_uninstall(bpffs, &instance),
        Command::Ca { ca, kubeconfig } => run_ca(ca, kubeconfig),
        Command::WriteCrds { out_dir } => match crate::crd::write_all(&out_dir) {
            Ok(written) => {
                for path in written {
                    println!("wrote {}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        },
    }
}

/// Text logs on stderr, filter from RUST_LOG (default `info`), not reloadable.
fn init_default_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command, DEFAULT_WORKER_THREADS};

    fn workers(args: &[&str]) -> Result<u16, clap::Error> {
        Cli::try_parse_from(args).map(|c| match c.command {
            Command::Local(a) => a.worker_threads,
            Command::Node(a) => a.worker_threads,
            _ => unreachable!("only local and node are parsed here"),
        })
    }

    #[test]
    fn worker_threads_default_flag_and_bounds() {
        let local = ["mesh-agent", "local", "--config", "c.yaml"];
        assert_eq!(workers(&local).expect("parses"), DEFAULT_WORKER_THREADS);
        let mut four = local.to_vec();
        four.extend(["--worker-threads", "4"]);
        assert_eq!(workers(&four).expect("parses"), 4);
        let node = ["mesh-agent", "node", "--worker-threads", "8"];
        assert_eq!(workers(&node).expect("parses"), 8);
        for bad in ["0", "257", "many"] {
            let mut args = local.to_vec();
            args.extend(["--worker-threads", bad]);
            let err = workers(&args).expect_err(bad).to_string();
            assert!(err.contains("--worker-threads"), "{bad}: {err}");
        }
    }
}
