//! Loading, attaching and programming the nodemesh eBPF programs.
//!
//! The object is built by `cargo xtask build-ebpf` and embedded at compile time (see `build.rs`).
//! [`Datapath::load`] loads every program into the kernel (the verifier runs here, so a bad
//! program fails at start, not at first use); [`Datapath::attach`] attaches them as bpf links to
//! one cgroup v2 directory: the hierarchy's root in production, a child cgroup in tests.
//!
//! The tunnel reads a redirected connection's original destination with
//! [`OrigDstReader::original_destination`]; a miss is an error, never a guess.

use std::os::fd::AsFd;
use std::{
    collections::BTreeMap,
    fs::File,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, SkStorage, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SkSkb,
        SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{
    Counter, EnrolledPod, GuardPortKey, LpmAddr, LpmPortAddr, MAP_LAYOUT_VERSION, Meta, OrigDst,
    PolicyKey, SockTuple, SpliceLink, TunnelConfig, maps, programs,
};
use tracing::{debug, info, warn};

use crate::map_model::PodSpec;
pub use crate::maps::TunnelSettings;
use crate::maps::{KernelMaps, MapsError};

/// The eBPF object, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("NODEMESH_EBPF_OBJECT_PATH"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed: {0} (needs root or CAP_BPF+CAP_NET_ADMIN, \
         and Linux 6.15+ with BTF; `mesh-agent check-kernel` names the program the kernel refused)"
    )]
    Load(#[source] aya::EbpfError),
    #[error(
        "eBPF program `{name}` is missing from the embedded object (stale build? run `cargo xtask build-ebpf`)"
    )]
    MissingProgram { name: &'static str },
    #[error(
        "eBPF map `{name}` is missing from the embedded object (stale build? run `cargo xtask build-ebpf`)"
    )]
    MissingMap { name: &'static str },
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory (find the hierarchy in /proc/self/mounts, type cgroup2)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("bpf link pin {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(
        "this instance's pinned programs are attached to another cgroup (id {recorded}), not \
         {path}: use another --instance, or `mesh-agent node --uninstall` first"
    )]
    OtherCgroup { path: PathBuf, recorded: u64 },
    #[error("cannot pin bpf link at {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{path}: {source} (is bpffs mounted there? `mount -t bpf bpf /sys/fs/bpf`)")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("cannot set up the eBPF log reader: {0}")]
    Logger(#[source] aya_log::Error),
    #[error("{path} is not a bpf filesystem (mount it with `mount -t bpf bpf {path}`)")]
    NotBpffs { path: PathBuf },
    #[error("instance name `{0}` must be 1-64 characters of [A-Za-z0-9_.-] and not start with `.`")]
    BadInstance(String),
    #[error(
        "another agent runs instance `{instance}` (it holds the lock on {path}): stop it first, or \
         start this one with another --instance; nothing of the running agent was touched"
    )]
    InstanceBusy { instance: String, path: PathBuf },
    #[error("cannot read CLOCK_MONOTONIC for the tunnel heartbeat: {0}")]
    Clock(#[source] nix::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn maps_err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Treats a missing key on removal as success.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// Pin name of the sock_ops link on the tunnel's cgroup ([`Datapath::attach_tunnel`]). No dots:
/// bpffs refuses names containing `.` (EPERM from `BPF_OBJ_PIN`).
const TUNNEL_SOCKOPS_LINK: &str = "mesh_sockops_tunnel";

/// The programs, in load and attach order.
const PROGRAMS: [&str; 6] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::SOCKOPS,
    programs::GUARD_INGRESS,
];

/// The loaded programs and the maps the agent programs.
pub struct Datapath {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    tunnel_cfg: Array<MapData, TunnelConfig>,
    exclusions: LpmTrie<MapData, LpmPortAddr, u32>,
    identities: LpmTrie<MapData, LpmAddr, u32>,
    mesh_dsts: LpmTrie<MapData, LpmAddr, u32>,
    policy: HashMap<MapData, PolicyKey, u32>,
    guard_ports: HashMap<MapData, GuardPortKey, u32>,
    meta: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    heartbeat: TunnelHeartbeat,
    orig_dst: OrigDstReader,
    attached_to: Vec<PathBuf>,
    pins: Option<Pins>,
    /// Links pinned or adopted by this agent. Dropping them only closes our fds: the pins keep
    /// the programs attached until [`uninstall`].
    pinned_links: Vec<PinnedLink>,
    /// The aya-log reader and how many records it forwarded, when kernel logging is on.
    ebpf_logs: Option<(aya_log::EbpfLogger<TracingLog>, Arc<AtomicU64>)>,
    /// The same-node splice, or why it cannot be offered on this kernel.
    splice: Result<crate::splice::SockSplice, String>,
}

/// How to load the programs.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Kernel-side log level (aya-log). `None` (default): off, and the verifier prunes every log
    /// statement. With a level, records are forwarded to `tracing` (target `nodemesh::ebpf`)
    /// by [`Datapath::flush_ebpf_logs`], to be called when [`Datapath::ebpf_log_fd`] is readable.
    pub ebpf_log_level: Option<aya_log::Level>,
    /// Capacity of the enrolled-pods map (`NM_ENROLLED`); `None`: [`mesh_common::MAX_ENROLLED`].
    /// Takes effect only when the map is created: pins adopted from an earlier agent keep
    /// theirs. A test setting (`mesh-agent local --max-enrolled-pods`, hidden) to reach a full
    /// map without thousands of pods.
    pub max_enrolled_pods: Option<u32>,
}

