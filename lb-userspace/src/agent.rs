//! The agent's loop: watch the manifests and the pod interfaces, sync.
//!
//! It never tears the datapath down: on exit (SIGTERM or a crash) the
//! programs stay attached through their pinned links and the maps stay
//! pinned, so a restart or upgrade drops no flow.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use lb_common::ct_event;

use crate::{
    Datapath, Error,
    attach::{self, PodInterfaces},
    bpf_link, clock,
    conntrack::{ConntrackTable, Evictions, SockRevTable},
    datapath::{Settings, SocketLb},
    health_check::HealthChecks,
    metrics::{self, Endpoints, Metrics},
    model::{Model, Node, allocate::Ranges},
    netif,
    problem::Problem,
    source::{Change, file::FileSource, kube::KubeSource},
    sync::{Scope, Syncer},
};

/// A started source.
enum Source {
    File(Box<FileSource>),
    Kube(KubeSource),
}

impl Source {
    fn start(config: &SourceConfig, node: &str) -> Result<Self, Error> {
        Ok(match config {
            SourceConfig::File { manifests, .. } => {
                Source::File(Box::new(FileSource::new(manifests.clone())))
            }
            SourceConfig::Kube { kubeconfig } => {
                Source::Kube(crate::source::kube::start(kubeconfig.as_deref(), node)?)
            }
        })
    }

    /// Whether the model holds everything (the API source listed every
    /// resource once); before that the agent leaves the maps alone.
    fn ready(&self) -> bool {
        match self {
            Source::File(_) => true,
            Source::Kube(kube) => kube.shared.synced(),
        }
    }

    /// What changed since the last call.
    fn poll(&mut self) -> Vec<Change> {
        match self {
            Source::File(files) => files.scan(),
            Source::Kube(kube) => kube.shared.take_changes(),
        }
    }

    /// Tells the object's owner, where the source can (Kubernetes Events).
    fn report(&self, problem: &Problem) {
        if let Source::Kube(kube) = self {
            kube.report(problem);
        }
    }

    /// Waits up to `timeout`, less when the source knows of a change.
    fn wait(&mut self, timeout: Duration) {
        match self {
            Source::File(files) => files.wait(timeout),
            Source::Kube(_) => std::thread::sleep(timeout),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::File(files) => format!("file {}", files.path().display()),
            Source::Kube(_) => "kube".into(),
        }
    }
}

/// How often the loop looks at the interfaces (and at the manifests, when
/// no change notification wakes it earlier).
const TICK: Duration = Duration::from_millis(100);
/// How often the agent walks conntrack (expired entries out, drained
/// backends deleted).
const CONNTRACK_WALK: Duration = Duration::from_secs(1);
/// How often the maps are re-read and everything compared with the model
/// (the full recompute; what it finds is drift), give or take
/// [`FULL_CHECK_JITTER`] so that a cluster's agents do not all do it at
/// once.
const FULL_CHECK: Duration = Duration::from_secs(300);
const FULL_CHECK_JITTER: Duration = Duration::from_secs(30);
/// After the first sync (loading the datapath and the first read are
/// behind it) and after a sync of this many changes (a re-list, a large
/// manifest written), freed memory is returned to the system.
const RETURN_MEMORY_AFTER: usize = 1000;
/// How often interfaces whose attachment failed are tried again.
const RETRY_INTERFACES: Duration = Duration::from_secs(60);

/// Where the agent reads Services and EndpointSlices.
pub enum SourceConfig {
    /// YAML files under this path; Services written without ClusterIPs or
    /// node ports are given them from these ranges.
    File { manifests: PathBuf, ranges: Ranges },
    /// The API server, through this kubeconfig or the inferred config.
    Kube { kubeconfig: Option<PathBuf> },
}

/// Which sockets the socket path balances (`--socket-lb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketLbMode {
    /// Every socket in the cgroup: the node's processes and its pods.
    All,
    /// The node's own processes (its network namespace) only: pods stay
    /// on the per-packet path.
    HostOnly,
    /// None.
    Off,
}

