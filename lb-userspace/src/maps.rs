//! Typed handles on the datapath's maps, either from a freshly loaded object
//! or from the pins of a running (or stopped) agent.

use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, Counter, CtEntry, CtKey, Frontend, FrontendKey,
    REASON_COUNT, Reason, ServiceName, SlotKey, SockAffinityKey, SockRevEntry, SockRevKey,
    SourceRangeKey, ct_event, maps,
};

use crate::Error;

/// Every map of the datapath.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub frontend_names: HashMap<MapData, u32, ServiceName>,
    pub service_addrs: HashMap<MapData, u32, u8>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub sock_affinity: HashMap<MapData, SockAffinityKey, AffinityEntry>,
    pub sock_rev: HashMap<MapData, SockRevKey, SockRevEntry>,
    pub addr_filter: Array<MapData, u64>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub xdp_tx_ifaces: Array<MapData, u32>,
    pub conntrack_events: PerCpuArray<MapData, u64>,
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
        Self::build(|name| ebpf.take_map(name).ok_or(Error::MissingMap(name)))
    }

    /// Opens the maps pinned under `dir`: a clear error when no datapath
    /// is pinned there, or one of another xlb version.
    pub fn open_pinned(dir: &Path) -> Result<Self, Error> {
        if !dir.join(maps::FRONTENDS).exists() {
            return Err(Error::NoPins(dir.to_owned()));
        }
        Self::build(|name| {
            let data = MapData::from_pin(dir.join(name))
                .map_err(|_| Error::PinsOfAnotherVersion(dir.to_owned(), name))?;
            Map::from_map_data(data).map_err(|source| Error::Map { name, source })
        })
        .map_err(|err| match err {
            Error::Map { name, .. } => Error::PinsOfAnotherVersion(dir.to_owned(), name),
            other => other,
        })
    }

    fn build(mut open: impl FnMut(&'static str) -> Result<Map, Error>) -> Result<Self, Error> {
        fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
            name: &'static str,
            map: Map,
        ) -> Result<T, Error> {
            T::try_from(map).map_err(|source| Error::Map { name, source })
        }
        Ok(Self {
            frontends: typed(maps::FRONTENDS, open(maps::FRONTENDS)?)?,
            frontend_names: typed(maps::FRONTEND_NAMES, open(maps::FRONTEND_NAMES)?)?,
            service_addrs: typed(maps::SERVICE_ADDRS, open(maps::SERVICE_ADDRS)?)?,
            slots: typed(maps::SLOTS, open(maps::SLOTS)?)?,
            backends: typed(maps::BACKENDS, open(maps::BACKENDS)?)?,
            conntrack: typed(maps::CONNTRACK, open(maps::CONNTRACK)?)?,
            affinity: typed(maps::AFFINITY, open(maps::AFFINITY)?)?,
            sock_affinity: typed(maps::SOCK_AFFINITY, open(maps::SOCK_AFFINITY)?)?,
            sock_rev: typed(maps::SOCK_REV, open(maps::SOCK_REV)?)?,
            addr_filter: typed(maps::ADDR_FILTER, open(maps::ADDR_FILTER)?)?,
            source_ranges: typed(maps::SOURCE_RANGES, open(maps::SOURCE_RANGES)?)?,
            counters: typed(maps::COUNTERS, open(maps::COUNTERS)?)?,
            xdp_tx_ifaces: typed(maps::XDP_TX_IFACES, open(maps::XDP_TX_IFACES)?)?,
            conntrack_events: typed(maps::CONNTRACK_EVENTS, open(maps::CONNTRACK_EVENTS)?)?,
        })
    }

    /// The conntrack event counters summed over all CPUs, by
    /// `lb_common::ct_event` index.
    pub fn conntrack_events(&self) -> Result<[u64; ct_event::COUNT as usize], Error> {
        let mut totals = [0; ct_event::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            let per_cpu = self
                .conntrack_events
                .get(&(index as u32), 0)
                .map_err(Error::map(maps::CONNTRACK_EVENTS))?;
            *total = per_cpu.iter().sum();
        }
        Ok(totals)
    }

    /// The counters summed over all CPUs, one per [`Reason`].
    pub fn counter_totals(&self) -> Result<[Counter; REASON_COUNT], Error> {
        let mut totals = [Counter::default(); REASON_COUNT];
        for reason in Reason::ALL {
            let per_cpu = self
                .counters
                .get(&(reason as u32), 0)
                .map_err(|source| Error::Map {
                    name: maps::COUNTERS,
                    source,
                })?;
            let total = &mut totals[reason as usize];
            for value in per_cpu.iter() {
                total.packets += value.packets;
                total.bytes += value.bytes;
            }
        }
        Ok(totals)
    }
}