/// Forwards aya-log records (which use the `log` crate) to `tracing`.
#[derive(Default)]
struct TracingLog {
    forwarded: Arc<AtomicU64>,
}

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "nodemesh::ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "nodemesh::ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "nodemesh::ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "nodemesh::ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "nodemesh::ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}

impl Datapath {
    /// Loads every program of the embedded object into the kernel (running the verifier) and
    /// takes the maps. Nothing is attached yet.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(None, &LoadOptions::default())
    }

    /// As [`Self::load`], with every map pinned under `pins` (see [`Pins`]). Maps already pinned
    /// there by an earlier agent are adopted with their contents (enrolled pods, policy,
    /// counters, pending original destinations), so a restart needs no re-enrollment. Links are
    /// pinned or adopted by [`Self::attach`].
    pub fn load_pinned(pins: &Pins) -> Result<Self, DatapathError> {
        Self::load_with(Some(pins), &LoadOptions::default())
    }

    /// The general form of [`Self::load`] and [`Self::load_pinned`].
    pub fn load_with(pins: Option<&Pins>, opts: &LoadOptions) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        // Off (0) by default: the level is a constant at load time, so the verifier prunes every
        // log statement and the hot paths pay nothing.
        let level: u8 = opts.ebpf_log_level.map_or(0, u8::from);
        loader.override_global(aya_log::LEVEL, &level, false);
        if let Some(n) = opts.max_enrolled_pods {
            loader.map_max_entries(maps::ENROLLED, n.max(1));
        }
        if let Some(pins) = pins {
            pins.create_dirs()?;
            for name in maps::ALL {
                loader.map_pin_path(name, pins.maps_dir().join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Load)?;
        let ebpf_logs = if opts.ebpf_log_level.is_some() {
            let sink = TracingLog::default();
            let forwarded = sink.forwarded.clone();
            let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, sink)
                .map_err(DatapathError::Logger)?;
            Some((logger, forwarded))
        } else {
            None
        };
        for name in PROGRAMS {
            let prog = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?;
            match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                _ => return Err(DatapathError::MissingProgram { name }),
            }
            .map_err(prog_err(name))?;
            debug!(program = name, "eBPF program loaded (verifier accepted it)");
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DatapathError::MissingMap { name })
        };
        let enrolled = HashMap::try_from(take(maps::ENROLLED)?).map_err(map_err(maps::ENROLLED))?;
        let tunnel_cfg =
            Array::try_from(take(maps::TUNNEL_CONFIG)?).map_err(map_err(maps::TUNNEL_CONFIG))?;
        let counters =
            PerCpuArray::try_from(take(maps::COUNTERS)?).map_err(map_err(maps::COUNTERS))?;
        let by_tuple = HashMap::try_from(take(maps::ORIG_DST_BY_TUPLE)?)
            .map_err(map_err(maps::ORIG_DST_BY_TUPLE))?;
        let by_socket = SkStorage::try_from(take(maps::SOCK_ORIG_DST)?)
            .map_err(map_err(maps::SOCK_ORIG_DST))?;
        let heartbeat = Array::try_from(take(maps::TUNNEL_HEARTBEAT)?)
            .map_err(map_err(maps::TUNNEL_HEARTBEAT))?;
        let exclusions =
            LpmTrie::try_from(take(maps::EXCLUSIONS)?).map_err(map_err(maps::EXCLUSIONS))?;
        let identities =
            LpmTrie::try_from(take(maps::IDENTITIES)?).map_err(map_err(maps::IDENTITIES))?;
        let mesh_dsts = LpmTrie::try_from(take(maps::MESH_DESTINATIONS)?)
            .map_err(map_err(maps::MESH_DESTINATIONS))?;
        let policy = HashMap::try_from(take(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        let guard_ports =
            HashMap::try_from(take(maps::GUARD_PORTS)?).map_err(map_err(maps::GUARD_PORTS))?;
        let meta = Array::try_from(take(maps::META)?).map_err(map_err(maps::META))?;
        let splice_socks = take(maps::SPLICE_SOCKS)?;
        let splice_links = take(maps::SPLICE_LINKS)?;
        let splice_ctl = take(maps::SPLICE_CTL)?;
        let splice = attach_splice(&mut ebpf, splice_socks, splice_links, splice_ctl).map_err(|e| {
            warn!(error = %e, "same-node splice unavailable on this kernel: same-node connections are copied in user space");
            e.to_string()
        });
        Ok(Self {
            ebpf,
            enrolled,
            tunnel_cfg,
            exclusions,
            identities,
            mesh_dsts,
            policy,
            guard_ports,
            meta,
            counters,
            heartbeat: TunnelHeartbeat {
                map: Arc::new(Mutex::new(heartbeat)),
            },
            orig_dst: OrigDstReader {
                by_tuple: Arc::new(Mutex::new(by_tuple)),
                by_socket: Arc::new(by_socket),
                misses: Arc::new(AtomicU64::new(0)),
            },
            attached_to: Vec::new(),
            pins: pins.cloned(),
            pinned_links: Vec::new(),
            ebpf_logs,
            splice,
        })
    }

    /// The same-node splice handle (sockhash + stream verdict), or why this kernel cannot
    /// offer it. Whether it is *used* is decided by its start-up self-test
    /// ([`crate::splice::SockSplice::self_test`]).
    pub fn splicer(&self) -> Result<crate::splice::SockSplice, String> {
        self.splice.clone()
    }

    /// Attaches the programs to the cgroup v2 directory `cgroup`. Every socket created by a
    /// process in that cgroup or below it is then subject to them. Without pins, links live as
    /// long as `self`; with pins ([`Self::load_pinned`]) each link is pinned, and a link already
    /// pinned by an earlier agent is adopted as is (one cgroup per instance: the pinned links are
    /// assumed to be attached to `cgroup`).
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        if !crate::cgroup::is_cgroup2(cgroup) {
            return Err(DatapathError::NotCgroup2 {
                path: cgroup.to_path_buf(),
            });
        }
        let fd = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // Pinned links belong to one cgroup: refuse to adopt them for another one.
        let cgroup_id = {
            use std::os::unix::fs::MetadataExt;
            fd.metadata()
                .map_err(|source| DatapathError::Cgroup {
                    path: cgroup.to_path_buf(),
                    source,
                })?
                .ino()
        };
        if self.pins.is_some() {
            let slot = Meta::AttachedCgroup as u32;
            let recorded = self.meta.get(&slot, 0).map_err(map_err(maps::META))?;
            if recorded != 0 && recorded != cgroup_id {
                return Err(DatapathError::OtherCgroup {
                    path: cgroup.to_path_buf(),
                    recorded,
                });
            }
            self.meta
                .set(slot, cgroup_id, 0)
                .map_err(map_err(maps::META))?;
        }
        for name in PROGRAMS {
            let link_pin = self.pins.as_ref().map(|p| p.links_dir().join(name));
            if let Some(path) = link_pin.as_ref().filter(|p| p.exists()) {
                // A previous agent attached and pinned it: adopt, never detach or re-attach,
                // and swap in this agent's program atomically (same pinned maps, so both
                // versions agree on every entry; there is no moment without a program).
                let link = PinnedLink::from_pin(path).map_err(|source| DatapathError::Link {
                    path: path.clone(),
                    source,
                })?;
                let prog_fd = self.program_fd(name)?;
                // A transient EINVAL was seen once (most likely the uninitialised padding of
                // the BPF_OBJ_GET attribute, now zeroed); retry anyway, and if it persists keep
                // the previous program (still correct, only older) rather than refusing to start.
                let mut result = link_update(path, prog_fd);
                for _ in 0..2 {
                    if result.is_ok() {
                        break;
                    }
                    result = link_update(path, prog_fd);
                }
                match result {
                    Ok(()) => {
                        info!(program = name, pin = %path.display(), "adopted pinned link, program updated in place")
                    }
                    Err(e) => {
                        warn!(program = name, pin = %path.display(), error = %e, "adopted pinned link; its program could not be updated and stays at the previous version (`mesh-agent node --uninstall` and restart to replace it)")
                    }
                }
                self.pinned_links.push(link);
                continue;
            }
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?;
            // `Single` is the mode links accept; links still allow several programs per cgroup.
            let link: Option<FdLink> = match prog {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let p: &mut CgroupSockAddr = p;
                    let id = p
                        .attach(&fd, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    match link_pin {
                        Some(_) => Some(p.take_link(id).map_err(prog_err(name))?.try_into()),
                        None => None,
                    }
                }
                aya::programs::Program::SockOps(p) => {
                    let p: &mut SockOps = p;
                    let id = p
                        .attach(&fd, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    match link_pin {
                        Some(_) => Some(p.take_link(id).map_err(prog_err(name))?.try_into()),
                        None => None,
                    }
                }
                aya::programs::Program::CgroupSkb(p) => {
                    let p: &mut CgroupSkb = p;
                    let id = p
                        .attach(&fd, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    match link_pin {
                        Some(_) => Some(p.take_link(id).map_err(prog_err(name))?.try_into()),
                        None => None,
                    }
                }
                _ => return Err(DatapathError::MissingProgram { name }),
            }
            .transpose()
            .map_err(|source| DatapathError::Link {
                path: link_pin.clone().unwrap_or_default(),
                source,
            })?;
            if let (Some(link), Some(path)) = (link, link_pin) {
                let pinned = link.pin(&path).map_err(|source| DatapathError::Pin {
                    path: path.clone(),
                    source,
                })?;
                self.pinned_links.push(pinned);
            }
        }
        info!(cgroup = %cgroup.display(), "eBPF programs attached (connect4/6, sendmsg4/6, sockops, plaintext guard)");
        self.attached_to.push(cgroup.to_path_buf());
        Ok(())
    }

    /// Enrolls the pod whose network namespace has cookie `netns_cookie`.
    pub fn enroll(&mut self, netns_cookie: u64, pod: EnrolledPod) -> Result<(), DatapathError> {
        self.put_enrolled(netns_cookie, pod)?;
        info!(netns_cookie, workload_id = pod.workload_id, "pod enrolled");
        Ok(())
    }

    /// The fd of a loaded program (for link updates).
    fn program_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, DatapathError> {
        use aya::programs::Program;
        let prog = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram { name })?;
        let fd = match prog {
            Program::CgroupSockAddr(p) => p.fd(),
            Program::SockOps(p) => p.fd(),
            Program::CgroupSkb(p) => p.fd(),
            _ => return Err(DatapathError::MissingProgram { name }),
        }
        .map_err(prog_err(name))?;
        Ok(fd.as_fd())
    }

    /// The kernel ids of the pinned links and of the programs they run, by program name (empty
    /// without pins). For checks and diagnostics.
    pub fn pinned_link_programs(&self) -> Result<Vec<(String, u32, u32)>, DatapathError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for name in PROGRAMS {
            let path = pins.links_dir().join(name);
            if !path.exists() {
                continue;
            }
            let link: FdLink = PinnedLink::from_pin(&path)
                .map_err(|source| DatapathError::Link {
                    path: path.clone(),
                    source,
                })?
                .into();
            let info = link
                .info()
                .map_err(|source| DatapathError::Link { path, source })?;
            out.push((name.to_owned(), info.id(), info.program_id()));
        }
        Ok(out)
    }

    /// Kernel ids of this agent's loaded programs, by name.
    pub fn program_ids(&self) -> Result<Vec<(String, u32)>, DatapathError> {
        use aya::programs::Program;
        let mut out = Vec::new();
        for name in PROGRAMS {
            let prog = self
                .ebpf
                .program(name)
                .ok_or(DatapathError::MissingProgram { name })?;
            let info = match prog {
                Program::CgroupSockAddr(p) => p.info(),
                Program::SockOps(p) => p.info(),
                Program::CgroupSkb(p) => p.info(),
                _ => return Err(DatapathError::MissingProgram { name }),
            }
            .map_err(prog_err(name))?;
            out.push((name.to_owned(), info.id()));
        }
        Ok(out)
    }

    /// Attaches the sock_ops program to the tunnel process's cgroup too, so each accepted tunnel
    /// socket receives its original destination in its own socket storage at
    /// `PASSIVE_ESTABLISHED` (the tuple map stays the fallback). Unnecessary when the tunnel's
    /// cgroup is under the one given to [`Self::attach`] (production: the root). Pinned (and
    /// adopted) like the other links when the datapath has pins.
    pub fn attach_tunnel(&mut self, tunnel_cgroup: &Path) -> Result<(), DatapathError> {
        if !crate::cgroup::is_cgroup2(tunnel_cgroup) {
            return Err(DatapathError::NotCgroup2 {
                path: tunnel_cgroup.to_path_buf(),
            });
        }
        let fd = File::open(tunnel_cgroup).map_err(|source| DatapathError::Cgroup {
            path: tunnel_cgroup.to_path_buf(),
            source,
        })?;
        let name = programs::SOCKOPS;
        let link_pin = self
            .pins
            .as_ref()
            .map(|p| p.links_dir().join(TUNNEL_SOCKOPS_LINK));
        if let Some(path) = link_pin.as_ref().filter(|p| p.exists()) {
            // Kept by a previous agent; the same program serves both links, so the update made
            // for the pods' link is not needed: just refresh the program to ours.
            let link = PinnedLink::from_pin(path).map_err(|source| DatapathError::Link {
                path: path.clone(),
                source,
            })?;
            if let Err(e) = link_update(path, self.program_fd(name)?) {
                warn!(pin = %path.display(), error = %e, "tunnel sock_ops link keeps its previous program");
            }
            self.pinned_links.push(link);
            info!(pin = %path.display(), "adopted the tunnel's sock_ops link");
            return Ok(());
        }
        let prog: &mut SockOps = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(prog_err(name))?;
        let id = prog
            .attach(&fd, CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        if let Some(path) = link_pin {
            let link: FdLink = prog
                .take_link(id)
                .map_err(prog_err(name))?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    path: path.clone(),
                    source,
                })?;
            let pinned = link.pin(&path).map_err(|source| DatapathError::Pin {
                path: path.clone(),
                source,
            })?;
            self.pinned_links.push(pinned);
        }
        info!(cgroup = %tunnel_cgroup.display(), "sock_ops attached to the tunnel's cgroup");
        Ok(())
    }

    /// Enrolls the pod whose network namespace is at `netns` (e.g. `/proc/<pid>/ns/net` of its
    /// sandbox, or `/run/netns/<name>`): reads its cookie on a dedicated thread inside the
    /// namespace, then writes its record, addresses and plaintext ports. Returns the cookie.
    pub fn enroll_netns(&mut self, netns: &Path, pod: &PodSpec) -> Result<u64, DatapathError> {
        let cookie = crate::netns::netns_cookie(netns)?;
        self.enroll_pod(cookie, pod)?;
        info!(netns_cookie = cookie, netns = %netns.display(), workload_id = pod.workload_id, "pod enrolled");
        Ok(cookie)
    }

    /// Removes a pod's enrollment. Removing one that is not enrolled is not an error.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), DatapathError> {
        Ok(self.del_enrolled(netns_cookie)?)
    }

    /// The aya-log ring buffer to poll for readability (e.g. with tokio's `AsyncFd`), when
    /// kernel logging is on.
    pub fn ebpf_log_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.ebpf_logs.as_ref().map(|(l, _)| l.as_fd())
    }

    /// Forwards pending kernel log records to `tracing` without blocking; returns how many
    /// records were forwarded since load. 0 when kernel logging is off.
    pub fn flush_ebpf_logs(&mut self) -> u64 {
        match &mut self.ebpf_logs {
            Some((logger, forwarded)) => {
                logger.flush();
                forwarded.load(Ordering::Relaxed)
            }
            None => 0,
        }
    }

    /// A cheap, cloneable handle for the tunnel to report that it is alive.
    pub fn heartbeat(&self) -> TunnelHeartbeat {
        self.heartbeat.clone()
    }

    /// A cheap, cloneable handle for the tunnel to read original destinations.
    pub fn orig_dst_reader(&self) -> OrigDstReader {
        self.orig_dst.clone()
    }

    /// Kernel counters summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>, DatapathError> {
        let mut out = BTreeMap::new();
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&(c as u32), 0)
                .map_err(map_err(maps::COUNTERS))?;
            out.insert(c.name(), per_cpu.iter().sum());
        }
        out.insert(
            "orig_dst_misses",
            self.orig_dst.misses.load(Ordering::Relaxed),
        );
        Ok(out)
    }

    /// How many pods the enrolled-pods map (`NM_ENROLLED`) holds.
    pub fn enrolled_capacity(&self) -> Result<u32, DatapathError> {
        Ok(IterableMap::map(&self.enrolled)
            .info()
            .map_err(map_err(maps::ENROLLED))?
            .max_entries())
    }

    /// Entries and capacity of each map that fills up (the hash and LPM maps), by map name.
    /// Arrays are always full and socket storage has no count, so they are left out.
    ///
    /// Cost: one `bpf(MAP_GET_NEXT_KEY)` per entry, so a scrape of full 64 Ki maps takes a few
    /// milliseconds; the count stops at the capacity, since a key deleted mid-walk restarts the
    /// kernel's walk and could otherwise count the same entries again.
    pub fn map_usage(&self) -> Result<BTreeMap<&'static str, MapUsage>, DatapathError> {
        let mut out = BTreeMap::new();
        macro_rules! add {
            ($name:expr, $map:expr) => {
                out.insert($name, usage($name, IterableMap::map($map), $map.keys())?);
            };
        }
        add!(maps::ENROLLED, &self.enrolled);
        add!(maps::EXCLUSIONS, &self.exclusions);
        add!(maps::IDENTITIES, &self.identities);
        add!(maps::MESH_DESTINATIONS, &self.mesh_dsts);
        add!(maps::POLICY, &self.policy);
        add!(maps::GUARD_PORTS, &self.guard_ports);
        let by_tuple = self
            .orig_dst
            .by_tuple
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        add!(maps::ORIG_DST_BY_TUPLE, &*by_tuple);
        Ok(out)
    }
}

