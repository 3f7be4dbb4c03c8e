//! The datapath's counters: one per verdict or drop reason, per CPU.

use crate::map_type;

/// Why a packet got the verdict it got. Used as the index of the per-CPU
/// counters map and as the `reason` label of the exported metric.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not IPv4: passed untouched.
    PassNotIpv4 = 0,
    /// Not TCP/UDP, not addressed to a frontend, not a reply of a load-balanced
    /// flow: passed untouched.
    PassNotLoadBalanced,
    /// A later fragment of a datagram that is not TCP/UDP, or whose flow is
    /// gone: passed untouched.
    PassFragment,
    /// Malformed or truncated, not addressed to a frontend: passed untouched.
    PassMalformed,
    /// A new flow to a frontend: backend chosen, DNAT applied.
    ForwardNew,
    /// A packet of a known flow: DNAT applied from conntrack.
    ForwardEstablished,
    /// A reply of a known flow: source translated back to the frontend.
    RevNat,
    /// Addressed to a frontend without endpoints: answered in its place with
    /// a TCP reset or an ICMP port unreachable ("connection refused", as
    /// kube-proxy's REJECT).
    RejectNoBackend,
    /// Addressed to a frontend without endpoints that could not be rejected
    /// (IP options, an RST, a failed rewrite): dropped.
    DropNoBackend,
    /// Addressed to a frontend whose Local traffic policy leaves no endpoint
    /// on this node: dropped, as kube-proxy does.
    DropNoLocalBackend,
    /// A later fragment of a TCP/UDP datagram whose first fragment this
    /// hook has not seen (out of order, or lost): its ports, and so its
    /// flow, are unknown. Passed untouched: it may not be ours.
    PassFragmentOutOfOrder,
    /// Such a fragment addressed to an address only Services use
    /// (`SERVICE_ADDRS`): surely ours, and its datagram cannot be put
    /// together: dropped.
    DropFragmentOutOfOrder,
    /// Addressed to a frontend but the L4 header is truncated or malformed.
    DropMalformed,
    /// The conntrack entry could not be written.
    DropConntrackFull,
    /// A client outside the frontend's `loadBalancerSourceRanges`.
    DropSourceRange,
    /// No free SNAT port for a new external flow to a remote backend.
    DropNoSnatPort,
    /// A packet xlb forwards itself whose TTL ran out.
    DropTtlExceeded,
    /// An ICMP error (destination unreachable, fragmentation needed, time
    /// exceeded) quoting a translated flow, translated like that flow.
    IcmpError,
    /// A `connect()` or `sendmsg()` to a frontend, balanced at the socket:
    /// its address rewritten to a backend's.
    SockBalanced,
    /// A `recvmsg()` or `getpeername()` of a socket balanced at the socket:
    /// the backend's address shown as the frontend's.
    SockRevNat,
    /// A `connect()` or `sendmsg()` to a frontend without endpoints:
    /// refused (`ECONNREFUSED`), as kube-proxy's REJECT.
    SockRejectNoBackend,
    /// A `connect()` or `sendmsg()` to a frontend whose Local traffic
    /// policy leaves no endpoint on this node: refused (`EHOSTUNREACH`).
    SockRejectNoLocalBackend,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASON_COUNT] = [
        Reason::PassNotIpv4,
        Reason::PassNotLoadBalanced,
        Reason::PassFragment,
        Reason::PassMalformed,
        Reason::ForwardNew,
        Reason::ForwardEstablished,
        Reason::RevNat,
        Reason::RejectNoBackend,
        Reason::DropNoBackend,
        Reason::DropNoLocalBackend,
        Reason::PassFragmentOutOfOrder,
        Reason::DropFragmentOutOfOrder,
        Reason::DropMalformed,
        Reason::DropConntrackFull,
        Reason::DropSourceRange,
        Reason::DropNoSnatPort,
        Reason::DropTtlExceeded,
        Reason::IcmpError,
        Reason::SockBalanced,
        Reason::SockRevNat,
        Reason::SockRejectNoBackend,
        Reason::SockRejectNoLocalBackend,
    ];

    /// The snake_case name used in metrics and the `stats` command.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNotLoadBalanced => "pass_not_load_balanced",
            Reason::PassFragment => "pass_fragment",
            Reason::PassMalformed => "pass_malformed",
            Reason::ForwardNew => "forward_new",
            Reason::ForwardEstablished => "forward_established",
            Reason::RevNat => "rev_nat",
            Reason::RejectNoBackend => "reject_no_backend",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropNoLocalBackend => "drop_no_local_backend",
            Reason::PassFragmentOutOfOrder => "pass_fragment_out_of_order",
            Reason::DropFragmentOutOfOrder => "drop_fragment_out_of_order",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropConntrackFull => "drop_conntrack_full",
            Reason::DropSourceRange => "drop_source_range",
            Reason::DropNoSnatPort => "drop_no_snat_port",
            Reason::DropTtlExceeded => "drop_ttl_exceeded",
            Reason::IcmpError => "icmp_error",
            Reason::SockBalanced => "sock_balanced",
            Reason::SockRevNat => "sock_rev_nat",
            Reason::SockRejectNoBackend => "sock_reject_no_backend",
            Reason::SockRejectNoLocalBackend => "sock_reject_no_local_backend",
        }
    }

    /// Whether packets counted here are dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropNoBackend
                | Reason::DropNoLocalBackend
                | Reason::DropMalformed
                | Reason::DropConntrackFull
                | Reason::DropSourceRange
                | Reason::DropNoSnatPort
                | Reason::DropTtlExceeded
                | Reason::DropFragmentOutOfOrder
        )
    }
}

/// Number of [`Reason`]s: the size of the counters map.
pub const REASON_COUNT: usize = 22;

/// Value of the per-CPU counters map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (as `skb->len` / frame length).
    pub bytes: u64,
}
map_type!(Counter, 16);
