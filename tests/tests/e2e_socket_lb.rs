//! End to end, the socket path: processes in a node's cgroup — the node's
//! own and its pods' — have their `connect()` / `sendmsg()` to a frontend
//! translated once, at the socket (cgroup programs), and still see the
//! Service address (`getpeername`, UDP reply sources). The same Kubernetes
//! rules as per packet: refused without endpoints, internalTrafficPolicy
//! Local, topology, ClientIP affinity; NodePorts and external addresses
//! from the node; draining; `--socket-lb host-only` and `off`; a restart.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use xlb_tests::{
    cluster::{Cluster, eventually},
    manifests::{Endpoint, Port, documents, endpoint_slice, service_with},
    require_root,
    scenario::{self, CLUSTER_IP, PORT, REPLICAS, TARGET_PORT},
};

/// One parsed line of `xlb-test-client`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok {
        from: String,
        client: Ipv4Addr,
        peer: String,
    },
    Err(String),
}

fn answers(lines: Vec<String>) -> Vec<Answer> {
    lines
        .iter()
        .filter(|line| *line != "ready")
        .map(|line| {
            if let Some(err) = line.strip_prefix("err ") {
                return Answer::Err(err.to_owned());
            }
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap_or_else(|| panic!("{name} in {line:?}"))
                    .to_owned()
            };
            Answer::Ok {
                from: field("from="),
                client: field("client=").parse().expect("client address"),
                peer: field("peer="),
            }
        })
        .collect()
}

fn backends(answers: &[Answer]) -> BTreeSet<String> {
    answers
        .iter()
        .map(|a| match a {
            Answer::Ok { from, .. } => from.clone(),
            Answer::Err(err) => panic!("a request failed: {err} (of {answers:?})"),
        })
        .collect()
}

fn frontend() -> String {
    format!("{CLUSTER_IP}:{PORT}")
}

/// A counter of node `node`'s datapath, from `xlb stats -o json`.
fn counter(cluster: &Cluster, node: usize, reason: &str) -> u64 {
    let out = std::process::Command::new(xlb_tests::cluster::xlb_bin())
        .args(["stats", "-o", "json", "--bpffs"])
        .arg(cluster.bpffs(node))
        .output()
        .expect("xlb stats");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    stats
        .as_array()
        .expect("an array")
        .iter()
        .find(|row| row["reason"] == reason)
        .and_then(|row| row["packets"].as_u64())
        .unwrap_or(0)
}

#[test]
fn the_node_reaches_a_cluster_ip_over_tcp_and_udp_on_both_nodes() {
    require_root!();
    let cluster = scenario::running().unwrap();
    let all = BTreeSet::from(["web-0".into(), "web-1".into(), "web-2".into()]);
    for mode in ["tcp", "udp", "udp-connected"] {
        let replies = answers(cluster.node_client(0, &[mode, &frontend(), "30"]).unwrap());
        assert_eq!(backends(&replies), all, "{mode}");
        for reply in &replies {
            let Answer::Ok { client, peer, .. } = reply else {
                unreachable!()
            };
            assert_eq!(
                *peer,
                frontend(),
                "{mode}: the socket shows the Service address"
            );
            assert_eq!(
                *client, cluster.nodes[0].ip,
                "{mode}: the node's own address"
            );
        }
    }
    assert!(counter(&cluster, 0, "sock_balanced") >= 90);
    assert!(counter(&cluster, 0, "sock_rev_nat") >= 90);
}

