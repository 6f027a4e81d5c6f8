//! `cargo xtask k8s build|up|down|env|status`: a real Kubernetes control plane (kube-apiserver,
//! etcd, kubectl, helm) built from the Go module proxy, for the tests and for trying nodemesh by
//! hand.
//!
//! - `build` compiles the four binaries once into a cache outside the repository, keyed by the
//!   pinned versions (`xtask/k8s/versions.env`) and the Go modules (`xtask/k8s/go/`):
//!   `$XDG_CACHE_HOME/nodemesh/k8s/<key>/bin` (default `~/.cache/nodemesh/k8s/<key>/bin`). Every
//!   clone of the repository shares it, as it shares Go's module and build caches. A file lock
//!   serialises concurrent builds; the binaries are built into a temporary directory that is
//!   renamed into place only when all four are there, so a half-built cache is never used. The
//!   path of the bin directory is written to `target/k8s-bin-dir` for the tests.
//! - `up`, `down`, `status` run the tests crate's `nm-k8s` binary (as `cargo xtask lab` runs
//!   `nm-lab`: xtask does not depend on mesh-agent), which shares its code with the test harness
//!   `nodemesh_tests::k8s`. State lives in `target/k8s/`. `env` only prints the exports.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    build_ebpf,
    util::{cargo_target_dir, exec, output, which, workspace_root},
};

#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub command: K8sCommand,
}

#[derive(clap::Subcommand)]
pub enum K8sCommand {
    /// Build kube-apiserver, kubectl, etcd and helm into the cache (seconds when cached; the
    /// first run takes about 10 minutes on 2 cores).
    Build,
    /// Start etcd and kube-apiserver on 127.0.0.1 and write an admin kubeconfig
    /// (target/k8s/admin.kubeconfig).
    Up {
        /// Passed to `nm-k8s up` (`--api-port P`, `--etcd-port P`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Stop what `up` started (also after a crash) and remove target/k8s.
    Down,
    /// Print the shell exports for the control plane (`eval "$(cargo xtask k8s env)"`).
    Env,
    /// Whether the control plane is up and ready.
    Status,
}

/// The file of pinned versions, relative to the workspace root.
const VERSIONS_FILE: &str = "xtask/k8s/versions.env";
/// The Go modules, relative to the workspace root.
const GO_DIR: &str = "xtask/k8s/go";
/// Where `build` records the bin directory for the tests, relative to the workspace root.
pub const BIN_DIR_POINTER: &str = "target/k8s-bin-dir";
/// The environment variable that passes the bin directory to the tests.
pub const BIN_ENV: &str = "NODEMESH_K8S_BIN";
/// The binaries a complete cache holds.
const BINARIES: [&str; 4] = ["kube-apiserver", "kubectl", "etcd", "helm"];
/// Bumped when the way the binaries are built changes (flags, layout), so old caches are not
/// taken for new ones.
const RECIPE: &str = "1";

pub fn run(opts: Options) -> Result<()> {
    match opts.command {
        K8sCommand::Build => build().map(|_| ()),
        K8sCommand::Up { args } => {
            let bin = build()?;
            nm_k8s(&bin, "up", &args)
        }
        K8sCommand::Down => nm_k8s(&bin_dir_quiet()?, "down", &[]),
        K8sCommand::Env => print_env(),
        K8sCommand::Status => nm_k8s(&bin_dir_quiet()?, "status", &[]),
    }
}

/// Builds the tests crate's binaries and runs `nm-k8s VERB ARGS` from the workspace root with
/// the bin directory in [`BIN_ENV`].
fn nm_k8s(bin: &Path, verb: &str, args: &[String]) -> Result<()> {
    let root = workspace_root();
    build_ebpf::run(build_ebpf::Options::default())?;
    exec(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "-p", "nodemesh-tests", "--bin", "nm-k8s"]),
    )?;
    exec(
        Command::new(cargo_target_dir().join("debug/nm-k8s"))
            .current_dir(&root)
            .env(BIN_ENV, bin)
            .arg(verb)
            .args(args),
    )
}

/// `env`: only the exports on stdout (for `eval`), nothing built.
fn print_env() -> Result<()> {
    let root = workspace_root();
    let bin = bin_dir_quiet()?;
    let kubeconfig = root.join("target/k8s/admin.kubeconfig");
    if !complete(&bin) {
        eprintln!("# the binaries are not built yet: run `cargo xtask k8s up`");
    } else if !kubeconfig.is_file() {
        eprintln!("# the control plane is not up: run `cargo xtask k8s up`");
    }
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    println!(
        "export KUBECONFIG={}\nexport PATH={}:\"$PATH\"",
        quote(&kubeconfig),
        quote(&bin)
    );
    Ok(())
}

/// The versions pinned in `xtask/k8s/versions.env`.
struct Versions {
    kubernetes: String,
    staging: String,
    etcd: String,
    helm: String,
    /// The file's text (part of the cache key).
    text: String,
}

