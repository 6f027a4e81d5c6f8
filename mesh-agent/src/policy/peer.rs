//! `PeerAuthentication`: validation and the effective mTLS mode of a (workload, port).

use std::collections::BTreeMap;

use super::compile::{check_header, policy_ref, selector_labels};
use super::error::{Findings, PolicyKind, PolicyRef, Problem, ValidationError};
use super::spec::{Labels, MtlsModeSpec, MutualTls, PeerAuthentication};

/// The effective mTLS mode of an inbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Only mesh (mTLS) connections are accepted.
    Strict,
    /// Mesh and plaintext connections are accepted. Istio's default, and nodemesh's.
    Permissive,
}

/// Which level decided an effective mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsLevel {
    /// No policy set a mode: the default, PERMISSIVE.
    Default,
    /// A policy in the root namespace without a selector.
    Mesh,
    /// A policy in the workload's namespace without a selector.
    Namespace,
    /// A policy in the workload's namespace whose selector matches the workload.
    Workload,
    /// An entry of that workload policy's `portLevelMtls`.
    Port,
}

/// The effective mTLS mode for one (workload, port), with the policy that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsResolution {
    pub mode: MtlsMode,
    pub level: MtlsLevel,
    pub policy: Option<PolicyRef>,
}

/// A validated `PeerAuthentication`. `mode: None` is UNSET (inherit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPeerAuthentication {
    pub policy: PolicyRef,
    pub(crate) selector: Option<Labels>,
    pub(crate) mode: Option<MtlsMode>,
    pub(crate) ports: BTreeMap<u16, MtlsMode>,
}

fn mode_of(f: &mut Findings, path: &str, mtls: Option<&MutualTls>) -> Result<Option<MtlsMode>, ()> {
    match mtls.map(|m| m.mode).unwrap_or_default() {
        MtlsModeSpec::Unset => Ok(None),
        MtlsModeSpec::Strict => Ok(Some(MtlsMode::Strict)),
        MtlsModeSpec::Permissive => Ok(Some(MtlsMode::Permissive)),
        MtlsModeSpec::Disable => {
            f.error(path, Problem::MtlsDisable);
            Err(())
        }
    }
}

/// Validates and compiles one `PeerAuthentication` (checks that need the root namespace are
/// made by [`super::PolicySet::compile`]).
pub fn compile_peer_authentication(
    policy: &PeerAuthentication,
) -> Result<CompiledPeerAuthentication, Vec<ValidationError>> {
    let policy_ref = policy_ref(PolicyKind::PeerAuthentication, &policy.metadata);
    let mut f = Findings::new(policy_ref.clone());
    check_header(
        &mut f,
        &policy.api_version,
        &policy.kind,
        "PeerAuthentication",
        &policy.metadata,
    );
    let spec = &policy.spec;
    let selector = selector_labels(&spec.selector);
    let mode = mode_of(&mut f, "spec.mtls.mode", spec.mtls.as_ref()).unwrap_or(None);
    let mut ports = BTreeMap::new();
    if let Some(port_level) = &spec.port_level_mtls {
        if selector.is_none() {
            f.error("spec.portLevelMtls", Problem::PortLevelWithoutSelector);
        }
        if port_level.is_empty() {
            f.error("spec.portLevelMtls", Problem::EmptyList("portLevelMtls"));
        }
        for (&port, mtls) in port_level {
            let path = format!("spec.portLevelMtls.{port}");
            let Some(port) = u16::try_from(port).ok().filter(|p| *p != 0) else {
                f.error(path, Problem::BadPortKey { value: port });
                continue;
            };
            if let Ok(Some(mode)) = mode_of(&mut f, &format!("{path}.mode"), Some(mtls)) {
                ports.insert(port, mode);
            }
        }
    }
    if f.has_errors() {
        return Err(f.list);
    }
    Ok(CompiledPeerAuthentication {
        policy: policy_ref,
        selector,
        mode,
        ports,
    })
}

/// The fail-closed stand-in for an invalid `PeerAuthentication`: STRICT at the level its scope
/// gives it, so a broken policy never leaves a workload more open than a valid one could.
pub(crate) fn strict_stand_in(policy: &PeerAuthentication) -> CompiledPeerAuthentication {
    CompiledPeerAuthentication {
        policy: policy_ref(PolicyKind::PeerAuthentication, &policy.metadata),
        selector: selector_labels(&policy.spec.selector),
        mode: Some(MtlsMode::Strict),
        ports: BTreeMap::new(),
    }
}
