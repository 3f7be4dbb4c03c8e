//! IPv4 fragments: the ports of each fragmented datagram, from its first
//! fragment, so that the later ones (which carry no L4 header) follow the
//! same flow.

use crate::map_type;

/// Key of the fragments map: one datagram, as a hook sees it on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentKey {
    /// Source address, wire order.
    pub saddr: u32,
    /// Destination address, wire order.
    pub daddr: u32,
    /// The IPv4 identification field, wire order.
    pub id: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// Reserved, zero.
    pub pad: u8,
}
map_type!(FragmentKey, 12);

/// Value of the fragments map: the first fragment's ports, wire order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
}
map_type!(FragmentPorts, 4);
