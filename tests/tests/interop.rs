//! Interoperability: our HBONE endpoint (port 15008 on the node address) against clients that
//! share no code with nodemesh. Two `mesh-agent local` nodes as in `e2e.rs`, an echo server on
//! node b's pod; the clients run in node a's network namespace but outside its cgroup (not a
//! pod: nothing redirects them) and dial node b's address by IP, so they send no SNI.
//!
//! - `tests/interop/hbone_client.py` (Python's `ssl` = OpenSSL, and the `h2` package) with a
//!   client certificate made by the `openssl` CLI for the client pod's SPIFFE identity and signed
//!   by the cluster's shared CA: TLS 1.3 with ALPN h2; the server presents the node identity
//!   chaining to the mesh root; CONNECT to the server pod → 200 and the payload (larger than
//!   one frame) echoed byte-exact with END_STREAM both ways; to a port the policy denies → 401;
//!   to an address that is no workload of node b → 400; no client certificate, or one from
//!   another CA → refused.
//! - node b's `/metrics` counts the echoed stream (mTLS, the client's principal, the bytes), the
//!   401 and the two 400s, and the two refused handshakes (`no_certificate`, `untrusted_chain`).
//! - `openssl s_client -tls1_3 -alpn h2` with the same certificate: TLSv1.3, h2, `Verify return
//!   code: 0` (the server's chain verified against the mesh root).
//!
//! Needs `python3-h2` and `openssl` (`cargo xtask setup` installs both); fails, never skips,
//! without them.
//!
//! Addresses (private to the test's namespaces): node link 10.130.0.1 (a) ↔ 10.130.0.2 (b); pods
//! on node a 10.31.<i>.2, on node b 10.32.<i>.2; tunnel addresses 169.254.130.1 / .2.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use nodemesh_tests::cluster::{
    Cluster, Echo, Net, Pod, delta, scrape, scrape_until, strict_and_deny_client, workload,
};
use serde_json::Value;

const ECHO_PORT: u16 = 8080;
/// The client may not reach the servers on this port (DENY policy).
const DENIED_PORT: u16 = 9090;
const HBONE_PORT: u16 = 15008;
const NODE_A: &str = "10.130.0.1";
const NODE_B: &str = "10.130.0.2";
const TUNNEL_A: &str = "169.254.130.1";
const TUNNEL_B: &str = "169.254.130.2";
const NET: Net = Net {
    node_a: NODE_A,
    node_b: NODE_B,
    tunnel_a: TUNNEL_A,
    tunnel_b: TUNNEL_B,
    pods_a: 31,
    pods_b: 32,
};
/// The client pod's identity in [`config`], which the third-party client speaks for.
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// What a node presents to a client that names no identity (docs/architecture.md, Tunnel).
const NODE_ID: &str = "spiffe://cluster.local/ns/nodemesh-system/sa/nodemesh-agent";
/// Debian's `python3-h2` installs for the system interpreter, whatever `python3` is on `PATH`
/// (pyenv and virtualenvs do not see it).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
const SETUP_HINT: &str = "run `cargo xtask setup` (it installs the Debian packages python3-h2 and openssl), \
     or `apt-get install --no-install-recommends python3-h2 openssl`";

fn config(client: &Pod, server_a: &Pod, server_b: &Pod) -> String {
    format!(
        "{}{}{}{}{}",
        NET.cluster_head(),
        workload(client, "client", "client", "", "a"),
        workload(server_a, "server-a", "server", "app: server", "a"),
        workload(server_b, "server-b", "server", "app: server", "b"),
        strict_and_deny_client(&format!("\"{DENIED_PORT}\"")),
    )
}

fn python() -> &'static str {
    if Path::new(SYSTEM_PYTHON).is_file() {
        SYSTEM_PYTHON
    } else {
        "python3"
    }
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/hbone_client.py")
}

