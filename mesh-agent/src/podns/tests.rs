//! The finder over fake /proc trees: `<root>/<pid>/{cgroup,stat,ns/net}` with `ns/net` a
//! symlink to `net:[inode]`, as the kernel shows it.

use std::{fs, os::unix::fs::symlink, path::Path, time::Duration};

use super::*;

const UID: &str = "5f0a3c2e-7b1d-4e8f-9a6b-0c1d2e3f4a5b";
const UID_: &str = "5f0a3c2e_7b1d_4e8f_9a6b_0c1d2e3f4a5b";
const HOST_NS: u64 = 4026531840;

struct FakeProc {
    dir: tempfile::TempDir,
}

impl FakeProc {
    /// A tree with pid 1 and `self` in the host namespace.
    fn new() -> Self {
        let fake = Self {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        fake.process(1, "0::/init.scope\n", Some(HOST_NS), 1);
        fake.process_named("self", "0::/system.slice/agent.scope\n", Some(HOST_NS), 5);
        fake
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn process(&self, pid: u32, cgroup: &str, netns: Option<u64>, start_time: u64) {
        self.process_named(&pid.to_string(), cgroup, netns, start_time);
    }

    fn process_named(&self, name: &str, cgroup: &str, netns: Option<u64>, start_time: u64) {
        let dir = self.root().join(name);
        fs::create_dir_all(dir.join("ns")).expect("mkdir");
        fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
        // A command name with a space and a parenthesis, as the kernel allows.
        let mut stat = format!("{name} (pa use) S");
        for field in 4..=21 {
            stat.push_str(&format!(" {field}"));
        }
        stat.push_str(&format!(" {start_time} 1000 2000\n"));
        fs::write(dir.join("stat"), stat).expect("stat");
        if let Some(inode) = netns {
            symlink(format!("net:[{inode}]"), dir.join("ns/net")).expect("symlink");
        }
    }

    fn kill(&self, pid: u32) {
        fs::remove_dir_all(self.root().join(pid.to_string())).expect("rm");
    }

    fn scanner(&self) -> ProcScanner {
        ProcScanner::new(self.root()).with_min_rescan(Duration::ZERO)
    }
}

#[test]
fn every_kubelet_naming_form_yields_the_uid() {
    let forms = [
        // cgroupfs driver, the three QoS classes.
        format!("/kubepods/pod{UID}/ctr1"),
        format!("/kubepods/burstable/pod{UID}/ctr1"),
        format!("/kubepods/besteffort/pod{UID}/0123abcd"),
        // systemd driver, the three QoS classes and the three runtimes.
        format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-0123abcd.scope"),
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-0123abcd.scope"
        ),
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-0123abcd.scope"
        ),
        // Nested below other prefixes: a kind node (cgroup root /kubelet), a node in a test cgroup.
        format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-ab.scope"
        ),
        format!("/nm-lab/node-a/kubepods/burstable/pod{UID}/ctr"),
        format!(
            "/system.slice/docker-node.scope/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-ab.scope"
        ),
        // A reader in a private cgroup namespace sees other pods relative to its own root.
        format!("/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-ab.scope"),
        format!("/../../pod{UID}/ctr"),
        // A process directly in the pod's cgroup (no container below it).
        format!("/kubepods/pod{UID}"),
    ];
    for path in &forms {
        assert_eq!(
            pod_uid_from_cgroup_path(path).as_deref(),
            Some(UID),
            "{path}"
        );
    }
    // A static pod's UID (32 hex digits, no dashes).
    assert_eq!(
        pod_uid_from_cgroup_path("/kubepods/besteffort/pod0123456789abcdef0123456789abcdef/c")
            .as_deref(),
        Some("0123456789abcdef0123456789abcdef")
    );
}

#[test]
fn paths_that_are_not_pods_yield_nothing() {
    for path in [
        "/",
        "",
        "/init.scope",
        "/system.slice/containerd.service",
        "/kubepods",
        "/kubepods.slice",
        "/kubepods.slice/kubepods-burstable.slice",
        // `pod…` outside the kubelet's tree (podman's names, a user's cgroup).
        "/user.slice/pod123/x",
        "/machine.slice/libpod-pod-1234.slice",
        // Systemd names that only look alike.
        "/kubepods.slice/kubepods-guaranteed-pod1234.slice/x.scope",
        "/system.slice/notkubepods-pod1234.slice/x.scope",
        "/kubepods.slice/kubepods-pod.slice",
        "/kubepods/pod",
        // A cgroupfs name may not use systemd's escape.
        "/kubepods/burstable/pod5f0a3c2e_7b1d/ctr",
    ] {
        assert_eq!(pod_uid_from_cgroup_path(path), None, "{path}");
    }
}

