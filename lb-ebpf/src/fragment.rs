//! IPv4 fragments of TCP/UDP datagrams. Only the first fragment carries the
//! ports; each hook remembers them per datagram (as it sees the datagram on
//! the wire), so that the later fragments find their flow and get the same
//! translation — addresses only, as they carry no L4 header. xlb does not
//! reassemble: a later fragment that comes before its first is dropped,
//! counted, when it is addressed to an address only Services use; anywhere
//! else it passes untouched, counted — it may not be ours (the node's own
//! traffic, a pod's), and if it is, its datagram cannot be put together.

use lb_common::{FragmentKey, FragmentPorts, Reason};

use crate::{
    maps::{FRAGMENTS, SERVICE_ADDRS},
    packet::{Flow, Fragment},
};

/// Records a first fragment's ports; gives a later fragment those of its
/// datagram, or the reason it is dropped or passes untouched.
#[inline(always)]
pub fn follow(flow: &mut Flow) -> Result<(), Reason> {
    if flow.fragment == Fragment::Whole {
        return Ok(());
    }
    follow_fragment(flow)
}

/// [`follow`] for a fragment: rare, so a function of its own (a BPF-to-BPF
/// call), which keeps the hot paths' code short.
#[inline(never)]
fn follow_fragment(flow: &mut Flow) -> Result<(), Reason> {
    let key = FragmentKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        pad: 0,
    };
    if flow.fragment == Fragment::First {
        let ports = FragmentPorts {
            sport: flow.sport,
            dport: flow.dport,
        };
        // A failed write costs the later fragments of this datagram only.
        let _ = FRAGMENTS.insert(key, ports, 0);
        return Ok(());
    }
    // SAFETY: copied out at once.
    let Some(ports) = (unsafe { FRAGMENTS.get(key) }) else {
        // Its first has not come (yet): surely ours only where nothing but
        // Services is addressed.
        // SAFETY: as above.
        return Err(if unsafe { SERVICE_ADDRS.get(flow.daddr) }.is_some() {
            Reason::DropFragmentOutOfOrder
        } else {
            Reason::PassFragmentOutOfOrder
        });
    };
    flow.sport = ports.sport;
    flow.dport = ports.dport;
    Ok(())
}
