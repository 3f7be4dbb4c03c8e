//! A Service's fields, validated: what the rest of the model works from.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use super::{ObjectName, Protocol, manifest::Service};
use crate::problem::{Invalid, Problem};

/// Services with this label belong to another proxy (any value), and ones
/// labelled headless are not proxied: kube-proxy's informer filters both.
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// KEP-2433's annotation, and the older one it replaced.
const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and maximum.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT: i32 = 86_400;

/// A Service port, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name ("" when unnamed): EndpointSlice ports match on it.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The node port, for NodePort and LoadBalancer Services that have one.
    pub node_port: Option<u16>,
    /// A NodePort or LoadBalancer port written without its node port (the
    /// file source allocates one).
    pub wants_node_port: bool,
}

impl ServicePort {
    /// What its node port is allocated for: the port number (a TCP and a
    /// UDP port of one number share a node port, as kube-apiserver gives
    /// them).
    pub fn allocation_key(&self) -> String {
        self.port.to_string()
    }
}

/// Which endpoints topology lets a node prefer (KEP-2433, KEP-3015).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// No preference: every endpoint.
    None,
    /// `hints.forZones` (topology-mode Auto, PreferClose, PreferSameZone).
    SameZone,
    /// `hints.forNodes`, then `hints.forZones` (PreferSameNode).
    SameNode,
}

/// The parts of a Service the model uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedService {
    pub cluster_ips: Vec<Ipv4Addr>,
    /// Written without a clusterIP (the file source allocates one).
    pub wants_cluster_ip: bool,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `loadBalancerSourceRanges`, as (network, prefix length).
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    pub ports: Vec<ServicePort>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (NodePort and LoadBalancer only).
    pub external_local: bool,
    /// ClientIP session affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub health_check_node_port: Option<u16>,
    /// A LoadBalancer with a Local policy written without its
    /// healthCheckNodePort (the file source allocates one).
    pub wants_health_check_node_port: bool,
    pub topology: Topology,
    /// Whether it selects pods; the Endpoints of a Service that does not
    /// are mirrored into slices.
    pub has_selector: bool,
}

/// A Service as the model keeps it: validated once, whatever the node, with
/// what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceObject {
    /// `None`: not programmed (another proxy's, not a proxied type, or
    /// invalid: then `problems` says why).
    pub service: Option<ParsedService>,
    pub problems: Vec<Problem>,
    /// The ClusterIPs and node ports (healthCheckNodePort included) it
    /// writes, programmed or not: no allocation hands them out, as
    /// kube-apiserver reserves every Service's.
    pub explicit: Explicit,
}

/// Values a Service's spec writes itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Explicit {
    pub cluster_ips: Vec<Ipv4Addr>,
    pub node_ports: Vec<u16>,
}

/// Parses one Service object.
pub fn parse_object(svc: &Service) -> (ObjectName, ServiceObject) {
    let name = ObjectName::of(&svc.metadata);
    let mut problems = Vec::new();
    let service = parse(svc, &name, &mut problems);
    let explicit = explicit(svc);
    (
        name,
        ServiceObject {
            service,
            problems,
            explicit,
        },
    )
}

/// The valid ClusterIPs and node ports `svc`'s spec writes.
fn explicit(svc: &Service) -> Explicit {
    let Some(spec) = &svc.spec else {
        return Explicit::default();
    };
    let cluster_ips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(&spec.cluster_ip)
        .filter_map(|ip| ip.parse().ok())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let node_ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.node_port)
        .chain(spec.health_check_node_port)
        .filter_map(valid_port)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    Explicit {
        cluster_ips,
        node_ports,
    }
}

