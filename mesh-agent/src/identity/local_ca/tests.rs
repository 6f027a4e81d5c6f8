//! Tests of the local CA: its own root, and roots made by the openssl CLI (RSA and ECDSA, the
//! nodemesh and Istio layouts) verified by a third party (`openssl verify`) and by our rustls
//! verifier.

use std::process::Command;

use rustls::Connection;

use super::super::tls;
use super::*;

/// What the agent creates for its CA is its own: the directory 0700, the key 0600, the
/// certificate readable (it is public). Nothing there is world-readable but the certificate.
#[test]
fn a_new_ca_directory_and_key_are_private() {
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("state/ca");
    LocalCa::open(&dir, "cluster.local").expect("create");
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "CA directory");
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), 0o600, "CA key");
    assert_eq!(
        mode(&dir.join(ROOT_CERT_FILE)) & 0o600,
        0o600,
        "CA certificate"
    );
}

/// The key never shows in a log line that formats a certificate with `{:?}`.
#[tokio::test]
async fn debug_output_of_a_workload_certificate_has_no_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = LocalCa::open(dir.path(), "cluster.local").expect("create");
    let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/a"
        .parse()
        .expect("id");
    let cert = ca.issue(&id).await.expect("issue");
    let shown = format!("{cert:?}");
    let key = cert.key();
    let secret = key.secret_der();
    assert!(shown.contains("elided"), "{shown}");
    // No 16-byte window of the key's secret part appears in the output, in decimal (Debug of
    // bytes) or hex. Windows also found in the certificate (the algorithm identifiers and the
    // public key that PKCS#8 carries too) are public and skipped.
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let public = hex(cert.chain[0].as_ref());
    let mut checked = 0;
    for window in secret.windows(16) {
        if public.contains(&hex(window)) {
            continue;
        }
        checked += 1;
        let decimal = format!("{window:?}");
        let decimal = &decimal[1..decimal.len() - 1];
        assert!(
            !shown.contains(decimal) && !shown.contains(&hex(window)),
            "key bytes in {shown}"
        );
    }
    assert!(checked > 0, "the key has a secret part to look for");
}

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
    let parsed = tls::spiffe_id_of(&cert.chain[0]).expect("SAN");
    assert_eq!(parsed, id);
    // Signed by the root created by the first instance.
    let bundle = ca.trust_bundle();
    tls::verify_chain(&bundle, &cert.chain, SystemTime::now()).expect("chains to the stored root");
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
    assert!(tls::verify_chain(&old.trust_bundle(), &from_new.chain, now).is_err());
    let old = old.trust_also(new.root().clone());
    assert_eq!(old.trust_bundle().roots.len(), 2);
    tls::verify_chain(&old.trust_bundle(), &from_new.chain, now)
        .expect("rotation: the new root is trusted");
    let from_old = old.issue(&id).await.expect("cert");
    tls::verify_chain(&old.trust_bundle(), &from_old.chain, now).expect("the old root still is");
}

// ---- Roots made by the openssl CLI ----

/// Extensions for the openssl-made certificates: a CA as Istio's tooling makes them, and a
/// certificate that is not a CA.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
O = Istio
CN = Root CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[v3_ca_no_key_id]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = none
authorityKeyIdentifier = none
[not_ca]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
";

const TD: &str = "cluster.local";

fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
    let cnf = dir.join("openssl.cnf");
    if !cnf.exists() {
        fs::write(&cnf, OPENSSL_CNF).expect("write openssl.cnf");
    }
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the openssl CLI")
}

fn openssl_ok(dir: &Path, args: &[&str]) {
    let out = openssl(dir, args);
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Clone, Copy, Debug)]
enum KeyKind {
    /// RSA-2048, written as PKCS#1 `RSA PRIVATE KEY` (as Istio's samples/certs).
    RsaPkcs1,
    /// RSA-2048, PKCS#8 `PRIVATE KEY`.
    RsaPkcs8,
    /// ECDSA P-256, SEC1 `EC PRIVATE KEY` (what `openssl ecparam -genkey` writes).
    P256Sec1,
    /// ECDSA P-384, PKCS#8.
    P384Pkcs8,
}

