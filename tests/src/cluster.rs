//! A cluster of network namespaces on one machine: nodes on a shared L2
//! segment with routes to each other's pod CIDRs, pods behind host-side
//! `veth*` links, one `xlb agent` per node with the file source. Only
//! addresses inside these namespaces are used; everything (agents, pins,
//! namespaces, the bpffs mount) goes away on drop, also on panic.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    cgroup::{self, Cgroups},
    echo::EchoServer,
    netns::{Netns, run},
};

/// The address every pod uses as its gateway; each host-side veth has it,
/// so the pod's ARP is answered by its node.
const POD_GATEWAY: &str = "169.254.1.1";

/// The external client's address on the LAN.
pub const EXTERNAL_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);
/// Where LoadBalancer and external IPs of the tests live; the external
/// client routes it to node1, as an upstream router would.
pub const EXTERNAL_IP_RANGE: &str = "172.30.0.0/24";

/// Polls `f` every 50 ms until it succeeds or `timeout` passes.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() >= deadline => {
                return Err(err.context(format!("{what}: still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The `xlb` binary: `$XLB_BIN`, or the one cargo built beside the tests.
pub fn xlb_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("XLB_BIN") {
        return path.into();
    }
    built_bin("xlb")
}

/// A binary cargo built beside the tests.
fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} not built: run the tests with `cargo xtask test` (or build lb-userspace first)",
        bin.display()
    );
    bin
}

/// A pod: its namespace, address and echo servers.
pub struct Pod {
    pub name: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    servers: Vec<EchoServer>,
}

impl Pod {
    /// Runs `f` inside the pod's network namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.ns.enter(f).expect("enter the pod's namespace")
    }

    /// Adds TCP and UDP echo servers on `port` that answer as `name`.
    pub fn serve_as(&mut self, port: u16, name: &str) -> Result<()> {
        self.servers.push(EchoServer::start(&self.ns, name, port)?);
        Ok(())
    }

    /// Stops the pod's servers (a pod that stopped answering).
    pub fn stop_serving(&mut self) {
        self.servers.clear();
    }
}

/// A node: its namespace, its address on the LAN, its agent.
pub struct Node {
    pub name: String,
    pub zone: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    pub bpffs: PathBuf,
    next_veth: u32,
}

/// A bpffs mounted for one cluster outside /sys, so that it is the same
/// instance inside `ip netns exec` (which remounts /sys) and outside.
struct BpffsMount(PathBuf);

impl BpffsMount {
    fn new(path: PathBuf) -> Result<Self> {
        fs::create_dir_all(&path)?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path))?;
        Ok(Self(path))
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        // Unmounting drops every pin: links detach, maps go.
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// Everything of one test's cluster. Fields drop in order: agents first,
/// the bpffs and the manifests last.
pub struct Cluster {
    agents: Vec<Option<Child>>,
    /// One cgroup per node: its agent attaches the socket programs there,
    /// and the node's and its pods' client processes run in it.
    cgroups: Cgroups,
    /// XDP on the LAN side of the nodes' links, in the `--xdp-tx on` set-up.
    lan_xdp: Option<lb_userspace::Datapath>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    /// A client outside the cluster on the nodes' LAN, with its transmit
    /// checksum offload off (its packets carry full checksums, as a NIC's
    /// do when they arrive).
    pub external: Netns,
    /// The agents' `--xdp` mode; `None`: the default (auto: on these
    /// veths, TC alone).
    xdp: Option<&'static str>,
    /// The agents run with `--xdp-tx on`.
    xdp_tx: bool,
    lan: Netns,
    _bpffs: BpffsMount,
    dir: tempfile::TempDir,
    id: String,
}

