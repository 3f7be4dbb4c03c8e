//! One sync: snapshot → model → diff → dataplane, with the problems found
//! on the way reported once each.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use crate::{
    Error,
    dataplane::Dataplane,
    diff::diff,
    model::{self, Node},
    problem::{Invalid, Problem},
    source::Snapshot,
    state::{Op, State},
};

/// Keeps a dataplane equal to what snapshots say.
pub struct Syncer<D> {
    dataplane: D,
    /// What the dataplane holds, as far as our writes went through.
    mirror: State,
    /// The problems of the previous sync, so each is reported once.
    reported: BTreeSet<Problem>,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
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
    pub health_checks: std::collections::BTreeMap<u16, crate::model::HealthCheck>,
}

impl<D: Dataplane> Syncer<D> {
    /// Starts from what the dataplane holds (pinned maps of an earlier run
    /// are reconciled, not flushed).
    pub fn new(dataplane: D) -> Result<Self, Error> {
        let mirror = dataplane.read()?;
        Ok(Self {
            dataplane,
            mirror,
            reported: BTreeSet::new(),
        })
    }

    /// Re-reads the dataplane, so that writes made behind our back are
    /// corrected by the next sync.
    pub fn reread(&mut self) -> Result<(), Error> {
        self.mirror = self.dataplane.read()?;
        Ok(())
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// Programs what `snapshot` says for `node`.
    pub fn sync(&mut self, snapshot: &Snapshot, node: &Node) -> SyncReport {
        let started = Instant::now();
        let (desired, mut problems) = model::desired(snapshot, node);
        let model_duration = started.elapsed();
        let (ops, capacity) = diff(&desired, &self.mirror);
        let diff_duration = started.elapsed() - model_duration;
        problems.extend(capacity);
        let mut writes = 0;
        let forget = affinity_to_forget(&ops, &self.mirror);
        for op in &ops {
            match self.dataplane.write(op) {
                Ok(()) => {
                    self.mirror.apply(op);
                    writes += 1;
                }
                // A full map: this write is lost, the others go on; the
                // next sync retries it.
                Err(err) => problems.push(Problem::new(
                    format!("map write {op:?}"),
                    Invalid::Capacity(err.to_string()),
                )),
            }
        }
        if !forget.is_empty()
            && let Err(err) = self.dataplane.forget_affinity(&forget)
        {
            problems.push(Problem::new(
                "affinity entries",
                Invalid::Capacity(err.to_string()),
            ));
        }
        let current: BTreeSet<Problem> = problems.into_iter().collect();
        let new_problems = current.difference(&self.reported).cloned().collect();
        self.reported = current;
        SyncReport {
            writes,
            new_problems,
            frontends: self.mirror.frontends.len(),
            backends: self.mirror.backends.len(),
            duration: started.elapsed(),
            model_duration,
            diff_duration,
            health_checks: desired.health_checks,
        }
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
                    .keys()
                    .copied()
                    .collect::<std::collections::BTreeSet<_>>(),
                used,
                "{step}: stray backends"
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
