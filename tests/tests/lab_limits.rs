//! A full map in a running agent: the Service that does not fit is refused whole, with a clear
//! log line and a metric, the node stays healthy (degraded), and the others keep working.

use std::{fs, net::SocketAddr, time::Duration};

use lb_agent::maps::read_services;
use lb_tests::{
    agent::Agent,
    echo::{http_get, http_get_path, start_backends, tcp_request},
    lab::{NodeLab, TEST_PREFIX},
};

const MANIFESTS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: big, namespace: default}
spec:
  clusterIP: 10.96.0.40
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: big-1, namespace: default, labels: {kubernetes.io/service-name: big}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.10]}
- {addresses: [10.244.1.11]}
- {addresses: [10.244.1.12]}
- {addresses: [10.244.1.13]}
---
apiVersion: v1
kind: Service
metadata: {name: small, namespace: default}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: small-1, namespace: default, labels: {kubernetes.io/service-name: small}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.2]}
"#;

#[test]
fn a_service_that_does_not_fit_is_refused_whole_reported_and_the_rest_served() {
    let lab = NodeLab::new(TEST_PREFIX, 1).expect("lab");
    let _servers = start_backends(&lab, 8080).expect("echo server");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("manifests");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("services.yaml"), MANIFESTS).unwrap();
    let pin_dir = lab.lab.pin_dir();
    // Backend ids 1..=3: `big` needs four, `small` one.
    let mut agent = Agent::start_with(
        &lab.node,
        &pin_dir,
        &dir,
        &lab.node_interfaces(),
        &tmp.path().join("agent.log"),
        &["--max-backends", "4"],
    )
    .expect("agent");
    agent
        .wait_until(Duration::from_secs(20), || {
            read_services(&pin_dir).is_ok_and(|s| !s.is_empty())
        })
        .expect("programmed");
    let services = read_services(&pin_dir).unwrap();
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/small:http/TCP"], "big refused whole");
    assert_eq!(services[0].backends.len(), 1);

    let vip: SocketAddr = "10.96.0.30:80".parse().unwrap();
    let reply = lab
        .client
        .run(move || tcp_request(vip, Duration::from_secs(2)))
        .expect("the Service that fits answers");
    assert_eq!(reply.server, "backend-1");

    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("service default/big:http/TCP")
                && l.contains("LB_BACKENDS full")
                && l.contains("--max-backends")),
        "the log names the Service and the limit:\n{log}"
    );
    let (status, metrics) = http_get_path(&lab.node, "127.0.0.1:10249", "/metrics").unwrap();
    assert_eq!(status, 200);
    let value = |series: &str| {
        lb_tests::agent::metric_sample(&metrics, series)
            .unwrap_or_else(|| panic!("{series} in\n{metrics}"))
    };
    assert_eq!(value("lb_programming_errors"), 1.0);
    assert!(value("lb_syncs_total{result=\"partial\"}") >= 1.0);
    assert_eq!(value("lb_map_entries{map=\"LB_BACKENDS\"}"), 1.0);
    assert_eq!(value("lb_map_capacity{map=\"LB_BACKENDS\"}"), 3.0);
    // Degraded, not down: probes must not restart an agent that serves everything else.
    let (status, body) = http_get(&lab.node, "127.0.0.1:10256").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("degraded"), "{body}");
    assert!(agent.stop().unwrap().success());
}
