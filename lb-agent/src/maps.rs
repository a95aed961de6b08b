//! The pinned BPF maps: opening them, reading them back for operators, and the applier that
//! turns a [`DesiredState`] into map writes.
//!
//! The applier keeps a copy of what the maps hold (read once when it opens them, so a restarted
//! agent adopts the state it finds) and writes only the difference on every sync.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    map_names, BackendValue, Counter, CtKey, CtValue, FrontendKey, FrontendValue, ServiceValue,
    SlotKey, SERVICE_NAME_LEN,
};
use serde::Serialize;
use tracing::{debug, warn};

use crate::model::{Backend, DesiredState, Frontend, Protocol};

/// Where the agent pins its maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

pub type FrontendMap = HashMap<MapData, FrontendKey, FrontendValue>;
pub type ServiceMap = HashMap<MapData, u32, ServiceValue>;
pub type SlotMap = HashMap<MapData, SlotKey, u32>;
pub type BackendMap = HashMap<MapData, u32, BackendValue>;
pub type ConntrackMap = HashMap<MapData, CtKey, CtValue>;

/// The service maps, opened from their pins.
pub struct Maps {
    pub frontends: FrontendMap,
    pub services: ServiceMap,
    pub slots: SlotMap,
    pub backends: BackendMap,
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
            services: open_hash(pin_dir, map_names::SERVICES)?,
            slots: open_hash(pin_dir, map_names::SLOTS)?,
            backends: open_hash(pin_dir, map_names::BACKENDS)?,
        })
    }
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

fn encode_name(name: &str) -> [u8; SERVICE_NAME_LEN] {
    let mut out = [0u8; SERVICE_NAME_LEN];
    let bytes = name.as_bytes();
    let len = bytes.len().min(SERVICE_NAME_LEN);
    out[..len].copy_from_slice(&bytes[..len]);
    out
}

