//! Root test of the tunnel interface: created in a throw-away namespace (dummy where the kernel
//! has it, else a port-less bridge), its addresses reachable from a pod, idempotent, removable.

use std::net::{IpAddr, SocketAddr, TcpListener};

use anyhow::Result;
use mesh_agent::{
    netns::in_netns,
    tunnel_iface::{IfaceKind, ensure_tunnel_iface, remove_tunnel_iface},
};
use nodemesh_tests::{NetNs, accept_within, require_root, unique_prefix, veth};

#[test]
fn tunnel_interface_holds_reachable_addresses_and_is_idempotent() -> Result<()> {
    require_root();
    let p = unique_prefix();
    let node = NetNs::new(&format!("{p}-node"))?;
    let pod = NetNs::new(&format!("{p}-a"))?;
    veth(&node, "va", "10.80.1.1/24", &pod, "eth0", "10.80.1.2/24")?;
    pod.exec(&["ip", "route", "add", "default", "via", "10.80.1.1"])?;
    let addrs: Vec<IpAddr> = vec!["169.254.80.1".parse()?, "fd80::1".parse()?];
    let a = addrs.clone();
    let kind = in_netns(&node.path(), move || {
        ensure_tunnel_iface("nmtun0", &a).map_err(std::io::Error::other)
    })?;
    // Either is fine; which one depends on the kernel (this CI kernel has no dummy type).
    assert!(matches!(kind, IfaceKind::Dummy | IfaceKind::Bridge));
    let a = addrs.clone();
    let again = in_netns(&node.path(), move || {
        ensure_tunnel_iface("nmtun0", &a).map_err(std::io::Error::other)
    })?;
    assert_eq!(again, kind, "a second call reuses the interface");
    let shown = node.exec(&["ip", "addr", "show", "dev", "nmtun0"])?;
    assert!(
        shown.contains("169.254.80.1/32") && shown.contains("fd80::1/128"),
        "{shown}"
    );

    // Reachable from the pod through the node's routing, like the real tunnel listener.
    let dst = SocketAddr::new(addrs[0], 15001);
    let listener = in_netns(&node.path(), move || TcpListener::bind(dst))?;
    let _conn = in_netns(&pod.path(), move || {
        std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(5))
    })?;
    assert!(
        accept_within(&listener, std::time::Duration::from_secs(5))?.is_some(),
        "the tunnel address is not reachable from a pod"
    );

    in_netns(&node.path(), || {
        remove_tunnel_iface("nmtun0").map_err(std::io::Error::other)
    })?;
    assert!(node.exec(&["ip", "link", "show", "dev", "nmtun0"]).is_err());
    in_netns(&node.path(), || {
        remove_tunnel_iface("nmtun0").map_err(std::io::Error::other)
    })?;
    Ok(())
}
