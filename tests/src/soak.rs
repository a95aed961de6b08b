//! Endpoint churn under load: while clients keep opening connections to a Service, its
//! endpoints are added, made terminating and removed through the (fake) Kubernetes API at a
//! steady rate; the agent follows with its incremental path. Used by the `lab_churn` test (a
//! short run) and by `lb-bench` (the full length).
//!
//! Every endpoint is a real address of a backend namespace with an echo server, and an endpoint
//! leaves its slice only after it has been terminating for a grace period. A request that
//! fails within the grace period means the datapath sent a connection where it must not have,
//! or cut one it should have kept: that is a failure. A request that had already lasted longer
//! than the grace period when it failed may have outlived its backend, which the datapath then
//! resets by design (Kubernetes gives pods 30 s, the soak far less): those are counted apart.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::{
    agent::Agent,
    echo::{http_get_path, start_backends, tcp_request},
    fake_api::FakeApi,
    lab::{NodeLab, TEST_PREFIX},
};

#[derive(Clone, Debug)]
pub struct Config {
    pub duration: Duration,
    pub changes_per_second: u32,
    /// Addresses per backend namespace that can be endpoints (each answers).
    pub addresses_per_backend: usize,
    /// How long an endpoint stays terminating before it leaves the slice.
    pub grace: Duration,
    pub clients: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seconds: f64,
    pub changes: u64,
    pub requests: u64,
    /// Requests that failed within the grace period: the datapath's fault.
    pub failed: u64,
    /// Requests that failed after lasting longer than the grace period (a SYN lost and resent,
    /// a starved client): their backend may have left meanwhile.
    pub outlived_grace: u64,
    /// The first few failures of either kind, with how long the request had lasted.
    pub first_failures: Vec<String>,
    pub syncs: f64,
    pub mean_programming_ms: f64,
    /// After the churn, once settled: backend entries left vs the endpoints left.
    pub backend_entries_after: u64,
    pub endpoints_after: u64,
    /// Conntrack entries once every connection has closed and expired.
    pub conntrack_after: u64,
    /// The datapath's own refusals over the run (counters): established flows reset because
    /// their backend went away, and new flows answered with a reset or unreachable for want
    /// of a backend. Tells a failure the datapath caused from one it did not.
    pub reset_backend_gone: u64,
    pub reject_no_backend: u64,
    /// The most backends the Service had in the maps at once, sampled during the churn.
    pub most_backends_programmed: usize,
}

const VIP: &str = "10.96.0.10:80";

const OBJECTS: &str = "apiVersion: v1
kind: Service
metadata: {name: churn, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    Terminating(Instant),
}

