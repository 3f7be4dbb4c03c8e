//! xlb's user space: sources → model → diff → maps.
//!
//! The sources read Services and EndpointSlices into a [`source::Snapshot`];
//! the [`model`] applies Kubernetes' rules for this node; the [`diff`] turns
//! the result into the fewest ordered map writes; a [`dataplane::Dataplane`]
//! applies them (the pinned BPF maps, or memory in tests).

pub mod agent;
pub mod attach;
pub mod bpf_link;
pub mod bpffs;
pub mod cgroup;
pub mod cleanup;
pub mod clock;
pub mod conntrack;
pub mod datapath;
pub mod dataplane;
pub mod diff;
mod error;
pub mod health_check;
pub mod inspect;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod netif;
pub mod object;
pub mod problem;
pub mod source;
pub mod state;
pub mod sync;

pub use datapath::Datapath;

/// FNV-1a: a hash every build and machine computes alike (the standard
/// library's may change between releases).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
pub use error::Error;
pub use maps::Maps;
