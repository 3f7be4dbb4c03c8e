//! The diff: desired frontends vs. what the maps hold → the fewest ordered
//! writes that turn one into the other, make-before-break: per frontend its
//! backends, then its slots and source ranges, then the frontend entry that
//! exposes them; deletions last. A packet never sees a slot without its
//! backend or a count beyond its slots.
//!
//! Slots keep their positions: when one backend goes, the last slot moves
//! into its hole; when one comes, it takes the next slot. One endpoint
//! change is a handful of writes whatever the cluster size.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use lb_common::{
    Backend, Frontend, FrontendKey, MAX_TIERS, ServiceName, SlotKey, SourceRangeKey, backend_flags,
    frontend_flags, ipv4_octets, ipv4_raw, port_raw, scope,
};

use crate::{
    model::{Changes, Desired, DesiredFrontend, Endpoint, FrontendAddr, Model, Protocol, Scope},
    problem::{Invalid, Problem},
    state::{Mirror, Op, SourceRange, identity, name_digest},
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
    pub addr: FrontendAddr,
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
    /// Frontends' names (for inspection only: written after the units, so
    /// that a failure never holds a frontend back).
    pub names: Vec<Op>,
    pub cleanup: Vec<Op>,
}

impl Plan {
    /// Every write, in the order they are applied.
    pub fn ops(&self) -> Vec<Op> {
        self.service_addrs
            .iter()
            .copied()
            .chain(self.frontends.iter().flat_map(|f| f.writes.iter().copied()))
            .chain(self.names.iter().copied())
            .chain(self.cleanup.iter().copied())
            .collect()
    }
}

/// The writes that bring what `changes` names from `model` into
/// `current`: O(changed). Frontends that could not be programmed come back
/// with their problem (a frontend over a limit keeps what it has).
pub fn plan(
    model: &impl Wanted,
    changes: &Changes,
    current: &Mirror,
) -> (Plan, Vec<CapacityProblem>) {
    let mut planner = Planner::new(current);
    for addr in &changes.frontends {
        planner.frontend(addr, model.frontend(addr));
    }
    for ip in &changes.service_addrs {
        planner.service_addr(*ip, model.is_service_addr(ip));
    }
    planner.finish()
}

/// The writes that turn `current` into everything `model` holds: every
/// frontend of either, every service address, and whatever no frontend owns
/// (what a crash between two writes, or a write behind the agent's back,
/// may have left). The periodic full recompute; a difference it finds is
/// drift.
pub fn full_plan(model: &impl Wanted, current: &Mirror) -> (Plan, Vec<CapacityProblem>) {
    let mut planner = Planner::new(current);
    let mut wanted = BTreeSet::new();
    for (addr, frontend) in model.each_frontend() {
        wanted.insert(frontend_key(addr));
        planner.frontend(addr, Some(frontend));
    }
    let state = current.state();
    for (key, old) in &state.frontends {
        if !wanted.contains(key) {
            planner.remove(*key, old);
        }
    }
    // Slots, source ranges and names of no frontend.
    let ids: BTreeSet<u32> = state.frontends.values().map(|f| f.id).collect();
    planner.cleanup.slots.extend(
        state
            .frontend_names
            .keys()
            .filter(|id| !ids.contains(id))
            .map(|id| Op::DeleteFrontendName(*id)),
    );
    planner.cleanup.slots.extend(
        state
            .slots
            .keys()
            .filter(|key| !ids.contains(&key.frontend_id))
            .map(|key| Op::DeleteSlot(*key)),
    );
    planner.cleanup.source_ranges.extend(
        state
            .source_ranges
            .iter()
            .filter(|(key, _)| !ids.contains(&key.frontend_id))
            .map(|range| Op::DeleteSourceRange(*range)),
    );
    let wanted_addrs = model.service_addrs();
    let have: BTreeSet<Ipv4Addr> = state
        .service_addrs
        .iter()
        .map(|raw| Ipv4Addr::from(ipv4_octets(*raw)))
        .collect();
    for ip in wanted_addrs.union(&have) {
        planner.service_addr(*ip, wanted_addrs.contains(ip));
    }
    planner.finish()
}

