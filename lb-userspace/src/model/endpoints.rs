//! EndpointSlices: grouped by Service, validated, and resolved per port.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    Endpoint, Protocol,
    service::{ServicePort, object_name, valid_port},
};
use crate::problem::{Invalid, Problem};

/// The label that ties a slice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A slice port, validated.
#[derive(Debug, Clone)]
pub struct SlicePort {
    name: String,
    port: u16,
    protocol: Option<Protocol>,
}

/// One endpoint of a slice, validated.
#[derive(Debug, Clone)]
pub struct SliceEndpoint {
    pub ips: Vec<Ipv4Addr>,
    pub ready: bool,
}

/// A slice, validated.
#[derive(Debug, Clone)]
pub struct Slice {
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

/// The valid IPv4 slices of every Service, by (namespace, service name).
pub fn by_service(
    slices: &[EndpointSlice],
    problems: &mut Vec<Problem>,
) -> HashMap<(String, String), Vec<Slice>> {
    let mut by_service: HashMap<(String, String), Vec<Slice>> = HashMap::new();
    for slice in slices {
        let (namespace, name) = object_name(&slice.metadata);
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        // IPv6 and FQDN slices are not ours (yet).
        if slice.address_type != "IPv4" {
            continue;
        }
        let object = format!("EndpointSlice {namespace}/{name}");
        if let Some(parsed) = parse(slice, &object, problems) {
            by_service
                .entry((namespace, service.clone()))
                .or_default()
                .push(parsed);
        }
    }
    by_service
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
    for endpoint in slice.endpoints.iter().flatten() {
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
        let conditions = endpoint.conditions.as_ref();
        endpoints.push(SliceEndpoint {
            ips,
            // "nil should be interpreted as true" (EndpointConditions.ready).
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        });
    }
    Some(Slice { ports, endpoints })
}

/// The ready backends of `port` over all `slices`. Each slice resolves the
/// port by name itself (a named targetPort may map to different numbers in
/// different slices); an endpoint listed in two slices counts once.
pub fn ready_for_port(slices: &[Slice], port: &ServicePort) -> BTreeSet<Endpoint> {
    let mut backends = BTreeSet::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == Some(port.protocol))
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
            // Kubernetes uses the first address of an endpoint.
            if let Some(ip) = endpoint.ips.first() {
                backends.insert(Endpoint {
                    ip: *ip,
                    port: slice_port.port,
                });
            }
        }
    }
    backends
}
