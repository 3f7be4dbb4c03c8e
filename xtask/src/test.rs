//! `cargo xtask test` and the benchmark drivers.

use anyhow::Result;

use crate::{
    build,
    cmd::{cargo, exec, is_root},
    setup,
};

/// Test binaries need root (BPF, netns): when we are not root, cargo runs
/// them through `sudo -E`.
fn with_root_runner(cmd: &mut std::process::Command) -> &mut std::process::Command {
    if !is_root() {
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    cmd
}

/// Every check and test, in order of cost.
pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    build::ebpf()?;
    run_checks()?;
    exec(with_root_runner(
        cargo().args(["test", "--workspace"]).args(args),
    ))
}

fn run_checks() -> Result<()> {
    exec(cargo().args(["fmt", "--all", "--check"]))?;
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// `cargo xtask bench datapath`.
pub fn bench_datapath(repeat: u32) -> Result<()> {
    setup::run()?;
    build::ebpf()?;
    exec(with_root_runner(
        cargo()
            .args([
                "run",
                "--release",
                "--package",
                "xlb-tests",
                "--bin",
                "bench-datapath",
                "--",
            ])
            .args(["--repeat", &repeat.to_string()])
            .arg("--out")
            .arg(crate::cmd::root().join("target/bench/datapath.json")),
    ))
}

/// `cargo xtask demo`.
pub fn demo() -> Result<()> {
    setup::run()?;
    build::all()?;
    exec(with_root_runner(
        cargo()
            .args([
                "run",
                "--quiet",
                "--release",
                "--package",
                "xlb-tests",
                "--bin",
                "xlb-demo",
            ])
            .env("XLB_BIN", crate::cmd::root().join("target/release/xlb")),
    ))
}
