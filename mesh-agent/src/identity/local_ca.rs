//! A certificate authority kept in a local directory, for `mesh-agent local` and tests.
//!
//! Two layouts are read (Identity in docs/architecture.md):
//!
//! - **nodemesh**: `root-cert.pem` and `root-key.pem`. The first certificate of `root-cert.pem`
//!   signs, with `root-key.pem`; every certificate in `root-cert.pem` is trusted (the trust
//!   bundle). Both files are created on first use (ECDSA P-256 key, mode 0600).
//! - **Istio `cacerts`** (chosen when `ca-key.pem` exists): `ca-cert.pem` signs with `ca-key.pem`,
//!   `root-cert.pem` is the trust bundle, and `cert-chain.pem` (optional) holds the certificates
//!   sent after each leaf (`ca-cert.pem` and any further intermediates; roots in the bundle are
//!   dropped from it). Without `cert-chain.pem`, `ca-cert.pem` is sent unless it is itself in the
//!   bundle.
//!
//! Leaves name the signing certificate's own subject as their issuer and its subject key
//! identifier (if it has one) as their authority key identifier, so any verifier that trusts the bundle (another
//! mesh sharing the root, `openssl verify`) accepts them. Keys: ECDSA P-256 or P-384, or RSA of
//! 2048 to 4096 bits, as PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
//! (`EC PRIVATE KEY`) PEM, unencrypted. Opening refuses a key that does not match the signing
//! certificate, a signing certificate or bundle root that is not a CA or is outside its validity,
//! and a CA whose certificates would not verify: a probe leaf is issued and verified against the
//! bundle before the CA is used.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, string::Ia5String,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer, pem::PemObject,
};
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::{
    CertificateProvider, DEFAULT_CERT_TTL, IdentityError, SpiffeId, TrustBundle, WorkloadCert,
};

/// The trust bundle (both layouts); in the nodemesh layout its first certificate also signs.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The key of the first certificate of `root-cert.pem` (nodemesh layout).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// The signing CA certificate (Istio `cacerts` layout).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing CA key (Istio `cacerts` layout); its presence selects that layout.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Certificates sent after each leaf (Istio `cacerts` layout, optional).
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Root lifetime: ten years. The local CA is for labs and single machines; rotation is by adding
/// a second root to the bundle (see [`TrustBundle`]).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Leaves are back-dated by this much to tolerate clock skew between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const ROOT_ORG: &str = "nodemesh";

