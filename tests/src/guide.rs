//! Reading the implementation guide (`docs/guide.ko.md`, `docs/guide.md`) for its docs test
//! (`tests/tests/guide.rs`): runnable blocks and their expected output, headings and GitHub
//! anchors, links, tables, and the two forms of the architecture diagram.
//!
//! Markers (HTML comments, invisible when rendered), each on its own line right before a fence:
//! - `<!-- run: ENV[, fails][, retry] -->` before a ```` ```sh ```` block: the block is run in
//!   environment `ENV` (`host`, `lab`, `lab-k8s`); with `fails` it must exit non-zero; with
//!   `retry` it is run again (for a bounded time) until it does what it should, for a step the
//!   guide tells the reader may take a second or two to apply (a label, a policy).
//! - `<!-- expect -->` before a ```` ```text ```` block right after a runnable block: every
//!   non-empty line must match a line of what that block printed (stdout and stderr), whole,
//!   with runs of whitespace counted as one space and `…` standing for any text.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail, ensure};

/// One runnable block of the guide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// `host`, `lab` or `lab-k8s`.
    pub env: String,
    /// The block must exit non-zero (a refused connection, say).
    pub fails: bool,
    /// The block may be repeated until it behaves as expected (the guide says so to the reader).
    pub retry: bool,
    /// The shell text.
    pub code: String,
    /// The output it must print (the `expect` block after it).
    pub expect: Option<String>,
    /// 1-based line of the opening fence, for messages.
    pub line: usize,
}

/// A fenced block: its info string, its text, and the line of its opening fence.
#[derive(Clone, Debug)]
pub struct Fence {
    pub info: String,
    pub text: String,
    pub line: usize,
    /// The marker comment right before it, if any (`run: lab`, `expect`).
    pub marker: Option<String>,
}

/// Every fenced block of `md`, with the marker comment that precedes it (blank lines between
/// allowed).
pub fn fences(md: &str) -> Result<Vec<Fence>> {
    let mut out = Vec::new();
    let mut marker: Option<String> = None;
    let mut open: Option<(String, usize, Vec<&str>, Option<String>)> = None;
    for (i, line) in md.lines().enumerate() {
        if let Some((info, start, body, m)) = open.as_mut() {
            if line.trim_start().starts_with("```") && line.trim() == "```" {
                out.push(Fence {
                    info: info.clone(),
                    text: body.join("\n"),
                    line: *start,
                    marker: m.take(),
                });
                open = None;
            } else {
                body.push(line);
            }
            continue;
        }
        let t = line.trim();
        if let Some(info) = t.strip_prefix("```") {
            open = Some((info.trim().to_owned(), i + 1, Vec::new(), marker.take()));
        } else if let Some(c) = t
            .strip_prefix("<!--")
            .and_then(|r| r.strip_suffix("-->"))
            .map(str::trim)
        {
            marker = Some(c.to_owned());
        } else if !t.is_empty() {
            marker = None;
        }
    }
    ensure!(open.is_none(), "a fenced block is not closed");
    Ok(out)
}

/// The runnable blocks of `md`, in order, each with its expected output.
pub fn runnable_blocks(md: &str) -> Result<Vec<Block>> {
    let mut out: Vec<Block> = Vec::new();
    let mut last_was_runnable = false;
    for f in fences(md)? {
        match f.marker.as_deref() {
            Some(m) if m.starts_with("run:") => {
                ensure!(
                    f.info == "sh",
                    "line {}: a `run:` block must be ```sh, not ```{}",
                    f.line,
                    f.info
                );
                let spec = m.trim_start_matches("run:").trim();
                let mut parts = spec.split(',').map(str::trim);
                let env = parts.next().unwrap_or_default().to_owned();
                ensure!(
                    ["host", "lab", "lab-k8s"].contains(&env.as_str()),
                    "line {}: unknown run environment `{env}`",
                    f.line
                );
                let (mut fails, mut retry) = (false, false);
                for p in parts {
                    match p {
                        "fails" => fails = true,
                        "retry" => retry = true,
                        _ => bail!("line {}: unknown run option `{p}`", f.line),
                    }
                }
                out.push(Block {
                    env,
                    fails,
                    retry,
                    code: f.text,
                    expect: None,
                    line: f.line,
                });
                last_was_runnable = true;
            }
            Some("expect") => {
                ensure!(
                    f.info == "text",
                    "line {}: an `expect` block must be ```text",
                    f.line
                );
                let last = out
                    .last_mut()
                    .filter(|_| last_was_runnable)
                    .with_context(|| {
                        format!(
                            "line {}: an `expect` block must follow a runnable block",
                            f.line
                        )
                    })?;
                last.expect = Some(f.text);
                last_was_runnable = false;
            }
            Some(other) if other.starts_with("run") || other.starts_with("expect") => {
                bail!("line {}: malformed marker `{other}`", f.line)
            }
            _ => last_was_runnable = false,
        }
    }
    Ok(out)
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `line` matches `pattern` whole (whitespace runs as one space, `…` any text).
pub fn line_matches(pattern: &str, line: &str) -> bool {
    let line = squash(line);
    let pattern = squash(pattern);
    let pieces: Vec<&str> = pattern.split('…').map(str::trim).collect();
    let (first, last) = match pieces.as_slice() {
        [only] => return line == *only,
        [first, .., last] => (*first, *last),
        [] => return line.is_empty(),
    };
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Every non-empty line of `expected` matches some line of `output`; the error lists the lines
/// that did not, and the output.
pub fn check_expected(expected: &str, output: &str) -> Result<()> {
    let missing: Vec<&str> = expected
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|p| !output.lines().any(|l| line_matches(p, l)))
        .collect();
    ensure!(
        missing.is_empty(),
        "expected output missing:\n  {}\nactual output:\n{output}",
        missing.join("\n  ")
    );
    Ok(())
}

/// The lines of `md` outside fenced code blocks (the fences themselves left out too).
fn prose_lines(md: &str) -> impl Iterator<Item = &str> {
    let mut in_fence = false;
    md.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            return false;
        }
        !in_fence
    })
}

