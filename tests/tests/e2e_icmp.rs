//! End to end, ICMP errors through Services: Path-MTU discovery works
//! through a ClusterIP and through a NodePort when a hop before the backend
//! has a 1280-byte MTU (a 64 KB write arrives), and a UDP client of a
//! ClusterIP whose backend port is closed gets `ECONNREFUSED`.
//!
//! The backend, web-0, runs on node2 behind a host-side veth whose MTU is
//! 1280 while the pod's own side stays at 1500: the pod advertises an MSS
//! for 1500, so only the "fragmentation needed" that node2 sends back can
//! shrink the client's segments — and the client takes it only if it quotes
//! the address the client sent to.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use xlb_tests::{
    cluster::{Cluster, EXTERNAL_CLIENT_IP},
    echo::{CLIENT_TIMEOUT, Reply},
    manifests::{Endpoint, Port, documents, endpoint_slice},
    require_root,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const PORT: u16 = 8080;
const NODE_PORT: u16 = 30_040;
/// A Service port whose target port nothing listens on.
const CLOSED_PORT: u16 = 5353;
const TARGET_PORT: u16 = 80;
const WRITE: usize = 64 * 1024;

fn cluster() -> Cluster {
    let mut cluster = Cluster::new(&["zone-a", "zone-b"]).unwrap();
    cluster.add_pod(1, "web-0", &[TARGET_PORT]).unwrap();
    cluster.add_pod(0, "client", &[]).unwrap();
    // The narrow hop: node2 → web-0.
    cluster.nodes[1].ns.ip("link set veth0 mtu 1280").unwrap();
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  ports:\n  - name: http\n    port: {PORT}\n    protocol: TCP\n    targetPort: {TARGET_PORT}\n    nodePort: {NODE_PORT}\n  - name: closed\n    port: {CLOSED_PORT}\n    protocol: UDP\n    targetPort: 9\n"
    );
    let ports = [Port::tcp("http", TARGET_PORT), Port::udp("closed", 9)];
    let endpoints = [Endpoint::ready(cluster.pod("web-0").ip, "node2")];
    cluster
        .write_manifest(
            "web.yaml",
            &documents(&[service, endpoint_slice("web", "web-1", &ports, &endpoints)]),
        )
        .unwrap();
    cluster.start_agents().unwrap();
    cluster
}

/// One 64 KB line to `to` and its echo reply (the calling thread's
/// namespace).
fn big_write(to: SocketAddrV4) -> Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&to.into(), CLIENT_TIMEOUT)
        .with_context(|| format!("connect {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = vec![b'x'; WRITE - 1];
    line.push(b'\n');
    stream.write_all(&line).context("the 64 KB write")?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("the reply to the 64 KB write (lost to a Path-MTU black hole?)")?;
    Reply::parse(&reply)
}

#[test]
fn path_mtu_discovery_works_through_a_cluster_ip_and_a_node_port() {
    require_root!();
    let cluster = cluster();
    let via_cluster_ip = SocketAddrV4::new(CLUSTER_IP, PORT);
    let reply = cluster
        .pod("client")
        .run(|| big_write(via_cluster_ip))
        .unwrap();
    assert_eq!(reply.from, "web-0");
    // From outside through node1, SNATed and forwarded to node2.
    let via_node_port = SocketAddrV4::new(cluster.nodes[0].ip, NODE_PORT);
    let reply = cluster.from_outside(|| big_write(via_node_port)).unwrap();
    assert_eq!(reply.from, "web-0");
    assert_ne!(reply.client_ip, EXTERNAL_CLIENT_IP, "SNATed");
    let log = std::process::Command::new(xlb_tests::cluster::xlb_bin())
        .args(["stats", "--bpffs"])
        .arg(cluster.bpffs(0))
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&log.stdout);
    ensure_line(&stats, "icmp_error").unwrap();
}

fn ensure_line(stats: &str, reason: &str) -> Result<()> {
    let counted = stats
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reason))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    ensure!(counted > 0, "no {reason} counted on node1:\n{stats}");
    Ok(())
}

#[test]
fn a_udp_client_of_a_closed_backend_port_is_refused() {
    require_root!();
    let cluster = cluster();
    let to = SocketAddrV4::new(CLUSTER_IP, CLOSED_PORT);
    let err = cluster
        .pod("client")
        .run(|| -> Result<std::io::Error> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
            socket.connect(to)?;
            socket.send(b"hello")?;
            let mut buf = [0u8; 64];
            match socket.recv(&mut buf) {
                Ok(n) => anyhow::bail!("answered: {:?}", &buf[..n]),
                Err(err) => Ok(err),
            }
        })
        .unwrap();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the port unreachable reached the socket: {err}"
    );
}
