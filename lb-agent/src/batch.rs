//! Batched map reads and array writes (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, Linux
//! 5.6+), which aya 0.14 does not expose, and a delete through a shared handle.
//!
//! Walking a hash map key by key costs two system calls per entry (next key, then lookup):
//! over a full 262,144-entry conntrack table that is half a million calls every GC pass. A
//! batch read returns thousands of entries per call.

use std::{
    io,
    ops::ControlFlow,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray},
    Pod,
};

/// `enum bpf_cmd` in `linux/bpf.h`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// The bpf(2) system call with `cmd` and its attribute.
///
/// # Safety
/// `attr` must be the member of `union bpf_attr` that `cmd` reads, and every pointer in it
/// must name live buffers of the sizes the kernel will read or write.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> libc::c_long {
    // SAFETY: as the caller promised.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<A>(),
        )
    }
}

/// The `batch` member of `union bpf_attr`: the kernel reads this prefix of the union and
/// writes `count` back.
#[repr(C, align(8))]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `f` with every entry of a hash map, read `chunk` entries per system call, until `f`
/// breaks; returns how many entries `f` saw. The map may change while it is read (the datapath
/// keeps writing): as with a key-by-key walk, entries added or removed meanwhile may or may
/// not be seen. Memory stays at one chunk, whatever the size of the map.
///
/// The map is a typed, non-per-CPU hash map: aya checked its key and value sizes against `K`
/// and `V` when it was opened, so the kernel writes exactly the buffers' sizes.
pub fn for_each<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    chunk: usize,
    f: impl FnMut(K, V) -> ControlFlow<()>,
) -> io::Result<usize> {
    walk(map.map().fd().as_fd().as_raw_fd(), chunk, f)
}

/// Every entry of an array, in index order, read `chunk` entries per system call.
///
/// The array is typed: aya checked its value size against `V` when it was opened.
pub fn read_array<V: Pod>(map: &Array<MapData, V>, chunk: usize) -> io::Result<Vec<V>> {
    let mut values = Vec::with_capacity(map.len() as usize);
    walk(
        map.map().fd().as_fd().as_raw_fd(),
        chunk,
        |_: u32, value: V| {
            values.push(value);
            ControlFlow::Continue(())
        },
    )?;
    Ok(values)
}

/// The batched walk behind [`for_each`] and [`read_array`]: `fd` is a map whose key and value
/// sizes are those of `K` and `V`.
fn walk<K: Pod, V: Pod>(
    fd: std::os::fd::RawFd,
    chunk: usize,
    mut f: impl FnMut(K, V) -> ControlFlow<()>,
) -> io::Result<usize> {
    let mut chunk = chunk.max(1);
    let mut seen = 0;
    // The position token is a u32 (a hash map's bucket, an array's index); room for a u64
    // costs nothing.
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        // SAFETY: `Pod` types are plain old data; any bit pattern, zeros included, is valid.
        let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token_in) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute names buffers of `count` keys and values of the map's own key
        // and value types (the callers' maps are typed by them), all alive across the call.
        let ret = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let err = (ret < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            // One bucket holds more entries than the buffer: a bigger buffer, same position.
            Some(libc::ENOSPC) if chunk < (1 << 20) => {
                chunk *= 2;
                continue;
            }
            Some(libc::ENOENT) | None => {}
            Some(_) => return Err(err.unwrap_or_else(|| io::Error::other("bpf"))),
        }
        let n = (attr.count as usize).min(chunk);
        for (key, value) in keys.into_iter().zip(values).take(n) {
            seen += 1;
            if f(key, value).is_break() {
                return Ok(seen);
            }
        }
        if err.is_some() {
            // ENOENT: the walk reached the end (with the last entries in this call).
            return Ok(seen);
        }
        token_in = token_out;
        first = false;
    }
}

/// Writes `values[i]` at index `keys[i]` of an array in one system call. Returns how many were
/// written, in order, and the error that stopped the rest (a kernel without batch operations
/// writes none); the caller writes what is left one by one.
///
/// The array is typed: aya checked its value size against `V` when it was opened.
pub fn update_array<V: Pod>(
    map: &Array<MapData, V>,
    keys: &[u32],
    values: &[V],
) -> (usize, Option<io::Error>) {
    update_typed(map.map(), keys, values)
}

/// [`update_array`] for a hash map: `values[i]` under `keys[i]` (inserted or replaced).
pub fn update_hash<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    update_typed(map.map(), keys, values)
}

/// [`update`] of typed keys and values; `map`'s key and value types are `K` and `V` (aya
/// checked their sizes when the callers' typed maps were opened).
fn update_typed<K: Pod, V: Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> (usize, Option<io::Error>) {
    let count = keys.len().min(values.len());
    // SAFETY: `count` keys and values of the map's own key and value types, alive across the
    // call.
    unsafe { update(map, keys.as_ptr().cast(), values.as_ptr().cast(), count) }
}

/// [`update_array`] for a per-CPU array, every CPU's value set to zeros (fresh counters).
pub fn zero_percpu_array<V: Pod>(
    map: &PerCpuArray<MapData, V>,
    keys: &[u32],
    cpus: usize,
) -> (usize, Option<io::Error>) {
    // The kernel's layout: each key's values, one per possible CPU, each padded to 8 bytes.
    let per_cpu = std::mem::size_of::<V>().div_ceil(8) * 8;
    // Chunks, so the buffer of zeros stays small whatever the number of keys and CPUs.
    const CHUNK: usize = 1024;
    let zeros = vec![0u64; CHUNK.min(keys.len()) * cpus * per_cpu / 8];
    let mut written = 0;
    for chunk in keys.chunks(CHUNK) {
        // SAFETY: `chunk.len()` keys and as many per-CPU values of the map's value type, in
        // the kernel's layout for `cpus` possible CPUs (aya's `nr_cpus`, the count it sizes
        // them by); `zeros` holds at least that many.
        let (n, err) = unsafe {
            update(
                map.map(),
                chunk.as_ptr().cast(),
                zeros.as_ptr().cast(),
                chunk.len(),
            )
        };
        written += n;
        if err.is_some() {
            return (written, err);
        }
    }
    (written, None)
}

/// `BPF_MAP_UPDATE_BATCH` of `count` entries.
///
/// # Safety
/// `keys` and `values` must point at `count` keys and values laid out as the map's key and
/// value sizes say, alive across the call; the kernel only reads them.
unsafe fn update(
    map: &MapData,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> (usize, Option<io::Error>) {
    if count == 0 {
        return (0, None);
    }
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: as the caller promised.
    let ret = unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) };
    if ret >= 0 {
        return (count, None);
    }
    let err = io::Error::last_os_error();
    // The kernel writes back how many it wrote when it stops midway; when it refuses the call
    // (no batch support, bad arguments) `count` is left as we set it, and nothing was written.
    let written = attr.count as usize;
    (if written < count { written } else { 0 }, Some(err))
}

/// The element member of `union bpf_attr` (`BPF_MAP_*_ELEM`).
#[repr(C, align(8))]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Deletes one key (`BPF_MAP_DELETE_ELEM`) through a shared handle (the walk of
/// [`for_each`] holds the map while its callback deletes). Whether it was there is all the
/// caller learns.
pub fn delete_one<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, key: &K) -> bool {
    let mut attr = ElemAttr {
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        ..ElemAttr::default()
    };
    // SAFETY: the attribute names one key of the map's own key type, alive across the call.
    let ret = unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) };
    ret == 0
}
