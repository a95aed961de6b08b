//! Keys and values of the BPF maps, shared by the kernel programs (`lb-ebpf`) and the agent.
//!
//! Conventions, chosen so that `bpftool map dump` is readable without decoding:
//! - IPv4 addresses are `[u8; 4]` in network order (they print as `[10,96,0,10]`);
//! - ports are `u16` in host order (they print as `80`, not `20480`); the datapath converts;
//! - every struct is `#[repr(C)]` with explicit padding fields, so the layout is the same on
//!   both sides and the kernel never sees uninitialised bytes in a hash key.
//!
//! Map layout (one place, so the whole datapath state can be read here):
//!
//! ```text
//! LB_FRONTENDS      FrontendKey {addr, port, proto}       -> FrontendValue {service_id, kind}
//! LB_SERVICES       service_id (array index)              -> ServiceValue {backend_count, slot_base, ..}
//! LB_AFFINITY       AffinityKey {service_id, client}      -> AffinityValue {backend_id} (LRU)
//! LB_SERVICE_NAMES  service_id                            -> ServiceName (operators only)
//! LB_SLOTS          slot_base + slot (array index)        -> SlotValue {backend_id, service_id}
//! LB_MAGLEV         0 -> M; 1 + (table - 1) * M + index    -> backend_id (Maglev services)
//! LB_BACKENDS       backend_id (array index)              -> BackendValue {addr, port}
//! LB_SOURCE_RANGES  LPM {frontend, client prefix}         -> 1 (allowed)
//! LB_CONNTRACK      CtKey {src, dst, sport, dport, proto} -> CtValue (LRU)
//! LB_SERVICE_STATS  service_id                            -> ServiceStats (per CPU)
//! LB_STATS          Counter as u32                        -> u64 (per CPU)
//! LB_ADDR_FILTER    addr_filter::bit(..) / 64 (array)     -> u64 (bits of frontends, backends)
//! ```
//!
//! A "service" here is one backend set: a Service port seen from one traffic scope. Several
//! frontends (ClusterIP, NodePorts, ...) may share it, so an endpoint change rewrites only that
//! service's slots, never every frontend.
#![no_std]

/// Bumped whenever a key or value layout below changes; stamped into the pinned state.
pub const MAP_LAYOUT_VERSION: u32 = 14;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `LB_META[0]`: what the pinned state is, so that a new agent never misreads an old layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// `MAP_LAYOUT_VERSION` of the agent that created the maps.
    pub layout_version: u32,
}

/// Names of the maps, as declared in the kernel object and pinned under the agent's directory.
pub mod map_names {
    pub const FRONTENDS: &str = "LB_FRONTENDS";
    pub const SERVICES: &str = "LB_SERVICES";
    pub const SERVICE_NAMES: &str = "LB_SERVICE_NAMES";
    pub const SLOTS: &str = "LB_SLOTS";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const SOURCE_RANGES: &str = "LB_SOURCE_RANGES";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const SERVICE_STATS: &str = "LB_SERVICE_STATS";
    pub const STATS: &str = "LB_STATS";
    pub const META: &str = "LB_META";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const MAGLEV: &str = "LB_MAGLEV";
    pub const SOCK_REVNAT: &str = "LB_SOCK_REVNAT";
    pub const ADDR_FILTER: &str = "LB_ADDR_FILTER";
    pub const ALL: [&str; 14] = [
        META,
        AFFINITY,
        MAGLEV,
        FRONTENDS,
        SERVICES,
        SERVICE_NAMES,
        SLOTS,
        BACKENDS,
        SOURCE_RANGES,
        CONNTRACK,
        SERVICE_STATS,
        STATS,
        SOCK_REVNAT,
        ADDR_FILTER,
    ];
}

