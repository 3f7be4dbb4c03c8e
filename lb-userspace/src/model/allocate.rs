//! ClusterIPs and node ports for Services written without them (the file
//! source: on one machine there is no API server to fill them in).
//!
//! Every node's agent reads the same files and must pick the same values,
//! with no state shared between them, so an allocation is a pure function
//! of the whole set of Services:
//! - values a Service writes (explicit) are never handed out;
//! - each value to allocate has a key (`namespace/name` for a ClusterIP,
//!   `namespace/name/port/protocol` for a node port) whose hash picks a
//!   slot in the upper part of the range (the lower part is left to
//!   explicit values, as kube-apiserver's allocators do);
//! - Services are served in name order, each taking the first free value
//!   at or after its slot, wrapping around.
//!
//! A value moves only when a Service earlier by name comes to hash onto it
//! (or onto the run of taken values it sits in), or an explicit value takes
//! it; unrelated Services coming and going leave it where it is.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    ops::RangeInclusive,
};

use super::{ObjectName, ParsedService, ServiceObject, service::Explicit};

/// The ranges values are allocated from (kube-apiserver's
/// `--service-cluster-ip-range` and `--service-node-port-range`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    /// The ClusterIP network and its prefix length.
    pub cluster_ips: (Ipv4Addr, u8),
    pub node_ports: RangeInclusive<u16>,
}

impl Default for Ranges {
    /// kube-apiserver's defaults.
    fn default() -> Self {
        Self {
            cluster_ips: (Ipv4Addr::new(10, 96, 0, 0), 12),
            node_ports: 30000..=32767,
        }
    }
}

impl Ranges {
    /// A ClusterIP range from `10.96.0.0/12`: at least 8 addresses (/29).
    pub fn parse_cluster_ips(raw: &str) -> Result<(Ipv4Addr, u8), String> {
        let (ip, len) = raw
            .split_once('/')
            .ok_or_else(|| format!("{raw:?}: expected an IPv4 network, e.g. 10.96.0.0/12"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{raw:?}: {ip:?} is not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|len| *len <= 29)
            .ok_or_else(|| format!("{raw:?}: the prefix length must be 0-29"))?;
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        Ok((Ipv4Addr::from(u32::from(ip) & mask), len))
    }

    /// A node port range from `30000-32767`.
    pub fn parse_node_ports(raw: &str) -> Result<RangeInclusive<u16>, String> {
        let parsed = raw
            .split_once('-')
            .and_then(|(from, to)| Some((from.trim().parse().ok()?, to.trim().parse().ok()?)));
        match parsed {
            Some((from, to)) if 0 < from && from < to => Ok(from..=to),
            _ => Err(format!(
                "{raw:?}: expected FROM-TO with 1 <= FROM < TO <= 65535, e.g. 30000-32767"
            )),
        }
    }

    /// The ClusterIPs that can be handed out: the network's addresses but
    /// its first and last, as offsets from the network address.
    fn cluster_ip_offsets(&self) -> RangeInclusive<u64> {
        let size = 1u64 << (32 - u32::from(self.cluster_ips.1));
        1..=size - 2
    }

    fn cluster_ip(&self, offset: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cluster_ips.0) + offset as u32)
    }
}

/// What one Service asks to be given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub cluster_ip: bool,
    /// The key (the port number) of each port without a node port.
    pub node_ports: Vec<String>,
    pub health_check_node_port: bool,
}

impl Request {
    pub fn is_empty(&self) -> bool {
        !self.cluster_ip && self.node_ports.is_empty() && !self.health_check_node_port
    }
}

