//! Attaching the programs to pod and external interfaces, with links pinned
//! under the bpffs dir: they outlive the agent (a restart or upgrade drops
//! nothing), and a restarted agent swaps its freshly loaded programs into
//! the pinned links atomically (`bpf_link_update`), so no packet is ever
//! unhandled.
//!
//! TC attaches through TCX links (kernel ≥ 6.6), XDP through XDP links,
//! the socket path through cgroup links (kernel ≥ 5.9 for `sock_release`).

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, LinkOrder, ProgramError, SchedClassifier, TcAttachType, XdpMode,
    links::{FdLink, LinkError, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};

use crate::{
    Datapath, Error, bpf_link,
    datapath::program::{FROM_POD, NODEPORT_TC, NODEPORT_XDP, SOCK_ADDR, SOCK_RELEASE, TO_POD},
    netif::interfaces,
};

/// The directory of link pins inside the bpffs dir.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Keeps the pod programs attached to every interface matching a glob.
pub struct PodInterfaces {
    pattern: glob::Pattern,
    links: PathBuf,
    attached: BTreeSet<String>,
    /// Interfaces that failed to attach: retried by [`Self::retry_failed`],
    /// not on every scan.
    failed: BTreeSet<String>,
}

/// The outcome of attaching one interface.
pub struct Attached {
    pub interface: String,
    pub result: Result<(), Error>,
}

impl PodInterfaces {
    pub fn new(pattern: glob::Pattern, bpffs: &Path) -> Self {
        Self {
            pattern,
            links: links_dir(bpffs),
            attached: BTreeSet::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Lets the next scan try the interfaces that failed before.
    pub fn retry_failed(&mut self) {
        self.failed.clear();
    }

    /// Attaches the interfaces that appeared since the last scan and
    /// forgets (and unpins) the ones that are gone.
    pub fn scan(&mut self, datapath: &mut Datapath) -> Vec<Attached> {
        let present: BTreeSet<String> = interfaces()
            .into_iter()
            .filter(|name| self.pattern.matches(name))
            .collect();
        for gone in self.attached.difference(&present) {
            for (_, direction) in DIRECTIONS {
                let _ = fs::remove_file(self.links.join(pin_name(gone, direction)));
            }
        }
        self.attached.retain(|name| present.contains(name));
        self.failed.retain(|name| present.contains(name));
        let mut outcomes = Vec::new();
        for interface in present {
            if self.attached.contains(&interface) || self.failed.contains(&interface) {
                continue;
            }
            let result = self.attach(datapath, &interface);
            if result.is_ok() {
                self.attached.insert(interface.clone());
            } else {
                self.failed.insert(interface.clone());
            }
            outcomes.push(Attached { interface, result });
        }
        outcomes
    }

    fn attach(&self, datapath: &mut Datapath, interface: &str) -> Result<(), Error> {
        fs::create_dir_all(&self.links).map_err(|source| Error::Bpffs {
            path: self.links.clone(),
            source,
        })?;
        for (name, direction) in DIRECTIONS {
            let attach_type = match direction {
                "ingress" => TcAttachType::Ingress,
                _ => TcAttachType::Egress,
            };
            let pin = self.links.join(pin_name(interface, direction));
            let program = datapath.tc_program(name)?;
            attach_tc(program, interface, attach_type, &pin)
                .map_err(|source| Error::attach(interface, name, source))?;
        }
        Ok(())
    }
}

/// `--xdp`: whether `nodeport_xdp` runs in front of `nodeport_tc`, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpSetting {
    /// Native XDP where it pays: not on a veth. There a frame must be
    /// turned into an XDP buffer first (a copy when the skb lacks
    /// headroom), and native XDP cannot send it back out (`XDP_TX` needs
    /// XDP on the peer), so every forwarded frame still goes to TC: the
    /// north-south benchmark measured native XDP on a veth at 0.5-0.8x the
    /// connection rate of TC alone. An interface whose driver refuses
    /// native XDP gets TC alone too.
    Auto,
    /// Always in this mode; the agent fails to start where the driver
    /// refuses it.
    Mode(XdpMode),
    Off,
}

/// The XDP mode `setting` gives an interface of `driver`.
pub fn xdp_mode(setting: XdpSetting, driver: &str) -> Option<XdpMode> {
    match setting {
        XdpSetting::Auto if driver == "veth" => None,
        XdpSetting::Auto => Some(XdpMode::Driver),
        XdpSetting::Mode(mode) => Some(mode),
        XdpSetting::Off => None,
    }
}

/// Attaches the north-south programs to an external interface: `nodeport_tc`
/// on TC ingress always, `nodeport_xdp` in `xdp` mode when given (and
/// detaches a previous agent's XDP program when not).
pub fn attach_external(
    datapath: &mut Datapath,
    interface: &str,
    xdp: Option<XdpMode>,
) -> Result<(), Error> {
    let links = links_dir(datapath.bpffs());
    fs::create_dir_all(&links).map_err(|source| Error::Bpffs {
        path: links.clone(),
        source,
    })?;
    let pin = links.join(pin_name(interface, "nodeport"));
    let program = datapath.tc_program(NODEPORT_TC)?;
    attach_tc(program, interface, TcAttachType::Ingress, &pin)
        .map_err(|source| Error::attach(interface, NODEPORT_TC, source))?;
    let pin = links.join(pin_name(interface, "xdp"));
    let Some(mode) = xdp else {
        return match fs::remove_file(&pin) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(Error::attach(
                interface,
                NODEPORT_XDP,
                AttachError::Pin(err),
            )),
            _ => Ok(()),
        };
    };
    attach_pinned(
        datapath.xdp_program()?,
        &pin,
        |program, link: XdpLink| {
            let id = program.attach_to_link(link)?;
            program.take_link(id).map(drop)
        },
        |program| {
            let id = program
                .attach(interface, mode)
                .map_err(AttachError::Program)?;
            let link = program.take_link(id).map_err(AttachError::Program)?;
            FdLink::try_from(link).map_err(AttachError::Link)
        },
    )
    .map_err(|source| Error::attach(interface, NODEPORT_XDP, source))
}

