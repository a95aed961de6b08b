//! ICMP errors about translated flows, and packets that are cut short or inconsistent, through
//! BPF_PROG_TEST_RUN. Malformed packets are never translated: they pass untouched (the stack
//! drops them) and are counted.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_agent::model::{DesiredState, Protocol};
use lb_tests::packet::{
    checksum, icmp_error_frame, parse_checked, parse_icmp_checked, Flow, Harness, CLIENT_MAC,
    NODE_MAC, TCP_SYN, TC_ACT_OK, TC_ACT_UNSPEC,
};

const VIP: &str = "10.96.0.10";
const CLIENT: &str = "192.168.77.2";
const BACKEND: &str = "10.244.1.2";

/// VIP:53/UDP and VIP:80/TCP, one backend each (so the translation is predictable).
fn harness() -> Harness {
    let service = |port, target, protocol| {
        lb_tests::cluster_ip_service(VIP, port, target, protocol, &[BACKEND])
    };
    let state = DesiredState {
        services: BTreeMap::from([
            (
                "ns/svc:dns/UDP".to_string(),
                service(53, 5353, Protocol::Udp),
            ),
            (
                "ns/svc:http/TCP".to_string(),
                service(80, 8080, Protocol::Tcp),
            ),
        ]),
        ..Default::default()
    };
    let mut h = Harness::new().expect("load the program (run as root)");
    h.program(&state).unwrap();
    h
}

