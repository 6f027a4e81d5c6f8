//! Finding a Kubernetes pod's network namespace on a real node, without a CNI plugin.
//!
//! The kubelet puts every process of a pod in a cgroup whose path names the pod's UID; a process
//! of the pod then leads to the pod's network namespace through `/proc/<pid>/ns/net` (all the
//! pod's containers share the sandbox's namespace). This is how Istio's ambient node agent finds
//! pods that were already running. The kubelet's cgroup names:
//!
//! - cgroupfs driver: `/kubepods/pod<uid>/<ctr>`, `/kubepods/burstable/pod<uid>/<ctr>`,
//!   `/kubepods/besteffort/pod<uid>/<ctr>`;
//! - systemd driver: `/kubepods.slice/kubepods-pod<uid_>.slice/<runtime>-<id>.scope` (runtime
//!   `cri-containerd`, `crio` or `docker`) and, for the QoS classes,
//!   `kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/…` (`<qos>` `burstable` or
//!   `besteffort`), where `uid_` is the UID with `-` replaced by `_` (systemd nests with `-`).
//!
//! Either may sit below other prefixes (a kind node's `/kubelet.slice/kubelet-kubepods.slice/…`,
//! a nested node's cgroup), and a reader in a private cgroup namespace sees other pods' paths
//! relative to its own root (`/../../kubepods-besteffort-pod<uid_>.slice/…`). So the pod
//! component is matched anywhere in the path, and the UID is compared exactly (a UID that is a prefix of
//! another never matches it). Every line of `/proc/<pid>/cgroup` counts: `0::/path` (cgroup v2)
//! and `N:controllers:/path` (v1 or hybrid).
//!
//! Which process: any of the pod's, but not one still in the host's namespace (a CRI-O `conmon`
//! sits in the pod's cgroup on the host network, as does a `runc init` for a moment before it
//! joins the sandbox). If the pod's processes are in several namespaces (a sandbox being
//! replaced), the one whose first process started last wins: the new sandbox. Within it the
//! earliest process (the pause process) is returned, since it lives as long as the namespace.
//! A pod whose processes are all in the host's namespace is a `hostNetwork` pod: an error.
//!
//! Cost: [`ProcScanner`] indexes every pod of the node in one pass over `/proc`, so N pods cost
//! one scan; found entries are re-checked cheaply (two small reads) before they are returned, and
//! a miss rescans at most once per `min_rescan` interval, so no call pattern can make it scan
//! more often than that.

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Where the agent finds the host's processes: `/proc` with `hostPID: true`, or the host's `/proc`
/// mounted elsewhere.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// Misses rescan `/proc` at most this often by default.
pub const DEFAULT_MIN_RESCAN: Duration = Duration::from_millis(250);
/// A `/proc/<pid>/cgroup` longer than this is cut (a real one is a few hundred bytes).
const MAX_CGROUP_FILE: u64 = 64 * 1024;

/// Finds the network namespace of a pod by its UID. The Kubernetes source holds one per node.
pub trait NetnsFinder: Send + Sync {
    /// The path of the pod's network namespace (`/proc/<pid>/ns/net`). A different path than
    /// last time means the pod's sandbox changed. The error says what to check.
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String>;
}

/// Errors of the pod network-namespace finder; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error(
        "cannot list processes in {path}: {source} (the agent needs the host's processes: \
         `hostPID: true`, or the host's /proc mounted at that path)"
    )]
    ProcUnreadable { path: PathBuf, source: io::Error },
    #[error("`{uid}` is not a pod UID (expected letters, digits and `-`, as in metadata.uid)")]
    InvalidUid { uid: String },
    #[error(
        "no process of pod {uid} in {proc_root}/*/cgroup (scanned {processes} processes, {pods} \
         pods in kubelet cgroups, {age_ms} ms ago): {hint}"
    )]
    NotFound {
        uid: String,
        proc_root: PathBuf,
        processes: usize,
        pods: usize,
        age_ms: u128,
        hint: &'static str,
    },
    #[error(
        "pod {uid} is in the host's network namespace (process {pid}): a `hostNetwork: true` pod \
         cannot be enrolled (if it is not one, its sandbox is still starting: find it again)"
    )]
    HostNetwork { uid: String, pid: u32 },
    #[error(
        "cannot read the network namespace of process {pid} of pod {uid}: {source} (the agent \
         needs root or CAP_SYS_PTRACE to read other processes' /proc/<pid>/ns)"
    )]
    Denied {
        uid: String,
        pid: u32,
        source: io::Error,
    },
    #[error(
        "the network namespace of pod {uid} changed while it was opened (process {pid} exited \
         or moved): find it again"
    )]
    Changed { uid: String, pid: u32 },
    #[error("cannot open {path}: {source} (process {pid} of pod {uid}; find it again)")]
    Open {
        uid: String,
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
}