fn read_versions(root: &Path) -> Result<Versions> {
    let path = root.join(VERSIONS_FILE);
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let get = |key: &str| -> Result<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .with_context(|| format!("{} has no {key}=…", path.display()))
    };
    Ok(Versions {
        kubernetes: get("KUBERNETES_VERSION")?,
        staging: get("KUBERNETES_STAGING_VERSION")?,
        etcd: get("ETCD_VERSION")?,
        helm: get("HELM_VERSION")?,
        text,
    })
}

/// Refuses to build when the Go modules require other versions than versions.env pins.
fn check_go_modules(root: &Path, v: &Versions) -> Result<()> {
    let go_dir = root.join(GO_DIR);
    let kube = fs::read_to_string(go_dir.join("kube/go.mod"))?;
    let etcd = fs::read_to_string(go_dir.join("etcd/go.mod"))?;
    let mut wrong = Vec::new();
    if !kube.contains(&format!("k8s.io/kubernetes {}", v.kubernetes)) {
        wrong.push(format!(
            "kube/go.mod does not require k8s.io/kubernetes {}",
            v.kubernetes
        ));
    }
    for line in kube.lines().filter(|l| l.contains("=>")) {
        if !line.trim_end().ends_with(&v.staging) {
            wrong.push(format!(
                "kube/go.mod: `{}` is not at {}",
                line.trim(),
                v.staging
            ));
        }
    }
    if !etcd.contains(&format!("go.etcd.io/etcd/server/v3 {}", v.etcd)) {
        wrong.push(format!(
            "etcd/go.mod does not require go.etcd.io/etcd/server/v3 {}",
            v.etcd
        ));
    }
    ensure!(
        wrong.is_empty(),
        "the Go modules in {GO_DIR} do not match {VERSIONS_FILE}:\n  {}\nchange both together \
         (edit go.mod, then run `go mod tidy` in that directory) and commit go.mod and go.sum",
        wrong.join("\n  ")
    );
    Ok(())
}

/// FNV-1a, 64 bits: a cache key that is stable across Rust releases (unlike `DefaultHasher`).
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain([0u8].iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The `go` binary and its version line.
pub fn find_go() -> Result<(PathBuf, String)> {
    let go = which("go")
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|p| p.is_file()))
        .context(
            "Go is not installed: building the Kubernetes control plane needs Go >= 1.26 \
             (https://go.dev/dl; Debian's golang package is too old). Put `go` on PATH.",
        )?;
    let version = output(Command::new(&go).arg("version"))
        .with_context(|| format!("`{} version` failed", go.display()))?;
    let minor = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.strip_prefix("go1."))
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse::<u32>().ok());
    ensure!(
        minor.is_some_and(|m| m >= 26),
        "{} is `{}`: etcd {} needs Go >= 1.26",
        go.display(),
        version.trim(),
        "v3.6"
    );
    Ok((go, version.trim().to_owned()))
}

/// `$XDG_CACHE_HOME/nodemesh/k8s` or `~/.cache/nodemesh/k8s`.
fn cache_root() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("nodemesh/k8s"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_CACHE_HOME nor HOME is set: cannot place the Kubernetes cache")?;
    Ok(PathBuf::from(home).join(".cache/nodemesh/k8s"))
}

/// The cache key: the versions in its name, a hash of everything that shapes the binaries.
fn cache_key(root: &Path, v: &Versions, go_version: &str) -> Result<String> {
    let go_dir = root.join(GO_DIR);
    let mut files = Vec::new();
    for f in ["kube/go.mod", "kube/go.sum", "etcd/go.mod", "etcd/go.sum"] {
        let p = go_dir.join(f);
        files.push(fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?);
    }
    let mut parts: Vec<&[u8]> = vec![RECIPE.as_bytes(), v.text.as_bytes(), go_version.as_bytes()];
    parts.extend(files.iter().map(Vec::as_slice));
    Ok(format!(
        "k8s-{}-etcd-{}-helm-{}-{:016x}",
        v.kubernetes,
        v.etcd,
        v.helm,
        fnv1a(&parts)
    ))
}

fn complete(bin: &Path) -> bool {
    BINARIES.iter().all(|b| bin.join(b).is_file())
}

/// The bin directory without building (for `down`, `env`, `status`): the cached one for the
/// pinned versions, whether or not it exists yet.
fn bin_dir_quiet() -> Result<PathBuf> {
    let root = workspace_root();
    let v = read_versions(&root)?;
    let (_, go_version) = find_go()?;
    Ok(cache_root()?
        .join(cache_key(&root, &v, &go_version)?)
        .join("bin"))
}