/// Headings outside code blocks: (level, text).
pub fn headings(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for line in prose_lines(md) {
        let level = line.bytes().take_while(|&b| b == b'#').count();
        if (1..=6).contains(&level) && line[level..].starts_with(' ') {
            out.push((level, line[level..].trim().to_owned()));
        }
    }
    out
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped (letters of every script,
/// digits, `-`, `_` and spaces kept), spaces to `-`.
pub fn slug(heading: &str) -> String {
    // Inline code and links render as their text.
    let text: String = heading.replace('`', "");
    text.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor of `md`'s headings (repeated headings get `-1`, `-2`… as on GitHub).
pub fn anchors(md: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, h) in headings(md) {
        let s = slug(&h);
        let n = seen.entry(s.clone()).or_insert(0);
        out.insert(if *n == 0 {
            s.clone()
        } else {
            format!("{s}-{n}")
        });
        *n += 1;
    }
    out
}

/// The targets of Markdown links and images outside code blocks and inline code.
pub fn links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose_lines(md) {
        // Drop inline code spans.
        let mut text = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                text.push_str(part);
            }
        }
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            match after.find(')') {
                Some(end) => {
                    out.push(after[..end].trim().to_owned());
                    rest = &after[end + 1..];
                }
                None => break,
            }
        }
    }
    out
}

