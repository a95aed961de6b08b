//! Health endpoints as load balancers and probes use them: a Local LoadBalancer's
//! healthCheckNodePort answers 200 with its local endpoint count while this node has local
//! endpoints and 503 when it has none, following changes within a sync; the node's own
//! endpoint answers 200 once the datapath is programmed.

use std::{
    fs,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::Agent,
    echo::http_get,
    lab::{NodeLab, TEST_PREFIX},
};

fn manifest(endpoint_node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: edge, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.70
  externalTrafficPolicy: Local
  healthCheckNodePort: 32070
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30070}}]
status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.70}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: edge-1, namespace: shop, labels: {{kubernetes.io/service-name: edge}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.244.1.2], nodeName: {endpoint_node}}}
"
    )
}

fn get(lab: &NodeLab, addr: &str) -> anyhow::Result<(u16, String)> {
    http_get(&lab.client, addr)
}

fn wait_for(lab: &NodeLab, addr: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(lab, addr) {
            Ok((s, body)) if s == status => return body,
            other if Instant::now() > deadline => panic!("{addr}: wanted {status}, got {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn health_check_node_port_follows_local_endpoints_and_the_node_reports_healthy() {
    let lab = NodeLab::new(TEST_PREFIX, 1).expect("lab");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("manifests");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("edge.yaml"), manifest("node-a")).unwrap();
    let _agent = Agent::start_with(
        &lab.node,
        &lab.lab.pin_dir(),
        &dir,
        &lab.node_interfaces(),
        &tmp.path().join("agent.log"),
        &["--node-name", "node-a", "--manifest-poll-interval", "100ms"],
    )
    .unwrap();

    let node = wait_for(&lab, "192.168.77.1:10256", 200);
    assert!(node.contains(r#""status":"ok""#), "{node}");
    let body = wait_for(&lab, "192.168.77.1:32070", 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["service"]["namespace"], "shop");
    assert_eq!(json["service"]["name"], "edge");
    assert_eq!(json["localEndpoints"], 1);

    // The endpoint moves to another node: this node now answers 503.
    fs::write(dir.join("edge.yaml"), manifest("node-b")).unwrap();
    let body = wait_for(&lab, "192.168.77.1:32070", 503);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["localEndpoints"], 0);

    // The Service goes: so does its health-check port.
    fs::remove_file(dir.join("edge.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&lab, "192.168.77.1:32070").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the health-check port is still open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
