//! The bpffs directory where xlb pins its maps and links.

use std::{
    ffi::CString,
    fs, io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::Path,
};

use crate::Error;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted by convention.
pub const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` exists on a bpffs, mounting bpffs at `/sys/fs/bpf` when
/// nothing is mounted there yet (fresh VMs and network-namespace sandboxes).
pub fn ensure_dir(dir: &Path) -> Result<(), Error> {
    ensure_dir_under(Path::new(BPF_FS_ROOT), dir)
}

/// [`ensure_dir`] with the conventional mount point `root` (tests use their
/// own). Several processes or threads may start at once: the check and the
/// mount happen under an exclusive lock on `root`, so exactly one bpffs is
/// mounted there. Two stacked mounts would hide the first one's pins.
pub fn ensure_dir_under(root: &Path, dir: &Path) -> Result<(), Error> {
    let err = |source| Error::Bpffs {
        path: dir.to_owned(),
        source,
    };
    if dir.starts_with(root) && !is_bpffs(root).map_err(err)? {
        mount_once(root).map_err(err)?;
    }
    fs::create_dir_all(dir).map_err(err)?;
    if !is_bpffs(dir).map_err(err)? {
        return Err(err(io::Error::other("not on a bpf filesystem")));
    }
    Ok(())
}

/// Mounts bpffs at `root` unless a bpffs is there once the lock is held.
fn mount_once(root: &Path) -> io::Result<()> {
    // flock(2) on the mount point itself: a process that opened it before
    // the mount holds the directory below it, one that opens it after
    // holds the new root, and both re-check by path under the lock.
    let dir = fs::File::open(root)?;
    let _lock = Flock::exclusive(&dir)?;
    if is_bpffs(root)? {
        return Ok(());
    }
    if in_private_mount_namespace() {
        // `ip netns exec` remounts /sys in a mount namespace of its own:
        // a bpffs mounted there dies with the agent, and its pins too.
        tracing::warn!(
            "no bpffs at {} in this mount namespace (ip netns exec?): \
             pins will not outlive the agent; pass --bpffs on a bpffs mounted \
             outside /sys in the host's mount namespace",
            root.display()
        );
    }
    match mount_bpffs(root) {
        // Someone outside our lock (another tool) mounted it meanwhile.
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) && is_bpffs(root)? => Ok(()),
        other => other,
    }
}

/// An exclusive `flock` held until dropped.
struct Flock<'a>(&'a fs::File);

impl<'a> Flock<'a> {
    fn exclusive(file: &'a fs::File) -> io::Result<Self> {
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self(file));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
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

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
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
