//! Two nodes: externalTrafficPolicy Cluster sends external traffic that arrives at node-a to an
//! endpoint on node-b, source-NATed to node-a, so the reply comes back through node-a even
//! though node-b has its own, shorter way to the client.
//!
//! ```text
//!                                                           ┌ lb-b1 ── backend-a 10.244.1.2
//!            ┌── eth-a 192.168.77.2 ── lb-c0 node-a (10.10.0.1)
//!            │                              │ lb-n0         └ lb-b2 ── pod-a     10.244.3.2
//!   client ──┤                              │
//!            │                              │               ┌ lb-b1 ── backend-b 10.244.2.2
//!            └── eth-b 192.168.78.2 ── lb-c0 node-b (10.10.0.2)
//!                                                           └ lb-b2 ── pod-b     10.244.4.2
//! ```
//!
//! Pods (`pod-a`, `pod-b`) are clients inside the cluster, one on each node, for the internal
//! policies (internalTrafficPolicy, topology, affinity).
//!
//! node-b reaches the client's 192.168.77.2 directly over its own link: a reply from backend-b
//! to the client's own address would bypass node-a and never be translated back.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use lb_agent::maps::read_services;
use lb_tests::{
    agent::Agent,
    echo::{http_get, tcp_request, EchoServer},
    lab::{Lab, Netns, TEST_PREFIX},
};

const MANIFEST: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.60
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30096}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.60}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.2.2], nodeName: node-b}
";

struct TwoNodes {
    lab: Lab,
    client: Netns,
    node_a: Netns,
    node_b: Netns,
    pod_a: Netns,
    pod_b: Netns,
    backend_a: Netns,
    backend_b: Netns,
    _servers: [EchoServer; 2],
}

fn two_nodes() -> TwoNodes {
    let mut lab = Lab::new(TEST_PREFIX).expect("lab");
    let client = lab.add_netns("client").unwrap();
    let node_a = lab.add_netns("node-a").unwrap();
    let node_b = lab.add_netns("node-b").unwrap();
    let backend_a = lab.add_netns("backend-a").unwrap();
    let backend_b = lab.add_netns("backend-b").unwrap();
    let pod_a = lab.add_netns("pod-a").unwrap();
    let pod_b = lab.add_netns("pod-b").unwrap();
    for ns in [&client, &node_a, &node_b] {
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0").unwrap();
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0").unwrap();
    }
    lab.link(
        &node_a,
        "lb-c0",
        "192.168.77.1/24",
        &client,
        "eth-a",
        "192.168.77.2/24",
    )
    .unwrap();
    lab.link(
        &node_b,
        "lb-c0",
        "192.168.78.1/24",
        &client,
        "eth-b",
        "192.168.78.2/24",
    )
    .unwrap();
    lab.link(
        &node_a,
        "lb-n0",
        "10.10.0.1/24",
        &node_b,
        "lb-n0",
        "10.10.0.2/24",
    )
    .unwrap();
    lab.link(
        &node_a,
        "lb-b1",
        "10.244.1.1/24",
        &backend_a,
        "eth0",
        "10.244.1.2/24",
    )
    .unwrap();
    lab.link(
        &node_b,
        "lb-b1",
        "10.244.2.1/24",
        &backend_b,
        "eth0",
        "10.244.2.2/24",
    )
    .unwrap();
    lab.link(
        &node_a,
        "lb-b2",
        "10.244.3.1/24",
        &pod_a,
        "eth0",
        "10.244.3.2/24",
    )
    .unwrap();
    lab.link(
        &node_b,
        "lb-b2",
        "10.244.4.1/24",
        &pod_b,
        "eth0",
        "10.244.4.2/24",
    )
    .unwrap();
    client
        .ip("route add 203.0.113.0/24 via 192.168.77.1")
        .unwrap();
    node_a.ip("route add 10.244.2.0/24 via 10.10.0.2").unwrap();
    node_a.ip("route add 10.244.4.0/24 via 10.10.0.2").unwrap();
    node_b.ip("route add 10.244.1.0/24 via 10.10.0.1").unwrap();
    node_b.ip("route add 10.244.3.0/24 via 10.10.0.1").unwrap();
    pod_a.ip("route add default via 10.244.3.1").unwrap();
    pod_b.ip("route add default via 10.244.4.1").unwrap();
    // node-b's own way to the client: straight over its link, not through node-a.
    node_b
        .ip("route add 192.168.77.0/24 via 192.168.78.2")
        .unwrap();
    backend_a.ip("route add default via 10.244.1.1").unwrap();
    backend_b.ip("route add default via 10.244.2.1").unwrap();
    let _servers = [
        EchoServer::start(&backend_a, "backend-a", 8080).unwrap(),
        EchoServer::start(&backend_b, "backend-b", 8080).unwrap(),
    ];

    TwoNodes {
        lab,
        client,
        node_a,
        node_b,
        pod_a,
        pod_b,
        backend_a,
        backend_b,
        _servers,
    }
}

