//! The implementation guide's docs test (issue 16): `docs/guide.ko.md` (Korean, the primary text)
//! and `docs/guide.md` (English) must keep the template's eight sections, hold the same runnable
//! commands block for block, link only to files and anchors that exist, name every value of the
//! chart's `values.yaml` with its default and every flag of `mesh-agent node` and `controller`,
//! and draw the architecture with a Graphviz source and SVG that render and a Mermaid version
//! naming the same components. Then the commands themselves run:
//!
//! - `run: host` blocks on this machine (read-only checks; no root needed);
//! - `run: lab` blocks, in order, against a lab of the test's own (root). The guide's commands
//!   use the default lab (`cargo xtask lab …`, prefix `nm-lab`, state in `target/lab`); the test
//!   does not serialise against a user's lab but renames it: each block runs in a scratch
//!   workspace whose `target/lab` is this lab's state directory (with `charts/`, `docs/` and
//!   `tests/` linked to the repository), with a shell function `cargo` that turns
//!   `cargo xtask lab ARGS` into `nm-lab --prefix nmguide --state-dir target/lab ARGS` (and `up`
//!   into `up --config` of the lab file copied with its namespaces renamed), as
//!   `tests/tests/lab_twice.rs` does. So the test runs beside a user's lab and beside the other
//!   lab tests (prefixes `nmlabt`, `nmlabu`, `nmlabk`, `nm-bench`);
//! - `run: lab-k8s` blocks the same way with the prefix `nmguidek` (`up --kubernetes` publishes
//!   the lab's API on an ephemeral loopback port, so two such labs never collide), `kubectl` and
//!   `helm` from the control-plane binaries of `cargo xtask k8s build` (what `cargo xtask lab
//!   env` puts on `PATH`).
//!
//! Each block runs in `bash` with `set -e`; the environment a block exports (e.g. `KUBECONFIG`)
//! is carried to the next one. A block's expected output (`expect` marker) is checked line by
//! line; a `fails` block must exit non-zero.

#[path = "../src/guide.rs"]
mod guide;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use guide::Block;
use nodemesh_tests::{
    lab::{self, Lab},
    require_root,
};

const KO: &str = "docs/guide.ko.md";
const EN: &str = "docs/guide.md";
const LAB_PREFIX: &str = "nmguide";
/// A block that takes longer than this is killed (the lab's `up` takes about 30 s).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a `retry` block may take to behave (the agents apply a label or a policy within a
/// second or two; the lab's control plane shares two CPUs with the other tests).
const RETRY_FOR: Duration = Duration::from_secs(30);
const LAB_K8S_PREFIX: &str = "nmguidek";

/// A section: its Korean and English headings and its two subsections' (Korean, English).
type Section = (
    &'static str,
    &'static str,
    [(&'static str, &'static str); 2],
);

/// The template's sections, Korean and English, in order.
const SECTIONS: [Section; 8] = [
    (
        "1. 개요",
        "1. Overview",
        [
            ("1.1 서비스 메시 정의", "1.1 What a service mesh is"),
            (
                "1.2 필요성",
                "1.2 Why a mesh, and why sidecarless with eBPF",
            ),
        ],
    ),
    (
        "2. 요구 사항",
        "2. Requirements",
        [
            ("2.1 시스템 요구 사항", "2.1 System requirements"),
            ("2.2 네트워크 요구 사항", "2.2 Network requirements"),
        ],
    ),
    (
        "3. 아키텍처 설계",
        "3. Architecture",
        [
            ("3.1 구성 요소", "3.1 Components"),
            ("3.2 아키텍처 다이어그램", "3.2 Architecture diagram"),
        ],
    ),
    (
        "4. 설치 및 설정",
        "4. Installation and configuration",
        [
            ("4.1 설치 절차", "4.1 Installation"),
            ("4.2 설정 방법", "4.2 Configuration"),
        ],
    ),
    (
        "5. 운영 및 관리",
        "5. Operations",
        [
            ("5.1 모니터링", "5.1 Monitoring"),
            ("5.2 장애 처리", "5.2 Failure handling"),
        ],
    ),
    (
        "6. 보안",
        "6. Security",
        [
            (
                "6.1 인증 및 권한 부여",
                "6.1 Authentication and authorization",
            ),
            ("6.2 데이터 암호화", "6.2 Data encryption"),
        ],
    ),
    (
        "7. 베스트 프랙티스",
        "7. Best practices",
        [
            ("7.1 성능 최적화", "7.1 Performance optimization"),
            (
                "7.2 일반적인 문제 해결",
                "7.2 Troubleshooting common problems",
            ),
        ],
    ),
    (
        "8. 승인 및 변경 이력",
        "8. Approval and change history",
        [
            ("8.1 승인 기록", "8.1 Approval record"),
            ("8.2 변경 이력", "8.2 Change history"),
        ],
    ),
];

