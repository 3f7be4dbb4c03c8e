//! Rev-NAT: replies of a load-balanced flow appear to come from the frontend.

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use lb_userspace::datapath::program::{FROM_POD, TO_POD};
use xlb_tests::{
    packet::{Packet, addr, flags, seen},
    require_root,
    test_lb::{TC_ACT_OK, TestLb},
};

const CLIENT: &str = "10.244.1.5:40000";
const VIP: &str = "10.96.0.10:80";
const BACKEND: &str = "10.244.2.7:8080";

#[test]
fn replies_are_translated_back_to_the_frontend() {
    require_root!();
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut lb = TestLb::load();
        lb.add_frontend(VIP, proto, &[BACKEND]);
        let (request, reply) = match proto {
            PROTO_TCP => (
                Packet::tcp(CLIENT, VIP, flags::SYN),
                Packet::tcp(BACKEND, CLIENT, flags::SYN | flags::ACK),
            ),
            _ => (Packet::udp(CLIENT, VIP), Packet::udp(BACKEND, CLIENT)),
        };
        lb.run(FROM_POD, &request.bytes());
        let out = lb.run(TO_POD, &reply.bytes());
        assert_eq!(out.verdict, TC_ACT_OK);
        let got = seen(&out.frame);
        assert_eq!(got.src, addr(VIP), "source is the frontend again");
        assert_eq!(got.dst, addr(CLIENT), "destination untouched");
        assert_eq!(
            lb.counted(),
            vec![(Reason::ForwardNew, 1), (Reason::RevNat, 1)]
        );
    }
}

#[test]
fn traffic_that_is_no_reply_passes_untouched() {
    require_root!();
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, PROTO_TCP, &[BACKEND]);
    lb.run(FROM_POD, &Packet::tcp(CLIENT, VIP, flags::SYN).bytes());
    // Same backend, another client port; another backend port; UDP.
    for reply in [
        Packet::tcp(BACKEND, "10.244.1.5:40001", flags::ACK),
        Packet::tcp("10.244.2.7:8081", CLIENT, flags::ACK),
        Packet::udp(BACKEND, CLIENT),
    ] {
        lb.assert_passes_unchanged(TO_POD, &reply.bytes(), Reason::PassNotLoadBalanced);
    }
}

#[test]
fn backend_reaching_a_client_directly_is_not_a_flow() {
    require_root!();
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, PROTO_TCP, &[BACKEND]);
    // No request went through the frontend: the backend's packet is its own.
    let packet = Packet::tcp(BACKEND, CLIENT, flags::SYN | flags::ACK).bytes();
    lb.assert_passes_unchanged(TO_POD, &packet, Reason::PassNotLoadBalanced);
}

#[test]
fn hairpin_pod_balanced_to_itself_sees_another_source_and_gets_its_reply() {
    require_root!();
    const POD: &str = "10.244.1.5:40000";
    const SELF_BACKEND: &str = "10.244.1.5:8080";
    const HAIRPIN: &str = "169.254.42.1:40000";
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut lb = TestLb::load();
        lb.add_frontend(VIP, proto, &[SELF_BACKEND]);
        let (request, reply) = match proto {
            PROTO_TCP => (
                Packet::tcp(POD, VIP, flags::SYN),
                Packet::tcp(SELF_BACKEND, HAIRPIN, flags::SYN | flags::ACK),
            ),
            _ => (Packet::udp(POD, VIP), Packet::udp(SELF_BACKEND, HAIRPIN)),
        };
        let out = lb.run(FROM_POD, &request.bytes());
        let got = seen(&out.frame);
        assert_eq!(
            (got.src, got.dst),
            (addr(HAIRPIN), addr(SELF_BACKEND)),
            "request"
        );
        // The pod answers the hairpin address; it leaves the pod through
        // the same program and comes back as the frontend's answer.
        let out = lb.run(FROM_POD, &reply.bytes());
        assert_eq!(out.verdict, TC_ACT_OK);
        let got = seen(&out.frame);
        assert_eq!((got.src, got.dst), (addr(VIP), addr(POD)), "reply");
        assert_eq!(
            lb.counted(),
            vec![(Reason::ForwardNew, 1), (Reason::RevNat, 1)]
        );
    }
}