/// An agent on `node` (interfaces lb-c0, lb-n0, lb-b1) over `dir`.
fn agent_on(lab: &Lab, node: &Netns, name: &str, snat: &str, dir: &std::path::Path) -> Agent {
    // Under the lab's directory (removed with it); bpffs names take no dots.
    let pin_dir = lab.pin_dir().join(name);
    let log = dir.join(format!("{name}.log"));
    Agent::start_with(
        node,
        &pin_dir,
        dir,
        &[
            "lb-c0".to_string(),
            "lb-n0".to_string(),
            "lb-b1".to_string(),
            "lb-b2".to_string(),
        ],
        &log,
        &[
            "--node-name",
            name,
            "--snat-address",
            snat,
            "--manifest-poll-interval",
            "100ms",
        ],
    )
    .unwrap()
}

#[test]
fn cluster_policy_traffic_to_a_remote_endpoint_returns_through_the_entry_node() {
    // `_servers` bound so the echo servers live as long as the test.
    let TwoNodes {
        lab,
        client,
        node_a,
        _servers,
        ..
    } = two_nodes();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("web.yaml"), MANIFEST).unwrap();
    let pin_dir = lab.pin_dir();
    let mut agent = Agent::start_with(
        &node_a,
        &pin_dir,
        tmp.path(),
        &[
            "lb-c0".to_string(),
            "lb-n0".to_string(),
            "lb-b1".to_string(),
        ],
        &tmp.path().join("agent.log"),
        &["--node-name", "node-a", "--snat-address", "10.10.0.1"],
    )
    .unwrap();
    agent
        .wait_until(Duration::from_secs(20), || {
            read_services(&pin_dir).is_ok_and(|s| s.iter().any(|s| s.backends.len() == 2))
        })
        .expect("agent ready");

    // The LoadBalancer IP, and the NodePort on node-a's address the client reaches.
    for target in ["203.0.113.60:80", "192.168.77.1:30096"] {
        let target: SocketAddr = target.parse().unwrap();
        let replies = client
            .run(move || {
                (0..40)
                    .map(|_| tcp_request(target, Duration::from_secs(2)))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .unwrap_or_else(|e| panic!("{target}: {e:#}\n{}", agent.log_text()));
        assert_eq!(replies.len(), 40, "{target}: every request succeeds");
        let servers: BTreeSet<&str> = replies.iter().map(|r| r.server.as_str()).collect();
        assert_eq!(
            servers,
            BTreeSet::from(["backend-a", "backend-b"]),
            "{target}: both nodes' endpoints"
        );
        for reply in &replies {
            let seen = reply.peer.ip().to_string();
            match reply.server.as_str() {
                // Off-node: source-NATed to node-a, so the reply comes back through it.
                "backend-b" => assert_eq!(seen, "10.10.0.1", "{target}"),
                // On-node: the client's own address.
                _ => assert_eq!(seen, "192.168.77.2", "{target}"),
            }
        }
    }
}

const LOCAL_POLICY: &str = "apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.61
  externalTrafficPolicy: Local
  healthCheckNodePort: 32097
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30097}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.61}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.2], nodeName: node-b}
";

