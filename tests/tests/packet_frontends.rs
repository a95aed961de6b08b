//! Every frontend kind, source ranges, rejection, hairpin, conntrack lifetimes and counters,
//! through BPF_PROG_TEST_RUN with maps programmed from manifests by the agent's own model and
//! applier. Expected packets are built from scratch and compared byte for byte.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use lb_agent::{
    loader::DatapathSettings,
    manifest::{parse_into, Manifests},
    maps::{collect_conntrack_garbage, monotonic_ns, read_services},
    model::{desired_state, DesiredState, Settings},
};
use lb_common::{timeouts, CtKey};
use lb_tests::packet::{
    icmp_error_frame, parse_checked, parse_icmp_checked, Flow, Harness, CLIENT_MAC, NODE_MAC,
    TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
};

const CLIENT: &str = "192.168.77.2";
const OUTSIDER: &str = "10.1.1.1";
const NODE_ADDRS: [&str; 2] = ["192.168.77.1", "10.244.1.1"];
const BACKENDS: [&str; 3] = ["10.244.1.2", "10.244.2.2", "10.244.3.2"];

/// One LoadBalancer Service with every kind of frontend, TCP and UDP, three backends, and a
/// ClusterIP Service with none.
const MANIFESTS: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.10]
  loadBalancerSourceRanges: [192.168.77.0/24]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}, {ip: 203.0.113.11, ipMode: Proxy}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.1.2]
- addresses: [10.244.2.2]
- addresses: [10.244.3.2]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: tcp, port: 80}, {name: udp, port: 53, protocol: UDP}]
";

fn desired() -> DesiredState {
    let mut m = Manifests::default();
    parse_into(Path::new("frontends.yaml"), MANIFESTS, &mut m);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let settings = Settings {
        node_addresses: NODE_ADDRS.iter().map(|a| a.parse().unwrap()).collect(),
        ..Settings::default()
    };
    let state = desired_state(&m.services, &m.endpoint_slices, &settings);
    assert!(state.errors.is_empty(), "{:?}", state.errors);
    state
}

fn harness_with(settings: DatapathSettings) -> Harness {
    let mut h = Harness::with_settings(&settings).expect("load the program (run as root)");
    h.program(&desired()).expect("program the maps");
    h
}

fn harness() -> Harness {
    harness_with(DatapathSettings::default())
}

