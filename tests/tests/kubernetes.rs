//! The agent against a fake Kubernetes API server speaking the real list/watch protocol to the
//! real kube-rs client: initial list, watch events, dropped watches, `410 Gone` and relist,
//! bookmarks, a minute-long outage, changes while no agent runs. The agent drives real maps and
//! real traffic flows meanwhile.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use lb_agent::maps::read_services;
use lb_tests::{
    agent::Agent,
    echo::{start_backends, tcp_request},
    fake_api::{FakeApi, Kind},
    lab::{backend_addr, NodeLab, TEST_PREFIX},
};

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}
";

fn slice(backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|&i| format!("\n- {{addresses: [{}], nodeName: node-a}}", backend_addr(i)))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:{endpoints}
"
    )
}

/// How long the API server is away in the outage step (the issue asks for a minute).
const OUTAGE: Duration = Duration::from_secs(60);

/// A second Service, deleted in the API during the outage.
const GONE: &str = "apiVersion: v1
kind: Service
metadata: {name: gone, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: gone-1, namespace: default, labels: {kubernetes.io/service-name: gone}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.2], nodeName: node-a}
";

fn service_names(pin_dir: &Path) -> BTreeSet<String> {
    read_services(pin_dir)
        .map(|s| s.into_iter().map(|s| s.name).collect())
        .unwrap_or_default()
}

fn programmed(pin_dir: &Path) -> BTreeSet<Ipv4Addr> {
    read_services(pin_dir)
        .map(|s| {
            s.iter()
                .flat_map(|s| s.backends.iter().map(|b| b.addr))
                .collect()
        })
        .unwrap_or_default()
}

fn lab_backends(indices: &[usize]) -> BTreeSet<Ipv4Addr> {
    indices
        .iter()
        .map(|&i| backend_addr(i).parse().unwrap())
        .collect()
}

fn programming_lines(agent: &Agent) -> usize {
    agent.log_text().matches("datapath programmed").count()
}

