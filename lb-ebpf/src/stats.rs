//! Per-CPU counters by verdict/drop reason, and the verdict itself.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
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

/// Counts the packet and turns its reason into the TC verdict: a
/// rejection (the packet now is the reply) goes back out of the interface
/// it came in on.
#[inline(always)]
pub fn tc_verdict(ctx: &TcContext, reason: Reason) -> i32 {
    count(reason, ctx.len());
    if reason == Reason::RejectNoBackend {
        // SAFETY: reading our own context; bpf_redirect takes plain values.
        return unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) } as i32;
    }
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}
