//! Bounds-checked packet access and the IPv4/TCP/UDP parser shared by every
//! entry point.

use core::mem::size_of;

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};

/// Ethernet header length; every hook xlb uses sees L2.
pub const ETH_HLEN: usize = 14;
/// Offset of the IPv4 header.
pub const IP_OFF: usize = ETH_HLEN;
/// Offset of the IPv4 header checksum.
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
/// Offset of the IPv4 source address (the destination follows it).
pub const IP_SADDR_OFF: usize = IP_OFF + 12;
/// Offset of the IPv4 destination address.
pub const IP_DADDR_OFF: usize = IP_OFF + 16;
/// Longest header prefix the parser reads: Ethernet, IPv4 with options, TCP.
pub const MAX_HEADER_LEN: usize = ETH_HLEN + 60 + TCP_HLEN;

const ETH_P_IP_WIRE: u16 = 0x0800_u16.to_be();
const PROTO_ICMP: u8 = 1;
/// ICMP destination unreachable (incl. fragmentation needed) and time
/// exceeded: the errors that quote a packet of a flow (RFC 792, 1191).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP header, then the quoted IPv4 header (without options) and the
/// first 8 bytes of its L4 header (the ports; UDP's checksum).
pub const ICMP_ERROR_LEN: usize = 8 + 20 + 8;
/// Offsets inside the ICMP error region.
pub const ICMP_CSUM: usize = 2;
pub const INNER_IP: usize = 8;
pub const INNER_L4: usize = INNER_IP + 20;
const IP_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Offset of the checksum in a TCP header.
pub const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
/// Offset of the IPv4 TTL (the protocol follows it in the same word).
pub const IP_TTL_OFF: usize = IP_OFF + 8;

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The linear part of a packet: `[data, data_end)`.
#[derive(Clone, Copy)]
pub struct Packet {
    data: usize,
    data_end: usize,
}

impl Packet {
    pub fn new(data: usize, data_end: usize) -> Self {
        Self { data, data_end }
    }

    /// The one accessor for packet memory: a pointer to a `T` at `offset`,
    /// or `None` when the packet is shorter. The verifier sees this check
    /// before every access.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let start = self.data + offset;
        if start + size_of::<T>() > self.data_end {
            return None;
        }
        Some(start as *mut T)
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes are in the
        // packet; `read_unaligned` because packet headers have no alignment.
        self.ptr_at::<T>(offset)
            .map(|p| unsafe { core::ptr::read_unaligned(p) })
    }
}

/// Where a packet stands in its IPv4 datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header, addresses only.
    Later,
}

/// A packet's addressing alone (wire order): what a FIB lookup needs.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// A TCP or UDP packet's addressing, as the parser found it.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Source address, wire order.
    pub saddr: u32,
    /// Destination address, wire order.
    pub daddr: u32,
    /// Source port, wire order.
    pub sport: u16,
    /// Destination port, wire order.
    pub dport: u16,
    pub proto: u8,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the L4 header (after IP options).
    pub l4_off: usize,
    /// The source and destination ports in the packet, bounds-checked by
    /// the parser; null in a later fragment, which has none, and in an ICMP
    /// error (its `sport` and
    /// `dport` come from its first fragment). Kept as a pointer because the verifier does not carry a
    /// range check across a recomputed variable offset (IP options), and
    /// LLVM drops a second check it can prove redundant.
    pub ports: *mut [u16; 2],
    /// The L4 checksum, bounds-checked like `ports`; null unless
    /// `is_complete`.
    pub l4_csum: *mut u16,
    /// An ICMP error quoting a packet of this flow: the ICMP header and the
    /// quoted headers ([`ICMP_ERROR_LEN`] bytes, bounds-checked), null for
    /// a TCP or UDP packet. The flow's addresses and ports are then the
    /// quoted packet's, reversed: what a packet of that flow travelling the
    /// error's way would carry.
    pub icmp_error: *mut [u8; ICMP_ERROR_LEN],
    /// Where the packet stands in its datagram.
    pub fragment: Fragment,
    /// The IPv4 identification field, wire order (keys fragments).
    pub ip_id: u16,
    /// The whole L4 header is present (ports alone may be).
    pub is_complete: bool,
}

impl Flow {
    /// Whether this is an ICMP error about the flow, not a packet of it.
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        !self.icmp_error.is_null()
    }

    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + TCP_CSUM_OFF
        } else {
            self.l4_off + UDP_CSUM_OFF
        }
    }
}

