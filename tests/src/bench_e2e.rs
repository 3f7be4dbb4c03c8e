//! The end-to-end benchmark's pieces shared by its drivers: the cluster of
//! the benchmark (two nodes, three backends answering on [`PORT`] with
//! servers that never poll, a client pod), the Services at a scale, how
//! each mode programs them, and the load generators.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::{
    baseline::{self, BenchService},
    cluster::Cluster,
    manifests::{Endpoint, Port, documents, endpoint_slice, service},
    netns::Netns,
};

/// Where the benchmark's backends listen.
pub const PORT: u16 = 8081;
/// The real Service, placed after every filler.
pub const REAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const REAL_PORT: u16 = 80;
/// The backends: name and node index.
pub const BACKENDS: [(&str, usize); 3] = [("web-0", 0), ("web-1", 0), ("web-2", 1)];
/// Endpoints of each filler Service (never reached).
const FILLER_ENDPOINTS: u32 = 10;
/// Threads accepting (and serving) connections per backend: at least the
/// number of kept-alive connections a backend may get.
const ACCEPTORS: usize = 12;

/// How Services are programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No load balancer: the client addresses the backends themselves.
    Direct,
    /// kube-proxy's iptables mode rules.
    Iptables,
    /// kube-proxy's nftables mode rules.
    Nftables,
    /// xlb's agent with the file source and default flags: the client's
    /// process is in the node's cgroup, so it is balanced at the socket.
    Xlb,
    /// xlb per packet only (`--socket-lb off`): TC on the pods' veths.
    XlbTc,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "direct" => Mode::Direct,
            "iptables" => Mode::Iptables,
            "nftables" => Mode::Nftables,
            "xlb" => Mode::Xlb,
            "xlb-tc" => Mode::XlbTc,
            other => bail!("unknown mode {other}"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Xlb => "xlb",
            Mode::XlbTc => "xlb-tc",
        }
    }
}

/// One measured point, as the JSON rows say it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub mode: &'static str,
    pub services: u32,
    pub metric: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub unit: &'static str,
}

impl Row {
    /// The row of `samples` (at least one).
    pub fn of(
        mode: Mode,
        services: u32,
        metric: &'static str,
        unit: &'static str,
        samples: &[f64],
    ) -> Self {
        let (median, min, max) = summary(samples);
        Row {
            mode: mode.name(),
            services,
            metric,
            median,
            min,
            max,
            unit,
        }
    }
}

/// Median, min and max of `samples` (at least one): what every benchmark
/// row reports of its repeats.
pub fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
    )
}

/// Answers on [`PORT`] until dropped: TCP (a line per line, blocking
/// accepts on several threads, so no connection waits for a poll) and UDP.
pub struct BenchServer {
    stop: Arc<AtomicBool>,
    tcp: Arc<TcpListener>,
}

impl BenchServer {
    pub fn start(ns: &Netns, pod: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp, udp) = ns.enter(|| -> Result<_> {
            Ok((
                TcpListener::bind(("0.0.0.0", PORT))?,
                UdpSocket::bind(("0.0.0.0", PORT))?,
            ))
        })??;
        let tcp = Arc::new(tcp);
        for _ in 0..ACCEPTORS {
            let (tcp, stop, pod) = (tcp.clone(), stop.clone(), pod.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((stream, peer)) = tcp.accept() {
                        answer(stream, &pod, peer.ip());
                    }
                }
            });
        }
        let (stop_udp, pod_udp) = (stop.clone(), pod.to_owned());
        std::thread::spawn(move || {
            let _ = udp.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; 1500];
            while !stop_udp.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let reply = format!("From={pod_udp} ClientIP={}\n", peer.ip());
                    let _ = udp.send_to(reply.as_bytes(), peer);
                }
            }
        });
        Ok(Self { stop, tcp })
    }
}

