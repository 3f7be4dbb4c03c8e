//! ClientIP session affinity: which backend a client last got, per frontend.

use crate::map_type;

/// Key of the affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// [`crate::Frontend::id`].
    pub frontend_id: u32,
    /// The client's address, wire order.
    pub client_addr: u32,
}
map_type!(AffinityKey, 8);

/// Value of the affinity map.
///
/// The slot is kept beside the backend id: the entry is honoured only while
/// that slot of the frontend's active tier still holds that backend, so a
/// removed backend (or one that left the tier) is never chosen again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    /// When the client last opened a connection through it
    /// (`CLOCK_MONOTONIC_COARSE`, ns).
    pub last_used_ns: u64,
    /// The backend chosen.
    pub backend_id: u32,
    /// The slot it was chosen from.
    pub slot: u32,
}
map_type!(AffinityEntry, 16);
