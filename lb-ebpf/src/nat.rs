//! Address and port translation with checksum updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

use crate::{
    csum,
    packet::{
        Flow, ICMP_CSUM, INNER_IP, INNER_L4, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet,
        TCP_CSUM_OFF,
    },
};

/// New addresses and ports for one packet.
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub source: NewEnd,
    pub destination: NewEnd,
}

/// The new address and port (wire order) of one end of a packet, or that
/// end left alone. Not an `Option`: a `None` leaves its payload undefined,
/// and the verifier refuses to copy undefined stack bytes.
#[derive(Clone, Copy)]
pub struct NewEnd {
    addr: u32,
    port: u16,
    set: bool,
}

impl NewEnd {
    /// This end stays as it is.
    pub const KEEP: NewEnd = NewEnd {
        addr: 0,
        port: 0,
        set: false,
    };

    /// This end becomes `addr:port`.
    #[inline(always)]
    pub fn to(addr: u32, port: u16) -> Self {
        NewEnd {
            addr,
            port,
            set: true,
        }
    }

    /// [`Self::to`] when `cond`, otherwise [`Self::KEEP`].
    #[inline(always)]
    pub fn to_if(cond: bool, addr: u32, port: u16) -> Self {
        if cond {
            Self::to(addr, port)
        } else {
            Self::KEEP
        }
    }

    #[inline(always)]
    fn get(self) -> Option<(u32, u16)> {
        self.set.then_some((self.addr, self.port))
    }
}

/// One end of a rewrite: (old address, old port, new address, new port,
/// address offset, port index).
type End = (u32, u16, u32, u16, usize, usize);

impl Rewrite {
    /// Source first, then destination; `None` for an end left alone.
    #[inline(always)]
    fn ends(&self, flow: &Flow) -> [Option<End>; 2] {
        [
            self.source
                .get()
                .map(|(addr, port)| (flow.saddr, flow.sport, addr, port, IP_SADDR_OFF, 0)),
            self.destination
                .get()
                .map(|(addr, port)| (flow.daddr, flow.dport, addr, port, IP_DADDR_OFF, 1)),
        ]
    }

    /// The flow's addressing after this rewrite.
    #[inline(always)]
    pub fn apply_to(&self, flow: &Flow) -> Flow {
        let mut out = *flow;
        if let Some((addr, port)) = self.source.get() {
            out.saddr = addr;
            out.sport = port;
        }
        if let Some((addr, port)) = self.destination.get() {
            out.daddr = addr;
            out.dport = port;
        }
        out
    }
}

/// Writes the new addresses and ports, and the IPv4 checksum, which is
/// always complete and is updated incrementally.
#[inline(always)]
fn rewrite_headers(pkt: &Packet, flow: &Flow, ends: &[Option<End>; 2]) -> Result<(), i64> {
    let ip_csum_ptr = pkt.ptr_at::<u16>(IP_CSUM_OFF).ok_or(-1)?;
    for (old_addr, _, addr, port, addr_off, port_index) in ends.iter().flatten().copied() {
        let addr_ptr = pkt.ptr_at::<u32>(addr_off).ok_or(-1)?;
        // SAFETY: the address and checksum pointers were bounds-checked
        // above, the ports by the parser; no helper has moved the packet
        // yet. Headers are not aligned.
        unsafe {
            core::ptr::write_unaligned(addr_ptr, addr);
            let ip_csum = core::ptr::read_unaligned(ip_csum_ptr);
            core::ptr::write_unaligned(ip_csum_ptr, csum::replace4(ip_csum, old_addr, addr));
            let port_ptr = (flow.ports as *mut u16).add(port_index);
            core::ptr::write_unaligned(port_ptr, port);
        }
    }
    Ok(())
}

/// Applies `rewrite` to a TC packet.
///
/// The L4 checksum goes through `bpf_l4_csum_replace`, which knows
/// `skb->ip_summed`: with CHECKSUM_PARTIAL (pod traffic with offload) only
/// the pseudo-header part of the field may change, and with
/// CHECKSUM_COMPLETE `skb->csum` must follow. Nothing is skipped when old and
/// new values are equal, so every packet of a path costs the same.
#[inline(always)]
pub fn rewrite_tc(
    ctx: &TcContext,
    pkt: &Packet,
    flow: &Flow,
    rewrite: &Rewrite,
) -> Result<(), i64> {
    let ends = rewrite.ends(flow);
    rewrite_headers(pkt, flow, &ends)?;
    // UDP: a zero checksum means "none" and must stay zero (and a computed
    // zero is written as 0xffff).
    let mangled = if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = flow.l4_csum_off();
    // These helpers invalidate packet pointers; none is used after them.
    for (old_addr, old_port, addr, port, _, _) in ends.iter().flatten().copied() {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )?;
        ctx.l4_csum_replace(csum_off, old_port as u64, port as u64, mangled | 2)?;
    }
    Ok(())
}

/// Applies `rewrite` to an XDP frame. XDP sees frames as they came off the
/// wire, with complete checksums, so the L4 checksum is updated
/// incrementally like the IPv4 one (the addresses are part of its
/// pseudo-header). A UDP datagram without a checksum keeps none.
#[inline(always)]
pub fn rewrite_xdp(pkt: &Packet, flow: &Flow, rewrite: &Rewrite) -> Result<(), i64> {
    let ends = rewrite.ends(flow);
    rewrite_headers(pkt, flow, &ends)?;
    if flow.l4_csum.is_null() {
        return Err(-1);
    }
    // SAFETY: bounds-checked by the parser (non-null only then).
    let mut check = unsafe { core::ptr::read_unaligned(flow.l4_csum) };
    if flow.proto == PROTO_UDP && check == 0 {
        return Ok(());
    }
    for (old_addr, old_port, addr, port, _, _) in ends.iter().flatten().copied() {
        check = csum::replace4(check, old_addr, addr);
        check = csum::replace2(check, old_port, port);
    }
    if flow.proto == PROTO_UDP && check == 0 {
        check = 0xffff;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_unaligned(flow.l4_csum, check) };
    Ok(())
}

