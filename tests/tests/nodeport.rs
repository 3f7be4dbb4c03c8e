//! North-south packet tests: `nodeport_tc` and `nodeport_xdp` on frames
//! arriving on a node's external interface, and `from_pod` on the replies
//! of local backends. The programs run inside a namespace of the test's own
//! with a dummy "external" interface, a route to the other node's pods and
//! permanent neighbours, so that their FIB lookups are deterministic. Each
//! case that both hooks handle runs on both, and must come out the same.

use lb_common::{
    CtEntry, CtKey, PROTO_TCP, PROTO_UDP, Reason, SNAT_PORT_MAX, SNAT_PORT_MIN, backend_flags,
    ct_flags, direction, frontend_flags, ipv4_raw, port_host, port_raw, scope,
};
use lb_userspace::datapath::{
    Settings,
    program::{FROM_POD, NODEPORT_TC},
};
use xlb_tests::{
    node_ns::{CLIENT_MAC, NODE_MAC, NODE2_MAC, NodeNs},
    packet::{Packet, addr, flags, seen, with_ttl},
    require_root,
    test_lb::{
        FrontendSpec, NODE_IP, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TestLb, XDP_DROP,
        XDP_PASS, XDP_TX,
    },
};

const CLIENT: &str = "192.168.77.200:40000";
const NODE_PORT: &str = "192.168.77.11:30080";
/// A backend on the other node, reached through 192.168.77.12.
const REMOTE: &str = "10.244.2.10:80";
/// A backend on this node, behind `pod0`.
const LOCAL: &str = "10.244.1.10:80";
/// The two north-south hooks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hook {
    Tc,
    Xdp,
}

const HOOKS: [Hook; 2] = [Hook::Tc, Hook::Xdp];

/// What a hook did, in terms both hooks share.
#[derive(Debug, PartialEq)]
enum Fate {
    /// Handed to the stack (TC_ACT_OK, XDP_PASS).
    Stack,
    /// Dropped (TC_ACT_SHOT, XDP_DROP).
    Dropped,
    /// Sent out by the program itself (a TC redirect, XDP_TX).
    SentOut,
}

fn fate(hook: Hook, verdict: u32) -> Fate {
    match (hook, verdict) {
        (Hook::Tc, TC_ACT_OK) | (Hook::Xdp, XDP_PASS) => Fate::Stack,
        (Hook::Tc, TC_ACT_SHOT) | (Hook::Xdp, XDP_DROP) => Fate::Dropped,
        (Hook::Tc, TC_ACT_REDIRECT) | (Hook::Xdp, XDP_TX) => Fate::SentOut,
        other => panic!("unexpected verdict {other:?}"),
    }
}

/// Runs `hook` on `frame` arriving on `ifindex`, in the node's namespace,
/// with `XDP_TX` allowed there.
fn run(lb: &mut TestLb, node: &NodeNs, hook: Hook, frame: &[u8], ifindex: u32) -> (Fate, Outcome) {
    lb.allow_xdp_tx(ifindex);
    let out = node
        .ns
        .enter(|| match hook {
            Hook::Tc => lb.run_on(NODEPORT_TC, frame, ifindex),
            Hook::Xdp => lb.run_xdp(frame, ifindex),
        })
        .unwrap();
    (fate(hook, out.verdict), out)
}

/// A load balancer with the NodePort over `backend` (flags
/// `backend_flags`) and a frontend flags `flags`.
fn nodeport(proto: u8, backend: Option<(&str, u8)>, flags: u16) -> (TestLb, u32) {
    let mut lb = TestLb::load();
    let backends: Vec<u32> = backend
        .map(|(b, f)| lb.add_backend_flagged(b, proto, f))
        .into_iter()
        .collect();
    let id = lb.add_external_frontend(NODE_PORT, proto, &backends, flags);
    (lb, id)
}

fn eth_dst(frame: &[u8]) -> [u8; 6] {
    frame[0..6].try_into().unwrap()
}

fn eth_src(frame: &[u8]) -> [u8; 6] {
    frame[6..12].try_into().unwrap()
}

fn ttl(frame: &[u8]) -> u8 {
    frame[14 + 8]
}

