//! The datapath end to end in a lab: NodePort and LoadBalancer from an external client,
//! hairpin from a backend pod to its own Service, flows whose backend is removed while they
//! run (UDP moves to a live backend, TCP gets a reset), and one client port to two Services
//! of one endpoint.

use std::{
    collections::BTreeSet,
    fs,
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use lb_agent::maps::read_services;
use lb_tests::{
    agent::Agent,
    counter,
    echo::{
        start_backends, tcp_request, tcp_session_from_port, udp_ask, udp_request, EchoServer,
        Reply, TcpSession,
    },
    lab::{backend_addr, NodeLab, CLIENT_ADDR, TEST_PREFIX},
};

const TIMEOUT: Duration = Duration::from_secs(2);
const HAIRPIN_ADDR: &str = "169.254.42.1";

/// A LoadBalancer Service over the given backends (1-based lab indices), TCP and UDP.
fn manifest(backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|&i| format!("\n- addresses: [{}]", backend_addr(i)))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
  - {{name: echo, port: 80, targetPort: 8080, nodePort: 30080, protocol: UDP}}
status:
  loadBalancer: {{ingress: [{{ip: 203.0.113.10}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: echo, port: 8080, protocol: UDP}}]
endpoints:{endpoints}
"
    )
}

struct Setup {
    lab: NodeLab,
    _servers: Vec<EchoServer>,
    manifests: tempfile::TempDir,
    agent: Agent,
}

impl Setup {
    fn new() -> Self {
        let lab = NodeLab::new(TEST_PREFIX, 3).expect("lab");
        let servers = start_backends(&lab, 8080).expect("echo servers");
        let manifests = tempfile::tempdir().unwrap();
        fs::write(manifests.path().join("web.yaml"), manifest(&[1, 2, 3])).unwrap();
        let log = manifests.path().join("agent.log");
        let mut agent = Agent::start_with(
            &lab.node,
            &lab.lab.pin_dir(),
            manifests.path(),
            &lab.node_interfaces(),
            &log,
            &["--manifest-poll-interval", "100ms"],
        )
        .expect("agent");
        let pin_dir = lab.lab.pin_dir();
        agent
            .wait_until(Duration::from_secs(20), || backend_count(&pin_dir) == 6)
            .expect("agent programs the Service");
        Self {
            lab,
            _servers: servers,
            manifests,
            agent,
        }
    }

    /// Rewrites the manifest and waits until the agent has applied it.
    fn set_backends(&mut self, backends: &[usize]) {
        let path = self.manifests.path().join("web.yaml");
        fs::write(path, manifest(backends)).unwrap();
        let pin_dir = self.lab.lab.pin_dir();
        let wanted = backends.len() * 2;
        self.agent
            .wait_until(Duration::from_secs(10), || {
                backend_count(&pin_dir) == wanted
            })
            .expect("agent applies the change");
    }
}

fn backend_count(pin_dir: &Path) -> usize {
    read_services(pin_dir).map_or(0, |s| s.iter().map(|s| s.backends.len()).sum())
}

fn servers(replies: &[Reply]) -> BTreeSet<String> {
    replies.iter().map(|r| r.server.clone()).collect()
}

