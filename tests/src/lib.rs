//! Test support for xlb: packets built and checked from scratch, a loaded
//! datapath to run them through (BPF_PROG_TEST_RUN), and the privilege
//! check every kernel test starts with.

pub mod api_double;
pub mod baseline;
pub mod bench_e2e;
pub mod bench_ns;
pub mod cgroup;
pub mod checksum;
pub mod cluster;
pub mod echo;
pub mod examples;
pub mod manifests;
pub mod netns;
pub mod node_ns;
pub mod packet;
pub mod pins;
pub mod privilege;
pub mod scenario;
pub mod test_lb;
