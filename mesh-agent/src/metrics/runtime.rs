//! `nodemesh_runtime_*`: the tokio runtimes' stable metrics, read at scrape time from their
//! [`Handle`]s (a few atomic loads; nothing kept between scrapes), summed over the agent's
//! runtimes (its main one and the tunnel's shards, `tunnel::shards`).
//!
//! - `nodemesh_runtime_workers`: threads the runtimes run tasks on.
//! - `nodemesh_runtime_alive_tasks`: tasks spawned and not yet finished (connections, servers,
//!   timers); a steady climb with flat traffic is a task leak.
//! - `nodemesh_runtime_global_queue_depth`: tasks waiting in the shared injection queue; a
//!   persistently non-zero value means the workers cannot keep up.
//!
//! Per tunnel shard (label `shard`, when the tunnel runs on shards):
//! - `nodemesh_shard_busy_seconds_total`: time the shard's thread spent running tasks (not
//!   parked); its rate is the shard's CPU share, so one shard near 1 while another idles shows
//!   connections stacked on one core.
//! - `nodemesh_shard_alive_tasks`: tasks alive on the shard (its connections and streams, plus
//!   its listeners).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::runtime::Handle;

#[derive(Debug)]
pub struct RuntimeCollector {
    handles: Vec<Handle>,
    /// The tunnel shards' runtimes (also in `handles`), in shard order.
    shards: Vec<Handle>,
}

impl RuntimeCollector {
    /// Registers the gauges of `handle`'s runtime in `registry` (the `nodemesh` sub-registry).
    pub fn register(registry: &mut Registry, handle: Handle) {
        Self::register_all(registry, vec![handle]);
    }

    /// Registers the gauges summed over the runtimes of `handles`.
    pub fn register_all(registry: &mut Registry, handles: Vec<Handle>) {
        registry.register_collector(Box::new(RuntimeCollector {
            handles,
            shards: Vec::new(),
        }));
    }