impl KeyKind {
    fn newkey(self) -> &'static [&'static str] {
        match self {
            Self::RsaPkcs1 | Self::RsaPkcs8 => &["-newkey", "rsa:2048"],
            Self::P256Sec1 => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Self::P384Pkcs8 => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        }
    }

    /// Rewrites the PKCS#8 key openssl made in the kind's encoding.
    fn convert(self, dir: &Path, key: &str) {
        match self {
            Self::RsaPkcs1 => openssl_ok(dir, &["rsa", "-in", key, "-out", key, "-traditional"]),
            Self::P256Sec1 => openssl_ok(dir, &["ec", "-in", key, "-out", key]),
            Self::RsaPkcs8 | Self::P384Pkcs8 => {}
        }
        let pem = fs::read_to_string(dir.join(key)).expect("key");
        let label = match self {
            Self::RsaPkcs1 => "BEGIN RSA PRIVATE KEY",
            Self::P256Sec1 => "BEGIN EC PRIVATE KEY",
            Self::RsaPkcs8 | Self::P384Pkcs8 => "BEGIN PRIVATE KEY",
        };
        assert!(pem.contains(label), "{self:?}: {pem}");
    }
}

/// A self-signed CA made by `openssl req -x509`, written to `dir/cert` and `dir/key`.
fn openssl_root(dir: &Path, kind: KeyKind, subject: &str, cert: &str, key: &str) {
    let mut args = vec![
        "req",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "v3_ca",
    ];
    args.extend_from_slice(kind.newkey());
    args.extend_from_slice(&[
        "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", subject,
    ]);
    openssl_ok(dir, &args);
    kind.convert(dir, key);
}

fn write_pem(path: &Path, certs: &[CertificateDer<'_>]) {
    use std::fmt::Write as _;
    let mut pem = String::new();
    for cert in certs {
        let b64 = base64_encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(pem, "{}", std::str::from_utf8(line).expect("ascii"));
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    fs::write(path, pem).expect("write pem");
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ki) => Some(ki.0.to_vec()),
            _ => None,
        })
}

fn authority_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|ki| ki.0.to_vec())
            }
            _ => None,
        })
}

/// Moves TLS records from one side to the other until neither has anything to send.
fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write_tls");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls");
        to.process_new_packets()?;
    }
    Ok(())
}

