//! One sync: the model's changes → diff → dataplane, with the problems
//! found on the way reported once each.
//!
//! A sync is O(changed): the model recomputes the Services a change
//! touched, and the diff writes only the frontends whose value changed,
//! against an in-memory record of what the maps hold ([`Mirror`]). A full
//! recompute — every frontend compared with the maps — runs after failed
//! writes and periodically; what it finds beyond the failures it retries is
//! drift, logged and counted, and fixed.
//!
//! Failures stay local: each frontend's writes are applied as a unit, and a
//! unit whose write fails (a full map) stops before its frontend entry, so
//! that frontend keeps serving what it served; the others go on. The sync
//! is then retried with backoff (100 ms, doubling, at most 1 s) until it
//! goes through.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use lb_common::backend_flags;

use crate::{
    Error,
    conntrack::Walk,
    dataplane::Dataplane,
    diff::{self, Plan, drains},
    model::{FrontendAddr, HealthCheck, Model, Node},
    problem::{Invalid, Problem},
    source::Snapshot,
    state::{Mirror, Op, State},
};

/// The first retry of a failed sync, doubled per failure up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Keeps a dataplane equal to what the model says.
pub struct Syncer<D> {
    dataplane: D,
    /// What the dataplane holds, as far as our writes went through.
    mirror: Mirror,
    model: Model,
    /// Frontends that could not be programmed (over a limit, a failed
    /// write), by address, until they are programmed again.
    unprogrammed: BTreeMap<FrontendAddr, Problem>,
    /// Their problems as last reported.
    reported_unprogrammed: BTreeSet<Problem>,
    /// Failed writes outside any frontend's unit, in the last sync.
    datapath_problems: BTreeSet<Problem>,
    /// Backends that no slot holds, by when they started draining.
    draining_since: BTreeMap<u32, Instant>,
    /// When a failed sync is due again, and the backoff that led there.
    retry: Option<(Instant, Duration)>,
}

/// From this many frontend units on, a plan's writes go in batches (see
/// `Syncer::apply_batched`).
const BATCH_FROM: usize = 64;

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    /// Writes that failed (their frontends kept their previous state).
    pub failed_writes: usize,
    /// Writes a full recompute found missing beyond the failures it
    /// retries: the maps had drifted from the record.
    pub drift: usize,
    /// Problems not seen before (or seen again after they went away).
    pub new_problems: Vec<Problem>,
    /// What the model decided on its own (allocations, Endpoints not
    /// mirrored), each told once.
    pub notices: Vec<String>,
    pub frontends: usize,
    pub backends: usize,
    /// The whole sync.
    pub duration: Duration,
    /// Of which: applying the rules to the changed Services (model),
    /// planning the writes (diff); the rest is map writes.
    pub model_duration: Duration,
    pub diff_duration: Duration,
    /// The healthCheckNodePorts this node must serve.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// How much a sync compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// What changed since the last sync.
    Changed,
    /// What failed before, again: the frontends whose unit failed, and
    /// everything at the first retry and when a write outside any unit
    /// failed.
    Retry,
    /// Everything, at the first sync: the maps may hold what no longer
    /// exists.
    Full,
    /// Everything, periodically: what it writes beyond the changes is
    /// drift.
    Check,
}

impl<D: Dataplane> Syncer<D> {
    /// Starts from what the dataplane holds (pinned maps of an earlier run
    /// are reconciled, not flushed), with `model` (empty: the source fills
    /// it).
    pub fn new(dataplane: D, model: Model) -> Result<Self, Error> {
        let mirror = Mirror::new(dataplane.read()?);
        let now = Instant::now();
        let draining_since = mirror
            .state()
            .backends
            .iter()
            .filter(|(_, b)| b.flags & backend_flags::DRAINING != 0)
            .map(|(id, _)| (*id, now))
            .collect();
        let mut syncer = Self {
            dataplane,
            mirror,
            model,
            unprogrammed: BTreeMap::new(),
            reported_unprogrammed: BTreeSet::new(),
            datapath_problems: BTreeSet::new(),
            draining_since,
            retry: None,
        };
        // Before the programs that read it are attached.
        syncer.fix_filter()?;
        Ok(syncer)
    }

