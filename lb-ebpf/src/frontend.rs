//! Frontend lookup: is this packet addressed to a Service, and may this
//! client use it?

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{Frontend, FrontendKey, SourceRangeKey, frontend_flags};

use crate::{
    maps::{FRONTENDS, SOURCE_RANGES},
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
