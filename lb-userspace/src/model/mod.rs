//! The model: Services and EndpointSlices plus this node's identity in, the
//! frontends and backend tiers this node must program out. Pure (no I/O);
//! every Kubernetes rule lives here and nowhere else.
//!
//! It works per object and per Service: each object is parsed once,
//! whatever the node ([`parse_service`], [`parse_slice`]); one function
//! turns a parsed Service, its slices and the node into that Service's
//! frontends ([`service_frontends`]); and [`Model`] keeps the parsed objects
//! and each Service's frontends, recomputing only the Services a change
//! touched. [`desired`] is the fold over every Service, for a snapshot.

pub mod allocate;
mod endpoints;
mod incremental;
pub mod manifest;
mod policy;
mod service;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::Ipv4Addr,
    sync::{Arc, LazyLock, Mutex},
};

pub use self::{
    endpoints::{
        EndpointsObject, Slice, SliceObject, parse_endpoints, parse_object as parse_slice,
    },
    incremental::{Changes, Model},
    service::{ParsedService, ServiceObject, parse_object as parse_service},
};
use crate::{problem::Problem, source::Snapshot};

/// A namespaced object's name. A manifest without a namespace means
/// `default`, as `kubectl apply` reads it; objects from the API server
/// always carry theirs.
/// The namespace is shared between the names (a cluster has few).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: Arc<str>,
    pub name: String,
}

impl ObjectName {
    pub fn new(namespace: &str, name: impl Into<String>) -> Self {
        Self {
            namespace: intern(namespace),
            name: name.into(),
        }
    }

    /// The name in an object's metadata.
    pub fn of(meta: &manifest::Metadata) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

/// The shared copy of a name many objects carry (a namespace, a node, a
/// zone): hundreds of thousands of them cost no string each.
pub(crate) fn intern(name: &str) -> Arc<str> {
    static NAMES: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Mutex::default);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = names.get(name) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(name);
    names.insert(shared.clone());
    shared
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Who this node is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub zone: Option<String>,
    pub ips: Vec<Ipv4Addr>,
}

/// The label that names a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl Node {
    /// A node's identity from its Node object: name, zone label, and its
    /// InternalIP/ExternalIP IPv4 addresses.
    pub fn from_manifest(node: &manifest::Node) -> Self {
        let ips = node
            .status
            .iter()
            .flat_map(|status| status.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(ZONE_LABEL).cloned()),
            ips,
        }
    }
}

/// L4 protocols the datapath balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IANA number the datapath keys on.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    /// The protocol of an IANA number, if the datapath balances it.
    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Where a frontend is reachable from (see `lb_common::scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Internal,
    External,
}

/// What clients address: one Service port on one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)?;
        if self.scope == Scope::External {
            f.write_str(" external")?;
        }
        Ok(())
    }
}

/// A backend: the pod address and the port its endpoint slice resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// One frontend as this node must program it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// `namespace/name:port-name` (`namespace/name` for an unnamed port),
    /// for logs and inspection.
    pub service_port: String,
    /// Backend tiers, most preferred first; the kernel uses the first
    /// non-empty one. At most `lb_common::MAX_TIERS`.
    pub tiers: Vec<BTreeSet<Endpoint>>,
    /// With every tier empty: drop (a Local policy without a local
    /// endpoint) rather than reject (a Service without endpoints).
    pub drop_when_empty: bool,
    /// ClientIP session affinity timeout, seconds.
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` (LoadBalancer addresses only): allowed
    /// client networks; empty allows every client.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// Which of its backends run on this node (their slice says so):
    /// external traffic reaches them without SNAT.
    pub local: Arc<BTreeSet<Ipv4Addr>>,
}

/// A healthCheckNodePort this node serves (LoadBalancer, Local policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready (or serving-terminating) endpoints on this node.
    pub local_endpoints: usize,
}

/// Everything this node must program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendAddr, DesiredFrontend>,
    /// healthCheckNodePorts by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Addresses of the endpoints that run on this node: external traffic
    /// reaches them without SNAT.
    pub local_endpoints: BTreeSet<Ipv4Addr>,
    /// The addresses only Services use: ClusterIPs, LoadBalancer and
    /// external IPs that are none of this node's.
    pub service_addrs: BTreeSet<Ipv4Addr>,
}

/// Applies every rule to `snapshot` for `node`: the fold of
/// [`service_frontends`] over every Service; with `allocate`, Services
/// written without ClusterIPs or node ports are given them from those
/// ranges (the file source). Objects that break a rule are skipped and
/// returned as problems; they never affect the others.
pub fn desired(
    snapshot: &Snapshot,
    node: &Node,
    allocate: Option<allocate::Ranges>,
) -> (Desired, Vec<Problem>) {
    let mut model = match allocate {
        Some(ranges) => Model::allocating(node.clone(), ranges),
        None => Model::new(node.clone()),
    };
    model.replace_all(snapshot);
    model.update();
    let mut problems = model.problems();
    problems.sort();
    problems.dedup();
    (model.desired(), problems)
}

