//! Level-triggered map programming: the agent states the whole desired state (pods, exclusions,
//! identities, policy, tunnel); [`compile`] turns it into the exact map entries; [`reconcile`]
//! reads what the kernel holds and applies only the difference. After a restart that adopted
//! pinned maps, this converges without clearing anything first, so traffic never sees an empty
//! map.

use std::collections::{BTreeMap, BTreeSet};

use mesh_common::{MESH_DST_MEMBER, MESH_DST_OUTSIDE};

use crate::{
    map_model::{self, Cidr, Exclusion, PodSpec, PolicyRule},
    maps::{KernelMaps, MapsError, TunnelSettings},
};

pub use crate::maps::MapEntries;

/// Everything the agent wants the maps to say.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    pub tunnel: Option<TunnelSettings>,
    /// Enrolled pods by network-namespace cookie.
    pub pods: BTreeMap<u64, PodSpec>,
    pub exclusions: BTreeSet<Exclusion>,
    /// Identities of prefixes that are not enrolled pods (other nodes' pods, services...).
    /// A pod's own addresses take its identity and win over an entry here.
    pub identities: BTreeMap<Cidr, u32>,
    pub policy: BTreeSet<PolicyRule>,
    /// Destinations in the mesh besides the enrolled pods' own addresses (which are always in):
    /// every other workload address (as a host prefix) and every VIP of a service with a
    /// workload endpoint. Enrolled pods'
    /// TCP connects to anything else go out untouched (see [`mesh_common::maps::MESH_DESTINATIONS`]).
    pub mesh_destinations: BTreeSet<Cidr>,
}

/// Turns the desired state into map entries. Rejects reserved identities.
pub fn compile(desired: &DesiredState) -> Result<MapEntries, MapsError> {
    let mut out = MapEntries {
        tunnel: desired.tunnel.map(|t| t.config()),
        ..Default::default()
    };
    for ex in &desired.exclusions {
        out.exclusions.insert(ex.lpm_key());
    }
    for (cidr, &id) in &desired.identities {
        out.identities.insert(
            map_model::identity_key(cidr),
            map_model::workload_identity(id)?,
        );
    }
    out.mesh_destinations
        .insert(map_model::outside_mesh_key(), MESH_DST_OUTSIDE);
    for cidr in &desired.mesh_destinations {
        out.mesh_destinations
            .insert(map_model::mesh_destination_key(cidr), MESH_DST_MEMBER);
    }
    for rule in &desired.policy {
        map_model::workload_identity(rule.src_identity)?;
        let (k, v) = rule.entry();
        out.policy.insert(k, v);
    }
    for (&cookie, pod) in &desired.pods {
        let id = map_model::workload_identity(pod.identity_id)?;
        for cidr in pod.host_prefixes() {
            out.identities.insert(map_model::identity_key(&cidr), id);
            out.mesh_destinations
                .insert(map_model::mesh_destination_key(&cidr), MESH_DST_MEMBER);
        }
        for &port in &pod.plaintext_ports {
            out.guard_ports
                .insert(map_model::guard_port_key(cookie, port));
        }
        out.enrolled.insert(cookie, pod.record());
    }
    Ok(out)
}

/// How many entries [`reconcile`] wrote and deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub written: usize,
    pub deleted: usize,
}

/// Reads the maps and makes them equal `desired` (see [`apply_diff`]).
pub fn reconcile(
    maps: &mut impl KernelMaps,
    desired: &MapEntries,
) -> Result<ReconcileReport, MapsError> {
    let current = maps.read_entries()?;
    apply_diff(maps, &current, desired)
}

