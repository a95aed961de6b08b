//! The address filter (`LB_ADDR_FILTER`): the datapath passes packets that are neither to a
//! frontend nor from a backend without looking them up, so the agent must keep a bit for every
//! key a translated flow can have, removed Services' connections included, and clear stale
//! bits now and then.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use lb_agent::{
    filter::{backend_bit, frontend_bit},
    maps::Applier,
    model::{DesiredState, Protocol},
};
use lb_common::{map_names, FrontendKey, PROTO_TCP};
use lb_tests::{
    cluster_ip_service,
    packet::{parse_checked, Flow, Harness, TCP_ACK, TCP_SYN, TC_ACT_OK, TC_ACT_UNSPEC},
};

const CLIENT: &str = "10.244.9.9";
const BACKENDS: [&str; 2] = ["10.244.1.2", "10.244.2.2"];

fn state(services: &[(&str, &str)]) -> DesiredState {
    DesiredState {
        services: services
            .iter()
            .map(|(name, vip)| {
                (
                    format!("ns/{name}:80/TCP"),
                    cluster_ip_service(vip, 80, 8080, Protocol::Tcp, &BACKENDS),
                )
            })
            .collect::<BTreeMap<_, _>>(),
        ..DesiredState::default()
    }
}

fn filter_words(h: &Harness) -> Vec<u64> {
    let map = h.array::<u64>(map_names::ADDR_FILTER);
    (0..map.len()).map(|i| map.get(&i, 0).unwrap()).collect()
}

fn has(words: &[u64], bit: u32) -> bool {
    words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
}

fn frontend(vip: &str) -> u32 {
    frontend_bit(&FrontendKey {
        addr: vip.parse::<std::net::Ipv4Addr>().unwrap().octets(),
        port: 80,
        proto: PROTO_TCP,
        _pad: 0,
    })
}

fn backend(addr: &str) -> u32 {
    backend_bit(
        addr.parse::<std::net::Ipv4Addr>().unwrap().octets(),
        8080,
        PROTO_TCP,
    )
}

#[test]
fn a_removed_services_connections_keep_their_bits_through_a_rebuild() {
    let mut h = Harness::new().expect("load the program (run as root)");
    // Both Services share the backends, so those stay when one Service goes.
    h.program(&state(&[
        ("kept", "10.96.0.30"),
        ("gone", "10.96.0.10"),
        ("idle", "10.96.0.40"),
    ]))
    .unwrap();
    let words = filter_words(&h);
    for bit in [
        frontend("10.96.0.10"),
        frontend("10.96.0.30"),
        frontend("10.96.0.40"),
    ]
    .into_iter()
    .chain(BACKENDS.map(backend))
    {
        assert!(has(&words, bit), "bit {bit} of a programmed key is set");
    }

    let syn = Flow::tcp(CLIENT, 41000, "10.96.0.10", 80, TCP_SYN);
    let verdict = h.run(&syn.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let backend_addr = parse_checked(&verdict.packet).unwrap().dst;

    // "gone" and "idle" are deleted; the filter is rebuilt from what is left, at once (a
    // packet may have read a frontend just before it went: its bit stays for the grace) and
    // after the grace.
    let grace = Duration::from_millis(200);
    h.applier.set_filter_grace(grace);
    h.program(&state(&[("kept", "10.96.0.30")])).unwrap();
    let idle = frontend("10.96.0.40");
    h.applier.rebuild_address_filter().unwrap();
    assert!(has(&filter_words(&h), idle), "kept within the grace");
    std::thread::sleep(grace);
    let report = h.applier.rebuild_address_filter().unwrap();
    assert_eq!(
        report.flows, 2,
        "both halves of the open connection were read"
    );
    let words = filter_words(&h);
    let live: BTreeSet<u32> = [frontend("10.96.0.30")]
        .into_iter()
        .chain(BACKENDS.map(backend))
        .collect();
    assert!(
        live.contains(&idle) || !has(&words, idle),
        "the bit of a deleted frontend without connections is cleared"
    );
    assert!(
        has(&words, frontend("10.96.0.10")),
        "kept for the connection"
    );

    // The connection carries on both ways, as it would through kube-proxy's conntrack entry.
    let ack = Flow {
        tcp_flags: TCP_ACK,
        ..syn.clone()
    };
    let verdict = h.run(&ack.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let out = parse_checked(&verdict.packet).unwrap();
    assert_eq!((out.dst, out.dport), (backend_addr, 8080), "still DNATed");
    let reply = Flow {
        src: backend_addr,
        sport: 8080,
        ..ack.reversed()
    };
    let verdict = h.run(&reply.build()).unwrap();
    let back = parse_checked(&verdict.packet).unwrap();
    assert_eq!(
        (back.src.to_string().as_str(), back.sport),
        ("10.96.0.10", 80),
        "still reverse-NATed"
    );
    // A new connection to the deleted Service is not balanced: it passes as it came.
    let late = Flow::tcp(CLIENT, 41001, "10.96.0.10", 80, TCP_SYN);
    let verdict = h.run(&late.build()).unwrap();
    assert_eq!(verdict.action, TC_ACT_UNSPEC);
    assert_eq!(verdict.packet, late.build());
}

#[test]
fn stale_bits_from_endpoint_churn_are_cleared_by_themselves() {
    let mut h = Harness::new().expect("load the program (run as root)");
    // One Service whose two endpoints get new addresses 2,500 times: 5,000 keys added, more
    // than the live ones plus the slack, so the applier rebuilds the filter on its own. Half
    // way, the applier is reopened (as the agent's periodic resync does): it must count the
    // stale bits it finds, or the rebuild would never come on a busy node.
    // (No grace for removed keys: this test cannot wait for it between changes.)
    let mut seen = BTreeSet::new();
    h.applier.set_filter_grace(Duration::ZERO);
    for round in 0..2_500u32 {
        if round == 1_250 {
            h.applier = Applier::open(&h.pin_dir).unwrap();
            h.applier.set_filter_grace(Duration::ZERO);
        }
        let [_, _, c, d] = (round * 2).to_be_bytes();
        let endpoints = [format!("10.250.{c}.{d}"), format!("10.250.{c}.{}", d + 1)];
        let refs: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        let desired = DesiredState {
            services: BTreeMap::from([(
                "ns/churn:80/TCP".to_string(),
                cluster_ip_service("10.96.0.50", 80, 8080, Protocol::Tcp, &refs),
            )]),
            ..DesiredState::default()
        };
        h.program(&desired).unwrap();
        seen.extend(refs.iter().map(|a| backend(a)));
    }
    let words = filter_words(&h);
    let set: u32 = words.iter().map(|w| w.count_ones()).sum();
    assert!(
        seen.len() > 4_000,
        "the churn added {} distinct bits",
        seen.len()
    );
    // Live: one frontend and two backends, plus whatever was added since the rebuild.
    assert!(
        (set as usize) < seen.len() / 2,
        "{set} bits set after the churn: stale ones were not cleared"
    );
    assert!(has(&words, frontend("10.96.0.50")));
}