fn all_replicas() -> BTreeSet<String> {
    REPLICAS.iter().map(|(name, _)| name.to_string()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// A Service on `ip`, port `PORT`, over `endpoints`.
fn rule_service(
    name: &str,
    ip: Ipv4Addr,
    metadata: &str,
    spec: &str,
    endpoints: &[Endpoint],
) -> String {
    scenario::rule_service(name, ip, PORT, metadata, spec, endpoints)
}

/// The replicas, hinted for their zones.
fn replicas(cluster: &Cluster) -> Vec<Endpoint<'_>> {
    scenario::replicas(cluster, true)
}

fn start(cluster: &mut Cluster, docs: &[String], agent_args: &[&str]) {
    cluster
        .write_manifest("rules.yaml", &documents(docs))
        .unwrap();
    for node in 0..cluster.nodes.len() {
        cluster.start_agent(node, agent_args).unwrap();
    }
}

fn addr(ip: Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

#[test]
fn a_pod_is_balanced_at_the_socket_and_keeps_its_own_source() {
    require_root!();
    let cluster = scenario::running().unwrap();
    for mode in ["tcp", "udp"] {
        let replies = answers(
            cluster
                .pod_client("client", &[mode, &frontend(), "30"])
                .unwrap(),
        );
        assert_eq!(backends(&replies), all_replicas(), "{mode}");
        for reply in &replies {
            let Answer::Ok { client, peer, .. } = reply else {
                unreachable!()
            };
            assert_eq!(
                *client,
                cluster.pod("client").ip,
                "{mode}: the pod's address"
            );
            assert_eq!(
                *peer,
                frontend(),
                "{mode}: the socket shows the Service address"
            );
        }
    }
    // Translated at the socket only: the per-packet path made no flow.
    assert!(counter(&cluster, 0, "sock_balanced") >= 60);
    assert_eq!(counter(&cluster, 0, "forward_new"), 0);
}

#[test]
fn the_node_and_its_pods_reach_node_ports_load_balancer_and_external_ips() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let lb_ip = Ipv4Addr::new(172, 30, 0, 10);
    let external_ip = Ipv4Addr::new(172, 30, 0, 20);
    let target = TARGET_PORT.to_string();
    let ports = [Port::tcp("tcp", PORT), Port::udp("udp", PORT)];
    let slice_ports = [Port::tcp("tcp", TARGET_PORT), Port::udp("udp", TARGET_PORT)];
    let endpoints = replicas(&cluster);
    let node_ports = "  type: LoadBalancer\n";
    let mut lb = service_with(
        "lb",
        Ipv4Addr::new(10, 96, 0, 30),
        &ports,
        &[&target, &target],
        "",
        &format!("{node_ports}  externalIPs: [{external_ip}]\n"),
    )
    .replace("  type: ClusterIP\n", "")
    .replace(
        "    targetPort: 80\n",
        "    targetPort: 80\n    nodePort: 30080\n",
    );
    lb.push_str(&format!(
        "status:\n  loadBalancer:\n    ingress:\n    - ip: {lb_ip}\n"
    ));
    let docs = [lb, endpoint_slice("lb", "lb-1", &slice_ports, &endpoints)];
    start(&mut cluster, &docs, &[]);
    let node1 = cluster.nodes[0].ip;
    for to in [
        addr(node1, 30080),
        addr(lb_ip, PORT),
        addr(external_ip, PORT),
    ] {
        for mode in ["tcp", "udp"] {
            let from_node = answers(cluster.node_client(0, &[mode, &to, "30"]).unwrap());
            assert_eq!(
                backends(&from_node),
                all_replicas(),
                "node → {to} over {mode}"
            );
            let from_pod = answers(cluster.pod_client("client", &[mode, &to, "30"]).unwrap());
            assert_eq!(
                backends(&from_pod),
                all_replicas(),
                "pod → {to} over {mode}"
            );
        }
    }
}

#[test]
fn refused_at_once_without_endpoints() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let empty = Ipv4Addr::new(10, 96, 0, 40);
    start(
        &mut cluster,
        &[rule_service("empty", empty, "", "", &[])],
        &[],
    );
    let to = addr(empty, PORT);
    for mode in ["tcp", "udp", "udp-connected"] {
        let started = Instant::now();
        let refused = answers(cluster.node_client(0, &[mode, &to, "3"]).unwrap());
        assert_eq!(
            refused,
            vec![Answer::Err("ECONNREFUSED".into()); 3],
            "{mode}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{mode}: at once"
        );
    }
    assert_eq!(counter(&cluster, 0, "sock_reject_no_backend"), 9);
}

