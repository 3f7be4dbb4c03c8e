//! xlb's kernel programs. Entry points only: each adapts its context, runs
//! the pipeline in [`lb`] and returns the verdict that pipeline computed.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Conntrack's SNAT-tuple claim needs a compare-and-swap, which the BPF
// target offers only as an intrinsic (see `conntrack::compare_and_swap`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod conntrack;
mod csum;
mod fragment;
mod frontend;
mod lb;
mod maps;
mod nat;
mod packet;
mod reject;
mod route;
mod select;
mod sock;
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};

/// TC ingress of a pod's host-side veth: traffic a pod sends. Load balances
/// packets addressed to a frontend (DNAT to a backend); translates back the
/// replies of hairpin and external flows.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (reason, action) = tc::run(&ctx, lb::from_pod_may_be_ours, lb::from_pod);
    stats::tc_verdict(&ctx, reason, action)
}

/// TC egress of a pod's host-side veth: traffic delivered to a pod. Translates
/// replies of load-balanced flows back (backend → frontend).
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let (reason, action) = tc::run(&ctx, lb::to_pod_may_be_ours, lb::to_pod);
    stats::tc_verdict(&ctx, reason, action)
}

/// TC ingress of an external interface: NodePort, LoadBalancer and external
/// IP frontends, and the replies of SNATed flows.
#[classifier]
pub fn nodeport_tc(ctx: TcContext) -> i32 {
    let (reason, action) = tc::run(&ctx, lb::all, lb::from_outside);
    stats::tc_verdict(&ctx, reason, action)
}

/// XDP on an external interface: the fast path of `nodeport_tc`.
#[xdp]
pub fn nodeport_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx, lb::from_outside)
}

/// cgroup `connect()` (TCP, connected UDP): a frontend's address becomes a
/// backend's before the socket connects.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx)
}

/// cgroup `sendmsg()` of unconnected UDP: balanced per datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx)
}

/// cgroup `recvmsg()` of UDP: replies appear to come from the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// cgroup `getpeername()`: the application sees the frontend it connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// cgroup socket release: the socket's reverse entry goes with it.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

/// The benchmark's floor for TC hooks: an empty program, run through the
/// same harness as every path (`cargo xtask bench datapath`) so that each
/// path is reported as what it costs above it. Never attached.
#[classifier]
pub fn floor_tc(_ctx: TcContext) -> i32 {
    0 // TC_ACT_OK, the floor's only verdict
}

/// The benchmark's floor for XDP, like [`floor_tc`]. Never attached.
#[xdp]
pub fn floor_xdp(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
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
