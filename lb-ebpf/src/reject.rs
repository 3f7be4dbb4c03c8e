//! Answering for a frontend without endpoints, as kube-proxy's REJECT: the
//! client's packet is turned, in place, into the reply — a TCP reset or an
//! ICMP port unreachable from the frontend — and sent back where it came
//! from. The client sees "connection refused" at once, not a timeout.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    helpers::{bpf_csum_diff, bpf_skb_adjust_room, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::PROTO_TCP;

use crate::packet::{ETH_HLEN, Flow, Fragment, IP_OFF, Packet, tcp_flags};

const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const L4_OFF: usize = IP_OFF + IP_HLEN;
/// Ethernet + IPv4 + TCP: the reset.
const RST_LEN: usize = L4_OFF + TCP_HLEN;
/// ICMP header, then the offending IPv4 header and its first 8 bytes.
const ICMP_HLEN: usize = 8;
const ICMP_DATA_LEN: usize = IP_HLEN + 8;
const ICMP_LEN: usize = L4_OFF + ICMP_HLEN + ICMP_DATA_LEN;
const PROTO_ICMP: u8 = 1;

/// Rewrites the packet of `flow` into its rejection. `Err` when it cannot
/// (IP options, an RST, a failed helper): the caller drops it instead.
#[inline(always)]
pub fn reply_tc(ctx: &TcContext, flow: &Flow) -> Result<(), i64> {
    // A later fragment has no L4 header to answer from.
    if flow.l4_off != L4_OFF || flow.fragment == Fragment::Later {
        return Err(-1);
    }
    if flow.proto == PROTO_TCP {
        tcp_reset(ctx, flow)
    } else {
        icmp_port_unreachable(ctx, flow)
    }
}

/// The reset RFC 793 sends for a segment to a closed port: with the
/// segment's ACK as its sequence number, or else acknowledging the segment.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, flow: &Flow) -> Result<(), i64> {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let ip = pkt.ptr_at::<[u8; IP_HLEN]>(IP_OFF).ok_or(-1)?;
    let tcp = pkt.ptr_at::<[u8; TCP_HLEN]>(L4_OFF).ok_or(-1)?;
    // SAFETY: bounds-checked just above.
    let (ip, tcp) = unsafe { (*ip, *tcp) };
    let their_flags = tcp[13];
    if their_flags & tcp_flags::RST != 0 {
        return Err(-1); // Never answer a reset.
    }
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as u32;
    let header_len = IP_HLEN as u32 + ((tcp[12] >> 4) as u32) * 4;
    let mut seg_len = total_len.saturating_sub(header_len);
    if their_flags & tcp_flags::SYN != 0 {
        seg_len += 1;
    }
    if their_flags & tcp_flags::FIN != 0 {
        seg_len += 1;
    }
    let their_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let their_ack = [tcp[8], tcp[9], tcp[10], tcp[11]];
    let (seq, ack, flags) = if their_flags & tcp_flags::ACK != 0 {
        (their_ack, [0; 4], tcp_flags::RST)
    } else {
        let ack = their_seq.wrapping_add(seg_len).to_be_bytes();
        ([0; 4], ack, tcp_flags::RST | tcp_flags::ACK)
    };
    // SAFETY: a helper on our own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST_LEN as u32, 0) } != 0 {
        return Err(-1);
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let frame = pkt.ptr_at::<[u8; RST_LEN]>(0).ok_or(-1)?;
    // SAFETY: the whole reset is in the packet (checked just above).
    let frame = unsafe { &mut *frame };
    swap_macs(frame);
    write_ip_header(
        frame,
        PROTO_TCP,
        (IP_HLEN + TCP_HLEN) as u16,
        flow.daddr,
        flow.saddr,
    );
    let t = &mut frame[L4_OFF..L4_OFF + TCP_HLEN];
    t[0..2].copy_from_slice(&flow.dport.to_ne_bytes());
    t[2..4].copy_from_slice(&flow.sport.to_ne_bytes());
    t[4..8].copy_from_slice(&seq);
    t[8..12].copy_from_slice(&ack);
    t[12] = (TCP_HLEN as u8 / 4) << 4;
    t[13] = flags;
    t[14..20].copy_from_slice(&[0; 6]); // window, checksum, urgent pointer
    let seed = pseudo_header_sum(flow.daddr, flow.saddr, PROTO_TCP, TCP_HLEN as u16);
    let sum = checksum(frame[L4_OFF..].as_mut_ptr(), TCP_HLEN as u32, seed)?;
    frame[L4_OFF + 16..L4_OFF + 18].copy_from_slice(&sum.to_ne_bytes());
    Ok(())
}

