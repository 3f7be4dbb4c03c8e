//! The agent's conntrack walk, once a second: it removes the entries that
//! expired (the LRU map would otherwise keep them until it is full, and
//! then evict the least recently used entry — an idle but live flow — before
//! a closed one), counts what is left, and collects the backend ids that
//! live entries name, so that a draining backend is deleted only once no
//! flow uses it.
//!
//! The walk reads the map in batches (`BPF_MAP_LOOKUP_BATCH`) and deletes in
//! batches (`BPF_MAP_DELETE_BATCH`): a full table of half a million entries
//! costs tens of milliseconds, not a million syscalls.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::MapData;
use lb_common::{CtEntry, CtKey, maps};

use crate::Error;

/// Entries read or deleted per syscall.
const BATCH: usize = 4096;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

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
/// what it held after the last walk, plus what the datapath created, minus
/// what it removed; whatever else is missing was evicted — a table too
/// small for its load (`--conntrack-max`).
#[derive(Debug, Default)]
pub struct Evictions {
    /// Entries left by the last walk, and the datapath's event totals then.
    last: Option<(usize, u64, u64)>,
}

impl Evictions {
    /// The evictions since the last walk, given this `walk` and the
    /// datapath's `created` and `removed` totals read just before it.
    pub fn update(&mut self, walk: &Walk, created: u64, removed: u64) -> u64 {
        let found = (walk.entries + walk.expired) as u64;
        let evicted = match self.last {
            Some((left, created_then, removed_then)) => (left as u64
                + created.saturating_sub(created_then))
            .saturating_sub(removed.saturating_sub(removed_then))
            .saturating_sub(found),
            None => 0,
        };
        self.last = Some((walk.entries, created, removed));
        evicted
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
        walk.removed = self.delete(&expired)?;
        Ok(walk)
    }

    fn read_all(&self, mut each: impl FnMut(&CtKey, &CtEntry)) -> Result<(), Error> {
        let mut keys = vec![CtKey::default(); BATCH];
        let mut values = vec![CtEntry::default(); BATCH];
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
                map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
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
                Err(err) => return Err(Error::ConntrackWalk(err)),
            }
            in_batch = out_batch;
            first = false;
        }
    }

    /// Deletes `keys`; a key already gone (evicted, or removed by the
    /// datapath) is skipped. Returns how many were deleted.
    fn delete(&self, keys: &[CtKey]) -> Result<usize, Error> {
        let mut deleted = 0;
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(BATCH)];
            let mut attr = BatchAttr {
                keys: chunk.as_ptr() as u64,
                count: chunk.len() as u32,
                map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
            let done = attr.count as usize;
            deleted += done;
            match result {
                Ok(()) => rest = &rest[chunk.len()..],
                // The batch stops at a key that is gone: skip it.
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                    rest = &rest[(done + 1).min(rest.len())..];
                }
                Err(err) => return Err(Error::ConntrackWalk(err)),
            }
        }
        Ok(deleted)
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

    #[test]
    fn evictions_are_what_the_walk_misses() {
        let mut evictions = Evictions::default();
        let walk = |entries, expired| Walk {
            entries,
            expired,
            ..Walk::default()
        };
        assert_eq!(evictions.update(&walk(10, 4), 100, 0), 0, "first walk");
        // 10 left, 6 created, 1 removed by the datapath: 15 expected.
        assert_eq!(evictions.update(&walk(12, 3), 106, 1), 0);
        // 12 left, 10 created: 22 expected, 17 found.
        assert_eq!(evictions.update(&walk(15, 2), 116, 1), 5);
    }
}
