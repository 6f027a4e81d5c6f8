//! Reading a certificate signing request: PEM PKCS#10, signature verified with the key it
//! carries (proof that the caller holds the private key), exactly one SAN and that a URI.

use rustls::pki_types::{CertificateSigningRequestDer, pem::PemObject};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};

use super::authorize::Refusal;

/// What the CA takes from a CSR: the public key and the requested identity. Everything else
/// (subject, requested key usages) is ignored; the CA decides those.
#[derive(Debug)]
pub struct Csr {
    /// DER `SubjectPublicKeyInfo`.
    pub public_key: Vec<u8>,
    /// The only SAN, a URI (checked as a SPIFFE ID afterwards).
    pub uri: String,
}

pub fn parse(pem: &str) -> Result<Csr, Refusal> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Refusal::CsrInvalid(format!("not a PEM `CERTIFICATE REQUEST`: {e}")))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| Refusal::CsrInvalid(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(Refusal::CsrInvalid(
            "trailing bytes after the request".into(),
        ));
    }
    csr.verify_signature().map_err(|e| {
        Refusal::CsrInvalid(format!(
            "its signature does not verify with the key it carries ({e})"
        ))
    })?;
    let mut sans = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            sans.extend(san.general_names.iter());
        }
    }
    let uri = match sans.as_slice() {
        [GeneralName::URI(uri)] => (*uri).to_string(),
        [] => {
            return Err(Refusal::IdentityInvalid(
                "the CSR has no subject alternative name (expected one SPIFFE ID URI)".into(),
            ));
        }
        [other] => {
            return Err(Refusal::IdentityInvalid(format!(
                "the CSR's subject alternative name is {other}, not a SPIFFE ID URI"
            )));
        }
        many => {
            return Err(Refusal::IdentityInvalid(format!(
                "the CSR has {} subject alternative names; exactly one SPIFFE ID URI is accepted",
                many.len()
            )));
        }
    };
    Ok(Csr {
        public_key: csr.certification_request_info.subject_pki.raw.to_vec(),
        uri,
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType, string::Ia5String};

    use super::*;

    fn csr(sans: Vec<SanType>) -> (String, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let pem = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        (pem, key)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).expect("ia5"))
    }

    #[test]
    fn takes_the_key_and_the_one_uri() {
        let (pem, key) = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
        let parsed = parse(&pem).expect("valid");
        assert_eq!(parsed.uri, "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(
            parsed.public_key,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
    }

    #[test]
    fn refuses_bad_signatures_and_other_sans() {
        // Flip a byte of the signature (the last bytes of the DER).
        let (pem, _) = csr(vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).expect("der");
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x55;
        let tampered = pem_of(&bytes);
        let err = parse(&tampered).expect_err("tampered");
        assert_eq!(err.reason(), "csr_invalid", "{err}");
        assert!(err.to_string().contains("signature"), "{err}");

        assert_eq!(
            parse("garbage").expect_err("garbage").reason(),
            "csr_invalid"
        );
        for sans in [
            vec![],
            vec![SanType::DnsName(
                Ia5String::try_from("a.example").expect("dns"),
            )],
            vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                uri("spiffe://cluster.local/ns/a/sa/c"),
            ],
        ] {
            let (pem, _) = csr(sans);
            assert_eq!(
                parse(&pem).expect_err("bad sans").reason(),
                "identity_invalid"
            );
        }
    }

    fn pem_of(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
    }
}
