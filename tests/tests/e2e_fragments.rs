//! End to end, IPv4 fragments: 8,000-byte UDP requests to a ClusterIP (each
//! leaves the client in six fragments) are balanced over backends on both
//! nodes, and their 8,000-byte replies come back from the ClusterIP — every
//! one arrives.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, UdpSocket},
};

use anyhow::{Context, Result, ensure};
use xlb_tests::{
    echo::{CLIENT_TIMEOUT, Reply},
    require_root,
    scenario::{self, frontend},
};

const SIZE: usize = 8_000;

/// One `SIZE`-byte request from a fresh socket (a fresh flow); the reply,
/// which must be as large and come from the ClusterIP.
fn big_request() -> Result<Reply> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(&vec![b'x'; SIZE], frontend())?;
    let mut buf = vec![0u8; 65_536];
    let (len, from) = socket.recv_from(&mut buf).context("the 8,000-byte reply")?;
    ensure!(len == SIZE, "a reply of {len} bytes");
    ensure!(from == frontend().into(), "a reply from {from}");
    let line = String::from_utf8_lossy(&buf[..len]);
    Reply::parse(line.lines().next().unwrap_or_default())
}

#[test]
fn large_udp_datagrams_through_a_cluster_ip_all_arrive() {
    require_root!();
    let cluster = scenario::running().unwrap();
    let replies: Vec<Reply> = cluster
        .pod("client")
        .run(|| (0..30).map(|_| big_request()).collect::<Result<_>>())
        .unwrap();
    let answered: BTreeSet<&str> = replies.iter().map(|r| r.from.as_str()).collect();
    // web-0 and web-1 on node1, web-2 on node2.
    assert!(answered.contains("web-2"), "{answered:?}");
    assert!(answered.len() >= 2, "{answered:?}");
}
