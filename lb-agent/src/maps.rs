//! The pinned BPF maps: opening them, reading them back for operators, and the applier that
//! turns a [`DesiredState`] into map writes.
//!
//! The applier keeps a copy of what the maps hold (read once when it opens them, so a restarted
//! agent adopts the state it finds) and writes only the difference on every sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    ops::ControlFlow,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, Context as _};
// Seeded per process; keys are names and addresses from the API, not raw packets.
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
};
use foldhash::{HashMap as FastMap, HashMapExt as _, HashSet as FastSet, HashSetExt as _};
use lb_common::{
    maglev_start, map_names, BackendValue, Counter, CtKey, CtValue, FrontendKey, FrontendValue,
    ServiceName, ServiceStats, ServiceValue, SlotValue, SourceRangeKey, BACKEND_REMOTE,
    BACKEND_TERMINATING, FRONTEND_LOCAL_ADDRESS, FRONTEND_SOURCE_RANGES, SERVICE_DROP_WHEN_EMPTY,
    SERVICE_MAGLEV, SERVICE_NAME_LEN, SOURCE_RANGE_FRONTEND_BITS,
};
use serde::Serialize;
use tracing::{debug, warn};

use crate::{
    filter::{backend_bit, frontend_bit, AddrFilter, RebuildReport},
    model::{Backend, DesiredService, DesiredState, Frontend, FrontendKind, Protocol, WhenEmpty},
};

/// Where the agent pins its maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

pub type FrontendMap = HashMap<MapData, FrontendKey, FrontendValue>;
pub type ServiceMap = Array<MapData, ServiceValue>;
pub type SlotMap = Array<MapData, SlotValue>;
pub type BackendMap = Array<MapData, BackendValue>;
pub type ServiceNameMap = HashMap<MapData, u32, ServiceName>;
pub type ConntrackMap = HashMap<MapData, CtKey, CtValue>;
pub type SourceRangeMap = LpmTrie<MapData, SourceRangeKey, u8>;
pub type ServiceStatsMap = PerCpuArray<MapData, ServiceStats>;
pub type MaglevMap = Array<MapData, u32>;

/// The service maps, opened from their pins.
pub struct Maps {
    pub frontends: FrontendMap,
    pub services: ServiceMap,
    pub service_names: ServiceNameMap,
    pub slots: SlotMap,
    pub backends: BackendMap,
    pub source_ranges: SourceRangeMap,
    pub service_stats: ServiceStatsMap,
    pub maglev: MaglevMap,
}

fn open_map(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the agent running, or has it run, with --pin-dir {}?)",
            path.display(),
            pin_dir.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    HashMap::try_from(open_map(pin_dir, name)?)
        .with_context(|| format!("map {name} does not have the layout this agent expects"))
}

impl Maps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            frontends: open_hash(pin_dir, map_names::FRONTENDS)?,
            services: Array::try_from(open_map(pin_dir, map_names::SERVICES)?)
                .context("map LB_SERVICES does not have the layout this agent expects")?,
            service_names: open_hash(pin_dir, map_names::SERVICE_NAMES)?,
            slots: Array::try_from(open_map(pin_dir, map_names::SLOTS)?)
                .context("map LB_SLOTS does not have the layout this agent expects")?,
            backends: Array::try_from(open_map(pin_dir, map_names::BACKENDS)?)
                .context("map LB_BACKENDS does not have the layout this agent expects")?,
            source_ranges: LpmTrie::try_from(open_map(pin_dir, map_names::SOURCE_RANGES)?)
                .context("map LB_SOURCE_RANGES does not have the layout this agent expects")?,
            service_stats: PerCpuArray::try_from(open_map(pin_dir, map_names::SERVICE_STATS)?)
                .context("map LB_SERVICE_STATS does not have the layout this agent expects")?,
            maglev: Array::try_from(open_map(pin_dir, map_names::MAGLEV)?)
                .context("map LB_MAGLEV does not have the layout this agent expects")?,
        })
    }
}

impl Maps {
    /// The services in `LB_SERVICES` (an array indexed by service id): those with a name, and
    /// any a frontend points at (a nameless one cannot be matched to an object and is dropped
    /// by the next sync).
    fn present_services(&self) -> anyhow::Result<Vec<(u32, ServiceValue)>> {
        let mut ids = BTreeSet::new();
        for id in self.service_names.keys() {
            ids.insert(id.context("reading LB_SERVICE_NAMES")?);
        }
        for entry in self.frontends.iter() {
            ids.insert(entry.context("reading LB_FRONTENDS")?.1.service_id);
        }
        ids.into_iter()
            .map(|id| {
                let value = self
                    .services
                    .get(&id, 0)
                    .with_context(|| format!("reading LB_SERVICES[{id}]"))?;
                Ok((id, value))
            })
            .collect()
    }

    /// The Maglev table size the pinned `LB_MAGLEV` is laid out for (its entry 0, stamped by
    /// the loader) and how many tables it holds; (0, 0) when unusable.
    pub fn maglev_layout(&self) -> (u32, u32) {
        let size = self.maglev.get(&0, 0).unwrap_or(0);
        if size == 0 {
            return (0, 0);
        }
        (size, self.maglev.len().saturating_sub(1) / size)
    }

    /// The backend id of each entry of the Maglev table of `size` entries that starts at
    /// table `table` (1-based) of a map laid out for tables of `unit` entries.
    fn read_maglev_table(&self, table: u32, unit: u32, size: u32) -> anyhow::Result<Vec<u32>> {
        let start = maglev_start(table, unit);
        (start..start + size)
            .map(|i| self.maglev.get(&i, 0).context("reading LB_MAGLEV"))
            .collect()
    }
}

/// Sums one service's per-CPU traffic counters.
fn sum_stats(values: &PerCpuValues<ServiceStats>) -> ServiceStats {
    values
        .iter()
        .fold(ServiceStats::default(), |acc, v| ServiceStats {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            reply_packets: acc.reply_packets + v.reply_packets,
            reply_bytes: acc.reply_bytes + v.reply_bytes,
        })
}

pub fn open_conntrack(pin_dir: &Path) -> anyhow::Result<ConntrackMap> {
    open_hash(pin_dir, map_names::CONNTRACK)
}

/// Sums the per-CPU datapath counters.
pub fn read_counters(pin_dir: &Path) -> anyhow::Result<Vec<(Counter, u64)>> {
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open_map(pin_dir, map_names::STATS)?)
            .context("map LB_STATS does not have the layout this agent expects")?;
    Counter::ALL
        .iter()
        .map(|&counter| {
            let values = stats
                .get(&(counter as u32), 0)
                .with_context(|| format!("reading counter {}", counter.name()))?;
            Ok((counter, values.iter().sum()))
        })
        .collect()
}

fn encode_name(name: &str) -> ServiceName {
    let mut out = ServiceName::default();
    let bytes = name.as_bytes();
    let len = bytes.len().min(SERVICE_NAME_LEN);
    out.name[..len].copy_from_slice(&bytes[..len]);
    out
}

fn decode_name(name: &ServiceName) -> String {
    let end = name
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.name.len());
    String::from_utf8_lossy(&name.name[..end]).into_owned()
}

/// Reads the `LB_BACKENDS` array: index = backend id, `proto == 0` = unused.
///
/// In batches: entry by entry it took 65,536 system calls (about 20 ms), on every resync.
fn read_backends(map: &BackendMap) -> anyhow::Result<BTreeMap<u32, BackendValue>> {
    let values = crate::batch::read_array(map, 16_384)
        .map_err(|err| anyhow!("reading LB_BACKENDS: {err}"))?;
    Ok(values
        .into_iter()
        .enumerate()
        .filter(|(_, value)| value.proto != 0)
        .map(|(id, value)| (id as u32, value))
        .collect())
}

fn frontend_key(frontend: &Frontend) -> FrontendKey {
    FrontendKey {
        addr: frontend.addr.octets(),
        port: frontend.port,
        proto: frontend.protocol.number(),
        _pad: 0,
    }
}

fn backend_value(backend: &Backend, flags: u8) -> BackendValue {
    BackendValue {
        addr: backend.addr.octets(),
        port: backend.port,
        proto: backend.protocol.number(),
        flags,
    }
}

/// The `LB_ADDR_FILTER` bit of a backend: the key its replies come from.
fn backend_filter_bit(backend: &Backend) -> u32 {
    let value = backend_value(backend, 0);
    backend_bit(value.addr, value.port, value.proto)
}

/// The `LB_ADDR_FILTER` bits of every frontend and backend the maps hold.
fn live_bits<'a>(
    frontends: &'a FastMap<FrontendKey, FrontendValue>,
    backends: &'a BackendTable,
) -> impl Iterator<Item = u32> + 'a {
    let backends = backends
        .ids()
        .filter_map(|id| backends.get(id))
        .map(|(b, _)| backend_filter_bit(b));
    frontends.keys().map(frontend_bit).chain(backends)
}

fn backend_from_value(value: &BackendValue) -> Option<Backend> {
    Some(Backend {
        addr: Ipv4Addr::from(value.addr),
        port: value.port,
        protocol: Protocol::from_number(value.proto)?,
    })
}

/// A `LB_SOURCE_RANGES` entry: (frontend, client prefix length with the frontend bits, client).
type RangeEntry = (FrontendKey, u32, [u8; 4]);

/// The frontend entries of one desired entry, each with the source ranges it checks.
fn entry_frontends<'a>(
    service: &'a DesiredService,
    service_id: u32,
    node_addresses: &'a BTreeSet<Ipv4Addr>,
) -> impl Iterator<Item = (&'a Frontend, FrontendKey, FrontendValue, Vec<RangeEntry>)> + 'a {
    service.frontends.iter().map(move |frontend| {
        let key = frontend_key(frontend);
        let restricted =
            frontend.kind == FrontendKind::LoadBalancer && service.source_ranges.is_some();
        let local =
            frontend.kind == FrontendKind::NodePort || node_addresses.contains(&frontend.addr);
        let mut flags = 0;
        let mut ranges = Vec::new();
        if restricted {
            flags |= FRONTEND_SOURCE_RANGES;
            for prefix in service.source_ranges.iter().flatten() {
                ranges.push((
                    key,
                    SOURCE_RANGE_FRONTEND_BITS + u32::from(prefix.len),
                    prefix.addr.octets(),
                ));
            }
        }
        if local {
            flags |= FRONTEND_LOCAL_ADDRESS;
        }
        let value = FrontendValue {
            service_id,
            kind: frontend.kind.number(),
            flags,
            _pad: 0,
        };
        (frontend, key, value, ranges)
    })
}

/// Hands out small integer ids, reusing freed ones (lowest first).
#[derive(Debug, Default)]
struct IdAllocator {
    next: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    fn from_used(used: impl Iterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.collect();
        let next = used.last().map_or(1, |&max| max + 1);
        let free = (1..next).filter(|id| !used.contains(id)).collect();
        Self { next, free }
    }

    /// The lowest free id below `limit` (the map's capacity), if any.
    fn allocate(&mut self, limit: u32) -> Option<u32> {
        match self.free.first().copied() {
            Some(id) if id < limit => {
                self.free.remove(&id);
                Some(id)
            }
            _ if self.next < limit => {
                self.next += 1;
                Some(self.next - 1)
            }
            _ => None,
        }
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// How many ids below `limit` are free.
    fn available(&self, limit: u32) -> usize {
        let below = self.free.range(..limit).count();
        below + limit.saturating_sub(self.next) as usize
    }
}

/// What one sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Services or frontends that could not be programmed; everything else was.
    pub errors: Vec<String>,
}

/// What a full sync reads of the desired state, borrowed from wherever it is kept (one
/// [`DesiredState`], or the engine's per-Service parts).
pub struct SyncInput<'a> {
    /// Every entry, in name order (the first by name wins a contested frontend).
    pub(crate) entries: Vec<(&'a str, &'a DesiredService)>,
    /// Every endpoint of the entries, chosen or only known, with its `BackendValue::flags`
    /// (`BACKEND_REMOTE`, `BACKEND_TERMINATING`).
    pub(crate) backends: FastMap<Backend, u8>,
    pub(crate) node_addresses: BTreeSet<Ipv4Addr>,
}

