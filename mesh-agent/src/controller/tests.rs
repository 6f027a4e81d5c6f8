//! The pure parts of the controller: verdicts (the agents' own validation), the status to write
//! and when nothing needs writing, the Lease's remaining validity, the election's settings.

use std::time::{Duration, SystemTime};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::api::DynamicObject;
use serde_json::json;

use super::{
    leader::{LeaseOptions, default_identity, held_for},
    metrics::ControllerMetrics,
    status::*,
};
use crate::crd::CONDITION_ACCEPTED;

const ROOT: &str = "nodemesh-system";

fn object(kind: PolicyKind, ns: &str, generation: i64, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "security.nodemesh.io/v1alpha1",
        "kind": kind.kind(),
        "metadata": {"name": "p", "namespace": ns, "generation": generation},
        "spec": spec,
    }))
    .expect("a DynamicObject")
}

fn with_status(mut obj: DynamicObject, status: &crate::crd::PolicyStatus) -> DynamicObject {
    obj.data["status"] = serde_json::to_value(status).expect("serializable");
    obj
}

fn ap(spec: serde_json::Value) -> DynamicObject {
    object(PolicyKind::AuthorizationPolicy, "shop", 3, spec)
}

#[test]
fn a_valid_policy_is_accepted() {
    let v = verdict(
        PolicyKind::AuthorizationPolicy,
        &ap(json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["web"]}}]}]})),
        ROOT,
    );
    assert_eq!(
        v,
        Verdict {
            accepted: true,
            reason: REASON_ACCEPTED,
            message: "enforced by the node agents".into()
        }
    );
}

#[test]
fn a_policy_the_agents_refuse_is_not_accepted_and_says_why_and_what_happens() {
    let v = verdict(
        PolicyKind::AuthorizationPolicy,
        &ap(json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]})),
        ROOT,
    );
    assert!(!v.accepted);
    assert_eq!(v.reason, REASON_INVALID);
    assert!(
        v.message.starts_with(
            "spec.rules[0].from[0].source.ipBlocks[0]: `10.0.0.0/33` is not an IP address or CIDR"
        ),
        "{}",
        v.message
    );
    assert!(v.message.contains("fail closed"), "{}", v.message);
    // Every error is named, so they can be fixed at once.
    let two = verdict(
        PolicyKind::AuthorizationPolicy,
        &ap(
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["x"], "principals": ["spiffe://a/b"]}}]}]}),
        ),
        ROOT,
    );
    assert!(
        two.message.contains("ipBlocks[0]") && two.message.contains("principals[0]"),
        "{}",
        two.message
    );
}

