//! Packets built byte by byte, with every checksum computed from scratch,
//! and the inverse: what a packet that came out of the datapath says.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{PROTO_TCP, PROTO_UDP};

use crate::checksum;

/// TCP flag bits.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An Ethernet + IPv4 + TCP/UDP packet to build.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// The IPv4 flags + fragment offset field.
    pub frag: u16,
    /// UDP without a checksum (field zero), as RFC 768 allows.
    pub udp_no_checksum: bool,
}

/// Parses `"a.b.c.d:port"`; panics on a typo in a test.
pub fn addr(s: &str) -> SocketAddrV4 {
    s.parse()
        .unwrap_or_else(|e| panic!("bad address {s:?}: {e}"))
}

impl Packet {
    fn new(proto: u8, src: &str, dst: &str) -> Self {
        Self {
            src: addr(src),
            dst: addr(dst),
            proto,
            tcp_flags: 0,
            payload: b"hello".to_vec(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            udp_no_checksum: false,
        }
    }

    /// A TCP segment with the given flags.
    pub fn tcp(src: &str, dst: &str, tcp_flags: u8) -> Self {
        Self {
            tcp_flags,
            ..Self::new(PROTO_TCP, src, dst)
        }
    }

    /// A UDP datagram.
    pub fn udp(src: &str, dst: &str) -> Self {
        Self::new(PROTO_UDP, src, dst)
    }

    /// The L4 header and payload, checksum included.
    fn segment(&self) -> Vec<u8> {
        let mut seg = Vec::new();
        seg.extend_from_slice(&self.src.port().to_be_bytes());
        seg.extend_from_slice(&self.dst.port().to_be_bytes());
        let csum_at = if self.proto == PROTO_TCP {
            seg.extend_from_slice(&1000u32.to_be_bytes()); // seq
            seg.extend_from_slice(&2000u32.to_be_bytes()); // ack
            seg.extend_from_slice(&[5 << 4, self.tcp_flags]);
            seg.extend_from_slice(&65535u16.to_be_bytes()); // window
            seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            16
        } else {
            seg.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            seg.extend_from_slice(&[0, 0]);
            6
        };
        seg.extend_from_slice(&self.payload);
        if !(self.proto == PROTO_UDP && self.udp_no_checksum) {
            let mut csum = checksum::l4(*self.src.ip(), *self.dst.ip(), self.proto, &seg);
            if self.proto == PROTO_UDP && csum == 0 {
                csum = 0xffff;
            }
            seg[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
        }
        seg
    }

    /// The IPv4 header (with options) followed by `l4`.
    fn ipv4(&self, l4: &[u8]) -> Vec<u8> {
        assert_eq!(self.ip_options.len() % 4, 0, "IPv4 options pad to 4 bytes");
        let hlen = 20 + self.ip_options.len();
        let mut ip = vec![0x40 | (hlen / 4) as u8, 0];
        ip.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.extend_from_slice(&[64, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src.ip().octets());
        ip.extend_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&self.ip_options);
        let csum = checksum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(l4);
        ip
    }

    /// The whole frame.
    pub fn bytes(&self) -> Vec<u8> {
        ethernet(0x0800, &self.ip_datagram())
    }

    /// The IPv4 datagram, without the Ethernet header.
    pub fn ip_datagram(&self) -> Vec<u8> {
        self.ipv4(&self.segment())
    }

    /// The frame cut after `l4_len` bytes of the L4 header, with an IPv4
    /// total length that agrees (a truncated segment, not a short capture).
    pub fn truncated_l4(&self, l4_len: usize) -> Vec<u8> {
        let segment = self.segment();
        ethernet(0x0800, &self.ipv4(&segment[..l4_len]))
    }
}

/// An Ethernet frame around `payload`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&NODE_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// What a TCP/UDP frame says, its checksums checked from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
}

/// Reads a frame built by [`Packet::bytes`] (or rewritten by the datapath)
/// and asserts that the IPv4 and L4 checksums are right.
pub fn seen(frame: &[u8]) -> Seen {
    let ip = &frame[14..];
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let mut header = ip[..hlen].to_vec();
    let ip_csum = u16::from_be_bytes([header[10], header[11]]);
    header[10..12].fill(0);
    assert_eq!(
        ip_csum,
        checksum::ipv4_header(&header),
        "IPv4 header checksum"
    );
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let mut seg = ip[hlen..total].to_vec();
    let csum_at = if proto == PROTO_TCP { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([seg[csum_at], seg[csum_at + 1]]);
    seg[csum_at..csum_at + 2].fill(0);
    if !(proto == PROTO_UDP && l4_csum == 0) {
        let mut want = checksum::l4(src_ip, dst_ip, proto, &seg);
        if proto == PROTO_UDP && want == 0 {
            want = 0xffff;
        }
        assert_eq!(l4_csum, want, "L4 checksum");
    }
    Seen {
        src: SocketAddrV4::new(src_ip, u16::from_be_bytes([seg[0], seg[1]])),
        dst: SocketAddrV4::new(dst_ip, u16::from_be_bytes([seg[2], seg[3]])),
        proto,
    }
}

/// `frame` with another IPv4 TTL, its header checksum fixed.
pub fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    frame[14 + 8] = ttl;
    frame[24..26].fill(0);
    let csum = checksum::ipv4_header(&frame[14..34]);
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
    frame
}

/// ICMP destination unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Its code for "fragmentation needed and DF set" (RFC 1191).
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// Its code for "port unreachable".
pub const ICMP_PORT_UNREACH: u8 = 3;

/// An ICMP error from `src` to `dst` quoting `quoted` whole (as Linux
/// does for a small datagram), every checksum computed from scratch. For
/// "fragmentation needed" the next-hop MTU is 1280.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    quoted: &Packet,
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0];
    let mtu: u16 = if code == ICMP_FRAG_NEEDED { 1280 } else { 0 };
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted.ip_datagram());
    let csum = checksum::ipv4_header(&icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let outer = Packet {
        src: SocketAddrV4::new(src, 0),
        dst: SocketAddrV4::new(dst, 0),
        proto: 1,
        frag: 0,
        ..Packet::udp("0.0.0.0:0", "0.0.0.0:0")
    };
    ethernet(0x0800, &outer.ipv4(&icmp))
}

