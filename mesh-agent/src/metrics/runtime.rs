//! `nodemesh_runtime_*`: the tokio runtimes' stable metrics, read at scrape time from their
//! [`Handle`]s (a few atomic loads; nothing kept between scrapes), summed over the agent's
//! runtimes (its main one and the tunnel's shards, `tunnel::shards`).
//!
//! - `nodemesh_runtime_workers`: threads the runtimes run tasks on.
//! - `nodemesh_runtime_alive_tasks`: tasks spawned and not yet finished (connections, servers,
//!   timers); a steady climb with flat traffic is a task leak.
//! - `nodemesh_runtime_global_queue_depth`: tasks waiting in the shared injection queue; a
//!   persistently non-zero value means the workers cannot keep up.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
    registry::Registry,
};
use tokio::runtime::Handle;

#[derive(Debug)]
pub struct RuntimeCollector {
    handles: Vec<Handle>,
}

impl RuntimeCollector {
    /// Registers the gauges of `handle`'s runtime in `registry` (the `nodemesh` sub-registry).
    pub fn register(registry: &mut Registry, handle: Handle) {
        Self::register_all(registry, vec![handle]);
    }

    /// Registers the gauges summed over the runtimes of `handles`.
    pub fn register_all(registry: &mut Registry, handles: Vec<Handle>) {
        registry.register_collector(Box::new(RuntimeCollector { handles }));
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
}
