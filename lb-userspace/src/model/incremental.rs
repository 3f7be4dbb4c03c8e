//! The model, kept up to date one change at a time: parsed objects in, each
//! Service's frontends recomputed only when something it depends on
//! changed, and the frontends whose programmed value changed out.
//!
//! What one Service's frontends depend on: the Service, its slices, and the
//! node. The couplings between Services are explicit:
//! - a slice names its Service; a slice that moves to another Service marks
//!   both;
//! - a frontend address (or a healthCheckNodePort) two Services claim goes
//!   to the first by namespace/name, on every node alike; the other is told
//!   (a problem), and takes over when the first lets go;
//! - the addresses only Services use count the frontends on each address.
//!
//! - an Endpoints object (file source) is mirrored into slices for the
//!   Service of its name when that Service selects no pods and has no
//!   slices of its own;
//! - a model that allocates (file source) gives ClusterIPs and node ports
//!   to Services written without them, around every explicit value
//!   (`allocate`); a Service whose allocation moves is recomputed.
//!
//! A change of the node's identity marks every Service.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, btree_map::Entry, hash_map},
    net::Ipv4Addr,
    sync::Arc,
};

use super::{
    Desired, DesiredFrontend, FrontendAddr, HealthCheck, Node, ObjectName, ServiceObject,
    SliceObject,
    allocate::{Allocator, Ranges},
    endpoints::EndpointsObject,
    service_frontends,
};
use crate::{
    problem::{Invalid, Problem},
    source::Snapshot,
};

/// What an update changed, for the diff.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Frontend addresses whose programmed value changed, appeared or went.
    pub frontends: BTreeSet<FrontendAddr>,
    /// Addresses that became, or stopped being, addresses only Services
    /// use.
    pub service_addrs: BTreeSet<Ipv4Addr>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.service_addrs.is_empty()
    }
}

/// Who claims a frontend address (or a health-check port), first by name
/// first: the first is programmed. Nearly always one: a short sorted list
/// (a map would allocate a node per address).
#[derive(Debug)]
struct Claims<T>(Vec<(ObjectName, T)>);

impl<T> Default for Claims<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> Claims<T> {
    fn insert(&mut self, name: ObjectName, value: T) {
        match self.0.binary_search_by(|(n, _)| n.cmp(&name)) {
            Ok(at) => self.0[at].1 = value,
            Err(at) => self.0.insert(at, (name, value)),
        }
    }

    fn remove(&mut self, name: &ObjectName) {
        self.0.retain(|(n, _)| n != name);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn keys(&self) -> impl Iterator<Item = &ObjectName> {
        self.0.iter().map(|(name, _)| name)
    }

    /// The programmed one: the first claimant's.
    fn first(&self) -> Option<&T> {
        self.0.first().map(|(_, value)| value)
    }
}

/// Where a problem comes from: when that thing changes, its problems are
/// replaced.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Origin {
    Service(ObjectName),
    Slice(ObjectName),
    Endpoints(ObjectName),
    /// What a Service asked to be allocated and did not get.
    Allocation(ObjectName),
    /// A file or another part of a source (documents that do not parse).
    Source(String),
    /// Two Services claim one frontend address.
    Frontend(FrontendAddr),
    /// Two Services claim one healthCheckNodePort.
    HealthCheck(u16),
}

