//! Fuzzing `lb_ingress` through BPF_PROG_TEST_RUN: random frames, and valid ones mutated (cut
//! short, bad lengths, IP options, fragments, odd protocols, bad TCP data offsets, bit flips,
//! VLAN tags, other ethertypes). Every run must succeed with a known verdict. A frame may only
//! change when it is a well-formed packet the datapath owns (a new flow to a frontend, a tracked
//! flow or its reply, an ICMP error about a tracked flow, the answer rejecting a frontend
//! without backends), and then only in the fields that translation names, with every checksum
//! adding up as it did before (computed here, pseudo header included).
//!
//! `LB_FUZZ_CASES` sets the number of frames (default [`DEFAULT_CASES`]); `LB_FUZZ_SEED` the
//! seed (default: a fresh one, printed, so each run explores new frames). The kernel picks
//! backends at random, so a failure deep into a run may not recur from the seed alone: the
//! failure message carries the frame and the conntrack entry it met.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    ops::Range,
    path::Path,
};

use lb_agent::{
    loader::DatapathSettings,
    manifest::{parse_into, Manifests},
    maps::{open_conntrack, ConntrackMap},
    model::{desired_state, DesiredState, FrontendKind, Ipv4Prefix, Settings},
};
use lb_common::{ct_other_half, CtKey, CtValue, CT_REPLY};
use lb_tests::packet::{
    checksum, icmp_error_frame, Flow, Harness, Verdict, BPF_F_TEST_SKB_CHECKSUM_COMPLETE, ETH_HLEN,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
};
use rand::{rngs::StdRng, seq::IndexedRandom, Rng, SeedableRng};

/// About 8 s in a debug build on a 2-CPU VM; `cargo xtask fuzz` asks for far more.
const DEFAULT_CASES: u64 = 150_000;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// Inside the LoadBalancer's source range, outside it, and the backends themselves (hairpin).
const CLIENTS: [Ipv4Addr; 5] = [
    Ipv4Addr::new(192, 168, 77, 2),
    Ipv4Addr::new(192, 168, 77, 3),
    Ipv4Addr::new(10, 1, 1, 1),
    LOCAL_BACKEND,
    REMOTE_BACKEND,
];

/// One Service with a ClusterIP, NodePorts (on this node's address) and a source-restricted
/// LoadBalancer IP, TCP and UDP, one endpoint here and one on another node (so external
/// traffic to it is source-NATed); and one Service without endpoints (rejected).
const MANIFESTS: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: fuzz}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  loadBalancerSourceRanges: [192.168.77.0/24]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}
status: {loadBalancer: {ingress: [{ip: 203.0.113.10}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: fuzz, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.2.2], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: fuzz}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: tcp, port: 80}, {name: udp, port: 53, protocol: UDP}]
";

fn desired() -> DesiredState {
    let mut m = Manifests::default();
    parse_into(Path::new("fuzz.yaml"), MANIFESTS, &mut m);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let settings = Settings {
        node_name: "node-a".into(),
        node_addresses: vec![NODE],
        ..Settings::default()
    };
    let state = desired_state(&m.services, &m.endpoint_slices, &settings);
    assert!(state.errors.is_empty(), "{:?}", state.errors);
    state
}

/// What the test knows of a frontend, from the same desired state the maps are programmed with.
#[derive(Debug)]
struct Frontend {
    backends: Vec<(Ipv4Addr, u16)>,
    /// Not a ClusterIP: traffic to a remote endpoint is source-NATed.
    external: bool,
    /// `loadBalancerSourceRanges`, which restrict LoadBalancer frontends only.
    source_ranges: Option<Vec<Ipv4Prefix>>,
}

impl Frontend {
    fn admits(&self, client: Ipv4Addr) -> bool {
        let within = |p: &Ipv4Prefix| {
            let mask = u32::MAX.checked_shl(32 - u32::from(p.len)).unwrap_or(0);
            u32::from(client) & mask == u32::from(p.addr) & mask
        };
        self.source_ranges
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(within))
    }
}

struct Model {
    /// (address, port, protocol); ordered, so that a seed always draws the same frontends.
    frontends: BTreeMap<(Ipv4Addr, u16, u8), Frontend>,
    remote: BTreeSet<(Ipv4Addr, u16)>,
    hairpin: Ipv4Addr,
    snat: Ipv4Addr,
}

impl Model {
    fn new(state: &DesiredState, settings: &DatapathSettings) -> Self {
        let mut frontends = BTreeMap::new();
        for service in state.services.values() {
            for f in &service.frontends {
                let backends = service.backends.iter().map(|b| (b.addr, b.port)).collect();
                let restricted = f.kind == FrontendKind::LoadBalancer;
                let frontend = Frontend {
                    backends,
                    external: f.kind != FrontendKind::ClusterIP,
                    source_ranges: restricted
                        .then(|| service.source_ranges.clone())
                        .flatten()
                        .map(|ranges| ranges.into_iter().collect()),
                };
                frontends.insert((f.addr, f.port, f.protocol.number()), frontend);
            }
        }
        Self {
            frontends,
            remote: state
                .remote_backends
                .iter()
                .map(|b| (b.addr, b.port))
                .collect(),
            hairpin: settings.hairpin_addr,
            snat: settings.snat_addr.expect("source NAT configured"),
        }
    }

    fn frontend(&self, l: &L4) -> Option<&Frontend> {
        self.frontends.get(&(l.ip.dst, l.dport, l.ip.proto))
    }
}

// ---- Reading frames, the way the datapath's documentation says it reads them ----

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

fn addr(p: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3])
}

