//! The bench report: medians per path, ratios to raw (paired by round) and the targets.

use std::{collections::BTreeMap, time::Duration};

use super::{Plan, Sample, Test};

pub const PATHS: [&str; 3] = ["raw", "mesh_same_node", "mesh_cross_node"];

/// A target of issue 7, checked on the cross-node path.
struct Target {
    name: &'static str,
    metric: &'static str,
    /// Pass when `value <= limit` (else `value >= limit`).
    at_most: bool,
    limit: f64,
    unit: &'static str,
}

const TARGETS: [Target; 5] = [
    Target {
        name: "single-flow throughput, mesh/raw",
        metric: "throughput_1flow_ratio",
        at_most: false,
        limit: 0.40,
        unit: "×",
    },
    Target {
        name: "keep-alive rr 1 B p50, mesh − raw",
        metric: "rr_1b_p50_added_us",
        at_most: true,
        limit: 40.0,
        unit: "µs",
    },
    Target {
        name: "conn/s with 8 clients, mesh/raw",
        metric: "conn_per_s_ratio",
        at_most: false,
        limit: 0.50,
        unit: "×",
    },
    Target {
        name: "agent CPU per GB (both agents)",
        metric: "agent_cpu_s_per_gb",
        at_most: true,
        limit: 1.3,
        unit: "s",
    },
    Target {
        name: "agent RSS idle (50 workloads, per agent)",
        metric: "agent_rss_idle_mb",
        at_most: true,
        limit: 20.0,
        unit: "MB",
    },
];

