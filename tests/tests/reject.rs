//! Frontends without endpoints: TCP gets a reset and UDP an ICMP port
//! unreachable from the frontend, sent back where the packet came from —
//! except under a Local policy without local endpoints, which drops.

use std::net::Ipv4Addr;

use lb_common::{PROTO_TCP, PROTO_UDP, Reason, frontend_flags};
use lb_userspace::datapath::program::FROM_POD;
use xlb_tests::{
    checksum,
    packet::{Packet, addr, flags, seen},
    require_root,
    test_lb::{TC_ACT_REDIRECT, TestLb},
};

const CLIENT: &str = "10.244.1.5:40000";
const VIP: &str = "10.96.0.10:80";

fn empty(proto: u8, flags: u16) -> TestLb {
    let mut lb = TestLb::load();
    lb.add_frontend_flagged(VIP, proto, &[], flags);
    lb
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[test]
fn tcp_gets_a_reset_from_the_frontend() {
    require_root!();
    // (their flags, expected our flags, expected seq, expected ack)
    let cases = [
        ("syn", flags::SYN, flags::RST | flags::ACK, 0, 1000 + 1),
        (
            "syn with data",
            flags::SYN,
            flags::RST | flags::ACK,
            0,
            1000 + 1 + 5,
        ),
        ("ack segment", flags::ACK | flags::PSH, flags::RST, 2000, 0),
    ];
    for (name, their, ours, seq, ack) in cases {
        let mut lb = empty(PROTO_TCP, 0);
        let mut packet = Packet::tcp(CLIENT, VIP, their);
        if name == "syn" {
            packet.payload.clear();
        }
        let out = lb.run(FROM_POD, &packet.bytes());
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "{name}: back out the way it came"
        );
        assert_eq!(out.frame.len(), 54, "{name}: Ethernet + IPv4 + TCP only");
        let got = seen(&out.frame);
        assert_eq!((got.src, got.dst), (addr(VIP), addr(CLIENT)), "{name}");
        let tcp = &out.frame[34..];
        assert_eq!(tcp[13], ours, "{name}: flags");
        assert_eq!(be32(&tcp[4..8]), seq, "{name}: seq");
        assert_eq!(be32(&tcp[8..12]), ack, "{name}: ack");
        assert_eq!(
            &out.frame[0..6],
            &packet.bytes()[6..12],
            "{name}: to the sender's MAC"
        );
        assert_eq!(lb.counted(), vec![(Reason::RejectNoBackend, 1)], "{name}");
    }
}

#[test]
fn udp_gets_icmp_port_unreachable_quoting_the_datagram() {
    require_root!();
    let mut lb = empty(PROTO_UDP, 0);
    let input = Packet::udp(CLIENT, VIP).bytes();
    let out = lb.run(FROM_POD, &input);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let f = &out.frame;
    assert_eq!(f.len(), 14 + 20 + 8 + 20 + 8);
    let ip = &f[14..34];
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        *addr(VIP).ip()
    );
    assert_eq!(
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        *addr(CLIENT).ip()
    );
    let mut header = ip.to_vec();
    header[10..12].fill(0);
    assert_eq!(
        u16::from_be_bytes([ip[10], ip[11]]),
        checksum::ipv4_header(&header)
    );
    let icmp = &f[34..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 3),
        "destination unreachable, port unreachable"
    );
    let mut body = icmp.to_vec();
    body[2..4].fill(0);
    let want = checksum::ipv4_header(&body); // the plain RFC 1071 sum
    assert_eq!(
        u16::from_be_bytes([icmp[2], icmp[3]]),
        want,
        "ICMP checksum"
    );
    assert_eq!(
        &icmp[8..36],
        &input[14..42],
        "quotes the IPv4 header and 8 bytes"
    );
    assert_eq!(lb.counted(), vec![(Reason::RejectNoBackend, 1)]);
}

#[test]
fn local_policy_without_local_endpoints_drops() {
    require_root!();
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut lb = empty(proto, frontend_flags::DROP_WHEN_EMPTY);
        let packet = match proto {
            PROTO_TCP => Packet::tcp(CLIENT, VIP, flags::SYN),
            _ => Packet::udp(CLIENT, VIP),
        };
        lb.assert_drops(FROM_POD, &packet.bytes(), Reason::DropNoLocalBackend);
    }
}

#[test]
fn resets_and_ip_options_are_dropped_not_answered() {
    require_root!();
    let mut lb = empty(PROTO_TCP, 0);
    let reset = Packet::tcp(CLIENT, VIP, flags::RST).bytes();
    lb.assert_drops(FROM_POD, &reset, Reason::DropNoBackend);
    let mut with_options = Packet::tcp(CLIENT, VIP, flags::SYN);
    with_options.ip_options = vec![1, 1, 1, 0];
    lb.assert_drops(FROM_POD, &with_options.bytes(), Reason::DropNoBackend);
}