#[test]
fn internal_traffic_policy_local_and_topology() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let local = Ipv4Addr::new(10, 96, 0, 41);
    let node1_only = Ipv4Addr::new(10, 96, 0, 42);
    let close = Ipv4Addr::new(10, 96, 0, 43);
    let itp_local = "  internalTrafficPolicy: Local\n";
    let on_node1: Vec<Endpoint> = replicas(&cluster)
        .into_iter()
        .filter(|e| e.node == "node1")
        .collect();
    let docs = [
        rule_service("local", local, "", itp_local, &replicas(&cluster)),
        rule_service("local-1", node1_only, "", itp_local, &on_node1),
        rule_service(
            "close",
            close,
            "",
            "  trafficDistribution: PreferClose\n",
            &replicas(&cluster),
        ),
    ];
    start(&mut cluster, &docs, &[]);
    let seen = |node: usize, ip: Ipv4Addr| {
        backends(&answers(
            cluster
                .node_client(node, &["tcp", &addr(ip, PORT), "30"])
                .unwrap(),
        ))
    };
    assert_eq!(seen(0, local), set(&["web-0", "web-1"]));
    assert_eq!(seen(1, local), set(&["web-2"]));
    assert_eq!(seen(0, close), set(&["web-0", "web-1"]));
    assert_eq!(seen(1, close), set(&["web-2"]));
    // No local endpoint on node2: the connection fails at once (per packet
    // it is dropped; a socket can say so without waiting for a timeout).
    let refused = answers(
        cluster
            .pod_client("client-2", &["tcp", &addr(node1_only, PORT), "1"])
            .unwrap(),
    );
    assert_eq!(refused, vec![Answer::Err("EHOSTUNREACH".into())]);
}

#[test]
fn client_ip_affinity_sticks_per_network_namespace_and_times_out() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let sticky = Ipv4Addr::new(10, 96, 0, 44);
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n";
    let docs = [rule_service(
        "sticky",
        sticky,
        "",
        affinity,
        &replicas(&cluster),
    )];
    start(&mut cluster, &docs, &[]);
    let to = addr(sticky, PORT);
    let mut chosen = BTreeSet::new();
    // Each round: a burst sticks to one backend; after the timeout the
    // next round chooses again (the same one with probability 1/3 a round).
    for _ in 0..8 {
        let burst = backends(&answers(
            cluster.pod_client("client", &["tcp", &to, "8"]).unwrap(),
        ));
        assert_eq!(burst.len(), 1, "a burst sticks to one backend: {burst:?}");
        chosen.extend(burst);
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(
        chosen.len() > 1,
        "affinity timed out and chose again: {chosen:?}"
    );
}

#[test]
fn a_pod_balanced_to_itself_is_answered() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let own = Ipv4Addr::new(10, 96, 0, 45);
    let web0 = Endpoint::ready(cluster.pod("web-0").ip, "node1");
    start(
        &mut cluster,
        &[rule_service("own", own, "", "", &[web0])],
        &[],
    );
    let replies = answers(
        cluster
            .pod_client("web-0", &["tcp", &addr(own, PORT), "3"])
            .unwrap(),
    );
    for reply in replies {
        let Answer::Ok { from, client, .. } = reply else {
            panic!("{reply:?}")
        };
        assert_eq!((from.as_str(), client), ("web-0", cluster.pod("web-0").ip));
    }
}

#[test]
fn an_established_connection_keeps_its_terminating_backend() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let drain = Ipv4Addr::new(10, 96, 0, 46);
    let (web0, web1) = (cluster.pod("web-0").ip, cluster.pod("web-1").ip);
    let web = |name: &str, terminating: bool| Endpoint {
        ready: !terminating,
        terminating,
        ..Endpoint::ready(if name == "web-0" { web0 } else { web1 }, "node1")
    };
    let docs = [rule_service("drain", drain, "", "", &[web("web-0", false)])];
    start(&mut cluster, &docs, &[]);
    let to = addr(drain, PORT);
    let mut session = cluster
        .pod_client_command("client", &["tcp-session", &to])
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let mut output = BufReader::new(session.stdout.take().unwrap()).lines();
    let ready = output.next().expect("a line").unwrap();
    assert_eq!(ready, "ready", "connected");
    let mut request = move || {
        writeln!(input, "go").unwrap();
        let line = output.next().expect("a line").unwrap();
        answers(vec![line]).remove(0)
    };
    let first = request();
    assert!(
        matches!(&first, Answer::Ok { from, .. } if from == "web-0"),
        "{first:?}"
    );
    let docs = [rule_service(
        "drain",
        drain,
        "",
        "",
        &[web("web-0", true), web("web-1", false)],
    )];
    cluster
        .write_manifest("rules.yaml", &documents(&docs))
        .unwrap();
    eventually(
        "new connections go to web-1",
        Duration::from_secs(5),
        || {
            let new = backends(&answers(cluster.pod_client("client", &["tcp", &to, "1"])?));
            anyhow::ensure!(new == set(&["web-1"]), "{new:?}");
            Ok(())
        },
    )
    .unwrap();
    for _ in 0..3 {
        let kept = request();
        assert!(
            matches!(&kept, Answer::Ok { from, .. } if from == "web-0"),
            "{kept:?}"
        );
    }
    let _ = session.kill();
    let _ = session.wait();
}