/// The model of one node, kept up to date.
#[derive(Debug, Default)]
pub struct Model {
    node: Node,
    services: HashMap<ObjectName, ServiceObject>,
    slices: HashMap<ObjectName, SliceObject>,
    /// Endpoints objects, named as their Service.
    endpoints: HashMap<ObjectName, EndpointsObject>,
    /// Endpoints not mirrored because their Service has slices (told once).
    endpoints_ignored: BTreeSet<ObjectName>,
    /// Gives values to Services written without them (file source only).
    allocator: Option<Allocator>,
    /// Slice names by the Service they belong to (same namespace).
    /// (Sorted; nearly always one, so not a set, which allocates a node.)
    slices_of: HashMap<ObjectName, Vec<String>>,
    /// Services to recompute at the next update.
    dirty: BTreeSet<ObjectName>,
    /// Each Service's output as last computed: the addresses it claims,
    /// its health-check port, its local endpoints.
    outputs: HashMap<ObjectName, Output>,
    frontends: BTreeMap<FrontendAddr, Claims<Arc<DesiredFrontend>>>,
    health_checks: BTreeMap<u16, Claims<HealthCheck>>,
    /// Frontend addresses per IP.
    frontends_per_ip: HashMap<Ipv4Addr, usize>,
    /// Services with an endpoint per local IP.
    local_endpoints: BTreeMap<Ipv4Addr, usize>,
    problems: BTreeMap<Origin, Vec<Problem>>,
    /// Problems that appeared since the last [`Model::take_new_problems`].
    new_problems: Vec<Problem>,
    /// What the model decided on its own since the last
    /// [`Model::take_notices`] (an allocation, Endpoints not mirrored).
    notices: Vec<String>,
    /// Addresses only Services use that changed since the last update
    /// (frontends came to or left an address, the node's addresses moved).
    pending: Changes,
}

/// What became of the Endpoints of a Service's name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Mirroring {
    /// None, not mirrored (the Service selects pods), or no Service.
    #[default]
    None,
    Mirrored,
    /// Not mirrored: the Service has EndpointSlices of its own.
    Ignored,
}

#[derive(Debug, Default)]
struct Output {
    frontends: Vec<FrontendAddr>,
    health_check: Option<u16>,
    local_endpoints: BTreeSet<Ipv4Addr>,
}

impl Model {
    pub fn new(node: Node) -> Self {
        Self {
            node,
            ..Self::default()
        }
    }

