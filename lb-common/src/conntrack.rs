//! Conntrack: one entry per direction of a load-balanced flow.

use crate::map_type;

/// Direction of a conntrack entry.
pub mod direction {
    /// Client → frontend, as the client sent it (before DNAT).
    pub const FORWARD: u8 = 0;
    /// Backend → client, as the backend sent it (before rev-NAT).
    pub const REPLY: u8 = 1;
}

/// Key of the conntrack map: the full 5-tuple as seen on the wire, plus the
/// direction. Both addresses and both ports are in the key, so two clients
/// that use the same source port never share an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address, wire order.
    pub saddr: u32,
    /// Destination address, wire order.
    pub daddr: u32,
    /// Source port, wire order.
    pub sport: u16,
    /// Destination port, wire order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// One of [`direction`].
    pub direction: u8,
    /// Reserved, zero.
    pub pad: u16,
}
map_type!(CtKey, 16);

/// State of a conntrack entry, as far as timeouts need it.
pub mod ct_state {
    /// TCP: only a SYN was seen so far. UDP: only the client spoke.
    pub const NEW: u8 = 0;
    /// TCP: packets beyond the opening SYN were seen. UDP: a stream — the
    /// client spoke again after a reply (both entries).
    pub const ESTABLISHED: u8 = 1;
    /// Both directions sent their FIN, or one sent an RST: both entries of
    /// the flow live [`crate::CT_TIMEOUT_TCP_CLOSING_NS`] more.
    pub const CLOSING: u8 = 2;
    /// This entry's direction sent its FIN, the other has not yet (a
    /// half-closed flow, which may still carry data the other way).
    pub const FIN_SENT: u8 = 3;
    /// UDP: the backend answered once (a query and its answer, DNS's
    /// whole flow); not yet a stream.
    pub const REPLIED: u8 = 4;
}

/// Indexes of the per-CPU conntrack event counters
/// ([`crate::maps::CONNTRACK_EVENTS`]): with the agent's walk they account
/// for every entry, so what is missing was evicted by the LRU.
pub mod ct_event {
    /// Entries the datapath added to the table (not overwrites).
    pub const CREATED: u32 = 0;
    /// Entries the datapath removed itself (a race loser's SNAT port).
    pub const REMOVED: u32 = 1;
    /// Number of counters.
    pub const COUNT: u32 = 2;
}

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// The client's end is translated too ([`super::CtEntry::peer_addr`]):
    /// a hairpin flow, or an external flow SNATed to the node.
    pub const SNAT: u8 = 1 << 0;
    /// A pod balanced to itself: its source is translated to
    /// [`crate::HAIRPIN_ADDR`] on the way in, and back on the way out, so
    /// the pod sees a peer that is not itself and its reply returns through
    /// the datapath. Always with [`SNAT`].
    pub const HAIRPIN: u8 = 1 << 1;
    /// Entered the node through an external interface (NodePort,
    /// LoadBalancer, externalIP): its replies are translated where they
    /// enter the datapath and sent back out by a route lookup, since their
    /// new source is the node's (or the frontend's) address.
    pub const EXTERNAL: u8 = 1 << 2;
}

/// Value of the conntrack map.
///
/// For a [`direction::FORWARD`] entry `nat_addr:nat_port` is the backend the
/// destination is rewritten to, and with [`ct_flags::SNAT`]
/// `peer_addr:peer_port` the source the backend sees. For a
/// [`direction::REPLY`] entry `nat_addr:nat_port` is the frontend the source
/// is rewritten back to, and with [`ct_flags::SNAT`] `peer_addr:peer_port`
/// the client the destination is rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Last time a packet of this direction was seen (`bpf_ktime_get_coarse_ns`,
    /// i.e. `CLOCK_MONOTONIC_COARSE`), refreshed at most once a second.
    pub last_seen_ns: u64,
    /// The address to translate to, wire order.
    pub nat_addr: u32,
    /// The port to translate to, wire order.
    pub nat_port: u16,
    /// One of [`ct_state`].
    pub state: u8,
    /// Bit set of [`ct_flags`].
    pub flags: u8,
    /// The backend the flow was balanced to.
    pub backend_id: u32,
    /// [`crate::Frontend::id`] of the frontend the flow was addressed to.
    pub frontend_id: u32,
    /// The other end's translation, wire order (see above).
    pub peer_addr: u32,
    /// The other end's port, wire order.
    pub peer_port: u16,
    /// Reserved, zero.
    pub pad: u16,
}
map_type!(CtEntry, 32);
// The datapath claims a closed flow's SNAT tuple with a compare-and-swap of
// the 64-bit word at offset 8 (`lb-ebpf` `take_over_closed`).
const _: () = {
    assert!(core::mem::offset_of!(CtEntry, nat_addr) == 8);
    assert!(core::mem::offset_of!(CtEntry, nat_port) == 12);
    assert!(core::mem::offset_of!(CtEntry, state) == 14);
    assert!(core::mem::offset_of!(CtEntry, flags) == 15);
};

const SECOND_NS: u64 = 1_000_000_000;
/// A TCP flow that has seen only its SYN (Cilium and netfilter: 60 s).
pub const CT_TIMEOUT_TCP_NEW_NS: u64 = 60 * SECOND_NS;
/// An idle established TCP flow (kube-proxy sets netfilter's to 24 h).
pub const CT_TIMEOUT_TCP_ESTABLISHED_NS: u64 = 24 * 3600 * SECOND_NS;
/// A TCP flow after both FINs or an RST: long enough for the last ACK and
/// a retransmitted FIN, short enough that closed flows never crowd out live
/// ones (at 30k new connections/s, ~120k entries).
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 2 * SECOND_NS;
/// An idle UDP stream (netfilter's UDP stream timeout).
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * SECOND_NS;
/// A UDP flow that is not a stream yet (netfilter's UDP timeout): one-shot
/// flows such as DNS queries, which would otherwise crowd the table.
pub const CT_TIMEOUT_UDP_ONE_SHOT_NS: u64 = 30 * SECOND_NS;
/// The source ports SNAT hands out (host order), kept above the kernel's
/// default ephemeral range (`ip_local_port_range`, 32768–60999) so that a
/// translated flow never takes the tuple of one of the node's own
/// connections, such as a kubelet probe to the same backend.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// The last SNAT source port (host order).
pub const SNAT_PORT_MAX: u16 = 65_535;

/// How stale `last_seen_ns` may get before a packet refreshes it; saves a
/// write (and a cache-line bounce between CPUs) on most packets.
pub const CT_REFRESH_NS: u64 = SECOND_NS;

impl CtEntry {
    /// How long this entry lives after `last_seen_ns`.
    pub const fn lifetime_ns(&self, proto: u8) -> u64 {
        if proto != crate::PROTO_TCP {
            return if self.state == ct_state::ESTABLISHED {
                CT_TIMEOUT_UDP_NS
            } else {
                CT_TIMEOUT_UDP_ONE_SHOT_NS
            };
        }
        match self.state {
            ct_state::NEW => CT_TIMEOUT_TCP_NEW_NS,
            ct_state::CLOSING => CT_TIMEOUT_TCP_CLOSING_NS,
            _ => CT_TIMEOUT_TCP_ESTABLISHED_NS,
        }
    }

    /// Whether the entry has expired at `now_ns`.
    pub const fn is_expired(&self, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(proto)
    }
}
