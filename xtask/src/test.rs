//! `cargo xtask test` and the benchmark drivers.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use crate::{
    build,
    cmd::{cargo, exec, is_root},
    setup,
};

/// Test binaries need root (BPF, netns): when we are not root, cargo runs
/// them through `sudo -E`.
fn with_root_runner(cmd: &mut Command) -> &mut Command {
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
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(args);
    let totals = run_counting(with_root_runner(&mut cmd))?;
    // One closing line over every test binary (libtest prints one each).
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if totals.failed > 0 || !totals.success {
        bail!("tests failed");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    success: bool,
}

/// Runs `cmd`, echoing its stdout while adding up libtest's result lines.
fn run_counting(cmd: &mut Command) -> Result<Totals> {
    eprintln!("+ {cmd:?}");
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            totals.passed += count(rest, " passed");
            totals.failed += count(rest, " failed");
        }
    }
    totals.success = child.wait()?.success();
    Ok(totals)
}

/// The number before `what` in "ok. 3 passed; 0 failed; …".
fn count(summary: &str, what: &str) -> u64 {
    summary
        .split(';')
        .find(|part| part.ends_with(what))
        .and_then(|part| part.trim_end_matches(what).rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