/// Validates `svc`. `None` when it is not programmed: another proxy's, not
/// a proxied type, or invalid (then a problem says why).
fn parse(
    svc: &Service,
    object_name: &ObjectName,
    problems: &mut Vec<Problem>,
) -> Option<ParsedService> {
    let object = format!("Service {object_name}");
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return None;
    }
    let mut raw_ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if raw_ips.is_empty() {
        raw_ips.extend(spec.cluster_ip.as_deref());
    }
    // Headless Services are not proxied.
    if raw_ips.contains(&"None") {
        return None;
    }
    let mut ips = |what: &str, raw: &[&str]| -> Option<Vec<Ipv4Addr>> {
        let mut v4 = Vec::new();
        for raw in raw.iter().filter(|ip| !ip.is_empty()) {
            match raw.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => v4.push(ip),
                Ok(IpAddr::V6(_)) => problems.push(Problem::new(
                    &object,
                    Invalid::Unsupported(format!("IPv6 {what} {raw}")),
                )),
                Err(_) => {
                    problems.push(Problem::new(&object, Invalid::Ip(raw.to_string())));
                    return None;
                }
            }
        }
        Some(v4)
    };
    let wants_cluster_ip = raw_ips.iter().all(|ip| ip.is_empty());
    let cluster_ips = ips("clusterIP", &raw_ips)?;
    let raw_external: Vec<&str> = spec
        .external_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let external_ips = ips("externalIP", &raw_external)?;
    // An ingress address is the load balancer's report, not the user's
    // spec: a bad one is skipped alone, as kube-proxy does.
    let mut load_balancer_ips = Vec::new();
    if type_ == "LoadBalancer" {
        let ingress_ips = svc
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|ingress| ingress.ip.as_deref())
            .filter(|ip| !ip.is_empty());
        for raw in ingress_ips {
            match raw.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => load_balancer_ips.push(ip),
                Ok(IpAddr::V6(_)) => problems.push(Problem::new(
                    &object,
                    Invalid::Unsupported(format!("IPv6 load balancer IP {raw}")),
                )),
                Err(_) => problems.push(Problem::new(&object, Invalid::Ip(raw.to_owned()))),
            }
        }
    }
    let mut source_ranges = Vec::new();
    for raw in spec.load_balancer_source_ranges.iter().flatten() {
        match parse_cidr(raw.trim()) {
            Some(Ok(range)) => source_ranges.push(range),
            Some(Err(())) => problems.push(Problem::new(
                &object,
                Invalid::Unsupported(format!("IPv6 loadBalancerSourceRange {raw}")),
            )),
            None => {
                problems.push(Problem::new(&object, Invalid::Ip(raw.clone())));
                return None;
            }
        }
    }
    let has_node_ports = matches!(type_, "NodePort" | "LoadBalancer")
        && !(type_ == "LoadBalancer" && spec.allocate_load_balancer_node_ports == Some(false));
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => {
                let what = format!("SCTP (port {})", port.port);
                problems.push(Problem::new(&object, Invalid::Unsupported(what)));
                continue;
            }
            other => {
                problems.push(Problem::new(&object, Invalid::Protocol(other.to_owned())));
                return None;
            }
        };
        let Some(number) = valid_port(port.port) else {
            problems.push(Problem::new(&object, Invalid::Port(port.port)));
            return None;
        };
        let node_port = match port.node_port.filter(|_| has_node_ports) {
            Some(raw) => match valid_port(raw) {
                Some(p) => Some(p),
                None => {
                    problems.push(Problem::new(&object, Invalid::Port(raw)));
                    return None;
                }
            },
            None => None,
        };
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
            node_port,
            wants_node_port: has_node_ports && node_port.is_none(),
        });
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|t| (1..=MAX_AFFINITY_TIMEOUT).contains(t))
            .map_or(DEFAULT_AFFINITY_TIMEOUT, |t| t as u32)
    });
    let external_local = matches!(type_, "NodePort" | "LoadBalancer")
        && spec.external_traffic_policy.as_deref() == Some("Local");
    let has_health_check = type_ == "LoadBalancer" && external_local;
    let written_health_check = spec.health_check_node_port.filter(|_| has_health_check);
    let health_check_node_port = written_health_check.and_then(valid_port);
    if let Some(raw) = written_health_check.filter(|_| health_check_node_port.is_none()) {
        problems.push(Problem::new(&object, Invalid::Port(raw)));
    }
    Some(ParsedService {
        wants_cluster_ip,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        source_ranges,
        ports,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local,
        affinity_timeout,
        health_check_node_port,
        wants_health_check_node_port: has_health_check && written_health_check.is_none(),
        has_selector: spec.selector.as_ref().is_some_and(|s| !s.is_empty()),
        topology: topology(
            svc.metadata.annotations.as_ref(),
            spec.traffic_distribution.as_deref(),
        ),
    })
}

/// The topology a Service asks for (KEP-2433 annotation, KEP-4444/3015
/// `trafficDistribution`).
fn topology(
    annotations: Option<&BTreeMap<String, String>>,
    distribution: Option<&str>,
) -> Topology {
    match distribution {
        Some("PreferSameNode") => return Topology::SameNode,
        Some("PreferClose" | "PreferSameZone") => return Topology::SameZone,
        _ => {}
    }
    let annotation = annotations.and_then(|a| {
        a.get(TOPOLOGY_MODE_ANNOTATION)
            .or_else(|| a.get(TOPOLOGY_HINTS_ANNOTATION))
    });
    match annotation.map(|v| v.to_ascii_lowercase()).as_deref() {
        Some("auto") => Topology::SameZone,
        _ => Topology::None,
    }
}

/// An IPv4 CIDR: `Some(Ok)`; an IPv6 one: `Some(Err)`; garbage: `None`.
fn parse_cidr(raw: &str) -> Option<Result<(Ipv4Addr, u8), ()>> {
    let (ip, len) = raw.split_once('/').unwrap_or((raw, ""));
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V6(_) => Some(Err(())),
        IpAddr::V4(ip) => {
            let len: u8 = if len.is_empty() {
                32
            } else {
                len.parse().ok()?
            };
            (len <= 32).then_some(Ok((ip, len)))
        }
    }
}

/// A port number in 1-65535.
pub fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}
