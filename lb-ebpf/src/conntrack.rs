//! Conntrack: remembers which backend each flow was balanced to (forward
//! entry) and how its replies are translated back (reply entry).
//!
//! A flow is created atomically across CPUs: its forward entry goes in with
//! `BPF_NOEXIST`, and a CPU that loses the race adopts the winner's entry,
//! so one flow never splits over two backends. SNAT ports are taken the
//! same way, on the reply entry's tuple, and never overwritten — but for a
//! closed flow's, which a new connection claims with a compare-and-swap.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    CT_REFRESH_NS, CtEntry, CtKey, PROTO_TCP, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN, ct_event,
    ct_flags, ct_state, direction, port_host, port_raw,
};

use crate::{
    maps::{CONNTRACK, CONNTRACK_EVENTS},
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

/// The key of the other direction's entry of the flow `entry` (found under
/// `flow` in `direction`) belongs to.
#[inline(always)]
fn peer_key(flow: &Flow, direction: u8, entry: &CtEntry) -> CtKey {
    let snat = entry.flags & ct_flags::SNAT != 0;
    if direction == direction::FORWARD {
        // The backend answers the client, or the node's SNAT end.
        CtKey {
            saddr: entry.nat_addr,
            daddr: if snat { entry.peer_addr } else { flow.saddr },
            sport: entry.nat_port,
            dport: if snat { entry.peer_port } else { flow.sport },
            proto: flow.proto,
            direction: direction::REPLY,
            pad: 0,
        }
    } else {
        // The client addressed the frontend.
        CtKey {
            saddr: if snat { entry.peer_addr } else { flow.daddr },
            daddr: entry.nat_addr,
            sport: if snat { entry.peer_port } else { flow.dport },
            dport: entry.nat_port,
            proto: flow.proto,
            direction: direction::FORWARD,
            pad: 0,
        }
    }
}

/// What conntrack holds for a packet.
pub enum Found {
    /// A live entry, refreshed by this packet.
    Live(CtEntry),
    /// An entry that no longer counts: expired, or a closing flow whose
    /// tuple a new SYN reuses. A new flow replaces it.
    Stale(CtEntry),
    /// Nothing.
    Missing,
}

/// The entry of `flow` in `direction`, refreshed by this packet; a FIN or
/// RST moves the flow's other entry on too.
#[inline(always)]
pub fn lookup(flow: &Flow, direction: u8, now: u64) -> Found {
    let Some(entry) = CONNTRACK.get_ptr_mut(key(flow, direction)) else {
        return Found::Missing;
    };
    // SAFETY: a valid map value pointer; concurrent writers only store whole
    // fields (state, timestamp), races between them are benign.
    let entry = unsafe { &mut *entry };
    if entry.is_expired(flow.proto, now) {
        return Found::Stale(*entry);
    }
    // A SYN, or a SYN-ACK, against a closed flow opens another connection
    // on the same tuple: a new flow's, or — for the SYN-ACK — one the
    // socket path made to the backend itself, which must not be
    // translated as the old flow's reply.
    let opens = flow.tcp_flags & tcp_flags::SYN != 0;
    if opens && entry.state == ct_state::CLOSING {
        return Found::Stale(*entry);
    }
    if flow.proto == PROTO_TCP {
        track_tcp(flow, direction, entry, now);
    } else {
        track_udp(flow, direction, entry);
    }
    if now.saturating_sub(entry.last_seen_ns) > CT_REFRESH_NS {
        entry.last_seen_ns = now;
    }
    Found::Live(*entry)
}

/// TCP states as far as timeouts need them. A FIN closes one direction;
/// the flow is closing once both directions sent theirs, or at the first
/// RST: then both entries go to `CLOSING`, whichever direction saw it.
#[inline(always)]
fn track_tcp(flow: &Flow, direction: u8, entry: &mut CtEntry, now: u64) {
    let fin_or_rst = flow.tcp_flags & (tcp_flags::FIN | tcp_flags::RST);
    if fin_or_rst == 0 {
        if entry.state == ct_state::NEW && flow.tcp_flags & tcp_flags::ACK != 0 {
            entry.state = ct_state::ESTABLISHED;
        }
        return;
    }
    // Rare (once or twice a flow): the other entry is looked up only here.
    let peer = CONNTRACK.get_ptr_mut(peer_key(flow, direction, entry));
    // SAFETY: as in `lookup`.
    let peer = peer.map(|p| unsafe { &mut *p });
    let peer_fin = peer
        .as_ref()
        .is_some_and(|p| p.state == ct_state::FIN_SENT || p.state == ct_state::CLOSING);
    if fin_or_rst & tcp_flags::RST != 0 || peer_fin {
        // Both live their closing time from now, however long either
        // direction was idle.
        entry.state = ct_state::CLOSING;
        entry.last_seen_ns = now;
        if let Some(peer) = peer {
            peer.state = ct_state::CLOSING;
            peer.last_seen_ns = now;
        }
    } else if entry.state != ct_state::CLOSING {
        entry.state = ct_state::FIN_SENT;
    }
}

/// UDP has no states of its own; netfilter's are copied for timeouts: a
/// flow becomes a stream (both entries `ESTABLISHED`, 120 s) when the
/// client speaks again after a reply; before that (a query and its answer)
/// it lives 30 s. The other entry is looked up twice a flow at most.
#[inline(always)]
fn track_udp(flow: &Flow, direction: u8, entry: &mut CtEntry) {
    let next = match (direction, entry.state) {
        (direction::REPLY, ct_state::NEW) => ct_state::REPLIED,
        (direction::FORWARD, ct_state::REPLIED) => ct_state::ESTABLISHED,
        _ => return,
    };
    entry.state = next;
    if let Some(peer) = CONNTRACK.get_ptr_mut(peer_key(flow, direction, entry)) {
        // SAFETY: as in `lookup`.
        unsafe { (*peer).state = next };
    }
}

/// The state a flow's entries start in: its first packet may be more than
/// a SYN (a flow picked up mid-stream, or UDP).
#[inline(always)]
fn first_state(flow: &Flow) -> u8 {
    if flow.proto != PROTO_TCP {
        ct_state::NEW
    } else if flow.tcp_flags & tcp_flags::RST != 0 {
        ct_state::CLOSING
    } else if flow.tcp_flags & tcp_flags::FIN != 0 {
        ct_state::FIN_SENT
    } else if flow.tcp_flags & tcp_flags::ACK != 0 {
        ct_state::ESTABLISHED
    } else {
        ct_state::NEW
    }
}

/// A flow as [`create`] left it.
pub struct Created {
    /// Its forward entry.
    pub entry: CtEntry,
    /// Another CPU created the same flow first: this is its entry.
    pub adopted: bool,
}

/// Records a new flow balanced to `chosen` and returns its forward entry,
/// or the entry of the CPU that created the same flow first.
///
/// `replaced`: the flow this one replaces under the same forward key, a
/// stale one (see [`Found::Stale`]) or one that must move (a UDP flow whose
/// backend drains). Its entries are rewritten in place; its SNAT port is
/// given back first, so a client that reopens from the same port gets the
/// same one. With `snat_addr` the backend sees that address as the source
/// (a hairpin flow, or an external flow to a remote backend), on a port
/// that makes the reply's tuple unique: the client's own when it is free
/// (and, for an external flow, in the SNAT range), otherwise a random one
/// of the range.
#[inline(always)]
pub fn create(
    flow: &Flow,
    frontend_id: u32,
    chosen: &Chosen,
    flags: u8,
    snat_addr: Option<u32>,
    replaced: Option<&CtEntry>,
    now: u64,
) -> Result<Created, Reason> {
    let state = first_state(flow);
    let mut reply = CtEntry {
        last_seen_ns: now,
        nat_addr: flow.daddr,
        nat_port: flow.dport,
        // The client's FIN closed its own direction only.
        state: if state == ct_state::FIN_SENT {
            ct_state::ESTABLISHED
        } else {
            state
        },
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
        state,
        ..reply
    };
    let forward_key = key(flow, direction::FORWARD);
    if let Some(addr) = snat_addr {
        if let Some(old) = replaced {
            release_snat_port(flow, old);
        }
        reply.flags |= ct_flags::SNAT;
        reply.peer_addr = flow.saddr;
        reply.peer_port = flow.sport;
        reply_key.daddr = addr;
        let keep_port = flags & ct_flags::HAIRPIN != 0 || in_snat_range(flow.sport);
        let opens = flow.proto == PROTO_TCP && flow.tcp_flags & tcp_flags::SYN != 0;
        let port = take_snat_port(&mut reply_key, &reply, keep_port, opens)?;
        forward.flags |= ct_flags::SNAT;
        forward.peer_addr = addr;
        forward.peer_port = port;
    }
    let written = if replaced.is_some() {
        rewrite(&forward_key, &forward) || insert_new(&forward_key, &forward)
    } else {
        insert_new(&forward_key, &forward)
    };
    if !written {
        if snat_addr.is_some() {
            // Our SNAT port goes back: the winner has its own.
            remove(&reply_key);
        }
        return adopt(&forward_key);
    }
    // Without SNAT the reply entry follows the won forward entry (the
    // packet is not out yet, so no reply can come first). Its tuple may be
    // held by another frontend's flow of the same client port and backend:
    // the newer flow's replies win.
    if snat_addr.is_none()
        && !rewrite(&reply_key, &reply)
        && !insert_new(&reply_key, &reply)
        && CONNTRACK.insert(reply_key, reply, BPF_ANY as u64).is_err()
    {
        remove(&forward_key);
        return Err(Reason::DropConntrackFull);
    }
    Ok(Created {
        entry: forward,
        adopted: false,
    })
}

/// Atomically replaces `*word` with `new` if it holds `old`; whether it did.
/// The BPF target's spec has no compare-and-swap (the kernel has had it
/// since 5.12), so there it is the intrinsic (the build sets
/// RUSTC_BOOTSTRAP for `build-std` already); host builds (checks only) use
/// the standard atomic.
///
/// # Safety
/// `word` is valid and 8-byte aligned.
#[inline(always)]
unsafe fn compare_and_swap(word: *mut u64, old: u64, new: u64) -> bool {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's.
    let (_, swapped) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(word, old, new)
    };
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's.
    let swapped = unsafe { core::sync::atomic::AtomicU64::from_ptr(word) }
        .compare_exchange(
            old,
            new,
            core::sync::atomic::Ordering::SeqCst,
            core::sync::atomic::Ordering::Relaxed,
        )
        .is_ok();
    swapped
}