/// What an ICMP error frame says, every checksum (outer IPv4, ICMP, quoted
/// IPv4, quoted L4) checked from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct SeenIcmpError {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The quoted packet.
    pub quoted: Seen,
}

/// Reads a frame built by [`icmp_error`] (or rewritten by the datapath).
pub fn seen_icmp_error(frame: &[u8]) -> SeenIcmpError {
    let ip = &frame[14..];
    let mut header = ip[..20].to_vec();
    let ip_csum = u16::from_be_bytes([header[10], header[11]]);
    header[10..12].fill(0);
    assert_eq!(
        ip_csum,
        checksum::ipv4_header(&header),
        "outer IPv4 checksum"
    );
    assert_eq!(ip[9], 1, "ICMP");
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let mut icmp = ip[20..total].to_vec();
    let icmp_csum = u16::from_be_bytes([icmp[2], icmp[3]]);
    icmp[2..4].fill(0);
    assert_eq!(icmp_csum, checksum::ipv4_header(&icmp), "ICMP checksum");
    // The quoted datagram, read like a frame of its own.
    let quoted = seen(&ethernet(0x0800, &ip[28..total]));
    SeenIcmpError {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        quoted,
    }
}

/// `packet` split into two IPv4 fragments after `first_len` bytes of its L4
/// segment (a multiple of 8), as a sender with a small MTU would: the first
/// carries the L4 header, the second only data.
pub fn fragments(packet: &Packet, first_len: usize) -> [Vec<u8>; 2] {
    assert_eq!(first_len % 8, 0, "fragments split at 8-byte boundaries");
    let datagram = packet.ip_datagram();
    let hlen = usize::from(datagram[0] & 0x0f) * 4;
    let (header, segment) = datagram.split_at(hlen);
    let piece = |data: &[u8], frag: u16| {
        let mut ip = header.to_vec();
        ip[2..4].copy_from_slice(&((hlen + data.len()) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[10..12].fill(0);
        let csum = checksum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(data);
        ethernet(0x0800, &ip)
    };
    [
        piece(&segment[..first_len], 0x2000),
        piece(&segment[first_len..], (first_len / 8) as u16),
    ]
}

/// What two fragments (as the datapath left them) say once reassembled:
/// both IPv4 header checksums, the fragments' agreement on addresses, and
/// the L4 checksum over the whole datagram, checked from scratch.
pub fn seen_reassembled(first: &[u8], later: &[u8]) -> Seen {
    let header_ok = |frame: &[u8]| {
        let mut header = frame[14..34].to_vec();
        let csum = u16::from_be_bytes([header[10], header[11]]);
        header[10..12].fill(0);
        assert_eq!(
            csum,
            checksum::ipv4_header(&header),
            "fragment IPv4 checksum"
        );
    };
    header_ok(first);
    header_ok(later);
    assert_eq!(first[26..34], later[26..34], "both fragments' addresses");
    let mut ip = first[14..34].to_vec();
    let data: Vec<u8> = first[34..].iter().chain(&later[34..]).copied().collect();
    ip[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
    ip[6..8].fill(0);
    ip[10..12].fill(0);
    let csum = checksum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(&data);
    seen(&ethernet(0x0800, &ip))
}