fn answer(stream: TcpStream, pod: &str, peer: std::net::IpAddr) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reply = format!("From={pod} ClientIP={peer}\n");
    for line in BufReader::new(stream).lines() {
        if line.is_err() || writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the threads blocked in accept() (they get EINVAL).
        // SAFETY: shutdown on a socket we own; it stays open until the
        // last thread drops its Arc.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&*self.tcp), libc::SHUT_RDWR) };
    }
}

/// The benchmark's cluster: two nodes, the backends with their servers, a
/// client pod (ephemeral ports widened, TIME_WAIT reuse on).
pub fn cluster() -> Result<(Cluster, Vec<BenchServer>)> {
    let mut cluster = Cluster::new(&["zone-a", "zone-b"])?;
    let mut servers = Vec::new();
    for (name, node) in BACKENDS {
        let pod = cluster.add_pod(node, name, &[])?;
        servers.push(BenchServer::start(&pod.ns, name)?);
    }
    let client = cluster.add_pod(0, "client", &[])?;
    client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    Ok((cluster, servers))
}

/// `count` filler Services (each with [`FILLER_ENDPOINTS`] endpoints that
/// exist nowhere) and the real one last, over the backends.
pub fn services(cluster: &Cluster, count: u32) -> Vec<BenchService> {
    let mut services: Vec<BenchService> = (0..count)
        .map(|i| BenchService {
            namespace: "default".into(),
            name: format!("filler-{i}"),
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i),
            port: 80,
            protocol: "tcp",
            endpoints: (0..FILLER_ENDPOINTS)
                .map(|e| {
                    let ip = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i * 16 + e;
                    (ip.into(), 8080)
                })
                .collect(),
            external: None,
        })
        .collect();
    for protocol in ["tcp", "udp"] {
        services.push(BenchService {
            namespace: "default".into(),
            name: format!("real-{protocol}"),
            ip: REAL_IP,
            port: REAL_PORT,
            protocol,
            endpoints: BACKENDS
                .iter()
                .map(|(name, _)| (cluster.pod(name).ip, PORT))
                .collect(),
            external: None,
        });
    }
    services
}

/// The manifests of `services` for the file source (namespace `default`):
/// each Service with its EndpointSlice (the real Service's two protocols as
/// one Service).
pub fn manifests(services: &[BenchService]) -> String {
    filler_manifests(services) + "---\n" + &real_manifest(services)
}

/// [`manifests`] of the filler Services alone.
pub fn filler_manifests(services: &[BenchService]) -> String {
    let mut docs = Vec::with_capacity(services.len() * 2);
    for svc in services.iter().filter(|s| !s.name.starts_with("real-")) {
        let endpoints: Vec<Endpoint> = svc
            .endpoints
            .iter()
            .map(|(ip, _)| Endpoint::ready(*ip, "node2"))
            .collect();
        docs.push(service(
            &svc.name,
            svc.ip,
            &[Port::tcp("", svc.port)],
            &["8080"],
        ));
        docs.push(endpoint_slice(
            &svc.name,
            &format!("{}-1", svc.name),
            &[Port::tcp("", 8080)],
            &endpoints,
        ));
    }
    documents(&docs)
}

/// [`manifests`] of the real Service alone: a small file of its own.
pub fn real_manifest(services: &[BenchService]) -> String {
    let real = services
        .iter()
        .find(|s| s.name == "real-tcp")
        .expect("the real Service");
    let ports = [Port::tcp("tcp", REAL_PORT), Port::udp("udp", REAL_PORT)];
    let slice_ports = [Port::tcp("tcp", PORT), Port::udp("udp", PORT)];
    let endpoints: Vec<Endpoint> = real
        .endpoints
        .iter()
        .zip(BACKENDS)
        .map(|((ip, _), (_, node))| Endpoint::ready(*ip, ["node1", "node2"][node]))
        .collect();
    documents(&[
        service("real", REAL_IP, &ports, &["8081", "8081"]),
        endpoint_slice("real", "real-1", &slice_ports, &endpoints),
    ])
}

