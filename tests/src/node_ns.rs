//! A node's network namespace for packet tests that route: an "external"
//! interface (a veth, this node's address and MAC), a pod interface, a route
//! to the other node's pods and permanent neighbours, so that the programs'
//! FIB lookups are deterministic.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Result;

use crate::{netns::Netns, test_lb::NODE_IP};

/// `ext0`'s MAC (also the destination MAC of `packet::Packet` frames).
pub const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x02];
/// The client's MAC (the source MAC of `packet::Packet` frames).
pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
/// The other node's MAC, next hop to 10.244.2.0/24.
pub const NODE2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x12];
/// The external client, a permanent neighbour on `ext0`.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);

/// The namespace and the interfaces frames arrive on.
pub struct NodeNs {
    pub ns: Netns,
    /// `ext0`: the external interface ([`NODE_IP`]/24, [`NODE_MAC`]).
    pub ext: u32,
    /// `pod0`: where 10.244.1.10 lives.
    pub pod: u32,
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

impl NodeNs {
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "xlb-node-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Netns::new(&name)?;
        for cmd in [
            format!(
                "link add ext0 address {} type veth peer name ext0-peer",
                mac(NODE_MAC)
            ),
            "link add pod0 type veth peer name pod0-peer".into(),
            "link set ext0-peer up".into(),
            "link set pod0-peer up".into(),
            "link set ext0 up".into(),
            "link set pod0 up".into(),
            format!("addr add {NODE_IP}/24 dev ext0"),
            "route add 10.244.2.0/24 via 192.168.77.12".into(),
            "route add 10.244.1.10/32 dev pod0".into(),
            // A next hop whose MAC is not known (yet).
            "route add 10.244.3.0/24 via 192.168.77.13".into(),
        ] {
            ns.ip(&cmd)?;
        }
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let ifindex = |name: &str| -> Result<u32> {
            let out = ns.ip(&format!("-o link show {name}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(text.split(':').next().unwrap_or_default().trim().parse()?)
        };
        let node = NodeNs {
            ext: ifindex("ext0")?,
            pod: ifindex("pod0")?,
            ns,
        };
        node.add_neighbour(Ipv4Addr::new(192, 168, 77, 12), NODE2_MAC)?;
        node.add_neighbour(CLIENT_IP, CLIENT_MAC)?;
        Ok(node)
    }

    /// A permanent neighbour on `ext0`.
    pub fn add_neighbour(&self, ip: Ipv4Addr, mac_addr: [u8; 6]) -> Result<()> {
        self.ns.ip(&format!(
            "neigh add {ip} lladdr {} dev ext0 nud permanent",
            mac(mac_addr)
        ))?;
        Ok(())
    }
}