/// A full mTLS handshake in memory with our verifiers on both sides (identity::tls).
fn handshake(
    client: &WorkloadCert,
    client_bundle: &TrustBundle,
    server: &WorkloadCert,
    server_bundle: &TrustBundle,
) -> Result<(), rustls::Error> {
    let server_cfg = tls::server_config(server, server_bundle).expect("server config");
    let client_cfg =
        tls::client_config(client, client_bundle, &server.identity).expect("client config");
    let mut c = Connection::Client(rustls::ClientConnection::new(
        client_cfg,
        tls::identity_sni(&server.identity),
    )?);
    let mut s = Connection::Server(rustls::ServerConnection::new(server_cfg)?);
    for _ in 0..8 {
        pump(&mut c, &mut s)?;
        pump(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() {
            // Between two agents the client's preference, AES-128-GCM, is what is negotiated.
            for side in [&c, &s] {
                let suite = match side {
                    Connection::Client(c) => c.negotiated_cipher_suite(),
                    Connection::Server(s) => s.negotiated_cipher_suite(),
                };
                assert_eq!(
                    suite.map(|s| s.suite()),
                    Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
                );
            }
            return Ok(());
        }
    }
    panic!("the handshake did not finish in 8 round trips");
}

/// What a peer sharing the root checks, on leaves of `ca` whose signing certificate is the
/// first one in the file `signer`; `work` is a scratch directory for openssl.
async fn check_third_party(ca: &LocalCa, signer: &Path, work: &Path) {
    let client_id: SpiffeId = "spiffe://cluster.local/ns/a/sa/client".parse().expect("id");
    let server_id: SpiffeId = "spiffe://cluster.local/ns/b/sa/server".parse().expect("id");
    let client = ca.issue(&client_id).await.expect("issue client");
    let server = ca.issue(&server_id).await.expect("issue server");

    // The leaf names the signer's subject as issuer, byte for byte, and its key identifier.
    let signer_pem = fs::read(signer).expect("signer");
    let signer_der = CertificateDer::pem_slice_iter(&signer_pem)
        .next()
        .expect("a certificate")
        .expect("PEM");
    let (_, signer_x) = X509Certificate::from_der(signer_der.as_ref()).expect("signer parses");
    let (_, leaf_x) = X509Certificate::from_der(client.chain[0].as_ref()).expect("leaf parses");
    assert_eq!(leaf_x.issuer().as_raw(), signer_x.subject().as_raw());
    // The signer's key identifier, or none when it has none (Istio's sample intermediate).
    assert_eq!(authority_key_id(&leaf_x), subject_key_id(&signer_x));

    // Third party: openssl verify against the root file, for both TLS purposes.
    let leaf_pem = work.join("leaf.pem");
    write_pem(&leaf_pem, &client.chain[..1]);
    let untrusted = work.join("untrusted.pem");
    write_pem(&untrusted, &client.chain[1..]);
    let root_file = ca.dir().join(ROOT_CERT_FILE);
    let (root_file, leaf_pem, untrusted) = (
        root_file.to_str().expect("utf-8"),
        leaf_pem.to_str().expect("utf-8"),
        untrusted.to_str().expect("utf-8"),
    );
    for purpose in [None, Some("sslclient"), Some("sslserver")] {
        let mut args = vec!["verify", "-CAfile", root_file];
        if client.chain.len() > 1 {
            args.extend_from_slice(&["-untrusted", untrusted]);
        }
        if let Some(p) = purpose {
            args.extend_from_slice(&["-purpose", p]);
        }
        args.push(leaf_pem);
        openssl_ok(work, &args);
    }

    // Our own verifiers: a handshake between two leaves of this CA.
    let bundle = ca.trust_bundle();
    handshake(&client, &bundle, &server, &bundle).expect("handshake between two leaves");
    tls::verify_chain(&bundle, &server.chain, SystemTime::now()).expect("chain verifies");
}

#[tokio::test]
async fn openssl_roots_of_every_key_type_issue_leaves_third_parties_accept() {
    for kind in [
        KeyKind::RsaPkcs1,
        KeyKind::RsaPkcs8,
        KeyKind::P256Sec1,
        KeyKind::P384Pkcs8,
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let ca_dir = dir.path().join("ca");
        fs::create_dir(&ca_dir).expect("mkdir");
        openssl_root(
            &ca_dir,
            kind,
            "/O=Istio/CN=Root CA",
            ROOT_CERT_FILE,
            ROOT_KEY_FILE,
        );
        let before = fs::read(ca_dir.join(ROOT_CERT_FILE)).expect("root");
        let ca = LocalCa::open(&ca_dir, TD).unwrap_or_else(|e| panic!("{kind:?}: open: {e}"));
        assert_eq!(
            fs::read(ca_dir.join(ROOT_CERT_FILE)).expect("root"),
            before,
            "{kind:?}: a provided root is never rewritten"
        );
        check_third_party(&ca, &ca_dir.join(ROOT_CERT_FILE), dir.path()).await;
    }
}

#[tokio::test]
async fn istio_cacerts_layout_with_an_intermediate_sends_the_chain() {
    let dir = tempfile::tempdir().expect("tmp");
    let work = dir.path();
    // The root's key stays outside the CA directory, as with Istio's plugged-in CA. Names of
    // several attributes and string types (emailAddress is an IA5String) as Istio's samples.
    openssl_root(
        work,
        KeyKind::RsaPkcs1,
        "/C=US/ST=California/L=Sunnyvale/O=Istio/OU=Test/CN=Root CA/emailAddress=root@example.com",
        "root.pem",
        "root-key.pem",
    );
    let mut args = vec!["req", "-new", "-config", "openssl.cnf"];
    args.extend_from_slice(KeyKind::P256Sec1.newkey());
    args.extend_from_slice(&[
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.csr",
        "-subj",
        "/C=US/ST=California/L=Sunnyvale/O=Istio/CN=Istio CA",
    ]);
    openssl_ok(work, &args);
    KeyKind::P256Sec1.convert(work, "ca-key.pem");
    // Without key identifiers (Istio's sample intermediate has none): leaves then carry no
    // authority key identifier.
    openssl_ok(
        work,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "v3_ca_no_key_id",
        ],
    );
    let ca_dir = work.join("cacerts");
    fs::create_dir(&ca_dir).expect("mkdir");
    for (from, to) in [
        ("ca-cert.pem", CA_CERT_FILE),
        ("ca-key.pem", CA_KEY_FILE),
        ("root.pem", ROOT_CERT_FILE),
    ] {
        fs::copy(work.join(from), ca_dir.join(to)).expect("copy");
    }
    let intermediate = fs::read(work.join("ca-cert.pem")).expect("ca");

    // Without cert-chain.pem the intermediate is sent after each leaf.
    let ca = LocalCa::open(&ca_dir, TD).expect("open without cert-chain.pem");
    assert!(!ca_dir.join(ROOT_KEY_FILE).exists(), "no key was created");
    let leaf = ca
        .issue(&"spiffe://cluster.local/ns/a/sa/b".parse().expect("id"))
        .await;
    assert_eq!(leaf.expect("issue").chain.len(), 2);
    check_third_party(&ca, &ca_dir.join(CA_CERT_FILE), work).await;

    // With Istio's cert-chain.pem (intermediate, then root): the root is not sent.
    let root = fs::read(work.join("root.pem")).expect("root");
    fs::write(ca_dir.join(CERT_CHAIN_FILE), [intermediate, root].concat()).expect("chain");
    let ca = LocalCa::open(&ca_dir, TD).expect("open with cert-chain.pem");
    let leaf = ca
        .issue(&"spiffe://cluster.local/ns/a/sa/b".parse().expect("id"))
        .await
        .expect("issue");
    assert_eq!(leaf.chain.len(), 2, "leaf and intermediate");
    check_third_party(&ca, &ca_dir.join(CA_CERT_FILE), work).await;

    // Without the intermediate a peer cannot verify the leaf: the chain sent is what makes it.
    let bundle = ca.trust_bundle();
    assert!(tls::verify_chain(&bundle, &leaf.chain[..1], SystemTime::now()).is_err());
}