/// What the agent runs with (see `xlb agent --help`).
pub struct Config {
    pub source: SourceConfig,
    /// This node as the flags give it; a Node object of the same name in
    /// the manifests fills in the zone and addresses the flags leave out.
    pub node: Node,
    pub pod_ifaces: glob::Pattern,
    /// Where external clients' traffic arrives (NodePort, LoadBalancer).
    pub external_ifaces: Vec<String>,
    /// Which sockets are balanced at the socket, and the cgroup (v2
    /// directory) whose processes that covers.
    pub socket_lb: SocketLbMode,
    pub cgroup: PathBuf,
    /// XDP on the external interfaces.
    pub xdp: attach::XdpSetting,
    /// Where XDP may answer with `XDP_TX`.
    pub xdp_tx: attach::XdpTx,
    /// Capacity of the conntrack table, in entries (two per flow).
    pub conntrack_max: u32,
    /// Capacities of the service maps, by map name. A pinned map keeps
    /// the capacity it was created with.
    pub map_capacities: Vec<(&'static str, u32)>,
    pub bpffs: PathBuf,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
}

/// Runs until the process is killed.
pub fn run(config: Config) -> Result<(), Error> {
    // External flows to remote backends are SNATed to the node's first
    // address, which their replies come back to.
    let snat_addr = config.node.ips.iter().copied().find(|ip| !ip.is_loopback());
    if snat_addr.is_none() {
        warn!("no node address: external traffic reaches local endpoints only (give --node-ip)");
    }
    let socket_lb = match config.socket_lb {
        SocketLbMode::All => SocketLb::All,
        SocketLbMode::HostOnly => SocketLb::HostOnly {
            netns_cookie: bpf_link::own_netns_cookie()
                .map_err(|e| Error::SocketLb(format!("this network namespace's cookie: {e}")))?,
        },
        SocketLbMode::Off => SocketLb::Off,
    };
    let settings = Settings {
        snat_addr,
        socket_lb,
        capacities: config
            .map_capacities
            .iter()
            .copied()
            .chain([(lb_common::maps::CONNTRACK, config.conntrack_max)])
            .collect(),
        ..Settings::default()
    };
    let mut datapath = Datapath::load(&config.bpffs, &settings)?;
    let mut xdp_tx_interfaces = Vec::new();
    for interface in &config.external_ifaces {
        let driver = netif::driver(interface).unwrap_or_default();
        let mut xdp = attach::xdp_mode(config.xdp, &driver);
        match attach::attach_external(&mut datapath, interface, xdp) {
            Ok(()) => {}
            // Auto takes native XDP where the driver has it.
            Err(err) if config.xdp == attach::XdpSetting::Auto && xdp.is_some() => {
                warn!(%interface, %driver, "no native XDP here, TC only: {err}");
                xdp = None;
                attach::attach_external(&mut datapath, interface, None)?;
            }
            Err(err) => return Err(err),
        }
        let Some(mode) = xdp else {
            info!(%interface, %driver, setting = ?config.xdp, "attached north-south programs: TC only");
            continue;
        };
        let tx = attach::uses_xdp_tx(config.xdp_tx, mode, &driver);
        if tx {
            xdp_tx_interfaces.push(interface.clone());
        }
        let actions = if tx {
            "XDP_DROP, XDP_PASS, XDP_TX"
        } else {
            "XDP_DROP, XDP_PASS (frames to send back out go to TC)"
        };
        info!(%interface, %driver, ?mode, actions, "attached north-south programs: XDP in front of TC");
    }
    if socket_lb == SocketLb::Off {
        attach::detach_socket_lb(&config.bpffs)?;
    } else {
        attach::attach_socket_lb(&mut datapath, &config.cgroup)?;
        info!(cgroup = %config.cgroup.display(), mode = ?config.socket_lb, "attached the socket programs");
    }
    let mut maps = datapath.take_maps()?;
    attach::set_xdp_tx_interfaces(&mut maps.xdp_tx_ifaces, &xdp_tx_interfaces)?;
    let model = match &config.source {
        // No API server fills in what manifests leave out: the model does.
        SourceConfig::File { ranges, .. } => Model::allocating(config.node.clone(), ranges.clone()),
        SourceConfig::Kube { .. } => Model::new(config.node.clone()),
    };
    let mut syncer = Syncer::new(maps, model)?;
    let conntrack = ConntrackTable::open(&config.bpffs)?;
    let sock_rev = SockRevTable::open(&config.bpffs)?;
    if conntrack.capacity() != config.conntrack_max {
        warn!(
            pinned = conntrack.capacity(),
            wanted = config.conntrack_max,
            "the pinned conntrack table keeps its capacity (its flows stay); \
             `xlb cleanup` and a restart resize it, dropping every flow"
        );
    }
    let mut evictions = Evictions::default();
    let mut last_walk: Option<Instant> = None;
    let mut walked = false;
    let mut source = Source::start(&config.source, &config.node.name)?;
    let metrics = Arc::new(Metrics::new(config.bpffs.clone()));
    let bound = metrics::serve(config.metrics_addr, Endpoints::Metrics, metrics.clone())?;
    info!(addr = %bound, "serving /metrics");
    let bound = metrics::serve(config.healthz_addr, Endpoints::Health, metrics.clone())?;
    info!(addr = %bound, "serving /healthz, /livez and /readyz");
    let mut interfaces = PodInterfaces::new(config.pod_ifaces.clone(), &config.bpffs);
    let mut health_checks = HealthChecks::default();
    info!(
        node = %config.node.name,
        source = %source.describe(),
        bpffs = %config.bpffs.display(),
        "agent started"
    );
    // Node objects by name: one of this node's name completes its identity.
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut synced_once = false;
    let mut pending = false;
    let mut next_check = Instant::now() + jittered(FULL_CHECK);
    let mut last_interface_retry = Instant::now();
    loop {
        for attached in interfaces.scan(&mut datapath) {
            match attached.result {
                Ok(()) => info!(interface = %attached.interface, "attached pod programs"),
                Err(err) => warn!(interface = %attached.interface, "{err}"),
            }
        }
        if last_interface_retry.elapsed() >= RETRY_INTERFACES {
            interfaces.retry_failed();
            last_interface_retry = Instant::now();
        }
        if last_walk.is_none_or(|at| at.elapsed() >= CONNTRACK_WALK) {
            let started = Instant::now();
            walked |= walk_conntrack(&conntrack, &mut syncer, &mut evictions, &metrics);
            match sock_rev.count() {
                Ok(entries) => metrics.observe_sock_rev(entries, sock_rev.capacity()),
                Err(err) => warn!("{err}"),
            }
            last_walk = Some(started);
        }
        let read_started = Instant::now();
        let changes = source.poll();
        let read_micros = read_started.elapsed().as_micros() as u64;
        let changed = changes.len();
        pending |= changed > 0;
        apply_changes(syncer.model(), changes, &mut nodes, &config.node);
        let check_due = Instant::now() >= next_check;
        let retry_due = syncer.retry_due(Instant::now());
        // Not before a walk told which backend ids flows still name.
        if !(walked && source.ready() && (pending || check_due || retry_due || !synced_once)) {
            metrics.loop_ran();
            source.wait(TICK);
            continue;
        }
        let scope = if check_due {
            // Writes made behind our back show up against a fresh read.
            if let Err(err) = syncer.reread() {
                error!("re-reading the maps: {err}");
            }
            next_check = Instant::now() + jittered(FULL_CHECK);
            Scope::Check
        } else if !synced_once {
            // The first sync compares everything: Services deleted while
            // the agent was away are still in the pinned maps.
            Scope::Full
        } else if retry_due {
            Scope::Retry
        } else {
            Scope::Changed
        };
        let report = syncer.sync(scope);
        pending = false;
        if !synced_once || changed >= RETURN_MEMORY_AFTER {
            // Parsing many objects leaves freed memory with the allocator
            // (mimalloc, see main.rs); give it back to the system now.
            // SAFETY: a call without pointers.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
        synced_once = true;
        health_checks.sync(&report.health_checks, &syncer.model().node().ips);
        for notice in &report.notices {
            info!("{notice}");
        }
        for problem in &report.new_problems {
            warn!(object = %problem.object, reason = problem.reason.label(), "skipped: {}", problem.reason);
            metrics.count_invalid(&problem.reason);
            source.report(problem);
        }
        metrics.observe_sync(report.duration, report.frontends, report.backends);
        metrics.count_sync_failures(report.failed_writes, retry_due);
        if report.failed_writes > 0 {
            warn!(
                failed_writes = report.failed_writes,
                "some writes failed: their frontends keep their previous state; retrying"
            );
        }
        if report.drift > 0 {
            warn!(
                writes = report.drift,
                "the maps had drifted from the agent's record (written behind its back?); fixed"
            );
            metrics.count_drift(report.drift);
        }
        info!(
            ?scope,
            changes = changed,
            writes = report.writes,
            frontends = report.frontends,
            backends = report.backends,
            micros = report.duration.as_micros() as u64,
            model_micros = report.model_duration.as_micros() as u64,
            diff_micros = report.diff_duration.as_micros() as u64,
            read_micros,
            "synced"
        );
        metrics.set_ready();
        metrics.loop_ran();
        source.wait(TICK);
    }
}

/// `period`, give or take [`FULL_CHECK_JITTER`].
fn jittered(period: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let jitter = FULL_CHECK_JITTER.as_millis() as u64;
    let offset = u64::from(nanos) % (2 * jitter + 1);
    (period + Duration::from_millis(offset)).saturating_sub(FULL_CHECK_JITTER)
}

/// Hands a source's changes to the model; Node objects complete this
/// node's identity.
fn apply_changes(
    model: &mut Model,
    changes: Vec<Change>,
    nodes: &mut BTreeMap<String, Node>,
    flags: &Node,
) {
    let mut node_changed = false;
    for change in changes {
        match change {
            Change::Service(name, object) => model.put_service(name, object),
            Change::Slice(name, object) => model.put_slice(name, object),
            Change::Endpoints(name, object) => model.put_endpoints(name, object),
            Change::Problems(origin, problems) => model.set_source_problems(&origin, problems),
            Change::Node(name, node) => {
                node_changed |= name == flags.name;
                match node {
                    Some(node) => nodes.insert(name, node),
                    None => nodes.remove(&name),
                };
            }
        }
    }
    if node_changed {
        model.set_node(node_for(flags, nodes.get(&flags.name)));
    }
}

/// One conntrack walk: expired entries removed, drained backends deleted,
/// fill and evictions exported.
fn walk_conntrack(
    conntrack: &ConntrackTable,
    syncer: &mut Syncer<crate::Maps>,
    evictions: &mut Evictions,
    metrics: &Metrics,
) -> bool {
    let started = Instant::now();
    let events = syncer.dataplane().conntrack_events();
    let walk = match conntrack.walk(clock::monotonic_coarse_ns()) {
        Ok(walk) => walk,
        Err(err) => {
            error!("{err}");
            return false;
        }
    };
    let evicted = match events {
        Ok(events) => evictions.update(
            &walk,
            events[ct_event::CREATED as usize],
            events[ct_event::REMOVED as usize],
        ),
        Err(err) => {
            warn!("reading the conntrack event counters: {err}");
            0
        }
    };
    if evicted > 0 {
        warn!(
            evicted,
            capacity = conntrack.capacity(),
            "the conntrack table is full and evicts flows: raise --conntrack-max"
        );
    }
    let deleted = syncer.conntrack_walked(started, &walk);
    metrics.observe_conntrack(&walk, conntrack.capacity(), evicted, deleted);
    true
}

/// `flags`, completed from the Node object of the same name.
fn node_for(flags: &Node, object: Option<&Node>) -> Node {
    let object = object.cloned().unwrap_or_default();
    Node {
        name: flags.name.clone(),
        zone: flags.zone.clone().or(object.zone),
        ips: if flags.ips.is_empty() {
            object.ips
        } else {
            flags.ips.clone()
        },
    }
}