impl<'a> SyncInput<'a> {
    pub fn from_state(state: &'a DesiredState) -> Self {
        let mut input = Self {
            entries: state
                .services
                .iter()
                .map(|(n, s)| (n.as_str(), s))
                .collect(),
            backends: FastMap::new(),
            node_addresses: state.node_addresses.clone(),
        };
        input.add_backends(state);
        input
    }

    /// Adds the backends a state (whole, or one Service's part) uses, chosen or known, with
    /// the flags its sets give them (a backend listed twice keeps every flag it was given).
    pub(crate) fn add_backends(&mut self, state: &DesiredState) {
        let chosen = state.services.values().flat_map(|s| &s.backends);
        for backend in chosen.chain(&state.known_backends) {
            *self.backends.entry(*backend).or_default() |= backend_flags(state, backend);
        }
    }

    fn has_entry(&self, name: &str) -> bool {
        self.entries
            .binary_search_by(|(n, _)| (*n).cmp(name))
            .is_ok()
    }
}

/// Stored backends and their flags, indexed by id: ids are dense (the allocator hands out
/// the lowest free one), so a vector beats a tree or hash map at 100,000 of them.
#[derive(Default)]
struct BackendTable {
    by_id: Vec<Option<(Backend, u8)>>,
    len: usize,
}

impl BackendTable {
    fn get(&self, id: u32) -> Option<&(Backend, u8)> {
        self.by_id.get(id as usize).and_then(Option::as_ref)
    }

    fn insert(&mut self, id: u32, backend: Backend, flags: u8) {
        let i = id as usize;
        if i >= self.by_id.len() {
            self.by_id.resize(i + 1, None);
        }
        if self.by_id[i].replace((backend, flags)).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, id: u32) -> Option<Backend> {
        let (backend, _) = self.by_id.get_mut(id as usize)?.take()?;
        self.len -= 1;
        Some(backend)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_id
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_some())
            .map(|(id, _)| id as u32)
    }
}

/// How many slots (of all services) name each backend id, indexed by id (ids are dense).
#[derive(Default)]
struct SlotRefs(Vec<u32>);

impl SlotRefs {
    fn add(&mut self, ids: &[u32]) {
        for &id in ids {
            let i = id as usize;
            if i >= self.0.len() {
                self.0.resize(i + 1, 0);
            }
            self.0[i] += 1;
        }
    }

    fn remove(&mut self, ids: &[u32]) {
        for &id in ids {
            if let Some(refs) = self.0.get_mut(id as usize) {
                *refs = refs.saturating_sub(1);
            }
        }
    }

    fn any(&self, id: u32) -> bool {
        self.0.get(id as usize).is_some_and(|&n| n > 0)
    }
}

/// The applier: desired state in, minimal map writes out.
pub struct Applier {
    maps: Maps,
    /// Stored backends with their `BackendValue::flags`, by id.
    backends: BackendTable,
    backend_ids: FastMap<Backend, u32>,
    backend_alloc: IdAllocator,
    /// Service id -> (name, backend ids by slot).
    services: BTreeMap<u32, (String, Vec<u32>)>,
    /// `LB_SERVICES` entries as written, by service id.
    written: FastMap<u32, ServiceValue>,
    /// Each service's run of `LB_SLOTS`: (first entry, entries held), by service id.
    slot_runs: FastMap<u32, (u32, u32)>,
    slot_alloc: SlotRuns,
    service_ids: FastMap<String, u32>,
    service_alloc: IdAllocator,
    frontends: FastMap<FrontendKey, FrontendValue>,
    /// The keys of `frontends`, by the service id they point at.
    frontends_by_service: FastMap<u32, BTreeSet<FrontendKey>>,
    /// How many slots (of all services) hold each backend id.
    slot_refs: SlotRefs,
    /// (frontend, client prefix length, client prefix) entries of LB_SOURCE_RANGES.
    source_ranges: BTreeSet<(FrontendKey, u32, [u8; 4])>,
    /// `LB_MAGLEV` layout: entries per table (M) and how many tables fit.
    maglev_size: u32,
    maglev_count: u32,
    /// Tables (1-based) held by services.
    maglev_alloc: MaglevUnits,
    /// What each table holds in the map, entry by entry (a table released by one service
    /// keeps its content, so the next one diffs against it); `MAGLEV_UNKNOWN` = not known.
    maglev_tables: FastMap<u32, Vec<u32>>,
    /// The (sorted) backends each table was last written whole from: an unchanged set costs
    /// no recomputation.
    maglev_inputs: FastMap<u32, Vec<Backend>>,
    /// `LB_ADDR_FILTER`: bits of the frontends and backends above (and stale ones).
    filter: AddrFilter,
    /// Read when the filter is rebuilt (its entries' keys keep their bits).
    conntrack: ConntrackMap,
}

/// The free runs of `LB_SLOTS`, handed out best fit. A released run is held back until it is
/// cleared at the start of the next sync or delta (`Applier::settle_slots`): a packet that read
/// a service entry just before its run moved must not find the old run reused under it.
struct SlotRuns {
    /// Free runs: start -> length, and the same as (length, start) for best fit.
    by_start: BTreeMap<u32, u32>,
    by_len: BTreeSet<(u32, u32)>,
    released: Vec<(u32, u32)>,
}

impl SlotRuns {
    /// Every entry of a map of `len` free.
    fn new(len: u32) -> Self {
        let mut runs = Self {
            by_start: BTreeMap::new(),
            by_len: BTreeSet::new(),
            released: Vec::new(),
        };
        runs.insert(0, len);
        runs
    }

    fn insert(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.by_start.insert(start, len);
            self.by_len.insert((len, start));
        }
    }

    fn take(&mut self, start: u32) -> Option<u32> {
        let len = self.by_start.remove(&start)?;
        self.by_len.remove(&(len, start));
        Some(len)
    }

    /// Is entry `index` in a free run?
    fn is_free(&self, index: u32) -> bool {
        self.by_start
            .range(..=index)
            .next_back()
            .is_some_and(|(&start, &len)| u64::from(index) < u64::from(start) + u64::from(len))
    }

    /// Marks `len` entries from `start` held (a restarted agent adopting a service's run);
    /// false when they are not all free.
    fn hold(&mut self, start: u32, len: u32) -> bool {
        let Some((&free_start, &free_len)) = self.by_start.range(..=start).next_back() else {
            return false;
        };
        let (end, free_end) = (u64::from(start) + u64::from(len), free_start + free_len);
        if len == 0 || end > u64::from(free_end) {
            return false;
        }
        self.take(free_start);
        self.insert(free_start, start - free_start);
        self.insert(start + len, free_end - start - len);
        true
    }

    /// The start of `len` free entries in a row, now held: the smallest free run that fits.
    fn allocate(&mut self, len: u32) -> Option<u32> {
        let &(free_len, start) = self.by_len.range((len, 0)..).next()?;
        self.take(start);
        self.insert(start + len, free_len - len);
        Some(start)
    }

    /// Grows the run of `len` entries at `start` to `to` entries if the entries after it are
    /// free (no slot moves).
    fn extend(&mut self, start: u32, len: u32, to: u32) -> bool {
        let at = start + len;
        let need = to - len;
        match self.by_start.get(&at) {
            Some(&free) if free >= need => {
                self.take(at);
                self.insert(at + need, free - need);
                true
            }
            _ => false,
        }
    }

    /// Gives entries back at once: only for a run no service entry has named.
    fn free(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        let (mut start, mut len) = (start, len);
        if let Some((&before, &before_len)) = self.by_start.range(..start).next_back() {
            if before + before_len == start {
                self.take(before);
                start = before;
                len += before_len;
            }
        }
        if let Some(after_len) = self.take(start + len) {
            len += after_len;
        }
        self.insert(start, len);
    }

    /// Gives entries back once they are cleared at the next sync (see `settle_slots`).
    fn release(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.released.push((start, len));
        }
    }
}

/// Writes slot entries: in one batch where the kernel has it, else one by one. Returns how
/// many were written, in order (each one whole), and the error that stopped the rest.
fn write_slot_entries(
    slots: &mut SlotMap,
    indexes: &[u32],
    values: &[SlotValue],
) -> (usize, Option<anyhow::Error>) {
    let (batched, err) = crate::batch::update_array(slots, indexes, values);
    if let Some(err) = err.filter(|_| batched < indexes.len()) {
        debug!(%err, batched, of = indexes.len(), "batched slot write stopped; one by one");
    }
    for (i, (index, value)) in indexes.iter().zip(values).enumerate().skip(batched) {
        if let Err(err) = slots.set(*index, *value, 0) {
            return (i, Some(err.into()));
        }
    }
    (indexes.len(), None)
}

/// The `BackendValue::flags` a state's sets give one of its backends: its node and its
/// conditions.
pub(crate) fn backend_flags(state: &DesiredState, backend: &Backend) -> u8 {
    let mut flags = 0;
    if state.remote_backends.contains(backend) {
        flags |= BACKEND_REMOTE;
    }
    if state.terminating_backends.contains(backend) {
        flags |= BACKEND_TERMINATING;
    }
    flags
}

/// Where a backend goes in a full sync's write order: address, port and protocol, as one
/// integer computed once (a sort comparing tuples cost more than the writes).
fn backend_order(backend: &Backend) -> u64 {
    (u64::from(u32::from(backend.addr)) << 24)
        | (u64::from(backend.port) << 8)
        | u64::from(backend.protocol.number())
}

/// The rest of one step of [`Applier::write_new_entries`] after its batch wrote the first
/// `done` elements: the others one by one with `one`, skipping those whose service (`owners`)
/// has failed already; a failure marks the service. Returns how many elements were written.
fn finish_step<K: Copy, V: Copy>(
    done: usize,
    keys: &[K],
    values: &[V],
    owners: &[usize],
    failed: &mut [Option<anyhow::Error>],
    mut one: impl FnMut(K, V) -> anyhow::Result<()>,
) -> usize {
    let mut written = done;
    for j in done..keys.len() {
        if failed[owners[j]].is_some() {
            continue;
        }
        match one(keys[j], values[j]) {
            Ok(()) => written += 1,
            Err(err) => failed[owners[j]] = Some(err),
        }
    }
    written
}

/// An entry's `ServiceValue` flags (before Maglev) and affinity timeout.
fn entry_settings(service: &DesiredService) -> (u32, u32) {
    let flags = match service.when_empty {
        WhenEmpty::Drop => SERVICE_DROP_WHEN_EMPTY,
        WhenEmpty::Reject => 0,
    };
    (flags, service.affinity_timeout_seconds.unwrap_or(0))
}

/// Entries a service with `n` backends is given: a quarter more, so that it grows a while
/// without moving (a move rewrites all its slots).
fn run_for(n: u32) -> u32 {
    n.saturating_add(n / 4)
}

/// Which tables of `LB_MAGLEV` (units of M entries, from 1) services hold. A service's table
/// spans one or more consecutive units (`maglev::table_size`).
struct MaglevUnits {
    /// By table id - 1.
    used: Vec<bool>,
}

impl MaglevUnits {
    fn new(count: u32) -> Self {
        Self {
            used: vec![false; count as usize],
        }
    }

    /// Are `units` tables from `start` all in the map and free?
    fn is_free(&self, start: u32, units: u32) -> bool {
        let first = start.wrapping_sub(1) as usize;
        units > 0
            && self
                .used
                .get(first..first.saturating_add(units as usize))
                .is_some_and(|run| run.iter().all(|u| !u))
    }