/// What one Service asks of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceFrontends {
    pub frontends: Vec<(FrontendAddr, DesiredFrontend)>,
    /// Its healthCheckNodePort, with what it reports.
    pub health_check: Option<(u16, HealthCheck)>,
    /// Addresses of its endpoints on this node.
    pub local_endpoints: BTreeSet<Ipv4Addr>,
}

/// The frontends of Service `name` on `node`, from its slices (sorted by
/// slice name).
pub fn service_frontends(
    name: &ObjectName,
    service: &ParsedService,
    slices: &[&Slice],
    node: &Node,
) -> ServiceFrontends {
    let mut out = ServiceFrontends::default();
    // Endpoints of every port; their addresses on this node.
    let per_port: Vec<_> = service
        .ports
        .iter()
        .map(|port| endpoints::for_port(slices, port))
        .collect();
    out.local_endpoints = per_port
        .iter()
        .flatten()
        .filter(|(_, info)| info.node_name.as_deref() == Some(node.name.as_str()))
        .map(|(endpoint, _)| endpoint.ip)
        .collect();
    let local = Arc::new(out.local_endpoints.clone());
    let mut health_check_endpoints = BTreeSet::new();
    for (port, endpoints) in service.ports.iter().zip(&per_port) {
        let service_port = match port.name.as_str() {
            "" => name.to_string(),
            port => format!("{name}:{port}"),
        };
        let internal = policy::tiers(endpoints, service.internal_local, service.topology, node);
        let external = policy::tiers(endpoints, service.external_local, service.topology, node);
        // Pods reaching an external address are served cluster-wide,
        // whatever the external policy (kube-proxy short-circuits them).
        let cluster = policy::tiers(endpoints, false, service.topology, node);
        if service.external_local {
            health_check_endpoints.extend(external.tiers.iter().flatten().map(|e| e.ip));
        }
        let mut add = |ip: Ipv4Addr,
                       port_number: u16,
                       scope: Scope,
                       tiers: &policy::Tiers,
                       source_ranges: &[(Ipv4Addr, u8)]| {
            let addr = FrontendAddr {
                ip,
                port: port_number,
                protocol: port.protocol,
                scope,
            };
            out.frontends.push((
                addr,
                DesiredFrontend {
                    service_port: service_port.clone(),
                    tiers: tiers.tiers.clone(),
                    drop_when_empty: tiers.drop_when_empty,
                    affinity_timeout: service.affinity_timeout,
                    source_ranges: source_ranges.to_vec(),
                    local: local.clone(),
                },
            ));
        };
        for ip in &service.cluster_ips {
            add(*ip, port.port, Scope::Internal, &internal, &[]);
        }
        // Every external address twice: for clients outside (external
        // policy) and for pods (cluster-wide).
        let mut add_external =
            |ip: Ipv4Addr, port_number: u16, source_ranges: &[(Ipv4Addr, u8)]| {
                add(ip, port_number, Scope::External, &external, source_ranges);
                add(ip, port_number, Scope::Internal, &cluster, source_ranges);
            };
        // NodePorts on every node address (never loopback: CVE-2020-8558).
        if let Some(node_port) = port.node_port {
            for ip in node.ips.iter().filter(|ip| !ip.is_loopback()) {
                add_external(*ip, node_port, &[]);
            }
        }
        for ip in &service.load_balancer_ips {
            add_external(*ip, port.port, &service.source_ranges);
        }
        for ip in &service.external_ips {
            add_external(*ip, port.port, &[]);
        }
    }
    if let Some(port) = service.health_check_node_port {
        out.health_check = Some((
            port,
            HealthCheck {
                namespace: name.namespace.to_string(),
                name: name.name.clone(),
                local_endpoints: health_check_endpoints.len(),
            },
        ));
    }
    out
}

impl Desired {
    /// A reviewable text dump: one frontend a line, tiers in brackets.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (addr, frontend) in &self.frontends {
            out.push_str(&format!("{addr} {}", frontend.service_port));
            for tier in &frontend.tiers {
                let backends: Vec<String> = tier.iter().map(Endpoint::to_string).collect();
                out.push_str(&format!(" [{}]", backends.join(" ")));
            }
            if frontend.drop_when_empty {
                out.push_str(" drop-when-empty");
            }
            if let Some(timeout) = frontend.affinity_timeout {
                out.push_str(&format!(" affinity={timeout}s"));
            }
            if !frontend.source_ranges.is_empty() {
                let ranges: Vec<String> = frontend
                    .source_ranges
                    .iter()
                    .map(|(ip, len)| format!("{ip}/{len}"))
                    .collect();
                out.push_str(&format!(" source-ranges={}", ranges.join(",")));
            }
            out.push('\n');
        }
        if !self.local_endpoints.is_empty() {
            let ips: Vec<String> = self
                .local_endpoints
                .iter()
                .map(Ipv4Addr::to_string)
                .collect();
            out.push_str(&format!("local-endpoints {}\n", ips.join(" ")));
        }
        for (port, check) in &self.health_checks {
            out.push_str(&format!(
                "health-check :{port} {}/{} local-endpoints={}\n",
                check.namespace, check.name, check.local_endpoints
            ));
        }
        out
    }
}
