//! `cargo xtask demo`: xlb's main job on one machine. A two-node cluster of
//! network namespaces, the docs' `sample-clusterip` Service over a
//! 3-replica echo Deployment and a NodePort Service over the same pods, one
//! `xlb agent` per node, ten requests from a client pod to the ClusterIP and
//! ten from a client outside the cluster to node1's NodePort, what
//! `xlb services` shows — then everything is torn down.
//!
//! `cargo xtask demo FILE` runs the same cluster with the Services of FILE
//! instead (one of `examples/`, or any manifest written for the demo's
//! pods) and shows what requests to each of its frontends get: which pod
//! answered, and which client address the pod saw.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use xlb_tests::{
    cluster::{Cluster, EXTERNAL_CLIENT_IP, xlb_bin},
    echo::tcp_request,
    examples,
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
    if let Some(file) = std::env::args_os().nth(1) {
        example(Path::new(&file))?;
    } else {
        sample()?;
    }
    println!(
        "\n== torn down (agents, namespaces, pins) after {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// Prints the cluster's nodes and pods.
fn describe(cluster: &Cluster) -> Result<()> {
    println!("== A cluster on this machine: 2 nodes (network namespaces) on one LAN");
    for node in &cluster.nodes {
        println!(
            "   {} {} ({}), pods in {}",
            node.name,
            node.ip,
            node.zone,
            xlb_tests::cluster::pod_cidr(node.name[4..].parse::<usize>()? - 1)
        );
    }
    for pod in &cluster.pods {
        println!(
            "   pod {:<8} {:<12} on {}",
            pod.name, pod.ip, cluster.nodes[pod.node].name
        );
    }
    Ok(())
}

/// The demo without a file: `sample-clusterip` and a NodePort Service.
fn sample() -> Result<()> {
    let mut cluster = scenario::cluster()?;
    describe(&cluster)?;
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
        "\n== xlb agent on each node (file source: {}; default flags)",
        cluster.manifests().display()
    );
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
    Ok(())
}

/// Requests per frontend and client.
const REQUESTS: usize = 6;

/// The demo with the Services of `file`.
fn example(file: &Path) -> Result<()> {
    let yaml =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut demo = examples::Demo::new()?;
    describe(&demo.cluster)?;
    println!("   outside the cluster: {EXTERNAL_CLIENT_IP} (the client; a server on :9376)");
    println!("\n== kubectl apply -f {}", file.display());
    for line in yaml.lines().take_while(|l| l.starts_with('#')) {
        println!("   {line}");
    }
    demo.cluster.write_manifest(
        &file.file_name().unwrap_or_default().to_string_lossy(),
        &yaml,
    )?;
    println!("\n== xlb agent on each node (file source, default flags)");
    demo.cluster.start_agents()?;
    // What the agent decided on its own (allocations, mirroring) and
    // what it skipped.
    for line in demo.cluster.agent_log(0).lines() {
        if let Some((_, said)) = line.split_once("agent: ")
            && (said.contains("allocated") || said.contains("mirrored") || said.contains("skipped"))
        {
            println!("   node1: {said}");
        }
    }
    let (targets, _) = examples::targets(&demo, &yaml);
    if targets.is_empty() {
        println!(
            "\n== nothing to program: no frontend (a headless Service has no virtual address)"
        );
    }
    let bpffs = demo.cluster.bpffs(0).to_owned();
    println!("\n== xlb services --bpffs {}  (node1)", bpffs.display());
    let out = Command::new(xlb_bin())
        .arg("services")
        .arg("--bpffs")
        .arg(&bpffs)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    for target in &targets {
        let client = match target.client {
            examples::Client::Pod(pod) => {
                format!("pod {pod} ({})", target.client.ip(&demo.cluster))
            }
            examples::Client::Outside => format!("outside ({EXTERNAL_CLIENT_IP})"),
        };
        println!(
            "\n== {} {}/{} from {client}, {REQUESTS} requests",
            target.service_port, target.addr, target.protocol
        );
        let outcome = examples::send(&demo.cluster, target, REQUESTS)?;
        for (pod, (replies, seen)) in &outcome.backends {
            let seen: Vec<String> = seen.iter().map(|ip| ip.to_string()).collect();
            println!(
                "   {pod:<12} answered {replies}, saw client {}",
                seen.join(", ")
            );
        }
        for (error, n) in &outcome.errors {
            println!("   failed x{n}: {error}");
        }
    }
    Ok(())
}
