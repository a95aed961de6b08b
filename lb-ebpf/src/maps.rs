//! The maps and load-time settings the datapath reads (layouts in `lb-common`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    addr_filter, capacity, AffinityKey, AffinityValue, BackendValue, Counter, CtKey, CtValue,
    FrontendKey, FrontendValue, Meta, ServiceName, ServiceStats, ServiceValue, SlotValue,
    SourceRangeKey, COUNTER_COUNT,
};

/// Maps written only by the agent allocate entries on demand.
const ON_DEMAND: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static LB_FRONTENDS: HashMap<
    FrontendKey,
    FrontendValue,
    { capacity::FRONTENDS as usize },
    ON_DEMAND,
> = HashMap::new();
/// Indexed by service id (ids are dense from 1): one memory read for a new flow, no hash.
#[btf_map]
pub static LB_SERVICES: Array<ServiceValue, { capacity::SERVICES as usize }> = Array::new();
/// Never read here: the layout version of the pinned state, for the agent.
#[btf_map]
pub static LB_META: Array<Meta, 1> = Array::new();

/// Never read here; declared so that the object carries it (with BTF) for the agent to pin.
#[btf_map]
pub static LB_SERVICE_NAMES: HashMap<u32, ServiceName, { capacity::SERVICES as usize }, ON_DEMAND> =
    HashMap::new();
/// Each service's slots are a run of this array (`ServiceValue::slot_base`): a new flow's
/// backend is one array read, and the agent writes a service's slots in one batch.
#[btf_map]
pub static LB_SLOTS: Array<SlotValue, { capacity::SLOTS as usize }> = Array::new();
/// Indexed by backend id: the established-flow check is an array read, not a hash lookup.
#[btf_map]
pub static LB_BACKENDS: Array<BackendValue, { capacity::BACKENDS as usize }> = Array::new();
/// Maglev lookup tables (`lb_common::maglev_start`): one array for every Maglev service, so a
/// new flow costs one array read; written only by the agent.
#[btf_map]
pub static LB_MAGLEV: Array<u32, { capacity::MAGLEV_ENTRIES as usize }> = Array::new();
#[btf_map]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> =
    LruHashMap::new();
#[btf_map]
pub static LB_CONNTRACK: LruHashMap<CtKey, CtValue, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();
#[btf_map]
pub static LB_SERVICE_STATS: PerCpuArray<ServiceStats, { capacity::SERVICES as usize }> =
    PerCpuArray::new();
#[btf_map]
pub static LB_STATS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();
/// Bits of every frontend and backend key (`lb_common::addr_filter`): a packet whose keys have
/// none is passed without a conntrack or frontend lookup. Written only by the agent.
#[btf_map]
pub static LB_ADDR_FILTER: Array<u64, { addr_filter::WORDS as usize }> = Array::new();
/// Room for the conntrack entry a new flow builds: on the stack it would push `lb_ingress`
/// past the verifier's 512 bytes per call chain. Never pinned: nothing in it outlives the
/// packet, and a program runs to its end on a CPU before the next one starts there.
#[btf_map]
pub static LB_SCRATCH: PerCpuArray<CtValue, 1> = PerCpuArray::new();

/// Set by the agent at load time (see `lb_common::globals`).
#[unsafe(no_mangle)]
static LB_NO_BACKEND_DROP: u8 = 0;
#[unsafe(no_mangle)]
static LB_HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];
#[unsafe(no_mangle)]
static LB_SNAT_ADDR: [u8; 4] = [0; 4];
#[unsafe(no_mangle)]
static LB_MAGLEV_TABLE_SIZE: u32 = lb_common::MAGLEV_TABLE_SIZE;

#[inline(always)]
pub fn maglev_table_size() -> u32 {
    // SAFETY: as for the other globals.
    unsafe { core::ptr::read_volatile(&LB_MAGLEV_TABLE_SIZE) }
}

#[inline(always)]
pub fn snat_addr() -> [u8; 4] {
    // SAFETY: as for the other globals.
    unsafe { core::ptr::read_volatile(&LB_SNAT_ADDR) }
}

#[inline(always)]
pub fn no_backend_drop() -> bool {
    // SAFETY: a read of a global the loader may have patched; volatile so it is not folded.
    unsafe { core::ptr::read_volatile(&LB_NO_BACKEND_DROP) != 0 }
}

#[inline(always)]
pub fn hairpin_addr() -> [u8; 4] {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&LB_HAIRPIN_ADDR) }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = LB_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot. Plain, not atomic (the BPF target has no atomic add in Rust):
        // the socket hook runs preemptible, so a tc program interrupting its increment on the
        // same CPU can, rarely, cost one count. Counters are for operators, not accounting.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn account(service_id: u32, reply: bool, bytes: u32) {
    if let Some(stats) = LB_SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, as above.
        let stats = unsafe { &mut *stats };
        if reply {
            stats.reply_packets += 1;
            stats.reply_bytes += u64::from(bytes);
        } else {
            stats.packets += 1;
            stats.bytes += u64::from(bytes);
        }
    }
}

/// Is `client` allowed on `frontend` by its `loadBalancerSourceRanges`?
#[inline(always)]
pub fn source_allowed(frontend: FrontendKey, client: [u8; 4]) -> bool {
    let key = Key::new(
        lb_common::SOURCE_RANGE_FRONTEND_BITS + 32,
        SourceRangeKey { frontend, client },
    );
    LB_SOURCE_RANGES.get(&key).is_some()
}

/// Whether `LB_ADDR_FILTER` has the bit of `(addr, port, proto)` in the role `seed`: when it
/// has not, no frontend (or backend) has that key.
#[inline(always)]
pub fn in_filter(addr: [u8; 4], port: u16, proto: u8, seed: u32) -> bool {
    let bit = addr_filter::bit(addr, port, proto, seed);
    match LB_ADDR_FILTER.get(bit / 64) {
        Some(word) => word & (1 << (bit % 64)) != 0,
        None => true,
    }
}
