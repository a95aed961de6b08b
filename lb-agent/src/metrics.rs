//! Prometheus metrics on `--metrics-addr` (`GET /metrics`).
//!
//! The agent's own work (syncs, programming latency, map operations, invalid objects, watch
//! restarts) is counted as it happens; what the datapath counts (per-service traffic, drops,
//! map fill levels, conntrack entries) is read from the pinned maps at scrape time, so the
//! figures are never staler than the scrape.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::maps;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

/// The agent's metrics. Cheap to update from the sync loop (atomics).
pub struct Metrics {
    registry: Mutex<Registry>,
    pub syncs: Family<ResultLabel, Counter>,
    pub sync_duration: Histogram,
    pub programming_latency: Histogram,
    pub map_operations: Family<OperationLabel, Counter>,
    pub invalid_objects: Family<KindLabel, Gauge>,
    pub programming_errors: Gauge,
    pub watch_restarts: Family<ResourceLabel, Counter>,
}

impl Metrics {
    /// `pin_dir`: where the datapath's maps are read at scrape time.
    pub fn new(pin_dir: PathBuf) -> Arc<Self> {
        let mut registry = Registry::with_prefix("lb");
        let syncs = Family::<ResultLabel, Counter>::default();
        registry.register(
            "syncs",
            "Syncs of the desired state into the maps, by result (ok, partial: some objects \
             refused, failed: nothing applied)",
            syncs.clone(),
        );
        // 100 µs .. ~52 s: one endpoint change and a full program of 10,000 Services both fit.
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        registry.register(
            "sync_duration_seconds",
            "Time to compute the desired state and write the maps, per sync",
            sync_duration.clone(),
        );
        let programming_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        registry.register(
            "network_programming_duration_seconds",
            "From an object change being seen (watch event or changed manifest) to the maps \
             holding it",
            programming_latency.clone(),
        );
        let map_operations = Family::<OperationLabel, Counter>::default();
        registry.register(
            "map_operations",
            "BPF map updates and deletes made by the agent",
            map_operations.clone(),
        );
        let invalid_objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "invalid_objects",
            "Objects skipped as malformed in the current state, by kind (the log names each \
             object and field)",
            invalid_objects.clone(),
        );
        let programming_errors = Gauge::default();
        registry.register(
            "programming_errors",
            "Services or frontends the last sync could not program (e.g. a full map); they \
             keep what they had",
            programming_errors.clone(),
        );
        let watch_restarts = Family::<ResourceLabel, Counter>::default();
        registry.register(
            "watch_restarts",
            "Kubernetes watches that failed and were restarted, by resource",
            watch_restarts.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector { pin_dir }));
        // Every kind of invalid object shows, at zero when there is none.
        for kind in ["Service", "EndpointSlice", "Endpoints", "Node", "document"] {
            let _ = invalid_objects.get_or_create(&KindLabel { kind: kind.into() });
        }
        for result in ["ok", "partial", "failed"] {
            let _ = syncs.get_or_create(&ResultLabel { result });
        }
        for resource in ["services", "endpointslices", "nodes"] {
            let _ = watch_restarts.get_or_create(&ResourceLabel { resource });
        }
        for operation in ["update", "delete"] {
            let _ = map_operations.get_or_create(&OperationLabel { operation });
        }
        Arc::new(Self {
            registry: Mutex::new(registry),
            syncs,
            sync_duration,
            programming_latency,
            map_operations,
            invalid_objects,
            programming_errors,
            watch_restarts,
        })
    }

    /// Sets the invalid-object gauges from the `Kind ns/name` of every error (`None`: a
    /// document that did not load).
    pub fn set_invalid_objects<'a>(&self, objects: impl Iterator<Item = Option<&'a str>>) {
        let mut counts: std::collections::BTreeMap<String, i64> =
            ["Service", "EndpointSlice", "Endpoints", "Node", "document"]
                .into_iter()
                .map(|k| (k.to_string(), 0))
                .collect();
        // An object with two bad fields is one invalid object; documents that did not load
        // have no name and each count.
        let mut seen = std::collections::HashSet::new();
        for object in objects {
            if object.is_some_and(|o| !seen.insert(o)) {
                continue;
            }
            let kind = object
                .and_then(|o| o.split_whitespace().next())
                .unwrap_or("document");
            *counts.entry(kind.to_string()).or_default() += 1;
        }
        for (kind, count) in counts {
            self.invalid_objects
                .get_or_create(&KindLabel { kind })
                .set(count);
        }
    }

    /// The exposition text (OpenMetrics), reading the datapath's maps.
    pub fn encode(&self) -> anyhow::Result<String> {
        let registry = self
            .registry
            .lock()
            .map_err(|_| anyhow::anyhow!("metrics registry poisoned"))?;
        let mut out = String::new();
        text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// Reads the pinned maps at scrape time.
#[derive(Debug)]
struct DatapathCollector {
    pin_dir: PathBuf,
}

fn encode_one<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
    metric_type: prometheus_client::metrics::MetricType,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in values {
        if labels.is_empty() {
            // An empty label set would print as `name{}`; a plain sample is what is meant.
            return metric.encode(family);
        }
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// `ns/name:port/PROTO` (and `#local` for the Local-policy frontends of a Service) as labels.
fn service_labels(entry: &str) -> Vec<(&'static str, String)> {
    let (entry, scope) = match entry.strip_suffix("#local") {
        Some(rest) => (rest, "local"),
        None => (entry, "cluster"),
    };
    let (service, rest) = entry.rsplit_once(':').unwrap_or((entry, ""));
    let (port, protocol) = rest.rsplit_once('/').unwrap_or((rest, ""));
    vec![
        ("service", service.to_string()),
        ("port", port.to_string()),
        ("protocol", protocol.to_string()),
        ("scope", scope.to_string()),
    ]
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        match maps::read_counters(&self.pin_dir) {
            Ok(counters) => {
                encode_one(
                    &mut encoder,
                    "datapath_packets",
                    "Packets the datapath handled, by what happened to them",
                    counters.iter().map(|(c, v)| {
                        (vec![("event", c.name().to_string())], ConstCounter::new(*v))
                    }),
                    MetricType::Counter,
                )?;
                encode_one(
                    &mut encoder,
                    "drops",
                    "Packets the datapath dropped or rejected, by reason",
                    counters.iter().filter_map(|(c, v)| {
                        c.drop_reason()
                            .map(|r| (vec![("reason", r.to_string())], ConstCounter::new(*v)))
                    }),
                    MetricType::Counter,
                )?;
            }
            Err(err) => debug!("metrics: datapath counters unreadable: {err:#}"),
        }
        match maps::read_services(&self.pin_dir) {
            Ok(services) => {
                let traffic = |f: fn(&maps::StatsView) -> (u64, u64)| {
                    services.iter().flat_map(move |s| {
                        let (request, reply) = f(&s.stats);
                        [("request", request), ("reply", reply)].map(|(direction, v)| {
                            let mut labels = service_labels(&s.name);
                            labels.push(("direction", direction.to_string()));
                            (labels, ConstCounter::new(v))
                        })
                    })
                };
                encode_one(
                    &mut encoder,
                    "service_packets",
                    "Packets of each Service port, by direction",
                    traffic(|s| (s.packets, s.reply_packets)),
                    MetricType::Counter,
                )?;
                encode_one(
                    &mut encoder,
                    "service_bytes",
                    "Bytes of each Service port, by direction",
                    traffic(|s| (s.bytes, s.reply_bytes)),
                    MetricType::Counter,
                )?;
                encode_one(
                    &mut encoder,
                    "service_backends",
                    "Backends new flows of each Service port may use",
                    services.iter().map(|s| {
                        (
                            service_labels(&s.name),
                            ConstGauge::new(s.backends.len() as i64),
                        )
                    }),
                    MetricType::Gauge,
                )?;
            }
            Err(err) => debug!("metrics: services unreadable: {err:#}"),
        }
        match maps::fill_levels(&self.pin_dir) {
            Ok(levels) => {
                let per_map = |f: fn(&maps::MapFill) -> f64| {
                    levels
                        .iter()
                        .map(move |l| (vec![("map", l.map.to_string())], ConstGauge::new(f(l))))
                };
                encode_one(
                    &mut encoder,
                    "map_entries",
                    "Entries in each BPF map",
                    per_map(|l| l.entries as f64),
                    MetricType::Gauge,
                )?;
                encode_one(
                    &mut encoder,
                    "map_capacity",
                    "Capacity of each BPF map (max_entries)",
                    per_map(|l| l.capacity as f64),
                    MetricType::Gauge,
                )?;
                encode_one(
                    &mut encoder,
                    "map_fill_ratio",
                    "Entries over capacity of each BPF map (LRU maps evict at 1)",
                    per_map(maps::MapFill::ratio),
                    MetricType::Gauge,
                )?;
                if let Some(ct) = levels
                    .iter()
                    .find(|l| l.map == lb_common::map_names::CONNTRACK)
                {
                    encode_one(
                        &mut encoder,
                        "conntrack_entries",
                        "Connection-tracking entries (two per flow: forward and reply)",
                        [(vec![], ConstGauge::new(ct.entries as i64))],
                        MetricType::Gauge,
                    )?;
                }
            }
            Err(err) => debug!("metrics: fill levels unreadable: {err:#}"),
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `addr` until the returned task is aborted. Encoding reads maps
/// (many syscalls for a big conntrack table), so it runs off the sync loop's thread.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<JoinHandle<()>> {
    let listener = crate::health::bind(addr)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let Some(path) = crate::health::read_request(&mut stream).await else {
                    return;
                };
                let (status, content_type, body) = if path == "/metrics" {
                    match tokio::task::spawn_blocking(move || metrics.encode()).await {
                        Ok(Ok(body)) => (
                            200,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            body,
                        ),
                        Ok(Err(err)) => {
                            warn!("metrics: {err:#}");
                            (500, "text/plain", format!("{err:#}\n"))
                        }
                        Err(err) => (500, "text/plain", format!("{err}\n")),
                    }
                } else {
                    (404, "text/plain", "metrics are at /metrics\n".to_string())
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    crate::health::write_response(&mut stream, status, content_type, &body),
                )
                .await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_become_labels() {
        let labels = service_labels("default/web:http/TCP#local");
        assert_eq!(
            labels,
            vec![
                ("service", "default/web".to_string()),
                ("port", "http".to_string()),
                ("protocol", "TCP".to_string()),
                ("scope", "local".to_string()),
            ]
        );
        assert_eq!(service_labels("ns/dns:53/UDP")[3].1, "cluster");
    }

    #[test]
    fn agent_metrics_encode_with_their_values() {
        let metrics = Metrics::new(PathBuf::from("/nonexistent/lb"));
        metrics
            .syncs
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
        metrics.sync_duration.observe(0.002);
        metrics.set_invalid_objects([Some("Service ns/a"), Some("Service ns/b"), None].into_iter());
        let text = metrics.encode().expect("encodes");
        assert!(text.contains("lb_syncs_total{result=\"ok\"} 1"), "{text}");
        assert!(
            text.contains("lb_syncs_total{result=\"failed\"} 0"),
            "{text}"
        );
        assert!(text.contains("lb_sync_duration_seconds_count 1"), "{text}");
        assert!(
            text.contains("lb_invalid_objects{kind=\"Service\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("lb_invalid_objects{kind=\"document\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lb_invalid_objects{kind=\"EndpointSlice\"} 0"),
            "{text}"
        );
        // No maps there: the datapath series are left out, the rest still encodes.
        assert!(!text.contains("lb_map_entries"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