fn decode_name(name: &[u8; SERVICE_NAME_LEN]) -> String {
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

fn frontend_key(frontend: &Frontend) -> FrontendKey {
    FrontendKey {
        addr: frontend.addr.octets(),
        port: frontend.port,
        proto: frontend.protocol.number(),
        _pad: 0,
    }
}

fn backend_value(backend: &Backend) -> BackendValue {
    BackendValue {
        addr: backend.addr.octets(),
        port: backend.port,
        proto: backend.protocol.number(),
        flags: 0,
    }
}

fn backend_from_value(value: &BackendValue) -> Option<Backend> {
    Some(Backend {
        addr: Ipv4Addr::from(value.addr),
        port: value.port,
        protocol: Protocol::from_number(value.proto)?,
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

    fn allocate(&mut self) -> u32 {
        match self.free.pop_first() {
            Some(id) => id,
            None => {
                self.next += 1;
                self.next - 1
            }
        }
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
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

/// The applier: desired state in, minimal map writes out.
pub struct Applier {
    maps: Maps,
    backends: BTreeMap<u32, Backend>,
    backend_ids: StdHashMap<Backend, u32>,
    backend_alloc: IdAllocator,
    /// Service id -> (name, backend ids by slot).
    services: BTreeMap<u32, (String, Vec<u32>)>,
    service_ids: StdHashMap<String, u32>,
    service_alloc: IdAllocator,
    frontends: StdHashMap<FrontendKey, FrontendValue>,
}

impl Applier {
    /// Opens the pinned maps and adopts whatever they already hold.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let mut maps = Maps::open(pin_dir)?;
        let mut backends = BTreeMap::new();
        for entry in maps.backends.iter() {
            let (id, value) = entry.context("reading LB_BACKENDS")?;
            match backend_from_value(&value) {
                Some(backend) => {
                    backends.insert(id, backend);
                }
                None => warn!(id, "dropping backend entry with an unknown protocol"),
            }
        }
        let mut services = BTreeMap::new();
        let mut counts = StdHashMap::new();
        for entry in maps.services.iter() {
            let (id, value) = entry.context("reading LB_SERVICES")?;
            services.insert(id, (decode_name(&value.name), Vec::new()));
            counts.insert(id, value.backend_count);
        }
        let mut slots: Vec<(SlotKey, u32)> = Vec::new();
        for entry in maps.slots.iter() {
            slots.push(entry.context("reading LB_SLOTS")?);
        }
        slots.sort();
        let mut stale_slots = Vec::new();
        for (key, backend_id) in slots {
            let in_range = counts.get(&key.service_id).is_some_and(|&c| key.slot < c);
            match services.get_mut(&key.service_id) {
                Some((_, list)) if in_range && key.slot as usize == list.len() => {
                    list.push(backend_id)
                }
                _ => stale_slots.push(key),
            }
        }
        for key in &stale_slots {
            maps.slots.remove(key).context("removing a stale slot")?;
        }
        let mut frontends = StdHashMap::new();
        for entry in maps.frontends.iter() {
            let (key, value) = entry.context("reading LB_FRONTENDS")?;
            frontends.insert(key, value);
        }
        let backend_ids = backends.iter().map(|(&id, &b)| (b, id)).collect();
        let service_ids = services
            .iter()
            .map(|(&id, (name, _))| (name.clone(), id))
            .collect();
        Ok(Self {
            backend_alloc: IdAllocator::from_used(backends.keys().copied()),
            service_alloc: IdAllocator::from_used(services.keys().copied()),
            maps,
            backends,
            backend_ids,
            services,
            service_ids,
            frontends,
        })
    }

    /// Makes the maps hold `desired`, writing only what differs. A service whose entries cannot
    /// be written is reported in [`SyncReport::errors`]; the others are still programmed.
    pub fn sync(&mut self, desired: &DesiredState) -> anyhow::Result<SyncReport> {
        let mut report = SyncReport::default();

        // 1. Backends first, so that no slot ever points at a missing backend.
        let wanted_backends: BTreeSet<Backend> = desired
            .services
            .values()
            .flat_map(|s| s.backends.iter().copied())
            .collect();
        for backend in &wanted_backends {
            if self.backend_ids.contains_key(backend) {
                continue;
            }
            let id = self.backend_alloc.allocate();
            self.maps
                .backends
                .insert(id, backend_value(backend), 0)
                .with_context(|| format!("writing backend {}:{}", backend.addr, backend.port))?;
            self.backends.insert(id, *backend);
            self.backend_ids.insert(*backend, id);
            report.writes += 1;
        }

        // 2. Each service's slots and backend count.
        let mut wanted_frontends: StdHashMap<FrontendKey, (FrontendValue, &str)> =
            StdHashMap::new();
        for (name, service) in &desired.services {
            let ids: Vec<u32> = service
                .backends
                .iter()
                .filter_map(|b| self.backend_ids.get(b).copied())
                .collect();
            let service_id = match self.write_service(name, &ids, &mut report) {
                Ok(id) => id,
                Err(err) => {
                    report.errors.push(format!("service {name}: {err:#}"));
                    continue;
                }
            };
            for frontend in &service.frontends {
                let key = frontend_key(frontend);
                let value = FrontendValue {
                    service_id,
                    flags: 0,
                };
                if let Some((_, owner)) = wanted_frontends.get(&key) {
                    report.errors.push(format!(
                        "service {name}: frontend {}:{}/{} is already used by {owner}; kept there",
                        frontend.addr, frontend.port, frontend.protocol
                    ));
                    continue;
                }
                wanted_frontends.insert(key, (value, name));
            }
        }

        // 3. Frontends: add or repoint, then remove the ones no longer wanted.
        for (key, (value, name)) in &wanted_frontends {
            if self.frontends.get(key) == Some(value) {
                continue;
            }
            match self.maps.frontends.insert(key, value, 0) {
                Ok(()) => {
                    self.frontends.insert(*key, *value);
                    report.writes += 1;
                }
                Err(err) => report
                    .errors
                    .push(format!("service {name}: writing frontend: {err}")),
            }
        }
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
            self.frontends.remove(&key);
            report.deletes += 1;
        }

        // 4. Services nobody points at any more, then backends no slot uses.
        let stale: Vec<u32> = self
            .services
            .iter()
            .filter(|(_, (name, _))| !desired.services.contains_key(name))
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.remove_service(id, &mut report)?;
        }
        let used: BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        let stale: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for id in stale {
            self.maps
                .backends
                .remove(&id)
                .context("removing a backend")?;
            if let Some(backend) = self.backends.remove(&id) {
                self.backend_ids.remove(&backend);
            }
            self.backend_alloc.release(id);
            report.deletes += 1;
        }

        report.services = self.services.len();
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        Ok(report)
    }

    /// Writes one service's slots and count; returns its id.
    fn write_service(
        &mut self,
        name: &str,
        wanted: &[u32],
        report: &mut SyncReport,
    ) -> anyhow::Result<u32> {
        let (id, old) = match self.service_ids.get(name) {
            Some(&id) => (id, self.services[&id].1.clone()),
            None => (self.service_alloc.allocate(), Vec::new()),
        };
        let new = arrange_slots(&old, wanted);
        // Grow: fill the slots before raising the count. Shrink: lower the count before
        // dropping the slots. A concurrent reader only ever sees valid slots.
        for (slot, &backend_id) in new.iter().enumerate() {
            if old.get(slot) != Some(&backend_id) {
                let key = SlotKey {
                    service_id: id,
                    slot: slot as u32,
                };
                self.maps
                    .slots
                    .insert(key, backend_id, 0)
                    .context("writing a backend slot")?;
                report.writes += 1;
            }
        }
        let is_new = !self.service_ids.contains_key(name);
        if is_new || old.len() != new.len() {
            let value = ServiceValue {
                backend_count: new.len() as u32,
                flags: 0,
                name: encode_name(name),
            };
            self.maps
                .services
                .insert(id, value, 0)
                .context("writing the service entry")?;
            report.writes += 1;
        }
        for slot in new.len()..old.len() {
            let key = SlotKey {
                service_id: id,
                slot: slot as u32,
            };
            self.maps
                .slots
                .remove(&key)
                .context("removing a backend slot")?;
            report.deletes += 1;
        }
        if is_new {
            debug!(service = name, id, "new service");
            self.service_ids.insert(name.to_string(), id);
        }
        self.services.insert(id, (name.to_string(), new));
        Ok(id)
    }

    fn remove_service(&mut self, id: u32, report: &mut SyncReport) -> anyhow::Result<()> {
        let Some((name, slots)) = self.services.get(&id).cloned() else {
            return Ok(());
        };
        self.maps
            .services
            .remove(&id)
            .with_context(|| format!("removing service {name}"))?;
        report.deletes += 1;
        for slot in 0..slots.len() {
            let key = SlotKey {
                service_id: id,
                slot: slot as u32,
            };
            self.maps
                .slots
                .remove(&key)
                .with_context(|| format!("removing a slot of service {name}"))?;
            report.deletes += 1;
        }
        self.services.remove(&id);
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// Reads services, frontends and backends back from the pinned maps.
pub fn read_services(pin_dir: &Path) -> anyhow::Result<Vec<ServiceView>> {
    let maps = Maps::open(pin_dir)?;
    let mut views: BTreeMap<u32, ServiceView> = BTreeMap::new();
    for entry in maps.services.iter() {
        let (id, value) = entry.context("reading LB_SERVICES")?;
        let mut backends = Vec::new();
        for slot in 0..value.backend_count {
            let backend_id = maps
                .slots
                .get(
                    &SlotKey {
                        service_id: id,
                        slot,
                    },
                    0,
                )
                .with_context(|| format!("service {id}: slot {slot} is missing"))?;
            let backend = maps
                .backends
                .get(&backend_id, 0)
                .with_context(|| format!("service {id}: backend {backend_id} is missing"))?;
            let protocol = Protocol::from_number(backend.proto).ok_or_else(|| {
                anyhow!("backend {backend_id}: unknown protocol {}", backend.proto)
            })?;
            backends.push(BackendView {
                id: backend_id,
                addr: Ipv4Addr::from(backend.addr),
                port: backend.port,
                protocol,
            });
        }
        views.insert(
            id,
            ServiceView {
                id,
                name: decode_name(&value.name),
                frontends: Vec::new(),
                backends,
            },
        );
    }
    for entry in maps.frontends.iter() {
        let (key, value) = entry.context("reading LB_FRONTENDS")?;
        let Some(protocol) = Protocol::from_number(key.proto) else {
            continue;
        };
        if let Some(view) = views.get_mut(&value.service_id) {
            view.frontends.push(Frontend {
                addr: Ipv4Addr::from(key.addr),
                port: key.port,
                protocol,
            });
        }
    }
    let mut views: Vec<ServiceView> = views.into_values().collect();
    for view in &mut views {
        view.frontends.sort();
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

/// Paths of every pinned map under `pin_dir`.
pub fn pin_paths(pin_dir: &Path) -> Vec<PathBuf> {
    map_names::ALL.iter().map(|n| pin_dir.join(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn ids_are_reused_lowest_first() {
        let mut ids = IdAllocator::from_used([1, 2, 5].into_iter());
        assert_eq!(ids.allocate(), 3);
        assert_eq!(ids.allocate(), 4);
        assert_eq!(ids.allocate(), 6);
        ids.release(2);
        assert_eq!(ids.allocate(), 2);
        let mut empty = IdAllocator::from_used(std::iter::empty());
        assert_eq!(empty.allocate(), 1);
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