/// The conntrack entry under `key`.
fn entry(lb: &TestLb, key: &CtKey) -> CtEntry {
    lb.conntrack()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("no conntrack entry {key:?}"))
}

fn key(src: &str, dst: &str, proto: u8, dir: u8) -> CtKey {
    let (src, dst) = (addr(src), addr(dst));
    CtKey {
        saddr: ipv4_raw(src.ip().octets()),
        daddr: ipv4_raw(dst.ip().octets()),
        sport: port_raw(src.port()),
        dport: port_raw(dst.port()),
        proto,
        direction: dir,
        pad: 0,
    }
}

/// Where `XDP_TX` is not allowed (a veth whose peer runs no XDP), the
/// frames XDP would send back out reach TC untouched, and TC sends them.
#[test]
fn xdp_leaves_frames_to_send_back_out_to_tc_where_xdp_tx_is_not_allowed() {
    require_root!();
    let node = NodeNs::new().unwrap();
    let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
    let frame = Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes();
    let out = node.ns.enter(|| lb.run_xdp(&frame, node.ext)).unwrap();
    assert_eq!(out.verdict, XDP_PASS);
    assert_eq!(out.frame, frame, "untouched for TC");
    assert_eq!(lb.counted(), vec![], "counted by TC, not twice");
    let (fate, out) = run(&mut lb, &node, Hook::Tc, &frame, node.ext);
    assert_eq!(fate, Fate::SentOut);
    assert_eq!(seen(&out.frame).dst, addr(REMOTE));
}

#[test]
fn cluster_policy_snats_to_a_remote_backend_and_translates_the_reply() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let (mut lb, _) = nodeport(proto, Some((REMOTE, 0)), 0);
            let packet = |src: &str, dst: &str, tcp_flags| match proto {
                PROTO_TCP => Packet::tcp(src, dst, tcp_flags),
                _ => Packet::udp(src, dst),
            };
            let what = format!("{hook:?} proto {proto}");

            // The client's first packet: SNAT to the node, DNAT to the
            // backend, out of ext0 to the other node.
            let (fate, out) = run(
                &mut lb,
                &node,
                hook,
                &packet(CLIENT, NODE_PORT, flags::SYN).bytes(),
                node.ext,
            );
            assert_eq!(fate, Fate::SentOut, "{what}");
            let got = seen(&out.frame);
            assert_eq!(got.dst, addr(REMOTE), "{what}");
            assert_eq!(*got.src.ip(), NODE_IP, "{what}: SNAT to the node");
            let snat_port = got.src.port();
            assert!(
                (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port),
                "{what}: {snat_port}"
            );
            assert_eq!(eth_dst(&out.frame), NODE2_MAC, "{what}: to the next hop");
            assert_eq!(eth_src(&out.frame), NODE_MAC, "{what}");
            assert_eq!(ttl(&out.frame), 63, "{what}: forwarded");
            assert_eq!(lb.counted(), vec![(Reason::ForwardNew, 1)], "{what}");
            let node_end = format!("{NODE_IP}:{snat_port}");
            let forward = entry(&lb, &key(CLIENT, NODE_PORT, proto, direction::FORWARD));
            assert_eq!(forward.flags, ct_flags::SNAT | ct_flags::EXTERNAL, "{what}");
            assert_eq!(
                (forward.peer_addr, port_host(forward.peer_port)),
                (ipv4_raw(NODE_IP.octets()), snat_port)
            );
            let reply = entry(&lb, &key(REMOTE, &node_end, proto, direction::REPLY));
            assert_eq!(
                reply.peer_addr,
                ipv4_raw(addr(CLIENT).ip().octets()),
                "{what}"
            );

            // The backend's reply to the node: back to the client, from the
            // NodePort.
            let (fate, out) = run(
                &mut lb,
                &node,
                hook,
                &packet(REMOTE, &node_end, flags::SYN | flags::ACK).bytes(),
                node.ext,
            );
            assert_eq!(fate, Fate::SentOut, "{what}: reply");
            let got = seen(&out.frame);
            assert_eq!(
                (got.src, got.dst),
                (addr(NODE_PORT), addr(CLIENT)),
                "{what}: reply"
            );
            assert_eq!(eth_dst(&out.frame), CLIENT_MAC, "{what}: reply");

            // The client's next packet follows the flow.
            let (fate, out) = run(
                &mut lb,
                &node,
                hook,
                &packet(CLIENT, NODE_PORT, flags::ACK).bytes(),
                node.ext,
            );
            assert_eq!(fate, Fate::SentOut, "{what}: established");
            assert_eq!(
                seen(&out.frame).src.port(),
                snat_port,
                "{what}: same SNAT port"
            );
            assert_eq!(
                lb.counted(),
                vec![
                    (Reason::ForwardNew, 1),
                    (Reason::ForwardEstablished, 1),
                    (Reason::RevNat, 1)
                ],
                "{what}"
            );
        }
    }
}