fn flow_key(flow: &Flow) -> CtKey {
    CtKey {
        src_addr: flow.src.octets(),
        dst_addr: flow.dst.octets(),
        src_port: flow.sport,
        dst_port: flow.dport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// Makes the entry at `key` expired; returns it as it is now.
fn age(ct: &mut lb_agent::maps::ConntrackMap, key: &CtKey) -> lb_common::CtValue {
    let mut value = ct.get(key, 0).unwrap();
    value.expires_ns = monotonic_ns() - 1;
    ct.insert(key, value, 0).unwrap();
    value
}

/// Sends `flow`, expects it DNATed to a backend on `port`; returns the backend.
fn expect_dnat(h: &mut Harness, flow: &Flow, port: u16) -> Ipv4Addr {
    let verdict = h.run(&flow.build()).expect("test run");
    assert_eq!(verdict.action, TC_ACT_OK, "{flow:?} is translated");
    let out = parse_checked(&verdict.packet).expect("valid checksums");
    assert!(
        BACKENDS.contains(&out.dst.to_string().as_str()),
        "{}",
        out.dst
    );
    let expected = Flow {
        dst: out.dst,
        dport: port,
        ..flow.clone()
    };
    assert_eq!(verdict.packet, expected.build(), "byte for byte");
    out.dst
}

/// What `backend:port` sends back on the flow the client opened with `flow`, arriving from
/// the backend's link.
fn backend_reply(flow: &Flow, backend: Ipv4Addr, port: u16) -> Flow {
    Flow {
        src: backend,
        sport: port,
        src_mac: [0x02, 0, 0, 0, 0, 0xbb],
        dst_mac: [0x02, 0, 0, 0, 0, 0xcc],
        ..flow.reversed()
    }
}

/// Sends the backend's reply to `flow` and expects it to come from the frontend again.
fn expect_reverse_nat(h: &mut Harness, flow: &Flow, backend: Ipv4Addr, port: u16) {
    let reply = backend_reply(flow, backend, port);
    let verdict = h.run(&reply.build()).unwrap();
    let node_address = NODE_ADDRS.contains(&flow.dst.to_string().as_str());
    if node_address {
        // From a node address: sent straight back where the request came from, with the
        // request's Ethernet addresses swapped (the stack would drop a forwarded packet
        // whose source is local).
        assert_eq!(verdict.action, TC_ACT_REDIRECT);
        assert_eq!(
            verdict.packet,
            flow.reversed().build(),
            "reply shows the frontend"
        );
    } else {
        assert_eq!(verdict.action, TC_ACT_OK);
        let expected = Flow {
            src_mac: reply.src_mac,
            dst_mac: reply.dst_mac,
            ..flow.reversed()
        };
        assert_eq!(verdict.packet, expected.build(), "reply shows the frontend");
    }
}

#[test]
fn every_frontend_kind_translates_tcp_and_udp() {
    let mut h = harness();
    let frontends = [
        ("10.96.0.10", 80, 53),         // ClusterIP
        ("192.168.77.1", 30080, 30053), // NodePort, first node address
        ("10.244.1.1", 30080, 30053),   // NodePort, second node address
        ("203.0.113.10", 80, 53),       // LoadBalancer ingress
        ("198.51.100.10", 80, 53),      // externalIP
    ];
    for (i, (addr, tcp_port, udp_port)) in frontends.into_iter().enumerate() {
        let sport = 40000 + i as u16;
        let syn = Flow::tcp(CLIENT, sport, addr, tcp_port, TCP_SYN);
        let backend = expect_dnat(&mut h, &syn, 8080);
        expect_reverse_nat(&mut h, &syn, backend, 8080);
        let datagram = Flow::udp(CLIENT, sport, addr, udp_port);
        let backend = expect_dnat(&mut h, &datagram, 5353);
        expect_reverse_nat(&mut h, &datagram, backend, 5353);
    }
    // ipMode: Proxy ingress is not a frontend here; nor is a NodePort on a foreign address.
    for (addr, port) in [("203.0.113.11", 80), ("192.168.77.99", 30080)] {
        let frame = Flow::tcp(CLIENT, 41000, addr, port, TCP_SYN).build();
        let verdict = h.run(&frame).unwrap();
        assert_eq!(
            (verdict.action, verdict.packet),
            (TC_ACT_UNSPEC, frame),
            "{addr}:{port}"
        );
    }
}

#[test]
fn ip_options_are_kept_and_checksums_still_right() {
    let mut h = harness();
    let syn = Flow {
        ip_options: vec![0x94, 0x04, 0x00, 0x00], // router alert
        ..Flow::tcp(CLIENT, 42000, "10.96.0.10", 80, TCP_SYN)
    };
    let backend = expect_dnat(&mut h, &syn, 8080);
    expect_reverse_nat(&mut h, &syn, backend, 8080);
}

#[test]
fn source_ranges_admit_listed_clients_on_load_balancer_frontends_only() {
    let mut h = harness();
    expect_dnat(
        &mut h,
        &Flow::tcp(CLIENT, 43000, "203.0.113.10", 80, TCP_SYN),
        8080,
    );
    let outsider = Flow::tcp(OUTSIDER, 43001, "203.0.113.10", 80, TCP_SYN);
    assert_eq!(h.run(&outsider.build()).unwrap().action, TC_ACT_SHOT);
    assert_eq!(h.counter("drop_source_range"), 1);
    // The same Service's other frontends are not restricted.
    expect_dnat(
        &mut h,
        &Flow::tcp(OUTSIDER, 43002, "10.96.0.10", 80, TCP_SYN),
        8080,
    );
    expect_dnat(
        &mut h,
        &Flow::tcp(OUTSIDER, 43003, "198.51.100.10", 80, TCP_SYN),
        8080,
    );
    expect_dnat(
        &mut h,
        &Flow::tcp(OUTSIDER, 43004, "192.168.77.1", 30080, TCP_SYN),
        8080,
    );
    let services = read_services(&h.pin_dir).unwrap();
    let web = services
        .iter()
        .find(|s| s.name == "shop/web:http/TCP")
        .unwrap();
    assert_eq!(web.source_ranges, vec!["192.168.77.0/24".to_string()]);
}

#[test]
fn no_backend_rejects_tcp_with_an_exact_reset() {
    let mut h = harness();
    // A SYN with 8 bytes of payload: the reset acknowledges seq + 8 + 1 (SYN).
    let syn = Flow::tcp(CLIENT, 44000, "10.96.0.20", 80, TCP_SYN);
    let verdict = h.run(&syn.build()).unwrap();
    assert_eq!(
        verdict.action, TC_ACT_REDIRECT,
        "sent back out of the arrival interface"
    );
    let expected = Flow {
        src_mac: NODE_MAC,
        dst_mac: CLIENT_MAC,
        ip_id: 0,
        tcp_flags: TCP_RST | TCP_ACK,
        seq: 0,
        ack: syn.seq + 8 + 1,
        window: 0,
        payload: Vec::new(),
        ..syn.reversed()
    };
    assert_eq!(parse_checked(&verdict.packet).unwrap(), expected);
    assert_eq!(verdict.packet, expected.build(), "byte for byte");

    // A segment carrying an ACK gets a bare RST with the sequence number it acknowledged.
    let ack = Flow::tcp(CLIENT, 44001, "10.96.0.20", 80, TCP_ACK);
    let verdict = h.run(&ack.build()).unwrap();
    let expected = Flow {
        src_mac: NODE_MAC,
        dst_mac: CLIENT_MAC,
        ip_id: 0,
        tcp_flags: TCP_RST,
        seq: ack.ack,
        ack: 0,
        window: 0,
        payload: Vec::new(),
        ..ack.reversed()
    };
    assert_eq!(verdict.packet, expected.build());
    // A reset is never answered.
    let rst = Flow::tcp(CLIENT, 44002, "10.96.0.20", 80, TCP_RST);
    assert_eq!(h.run(&rst.build()).unwrap().action, TC_ACT_SHOT);
    assert_eq!(h.counter("reject_no_backend"), 3);
}

#[test]
fn no_backend_rejects_udp_with_an_exact_port_unreachable() {
    let mut h = harness();
    let datagram = Flow::udp(CLIENT, 45000, "10.96.0.20", 53);
    let verdict = h.run(&datagram.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_REDIRECT);
    let quote = &datagram.ip_packet()[..28];
    let expected = icmp_error_frame(
        NODE_MAC,
        CLIENT_MAC,
        "10.96.0.20".parse().unwrap(),
        CLIENT.parse().unwrap(),
        0,
        3,
        3,
        quote,
    );
    let (icmp_type, code, got_quote) = parse_icmp_checked(&verdict.packet).unwrap();
    assert_eq!((icmp_type, code, got_quote.as_slice()), (3, 3, quote));
    assert_eq!(verdict.packet, expected, "byte for byte");
}

#[test]
fn drop_mode_drops_silently() {
    let mut h = harness_with(DatapathSettings {
        no_backend_drop: true,
        ..DatapathSettings::default()
    });
    for flow in [
        Flow::tcp(CLIENT, 46000, "10.96.0.20", 80, TCP_SYN),
        Flow::udp(CLIENT, 46000, "10.96.0.20", 53),
    ] {
        assert_eq!(h.run(&flow.build()).unwrap().action, TC_ACT_SHOT);
    }
    assert_eq!(h.counter("drop_no_backend"), 2);
    assert_eq!(h.counter("reject_no_backend"), 0);
}

#[test]
fn hairpin_flows_are_source_natted_and_return_to_the_pod() {
    let mut h = harness();
    let hairpin: Ipv4Addr = DatapathSettings::default().hairpin_addr;
    // Send from each backend until one picks itself (at most a few tries).
    for attempt in 0..200u16 {
        let pod = BACKENDS[usize::from(attempt) % 3];
        let syn = Flow::tcp(pod, 47000 + attempt, "10.96.0.10", 80, TCP_SYN);
        let verdict = h.run(&syn.build()).unwrap();
        let out = parse_checked(&verdict.packet).unwrap();
        if out.dst.to_string() != pod {
            assert_eq!(out.src.to_string(), pod, "no SNAT towards another backend");
            continue;
        }
        let expected = Flow {
            src: hairpin,
            dst: pod.parse().unwrap(),
            dport: 8080,
            ..syn.clone()
        };
        assert_eq!(
            verdict.packet,
            expected.build(),
            "source becomes the hairpin address"
        );
        let reply = Flow {
            src: pod.parse().unwrap(),
            sport: 8080,
            dst: hairpin,
            ..syn.reversed()
        };
        let verdict = h.run(&reply.build()).unwrap();
        assert_eq!(verdict.action, TC_ACT_OK);
        assert_eq!(
            verdict.packet,
            syn.reversed().build(),
            "the pod sees the VIP answer"
        );
        assert_eq!(h.counter("hairpin"), 1);
        return;
    }
    panic!("no backend ever picked itself in 200 flows");
}

#[test]
fn established_tcp_whose_backend_left_is_reset_and_a_new_syn_moves() {
    let mut h = harness();
    let syn = Flow::tcp(CLIENT, 48000, "10.96.0.10", 80, TCP_SYN);
    let first = expect_dnat(&mut h, &syn, 8080);
    // The endpoint leaves its slice.
    let mut state = desired();
    for service in state.services.values_mut() {
        service.backends.retain(|b| b.addr != first);
    }
    state.known_backends.retain(|b| b.addr != first);
    h.program(&state).unwrap();

    let ack = Flow::tcp(CLIENT, 48000, "10.96.0.10", 80, TCP_ACK);
    let verdict = h.run(&ack.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_REDIRECT);
    let rst = parse_checked(&verdict.packet).unwrap();
    assert_eq!(
        (
            rst.src.to_string().as_str(),
            rst.sport,
            rst.tcp_flags,
            rst.seq
        ),
        ("10.96.0.10", 80, TCP_RST, ack.ack),
        "the client is reset by the frontend it talked to"
    );
    assert_eq!(h.counter("reset_backend_gone"), 1);
    // The flow is forgotten: a new SYN on the same ports is balanced to a live backend.
    let again = expect_dnat(&mut h, &syn, 8080);
    assert_ne!(again, first);
}

#[test]
fn established_flows_to_a_terminating_backend_carry_on_while_new_ones_avoid_it() {
    let mut h = harness();
    let syn = Flow::tcp(CLIENT, 48500, "10.96.0.10", 80, TCP_SYN);
    let first = expect_dnat(&mut h, &syn, 8080);
    // The endpoint turns terminating: still in its slice (known), no longer chosen.
    let mut state = desired();
    for service in state.services.values_mut() {
        service.backends.retain(|b| b.addr != first);
    }
    assert!(state.known_backends.iter().any(|b| b.addr == first));
    h.program(&state).unwrap();
    let ack = Flow::tcp(CLIENT, 48500, "10.96.0.10", 80, TCP_ACK);
    for _ in 0..5 {
        assert_eq!(
            expect_dnat(&mut h, &ack, 8080),
            first,
            "graceful: the flow stays"
        );
    }
    assert_eq!(h.counter("reset_backend_gone"), 0);
    for port in 0..30 {
        let new = Flow::tcp(CLIENT, 48600 + port, "10.96.0.10", 80, TCP_SYN);
        assert_ne!(expect_dnat(&mut h, &new, 8080), first, "new flows avoid it");
    }
}

#[test]
fn a_new_connection_on_the_ports_of_a_closed_one_is_balanced_anew() {
    let mut h = harness();
    let syn = Flow::tcp(CLIENT, 48700, "10.96.0.10", 80, TCP_SYN);
    let first = expect_dnat(&mut h, &syn, 8080);
    // The client closes; the endpoint then turns terminating (known, no longer chosen).
    let fin = Flow::tcp(CLIENT, 48700, "10.96.0.10", 80, TCP_FIN | TCP_ACK);
    assert_eq!(
        expect_dnat(&mut h, &fin, 8080),
        first,
        "the close goes through"
    );
    let mut state = desired();
    for service in state.services.values_mut() {
        service.backends.retain(|b| b.addr != first);
    }
    h.program(&state).unwrap();
    // A SYN retransmitted within a connection keeps its backend; a SYN after the close is a
    // new connection (a client reusing a port in TIME_WAIT): balanced among the ready ones.
    let again = expect_dnat(&mut h, &syn, 8080);
    assert_ne!(again, first, "not sent to the terminating endpoint");
    let retransmit = expect_dnat(&mut h, &syn, 8080);
    assert_eq!(retransmit, again, "a retransmitted SYN keeps its backend");
    assert_eq!(h.counter("reset_backend_gone"), 0);
}

/// Conntrack entries of the flow the client opened with `syn` (forward and reply halves).
fn entries_of(h: &Harness, syn: &Flow) -> usize {
    // The client's port is on both: the source going out, the destination coming back.
    h.conntrack()
        .keys()
        .flatten()
        .filter(|k| k.src_port == syn.sport || k.dst_port == syn.sport)
        .count()
}

/// The backend's segment with `flags` on the flow `syn` opened, and what the client receives.
fn from_backend(h: &mut Harness, syn: &Flow, backend: Ipv4Addr, flags: u8) -> (i32, Vec<u8>) {
    let segment = Flow {
        tcp_flags: flags,
        ..backend_reply(syn, backend, 8080)
    };
    let verdict = h.run(&segment.build()).expect("test run");
    (verdict.action, verdict.packet)
}

#[test]
fn a_connection_both_ends_closed_leaves_conntrack_with_its_last_ack() {
    let mut h = harness();
    let shows_frontend = |packet: &[u8], syn: &Flow| {
        let out = parse_checked(packet).expect("valid checksums");
        (out.src, out.sport) == (syn.dst, syn.dport)
    };
    // The client closes first: its last ACK (forward) ends the flow.
    let syn = Flow::tcp(CLIENT, 47000, "10.96.0.10", 80, TCP_SYN);
    let backend = expect_dnat(&mut h, &syn, 8080);
    let (_, synack) = from_backend(&mut h, &syn, backend, TCP_SYN | TCP_ACK);
    assert!(shows_frontend(&synack, &syn));
    let client = |flags| Flow {
        tcp_flags: flags,
        ..syn.clone()
    };
    expect_dnat(&mut h, &client(TCP_ACK), 8080);
    expect_dnat(&mut h, &client(TCP_FIN | TCP_ACK), 8080);
    // The backend still sends after the client's FIN (a half-closed stream), and the client
    // acknowledges: nothing ends yet.
    from_backend(&mut h, &syn, backend, TCP_ACK);
    expect_dnat(&mut h, &client(TCP_ACK), 8080);
    assert_eq!(entries_of(&h, &syn), 2, "half closed: both halves stay");
    let (_, fin) = from_backend(&mut h, &syn, backend, TCP_FIN | TCP_ACK);
    assert!(
        shows_frontend(&fin, &syn),
        "the backend's FIN is translated"
    );
    assert_eq!(entries_of(&h, &syn), 2, "the last ACK is still to come");
    assert_eq!(
        expect_dnat(&mut h, &client(TCP_ACK), 8080),
        backend,
        "the last ACK reaches the backend"
    );
    assert_eq!(
        entries_of(&h, &syn),
        0,
        "both halves gone with the last ACK"
    );
    assert_eq!(h.counter("conntrack_closed"), 1);
    // A FIN the backend sends again (the last ACK was lost further on) is no longer
    // translated: the client's stack answers it with a reset, which ends the backend's side.
    let (action, _) = from_backend(&mut h, &syn, backend, TCP_FIN | TCP_ACK);
    assert_eq!(action, TC_ACT_UNSPEC, "not ours any more");

    // The backend closes first: its last ACK (a reply) ends the flow, translated.
    let syn = Flow::tcp(CLIENT, 47001, "10.96.0.10", 80, TCP_SYN);
    let backend = expect_dnat(&mut h, &syn, 8080);
    from_backend(&mut h, &syn, backend, TCP_SYN | TCP_ACK);
    let client = |flags| Flow {
        tcp_flags: flags,
        ..syn.clone()
    };
    expect_dnat(&mut h, &client(TCP_ACK), 8080);
    from_backend(&mut h, &syn, backend, TCP_FIN | TCP_ACK);
    expect_dnat(&mut h, &client(TCP_ACK), 8080);
    expect_dnat(&mut h, &client(TCP_FIN | TCP_ACK), 8080);
    assert_eq!(entries_of(&h, &syn), 2);
    let (action, last) = from_backend(&mut h, &syn, backend, TCP_ACK);
    assert_eq!(action, TC_ACT_OK);
    assert!(shows_frontend(&last, &syn), "the last ACK is translated");
    assert_eq!(entries_of(&h, &syn), 0);
    assert_eq!(h.counter("conntrack_closed"), 2);

    // A reset alone ends nothing early (it is not checked against the sequence space, so a
    // stray one must not cut a live connection's translation): the closing timeout applies.
    let syn = Flow::tcp(CLIENT, 47002, "10.96.0.10", 80, TCP_SYN);
    let backend = expect_dnat(&mut h, &syn, 8080);
    from_backend(&mut h, &syn, backend, TCP_RST | TCP_ACK);
    expect_dnat(
        &mut h,
        &Flow {
            tcp_flags: TCP_ACK,
            ..syn.clone()
        },
        8080,
    );
    assert_eq!(entries_of(&h, &syn), 2);
    assert_eq!(h.counter("conntrack_closed"), 2);
}

#[test]
fn conntrack_lifetimes_follow_the_protocol_and_state() {
    let mut h = harness();
    let ct = |h: &Harness, flow: &Flow| {
        let value = h.conntrack().get(&flow_key(flow), 0).expect("entry");
        value.expires_ns - value.last_seen_ns
    };
    let syn = Flow::tcp(CLIENT, 49000, "10.96.0.10", 80, TCP_SYN);
    expect_dnat(&mut h, &syn, 8080);
    assert_eq!(ct(&h, &syn), timeouts::TCP_SYN_NS, "handshake not done");
    let ack = Flow::tcp(CLIENT, 49000, "10.96.0.10", 80, TCP_ACK);
    expect_dnat(&mut h, &ack, 8080);
    assert_eq!(ct(&h, &syn), timeouts::TCP_ESTABLISHED_NS, "established");
    let fin = Flow::tcp(CLIENT, 49000, "10.96.0.10", 80, TCP_FIN | TCP_ACK);
    expect_dnat(&mut h, &fin, 8080);
    assert_eq!(ct(&h, &syn), timeouts::TCP_CLOSING_NS, "closing");
    let datagram = Flow::udp(CLIENT, 49000, "10.96.0.10", 53);
    expect_dnat(&mut h, &datagram, 5353);
    assert_eq!(ct(&h, &datagram), timeouts::UDP_NS);
}

#[test]
fn expired_entries_are_ignored_by_the_datapath_and_removed_by_the_collector() {
    let mut h = harness();
    let datagram = Flow::udp(CLIENT, 50000, "10.96.0.10", 53);
    expect_dnat(&mut h, &datagram, 5353);
    let live = Flow::udp(CLIENT, 50001, "10.96.0.10", 53);
    expect_dnat(&mut h, &live, 5353);
    let key = flow_key(&datagram);
    let mut ct = h.conntrack();
    // One direction expired, the other alive (a server still answering): the flow goes on.
    let forward = age(&mut ct, &key);
    let first = expect_dnat(&mut h, &datagram, 5353);
    assert_eq!(
        h.counter("conntrack_expired"),
        0,
        "alive in the other direction"
    );
    assert_eq!(h.counter("new_flow"), 2);
    // Both directions expired: the flow is gone and the packet starts a new one.
    age(&mut ct, &key);
    age(&mut ct, &lb_common::ct_other_half(&key, &forward));
    expect_dnat(&mut h, &datagram, 5353);
    assert_eq!(
        h.counter("conntrack_expired"),
        1,
        "stale entry replaced by a new flow"
    );
    assert_eq!(h.counter("new_flow"), 3);
    let _ = first;

    // Age two of the four entries; the collector removes exactly those.
    let before = ct.keys().count();
    assert_eq!(before, 4, "two flows, two directions each");
    let mut aged = 0;
    for key in ct.keys().collect::<Result<Vec<_>, _>>().unwrap() {
        if key.src_port == 50000 || key.dst_port == 50000 {
            let mut v = ct.get(&key, 0).unwrap();
            v.expires_ns = monotonic_ns() - 1;
            ct.insert(key, v, 0).unwrap();
            aged += 1;
        }
    }
    assert_eq!(aged, 2);
    let (examined, deleted) = collect_conntrack_garbage(&mut ct, 1000);
    assert_eq!((examined, deleted), (4, 2));
    assert_eq!(ct.keys().count(), 2);
}

#[test]
fn garbage_collection_reads_in_batches_and_removes_exactly_the_expired_entries() {
    // Many more entries than one batch holds.
    let total = 20_000u32;
    let expired = total.div_ceil(3) as usize;
    for batched in [true, false] {
        let h = harness();
        h.fill_conntrack(total, 3).unwrap();
        let mut ct = h.conntrack();
        // The batched walk sees exactly what the key-by-key walk sees.
        let key_by_key = lb_agent::maps::count_expired_key_by_key(&ct);
        assert_eq!(key_by_key, (total as usize, expired));
        assert_eq!(
            lb_agent::maps::count_expired_batched(&ct).unwrap(),
            key_by_key
        );
        let collect = if batched {
            collect_conntrack_garbage
        } else {
            lb_agent::maps::collect_conntrack_garbage_key_by_key
        };
        // A budget bounds one pass; the next pass takes the rest.
        let (_, deleted) = collect(&mut ct, 5000);
        assert_eq!(deleted, 5000, "batched: {batched}");
        let (examined, deleted) = collect(&mut ct, 100_000);
        assert_eq!(
            (examined, deleted),
            (total as usize - 5000, expired - 5000),
            "batched: {batched}"
        );
        assert_eq!(ct.keys().count(), total as usize - expired);
        assert_eq!(
            lb_agent::maps::count_expired_batched(&ct).unwrap(),
            (total as usize - expired, 0)
        );
    }
}

#[test]
fn per_service_counters_count_packets_and_bytes_both_ways() {
    let mut h = harness();
    let syn = Flow::tcp(CLIENT, 51000, "10.96.0.10", 80, TCP_SYN);
    let frame_len = syn.build().len() as u64;
    let backend = expect_dnat(&mut h, &syn, 8080);
    for _ in 0..4 {
        expect_dnat(&mut h, &syn, 8080);
    }
    expect_reverse_nat(&mut h, &syn, backend, 8080);
    let services = read_services(&h.pin_dir).unwrap();
    let by_name: BTreeMap<_, _> = services.iter().map(|s| (s.name.as_str(), s)).collect();
    let web = by_name["shop/web:http/TCP"];
    assert_eq!((web.stats.packets, web.stats.bytes), (5, 5 * frame_len));
    assert_eq!(
        (web.stats.reply_packets, web.stats.reply_bytes),
        (1, frame_len)
    );
    assert_eq!(by_name["shop/web:dns/UDP"].stats.packets, 0);
    assert_eq!(h.counter("new_flow"), 1);
    assert_eq!(h.counter("forward"), 4);
    assert_eq!(h.counter("reply"), 1);
}

#[test]
fn new_flows_are_spread_uniformly() {
    let mut h = harness();
    const FLOWS: u32 = 6000;
    let mut counts: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for i in 0..FLOWS {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i);
        let flow = Flow::udp(
            &src.to_string(),
            10000 + (i % 50000) as u16,
            "10.96.0.10",
            53,
        );
        *counts.entry(expect_dnat(&mut h, &flow, 5353)).or_default() += 1;
    }
    assert_eq!(counts.len(), 3);
    // Each share within 10% of a third (200 of 2000 flows): about 5.5 standard deviations
    // of a fair choice, so it never flakes, yet a biased pick fails it.
    for (backend, n) in &counts {
        let expected = f64::from(FLOWS) / 3.0;
        assert!(
            (f64::from(*n) - expected).abs() < expected * 0.1,
            "{backend}: {n} of {FLOWS}"
        );
    }
}

/// externalTrafficPolicy: Local, endpoints on node-a (10.244.1.2) and node-b (10.244.2.2).
const LOCAL_POLICY: &str = "
apiVersion: v1
kind: Service
metadata: {name: edge, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.30}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: edge-1, namespace: shop, labels: {kubernetes.io/service-name: edge}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.2.2], nodeName: node-b}
";