impl Cluster {
    /// Nodes named `node1…` in the given zones, on one LAN.
    pub fn new(zones: &[&str]) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "x{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let lan = Netns::new(&format!("{id}-lan"))?;
        lan.ip("link add br0 type bridge")?;
        lan.ip("link set br0 up")?;
        let bpffs = BpffsMount::new(PathBuf::from(format!("/run/xlb-test/{id}")))?;
        let node_names: Vec<String> = (1..=zones.len()).map(|n| format!("node{n}")).collect();
        let cgroups = Cgroups::new(
            PathBuf::from(format!("/run/xlb-test/{id}-cgroup")),
            &format!("xlb-test-{id}"),
            &node_names,
        )?;
        let dir = tempfile::tempdir()?;
        fs::create_dir_all(dir.path().join("manifests"))?;
        let mut nodes = Vec::new();
        for (i, zone) in zones.iter().enumerate() {
            let n = i + 1;
            let name = format!("node{n}");
            let ns = Netns::new(&format!("{id}-{name}"))?;
            let ip = Ipv4Addr::new(192, 168, 77, 10 + n as u8);
            lan.ip(&format!(
                "link add n{n} type veth peer name eth0 netns {}",
                ns.name()
            ))?;
            lan.ip(&format!("link set n{n} master br0 up"))?;
            ns.ip(&format!("addr add {ip}/24 dev eth0"))?;
            ns.ip("link set eth0 up")?;
            // What leaves a node for the LAN carries a full checksum, as on
            // a wire (a veth would hand the next node's XDP a partial one).
            run(ns.command("ethtool").args(["-K", "eth0", "tx", "off"]))?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            nodes.push(Node {
                name,
                zone: zone.to_string(),
                ip,
                ns,
                bpffs: bpffs.0.join(format!("node{n}")),
                next_veth: 0,
            });
        }
        let external = Netns::new(&format!("{id}-ext"))?;
        lan.ip(&format!(
            "link add x0 type veth peer name eth0 netns {}",
            external.name()
        ))?;
        lan.ip("link set x0 master br0 up")?;
        external.ip(&format!("addr add {EXTERNAL_CLIENT_IP}/24 dev eth0"))?;
        external.ip("link set eth0 up")?;
        external.ip(&format!(
            "route add {EXTERNAL_IP_RANGE} via {}",
            nodes[0].ip
        ))?;
        run(external
            .command("ethtool")
            .args(["-K", "eth0", "tx", "off"]))?;
        // Each node routes the other nodes' pod CIDRs to them.
        for (i, node) in nodes.iter().enumerate() {
            for (j, other) in nodes.iter().enumerate() {
                if i != j {
                    node.ns
                        .ip(&format!("route add {} via {}", pod_cidr(j), other.ip))?;
                }
            }
        }
        Ok(Self {
            agents: nodes.iter().map(|_| None).collect(),
            cgroups,
            lan_xdp: None,
            pods: Vec::new(),
            nodes,
            external,
            xdp: None,
            xdp_tx: false,
            lan,
            _bpffs: bpffs,
            dir,
            id,
        })
    }

    /// Agents started from now on run with `--xdp mode` (and otherwise
    /// default flags: on these veths, native XDP leaves frames it would
    /// send back out to TC, as on a kind node).
    pub fn set_xdp(&mut self, mode: &'static str) {
        self.xdp = Some(mode);
    }

    /// The explicit `--xdp-tx on` set-up: agents started from now on send
    /// translated frames back out with `XDP_TX`, and the LAN side of each
    /// node's link runs an XDP program, which a veth needs before it
    /// delivers its peer's `XDP_TX` frames (`veth_xdp_flush` in
    /// drivers/net/veth.c; a NIC has no such condition). That program is
    /// xlb's, with empty maps of its own: it passes every frame.
    pub fn enable_xdp_tx(&mut self) -> Result<()> {
        self.xdp_tx = true;
        if self.lan_xdp.is_some() {
            return Ok(());
        }
        let settings = lb_userspace::datapath::Settings::default();
        let mut datapath = lb_userspace::Datapath::load(&self._bpffs.0.join("lan"), &settings)?;
        let program = datapath.xdp_program()?;
        for n in 1..=self.nodes.len() {
            let link = format!("n{n}");
            self.lan
                .enter(|| program.attach(&link, aya::programs::XdpMode::Driver))??;
        }
        self.lan_xdp = Some(datapath);
        Ok(())
    }

    /// Runs `f` in the external client's namespace.
    pub fn from_outside<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.external.enter(f).expect("enter the external client")
    }

    /// The LAN namespace (holds the bridge the nodes share).
    pub fn lan(&self) -> &Netns {
        &self.lan
    }

    /// Adds a pod on node `node` (index) with echo servers on `ports`.
    pub fn add_pod(&mut self, node: usize, name: &str, ports: &[u16]) -> Result<&Pod> {
        let host = &mut self.nodes[node];
        let k = host.next_veth;
        host.next_veth += 1;
        let ip = Ipv4Addr::new(10, 244, node as u8 + 1, 10 + k as u8);
        let ns = Netns::new(&format!("{}-{name}", self.id))?;
        let veth = format!("veth{k}");
        host.ns.ip(&format!(
            "link add {veth} type veth peer name eth0 netns {}",
            ns.name()
        ))?;
        host.ns
            .ip(&format!("addr add {POD_GATEWAY}/32 dev {veth}"))?;
        host.ns.ip(&format!("link set {veth} up"))?;
        host.ns
            .sysctl(&format!("net.ipv4.conf.{veth}.rp_filter"), "0")?;
        host.ns
            .ip(&format!("route add {ip}/32 dev {veth} src {}", host.ip))?;
        ns.ip(&format!("addr add {ip}/32 dev eth0"))?;
        ns.ip("link set eth0 up")?;
        ns.ip(&format!("route add {POD_GATEWAY} dev eth0 scope link"))?;
        ns.ip(&format!("route add default via {POD_GATEWAY} dev eth0"))?;
        let servers = ports
            .iter()
            .map(|port| EchoServer::start(&ns, name, *port))
            .collect::<Result<_>>()?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            ip,
            ns,
            servers,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// What a kind node's CNI (kindnetd's masquerade rules) does for pods
    /// reaching addresses outside the cluster: their connections leave
    /// with the node's address, so that replies find their way back.
    pub fn masquerade_pod_egress(&self) -> Result<()> {
        for node in &self.nodes {
            run(node.ns.command("iptables").args([
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "10.244.0.0/16",
                "!",
                "-d",
                "10.244.0.0/16",
                "-o",
                "eth0",
                "-j",
                "MASQUERADE",
            ]))?;
        }
        Ok(())
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The pod named `name`, mutable.
    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The manifests directory every agent reads.
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Writes `file` in the manifests directory atomically (write, then
    /// rename over), as a config-management tool would.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.manifests().join(file))?;
        Ok(())
    }

    /// Removes `file` from the manifests directory.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        fs::remove_file(self.manifests().join(file))?;
        Ok(())
    }

    fn log_path(&self, node: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("agent-{}.log", self.nodes[node].name))
    }

    /// Starts node `node`'s agent on the manifests directory and waits until
    /// it attached every pod of the node.
    pub fn start_agent(&mut self, node: usize, extra_args: &[&str]) -> Result<()> {
        let manifests = self.manifests();
        let source = [
            "--source",
            "file",
            "--manifests",
            manifests.to_str().context("utf-8")?,
        ];
        self.start_agent_with_source(node, &source, extra_args)
    }

    /// [`Self::start_agent`] with other `--source` arguments.
    pub fn start_agent_with_source(
        &mut self,
        node: usize,
        source: &[&str],
        extra_args: &[&str],
    ) -> Result<()> {
        let host = &self.nodes[node];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(node))?;
        let group = self.cgroups.group(node);
        let mut command = host.ns.command(xlb_bin().to_str().context("utf-8 path")?);
        // The agent is one of the node's processes.
        cgroup::run_in(&mut command, None, group)?;
        let child = command
            .arg("agent")
            .args(source)
            .arg("--cgroup")
            .arg(group)
            .args(["--node-name", &host.name, "--zone", &host.zone])
            .args(["--node-ip", &host.ip.to_string(), "--bpffs"])
            .arg(&host.bpffs)
            .args(["--external-iface", "eth0"])
            .args(self.xdp.map(|mode| ["--xdp", mode]).iter().flatten())
            .args(if self.xdp_tx {
                &["--xdp-tx", "on"][..]
            } else {
                &[]
            })
            .args([
                "--metrics-addr",
                "127.0.0.1:10249",
                "--healthz-addr",
                "127.0.0.1:10256",
            ])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start xlb agent")?;
        self.agents[node] = Some(child);
        let links = self.nodes[node].bpffs.join("links");
        let mut pins: Vec<PathBuf> = (0..self.nodes[node].next_veth)
            .flat_map(|k| [format!("ingress_veth{k}"), format!("egress_veth{k}")])
            .map(|name| links.join(name))
            .collect();
        pins.push(links.join("nodeport_eth0"));
        if !extra_args.windows(2).any(|w| w == ["--socket-lb", "off"]) {
            pins.push(links.join("sock_connect4"));
        }
        // `auto` (the default) gives a veth TC alone.
        if self.xdp.is_some_and(|mode| mode != "off") {
            pins.push(links.join("xdp_eth0"));
        }
        eventually(
            "agent attached every interface",
            Duration::from_secs(10),
            || {
                self.check_agent_alive(node)?;
                if let Some(pin) = pins.iter().find(|pin| !pin.exists()) {
                    bail!("{} not pinned yet", pin.display());
                }
                Ok(())
            },
        )?;
        // And synced once: a `connect()` balanced at the socket before its
        // frontend exists is never balanced again (a SYN per packet would
        // be, at its retransmission).
        let readyz = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);
        eventually("agent ready", Duration::from_secs(10), || {
            self.check_agent_alive(node)?;
            let (status, _) = self.http_get(node, readyz, "/readyz")?;
            anyhow::ensure!(status == 200, "/readyz: {status}");
            Ok(())
        })
    }

    /// The cgroup of node `node` (its agent's `--cgroup`).
    pub fn cgroup(&self, node: usize) -> &Path {
        self.cgroups.group(node)
    }

    /// Moves this whole process into node `node`'s cgroup until the guard
    /// drops: its threads' sockets, in whatever namespace, are then that
    /// node's, balanced at the socket (the benchmark's clients).
    pub fn join_cgroup(&self, node: usize) -> Result<cgroup::Joined> {
        self.cgroups.join(node)
    }

    /// Runs `xlb-test-client` with `args` as a process of node `node`
    /// itself (its network namespace and cgroup), to the end; its lines.
    pub fn node_client(&self, node: usize, args: &[&str]) -> Result<Vec<String>> {
        let netns = PathBuf::from(format!("/run/netns/{}", self.nodes[node].ns.name()));
        self.client(&netns, node, args)
    }

    /// [`Self::node_client`] as a process of pod `pod` (its namespace, its
    /// node's cgroup).
    pub fn pod_client(&self, pod: &str, args: &[&str]) -> Result<Vec<String>> {
        let pod = self.pod(pod);
        let netns = PathBuf::from(format!("/run/netns/{}", pod.ns.name()));
        self.client(&netns, pod.node, args)
    }

    fn client(&self, netns: &Path, node: usize, args: &[&str]) -> Result<Vec<String>> {
        let mut command = self.client_command(netns, node, args)?;
        let out = run(&mut command)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The `xlb-test-client` command of [`Self::pod_client`], to spawn
    /// (a session driven through its standard input).
    pub fn pod_client_command(&self, pod: &str, args: &[&str]) -> Result<Command> {
        let pod = self.pod(pod);
        let netns = PathBuf::from(format!("/run/netns/{}", pod.ns.name()));
        self.client_command(&netns, pod.node, args)
    }

    fn client_command(&self, netns: &Path, node: usize, args: &[&str]) -> Result<Command> {
        let mut command = Command::new(built_bin("xlb-test-client"));
        command.args(args);
        cgroup::run_in(&mut command, Some(netns), self.cgroups.group(node))?;
        Ok(command)
    }

    /// Starts every node's agent.
    pub fn start_agents(&mut self) -> Result<()> {
        (0..self.nodes.len()).try_for_each(|node| self.start_agent(node, &[]))
    }

    fn check_agent_alive(&mut self, node: usize) -> Result<()> {
        if let Some(child) = &mut self.agents[node]
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "agent of node{} exited: {status}\n{}",
                node + 1,
                self.agent_log(node)
            );
        }
        Ok(())
    }

    /// The process id of node `node`'s agent, while it runs.
    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.agents[node].as_ref().map(Child::id)
    }

    /// `kill -9` of node `node`'s agent.
    pub fn kill_agent(&mut self, node: usize) -> Result<()> {
        if let Some(mut child) = self.agents[node].take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The agent's log so far.
    pub fn agent_log(&self, node: usize) -> String {
        fs::read_to_string(self.log_path(node)).unwrap_or_default()
    }

    /// An HTTP GET from inside node `node` (its agent's metrics/health).
    pub fn http_get(&self, node: usize, addr: SocketAddrV4, path: &str) -> Result<(u16, String)> {
        self.nodes[node].ns.enter(|| http_get(addr, path))?
    }

    /// The bpffs dir of node `node`'s agent.
    pub fn bpffs(&self, node: usize) -> &Path {
        &self.nodes[node].bpffs
    }
}

/// The pod CIDR of node index `node`.
pub fn pod_cidr(node: usize) -> String {
    format!("10.244.{}.0/24", node + 1)
}

/// An HTTP/1.0 GET of `path` at `addr` from the calling thread's namespace.
pub fn http_get(addr: SocketAddrV4, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP status")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in 0..self.nodes.len() {
                let stats = Command::new(xlb_bin())
                    .arg("stats")
                    .arg("--bpffs")
                    .arg(&self.nodes[node].bpffs)
                    .output()
                    .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                    .unwrap_or_default();
                eprintln!(
                    "--- agent log of {}:\n{}--- datapath counters:\n{stats}",
                    self.nodes[node].name,
                    self.agent_log(node)
                );
            }
        }
        for node in 0..self.agents.len() {
            let _ = self.kill_agent(node);
        }
    }
}