    fn hold(&mut self, start: u32, units: u32, held: bool) {
        let first = start.wrapping_sub(1) as usize;
        let end = first.saturating_add(units as usize).min(self.used.len());
        if let Some(run) = self.used.get_mut(first..end) {
            run.fill(held);
        }
    }

    /// The first of `units` consecutive free tables, now held (first fit).
    fn allocate(&mut self, units: u32) -> Option<u32> {
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == units as usize {
                let start = (i + 2 - run) as u32;
                self.hold(start, units, true);
                return Some(start);
            }
        }
        None
    }
}

/// How many tables of `unit` entries a Maglev table of `size` entries spans (at least one).
fn units_of(size: u32, unit: u32) -> u32 {
    if unit == 0 {
        return 1;
    }
    size.div_ceil(unit).max(1)
}

/// Never a backend id (ids index `LB_BACKENDS`): forces the write of a table entry.
const MAGLEV_UNKNOWN: u32 = u32::MAX;

impl Applier {
    /// Opens the pinned maps and adopts whatever they already hold.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let mut maps = Maps::open(pin_dir)?;
        let mut backends = BackendTable::default();
        for (id, value) in read_backends(&maps.backends)? {
            match backend_from_value(&value) {
                Some(backend) => backends.insert(id, backend, value.flags),
                None => warn!(id, "dropping backend entry with an unknown protocol"),
            }
        }
        let mut services = BTreeMap::new();
        let mut written = FastMap::new();
        for (id, value) in maps.present_services()? {
            // A service without a name cannot be matched to an object: dropped by the sync.
            let name = maps
                .service_names
                .get(&id, 0)
                .map(|n| decode_name(&n))
                .unwrap_or_default();
            services.insert(id, (name, Vec::new()));
            written.insert(id, value);
        }
        // Adopt the Maglev tables the services point at, so a restart rewrites none of them.
        // One that does not fit the map (rebuilt smaller, or for another table size) is
        // forgotten: the next write of its service takes a new one.
        let (maglev_size, maglev_count) = maps.maglev_layout();
        let mut maglev_tables = FastMap::new();
        let mut maglev_alloc = MaglevUnits::new(maglev_count);
        for value in written.values_mut() {
            let (table, size) = (value.maglev_table, value.maglev_size);
            if table == 0 {
                continue;
            }
            let units = units_of(size, maglev_size);
            if !maglev_alloc.is_free(table, units) {
                value.maglev_table = MAGLEV_UNKNOWN;
                continue;
            }
            maglev_alloc.hold(table, units, true);
            maglev_tables.insert(table, maps.read_maglev_table(table, maglev_size, size)?);
        }
        // Adopt each service's run of slots (as long as its count: the room it had beyond is
        // not recorded). One that overlaps another, leaves the map or holds entries of another
        // service is forgotten: the next write of the service puts its slots in a new run.
        // One batched read of the whole array (a periodic resync reopens the maps too).
        let slot_entries = crate::batch::read_array(&maps.slots, 16_384)
            .map_err(|err| anyhow!("reading LB_SLOTS: {err}"))?;
        let mut slot_alloc = SlotRuns::new(maps.slots.len());
        let mut slot_runs = FastMap::new();
        let backend_limit = maps.backends.len();
        for (&id, value) in &mut written {
            let (base, count) = (value.slot_base, value.backend_count);
            let Some((_, list)) = services.get_mut(&id) else {
                continue;
            };
            let read: anyhow::Result<Vec<u32>> = (0..count)
                .map(|slot| {
                    let index = base.wrapping_add(slot) as usize;
                    let entry = slot_entries.get(index).context("slot outside LB_SLOTS")?;
                    anyhow::ensure!(entry.service_id == id, "slot of another service");
                    // (Ids index tables sized by the map: a foreign value must not size them.)
                    anyhow::ensure!(
                        entry.backend_id < backend_limit,
                        "backend id outside LB_BACKENDS"
                    );
                    Ok(entry.backend_id)
                })
                .collect();
            match read {
                Ok(ids) if count > 0 && slot_alloc.hold(base, count) => {
                    *list = ids;
                    slot_runs.insert(id, (base, count));
                }
                Ok(_) if count == 0 => {}
                _ => {
                    warn!(
                        id,
                        base, count, "service entry names unusable slots; rewriting them"
                    );
                    value.slot_base = u32::MAX;
                }
            }
        }
        // Room to grow again where the entries after a run are free, runs in map order.
        let mut runs: Vec<(u32, u32, u32)> = slot_runs
            .iter()
            .map(|(&id, &(base, count))| (base, count, id))
            .collect();
        runs.sort_unstable();
        for (base, count, id) in runs {
            if slot_alloc.extend(base, count, run_for(count)) {
                slot_runs.insert(id, (base, run_for(count)));
            }
        }
        // Entries outside every run (released by an earlier agent and not yet cleared, say)
        // still name their old owner, whose id a new service may get: clear them now.
        let stale: Vec<u32> = slot_entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.service_id != 0)
            .map(|(index, _)| index as u32)
            .filter(|&index| slot_alloc.is_free(index))
            .collect();
        let zeros = vec![SlotValue::default(); stale.len()];
        if let (_, Some(err)) = write_slot_entries(&mut maps.slots, &stale, &zeros) {
            return Err(err.context("clearing a stale slot"));
        }
        let mut frontends = FastMap::new();
        for entry in maps.frontends.iter() {
            let (key, value) = entry.context("reading LB_FRONTENDS")?;
            frontends.insert(key, value);
        }
        let mut source_ranges = BTreeSet::new();
        for key in maps.source_ranges.keys() {
            let key = key.context("reading LB_SOURCE_RANGES")?;
            let data = key.data();
            source_ranges.insert((data.frontend, key.prefix_len(), data.client));
        }
        let backend_ids = backends
            .ids()
            .filter_map(|id| backends.get(id).map(|&(b, _)| (b, id)))
            .collect();
        let mut frontends_by_service: FastMap<u32, BTreeSet<FrontendKey>> = FastMap::new();
        for (key, value) in &frontends {
            frontends_by_service
                .entry(value.service_id)
                .or_default()
                .insert(*key);
        }
        let mut slot_refs = SlotRefs::default();
        for (_, ids) in services.values() {
            slot_refs.add(ids);
        }
        let service_ids = services
            .iter()
            .map(|(&id, (name, _))| (name.clone(), id))
            .collect();
        // Whatever the pinned filter holds, it covers what the maps hold from here on.
        let conntrack = open_conntrack(pin_dir)?;
        let filter = AddrFilter::open(pin_dir, live_bits(&frontends, &backends), &conntrack)?;
        Ok(Self {
            backend_alloc: IdAllocator::from_used(backends.ids()),
            service_alloc: IdAllocator::from_used(services.keys().copied()),
            maps,
            backends,
            backend_ids,
            services,
            written,
            slot_runs,
            slot_alloc,
            service_ids,
            frontends,
            frontends_by_service,
            slot_refs,
            source_ranges,
            maglev_size,
            maglev_count,
            maglev_alloc,
            maglev_tables,
            maglev_inputs: FastMap::new(),
            filter,
            conntrack,
        })
    }

    /// Makes the maps hold `desired`, writing only what differs. A service whose entries cannot
    /// be written (a full map, say) is reported in [`SyncReport::errors`] and keeps what it had;
    /// the others are still programmed. Callers retry on the next sync.
    pub fn sync(&mut self, desired: &DesiredState) -> anyhow::Result<SyncReport> {
        self.sync_input(&SyncInput::from_state(desired))
    }

    /// [`Applier::sync`] from a borrowed view of the desired state (the engine's parts, say),
    /// so a full sync needs no merged copy.
    pub fn sync_input(&mut self, desired: &SyncInput<'_>) -> anyhow::Result<SyncReport> {
        let mut report = SyncReport::default();
        // Before this call's writes: see `filter` on why.
        self.tidy_filter(&mut report);
        self.settle_slots(&mut report);

        // 1. Backends first, so that no slot ever points at a missing backend. Endpoints that
        //    are known but not chosen (terminating, not ready) stay too: established flows to
        //    them keep going, as with kube-proxy, until they leave their slice.
        let room = self.plan_backends(
            desired.entries.iter().map(|(_, s)| *s),
            desired.backends.keys(),
        );
        // In address order: new ids are handed out the same way whatever the order the view
        // was built in.
        let mut stored: Vec<(u64, Backend, u8)> = desired
            .backends
            .iter()
            .filter(|(b, _)| {
                self.backend_ids.contains_key(*b) || room.as_ref().is_none_or(|r| r.contains(*b))
            })
            .map(|(b, &flags)| (backend_order(b), *b, flags))
            .collect();
        stored.sort_unstable_by_key(|e| e.0);
        let stored: Vec<(Backend, u8)> = stored.into_iter().map(|(_, b, f)| (b, f)).collect();
        self.put_backends(&stored, &mut report);

        // 2. Each service's slots and backend count. A service that cannot be written whole
        //    keeps its previous entries (and frontends) rather than being half programmed.
        let mut wanted_frontends: FastMap<FrontendKey, (FrontendValue, &str)> = FastMap::new();
        let mut wanted_ranges: BTreeSet<RangeEntry> = BTreeSet::new();
        let mut kept: BTreeSet<u32> = BTreeSet::new();
        let results = self.write_entries(&desired.entries, &mut report);
        for (&(name, service), result) in desired.entries.iter().zip(results) {
            let service_id = match result {
                Ok(id) => id,
                Err(err) => {
                    report.errors.push(format!("service {name}: {err:#}"));
                    // Keep serving whatever this service had.
                    if let Some(&id) = self.service_ids.get(name) {
                        kept.insert(id);
                        for (key, value) in &self.frontends {
                            if value.service_id == id {
                                wanted_frontends.entry(*key).or_insert((*value, name));
                            }
                        }
                        for entry in &self.source_ranges {
                            if self
                                .frontends
                                .get(&entry.0)
                                .is_some_and(|v| v.service_id == id)
                            {
                                wanted_ranges.insert(*entry);
                            }
                        }
                    }
                    continue;
                }
            };
            for (frontend, key, value, ranges) in
                entry_frontends(service, service_id, &desired.node_addresses)
            {
                if let Some((_, owner)) = wanted_frontends.get(&key) {
                    report.errors.push(format!(
                        "service {name}: frontend {}:{}/{} is already used by {owner}; kept there",
                        frontend.addr, frontend.port, frontend.protocol
                    ));
                    continue;
                }
                wanted_ranges.extend(ranges);
                wanted_frontends.insert(key, (value, name));
            }
        }

        // 3-4. Source ranges, then frontends (added or repointed); removals after.
        self.write_ranges_and_frontends(&wanted_ranges, &wanted_frontends, &mut report);
        let stale: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !wanted_frontends.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            self.maps
                .frontends
                .remove(&key)
                .context("removing a frontend")?;
            self.record_frontend(key, None);
            report.deletes += 1;
        }
        let stale: Vec<RangeEntry> = self
            .source_ranges
            .difference(&wanted_ranges)
            .copied()
            .collect();
        for entry in stale {
            self.remove_range(entry)?;
            report.deletes += 1;
        }

        // 5. Services nobody points at any more (never one a frontend still names, so an id is
        //    not reused under a live frontend), then backends nothing uses.
        let referenced: BTreeSet<u32> = self.frontends.values().map(|v| v.service_id).collect();
        let stale: Vec<u32> = self
            .services
            .iter()
            .filter(|(id, (name, _))| {
                !desired.has_entry(name) && !kept.contains(id) && !referenced.contains(id)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.remove_service(id, &mut report)?;
        }
        // Ids are dense: one flag per id.
        let mut used = vec![false; self.backends.by_id.len()];
        let in_slots = self
            .services
            .values()
            .flat_map(|(_, ids)| ids.iter().copied());
        let wanted = desired
            .backends
            .keys()
            .filter_map(|b| self.backend_ids.get(b).copied());
        for id in in_slots.chain(wanted) {
            if let Some(flag) = used.get_mut(id as usize) {
                *flag = true;
            }
        }
        let stale: Vec<u32> = self
            .backends
            .ids()
            .filter(|&id| !used.get(id as usize).copied().unwrap_or(false))
            .collect();
        for id in stale {
            self.remove_backend(id)?;
            report.deletes += 1;
        }

        report.services = self.services.len();
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        Ok(report)
    }

    /// Which new backends get an id when `LB_BACKENDS` cannot hold them all (`None`: it holds
    /// them all, the usual case): whole services (in the order given: name order), never part
    /// of one, so a Service that does not fit is refused whole and cannot starve the ones after
    /// it; then endpoints that are only known (draining ones), while room is left. `known`
    /// lists every backend, the services' chosen ones included.
    fn plan_backends<'a>(
        &self,
        services: impl Iterator<Item = &'a DesiredService>,
        known: impl Iterator<Item = &'a Backend> + Clone,
    ) -> Option<FastSet<Backend>> {
        let mut room = self.backend_alloc.available(self.maps.backends.len());
        let new = known
            .clone()
            .filter(|b| !self.backend_ids.contains_key(b))
            .count();
        if new <= room {
            return None;
        }
        let mut planned = FastSet::new();
        let mut chosen = FastSet::new();
        for service in services {
            chosen.extend(service.backends.iter().copied());
            let new: BTreeSet<&Backend> = service
                .backends
                .iter()
                .filter(|b| !self.backend_ids.contains_key(b) && !planned.contains(*b))
                .collect();
            if new.len() <= room {
                room -= new.len();
                planned.extend(new.into_iter().copied());
            }
        }
        // A refused Service's own backends are not worth an id as merely known ones. In address
        // order, so which draining ones get the room left does not depend on a hash seed.
        let mut known: Vec<&Backend> = known.collect();
        known.sort_unstable_by_key(|b| backend_order(b));
        for backend in known {
            if room == 0 {
                break;
            }
            if !chosen.contains(backend)
                && !self.backend_ids.contains_key(backend)
                && planned.insert(*backend)
            {
                room -= 1;
            }
        }
        Some(planned)
    }

    /// Stores backends (new, or with new flags), in one batched write where the kernel has it
    /// (a full sync stores tens of thousands); one that cannot be stored leaves the services
    /// that need it refused (see [`Applier::write_entry`]).
    fn put_backends(&mut self, list: &[(Backend, u8)], report: &mut SyncReport) {
        let mut ids = Vec::new();
        let mut values = Vec::new();
        let mut pending = Vec::new();
        for &(backend, flags) in list {
            let (id, is_new) = match self.backend_ids.get(&backend) {
                Some(&id) if self.backends.get(id).map(|b| b.1) == Some(flags) => continue,
                Some(&id) => (id, false),
                None => match self.backend_alloc.allocate(self.maps.backends.len()) {
                    Some(id) => (id, true),
                    None => continue,
                },
            };
            ids.push(id);
            values.push(backend_value(&backend, flags));
            pending.push((backend, flags, is_new));
        }
        // Their replies must not pass the datapath's filter before they are stored.
        self.filter
            .add(values.iter().map(|v| backend_bit(v.addr, v.port, v.proto)));
        if let Err(err) = self.filter.flush() {
            for ((backend, _, is_new), id) in pending.into_iter().zip(ids) {
                if is_new {
                    self.backend_alloc.release(id);
                }
                report.errors.push(format!(
                    "backend {}:{}: {err:#}",
                    backend.addr, backend.port
                ));
            }
            return;
        }
        let (batched, err) = crate::batch::update_array(&self.maps.backends, &ids, &values);
        if let Some(err) = err.filter(|_| batched < ids.len()) {
            debug!(%err, batched, of = ids.len(), "batched backend write stopped; one by one");
        }
        for (i, (backend, flags, is_new)) in pending.into_iter().enumerate() {
            let id = ids[i];
            let stored = if i < batched {
                Ok(())
            } else {
                self.maps.backends.set(id, values[i], 0)
            };
            match stored {
                Ok(()) => {
                    if is_new {
                        self.backend_ids.insert(backend, id);
                    }
                    self.backends.insert(id, backend, flags);
                    report.writes += 1;
                }
                Err(err) => {
                    if is_new {
                        self.backend_alloc.release(id);
                    }
                    report
                        .errors
                        .push(format!("backend {}:{}: {err}", backend.addr, backend.port));
                }
            }
        }
    }

    /// The backend ids of an entry's backends, in its order; every one must be stored.
    fn backend_ids_of(&self, service: &DesiredService) -> anyhow::Result<Vec<u32>> {
        service
            .backends
            .iter()
            .map(|b| {
                self.backend_ids.get(b).copied().ok_or_else(|| {
                    anyhow!(
                        "backend {}:{} could not be stored (LB_BACKENDS full? see --max-backends)",
                        b.addr,
                        b.port
                    )
                })
            })
            .collect()
    }

    /// Writes the entries' slots and service entries (not their frontends); their ids, or why
    /// not, in the order given. New entries without Maglev are written together, one system
    /// call per map for all of them (a full sync from empty has 10,000s); the rest one by one.
    fn write_entries(
        &mut self,
        entries: &[(&str, &DesiredService)],
        report: &mut SyncReport,
    ) -> Vec<anyhow::Result<u32>> {
        let mut results: Vec<Option<anyhow::Result<u32>>> = std::iter::repeat_with(|| None)
            .take(entries.len())
            .collect();
        let fresh: Vec<usize> = (0..entries.len())
            .filter(|&i| !entries[i].1.maglev && !self.service_ids.contains_key(entries[i].0))
            .collect();
        if !fresh.is_empty() {
            self.write_new_entries(entries, &fresh, &mut results, report);
        }
        entries
            .iter()
            .zip(results)
            .map(|(&(name, service), done)| {
                done.unwrap_or_else(|| self.write_entry(name, service, report))
            })
            .collect()
    }

    /// New services (no id yet, no Maglev table), written map by map: counters, then slots,
    /// then names, then the service entries, each in one batch (one by one for what a batch
    /// leaves). A service that any step fails is undone whole: nothing of it is visible before
    /// its entry, written last, and no frontend names it yet.
    fn write_new_entries(
        &mut self,
        entries: &[(&str, &DesiredService)],
        fresh: &[usize],
        results: &mut [Option<anyhow::Result<u32>>],
        report: &mut SyncReport,
    ) {
        struct Planned {
            at: usize,
            id: u32,
            run: (u32, u32),
            slots: Vec<u32>,
            value: ServiceValue,
        }
        let limit = self.maps.service_stats.len();
        let mut planned = Vec::with_capacity(fresh.len());
        for &at in fresh {
            let service = entries[at].1;
            let slots = match self.backend_ids_of(service) {
                Ok(slots) => slots,
                Err(err) => {
                    results[at] = Some(Err(err));
                    continue;
                }
            };
            let Some(id) = self.service_alloc.allocate(limit) else {
                results[at] = Some(Err(anyhow!("no free service id (see --max-services)")));
                continue;
            };
            let count = slots.len() as u32;
            let run = if count == 0 {
                Some((0, 0))
            } else {
                let mut fit = |len| self.slot_alloc.allocate(len).map(|at| (at, len));
                fit(run_for(count)).or_else(|| fit(count))
            };
            let Some(run) = run else {
                self.service_alloc.release(id);
                results[at] = Some(Err(anyhow!(
                    "LB_SLOTS has no {count} free entries in a row (see --max-backends)"
                )));
                continue;
            };
            let (flags, affinity_timeout_s) = entry_settings(service);
            let value = ServiceValue {
                backend_count: count,
                slot_base: run.0,
                flags,
                affinity_timeout_s,
                maglev_table: 0,
                maglev_size: 0,
            };
            planned.push(Planned {
                at,
                id,
                run,
                slots,
                value,
            });
        }
        let mut failed: Vec<Option<anyhow::Error>> = std::iter::repeat_with(|| None)
            .take(planned.len())
            .collect();

        // Each step writes what the ones before left standing: a batch, then the rest one by
        // one; an element that fails marks its service failed.
        let standing = |failed: &[Option<anyhow::Error>]| -> Vec<usize> {
            (0..planned.len())
                .filter(|&i| failed[i].is_none())
                .collect()
        };

        // A reused id starts with clean traffic counters.
        let owners = standing(&failed);
        let ids: Vec<u32> = owners.iter().map(|&i| planned[i].id).collect();
        let cpus = aya::util::nr_cpus().unwrap_or(0);
        let (done, _) = if cpus > 0 {
            crate::batch::zero_percpu_array(&self.maps.service_stats, &ids, cpus)
        } else {
            (0, None)
        };
        let units = vec![(); ids.len()];
        finish_step(done, &ids, &units, &owners, &mut failed, |id, ()| {
            self.clear_counters(id)
        });

        let (mut indexes, mut values, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for i in standing(&failed) {
            let p = &planned[i];
            for (k, &backend_id) in p.slots.iter().enumerate() {
                indexes.push(p.run.0 + k as u32);
                values.push(SlotValue {
                    backend_id,
                    service_id: p.id,
                });
                owners.push(i);
            }
        }
        let (done, _) = crate::batch::update_array(&self.maps.slots, &indexes, &values);
        let slots = &mut self.maps.slots;
        report.writes += finish_step(done, &indexes, &values, &owners, &mut failed, |i, v| {
            slots.set(i, v, 0).context("writing backend slots")
        });

        let owners = standing(&failed);
        let ids: Vec<u32> = owners.iter().map(|&i| planned[i].id).collect();
        let names: Vec<ServiceName> = owners
            .iter()
            .map(|&i| encode_name(entries[planned[i].at].0))
            .collect();
        let (done, _) = crate::batch::update_hash(&self.maps.service_names, &ids, &names);
        let service_names = &mut self.maps.service_names;
        finish_step(done, &ids, &names, &owners, &mut failed, |id, name| {
            service_names
                .insert(id, name, 0)
                .context("writing the service name")
        });

        let owners = standing(&failed);
        let ids: Vec<u32> = owners.iter().map(|&i| planned[i].id).collect();
        let values: Vec<ServiceValue> = owners.iter().map(|&i| planned[i].value).collect();
        let (done, _) = crate::batch::update_array(&self.maps.services, &ids, &values);
        let services = &mut self.maps.services;
        report.writes += finish_step(done, &ids, &values, &owners, &mut failed, |id, value| {
            services
                .set(id, value, 0)
                .context("writing the service entry")
        });

        for (p, failure) in planned.into_iter().zip(failed) {
            let name = entries[p.at].0;
            if let Some(err) = failure {
                let _ = self.maps.service_names.remove(&p.id);
                if p.run.1 > 0 {
                    self.slot_alloc.free(p.run.0, p.run.1);
                }
                self.service_alloc.release(p.id);
                results[p.at] = Some(Err(err));
                continue;
            }
            debug!(service = name, id = p.id, "new service");
            self.service_ids.insert(name.to_string(), p.id);
            self.record_slots(p.id, name, p.slots);
            if p.run.1 > 0 {
                self.slot_runs.insert(p.id, p.run);
            }
            self.written.insert(p.id, p.value);
            results[p.at] = Some(Ok(p.id));
        }
    }

    /// Writes one desired entry's slots and service entry (not its frontends); returns its id.
    fn write_entry(
        &mut self,
        name: &str,
        service: &DesiredService,
        report: &mut SyncReport,
    ) -> anyhow::Result<u32> {
        let ids = self.backend_ids_of(service)?;
        // No backend, no table: the datapath looks at the count first.
        let maglev: Option<Vec<Backend>> = (service.maglev && !service.backends.is_empty())
            .then(|| service.backends.iter().copied().collect());
        self.write_service(
            name,
            &ids,
            entry_settings(service),
            maglev.as_deref(),
            report,
        )
    }

    /// Applies a [`Delta`](crate::engine::Delta): only the entries and backends it names are
    /// touched, in the same make-before-break order as [`Applier::sync`] (backends, then
    /// slots and service entries, then source ranges and frontends, then removals). Everything
    /// else stays as it is, so the cost follows the size of the change, not of the cluster.
    pub fn apply_delta(
        &mut self,
        delta: &crate::engine::Delta,
        node_addresses: &BTreeSet<Ipv4Addr>,
    ) -> anyhow::Result<SyncReport> {
        let mut report = SyncReport::default();
        // Before this call's writes: see `filter` on why.
        self.tidy_filter(&mut report);
        self.settle_slots(&mut report);
        // 1. Backends.
        let room = self.plan_backends(delta.upsert.values(), delta.backends.keys());
        let stored: Vec<(Backend, u8)> = delta
            .backends
            .iter()
            .filter(|(b, _)| {
                self.backend_ids.contains_key(b) || room.as_ref().is_none_or(|r| r.contains(*b))
            })
            .map(|(b, &flags)| (*b, flags))
            .collect();
        self.put_backends(&stored, &mut report);

        // 2. Slots and service entries of the changed entries; their frontends are collected.
        //    `changing`: the ids whose frontends this delta decides.
        let mut changing: BTreeSet<u32> = BTreeSet::new();
        let mut wanted_frontends: FastMap<FrontendKey, (FrontendValue, &str)> = FastMap::new();
        let mut wanted_ranges: BTreeSet<RangeEntry> = BTreeSet::new();
        let mut entries = Vec::new();
        let upsert: Vec<(&str, &DesiredService)> =
            delta.upsert.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let results = self.write_entries(&upsert, &mut report);
        for ((name, service), result) in delta.upsert.iter().zip(results) {
            match result {
                Ok(id) => {
                    changing.insert(id);
                    entries.push((name, service, id));
                }
                // Keeps whatever it had, frontends included.
                Err(err) => report.errors.push(format!("service {name}: {err:#}")),
            }
        }
        for name in &delta.remove {
            if let Some(&id) = self.service_ids.get(name) {
                changing.insert(id);
            }
        }
        for (name, service, id) in entries {
            for (frontend, key, value, ranges) in entry_frontends(service, id, node_addresses) {
                let owner = match wanted_frontends.get(&key) {
                    Some((_, owner)) => Some(owner.to_string()),
                    // Held by an entry this delta leaves alone: it keeps it.
                    None => self
                        .frontends
                        .get(&key)
                        .filter(|v| v.service_id != id && !changing.contains(&v.service_id))
                        .map(|v| {
                            self.services
                                .get(&v.service_id)
                                .map_or_else(|| format!("#{}", v.service_id), |s| s.0.clone())
                        }),
                };
                if let Some(owner) = owner {
                    report.errors.push(format!(
                        "service {name}: frontend {}:{}/{} is already used by {owner}; kept there",
                        frontend.addr, frontend.port, frontend.protocol
                    ));
                    continue;
                }
                wanted_ranges.extend(ranges);
                wanted_frontends.insert(key, (value, name.as_str()));
            }
        }

        // 3. Source ranges, then frontends (added or repointed).
        self.write_ranges_and_frontends(&wanted_ranges, &wanted_frontends, &mut report);

        // 4. Removals: frontends the changed entries no longer have, their source ranges,
        //    services that are gone, backends nobody uses.
        let stale: Vec<FrontendKey> = changing
            .iter()
            .filter_map(|id| self.frontends_by_service.get(id))
            .flatten()
            .filter(|k| !wanted_frontends.contains_key(k))
            .copied()
            .collect();
        for key in &stale {
            self.maps
                .frontends
                .remove(key)
                .context("removing a frontend")?;
            self.record_frontend(*key, None);
            report.deletes += 1;
        }
        let touched: BTreeSet<FrontendKey> = stale
            .iter()
            .chain(wanted_frontends.keys())
            .copied()
            .collect();
        let stale: Vec<RangeEntry> = self
            .source_ranges
            .iter()
            .filter(|e| touched.contains(&e.0) && !wanted_ranges.contains(e))
            .copied()
            .collect();
        for entry in stale {
            self.remove_range(entry)?;
            report.deletes += 1;
        }
        for name in &delta.remove {
            let Some(&id) = self.service_ids.get(name) else {
                continue;
            };
            if !self.frontends_by_service.contains_key(&id) {
                self.remove_service(id, &mut report)?;
            }
        }
        for backend in &delta.released {
            let Some(&id) = self.backend_ids.get(backend) else {
                continue;
            };
            if self.slot_refs.any(id) {
                continue; // still in a refused service's old slots
            }
            self.remove_backend(id)?;
            report.deletes += 1;
        }
        report.services = self.services.len();
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        Ok(report)
    }

    /// Rebuilds the address filter once enough stale keys have piled up in it.
    fn tidy_filter(&mut self, report: &mut SyncReport) {
        let live = self.frontends.len() + self.backends.len();
        if !self.filter.wants_rebuild(live) {
            return;
        }
        match self.rebuild_address_filter() {
            Ok(done) => debug!(
                keys = done.keys,
                flows = done.flows,
                bits_before = done.bits_before,
                bits_after = done.bits_after,
                "address filter rebuilt"
            ),
            Err(err) => report
                .errors
                .push(format!("rebuilding the address filter: {err:#}")),
        }
    }

    /// How long removed frontends and backends keep their filter bits through rebuilds
    /// (`filter::REMOVAL_GRACE`; tests shorten it).
    #[doc(hidden)]
    pub fn set_filter_grace(&mut self, grace: Duration) {
        self.filter.set_grace(grace);
    }

    /// Rebuilds `LB_ADDR_FILTER` from the live frontends and backends and every conntrack
    /// entry (done by itself once enough keys have gone stale).
    pub fn rebuild_address_filter(&mut self) -> anyhow::Result<RebuildReport> {
        let live = live_bits(&self.frontends, &self.backends);
        self.filter.rebuild(live, &self.conntrack)
    }

    /// Keeps `frontends` and its index in step: `Some` written, `None` removed.
    fn record_frontend(&mut self, key: FrontendKey, value: Option<FrontendValue>) {
        let old = match value {
            Some(value) => self.frontends.insert(key, value),
            None => {
                self.filter.removed(frontend_bit(&key));
                self.frontends.remove(&key)
            }
        };
        if let Some(old) = old {
            if let Some(keys) = self.frontends_by_service.get_mut(&old.service_id) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.frontends_by_service.remove(&old.service_id);
                }
            }
        }
        if let Some(value) = value {
            self.frontends_by_service
                .entry(value.service_id)
                .or_default()
                .insert(key);
        }
    }

    /// Records the slots a service's entry now exposes, keeping `slot_refs` in step.
    fn record_slots(&mut self, id: u32, name: &str, slots: Vec<u32>) {
        self.slot_refs.add(&slots);
        if let Some((_, old)) = self.services.insert(id, (name.to_string(), slots)) {
            self.slot_refs.remove(&old);
        }
    }

    /// Source ranges before the frontends that check them, so a restricted frontend never
    /// appears with an empty allow-list; then each frontend that is new or points elsewhere.
    fn write_ranges_and_frontends(
        &mut self,
        ranges: &BTreeSet<RangeEntry>,
        frontends: &FastMap<FrontendKey, (FrontendValue, &str)>,
        report: &mut SyncReport,
    ) {
        for entry in ranges {
            if !self.source_ranges.contains(entry) {
                self.insert_range(entry, report);
            }
        }
        let (mut keys, mut values, mut names) = (Vec::new(), Vec::new(), Vec::new());
        for (key, (value, name)) in frontends {
            if self.frontends.get(key) != Some(value) {
                keys.push(*key);
                values.push(*value);
                names.push(*name);
            }
        }
        // A frontend's packets must not pass the datapath's filter once it is written.
        self.filter.add(keys.iter().map(frontend_bit));
        if let Err(err) = self.filter.flush() {
            for name in names {
                report
                    .errors
                    .push(format!("service {name}: writing frontend: {err:#}"));
            }
            return;
        }
        // One batch (a full sync from empty writes one per Service), one by one for the rest.
        let (batched, _) = crate::batch::update_hash(&self.maps.frontends, &keys, &values);
        for (i, name) in names.into_iter().enumerate() {
            let written = if i < batched {
                Ok(())
            } else {
                self.maps.frontends.insert(keys[i], values[i], 0)
            };
            match written {
                Ok(()) => {
                    self.record_frontend(keys[i], Some(values[i]));
                    report.writes += 1;
                }
                Err(err) => report
                    .errors
                    .push(format!("service {name}: writing frontend: {err}")),
            }
        }
    }

    fn insert_range(&mut self, entry: &RangeEntry, report: &mut SyncReport) {
        let (frontend, prefix_len, client) = *entry;
        let key = LpmKey::new(prefix_len, SourceRangeKey { frontend, client });
        match self.maps.source_ranges.insert(&key, 1, 0) {
            Ok(()) => {
                self.source_ranges.insert(*entry);
                report.writes += 1;
            }
            Err(err) => report.errors.push(format!(
                "writing source range {}/{}: {err}",
                Ipv4Addr::from(client),
                prefix_len.saturating_sub(SOURCE_RANGE_FRONTEND_BITS)
            )),
        }
    }

    fn remove_range(&mut self, entry: RangeEntry) -> anyhow::Result<()> {
        let (frontend, prefix_len, client) = entry;
        let key = LpmKey::new(prefix_len, SourceRangeKey { frontend, client });
        self.maps
            .source_ranges
            .remove(&key)
            .context("removing a source range")?;
        self.source_ranges.remove(&entry);
        Ok(())
    }

    fn remove_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.maps
            .backends
            .set(id, BackendValue::default(), 0)
            .context("removing a backend")?;
        if let Some(backend) = self.backends.remove(id) {
            self.backend_ids.remove(&backend);
            self.filter.removed(backend_filter_bit(&backend));
        }
        self.backend_alloc.release(id);
        Ok(())
    }

    /// Writes one service's slots and count; returns its id.
    fn write_service(
        &mut self,
        name: &str,
        wanted: &[u32],
        flags: (u32, u32),
        maglev: Option<&[Backend]>,
        report: &mut SyncReport,
    ) -> anyhow::Result<u32> {
        match self.service_ids.get(name) {
            Some(&id) => {
                let old = self.services[&id].1.clone();
                // Whatever happens, the record says what the maps now hold, so a later sync
                // diffs against the truth.
                let mut record = old.clone();
                let result = self.write_slots(
                    id,
                    &old,
                    wanted,
                    (flags, maglev),
                    false,
                    name,
                    &mut record,
                    report,
                );
                self.record_slots(id, name, record);
                result.map(|()| id)
            }
            None => {
                // (A new Service with Maglev: the others are written by write_new_entries.)
                // Ids index LB_SERVICE_STATS, so they must stay below its size.
                let limit = self.maps.service_stats.len();
                let id = self
                    .service_alloc
                    .allocate(limit)
                    .ok_or_else(|| anyhow!("no free service id (see --max-services)"))?;
                let mut record = Vec::new();
                let result = self.clear_counters(id).and_then(|()| {
                    self.write_slots(
                        id,
                        &[],
                        wanted,
                        (flags, maglev),
                        true,
                        name,
                        &mut record,
                        report,
                    )
                });
                match result {
                    Ok(()) => {
                        debug!(service = name, id, "new service");
                        self.service_ids.insert(name.to_string(), id);
                        self.record_slots(id, name, record);
                        Ok(id)
                    }
                    Err(err) => {
                        // Not visible to the datapath yet (no frontend points at it): undo.
                        let _ = self.maps.services.set(id, ServiceValue::default(), 0);
                        let _ = self.maps.service_names.remove(&id);
                        if let Some(value) = self.written.remove(&id) {
                            self.release_maglev(value.maglev_table, value.maglev_size);
                        }
                        if let Some((base, len)) = self.slot_runs.remove(&id) {
                            self.slot_alloc.free(base, len);
                        }
                        self.service_alloc.release(id);
                        Err(err)
                    }
                }
            }
        }
    }

    /// A reused id starts with clean traffic counters.
    fn clear_counters(&mut self, id: u32) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, err)| anyhow!("{what}: {err}"))?;
        let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); cpus])
            .context("per-CPU values")?;
        self.maps
            .service_stats
            .set(id, zeros, 0)
            .context("clearing the service's counters")
    }

    /// Writes one service's slots and entry. `record` tracks, write by write, the slots the
    /// datapath can see (those below the count in the map).
    #[allow(clippy::too_many_arguments)]
    fn write_slots(
        &mut self,
        id: u32,
        old: &[u32],
        wanted: &[u32],
        (flags, maglev): ((u32, u32), Option<&[Backend]>),
        is_new: bool,
        name: &str,
        record: &mut Vec<u32>,
        report: &mut SyncReport,
    ) -> anyhow::Result<()> {
        let new = arrange_slots(old, wanted);
        let count = new.len() as u32;
        let (base, held) = self.slot_runs.get(&id).copied().unwrap_or((0, 0));
        // Where the slots go: in place while they fit (or the run grows in place), else all
        // of them into a new run that the entry then names.
        let (run, run_len) = if count <= held {
            (base, held)
        } else if held > 0 && self.slot_alloc.extend(base, held, run_for(count)) {
            (base, run_for(count))
        } else if held > 0 && self.slot_alloc.extend(base, held, count) {
            (base, count)
        } else {
            let fit = |alloc: &mut SlotRuns, len| alloc.allocate(len).map(|at| (at, len));
            fit(&mut self.slot_alloc, run_for(count))
                .or_else(|| fit(&mut self.slot_alloc, count))
                .ok_or_else(|| {
                    anyhow!("LB_SLOTS has no {count} free entries in a row (see --max-backends)")
                })?
        };
        let moved = run_len > 0 && (run != base || held == 0);
        // Entries gained by this write and not yet named by the service entry.
        let undo = |this: &mut Self| {
            if moved {
                this.slot_alloc.free(run, run_len);
            } else if run_len > held {
                this.slot_alloc.free(base + held, run_len - held);
            }
        };
        let mut indexes = Vec::new();
        let mut values = Vec::new();
        for (slot, &backend_id) in new.iter().enumerate() {
            if moved || old.get(slot) != Some(&backend_id) {
                indexes.push(run + slot as u32);
                values.push(SlotValue {
                    backend_id,
                    service_id: id,
                });
            }
        }
        // Grow: fill the slots before raising the count. Shrink: lower the count first (the
        // slots beyond it stay as they are). A concurrent reader only ever sees valid slots.
        let (written, err) = write_slot_entries(&mut self.maps.slots, &indexes, &values);
        if !moved {
            // In place, the written ones are visible at once (the rest still hold what they
            // held); in a new run, nothing is until the entry names it.
            for (index, value) in indexes.iter().zip(&values).take(written) {
                if let Some(visible) = record.get_mut((index - run) as usize) {
                    *visible = value.backend_id;
                }
            }
        }
        report.writes += written;
        if let Some(err) = err {
            undo(self);
            return Err(err).context("writing backend slots");
        }
        // The Maglev table after the slots (it names the same backends), before the entry
        // that makes the datapath use it. A service that cannot have one (no free table) is
        // served at random meanwhile, and reported.
        let previous = self.written.get(&id).copied().unwrap_or_default();
        let (old_table, old_size) = (previous.maglev_table, previous.maglev_size);
        let (table, size) = match maglev {
            Some(backends) => match self.write_maglev((old_table, old_size), backends, report) {
                Ok(table) => table,
                Err(err) => {
                    report.errors.push(format!(
                        "service {name}: {err:#}; new flows are spread at random meanwhile"
                    ));
                    (0, 0)
                }
            },
            None => (0, 0),
        };
        // A service left with few of its entries gives the rest back; one with none, all.
        let keep = if count == 0 {
            0
        } else if count <= run_len / 2 {
            run_for(count).min(run_len)
        } else {
            run_len
        };
        let value = ServiceValue {
            backend_count: count,
            slot_base: if keep == 0 { 0 } else { run },
            flags: flags.0 | if table != 0 { SERVICE_MAGLEV } else { 0 },
            affinity_timeout_s: flags.1,
            maglev_table: table,
            maglev_size: size,
        };
        if is_new || self.written.get(&id) != Some(&value) {
            // A packet may read the entry while it is written (an array element is copied in
            // place, not swapped): moving to another Maglev table goes through entries with
            // Maglev off, one field changing at a time, so no packet pairs the new table
            // with the old size or the other way round.
            let mut steps = Vec::new();
            let maglev_on = |v: &ServiceValue| v.flags & SERVICE_MAGLEV != 0;
            // (Not from an entry adoption marked unknown: the map may hold anything else.)
            let known = old_table != MAGLEV_UNKNOWN && previous.slot_base != u32::MAX;
            if !is_new && known && maglev_on(&previous) && maglev_on(&value) && table != old_table {
                let off = |v: ServiceValue| ServiceValue {
                    flags: v.flags & !SERVICE_MAGLEV,
                    ..v
                };
                steps.extend([off(previous), off(value)]);
            }
            steps.push(value);
            let named = if is_new {
                self.maps
                    .service_names
                    .insert(id, encode_name(name), 0)
                    .context("writing the service name")
            } else {
                Ok(())
            };
            let mut failed = named.err().map(|err| (0, err));
            if failed.is_none() {
                for (i, step) in steps.iter().enumerate() {
                    if let Err(err) = self.maps.services.set(id, *step, 0) {
                        failed = Some((i, anyhow!(err).context("writing the service entry")));
                        break;
                    }
                    self.written.insert(id, *step);
                    report.writes += 1;
                }
            }
            match failed {
                // The map names the new table and run, with Maglev off: served at random
                // until the next sync writes the entry again.
                Some((i, err)) if i > 0 && i + 1 == steps.len() => {
                    report.errors.push(format!("service {name}: {err:#}"));
                }
                // The map still names the old table and run.
                Some((_, err)) => {
                    if table != 0 && table != old_table {
                        self.release_maglev(table, size);
                    }
                    undo(self);
                    return Err(err);
                }
                None => {}
            }
        }
        // The entry no longer names the old table or run: free them for other services.
        if old_table != 0 && old_table != table {
            self.release_maglev(old_table, old_size);
        }
        if moved {
            self.slot_alloc.release(base, held);
        }
        self.slot_alloc.release(run + keep, run_len - keep);
        if keep == 0 {
            self.slot_runs.remove(&id);
        } else {
            self.slot_runs.insert(id, (run, keep));
        }
        *record = new;
        Ok(())
    }

    /// Frees the slot runs released by the previous sync or delta (no packet still reads
    /// them), cleared so that a dump shows only live slots.
    fn settle_slots(&mut self, report: &mut SyncReport) {
        let released = std::mem::take(&mut self.slot_alloc.released);
        let indexes: Vec<u32> = released
            .iter()
            .flat_map(|&(start, len)| start..start + len)
            .collect();
        let values = vec![SlotValue::default(); indexes.len()];
        match write_slot_entries(&mut self.maps.slots, &indexes, &values) {
            (_, None) => {
                report.deletes += indexes.len();
                for (start, len) in released {
                    self.slot_alloc.free(start, len);
                }
            }
            // Still named by their old owner's id, which a new service may get: not handed
            // out until cleared (tried again next time).
            (_, Some(err)) => {
                warn!("clearing released slots: {err:#}");
                self.slot_alloc.released.extend(released);
            }
        }
    }

    /// Writes the Maglev table of `backends` (all stored already) into the service's current
    /// table `(first unit, size)` if it has the size these backends need, else into newly
    /// allocated units; returns the table used. Only entries that differ from what the map
    /// holds are written, each one atomically, and every entry names a stored backend
    /// throughout, so readers never see a broken table (a new one is not named by the service
    /// entry until it is whole).
    fn write_maglev(
        &mut self,
        (table, old_size): (u32, u32),
        backends: &[Backend],
        report: &mut SyncReport,
    ) -> anyhow::Result<(u32, u32)> {
        let mut sorted = backends.to_vec();
        sorted.sort();
        sorted.dedup();
        let (units, size) = crate::maglev::table_size(self.maglev_size, sorted.len());
        let in_map = |t: u32| t != 0 && t.saturating_add(units - 1) <= self.maglev_count;
        let (table, is_new) = if in_map(table) && old_size == size {
            (table, false)
        } else {
            let t = self.maglev_alloc.allocate(units).ok_or_else(|| {
                anyhow!("no {units} free Maglev table(s) in a row (see --max-maglev-services)")
            })?;
            // Units inside the new table no longer hold what their records say.
            for unit in t + 1..t + units {
                self.maglev_tables.remove(&unit);
                self.maglev_inputs.remove(&unit);
            }
            (t, true)
        };
        if self.maglev_inputs.get(&table) == Some(&sorted) {
            return Ok((table, size));
        }
        // Until it is written whole, the table matches no input.
        self.maglev_inputs.remove(&table);
        let ids: Vec<u32> = sorted
            .iter()
            .map(|b| self.backend_ids.get(b).copied().unwrap_or(0))
            .collect();
        let entries = crate::maglev::table(&sorted, size);
        let record = self
            .maglev_tables
            .entry(table)
            .or_insert_with(|| vec![MAGLEV_UNKNOWN; size as usize]);
        if record.len() != size as usize {
            // Last held by a table of another size: its entries line up no more.
            *record = vec![MAGLEV_UNKNOWN; size as usize];
        }
        let start = maglev_start(table, self.maglev_size);
        for (index, &pick) in entries.iter().enumerate() {
            let backend_id = ids[pick as usize];
            if record[index] == backend_id {
                continue;
            }
            if let Err(err) = self.maps.maglev.set(start + index as u32, backend_id, 0) {
                if is_new {
                    self.maglev_alloc.hold(table, units, false);
                }
                return Err(err).context("writing a Maglev table entry");
            }
            record[index] = backend_id;
            report.writes += 1;
        }
        self.maglev_inputs.insert(table, sorted);
        Ok((table, size))
    }

    /// Frees a table no service entry names any more. Its content record stays (it is what
    /// the map holds, so the next owner diffs against it), but not its input: backend ids may
    /// be reused by then, so the same backends must not be taken for the same entries.
    fn release_maglev(&mut self, table: u32, size: u32) {
        if table != 0 && table <= self.maglev_count {
            self.maglev_alloc
                .hold(table, units_of(size, self.maglev_size), false);
            self.maglev_inputs.remove(&table);
        }
    }

    fn remove_service(&mut self, id: u32, report: &mut SyncReport) -> anyhow::Result<()> {
        let Some(name) = self.services.get(&id).map(|s| s.0.clone()) else {
            return Ok(());
        };
        self.maps
            .services
            .set(id, ServiceValue::default(), 0)
            .with_context(|| format!("removing service {name}"))?;
        // Best effort: a missing name is already what we want.
        let _ = self.maps.service_names.remove(&id);
        report.deletes += 1;
        self.record_slots(id, &name, Vec::new());
        self.services.remove(&id);
        if let Some(value) = self.written.remove(&id) {
            if value.maglev_table != 0 {
                self.release_maglev(value.maglev_table, value.maglev_size);
            }
        }
        if let Some((base, len)) = self.slot_runs.remove(&id) {
            self.slot_alloc.release(base, len);
        }
        self.service_ids.remove(&name);
        self.service_alloc.release(id);
        Ok(())
    }
}

