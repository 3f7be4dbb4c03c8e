//! One sync: snapshot → model → diff → dataplane, with the problems found
//! on the way reported once each.
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
    diff::{diff, drains},
    model::{self, Node},
    problem::{Invalid, Problem},
    source::Snapshot,
    state::{Op, State},
};

/// The first retry of a failed sync, doubled per failure up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Keeps a dataplane equal to what snapshots say.
pub struct Syncer<D> {
    dataplane: D,
    /// What the dataplane holds, as far as our writes went through.
    mirror: State,
    /// The problems of the previous sync, so each is reported once.
    reported: BTreeSet<Problem>,
    /// Backends that no slot holds, by when they started draining.
    draining_since: BTreeMap<u32, Instant>,
    /// When a failed sync is due again, and the backoff that led there.
    retry: Option<(Instant, Duration)>,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    /// Writes that failed (their frontends kept their previous state).
    pub failed_writes: usize,
    /// Problems not seen in the previous sync.
    pub new_problems: Vec<Problem>,
    pub frontends: usize,
    pub backends: usize,
    /// The whole sync.
    pub duration: Duration,
    /// Of which: applying the rules (model), comparing with the maps
    /// (diff); the rest is map writes.
    pub model_duration: Duration,
    pub diff_duration: Duration,
    /// The healthCheckNodePorts this node must serve.
    pub health_checks: BTreeMap<u16, crate::model::HealthCheck>,
}

/// The Service object a `namespace/name:port` names, as problems name it.
fn service_of(service_port: &str) -> String {
    let service = service_port.split(':').next().unwrap_or(service_port);
    format!("Service {service}")
}

impl<D: Dataplane> Syncer<D> {
    /// Starts from what the dataplane holds (pinned maps of an earlier run
    /// are reconciled, not flushed).
    pub fn new(dataplane: D) -> Result<Self, Error> {
        let mirror = dataplane.read()?;
        let now = Instant::now();
        let draining_since = mirror
            .backends
            .iter()
            .filter(|(_, b)| b.flags & backend_flags::DRAINING != 0)
            .map(|(id, _)| (*id, now))
            .collect();
        Ok(Self {
            dataplane,
            mirror,
            reported: BTreeSet::new(),
            draining_since,
            retry: None,
        })
    }