/// Capacities of the maps (entries). The agent may override them at load time.
pub mod capacity {
    pub const FRONTENDS: u32 = 65_536;
    pub const SERVICES: u32 = 65_536;
    pub const SLOTS: u32 = 262_144;
    pub const BACKENDS: u32 = 65_536;
    pub const SOURCE_RANGES: u32 = 16_384;
    pub const CONNTRACK: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    /// Open sockets the connect hook sent to a backend (notes for `getpeername`, LRU).
    pub const SOCK_REVNAT: u32 = 65_536;
    /// Maglev tables of the table size: one per Maglev service, two, four or eight for a
    /// service with many backends (its table grows to keep disruption low).
    pub const MAGLEV_SERVICES: u32 = 64;
    /// `LB_MAGLEV` entries: the size stamp, then `MAGLEV_SERVICES` tables of the default size.
    pub const MAGLEV_ENTRIES: u32 = 1 + MAGLEV_SERVICES * super::MAGLEV_TABLE_SIZE;
}

/// `LB_ADDR_FILTER`: one bit per hash of a frontend (address, port, protocol) and one per hash
/// of a backend's, so that the datapath can pass a packet that is neither to a frontend nor
/// from a backend (no translated flow has such a packet) without its two hash lookups. A set
/// bit may be stale or shared (then the lookups run as before); a clear bit must never hide a
/// frontend or a connection still in conntrack, which the agent sees to.
pub mod addr_filter {
    /// 64-bit words in the array: 2^20 bits (128 KiB), few false hits with 100,000 entries.
    pub const WORDS: u32 = 16_384;
    pub const BITS: u32 = WORDS * 64;
    // A word is a hash masked by `WORDS - 1`.
    const _: () = assert!(WORDS.is_power_of_two());
    /// Distinct seeds, so that a frontend and a backend on one address and port take different
    /// bits of their word.
    pub const FRONTEND: u32 = 0x9e37_79b9;
    pub const BACKEND: u32 = 0x7f4a_7c15;

    /// The bit of `(addr, port, proto)` in the role `seed` (`FRONTEND` or `BACKEND`); `port`
    /// in host order, as in every key here. The kernel program and the agent share this.
    ///
    /// The word comes from the address alone, whatever the role, and the bit in it from the
    /// port and the role: every key of one address shares a word, so the words a node's
    /// traffic reads are as few as the addresses it talks to (the ephemeral ports of a client
    /// would otherwise scatter its packets over the whole array, a cache miss each), and a
    /// flow's replies read the very words its requests just read (the reply's source is the
    /// request's destination).
    #[inline(always)]
    pub fn bit(addr: [u8; 4], port: u16, proto: u8, seed: u32) -> u32 {
        // murmur3's finaliser: dense pod and Service ranges spread over every word.
        let mut h = u32::from_le_bytes(addr).wrapping_mul(0xcc9e_2d51);
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        let word = h & (WORDS - 1);
        // Fibonacci hashing: the top six bits of the product.
        let in_word =
            (((u32::from(port) << 8) | u32::from(proto)) ^ seed).wrapping_mul(0x9e37_79b1) >> 26;
        word * 64 + in_word
    }
}

/// Default Maglev lookup table size (entries per Maglev service). Prime, as the permutation
/// needs. A service with more backends than it holds at 600 entries each (27) gets a larger
/// table, spanning two, four or eight of these, which keeps the disruption of a backend change
/// under 1%.
pub const MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Conntrack lifetimes: how long an entry lives after its latest packet.
pub mod timeouts {
    const S: u64 = 1_000_000_000;
    /// TCP before the handshake completes (only SYNs seen in this direction).
    pub const TCP_SYN_NS: u64 = 60 * S;
    /// Established TCP.
    pub const TCP_ESTABLISHED_NS: u64 = 6 * 3600 * S;
    /// TCP after FIN or RST.
    pub const TCP_CLOSING_NS: u64 = 10 * S;
    /// UDP (no connection state to go by).
    pub const UDP_NS: u64 = 60 * S;
}

/// Load-time settings of the kernel program (read-only globals, set by the agent).
pub mod globals {
    /// `u8`: 1 = silently drop new flows to a frontend with no backend; 0 = reject them
    /// (TCP RST, ICMP port unreachable).
    pub const NO_BACKEND_DROP: &str = "LB_NO_BACKEND_DROP";
    /// `[u8; 4]`: this node's address for source-NATing external traffic sent to an endpoint
    /// on another node; `[0; 4]` = never source-NAT.
    pub const SNAT_ADDR: &str = "LB_SNAT_ADDR";
    /// `[u8; 4]`: source address given to hairpin flows (a pod reaching itself through its
    /// Service), so the pod answers through the node instead of to itself.
    pub const HAIRPIN_ADDR: &str = "LB_HAIRPIN_ADDR";
    /// `u32`: entries per Maglev table (`M`, prime); a flow's entry is `flow_hash % M`.
    pub const MAGLEV_TABLE_SIZE: &str = "LB_MAGLEV_TABLE_SIZE";
}