#[tokio::test]
async fn a_bundle_of_two_openssl_roots_trusts_leaves_of_both() {
    let dir = tempfile::tempdir().expect("tmp");
    let work = dir.path();
    let (old_dir, new_dir) = (work.join("old"), work.join("new"));
    fs::create_dir(&old_dir).expect("mkdir");
    fs::create_dir(&new_dir).expect("mkdir");
    openssl_root(
        &old_dir,
        KeyKind::RsaPkcs1,
        "/O=Istio/CN=Root CA",
        ROOT_CERT_FILE,
        ROOT_KEY_FILE,
    );
    openssl_root(
        &new_dir,
        KeyKind::P256Sec1,
        "/O=Istio/CN=Root CA 2",
        ROOT_CERT_FILE,
        ROOT_KEY_FILE,
    );
    let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
    let new_only = LocalCa::open(&new_dir, TD).expect("new");
    let from_new = new_only.issue(&id).await.expect("issue");

    // The old CA before rotation: one root, the new CA's leaves are refused.
    let old = LocalCa::open(&old_dir, TD).expect("old");
    let now = SystemTime::now();
    assert!(tls::verify_chain(&old.trust_bundle(), &from_new.chain, now).is_err());
    let from_old = old.issue(&id).await.expect("issue");
    assert!(
        handshake(
            &from_old,
            &old.trust_bundle(),
            &from_new,
            &new_only.trust_bundle()
        )
        .is_err(),
        "a root missing from the bundle fails the handshake"
    );

    // Rotation: root-cert.pem holds the old root (still signing) and the new one.
    let old_root = fs::read(old_dir.join(ROOT_CERT_FILE)).expect("old");
    let new_root = fs::read(new_dir.join(ROOT_CERT_FILE)).expect("new");
    fs::write(old_dir.join(ROOT_CERT_FILE), [old_root, new_root].concat()).expect("bundle");
    let old = LocalCa::open(&old_dir, TD).expect("old with two roots");
    assert_eq!(old.trust_bundle().roots.len(), 2);
    let bundle = old.trust_bundle();
    tls::verify_chain(&bundle, &from_new.chain, now).expect("the new root's leaf");
    let from_old = old.issue(&id).await.expect("issue");
    tls::verify_chain(&bundle, &from_old.chain, now).expect("the old root's leaf");
    // Both verify with openssl against the bundle file too.
    for (name, leaf) in [("new.pem", &from_new), ("old.pem", &from_old)] {
        write_pem(&work.join(name), &leaf.chain);
        let bundle_file = old_dir.join(ROOT_CERT_FILE);
        openssl_ok(
            work,
            &[
                "verify",
                "-CAfile",
                bundle_file.to_str().expect("utf-8"),
                name,
            ],
        );
    }
    // A node of the new root that trusts both talks to one of the old root.
    let new_both = new_only.trust_also(old.root().clone());
    handshake(&from_old, &bundle, &from_new, &new_both.trust_bundle())
        .expect("handshake across the rotation");
}

