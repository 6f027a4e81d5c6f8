//! Peer certificates: a DER blob into `identity::tls::spiffe_id_of` (the client identity the
//! inbound side reads from a verified certificate) and `verify_chain` against a fixed root.
//! The seeds are real certificates (docs/fuzzing.md says how they were made).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mesh_agent::identity::{
    TrustBundle,
    tls::{spiffe_id_of, verify_chain},
};
use rustls_pki_types::CertificateDer;

/// The root the seed certificates were signed by.
const ROOT: &[u8] = include_bytes!("../seeds/root.der");

fuzz_target!(|data: &[u8]| {
    let cert = CertificateDer::from(data);
    if let Ok(id) = spiffe_id_of(&cert) {
        assert!(id.to_string().starts_with("spiffe://"));
    }
    let bundle = TrustBundle::new(
        "cluster.local",
        vec![CertificateDer::from(ROOT).into_owned()],
    );
    // A fixed time inside the seeds' validity (2026-12-07), so runs are reproducible.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_601_600);
    let _ = verify_chain(&bundle, &[cert], now);
});