    /// Re-reads the dataplane, so that writes made behind our back are
    /// corrected by the next full recompute.
    pub fn reread(&mut self) -> Result<(), Error> {
        let mut read = self.dataplane.read()?;
        // Ids named by conntrack are known from the walks, not the maps.
        let state = self.mirror.state();
        read.max_backend_id_in_use = read.max_backend_id_in_use.max(state.max_backend_id_in_use);
        read.max_frontend_id_in_use = read
            .max_frontend_id_in_use
            .max(state.max_frontend_id_in_use);
        self.mirror = Mirror::new(read);
        // Draining backends written behind our back drain from now.
        let now = Instant::now();
        for (id, backend) in &self.mirror.state().backends {
            if backend.flags & backend_flags::DRAINING != 0 {
                self.draining_since.entry(*id).or_insert(now);
            }
        }
        let backends = &self.mirror.state().backends;
        self.draining_since
            .retain(|id, _| backends.contains_key(id));
        self.fix_filter()
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// The model the sources' changes go into; [`Self::sync`] programs
    /// them.
    pub fn model(&mut self) -> &mut Model {
        &mut self.model
    }

    /// Whether a failed sync is due for its retry at `now`.
    pub fn retry_due(&self, now: Instant) -> bool {
        self.retry.is_some_and(|(at, _)| now >= at)
    }

    /// Makes the model hold exactly `snapshot` for `node`, and programs it
    /// (every object compared: for tests and one-shot callers).
    pub fn sync_snapshot(&mut self, snapshot: &Snapshot, node: &Node) -> SyncReport {
        self.model.set_node(node.clone());
        self.model.replace_all(snapshot);
        self.sync(Scope::Changed)
    }

    /// Programs the model's changes (`Scope::Changed`), or compares
    /// everything.
    pub fn sync(&mut self, scope: Scope) -> SyncReport {
        let started = Instant::now();
        let mut changes = self.model.update();
        let model_duration = started.elapsed();
        // A retry plans again what did not go through: the frontends whose
        // unit failed; everything at the first retry after failed writes,
        // and whenever a write outside any unit failed. (Not every retry:
        // while a map stays full they come every second.)
        let full = match scope {
            Scope::Changed => false,
            Scope::Retry => {
                !self.datapath_problems.is_empty()
                    || self
                        .retry
                        .is_some_and(|(_, backoff)| backoff == RETRY_FIRST)
            }
            Scope::Full | Scope::Check => true,
        };
        if scope == Scope::Retry {
            changes.frontends.extend(self.unprogrammed.keys().copied());
        }
        let (plan, unprogrammed) = diff::plan(&self.model, &changes, &self.mirror);
        for addr in &changes.frontends {
            self.unprogrammed.remove(addr);
        }
        let mut report = SyncReport {
            model_duration,
            ..SyncReport::default()
        };
        let mut datapath_problems = BTreeSet::new();
        self.apply(&plan, unprogrammed, &mut report, &mut datapath_problems);
        if full {
            // Everything else is as the record says, or the record is off.
            self.unprogrammed.clear();
            let (full, unprogrammed) = diff::full_plan(&self.model, &self.mirror);
            let before = report.writes;
            self.apply(&full, unprogrammed, &mut report, &mut datapath_problems);
            if scope == Scope::Check {
                report.drift = report.writes - before;
            }
        }
        report.diff_duration = started.elapsed() - model_duration;
        self.retry = match (report.failed_writes, self.retry) {
            (0, _) => None,
            (_, None) => Some((Instant::now() + RETRY_FIRST, RETRY_FIRST)),
            (_, Some((_, backoff))) => {
                let backoff = (backoff * 2).min(RETRY_MAX);
                Some((Instant::now() + backoff, backoff))
            }
        };
        report.new_problems.extend(self.model.take_new_problems());
        report.notices = self.model.take_notices();
        let unprogrammed: BTreeSet<Problem> = self.unprogrammed.values().cloned().collect();
        report.new_problems.extend(
            unprogrammed
                .difference(&self.reported_unprogrammed)
                .cloned(),
        );
        self.reported_unprogrammed = unprogrammed;
        // Failed writes outside any unit are known until a full pass goes
        // through without them.
        report.new_problems.extend(
            datapath_problems
                .difference(&self.datapath_problems)
                .cloned(),
        );
        if full {
            self.datapath_problems = datapath_problems;
        } else {
            self.datapath_problems.extend(datapath_problems);
        }
        report.new_problems.sort();
        report.new_problems.dedup();
        report.frontends = self.mirror.state().frontends.len();
        report.backends = self.mirror.state().backends.len();
        report.health_checks = self.model.health_checks();
        report.duration = started.elapsed();
        report
    }

    /// Applies a plan: the service addresses, each frontend's unit, the
    /// cleanup (held back for frontends whose unit or whose deletion
    /// failed), then the drains and affinity entries it leads to.
    fn apply(
        &mut self,
        plan: &Plan,
        unprogrammed: Vec<diff::CapacityProblem>,
        report: &mut SyncReport,
        problems: &mut BTreeSet<Problem>,
    ) {
        let forget = affinity_to_forget(&plan.ops(), self.mirror.state());
        // Every address the units add passes the pre-filter first, in one
        // write; what fails here is written op by op below.
        let words = self
            .mirror
            .filter_before_all(plan.frontends.iter().flat_map(|unit| &unit.writes));
        let filters_written = self.write_filters(words).is_ok();
        let mut held = BTreeSet::new();
        self.unprogrammed.extend(unprogrammed);
        self.write_all(&plan.service_addrs, report, problems);
        let batched = filters_written
            && plan.frontends.len() >= BATCH_FROM
            && self.apply_batched(&plan.frontends, report);
        for unit in plan.frontends.iter().filter(|_| !batched) {
            let (done, failure) = self.apply_unit(&unit.writes);
            report.writes += done;
            if let Some(err) = failure {
                report.failed_writes += 1;
                held.insert(unit.frontend_id);
                let problem = Problem::new(
                    diff::service_object(&unit.service_port),
                    Invalid::Capacity(format!("{}: {err}", unit.service_port)),
                );
                self.unprogrammed.insert(unit.addr, problem);
            }
        }
        // Names serve inspection only: one that fails is a datapath problem
        // the next full recompute writes again.
        self.write_all(&plan.names, report, problems);
        // A frontend whose unit failed keeps its slots and ranges as they
        // are, and so does one whose entry could not be deleted (it still
        // points at them); the backends no slot holds any more drain.
        for op in &plan.cleanup {
            let id = match op {
                Op::DeleteSlot(key) => Some(key.frontend_id),
                Op::DeleteSourceRange((key, _)) => Some(key.frontend_id),
                Op::DeleteFrontendName(id) => Some(*id),
                _ => None,
            };
            if id.is_some_and(|id| held.contains(&id)) {
                continue;
            }
            let deleting = match op {
                Op::DeleteFrontend(key) => self.mirror.state().frontends.get(key).map(|f| f.id),
                _ => None,
            };
            if !self.write_all(std::slice::from_ref(op), report, problems) {
                held.extend(deleting);
            }
        }
        let drains = drains(&self.mirror);
        self.write_all(&drains, report, problems);
        if !forget.is_empty()
            && let Err(err) = self.dataplane.forget_affinity(&forget)
        {
            report.failed_writes += 1;
            problems.insert(Problem::new(
                "affinity entries",
                Invalid::Capacity(err.to_string()),
            ));
        }
    }

    /// Applies `ops` one by one, each failure a problem; whether all went
    /// through.
    fn write_all(
        &mut self,
        ops: &[Op],
        report: &mut SyncReport,
        problems: &mut BTreeSet<Problem>,
    ) -> bool {
        // Many writes of one kind (a cold sync's names and service
        // addresses) in one batch; one by one when it fails, or when a
        // write also needs a pre-filter word.
        let batchable = ops.len() >= BATCH_FROM
            && ops.iter().all(|op| {
                std::mem::discriminant(op) == std::mem::discriminant(&ops[0])
                    && self.mirror.filter_before(op).is_none()
                    && self.mirror.removed_addr(op).is_none()
            });
        let mut done = 0;
        if batchable {
            done = match self.dataplane.write_batch(ops) {
                Ok(()) => ops.len(),
                Err(written) => written.min(ops.len()),
            };
            ops[..done].iter().for_each(|op| self.written(op));
            report.writes += done;
        }
        let mut all = true;
        for op in &ops[done..] {
            match self.write(op) {
                Ok(()) => report.writes += 1,
                Err(err) => {
                    all = false;
                    report.failed_writes += 1;
                    problems.insert(Problem::new(
                        "xlb datapath",
                        Invalid::Capacity(format!("{op:?}: {err}")),
                    ));
                }
            }
        }
        all
    }

    /// Applies one frontend's writes until one fails; a slot is never
    /// written before its backend is in the maps and in service (another
    /// unit may have failed to write, or to bring back, a backend they
    /// share). Returns the writes made, and the failure that stopped the
    /// unit.
    fn apply_unit(&mut self, writes: &[Op]) -> (usize, Option<Error>) {
        for (done, op) in writes.iter().enumerate() {
            let in_service = |id| {
                self.mirror
                    .state()
                    .backends
                    .get(id)
                    .is_some_and(|b: &lb_common::Backend| b.flags & backend_flags::DRAINING == 0)
            };
            if let Op::PutSlot(_, id) = op
                && !in_service(id)
            {
                return (done, Some(Error::MissingBackend(*id)));
            }
            if let Err(err) = self.write(op) {
                return (done, Some(err));
            }
        }
        (writes.len(), None)
    }

    /// One write, mirrored when it went through. A new address is let
    /// through the pre-filter before the entry that needs it; an address
    /// removed leaves it after its entry.
    fn write(&mut self, op: &Op) -> Result<(), Error> {
        if let Some((index, word)) = self.mirror.filter_before(op) {
            self.write_filter(index, word)?;
        }
        let removed = self.mirror.removed_addr(op);
        self.dataplane.write(op)?;
        self.written(op);
        if let Some((index, word)) = removed.and_then(|removed| self.mirror.filter_after(removed)) {
            // A bit left set only costs lookups: the next full check
            // clears it.
            let _ = self.write_filter(index, word);
        }
        Ok(())
    }

    /// Records a write the maps took.
    fn written(&mut self, op: &Op) {
        self.mirror.apply(op);
        match *op {
            Op::PutBackend(id, backend) if backend.flags & backend_flags::DRAINING != 0 => {
                self.draining_since.entry(id).or_insert_with(Instant::now);
            }
            Op::PutBackend(id, _) | Op::DeleteBackend(id) => {
                self.draining_since.remove(&id);
            }
            _ => {}
        }
    }

    /// Applies a large plan's units (a cold sync, a re-list) a kind of
    /// write at a time: every unit's backends in one batch, then their
    /// slots, their source ranges, their frontend entries — each unit's
    /// order is kept, so a frontend still never points at what is not
    /// there yet. Whether it all went in; if not, the caller applies the
    /// units one by one (the writes are idempotent), so a failure stays
    /// with its frontend as in a small plan.
    fn apply_batched(&mut self, units: &[diff::FrontendWrites], report: &mut SyncReport) -> bool {
        let ops = || units.iter().flat_map(|unit| unit.writes.iter());
        // Every pre-filter word the units need was written before.
        if ops().any(|op| self.mirror.filter_before(op).is_some()) {
            return false;
        }
        let kinds: [fn(&Op) -> bool; 4] = [
            |op| matches!(op, Op::PutBackend(..)),
            |op| matches!(op, Op::PutSlot(..)),
            |op| matches!(op, Op::PutSourceRange(..)),
            |op| matches!(op, Op::PutFrontend(..)),
        ];
        if ops().any(|op| !kinds.iter().any(|kind| kind(op))) {
            return false;
        }
        let mut writes = 0;
        for kind in kinds {
            let batch: Vec<Op> = ops().filter(|op| kind(op)).copied().collect();
            // A slot only for a backend in the maps and in service.
            let unserved = batch.iter().any(|op| match op {
                Op::PutSlot(_, id) => self
                    .mirror
                    .state()
                    .backends
                    .get(id)
                    .is_none_or(|b| b.flags & backend_flags::DRAINING != 0),
                _ => false,
            });
            if unserved {
                return false;
            }
            // What went in before a failure is recorded: the units then
            // go one by one, and the record must hold what the maps do.
            let written = match self.dataplane.write_batch(&batch) {
                Ok(()) => batch.len(),
                Err(done) => done.min(batch.len()),
            };
            batch[..written].iter().for_each(|op| self.written(op));
            if written < batch.len() {
                return false;
            }
            writes += batch.len();
        }
        report.writes += writes;
        true
    }

    fn write_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
        self.dataplane.write_filter(index, word)?;
        self.mirror.filter_written(index, word);
        Ok(())
    }

