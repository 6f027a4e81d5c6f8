//! The bench report: medians per path, ratios to raw (paired by round) and the issue's targets.

use std::{collections::BTreeMap, time::Duration};

use super::{Plan, Sample, Test};

pub const PATHS: [&str; 3] = ["raw", "mesh_same_node", "mesh_cross_node"];

/// A target of issues 7 and 15, checked on one mesh path against raw in the same run (the RSS
/// after the load against the same agents' idle RSS, [`Report::set_rss_after_load`]).
struct Target {
    name: &'static str,
    metric: &'static str,
    /// `mesh_cross_node` or `mesh_same_node` (`k8s_source` for the Kubernetes scale targets).
    path: &'static str,
    /// Pass when `value <= limit` (else `value >= limit`).
    at_most: bool,
    limit: f64,
    unit: &'static str,
}

const TARGETS: [Target; 11] = [
    Target {
        name: "single-flow throughput, mesh/raw",
        metric: "throughput_1flow_ratio",
        path: "mesh_cross_node",
        at_most: false,
        limit: 0.40,
        unit: "×",
    },
    Target {
        name: "keep-alive rr 1 B p50, mesh − raw",
        metric: "rr_1b_p50_added_us",
        path: "mesh_cross_node",
        at_most: true,
        limit: 40.0,
        unit: "µs",
    },
    Target {
        name: "conn/s with 8 clients, mesh/raw",
        metric: "conn_per_s_ratio",
        path: "mesh_cross_node",
        at_most: false,
        limit: 0.50,
        unit: "×",
    },
    Target {
        name: "agent CPU per GB (both agents)",
        metric: "agent_cpu_s_per_gb",
        path: "mesh_cross_node",
        at_most: true,
        limit: 1.3,
        unit: "s",
    },
    Target {
        name: "agent RSS idle (50 workloads, per agent)",
        metric: "agent_rss_idle_mb",
        path: "mesh_cross_node",
        at_most: true,
        limit: 20.0,
        unit: "MB",
    },
    Target {
        name: "agent RSS 10 s after the load ends / idle (largest agent)",
        metric: "agent_rss_after_load_ratio",
        path: "mesh_cross_node",
        at_most: true,
        limit: 1.5,
        unit: "×",
    },
    Target {
        name: "4-flow throughput, mesh/raw",
        metric: "throughput_4flow_ratio",
        path: "mesh_cross_node",
        at_most: false,
        limit: 0.40,
        unit: "×",
    },
    Target {
        name: "agent CPU per 1,000 connections (both agents)",
        metric: "agent_cpu_s_per_1k_conn",
        path: "mesh_cross_node",
        at_most: true,
        limit: 0.12,
        unit: "s",
    },
    Target {
        name: "same node: single-flow throughput, mesh/raw",
        metric: "throughput_1flow_ratio",
        path: "mesh_same_node",
        at_most: false,
        limit: 0.90,
        unit: "×",
    },
    Target {
        name: "same node: keep-alive rr 1 B p50, mesh − raw",
        metric: "rr_1b_p50_added_us",
        path: "mesh_same_node",
        at_most: true,
        limit: 10.0,
        unit: "µs",
    },
    Target {
        name: "same node: conn/s with 8 clients, mesh/raw",
        metric: "conn_per_s_ratio",
        path: "mesh_same_node",
        at_most: false,
        limit: 0.60,
        unit: "×",
    },
];