fn root() -> PathBuf {
    nodemesh_tests::k8s::workspace_root()
}

fn read(rel: &str) -> Result<String> {
    fs::read_to_string(root().join(rel)).with_context(|| format!("cannot read {rel}"))
}

fn both() -> Result<[(&'static str, String); 2]> {
    Ok([(KO, read(KO)?), (EN, read(EN)?)])
}

#[test]
fn both_guides_have_the_eight_sections_in_order() -> Result<()> {
    for (file, md) in both()? {
        let korean = file == KO;
        let h2: Vec<String> = guide::headings(&md)
            .into_iter()
            .filter(|(l, _)| *l == 2)
            .map(|(_, t)| t)
            .collect();
        let want: Vec<&str> = SECTIONS
            .iter()
            .map(|(ko, en, _)| if korean { *ko } else { *en })
            .collect();
        ensure!(
            h2 == want,
            "{file}: the `##` sections must be exactly, in order:\n  {}\nfound:\n  {}",
            want.join("\n  "),
            h2.join("\n  ")
        );
        // Each section's two subsections, in order, inside it.
        let all = guide::headings(&md);
        for (ko, en, subs) in SECTIONS {
            let title = if korean { ko } else { en };
            let start = all
                .iter()
                .position(|(l, t)| *l == 2 && t == title)
                .context("section")?;
            let end = all[start + 1..]
                .iter()
                .position(|(l, _)| *l == 2)
                .map_or(all.len(), |p| start + 1 + p);
            let h3: Vec<&str> = all[start + 1..end]
                .iter()
                .filter(|(l, _)| *l == 3)
                .map(|(_, t)| t.as_str())
                .collect();
            let want: Vec<&str> = subs
                .iter()
                .map(|(k, e)| if korean { *k } else { *e })
                .collect();
            let mut at = 0;
            for w in &want {
                match h3[at..].iter().position(|h| h == w) {
                    Some(p) => at += p + 1,
                    None => bail!(
                        "{file}: section `{title}` needs the subsection `### {w}` (in order); it has {h3:?}"
                    ),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn korean_and_english_hold_the_same_commands() -> Result<()> {
    let [(_, ko), (_, en)] = both()?;
    let ko = guide::runnable_blocks(&ko)?;
    let en = guide::runnable_blocks(&en)?;
    ensure!(
        ko.len() == en.len(),
        "{KO} has {} runnable blocks, {EN} {}",
        ko.len(),
        en.len()
    );
    ensure!(
        en.iter().any(|b| b.env == "lab") && en.iter().any(|b| b.env == "lab-k8s"),
        "the guide has runnable blocks for the lab and the lab in Kubernetes mode"
    );
    for (k, e) in ko.iter().zip(&en) {
        ensure!(
            (&k.env, k.fails, &k.code, &k.expect) == (&e.env, e.fails, &e.code, &e.expect),
            "runnable block differs: {KO} line {} vs {EN} line {}:\n{k:#?}\n{e:#?}",
            k.line,
            e.line
        );
    }
    Ok(())
}

#[test]
fn links_and_anchors_resolve_and_the_readme_links_the_guide() -> Result<()> {
    let docs = root().join("docs");
    for (file, md) in both()? {
        let own = guide::anchors(&md);
        for link in guide::links(&md) {
            if link.starts_with("http://") || link.starts_with("https://") {
                let rest = link.split_once("://").map(|(_, r)| r).unwrap_or_default();
                ensure!(
                    !rest.is_empty() && !rest.contains(char::is_whitespace) && rest.contains('.'),
                    "{file}: malformed external link `{link}`"
                );
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                None
            } else {
                let t = docs.join(path);
                ensure!(
                    t.exists(),
                    "{file}: link `{link}`: {} does not exist",
                    t.display()
                );
                Some(t)
            };
            if let Some(a) = anchor {
                let anchors = match &target {
                    None => own.clone(),
                    Some(t) if t.extension().is_some_and(|e| e == "md") => {
                        guide::anchors(&fs::read_to_string(t)?)
                    }
                    Some(_) => continue,
                };
                ensure!(
                    anchors.contains(a),
                    "{file}: link `{link}`: no heading with the anchor `#{a}`"
                );
            }
        }
    }
    let readme = read("README.md")?;
    for g in ["docs/guide.ko.md", "docs/guide.md"] {
        ensure!(readme.contains(&format!("({g})")), "README.md links {g}");
    }
    // The first screen keeps exactly its two commands.
    let first = guide::fences(&readme)?
        .into_iter()
        .next()
        .context("README has a code block")?;
    let commands: Vec<&str> = first
        .text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        commands.len() == 2
            && commands[0].starts_with("cargo xtask lab ")
            && commands[1].starts_with("cargo xtask test "),
        "README's first block keeps its two commands: {commands:?}"
    );
    Ok(())
}

/// A YAML block written right after a link to one of `docs/examples/` is that file, value for
/// value (the reader copies one or the other).
#[test]
fn yaml_shown_beside_an_example_file_is_that_file() -> Result<()> {
    for (file, md) in both()? {
        let lines: Vec<&str> = md.lines().collect();
        let mut compared = 0;
        for fence in guide::fences(&md)?.iter().filter(|f| f.info == "yaml") {
            // The fence's own line is 1-based: the three lines above it.
            let above = lines[fence.line.saturating_sub(4)..fence.line - 1].join("\n");
            let Some(example) = above
                .split("](examples/")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
            else {
                continue;
            };
            let shown: serde_norway::Value = serde_norway::from_str(&fence.text)
                .with_context(|| format!("{file}:{}: the YAML block", fence.line))?;
            let on_disk: serde_norway::Value =
                serde_norway::from_str(&read(&format!("docs/examples/{example}"))?)?;
            ensure!(
                shown == on_disk,
                "{file}:{}: the YAML shown differs from docs/examples/{example}",
                fence.line
            );
            compared += 1;
        }
        ensure!(compared > 0, "{file}: no YAML block beside an example file");
    }
    Ok(())
}

/// How a default from values.yaml is written in the guide's table.
fn yaml_default(v: &serde_norway::Value) -> String {
    match v {
        serde_norway::Value::String(s) if s.is_empty() => "\"\"".to_owned(),
        serde_norway::Value::String(s) => s.clone(),
        serde_norway::Value::Bool(b) => b.to_string(),
        serde_norway::Value::Number(n) => n.to_string(),
        serde_norway::Value::Sequence(s) if s.is_empty() => "[]".to_owned(),
        serde_norway::Value::Mapping(m) if m.is_empty() => "{}".to_owned(),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

fn flow_yaml_equal(written: &str, v: &serde_norway::Value) -> bool {
    serde_norway::from_str::<serde_norway::Value>(written).is_ok_and(|w| &w == v)
}

#[test]
fn every_chart_value_is_in_the_settings_table_with_its_default() -> Result<()> {
    let values: serde_norway::Value =
        serde_norway::from_str(&read("charts/nodemesh/values.yaml")?)?;
    let leaves = guide::yaml_leaves(&values);
    ensure!(
        leaves.len() > 50,
        "values.yaml read: {} leaves",
        leaves.len()
    );
    for (file, md) in both()? {
        let header = if file == KO { "값" } else { "value" };
        let rows = guide::table_rows(&md, header);
        let mut documented = BTreeSet::new();
        for (path, v) in &leaves {
            // A row for the path itself, or for a mapping above it (`agent.nodeSelector`).
            let row = rows.iter().find(|r| {
                r[0] == *path
                    || path
                        .strip_prefix(r[0].as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            });
            let row = row.with_context(|| {
                format!("{file}: the value `{path}` of charts/nodemesh/values.yaml is not in the settings table (| {header} | … |)")
            })?;
            documented.insert(row[0].clone());
            if row[0] == *path {
                let want = yaml_default(v);
                let cell = row.get(1).map(String::as_str).unwrap_or_default();
                ensure!(
                    cell == want || flow_yaml_equal(cell, v),
                    "{file}: `{path}`: the table says the default is `{cell}`, values.yaml `{want}`"
                );
            }
        }
        // A row for a mapping (`agent.nodeSelector`) states the whole mapping as its default.
        for r in rows
            .iter()
            .filter(|r| !leaves.iter().any(|(p, _)| *p == r[0]))
        {
            let v = r[0]
                .split('.')
                .try_fold(&values, |v, k| v.get(k))
                .with_context(|| format!("{file}: `{}` is not in values.yaml", r[0]))?;
            let cell = r.get(1).map(String::as_str).unwrap_or_default();
            ensure!(
                flow_yaml_equal(cell, v),
                "{file}: `{}`: the table says the default is `{cell}`, values.yaml `{}`",
                r[0],
                yaml_default(v)
            );
        }
        for r in &rows {
            ensure!(
                documented.contains(&r[0]),
                "{file}: the settings table names `{}`, which values.yaml does not have",
                r[0]
            );
        }
    }
    Ok(())
}

/// The long flags `nm-agent <sub> --help` lists (the same command line as `mesh-agent`).
fn flags_of(sub: &str) -> Result<BTreeSet<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_nm-agent"))
        .args([sub, "--help"])
        .output()?;
    ensure!(out.status.success(), "`nm-agent {sub} --help` fails");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut flags = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[') {
        if let Some(name) = word.strip_prefix("--") {
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() && name != "help" && name != "version" {
                flags.insert(format!("--{name}"));
            }
        }
    }
    Ok(flags)
}

#[test]
fn every_agent_and_controller_flag_is_documented() -> Result<()> {
    for sub in ["node", "controller", "local"] {
        let flags = flags_of(sub)?;
        ensure!(flags.len() > 5, "flags of `{sub}` read: {flags:?}");
        for (file, md) in both()? {
            for f in &flags {
                ensure!(
                    md.contains(&format!("`{f}`")) || md.contains(&format!("`{f} ")),
                    "{file}: the flag `{f}` of `mesh-agent {sub}` is not documented"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_architecture_diagram_renders_and_matches_the_mermaid_version() -> Result<()> {
    let dir = root().join("docs/diagrams");
    let dot_src = fs::read_to_string(dir.join("architecture.dot"))?;
    let svg = dir.join("architecture.svg");
    let tmp = tempfile::tempdir()?;
    let tool = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd.output().with_context(|| {
            format!("cannot run {what}: install Debian's graphviz and librsvg2-bin (`cargo xtask setup` does)")
        })?;
        ensure!(
            out.status.success(),
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let png_of_dot = tmp.path().join("dot.png");
    tool(
        Command::new("dot")
            .arg("-Tpng")
            .arg(dir.join("architecture.dot"))
            .arg("-o")
            .arg(&png_of_dot),
        "dot -Tpng architecture.dot",
    )?;
    let png_of_svg = tmp.path().join("svg.png");
    tool(
        Command::new("rsvg-convert")
            .arg("--format=png")
            .arg("--output")
            .arg(&png_of_svg)
            .arg(&svg),
        "rsvg-convert architecture.svg",
    )?;
    for png in [&png_of_dot, &png_of_svg] {
        let bytes = fs::read(png)?;
        ensure!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
            "{} is not a rendered diagram ({} bytes)",
            png.display(),
            bytes.len()
        );
    }
    // The SVG is the rendering of this source: every node is in it (Graphviz writes each node's
    // name as its <title>).
    let svg_text = fs::read_to_string(&svg)?;
    let nodes = guide::dot_nodes(&dot_src);
    ensure!(nodes.len() >= 10, "nodes of architecture.dot: {nodes:?}");
    for n in &nodes {
        ensure!(
            svg_text.contains(&format!("<title>{n}</title>")),
            "architecture.svg lacks the node `{n}`: regenerate it with `dot -Tsvg docs/diagrams/architecture.dot -o docs/diagrams/architecture.svg`"
        );
    }
    for (file, md) in both()? {
        let mermaid: Vec<_> = guide::fences(&md)?
            .into_iter()
            .filter(|f| f.info == "mermaid")
            .collect();
        ensure!(
            mermaid.len() == 1,
            "{file}: one Mermaid diagram, found {}",
            mermaid.len()
        );
        let m =
            guide::mermaid_nodes(&mermaid[0].text).with_context(|| format!("{file}: Mermaid"))?;
        ensure!(
            m == nodes,
            "{file}: the Mermaid diagram names {m:?}, architecture.dot {nodes:?}"
        );
        ensure!(
            md.contains("(diagrams/architecture.svg)"),
            "{file} shows diagrams/architecture.svg"
        );
    }
    Ok(())
}

#[test]
fn alert_queries_name_real_metrics() -> Result<()> {
    let metrics_doc = read("docs/metrics.md")?;
    for (file, md) in both()? {
        let blocks: Vec<_> = guide::fences(&md)?
            .into_iter()
            .filter(|f| f.info == "promql")
            .collect();
        ensure!(!blocks.is_empty(), "{file}: alerts in a ```promql block");
        let mut n = 0;
        for b in blocks {
            for line in b.text.lines().filter(|l| !l.trim_start().starts_with('#')) {
                for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("istio_") || word.starts_with("nodemesh_") {
                        n += 1;
                        let base = ["_bucket", "_count", "_sum"]
                            .iter()
                            .find_map(|s| word.strip_suffix(s))
                            .unwrap_or(word);
                        ensure!(
                            metrics_doc.contains(&format!("`{base}`")),
                            "{file}: the alert's metric `{word}` is not in docs/metrics.md"
                        );
                    }
                }
            }
        }
        ensure!(n >= 5, "{file}: alerts name metrics ({n})");
    }
    Ok(())
}

/// Runs `blocks` one by one in `workdir` with `env`, each in `bash -e` after `preamble`, the
/// environment carried between blocks; checks exit statuses and expected output. A `retry` block
/// is run again, once a second for up to [`RETRY_FOR`], until it behaves as expected.
fn run_blocks(
    blocks: &[Block],
    workdir: &Path,
    preamble: &str,
    env: &[(&str, String)],
) -> Result<()> {
    let state = workdir.join(".guide-env");
    for b in blocks {
        let script = format!(
            "exec 2>&1\nset -e\ncd {wd}\n[ -f {st} ] && . {st}\ntrap 'export -p > {st}' EXIT\n{preamble}\n{code}\n",
            wd = shell_quote(workdir),
            st = shell_quote(&state),
            code = b.code
        );
        let deadline = Instant::now() + if b.retry { RETRY_FOR } else { Duration::ZERO };
        let mut attempt = 1;
        loop {
            let result = run_block(b, &script, workdir, env);
            match result {
                Err(e) if b.retry && Instant::now() < deadline => {
                    eprintln!(
                        "(attempt {attempt} of the block at line {}: {e:#}; again)",
                        b.line
                    );
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                other => {
                    other?;
                    break;
                }
            }
        }
    }
    Ok(())
}

fn run_block(b: &Block, script: &str, workdir: &Path, env: &[(&str, String)]) -> Result<()> {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "--kill-after=10",
        &BLOCK_TIMEOUT.as_secs().to_string(),
        "bash",
        "-c",
        script,
    ])
    .current_dir(workdir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().context("cannot run bash")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("--- {EN} line {}:\n{}\n--- output:\n{text}", b.line, b.code);
    ensure!(
        out.status.code() != Some(124),
        "the block at {EN} line {} timed out",
        b.line
    );
    ensure!(
        out.status.success() != b.fails,
        "the block at {EN} line {} {} ({}):\n{}\noutput:\n{text}",
        b.line,
        if b.fails {
            "should fail but succeeded"
        } else {
            "failed"
        },
        out.status,
        b.code
    );
    if let Some(expect) = &b.expect {
        guide::check_expected(expect, &text)
            .with_context(|| format!("the block at {EN} line {}", b.line))?;
    }
    Ok(())
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn host_checks_of_the_requirements_pass() -> Result<()> {
    let blocks: Vec<Block> = guide::runnable_blocks(&read(EN)?)?
        .into_iter()
        .filter(|b| b.env == "host")
        .collect();
    ensure!(!blocks.is_empty(), "the guide has host checks");
    let tmp = tempfile::tempdir()?;
    run_blocks(&blocks, tmp.path(), "", &[])
}

/// A scratch workspace for the lab blocks: `charts`, `docs`, `tests` linked to the repository,
/// `target/` for the lab's state, and the lab file with its namespaces renamed to `prefix`.
fn scratch_workspace(dir: &Path, prefix: &str) -> Result<PathBuf> {
    for d in ["charts", "docs", "tests"] {
        std::os::unix::fs::symlink(root().join(d), dir.join(d))?;
    }
    fs::create_dir_all(dir.join("target"))?;
    let files = dir.join("lab-files");
    fs::create_dir_all(&files)?;
    lab::files_for_prefix(&files, prefix)
}

/// `cargo xtask lab ARGS` as the test's own lab (see the module comment; `lab env` prints the
/// exports `cargo xtask lab env` prints, for this lab's state directory and the test's
/// control-plane binaries); any other `cargo` command is refused, so the guide cannot slip in a
/// command the test does not run.
const LAB_SHIM: &str = r#"
cargo() {
  if [ "$1" = xtask ] && [ "$2" = lab ]; then
    shift 2
    case "${1:-up}" in
      up) [ $# -gt 0 ] && shift
          "$NM_GUIDE_LAB" --prefix "$NM_GUIDE_PREFIX" --state-dir "$PWD/target/lab" up "$@" --config "$NM_GUIDE_CONFIG" ;;
      env) printf 'export KUBECONFIG=%q\nexport PATH=%q:"$PATH"\n' "$PWD/target/lab/kubeconfig" "$NODEMESH_K8S_BIN" ;;
      *)  "$NM_GUIDE_LAB" --prefix "$NM_GUIDE_PREFIX" --state-dir "$PWD/target/lab" "$@" ;;
    esac
  else
    echo "the docs test runs only 'cargo xtask lab ...'; got: cargo $*" >&2
    return 127
  fi
}
"#;

#[test]
fn the_local_lab_walkthrough_runs_as_written() -> Result<()> {
    require_root();
    let blocks: Vec<Block> = guide::runnable_blocks(&read(EN)?)?
        .into_iter()
        .filter(|b| b.env == "lab")
        .collect();
    ensure!(blocks.len() >= 4, "the lab walk-through has its blocks");
    walkthrough(&blocks, LAB_PREFIX, &[])
}

#[test]
fn the_kubernetes_walkthrough_runs_as_written() -> Result<()> {
    require_root();
    let blocks: Vec<Block> = guide::runnable_blocks(&read(EN)?)?
        .into_iter()
        .filter(|b| b.env == "lab-k8s")
        .collect();
    ensure!(
        blocks.len() >= 6,
        "the Kubernetes walk-through has its blocks"
    );
    let bin = nodemesh_tests::k8s::Binaries::locate()?;
    walkthrough(
        &blocks,
        LAB_K8S_PREFIX,
        &[(
            nodemesh_tests::k8s::BIN_ENV,
            bin.dir().display().to_string(),
        )],
    )
}

/// Runs a walk-through's `blocks` against a lab of `prefix` in a scratch workspace (with `env`
/// besides the lab's), takes the lab down whatever happened, and checks that the guide's own
/// last command had taken it down already.
fn walkthrough(blocks: &[Block], prefix: &str, env: &[(&str, String)]) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = scratch_workspace(tmp.path(), prefix)?;
    let lab = Lab::new(prefix, tmp.path().join("target/lab"))?;
    lab.down()?; // leftovers of a killed earlier run
    let mut vars = vec![
        ("NM_GUIDE_LAB", env!("CARGO_BIN_EXE_nm-lab").to_owned()),
        ("NM_GUIDE_PREFIX", prefix.to_owned()),
        ("NM_GUIDE_CONFIG", config.display().to_string()),
    ];
    vars.extend(env.iter().cloned());
    let result = run_blocks(blocks, tmp.path(), LAB_SHIM, &vars);
    let down = lab.down();
    result?;
    down?;
    ensure!(
        lab.status()?.is_none(),
        "the guide's last command took the lab down"
    );
    Ok(())
}
