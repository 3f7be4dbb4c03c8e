//! End to end: `sessionAffinity: ClientIP` as kube-proxy's e2e tests check
//! it ("should have session affinity work", "... timeout work", "should be
//! able to switch session affinity") for a ClusterIP Service, and through a
//! NodePort for a client outside the cluster, with and without XDP.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::ensure;
use xlb_tests::{
    cluster::{Cluster, eventually, xlb_bin},
    echo::tcp_request,
    manifests::{Endpoint, Port, documents, endpoint_slice, service_with},
    require_root,
    scenario::{self, REPLICAS, TARGET_PORT},
};

const IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const NODE_PORT: u16 = 30_400;

fn manifests(cluster: &Cluster, affinity: Option<u32>) -> String {
    let spec = match affinity {
        Some(t) => format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n"
        ),
        None => "  sessionAffinity: None\n".into(),
    };
    let endpoints: Vec<Endpoint> = REPLICAS
        .iter()
        .map(|(name, node)| Endpoint::ready(cluster.pod(name).ip, &cluster.nodes[*node].name))
        .collect();
    let service = service_with("sticky", IP, &[Port::tcp("", 80)], &["80"], "", &spec)
        .replace("type: ClusterIP", "type: NodePort")
        .replace(
            "targetPort: 80\n",
            &format!("targetPort: 80\n    nodePort: {NODE_PORT}\n"),
        );
    documents(&[
        service,
        endpoint_slice(
            "sticky",
            "sticky-1",
            &[Port::tcp("", TARGET_PORT)],
            &endpoints,
        ),
    ])
}

/// The backends that answer `n` new connections from `client`.
fn backends(cluster: &Cluster, client: &str, n: usize) -> anyhow::Result<BTreeSet<String>> {
    cluster.pod(client).run(|| {
        (0..n)
            .map(|_| tcp_request(SocketAddrV4::new(IP, 80)).map(|r| r.from))
            .collect()
    })
}

/// The backends that answer `n` new connections from the external client
/// through node `node`'s NodePort.
fn backends_from_outside(
    cluster: &Cluster,
    node: usize,
    n: usize,
) -> anyhow::Result<BTreeSet<String>> {
    let to = SocketAddrV4::new(cluster.nodes[node].ip, NODE_PORT);
    cluster.from_outside(|| (0..n).map(|_| tcp_request(to).map(|r| r.from)).collect())
}

fn running(affinity: Option<u32>) -> Cluster {
    running_with_xdp(affinity, "off")
}

fn running_with_xdp(affinity: Option<u32>, xdp: &'static str) -> Cluster {
    let mut cluster = scenario::cluster().unwrap();
    cluster
        .write_manifest("sticky.yaml", &manifests(&cluster, affinity))
        .unwrap();
    cluster.set_xdp(xdp);
    cluster.start_agents().unwrap();
    cluster
}

/// Sticks through both nodes' NodePort, switches off and on, times out.
fn session_affinity_through_a_node_port(xdp: &'static str) {
    let cluster = running_with_xdp(Some(10_800), xdp);
    for node in 0..2 {
        let seen = backends_from_outside(&cluster, node, 20).unwrap();
        assert_eq!(seen.len(), 1, "via node{}: {seen:?}", node + 1);
    }
    cluster
        .write_manifest("sticky.yaml", &manifests(&cluster, None))
        .unwrap();
    eventually("affinity off spreads", Duration::from_secs(1), || {
        let seen = backends_from_outside(&cluster, 0, 20)?;
        ensure!(seen.len() > 1, "{seen:?}");
        Ok(())
    })
    .unwrap();
    cluster
        .write_manifest("sticky.yaml", &manifests(&cluster, Some(2)))
        .unwrap();
    eventually("affinity on sticks again", Duration::from_secs(1), || {
        let seen = backends_from_outside(&cluster, 0, 20)?;
        ensure!(seen.len() == 1, "{seen:?}");
        Ok(())
    })
    .unwrap();
    let mut across_timeouts = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2_300));
        let seen = backends_from_outside(&cluster, 0, 5).unwrap();
        assert_eq!(seen.len(), 1, "sticky within the timeout: {seen:?}");
        across_timeouts.extend(seen);
        if across_timeouts.len() > 1 {
            break;
        }
    }
    assert!(
        across_timeouts.len() > 1,
        "the spread resumes after the timeout: {across_timeouts:?}"
    );
}

#[test]
fn session_affinity_through_a_node_port_with_tc() {
    require_root!();
    session_affinity_through_a_node_port("off");
}

#[test]
fn session_affinity_through_a_node_port_with_xdp() {
    require_root!();
    session_affinity_through_a_node_port("native");
}

#[test]
fn session_affinity_works_per_client() {
    require_root!();
    let cluster = running(Some(10_800));
    for client in ["client", "client-2"] {
        let seen = backends(&cluster, client, 20).unwrap();
        assert_eq!(seen.len(), 1, "{client}: {seen:?}");
    }
    let out = std::process::Command::new(xlb_bin())
        .args(["affinity", "-o", "json", "--bpffs"])
        .arg(cluster.bpffs(0))
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = entries.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["client"] == cluster.pod("client").ip.to_string()
                && e["frontend"] == "10.96.0.40:80"
                && e["expires_in_seconds"].as_u64().unwrap() > 10_000)
    );
}

#[test]
fn session_affinity_times_out() {
    require_root!();
    let cluster = running(Some(2));
    let mut across_timeouts = BTreeSet::new();
    for _ in 0..8 {
        let seen = backends(&cluster, "client", 5).unwrap();
        assert_eq!(seen.len(), 1, "sticky within the timeout: {seen:?}");
        across_timeouts.extend(seen);
        std::thread::sleep(Duration::from_millis(2_300));
    }
    assert!(
        across_timeouts.len() > 1,
        "the spread resumes after the timeout: {across_timeouts:?}"
    );
}

#[test]
fn session_affinity_can_be_switched_off_and_on() {
    require_root!();
    let cluster = running(Some(10_800));
    assert_eq!(backends(&cluster, "client", 20).unwrap().len(), 1);
    cluster
        .write_manifest("sticky.yaml", &manifests(&cluster, None))
        .unwrap();
    eventually("affinity off spreads", Duration::from_secs(1), || {
        let seen = backends(&cluster, "client", 20)?;
        ensure!(seen.len() > 1, "{seen:?}");
        Ok(())
    })
    .unwrap();
    cluster
        .write_manifest("sticky.yaml", &manifests(&cluster, Some(10_800)))
        .unwrap();
    eventually("affinity on sticks again", Duration::from_secs(1), || {
        let seen = backends(&cluster, "client", 20)?;
        ensure!(seen.len() == 1, "{seen:?}");
        Ok(())
    })
    .unwrap();
}
