//! Loading the kernel programs with their maps pinned under a bpffs dir.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSock, CgroupSockAddr, SchedClassifier, Xdp},
};
use lb_common::{ipv4_raw, maps};

use crate::{Error, Maps, bpffs, object};

/// The programs of the object, by the names the kernel side gives them.
pub mod program {
    /// TC ingress of each pod's host-side veth.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress of each pod's host-side veth.
    pub const TO_POD: &str = "to_pod";
    /// TC ingress of each external interface.
    pub const NODEPORT_TC: &str = "nodeport_tc";
    /// XDP on each external interface.
    pub const NODEPORT_XDP: &str = "nodeport_xdp";
    /// Every TC program.
    pub const TC: [&str; 3] = [FROM_POD, TO_POD, NODEPORT_TC];
    /// The socket path's cgroup programs (`cgroup_sock_addr`), by hook.
    pub const SOCK_ADDR: [&str; 4] = [
        "sock_connect4",
        "sock_sendmsg4",
        "sock_recvmsg4",
        "sock_getpeername4",
    ];
    /// The socket path's release hook (`cgroup_sock`).
    pub const SOCK_RELEASE: &str = "sock_release";
    /// Empty programs, the datapath benchmark's floor; loaded only by
    /// [`super::Datapath::load_floors`], never attached.
    pub const FLOOR_TC: &str = "floor_tc";
    pub const FLOOR_XDP: &str = "floor_xdp";
}

/// What a load is configured with.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The node address external flows to remote backends are SNATed to;
    /// `None` turns that SNAT off (and with it Cluster-policy external
    /// traffic to other nodes).
    pub snat_addr: Option<Ipv4Addr>,
    /// Maps whose capacity differs from `lb_common::maps` (tests fill them).
    pub capacities: Vec<(&'static str, u32)>,
    /// Which sockets are balanced at the socket (the cgroup programs are
    /// loaded unless [`SocketLb::Off`]).
    pub socket_lb: SocketLb,
    /// Packet tests of the flow-creation race only: every forward conntrack
    /// lookup misses, as on the CPU that loses the race.
    pub lose_flow_race: bool,
}

/// Pinned maps whose size is part of the programs' layout (they index them
/// by a computed number): a pin of another size, left by another version,
/// is dropped and the map made anew. What they hold is disposable: the
/// counters, and the pre-filter, which the agent rewrites before it
/// attaches the programs that read it.
const SIZED_BY_LAYOUT: [(&str, u32); 2] = [
    (maps::COUNTERS, lb_common::REASON_COUNT as u32),
    (maps::ADDR_FILTER, maps::ADDR_FILTER_WORDS),
];

fn drop_resized_pins(bpffs: &Path) -> Result<(), Error> {
    for (name, size) in SIZED_BY_LAYOUT {
        let pin = bpffs.join(name);
        let Ok(map) = aya::maps::MapData::from_pin(&pin) else {
            continue;
        };
        if map.info().map(|info| info.max_entries()).ok() != Some(size) {
            std::fs::remove_file(&pin).map_err(|source| Error::Bpffs { path: pin, source })?;
        }
    }
    Ok(())
}

/// Which sockets the socket path balances (`--socket-lb`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SocketLb {
    /// None: every packet goes through the per-packet path.
    #[default]
    Off,
    /// Every socket in the cgroup: the node's processes and its pods.
    All,
    /// Only sockets in this network namespace (by cookie): the node's own
    /// processes; pods stay on the per-packet path.
    HostOnly { netns_cookie: u64 },
}

/// The loaded object: programs verified and loaded, maps pinned.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
}

impl Datapath {
    /// Loads the embedded object. Maps already pinned under `bpffs` are
    /// reused (a restarted agent keeps every flow); missing ones are created
    /// and pinned there.
    pub fn load(bpffs: &Path, settings: &Settings) -> Result<Self, Error> {
        bpffs::ensure_dir(bpffs)?;
        drop_resized_pins(bpffs)?;
        let snat_addr = settings.snat_addr.map_or(0, |ip| ipv4_raw(ip.octets()));
        let lose_flow_race = u8::from(settings.lose_flow_race);
        let host_netns = match settings.socket_lb {
            SocketLb::HostOnly { netns_cookie } => netns_cookie,
            SocketLb::Off | SocketLb::All => 0,
        };
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(bpffs)
            .override_global(maps::GLOBAL_SNAT_ADDR, &snat_addr, true)
            .override_global(maps::GLOBAL_LOSE_FLOW_RACE, &lose_flow_race, true)
            .override_global(maps::GLOBAL_SOCK_HOST_NETNS, &host_netns, true);
        for (name, max_entries) in &settings.capacities {
            loader.map_max_entries(name, *max_entries);
        }
        let mut ebpf = loader.load(object::bytes()?)?;
        for name in program::TC {
            let program = tc_program(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        let name = program::NODEPORT_XDP;
        let xdp = xdp_program(&mut ebpf, name)?;
        xdp.load()
            .map_err(|source| Error::Program { name, source })?;
        if settings.socket_lb != SocketLb::Off {
            for name in program::SOCK_ADDR {
                sock_addr_program(&mut ebpf, name)?
                    .load()
                    .map_err(|source| Error::Program { name, source })?;
            }
            let name = program::SOCK_RELEASE;
            sock_program(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            bpffs: bpffs.to_owned(),
        })
    }

    /// The directory the maps are pinned in.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// A loaded TC program, by one of the names in [`program`].
    pub fn tc_program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, Error> {
        tc_program(&mut self.ebpf, name)
    }

    /// The loaded XDP program.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, Error> {
        xdp_program(&mut self.ebpf, program::NODEPORT_XDP)
    }

    /// A loaded socket-path program, by one of [`program::SOCK_ADDR`].
    pub fn sock_addr_program(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr, Error> {
        sock_addr_program(&mut self.ebpf, name)
    }

    /// The loaded socket release program.
    pub fn sock_release_program(&mut self) -> Result<&mut CgroupSock, Error> {
        sock_program(&mut self.ebpf, program::SOCK_RELEASE)
    }

    /// Loads the benchmark's empty floor programs, [`program::FLOOR_TC`]
    /// and [`program::FLOOR_XDP`].
    pub fn load_floors(&mut self) -> Result<(), Error> {
        let name = program::FLOOR_TC;
        tc_program(&mut self.ebpf, name)?
            .load()
            .map_err(|source| Error::Program { name, source })?;
        let name = program::FLOOR_XDP;
        xdp_program(&mut self.ebpf, name)?
            .load()
            .map_err(|source| Error::Program { name, source })
    }

    /// The floor XDP program, once loaded.
    pub fn floor_xdp(&mut self) -> Result<&mut Xdp, Error> {
        xdp_program(&mut self.ebpf, program::FLOOR_XDP)
    }

    /// Takes typed handles on the maps (once).
    pub fn take_maps(&mut self) -> Result<Maps, Error> {
        Maps::from_ebpf(&mut self.ebpf)
    }
}

fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, Error> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, Error> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, Error> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn sock_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSock, Error> {
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}
