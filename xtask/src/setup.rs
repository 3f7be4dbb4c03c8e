//! `cargo xtask setup`: everything the build and the tests need, installed
//! idempotently (DESIGN §2). Each step checks before it acts, so a second
//! run costs a few process spawns.

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, exec, output, privileged, tools_dir};

/// Debian packages: network tooling for the netns tests and the demo,
/// bpftool for inspection, iptables/nftables for the benchmark baselines,
/// shellcheck and Python's venv for the manifest checks, a font for the
/// benchmark plots.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "bpftool",
    "tcpdump",
    "iptables",
    "nftables",
    "procps",
    "shellcheck",
    "python3-venv",
    "fonts-dejavu-core",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// PyPI tools of the manifest checks, pinned.
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "checkov==3.3.30"];

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    python_tools()?;
    eprintln!("setup: done");
    Ok(())
}

/// The virtualenv holding [`PYTHON_TOOLS`].
pub fn venv_bin(tool: &str) -> std::path::PathBuf {
    tools_dir().join("venv/bin").join(tool)
}

fn python_tools() -> Result<()> {
    let stamp = tools_dir().join("venv.stamp");
    let wanted = PYTHON_TOOLS.join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} in a virtualenv",
        PYTHON_TOOLS.join(" ")
    );
    exec(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(tools_dir().join("venv")),
    )?;
    exec(
        Command::new(venv_bin("pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(PYTHON_TOOLS),
    )?;
    fs::write(stamp, wanted)?;
    Ok(())
}

/// The bpf-linker this project installed; set-up builds it when missing.
pub fn bpf_linker_bin() -> std::path::PathBuf {
    tools_dir().join("bin/bpf-linker")
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    exec(privileged("apt-get").args(["update", "-q"]))?;
    exec(
        privileged("env")
            .args([
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-y",
                "-q",
            ])
            .arg("--no-install-recommends")
            .args(&missing),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|out| out.stdout.ends_with(b"install ok installed"))
}

fn sysroot() -> Result<String> {
    Ok(output(Command::new("rustc").args(["--print", "sysroot"]))?
        .trim()
        .to_owned())
}

fn rust_src() -> Result<()> {
    let core = Path::new(&sysroot()?).join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        return Ok(());
    }
    exec(Command::new("rustup").args(["component", "add", "rust-src"]))
}

/// bpf-linker must link the LLVM that the compiling rustc uses. Debian has
/// no LLVM of that major, but rustup's rustc ships its own shared libLLVM:
/// build the linker against it through a prefix of symlinks.
fn bpf_linker() -> Result<()> {
    let rustc_version = output(Command::new("rustc").arg("-vV"))?;
    let stamp = tools_dir().join("bpf-linker.stamp");
    if bpf_linker_bin().is_file()
        && fs::read_to_string(&stamp).ok().as_ref() == Some(&rustc_version)
    {
        return Ok(());
    }
    let major = rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .context("rustc -vV names no LLVM version")?
        .to_owned();
    let lib_dir = Path::new(&sysroot()?).join("lib");
    // The real library, e.g. libLLVM.so.22.1-rust-1.95.0-stable; its file
    // name is its SONAME. (libLLVM-22-rust-*.so beside it is a linker script.)
    let libllvm = fs::read_dir(&lib_dir)?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let prefix = tools_dir().join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", libllvm.as_str()] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        symlink(lib_dir.join(&libllvm), &path)?;
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} ({libllvm})");
    let status = cmd::cargo()
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(tools_dir())
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("building bpf-linker failed: {status}");
    }
    fs::write(stamp, rustc_version)?;
    Ok(())
}
