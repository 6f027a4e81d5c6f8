//! Root test of restart safety: pinned maps and links survive the agent, a new agent adopts them
//! without re-enrolling pods, the tunnel's staleness makes fail-closed pods refuse meanwhile, a
//! map the earlier agent did not have (`NM_MESH_DST`) starts empty and captures everything until
//! the new agent's reconcile fills it, and uninstall leaves nothing pinned and nothing attached.

use std::{
    net::{Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_agent::{
    datapath::{Datapath, Pins, uninstall},
    map_model::{Cidr, Exclusion, PodSpec},
    maps::{KernelMaps, TunnelSettings},
    reconcile::{DesiredState, ReconcileReport, compile, reconcile},
};
use mesh_common::{FailMode, MtlsMode, OUTBOUND_PORT, maps};
use nodemesh_tests::{
    ChildCgroup, Node, TUNNEL_IP4, accept_now, probe_connect, require_root, unique_prefix,
};

const SERVER_PORT: u16 = 8080;

/// Removes the instance's pins if the test fails half way (declared before the datapaths, so
/// it runs after them).
struct PinsGuard(Pins);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        if let Err(e) = uninstall(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn pinned_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["maps", "links"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            out.extend(
                rd.flatten()
                    .map(|e| format!("{sub}/{}", e.file_name().to_string_lossy())),
            );
        }
    }
    out.sort();
    out
}

#[test]
fn pinned_datapath_survives_the_agent_and_uninstall_removes_everything() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let node = Node::new(&p, 1)?;
    let cgroup = ChildCgroup::new(&format!("{p}-pods"))?;
    let pod = &node.pods[0];
    let tunnel = node.listen(SocketAddr::new(TUNNEL_IP4.into(), OUTBOUND_PORT))?;
    let server = node.listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), SERVER_PORT))?;
    let pins = Pins::new(Pins::DEFAULT_BPFFS, &p)?;
    let _guard = PinsGuard(pins.clone());
    let dst = SocketAddr::new(pod.gw4.into(), SERVER_PORT);
    let connect = || probe_connect(cgroup.path(), &pod.ns, dst, "x");
    let settings = TunnelSettings {
        ip4: TUNNEL_IP4,
        ip6: None,
        port: OUTBOUND_PORT,
        stale_after: Some(Duration::from_secs(3)),
    };

    // Agent 1: pins everything, enrolls the pod, the tunnel beats.
    let tunnel_cg = ChildCgroup::new(&format!("{p}-tunnel"))?;
    let mut dp = Datapath::load_pinned(&pins)?;
    dp.attach(cgroup.path())?;
    dp.attach_tunnel(tunnel_cg.path())?;
    dp.set_tunnel(&settings)?;
    let spec = PodSpec {
        workload_id: 1,
        identity_id: 9,
        ip4: Some(pod.ip4),
        ip6: Some(pod.ip6),
        mtls: MtlsMode::Strict,
        fail: FailMode::Closed,
        plaintext_ports: vec![8081],
    };
    let cookie = dp.enroll_netns(&pod.ns.path(), &spec)?;
    dp.heartbeat().beat()?;
    connect()?;
    let conn = accept_now(&tunnel)?.context("agent 1: not redirected")?;
    assert_eq!(dp.orig_dst_reader().original_destination(&conn)?.addr, dst);
    let pinned = pinned_files(&pins.version_dir());
    assert!(
        pinned.contains(&"links/mesh_connect4".to_owned()),
        "{pinned:?}"
    );
    assert!(
        pinned.contains(&"links/mesh_sockops_tunnel".to_owned()),
        "{pinned:?}"
    );
    assert!(
        pinned.contains(&"maps/NM_ENROLLED".to_owned()),
        "{pinned:?}"
    );

    let links_1 = dp.pinned_link_programs()?;
    assert_eq!(links_1.len(), 6, "{links_1:?}");
    // The agent dies (its fds close). The programs stay attached: the tunnel's heartbeat goes
    // stale and the fail-closed pod gets ECONNREFUSED, never a plaintext bypass.
    drop(dp);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect() {
            Err(e) if e.to_string().contains("Connection refused") => break,
            Err(e) => bail!("unexpected failure while the agent is down: {e:#}"),
            Ok(_) => {
                // Still within the staleness window: it must have gone to the tunnel.
                assert!(
                    accept_now(&tunnel)?.is_some(),
                    "bypass while the agent is down"
                );
            }
        }
        if Instant::now() > deadline {
            bail!("the tunnel never went stale: are the programs still attached?");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(accept_now(&server)?.is_none(), "plaintext bypass");
    // Agent 1 stands for an older agent of the same layout version, which had no mesh
    // destinations map: without its pin, agent 2 creates it empty.
    let mesh_dst_pin = pins.maps_dir().join(maps::MESH_DESTINATIONS);
    assert!(
        mesh_dst_pin.exists(),
        "agent 1 pinned {}",
        mesh_dst_pin.display()
    );
    std::fs::remove_file(&mesh_dst_pin)?;

    // Agent 2 adopts the pins: no re-enrollment, the counters and the pod are still there.
    // Asking it to attach the same instance elsewhere is refused.
    let other = ChildCgroup::new(&format!("{p}-other"))?;
    let mut dp = Datapath::load_pinned(&pins)?;
    let err = dp
        .attach(other.path())
        .expect_err("adopting for another cgroup");
    assert!(err.to_string().contains("another cgroup"), "{err}");
    dp.attach(cgroup.path())?;
    dp.attach_tunnel(tunnel_cg.path())?;
    assert!(
        dp.counters()?["refused_tunnel_stale"] >= 1,
        "counters were not adopted"
    );
    // Same links (adopted, not re-attached), now running agent 2's programs (updated in place).
    let links_2 = dp.pinned_link_programs()?;
    let ids = |l: &[(String, u32, u32)]| {
        l.iter()
            .map(|(n, id, _)| (n.clone(), *id))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&links_2),
        ids(&links_1),
        "links were replaced instead of adopted"
    );
    let running: Vec<_> = links_2.iter().map(|(n, _, p)| (n.clone(), *p)).collect();
    assert_eq!(
        running,
        dp.program_ids()?,
        "adopted links still run the old programs"
    );
    // Agent 2's programs with the new, empty map capture everything: no plaintext bypass of a
    // mesh destination before the map is filled.
    dp.heartbeat().beat()?;
    connect()?;
    accept_now(&tunnel)?.context("agent 2, empty mesh destinations: not redirected")?;
    assert!(accept_now(&server)?.is_none(), "plaintext bypass");
    // Level-triggered reconcile against the adopted maps: they already hold the desired state,
    // except the new map: the pod's two addresses, the destination (a workload here) and the
    // catch-all.
    let mut desired = DesiredState {
        tunnel: Some(settings),
        ..Default::default()
    };
    desired.pods.insert(cookie, spec.clone());
    desired.mesh_destinations.insert(Cidr::host(pod.gw4.into()));
    let report = reconcile(&mut dp, &compile(&desired)?)?;
    assert_eq!(
        (report.written, report.deleted),
        (4, 0),
        "adopted maps differ beyond the new map"
    );
    let report = reconcile(&mut dp, &compile(&desired)?)?;
    assert_eq!(report, ReconcileReport::default(), "not converged");
    // And it converges when the desired state changes (another exclusion).
    desired.exclusions.insert(Exclusion::Port(5353));
    let report = reconcile(&mut dp, &compile(&desired)?)?;
    assert_eq!((report.written, report.deleted), (1, 0));
    dp.heartbeat().beat()?;
    connect()?;
    let conn = accept_now(&tunnel)?.context("agent 2: not redirected")?;
    let orig = dp.orig_dst_reader().original_destination(&conn)?;
    assert_eq!(
        (orig.addr, orig.netns_cookie, orig.identity_id),
        (dst, cookie, 9)
    );
    assert_eq!(
        pinned_files(&pins.version_dir()),
        pinned,
        "pins changed on adoption"
    );

    // Uninstall (agent stopped first): nothing left under bpffs, nothing attached.
    drop(dp);
    assert!(uninstall(&pins)?);
    assert!(!pins.instance_dir().exists());
    // The kernel frees a link whose last reference was its pin from a deferred work item, so
    // detachment follows the unlink shortly: poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        connect()?;
        if accept_now(&server)?.is_some() {
            break;
        }
        assert!(accept_now(&tunnel)?.is_some(), "connection lost");
        if Instant::now() > deadline {
            bail!("still redirected 10 s after uninstall: programs not detached");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!uninstall(&pins)?, "uninstall is idempotent");
    Ok(())
}
