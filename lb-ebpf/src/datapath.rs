use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK},
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use lb_common::{
    capacity, BackendValue, Counter, CtKey, CtValue, FrontendKey, FrontendValue, ServiceValue,
    SlotKey, COUNTER_COUNT, CT_FORWARD, CT_REPLY, PROTO_TCP, PROTO_UDP,
};

/// Let the next program (or the stack) handle the packet: it is not ours.
const TC_ACT_UNSPEC: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
/// More-fragments flag and fragment offset bits of `frag_off`.
const IP_FRAG_MASK: u16 = 0x3fff;
const EEXIST: i32 = -17;

#[btf_map]
static LB_FRONTENDS: HashMap<FrontendKey, FrontendValue, { capacity::FRONTENDS as usize }> =
    HashMap::new();
#[btf_map]
static LB_SERVICES: HashMap<u32, ServiceValue, { capacity::SERVICES as usize }> = HashMap::new();
#[btf_map]
static LB_SLOTS: HashMap<SlotKey, u32, { capacity::SLOTS as usize }> = HashMap::new();
#[btf_map]
static LB_BACKENDS: HashMap<u32, BackendValue, { capacity::BACKENDS as usize }> = HashMap::new();
#[btf_map]
static LB_CONNTRACK: LruHashMap<CtKey, CtValue, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();
#[btf_map]
static LB_STATS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    match try_lb_ingress(&ctx) {
        Ok(action) => action,
        // A helper failed half way through a rewrite: never let a half-NATed packet out.
        Err(()) => {
            count(Counter::DropRewrite);
            aya_ebpf::bindings::TC_ACT_SHOT
        }
    }
}

/// The parts of an IPv4 TCP/UDP packet the load balancer decides on.
struct Packet {
    l4_off: usize,
    proto: u8,
    /// Addresses and ports exactly as on the wire (network order), for rewriting.
    src_raw: u32,
    dst_raw: u32,
    sport_raw: u16,
    dport_raw: u16,
    tcp_flags: u8,
}

impl Packet {
    fn flow_key(&self) -> CtKey {
        CtKey {
            src_addr: self.src_raw.to_ne_bytes(),
            dst_addr: self.dst_raw.to_ne_bytes(),
            src_port: u16::from_be(self.sport_raw),
            dst_port: u16::from_be(self.dport_raw),
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    fn l4_csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    /// Flags for bpf_l4_csum_replace: a zero UDP checksum means "none" and must stay zero.
    fn l4_csum_flags(&self) -> u64 {
        if self.proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        }
    }
}

fn try_lb_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = parse(ctx) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let key = pkt.flow_key();
    let now = unsafe { bpf_ktime_get_ns() };

    if let Some(ct) = LB_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup; we only touch plain integers.
        let ct = unsafe { &mut *ct };
        if ct.direction == CT_REPLY {
            touch(ct, now, pkt.tcp_flags);
            rewrite_src(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
            count(Counter::Reply);
            return Ok(TC_ACT_OK);
        }
        if backend_still_there(ct) {
            touch(ct, now, pkt.tcp_flags);
            rewrite_dst(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
            count(Counter::Forward);
            return Ok(TC_ACT_OK);
        }
        // The backend is gone (or its id was reused): forget the flow and balance it again
        // below rather than sending it into the void.
        let _ = LB_CONNTRACK.remove(key);
    }

    let frontend_key = FrontendKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: read-only use of a value the agent replaces atomically.
    let Some(frontend) = (unsafe { LB_FRONTENDS.get(frontend_key) }) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let service_id = frontend.service_id;
    let Some((backend_id, backend)) = pick_backend(service_id) else {
        count(Counter::DropNoBackend);
        return Ok(aya_ebpf::bindings::TC_ACT_SHOT);
    };

    let forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction: CT_FORWARD,
        tcp_flags: pkt.tcp_flags,
        backend_id,
        service_id,
        created_ns: now,
        last_seen_ns: now,
    };
    let (nat_addr, nat_port) = match LB_CONNTRACK.insert(key, forward, BPF_NOEXIST as u64) {
        Ok(()) => {
            record_reply(&key, &forward, now);
            count(Counter::NewFlow);
            (backend.addr, backend.port)
        }
        // Another CPU recorded this flow first: follow its choice so the flow stays on one
        // backend.
        Err(EEXIST) => match unsafe { LB_CONNTRACK.get(key) } {
            Some(winner) => (winner.nat_addr, winner.nat_port),
            None => (backend.addr, backend.port),
        },
        Err(_) => {
            count(Counter::DropCtFull);
            (backend.addr, backend.port)
        }
    };
    rewrite_dst(ctx, &pkt, nat_addr, nat_port)?;
    Ok(TC_ACT_OK)
}

