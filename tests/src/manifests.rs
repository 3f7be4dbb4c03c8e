//! Kubernetes YAML for the end-to-end tests and the demo, the way
//! `kubectl get -o yaml` shows it (clusterIP assigned, slices labelled).

use std::net::Ipv4Addr;

/// A port of a Service or of an EndpointSlice.
#[derive(Clone, Copy, Debug)]
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub protocol: &'a str,
}

impl<'a> Port<'a> {
    pub fn tcp(name: &'a str, port: u16) -> Self {
        Self {
            name,
            port,
            protocol: "TCP",
        }
    }

    pub fn udp(name: &'a str, port: u16) -> Self {
        Self {
            name,
            port,
            protocol: "UDP",
        }
    }
}

/// An endpoint of an EndpointSlice.
#[derive(Clone, Debug)]
pub struct Endpoint<'a> {
    pub ip: Ipv4Addr,
    pub node: &'a str,
    pub ready: bool,
    /// Serving while terminating (KEP-1672); with `ready: false`, the
    /// endpoint of a pod that is shutting down gracefully.
    pub terminating: bool,
    pub zone: Option<&'a str>,
    /// `hints.forZones`.
    pub for_zones: Vec<&'a str>,
}

impl<'a> Endpoint<'a> {
    /// A ready endpoint on `node`.
    pub fn ready(ip: Ipv4Addr, node: &'a str) -> Self {
        Self {
            ip,
            node,
            ready: true,
            terminating: false,
            zone: None,
            for_zones: Vec::new(),
        }
    }
}

/// A ClusterIP Service. `target_ports[i]` is the targetPort of `ports[i]`
/// (a number or a container port name).
pub fn service(name: &str, cluster_ip: Ipv4Addr, ports: &[Port], target_ports: &[&str]) -> String {
    service_with(name, cluster_ip, ports, target_ports, "", "")
}

/// [`service`] with extra `metadata` lines and extra `spec` lines (YAML,
/// indented by two spaces).
pub fn service_with(
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[Port],
    target_ports: &[&str],
    metadata: &str,
    spec: &str,
) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{metadata}spec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n{spec}  ports:\n"
    );
    for (i, port) in ports.iter().enumerate() {
        let target = target_ports.get(i).copied().unwrap_or("80");
        yaml.push_str(&format!(
            "  - name: \"{}\"\n    port: {}\n    protocol: {}\n    targetPort: {target}\n",
            port.name, port.port, port.protocol
        ));
    }
    yaml
}

/// An EndpointSlice of `service`.
pub fn endpoint_slice(
    service: &str,
    slice: &str,
    ports: &[Port],
    endpoints: &[Endpoint],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for port in ports {
        yaml.push_str(&format!(
            "- name: \"{}\"\n  port: {}\n  protocol: {}\n",
            port.name, port.port, port.protocol
        ));
    }
    yaml.push_str("endpoints:\n");
    for e in endpoints {
        let serving = e.ready || e.terminating;
        yaml.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {serving}, terminating: {}}}\n  nodeName: {}\n",
            e.ip, e.ready, e.terminating, e.node
        ));
        if let Some(zone) = e.zone {
            yaml.push_str(&format!("  zone: {zone}\n"));
        }
        if !e.for_zones.is_empty() {
            let zones: Vec<String> = e
                .for_zones
                .iter()
                .map(|z| format!("{{name: {z}}}"))
                .collect();
            yaml.push_str(&format!("  hints: {{forZones: [{}]}}\n", zones.join(", ")));
        }
    }
    yaml
}

/// Documents joined into one multi-document file.
pub fn documents(docs: &[String]) -> String {
    docs.join("---\n")
}
