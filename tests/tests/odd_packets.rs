//! Packets xlb must not break: not IPv4, not TCP/UDP, fragments, IP options,
//! truncated and malformed headers. Pass untouched, or a counted drop when
//! they target a frontend.

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use lb_userspace::datapath::program::{FROM_POD, TO_POD};
use xlb_tests::{
    packet::{Packet, ethernet, flags},
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

#[test]
fn fragments() {
    require_root!();
    let mut lb = lb();
    let mut first = Packet::udp(CLIENT, VIP);
    first.frag = 0x2000; // more fragments, offset 0
    lb.assert_drops(FROM_POD, &first.bytes(), Reason::DropFragment);

    let mut later = Packet::udp(CLIENT, VIP);
    later.frag = 0x0010; // offset 128 bytes, last fragment
    lb.assert_passes_unchanged(FROM_POD, &later.bytes(), Reason::PassFragment);

    let mut first_elsewhere = Packet::udp(CLIENT, OTHER);
    first_elsewhere.frag = 0x2000;
    lb.assert_passes_unchanged(
        FROM_POD,
        &first_elsewhere.bytes(),
        Reason::PassNotLoadBalanced,
    );
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
