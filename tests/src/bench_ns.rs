//! The north-south benchmark's pieces (`cargo xtask bench north-south`):
//! a client outside the cluster, on the nodes' LAN, reaching backends
//! through node1 — a node port with `externalTrafficPolicy: Cluster` whose
//! only backend is on node2 (SNAT and forwarding), a node port with
//! `Local` whose backends are on node1 (the client's address kept), and a
//! load-balancer address (routed to node1, backends on both nodes) — in
//! every mode, with the machine's CPU time and xlb's programs' run time
//! per request.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::{
    baseline::{self, BenchService, External},
    bench_e2e::{self, BACKENDS, BenchServer, PORT},
    cluster::Cluster,
    echo::tcp_request,
    manifests::documents,
    netns::run,
};

/// The Services' port.
const SERVICE_PORT: u16 = 80;
/// The load-balancer address (in `EXTERNAL_IP_RANGE`, which the client
/// routes to node1 as an upstream router would).
pub const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);

/// How external traffic is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No load balancer: the client is routed straight to the backends.
    Direct,
    /// kube-proxy's iptables rules on node1.
    Iptables,
    /// kube-proxy's nftables rules on node1.
    Nftables,
    /// xlb's agent on node1, `--xdp off`: TC only (what the default,
    /// `--xdp auto`, gives a veth).
    XlbTc,
    /// xlb's agent on node1 with `--xdp native`: XDP in front of TC. On a
    /// veth (a kind node's eth0) XDP cannot send frames back out
    /// (`XDP_TX` needs XDP on the peer), so `--xdp-tx auto` leaves those
    /// to TC; XDP drops, translates to local pods, and passes.
    XlbXdp,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Iptables,
        Mode::Nftables,
        Mode::XlbTc,
        Mode::XlbXdp,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown mode {s}"))
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::XlbTc => "xlb-tc",
            Mode::XlbXdp => "xlb-xdp",
        }
    }

    pub fn is_xlb(self) -> bool {
        matches!(self, Mode::XlbTc | Mode::XlbXdp)
    }
}

/// What the client goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A node port of node1, `externalTrafficPolicy: Cluster`, the backend
    /// on node2: translated, SNATed to node1 and forwarded.
    NodePortCluster,
    /// A node port of node1, `externalTrafficPolicy: Local`, backends on
    /// node1: translated, the client's address kept.
    NodePortLocal,
    /// A load-balancer address routed to node1, backends on both nodes
    /// (`Cluster`).
    LoadBalancer,
}

impl Path {
    pub const ALL: [Path; 3] = [
        Path::NodePortCluster,
        Path::NodePortLocal,
        Path::LoadBalancer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::NodePortCluster => "nodeport-cluster",
            Path::NodePortLocal => "nodeport-local",
            Path::LoadBalancer => "loadbalancer",
        }
    }

    /// The Service of the path.
    fn service(self) -> &'static str {
        match self {
            Path::NodePortCluster => "ns-cluster",
            Path::NodePortLocal => "ns-local",
            Path::LoadBalancer => "ns-lb",
        }
    }

    fn cluster_ip(self) -> Ipv4Addr {
        match self {
            Path::NodePortCluster => Ipv4Addr::new(10, 96, 0, 20),
            Path::NodePortLocal => Ipv4Addr::new(10, 96, 0, 21),
            Path::LoadBalancer => Ipv4Addr::new(10, 96, 0, 22),
        }
    }

    fn node_port(self) -> u16 {
        match self {
            Path::NodePortCluster => 30080,
            Path::NodePortLocal => 30081,
            Path::LoadBalancer => 30082,
        }
    }

    /// The backends (names of [`BACKENDS`]).
    fn backends(self) -> &'static [&'static str] {
        match self {
            Path::NodePortCluster => &["web-2"],
            Path::NodePortLocal => &["web-0", "web-1"],
            Path::LoadBalancer => &["web-0", "web-1", "web-2"],
        }
    }

    fn local(self) -> bool {
        self == Path::NodePortLocal
    }

    fn load_balancer_ip(self) -> Option<Ipv4Addr> {
        (self == Path::LoadBalancer).then_some(LOAD_BALANCER_IP)
    }
}

