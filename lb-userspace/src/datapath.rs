//! Loading the kernel programs with their maps pinned under a bpffs dir.

use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};

use crate::{Error, Maps, bpffs, object};

/// The programs of the object, by the names the kernel side gives them.
pub mod program {
    /// TC ingress of each pod's host-side veth.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress of each pod's host-side veth.
    pub const TO_POD: &str = "to_pod";
    /// Every TC program.
    pub const TC: [&str; 2] = [FROM_POD, TO_POD];
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
    pub fn load(bpffs: &Path) -> Result<Self, Error> {
        Self::load_with_capacities(bpffs, &[])
    }

    /// [`Self::load`] with some maps' capacities overridden (by name), for
    /// tests that fill a map.
    pub fn load_with_capacities(
        bpffs: &Path,
        capacities: &[(&'static str, u32)],
    ) -> Result<Self, Error> {
        bpffs::ensure_dir(bpffs)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(bpffs);
        for (name, max_entries) in capacities {
            loader.map_max_entries(name, *max_entries);
        }
        let mut ebpf = loader.load(object::bytes()?)?;
        for name in program::TC {
            let program = tc_program(&mut ebpf, name)?;
            program
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
