//! Loading, attaching and programming the nodemesh eBPF programs.
//!
//! The object is built by `cargo xtask build-ebpf` and embedded at compile time (see `build.rs`).
//! [`Datapath::load`] loads every program into the kernel (the verifier runs here, so a bad
//! program fails at start, not at first use); [`Datapath::attach`] attaches them as bpf links to
//! one cgroup v2 directory: the hierarchy's root in production, a child cgroup in tests.
//!
//! The tunnel reads a redirected connection's original destination with
//! [`OrigDstReader::original_destination`]; a miss is an error, never a guess.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};
use mesh_common::{
    AF_INET, Counter, EnrolledPod, OrigDst, SockTuple, TunnelConfig, maps, programs,
};
use tracing::{debug, info};

/// The eBPF object, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("NODEMESH_EBPF_OBJECT_PATH"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed: {0} (needs root or CAP_BPF+CAP_NET_ADMIN, \
         and Linux 5.18+ with BTF)"
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
    #[error("IPv6 tunnel addresses are not supported yet: {0}")]
    Ipv6Tunnel(SocketAddr),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// The loaded programs and the maps the agent programs.
pub struct Datapath {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    tunnel_cfg: Array<MapData, TunnelConfig>,
    counters: PerCpuArray<MapData, u64>,
    orig_dst: OrigDstReader,
    attached_to: Vec<PathBuf>,
}

impl Datapath {
    /// Loads every program of the embedded object into the kernel (running the verifier) and
    /// takes the maps. Nothing is attached yet.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(DatapathError::Load)?;
        for name in [programs::CONNECT4, programs::SOCKOPS] {
            let prog = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?;
            match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
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
        Ok(Self {
            ebpf,
            enrolled,
            tunnel_cfg,
            counters,
            orig_dst: OrigDstReader {
                by_tuple: Arc::new(Mutex::new(by_tuple)),
            },
            attached_to: Vec::new(),
        })
    }

    /// Attaches the programs to the cgroup v2 directory `cgroup`. Every socket created by a
    /// process in that cgroup or below it is then subject to them. Links live as long as `self`.
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
        let connect4: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(programs::CONNECT4)
            .ok_or(DatapathError::MissingProgram {
                name: programs::CONNECT4,
            })?
            .try_into()
            .map_err(prog_err(programs::CONNECT4))?;
        // `Single` is the mode links accept; links still allow several programs per cgroup.
        connect4
            .attach(&fd, CgroupAttachMode::Single)
            .map_err(prog_err(programs::CONNECT4))?;
        let sockops: &mut SockOps = self
            .ebpf
            .program_mut(programs::SOCKOPS)
            .ok_or(DatapathError::MissingProgram {
                name: programs::SOCKOPS,
            })?
            .try_into()
            .map_err(prog_err(programs::SOCKOPS))?;
        sockops
            .attach(&fd, CgroupAttachMode::Single)
            .map_err(prog_err(programs::SOCKOPS))?;
        info!(cgroup = %cgroup.display(), "eBPF programs attached (connect4, sockops)");
        self.attached_to.push(cgroup.to_path_buf());
        Ok(())
    }

    /// Sets where enrolled pods' connects are redirected. Until this is set, enrolled pods'
    /// connects are refused (fail-closed) or passed untouched (fail-open pods).
    pub fn set_tunnel(&mut self, addr: SocketAddr) -> Result<(), DatapathError> {
        let SocketAddr::V4(v4) = addr else {
            return Err(DatapathError::Ipv6Tunnel(addr));
        };
        let cfg = TunnelConfig {
            ip4: u32::from_ne_bytes(v4.ip().octets()),
            port: v4.port(),
            _pad: 0,
        };
        self.tunnel_cfg
            .set(0, cfg, 0)
            .map_err(map_err(maps::TUNNEL_CONFIG))?;
        info!(tunnel = %addr, "redirect target set");
        Ok(())
    }

    /// Enrolls the pod whose network namespace has cookie `netns_cookie`.
    pub fn enroll(&mut self, netns_cookie: u64, pod: EnrolledPod) -> Result<(), DatapathError> {
        self.enrolled
            .insert(netns_cookie, pod, 0)
            .map_err(map_err(maps::ENROLLED))?;
        info!(netns_cookie, workload_id = pod.workload_id, "pod enrolled");
        Ok(())
    }

    /// Removes a pod's enrollment. Removing one that is not enrolled is not an error.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), DatapathError> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::ENROLLED)(e)),
        }
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
        Ok(out)
    }
}

/// Where a redirected connection was going, and which pod made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    pub addr: SocketAddr,
    pub identity_id: u32,
    pub workload_id: u32,
    pub netns_cookie: u64,
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
    #[error("IPv6 connections are not handled yet: {peer} -> {local}")]
    Unsupported { peer: SocketAddr, local: SocketAddr },
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
}

impl OrigDstReader {
    /// Returns the original destination of a connection the tunnel accepted, and consumes the
    /// record (one connection, one read). A connection without a record is an error: the caller
    /// must refuse it rather than guess.
    pub fn original_destination(
        &self,
        stream: &TcpStream,
    ) -> Result<OriginalDestination, OrigDstError> {
        let peer = stream.peer_addr().map_err(OrigDstError::Socket)?;
        let local = stream.local_addr().map_err(OrigDstError::Socket)?;
        self.lookup(peer, local)
    }

    /// As [`Self::original_destination`], from the accepted socket's peer and local addresses.
    pub fn lookup(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<OriginalDestination, OrigDstError> {
        let (Some(peer4), Some(local4)) = (as_v4(peer), as_v4(local)) else {
            return Err(OrigDstError::Unsupported { peer, local });
        };
        let key = SockTuple {
            src_ip: [u32::from_ne_bytes(peer4.ip().octets()), 0, 0, 0],
            dst_ip: [u32::from_ne_bytes(local4.ip().octets()), 0, 0, 0],
            src_port: peer4.port(),
            dst_port: local4.port(),
            family: AF_INET,
            _pad: 0,
        };
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
        if rec.family != AF_INET {
            return Err(OrigDstError::Corrupt {
                peer,
                local,
                family: rec.family,
            });
        }
        let ip = Ipv4Addr::from(rec.ip[0].to_ne_bytes());
        Ok(OriginalDestination {
            addr: SocketAddr::V4(SocketAddrV4::new(ip, rec.port)),
            identity_id: rec.identity_id,
            workload_id: rec.workload_id,
            netns_cookie: rec.netns_cookie,
        })
    }
}

/// IPv4 view of an address, including IPv4-mapped IPv6 (a dual-stack listener's view).
fn as_v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, v6.port())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, SocketAddrV6};

    #[test]
    fn mapped_ipv6_is_viewed_as_ipv4() {
        let mapped = SocketAddr::V6(SocketAddrV6::new(
            Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped(),
            8080,
            0,
            0,
        ));
        assert_eq!(
            as_v4(mapped),
            Some(SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 8080))
        );
        let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 1, 0, 0));
        assert_eq!(as_v4(v6), None);
    }

    #[test]
    fn embedded_object_is_an_ebpf_elf() {
        assert!(EBPF_OBJECT.starts_with(b"\x7fELF"), "not an ELF object");
        // EM_BPF = 247 at offset 18 (little endian).
        assert_eq!(u16::from_le_bytes([EBPF_OBJECT[18], EBPF_OBJECT[19]]), 247);
    }
}