#[test]
fn snat_keeps_a_free_client_port_and_avoids_a_taken_one() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
        let mut ports = Vec::new();
        // Two clients on the same port, in the SNAT range: the first keeps
        // it, the second would collide on the backend's reply and gets
        // another.
        for client in ["192.168.77.200:62000", "192.168.77.201:62000"] {
            let frame = Packet::tcp(client, NODE_PORT, flags::SYN).bytes();
            let (_, out) = run(&mut lb, &node, hook, &frame, node.ext);
            ports.push(seen(&out.frame).src.port());
        }
        assert_eq!(ports[0], 62000, "{hook:?}");
        assert_ne!(ports[1], 62000, "{hook:?}");
        assert!(
            (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&ports[1]),
            "{hook:?}"
        );
    }
}

/// One client port in the SNAT range to two frontends over the same
/// backend: the second flow gets another port, and the first flow's reply
/// entry is left alone (SNAT ports are only taken with `BPF_NOEXIST`).
#[test]
fn one_client_port_to_two_frontends_never_shares_a_snat_port() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
        let backend = lb.backend_ids();
        let other = "192.168.77.11:30081";
        lb.add_external_frontend(other, PROTO_TCP, &backend, 0);
        let client = "192.168.77.200:62000";
        let mut ports = Vec::new();
        for frontend in [NODE_PORT, other] {
            let frame = Packet::tcp(client, frontend, flags::SYN).bytes();
            let (_, out) = run(&mut lb, &node, hook, &frame, node.ext);
            ports.push(seen(&out.frame).src.port());
        }
        assert_eq!(ports[0], 62000, "{hook:?}");
        assert_ne!(ports[1], 62000, "{hook:?}: the port is taken");
        let first = entry(
            &lb,
            &key(
                REMOTE,
                &format!("{NODE_IP}:62000"),
                PROTO_TCP,
                direction::REPLY,
            ),
        );
        assert_eq!(
            first.nat_port,
            port_raw(30080),
            "{hook:?}: the first flow's replies still go back through its frontend"
        );
    }
}

/// A client that reopens a connection from the same port while the old
/// one is closing gets a new flow on the same SNAT port: the old flow's
/// entries are released, not left holding the port.
#[test]
fn a_reopened_client_tuple_takes_back_its_snat_port() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
        let client = "192.168.77.200:62000";
        let mut ports = Vec::new();
        for tcp_flags in [flags::SYN, flags::RST, flags::SYN, flags::RST, flags::SYN] {
            let frame = Packet::tcp(client, NODE_PORT, tcp_flags).bytes();
            let (_, out) = run(&mut lb, &node, hook, &frame, node.ext);
            ports.push(seen(&out.frame).src.port());
        }
        assert_eq!(ports, [62000; 5], "{hook:?}");
        assert_eq!(lb.conntrack().len(), 2, "{hook:?}: one flow's entries");
    }
}