/// New slot order for a service: backends that stay keep their slot, new ones fill the holes
/// left by removed ones, and the tail moves into any hole left over. A change of one endpoint
/// thus rewrites one or two slots, whatever the size of the service.
fn arrange_slots(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let old_set: BTreeSet<u32> = old.iter().copied().collect();
    let mut additions = wanted.iter().copied().filter(|id| !old_set.contains(id));
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|id| wanted_set.contains(id).then_some(*id))
        .collect();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match additions.next() {
            Some(id) => *slot = Some(id),
            None => break,
        }
    }
    slots.extend(additions.map(Some));
    // Close remaining holes by moving the last entries into them.
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            match slots.pop() {
                Some(Some(last)) if i < slots.len() => slots[i] = Some(last),
                Some(_) => continue,
                None => break,
            }
        }
        i += 1;
    }
    slots.into_iter().flatten().collect()
}

/// One service as read back from the maps, for the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub id: u32,
    pub name: String,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<BackendView>,
    /// Client prefixes allowed on the LoadBalancer frontends (empty: no restriction).
    pub source_ranges: Vec<String>,
    pub stats: StatsView,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsView {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// `active`, or `terminating` (used only because no ready endpoint is left).
    pub state: &'static str,
    /// The endpoint runs on another node.
    pub remote: bool,
    /// Maglev services: how many entries of the lookup table name this backend (its share
    /// of new flows, out of the table size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_entries: Option<u32>,
}