#[test]
fn host_only_leaves_pods_to_the_per_packet_path() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let docs = [scenario::manifests(&cluster, &["web-0", "web-1", "web-2"])];
    start(&mut cluster, &docs, &["--socket-lb", "host-only"]);
    let from_node = answers(cluster.node_client(0, &["tcp", &frontend(), "30"]).unwrap());
    assert_eq!(backends(&from_node), all_replicas());
    assert_eq!(counter(&cluster, 0, "sock_balanced"), 30);
    let from_pod = answers(
        cluster
            .pod_client("client", &["tcp", &frontend(), "30"])
            .unwrap(),
    );
    assert_eq!(backends(&from_pod), all_replicas());
    assert_eq!(
        counter(&cluster, 0, "sock_balanced"),
        30,
        "the pod's are not"
    );
    assert_eq!(
        counter(&cluster, 0, "forward_new"),
        30,
        "they are per packet"
    );
}

#[test]
fn off_attaches_nothing_to_the_cgroup_and_pods_are_balanced_per_packet() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let docs = [scenario::manifests(&cluster, &["web-0", "web-1", "web-2"])];
    start(&mut cluster, &docs, &["--socket-lb", "off"]);
    assert!(!cluster.bpffs(0).join("links/sock_connect4").exists());
    let from_pod = answers(
        cluster
            .pod_client("client", &["tcp", &frontend(), "30"])
            .unwrap(),
    );
    assert_eq!(backends(&from_pod), all_replicas());
    assert_eq!(counter(&cluster, 0, "sock_balanced"), 0);
    assert_eq!(counter(&cluster, 0, "forward_new"), 30);
}

#[test]
fn connections_are_balanced_while_the_agent_is_down_and_restarted() {
    require_root!();
    let mut cluster = scenario::running().unwrap();
    let balanced = |cluster: &Cluster| {
        let replies = answers(cluster.node_client(0, &["tcp", &frontend(), "30"]).unwrap());
        assert_eq!(backends(&replies), all_replicas());
    };
    balanced(&cluster);
    cluster.kill_agent(0).unwrap();
    // The links are pinned: the programs stay attached without the agent.
    balanced(&cluster);
    cluster.start_agent(0, &[]).unwrap();
    balanced(&cluster);
    assert!(
        cluster
            .agent_log(0)
            .contains("attached the socket programs")
    );
}

/// `xlb_sock_rev_entries` of node `node`'s agent.
fn sock_rev_entries(cluster: &Cluster, node: usize) -> anyhow::Result<u64> {
    let metrics = "127.0.0.1:10249".parse().expect("an address");
    let (_, body) = cluster.http_get(node, metrics, "/metrics")?;
    body.lines()
        .find_map(|line| line.strip_prefix("xlb_sock_rev_entries "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no xlb_sock_rev_entries in /metrics"))
}

#[test]
fn reverse_entries_go_with_their_sockets() {
    require_root!();
    let cluster = scenario::running().unwrap();
    for mode in ["tcp", "udp-connected"] {
        let replies = answers(cluster.node_client(0, &[mode, &frontend(), "20"]).unwrap());
        assert_eq!(replies.len(), 20);
    }
    eventually(
        "released sockets' entries gone",
        Duration::from_secs(5),
        || {
            let entries = sock_rev_entries(&cluster, 0)?;
            anyhow::ensure!(entries == 0, "{entries} entries");
            Ok(())
        },
    )
    .unwrap();
    // An unconnected UDP socket may have sent to several backends: its
    // entries age out of the LRU map instead.
    answers(cluster.node_client(0, &["udp", &frontend(), "5"]).unwrap());
    eventually(
        "unconnected sockets' entries kept",
        Duration::from_secs(5),
        || {
            let entries = sock_rev_entries(&cluster, 0)?;
            anyhow::ensure!(entries == 5, "{entries} entries");
            Ok(())
        },
    )
    .unwrap();
}