/// A service frontend: where clients send traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendValue {
    pub service_id: u32,
    /// One of the `KIND_*` constants (for operators; the datapath treats all alike).
    pub kind: u8,
    /// `FRONTEND_*` bits.
    pub flags: u8,
    pub _pad: u16,
}

pub const KIND_CLUSTER_IP: u8 = 0;
pub const KIND_NODE_PORT: u8 = 1;
pub const KIND_LOAD_BALANCER: u8 = 2;
pub const KIND_EXTERNAL_IP: u8 = 3;

/// Only clients listed in `LB_SOURCE_RANGES` for this frontend may use it.
pub const FRONTEND_SOURCE_RANGES: u8 = 1;
/// The frontend address is one of the node's own (NodePort, or a LoadBalancer IP / externalIP
/// assigned to the node): replies go straight back out of the arrival interface.
pub const FRONTEND_LOCAL_ADDRESS: u8 = 2;

/// LPM trie data of `LB_SOURCE_RANGES`: the frontend (exact, 64 bits) then the client prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    pub frontend: FrontendKey,
    pub client: [u8; 4],
}

/// Prefix length of the `frontend` part of a [`SourceRangeKey`].
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 64;

/// Per-service traffic, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Client to backend.
    pub packets: u64,
    pub bytes: u64,
    /// Backend to client (replies).
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

/// Room for `namespace/name:port/proto` at Kubernetes maximum lengths (63 + 63 + 15 + 4 + 3).
pub const SERVICE_NAME_LEN: usize = 160;

/// Kept small: the datapath reads it for every new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Number of valid slots for this service (0 = no usable backend).
    pub backend_count: u32,
    /// Where the service's slots start in `LB_SLOTS`: slot `i` is `LB_SLOTS[slot_base + i]`.
    pub slot_base: u32,
    pub flags: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// With `SERVICE_MAGLEV`: the service's table in `LB_MAGLEV`, from 1 (its entries start
    /// at `maglev_start(maglev_table, M)`); 0 = none.
    pub maglev_table: u32,
    /// Entries of that table (prime): M, or for a service with many backends a larger prime
    /// spanning the next tables too (ceil(maglev_size / M) tables in all).
    pub maglev_size: u32,
}

/// `LB_SOCK_REVNAT` value (by socket cookie): where the connect hook sent the socket and the
/// frontend it asked for, so that `getpeername` answers with the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat {
    pub frontend_addr: [u8; 4],
    pub backend_addr: [u8; 4],
    pub frontend_port: u16,
    pub backend_port: u16,
    pub _pad: u32,
}

/// `LB_AFFINITY` key: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client: [u8; 4],
}

/// The backend a client of an affinity service was last sent to, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// The slot it was picked from; the entry holds only while that slot still names it.
    pub slot: u32,
    /// `bpf_ktime_get_coarse_ns()` of the latest new flow that used it.
    pub last_used_ns: u64,
}

/// `ServiceValue::flags`: a new flow finding no backend is dropped, not rejected (a Local
/// traffic policy leaves this node without endpoints while other nodes have some).
pub const SERVICE_DROP_WHEN_EMPTY: u32 = 1;
/// `ServiceValue::flags`: new flows pick `LB_MAGLEV[table][flow_hash % M]` (consistent
/// hashing) instead of a random slot.
pub const SERVICE_MAGLEV: u32 = 2;
/// `AffinityValue::slot` with this bit: the rest is the Maglev table index the backend was
/// picked from (the entry holds while that index still names it), not a slot.
pub const AFFINITY_MAGLEV_INDEX: u32 = 1 << 31;

/// `LB_MAGLEV` is one array: entry 0 holds the table size M it was laid out for (so readers
/// and a restarted agent need no flag to interpret it), then table 1, table 2, ... of M
/// entries each. An array, not a map per service: one lookup, preallocated, no map-in-map.
#[inline(always)]
pub const fn maglev_start(table: u32, size: u32) -> u32 {
    // Wrapping: never panics in the kernel build; table 0 is never looked up.
    table.wrapping_sub(1).wrapping_mul(size).wrapping_add(1)
}