#[test]
fn an_invalid_audit_policy_is_said_to_be_left_out() {
    let v = verdict(
        PolicyKind::AuthorizationPolicy,
        &ap(json!({"action": "AUDIT", "rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]})),
        ROOT,
    );
    assert!(!v.accepted);
    assert!(
        v.message.contains("leave this AUDIT policy out"),
        "{}",
        v.message
    );
}

#[test]
fn warnings_keep_a_policy_accepted_and_are_named() {
    let v = verdict(
        PolicyKind::AuthorizationPolicy,
        &ap(json!({"action": "DENY"})),
        ROOT,
    );
    assert!(v.accepted, "{v:?}");
    assert!(
        v.message.contains("with warnings") && v.message.contains("never matches"),
        "{}",
        v.message
    );
}

#[test]
fn an_object_that_does_not_read_as_the_policy_type_is_unreadable() {
    let v = verdict(
        PolicyKind::AuthorizationPolicy,
        &ap(json!({"rules": "not a list"})),
        ROOT,
    );
    assert_eq!((v.accepted, v.reason), (false, REASON_UNREADABLE));
    assert!(
        v.message.contains("DENY of every connection"),
        "{}",
        v.message
    );
    let pa = object(
        PolicyKind::PeerAuthentication,
        "shop",
        1,
        json!({"mtls": 7}),
    );
    let v = verdict(PolicyKind::PeerAuthentication, &pa, ROOT);
    assert_eq!((v.accepted, v.reason), (false, REASON_UNREADABLE));
    assert!(v.message.contains("STRICT"), "{}", v.message);
}

#[test]
fn peer_authentications_are_judged_with_the_root_namespace() {
    let spec = json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}});
    let in_shop = object(PolicyKind::PeerAuthentication, "shop", 1, spec.clone());
    assert!(verdict(PolicyKind::PeerAuthentication, &in_shop, ROOT).accepted);
    let in_root = object(PolicyKind::PeerAuthentication, ROOT, 1, spec);
    let v = verdict(PolicyKind::PeerAuthentication, &in_root, ROOT);
    assert!(!v.accepted);
    assert!(v.message.contains("the agents ignore it"), "{}", v.message);
    let no_selector = object(
        PolicyKind::PeerAuthentication,
        "shop",
        1,
        json!({"portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
    );
    let v = verdict(PolicyKind::PeerAuthentication, &no_selector, ROOT);
    assert!(
        !v.accepted && v.message.contains("STRICT mTLS"),
        "{}",
        v.message
    );
}

#[test]
fn messages_are_cut_to_what_the_api_server_takes() {
    let blocks: Vec<String> = (0..3000).map(|i| format!("bad-{i}")).collect();
    let v = verdict(
        PolicyKind::AuthorizationPolicy,
        &ap(json!({"rules": [{"from": [{"source": {"ipBlocks": blocks}}]}]})),
        ROOT,
    );
    assert!(v.message.len() <= MAX_MESSAGE && v.message.ends_with("..."));
}

#[test]
fn the_status_carries_the_generation_and_moves_the_transition_time_only_on_change() {
    let obj = ap(json!({}));
    let accepted = Verdict {
        accepted: true,
        reason: REASON_ACCEPTED,
        message: "ok".into(),
    };
    let t1 = Timestamp::from_second(1_000).expect("time");
    let t2 = Timestamp::from_second(2_000).expect("time");
    let first = desired_status(&obj, &accepted, t1);
    assert_eq!(first.observed_generation, Some(3));
    let c = &first.conditions[0];
    assert_eq!(
        (
            c.type_.as_str(),
            c.status.as_str(),
            c.reason.as_str(),
            c.observed_generation
        ),
        (CONDITION_ACCEPTED, "True", "Accepted", Some(3))
    );
    assert!(!up_to_date(&obj, &first), "no status yet");
    let written = with_status(obj.clone(), &first);
    assert!(up_to_date(
        &written,
        &desired_status(&written, &accepted, t2)
    ));
    // Same verdict later: the transition time stays.
    assert_eq!(
        desired_status(&written, &accepted, t2).conditions[0]
            .last_transition_time
            .0,
        t1
    );
    // A new generation must be written, still without a transition.
    let mut newer = written.clone();
    newer.metadata.generation = Some(4);
    let d = desired_status(&newer, &accepted, t2);
    assert!(!up_to_date(&newer, &d));
    assert_eq!(
        (
            d.observed_generation,
            d.conditions[0].last_transition_time.0
        ),
        (Some(4), t1)
    );
    // Refused: a transition.
    let refused = Verdict {
        accepted: false,
        reason: REASON_INVALID,
        message: "bad".into(),
    };
    let d = desired_status(&written, &refused, t2);
    assert!(!up_to_date(&written, &d));
    assert_eq!(
        (
            d.conditions[0].status.as_str(),
            d.conditions[0].last_transition_time.0
        ),
        ("False", t2)
    );
}

#[test]
fn the_status_patch_is_an_apply_of_status_only() {
    let obj = ap(json!({}));
    let status = desired_status(
        &obj,
        &Verdict {
            accepted: false,
            reason: REASON_INVALID,
            message: "why".into(),
        },
        Timestamp::from_second(1_000).expect("time"),
    );
    let body = status_patch(PolicyKind::AuthorizationPolicy, &status);
    assert_eq!(body["apiVersion"], "security.nodemesh.io/v1alpha1");
    assert_eq!(body["kind"], "AuthorizationPolicy");
    assert_eq!(body.as_object().map(|o| o.len()), Some(3), "{body}");
    assert_eq!(body["status"]["observedGeneration"], 3);
    assert_eq!(
        body["status"]["conditions"][0]["lastTransitionTime"],
        "1970-01-01T00:16:40Z"
    );
    assert_eq!(body["status"]["conditions"][0]["message"], "why");
}

#[test]
fn an_unreadable_status_counts_as_none() {
    let mut obj = ap(json!({}));
    obj.data["status"] = json!({"conditions": "garbage"});
    assert!(current_status(&obj).is_none());
    let d = desired_status(
        &obj,
        &Verdict {
            accepted: true,
            reason: REASON_ACCEPTED,
            message: "ok".into(),
        },
        Timestamp::from_second(5).expect("time"),
    );
    assert!(!up_to_date(&obj, &d));
}

fn lease(holder: &str, renewed: SystemTime, seconds: i32) -> Lease {
    Lease {
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(
                Timestamp::try_from(renewed).expect("a timestamp"),
            )),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_lease_is_held_until_its_renew_time_plus_duration() {
    let now = SystemTime::now();
    let l = lease("me", now - Duration::from_secs(5), 15);
    let left = held_for(&l, "me", now).expect("held");
    assert!(
        (Duration::from_secs(9)..=Duration::from_secs(10)).contains(&left),
        "{left:?}"
    );
    assert_eq!(held_for(&l, "other", now), None, "another holder");
    assert_eq!(
        held_for(&lease("me", now - Duration::from_secs(16), 15), "me", now),
        None,
        "expired"
    );
    assert_eq!(held_for(&Lease::default(), "me", now), None, "empty");
}

#[test]
fn election_settings_are_checked() {
    let ok = LeaseOptions {
        name: "l".into(),
        namespace: "ns".into(),
        identity: "me".into(),
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
    };
    assert!(ok.validate().is_ok());
    for bad in [
        LeaseOptions {
            renew_deadline: Duration::from_secs(15),
            ..ok.clone()
        },
        LeaseOptions {
            renew_deadline: Duration::ZERO,
            ..ok.clone()
        },
        LeaseOptions {
            identity: String::new(),
            ..ok.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert_eq!(default_identity(Some("ctl-abc".into())), "ctl-abc");
    let fallback = default_identity(None);
    assert!(
        fallback.ends_with(&format!("-{}", std::process::id())),
        "{fallback}"
    );
}

#[test]
fn metrics_count_leadership_policies_and_writes() {
    let mut registry = crate::metrics::MetricsRegistry::new(&Default::default());
    let m = ControllerMetrics::new(registry.nodemesh());
    m.set_leader(true);
    m.set_leader(true);
    m.set_policies(PolicyKind::AuthorizationPolicy, 2, 1);
    m.status_write(PolicyKind::PeerAuthentication, false);
    m.api_error("watch", "authorizationpolicies", 403);
    let text = registry.encode(crate::metrics::Format::Prometheus);
    for line in [
        "nodemesh_controller_leader 1",
        "nodemesh_controller_leader_acquired_total 1",
        "nodemesh_controller_policies{kind=\"AuthorizationPolicy\",accepted=\"true\"} 2",
        "nodemesh_controller_policies{kind=\"AuthorizationPolicy\",accepted=\"false\"} 1",
        "nodemesh_controller_status_writes_total{kind=\"PeerAuthentication\",result=\"error\"} 1",
        "nodemesh_controller_kubernetes_errors_total{operation=\"watch\",resource=\"authorizationpolicies\",code=\"403\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    m.set_leader(false);
    assert!(!m.is_leader());
}