fn put16(p: &mut [u8], at: usize, value: u16) {
    p[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

#[derive(Clone, Copy, Debug)]
struct Ip {
    ihl: usize,
    total: usize,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

/// An IPv4 packet the datapath may act on: version 4, header and total lengths consistent with
/// each other and the frame (which may be longer: Ethernet padding), not a fragment.
fn ipv4(p: &[u8]) -> Option<Ip> {
    if p.len() < ETH_HLEN + 20 || be16(p, 12) != 0x0800 || p[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[14] & 0x0f) * 4;
    let total = usize::from(be16(p, 16));
    if ihl < 20 || total < ihl || ETH_HLEN + total > p.len() || be16(p, 20) & 0x3fff != 0 {
        return None;
    }
    Some(Ip {
        ihl,
        total,
        proto: p[23],
        src: addr(p, 26),
        dst: addr(p, 30),
    })
}

#[derive(Clone, Copy, Debug)]
struct L4 {
    ip: Ip,
    off: usize,
    sport: u16,
    dport: u16,
    flags: u8,
    /// TCP header length (data offset).
    hlen: usize,
    /// Bytes the L4 checksum covers (TCP: the segment; UDP: its length field), and where the
    /// checksum sits.
    csum_len: usize,
    csum_at: usize,
}

/// A TCP or UDP header wholly inside the IPv4 packet, with a possible length.
fn l4(p: &[u8], ip: Ip) -> Option<L4> {
    let off = ETH_HLEN + ip.ihl;
    let len = ip.total - ip.ihl;
    let (flags, hlen, csum_len, csum_at) = match ip.proto {
        PROTO_TCP if len >= 20 => {
            let doff = usize::from(p[off + 12] >> 4) * 4;
            if doff < 20 || doff > len {
                return None;
            }
            (p[off + 13], doff, len, off + 16)
        }
        PROTO_UDP if len >= 8 => {
            let udp_len = usize::from(be16(p, off + 4));
            if udp_len < 8 || udp_len > len {
                return None;
            }
            (0, 8, udp_len, off + 6)
        }
        _ => return None,
    };
    Some(L4 {
        ip,
        off,
        sport: be16(p, off),
        dport: be16(p, off + 2),
        flags,
        hlen,
        csum_len,
        csum_at,
    })
}

fn flow_key(l: &L4) -> CtKey {
    CtKey {
        src_addr: l.ip.src.octets(),
        dst_addr: l.ip.dst.octets(),
        src_port: l.sport,
        dst_port: l.dport,
        proto: l.ip.proto,
        _pad: [0; 3],
    }
}

#[derive(Clone, Copy, Debug)]
struct IcmpError {
    ip: Ip,
    off: usize,
    inner: usize,
    /// The flow the error is about: the quoted packet's, the other way round.
    key: CtKey,
}

/// An ICMP destination unreachable, time exceeded or parameter problem quoting a TCP/UDP
/// packet (plain 20-byte header and ports), the quote inside the IPv4 packet.
fn icmp_error(p: &[u8], ip: Ip) -> Option<IcmpError> {
    let off = ETH_HLEN + ip.ihl;
    if ip.proto != PROTO_ICMP || ip.total - ip.ihl < 8 + 20 + 4 || !matches!(p[off], 3 | 11 | 12) {
        return None;
    }
    let inner = off + 8;
    let proto = p[inner + 9];
    if p[inner] != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    Some(IcmpError {
        ip,
        off,
        inner,
        key: CtKey {
            src_addr: addr(p, inner + 16).octets(),
            dst_addr: addr(p, inner + 12).octets(),
            src_port: be16(p, inner + 22),
            dst_port: be16(p, inner + 20),
            proto,
            _pad: [0; 3],
        },
    })
}

/// Inputs BPF_PROG_TEST_RUN itself refuses (EINVAL) before the program runs: shorter than an
/// Ethernet header, or an IPv4 / IPv6 ethertype without room for that header (kernels since
/// "bpf: reject short IPv4/IPv6 inputs in bpf_prog_test_run_skb"; older ones run them).
fn kernel_refuses(p: &[u8]) -> bool {
    p.len() < ETH_HLEN
        || (be16(p, 12) == 0x0800 && p.len() < ETH_HLEN + 20)
        || (be16(p, 12) == 0x86dd && p.len() < ETH_HLEN + 40)
}

// ---- Checksums, computed here ----

/// `checksum` over a region that holds its own checksum: 0 when it adds up. Both zeros of
/// one's complement count as 0, as they do for a receiver.
fn residual(data: &[u8], initial: u32) -> u16 {
    match checksum(data, initial) {
        0xffff => 0,
        r => r,
    }
}

fn ip_residual(p: &[u8], ip: &Ip) -> u16 {
    residual(&p[ETH_HLEN..ETH_HLEN + ip.ihl], 0)
}

/// TCP/UDP checksum residual: pseudo header (addresses as in `p`, protocol, length) and the
/// bytes the checksum covers.
fn l4_residual(p: &[u8], l: &L4) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[26..34]);
    pseudo[9] = l.ip.proto;
    pseudo[10..12].copy_from_slice(&(l.csum_len as u16).to_be_bytes());
    let partial = u32::from(!checksum(&pseudo, 0));
    residual(&p[l.off..l.off + l.csum_len], partial)
}

/// Recomputes the IPv4 header checksum (over the header length the frame claims, at least 20
/// bytes, at most what the frame holds).
fn fix_ip_csum(p: &mut [u8]) {
    if p.len() < ETH_HLEN + 20 {
        return;
    }
    let ihl = (usize::from(p[14] & 0x0f) * 4).max(20);
    let end = (ETH_HLEN + ihl).min(p.len());
    p[24..26].copy_from_slice(&[0, 0]);
    let csum = checksum(&p[ETH_HLEN..end], 0);
    put16(p, 24, csum);
}

// ---- Running and judging one frame ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Refused,
    Untouched,
    Dropped,
    NewFlow,
    Forward,
    Reply,
    IcmpTranslated,
    Reject,
}

struct Failure {
    reason: String,
    verdict: Option<Verdict>,
    before: Option<CtValue>,
}

fn fail<T>(reason: impl Into<String>) -> Result<T, String> {
    Err(reason.into())
}

/// Fails unless `inp` and `out` differ only inside `allowed`.
fn only_changed(inp: &[u8], out: &[u8], allowed: &[Range<usize>]) -> Result<(), String> {
    if inp.len() != out.len() {
        return fail(format!(
            "a translation changed the length: {} -> {} bytes",
            inp.len(),
            out.len()
        ));
    }
    match (0..inp.len()).find(|&i| inp[i] != out[i] && !allowed.iter().any(|r| r.contains(&i))) {
        Some(i) => fail(format!("byte {i} changed outside the translated fields")),
        None => Ok(()),
    }
}

fn same_residual(what: &str, before: u16, after: u16) -> Result<(), String> {
    if before != after {
        let broke = if before == 0 {
            "was right, now wrong"
        } else {
            "was wrong, now wrong differently"
        };
        return fail(format!(
            "{what} checksum {broke} (residual {before:#06x} -> {after:#06x})"
        ));
    }
    Ok(())
}

struct Fuzz {
    h: Harness,
    ct: ConntrackMap,
    model: Model,
    rng: StdRng,
    /// Translated client packets as their backends receive them, and translated replies as
    /// their clients receive them: material for replies and ICMP errors.
    forwarded: Vec<Vec<u8>>,
    replied: Vec<Vec<u8>>,
    stats: BTreeMap<Class, u64>,
    checksum_complete_runs: u64,
}

