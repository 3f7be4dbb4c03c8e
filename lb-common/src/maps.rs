//! Map names (as the loader, the pins under the bpffs dir and the CLI know
//! them) and capacities. Both sides use these constants.

/// Frontends: [`crate::FrontendKey`] → [`crate::Frontend`].
pub const FRONTENDS: &str = "XLB_FRONTENDS";
/// Capacity of [`FRONTENDS`].
pub const FRONTENDS_MAX: u32 = 131_072;

/// Frontend names: frontend id (`u32`) → [`crate::ServiceName`]. For
/// inspection only: no program reads it.
pub const FRONTEND_NAMES: &str = "XLB_FRONTEND_NAMES";

/// Backend slots: [`crate::SlotKey`] → backend id (`u32`).
pub const SLOTS: &str = "XLB_SLOTS";
/// Capacity of [`SLOTS`].
pub const SLOTS_MAX: u32 = 1_048_576;

/// Backends: backend id (`u32`) → [`crate::Backend`].
pub const BACKENDS: &str = "XLB_BACKENDS";
/// Capacity of [`BACKENDS`].
pub const BACKENDS_MAX: u32 = 524_288;

/// Conntrack (LRU): [`crate::CtKey`] → [`crate::CtEntry`].
pub const CONNTRACK: &str = "XLB_CONNTRACK";
/// Default capacity of [`CONNTRACK`] (two entries per flow; the agent's
/// `--conntrack-max`): 112 bytes of kernel memory an entry (the LRU map's
/// memlock), 56 MiB.
/// At 30,000 new connections/s the closed flows' entries (2 s, plus up to
/// a second until the agent's walk removes them) take ~180,000.
pub const CONNTRACK_MAX: u32 = 524_288;

/// Per-CPU conntrack event counters: [`crate::ct_event`] index → `u64`.
pub const CONNTRACK_EVENTS: &str = "XLB_CT_EVENTS";

/// IPv4 fragments (LRU): [`crate::FragmentKey`] → [`crate::FragmentPorts`].
pub const FRAGMENTS: &str = "XLB_FRAGMENTS";
/// Capacity of [`FRAGMENTS`]: fragmented datagrams in flight at once.
pub const FRAGMENTS_MAX: u32 = 16_384;

/// ClientIP session affinity (LRU): [`crate::AffinityKey`] →
/// [`crate::AffinityEntry`].
pub const AFFINITY: &str = "XLB_AFFINITY";
/// Capacity of [`AFFINITY`].
pub const AFFINITY_MAX: u32 = 131_072;

/// `loadBalancerSourceRanges` (LPM trie): [`crate::SourceRangeKey`] → `u8`
/// (unused, 1).
pub const SOURCE_RANGES: &str = "XLB_SOURCE_RANGES";
/// Capacity of [`SOURCE_RANGES`].
pub const SOURCE_RANGES_MAX: u32 = 65_536;

/// The addresses only Services use — ClusterIPs, LoadBalancer and external
/// IPs, never one of the node's own: address (`u32`, wire order) → `u8`
/// (unused, 1). What is addressed there is xlb's whatever its port.
pub const SERVICE_ADDRS: &str = "XLB_SERVICE_ADDRS";
/// Capacity of [`SERVICE_ADDRS`].
pub const SERVICE_ADDRS_MAX: u32 = 65_536;

/// Per-CPU counters: [`crate::Reason`] as `u32` → [`crate::Counter`].
pub const COUNTERS: &str = "XLB_COUNTERS";

/// External interfaces whose XDP program may send frames back out itself
/// (`XDP_TX`): an array whose slot `ifindex % XDP_TX_IFACES_MAX` holds that
/// ifindex. Elsewhere (and for the second of two interfaces sharing a
/// slot) XDP leaves those frames to TC, which forwards them through the
/// stack. An array lookup is inlined by the verifier: a few ns.
pub const XDP_TX_IFACES: &str = "XLB_XDP_TX_IFACES";
/// Capacity of [`XDP_TX_IFACES`].
pub const XDP_TX_IFACES_MAX: u32 = 256;

/// The socket path's reverse map (LRU): [`crate::SockRevKey`] →
/// [`crate::SockRevEntry`], written at `connect()` / `sendmsg()`, read at
/// `recvmsg()` / `getpeername()`, removed when the socket is released.
pub const SOCK_REV: &str = "XLB_SOCK_REV";
/// Capacity of [`SOCK_REV`]: sockets balanced and open at once (LRU: the
/// oldest are forgotten first; they then see the backend's address).
pub const SOCK_REV_MAX: u32 = 262_144;

/// ClientIP session affinity of the socket path (LRU):
/// [`crate::SockAffinityKey`] → [`crate::AffinityEntry`].
pub const SOCK_AFFINITY: &str = "XLB_SOCK_AFFINITY";

/// The per-packet path's pre-filter: two bitmaps (arrays of `u64` words,
/// [`crate::addr_filter`]), one with the bit of every frontend address set,
/// one with every backend address's ([`crate::addr_filter_bit`]). A pod's
/// packet whose destination is no frontend's and whose source no backend's
/// (a reply's source is its backend) is neither addressed to a frontend
/// nor a reply of a translated flow, and skips both lookups; a bit set by
/// another address (a hash collision) only costs them.
pub const ADDR_FILTER: &str = "XLB_ADDR_FILTER";
/// Words of one bitmap of [`ADDR_FILTER`]: 2^20 bits, 128 KiB.
pub const ADDR_FILTER_SET_WORDS: u32 = 1 << 14;
/// Words of [`ADDR_FILTER`]: its two bitmaps.
pub const ADDR_FILTER_WORDS: u32 = 2 * ADDR_FILTER_SET_WORDS;

/// Every pinned map, for cleanup and inspection.
pub const ALL: [&str; 15] = [
    FRONTENDS,
    FRONTEND_NAMES,
    SERVICE_ADDRS,
    SLOTS,
    BACKENDS,
    CONNTRACK,
    CONNTRACK_EVENTS,
    FRAGMENTS,
    AFFINITY,
    SOURCE_RANGES,
    COUNTERS,
    XDP_TX_IFACES,
    SOCK_REV,
    SOCK_AFFINITY,
    ADDR_FILTER,
];

/// The global (`EbpfLoader::set_global`) holding the node address that
/// external flows to remote backends are SNATed to, wire order.
pub const GLOBAL_SNAT_ADDR: &str = "XLB_SNAT_ADDR";

/// The global holding the network namespace cookie of the node's own
/// processes when only they are balanced at the socket
/// (`--socket-lb host-only`); 0 balances every socket.
pub const GLOBAL_SOCK_HOST_NETNS: &str = "XLB_SOCK_HOST_NETNS";

/// The global that makes every forward conntrack lookup miss (non-zero), so
/// that packet tests can run the loser of a flow-creation race against the
/// winner's entry. The agent never sets it.
pub const GLOBAL_LOSE_FLOW_RACE: &str = "XLB_LOSE_FLOW_RACE";