/// The hash a Maglev service's table is indexed with (`% M`): a murmur3-style mix of the
/// 5-tuple, the same on every node and in the agent's tests. Cheap for the verifier: 32-bit
/// multiplies and shifts, no loops.
#[inline(always)]
pub fn flow_hash(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16, proto: u8) -> u32 {
    #[inline(always)]
    fn mix(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
    let mut h = mix(0x9e37_79b9 ^ u32::from(proto));
    h = mix(h ^ u32::from_be_bytes(src));
    h = mix(h ^ u32::from_be_bytes(dst));
    mix(h ^ ((u32::from(src_port) << 16) | u32::from(dst_port)))
}

/// `namespace/name:port/proto`, NUL padded; for operators (the kernel never reads it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub name: [u8; SERVICE_NAME_LEN],
}

impl Default for ServiceName {
    fn default() -> Self {
        Self {
            name: [0; SERVICE_NAME_LEN],
        }
    }
}

/// An entry of the `LB_SLOTS` array. Each service owns a run of consecutive entries (with
/// room to grow); the owner's id is stored with the backend so that a reader holding an
/// outdated `slot_base` or count (the agent moved or shrank the run meanwhile) never takes
/// another service's backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotValue {
    pub backend_id: u32,
    pub service_id: u32,
}

/// `BackendValue::flags`: the endpoint runs on another node. External traffic to it is
/// source-NATed to this node (externalTrafficPolicy Cluster), so its replies come back here.
pub const BACKEND_REMOTE: u8 = 1;
/// `BackendValue::flags`: the endpoint is terminating (new flows use it only when no ready
/// endpoint is left).
/// For operators only; the datapath does not read it.
pub const BACKEND_TERMINATING: u8 = 2;

/// An entry of the `LB_BACKENDS` array; `proto == 0` marks an unused index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendValue {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// A flow as seen on the wire, in the direction the packet travels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Client to frontend: rewrite the destination to `nat_addr:nat_port` (the backend) and, when
/// `snat_addr` is set, the source address to `snat_addr`.
pub const CT_FORWARD: u8 = 0;
/// Backend to client: rewrite the source to `nat_addr:nat_port` (the frontend) and, when
/// `snat_addr` is set, the destination address back to `snat_addr` (the original client).
pub const CT_REPLY: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub nat_addr: [u8; 4],
    pub nat_port: u16,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub direction: u8,
    /// TCP flags seen in this direction so far (OR of the flag bytes).
    pub tcp_flags: u8,
    /// Second address rewrite (see `CT_FORWARD` / `CT_REPLY`); `[0; 4]` = none.
    pub snat_addr: [u8; 4],
    pub backend_id: u32,
    pub service_id: u32,
    /// Reply entries of flows to a frontend that is one of the node's own addresses
    /// (`FRONTEND_LOCAL_ADDRESS`): the interface the request came in on, where the reply is sent straight
    /// back (the stack would drop a forwarded packet whose source is a local address).
    /// 0 = let the stack route the reply.
    pub return_ifindex: u32,
    /// With `return_ifindex`: Ethernet addresses for the reply (the request's, swapped).
    pub return_dst_mac: [u8; 6],
    pub return_src_mac: [u8; 6],
    /// With `snat_addr`: forward, the source port written (0 = the client's own); reply, the
    /// destination port restored (0 = unchanged).
    pub snat_port: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) at creation, at the latest packet, and when the
    /// entry stops counting (latest packet + the protocol's timeout).
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub expires_ns: u64,
}

