//! What the datapath's service maps hold, as plain data, and the writes
//! that change it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{
    Backend, Frontend, FrontendKey, ServiceName, SlotKey, SourceRangeKey,
    addr_filter::{BACKENDS, FRONTENDS},
    addr_filter_bit, backend_flags,
};

/// One allowed client network of one frontend: the key (network address
/// masked to its length) and the network's prefix length.
pub type SourceRange = (SourceRangeKey, u8);

/// The contents of the frontends, slots and backends maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Which Service port each frontend id belongs to (inspection only),
    /// as the [`name_digest`] of its name.
    pub frontend_names: BTreeMap<u32, u64>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    pub source_ranges: BTreeSet<SourceRange>,
    /// The addresses only Services use (wire order).
    pub service_addrs: BTreeSet<u32>,
    /// The highest backend id a conntrack entry still names: ids up to it
    /// are never handed out again (a flow must not follow a reused id to
    /// another pod).
    pub max_backend_id_in_use: u32,
    /// The highest frontend id ever programmed or still named by conntrack
    /// or affinity entries: a new frontend never inherits another's.
    pub max_frontend_id_in_use: u32,
    /// The pre-filter's words as written, by index (zero words left out).
    pub addr_filter: BTreeMap<u32, u64>,
}

/// One map write. Applied in the order the diff returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutSourceRange(SourceRange),
    PutServiceAddr(u32),
    PutFrontend(FrontendKey, Frontend),
    DeleteFrontend(FrontendKey),
    PutFrontendName(u32, ServiceName),
    DeleteFrontendName(u32),
    DeleteSourceRange(SourceRange),
    DeleteServiceAddr(u32),
    DeleteSlot(SlotKey),
    DeleteBackend(u32),
}

impl State {
    /// Applies one write to this mirror of the maps.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutBackend(id, backend) => {
                self.backends.insert(id, backend);
                self.max_backend_id_in_use = self.max_backend_id_in_use.max(id);
            }
            Op::PutSlot(key, id) => {
                self.slots.insert(key, id);
            }
            Op::PutSourceRange(range) => {
                self.source_ranges.insert(range);
            }
            Op::DeleteSourceRange(range) => {
                self.source_ranges.remove(&range);
            }
            Op::PutServiceAddr(addr) => {
                self.service_addrs.insert(addr);
            }
            Op::DeleteServiceAddr(addr) => {
                self.service_addrs.remove(&addr);
            }
            Op::PutFrontend(key, frontend) => {
                self.frontends.insert(key, frontend);
                self.max_frontend_id_in_use = self.max_frontend_id_in_use.max(frontend.id);
            }
            Op::DeleteFrontend(key) => {
                self.frontends.remove(&key);
            }
            Op::PutFrontendName(id, name) => {
                self.frontend_names.insert(id, name_digest(&name));
            }
            Op::DeleteFrontendName(id) => {
                self.frontend_names.remove(&id);
            }
            Op::DeleteSlot(key) => {
                self.slots.remove(&key);
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(&id);
            }
        }
    }

    /// The backend ids in the slots of `frontend`, in slot order.
    pub fn slots_of(&self, frontend: &Frontend) -> Vec<u32> {
        (0..frontend.slot_count())
            .map_while(|slot| {
                self.slots
                    .get(&SlotKey {
                        frontend_id: frontend.id,
                        slot,
                    })
                    .copied()
            })
            .collect()
    }
}

/// What the record keeps of a frontend's name: enough to tell a change,
/// in 8 bytes rather than the name's 144.
pub fn name_digest(name: &ServiceName) -> u64 {
    crate::fnv1a(&name.bytes)
}

/// What identifies a backend: its value without the draining flag.
pub fn identity(backend: Backend) -> Backend {
    Backend {
        flags: backend.flags & !backend_flags::DRAINING,
        ..backend
    }
}

/// The sync's record of what the maps hold, with the indexes that let a
/// diff touch only what changed: backend ids by value, how many slots hold
/// each backend, the backends no slot holds.
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    state: State,
    /// Backend ids by [`identity`].
    backend_ids: HashMap<Backend, u32>,
    /// How many slots hold each backend.
    slot_refs: HashMap<u32, u32>,
    /// Backends in service that no slot holds: they start draining.
    unslotted: BTreeSet<u32>,
    /// How many frontend keys and backends have an address on each bit of
    /// the pre-filter (`lb_common::addr_filter_bit`).
    filter_refs: HashMap<u32, u32>,
}

/// The bit of the pre-filter that stands for `addr` in bitmap `set`,
/// counted over all words.
fn filter_bit(set: u32, addr: u32) -> u32 {
    let (index, mask) = addr_filter_bit(set, addr);
    index * 64 + mask.trailing_zeros()
}

