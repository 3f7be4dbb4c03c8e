//! ClientIP session affinity in the kernel: sticky choice, expiry measured
//! from the client's last new connection, entries of removed backends never
//! honoured, per-client isolation, and an LRU that never refuses a flow.

use std::collections::BTreeSet;

use lb_common::{AffinityEntry, AffinityKey, PROTO_TCP, Reason, SlotKey, ipv4_raw, maps};
use lb_userspace::{clock::monotonic_coarse_ns, datapath::program::FROM_POD};
use xlb_tests::{
    packet::{Packet, addr, flags, seen},
    require_root,
    test_lb::TestLb,
};

const VIP: &str = "10.96.0.10:80";
const BACKENDS: [&str; 3] = ["10.244.1.7:8080", "10.244.2.7:8080", "10.244.3.7:8080"];
const TIMEOUT_S: u32 = 10_800;

/// A frontend with ClientIP affinity (`timeout_s`, 0 for none) over the
/// three backends; returns the test LB, the frontend id and backend ids.
fn sticky(timeout_s: u32) -> (TestLb, u32, Vec<u32>) {
    let mut lb = TestLb::load();
    let ids: Vec<u32> = BACKENDS
        .iter()
        .map(|b| lb.add_backend(b, PROTO_TCP))
        .collect();
    let frontend = lb.add_frontend_full(VIP, PROTO_TCP, &[&ids], 0, timeout_s);
    (lb, frontend, ids)
}

/// A new connection (SYN from a fresh port) of `client`: its backend.
fn connect(lb: &mut TestLb, client: &str, port: u16) -> std::net::SocketAddrV4 {
    let from = format!("{client}:{port}");
    seen(
        &lb.run(FROM_POD, &Packet::tcp(&from, VIP, flags::SYN).bytes())
            .frame,
    )
    .dst
}

fn key(frontend: u32, client: &str) -> AffinityKey {
    AffinityKey {
        frontend_id: frontend,
        client_addr: ipv4_raw(client.parse::<std::net::Ipv4Addr>().unwrap().octets()),
    }
}

/// Writes the affinity entry of `client`: backend `backend_id` in slot 2,
/// last used `age_ns` ago.
fn plant(lb: &mut TestLb, frontend: u32, client: &str, backend_id: u32, age_ns: u64) {
    let entry = AffinityEntry {
        last_used_ns: monotonic_coarse_ns() - age_ns,
        backend_id,
        slot: 2,
    };
    lb.maps
        .affinity
        .insert(key(frontend, client), entry, 0)
        .unwrap();
}

#[test]
fn new_connections_of_a_client_stick_to_one_backend() {
    require_root!();
    let (mut lb, frontend, _) = sticky(TIMEOUT_S);
    let first = connect(&mut lb, "10.244.1.5", 20000);
    for port in 20001..20030 {
        assert_eq!(connect(&mut lb, "10.244.1.5", port), first);
    }
    assert_eq!(lb.counted(), vec![(Reason::ForwardNew, 30)]);
    let entry = lb
        .maps
        .affinity
        .get(&key(frontend, "10.244.1.5"), 0)
        .unwrap();
    assert_eq!(addr(BACKENDS[entry.slot as usize]), first);
}

#[test]
fn clients_are_isolated() {
    require_root!();
    let (mut lb, frontend, _) = sticky(TIMEOUT_S);
    let clients = ["10.244.1.5", "10.244.1.6", "10.244.2.5", "10.244.2.6"];
    for client in clients {
        let first = connect(&mut lb, client, 30000);
        for port in 30001..30010 {
            assert_eq!(connect(&mut lb, client, port), first, "{client}");
        }
        let entry = lb.maps.affinity.get(&key(frontend, client), 0).unwrap();
        assert_eq!(
            addr(BACKENDS[entry.slot as usize]),
            first,
            "{client}'s own entry"
        );
    }
    assert_eq!(lb.maps.affinity.keys().count(), clients.len());
}