/// A closed flow's SNAT tuple goes to the next new connection that needs
/// it, another client's (as netfilter lets a SYN reuse a closing
/// connection's tuple, killing the old one): closed flows do not hold the
/// SNAT range's ports for their closing time.
#[test]
fn a_new_connection_takes_over_a_closed_flows_snat_tuple() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
        let (first, second) = ("192.168.77.200:62000", "192.168.77.201:62000");
        let mut ports = Vec::new();
        for (client, tcp_flags) in [
            (first, flags::SYN),
            (first, flags::RST),
            (second, flags::SYN),
        ] {
            let frame = Packet::tcp(client, NODE_PORT, tcp_flags).bytes();
            let (_, out) = run(&mut lb, &node, hook, &frame, node.ext);
            ports.push(seen(&out.frame).src.port());
        }
        assert_eq!(ports, [62000; 3], "{hook:?}: the closed flow's port, again");
        let reply = entry(
            &lb,
            &key(
                REMOTE,
                &format!("{NODE_IP}:62000"),
                PROTO_TCP,
                direction::REPLY,
            ),
        );
        assert_eq!(
            (reply.peer_addr, reply.peer_port),
            (ipv4_raw([192, 168, 77, 201]), port_raw(62000)),
            "{hook:?}: replies go to the new client"
        );
        assert_eq!(reply.state, lb_common::ct_state::NEW, "{hook:?}");
        // The old flow is gone with its tuple: its client's late packets
        // start a flow of their own, never the new connection's.
        let old_forward = key(first, NODE_PORT, PROTO_TCP, direction::FORWARD);
        assert!(
            lb.conntrack().iter().all(|(k, _)| *k != old_forward),
            "{hook:?}: the old flow's forward entry is left"
        );
    }
}

/// The same after a whole connection closed with FINs both ways: the next
/// SYN that needs the tuple takes it; while the flow is only half closed,
/// it does not.
#[test]
fn a_connection_closed_with_fins_gives_its_snat_tuple_to_the_next() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
        let (first, second, third) = (
            "192.168.77.200:62000",
            "192.168.77.201:62000",
            "192.168.77.202:62000",
        );
        let node_end = format!("{NODE_IP}:62000");
        let mut send = |from: &str, to: &str, tcp_flags| {
            let frame = Packet::tcp(from, to, tcp_flags).bytes();
            let (_, out) = run(&mut lb, &node, hook, &frame, node.ext);
            seen(&out.frame)
        };
        send(first, NODE_PORT, flags::SYN);
        send(REMOTE, &node_end, flags::SYN | flags::ACK);
        send(first, NODE_PORT, flags::ACK);
        send(first, NODE_PORT, flags::FIN | flags::ACK);
        // Half closed: the backend may still send; the tuple stays.
        assert_ne!(
            send(second, NODE_PORT, flags::SYN).src.port(),
            62000,
            "{hook:?}: a half-closed flow keeps its tuple"
        );
        send(REMOTE, &node_end, flags::FIN | flags::ACK);
        send(first, NODE_PORT, flags::ACK);
        assert_eq!(
            send(third, NODE_PORT, flags::SYN).src.port(),
            62000,
            "{hook:?}: the closed flow's tuple, taken over"
        );
    }
}

/// The CPU that loses a SNATed flow's creation race had already taken a
/// SNAT port: it gives it back and adopts the winner's translation.
#[test]
fn the_loser_of_a_snat_flow_race_gives_its_port_back_and_adopts_the_winner() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let mut lb = TestLb::load_with(Settings {
            snat_addr: Some(NODE_IP),
            lose_flow_race: true,
            ..Settings::default()
        });
        let backend = lb.add_backend(REMOTE, PROTO_UDP);
        lb.add_external_frontend(NODE_PORT, PROTO_UDP, &[backend], 0);
        let frame = Packet::udp(CLIENT, NODE_PORT).bytes();
        let (_, out) = run(&mut lb, &node, hook, &frame, node.ext);
        let winner = seen(&out.frame).src;
        for _ in 0..10 {
            let (fate, out) = run(&mut lb, &node, hook, &frame, node.ext);
            assert_eq!(fate, Fate::SentOut, "{hook:?}");
            assert_eq!(seen(&out.frame).src, winner, "{hook:?}: the winner's SNAT");
        }
        assert_eq!(lb.conntrack().len(), 2, "{hook:?}: no port left taken");
    }
}

