//! `cargo xtask test` and the benchmark drivers.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use crate::{
    build,
    cmd::{cargo, exec, is_root, output, root},
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
    ]))?;
    deploy_checks()
}

/// The deployment: every kustomization under deploy/ renders
/// (`kubectl kustomize`), every rendered object validates against the
/// Kubernetes schemas (`kubernetes-validate --strict`) and passes the
/// manifest security scanner (`checkov`, exceptions justified in the
/// manifests), and every shell script passes `shellcheck`.
fn deploy_checks() -> Result<()> {
    let deploy = &root().join("deploy");
    let rendered_dir = &root().join("target/deploy");
    fs::create_dir_all(rendered_dir)?;
    let mut scripts = Vec::new();
    let mut rendered = Vec::new();
    for dir in walk(deploy)? {
        if dir.join("kustomization.yaml").is_file() {
            let name = dir
                .strip_prefix(deploy)?
                .to_string_lossy()
                .replace('/', "-");
            let out = rendered_dir.join(format!("{name}.yaml"));
            let yaml = output(Command::new("kubectl").arg("kustomize").arg(&dir))?;
            fs::write(&out, yaml)?;
            rendered.push(out);
        }
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "sh") {
                scripts.push(path);
            }
        }
    }
    if rendered.is_empty() {
        bail!("no kustomization under deploy/");
    }
    exec(
        Command::new(setup::venv_bin("kubernetes-validate"))
            .args(["--strict", "--quiet"])
            .args(&rendered),
    )?;
    for file in &rendered {
        exec(
            Command::new(setup::venv_bin("checkov"))
                .args(["--framework", "kubernetes", "--quiet", "--compact"])
                .args(["--skip-download", "-f"])
                .arg(file),
        )?;
    }
    exec(Command::new("shellcheck").args(&scripts))
}

/// `dir` and every directory below it, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![dir.to_owned()];
    let mut i = 0;
    while i < dirs.len() {
        let mut children: Vec<PathBuf> = fs::read_dir(&dirs[i])?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        children.sort();
        dirs.extend(children);
        i += 1;
    }
    Ok(dirs)
}

/// `cargo xtask bench datapath`.
pub fn bench_datapath(repeat: u32) -> Result<()> {
    bench("bench-datapath", &["--repeat", &repeat.to_string()])
}

/// Runs the benchmark binary `bin` of the tests crate (release, as root)
/// with `args`, after set-up and a release build of xlb (which the
/// end-to-end benchmarks start as agents).
pub fn bench(bin: &str, args: &[&str]) -> Result<()> {
    setup::run()?;
    build::all()?;
    exec(
        with_root_runner(cargo().args([
            "run",
            "--release",
            "--package",
            "xlb-tests",
            "--bin",
            bin,
            "--",
        ]))
        .args(args)
        .env("XLB_BIN", crate::cmd::root().join("target/release/xlb"))
        .current_dir(crate::cmd::root()),
    )
}

/// `cargo xtask bench report`: plots and tables from the benchmarks' JSON.
pub fn bench_report() -> Result<()> {
    setup::run()?;
    exec(
        cargo()
            .args([
                "run",
                "--release",
                "--package",
                "xlb-tests",
                "--bin",
                "bench-report",
            ])
            .current_dir(crate::cmd::root()),
    )
}

/// `cargo xtask demo [FILE]`.
pub fn demo(file: Option<&std::path::Path>) -> Result<()> {
    // Relative to where the user stands, not to the workspace root cargo
    // runs in.
    let file = file.map(std::path::absolute).transpose()?;
    setup::run()?;
    build::all()?;
    // The demo's node-side client: a process, since cgroup hooks act on
    // processes.
    exec(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "xlb-tests",
        "--bin",
        "xlb-test-client",
    ]))?;
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
                "--",
            ])
            .args(file)
            .env("XLB_BIN", crate::cmd::root().join("target/release/xlb")),
    ))
}