/// Reads services, frontends and backends back from the pinned maps.
pub fn read_services(pin_dir: &Path) -> anyhow::Result<Vec<ServiceView>> {
    let maps = Maps::open(pin_dir)?;
    let (maglev_size, maglev_count) = maps.maglev_layout();
    let mut views: BTreeMap<u32, ServiceView> = BTreeMap::new();
    for (id, value) in maps.present_services()? {
        let table = value.maglev_table;
        let units = units_of(value.maglev_size, maglev_size);
        let fits = table != 0 && table.saturating_add(units - 1) <= maglev_count;
        let maglev: Option<FastMap<u32, u32>> = (value.flags & SERVICE_MAGLEV != 0 && fits)
            .then(|| maps.read_maglev_table(table, maglev_size, value.maglev_size))
            .transpose()?
            .map(|entries| {
                let mut counts = FastMap::new();
                for backend_id in entries {
                    *counts.entry(backend_id).or_default() += 1;
                }
                counts
            });
        let mut backends = Vec::new();
        for slot in 0..value.backend_count {
            let backend_id = maps
                .slots
                .get(&value.slot_base.wrapping_add(slot), 0)
                .ok()
                .filter(|entry| entry.service_id == id)
                .map(|entry| entry.backend_id)
                .with_context(|| format!("service {id}: slot {slot} is missing"))?;
            let backend = maps
                .backends
                .get(&backend_id, 0)
                .ok()
                .filter(|b| b.proto != 0)
                .with_context(|| format!("service {id}: backend {backend_id} is missing"))?;
            let protocol = Protocol::from_number(backend.proto).ok_or_else(|| {
                anyhow!("backend {backend_id}: unknown protocol {}", backend.proto)
            })?;
            backends.push(BackendView {
                id: backend_id,
                addr: Ipv4Addr::from(backend.addr),
                port: backend.port,
                protocol,
                state: if backend.flags & BACKEND_TERMINATING != 0 {
                    "terminating"
                } else {
                    "active"
                },
                remote: backend.flags & BACKEND_REMOTE != 0,
                maglev_entries: maglev
                    .as_ref()
                    .map(|c| c.get(&backend_id).copied().unwrap_or(0)),
            });
        }
        let stats = match maps.service_stats.get(&id, 0) {
            Ok(values) => {
                let s = sum_stats(&values);
                StatsView {
                    packets: s.packets,
                    bytes: s.bytes,
                    reply_packets: s.reply_packets,
                    reply_bytes: s.reply_bytes,
                }
            }
            Err(_) => StatsView::default(),
        };
        views.insert(
            id,
            ServiceView {
                id,
                name: maps
                    .service_names
                    .get(&id, 0)
                    .map(|n| decode_name(&n))
                    .unwrap_or_else(|_| format!("#{id}")),
                frontends: Vec::new(),
                backends,
                source_ranges: Vec::new(),
                stats,
            },
        );
    }
    let mut ranges: BTreeMap<FrontendKey, Vec<String>> = BTreeMap::new();
    for key in maps.source_ranges.keys() {
        let key = key.context("reading LB_SOURCE_RANGES")?;
        let data = key.data();
        ranges.entry(data.frontend).or_default().push(format!(
            "{}/{}",
            Ipv4Addr::from(data.client),
            key.prefix_len().saturating_sub(SOURCE_RANGE_FRONTEND_BITS)
        ));
    }
    for entry in maps.frontends.iter() {
        let (key, value) = entry.context("reading LB_FRONTENDS")?;
        let Some(protocol) = Protocol::from_number(key.proto) else {
            continue;
        };
        let kind = FrontendKind::from_number(value.kind).unwrap_or(FrontendKind::ClusterIP);
        if let Some(view) = views.get_mut(&value.service_id) {
            view.frontends.push(Frontend {
                addr: Ipv4Addr::from(key.addr),
                port: key.port,
                protocol,
                kind,
            });
            for range in ranges.get(&key).into_iter().flatten() {
                if !view.source_ranges.contains(range) {
                    view.source_ranges.push(range.clone());
                }
            }
        }
    }
    let mut views: Vec<ServiceView> = views.into_values().collect();
    for view in &mut views {
        view.frontends.sort_by_key(|f| (f.kind, f.addr, f.port));
        view.source_ranges.sort();
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

/// How full one map is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

impl MapFill {
    pub fn ratio(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / self.capacity as f64
        }
    }
}

/// Entries and capacity of every map that fills up (the arrays indexed by counter or service
/// id are always "full" and left out). Counting walks the keys: a full conntrack table takes
/// a few hundred thousand syscalls.
pub fn fill_levels(pin_dir: &Path) -> anyhow::Result<Vec<MapFill>> {
    fn capacity(pin_dir: &Path, name: &str) -> anyhow::Result<u64> {
        let info = aya::maps::MapInfo::from_pin(pin_dir.join(name))
            .with_context(|| format!("reading the info of map {name}"))?;
        Ok(u64::from(info.max_entries()))
    }
    fn hash<K: aya::Pod, V: aya::Pod>(
        pin_dir: &Path,
        name: &'static str,
    ) -> anyhow::Result<MapFill> {
        let map: HashMap<MapData, K, V> = open_hash(pin_dir, name)?;
        // A key deleted between two steps of the walk ends it early; that only undercounts.
        let entries = map.keys().take_while(Result::is_ok).count() as u64;
        Ok(MapFill {
            map: name,
            entries,
            capacity: capacity(pin_dir, name)?,
        })
    }
    let backends: BackendMap = Array::try_from(open_map(pin_dir, map_names::BACKENDS)?)
        .context("map LB_BACKENDS does not have the layout this agent expects")?;
    let source_ranges: SourceRangeMap =
        LpmTrie::try_from(open_map(pin_dir, map_names::SOURCE_RANGES)?)
            .context("map LB_SOURCE_RANGES does not have the layout this agent expects")?;
    Ok(vec![
        hash::<FrontendKey, FrontendValue>(pin_dir, map_names::FRONTENDS)?,
        MapFill {
            map: map_names::SERVICES,
            // An array: its services are the named ones.
            entries: hash::<u32, lb_common::ServiceName>(pin_dir, map_names::SERVICE_NAMES)?
                .entries,
            capacity: capacity(pin_dir, map_names::SERVICES)?,
        },
        MapFill {
            map: map_names::SLOTS,
            // An array: its used entries are the services' slots.
            entries: slots_in_use(pin_dir)?,
            capacity: capacity(pin_dir, map_names::SLOTS)?,
        },
        MapFill {
            map: map_names::BACKENDS,
            entries: read_backends(&backends)?.len() as u64,
            // Id 0 is never handed out.
            capacity: u64::from(backends.len().saturating_sub(1)),
        },
        MapFill {
            map: map_names::SOURCE_RANGES,
            entries: source_ranges.keys().take_while(Result::is_ok).count() as u64,
            capacity: capacity(pin_dir, map_names::SOURCE_RANGES)?,
        },
        hash::<CtKey, CtValue>(pin_dir, map_names::CONNTRACK)?,
        hash::<lb_common::AffinityKey, lb_common::AffinityValue>(pin_dir, map_names::AFFINITY)?,
        // Near full, the least recently used notes go (their sockets' getpeername then shows
        // the backend).
        hash::<u64, lb_common::SockRevNat>(pin_dir, map_names::SOCK_REVNAT)?,
        {
            // Bits, not words: how much of the filter says "look it up".
            let filter: Array<MapData, u64> =
                Array::try_from(open_map(pin_dir, map_names::ADDR_FILTER)?)
                    .context("map LB_ADDR_FILTER does not have the layout this agent expects")?;
            let words = crate::batch::read_array(&filter, lb_common::addr_filter::WORDS as usize)
                .map_err(|err| anyhow!("reading LB_ADDR_FILTER: {err}"))?;
            MapFill {
                map: map_names::ADDR_FILTER,
                entries: words.iter().map(|w| u64::from(w.count_ones())).sum(),
                capacity: u64::from(filter.len()) * 64,
            }
        },
    ])
}

/// How many entries of `LB_SLOTS` the services use (their counts; the room a service holds to
/// grow is not counted).
fn slots_in_use(pin_dir: &Path) -> anyhow::Result<u64> {
    let maps = Maps::open(pin_dir)?;
    Ok(maps
        .present_services()?
        .iter()
        .map(|(_, value)| u64::from(value.backend_count))
        .sum())
}

/// Now on the clock the datapath stamps conntrack entries with (`bpf_ktime_get_coarse_ns`,
/// CLOCK_MONOTONIC_COARSE).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; the clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One tracked connection (its forward and reply entries together), for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowView {
    pub service_id: u32,
    pub protocol: String,
    /// Who opened the connection.
    pub client: String,
    /// The Service address it asked for.
    pub frontend: String,
    /// The endpoint it was sent to.
    pub backend: String,
    /// The source address the backend sees instead of the client's (hairpin, or external
    /// traffic to another node's endpoint), if any.
    pub source_nat: Option<String>,
    /// TCP: `connecting`, `established` or `closing`; UDP: `open`.
    pub state: &'static str,
    pub age_seconds: u64,
    pub idle_seconds: u64,
    /// The connection is forgotten when both of its entries have expired.
    pub expires_in_seconds: u64,
    pub backend_id: u32,
}

