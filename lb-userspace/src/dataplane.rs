//! Where the diff's writes go: the pinned BPF maps, or memory in tests.

use std::collections::BTreeSet;

use aya::maps::{IterableMap, lpm_trie::Key};
use lb_common::{AffinityKey, SockAffinityKey, SourceRangeKey};

use crate::{
    Error, Maps,
    state::{Op, State},
};

/// The service maps as the sync loop sees them.
pub trait Dataplane {
    /// What the service maps hold now (read at start to reconcile, and
    /// periodically to catch drift).
    fn read(&self) -> Result<State, Error>;
    /// One write.
    fn write(&mut self, op: &Op) -> Result<(), Error>;

    /// Writes of one kind (all to one map), at once where the map allows;
    /// on a failure, how many went in before it (the caller writes the
    /// rest one by one, which tells what failed).
    fn write_batch(&mut self, ops: &[Op]) -> Result<(), usize> {
        one_by_one(self, ops)
    }
    /// Drops the ClientIP affinity entries of these frontends (deleted, or
    /// their affinity turned off): a later Service never inherits them.
    fn forget_affinity(&mut self, frontend_ids: &BTreeSet<u32>) -> Result<(), Error>;

    /// Writes word `index` of the per-packet path's pre-filter.
    fn write_filter(&mut self, index: u32, word: u64) -> Result<(), Error>;

    /// Writes several words of the pre-filter (at once where the map
    /// allows); on a failure, some may be written.
    fn write_filters(&mut self, words: &[(u32, u64)]) -> Result<(), Error> {
        words
            .iter()
            .try_for_each(|(index, word)| self.write_filter(*index, *word))
    }
}

/// The in-memory dataplane of the tests.
impl Dataplane for State {
    fn read(&self) -> Result<State, Error> {
        Ok(self.clone())
    }

    fn write(&mut self, op: &Op) -> Result<(), Error> {
        self.apply(op);
        Ok(())
    }

    fn forget_affinity(&mut self, _frontend_ids: &BTreeSet<u32>) -> Result<(), Error> {
        Ok(())
    }

    fn write_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
        if word == 0 {
            self.addr_filter.remove(&index);
        } else {
            self.addr_filter.insert(index, word);
        }
        Ok(())
    }
}

impl Dataplane for Maps {
    fn read(&self) -> Result<State, Error> {
        let mut state = State::default();
        for entry in self.frontends.iter() {
            let (key, value) = entry.map_err(Error::map(lb_common::maps::FRONTENDS))?;
            state.frontends.insert(key, value);
        }
        for entry in self.frontend_names.iter() {
            let (id, name) = entry.map_err(Error::map(lb_common::maps::FRONTEND_NAMES))?;
            state
                .frontend_names
                .insert(id, crate::state::name_digest(&name));
        }
        for entry in self.slots.iter() {
            let (key, value) = entry.map_err(Error::map(lb_common::maps::SLOTS))?;
            state.slots.insert(key, value);
        }
        for entry in self.backends.iter() {
            let (key, value) = entry.map_err(Error::map(lb_common::maps::BACKENDS))?;
            state.backends.insert(key, value);
        }
        for addr in self.service_addrs.keys() {
            let addr = addr.map_err(Error::map(lb_common::maps::SERVICE_ADDRS))?;
            state.service_addrs.insert(addr);
        }
        for key in self.source_ranges.keys() {
            let key = key.map_err(Error::map(lb_common::maps::SOURCE_RANGES))?;
            let len = key.prefix_len().saturating_sub(32) as u8;
            state.source_ranges.insert((key.data(), len));
        }
        // The ids conntrack names come from the agent's walk
        // (`Syncer::conntrack_walked`), which reads it in batches.
        let affinity = self.affinity.keys().flatten().map(|key| key.frontend_id);
        let sock_affinity = self
            .sock_affinity
            .keys()
            .flatten()
            .map(|key| key.frontend_id);
        for frontend_id in affinity.chain(sock_affinity) {
            state.max_frontend_id_in_use = state.max_frontend_id_in_use.max(frontend_id);
        }
        state.max_frontend_id_in_use = state
            .frontends
            .values()
            .map(|f| f.id)
            .fold(state.max_frontend_id_in_use, u32::max);
        crate::conntrack::read_batched(self.addr_filter.map(), |index: &u32, word: &u64| {
            if *word != 0 {
                state.addr_filter.insert(*index, *word);
            }
        })
        .map_err(|e| Error::MapWalk(lb_common::maps::ADDR_FILTER, e))?;
        Ok(state)
    }