    /// A model that allocates ClusterIPs and node ports from `ranges` to
    /// Services written without them (the file source's: there is no API
    /// server to do it).
    pub fn allocating(node: Node, ranges: Ranges) -> Self {
        Self {
            node,
            allocator: Some(Allocator::new(ranges)),
            ..Self::default()
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// This node's identity: when it changes, every Service is recomputed.
    pub fn set_node(&mut self, node: Node) {
        if node == self.node {
            return;
        }
        // The node's addresses leave or join the addresses only Services
        // use.
        let moved: BTreeSet<Ipv4Addr> = self
            .node
            .ips
            .iter()
            .chain(&node.ips)
            .copied()
            .filter(|ip| self.frontends_per_ip.contains_key(ip))
            .collect();
        self.pending.service_addrs.extend(moved);
        self.node = node;
        self.dirty.extend(self.services.keys().cloned());
    }

    /// A Service was added or changed (`Some`), or deleted.
    pub fn put_service(&mut self, name: ObjectName, object: Option<ServiceObject>) {
        let problems = object
            .as_ref()
            .map(|o| o.problems.clone())
            .unwrap_or_default();
        let old = match &object {
            Some(object) => self.services.insert(name.clone(), object.clone()),
            None => self.services.remove(&name),
        };
        if old != object {
            if let Some(allocator) = &mut self.allocator {
                allocator.service_changed(&name, old.as_ref(), object.as_ref());
            }
            self.set_problems(Origin::Service(name.clone()), problems);
            self.dirty.insert(name);
        }
    }

    /// An EndpointSlice was added or changed (`Some`), or deleted.
    pub fn put_slice(&mut self, name: ObjectName, object: Option<SliceObject>) {
        let problems = object
            .as_ref()
            .map(|o| o.problems.clone())
            .unwrap_or_default();
        let old = match &object {
            Some(object) => self.slices.insert(name.clone(), object.clone()),
            None => self.slices.remove(&name),
        };
        if old == object {
            return;
        }
        self.set_problems(Origin::Slice(name.clone()), problems);
        let service_of = |slice: &SliceObject| {
            slice
                .service
                .as_ref()
                .map(|service| ObjectName::new(&name.namespace, service.clone()))
        };
        // A slice that moves between Services changes both.
        if let Some(service) = old.as_ref().and_then(service_of) {
            if let Some(names) = self.slices_of.get_mut(&service) {
                names.retain(|n| *n != name.name);
                if names.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            self.dirty.insert(service);
        }
        if let Some(service) = object.as_ref().and_then(service_of) {
            let names = self.slices_of.entry(service.clone()).or_default();
            if let Err(at) = names.binary_search(&name.name) {
                names.insert(at, name.name.clone());
            }
            self.dirty.insert(service);
        }
    }

    /// An Endpoints object was added or changed (`Some`), or deleted.
    /// (Its problems count only while it is mirrored: see `update`.)
    pub fn put_endpoints(&mut self, name: ObjectName, object: Option<EndpointsObject>) {
        let old = match &object {
            Some(object) => self.endpoints.insert(name.clone(), object.clone()),
            None => self.endpoints.remove(&name),
        };
        if old != object {
            self.dirty.insert(name);
        }
    }

    /// The problems of a part of the source (a file), replacing its
    /// earlier ones.
    pub fn set_source_problems(&mut self, origin: &str, problems: Vec<Problem>) {
        self.set_problems(Origin::Source(origin.to_owned()), problems);
    }

    /// Makes the model hold exactly the objects of `snapshot` (and, when
    /// it has one, this node's Node object is not read here: the caller
    /// sets the node).
    pub fn replace_all(&mut self, snapshot: &Snapshot) {
        let services: HashMap<ObjectName, ServiceObject> =
            snapshot.services.iter().map(super::parse_service).collect();
        let slices: HashMap<ObjectName, SliceObject> = snapshot
            .endpoint_slices
            .iter()
            .map(super::parse_slice)
            .collect();
        let endpoints: HashMap<ObjectName, EndpointsObject> = snapshot
            .endpoints
            .iter()
            .map(super::parse_endpoints)
            .collect();
        let gone_endpoints: Vec<ObjectName> = self
            .endpoints
            .keys()
            .filter(|name| !endpoints.contains_key(*name))
            .cloned()
            .collect();
        for name in gone_endpoints {
            self.put_endpoints(name, None);
        }
        for (name, object) in endpoints {
            self.put_endpoints(name, Some(object));
        }
        let gone_services: Vec<ObjectName> = self
            .services
            .keys()
            .filter(|name| !services.contains_key(*name))
            .cloned()
            .collect();
        let gone_slices: Vec<ObjectName> = self
            .slices
            .keys()
            .filter(|name| !slices.contains_key(*name))
            .cloned()
            .collect();
        for name in gone_services {
            self.put_service(name, None);
        }
        for name in gone_slices {
            self.put_slice(name, None);
        }
        for (name, object) in services {
            self.put_service(name, Some(object));
        }
        for (name, object) in slices {
            self.put_slice(name, Some(object));
        }
        self.set_source_problems("snapshot", snapshot.problems.clone());
    }

    /// Recomputes the Services marked since the last update; returns what
    /// changed for the datapath.
    pub fn update(&mut self) -> Changes {
        // The programmed value of each touched address before the update.
        let mut before: BTreeMap<FrontendAddr, Option<Arc<DesiredFrontend>>> = BTreeMap::new();
        let mut touched_checks = BTreeSet::new();
        let reallocated = self
            .allocator
            .as_mut()
            .map(Allocator::reallocate)
            .unwrap_or_default();
        for (name, allocation) in reallocated {
            let given = allocation.as_ref().map(ToString::to_string);
            if let Some(given) = given.filter(|g| !g.is_empty()) {
                self.notices
                    .push(format!("Service {name}: allocated {given}"));
            }
            let problems = allocation
                .iter()
                .flat_map(|a| &a.not_given)
                .map(|what| {
                    Problem::new(format!("Service {name}"), Invalid::RangeFull(what.clone()))
                })
                .collect();
            self.set_problems(Origin::Allocation(name.clone()), problems);
            self.dirty.insert(name);
        }
        for name in std::mem::take(&mut self.dirty) {
            let old = self.outputs.remove(&name).unwrap_or_default();
            let (new, mirroring) = self.compute(&name);
            if mirroring == Mirroring::Ignored {
                if self.endpoints_ignored.insert(name.clone()) {
                    self.notices.push(format!(
                        "Endpoints {name} not mirrored: Service {name} has EndpointSlices, which win"
                    ));
                }
            } else {
                self.endpoints_ignored.remove(&name);
            }
            let problems = match mirroring {
                Mirroring::Mirrored => self.endpoints[&name].problems.clone(),
                _ => Vec::new(),
            };
            self.set_problems(Origin::Endpoints(name.clone()), problems);
            for addr in old
                .frontends
                .iter()
                .chain(new.frontends.iter().map(|(a, _)| a))
            {
                before.entry(*addr).or_insert_with(|| self.winner(addr));
            }
            for addr in &old.frontends {
                self.unclaim(addr, &name);
            }
            let mut output = Output {
                local_endpoints: new.local_endpoints,
                ..Output::default()
            };
            for (addr, frontend) in new.frontends {
                self.claim(addr, &name, Arc::new(frontend));
                output.frontends.push(addr);
            }
            output.frontends.sort();
            output.frontends.dedup();
            if let Some(port) = old.health_check {
                touched_checks.insert(port);
                if let Entry::Occupied(mut claims) = self.health_checks.entry(port) {
                    claims.get_mut().remove(&name);
                    if claims.get().is_empty() {
                        claims.remove();
                    }
                }
            }
            if let Some((port, check)) = new.health_check {
                touched_checks.insert(port);
                self.health_checks
                    .entry(port)
                    .or_default()
                    .insert(name.clone(), check);
                output.health_check = Some(port);
            }
            for ip in &old.local_endpoints {
                if let Entry::Occupied(mut count) = self.local_endpoints.entry(*ip) {
                    *count.get_mut() -= 1;
                    if *count.get() == 0 {
                        count.remove();
                    }
                }
            }
            for ip in &output.local_endpoints {
                *self.local_endpoints.entry(*ip).or_default() += 1;
            }
            if !output.frontends.is_empty()
                || output.health_check.is_some()
                || !output.local_endpoints.is_empty()
            {
                self.outputs.insert(name, output);
            }
        }
        let mut changes = std::mem::take(&mut self.pending);
        for (addr, old) in before {
            let new = self.frontend(&addr);
            if old.as_deref() != new {
                changes.frontends.insert(addr);
            }
            self.conflicts(addr);
        }
        for port in touched_checks {
            self.health_check_conflicts(port);
        }
        changes
    }

    /// One Service's frontends, as the rules give them now, and what
    /// became of the Endpoints of its name.
    fn compute(&self, name: &ObjectName) -> (super::ServiceFrontends, Mirroring) {
        let Some(written) = self.services.get(name).and_then(|s| s.service.as_ref()) else {
            return Default::default();
        };
        let allocated = self.allocator.as_ref().and_then(|a| a.fill(name, written));
        let service = allocated.as_ref().unwrap_or(written);
        let mut slices: Vec<_> = self
            .slices_of
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|slice| {
                let key = ObjectName::new(&name.namespace, slice.clone());
                self.slices.get(&key)?.slice.as_ref()
            })
            .collect();
        // The mirroring controller's rules: Endpoints of a Service that
        // selects no pods; slices of the Service's own (valid or not) win.
        let mirrored = self
            .endpoints
            .get(name)
            .and_then(|e| e.slices.as_ref())
            .filter(|_| !service.has_selector);
        let mut mirroring = Mirroring::None;
        if let Some(mirrored) = mirrored {
            if self.slices_of.contains_key(name) {
                mirroring = Mirroring::Ignored;
            } else {
                slices.extend(mirrored);
                mirroring = Mirroring::Mirrored;
            }
        }
        let frontends = service_frontends(name, service, &slices, &self.node);
        (frontends, mirroring)
    }

    fn claim(&mut self, addr: FrontendAddr, name: &ObjectName, frontend: Arc<DesiredFrontend>) {
        let claims = self.frontends.entry(addr).or_default();
        if claims.is_empty() {
            let count = self.frontends_per_ip.entry(addr.ip).or_default();
            *count += 1;
            if *count == 1 {
                self.pending.service_addrs.insert(addr.ip);
            }
        }
        claims.insert(name.clone(), frontend);
    }

    fn unclaim(&mut self, addr: &FrontendAddr, name: &ObjectName) {
        let Entry::Occupied(mut claims) = self.frontends.entry(*addr) else {
            return;
        };
        claims.get_mut().remove(name);
        if !claims.get().is_empty() {
            return;
        }
        claims.remove();
        if let hash_map::Entry::Occupied(mut count) = self.frontends_per_ip.entry(addr.ip) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
                self.pending.service_addrs.insert(addr.ip);
            }
        }
    }

