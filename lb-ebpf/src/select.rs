//! Picking a backend for a new flow: shared by the tc path and the socket hook.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{BackendValue, ServiceValue};

use crate::maps::{LB_BACKENDS, LB_SLOTS};

/// A random slot of the service: (slot, backend id, backend).
#[inline(always)]
pub fn pick_random(service_id: u32, service: &ServiceValue) -> Option<(u32, u32, BackendValue)> {
    let count = service.backend_count;
    if count == 0 {
        return None;
    }
    let slot = unsafe { bpf_get_prandom_u32() } % count;
    // A slot beyond a count that just shrank may name another service by now (the agent
    // reuses freed runs): slot 0 is always the service's own.
    let (slot, backend_id) = match slot_backend(service_id, service, slot) {
        Some(id) => (slot, id),
        None => (0, slot_backend(service_id, service, 0)?),
    };
    let backend = *LB_BACKENDS.get(backend_id)?;
    (backend.proto != 0).then_some((slot, backend_id, backend))
}

/// The backend id in slot `slot` of the service, if that entry is still the service's own.
#[inline(always)]
pub fn slot_backend(service_id: u32, service: &ServiceValue, slot: u32) -> Option<u32> {
    let entry = LB_SLOTS.get(service.slot_base.wrapping_add(slot))?;
    (entry.service_id == service_id).then_some(entry.backend_id)
}
