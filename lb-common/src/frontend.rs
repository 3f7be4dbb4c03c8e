//! Frontends (what clients address), their backend slots and the backends.

use crate::map_type;

/// Who reaches a frontend. NodePort, LoadBalancer and external IP addresses
/// have one frontend in each scope, since pods and outside clients get
/// different policies there.
pub mod scope {
    /// Reached from pods on this node: ClusterIPs, and external addresses
    /// (served cluster-wide, whatever the external traffic policy).
    pub const INTERNAL: u8 = 0;
    /// Reached from outside the cluster through an external interface
    /// (NodePort, LoadBalancer, externalIP), with the external policy.
    pub const EXTERNAL: u8 = 1;
}

/// Key of the frontends map: one Service port on one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Destination address, wire order.
    pub addr: u32,
    /// Destination port, wire order.
    pub port: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// One of [`scope`].
    pub scope: u8,
}
map_type!(FrontendKey, 8);

/// How many backend tiers a frontend may have (same node, same zone, all).
pub const MAX_TIERS: usize = 3;

/// Value of the frontends map ("slot 0" in Cilium's words).
///
/// The frontend's backends sit in the slots map under `(id, 0..n)`, tier after
/// tier: slots `0..tier_len[0]` are tier 0, the next `tier_len[1]` tier 1, and
/// so on. The kernel picks from the first non-empty tier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Stable id chosen by user space; the slots of this frontend are keyed by it.
    pub id: u32,
    /// Number of slots in each tier.
    pub tier_len: [u16; MAX_TIERS],
    /// Bit set of [`frontend_flags`].
    pub flags: u16,
    /// ClientIP session affinity timeout in seconds; 0: no affinity.
    pub affinity_timeout_s: u32,
}
map_type!(Frontend, 16);

/// Bits of [`Frontend::flags`].
pub mod frontend_flags {
    /// With no backend in any tier, drop silently (a Local traffic policy
    /// without a local endpoint, as kube-proxy) instead of rejecting.
    pub const DROP_WHEN_EMPTY: u16 = 1 << 0;
    /// Only clients in the frontend's source ranges (the source-ranges map,
    /// `loadBalancerSourceRanges`) may connect; others are dropped.
    pub const SOURCE_RANGES: u16 = 1 << 1;
}

impl Frontend {
    /// Total number of slots over all tiers.
    pub const fn slot_count(&self) -> u32 {
        self.tier_len[0] as u32 + self.tier_len[1] as u32 + self.tier_len[2] as u32
    }
}

/// Key of the slots map: the `slot`-th backend of frontend `frontend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// [`Frontend::id`].
    pub frontend_id: u32,
    /// Index among the frontend's slots, counted over all tiers.
    pub slot: u32,
}
map_type!(SlotKey, 8);

/// Value of the backends map, keyed by a stable backend id (`u32`).
///
/// Ids are never reused while a conntrack entry may still name them; a
/// backend that no frontend's slots hold any more stays, flagged
/// [`backend_flags::DRAINING`], until no conntrack entry names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend (pod) address, wire order.
    pub addr: u32,
    /// Backend (target) port, wire order.
    pub port: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// Bit set of [`backend_flags`].
    pub flags: u8,
}
map_type!(Backend, 8);

/// Bits of [`Backend::flags`].
pub mod backend_flags {
    /// The backend runs on this node: external traffic reaches it without
    /// SNAT, and its replies pass through this node anyway.
    pub const LOCAL: u8 = 1 << 0;
    /// No slot holds it any more (its endpoint is terminating, not ready, or
    /// gone — KEP-1669): new flows never choose it, established TCP flows
    /// keep it until they end, and a UDP flow moves to a live backend at its
    /// next datagram (as kube-proxy flushes such UDP conntrack entries).
    pub const DRAINING: u8 = 1 << 1;
}

/// Key of the source-ranges map (an LPM trie; the prefix length counts the
/// 32 bits of `frontend_id` plus the range's): one allowed client network
/// of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    /// [`Frontend::id`], matched whole.
    pub frontend_id: u32,
    /// The network's address (the client address on lookup), wire order.
    pub addr: u32,
}
map_type!(SourceRangeKey, 8);

/// Longest `namespace/name:port-name` a frontend's name holds: a
/// namespace and a Service name of 63 bytes each, a port name of 15, and
/// the separators; longer names are cut.
pub const SERVICE_NAME_LEN: usize = 144;

/// Value of the frontend-names map: which Service port a frontend belongs
/// to, `namespace/name:port-name` in UTF-8, zero-padded. Only inspection
/// reads it (`xlb services`), with the agent running or not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub bytes: [u8; SERVICE_NAME_LEN],
}
map_type!(ServiceName, SERVICE_NAME_LEN);

impl ServiceName {
    /// `name`, cut at [`SERVICE_NAME_LEN`] bytes (on a character boundary).
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(SERVICE_NAME_LEN);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; SERVICE_NAME_LEN];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self { bytes }
    }

    /// The name (up to the first zero byte).
    pub fn as_str(&self) -> &str {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(SERVICE_NAME_LEN);
        core::str::from_utf8(&self.bytes[..end]).unwrap_or("")
    }
}
