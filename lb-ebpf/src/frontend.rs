//! Frontend lookup: is this packet addressed to a Service?

use lb_common::{Frontend, FrontendKey};

use crate::{maps::FRONTENDS, packet::Flow};

/// The frontend `flow` is addressed to in `scope`, if any.
#[inline(always)]
pub fn lookup(flow: &Flow, scope: u8) -> Option<Frontend> {
    let key = FrontendKey {
        addr: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        scope,
    };
    // SAFETY: the value is copied out at once; user space replaces frontends
    // as a whole (one map update), so a reader sees the old or the new one.
    unsafe { FRONTENDS.get(key).copied() }
}