/// One measured point.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub mode: &'static str,
    pub services: u32,
    pub path: &'static str,
    pub metric: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub unit: &'static str,
}

impl Row {
    /// The row of `samples` (at least one).
    pub fn of(
        (mode, services, path): (Mode, u32, Path),
        metric: &'static str,
        unit: &'static str,
        samples: &[f64],
    ) -> Self {
        let (median, min, max) = bench_e2e::summary(samples);
        Row {
            mode: mode.name(),
            services,
            path: path.name(),
            metric,
            median,
            min,
            max,
            unit,
        }
    }
}

/// The benchmark's cluster (the end-to-end benchmark's: two nodes, the
/// backends and their servers), with the client outside routing the pod
/// networks to their nodes (for the direct mode), its ephemeral ports
/// widened and TIME_WAIT reuse on, as the client pod's.
pub fn cluster() -> Result<(Cluster, Vec<BenchServer>)> {
    let (cluster, servers) = bench_e2e::cluster()?;
    let client = &cluster.external;
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    for (i, node) in cluster.nodes.iter().enumerate() {
        cluster.external.ip(&format!(
            "route add {} via {}",
            crate::cluster::pod_cidr(i),
            node.ip
        ))?;
    }
    Ok((cluster, servers))
}

/// `fillers` ClusterIP Services (as the end-to-end benchmark's), then the
/// paths' Services, TCP and UDP.
pub fn services(cluster: &Cluster, fillers: u32) -> Vec<BenchService> {
    let mut services: Vec<BenchService> = bench_e2e::services(cluster, fillers)
        .into_iter()
        .filter(|s| s.name.starts_with("filler-"))
        .collect();
    for path in Path::ALL {
        let backends: Vec<(Ipv4Addr, usize)> = path
            .backends()
            .iter()
            .map(|name| {
                let (_, node) = BACKENDS.iter().find(|(n, _)| n == name).expect("a backend");
                (cluster.pod(name).ip, *node)
            })
            .collect();
        for protocol in ["tcp", "udp"] {
            let local = backends
                .iter()
                .enumerate()
                .filter(|(_, (_, node))| *node == 0)
                .map(|(i, _)| i)
                .collect();
            services.push(BenchService {
                namespace: "default".into(),
                name: path.service().into(),
                ip: path.cluster_ip(),
                port: SERVICE_PORT,
                protocol,
                endpoints: backends.iter().map(|(ip, _)| (*ip, PORT)).collect(),
                external: Some(External {
                    node_port: path.node_port(),
                    load_balancer_ip: path.load_balancer_ip(),
                    local_endpoints: path.local().then_some(local),
                }),
            });
        }
    }
    services
}

/// The manifests of `services` for the file source: the fillers, and each
/// path's Service (TCP and UDP ports) with its EndpointSlice.
pub fn manifests(services: &[BenchService]) -> String {
    let mut docs = vec![bench_e2e::filler_manifests(services)];
    for path in Path::ALL {
        let Some(svc) = services.iter().find(|s| s.name == path.service()) else {
            continue;
        };
        let type_ = match path.load_balancer_ip() {
            Some(_) => "LoadBalancer",
            None => "NodePort",
        };
        let policy = if path.local() { "Local" } else { "Cluster" };
        let status = path
            .load_balancer_ip()
            .map(|ip| format!("status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n"))
            .unwrap_or_default();
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  type: {type_}\n  clusterIP: {ip}\n  externalTrafficPolicy: {policy}\n  ports:\n\
             \x20 - {{name: tcp, protocol: TCP, port: {SERVICE_PORT}, targetPort: {PORT}, nodePort: {np}}}\n\
             \x20 - {{name: udp, protocol: UDP, port: {SERVICE_PORT}, targetPort: {PORT}, nodePort: {np}}}\n{status}",
            name = svc.name,
            ip = svc.ip,
            np = path.node_port(),
        ));
        // Pod networks are 10.244.<node number>.0/24.
        let endpoints: Vec<String> = svc
            .endpoints
            .iter()
            .map(|(ip, _)| {
                format!(
                    "- {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: node{}}}",
                    ip.octets()[2]
                )
            })
            .collect();
        docs.push(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: tcp, protocol: TCP, port: {PORT}}}, {{name: udp, protocol: UDP, port: {PORT}}}]\n\
             endpoints:\n{}\n",
            endpoints.join("\n"),
            name = svc.name,
        ));
    }
    documents(&docs)
}

