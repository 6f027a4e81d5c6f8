//! The L4 policy engine: Istio's `AuthorizationPolicy` and `PeerAuthentication` (L4 subset) under
//! `security.nodemesh.io`, validated into a compiled form and evaluated with Istio's semantics.
//!
//! This is the pure bottom layer (no I/O, no async): [`spec`] parses, [`PolicySet::compile`]
//! validates, [`PolicySet::authorize`] decides one connection and [`PolicySet::mtls_mode`] gives
//! the effective mTLS mode of a workload port. The tunnel reaches it through an adapter that
//! turns its TLS peer and addresses into [`ConnectionAttrs`]. Semantics, supported and rejected
//! fields: `docs/policy.md`.

mod compile;
mod error;
mod eval;
mod matcher;
mod peer;
pub mod schema;
pub mod spec;

pub use compile::{
    CompiledAuthorizationPolicy, Effect, L4_CONDITION_KEYS, compile_authorization_policy,
};
pub use error::{PolicyKind, PolicyRef, Problem, Severity, ValidationError};
pub use eval::{
    ConnectionAttrs, DEFAULT_ROOT_NAMESPACE, Decision, PeerIdentity, PolicySet, Reason, RuleMatch,
    WorkloadMeta,
};
pub use peer::{
    CompiledPeerAuthentication, MtlsLevel, MtlsMode, MtlsResolution, compile_peer_authentication,
};

#[cfg(test)]
mod model_test;
#[cfg(test)]
mod tests;
