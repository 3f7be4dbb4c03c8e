//! The inspection CLI as a user meets it: piped into `head`, pointed at
//! the wrong directory.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Stdio},
};

use xlb_tests::cluster::xlb_bin;

/// A pipe whose reader is already gone: every write to it fails (EPIPE).
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two descriptors we own from here on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: as above; the read end is closed at once.
    unsafe {
        drop(OwnedFd::from_raw_fd(fds[0]));
        OwnedFd::from_raw_fd(fds[1])
    }
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(xlb_bin())
        .args(["cleanup", "--bpffs"])
        .arg(dir.path().join("nothing-here"))
        .stdout(Stdio::from(closed_pipe()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

#[test]
fn missing_pins_get_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["services", "backends", "conntrack", "affinity", "stats"] {
        let out = Command::new(xlb_bin())
            .args([command, "--bpffs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
        assert!(
            stderr.contains("no xlb datapath is pinned under") && stderr.contains("--bpffs"),
            "{command}: {stderr}"
        );
    }
}
