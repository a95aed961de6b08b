//! The packet path, top to bottom: parse, address filter (neither to a frontend nor from a
//! backend: not ours), conntrack (reply: reverse NAT; known flow: NAT to its backend),
//! frontend, source ranges, backend selection, conntrack record, NAT.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    addr_filter, ct_other_half, ct_timeout_ns, flow_hash, maglev_start, AffinityKey, AffinityValue,
    BackendValue, Counter, CtKey, CtValue, FrontendKey, ServiceValue, AFFINITY_MAGLEV_INDEX,
    BACKEND_REMOTE, CT_FORWARD, CT_REPLY, FRONTEND_LOCAL_ADDRESS, FRONTEND_SOURCE_RANGES,
    KIND_CLUSTER_IP, PROTO_TCP, PROTO_UDP, SERVICE_DROP_WHEN_EMPTY, SERVICE_MAGLEV, TCP_ACK,
    TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    headers::{load, parse_ipv4, parse_l4, Packet, Parsed, PROTO_ICMP},
    icmp,
    maps::{
        account, count, hairpin_addr, in_filter, maglev_table_size, no_backend_drop, snat_addr,
        source_allowed, LB_AFFINITY, LB_BACKENDS, LB_CONNTRACK, LB_FRONTENDS, LB_MAGLEV,
        LB_SCRATCH, LB_SERVICES,
    },
    reject,
    select::{pick_random, slot_backend},
};

/// Let the next program (or the stack) handle the packet: it is not ours.
const TC_ACT_UNSPEC: i32 = -1;
const EEXIST: i32 = -17;
const NO_ADDR: [u8; 4] = [0; 4];

#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    match try_lb_ingress(&ctx) {
        Ok(action) => action,
        // A helper failed half way through a rewrite: never let a half-NATed packet out.
        Err(()) => {
            count(Counter::DropRewrite);
            TC_ACT_SHOT
        }
    }
}

