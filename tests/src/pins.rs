//! A bpffs directory owned by one test, removed with everything pinned in it
//! when the test ends, also on panic.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// RAII owner of `/sys/fs/bpf/xlb-test-<pid>-<n>`.
pub struct PinDir(PathBuf);

impl PinDir {
    /// A fresh, not yet existing directory name (the loader creates it).
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/xlb-test-{}-{n}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // bpffs allows unlinking pins and rmdir, not remove_dir_all's
        // openat-based walk everywhere; do it by hand, depth first.
        fn remove(dir: &Path) {
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        remove(&path);
                    } else {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
            let _ = fs::remove_dir(dir);
        }
        remove(&self.0);
    }
}
