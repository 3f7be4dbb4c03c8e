//! The load-balancing pipeline, in the order the problem reads:
//! parse → frontend lookup → conntrack → select backend → NAT decision.
//!
//! Everything here is the same for every hook: it reads the flow and the
//! maps and says what to do. The hooks (`tc`, `xdp`) apply the verdict
//! with what their context allows.

use lb_common::{
    CtEntry, Frontend, HAIRPIN_ADDR, PROTO_TCP, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN, addr_filter,
    backend_flags, ct_flags, direction, frontend_flags, port_host, scope,
};

use crate::{
    conntrack::{self, Created, Found},
    frontend,
    nat::{NewEnd, Rewrite},
    packet::{Flow, Fragment},
    select,
};

/// The node address external flows to remote backends are SNATed to (wire
/// order), set by the loader; 0 turns SNAT off.
#[unsafe(no_mangle)]
static XLB_SNAT_ADDR: u32 = 0;

#[inline(always)]
fn snat_addr() -> u32 {
    // SAFETY: a read-only global the loader fills in; volatile so the
    // compiler does not fold the 0 it was compiled with.
    unsafe { core::ptr::read_volatile(&XLB_SNAT_ADDR) }
}

/// The packet tests' seam for the flow-creation race: non-zero makes the
/// forward lookup of every packet miss, as on a CPU that looked up just
/// before another CPU inserted the same flow, so that a test can run the
/// loser against the winner's entry. The agent never sets it; the
/// verifier sees a frozen read-only 0 and prunes the branch.
#[unsafe(no_mangle)]
static XLB_LOSE_FLOW_RACE: u8 = 0;

#[inline(always)]
fn lose_flow_race() -> bool {
    // SAFETY: as `snat_addr`.
    unsafe { core::ptr::read_volatile(&XLB_LOSE_FLOW_RACE) != 0 }
}

/// A translation the hook must apply.
#[derive(Clone, Copy)]
pub struct Translation {
    /// The counter it goes under.
    pub reason: Reason,
    pub rewrite: Rewrite,
    /// Forward it by route lookup instead of handing it to the stack: its
    /// new source is the node's or a frontend's address, which the stack
    /// would drop as a martian.
    pub route: bool,
}

/// What the pipeline decided for one packet.
pub enum Verdict {
    /// Not ours, or nothing to change: leave it untouched.
    Pass(Reason),
    /// Addressed to a frontend but refused.
    Drop(Reason),
    /// Addressed to a frontend without a backend to choose: with `drop`
    /// (a Local policy without local endpoints) drop, otherwise reject.
    NoBackend {
        drop: bool,
    },
    Translate(Translation),
}

/// Why a packet that is not load balanced passes.
#[inline(always)]
pub fn pass_reason(flow: &Flow) -> Reason {
    if flow.is_complete {
        Reason::PassNotLoadBalanced
    } else {
        Reason::PassMalformed
    }
}

/// A load-balanced packet is translated only with its whole L4 header (a
/// later fragment has none, and needs none): rewriting a truncated one
/// would corrupt it.
#[inline(always)]
fn translatable(flow: &Flow) -> Result<(), Reason> {
    if flow.is_complete {
        Ok(())
    } else {
        Err(Reason::DropMalformed)
    }
}

/// A pod's packet (TC ingress of its veth): balanced when it is addressed
/// to a frontend; translated back when it is a reply this node must
/// translate itself (hairpin, external flows to a local backend).
///
/// Runs only for packets [`from_pod_may_be_ours`] lets through.
#[inline(always)]
pub fn from_pod(flow: &Flow) -> Verdict {
    match frontend::lookup(flow, scope::INTERNAL) {
        Some(frontend) => balance(flow, &frontend, false),
        None => reply(flow, ct_flags::SNAT | ct_flags::EXTERNAL),
    }
}

/// A packet delivered to a pod (TC egress of its veth): translated back
/// when it is the reply of a load-balanced flow. Runs only for packets
/// [`to_pod_may_be_ours`] lets through.
#[inline(always)]
pub fn to_pod(flow: &Flow) -> Verdict {
    reply(flow, 0)
}

/// The pre-filter of [`from_pod`]: a packet whose destination no frontend
/// has and whose source no backend has (a reply's source is its backend)
/// needs neither lookup — pod-to-pod traffic, and the packets a client
/// sends on a connection the socket path translated. One array lookup per
/// address.
#[inline(always)]
pub fn from_pod_may_be_ours(flow: &Flow) -> bool {
    frontend::may_be(addr_filter::FRONTENDS, flow.daddr)
        || frontend::may_be(addr_filter::BACKENDS, flow.saddr)
}

/// The pre-filter of [`to_pod`]: only a backend's packet can be a reply.
#[inline(always)]
pub fn to_pod_may_be_ours(flow: &Flow) -> bool {
    frontend::may_be(addr_filter::BACKENDS, flow.saddr)
}

/// Every packet from outside goes through [`from_outside`].
#[inline(always)]
pub fn all(_flow: &Flow) -> bool {
    true
}

/// A packet arriving from outside (external interface, TC or XDP):
/// balanced when it is addressed to a NodePort, LoadBalancer or external
/// IP; translated back when it is a backend's reply to a SNATed flow.
#[inline(always)]
pub fn from_outside(flow: &Flow) -> Verdict {
    if let Some(frontend) = frontend::lookup(flow, scope::EXTERNAL) {
        return balance(flow, &frontend, true);
    }
    let port = port_host(flow.dport);
    if flow.daddr == snat_addr() && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port) {
        return reply(flow, ct_flags::SNAT);
    }
    Verdict::Pass(pass_reason(flow))
}

