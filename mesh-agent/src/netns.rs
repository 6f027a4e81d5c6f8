//! Network-namespace helpers for enrollment.
//!
//! A pod is enrolled by its network-namespace cookie: the kernel's stable 64-bit id of the netns
//! (`bpf_get_netns_cookie` in the programs, `SO_NETNS_COOKIE` from userspace). Reading it needs a
//! socket created *inside* the pod's netns. That is done on a dedicated OS thread that joins the
//! namespace, does its work and exits: namespace membership is per thread, so a runtime worker must
//! never be moved (a tokio worker left in a pod's netns would open later sockets in the wrong place).

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    thread,
};

use nix::sched::{CloneFlags, setns};

/// Errors from namespace operations. Each names the namespace path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (is the pod still running?)")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source} (the agent needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: io::Error },
    #[error("in network namespace {path}: {source}")]
    Inside { path: PathBuf, source: io::Error },
    #[error("the helper thread for network namespace {path} panicked")]
    ThreadPanicked { path: PathBuf },
}

/// Runs `f` on a fresh OS thread that has joined the network namespace at `netns` (a file such as
/// `/run/netns/<name>` or `/proc/<pid>/ns/net`). Sockets `f` creates stay in that namespace and
/// may be returned and used from any thread.
pub fn in_netns<T, F>(netns: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let path = netns.to_path_buf();
    let file = File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    let thread_path = path.clone();
    let handle = thread::Builder::new()
        .name("nm-netns".into())
        .spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
                path: thread_path.clone(),
                source: errno.into(),
            })?;
            // The thread ends right after `f`; its namespace membership dies with it.
            f().map_err(|source| NetnsError::Inside {
                path: thread_path,
                source,
            })
        })
        .map_err(|source| NetnsError::Inside {
            path: path.clone(),
            source,
        })?;
    handle
        .join()
        .map_err(|_| NetnsError::ThreadPanicked { path })?
}

/// Returns the cookie of the network namespace at `netns`, as the eBPF programs will see it.
pub fn netns_cookie(netns: &Path) -> Result<u64, NetnsError> {
    in_netns(netns, current_netns_cookie)
}

/// Returns the cookie of the calling thread's network namespace.
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind(("127.0.0.1", 0)).or_else(|_| {
        // A namespace whose loopback is down still allows an unbound socket; fall back to that.
        std::net::UdpSocket::bind(("0.0.0.0", 0))
    })?;
    socket_netns_cookie(&sock)
}

/// `getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)` on any socket (Linux 5.14+).
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given; the fd is borrowed from
    // a live socket.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::ENOPROTOOPT) {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "SO_NETNS_COOKIE is not supported: nodemesh needs Linux 5.14 or newer",
            )
        } else {
            err
        });
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_cookie_is_stable_and_nonzero() {
        let a = current_netns_cookie().expect("SO_NETNS_COOKIE on this kernel");
        let b = current_netns_cookie().expect("SO_NETNS_COOKIE on this kernel");
        assert_ne!(a, 0);
        assert_eq!(a, b);
    }

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = netns_cookie(Path::new("/run/netns/does-not-exist-nodemesh")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/run/netns/does-not-exist-nodemesh"), "{msg}");
        assert!(matches!(err, NetnsError::Open { .. }));
    }
}