fn try_lb_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let ip = match parse_ipv4(ctx) {
        Parsed::Ipv4(ip) => ip,
        Parsed::NotIpv4 => return Ok(TC_ACT_UNSPEC),
        Parsed::Fragment => {
            count(Counter::Fragment);
            return Ok(TC_ACT_UNSPEC);
        }
        Parsed::Malformed => {
            count(Counter::Malformed);
            return Ok(TC_ACT_UNSPEC);
        }
    };
    match ip.proto {
        PROTO_TCP | PROTO_UDP => {}
        PROTO_ICMP => return icmp::translate_error(ctx, &ip),
        _ => return Ok(TC_ACT_UNSPEC),
    }
    let Some(pkt) = parse_l4(ctx, ip) else {
        count(Counter::Malformed);
        return Ok(TC_ACT_UNSPEC);
    };
    let key = pkt.flow_key();
    // Only a packet to a frontend or from a backend can belong to a translated flow (forward
    // keys have the frontend as destination, reply keys the backend as source). Everything
    // else (pod to pod, a socket-balanced connection's forward half) passes without lookups.
    let to_frontend = in_filter(key.dst_addr, key.dst_port, key.proto, addr_filter::FRONTEND);
    if !to_frontend && !in_filter(key.src_addr, key.src_port, key.proto, addr_filter::BACKEND) {
        return Ok(TC_ACT_UNSPEC);
    }
    // Coarse (tick resolution) is plenty for timeouts of seconds, and cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    if let Some(ct) = LB_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup; only plain integers are touched.
        let ct = unsafe { &mut *ct };
        // A connection lives while either direction does (a half-closed TCP stream, a UDP
        // server that answers rarely): an expired half whose other half is alive carries on.
        let expired = expired_both_ways(&key, ct, now);
        // A new connection on the ports of one that has closed (a client reusing a port in
        // TIME_WAIT) is a new flow, balanced anew like nf_conntrack does, not sent to the old
        // connection's backend, which may be terminating by now.
        let reopened = ct.direction == CT_FORWARD
            && pkt.proto == PROTO_TCP
            && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && ct.tcp_flags & (TCP_FIN | TCP_RST) != 0;
        if expired {
            // Stale: as if it were not there.
            count(Counter::CtExpired);
            let _ = LB_CONNTRACK.remove(key);
        } else if reopened {
            remove_flow(&key, ct_other_half(&key, ct));
        } else if ct.direction == CT_REPLY {
            refresh(ct, now, &pkt);
            let done = finished(&key, ct, &pkt);
            pkt.set_src(ctx, ct.nat_addr, ct.nat_port)?;
            if ct.snat_addr != NO_ADDR {
                pkt.set_dst_keeping(ctx, ct.snat_addr, ct.snat_port)?;
            }
            account(ct.service_id, true, ctx.len());
            count(Counter::Reply);
            let action = if ct.return_ifindex != 0 {
                return_to_sender(ctx, ct)?
            } else {
                TC_ACT_OK
            };
            forget(&key, done);
            return Ok(action);
        } else if backend_still_there(ct) {
            refresh(ct, now, &pkt);
            let done = finished(&key, ct, &pkt);
            pkt.set_dst(ctx, ct.nat_addr, ct.nat_port)?;
            set_source(ctx, &pkt, ct)?;
            account(ct.service_id, false, ctx.len());
            count(Counter::Forward);
            let action = send_on(ctx, &pkt, ct);
            forget(&key, done);
            return Ok(action);
        } else {
            // The backend is gone (or its id now names another endpoint). Forget the flow;
            // a TCP connection in progress cannot move, so it is reset, while a datagram
            // flow (or a fresh SYN reusing the ports) is balanced again below.
            remove_flow(&key, ct_other_half(&key, ct));
            let fresh_syn = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if pkt.proto == PROTO_TCP && !fresh_syn {
                count(Counter::ResetBackendGone);
                return reject::tcp_reset(ctx, &pkt);
            }
        }
    }

    if !to_frontend {
        return Ok(TC_ACT_UNSPEC);
    }
    let frontend_key = FrontendKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: read-only copy of a value the agent replaces atomically.
    let Some(frontend) = (unsafe { LB_FRONTENDS.get(frontend_key) }).copied() else {
        return Ok(TC_ACT_UNSPEC);
    };
    if frontend.flags & FRONTEND_SOURCE_RANGES != 0 && !source_allowed(frontend_key, key.src_addr) {
        count(Counter::DropSourceRange);
        return Ok(TC_ACT_SHOT);
    }
    let service_id = frontend.service_id;
    // A copy of a value the agent replaces atomically; an unused id reads as no backend.
    let service = LB_SERVICES.get(service_id).copied();
    let Some((backend_id, backend)) =
        service.and_then(|s| choose_backend(service_id, &s, &key, now))
    else {
        let drop_when_empty = service.is_some_and(|s| s.flags & SERVICE_DROP_WHEN_EMPTY != 0);
        if no_backend_drop() || drop_when_empty {
            count(Counter::DropNoBackend);
            return Ok(TC_ACT_SHOT);
        }
        count(Counter::RejectNoBackend);
        return reject::reject(ctx, &pkt);
    };

    // A pod reaching itself through its Service would see its own address as the source and
    // drop the packet: give it the hairpin address, which routes back through this node.
    // External traffic to an endpoint on another node gets this node's address, so the
    // endpoint's replies come back here to be translated (externalTrafficPolicy Cluster).
    let hairpin = backend.addr == key.src_addr;
    let node_snat = snat_addr();
    let remote_external = frontend.kind != KIND_CLUSTER_IP
        && backend.flags & BACKEND_REMOTE != 0
        && node_snat != NO_ADDR;
    let snat_addr = if hairpin {
        count(Counter::Hairpin);
        hairpin_addr()
    } else if remote_external {
        count(Counter::Snat);
        node_snat
    } else {
        NO_ADDR
    };
    let Some(forward) = LB_SCRATCH.get_ptr_mut(0) else {
        return Ok(TC_ACT_UNSPEC);
    };
    // SAFETY: this CPU's own slot, for this packet only (see LB_SCRATCH).
    let forward = unsafe { &mut *forward };
    *forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction: CT_FORWARD,
        tcp_flags: pkt.tcp_flags,
        snat_addr,
        backend_id,
        service_id,
        return_ifindex: 0,
        return_dst_mac: [0; 6],
        return_src_mac: [0; 6],
        snat_port: 0,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        expires_ns: now + ct_timeout_ns(pkt.proto, pkt.tcp_flags),
    };
    let local_frontend = frontend.flags & FRONTEND_LOCAL_ADDRESS != 0;
    // The reply half is claimed first, and only when its key is free: the same client port to
    // another frontend that picked the same backend would otherwise take over this flow's
    // replies, and the backend would see two connections on one 4-tuple. Then the source
    // port is rewritten, as nf_nat does; many clients sharing the node's address (source NAT)
    // need that all the time.
    let mut claimed = false;
    let mut attempt = 0;
    let mut flags = BPF_NOEXIST as u64;
    // Each port is tried once, and once more when the flow holding it turns out to be gone.
    for _ in 0..SNAT_PORT_ATTEMPTS * 2 {
        match record_reply(ctx, &key, forward, local_frontend, flags) {
            0 => {
                claimed = true;
                if attempt > 0 && !remote_external {
                    count(Counter::ReplyClash);
                }
                break;
            }
            EEXIST if flags == BPF_NOEXIST as u64 && reply_reusable(&key, forward, now) => {
                flags = BPF_ANY as u64;
            }
            EEXIST => {
                attempt += 1;
                if attempt == SNAT_PORT_ATTEMPTS {
                    break;
                }
                if forward.snat_addr == NO_ADDR {
                    // The client keeps its address; only the port changes.
                    forward.snat_addr = key.src_addr;
                }
                forward.snat_port = snat_port_candidate(&key, attempt);
                flags = BPF_NOEXIST as u64;
            }
            _ => {
                count(Counter::CtInsertFailed);
                break;
            }
        }
    }
    if !claimed && (remote_external || forward.snat_port != 0) {
        // Every port tried is in use: the client retries, by then one may be free.
        count(Counter::DropSnatPorts);
        return Ok(TC_ACT_SHOT);
    }
    // By reference: a copy of the entry would land on the stack the scratch slot spares.
    let entry: &CtValue = forward;
    match LB_CONNTRACK.insert(key, entry, BPF_NOEXIST as u64) {
        Ok(()) => count(Counter::NewFlow),
        // Another CPU recorded this flow first: follow its choice so the flow stays on one
        // backend, and drop the reply half claimed for ours unless it is the winner's too.
        // SAFETY: read-only use of a value the map owns.
        Err(EEXIST) => {
            if let Some(winner) = unsafe { LB_CONNTRACK.get(key) } {
                let ours = ct_other_half(&key, forward);
                if claimed && ct_other_half(&key, winner) != ours {
                    let _ = LB_CONNTRACK.remove(ours);
                }
                *forward = *winner;
            }
        }
        Err(_) => count(Counter::CtInsertFailed),
    }
    pkt.set_dst(ctx, forward.nat_addr, forward.nat_port)?;
    set_source(ctx, &pkt, forward)?;
    account(service_id, false, ctx.len());
    Ok(send_on(ctx, &pkt, forward))
}

