//! ICMP errors about translated flows (a backend's port unreachable, a router's fragmentation
//! needed, a client's unreachable about a reply) are translated like the flow they quote, so
//! the sender of the quoted packet recognises it: the client sees the frontend, the backend
//! sees itself.
//!
//! The quoted TCP/UDP checksum is left as is: it covers bytes the quote does not carry, and
//! receivers do not check it.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{Counter, CtKey, CT_REPLY, PROTO_TCP, PROTO_UDP};

use crate::{
    headers::{csum_update16, load, Ipv4, ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
    maps::{count, LB_CONNTRACK},
};

const TC_ACT_UNSPEC: i32 = -1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Where the parts of the error sit in the packet.
struct Offsets {
    icmp_csum: usize,
    inner_ip: usize,
    inner_l4: usize,
}

pub fn translate_error(ctx: &TcContext, ip: &Ipv4) -> Result<i32, ()> {
    // The quote (IPv4 header and ports) must lie inside the IPv4 packet: bytes past its total
    // length are padding, which the ICMP checksum does not cover.
    if ip.total_len < ip.ihl + 8 + 20 + 4 {
        return Ok(TC_ACT_UNSPEC);
    }
    let icmp_off = ETH_HLEN + ip.ihl;
    let Some(icmp_type) = load::<u8>(ctx, icmp_off) else {
        return Ok(TC_ACT_UNSPEC);
    };
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return Ok(TC_ACT_UNSPEC);
    }
    let inner_ip = icmp_off + 8;
    let Some(inner) = load::<[u8; 20]>(ctx, inner_ip) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let proto = inner[9];
    if inner[0] != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Ok(TC_ACT_UNSPEC);
    }
    let inner_l4 = inner_ip + 20;
    let Some(ports) = load::<[u8; 4]>(ctx, inner_l4) else {
        return Ok(TC_ACT_UNSPEC);
    };
    let inner_src = [inner[12], inner[13], inner[14], inner[15]];
    let inner_dst = [inner[16], inner[17], inner[18], inner[19]];
    let inner_sport = u16::from_be_bytes([ports[0], ports[1]]);
    let inner_dport = u16::from_be_bytes([ports[2], ports[3]]);
    // The quoted packet travelled the other way: its reverse is the flow this error belongs to.
    let key = CtKey {
        src_addr: inner_dst,
        dst_addr: inner_src,
        src_port: inner_dport,
        dst_port: inner_sport,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: read-only copy of the entry.
    let Some(ct) = (unsafe { LB_CONNTRACK.get(key) }).copied() else {
        return Ok(TC_ACT_UNSPEC);
    };
    let at = Offsets {
        icmp_csum: icmp_off + 2,
        inner_ip,
        inner_l4,
    };
    let outer_src = ip.src_raw.to_ne_bytes();
    let outer_dst = ip.dst_raw.to_ne_bytes();
    let snat = ct.snat_addr != [0; 4];
    if ct.direction == CT_REPLY {
        // The client's packet, sent to a backend, bounced: show the frontend instead.
        set_inner_addr(ctx, &at, 16, inner_dst, ct.nat_addr)?;
        set_inner_port(ctx, &at, 2, inner_dport, ct.nat_port)?;
        if outer_src == inner_dst {
            set_outer_addr(ctx, IP_SRC_OFF, outer_src, ct.nat_addr)?;
        }
        if snat {
            set_inner_addr(ctx, &at, 12, inner_src, ct.snat_addr)?;
            if ct.snat_port != 0 {
                set_inner_port(ctx, &at, 0, inner_sport, ct.snat_port)?;
            }
            set_outer_addr(ctx, IP_DST_OFF, outer_dst, ct.snat_addr)?;
        }
    } else {
        // The backend's reply, shown to the client as the frontend's, bounced: give the
        // backend back its own address.
        set_inner_addr(ctx, &at, 12, inner_src, ct.nat_addr)?;
        set_inner_port(ctx, &at, 0, inner_sport, ct.nat_port)?;
        if outer_dst == inner_src {
            set_outer_addr(ctx, IP_DST_OFF, outer_dst, ct.nat_addr)?;
        }
        if snat {
            set_inner_addr(ctx, &at, 16, inner_dst, ct.snat_addr)?;
            if ct.snat_port != 0 {
                set_inner_port(ctx, &at, 2, inner_dport, ct.snat_port)?;
            }
            set_outer_addr(ctx, IP_SRC_OFF, outer_src, ct.snat_addr)?;
        }
    }
    count(Counter::IcmpTranslated);
    if ct.direction == CT_REPLY && ct.return_ifindex != 0 {
        // From a node address: back the way the flow came, like the flow's own replies.
        return crate::datapath::return_to_sender(ctx, &ct);
    }
    Ok(TC_ACT_OK)
}

/// Rewrites an address of the quoted IPv4 header (`field` = 12 source, 16 destination),
/// fixing the quoted header's checksum and the ICMP checksum that covers both.
fn set_inner_addr(
    ctx: &TcContext,
    at: &Offsets,
    field: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let old_csum_raw = load::<u16>(ctx, at.inner_ip + 10).ok_or(())?;
    let mut csum = u16::from_be(old_csum_raw);
    csum = csum_update16(
        csum,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    csum = csum_update16(
        csum,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    );
    let new_csum_raw = csum.to_be();
    let (old_raw, new_raw) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    ctx.l4_csum_replace(at.icmp_csum, old_raw as u64, new_raw as u64, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(at.icmp_csum, old_csum_raw as u64, new_csum_raw as u64, 2)
        .map_err(|_| ())?;
    ctx.store(at.inner_ip + field, &new_raw, 0)
        .map_err(|_| ())?;
    ctx.store(at.inner_ip + 10, &new_csum_raw, 0)
        .map_err(|_| ())
}

/// Rewrites a quoted port (`field` = 0 source, 2 destination), fixing the ICMP checksum.
fn set_inner_port(
    ctx: &TcContext,
    at: &Offsets,
    field: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let (old_raw, new_raw) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(at.icmp_csum, old_raw as u64, new_raw as u64, 2)
        .map_err(|_| ())?;
    ctx.store(at.inner_l4 + field, &new_raw, 0).map_err(|_| ())
}

/// Rewrites an address of the outer header; ICMP has no pseudo header, so only the IPv4
/// checksum changes.
fn set_outer_addr(ctx: &TcContext, off: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let (old_raw, new_raw) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    ctx.l3_csum_replace(IP_CSUM_OFF, old_raw as u64, new_raw as u64, 4)
        .map_err(|_| ())?;
    ctx.store(off, &new_raw, 0).map_err(|_| ())
}