fn local_policy_harness(node: &str) -> Harness {
    let mut m = Manifests::default();
    parse_into(Path::new("local.yaml"), LOCAL_POLICY, &mut m);
    let settings = Settings {
        node_name: node.to_string(),
        node_addresses: vec!["192.168.77.1".parse().unwrap()],
        ..Settings::default()
    };
    let state = desired_state(&m.services, &m.endpoint_slices, &settings);
    let mut h = Harness::new().unwrap();
    h.program(&state).unwrap();
    h
}

#[test]
fn local_policy_uses_only_this_nodes_endpoints_for_external_frontends() {
    let mut h = local_policy_harness("node-a");
    for port in 0..20 {
        for (frontend, fport) in [("203.0.113.30", 80), ("192.168.77.1", 30090)] {
            let syn = Flow::tcp(CLIENT, 52000 + port, frontend, fport, TCP_SYN);
            let out = parse_checked(&h.run(&syn.build()).unwrap().packet).unwrap();
            assert_eq!(
                out.dst.to_string(),
                "10.244.1.2",
                "{frontend}: local endpoint only"
            );
            assert_eq!(out.src.to_string(), CLIENT, "client address kept");
        }
    }
    // The ClusterIP is not external: every endpoint.
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..40 {
        let syn = Flow::tcp(CLIENT, 53000 + port, "10.96.0.30", 80, TCP_SYN);
        seen.insert(
            parse_checked(&h.run(&syn.build()).unwrap().packet)
                .unwrap()
                .dst,
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn local_policy_on_a_node_without_endpoints_drops_external_traffic_and_serves_the_cluster_ip() {
    let mut h = local_policy_harness("node-c");
    for (frontend, port) in [("203.0.113.30", 80), ("192.168.77.1", 30090)] {
        let syn = Flow::tcp(CLIENT, 54000, frontend, port, TCP_SYN);
        assert_eq!(
            h.run(&syn.build()).unwrap().action,
            TC_ACT_SHOT,
            "{frontend}: dropped"
        );
    }
    assert_eq!(h.counter("drop_no_backend"), 2);
    assert_eq!(
        h.counter("reject_no_backend"),
        0,
        "dropped, not rejected: others have endpoints"
    );
    let syn = Flow::tcp(CLIENT, 54001, "10.96.0.30", 80, TCP_SYN);
    assert_eq!(h.run(&syn.build()).unwrap().action, TC_ACT_OK);
}

const AFFINITY: &str = "
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: shop}
spec:
  clusterIP: 10.96.0.40
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: shop, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.2]
- addresses: [10.244.2.2]
- addresses: [10.244.3.2]
";

fn affinity_harness() -> (Harness, DesiredState) {
    let mut m = Manifests::default();
    parse_into(Path::new("sticky.yaml"), AFFINITY, &mut m);
    let state = desired_state(&m.services, &m.endpoint_slices, &Settings::default());
    let mut h = Harness::new().unwrap();
    h.program(&state).unwrap();
    (h, state)
}

#[test]
fn client_ip_affinity_keeps_a_client_on_its_backend_across_connections() {
    let (mut h, _) = affinity_harness();
    let first = expect_dnat(
        &mut h,
        &Flow::tcp(CLIENT, 55000, "10.96.0.40", 80, TCP_SYN),
        8080,
    );
    for port in 1..40 {
        let syn = Flow::tcp(CLIENT, 55000 + port, "10.96.0.40", 80, TCP_SYN);
        assert_eq!(
            expect_dnat(&mut h, &syn, 8080),
            first,
            "connection {port} stays"
        );
    }
    // Different clients spread over the backends.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..60u32 {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 1)) + i).to_string();
        seen.insert(expect_dnat(
            &mut h,
            &Flow::tcp(&client, 40000, "10.96.0.40", 80, TCP_SYN),
            8080,
        ));
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn affinity_ends_with_its_timeout_and_with_its_backend() {
    let (mut h, mut state) = affinity_harness();
    let first = expect_dnat(
        &mut h,
        &Flow::tcp(CLIENT, 56000, "10.96.0.40", 80, TCP_SYN),
        8080,
    );
    // Age the client's entry past the 600 s timeout: the next connection is balanced afresh
    // (and then sticks to whatever it got).
    let data = aya::maps::MapData::from_pin(h.pin_dir.join("LB_AFFINITY")).unwrap();
    let mut affinity: aya::maps::HashMap<_, lb_common::AffinityKey, lb_common::AffinityValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
    let (key, mut value) = affinity.iter().next().unwrap().unwrap();
    value.last_used_ns = monotonic_ns().saturating_sub(601 * 1_000_000_000);
    affinity.insert(key, value, 0).unwrap();
    let mut moved = false;
    for round in 0..20u16 {
        let next = expect_dnat(
            &mut h,
            &Flow::tcp(CLIENT, 56100 + round, "10.96.0.40", 80, TCP_SYN),
            8080,
        );
        let again = expect_dnat(
            &mut h,
            &Flow::tcp(CLIENT, 56200 + round, "10.96.0.40", 80, TCP_SYN),
            8080,
        );
        assert_eq!(next, again, "a new affinity holds");
        moved |= next != first;
        if moved {
            break;
        }
        let (key, mut value) = affinity.iter().next().unwrap().unwrap();
        value.last_used_ns = monotonic_ns().saturating_sub(601 * 1_000_000_000);
        affinity.insert(key, value, 0).unwrap();
    }
    assert!(moved, "an expired affinity is balanced again (20 tries)");

    // The backend the client sticks to leaves: the client moves, never to the removed one.
    let stuck = expect_dnat(
        &mut h,
        &Flow::tcp(CLIENT, 56300, "10.96.0.40", 80, TCP_SYN),
        8080,
    );
    for service in state.services.values_mut() {
        service.backends.retain(|b| b.addr != stuck);
    }
    h.program(&state).unwrap();
    for port in 0..10 {
        let syn = Flow::tcp(CLIENT, 56400 + port, "10.96.0.40", 80, TCP_SYN);
        assert_ne!(expect_dnat(&mut h, &syn, 8080), stuck);
    }
}

/// externalTrafficPolicy Cluster on node-a: `far` has its only endpoint on node-b, `near` on
/// node-a.
const CLUSTER_POLICY: &str = "
apiVersion: v1
kind: Service
metadata: {name: far, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30095}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.50}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: far-1, namespace: shop, labels: {kubernetes.io/service-name: far}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.2], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: near, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.51
  ports: [{name: http, port: 80, targetPort: 8080}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.51}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: near-1, namespace: shop, labels: {kubernetes.io/service-name: near}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.2], nodeName: node-a}]
