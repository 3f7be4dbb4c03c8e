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
//!
//! Each hook's floor, an empty program (`floor_tc`, `floor_xdp`), runs
//! through the same harness at every scale, and every path is also given
//! as ns above the floor of its hook.
//!
//! The north-south paths (`nodeport_tc`, `nodeport_xdp`) run in a node
//! namespace of their own (`node_ns`) so that their FIB lookups succeed; the
//! SNAT address is the client's own, so SNAT too writes what it reads and
//! the reply of a SNATed flow is addressed back to the same client. Those
//! paths forward the packet themselves and take one off its TTL each run,
//! so they run in batches of [`TTL_BATCH`] from a TTL of 255, [`TTL_RUNS`]
//! runs per point.
//!
//! Every point is the mean of its fastest batch: on a shared VM an
//! interrupt, a neighbour or a frequency change only ever slows a batch, so
//! the fastest one is the steadiest estimate of the path's own cost.

use std::{fs, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use lb_common::{PROTO_TCP, Reason, backend_flags};
use lb_userspace::datapath::{
    Settings,
    program::{FLOOR_TC, FLOOR_XDP, FROM_POD, NODEPORT_TC, NODEPORT_XDP, TO_POD},
};
use serde::Serialize;
use xlb_tests::{
    node_ns::{CLIENT_IP, NODE_MAC, NodeNs},
    packet::{Packet, flags, with_ttl},
    privilege::has_root,
    test_lb::{Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TestLb, XDP_PASS, XDP_TX},
};

const SCALES: [u32; 3] = [1, 10_000, 100_000];
const BACKENDS_PER_FRONTEND: u32 = 3;
/// Batches a point's runs are split into; the point is the fastest
/// batch's mean, which an interrupt or a neighbour on the VM can only slow.
const BATCHES: u32 = 100;
const VIP: &str = "10.96.0.1:80";
const CLIENT: &str = "10.244.1.5:40000";
/// North-south: the external client (in the SNAT port range, which it
/// keeps), a frontend whose backend is remote and one whose backend is
/// local; both balanced to themselves.
const EXT_CLIENT: &str = "192.168.77.200:62000";
const EXT_REMOTE: &str = "192.168.77.50:80";
const EXT_LOCAL: &str = "192.168.77.51:80";
/// Runs per batch of a path that takes one off the TTL each run.
const TTL_BATCH: u32 = 250;
/// Runs per point of such a path: each batch is a syscall that also flips
/// the kernel's XDP static key (milliseconds of wall time), so these points
/// take fewer runs than the others.
const TTL_RUNS: u32 = 100_000;

#[derive(Serialize)]
struct Row {
    program: &'static str,
    path: &'static str,
    frontends: u32,
    ns_per_pkt: f64,
    /// Above the empty program of the same hook, same scale, same run.
    ns_above_floor: f64,
}

struct Path {
    program: &'static str,
    name: &'static str,
    packet: Packet,
    /// The counter every run of this path must land in (`None`: none, an
    /// XDP pass left to TC).
    reason: Option<Reason>,
    /// The verdict every run must return.
    verdict: u32,
    /// The path forwards the packet itself (TTL batches).
    forwards: bool,
}

impl Path {
    fn east_west(
        program: &'static str,
        name: &'static str,
        packet: Packet,
        reason: Reason,
    ) -> Self {
        Path {
            program,
            name,
            packet,
            reason: Some(reason),
            verdict: TC_ACT_OK,
            forwards: false,
        }
    }
}

fn paths() -> Vec<Path> {
    let floor = |program, verdict| Path {
        program,
        name: "floor",
        packet: Packet::tcp(CLIENT, VIP, flags::ACK),
        reason: None,
        verdict,
        forwards: false,
    };
    let mut paths = vec![
        floor(FLOOR_TC, TC_ACT_OK),
        floor(FLOOR_XDP, XDP_PASS),
        Path::east_west(
            FROM_POD,
            "new_flow",
            Packet::tcp(CLIENT, VIP, flags::SYN | flags::RST),
            Reason::ForwardNew,
        ),
        Path::east_west(
            FROM_POD,
            "established",
            Packet::tcp(CLIENT, VIP, flags::ACK),
            Reason::ForwardEstablished,
        ),
        Path::east_west(
            FROM_POD,
            "miss",
            Packet::tcp(CLIENT, "10.244.9.9:80", flags::ACK),
            Reason::PassNotLoadBalanced,
        ),
        Path::east_west(
            TO_POD,
            "rev_nat",
            Packet::tcp(VIP, CLIENT, flags::ACK),
            Reason::RevNat,
        ),
        Path::east_west(
            TO_POD,
            "miss",
            Packet::tcp("10.244.9.9:80", CLIENT, flags::ACK),
            Reason::PassNotLoadBalanced,
        ),
    ];
    for (program, sent_out, passed) in [
        (NODEPORT_TC, TC_ACT_REDIRECT, TC_ACT_OK),
        (NODEPORT_XDP, XDP_TX, XDP_PASS),
    ] {
        let forwarded = |name, packet, reason| Path {
            program,
            name,
            packet,
            reason: Some(reason),
            verdict: sent_out,
            forwards: true,
        };
        paths.extend([
            forwarded(
                "new_snat",
                Packet::tcp(EXT_CLIENT, EXT_REMOTE, flags::SYN | flags::RST),
                Reason::ForwardNew,
            ),
            forwarded(
                "est_snat",
                Packet::tcp(EXT_CLIENT, EXT_REMOTE, flags::ACK),
                Reason::ForwardEstablished,
            ),
            forwarded(
                "rev_snat",
                Packet::tcp(EXT_REMOTE, EXT_CLIENT, flags::ACK),
                Reason::RevNat,
            ),
            Path {
                program,
                name: "new_local",
                packet: Packet::tcp(EXT_CLIENT, EXT_LOCAL, flags::SYN | flags::RST),
                reason: Some(Reason::ForwardNew),
                verdict: passed,
                forwards: false,
            },
            Path {
                program,
                name: "miss",
                packet: Packet::tcp(EXT_CLIENT, "192.168.77.11:22", flags::ACK),
                reason: (program == NODEPORT_TC).then_some(Reason::PassNotLoadBalanced),
                verdict: passed,
                forwards: false,
            },
        ]);
    }
    paths
}

/// Fills `count` frontends; the first is [`VIP`], balanced to itself.
fn fill(lb: &mut TestLb, count: u32) {
    lb.add_frontend(VIP, PROTO_TCP, &[VIP]);
    let remote = lb.add_backend(EXT_REMOTE, PROTO_TCP);
    lb.add_external_frontend(EXT_REMOTE, PROTO_TCP, &[remote], 0);
    let local = lb.add_backend_flagged(EXT_LOCAL, PROTO_TCP, backend_flags::LOCAL);
    lb.add_external_frontend(EXT_LOCAL, PROTO_TCP, &[local], 0);
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

/// Runs `path` `repeat` times on `frame` arriving on `ifindex`.
fn run(
    lb: &mut TestLb,
    path: &Path,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> (Outcome, Duration) {
    match path.program {
        NODEPORT_XDP => lb.run_xdp_repeated(frame, ifindex, repeat),
        FLOOR_XDP => lb.run_floor_xdp_repeated(frame, ifindex, repeat),
        NODEPORT_TC | FLOOR_TC => lb.run_on_repeated(path.program, frame, ifindex, repeat),
        program => lb.run_repeated(program, frame, repeat),
    }
}

fn measure(lb: &mut TestLb, node: &NodeNs, path: &Path, repeat: u32) -> Result<Duration> {
    let frame = with_ttl(path.packet.bytes(), 255);
    let count = |lb: &TestLb| -> Result<u64> {
        Ok(match path.reason {
            Some(reason) => lb.maps.counter_totals()?[reason as usize].packets,
            None => lb.maps.counter_totals()?.iter().map(|c| c.packets).sum(),
        })
    };
    let (batch, batches) = if path.forwards {
        (TTL_BATCH, repeat.min(TTL_RUNS).div_ceil(TTL_BATCH))
    } else {
        (repeat.div_ceil(BATCHES), BATCHES)
    };
    let ifindex = node.ext;
    node.ns.enter(|| -> Result<Duration> {
        // Create the flows the established and reply paths use, then put
        // the path in its steady state (new flow: the entry left closing).
        lb.run(FROM_POD, &Packet::tcp(CLIENT, VIP, flags::SYN).bytes());
        let ext_syn = with_ttl(Packet::tcp(EXT_CLIENT, EXT_REMOTE, flags::SYN).bytes(), 255);
        lb.run_on(NODEPORT_TC, &ext_syn, ifindex);
        run(lb, path, &frame, ifindex, 1);
        let before = count(lb)?;
        let mut fastest = Duration::MAX;
        for _ in 0..batches {
            let (out, per_run) = run(lb, path, &frame, ifindex, batch);
            if out.verdict != path.verdict {
                bail!(
                    "{} {}: left its path (verdict {}, want {})",
                    path.program,
                    path.name,
                    out.verdict,
                    path.verdict
                );
            }
            fastest = fastest.min(per_run);
        }
        let counted = count(lb)? - before;
        let want = if path.reason.is_some() {
            u64::from(batch) * u64::from(batches)
        } else {
            0
        };
        if counted != want {
            bail!(
                "{} {}: left its path ({counted} of {want} runs counted as {:?})",
                path.program,
                path.name,
                path.reason.map(Reason::name)
            );
        }
        Ok(fastest)
    })?
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut repeat = 1_000_000;
    let mut out = PathBuf::from("target/bench/datapath.json");
    let mut only: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--repeat" => repeat = args.next().context("--repeat N")?.parse()?,
            "--out" => out = args.next().context("--out FILE")?.into(),
            // `program` or `program/path`, comma-separated (floors always run).
            "--paths" => {
                only = args
                    .next()
                    .context("--paths P[,P…]")?
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if !has_root("bench-datapath") {
        bail!("the datapath benchmark needs root");
    }
    let node = NodeNs::new()?;
    for frontend in [EXT_REMOTE, EXT_LOCAL] {
        let ip = frontend.split(':').next().unwrap_or_default().parse()?;
        node.add_neighbour(ip, NODE_MAC)?;
    }
    let mut rows = Vec::new();
    for frontends in SCALES {
        let mut lb = TestLb::load_with(Settings {
            snat_addr: Some(CLIENT_IP),
            ..Settings::default()
        });
        fill(&mut lb, frontends);
        lb.load_floors();
        // The XDP_TX paths are measured where the agent allows them.
        lb.allow_xdp_tx(node.ext);
        let chosen = paths().into_iter().filter(|path| {
            only.is_empty()
                || path.name == "floor"
                || only
                    .iter()
                    .any(|o| *o == path.program || *o == format!("{}/{}", path.program, path.name))
        });
        for path in chosen {
            let time = measure(&mut lb, &node, &path, repeat)?;
            rows.push(Row {
                program: path.program,
                path: path.name,
                frontends,
                ns_per_pkt: time.as_nanos() as f64,
                ns_above_floor: 0.0,
            });
        }
    }
    set_floors(&mut rows);
    print_table(&rows, repeat);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&out, serde_json::to_string_pretty(&rows)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The hook's empty program a path is measured against.
fn floor_of(program: &str) -> &'static str {
    if program == NODEPORT_XDP || program == FLOOR_XDP {
        FLOOR_XDP
    } else {
        FLOOR_TC
    }
}

/// Fills in each row's cost above its hook's floor at its scale.
fn set_floors(rows: &mut [Row]) {
    let floors: Vec<(&str, u32, f64)> = rows
        .iter()
        .filter(|r| r.path == "floor")
        .map(|r| (r.program, r.frontends, r.ns_per_pkt))
        .collect();
    for row in rows.iter_mut() {
        let floor = floors
            .iter()
            .find(|(program, scale, _)| {
                *program == floor_of(row.program) && *scale == row.frontends
            })
            .map_or(0.0, |f| f.2);
        row.ns_above_floor = row.ns_per_pkt - floor;
    }
}

fn print_table(rows: &[Row], repeat: u32) {
    println!(
        "BPF_PROG_TEST_RUN, {repeat} runs per point in {BATCHES} batches ({} in batches of {TTL_BATCH} for paths that forward), the fastest batch's mean; ns per packet",
        repeat.min(TTL_RUNS)
    );
    print!("{:<12} {:<12}", "program", "path");
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
        let above: Vec<f64> = rows
            .iter()
            .filter(|r| r.program == program && r.path == path)
            .map(|r| r.ns_above_floor)
            .collect();
        print!("{program:<12} {path:<12}");
        for (t, a) in times.iter().zip(&above) {
            print!(" {:>10}", format!("{t:.0} (+{a:.0})"));
        }
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(" {:>8.1}%", (max - min) / min * 100.0);
    }
}
