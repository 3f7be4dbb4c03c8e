//! cgroup v2 groups owned by a test cluster: one per simulated node, which
//! its agent attaches the socket programs to and its processes (the node's
//! own and its pods') run in. The hierarchy is mounted for the cluster
//! under /run (`ip netns exec` remounts /sys, hiding the system's mount
//! from the agents); groups and mount go away on drop.

use std::{
    fs::{self, File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::run;

/// The cluster's cgroup v2 mount and its groups.
pub struct Cgroups {
    mount: PathBuf,
    groups: Vec<PathBuf>,
}

impl Cgroups {
    /// Mounts the cgroup v2 hierarchy at `mount` and makes one group per
    /// name, `<prefix>-<name>`, at its root.
    pub fn new(mount: PathBuf, prefix: &str, names: &[String]) -> Result<Self> {
        fs::create_dir_all(&mount)?;
        run(Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&mount))
        .context("mounting cgroup v2 (the socket path's tests need it)")?;
        let mut cgroups = Self {
            mount,
            groups: Vec::new(),
        };
        for name in names {
            let group = cgroups.mount.join(format!("{prefix}-{name}"));
            // Left behind by a killed run of the same id.
            let _ = fs::remove_dir(&group);
            fs::create_dir(&group).with_context(|| format!("creating {}", group.display()))?;
            cgroups.groups.push(group);
        }
        Ok(cgroups)
    }

    /// The group of the `i`-th name.
    pub fn group(&self, i: usize) -> &Path {
        &self.groups[i]
    }

    /// Moves this whole process (every thread: cgroup v2 places processes)
    /// into the `i`-th group until the guard drops, when it goes back.
    pub fn join(&self, i: usize) -> Result<Joined> {
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let path = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .context("this process has no cgroup v2 path")?;
        let back = self.mount.join(path.trim_start_matches('/'));
        fs::write(self.groups[i].join("cgroup.procs"), "0")
            .with_context(|| format!("joining {}", self.groups[i].display()))?;
        Ok(Joined { back })
    }
}

/// This process in another group; back where it was on drop.
pub struct Joined {
    back: PathBuf,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = fs::write(self.back.join("cgroup.procs"), "0");
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for group in &self.groups {
            // A group empties once its processes are reaped, which the
            // kernel may finish a moment after their `wait`.
            for _ in 0..50 {
                if fs::remove_dir(group).is_ok() || !group.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = fs::remove_dir(&self.mount);
    }
}

/// Makes `cmd` start in network namespace `netns` (its `/run/netns` file,
/// unless `None`: the caller's) as a process of `group`, the way a pod's
/// or a node's process runs.
pub fn run_in(cmd: &mut Command, netns: Option<&Path>, group: &Path) -> Result<()> {
    let netns = netns.map(File::open).transpose()?;
    let procs = OpenOptions::new()
        .write(true)
        .open(group.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", group.display()))?;
    // SAFETY: between fork and exec only setns(2) and write(2) run, both
    // async-signal-safe, on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(netns) = &netns
                && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