#[test]
fn node_port_and_load_balancer_serve_an_external_client() {
    let setup = Setup::new();
    let targets: Vec<SocketAddr> = [
        "192.168.77.1:30080", // NodePort on the address the client reaches
        "10.244.2.1:30080",   // NodePort on another address of the node
        "203.0.113.10:80",    // LoadBalancer ingress IP
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    for target in targets {
        let (tcp, udp) = setup
            .lab
            .client
            .run(move || {
                let mut tcp = Vec::new();
                let mut udp = Vec::new();
                for _ in 0..45 {
                    tcp.push(tcp_request(target, TIMEOUT)?);
                    udp.push(udp_request(target, TIMEOUT)?);
                }
                Ok((tcp, udp))
            })
            .unwrap_or_else(|e| panic!("{target}: {e:#}\n{}", setup.agent.log_text()));
        let all: BTreeSet<String> = (1..=3).map(|i| format!("backend-{i}")).collect();
        assert_eq!(servers(&tcp), all, "{target} TCP reaches every backend");
        assert_eq!(servers(&udp), all, "{target} UDP reaches every backend");
        for reply in tcp.iter().chain(&udp) {
            assert_eq!(
                reply.peer.ip().to_string(),
                CLIENT_ADDR,
                "client address kept"
            );
        }
    }
}

#[test]
fn a_pod_reaches_its_own_service_including_itself() {
    let setup = Setup::new();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let replies = setup.lab.backends[0]
        .run(move || {
            (0..60)
                .map(|_| tcp_request(vip, TIMEOUT))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", setup.agent.log_text()));
    assert_eq!(replies.len(), 60, "every request answered");
    let own: Vec<&Reply> = replies.iter().filter(|r| r.server == "backend-1").collect();
    assert!(
        !own.is_empty(),
        "the pod was picked for itself at least once in 60 tries"
    );
    for reply in &own {
        assert_eq!(
            reply.peer.ip().to_string(),
            HAIRPIN_ADDR,
            "hairpin flows are source-NATed"
        );
    }
    for reply in replies.iter().filter(|r| r.server != "backend-1") {
        assert_eq!(
            reply.peer.ip().to_string(),
            backend_addr(1),
            "others see the pod"
        );
    }
}

#[test]
fn a_udp_flow_moves_to_a_live_backend_when_its_backend_is_removed() {
    let mut setup = Setup::new();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let socket = setup
        .lab
        .client
        .run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(vip)?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(socket)
        })
        .unwrap();
    let ask = udp_ask;
    let first = ask(&socket).expect("first reply");
    for _ in 0..5 {
        assert_eq!(ask(&socket).unwrap(), first, "one flow, one backend");
    }
    let index: usize = first.trim_start_matches("backend-").parse().unwrap();
    let remaining: Vec<usize> = (1..=3).filter(|&i| i != index).collect();
    setup.set_backends(&remaining);

    // The same socket (same flow) keeps sending: every datagram is answered, by a live backend.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = Vec::new();
    while after.len() < 20 && Instant::now() < deadline {
        after.push(ask(&socket).expect("no datagram lost after the removal"));
    }
    assert_eq!(after.len(), 20);
    let moved_to: BTreeSet<&String> = after.iter().collect();
    assert_eq!(
        moved_to.len(),
        1,
        "the flow sticks to its new backend: {after:?}"
    );
    assert_ne!(after[0], first, "never the removed backend again");
}

#[test]
fn an_open_tcp_connection_is_reset_when_its_backend_is_removed() {
    let mut setup = Setup::new();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut session = setup
        .lab
        .client
        .run(move || TcpSession::connect(vip, TIMEOUT))
        .unwrap();
    let first = session.request().expect("first reply").server;
    let index: usize = first.trim_start_matches("backend-").parse().unwrap();
    let remaining: Vec<usize> = (1..=3).filter(|&i| i != index).collect();
    setup.set_backends(&remaining);

    let err = session.request().expect_err("the connection cannot go on");
    let io = err
        .chain()
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .unwrap_or_else(|| panic!("an I/O error, got {err:#}"));
    assert_eq!(io.kind(), ErrorKind::ConnectionReset, "{err:#}");

    // New connections go to the backends that are left.
    let replies = setup
        .lab
        .client
        .run(move || {
            (0..10)
                .map(|_| tcp_request(vip, TIMEOUT))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .unwrap();
    assert!(replies.iter().all(|r| r.server != first), "{replies:?}");
}

/// A second ClusterIP Service, `other`, whose one endpoint is backend 1.
const OTHER: &str = "apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-1
  namespace: default
  labels: {kubernetes.io/service-name: other}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.2]}]
";

#[test]
fn one_client_port_to_two_services_of_one_endpoint_makes_two_connections() {
    let mut setup = Setup::new();
    assert_eq!(backend_addr(1), "10.244.1.2");
    setup.set_backends(&[1]);
    fs::write(setup.manifests.path().join("other.yaml"), OTHER).unwrap();
    let pin_dir = setup.lab.lab.pin_dir();
    setup
        .agent
        .wait_until(Duration::from_secs(10), || backend_count(&pin_dir) == 3)
        .expect("agent programs the second Service");

    // The kernel keeps 4-tuples unique, so one port may go to two ClusterIPs at once; both
    // are translated to the same endpoint, where they must still be two connections.
    let client: std::net::Ipv4Addr = CLIENT_ADDR.parse().unwrap();
    let replies = setup
        .lab
        .client
        .run(move || {
            let web: SocketAddr = "10.96.0.10:80".parse()?;
            let other: SocketAddr = "10.96.0.20:80".parse()?;
            let mut a = tcp_session_from_port(client, 45000, web, TIMEOUT)?;
            let mut b = tcp_session_from_port(client, 45000, other, TIMEOUT)?;
            let mut replies = Vec::new();
            for _ in 0..3 {
                replies.push((a.request()?, b.request()?));
            }
            anyhow::ensure!(a.peer()? == web && b.peer()? == other, "peers changed");
            anyhow::ensure!(a.local.port() == 45000 && b.local.port() == 45000);
            Ok(replies)
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", setup.agent.log_text()));
    for (a, b) in &replies {
        assert_eq!(
            (a.server.as_str(), b.server.as_str()),
            ("backend-1", "backend-1")
        );
        assert_eq!(
            a.peer.ip(),
            b.peer.ip(),
            "the client's address kept for both"
        );
        assert_eq!(a.peer.port(), 45000, "the first keeps its port");
        assert_ne!(
            b.peer.port(),
            45000,
            "the second is another connection there"
        );
    }
    assert_eq!(counter(&pin_dir, "reply_tuple_clash"), 1);
}