#[test]
fn local_policy_keeps_the_client_address_on_the_endpoint_node_and_drops_on_the_other() {
    let TwoNodes {
        lab,
        client,
        node_a,
        node_b,
        _servers,
        ..
    } = two_nodes();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("local.yaml"), LOCAL_POLICY).unwrap();
    let mut agent_a = agent_on(&lab, &node_a, "node-a", "10.10.0.1", tmp.path());
    let mut agent_b = agent_on(&lab, &node_b, "node-b", "10.10.0.2", tmp.path());
    for agent in [&mut agent_a, &mut agent_b] {
        let pin_dir = agent.pin_dir.clone();
        agent
            .wait_until(Duration::from_secs(20), || {
                read_services(&pin_dir).is_ok_and(|s| s.iter().any(|s| s.name.ends_with("#local")))
            })
            .expect("agent ready");
    }

    // node-b has the endpoint: it serves the NodePort, and the endpoint sees the real client.
    let target: SocketAddr = "192.168.78.1:30097".parse().unwrap();
    let replies = client
        .run(move || {
            (0..20)
                .map(|_| tcp_request(target, Duration::from_secs(2)))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent_b.log_text()));
    for reply in &replies {
        assert_eq!(reply.server, "backend-b");
        assert_eq!(
            reply.peer.ip().to_string(),
            "192.168.78.2",
            "client address kept"
        );
    }

    // node-a has none: its NodePort drops (no answer, no reset).
    let target: SocketAddr = "192.168.77.1:30097".parse().unwrap();
    let refused = client
        .run(move || Ok(tcp_request(target, Duration::from_millis(700)).is_err()))
        .unwrap();
    assert!(
        refused,
        "node-a must not serve a Local Service it has no endpoint for"
    );
    let stats: serde_json::Value = serde_json::from_str(
        &lb_tests::agent::cli(&agent_a.pin_dir, &["stats", "-o", "json"]).unwrap(),
    )
    .unwrap();
    assert!(
        stats["drops"]["no_backend"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );

    // Health-check NodePorts tell the cloud load balancer which node to use.
    let wait_status = |addr: &str, want: u16| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match http_get(&client, addr).map(|(status, _)| status) {
                Ok(s) if s == want => return,
                other if std::time::Instant::now() > deadline => {
                    panic!("{addr}: wanted {want}, got {other:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    wait_status("192.168.78.1:32097", 200);
    wait_status("192.168.77.1:32097", 503);
}

/// Requests from `ns` to `target`: which backend answered each, and the address it saw.
fn ask(ns: &Netns, target: &str, count: usize) -> anyhow::Result<Vec<(String, String)>> {
    let target: SocketAddr = target.parse()?;
    ns.run(move || {
        (0..count)
            .map(|_| {
                tcp_request(target, Duration::from_secs(2))
                    .map(|r| (r.server, r.peer.ip().to_string()))
            })
            .collect()
    })
}

/// Both agents over `manifests` (one file), waiting until each has programmed `entries`.
fn both_agents(
    lab: &Lab,
    node_a: &Netns,
    node_b: &Netns,
    dir: &std::path::Path,
    manifests: &str,
    entries: usize,
) -> (Agent, Agent) {
    std::fs::write(dir.join("services.yaml"), manifests).unwrap();
    let mut a = agent_on(lab, node_a, "node-a", "10.10.0.1", dir);
    let mut b = agent_on(lab, node_b, "node-b", "10.10.0.2", dir);
    for agent in [&mut a, &mut b] {
        let pin_dir = agent.pin_dir.clone();
        agent
            .wait_until(Duration::from_secs(20), || {
                read_services(&pin_dir).is_ok_and(|s| s.len() == entries)
            })
            .expect("agent ready");
    }
    (a, b)
}

const NODES: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-b}}
status: {addresses: [{type: InternalIP, address: 192.168.78.1}]}
";

const INTERNAL_LOCAL: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: both, namespace: default}
spec:
  clusterIP: 10.96.0.62
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: both-1, namespace: default, labels: {kubernetes.io/service-name: both}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.2.2], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: only-b, namespace: default}
spec:
  clusterIP: 10.96.0.63
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: only-b-1, namespace: default, labels: {kubernetes.io/service-name: only-b}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.2], nodeName: node-b}
";

