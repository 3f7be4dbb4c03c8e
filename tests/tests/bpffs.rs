//! A fresh machine has no bpffs mounted: the agents (and the tests) that
//! start at once must mount exactly one, not one each, since a second mount
//! on the same point hides the first one's pins.

use std::{fs, path::Path, process::Command};

use lb_userspace::bpffs;
use xlb_tests::require_root;

/// How many mounts sit on `point`, from this process's mount table.
fn mounts_at(point: &Path) -> usize {
    let point = point.to_str().expect("utf-8");
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(point))
        .count()
}

/// Unmounts every mount on a directory and removes it, also on panic.
struct MountPoint(tempfile::TempDir);

impl Drop for MountPoint {
    fn drop(&mut self) {
        while mounts_at(self.0.path()) > 0 {
            if !Command::new("umount")
                .arg(self.0.path())
                .status()
                .is_ok_and(|s| s.success())
            {
                break;
            }
        }
    }
}

#[test]
fn concurrent_mounters_mount_one_bpffs() {
    require_root!();
    let root = MountPoint(tempfile::tempdir().unwrap());
    let root_path = root.0.path().to_owned();
    assert!(!bpffs::is_bpffs(&root_path).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let root = root_path.clone();
            std::thread::spawn(move || {
                let dir = root.join(format!("agent-{i}"));
                bpffs::ensure_dir_under(&root, &dir).map(|()| dir)
            })
        })
        .collect();
    let dirs: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert_eq!(mounts_at(&root_path), 1, "one bpffs, not one per mounter");
    // Every directory made by any of them is on the one visible mount.
    for dir in &dirs {
        assert!(dir.is_dir(), "{} hidden by a later mount", dir.display());
        assert!(bpffs::is_bpffs(dir).unwrap());
    }
    // An existing mount is used as it is.
    bpffs::ensure_dir_under(&root_path, &root_path.join("later")).unwrap();
    assert_eq!(mounts_at(&root_path), 1);
}

/// An upgrade over pins of another version whose counters map is smaller
/// (fewer drop reasons then): it is made anew, so the new reasons count
/// and `xlb stats` reads them all.
#[test]
fn maps_sized_by_the_layout_are_made_anew_at_another_size() {
    require_root!();
    use lb_userspace::{Datapath, datapath::Settings};
    let pins = xlb_tests::pins::PinDir::new();
    let older = Settings {
        capacities: vec![(lb_common::maps::COUNTERS, 18)],
        ..Settings::default()
    };
    drop(Datapath::load(pins.path(), &older).expect("the older layout"));
    let mut datapath = Datapath::load(pins.path(), &Settings::default()).expect("the upgrade");
    let maps = datapath.take_maps().expect("maps");
    maps.counter_totals().expect("every reason's counter");
}