/// Fails (never skips) with the fix when a third-party tool is missing.
fn require_tools() -> Result<()> {
    let probe = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ensure!(
        probe("openssl", &["version"]),
        "the `openssl` command is missing: {SETUP_HINT}"
    );
    ensure!(
        probe(python(), &["-c", "import h2, ssl"]),
        "{} cannot import the `h2` package: {SETUP_HINT}",
        python()
    );
    Ok(())
}

/// Runs `openssl` and fails with the full command line and its stderr.
fn openssl(args: &[&str]) -> Result<String> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run openssl: {SETUP_HINT}"))?;
    ensure!(
        out.status.success(),
        "`openssl {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// A P-256 key at `dir/name-key.pem`, mode 0600.
fn new_key(dir: &Path, name: &str) -> Result<PathBuf> {
    let key = dir.join(format!("{name}-key.pem"));
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        path_str(&key)?,
    ])?;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
    Ok(key)
}

/// A client certificate for `uri` signed by `ca_cert`/`ca_key` (as a SPIFFE X.509-SVID: the URI
/// SAN, clientAuth); returns the certificate and key paths.
fn issue_client(
    dir: &Path,
    name: &str,
    uri: &str,
    ca_cert: &Path,
    ca_key: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let key = new_key(dir, name)?;
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    let cert = dir.join(format!("{name}-cert.pem"));
    openssl(&[
        "req",
        "-new",
        "-key",
        path_str(&key)?,
        "-subj",
        "/O=interop",
        "-out",
        path_str(&csr)?,
    ])?;
    fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n\
             subjectAltName=URI:{uri}\n"
        ),
    )?;
    // A random serial given with `-set_serial`: `-CAcreateserial` would write a serial file into
    // the agents' CA dir.
    let serial = format!("0x{}", openssl(&["rand", "-hex", "15"])?.trim());
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr)?,
        "-CA",
        path_str(ca_cert)?,
        "-CAkey",
        path_str(ca_key)?,
        "-set_serial",
        &serial,
        "-days",
        "1",
        "-extfile",
        path_str(&ext)?,
        "-out",
        path_str(&cert)?,
    ])?;
    Ok((cert, key))
}

/// A self-signed CA the mesh does not trust.
fn foreign_ca(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let key = new_key(dir, "foreign-ca")?;
    let cert = dir.join("foreign-ca-cert.pem");
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        path_str(&key)?,
        "-subj",
        "/O=not the mesh/CN=foreign root",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        path_str(&cert)?,
    ])?;
    Ok((cert, key))
}

/// Runs `cmd` inside node a's namespace (not its cgroup: no redirect); returns stdout, or fails
/// with stdout and stderr.
fn in_node_a(c: &Cluster, cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", c.node_a.ns.name(), cmd])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd} in node a's namespace"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if !out.status.success() {
        bail!(
            "`{cmd} {}` in node a's namespace failed ({}):\n{stdout}{stderr}\n{}",
            args.join(" "),
            out.status,
            c.logs()
        );
    }
    Ok(stdout)
}

/// One run of the Python client against node b's HBONE port; its JSON report.
fn hbone_client(c: &Cluster, root: &Path, args: &[&str]) -> Result<Value> {
    let server = format!("{NODE_B}:{HBONE_PORT}");
    let script = client_script();
    // -B: no `__pycache__` in the source tree.
    let mut full = vec![
        "-B",
        path_str(&script)?,
        "--server",
        &server,
        "--ca",
        path_str(root)?,
    ];
    full.extend_from_slice(args);
    let out = in_node_a(c, python(), &full)?;
    serde_json::from_str(out.trim()).with_context(|| format!("client printed no JSON: {out}"))
}

