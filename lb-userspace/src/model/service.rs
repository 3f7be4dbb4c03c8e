//! A Service's fields, validated: what the rest of the model works from.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;

use super::Protocol;
use crate::problem::{Invalid, Problem};

/// A Service port, validated.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// The port's name ("" when unnamed): EndpointSlice ports match on it.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// The parts of a Service the model uses, validated.
#[derive(Debug, Clone)]
pub struct ParsedService {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
}

/// `namespace/name` of an object's metadata.
pub fn object_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Validates `svc`. `None` when it is not programmed: not a proxied type,
/// or invalid (then a problem says why).
pub fn parse(svc: &Service, problems: &mut Vec<Problem>) -> Option<ParsedService> {
    let (namespace, name) = object_name(&svc.metadata);
    let object = format!("Service {namespace}/{name}");
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
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
    let mut cluster_ips = Vec::new();
    for raw in raw_ips.into_iter().filter(|ip| !ip.is_empty()) {
        match raw.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => cluster_ips.push(ip),
            Ok(IpAddr::V6(_)) => problems.push(Problem::new(
                &object,
                Invalid::Unsupported(format!("IPv6 clusterIP {raw}")),
            )),
            Err(_) => {
                problems.push(Problem::new(&object, Invalid::Ip(raw.to_owned())));
                return None;
            }
        }
    }
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
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
        });
    }
    Some(ParsedService {
        namespace,
        name,
        cluster_ips,
        ports,
    })
}

/// A port number in 1-65535.
pub fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}