/// Programs `services` on node1 the way `mode` does; returns how long it
/// took (for xlb: until the real Service answers).
pub fn program(cluster: &mut Cluster, mode: Mode, services: &[BenchService]) -> Result<Duration> {
    let started = Instant::now();
    let node = &cluster.nodes[0].ns;
    match mode {
        Mode::Direct => {}
        Mode::Iptables => baseline::load(node, baseline::Rules::Iptables, services)?,
        Mode::Nftables => baseline::load(node, baseline::Rules::Nftables, services)?,
        Mode::Xlb | Mode::XlbTc => {
            cluster.write_manifest("bench.yaml", &manifests(services))?;
            let flags: &[&str] = if mode == Mode::XlbTc {
                &["--socket-lb", "off"]
            } else {
                &[]
            };
            cluster.start_agent(0, flags)?;
        }
    }
    if mode != Mode::Direct {
        wait_served(cluster, Duration::from_secs(600))?;
    }
    Ok(started.elapsed())
}

/// Waits until the real Service answers the client pod. Each probe is a
/// fresh connection with a short timeout, so a SYN sent before the Service
/// existed (and lost) costs no retransmission delay (1 s).
pub fn wait_served(cluster: &Cluster, timeout: Duration) -> Result<()> {
    wait_for_answer(cluster, timeout, |_| true).context("the real Service never answered")
}

/// Waits until a new connection to the real Service is answered by `pod`.
pub fn wait_answered_by(cluster: &Cluster, pod: &str, timeout: Duration) -> Result<()> {
    let want = format!("From={pod} ");
    wait_for_answer(cluster, timeout, |line| line.starts_with(&want))
        .with_context(|| format!("{pod} never answered"))
}

