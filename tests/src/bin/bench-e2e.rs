//! `cargo xtask bench e2e`: real connections through each mode — no load
//! balancer ("direct", the ceiling), kube-proxy's iptables rules, its
//! nftables rules, xlb (balanced at the socket), xlb per packet only
//! (`xlb-tc`) — on the netns cluster of the end-to-end tests, at
//! several numbers of Services (10 endpoints each) with the measured
//! Service last. Per point: new-connection rate and connect latency
//! (short-lived TCP connections), keep-alive request rate, UDP request
//! rate; each repeated, reported as median, min and max in
//! `target/bench/e2e.json`.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use xlb_tests::{
    bench_e2e::{self, Mode, Row},
    privilege::has_root,
};

struct Args {
    modes: Vec<Mode>,
    scales: Vec<u32>,
    duration: Duration,
    repeats: usize,
    workers: usize,
    /// A mode skips a larger scale when programming it, extrapolated
    /// linearly from the current one, would take longer than this ("where
    /// the mode survives it").
    setup_limit: Duration,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut args = Args {
        modes: vec![
            Mode::Direct,
            Mode::Iptables,
            Mode::Nftables,
            Mode::Xlb,
            Mode::XlbTc,
        ],
        scales: vec![100, 1_000, 10_000, 30_000],
        duration: Duration::from_secs(2),
        repeats: 3,
        workers: 4,
        setup_limit: Duration::from_secs(180),
        out: PathBuf::from("target/bench/e2e.json"),
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
            "--setup-limit-s" => args.setup_limit = Duration::from_secs(value()?.parse()?),
            "--out" => args.out = value()?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = args()?;
    if !has_root("bench-e2e") {
        bail!("the end-to-end benchmark needs root");
    }
    let mut rows = Vec::new();
    // Scale by scale, every mode in turn: on a shared VM whose neighbours
    // take CPU time (steal) by the minute, modes compared at one scale
    // are measured minutes apart, not tens of minutes.
    let mut skipped: Vec<Mode> = Vec::new();
    for (i, &scale) in args.scales.iter().enumerate() {
        for &mode in &args.modes {
            if skipped.contains(&mode) {
                continue;
            }
            let services = if mode == Mode::Direct { 0 } else { scale };
            let (mut cluster, _servers) = bench_e2e::cluster()?;
            let list = bench_e2e::services(&cluster, services);
            let setup = bench_e2e::program(&mut cluster, mode, &list)
                .with_context(|| format!("{} at {scale} Services", mode.name()))?;
            eprintln!(
                "{} with {scale} Services: programmed in {:.1?}",
                mode.name(),
                setup
            );
            let targets = bench_e2e::targets(&cluster, mode);
            let client = cluster.pod("client");
            // The client's threads are this process's: in node1's cgroup
            // for xlb, as a pod's processes are, so that the socket path
            // balances them; elsewhere for every other mode.
            let _in_node = match mode {
                Mode::Xlb => Some(cluster.join_cgroup(0)?),
                _ => None,
            };
            let (mut rate, mut p50, mut p99, mut kept, mut udp) =
                (vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..args.repeats {
                let (r, l50, l99) =
                    client.run(|| bench_e2e::connections(&targets, args.workers, args.duration))?;
                rate.push(r);
                p50.push(l50);
                p99.push(l99);
                kept.push(
                    client.run(|| bench_e2e::keepalive(&targets, args.workers, args.duration))?,
                );
                udp.push(client.run(|| bench_e2e::udp(&targets, args.workers, args.duration))?);
            }
            rows.extend([
                Row::of(mode, scale, "new_conn_rate", "conn/s", &rate),
                Row::of(mode, scale, "connect_p50", "us", &p50),
                Row::of(mode, scale, "connect_p99", "us", &p99),
                Row::of(mode, scale, "keepalive_rate", "req/s", &kept),
                Row::of(mode, scale, "udp_rate", "req/s", &udp),
            ]);
            for row in &rows[rows.len() - 5..] {
                eprintln!(
                    "  {:<15} {:>10.0} {} (min {:.0}, max {:.0})",
                    row.metric, row.median, row.unit, row.min, row.max
                );
            }
            // Written after every point: a long run interrupted keeps
            // what it measured.
            write(&args.out, &rows)?;
            if let Some(&next) = args.scales.get(i + 1) {
                let expected = setup.mul_f64(f64::from(next) / f64::from(scale));
                if expected > args.setup_limit {
                    eprintln!(
                        "{}: programming {next} Services would take about {expected:.0?}, more than {:?}: larger scales skipped",
                        mode.name(),
                        args.setup_limit
                    );
                    skipped.push(mode);
                }
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