#[test]
fn internal_local_policy_keeps_pods_on_their_own_node() {
    let TwoNodes {
        lab,
        node_a,
        node_b,
        pod_a,
        pod_b,
        _servers,
        ..
    } = two_nodes();
    let tmp = tempfile::tempdir().unwrap();
    let manifests = format!("{NODES}{INTERNAL_LOCAL}");
    let (agent_a, agent_b) = both_agents(&lab, &node_a, &node_b, tmp.path(), &manifests, 2);
    let logs = || format!("{}\n{}", agent_a.log_text(), agent_b.log_text());

    // Each pod reaches only its own node's endpoint, which sees the pod's own address.
    for (pod, backend, address) in [
        (&pod_a, "backend-a", "10.244.3.2"),
        (&pod_b, "backend-b", "10.244.4.2"),
    ] {
        let replies = ask(pod, "10.96.0.62:80", 20).unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
        for (server, seen) in &replies {
            assert_eq!(server, backend, "node-local endpoint only");
            assert_eq!(seen, address, "the pod's own address");
        }
    }

    // A node without a local endpoint drops (kube-proxy's semantics: no fallback to others).
    let replies = ask(&pod_b, "10.96.0.63:80", 5).unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    assert!(replies.iter().all(|(server, _)| server == "backend-b"));
    let target: SocketAddr = "10.96.0.63:80".parse().unwrap();
    let dropped = pod_a
        .run(move || Ok(tcp_request(target, Duration::from_millis(700)).is_err()))
        .unwrap();
    assert!(dropped, "pod-a has no local endpoint for only-b: dropped");
    let stats: serde_json::Value = serde_json::from_str(
        &lb_tests::agent::cli(&agent_a.pin_dir, &["stats", "-o", "json"]).unwrap(),
    )
    .unwrap();
    assert!(
        stats["drops"]["no_backend"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert_eq!(
        stats["drops"]["no_backend_rejected"], 0,
        "dropped, not rejected"
    );
}

/// A PreferClose Service with an endpoint in each zone; `complete`: both carry zone hints,
/// else only the first (incomplete hints: kube-proxy then ignores them all).
fn topology(complete: bool) -> String {
    let hint = |zone: &str| format!(", hints: {{forZones: [{{name: {zone}}}]}}");
    format!(
        "
---
apiVersion: v1
kind: Service
metadata: {{name: zonal, namespace: default}}
spec:
  clusterIP: 10.96.0.64
  trafficDistribution: PreferClose
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: zonal-1, namespace: default, labels: {{kubernetes.io/service-name: zonal}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.244.1.2], nodeName: node-a, zone: zone-a{}}}
- {{addresses: [10.244.2.2], nodeName: node-b, zone: zone-b{}}}
",
        hint("zone-a"),
        if complete {
            hint("zone-b")
        } else {
            String::new()
        },
    )
}

#[test]
fn prefer_close_keeps_traffic_in_the_zone_and_falls_back_without_complete_hints() {
    let TwoNodes {
        lab,
        node_a,
        node_b,
        pod_a,
        pod_b,
        _servers,
        ..
    } = two_nodes();
    let tmp = tempfile::tempdir().unwrap();
    let (agent_a, agent_b) = both_agents(
        &lab,
        &node_a,
        &node_b,
        tmp.path(),
        &format!("{NODES}{}", topology(true)),
        1,
    );
    let logs = || format!("{}\n{}", agent_a.log_text(), agent_b.log_text());
    for (pod, backend) in [(&pod_a, "backend-a"), (&pod_b, "backend-b")] {
        let replies = ask(pod, "10.96.0.64:80", 30).unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
        assert!(
            replies.iter().all(|(server, _)| server == backend),
            "the zone's own endpoint: {replies:?}"
        );
    }

    // Hints become incomplete: every endpoint for everyone, across the nodes too.
    std::fs::write(
        tmp.path().join("services.yaml"),
        format!("{NODES}{}", topology(false)),
    )
    .unwrap();
    for pod in [&pod_a, &pod_b] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let replies =
                ask(pod, "10.96.0.64:80", 30).unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
            let servers: BTreeSet<String> = replies.into_iter().map(|(s, _)| s).collect();
            if servers.len() == 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "fallback to every endpoint: {servers:?}\n{}",
                logs()
            );
        }
    }
}