/// What one Service was given (`None`: the range is full).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    pub cluster_ip: Option<Ipv4Addr>,
    /// By the port's key.
    pub node_ports: BTreeMap<String, Option<u16>>,
    pub health_check_node_port: Option<u16>,
    /// What it asked for and did not get: its range is full.
    pub not_given: Vec<String>,
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(ip) = self.cluster_ip {
            parts.push(format!("clusterIP {ip}"));
        }
        for (key, port) in &self.node_ports {
            if let Some(port) = port {
                parts.push(format!("nodePort {port} ({key})"));
            }
        }
        if let Some(port) = self.health_check_node_port {
            parts.push(format!("healthCheckNodePort {port}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// The allocations of a model that allocates, kept up to date: the
/// explicit values counted, the requests by Service, and what each was
/// given. Allocation runs again (over the requests only) when an explicit
/// value or a request changed.
#[derive(Debug)]
pub struct Allocator {
    ranges: Ranges,
    explicit_ips: HashMap<Ipv4Addr, usize>,
    explicit_ports: HashMap<u16, usize>,
    requests: BTreeMap<ObjectName, Request>,
    allocations: HashMap<ObjectName, Allocation>,
    stale: bool,
}

impl Allocator {
    pub fn new(ranges: Ranges) -> Self {
        Self {
            ranges,
            explicit_ips: HashMap::new(),
            explicit_ports: HashMap::new(),
            requests: BTreeMap::new(),
            allocations: HashMap::new(),
            stale: false,
        }
    }

    /// Service `name` was `old` and is `new` now.
    pub fn service_changed(
        &mut self,
        name: &ObjectName,
        old: Option<&ServiceObject>,
        new: Option<&ServiceObject>,
    ) {
        let (old_explicit, old_request) = explicit_and_request(old);
        let (new_explicit, new_request) = explicit_and_request(new);
        if (old_explicit, &old_request) == (new_explicit, &new_request) {
            return;
        }
        self.stale = true;
        if let Some(old) = old_explicit {
            old.cluster_ips
                .iter()
                .for_each(|ip| uncount(&mut self.explicit_ips, *ip));
            old.node_ports
                .iter()
                .for_each(|port| uncount(&mut self.explicit_ports, *port));
        }
        if let Some(new) = new_explicit {
            for ip in &new.cluster_ips {
                *self.explicit_ips.entry(*ip).or_default() += 1;
            }
            for port in &new.node_ports {
                *self.explicit_ports.entry(*port).or_default() += 1;
            }
        }
        match new_request.filter(|r| !r.is_empty()) {
            Some(request) => self.requests.insert(name.clone(), request),
            None => self.requests.remove(name),
        };
    }

    /// Allocates again when something changed; the Services whose
    /// allocation changed, with their new one (`None`: they need none now).
    pub fn reallocate(&mut self) -> Vec<(ObjectName, Option<Allocation>)> {
        if !std::mem::take(&mut self.stale) {
            return Vec::new();
        }
        let mut new = allocate(
            &self.ranges,
            &self.explicit_ips,
            &self.explicit_ports,
            &self.requests,
        );
        let mut changed: Vec<(ObjectName, Option<Allocation>)> = self
            .allocations
            .keys()
            .filter(|name| !new.contains_key(*name))
            .map(|name| (name.clone(), None))
            .collect();
        for (name, allocation) in &new {
            if self.allocations.get(name) != Some(allocation) {
                changed.push((name.clone(), Some(allocation.clone())));
            }
        }
        std::mem::swap(&mut self.allocations, &mut new);
        changed.sort_by(|a, b| a.0.cmp(&b.0));
        changed
    }

    /// `service` with what it was given filled in.
    pub fn fill(&self, name: &ObjectName, service: &ParsedService) -> Option<ParsedService> {
        let allocation = self.allocations.get(name)?;
        let mut filled = service.clone();
        if service.wants_cluster_ip {
            filled.cluster_ips.extend(allocation.cluster_ip);
        }
        for (i, port) in service.ports.iter().enumerate() {
            if port.wants_node_port {
                filled.ports[i].node_port = sibling_node_port(service, port.port).or_else(|| {
                    allocation
                        .node_ports
                        .get(&port.allocation_key())
                        .copied()
                        .flatten()
                });
            }
        }
        if service.wants_health_check_node_port {
            filled.health_check_node_port = allocation.health_check_node_port;
        }
        Some(filled)
    }
}

/// The node port a Service writes for another port of number `port` (its
/// TCP and UDP sides share one, as kube-apiserver gives them).
fn sibling_node_port(service: &ParsedService, port: u16) -> Option<u16> {
    service
        .ports
        .iter()
        .find(|p| p.port == port && !p.wants_node_port)
        .and_then(|p| p.node_port)
}

/// A Service's explicit values, and what it asks to be given (only a
/// Service that is programmed asks).
fn explicit_and_request(object: Option<&ServiceObject>) -> (Option<&Explicit>, Option<Request>) {
    let Some(object) = object else {
        return (None, None);
    };
    let request = object.service.as_ref().map(|service| {
        let mut node_ports: Vec<String> = service
            .ports
            .iter()
            .filter(|p| p.wants_node_port && sibling_node_port(service, p.port).is_none())
            .map(|p| p.allocation_key())
            .collect();
        node_ports.sort();
        node_ports.dedup();
        Request {
            cluster_ip: service.wants_cluster_ip,
            node_ports,
            health_check_node_port: service.wants_health_check_node_port,
        }
    });
    (Some(&object.explicit), request)
}

fn uncount<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) {
    if let Some(count) = counts.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&key);
        }
    }
}

