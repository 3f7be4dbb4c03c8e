//! Every manifest of `examples/` through the demo cluster (`cargo xtask
//! demo FILE`): default agent flags, the file as people write it (nothing
//! allocated), requests from the clients each frontend has, and the
//! behaviour the example's header promises.

use std::{collections::BTreeSet, net::Ipv4Addr, process::Command, time::Duration};

use xlb_tests::{
    cluster::{EXTERNAL_CLIENT_IP, eventually, xlb_bin},
    examples::{self, Client, Demo, OUTSIDE, Outcome, Target},
    require_root,
};

/// Requests per frontend and client: enough that a backend left out by
/// chance is rarer than one in 10,000 runs.
const REQUESTS: usize = 30;

const WEB: [&str; 3] = ["web-0", "web-1", "web-2"];
const WEB_ON_NODE1: [&str; 2] = ["web-0", "web-1"];

/// The examples this file checks, by file stem.
const CHECKED: [&str; 8] = [
    "clusterip",
    "external-endpoints",
    "headless",
    "loadbalancer-local",
    "multi-port",
    "nodeport",
    "session-affinity",
    "topology",
];

#[test]
fn every_example_is_checked() {
    let stems: Vec<String> = examples::files()
        .unwrap()
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        stems, CHECKED,
        "an example without a test, or a test without its example"
    );
}

/// Runs example `stem` on a demo cluster: it must be free of problems and
/// programmed alike by both agents; `check` judges each target's outcome.
/// Returns the targets.
fn run(stem: &str, check: impl Fn(&Demo, &Target, &Outcome)) -> Vec<Target> {
    let path = examples::dir().join(format!("{stem}.yaml"));
    let yaml = std::fs::read_to_string(&path).unwrap();
    let mut demo = Demo::new().unwrap();
    demo.cluster
        .write_manifest(&format!("{stem}.yaml"), &yaml)
        .unwrap();
    demo.cluster.start_agents().unwrap();
    let (targets, problems) = examples::targets(&demo, &yaml);
    assert!(problems.is_empty(), "{stem}: {problems:?}");
    // Both agents allocated what the model says (the same on every node).
    for node in 0..2 {
        let services = eventually("xlb services", Duration::from_secs(5), || {
            let out = Command::new(xlb_bin())
                .args(["services", "-o", "json", "--bpffs"])
                .arg(demo.cluster.bpffs(node))
                .output()?;
            Ok(String::from_utf8(out.stdout)?)
        })
        .unwrap();
        for target in targets
            .iter()
            .filter(|t| matches!(t.client, Client::Pod(_)))
        {
            let frontend = format!("\"frontend\": \"{}\"", target.addr);
            assert!(
                services.contains(&frontend),
                "node{}: {target:?}\n{services}",
                node + 1
            );
        }
    }
    // Every value both agents allocated (node ports, healthCheckNodePorts
    // included), as they logged them: the same.
    let allocated = |node| -> Vec<String> {
        demo.cluster
            .agent_log(node)
            .lines()
            .filter_map(|line| line.split_once("agent: ").map(|(_, said)| said.to_owned()))
            .filter(|said| said.contains(": allocated "))
            .collect()
    };
    assert_eq!(allocated(0), allocated(1), "{stem}");
    for target in &targets {
        let outcome = examples::send(&demo.cluster, target, REQUESTS).unwrap();
        assert!(outcome.errors.is_empty(), "{target:?}: {outcome:?}");
        check(&demo, target, &outcome);
    }
    targets
}

fn answered<const N: usize>(pods: [&str; N]) -> BTreeSet<&str> {
    pods.into_iter().collect()
}

/// Every backend saw the client's own address.
fn kept(demo: &Demo, target: &Target, outcome: &Outcome) {
    let client = BTreeSet::from([target.client.ip(&demo.cluster)]);
    for pod in outcome.answered() {
        assert_eq!(outcome.seen_by(pod), client, "{target:?}: {pod}");
    }
}

#[test]
fn clusterip_spreads_every_pod_over_every_replica() {
    require_root!();
    let targets = run("clusterip", |demo, target, outcome| {
        assert_eq!(outcome.answered(), answered(WEB), "{target:?}");
        kept(demo, target, outcome);
    });
    assert_eq!(targets.len(), 2, "one ClusterIP, a client on each node");
}

