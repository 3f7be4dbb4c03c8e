//! The diff: desired frontends vs. what the maps hold → the fewest ordered
//! writes that turn one into the other, make-before-break: per frontend its
//! backends, then its slots and source ranges, then the frontend entry that
//! exposes them; deletions last. A packet never sees a slot without its
//! backend or a count beyond its slots.
//!
//! Slots keep their positions: when one backend goes, the last slot moves
//! into its hole; when one comes, it takes the next slot. One endpoint
//! change is a handful of writes whatever the cluster size.

use std::collections::{BTreeSet, HashMap};

use std::net::Ipv4Addr;

use lb_common::{
    Backend, Frontend, FrontendKey, MAX_TIERS, SlotKey, SourceRangeKey, backend_flags,
    frontend_flags, ipv4_raw, port_raw, scope,
};

use crate::{
    model::{Desired, Endpoint, FrontendAddr, Protocol, Scope},
    problem::{Invalid, Problem},
    state::{Op, SourceRange, State},
};

/// The map key of a frontend address.
pub fn frontend_key(addr: &FrontendAddr) -> FrontendKey {
    FrontendKey {
        addr: ipv4_raw(addr.ip.octets()),
        port: port_raw(addr.port),
        proto: addr.protocol.number(),
        scope: match addr.scope {
            Scope::Internal => scope::INTERNAL,
            Scope::External => scope::EXTERNAL,
        },
    }
}

fn backend_value(endpoint: &Endpoint, protocol: Protocol, local: bool) -> Backend {
    Backend {
        addr: ipv4_raw(endpoint.ip.octets()),
        port: port_raw(endpoint.port),
        proto: protocol.number(),
        flags: if local { backend_flags::LOCAL } else { 0 },
    }
}

/// The map entry of an allowed client network of frontend `frontend_id`.
fn source_range(frontend_id: u32, (ip, len): (Ipv4Addr, u8)) -> SourceRange {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let network = Ipv4Addr::from(u32::from(ip) & mask);
    let key = SourceRangeKey {
        frontend_id,
        addr: ipv4_raw(network.octets()),
    };
    (key, len)
}

/// The writes of one frontend in make-before-break order: the backends it
/// is the first to need, its slots and source ranges, then the frontend
/// entry that exposes them. Applied as a unit: when one write fails, the
/// rest of the unit (the frontend entry last) is not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendWrites {
    /// `namespace/name:port` of its Service port, for reports.
    pub service_port: String,
    /// Its id: the cleanup of a frontend whose unit failed is held back.
    pub frontend_id: u32,
    pub writes: Vec<Op>,
}

/// Everything one diff writes: the new service addresses, each changed
/// frontend's unit, then the deletions (frontends, source ranges, slots,
/// service addresses). The backends that start
/// draining follow from what the maps hold once these went through
/// ([`drains`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Addresses that become Services' (before their frontends).
    pub service_addrs: Vec<Op>,
    pub frontends: Vec<FrontendWrites>,
    pub cleanup: Vec<Op>,
}

impl Plan {
    /// Every write, in the order they are applied.
    pub fn ops(&self) -> Vec<Op> {
        self.service_addrs
            .iter()
            .copied()
            .chain(self.frontends.iter().flat_map(|f| f.writes.iter().copied()))
            .chain(self.cleanup.iter().copied())
            .collect()
    }
}