/// Attaches the socket path's programs to `cgroup` (`--cgroup`: every
/// process below it, the node's and its pods'), through links pinned under
/// the links dir. A restarted agent swaps its programs into the pinned
/// links (`bpf_link_update`), so every `connect()` is balanced throughout;
/// links pinned for another cgroup (a changed `--cgroup`) are replaced.
pub fn attach_socket_lb(datapath: &mut Datapath, cgroup: &Path) -> Result<(), Error> {
    let what = format!("cgroup {}", cgroup.display());
    let links = links_dir(datapath.bpffs());
    fs::create_dir_all(&links).map_err(|source| Error::Bpffs {
        path: links.clone(),
        source,
    })?;
    let dir = File::open(cgroup)
        .and_then(|dir| Ok((dir.metadata()?.ino(), dir)))
        .map_err(|e| Error::SocketLb(format!("opening the cgroup {}: {e}", cgroup.display())));
    let (cgroup_id, dir) = dir?;
    for name in SOCK_ADDR {
        let program = datapath.sock_addr_program(name)?;
        attach_cgroup(
            &links.join(name),
            cgroup_id,
            program_fd(program.fd()),
            || {
                // Through a link, which always lets other
                // programs run beside it; the mode must then be the default.
                let id = program
                    .attach(&dir, CgroupAttachMode::default())
                    .map_err(AttachError::Program)?;
                let link = program.take_link(id).map_err(AttachError::Program)?;
                FdLink::try_from(link).map_err(AttachError::Link)
            },
        )
        .map_err(|source| Error::attach(&what, name, source))?;
    }
    let program = datapath.sock_release_program()?;
    attach_cgroup(
        &links.join(SOCK_RELEASE),
        cgroup_id,
        program_fd(program.fd()),
        || {
            let id = program
                .attach(&dir, CgroupAttachMode::default())
                .map_err(AttachError::Program)?;
            let link = program.take_link(id).map_err(AttachError::Program)?;
            FdLink::try_from(link).map_err(AttachError::Link)
        },
    )
    .map_err(|source| Error::attach(&what, SOCK_RELEASE, source))
}

