//! Address and port translation with checksum updates.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

use crate::{
    csum,
    packet::{Flow, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Packet},
};

/// New addresses and ports for one packet; `None` leaves that end alone.
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub source: Option<(u32, u16)>,
    pub destination: Option<(u32, u16)>,
}

/// Applies `rewrite` to a TC packet.
///
/// The IPv4 header (addresses and their checksum) and the ports are written
/// directly: the IPv4 checksum is always complete. The L4 checksum goes
/// through `bpf_l4_csum_replace`, which knows `skb->ip_summed`: with
/// CHECKSUM_PARTIAL (pod traffic with offload) only the pseudo-header part
/// of the field may change, and with CHECKSUM_COMPLETE `skb->csum` must
/// follow. Nothing is skipped when old and new values are equal, so every
/// packet of a path costs the same.
#[inline(always)]
pub fn rewrite_tc(
    ctx: &TcContext,
    pkt: &Packet,
    flow: &Flow,
    rewrite: &Rewrite,
) -> Result<(), i64> {
    // (old address, old port, new address, new port, address offset, port index)
    let ends = [
        rewrite
            .source
            .map(|(addr, port)| (flow.saddr, flow.sport, addr, port, IP_SADDR_OFF, 0)),
        rewrite
            .destination
            .map(|(addr, port)| (flow.daddr, flow.dport, addr, port, IP_DADDR_OFF, 1)),
    ];
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
