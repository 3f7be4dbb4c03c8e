//! Address and port translation with checksum updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

use crate::{
    csum,
    packet::{
        Flow, Fragment, ICMP_CSUM, ICMP_ERROR_LEN, INNER_IP, INNER_L4, IP_CSUM_OFF, IP_DADDR_OFF,
        IP_SADDR_OFF, Packet, TCP_CSUM_OFF, Tuple,
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

    /// The flow's addressing after this rewrite (what the FIB looks up).
    #[inline(always)]
    pub fn apply_to(&self, flow: &Flow) -> Tuple {
        let mut out = Tuple {
            saddr: flow.saddr,
            daddr: flow.daddr,
            sport: flow.sport,
            dport: flow.dport,
            proto: flow.proto,
        };
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
            // A later fragment has no ports to write.
            if !flow.ports.is_null() {
                let port_ptr = (flow.ports as *mut u16).add(port_index);
                core::ptr::write_unaligned(port_ptr, port);
            }
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
    if flow.fragment == Fragment::Later {
        // The L4 checksum lives in the first fragment.
        return Ok(());
    }
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
    if flow.fragment == Fragment::Later {
        return Ok(());
    }
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
    // The quoted TCP header's checksum, when the error quotes that much.
    let tcp_csum = if flow.proto == PROTO_UDP {
        None
    } else {
        pkt.ptr_at::<u16>(flow.l4_off + INNER_L4 + TCP_CSUM_OFF)
    };
    // SAFETY: the region was bounds-checked by the parser, the other fields
    // just above; no helper has moved the packet. Not aligned.
    unsafe {
        let r = &mut *flow.icmp_error;
        let mut sums = IcmpSums {
            icmp: read16::<ICMP_CSUM>(r),
            inner_ip: read16::<{ INNER_IP + 10 }>(r),
            inner_udp: if flow.proto == PROTO_UDP {
                Some(read16::<{ INNER_L4 + 6 }>(r)).filter(|sum| *sum != 0)
            } else {
                None
            },
            inner_tcp: tcp_csum.map(|p| core::ptr::read_unaligned(p)),
        };
        if let Some((addr, port)) = rewrite.source.get() {
            let outer = core::ptr::read_unaligned(outer_saddr) == flow.saddr;
            quoted_end::<{ INNER_IP + 16 }, { INNER_L4 + 2 }>(r, &mut sums, flow.saddr, addr, port);
            if outer {
                core::ptr::write_unaligned(outer_saddr, addr);
                let sum = core::ptr::read_unaligned(outer_csum);
                core::ptr::write_unaligned(outer_csum, csum::replace4(sum, flow.saddr, addr));
            }
        }
        if let Some((addr, port)) = rewrite.destination.get() {
            let outer = core::ptr::read_unaligned(outer_daddr) == flow.daddr;
            quoted_end::<{ INNER_IP + 12 }, INNER_L4>(r, &mut sums, flow.daddr, addr, port);
            if outer {
                core::ptr::write_unaligned(outer_daddr, addr);
                let sum = core::ptr::read_unaligned(outer_csum);
                core::ptr::write_unaligned(outer_csum, csum::replace4(sum, flow.daddr, addr));
            }
        }
        // The quoted checksums are ICMP payload too.
        let old = read16::<{ INNER_IP + 10 }>(r);
        sums.icmp = csum::replace2(sums.icmp, old, sums.inner_ip);
        write16::<{ INNER_IP + 10 }>(r, sums.inner_ip);
        if let Some(mut sum) = sums.inner_udp {
            if sum == 0 {
                sum = 0xffff;
            }
            let old = read16::<{ INNER_L4 + 6 }>(r);
            sums.icmp = csum::replace2(sums.icmp, old, sum);
            write16::<{ INNER_L4 + 6 }>(r, sum);
        }
        if let (Some(ptr), Some(sum)) = (tcp_csum, sums.inner_tcp) {
            sums.icmp = csum::replace2(sums.icmp, core::ptr::read_unaligned(ptr), sum);
            core::ptr::write_unaligned(ptr, sum);
        }
        write16::<ICMP_CSUM>(r, sums.icmp);
    }
    Ok(())
}

/// The checksums an ICMP error's translation updates, as they become.
struct IcmpSums {
    icmp: u16,
    inner_ip: u16,
    /// `None` for TCP, and for UDP without a checksum.
    inner_udp: Option<u16>,
    /// When the quoted TCP header is there in full.
    inner_tcp: Option<u16>,
}

/// Writes one end of the quoted packet (address at `ADDR`, port at `PORT`
/// of the region; constants, so no bounds check survives) and moves every
/// checksum that covers it.
#[inline(always)]
fn quoted_end<const ADDR: usize, const PORT: usize>(
    r: &mut [u8; ICMP_ERROR_LEN],
    sums: &mut IcmpSums,
    old_addr: u32,
    addr: u32,
    port: u16,
) {
    let old_port = read16::<PORT>(r);
    r[ADDR..ADDR + 4].copy_from_slice(&addr.to_ne_bytes());
    write16::<PORT>(r, port);
    sums.icmp = csum::replace2(csum::replace4(sums.icmp, old_addr, addr), old_port, port);
    sums.inner_ip = csum::replace4(sums.inner_ip, old_addr, addr);
    if let Some(sum) = sums.inner_udp.as_mut() {
        *sum = csum::replace2(csum::replace4(*sum, old_addr, addr), old_port, port);
    }
    if let Some(sum) = sums.inner_tcp.as_mut() {
        *sum = csum::replace2(csum::replace4(*sum, old_addr, addr), old_port, port);
    }
}

#[inline(always)]
fn read16<const AT: usize>(r: &[u8; ICMP_ERROR_LEN]) -> u16 {
    u16::from_ne_bytes([r[AT], r[AT + 1]])
}

#[inline(always)]
fn write16<const AT: usize>(r: &mut [u8; ICMP_ERROR_LEN], value: u16) {
    r[AT..AT + 2].copy_from_slice(&value.to_ne_bytes());
}