impl Fuzz {
    fn new(seed: u64) -> Self {
        let settings = DatapathSettings {
            snat_addr: Some(NODE),
            ..DatapathSettings::default()
        };
        let state = desired();
        let mut h = Harness::with_settings(&settings).expect("load the program (run as root)");
        h.program(&state).expect("program the maps");
        let ct = open_conntrack(&h.pin_dir).expect("open conntrack");
        // The program is loaded on first run; do it now so run_with_flags finds it.
        h.run(&Flow::udp("10.9.9.9", 1, "10.9.9.8", 1).build())
            .expect("first run");
        Self {
            h,
            ct,
            model: Model::new(&state, &settings),
            rng: StdRng::seed_from_u64(seed),
            forwarded: Vec::new(),
            replied: Vec::new(),
            stats: BTreeMap::new(),
            checksum_complete_runs: 0,
        }
    }

    fn lookup(&self, key: &CtKey) -> Option<CtValue> {
        self.ct.get(key, 0).ok()
    }

    /// Whether the reply tuple `backend -> client` belongs to a flow other than `l`'s.
    fn held_by_another(&self, l: &L4, backend: (Ipv4Addr, u16), client: (Ipv4Addr, u16)) -> bool {
        let reply = CtKey {
            src_addr: backend.0.octets(),
            dst_addr: client.0.octets(),
            src_port: backend.1,
            dst_port: client.1,
            proto: l.ip.proto,
            _pad: [0; 3],
        };
        self.lookup(&reply).is_some_and(|held| {
            held.direction == CT_REPLY && ct_other_half(&reply, &held) != flow_key(l)
        })
    }

