//! End to end, north-south: an external client on the nodes' LAN (transmit
//! checksum offload off, as traffic from a wire arrives) reaches NodePorts
//! on both nodes, LoadBalancer and external IPs routed to node1, under
//! `externalTrafficPolicy` Cluster (SNAT to the node when the backend is on
//! the other node) and Local (the backend sees the client; a node without a
//! local endpoint drops), with `loadBalancerSourceRanges` and the
//! healthCheckNodePort; and a pod reaches the same addresses. Every case
//! runs with the TC program alone (`--xdp off`, and the default `auto` on
//! these veths) and with the XDP fast path in front of it (`--xdp
//! native`), which must give the same results.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Result, ensure};
use xlb_tests::{
    cluster::{Cluster, EXTERNAL_CLIENT_IP, eventually, http_get},
    echo::{Reply, tcp_request, udp_request},
    manifests::{Endpoint, Port, documents, endpoint_slice},
    require_root,
};

const TARGET_PORT: u16 = 80;
/// `np-cluster`: NodePort, Cluster policy, web-0 (node1) and web-1 (node2).
const CLUSTER_NODE_PORT: u16 = 30_080;
/// `lb-local`: LoadBalancer, Local policy, web-0 (node1) only.
const LOCAL_NODE_PORT: u16 = 30_090;
const LOCAL_LB_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
const HEALTH_CHECK_PORT: u16 = 32_000;
/// `ext-ip`: an external IP over web-1 (node2) only.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 20);
/// `lb-ranges`: a LoadBalancer that admits 10.0.0.0/8 only.
const FENCED_LB_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 30);
/// `lb-open`: a LoadBalancer that admits the LAN.
const OPEN_LB_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 31);
const LB_PORT: u16 = 80;

/// A Service of `kind` with one TCP and one UDP port (`port` → 80; node
/// ports `node_port` and `node_port + 1` unless 0), extra spec lines and
/// its load-balancer ingress IP, over `endpoints`.
fn service(
    name: &str,
    cluster_ip: &str,
    kind: &str,
    (port, node_port): (u16, u16),
    spec: &str,
    ingress: Option<Ipv4Addr>,
    endpoints: &[Endpoint],
) -> String {
    let node_port_line = |offset: u16| match node_port {
        0 => String::new(),
        n => format!("    nodePort: {}\n", n + offset),
    };
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n{spec}  ports:\n  - name: tcp\n    port: {port}\n    protocol: TCP\n    targetPort: {TARGET_PORT}\n{}  - name: udp\n    port: {port}\n    protocol: UDP\n    targetPort: {TARGET_PORT}\n{}",
        node_port_line(0),
        node_port_line(1),
    );
    if let Some(ip) = ingress {
        yaml.push_str(&format!(
            "status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n"
        ));
    }
    let ports = [Port::tcp("tcp", TARGET_PORT), Port::udp("udp", TARGET_PORT)];
    documents(&[
        yaml,
        endpoint_slice(name, &format!("{name}-1"), &ports, endpoints),
    ])
}