/// Gives back the SNAT port of `old`, the flow a new one replaces, while
/// its reply entry is still that flow's (the tuple may have passed to
/// another flow since it expired).
#[inline(always)]
fn release_snat_port(flow: &Flow, old: &CtEntry) {
    if old.flags & ct_flags::SNAT == 0 {
        return;
    }
    let reply_key = peer_key(flow, direction::FORWARD, old);
    // SAFETY: copied out at once.
    let ours = unsafe { CONNTRACK.get(reply_key) }.is_some_and(|reply| {
        reply.peer_addr == flow.saddr
            && reply.peer_port == flow.sport
            && reply.nat_addr == flow.daddr
            && reply.nat_port == flow.dport
    });
    if ours {
        remove(&reply_key);
    }
}

/// Rewrites the entry under `key` in place, when there is one: no new
/// element, no eviction. The timestamp goes last, so a reader racing with
/// the write sees the old (stale) entry until the new one is whole. Two
/// CPUs replacing the same stale flow at once both write; the last one
/// stays (rare: a stale tuple's first packets on two CPUs at once).
#[inline(always)]
fn rewrite(key: &CtKey, entry: &CtEntry) -> bool {
    let Some(held) = CONNTRACK.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid map value pointer; fields are stored whole, in this
    // order (volatile: the compiler keeps it; BPF has no fences).
    unsafe {
        let held = &mut *held;
        core::ptr::write_volatile(&mut held.nat_addr, entry.nat_addr);
        core::ptr::write_volatile(&mut held.nat_port, entry.nat_port);
        core::ptr::write_volatile(&mut held.flags, entry.flags);
        core::ptr::write_volatile(&mut held.backend_id, entry.backend_id);
        core::ptr::write_volatile(&mut held.frontend_id, entry.frontend_id);
        core::ptr::write_volatile(&mut held.peer_addr, entry.peer_addr);
        core::ptr::write_volatile(&mut held.peer_port, entry.peer_port);
        core::ptr::write_volatile(&mut held.state, entry.state);
        core::ptr::write_volatile(&mut held.last_seen_ns, entry.last_seen_ns);
    }
    true
}