/// The local CA: a signing key and certificate, and the roots it trusts, in a directory.
pub struct LocalCa {
    dir: PathBuf,
    trust_domain: String,
    /// The signing certificate's subject, key identifier and key usages, with its key.
    issuer: Issuer<'static, KeyPair>,
    /// When the signing certificate expires: leaves never outlive it.
    signer_not_after: SystemTime,
    /// Whether the signing certificate has a subject key identifier: leaves then carry it as
    /// their authority key identifier, and carry none otherwise (a made-up one would match
    /// nothing).
    signer_has_key_id: bool,
    /// Sent after each leaf: intermediates between the signer and the bundle (often empty).
    chain: Vec<CertificateDer<'static>>,
    /// Every certificate of `root-cert.pem`, the first one first.
    roots: Vec<CertificateDer<'static>>,
    /// Extra roots to trust besides ours (rotation, or another mesh's root).
    extra_roots: Vec<CertificateDer<'static>>,
    ttl: Duration,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
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

/// Where the CA's files are read from: a directory, or named blobs in memory (a Kubernetes
/// Secret's data, keyed by file name) shown under a label path in errors.
#[derive(Clone, Copy)]
enum Source<'a> {
    Dir,
    Memory(&'a BTreeMap<String, Vec<u8>>),
}

impl Source<'_> {
    fn read(&self, path: &Path) -> Result<Vec<u8>, IdentityError> {
        match self {
            Source::Dir => read_file(path),
            Source::Memory(files) => file_name(path)
                .and_then(|name| files.get(name))
                .cloned()
                .ok_or_else(|| rejected(path, "it is missing".into())),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        match self {
            Source::Dir => path.exists(),
            Source::Memory(files) => file_name(path).is_some_and(|name| files.contains_key(name)),
        }
    }
}

fn file_name(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

/// Which files hold what, once the layout is known.
struct Layout<'a> {
    source: Source<'a>,
    signer_cert: PathBuf,
    signer_key: PathBuf,
    /// `Some` in the Istio layout (the file may be absent).
    chain: Option<PathBuf>,
    bundle: PathBuf,
}

impl LocalCa {
    /// Opens the CA in `dir`. With `ca-key.pem` present, the Istio `cacerts` layout is read;
    /// otherwise `root-cert.pem` and `root-key.pem`, both created (with the directory) when
    /// neither exists. Refuses files that would yield certificates nobody can verify.
    pub fn open(dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        // Created private (0700): it holds the signing key. An existing directory keeps its
        // mode (an operator's Secret mount); the key file's own mode is checked below.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| IdentityError::CaDir {
                path: dir.to_path_buf(),
                source,
            })?;
        let layout = if dir.join(CA_KEY_FILE).exists() {
            Layout {
                source: Source::Dir,
                signer_cert: dir.join(CA_CERT_FILE),
                signer_key: dir.join(CA_KEY_FILE),
                chain: Some(dir.join(CERT_CHAIN_FILE)),
                bundle: dir.join(ROOT_CERT_FILE),
            }
        } else {
            let cert = dir.join(ROOT_CERT_FILE);
            let key = dir.join(ROOT_KEY_FILE);
            if !key.exists() {
                if cert.exists() {
                    return Err(rejected(
                        &cert,
                        format!(
                            "there is no key for it: put its key in {ROOT_KEY_FILE} (or use the \
                             Istio layout: {CA_CERT_FILE}, {CA_KEY_FILE}, {ROOT_CERT_FILE}), or \
                             move it aside to create a new CA"
                        ),
                    ));
                }
                create_root(dir, trust_domain)?;
            }
            Layout {
                source: Source::Dir,
                signer_cert: cert.clone(),
                signer_key: key,
                chain: None,
                bundle: cert,
            }
        };
        Self::load(dir, trust_domain, &layout)
    }

    /// Opens a CA held in memory: `files` maps file names to contents, in either layout (Istio
    /// `cacerts` when `ca-key.pem` is present, else `root-cert.pem` + `root-key.pem`); nothing is
    /// created. `label` names where the files came from in errors and logs (e.g. `secret
    /// nodemesh-system/nodemesh-cacerts`). The same checks as [`LocalCa::open`] apply.
    pub fn from_files(
        label: &Path,
        files: &BTreeMap<String, Vec<u8>>,
        trust_domain: &str,
    ) -> Result<Self, IdentityError> {
        let source = Source::Memory(files);
        let layout = if files.contains_key(CA_KEY_FILE) {
            Layout {
                source,
                signer_cert: label.join(CA_CERT_FILE),
                signer_key: label.join(CA_KEY_FILE),
                chain: Some(label.join(CERT_CHAIN_FILE)),
                bundle: label.join(ROOT_CERT_FILE),
            }
        } else {
            Layout {
                source,
                signer_cert: label.join(ROOT_CERT_FILE),
                signer_key: label.join(ROOT_KEY_FILE),
                chain: None,
                bundle: label.join(ROOT_CERT_FILE),
            }
        };
        Self::load(label, trust_domain, &layout)
    }

    fn load(dir: &Path, trust_domain: &str, layout: &Layout) -> Result<Self, IdentityError> {
        let now = SystemTime::now();
        let key = read_key(layout.source, &layout.signer_key, layout.chain.is_none())?;
        let signer = read_certs(layout.source, &layout.signer_cert)?.swap_remove(0);
        let signer_not_after = check_ca(&layout.signer_cert, &signer, now)?;
        let roots = read_certs(layout.source, &layout.bundle)?;
        for root in &roots {
            check_ca(&layout.bundle, root, now)?;
        }
        check_key_matches(layout, &signer, &key)?;
        let signer_has_key_id = has_subject_key_id(&parse_cert(&layout.signer_cert, &signer)?);
        let chain = match &layout.chain {
            None => Vec::new(),
            Some(path) if layout.source.exists(path) => read_certs(layout.source, path)?,
            Some(_) => vec![signer.clone()],
        };
        let chain = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        let issuer = Issuer::from_ca_cert_der(&signer, key).map_err(|e| {
            rejected(
                &layout.signer_cert,
                format!("its subject or extensions cannot be used to sign: {e}"),
            )
        })?;
        let ca = Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            issuer,
            signer_not_after,
            signer_has_key_id,
            chain,
            roots,
            extra_roots: Vec::new(),
            ttl: DEFAULT_CERT_TTL,
        };
        ca.probe(layout, &signer)?;
        info!(dir = %dir.display(), trust_domain, roots = ca.roots.len(),
            intermediates = ca.chain.len(), signer = %layout.signer_cert.display(),
            "opened the local CA");
        Ok(ca)
    }

    /// Issues a short-lived leaf and checks what peers will check: its issuer is the signing
    /// certificate's subject byte for byte, and it verifies against the bundle.
    fn probe(&self, layout: &Layout, signer: &CertificateDer<'_>) -> Result<(), IdentityError> {
        let id = SpiffeId::new("nodemesh.invalid", "default", "ca-probe").map_err(|e| {
            IdentityError::Provider {
                identity: "ca-probe".into(),
                reason: e.to_string(),
            }
        })?;
        let now = SystemTime::now();
        let leaf = self.issue_with_validity(&id, now - CLOCK_SKEW, now + CLOCK_SKEW)?;
        let signer_name = parse_cert(&layout.signer_cert, signer)?
            .subject()
            .as_raw()
            .to_vec();
        let leaf_der = leaf
            .chain
            .first()
            .cloned()
            .unwrap_or(CertificateDer::from(Vec::new()));
        let leaf_issuer = parse_cert(&layout.signer_cert, &leaf_der)?
            .issuer()
            .as_raw()
            .to_vec();
        if leaf_issuer != signer_name {
            return Err(rejected(
                &layout.signer_cert,
                "its subject cannot be written back byte for byte as the issuer of the \
                 certificates it signs (nodemesh supports one attribute per RDN, each attribute \
                 type once), so peers would reject them as from an unknown issuer"
                    .into(),
            ));
        }
        let bundle = TrustBundle::new(self.trust_domain.clone(), self.roots.clone());
        super::tls::verify_chain(&bundle, &leaf.chain, now).map_err(|e| {
            rejected(
                &layout.signer_cert,
                format!(
                    "a certificate signed by it does not verify against the roots in {}: {e} \
                     (it must be one of them, or chain to one{})",
                    layout.bundle.display(),
                    if layout.chain.is_some() {
                        format!(" through {CERT_CHAIN_FILE}")
                    } else {
                        String::new()
                    }
                ),
            )
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

    /// The first certificate of `root-cert.pem` (in the nodemesh layout, the signing root).
    pub fn root(&self) -> &CertificateDer<'static> {
        // `read_certs` never returns an empty list.
        &self.roots[0]
    }

    /// Every certificate of `root-cert.pem`.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Signs a leaf for `identity` valid from `not_before` to `not_after` (tests use this to
    /// make expired certificates). The chain is the leaf followed by the intermediates.
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
        let chain = self.sign_key(identity, &leaf_key, not_before, not_after)?;
        Ok(WorkloadCert::new(
            identity.clone(),
            chain,
            PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
            not_before,
            not_after,
        ))
    }

    /// Signs a leaf for `identity` over a public key the CA does not hold (from a CSR, as
    /// DER `SubjectPublicKeyInfo`), valid from `not_before` to `not_after`, capped at the
    /// signer's expiry. Returns the chain: the leaf, then the intermediates.
    pub fn sign_public_key(
        &self,
        identity: &SpiffeId,
        spki_der: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki_der).map_err(|source| {
            IdentityError::Sign {
                identity: identity.to_string(),
                source,
            }
        })?;
        self.sign_key(
            identity,
            &key,
            not_before,
            not_after.min(self.signer_not_after),
        )
    }

    /// When the signing certificate expires.
    pub fn signer_not_after(&self) -> SystemTime {
        self.signer_not_after
    }

    /// A TLS server certificate for `dns_names` (e.g. the CA service's own), with a fresh key:
    /// `(chain, key)`, valid from `not_before` to `not_after` (capped at the signer's expiry).
    pub fn issue_server(
        &self,
        dns_names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), IdentityError> {
        let label = dns_names.join(",");
        let sign_err = |source| IdentityError::Sign {
            identity: label.clone(),
            source,
        };
        let key = KeyPair::generate().map_err(sign_err)?;
        let sans = dns_names
            .iter()
            .map(|n| Ia5String::try_from(n.as_str()).map(SanType::DnsName))
            .collect::<Result<Vec<_>, _>>()
            .map_err(sign_err)?;
        let chain = self.sign_sans(
            &label,
            sans,
            &key,
            not_before,
            not_after.min(self.signer_not_after),
        )?;
        Ok((chain, PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    fn sign_key(
        &self,
        identity: &SpiffeId,
        leaf_key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let uri =
            Ia5String::try_from(identity.to_string()).map_err(|source| IdentityError::Sign {
                identity: identity.to_string(),
                source,
            })?;
        self.sign_sans(
            &identity.to_string(),
            vec![SanType::URI(uri)],
            leaf_key,
            not_before,
            not_after,
        )
    }

    fn sign_sans(
        &self,
        label: &str,
        sans: Vec<SanType>,
        leaf_key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let sign_err = |source| IdentityError::Sign {
            identity: label.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = self.signer_has_key_id;
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(leaf_key, &self.issuer).map_err(sign_err)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }
}

impl CertificateProvider for LocalCa {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        let now = SystemTime::now();
        // A leaf never outlives its signer (it would stop verifying before its half-life).
        let not_after = (now + self.ttl).min(self.signer_not_after);
        self.issue_with_validity(identity, now - CLOCK_SKEW, not_after)
    }

    fn trust_bundle(&self) -> TrustBundle {
        let mut roots = self.roots.clone();
        roots.extend(self.extra_roots.iter().cloned());
        TrustBundle::new(self.trust_domain.clone(), roots)
    }
}

fn rejected(file: &Path, reason: String) -> IdentityError {
    IdentityError::CaRejected {
        file: file.to_path_buf(),
        reason,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|e| rejected(path, format!("cannot read it: {e}")))
}

/// A new self-signed root for `trust_domain` (ECDSA P-256, ten years): `(certificate PEM,
/// PKCS#8 key PEM)`.
pub fn generate_root(trust_domain: &str) -> Result<(String, String), IdentityError> {
    let sign_err = |source| IdentityError::Sign {
        identity: "root CA".into(),
        source,
    };
    let key = KeyPair::generate().map_err(sign_err)?;
    let mut params = root_params(trust_domain);
    let now = SystemTime::now();
    params.not_before = to_offset(now - CLOCK_SKEW);
    params.not_after = to_offset(now + ROOT_TTL);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(sign_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Creates `root-key.pem` (ECDSA P-256, 0600) and the self-signed `root-cert.pem`.
fn create_root(dir: &Path, trust_domain: &str) -> Result<(), IdentityError> {
    let dir_err = |source| IdentityError::CaDir {
        path: dir.to_path_buf(),
        source,
    };
    let (cert, key) = generate_root(trust_domain)?;
    write_private(&dir.join(ROOT_KEY_FILE), key.as_bytes()).map_err(dir_err)?;
    fs::write(dir.join(ROOT_CERT_FILE), cert).map_err(dir_err)?;
    info!(dir = %dir.display(), trust_domain, "created a new local root CA");
    Ok(())
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn read_certs(
    source: Source<'_>,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = source.read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| rejected(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(rejected(path, "it holds no PEM `CERTIFICATE`".into()));
    }
    Ok(certs)
}

fn parse_cert<'a>(
    file: &Path,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, IdentityError> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| rejected(file, format!("a certificate does not parse: {e}")))
}

/// Checks that `cert` (from `file`) may sign certificates now; returns its expiry.
fn check_ca(
    file: &Path,
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<SystemTime, IdentityError> {
    let x = parse_cert(file, cert)?;
    let subject = x.subject().to_string();
    match x.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Err(rejected(
                file,
                format!("`{subject}` is not a CA certificate (basicConstraints CA:TRUE missing)"),
            ));
        }
        Err(e) => {
            return Err(rejected(
                file,
                format!("`{subject}` has a bad basicConstraints extension: {e}"),
            ));
        }
    }
    match x.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(rejected(
                file,
                format!("`{subject}` may not sign certificates (keyUsage without keyCertSign)"),
            ));
        }
        Ok(_) => {}
        Err(e) => {
            return Err(rejected(
                file,
                format!("`{subject}` has a bad keyUsage extension: {e}"),
            ));
        }
    }
    let validity = x.validity();
    let secs =
        |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or_default());
    let (not_before, not_after) = (
        secs(validity.not_before.timestamp()),
        secs(validity.not_after.timestamp()),
    );
    if now < not_before {
        return Err(rejected(
            file,
            format!(
                "`{subject}` is not valid yet (from {}); check the clock",
                validity.not_before
            ),
        ));
    }
    if now > not_after {
        return Err(rejected(
            file,
            format!(
                "`{subject}` expired on {}; remove it or replace it with a current root",
                validity.not_after
            ),
        ));
    }
    Ok(not_after)
}