/// How full one eBPF map is ([`Datapath::map_usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub entries: u64,
    pub capacity: u64,
}

fn usage<K>(
    name: &'static str,
    data: &MapData,
    keys: impl Iterator<Item = Result<K, MapError>>,
) -> Result<MapUsage, DatapathError> {
    let capacity = u64::from(data.info().map_err(map_err(name))?.max_entries());
    let mut entries = 0u64;
    for key in keys {
        key.map_err(map_err(name))?;
        entries += 1;
        if entries >= capacity {
            break;
        }
    }
    Ok(MapUsage { entries, capacity })
}

/// Loads the splice verdict program and attaches it to the (unpinned) sockhash. The attachment
/// lives as long as the returned handle or a clone of it.
fn attach_splice(
    ebpf: &mut Ebpf,
    socks: aya::maps::Map,
    links: aya::maps::Map,
    ctl: aya::maps::Map,
) -> Result<crate::splice::SockSplice, DatapathError> {
    let name = programs::SPLICE_VERDICT;
    let socks: SockHash<MapData, u64> =
        SockHash::try_from(socks).map_err(map_err(maps::SPLICE_SOCKS))?;
    let links: HashMap<MapData, u64, SpliceLink> =
        HashMap::try_from(links).map_err(map_err(maps::SPLICE_LINKS))?;
    let ctl: HashMap<MapData, u64, mesh_common::SpliceCtl> =
        HashMap::try_from(ctl).map_err(map_err(maps::SPLICE_CTL))?;
    let prog: &mut SkSkb = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(prog_err(name))?;
    prog.load().map_err(prog_err(name))?;
    let map_fd = socks.fd().try_clone().map_err(|e| {
        map_err(maps::SPLICE_SOCKS)(MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error: e,
        }))
    })?;
    let id = prog.attach(&map_fd).map_err(prog_err(name))?;
    let link = prog.take_link(id).map_err(prog_err(name))?;
    debug!(program = name, "splice verdict attached to its sockhash");
    Ok(crate::splice::SockSplice::new(socks, links, ctl, link))
}

