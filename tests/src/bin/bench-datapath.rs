//! `cargo xtask bench datapath`: every program path through
//! BPF_PROG_TEST_RUN, with 1, 10,000 and 100,000 frontends in the maps.
//!
//! The kernel runs the same packet `repeat` times and the datapath rewrites
//! it in place, so each path is set up to stay on itself:
//! - the measured frontend's backend *is* the frontend's own address and
//!   port, so DNAT and rev-NAT write the values they read: every
//!   instruction and helper call runs, the packet comes out the same;
//! - "new flow" sends SYN+RST: the RST leaves the entry closing and the SYN
//!   makes the next run start a new flow over it (select, two conntrack
//!   writes, DNAT) — the whole new-flow path, every run.

use std::{fs, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use lb_common::{PROTO_TCP, Reason};
use lb_userspace::datapath::program::{FROM_POD, TO_POD};
use serde::Serialize;
use xlb_tests::{
    packet::{Packet, flags},
    privilege::has_root,
    test_lb::{TC_ACT_OK, TestLb},
};

const SCALES: [u32; 3] = [1, 10_000, 100_000];
const BACKENDS_PER_FRONTEND: u32 = 3;
const ROUNDS: usize = 3;
const VIP: &str = "10.96.0.1:80";
const CLIENT: &str = "10.244.1.5:40000";

#[derive(Serialize)]
struct Row {
    program: &'static str,
    path: &'static str,
    frontends: u32,
    ns_per_pkt: f64,
}

struct Path {
    program: &'static str,
    name: &'static str,
    packet: Packet,
    /// The counter every run of this path must land in.
    reason: Reason,
}

fn paths() -> Vec<Path> {
    vec![
        Path {
            program: FROM_POD,
            name: "new_flow",
            packet: Packet::tcp(CLIENT, VIP, flags::SYN | flags::RST),
            reason: Reason::ForwardNew,
        },
        Path {
            program: FROM_POD,
            name: "established",
            packet: Packet::tcp(CLIENT, VIP, flags::ACK),
            reason: Reason::ForwardEstablished,
        },
        Path {
            program: FROM_POD,
            name: "miss",
            packet: Packet::tcp(CLIENT, "10.244.9.9:80", flags::ACK),
            reason: Reason::PassNotLoadBalanced,
        },
        Path {
            program: TO_POD,
            name: "rev_nat",
            packet: Packet::tcp(VIP, CLIENT, flags::ACK),
            reason: Reason::RevNat,
        },
        Path {
            program: TO_POD,
            name: "miss",
            packet: Packet::tcp("10.244.9.9:80", CLIENT, flags::ACK),
            reason: Reason::PassNotLoadBalanced,
        },
    ]
}

/// Fills `count` frontends; the first is [`VIP`], balanced to itself.
fn fill(lb: &mut TestLb, count: u32) {
    lb.add_frontend(VIP, PROTO_TCP, &[VIP]);
    for i in 1..count {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i);
        let backends: Vec<String> = (0..BACKENDS_PER_FRONTEND)
            .map(|b| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 4 + b);
                format!("{ip}:8080")
            })
            .collect();
        let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
        lb.add_frontend(&format!("{vip}:80"), PROTO_TCP, &backends);
    }
}

fn measure(lb: &mut TestLb, path: &Path, repeat: u32) -> Result<Duration> {
    let frame = path.packet.bytes();
    // Create the flow the established and rev-NAT paths use, then put the
    // path in its steady state (new flow: the entry left closing).
    lb.run(FROM_POD, &Packet::tcp(CLIENT, VIP, flags::SYN).bytes());
    lb.run(path.program, &frame);
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let before = lb.maps.counter_totals()?[path.reason as usize].packets;
        let (out, per_run) = lb.run_repeated(path.program, &frame, repeat);
        let after = lb.maps.counter_totals()?[path.reason as usize].packets;
        if out.verdict != TC_ACT_OK || after - before != u64::from(repeat) {
            bail!(
                "{} {}: left its path (verdict {}, {} of {repeat} runs counted as {})",
                path.program,
                path.name,
                out.verdict,
                after - before,
                path.reason.name()
            );
        }
        times.push(per_run);
    }
    times.sort();
    Ok(times[ROUNDS / 2])
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut repeat = 1_000_000;
    let mut out = PathBuf::from("target/bench/datapath.json");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--repeat" => repeat = args.next().context("--repeat N")?.parse()?,
            "--out" => out = args.next().context("--out FILE")?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    if !has_root("bench-datapath") {
        bail!("the datapath benchmark needs root");
    }
    let mut rows = Vec::new();
    for frontends in SCALES {
        let mut lb = TestLb::load();
        fill(&mut lb, frontends);
        for path in paths() {
            let time = measure(&mut lb, &path, repeat)?;
            rows.push(Row {
                program: path.program,
                path: path.name,
                frontends,
                ns_per_pkt: time.as_nanos() as f64,
            });
        }
    }
    print_table(&rows, repeat);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&out, serde_json::to_string_pretty(&rows)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn print_table(rows: &[Row], repeat: u32) {
    println!("BPF_PROG_TEST_RUN, {repeat} runs per point, median of {ROUNDS}; ns per packet");
    print!("{:<10} {:<12}", "program", "path");
    for scale in SCALES {
        print!(" {:>10}", format!("{scale} fe"));
    }
    println!(" {:>9}", "spread");
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for row in rows {
        if !keys.contains(&(row.program, row.path)) {
            keys.push((row.program, row.path));
        }
    }
    for (program, path) in keys {
        let times: Vec<f64> = rows
            .iter()
            .filter(|r| r.program == program && r.path == path)
            .map(|r| r.ns_per_pkt)
            .collect();
        print!("{program:<10} {path:<12}");
        for t in &times {
            print!(" {t:>10.0}");
        }
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(" {:>8.1}%", (max - min) / min * 100.0);
    }
}
