//! `cargo xtask demo`: xlb's main job on one machine. A two-node cluster of
//! network namespaces, the docs' `sample-clusterip` Service over a
//! 3-replica echo Deployment, one `xlb agent` per node, ten requests from a
//! client pod, what `xlb services` shows — then everything is torn down.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};
use xlb_tests::{
    cluster::xlb_bin,
    echo::tcp_request,
    privilege::has_root,
    scenario::{self, frontend},
};

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
        "\n== xlb agent on each node (file source: {})",
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
