//! `cargo xtask demo`: xlb's main job on one machine. A two-node cluster of
//! network namespaces, the docs' `sample-clusterip` Service over a
//! 3-replica echo Deployment and a NodePort Service over the same pods, one
//! `xlb agent` per node, ten requests from a client pod to the ClusterIP and
//! ten from a client outside the cluster to node1's NodePort, what
//! `xlb services` shows — then everything is torn down.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};
use xlb_tests::{
    cluster::{Cluster, EXTERNAL_CLIENT_IP, xlb_bin},
    echo::tcp_request,
    manifests::{Endpoint, Port, documents, endpoint_slice},
    privilege::has_root,
    scenario::{self, frontend},
};

const NODE_PORT: u16 = 30_080;

/// `sample-nodeport`: NodePort 30080 → targetPort 80 over the replicas,
/// `externalTrafficPolicy: Cluster`.
fn nodeport_manifests(cluster: &Cluster) -> String {
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: sample-nodeport\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  clusterIPs: [10.96.0.11]\n  ports:\n  - port: 80\n    protocol: TCP\n    targetPort: {}\n    nodePort: {NODE_PORT}\n",
        scenario::TARGET_PORT
    );
    let endpoints: Vec<Endpoint> = scenario::REPLICAS
        .iter()
        .map(|(name, node)| Endpoint::ready(cluster.pod(name).ip, &cluster.nodes[*node].name))
        .collect();
    documents(&[
        service,
        endpoint_slice(
            "sample-nodeport",
            "sample-nodeport-1",
            &[Port::tcp("", scenario::TARGET_PORT)],
            &endpoints,
        ),
    ])
}

fn main() -> Result<()> {
    if !has_root("xlb-demo") {
        bail!("the demo builds network namespaces and loads BPF: run it as root");
    }
    let started = Instant::now();
    println!("== A cluster on this machine: 2 nodes (network namespaces) on one LAN");
    let mut cluster = scenario::cluster()?;
    for node in &cluster.nodes {
        println!(
            "   {} {} ({}), pods in {}",
            node.name,
            node.ip,
            node.zone,
            xlb_tests::cluster::pod_cidr(node.name[4..].parse::<usize>()? - 1)
        );
    }
    for (name, _) in scenario::REPLICAS {
        let pod = cluster.pod(name);
        println!(
            "   pod {name:<8} {:<12} on {}",
            pod.ip, cluster.nodes[pod.node].name
        );
    }
    println!(
        "\n== kubectl apply: Service {} {}:{} -> targetPort {}",
        scenario::SERVICE,
        scenario::CLUSTER_IP,
        scenario::PORT,
        scenario::TARGET_PORT
    );
    cluster.write_manifest(
        "sample.yaml",
        &scenario::manifests(&cluster, &["web-0", "web-1", "web-2"]),
    )?;
    println!(
        "   and Service sample-nodeport, NodePort {NODE_PORT} -> targetPort {}",
        scenario::TARGET_PORT
    );
    cluster.write_manifest("nodeport.yaml", &nodeport_manifests(&cluster))?;
    println!(
        "\n== xlb agent on each node (file source: {}; XDP on eth0)",
        cluster.manifests().display()
    );
    cluster.set_xdp("native");
    cluster.start_agents()?;
    let client = cluster.pod("client");
    println!(
        "\n== kubectl run client -- curl http://{}  (x10, from pod client {})",
        frontend(),
        client.ip
    );
    let replies = client.run(|| (0..10).map(|_| tcp_request(frontend())).collect::<Vec<_>>());
    for reply in replies {
        let reply = reply?;
        println!("From={} ClientIP={}", reply.from, reply.client_ip);
    }
    println!(
        "\n== curl http://{}  (x10, from node1 itself, host network: balanced at the\n   socket, connect() goes straight to a backend; the socket still shows the Service)",
        frontend()
    );
    for line in cluster.node_client(0, &["tcp", &frontend().to_string(), "10"])? {
        println!("{line}");
    }
    let node1 = std::net::SocketAddrV4::new(cluster.nodes[0].ip, NODE_PORT);
    println!(
        "\n== curl http://{node1}  (x10, from {EXTERNAL_CLIENT_IP} outside the cluster;\n   pods on node2 see node1's address: SNAT, externalTrafficPolicy Cluster)"
    );
    let replies = cluster.from_outside(|| (0..10).map(|_| tcp_request(node1)).collect::<Vec<_>>());
    for reply in replies {
        let reply = reply?;
        println!("From={} ClientIP={}", reply.from, reply.client_ip);
    }
    let bpffs = cluster.bpffs(0).to_owned();
    for command in ["services", "stats"] {
        println!("\n== xlb {command} --bpffs {}  (node1)", bpffs.display());
        let out = Command::new(xlb_bin())
            .arg(command)
            .arg("--bpffs")
            .arg(&bpffs)
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    drop(cluster);
    println!(
        "\n== torn down (agents, namespaces, pins) after {:.1?}",
        started.elapsed()
    );
    Ok(())
}