/// `quote` with an address (offset 12 or 16) and a port (offset 20 or 22) replaced and the
/// quoted IPv4 checksum recomputed; the quoted L4 checksum is left alone, as documented.
fn requote(quote: &[u8], addr_at: usize, addr: &str, port_at: usize, port: u16) -> Vec<u8> {
    let mut q = quote.to_vec();
    q[addr_at..addr_at + 4].copy_from_slice(&addr.parse::<Ipv4Addr>().unwrap().octets());
    q[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    q[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&q[..20], 0);
    q[10..12].copy_from_slice(&csum.to_be_bytes());
    q
}

fn addr(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

#[test]
fn backend_port_unreachable_reaches_the_client_as_the_vips() {
    let mut h = harness();
    let datagram = Flow::udp(CLIENT, 33000, VIP, 53);
    let out = h.run(&datagram.build()).unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    // What the backend received, and quotes back.
    let received = &out.packet[14..14 + 28];
    let error = icmp_error_frame(
        NODE_MAC,
        CLIENT_MAC,
        addr(BACKEND),
        addr(CLIENT),
        77,
        3,
        3,
        received,
    );
    let verdict = h.run(&error).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let expected_quote = requote(received, 16, VIP, 22, 53);
    let expected = icmp_error_frame(
        NODE_MAC,
        CLIENT_MAC,
        addr(VIP),
        addr(CLIENT),
        77,
        3,
        3,
        &expected_quote,
    );
    parse_icmp_checked(&verdict.packet).expect("checksums valid");
    assert_eq!(verdict.packet, expected, "byte for byte");
    // The client's own datagram header is what it now reads in the quote.
    assert_eq!(&expected_quote[..20], &datagram.ip_packet()[..20]);
    assert_eq!(h.counter("icmp_error_translated"), 1);
}

#[test]
fn router_fragmentation_needed_keeps_its_source_and_shows_the_vip_inside() {
    let mut h = harness();
    let syn = Flow::tcp(CLIENT, 33001, VIP, 80, TCP_SYN);
    let out = h.run(&syn.build()).unwrap();
    let received = out.packet[14..14 + 28].to_vec();
    let router = "10.244.1.1";
    let error = icmp_error_frame(
        NODE_MAC,
        CLIENT_MAC,
        addr(router),
        addr(CLIENT),
        9,
        3,
        4,
        &received,
    );
    let verdict = h.run(&error).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let expected_quote = requote(&received, 16, VIP, 22, 80);
    let expected = icmp_error_frame(
        NODE_MAC,
        CLIENT_MAC,
        addr(router),
        addr(CLIENT),
        9,
        3,
        4,
        &expected_quote,
    );
    assert_eq!(verdict.packet, expected);
}

#[test]
fn client_port_unreachable_about_a_reply_reaches_the_backend() {
    let mut h = harness();
    let datagram = Flow::udp(CLIENT, 33002, VIP, 53);
    h.run(&datagram.build()).unwrap();
    let reply = Flow::udp(BACKEND, 5353, CLIENT, 33002);
    let translated = h.run(&reply.build()).unwrap();
    assert_eq!(parse_checked(&translated.packet).unwrap().src, addr(VIP));
    let seen_by_client = &translated.packet[14..14 + 28];
    let error = icmp_error_frame(
        CLIENT_MAC,
        NODE_MAC,
        addr(CLIENT),
        addr(VIP),
        5,
        3,
        3,
        seen_by_client,
    );
    let verdict = h.run(&error).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let expected_quote = requote(seen_by_client, 12, BACKEND, 20, 5353);
    let expected = icmp_error_frame(
        CLIENT_MAC,
        NODE_MAC,
        addr(CLIENT),
        addr(BACKEND),
        5,
        3,
        3,
        &expected_quote,
    );
    assert_eq!(verdict.packet, expected);
    assert_eq!(
        &expected_quote[..20],
        &reply.ip_packet()[..20],
        "the backend's own header"
    );
}

#[test]
fn icmp_about_unknown_flows_and_other_icmp_pass_untouched() {
    let mut h = harness();
    let stranger = Flow::udp(CLIENT, 33003, "10.9.9.9", 53).ip_packet();
    let error = icmp_error_frame(
        NODE_MAC,
        CLIENT_MAC,
        addr("10.9.9.9"),
        addr(CLIENT),
        1,
        3,
        3,
        &stranger[..28],
    );
    let verdict = h.run(&error).unwrap();
    assert_eq!((verdict.action, verdict.packet), (TC_ACT_UNSPEC, error));
    // An echo request to the VIP (type 8) is not an error: not ours.
    let mut echo = icmp_error_frame(
        CLIENT_MAC,
        NODE_MAC,
        addr(CLIENT),
        addr(VIP),
        2,
        8,
        0,
        &[0; 28],
    );
    echo.truncate(14 + 20 + 8);
    let verdict = h.run(&echo).unwrap();
    assert_eq!(verdict.action, TC_ACT_UNSPEC);
    assert_eq!(h.counter("icmp_error_translated"), 0);
}

/// Expects `frame` to pass untouched.
fn untouched(h: &mut Harness, frame: &[u8], what: &str) {
    let verdict = h.run(frame).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(verdict.action, TC_ACT_UNSPEC, "{what}: not translated");
    assert_eq!(verdict.packet, frame, "{what}: not modified");
}

#[test]
fn fragments_pass_untouched() {
    let mut h = harness();
    let first = Flow {
        frag: 0x2000, // more fragments
        ..Flow::udp(CLIENT, 34000, VIP, 53)
    };
    untouched(&mut h, &first.build(), "first fragment");
    let later = Flow {
        frag: 100, // offset 800 bytes
        ..Flow::udp(CLIENT, 34000, VIP, 53)
    };
    untouched(&mut h, &later.build(), "later fragment");
    assert_eq!(h.counter("fragment_passed"), 2);
}

#[test]
fn cut_or_inconsistent_headers_pass_untouched_and_are_counted() {
    let mut h = harness();
    let syn = Flow::tcp(CLIENT, 35000, VIP, 80, TCP_SYN).build();
    let datagram = Flow::udp(CLIENT, 35000, VIP, 53).build();
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();

    let mut long_total = syn.clone();
    long_total[16..18].copy_from_slice(&1000u16.to_be_bytes());
    cases.push((long_total, "IPv4 total length beyond the frame"));
    let mut short_ihl = syn.clone();
    short_ihl[14] = 0x44;
    cases.push((short_ihl, "IPv4 header length 16"));
    let mut long_ihl = syn.clone();
    long_ihl[14] = 0x4f;
    cases.push((long_ihl, "IPv4 header longer than the packet's TCP"));
    let mut short_doff = syn.clone();
    short_doff[14 + 20 + 12] = 0x40;
    cases.push((short_doff, "TCP data offset 16"));
    let mut big_doff = syn.clone();
    big_doff[14 + 20 + 12] = 0xf0;
    cases.push((big_doff, "TCP data offset beyond the segment"));
    let mut cut_tcp = syn[..14 + 20 + 10].to_vec();
    cut_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push((cut_tcp, "TCP header cut after 10 bytes"));
    let mut long_udp = datagram.clone();
    long_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&500u16.to_be_bytes());
    cases.push((long_udp, "UDP length beyond the packet"));
    let mut short_udp = datagram.clone();
    short_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    cases.push((short_udp, "UDP length 4"));
    // (An IPv4 frame whose header says version 6 is refused by BPF_PROG_TEST_RUN itself.)

    let counted = cases.len() as u64;
    for (frame, what) in &cases {
        untouched(&mut h, frame, what);
    }
    assert_eq!(h.counter("malformed_passed"), counted);

    // A frame cut inside the IPv4 header is refused by BPF_PROG_TEST_RUN itself (EINVAL);
    // the parser returns "malformed" for it as for the cases above.
    assert_eq!(h.counter("new_flow"), 0, "nothing was ever translated");
}

#[test]
fn ethernet_padding_after_the_ip_packet_is_not_an_error() {
    let mut h = harness();
    let datagram = Flow {
        payload: b"hi".to_vec(),
        ..Flow::udp(CLIENT, 36000, VIP, 53)
    };
    let mut frame = datagram.build();
    frame.resize(60, 0); // minimum Ethernet frame
    let verdict = h.run(&frame).unwrap();
    assert_eq!(verdict.action, TC_ACT_OK);
    let mut expected = Flow {
        dst: addr(BACKEND),
        dport: 5353,
        ..datagram
    }
    .build();
    expected.resize(60, 0);
    assert_eq!(verdict.packet, expected);
}