/// A program's descriptor, owned (the program is borrowed again to attach).
fn program_fd<F: AsFd>(fd: Result<F, ProgramError>) -> Result<OwnedFd, AttachError> {
    let fd = fd.map_err(AttachError::Program)?;
    fd.as_fd().try_clone_to_owned().map_err(AttachError::Pin)
}

/// Detaches the socket path (`--socket-lb off`) by unpinning its links.
pub fn detach_socket_lb(bpffs: &Path) -> Result<(), Error> {
    let links = links_dir(bpffs);
    for name in SOCK_ADDR.into_iter().chain([SOCK_RELEASE]) {
        match fs::remove_file(links.join(name)) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                return Err(Error::attach("its cgroup", name, AttachError::Pin(err)));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Attaches a cgroup program through the link pinned at `pin`: its program
/// swapped when that link is attached to cgroup `cgroup_id`, otherwise a
/// new link (`create`) replaces it — attached before the old one goes.
fn attach_cgroup(
    pin: &Path,
    cgroup_id: u64,
    program: Result<OwnedFd, AttachError>,
    create: impl FnOnce() -> Result<FdLink, AttachError>,
) -> Result<(), AttachError> {
    let old = bpf_link::open_pin(pin).ok();
    if let Some(link) = &old
        && bpf_link::cgroup_id(link.as_fd()).ok() == Some(cgroup_id)
        && bpf_link::update(link.as_fd(), program?.as_fd()).is_ok()
    {
        return Ok(());
    }
    // Another cgroup's link, or one that no longer takes an update: a new
    // one replaces it.
    let link = create()?;
    if old.is_some() {
        fs::remove_file(pin).map_err(AttachError::Pin)?;
    }
    link.pin(pin)
        .map_err(|e| AttachError::Pin(io::Error::other(e)))?;
    Ok(())
}

/// The pod programs and the TC direction each runs in.
const DIRECTIONS: [(&str, &str); 2] = [(FROM_POD, "ingress"), (TO_POD, "egress")];

/// The pin of `interface`'s link in `direction`. bpffs refuses dots in
/// names (and interface names may have them, `eth0.100`).
fn pin_name(interface: &str, direction: &str) -> String {
    format!("{direction}_{}", interface.replace('.', "_"))
}

/// Attaches a TC program in TCX mode through the link pinned at `pin`.
fn attach_tc(
    program: &mut SchedClassifier,
    interface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<(), AttachError> {
    attach_pinned(
        program,
        pin,
        |program, link: SchedClassifierLink| {
            let id = program.attach_to_link(link)?;
            program.take_link(id).map(drop)
        },
        |program| {
            let options = TcAttachOptions::TcxOrder(LinkOrder::default());
            let id = program
                .attach_with_options(interface, attach_type, options)
                .map_err(AttachError::Program)?;
            let link = program.take_link(id).map_err(AttachError::Program)?;
            FdLink::try_from(link).map_err(AttachError::Link)
        },
    )
}

/// Attaches `program` through the link pinned at `pin`: `replace` swaps it
/// into that link when the pin exists and still works, otherwise `create`
/// makes a new link, which is pinned. Either way the program lets go of
/// the link at once (`take_link`): the pin keeps it alive, and dropping the
/// program never detaches.
fn attach_pinned<P, L: TryFrom<FdLink, Error = LinkError>>(
    program: &mut P,
    pin: &Path,
    replace: impl FnOnce(&mut P, L) -> Result<(), ProgramError>,
    create: impl FnOnce(&mut P) -> Result<FdLink, AttachError>,
) -> Result<(), AttachError> {
    if let Ok(old) = PinnedLink::from_pin(pin) {
        let replaced = L::try_from(FdLink::from(old))
            .map_err(AttachError::Link)
            .and_then(|link| replace(program, link).map_err(AttachError::Program));
        match replaced {
            Ok(()) => return Ok(()),
            // The interface behind the pin is gone (a new one took its
            // name): start over.
            Err(_) => fs::remove_file(pin).map_err(AttachError::Pin)?,
        }
    }
    let link = create(program)?;
    link.pin(pin)
        .map_err(|e| AttachError::Pin(io::Error::other(e)))?;
    Ok(())
}

/// Why an interface could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Program(ProgramError),
    #[error(transparent)]
    Link(LinkError),
    #[error("pinning the link: {0}")]
    Pin(io::Error),
}

/// Detaches every program pinned under `bpffs` (their links go with their
/// pins) and removes the links dir. Returns how many links were removed.
pub fn detach_all(bpffs: &Path) -> io::Result<usize> {
    let dir = links_dir(bpffs);
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            // Unpinning drops the last reference: the kernel detaches.
            fs::remove_file(entry.path())?;
            removed += 1;
        }
        fs::remove_dir(&dir)?;
    }
    Ok(removed)
}

