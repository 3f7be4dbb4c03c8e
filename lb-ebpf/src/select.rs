//! Backend choice for a new flow: the first non-empty tier, then a
//! pseudo-random slot in it. Tiers are computed in user space (KEP-3015
//! order: same node, same zone, all).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{Backend, Frontend, SlotKey};

use crate::maps::{BACKENDS, SLOTS};

/// A chosen backend and its stable id.
pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
}

/// Picks a backend of `frontend`, or `None` when it has none (or user space
/// is between writing the count and the slots, which make-before-break
/// updates avoid).
#[inline(always)]
pub fn select_backend(frontend: &Frontend) -> Option<Chosen> {
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
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        frontend_id: frontend.id,
        slot: first + random % len,
    };
    // SAFETY: plain values copied out at once.
    let id = unsafe { *SLOTS.get(slot)? };
    let backend = lookup_backend(id)?;
    Some(Chosen { id, backend })
}

/// The backend with stable id `id`, if it still exists.
#[inline(always)]
pub fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once; backends are immutable per id.
    unsafe { BACKENDS.get(id).copied() }
}
