//! Backend choice for a new flow: the first non-empty tier (computed in
//! user space in KEP-3015 order: same node, same zone, all); in it the
//! client's affinity backend when the frontend has ClientIP affinity and
//! the entry is still good, otherwise a pseudo-random slot. One module for
//! both paths: per packet the client is its address, at the socket its
//! network namespace.

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::LruHashMap};
use lb_common::{AffinityEntry, AffinityKey, Backend, Frontend, SlotKey, SockAffinityKey};

use crate::maps::{AFFINITY, BACKENDS, SLOTS, SOCK_AFFINITY};

/// Who ClientIP affinity remembers, and where.
pub trait Client {
    type Key: 'static;
    /// The affinity key of this client for frontend `frontend_id`.
    fn key(&self, frontend_id: u32) -> Self::Key;
    /// The affinity map of this kind of client.
    fn map() -> &'static LruHashMap<Self::Key, AffinityEntry>;
}

/// A client known by its address (the per-packet path), wire order.
pub struct ClientAddr(pub u32);

impl Client for ClientAddr {
    type Key = AffinityKey;
    #[inline(always)]
    fn key(&self, frontend_id: u32) -> AffinityKey {
        AffinityKey {
            frontend_id,
            client_addr: self.0,
        }
    }
    #[inline(always)]
    fn map() -> &'static LruHashMap<AffinityKey, AffinityEntry> {
        &AFFINITY
    }
}

/// A client known by its network namespace's cookie (the socket path:
/// the source address is not chosen yet at `connect()`).
pub struct ClientNetns(pub u64);

impl Client for ClientNetns {
    type Key = SockAffinityKey;
    #[inline(always)]
    fn key(&self, frontend_id: u32) -> SockAffinityKey {
        SockAffinityKey {
            netns_cookie: self.0,
            frontend_id,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn map() -> &'static LruHashMap<SockAffinityKey, AffinityEntry> {
        &SOCK_AFFINITY
    }
}

/// A chosen backend, its stable id and the slot it came from.
pub struct Chosen {
    pub id: u32,
    pub slot: u32,
    pub backend: Backend,
}

/// Picks a backend of `frontend` for a new flow of `client`, or `None`
/// when it has none (or user space is between writing the count and the
/// slots, which make-before-break updates avoid).
#[inline(always)]
pub fn select_backend<C: Client>(frontend: &Frontend, client: C, now: u64) -> Option<Chosen> {
    let [t0, t1, t2] = frontend.tier_len;
    let (first, len) = if t0 > 0 {
        (0, t0 as u32)
    } else if t1 > 0 {
        (t0 as u32, t1 as u32)
    } else if t2 > 0 {
        (t0 as u32 + t1 as u32, t2 as u32)
    } else {
        return None;
    };
    let sticky = frontend.affinity_timeout_s != 0;
    let key = client.key(frontend.id);
    if sticky && let Some(chosen) = affinity_backend::<C>(frontend, &key, first, len, now) {
        return Some(chosen);
    }
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let chosen = backend_in_slot(frontend.id, first + random % len)?;
    if sticky {
        let entry = AffinityEntry {
            last_used_ns: now,
            backend_id: chosen.id,
            slot: chosen.slot,
        };
        // A failed write only costs stickiness for this client.
        let _ = C::map().insert(key, entry, 0);
    }
    Some(chosen)
}

/// The client's affinity backend, when its entry has not timed out and its
/// slot, still in the active tier, still holds that backend. Refreshes the
/// entry: the timeout runs from the client's last new connection.
#[inline(always)]
fn affinity_backend<C: Client>(
    frontend: &Frontend,
    key: &C::Key,
    first: u32,
    len: u32,
    now: u64,
) -> Option<Chosen> {
    let entry = C::map().get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer; racing writers store whole fields.
    let entry = unsafe { &mut *entry };
    let timeout_ns = frontend.affinity_timeout_s as u64 * 1_000_000_000;
    if now.saturating_sub(entry.last_used_ns) > timeout_ns
        || entry.slot < first
        || entry.slot >= first + len
    {
        return None;
    }
    let chosen = backend_in_slot(frontend.id, entry.slot)?;
    if chosen.id != entry.backend_id {
        return None;
    }
    entry.last_used_ns = now;
    Some(chosen)
}

/// The backend in `slot` of frontend `frontend_id`.
#[inline(always)]
fn backend_in_slot(frontend_id: u32, slot: u32) -> Option<Chosen> {
    let key = SlotKey { frontend_id, slot };
    // SAFETY: plain values copied out at once.
    let id = unsafe { *SLOTS.get(key)? };
    let backend = lookup_backend(id)?;
    Some(Chosen { id, slot, backend })
}

/// The backend with stable id `id`, if it still exists.
#[inline(always)]
pub fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once; backends are immutable per id.
    unsafe { BACKENDS.get(id).copied() }
}