#[test]
fn multi_port_resolves_each_named_target_port() {
    require_root!();
    let targets = run("multi-port", |demo, target, outcome| {
        let want: BTreeSet<String> = match target.addr.port() {
            80 => WEB.iter().map(|p| p.to_string()).collect(),
            8081 => WEB
                .iter()
                .map(|p| format!("{p}:{}", examples::SECOND_PORT))
                .collect(),
            other => panic!("unexpected port {other}"),
        };
        let got: BTreeSet<String> = outcome.answered().iter().map(|p| p.to_string()).collect();
        assert_eq!(got, want, "{target:?}");
        kept(demo, target, outcome);
    });
    assert_eq!(targets.len(), 4);
}

#[test]
fn nodeport_is_allocated_and_reaches_every_pod_from_outside() {
    require_root!();
    let targets = run("nodeport", |demo, target, outcome| {
        assert_eq!(outcome.answered(), answered(WEB), "{target:?}");
        if target.client != Client::Outside {
            return kept(demo, target, outcome);
        }
        // Cluster policy: node1's pods see the client, node2's see node1.
        let node1 = demo.cluster.nodes[0].ip;
        for pod in WEB_ON_NODE1 {
            assert_eq!(outcome.seen_by(pod), BTreeSet::from([EXTERNAL_CLIENT_IP]));
        }
        assert_eq!(outcome.seen_by("web-2"), BTreeSet::from([node1]));
    });
    let node_port = targets
        .iter()
        .find(|t| t.client == Client::Outside)
        .expect("a node port")
        .addr
        .port();
    assert!((30000..=32767).contains(&node_port), "{node_port}");
}

#[test]
fn loadbalancer_local_keeps_the_client_address_on_local_pods() {
    require_root!();
    let targets = run("loadbalancer-local", |demo, target, outcome| {
        match target.client {
            Client::Outside => assert_eq!(outcome.answered(), answered(WEB_ON_NODE1)),
            Client::Pod(_) => assert_eq!(outcome.answered(), answered(WEB)),
        }
        kept(demo, target, outcome);
    });
    let outside: BTreeSet<Ipv4Addr> = targets
        .iter()
        .filter(|t| t.client == Client::Outside)
        .map(|t| *t.addr.ip())
        .collect();
    let node1 = Ipv4Addr::new(192, 168, 77, 11);
    assert_eq!(
        outside,
        BTreeSet::from([Ipv4Addr::new(172, 30, 0, 10), node1])
    );
}

#[test]
fn session_affinity_keeps_each_client_on_one_pod() {
    require_root!();
    run("session-affinity", |demo, target, outcome| {
        assert_eq!(outcome.answered().len(), 1, "{target:?}: {outcome:?}");
        kept(demo, target, outcome);
    });
}

#[test]
fn topology_keeps_traffic_in_the_client_zone() {
    require_root!();
    run("topology", |demo, target, outcome| {
        match target.client {
            Client::Pod("client") => assert_eq!(outcome.answered(), answered(WEB_ON_NODE1)),
            Client::Pod("client-2") => assert_eq!(outcome.answered(), answered(["web-2"])),
            other => panic!("unexpected client {other:?}"),
        }
        kept(demo, target, outcome);
    });
}

#[test]
fn external_endpoints_reach_a_server_outside_the_cluster() {
    require_root!();
    run("external-endpoints", |demo, target, outcome| {
        assert_eq!(outcome.answered(), answered([OUTSIDE]), "{target:?}");
        // Outside the cluster, a pod's connection carries its node's
        // address (the CNI's masquerade).
        let Client::Pod(pod) = target.client else {
            panic!("a ClusterIP only")
        };
        let node = demo.cluster.pod(pod).node;
        assert_eq!(
            outcome.seen_by(OUTSIDE),
            BTreeSet::from([demo.cluster.nodes[node].ip])
        );
    });
}

#[test]
fn headless_is_not_programmed() {
    require_root!();
    let targets = run("headless", |_, target, _| panic!("no frontend: {target:?}"));
    assert!(targets.is_empty());
}
