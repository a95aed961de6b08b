//! Reading and rewriting Ethernet / IPv4 / TCP / UDP headers.
//!
//! The hot path reads through packet pointers into the linear part (pulled there only when
//! short) and writes with `bpf_skb_store_bytes` (see `write`); cold paths read through
//! `bpf_skb_load_bytes`. The checksums are fixed incrementally, the IPv4 header's by the
//! program, the L4 one by the csum helpers (which know the skb's checksum state).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_update,
    programs::TcContext,
};
use lb_common::{CtKey, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
/// Bytes from the IPv4 checksum to the end of the destination address.
const IP_CSUM_TO_DST_END: usize = IP_DST_OFF + 4 - IP_CSUM_OFF;
pub const PROTO_ICMP: u8 = 1;
/// More-fragments flag and fragment offset bits of `frag_off`.
const IP_FRAG_MASK: u16 = 0x3fff;

/// Copies `T` out of the packet with bpf_skb_load_bytes (cold paths; works on any skb).
#[inline(always)]
pub fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// Direct packet access: a bounds-checked pointer into the linear data (hot path).
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked the bounds; packet bytes may be unaligned.
    ptr_at::<T>(ctx, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Writes with bpf_skb_store_bytes, never through a packet pointer: one direct write anywhere
/// in the program makes the verifier prepend a prologue that, for every cloned skb the program
/// sees, translated or not, calls `bpf_skb_pull_data(skb, 0)`: the whole linear part made
/// writable, its head copied when the clone does not own all of it. With both CPUs busy that
/// cost 6 points of connections per second, more than all of the program's own work
/// (docs/benchmarks.md); the helper makes writable only the packets it writes, only as far
/// as it writes.
#[inline(always)]
fn write<T>(ctx: &TcContext, off: usize, value: &T) -> Result<(), ()> {
    ctx.store(off, value, 0).map_err(|_| ())
}

/// Ethernet, IPv4 without options, TCP without options: what nearly every packet's linear
/// part already holds, so nearly none needs a pull.
const HEADERS_COMMON: usize = ETH_HLEN + 20 + 20;
/// The longest TCP/UDP header the hot path reads (TCP without its options).
const L4_READ: usize = 20;

/// Makes the first `want` bytes (at most the packet) readable through packet pointers. Only a
/// packet whose linear part is shorter is pulled: a pull past a TCP clone's own headers (into
/// its payload) copies the packet head.
#[inline(always)]
fn ensure_linear(ctx: &TcContext, want: usize) -> bool {
    let len = ctx.len() as usize;
    let want = if len < want { len } else { want };
    ctx.data_end() - ctx.data() >= want || ctx.pull_data(want as u32).is_ok()
}

/// An IPv4 header that passed the sanity checks.
pub struct Ipv4 {
    pub proto: u8,
    /// Header length in bytes (20..=60).
    pub ihl: usize,
    /// Total length from the header (IP header + payload).
    pub total_len: usize,
    /// Addresses exactly as on the wire.
    pub src_raw: u32,
    pub dst_raw: u32,
}

pub enum Parsed {
    /// Not IPv4 at all (ARP, IPv6, ...).
    NotIpv4,
    /// IPv4 whose lengths do not add up, or whose L4 header is cut short.
    Malformed,
    /// A fragment: only the first carries ports, so none is translated.
    Fragment,
    Ipv4(Ipv4),
}

#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Parsed {
    // Headers normally sit in the linear part; pull them there when they do not.
    let len = ctx.len() as usize;
    if !ensure_linear(ctx, HEADERS_COMMON) {
        return Parsed::Malformed;
    }
    let Some(eth_proto) = read::<u16>(ctx, 12) else {
        return Parsed::NotIpv4;
    };
    if u16::from_be(eth_proto) != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    let Some(head) = read::<[u8; 20]>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    if head[0] >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = ((head[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([head[2], head[3]]) as usize;
    if ihl < 20 || total_len < ihl || ETH_HLEN + total_len > len {
        return Parsed::Malformed;
    }
    if u16::from_be_bytes([head[6], head[7]]) & IP_FRAG_MASK != 0 {
        return Parsed::Fragment;
    }
    // IP options push the L4 header past the common length.
    if ihl > 20 && !ensure_linear(ctx, ETH_HLEN + ihl + L4_READ) {
        return Parsed::Malformed;
    }
    Parsed::Ipv4(Ipv4 {
        proto: head[9],
        ihl,
        total_len,
        src_raw: u32::from_ne_bytes([head[12], head[13], head[14], head[15]]),
        dst_raw: u32::from_ne_bytes([head[16], head[17], head[18], head[19]]),
    })
}

/// A TCP or UDP packet the load balancer may translate.
pub struct Packet {
    pub l4_off: usize,
    pub proto: u8,
    pub src_raw: u32,
    pub dst_raw: u32,
    pub sport_raw: u16,
    pub dport_raw: u16,
    pub tcp_flags: u8,
    /// TCP: header length (for building a reset); UDP: 8.
    pub l4_hlen: usize,
    pub ip: Ipv4,
}

/// Reads the TCP/UDP header; `None` when it is cut short or its lengths are impossible.
#[inline(always)]
pub fn parse_l4(ctx: &TcContext, ip: Ipv4) -> Option<Packet> {
    let l4_off = ETH_HLEN + ip.ihl;
    let l4_len = ip.total_len - ip.ihl;
    let (ports, tcp_flags, l4_hlen) = if ip.proto == PROTO_TCP {
        let head = read::<[u8; 20]>(ctx, l4_off)?;
        let doff = ((head[12] >> 4) as usize) * 4;
        if doff < 20 || doff > l4_len {
            return None;
        }
        ([head[0], head[1], head[2], head[3]], head[13], doff)
    } else {
        let head = read::<[u8; 8]>(ctx, l4_off)?;
        let udp_len = u16::from_be_bytes([head[4], head[5]]) as usize;
        if udp_len < 8 || udp_len > l4_len {
            return None;
        }
        ([head[0], head[1], head[2], head[3]], 0, 8)
    };
    Some(Packet {
        l4_off,
        proto: ip.proto,
        src_raw: ip.src_raw,
        dst_raw: ip.dst_raw,
        sport_raw: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_raw: u16::from_ne_bytes([ports[2], ports[3]]),
        tcp_flags,
        l4_hlen,
        ip,
    })
}

impl Packet {
    pub fn flow_key(&self) -> CtKey {
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

    /// Rewrites the destination (the backend of a forward packet).
    pub fn set_dst(&self, ctx: &TcContext, addr: [u8; 4], port: u16) -> Result<(), ()> {
        self.rewrite(
            ctx,
            IP_DST_OFF,
            self.dst_raw,
            addr,
            self.l4_off + 2,
            self.dport_raw,
            port,
        )
    }

    /// Rewrites the source (the frontend of a reply).
    pub fn set_src(&self, ctx: &TcContext, addr: [u8; 4], port: u16) -> Result<(), ()> {
        self.rewrite(
            ctx,
            IP_SRC_OFF,
            self.src_raw,
            addr,
            self.l4_off,
            self.sport_raw,
            port,
        )
    }

    /// Rewrites the source address, and the port when `port` is not 0 (0 = keep it).
    pub fn set_src_keeping(&self, ctx: &TcContext, addr: [u8; 4], port: u16) -> Result<(), ()> {
        let port = if port != 0 {
            port
        } else {
            u16::from_be(self.sport_raw)
        };
        self.set_src(ctx, addr, port)
    }

    /// Rewrites the destination address, and the port when `port` is not 0 (0 = keep it).
    pub fn set_dst_keeping(&self, ctx: &TcContext, addr: [u8; 4], port: u16) -> Result<(), ()> {
        let port = if port != 0 {
            port
        } else {
            u16::from_be(self.dport_raw)
        };
        self.set_dst(ctx, addr, port)
    }

    /// Replaces an address and a port (host order): the IPv4 checksum is computed here and
    /// stored with the addresses, the L4 checksum (pseudo header for the address) is fixed by
    /// the csum helpers, which also keep the skb's checksum state right (CHECKSUM_PARTIAL /
    /// COMPLETE). All packet-pointer reads come before the first helper call (the store and
    /// csum helpers invalidate packet pointers).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn rewrite(
        &self,
        ctx: &TcContext,
        addr_off: usize,
        old_addr: u32,
        new_addr: [u8; 4],
        port_off: usize,
        old_port: u16,
        new_port: u16,
    ) -> Result<(), ()> {
        let new_addr = u32::from_ne_bytes(new_addr);
        let new_port = new_port.to_be();
        let addr_changed = new_addr != old_addr;
        let port_changed = new_port != old_port;
        let csum_off = self.l4_csum_off();
        // Read before any write: a UDP datagram without checksum needs the port fixed below.
        let udp_unchecked =
            port_changed && self.proto == PROTO_UDP && read::<u16>(ctx, csum_off) == Some(0);
        if addr_changed {
            // The header's sum stays what it was (the checksum field balances the address), so
            // no skb checksum state depends on it: fixed here rather than by a helper call.
            // Checksum, source and destination are adjacent: one store writes all three.
            let mut ip = read::<[u8; IP_CSUM_TO_DST_END]>(ctx, IP_CSUM_OFF).ok_or(())?;
            let ip_csum = u16::from_ne_bytes([ip[0], ip[1]]);
            let csum = csum_replace4(ip_csum, old_addr, new_addr).to_ne_bytes();
            ip[0] = csum[0];
            ip[1] = csum[1];
            let at = addr_off - IP_CSUM_OFF;
            ip.get_mut(at..at + 4)
                .ok_or(())?
                .copy_from_slice(&new_addr.to_ne_bytes());
            write(ctx, IP_CSUM_OFF, &ip)?;
        }
        if port_changed {
            write(ctx, port_off, &new_port)?;
        }
        let flags = self.l4_csum_flags();
        if addr_changed {
            ctx.l4_csum_replace(
                csum_off,
                old_addr as u64,
                new_addr as u64,
                flags | BPF_F_PSEUDO_HDR as u64 | size_of::<u32>() as u64,
            )
            .map_err(|_| ())?;
        }
        if port_changed {
            ctx.l4_csum_replace(
                csum_off,
                old_port as u64,
                new_port as u64,
                flags | size_of::<u16>() as u64,
            )
            .map_err(|_| ())?;
            if udp_unchecked {
                // That helper leaves a zero checksum alone, skb->csum included, so nothing
                // balances the port's bytes in a CHECKSUM_COMPLETE skb's sum: add their change.
                // SAFETY: plain helper call on the program's own skb; it fails (harmlessly)
                // unless the skb is CHECKSUM_COMPLETE.
                unsafe { bpf_csum_update(ctx.skb.skb, u32::from(!old_port) + u32::from(new_port)) };
            }
        }
        Ok(())
    }
}

/// One's-complement sum of 16-bit big-endian words (RFC 1071), not yet folded or inverted.
#[inline(always)]
pub fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a sum to 16 bits and inverts it: the value to write in a checksum field.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Incremental update of a checksum for one 16-bit word changing from `old` to `new`
/// (RFC 1624, eqn. 3); all values big-endian as numbers.
#[inline(always)]
pub fn csum_update16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = (!csum as u32) + (!old as u32) + new as u32;
    fold(sum)
}

/// Incremental update of a checksum for one 32-bit field changing from `from` to `to` (RFC
/// 1624, eqn. 3). Every value as loaded from the packet: the one's-complement sum does not
/// depend on byte order as long as all its words are read alike.
#[inline(always)]
pub fn csum_replace4(csum: u16, from: u32, to: u32) -> u16 {
    let sum = (!csum as u32)
        + (!(from as u16) as u32)
        + (!((from >> 16) as u16) as u32)
        + (to as u16 as u32)
        + ((to >> 16) as u16 as u32);
    fold(sum)
}
