//! The datapath's clock, read from user space.

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: what `bpf_ktime_get_coarse_ns`
/// returns in the kernel, so conntrack timestamps compare with it.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; this clock id always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