/// Where a translated forward packet goes. Source-NATed to this node's own address, it would
/// be dropped by the stack's forwarding (a local source arriving from outside), so it is sent
/// straight to the next hop the FIB names; anything else continues through the stack.
#[inline(always)]
fn send_on(ctx: &TcContext, pkt: &Packet, ct: &CtValue) -> i32 {
    // Most flows are not source-NATed: decide that before reading the global.
    if ct.snat_addr == NO_ADDR {
        return TC_ACT_OK;
    }
    let node = snat_addr();
    if ct.snat_addr != node {
        return TC_ACT_OK;
    }
    // SAFETY: a zeroed bpf_fib_lookup is valid input; the fields set are plain integers.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = pkt.proto;
    // SAFETY: the context pointer is the program's own skb.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_1.tot_len = pkt.ip.total_len as u16;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(node);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ct.nat_addr);
    // SAFETY: params is a properly sized, initialised struct on our stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut eth = [0u8; 12];
            eth[..6].copy_from_slice(&params.dmac);
            eth[6..].copy_from_slice(&params.smac);
            if ctx.store(0, &eth, 0).is_err() {
                return TC_ACT_OK;
            }
            // SAFETY: plain helper call with the egress ifindex the FIB returned.
            unsafe { bpf_redirect(params.ifindex, 0) as i32 }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: as above; the kernel resolves the neighbour.
            unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
        }
        _ => TC_ACT_OK,
    }
}