    /// Writes every pre-filter word that differs from what the maps'
    /// addresses need: at the start, after a re-read.
    fn fix_filter(&mut self) -> Result<(), Error> {
        let words = self.mirror.filter_drift();
        self.write_filters(words)
    }

    /// Writes pre-filter words, at once where the dataplane can; when that
    /// fails part-way, word by word, so that the record says exactly what
    /// was written.
    fn write_filters(&mut self, words: Vec<(u32, u64)>) -> Result<(), Error> {
        if self.dataplane.write_filters(&words).is_ok() {
            for (index, word) in words {
                self.mirror.filter_written(index, word);
            }
            return Ok(());
        }
        let mut failure = Ok(());
        for (index, word) in words {
            if let Err(err) = self.write_filter(index, word) {
                failure = Err(err);
            }
        }
        failure
    }

    /// Takes in a conntrack walk that started at `started`: ids its live
    /// entries name are never handed out again, and draining backends that
    /// drained before it started and that no entry names are deleted.
    /// Returns how many were.
    pub fn conntrack_walked(&mut self, started: Instant, walk: &Walk) -> usize {
        let max_backend = walk.backends.last().copied().unwrap_or(0);
        self.mirror.ids_in_use(max_backend, walk.max_frontend_id);
        let unused: Vec<u32> = self
            .draining_since
            .iter()
            .filter(|(id, since)| {
                **since < started && !walk.backends.contains(id) && !self.mirror.is_slotted(**id)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut deleted = 0;
        for id in unused {
            // A failed delete is tried again after the next walk.
            if self.write(&Op::DeleteBackend(id)).is_ok() {
                deleted += 1;
            }
        }
        deleted
    }
}

/// The frontends whose affinity entries must go once `ops` are applied to
/// `current`: deleted ones, and ones whose affinity is turned off.
fn affinity_to_forget(ops: &[Op], current: &State) -> BTreeSet<u32> {
    ops.iter()
        .filter_map(|op| match op {
            Op::DeleteFrontend(key) => current.frontends.get(key).map(|f| f.id),
            Op::PutFrontend(key, new) if new.affinity_timeout_s == 0 => current
                .frontends
                .get(key)
                .filter(|old| old.affinity_timeout_s != 0)
                .map(|old| old.id),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse_into;

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.1.1]}]\n";
    const BAD: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: nope, ports: [{port: 80}]}\n";

