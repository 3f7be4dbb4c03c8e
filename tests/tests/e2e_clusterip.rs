//! End to end: a pod reaches a ClusterIP Service over real TCP and UDP; the
//! load spreads over every backend on both nodes; the backend sees the pod's
//! own address; named target ports resolve per EndpointSlice.

use std::{collections::BTreeSet, net::SocketAddrV4, time::Duration};

use xlb_tests::{
    cluster::{Cluster, eventually},
    echo::{Reply, tcp_request, udp_request},
    manifests::{Endpoint, Port, documents, endpoint_slice, service},
    require_root,
    scenario::{self, frontend},
};

/// `n` requests from `pod`, the backends that answered.
fn spread(
    cluster: &Cluster,
    pod: &str,
    n: usize,
    request: fn(SocketAddrV4) -> anyhow::Result<Reply>,
) -> Vec<Reply> {
    cluster.pod(pod).run(|| {
        (0..n)
            .map(|_| request(frontend()).expect("request"))
            .collect()
    })
}

#[test]
fn tcp_spreads_over_all_backends_on_both_nodes_and_keeps_the_pod_source() {
    require_root!();
    let cluster = scenario::running().unwrap();
    for client in ["client", "client-2"] {
        let replies = spread(&cluster, client, 30, tcp_request);
        let backends: BTreeSet<&str> = replies.iter().map(|r| r.from.as_str()).collect();
        assert_eq!(
            backends,
            BTreeSet::from(["web-0", "web-1", "web-2"]),
            "from {client}"
        );
        let client_ip = cluster.pod(client).ip;
        assert!(
            replies.iter().all(|r| r.client_ip == client_ip),
            "pod source kept: {replies:?}"
        );
    }
}

#[test]
fn udp_spreads_over_all_backends() {
    require_root!();
    let cluster = scenario::running().unwrap();
    let replies = spread(&cluster, "client", 30, udp_request);
    let backends: BTreeSet<&str> = replies.iter().map(|r| r.from.as_str()).collect();
    assert_eq!(backends, BTreeSet::from(["web-0", "web-1", "web-2"]));
    assert!(
        replies
            .iter()
            .all(|r| r.client_ip == cluster.pod("client").ip)
    );
}

#[test]
fn multiport_service_with_named_target_port_resolved_per_slice() {
    require_root!();
    let mut cluster = Cluster::new(&["zone-a", "zone-b"]).unwrap();
    // The "http" container port is 8080 in one pod and 9090 in the other;
    // "admin" is 7000 in both.
    cluster.add_pod(0, "api-0", &[8080, 7000]).unwrap();
    cluster.add_pod(1, "api-1", &[9090, 7000]).unwrap();
    cluster.add_pod(0, "client", &[]).unwrap();
    let vip = "10.96.7.7".parse().unwrap();
    let slice = |name: &str, pod: &str, node: &str, http: u16| {
        let ports = [Port::tcp("http", http), Port::tcp("admin", 7000)];
        let endpoint = Endpoint::ready(cluster.pod(pod).ip, node);
        endpoint_slice("api", name, &ports, &[endpoint])
    };
    let yaml = documents(&[
        service(
            "api",
            vip,
            &[Port::tcp("http", 80), Port::tcp("admin", 81)],
            &["http", "admin"],
        ),
        slice("api-a", "api-0", "node1", 8080),
        slice("api-b", "api-1", "node2", 9090),
    ]);
    cluster.write_manifest("api.yaml", &yaml).unwrap();
    cluster.start_agents().unwrap();
    for port in [80, 81] {
        let replies = cluster.pod("client").run(|| {
            (0..20)
                .map(|_| tcp_request(SocketAddrV4::new(vip, port)).expect("request"))
                .collect::<Vec<_>>()
        });
        let backends: BTreeSet<&str> = replies.iter().map(|r| r.from.as_str()).collect();
        assert_eq!(backends, BTreeSet::from(["api-0", "api-1"]), "port {port}");
    }
}

#[test]
fn inspection_cli_shows_the_programmed_service() {
    require_root!();
    let cluster = scenario::running().unwrap();
    let out = eventually(
        "xlb services lists the frontend",
        Duration::from_secs(2),
        || {
            let out = std::process::Command::new(xlb_tests::cluster::xlb_bin())
                .args(["services", "-o", "json", "--bpffs"])
                .arg(cluster.bpffs(0))
                .output()?;
            let text = String::from_utf8(out.stdout)?;
            anyhow::ensure!(text.contains("10.96.0.10:8080"), "{text}");
            Ok(text)
        },
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tcp = json
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == "10.96.0.10:8080" && f["protocol"] == "TCP")
        .expect("the TCP frontend");
    assert_eq!(tcp["tiers"][0].as_array().unwrap().len(), 3);
    let service = format!("default/{}", scenario::SERVICE);
    assert_eq!(tcp["service"], service.as_str());
    let udp = json
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == "10.96.0.10:8080" && f["protocol"] == "UDP")
        .expect("the UDP frontend");
    assert_eq!(udp["service"], format!("{service}:udp").as_str());
    // --service picks one Service port; an unknown name, nothing.
    let table = |filter: &str| {
        let out = std::process::Command::new(xlb_tests::cluster::xlb_bin())
            .args(["services", "--service", filter, "--bpffs"])
            .arg(cluster.bpffs(0))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let udp_only = table(&format!("{service}:udp"));
    assert_eq!(
        udp_only.lines().count(),
        2,
        "header and one row: {udp_only}"
    );
    assert!(udp_only.lines().nth(1).unwrap().contains("UDP"));
    assert_eq!(table("no-such-service").lines().count(), 1);
}