/// The writes that turn `current` into `desired`, and the frontends that
/// could not be programmed (a frontend over a limit keeps what it has).
pub fn diff(desired: &Desired, current: &State) -> (Plan, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut ids = Ids::new(current);
    let mut plan = Plan::default();
    let mut wanted_ranges = BTreeSet::new();
    let mut used_backends = BTreeSet::new();
    let mut wanted_frontends = BTreeSet::new();
    let mut slot_counts = HashMap::new();

    for (addr, frontend) in &desired.frontends {
        let key = frontend_key(addr);
        let old = current.frontends.get(&key);
        if frontend.tiers.len() > MAX_TIERS
            || frontend
                .tiers
                .iter()
                .any(|t| t.len() > usize::from(u16::MAX))
        {
            let what = format!("{addr} has more backends than a frontend holds");
            problems.push(Problem::new(
                &frontend.service_port,
                Invalid::Capacity(what),
            ));
            // What it serves now stays, whole.
            if let Some(old) = old {
                wanted_frontends.insert(key);
                slot_counts.insert(old.id, old.slot_count());
                used_backends.extend(current.slots_of(old));
                wanted_ranges.extend(
                    current
                        .source_ranges
                        .iter()
                        .filter(|(range, _)| range.frontend_id == old.id),
                );
            }
            continue;
        }
        wanted_frontends.insert(key);
        let mut writes = Vec::new();
        // Backend ids, tier by tier.
        let tiers: Vec<Vec<u32>> = frontend
            .tiers
            .iter()
            .map(|tier| {
                tier.iter()
                    .map(|endpoint| {
                        let local = desired.local_endpoints.contains(&endpoint.ip);
                        let value = backend_value(endpoint, addr.protocol, local);
                        let (id, held) = ids.backend(value);
                        // New, or draining and back in service.
                        if held != Some(value) && used_backends.insert(id) {
                            writes.push(Op::PutBackend(id, value));
                        }
                        used_backends.insert(id);
                        id
                    })
                    .collect()
            })
            .collect();
        let id = old.map_or_else(|| ids.frontend(), |f| f.id);
        let old_slots = old.map(|f| current.slots_of(f)).unwrap_or_default();
        let (slots, tier_len) = layout(&old_slots, &tiers);
        for (slot, backend_id) in slots.iter().enumerate() {
            if old_slots.get(slot) != Some(backend_id) {
                let key = SlotKey {
                    frontend_id: id,
                    slot: slot as u32,
                };
                writes.push(Op::PutSlot(key, *backend_id));
            }
        }
        let mut flags = 0;
        if frontend.drop_when_empty {
            flags |= frontend_flags::DROP_WHEN_EMPTY;
        }
        if !frontend.source_ranges.is_empty() {
            flags |= frontend_flags::SOURCE_RANGES;
        }
        for range in &frontend.source_ranges {
            let range = source_range(id, *range);
            if wanted_ranges.insert(range) && !current.source_ranges.contains(&range) {
                writes.push(Op::PutSourceRange(range));
            }
        }
        let value = Frontend {
            id,
            tier_len,
            flags,
            affinity_timeout_s: frontend.affinity_timeout.unwrap_or(0),
        };
        slot_counts.insert(id, value.slot_count());
        if old != Some(&value) {
            writes.push(Op::PutFrontend(key, value));
        }
        if !writes.is_empty() {
            plan.frontends.push(FrontendWrites {
                service_port: frontend.service_port.clone(),
                frontend_id: id,
                writes,
            });
        }
    }

    // Frontends to delete: the entry first, its slots after.
    plan.cleanup.extend(
        current
            .frontends
            .keys()
            .filter(|key| !wanted_frontends.contains(*key))
            .map(|key| Op::DeleteFrontend(*key)),
    );
    plan.cleanup.extend(
        current
            .source_ranges
            .iter()
            .filter(|range| !wanted_ranges.contains(*range))
            .map(|range| Op::DeleteSourceRange(*range)),
    );
    // Every slot beyond its frontend's new count, or of no frontend (also
    // what a crash between two writes may have left).
    plan.cleanup.extend(
        current
            .slots
            .keys()
            .filter(|key| key.slot >= slot_counts.get(&key.frontend_id).copied().unwrap_or(0))
            .map(|key| Op::DeleteSlot(*key)),
    );
    let wanted_addrs: BTreeSet<u32> = desired
        .service_addrs
        .iter()
        .map(|ip| ipv4_raw(ip.octets()))
        .collect();
    plan.service_addrs.extend(
        wanted_addrs
            .difference(&current.service_addrs)
            .map(|addr| Op::PutServiceAddr(*addr)),
    );
    plan.cleanup.extend(
        current
            .service_addrs
            .difference(&wanted_addrs)
            .map(|addr| Op::DeleteServiceAddr(*addr)),
    );
    (plan, problems)
}

/// The writes that flag draining the backends no slot of `state` holds:
/// established flows keep them until the conntrack walk finds none naming
/// them (see `sync`). Computed from what the maps hold, so a frontend whose
/// writes failed keeps its backends in service.
pub fn drains(state: &State) -> Vec<Op> {
    let slotted: BTreeSet<u32> = state.slots.values().copied().collect();
    state
        .backends
        .iter()
        .filter(|(id, b)| !slotted.contains(id) && b.flags & backend_flags::DRAINING == 0)
        .map(|(id, b)| {
            Op::PutBackend(
                *id,
                Backend {
                    flags: b.flags | backend_flags::DRAINING,
                    ..*b
                },
            )
        })
        .collect()
}

