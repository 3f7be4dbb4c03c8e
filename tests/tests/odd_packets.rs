//! Packets xlb must not break: not IPv4, not TCP/UDP, fragments, IP options,
//! truncated and malformed headers. Pass untouched, or a counted drop when
//! they target a frontend.

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use lb_userspace::datapath::program::{FROM_POD, TO_POD};
use xlb_tests::{
    packet::{Packet, addr, ethernet, flags, fragments, seen_reassembled},
    require_root,
    test_lb::TestLb,
};

const CLIENT: &str = "10.244.1.5:40000";
const VIP: &str = "10.96.0.10:80";
const OTHER: &str = "10.244.9.9:80";

fn lb() -> TestLb {
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, PROTO_TCP, &["10.244.2.7:8080"]);
    lb.add_frontend(VIP, PROTO_UDP, &["10.244.2.7:8080"]);
    lb
}

fn ipv6_frame() -> Vec<u8> {
    let mut ip6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    ip6.extend_from_slice(&[0xfd; 16]);
    ip6.extend_from_slice(&[0xfe; 16]);
    ip6.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 8, 0, 0]);
    ethernet(0x86dd, &ip6)
}

fn arp_frame() -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 244, 1, 5]);
    arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 96, 0, 10]);
    ethernet(0x0806, &arp)
}

fn icmp_echo_to_vip() -> Vec<u8> {
    let mut frame = Packet::tcp(CLIENT, VIP, 0).bytes();
    frame[14 + 9] = 1; // protocol ICMP; the checksums no longer matter
    frame
}

fn with_ip_byte(mut frame: Vec<u8>, offset: usize, value: u8) -> Vec<u8> {
    frame[14 + offset] = value;
    frame
}

#[test]
fn foreign_traffic_passes_untouched() {
    require_root!();
    let mut lb = lb();
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "tcp to a non-frontend",
            Packet::tcp(CLIENT, OTHER, flags::SYN).bytes(),
            Reason::PassNotLoadBalanced,
        ),
        (
            "udp to a non-frontend",
            Packet::udp(CLIENT, OTHER).bytes(),
            Reason::PassNotLoadBalanced,
        ),
        (
            "icmp to the frontend address",
            icmp_echo_to_vip(),
            Reason::PassNotLoadBalanced,
        ),
        ("ipv6", ipv6_frame(), Reason::PassNotIpv4),
        ("arp", arp_frame(), Reason::PassNotIpv4),
    ];
    for (name, frame, reason) in cases {
        eprintln!("case: {name}");
        lb.assert_passes_unchanged(FROM_POD, &frame, reason);
        lb.assert_passes_unchanged(TO_POD, &frame, reason);
    }
}

/// A datagram of `len` payload bytes.
fn big_udp(src: &str, dst: &str, len: usize) -> Packet {
    let mut packet = Packet::udp(src, dst);
    packet.payload = (0..len).map(|i| i as u8).collect();
    packet
}

#[test]
fn fragments_follow_their_first_one() {
    require_root!();
    let mut lb = lb();
    // To the Service: the first fragment is balanced, the later one follows
    // it; together they are one datagram to the backend, checksum right.
    let [first, later] = fragments(&big_udp(CLIENT, VIP, 600), 208);
    let out_first = lb.run(FROM_POD, &first);
    let out_later = lb.run(FROM_POD, &later);
    let got = seen_reassembled(&out_first.frame, &out_later.frame);
    let backend = got.dst;
    assert_ne!(backend, addr(VIP));
    assert_eq!(got.src, addr(CLIENT));
    assert_eq!(
        lb.counted(),
        vec![(Reason::ForwardNew, 1), (Reason::ForwardEstablished, 1)]
    );
    // The backend's fragmented reply comes back from the Service.
    let [first, later] = fragments(&big_udp(&backend.to_string(), CLIENT, 600), 208);
    let out_first = lb.run(TO_POD, &first);
    let out_later = lb.run(TO_POD, &later);
    let got = seen_reassembled(&out_first.frame, &out_later.frame);
    assert_eq!((got.src, got.dst), (addr(VIP), addr(CLIENT)));
}

