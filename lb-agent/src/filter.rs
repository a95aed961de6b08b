//! The agent's side of `LB_ADDR_FILTER` (`lb_common::addr_filter`): the bits that let the
//! datapath pass a packet that is neither to a frontend nor from a backend without looking it
//! up.
//!
//! One rule keeps forwarding right: a key the datapath may need is never missing from the map.
//! - A frontend's or backend's bit is written before the frontend or backend itself (and the
//!   write is not attempted when the bit's write failed).
//! - Bits are never cleared one by one: a removed frontend may still have connections in
//!   conntrack, which keep flowing (as they do through kube-proxy's conntrack entries).
//! - Stale bits only cost lookups; once as many keys were added as are live (plus
//!   [`REBUILD_SLACK`]), the filter is rebuilt from the live frontends and backends and the
//!   keys of every conntrack entry. The applier does that between its own writes, so nothing
//!   it adds can be missed, and every word goes from its old value (which had every bit
//!   needed) to its new one (which has them too) in one write.

use std::{collections::BTreeSet, ops::ControlFlow, path::Path};

use anyhow::{anyhow, Context as _};
use aya::maps::{Array, Map, MapData};
use lb_common::{addr_filter, map_names, CtKey, CtValue, FrontendKey, CT_FORWARD};

use crate::maps::ConntrackMap;

/// Keys added beyond the live ones before a rebuild is worth a conntrack walk.
pub const REBUILD_SLACK: usize = 4_096;

pub type FilterMap = Array<MapData, u64>;

pub struct AddrFilter {
    map: FilterMap,
    /// What the map holds once `dirty` is written.
    words: Vec<u64>,
    /// Words changed here and not yet written (a failed write is retried by the next one).
    dirty: BTreeSet<u32>,
    /// Keys added since the last rebuild (or since the agent started).
    added: usize,
}

fn set(words: &mut [u64], bit: u32) -> Option<u32> {
    let index = bit / 64;
    let word = words.get_mut(index as usize)?;
    let mask = 1u64 << (bit % 64);
    (*word & mask == 0).then(|| {
        *word |= mask;
        index
    })
}

/// The bit of a frontend key.
pub fn frontend_bit(key: &FrontendKey) -> u32 {
    addr_filter::bit(key.addr, key.port, key.proto, addr_filter::FRONTEND)
}

/// The bit of a backend (where its replies come from).
pub fn backend_bit(addr: [u8; 4], port: u16, proto: u8) -> u32 {
    addr_filter::bit(addr, port, proto, addr_filter::BACKEND)
}

/// The bit a conntrack entry needs: the frontend of a forward half, the backend of a reply.
pub fn conntrack_bit(key: &CtKey, value: &CtValue) -> u32 {
    if value.direction == CT_FORWARD {
        addr_filter::bit(key.dst_addr, key.dst_port, key.proto, addr_filter::FRONTEND)
    } else {
        addr_filter::bit(key.src_addr, key.src_port, key.proto, addr_filter::BACKEND)
    }
}

impl AddrFilter {
    /// Opens the pinned filter and adopts what it holds (a restarted agent keeps every bit).
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(map_names::ADDR_FILTER);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = FilterMap::try_from(Map::from_map_data(data)?)
            .context("map LB_ADDR_FILTER does not have the layout this agent expects")?;
        anyhow::ensure!(
            map.len() == addr_filter::WORDS,
            "map LB_ADDR_FILTER has {} words, this agent expects {}",
            map.len(),
            addr_filter::WORDS
        );
        let words = crate::batch::read_array(&map, addr_filter::WORDS as usize)
            .map_err(|err| anyhow!("reading LB_ADDR_FILTER: {err}"))?;
        Ok(Self {
            map,
            words,
            dirty: BTreeSet::new(),
            added: 0,
        })
    }

    /// Sets `bits` here; [`AddrFilter::flush`] writes them.
    pub fn add(&mut self, bits: impl IntoIterator<Item = u32>) {
        for bit in bits {
            if let Some(index) = set(&mut self.words, bit) {
                self.dirty.insert(index);
            }
            self.added += 1;
        }
    }

    /// Writes every word changed since the last write. Until it succeeds, nothing that needs
    /// those bits may be written.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let keys: Vec<u32> = self.dirty.iter().copied().collect();
        let values: Vec<u64> = keys.iter().map(|&i| self.words[i as usize]).collect();
        let (batched, _) = crate::batch::update_array(&self.map, &keys, &values);
        for (i, (&key, &value)) in keys.iter().zip(&values).enumerate() {
            if i >= batched {
                self.map
                    .set(key, value, 0)
                    .with_context(|| format!("writing LB_ADDR_FILTER word {key}"))?;
            }
            self.dirty.remove(&key);
        }
        Ok(())
    }

    /// Whether stale bits are many enough (against `live` keys) for a rebuild.
    pub fn wants_rebuild(&self, live: usize) -> bool {
        self.added > live.saturating_add(REBUILD_SLACK)
    }

    /// Replaces the filter with `live` bits and those of every entry in `conntrack`. The
    /// caller writes nothing else meanwhile. On a failed conntrack read the filter stays as
    /// it is (a superset of what is needed).
    pub fn rebuild(
        &mut self,
        live: impl IntoIterator<Item = u32>,
        conntrack: &ConntrackMap,
    ) -> anyhow::Result<RebuildReport> {
        let mut words = vec![0u64; addr_filter::WORDS as usize];
        let mut keys = 0;
        for bit in live {
            set(&mut words, bit);
            keys += 1;
        }
        let mut flows = 0;
        crate::batch::for_each(conntrack, 4_096, |key: CtKey, value: CtValue| {
            set(&mut words, conntrack_bit(&key, &value));
            flows += 1;
            ControlFlow::Continue(())
        })
        .map_err(|err| anyhow!("reading LB_CONNTRACK for the address filter: {err}"))?;
        let before: u32 = self.words.iter().map(|w| w.count_ones()).sum();
        for (index, (old, new)) in self.words.iter_mut().zip(&words).enumerate() {
            if *old != *new {
                *old = *new;
                self.dirty.insert(index as u32);
            }
        }
        self.added = keys;
        self.flush()?;
        Ok(RebuildReport {
            keys,
            flows,
            bits_before: before,
            bits_after: self.words.iter().map(|w| w.count_ones()).sum(),
        })
    }

    /// Whether `bit` is set (in what the map holds once flushed).
    pub fn has(&self, bit: u32) -> bool {
        self.words
            .get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }
}

/// What a rebuild found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Live frontend and backend keys.
    pub keys: usize,
    /// Conntrack entries read.
    pub flows: usize,
    pub bits_before: u32,
    pub bits_after: u32,
}