/// The payload: 40 000 bytes (more than one 16 KiB frame) of every byte value.
fn payload() -> Vec<u8> {
    (0..40_000u32)
        .map(|i| u8::try_from((i * 7 + i / 256) % 256).unwrap_or(0))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn third_party_clients_speak_hbone_with_the_node_address() -> Result<()> {
    require_tools()?;
    let c = Cluster::up(NET, &[], config)?;
    let _echo_b = Echo::start(&c.server_b, ECHO_PORT)?;
    let ca_dir = c.dir.path().join("ca");
    let (root, root_key) = (ca_dir.join("root-cert.pem"), ca_dir.join("root-key.pem"));
    let keys = tempfile::tempdir()?;
    let (cert, key) = issue_client(keys.path(), "client", CLIENT_ID, &root, &root_key)?;
    let (cert, key) = (path_str(&cert)?, path_str(&key)?);
    let with_cert = |extra: &[&str]| {
        let mut args = vec!["--cert", cert, "--key", key];
        args.extend_from_slice(extra);
        hbone_client(&c, &root, &args)
    };
    let authority = |ip: &str, port: u16| format!("{ip}:{port}");
    let before = scrape(&c.node_b, NODE_B)?;

    // Allowed: the handshake as specified, 200, the payload echoed, END_STREAM both ways.
    let sent = payload();
    let sent_hex = hex(&sent);
    let ok = with_cert(&[
        "--authority",
        &authority(&c.server_b.ip, ECHO_PORT),
        "--payload-hex",
        &sent_hex,
    ])?;
    let ctx = |what: &str, v: &Value| format!("{what}: {v}\n{}", c.logs());
    assert_eq!(ok["tls"], "TLSv1.3", "{}", ctx("TLS version", &ok));
    assert_eq!(ok["alpn"], "h2", "{}", ctx("ALPN", &ok));
    assert_eq!(
        ok["peer_uris"],
        serde_json::json!([NODE_ID]),
        "{}",
        ctx(
            "a client without SNI on the node address gets the node identity",
            &ok
        )
    );
    assert_eq!(
        ok["status"],
        200,
        "{}",
        ctx("CONNECT to an allowed port", &ok)
    );
    assert_eq!(
        ok["server_end_stream"],
        true,
        "{}",
        ctx(
            "the server ends the stream after the echo server closed",
            &ok
        )
    );
    let echoed = ok["echo_hex"].as_str().unwrap_or_default();
    assert_eq!(echoed.len(), sent_hex.len(), "echoed length");
    assert!(echoed == sent_hex, "the echo differs from the payload");

    // A port the policy denies this identity: 401; not a workload of node b (a pod of node a,
    // then an address of no pod): 400. Each response ends the stream; a reset of the still-open
    // request side after it must say NO_ERROR (RFC 9113 8.1).
    let refusals = [
        (c.server_b.ip.as_str(), DENIED_PORT, 401),
        (c.server_a.ip.as_str(), ECHO_PORT, 400),
        ("10.32.200.2", ECHO_PORT, 400),
    ];
    for (ip, port, status) in refusals {
        let r = with_cert(&["--authority", &authority(ip, port)])?;
        let what = format!("CONNECT {ip}:{port}");
        assert_eq!(r["status"], status, "{}", ctx(&what, &r));
        assert_eq!(
            r["server_end_stream"],
            true,
            "{}",
            ctx(&format!("{what}: the response ends the stream"), &r)
        );
        if let Some(code) = r.get("reset") {
            assert_eq!(code, 0, "{}", ctx(&format!("{what}: reset code"), &r));
        }
    }

    // No client certificate: refused (in TLS 1.3 the alert comes after the client's handshake).
    let anonymous = hbone_client(
        &c,
        &root,
        &["--authority", &authority(&c.server_b.ip, ECHO_PORT)],
    )?;
    ensure!(
        anonymous["refused"]
            .as_str()
            .is_some_and(|r| r.contains("alert certificate required"))
            && anonymous.get("status").is_none(),
        "{}",
        ctx(
            "a client without a certificate must be refused with a certificate_required alert",
            &anonymous
        )
    );
    eprintln!("no client certificate: {}", anonymous["refused"]);

    // A certificate for the same identity from a CA the mesh does not trust: refused.
    let (foreign_root, foreign_key) = foreign_ca(keys.path())?;
    let (fcert, fkey) = issue_client(
        keys.path(),
        "foreign",
        CLIENT_ID,
        &foreign_root,
        &foreign_key,
    )?;
    let foreign = hbone_client(
        &c,
        &root,
        &[
            "--cert",
            path_str(&fcert)?,
            "--key",
            path_str(&fkey)?,
            "--authority",
            &authority(&c.server_b.ip, ECHO_PORT),
        ],
    )?;
    ensure!(
        foreign["refused"]
            .as_str()
            .is_some_and(|r| r.contains("alert"))
            && foreign.get("status").is_none(),
        "{}",
        ctx(
            "a certificate from another CA must be refused with a TLS alert",
            &foreign
        )
    );
    eprintln!("foreign CA: {}", foreign["refused"]);

    // Node b accounts for the third-party client like for a peer node: the echoed stream as
    // mTLS traffic of the client's principal (no `forwarded` header: the source workload is
    // unknown), each refusal and each failed handshake once.
    let dst = ["reporter=\"destination\""];
    let principal = format!("source_principal=\"{CLIENT_ID}\"");
    let ok_series = [
        dst[0],
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
        &principal,
        "destination_workload=\"server-b\"",
    ];
    let closed = "istio_tcp_connections_closed_total";
    let bytes = u64::try_from(sent.len())?;
    let failed = "istio_tcp_connections_failed_total";
    let tls_failures = "nodemesh_tls_handshake_failures_total";
    let expected = [
        ("istio_tcp_connections_opened_total", &ok_series[..], 1),
        (closed, &ok_series[..], 1),
        ("istio_tcp_received_bytes_total", &ok_series[..], bytes),
        ("istio_tcp_sent_bytes_total", &ok_series[..], bytes),
        (failed, &[dst[0], "response_flags=\"DENY\""][..], 1),
        (failed, &[dst[0], "response_flags=\"BAD_REQUEST\""][..], 2),
        (tls_failures, &["reason=\"no_certificate\""][..], 1),
        (tls_failures, &["reason=\"untrusted_chain\""][..], 1),
    ];
    // A server records some of these just after its answer reached the client: wait for all.
    let after = scrape_until(
        &c.node_b,
        NODE_B,
        "the third-party client's accounting",
        |m| {
            expected
                .iter()
                .all(|(metric, labels, want)| delta(&before, m, metric, labels) >= *want)
        },
    )?;
    for (metric, labels, want) in expected {
        assert_eq!(
            delta(&before, &after, metric, labels),
            want,
            "{metric} {labels:?} on node b:\n{after}"
        );
    }

    // OpenSSL's own client: TLS 1.3, h2, the server's chain verified against the mesh root.
    let server = format!("{NODE_B}:{HBONE_PORT}");
    let s_client = in_node_a(
        &c,
        "openssl",
        &[
            "s_client",
            "-connect",
            &server,
            "-noservername",
            "-tls1_3",
            "-alpn",
            "h2",
            "-cert",
            cert,
            "-key",
            key,
            "-CAfile",
            path_str(&root)?,
            "-verify_return_error",
        ],
    )?;
    // TLS 1.3 prints the `SSL-Session:` block (`Protocol  : TLSv1.3`) only when a session ticket
    // arrives, and the tunnel sends none (resumption is off): the protocol is on the `New,` line.
    for want in [
        "New, TLSv1.3, Cipher is TLS_",
        "ALPN protocol: h2",
        "Verify return code: 0 (ok)",
    ] {
        assert!(
            s_client.contains(want),
            "openssl s_client output lacks `{want}`:\n{s_client}"
        );
    }
    Ok(())
}