const AF_INET: u8 = 2;

const SNAT_PORT_ATTEMPTS: u16 = 4;

/// A source port for the `attempt`-th try, spread over 32768..61000 by the flow's hash.
#[inline(always)]
fn snat_port_candidate(key: &CtKey, attempt: u16) -> u16 {
    let seed = u32::from_ne_bytes(key.src_addr)
        ^ (u32::from(key.src_port) << 16)
        ^ u32::from(key.dst_port);
    let mixed = seed
        .wrapping_mul(2_654_435_761)
        .wrapping_add(u32::from(attempt) * 40_503);
    32_768 + (mixed % 28_232) as u16
}

/// The source rewrite of a forward entry: the source-NAT address, and port when one was
/// allocated.
#[inline(always)]
fn set_source(ctx: &TcContext, pkt: &Packet, ct: &CtValue) -> Result<(), ()> {
    if ct.snat_addr == NO_ADDR {
        return Ok(());
    }
    pkt.set_src_keeping(ctx, ct.snat_addr, ct.snat_port)
}

/// The backend for a new flow: the client's affinity backend while it holds, else one picked
/// by the service's algorithm (remembered when the service has `sessionAffinity: ClientIP`).
/// Out of line, and a leaf: its keys and values would otherwise sit in `lb_ingress`'s frame,
/// and the verifier caps the frames of a call chain at 512 bytes together (lb_ingress 424 +
/// this 72, each rounded up to 16).
#[inline(never)]
fn choose_backend(
    service_id: u32,
    service: &ServiceValue,
    flow: &CtKey,
    now: u64,
) -> Option<(u32, BackendValue)> {
    if service.affinity_timeout_s == 0 {
        return pick_backend(service_id, service, flow).map(|(_, id, b)| (id, b));
    }
    let key = AffinityKey {
        service_id,
        client: flow.src_addr,
    };
    let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
    if let Some(entry) = LB_AFFINITY.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup; plain integers only.
        let entry = unsafe { &mut *entry };
        let fresh = now.saturating_sub(entry.last_used_ns) < timeout_ns;
        // Still one of the service's usable backends: its slot (or, picked by Maglev, its
        // table entry) still names it.
        let current = if entry.slot & AFFINITY_MAGLEV_INDEX != 0 {
            // The table counts only while the entry says Maglev (see `maglev_entry`).
            service.flags & SERVICE_MAGLEV != 0
                && maglev_entry(service, entry.slot & !AFFINITY_MAGLEV_INDEX) == entry.backend_id
        } else {
            entry.slot < service.backend_count
                && slot_backend(service_id, service, entry.slot) == Some(entry.backend_id)
        };
        if fresh && current {
            if let Some(backend) = LB_BACKENDS.get(entry.backend_id).copied() {
                if backend.proto != 0 {
                    entry.last_used_ns = now;
                    return Some((entry.backend_id, backend));
                }
            }
        }
    }
    let (slot, backend_id, backend) = pick_backend(service_id, service, flow)?;
    let value = AffinityValue {
        backend_id,
        slot,
        last_used_ns: now,
    };
    let _ = LB_AFFINITY.insert(key, value, BPF_ANY as u64);
    Some((backend_id, backend))
}

