//! The model: a snapshot of Services and EndpointSlices plus this node's
//! identity in, the frontends and backend tiers this node must program out.
//! Pure (no I/O); every Kubernetes rule lives here and nowhere else.

mod endpoints;
mod service;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use crate::{problem::Problem, source::Snapshot};

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
    pub fn from_k8s(node: &k8s_openapi::api::core::v1::Node) -> Self {
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
}

/// Everything this node must program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendAddr, DesiredFrontend>,
}

/// Applies every rule to `snapshot` for `node`. Objects that break a rule
/// are skipped and returned as problems; they never affect the others.
pub fn desired(snapshot: &Snapshot, node: &Node) -> (Desired, Vec<Problem>) {
    let _ = node; // Node-dependent rules (traffic policies, topology) use it.
    let mut problems = snapshot.problems.clone();
    let endpoints = endpoints::by_service(&snapshot.endpoint_slices, &mut problems);
    let mut desired = Desired::default();
    for svc in &snapshot.services {
        let Some(service) = service::parse(svc, &mut problems) else {
            continue;
        };
        let slices = endpoints.get(&(service.namespace.clone(), service.name.clone()));
        for port in &service.ports {
            let backends: BTreeSet<Endpoint> = slices
                .map(|slices| endpoints::ready_for_port(slices, port))
                .unwrap_or_default();
            let service_port = match port.name.as_str() {
                "" => format!("{}/{}", service.namespace, service.name),
                name => format!("{}/{}:{name}", service.namespace, service.name),
            };
            for ip in &service.cluster_ips {
                let addr = FrontendAddr {
                    ip: *ip,
                    port: port.port,
                    protocol: port.protocol,
                    scope: Scope::Internal,
                };
                desired.frontends.insert(
                    addr,
                    DesiredFrontend {
                        service_port: service_port.clone(),
                        tiers: vec![backends.clone()],
                    },
                );
            }
        }
    }
    problems.sort();
    problems.dedup();
    (desired, problems)
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
            out.push('\n');
        }
        out
    }
}