/// The rows of every Markdown table in `md` whose header's first cell is `first_header`, as
/// cells with the surrounding backticks of each cell removed.
pub fn table_rows(md: &str, first_header: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut in_table = false;
    for line in md.lines() {
        let t = line.trim();
        if !t.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<String> = t
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`').to_owned())
            .collect();
        if cells.first().is_some_and(|c| c == first_header) {
            in_table = true;
            continue;
        }
        if in_table
            && !cells
                .iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            out.push(cells);
        }
    }
    out
}

/// Node ids of a Graphviz source: the names declared as `name [ ... ]` (not `graph`, `node`,
/// `edge` defaults), and those used in edges.
pub fn dot_nodes(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with("//") || t.starts_with("subgraph") || t.starts_with("label") {
            continue;
        }
        let head = t.split('[').next().unwrap_or_default();
        for part in head.split("->") {
            let name = part.trim().trim_end_matches(';').trim();
            if !name.is_empty()
                && !["graph", "node", "edge", "}", "{"].contains(&name)
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// A basic syntax check of a Mermaid flowchart; returns its node ids (subgraph ids excluded).
/// Accepted lines: `flowchart LR|TB|…`, `subgraph id[Title]`, `end`, a node `id[text]` or
/// `id([text])`, and edges `a -->|label| b`, `a <-->|label| b`, `a -.->|label| b`, `a ==>|label| b`.
pub fn mermaid_nodes(src: &str) -> Result<BTreeSet<String>> {
    let mut lines = src.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().context("empty Mermaid block")?;
    ensure!(
        [
            "flowchart LR",
            "flowchart TB",
            "flowchart TD",
            "flowchart RL",
            "flowchart BT"
        ]
        .contains(&first),
        "a Mermaid flowchart starts with `flowchart <direction>`, not `{first}`"
    );
    let id_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let node = |s: &str| -> Result<String> {
        let s = s.trim();
        let (id, shape) = match s.find(['[', '(']) {
            Some(at) => (&s[..at], &s[at..]),
            None => (s, ""),
        };
        ensure!(id_ok(id), "bad Mermaid node id `{id}` in `{s}`");
        if !shape.is_empty() {
            let balanced = (shape.starts_with("([") && shape.ends_with("])"))
                || (shape.starts_with('[') && shape.ends_with(']') && !shape[1..].contains('['));
            ensure!(balanced, "unbalanced Mermaid node shape in `{s}`");
            ensure!(
                !shape.contains(['"', '(', ')']) || shape.starts_with("(["),
                "characters Mermaid would parse as syntax in `{s}` (quote the text)"
            );
        }
        Ok(id.to_owned())
    };
    let mut nodes = BTreeSet::new();
    let mut subgraphs = BTreeSet::new();
    let mut depth = 0usize;
    for line in lines {
        if let Some(rest) = line.strip_prefix("subgraph ") {
            subgraphs.insert(node(rest)?);
            depth += 1;
            continue;
        }
        if line == "end" {
            ensure!(depth > 0, "`end` without `subgraph`");
            depth -= 1;
            continue;
        }
        let arrow = ["<-->", "-.->", "==>", "-->"]
            .into_iter()
            .find_map(|a| line.find(a).map(|at| (at, a)));
        match arrow {
            Some((at, a)) => {
                let left = &line[..at];
                let mut right = &line[at + a.len()..];
                if let Some(r) = right.strip_prefix('|') {
                    let end = r.find('|').context("an edge label `|…|` is not closed")?;
                    right = &r[end + 1..];
                }
                nodes.insert(node(left)?);
                nodes.insert(node(right)?);
            }
            None => {
                nodes.insert(node(line)?);
            }
        }
    }
    ensure!(depth == 0, "a `subgraph` is not closed with `end`");
    Ok(nodes.difference(&subgraphs).cloned().collect())
}

/// Leaf paths of a YAML mapping (`agent.ports.hbone`) with their values; empty mappings,
/// sequences and scalars are leaves.
pub fn yaml_leaves(v: &serde_norway::Value) -> Vec<(String, serde_norway::Value)> {
    fn walk(prefix: &str, v: &serde_norway::Value, out: &mut Vec<(String, serde_norway::Value)>) {
        match v {
            serde_norway::Value::Mapping(m) if !m.is_empty() => {
                for (k, x) in m {
                    let k = k.as_str().map_or_else(|| format!("{k:?}"), str::to_owned);
                    let path = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, x, out);
                }
            }
            other => out.push((prefix.to_owned(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_pick_runnable_blocks_and_their_output() {
        let md = "text\n\n<!-- run: lab -->\n```sh\necho hi\n```\n\n<!-- expect -->\n```text\nhi\n```\n\n```sh\nnot run\n```\n<!-- run: host, fails, retry -->\n```sh\nfalse\n```\n";
        let b = runnable_blocks(md).expect("parses");
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].env, "lab");
        assert_eq!(b[0].code, "echo hi");
        assert_eq!(b[0].expect.as_deref(), Some("hi"));
        assert!(b[1].fails && b[1].retry && b[1].expect.is_none());
        assert!(!b[0].retry);
        assert!(runnable_blocks("<!-- run: moon -->\n```sh\nx\n```\n").is_err());
        assert!(runnable_blocks("<!-- expect -->\n```text\nx\n```\n").is_err());
    }

    #[test]
    fn expected_lines_match_whole_lines_with_ellipses() {
        assert!(line_matches("a … c", "a  b   c"));
        assert!(line_matches("hello", " hello "));
        assert!(!line_matches("hello", "hello world"));
        assert!(line_matches("hello …", "hello world"));
        assert!(!line_matches("3", "6.18.3"));
        assert!(line_matches(
            "x{a=\"1\",…b=\"2\"…",
            "x{a=\"1\",z=\"0\",b=\"2\",c=\"3\"} 7"
        ));
        assert!(check_expected("a\nb …", "b 1\na").is_ok());
        assert!(check_expected("a\nc", "a\nb").is_err());
    }

    #[test]
    fn slugs_follow_github() {
        assert_eq!(
            slug("4. Installation and configuration"),
            "4-installation-and-configuration"
        );
        assert_eq!(slug("1. 개요"), "1-개요");
        assert_eq!(slug("4.1.1 The local lab"), "411-the-local-lab");
        assert_eq!(slug("`mesh-agent node` flags"), "mesh-agent-node-flags");
    }

    #[test]
    fn mermaid_check_finds_nodes_and_refuses_broken_syntax() {
        let ok =
            "flowchart LR\n  subgraph s[S]\n    a[A]\n  end\n  b([B])\n  a -->|x| b\n  a ==> c\n";
        let n = mermaid_nodes(ok).expect("valid");
        assert_eq!(n, BTreeSet::from(["a", "b", "c"].map(str::to_owned)));
        assert!(mermaid_nodes("graph\n a --> b").is_err());
        assert!(mermaid_nodes("flowchart LR\n subgraph s[S]\n a[A]\n").is_err());
        assert!(mermaid_nodes("flowchart LR\n a[A --> b").is_err());
        assert!(mermaid_nodes("flowchart LR\n a -->|x b").is_err());
    }

    #[test]
    fn dot_nodes_are_read_from_declarations_and_edges() {
        let src = "digraph g {\n  node [shape=box];\n  a [label=\"A\"];\n  a -> b [label=\"x\"];\n  subgraph cluster_x { label=\"X\"; c; }\n}\n";
        let n = dot_nodes(src);
        assert!(n.contains("a") && n.contains("b"));
        assert!(!n.contains("node"));
    }
}