/// The key of the other direction of the connection that `key` (with entry `ct`) belongs to.
#[inline(always)]
pub fn ct_other_half(key: &CtKey, ct: &CtValue) -> CtKey {
    let snat = ct.snat_addr != [0; 4];
    if ct.direction == CT_FORWARD {
        // Client -> frontend; the backend answers to the client (or the hairpin address).
        CtKey {
            src_addr: ct.nat_addr,
            dst_addr: if snat { ct.snat_addr } else { key.src_addr },
            src_port: ct.nat_port,
            dst_port: if ct.snat_port != 0 {
                ct.snat_port
            } else {
                key.src_port
            },
            proto: key.proto,
            _pad: [0; 3],
        }
    } else {
        // Backend -> client (or hairpin address); the client's key goes to the frontend.
        CtKey {
            src_addr: if snat { ct.snat_addr } else { key.dst_addr },
            dst_addr: ct.nat_addr,
            src_port: if ct.snat_port != 0 {
                ct.snat_port
            } else {
                key.dst_port
            },
            dst_port: ct.nat_port,
            proto: key.proto,
            _pad: [0; 3],
        }
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// How long an entry lives after a packet, given the TCP flags seen so far in its direction.
pub const fn ct_timeout_ns(proto: u8, tcp_flags: u8) -> u64 {
    if proto != PROTO_TCP {
        timeouts::UDP_NS
    } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        timeouts::TCP_CLOSING_NS
    } else if tcp_flags & TCP_ACK == 0 {
        timeouts::TCP_SYN_NS
    } else {
        timeouts::TCP_ESTABLISHED_NS
    }
}

/// Datapath counters (index into `LB_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// New flows sent to a backend.
    NewFlow = 0,
    /// Packets of known flows NATed to their backend.
    Forward = 1,
    /// Replies reverse-NATed back to the frontend.
    Reply = 2,
    /// New flows to a frontend whose service has no usable backend, dropped (drop mode).
    DropNoBackend = 3,
    /// Packets that could not be rewritten (helper failure).
    DropRewrite = 4,
    /// IPv4 fragments: passed untouched (only the first carries ports).
    Fragment = 5,
    /// Conntrack insert failed (map full or other error); the packet is still translated.
    CtInsertFailed = 6,
    /// New flows to a frontend with no usable backend, answered with TCP RST / ICMP unreachable.
    RejectNoBackend = 7,
    /// Clients outside a LoadBalancer's `loadBalancerSourceRanges`, dropped.
    DropSourceRange = 8,
    /// IPv4 TCP/UDP packets with impossible lengths or cut headers: passed untouched (the
    /// stack drops them), never translated.
    Malformed = 9,
    /// Established TCP flows whose backend went away: the client got a reset.
    ResetBackendGone = 10,
    /// ICMP errors about a translated flow, translated back.
    IcmpTranslated = 11,
    /// Flows from a pod to its own Service that picked the pod itself (source NATed).
    Hairpin = 12,
    /// Conntrack entries found expired on lookup and replaced.
    CtExpired = 13,
    /// External flows to an endpoint on another node, source-NATed to this node.
    Snat = 14,
    /// New external flows dropped: no free source port for the source NAT.
    DropSnatPorts = 15,
    /// TCP connections closed by both ends whose entries went with their last ACK.
    CtClosed = 16,
    /// TCP connections to a ClusterIP sent to a backend by the socket hook at `connect()`:
    /// their packets need no translation.
    SockConnect = 17,
    /// New flows whose reply 4-tuple another live flow held (the same client port to another
    /// frontend, the same backend): their source port was rewritten.
    ReplyClash = 18,
}

