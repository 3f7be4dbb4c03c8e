//! Conntrack: remembers which backend each flow was balanced to (forward
//! entry) and which frontend its replies must appear to come from (reply
//! entry).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    CT_REFRESH_NS, CtEntry, CtKey, HAIRPIN_ADDR, PROTO_TCP, ct_flags, ct_state, direction,
};

use crate::{
    maps::CONNTRACK,
    packet::{Flow, tcp_flags},
    select::Chosen,
};

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

/// Records a new flow balanced to `chosen`: the reply entry first, so a
/// reply can never overtake its rev-NAT entry, then the forward entry. A
/// hairpin flow's replies go to [`HAIRPIN_ADDR`], the source its backend
/// sees.
#[inline(always)]
pub fn create(
    flow: &Flow,
    frontend_id: u32,
    chosen: &Chosen,
    flags: u8,
    now: u64,
) -> Result<(), i32> {
    let state = next_state(ct_state::NEW, flow);
    let reply_key = CtKey {
        saddr: chosen.backend.addr,
        daddr: if flags & ct_flags::HAIRPIN != 0 {
            HAIRPIN_ADDR
        } else {
            flow.saddr
        },
        sport: chosen.backend.port,
        dport: flow.sport,
        proto: flow.proto,
        direction: direction::REPLY,
        pad: 0,
    };
    let reply = CtEntry {
        last_seen_ns: now,
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        state,
        flags,
        backend_id: chosen.id,
        frontend_id,
    };
    CONNTRACK.insert(reply_key, reply, 0)?;
    let forward = CtEntry {
        nat_addr: chosen.backend.addr,
        nat_port: chosen.backend.port,
        ..reply
    };
    CONNTRACK.insert(key(flow, direction::FORWARD), forward, 0)
}