/// Applies `rewrite` — the translation of the flow an ICMP error quotes —
/// to that error, in TC or XDP alike (direct writes; every checksum is
/// updated incrementally, so a CHECKSUM_COMPLETE skb's sum stays right).
///
/// The flow's ends are the quoted packet's reversed: its new source goes
/// into the quoted destination, its new destination into the quoted
/// source. The outer addresses follow where they are the flow's own (an
/// error from the backend itself, or to the node's SNAT address); an error
/// from a router on the way keeps the router's address.
#[inline(always)]
pub fn rewrite_icmp_error(pkt: &Packet, flow: &Flow, rewrite: &Rewrite) -> Result<(), i64> {
    let outer_csum = pkt.ptr_at::<u16>(IP_CSUM_OFF).ok_or(-1)?;
    let outer_saddr = pkt.ptr_at::<u32>(IP_SADDR_OFF).ok_or(-1)?;
    let outer_daddr = pkt.ptr_at::<u32>(IP_DADDR_OFF).ok_or(-1)?;
    // SAFETY: the region was bounds-checked by the parser, the outer header
    // fields just above; no helper has moved the packet. Not aligned.
    unsafe {
        let r = &mut *flow.icmp_error;
        let mut icmp_csum = u16::from_ne_bytes([r[ICMP_CSUM], r[ICMP_CSUM + 1]]);
        let mut inner_csum = u16::from_ne_bytes([r[INNER_IP + 10], r[INNER_IP + 11]]);
        let inner_udp_csum =
            flow.proto == PROTO_UDP && u16::from_ne_bytes([r[INNER_L4 + 6], r[INNER_L4 + 7]]) != 0;
        let mut l4_csum = u16::from_ne_bytes([r[INNER_L4 + 6], r[INNER_L4 + 7]]);
        // The quoted TCP header's checksum, when the error quotes that much.
        let tcp_csum = if flow.proto == PROTO_UDP {
            None
        } else {
            pkt.ptr_at::<u16>(flow.l4_off + INNER_L4 + TCP_CSUM_OFF)
        };
        let mut tcp_sum = tcp_csum.map(|p| core::ptr::read_unaligned(p));
        // (new end, quoted address offset, quoted port offset, outer field
        // that carries the same address)
        let ends = [
            (
                rewrite.source.get(),
                INNER_IP + 16,
                INNER_L4 + 2,
                flow.saddr,
                outer_saddr,
            ),
            (
                rewrite.destination.get(),
                INNER_IP + 12,
                INNER_L4,
                flow.daddr,
                outer_daddr,
            ),
        ];
        for (new, addr_at, port_at, old_addr, outer) in ends {
            let Some((addr, port)) = new else { continue };
            let old_port = u16::from_ne_bytes([r[port_at], r[port_at + 1]]);
            r[addr_at..addr_at + 4].copy_from_slice(&addr.to_ne_bytes());
            r[port_at..port_at + 2].copy_from_slice(&port.to_ne_bytes());
            icmp_csum = csum::replace4(icmp_csum, old_addr, addr);
            icmp_csum = csum::replace2(icmp_csum, old_port, port);
            inner_csum = csum::replace4(inner_csum, old_addr, addr);
            if inner_udp_csum {
                l4_csum = csum::replace4(l4_csum, old_addr, addr);
                l4_csum = csum::replace2(l4_csum, old_port, port);
            }
            if let Some(sum) = tcp_sum.as_mut() {
                *sum = csum::replace4(*sum, old_addr, addr);
                *sum = csum::replace2(*sum, old_port, port);
            }
            if core::ptr::read_unaligned(outer) == old_addr {
                core::ptr::write_unaligned(outer, addr);
                let sum = core::ptr::read_unaligned(outer_csum);
                core::ptr::write_unaligned(outer_csum, csum::replace4(sum, old_addr, addr));
            }
        }
        let old_inner_csum = u16::from_ne_bytes([r[INNER_IP + 10], r[INNER_IP + 11]]);
        icmp_csum = csum::replace2(icmp_csum, old_inner_csum, inner_csum);
        r[INNER_IP + 10..INNER_IP + 12].copy_from_slice(&inner_csum.to_ne_bytes());
        if inner_udp_csum {
            if l4_csum == 0 {
                l4_csum = 0xffff;
            }
            let old = u16::from_ne_bytes([r[INNER_L4 + 6], r[INNER_L4 + 7]]);
            icmp_csum = csum::replace2(icmp_csum, old, l4_csum);
            r[INNER_L4 + 6..INNER_L4 + 8].copy_from_slice(&l4_csum.to_ne_bytes());
        }
        if let (Some(ptr), Some(sum)) = (tcp_csum, tcp_sum) {
            icmp_csum = csum::replace2(icmp_csum, core::ptr::read_unaligned(ptr), sum);
            core::ptr::write_unaligned(ptr, sum);
        }
        r[ICMP_CSUM..ICMP_CSUM + 2].copy_from_slice(&icmp_csum.to_ne_bytes());
    }
    Ok(())
}
