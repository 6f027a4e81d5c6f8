//! `nodemesh_runtime_*`: the tokio runtime's stable metrics, read at scrape time from a
//! [`Handle`] (a few atomic loads; nothing kept between scrapes).
//!
//! - `nodemesh_runtime_workers`: worker threads of the runtime the agent serves on.
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
    handle: Handle,
}

impl RuntimeCollector {
    /// Registers the gauges of `handle`'s runtime in `registry` (the `nodemesh` sub-registry).
    pub fn register(registry: &mut Registry, handle: Handle) {
        registry.register_collector(Box::new(RuntimeCollector { handle }));
    }
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.handle.metrics();
        let gauges: [(&str, &str, usize); 3] = [
            (
                "runtime_workers",
                "Worker threads of the agent's tokio runtime.",
                m.num_workers(),
            ),
            (
                "runtime_alive_tasks",
                "Tasks alive in the agent's tokio runtime.",
                m.num_alive_tasks(),
            ),
            (
                "runtime_global_queue_depth",
                "Tasks waiting in the tokio runtime's global queue.",
                m.global_queue_depth(),
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