fn has_subject_key_id(cert: &X509Certificate<'_>) -> bool {
    cert.extensions().iter().any(|e| {
        matches!(
            e.parsed_extension(),
            ParsedExtension::SubjectKeyIdentifier(_)
        )
    })
}

/// The key must be the signing certificate's: otherwise every certificate it signs fails
/// verification.
fn check_key_matches(
    layout: &Layout,
    signer: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<(), IdentityError> {
    let x = parse_cert(&layout.signer_cert, signer)?;
    if x.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(rejected(
            &layout.signer_key,
            format!(
                "it is not the key of `{}` in {} (certificates signed with it would not verify); \
                 put the matching key there",
                x.subject(),
                layout.signer_cert.display()
            ),
        ));
    }
    Ok(())
}

/// Reads an unencrypted ECDSA (P-256, P-384) or RSA (2048 to 4096 bits) key in PKCS#8, PKCS#1 or
/// SEC1 PEM. `own` keys (created by us) are reset to mode 0600; others only warned about.
fn read_key(source: Source<'_>, path: &Path, own: bool) -> Result<KeyPair, IdentityError> {
    let io_err = |e: std::io::Error| rejected(path, format!("cannot read or restrict it: {e}"));
    let mode = match source {
        Source::Dir => fs::metadata(path).map_err(io_err)?.permissions().mode(),
        Source::Memory(_) => 0o600,
    };
    if mode & 0o077 != 0 {
        if own {
            warn!(path = %path.display(), mode = format!("{mode:o}"),
                "CA key is readable by group or others; setting mode 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        } else {
            warn!(path = %path.display(), mode = format!("{mode:o}"),
                "CA key is readable by group or others; restrict it to the agent");
        }
    }
    let pem = source.read(path)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        rejected(
            path,
            format!(
                "no unencrypted private key found ({e}); expected PEM `PRIVATE KEY` (PKCS#8), \
                 `RSA PRIVATE KEY` (PKCS#1) or `EC PRIVATE KEY` (SEC1)"
            ),
        )
    })?;
    key_pair_of(&der).ok_or_else(|| {
        rejected(
            path,
            "unsupported key: nodemesh signs with ECDSA P-256 or P-384, or RSA of 2048 to 4096 \
             bits"
                .into(),
        )
    })
}

