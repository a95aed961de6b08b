//! Socket-level load balancing end to end: the real agent attaches its cgroup programs to a
//! cgroup of the test's own, and real TCP connections from a client thread in that cgroup
//! reach the Service's backends without any packet being translated, while `getpeername`
//! still shows the ClusterIP. Clients outside the cgroup, UDP, and an agent restarted without
//! the flag all go through the tc path.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use lb_agent::maps::read_services;
use lb_tests::{
    agent::Agent,
    cgroup::ThreadCgroup,
    counter,
    echo::{start_backends, udp_request, EchoServer, TcpSession},
    examples_with,
    lab::{bpftool_json, NodeLab, CLIENT_ADDR, TEST_PREFIX},
};

const VIP: &str = "10.96.0.10:80";
const TIMEOUT: Duration = Duration::from_secs(2);
const CONNECTIONS: usize = 60;

/// The examples, plus a Service with session affinity (left to the tc path) and one without
/// endpoints (refused at connect()).
const EXTRA: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sticky-1
  namespace: default
  labels: {kubernetes.io/service-name: sticky}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - addresses: ["10.244.1.2"]
    conditions: {ready: true}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.40
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
"#;

/// The attach types of the programs on `cgroup`, as bpftool lists them, sorted.
fn attached(cgroup: &Path) -> Vec<String> {
    let list = bpftool_json(["cgroup".as_ref(), "show".as_ref(), cgroup.as_os_str()])
        .expect("bpftool cgroup show");
    // Nothing at all when nothing is attached.
    if list.is_null() {
        return Vec::new();
    }
    let mut types: Vec<String> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["attach_type"].as_str().unwrap_or_default().to_string())
        .collect();
    types.sort();
    types
}

/// A lab with echo servers on its backends, a cgroup of the test's own and the examples plus
/// `EXTRA`. Fields drop in order: the servers before their lab.
struct Bed {
    _servers: Vec<EchoServer>,
    lab: NodeLab,
    cgroup: Arc<ThreadCgroup>,
    tmp: tempfile::TempDir,
    manifests: PathBuf,
}

impl Bed {
    fn new(name: &str) -> Self {
        let lab = NodeLab::new(TEST_PREFIX, 3).expect("lab");
        let servers = start_backends(&lab, 8080).expect("echo servers");
        let cgroup =
            Arc::new(ThreadCgroup::new(&format!("{}-{name}", lab.lab.id)).expect("test cgroup"));
        let tmp = tempfile::tempdir().unwrap();
        let manifests = examples_with(tmp.path(), "extra.yaml", EXTRA);
        Self {
            _servers: servers,
            lab,
            cgroup,
            tmp,
            manifests,
        }
    }

    fn cgroup_flag(&self) -> String {
        self.cgroup.path().to_string_lossy().to_string()
    }

    /// Starts the agent on the lab's node, logging to `log` in the test's directory, and
    /// waits until it has programmed the examples.
    fn start(&self, log: &str, extra: &[&str]) -> Agent {
        let pin_dir = self.lab.lab.pin_dir();
        let log = self.tmp.path().join(log);
        let mut agent = Agent::start_with(
            &self.lab.node,
            &pin_dir,
            &self.manifests,
            &self.lab.node_interfaces(),
            &log,
            extra,
        )
        .expect("start agent");
        // Its own log line, not the maps: after a restart they are full from the start.
        agent
            .wait_until(Duration::from_secs(20), || {
                std::fs::read_to_string(&log).is_ok_and(|l| l.contains("datapath programmed"))
                    && read_services(&pin_dir)
                        .is_ok_and(|s| s.iter().map(|s| s.backends.len()).sum::<usize>() == 7)
            })
            .expect("agent programs the example services");
        agent
    }
}

/// What `CONNECTIONS` TCP connections to the VIP saw, made from a thread of the client
/// namespace, inside `cgroup` when given: (backends that answered, peer addresses the
/// connections reported, client addresses the servers saw).
struct Seen {
    servers: BTreeSet<String>,
    peers: BTreeSet<SocketAddr>,
    clients: BTreeSet<String>,
}

fn connect_many(lab: &NodeLab, cgroup: Option<Arc<ThreadCgroup>>) -> Seen {
    let vip: SocketAddr = VIP.parse().unwrap();
    lab.client
        .run(move || {
            if let Some(cgroup) = &cgroup {
                cgroup.enter_current_thread()?;
            }
            let mut seen = Seen {
                servers: BTreeSet::new(),
                peers: BTreeSet::new(),
                clients: BTreeSet::new(),
            };
            for _ in 0..CONNECTIONS {
                let mut session = TcpSession::connect(vip, TIMEOUT)?;
                seen.peers.insert(session.peer()?);
                let reply = session.request()?;
                seen.servers.insert(reply.server);
                seen.clients.insert(reply.peer.ip().to_string());
            }
            Ok(seen)
        })
        .expect("TCP connections to the VIP")
}