/// Before its first, a fragment's flow is unknown: addressed to an
/// address only Services use, it is surely ours and dropped; anywhere else
/// (a node's or a pod's address) it passes untouched — it may not be ours.
/// Counted either way; no flow created.
#[test]
fn a_fragment_before_its_first_is_dropped_only_where_it_is_surely_ours() {
    require_root!();
    let mut lb = lb();
    let [_, to_service] = fragments(&big_udp(CLIENT, VIP, 600), 208);
    let [_, elsewhere] = fragments(&big_udp(CLIENT, OTHER, 600), 208);
    lb.assert_passes_unchanged(FROM_POD, &to_service, Reason::PassFragmentOutOfOrder);
    lb.add_service_addr("10.96.0.10");
    lb.assert_drops(FROM_POD, &to_service, Reason::DropFragmentOutOfOrder);
    lb.assert_passes_unchanged(FROM_POD, &elsewhere, Reason::PassFragmentOutOfOrder);
    assert!(lb.conntrack().is_empty());
}

/// A later fragment whose flow went away meanwhile (evicted) follows
/// nothing: it never starts a flow of its own, so a datagram never splits.
#[test]
fn a_later_fragment_never_creates_a_flow() {
    require_root!();
    let mut lb = lb();
    let [first, later] = fragments(&big_udp(CLIENT, VIP, 600), 208);
    lb.run(FROM_POD, &first);
    for (key, _) in lb.conntrack() {
        lb.maps.conntrack.remove(&key).unwrap();
    }
    let out = lb.run(FROM_POD, &later);
    assert_eq!(out.frame, later, "untouched");
    assert!(lb.conntrack().is_empty());
    assert!(lb.counted().contains(&(Reason::PassFragment, 1)));
}

#[test]
fn fragments_not_ours_pass_untouched() {
    require_root!();
    let mut lb = lb();
    let [first, later] = fragments(&big_udp(CLIENT, OTHER, 600), 208);
    lb.assert_passes_unchanged(FROM_POD, &first, Reason::PassNotLoadBalanced);
    lb.assert_passes_unchanged(FROM_POD, &later, Reason::PassNotLoadBalanced);
    // Not TCP or UDP: no ports to follow.
    let mut ping = Packet::udp(CLIENT, VIP);
    ping.proto = 1;
    let [_, later] = fragments(&ping, 8);
    lb.assert_passes_unchanged(FROM_POD, &later, Reason::PassFragment);
}

#[test]
fn truncated_and_malformed_headers() {
    require_root!();
    let mut lb = lb();
    // TCP header cut after the ports and sequence number.
    let tcp = Packet::tcp(CLIENT, VIP, flags::SYN);
    lb.assert_drops(FROM_POD, &tcp.truncated_l4(8), Reason::DropMalformed);
    let tcp_elsewhere = Packet::tcp(CLIENT, OTHER, flags::SYN);
    lb.assert_passes_unchanged(
        FROM_POD,
        &tcp_elsewhere.truncated_l4(8),
        Reason::PassMalformed,
    );
    // UDP header cut after the ports.
    let udp = Packet::udp(CLIENT, VIP);
    lb.assert_drops(FROM_POD, &udp.truncated_l4(4), Reason::DropMalformed);
    // Not even the ports.
    lb.assert_passes_unchanged(FROM_POD, &udp.truncated_l4(2), Reason::PassMalformed);
    // TCP data offset below 5 words.
    let mut bad_doff = tcp.bytes();
    bad_doff[14 + 20 + 12] = 4 << 4;
    lb.assert_drops(FROM_POD, &bad_doff, Reason::DropMalformed);
    // IPv4 header length below 20 bytes, and a wrong version nibble. (A
    // frame with less than a whole IPv4 header cannot be run here:
    // BPF_PROG_TEST_RUN refuses such an skb with EINVAL.)
    let frame = tcp.bytes();
    lb.assert_passes_unchanged(
        FROM_POD,
        &with_ip_byte(frame.clone(), 0, 0x44),
        Reason::PassMalformed,
    );
    lb.assert_passes_unchanged(
        FROM_POD,
        &with_ip_byte(frame, 0, 0x65),
        Reason::PassMalformed,
    );
}