/// What the diff programs: the model as it is kept ([`Model`]), or as one
/// value ([`Desired`]).
pub trait Wanted {
    /// The frontend to program at `addr`.
    fn frontend(&self, addr: &FrontendAddr) -> Option<&DesiredFrontend>;
    fn each_frontend(&self) -> Box<dyn Iterator<Item = (&FrontendAddr, &DesiredFrontend)> + '_>;
    /// Whether `ip` is an address only Services use.
    fn is_service_addr(&self, ip: &Ipv4Addr) -> bool;
    fn service_addrs(&self) -> BTreeSet<Ipv4Addr>;
}

impl Wanted for Model {
    fn frontend(&self, addr: &FrontendAddr) -> Option<&DesiredFrontend> {
        Model::frontend(self, addr)
    }
    fn each_frontend(&self) -> Box<dyn Iterator<Item = (&FrontendAddr, &DesiredFrontend)> + '_> {
        Box::new(self.frontends())
    }
    fn is_service_addr(&self, ip: &Ipv4Addr) -> bool {
        Model::is_service_addr(self, ip)
    }
    fn service_addrs(&self) -> BTreeSet<Ipv4Addr> {
        Model::service_addrs(self)
    }
}

impl Wanted for Desired {
    fn frontend(&self, addr: &FrontendAddr) -> Option<&DesiredFrontend> {
        self.frontends.get(addr)
    }
    fn each_frontend(&self) -> Box<dyn Iterator<Item = (&FrontendAddr, &DesiredFrontend)> + '_> {
        Box::new(self.frontends.iter())
    }
    fn is_service_addr(&self, ip: &Ipv4Addr) -> bool {
        self.service_addrs.contains(ip)
    }
    fn service_addrs(&self) -> BTreeSet<Ipv4Addr> {
        self.service_addrs.clone()
    }
}

/// The Service object a `namespace/name:port` names, as problems name it.
pub fn service_object(service_port: &str) -> String {
    let service = service_port.split(':').next().unwrap_or(service_port);
    format!("Service {service}")
}

/// A frontend that could not be programmed, and why.
pub type CapacityProblem = (FrontendAddr, Problem);

/// Deletions, in the order they are applied: frontend entries first, then
/// what they pointed at.
#[derive(Default)]
struct Cleanup {
    frontends: Vec<Op>,
    source_ranges: Vec<Op>,
    slots: Vec<Op>,
    service_addrs: Vec<Op>,
}

/// Builds one plan, frontend by frontend.
struct Planner<'a> {
    current: &'a Mirror,
    ids: Ids<'a>,
    plan: Plan,
    cleanup: Cleanup,
    problems: Vec<CapacityProblem>,
    /// Backends this plan writes (each once).
    written: HashSet<u32>,
}

impl<'a> Planner<'a> {
    fn new(current: &'a Mirror) -> Self {
        Self {
            current,
            ids: Ids::new(current),
            plan: Plan::default(),
            cleanup: Cleanup::default(),
            problems: Vec::new(),
            written: HashSet::new(),
        }
    }

    fn finish(mut self) -> (Plan, Vec<CapacityProblem>) {
        let cleanup = self.cleanup;
        self.plan.cleanup = [
            cleanup.frontends,
            cleanup.source_ranges,
            cleanup.slots,
            cleanup.service_addrs,
        ]
        .concat();
        (self.plan, self.problems)
    }

    /// Address `ip` is (`wanted`) or is not one only Services use.
    fn service_addr(&mut self, ip: Ipv4Addr, wanted: bool) {
        let raw = ipv4_raw(ip.octets());
        match (wanted, self.current.state().service_addrs.contains(&raw)) {
            (true, false) => self.plan.service_addrs.push(Op::PutServiceAddr(raw)),
            (false, true) => self.cleanup.service_addrs.push(Op::DeleteServiceAddr(raw)),
            _ => {}
        }
    }

    /// Frontend `addr` becomes `desired`, or goes.
    fn frontend(&mut self, addr: &FrontendAddr, desired: Option<&DesiredFrontend>) {
        let key = frontend_key(addr);
        let old = self.current.state().frontends.get(&key);
        match (desired, old) {
            (Some(frontend), _) => self.program(addr, key, old, frontend),
            (None, Some(old)) => self.remove(key, old),
            (None, None) => {}
        }
    }