const HINT_NO_PODS: &str = "no process is in a kubelet cgroup at all: does the agent see the \
     host's processes (`hostPID: true` or the host's /proc mounted there), and does the kubelet \
     name cgroups kubepods/… (cgroupfs driver) or kubepods.slice/… (systemd driver)?";
const HINT_NOT_STARTED: &str = "other pods are there: is this pod scheduled to this node, and has \
     the kubelet created its sandbox yet (its events: FailedCreatePodSandBox)? It is found once it \
     has a process";

/// A pod's network namespace, as found through one of its processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    pub pod_uid: String,
    /// The process it was found through (the sandbox's earliest process).
    pub pid: u32,
    /// `<proc root>/<pid>/ns/net`.
    pub path: PathBuf,
    /// The namespace's inode number (`net:[inode]`; also `st_ino` of the namespace file).
    pub inode: u64,
    /// The process's start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot), so a
    /// reused pid is not taken for the same process.
    pub start_time: u64,
}

impl PodNetns {
    /// Whether the pod's sandbox is still the one found: the process is alive (not a reused
    /// pid) and still in the same namespace. `false` means: find the pod again.
    pub fn is_current(&self) -> bool {
        let Some(dir) = self.path.parent().and_then(Path::parent) else {
            return false;
        };
        read_start_time(dir).ok() == Some(self.start_time)
            && read_ns_inode(&self.path).ok() == Some(self.inode)
    }

    /// Opens the namespace file and checks that what was opened is this pod's namespace (the
    /// process may have exited and its pid been reused between finding and opening).
    pub fn open(&self) -> Result<File, PodNetnsError> {
        let file = File::open(&self.path).map_err(|source| PodNetnsError::Open {
            uid: self.pod_uid.clone(),
            pid: self.pid,
            path: self.path.clone(),
            source,
        })?;
        let inode = file.metadata().map(|m| m.ino()).ok();
        if inode != Some(self.inode) || !self.is_current() {
            return Err(PodNetnsError::Changed {
                uid: self.pod_uid.clone(),
                pid: self.pid,
            });
        }
        Ok(file)
    }
}

/// The pod UID named by one cgroup path, in its dashed form (as in `metadata.uid`).
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // The innermost pod component wins (a nested node's pods sit below the node's own pod).
    parts.iter().enumerate().rev().find_map(|(i, c)| {
        systemd_pod_uid(c).or_else(|| {
            let parent = i.checked_sub(1).map(|p| parts[p]);
            cgroupfs_pod_uid(c, parent)
        })
    })
}

/// `…kubepods[-qos]-pod<uid_>.slice` (with any prefix systemd nesting adds, e.g. `kubelet-`).
fn systemd_pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice")?;
    let (parent, pod) = name.rsplit_once('-')?;
    let uid = pod.strip_prefix("pod")?;
    let mut units = parent.split('-');
    if !units.any(|u| u == "kubepods") {
        return None;
    }
    // What follows `kubepods` must be a QoS class or nothing.
    let rest: Vec<&str> = units.collect();
    if !matches!(rest.as_slice(), [] | ["burstable" | "besteffort"]) {
        return None;
    }
    valid_uid(uid).then(|| uid.replace('_', "-"))
}

/// `pod<uid>` below `kubepods`, `burstable` or `besteffort` (or `..` for a reader in a private
/// cgroup namespace, where the parents are out of sight).
fn cgroupfs_pod_uid(component: &str, parent: Option<&str>) -> Option<String> {
    let uid = component.strip_prefix("pod")?;
    let under_kubepods = matches!(parent, Some("kubepods" | "burstable" | "besteffort" | ".."));
    (under_kubepods && valid_uid(uid) && !uid.contains('_')).then(|| uid.to_owned())
}