/// Two nodes, web-0 on node1, web-1 on node2, a client pod on node1, the
/// Services above, and agents with `--xdp xdp` (the default without one;
/// and `--xdp-tx on`, in its set-up, when `xdp_tx`).
fn cluster(xdp: Option<&'static str>, xdp_tx: bool) -> Cluster {
    let mut cluster = Cluster::new(&["zone-a", "zone-b"]).unwrap();
    cluster.add_pod(0, "web-0", &[TARGET_PORT]).unwrap();
    cluster.add_pod(1, "web-1", &[TARGET_PORT]).unwrap();
    cluster.add_pod(0, "client", &[]).unwrap();
    let web = |name: &str, node: &'static str| Endpoint::ready(cluster.pod(name).ip, node);
    let both = [web("web-0", "node1"), web("web-1", "node2")];
    let node1_only = [web("web-0", "node1")];
    let node2_only = [web("web-1", "node2")];
    let local =
        format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_CHECK_PORT}\n");
    let manifests = [
        service(
            "np-cluster",
            "10.96.0.20",
            "NodePort",
            (80, CLUSTER_NODE_PORT),
            "",
            None,
            &both,
        ),
        service(
            "lb-local",
            "10.96.0.21",
            "LoadBalancer",
            (LB_PORT, LOCAL_NODE_PORT),
            &local,
            Some(LOCAL_LB_IP),
            &node1_only,
        ),
        service(
            "ext-ip",
            "10.96.0.22",
            "ClusterIP",
            (LB_PORT, 0),
            &format!("  externalIPs: [{EXTERNAL_IP}]\n"),
            None,
            &node2_only,
        ),
        service(
            "lb-ranges",
            "10.96.0.23",
            "LoadBalancer",
            (LB_PORT, 30_100),
            "  loadBalancerSourceRanges: [10.0.0.0/8]\n",
            Some(FENCED_LB_IP),
            &both,
        ),
        service(
            "lb-open",
            "10.96.0.24",
            "LoadBalancer",
            (LB_PORT, 30_110),
            "  loadBalancerSourceRanges: [10.0.0.0/8, 192.168.77.0/24]\n",
            Some(OPEN_LB_IP),
            &both,
        ),
    ];
    cluster
        .write_manifest("north-south.yaml", &manifests.join("---\n"))
        .unwrap();
    if let Some(xdp) = xdp {
        cluster.set_xdp(xdp);
    }
    if xdp_tx {
        cluster.enable_xdp_tx().unwrap();
    }
    cluster.start_agents().unwrap();
    cluster
}

/// The replies of `n` fresh TCP connections from outside to `to`.
fn from_outside(cluster: &Cluster, to: SocketAddrV4, n: usize) -> Result<Vec<Reply>> {
    cluster.from_outside(|| (0..n).map(|_| tcp_request(to)).collect())
}

/// Requests from outside to `to` until every backend of `backends` has
/// answered, each having seen the client address `seen_by` says.
fn check_served(
    cluster: &Cluster,
    to: SocketAddrV4,
    backends: &[&str],
    seen_by: impl Fn(&Reply) -> Ipv4Addr,
) {
    eventually(
        &format!("{to} served by {backends:?}"),
        Duration::from_secs(5),
        || {
            let replies = from_outside(cluster, to, 12)?;
            for reply in &replies {
                ensure!(
                    reply.client_ip == seen_by(reply),
                    "{} saw {} through {to}",
                    reply.from,
                    reply.client_ip
                );
            }
            let answered: BTreeSet<&str> = replies.iter().map(|r| r.from.as_str()).collect();
            ensure!(
                answered == backends.iter().copied().collect(),
                "answered by {answered:?}"
            );
            Ok(())
        },
    )
    .unwrap();
}

/// Asserts that nothing answers `to` from outside (dropped, not refused).
fn check_dropped(cluster: &Cluster, to: SocketAddrV4) {
    let err = cluster
        .from_outside(|| tcp_request(to))
        .expect_err("no answer");
    let timed_out = err.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        })
    });
    assert!(timed_out, "{to}: expected a silent drop, got {err:#}");
}

