//! What the datapath's service maps hold, as plain data, and the writes
//! that change it.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, Frontend, FrontendKey, SlotKey, SourceRangeKey};

/// One allowed client network of one frontend: the key (network address
/// masked to its length) and the network's prefix length.
pub type SourceRange = (SourceRangeKey, u8);

/// The contents of the frontends, slots and backends maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
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
