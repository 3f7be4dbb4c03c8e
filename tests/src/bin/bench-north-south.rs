//! `cargo xtask bench north-south`: a client outside the cluster through
//! node1 in every mode — no load balancer ("direct": routed straight to
//! the backends), kube-proxy's iptables rules, its nftables rules, xlb with
//! TC only (`xlb-tc`, what the default `--xdp auto` gives a veth) and xlb
//! with native XDP in front of TC (`xlb-xdp`) — over
//! three paths (see `xlb_tests::bench_ns`), at several numbers of
//! Services. Per point: new-connection rate and connect latency,
//! kept-alive and UDP request rates, the machine's busy CPU time per
//! request, and for xlb its programs' runs and run time per request
//! (a separate profiling pass with `kernel.bpf_stats_enabled`, so that
//! the rates are measured without its cost). Results in
//! `target/bench/north-south.json`.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use xlb_tests::{
    bench_e2e,
    bench_ns::{self, BpfStatsEnabled, Mode, Path, Row},
    privilege::has_root,
};

struct Args {
    modes: Vec<Mode>,
    scales: Vec<u32>,
    duration: Duration,
    repeats: usize,
    workers: usize,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut args = Args {
        modes: Mode::ALL.to_vec(),
        scales: vec![100, 10_000],
        duration: Duration::from_secs(2),
        repeats: 3,
        workers: 4,
        out: PathBuf::from("target/bench/north-south.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--modes" => {
                args.modes = value()?
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<_>>()?
            }
            "--scales" => {
                args.scales = value()?
                    .split(',')
                    .map(|s| s.parse().context("--scales"))
                    .collect::<Result<_>>()?
            }
            "--duration-ms" => args.duration = Duration::from_millis(value()?.parse()?),
            "--repeats" => args.repeats = value()?.parse()?,
            "--workers" => args.workers = value()?.parse()?,
            "--out" => args.out = value()?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// The three loads, each returning how many requests it served.
#[derive(Clone, Copy)]
enum Load {
    Connections,
    KeptAlive,
    Udp,
}

impl Load {
    const ALL: [Load; 3] = [Load::Connections, Load::KeptAlive, Load::Udp];

    /// The metric names of its BPF cost: run time and runs per request.
    fn bpf_metrics(self) -> (&'static str, &'static str) {
        match self {
            Load::Connections => ("conn_bpf_ns", "conn_bpf_runs"),
            Load::KeptAlive => ("keepalive_bpf_ns", "keepalive_bpf_runs"),
            Load::Udp => ("udp_bpf_ns", "udp_bpf_runs"),
        }
    }
}

fn main() -> Result<()> {
    let args = args()?;
    if !has_root("bench-north-south") {
        bail!("the north-south benchmark needs root");
    }
    let mut rows = Vec::new();
    for &scale in &args.scales {
        for &mode in &args.modes {
            let services = if mode == Mode::Direct { 0 } else { scale };
            let (mut cluster, _servers) = bench_ns::cluster()?;
            let list = bench_ns::services(&cluster, services);
            let setup = bench_ns::program(&mut cluster, mode, &list)
                .with_context(|| format!("{} at {scale} Services", mode.name()))?;
            eprintln!(
                "{} with {scale} Services: programmed in {setup:.1?}",
                mode.name()
            );
            for path in Path::ALL {
                let targets = bench_ns::targets(&cluster, mode, path);
                let point = (mode, scale, path);
                let outside = |load: Load, duration: Duration| -> Result<(f64, f64, f64)> {
                    cluster.from_outside(|| -> Result<(f64, f64, f64)> {
                        let rate = match load {
                            Load::Connections => {
                                return bench_e2e::connections(&targets, args.workers, duration);
                            }
                            Load::KeptAlive => {
                                bench_e2e::keepalive(&targets, args.workers, duration)?
                            }
                            Load::Udp => bench_e2e::udp(&targets, args.workers, duration)?,
                        };
                        Ok((rate, 0.0, 0.0))
                    })
                };
                let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 8];
                for _ in 0..args.repeats {
                    for (i, load) in Load::ALL.into_iter().enumerate() {
                        let mut rate = (0.0, 0.0, 0.0);
                        let (requests, busy) = bench_ns::measured(|| {
                            rate = outside(load, args.duration)?;
                            Ok(rate.0 * args.duration.as_secs_f64())
                        })?;
                        samples[i].push(rate.0);
                        samples[3 + i].push(busy.as_secs_f64() * 1e6 / requests);
                        if let Load::Connections = load {
                            samples[6].push(rate.1);
                            samples[7].push(rate.2);
                        }
                    }
                }
                rows.extend([
                    Row::of(point, "new_conn_rate", "conn/s", &samples[0]),
                    Row::of(point, "keepalive_rate", "req/s", &samples[1]),
                    Row::of(point, "udp_rate", "req/s", &samples[2]),
                    Row::of(point, "conn_cpu_us", "us", &samples[3]),
                    Row::of(point, "keepalive_cpu_us", "us", &samples[4]),
                    Row::of(point, "udp_cpu_us", "us", &samples[5]),
                    Row::of(point, "connect_p50", "us", &samples[6]),
                    Row::of(point, "connect_p99", "us", &samples[7]),
                ]);
                if mode.is_xlb() {
                    // Profiled apart: the statistics cost every run two
                    // clock reads.
                    let _stats = BpfStatsEnabled::new()?;
                    for load in Load::ALL {
                        let before = bench_ns::bpf_run_stats()?;
                        let (requests, _) = bench_ns::measured(|| {
                            Ok(outside(load, args.duration)?.0 * args.duration.as_secs_f64())
                        })?;
                        let after = bench_ns::bpf_run_stats()?;
                        let (runs, ns) = after.iter().fold((0, 0), |(runs, ns), (name, a)| {
                            let b = before.get(name).copied().unwrap_or_default();
                            (runs + a.0.saturating_sub(b.0), ns + a.1.saturating_sub(b.1))
                        });
                        let (ns_metric, runs_metric) = load.bpf_metrics();
                        rows.push(Row::of(point, ns_metric, "ns", &[ns as f64 / requests]));
                        rows.push(Row::of(
                            point,
                            runs_metric,
                            "runs",
                            &[runs as f64 / requests],
                        ));
                        let by_program: Vec<String> = after
                            .iter()
                            .map(|(name, a)| {
                                let b = before.get(name).copied().unwrap_or_default();
                                format!(
                                    "{name} {:.1} runs x {:.0} ns",
                                    a.0.saturating_sub(b.0) as f64 / requests,
                                    a.1.saturating_sub(b.1) as f64
                                        / a.0.saturating_sub(b.0).max(1) as f64
                                )
                            })
                            .collect();
                        eprintln!("  {ns_metric}: per request {}", by_program.join(", "));
                    }
                }
                let shown = rows.iter().rev().take_while(|r| {
                    r.path == path.name() && r.mode == mode.name() && r.services == scale
                });
                let mut shown: Vec<&Row> = shown.collect();
                shown.reverse();
                for row in shown {
                    eprintln!(
                        "  {:<16} {:<18} {:>10.1} {} (min {:.1}, max {:.1})",
                        path.name(),
                        row.metric,
                        row.median,
                        row.unit,
                        row.min,
                        row.max
                    );
                }
                // Written after every point: an interrupted run keeps what
                // it measured.
                write(&args.out, &rows)?;
            }
        }
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn write(out: &std::path::Path, rows: &[Row]) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(rows)?)?;
    Ok(())
}
