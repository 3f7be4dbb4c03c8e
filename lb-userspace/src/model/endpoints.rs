//! EndpointSlices: validated one by one, and resolved per Service port.

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc};

use super::{
    Endpoint, ObjectName, Protocol, intern,
    manifest::{self, EndpointSlice},
    service::{ServicePort, valid_port},
};
use crate::problem::{Invalid, Problem};

/// The label that ties a slice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A slice port, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SlicePort {
    name: String,
    port: u16,
    protocol: Option<Protocol>,
}

/// One endpoint of a slice, validated: what the policies need of it.
/// Node and zone names are shared (a cluster has few), so that hundreds of
/// thousands of endpoints cost no string each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The first address (Kubernetes uses only that one).
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub for_zones: Box<[Arc<str>]>,
    pub for_nodes: Box<[Arc<str>]>,
}

/// A slice, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    ports: Vec<SlicePort>,
    endpoints: Vec<EndpointInfo>,
}

/// An EndpointSlice as the model keeps it: validated once, whatever the
/// node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceObject {
    /// The Service it belongs to (same namespace); `None`: not ours (no
    /// Service label, or not IPv4).
    pub service: Option<String>,
    /// `None` when invalid (`problems` says why) or not ours.
    pub slice: Option<Slice>,
    pub problems: Vec<Problem>,
}

/// Parses one EndpointSlice object.
pub fn parse_object(slice: &EndpointSlice) -> (ObjectName, SliceObject) {
    let name = ObjectName::of(&slice.metadata);
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        // IPv6 and FQDN slices are not ours (yet).
        .filter(|_| slice.address_type == "IPv4")
        .cloned();
    let mut problems = Vec::new();
    let parsed = service
        .as_ref()
        .and_then(|_| parse(slice, &format!("EndpointSlice {name}"), &mut problems));
    (
        name,
        SliceObject {
            service,
            slice: parsed,
            problems,
        },
    )
}

fn parse(slice: &EndpointSlice, object: &str, problems: &mut Vec<Problem>) -> Option<Slice> {
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        // A slice port without a number matches no Service port.
        let Some(raw) = port.port else { continue };
        let Some(number) = valid_port(raw) else {
            problems.push(Problem::new(object, Invalid::Port(raw)));
            return None;
        };
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => None,
            other => {
                problems.push(Problem::new(object, Invalid::Protocol(other.to_owned())));
                return None;
            }
        };
        ports.push(SlicePort {
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
        });
    }
    let mut endpoints = Vec::new();
    for endpoint in &slice.endpoints {
        let mut ips = Vec::new();
        for raw in &endpoint.addresses {
            match raw.parse::<Ipv4Addr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => {
                    problems.push(Problem::new(object, Invalid::Ip(raw.clone())));
                    return None;
                }
            }
        }
        let Some(ip) = ips.first().copied() else {
            continue;
        };
        let conditions = endpoint.conditions.as_ref();
        let hints = endpoint.hints.as_ref();
        endpoints.push(EndpointInfo {
            ip,
            // "nil should be interpreted as true" for ready; serving follows
            // ready when unset, terminating defaults to false (KEP-1672).
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions
                .and_then(|c| c.serving.or(c.ready))
                .unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node_name: endpoint.node_name.as_deref().map(intern),
            zone: endpoint.zone.as_deref().map(intern),
            for_zones: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| intern(&z.name)).collect())
                .unwrap_or_default(),
            for_nodes: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| intern(&n.name)).collect())
                .unwrap_or_default(),
        });
    }
    Some(Slice { ports, endpoints })
}

/// What keeps an Endpoints object from being mirrored: the label (value
/// `true`), and the annotation of leader-election locks.
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
const LEADER_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";
/// The mirroring controller's default `--mirroring-max-endpoints-per-subset`.
const MAX_MIRRORED_PER_SUBSET: usize = 1000;