    fn snapshot(text: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        parse_into("test", text, &mut snapshot);
        snapshot
    }

    #[test]
    fn problems_are_reported_once_and_again_after_a_fix() {
        let mut syncer = Syncer::new(State::default(), Model::new(Node::default())).unwrap();
        let node = Node::default();
        let bad = snapshot(&format!("{GOOD}{BAD}"));
        let first = syncer.sync_snapshot(&bad, &node);
        assert_eq!(first.new_problems.len(), 1);
        assert_eq!(first.frontends, 1, "the good Service is programmed");
        assert!(syncer.sync_snapshot(&bad, &node).new_problems.is_empty());
        assert!(
            syncer
                .sync_snapshot(&snapshot(GOOD), &node)
                .new_problems
                .is_empty()
        );
        assert_eq!(syncer.sync_snapshot(&bad, &node).new_problems.len(), 1);
    }

    #[test]
    fn a_restart_reconciles_instead_of_flushing() {
        let node = Node::default();
        let mut first = Syncer::new(State::default(), Model::new(Node::default())).unwrap();
        first.sync_snapshot(&snapshot(GOOD), &node);
        let maps = first.dataplane().clone();
        let mut second = Syncer::new(maps, Model::new(Node::default())).unwrap();
        assert_eq!(second.sync_snapshot(&snapshot(GOOD), &node).writes, 0);
    }
}

#[cfg(test)]
mod transitions {
    //! A Service through every type and back, and ports coming and going:
    //! after each step the maps hold exactly what a fresh sync would.

    use super::*;
    use crate::{model::Desired, source::file::parse_into};

