//! End to end: healthCheckNodePort. For a LoadBalancer Service with
//! `externalTrafficPolicy: Local`, each node answers on that port of its
//! address — 200 with kube-proxy's JSON when it has a local endpoint, 503
//! otherwise — and follows endpoint and Service changes.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::ensure;
use xlb_tests::{
    cluster::{Cluster, eventually, http_get},
    manifests::{Endpoint, Port, documents, endpoint_slice, service_with},
    require_root, scenario,
};

const HEALTH_PORT: u16 = 32_000;

fn manifests(cluster: &Cluster, replicas: &[&str]) -> String {
    let spec = format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n");
    let service = service_with(
        "lb",
        "10.96.0.50".parse().unwrap(),
        &[Port::tcp("", 80)],
        &["80"],
        "",
        &spec,
    )
    .replace("type: ClusterIP", "type: LoadBalancer");
    let endpoints: Vec<Endpoint> = scenario::REPLICAS
        .iter()
        .filter(|(name, _)| replicas.contains(name))
        .map(|(name, node)| Endpoint::ready(cluster.pod(name).ip, &cluster.nodes[*node].name))
        .collect();
    documents(&[
        service,
        endpoint_slice("lb", "lb-1", &[Port::tcp("", 80)], &endpoints),
    ])
}

/// What node `node`'s health check port answers, asked from the LAN.
fn health(cluster: &Cluster, node: usize) -> anyhow::Result<(u16, serde_json::Value)> {
    let addr = SocketAddrV4::new(cluster.nodes[node].ip, HEALTH_PORT);
    let (status, body) = cluster.lan().enter(|| http_get(addr, "/"))??;
    Ok((status, serde_json::from_str(&body)?))
}

#[test]
fn health_check_node_port_reports_local_endpoints_and_follows_changes() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    cluster
        .lan()
        .ip("addr add 192.168.77.100/24 dev br0")
        .unwrap();
    cluster
        .write_manifest("lb.yaml", &manifests(&cluster, &["web-0", "web-1"]))
        .unwrap();
    cluster.start_agents().unwrap();
    let expect = |node: usize, status: u16, local: u64| {
        eventually("health check answer", Duration::from_secs(2), || {
            let (got, body) = health(&cluster, node)?;
            ensure!(
                got == status && body["localEndpoints"] == local,
                "{got} {body}"
            );
            ensure!(body["service"]["namespace"] == "default" && body["service"]["name"] == "lb");
            Ok(())
        })
        .unwrap();
    };
    expect(0, 200, 2);
    expect(1, 503, 0);
    // The endpoints move to node2.
    cluster
        .write_manifest("lb.yaml", &manifests(&cluster, &["web-2"]))
        .unwrap();
    expect(0, 503, 0);
    expect(1, 200, 1);
    // The Service goes: so does the port.
    cluster.remove_manifest("lb.yaml").unwrap();
    eventually("health check port closed", Duration::from_secs(2), || {
        ensure!(health(&cluster, 1).is_err());
        Ok(())
    })
    .unwrap();
}