    /// Runs `frame` (in CHECKSUM_COMPLETE state when `complete`) and judges the result.
    fn run_case(&mut self, frame: &[u8], complete: bool) -> Result<Class, Box<Failure>> {
        let ip = ipv4(frame);
        let l = ip.and_then(|ip| l4(frame, ip));
        let icmp = ip.and_then(|ip| icmp_error(frame, ip));
        let key = l.map(|l| flow_key(&l)).or(icmp.map(|e| e.key));
        let before = key.and_then(|k| self.lookup(&k));
        let failure = |reason: String, verdict: Option<Verdict>| {
            Box::new(Failure {
                reason,
                verdict,
                before,
            })
        };
        let flags = if complete {
            self.checksum_complete_runs += 1;
            BPF_F_TEST_SKB_CHECKSUM_COMPLETE
        } else {
            0
        };
        let verdict = match self.h.run_with_flags(frame, flags) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && kernel_refuses(frame) => {
                return Ok(Class::Refused)
            }
            // The kernel's CHECKSUM_COMPLETE check compares skb->csum with the packet whatever
            // the skb's state. A reject answer is built with bpf_skb_change_tail, which turns
            // the skb CHECKSUM_NONE when the length changes (the check then misfires), and
            // written whole with bpf_skb_store_bytes, leaving skb->csum stale when it does not
            // (harmless: the answer leaves by egress, where CHECKSUM_COMPLETE means nothing).
            // So reject answers are exempt here, and judged in full from a CHECKSUM_NONE run.
            // (CHECKSUM_PARTIAL, the caveat of docs/datapath.md, cannot be made by test runs.)
            Err(e) if complete && e.raw_os_error() == Some(libc::EBADMSG) => {
                let v = self
                    .h
                    .run_with_flags(frame, 0)
                    .map_err(|e| failure(format!("BPF_PROG_TEST_RUN failed: {e}"), None))?;
                return match self.judge(frame, &v, ip, l, icmp, before) {
                    Ok(Class::Reject) => Ok(Class::Reject),
                    Ok(class) => Err(failure(
                        format!("skb->csum left out of step with the packet ({class:?})"),
                        Some(v),
                    )),
                    Err(reason) => Err(failure(reason, Some(v))),
                };
            }
            Err(e) => return Err(failure(format!("BPF_PROG_TEST_RUN failed: {e}"), None)),
        };
        match self.judge(frame, &verdict, ip, l, icmp, before) {
            Ok(class) => {
                let keep = match class {
                    Class::NewFlow | Class::Forward => Some(&mut self.forwarded),
                    Class::Reply => Some(&mut self.replied),
                    _ => None,
                };
                if let Some(list) = keep {
                    remember(&mut self.rng, list, verdict.packet);
                }
                Ok(class)
            }
            Err(reason) => Err(failure(reason, Some(verdict))),
        }
    }

    fn judge(
        &self,
        inp: &[u8],
        v: &Verdict,
        ip: Option<Ip>,
        l: Option<L4>,
        icmp: Option<IcmpError>,
        before: Option<CtValue>,
    ) -> Result<Class, String> {
        if ![TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&v.action) {
            return fail(format!("unknown verdict {}", v.action));
        }
        if v.action == TC_ACT_UNSPEC {
            if v.packet != inp {
                return fail("passed on (TC_ACT_UNSPEC) but modified");
            }
            // Every well-formed packet to a frontend gets a verdict of the datapath's own.
            if let Some(f) = l.and_then(|l| self.model.frontend(&l).map(|_| l)) {
                return fail(format!(
                    "a packet to frontend {}:{} passed untranslated",
                    f.ip.dst, f.dport
                ));
            }
            return Ok(Class::Untouched);
        }
        if v.action == TC_ACT_SHOT && self.h.counter("drop_rewrite") != 0 {
            return fail("dropped after a rewrite helper failed (drop_rewrite)");
        }
        if let Some(l) = l {
            let Some(frontend) = self.model.frontend(&l) else {
                if before.is_none() {
                    return fail(format!(
                        "took a packet to {}:{} (not a frontend, no tracked flow)",
                        l.ip.dst, l.dport
                    ));
                }
                return self.judge_translation(inp, v, &l, before);
            };
            if frontend.backends.is_empty() {
                return judge_reject(inp, v, &l);
            }
            let admitted = frontend.admits(l.ip.src);
            if v.action == TC_ACT_SHOT {
                // Outside the source ranges, or, external traffic to a remote endpoint, no
                // source NAT port left.
                let no_port = frontend.external && !self.model.remote.is_empty();
                if admitted && !no_port {
                    return fail("dropped a packet to a frontend that admits its client");
                }
                return Ok(Class::Dropped);
            }
            if !admitted && before.is_none() {
                return fail(format!(
                    "a client outside {}'s source ranges got through",
                    l.ip.dst
                ));
            }
            return self.judge_translation(inp, v, &l, before);
        }
        if let Some(e) = icmp {
            return self.judge_icmp(inp, v, &e, before);
        }
        fail(format!(
            "took a frame that is no well-formed TCP/UDP packet or ICMP error ({})",
            match ip {
                Some(ip) => format!("IPv4 protocol {}", ip.proto),
                None => "not IPv4, malformed or a fragment".to_string(),
            }
        ))
    }

    /// A TCP/UDP packet translated: new flow to a frontend, a tracked flow, or a reply.
    fn judge_translation(
        &self,
        inp: &[u8],
        v: &Verdict,
        l: &L4,
        before: Option<CtValue>,
    ) -> Result<Class, String> {
        let out = &v.packet;
        let mut allowed = vec![24..34, l.off..l.off + 4, l.csum_at..l.csum_at + 2];
        if v.action == TC_ACT_REDIRECT {
            allowed.push(0..12);
        }
        only_changed(inp, out, &allowed)?;
        let ip_before = ip_residual(inp, &l.ip);
        same_residual("IPv4 header", ip_before, ip_residual(out, &l.ip))?;
        if l.ip.proto == PROTO_UDP && be16(inp, l.csum_at) == 0 {
            if be16(out, l.csum_at) != 0 {
                return fail("a UDP datagram without checksum got one");
            }
        } else {
            if l.ip.proto == PROTO_UDP && be16(out, l.csum_at) == 0 {
                return fail("a UDP checksum became 0 (\"none\")");
            }
            same_residual("L4", l4_residual(inp, l), l4_residual(out, l))?;
        }

        let src = (addr(out, 26), be16(out, l.off));
        let dst = (addr(out, 30), be16(out, l.off + 2));
        let macs_kept = out[..12] == inp[..12];
        let plain = v.action == TC_ACT_OK && macs_kept;
        let keep = |port: u16, or: u16| if port != 0 { port } else { or };
        // A tracked flow gets its entry's translation. Only here may a destination that is no
        // frontend change: a reply whose client was source-NATed gets its address back.
        if let Some(e) = before {
            let snat = e.snat_addr != [0; 4];
            if e.direction == CT_REPLY {
                let want_dst = if snat {
                    (e.snat_addr.into(), keep(e.snat_port, l.dport))
                } else {
                    (l.ip.dst, l.dport)
                };
                let macs = if e.return_ifindex != 0 {
                    v.action == TC_ACT_REDIRECT
                        && out[..6] == e.return_dst_mac
                        && out[6..12] == e.return_src_mac
                } else {
                    plain
                };
                if src == (e.nat_addr.into(), e.nat_port) && dst == want_dst && macs {
                    return Ok(Class::Reply);
                }
            } else {
                let want_src = if snat {
                    (e.snat_addr.into(), keep(e.snat_port, l.sport))
                } else {
                    (l.ip.src, l.sport)
                };
                if dst == (e.nat_addr.into(), e.nat_port)
                    && src == want_src
                    && (plain || self.redirect_after_snat(v, e.snat_addr.into()))
                {
                    return Ok(Class::Forward);
                }
            }
        }
        // A new flow (or one whose entry expired): one of the frontend's backends; the
        // client's address kept, or the hairpin address for a pod reaching itself, or this
        // node's for external traffic to a remote endpoint. It may also get another port
        // (32768..61000) when the client's is taken: always possible for external traffic to
        // a remote endpoint (many clients share the node's address), else only when another
        // flow holds the reply tuple the client's own port would give.
        if let Some(f) = self.model.frontend(l) {
            if f.backends.contains(&dst) {
                let remote_external = f.external && self.model.remote.contains(&dst);
                let want = if dst.0 == l.ip.src {
                    self.model.hairpin
                } else if remote_external {
                    self.model.snat
                } else {
                    l.ip.src
                };
                let port_ok = src.1 == l.sport
                    || ((32_768..61_000).contains(&src.1)
                        && (remote_external || self.held_by_another(l, dst, (want, l.sport))));
                if src.0 == want && port_ok && (plain || self.redirect_after_snat(v, src.0)) {
                    return Ok(Class::NewFlow);
                }
            }
        }
        fail(format!(
            "translation {}:{} -> {}:{} became {}:{} -> {}:{} ({}), not what the frontend or \
             the tracked flow allows",
            l.ip.src, l.sport, l.ip.dst, l.dport, src.0, src.1, dst.0, dst.1, v.action
        ))
    }

    /// Source-NATed to this node, a packet goes to the FIB's next hop: redirected, with that
    /// hop's Ethernet addresses (which depend on this machine's routes).
    fn redirect_after_snat(&self, v: &Verdict, snat: Ipv4Addr) -> bool {
        v.action == TC_ACT_REDIRECT && snat == self.model.snat
    }

    /// An ICMP error about a tracked flow, translated like the flow it quotes.
    fn judge_icmp(
        &self,
        inp: &[u8],
        v: &Verdict,
        e: &IcmpError,
        before: Option<CtValue>,
    ) -> Result<Class, String> {
        let Some(ct) = before else {
            return fail("translated an ICMP error about an untracked flow");
        };
        if v.action == TC_ACT_SHOT {
            return fail("dropped an ICMP error");
        }
        let out = &v.packet;
        let mut allowed = vec![24..34, e.off + 2..e.off + 4, e.inner + 10..e.inner + 24];
        if v.action == TC_ACT_REDIRECT {
            allowed.push(0..12);
        }
        only_changed(inp, out, &allowed)?;
        same_residual(
            "IPv4 header",
            ip_residual(inp, &e.ip),
            ip_residual(out, &e.ip),
        )?;
        let icmp_end = ETH_HLEN + e.ip.total;
        same_residual(
            "ICMP",
            residual(&inp[e.off..icmp_end], 0),
            residual(&out[e.off..icmp_end], 0),
        )?;
        let inner = e.inner..e.inner + 20;
        same_residual(
            "quoted IPv4 header",
            residual(&inp[inner.clone()], 0),
            residual(&out[inner], 0),
        )?;

        // (outer src, outer dst, quoted src, quoted dst, quoted sport, quoted dport)
        let fields = |p: &[u8]| {
            (
                addr(p, 26),
                addr(p, 30),
                addr(p, e.inner + 12),
                addr(p, e.inner + 16),
                be16(p, e.inner + 20),
                be16(p, e.inner + 22),
            )
        };
        let (osrc, odst, qsrc, qdst, qsport, qdport) = fields(inp);
        let nat: Ipv4Addr = ct.nat_addr.into();
        let snat: Ipv4Addr = ct.snat_addr.into();
        let has_snat = ct.snat_addr != [0; 4];
        let keep = |port: u16, or: u16| if port != 0 { port } else { or };
        let want = if ct.direction == CT_REPLY {
            // The client's packet bounced at (or on the way to) the backend: the client sees
            // the frontend, and its own address if it was source-NATed.
            let osrc2 = if osrc == qdst { nat } else { osrc };
            if has_snat {
                (
                    osrc2,
                    snat,
                    snat,
                    nat,
                    keep(ct.snat_port, qsport),
                    ct.nat_port,
                )
            } else {
                (osrc2, odst, qsrc, nat, qsport, ct.nat_port)
            }
        } else {
            // The backend's reply bounced at the client: the backend sees itself.
            let odst2 = if odst == qsrc { nat } else { odst };
            if has_snat {
                (
                    snat,
                    odst2,
                    nat,
                    snat,
                    ct.nat_port,
                    keep(ct.snat_port, qdport),
                )
            } else {
                (osrc, odst2, nat, qdst, ct.nat_port, qdport)
            }
        };
        if fields(out) != want {
            return fail(format!(
                "ICMP error translated to {:?}, the tracked flow says {want:?}",
                fields(out)
            ));
        }
        let macs = if ct.direction == CT_REPLY && ct.return_ifindex != 0 {
            v.action == TC_ACT_REDIRECT
                && out[..6] == ct.return_dst_mac
                && out[6..12] == ct.return_src_mac
        } else {
            v.action == TC_ACT_OK && out[..12] == inp[..12]
        };
        if !macs {
            return fail("ICMP error sent with the wrong verdict or Ethernet addresses");
        }
        Ok(Class::IcmpTranslated)
    }
}