#[test]
fn an_unexpired_entry_is_honoured_an_expired_one_is_not() {
    require_root!();
    let (mut lb, frontend, ids) = sticky(2);
    let client = "10.244.1.5";
    // One second old, timeout two: honoured, and refreshed.
    plant(&mut lb, frontend, client, ids[2], 1_000_000_000);
    assert_eq!(connect(&mut lb, client, 40000), addr(BACKENDS[2]));
    let entry = lb.maps.affinity.get(&key(frontend, client), 0).unwrap();
    assert!(
        monotonic_coarse_ns() - entry.last_used_ns < 500_000_000,
        "refreshed"
    );
    // Three seconds old: expired, a fresh choice each time (the test
    // controls time through the entry's timestamp).
    let mut chosen = BTreeSet::new();
    for port in 0..30 {
        plant(&mut lb, frontend, client, ids[2], 3_000_000_000);
        chosen.insert(connect(&mut lb, client, 41000 + port));
    }
    assert!(
        chosen.len() > 1,
        "expired entries are not honoured: {chosen:?}"
    );
}

#[test]
fn entries_of_removed_backends_are_never_honoured() {
    require_root!();
    let (mut lb, frontend, ids) = sticky(TIMEOUT_S);
    let client = "10.244.1.5";
    // The client sticks to slot 2; then slot 2's backend is replaced (what
    // user space does when that endpoint goes: the last slot moves in).
    plant(&mut lb, frontend, client, ids[2], 0);
    let replacement = lb.add_backend("10.244.9.9:8080", PROTO_TCP);
    lb.maps
        .slots
        .insert(
            SlotKey {
                frontend_id: frontend,
                slot: 2,
            },
            replacement,
            0,
        )
        .unwrap();
    lb.remove_backend(ids[2]);
    for port in 0..20 {
        assert_ne!(connect(&mut lb, client, 42000 + port), addr(BACKENDS[2]));
    }
    let entry = lb.maps.affinity.get(&key(frontend, client), 0).unwrap();
    assert_ne!(entry.backend_id, ids[2], "re-recorded with a live backend");
}

#[test]
fn no_affinity_records_nothing() {
    require_root!();
    let (mut lb, _, _) = sticky(0);
    let mut chosen = BTreeSet::new();
    for port in 0..30 {
        chosen.insert(connect(&mut lb, "10.244.1.5", 43000 + port));
    }
    assert!(chosen.len() > 1, "spread: {chosen:?}");
    assert_eq!(lb.maps.affinity.keys().count(), 0);
}

#[test]
fn a_full_affinity_map_evicts_and_never_refuses_a_flow() {
    require_root!();
    let mut lb = TestLb::load_with_capacities(&[(maps::AFFINITY, 16)]);
    let ids: Vec<u32> = BACKENDS
        .iter()
        .map(|b| lb.add_backend(b, PROTO_TCP))
        .collect();
    lb.add_frontend_full(VIP, PROTO_TCP, &[&ids], 0, TIMEOUT_S);
    for i in 0..200u16 {
        let client = format!("10.245.{}.{}", i / 200, i % 200 + 1);
        connect(&mut lb, &client, 44000);
    }
    assert_eq!(lb.counted(), vec![(Reason::ForwardNew, 200)]);
    let entries = lb.maps.affinity.keys().count();
    assert!(
        entries <= 16 * 2,
        "LRU kept the map near its capacity: {entries}"
    );
}

#[test]
fn an_entry_outside_the_active_tier_is_not_honoured() {
    require_root!();
    let mut lb = TestLb::load();
    let ids: Vec<u32> = BACKENDS
        .iter()
        .map(|b| lb.add_backend(b, PROTO_TCP))
        .collect();
    // Tier 0 (this zone) holds the first backend alone, in slot 0; tier 1
    // (all) holds the three in slots 1–3.
    let frontend = lb.add_frontend_full(VIP, PROTO_TCP, &[&ids[..1], &ids], 0, TIMEOUT_S);
    // The client's entry names the third backend in slot 3: tier 1.
    let entry = AffinityEntry {
        last_used_ns: monotonic_coarse_ns(),
        backend_id: ids[2],
        slot: 3,
    };
    lb.maps
        .affinity
        .insert(key(frontend, "10.244.1.5"), entry, 0)
        .unwrap();
    assert_eq!(
        connect(&mut lb, "10.244.1.5", 40000),
        addr(BACKENDS[0]),
        "the active tier wins over a stale choice in another tier"
    );
    let entry = lb
        .maps
        .affinity
        .get(&key(frontend, "10.244.1.5"), 0)
        .unwrap();
    assert_eq!((entry.backend_id, entry.slot), (ids[0], 0), "re-recorded");
}
