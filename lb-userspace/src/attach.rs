//! Attaching the TC programs to pod interfaces, with links pinned under the
//! bpffs dir: they outlive the agent (a restart or upgrade drops nothing),
//! and a restarted agent swaps its freshly loaded programs into the pinned
//! links atomically (`bpf_link_update`), so no packet is ever unhandled.
//!
//! TC attaches through TCX links (kernel ≥ 6.6).

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
};

use crate::{
    Datapath, Error,
    datapath::program::{FROM_POD, TO_POD},
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
            attach_pinned(program, interface, attach_type, &pin).map_err(|source| {
                Error::Attach {
                    interface: interface.to_owned(),
                    program: name,
                    source,
                }
            })?;
        }
        Ok(())
    }
}

/// The pod programs and the TC direction each runs in.
const DIRECTIONS: [(&str, &str); 2] = [(FROM_POD, "ingress"), (TO_POD, "egress")];

/// The pin of `interface`'s link in `direction`. bpffs refuses dots in
/// names (and interface names may have them, `eth0.100`).
fn pin_name(interface: &str, direction: &str) -> String {
    format!("{direction}_{}", interface.replace('.', "_"))
}

/// Attaches `program` through the link pinned at `pin`: the link's program
/// is replaced in place when the pin exists and still works, otherwise a
/// new TCX link is created and pinned.
fn attach_pinned(
    program: &mut SchedClassifier,
    interface: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<(), AttachError> {
    if let Ok(old) = PinnedLink::from_pin(pin) {
        let replaced = SchedClassifierLink::try_from(FdLink::from(old))
            .map_err(AttachError::Link)
            .and_then(|link| program.attach_to_link(link).map_err(AttachError::Program));
        match replaced {
            Ok(id) => {
                // Out of the program's link table, so dropping the program
                // never detaches it; the pin keeps the link alive.
                let _link = program.take_link(id).map_err(AttachError::Program)?;
                return Ok(());
            }
            // The interface behind the pin is gone (a new one took its
            // name): start over.
            Err(_) => fs::remove_file(pin).map_err(AttachError::Pin)?,
        }
    }
    let options = TcAttachOptions::TcxOrder(LinkOrder::default());
    let id = program
        .attach_with_options(interface, attach_type, options)
        .map_err(AttachError::Program)?;
    let link = program.take_link(id).map_err(AttachError::Program)?;
    let link = FdLink::try_from(link).map_err(AttachError::Link)?;
    link.pin(pin)
        .map_err(|e| AttachError::Pin(io::Error::other(e)))?;
    Ok(())
}

/// Why an interface could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Program(aya::programs::ProgramError),
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
