//! `cargo xtask bench churn`: churn never evicts a live flow. On the
//! benchmark's cluster (xlb with default flags, 100 Services), a client
//! opens a TCP connection and a UDP flow to the real Service and leaves
//! them idle (the UDP flow a stream: the client spoke again after a reply)
//! while, for 60 s, the benchmark's new-connection load runs
//! beside a burst of one-shot UDP flows (a fresh source port per request,
//! like a DNS resolver's queries). Then both idle flows must still be on
//! their backends. Reported: the rates reached, the load's own failed
//! connections, conntrack's peak fill and the evictions the agent counted,
//! in `target/bench/churn.json`. `--mode direct` runs the same load
//! straight to one backend, without a load balancer, for comparison.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use xlb_tests::{
    bench_e2e::{self, Mode},
    privilege::has_root,
};

const IO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    load_seconds: u64,
    idle_seconds: u64,
    new_connections_per_s: f64,
    /// Connections of the load that failed, by step and error.
    failed_connections: std::collections::BTreeMap<String, u64>,
    one_shot_udp_per_s: f64,
    conntrack_peak_entries: u64,
    conntrack_capacity: u64,
    conntrack_evictions: u64,
    idle_tcp_survived: bool,
    idle_udp_survived: bool,
}

/// One line to `stream` and the backend's answer.
fn ask_tcp(stream: &mut BufReader<TcpStream>) -> Result<String> {
    stream.get_mut().write_all(b"hello\n")?;
    let mut line = String::new();
    stream.read_line(&mut line)?;
    ensure!(!line.is_empty(), "closed");
    Ok(line)
}

fn ask_udp(socket: &UdpSocket) -> Result<String> {
    socket.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).context("UDP answer")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A metric's value in Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut load = Duration::from_secs(60);
    let mut mode = Mode::Xlb;
    let mut out = std::path::PathBuf::from("target/bench/churn.json");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => load = Duration::from_secs(args.next().context("--seconds N")?.parse()?),
            "--mode" => mode = Mode::parse(&args.next().context("--mode direct|xlb")?)?,
            "--out" => out = args.next().context("--out FILE")?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    if !has_root("bench-churn") {
        bail!("the churn benchmark needs root");
    }
    let (mut cluster, _servers) = bench_e2e::cluster()?;
    let services = bench_e2e::services(&cluster, 100);
    bench_e2e::program(&mut cluster, mode, &services)?;
    let target = bench_e2e::targets(&cluster, mode)[0];
    let client = cluster.pod("client");

    // The idle flows, answered once.
    let (mut tcp, udp) = client.run(|| -> Result<_> {
        let stream = TcpStream::connect_timeout(&target.into(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let udp = UdpSocket::bind("0.0.0.0:0")?;
        udp.set_read_timeout(Some(IO_TIMEOUT))?;
        udp.connect(SocketAddrV4::new(*target.ip(), target.port()))?;
        Ok((BufReader::new(stream), udp))
    })?;
    let tcp_before = ask_tcp(&mut tcp)?;
    // Twice: the client speaks again after a reply, a stream (120 s).
    ask_udp(&udp)?;
    let udp_before = ask_udp(&udp)?;
    let idle_since = Instant::now();
    println!(
        "idle flows answered by: {} / {}",
        tcp_before.trim(),
        udp_before.trim()
    );

    // The load, with the agent's metrics sampled every second.
    let metrics_addr = SocketAddrV4::new([127, 0, 0, 1].into(), 10249);
    let stop = AtomicBool::new(false);
    let one_shots = AtomicU64::new(0);
    let peak = AtomicU64::new(0);
    let started = Instant::now();
    let (connections, last_metrics) = std::thread::scope(|scope| -> Result<_> {
        let burst = scope.spawn(|| {
            client.run(|| {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    // A fresh socket: a fresh source port, a new flow.
                    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
                        continue;
                    };
                    let _ = socket.set_read_timeout(Some(IO_TIMEOUT));
                    if socket.send_to(b"query", target).is_ok() && socket.recv(&mut buf).is_ok() {
                        one_shots.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        });
        let sampler = scope.spawn(|| -> String {
            let mut last = String::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, text)) = cluster.http_get(0, metrics_addr, "/metrics") {
                    peak.fetch_max(metric(&text, "xlb_conntrack_entries"), Ordering::Relaxed);
                    last = text;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            last
        });
        let connections =
            client.run(|| bench_e2e::connections_counting_failures(&[target], 4, load));
        stop.store(true, Ordering::Relaxed);
        burst.join().expect("burst");
        let last = sampler.join().expect("sampler");
        Ok((connections, last))
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let (rate, failures) = connections?;
    // No agent (and no metrics) in direct mode.
    let text = cluster
        .http_get(0, metrics_addr, "/metrics")
        .map(|(_, text)| text)
        .unwrap_or_default();
    let idle_seconds = idle_since.elapsed().as_secs();
    let tcp_after = ask_tcp(&mut tcp);
    let udp_after = ask_udp(&udp);
    let report = Report {
        mode: mode.name(),
        load_seconds: load.as_secs(),
        idle_seconds,
        new_connections_per_s: rate,
        failed_connections: failures,
        one_shot_udp_per_s: one_shots.load(Ordering::Relaxed) as f64 / elapsed,
        conntrack_peak_entries: peak.load(Ordering::Relaxed),
        conntrack_capacity: metric(&text, "xlb_conntrack_capacity"),
        conntrack_evictions: metric(&text, "xlb_conntrack_evictions_total")
            .max(metric(&last_metrics, "xlb_conntrack_evictions_total")),
        idle_tcp_survived: tcp_after.as_ref().is_ok_and(|l| *l == tcp_before),
        idle_udp_survived: udp_after.as_ref().is_ok_and(|l| *l == udp_before),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out.display());
    Ok(())
}