";

const NODE_A: &str = "192.168.77.1";

fn cluster_policy_harness() -> Harness {
    let mut m = Manifests::default();
    parse_into(Path::new("cluster.yaml"), CLUSTER_POLICY, &mut m);
    let settings = Settings {
        node_name: "node-a".into(),
        node_addresses: vec![NODE_A.parse().unwrap()],
        ..Settings::default()
    };
    let state = desired_state(&m.services, &m.endpoint_slices, &settings);
    let mut h = Harness::with_settings(&DatapathSettings {
        snat_addr: Some(NODE_A.parse().unwrap()),
        ..DatapathSettings::default()
    })
    .unwrap();
    h.program(&state).unwrap();
    h
}

/// The remote backend's reply to `out` (the translated request) and what the client must get.
fn reply_to(out: &Flow, frontend: &Flow) -> (Flow, Flow) {
    let reply = Flow {
        src_mac: [0x02, 0, 0, 0, 0, 0xbb],
        dst_mac: [0x02, 0, 0, 0, 0, 0xcc],
        tcp_flags: TCP_SYN | TCP_ACK,
        ..out.reversed()
    };
    let expected = Flow {
        src: frontend.dst,
        sport: frontend.dport,
        dst: frontend.src,
        dport: frontend.sport,
        ..reply.clone()
    };
    (reply, expected)
}

