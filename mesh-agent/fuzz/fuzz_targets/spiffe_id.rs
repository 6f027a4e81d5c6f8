//! SPIFFE IDs: `SpiffeId::from_str` (certificates' URI SANs, configuration) and the policy
//! engine's `PeerIdentity::from_spiffe_uri`. Checks: an accepted ID prints back as the input,
//! builds again from its parts, and the policy engine reads the same three parts from it (the
//! identity a certificate proves is the one policies match).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    identity::{SpiffeId, tls::identity_server_name},
    policy::PeerIdentity,
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let peer = PeerIdentity::from_spiffe_uri(s);
    match s.parse::<SpiffeId>() {
        Ok(id) => {
            assert_eq!(id.to_string(), s);
            assert_eq!(
                SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account()).as_ref(),
                Ok(&id)
            );
            let peer = peer.expect("the policy engine reads every valid SPIFFE ID");
            assert_eq!(
                (
                    peer.trust_domain.as_str(),
                    peer.namespace.as_str(),
                    peer.service_account.as_str()
                ),
                (id.trust_domain(), id.namespace(), id.service_account())
            );
            assert_eq!(peer.principal(), id.principal());
            let sni = identity_server_name(&id);
            assert!(sni.len() <= 63 + ".id.nodemesh.invalid".len(), "{sni}");
        }
        Err(e) => {
            // The message quotes at most a bounded part of the input.
            assert!(e.to_string().len() < 2 * 2048 + 512);
        }
    }
});
