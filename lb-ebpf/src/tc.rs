//! Applying the pipeline's verdict to a TC packet (an skb).

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use lb_common::Reason;

use crate::{
    fragment,
    lb::{self, Translation, Verdict},
    nat,
    packet::{self, Flow, MAX_HEADER_LEN, Packet},
    reject, route,
};

/// The packet's headers as direct-access memory. Headers of a non-linear
/// skb are pulled into the linear part first (rare: GSO/GRO packets).
#[inline(always)]
fn packet(ctx: &TcContext) -> Packet {
    let linear = ctx.data_end() - ctx.data();
    let len = ctx.len() as usize;
    if linear < MAX_HEADER_LEN && len > linear {
        let want = if len < MAX_HEADER_LEN {
            len
        } else {
            MAX_HEADER_LEN
        };
        // On failure the parser finds a short packet and passes it.
        let _ = ctx.pull_data(want as u32);
    }
    Packet::new(ctx.data(), ctx.data_end())
}

/// Runs `pipeline` on the packet, when `prefilter` lets it through, and
/// applies its verdict: the counter reason, and the TC action when it is
/// not the reason's default (a redirect).
#[inline(always)]
pub fn run(
    ctx: &TcContext,
    prefilter: fn(&Flow) -> bool,
    pipeline: fn(&Flow) -> Verdict,
) -> (Reason, Option<i32>) {
    let pkt = packet(ctx);
    let mut flow = match packet::parse(&pkt) {
        Ok(flow) => flow,
        Err(reason) => return (reason, None),
    };
    if let Err(reason) = fragment::follow(&mut flow) {
        return (reason, None);
    }
    if !prefilter(&flow) {
        return (lb::pass_reason(&flow), None);
    }
    match pipeline(&flow) {
        Verdict::Pass(reason) | Verdict::Drop(reason) => (reason, None),
        Verdict::NoBackend { drop: true } => (Reason::DropNoLocalBackend, None),
        Verdict::NoBackend { drop: false } => reject(ctx, &flow),
        Verdict::Translate(translation) => translate(ctx, &pkt, &flow, &translation),
    }
}

/// Turns the packet into its rejection and sends it back out of the
/// interface it came in on.
#[inline(always)]
fn reject(ctx: &TcContext, flow: &Flow) -> (Reason, Option<i32>) {
    match reject::reply_tc(ctx, flow) {
        // SAFETY: reading our own context; bpf_redirect takes plain values.
        Ok(()) => (
            Reason::RejectNoBackend,
            Some(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) } as i32),
        ),
        Err(_) => (Reason::DropNoBackend, None),
    }
}

#[inline(always)]
fn translate(
    ctx: &TcContext,
    pkt: &Packet,
    flow: &Flow,
    translation: &Translation,
) -> (Reason, Option<i32>) {
    let rewritten = if flow.is_icmp_error() {
        nat::rewrite_icmp_error(pkt, flow, &translation.rewrite)
    } else {
        nat::rewrite_tc(ctx, pkt, flow, &translation.rewrite)
    };
    if rewritten.is_err() {
        return (Reason::DropMalformed, None);
    }
    if !translation.route {
        return (translation.reason, None);
    }
    match route::redirect_tc(ctx, &translation.rewrite.apply_to(flow)) {
        Ok(action) => (translation.reason, action),
        Err(reason) => (reason, None),
    }
}
