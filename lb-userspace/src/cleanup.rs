//! `xlb cleanup`: the uninstall. The agent itself never does this.

use std::{fs, io, path::Path};

use crate::attach;

/// Detaches every program (by unpinning its links) and removes every map
/// pin and the bpffs dir. What is already gone is fine.
pub fn cleanup(bpffs: &Path) -> io::Result<usize> {
    let links = attach::detach_all(bpffs)?;
    for name in lb_common::maps::ALL {
        match fs::remove_file(bpffs.join(name)) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    match fs::remove_dir(bpffs) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(links),
    }
}
