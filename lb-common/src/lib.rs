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
//! LB_FRONTENDS   FrontendKey {addr, port, proto}     -> FrontendValue {service_id}
//! LB_SERVICES    service_id                          -> ServiceValue {backend_count, name}
//! LB_SLOTS       SlotKey {service_id, slot}          -> backend_id   (slots 0..backend_count)
//! LB_BACKENDS    backend_id                          -> BackendValue {addr, port}
//! LB_CONNTRACK   CtKey {src, dst, sport, dport, proto} -> CtValue (LRU)
//! LB_STATS       Counter as u32                      -> u64 (per CPU)
//! ```
//!
//! A "service" here is one backend set: a Service port seen from one traffic scope. Several
//! frontends (ClusterIP, NodePorts, ...) may share it, so an endpoint change rewrites only that
//! service's slots, never every frontend.
#![no_std]

/// Bumped whenever a key or value layout below changes; stamped into the pinned state.
pub const MAP_LAYOUT_VERSION: u32 = 1;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps, as declared in the kernel object and pinned under the agent's directory.
pub mod map_names {
    pub const FRONTENDS: &str = "LB_FRONTENDS";
    pub const SERVICES: &str = "LB_SERVICES";
    pub const SLOTS: &str = "LB_SLOTS";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const STATS: &str = "LB_STATS";
    pub const ALL: [&str; 6] = [FRONTENDS, SERVICES, SLOTS, BACKENDS, CONNTRACK, STATS];
}

/// Capacities of the maps (entries). The agent may override them at load time.
pub mod capacity {
    pub const FRONTENDS: u32 = 65_536;
    pub const SERVICES: u32 = 65_536;
    pub const SLOTS: u32 = 262_144;
    pub const BACKENDS: u32 = 65_536;
    pub const CONNTRACK: u32 = 262_144;
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
    /// Reserved for per-frontend behaviour (traffic scope, source ranges).
    pub flags: u32,
}

/// Room for `namespace/name:port/proto` at Kubernetes maximum lengths (63 + 63 + 15 + 4 + 3).
pub const SERVICE_NAME_LEN: usize = 160;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Number of valid slots in `LB_SLOTS` for this service (0 = no usable backend).
    pub backend_count: u32,
    pub flags: u32,
    /// `namespace/name:port/proto`, NUL padded; only for operators (the kernel never reads it).
    pub name: [u8; SERVICE_NAME_LEN],
}

impl Default for ServiceValue {
    fn default() -> Self {
        Self {
            backend_count: 0,
            flags: 0,
            name: [0; SERVICE_NAME_LEN],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

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

/// Client to frontend: rewrite the destination to `nat_addr:nat_port` (the backend).
pub const CT_FORWARD: u8 = 0;
/// Backend to client: rewrite the source to `nat_addr:nat_port` (the frontend).
pub const CT_REPLY: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub nat_addr: [u8; 4],
    pub nat_port: u16,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub direction: u8,
    /// TCP flags seen on this flow so far (OR of the flag bytes).
    pub tcp_flags: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` at creation and at the latest packet.
    pub created_ns: u64,
    pub last_seen_ns: u64,
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
    /// Packets to a frontend whose service has no usable backend.
    DropNoBackend = 3,
    /// Packets that could not be rewritten (helper failure).
    DropRewrite = 4,
    /// Fragments to any address: passed untouched (no L4 header to match on).
    Fragment = 5,
    /// Conntrack insert failed (map full or other error).
    DropCtFull = 6,
}

pub const COUNTER_COUNT: u32 = 7;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::NewFlow,
        Counter::Forward,
        Counter::Reply,
        Counter::DropNoBackend,
        Counter::DropRewrite,
        Counter::Fragment,
        Counter::DropCtFull,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::NewFlow => "new_flow",
            Counter::Forward => "forward",
            Counter::Reply => "reply",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropRewrite => "drop_rewrite",
            Counter::Fragment => "fragment_passed",
            Counter::DropCtFull => "drop_conntrack_full",
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
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
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
        assert_eq!(size_of::<ServiceValue>(), 8 + SERVICE_NAME_LEN);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<BackendValue>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 32);
    }
}
