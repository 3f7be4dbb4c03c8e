//! `cargo xtask bench report`: `target/bench/{e2e,sync,north-south}.json`
//! → PNG plots and one Markdown report per benchmark (tables, the machine)
//! in `docs/bench/`, and each report in the README between its
//! `bench-report:<name>` markers. A benchmark without its JSON (not run on
//! this machine) leaves its report as it was.

use std::{collections::BTreeMap, fmt::Write, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The modes of the east-west benchmarks, and of the north-south one, in
/// the order they are shown.
const MODES: [&str; 5] = ["direct", "iptables", "nftables", "xlb", "xlb-tc"];
const NORTH_SOUTH_MODES: [&str; 5] = ["direct", "iptables", "nftables", "xlb-tc", "xlb-xdp"];

#[derive(Deserialize, Clone)]
struct Row {
    mode: String,
    /// The north-south benchmark's path.
    #[serde(default)]
    path: String,
    services: u32,
    metric: String,
    median: f64,
    min: f64,
    max: f64,
    unit: String,
}

fn read(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn color(mode: &str) -> RGBColor {
    match mode {
        "direct" => RGBColor(120, 120, 120),
        "iptables" => RGBColor(214, 39, 40),
        "nftables" => RGBColor(255, 127, 14),
        "xlb-tc" => RGBColor(148, 103, 189),
        "xlb-xdp" => RGBColor(44, 160, 44),
        _ => RGBColor(31, 119, 180),
    }
}

/// One plot: `metric` of every mode against the number of Services; with
/// `log_y` the values are drawn on a logarithmic scale (as log10, labelled
/// with the values).
fn plot(
    rows: &[Row],
    modes: &[&str],
    metric: &str,
    title: &str,
    log_y: bool,
    out: &Path,
) -> Result<()> {
    let scale = |v: f64| if log_y { v.max(1e-3).log10() } else { v };
    let rows: Vec<Row> = rows
        .iter()
        .filter(|r| r.metric == metric)
        .map(|r| Row {
            median: scale(r.median),
            min: scale(r.min),
            max: scale(r.max),
            ..r.clone()
        })
        .collect();
    let points: Vec<&Row> = rows.iter().collect();
    if points.is_empty() {
        return Ok(());
    }
    let unit = points[0].unit.clone();
    let ymin = if log_y {
        points
            .iter()
            .map(|r| r.min)
            .fold(f64::INFINITY, f64::min)
            .floor()
    } else {
        0.0
    };
    let ymax = if log_y {
        points
            .iter()
            .map(|r| r.max)
            .fold(f64::NEG_INFINITY, f64::max)
            .ceil()
    } else {
        points.iter().map(|r| r.max).fold(0.0, f64::max) * 1.1
    };
    let root = BitMapBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((80f64..40_000f64).log_scale(), ymin..ymax.max(ymin + 1.0))?;
    let y_label = |y: &f64| {
        if log_y { fmt(10f64.powf(*y)) } else { fmt(*y) }
    };
    chart
        .configure_mesh()
        .x_desc("Services (10 endpoints each)")
        .y_desc(if log_y {
            format!("{unit} (log scale)")
        } else {
            unit
        })
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&y_label)
        .draw()?;
    for &mode in modes {
        let mut series: Vec<&Row> = points.iter().copied().filter(|r| r.mode == mode).collect();
        series.sort_by_key(|r| r.services);
        if series.is_empty() {
            continue;
        }
        let c = color(mode);
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|r| (f64::from(r.services), r.median)),
                c.stroke_width(2),
            ))?
            .label(mode)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        // Min–max of the repeats as a vertical bar at each point.
        chart.draw_series(series.iter().map(|r| {
            PathElement::new(
                vec![
                    (f64::from(r.services), r.min),
                    (f64::from(r.services), r.max),
                ],
                c.stroke_width(1),
            )
        }))?;
        chart.draw_series(
            series
                .iter()
                .map(|r| Circle::new((f64::from(r.services), r.median), 4, c.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A Markdown table: one row per (metric, Services), one column per mode.
fn table(rows: &[Row], modes: &[&str], metrics: &[(&str, &str)]) -> String {
    let modes: Vec<&str> = modes
        .iter()
        .copied()
        .filter(|m| rows.iter().any(|r| r.mode == *m))
        .collect();
    let mut out = format!("| metric | Services | {} |\n|---|---:|", modes.join(" | "));
    out.push_str(&"---:|".repeat(modes.len()));
    out.push('\n');
    for (metric, label) in metrics {
        let mut by_scale: BTreeMap<u32, BTreeMap<&str, &Row>> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.metric == *metric) {
            by_scale.entry(r.services).or_default().insert(&r.mode, r);
        }
        for (scale, cells) in by_scale {
            let unit = cells.values().next().map(|r| r.unit.as_str()).unwrap_or("");
            write!(out, "| {label} ({unit}) | {scale} |").unwrap();
            for mode in &modes {
                match cells.get(mode) {
                    Some(r) => write!(out, " {} ({}–{}) |", fmt(r.median), fmt(r.min), fmt(r.max)),
                    None => write!(out, " — |"),
                }
                .unwrap();
            }
            out.push('\n');
        }
    }
    out
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    format!("{cpus} vCPUs ({model}), Linux {}", kernel.trim())
}

fn main() -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("{FONT} (fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{FONT}: not a font"))?;
    let out = Path::new("docs/bench");
    std::fs::create_dir_all(out)?;
    let sections: [(&str, Report); 3] = [
        ("e2e", e2e_report),
        ("sync", sync_report),
        ("north-south", north_south_report),
    ];
    for (name, report) in sections {
        let json = Path::new("target/bench").join(format!("{name}.json"));
        if !json.exists() {
            println!("{}: not there, its report stays as it was", json.display());
            continue;
        }
        let md = report(&read(&json)?, out)?;
        let file = out.join(format!("{name}.md"));
        std::fs::write(&file, &md)?;
        println!("wrote {}", file.display());
        embed_in_readme(name, &md)?;
    }
    Ok(())
}

