//! DNAT of new flows to a frontend: addresses, ports and every checksum.

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use lb_userspace::datapath::program::FROM_POD;
use xlb_tests::{
    packet::{Packet, addr, flags, seen},
    require_root,
    test_lb::{TC_ACT_OK, TestLb},
};

const CLIENT: &str = "10.244.1.5:40000";
const VIP: &str = "10.96.0.10:80";
const BACKEND: &str = "10.244.2.7:8080";

/// One case: a packet to the frontend and the frame expected out.
struct Case {
    name: &'static str,
    packet: Packet,
}

fn cases() -> Vec<Case> {
    let mut udp_no_csum = Packet::udp(CLIENT, VIP);
    udp_no_csum.udp_no_checksum = true;
    let mut odd_payload = Packet::tcp(CLIENT, VIP, flags::ACK | flags::PSH);
    odd_payload.payload = b"odd".to_vec();
    let mut with_options = Packet::tcp(CLIENT, VIP, flags::SYN);
    // Record Route with room for one address, then end-of-options.
    with_options.ip_options = vec![7, 7, 4, 0, 0, 0, 0, 0];
    vec![
        Case {
            name: "tcp syn",
            packet: Packet::tcp(CLIENT, VIP, flags::SYN),
        },
        Case {
            name: "tcp odd-length payload",
            packet: odd_payload,
        },
        Case {
            name: "tcp with ip options",
            packet: with_options,
        },
        Case {
            name: "udp",
            packet: Packet::udp(CLIENT, VIP),
        },
        Case {
            name: "udp without checksum",
            packet: udp_no_csum,
        },
    ]
}

#[test]
fn new_flow_is_translated_to_the_backend() {
    require_root!();
    for case in cases() {
        let mut lb = TestLb::load();
        let proto = case.packet.proto;
        lb.add_frontend(VIP, proto, &[BACKEND]);
        let out = lb.run(FROM_POD, &case.packet.bytes());
        assert_eq!(out.verdict, TC_ACT_OK, "{}", case.name);
        let got = seen(&out.frame);
        assert_eq!(got.src, addr(CLIENT), "{}: source untouched", case.name);
        assert_eq!(
            got.dst,
            addr(BACKEND),
            "{}: destination translated",
            case.name
        );
        assert_eq!(got.proto, proto, "{}", case.name);
        if case.packet.udp_no_checksum {
            let l4 = 14 + 20;
            assert_eq!(
                &out.frame[l4 + 6..l4 + 8],
                &[0, 0],
                "{}: no checksum stays none",
                case.name
            );
        }
        let input = case.packet.bytes();
        let ip_end = 14 + 20 + case.packet.ip_options.len();
        assert_eq!(out.frame.len(), input.len(), "{}: length", case.name);
        assert_eq!(
            &out.frame[34..ip_end],
            &input[34..ip_end],
            "{}: options kept",
            case.name
        );
        assert_eq!(lb.counted(), vec![(Reason::ForwardNew, 1)], "{}", case.name);
    }
}

#[test]
fn frontend_of_the_other_protocol_does_not_match() {
    require_root!();
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, PROTO_UDP, &[BACKEND]);
    let input = Packet::tcp(CLIENT, VIP, flags::SYN).bytes();
    let out = lb.run(FROM_POD, &input);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.frame, input);
    assert_eq!(lb.counted(), vec![(Reason::PassNotLoadBalanced, 1)]);
}

#[test]
fn new_flows_spread_over_all_backends() {
    require_root!();
    let mut lb = TestLb::load();
    let backends = ["10.244.1.7:8080", "10.244.2.7:8080", "10.244.3.7:8080"];
    lb.add_frontend(VIP, PROTO_TCP, &backends);
    let mut hits = std::collections::BTreeMap::new();
    for port in 0..300u16 {
        let client = format!("10.244.1.5:{}", 20000 + port);
        let out = lb.run(FROM_POD, &Packet::tcp(&client, VIP, flags::SYN).bytes());
        *hits.entry(seen(&out.frame).dst).or_insert(0) += 1;
    }
    assert_eq!(hits.len(), 3, "every backend chosen: {hits:?}");
    assert!(hits.values().all(|&n| n >= 50), "roughly even: {hits:?}");
}

#[test]
fn the_pre_filter_gates_both_lookups() {
    require_root!();
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, PROTO_TCP, &[BACKEND]);
    let input = Packet::tcp(CLIENT, VIP, flags::SYN).bytes();
    // The frontend's bit cleared (and the client's never set): the packet
    // is not looked up, so it passes as if no frontend were there — the
    // agent keeps every frontend's and backend's bit set.
    let vip = lb_common::ipv4_raw(addr(VIP).ip().octets());
    let frontends = lb_common::addr_filter::FRONTENDS;
    let (index, _) = lb_common::addr_filter_bit(frontends, vip);
    lb.maps.addr_filter.set(index, 0, 0).unwrap();
    let out = lb.run(FROM_POD, &input);
    assert_eq!(out.frame, input, "passed untouched");
    lb.pass_filter(frontends, vip);
    let out = lb.run(FROM_POD, &input);
    assert_eq!(seen(&out.frame).dst, addr(BACKEND), "looked up again");
    assert_eq!(
        lb.counted(),
        vec![(Reason::PassNotLoadBalanced, 1), (Reason::ForwardNew, 1)]
    );
}