/// A new flow to a frontend without backends: a TCP reset or an ICMP port unreachable, exact
/// to the byte; a reset or a datagram with IP options is dropped instead.
fn judge_reject(inp: &[u8], v: &Verdict, l: &L4) -> Result<Class, String> {
    let expected = if l.ip.proto == PROTO_TCP {
        if l.flags & TCP_RST != 0 {
            None
        } else {
            let (seq, ack) = (be32(inp, l.off + 4), be32(inp, l.off + 8));
            let payload = (l.ip.total - l.ip.ihl - l.hlen) as u32;
            let acked = l.flags & TCP_ACK != 0;
            let consumed =
                payload + u32::from(l.flags & TCP_SYN != 0) + u32::from(l.flags & TCP_FIN != 0);
            let mut rst = Flow::tcp("0.0.0.0", l.dport, "0.0.0.0", l.sport, TCP_RST);
            rst.src = l.ip.dst;
            rst.dst = l.ip.src;
            rst.src_mac = inp[..6].try_into().expect("6 bytes");
            rst.dst_mac = inp[6..12].try_into().expect("6 bytes");
            rst.ip_id = 0;
            rst.tcp_flags = if acked { TCP_RST } else { TCP_RST | TCP_ACK };
            rst.seq = if acked { ack } else { 0 };
            rst.ack = if acked { 0 } else { seq.wrapping_add(consumed) };
            rst.window = 0;
            rst.payload.clear();
            Some(rst.build())
        }
    } else if l.ip.ihl != 20 {
        None
    } else {
        Some(icmp_error_frame(
            inp[..6].try_into().expect("6 bytes"),
            inp[6..12].try_into().expect("6 bytes"),
            l.ip.dst,
            l.ip.src,
            0,
            3,
            3,
            &inp[ETH_HLEN..ETH_HLEN + 28],
        ))
    };
    let Some(expected) = expected else {
        return match v.action {
            TC_ACT_SHOT => Ok(Class::Dropped),
            other => fail(format!("expected a drop (no answer to this), got {other}")),
        };
    };
    if v.action != TC_ACT_REDIRECT || v.packet != expected {
        return fail(format!(
            "expected the reject answer {} (TC_ACT_REDIRECT)",
            hex(&expected)
        ));
    }
    // Built from scratch above; still, its checksums computed independently of the builder.
    let out = &v.packet;
    let ip = ipv4(out).ok_or("the answer is no IPv4 packet")?;
    let l4_ok = match l4(out, ip) {
        Some(rst) => l4_residual(out, &rst) == 0,
        None => residual(&out[ETH_HLEN + 20..], 0) == 0,
    };
    if ip_residual(out, &ip) != 0 || !l4_ok {
        return fail("the reject answer has a wrong checksum");
    }
    Ok(Class::Reject)
}

