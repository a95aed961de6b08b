//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table a Maglev service's
//! new flows are placed with (`LB_MAGLEV[table][flow_hash % M]`).
//!
//! Each backend walks its own permutation of the table (`offset + j * skip mod M`, M prime so
//! every skip visits every entry) and the backends take turns claiming their next free entry.
//! The result depends only on the backend set and M, so every node computes the same table,
//! and removing one of N backends mostly hands its own entries to the others.

use crate::model::Backend;

/// Is `n` prime? (Table sizes are checked once at start; trial division is plenty.)
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Table entries per backend a service's table is grown to keep: Maglev's disruption grows
/// with N/M (worst of four removals, M = 16381: 0.6% at 20 backends, 1.2–1.6% at 50–100), and
/// 600 entries per backend keeps removing or adding one backend under 1% of the other
/// backends' flows (tested below up to 218 backends).
pub const ENTRIES_PER_BACKEND: u64 = 600;

/// The most units (`--maglev-table-size` entries each, consecutive in `LB_MAGLEV`) one
/// service's table may span: 8 x 16381 holds 218 backends at `ENTRIES_PER_BACKEND`.
pub const MAX_UNITS: u32 = 8;

/// The table of a service with `backends` backends: (units it spans, entries M'). The
/// configured size `unit` while it holds `ENTRIES_PER_BACKEND` per backend, else 2, 4 or 8
/// units, using the largest prime that fits them.
pub fn table_size(unit: u32, backends: usize) -> (u32, u32) {
    let mut units = 1u32;
    let mut size = unit;
    while u64::from(size) < ENTRIES_PER_BACKEND * backends as u64 && units < MAX_UNITS {
        units *= 2;
        let Some(room) = units.checked_mul(unit) else {
            break;
        };
        // Primes are dense (about one in ln(M) numbers): a short walk down.
        size = (unit..=room).rev().find(|&n| is_prime(n)).unwrap_or(unit);
    }
    if size == unit {
        units = 1;
    }
    (units, size)
}

/// FNV-1a then a splitmix64 finaliser: deterministic on every node and across restarts (no
/// per-process random keys, unlike std's `RandomState`).
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The stable identity of a backend: address, port, protocol.
fn identity(backend: &Backend) -> [u8; 7] {
    let a = backend.addr.octets();
    let p = backend.port.to_be_bytes();
    [
        a[0],
        a[1],
        a[2],
        a[3],
        p[0],
        p[1],
        backend.protocol.number(),
    ]
}