/// A new flow's backend: (slot, or `AFFINITY_MAGLEV_INDEX` | table index, backend id,
/// backend). A Maglev service uses its table; an entry not naming a stored backend (a table
/// not written yet) falls back to a random slot, never to no backend.
#[inline(always)]
fn pick_backend(
    service_id: u32,
    service: &ServiceValue,
    flow: &CtKey,
) -> Option<(u32, u32, BackendValue)> {
    if service.backend_count == 0 {
        return None;
    }
    if service.flags & SERVICE_MAGLEV != 0 {
        let (index, backend_id) = maglev_pick(service, flow);
        if let Some(backend) = LB_BACKENDS.get(backend_id).copied() {
            if backend.proto != 0 {
                return Some((AFFINITY_MAGLEV_INDEX | index, backend_id, backend));
            }
        }
    }
    pick_random(service_id, service)
}

/// The flow's Maglev table index and the backend id its entry names (0: none).
#[inline(always)]
fn maglev_pick(service: &ServiceValue, flow: &CtKey) -> (u32, u32) {
    let size = service.maglev_size;
    if size == 0 {
        return (0, 0);
    }
    let index = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    ) % size;
    (index, maglev_entry(service, index))
}

/// Entry `index` of the service's Maglev table: a backend id (0 = none). The table starts at
/// its first unit of M entries (the global size) and may run on over the next ones. Callers
/// check `SERVICE_MAGLEV` first: while the agent moves a service to another table the flag is
/// off, and its table and size may be a mix of old and new.
#[inline(always)]
fn maglev_entry(service: &ServiceValue, index: u32) -> u32 {
    if service.maglev_table == 0 || index >= service.maglev_size {
        return 0;
    }
    let start = maglev_start(service.maglev_table, maglev_table_size());
    match LB_MAGLEV.get(start.wrapping_add(index)) {
        Some(id) => *id,
        None => 0,
    }
}

#[inline(always)]
fn backend_still_there(ct: &CtValue) -> bool {
    match LB_BACKENDS.get(ct.backend_id) {
        Some(b) => b.proto != 0 && b.addr == ct.nat_addr && b.port == ct.nat_port,
        None => false,
    }
}

/// Whether the reply half the new flow `key` (entry `forward`) wants may be taken over: it is
/// this flow's own (its forward half was evicted, or another CPU is recording the same flow
/// right now), or its connection has expired in both directions (as the lookup above counts
/// it). Out of line, off the common path:
/// `lb_ingress`'s frame has no room for its keys.
#[inline(never)]
fn reply_reusable(key: &CtKey, forward: &CtValue, now: u64) -> bool {
    let reply_key = ct_other_half(key, forward);
    // SAFETY: read-only use of values the map owns.
    let Some(held) = (unsafe { LB_CONNTRACK.get(reply_key) }) else {
        return true;
    };
    // A dead connection's forward half goes too: kept, it would count the new flow's half as
    // its own.
    ct_other_half(&reply_key, held) == *key || expired_both_ways(&reply_key, held, now)
}

/// Whether the connection that `half` (at `key`) belongs to has expired in both directions:
/// one half alive keeps it (a half-closed stream, a server that answers rarely). When it has,
/// its other half is removed; `key` itself is left to the caller.
#[inline(always)]
fn expired_both_ways(key: &CtKey, half: &CtValue, now: u64) -> bool {
    if now <= half.expires_ns {
        return false;
    }
    let other = ct_other_half(key, half);
    // SAFETY: read-only copy.
    match unsafe { LB_CONNTRACK.get(other) }.copied() {
        Some(o) if now <= o.expires_ns => false,
        _ => {
            let _ = LB_CONNTRACK.remove(other);
            true
        }
    }
}