/// Builds the binaries unless the cache has them; returns the bin directory and records it in
/// [`BIN_DIR_POINTER`].
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    let v = read_versions(&root)?;
    check_go_modules(&root, &v)?;
    let (go, go_version) = find_go()?;
    let key = cache_key(&root, &v, &go_version)?;
    let cache = cache_root()?;
    let dir = cache.join(&key);
    let bin = dir.join("bin");
    if !complete(&bin) {
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
        let lock_path = dir.join("build.lock");
        let lock = fs::File::create(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            println!(
                "k8s build: another build of {key} is running; waiting for it ({})",
                lock_path.display()
            );
            lock.lock()
                .with_context(|| format!("cannot lock {}", lock_path.display()))?;
        }
        // Under the lock: another build may have finished meanwhile.
        if !complete(&bin) {
            compile(&root, &go, &v, &dir, &bin)?;
        }
        drop(lock);
    }
    let pointer = root.join(BIN_DIR_POINTER);
    if let Some(parent) = pointer.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&pointer, format!("{}\n", bin.display()))
        .with_context(|| format!("cannot write {}", pointer.display()))?;
    println!(
        "k8s build: kube-apiserver and kubectl {}, etcd {}, helm {} in {}",
        v.kubernetes,
        v.etcd,
        v.helm,
        bin.display()
    );
    Ok(bin)
}

fn compile(root: &Path, go: &Path, v: &Versions, dir: &Path, bin: &Path) -> Result<()> {
    println!(
        "k8s build: building the Kubernetes control plane from the Go module proxy into\n  {}\n\
         The first build takes about 10 minutes on 2 idle cores (over 30 on a busy machine) and \
         2 GB of RAM, and fills Go's module and build caches (about 3.5 GB, shared by every \
         clone); later runs reuse the binaries and take seconds.",
        bin.display()
    );
    if bin.exists() {
        // Incomplete (someone removed a binary): rebuild it whole.
        fs::remove_dir_all(bin).with_context(|| format!("cannot remove {}", bin.display()))?;
    }
    // Leftovers of interrupted builds (we hold the lock, so none is running).
    for entry in fs::read_dir(dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("bin.tmp-") {
            fs::remove_dir_all(entry.path()).ok();
        }
    }
    let tmp = dir.join(format!("bin.tmp-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let go_dir = root.join(GO_DIR);
    let version_flags = kube_version_ldflags(&v.kubernetes)?;
    let started = Instant::now();
    let steps: [(&str, &str, Vec<String>); 3] = [
        (
            "kube-apiserver",
            "kube",
            vec![
                "build".into(),
                "-ldflags".into(),
                version_flags.clone(),
                "-o".into(),
                tmp.join("kube-apiserver").display().to_string(),
                "k8s.io/kubernetes/cmd/kube-apiserver".into(),
            ],
        ),
        (
            "kubectl",
            "kube",
            vec![
                "build".into(),
                "-ldflags".into(),
                version_flags,
                "-o".into(),
                tmp.join("kubectl").display().to_string(),
                "k8s.io/kubernetes/cmd/kubectl".into(),
            ],
        ),
        (
            "etcd",
            "etcd",
            vec![
                "build".into(),
                "-ldflags".into(),
                "-s -w".into(),
                "-o".into(),
                tmp.join("etcd").display().to_string(),
                "go.etcd.io/etcd/server/v3".into(),
            ],
        ),
    ];
    for (name, module, args) in steps {
        let t = Instant::now();
        println!("k8s build: {name} …");
        exec(go_command(go).current_dir(go_dir.join(module)).args(&args))
            .with_context(|| format!("building {name} failed"))?;
        println!("k8s build: {name} done in {:.0?}", t.elapsed());
    }
    let t = Instant::now();
    println!("k8s build: helm …");
    // `go install pkg@version` builds with helm's own go.mod (checked against the checksum
    // database); run it outside our modules.
    exec(go_command(go).current_dir(&tmp).env("GOBIN", &tmp).args([
        "install",
        "-ldflags",
        &format!(
            "-s -w -X helm.sh/helm/v3/internal/version.version={}",
            v.helm
        ),
        &format!("helm.sh/helm/v3/cmd/helm@{}", v.helm),
    ]))
    .context("building helm failed")?;
    println!("k8s build: helm done in {:.0?}", t.elapsed());
    ensure!(
        complete(&tmp),
        "the build left {} incomplete",
        tmp.display()
    );
    fs::write(dir.join("versions.env"), &v.text)?;
    fs::rename(&tmp, bin)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), bin.display()))?;
    println!("k8s build: all four built in {:.0?}", started.elapsed());
    Ok(())
}

fn go_command(go: &Path) -> Command {
    let mut cmd = Command::new(go);
    // Go's default module and build caches (GOMODCACHE, GOCACHE) stay as they are: warm across
    // clones. `-buildvcs=false`: nothing here is built from a VCS checkout.
    cmd.env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-trimpath -buildvcs=false");
    cmd
}

/// `-X` flags so `/version` and `kubectl version` report the release instead of
/// `v0.0.0-master` (which confuses kubectl and Helm's kubeVersion checks).
fn kube_version_ldflags(version: &str) -> Result<String> {
    let mut parts = version.trim_start_matches('v').split('.');
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        bail!("KUBERNETES_VERSION `{version}` is not vMAJOR.MINOR.PATCH");
    };
    let mut flags = String::from("-s -w");
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        flags.push_str(&format!(
            " -X {pkg}.gitVersion={version} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} \
             -X {pkg}.gitTreeState=clean"
        ));
    }
    Ok(flags)
}
