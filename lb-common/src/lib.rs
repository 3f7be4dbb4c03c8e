//! Types shared by the xlb kernel programs (`lb-ebpf`) and user space
//! (`lb-userspace`): map keys and values, map names and capacities, the
//! counter index, conntrack timeouts.
//!
//! Addresses and ports inside every key and value are stored exactly as they
//! appear on the wire (network byte order), so the datapath compares and
//! copies them without swapping. User space converts with [`ipv4_raw`] and
//! [`port_raw`].
#![no_std]

mod affinity;
mod conntrack;
mod counter;
mod fragment;
mod frontend;
pub mod maps;
mod sock;

pub use affinity::*;
pub use conntrack::*;
pub use counter::*;
pub use fragment::*;
pub use frontend::*;
pub use sock::*;

/// The source address a pod sees when a Service balanced it to itself
/// (hairpin), like Cilium's service loopback address: link-local, never a
/// pod's or a node's.
pub const HAIRPIN_ADDR: u32 = ipv4_raw([169, 254, 42, 1]);

/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// An IPv4 address as the datapath stores it: the four octets in wire order,
/// read as a native-endian `u32`.
pub const fn ipv4_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The bitmaps of [`maps::ADDR_FILTER`].
pub mod addr_filter {
    /// Frontend addresses: where a packet to a frontend goes.
    pub const FRONTENDS: u32 = 0;
    /// Backend addresses: where a reply comes from.
    pub const BACKENDS: u32 = 1;
}

/// The word of [`maps::ADDR_FILTER`] and the bit in it that stand for
/// `addr` (wire order) in bitmap `set` ([`addr_filter`]): a multiplicative
/// hash's top 20 bits.
pub const fn addr_filter_bit(set: u32, addr: u32) -> (u32, u64) {
    let bit = addr.wrapping_mul(0x9E37_79B1) >> 12;
    (
        set * maps::ADDR_FILTER_SET_WORDS + (bit >> 6),
        1 << (bit & 63),
    )
}

/// The octets of an address stored by [`ipv4_raw`].
pub const fn ipv4_octets(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// A port as the datapath stores it: network byte order read as native `u16`.
pub const fn port_raw(port: u16) -> u16 {
    port.to_be()
}

/// The host-order port of a value stored by [`port_raw`].
pub const fn port_host(raw: u16) -> u16 {
    u16::from_be(raw)
}

/// Implements `aya::Pod` (user feature) and asserts the size of a map type at
/// compile time, so kernel and user space can never disagree on a layout.
macro_rules! map_type {
    ($ty:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
        #[cfg(feature = "user")]
        // SAFETY: `#[repr(C)]`, fixed-width fields and explicit padding: every
        // bit pattern is a valid value and there are no implicit holes.
        unsafe impl aya::Pod for $ty {}
        #[cfg(feature = "user")]
        // SAFETY: as above.
        unsafe impl bytemuck::Zeroable for $ty {}
        #[cfg(feature = "user")]
        // SAFETY: as above.
        unsafe impl bytemuck::Pod for $ty {}
    };
}
pub(crate) use map_type;