#[test]
fn cgroup_files_of_v2_and_v1_hybrid_hosts() {
    let v2 = format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-ab.scope\n");
    assert_eq!(pod_uid_from_cgroup_file(&v2).as_deref(), Some(UID));
    // Hybrid: v1 controllers first, the v2 line in an unrelated place; any line names the pod.
    let hybrid = format!(
        "12:pids:/kubepods/burstable/pod{UID}/ctr\n\
         11:cpu,cpuacct:/kubepods/burstable/pod{UID}/ctr\n\
         1:name=systemd:/kubepods/burstable/pod{UID}/ctr\n\
         0::/\n"
    );
    assert_eq!(pod_uid_from_cgroup_file(&hybrid).as_deref(), Some(UID));
    let v1_only = format!("0::/\n5:memory:/kubepods/pod{UID}/ctr\n");
    assert_eq!(pod_uid_from_cgroup_file(&v1_only).as_deref(), Some(UID));
    assert_eq!(
        pod_uid_from_cgroup_file("0::/user.slice\n1:name=systemd:/user.slice\n"),
        None
    );
    assert_eq!(pod_uid_from_cgroup_file("garbage\n\n:\n"), None);
}

#[test]
fn ns_links_parse_and_stat_fields_are_counted_after_the_command() {
    assert_eq!(parse_ns_link("net:[4026532123]"), Some(4026532123));
    assert_eq!(parse_ns_link("mnt:[4026532123]"), None);
    assert_eq!(parse_ns_link("net:[x]"), None);
    let fake = FakeProc::new();
    fake.process(42, "0::/\n", Some(7), 123456);
    assert_eq!(
        read_start_time(&fake.root().join("42")).expect("stat"),
        123456
    );
}

#[test]
fn finds_pods_of_every_form_in_one_scan() {
    let fake = FakeProc::new();
    let uids: Vec<String> = (0..6)
        .map(|i| format!("00000000-0000-4000-8000-00000000000{i}"))
        .collect();
    let path = |i: usize, uid: &str| -> String {
        let u = uid.replace('-', "_");
        match i {
            0 => format!("/kubepods/pod{uid}/c"),
            1 => format!("/kubepods/burstable/pod{uid}/c"),
            2 => format!("/kubepods/besteffort/pod{uid}/c"),
            3 => format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-c.scope"),
            4 => format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-c.scope"
            ),
            _ => format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-c.scope"
            ),
        }
    };
    for (i, uid) in uids.iter().enumerate() {
        let pid = 100 + i as u32;
        fake.process(
            pid,
            &format!("0::{}\n", path(i, uid)),
            Some(5000 + i as u64),
            10,
        );
    }
    // Unrelated processes.
    fake.process(7, "0::/system.slice/sshd.service\n", Some(HOST_NS), 2);
    fs::create_dir(fake.root().join("sys")).expect("non-pid entry");

    // A long interval: every lookup after the first is served by the first scan.
    let scanner = ProcScanner::new(fake.root()).with_min_rescan(Duration::from_secs(3600));
    for (i, uid) in uids.iter().enumerate() {
        let found = scanner.find(uid).expect("found");
        let pid = 100 + i as u32;
        assert_eq!(found.pid, pid);
        assert_eq!(found.inode, 5000 + i as u64);
        assert_eq!(found.path, fake.root().join(pid.to_string()).join("ns/net"));
        assert_eq!(found.pod_uid, *uid);
        assert_eq!(
            scanner.netns_of(uid).expect("trait"),
            fake.root().join(pid.to_string()).join("ns/net")
        );
    }
    // A pod that appears now is not seen until a rescan is due (bounded work) or forced.
    fake.process(200, &format!("0::/kubepods/pod{UID}/c\n"), Some(9000), 50);
    assert!(matches!(
        scanner.find(UID),
        Err(PodNetnsError::NotFound { .. })
    ));
    assert_eq!(scanner.refresh().expect("refresh"), 7);
    assert_eq!(scanner.find(UID).expect("after refresh").inode, 9000);
}