#[test]
fn a_local_backend_sees_the_client_and_its_reply_is_translated_in_from_pod() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, Some((LOCAL, backend_flags::LOCAL)), 0);
        let input = Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes();
        let (fate, out) = run(&mut lb, &node, hook, &input, node.ext);
        assert_eq!(
            fate,
            Fate::Stack,
            "{hook:?}: the stack routes it to the pod"
        );
        let got = seen(&out.frame);
        assert_eq!(
            (got.src, got.dst),
            (addr(CLIENT), addr(LOCAL)),
            "{hook:?}: no SNAT"
        );
        assert_eq!(out.frame[..12], input[..12], "{hook:?}: MACs untouched");
        assert_eq!(ttl(&out.frame), 64, "{hook:?}");
        let forward = entry(&lb, &key(CLIENT, NODE_PORT, PROTO_TCP, direction::FORWARD));
        assert_eq!(forward.flags, ct_flags::EXTERNAL, "{hook:?}");

        // The pod's reply leaves it through from_pod: from the NodePort,
        // routed out of ext0 to the client.
        let reply = Packet::tcp(LOCAL, CLIENT, flags::SYN | flags::ACK).bytes();
        let out = node
            .ns
            .enter(|| lb.run_on(FROM_POD, &reply, node.pod))
            .unwrap();
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{hook:?}: reply");
        let got = seen(&out.frame);
        assert_eq!(
            (got.src, got.dst),
            (addr(NODE_PORT), addr(CLIENT)),
            "{hook:?}: reply"
        );
        assert_eq!(eth_dst(&out.frame), CLIENT_MAC, "{hook:?}: reply");
        assert_eq!(ttl(&out.frame), 63, "{hook:?}: reply");
        assert_eq!(
            lb.counted(),
            vec![(Reason::ForwardNew, 1), (Reason::RevNat, 1)],
            "{hook:?}"
        );
    }
}

#[test]
fn local_policy_without_a_local_endpoint_drops() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, None, frontend_flags::DROP_WHEN_EMPTY);
        let frame = Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes();
        let (fate, _) = run(&mut lb, &node, hook, &frame, node.ext);
        assert_eq!(fate, Fate::Dropped, "{hook:?}");
        assert_eq!(
            lb.counted(),
            vec![(Reason::DropNoLocalBackend, 1)],
            "{hook:?}"
        );
    }
}

#[test]
fn no_endpoints_is_rejected_by_tc_and_left_to_it_by_xdp() {
    require_root!();
    let node = NodeNs::new().unwrap();
    let frame = Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes();
    let (mut lb, _) = nodeport(PROTO_TCP, None, 0);
    let (fate, out) = run(&mut lb, &node, Hook::Xdp, &frame, node.ext);
    assert_eq!(
        (fate, out.frame),
        (Fate::Stack, frame.clone()),
        "XDP: untouched"
    );
    assert_eq!(lb.counted(), vec![], "XDP counts what it finishes only");
    let (fate, out) = run(&mut lb, &node, Hook::Tc, &frame, node.ext);
    assert_eq!(fate, Fate::SentOut, "TC: the reset goes back");
    assert_eq!(seen(&out.frame).dst, addr(CLIENT));
    assert_eq!(lb.counted(), vec![(Reason::RejectNoBackend, 1)]);
}

#[test]
fn source_ranges_admit_their_clients_only() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let (mut lb, id) = nodeport(PROTO_TCP, Some((REMOTE, 0)), frontend_flags::SOURCE_RANGES);
        lb.add_source_range(id, "10.0.0.0/8");
        let frame = Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes();
        let (fate, _) = run(&mut lb, &node, hook, &frame, node.ext);
        assert_eq!(fate, Fate::Dropped, "{hook:?}: outside the ranges");
        assert_eq!(lb.counted(), vec![(Reason::DropSourceRange, 1)], "{hook:?}");
        lb.add_source_range(id, "192.168.77.192/26");
        let (fate, _) = run(&mut lb, &node, hook, &frame, node.ext);
        assert_eq!(fate, Fate::SentOut, "{hook:?}: inside");
    }
}