    /// Re-reads the dataplane, so that writes made behind our back are
    /// corrected by the next sync.
    pub fn reread(&mut self) -> Result<(), Error> {
        let read = self.dataplane.read()?;
        // Ids named by conntrack are known from the walks, not the maps.
        let (backend, frontend) = (
            self.mirror.max_backend_id_in_use,
            self.mirror.max_frontend_id_in_use,
        );
        self.mirror = read;
        self.mirror.max_backend_id_in_use = self.mirror.max_backend_id_in_use.max(backend);
        self.mirror.max_frontend_id_in_use = self.mirror.max_frontend_id_in_use.max(frontend);
        // Draining backends written behind our back drain from now.
        let now = Instant::now();
        for (id, backend) in &self.mirror.backends {
            if backend.flags & backend_flags::DRAINING != 0 {
                self.draining_since.entry(*id).or_insert(now);
            }
        }
        self.draining_since
            .retain(|id, _| self.mirror.backends.contains_key(id));
        Ok(())
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// Whether a failed sync is due for its retry at `now`.
    pub fn retry_due(&self, now: Instant) -> bool {
        self.retry.is_some_and(|(at, _)| now >= at)
    }

    /// Programs what `snapshot` says for `node`.
    pub fn sync(&mut self, snapshot: &Snapshot, node: &Node) -> SyncReport {
        let started = Instant::now();
        let (desired, mut problems) = model::desired(snapshot, node);
        let model_duration = started.elapsed();
        let (plan, capacity) = diff(&desired, &self.mirror);
        let diff_duration = started.elapsed() - model_duration;
        problems.extend(capacity);
        let forget = affinity_to_forget(&plan.ops(), &self.mirror);
        let mut writes = 0;
        let mut failed_writes = 0;
        let mut failed_frontends = BTreeSet::new();
        let (done, failed) = self.write_all(&plan.service_addrs, &mut problems);
        writes += done;
        failed_writes += failed;
        for unit in &plan.frontends {
            let (done, failure) = self.apply_unit(&unit.writes);
            writes += done;
            if let Some(err) = failure {
                failed_writes += 1;
                failed_frontends.insert(unit.frontend_id);
                problems.push(Problem::new(
                    service_of(&unit.service_port),
                    Invalid::Capacity(format!("{}: {err}", unit.service_port)),
                ));
            }
        }
        // A frontend whose unit failed keeps its slots and ranges as they
        // are; the backends no slot holds any more drain.
        let cleanup: Vec<Op> = plan
            .cleanup
            .iter()
            .filter(|op| match op {
                Op::DeleteSlot(key) => !failed_frontends.contains(&key.frontend_id),
                Op::DeleteSourceRange((key, _)) => !failed_frontends.contains(&key.frontend_id),
                _ => true,
            })
            .copied()
            .collect();
        let (done, failed) = self.write_all(&cleanup, &mut problems);
        writes += done;
        failed_writes += failed;
        let (done, failed) = self.write_all(&drains(&self.mirror), &mut problems);
        writes += done;
        failed_writes += failed;
        if !forget.is_empty()
            && let Err(err) = self.dataplane.forget_affinity(&forget)
        {
            failed_writes += 1;
            problems.push(Problem::new(
                "affinity entries",
                Invalid::Capacity(err.to_string()),
            ));
        }
        self.retry = match (failed_writes, self.retry) {
            (0, _) => None,
            (_, None) => Some((Instant::now() + RETRY_FIRST, RETRY_FIRST)),
            (_, Some((_, backoff))) => {
                let backoff = (backoff * 2).min(RETRY_MAX);
                Some((Instant::now() + backoff, backoff))
            }
        };
        let current: BTreeSet<Problem> = problems.into_iter().collect();
        let new_problems = current.difference(&self.reported).cloned().collect();
        self.reported = current;
        SyncReport {
            writes,
            failed_writes,
            new_problems,
            frontends: self.mirror.frontends.len(),
            backends: self.mirror.backends.len(),
            duration: started.elapsed(),
            model_duration,
            diff_duration,
            health_checks: desired.health_checks,
        }
    }

    /// Applies `ops` one by one, each failure a problem; returns the writes
    /// made and failed.
    fn write_all(&mut self, ops: &[Op], problems: &mut Vec<Problem>) -> (usize, usize) {
        let mut done = 0;
        for op in ops {
            match self.write(op) {
                Ok(()) => done += 1,
                Err(err) => problems.push(Problem::new(
                    "xlb datapath",
                    Invalid::Capacity(format!("{op:?}: {err}")),
                )),
            }
        }
        (done, ops.len() - done)
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

    /// One write, mirrored when it went through.
    fn write(&mut self, op: &Op) -> Result<(), Error> {
        self.dataplane.write(op)?;
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
        Ok(())
    }

    /// Takes in a conntrack walk that started at `started`: ids its live
    /// entries name are never handed out again, and draining backends that
    /// drained before it started and that no entry names are deleted.
    /// Returns how many were.
    pub fn conntrack_walked(&mut self, started: Instant, walk: &Walk) -> usize {
        if let Some(max) = walk.backends.last() {
            self.mirror.max_backend_id_in_use = self.mirror.max_backend_id_in_use.max(*max);
        }
        self.mirror.max_frontend_id_in_use =
            self.mirror.max_frontend_id_in_use.max(walk.max_frontend_id);
        let slotted: BTreeSet<u32> = self.mirror.slots.values().copied().collect();
        let unused: Vec<u32> = self
            .draining_since
            .iter()
            .filter(|(id, since)| {
                **since < started && !walk.backends.contains(id) && !slotted.contains(id)
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
        let mut syncer = Syncer::new(State::default()).unwrap();
        let node = Node::default();
        let bad = snapshot(&format!("{GOOD}{BAD}"));
        let first = syncer.sync(&bad, &node);
        assert_eq!(first.new_problems.len(), 1);
        assert_eq!(first.frontends, 1, "the good Service is programmed");
        assert!(syncer.sync(&bad, &node).new_problems.is_empty());
        assert!(syncer.sync(&snapshot(GOOD), &node).new_problems.is_empty());
        assert_eq!(syncer.sync(&bad, &node).new_problems.len(), 1);
    }

    #[test]
    fn a_restart_reconciles_instead_of_flushing() {
        let node = Node::default();
        let mut first = Syncer::new(State::default()).unwrap();
        first.sync(&snapshot(GOOD), &node);
        let maps = first.dataplane().clone();
        let mut second = Syncer::new(maps).unwrap();
        assert_eq!(second.sync(&snapshot(GOOD), &node).writes, 0);
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
        let mut syncer = Syncer::new(State::default()).unwrap();
        syncer.sync(desired_snapshot, node);
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
        let mut syncer = Syncer::new(State::default()).unwrap();
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
        syncer.sync(&service(lb, one_port), &node);
        assert_eq!(
            addrs(&syncer),
            [
                "10.96.0.1".parse::<std::net::Ipv4Addr>().unwrap(),
                "172.18.0.1".parse().unwrap()
            ]
        );
        syncer.sync(&service("  type: NodePort", one_port), &node);
        assert_eq!(
            addrs(&syncer),
            ["10.96.0.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        syncer.sync(&Snapshot::default(), &node);
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
        let mut syncer = Syncer::new(State::default()).unwrap();
        for (step, snapshot, frontends) in steps {
            syncer.sync(&snapshot, &node);
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
            let (desired, _): (Desired, _) = crate::model::desired(&snapshot, &node);
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

        fn forget_affinity(&mut self, _: &BTreeSet<u32>) -> Result<(), Error> {
            Ok(())
        }
    }

    /// A syncer over empty in-memory maps whose writes fail while `fails`
    /// says so.
    fn flaky(fails: fn(&Op) -> bool) -> Syncer<Flaky> {
        Syncer::new(Flaky {
            state: State::default(),
            fails,
        })
        .unwrap()
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
        syncer.sync(&snapshot(&["10.244.2.1"]), &node);
        // The backends map is full: b's new endpoint cannot be written.
        syncer.dataplane.fails = |op| is_backend(op, [10, 244, 2, 2]);
        let report = syncer.sync(&snapshot(&["10.244.2.1", "10.244.2.2"]), &node);
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
        let report = syncer.sync(&snapshot(&["10.244.2.1", "10.244.2.2"]), &node);
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
        syncer.sync(
            &snapshot(&["10.244.2.1", "10.244.2.2", "10.244.2.3"]),
            &node,
        );
        syncer.dataplane.fails = |op| is_backend(op, [10, 244, 2, 4]);
        let report = syncer.sync(&snapshot(&["10.244.2.2", "10.244.2.4"]), &node);
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
        let report = syncer.sync(&snapshot(&["10.244.1.1"]), &node);
        assert_eq!(report.failed_writes, 2);
        let state = &syncer.dataplane().state;
        assert!(state.frontends.is_empty(), "{state:?}");
        assert!(state.slots.is_empty(), "{state:?}");
    }

    #[test]
    fn backoff_doubles_up_to_a_second() {
        let node = Node::default();
        let mut syncer = flaky(|op| matches!(op, Op::PutFrontend(..)));
        let mut waits = Vec::new();
        for _ in 0..6 {
            syncer.sync(&snapshot(&["10.244.2.1"]), &node);
            waits.push(syncer.retry.unwrap().1.as_millis());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn a_draining_backend_stays_while_conntrack_names_it() {
        let node = Node::default();
        let mut syncer = flaky(|_| false);
        syncer.sync(&snapshot(&["10.244.2.1"]), &node);
        syncer.sync(&snapshot(&["10.244.2.2"]), &node);
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
        syncer.sync(&snapshot(&["10.244.2.2", "10.244.2.3"]), &node);
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