/// DNAT of a packet addressed to `frontend`: the flow's backend from
/// conntrack, or a new choice. `external`: the client is outside the
/// cluster, so a remote backend gets the flow SNATed to this node.
#[inline(always)]
fn balance(flow: &Flow, frontend: &Frontend, external: bool) -> Verdict {
    if !frontend::admits(frontend, flow.saddr) {
        return Verdict::Drop(Reason::DropSourceRange);
    }
    if let Err(reason) = translatable(flow) {
        return Verdict::Drop(reason);
    }
    let now = conntrack::now_ns();
    let found = if lose_flow_race() {
        Found::Missing
    } else {
        conntrack::lookup(flow, direction::FORWARD, now)
    };
    if flow.is_icmp_error() {
        // About a reply of a flow: translated like the flow, never one of
        // its own.
        return match found {
            Found::Live(entry) => translate_forward(&entry, Reason::IcmpError),
            _ => Verdict::Pass(Reason::PassNotLoadBalanced),
        };
    }
    if flow.fragment == Fragment::Later {
        // Follows its first fragment's flow; one datagram never splits.
        return match found {
            Found::Live(entry) => translate_forward(&entry, Reason::ForwardEstablished),
            _ => Verdict::Pass(Reason::PassFragment),
        };
    }
    let replaced = match found {
        Found::Live(entry) if keeps_backend(flow, &entry) => {
            return translate_forward(&entry, Reason::ForwardEstablished);
        }
        Found::Missing => None,
        Found::Live(entry) | Found::Stale(entry) => Some(entry),
    };
    let Some(chosen) = select::select_backend(frontend, select::ClientAddr(flow.saddr), now) else {
        return Verdict::NoBackend {
            drop: frontend.flags & frontend_flags::DROP_WHEN_EMPTY != 0,
        };
    };
    let (flags, snat) = if chosen.backend.addr == flow.saddr {
        // Balanced to itself: the pod must see another source, or it would
        // drop the packet as its own.
        (ct_flags::HAIRPIN, Some(HAIRPIN_ADDR))
    } else if external {
        let node = snat_addr();
        let remote = chosen.backend.flags & backend_flags::LOCAL == 0;
        (ct_flags::EXTERNAL, (remote && node != 0).then_some(node))
    } else {
        (0, None)
    };
    match conntrack::create(
        flow,
        frontend.id,
        &chosen,
        flags,
        snat,
        replaced.as_ref(),
        now,
    ) {
        Ok(Created {
            entry,
            adopted: false,
        }) => translate_forward(&entry, Reason::ForwardNew),
        Ok(Created {
            entry,
            adopted: true,
        }) => translate_forward(&entry, Reason::ForwardEstablished),
        Err(reason) => Verdict::Drop(reason),
    }
}

/// Whether an established flow stays on its backend: a TCP flow always (its
/// backend is kept while conntrack names it, draining or not); a UDP flow
/// while its backend is in service — otherwise its next datagram picks a
/// live one, as kube-proxy flushes the UDP entries of removed endpoints.
#[inline(always)]
fn keeps_backend(flow: &Flow, entry: &CtEntry) -> bool {
    flow.proto == PROTO_TCP
        || select::lookup_backend(entry.backend_id)
            .is_some_and(|backend| backend.flags & backend_flags::DRAINING == 0)
}

/// The DNAT (and SNAT) of a packet of the flow whose forward entry is
/// `entry`.
#[inline(always)]
fn translate_forward(entry: &CtEntry, reason: Reason) -> Verdict {
    let snat = entry.flags & ct_flags::SNAT != 0;
    Verdict::Translate(Translation {
        reason,
        rewrite: Rewrite {
            destination: NewEnd::to(entry.nat_addr, entry.nat_port),
            source: NewEnd::to_if(snat, entry.peer_addr, entry.peer_port),
        },
        route: snat && entry.flags & ct_flags::EXTERNAL != 0,
    })
}

/// Rev-NAT of a reply: its source becomes the frontend again, and the
/// destination the client when the flow was SNATed. Only entries with one
/// of `wanted` flags are translated here (0: any).
#[inline(always)]
fn reply(flow: &Flow, wanted: u8) -> Verdict {
    let now = conntrack::now_ns();
    let Found::Live(entry) = conntrack::lookup(flow, direction::REPLY, now) else {
        return Verdict::Pass(pass_reason(flow));
    };
    if wanted != 0 && entry.flags & wanted == 0 {
        return Verdict::Pass(pass_reason(flow));
    }
    if let Err(reason) = translatable(flow) {
        return Verdict::Drop(reason);
    }
    let snat = entry.flags & ct_flags::SNAT != 0;
    let reason = if flow.is_icmp_error() {
        Reason::IcmpError
    } else {
        Reason::RevNat
    };
    Verdict::Translate(Translation {
        reason,
        rewrite: Rewrite {
            source: NewEnd::to(entry.nat_addr, entry.nat_port),
            destination: NewEnd::to_if(snat, entry.peer_addr, entry.peer_port),
        },
        route: entry.flags & ct_flags::EXTERNAL != 0,
    })
}