#[test]
fn any_process_of_the_pod_leads_to_its_namespace_and_the_sandbox_is_preferred() {
    let fake = FakeProc::new();
    let pod = |ctr: &str| {
        format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ctr}.scope\n")
    };
    // App containers started after the pause process, one of them with a lower pid.
    fake.process(300, &pod("app"), Some(4026532200), 700);
    fake.process(150, &pod("sidecar"), Some(4026532200), 800);
    fake.process(500, &pod("pause"), Some(4026532200), 600);
    // CRI-O's conmon: in the pod's cgroup, on the host network.
    fake.process(90, &pod("conmon"), Some(HOST_NS), 550);
    let found = fake.scanner().find(UID).expect("found");
    assert_eq!(
        (found.pid, found.inode, found.start_time),
        (500, 4026532200, 600)
    );
}

#[test]
fn host_network_pod_is_an_error() {
    let fake = FakeProc::new();
    fake.process(
        400,
        &format!("0::/kubepods/besteffort/pod{UID}/ctr\n"),
        Some(HOST_NS),
        10,
    );
    let err = fake.scanner().find(UID).unwrap_err();
    assert!(
        matches!(err, PodNetnsError::HostNetwork { pid: 400, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("hostNetwork"), "{err}");
    let msg = fake.scanner().netns_of(UID).unwrap_err();
    assert!(msg.contains(UID) && msg.contains("hostNetwork"), "{msg}");
}

#[test]
fn the_agents_own_namespace_counts_as_the_hosts() {
    // pid 1 unreadable (e.g. another pid namespace) but the agent's own namespace is known.
    let fake = FakeProc::new();
    fs::remove_dir_all(fake.root().join("1")).expect("rm");
    fake.process(
        400,
        &format!("0::/kubepods/pod{UID}/c\n"),
        Some(HOST_NS),
        10,
    );
    assert!(matches!(
        fake.scanner().find(UID),
        Err(PodNetnsError::HostNetwork { .. })
    ));
}

#[test]
fn a_uid_prefix_or_extension_never_matches() {
    let fake = FakeProc::new();
    let longer = format!("{UID}0");
    let longer_ = format!("{UID_}0");
    fake.process(10, &format!("0::/kubepods/pod{longer}/c\n"), Some(11), 1);
    fake.process(
        12,
        &format!("0::/kubepods.slice/kubepods-pod{longer_}.slice/c.scope\n"),
        Some(13),
        1,
    );
    let scanner = fake.scanner();
    let prefix = &UID[..8];
    for uid in [UID, prefix, &UID[..UID.len() - 1]] {
        let err = scanner.find(uid).unwrap_err();
        assert!(
            matches!(err, PodNetnsError::NotFound { .. }),
            "{uid}: {err}"
        );
    }
    assert_eq!(scanner.find(&longer).expect("exact").inode, 13);
    // The systemd escape is not a UID.
    assert!(matches!(
        scanner.find(UID_),
        Err(PodNetnsError::InvalidUid { .. })
    ));
    assert!(matches!(
        scanner.find(""),
        Err(PodNetnsError::InvalidUid { .. })
    ));
    assert!(matches!(
        scanner.find("../1"),
        Err(PodNetnsError::InvalidUid { .. })
    ));
}

#[test]
fn missing_pod_says_what_to_check() {
    let fake = FakeProc::new();
    let err = fake.scanner().find(UID).unwrap_err().to_string();
    assert!(err.contains(UID), "{err}");
    assert!(err.contains("hostPID"), "no pod at all: {err}");
    assert!(err.contains("cgroupfs") && err.contains("systemd"), "{err}");

    fake.process(60, "0::/kubepods/pod11111111-2222/c\n", Some(61), 1);
    let err = fake.scanner().find(UID).unwrap_err().to_string();
    assert!(err.contains("sandbox"), "other pods present: {err}");

    let gone = ProcScanner::new(fake.root().join("nope"));
    let err = gone.find(UID).unwrap_err();
    assert!(matches!(err, PodNetnsError::ProcUnreadable { .. }), "{err}");
    assert!(err.to_string().contains("hostPID"), "{err}");
}

#[test]
fn processes_vanishing_mid_scan_are_skipped() {
    let fake = FakeProc::new();
    let cg = format!("0::/kubepods/burstable/pod{UID}/c\n");
    // Listed, but its files are gone: the process exited between readdir and the reads.
    fs::create_dir(fake.root().join("70")).expect("empty pid dir");
    // Its cgroup was read but its namespace link is gone.
    fake.process(71, &cg, None, 5);
    // Its stat is gone.
    fake.process(72, &cg, Some(4026532300), 6);
    fs::remove_file(fake.root().join("72/stat")).expect("rm stat");
    // The survivor.
    fake.process(73, &cg, Some(4026532301), 7);
    let found = fake.scanner().find(UID).expect("the survivor");
    assert_eq!((found.pid, found.inode), (73, 4026532301));

    // A pod whose only process vanished is not found.
    let other = "99999999-0000-4000-8000-000000000000";
    fake.process(80, &format!("0::/kubepods/pod{other}/c\n"), None, 5);
    assert!(matches!(
        fake.scanner().find(other),
        Err(PodNetnsError::NotFound { .. })
    ));
}

#[test]
fn a_replaced_sandbox_is_detected_and_the_new_one_found() {
    let fake = FakeProc::new();
    let cg = |ctr: &str| format!("0::/kubepods/besteffort/pod{UID}/{ctr}\n");
    fake.process(500, &cg("pause1"), Some(4026532400), 100);
    fake.process(501, &cg("app"), Some(4026532400), 110);
    let scanner = fake.scanner();
    let first = scanner.find(UID).expect("first sandbox");
    assert_eq!(first.pid, 500);
    assert!(first.is_current());
    assert_eq!(scanner.find(UID).expect("cached"), first);

    // The sandbox dies; the new one starts in a new namespace while an old container lingers.
    fake.kill(500);
    assert!(!first.is_current(), "pid gone");
    fake.process(600, &cg("pause2"), Some(4026532500), 300);
    let second = scanner.find(UID).expect("second sandbox");
    assert_eq!((second.pid, second.inode), (600, 4026532500));
    assert_eq!(
        scanner.netns_of(UID).expect("trait"),
        fake.root().join("600/ns/net")
    );

    // The pid is reused by another process: not current although the pid exists.
    fake.kill(600);
    fake.process(600, &cg("pause2"), Some(4026532500), 999);
    assert!(!second.is_current(), "reused pid");
    // Same pid and start time, other namespace (setns): not current either.
    let third = scanner.find(UID).expect("third");
    fs::remove_file(fake.root().join("600/ns/net")).expect("rm");
    symlink("net:[4026532999]", fake.root().join("600/ns/net")).expect("symlink");
    assert!(!third.is_current(), "namespace changed");
}

#[test]
fn a_stale_entry_is_dropped_when_a_rescan_is_not_yet_due() {
    let fake = FakeProc::new();
    fake.process(
        500,
        &format!("0::/kubepods/pod{UID}/c\n"),
        Some(4026532400),
        1,
    );
    let scanner = ProcScanner::new(fake.root()).with_min_rescan(Duration::from_secs(3600));
    assert_eq!(scanner.find(UID).expect("found").pid, 500);
    fake.kill(500);
    // Never the stale namespace: an error until a rescan is due or forced.
    assert!(matches!(
        scanner.find(UID),
        Err(PodNetnsError::NotFound { .. })
    ));
    fake.process(
        501,
        &format!("0::/kubepods/pod{UID}/c\n"),
        Some(4026532401),
        2,
    );
    scanner.refresh().expect("refresh");
    assert_eq!(scanner.find(UID).expect("new").pid, 501);
}

#[test]
fn unreadable_namespace_links_say_which_permission_is_missing() {
    // Root reads everything, so only the message is checked here.
    let err = PodNetnsError::Denied {
        uid: UID.into(),
        pid: 3,
        source: io::Error::from(io::ErrorKind::PermissionDenied),
    };
    assert!(err.to_string().contains("CAP_SYS_PTRACE"), "{err}");
}

#[test]
fn the_real_proc_scans_without_error() {
    // Any user may read other processes' `cgroup` files; only `ns/net` needs privileges.
    let scanner = ProcScanner::default().with_min_rescan(Duration::ZERO);
    scanner.refresh().expect("scan /proc");
    match scanner.find(UID) {
        Err(PodNetnsError::NotFound { processes, .. }) => {
            assert!(processes > 0, "this test's own process at least")
        }
        other => panic!("a made-up UID: {other:?}"),
    }
}