pub struct Report {
    plan: Plan,
    took: Duration,
    /// path → metric → median.
    paths: BTreeMap<&'static str, BTreeMap<&'static str, f64>>,
    /// mesh path → ratio metric → median over rounds.
    ratios: BTreeMap<&'static str, BTreeMap<&'static str, f64>>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn get(s: &Sample, key: &str) -> f64 {
    s.result[key].as_f64().unwrap_or(f64::NAN)
}

impl Report {
    pub fn new(plan: Plan, samples: &[Sample], idle_kb: u64, took: Duration) -> Self {
        let of = |path: &str, test: Test| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.path == path && s.test == test)
                .collect()
        };
        let med = |path: &str, test: Test, key: &str| {
            median(of(path, test).iter().map(|s| get(s, key)).collect())
        };
        let mut paths = BTreeMap::new();
        for path in PATHS {
            let mut m = BTreeMap::new();
            let mut put = |k: &'static str, v: Option<f64>| {
                if let Some(v) = v {
                    m.insert(k, v);
                }
            };
            put(
                "throughput_1flow_gbit_s",
                med(path, Test::Stream1, "gbit_s"),
            );
            put(
                "throughput_4flow_gbit_s",
                med(path, Test::Stream4, "gbit_s"),
            );
            put("rr_1b_p50_us", med(path, Test::Rr1, "p50_us"));
            put("rr_1b_p90_us", med(path, Test::Rr1, "p90_us"));
            put("rr_1b_p99_us", med(path, Test::Rr1, "p99_us"));
            put("rr_1k_p50_us", med(path, Test::Rr1k, "p50_us"));
            put("rr_1k_p90_us", med(path, Test::Rr1k, "p90_us"));
            put("rr_1k_p99_us", med(path, Test::Rr1k, "p99_us"));
            put("conn_per_s", med(path, Test::Crr, "conn_per_s"));
            if path != "raw" {
                // Per round: CPU of both bulk tests over their bytes, of both rr tests over
                // their requests, of the connection test over its connections.
                let rounds = plan.rounds;
                let per_round = |tests: &[Test], key: &str, scale: f64| {
                    median(
                        (0..rounds)
                            .map(|r| {
                                let (mut cpu, mut work) = (0.0, 0.0);
                                for s in samples.iter().filter(|s| {
                                    s.path == path && s.round == r && tests.contains(&s.test)
                                }) {
                                    cpu += s.agent_cpu_s;
                                    work += get(s, key);
                                }
                                cpu / (work / scale)
                            })
                            .collect(),
                    )
                };
                put(
                    "agent_cpu_s_per_gb",
                    per_round(&[Test::Stream1, Test::Stream4], "bytes", 1e9),
                );
                put(
                    "agent_cpu_s_per_1k_req",
                    per_round(&[Test::Rr1, Test::Rr1k], "count", 1e3),
                );
                put(
                    "agent_cpu_s_per_1k_conn",
                    per_round(&[Test::Crr], "count", 1e3),
                );
                put("agent_rss_idle_mb", Some(idle_kb as f64 / 1024.0));
                put(
                    "agent_rss_load_mb",
                    median(
                        (0..rounds)
                            .map(|r| {
                                samples
                                    .iter()
                                    .filter(|s| s.path == path && s.round == r)
                                    .map(|s| s.agent_rss_max_kb as f64 / 1024.0)
                                    .fold(f64::NAN, f64::max)
                            })
                            .collect(),
                    ),
                );
            }
            paths.insert(path, m);
        }
        // Paired ratios: mesh and raw of the same round and test.
        let mut ratios = BTreeMap::new();
        for path in &PATHS[1..] {
            let mut m = BTreeMap::new();
            let paired = |test: Test, key: &str, f: fn(f64, f64) -> f64| {
                median(
                    (0..plan.rounds)
                        .filter_map(|r| {
                            let find = |p: &str| {
                                samples
                                    .iter()
                                    .find(|s| s.path == p && s.round == r && s.test == test)
                                    .map(|s| get(s, key))
                            };
                            Some(f(find(path)?, find("raw")?))
                        })
                        .collect(),
                )
            };
            let ratio: fn(f64, f64) -> f64 = |a, b| a / b;
            let diff: fn(f64, f64) -> f64 = |a, b| a - b;
            for (k, v) in [
                (
                    "throughput_1flow_ratio",
                    paired(Test::Stream1, "gbit_s", ratio),
                ),
                (
                    "throughput_4flow_ratio",
                    paired(Test::Stream4, "gbit_s", ratio),
                ),
                ("rr_1b_p50_added_us", paired(Test::Rr1, "p50_us", diff)),
                ("rr_1b_p99_added_us", paired(Test::Rr1, "p99_us", diff)),
                ("rr_1k_p50_added_us", paired(Test::Rr1k, "p50_us", diff)),
                ("conn_per_s_ratio", paired(Test::Crr, "conn_per_s", ratio)),
            ] {
                if let Some(v) = v {
                    m.insert(k, v);
                }
            }
            ratios.insert(*path, m);
        }
        Self {
            plan,
            took,
            paths,
            ratios,
        }
    }

    fn target_value(&self, t: &Target) -> Option<f64> {
        let cross = "mesh_cross_node";
        self.ratios[cross]
            .get(t.metric)
            .or_else(|| self.paths[cross].get(t.metric))
            .copied()
    }

    pub fn json(&self) -> serde_json::Value {
        let targets: Vec<_> = TARGETS
            .iter()
            .map(|t| {
                let v = self.target_value(t);
                serde_json::json!({
                    "target": t.name, "metric": t.metric, "path": "mesh_cross_node",
                    "limit": t.limit, "at_most": t.at_most, "value": v,
                    "pass": v.map(|v| pass(t, v)),
                })
            })
            .collect();
        serde_json::json!({
            "paths": self.paths,
            "ratios_to_raw": self.ratios,
            "targets": targets,
            "run": {
                "quick": self.plan.quick, "rounds": self.plan.rounds,
                "stream_secs": self.plan.stream_secs, "rr_secs": self.plan.rr_secs,
                "crr_secs": self.plan.crr_secs, "crr_clients": super::CRR_CLIENTS,
                "took_s": self.took.as_secs_f64(),
                "machine": machine(),
            },
        })
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# nodemesh bench ({}, {} rounds; stream {} s, rr {} s, crr {} s with {} clients; took {:.0} s)\n\n{}\n\n",
            if self.plan.quick { "quick" } else { "full" },
            self.plan.rounds,
            self.plan.stream_secs,
            self.plan.rr_secs,
            self.plan.crr_secs,
            super::CRR_CLIENTS,
            self.took.as_secs_f64(),
            machine(),
        ));
        s.push_str("Medians over rounds. Ratios are paired by round (mesh / raw, or mesh − raw for latency).\n\n");
        s.push_str("| metric | raw | mesh same node | mesh cross node | same/raw | cross/raw |\n|---|---|---|---|---|---|\n");
        let rows: [(&str, &str, Option<&str>); 14] = [
            (
                "throughput 1 flow (Gbit/s)",
                "throughput_1flow_gbit_s",
                Some("throughput_1flow_ratio"),
            ),
            (
                "throughput 4 flows (Gbit/s)",
                "throughput_4flow_gbit_s",
                Some("throughput_4flow_ratio"),
            ),
            (
                "rr 1 B p50 (µs)",
                "rr_1b_p50_us",
                Some("rr_1b_p50_added_us"),
            ),
            ("rr 1 B p90 (µs)", "rr_1b_p90_us", None),
            (
                "rr 1 B p99 (µs)",
                "rr_1b_p99_us",
                Some("rr_1b_p99_added_us"),
            ),
            (
                "rr 1 KiB p50 (µs)",
                "rr_1k_p50_us",
                Some("rr_1k_p50_added_us"),
            ),
            ("rr 1 KiB p90 (µs)", "rr_1k_p90_us", None),
            ("rr 1 KiB p99 (µs)", "rr_1k_p99_us", None),
            ("conn/s, 8 clients", "conn_per_s", Some("conn_per_s_ratio")),
            ("agent CPU s per GB (both)", "agent_cpu_s_per_gb", None),
            (
                "agent CPU s per 1k requests (both)",
                "agent_cpu_s_per_1k_req",
                None,
            ),
            (
                "agent CPU s per 1k connections (both)",
                "agent_cpu_s_per_1k_conn",
                None,
            ),
            ("agent RSS idle (MB, per agent)", "agent_rss_idle_mb", None),
            (
                "agent RSS under load (MB, per agent)",
                "agent_rss_load_mb",
                None,
            ),
        ];
        for (label, metric, ratio) in rows {
            let cell = |p: &str| {
                self.paths[p]
                    .get(metric)
                    .map_or("–".to_owned(), |v| fmt(*v))
            };
            let r = |p: &str| {
                ratio
                    .and_then(|k| self.ratios[p].get(k))
                    .map_or("–".to_owned(), |v| {
                        if ratio.is_some_and(|k| k.ends_with("_us")) {
                            format!("{v:+.1} µs")
                        } else {
                            format!("{v:.2}×")
                        }
                    })
            };
            s.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {} |\n",
                cell("raw"),
                cell("mesh_same_node"),
                cell("mesh_cross_node"),
                r("mesh_same_node"),
                r("mesh_cross_node"),
            ));
        }
        s.push_str("\nTargets (issue 7, cross node, against raw in the same run):\n\n| target | limit | measured | |\n|---|---|---|---|\n");
        for t in &TARGETS {
            let v = self.target_value(t);
            s.push_str(&format!(
                "| {} | {} {} {} | {} | {} |\n",
                t.name,
                if t.at_most { "≤" } else { "≥" },
                t.limit,
                t.unit,
                v.map_or("–".to_owned(), |v| format!("{} {}", fmt(v), t.unit)),
                match v.map(|v| pass(t, v)) {
                    Some(true) => "pass",
                    Some(false) => "FAIL",
                    None => "not measured",
                }
            ));
        }
        s
    }
}

