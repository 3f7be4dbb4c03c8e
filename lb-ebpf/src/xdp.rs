//! Applying the pipeline's verdict to an XDP frame: the fast path of
//! external traffic. What it finishes here (drops, translations sent back
//! out with `XDP_TX`, translations to local pods) is counted here; what it
//! cannot finish (a reject, an unresolved next hop, another egress
//! interface, anything not ours) passes untouched, and `nodeport_tc` does it
//! with the same maps.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::Reason;

use crate::{
    fragment,
    lb::{Translation, Verdict},
    maps::XDP_TX_IFACES,
    nat,
    packet::{self, Flow, Packet},
    route::{self, NextHop},
    stats,
};

/// Runs `pipeline` on the frame and returns the XDP action.
#[inline(always)]
pub fn run(ctx: &XdpContext, pipeline: fn(&Flow) -> Verdict) -> u32 {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let len = (ctx.data_end() - ctx.data()) as u32;
    let Ok(mut flow) = packet::parse(&pkt) else {
        return xdp_action::XDP_PASS;
    };
    // What XDP cannot place (a fragment before its first), TC counts.
    if fragment::follow(&mut flow).is_err() {
        return xdp_action::XDP_PASS;
    }
    let (reason, action) = match pipeline(&flow) {
        Verdict::Pass(_) | Verdict::NoBackend { drop: false } => return xdp_action::XDP_PASS,
        Verdict::Drop(reason) => (reason, xdp_action::XDP_DROP),
        Verdict::NoBackend { drop: true } => (Reason::DropNoLocalBackend, xdp_action::XDP_DROP),
        Verdict::Translate(translation) => match translate(ctx, &pkt, &flow, &translation) {
            Some(done) => done,
            None => return xdp_action::XDP_PASS,
        },
    };
    stats::count(reason, len);
    action
}

/// Applies a translation; `None` leaves the frame untouched for TC.
#[inline(always)]
fn translate(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &Flow,
    translation: &Translation,
) -> Option<(Reason, u32)> {
    // To a local pod the stack routes it (no MACs); otherwise decide
    // before touching the frame: what cannot go back out of this interface
    // right now, or not by XDP_TX, is TC's.
    let macs = if translation.route {
        Some(next_hop_macs(ctx, flow, translation)?)
    } else {
        None
    };
    if macs.is_some() {
        // A TTL that runs out is TC's too (it counts the drop).
        route::decrement_ttl(pkt).ok()?;
    }
    // One call site: the rewrites are inlined once.
    let done = rewrite(pkt, flow, translation)
        .ok()
        .and_then(|()| match &macs {
            Some((smac, dmac)) => route::set_macs(pkt, smac, dmac).ok(),
            None => Some(()),
        });
    Some(match (done, macs.is_some()) {
        (Some(()), true) => (translation.reason, xdp_action::XDP_TX),
        (Some(()), false) => (translation.reason, xdp_action::XDP_PASS),
        (None, _) => (Reason::DropMalformed, xdp_action::XDP_DROP),
    })
}

/// The MACs to send the translated frame back out of the interface it
/// came in on, when XDP may (`XDP_TX` allowed there) and the FIB says it
/// goes back out there, resolved.
#[inline(always)]
fn next_hop_macs(
    ctx: &XdpContext,
    flow: &Flow,
    translation: &Translation,
) -> Option<([u8; 6], [u8; 6])> {
    let ifindex = ctx.ingress_ifindex() as u32;
    let slot = XDP_TX_IFACES.get(ifindex % lb_common::maps::XDP_TX_IFACES_MAX)?;
    if *slot != ifindex {
        return None;
    }
    let after = translation.rewrite.apply_to(flow);
    match route::lookup(ctx.ctx as *mut _, ifindex, &after)? {
        NextHop::Resolved {
            ifindex: out,
            smac,
            dmac,
        } if out == ifindex => Some((smac, dmac)),
        _ => None,
    }
}

/// The translation written into the frame: a packet of the flow, or an
/// ICMP error about it.
#[inline(always)]
fn rewrite(pkt: &Packet, flow: &Flow, translation: &Translation) -> Result<(), i64> {
    if flow.is_icmp_error() {
        nat::rewrite_icmp_error(pkt, flow, &translation.rewrite)
    } else {
        nat::rewrite_xdp(pkt, flow, &translation.rewrite)
    }
}