impl KernelMaps for Datapath {
    fn put_enrolled(&mut self, netns_cookie: u64, pod: EnrolledPod) -> Result<(), MapsError> {
        self.enrolled
            .insert(netns_cookie, pod, 0)
            .map_err(maps_err(maps::ENROLLED))
    }
    fn del_enrolled(&mut self, netns_cookie: u64) -> Result<(), MapsError> {
        absent_ok(self.enrolled.remove(&netns_cookie)).map_err(maps_err(maps::ENROLLED))
    }
    fn put_tunnel_config(&mut self, cfg: TunnelConfig) -> Result<(), MapsError> {
        self.tunnel_cfg
            .set(0, cfg, 0)
            .map_err(maps_err(maps::TUNNEL_CONFIG))?;
        info!(?cfg, "redirect target set");
        Ok(())
    }
    fn put_exclusion(&mut self, prefix_len: u32, key: LpmPortAddr) -> Result<(), MapsError> {
        self.exclusions
            .insert(&Key::new(prefix_len, key), 1, 0)
            .map_err(maps_err(maps::EXCLUSIONS))
    }
    fn del_exclusion(&mut self, prefix_len: u32, key: LpmPortAddr) -> Result<(), MapsError> {
        absent_ok(self.exclusions.remove(&Key::new(prefix_len, key)))
            .map_err(maps_err(maps::EXCLUSIONS))
    }
    fn put_identity(&mut self, prefix_len: u32, key: LpmAddr, id: u32) -> Result<(), MapsError> {
        self.identities
            .insert(&Key::new(prefix_len, key), id, 0)
            .map_err(maps_err(maps::IDENTITIES))
    }
    fn del_identity(&mut self, prefix_len: u32, key: LpmAddr) -> Result<(), MapsError> {
        absent_ok(self.identities.remove(&Key::new(prefix_len, key)))
            .map_err(maps_err(maps::IDENTITIES))
    }
    fn put_policy(&mut self, key: PolicyKey, verdict: u32) -> Result<(), MapsError> {
        self.policy
            .insert(key, verdict, 0)
            .map_err(maps_err(maps::POLICY))
    }
    fn del_policy(&mut self, key: PolicyKey) -> Result<(), MapsError> {
        absent_ok(self.policy.remove(&key)).map_err(maps_err(maps::POLICY))
    }
    fn put_guard_port(&mut self, key: GuardPortKey) -> Result<(), MapsError> {
        self.guard_ports
            .insert(key, 1, 0)
            .map_err(maps_err(maps::GUARD_PORTS))
    }
    fn del_guard_port(&mut self, key: GuardPortKey) -> Result<(), MapsError> {
        absent_ok(self.guard_ports.remove(&key)).map_err(maps_err(maps::GUARD_PORTS))
    }
    fn put_mesh_destination(
        &mut self,
        prefix_len: u32,
        key: LpmAddr,
        value: u32,
    ) -> Result<(), MapsError> {
        self.mesh_dsts
            .insert(&Key::new(prefix_len, key), value, 0)
            .map_err(maps_err(maps::MESH_DESTINATIONS))
    }
    fn del_mesh_destination(&mut self, prefix_len: u32, key: LpmAddr) -> Result<(), MapsError> {
        absent_ok(self.mesh_dsts.remove(&Key::new(prefix_len, key)))
            .map_err(maps_err(maps::MESH_DESTINATIONS))
    }
    fn read_entries(&self) -> Result<crate::maps::MapEntries, MapsError> {
        let mut out = crate::maps::MapEntries::default();
        let tunnel = self
            .tunnel_cfg
            .get(&0, 0)
            .map_err(maps_err(maps::TUNNEL_CONFIG))?;
        out.tunnel = (tunnel != TunnelConfig::default()).then_some(tunnel);
        for e in self.enrolled.iter() {
            let (k, v) = e.map_err(maps_err(maps::ENROLLED))?;
            out.enrolled.insert(k, v);
        }
        for e in self.exclusions.iter() {
            let (k, _) = e.map_err(maps_err(maps::EXCLUSIONS))?;
            out.exclusions.insert((k.prefix_len(), k.data()));
        }
        for e in self.identities.iter() {
            let (k, v) = e.map_err(maps_err(maps::IDENTITIES))?;
            out.identities.insert((k.prefix_len(), k.data()), v);
        }
        for e in self.mesh_dsts.iter() {
            let (k, v) = e.map_err(maps_err(maps::MESH_DESTINATIONS))?;
            out.mesh_destinations.insert((k.prefix_len(), k.data()), v);
        }
        for e in self.policy.iter() {
            let (k, v) = e.map_err(maps_err(maps::POLICY))?;
            out.policy.insert(k, v);
        }
        for e in self.guard_ports.keys() {
            out.guard_ports
                .insert(e.map_err(maps_err(maps::GUARD_PORTS))?);
        }
        Ok(out)
    }
}