/// Reads Ethernet, IPv4 and the first bytes of TCP/UDP. `None` means "not for us".
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let eth_proto: u16 = load(ctx, 12)?;
    if u16::from_be(eth_proto) != ETH_P_IP {
        return None;
    }
    let version_ihl: u8 = load(ctx, ETH_HLEN)?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let frag_off: u16 = load(ctx, ETH_HLEN + 6)?;
    let proto: u8 = load(ctx, ETH_HLEN + 9)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    if u16::from_be(frag_off) & IP_FRAG_MASK != 0 {
        // Only the first fragment carries ports; NATing it alone would split the datagram.
        count(Counter::Fragment);
        return None;
    }
    let src_raw: u32 = load(ctx, IP_SRC_OFF)?;
    let dst_raw: u32 = load(ctx, IP_DST_OFF)?;
    let l4_off = ETH_HLEN + ihl;
    let sport_raw: u16 = load(ctx, l4_off)?;
    let dport_raw: u16 = load(ctx, l4_off + 2)?;
    let tcp_flags = if proto == PROTO_TCP {
        // Make sure the whole fixed TCP header (and its checksum) is present.
        let _: u32 = load(ctx, l4_off + 16)?;
        load::<u8>(ctx, l4_off + 13)?
    } else {
        let _: u16 = load(ctx, l4_off + 6)?;
        0
    };
    Some(Packet {
        l4_off,
        proto,
        src_raw,
        dst_raw,
        sport_raw,
        dport_raw,
        tcp_flags,
    })
}

/// bpf_skb_load_bytes: works whether or not the bytes sit in the linear part of the skb.
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

#[inline(always)]
fn pick_backend(service_id: u32) -> Option<(u32, BackendValue)> {
    // SAFETY: read-only use of values the agent replaces atomically.
    let service = unsafe { LB_SERVICES.get(service_id) }?;
    let count = service.backend_count;
    if count == 0 {
        return None;
    }
    let slot = unsafe { bpf_get_prandom_u32() } % count;
    let backend_id = *unsafe { LB_SLOTS.get(SlotKey { service_id, slot }) }?;
    let backend = *unsafe { LB_BACKENDS.get(backend_id) }?;
    Some((backend_id, backend))
}

#[inline(always)]
fn backend_still_there(ct: &CtValue) -> bool {
    match unsafe { LB_BACKENDS.get(ct.backend_id) } {
        Some(b) => b.addr == ct.nat_addr && b.port == ct.nat_port,
        None => false,
    }
}

/// Records the reply direction so the backend's answers are translated back to the frontend.
#[inline(always)]
fn record_reply(key: &CtKey, forward: &CtValue, now: u64) {
    let reply_key = CtKey {
        src_addr: forward.nat_addr,
        dst_addr: key.src_addr,
        src_port: forward.nat_port,
        dst_port: key.src_port,
        proto: key.proto,
        _pad: [0; 3],
    };
    let reply = CtValue {
        nat_addr: key.dst_addr,
        nat_port: key.dst_port,
        direction: CT_REPLY,
        tcp_flags: 0,
        backend_id: forward.backend_id,
        service_id: forward.service_id,
        created_ns: now,
        last_seen_ns: now,
    };
    if LB_CONNTRACK
        .insert(reply_key, reply, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::DropCtFull);
    }
}

#[inline(always)]
fn touch(ct: &mut CtValue, now: u64, tcp_flags: u8) {
    ct.last_seen_ns = now;
    ct.tcp_flags |= tcp_flags;
}

#[inline(always)]
fn rewrite_dst(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        pkt,
        IP_DST_OFF,
        pkt.dst_raw,
        addr,
        pkt.l4_off + 2,
        pkt.dport_raw,
        port,
    )
}

#[inline(always)]
fn rewrite_src(ctx: &TcContext, pkt: &Packet, addr: [u8; 4], port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        pkt,
        IP_SRC_OFF,
        pkt.src_raw,
        addr,
        pkt.l4_off,
        pkt.sport_raw,
        port,
    )
}

/// Replaces one address and one port, fixing the IPv4 and L4 checksums incrementally.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: u32,
    new_addr: [u8; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let new_addr = u32::from_ne_bytes(new_addr);
    let new_port = new_port.to_be();
    let csum_off = pkt.l4_csum_off();
    let flags = pkt.l4_csum_flags();
    if new_addr != old_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            flags | BPF_F_PSEUDO_HDR as u64 | size_of::<u32>() as u64,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
    }
    if new_port != old_port {
        ctx.l4_csum_replace(
            csum_off,
            old_port as u64,
            new_port as u64,
            flags | size_of::<u16>() as u64,
        )
        .map_err(|_| ())?;
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = LB_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}
