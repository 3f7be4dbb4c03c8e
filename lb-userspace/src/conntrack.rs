//! The agent's conntrack walk, once a second: it removes the entries that
//! expired (the LRU map would otherwise keep them until it is full, and
//! then evict the least recently used entry — an idle but live flow — before
//! a closed one), counts what is left, and collects the backend ids that
//! live entries name, so that a draining backend is deleted only once no
//! flow uses it.
//!
//! The walk reads the map in batches (`BPF_MAP_LOOKUP_BATCH`): a full table
//! of half a million entries costs tens of milliseconds, not a million
//! syscalls. Expired entries are deleted one by one, atomically (see
//! [`ConntrackTable::walk`]): a syscall per closed flow's entry.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::MapData;
use lb_common::{CtEntry, CtKey, SockRevEntry, SockRevKey, maps};

use crate::Error;

/// Entries read per syscall.
const BATCH: usize = 4096;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_NOEXIST: u64 = 1;

/// The batch part of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
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

/// The element part of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// What one walk found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walk {
    /// Live entries left in the table.
    pub entries: usize,
    /// Expired entries found.
    pub expired: usize,
    /// Of which this walk removed (the others went meanwhile).
    pub removed: usize,
    /// The backend ids that live entries name.
    pub backends: BTreeSet<u32>,
    /// The highest frontend id a live entry names.
    pub max_frontend_id: u32,
}

/// Tells LRU evictions from the entries every walk finds: the table holds
/// what the last walk left, plus what the datapath created since, minus what
/// it removed; whatever else is missing was evicted — a table too small for
/// its load (`--conntrack-max`). A walk is not atomic (flows come and go
/// while it reads), so one walk's balance may be off either way; the
/// balances are summed signed and only the sum's growth is reported, which
/// the errors cannot inflate (the counters are read before each walk, so an
/// entry a walk sees early is never missing from a later balance).
#[derive(Debug, Default)]
pub struct Evictions {
    /// Entries the last walk left, and the datapath's event totals read
    /// before it.
    last: Option<(u64, u64, u64)>,
    /// The signed sum of the balances, and how much of it was reported.
    sum: i64,
    reported: u64,
}

impl Evictions {
    /// The evictions to report after this `walk`, given the datapath's
    /// `created` and `removed` totals read just before it.
    pub fn update(&mut self, walk: &Walk, created: u64, removed: u64) -> u64 {
        let found = (walk.entries + walk.expired) as u64;
        if let Some((left, created_then, removed_then)) = self.last {
            let expected = left as i64 + created.wrapping_sub(created_then) as i64
                - removed.wrapping_sub(removed_then) as i64;
            self.sum += expected - found as i64;
        }
        self.last = Some((found - walk.removed as u64, created, removed));
        let total = self.sum.max(0) as u64;
        let new = total.saturating_sub(self.reported);
        self.reported = self.reported.max(total);
        new
    }
}

/// Reads every entry of a hash or array map in batches
/// (`BPF_MAP_LOOKUP_BATCH`).
pub(crate) fn read_batched<K: Default + Clone, V: Default + Clone>(
    map: &MapData,
    mut each: impl FnMut(&K, &V),
) -> std::io::Result<()> {
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The batch position is a bucket index (u32) for hash maps; room
    // for a u64 keeps it safe for other kinds.
    let (mut in_batch, mut out_batch) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const in_batch as u64 },
            out_batch: &raw mut out_batch as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = attr.count as usize;
        for (key, entry) in keys.iter().zip(&values).take(read) {
            each(key, entry);
        }
        match result {
            Ok(()) => {}
            // The end of the table (the last batch may hold entries).
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(err) => return Err(err),
        }
        in_batch = out_batch;
        first = false;
    }
}

/// Writes `entries` into a hash or array map in one call
/// (`BPF_MAP_UPDATE_BATCH`); on a failure, those before it are written.
pub(crate) fn update_batched<K: Copy, V: Copy>(
    map: &MapData,
    entries: &[(K, V)],
) -> std::io::Result<()> {
    update_batched_counted(map, entries).map_err(|(_, err)| err)
}

/// [`update_batched`], telling on a failure how many entries went in
/// before it (the kernel's count).
pub(crate) fn update_batched_counted<K: Copy, V: Copy>(
    map: &MapData,
    entries: &[(K, V)],
) -> Result<(), (usize, std::io::Error)> {
    if entries.is_empty() {
        return Ok(());
    }
    let keys: Vec<K> = entries.iter().map(|(key, _)| *key).collect();
    let values: Vec<V> = entries.iter().map(|(_, value)| *value).collect();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: entries.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map_err(|err| (attr.count as usize, err))
}

/// The socket path's pinned reverse map, counted at each walk.
pub struct SockRevTable {
    map: MapData,
    capacity: u32,
}

impl SockRevTable {
    /// Opens the socket reverse map pinned under `bpffs`.
    pub fn open(bpffs: &Path) -> Result<Self, Error> {
        let name = maps::SOCK_REV;
        let map = MapData::from_pin(bpffs.join(name)).map_err(Error::map(name))?;
        let capacity = map.info().map_err(Error::map(name))?.max_entries();
        Ok(Self { map, capacity })
    }