fn slice(endpoints: &BTreeMap<String, State>) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(addr, state)| {
            let (ready, terminating) = match state {
                State::Ready => (true, false),
                State::Terminating(_) => (false, true),
            };
            format!(
                "\n- {{addresses: [{addr}], nodeName: node-a, conditions: {{ready: {ready}, \
                 serving: true, terminating: {terminating}}}}}"
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: churn-1, namespace: default, labels: {{kubernetes.io/service-name: churn}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:{endpoints}
"
    )
}

fn metric(text: &str, series: &str) -> f64 {
    crate::agent::metric_sample(text, series).unwrap_or(0.0)
}

pub fn run(config: &Config) -> anyhow::Result<Report> {
    let backends = 3;
    let lab = NodeLab::new(TEST_PREFIX, backends).context("lab")?;
    let _servers = start_backends(&lab, 8080)?;
    // A load generator's client: thousands of short connections a second would otherwise run
    // out of ports held in TIME_WAIT (EADDRNOTAVAIL) within the minute. Reusing them is also
    // what exercises the datapath's handling of a new SYN on a closed connection's ports.
    lab.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    lab.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let mut pool = Vec::new();
    for (i, ns) in lab.backends.iter().enumerate() {
        let i = i + 1;
        pool.push(format!("10.244.{i}.2"));
        for j in 0..config.addresses_per_backend.saturating_sub(1) {
            let addr = format!("10.244.{i}.{}", 10 + j);
            ns.ip(&format!("addr add {addr}/24 dev eth0"))?;
            pool.push(addr);
        }
    }
    let base: Vec<String> = (1..=backends).map(|i| format!("10.244.{i}.2")).collect();
    let api = FakeApi::start(&lab.node)?;
    api.apply_yaml(OBJECTS)?;
    let mut endpoints: BTreeMap<String, State> =
        base.iter().map(|a| (a.clone(), State::Ready)).collect();
    api.apply_yaml(&slice(&endpoints))?;

    let tmp = tempfile::tempdir()?;
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let kubeconfig = kubeconfig.to_string_lossy().to_string();
    let pin_dir = lab.lab.pin_dir();
    let mut agent = Agent::start_run(
        &lab.node,
        &pin_dir,
        &lab.node_interfaces(),
        &tmp.path().join("agent.log"),
        &[
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            "node-a",
            "--min-sync-period",
            "20ms",
            "--conntrack-gc-interval",
            "1s",
        ],
    )?;
    let backends_programmed = |pin_dir: &std::path::Path| {
        lb_agent::maps::read_services(pin_dir)
            .ok()
            .and_then(|s| s.first().map(|s| s.backends.len()))
            .unwrap_or(0)
    };
    agent.wait_until(Duration::from_secs(30), || {
        backends_programmed(&pin_dir) == backends
    })?;

    // Clients: connect, request, reply, close, again, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<(String, Duration)>>> = Arc::default();
    let vip: SocketAddr = VIP.parse()?;
    let clients: Vec<_> = (0..config.clients)
        .map(|_| {
            let (stop, requests, failures) = (stop.clone(), requests.clone(), failures.clone());
            lab.client.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    if let Err(err) = tcp_request(vip, Duration::from_secs(2)) {
                        failures
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .push((format!("{err:#}"), started.elapsed()));
                    }
                    requests.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();

    // Churn: one endpoint changes per tick: added ready, made terminating, or (after the grace
    // period) removed. A few stay ready at all times.
    let mut rng = StdRng::seed_from_u64(rand::random());
    let interval = Duration::from_secs(1) / config.changes_per_second.max(1);
    let started = Instant::now();
    let mut next = started;
    let mut changes = 0u64;
    let mut most = 0;
    while started.elapsed() < config.duration {
        let now = Instant::now();
        let ready: Vec<String> = endpoints
            .iter()
            .filter(|(_, s)| **s == State::Ready)
            .map(|(a, _)| a.clone())
            .collect();
        let expired: Vec<String> = endpoints
            .iter()
            .filter(|(_, s)| matches!(s, State::Terminating(t) if now.duration_since(*t) > config.grace))
            .map(|(a, _)| a.clone())
            .collect();
        let absent: Vec<&String> = pool
            .iter()
            .filter(|a| !endpoints.contains_key(*a))
            .collect();
        match rng.random_range(0..3) {
            0 if !expired.is_empty() => {
                endpoints.remove(&expired[rng.random_range(0..expired.len())]);
            }
            1 if ready.len() > 3 => {
                let addr = &ready[rng.random_range(0..ready.len())];
                endpoints.insert(addr.clone(), State::Terminating(now));
            }
            _ if !absent.is_empty() => {
                let addr = absent[rng.random_range(0..absent.len())].clone();
                endpoints.insert(addr, State::Ready);
            }
            _ => {}
        }
        api.apply_yaml(&slice(&endpoints))?;
        changes += 1;
        if changes.is_multiple_of(50) {
            most = most.max(backends_programmed(&pin_dir));
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Settle: everything but the base set goes terminating, then away.
    let now = Instant::now();
    for (addr, state) in endpoints.iter_mut() {
        if !base.contains(addr) {
            *state = State::Terminating(now);
        }
    }
    api.apply_yaml(&slice(&endpoints))?;
    thread::sleep(config.grace + Duration::from_millis(200));
    endpoints.retain(|addr, _| base.contains(addr));
    api.apply_yaml(&slice(&endpoints))?;
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }

    let (_, metrics) = http_get_path(&lab.node, "127.0.0.1:10249", "/metrics")?;
    let syncs = metric(&metrics, "lb_syncs_total{result=\"ok\"}");
    let programming = metric(&metrics, "lb_network_programming_duration_seconds_sum");
    let programmed = metric(&metrics, "lb_network_programming_duration_seconds_count");
    // Leaks: once settled, only the endpoints left (the base ones the churn did not take) have
    // backend entries, and once every
    // connection has closed and expired (TCP closing: 10 s) the garbage collector leaves no
    // conntrack entry.
    let fill = |map: &str| -> u64 {
        lb_agent::maps::fill_levels(&pin_dir)
            .ok()
            .and_then(|l| l.into_iter().find(|m| m.map == map))
            .map_or(u64::MAX, |m| m.entries)
    };
    // Up to the longest lifetime an entry can have here (a SYN that got no answer: 60 s) and
    // a collector pass; a run that settles sooner ends sooner.
    let settle = Duration::from_nanos(lb_common::timeouts::TCP_SYN_NS) + Duration::from_secs(5);
    let deadline = Instant::now() + settle;
    while Instant::now() < deadline
        && (fill(lb_common::map_names::BACKENDS) != endpoints.len() as u64
            || fill(lb_common::map_names::CONNTRACK) != 0)
    {
        thread::sleep(Duration::from_millis(250));
    }
    let failures = failures
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let counters = lb_agent::maps::read_counters(&pin_dir).unwrap_or_default();
    let counter = |which: lb_common::Counter| -> u64 {
        counters
            .iter()
            .find(|(c, _)| *c == which)
            .map_or(u64::MAX, |(_, n)| *n)
    };
    let report = Report {
        seconds,
        changes,
        requests: requests.load(Ordering::Relaxed),
        failed: failures
            .iter()
            .filter(|(_, took)| *took < config.grace)
            .count() as u64,
        outlived_grace: failures
            .iter()
            .filter(|(_, took)| *took >= config.grace)
            .count() as u64,
        first_failures: failures
            .iter()
            .take(5)
            .map(|(err, took)| format!("after {took:?}: {err}"))
            .collect(),
        syncs,
        mean_programming_ms: if programmed > 0.0 {
            programming / programmed * 1000.0
        } else {
            0.0
        },
        backend_entries_after: fill(lb_common::map_names::BACKENDS),
        endpoints_after: endpoints.len() as u64,
        conntrack_after: fill(lb_common::map_names::CONNTRACK),
        reset_backend_gone: counter(lb_common::Counter::ResetBackendGone),
        reject_no_backend: counter(lb_common::Counter::RejectNoBackend),
        most_backends_programmed: most,
    };
    agent.stop()?;
    if report.failed + report.outlived_grace > 0 {
        eprintln!("agent log:\n{}", agent.log_text());
    }
    Ok(report)
}
