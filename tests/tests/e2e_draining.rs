//! End to end, draining (KEP-1669), as on every rolling update: a long-lived
//! connection keeps its backend, and every byte, while that endpoint turns
//! terminating and then leaves the EndpointSlice — from a pod through the
//! ClusterIP, and from outside through a NodePort to a backend on the other
//! node (SNAT) — while new connections go elsewhere; a UDP client of a
//! removed endpoint is answered by a live one at its next datagram.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use xlb_tests::{
    cluster::{Cluster, eventually},
    echo::{CLIENT_TIMEOUT, Connection, Reply, tcp_request},
    manifests::{Endpoint, Port, documents, endpoint_slice},
    require_root,
    scenario::{self, CLUSTER_IP, PORT, REPLICAS, SERVICE, TARGET_PORT, frontend},
};

const WITHIN: Duration = Duration::from_secs(2);
const NODE_PORT: u16 = 30_080;

/// An endpoint's condition in the slice.
#[derive(Clone, Copy, PartialEq)]
enum Condition {
    Ready,
    /// `ready: false, serving: true, terminating: true`: shutting down.
    Terminating,
}

/// The scenario's Service (a NodePort when `node_port`) with the replicas
/// listed in `endpoints`; the others are gone from its slice.
fn manifests(cluster: &Cluster, endpoints: &[(&str, Condition)], node_port: bool) -> String {
    let endpoints: Vec<Endpoint> = endpoints
        .iter()
        .map(|(name, condition)| {
            let node = REPLICAS
                .iter()
                .find(|(n, _)| n == name)
                .expect("a replica")
                .1;
            Endpoint {
                ready: *condition == Condition::Ready,
                terminating: *condition == Condition::Terminating,
                ..Endpoint::ready(cluster.pod(name).ip, &cluster.nodes[node].name)
            }
        })
        .collect();
    let (kind, node_ports) = if node_port {
        (
            "NodePort",
            [
                format!("    nodePort: {NODE_PORT}\n"),
                format!("    nodePort: {}\n", NODE_PORT + 1),
            ],
        )
    } else {
        ("ClusterIP", [String::new(), String::new()])
    };
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {SERVICE}\n  namespace: default\nspec:\n  type: {kind}\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  ports:\n  - name: tcp\n    port: {PORT}\n    protocol: TCP\n    targetPort: {TARGET_PORT}\n{}  - name: udp\n    port: {PORT}\n    protocol: UDP\n    targetPort: {TARGET_PORT}\n{}",
        node_ports[0], node_ports[1]
    );
    let ports = [Port::tcp("tcp", TARGET_PORT), Port::udp("udp", TARGET_PORT)];
    documents(&[
        service,
        endpoint_slice(SERVICE, &format!("{SERVICE}-abcde"), &ports, &endpoints),
    ])
}

/// The scenario's cluster, every replica ready, agents running.
fn running(node_port: bool) -> Cluster {
    let mut cluster = scenario::cluster().unwrap();
    let all: Vec<(&str, Condition)> = REPLICAS
        .iter()
        .map(|(n, _)| (*n, Condition::Ready))
        .collect();
    cluster
        .write_manifest("sample.yaml", &manifests(&cluster, &all, node_port))
        .unwrap();
    cluster.start_agents().unwrap();
    cluster
}

/// The backends that answer 12 fresh connections made by `connect`.
fn answering(connect: impl Fn() -> Result<Reply>) -> Result<BTreeSet<String>> {
    (0..12).map(|_| connect().map(|r| r.from)).collect()
}

/// Steps the endpoint behind `conn` through terminating and out of the
/// slice, checking after each step that new connections (`connect`) avoid
/// it and that `conn` still gets every answer from it.
fn drain_under(
    cluster: &Cluster,
    conn: &mut Connection,
    connect: impl Fn() -> Result<Reply>,
    node_port: bool,
) {
    let first = conn.request().unwrap();
    let pinned = first.from.clone();
    let others: Vec<&str> = REPLICAS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != pinned)
        .collect();
    let mut steps = vec![(
        "terminating",
        others
            .iter()
            .map(|n| (*n, Condition::Ready))
            .chain([(pinned.as_str(), Condition::Terminating)])
            .collect::<Vec<_>>(),
    )];
    steps.push((
        "gone from the slice",
        others.iter().map(|n| (*n, Condition::Ready)).collect(),
    ));
    for (step, endpoints) in steps {
        cluster
            .write_manifest("sample.yaml", &manifests(cluster, &endpoints, node_port))
            .unwrap();
        eventually(
            &format!("{pinned} {step}: new connections elsewhere"),
            WITHIN,
            || {
                let answered = answering(&connect)?;
                ensure!(!answered.contains(&pinned), "{answered:?}");
                Ok(())
            },
        )
        .unwrap();
        for i in 0..20 {
            let reply = conn
                .request()
                .with_context(|| format!("{pinned} {step}: request {i} on the old connection"))
                .unwrap();
            assert_eq!(reply, first, "{step}: the connection keeps its backend");
        }
    }
}

#[test]
fn a_pods_connection_keeps_its_draining_endpoint() {
    require_root!();
    let cluster = running(false);
    let client = cluster.pod("client");
    let mut conn = client.run(|| Connection::open(frontend())).unwrap();
    drain_under(
        &cluster,
        &mut conn,
        || client.run(|| tcp_request(frontend())),
        false,
    );
}

#[test]
fn an_external_connection_through_a_node_port_keeps_its_remote_draining_endpoint() {
    require_root!();
    let cluster = running(true);
    // node1's NodePort; web-2 runs on node2: SNATed and forwarded.
    let to = SocketAddrV4::new(cluster.nodes[0].ip, NODE_PORT);
    let mut conn = eventually("a connection to web-2", WITHIN, || {
        let mut conn = cluster.from_outside(|| Connection::open(to))?;
        let reply = conn.request()?;
        ensure!(reply.from == "web-2", "{reply:?}");
        ensure!(reply.client_ip == cluster.nodes[0].ip, "SNAT: {reply:?}");
        Ok(conn)
    })
    .unwrap();
    drain_under(
        &cluster,
        &mut conn,
        || cluster.from_outside(|| tcp_request(to)),
        true,
    );
}

#[test]
fn a_udp_client_of_a_removed_endpoint_is_answered_by_a_live_one() {
    require_root!();
    let cluster = running(false);
    let client = cluster.pod("client");
    let to = SocketAddrV4::new(CLUSTER_IP, PORT);
    // One socket, one source port: one flow for as long as it lives.
    let socket = client
        .run(|| -> Result<UdpSocket> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
            Ok(socket)
        })
        .unwrap();
    let ask = || -> Result<Reply> {
        socket.send_to(b"hello", to)?;
        let mut buf = [0u8; 1500];
        let (n, _) = socket.recv_from(&mut buf).context("UDP reply")?;
        Reply::parse(&String::from_utf8_lossy(&buf[..n]))
    };
    let first = ask().unwrap().from;
    assert_eq!(ask().unwrap().from, first, "one flow, one backend");
    // The endpoint leaves the slice; its pod still answers, so only the
    // datapath can move the flow.
    let rest: Vec<(&str, Condition)> = REPLICAS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != first)
        .map(|n| (n, Condition::Ready))
        .collect();
    cluster
        .write_manifest("sample.yaml", &manifests(&cluster, &rest, false))
        .unwrap();
    eventually("the flow moved to a live endpoint", WITHIN, || {
        let reply = ask()?;
        ensure!(reply.from != first, "still {}", reply.from);
        Ok(())
    })
    .unwrap();
}
