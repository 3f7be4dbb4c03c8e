//! Conntrack: established flows keep their backend, entries never collide
//! across clients, TCP states and timeouts, removed backends re-balance.

use lb_common::{
    CT_TIMEOUT_TCP_CLOSING_NS, PROTO_TCP, PROTO_UDP, Reason, ct_state, direction, ipv4_raw,
    port_raw,
};
use lb_userspace::{clock::monotonic_coarse_ns, datapath::program::FROM_POD};
use xlb_tests::{
    packet::{Packet, addr, flags, seen},
    require_root,
    test_lb::TestLb,
};

const CLIENT: &str = "10.244.1.5:40000";
const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 3] = ["10.244.1.7:8080", "10.244.2.7:8080", "10.244.3.7:8080"];

fn lb(proto: u8) -> TestLb {
    let mut lb = TestLb::load();
    lb.add_frontend(VIP, proto, &BACKENDS);
    lb
}

/// The backend a packet was sent to.
fn backend_of(lb: &mut TestLb, packet: &Packet) -> std::net::SocketAddrV4 {
    seen(&lb.run(FROM_POD, &packet.bytes()).frame).dst
}

#[test]
fn established_flow_keeps_its_backend() {
    require_root!();
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut lb = lb(proto);
        let packet = |tcp_flags| match proto {
            PROTO_TCP => Packet::tcp(CLIENT, VIP, tcp_flags),
            _ => Packet::udp(CLIENT, VIP),
        };
        let first = backend_of(&mut lb, &packet(flags::SYN));
        for _ in 0..30 {
            assert_eq!(backend_of(&mut lb, &packet(flags::ACK)), first);
        }
        assert_eq!(
            lb.counted(),
            vec![(Reason::ForwardNew, 1), (Reason::ForwardEstablished, 30)]
        );
    }
}

#[test]
fn clients_with_equal_source_ports_get_separate_entries() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    let clients = ["10.244.1.5:40000", "10.244.1.6:40000", "10.244.2.5:40000"];
    let chosen: Vec<_> = clients
        .iter()
        .map(|c| backend_of(&mut lb, &Packet::tcp(c, VIP, flags::SYN)))
        .collect();
    let entries = lb.conntrack();
    assert_eq!(
        entries.len(),
        2 * clients.len(),
        "a forward and a reply entry per client"
    );
    for (client, backend) in clients.iter().map(|c| addr(c)).zip(&chosen) {
        let forward = entries
            .iter()
            .find(|(k, _)| {
                k.direction == direction::FORWARD && k.saddr == ipv4_raw(client.ip().octets())
            })
            .expect("forward entry");
        assert_eq!(forward.0.sport, port_raw(client.port()));
        assert_eq!(forward.1.nat_addr, ipv4_raw(backend.ip().octets()));
        assert_eq!(forward.1.nat_port, port_raw(backend.port()));
        let reply = entries
            .iter()
            .find(|(k, _)| {
                k.direction == direction::REPLY && k.daddr == ipv4_raw(client.ip().octets())
            })
            .expect("reply entry");
        assert_eq!(reply.0.saddr, ipv4_raw(backend.ip().octets()));
        assert_eq!(reply.1.nat_addr, ipv4_raw(addr(VIP).ip().octets()));
        assert_eq!(reply.1.nat_port, port_raw(80));
    }
    // Each client keeps its own backend.
    for (client, backend) in clients.iter().zip(&chosen) {
        assert_eq!(
            backend_of(&mut lb, &Packet::tcp(client, VIP, flags::ACK)),
            *backend
        );
    }
}

#[test]
fn tcp_states_follow_the_flags() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    let state = |lb: &TestLb| {
        lb.conntrack()
            .iter()
            .find(|(k, _)| k.direction == direction::FORWARD)
            .map(|(_, e)| e.state)
    };
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    assert_eq!(state(&lb), Some(ct_state::NEW));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK));
    assert_eq!(state(&lb), Some(ct_state::ESTABLISHED));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::FIN | flags::ACK));
    assert_eq!(state(&lb), Some(ct_state::CLOSING));
}

#[test]
fn syn_after_close_starts_a_new_flow() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::RST));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    assert_eq!(
        lb.counted(),
        vec![(Reason::ForwardNew, 2), (Reason::ForwardEstablished, 1)]
    );
}

#[test]
fn expired_entry_is_a_new_flow() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::FIN | flags::ACK));
    // The test controls time through the entry's timestamp: a closing entry
    // last seen just over its timeout ago has expired.
    let stale = monotonic_coarse_ns() - CT_TIMEOUT_TCP_CLOSING_NS - 2_000_000_000;
    lb.edit_conntrack(|entry| entry.last_seen_ns = stale);
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK));
    assert_eq!(
        lb.counted(),
        vec![(Reason::ForwardNew, 2), (Reason::ForwardEstablished, 1)]
    );
    // The forward entry is fresh again (the old reply entry may stay behind
    // when another backend was chosen; it expires on its own).
    let entries = lb.conntrack();
    let forward = entries
        .iter()
        .find(|(k, _)| k.direction == direction::FORWARD)
        .unwrap();
    assert!(forward.1.last_seen_ns > stale);
}

#[test]
fn flow_to_a_removed_backend_is_rebalanced() {
    require_root!();
    let mut lb = TestLb::load();
    let gone = lb.add_backend(BACKENDS[0], PROTO_TCP);
    let stays = lb.add_backend(BACKENDS[1], PROTO_TCP);
    let frontend = lb.add_frontend_tiers(VIP, PROTO_TCP, &[&[gone]]);
    assert_eq!(
        backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN)),
        addr(BACKENDS[0])
    );
    // What user space does when the endpoint goes: new slot, backend deleted.
    lb.maps
        .slots
        .insert(
            lb_common::SlotKey {
                frontend_id: frontend,
                slot: 0,
            },
            stays,
            0,
        )
        .unwrap();
    lb.remove_backend(gone);
    assert_eq!(
        backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK)),
        addr(BACKENDS[1])
    );
    assert_eq!(lb.counted(), vec![(Reason::ForwardNew, 2)]);
}