    fn write_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
        self.addr_filter
            .set(index, word, 0)
            .map_err(Error::map(lb_common::maps::ADDR_FILTER))
    }

    fn write_filters(&mut self, words: &[(u32, u64)]) -> Result<(), Error> {
        crate::conntrack::update_batched(self.addr_filter.map(), words)
            .map_err(|e| Error::MapWalk(lb_common::maps::ADDR_FILTER, e))
    }

    fn write_batch(&mut self, ops: &[Op]) -> Result<(), usize> {
        // One `BPF_MAP_UPDATE_BATCH` for the kinds a large sync writes by
        // the ten thousand; the rest one by one.
        let written = match ops.first() {
            Some(Op::PutBackend(..)) => batch(&self.backends, ops, |op| match *op {
                Op::PutBackend(id, value) => Some((id, value)),
                _ => None,
            }),
            Some(Op::PutSlot(..)) => batch(&self.slots, ops, |op| match *op {
                Op::PutSlot(key, id) => Some((key, id)),
                _ => None,
            }),
            Some(Op::PutFrontend(..)) => batch(&self.frontends, ops, |op| match *op {
                Op::PutFrontend(key, value) => Some((key, value)),
                _ => None,
            }),
            Some(Op::PutFrontendName(..)) => batch(&self.frontend_names, ops, |op| match *op {
                Op::PutFrontendName(id, name) => Some((id, name)),
                _ => None,
            }),
            Some(Op::PutServiceAddr(..)) => batch(&self.service_addrs, ops, |op| match *op {
                Op::PutServiceAddr(addr) => Some((addr, 1u8)),
                _ => None,
            }),
            _ => None,
        };
        written.unwrap_or_else(|| one_by_one(self, ops))
    }

    fn write(&mut self, op: &Op) -> Result<(), Error> {
        use lb_common::maps::{
            BACKENDS, FRONTEND_NAMES, FRONTENDS, SERVICE_ADDRS, SLOTS, SOURCE_RANGES,
        };
        match *op {
            Op::PutBackend(id, value) => self
                .backends
                .insert(id, value, 0)
                .map_err(Error::map(BACKENDS)),
            Op::PutSlot(key, id) => self.slots.insert(key, id, 0).map_err(Error::map(SLOTS)),
            Op::PutSourceRange(range) => self
                .source_ranges
                .insert(&lpm_key(range), 1, 0)
                .map_err(Error::map(SOURCE_RANGES)),
            Op::DeleteSourceRange(range) => {
                ignore_missing(self.source_ranges.remove(&lpm_key(range)))
                    .map_err(Error::map(SOURCE_RANGES))
            }
            Op::PutServiceAddr(addr) => self
                .service_addrs
                .insert(addr, 1, 0)
                .map_err(Error::map(SERVICE_ADDRS)),
            Op::DeleteServiceAddr(addr) => {
                ignore_missing(self.service_addrs.remove(&addr)).map_err(Error::map(SERVICE_ADDRS))
            }
            Op::PutFrontend(key, value) => self
                .frontends
                .insert(key, value, 0)
                .map_err(Error::map(FRONTENDS)),
            Op::DeleteFrontend(key) => {
                ignore_missing(self.frontends.remove(&key)).map_err(Error::map(FRONTENDS))
            }
            Op::PutFrontendName(id, name) => self
                .frontend_names
                .insert(id, name, 0)
                .map_err(Error::map(FRONTEND_NAMES)),
            Op::DeleteFrontendName(id) => {
                ignore_missing(self.frontend_names.remove(&id)).map_err(Error::map(FRONTEND_NAMES))
            }
            Op::DeleteSlot(key) => {
                ignore_missing(self.slots.remove(&key)).map_err(Error::map(SLOTS))
            }
            Op::DeleteBackend(id) => {
                ignore_missing(self.backends.remove(&id)).map_err(Error::map(BACKENDS))
            }
        }
    }

    fn forget_affinity(&mut self, frontend_ids: &BTreeSet<u32>) -> Result<(), Error> {
        let stale: Vec<AffinityKey> = self
            .affinity
            .keys()
            .flatten()
            .filter(|key| frontend_ids.contains(&key.frontend_id))
            .collect();
        for key in stale {
            ignore_missing(self.affinity.remove(&key))
                .map_err(Error::map(lb_common::maps::AFFINITY))?;
        }
        let stale: Vec<SockAffinityKey> = self
            .sock_affinity
            .keys()
            .flatten()
            .filter(|key| frontend_ids.contains(&key.frontend_id))
            .collect();
        for key in stale {
            ignore_missing(self.sock_affinity.remove(&key))
                .map_err(Error::map(lb_common::maps::SOCK_AFFINITY))?;
        }
        Ok(())
    }
}

/// `ops` written one at a time until one fails; on a failure, how many
/// went in.
fn one_by_one(dataplane: &mut (impl Dataplane + ?Sized), ops: &[Op]) -> Result<(), usize> {
    for (done, op) in ops.iter().enumerate() {
        dataplane.write(op).map_err(|_| done)?;
    }
    Ok(())
}

/// `ops` into hash map `map` in one batch, when `entry` gives every one's
/// key and value; `None` when one is of another kind.
fn batch<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    ops: &[Op],
    entry: impl Fn(&Op) -> Option<(K, V)>,
) -> Option<Result<(), usize>> {
    let entries: Vec<(K, V)> = ops.iter().map(entry).collect::<Option<_>>()?;
    Some(crate::conntrack::update_batched_counted(map.map(), &entries).map_err(|(done, _)| done))
}

/// The trie key of a source range: the frontend id is matched whole.
fn lpm_key((key, len): crate::state::SourceRange) -> Key<SourceRangeKey> {
    Key::new(32 + u32::from(len), key)
}

/// Deleting what is already gone is success.
fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