    /// Registers the gauges summed over `main` and the tunnel's `shards`, and each shard's own.
    pub fn register_agent(registry: &mut Registry, main: Handle, shards: Vec<Handle>) {
        registry.register_collector(Box::new(RuntimeCollector {
            handles: std::iter::once(main)
                .chain(shards.iter().cloned())
                .collect(),
            shards,
        }));
    }
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sum = |f: fn(&tokio::runtime::RuntimeMetrics) -> usize| -> usize {
            self.handles.iter().map(|h| f(&h.metrics())).sum()
        };
        let gauges: [(&str, &str, usize); 3] = [
            (
                "runtime_workers",
                "Threads of the agent's tokio runtimes (main runtime workers and tunnel shards).",
                sum(tokio::runtime::RuntimeMetrics::num_workers),
            ),
            (
                "runtime_alive_tasks",
                "Tasks alive in the agent's tokio runtimes.",
                sum(tokio::runtime::RuntimeMetrics::num_alive_tasks),
            ),
            (
                "runtime_global_queue_depth",
                "Tasks waiting in the tokio runtimes' global queues.",
                sum(tokio::runtime::RuntimeMetrics::global_queue_depth),
            ),
        ];
        for (name, help, value) in gauges {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?;
        }
        if self.shards.is_empty() {
            return Ok(());
        }
        let label = |i: usize| [("shard", i.to_string())];
        let mut family = encoder.encode_descriptor(
            "shard_busy_seconds",
            "Time each tunnel shard's thread spent running tasks (its rate is the shard's CPU share).",
            None,
            MetricType::Counter,
        )?;
        for (i, h) in self.shards.iter().enumerate() {
            let m = h.metrics();
            let busy: f64 = (0..m.num_workers())
                .map(|w| m.worker_total_busy_duration(w).as_secs_f64())
                .sum();
            ConstCounter::new(busy).encode(family.encode_family(&label(i))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "shard_alive_tasks",
            "Tasks alive on each tunnel shard (its connections and streams, plus its listeners).",
            None,
            MetricType::Gauge,
        )?;
        for (i, h) in self.shards.iter().enumerate() {
            let tasks = h.metrics().num_alive_tasks();
            ConstGauge::new(i64::try_from(tasks).unwrap_or(i64::MAX))
                .encode(family.encode_family(&label(i))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{BuildInfo, Format, MetricsRegistry};

    fn value(text: &str, name: &str) -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    }

    #[test]
    fn gauges_follow_the_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .enable_all()
            .build()
            .expect("runtime");
        let mut registry = MetricsRegistry::new(&BuildInfo::default());
        RuntimeCollector::register(registry.nodemesh(), rt.handle().clone());
        let text = registry.encode(Format::Prometheus);
        assert_eq!(value(&text, "nodemesh_runtime_workers"), 3);
        let idle = value(&text, "nodemesh_runtime_alive_tasks");

        // Closing the semaphore releases every waiter, whether or not it has been polled yet.
        let stop = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let stop = stop.clone();
                rt.spawn(async move {
                    let _ = stop.acquire().await;
                })
            })
            .collect();
        let text = registry.encode(Format::Prometheus);
        assert_eq!(
            value(&text, "nodemesh_runtime_alive_tasks"),
            idle + 5,
            "{text}"
        );
        assert!(value(&text, "nodemesh_runtime_global_queue_depth") >= 0);
        stop.close();
        rt.block_on(async {
            for t in tasks {
                t.await.expect("task");
            }
        });
        // A finished task leaves the count once its handle is joined.
        let text = registry.encode(Format::Prometheus);
        assert_eq!(value(&text, "nodemesh_runtime_alive_tasks"), idle, "{text}");
    }

    #[test]
    fn each_shard_reports_its_busy_time_and_tasks() {
        let shard = |name: &str| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let handle = rt.handle().clone();
            // The runtime runs on a thread of its own, as a shard does.
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                rt.block_on(async move {
                    let _ = stop_rx.await;
                })
            });
            (handle, stop_tx, thread)
        };
        let (a, stop_a, thread_a) = shard("a");
        let (b, stop_b, thread_b) = shard("b");
        let main = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("main");
        let mut registry = MetricsRegistry::new(&BuildInfo::default());
        RuntimeCollector::register_agent(
            registry.nodemesh(),
            main.handle().clone(),
            vec![a.clone(), b],
        );
        let series = |text: &str, name: &str, shard: usize| -> f64 {
            let prefix = format!("{name}{{shard=\"{shard}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
                .unwrap_or_else(|| panic!("{prefix} missing:\n{text}"))
        };
        let text = registry.encode(Format::Prometheus);
        assert_eq!(value(&text, "nodemesh_runtime_workers"), 3, "{text}");
        let idle_tasks = series(&text, "nodemesh_shard_alive_tasks", 0);

        // Shard 0 runs 30 ms of work in a task and keeps it alive; shard 1 stays idle.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let task = a.spawn(async move {
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_millis(30) {
                std::hint::spin_loop();
            }
            let _ = done_tx.send(());
            let _ = release_rx.await;
        });
        done_rx.recv().expect("the busy task ran");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = registry.encode(Format::Prometheus);
            let busy = series(&text, "nodemesh_shard_busy_seconds_total", 0);
            if busy >= 0.03 {
                assert!(
                    series(&text, "nodemesh_shard_busy_seconds_total", 1) < 0.03,
                    "{text}"
                );
                assert_eq!(
                    series(&text, "nodemesh_shard_alive_tasks", 0),
                    idle_tasks + 1.0,
                    "{text}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "shard 0's busy time stayed at {busy} s:\n{text}"
            );
            std::thread::yield_now();
        }
        let _ = release_tx.send(());
        main.block_on(task).expect("task");
        let _ = (stop_a.send(()), stop_b.send(()));
        thread_a.join().expect("shard a");
        thread_b.join().expect("shard b");
    }
}