/// ICMP destination unreachable, port unreachable (RFC 792), from the
/// frontend, quoting the datagram's IPv4 header and first 8 bytes.
#[inline(always)]
fn icmp_port_unreachable(ctx: &TcContext, flow: &Flow) -> Result<(), i64> {
    // Keep Ethernet + IPv4 + the UDP header, then open room for the new
    // IPv4 and ICMP headers right after the IPv4 header:
    //   eth | ip | udp  →  eth | ip | (28 bytes) | udp
    // SAFETY: helpers on our own context.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, (L4_OFF + 8) as u32, 0) != 0 {
            return Err(-1);
        }
        let room = (ICMP_HLEN + IP_HLEN) as i32;
        if bpf_skb_adjust_room(ctx.skb.skb, room, BPF_ADJ_ROOM_NET, 0) != 0 {
            return Err(-1);
        }
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let frame = pkt.ptr_at::<[u8; ICMP_LEN]>(0).ok_or(-1)?;
    // SAFETY: the whole reply is in the packet (checked just above).
    let frame = unsafe { &mut *frame };
    // The offending IPv4 header moves behind the ICMP header; the UDP
    // header already sits right after it.
    let quoted = L4_OFF + ICMP_HLEN;
    frame.copy_within(IP_OFF..IP_OFF + IP_HLEN, quoted);
    swap_macs(frame);
    let len = (IP_HLEN + ICMP_HLEN + ICMP_DATA_LEN) as u16;
    write_ip_header(frame, PROTO_ICMP, len, flow.daddr, flow.saddr);
    let icmp = &mut frame[L4_OFF..L4_OFF + ICMP_HLEN];
    icmp.copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    let sum = checksum(
        frame[L4_OFF..].as_mut_ptr(),
        (ICMP_HLEN + ICMP_DATA_LEN) as u32,
        0,
    )?;
    frame[L4_OFF + 2..L4_OFF + 4].copy_from_slice(&sum.to_ne_bytes());
    Ok(())
}

#[inline(always)]
fn swap_macs(frame: &mut [u8]) {
    for i in 0..6 {
        frame.swap(i, i + 6);
    }
}

/// A fresh 20-byte IPv4 header at [`IP_OFF`], checksum included.
#[inline(always)]
fn write_ip_header(frame: &mut [u8], proto: u8, total_len: u16, saddr: u32, daddr: u32) {
    let ip = &mut frame[ETH_HLEN..ETH_HLEN + IP_HLEN];
    let len = total_len.to_be_bytes();
    ip[..12].copy_from_slice(&[0x45, 0, len[0], len[1], 0, 0, 0x40, 0, 64, proto, 0, 0]);
    ip[12..16].copy_from_slice(&saddr.to_ne_bytes());
    ip[16..20].copy_from_slice(&daddr.to_ne_bytes());
    if let Ok(sum) = checksum(ip.as_mut_ptr(), IP_HLEN as u32, 0) {
        ip[10..12].copy_from_slice(&sum.to_ne_bytes());
    }
}

/// The ones'-complement sum of the IPv4 pseudo-header (RFC 793).
#[inline(always)]
fn pseudo_header_sum(saddr: u32, daddr: u32, proto: u8, len: u16) -> u32 {
    (saddr & 0xffff)
        + (saddr >> 16)
        + (daddr & 0xffff)
        + (daddr >> 16)
        + u16::from_ne_bytes([0, proto]) as u32
        + u16::from_ne_bytes(len.to_be_bytes()) as u32
}

/// The checksum of `len` bytes (a multiple of 4) at `data`, over `seed`.
#[inline(always)]
fn checksum(data: *mut u8, len: u32, seed: u32) -> Result<u16, i64> {
    // SAFETY: `data..data+len` lies in the bounds-checked frame.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data.cast(), len, seed) };
    if sum < 0 {
        return Err(sum);
    }
    let mut sum = sum as u64;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    Ok(!(sum as u16))
}
