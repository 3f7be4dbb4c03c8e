//! The Service examples of `examples/` on the demo cluster: the frontends
//! each one asks for (from the model, as every agent computes them, with
//! ClusterIPs and node ports allocated), the clients that reach them (pods
//! for ClusterIPs, the client outside the cluster for NodePort and
//! LoadBalancer addresses), and what their requests get.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use lb_userspace::{
    model::{self, Protocol, Scope, allocate::Ranges},
    problem::Problem,
    source::{Snapshot, file},
};

use crate::{
    cluster::{Cluster, EXTERNAL_CLIENT_IP},
    echo::{EchoServer, Reply, tcp_request, udp_request},
    scenario,
};

/// The replicas' second port (the examples' `admin-port`), and the port of
/// the server outside the cluster: the docs' 9376.
pub const SECOND_PORT: u16 = 9376;
/// The name the server outside the cluster answers as.
pub const OUTSIDE: &str = "outside";

/// The examples directory.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every example, by path.
pub fn files() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir())?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    Ok(files)
}

/// The demo cluster as the examples need it: the scenario's replicas also
/// answer on [`SECOND_PORT`] (as `<pod>:9376`), a server outside the
/// cluster answers on [`SECOND_PORT`] at the external client's address,
/// and pods reach outside addresses masqueraded, as on a kind node.
pub struct Demo {
    pub cluster: Cluster,
    _outside: EchoServer,
}

impl Demo {
    pub fn new() -> Result<Self> {
        let mut cluster = scenario::cluster()?;
        for (name, _) in scenario::REPLICAS {
            cluster
                .pod_mut(name)
                .serve_as(SECOND_PORT, &format!("{name}:{SECOND_PORT}"))?;
        }
        cluster.masquerade_pod_egress()?;
        let outside = EchoServer::start(&cluster.external, OUTSIDE, SECOND_PORT)?;
        Ok(Self {
            cluster,
            _outside: outside,
        })
    }

    /// Node1's identity, as its agent has it.
    fn node1(&self) -> model::Node {
        let node = &self.cluster.nodes[0];
        model::Node {
            name: node.name.clone(),
            zone: Some(node.zone.clone()),
            ips: vec![node.ip],
        }
    }
}

/// Where requests come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Client {
    /// A pod of the demo cluster (`client` on node1, `client-2` on node2).
    Pod(&'static str),
    /// The client outside the cluster, on the nodes' LAN.
    Outside,
}

impl Client {
    /// The address the client has.
    pub fn ip(self, cluster: &Cluster) -> Ipv4Addr {
        match self {
            Client::Pod(pod) => cluster.pod(pod).ip,
            Client::Outside => EXTERNAL_CLIENT_IP,
        }
    }
}

/// One frontend of an example and a client of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// `namespace/name[:port]`.
    pub service_port: String,
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
    pub client: Client,
}

/// The frontends `yaml` asks of node1, each with its clients: ClusterIPs
/// from a pod on each node, external addresses (node ports, load-balancer
/// and external IPs) from outside; and what the model found wrong.
pub fn targets(demo: &Demo, yaml: &str) -> (Vec<Target>, Vec<Problem>) {
    let mut snapshot = Snapshot::default();
    file::parse_into("example", yaml, &mut snapshot);
    let (desired, problems) = model::desired(&snapshot, &demo.node1(), Some(Ranges::default()));
    let external: BTreeSet<(Ipv4Addr, u16)> = desired
        .frontends
        .keys()
        .filter(|addr| addr.scope == Scope::External)
        .map(|addr| (addr.ip, addr.port))
        .collect();
    let mut targets = Vec::new();
    for (addr, frontend) in &desired.frontends {
        let clients: &[Client] = match addr.scope {
            Scope::External => &[Client::Outside],
            // The pods' side of an external address: the same backends.
            Scope::Internal if external.contains(&(addr.ip, addr.port)) => &[],
            Scope::Internal => &[Client::Pod("client"), Client::Pod("client-2")],
        };
        for client in clients {
            targets.push(Target {
                service_port: frontend.service_port.clone(),
                addr: SocketAddrV4::new(addr.ip, addr.port),
                protocol: addr.protocol,
                client: *client,
            });
        }
    }
    (targets, problems)
}

/// What requests got: by the backend that answered, how many replies and
/// the client addresses it saw; failures by error.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub backends: BTreeMap<String, (usize, BTreeSet<Ipv4Addr>)>,
    pub errors: BTreeMap<String, usize>,
}

impl Outcome {
    fn add(&mut self, from: &str, client_ip: Ipv4Addr) {
        let (replies, seen) = self.backends.entry(from.to_owned()).or_default();
        *replies += 1;
        seen.insert(client_ip);
    }

    /// The backends that answered.
    pub fn answered(&self) -> BTreeSet<&str> {
        self.backends.keys().map(String::as_str).collect()
    }

    /// The client addresses `backend` saw.
    pub fn seen_by(&self, backend: &str) -> BTreeSet<Ipv4Addr> {
        self.backends
            .get(backend)
            .map(|(_, seen)| seen.clone())
            .unwrap_or_default()
    }
}

/// `count` requests of `target`, each on a connection (or datagram) of its
/// own. Pods' requests come from a process in their node's cgroup, as an
/// application's do (balanced at the socket).
pub fn send(cluster: &Cluster, target: &Target, count: usize) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    match target.client {
        Client::Pod(pod) => {
            let mode = match target.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            let addr = target.addr.to_string();
            let lines = cluster.pod_client(pod, &[mode, &addr, &count.to_string()])?;
            for line in lines {
                // `ok from=<pod> client=<ip> peer=<addr>` or `err <errno>`.
                if let Some(error) = line.strip_prefix("err ") {
                    *outcome.errors.entry(error.to_owned()).or_default() += 1;
                    continue;
                }
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix(name))
                        .with_context(|| format!("{name} in {line:?}"))
                };
                outcome.add(field("from=")?, field("client=")?.parse()?);
            }
        }
        Client::Outside => {
            let replies: Vec<Result<Reply>> = cluster.from_outside(|| {
                (0..count)
                    .map(|_| match target.protocol {
                        Protocol::Tcp => tcp_request(target.addr),
                        Protocol::Udp => udp_request(target.addr),
                    })
                    .collect()
            });
            for reply in replies {
                match reply {
                    Ok(reply) => outcome.add(&reply.from, reply.client_ip),
                    Err(err) => {
                        *outcome
                            .errors
                            .entry(err.root_cause().to_string())
                            .or_default() += 1
                    }
                }
            }
        }
    }
    Ok(outcome)
}