impl Mirror {
    pub fn new(mut state: State) -> Self {
        state.max_backend_id_in_use = state
            .backends
            .keys()
            .copied()
            .fold(state.max_backend_id_in_use, u32::max);
        // Slots, source ranges and names left by a unit that never wrote
        // its frontend entry (a failed write, a crash) name ids too: a new
        // frontend must not inherit them.
        state.max_frontend_id_in_use = state
            .frontends
            .values()
            .map(|f| f.id)
            .chain(state.slots.keys().map(|key| key.frontend_id))
            .chain(state.source_ranges.iter().map(|(key, _)| key.frontend_id))
            .chain(state.frontend_names.keys().copied())
            .fold(state.max_frontend_id_in_use, u32::max);
        let mut mirror = Self::default();
        for id in state.slots.values() {
            *mirror.slot_refs.entry(*id).or_default() += 1;
        }
        let frontends = state.frontends.keys().map(|key| (FRONTENDS, key.addr));
        let backends = state.backends.values().map(|b| (BACKENDS, b.addr));
        for (set, addr) in frontends.chain(backends) {
            *mirror.filter_refs.entry(filter_bit(set, addr)).or_default() += 1;
        }
        for (id, backend) in &state.backends {
            mirror.backend_ids.insert(identity(*backend), *id);
            if backend.flags & backend_flags::DRAINING == 0 && !mirror.slot_refs.contains_key(id) {
                mirror.unslotted.insert(*id);
            }
        }
        mirror.state = state;
        mirror
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Ids that conntrack still names (from its walk): never handed out
    /// again.
    pub fn ids_in_use(&mut self, max_backend_id: u32, max_frontend_id: u32) {
        let state = &mut self.state;
        state.max_backend_id_in_use = state.max_backend_id_in_use.max(max_backend_id);
        state.max_frontend_id_in_use = state.max_frontend_id_in_use.max(max_frontend_id);
    }

    /// The id of the backend `backend` is (draining or not), and its value
    /// in the maps.
    pub fn backend(&self, backend: Backend) -> Option<(u32, Backend)> {
        let id = *self.backend_ids.get(&identity(backend))?;
        Some((id, *self.state.backends.get(&id)?))
    }

    /// Whether a slot holds backend `id`.
    pub fn is_slotted(&self, id: u32) -> bool {
        self.slot_refs.contains_key(&id)
    }

    /// Backends in service that no slot holds.
    pub fn unslotted(&self) -> &BTreeSet<u32> {
        &self.unslotted
    }

    /// Every slot of frontend `id`, also beyond its count.
    pub fn slots_of_id(&self, id: u32) -> impl Iterator<Item = (&SlotKey, &u32)> {
        let first = SlotKey {
            frontend_id: id,
            slot: 0,
        };
        let last = SlotKey {
            frontend_id: id,
            slot: u32::MAX,
        };
        self.state.slots.range(first..=last)
    }

    /// The source ranges of frontend `id`.
    pub fn source_ranges_of(&self, id: u32) -> impl Iterator<Item = &SourceRange> {
        let first = (
            SourceRangeKey {
                frontend_id: id,
                addr: 0,
            },
            0,
        );
        let last = (
            SourceRangeKey {
                frontend_id: id,
                addr: u32::MAX,
            },
            u8::MAX,
        );
        self.state.source_ranges.range(first..=last)
    }

    /// The pre-filter word to write before `op`, when the address `op`
    /// adds (a new backend or frontend key) does not pass it yet.
    pub fn filter_before(&self, op: &Op) -> Option<(u32, u64)> {
        let (set, addr) = self.added_addr(op)?;
        let (index, mask) = addr_filter_bit(set, addr);
        let word = self.state.addr_filter.get(&index).copied().unwrap_or(0);
        (word & mask == 0).then_some((index, word | mask))
    }

    /// The pre-filter words to write before `ops` so that every address
    /// they add passes it: each word once (a cold sync adds ~100,000
    /// addresses over ~30,000 words).
    pub fn filter_before_all<'a>(&self, ops: impl Iterator<Item = &'a Op>) -> Vec<(u32, u64)> {
        let mut words: BTreeMap<u32, u64> = BTreeMap::new();
        for (set, addr) in ops.filter_map(|op| self.added_addr(op)) {
            let (index, mask) = addr_filter_bit(set, addr);
            let written = self.state.addr_filter.get(&index).copied().unwrap_or(0);
            *words.entry(index).or_insert(written) |= mask;
        }
        words
            .into_iter()
            .filter(|(index, word)| {
                self.state.addr_filter.get(index).copied().unwrap_or(0) != *word
            })
            .collect()
    }

    /// The pre-filter bitmap and address `op` adds to the maps (a new
    /// backend or frontend key), if any.
    fn added_addr(&self, op: &Op) -> Option<(u32, u32)> {
        match *op {
            Op::PutBackend(id, backend) if !self.state.backends.contains_key(&id) => {
                Some((BACKENDS, backend.addr))
            }
            Op::PutFrontend(key, _) if !self.state.frontends.contains_key(&key) => {
                Some((FRONTENDS, key.addr))
            }
            _ => None,
        }
    }