fn open_err(dir: &Path) -> (PathBuf, String) {
    match LocalCa::open(dir, TD) {
        Err(IdentityError::CaRejected { file, reason }) => (file, reason),
        Err(e) => panic!("expected CaRejected, got {e}"),
        Ok(_) => panic!("the CA opened"),
    }
}

#[test]
fn a_key_that_is_not_the_roots_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tmp");
    openssl_root(
        dir.path(),
        KeyKind::RsaPkcs8,
        "/O=Istio/CN=Root CA",
        ROOT_CERT_FILE,
        "other-key.pem",
    );
    openssl_root(
        dir.path(),
        KeyKind::RsaPkcs1,
        "/O=Istio/CN=Root CA",
        "other-cert.pem",
        ROOT_KEY_FILE,
    );
    let (file, reason) = open_err(dir.path());
    assert_eq!(file, dir.path().join(ROOT_KEY_FILE));
    assert!(
        reason.contains("is not the key of `O=Istio, CN=Root CA`"),
        "{reason}"
    );
}

#[test]
fn a_root_that_is_not_a_ca_or_out_of_validity_is_refused_naming_the_file() {
    // Not a CA (basicConstraints CA:FALSE), made by openssl.
    let dir = tempfile::tempdir().expect("tmp");
    openssl_ok(
        dir.path(),
        &[
            "req",
            "-x509",
            "-config",
            "openssl.cnf",
            "-extensions",
            "not_ca",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            ROOT_KEY_FILE,
            "-out",
            ROOT_CERT_FILE,
            "-days",
            "30",
            "-subj",
            "/O=Istio/CN=Root CA",
        ],
    );
    let (file, reason) = open_err(dir.path());
    assert_eq!(file, dir.path().join(ROOT_CERT_FILE));
    assert!(reason.contains("is not a CA certificate"), "{reason}");
    let err = LocalCa::open(dir.path(), TD).expect_err("refused");
    assert!(
        err.to_string()
            .contains(&dir.path().join(ROOT_CERT_FILE).display().to_string()),
        "{err}"
    );

    // Expired and not yet valid (openssl 3.0's req cannot back-date: rcgen makes them).
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 60 * 60);
    for (from, to, expect) in [
        (now - 3 * day, now - day, "expired"),
        (now + day, now + 3 * day, "not valid yet"),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let key = KeyPair::generate().expect("key");
        let mut params = root_params(TD);
        params.not_before = to_offset(from);
        params.not_after = to_offset(to);
        let cert = params.self_signed(&key).expect("self-signed");
        write_private(
            &dir.path().join(ROOT_KEY_FILE),
            key.serialize_pem().as_bytes(),
        )
        .expect("key");
        fs::write(dir.path().join(ROOT_CERT_FILE), cert.pem()).expect("cert");
        let (file, reason) = open_err(dir.path());
        assert_eq!(file, dir.path().join(ROOT_CERT_FILE));
        assert!(reason.contains(expect), "{reason}");
    }

    // A second root in the bundle is checked too.
    let dir = tempfile::tempdir().expect("tmp");
    LocalCa::open(dir.path(), TD).expect("create");
    openssl_ok(
        dir.path(),
        &[
            "req",
            "-x509",
            "-config",
            "openssl.cnf",
            "-extensions",
            "not_ca",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "leaf-key.pem",
            "-out",
            "leaf.pem",
            "-days",
            "30",
            "-subj",
            "/O=Istio/CN=Not a CA",
        ],
    );
    let ours = fs::read(dir.path().join(ROOT_CERT_FILE)).expect("root");
    let other = fs::read(dir.path().join("leaf.pem")).expect("leaf");
    fs::write(dir.path().join(ROOT_CERT_FILE), [ours, other].concat()).expect("bundle");
    let (file, reason) = open_err(dir.path());
    assert_eq!(file, dir.path().join(ROOT_CERT_FILE));
    assert!(
        reason.contains("`O=Istio, CN=Not a CA` is not a CA"),
        "{reason}"
    );
}