/// The tunnel's liveness signal. The tunnel calls [`TunnelHeartbeat::beat`] more often than the
/// configured staleness window ([`TunnelSettings::stale_after`]); when it stops, enrolled pods'
/// connects follow their fail mode. Clone freely.
#[derive(Clone)]
pub struct TunnelHeartbeat {
    map: Arc<Mutex<Array<MapData, u64>>>,
}

impl TunnelHeartbeat {
    /// Records "alive now" (`CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`).
    pub fn beat(&self) -> Result<(), DatapathError> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map_err(DatapathError::Clock)?;
        let ns = u64::try_from(now.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(now.tv_nsec()).unwrap_or(0));
        self.write(ns.max(1))
    }

    /// Marks the tunnel as down at once (e.g. on shutdown), without waiting for staleness.
    pub fn stop(&self) -> Result<(), DatapathError> {
        self.write(0)
    }

    fn write(&self, ns: u64) -> Result<(), DatapathError> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .set(0, ns, 0)
            .map_err(map_err(maps::TUNNEL_HEARTBEAT))
    }
}

/// Where one agent instance pins its maps and links:
/// `<bpffs>/nodemesh/<instance>/v<MAP_LAYOUT_VERSION>/{maps,links}/<name>`. A new map layout gets
/// a new version directory, so an incompatible pin is never reused (aya reuses whatever is at a
/// pin path without checking its layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pins {
    bpffs: PathBuf,
    instance_dir: PathBuf,
}