/// New slot contents for `tiers` (backend ids), keeping every backend that
/// stays in its tier at its old position; newcomers fill the holes.
fn layout(old: &[u32], tiers: &[Vec<u32>]) -> (Vec<u32>, [u16; MAX_TIERS]) {
    let mut slots = Vec::new();
    let mut tier_len = [0u16; MAX_TIERS];
    for (tier, ids) in tiers.iter().enumerate() {
        let start = slots.len();
        let wanted: BTreeSet<u32> = ids.iter().copied().collect();
        let mut placed = BTreeSet::new();
        let mut region: Vec<Option<u32>> = (start..start + wanted.len())
            .map(|i| {
                old.get(i)
                    .copied()
                    .filter(|id| wanted.contains(id) && placed.insert(*id))
            })
            .collect();
        let mut newcomers = wanted.difference(&placed).copied();
        for hole in region.iter_mut().filter(|slot| slot.is_none()) {
            *hole = newcomers.next();
        }
        slots.extend(region.into_iter().flatten());
        tier_len[tier] = wanted.len() as u16;
    }
    (slots, tier_len)
}

/// Hands out ids never used before (by the maps or by conntrack).
struct Ids {
    /// Backends by what identifies them (draining or not), with the value
    /// the maps hold.
    backends: HashMap<Backend, (u32, Backend)>,
    next_backend: u32,
    next_frontend: u32,
}

/// What identifies a backend: its value without the draining flag.
fn identity(backend: Backend) -> Backend {
    Backend {
        flags: backend.flags & !backend_flags::DRAINING,
        ..backend
    }
}

impl Ids {
    fn new(current: &State) -> Self {
        let max_backend = current
            .backends
            .keys()
            .copied()
            .max()
            .unwrap_or(0)
            .max(current.max_backend_id_in_use);
        let max_frontend = current
            .frontends
            .values()
            .map(|f| f.id)
            .max()
            .unwrap_or(0)
            .max(current.max_frontend_id_in_use);
        Self {
            backends: current
                .backends
                .iter()
                .map(|(id, b)| (identity(*b), (*id, *b)))
                .collect(),
            next_backend: max_backend + 1,
            next_frontend: max_frontend + 1,
        }
    }

    /// The id of `backend`, and the value the maps hold under it (`None`:
    /// a new id).
    fn backend(&mut self, backend: Backend) -> (u32, Option<Backend>) {
        if let Some((id, held)) = self.backends.get(&identity(backend)) {
            return (*id, Some(*held));
        }
        let id = self.next_backend;
        self.next_backend += 1;
        self.backends.insert(identity(backend), (id, backend));
        (id, None)
    }

