//! eBPF datapath metrics, read at scrape time from functions the wiring passes in (normally
//! closures over `Datapath::counters()` and the maps' sizes), so the metrics layer does not
//! depend on the datapath.
//!
//! - `nodemesh_datapath_events_total{event}`: one series per counter name the source returns
//!   (`redirected`, `denied_policy`, `refused_unconfigured`, `refused_tunnel_stale`,
//!   `guard_dropped`, `orig_dst_misses`, … see `mesh_common::Counter`). The names are fixed by
//!   the code, so the label is bounded.
//! - `nodemesh_datapath_map_entries{map}` and `nodemesh_datapath_map_capacity{map}`.

use std::collections::BTreeMap;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// Counter name → value, summed over CPUs.
pub type CounterSource = Box<dyn Fn() -> BTreeMap<&'static str, u64> + Send + Sync>;
/// Map name → usage.
pub type MapSource = Box<dyn Fn() -> BTreeMap<&'static str, MapUsage> + Send + Sync>;

/// How full one eBPF map is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub entries: u64,
    pub capacity: u64,
}

struct DatapathCollector {
    counters: CounterSource,
    maps: Option<MapSource>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector").finish_non_exhaustive()
    }
}

/// Registers the datapath collector in `registry` (the `nodemesh` sub-registry).
pub fn register(registry: &mut Registry, counters: CounterSource, maps: Option<MapSource>) {
    registry.register_collector(Box::new(DatapathCollector { counters, maps }));
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = (self.counters)();
        if !counters.is_empty() {
            let mut family = encoder.encode_descriptor(
                "datapath_events",
                "eBPF datapath events by kind (redirects, kernel denies, guard drops, misses).",
                None,
                MetricType::Counter,
            )?;
            for (event, value) in &counters {
                let labels = [("event", *event)];
                ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
            }
        }
        let maps = self.maps.as_ref().map(|m| m()).unwrap_or_default();
        if maps.is_empty() {
            return Ok(());
        }
        type Field = (&'static str, &'static str, fn(&MapUsage) -> u64);
        let fields: [Field; 2] = [
            ("datapath_map_entries", "Entries in each eBPF map.", |u| {
                u.entries
            }),
            (
                "datapath_map_capacity",
                "Maximum entries of each eBPF map.",
                |u| u.capacity,
            ),
        ];
        for (name, help, value) in fields {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (map, usage) in &maps {
                let labels = [("map", *map)];
                ConstGauge::new(value(usage)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
