//! Socket-level load balancing (the agent's `--socket-lb-cgroup`): a TCP `connect()` to a
//! ClusterIP from a process in that cgroup goes straight to a backend, picked as the tc path
//! would pick it, so none of that connection's packets need translating. `getpeername()`
//! answers with the ClusterIP, so the application sees what it asked for.
//!
//! Left to the tc path, which sees every packet: UDP (a reply would come from the backend's
//! address, which resolvers check), Services with session affinity or Maglev (they pick by
//! client address or by the flow's ports, unknown at `connect()`), and other frontend kinds.
//! A Service with no usable backend is refused at `connect()` (ECONNREFUSED, as the tc path's
//! reset gives), unless configured to drop, which the tc path does.
//!
//! What `getpeername` needs is noted per socket in `LB_SOCK_REVNAT`, an LRU hash keyed by
//! socket cookie, and deleted when the socket is released (`lb_sock_release`). Socket storage
//! would free it with the socket by itself, but allocating it at `connect()` and freeing it
//! through RCU cost about 1 µs a connection here; the hash insert and delete cost a fraction
//! of that. LRU because not every socket's release runs the hook: the kernel's own sockets
//! (an NFS or Ceph client connecting to a ClusterIP) pass `connect()` but not the release
//! hook, nor do sockets closed while the programs were detached. Their notes are the least
//! recently used and go first when the map fills.

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    btf_maps::LruHashMap,
    helpers::generated::{bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext as _,
};
use lb_common::{
    capacity, Counter, FrontendKey, SockRevNat, KIND_CLUSTER_IP, PROTO_TCP,
    SERVICE_DROP_WHEN_EMPTY, SERVICE_MAGLEV,
};

use crate::{
    maps::{count, no_backend_drop, LB_FRONTENDS, LB_SERVICES},
    select::pick_random,
};

/// Socket cookie -> note, for every open socket the connect hook sent to a backend.
#[btf_map]
pub static LB_SOCK_REVNAT: LruHashMap<u64, SockRevNat, { capacity::SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// A cgroup/sock_addr program's verdict: let the call go on.
const PROCEED: i32 = 1;

/// Its other verdict: fail the call (with the error `bpf_set_retval` set).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    connect4(&ctx)
}

#[inline(always)]
fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed; only its plain integer fields are touched.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.protocol != u32::from(PROTO_TCP) {
        return PROCEED;
    }
    let frontend_addr = addr.user_ip4.to_ne_bytes();
    let frontend_port = u16::from_be(addr.user_port as u16);
    let key = FrontendKey {
        addr: frontend_addr,
        port: frontend_port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: read-only copy of a value the agent replaces atomically.
    let Some(frontend) = (unsafe { LB_FRONTENDS.get(key) }).copied() else {
        return PROCEED;
    };
    if frontend.kind != KIND_CLUSTER_IP {
        return PROCEED;
    }
    let Some(service) = LB_SERVICES.get(frontend.service_id).copied() else {
        return PROCEED;
    };
    if service.backend_count == 0 {
        // No usable endpoint: refused at once, as the tc path's reset would be, and for a
        // host process too, whose SYN the tc program would never see. Drop modes are the tc
        // path's (a pod's SYN is dropped there).
        if no_backend_drop() || service.flags & SERVICE_DROP_WHEN_EMPTY != 0 {
            return PROCEED;
        }
        // SAFETY: plain helper call; the kernel hands the error to connect().
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        count(Counter::RejectNoBackend);
        return REFUSE;
    }
    if service.affinity_timeout_s != 0 || service.flags & SERVICE_MAGLEV != 0 {
        return PROCEED;
    }
    let Some((_, _, backend)) = pick_random(frontend.service_id, &service) else {
        return PROCEED;
    };
    let remembered = SockRevNat {
        frontend_addr,
        backend_addr: backend.addr,
        frontend_port,
        backend_port: backend.port,
        _pad: 0,
    };
    // SAFETY: the helper reads the socket of our own context (and gives it a cookie if it has
    // none yet).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A reconnect overwrites the socket's note. Should the insert fail, getpeername shows the
    // backend: the connection is translated all the same (it works either way).
    let _ = LB_SOCK_REVNAT.insert(cookie, remembered, BPF_ANY as u64);
    // Both are 4-byte stores, the only width the verifier allows for these fields.
    addr.user_ip4 = u32::from_ne_bytes(backend.addr);
    addr.user_port = u32::from(backend.port.to_be());
    count(Counter::SockConnect);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let addr: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if addr.protocol != u32::from(PROTO_TCP) {
        return PROCEED;
    }
    // SAFETY: the helper reads the socket of our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a read-only copy of a value the map owns.
    let Some(note) = (unsafe { LB_SOCK_REVNAT.get(cookie) }).copied() else {
        return PROCEED;
    };
    // Only while the peer is still the backend the hook chose.
    if addr.user_ip4.to_ne_bytes() == note.backend_addr
        && u16::from_be(addr.user_port as u16) == note.backend_port
    {
        addr.user_ip4 = u32::from_ne_bytes(note.frontend_addr);
        addr.user_port = u32::from(note.frontend_port.to_be());
    }
    PROCEED
}

/// A socket of the cgroup goes away: its note, if it has one, goes with it. Every TCP socket
/// pays one hash delete here, which for most of them finds nothing.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context the kernel passed; only plain integer fields are read.
    let sock = unsafe { &*ctx.sock };
    if sock.family == AF_INET && sock.protocol == u32::from(PROTO_TCP) {
        // SAFETY: the helper reads the socket of our own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = LB_SOCK_REVNAT.remove(cookie);
    }
    PROCEED
}

const AF_INET: u32 = 2;