/// How many frames the XDP program on node `node`'s eth0 sent back out
/// (`XDP_TX`), from the veth driver's own statistics.
fn xdp_tx_frames(cluster: &Cluster, node: usize) -> u64 {
    let out = cluster.nodes[node]
        .ns
        .command("ethtool")
        .args(["-S", "eth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("rx_queue_0_xdp_tx: "))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

fn north_south(xdp: Option<&'static str>, xdp_tx: bool) -> Cluster {
    let cluster = cluster(xdp, xdp_tx);
    let node_ip = |node: usize| cluster.nodes[node].ip;
    let pod_node = |reply: &Reply| usize::from(reply.from == "web-1");

    // Cluster policy through either node: both backends; the one on the
    // other node sees that node's address, the local one the client's.
    for node in 0..2 {
        let to = SocketAddrV4::new(node_ip(node), CLUSTER_NODE_PORT);
        check_served(&cluster, to, &["web-0", "web-1"], |reply| {
            if pod_node(reply) == node {
                EXTERNAL_CLIENT_IP
            } else {
                node_ip(node)
            }
        });
        // UDP likewise, each datagram from a fresh port.
        let to = SocketAddrV4::new(node_ip(node), CLUSTER_NODE_PORT + 1);
        let replies: Vec<Reply> = cluster
            .from_outside(|| (0..12).map(|_| udp_request(to)).collect::<Result<_>>())
            .unwrap();
        let answered: BTreeSet<&str> = replies.iter().map(|r| r.from.as_str()).collect();
        assert_eq!(answered, BTreeSet::from(["web-0", "web-1"]), "UDP via {to}");
    }

    // Local policy: node1 serves with the client's own address; node2 has
    // no local endpoint and drops.
    let local_via_node1 = SocketAddrV4::new(node_ip(0), LOCAL_NODE_PORT);
    check_served(&cluster, local_via_node1, &["web-0"], |_| {
        EXTERNAL_CLIENT_IP
    });
    check_dropped(&cluster, SocketAddrV4::new(node_ip(1), LOCAL_NODE_PORT));
    // Its LoadBalancer IP, routed to node1, likewise.
    let lb = SocketAddrV4::new(LOCAL_LB_IP, LB_PORT);
    check_served(&cluster, lb, &["web-0"], |_| EXTERNAL_CLIENT_IP);
    // Its health check: 200 where endpoints are, 503 elsewhere.
    for (node, want) in [(0, 200), (1, 503)] {
        let addr = SocketAddrV4::new(node_ip(node), HEALTH_CHECK_PORT);
        let (status, _) = cluster.from_outside(|| http_get(addr, "/")).unwrap();
        assert_eq!(status, want, "health check of node{}", node + 1);
    }

    // An external IP (routed to node1) over a backend on node2: SNAT.
    let external = SocketAddrV4::new(EXTERNAL_IP, LB_PORT);
    check_served(&cluster, external, &["web-1"], |_| node_ip(0));

    // Source ranges: outside them dropped, inside served.
    check_dropped(&cluster, SocketAddrV4::new(FENCED_LB_IP, LB_PORT));
    let open = SocketAddrV4::new(OPEN_LB_IP, LB_PORT);
    check_served(&cluster, open, &["web-0", "web-1"], |reply| {
        if pod_node(reply) == 0 {
            EXTERNAL_CLIENT_IP
        } else {
            node_ip(0)
        }
    });

    // A pod reaches NodePorts of both nodes and the LoadBalancer IP of a
    // Local Service (served cluster-wide from inside, as kube-proxy does).
    let client = cluster.pod("client");
    for to in [
        SocketAddrV4::new(node_ip(0), CLUSTER_NODE_PORT),
        SocketAddrV4::new(node_ip(1), CLUSTER_NODE_PORT),
        lb,
    ] {
        let reply = client.run(|| tcp_request(to)).unwrap();
        assert!(reply.from.starts_with("web-"), "{to}: {reply:?}");
    }
    cluster
}

#[test]
fn north_south_with_tc_only() {
    require_root!();
    let cluster = north_south(Some("off"), false);
    assert_eq!(xdp_tx_frames(&cluster, 0), 0);
}

/// Default flags on a veth (a kind node's `eth0`): `--xdp auto` leaves it
/// to TC alone, where native XDP would cost more than it saves.
#[test]
fn north_south_with_default_flags_is_tc_only_on_a_veth() {
    require_root!();
    let cluster = north_south(None, false);
    assert_eq!(xdp_tx_frames(&cluster, 0), 0);
    let log = cluster.agent_log(0);
    assert!(
        log.contains("driver=veth") && log.contains("TC only"),
        "the agent says why:
{log}"
    );
}

/// Native XDP asked for on a veth whose peer runs no XDP program: XDP
/// finishes drops and local DNAT, and leaves every frame it would send
/// back out to TC, which serves it.
#[test]
fn north_south_with_xdp_native() {
    require_root!();
    let cluster = north_south(Some("native"), false);
    assert_eq!(xdp_tx_frames(&cluster, 0), 0, "XDP_TX on a veth unasked");
    let log = cluster.agent_log(0);
    assert!(
        log.contains("driver=veth") && log.contains("frames to send back out go to TC"),
        "the agent names the XDP actions it uses:\n{log}"
    );
}

/// `--xdp-tx on`, with the LAN side of each veth running XDP (what a veth
/// needs to deliver `XDP_TX` frames).
#[test]
fn north_south_with_xdp_tx() {
    require_root!();
    let cluster = north_south(Some("native"), true);
    // The fast path did send SNATed flows and their replies back out itself.
    assert!(xdp_tx_frames(&cluster, 0) > 0, "no XDP_TX on node1");
}
