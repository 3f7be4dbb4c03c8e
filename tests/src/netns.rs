//! Network namespaces owned by a test: created on demand, deleted on drop
//! (also when the test panics).

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    succeeded(cmd, out)
}

/// `out`, or an error with `cmd`'s standard error when it failed.
fn succeeded(cmd: &Command, out: Output) -> Result<Output> {
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a command with `input` on its standard input, failing with its
/// output when it fails.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<Output> {
    use std::{io::Write, process::Stdio};
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))??;
    succeeded(cmd, out)
}

/// `ip` with the given words (split on whitespace).
pub fn ip(args: &str) -> Result<Output> {
    run(Command::new("ip").args(args.split_whitespace()))
}

/// A named network namespace (`/run/netns/<name>`).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with its loopback up.
    pub fn new(name: &str) -> Result<Self> {
        // A namespace left behind by a killed run of the same name.
        let _ = ip(&format!("netns del {name}"));
        ip(&format!("netns add {name}"))?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &str) -> Result<Output> {
        ip(&format!("-n {} {args}", self.name))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")]))?;
        Ok(())
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that lives in this namespace (sockets it opens
    /// belong here) and returns its result.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter_thread(&file)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// Spawns a detached thread in this namespace running `f`.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<std::thread::JoinHandle<()>> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        Ok(std::thread::spawn(move || {
            if enter_thread(&file).is_ok() {
                f();
            }
        }))
    }
}

/// Moves the calling thread into the namespace of `file`.
fn enter_thread(file: &File) -> Result<()> {
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&format!("netns del {}", self.name));
    }
}
