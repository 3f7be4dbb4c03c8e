//! A datapath loaded for one test: its own pinned maps, filled by hand, and
//! programs run on crafted packets with BPF_PROG_TEST_RUN.

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    Backend, Frontend, FrontendKey, MAX_TIERS, Reason, SlotKey, ipv4_raw, port_raw, scope,
};
use lb_userspace::{Datapath, Maps};

use crate::{packet::addr, pins::PinDir};

/// TC verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

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
        let pins = PinDir::new();
        let mut datapath =
            Datapath::load_with_capacities(pins.path(), capacities).expect("load the datapath");
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
        let id = self.next_backend_id;
        self.next_backend_id += 1;
        let a = addr(backend);
        let value = Backend {
            addr: ipv4_raw(a.ip().octets()),
            port: port_raw(a.port()),
            proto,
            pad: 0,
        };
        self.maps
            .backends
            .insert(id, value, 0)
            .expect("insert backend");
        id
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
            scope: scope::INTERNAL,
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
        id
    }

    /// Runs `program` once on `frame`.
    pub fn run(&mut self, program: &'static str, frame: &[u8]) -> Outcome {
        self.run_repeated(program, frame, 1).0
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
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
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