/// When and under what load a run ran (the history and the report's header).
#[derive(Clone, Debug, Default)]
pub struct RunMeta {
    /// `2026-11-26T03:47Z` ([`utc_minute`]).
    pub finished_utc: String,
    /// 1-minute load average before and after the run (the machine may be shared).
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

pub struct Report {
    plan: Plan,
    took: Duration,
    pub meta: RunMeta,
    /// path → metric → median.
    paths: BTreeMap<&'static str, BTreeMap<&'static str, f64>>,
    /// mesh path → ratio metric → median over rounds.
    ratios: BTreeMap<&'static str, BTreeMap<&'static str, f64>>,
}

/// A mesh-to-raw figure as the report prints it: added µs for a latency, else a ratio.
pub(crate) fn ratio_cell(v: f64, latency: bool) -> String {
    if latency {
        format!("{v:+.1} µs")
    } else {
        format!("{v:.2}×")
    }
}

/// The median of the finite values (`None` when there is none).
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
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
            meta: RunMeta::default(),
            paths,
            ratios,
        }
    }

    /// The chart of each path against raw (`paths.svg`): one panel per figure (single-flow
    /// and 4-flow throughput, rr 1 B p50, new connections/s), a bar per path, each mesh bar
    /// noted with its paired ratio to raw (or the added latency).
    pub fn paths_chart(&self) -> anyhow::Result<String> {
        paths_chart(&self.json())
    }

    /// Records the agents' RSS read [`super::RSS_AFTER_LOAD`] after the last load: the largest
    /// agent's, in MB and as a multiple of the largest idle RSS read at start (`idle_kb`).
    pub fn set_rss_after_load(&mut self, idle_kb: u64, after_kb: u64) {
        if let Some(m) = self.paths.get_mut("mesh_cross_node") {
            m.insert("agent_rss_after_load_mb", after_kb as f64 / 1024.0);
            if idle_kb > 0 {
                m.insert(
                    "agent_rss_after_load_ratio",
                    after_kb as f64 / idle_kb as f64,
                );
            }
        }
    }

    fn target_value(&self, t: &Target) -> Option<f64> {
        self.ratios[t.path]
            .get(t.metric)
            .or_else(|| self.paths[t.path].get(t.metric))
            .copied()
    }

    pub fn json(&self) -> serde_json::Value {
        let targets: Vec<_> = TARGETS
            .iter()
            .map(|t| {
                let v = self.target_value(t);
                serde_json::json!({
                    "target": t.name, "metric": t.metric, "path": t.path,
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
                "finished_utc": self.meta.finished_utc,
                "load_before": self.meta.load_before, "load_after": self.meta.load_after,
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
                    .map_or("–".to_owned(), |&v| {
                        ratio_cell(v, ratio.is_some_and(|k| k.ends_with("_us")))
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
        s.push_str("\nTargets (issues 7 and 15, cross node unless said, against raw in the same run):\n\n| target | limit | measured | |\n|---|---|---|---|\n");
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

/// The Kubernetes scale run (`nm-bench k8s-scale`, [`super::k8s_scale`]): issue 12's figures.
#[derive(Clone, Debug)]
pub struct K8sScale {
    pub nodes: usize,
    pub pods: usize,
    pub services: usize,
    pub namespaces: usize,
    pub probe_pods: usize,
    /// Workloads in the first model (every enrolled pod of the cluster).
    pub model_workloads: usize,
    /// How long creating the objects took (not a target; the apiserver's work).
    pub populate_s: f64,
    pub initial_sync_s: f64,
    pub rss_after_sync_mb: f64,
    pub rss_end_mb: f64,
    /// `VmHWM`: the largest RSS over the probe's life.
    pub rss_peak_mb: f64,
    /// Per probe pod, from the create call's return to the model holding it (ms).
    pub enroll_from_create_ms: Vec<f64>,
    /// Per probe pod, from the status write's return (its IP known) to the model (ms).
    pub enroll_from_status_ms: Vec<f64>,
    /// 1-minute load average before and after (the machine is shared).
    pub load_before: f64,
    pub load_after: f64,
    pub took_s: f64,
}

/// Issue 12's targets, checked on the values of [`K8sScale::metrics`].
const K8S_TARGETS: [Target; 3] = [
    Target {
        name: "initial sync (first model published)",
        metric: "initial_sync_s",
        path: "k8s_source",
        at_most: true,
        limit: 10.0,
        unit: "s",
    },
    Target {
        name: "source RSS (peak)",
        metric: "rss_peak_mb",
        path: "k8s_source",
        at_most: true,
        limit: 80.0,
        unit: "MB",
    },
    Target {
        name: "pod created → enrolled, p99",
        metric: "enroll_p99_ms",
        path: "k8s_source",
        at_most: true,
        limit: 1000.0,
        unit: "ms",
    },
];

/// The heading of the scale section in `report.md` (it replaces an older one).
const K8S_HEADING: &str = "## Kubernetes scale";

/// Nearest-rank percentile `p` (0–100) of `v`.
fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

impl K8sScale {
    /// The figures by metric name.
    pub fn metrics(&self) -> BTreeMap<&'static str, f64> {
        let mut m = BTreeMap::new();
        m.insert("populate_s", self.populate_s);
        m.insert("initial_sync_s", self.initial_sync_s);
        m.insert("rss_after_sync_mb", self.rss_after_sync_mb);
        m.insert("rss_end_mb", self.rss_end_mb);
        m.insert("rss_peak_mb", self.rss_peak_mb);
        for (prefix, v) in [
            ("enroll", &self.enroll_from_create_ms),
            ("enroll_from_status", &self.enroll_from_status_ms),
        ] {
            for (p, name) in [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (100.0, "max")] {
                if let Some(x) = percentile(v, p) {
                    let key: &'static str = match (prefix, name) {
                        ("enroll", "p50") => "enroll_p50_ms",
                        ("enroll", "p90") => "enroll_p90_ms",
                        ("enroll", "p99") => "enroll_p99_ms",
                        ("enroll", _) => "enroll_max_ms",
                        (_, "p50") => "enroll_from_status_p50_ms",
                        (_, "p90") => "enroll_from_status_p90_ms",
                        (_, "p99") => "enroll_from_status_p99_ms",
                        _ => "enroll_from_status_max_ms",
                    };
                    m.insert(key, x);
                }
            }
        }
        m
    }

    pub fn json(&self) -> serde_json::Value {
        let metrics = self.metrics();
        let targets: Vec<_> = K8S_TARGETS
            .iter()
            .map(|t| {
                let v = metrics.get(t.metric).copied();
                serde_json::json!({
                    "target": t.name, "metric": t.metric, "limit": t.limit,
                    "at_most": t.at_most, "value": v, "pass": v.map(|v| pass(t, v)),
                })
            })
            .collect();
        serde_json::json!({
            "metrics": metrics,
            "targets": targets,
            "run": {
                "nodes": self.nodes, "pods": self.pods, "services": self.services,
                "namespaces": self.namespaces, "probe_pods": self.probe_pods,
                "model_workloads": self.model_workloads,
                "load_before": self.load_before, "load_after": self.load_after,
                "took_s": self.took_s, "machine": machine(),
            },
            "enroll_from_create_ms": self.enroll_from_create_ms,
        })
    }

    pub fn markdown(&self) -> String {
        let m = self.metrics();
        let get = |k: &str| m.get(k).map_or("–".to_owned(), |v| fmt(*v));
        let mut s = format!(
            "{K8S_HEADING} ({} pods on {} nodes in {} enrolled namespaces, {} services; {} probe pods; \
             load average {:.1} before, {:.1} after; took {:.0} s)\n\n{}\n\n",
            self.pods,
            self.nodes,
            self.namespaces,
            self.services,
            self.probe_pods,
            self.load_before,
            self.load_after,
            self.took_s,
            machine(),
        );
        s.push_str(
            "One node's model source (`mesh_agent::k8s::source`) alone in a child process, with \
             the agent's ServiceAccount token, against a real kube-apiserver.\n\n",
        );
        s.push_str("| metric | value |\n|---|---|\n");
        for (label, key) in [
            ("objects created in (s, not a target)", "populate_s"),
            ("initial sync (s)", "initial_sync_s"),
            ("RSS after sync (MB)", "rss_after_sync_mb"),
            ("RSS at the end (MB)", "rss_end_mb"),
            ("RSS peak, VmHWM (MB)", "rss_peak_mb"),
            ("pod created → enrolled p50 (ms)", "enroll_p50_ms"),
            ("pod created → enrolled p90 (ms)", "enroll_p90_ms"),
            ("pod created → enrolled p99 (ms)", "enroll_p99_ms"),
            ("pod created → enrolled max (ms)", "enroll_max_ms"),
            (
                "pod IP written → enrolled p50 (ms)",
                "enroll_from_status_p50_ms",
            ),
            (
                "pod IP written → enrolled p99 (ms)",
                "enroll_from_status_p99_ms",
            ),
        ] {
            s.push_str(&format!("| {label} | {} |\n", get(key)));
        }
        s.push_str("\nTargets (issue 12):\n\n| target | limit | measured | |\n|---|---|---|---|\n");
        for t in &K8S_TARGETS {
            let v = m.get(t.metric).copied();
            s.push_str(&format!(
                "| {} | ≤ {} {} | {} | {} |\n",
                t.name,
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

    /// Puts this run into `out/report.json` (key `k8s_scale`) and `out/report.md` (its section,
    /// replacing an older one), creating them if the lab benchmark has not written them.
    pub fn merge_into(&self, out: &std::path::Path) -> anyhow::Result<()> {
        use anyhow::Context as _;
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let json_path = out.join("report.json");
        let mut json = match std::fs::read_to_string(&json_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", json_path.display()))?,
            Err(_) => serde_json::json!({}),
        };
        let obj = json
            .as_object_mut()
            .with_context(|| format!("{} is not a JSON object", json_path.display()))?;
        obj.insert("k8s_scale".into(), self.json());
        std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", json_path.display()))?;
        let md_path = out.join("report.md");
        let old = std::fs::read_to_string(&md_path).unwrap_or_default();
        let kept = match old.find(K8S_HEADING) {
            Some(i) => old[..i].trim_end().to_owned(),
            None => old.trim_end().to_owned(),
        };
        let md = if kept.is_empty() {
            self.markdown()
        } else {
            format!("{kept}\n\n{}", self.markdown())
        };
        std::fs::write(&md_path, md)
            .with_context(|| format!("cannot write {}", md_path.display()))?;
        Ok(())
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

/// The chart of each path against raw ([`Report::paths_chart`]) from a `report.json` (also an
/// older one: `nm-bench charts`). The title names the run's kind, date and machine.
pub fn paths_chart(report: &serde_json::Value) -> anyhow::Result<String> {
    use super::plot::{Bar, BarPanel};
    let names = [
        ("raw", "raw"),
        ("mesh_same_node", "mesh same node"),
        ("mesh_cross_node", "mesh cross node"),
    ];
    let panel = |title: &str, unit: &str, metric: &str, ratio: &str| BarPanel {
        title: title.to_owned(),
        y_desc: unit.to_owned(),
        bars: names
            .iter()
            .filter_map(|(path, label)| {
                let value = report["paths"][path][metric].as_f64()?;
                let note = if *path == "raw" {
                    fmt(value)
                } else {
                    match report["ratios_to_raw"][path][ratio].as_f64() {
                        Some(r) if ratio.ends_with("_us") => format!("{r:+.1} µs"),
                        Some(r) => format!("{r:.2}×"),
                        None => fmt(value),
                    }
                };
                Some(Bar {
                    label: (*label).to_owned(),
                    value,
                    note,
                })
            })
            .collect(),
    };
    let panels = [
        panel(
            "throughput, 1 flow",
            "Gbit/s",
            "throughput_1flow_gbit_s",
            "throughput_1flow_ratio",
        ),
        panel(
            "throughput, 4 flows",
            "Gbit/s",
            "throughput_4flow_gbit_s",
            "throughput_4flow_ratio",
        ),
        panel(
            "keep-alive rr 1 B, p50 (lower is better)",
            "µs",
            "rr_1b_p50_us",
            "rr_1b_p50_added_us",
        ),
        panel(
            "new connections/s, 8 clients",
            "connections/s",
            "conn_per_s",
            "conn_per_s_ratio",
        ),
    ];
    let run = &report["run"];
    let title = format!(
        "nodemesh bench ({}{}): each path against raw; notes: ratio to raw, paired by round",
        if run["quick"] == true {
            "quick"
        } else {
            "full"
        },
        run["finished_utc"]
            .as_str()
            .filter(|d| !d.is_empty())
            .map_or(String::new(), |d| format!(", {d}")),
    );
    super::plot::bars(&title, &panels, 2, 1000, 330)
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `2026-11-26T03:47Z`: the UTC minute of `t`.
pub fn utc_minute(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60
    )
}

/// CPU model, core count and kernel, for the report's header.
pub(crate) fn machine() -> String {
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
    fn utc_minute_formats_civil_dates() {
        let at = |secs: u64| utc_minute(std::time::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00Z");
        // 2026-11-26 03:47:59 UTC and a leap day.
        assert_eq!(at(1_795_664_879), "2026-11-26T03:47Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00Z");
    }

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
        // The RSS after the load: not measured until set, then judged as a multiple of idle.
        assert_eq!(
            by("agent_rss_after_load_ratio"),
            Some(serde_json::Value::Null)
        );
        let mut after = Report::new(plan, &samples, 12 * 1024, Duration::from_secs(1));
        after.set_rss_after_load(12 * 1024, 24 * 1024);
        let json_after = after.json();
        let verdict = json_after["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .find(|t| t["metric"] == "agent_rss_after_load_ratio")
            .map(|t| (t["value"].clone(), t["pass"].clone()));
        assert_eq!(
            verdict,
            Some((serde_json::json!(2.0), serde_json::json!(false)))
        );
        after.set_rss_after_load(12 * 1024, 13 * 1024);
        assert!(after.markdown().contains(
            "| agent RSS 10 s after the load ends / idle (largest agent) | ≤ 1.5 × | 1.08 × | pass |"
        ), "{}", after.markdown());
        // Not measured here: no crr samples.
        assert_eq!(by("conn_per_s_ratio"), Some(serde_json::Value::Null));
        // Same-node targets are judged on the same-node path's own ratios.
        let same = targets
            .iter()
            .find(|t| t["path"] == "mesh_same_node" && t["metric"] == "rr_1b_p50_added_us")
            .expect("a same-node latency target");
        assert_eq!(
            same["value"].as_f64(),
            r.ratios["mesh_same_node"]
                .get("rr_1b_p50_added_us")
                .copied()
        );
        assert_eq!(same["limit"], 10.0);
        assert!(
            r.markdown()
                .contains("| single-flow throughput, mesh/raw | ≥ 0.4 × | 0.25 × | FAIL |")
        );
        let chart = r.paths_chart().expect("chart");
        super::super::plot::check_svg(&chart).expect("svg");
        for note in ["0.25×", "0.50×", "+30.0 µs", "mesh cross node"] {
            assert!(chart.contains(note), "{note} missing from the chart");
        }
    }

    fn scale(enroll: Vec<f64>) -> K8sScale {
        K8sScale {
            nodes: 50,
            pods: 5000,
            services: 500,
            namespaces: 50,
            probe_pods: enroll.len(),
            model_workloads: 5000,
            populate_s: 60.0,
            initial_sync_s: 4.0,
            rss_after_sync_mb: 40.0,
            rss_end_mb: 41.0,
            rss_peak_mb: 90.0,
            enroll_from_status_ms: enroll.clone(),
            enroll_from_create_ms: enroll,
            load_before: 4.0,
            load_after: 5.0,
            took_s: 100.0,
        }
    }

    #[test]
    fn k8s_scale_percentiles_and_targets() {
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 100 delays 1..=100 ms: p99 is the 99th, not the largest.
        let r = scale((1..=100).map(f64::from).collect());
        let m = r.metrics();
        assert_eq!(m["enroll_p50_ms"], 50.0);
        assert_eq!(m["enroll_p99_ms"], 99.0);
        assert_eq!(m["enroll_max_ms"], 100.0);
        let json = r.json();
        let pass = |metric: &str| {
            json["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .find(|t| t["metric"] == metric)
                .map(|t| t["pass"].clone())
        };
        assert_eq!(pass("initial_sync_s"), Some(serde_json::json!(true)));
        assert_eq!(pass("rss_peak_mb"), Some(serde_json::json!(false)));
        assert_eq!(pass("enroll_p99_ms"), Some(serde_json::json!(true)));
        assert!(
            r.markdown()
                .contains("| source RSS (peak) | ≤ 80 MB | 90.0 MB | FAIL |")
        );
    }

    #[test]
    fn k8s_scale_merges_into_the_lab_report() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("report.json"), r#"{"paths": {"raw": {}}}"#).expect("write");
        std::fs::write(dir.path().join("report.md"), "# nodemesh bench\n\n| a |\n").expect("write");
        let mut r = scale(vec![10.0]);
        r.merge_into(dir.path()).expect("first merge");
        r.initial_sync_s = 7.5;
        r.merge_into(dir.path()).expect("second merge replaces");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("report.json")).expect("read"),
        )
        .expect("json");
        assert!(json["paths"]["raw"].is_object(), "the lab's figures stay");
        assert_eq!(json["k8s_scale"]["metrics"]["initial_sync_s"], 7.5);
        let md = std::fs::read_to_string(dir.path().join("report.md")).expect("read");
        assert!(md.starts_with("# nodemesh bench\n\n| a |\n\n## Kubernetes scale"));
        assert_eq!(md.matches(K8S_HEADING).count(), 1, "{md}");
        assert!(md.contains("| initial sync (s) | 7.50 |"), "{md}");
    }
}