/// Programs `services` on node1 the way `mode` does; returns how long it
/// took (until every path answers the client outside).
pub fn program(cluster: &mut Cluster, mode: Mode, services: &[BenchService]) -> Result<Duration> {
    let started = Instant::now();
    let node = &cluster.nodes[0].ns;
    match mode {
        Mode::Direct => {}
        Mode::Iptables => baseline::load(node, baseline::Rules::Iptables, services)?,
        Mode::Nftables => baseline::load(node, baseline::Rules::Nftables, services)?,
        Mode::XlbTc | Mode::XlbXdp => {
            cluster.set_xdp(if mode == Mode::XlbTc { "off" } else { "native" });
            cluster.write_manifest("bench.yaml", &manifests(services))?;
            cluster.start_agent(0, &[])?;
        }
    }
    for path in Path::ALL {
        for target in targets(cluster, mode, path) {
            wait_answered(cluster, target, Duration::from_secs(600))
                .with_context(|| format!("{} never answered", path.name()))?;
        }
    }
    Ok(started.elapsed())
}

/// Waits until `target` answers the client outside.
fn wait_answered(cluster: &Cluster, target: SocketAddrV4, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match cluster.from_outside(|| tcp_request(target)) {
            Ok(_) => return Ok(()),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The addresses the client outside uses for `path` in `mode`.
pub fn targets(cluster: &Cluster, mode: Mode, path: Path) -> Vec<SocketAddrV4> {
    match (mode, path) {
        (Mode::Direct, _) => path
            .backends()
            .iter()
            .map(|name| SocketAddrV4::new(cluster.pod(name).ip, PORT))
            .collect(),
        (_, Path::LoadBalancer) => vec![SocketAddrV4::new(LOAD_BALANCER_IP, SERVICE_PORT)],
        (_, _) => vec![SocketAddrV4::new(cluster.nodes[0].ip, path.node_port())],
    }
}

/// The machine's busy CPU time so far (user, nice, system, irq, softirq;
/// not idle, I/O wait or steal), from `/proc/stat`.
pub fn cpu_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().context("/proc/stat"))
        .collect::<Result<_>>()?;
    ensure!(fields.len() >= 7, "/proc/stat: {line}");
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(busy * 1_000_000_000 / ticks))
}

/// xlb's programs by name: run count and run time so far (kernel
/// statistics, counted while `kernel.bpf_stats_enabled` is 1), summed over
/// every loaded program of that name — the benchmark's one agent's, so
/// nothing else loading xlb may run beside it.
pub fn bpf_run_stats() -> Result<BTreeMap<String, (u64, u64)>> {
    let out = run(std::process::Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let programs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut stats = BTreeMap::new();
    for program in programs {
        let name = program["name"].as_str().unwrap_or_default();
        if !XLB_PROGRAMS.contains(&name) {
            continue;
        }
        let entry: &mut (u64, u64) = stats.entry(name.to_owned()).or_default();
        entry.0 += program["run_cnt"].as_u64().unwrap_or(0);
        entry.1 += program["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(stats)
}

/// The programs the north-south path runs (names as the kernel keeps
/// them).
const XLB_PROGRAMS: [&str; 4] = ["nodeport_xdp", "nodeport_tc", "from_pod", "to_pod"];

/// `kernel.bpf_stats_enabled` set to 1 until dropped (it costs every
/// program run two clock reads, so it is on only while profiling).
pub struct BpfStatsEnabled(String);

impl BpfStatsEnabled {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    pub fn new() -> Result<Self> {
        let before = std::fs::read_to_string(Self::PATH)?;
        std::fs::write(Self::PATH, "1")?;
        Ok(Self(before.trim().to_owned()))
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// Runs `load` (which returns how many requests it served) and returns
/// the requests with the busy CPU time they took.
pub fn measured(load: impl FnOnce() -> Result<f64>) -> Result<(f64, Duration)> {
    let before = cpu_busy()?;
    let requests = load()?;
    let busy = cpu_busy()?.saturating_sub(before);
    if requests <= 0.0 {
        bail!("no request served");
    }
    Ok((requests, busy))
}
