//! The node-local interface holding the tunnel's address (a link-local `/32`, and optionally an
//! IPv6 `/128`): the target of every redirected connect. A `dummy` device where the kernel has
//! one; otherwise (this project's CI kernel has no `dummy` type) a bridge without ports, whose
//! local addresses are reachable all the same. The choice is logged.
//!
//! Uses iproute2 (`ip`), run in the calling thread's network namespace (a child process inherits
//! it), so tests can call it from [`crate::netns::in_netns`].

use std::{net::IpAddr, process::Command};

use tracing::info;

/// What kind of device holds the tunnel address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfaceKind {
    Dummy,
    /// A bridge with no ports (for kernels without the `dummy` type).
    Bridge,
}

impl IfaceKind {
    fn ip_type(self) -> &'static str {
        match self {
            IfaceKind::Dummy => "dummy",
            IfaceKind::Bridge => "bridge",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error(
        "cannot create tunnel interface {name}: neither a dummy nor a bridge device could be \
         added ({dummy}; {bridge})"
    )]
    NoDevice {
        name: String,
        dummy: String,
        bridge: String,
    },
    #[error("interface name `{0}` must be 1-15 characters of [A-Za-z0-9_.-]")]
    BadName(String),
}

fn ip(args: &[&str]) -> Result<String, IfaceError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(IfaceError::Spawn)?;
    if !out.status.success() {
        return Err(IfaceError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check_name(name: &str) -> Result<(), IfaceError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IfaceError::BadName(name.to_owned()))
    }
}

/// The kind of an existing interface, from `ip -d link show` output.
fn parse_kind(details: &str) -> Option<IfaceKind> {
    let words: Vec<&str> = details.split_whitespace().collect();
    if words.contains(&"dummy") {
        Some(IfaceKind::Dummy)
    } else if words.contains(&"bridge") {
        Some(IfaceKind::Bridge)
    } else {
        None
    }
}

/// Makes sure interface `name` exists, is up and holds `addrs` as host routes (`/32`, `/128`
/// without duplicate-address detection). Reuses an existing interface of that name (an agent
/// restart); otherwise tries `dummy`, then a port-less bridge. Idempotent.
pub fn ensure_tunnel_iface(name: &str, addrs: &[IpAddr]) -> Result<IfaceKind, IfaceError> {
    check_name(name)?;
    let kind = match ip(&["-d", "link", "show", "dev", name]) {
        Ok(details) => parse_kind(&details).unwrap_or(IfaceKind::Dummy),
        Err(_) => match ip(&["link", "add", name, "type", IfaceKind::Dummy.ip_type()]) {
            Ok(_) => IfaceKind::Dummy,
            Err(dummy) => {
                ip(&["link", "add", name, "type", IfaceKind::Bridge.ip_type()]).map_err(
                    |bridge| IfaceError::NoDevice {
                        name: name.to_owned(),
                        dummy: dummy.to_string(),
                        bridge: bridge.to_string(),
                    },
                )?;
                IfaceKind::Bridge
            }
        },
    };
    ip(&["link", "set", name, "up"])?;
    for addr in addrs {
        match addr {
            IpAddr::V4(v4) => ip(&["addr", "replace", &format!("{v4}/32"), "dev", name])?,
            IpAddr::V6(v6) => ip(&[
                "-6",
                "addr",
                "replace",
                &format!("{v6}/128"),
                "dev",
                name,
                "nodad",
            ])?,
        };
    }
    info!(interface = name, ?kind, ?addrs, "tunnel interface ready");
    Ok(kind)
}

/// Deletes the tunnel interface; a missing one is not an error.
pub fn remove_tunnel_iface(name: &str) -> Result<(), IfaceError> {
    check_name(name)?;
    if ip(&["link", "show", "dev", name]).is_err() {
        return Ok(());
    }
    ip(&["link", "del", name]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_read_from_link_details() {
        let bridge = "5: nm0: <BROADCAST,MULTICAST,UP> mtu 1500\n    link/ether 1a:2b brd ff:ff\n    bridge forward_delay 1500 hello_time 200";
        assert_eq!(parse_kind(bridge), Some(IfaceKind::Bridge));
        let dummy = "6: nm0: <BROADCAST,NOARP,UP> mtu 1500\n    link/ether aa:bb\n    dummy addrgenmode eui64";
        assert_eq!(parse_kind(dummy), Some(IfaceKind::Dummy));
        assert_eq!(parse_kind("7: eth0: <UP>\n    veth"), None);
    }

    #[test]
    fn names_are_checked_before_running_anything() {
        assert!(matches!(
            ensure_tunnel_iface("a name with spaces", &[]),
            Err(IfaceError::BadName(_))
        ));
        assert!(matches!(
            remove_tunnel_iface("waytoolonginterfacename"),
            Err(IfaceError::BadName(_))
        ));
    }
}
