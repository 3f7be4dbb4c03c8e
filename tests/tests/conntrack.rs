//! Conntrack: established flows keep their backend, entries never collide
//! across clients, TCP states and timeouts, removed backends re-balance.

use lb_common::{
    PROTO_TCP, PROTO_UDP, Reason, backend_flags, ct_state, direction, ipv4_raw, port_raw,
};
use lb_userspace::{
    clock::monotonic_coarse_ns,
    conntrack::{ConntrackTable, Evictions},
    datapath::{
        Settings,
        program::{FROM_POD, TO_POD},
    },
};
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

/// The state of the flow's entry in `dir`.
fn state(lb: &TestLb, dir: u8) -> Option<u8> {
    lb.conntrack()
        .iter()
        .find(|(k, _)| k.direction == dir)
        .map(|(_, e)| e.state)
}

/// The backend's reply to `CLIENT` with `tcp_flags`, through `to_pod`.
fn reply(lb: &mut TestLb, backend: std::net::SocketAddrV4, tcp_flags: u8) {
    let packet = Packet::tcp(&backend.to_string(), CLIENT, tcp_flags);
    lb.run(TO_POD, &packet.bytes());
}

#[test]
fn tcp_states_follow_the_flags_of_both_directions() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    let backend = backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    assert_eq!(state(&lb, direction::FORWARD), Some(ct_state::NEW));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK));
    assert_eq!(state(&lb, direction::FORWARD), Some(ct_state::ESTABLISHED));
    // The client's FIN half-closes the flow: data may still come back.
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::FIN | flags::ACK));
    assert_eq!(state(&lb, direction::FORWARD), Some(ct_state::FIN_SENT));
    assert_ne!(state(&lb, direction::REPLY), Some(ct_state::CLOSING));
    // The backend's FIN closes it: both entries, from the reply side.
    reply(&mut lb, backend, flags::FIN | flags::ACK);
    assert_eq!(state(&lb, direction::FORWARD), Some(ct_state::CLOSING));
    assert_eq!(state(&lb, direction::REPLY), Some(ct_state::CLOSING));
}

#[test]
fn an_rst_in_either_direction_closes_both_entries() {
    require_root!();
    for from_backend in [false, true] {
        let mut lb = lb(PROTO_TCP);
        let backend = backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
        reply(&mut lb, backend, flags::SYN | flags::ACK);
        backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK));
        if from_backend {
            reply(&mut lb, backend, flags::RST);
        } else {
            backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::RST));
        }
        assert_eq!(state(&lb, direction::FORWARD), Some(ct_state::CLOSING));
        assert_eq!(state(&lb, direction::REPLY), Some(ct_state::CLOSING));
    }
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

/// A client that reuses a closed flow's port for a connection straight to
/// the backend (balanced at the socket, or direct): the backend's SYN-ACK
/// belongs to that connection and must pass as it is, not be translated
/// into the old flow's reply from the Service.
#[test]
fn a_syn_ack_against_a_closed_flow_passes_untranslated() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    let backend = backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::RST));
    let syn_ack = Packet::tcp(&backend.to_string(), CLIENT, flags::SYN | flags::ACK).bytes();
    let out = lb.run(TO_POD, &syn_ack);
    assert_eq!(out.frame, syn_ack, "the direct connection's SYN-ACK");
    assert_eq!(
        lb.counted(),
        vec![
            (Reason::PassNotLoadBalanced, 1),
            (Reason::ForwardNew, 1),
            (Reason::ForwardEstablished, 1)
        ]
    );
}

/// A flow closes when its second FIN is seen, however long the first
/// direction was idle: both entries live their 2 s from then, so the
/// client's last ACK still belongs to the flow.
#[test]
fn closing_gives_both_entries_their_time_from_the_close() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    let backend = backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::FIN | flags::ACK));
    // The client's half-closed direction then idles for 5 s.
    let idle = monotonic_coarse_ns() - 5_000_000_000;
    lb.edit_conntrack(|entry| entry.last_seen_ns = idle);
    reply(&mut lb, backend, flags::FIN | flags::ACK);
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK));
    assert_eq!(
        lb.counted(),
        vec![
            (Reason::ForwardNew, 1),
            (Reason::ForwardEstablished, 2),
            (Reason::RevNat, 1)
        ]
    );
}