fn remember(rng: &mut StdRng, list: &mut Vec<Vec<u8>>, packet: Vec<u8>) {
    const KEEP: usize = 64;
    if list.len() < KEEP {
        list.push(packet);
    } else {
        list[rng.random_range(0..KEEP)] = packet;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- Making frames ----

fn build(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Flow {
    let mut f = if proto == PROTO_TCP {
        Flow::tcp("0.0.0.0", sport, "0.0.0.0", dport, flags)
    } else {
        Flow::udp("0.0.0.0", sport, "0.0.0.0", dport)
    };
    f.src = src;
    f.dst = dst;
    f
}

impl Fuzz {
    fn payload(&mut self) -> Vec<u8> {
        let len = if self.rng.random_bool(0.1) {
            self.rng.random_range(0..1400)
        } else {
            self.rng.random_range(0..40)
        };
        (0..len).map(|_| self.rng.random()).collect()
    }

    fn tcp_flags(&mut self) -> u8 {
        *[
            TCP_SYN,
            TCP_SYN,
            TCP_ACK,
            TCP_ACK,
            TCP_SYN | TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_RST | TCP_ACK,
            self.rng.random(),
        ]
        .choose(&mut self.rng)
        .expect("non-empty")
    }

    /// A client port from a small range, so that flows recur (known flows, replies).
    fn client_port(&mut self) -> u16 {
        if self.rng.random_bool(0.9) {
            40_000 + self.rng.random_range(0..48)
        } else {
            self.rng.random()
        }
    }

    fn client(&mut self) -> Ipv4Addr {
        if self.rng.random_bool(0.9) {
            *CLIENTS.choose(&mut self.rng).expect("non-empty")
        } else {
            Ipv4Addr::from(self.rng.random::<u32>())
        }
    }

    fn flow_to(&mut self, dst: Ipv4Addr, dport: u16, proto: u8) -> Flow {
        let (src, sport, flags) = (self.client(), self.client_port(), self.tcp_flags());
        let mut f = build(proto, src, sport, dst, dport, flags);
        f.seq = self.rng.random();
        f.ack = self.rng.random();
        f.ip_id = self.rng.random();
        f.payload = self.payload();
        f
    }

    fn frontend_packet(&mut self) -> Vec<u8> {
        let keys: Vec<_> = self.model.frontends.keys().copied().collect();
        let (dst, dport, proto) = *keys.choose(&mut self.rng).expect("frontends");
        self.flow_to(dst, dport, proto).build()
    }

    fn stray_packet(&mut self) -> Vec<u8> {
        let targets = [
            (CLUSTER_IP, 81, PROTO_TCP),
            (CLUSTER_IP, 80, PROTO_UDP),
            (CLUSTER_IP, 53, PROTO_TCP),
            (NODE, 30081, PROTO_TCP),
            (NODE, 22, PROTO_TCP),
            (LB_IP, 30080, PROTO_TCP),
            (EMPTY_IP, 81, PROTO_UDP),
            (Ipv4Addr::new(10, 96, 0, 11), 80, PROTO_TCP),
            (LOCAL_BACKEND, 8080, PROTO_TCP),
            (REMOTE_BACKEND, 5353, PROTO_UDP),
        ];
        let (dst, dport, proto) = if self.rng.random_bool(0.8) {
            *targets.choose(&mut self.rng).expect("non-empty")
        } else {
            let proto = if self.rng.random() {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            (
                Ipv4Addr::from(self.rng.random::<u32>()),
                self.rng.random(),
                proto,
            )
        };
        self.flow_to(dst, dport, proto).build()
    }

    /// A backend answering a packet it received translated.
    fn reply(&mut self) -> Option<Vec<u8>> {
        let seen = self.forwarded.choose(&mut self.rng)?.clone();
        let l = l4(&seen, ipv4(&seen)?)?;
        let flags = *[TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST]
            .choose(&mut self.rng)
            .expect("non-empty");
        let mut f = build(l.ip.proto, l.ip.dst, l.dport, l.ip.src, l.sport, flags);
        f.src_mac = [0x02, 0, 0, 0, 0, 0xbb];
        f.dst_mac = [0x02, 0, 0, 0, 0, 0xcc];
        f.payload = self.payload();
        Some(f.build())
    }

    /// An ICMP error quoting a translated packet: from its backend or a router on the way
    /// (about a client's packet), or from the client (about a reply).
    fn icmp_about_flow(&mut self) -> Option<Vec<u8>> {
        let about_reply = self.rng.random_bool(0.3);
        let list = if about_reply {
            &self.replied
        } else {
            &self.forwarded
        };
        let seen = list.choose(&mut self.rng)?.clone();
        let ip = &seen[ETH_HLEN..];
        // From the packet's receiver, or a router on a client packet's way.
        let from = if about_reply || self.rng.random_bool(0.7) {
            addr(&seen, 30)
        } else {
            ROUTER
        };
        let to = addr(&seen, 26);
        // RFC 792's header + 8 bytes (with options, if any), or as much as RFC 1812 allows.
        let quote_len = *[28, usize::from(ip[0] & 0x0f) * 4 + 8, ip.len().min(548)]
            .choose(&mut self.rng)
            .expect("non-empty");
        let (icmp_type, code) = *[(3, 3), (3, 4), (3, 1), (11, 0), (12, 0)]
            .choose(&mut self.rng)
            .expect("non-empty");
        let id = self.rng.random();
        Some(icmp_error_frame(
            [0x02, 0, 0, 0, 0, 0xbb],
            [0x02, 0, 0, 0, 0, 0xcc],
            from,
            to,
            id,
            icmp_type,
            code,
            &ip[..quote_len.min(ip.len())],
        ))
    }

    /// ICMP whose quote is garbage, or a plausible header with fields drawn from the test's
    /// addresses (so some land on tracked flows), or no error at all (echo, other types).
    fn icmp_other(&mut self) -> Vec<u8> {
        let icmp_type = if self.rng.random_bool(0.7) {
            *[3, 11, 12].choose(&mut self.rng).expect("non-empty")
        } else {
            self.rng.random()
        };
        let mut quote: Vec<u8> = (0..self.rng.random_range(0..64))
            .map(|_| self.rng.random())
            .collect();
        if quote.len() >= 24 && self.rng.random_bool(0.6) {
            quote[0] = 0x45;
            quote[9] = if self.rng.random() {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            let (a, b) = (self.client(), self.client());
            quote[12..16].copy_from_slice(&a.octets());
            quote[16..20].copy_from_slice(&b.octets());
        }
        let (src, dst) = (self.client(), self.client());
        let (code, id) = (self.rng.random(), self.rng.random());
        icmp_error_frame(
            [0x02, 0, 0, 0, 0, 0xbb],
            [0x02, 0, 0, 0, 0, 0xcc],
            src,
            dst,
            id,
            icmp_type,
            code,
            &quote,
        )
    }

    fn odd_protocol(&mut self) -> Vec<u8> {
        let mut p = self.frontend_packet();
        p[23] = *[132, 47, 0, 255, 2, 4, 41, 50, self.rng.random()]
            .choose(&mut self.rng)
            .expect("non-empty");
        fix_ip_csum(&mut p);
        p
    }

    fn not_ipv4(&mut self) -> Vec<u8> {
        let mut p = self.frontend_packet();
        match self.rng.random_range(0..4) {
            0 => {
                // ARP request.
                p.truncate(12);
                p.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
                p.extend((0..20).map(|_| self.rng.random::<u8>()));
            }
            1 => {
                // IPv6 with the IPv4 packet's bytes after a plausible header.
                let rest = p.split_off(14);
                p[12..14].copy_from_slice(&[0x86, 0xdd]);
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&((rest.len() as u16).to_be_bytes()));
                p.extend_from_slice(&[PROTO_TCP, 64]);
                p.extend((0..32).map(|_| self.rng.random::<u8>()));
                p.extend_from_slice(&rest);
            }
            _ => {
                // A frontend's packet behind an 802.1Q tag (or two: 802.1ad).
                let tci = self.rng.random::<u16>().to_be_bytes();
                p.splice(12..12, [0x81, 0x00, tci[0], tci[1]]);
                if self.rng.random() {
                    p.splice(12..12, [0x88, 0xa8, tci[1], tci[0]]);
                }
            }
        }
        p
    }

    fn random_bytes(&mut self) -> Vec<u8> {
        let len = self.rng.random_range(0..1600);
        let mut p: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
        // Often an IPv4 ethertype, so that the parser's checks get random input too.
        if p.len() >= 14 && self.rng.random() {
            p[12..14].copy_from_slice(&[0x08, 0x00]);
            if p.len() > 14 && self.rng.random() {
                p[14] = 0x45;
            }
        }
        p
    }

    /// A frame and what it is.
    fn frame(&mut self) -> (Vec<u8>, String) {
        let (mut p, what) = match self.rng.random_range(0..100) {
            0..10 => return (self.random_bytes(), "random bytes".into()),
            10..35 => (self.frontend_packet(), "to a frontend"),
            35..45 => (self.stray_packet(), "to no frontend"),
            45..60 => match self.reply() {
                Some(p) => (p, "a backend's reply"),
                None => (self.frontend_packet(), "to a frontend"),
            },
            60..70 => match self.icmp_about_flow() {
                Some(p) => (p, "ICMP error about a flow"),
                None => (self.icmp_other(), "ICMP"),
            },
            70..78 => (self.icmp_other(), "ICMP"),
            78..86 => (self.odd_protocol(), "other IPv4 protocol"),
            _ => (self.not_ipv4(), "not IPv4"),
        };
        let mut notes = vec![what.to_string()];
        let mutations = *[0, 0, 0, 1, 1, 1, 1, 2, 2, 3]
            .choose(&mut self.rng)
            .expect("non-empty");
        for _ in 0..mutations {
            notes.push(self.mutate(&mut p));
        }
        (p, notes.join(", "))
    }

    /// One damage done to `p`; says which.
    fn mutate(&mut self, p: &mut Vec<u8>) -> String {
        let ihl = if p.len() > 14 {
            (usize::from(p[14] & 0x0f) * 4).max(20)
        } else {
            20
        };
        let l4 = ETH_HLEN + ihl;
        let rng = &mut self.rng;
        match rng.random_range(0..13) {
            0 => {
                let cuts = [
                    rng.random_range(0..ETH_HLEN),
                    ETH_HLEN,
                    ETH_HLEN + rng.random_range(0..20),
                    ETH_HLEN + 20,
                    l4 + rng.random_range(0..=20),
                    l4 + 8,
                    l4 + 20,
                    p.len().saturating_sub(1),
                    rng.random_range(0..=p.len()),
                ];
                let cut = (*cuts.choose(rng).expect("non-empty")).min(p.len());
                p.truncate(cut);
                // Half the time the IPv4 header agrees, so only the L4 header is cut.
                if cut >= ETH_HLEN + 20 && rng.random() {
                    put16(p, 16, (cut - ETH_HLEN) as u16);
                    fix_ip_csum(p);
                    return format!("cut to {cut} bytes, total length agreeing");
                }
                format!("cut to {cut} bytes")
            }
            1 if p.len() > 14 => {
                let words = rng.random_range(0..16u8);
                p[14] = (p[14] & 0xf0) | words;
                if rng.random_bool(0.7) {
                    fix_ip_csum(p);
                }
                format!("IHL {words}")
            }
            2 if p.len() >= l4 && ihl < 60 => {
                let words = rng.random_range(1..=(60 - ihl) / 4);
                let valid = rng.random_bool(0.6);
                let options = if valid {
                    ip_options(rng, words * 4)
                } else {
                    (0..words * 4).map(|_| rng.random()).collect()
                };
                p.splice(l4..l4, options);
                p[14] = (p[14] & 0xf0) | ((ihl + words * 4) / 4) as u8;
                let total = be16(p, 16).wrapping_add((words * 4) as u16);
                put16(p, 16, total);
                if rng.random_bool(0.9) {
                    fix_ip_csum(p);
                }
                format!(
                    "{} bytes of {} IP options",
                    words * 4,
                    if valid { "valid" } else { "garbage" }
                )
            }
            3 if p.len() >= 18 => {
                let len = p.len() - ETH_HLEN;
                let total = *[
                    len + rng.random_range(1..100),
                    rng.random_range(ihl.min(len)..=len),
                    rng.random_range(0..ihl),
                    0,
                    0xffff,
                ]
                .choose(rng)
                .expect("non-empty");
                put16(p, 16, total as u16);
                if rng.random_bool(0.8) {
                    fix_ip_csum(p);
                }
                format!("total length {total} for {len} bytes")
            }
            4 if p.len() >= 22 => {
                let offset = rng.random_range(1..0x2000u16);
                let frag = *[0x2000, 0x2000 | offset, offset, 0x4000 | offset, 0x8000, 0]
                    .choose(rng)
                    .expect("non-empty");
                put16(p, 20, frag);
                fix_ip_csum(p);
                format!("flags and fragment offset {frag:#06x}")
            }
            5 if p.len() >= 24 => {
                let proto = *[
                    132,
                    47,
                    0,
                    255,
                    PROTO_ICMP,
                    PROTO_TCP,
                    PROTO_UDP,
                    rng.random(),
                ]
                .choose(rng)
                .expect("non-empty");
                p[23] = proto;
                fix_ip_csum(p);
                format!("IP protocol {proto}")
            }
            6 if p.len() > l4 + 12 => {
                let doff = rng.random_range(0..16u8);
                p[l4 + 12] = (doff << 4) | (p[l4 + 12] & 0x0f);
                format!("TCP data offset {doff}")
            }
            7 if p.len() >= l4 + 6 => {
                let l4_len = p.len() - l4;
                let udp_len = *[
                    0,
                    4,
                    7,
                    8,
                    l4_len - 1,
                    l4_len,
                    l4_len + 1,
                    usize::from(rng.random::<u16>()),
                ]
                .choose(rng)
                .expect("non-empty");
                put16(p, l4 + 4, udp_len as u16);
                format!("UDP length {udp_len}")
            }
            8 if !p.is_empty() => {
                let flips = rng.random_range(1..=8);
                let span = if rng.random_bool(0.7) {
                    p.len().min(l4 + 28)
                } else {
                    p.len()
                };
                for _ in 0..flips {
                    let at = rng.random_range(0..span);
                    p[at] ^= 1 << rng.random_range(0..8);
                }
                format!("{flips} bit flips")
            }
            9 if p.len() > 14 => {
                let version = rng.random_range(0..16u8);
                p[14] = (version << 4) | (p[14] & 0x0f);
                fix_ip_csum(p);
                format!("IP version {version}")
            }
            10 if p.len() >= 14 => {
                let ethertype = *[0x86dd, 0x0806, 0x8100, 0x88a8, 0x05dc, rng.random()]
                    .choose(rng)
                    .expect("non-empty");
                put16(p, 12, ethertype);
                format!("ethertype {ethertype:#06x}")
            }
            11 => {
                let n = rng.random_range(1..=64);
                let zeros = rng.random();
                p.extend((0..n).map(|_| if zeros { 0 } else { rng.random::<u8>() }));
                format!(
                    "{n} bytes of {} padding",
                    if zeros { "zero" } else { "random" }
                )
            }
            12 if p.len() >= l4 + 18 => {
                // UDP checksum "none", or any L4 checksum garbage.
                let (at, value) = if p[23] == PROTO_UDP && rng.random() {
                    (l4 + 6, 0)
                } else {
                    (l4 + if p[23] == PROTO_TCP { 16 } else { 6 }, rng.random())
                };
                put16(p, at, value);
                format!("L4 checksum {value:#06x}")
            }
            _ => {
                if p.is_empty() {
                    return "nothing".into();
                }
                let at = rng.random_range(0..p.len().min(l4 + 28));
                p[at] = rng.random();
                if rng.random() {
                    fix_ip_csum(p);
                }
                format!("byte {at} set to {:#04x}", p[at])
            }
        }
    }
}

/// `len` bytes of well-formed IPv4 options: no-ops, router alert, record route, timestamps,
/// an end of list.
fn ip_options(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut o = Vec::with_capacity(len);
    while o.len() < len {
        let room = len - o.len();
        match rng.random_range(0..5) {
            0 if room >= 4 => o.extend_from_slice(&[0x94, 4, 0, 0]),
            1 if room >= 7 => {
                let slots = rng.random_range(1..=(room - 3) / 4);
                o.extend_from_slice(&[7, (3 + 4 * slots) as u8, 4]);
                o.extend(std::iter::repeat_n(0, 4 * slots));
            }
            2 if room >= 8 => {
                let slots = rng.random_range(1..=(room - 4) / 4);
                o.extend_from_slice(&[0x44, (4 + 4 * slots) as u8, 5, 0]);
                o.extend(std::iter::repeat_n(0, 4 * slots));
            }
            3 => o.resize(len, 0), // end of list, then padding
            _ => o.push(1),
        }
    }
    o
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text} is not a number")))
}

#[test]
fn random_and_mutated_frames_are_never_mistranslated() {
    let cases = env_u64("LB_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let seed = env_u64("LB_FUZZ_SEED").unwrap_or_else(|| rand::rng().random());
    println!("packet_fuzz: {cases} cases, seed {seed:#x} (LB_FUZZ_SEED={seed:#x} to repeat)");
    let started = std::time::Instant::now();
    let mut fuzz = Fuzz::new(seed);
    for case in 0..cases {
        let (frame, what) = fuzz.frame();
        let complete = fuzz.rng.random();
        match fuzz.run_case(&frame, complete) {
            Ok(class) => *fuzz.stats.entry(class).or_default() += 1,
            Err(f) => panic!(
                "case {case} of seed {seed:#x} (LB_FUZZ_SEED={seed:#x} LB_FUZZ_CASES={}): {}\n  \
                 frame: {what}; skb {}\n  input  ({} bytes): {}\n  output: {}\n  \
                 conntrack entry met: {:?}",
                case + 1,
                f.reason,
                if complete {
                    "CHECKSUM_COMPLETE"
                } else {
                    "CHECKSUM_NONE"
                },
                frame.len(),
                hex(&frame),
                match &f.verdict {
                    Some(v) => format!(
                        "verdict {}, {} bytes: {}",
                        v.action,
                        v.packet.len(),
                        hex(&v.packet)
                    ),
                    None => "none".into(),
                },
                f.before,
            ),
        }
    }
    println!(
        "packet_fuzz: {cases} cases in {:.1?} ({} with CHECKSUM_COMPLETE): {:?}",
        started.elapsed(),
        fuzz.checksum_complete_runs,
        fuzz.stats
    );
    assert_eq!(fuzz.h.counter("drop_rewrite"), 0, "a rewrite helper failed");
    // A fuzzer that never reaches the translations proves nothing: at this size every kind
    // of outcome turns up (hundreds of each at the default size).
    if cases >= 20_000 {
        for class in [
            Class::Untouched,
            Class::Dropped,
            Class::NewFlow,
            Class::Forward,
            Class::Reply,
            Class::IcmpTranslated,
            Class::Reject,
        ] {
            assert!(
                fuzz.stats.get(&class).copied().unwrap_or(0) > 0,
                "no {class:?} outcome in {cases} cases: {:?}",
                fuzz.stats
            );
        }
    }
}

/// Runs `frame` through the fuzzer's judge, expects a translation of `class`, and returns it.
fn expect(fuzz: &mut Fuzz, frame: &[u8], complete: bool, class: Class) -> Vec<u8> {
    match fuzz.run_case(frame, complete) {
        Ok(got) => assert_eq!(got, class, "input {}", hex(frame)),
        Err(f) => panic!("{} for input {}", f.reason, hex(frame)),
    }
    // A fresh fuzzer's lists only grow: the newest translation is the last.
    let kept = if class == Class::Reply {
        &fuzz.replied
    } else {
        &fuzz.forwarded
    };
    kept.last().expect("a translation kept").clone()
}

/// Found by this fuzzer: rewriting the port of a UDP datagram without checksum left
/// skb->csum behind in a CHECKSUM_COMPLETE skb (EBADMSG from the kernel's check), both for the
/// client's datagram and for the backend's reply.
#[test]
fn udp_without_checksum_keeps_a_complete_skbs_sum_right() {
    let mut fuzz = Fuzz::new(0);
    let mut datagram = build(PROTO_UDP, CLIENTS[0], 40100, CLUSTER_IP, 53, 0);
    datagram.payload.clear();
    let mut frame = datagram.build();
    put16(&mut frame, ETH_HLEN + 20 + 6, 0);
    assert_eq!(
        hex(&frame),
        "02000000000202000000000108004500001c1234400040111089c0a84d020a60000a9ca4003500080000"
    );
    let out = expect(&mut fuzz, &frame, true, Class::NewFlow);
    assert_eq!(be16(&out, ETH_HLEN + 20 + 6), 0, "still without checksum");

    let l = l4(&out, ipv4(&out).expect("IPv4")).expect("UDP");
    let mut reply = build(PROTO_UDP, l.ip.dst, l.dport, l.ip.src, l.sport, 0);
    reply.payload.clear();
    let mut frame = reply.build();
    put16(&mut frame, ETH_HLEN + 20 + 6, 0);
    let out = expect(&mut fuzz, &frame, true, Class::Reply);
    assert_eq!(be16(&out, ETH_HLEN + 20 + 6), 0, "still without checksum");
}

/// Found by this fuzzer: an ICMP error whose quote lay past the IPv4 total length (trailing
/// bytes of the frame) was translated, those bytes rewritten and the ICMP checksum adjusted
/// for them, which left it wrong for the ICMP message actually in the packet.
#[test]
fn icmp_error_whose_quote_is_past_the_packet_is_not_translated() {
    let mut fuzz = Fuzz::new(0);
    let mut datagram = build(PROTO_UDP, CLIENTS[0], 40200, CLUSTER_IP, 53, 0);
    datagram.payload.clear();
    let seen = expect(&mut fuzz, &datagram.build(), false, Class::NewFlow);
    let backend = addr(&seen, 30);
    let error = icmp_error_frame(
        [0x02, 0, 0, 0, 0, 0xbb],
        [0x02, 0, 0, 0, 0, 0xcc],
        backend,
        CLIENTS[0],
        7,
        3,
        3,
        &seen[ETH_HLEN..ETH_HLEN + 28],
    );
    // The IPv4 packet ends after the ICMP header, whose checksum is right for those 8 bytes.
    let mut short = error.clone();
    put16(&mut short, 16, 28);
    fix_ip_csum(&mut short);
    put16(&mut short, ETH_HLEN + 22, 0);
    let csum = checksum(&short[ETH_HLEN + 20..ETH_HLEN + 28], 0);
    put16(&mut short, ETH_HLEN + 22, csum);
    for complete in [false, true] {
        assert_eq!(
            fuzz.run_case(&short, complete)
                .map_err(|f| f.reason)
                .unwrap(),
            Class::Untouched
        );
    }
    // Whole, the same error is the backend's, translated.
    assert_eq!(
        fuzz.run_case(&error, true).map_err(|f| f.reason).unwrap(),
        Class::IcmpTranslated
    );
}