impl Pins {
    /// Where bpffs is normally mounted.
    pub const DEFAULT_BPFFS: &'static str = "/sys/fs/bpf";

    pub fn new(bpffs: impl Into<PathBuf>, instance: &str) -> Result<Self, DatapathError> {
        let valid = !instance.is_empty()
            && instance.len() <= 64
            && !instance.starts_with('.')
            && instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return Err(DatapathError::BadInstance(instance.to_owned()));
        }
        let bpffs = bpffs.into();
        let instance_dir = bpffs.join("nodemesh").join(instance);
        Ok(Self {
            bpffs,
            instance_dir,
        })
    }

    /// `<bpffs>/nodemesh/<instance>`: everything of this instance, all layout versions.
    pub fn instance_dir(&self) -> &Path {
        &self.instance_dir
    }

    /// `<instance dir>/v<MAP_LAYOUT_VERSION>`.
    pub fn version_dir(&self) -> PathBuf {
        self.instance_dir.join(format!("v{MAP_LAYOUT_VERSION}"))
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.version_dir().join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.version_dir().join("links")
    }

    /// Claims the instance for this process: an exclusive `flock` on `<instance dir>` (created if
    /// missing), held until the returned lock drops or the process exits (also on SIGKILL). A
    /// second agent of the same instance gets [`DatapathError::InstanceBusy`] and must stop
    /// before touching anything of the first (pins, state, ready file, interfaces).
    pub fn lock(&self) -> Result<InstanceLock, DatapathError> {
        self.check_bpffs()?;
        std::fs::create_dir_all(&self.instance_dir).map_err(|source| DatapathError::PinDir {
            path: self.instance_dir.clone(),
            source,
        })?;
        self.lock_existing()
    }

    /// [`Pins::lock`] on an instance directory that exists.
    fn lock_existing(&self) -> Result<InstanceLock, DatapathError> {
        use std::os::fd::AsRawFd;
        let dir = &self.instance_dir;
        let pin_dir = |source| DatapathError::PinDir {
            path: dir.clone(),
            source,
        };
        let file = File::open(dir).map_err(pin_dir)?;
        // SAFETY: flock on a descriptor owned by `file`, alive for the call; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DatapathError::InstanceBusy {
                    instance: dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    path: dir.clone(),
                });
            }
            return Err(pin_dir(e));
        }
        Ok(InstanceLock { _dir: file })
    }

    fn check_bpffs(&self) -> Result<(), DatapathError> {
        // BPF_FS_MAGIC from linux/magic.h.
        let bpf_fs_magic = nix::sys::statfs::FsType(0xcafe_4a11);
        let is_bpffs = nix::sys::statfs::statfs(&self.bpffs)
            .map(|s| s.filesystem_type() == bpf_fs_magic)
            .unwrap_or(false);
        if !is_bpffs {
            return Err(DatapathError::NotBpffs {
                path: self.bpffs.clone(),
            });
        }
        Ok(())
    }

    fn create_dirs(&self) -> Result<(), DatapathError> {
        self.check_bpffs()?;
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| DatapathError::PinDir { path: dir, source })?;
        }
        Ok(())
    }
}

