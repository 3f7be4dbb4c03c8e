//! `xlb`: the agent and its inspection CLI. Wiring only.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent, attach, cleanup,
    inspect::{self, Format},
    model::{Node, allocate::Ranges},
    netif,
};

/// mimalloc: parsing large manifests allocates and frees millions of
/// small objects on two threads; with it the agent parses them ~35% faster
/// and gives the memory back after the first sync (`agent`), where the
/// system allocator kept ~45 MB more at 30,000 Services.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/xlb";

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "eBPF load balancer for Kubernetes Services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: keep the datapath equal to the Services and
    /// EndpointSlices of the source.
    Agent(Box<AgentArgs>),
    /// Frontends, the Service port each belongs to, and their backends,
    /// tier by tier.
    Services(ServicesArgs),
    /// Backends by id.
    Backends(InspectArgs),
    /// Conntrack entries.
    Conntrack(InspectArgs),
    /// ClientIP session affinity entries, with the time they have left.
    Affinity(InspectArgs),
    /// Datapath counters by verdict and drop reason.
    Stats(InspectArgs),
    /// Detach every program and remove every pin (uninstall).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SourceKind {
    /// The Kubernetes API (in-cluster config, or --kubeconfig).
    Kube,
    /// Kubernetes YAML files.
    File,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpMode {
    /// Native where the driver has it, but not on a veth.
    Auto,
    /// In the driver (the agent fails to start where it has none).
    Native,
    /// In the stack, after the skb is built.
    Generic,
    /// TC alone.
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpTxSetting {
    /// Where delivery is known to work: not on a veth in native mode
    /// (its peer must run XDP too).
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum SocketLbSetting {
    /// Every socket under --cgroup: the node's processes and its pods.
    All,
    /// The node's own processes only; pods stay on the per-packet path
    /// (service meshes such as Istio need to see the Service address).
    HostOnly,
    /// None: every connection is translated per packet.
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct AgentArgs {
    /// Where Services and EndpointSlices come from [default: kube inside a
    /// cluster (KUBERNETES_SERVICE_HOST set), file elsewhere].
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// File or directory of YAML manifests (file source).
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Where ClusterIPs of Services written without one are allocated
    /// from (file source; as kube-apiserver's flag).
    #[arg(long, default_value = "10.96.0.0/12", value_parser = Ranges::parse_cluster_ips)]
    service_cluster_ip_range: (Ipv4Addr, u8),
    /// Where node ports of NodePort and LoadBalancer ports written without
    /// one are allocated from (file source; as kube-apiserver's flag).
    #[arg(long, default_value = "30000-32767", value_parser = Ranges::parse_node_ports)]
    service_node_port_range: std::ops::RangeInclusive<u16>,
    /// kubeconfig of the kube source [default: in-cluster config, else
    /// $KUBECONFIG or ~/.kube/config].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name [default: the hostname].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// This node's zone (file source).
    #[arg(long)]
    zone: Option<String>,
    /// This node's IPv4 addresses [default: those of --external-iface].
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// External interface(s), where NodePort/LoadBalancer traffic arrives.
    #[arg(long = "external-iface")]
    external_ifaces: Vec<String>,
    /// Glob of the pod interfaces to attach to (new links are picked up).
    #[arg(long, default_value = "veth*")]
    pod_ifaces: String,
    /// Which sockets are balanced at the socket: their destination is
    /// translated once, at connect() / sendmsg(), instead of every packet.
    #[arg(long, value_enum, default_value = "all")]
    socket_lb: SocketLbSetting,
    /// The cgroup v2 directory whose processes the socket programs cover
    /// [default: the root of the cgroup v2 mount, from /proc/mounts].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// XDP on the external interfaces: `auto` is native XDP except on a
    /// veth (a kind node's eth0), where it costs more than it saves and
    /// TC alone serves, and where the driver refuses it.
    #[arg(long, value_enum, default_value = "auto")]
    xdp: XdpMode,
    /// Whether XDP sends translated frames back out itself (XDP_TX) or
    /// leaves them to TC.
    #[arg(long, value_enum, default_value = "auto")]
    xdp_tx: XdpTxSetting,
    /// Capacity of the conntrack table in entries, two per flow (112 bytes
    /// of kernel memory each).
    #[arg(long, default_value_t = lb_common::maps::CONNTRACK_MAX,
          value_parser = clap::value_parser!(u32).range(1024..))]
    conntrack_max: u32,
    /// Capacity of the frontends map: Service ports on one address each
    /// (ClusterIP: one; NodePort: two per node address; LoadBalancer and
    /// external IPs: two each).
    #[arg(long, default_value_t = lb_common::maps::FRONTENDS_MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    frontends_max: u32,
    /// Capacity of the backends map: endpoint address, port and protocol,
    /// once however many frontends use it (draining ones included).
    #[arg(long, default_value_t = lb_common::maps::BACKENDS_MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    backends_max: u32,
    /// Capacity of the slots map: a backend in one frontend's tier.
    #[arg(long, default_value_t = lb_common::maps::SLOTS_MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    slots_max: u32,
    /// Capacity of the map of addresses only Services use (ClusterIPs,
    /// LoadBalancer and external IPs).
    #[arg(long, default_value_t = lb_common::maps::SERVICE_ADDRS_MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    service_addrs_max: u32,
    /// Capacity of the ClientIP affinity table (an entry per client and
    /// frontend with affinity; least recently used go first).
    #[arg(long, default_value_t = lb_common::maps::AFFINITY_MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    affinity_max: u32,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Prometheus /metrics address.
    #[arg(long, default_value = "0.0.0.0:10249")]
    metrics_addr: SocketAddr,
    /// /healthz and /livez address.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_addr: SocketAddr,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Args)]
struct ServicesArgs {
    #[command(flatten)]
    inspect: InspectArgs,
    /// Only this Service's frontends: NAME (any namespace),
    /// NAMESPACE/NAME, or NAMESPACE/NAME:PORT-NAME.
    #[arg(long)]
    service: Option<String>,
}

#[derive(Args)]
struct InspectArgs {
    /// The agent's bpffs directory.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xlb: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Agent(args) => run_agent(*args),
        Command::Services(args) => {
            let service = args.service;
            let services = |bpffs: &std::path::Path, format| {
                inspect::services(bpffs, format, service.as_deref())
            };
            print(services, args.inspect)
        }
        Command::Backends(args) => print(inspect::backends, args),
        Command::Conntrack(args) => print(inspect::conntrack, args),
        Command::Affinity(args) => print(inspect::affinity, args),
        Command::Stats(args) => print(inspect::stats, args),
        Command::Cleanup { bpffs } => {
            let links = cleanup::cleanup(&bpffs)
                .with_context(|| format!("cleaning up {}", bpffs.display()))?;
            write_out(&format!(
                "detached {links} program link(s), removed {}\n",
                bpffs.display()
            ))
        }
    }
}

fn print(
    command: impl Fn(&std::path::Path, Format) -> Result<String, lb_userspace::Error>,
    args: InspectArgs,
) -> Result<()> {
    let format = match args.output {
        Output::Table => Format::Table,
        Output::Json => Format::Json,
    };
    let text = command(&args.bpffs, format)?;
    write_out(&text)
}

/// Writes `text` to stdout. A reader that went away (`xlb conntrack | head`)
/// ends the command quietly, as `ls | head` does.
fn write_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn run_agent(args: AgentArgs) -> Result<()> {
    init_logging(args.log_format);
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let source = match args.source {
        Some(kind) => kind,
        None if in_cluster => SourceKind::Kube,
        None => SourceKind::File,
    };
    let source = match source {
        SourceKind::File => agent::SourceConfig::File {
            manifests: args
                .manifests
                .context("--source file needs --manifests PATH")?,
            ranges: Ranges {
                cluster_ips: args.service_cluster_ip_range,
                node_ports: args.service_node_port_range,
            },
        },
        SourceKind::Kube => agent::SourceConfig::Kube {
            kubeconfig: args.kubeconfig,
        },
    };
    let name = match args.node_name {
        Some(name) => name,
        None => hostname()?,
    };
    let ips = if args.node_ips.is_empty() {
        netif::ipv4_addresses(&args.external_ifaces)
    } else {
        args.node_ips
    };
    let pod_ifaces = glob::Pattern::new(&args.pod_ifaces)
        .with_context(|| format!("--pod-ifaces {:?}", args.pod_ifaces))?;
    let xdp = match args.xdp {
        XdpMode::Auto => attach::XdpSetting::Auto,
        XdpMode::Native => attach::XdpSetting::Mode(aya::programs::XdpMode::Driver),
        XdpMode::Generic => attach::XdpSetting::Mode(aya::programs::XdpMode::Skb),
        XdpMode::Off => attach::XdpSetting::Off,
    };
    let socket_lb = match args.socket_lb {
        SocketLbSetting::All => agent::SocketLbMode::All,
        SocketLbSetting::HostOnly => agent::SocketLbMode::HostOnly,
        SocketLbSetting::Off => agent::SocketLbMode::Off,
    };
    let cgroup = match args.cgroup {
        Some(cgroup) => cgroup,
        None if matches!(args.socket_lb, SocketLbSetting::Off) => PathBuf::new(),
        None => lb_userspace::cgroup::v2_mount().context(
            "socket load balancing: no cgroup v2 hierarchy is mounted \
             (mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`, \
             give --cgroup, or run with --socket-lb off)",
        )?,
    };
    let config = agent::Config {
        source,
        socket_lb,
        cgroup,
        node: Node {
            name,
            zone: args.zone,
            ips,
        },
        pod_ifaces,
        external_ifaces: args.external_ifaces,
        xdp,
        xdp_tx: match args.xdp_tx {
            XdpTxSetting::Auto => attach::XdpTx::Auto,
            XdpTxSetting::On => attach::XdpTx::On,
            XdpTxSetting::Off => attach::XdpTx::Off,
        },
        conntrack_max: args.conntrack_max,
        map_capacities: vec![
            (lb_common::maps::FRONTENDS, args.frontends_max),
            (lb_common::maps::BACKENDS, args.backends_max),
            (lb_common::maps::SLOTS, args.slots_max),
            (lb_common::maps::SERVICE_ADDRS, args.service_addrs_max),
            (lb_common::maps::AFFINITY, args.affinity_max),
            (lb_common::maps::SOCK_AFFINITY, args.affinity_max),
        ],
        bpffs: args.bpffs,
        metrics_addr: args.metrics_addr,
        healthz_addr: args.healthz_addr,
    };
    agent::run(config)?;
    Ok(())
}

fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        bail!("gethostname: {}", std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