/// A benchmark's report: its rows in, its Markdown out (plots written to
/// the directory given).
type Report = fn(&[Row], &Path) -> Result<String>;

/// What every report says first: the run and the machine.
fn preamble(command: &str) -> String {
    format!(
        "One run of `{command}` and `cargo xtask bench report` on {}: one shared VM, so every figure is noisy (repeats as min–max), and clients, nodes and backends share its CPUs. Median (min–max) of the repeats.\n\n",
        machine()
    )
}

fn e2e_report(e2e: &[Row], out: &Path) -> Result<String> {
    for (metric, title) in [
        (
            "new_conn_rate",
            "New TCP connections per second (higher is better)",
        ),
        ("connect_p50", "Connect latency p50 (lower is better)"),
        ("connect_p99", "Connect latency p99 (lower is better)"),
        (
            "keepalive_rate",
            "Requests per second, kept-alive TCP (higher is better)",
        ),
        ("udp_rate", "UDP requests per second (higher is better)"),
    ] {
        let file = out.join(format!("e2e-{metric}.png"));
        plot(e2e, &MODES, metric, title, false, &file)?;
    }
    let mut md = String::from("## Data path (`e2e.json`)\n\n");
    md.push_str(&preamble("cargo xtask bench e2e"));
    md.push_str(&table(
        e2e,
        &MODES,
        &[
            ("new_conn_rate", "new connections"),
            ("connect_p50", "connect p50"),
            ("connect_p99", "connect p99"),
            ("keepalive_rate", "kept-alive requests"),
            ("udp_rate", "UDP requests"),
        ],
    ));
    md.push_str("\n![](e2e-new_conn_rate.png)\n![](e2e-connect_p99.png)\n![](e2e-keepalive_rate.png)\n![](e2e-udp_rate.png)\n");
    Ok(md)
}

fn sync_report(rows: &[Row], out: &Path) -> Result<String> {
    // The percentile of the rules' changes is only the slowest of their
    // few repeats: shown for xlb alone (20 changes a repeat).
    let sync: Vec<Row> = rows
        .iter()
        .filter(|r| r.metric != "endpoint_change_p99" || r.mode == "xlb")
        .cloned()
        .collect();
    for (metric, title) in [
        (
            "cold_sync",
            "Cold sync: manifests written → last Service served (lower is better)",
        ),
        (
            "endpoint_change",
            "One endpoint change programmed (lower is better)",
        ),
    ] {
        let file = out.join(format!("sync-{metric}.png"));
        plot(&sync, &MODES, metric, title, true, &file)?;
    }
    let mut md = String::from("## Control plane (`sync.json`)\n\n");
    md.push_str(&preamble("cargo xtask bench sync"));
    md.push_str("`cold_sync`: for xlb, from writing the manifests (the fillers in one large file, the measured Service in a small one) to the last Service answering; for the rules, the `iptables-restore`/`nft -f` run. `cold_sync_agent`: the agent's own time for it, reading the YAML included; `cold_sync_read`: of which reading the YAML. `endpoint_change`: for xlb, the agent's time for one endpoint change in the small file — reading it, the model of the one Service it touches (`_model`), the diff of that Service's frontends (`_diff`) and the 3–4 map writes — median of 20 changes a repeat, `_p99` the 99th percentile of them; `endpoint_change_visible`: from writing the change to a new connection reaching the endpoint it put back; for the rules, kube-proxy's partial restore / incremental transaction. `endpoint_change_full`: a whole-table reload with that change.\n\n");
    md.push_str(&table(
        &sync,
        &MODES,
        &[
            ("cold_sync", "cold sync"),
            ("cold_sync_agent", "cold sync, agent"),
            ("cold_sync_read", "cold sync, reading YAML"),
            ("endpoint_change", "endpoint change"),
            ("endpoint_change_p99", "endpoint change, p99"),
            (
                "endpoint_change_visible",
                "endpoint change, until traffic sees it",
            ),
            ("endpoint_change_model", "endpoint change, model"),
            ("endpoint_change_diff", "endpoint change, diff"),
            ("endpoint_change_full", "endpoint change, full reload"),
            ("agent_rss", "agent memory"),
        ],
    ));
    md.push_str("\n![](sync-cold_sync.png)\n![](sync-endpoint_change.png)\n");
    Ok(md)
}

