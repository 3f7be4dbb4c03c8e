//! Per-CPU counters by verdict/drop reason, and the verdict itself.

use aya_ebpf::programs::TcContext;
use lb_common::Reason;

use crate::maps::COUNTERS;

/// TC verdicts (linux/pkt_cls.h), typed as the classifier returns them.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

/// Counts one packet of `bytes` under `reason`.
#[inline(always)]
pub fn count(reason: Reason, bytes: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value: no other writer while this program runs on
        // this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// Counts the packet and returns its TC action: `action` when the hook
/// chose one (a redirect), otherwise drop or continue by `reason`.
#[inline(always)]
pub fn tc_verdict(ctx: &TcContext, reason: Reason, action: Option<i32>) -> i32 {
    count(reason, ctx.len());
    match action {
        Some(action) => action,
        None if reason.is_drop() => TC_ACT_SHOT,
        None => TC_ACT_OK,
    }
}
