//! Restarts without dropped flows: the links and maps are pinned, so the datapath forwards
//! while no agent runs (after SIGTERM or kill -9), and the next agent adopts it (atomic program
//! replacement, conntrack kept). `--cleanup` tears it down on purpose. A pinned state of
//! another layout version is rebuilt, never misread.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use lb_agent::maps::read_services;
use lb_common::Meta;
use lb_tests::{
    agent::{cli, Agent},
    echo::{start_backends, tcp_request, udp_ask, TcpSession},
    examples,
    lab::{NodeLab, TEST_PREFIX},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn start_agent(lab: &NodeLab, log: &str, tmp: &tempfile::TempDir) -> Agent {
    let pin_dir = lab.lab.pin_dir();
    let mut agent = Agent::start(
        &lab.node,
        &pin_dir,
        &examples(),
        &lab.node_interfaces(),
        &tmp.path().join(log),
    )
    .expect("agent");
    agent
        .wait_until(Duration::from_secs(20), || {
            agent_ready(&pin_dir)
                && std::fs::read_to_string(tmp.path().join(log))
                    .is_ok_and(|l| l.contains("datapath programmed"))
        })
        .expect("agent ready");
    agent
}

fn agent_ready(pin_dir: &std::path::Path) -> bool {
    read_services(pin_dir).is_ok_and(|s| s.iter().map(|s| s.backends.len()).sum::<usize>() == 6)
}

/// Programs attached on ingress of the node's client-facing interface.
fn programs_on_client_link(lab: &NodeLab) -> usize {
    lab.node
        .run(|| {
            Ok(SchedClassifier::query_tcx("lb-c0", TcAttachType::Ingress)?
                .1
                .len())
        })
        .expect("query tcx")
}

#[test]
fn flows_survive_agent_restarts_and_cleanup_removes_the_datapath() {
    let lab = NodeLab::new(TEST_PREFIX, 3).expect("lab");
    let _servers = start_backends(&lab, 8080).expect("echo servers");
    let tmp = tempfile::tempdir().unwrap();
    let pin_dir = lab.lab.pin_dir();
    let mut first = start_agent(&lab, "first.log", &tmp);
    assert_eq!(programs_on_client_link(&lab), 1);

    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let (mut session, udp) = lab
        .client
        .run(move || {
            let session = TcpSession::connect(vip, TIMEOUT)?;
            let udp = UdpSocket::bind("0.0.0.0:0")?;
            udp.connect(vip)?;
            udp.set_read_timeout(Some(TIMEOUT))?;
            Ok((session, udp))
        })
        .unwrap();
    let tcp_backend = session.request().unwrap().server;
    let udp_backend = udp_ask(&udp).unwrap();

    // kill -9: nothing runs, everything forwards.
    let pid = nix::unistd::Pid::from_raw(first.pid().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = first.stop(); // reaps it
    for _ in 0..5 {
        assert_eq!(
            session.request().unwrap().server,
            tcp_backend,
            "TCP goes on without an agent"
        );
        assert_eq!(
            udp_ask(&udp).unwrap(),
            udp_backend,
            "UDP goes on without an agent"
        );
    }

    // A new agent adopts the pinned links and maps: one program per interface, same flows.
    let mut second = start_agent(&lab, "second.log", &tmp);
    let log = second.log_text();
    assert_eq!(log.matches("how=Adopted").count(), 4, "{log}");
    assert_eq!(programs_on_client_link(&lab), 1, "replaced, not added");
    for _ in 0..5 {
        assert_eq!(
            session.request().unwrap().server,
            tcp_backend,
            "TCP never noticed"
        );
        assert_eq!(udp_ask(&udp).unwrap(), udp_backend, "UDP never noticed");
    }

    // SIGTERM: a clean exit, the datapath stays.
    let status = second.stop().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(session.request().unwrap().server, tcp_backend);

    // --cleanup removes everything: no program, no pins, the VIP is no longer translated.
    cli(&pin_dir, &["--cleanup"]).expect("cleanup");
    // Unpinning drops the link's last reference when bpffs frees the inode, after an RCU grace
    // period: the detach is near, not synchronous.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while programs_on_client_link(&lab) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(programs_on_client_link(&lab), 0);
    assert!(!pin_dir.exists(), "pins removed");
    let after = lab
        .client
        .run(move || Ok(tcp_request(vip, Duration::from_millis(500)).is_err()))
        .unwrap();
    assert!(after, "nothing answers the VIP after cleanup");
}

#[test]
fn pinned_state_of_another_layout_is_rebuilt_not_misread() {
    let lab = NodeLab::new(TEST_PREFIX, 3).expect("lab");
    let tmp = tempfile::tempdir().unwrap();
    let pin_dir = lab.lab.pin_dir();
    let first = start_agent(&lab, "first.log", &tmp);
    drop(first); // SIGTERM; the pins stay

    // Pretend an older agent made these maps.
    let data = MapData::from_pin(pin_dir.join("LB_META")).unwrap();
    let mut meta: Array<MapData, Meta> = Array::try_from(Map::Array(data)).unwrap();
    meta.set(0, Meta { layout_version: 1 }, 0).unwrap();
    drop(meta);

    let second = start_agent(&lab, "second.log", &tmp);
    let log = second.log_text();
    assert!(log.contains("another layout version"), "{log}");
    assert!(log.contains("found=Some(1)"), "{log}");
    let data = MapData::from_pin(pin_dir.join("LB_META")).unwrap();
    let meta: Array<MapData, Meta> = Array::try_from(Map::Array(data)).unwrap();
    assert_eq!(
        meta.get(&0, 0).unwrap().layout_version,
        lb_common::MAP_LAYOUT_VERSION
    );
}