/// The forward entry another CPU created first (or, when there is none,
/// the map refused the write: full).
#[inline(always)]
fn adopt(forward_key: &CtKey) -> Result<Created, Reason> {
    // SAFETY: copied out at once.
    match unsafe { CONNTRACK.get(forward_key) } {
        Some(entry) => Ok(Created {
            entry: *entry,
            adopted: true,
        }),
        None => Err(Reason::DropConntrackFull),
    }
}

/// Adds an entry that is not there yet (`BPF_NOEXIST`), counted.
#[inline(always)]
fn insert_new(key: &CtKey, entry: &CtEntry) -> bool {
    let added = CONNTRACK.insert(key, entry, BPF_NOEXIST as u64).is_ok();
    if added {
        count(ct_event::CREATED);
    }
    added
}

/// Removes an entry this program added, counted.
#[inline(always)]
fn remove(key: &CtKey) {
    if CONNTRACK.remove(key).is_ok() {
        count(ct_event::REMOVED);
    }
}

#[inline(always)]
fn count(event: u32) {
    if let Some(counter) = CONNTRACK_EVENTS.get_ptr_mut(event) {
        // SAFETY: per-CPU value: no other writer while this program runs on
        // this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn in_snat_range(port: u16) -> bool {
    let port = port_host(port);
    (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port)
}

/// Writes the reply entry of a SNATed flow on the first port whose tuple
/// nobody holds — or, for a new TCP connection (`opens`), whose flow is
/// closed — trying the key's own port first when `keep_port`, and returns
/// that port. A free tuple is taken with a `BPF_NOEXIST` write, a closed
/// one with a compare-and-swap ([`take_over_closed`]): two flows never
/// share one.
#[inline(always)]
fn take_snat_port(
    key: &mut CtKey,
    reply: &CtEntry,
    keep_port: bool,
    opens: bool,
) -> Result<u16, Reason> {
    for attempt in 0..SNAT_TRIES {
        if attempt > 0 || !keep_port {
            // SAFETY: a helper without arguments.
            let random = unsafe { bpf_get_prandom_u32() };
            let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
            key.dport = port_raw(SNAT_PORT_MIN + (random % span) as u16);
        }
        if insert_new(key, reply) || (opens && take_over_closed(key, reply)) {
            return Ok(key.dport);
        }
    }
    Err(Reason::DropNoSnatPort)
}

/// Takes over the reply entry under `key` when its flow is closed (both
/// FINs, or an RST): the backend is done with the tuple, and a new TCP
/// connection may have it, as netfilter lets a SYN reuse a closing
/// connection's NAT tuple. Without this, closed flows would hold the SNAT
/// range's 4,536 ports to one backend for their 2 s each, capping new
/// connections to it through SNAT near 2,000 a second.
///
/// The claim is a compare-and-swap of the 64-bit word holding the entry's
/// address, port, state and flags, from the closed state the caller saw to
/// the new flow's: of CPUs racing for one tuple only one wins, and the
/// others see a state that is no longer closed. The rest is written in
/// place after, the timestamp last (no reply can come before the SYN is
/// out). The old flow's forward entry goes, as netfilter kills the old
/// connection: a late packet of the old client starts a flow of its own
/// instead of reaching the backend on the new connection's tuple. An
/// expired entry is left to the agent's walk, which deletes it (taking it
/// over would race with that delete).
#[inline(always)]
fn take_over_closed(key: &CtKey, entry: &CtEntry) -> bool {
    let Some(held) = CONNTRACK.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid map value pointer; copied out (a torn copy only
    // fails the checks below, or names a forward entry that is checked).
    let old = unsafe { *held };
    if old.is_expired(key.proto, entry.last_seen_ns) {
        return false;
    }
    // SAFETY: a valid map value pointer; `nat_addr`, `nat_port`, `state`
    // and `flags` form the aligned 64-bit word at offset 8 (`CtEntry` is
    // repr(C), 8-byte aligned).
    let word = unsafe { core::ptr::addr_of_mut!((*held).nat_addr).cast::<u64>() };
    // SAFETY: as above.
    let seen = unsafe { core::ptr::read_volatile(word) };
    if seen.to_ne_bytes()[6] != ct_state::CLOSING {
        return false;
    }
    let mut claimed = [0u8; 8];
    claimed[..4].copy_from_slice(&entry.nat_addr.to_ne_bytes());
    claimed[4..6].copy_from_slice(&entry.nat_port.to_ne_bytes());
    claimed[6] = entry.state;
    claimed[7] = entry.flags;
    // SAFETY: as above.
    let won = unsafe { compare_and_swap(word, seen, u64::from_ne_bytes(claimed)) };
    if !won {
        return false;
    }
    // SAFETY: as above; fields stored whole (volatile: kept, in order).
    unsafe {
        let held = &mut *held;
        core::ptr::write_volatile(&mut held.backend_id, entry.backend_id);
        core::ptr::write_volatile(&mut held.frontend_id, entry.frontend_id);
        core::ptr::write_volatile(&mut held.peer_addr, entry.peer_addr);
        core::ptr::write_volatile(&mut held.peer_port, entry.peer_port);
        core::ptr::write_volatile(&mut held.last_seen_ns, entry.last_seen_ns);
    }
    // The old flow's forward entry, while it still sends to this tuple
    // (its client may have reopened from the same port meanwhile).
    let old_forward = CtKey {
        saddr: old.peer_addr,
        daddr: old.nat_addr,
        sport: old.peer_port,
        dport: old.nat_port,
        proto: key.proto,
        direction: direction::FORWARD,
        pad: 0,
    };
    // SAFETY: copied out at once.
    let still_ours = unsafe { CONNTRACK.get(old_forward) }.is_some_and(|forward| {
        forward.nat_addr == key.saddr
            && forward.nat_port == key.sport
            && forward.peer_addr == key.daddr
            && forward.peer_port == key.dport
    });
    if still_ours {
        remove(&old_forward);
    }
    true
}
