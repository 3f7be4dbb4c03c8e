//! Builds: the eBPF object, then the `xlb` binary that embeds it.

use anyhow::{Result, bail};

use crate::{
    cmd::{cargo, exec, root, tools_dir},
    setup,
};

/// Builds the kernel programs. Stable rustc builds `core` for the BPF target
/// only with `RUSTC_BOOTSTRAP=1`; it is set on this inner cargo alone (and a
/// separate target dir), so host crates never rebuild because it flips.
pub fn ebpf() -> Result<()> {
    if !setup::bpf_linker_bin().is_file() {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    }
    let path = std::env::join_paths(std::iter::once(tools_dir().join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    exec(
        cargo()
            .args(["build", "--package", "lb-ebpf", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(root().join("target/ebpf"))
            .env("RUSTC_BOOTSTRAP", "1")
            .env("PATH", path),
    )
}

/// The eBPF object, then `target/release/xlb`.
pub fn all() -> Result<()> {
    ebpf()?;
    exec(cargo().args(["build", "--release", "--package", "lb-userspace"]))
}
