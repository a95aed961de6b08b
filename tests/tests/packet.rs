//! Packet-in / packet-out tests of `lb_ingress` through BPF_PROG_TEST_RUN, with the maps
//! programmed by the agent's own applier. Expected packets are built from scratch (with their
//! own checksums) and compared byte for byte.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use lb_agent::model::{DesiredState, Protocol};
use lb_tests::{
    cluster_ip_service,
    packet::{parse_checked, Flow, Harness, PROTO_UDP, TCP_ACK, TCP_SYN, TC_ACT_OK, TC_ACT_UNSPEC},
};

const VIP: &str = "10.96.0.10";
const CLIENT: &str = "192.168.77.2";
const BACKENDS: [&str; 3] = ["10.244.1.2", "10.244.2.2", "10.244.3.2"];

fn demo_state(backends: &[&str]) -> DesiredState {
    DesiredState {
        services: BTreeMap::from([
            (
                "default/demo:http/TCP".to_string(),
                cluster_ip_service(VIP, 80, 8080, Protocol::Tcp, backends),
            ),
            (
                "default/demo:udp/UDP".to_string(),
                cluster_ip_service(VIP, 80, 8080, Protocol::Udp, backends),
            ),
        ]),
        ..Default::default()
    }
}

fn harness(backends: &[&str]) -> Harness {
    let mut h = Harness::new().expect("load the program (run as root)");
    h.program(&demo_state(backends)).expect("program the maps");
    h
}

/// Sends `flow` and expects it DNATed to one of the backends; returns that backend.
fn expect_dnat(h: &mut Harness, flow: &Flow) -> Ipv4Addr {
    let verdict = h.run(&flow.build()).expect("test run");
    assert_eq!(verdict.action, TC_ACT_OK, "a frontend packet is translated");
    let out = parse_checked(&verdict.packet).expect("output parses with valid checksums");
    assert!(
        BACKENDS.contains(&out.dst.to_string().as_str()),
        "destination {} is a backend",
        out.dst
    );
    let expected = Flow {
        dst: out.dst,
        dport: 8080,
        ..flow.clone()
    };
    assert_eq!(out, expected, "only destination address and port change");
    assert_eq!(
        verdict.packet,
        expected.build(),
        "byte for byte, checksums included"
    );
    out.dst
}

