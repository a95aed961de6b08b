//! The operator surface against a running datapath: the CLI commands (table, JSON, YAML) read
//! the pinned maps, and the Prometheus endpoint shows the agent's and the datapath's series
//! while traffic flows.

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use lb_agent::maps::read_services;
use lb_tests::{
    agent::{cli, metric_sample as sample, Agent},
    echo::{http_get_path, start_backends, tcp_request, udp_request, TcpSession},
    examples_with,
    lab::{NodeLab, CLIENT_ADDR, TEST_PREFIX},
};

const VIP: &str = "10.96.0.10:80";
const METRICS: &str = "127.0.0.1:10249";
const TIMEOUT: Duration = Duration::from_secs(2);

/// The examples, plus a Service whose only endpoint is terminating (so the CLI shows that
/// state; no traffic goes to it) and a malformed Service (so the invalid-object metric counts it).
const EXTRA: &str = r#"apiVersion: v1
kind: Service
metadata: {name: draining, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: draining-1
  namespace: default
  labels: {kubernetes.io/service-name: draining}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - addresses: ["10.244.9.9"]
    conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec:
  clusterIP: 10.96.0.30
  ports: [{protocol: TCP, port: 70000}]
"#;

#[test]
fn cli_and_metrics_show_services_connections_fill_levels_and_traffic() {
    let lab = NodeLab::new(TEST_PREFIX, 3).expect("lab");
    let _servers = start_backends(&lab, 8080).expect("echo servers");
    let tmp = tempfile::tempdir().unwrap();
    let dir = examples_with(tmp.path(), "draining.yaml", EXTRA);
    let pin_dir = lab.lab.pin_dir();
    let mut agent = Agent::start_with(
        &lab.node,
        &pin_dir,
        &dir,
        &lab.node_interfaces(),
        &tmp.path().join("agent.log"),
        // Room for the test's few thousand short connections: a full LRU table would evict
        // the idle long-lived one.
        &[
            "--conntrack-max",
            "32768",
            "--manifest-poll-interval",
            "200ms",
            "--log-format",
            "json",
        ],
    )
    .expect("start agent");
    agent
        .wait_until(Duration::from_secs(20), || {
            read_services(&pin_dir).is_ok_and(|s| s.len() == 3)
        })
        .expect("agent programs the services");

    // A long-lived connection to find in the conntrack dump, and traffic that keeps flowing
    // while the metrics are scraped.
    let vip: SocketAddr = VIP.parse().unwrap();
    let mut session = lab
        .client
        .run(move || TcpSession::connect(vip, TIMEOUT))
        .expect("connect");
    let first = session.request().expect("session request");
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (stop, answered) = (stop.clone(), answered.clone());
        lab.client.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                tcp_request(vip, TIMEOUT)?;
                udp_request(vip, TIMEOUT)?;
                answered.fetch_add(2, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let wait_for_traffic = |more: usize| {
        let target = answered.load(Ordering::Relaxed) + more;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while answered.load(Ordering::Relaxed) < target {
            assert!(std::time::Instant::now() < deadline, "traffic stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for_traffic(20);

    // services: table, JSON and YAML agree; backend states are shown.
    let table = cli(&pin_dir, &["services"]).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "SERVICE",
            "KIND",
            "FRONTEND",
            "ACTIVE",
            "TERMINATING",
            "BACKENDS",
            "PACKETS",
            "BYTES"
        ]
    );
    let row = |service: &str, kind: &str| -> Vec<String> {
        table
            .lines()
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .find(|cells| cells.len() > 2 && cells[0] == service && cells[1] == kind)
            .unwrap_or_else(|| panic!("no row {service} {kind}: {table}"))
    };
    let http = row("default/demo-service:http/TCP", "ClusterIP");
    assert_eq!(http[2..5], ["10.96.0.10:80", "3", "0"], "{table}");
    assert!(
        http[6].parse::<u64>().unwrap() > 0,
        "packets counted: {table}"
    );
    let draining = row("default/draining:http/TCP", "ClusterIP");
    assert_eq!(
        draining[2..6],
        ["10.96.0.20:80", "0", "1", "10.244.9.9:8080(terminating)"],
        "{table}"
    );
    assert!(
        !table.contains("broken"),
        "the malformed Service is skipped"
    );
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&cli(&pin_dir, &["services", "-o", "yaml"]).unwrap()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&cli(&pin_dir, &["services", "-o", "json"]).unwrap()).unwrap();
    let draining_yaml = yaml
        .as_sequence()
        .unwrap()
        .iter()
        .find(|s| s["name"].as_str() == Some("default/draining:http/TCP"))
        .expect("draining in YAML");
    assert_eq!(
        draining_yaml["backends"][0]["state"].as_str(),
        Some("terminating")
    );
    let states: BTreeSet<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "default/demo-service:http/TCP")
        .unwrap()["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, BTreeSet::from(["active"]));

    // conntrack: the long-lived connection, with client, frontend, backend and state;
    // filtered by Service.
    let flows: serde_json::Value = serde_json::from_str(
        &cli(
            &pin_dir,
            &["conntrack", "--service", "demo-service:http", "-o", "json"],
        )
        .unwrap(),
    )
    .unwrap();
    let flows = flows.as_array().unwrap();
    assert!(
        flows
            .iter()
            .all(|f| f["service"] == "default/demo-service:http/TCP"),
        "filtered: {flows:?}"
    );
    let client = session.local.to_string();
    let long_lived = flows
        .iter()
        .find(|f| f["client"] == client.as_str())
        .unwrap_or_else(|| panic!("{client} in {flows:?}"));
    assert_eq!(long_lived["frontend"], VIP);
    assert_eq!(long_lived["state"], "established");
    assert_eq!(long_lived["protocol"], "TCP");
    let backend_index: usize = first.server.trim_start_matches("backend-").parse().unwrap();
    assert_eq!(
        long_lived["backend"],
        format!("10.244.{backend_index}.2:8080"),
        "the backend that answered"
    );
    assert!(session.local.ip().to_string() == CLIENT_ADDR);
    let table = cli(&pin_dir, &["conntrack", "--service", "echo-udp"]).unwrap();
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l.starts_with("default/demo-service:echo-udp/UDP") && l.contains(" open ")),
        "{table}"
    );
    assert!(table.lines().count() > 1, "UDP flows listed: {table}");

    // stats: counters, drops by reason, fill levels (capacity from the flags).
    let stats: serde_json::Value =
        serde_json::from_str(&cli(&pin_dir, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(
        stats["counters"]["new_flow"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(stats["drops"]["no_backend"], 0, "{stats}");
    let map = |name: &str| {
        stats["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"] == name)
            .unwrap_or_else(|| panic!("{name} in {stats}"))
            .clone()
    };
    let ct = map("LB_CONNTRACK");
    assert_eq!(ct["capacity"], 32768);
    assert!(ct["entries"].as_u64().unwrap() >= 2, "{ct}");
    assert!(ct["fill_ratio"].as_f64().unwrap() > 0.0, "{ct}");
    // demo-service: ClusterIP + NodePort on the node's address, two ports; draining: one.
    let frontends: usize = read_services(&pin_dir)
        .unwrap()
        .iter()
        .map(|s| s.frontends.len())
        .sum();
    assert_eq!(map("LB_FRONTENDS")["entries"], frontends as u64);
    assert_eq!(map("LB_SERVICES")["entries"], 3);
    // The address filter counts bits: at least one per frontend key (some may share one).
    let filter = map("LB_ADDR_FILTER");
    assert_eq!(filter["capacity"], 1 << 20);
    assert!(filter["entries"].as_u64().unwrap() > 0, "{filter}");
    let table = cli(&pin_dir, &["stats"]).unwrap();
    for header in ["COUNTER", "DROP-REASON", "MAP"] {
        assert!(
            table.lines().any(|l| l.starts_with(header)),
            "{header}: {table}"
        );
    }

    // Metrics, scraped twice while traffic flows: the request counter of the Service grows.
    let scrape = || {
        let (status, body) =
            http_get_path(&lab.node, METRICS, "/metrics").expect("metrics endpoint answers");
        assert_eq!(status, 200, "{body}");
        body
    };
    let requests = "lb_service_packets_total{service=\"default/demo-service\",port=\"http\",\
                    protocol=\"TCP\",scope=\"cluster\",direction=\"request\"}";
    let before = scrape();
    wait_for_traffic(20);
    let after = scrape();
    let value = |text: &str, series: &str| {
        sample(text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert!(
        value(&after, requests) > value(&before, requests),
        "{requests} grows with traffic"
    );
    let udp_replies = "lb_service_bytes_total{service=\"default/demo-service\",port=\"echo-udp\",\
                       protocol=\"UDP\",scope=\"cluster\",direction=\"reply\"}";
    assert!(value(&after, udp_replies) > 0.0);
    assert!(value(&after, "lb_syncs_total{result=\"ok\"}") >= 1.0);
    assert_eq!(value(&after, "lb_syncs_total{result=\"failed\"}"), 0.0);
    assert!(value(&after, "lb_sync_duration_seconds_count") >= 1.0);
    assert!(value(&after, "lb_network_programming_duration_seconds_count") >= 1.0);
    assert!(value(&after, "lb_map_operations_total{operation=\"update\"}") > 0.0);
    assert_eq!(value(&after, "lb_invalid_objects{kind=\"Service\"}"), 1.0);
    assert_eq!(
        value(&after, "lb_invalid_objects{kind=\"EndpointSlice\"}"),
        0.0
    );
    assert_eq!(value(&after, "lb_programming_errors"), 0.0);
    assert_eq!(
        value(&after, "lb_map_capacity{map=\"LB_CONNTRACK\"}"),
        32768.0
    );
    assert!(value(&after, "lb_map_fill_ratio{map=\"LB_CONNTRACK\"}") > 0.0);
    assert!(value(&after, "lb_conntrack_entries") >= 2.0);
    assert!(value(&after, "lb_datapath_packets_total{event=\"new_flow\"}") > 0.0);
    assert_eq!(
        value(&after, "lb_drops_total{reason=\"source_range\"}"),
        0.0
    );
    assert_eq!(
        value(
            &after,
            "lb_service_backends{service=\"default/draining\",port=\"http\",protocol=\"TCP\",\
             scope=\"cluster\"}"
        ),
        1.0
    );
    // Standalone: no watch to restart, the series is there at zero.
    assert_eq!(
        value(&after, "lb_watch_restarts_total{resource=\"services\"}"),
        0.0
    );

    // An edit is applied and timed: a second programming-latency sample, more map writes.
    let syncs = value(&after, "lb_network_programming_duration_seconds_count");
    let writes = value(&after, "lb_map_operations_total{operation=\"update\"}");
    fs::remove_file(dir.join("draining.yaml")).unwrap();
    agent
        .wait_until(Duration::from_secs(10), || {
            read_services(&pin_dir).is_ok_and(|s| s.len() == 2)
        })
        .expect("the removed Service goes");
    let edited = scrape();
    assert_eq!(
        value(&edited, "lb_network_programming_duration_seconds_count"),
        syncs + 1.0
    );
    assert!(value(&edited, "lb_map_operations_total{operation=\"delete\"}") > 0.0);
    assert_eq!(
        value(&edited, "lb_map_operations_total{operation=\"update\"}"),
        writes,
        "removing a Service writes nothing"
    );
    assert_eq!(value(&edited, "lb_invalid_objects{kind=\"Service\"}"), 0.0);
    let (status, _) = http_get_path(&lab.node, METRICS, "/other").unwrap();
    assert_eq!(status, 404);

    stop.store(true, Ordering::Relaxed);
    traffic
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("traffic failed: {e:#}\n{}", agent.log_text()));
    session
        .request()
        .expect("the long-lived connection still works");
    assert!(agent.stop().unwrap().success());

    // Structured logs: one JSON object per line, with level, target and fields.
    let log = agent.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["target"].is_string()));
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Service default/broken"))),
        "the skipped Service is logged with its name: {log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "datapath programmed"
                && l["fields"]["writes"].is_u64())
    );

    // The CLI reads the pins, so it works with no agent running.
    let table = cli(&pin_dir, &["services"]).unwrap();
    assert!(table.contains("default/demo-service:http/TCP"), "{table}");
    let stats: serde_json::Value =
        serde_json::from_str(&cli(&pin_dir, &["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(stats["counters"]["new_flow"].as_u64().unwrap() > 0);
    let flows: serde_json::Value =
        serde_json::from_str(&cli(&pin_dir, &["conntrack", "-o", "json"]).unwrap()).unwrap();
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["client"] == client.as_str()),
        "the long-lived connection outlives the agent"
    );
}