/// Pod UIDs are UUIDs (`metadata.uid`) or, for static pods, 32 hex digits; accept the characters
/// either uses (and `_`, systemd's escape of `-`).
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The pod UID in any line of a `/proc/<pid>/cgroup` file (`0::/path` or `N:controllers:/path`).
pub fn pod_uid_from_cgroup_file(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_id, _controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        pod_uid_from_cgroup_path(path)
    })
}

/// Parses the target of a namespace link, `net:[4026532123]`.
pub fn parse_ns_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn read_ns_inode(link: &Path) -> io::Result<u64> {
    let target = fs::read_link(link)?;
    let target = target.to_string_lossy();
    parse_ns_link(&target).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} points to `{target}`, not net:[inode]", link.display()),
        )
    })
}

/// Field 22 (`starttime`) of `<pid dir>/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn read_start_time(pid_dir: &Path) -> io::Result<u64> {
    let stat = fs::read_to_string(pid_dir.join("stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/<pid>/stat");
    let (_, rest) = stat.rsplit_once(')').ok_or_else(bad)?;
    // `rest` starts at field 3 (state); starttime is field 22.
    rest.split_ascii_whitespace()
        .nth(22 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(bad)
}

fn read_capped(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    File::open(path)?
        .take(MAX_CGROUP_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// What one scan knows about one pod.
#[derive(Clone, Debug)]
enum Entry {
    Found(PodNetns),
    HostNetwork { pid: u32 },
    Denied { pid: u32, error: String },
}

/// One process of a pod seen by a scan.
struct Seen {
    pid: u32,
    inode: u64,
    start_time: u64,
}

#[derive(Default)]
struct Index {
    pods: HashMap<String, Entry>,
    processes: usize,
    scanned_at: Option<Instant>,
}

/// Finds pods' network namespaces by scanning a proc filesystem (see the module docs).
pub struct ProcScanner {
    proc_root: PathBuf,
    min_rescan: Duration,
    index: Mutex<Index>,
}

impl ProcScanner {
    /// A scanner of `proc_root` (`/proc`, or where the host's /proc is mounted; a fake tree in
    /// tests). Nothing is read until the first lookup.
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            min_rescan: DEFAULT_MIN_RESCAN,
            index: Mutex::new(Index::default()),
        }
    }

    /// Misses rescan at most once per `interval` (zero: every miss rescans).
    pub fn with_min_rescan(mut self, interval: Duration) -> Self {
        self.min_rescan = interval;
        self
    }

    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// The pod's network namespace. Served from the index when the entry found there is still
    /// current; otherwise `/proc` is scanned again (rate-limited, see [`Self::with_min_rescan`]).
    pub fn find(&self, pod_uid: &str) -> Result<PodNetns, PodNetnsError> {
        if !valid_uid(pod_uid) || pod_uid.contains('_') {
            return Err(PodNetnsError::InvalidUid {
                uid: pod_uid.to_owned(),
            });
        }
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Entry::Found(p)) = index.pods.get(pod_uid)
            && p.is_current()
        {
            return Ok(p.clone());
        }
        let due = index
            .scanned_at
            .is_none_or(|at| at.elapsed() >= self.min_rescan);
        if due {
            *index = self.scan()?;
        } else if let Some(Entry::Found(_)) = index.pods.get(pod_uid) {
            // Found before but no longer current, and too early to rescan: forget it so the
            // next lookup after the interval finds the new sandbox.
            index.pods.remove(pod_uid);
        }
        self.lookup(&index, pod_uid)
    }

    /// Scans `/proc` now, whatever the interval (e.g. after a pod's sandbox is known to have
    /// been replaced). Returns the number of pods seen.
    pub fn refresh(&self) -> Result<usize, PodNetnsError> {
        let fresh = self.scan()?;
        let pods = fresh.pods.len();
        *self.index.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(pods)
    }

    fn lookup(&self, index: &Index, uid: &str) -> Result<PodNetns, PodNetnsError> {
        match index.pods.get(uid) {
            Some(Entry::Found(p)) => Ok(p.clone()),
            Some(Entry::HostNetwork { pid }) => Err(PodNetnsError::HostNetwork {
                uid: uid.to_owned(),
                pid: *pid,
            }),
            Some(Entry::Denied { pid, error }) => Err(PodNetnsError::Denied {
                uid: uid.to_owned(),
                pid: *pid,
                source: io::Error::other(error.clone()),
            }),
            None => Err(PodNetnsError::NotFound {
                uid: uid.to_owned(),
                proc_root: self.proc_root.clone(),
                processes: index.processes,
                pods: index.pods.len(),
                age_ms: index.scanned_at.map_or(0, |t| t.elapsed().as_millis()),
                hint: if index.pods.is_empty() {
                    HINT_NO_PODS
                } else {
                    HINT_NOT_STARTED
                },
            }),
        }
    }

    /// The host's network namespaces: those of pid 1 and of the agent itself (either may be
    /// unreadable in a fake tree).
    fn host_inodes(&self) -> HashSet<u64> {
        ["1", "self"]
            .iter()
            .filter_map(|p| read_ns_inode(&self.proc_root.join(p).join("ns/net")).ok())
            .collect()
    }

    /// One pass over `/proc`. Processes that exit meanwhile are skipped.
    fn scan(&self) -> Result<Index, PodNetnsError> {
        let entries =
            fs::read_dir(&self.proc_root).map_err(|source| PodNetnsError::ProcUnreadable {
                path: self.proc_root.clone(),
                source,
            })?;
        let host = self.host_inodes();
        let mut seen: HashMap<String, Vec<Seen>> = HashMap::new();
        let mut denied: HashMap<String, (u32, io::Error)> = HashMap::new();
        let mut processes = 0;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            processes += 1;
            let dir = entry.path();
            let Ok(cgroup) = read_capped(&dir.join("cgroup")) else {
                continue; // exited
            };
            let Some(uid) = pod_uid_from_cgroup_file(&cgroup) else {
                continue;
            };
            let inode = match read_ns_inode(&dir.join("ns/net")) {
                Ok(i) => i,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    denied.entry(uid).or_insert((pid, e));
                    continue;
                }
                Err(_) => continue, // exited, or a kernel thread
            };
            let Ok(start_time) = read_start_time(&dir) else {
                continue;
            };
            seen.entry(uid).or_default().push(Seen {
                pid,
                inode,
                start_time,
            });
        }
        let mut pods: HashMap<String, Entry> = denied
            .into_iter()
            .map(|(uid, (pid, e))| {
                (
                    uid,
                    Entry::Denied {
                        pid,
                        error: e.to_string(),
                    },
                )
            })
            .collect();
        for (uid, procs) in seen {
            let entry = self.choose(&uid, &procs, &host);
            pods.insert(uid, entry);
        }
        Ok(Index {
            pods,
            processes,
            scanned_at: Some(Instant::now()),
        })
    }

    /// The pod's namespace among its processes' (module docs, "Which process").
    fn choose(&self, uid: &str, procs: &[Seen], host: &HashSet<u64>) -> Entry {
        // Per namespace: its earliest process (the sandbox's).
        let mut first: HashMap<u64, &Seen> = HashMap::new();
        for p in procs.iter().filter(|p| !host.contains(&p.inode)) {
            first
                .entry(p.inode)
                .and_modify(|f| {
                    if (p.start_time, p.pid) < (f.start_time, f.pid) {
                        *f = p;
                    }
                })
                .or_insert(p);
        }
        // The newest sandbox: the namespace whose first process started last.
        match first.values().max_by_key(|p| (p.start_time, p.pid)) {
            Some(p) => Entry::Found(PodNetns {
                pod_uid: uid.to_owned(),
                pid: p.pid,
                path: self.proc_root.join(p.pid.to_string()).join("ns/net"),
                inode: p.inode,
                start_time: p.start_time,
            }),
            None => Entry::HostNetwork {
                pid: procs.iter().map(|p| p.pid).min().unwrap_or_default(),
            },
        }
    }
}

impl Default for ProcScanner {
    fn default() -> Self {
        Self::new(DEFAULT_PROC_ROOT)
    }
}

impl NetnsFinder for ProcScanner {
    fn netns_of(&self, pod_uid: &str) -> Result<PathBuf, String> {
        self.find(pod_uid)
            .map(|p| p.path)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