/// Parses Ethernet + IPv4 + the TCP/UDP ports. `Err` carries the pass reason
/// for packets that cannot be load balanced; they are never modified.
#[inline(always)]
pub fn parse(pkt: &Packet) -> Result<Flow, Reason> {
    let ethertype: u16 = pkt.read(12).ok_or(Reason::PassMalformed)?;
    if ethertype != ETH_P_IP_WIRE {
        return Err(Reason::PassNotIpv4);
    }
    let ip: [u8; 20] = pkt.read(IP_OFF).ok_or(Reason::PassMalformed)?;
    let version_ihl = ip[0];
    // Masking bounds the header length for the verifier (at most 60 bytes).
    let ip_hlen = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ip_hlen < 20 {
        return Err(Reason::PassMalformed);
    }
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let ip_id = u16::from_ne_bytes([ip[4], ip[5]]);
    let proto = ip[9];
    let l4_off = IP_OFF + ip_hlen;
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    if frag & IP_FRAG_OFFSET_MASK != 0 {
        if !matches!(proto, PROTO_TCP | PROTO_UDP) {
            return Err(Reason::PassFragment);
        }
        // Its ports come from its first fragment (`fragment::follow`).
        return Ok(Flow {
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            proto,
            tcp_flags: 0,
            l4_off,
            ports: core::ptr::null_mut(),
            l4_csum: core::ptr::null_mut(),
            icmp_error: core::ptr::null_mut(),
            fragment: Fragment::Later,
            ip_id,
            is_complete: true,
        });
    }
    let l4_hlen = match proto {
        PROTO_TCP => TCP_HLEN,
        PROTO_UDP => UDP_HLEN,
        PROTO_ICMP if frag & IP_MORE_FRAGMENTS == 0 => return parse_icmp_error(pkt, l4_off),
        _ => return Err(Reason::PassNotLoadBalanced),
    };
    let ports_ptr = pkt
        .ptr_at::<[u16; 2]>(l4_off)
        .ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked just above; headers are not aligned.
    let ports = unsafe { core::ptr::read_unaligned(ports_ptr) };
    let mut is_complete = total_len >= ip_hlen + l4_hlen;
    let mut tcp_flags = 0;
    let mut l4_csum = core::ptr::null_mut();
    if proto == PROTO_TCP {
        match pkt.ptr_at::<[u8; TCP_HLEN]>(l4_off) {
            Some(tcp_ptr) => {
                // SAFETY: bounds-checked by `ptr_at`.
                let tcp = unsafe { core::ptr::read_unaligned(tcp_ptr) };
                tcp_flags = tcp[13];
                is_complete &= (tcp[12] >> 4) >= 5;
                l4_csum = (tcp_ptr as usize + TCP_CSUM_OFF) as *mut u16;
            }
            None => is_complete = false,
        }
    } else {
        match pkt.ptr_at::<[u8; UDP_HLEN]>(l4_off) {
            Some(udp_ptr) => l4_csum = (udp_ptr as usize + UDP_CSUM_OFF) as *mut u16,
            None => is_complete = false,
        }
    }
    if !is_complete {
        l4_csum = core::ptr::null_mut();
    }
    Ok(Flow {
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        proto,
        tcp_flags,
        l4_off,
        ports: ports_ptr,
        l4_csum,
        icmp_error: core::ptr::null_mut(),
        fragment: if frag & IP_MORE_FRAGMENTS != 0 {
            Fragment::First
        } else {
            Fragment::Whole
        },
        ip_id,
        is_complete,
    })
}

/// An ICMP error that quotes a TCP or UDP packet (its first fragment, no IP
/// options). Other ICMP is not ours.
#[inline(always)]
fn parse_icmp_error(pkt: &Packet, l4_off: usize) -> Result<Flow, Reason> {
    let region = pkt
        .ptr_at::<[u8; ICMP_ERROR_LEN]>(l4_off)
        .ok_or(Reason::PassNotLoadBalanced)?;
    // SAFETY: bounds-checked just above; headers are not aligned.
    let r = unsafe { core::ptr::read_unaligned(region) };
    let inner_frag = u16::from_be_bytes([r[INNER_IP + 6], r[INNER_IP + 7]]);
    let inner_proto = r[INNER_IP + 9];
    if !matches!(r[0], ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
        || r[INNER_IP] != 0x45
        || inner_frag & IP_FRAG_OFFSET_MASK != 0
        || !matches!(inner_proto, PROTO_TCP | PROTO_UDP)
    {
        return Err(Reason::PassNotLoadBalanced);
    }
    let addr = |at: usize| u32::from_ne_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
    let port = |at: usize| u16::from_ne_bytes([r[at], r[at + 1]]);
    Ok(Flow {
        saddr: addr(INNER_IP + 16),
        daddr: addr(INNER_IP + 12),
        sport: port(INNER_L4 + 2),
        dport: port(INNER_L4),
        proto: inner_proto,
        tcp_flags: 0,
        l4_off,
        // The quoted ports are written by `nat::rewrite_icmp_error`.
        ports: core::ptr::null_mut(),
        l4_csum: core::ptr::null_mut(),
        icmp_error: region,
        fragment: Fragment::Whole,
        ip_id: 0,
        is_complete: true,
    })
}