    fn service(type_and_extra: &str, ports: &str) -> Snapshot {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.1\n  ports: {ports}\n{type_and_extra}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: a, port: 8080}}, {{name: b, port: 9090}}]\nendpoints: [{{addresses: [10.244.1.1]}}, {{addresses: [10.244.2.1]}}]\n"
        );
        let mut snapshot = Snapshot::default();
        parse_into("test", &text, &mut snapshot);
        assert!(snapshot.problems.is_empty(), "{:?}", snapshot.problems);
        snapshot
    }

    /// What the maps serve, as the model's dump would print it.
    fn served(state: &State) -> Vec<(lb_common::FrontendKey, usize)> {
        state
            .frontends
            .iter()
            .map(|(k, f)| (*k, state.slots_of(f).len()))
            .collect()
    }

    fn fresh(desired_snapshot: &Snapshot, node: &Node) -> State {
        let mut syncer = Syncer::new(State::default(), Model::new(Node::default())).unwrap();
        syncer.sync_snapshot(desired_snapshot, node);
        syncer.dataplane().clone()
    }

    /// The addresses only Services use follow the Service: ClusterIP and
    /// LoadBalancer IP in, the node's own address (its NodePorts) never.
    #[test]
    fn service_addresses_are_the_services_own() {
        let node = Node {
            name: "node1".into(),
            zone: None,
            ips: vec!["192.168.77.11".parse().unwrap()],
        };
        let one_port = "[{name: a, port: 80, nodePort: 30080}]";
        let lb = "  type: LoadBalancer\nstatus: {loadBalancer: {ingress: [{ip: 172.18.0.1}]}}";
        let mut syncer = Syncer::new(State::default(), Model::new(Node::default())).unwrap();
        let addrs = |syncer: &Syncer<State>| -> Vec<std::net::Ipv4Addr> {
            let mut addrs: Vec<std::net::Ipv4Addr> = syncer
                .dataplane()
                .service_addrs
                .iter()
                .map(|a| lb_common::ipv4_octets(*a).into())
                .collect();
            addrs.sort();
            addrs
        };
        syncer.sync_snapshot(&service(lb, one_port), &node);
        assert_eq!(
            addrs(&syncer),
            [
                "10.96.0.1".parse::<std::net::Ipv4Addr>().unwrap(),
                "172.18.0.1".parse().unwrap()
            ]
        );
        syncer.sync_snapshot(&service("  type: NodePort", one_port), &node);
        assert_eq!(
            addrs(&syncer),
            ["10.96.0.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        syncer.sync_snapshot(&Snapshot::default(), &node);
        assert!(addrs(&syncer).is_empty());
    }

    #[test]
    fn every_type_and_back_and_ports_added_and_removed() {
        let node = Node {
            name: "node1".into(),
            zone: None,
            ips: vec!["192.168.77.11".parse().unwrap()],
        };
        let one_port = "[{name: a, port: 80, nodePort: 30080}]";
        let two_ports =
            "[{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30081}]";
        let lb = "  type: LoadBalancer\nstatus: {loadBalancer: {ingress: [{ip: 172.18.0.1}]}}";
        // Frontends per port: the ClusterIP, and each external address
        // twice (for external clients and for pods).
        let steps = [
            ("ClusterIP", service("  type: ClusterIP", one_port), 1),
            ("NodePort", service("  type: NodePort", one_port), 3),
            (
                "NodePort, port added",
                service("  type: NodePort", two_ports),
                6,
            ),
            ("LoadBalancer", service(lb, two_ports), 10),
            ("LoadBalancer, port removed", service(lb, one_port), 5),
            (
                "ExternalName",
                service(
                    "  type: ExternalName\n  externalName: example.com",
                    one_port,
                ),
                0,
            ),
            (
                "back to ClusterIP",
                service("  type: ClusterIP", one_port),
                1,
            ),
        ];
        let mut syncer = Syncer::new(State::default(), Model::new(Node::default())).unwrap();
        for (step, snapshot, frontends) in steps {
            syncer.sync_snapshot(&snapshot, &node);
            let state = syncer.dataplane();
            assert_eq!(state.frontends.len(), frontends, "{step}");
            assert_eq!(served(state), served(&fresh(&snapshot, &node)), "{step}");
            // Nothing left behind: every slot belongs to a frontend, every
            // backend to a slot.
            let slots: usize = state
                .frontends
                .values()
                .map(|f| state.slots_of(f).len())
                .sum();
            assert_eq!(state.slots.len(), slots, "{step}: stray slots");
            let used: std::collections::BTreeSet<u32> = state.slots.values().copied().collect();
            assert_eq!(
                state
                    .backends
                    .iter()
                    .filter(|(_, b)| b.flags & backend_flags::DRAINING == 0)
                    .map(|(id, _)| *id)
                    .collect::<std::collections::BTreeSet<_>>(),
                used,
                "{step}: stray backends (the others drain)"
            );
            let (desired, _): (Desired, _) = crate::model::desired(&snapshot, &node, None);
            assert_eq!(desired.frontends.len(), frontends, "{step}");
        }
    }
}

#[cfg(test)]
mod affinity {
    use lb_common::{Frontend, FrontendKey};

    use super::*;

    #[test]
    fn entries_go_with_their_frontend_or_their_affinity() {
        let key = |port| FrontendKey {
            port,
            ..FrontendKey::default()
        };
        let sticky = |id| Frontend {
            id,
            affinity_timeout_s: 10,
            ..Frontend::default()
        };
        let mut current = State::default();
        current.frontends.insert(key(1), sticky(1));
        current.frontends.insert(key(2), sticky(2));
        current.frontends.insert(key(3), sticky(3));
        let ops = [
            Op::DeleteFrontend(key(1)),
            Op::PutFrontend(
                key(2),
                Frontend {
                    id: 2,
                    ..Frontend::default()
                },
            ),
            Op::PutFrontend(
                key(3),
                Frontend {
                    affinity_timeout_s: 20,
                    ..sticky(3)
                },
            ),
        ];
        assert_eq!(affinity_to_forget(&ops, &current), BTreeSet::from([1, 2]));
    }
}

#[cfg(test)]
mod failures {
    //! Sync failures stay local, and draining backends stay while
    //! conntrack names them: a dataplane that fails the writes a test
    //! chooses.

    use std::{net::Ipv4Addr, time::Instant};

    use lb_common::{Backend, ipv4_raw};

    use super::*;
    use crate::source::file::parse_into;

    /// In-memory maps whose writes fail while `fails` says so, as a full
    /// map refuses new entries.
    struct Flaky {
        state: State,
        fails: fn(&Op) -> bool,
        /// Batches written (each a kind of write for many frontends).
        batches: usize,
    }

    impl Dataplane for Flaky {
        fn read(&self) -> Result<State, Error> {
            Ok(self.state.clone())
        }

        fn write(&mut self, op: &Op) -> Result<(), Error> {
            if (self.fails)(op) {
                let io_error = std::io::Error::from_raw_os_error(libc::E2BIG);
                let source = aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error,
                });
                return Err(Error::Map {
                    name: "test",
                    source,
                });
            }
            self.state.apply(op);
            Ok(())
        }

        fn write_batch(&mut self, ops: &[Op]) -> Result<(), usize> {
            self.batches += 1;
            for (done, op) in ops.iter().enumerate() {
                self.write(op).map_err(|_| done)?;
            }
            Ok(())
        }

        fn write_filter(&mut self, index: u32, word: u64) -> Result<(), Error> {
            self.state.write_filter(index, word)
        }

        fn forget_affinity(&mut self, _: &BTreeSet<u32>) -> Result<(), Error> {
            Ok(())
        }
    }

    /// A syncer over empty in-memory maps whose writes fail while `fails`
    /// says so.
    fn flaky(fails: fn(&Op) -> bool) -> Syncer<Flaky> {
        Syncer::new(
            Flaky {
                state: State::default(),
                fails,
                batches: 0,
            },
            Model::new(Node::default()),
        )
        .unwrap()
    }

    /// `count` Services over 2 endpoints each (10.244.x.1-2), as YAML.
    fn many(count: u32) -> Snapshot {
        let mut yaml = String::new();
        for i in 0..count {
            yaml.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.244.{}.1]}}, {{addresses: [10.244.{}.2]}}]\n---\n",
                i / 250,
                i % 250 + 1,
                i % 250,
                i % 250,
            ));
        }
        let mut snapshot = Snapshot::default();
        parse_into("test", &yaml, &mut snapshot);
        snapshot
    }

    #[test]
    fn a_large_plan_goes_in_batches_and_a_failed_batch_unit_by_unit() {
        let snapshot = many(200);
        // Nothing fails: a batch per kind (service addresses; backends,
        // slots, ranges, entries; names).
        let mut syncer = flaky(|_| false);
        let report = syncer.sync_snapshot(&snapshot, &Node::default());
        assert_eq!(syncer.dataplane().batches, 6);
        assert_eq!((report.failed_writes, report.frontends), (0, 200));
        let reference = syncer.dataplane().state.clone();
        // One backend cannot be written: the batch fails, the units go
        // one by one, and only the frontend of that backend is held back.
        let mut syncer =
            flaky(|op| matches!(op, Op::PutBackend(_, b) if b.addr == ipv4_raw([10, 244, 7, 1])));
        let report = syncer.sync_snapshot(&snapshot, &Node::default());
        assert_eq!(
            syncer.dataplane().batches,
            3,
            "service addresses, the backends' (failed), names"
        );
        assert!(report.failed_writes > 0);
        let held: Vec<_> = report
            .new_problems
            .iter()
            .map(|p| p.object.clone())
            .collect();
        assert!(held.iter().all(|o| o == "Service default/s7"), "{held:?}");
        assert_eq!(report.frontends, 199);
        let programmed = &syncer.dataplane().state;
        assert_eq!(
            programmed.frontends.len() + 1,
            reference.frontends.len(),
            "all but one"
        );
        // The record holds what the maps hold, the batch's written prefix
        // included.
        let record = syncer.mirror.state();
        assert_eq!(record.backends, programmed.backends);
        assert_eq!(record.slots, programmed.slots);
        assert_eq!(record.frontends, programmed.frontends);
    }

    /// Services `a` (10.96.0.1) over 10.244.1.1 and `b` (10.96.0.2) over
    /// `b_endpoints`.
    fn snapshot(b_endpoints: &[&str]) -> Snapshot {
        let service = |name: &str, ip: &str, endpoints: &[&str]| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{}]\n---\n",
                endpoints
                    .iter()
                    .map(|e| format!("{{addresses: [{e}]}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let text =
            service("a", "10.96.0.1", &["10.244.1.1"]) + &service("b", "10.96.0.2", b_endpoints);
        let mut snapshot = Snapshot::default();
        parse_into("test", &text, &mut snapshot);
        snapshot
    }

    fn is_backend(op: &Op, ip: [u8; 4]) -> bool {
        matches!(op, Op::PutBackend(_, b) if b.addr == ipv4_raw(ip))
    }

    /// The addresses of the backends in frontend `vip`'s slots.
    fn served(state: &State, vip: [u8; 4]) -> Vec<Ipv4Addr> {
        let frontend = state
            .frontends
            .iter()
            .find(|(k, _)| k.addr == ipv4_raw(vip))
            .map(|(_, f)| *f)
            .expect("frontend");
        state
            .slots_of(&frontend)
            .iter()
            .map(|id| Ipv4Addr::from(lb_common::ipv4_octets(state.backends[id].addr)))
            .collect()
    }

    #[test]
    fn a_failed_write_keeps_its_frontend_as_it_was_and_the_others_go_on() {
        let node = Node::default();
        let mut syncer = flaky(|_| false);
        syncer.sync_snapshot(&snapshot(&["10.244.2.1"]), &node);
        // The backends map is full: b's new endpoint cannot be written.
        syncer.dataplane.fails = |op| is_backend(op, [10, 244, 2, 2]);
        let report = syncer.sync_snapshot(&snapshot(&["10.244.2.1", "10.244.2.2"]), &node);
        assert_eq!(report.failed_writes, 1);
        let state = &syncer.dataplane().state;
        assert_eq!(
            served(state, [10, 96, 0, 2]),
            ["10.244.2.1".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(state.slots.len(), 2, "no slot without its backend");
        let problem = &report.new_problems[0];
        assert_eq!(
            problem.object, "Service default/b",
            "reported on its Service"
        );
        assert_eq!(problem.reason.label(), "capacity");
        // Retried with backoff, within a second.
        assert!(!syncer.retry_due(Instant::now()));
        assert!(syncer.retry_due(Instant::now() + Duration::from_millis(100)));
        // The map has room again: the retry completes b.
        syncer.dataplane.fails = |_| false;
        let report = syncer.sync(Scope::Retry);
        assert_eq!(report.failed_writes, 0);
        assert_eq!(served(&syncer.dataplane().state, [10, 96, 0, 2]).len(), 2);
        assert!(!syncer.retry_due(Instant::now() + Duration::from_secs(5)));
    }

    /// b goes from [.1, .2, .3] to [.2, .4] and .4 cannot be written: b
    /// keeps serving all three, none drains, no slot of it is deleted.
    #[test]
    fn a_failed_unit_keeps_its_old_slots_and_backends() {
        let node = Node::default();
        let mut syncer = flaky(|_| false);
        syncer.sync_snapshot(
            &snapshot(&["10.244.2.1", "10.244.2.2", "10.244.2.3"]),
            &node,
        );
        syncer.dataplane.fails = |op| is_backend(op, [10, 244, 2, 4]);
        let report = syncer.sync_snapshot(&snapshot(&["10.244.2.2", "10.244.2.4"]), &node);
        assert_eq!(report.failed_writes, 1);
        let state = &syncer.dataplane().state;
        let mut served = served(state, [10, 96, 0, 2]);
        served.sort();
        let want: Vec<Ipv4Addr> = ["10.244.2.1", "10.244.2.2", "10.244.2.3"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        assert_eq!(served, want);
        assert!(
            state
                .backends
                .values()
                .all(|b| b.flags & backend_flags::DRAINING == 0),
            "{state:?}"
        );
    }

    #[test]
    fn a_backend_two_frontends_share_is_never_slotted_when_its_write_failed() {
        let node = Node::default();
        let mut syncer = flaky(|op| is_backend(op, [10, 244, 1, 1]));
        // a and b both over 10.244.1.1: its one write fails in a's unit,
        // and b's unit must not slot it either.
        let report = syncer.sync_snapshot(&snapshot(&["10.244.1.1"]), &node);
        assert_eq!(report.failed_writes, 2);
        let state = &syncer.dataplane().state;
        assert!(state.frontends.is_empty(), "{state:?}");
        assert!(state.slots.is_empty(), "{state:?}");
    }

    #[test]
    fn a_frontend_whose_deletion_failed_keeps_its_slots() {
        let node = Node::default();
        let mut syncer = flaky(|_| false);
        syncer.sync_snapshot(&snapshot(&["10.244.2.1"]), &node);
        // b goes, and its entry cannot be deleted: it still points at its
        // slots, which must stay.
        syncer.dataplane.fails = |op| matches!(op, Op::DeleteFrontend(..));
        // (a without its slice, so it keeps no slot either.)
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let mut only_a = Snapshot::default();
        parse_into("test", text, &mut only_a);
        let report = syncer.sync_snapshot(&only_a, &node);
        assert_eq!(report.failed_writes, 1);
        let state = &syncer.dataplane().state;
        assert_eq!(
            served(state, [10, 96, 0, 2]),
            ["10.244.2.1".parse::<Ipv4Addr>().unwrap()]
        );
        // Once the map lets go, a retry finishes the job.
        syncer.dataplane.fails = |_| false;
        assert_eq!(syncer.sync(Scope::Retry).failed_writes, 0);
        let state = &syncer.dataplane().state;
        assert_eq!(state.frontends.len(), 1, "a's alone: {state:?}");
        assert!(state.slots.is_empty(), "{state:?}");
    }

    #[test]
    fn backoff_doubles_up_to_a_second() {
        let node = Node::default();
        let mut syncer = flaky(|op| matches!(op, Op::PutFrontend(..)));
        let mut waits = Vec::new();
        syncer.sync_snapshot(&snapshot(&["10.244.2.1"]), &node);
        waits.push(syncer.retry.unwrap().1.as_millis());
        for _ in 0..5 {
            syncer.sync(Scope::Retry);
            waits.push(syncer.retry.unwrap().1.as_millis());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn a_draining_backend_stays_while_conntrack_names_it() {
        let node = Node::default();
        let mut syncer = flaky(|_| false);
        syncer.sync_snapshot(&snapshot(&["10.244.2.1"]), &node);
        syncer.sync_snapshot(&snapshot(&["10.244.2.2"]), &node);
        let state = &syncer.dataplane().state;
        let (&gone, _) = state
            .backends
            .iter()
            .find(|(_, b)| b.addr == ipv4_raw([10, 244, 2, 1]))
            .expect("kept");
        let flagged = |s: &Syncer<Flaky>| s.dataplane().state.backends.get(&gone).copied();
        assert_eq!(
            flagged(&syncer).map(|b: Backend| b.flags & backend_flags::DRAINING),
            Some(backend_flags::DRAINING)
        );
        // A walk that began before it drained proves nothing.
        let before = Instant::now() - Duration::from_secs(1);
        assert_eq!(syncer.conntrack_walked(before, &Walk::default()), 0);
        // A later walk that finds a flow on it keeps it.
        let named = Walk {
            backends: BTreeSet::from([gone]),
            ..Walk::default()
        };
        assert_eq!(syncer.conntrack_walked(Instant::now(), &named), 0);
        assert!(flagged(&syncer).is_some());
        // Once no flow names it, it goes, and its id is never handed out
        // again.
        assert_eq!(syncer.conntrack_walked(Instant::now(), &Walk::default()), 1);
        assert!(flagged(&syncer).is_none());
        syncer.sync_snapshot(&snapshot(&["10.244.2.2", "10.244.2.3"]), &node);
        assert!(
            syncer
                .dataplane()
                .state
                .backends
                .keys()
                .all(|id| *id != gone)
        );
    }
}

#[cfg(test)]
mod incremental {
    //! Random sequences of Service, EndpointSlice and node events through
    //! the incremental path of a model that allocates (as the file
    //! source's does): after every step the model equals the fold over
    //! every object, and the maps hold exactly what a full recompute and a
    //! fresh sync would program.

    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        diff::full_plan,
        model::{self, ObjectName, allocate::Ranges},
        source::file::parse_into,
    };

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    const SERVICES: [&str; 5] = ["a", "b", "c", "d", "e"];
    const NODES: [&str; 2] = ["node1", "node2"];

    /// A Service's YAML: addresses from small pools, so that Services
    /// collide on frontend addresses and health-check ports.
    fn service(rng: &mut Rng, name: &str) -> String {
        let kind = ["ClusterIP", "NodePort", "LoadBalancer"][rng.below(3) as usize];
        let policy = if rng.chance(40) { "Local" } else { "Cluster" };
        // Values left out now and then: the model allocates them, from
        // ranges small enough to collide (`RANGES`).
        let cluster_ip = match rng.chance(30) {
            true => String::new(),
            false => format!("  clusterIP: 10.96.0.{}\n", rng.below(3) + 1),
        };
        let node_port = match rng.chance(30) {
            true => String::new(),
            false => format!(", nodePort: {}", 30000 + rng.below(2)),
        };
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: {kind}\n{cluster_ip}  ports:\n  - {{name: http, port: {}{node_port}}}\n",
            80 + rng.below(2),
        );
        if kind != "ClusterIP" {
            text.push_str(&format!("  externalTrafficPolicy: {policy}\n"));
        }
        if rng.chance(30) {
            text.push_str(&format!("  externalIPs: [172.16.0.{}]\n", rng.below(2) + 1));
        }
        if rng.chance(30) {
            text.push_str("  internalTrafficPolicy: Local\n");
        }
        if rng.chance(20) {
            text.push_str("  sessionAffinity: ClientIP\n");
        }
        if kind == "LoadBalancer" && rng.chance(70) {
            text.push_str(&format!(
                "  healthCheckNodePort: {}\n",
                32000 + rng.below(2)
            ));
        }
        if kind == "LoadBalancer" {
            text.push_str(&format!(
                "status: {{loadBalancer: {{ingress: [{{ip: 172.18.0.{}}}]}}}}\n",
                rng.below(2) + 1
            ));
        }
        text
    }

    fn slice(rng: &mut Rng, name: &str) -> String {
        let service = SERVICES[rng.below(SERVICES.len() as u64) as usize];
        let endpoints: Vec<String> = (0..rng.below(4))
            .map(|_| {
                format!(
                    "{{addresses: [10.244.0.{}], nodeName: {}, conditions: {{ready: {}, serving: true, terminating: {}}}}}",
                    rng.below(6) + 1,
                    NODES[rng.below(2) as usize],
                    rng.chance(80),
                    rng.chance(20),
                )
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{}]\n",
            8080 + rng.below(2),
            endpoints.join(", ")
        )
    }

    fn node(rng: &mut Rng) -> Node {
        Node {
            name: NODES[rng.below(2) as usize].into(),
            zone: None,
            ips: (0..rng.below(2) + 1)
                .map(|_| format!("192.168.0.{}", rng.below(2) + 1).parse().unwrap())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        }
    }

    /// Each tier's backends.
    type Tiers = Vec<BTreeSet<lb_common::Backend>>;

    /// What the maps serve: frontend keys and the endpoints of their slots,
    /// tier by tier (ids and slot positions differ between histories).
    fn served(state: &State) -> BTreeMap<lb_common::FrontendKey, (lb_common::Frontend, Tiers)> {
        state
            .frontends
            .iter()
            .map(|(key, f)| {
                let slots = state.slots_of(f);
                let mut start = 0;
                let tiers = f
                    .tier_len
                    .iter()
                    .map(|len| {
                        let end = start + usize::from(*len);
                        let tier = slots[start..end]
                            .iter()
                            .map(|id| state.backends[id])
                            .collect();
                        start = end;
                        tier
                    })
                    .collect();
                (*key, (lb_common::Frontend { id: 0, ..*f }, tiers))
            })
            .collect()
    }

    /// Allocation ranges small enough that allocated values collide with
    /// written ones and with each other: a /29 (10.96.0.1-6) and four node
    /// ports.
    fn ranges() -> Ranges {
        Ranges {
            cluster_ips: ("10.96.0.0".parse().unwrap(), 29),
            node_ports: 30000..=30003,
        }
    }

    #[test]
    fn random_changes_leave_what_a_full_recompute_programs() {
        // Steps that programmed a ClusterIP no Service writes (.4-.6).
        let mut allocated = 0;
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut node = node(&mut rng);
            let model = Model::allocating(node.clone(), ranges());
            let mut syncer = Syncer::new(State::default(), model).unwrap();
            // The objects as YAML, by kind and name.
            let mut objects: BTreeMap<String, String> = BTreeMap::new();
            for step in 0..60 {
                let what = rng.below(10);
                match what {
                    0..=2 => {
                        let name = SERVICES[rng.below(SERVICES.len() as u64) as usize];
                        let text = service(&mut rng, name);
                        let mut snapshot = Snapshot::default();
                        parse_into("test", &text, &mut snapshot);
                        let (name, object) = model::parse_service(&snapshot.services[0]);
                        syncer.model().put_service(name.clone(), Some(object));
                        objects.insert(format!("service {name}"), text);
                    }
                    3..=6 => {
                        let name = format!("s{}", rng.below(6));
                        let text = slice(&mut rng, &name);
                        let mut snapshot = Snapshot::default();
                        parse_into("test", &text, &mut snapshot);
                        let (name, object) = model::parse_slice(&snapshot.endpoint_slices[0]);
                        syncer.model().put_slice(name.clone(), Some(object));
                        objects.insert(format!("slice {name}"), text);
                    }
                    7 => {
                        let name = SERVICES[rng.below(SERVICES.len() as u64) as usize];
                        let name = ObjectName::new("default", name);
                        syncer.model().put_service(name.clone(), None);
                        objects.remove(&format!("service {name}"));
                    }
                    8 => {
                        let name = ObjectName::new("default", format!("s{}", rng.below(6)));
                        syncer.model().put_slice(name.clone(), None);
                        objects.remove(&format!("slice {name}"));
                    }
                    _ => {
                        node = self::node(&mut rng);
                        syncer.model().set_node(node.clone());
                    }
                }
                // Several changes at once, now and then.
                if rng.chance(30) {
                    continue;
                }
                let report = syncer.sync(Scope::Changed);
                assert_eq!(report.failed_writes, 0);
                let context = format!("seed {seed} step {step}");
                let text = objects.values().cloned().collect::<Vec<_>>().join("---\n");
                let mut snapshot = Snapshot::default();
                parse_into("test", &text, &mut snapshot);
                let (fold, _) = model::desired(&snapshot, &node, Some(ranges()));
                allocated += usize::from(
                    fold.frontends
                        .keys()
                        .any(|a| a.ip.octets()[..3] == [10, 96, 0] && a.ip.octets()[3] > 3),
                );
                assert_eq!(syncer.model.desired(), fold, "{context}: model");
                let (full, _) = full_plan(&syncer.model, &syncer.mirror);
                assert_eq!(
                    full.ops(),
                    vec![],
                    "{context}: a full recompute finds more to do"
                );
                let model = Model::allocating(node.clone(), ranges());
                let mut fresh = Syncer::new(State::default(), model).unwrap();
                fresh.sync_snapshot(&snapshot, &node);
                assert_eq!(
                    served(syncer.dataplane()),
                    served(fresh.dataplane()),
                    "{context}: maps"
                );
                assert_eq!(
                    syncer.dataplane().service_addrs,
                    fresh.dataplane().service_addrs,
                    "{context}: service addresses"
                );
                assert_eq!(
                    syncer.dataplane().addr_filter,
                    filter_of(syncer.dataplane()),
                    "{context}: the pre-filter passes exactly the maps' addresses"
                );
            }
        }
        assert!(allocated > 100, "allocation exercised: {allocated} steps");
    }

    /// The pre-filter words the addresses in `state` need.
    fn filter_of(state: &State) -> BTreeMap<u32, u64> {
        use lb_common::addr_filter::{BACKENDS, FRONTENDS};
        let mut words = BTreeMap::new();
        let frontends = state.frontends.keys().map(|key| (FRONTENDS, key.addr));
        let backends = state.backends.values().map(|b| (BACKENDS, b.addr));
        for (set, addr) in frontends.chain(backends) {
            let (index, mask) = lb_common::addr_filter_bit(set, addr);
            *words.entry(index).or_default() |= mask;
        }
        words
    }

    #[test]
    fn a_restart_writes_the_pre_filter_the_pinned_maps_need() {
        // Maps of an agent that had no pre-filter, and a word no address
        // needs any more.
        let mut pinned = State::default();
        let key = lb_common::FrontendKey {
            addr: lb_common::ipv4_raw([10, 96, 0, 1]),
            port: 80,
            proto: lb_common::PROTO_TCP,
            scope: 0,
        };
        pinned.frontends.insert(key, lb_common::Frontend::default());
        pinned.addr_filter.insert(7, 1);
        let syncer = Syncer::new(pinned, Model::new(Node::default())).unwrap();
        assert_eq!(
            syncer.dataplane().addr_filter,
            filter_of(syncer.dataplane())
        );
    }
}