/// When `nodeport_xdp` may send a frame back out itself (`XDP_TX`) instead
/// of leaving it to `nodeport_tc` (`--xdp-tx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpTx {
    /// Where delivery is known to work: everywhere but native XDP on a veth.
    Auto,
    /// Always (the user vouches for the interface).
    On,
    /// Never.
    Off,
}

/// Whether `nodeport_xdp` in `mode` on an interface of `driver` uses
/// `XDP_TX`. A veth delivers its XDP program's `XDP_TX` frames only when
/// its peer runs an XDP program too (it wakes the peer's queue for them
/// only then, `veth_xdp_flush` in drivers/net/veth.c), and the peer of a
/// kind node's `eth0` runs none: there `Auto` leaves those frames to TC.
/// Generic XDP transmits through the stack, which works on any device.
pub fn uses_xdp_tx(setting: XdpTx, mode: XdpMode, driver: &str) -> bool {
    match setting {
        XdpTx::On => true,
        XdpTx::Off => false,
        XdpTx::Auto => !(matches!(mode, XdpMode::Driver) && driver == "veth"),
    }
}

/// Records which external interfaces' XDP program may use `XDP_TX`
/// (replacing what a previous agent recorded). Two such interfaces whose
/// indexes share a slot: the second leaves its frames to TC (logged).
pub fn set_xdp_tx_interfaces(
    map: &mut aya::maps::Array<aya::maps::MapData, u32>,
    interfaces: &[String],
) -> Result<(), Error> {
    let name = lb_common::maps::XDP_TX_IFACES;
    let capacity = lb_common::maps::XDP_TX_IFACES_MAX;
    let mut slots = vec![0u32; capacity as usize];
    for interface in interfaces {
        let Some(ifindex) = ifindex(interface) else {
            continue;
        };
        let slot = &mut slots[(ifindex % capacity) as usize];
        if *slot == 0 {
            *slot = ifindex;
        } else {
            tracing::warn!(%interface, "XDP_TX slot taken by another interface: its frames go to TC");
        }
    }
    for (index, ifindex) in slots.into_iter().enumerate() {
        map.set(index as u32, ifindex, 0)
            .map_err(Error::map(name))?;
    }
    Ok(())
}

/// The index of interface `name` in this network namespace.
fn ifindex(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_xdp_is_native_but_on_a_veth() {
        assert_eq!(xdp_mode(XdpSetting::Auto, "veth"), None);
        assert_eq!(
            xdp_mode(XdpSetting::Auto, "mlx5_core"),
            Some(XdpMode::Driver)
        );
        assert_eq!(
            xdp_mode(XdpSetting::Mode(XdpMode::Driver), "veth"),
            Some(XdpMode::Driver)
        );
        assert_eq!(xdp_mode(XdpSetting::Off, "ixgbe"), None);
    }

    #[test]
    fn xdp_tx_is_left_to_tc_on_a_native_veth_unless_asked_for() {
        assert!(!uses_xdp_tx(XdpTx::Auto, XdpMode::Driver, "veth"));
        assert!(uses_xdp_tx(XdpTx::On, XdpMode::Driver, "veth"));
        assert!(uses_xdp_tx(XdpTx::Auto, XdpMode::Skb, "veth"));
        assert!(uses_xdp_tx(XdpTx::Auto, XdpMode::Driver, "mlx5_core"));
        assert!(!uses_xdp_tx(XdpTx::Off, XdpMode::Driver, "mlx5_core"));
    }
}