/// Gives every request its values, Service by Service in name order,
/// around the values written explicitly.
pub fn allocate<'a>(
    ranges: &Ranges,
    explicit_ips: &HashMap<Ipv4Addr, usize>,
    explicit_ports: &HashMap<u16, usize>,
    requests: impl IntoIterator<Item = (&'a ObjectName, &'a Request)>,
) -> HashMap<ObjectName, Allocation> {
    let ip_offsets = ranges.cluster_ip_offsets();
    let port_offsets = 0..=u64::from(ranges.node_ports.end() - ranges.node_ports.start());
    let mut taken_ips: HashSet<u64> = explicit_ips
        .keys()
        .filter_map(|ip| {
            let offset = u64::from(u32::from(*ip).wrapping_sub(u32::from(ranges.cluster_ips.0)));
            ip_offsets.contains(&offset).then_some(offset)
        })
        .collect();
    let mut taken_ports: HashSet<u64> = explicit_ports
        .keys()
        .filter(|port| ranges.node_ports.contains(*port))
        .map(|port| u64::from(port - ranges.node_ports.start()))
        .collect();
    let node_port = |offset: u64| ranges.node_ports.start() + offset as u16;
    // kube-apiserver's lower bands, left to explicit values: 1/16 of the
    // ClusterIPs (16 to 256), 1/32 of the node ports (16 to 128); none in
    // a range of 16 values or fewer.
    let band = |size: u64, fraction: u64, max: u64| match size {
        0..=16 => 0,
        _ => (size / fraction).clamp(16, max),
    };
    let ip_band = band(ip_offsets.end() - ip_offsets.start() + 1, 16, 256);
    let port_band = band(port_offsets.end() + 1, 32, 128);
    let mut out = HashMap::new();
    for (name, request) in requests {
        let mut allocation = Allocation::default();
        let (ip_range, port_range) = (
            format!("{}/{}", ranges.cluster_ips.0, ranges.cluster_ips.1),
            format!("{}-{}", ranges.node_ports.start(), ranges.node_ports.end()),
        );
        if request.cluster_ip {
            let key = format!("{}/{}", name.namespace, name.name);
            allocation.cluster_ip = first_free(&ip_offsets, ip_band, &key, &mut taken_ips)
                .map(|offset| ranges.cluster_ip(offset));
            if allocation.cluster_ip.is_none() {
                allocation
                    .not_given
                    .push(format!("a ClusterIP from {ip_range}"));
            }
        }
        for port in &request.node_ports {
            let key = format!("{}/{}/{port}", name.namespace, name.name);
            let allocated =
                first_free(&port_offsets, port_band, &key, &mut taken_ports).map(node_port);
            if allocated.is_none() {
                allocation
                    .not_given
                    .push(format!("a nodePort for {port} from {port_range}"));
            }
            allocation.node_ports.insert(port.clone(), allocated);
        }
        if request.health_check_node_port {
            let key = format!("{}/{}/healthCheckNodePort", name.namespace, name.name);
            allocation.health_check_node_port =
                first_free(&port_offsets, port_band, &key, &mut taken_ports).map(node_port);
            if allocation.health_check_node_port.is_none() {
                allocation
                    .not_given
                    .push(format!("a healthCheckNodePort from {port_range}"));
            }
        }
        out.insert(name.clone(), allocation);
    }
    out
}