#[test]
fn a_root_without_its_key_is_refused_not_replaced() {
    let dir = tempfile::tempdir().expect("tmp");
    openssl_root(
        dir.path(),
        KeyKind::P256Sec1,
        "/O=Istio/CN=Root CA",
        ROOT_CERT_FILE,
        "elsewhere-key.pem",
    );
    let before = fs::read(dir.path().join(ROOT_CERT_FILE)).expect("root");
    let (file, reason) = open_err(dir.path());
    assert_eq!(file, dir.path().join(ROOT_CERT_FILE));
    assert!(reason.contains("there is no key"), "{reason}");
    assert_eq!(
        fs::read(dir.path().join(ROOT_CERT_FILE)).expect("root"),
        before
    );
    assert!(!dir.path().join(ROOT_KEY_FILE).exists());
}

#[test]
fn pkcs8_wrapping_uses_long_form_lengths() {
    assert_eq!(der_tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
    let long = vec![0u8; 300];
    let tlv = der_tlv(0x04, &long);
    assert_eq!(&tlv[..4], &[0x04, 0x82, 0x01, 0x2c]);
    assert_eq!(tlv.len(), 304);
    assert_eq!(&der_tlv(0x30, &[0; 0x80])[..3], &[0x30, 0x81, 0x80]);
}

#[test]
fn an_istio_layout_without_its_ca_cert_names_the_missing_file() {
    let dir = tempfile::tempdir().expect("tmp");
    openssl_root(
        dir.path(),
        KeyKind::P256Sec1,
        "/O=Istio/CN=Root CA",
        ROOT_CERT_FILE,
        CA_KEY_FILE,
    );
    let (file, reason) = open_err(dir.path());
    assert_eq!(file, dir.path().join(CA_CERT_FILE));
    assert!(reason.contains("cannot read it"), "{reason}");
    // With ca-cert.pem (here the root itself, so nothing is sent after the leaf) it opens.
    fs::copy(
        dir.path().join(ROOT_CERT_FILE),
        dir.path().join(CA_CERT_FILE),
    )
    .expect("copy");
    let ca = LocalCa::open(dir.path(), TD).expect("open");
    let leaf = ca
        .issue_with_validity(
            &"spiffe://cluster.local/ns/a/sa/b".parse().expect("id"),
            SystemTime::now(),
            SystemTime::now() + Duration::from_secs(60),
        )
        .expect("issue");
    assert_eq!(leaf.chain.len(), 1, "the root is not sent");
}
