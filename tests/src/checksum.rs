//! Checksums computed from scratch (RFC 1071), to check what the datapath
//! wrote incrementally.

use std::net::Ipv4Addr;

/// The ones'-complement sum of `data` as 16-bit big-endian words, unfolded.
fn sum(data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    let mut total: u32 = chunks
        .by_ref()
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        total += u32::from(*last) << 8;
    }
    total
}

fn finish(mut total: u32) -> u16 {
    while total >> 16 != 0 {
        total = (total & 0xffff) + (total >> 16);
    }
    !(total as u16)
}

/// The checksum of an IPv4 header whose checksum field is zero.
pub fn ipv4_header(header: &[u8]) -> u16 {
    finish(sum(header))
}

/// The TCP/UDP checksum of `segment` (checksum field zero) over the IPv4
/// pseudo-header.
pub fn l4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    finish(sum(&pseudo) + sum(segment))
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;

    /// The from-scratch checksums agree with an independent implementation.
    #[test]
    fn agrees_with_etherparse() {
        let builder = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 0, 0, 1], [10, 96, 0, 10], 64)
            .tcp(40000, 80, 1, 1000);
        let payload = b"odd-length payload";
        let mut bytes = Vec::new();
        builder.write(&mut bytes, payload).unwrap();
        let sliced = SlicedPacket::from_ethernet(&bytes).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("not tcp")
        };
        let mut segment = bytes[34..].to_vec();
        segment[16..18].fill(0);
        let ours = l4([10, 0, 0, 1].into(), [10, 96, 0, 10].into(), 6, &segment);
        assert_eq!(ours, tcp.checksum());
        let mut header = bytes[14..34].to_vec();
        let theirs = u16::from_be_bytes([header[10], header[11]]);
        header[10..12].fill(0);
        assert_eq!(ipv4_header(&header), theirs);
    }
}
