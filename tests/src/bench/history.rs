//! The bench history: every full run's key figures, appended to the committed file
//! `docs/bench-history.json` by `nm-bench run` (not `--quick`), and its chart
//! (`target/bench/history.svg`; docs/performance.md shows a committed copy).
//!
//! The file is `{"about": "...", "runs": [RUN, ...]}`, oldest first; a run is
//! `{"date": "2026-11-26T03:47Z", "note": "...", "load_average": [before, after], "commit":
//! "...", "machine": "...", "raw": {...}, "same_node": {...}, "cross_node": {...}}` with the
//! metrics of [`RAW_KEYS`] and [`MESH_KEYS`] (names as in `report.json`), any of them absent
//! when the run did not measure it (the seeded runs copied from older tables).

use std::path::Path;

use anyhow::{Context, Result, ensure};

use super::plot::{self, LinePanel, Series};

/// The raw path's figures kept per run (`report.json` `paths.raw`).
pub const RAW_KEYS: [&str; 4] = [
    "throughput_1flow_gbit_s",
    "throughput_4flow_gbit_s",
    "rr_1b_p50_us",
    "conn_per_s",
];

/// Each mesh path's figures kept per run: ratios to raw (`ratios_to_raw`) and the agents'
/// cost (`paths`).
pub const MESH_KEYS: [&str; 11] = [
    "throughput_1flow_ratio",
    "throughput_4flow_ratio",
    "rr_1b_p50_added_us",
    "rr_1k_p50_added_us",
    "conn_per_s_ratio",
    "agent_cpu_s_per_gb",
    "agent_cpu_s_per_1k_req",
    "agent_cpu_s_per_1k_conn",
    "agent_rss_idle_mb",
    "agent_rss_load_mb",
    "agent_rss_after_load_ratio",
];

const ABOUT: &str = "Key figures of every full `cargo xtask bench` run, oldest first; appended \
                     by `nm-bench run` (docs/performance.md, \"History\"). Ratios are to raw in \
                     the same run.";

/// The history entry of a full run from its `report.json`.
pub fn entry(report: &serde_json::Value, commit: Option<&str>) -> serde_json::Value {
    let pick = |src: &serde_json::Value, keys: &[&str]| {
        let mut m = serde_json::Map::new();
        for k in keys {
            if let Some(v) = src.get(*k).and_then(serde_json::Value::as_f64) {
                m.insert(
                    (*k).to_owned(),
                    serde_json::json!((v * 1000.0).round() / 1000.0),
                );
            }
        }
        serde_json::Value::Object(m)
    };
    let mesh = |path: &str| {
        let mut m = pick(&report["ratios_to_raw"][path], &MESH_KEYS);
        if let (Some(m), serde_json::Value::Object(more)) =
            (m.as_object_mut(), pick(&report["paths"][path], &MESH_KEYS))
        {
            m.extend(more);
        }
        m
    };
    let run = &report["run"];
    serde_json::json!({
        "date": run["finished_utc"],
        "note": "",
        "load_average": [run["load_before"], run["load_after"]],
        "commit": commit,
        "machine": run["machine"],
        "raw": pick(&report["paths"]["raw"], &RAW_KEYS),
        "same_node": mesh("mesh_same_node"),
        "cross_node": mesh("mesh_cross_node"),
        "third_party": report.get("third_party").map(|t| serde_json::json!({
            "paths": t["paths"], "ratios_to_raw": t["ratios_to_raw"],
        })),
    })
}

