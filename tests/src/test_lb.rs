//! A datapath loaded for one test: its own pinned maps, filled by hand, and
//! programs run on crafted packets with BPF_PROG_TEST_RUN.

use std::net::Ipv4Addr;

use aya::{
    maps::lpm_trie::Key,
    programs::{TestRun, TestRunOptions, TestRunResult},
};
use lb_common::{
    Backend, Frontend, FrontendKey, MAX_TIERS, Reason, SlotKey, SourceRangeKey, ipv4_raw, port_raw,
    scope,
};
use lb_userspace::{Datapath, Maps, datapath::Settings};

use crate::{packet::addr, pins::PinDir};

/// TC verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// XDP actions.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The context of an XDP test run: struct xdp_md (data, data_end,
/// data_meta, ingress_ifindex, ...).
fn xdp_ctx(frame: &[u8], ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// The node address every test datapath SNATs external flows to.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 11);

/// What a program did with a packet.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

/// A loaded datapath with maps filled by the test.
pub struct TestLb {
    datapath: Datapath,
    pub maps: Maps,
    next_frontend_id: u32,
    next_backend_id: u32,
    // Last: the pins go after the handles on them.
    _pins: PinDir,
}

impl TestLb {
    /// Loads the embedded object with its maps pinned in a fresh directory.
    pub fn load() -> Self {
        Self::load_with_capacities(&[])
    }

    /// [`Self::load`] with some maps' capacities overridden by name.
    pub fn load_with_capacities(capacities: &[(&'static str, u32)]) -> Self {
        Self::load_with(Settings {
            snat_addr: Some(NODE_IP),
            capacities: capacities.to_vec(),
            ..Settings::default()
        })
    }

    /// Loads with `settings` as they are.
    pub fn load_with(settings: Settings) -> Self {
        let pins = PinDir::new();
        let mut datapath = Datapath::load(pins.path(), &settings).expect("load the datapath");
        let maps = datapath.take_maps().expect("open the maps");
        Self {
            datapath,
            maps,
            next_frontend_id: 1,
            next_backend_id: 1,
            _pins: pins,
        }
    }

    /// Adds a backend and returns its id.
    pub fn add_backend(&mut self, backend: &str, proto: u8) -> u32 {
        self.add_backend_flagged(backend, proto, 0)
    }

    /// Adds a backend with `lb_common::backend_flags`; returns its id.
    pub fn add_backend_flagged(&mut self, backend: &str, proto: u8, flags: u8) -> u32 {
        let id = self.next_backend_id;
        self.next_backend_id += 1;
        let a = addr(backend);
        let value = Backend {
            addr: ipv4_raw(a.ip().octets()),
            port: port_raw(a.port()),
            proto,
            flags,
        };
        self.maps
            .backends
            .insert(id, value, 0)
            .expect("insert backend");
        self.pass_filter(lb_common::addr_filter::BACKENDS, value.addr);
        id
    }

    /// Sets `addr`'s bit in bitmap `set` of the per-packet path's
    /// pre-filter, as the agent does for every frontend and backend address.
    pub fn pass_filter(&mut self, set: u32, addr: u32) {
        let (index, mask) = lb_common::addr_filter_bit(set, addr);
        let word = self
            .maps
            .addr_filter
            .get(&index, 0)
            .expect("read the filter");
        self.maps
            .addr_filter
            .set(index, word | mask, 0)
            .expect("write the filter");
    }

    /// Marks `ip` as an address only Services use (as the agent does for
    /// ClusterIPs, LoadBalancer and external IPs).
    pub fn add_service_addr(&mut self, ip: &str) {
        let ip: Ipv4Addr = ip.parse().expect("an IPv4 address");
        self.maps
            .service_addrs
            .insert(ipv4_raw(ip.octets()), 1, 0)
            .expect("insert service address");
    }

    /// The bpffs directory the maps are pinned in.
    pub fn bpffs(&self) -> &std::path::Path {
        self._pins.path()
    }

    /// Lets `nodeport_xdp` answer with `XDP_TX` on interface `ifindex`, as
    /// the agent does where that delivery works.
    pub fn allow_xdp_tx(&mut self, ifindex: u32) {
        let slot = ifindex % lb_common::maps::XDP_TX_IFACES_MAX;
        self.maps
            .xdp_tx_ifaces
            .set(slot, ifindex, 0)
            .expect("set XDP_TX interface");
    }

    /// The ids of every backend added so far.
    pub fn backend_ids(&self) -> Vec<u32> {
        self.maps
            .backends
            .keys()
            .map(|k| k.expect("backend id"))
            .collect()
    }

    /// Removes a backend (its slots stay: the test decides).
    pub fn remove_backend(&mut self, id: u32) {
        self.maps.backends.remove(&id).expect("remove backend");
    }

    /// Adds an internal frontend with `backends` in tier 0; returns its id.
    pub fn add_frontend(&mut self, frontend: &str, proto: u8, backends: &[&str]) -> u32 {
        let ids: Vec<u32> = backends
            .iter()
            .map(|b| self.add_backend(b, proto))
            .collect();
        self.add_frontend_tiers(frontend, proto, &[&ids])
    }

    /// Adds an internal frontend whose slots hold the given backend ids, tier
    /// by tier; returns its id.
    pub fn add_frontend_tiers(&mut self, frontend: &str, proto: u8, tiers: &[&[u32]]) -> u32 {
        self.add_frontend_flagged(frontend, proto, tiers, 0)
    }

    /// [`Self::add_frontend_tiers`] with `lb_common::frontend_flags`.
    pub fn add_frontend_flagged(
        &mut self,
        frontend: &str,
        proto: u8,
        tiers: &[&[u32]],
        flags: u16,
    ) -> u32 {
        self.add_frontend_full(frontend, proto, tiers, flags, 0)
    }

    /// An internal frontend with every field given; returns its id.
    pub fn add_frontend_full(
        &mut self,
        frontend: &str,
        proto: u8,
        tiers: &[&[u32]],
        flags: u16,
        affinity_timeout_s: u32,
    ) -> u32 {
        let spec = FrontendSpec {
            tiers,
            flags,
            affinity_timeout_s,
            scope: scope::INTERNAL,
        };
        self.add_frontend_spec(frontend, proto, &spec)
    }

    /// An external frontend (NodePort, LoadBalancer, external IP) with
    /// `backends` in tier 0; returns its id.
    pub fn add_external_frontend(
        &mut self,
        frontend: &str,
        proto: u8,
        backends: &[u32],
        flags: u16,
    ) -> u32 {
        let spec = FrontendSpec {
            tiers: &[backends],
            flags,
            affinity_timeout_s: 0,
            scope: scope::EXTERNAL,
        };
        self.add_frontend_spec(frontend, proto, &spec)
    }

    /// Allows `network` (`a.b.c.d/len`) to use frontend `frontend_id` (which
    /// needs `frontend_flags::SOURCE_RANGES`).
    pub fn add_source_range(&mut self, frontend_id: u32, network: &str) {
        let (ip, len) = network.split_once('/').expect("a.b.c.d/len");
        let ip: Ipv4Addr = ip.parse().expect("network address");
        let len: u32 = len.parse().expect("prefix length");
        let key = SourceRangeKey {
            frontend_id,
            addr: ipv4_raw(ip.octets()),
        };
        self.maps
            .source_ranges
            .insert(&Key::new(32 + len, key), 1, 0)
            .expect("insert source range");
    }

    /// A frontend as `spec` says; returns its id.
    pub fn add_frontend_spec(&mut self, frontend: &str, proto: u8, spec: &FrontendSpec) -> u32 {
        let FrontendSpec {
            tiers,
            flags,
            affinity_timeout_s,
            scope,
        } = *spec;
        assert!(tiers.len() <= MAX_TIERS);
        let id = self.next_frontend_id;
        self.next_frontend_id += 1;
        let mut tier_len = [0u16; MAX_TIERS];
        let mut slot = 0;
        for (tier, backend_ids) in tiers.iter().enumerate() {
            tier_len[tier] = backend_ids.len() as u16;
            for backend_id in *backend_ids {
                let key = SlotKey {
                    frontend_id: id,
                    slot,
                };
                self.maps
                    .slots
                    .insert(key, backend_id, 0)
                    .expect("insert slot");
                slot += 1;
            }
        }
        let a = addr(frontend);
        let key = FrontendKey {
            addr: ipv4_raw(a.ip().octets()),
            port: port_raw(a.port()),
            proto,
            scope,
        };
        let value = Frontend {
            id,
            tier_len,
            flags,
            affinity_timeout_s,
        };
        self.maps
            .frontends
            .insert(key, value, 0)
            .expect("insert frontend");
        self.pass_filter(lb_common::addr_filter::FRONTENDS, key.addr);
        id
    }

    /// Runs `program` once on `frame`.
    pub fn run(&mut self, program: &'static str, frame: &[u8]) -> Outcome {
        self.run_repeated(program, frame, 1).0
    }

    /// Runs TC `program` once on `frame` as if it arrived on interface
    /// `ifindex` (of the calling thread's network namespace).
    pub fn run_on(&mut self, program: &'static str, frame: &[u8], ifindex: u32) -> Outcome {
        self.run_on_repeated(program, frame, ifindex, 1).0
    }

    /// [`Self::run_on`] `repeat` times (see [`Self::run_repeated`]).
    pub fn run_on_repeated(
        &mut self,
        program: &'static str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> (Outcome, std::time::Duration) {
        // struct __sk_buff up to `ifindex` (offset 40); the rest is zero.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let program = self.datapath.tc_program(program).expect("program");
        test_run(program, frame, Some(&ctx), repeat)
    }

    /// Runs `nodeport_xdp` once on `frame` arriving on `ifindex`.
    pub fn run_xdp(&mut self, frame: &[u8], ifindex: u32) -> Outcome {
        self.run_xdp_repeated(frame, ifindex, 1).0
    }

    /// Runs `nodeport_xdp` `repeat` times on `frame` arriving on `ifindex`.
    pub fn run_xdp_repeated(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> (Outcome, std::time::Duration) {
        let program = self.datapath.xdp_program().expect("program");
        test_run(program, frame, Some(&xdp_ctx(frame, ifindex)), repeat)
    }

    /// Loads the benchmark's empty floor programs (TC: run them by name).
    pub fn load_floors(&mut self) {
        self.datapath
            .load_floors()
            .expect("load the floor programs");
    }

    /// Runs the empty XDP floor program like [`Self::run_xdp_repeated`].
    pub fn run_floor_xdp_repeated(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> (Outcome, std::time::Duration) {
        let program = self.datapath.floor_xdp().expect("floor program");
        test_run(program, frame, Some(&xdp_ctx(frame, ifindex)), repeat)
    }

    /// Runs `program` `repeat` times on `frame` (the kernel reuses the
    /// packet, so later runs see the first run's rewrites); returns the
    /// outcome and the kernel's mean time per run.
    pub fn run_repeated(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> (Outcome, std::time::Duration) {
        let program = self.datapath.tc_program(program).expect("program");
        test_run(program, frame, None, repeat)
    }

    /// The packet counters that are not zero, by reason, summed over CPUs.
    pub fn counted(&self) -> Vec<(Reason, u64)> {
        let totals = self.maps.counter_totals().expect("read counters");
        Reason::ALL
            .into_iter()
            .filter(|reason| totals[*reason as usize].packets > 0)
            .map(|reason| (reason, totals[reason as usize].packets))
            .collect()
    }
}

/// What a test frontend holds besides its address.
#[derive(Clone, Copy)]
pub struct FrontendSpec<'a> {
    /// Backend ids, tier by tier.
    pub tiers: &'a [&'a [u32]],
    /// `lb_common::frontend_flags`.
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// `lb_common::scope`.
    pub scope: u8,
}

/// BPF_PROG_TEST_RUN of `program` on `frame` (with context `ctx`),
/// `repeat` times: the outcome and the kernel's mean time per run.
fn test_run(
    program: &mut impl for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
    frame: &[u8],
    ctx: Option<&[u8]>,
    repeat: u32,
) -> (Outcome, std::time::Duration) {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx,
        repeat,
        ..TestRunOptions::default()
    };
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    let outcome = Outcome {
        verdict: result.return_value,
        frame: out,
    };
    (outcome, result.duration)
}

impl TestLb {
    /// Asserts that `program` passes `frame` byte for byte, counted under
    /// `reason` alone.
    pub fn assert_passes_unchanged(&mut self, program: &'static str, frame: &[u8], reason: Reason) {
        let before = self.maps.counter_totals().expect("read counters");
        let out = self.run(program, frame);
        assert_eq!(out.verdict, TC_ACT_OK, "{reason:?}: verdict");
        assert_eq!(out.frame, frame, "{reason:?}: bytes unchanged");
        self.assert_counted_once(&before, reason);
    }

    /// Asserts that `program` drops `frame`, counted under `reason` alone.
    pub fn assert_drops(&mut self, program: &'static str, frame: &[u8], reason: Reason) {
        let before = self.maps.counter_totals().expect("read counters");
        let out = self.run(program, frame);
        assert_eq!(out.verdict, TC_ACT_SHOT, "{reason:?}: verdict");
        self.assert_counted_once(&before, reason);
    }

    fn assert_counted_once(&self, before: &[lb_common::Counter], reason: Reason) {
        let after = self.maps.counter_totals().expect("read counters");
        for r in Reason::ALL {
            let delta = after[r as usize].packets - before[r as usize].packets;
            let want = u64::from(r == reason);
            assert_eq!(
                delta,
                want,
                "counter {} after a {reason:?} packet",
                r.name()
            );
        }
    }
}

impl TestLb {
    /// Every conntrack entry, sorted by key.
    pub fn conntrack(&self) -> Vec<(lb_common::CtKey, lb_common::CtEntry)> {
        let mut entries: Vec<_> = self
            .maps
            .conntrack
            .iter()
            .map(|entry| entry.expect("read conntrack"))
            .collect();
        entries.sort_by_key(|(key, _)| *key);
        entries
    }

    /// Rewrites every conntrack entry with `edit`.
    pub fn edit_conntrack(&mut self, edit: impl Fn(&mut lb_common::CtEntry)) {
        for (key, mut entry) in self.conntrack() {
            edit(&mut entry);
            self.maps
                .conntrack
                .insert(key, entry, 0)
                .expect("write conntrack");
        }
    }
}