/// DER of the AlgorithmIdentifier `rsaEncryption` with NULL parameters (RFC 8017 A.1).
const RSA_ENCRYPTION: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// DER of the OID id-ecPublicKey (RFC 5480).
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER of the OIDs secp256r1 and secp384r1 (RFC 5480).
const EC_CURVES: [&[u8]; 2] = [
    &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
    &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
];

/// rcgen with `ring` reads PKCS#8 only, so PKCS#1 and SEC1 keys are wrapped in a PKCS#8
/// `PrivateKeyInfo` (RFC 5208) first. ring checks the curve named in a SEC1 key against the
/// wrapper's, so trying each curve picks the right one.
fn key_pair_of(der: &PrivateKeyDer<'_>) -> Option<KeyPair> {
    match der {
        PrivateKeyDer::Pkcs8(k) => KeyPair::try_from(k.secret_pkcs8_der()).ok(),
        PrivateKeyDer::Pkcs1(k) => {
            KeyPair::try_from(pkcs8_wrap(RSA_ENCRYPTION, k.secret_pkcs1_der()).as_slice()).ok()
        }
        PrivateKeyDer::Sec1(k) => sec1_to_key_pair(k),
        _ => None,
    }
}

fn sec1_to_key_pair(key: &PrivateSec1KeyDer<'_>) -> Option<KeyPair> {
    EC_CURVES.iter().find_map(|curve| {
        let algorithm = der_tlv(0x30, &[EC_PUBLIC_KEY, curve].concat());
        KeyPair::try_from(pkcs8_wrap(&algorithm, key.secret_sec1_der()).as_slice()).ok()
    })
}

/// `PrivateKeyInfo ::= SEQUENCE { version INTEGER (0), algorithm, privateKey OCTET STRING }`.
fn pkcs8_wrap(algorithm: &[u8], private_key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(algorithm);
    body.extend(der_tlv(0x04, private_key));
    der_tlv(0x30, &body)
}

/// One DER tag-length-value with a definite length (short or long form).
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(len) if len < 0x80 => out.push(len),
        _ => {
            let len = content.len().to_be_bytes();
            let first = len.iter().position(|b| *b != 0).unwrap_or(len.len() - 1);
            let len = &len[first..];
            // At most size_of::<usize>() bytes, so the count fits in the low 7 bits.
            out.push(0x80 | len.len() as u8);
            out.extend_from_slice(len);
        }
    }
    out.extend_from_slice(content);
    out
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

#[cfg(test)]
mod tests;
