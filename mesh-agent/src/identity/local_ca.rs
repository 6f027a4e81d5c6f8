//! A certificate authority kept in a local directory, for `mesh-agent local` and tests.
//!
//! Files: `root-cert.pem` (the self-signed root, the trust bundle) and `root-key.pem` (its
//! ECDSA P-256 key, mode 0600). Both are created on first use. The issuer of a leaf is rebuilt
//! from the stored key and the fixed root subject, so signing needs no certificate parser; the
//! authority key identifier is derived from the key and therefore matches the stored root.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, string::Ia5String,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};

use super::{
    CertificateProvider, DEFAULT_CERT_TTL, IdentityError, SpiffeId, TrustBundle, WorkloadCert,
};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Root lifetime: ten years. The local CA is for labs and single machines; rotation is by adding
/// a second root to the bundle (see [`TrustBundle`]).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaves are back-dated by this much to tolerate clock skew between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const ROOT_ORG: &str = "nodemesh";

/// The local CA: a root key and certificate in a directory.
pub struct LocalCa {
    dir: PathBuf,
    trust_domain: String,
    key: KeyPair,
    root: CertificateDer<'static>,
    /// Extra roots to trust besides ours (rotation, or another mesh's root).
    extra_roots: Vec<CertificateDer<'static>>,
    ttl: Duration,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn root_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ROOT_ORG);
    dn.push(
        DnType::CommonName,
        format!("nodemesh root CA {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Provider {
            identity: "-".into(),
            reason: "the system random generator failed".into(),
        })?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

impl LocalCa {
    /// Opens the CA in `dir`, creating the directory, root key (0600) and root certificate when
    /// absent.
    pub fn open(dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        let dir_err = |source| IdentityError::CaDir {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(dir_err)?;
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_path = dir.join(ROOT_CERT_FILE);
        let corrupt = |reason: String| IdentityError::CaCorrupt {
            path: dir.to_path_buf(),
            reason,
        };
        let (key, root) = if key_path.exists() {
            let mode = fs::metadata(&key_path)
                .map_err(dir_err)?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                warn!(path = %key_path.display(), mode = format!("{mode:o}"),
                    "CA key is readable by group or others; setting mode 0600");
                fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))
                    .map_err(dir_err)?;
            }
            let key_pem = fs::read_to_string(&key_path).map_err(dir_err)?;
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| corrupt(format!("{ROOT_KEY_FILE}: {e}")))?;
            let cert_pem = fs::read(&cert_path).map_err(dir_err)?;
            let root = parse_pem_cert(&cert_pem)
                .ok_or_else(|| corrupt(format!("{ROOT_CERT_FILE}: no PEM certificate")))?;
            (key, root)
        } else {
            let key = KeyPair::generate().map_err(|source| IdentityError::Sign {
                identity: "root CA".into(),
                source,
            })?;
            let mut params = root_params(trust_domain);
            let now = SystemTime::now();
            params.not_before = to_offset(now - CLOCK_SKEW);
            params.not_after = to_offset(now + ROOT_TTL);
            params.serial_number = Some(random_serial()?);
            let cert = params
                .self_signed(&key)
                .map_err(|source| IdentityError::Sign {
                    identity: "root CA".into(),
                    source,
                })?;
            write_private(&key_path, key.serialize_pem().as_bytes()).map_err(dir_err)?;
            fs::write(&cert_path, cert.pem()).map_err(dir_err)?;
            info!(dir = %dir.display(), trust_domain, "created a new local root CA");
            (key, cert.der().clone())
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            key,
            root,
            extra_roots: Vec::new(),
            ttl: DEFAULT_CERT_TTL,
        })
    }

    /// Leaf lifetime for [`CertificateProvider::issue`].
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Also trusts `root` (a second CA during rotation, or a peer mesh's root).
    pub fn trust_also(mut self, root: CertificateDer<'static>) -> Self {
        self.extra_roots.push(root);
        self
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Signs a leaf for `identity` valid from `not_before` to `not_after` (tests use this to
    /// make expired certificates).
    pub fn issue_with_validity(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let sign_err = |source| IdentityError::Sign {
            identity: identity.to_string(),
            source,
        };
        let leaf_key = KeyPair::generate().map_err(sign_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, identity.trust_domain());
        let uri = Ia5String::try_from(identity.to_string()).map_err(sign_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        params.serial_number = Some(random_serial()?);
        let issuer = Issuer::new(root_params(&self.trust_domain), &self.key);
        let cert = params.signed_by(&leaf_key, &issuer).map_err(sign_err)?;
        Ok(WorkloadCert::new(
            identity.clone(),
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
            not_before,
            not_after,
        ))
    }
}

impl CertificateProvider for LocalCa {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        let now = SystemTime::now();
        self.issue_with_validity(identity, now - CLOCK_SKEW, now + self.ttl)
    }

    fn trust_bundle(&self) -> TrustBundle {
        let mut roots = vec![self.root.clone()];
        roots.extend(self.extra_roots.iter().cloned());
        TrustBundle::new(self.trust_domain.clone(), roots)
    }
}

/// Writes a file readable by its owner only, created with mode 0600 (never briefly wider).
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// The first `CERTIFICATE` block of a PEM file.
fn parse_pem_cert(pem: &[u8]) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_root_once_with_private_key_and_reuses_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = LocalCa::open(dir.path(), "cluster.local").expect("create");
        let mode = fs::metadata(dir.path().join(ROOT_KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = LocalCa::open(dir.path(), "cluster.local").expect("reopen");
        assert_eq!(ca.root(), again.root(), "the root is created once");

        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/a"
            .parse()
            .expect("id");
        let cert = again.issue(&id).await.expect("issue");
        assert_eq!(cert.chain.len(), 1);
        let life = cert
            .not_after
            .duration_since(cert.not_before)
            .expect("order");
        assert_eq!(life, DEFAULT_CERT_TTL + CLOCK_SKEW);
        let parsed = super::super::tls::spiffe_id_of(&cert.chain[0]).expect("SAN");
        assert_eq!(parsed, id);
        // Signed by the root created by the first instance.
        let bundle = ca.trust_bundle();
        super::super::tls::verify_chain(&bundle, &cert.chain, SystemTime::now())
            .expect("chains to the stored root");
    }

    #[tokio::test]
    async fn bundle_with_two_roots_accepts_both_cas() {
        let (d1, d2) = (
            tempfile::tempdir().expect("tmp"),
            tempfile::tempdir().expect("tmp"),
        );
        let old = LocalCa::open(d1.path(), "cluster.local").expect("old");
        let new = LocalCa::open(d2.path(), "cluster.local").expect("new");
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
        let from_new = new.issue(&id).await.expect("cert");
        let now = SystemTime::now();
        assert!(
            super::super::tls::verify_chain(&old.trust_bundle(), &from_new.chain, now).is_err()
        );
        let old = old.trust_also(new.root().clone());
        assert_eq!(old.trust_bundle().roots.len(), 2);
        super::super::tls::verify_chain(&old.trust_bundle(), &from_new.chain, now)
            .expect("rotation: the new root is trusted");
        let from_old = old.issue(&id).await.expect("cert");
        super::super::tls::verify_chain(&old.trust_bundle(), &from_old.chain, now)
            .expect("the old root still is");
    }
}