    fn frontend(&mut self) -> u32 {
        let id = self.next_frontend;
        self.next_frontend += 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;
    use crate::model::DesiredFrontend;

    /// The plan's writes in the order they are applied.
    fn diff(desired: &Desired, current: &State) -> (Vec<Op>, Vec<Problem>) {
        let (plan, problems) = super::diff(desired, current);
        (plan.ops(), problems)
    }

    /// `ops` applied to `state`, then the drains they lead to.
    fn apply(state: &mut State, ops: &[Op]) {
        ops.iter().for_each(|op| state.apply(op));
        drains(state).iter().for_each(|op| state.apply(op));
    }

    fn frontend(i: u32) -> FrontendAddr {
        FrontendAddr {
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Internal,
        }
    }

    fn endpoint(i: u32) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i),
            port: 8080,
        }
    }

    /// `services` frontends with `per_service` endpoints each.
    fn cluster(services: u32, per_service: u32) -> Desired {
        let mut desired = Desired::default();
        for s in 0..services {
            let tier = (0..per_service).map(|e| endpoint(s * 1000 + e)).collect();
            desired.frontends.insert(
                frontend(s),
                DesiredFrontend {
                    service_port: format!("default/svc-{s}:http"),
                    tiers: vec![tier],
                    drop_when_empty: false,
                    affinity_timeout: None,
                    source_ranges: Vec::new(),
                },
            );
        }
        desired
    }

    fn synced(desired: &Desired) -> State {
        let mut state = State::default();
        let (ops, problems) = diff(desired, &state);
        assert!(problems.is_empty());
        apply(&mut state, &ops);
        state
    }

    /// The endpoints each frontend's slots hold in `state`, per tier.
    fn programmed(state: &State) -> Vec<(FrontendKey, Vec<BTreeSet<Backend>>)> {
        state
            .frontends
            .iter()
            .map(|(key, f)| {
                let slots = state.slots_of(f);
                assert_eq!(slots.len() as u32, f.slot_count(), "every slot present");
                let mut start = 0;
                let tiers = f
                    .tier_len
                    .iter()
                    .map(|len| {
                        let tier = slots[start..start + usize::from(*len)]
                            .iter()
                            .map(|id| state.backends[id])
                            .collect();
                        start += usize::from(*len);
                        tier
                    })
                    .collect();
                (*key, tiers)
            })
            .collect()
    }

    #[test]
    fn cold_sync_programs_everything_in_make_before_break_order() {
        let desired = cluster(3, 4);
        let (plan, _) = super::diff(&desired, &State::default());
        assert_eq!(plan.ops().len(), 3 * 4 + 3 * 4 + 3);
        assert_eq!(plan.frontends.len(), 3, "a unit per frontend");
        for unit in &plan.frontends {
            let ops = &unit.writes;
            let first_slot = ops
                .iter()
                .position(|op| matches!(op, Op::PutSlot(..)))
                .unwrap();
            let last_backend = ops
                .iter()
                .rposition(|op| matches!(op, Op::PutBackend(..)))
                .unwrap();
            assert!(last_backend < first_slot, "{ops:?}");
            assert!(
                matches!(ops.last(), Some(Op::PutFrontend(..))),
                "the frontend entry last: {ops:?}"
            );
        }
        let state = synced(&desired);
        for (_, tiers) in programmed(&state) {
            assert_eq!(tiers[0].len(), 4);
        }
    }

    #[test]
    fn nothing_changed_writes_nothing() {
        let desired = cluster(50, 5);
        let state = synced(&desired);
        assert_eq!(diff(&desired, &state).0, vec![]);
    }

    #[test]
    fn one_endpoint_change_is_a_constant_number_of_writes() {
        let mut desired = cluster(1000, 10);
        let mut state = synced(&desired);
        // Remove the third endpoint of one service: the last slot moves into
        // its hole, the count shrinks, the old last slot and the backend go.
        let tier = &mut desired.frontends.get_mut(&frontend(500)).unwrap().tiers[0];
        tier.remove(&endpoint(500 * 1000 + 2));
        let (ops, _) = diff(&desired, &state);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert_eq!(
            drains(&{
                let mut after = state.clone();
                ops.iter().for_each(|op| after.apply(op));
                after
            })
            .len(),
            1,
            "and the backend drains"
        );
        apply(&mut state, &ops);
        assert_eq!(programmed(&state), programmed(&synced(&desired)));
        // Add one: backend, slot, count.
        let tier = &mut desired.frontends.get_mut(&frontend(7)).unwrap().tiers[0];
        tier.insert(endpoint(999_999));
        let (ops, _) = diff(&desired, &state);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(ops[0], Op::PutBackend(..)));
        assert!(matches!(ops[1], Op::PutSlot(..)));
        assert!(matches!(ops[2], Op::PutFrontend(..)));
    }

    #[test]
    fn ids_are_stable_and_never_reused() {
        let mut desired = cluster(2, 3);
        let mut state = synced(&desired);
        let ids_before: BTreeMap<_, _> = state.backends.iter().map(|(id, b)| (*b, *id)).collect();
        let removed = ids_before[&backend_value(&endpoint(0), Protocol::Tcp, false)];
        desired.frontends.get_mut(&frontend(0)).unwrap().tiers[0].remove(&endpoint(0));
        let (ops, _) = diff(&desired, &state);
        apply(&mut state, &ops);
        assert_ne!(
            state.backends[&removed].flags & backend_flags::DRAINING,
            0,
            "kept, draining, while conntrack may name it"
        );
        // Every backend kept its id.
        for (backend, id) in &state
            .backends
            .iter()
            .map(|(id, b)| (identity(*b), *id))
            .collect::<BTreeMap<_, _>>()
        {
            assert_eq!(ids_before.get(backend), Some(id));
        }
        // Back in service: the same id, no longer draining.
        desired.frontends.get_mut(&frontend(0)).unwrap().tiers[0].insert(endpoint(0));
        let (ops, _) = diff(&desired, &state);
        assert!(
            ops.contains(&Op::PutBackend(
                removed,
                backend_value(&endpoint(0), Protocol::Tcp, false)
            )),
            "{ops:?}"
        );
        apply(&mut state, &ops);
        assert_eq!(programmed(&synced(&desired)), programmed(&state));
        state.backends.remove(&removed);
        desired.frontends.get_mut(&frontend(0)).unwrap().tiers[0].remove(&endpoint(0));
        // A restart that finds the removed id in conntrack never hands it out.
        state.max_backend_id_in_use = state.max_backend_id_in_use.max(removed);
        desired.frontends.get_mut(&frontend(1)).unwrap().tiers[0].insert(endpoint(77));
        let (ops, _) = diff(&desired, &state);
        let new_id = ops
            .iter()
            .find_map(|op| match op {
                Op::PutBackend(id, b)
                    if *b == backend_value(&endpoint(77), Protocol::Tcp, false) =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .expect("the new backend is written");
        assert!(new_id > removed);
    }

    #[test]
    fn removed_frontends_and_stray_slots_are_deleted() {
        let mut desired = cluster(3, 2);
        let mut state = synced(&desired);
        state.slots.insert(
            SlotKey {
                frontend_id: 999,
                slot: 0,
            },
            1,
        );
        desired.frontends.remove(&frontend(1));
        let (ops, _) = diff(&desired, &state);
        apply(&mut state, &ops);
        // Ids differ from a fresh sync; what is programmed does not.
        assert_eq!(programmed(&synced(&desired)), programmed(&state));
        assert_eq!(state.frontends.len(), 2);
        assert_eq!(state.slots.len(), 4);
        let draining = |b: &&Backend| b.flags & backend_flags::DRAINING != 0;
        assert_eq!(state.backends.values().filter(|b| !draining(b)).count(), 4);
        assert_eq!(state.backends.values().filter(draining).count(), 2);
    }

    #[test]
    fn a_frontend_over_the_tier_limit_keeps_what_it_serves() {
        let mut desired = cluster(2, 3);
        let state = synced(&desired);
        let tier = &mut desired.frontends.get_mut(&frontend(0)).unwrap().tiers[0];
        for i in 0..=u32::from(u16::MAX) {
            tier.insert(endpoint(100_000 + i));
        }
        let (ops, problems) = diff(&desired, &state);
        assert_eq!(problems.len(), 1, "reported");
        assert_eq!(ops, vec![], "nothing of it deleted or drained");
    }

    #[test]
    fn tiers_keep_positions_and_lengths() {
        let mut desired = cluster(1, 0);
        let fe = desired.frontends.get_mut(&frontend(0)).unwrap();
        fe.tiers = vec![
            [endpoint(1)].into(),
            [endpoint(2), endpoint(3)].into(),
            [endpoint(1), endpoint(2), endpoint(3), endpoint(4)].into(),
        ];
        let state = synced(&desired);
        let f = state.frontends.values().next().unwrap();
        assert_eq!(f.tier_len, [1, 2, 4]);
        let tiers = &programmed(&state)[0].1;
        assert_eq!(tiers[2].len(), 4);
    }

    #[test]
    fn source_ranges_are_written_before_their_frontend_and_removed_after() {
        let mut desired = cluster(1, 1);
        let fe = desired.frontends.get_mut(&frontend(0)).unwrap();
        fe.source_ranges = vec![
            (Ipv4Addr::new(10, 1, 2, 3), 8),
            ("192.168.0.0".parse().unwrap(), 16),
        ];
        let (ops, _) = diff(&desired, &State::default());
        let first_range = ops
            .iter()
            .position(|op| matches!(op, Op::PutSourceRange(..)))
            .unwrap();
        let frontend_at = ops
            .iter()
            .position(|op| matches!(op, Op::PutFrontend(..)))
            .unwrap();
        assert!(first_range < frontend_at, "{ops:?}");
        let mut state = synced(&desired);
        let id = state.frontends.values().next().unwrap().id;
        let f = state.frontends.values().next().unwrap();
        assert_ne!(f.flags & frontend_flags::SOURCE_RANGES, 0);
        // Networks are stored masked to their length.
        assert!(state.source_ranges.contains(&(
            SourceRangeKey {
                frontend_id: id,
                addr: ipv4_raw([10, 0, 0, 0]),
            },
            8
        )));
        // Ranges removed: the frontend loses its flag first.
        desired
            .frontends
            .get_mut(&frontend(0))
            .unwrap()
            .source_ranges = Vec::new();
        let (ops, _) = diff(&desired, &state);
        assert!(
            matches!(ops[0], Op::PutFrontend(_, f) if f.flags == 0),
            "{ops:?}"
        );
        assert_eq!(ops.len(), 3, "{ops:?}");
        apply(&mut state, &ops);
        assert!(state.source_ranges.is_empty());
    }

    #[test]
    fn local_endpoints_get_the_local_flag() {
        let mut desired = cluster(1, 2);
        desired.local_endpoints.insert(endpoint(0).ip);
        let state = synced(&desired);
        let local: Vec<bool> = state
            .backends
            .values()
            .map(|b| b.flags & backend_flags::LOCAL != 0)
            .collect();
        assert_eq!(local, vec![true, false]);
    }
}
