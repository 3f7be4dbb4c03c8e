//! Conntrack: remembers which backend each flow was balanced to (forward
//! entry) and how its replies are translated back (reply entry).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    CT_REFRESH_NS, CtEntry, CtKey, PROTO_TCP, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN, ct_flags,
    ct_state, direction, port_host, port_raw,
};

use crate::{
    maps::CONNTRACK,
    packet::{Flow, tcp_flags},
    select::Chosen,
};

/// How many source ports SNAT tries before it gives up on a new flow.
const SNAT_TRIES: u32 = 8;

/// `CLOCK_MONOTONIC_COARSE`: a tick's precision is plenty for timeouts of
/// seconds and it costs far less than `bpf_ktime_get_ns`.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The key of `flow` as it is on the wire, in `direction`.
#[inline(always)]
fn key(flow: &Flow, direction: u8) -> CtKey {
    CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction,
        pad: 0,
    }
}

/// The live entry of `flow` in `direction`, refreshed by this packet.
/// Expired entries, and a SYN that reuses the tuple of a closing flow, miss.
#[inline(always)]
pub fn lookup(flow: &Flow, direction: u8, now: u64) -> Option<CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(key(flow, direction))?;
    // SAFETY: a valid map value pointer; concurrent writers only store whole
    // fields (state, timestamp), races between them are benign.
    let entry = unsafe { &mut *entry };
    if entry.is_expired(flow.proto, now) {
        return None;
    }
    let is_new_syn = flow.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    if is_new_syn && entry.state == ct_state::CLOSING {
        return None;
    }
    let state = next_state(entry.state, flow);
    if state != entry.state {
        entry.state = state;
    }
    if now.saturating_sub(entry.last_seen_ns) > CT_REFRESH_NS {
        entry.last_seen_ns = now;
    }
    Some(*entry)
}

/// TCP states as far as timeouts need them; UDP stays `NEW`.
#[inline(always)]
fn next_state(state: u8, flow: &Flow) -> u8 {
    if flow.proto != PROTO_TCP {
        return state;
    }
    if flow.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
        ct_state::CLOSING
    } else if state == ct_state::NEW && flow.tcp_flags & tcp_flags::ACK != 0 {
        ct_state::ESTABLISHED
    } else {
        state
    }
}

/// Records a new flow balanced to `chosen` and returns its forward entry.
///
/// The reply entry is written first, so a reply can never overtake it.
/// With `snat_addr` the backend sees that address as the source (a hairpin
/// flow, or an external flow to a remote backend), on a port that makes the
/// reply's tuple unique: the client's own when it is free (and, for an
/// external flow, in the SNAT range), otherwise a random one of the range.
#[inline(always)]
pub fn create(
    flow: &Flow,
    frontend_id: u32,
    chosen: &Chosen,
    flags: u8,
    snat_addr: Option<u32>,
    now: u64,
) -> Result<CtEntry, Reason> {
    let state = next_state(ct_state::NEW, flow);
    let mut reply = CtEntry {
        last_seen_ns: now,
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        state,
        flags,
        backend_id: chosen.id,
        frontend_id,
        peer_addr: 0,
        peer_port: 0,
        pad: 0,
    };
    let mut reply_key = CtKey {
        saddr: chosen.backend.addr,
        daddr: flow.saddr,
        sport: chosen.backend.port,
        dport: flow.sport,
        proto: flow.proto,
        direction: direction::REPLY,
        pad: 0,
    };
    let mut forward = CtEntry {
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        ..reply
    };
    match snat_addr {
        None => {
            CONNTRACK
                .insert(reply_key, reply, 0)
                .map_err(|_| Reason::DropConntrackFull)?;
        }
        Some(addr) => {
            reply.flags |= ct_flags::SNAT;
            reply.peer_addr = flow.saddr;
            reply.peer_port = flow.sport;
            reply_key.daddr = addr;
            let keep_port = flags & ct_flags::HAIRPIN != 0 || in_snat_range(flow.sport);
            let port = insert_snat_reply(&mut reply_key, &reply, keep_port, now)?;
            forward.flags |= ct_flags::SNAT;
            forward.peer_addr = addr;
            forward.peer_port = port;
        }
    }
    CONNTRACK
        .insert(key(flow, direction::FORWARD), forward, 0)
        .map_err(|_| Reason::DropConntrackFull)?;
    Ok(forward)
}

#[inline(always)]
fn in_snat_range(port: u16) -> bool {
    let port = port_host(port);
    (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port)
}

/// Writes the reply entry of a SNATed flow on the first port whose tuple
/// is free (or held by an expired entry, or by an earlier flow of the same
/// client tuple), trying the key's own port first when `keep_port`.
/// Returns that port.
#[inline(always)]
fn insert_snat_reply(
    key: &mut CtKey,
    reply: &CtEntry,
    keep_port: bool,
    now: u64,
) -> Result<u16, Reason> {
    for attempt in 0..SNAT_TRIES {
        if attempt > 0 || !keep_port {
            // SAFETY: a helper without arguments.
            let random = unsafe { bpf_get_prandom_u32() };
            let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
            key.dport = port_raw(SNAT_PORT_MIN + (random % span) as u16);
        }
        // Atomic: two CPUs never take the same tuple.
        if CONNTRACK.insert(*key, reply, BPF_NOEXIST as u64).is_ok() {
            return Ok(key.dport);
        }
        // Free to take: expired, or held by an earlier flow of this very
        // client tuple (a connection reopened on the same port).
        // SAFETY: copied out at once.
        let stale = unsafe { CONNTRACK.get(*key) }.is_none_or(|held| {
            held.is_expired(key.proto, now)
                || (held.peer_addr == reply.peer_addr && held.peer_port == reply.peer_port)
        });
        if stale && CONNTRACK.insert(*key, reply, 0).is_ok() {
            return Ok(key.dport);
        }
    }
    Err(Reason::DropNoSnatPort)
}