    /// A frontend that goes: its entry, then its source ranges and slots.
    fn remove(&mut self, key: FrontendKey, old: &Frontend) {
        self.cleanup.frontends.push(Op::DeleteFrontend(key));
        if self.current.state().frontend_names.contains_key(&old.id) {
            self.cleanup.slots.push(Op::DeleteFrontendName(old.id));
        }
        self.cleanup.source_ranges.extend(
            self.current
                .source_ranges_of(old.id)
                .map(|range| Op::DeleteSourceRange(*range)),
        );
        self.cleanup.slots.extend(
            self.current
                .slots_of_id(old.id)
                .map(|(key, _)| Op::DeleteSlot(*key)),
        );
    }

    /// The unit of writes that programs `frontend` at `addr`, and the
    /// deletions of what it no longer uses.
    fn program(
        &mut self,
        addr: &FrontendAddr,
        key: FrontendKey,
        old: Option<&Frontend>,
        frontend: &DesiredFrontend,
    ) {
        if frontend.tiers.len() > MAX_TIERS
            || frontend
                .tiers
                .iter()
                .any(|t| t.len() > usize::from(u16::MAX))
        {
            // What it serves now stays, whole.
            let what = format!("{addr} has more backends than a frontend holds");
            let problem = Problem::new(
                service_object(&frontend.service_port),
                Invalid::Capacity(what),
            );
            self.problems.push((*addr, problem));
            return;
        }
        let mut writes = Vec::new();
        // Backend ids, tier by tier.
        let tiers: Vec<Vec<u32>> = frontend
            .tiers
            .iter()
            .map(|tier| {
                tier.iter()
                    .map(|endpoint| {
                        let local = frontend.local.contains(&endpoint.ip);
                        let value = backend_value(endpoint, addr.protocol, local);
                        let (id, held) = self.ids.backend(value);
                        // New, or draining and back in service.
                        if held != Some(value) && self.written.insert(id) {
                            writes.push(Op::PutBackend(id, value));
                        }
                        id
                    })
                    .collect()
            })
            .collect();
        let id = old.map_or_else(|| self.ids.frontend(), |f| f.id);
        let state = self.current.state();
        let old_slots = old.map(|f| state.slots_of(f)).unwrap_or_default();
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
        let wanted_ranges: BTreeSet<SourceRange> = frontend
            .source_ranges
            .iter()
            .map(|range| source_range(id, *range))
            .collect();
        writes.extend(
            wanted_ranges
                .iter()
                .filter(|range| !state.source_ranges.contains(*range))
                .map(|range| Op::PutSourceRange(*range)),
        );
        let value = Frontend {
            id,
            tier_len,
            flags,
            affinity_timeout_s: frontend.affinity_timeout.unwrap_or(0),
        };
        let name = ServiceName::new(&frontend.service_port);
        if state.frontend_names.get(&id) != Some(&name_digest(&name)) {
            self.plan.names.push(Op::PutFrontendName(id, name));
        }
        if old != Some(&value) {
            writes.push(Op::PutFrontend(key, value));
        }
        if !writes.is_empty() {
            self.plan.frontends.push(FrontendWrites {
                addr: *addr,
                service_port: frontend.service_port.clone(),
                frontend_id: id,
                writes,
            });
        }
        // What it no longer uses: source ranges, slots beyond its count.
        if old.is_some() {
            self.cleanup.source_ranges.extend(
                self.current
                    .source_ranges_of(id)
                    .filter(|range| !wanted_ranges.contains(*range))
                    .map(|range| Op::DeleteSourceRange(*range)),
            );
            let count = value.slot_count();
            self.cleanup.slots.extend(
                self.current
                    .slots_of_id(id)
                    .filter(|(key, _)| key.slot >= count)
                    .map(|(key, _)| Op::DeleteSlot(*key)),
            );
        }
    }
}