fn connection_state(protocol: u8, forward: u8, reply: u8) -> &'static str {
    use lb_common::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
    if protocol != Protocol::Tcp.number() {
        "open"
    } else if (forward | reply) & (TCP_FIN | TCP_RST) != 0 {
        "closing"
    } else if reply & TCP_SYN != 0 && forward & TCP_ACK != 0 {
        "established"
    } else {
        "connecting"
    }
}

/// Reads the live connections: those with at least one unexpired entry.
pub fn read_conntrack(pin_dir: &Path) -> anyhow::Result<Vec<FlowView>> {
    let map = open_conntrack(pin_dir)?;
    let now = monotonic_ns();
    // Entries evicted between listing and reading are skipped.
    let entries: FastMap<CtKey, CtValue> = map.iter().filter_map(Result::ok).collect();
    let address = |addr: [u8; 4], port: u16| format!("{}:{port}", Ipv4Addr::from(addr));
    let mut flows = Vec::new();
    for (key, forward) in &entries {
        if forward.direction != lb_common::CT_FORWARD {
            continue;
        }
        let reply = entries.get(&lb_common::ct_other_half(key, forward));
        let expires = reply.map_or(forward.expires_ns, |r| r.expires_ns.max(forward.expires_ns));
        if expires < now {
            continue;
        }
        let last_seen = reply.map_or(forward.last_seen_ns, |r| {
            r.last_seen_ns.max(forward.last_seen_ns)
        });
        flows.push(FlowView {
            service_id: forward.service_id,
            protocol: Protocol::from_number(key.proto)
                .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            client: address(key.src_addr, key.src_port),
            frontend: address(key.dst_addr, key.dst_port),
            backend: address(forward.nat_addr, forward.nat_port),
            source_nat: (forward.snat_addr != [0; 4]).then(|| {
                let port = if forward.snat_port != 0 {
                    forward.snat_port
                } else {
                    key.src_port
                };
                address(forward.snat_addr, port)
            }),
            state: connection_state(
                key.proto,
                forward.tcp_flags,
                reply.map_or(0, |r| r.tcp_flags),
            ),
            age_seconds: now.saturating_sub(forward.created_ns) / 1_000_000_000,
            idle_seconds: now.saturating_sub(last_seen) / 1_000_000_000,
            expires_in_seconds: expires.saturating_sub(now) / 1_000_000_000,
            backend_id: forward.backend_id,
        });
    }
    flows.sort_by(|a, b| (a.service_id, &a.client).cmp(&(b.service_id, &b.client)));
    Ok(flows)
}