    /// The map's capacity: sockets balanced and open at once.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Its entries now.
    pub fn count(&self) -> Result<usize, Error> {
        let mut entries = 0;
        read_batched(&self.map, |_: &SockRevKey, _: &SockRevEntry| entries += 1)
            .map_err(|e| Error::MapWalk(maps::SOCK_REV, e))?;
        Ok(entries)
    }
}

/// The pinned conntrack map, for the walk.
pub struct ConntrackTable {
    map: MapData,
    capacity: u32,
}

impl ConntrackTable {
    /// Opens the conntrack map pinned under `bpffs`.
    pub fn open(bpffs: &Path) -> Result<Self, Error> {
        let name = maps::CONNTRACK;
        let map = MapData::from_pin(bpffs.join(name)).map_err(Error::map(name))?;
        let capacity = map.info().map_err(Error::map(name))?.max_entries();
        Ok(Self { map, capacity })
    }

    /// The table's capacity in entries (two per flow).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Walks the table at `now_ns` (`CLOCK_MONOTONIC_COARSE`).
    pub fn walk(&self, now_ns: u64) -> Result<Walk, Error> {
        let mut walk = Walk::default();
        let mut expired = Vec::new();
        self.read_all(|key, entry| {
            if entry.is_expired(key.proto, now_ns) {
                walk.expired += 1;
                expired.push(*key);
            } else {
                walk.entries += 1;
                walk.backends.insert(entry.backend_id);
                walk.max_frontend_id = walk.max_frontend_id.max(entry.frontend_id);
            }
        })?;
        walk.removed = self.delete_expired(&expired, now_ns)?;
        Ok(walk)
    }

    fn read_all(&self, each: impl FnMut(&CtKey, &CtEntry)) -> Result<(), Error> {
        read_batched(&self.map, each).map_err(|e| Error::MapWalk(maps::CONNTRACK, e))
    }

    /// Deletes the entries of `keys` that are still expired at `now_ns`,
    /// one at a time: read again, then removed with
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which is atomic and returns what it
    /// removed, so an entry the datapath reused for a new flow meanwhile (a
    /// client port reused) is put back at once. A live flow is never deleted
    /// for good. Returns how many stayed deleted.
    fn delete_expired(&self, keys: &[CtKey], now_ns: u64) -> Result<usize, Error> {
        let mut deleted = 0;
        for key in keys {
            // Read again first: an entry reused since the batch read (up to
            // tens of milliseconds ago) is skipped; only one reused in the
            // microseconds between this read and the delete is deleted and
            // put back, and its flow's next packet is a round trip away.
            let fresh = self
                .elem(BPF_MAP_LOOKUP_ELEM, key, None)
                .is_none_or(|entry| !entry.is_expired(key.proto, now_ns));
            if fresh {
                continue;
            }
            let Some(entry) = self.elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, None) else {
                continue; // already gone
            };
            if entry.is_expired(key.proto, now_ns) {
                deleted += 1;
            } else {
                // Restored unless the datapath made the flow anew meanwhile.
                let _ = self.elem(BPF_MAP_UPDATE_ELEM, key, Some((entry, BPF_NOEXIST)));
            }
        }
        Ok(deleted)
    }

    /// One element command on `key`: the value it returned (lookup, lookup
    /// and delete), or `None` when it failed; `write` is the value and
    /// flags of an update.
    fn elem(
        &self,
        cmd: libc::c_long,
        key: &CtKey,
        write: Option<(CtEntry, u64)>,
    ) -> Option<CtEntry> {
        let mut value = write.map_or_else(CtEntry::default, |(entry, _)| entry);
        let mut attr = ElemAttr {
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            key: key as *const CtKey as u64,
            value: &raw mut value as u64,
            flags: write.map_or(0, |(_, flags)| flags),
            ..ElemAttr::default()
        };
        // SAFETY: `attr` points at a key and a value of the map's sizes that
        // outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &raw mut attr,
                std::mem::size_of::<ElemAttr>() as u32,
            )
        };
        (rc == 0).then_some(value)
    }
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid batch attribute whose pointers reach
    // buffers that outlive the call; the kernel writes only `count` and
    // `out_batch` back, within their sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(entries: usize, expired: usize) -> Walk {
        Walk {
            entries,
            expired,
            removed: expired,
            ..Walk::default()
        }
    }

    #[test]
    fn evictions_are_what_the_walk_misses() {
        let mut evictions = Evictions::default();
        assert_eq!(evictions.update(&walk(10, 4), 100, 0), 0, "first walk");
        // 10 left, 6 created, 1 removed by the datapath: 15 expected.
        assert_eq!(evictions.update(&walk(12, 3), 106, 1), 0);
        // 12 left, 10 created: 22 expected, 17 found.
        assert_eq!(evictions.update(&walk(15, 2), 116, 1), 5);
    }

    #[test]
    fn a_walk_that_sees_entries_created_during_it_reports_no_phantom() {
        let mut evictions = Evictions::default();
        evictions.update(&walk(10, 0), 100, 0);
        // 4 created while the walk read (after the counters): seen, not yet
        // counted — a negative balance, not a phantom later.
        assert_eq!(evictions.update(&walk(14, 0), 100, 0), 0);
        assert_eq!(evictions.update(&walk(14, 0), 104, 0), 0);
        assert_eq!(evictions.update(&walk(14, 0), 104, 0), 0);
    }
}
