//! The baselines of the end-to-end benchmark: for a set of Services, the
//! rules kube-proxy's iptables mode and nftables mode would program, as the
//! text `iptables-restore` and `nft -f` load — the same chains, matches and
//! jumps in the same order (kube-proxy's `pkg/proxy/iptables` and
//! `pkg/proxy/nftables`), reduced to ClusterIP Services with one port, which
//! is what the benchmark drives.

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

    fn comment(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The whole `nat` table of kube-proxy's iptables mode for `services`, in
/// their order (a packet walks KUBE-SERVICES rule by rule).
pub fn iptables_restore(services: &[BenchService]) -> String {
    let mut out = String::from("*nat\n");
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        writeln!(out, ":{chain} - [0:0]").unwrap();
    }
    for svc in services {
        writeln!(out, ":{} - [0:0]", svc.svc_chain()).unwrap();
        for i in 0..svc.endpoints.len() {
            writeln!(out, ":{} - [0:0]", svc.sep_chain(i)).unwrap();
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
        out.push_str(&service_chains(svc));
    }
    out.push_str("COMMIT\n");
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
    out
}

fn nft_map_element(svc: &BenchService) -> String {
    format!(
        "{} . {} . {} : goto {}",
        svc.ip,
        svc.protocol,
        svc.port,
        nft_service_chain(svc)
    )
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
         add chain ip {NFT_TABLE} services\n\
         add rule ip {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
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
        let elements: Vec<String> = chunk.iter().map(nft_map_element).collect();
        writeln!(
            out,
            "add element ip {NFT_TABLE} service-ips {{ {} }}",
            elements.join(" , ")
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
        }
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
