//! `cargo xtask …`: set-up, builds and test/bench drivers for xlb.

mod build;
mod cmd;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "xlb's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and tests need (idempotent): Debian
    /// packages, rust-src, bpf-linker built against rustc's own LLVM, and
    /// the manifest checkers in a Python virtualenv.
    Setup,
    /// Build the eBPF object (release, bpfel-unknown-none).
    BuildEbpf,
    /// Build the eBPF object, then `target/release/xlb` with it embedded.
    Build,
    /// Set up, build, and run every check and test: fmt, clippy, the
    /// deployment manifests, unit, packet (BPF_PROG_TEST_RUN) and
    /// end-to-end (netns) tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// xlb's main job on this machine: a 2-node network-namespace cluster,
    /// ClusterIP and NodePort Services over 3 echo pods, one agent per
    /// node, requests from a pod and from outside.
    Demo {
        /// Run the demo cluster with the Services of this manifest instead
        /// (e.g. one of examples/) and show what requests to each get.
        file: Option<std::path::PathBuf>,
    },
    /// Run a benchmark and write its JSON under target/bench/.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Every datapath program path through BPF_PROG_TEST_RUN, at 1, 10,000
    /// and 100,000 frontends.
    Datapath {
        /// Runs per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
    /// Real connections through xlb, kube-proxy's iptables and nftables
    /// rules, and no load balancer, at 100 to 30,000 Services
    /// (target/bench/e2e.json). Arguments go to the benchmark (--modes,
    /// --scales, --duration-ms, --repeats, --workers).
    E2e {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// External clients through node1: a NodePort (Cluster policy, SNAT
    /// and forwarding), a NodePort (Local policy) and a LoadBalancer IP,
    /// for no load balancer, kube-proxy's iptables and nftables rules, and
    /// xlb with TC only and with XDP, at 100 and 10,000 Services
    /// (target/bench/north-south.json). Arguments go to the benchmark
    /// (--modes, --scales, --duration-ms, --repeats, --workers).
    NorthSouth {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Control-plane cost: cold sync and one endpoint change for xlb,
    /// iptables-restore and nft, at the same scales (target/bench/sync.json).
    Sync {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Churn never evicts a live flow: an idle TCP connection and UDP flow
    /// through 60 s of new connections and one-shot UDP flows
    /// (target/bench/churn.json). Arguments: --seconds N.
    Churn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Plots and a Markdown table from target/bench/{e2e,sync}.json into
    /// docs/bench/ and the README.
    Report,
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build::ebpf(),
        Task::Build => build::all(),
        Task::Test { args } => test::run(&args),
        Task::Demo { file } => test::demo(file.as_deref()),
        Task::Bench { which } => match which {
            Bench::Datapath { repeat } => test::bench_datapath(repeat),
            Bench::E2e { args } => test::bench("bench-e2e", &strs(&args)),
            Bench::Sync { args } => test::bench("bench-sync", &strs(&args)),
            Bench::NorthSouth { args } => test::bench("bench-north-south", &strs(&args)),
            Bench::Churn { args } => test::bench("bench-churn", &strs(&args)),
            Bench::Report => test::bench_report(),
        },
    }
}