#[test]
fn external_traffic_to_a_remote_endpoint_is_source_natted_and_its_reply_restored() {
    let mut h = cluster_policy_harness();
    let syn = Flow::tcp(CLIENT, 57000, "203.0.113.50", 80, TCP_SYN);
    let verdict = h.run(&syn.build()).unwrap();
    // Sent straight to the FIB's next hop when the test's namespace has a route for it (then
    // with that hop's Ethernet addresses), else handed to the stack: the IP packet is the same.
    assert!(
        [TC_ACT_OK, TC_ACT_REDIRECT].contains(&verdict.action),
        "{}",
        verdict.action
    );
    let expected = Flow {
        src: NODE_A.parse().unwrap(),
        dst: "10.244.9.2".parse().unwrap(),
        dport: 8080,
        ..syn.clone()
    };
    assert_eq!(
        verdict.packet[12..],
        expected.build()[12..],
        "source is this node, port kept"
    );
    let (reply, back) = reply_to(&expected, &syn);
    let verdict = h.run(&reply.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    assert_eq!(
        verdict.packet,
        back.build(),
        "the client sees the frontend answer"
    );
    assert_eq!(h.counter("snat"), 1);

    // The same endpoint through the ClusterIP: in-cluster traffic keeps its source.
    let inside = Flow::tcp(CLIENT, 57001, "10.96.0.50", 80, TCP_SYN);
    let out = parse_checked(&h.run(&inside.build()).unwrap().packet).unwrap();
    assert_eq!(out.src.to_string(), CLIENT);
    // A local endpoint of an external frontend: no source NAT either.
    let local = Flow::tcp(CLIENT, 57002, "203.0.113.51", 80, TCP_SYN);
    let out = parse_checked(&h.run(&local.build()).unwrap().packet).unwrap();
    assert_eq!(
        (out.src.to_string(), out.dst.to_string()),
        (CLIENT.to_string(), "10.244.1.2".to_string())
    );
    assert_eq!(h.counter("snat"), 1);
}

#[test]
fn two_clients_with_one_port_get_distinct_source_nat_ports() {
    let mut h = cluster_policy_harness();
    let a = Flow::tcp("10.1.1.1", 58000, "203.0.113.50", 80, TCP_SYN);
    let b = Flow::tcp("10.1.1.2", 58000, "203.0.113.50", 80, TCP_SYN);
    let out_a = parse_checked(&h.run(&a.build()).unwrap().packet).unwrap();
    let out_b = parse_checked(&h.run(&b.build()).unwrap().packet).unwrap();
    assert_eq!(out_a.src.to_string(), NODE_A);
    assert_eq!(out_b.src.to_string(), NODE_A);
    assert_eq!(out_a.sport, 58000, "the first keeps its port");
    assert_ne!(out_b.sport, 58000, "the second gets another one");
    for (out, client) in [(&out_a, &a), (&out_b, &b)] {
        let (reply, back) = reply_to(out, client);
        let verdict = h.run(&reply.build()).unwrap();
        assert_eq!(
            verdict.packet,
            back.build(),
            "each reply finds its own client and port"
        );
    }
    // Later packets of b keep b's port.
    let again = parse_checked(
        &h.run(
            &Flow {
                tcp_flags: TCP_ACK,
                ..b.clone()
            }
            .build(),
        )
        .unwrap()
        .packet,
    )
    .unwrap();
    assert_eq!(again.sport, out_b.sport);
}

/// Two ClusterIP Services with one endpoint, the same for both.
const SHARED_ENDPOINT: &str = "
apiVersion: v1
kind: Service
metadata: {name: one, namespace: shop}
spec:
  clusterIP: 10.96.0.71
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: one-1, namespace: shop, labels: {kubernetes.io/service-name: one}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.2]}]
---
apiVersion: v1
kind: Service
metadata: {name: two, namespace: shop}
spec:
  clusterIP: 10.96.0.72
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: two-1, namespace: shop, labels: {kubernetes.io/service-name: two}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.2]}]
";