    /// The losers of a frontend address claimed twice are told.
    fn conflicts(&mut self, addr: FrontendAddr) {
        let problems = match self.frontends.get(&addr) {
            Some(claims) if claims.len() > 1 => {
                let mut names = claims.keys();
                let winner = names.next().expect("claimed");
                names
                    .map(|loser| {
                        let what = format!("{addr} is also Service {winner}'s, which keeps it");
                        Problem::new(format!("Service {loser}"), Invalid::Conflict(what))
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        self.set_problems(Origin::Frontend(addr), problems);
    }

    fn health_check_conflicts(&mut self, port: u16) {
        let problems = match self.health_checks.get(&port) {
            Some(claims) if claims.len() > 1 => {
                let mut names = claims.keys();
                let winner = names.next().expect("claimed");
                names
                    .map(|loser| {
                        let what = format!(
                            "healthCheckNodePort {port} is also Service {winner}'s, which keeps it"
                        );
                        Problem::new(format!("Service {loser}"), Invalid::Conflict(what))
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        self.set_problems(Origin::HealthCheck(port), problems);
    }

    fn set_problems(&mut self, origin: Origin, problems: Vec<Problem>) {
        let old = match problems.is_empty() {
            true => self.problems.remove(&origin),
            false => self.problems.insert(origin, problems.clone()),
        }
        .unwrap_or_default();
        self.new_problems
            .extend(problems.into_iter().filter(|p| !old.contains(p)));
    }

    /// The problems that appeared since the last call: each is reported
    /// once, and again only after it went away.
    pub fn take_new_problems(&mut self) -> Vec<Problem> {
        std::mem::take(&mut self.new_problems)
    }

    /// What the model decided on its own since the last call (an
    /// allocation, Endpoints not mirrored), each told once.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    /// Every current problem.
    pub fn problems(&self) -> Vec<Problem> {
        self.problems.values().flatten().cloned().collect()
    }

    /// The first claimant's frontend at `addr`, shared.
    fn winner(&self, addr: &FrontendAddr) -> Option<Arc<DesiredFrontend>> {
        self.frontends
            .get(addr)
            .and_then(|claims| claims.first())
            .cloned()
    }

    /// The frontend programmed at `addr`: the first claimant's.
    pub fn frontend(&self, addr: &FrontendAddr) -> Option<&DesiredFrontend> {
        self.frontends
            .get(addr)
            .and_then(|claims| claims.first())
            .map(Arc::as_ref)
    }

    /// Every programmed frontend, by address.
    pub fn frontends(&self) -> impl Iterator<Item = (&FrontendAddr, &DesiredFrontend)> {
        self.frontends
            .iter()
            .filter_map(|(addr, claims)| claims.first().map(|frontend| (addr, frontend.as_ref())))
    }

    /// Whether `ip` is an address only Services use: a frontend's, and none
    /// of the node's.
    pub fn is_service_addr(&self, ip: &Ipv4Addr) -> bool {
        self.frontends_per_ip.contains_key(ip) && !self.node.ips.contains(ip)
    }

    /// Every address only Services use.
    pub fn service_addrs(&self) -> BTreeSet<Ipv4Addr> {
        self.frontends_per_ip
            .keys()
            .filter(|ip| !self.node.ips.contains(ip))
            .copied()
            .collect()
    }

    /// The healthCheckNodePorts this node serves.
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        self.health_checks
            .iter()
            .filter_map(|(port, claims)| Some((*port, claims.first()?.clone())))
            .collect()
    }

    /// Everything this node must program, as one value.
    pub fn desired(&self) -> Desired {
        Desired {
            frontends: self
                .frontends()
                .map(|(addr, frontend)| (*addr, frontend.clone()))
                .collect(),
            health_checks: self.health_checks(),
            local_endpoints: self.local_endpoints.keys().copied().collect(),
            service_addrs: self.service_addrs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Scope, allocate::Ranges},
        source::file::parse_into,
    };

    fn node() -> Node {
        Node {
            name: "node1".into(),
            zone: None,
            ips: vec!["192.168.0.1".parse().unwrap()],
        }
    }

    /// Parses the objects of `yaml` into `model`.
    fn put(model: &mut Model, yaml: &str) {
        let mut snapshot = Snapshot::default();
        parse_into("test", yaml, &mut snapshot);
        assert!(snapshot.problems.is_empty(), "{:?}", snapshot.problems);
        for service in &snapshot.services {
            let (name, object) = super::super::parse_service(service);
            model.put_service(name, Some(object));
        }
        for slice in &snapshot.endpoint_slices {
            let (name, object) = super::super::parse_slice(slice);
            model.put_slice(name, Some(object));
        }
    }

    fn service(name: &str, external_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.{}, externalIPs: [{external_ip}], ports: [{{port: 80}}]}}\n",
            name.len()
        )
    }

    fn slice(name: &str, service: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]\n"
        )
    }

    fn external(ip: &str) -> FrontendAddr {
        FrontendAddr {
            ip: ip.parse().unwrap(),
            port: 80,
            protocol: super::super::Protocol::Tcp,
            scope: Scope::External,
        }
    }

    fn backends(model: &Model, addr: &FrontendAddr) -> Vec<String> {
        model
            .frontend(addr)
            .map(|f| f.tiers.iter().flatten().map(|e| e.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn an_address_two_services_claim_goes_to_the_first_by_name_and_passes_on() {
        let mut model = Model::new(node());
        put(&mut model, &service("b", "172.16.0.1"));
        put(&mut model, &slice("b-1", "b", "10.244.0.2"));
        model.update();
        put(&mut model, &service("a", "172.16.0.1"));
        put(&mut model, &slice("a-1", "a", "10.244.0.1"));
        let changes = model.update();
        let addr = external("172.16.0.1");
        assert!(changes.frontends.contains(&addr));
        assert_eq!(backends(&model, &addr), ["10.244.0.1:8080"], "a wins");
        let problems = model.take_new_problems();
        assert_eq!(
            problems.len(),
            3,
            "ClusterIP, external IP twice: {problems:?}"
        );
        assert!(problems.iter().all(|p| p.object == "Service default/b"));
        assert_eq!(problems[0].reason.label(), "conflict");
        // a goes: b takes the address over, and is no longer told.
        model.put_service(ObjectName::new("default", "a"), None);
        let changes = model.update();
        assert!(changes.frontends.contains(&addr));
        assert_eq!(backends(&model, &addr), ["10.244.0.2:8080"]);
        assert!(model.problems().is_empty(), "{:?}", model.problems());
    }

    #[test]
    fn a_slice_that_moves_to_another_service_changes_both() {
        let mut model = Model::new(node());
        put(&mut model, &service("a", "172.16.0.1"));
        put(&mut model, &service("bb", "172.16.0.2"));
        put(&mut model, &slice("s", "a", "10.244.0.1"));
        model.update();
        put(&mut model, &slice("s", "bb", "10.244.0.1"));
        let changes = model.update();
        assert!(changes.frontends.contains(&external("172.16.0.1")));
        assert!(changes.frontends.contains(&external("172.16.0.2")));
        assert!(backends(&model, &external("172.16.0.1")).is_empty());
        assert_eq!(
            backends(&model, &external("172.16.0.2")),
            ["10.244.0.1:8080"]
        );
    }

    #[test]
    fn an_unchanged_object_is_no_work() {
        let mut model = Model::new(node());
        let yaml = service("a", "172.16.0.1") + "---\n" + &slice("a-1", "a", "10.244.0.1");
        put(&mut model, &yaml);
        assert!(!model.update().is_empty());
        // A re-list hands the same objects again.
        put(&mut model, &yaml);
        assert!(model.dirty.is_empty(), "nothing to recompute");
        assert!(model.update().is_empty());
    }

    #[test]
    fn a_change_of_the_node_recomputes_every_service() {
        let mut model = Model::new(node());
        put(
            &mut model,
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}\n",
        );
        model.update();
        let mut moved = node();
        moved.ips = vec!["192.168.0.2".parse().unwrap()];
        model.set_node(moved);
        let changes = model.update();
        let nodeport = |ip: &str| FrontendAddr {
            port: 30080,
            ..external(ip)
        };
        assert!(changes.frontends.contains(&nodeport("192.168.0.1")));
        assert!(changes.frontends.contains(&nodeport("192.168.0.2")));
        assert!(model.frontend(&nodeport("192.168.0.1")).is_none());
        assert!(model.frontend(&nodeport("192.168.0.2")).is_some());
    }

    fn put_endpoints(model: &mut Model, yaml: &str) {
        let mut snapshot = Snapshot::default();
        parse_into("test", yaml, &mut snapshot);
        for endpoints in &snapshot.endpoints {
            let (name, object) = super::super::parse_endpoints(endpoints);
            model.put_endpoints(name, Some(object));
        }
    }

    #[test]
    fn endpoints_are_mirrored_until_the_service_has_slices_of_its_own() {
        let mut model = Model::new(node());
        put(&mut model, &service("a", "172.16.0.1"));
        put_endpoints(
            &mut model,
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: a}\nsubsets: [{addresses: [{ip: 192.0.2.1}], ports: [{port: 8080}]}]\n",
        );
        model.update();
        let addr = external("172.16.0.1");
        assert_eq!(backends(&model, &addr), ["192.0.2.1:8080"]);
        assert!(model.take_notices().is_empty());
        // Slices of its own win, and that is told once.
        put(&mut model, &slice("a-1", "a", "10.244.0.1"));
        assert!(model.update().frontends.contains(&addr));
        assert_eq!(backends(&model, &addr), ["10.244.0.1:8080"]);
        let notices = model.take_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].contains("Endpoints default/a not mirrored"));
        model.put_service(ObjectName::new("default", "a"), None);
        put(&mut model, &service("a", "172.16.0.1"));
        model.update();
        assert!(model.take_notices().is_empty(), "told once");
        // The slice goes: the Endpoints count again.
        model.put_slice(ObjectName::new("default", "a-1"), None);
        model.update();
        assert_eq!(backends(&model, &addr), ["192.0.2.1:8080"]);
    }

    #[test]
    fn an_allocating_model_gives_values_logs_them_once_and_moves_them_for_explicit_ones() {
        let mut model = Model::allocating(node(), Ranges::default());
        put(
            &mut model,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n",
        );
        model.update();
        let notices = model.take_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].starts_with("Service default/web: allocated clusterIP 10."));
        let web: Vec<FrontendAddr> = model.frontends().map(|(a, _)| *a).collect();
        assert_eq!(web.len(), 1);
        let ip = web[0].ip;
        // An unrelated Service changes nothing of web's.
        put(&mut model, &service("other", "172.16.0.9"));
        let changes = model.update();
        assert!(!changes.frontends.contains(&web[0]));
        assert!(model.take_notices().is_empty());
        // A Service writing web's address explicitly takes it: web moves.
        put(
            &mut model,
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: taker}}\nspec: {{clusterIP: {ip}, ports: [{{port: 443}}]}}\n"
            ),
        );
        let changes = model.update();
        assert!(changes.frontends.contains(&web[0]), "web left {ip}");
        assert!(model.frontend(&web[0]).is_none());
        let notices = model.take_notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(!notices[0].contains(&format!("clusterIP {ip}")));
        // A model that does not allocate leaves the Service without one.
        let mut plain = Model::new(node());
        put(
            &mut plain,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n",
        );
        plain.update();
        assert_eq!(plain.frontends().count(), 0);
    }

    #[test]
    fn a_selector_turns_mirroring_off_and_its_problems_with_it() {
        let mut model = Model::new(node());
        let service = |selector: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: 10.96.0.1, externalIPs: [172.16.0.1], ports: [{{port: 80}}]{selector}}}\n"
            )
        };
        put(&mut model, &service(""));
        put_endpoints(
            &mut model,
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: a}\nsubsets: [{addresses: [{ip: 192.0.2.1}, {ip: bad}], ports: [{port: 8080}]}]\n",
        );
        model.update();
        let addr = external("172.16.0.1");
        assert_eq!(backends(&model, &addr), ["192.0.2.1:8080"]);
        assert_eq!(model.problems().len(), 1, "the bad address");
        put(&mut model, &service(", selector: {app: a}"));
        model.update();
        assert!(backends(&model, &addr).is_empty(), "not mirrored");
        assert!(model.problems().is_empty(), "{:?}", model.problems());
        put(&mut model, &service(""));
        model.update();
        assert_eq!(backends(&model, &addr), ["192.0.2.1:8080"]);
    }

    /// The ClusterIP `name` is given by a model allocating from the
    /// default ranges over `yaml`.
    fn allocated_ip(yaml: &str, name: &str) -> Option<std::net::Ipv4Addr> {
        let mut model = Model::allocating(node(), Ranges::default());
        put(&mut model, yaml);
        model.update();
        model
            .frontends()
            .find(|(_, f)| f.service_port == format!("default/{name}"))
            .map(|(addr, _)| addr.ip)
    }

    #[test]
    fn values_of_services_not_programmed_are_never_handed_out() {
        let web =
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
        let alone = allocated_ip(web, "web").unwrap();
        // Another proxy's Service, and an invalid one, write web's address.
        for other in [
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: other, labels: {{service.kubernetes.io/service-proxy-name: x}}}}\nspec: {{clusterIP: {alone}, ports: [{{port: 80}}]}}\n"
            ),
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: other}}\nspec: {{clusterIP: {alone}, ports: [{{port: 80, protocol: QUIC}}]}}\n"
            ),
        ] {
            let moved = allocated_ip(&format!("{web}---\n{other}"), "web").unwrap();
            assert_ne!(moved, alone, "{other}");
        }
    }

    #[test]
    fn a_value_moved_by_a_collision_moves_back_when_the_collision_goes() {
        let mut model = Model::allocating(node(), Ranges::default());
        let web =
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
        put(&mut model, web);
        model.update();
        let at = |model: &Model| model.frontends().next().map(|(a, _)| a.ip).unwrap();
        let alone = at(&model);
        let taker = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: taker}}\nspec: {{clusterIP: {alone}, ports: [{{port: 443}}]}}\n"
        );
        put(&mut model, &taker);
        model.update();
        let moved = model
            .frontends()
            .find(|(_, f)| f.service_port == "default/web")
            .map(|(a, _)| a.ip)
            .unwrap();
        assert_ne!(moved, alone);
        model.put_service(ObjectName::new("default", "taker"), None);
        let changes = model.update();
        assert_eq!(at(&model), alone, "back where it was");
        assert!(changes.frontends.iter().any(|a| a.ip == alone));
    }

    #[test]
    fn a_manifest_without_a_namespace_is_in_default() {
        let mut model = Model::new(node());
        put(&mut model, &service("a", "172.16.0.1"));
        assert!(
            model
                .services
                .contains_key(&ObjectName::new("default", "a"))
        );
    }
}
