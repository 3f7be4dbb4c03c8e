//! ICMP errors that quote a translated flow are translated like that flow —
//! outer and quoted addresses, quoted ports, every checksum — in both
//! directions and on every hook; ICMP errors about no flow of ours pass
//! untouched, and never create one.

use std::net::Ipv4Addr;

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use lb_userspace::datapath::program::{FROM_POD, NODEPORT_TC, TO_POD};
use xlb_tests::{
    node_ns::NodeNs,
    packet::{
        ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_PORT_UNREACH, Packet, addr, flags, icmp_error,
        seen, seen_icmp_error,
    },
    require_root,
    test_lb::{NODE_IP, TC_ACT_OK, TC_ACT_REDIRECT, TestLb, XDP_TX},
};

const CLIENT: &str = "10.244.1.5:40000";
const VIP: &str = "10.96.0.10:80";
const BACKEND: &str = "10.244.2.7:8080";
/// A router on the path to the backend.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);

fn ip(s: &str) -> Ipv4Addr {
    *addr(s).ip()
}

fn clusterip(proto: u8) -> TestLb {
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, proto, &[BACKEND]);
    let first = match proto {
        PROTO_TCP => Packet::tcp(CLIENT, VIP, flags::SYN),
        _ => Packet::udp(CLIENT, VIP),
    };
    let out = lb.run(FROM_POD, &first.bytes());
    assert_eq!(seen(&out.frame).dst, addr(BACKEND));
    lb
}

/// The client's datagram as the backend (or a router before it) saw it:
/// after DNAT.
fn forward_after_dnat(proto: u8) -> Packet {
    match proto {
        PROTO_TCP => Packet::tcp(CLIENT, BACKEND, flags::ACK),
        _ => Packet::udp(CLIENT, BACKEND),
    }
}

/// The backend's port is closed: its port unreachable reaches the client
/// from the Service address, quoting what the client sent.
#[test]
fn port_unreachable_from_the_backend_comes_from_the_service() {
    require_root!();
    let mut lb = clusterip(PROTO_UDP);
    let error = icmp_error(
        ip(BACKEND),
        ip(CLIENT),
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        &forward_after_dnat(PROTO_UDP),
    );
    // Not an external flow: from_pod leaves it to to_pod, like a reply.
    let out = lb.run(FROM_POD, &error);
    assert_eq!(out.frame, error, "from_pod leaves a ClusterIP reply alone");
    let out = lb.run(TO_POD, &error);
    assert_eq!(out.verdict, TC_ACT_OK);
    let got = seen_icmp_error(&out.frame);
    assert_eq!((got.src, got.dst), (ip(VIP), ip(CLIENT)));
    assert_eq!((got.quoted.src, got.quoted.dst), (addr(CLIENT), addr(VIP)));
    assert!(lb.counted().contains(&(Reason::IcmpError, 1)));
}

/// Path-MTU discovery: a router before the backend says "fragmentation
/// needed"; the client must see it about the packet it sent (to the
/// Service), from the router.
#[test]
fn fragmentation_needed_from_a_router_quotes_the_service() {
    require_root!();
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut lb = clusterip(proto);
        let error = icmp_error(
            ROUTER,
            ip(CLIENT),
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            &forward_after_dnat(proto),
        );
        let out = lb.run(TO_POD, &error);
        let got = seen_icmp_error(&out.frame);
        assert_eq!((got.src, got.dst), (ROUTER, ip(CLIENT)), "proto {proto}");
        assert_eq!(
            (got.quoted.src, got.quoted.dst),
            (addr(CLIENT), addr(VIP)),
            "proto {proto}"
        );
        assert_eq!(
            &out.frame[40..42],
            &1280u16.to_be_bytes(),
            "the MTU is kept"
        );
    }
}

/// The other direction: the client's port unreachable about a reply it got
/// from the Service goes to the backend, about the reply it sent.
#[test]
fn an_error_about_a_reply_goes_to_the_backend() {
    require_root!();
    let mut lb = clusterip(PROTO_UDP);
    let reply_as_received = Packet::udp(VIP, CLIENT);
    let error = icmp_error(
        ip(CLIENT),
        ip(VIP),
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        &reply_as_received,
    );
    let out = lb.run(FROM_POD, &error);
    assert_eq!(out.verdict, TC_ACT_OK);
    let got = seen_icmp_error(&out.frame);
    assert_eq!((got.src, got.dst), (ip(CLIENT), ip(BACKEND)));
    assert_eq!(
        (got.quoted.src, got.quoted.dst),
        (addr(BACKEND), addr(CLIENT))
    );
}

#[test]
fn an_error_about_no_flow_passes_untouched_and_creates_none() {
    require_root!();
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, PROTO_UDP, &[BACKEND]);
    let before = lb.conntrack().len();
    // About a packet to the Service that never went through xlb.
    let error = icmp_error(
        ip(CLIENT),
        ip(VIP),
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        &Packet::udp(VIP, CLIENT),
    );
    for program in [FROM_POD, TO_POD] {
        let out = lb.run(program, &error);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.frame, error, "{program}");
    }
    assert_eq!(lb.conntrack().len(), before, "no flow created");
    assert_eq!(lb.counted(), vec![(Reason::PassNotLoadBalanced, 2)]);
}

/// North-south: a router before a remote backend asks the node to
/// fragment a SNATed packet; the error goes on to the external client,
/// about what it sent to the NodePort — through TC and through XDP.
#[test]
fn fragmentation_needed_for_a_snated_flow_reaches_the_external_client() {
    require_root!();
    const CLIENT: &str = "192.168.77.200:40000";
    const NODE_PORT: &str = "192.168.77.11:30080";
    const REMOTE: &str = "10.244.2.10:80";
    let node = NodeNs::new().unwrap();
    for xdp in [false, true] {
        let mut lb = TestLb::load();
        let backend = lb.add_backend(REMOTE, PROTO_TCP);
        lb.add_external_frontend(NODE_PORT, PROTO_TCP, &[backend], 0);
        lb.allow_xdp_tx(node.ext);
        let syn = Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes();
        let out = node
            .ns
            .enter(|| lb.run_on(NODEPORT_TC, &syn, node.ext))
            .unwrap();
        let snat = seen(&out.frame).src;
        assert_eq!(*snat.ip(), NODE_IP);
        let forwarded = Packet::tcp(&snat.to_string(), REMOTE, flags::ACK);
        let error = icmp_error(
            ip("192.168.77.12:0"),
            NODE_IP,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            &forwarded,
        );
        let out = node
            .ns
            .enter(|| {
                if xdp {
                    lb.run_xdp(&error, node.ext)
                } else {
                    lb.run_on(NODEPORT_TC, &error, node.ext)
                }
            })
            .unwrap();
        let sent = if xdp { XDP_TX } else { TC_ACT_REDIRECT };
        assert_eq!(out.verdict, sent, "xdp {xdp}: routed on to the client");
        let got = seen_icmp_error(&out.frame);
        assert_eq!(
            (got.src, got.dst),
            (ip("192.168.77.12:0"), ip(CLIENT)),
            "xdp {xdp}"
        );
        assert_eq!(
            (got.quoted.src, got.quoted.dst),
            (addr(CLIENT), addr(NODE_PORT)),
            "xdp {xdp}"
        );
    }
}