/// A `v1 Endpoints` as the model keeps it: the slices the EndpointSlice
/// mirroring controller makes of it, one per subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointsObject {
    /// `None`: not mirrored (labelled so, or a leader-election lock).
    pub slices: Option<Vec<Slice>>,
    pub problems: Vec<Problem>,
}

/// Parses one Endpoints object into the slices mirroring would make: each
/// subset's ports; its `addresses` ready, its `notReadyAddresses` not, at
/// most [`MAX_MIRRORED_PER_SUBSET`] of them; a bad address or port is
/// skipped alone and reported; IPv6 addresses belong to IPv6 slices (not
/// ours yet).
pub fn parse_endpoints(object: &manifest::Endpoints) -> (ObjectName, EndpointsObject) {
    let name = ObjectName::of(&object.metadata);
    let meta = &object.metadata;
    let skipped = meta
        .labels
        .as_ref()
        .is_some_and(|l| l.get(SKIP_MIRROR_LABEL).is_some_and(|v| v == "true"))
        || meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(LEADER_ANNOTATION));
    if skipped {
        let unmirrored = EndpointsObject {
            slices: None,
            problems: Vec::new(),
        };
        return (name, unmirrored);
    }
    let what = format!("Endpoints {name}");
    let mut problems = Vec::new();
    let mut slices = Vec::new();
    for subset in &object.subsets {
        let mut ports = Vec::new();
        for port in &subset.ports {
            let Some(raw) = port.port else { continue };
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Some(Protocol::Tcp),
                "UDP" => Some(Protocol::Udp),
                "SCTP" => None,
                other => {
                    problems.push(Problem::new(&what, Invalid::Protocol(other.to_owned())));
                    continue;
                }
            };
            let Some(number) = valid_port(raw) else {
                problems.push(Problem::new(&what, Invalid::Port(raw)));
                continue;
            };
            ports.push(SlicePort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                protocol,
            });
        }
        let addresses = subset
            .addresses
            .iter()
            .map(|a| (a, true))
            .chain(subset.not_ready_addresses.iter().map(|a| (a, false)));
        let mut endpoints = Vec::new();
        for (address, ready) in addresses {
            let ip = match address.ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => ip,
                Ok(std::net::IpAddr::V6(_)) => continue,
                Err(_) => {
                    problems.push(Problem::new(&what, Invalid::Ip(address.ip.clone())));
                    continue;
                }
            };
            if endpoints.len() == MAX_MIRRORED_PER_SUBSET {
                let more = format!(
                    "more than {MAX_MIRRORED_PER_SUBSET} addresses in one subset \
                     (the rest are not mirrored, as in a cluster)"
                );
                problems.push(Problem::new(&what, Invalid::Unsupported(more)));
                break;
            }
            endpoints.push(EndpointInfo {
                ip,
                ready,
                serving: ready,
                terminating: false,
                node_name: address.node_name.as_deref().map(intern),
                zone: None,
                for_zones: Box::default(),
                for_nodes: Box::default(),
            });
        }
        slices.push(Slice { ports, endpoints });
    }
    (
        name,
        EndpointsObject {
            slices: Some(slices),
            problems,
        },
    )
}

/// Every endpoint of `port` over all `slices` (sorted by slice name), with
/// the port number its own slice resolves (a named targetPort may map to
/// different numbers in different slices). An endpoint listed in two
/// slices (a slice reshuffle in progress) counts once: the first slice by
/// name wins.
pub fn for_port(slices: &[&Slice], port: &ServicePort) -> Vec<(Endpoint, EndpointInfo)> {
    let mut endpoints: Vec<(Endpoint, EndpointInfo)> = Vec::new();
    let mut seen = HashSet::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == Some(port.protocol))
        else {
            continue;
        };
        for info in &slice.endpoints {
            let endpoint = Endpoint {
                ip: info.ip,
                port: slice_port.port,
            };
            if seen.insert(endpoint) {
                endpoints.push((endpoint, info.clone()));
            }
        }
    }
    endpoints
}
