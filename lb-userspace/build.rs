//! Embeds the eBPF object built by `cargo xtask build-ebpf`. Without it the
//! binary still builds (so `cargo check`/clippy work on a fresh clone), and
//! loading the datapath fails with an error that names the command to run.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(xlb_ebpf_object)");
    println!("cargo::rerun-if-env-changed=XLB_EBPF_OBJECT");
    let object = env::var_os("XLB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
                .join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf")
        });
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lb-ebpf.o");
    if object.is_file() {
        fs::copy(&object, &out).expect("copy the eBPF object");
        println!("cargo::rustc-cfg=xlb_ebpf_object");
    } else {
        println!(
            "cargo::warning=eBPF object not found at {}: run `cargo xtask build` (or `cargo xtask build-ebpf`)",
            object.display()
        );
    }
}