/// Probes the real Service from the client pod with fresh connections
/// until an answer line is `wanted`.
fn wait_for_answer(
    cluster: &Cluster,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool + Sync,
) -> Result<()> {
    let real = SocketAddrV4::new(REAL_IP, REAL_PORT);
    let deadline = Instant::now() + timeout;
    cluster.pod("client").run(|| {
        loop {
            let answer = TcpStream::connect_timeout(&real.into(), Duration::from_millis(20))
                .map_err(anyhow::Error::from)
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.write_all(b"hello\n")?;
                    let mut line = String::new();
                    BufReader::new(stream).read_line(&mut line)?;
                    ensure!(!line.is_empty(), "closed");
                    Ok(line)
                });
            match answer {
                Ok(line) if wanted(&line) => return Ok(()),
                Ok(line) if Instant::now() >= deadline => bail!("last answer: {line}"),
                Err(err) if Instant::now() >= deadline => return Err(err),
                // A wrong backend answered: ask again at once.
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

/// The addresses the client uses in `mode`: the Service, or (direct) the
/// backends in turn.
pub fn targets(cluster: &Cluster, mode: Mode) -> Vec<SocketAddrV4> {
    match mode {
        Mode::Direct => BACKENDS
            .iter()
            .map(|(name, _)| SocketAddrV4::new(cluster.pod(name).ip, PORT))
            .collect(),
        _ => vec![SocketAddrV4::new(REAL_IP, REAL_PORT)],
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn roundtrip(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"hello\n")?;
    let mut buf = [0u8; 128];
    let mut got = 0;
    loop {
        let n = std::io::Read::read(stream, &mut buf[got..])?;
        if n == 0 {
            bail!("closed");
        }
        got += n;
        if buf[..got].contains(&b'\n') {
            return Ok(());
        }
    }
}

/// Runs `work(w)` on `workers` threads (of the calling thread's network
/// namespace) and collects their results.
fn per_worker<T: Send>(workers: usize, work: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let work = &work;
                scope.spawn(move || work(w))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    })
}

/// Short-lived connections for `duration` from `workers` threads (of the
/// calling thread's namespace): connection rate (per second) and connect
/// latency percentiles (p50, p99, µs).
pub fn connections(
    targets: &[SocketAddrV4],
    workers: usize,
    duration: Duration,
) -> Result<(f64, f64, f64)> {
    let deadline = Instant::now() + duration;
    let per_worker = per_worker(workers, |w| -> Result<Vec<u32>> {
        let mut latencies = Vec::new();
        let mut i = w;
        while Instant::now() < deadline {
            let to = targets[i % targets.len()];
            i += 1;
            let start = Instant::now();
            let mut stream = TcpStream::connect_timeout(&to.into(), IO_TIMEOUT)
                .with_context(|| format!("connect {to}"))?;
            latencies.push(start.elapsed().as_micros() as u32);
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            roundtrip(&mut stream)?;
        }
        Ok(latencies)
    })?;
    let mut all: Vec<u32> = per_worker.into_iter().flatten().collect();
    if all.is_empty() {
        bail!("no connection completed");
    }
    all.sort_unstable();
    let pct = |p: f64| f64::from(all[((all.len() - 1) as f64 * p) as usize]);
    Ok((
        all.len() as f64 / duration.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    ))
}

/// Like [`connections`], but a connection that fails (refused, reset,
/// timed out) is counted and the load goes on: the rate of the ones that
/// completed, and the failures by what failed (the step and the error).
pub fn connections_counting_failures(
    targets: &[SocketAddrV4],
    workers: usize,
    duration: Duration,
) -> Result<(f64, std::collections::BTreeMap<String, u64>)> {
    let deadline = Instant::now() + duration;
    let counts = per_worker(workers, |w| -> Result<(u64, Vec<String>)> {
        let (mut done, mut failed) = (0, Vec::new());
        let mut i = w;
        while Instant::now() < deadline {
            let to = targets[i % targets.len()];
            i += 1;
            let attempt = TcpStream::connect_timeout(&to.into(), IO_TIMEOUT)
                .context("connect")
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    roundtrip(&mut stream).context("request")
                });
            match attempt {
                Ok(()) => done += 1,
                Err(err) => failed.push(format!("{err:#}")),
            }
        }
        Ok((done, failed))
    })?;
    let done: u64 = counts.iter().map(|c| c.0).sum();
    let mut failed = std::collections::BTreeMap::new();
    for err in counts.into_iter().flat_map(|c| c.1) {
        *failed.entry(err).or_insert(0) += 1;
    }
    Ok((done as f64 / duration.as_secs_f64(), failed))
}

/// Requests per second over `workers` kept-alive connections.
pub fn keepalive(targets: &[SocketAddrV4], workers: usize, duration: Duration) -> Result<f64> {
    let deadline = Instant::now() + duration;
    let counts = per_worker(workers, |w| -> Result<u64> {
        let to = targets[w % targets.len()];
        let mut stream = TcpStream::connect_timeout(&to.into(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut n = 0;
        while Instant::now() < deadline {
            roundtrip(&mut stream)?;
            n += 1;
        }
        Ok(n)
    })?;
    Ok(counts.iter().sum::<u64>() as f64 / duration.as_secs_f64())
}

/// UDP requests per second from `workers` sockets (one flow each).
pub fn udp(targets: &[SocketAddrV4], workers: usize, duration: Duration) -> Result<f64> {
    let deadline = Instant::now() + duration;
    let counts = per_worker(workers, |w| -> Result<u64> {
        let to = targets[w % targets.len()];
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.connect(to)?;
        let mut buf = [0u8; 256];
        let mut n = 0;
        while Instant::now() < deadline {
            socket.send(b"hello")?;
            socket.recv(&mut buf).context("UDP reply")?;
            n += 1;
        }
        Ok(n)
    })?;
    Ok(counts.iter().sum::<u64>() as f64 / duration.as_secs_f64())
}