/// The writes that flag draining the backends no slot holds: established
/// flows keep them until the conntrack walk finds none naming them (see
/// `sync`). Computed from what the maps hold, so a frontend whose writes
/// failed keeps its backends in service.
pub fn drains(mirror: &Mirror) -> Vec<Op> {
    let backends = &mirror.state().backends;
    mirror
        .unslotted()
        .iter()
        .filter_map(|id| Some((*id, *backends.get(id)?)))
        .map(|(id, b)| {
            Op::PutBackend(
                id,
                Backend {
                    flags: b.flags | backend_flags::DRAINING,
                    ..b
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
struct Ids<'a> {
    current: &'a Mirror,
    /// Backends new in this plan, by identity.
    new_backends: HashMap<Backend, (u32, Backend)>,
    next_backend: u32,
    next_frontend: u32,
}

impl<'a> Ids<'a> {
    fn new(current: &'a Mirror) -> Self {
        let state = current.state();
        Self {
            current,
            new_backends: HashMap::new(),
            next_backend: state.max_backend_id_in_use + 1,
            next_frontend: state.max_frontend_id_in_use + 1,
        }
    }

    /// The id of `backend`, and the value the maps (or this plan) hold
    /// under it (`None`: a new id).
    fn backend(&mut self, backend: Backend) -> (u32, Option<Backend>) {
        if let Some((id, held)) = self.current.backend(backend) {
            return (id, Some(held));
        }
        if let Some((id, held)) = self.new_backends.get(&identity(backend)) {
            return (*id, Some(*held));
        }
        let id = self.next_backend;
        self.next_backend += 1;
        self.new_backends.insert(identity(backend), (id, backend));
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
    use crate::state::State;

    /// Everything compared: the plan's writes in the order they are
    /// applied.
    fn diff(desired: &Desired, current: &State) -> (Vec<Op>, Vec<CapacityProblem>) {
        let (plan, problems) = full_plan(desired, &Mirror::new(current.clone()));
        (plan.ops(), problems)
    }

    /// The backends `state` would start draining.
    fn drains_of(state: &State) -> Vec<Op> {
        drains(&Mirror::new(state.clone()))
    }

    /// `ops` applied to `state`, then the drains they lead to.
    fn apply(state: &mut State, ops: &[Op]) {
        ops.iter().for_each(|op| state.apply(op));
        drains_of(state).iter().for_each(|op| state.apply(op));
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
                    local: Default::default(),
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
        let (plan, _) = full_plan(&desired, &Mirror::default());
        // Backends, slots, and each frontend's name and entry.
        assert_eq!(plan.ops().len(), 3 * 4 + 3 * 4 + 3 * 2);
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
            drains_of(&{
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
    fn a_frontend_is_named_renamed_and_unnamed_with_it() {
        let mut desired = cluster(2, 1);
        let mut state = synced(&desired);
        let id = state.frontends[&frontend_key(&frontend(1))].id;
        let name = |service_port: &str| name_digest(&ServiceName::new(service_port));
        assert_eq!(state.frontend_names[&id], name("default/svc-1:http"));
        // Renamed (a frontend another Service takes over): one write.
        desired
            .frontends
            .get_mut(&frontend(1))
            .unwrap()
            .service_port = "shop/web".into();
        let (ops, _) = diff(&desired, &state);
        assert_eq!(ops, [Op::PutFrontendName(id, ServiceName::new("shop/web"))]);
        apply(&mut state, &ops);
        assert!(diff(&desired, &state).0.is_empty(), "unchanged: no write");
        // Gone: its name goes after its entry; a stray name goes too.
        state.frontend_names.insert(999, name("default/old"));
        desired.frontends.remove(&frontend(1));
        let (ops, _) = diff(&desired, &state);
        let entry = ops
            .iter()
            .position(|op| matches!(op, Op::DeleteFrontend(..)));
        let unnamed = ops.iter().position(|op| *op == Op::DeleteFrontendName(id));
        assert!(entry < unnamed && unnamed.is_some(), "{ops:?}");
        assert!(ops.contains(&Op::DeleteFrontendName(999)));
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
    fn a_new_frontend_never_takes_the_id_of_stray_slots() {
        // Slots a unit wrote before its frontend entry failed (or a crash).
        let mut state = State::default();
        let stray = SlotKey {
            frontend_id: 1,
            slot: 0,
        };
        state.slots.insert(stray, 7);
        let desired = cluster(1, 2);
        let (ops, _) = diff(&desired, &state);
        apply(&mut state, &ops);
        let f = *state.frontends.values().next().unwrap();
        assert!(f.id > 1, "{f:?}");
        assert_eq!(state.slots_of(&f).len(), 2);
        assert!(!state.slots.contains_key(&stray), "the stray slot goes");
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
        desired.frontends.get_mut(&frontend(0)).unwrap().local =
            std::sync::Arc::new([endpoint(0).ip].into());
        let state = synced(&desired);
        let local: Vec<bool> = state
            .backends
            .values()
            .map(|b| b.flags & backend_flags::LOCAL != 0)
            .collect();
        assert_eq!(local, vec![true, false]);
    }
}