/// The first offset of `range` not in `taken`, from `key`'s slot above the
/// `lower` band on, wrapping around; taken.
fn first_free(
    range: &RangeInclusive<u64>,
    lower: u64,
    key: &str,
    taken: &mut HashSet<u64>,
) -> Option<u64> {
    let (start, end) = (*range.start(), *range.end());
    let size = end - start + 1;
    if taken.len() as u64 >= size {
        return None;
    }
    let slot = lower + crate::fnv1a(key.as_bytes()) % (size - lower);
    (0..size)
        .map(|step| start + (slot + step) % size)
        .find(|offset| taken.insert(*offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ports: &[&str]) -> Request {
        Request {
            cluster_ip: true,
            node_ports: ports.iter().map(|p| p.to_string()).collect(),
            health_check_node_port: false,
        }
    }

    fn run(
        ranges: &Ranges,
        explicit_ips: &[Ipv4Addr],
        explicit_ports: &[u16],
        names: &[&str],
    ) -> HashMap<ObjectName, Allocation> {
        let requests: BTreeMap<ObjectName, Request> = names
            .iter()
            .map(|n| (ObjectName::new("default", *n), request(&["80/TCP"])))
            .collect();
        let ips = explicit_ips.iter().map(|ip| (*ip, 1)).collect();
        let ports = explicit_ports.iter().map(|p| (*p, 1)).collect();
        allocate(ranges, &ips, &ports, &requests)
    }

    #[test]
    fn values_are_in_range_distinct_and_the_same_on_every_run() {
        let ranges = Ranges::default();
        let names: Vec<String> = (0..2000).map(|i| format!("svc-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let first = run(&ranges, &[], &[], &names);
        assert_eq!(first, run(&ranges, &[], &[], &names), "deterministic");
        let ips: HashSet<Ipv4Addr> = first.values().filter_map(|a| a.cluster_ip).collect();
        let ports: HashSet<u16> = first
            .values()
            .flat_map(|a| a.node_ports.values().flatten().copied())
            .collect();
        assert_eq!(ips.len(), 2000);
        assert_eq!(ports.len(), 2000);
        let network = u32::from(Ipv4Addr::new(10, 96, 0, 0));
        for ip in ips {
            let offset = u32::from(ip) - network;
            assert!((1..(1 << 20) - 1).contains(&offset), "{ip}");
        }
        assert!(ports.iter().all(|p| ranges.node_ports.contains(p)));
    }

    #[test]
    fn explicit_values_are_never_handed_out_and_unrelated_services_move_nothing() {
        // A range of 16 addresses (14 usable) and 16 ports: collisions happen.
        let ranges = Ranges {
            cluster_ips: (Ipv4Addr::new(10, 0, 0, 0), 28),
            node_ports: 30000..=30015,
        };
        let alone = run(&ranges, &[], &[], &["web"]);
        let web = &alone[&ObjectName::new("default", "web")];
        // The value web got, written by another Service: web moves.
        let taken = run(
            &ranges,
            &[web.cluster_ip.unwrap()],
            &[web.node_ports["80/TCP"].unwrap()],
            &["web"],
        );
        let moved = &taken[&ObjectName::new("default", "web")];
        assert_ne!(moved.cluster_ip, web.cluster_ip);
        assert_ne!(moved.node_ports, web.node_ports);
        // Services after it by name come and go: web keeps its values.
        let crowd = run(&ranges, &[], &[], &["web", "x1", "x2", "x3", "x4"]);
        assert_eq!(&crowd[&ObjectName::new("default", "web")], web);
    }

    #[test]
    fn a_full_range_gives_nothing() {
        let ranges = Ranges {
            cluster_ips: (Ipv4Addr::new(10, 0, 0, 0), 29),
            node_ports: 30000..=30001,
        };
        let names = ["a", "b", "c", "d", "e", "f", "g"];
        let got = run(&ranges, &[], &[], &names);
        let ips = got.values().filter(|a| a.cluster_ip.is_some()).count();
        assert_eq!(ips, 6, "a /29 has 6 addresses to give");
        let ports = got
            .values()
            .filter(|a| a.node_ports["80/TCP"].is_some())
            .count();
        assert_eq!(ports, 2);
        assert!(got[&ObjectName::new("default", "g")].cluster_ip.is_none());
    }

    #[test]
    fn ranges_parse_like_kube_apiserver_flags() {
        assert_eq!(
            Ranges::parse_cluster_ips("10.96.0.0/12").unwrap(),
            (Ipv4Addr::new(10, 96, 0, 0), 12)
        );
        assert_eq!(
            Ranges::parse_cluster_ips("10.96.1.7/16").unwrap(),
            (Ipv4Addr::new(10, 96, 0, 0), 16),
            "host bits dropped"
        );
        assert!(Ranges::parse_cluster_ips("10.96.0.0").is_err());
        assert!(Ranges::parse_cluster_ips("10.96.0.0/30").is_err());
        assert!(Ranges::parse_cluster_ips("fd00::/108").is_err());
        assert_eq!(
            Ranges::parse_node_ports("30000-32767").unwrap(),
            30000..=32767
        );
        assert!(Ranges::parse_node_ports("32767-30000").is_err());
        assert!(Ranges::parse_node_ports("0-10").is_err());
        assert!(Ranges::parse_node_ports("30000").is_err());
    }
}
