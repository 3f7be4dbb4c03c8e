//! The baselines of the end-to-end benchmark: for a set of Services, the
//! rules kube-proxy's iptables mode and nftables mode would program, as the
//! text `iptables-restore` and `nft -f` load — the same chains, matches and
//! jumps in the same order (kube-proxy's `pkg/proxy/iptables` and
//! `pkg/proxy/nftables`), reduced to Services with one port, which is what
//! the benchmarks drive: ClusterIPs, and (north-south) node ports and
//! load-balancer addresses with either external traffic policy.

use std::{fmt::Write, net::Ipv4Addr};

/// The pod network: traffic from outside it is masqueraded, as with
/// kube-proxy's `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// kube-proxy's masquerade mark.
const MASQ_MARK: &str = "0x4000";

/// One Service port and its endpoints.
#[derive(Debug, Clone)]
pub struct BenchService {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// How clients outside the cluster reach it, if they do.
    pub external: Option<External>,
}

/// A Service's addresses for clients outside the cluster.
#[derive(Debug, Clone)]
pub struct External {
    pub node_port: u16,
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`: the indexes of the endpoints on the
    /// node the rules are for (the only ones external clients reach).
    pub local_endpoints: Option<Vec<usize>>,
}

impl BenchService {
    /// kube-proxy's chain-name hash input: `namespace/name:port-name` and
    /// the protocol.
    fn hash(&self, salt: &str) -> String {
        // FNV-1a, base32-ish: stable and short like kube-proxy's SHA256 +
        // base32 prefix, without the dependency.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("{}/{}:{}{salt}", self.namespace, self.name, self.protocol).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        (0..16)
            .map(|i| ALPHABET[((h >> (i * 4)) & 31) as usize] as char)
            .collect()
    }

    fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", self.hash(""))
    }

    fn sep_chain(&self, endpoint: usize) -> String {
        format!("KUBE-SEP-{}", self.hash(&format!("#{endpoint}")))
    }

    fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", self.hash(""))
    }

    fn svl_chain(&self) -> String {
        format!("KUBE-SVL-{}", self.hash(""))
    }

    fn comment(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// kube-proxy's two proxy modes, as the benchmarks load them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    Iptables,
    Nftables,
}

/// Loads `services`' rules in `ns` (a node), the whole table at once, as
/// kube-proxy's first sync does.
pub fn load(
    ns: &crate::netns::Netns,
    rules: Rules,
    services: &[BenchService],
) -> anyhow::Result<()> {
    match rules {
        Rules::Iptables => crate::netns::run_with_input(
            &mut ns.command("iptables-restore"),
            &iptables_restore(services),
        ),
        Rules::Nftables => crate::netns::run_with_input(
            ns.command("nft").args(["-f", "-"]),
            &nft_ruleset(services),
        ),
    }
    .map(drop)
}

/// The whole `nat` table of kube-proxy's iptables mode for `services`, in
/// their order (a packet walks KUBE-SERVICES rule by rule).
pub fn iptables_restore(services: &[BenchService]) -> String {
    let mut out = String::from("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        writeln!(out, ":{chain} - [0:0]").unwrap();
    }
    for svc in services {
        writeln!(out, ":{} - [0:0]", svc.svc_chain()).unwrap();
        for i in 0..svc.endpoints.len() {
            writeln!(out, ":{} - [0:0]", svc.sep_chain(i)).unwrap();
        }
        if let Some(external) = &svc.external {
            writeln!(out, ":{} - [0:0]", svc.ext_chain()).unwrap();
            if external.local_endpoints.is_some() {
                writeln!(out, ":{} - [0:0]", svc.svl_chain()).unwrap();
            }
        }
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    writeln!(
        out,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    )
    .unwrap();
    for svc in services {
        writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
            svc.comment(),
            svc.ip,
            svc.port,
            svc.svc_chain(),
            p = svc.protocol
        )
        .unwrap();
        if let Some(ip) = svc.external.as_ref().and_then(|e| e.load_balancer_ip) {
            writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{} loadbalancer IP\" -m {p} -p {p} -d {ip}/32 --dport {} -j {}",
                svc.comment(),
                svc.port,
                svc.ext_chain(),
                p = svc.protocol
            )
            .unwrap();
        }
        out.push_str(&service_chains(svc));
        if let Some(external) = &svc.external {
            writeln!(
                out,
                "-A KUBE-NODEPORTS -m comment --comment \"{}\" -m {p} -p {p} --dport {} -j {}",
                svc.comment(),
                external.node_port,
                svc.ext_chain(),
                p = svc.protocol
            )
            .unwrap();
            out.push_str(&external_chains(svc, external));
        }
    }
    // Node ports are matched after every Service address, as kube-proxy
    // orders them.
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    out.push_str("COMMIT\n");
    out
}

/// A Service's KUBE-EXT chain (and, under a Local policy, KUBE-SVL):
/// external traffic masqueraded and sent to every endpoint (Cluster), or
/// kept unmasqueraded on this node's endpoints (Local; pods and the node
/// itself still reach every endpoint).
fn external_chains(svc: &BenchService, external: &External) -> String {
    let mut out = String::new();
    let (ext, svc_chain, name) = (svc.ext_chain(), svc.svc_chain(), svc.comment());
    let Some(local) = &external.local_endpoints else {
        writeln!(
            out,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
             -A {ext} -j {svc_chain}"
        )
        .unwrap();
        return out;
    };
    let svl = svc.svl_chain();
    writeln!(
        out,
        "-A {ext} -m comment --comment \"pod traffic for {name} external destinations\" -s {CLUSTER_CIDR} -j {svc_chain}\n\
         -A {ext} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n\
         -A {ext} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}\n\
         -A {ext} -j {svl}"
    )
    .unwrap();
    let n = local.len();
    for (k, &i) in local.iter().enumerate() {
        let (ip, port) = svc.endpoints[i];
        let probability = if k + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - k) as f64
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "-A {svl} -m comment --comment \"{name} -> {ip}:{port}\"{probability} -j {}",
            svc.sep_chain(i)
        )
        .unwrap();
    }
    out
}

/// The rules of one Service's own chains (KUBE-SVC and its KUBE-SEPs).
fn service_chains(svc: &BenchService) -> String {
    let mut out = String::new();
    let chain = svc.svc_chain();
    writeln!(
        out,
        "-A {chain} -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        svc.comment(),
        svc.ip,
        svc.port,
        p = svc.protocol
    )
    .unwrap();
    let n = svc.endpoints.len();
    for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
        let sep = svc.sep_chain(i);
        // Endpoint i of n is taken with probability 1/(n-i): uniform.
        if i + 1 < n {
            writeln!(
                out,
                "-A {chain} -m comment --comment \"{} -> {ip}:{port}\" -m statistic --mode random --probability {:.10} -j {sep}",
                svc.comment(),
                1.0 / (n - i) as f64
            )
            .unwrap();
        } else {
            writeln!(
                out,
                "-A {chain} -m comment --comment \"{} -> {ip}:{port}\" -j {sep}",
                svc.comment()
            )
            .unwrap();
        }
        writeln!(
            out,
            "-A {sep} -m comment --comment \"{}\" -s {ip}/32 -j KUBE-MARK-MASQ\n\
             -A {sep} -m comment --comment \"{}\" -m {p} -p {p} -j DNAT --to-destination {ip}:{port}",
            svc.comment(),
            svc.comment(),
            p = svc.protocol
        )
        .unwrap();
    }
    out
}

/// kube-proxy's partial restore after a change of `svc` alone: only its
/// chains, flushed and rewritten (`iptables-restore --noflush`).
pub fn iptables_partial(svc: &BenchService) -> String {
    let mut out = String::from("*nat\n");
    writeln!(out, ":{} - [0:0]", svc.svc_chain()).unwrap();
    for i in 0..svc.endpoints.len() {
        writeln!(out, ":{} - [0:0]", svc.sep_chain(i)).unwrap();
    }
    out.push_str(&service_chains(svc));
    out.push_str("COMMIT\n");
    out
}

const NFT_TABLE: &str = "kube-proxy";

fn nft_service_chain(svc: &BenchService) -> String {
    format!(
        "service-{}-{}-{}-{}",
        svc.hash(""),
        svc.namespace,
        svc.name,
        svc.protocol
    )
}

fn nft_endpoint_chain(svc: &BenchService, i: usize) -> String {
    let (ip, port) = svc.endpoints[i];
    format!(
        "endpoint-{}-{}-{}-{ip}-{port}",
        svc.hash(&format!("#{i}")),
        svc.namespace,
        svc.name
    )
}

fn nft_external_chain(svc: &BenchService) -> String {
    format!(
        "external-{}-{}-{}-{}",
        svc.hash(""),
        svc.namespace,
        svc.name,
        svc.protocol
    )
}

fn nft_local_chain(svc: &BenchService) -> String {
    format!(
        "local-{}-{}-{}-{}",
        svc.hash(""),
        svc.namespace,
        svc.name,
        svc.protocol
    )
}

/// A Service's external chain in kube-proxy's nftables mode (and, under a
/// Local policy, its local-endpoints chain).
fn nft_external(svc: &BenchService, external: &External) -> String {
    let mut out = String::new();
    let (ext, service) = (nft_external_chain(svc), nft_service_chain(svc));
    writeln!(
        out,
        "add chain ip {NFT_TABLE} {ext}\nflush chain ip {NFT_TABLE} {ext}"
    )
    .unwrap();
    let Some(local) = &external.local_endpoints else {
        writeln!(
            out,
            "add rule ip {NFT_TABLE} {ext} jump mark-for-masquerade\n\
             add rule ip {NFT_TABLE} {ext} goto {service}"
        )
        .unwrap();
        return out;
    };
    let local_chain = nft_local_chain(svc);
    let targets: Vec<String> = local
        .iter()
        .enumerate()
        .map(|(k, &i)| format!("{k} : goto {}", nft_endpoint_chain(svc, i)))
        .collect();
    writeln!(
        out,
        "add chain ip {NFT_TABLE} {local_chain}\nflush chain ip {NFT_TABLE} {local_chain}\n\
         add rule ip {NFT_TABLE} {ext} ip saddr {CLUSTER_CIDR} goto {service}\n\
         add rule ip {NFT_TABLE} {ext} fib saddr type local jump mark-for-masquerade\n\
         add rule ip {NFT_TABLE} {ext} fib saddr type local goto {service}\n\
         add rule ip {NFT_TABLE} {ext} goto {local_chain}\n\
         add rule ip {NFT_TABLE} {local_chain} numgen random mod {} vmap {{ {} }}",
        local.len(),
        targets.join(" , ")
    )
    .unwrap();
    out
}

/// One Service's chains in kube-proxy's nftables mode (service chain with a
/// `numgen` verdict map over its endpoint chains).
fn nft_service(svc: &BenchService) -> String {
    let mut out = String::new();
    let chain = nft_service_chain(svc);
    // Every chain first (flushed: the update replaces their rules), so
    // that the verdict map can name them.
    for name in std::iter::once(chain.clone())
        .chain((0..svc.endpoints.len()).map(|i| nft_endpoint_chain(svc, i)))
    {
        writeln!(
            out,
            "add chain ip {NFT_TABLE} {name}\nflush chain ip {NFT_TABLE} {name}"
        )
        .unwrap();
    }
    let targets: Vec<String> = (0..svc.endpoints.len())
        .map(|i| format!("{i} : goto {}", nft_endpoint_chain(svc, i)))
        .collect();
    writeln!(
        out,
        "add rule ip {NFT_TABLE} {chain} ip daddr {} {} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
         add rule ip {NFT_TABLE} {chain} numgen random mod {} vmap {{ {} }}",
        svc.ip,
        svc.protocol,
        svc.port,
        svc.endpoints.len(),
        targets.join(" , ")
    )
    .unwrap();
    for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
        let ep = nft_endpoint_chain(svc, i);
        writeln!(
            out,
            "add rule ip {NFT_TABLE} {ep} ip saddr {ip} jump mark-for-masquerade\n\
             add rule ip {NFT_TABLE} {ep} meta l4proto {} dnat to {ip}:{port}",
            svc.protocol
        )
        .unwrap();
    }
    if let Some(external) = &svc.external {
        out.push_str(&nft_external(svc, external));
    }
    out
}

/// The `service-ips` elements of `svc`: its ClusterIP, and its
/// load-balancer address.
fn nft_map_elements(svc: &BenchService) -> impl Iterator<Item = String> + '_ {
    let cluster_ip = format!(
        "{} . {} . {} : goto {}",
        svc.ip,
        svc.protocol,
        svc.port,
        nft_service_chain(svc)
    );
    let load_balancer = svc
        .external
        .as_ref()
        .and_then(|e| e.load_balancer_ip)
        .map(|ip| {
            format!(
                "{ip} . {} . {} : goto {}",
                svc.protocol,
                svc.port,
                nft_external_chain(svc)
            )
        });
    std::iter::once(cluster_ip).chain(load_balancer)
}

/// The whole `kube-proxy` table of kube-proxy's nftables mode for
/// `services`: one verdict-map lookup whatever their number.
pub fn nft_ruleset(services: &[BenchService]) -> String {
    let mut out = format!(
        "add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\nadd table ip {NFT_TABLE}\n\
         add chain ip {NFT_TABLE} mark-for-masquerade\n\
         add rule ip {NFT_TABLE} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
         add chain ip {NFT_TABLE} masquerading\n\
         add rule ip {NFT_TABLE} masquerading mark and {MASQ_MARK} == 0 return\n\
         add rule ip {NFT_TABLE} masquerading mark set mark xor {MASQ_MARK}\n\
         add rule ip {NFT_TABLE} masquerading masquerade fully-random\n\
         add map ip {NFT_TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add map ip {NFT_TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; }}\n\
         add chain ip {NFT_TABLE} services\n\
         add rule ip {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip {NFT_TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         add chain ip {NFT_TABLE} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}\n\
         add rule ip {NFT_TABLE} nat-prerouting jump services\n\
         add chain ip {NFT_TABLE} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule ip {NFT_TABLE} nat-output jump services\n\
         add chain ip {NFT_TABLE} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}\n\
         add rule ip {NFT_TABLE} nat-postrouting jump masquerading\n"
    );
    for svc in services {
        out.push_str(&nft_service(svc));
    }
    for chunk in services.chunks(1000) {
        let elements: Vec<String> = chunk.iter().flat_map(nft_map_elements).collect();
        writeln!(
            out,
            "add element ip {NFT_TABLE} service-ips {{ {} }}",
            elements.join(" , ")
        )
        .unwrap();
    }
    let node_ports: Vec<String> = services
        .iter()
        .filter_map(|svc| {
            let external = svc.external.as_ref()?;
            Some(format!(
                "{} . {} : goto {}",
                svc.protocol,
                external.node_port,
                nft_external_chain(svc)
            ))
        })
        .collect();
    if !node_ports.is_empty() {
        writeln!(
            out,
            "add element ip {NFT_TABLE} service-nodeports {{ {} }}",
            node_ports.join(" , ")
        )
        .unwrap();
    }
    out
}

/// kube-proxy's incremental transaction after a change of `svc` alone: its
/// chains flushed and rewritten (the map element stays).
pub fn nft_incremental(svc: &BenchService) -> String {
    nft_service(svc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(i: u8, endpoints: u8) -> BenchService {
        BenchService {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            ip: Ipv4Addr::new(10, 96, 1, i),
            port: 80,
            protocol: "tcp",
            endpoints: (0..endpoints)
                .map(|e| (Ipv4Addr::new(10, 244, i, e + 1), 8080))
                .collect(),
            external: None,
        }
    }

    fn external(i: u8, local: Option<Vec<usize>>) -> BenchService {
        BenchService {
            external: Some(External {
                node_port: 30000 + u16::from(i),
                load_balancer_ip: Some(Ipv4Addr::new(172, 30, 0, i)),
                local_endpoints: local,
            }),
            ..svc(i, 3)
        }
    }

    #[test]
    fn iptables_node_ports_come_last_and_local_policy_keeps_local_endpoints() {
        let text = iptables_restore(&[external(1, None), external(2, Some(vec![1, 2])), svc(3, 1)]);
        let node_ports = text.find("-j KUBE-NODEPORTS").unwrap();
        let last_cluster_ip = text.find("10.96.1.3/32").unwrap();
        assert!(
            last_cluster_ip < node_ports,
            "node ports after every Service address"
        );
        assert!(text.contains("-m tcp -p tcp --dport 30001 -j KUBE-EXT-"));
        assert!(text.contains("-d 172.30.0.2/32 --dport 80 -j KUBE-EXT-"));
        // Cluster: masquerade; Local: two local endpoints, no masquerade.
        assert_eq!(
            text.matches("masquerade traffic for bench/svc-1").count(),
            1
        );
        assert_eq!(text.matches(":KUBE-SVL-").count(), 1);
        let svl_rules = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SVL-"))
            .count();
        assert_eq!(svl_rules, 2);
        assert!(text.contains("--probability 0.5000000000 -j KUBE-SEP-"));
    }

    #[test]
    fn nft_maps_node_ports_and_load_balancer_addresses_to_external_chains() {
        let text = nft_ruleset(&[external(1, None), external(2, Some(vec![0]))]);
        assert!(text.contains("tcp . 30001 : goto external-"));
        assert!(text.contains("172.30.0.2 . tcp . 80 : goto external-"));
        assert!(text.contains("numgen random mod 1 vmap"));
        assert_eq!(
            text.matches("fib saddr type local goto service-").count(),
            1
        );
    }

    #[test]
    fn iptables_endpoints_are_chosen_uniformly_in_order() {
        let text = iptables_restore(&[svc(1, 4), svc(2, 1)]);
        let probabilities: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            probabilities,
            ["0.2500000000", "0.3333333333", "0.5000000000"]
        );
        let first = text.find("10.96.1.1/32").unwrap();
        let second = text.find("10.96.1.2/32").unwrap();
        assert!(first < second, "KUBE-SERVICES keeps the Services' order");
        assert!(text.ends_with("COMMIT\n"));
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 5);
    }

    #[test]
    fn nft_maps_every_service_and_balances_over_its_endpoints() {
        let text = nft_ruleset(&[svc(1, 3), svc(2, 2)]);
        assert!(text.contains("numgen random mod 3 vmap"));
        assert!(text.contains("10.96.1.2 . tcp . 80 : goto service-"));
        assert_eq!(text.matches("dnat to").count(), 5);
        assert_eq!(nft_incremental(&svc(1, 3)).matches("dnat to").count(), 3);
    }

    #[test]
    fn partial_restore_touches_one_service() {
        let text = iptables_partial(&svc(7, 2));
        assert_eq!(text.matches("-j DNAT").count(), 2);
        assert!(!text.contains("KUBE-SERVICES"));
    }
}