/// Turns `current` into `desired`: writes what is missing or different, deletes what is not
/// wanted. Pods are enrolled after their entries exist and unenrolled before theirs go. The
/// tunnel setting is only written, never cleared (an absent desired tunnel leaves it alone).
/// Mesh destinations are written longest prefix first, so the catch-all (prefix length 0) of a
/// first fill lands after every member: an enrolled pod never sees a partial trie that would
/// let a mesh destination out untouched.
pub fn apply_diff(
    maps: &mut impl KernelMaps,
    current: &MapEntries,
    desired: &MapEntries,
) -> Result<ReconcileReport, MapsError> {
    let mut r = ReconcileReport::default();
    // Pods that go away stop being captured first.
    for cookie in current.enrolled.keys() {
        if !desired.enrolled.contains_key(cookie) {
            maps.del_enrolled(*cookie)?;
            r.deleted += 1;
        }
    }
    if let Some(t) = desired.tunnel.filter(|t| current.tunnel != Some(*t)) {
        maps.put_tunnel_config(t)?;
        r.written += 1;
    }
    for (len, key) in desired.exclusions.difference(&current.exclusions) {
        maps.put_exclusion(*len, *key)?;
        r.written += 1;
    }
    for (&(len, key), &id) in &desired.identities {
        if current.identities.get(&(len, key)) != Some(&id) {
            maps.put_identity(len, key, id)?;
            r.written += 1;
        }
    }
    for (&key, &v) in &desired.policy {
        if current.policy.get(&key) != Some(&v) {
            maps.put_policy(key, v)?;
            r.written += 1;
        }
    }
    for key in desired.guard_ports.difference(&current.guard_ports) {
        maps.put_guard_port(*key)?;
        r.written += 1;
    }
    for (&(len, key), &v) in desired.mesh_destinations.iter().rev() {
        if current.mesh_destinations.get(&(len, key)) != Some(&v) {
            maps.put_mesh_destination(len, key, v)?;
            r.written += 1;
        }
    }
    // New or changed pods last: their identities and ports are in place.
    for (&cookie, pod) in &desired.enrolled {
        if current.enrolled.get(&cookie) != Some(pod) {
            maps.put_enrolled(cookie, *pod)?;
            r.written += 1;
        }
    }
    for (len, key) in current.exclusions.difference(&desired.exclusions) {
        maps.del_exclusion(*len, *key)?;
        r.deleted += 1;
    }
    for &(len, key) in current.identities.keys() {
        if !desired.identities.contains_key(&(len, key)) {
            maps.del_identity(len, key)?;
            r.deleted += 1;
        }
    }
    for key in current.policy.keys() {
        if !desired.policy.contains_key(key) {
            maps.del_policy(*key)?;
            r.deleted += 1;
        }
    }
    for key in current.guard_ports.difference(&desired.guard_ports) {
        maps.del_guard_port(*key)?;
        r.deleted += 1;
    }
    for &(len, key) in current.mesh_destinations.keys() {
        if !desired.mesh_destinations.contains_key(&(len, key)) {
            maps.del_mesh_destination(len, key)?;
            r.deleted += 1;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        map_model::{Action, PeerIdentity, Proto},
        maps::FakeMaps,
    };
    use mesh_common::{FailMode, MtlsMode};

    fn pod(id: u32, ip: &str) -> PodSpec {
        PodSpec {
            workload_id: id,
            identity_id: id,
            ip4: Some(ip.parse().expect("valid")),
            ip6: None,
            mtls: MtlsMode::Strict,
            fail: FailMode::Closed,
            plaintext_ports: vec![8081],
        }
    }

    fn desired() -> DesiredState {
        let mut d = DesiredState::default();
        d.pods.insert(1, pod(10, "10.0.0.1"));
        d.pods.insert(2, pod(11, "10.0.0.2"));
        d.exclusions.insert(Exclusion::Port(53));
        // Service VIPs (the pods' own addresses are added by `compile`).
        d.mesh_destinations
            .insert("10.96.0.10".parse().expect("valid"));
        d.mesh_destinations
            .insert("fd00::10".parse().expect("valid"));
        d.identities
            .insert("10.9.0.0/16".parse().expect("valid"), 30);
        d.policy.insert(PolicyRule {
            src_identity: 10,
            dst: PeerIdentity::Id(11),
            port: Some(80),
            proto: Proto::Tcp,
            action: Action::Deny,
        });
        d
    }

    #[test]
    fn converges_from_empty_and_is_idempotent() {
        let mut m = FakeMaps::default();
        let want = compile(&desired()).expect("valid");
        let r = reconcile(&mut m, &want).expect("fake");
        assert_eq!(r.deleted, 0);
        assert_eq!(m.entries(), want);
        assert!(m.denies(10, "10.0.0.2".parse().expect("valid"), 80, Proto::Tcp));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("valid");
        for inside in ["10.0.0.1", "10.0.0.2", "10.96.0.10", "fd00::10"] {
            assert!(!m.is_outside_mesh(ip(inside)), "{inside} is in the mesh");
        }
        for outside in ["10.0.0.3", "10.96.0.1", "10.9.1.1", "fd00::1"] {
            assert!(m.is_outside_mesh(ip(outside)), "{outside} is not");
        }
        let again = reconcile(&mut m, &want).expect("fake");
        assert_eq!(
            again,
            ReconcileReport::default(),
            "nothing to do the second time"
        );
    }

    #[test]
    fn removals_and_changes_are_applied_and_nothing_else_is_touched() {
        let mut m = FakeMaps::default();
        reconcile(&mut m, &compile(&desired()).expect("valid")).expect("fake");
        let mut d = desired();
        d.pods.remove(&2);
        d.exclusions.clear();
        d.policy.clear();
        if let Some(p) = d.pods.get_mut(&1) {
            p.mtls = MtlsMode::Permissive;
        }
        let want = compile(&d).expect("valid");
        let r = reconcile(&mut m, &want).expect("fake");
        assert_eq!(m.entries(), want);
        // Pod 2's record, identity, mesh destination and port; the exclusion; the policy entry.
        assert_eq!(r.deleted, 6, "{r:?}");
        assert_eq!(r.written, 1, "only pod 1's record changed: {r:?}");
        assert!(!m.is_excluded("8.8.8.8".parse().expect("valid"), 53));
    }

    #[test]
    fn an_empty_mesh_destination_map_captures_everything_and_the_catch_all_is_always_compiled() {
        let m = FakeMaps::default();
        assert!(!m.is_outside_mesh("8.8.8.8".parse().expect("valid")));
        let e = compile(&DesiredState::default()).expect("valid");
        assert_eq!(
            e.mesh_destinations,
            BTreeMap::from([(map_model::outside_mesh_key(), MESH_DST_OUTSIDE)])
        );
        let e = compile(&desired()).expect("valid");
        let (len, key) = map_model::mesh_destination_key(&"10.0.0.2".parse().expect("valid"));
        assert_eq!(e.mesh_destinations[&(len, key)], MESH_DST_MEMBER);
        assert_eq!(
            e.mesh_destinations.len(),
            5,
            "2 pods, 2 VIPs, the catch-all"
        );
    }

    #[test]
    fn pods_own_addresses_win_and_reserved_identities_are_rejected() {
        let mut d = desired();
        d.identities.insert("10.0.0.1".parse().expect("valid"), 99);
        let e = compile(&d).expect("valid");
        let (len, key) = map_model::identity_key(&"10.0.0.1".parse().expect("valid"));
        assert_eq!(e.identities[&(len, key)], 10);
        d.identities
            .insert("10.1.0.0/16".parse().expect("valid"), 1);
        assert!(compile(&d).is_err());
    }
}