#[test]
fn agent_follows_the_api_through_watch_drops_gone_relists_bookmarks_and_an_outage() {
    let lab = NodeLab::new(TEST_PREFIX, 3).expect("lab");
    let _servers = start_backends(&lab, 8080).expect("echo servers");
    let api = FakeApi::start(&lab.node).expect("fake API server");
    api.apply_yaml(SERVICE).unwrap();
    api.apply_yaml(&slice(&[1, 2])).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let pin_dir = lab.lab.pin_dir();
    let kubeconfig_arg = kubeconfig.to_string_lossy().to_string();
    let start = |log: &Path| {
        Agent::start_run(
            &lab.node,
            &pin_dir,
            &lab.node_interfaces(),
            log,
            &[
                "--kubeconfig",
                &kubeconfig_arg,
                "--node-name",
                "node-a",
                "--min-sync-period",
                "100ms",
                "--sync-period",
                "10m",
            ],
        )
        .expect("agent")
    };
    let mut agent = start(&tmp.path().join("agent.log"));
    let wait_for = |agent: &mut Agent, want: &[usize], what: &str| {
        let want = lab_backends(want);
        agent
            .wait_until(Duration::from_secs(20), || programmed(&pin_dir) == want)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    };

    // 1. Initial list.
    wait_for(&mut agent, &[1, 2], "initial list programmed");
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let traffic = |lab: &NodeLab| {
        lab.client
            .run(move || {
                (0..20)
                    .map(|_| tcp_request(vip, Duration::from_secs(2)))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .expect("traffic")
    };
    let servers: BTreeSet<String> = traffic(&lab).into_iter().map(|r| r.server).collect();
    assert!(
        servers.is_subset(&["backend-1".into(), "backend-2".into()].into()),
        "{servers:?}"
    );

    // 2. A watch event, applied as a delta: one endpoint more is a backend, a slot and the
    //    service's count, as the map-operations metric tells.
    let map_operations = || {
        let (_, metrics) =
            lb_tests::echo::http_get_path(&lab.node, "127.0.0.1:10249", "/metrics").unwrap();
        metrics
            .lines()
            .filter(|l| l.starts_with("lb_map_operations_total{"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = map_operations();
    api.apply_yaml(&slice(&[1, 2, 3])).unwrap();
    wait_for(&mut agent, &[1, 2, 3], "watch event applied");
    let operations = map_operations() - before;
    assert_eq!(operations, 3.0, "backend, slot, count");

    // 3. The watch is dropped; the client resumes from its resource version and sees the next
    //    change.
    let (_, watches_before) = api.requests();
    api.drop_watches();
    api.apply_yaml(&slice(&[2, 3])).unwrap();
    wait_for(&mut agent, &[2, 3], "change after a dropped watch");
    assert!(
        api.requests().1 > watches_before,
        "the watches were reopened"
    );

    // 4. Bookmarks (every 500 ms) change nothing: no programming while only they arrive.
    let lines = programming_lines(&agent);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        programming_lines(&agent),
        lines,
        "bookmarks are not changes"
    );

    // 5. History expires: resuming gets 410 Gone and the client relists. The relist neither
    //    flushes nor loses state: the maps never go empty meanwhile, and the next change lands.
    let (lists_before, _) = api.requests();
    api.expire_history();
    api.drop_watches();
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.requests().0 == lists_before && Instant::now() < deadline {
        assert_eq!(
            programmed(&pin_dir),
            lab_backends(&[2, 3]),
            "state kept while relisting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(api.requests().0 > lists_before, "410 Gone led to a relist");
    assert_eq!(
        programmed(&pin_dir),
        lab_backends(&[2, 3]),
        "state kept after the relist"
    );
    api.apply_yaml(&slice(&[1, 2, 3])).unwrap();
    wait_for(&mut agent, &[1, 2, 3], "change after the relist");

    // 6. An outage of a minute: the API server is gone; forwarding goes on and nothing is
    //    deleted, not even what is deleted in the API meanwhile, until a fresh list (after
    //    `410 Gone`: the history expired in between) proves it gone; then the agent catches up.
    api.apply_yaml(GONE).unwrap();
    agent
        .wait_until(Duration::from_secs(20), || {
            service_names(&pin_dir).contains("default/gone:http/TCP")
        })
        .expect("second Service programmed");
    let (lists_before, _) = api.requests();
    api.set_down(true);
    api.delete(Kind::Service, "default", "gone");
    api.delete(Kind::EndpointSlice, "default", "gone-1");
    api.apply_yaml(&slice(&[3])).unwrap(); // a change made while the agent cannot see it
    api.expire_history();
    let outage_end = Instant::now() + OUTAGE;
    while Instant::now() < outage_end {
        assert_eq!(
            programmed(&pin_dir),
            lab_backends(&[1, 2, 3]),
            "nothing changed in the outage"
        );
        assert!(
            service_names(&pin_dir).contains("default/gone:http/TCP"),
            "nothing deleted in the outage"
        );
        assert_eq!(traffic(&lab).len(), 20, "traffic flows in the outage");
        std::thread::sleep(Duration::from_millis(500));
    }
    api.set_down(false);
    let back = Instant::now();
    // The watches back off while the server is down and again on `410 Gone` (up to 10 s
    // between attempts, with jitter: see `kubernetes::backoff`).
    agent
        .wait_until(Duration::from_secs(120), || {
            programmed(&pin_dir) == lab_backends(&[3])
                && !service_names(&pin_dir).contains("default/gone:http/TCP")
        })
        .expect("caught up after the outage: the change applied, the deleted Service gone");
    eprintln!(
        "caught up {:?} after the API server returned",
        back.elapsed()
    );
    assert!(api.requests().0 > lists_before, "relisted after 410 Gone");
    assert_eq!(traffic(&lab).len(), 20, "traffic flows after the outage");

    let log = agent.log_text();
    assert!(
        log.contains("watch failed"),
        "the outage and the 410 were seen:\n{log}"
    );
    // ... and counted, per resource, in the metrics.
    let (status, metrics) =
        lb_tests::echo::http_get_path(&lab.node, "127.0.0.1:10249", "/metrics").unwrap();
    assert_eq!(status, 200);
    for resource in ["services", "endpointslices", "nodes"] {
        let restarts: f64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "lb_watch_restarts_total{{resource=\"{resource}\"}} "
                ))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no restarts of {resource} in:\n{metrics}"));
        assert!(restarts >= 1.0, "{resource} watch restarted in the outage");
    }
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "{status}\n{}", agent.log_text());

    // 7. Changes while no agent runs: the next agent's first sync (from the maps it adopted
    //    at start, read once) deletes the Service gone from the API, writes the new endpoints
    //    and leaves traffic flowing.
    api.apply_yaml(GONE).unwrap();
    let mut agent = start(&tmp.path().join("agent-2.log"));
    agent
        .wait_until(Duration::from_secs(20), || {
            service_names(&pin_dir).contains("default/gone:http/TCP")
        })
        .expect("second Service programmed again");
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "{status}\n{}", agent.log_text());
    api.delete(Kind::Service, "default", "gone");
    api.delete(Kind::EndpointSlice, "default", "gone-1");
    api.apply_yaml(&slice(&[1, 3])).unwrap();
    assert!(
        service_names(&pin_dir).contains("default/gone:http/TCP"),
        "the stopped agent left its datapath in place"
    );
    let mut agent = start(&tmp.path().join("agent-3.log"));
    agent
        .wait_until(Duration::from_secs(20), || {
            programmed(&pin_dir) == lab_backends(&[1, 3])
                && !service_names(&pin_dir).contains("default/gone:http/TCP")
        })
        .expect("the restarted agent caught up");
    assert_eq!(
        programming_lines(&agent),
        1,
        "caught up in its first sync:\n{}",
        agent.log_text()
    );
    assert_eq!(traffic(&lab).len(), 20, "traffic flows after the restart");
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "{status}\n{}", agent.log_text());
}
