//! End to end, on two nodes in two zones: kube-proxy's Service rules as a
//! client sees them — reject without endpoints, internalTrafficPolicy Local,
//! topology (annotation, trafficDistribution, no-hints fallback), the
//! terminating fallback, hairpin, and Services that are not ours.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use xlb_tests::{
    cluster::Cluster,
    echo::tcp_request,
    manifests::{Endpoint, Port, documents, service},
    require_root,
    scenario::{self, REPLICAS, replicas},
};

const PORT: u16 = 80;

fn rule_service(
    name: &str,
    ip: Ipv4Addr,
    metadata: &str,
    spec: &str,
    endpoints: &[Endpoint],
) -> String {
    scenario::rule_service(name, ip, PORT, metadata, spec, endpoints)
}

fn start(cluster: &mut Cluster, docs: &[String]) {
    cluster
        .write_manifest("rules.yaml", &documents(docs))
        .unwrap();
    cluster.start_agents().unwrap();
}

/// The backends that answer 20 connections from `client` to `ip`.
fn seen_from(cluster: &Cluster, client: &str, ip: Ipv4Addr) -> BTreeSet<String> {
    cluster.pod(client).run(|| {
        (0..20)
            .map(|_| {
                tcp_request(SocketAddrV4::new(ip, PORT))
                    .expect("request")
                    .from
            })
            .collect()
    })
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn service_without_endpoints_is_refused_at_once() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let ip = Ipv4Addr::new(10, 96, 0, 20);
    start(&mut cluster, &[rule_service("empty", ip, "", "", &[])]);
    let to = SocketAddrV4::new(ip, PORT);
    cluster.pod("client").run(|| {
        let started = Instant::now();
        let err = TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.connect(to).unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        udp.send(b"hello").unwrap();
        let started = Instant::now();
        let err = udp.recv(&mut [0; 64]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    });
}

#[test]
fn internal_traffic_policy_local_from_both_nodes() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let all = Ipv4Addr::new(10, 96, 0, 21);
    let node1_only = Ipv4Addr::new(10, 96, 0, 22);
    let local = "  internalTrafficPolicy: Local\n";
    let on_node1: Vec<Endpoint> = replicas(&cluster, false)
        .into_iter()
        .filter(|e| e.node == "node1")
        .collect();
    let docs = [
        rule_service("local", all, "", local, &replicas(&cluster, false)),
        rule_service("local-1", node1_only, "", local, &on_node1),
    ];
    start(&mut cluster, &docs);
    assert_eq!(seen_from(&cluster, "client", all), set(&["web-0", "web-1"]));
    assert_eq!(seen_from(&cluster, "client-2", all), set(&["web-2"]));
    // No local endpoint on node2, some elsewhere: dropped (a timeout), not
    // refused — kube-proxy's exception to REJECT.
    let to = SocketAddrV4::new(node1_only, PORT);
    let err = cluster
        .pod("client-2")
        .run(|| TcpStream::connect_timeout(&to.into(), Duration::from_millis(500)).unwrap_err());
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
}

#[test]
fn topology_prefers_this_zone_and_falls_back_without_hints() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let auto = Ipv4Addr::new(10, 96, 0, 23);
    let prefer_close = Ipv4Addr::new(10, 96, 0, 24);
    let unhinted = Ipv4Addr::new(10, 96, 0, 25);
    let annotation = "  annotations: {service.kubernetes.io/topology-mode: Auto}\n";
    let docs = [
        rule_service("auto", auto, annotation, "", &replicas(&cluster, true)),
        rule_service(
            "close",
            prefer_close,
            "",
            "  trafficDistribution: PreferClose\n",
            &replicas(&cluster, true),
        ),
        rule_service(
            "unhinted",
            unhinted,
            annotation,
            "",
            &replicas(&cluster, false),
        ),
    ];
    start(&mut cluster, &docs);
    for ip in [auto, prefer_close] {
        assert_eq!(
            seen_from(&cluster, "client", ip),
            set(&["web-0", "web-1"]),
            "zone-a, {ip}"
        );
        assert_eq!(
            seen_from(&cluster, "client-2", ip),
            set(&["web-2"]),
            "zone-b, {ip}"
        );
    }
    for client in ["client", "client-2"] {
        assert_eq!(
            seen_from(&cluster, client, unhinted),
            set(&["web-0", "web-1", "web-2"]),
            "{client}"
        );
    }
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let all_terminating = Ipv4Addr::new(10, 96, 0, 26);
    let one_ready = Ipv4Addr::new(10, 96, 0, 27);
    let terminating = |ready_one: Option<&str>| -> Vec<Endpoint> {
        replicas(&cluster, false)
            .into_iter()
            .zip(REPLICAS)
            .map(|(e, (name, _))| {
                let ready = Some(name) == ready_one;
                Endpoint {
                    ready,
                    terminating: !ready,
                    ..e
                }
            })
            .collect()
    };
    let docs = [
        rule_service("draining", all_terminating, "", "", &terminating(None)),
        rule_service("one-ready", one_ready, "", "", &terminating(Some("web-2"))),
    ];
    start(&mut cluster, &docs);
    assert_eq!(
        seen_from(&cluster, "client", all_terminating),
        set(&["web-0", "web-1", "web-2"])
    );
    assert_eq!(seen_from(&cluster, "client", one_ready), set(&["web-2"]));
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let ip = Ipv4Addr::new(10, 96, 0, 28);
    let web0: Vec<Endpoint> = replicas(&cluster, false).into_iter().take(1).collect();
    let docs = [rule_service("self", ip, "", "", &web0)];
    start(&mut cluster, &docs);
    let reply = cluster
        .pod("web-0")
        .run(|| tcp_request(SocketAddrV4::new(ip, PORT)))
        .unwrap();
    assert_eq!(reply.from, "web-0");
    assert_eq!(
        reply.client_ip,
        Ipv4Addr::new(169, 254, 42, 1),
        "the hairpin source"
    );
}

#[test]
fn services_of_another_proxy_are_left_alone_while_others_work() {
    require_root!();
    let mut cluster = scenario::cluster().unwrap();
    let theirs = Ipv4Addr::new(10, 96, 0, 29);
    let ours = Ipv4Addr::new(10, 96, 0, 30);
    let labelled = "  labels: {service.kubernetes.io/service-proxy-name: someone-else}\n";
    let docs = [
        rule_service("theirs", theirs, labelled, "", &replicas(&cluster, false)),
        rule_service("ours", ours, "", "", &replicas(&cluster, false)),
        service(
            "headless-label",
            Ipv4Addr::new(10, 96, 0, 31),
            &[Port::tcp("", PORT)],
            &["80"],
        )
        .replace(
            "  namespace: default\n",
            "  namespace: default\n  labels: {service.kubernetes.io/headless: \"\"}\n",
        ),
    ];
    start(&mut cluster, &docs);
    assert_eq!(seen_from(&cluster, "client", ours).len(), 3);
    for ip in [theirs, Ipv4Addr::new(10, 96, 0, 31)] {
        let to = SocketAddrV4::new(ip, PORT);
        let result = cluster
            .pod("client")
            .run(|| TcpStream::connect_timeout(&to.into(), Duration::from_millis(500)));
        assert!(result.is_err(), "{ip} must not be served: {result:?}");
    }
}
