//! Every map of the datapath, pinned by name under the agent's bpffs dir so
//! that a restart of the agent keeps every flow. Names and capacities come
//! from `lb_common::maps`; the `name` strings below must equal them (the
//! user-space loader fails loudly if they don't).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, Counter, CtEntry, CtKey, FragmentKey, FragmentPorts,
    Frontend, FrontendKey, REASON_COUNT, ServiceName, SlotKey, SockAffinityKey, SockRevEntry,
    SockRevKey, SourceRangeKey, ct_event, maps,
};

/// Which Service port each frontend belongs to, by frontend id: written
/// by the agent for `xlb services`; no program reads it.
#[map(name = "XLB_FRONTEND_NAMES")]
pub static FRONTEND_NAMES: HashMap<u32, ServiceName> =
    HashMap::pinned(maps::FRONTENDS_MAX, BPF_F_NO_PREALLOC);

/// What clients address: (address, port, protocol, scope) → frontend.
#[map(name = "XLB_FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> =
    HashMap::pinned(maps::FRONTENDS_MAX, BPF_F_NO_PREALLOC);

/// The backends of each frontend, in tier order: (frontend id, slot) → backend id.
#[map(name = "XLB_SLOTS")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(maps::SLOTS_MAX, BPF_F_NO_PREALLOC);

/// Backends by stable id.
#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(maps::BACKENDS_MAX, BPF_F_NO_PREALLOC);

/// Conntrack, both directions of each load-balanced flow; LRU so a full
/// table evicts the oldest flows instead of refusing new ones.
#[map(name = "XLB_CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(maps::CONNTRACK_MAX, 0);

/// Entries the datapath added to and removed from conntrack, per CPU
/// (`lb_common::ct_event`): the agent's walk tells evictions from them.
#[map(name = "XLB_CT_EVENTS")]
pub static CONNTRACK_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(ct_event::COUNT, 0);

/// The first fragment's ports of each fragmented TCP/UDP datagram a hook
/// saw, so that its later fragments follow it; LRU (datagrams are short).
#[map(name = "XLB_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::pinned(maps::FRAGMENTS_MAX, 0);

/// ClientIP session affinity per (frontend, client); LRU like conntrack.
#[map(name = "XLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::pinned(maps::AFFINITY_MAX, 0);

/// The client networks allowed per frontend (`loadBalancerSourceRanges`),
/// for frontends with `frontend_flags::SOURCE_RANGES`.
#[map(name = "XLB_SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::pinned(maps::SOURCE_RANGES_MAX, BPF_F_NO_PREALLOC);

/// The addresses only Services use (never the node's own): whatever is
/// addressed there is xlb's.
#[map(name = "XLB_SERVICE_ADDRS")]
pub static SERVICE_ADDRS: HashMap<u32, u8> =
    HashMap::pinned(maps::SERVICE_ADDRS_MAX, BPF_F_NO_PREALLOC);

/// Packets and bytes per verdict/drop reason, per CPU.
#[map(name = "XLB_COUNTERS")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(REASON_COUNT as u32, 0);

/// External interfaces where `nodeport_xdp` may answer with `XDP_TX`
/// (slot `ifindex % capacity` holds the ifindex): where delivery of such
/// frames is known to work.
#[map(name = "XLB_XDP_TX_IFACES")]
pub static XDP_TX_IFACES: Array<u32> = Array::pinned(maps::XDP_TX_IFACES_MAX, 0);

/// The socket path's reverse map: which frontend a balanced socket
/// addressed, per backend; LRU, entries removed when the socket is released.
#[map(name = "XLB_SOCK_REV")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevEntry> =
    LruHashMap::pinned(maps::SOCK_REV_MAX, 0);

/// ClientIP session affinity of the socket path, per (client network
/// namespace, frontend); LRU like [`AFFINITY`].
#[map(name = "XLB_SOCK_AFFINITY")]
pub static SOCK_AFFINITY: LruHashMap<SockAffinityKey, AffinityEntry> =
    LruHashMap::pinned(maps::AFFINITY_MAX, 0);

/// The per-packet path's pre-filter (`lb_common::maps::ADDR_FILTER`): the
/// bit of every frontend and backend address. An array lookup is inlined
/// by the verifier.
#[map(name = "XLB_ADDR_FILTER")]
pub static ADDR_FILTER: Array<u64> = Array::pinned(maps::ADDR_FILTER_WORDS, 0);
