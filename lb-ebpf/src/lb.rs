//! The load-balancing pipelines, in the order the problem reads:
//! parse → frontend lookup → conntrack → select backend → NAT.

use aya_ebpf::programs::TcContext;
use lb_common::{Frontend, HAIRPIN_ADDR, Reason, ct_flags, direction, frontend_flags, scope};

use crate::{
    conntrack, frontend,
    nat::{self, Rewrite},
    packet::{self, Flow, MAX_HEADER_LEN, Packet},
    reject, select,
};

/// The packet's headers as direct-access memory. Headers of a non-linear
/// skb are pulled into the linear part first (rare: GSO/GRO packets).
#[inline(always)]
fn tc_packet(ctx: &TcContext) -> Packet {
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

/// Why a packet that is not load balanced passes.
#[inline(always)]
fn pass_reason(flow: &Flow) -> Reason {
    if flow.is_complete {
        Reason::PassNotLoadBalanced
    } else {
        Reason::PassMalformed
    }
}

/// A load-balanced packet is translated only whole: rewriting the first
/// fragment of a datagram, or a truncated header, would corrupt it.
#[inline(always)]
fn translatable(flow: &Flow) -> Result<(), Reason> {
    if flow.is_fragment {
        Err(Reason::DropFragment)
    } else if !flow.is_complete {
        Err(Reason::DropMalformed)
    } else {
        Ok(())
    }
}

/// A frontend without a backend to choose: drop when its Local policy left
/// this node without endpoints, otherwise reject (kube-proxy's rules).
#[inline(always)]
fn no_backend(ctx: &TcContext, flow: &Flow, frontend: &Frontend) -> Reason {
    if frontend.flags & frontend_flags::DROP_WHEN_EMPTY != 0 {
        return Reason::DropNoLocalBackend;
    }
    match reject::reply_tc(ctx, flow) {
        Ok(()) => Reason::RejectNoBackend,
        Err(_) => Reason::DropNoBackend,
    }
}

/// A pod's packet: DNAT to a backend when it is addressed to a frontend.
#[inline(always)]
pub fn forward(ctx: &TcContext) -> Reason {
    let pkt = tc_packet(ctx);
    let flow = match packet::parse(&pkt) {
        Ok(flow) => flow,
        Err(reason) => return reason,
    };
    let Some(frontend) = frontend::lookup(&flow, scope::INTERNAL) else {
        // A pod answering a hairpin flow: its reply goes to the hairpin
        // address and is translated back here, on its way out of the pod.
        if flow.daddr == HAIRPIN_ADDR {
            return rev_nat(ctx, &pkt, &flow);
        }
        return pass_reason(&flow);
    };
    if let Err(reason) = translatable(&flow) {
        return reason;
    }
    let now = conntrack::now_ns();
    let established = conntrack::lookup(&flow, direction::FORWARD, now)
        .filter(|entry| select::lookup_backend(entry.backend_id).is_some());
    let (addr, port, flags, reason) = match established {
        Some(entry) => (
            entry.nat_addr,
            entry.nat_port,
            entry.flags,
            Reason::ForwardEstablished,
        ),
        None => {
            let Some(chosen) = select::select_backend(&frontend, flow.saddr, now) else {
                return no_backend(ctx, &flow, &frontend);
            };
            // Balanced to itself: the pod must see another source, or it
            // would drop the packet as its own (and answer itself directly).
            let flags = if chosen.backend.addr == flow.saddr {
                ct_flags::HAIRPIN
            } else {
                0
            };
            if conntrack::create(&flow, frontend.id, &chosen, flags, now).is_err() {
                return Reason::DropConntrackFull;
            }
            (
                chosen.backend.addr,
                chosen.backend.port,
                flags,
                Reason::ForwardNew,
            )
        }
    };
    let rewrite = Rewrite {
        destination: Some((addr, port)),
        source: (flags & ct_flags::HAIRPIN != 0).then_some((HAIRPIN_ADDR, flow.sport)),
    };
    match nat::rewrite_tc(ctx, &pkt, &flow, &rewrite) {
        Ok(()) => reason,
        Err(_) => Reason::DropMalformed,
    }
}

/// A packet delivered to a pod: rev-NAT when it is a reply of a
/// load-balanced flow (backend → frontend as the source).
#[inline(always)]
pub fn reverse(ctx: &TcContext) -> Reason {
    let pkt = tc_packet(ctx);
    let flow = match packet::parse(&pkt) {
        Ok(flow) => flow,
        Err(reason) => return reason,
    };
    rev_nat(ctx, &pkt, &flow)
}

/// Rev-NAT of a reply: its source becomes the frontend again (and a
/// hairpin reply goes back to the pod itself).
#[inline(always)]
fn rev_nat(ctx: &TcContext, pkt: &Packet, flow: &Flow) -> Reason {
    let now = conntrack::now_ns();
    let Some(entry) = conntrack::lookup(flow, direction::REPLY, now) else {
        return pass_reason(flow);
    };
    if let Err(reason) = translatable(flow) {
        return reason;
    }
    let rewrite = Rewrite {
        source: Some((entry.nat_addr, entry.nat_port)),
        destination: (entry.flags & ct_flags::HAIRPIN != 0).then_some((flow.saddr, flow.dport)),
    };
    match nat::rewrite_tc(ctx, pkt, flow, &rewrite) {
        Ok(()) => Reason::RevNat,
        Err(_) => Reason::DropMalformed,
    }
}