pub const COUNTER_COUNT: u32 = 19;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::NewFlow,
        Counter::Forward,
        Counter::Reply,
        Counter::DropNoBackend,
        Counter::DropRewrite,
        Counter::Fragment,
        Counter::CtInsertFailed,
        Counter::RejectNoBackend,
        Counter::DropSourceRange,
        Counter::Malformed,
        Counter::ResetBackendGone,
        Counter::IcmpTranslated,
        Counter::Hairpin,
        Counter::CtExpired,
        Counter::Snat,
        Counter::DropSnatPorts,
        Counter::CtClosed,
        Counter::SockConnect,
        Counter::ReplyClash,
    ];

    /// For the packets a counter counts that did not reach a backend: why.
    pub const fn drop_reason(self) -> Option<&'static str> {
        match self {
            Counter::DropNoBackend => Some("no_backend"),
            Counter::RejectNoBackend => Some("no_backend_rejected"),
            Counter::DropRewrite => Some("rewrite_failed"),
            Counter::DropSourceRange => Some("source_range"),
            Counter::DropSnatPorts => Some("no_snat_port"),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Counter::NewFlow => "new_flow",
            Counter::Forward => "forward",
            Counter::Reply => "reply",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropRewrite => "drop_rewrite",
            Counter::Fragment => "fragment_passed",
            Counter::CtInsertFailed => "conntrack_insert_failed",
            Counter::RejectNoBackend => "reject_no_backend",
            Counter::DropSourceRange => "drop_source_range",
            Counter::Malformed => "malformed_passed",
            Counter::ResetBackendGone => "reset_backend_gone",
            Counter::IcmpTranslated => "icmp_error_translated",
            Counter::Hairpin => "hairpin",
            Counter::CtExpired => "conntrack_expired",
            Counter::Snat => "snat",
            Counter::DropSnatPorts => "drop_snat_ports",
            Counter::CtClosed => "conntrack_closed",
            Counter::SockConnect => "socket_connect",
            Counter::ReplyClash => "reply_tuple_clash",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and byte arrays, with
    // every padding byte spelled out as a field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for FrontendValue {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for SockRevNat {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    // The kernel side and userspace must agree byte for byte; pin the sizes.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<FrontendKey>(), 8);
        assert_eq!(size_of::<FrontendValue>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<ServiceName>(), SERVICE_NAME_LEN);
        assert_eq!(size_of::<SlotValue>(), 8);
        assert_eq!(size_of::<BackendValue>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 64);
        assert_eq!(size_of::<SourceRangeKey>(), 12);
        assert_eq!(size_of::<ServiceStats>(), 32);
        assert_eq!(size_of::<SockRevNat>(), 16);
    }

    // The filter only saves lookups if keys it does not hold rarely find their bit set, with
    // a cluster's shape (dense pod and Service ranges, few ports) and size.
    #[test]
    fn address_filter_rarely_matches_keys_it_does_not_hold() {
        use addr_filter::{bit, BACKEND, FRONTEND, WORDS};
        let mut words = [0u64; WORDS as usize];
        let mut set = |b: u32| words[(b / 64) as usize] |= 1 << (b % 64);
        for i in 0..10_000u32 {
            let [_, _, c, d] = i.to_be_bytes();
            for port in [80, 443] {
                set(bit([10, 96, c, d], port, PROTO_TCP, FRONTEND));
            }
        }
        for i in 0..100_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            set(bit([10, 244 + b, c, d], 8080, PROTO_TCP, BACKEND));
        }
        let has = |b: u32| words[(b / 64) as usize] & (1 << (b % 64)) != 0;
        // Pod-to-pod packets: to a pod's port 9090 and from its ephemeral ports, both roles.
        let mut probes = 0;
        let mut hits = 0;
        for i in 0..100_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            let addr = [10, 244 + b, c, d];
            let port = 32_768 + (i % 28_000) as u16;
            for key in [
                bit(addr, 9090, PROTO_TCP, FRONTEND),
                bit(addr, port, PROTO_TCP, BACKEND),
                bit(addr, port, PROTO_TCP, FRONTEND),
            ] {
                probes += 1;
                hits += has(key) as u32;
            }
        }
        assert!(
            hits * 20 < probes,
            "{hits} of {probes} keys not in the filter matched it (more than 5%)"
        );
        // Every key put in matches, and the roles and fields all count.
        assert!(has(bit([10, 96, 0, 1], 443, PROTO_TCP, FRONTEND)));
        assert!(has(bit([10, 245, 1, 2], 8080, PROTO_TCP, BACKEND)));
        let a = [10, 96, 0, 1];
        assert_ne!(
            bit(a, 80, PROTO_TCP, FRONTEND),
            bit(a, 80, PROTO_TCP, BACKEND)
        );
        assert_ne!(
            bit(a, 80, PROTO_TCP, FRONTEND),
            bit(a, 81, PROTO_TCP, FRONTEND)
        );
        assert_ne!(
            bit(a, 80, PROTO_TCP, FRONTEND),
            bit(a, 80, PROTO_UDP, FRONTEND)
        );
        assert_ne!(
            bit(a, 80, PROTO_TCP, FRONTEND),
            bit([10, 96, 0, 2], 80, PROTO_TCP, FRONTEND)
        );
    }
}
