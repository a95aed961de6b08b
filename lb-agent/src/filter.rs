//! The agent's side of `LB_ADDR_FILTER` (`lb_common::addr_filter`): the bits that let the
//! datapath pass a packet that is neither to a frontend nor from a backend without looking it
//! up.
//!
//! One rule keeps forwarding right: a key the datapath may need is never missing from the map.
//! - A frontend's or backend's bit is written before the frontend or backend itself (and the
//!   write is not attempted when the bit's write failed).
//! - Bits are never cleared one by one: a removed frontend may still have connections in
//!   conntrack, which keep flowing (as they do through kube-proxy's conntrack entries).
//! - Stale bits only cost lookups; once enough keys have been added beyond the live ones
//!   ([`AddrFilter::wants_rebuild`]), the filter is rebuilt from the live frontends and
//!   backends, every key removed within [`REMOVAL_GRACE`], and the keys of every conntrack
//!   entry. The applier does that before its own writes, so nothing it adds can be missed; a
//!   key removed just before still counts (a packet that read it before its removal may be
//!   inserting its conntrack entries while the walk runs) and goes at a later rebuild. Every
//!   word goes from its old value (which had every bit needed) to its new one (which has them
//!   too) in one write.

use std::{
    ops::ControlFlow,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use aya::maps::{Array, Map, MapData};
use lb_common::{addr_filter, map_names, CtKey, CtValue, FrontendKey, CT_FORWARD};
use tracing::debug;

use crate::maps::ConntrackMap;

/// Keys added beyond the live ones before a rebuild is worth a conntrack walk.
pub const REBUILD_SLACK: usize = 4_096;

/// How long a removed key keeps its bit through rebuilds: far longer than a packet takes from
/// its frontend lookup to its conntrack insert, even on a preemptible kernel.
pub const REMOVAL_GRACE: Duration = Duration::from_secs(1);

pub type FilterMap = Array<MapData, u64>;

pub struct AddrFilter {
    map: FilterMap,
    /// What the map holds once `dirty` is written.
    words: Vec<u64>,
    /// Words changed here and not yet written (a failed write is retried by the next one),
    /// listed once each: `is_dirty` says which are listed.
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
    /// Keys added since the last rebuild; on open, the live keys plus the bits the map holds
    /// beyond theirs (stale ones a reopened or restarted applier inherits).
    added: usize,
    /// Bits of keys removed lately, with when: a rebuild keeps those within `grace`.
    removed: Vec<(Instant, u32)>,
    grace: Duration,
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
    /// Opens the pinned filter, adopts what it holds (a restarted agent keeps every bit) and
    /// sets the bits of `live`, the keys the maps hold. A filter found empty while the maps
    /// are not (its pin was removed alone) is rebuilt at once, conntrack included.
    pub fn open(
        pin_dir: &Path,
        live: impl IntoIterator<Item = u32>,
        conntrack: &ConntrackMap,
    ) -> anyhow::Result<Self> {
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
        let empty = words.iter().all(|&w| w == 0);
        let mut filter = Self {
            map,
            words,
            dirty: Vec::new(),
            is_dirty: vec![false; addr_filter::WORDS as usize],
            added: 0,
            removed: Vec::new(),
            grace: REMOVAL_GRACE,
        };
        let live: Vec<u32> = live.into_iter().collect();
        if empty && !live.is_empty() {
            filter.rebuild(live, conntrack)?;
            return Ok(filter);
        }
        let mut live_words = vec![0u64; addr_filter::WORDS as usize];
        for &bit in &live {
            set(&mut live_words, bit);
        }
        let live_bits: u32 = live_words.iter().map(|w| w.count_ones()).sum();
        filter.add(live);
        filter.flush()?;
        let held: u32 = filter.words.iter().map(|w| w.count_ones()).sum();
        filter.added += held.saturating_sub(live_bits) as usize;
        Ok(filter)
    }

    /// Sets `bits` here; [`AddrFilter::flush`] writes them.
    pub fn add(&mut self, bits: impl IntoIterator<Item = u32>) {
        for bit in bits {
            if let Some(index) = set(&mut self.words, bit) {
                self.mark(index);
            }
            self.added += 1;
        }
    }

    fn mark(&mut self, index: u32) {
        if let Some(flag) = self.is_dirty.get_mut(index as usize) {
            if !*flag {
                *flag = true;
                self.dirty.push(index);
            }
        }
    }

    /// Writes every word changed since the last write. Until it succeeds, nothing that needs
    /// those bits may be written.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let keys = std::mem::take(&mut self.dirty);
        let values: Vec<u64> = keys.iter().map(|&i| self.words[i as usize]).collect();
        let (batched, _) = crate::batch::update_array(&self.map, &keys, &values);
        for (i, (&key, &value)) in keys.iter().zip(&values).enumerate() {
            if i >= batched {
                if let Err(err) = self.map.set(key, value, 0) {
                    // These stay to be written by the next flush.
                    self.dirty = keys[i..].to_vec();
                    return Err(err).with_context(|| format!("writing LB_ADDR_FILTER word {key}"));
                }
            }
            self.is_dirty[key as usize] = false;
        }
        Ok(())
    }

    /// Notes the bit of a key just removed from the maps (rebuilds keep it for a while).
    pub fn removed(&mut self, bit: u32) {
        self.removed.push((Instant::now(), bit));
    }

    /// How long removed keys keep their bits ([`REMOVAL_GRACE`] unless a test says).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Whether keys added beyond the `live` ones (the stale bits, at most) are many enough
    /// for a rebuild: [`REBUILD_SLACK`], or a quarter of the live keys if that is more (a
    /// rebuild walks the whole conntrack table).
    pub fn wants_rebuild(&self, live: usize) -> bool {
        self.added.saturating_sub(live) > REBUILD_SLACK.max(live / 4)
    }

    /// Replaces the filter with `live` bits and those of every entry in `conntrack`. The
    /// caller writes nothing else meanwhile. On a failed conntrack read or write the filter
    /// is still a superset of what is needed (each word old or new), and the next attempt
    /// waits for as many keys again.
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
        // Removed lately: a packet may have read the key just before it went.
        let now = Instant::now();
        self.removed
            .retain(|(when, _)| now.saturating_duration_since(*when) < self.grace);
        for &(_, bit) in &self.removed {
            set(&mut words, bit);
        }
        // Retried after as many keys again, even if this attempt fails.
        self.added = keys;
        let mut flows = 0;
        let batched = crate::batch::for_each(conntrack, 4_096, |key: CtKey, value: CtValue| {
            set(&mut words, conntrack_bit(&key, &value));
            flows += 1;
            ControlFlow::Continue(())
        });
        if let Err(err) = batched {
            // A kernel without batch reads: key by key, over whatever the batch set already.
            debug!(%err, "batched conntrack read failed; reading it key by key");
            flows = 0;
            for entry in conntrack.iter() {
                let (key, value) = entry.context("reading LB_CONNTRACK for the address filter")?;
                set(&mut words, conntrack_bit(&key, &value));
                flows += 1;
            }
        }
        let before: u32 = self.words.iter().map(|w| w.count_ones()).sum();
        let mut changed = Vec::new();
        for (index, (old, new)) in self.words.iter_mut().zip(&words).enumerate() {
            if *old != *new {
                *old = *new;
                changed.push(index as u32);
            }
        }
        for index in changed {
            self.mark(index);
        }
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
