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
            external: None,
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
        external: None,
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

/// The north-south benchmark's set-up works in every mode: kube-proxy's
/// node-port and load-balancer rules as the benchmark loads them, and xlb
/// with TC only and with XDP; the Cluster path is SNATed to node1, the
/// Local one keeps the client's address.
#[test]
fn north_south_paths_answer_in_every_mode() {
    use xlb_tests::{
        bench_ns::{self, Mode, Path},
        cluster::EXTERNAL_CLIENT_IP,
    };
    require_root!();
    for mode in [Mode::Iptables, Mode::Nftables, Mode::XlbTc, Mode::XlbXdp] {
        let (mut cluster, _servers) = bench_ns::cluster().unwrap();
        let list = bench_ns::services(&cluster, 10);
        bench_ns::program(&mut cluster, mode, &list).unwrap();
        for path in Path::ALL {
            for target in bench_ns::targets(&cluster, mode, path) {
                let reply = cluster.from_outside(|| tcp_request(target)).unwrap();
                let kept = reply.client_ip == EXTERNAL_CLIENT_IP;
                match path {
                    Path::NodePortCluster => assert!(!kept, "{mode:?} {path:?}: SNAT"),
                    Path::NodePortLocal => assert!(kept, "{mode:?} {path:?}: {reply:?}"),
                    Path::LoadBalancer => {}
                }
            }
        }
    }
}