/// UDP timeouts as netfilter's: a query and its answer (DNS) live 30 s;
/// a flow whose client spoke again after a reply is a stream, 120 s.
#[test]
fn one_shot_udp_flows_live_30_s_and_streams_120_s() {
    require_root!();
    for stream in [false, true] {
        let mut lb = lb(PROTO_UDP);
        let query = Packet::udp(CLIENT, VIP);
        let backend = backend_of(&mut lb, &query);
        lb.run(TO_POD, &Packet::udp(&backend.to_string(), CLIENT).bytes());
        if stream {
            backend_of(&mut lb, &query);
        }
        let states: Vec<u8> = lb.conntrack().iter().map(|(_, e)| e.state).collect();
        let want = if stream {
            ct_state::ESTABLISHED
        } else {
            ct_state::REPLIED
        };
        assert_eq!(states, [want, want], "stream {stream}");
        let idle = monotonic_coarse_ns() - 31_000_000_000;
        lb.edit_conntrack(|entry| entry.last_seen_ns = idle);
        backend_of(&mut lb, &query);
        let (new, established) = if stream { (1, 2) } else { (2, 0) };
        let mut want = vec![(Reason::ForwardNew, new)];
        if established > 0 {
            want.push((Reason::ForwardEstablished, established));
        }
        want.push((Reason::RevNat, 1));
        assert_eq!(lb.counted(), want, "stream {stream}");
    }
}

/// A closed flow (both FINs) releases its entries within 2 s: a packet
/// with its tuple 2.1 s later starts a new flow.
#[test]
fn a_closed_flow_expires_within_two_seconds() {
    require_root!();
    let mut lb = lb(PROTO_TCP);
    let backend = backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN));
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::FIN | flags::ACK));
    reply(&mut lb, backend, flags::FIN | flags::ACK);
    // The test controls time through the entries' timestamps.
    let stale = monotonic_coarse_ns() - 2_100_000_000;
    lb.edit_conntrack(|entry| entry.last_seen_ns = stale);
    backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK));
    assert_eq!(
        lb.counted(),
        vec![
            (Reason::ForwardNew, 2),
            (Reason::ForwardEstablished, 1),
            (Reason::RevNat, 1)
        ]
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

/// What user space does when an endpoint leaves the frontend's slots:
/// another backend takes its slot, it stays flagged draining.
fn drain(lb: &mut TestLb, frontend: u32, gone: u32, stays: u32, proto: u8) {
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
    let mut value = lb.maps.backends.get(&gone, 0).unwrap();
    value.flags |= backend_flags::DRAINING;
    assert_eq!(value.proto, proto);
    lb.maps.backends.insert(gone, value, 0).unwrap();
}

#[test]
fn a_tcp_flow_keeps_its_draining_backend_and_new_flows_go_elsewhere() {
    require_root!();
    let mut lb = TestLb::load();
    let gone = lb.add_backend(BACKENDS[0], PROTO_TCP);
    let stays = lb.add_backend(BACKENDS[1], PROTO_TCP);
    let frontend = lb.add_frontend_tiers(VIP, PROTO_TCP, &[&[gone]]);
    assert_eq!(
        backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::SYN)),
        addr(BACKENDS[0])
    );
    drain(&mut lb, frontend, gone, stays, PROTO_TCP);
    for _ in 0..3 {
        assert_eq!(
            backend_of(&mut lb, &Packet::tcp(CLIENT, VIP, flags::ACK)),
            addr(BACKENDS[0]),
            "the established flow keeps its backend"
        );
    }
    assert_eq!(
        backend_of(&mut lb, &Packet::tcp("10.244.1.5:40001", VIP, flags::SYN)),
        addr(BACKENDS[1]),
        "a new flow never chooses the draining backend"
    );
    assert_eq!(
        lb.counted(),
        vec![(Reason::ForwardNew, 2), (Reason::ForwardEstablished, 3)]
    );
}

#[test]
fn a_udp_flow_of_a_draining_backend_moves_at_its_next_datagram() {
    require_root!();
    let mut lb = TestLb::load();
    let gone = lb.add_backend(BACKENDS[0], PROTO_UDP);
    let stays = lb.add_backend(BACKENDS[1], PROTO_UDP);
    let frontend = lb.add_frontend_tiers(VIP, PROTO_UDP, &[&[gone]]);
    let datagram = Packet::udp(CLIENT, VIP);
    assert_eq!(backend_of(&mut lb, &datagram), addr(BACKENDS[0]));
    drain(&mut lb, frontend, gone, stays, PROTO_UDP);
    for _ in 0..3 {
        assert_eq!(backend_of(&mut lb, &datagram), addr(BACKENDS[1]));
    }
    assert_eq!(
        lb.counted(),
        vec![(Reason::ForwardNew, 2), (Reason::ForwardEstablished, 2)]
    );
    // Its replies come back from the Service.
    let back = lb.run(TO_POD, &Packet::udp(BACKENDS[1], CLIENT).bytes());
    assert_eq!(seen(&back.frame).src, addr(VIP));
}