/// One running agent's claim on its instance ([`Pins::lock`]); released on drop.
#[derive(Debug)]
pub struct InstanceLock {
    _dir: File,
}

/// `BPF_OBJ_GET` on the pin, then `BPF_LINK_UPDATE` to `prog` (aya 0.14 exposes link updates
/// only for TC/XDP links).
fn link_update(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit: the struct is 24 bytes (u64 alignment) and the kernel rejects non-zero bytes
        // after the command's last field with EINVAL. Left implicit, this padding was
        // uninitialised stack, which explains the transient EINVAL once seen on adoption.
        _pad: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let c_path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let get = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `get` is a valid, fully initialised bpf_attr prefix for BPF_OBJ_GET whose
    // `pathname` points at a NUL-terminated string alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const get,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("BPF_OBJ_GET: {e}")));
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this new descriptor; we own it.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let update = LinkUpdate {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(std::io::Error::other)?,
        new_prog_fd: u32::try_from(prog.as_raw_fd()).map_err(std::io::Error::other)?,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `update` is a valid, fully initialised bpf_attr prefix for BPF_LINK_UPDATE.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const update,
            size_of::<LinkUpdate>(),
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("BPF_LINK_UPDATE: {e}"),
        ));
    }
    Ok(())
}

/// Removes every pin of the instance (all layout versions): its links detach once no process
/// holds them any more, and its maps are freed. Returns whether there was anything to remove.
/// Refuses ([`DatapathError::InstanceBusy`]) while an agent runs the instance: stop it first.
pub fn uninstall(pins: &Pins) -> Result<bool, DatapathError> {
    let dir = pins.instance_dir();
    if !dir.exists() {
        return Ok(false);
    }
    let _claim = pins.lock_existing()?;
    std::fs::remove_dir_all(dir).map_err(|source| DatapathError::PinDir {
        path: dir.to_path_buf(),
        source,
    })?;
    // The shared parent goes too when this was the last instance; other instances keep it.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    info!(dir = %dir.display(), "nodemesh pins removed (programs detached, maps freed)");
    Ok(true)
}

