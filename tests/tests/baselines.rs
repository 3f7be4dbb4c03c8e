//! The benchmark's baselines work: kube-proxy's iptables and nftables rules
//! for the scenario's Service, behind 100 other Services, loaded on node1
//! of the netns cluster (no xlb agent), balance the client pod's requests
//! over every replica, keeping the pod's address; and kube-proxy's partial
//! updates of one Service apply on top.

use std::collections::BTreeSet;

use xlb_tests::{
    baseline::{self, BenchService},
    cluster::Cluster,
    echo::tcp_request,
    netns::run_with_input,
    require_root,
    scenario::{self, REPLICAS, TARGET_PORT, frontend},
};

fn services(cluster: &Cluster, replicas: &[&str]) -> Vec<BenchService> {
    let mut services: Vec<BenchService> = (0..100u32)
        .map(|i| BenchService {
            namespace: "bench".into(),
            name: format!("filler-{i}"),
            ip: std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 97, 0, 0)) + i),
            port: 80,
            protocol: "tcp",
            endpoints: (0..10u32)
                .map(|e| {
                    let ip = u32::from(std::net::Ipv4Addr::new(10, 250, 0, 0)) + i * 16 + e;
                    (ip.into(), 8080)
                })
                .collect(),
        })
        .collect();
    services.push(BenchService {
        namespace: "default".into(),
        name: scenario::SERVICE.into(),
        ip: scenario::CLUSTER_IP,
        port: scenario::PORT,
        protocol: "tcp",
        endpoints: REPLICAS
            .iter()
            .filter(|(name, _)| replicas.contains(name))
            .map(|(name, _)| (cluster.pod(name).ip, TARGET_PORT))
            .collect(),
    });
    services
}

/// The replicas that answer 30 requests of the client pod.
fn answering(cluster: &Cluster) -> BTreeSet<String> {
    let client = cluster.pod("client");
    (0..30)
        .map(|_| {
            let reply = client.run(|| tcp_request(frontend())).unwrap();
            assert_eq!(reply.client_ip, client.ip, "the pod's address is kept");
            reply.from
        })
        .collect()
}

#[test]
fn iptables_baseline_balances_and_updates_one_service() {
    require_root!();
    let cluster = scenario::cluster().unwrap();
    let node = &cluster.nodes[0].ns;
    let all = services(&cluster, &["web-0", "web-1", "web-2"]);
    run_with_input(
        &mut node.command("iptables-restore"),
        &baseline::iptables_restore(&all),
    )
    .unwrap();
    assert_eq!(answering(&cluster).len(), 3);
    let fewer = services(&cluster, &["web-2"]);
    run_with_input(
        node.command("iptables-restore").arg("--noflush"),
        &baseline::iptables_partial(fewer.last().unwrap()),
    )
    .unwrap();
    assert_eq!(answering(&cluster), BTreeSet::from(["web-2".to_owned()]));
}

#[test]
fn nftables_baseline_balances_and_updates_one_service() {
    require_root!();
    let cluster = scenario::cluster().unwrap();
    let node = &cluster.nodes[0].ns;
    let all = services(&cluster, &["web-0", "web-1", "web-2"]);
    run_with_input(
        node.command("nft").args(["-f", "-"]),
        &baseline::nft_ruleset(&all),
    )
    .unwrap();
    assert_eq!(answering(&cluster).len(), 3);
    let fewer = services(&cluster, &["web-2"]);
    run_with_input(
        node.command("nft").args(["-f", "-"]),
        &baseline::nft_incremental(fewer.last().unwrap()),
    )
    .unwrap();
    assert_eq!(answering(&cluster), BTreeSet::from(["web-2".to_owned()]));
}