/// Two CPUs miss at once and each picks a backend: the one that inserts
/// second meets the winner's forward entry (`BPF_NOEXIST`) and adopts it.
/// The loser is run with the race seam on (its forward lookup misses)
/// against the winner's entry, many times: with three backends, a loser
/// that kept its own choice would show within a few runs.
#[test]
fn a_cpu_that_loses_the_flow_creation_race_adopts_the_winners_backend() {
    require_root!();
    for proto in [PROTO_TCP, PROTO_UDP] {
        let mut lb = TestLb::load_with(Settings {
            lose_flow_race: true,
            ..Settings::default()
        });
        lb.add_frontend(VIP, proto, &BACKENDS);
        let first = match proto {
            PROTO_TCP => Packet::tcp(CLIENT, VIP, flags::SYN),
            _ => Packet::udp(CLIENT, VIP),
        };
        let winner = backend_of(&mut lb, &first);
        for _ in 0..20 {
            assert_eq!(backend_of(&mut lb, &first), winner, "proto {proto}");
        }
        assert_eq!(lb.conntrack().len(), 2, "one flow, two entries");
        assert_eq!(
            lb.counted(),
            vec![(Reason::ForwardNew, 1), (Reason::ForwardEstablished, 20)],
            "the losers count as packets of the winner's flow"
        );
    }
}

/// The agent's walk: expired entries out (in batches), live ones counted
/// with the backends they name; with the datapath's event counters it
/// tells evictions, here none.
#[test]
fn the_agents_walk_removes_expired_entries_and_finds_the_live_backends() {
    require_root!();
    let mut lb = TestLb::load_with_capacities(&[(lb_common::maps::CONNTRACK, 16_384)]);
    let ids: Vec<u32> = BACKENDS
        .iter()
        .map(|b| lb.add_backend(b, PROTO_UDP))
        .collect();
    lb.add_frontend_tiers(VIP, PROTO_UDP, &[&ids]);
    let table = ConntrackTable::open(lb.bpffs()).unwrap();
    assert_eq!(table.capacity(), 16_384);
    let mut evictions = Evictions::default();
    let events = |lb: &TestLb| lb.maps.conntrack_events().unwrap();
    let first = table.walk(monotonic_coarse_ns()).unwrap();
    let [created, removed] = events(&lb);
    assert_eq!(evictions.update(&first, created, removed), 0);
    // 6,000 flows, more than one batch: 12,000 entries.
    for i in 0..6_000u32 {
        let client = format!(
            "10.244.{}.{}:{}",
            1 + i / 60_000,
            1 + (i / 200) % 250,
            1000 + i % 200
        );
        lb.run(FROM_POD, &Packet::udp(&client, VIP).bytes());
    }
    let [created, removed] = events(&lb);
    assert_eq!((created, removed), (12_000, 0));
    let walk = table.walk(monotonic_coarse_ns()).unwrap();
    assert_eq!((walk.entries, walk.expired, walk.removed), (12_000, 0, 0));
    assert_eq!(walk.backends, ids.iter().copied().collect());
    assert_eq!(evictions.update(&walk, created, removed), 0);
    // Every entry ages past the UDP timeout: the next walk removes them all.
    let stale = monotonic_coarse_ns() - lb_common::CT_TIMEOUT_UDP_NS - 2_000_000_000;
    lb.edit_conntrack(|entry| entry.last_seen_ns = stale);
    let walk = table.walk(monotonic_coarse_ns()).unwrap();
    assert_eq!(
        (walk.entries, walk.expired, walk.removed),
        (0, 12_000, 12_000)
    );
    assert!(walk.backends.is_empty());
    assert!(lb.conntrack().is_empty());
    assert_eq!(evictions.update(&walk, created, removed), 0);
}

/// A table too small for its flows evicts, and the walk tells how many.
#[test]
fn evictions_of_a_full_table_are_counted() {
    require_root!();
    let mut lb = TestLb::load_with_capacities(&[(lb_common::maps::CONNTRACK, 1_024)]);
    lb.add_frontend(VIP, PROTO_UDP, &BACKENDS);
    let table = ConntrackTable::open(lb.bpffs()).unwrap();
    let mut evictions = Evictions::default();
    let [created, removed] = lb.maps.conntrack_events().unwrap();
    evictions.update(
        &table.walk(monotonic_coarse_ns()).unwrap(),
        created,
        removed,
    );
    for i in 0..3_000u32 {
        let client = format!("10.244.1.{}:{}", 1 + i / 200, 1000 + i % 200);
        lb.run(FROM_POD, &Packet::udp(&client, VIP).bytes());
    }
    let [created, removed] = lb.maps.conntrack_events().unwrap();
    let walk = table.walk(monotonic_coarse_ns()).unwrap();
    let evicted = evictions.update(&walk, created, removed);
    assert_eq!(created, 6_000);
    assert_eq!(evicted, 6_000 - walk.entries as u64, "{walk:?}");
    assert!(evicted >= 6_000 - 1_024);
}