fn pass(t: &Target, v: f64) -> bool {
    if t.at_most {
        v <= t.limit
    } else {
        v >= t.limit
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// CPU model, core count and kernel, for the report's header.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} CPUs, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_non_finite() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(Vec::new()), None);
    }

    fn sample(round: usize, path: &'static str, test: Test, result: serde_json::Value) -> Sample {
        Sample {
            round,
            path,
            test,
            result,
            agent_cpu_s: 1.0,
            agent_rss_max_kb: 20 * 1024,
        }
    }

    #[test]
    fn ratios_are_paired_by_round_and_targets_judged() {
        let plan = Plan::new(true);
        let mut samples = Vec::new();
        // Raw doubles from round to round; the mesh stays at a quarter of it each round.
        for (round, raw) in [(0, 10.0), (1, 20.0), (2, 40.0)] {
            for (path, gbit) in [
                ("raw", raw),
                ("mesh_same_node", raw / 2.0),
                ("mesh_cross_node", raw / 4.0),
            ] {
                let bytes = gbit * 1e9 / 8.0;
                samples.push(sample(
                    round,
                    path,
                    Test::Stream1,
                    serde_json::json!({"gbit_s": gbit, "bytes": bytes}),
                ));
            }
            for (path, p50) in [
                ("raw", 20.0),
                ("mesh_same_node", 40.0),
                ("mesh_cross_node", 50.0),
            ] {
                samples.push(sample(
                    round,
                    path,
                    Test::Rr1,
                    serde_json::json!({"p50_us": p50, "count": 1000}),
                ));
            }
        }
        let r = Report::new(plan, &samples, 12 * 1024, Duration::from_secs(1));
        let cross = &r.ratios["mesh_cross_node"];
        assert_eq!(cross["throughput_1flow_ratio"], 0.25);
        assert_eq!(cross["rr_1b_p50_added_us"], 30.0);
        assert_eq!(r.paths["raw"]["throughput_1flow_gbit_s"], 20.0);
        assert_eq!(r.paths["mesh_cross_node"]["agent_rss_idle_mb"], 12.0);
        let json = r.json();
        let targets = json["targets"].as_array().expect("targets");
        let by = |m: &str| {
            targets
                .iter()
                .find(|t| t["metric"] == m)
                .map(|t| t["pass"].clone())
        };
        assert_eq!(by("throughput_1flow_ratio"), Some(serde_json::json!(false)));
        assert_eq!(by("rr_1b_p50_added_us"), Some(serde_json::json!(true)));
        assert_eq!(by("agent_rss_idle_mb"), Some(serde_json::json!(true)));
        // Not measured here: no crr samples.
        assert_eq!(by("conn_per_s_ratio"), Some(serde_json::Value::Null));
        assert!(
            r.markdown()
                .contains("| single-flow throughput, mesh/raw | ≥ 0.4 × | 0.25 × | FAIL |")
        );
    }
}
