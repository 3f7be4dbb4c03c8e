//! The scenario most end-to-end tests and the demo start from: the docs'
//! `sample-clusterip` Service (port 8080 → targetPort 80) over a 3-replica
//! echo "Deployment" spread over two nodes, and a client pod.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;

use crate::{
    cluster::Cluster,
    manifests::{Endpoint, Port, documents, endpoint_slice, service, service_with},
};

pub const SERVICE: &str = "sample-clusterip";
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const PORT: u16 = 8080;
pub const TARGET_PORT: u16 = 80;
/// The replicas: name and node index.
pub const REPLICAS: [(&str, usize); 3] = [("web-0", 0), ("web-1", 0), ("web-2", 1)];

/// The frontend clients address.
pub fn frontend() -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, PORT)
}

/// Two nodes in two zones with the replicas, a client on each node, and no
/// agent yet.
pub fn cluster() -> Result<Cluster> {
    let mut cluster = Cluster::new(&["zone-a", "zone-b"])?;
    for (name, node) in REPLICAS {
        cluster.add_pod(node, name, &[TARGET_PORT])?;
    }
    cluster.add_pod(0, "client", &[])?;
    cluster.add_pod(1, "client-2", &[])?;
    Ok(cluster)
}

/// The Service and its EndpointSlice with the replicas named in `ready`.
pub fn manifests(cluster: &Cluster, ready: &[&str]) -> String {
    let ports = [Port::tcp("", PORT), Port::udp("udp", PORT)];
    let endpoints: Vec<Endpoint> = REPLICAS
        .iter()
        .filter(|(name, _)| ready.contains(name))
        .map(|(name, node)| Endpoint::ready(cluster.pod(name).ip, &cluster.nodes[*node].name))
        .collect();
    let slice_ports = [Port::tcp("", TARGET_PORT), Port::udp("udp", TARGET_PORT)];
    documents(&[
        service(SERVICE, CLUSTER_IP, &ports, &["80", "80"]),
        endpoint_slice(
            SERVICE,
            &format!("{SERVICE}-abcde"),
            &slice_ports,
            &endpoints,
        ),
    ])
}

/// The scenario's cluster with every replica ready and the agents running.
pub fn running() -> Result<Cluster> {
    let mut cluster = cluster()?;
    cluster.write_manifest(
        "sample.yaml",
        &manifests(&cluster, &["web-0", "web-1", "web-2"]),
    )?;
    cluster.start_agents()?;
    Ok(cluster)
}

/// A Service of the rule tests on `ip`: TCP and UDP port `port` to the
/// replicas' `TARGET_PORT`, extra metadata and spec lines, over `endpoints`.
pub fn rule_service(
    name: &str,
    ip: Ipv4Addr,
    port: u16,
    metadata: &str,
    spec: &str,
    endpoints: &[Endpoint],
) -> String {
    let ports = [Port::tcp("", port), Port::udp("udp", port)];
    let slice_ports = [Port::tcp("", TARGET_PORT), Port::udp("udp", TARGET_PORT)];
    let target = TARGET_PORT.to_string();
    documents(&[
        service_with(name, ip, &ports, &[&target, &target], metadata, spec),
        endpoint_slice(name, &format!("{name}-1"), &slice_ports, endpoints),
    ])
}

/// The replicas as endpoints, in their nodes' zones and (when `hinted`)
/// hinted for them.
pub fn replicas(cluster: &Cluster, hinted: bool) -> Vec<Endpoint<'_>> {
    REPLICAS
        .iter()
        .map(|(name, node)| {
            let zone = cluster.nodes[*node].zone.as_str();
            Endpoint {
                zone: Some(zone),
                for_zones: if hinted { vec![zone] } else { vec![] },
                ..Endpoint::ready(cluster.pod(name).ip, &cluster.nodes[*node].name)
            }
        })
        .collect()
}
