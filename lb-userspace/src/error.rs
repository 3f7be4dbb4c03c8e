//! The errors of the xlb library.

use std::path::PathBuf;

/// Everything that can go wrong between xlb and the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this xlb was built without its eBPF object: run `cargo xtask build`")]
    MissingObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "no xlb datapath is pinned under {}: give the agent's --bpffs (default /sys/fs/bpf/xlb)",
        .0.display()
    )]
    NoPins(PathBuf),
    #[error(
        "the maps pinned under {dir} are another xlb version's (map {map}): `xlb cleanup --bpffs {dir}` removes them (dropping every flow), then restart the agent",
        dir = .0.display(),
        map = .1
    )]
    PinsOfAnotherVersion(PathBuf, &'static str),
    #[error("the eBPF object has no program named {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        interface: String,
        program: &'static str,
        #[source]
        source: crate::attach::AttachError,
    },
    #[error("{0}")]
    Kube(String),
    #[error("socket load balancing: {0} (or run with --socket-lb off)")]
    SocketLb(String),
    #[error("serving HTTP on {addr}: {message}")]
    Http {
        addr: std::net::SocketAddr,
        message: String,
    },
    #[error("backend {0} is not in service in the maps (its write failed)")]
    MissingBackend(u32),
    #[error("reading map {0}: {1}")]
    MapWalk(&'static str, #[source] std::io::Error),
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An attach failure of `program` on `interface`.
    pub fn attach(
        interface: &str,
        program: &'static str,
        source: crate::attach::AttachError,
    ) -> Error {
        Error::Attach {
            interface: interface.to_owned(),
            program,
            source,
        }
    }

    /// Wraps a map error of map `name` (for `map_err`).
    pub fn map(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
        move |source| Error::Map { name, source }
    }
}