/// Deletes expired conntrack entries, at most `budget` per call. An entry goes only when the
/// other direction of its connection has expired too (as the datapath judges), and only if it
/// is still the entry that was seen (a new flow may have reused the 5-tuple meanwhile).
/// Returns (examined, deleted).
pub fn collect_conntrack_garbage(map: &mut ConntrackMap, budget: usize) -> (usize, usize) {
    collect_garbage(map, budget, true)
}

/// [`collect_conntrack_garbage`] as it runs on kernels without batch operations (key by key
/// reads and deletes), for the tests to hold both paths to the same result.
#[doc(hidden)]
pub fn collect_conntrack_garbage_key_by_key(
    map: &mut ConntrackMap,
    budget: usize,
) -> (usize, usize) {
    collect_garbage(map, budget, false)
}

fn collect_garbage(map: &mut ConntrackMap, budget: usize, batched: bool) -> (usize, usize) {
    let now = monotonic_ns();
    let mut deleted = 0;
    if batched {
        // Expired entries are deleted as the walk reaches them: the walk's position is past
        // them, and memory stays at one chunk whatever the size of the table.
        let walk = crate::batch::for_each(&*map, GC_CHUNK, |key: CtKey, value: CtValue| {
            if value.expires_ns < now && delete_if_expired(map, &key, &value, now) {
                deleted += 1;
                if deleted >= budget {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        match walk {
            Ok(examined) => return (examined, deleted),
            Err(err) => debug!(%err, "batched conntrack read unavailable, walking key by key"),
        }
    }
    // Key by key (kernels without batch reads): collect first, since deleting the key the
    // walk stands on would send it back to the start; at most FALLBACK_CANDIDATES a pass, so
    // memory stays bounded.
    let mut candidates = Vec::new();
    let mut examined = 0;
    for (key, value) in map.iter().flatten() {
        examined += 1;
        if value.expires_ns < now {
            candidates.push((key, value));
            if deleted + candidates.len() >= budget || candidates.len() >= FALLBACK_CANDIDATES {
                break;
            }
        }
    }
    for (key, value) in candidates {
        if delete_if_expired(map, &key, &value, now) {
            deleted += 1;
        }
    }
    (examined, deleted)
}

/// Deletes an expired entry if it still is: one whose other half lives on (the connection goes
/// on in the other direction) or that the datapath rewrote since it was read (refreshed, or a
/// new connection on the same ports) stays. The entry is checked right before the delete, so
/// the datapath could only rewrite it in between within one system call's time (the kernel has
/// no delete-if-unchanged).
fn delete_if_expired(map: &ConntrackMap, key: &CtKey, seen: &CtValue, now: u64) -> bool {
    let other = lb_common::ct_other_half(key, seen);
    if map.get(&other, 0).is_ok_and(|o| o.expires_ns >= now) {
        return false;
    }
    map.get(key, 0)
        .is_ok_and(|v| v.created_ns == seen.created_ns && v.expires_ns < now)
        && crate::batch::delete_one(map, key)
}

/// How long until the next garbage collection pass: a quarter of `interval` (at least 1 s)
/// after a pass that freed more than an eighth of the table (connections open fast enough to
/// fill it before the next regular pass), otherwise `interval`.
pub fn next_gc_pass(deleted: usize, capacity: u32, interval: Duration) -> Duration {
    if deleted as u64 * 8 > u64::from(capacity) {
        (interval / 4).max(Duration::from_secs(1)).min(interval)
    } else {
        interval
    }
}

/// Conntrack entries read per system call by the garbage collector.
const GC_CHUNK: usize = 4096;
/// Expired entries one key-by-key pass collects at most (the walk cannot delete as it goes).
const FALLBACK_CANDIDATES: usize = 65_536;

/// The garbage collector's walk as it was before batched reads (two system calls per entry),
/// kept for `lb-bench` to measure the batched one against.
pub fn count_expired_key_by_key(map: &ConntrackMap) -> (usize, usize) {
    let now = monotonic_ns();
    let (mut examined, mut expired) = (0, 0);
    for (_, value) in map.iter().flatten() {
        examined += 1;
        expired += usize::from(value.expires_ns < now);
    }
    (examined, expired)
}

/// The batched walk alone (what [`collect_conntrack_garbage`] reads), for `lb-bench`.
pub fn count_expired_batched(map: &ConntrackMap) -> anyhow::Result<(usize, usize)> {
    let now = monotonic_ns();
    let mut expired = 0;
    let examined = crate::batch::for_each(map, GC_CHUNK, |_: CtKey, value: CtValue| {
        expired += usize::from(value.expires_ns < now);
        ControlFlow::Continue(())
    })
    .context("batched conntrack read")?;
    Ok((examined, expired))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_collection_comes_sooner_after_a_big_pass() {
        let ten = Duration::from_secs(10);
        assert_eq!(next_gc_pass(0, 262_144, ten), ten);
        assert_eq!(
            next_gc_pass(32_768, 262_144, ten),
            ten,
            "an eighth is not more"
        );
        assert_eq!(
            next_gc_pass(32_769, 262_144, ten),
            Duration::from_millis(2500)
        );
        // Never under a second, never over the interval itself.
        assert_eq!(
            next_gc_pass(200_000, 262_144, Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            next_gc_pass(200_000, 262_144, Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn slots_keep_their_place_and_fill_holes() {
        assert_eq!(arrange_slots(&[], &[1, 2, 3]), vec![1, 2, 3]);
        // Remove 2: the tail (3) moves into its hole; 1 stays.
        assert_eq!(arrange_slots(&[1, 2, 3], &[1, 3]), vec![1, 3]);
        // Replace 2 by 4: 4 takes slot 1, nothing else moves.
        assert_eq!(arrange_slots(&[1, 2, 3], &[1, 3, 4]), vec![1, 4, 3]);
        // Add at the end.
        assert_eq!(arrange_slots(&[1, 2], &[1, 2, 5]), vec![1, 2, 5]);
        // Remove everything but the last.
        assert_eq!(arrange_slots(&[1, 2, 3, 4], &[4]), vec![4]);
        assert_eq!(arrange_slots(&[1, 2, 3], &[]), Vec::<u32>::new());
    }

    #[test]
    fn slot_runs_are_handed_out_best_fit_and_coalesce_once_freed() {
        let mut runs = SlotRuns::new(100);
        assert_eq!(runs.allocate(10), Some(0));
        assert_eq!(runs.allocate(20), Some(10));
        assert_eq!(runs.allocate(5), Some(30));
        // A released run is not handed out before it settles.
        runs.release(10, 20);
        assert_eq!(runs.allocate(20), Some(35));
        // What the applier does once the run is cleared.
        assert_eq!(std::mem::take(&mut runs.released), vec![(10, 20)]);
        runs.free(10, 20);
        // Best fit: the 20-entry hole, not the tail.
        assert_eq!(runs.allocate(15), Some(10));
        // Growth in place needs the entries right after the run free.
        assert!(!runs.extend(0, 10, 12));
        assert!(runs.extend(10, 15, 20));
        assert!(!runs.extend(10, 20, 21));
        // Freed neighbours merge back into one run.
        for (start, len) in [(0, 10), (10, 20), (30, 5), (35, 20)] {
            runs.free(start, len);
        }
        assert_eq!(runs.by_start, BTreeMap::from([(0, 100)]));
        assert_eq!(runs.allocate(101), None);
        assert_eq!(runs.allocate(100), Some(0));
    }

    #[test]
    fn adopted_runs_must_be_free_and_inside_the_map() {
        let mut runs = SlotRuns::new(64);
        assert!(runs.hold(10, 6));
        assert!(!runs.hold(12, 2), "overlaps");
        assert!(!runs.hold(60, 8), "leaves the map");
        assert!(!runs.hold(u32::MAX, 2), "leaves the map");
        assert!(runs.hold(16, 48));
        assert_eq!(runs.allocate(11), None);
        assert_eq!(runs.allocate(10), Some(0));
    }

    #[test]
    fn slot_changes_are_proportional_to_the_change() {
        let old: Vec<u32> = (1..=1000).collect();
        let mut wanted = old.clone();
        wanted.retain(|&id| id != 500);
        let new = arrange_slots(&old, &wanted);
        let changed = new.iter().zip(&old).filter(|(a, b)| a != b).count();
        assert_eq!(new.len(), 999);
        assert_eq!(changed, 1, "only the hole is rewritten");
        assert_eq!(
            new.iter().copied().collect::<BTreeSet<_>>(),
            wanted.into_iter().collect()
        );
    }

    #[test]
    fn ids_are_reused_lowest_first_and_stay_below_the_limit() {
        let mut ids = IdAllocator::from_used([1, 2, 5].into_iter());
        assert_eq!(ids.allocate(100), Some(3));
        assert_eq!(ids.allocate(100), Some(4));
        assert_eq!(ids.allocate(100), Some(6));
        ids.release(2);
        assert_eq!(ids.allocate(100), Some(2));
        assert_eq!(ids.allocate(7), None, "ids index arrays of the map's size");
        let mut empty = IdAllocator::from_used(std::iter::empty());
        assert_eq!(empty.allocate(2), Some(1));
        assert_eq!(empty.allocate(2), None);
    }

    #[test]
    fn connection_states_follow_both_directions() {
        use lb_common::{TCP_ACK, TCP_FIN, TCP_SYN};
        let tcp = Protocol::Tcp.number();
        assert_eq!(connection_state(tcp, TCP_SYN, 0), "connecting");
        assert_eq!(
            connection_state(tcp, TCP_SYN, TCP_SYN | TCP_ACK),
            "connecting"
        );
        assert_eq!(
            connection_state(tcp, TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK),
            "established"
        );
        assert_eq!(
            connection_state(tcp, TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK | TCP_FIN),
            "closing"
        );
        assert_eq!(connection_state(Protocol::Udp.number(), 0, 0), "open");
    }

    #[test]
    fn names_round_trip_and_truncate_safely() {
        assert_eq!(
            decode_name(&encode_name("ns/web:http/TCP")),
            "ns/web:http/TCP"
        );
        let long = "x".repeat(SERVICE_NAME_LEN + 10);
        assert_eq!(decode_name(&encode_name(&long)).len(), SERVICE_NAME_LEN);
    }
}