#[test]
fn connections_from_the_cgroup_go_straight_to_backends_and_others_through_tc() {
    let bed = Bed::new("socket-lb");
    let (lab, cgroup, cgroup_flag) = (&bed.lab, &bed.cgroup, bed.cgroup_flag());
    let pin_dir = lab.lab.pin_dir();
    let start = |log: &str, extra: &[&str]| bed.start(log, extra);
    let mut agent = start("agent.log", &["--socket-lb-cgroup", &cgroup_flag]);
    let vip: SocketAddr = VIP.parse().unwrap();
    let ready: BTreeSet<String> = ["backend-1", "backend-2", "backend-3"]
        .map(String::from)
        .into();

    // Inside the cgroup: balanced at connect(), not one packet translated by the tc program.
    let new_flows = counter(&pin_dir, "new_flow");
    let forwarded = counter(&pin_dir, "forward");
    let seen = connect_many(lab, Some(cgroup.clone()));
    assert_eq!(seen.servers, ready, "every ready backend answers");
    assert_eq!(
        seen.peers,
        BTreeSet::from([vip]),
        "getpeername shows the ClusterIP"
    );
    assert_eq!(seen.clients, BTreeSet::from([CLIENT_ADDR.to_string()]));
    assert_eq!(
        counter(&pin_dir, "socket_connect"),
        CONNECTIONS as u64,
        "each connection balanced by the socket hook"
    );
    assert_eq!(counter(&pin_dir, "new_flow"), new_flows, "no tc new flow");
    assert_eq!(counter(&pin_dir, "forward"), forwarded, "no tc translation");

    // UDP from the cgroup is left to the tc path (its replies must come from the VIP).
    let udp = {
        let cgroup = cgroup.clone();
        lab.client
            .run(move || {
                cgroup.enter_current_thread()?;
                udp_request(vip, TIMEOUT)
            })
            .expect("UDP through the VIP")
    };
    assert!(
        ready.contains(&udp.server),
        "UDP answered by {}",
        udp.server
    );
    assert_eq!(
        counter(&pin_dir, "new_flow"),
        new_flows + 1,
        "UDP balanced by tc"
    );
    assert_eq!(counter(&pin_dir, "socket_connect"), CONNECTIONS as u64);

    // Outside the cgroup: the tc path, as before.
    let seen = connect_many(lab, None);
    assert_eq!(seen.servers, ready);
    assert_eq!(seen.peers, BTreeSet::from([vip]));
    assert_eq!(
        counter(&pin_dir, "new_flow"),
        new_flows + 1 + CONNECTIONS as u64,
        "clients outside the cgroup balanced per packet"
    );
    assert_eq!(counter(&pin_dir, "socket_connect"), CONNECTIONS as u64);

    // A Service with session affinity is balanced by the tc path (it picks by client address).
    let socket_connects = counter(&pin_dir, "socket_connect");
    let new_flows = counter(&pin_dir, "new_flow");
    let sticky = {
        let cgroup = cgroup.clone();
        lab.client
            .run(move || {
                cgroup.enter_current_thread()?;
                let mut session = TcpSession::connect("10.96.0.30:80".parse()?, TIMEOUT)?;
                Ok((session.peer()?, session.request()?.server))
            })
            .expect("connection to the affinity Service")
    };
    assert_eq!(
        sticky,
        ("10.96.0.30:80".parse().unwrap(), "backend-1".to_string())
    );
    assert_eq!(counter(&pin_dir, "socket_connect"), socket_connects);
    assert_eq!(counter(&pin_dir, "new_flow"), new_flows + 1);

    // The node's own processes (host network) reach a ClusterIP through the hook: tc on
    // ingress never sees their packets. A Service without endpoints refuses them at once.
    let rejected = counter(&pin_dir, "reject_no_backend");
    let (peer, server, refused) = {
        let cgroup = cgroup.clone();
        lab.node
            .run(move || {
                cgroup.enter_current_thread()?;
                let mut session = TcpSession::connect(vip, TIMEOUT)?;
                let peer = session.peer()?;
                let server = session.request()?.server;
                let refused =
                    std::net::TcpStream::connect_timeout(&"10.96.0.40:80".parse()?, TIMEOUT)
                        .err()
                        .map(|e| e.kind());
                Ok((peer, server, refused))
            })
            .expect("host-network connections")
    };
    assert_eq!(peer, vip);
    assert!(ready.contains(&server), "answered by {server}");
    assert_eq!(counter(&pin_dir, "socket_connect"), socket_connects + 1);
    assert_eq!(refused, Some(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(counter(&pin_dir, "reject_no_backend"), rejected + 1);

    // A restart with the flag replaces the programs (the cgroup is never without them); one
    // without it detaches them.
    agent.stop().expect("stop agent");
    let mut agent = start("agent-2.log", &["--socket-lb-cgroup", &cgroup_flag]);
    let before = counter(&pin_dir, "socket_connect");
    let seen = connect_many(lab, Some(cgroup.clone()));
    assert_eq!(seen.servers, ready);
    assert_eq!(
        counter(&pin_dir, "socket_connect"),
        before + CONNECTIONS as u64,
        "balanced by the socket hook after a restart"
    );
    assert_eq!(
        attached(cgroup.path()),
        [
            "cgroup_inet4_connect",
            "cgroup_inet4_getpeername",
            "cgroup_inet_sock_release"
        ],
        "the old agent's programs detached, the new ones attached"
    );
    agent.stop().expect("stop agent");
    let mut agent = start("agent-3.log", &[]);
    // The kernel lets go of an unpinned link after a grace period.
    agent
        .wait_until(Duration::from_secs(10), || {
            attached(cgroup.path()).is_empty()
        })
        .expect("socket programs detached");
    let new_flows = counter(&pin_dir, "new_flow");
    let seen = connect_many(lab, Some(cgroup.clone()));
    assert_eq!(seen.servers, ready);
    assert_eq!(
        counter(&pin_dir, "socket_connect"),
        before + CONNECTIONS as u64,
        "detached"
    );
    assert_eq!(
        counter(&pin_dir, "new_flow"),
        new_flows + CONNECTIONS as u64
    );
}

/// Entries of the pinned `LB_SOCK_REVNAT` (the notes `getpeername` reads), through bpftool.
fn socket_notes(pin_dir: &Path) -> usize {
    let path = pin_dir.join(lb_common::map_names::SOCK_REVNAT);
    bpftool_json([
        "map".as_ref(),
        "dump".as_ref(),
        "pinned".as_ref(),
        path.as_os_str(),
    ])
    .expect("bpftool map dump")
    .as_array()
    .expect("a list")
    .len()
}

/// `max_entries` of the pinned `LB_SOCK_REVNAT`, through bpftool.
fn socket_notes_capacity(pin_dir: &Path) -> u64 {
    let path = pin_dir.join(lb_common::map_names::SOCK_REVNAT);
    let map = bpftool_json([
        "map".as_ref(),
        "show".as_ref(),
        "pinned".as_ref(),
        path.as_os_str(),
    ])
    .expect("bpftool map show");
    map["max_entries"].as_u64().expect("max_entries")
}

/// The notes `getpeername` reads live as long as their sockets: each open connection has one
/// (kept across an agent restart), a closed one none (the release hook deletes it). The map's
/// size follows `--socket-lb-notes-max`, and is one entry without socket LB.
#[test]
fn socket_notes_go_with_their_sockets() {
    const OPEN: usize = 7;
    let bed = Bed::new("socket-notes");
    let (lab, cgroup, cgroup_flag) = (&bed.lab, &bed.cgroup, bed.cgroup_flag());
    let pin_dir = lab.lab.pin_dir();
    let start = |log: &str, extra: &[&str]| bed.start(log, extra);
    let with_notes = |max: &'static str| {
        [
            "--socket-lb-cgroup",
            &cgroup_flag,
            "--socket-lb-notes-max",
            max,
        ]
    };
    let mut agent = start("agent.log", &with_notes("512"));
    assert_eq!(socket_notes_capacity(&pin_dir), 512);
    let vip: SocketAddr = VIP.parse().unwrap();

    // One connection after another: each note goes when its socket closes.
    let seen = connect_many(lab, Some(cgroup.clone()));
    assert_eq!(seen.peers, BTreeSet::from([vip]));
    assert_eq!(socket_notes(&pin_dir), 0, "closed sockets leave no note");

    // Several open at once, kept open across a restart of the agent.
    let mut sessions = {
        let cgroup = cgroup.clone();
        lab.client
            .run(move || {
                cgroup.enter_current_thread()?;
                (0..OPEN)
                    .map(|_| TcpSession::connect(vip, TIMEOUT))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .expect("connections held open")
    };
    assert_eq!(socket_notes(&pin_dir), OPEN, "one note per open socket");
    agent.stop().expect("stop agent");
    let mut agent = start("agent-2.log", &with_notes("512"));
    for session in &mut sessions {
        assert_eq!(session.peer().expect("getpeername"), vip, "after a restart");
        session.request().expect("request after a restart");
    }
    assert_eq!(socket_notes(&pin_dir), OPEN);
    drop(sessions);
    assert_eq!(socket_notes(&pin_dir), 0, "every note gone with its socket");
    assert_eq!(
        counter(&pin_dir, "socket_connect"),
        (CONNECTIONS + OPEN) as u64
    );

    // Another size makes another map; without socket LB it is one entry.
    agent.stop().expect("stop agent");
    let mut agent = start("agent-3.log", &with_notes("1024"));
    assert_eq!(socket_notes_capacity(&pin_dir), 1024);
    let seen = connect_many(lab, Some(cgroup.clone()));
    assert_eq!(seen.peers, BTreeSet::from([vip]));
    agent.stop().expect("stop agent");
    let mut agent = start("agent-4.log", &[]);
    assert_eq!(socket_notes_capacity(&pin_dir), 1);
    agent.stop().expect("stop agent");
}