#[test]
fn one_client_port_to_two_frontends_of_one_endpoint_gets_two_reply_tuples() {
    let mut m = Manifests::default();
    parse_into(Path::new("shared.yaml"), SHARED_ENDPOINT, &mut m);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let state = desired_state(&m.services, &m.endpoint_slices, &Settings::default());
    let mut h = Harness::new().unwrap();
    h.program(&state).unwrap();
    let translate = |h: &mut Harness, flow: &Flow| {
        let verdict = h.run(&flow.build()).unwrap();
        assert_eq!(verdict.action, TC_ACT_OK, "{flow:?}");
        parse_checked(&verdict.packet).unwrap()
    };
    let reply_of = |out: &Flow| Flow {
        tcp_flags: TCP_SYN | TCP_ACK,
        ..out.reversed()
    };

    // The kernel lets a client use one port towards two destinations; both pick the endpoint.
    let a = Flow::tcp(CLIENT, 41000, "10.96.0.71", 80, TCP_SYN);
    let b = Flow::tcp(CLIENT, 41000, "10.96.0.72", 80, TCP_SYN);
    let out_a = translate(&mut h, &a);
    assert_eq!(
        (out_a.dst.to_string(), out_a.dport),
        ("10.244.1.2".into(), 8080)
    );
    assert_eq!(out_a.sport, 41000, "the first keeps its port");
    let out_b = translate(&mut h, &b);
    assert_eq!(
        (out_b.dst.to_string(), out_b.dport),
        ("10.244.1.2".into(), 8080)
    );
    assert_eq!(out_b.src, b.src, "only the port changes");
    assert_ne!(
        out_b.sport, 41000,
        "the second may not share the first's 4-tuple"
    );
    assert_eq!(h.counter("reply_tuple_clash"), 1);
    assert_eq!(h.counter("drop_snat_ports"), 0);
    assert_eq!(
        out_b,
        Flow {
            sport: out_b.sport,
            dst: out_b.dst,
            dport: 8080,
            ..b.clone()
        },
        "byte for byte but for the rewritten fields"
    );

    // Each reply goes back to its own frontend, and b's to its own port.
    for (out, client) in [(&out_a, &a), (&out_b, &b)] {
        let verdict = h.run(&reply_of(out).build()).unwrap();
        assert_eq!(verdict.action, TC_ACT_OK);
        let expected = Flow {
            src: client.dst,
            sport: client.dport,
            dst: client.src,
            dport: client.sport,
            ..reply_of(out)
        };
        assert_eq!(verdict.packet, expected.build(), "reply to {client:?}");
    }
    // Later packets keep their ports.
    let ack = |f: &Flow| Flow {
        tcp_flags: TCP_ACK,
        ..f.clone()
    };
    assert_eq!(translate(&mut h, &ack(&b)).sport, out_b.sport);
    assert_eq!(translate(&mut h, &ack(&a)).sport, 41000);

    // A flow whose forward half was evicted finds its own reply half: it keeps its port.
    let mut ct = h.conntrack();
    ct.remove(&flow_key(&a)).unwrap();
    assert_eq!(translate(&mut h, &ack(&a)).sport, 41000);
    assert_eq!(h.counter("reply_tuple_clash"), 1);

    // Another flow's reply half holds its tuple while either half of that flow is alive, and
    // not once both have expired.
    age(&mut ct, &flow_key(&reply_of(&out_a)));
    ct.remove(&flow_key(&b)).unwrap();
    let out_b2 = translate(&mut h, &b);
    assert_ne!(
        out_b2.sport, 41000,
        "a's forward half is alive: a still holds it"
    );
    assert_eq!(h.counter("reply_tuple_clash"), 2);
    ct.remove(&flow_key(&b)).unwrap();
    age(&mut ct, &flow_key(&a));
    let out_b3 = translate(&mut h, &b);
    assert_eq!(
        out_b3.sport, 41000,
        "a connection expired both ways holds nothing"
    );
    assert_eq!(h.counter("reply_tuple_clash"), 2);
}
