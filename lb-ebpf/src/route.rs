//! Sending a translated packet on ourselves, as a router would: a FIB
//! lookup for its new destination, the next hop's MAC addresses, one less
//! TTL, then out of the egress interface (a TC redirect or `XDP_TX`).
//!
//! Needed where the stack would refuse the packet: after SNAT, or after
//! rev-NAT of an external flow, its source is one of the node's own
//! addresses, which the stack drops as a martian on input.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::Reason;

use crate::{
    csum,
    packet::{IP_CSUM_OFF, IP_TTL_OFF, Packet, Tuple},
};

const AF_INET: u8 = 2;

/// Where the FIB sends a packet.
pub enum NextHop {
    /// Out of `ifindex`, from `smac` to `dmac`.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Out of `ifindex` to the gateway `gateway`, whose MAC the kernel has
    /// not resolved yet.
    Unresolved { ifindex: u32, gateway: u32 },
}

/// The FIB's answer for `flow` (a packet's addressing after translation) arriving
/// on `ifindex`; `None` when the FIB would not forward it (no route, local
/// destination, forwarding off): the caller leaves it to the stack.
#[inline(always)]
pub fn lookup(ctx: *mut c_void, ifindex: u32, flow: &Tuple) -> Option<NextHop> {
    // SAFETY: a plain C struct; all-zero is its "unset" state.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = flow.proto;
    params.sport = flow.sport;
    params.dport = flow.dport;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = flow.saddr;
    params.__bindgen_anon_4.ipv4_dst = flow.daddr;
    // SAFETY: `ctx` is the program's context; `params` lives on our stack.
    let ret = unsafe { bpf_fib_lookup(ctx, &mut params, size_of::<FibParams>() as i32, 0) };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Some(NextHop::Resolved {
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Some(NextHop::Unresolved {
            ifindex: params.ifindex,
            // SAFETY: IPv4 lookup: the FIB wrote the next hop here.
            gateway: unsafe { params.__bindgen_anon_4.ipv4_dst },
        }),
        _ => None,
    }
}

/// Takes one off the TTL (and fixes the IPv4 checksum); a packet whose TTL
/// runs out is not forwarded.
#[inline(always)]
pub fn decrement_ttl(pkt: &Packet) -> Result<(), Reason> {
    let word = pkt
        .ptr_at::<[u8; 2]>(IP_TTL_OFF)
        .ok_or(Reason::DropMalformed)?;
    let check = pkt
        .ptr_at::<u16>(IP_CSUM_OFF)
        .ok_or(Reason::DropMalformed)?;
    // SAFETY: both bounds-checked just above; headers are not aligned.
    unsafe {
        let [ttl, proto] = core::ptr::read_unaligned(word);
        if ttl <= 1 {
            return Err(Reason::DropTtlExceeded);
        }
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        core::ptr::write_unaligned(word, [ttl - 1, proto]);
        let sum = core::ptr::read_unaligned(check);
        core::ptr::write_unaligned(check, csum::replace2(sum, old, new));
    }
    Ok(())
}

/// Writes the Ethernet addresses of the next hop.
#[inline(always)]
pub fn set_macs(pkt: &Packet, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), Reason> {
    let eth = pkt.ptr_at::<[u8; 12]>(0).ok_or(Reason::DropMalformed)?;
    let mut addrs = [0u8; 12];
    addrs[..6].copy_from_slice(dmac);
    addrs[6..].copy_from_slice(smac);
    // SAFETY: bounds-checked just above.
    unsafe { core::ptr::write_unaligned(eth, addrs) };
    Ok(())
}

/// Forwards a translated TC packet whose addressing is now `flow`: the TC
/// action to return, or `None` to leave it to the stack.
#[inline(always)]
pub fn redirect_tc(ctx: &TcContext, flow: &Tuple) -> Result<Option<i32>, Reason> {
    // SAFETY: reading our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(next) = lookup(ctx.skb.skb as *mut c_void, ifindex, flow) else {
        return Ok(None);
    };
    // The translation's helpers moved the packet: fresh pointers.
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    decrement_ttl(&pkt)?;
    let action = match next {
        NextHop::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            set_macs(&pkt, &smac, &dmac)?;
            // SAFETY: plain values.
            unsafe { bpf_redirect(ifindex, 0) }
        }
        NextHop::Unresolved { ifindex, gateway } => {
            let mut neigh = bpf_redir_neigh {
                nh_family: AF_INET as u32,
                // SAFETY: all-zero is a valid union value.
                __bindgen_anon_1: unsafe { core::mem::zeroed() },
            };
            neigh.__bindgen_anon_1.ipv4_nh = gateway;
            // SAFETY: `neigh` lives on our stack for the call.
            unsafe {
                bpf_redirect_neigh(ifindex, &mut neigh, size_of::<bpf_redir_neigh>() as i32, 0)
            }
        }
    };
    Ok(Some(action as i32))
}
