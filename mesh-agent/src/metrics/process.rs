//! `process_*` metrics with the Prometheus client conventions' names, read from `/proc/self` at
//! scrape time: a handful of small reads, nothing kept between scrapes. A file that cannot be
//! read leaves its metrics out rather than failing the scrape.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

#[derive(Debug)]
pub struct ProcessCollector;

/// What one scrape read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub threads: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|v| *v > 0)
}

/// Fields of `/proc/self/stat` after the command name (which may hold spaces and parentheses,
/// hence the split at the last `)`); index 0 is field 3 (`state`) of proc(5).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn parse_u64(s: Option<&&str>) -> Option<u64> {
    s.and_then(|s| s.parse().ok())
}

impl ProcessStats {
    pub fn read() -> Self {
        let mut out = ProcessStats::default();
        let ticks = sysconf(libc::_SC_CLK_TCK).map(|t| t as f64);
        let page = sysconf(libc::_SC_PAGESIZE);
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            let f = stat_fields(&stat);
            // proc(5): utime 14, stime 15, num_threads 20, starttime 22, vsize 23, rss 24.
            let (utime, stime) = (parse_u64(f.get(11)), parse_u64(f.get(12)));
            if let (Some(u), Some(s), Some(t)) = (utime, stime, ticks) {
                out.cpu_seconds = Some((u + s) as f64 / t);
            }
            out.threads = parse_u64(f.get(17));
            out.virtual_bytes = parse_u64(f.get(20));
            out.resident_bytes = parse_u64(f.get(21)).zip(page).map(|(p, s)| p * s);
            let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            if let (Some(start), Some(boot), Some(t)) = (parse_u64(f.get(19)), boot, ticks) {
                out.start_time_seconds = Some(boot as f64 + start as f64 / t);
            }
        }
        out.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        out.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Max open files"))
                    .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            });
        out
    }
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Option<V>,
) -> Result<(), std::fmt::Error> {
    match value {
        Some(v) => ConstGauge::new(v).encode(encoder.encode_descriptor(
            name,
            help,
            None,
            MetricType::Gauge,
        )?),
        None => Ok(()),
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(cpu) = s.cpu_seconds {
            ConstCounter::new(cpu).encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?)?;
        }
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            s.resident_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            s.virtual_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_threads",
            "Number of OS threads in the process.",
            s.threads,
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            s.start_time_seconds,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            s.open_fds,
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            s.max_fds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read();
        assert!(s.resident_bytes.is_some_and(|r| r > 0), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n > 0), "{s:?}");
        assert!(s.max_fds.is_some(), "{s:?}");
        assert!(s.cpu_seconds.is_some(), "{s:?}");
        assert!(s.start_time_seconds.is_some_and(|t| t > 1e9), "{s:?}");
    }

    #[test]
    fn command_names_with_parentheses() {
        let f = stat_fields("1 (a) b) S 0 0");
        assert_eq!(f, ["S", "0", "0"]);
    }
}