const STICKY: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.65
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30098}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.65}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.2.2], nodeName: node-b}
";

#[test]
fn client_ip_affinity_keeps_each_client_on_its_backend_until_the_timeout() {
    let TwoNodes {
        lab,
        client,
        node_a,
        node_b,
        _servers,
        ..
    } = two_nodes();
    // Twenty external clients, each its own address, all entering at node-a.
    let clients: Vec<std::net::Ipv4Addr> = (10..30)
        .map(|i| std::net::Ipv4Addr::new(192, 168, 77, i))
        .collect();
    for addr in &clients {
        client.ip(&format!("addr add {addr}/24 dev eth-a")).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let (agent_a, _agent_b) = both_agents(
        &lab,
        &node_a,
        &node_b,
        tmp.path(),
        &format!("{NODES}{STICKY}"),
        1,
    );
    let target: SocketAddr = "203.0.113.65:80".parse().unwrap();
    let round = |per_client: usize| -> Vec<Vec<String>> {
        let clients = clients.clone();
        client
            .run(move || {
                clients
                    .iter()
                    .map(|&from| {
                        (0..per_client)
                            .map(|_| {
                                lb_tests::echo::tcp_request_from(
                                    from,
                                    target,
                                    Duration::from_secs(2),
                                )
                                .map(|r| r.server)
                            })
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_else(|e| panic!("{e:#}\n{}", agent_a.log_text()))
    };

    // Many connections per client: one backend each; across clients, both.
    let first = round(8);
    for (addr, servers) in clients.iter().zip(&first) {
        let distinct: BTreeSet<&String> = servers.iter().collect();
        assert_eq!(distinct.len(), 1, "{addr} keeps its backend: {servers:?}");
    }
    let used: BTreeSet<&String> = first.iter().map(|s| &s[0]).collect();
    assert_eq!(used.len(), 2, "different clients spread over both backends");

    // After the timeout (2 s) with no traffic, a client is balanced anew: with twenty
    // clients and two backends, some land elsewhere (all staying: one chance in a million).
    std::thread::sleep(Duration::from_millis(2600));
    let after = round(1);
    let moved = first
        .iter()
        .zip(&after)
        .filter(|(before, now)| before[0] != now[0])
        .count();
    assert!(moved > 0, "after the timeout clients may move: none did");
}

/// A Maglev Service over twelve endpoints: backend-a's and backend-b's own addresses and five
/// more each (the echo servers answer on every address of their namespace).
fn maglev_service(removed: Option<&str>) -> String {
    let endpoints: String = (1..=2)
        .flat_map(|node| {
            std::iter::once(format!("10.244.{node}.2"))
                .chain((10..15).map(move |i| format!("10.244.{node}.{i}")))
                .map(move |addr| (addr, if node == 1 { "node-a" } else { "node-b" }))
        })
        .filter(|(addr, _)| Some(addr.as_str()) != removed)
        .map(|(addr, node)| format!("\n- {{addresses: [{addr}], nodeName: {node}}}"))
        .collect();
    format!(
        "
---
apiVersion: v1
kind: Service
metadata:
  name: hashed
  namespace: default
  annotations: {{{}: maglev}}
spec:
  clusterIP: 10.96.0.66
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: hashed-1, namespace: default, labels: {{kubernetes.io/service-name: hashed}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:{endpoints}
",
        lb_agent::model::ANNOTATION_ALGORITHM
    )
}

#[test]
fn maglev_sends_a_flow_to_the_same_backend_and_a_removal_moves_only_that_backends_flows() {
    let TwoNodes {
        lab,
        node_a,
        node_b,
        pod_a,
        backend_a,
        backend_b,
        _servers,
        ..
    } = two_nodes();
    for (ns, node) in [(&backend_a, 1), (&backend_b, 2)] {
        for i in 10..15 {
            ns.ip(&format!("addr add 10.244.{node}.{i}/24 dev eth0"))
                .unwrap();
        }
    }
    pod_a.sysctl("net.ipv4.tcp_tw_reuse", "1").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (mut agent_a, _agent_b) = both_agents(
        &lab,
        &node_a,
        &node_b,
        tmp.path(),
        &format!("{NODES}{}", maglev_service(None)),
        1,
    );
    let pin_dir = agent_a.pin_dir.clone();
    let log = agent_a.log.clone();
    // Forty flows from pod-a, each a fixed source port: which endpoint each one reached, from
    // node-a's conntrack (the echo servers answer on every address with one name), read while
    // the connections are open (a closed one leaves no entry).
    let run_flows = || -> std::collections::BTreeMap<String, String> {
        let _open = pod_a
            .run(|| {
                (41000..41040)
                    .map(|port| {
                        let mut session = lb_tests::echo::tcp_session_from_port(
                            "10.244.3.2".parse()?,
                            port,
                            "10.96.0.66:80".parse()?,
                            Duration::from_secs(2),
                        )?;
                        session.request()?;
                        Ok(session)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{e:#}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let flows: serde_json::Value = serde_json::from_str(
            &lb_tests::agent::cli(
                &pin_dir,
                &["conntrack", "--service", "hashed", "-o", "json"],
            )
            .unwrap(),
        )
        .unwrap();
        flows
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["client"].as_str().unwrap().to_string(),
                    f["backend"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    // New connections on the same ports, not conntrack hits: the flows are forgotten first.
    let forget_flows = || {
        // tcp_tw_reuse takes a port out of TIME_WAIT once its last timestamp is from an
        // earlier second.
        std::thread::sleep(Duration::from_millis(1100));
        let mut conntrack = lb_agent::maps::open_conntrack(&pin_dir).unwrap();
        let keys: Vec<_> = conntrack.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = conntrack.remove(&key);
        }
    };
    let first = run_flows();
    assert_eq!(first.len(), 40, "{first:?}");
    // The services table shows each backend's share of the Maglev table.
    let table = lb_tests::agent::cli(&pin_dir, &["services"]).unwrap();
    let line = table
        .lines()
        .find(|l| l.contains("hashed"))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(line.matches("[maglev ").count(), 12, "{line}");
    let used: BTreeSet<&String> = first.values().collect();
    assert!(used.len() >= 6, "spread over the endpoints: {used:?}");
    forget_flows();
    assert_eq!(run_flows(), first, "the same flow, the same endpoint");

    // One endpoint leaves: its flows move; of the others, hardly any (Maglev moves well under
    // 1% of the table for twelve endpoints; three of ~37 here would be a failure).
    let removed = first
        .values()
        .next()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    std::fs::write(
        tmp.path().join("services.yaml"),
        format!("{NODES}{}", maglev_service(Some(&removed))),
    )
    .unwrap();
    agent_a
        .wait_until(Duration::from_secs(10), || {
            read_services(&pin_dir).is_ok_and(|s| s.iter().all(|s| s.backends.len() == 11))
        })
        .expect("removal programmed");
    forget_flows();
    let second = run_flows();
    let mut moved_others = 0;
    for (client, before) in &first {
        let after = &second[client];
        if before.starts_with(&format!("{removed}:")) {
            assert_ne!(after, before, "{client}: its endpoint left");
        } else if after != before {
            moved_others += 1;
        }
    }
    assert!(
        moved_others <= 2,
        "{moved_others} flows of staying endpoints moved"
    );
}
