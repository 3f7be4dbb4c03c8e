//! The bpffs directory where xlb pins its maps (and, later, its links).

use std::{ffi::CString, fs, io, os::unix::ffi::OsStrExt, path::Path};

use crate::Error;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted by convention.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` exists on a bpffs, mounting bpffs at `/sys/fs/bpf` when
/// nothing is mounted there yet (fresh VMs and network-namespace sandboxes).
pub fn ensure_dir(dir: &Path) -> Result<(), Error> {
    let err = |source| Error::Bpffs {
        path: dir.to_owned(),
        source,
    };
    if dir.starts_with(BPF_FS_ROOT) && !is_bpffs(Path::new(BPF_FS_ROOT)).map_err(err)? {
        if in_private_mount_namespace() {
            // `ip netns exec` remounts /sys in a mount namespace of its own:
            // a bpffs mounted there dies with the agent, and its pins too.
            tracing::warn!(
                "no bpffs at {BPF_FS_ROOT} in this mount namespace (ip netns exec?): \
                 pins will not outlive the agent; pass --bpffs on a bpffs mounted \
                 outside /sys in the host's mount namespace"
            );
        }
        mount_bpffs(Path::new(BPF_FS_ROOT)).map_err(err)?;
    }
    fs::create_dir_all(dir).map_err(err)?;
    if !is_bpffs(dir).map_err(err)? {
        return Err(err(io::Error::other("not on a bpf filesystem")));
    }
    Ok(())
}

/// Whether this process runs in another mount namespace than init.
fn in_private_mount_namespace() -> bool {
    match (
        fs::read_link("/proc/self/ns/mnt"),
        fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(ours), Ok(init)) => ours != init,
        _ => false,
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = c_path(path)?;
    // SAFETY: statfs only writes into the zeroed struct we own.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
