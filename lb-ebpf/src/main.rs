//! xlb's kernel programs. Entry points only: each adapts its context, runs
//! the pipeline in [`lb`] and returns the verdict that pipeline computed.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod conntrack;
mod csum;
mod frontend;
mod lb;
mod maps;
mod nat;
mod packet;
mod reject;
mod select;
mod stats;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// TC ingress of a pod's host-side veth: traffic a pod sends. Load balances
/// packets addressed to a frontend (DNAT to a backend).
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let reason = lb::forward(&ctx);
    stats::tc_verdict(&ctx, reason)
}

/// TC egress of a pod's host-side veth: traffic delivered to a pod. Translates
/// replies of load-balanced flows back (backend → frontend).
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let reason = lb::reverse(&ctx);
    stats::tc_verdict(&ctx, reason)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction: the verifier rejects programs that could
    // get here, and no code path in this crate panics.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Lets `cargo check --workspace` build this crate for the host.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