/// The north-south paths, as the benchmark names them, with what each
/// exercises.
const PATHS: [(&str, &str); 3] = [
    (
        "nodeport-cluster",
        "NodePort, `externalTrafficPolicy: Cluster`, backend on the other node (translated, SNATed, forwarded)",
    ),
    (
        "nodeport-local",
        "NodePort, `externalTrafficPolicy: Local`, backends on the node (client address kept)",
    ),
    (
        "loadbalancer",
        "LoadBalancer IP, backends on both nodes (`Cluster`)",
    ),
];

fn north_south_report(rows: &[Row], out: &Path) -> Result<String> {
    let mut md = String::from("## North-south (`north-south.json`)\n\n");
    md.push_str(&preamble("cargo xtask bench north-south"));
    md.push_str("A client outside the cluster, on the nodes' LAN, through node1. `cpu`: the machine's busy time (user, system, softirq; not steal) during the run over the requests served — client, nodes and backends are the same in every mode, so the differences are the load balancer's. `bpf`: xlb's programs' run time and runs per request (`kernel.bpf_stats_enabled`, in a separate pass so that the rates above are measured without its cost).\n\n");
    for (path, what) in PATHS {
        let path_rows: Vec<Row> = rows.iter().filter(|r| r.path == path).cloned().collect();
        if path_rows.is_empty() {
            continue;
        }
        for (metric, title) in [
            ("new_conn_rate", "new TCP connections per second"),
            ("keepalive_cpu_us", "CPU per kept-alive request"),
        ] {
            let file = out.join(format!("ns-{path}-{metric}.png"));
            let title = format!("{path}: {title}");
            plot(&path_rows, &NORTH_SOUTH_MODES, metric, &title, false, &file)?;
        }
        write!(md, "### `{path}`: {what}\n\n").unwrap();
        md.push_str(&table(
            &path_rows,
            &NORTH_SOUTH_MODES,
            &[
                ("new_conn_rate", "new connections"),
                ("connect_p50", "connect p50"),
                ("connect_p99", "connect p99"),
                ("keepalive_rate", "kept-alive requests"),
                ("udp_rate", "UDP requests"),
                ("conn_cpu_us", "cpu per connection"),
                ("keepalive_cpu_us", "cpu per kept-alive request"),
                ("udp_cpu_us", "cpu per UDP request"),
                ("conn_bpf_ns", "bpf per connection"),
                ("conn_bpf_runs", "bpf runs per connection"),
                ("keepalive_bpf_ns", "bpf per kept-alive request"),
                ("keepalive_bpf_runs", "bpf runs per kept-alive request"),
                ("udp_bpf_ns", "bpf per UDP request"),
                ("udp_bpf_runs", "bpf runs per UDP request"),
            ],
        ));
        write!(
            md,
            "\n![](ns-{path}-new_conn_rate.png)\n![](ns-{path}-keepalive_cpu_us.png)\n\n"
        )
        .unwrap();
    }
    Ok(md)
}

/// Replaces what stands between the README's markers of report `name` with
/// it (its headings two levels down, its images under docs/bench/).
fn embed_in_readme(name: &str, report: &str) -> Result<()> {
    let begin_marker = format!("<!-- bench-report:{name}:begin -->");
    let end_marker = format!("<!-- bench-report:{name}:end -->");
    let (begin_marker, end_marker) = (begin_marker.as_str(), end_marker.as_str());
    let readme = std::fs::read_to_string("README.md")?;
    let (Some(begin), Some(end)) = (readme.find(begin_marker), readme.find(end_marker)) else {
        anyhow::bail!("README.md has no {begin_marker} … {end_marker} markers");
    };
    let body: String = report
        .lines()
        .map(|line| {
            let line = line.replace("](", "](docs/bench/");
            match line.strip_prefix('#') {
                Some(heading) if heading.starts_with(['#', ' ']) => format!("##{line}\n"),
                _ => format!("{line}\n"),
            }
        })
        .collect();
    let updated = format!(
        "{}{begin_marker}\n{}{}",
        &readme[..begin],
        body.trim_start(),
        &readme[end..]
    );
    std::fs::write("README.md", updated)?;
    println!("updated README.md");
    Ok(())
}