/// Where a redirected connection was going, and which pod made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    pub addr: SocketAddr,
    pub identity_id: u32,
    pub workload_id: u32,
    pub netns_cookie: u64,
    pub source: OrigDstSource,
}

#[derive(Debug, thiserror::Error)]
pub enum OrigDstError {
    #[error(
        "no original destination recorded for connection {peer} -> {local}: it was not redirected \
         by nodemesh (a direct connection to the tunnel port?) or its record expired"
    )]
    NotFound { peer: SocketAddr, local: SocketAddr },
    #[error("cannot read the addresses of the accepted socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("reading the original-destination map failed: {0}")]
    Map(#[source] MapError),
    #[error("corrupt original-destination record for {peer} -> {local} (family {family})")]
    Corrupt {
        peer: SocketAddr,
        local: SocketAddr,
        family: u16,
    },
}

/// Reads original destinations recorded by the kernel programs. Clone freely.
#[derive(Clone)]
pub struct OrigDstReader {
    by_tuple: Arc<Mutex<HashMap<MapData, SockTuple, OrigDst>>>,
    by_socket: Arc<SkStorage<MapData, OrigDst>>,
    misses: Arc<AtomicU64>,
}

impl OrigDstReader {
    /// Returns the original destination of a connection the tunnel accepted (a tuple-map
    /// record is consumed: one connection, one read; a socket-storage record dies with the
    /// socket). A connection without a record is an error: the caller
    /// must refuse it rather than guess.
    pub fn original_destination(
        &self,
        stream: &TcpStream,
    ) -> Result<OriginalDestination, OrigDstError> {
        let peer = stream.peer_addr().map_err(OrigDstError::Socket)?;
        let local = stream.local_addr().map_err(OrigDstError::Socket)?;
        self.original_destination_of(stream, peer, local)
    }

    /// As [`Self::original_destination`] for any socket type (e.g. tokio's) whose addresses the
    /// caller already has.
    pub fn original_destination_of(
        &self,
        stream: &impl std::os::fd::AsRawFd,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<OriginalDestination, OrigDstError> {
        // Handed over into the socket's own storage (sock_ops on the tunnel's cgroup)? One
        // lookup, no lock: the record lives and dies with this socket (no later connection can
        // see it), so unlike the tuple map it needs no consuming delete.
        match self.by_socket.get(stream, 0) {
            Ok(rec) => return record(&rec, peer, local, OrigDstSource::SocketStorage),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(OrigDstError::Map(e)),
        }
        self.lookup(peer, local)
    }

    /// As [`Self::original_destination`], from the accepted socket's peer and local addresses.
    pub fn lookup(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<OriginalDestination, OrigDstError> {
        let result = self.lookup_inner(peer, local);
        if matches!(result, Err(OrigDstError::NotFound { .. })) {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn lookup_inner(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<OriginalDestination, OrigDstError> {
        // Mixed families cannot be a redirected connection (the programs keep the family).
        let key = crate::map_model::tuple_key(peer, local)
            .ok_or(OrigDstError::NotFound { peer, local })?;
        let mut map = self
            .by_tuple
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rec = match map.get(&key, 0) {
            Ok(rec) => rec,
            Err(MapError::KeyNotFound) => return Err(OrigDstError::NotFound { peer, local }),
            Err(e) => return Err(OrigDstError::Map(e)),
        };
        // Consume: a later connection reusing the tuple must get its own record, never this one.
        match map.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(OrigDstError::Map(e)),
        }
        drop(map);
        record(&rec, peer, local, OrigDstSource::TupleMap)
    }
}

fn record(
    rec: &OrigDst,
    peer: SocketAddr,
    local: SocketAddr,
    source: OrigDstSource,
) -> Result<OriginalDestination, OrigDstError> {
    let addr = crate::map_model::orig_dst_addr(rec).ok_or(OrigDstError::Corrupt {
        peer,
        local,
        family: rec.family,
    })?;
    Ok(OriginalDestination {
        addr,
        identity_id: rec.identity_id,
        workload_id: rec.workload_id,
        netns_cookie: rec.netns_cookie,
        source,
    })
}

/// Where an original destination was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrigDstSource {
    /// The accepted socket's own storage (handed over at `PASSIVE_ESTABLISHED`).
    SocketStorage,
    /// The tuple-keyed map (fallback when sock_ops does not run on the tunnel's cgroup).
    TupleMap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths_carry_instance_and_layout_version() {
        let pins = Pins::new("/sys/fs/bpf", "node-a").expect("valid");
        assert_eq!(
            pins.maps_dir(),
            PathBuf::from(format!(
                "/sys/fs/bpf/nodemesh/node-a/v{MAP_LAYOUT_VERSION}/maps"
            ))
        );
        for bad in ["", "..", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(
                matches!(
                    Pins::new("/sys/fs/bpf", bad),
                    Err(DatapathError::BadInstance(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn embedded_object_is_an_ebpf_elf() {
        assert!(EBPF_OBJECT.starts_with(b"\x7fELF"), "not an ELF object");
        // EM_BPF = 247 at offset 18 (little endian).
        assert_eq!(u16::from_le_bytes([EBPF_OBJECT[18], EBPF_OBJECT[19]]), 247);
    }
}