/// The lookup table of `backends` for a table of `size` entries (prime): each entry is an
/// index into `backends`. Empty when there is no backend. Independent of the order given
/// (the backends are sorted first), so callers may pass any order.
pub fn table(backends: &[Backend], size: u32) -> Vec<u32> {
    // Turns are taken in backend order, so that order must not depend on the caller's.
    let mut order: Vec<u32> = (0..backends.len() as u32).collect();
    order.sort_by_key(|&i| backends[i as usize]);
    order.dedup_by_key(|i| backends[*i as usize]);
    let m = u64::from(size);
    if order.is_empty() || m == 0 {
        return Vec::new();
    }
    // (current position, skip) of each backend's permutation.
    let mut walk: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let id = identity(&backends[i as usize]);
            let offset = hash(&id, 0) % m;
            let skip = if m > 1 {
                hash(&id, 0x5bd1_e995) % (m - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();
    const FREE: u32 = u32::MAX;
    let mut entries = vec![FREE; size as usize];
    let mut filled = 0u64;
    loop {
        for (i, (pos, skip)) in walk.iter_mut().enumerate() {
            while entries[*pos as usize] != FREE {
                *pos = (*pos + *skip) % m;
            }
            entries[*pos as usize] = order[i];
            *pos = (*pos + *skip) % m;
            filled += 1;
            if filled == m {
                return entries;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    const M: u32 = lb_common::MAGLEV_TABLE_SIZE;

    fn backends(n: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1),
                port: 8080,
                protocol: Protocol::Tcp,
            })
            .collect()
    }

    /// The table as backends, to compare tables over different backend lists.
    fn resolved(list: &[Backend]) -> Vec<Backend> {
        table(list, M).iter().map(|&i| list[i as usize]).collect()
    }

    #[test]
    fn table_sizes_are_prime() {
        assert!(is_prime(M));
        assert!(is_prime(65_537) && is_prime(251) && is_prime(2));
        assert!(!is_prime(16_384) && !is_prime(1) && !is_prime(0) && !is_prime(65_535));
    }

    #[test]
    fn every_entry_is_filled_and_balanced() {
        for n in [1, 2, 3, 10, 50, 100, 1000] {
            let list = backends(n);
            let t = table(&list, M);
            assert_eq!(t.len(), M as usize);
            let mut counts = vec![0u32; n as usize];
            for &i in &t {
                counts[i as usize] += 1;
            }
            // Turn taking: every backend gets floor(M/N) or one more.
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {min}..{max}");
        }
        assert!(table(&[], M).is_empty());
    }

    #[test]
    fn the_table_depends_only_on_the_backend_set() {
        let list = backends(37);
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(resolved(&list), resolved(&reversed));
        assert_eq!(table(&list, M), table(&list, M));
        // A fixed value: the hash must never change between versions or nodes.
        let first: Vec<u32> = table(&backends(3), 7);
        assert_eq!(first, table(&backends(3), 7));
        assert_eq!(first.len(), 7);
    }

    /// Entries that changed owner although their old owner is still there, in % of the table.
    fn disruption(before: &[Backend], after: &[Backend], size: u32) -> f64 {
        let resolve = |list: &[Backend]| -> Vec<Backend> {
            table(list, size)
                .iter()
                .map(|&i| list[i as usize])
                .collect()
        };
        let (old, new) = (resolve(before), resolve(after));
        let moved = old
            .iter()
            .zip(&new)
            // Moved between two backends present before and after (not to an added one,
            // not from a removed one).
            .filter(|(o, n)| o != n && after.contains(o) && before.contains(n))
            .count();
        moved as f64 * 100.0 / f64::from(size)
    }

    /// The worst disruption over removing each of a few backends, and adding one.
    fn measure(n: u32, size: u32) -> (f64, f64) {
        let list = backends(n);
        let mut remove = 0f64;
        for gone in [0, n / 3, n / 2, n - 1] {
            let mut fewer = list.clone();
            fewer.remove(gone as usize);
            remove = remove.max(disruption(&list, &fewer, size));
        }
        (remove, disruption(&list, &backends(n + 1), size))
    }

    /// Maglev is not minimal: when a backend leaves, the turns of the others shift a little,
    /// and the more backends share a table, the more entries change hands. At the size
    /// `table_size` picks (the worst of four removals, and one addition, at the largest N of
    /// each size; `cargo test -p lb-agent maglev -- --nocapture` prints them) fewer than 1%
    /// of the other backends' flows move.
    #[test]
    fn removing_or_adding_one_backend_moves_under_one_percent_of_other_flows() {
        for n in [2u32, 10, 27, 54, 100, 109, 218] {
            let (units, size) = table_size(M, n as usize);
            let (remove, add) = measure(n, size);
            eprintln!(
                "maglev M={size} ({units} units) N={n}: remove one -> {remove:.3}% of other \
                 flows moved; add one -> {add:.3}% moved between existing backends"
            );
            assert!(remove < 1.0, "M={size} N={n}: {remove:.3}% moved");
            assert!(add < 1.0, "M={size} N={n}: {add:.3}% moved");
        }
        // At the configured size alone, 100 backends move more: why tables grow.
        let (remove, _) = measure(100, M);
        assert!(remove > 1.0, "M={M} N=100: {remove:.3}%");
    }

    #[test]
    fn tables_grow_by_doubling_units_to_a_prime_that_fits() {
        assert_eq!(table_size(M, 0), (1, M));
        assert_eq!(table_size(M, 27), (1, M));
        assert_eq!(table_size(M, 28), (2, 32_749));
        assert_eq!(table_size(M, 100), (4, 65_521));
        let (units, size) = table_size(M, 200);
        assert_eq!(units, 8);
        assert!(is_prime(size) && size <= 8 * M && size > 7 * M, "{size}");
        // Capped: more backends than the largest table holds at 600 each.
        assert_eq!(table_size(M, 10_000).0, MAX_UNITS);
        // A configured size that already holds them stays.
        assert_eq!(table_size(65_521, 100), (1, 65_521));
        // A tiny configured size grows for one backend too.
        assert_eq!(table_size(7, 1), (8, 53));
    }
}
