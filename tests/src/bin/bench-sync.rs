//! `cargo xtask bench sync`: what programming Services costs. For xlb (file
//! source): the time from writing the manifests of N Services (10 endpoints
//! each) to the datapath serving the last one, the agent's own time for
//! that sync, its resident memory after it, and its time to program one
//! endpoint change. For kube-proxy's rules: `iptables-restore` of the whole
//! table and kube-proxy's partial restore of the changed Service;
//! `nft -f` of the whole table and the incremental transaction. Each point
//! repeated; medians with min and max in `target/bench/sync.json`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use xlb_tests::{
    baseline::{self, BenchService},
    bench_e2e::{self, BACKENDS, Mode, Row},
    cluster::{Cluster, eventually},
    netns::{Netns, run_with_input},
    privilege::has_root,
};

struct Args {
    scales: Vec<u32>,
    repeats: usize,
    /// A point whose run takes longer than this is not repeated, and its
    /// mode skips the larger scales ("where the mode survives it").
    slow: Duration,
    modes: Vec<Mode>,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut args = Args {
        scales: vec![100, 1_000, 10_000, 30_000, 50_000],
        modes: vec![Mode::Xlb, Mode::Iptables, Mode::Nftables],
        repeats: 3,
        slow: Duration::from_secs(60),
        out: PathBuf::from("target/bench/sync.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--scales" => {
                args.scales = value()?
                    .split(',')
                    .map(|s| s.parse().context("--scales"))
                    .collect::<Result<_>>()?
            }
            "--repeats" => args.repeats = value()?.parse()?,
            "--modes" => {
                args.modes = value()?
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<_>>()?
            }
            "--slow-s" => args.slow = Duration::from_secs(value()?.parse()?),
            "--out" => args.out = value()?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The agent's account of one sync (`synced … micros=… model_micros=…`),
/// in ms.
#[derive(Clone, Copy)]
struct Sync {
    /// Model, diff and map writes.
    total: f64,
    model: f64,
    diff: f64,
    /// Reading the source (for the file source: the YAML).
    read: f64,
    /// Frontends in the maps after it.
    frontends: usize,
}

/// Every sync the agent logged, in order.
fn syncs(cluster: &Cluster) -> Vec<Sync> {
    let log = cluster.agent_log(0);
    let field = |line: &str, name: &str| -> Option<f64> {
        let value = line.split(&format!(" {name}=")).nth(1)?;
        Some(value.split_whitespace().next()?.parse::<f64>().ok()? / 1000.0)
    };
    let syncs: Vec<Sync> = log
        .lines()
        .filter(|l| l.contains("synced"))
        .filter_map(|l| {
            Some(Sync {
                total: field(l, "micros")?,
                model: field(l, "model_micros")?,
                diff: field(l, "diff_micros")?,
                read: field(l, "read_micros")?,
                frontends: l
                    .split(" frontends=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?,
            })
        })
        .collect();
    syncs
}

/// Waits until the agent logged more than `before` syncs, the last with
/// at least `frontends` frontends; the new ones.
fn new_syncs(cluster: &Cluster, before: usize, frontends: usize) -> Result<Vec<Sync>> {
    eventually("the sync is logged", Duration::from_secs(120), || {
        let all = syncs(cluster);
        ensure!(all.len() > before, "not yet");
        ensure!(all[all.len() - 1].frontends >= frontends, "not all yet");
        Ok(all[before..].to_vec())
    })
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

/// The real Service without its second backend.
fn changed(services: &[BenchService]) -> Vec<BenchService> {
    let mut services = services.to_vec();
    for svc in services.iter_mut().filter(|s| s.name.starts_with("real-")) {
        svc.endpoints.remove(1);
    }
    services
}

#[derive(Default)]
struct Samples {
    cold: Vec<f64>,
    cold_agent: Vec<f64>,
    cold_read: Vec<f64>,
    change: Vec<f64>,
    change_model: Vec<f64>,
    change_diff: Vec<f64>,
    change_full: Vec<f64>,
    /// From writing the change to a connection reaching the endpoint it
    /// added.
    visible: Vec<f64>,
    rss: Vec<f64>,
}

/// Endpoint changes per repeat (alternately one endpoint out and back in).
const CHANGES: usize = 20;

fn xlb(scale: u32, repeats: usize) -> Result<Samples> {
    let mut s = Samples::default();
    // The endpoint the changes take out and put back.
    let moving = BACKENDS[1].0;
    for _ in 0..repeats {
        let (mut cluster, _servers) = bench_e2e::cluster()?;
        let services = bench_e2e::services(&cluster, scale);
        cluster.start_agent(0, &[])?;
        let before = syncs(&cluster).len();
        // The fillers in one large file, the real Service in a small one.
        let fillers = bench_e2e::filler_manifests(&services);
        let started = Instant::now();
        cluster.write_manifest("fillers.yaml", &fillers)?;
        cluster.write_manifest("real.yaml", &bench_e2e::real_manifest(&services))?;
        bench_e2e::wait_served(&cluster, Duration::from_secs(600))?;
        s.cold.push(ms(started.elapsed()));
        // A frontend per filler, two for the real Service.
        let cold = new_syncs(&cluster, before, scale as usize + 2)?;
        s.cold_agent
            .push(cold.iter().map(|sync| sync.total + sync.read).sum());
        s.cold_read.push(cold.iter().map(|sync| sync.read).sum());
        s.rss
            .push(rss_mib(cluster.agent_pid(0).context("agent pid")?)?);
        // One endpoint out, then back in, in the small file: the agent's
        // time (reading the changed file included) for each, and for each
        // return the time until a new connection reaches it.
        for i in 0..CHANGES {
            let back_in = i % 2 == 1;
            let version = if back_in {
                services.clone()
            } else {
                changed(&services)
            };
            let before = syncs(&cluster).len();
            let started = Instant::now();
            cluster.write_manifest("real.yaml", &bench_e2e::real_manifest(&version))?;
            if back_in {
                bench_e2e::wait_answered_by(&cluster, moving, Duration::from_secs(60))?;
                s.visible.push(ms(started.elapsed()));
            }
            let sync = *new_syncs(&cluster, before, 0)?.last().context("a sync")?;
            s.change.push(sync.total + sync.read);
            s.change_model.push(sync.model);
            s.change_diff.push(sync.diff);
        }
    }
    Ok(s)
}

/// Runs `program` with `input` in `ns`; its wall time.
fn timed(ns: &Netns, program: &[&str], input: &str) -> Result<f64> {
    let started = Instant::now();
    run_with_input(ns.command(program[0]).args(&program[1..]), input)?;
    Ok(ms(started.elapsed()))
}

fn rules(mode: Mode, scale: u32, repeats: usize, slow: Duration) -> Result<Samples> {
    let mut s = Samples::default();
    let (cluster, _servers) = bench_e2e::cluster()?;
    let services = bench_e2e::services(&cluster, scale);
    let after = changed(&services);
    let real = after.iter().find(|s| s.name == "real-tcp").expect("real");
    for i in 0..repeats {
        let ns = Netns::new(&format!("xlb-sync-{}-{i}", std::process::id()))?;
        let (full, full_changed, change, restore, restore_partial) = match mode {
            Mode::Iptables => (
                baseline::iptables_restore(&services),
                baseline::iptables_restore(&after),
                baseline::iptables_partial(real),
                &["iptables-restore"][..],
                &["iptables-restore", "--noflush"][..],
            ),
            _ => (
                baseline::nft_ruleset(&services),
                baseline::nft_ruleset(&after),
                baseline::nft_incremental(real),
                &["nft", "-f", "-"][..],
                &["nft", "-f", "-"][..],
            ),
        };
        let cold = timed(&ns, restore, &full)?;
        s.cold.push(cold);
        // A full reload as slow as the first load is not run again.
        if cold <= ms(slow) {
            s.change_full.push(timed(&ns, restore, &full_changed)?);
        }
        s.change.push(timed(&ns, restore_partial, &change)?);
        if cold > ms(slow) {
            break;
        }
    }
    drop(cluster);
    Ok(s)
}

fn main() -> Result<()> {
    let args = args()?;
    if !has_root("bench-sync") {
        bail!("the sync benchmark needs root");
    }
    let mut rows = Vec::new();
    let mut too_slow = Vec::new();
    for &scale in &args.scales {
        for &mode in &args.modes {
            if too_slow.contains(&mode) {
                eprintln!(
                    "{}: {scale} Services skipped (too slow at the last scale)",
                    mode.name()
                );
                continue;
            }
            let s = match mode {
                Mode::Xlb => xlb(scale, args.repeats)?,
                _ => rules(mode, scale, args.repeats, args.slow)?,
            };
            if s.cold.iter().any(|t| *t > ms(args.slow)) {
                too_slow.push(mode);
            }
            let mut add = |metric, unit, samples: &[f64]| {
                if !samples.is_empty() {
                    let row = Row::of(mode, scale, metric, unit, samples);
                    eprintln!(
                        "{:<9} {scale:>6} {:<20} {:>10.2} {} (min {:.2}, max {:.2})",
                        row.mode, row.metric, row.median, row.unit, row.min, row.max
                    );
                    rows.push(row);
                }
            };
            add("cold_sync", "ms", &s.cold);
            add("cold_sync_agent", "ms", &s.cold_agent);
            add("cold_sync_read", "ms", &s.cold_read);
            add("endpoint_change", "ms", &s.change);
            // Only xlb's changes are many enough for a percentile.
            if mode == Mode::Xlb && !s.change.is_empty() {
                let mut sorted = s.change.clone();
                sorted.sort_by(f64::total_cmp);
                let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
                add("endpoint_change_p99", "ms", &[p99]);
            }
            add("endpoint_change_model", "ms", &s.change_model);
            add("endpoint_change_diff", "ms", &s.change_diff);
            add("endpoint_change_full", "ms", &s.change_full);
            add("endpoint_change_visible", "ms", &s.visible);
            add("agent_rss", "MiB", &s.rss);
        }
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&rows)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