/// Reads the history file (an empty history when it does not exist yet).
pub fn load(file: &Path) -> Result<serde_json::Value> {
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let h: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            ensure!(
                h["runs"].is_array(),
                "{} has no `runs` array: fix or remove it",
                file.display()
            );
            Ok(h)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(serde_json::json!({"about": ABOUT, "runs": []}))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Appends `run` to the history file (creating it) and returns the whole history.
pub fn append(file: &Path, run: serde_json::Value) -> Result<serde_json::Value> {
    let mut h = load(file)?;
    if let Some(runs) = h["runs"].as_array_mut() {
        runs.push(run);
    }
    std::fs::write(file, serde_json::to_string_pretty(&h)? + "\n")
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(h)
}

/// `2026-11-26T03:47Z` → `11-26 03:47` (the chart's labels).
fn short_date(date: &str) -> String {
    let d = date.trim_end_matches('Z');
    match d.split_once('T') {
        Some((day, time)) => format!(
            "{} {}",
            day.get(5..).unwrap_or(day),
            time.get(..5).unwrap_or(time)
        ),
        None => d.get(5..).unwrap_or(d).to_owned(),
    }
}

/// The history chart: four panels over the runs (cross-node ratios, same-node ratios, added
/// rr p50, agent CPU per GB), with the issue-15 targets as dashed lines.
pub fn chart(history: &serde_json::Value) -> Result<String> {
    let runs = history["runs"].as_array().cloned().unwrap_or_default();
    let labels: Vec<String> = runs
        .iter()
        .map(|r| short_date(r["date"].as_str().unwrap_or("?")))
        .collect();
    let series = |path: &str, key: &str, label: &str| Series {
        label: label.to_owned(),
        points: runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r[path][key].as_f64().map(|v| (i as f64, v)))
            .collect(),
    };
    let ratios = |path: &str, title: &str, target: f64| LinePanel {
        title: title.to_owned(),
        y_desc: "mesh / raw".into(),
        series: vec![
            series(path, "throughput_1flow_ratio", "throughput, 1 flow"),
            series(path, "throughput_4flow_ratio", "throughput, 4 flows"),
            series(path, "conn_per_s_ratio", "new connections/s, 8 clients"),
        ],
        reference: Some((target, format!("target {target}× (throughput)"))),
        legend_lower_right: false,
    };
    let panels = vec![
        ratios(
            "cross_node",
            "cross node, ratio to raw (higher is better)",
            0.40,
        ),
        ratios(
            "same_node",
            "same node, ratio to raw (higher is better)",
            0.90,
        ),
        LinePanel {
            title: "keep-alive rr 1 B p50 added to raw (lower is better)".into(),
            y_desc: "µs".into(),
            series: vec![
                series("cross_node", "rr_1b_p50_added_us", "cross node"),
                series("same_node", "rr_1b_p50_added_us", "same node"),
            ],
            reference: Some((40.0, "target, cross node (40 µs)".into())),
            legend_lower_right: false,
        },
        LinePanel {
            title: "agent CPU per GB, both agents (lower is better)".into(),
            y_desc: "CPU-s per GB".into(),
            series: vec![
                series("cross_node", "agent_cpu_s_per_gb", "cross node"),
                series("same_node", "agent_cpu_s_per_gb", "same node"),
            ],
            reference: Some((1.3, "target, cross node (1.3 s)".into())),
            legend_lower_right: false,
        },
    ];
    plot::lines(
        "nodemesh bench history (full runs)",
        "run (UTC)",
        Some(&labels),
        &panels,
        900,
        300,
    )
}

/// Writes the history chart of `file` to `out` (e.g. `target/bench/history.svg`).
pub fn draw(file: &Path, out: &Path) -> Result<()> {
    let svg = chart(&load(file)?)?;
    std::fs::write(out, svg).with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> serde_json::Value {
        serde_json::json!({
            "paths": {
                "raw": {"throughput_1flow_gbit_s": 22.2, "conn_per_s": 18186.0, "other": 1.0},
                "mesh_same_node": {"agent_cpu_s_per_gb": 0.47},
                "mesh_cross_node": {"agent_cpu_s_per_gb": 2.354, "agent_rss_idle_mb": 11.6},
            },
            "ratios_to_raw": {
                "mesh_same_node": {"throughput_1flow_ratio": 0.68},
                "mesh_cross_node": {"throughput_1flow_ratio": 0.2312, "rr_1b_p50_added_us": 102.4},
            },
            "run": {"finished_utc": "2026-11-26T03:47Z", "load_before": 0.5, "load_after": 1.5,
                    "machine": "AMD EPYC, 2 CPUs"},
        })
    }

    #[test]
    fn entry_keeps_the_key_figures_and_append_accumulates() {
        let e = entry(&report(), Some("abc123"));
        assert_eq!(e["date"], "2026-11-26T03:47Z");
        assert_eq!(e["raw"]["throughput_1flow_gbit_s"], 22.2);
        assert!(e["raw"].get("other").is_none(), "only the key figures");
        assert_eq!(e["cross_node"]["throughput_1flow_ratio"], 0.231);
        assert_eq!(e["cross_node"]["agent_cpu_s_per_gb"], 2.354);
        assert_eq!(e["same_node"]["agent_cpu_s_per_gb"], 0.47);
        assert_eq!(e["load_average"], serde_json::json!([0.5, 1.5]));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("history.json");
        append(&file, e.clone()).expect("first");
        let h = append(&file, e).expect("second");
        assert_eq!(h["runs"].as_array().map(Vec::len), Some(2));
        assert_eq!(load(&file).expect("load")["runs"][1]["commit"], "abc123");
        std::fs::write(&file, "{}").expect("write");
        assert!(load(&file).is_err(), "a file without runs is refused");
    }

    #[test]
    fn chart_labels_runs_by_date() {
        let h = serde_json::json!({"runs": [entry(&report(), None), entry(&report(), None)]});
        let svg = chart(&h).expect("chart");
        plot::check_svg(&svg).expect("svg");
        assert!(svg.contains("11-26 03:47"), "date labels");
        assert!(svg.contains("cross node, ratio to raw"));
    }

    #[test]
    fn committed_history_parses_and_draws() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench-history.json");
        let h = load(&file).expect("docs/bench-history.json");
        let runs = h["runs"].as_array().expect("runs");
        assert!(runs.len() >= 5, "seeded with the documented runs");
        for r in runs {
            assert!(r["date"].as_str().is_some_and(|d| d.ends_with('Z')), "{r}");
            assert!(r["cross_node"]["throughput_1flow_ratio"].is_f64(), "{r}");
        }
        plot::check_svg(&chart(&h).expect("chart")).expect("svg");
    }
}
