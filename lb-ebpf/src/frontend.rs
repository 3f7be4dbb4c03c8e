//! Frontend lookup: is this packet addressed to a Service, and may this
//! client use it?

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{Frontend, FrontendKey, SourceRangeKey, addr_filter_bit, frontend_flags};

use crate::{
    maps::{ADDR_FILTER, FRONTENDS, SOURCE_RANGES},
    packet::Flow,
};

/// The frontend `flow` is addressed to in `scope`, if any.
#[inline(always)]
pub fn lookup(flow: &Flow, scope: u8) -> Option<Frontend> {
    lookup_key(FrontendKey {
        addr: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        scope,
    })
}

/// The frontend of `key`, if any.
#[inline(always)]
pub fn lookup_key(key: FrontendKey) -> Option<Frontend> {
    // SAFETY: the value is copied out at once; user space replaces frontends
    // as a whole (one map update), so a reader sees the old or the new one.
    unsafe { FRONTENDS.get(key).copied() }
}

/// Whether `addr` (wire order) may be in pre-filter bitmap `set`
/// (`lb_common::addr_filter`): its bit is set, or the map cannot say.
#[inline(always)]
pub fn may_be(set: u32, addr: u32) -> bool {
    let (index, mask) = addr_filter_bit(set, addr);
    ADDR_FILTER.get(index).is_none_or(|word| *word & mask != 0)
}

/// Whether `client` may use `frontend`: always, unless the frontend has
/// source ranges (`loadBalancerSourceRanges`) and none holds the client.
#[inline(always)]
pub fn admits(frontend: &Frontend, client: u32) -> bool {
    if frontend.flags & frontend_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRangeKey {
            frontend_id: frontend.id,
            addr: client,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}