#[test]
fn tcp_syn_to_the_vip_is_dnated_and_the_reply_gets_the_vip_back() {
    let mut h = harness(&BACKENDS);
    let syn = Flow::tcp(CLIENT, 40000, VIP, 80, TCP_SYN);
    let backend = expect_dnat(&mut h, &syn);

    // Later packets of the flow keep their backend.
    let ack = Flow {
        tcp_flags: TCP_ACK,
        ..syn.clone()
    };
    for _ in 0..20 {
        assert_eq!(expect_dnat(&mut h, &ack), backend);
    }

    // The backend's reply is reverse-NATed to come from the VIP.
    let reply = Flow::tcp(&backend.to_string(), 8080, CLIENT, 40000, TCP_SYN | TCP_ACK);
    let verdict = h.run(&reply.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let expected = Flow {
        src: VIP.parse().unwrap(),
        sport: 80,
        ..reply.clone()
    };
    assert_eq!(parse_checked(&verdict.packet).unwrap(), expected);
    assert_eq!(verdict.packet, expected.build());
}

#[test]
fn udp_datagram_to_the_vip_is_dnated_and_the_reply_gets_the_vip_back() {
    let mut h = harness(&BACKENDS);
    let datagram = Flow::udp(CLIENT, 5353, VIP, 80);
    let backend = expect_dnat(&mut h, &datagram);
    assert_eq!(
        expect_dnat(&mut h, &datagram),
        backend,
        "same flow, same backend"
    );

    let reply = Flow::udp(&backend.to_string(), 8080, CLIENT, 5353);
    let verdict = h.run(&reply.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let expected = Flow {
        src: VIP.parse().unwrap(),
        sport: 80,
        ..reply
    };
    assert_eq!(verdict.packet, expected.build());
}

#[test]
fn udp_without_checksum_stays_without_checksum() {
    let mut h = harness(&BACKENDS);
    let mut frame = Flow::udp(CLIENT, 6000, VIP, 80).build();
    let csum_off = 14 + 20 + 6;
    frame[csum_off..csum_off + 2].copy_from_slice(&[0, 0]);
    let verdict = h.run(&frame).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    assert_eq!(&verdict.packet[csum_off..csum_off + 2], &[0, 0]);
    let out = parse_checked(&verdict.packet).expect("IPv4 checksum still valid");
    assert_eq!((out.proto, out.dport), (PROTO_UDP, 8080));
}

#[test]
fn packets_that_are_not_for_a_frontend_pass_untouched() {
    let mut h = harness(&BACKENDS);
    let cases = [
        Flow::tcp(CLIENT, 40000, "10.96.0.11", 80, TCP_SYN), // another address
        Flow::tcp(CLIENT, 40000, VIP, 81, TCP_SYN),          // another port
        Flow::tcp(CLIENT, 40000, BACKENDS[0], 8080, TCP_SYN), // straight to a backend
        Flow::udp(CLIENT, 40000, VIP, 8080),
    ];
    for flow in cases {
        let frame = flow.build();
        let verdict = h.run(&frame).unwrap();
        assert_eq!(verdict.action, TC_ACT_UNSPEC, "{flow:?} is not ours");
        assert_eq!(verdict.packet, frame, "{flow:?} is not modified");
    }
    // Not IPv4 at all: an ARP request.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    let verdict = h.run(&arp).unwrap();
    assert_eq!((verdict.action, verdict.packet), (TC_ACT_UNSPEC, arp));
}

#[test]
fn new_flows_spread_over_every_backend() {
    let mut h = harness(&BACKENDS);
    let mut seen = BTreeSet::new();
    for port in 0..90 {
        seen.insert(expect_dnat(
            &mut h,
            &Flow::tcp(CLIENT, 30000 + port, VIP, 80, TCP_SYN),
        ));
    }
    assert_eq!(
        seen.len(),
        3,
        "all three backends chosen over 90 flows: {seen:?}"
    );
}

#[test]
fn a_flow_whose_backend_is_removed_moves_to_a_live_one() {
    let mut h = harness(&BACKENDS);
    let flow = Flow::udp(CLIENT, 7000, VIP, 80);
    let first = expect_dnat(&mut h, &flow);
    let remaining: Vec<&str> = BACKENDS
        .iter()
        .copied()
        .filter(|b| *b != first.to_string())
        .collect();
    h.program(&demo_state(&remaining)).unwrap();
    let second = expect_dnat(&mut h, &flow);
    assert_ne!(second, first, "never sent to the removed backend");
    assert!(remaining.contains(&second.to_string().as_str()));
}

#[test]
fn a_service_entry_counting_past_its_run_never_takes_the_next_services_backends() {
    // A reader can hold an entry older than the slots it reads (the agent moved or shrank
    // the run meanwhile); slots name their owner, so it never strays into a neighbour's run.
    let mut state = demo_state(&BACKENDS);
    state.services.insert(
        "default/next:http/TCP".to_string(),
        cluster_ip_service(
            "10.96.0.11",
            80,
            8080,
            Protocol::Tcp,
            &["10.244.9.1", "10.244.9.2", "10.244.9.3", "10.244.9.4"],
        ),
    );
    let mut h = Harness::new().unwrap();
    h.program(&state).unwrap();
    let id = lb_agent::maps::read_services(&h.pin_dir)
        .unwrap()
        .into_iter()
        .find(|s| s.name == "default/demo:http/TCP")
        .unwrap()
        .id;
    let mut services = h.array::<lb_common::ServiceValue>(lb_common::map_names::SERVICES);
    let mut value = services.get(&id, 0).unwrap();
    value.backend_count = 64;
    services.set(id, value, 0).unwrap();
    // Every flow still lands on one of demo's own three (expect_dnat checks).
    for port in 0..120 {
        expect_dnat(&mut h, &Flow::tcp(CLIENT, 20000 + port, VIP, 80, TCP_SYN));
    }
}
