//! `mesh-agent node --datapath-only`: the node's data path as a long-running process. Creates the tunnel
//! interface (optional), loads the programs with every map and link pinned for the instance
//! (adopting pins left by a previous run), attaches at the configured cgroup (the cgroup v2 root
//! by default), points redirects at the tunnel address and beats the tunnel heartbeat until
//! shutdown. Exiting never detaches: pods keep their programs and fail-closed pods are refused
//! once the heartbeat goes stale. `--uninstall` removes the instance's pins instead.
//!
//! The heartbeat is beaten here until the tunnel component exists and takes it over.

use std::{
    future::Future,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::info;

use crate::{
    datapath::{Datapath, DatapathError, InstanceLock, LoadOptions, Pins},
    map_model::Exclusion,
    maps::{KernelMaps, MapsError, TunnelSettings},
    tunnel_iface::{IfaceError, ensure_tunnel_iface},
};

/// Everything `mesh-agent node` needs.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub instance: String,
    pub bpffs: PathBuf,
    /// Where to attach; `None` = the root of the cgroup v2 hierarchy.
    pub cgroup: Option<PathBuf>,
    pub tunnel: TunnelSettings,
    /// Create (or reuse) this interface for the tunnel addresses; `None` = they exist already.
    pub tunnel_iface: Option<String>,
    /// Destinations enrolled pods reach directly (e.g. the kube API, DNS). Added on start;
    /// removing one takes the control plane's reconcile (`crate::reconcile`).
    pub exclusions: Vec<Exclusion>,
    pub load: LoadOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Iface(#[from] IfaceError),
    #[error("cannot find the cgroup v2 hierarchy: {0}")]
    Cgroup(#[source] std::io::Error),
}

/// Sets the data path up (idempotent across restarts) and returns it, heartbeat beaten once,
/// with the instance's claim ([`Pins::lock`]): a second `--datapath-only` of a running instance
/// fails before it touches the first one's interface, pins or programs. Keep the lock while the
/// data path runs.
pub fn start(opts: &NodeOptions) -> Result<(Datapath, InstanceLock), NodeError> {
    let pins = Pins::new(&opts.bpffs, &opts.instance)?;
    let lock = pins.lock()?;
    if let Some(name) = &opts.tunnel_iface {
        let mut addrs = vec![IpAddr::V4(opts.tunnel.ip4)];
        addrs.extend(opts.tunnel.ip6.map(IpAddr::V6));
        ensure_tunnel_iface(name, &addrs)?;
    }
    let cgroup = match &opts.cgroup {
        Some(p) => p.clone(),
        None => crate::cgroup::cgroup2_mount().map_err(NodeError::Cgroup)?,
    };
    let mut dp = Datapath::load_with(Some(&pins), &opts.load)?;
    dp.attach(&cgroup)?;
    dp.set_tunnel(&opts.tunnel)?;
    for ex in &opts.exclusions {
        dp.add_exclusion(ex)?;
    }
    dp.heartbeat().beat()?;
    info!(instance = %opts.instance, cgroup = %cgroup.display(), pins = %pins.version_dir().display(), "data path up");
    Ok((dp, lock))
}

/// Runs until `shutdown` completes, beating the heartbeat well within its staleness window and
/// forwarding kernel log records. `ready` is called once the data path is up, with the shared
/// data path (for scrape-time readers such as the map gauges).
pub async fn run(
    opts: NodeOptions,
    ready: impl FnOnce(&Arc<Mutex<Datapath>>),
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let (dp, _instance_lock) = start(&opts)?;
    let dp = Arc::new(Mutex::new(dp));
    ready(&dp);
    let every = opts.tunnel.stale_after.map_or(Duration::from_secs(1), |d| {
        (d / 3).max(Duration::from_millis(10))
    });
    let heartbeat = dp.lock().unwrap_or_else(|p| p.into_inner()).heartbeat();
    let mut tick = tokio::time::interval(every);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                heartbeat.beat()?;
                dp.lock().unwrap_or_else(|p| p.into_inner()).flush_ebpf_logs();
            }
            () = &mut shutdown => break,
        }
    }
    info!("shutting down; programs stay attached (pinned) until `--uninstall`");
    Ok(())
}