    /// The pre-filter bitmap and address `op` removes from the maps (a
    /// backend or a frontend key deleted), if any.
    pub fn removed_addr(&self, op: &Op) -> Option<(u32, u32)> {
        match *op {
            Op::DeleteBackend(id) => self.state.backends.get(&id).map(|b| (BACKENDS, b.addr)),
            Op::DeleteFrontend(key) => self
                .state
                .frontends
                .contains_key(&key)
                .then_some((FRONTENDS, key.addr)),
            _ => None,
        }
    }

    /// The pre-filter word to write once `removed` (bitmap, address) is
    /// gone, when it leaves a bit no other address needs.
    pub fn filter_after(&self, (set, addr): (u32, u32)) -> Option<(u32, u64)> {
        let (index, _) = addr_filter_bit(set, addr);
        let wanted = self.filter_word(index);
        (self.state.addr_filter.get(&index).copied().unwrap_or(0) != wanted)
            .then_some((index, wanted))
    }

    /// Every word of the pre-filter that differs from what the addresses
    /// in the maps need (after a re-read: drift, or a datapath that had no
    /// pre-filter yet).
    pub fn filter_drift(&self) -> Vec<(u32, u64)> {
        let used = self.filter_refs.keys().map(|bit| bit >> 6);
        let written = self.state.addr_filter.keys().copied();
        let indexes: BTreeSet<u32> = used.chain(written).collect();
        indexes
            .into_iter()
            .map(|index| (index, self.filter_word(index)))
            .filter(|(index, word)| {
                self.state.addr_filter.get(index).copied().unwrap_or(0) != *word
            })
            .collect()
    }

    /// Records a pre-filter word written.
    pub fn filter_written(&mut self, index: u32, word: u64) {
        if word == 0 {
            self.state.addr_filter.remove(&index);
        } else {
            self.state.addr_filter.insert(index, word);
        }
    }

    /// Word `index` of the pre-filter as the addresses in the maps need it.
    fn filter_word(&self, index: u32) -> u64 {
        (0..64)
            .filter(|bit| self.filter_refs.contains_key(&(index * 64 + bit)))
            .fold(0, |word, bit| word | 1 << bit)
    }

    /// One more (`add`) or one less address on `addr`'s bit of pre-filter
    /// bitmap `set`.
    fn count_addr(&mut self, (set, addr): (u32, u32), add: bool) {
        let bit = filter_bit(set, addr);
        if add {
            *self.filter_refs.entry(bit).or_default() += 1;
        } else if let Some(count) = self.filter_refs.get_mut(&bit) {
            *count -= 1;
            if *count == 0 {
                self.filter_refs.remove(&bit);
            }
        }
    }

    /// Applies one write that went through.
    pub fn apply(&mut self, op: &Op) {
        if let Some(removed) = self.removed_addr(op) {
            self.count_addr(removed, false);
        }
        if let Some(added) = self.added_addr(op) {
            self.count_addr(added, true);
        }
        match *op {
            Op::PutBackend(id, backend) => {
                if let Some(old) = self.state.backends.get(&id) {
                    self.backend_ids.remove(&identity(*old));
                }
                self.backend_ids.insert(identity(backend), id);
                if backend.flags & backend_flags::DRAINING != 0 {
                    self.unslotted.remove(&id);
                } else if !self.slot_refs.contains_key(&id) {
                    self.unslotted.insert(id);
                }
            }
            Op::DeleteBackend(id) => {
                if let Some(old) = self.state.backends.get(&id) {
                    self.backend_ids.remove(&identity(*old));
                }
                self.unslotted.remove(&id);
            }
            Op::PutSlot(key, id) => {
                if let Some(old) = self.state.slots.get(&key).copied() {
                    self.unref(old);
                }
                self.id_in_use(key.frontend_id);
                *self.slot_refs.entry(id).or_default() += 1;
                self.unslotted.remove(&id);
            }
            Op::DeleteSlot(key) => {
                if let Some(old) = self.state.slots.get(&key).copied() {
                    self.unref(old);
                }
            }
            Op::PutSourceRange((key, _)) => self.id_in_use(key.frontend_id),
            Op::PutFrontendName(id, _) => self.id_in_use(id),
            _ => {}
        }
        self.state.apply(op);
    }

    /// A frontend id written to the maps, frontend entry or not.
    fn id_in_use(&mut self, id: u32) {
        let max = &mut self.state.max_frontend_id_in_use;
        *max = (*max).max(id);
    }

    /// One slot less holds backend `id`.
    fn unref(&mut self, id: u32) {
        let Some(count) = self.slot_refs.get_mut(&id) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.slot_refs.remove(&id);
        if self
            .state
            .backends
            .get(&id)
            .is_some_and(|b| b.flags & backend_flags::DRAINING == 0)
        {
            self.unslotted.insert(id);
        }
    }
}
