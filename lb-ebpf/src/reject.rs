//! Answering a packet instead of forwarding it: a TCP reset, or an ICMP port unreachable. The
//! packet is rewritten in place into the answer and sent back out of the interface it came in
//! on, so the client learns at once that nobody serves the frontend (as kube-proxy's REJECT).

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::headers::{fold, load, sum_words, Packet, ETH_HLEN, PROTO_ICMP};

const RST_LEN: usize = ETH_HLEN + 20 + 20;
/// Original IPv4 header (no options) and the first 8 bytes of its payload, as RFC 792 asks.
const QUOTE_LEN: usize = 28;
const ICMP_LEN: usize = ETH_HLEN + 20 + 8 + QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

/// Rejects `pkt` the way its protocol expects.
#[inline(always)]
pub fn reject(ctx: &TcContext, pkt: &Packet) -> Result<i32, ()> {
    if pkt.proto == lb_common::PROTO_TCP {
        tcp_reset(ctx, pkt)
    } else {
        icmp_port_unreachable(ctx, pkt)
    }
}

/// Ethernet header of the answer: the sender's MAC becomes the destination.
#[inline(always)]
fn swapped_eth(ctx: &TcContext) -> Result<[u8; ETH_HLEN], ()> {
    let eth = load::<[u8; ETH_HLEN]>(ctx, 0).ok_or(())?;
    let mut out = [0u8; ETH_HLEN];
    out[..6].copy_from_slice(&eth[6..12]);
    out[6..12].copy_from_slice(&eth[..6]);
    out[12] = 0x08;
    out[13] = 0x00;
    Ok(out)
}

/// IPv4 header of the answer (no options, DF, TTL 64) with its checksum.
#[inline(always)]
fn ipv4_header(total_len: u16, proto: u8, src: u32, dst: u32) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.to_ne_bytes());
    ip[16..20].copy_from_slice(&dst.to_ne_bytes());
    let csum = fold(sum_words(&ip, 0));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip
}

/// Truncates or extends the packet to `len`, writes `bytes` over it and sends it back out of
/// the interface it arrived on.
#[inline(always)]
fn send_back<const N: usize>(ctx: &TcContext, bytes: &[u8; N]) -> Result<i32, ()> {
    // SAFETY: the context pointer is the program's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(0, bytes, 0).map_err(|_| ())?;
    // SAFETY: as above; ifindex is the device the packet arrived on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// RFC 793 reset: answers with the sequence number the sender expects.
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, pkt: &Packet) -> Result<i32, ()> {
    if pkt.tcp_flags & TCP_RST != 0 {
        return Ok(TC_ACT_SHOT); // never answer a reset with a reset
    }
    let tcp = load::<[u8; 20]>(ctx, pkt.l4_off).ok_or(())?;
    let their_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let their_ack = [tcp[8], tcp[9], tcp[10], tcp[11]];
    let payload = (pkt.ip.total_len - pkt.ip.ihl - pkt.l4_hlen) as u32;

    let mut out = [0u8; RST_LEN];
    out[..ETH_HLEN].copy_from_slice(&swapped_eth(ctx)?);
    out[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ipv4_header(40, 6, pkt.dst_raw, pkt.src_raw));
    let t = ETH_HLEN + 20;
    out[t..t + 2].copy_from_slice(&pkt.dport_raw.to_ne_bytes());
    out[t + 2..t + 4].copy_from_slice(&pkt.sport_raw.to_ne_bytes());
    if pkt.tcp_flags & TCP_ACK != 0 {
        out[t + 4..t + 8].copy_from_slice(&their_ack);
        out[t + 13] = TCP_RST;
    } else {
        let consumed = payload
            + u32::from(pkt.tcp_flags & TCP_SYN != 0)
            + u32::from(pkt.tcp_flags & TCP_FIN != 0);
        out[t + 8..t + 12].copy_from_slice(&their_seq.wrapping_add(consumed).to_be_bytes());
        out[t + 13] = TCP_RST | TCP_ACK;
    }
    out[t + 12] = 5 << 4;
    // Pseudo header: addresses, protocol, TCP length.
    let mut sum = sum_words(&out[ETH_HLEN + 12..ETH_HLEN + 20], 6 + 20);
    sum = sum_words(&out[t..t + 20], sum);
    out[t + 16..t + 18].copy_from_slice(&fold(sum).to_be_bytes());
    send_back(ctx, &out)
}

/// RFC 792 destination unreachable (port unreachable) quoting the offending datagram.
#[inline(always)]
pub fn icmp_port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<i32, ()> {
    if pkt.ip.ihl != 20 {
        // Quoting a header with options would need a variable-length copy; drop instead.
        return Ok(TC_ACT_SHOT);
    }
    let quote = load::<[u8; QUOTE_LEN]>(ctx, ETH_HLEN).ok_or(())?;
    let mut out = [0u8; ICMP_LEN];
    out[..ETH_HLEN].copy_from_slice(&swapped_eth(ctx)?);
    out[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ipv4_header(
        (20 + 8 + QUOTE_LEN) as u16,
        PROTO_ICMP,
        pkt.dst_raw,
        pkt.src_raw,
    ));
    let i = ETH_HLEN + 20;
    out[i] = ICMP_DEST_UNREACH;
    out[i + 1] = ICMP_PORT_UNREACH;
    out[i + 8..].copy_from_slice(&quote);
    let csum = fold(sum_words(&out[i..], 0));
    out[i + 2..i + 4].copy_from_slice(&csum.to_be_bytes());
    send_back(ctx, &out)
}
