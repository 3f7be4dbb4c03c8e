//! Kernel tests need root (CAP_BPF, CAP_NET_ADMIN). Without it they skip
//! with a printed reason; under CI (`CI` set) a missing privilege fails the
//! test instead, so CI can never pass by skipping.

use std::io::Write;

/// Whether the caller may run a test that needs root. Prints why not.
pub fn has_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root and CI must run it: run the tests as root"
    );
    // Straight to the stream, past libtest's output capture: a skip must be
    // seen even when the test "passes".
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (BPF and network namespaces); run `cargo xtask test` as root"
    );
    false
}

/// Returns from the calling test when it cannot run (see [`has_root`]).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::privilege::has_root(module_path!()) {
            return;
        }
    };
}
