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

use aya_ebpf::{
    bindings::bpf_sock_addr,
    btf_maps::SkStorage,
    helpers::generated::bpf_set_retval,
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use lb_common::{
    Counter, FrontendKey, SockRevNat, KIND_CLUSTER_IP, PROTO_TCP, SERVICE_DROP_WHEN_EMPTY,
    SERVICE_MAGLEV,
};

use crate::{
    maps::{count, no_backend_drop, LB_FRONTENDS, LB_SERVICES},
    select::pick_random,
};

#[btf_map]
pub static LB_SOCK_REVNAT: SkStorage<SockRevNat> = SkStorage::new();

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
    let mut remembered = SockRevNat {
        frontend_addr,
        backend_addr: backend.addr,
        frontend_port,
        backend_port: backend.port,
        _pad: 0,
    };
    // Without the note, getpeername would show the backend: translate all the same (the
    // connection works either way), which is what the tc path's clients see too.
    // SAFETY: the helper reads the socket of our own context.
    let stored = unsafe { LB_SOCK_REVNAT.get_or_insert_ptr_mut(ctx, Some(&mut remembered)) };
    if !stored.is_null() {
        // SAFETY: a valid pointer into this socket's storage (a reconnect overwrites it).
        unsafe { *stored = remembered };
    }
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
    // SAFETY: the helper reads the socket of our own context; no entry gives null.
    let Some(note) = (unsafe { LB_SOCK_REVNAT.get_ptr_mut(&ctx).as_ref() }).copied() else {
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