/// Records the reply direction so the backend's answers are translated back to the frontend.
/// 0 or the map's error.
#[inline(always)]
fn record_reply(
    ctx: &TcContext,
    key: &CtKey,
    forward: &CtValue,
    local_frontend: bool,
    flags: u64,
) -> i32 {
    // Replies from a node address go back the way the request came (see `return_ifindex`).
    let (return_ifindex, return_dst_mac, return_src_mac) =
        match local_frontend.then(|| load::<[u8; 12]>(ctx, 0)).flatten() {
            Some(eth) => (
                // SAFETY: the context pointer is the program's own skb.
                unsafe { (*ctx.skb.skb).ifindex },
                [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
                [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]],
            ),
            None => (0, [0; 6], [0; 6]),
        };
    let reply = CtValue {
        nat_addr: key.dst_addr,
        nat_port: key.dst_port,
        direction: CT_REPLY,
        tcp_flags: 0,
        snat_addr: if forward.snat_addr != NO_ADDR {
            key.src_addr
        } else {
            NO_ADDR
        },
        backend_id: forward.backend_id,
        service_id: forward.service_id,
        return_ifindex,
        return_dst_mac,
        return_src_mac,
        // The client's own port, restored on replies when the source port was rewritten.
        snat_port: if forward.snat_port != 0 {
            key.src_port
        } else {
            0
        },
        _pad: 0,
        created_ns: forward.created_ns,
        last_seen_ns: forward.created_ns,
        expires_ns: forward.created_ns + ct_timeout_ns(key.proto, 0),
    };
    match LB_CONNTRACK.insert(ct_other_half(key, forward), reply, flags) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// Sends a translated reply straight out of the interface its flow came in on, with the
/// request's Ethernet addresses swapped.
#[inline(always)]
pub fn return_to_sender(ctx: &TcContext, ct: &CtValue) -> Result<i32, ()> {
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&ct.return_dst_mac);
    eth[6..].copy_from_slice(&ct.return_src_mac);
    ctx.store(0, &eth, 0).map_err(|_| ())?;
    // SAFETY: plain helper call with an interface index recorded from a real skb.
    Ok(unsafe { bpf_redirect(ct.return_ifindex, 0) } as i32)
}

/// The last ACK of a TCP connection that both ends have closed (each half has carried a FIN):
/// the key of the other half, for both entries to go once this packet is on its way.
#[inline(always)]
fn finished(key: &CtKey, ct: &CtValue, pkt: &Packet) -> Option<CtKey> {
    if pkt.proto != PROTO_TCP
        || pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK) != TCP_ACK
        || ct.tcp_flags & TCP_FIN == 0
    {
        return None;
    }
    let other = ct_other_half(key, ct);
    // SAFETY: read-only copy of one byte.
    let other_flags = unsafe { LB_CONNTRACK.get(other) }.map(|o| o.tcp_flags)?;
    (other_flags & TCP_FIN != 0).then_some(other)
}

#[inline(always)]
fn forget(key: &CtKey, done: Option<CtKey>) {
    if let Some(other) = done {
        remove_flow(key, other);
        count(Counter::CtClosed);
    }
}

/// Deletes both halves of a flow: `key` and its `other` half.
#[inline(always)]
fn remove_flow(key: &CtKey, other: CtKey) {
    let _ = LB_CONNTRACK.remove(other);
    let _ = LB_CONNTRACK.remove(*key);
}

#[inline(always)]
fn refresh(ct: &mut CtValue, now: u64, pkt: &Packet) {
    ct.tcp_flags |= pkt.tcp_flags;
    ct.last_seen_ns = now;
    ct.expires_ns = now + ct_timeout_ns(pkt.proto, ct.tcp_flags);
}

/// Does nothing: the floor the benchmark measures `lb_ingress` against (same attach type,
/// same test-run overhead, no work).
#[classifier]
pub fn lb_passthrough(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}
