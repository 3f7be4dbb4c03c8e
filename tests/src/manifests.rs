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
}

/// A ClusterIP Service. `target_ports[i]` is the targetPort of `ports[i]`
/// (a number or a container port name).
pub fn service(name: &str, cluster_ip: Ipv4Addr, ports: &[Port], target_ports: &[&str]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ports:\n"
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
    for endpoint in endpoints {
        yaml.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: false}}\n  nodeName: {}\n",
            endpoint.ip, endpoint.ready, endpoint.ready, endpoint.node
        ));
    }
    yaml
}

/// Documents joined into one multi-document file.
pub fn documents(docs: &[String]) -> String {
    docs.join("---\n")
}