#[test]
fn what_is_not_ours_passes_untouched() {
    require_root!();
    let node = NodeNs::new().unwrap();
    let frames = [
        // The node's own ssh.
        Packet::tcp(CLIENT, "192.168.77.11:22", flags::SYN).bytes(),
        // A port of the SNAT range without a flow.
        Packet::tcp(REMOTE, "192.168.77.11:61234", flags::SYN | flags::ACK).bytes(),
        // Forwarded traffic to a pod.
        Packet::udp(CLIENT, LOCAL).bytes(),
    ];
    for hook in HOOKS {
        let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
        for frame in &frames {
            let (fate, out) = run(&mut lb, &node, hook, frame, node.ext);
            assert_eq!((fate, &out.frame), (Fate::Stack, frame), "{hook:?}");
        }
        let want = match hook {
            Hook::Tc => vec![(Reason::PassNotLoadBalanced, 3)],
            Hook::Xdp => vec![],
        };
        assert_eq!(lb.counted(), want, "{hook:?}");
    }
}

#[test]
fn xdp_leaves_an_unresolved_next_hop_to_tc_which_uses_the_same_flow() {
    require_root!();
    let node = NodeNs::new().unwrap();
    let (mut lb, _) = nodeport(PROTO_TCP, Some(("10.244.3.10:80", 0)), 0);
    let frame = Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes();
    let (fate, out) = run(&mut lb, &node, Hook::Xdp, &frame, node.ext);
    assert_eq!((fate, &out.frame), (Fate::Stack, &frame), "XDP: untouched");
    let flows = lb.conntrack().len();
    assert_eq!(flows, 2, "XDP chose the backend and recorded the flow");
    let (fate, out) = run(&mut lb, &node, Hook::Tc, &frame, node.ext);
    assert_eq!(fate, Fate::SentOut, "TC: out through neighbour resolution");
    assert_eq!(seen(&out.frame).dst, addr("10.244.3.10:80"));
    assert_eq!(lb.conntrack().len(), flows, "the same flow");
    assert_eq!(lb.counted(), vec![(Reason::ForwardEstablished, 1)]);
}

#[test]
fn a_ttl_that_runs_out_is_not_forwarded() {
    require_root!();
    let node = NodeNs::new().unwrap();
    let (mut lb, _) = nodeport(PROTO_TCP, Some((REMOTE, 0)), 0);
    let frame = with_ttl(Packet::tcp(CLIENT, NODE_PORT, flags::SYN).bytes(), 1);
    let (fate, out) = run(&mut lb, &node, Hook::Xdp, &frame, node.ext);
    assert_eq!((fate, &out.frame), (Fate::Stack, &frame), "XDP: TC's job");
    let (fate, _) = run(&mut lb, &node, Hook::Tc, &frame, node.ext);
    assert_eq!(fate, Fate::Dropped);
    assert_eq!(lb.counted(), vec![(Reason::DropTtlExceeded, 1)]);
}

#[test]
fn client_ip_affinity_holds_among_local_endpoints_on_both_hooks() {
    require_root!();
    let node = NodeNs::new().unwrap();
    for hook in HOOKS {
        let mut lb = TestLb::load();
        // Local policy: this node's two endpoints are the only tier.
        let locals: Vec<u32> = ["10.244.1.10:80", "10.244.1.11:80"]
            .iter()
            .map(|b| lb.add_backend_flagged(b, PROTO_TCP, backend_flags::LOCAL))
            .collect();
        let spec = FrontendSpec {
            tiers: &[&locals],
            flags: frontend_flags::DROP_WHEN_EMPTY,
            affinity_timeout_s: 10_800,
            scope: scope::EXTERNAL,
        };
        lb.add_frontend_spec(NODE_PORT, PROTO_TCP, &spec);
        let chosen: std::collections::BTreeSet<_> = (0..20u16)
            .map(|i| {
                let client = format!("192.168.77.200:{}", 41_000 + i);
                let frame = Packet::tcp(&client, NODE_PORT, flags::SYN).bytes();
                let (fate, out) = run(&mut lb, &node, hook, &frame, node.ext);
                assert_eq!(fate, Fate::Stack, "{hook:?}: DNAT to a local pod");
                let got = seen(&out.frame);
                assert_eq!(got.src, addr(&client), "{hook:?}: the client's own address");
                got.dst
            })
            .collect();
        assert_eq!(
            chosen.len(),
            1,
            "{hook:?}: one backend for the client: {chosen:?}"
        );
        assert_eq!(
            lb.maps.affinity.keys().count(),
            1,
            "{hook:?}: keyed by the client"
        );
    }
}
