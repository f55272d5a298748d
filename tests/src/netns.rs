//! Network namespaces owned by a test run.

use anyhow::{Context as _, Result, bail};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Every namespace, bpffs directory and link created by the project's tests, demo and benchmarks starts
/// with this, so `cargo xtask clean` can remove leftovers of crashed runs without touching anything else.
pub const PROJECT_PREFIX: &str = "vpcn";

/// A unique prefix for one run: the project prefix plus pid and time bits, short enough that
/// `<prefix>-<role>` stays a readable namespace name.
pub fn run_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = (std::process::id() as u64) << 20 ^ (nanos as u64 >> 4);
    // A process-wide counter keeps prefixes unique across clusters built by parallel tests.
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{PROJECT_PREFIX}{:05x}{n:x}", mix & 0xfffff)
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        if !name.starts_with(PROJECT_PREFIX) {
            bail!("namespace {name} does not carry the project prefix {PROJECT_PREFIX}");
        }
        run(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("creating netns {name}"))?;
        let ns = Netns {
            name: name.to_string(),
            keep: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace of its own run prefix (`<prefix>-<role>`): for a test that needs a few
    /// namespaces and no cluster.
    pub fn fresh(role: &str) -> Result<Netns> {
        Netns::create(&format!("{}-{role}", run_prefix()))
    }

    /// Another handle to a namespace of the run that something else owns (and deletes): for
    /// threads that run commands there while the owner is busy elsewhere.
    pub fn handle(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            keep: true,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// [`Netns::path`] as text, the form `CNI_NETNS` and a CNI result's `sandbox` carry.
    pub fn path_string(&self) -> String {
        self.path().display().to_string()
    }

    /// Leave the namespace in place when dropped (demo `--keep`).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new("ip").arg("-n").arg(&self.name).args(args))
            .with_context(|| format!("ip -n {} {}", self.name, args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <ns> ...` whose failure is an answer, not an error: whether it succeeded, and its
    /// stdout followed by its stderr (a failure to spawn `ip` reads as a failure).
    pub fn try_ip(&self, args: &[&str]) -> (bool, String) {
        match Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, format!("spawning ip: {e}")),
        }
    }

    pub fn has_link(&self, name: &str) -> bool {
        self.try_ip(&["link", "show", "dev", name]).0
    }

    /// The interface index of `link` in this namespace.
    pub fn ifindex(&self, link: &str) -> Result<u32> {
        let line = self.ip(&["-o", "link", "show", "dev", link])?;
        line.split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("no ifindex of {link} in {line:?}"))
    }

    /// A command that runs inside this namespace (setns before exec, like `ip netns exec` but without
    /// its extra fork and sysfs remount: cheaper, and what a runtime does when it runs a plugin).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open because `file` is moved into the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs a program in the namespace and returns its output; fails on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program)?.args(args))
            .with_context(|| format!("{} in {}: {}", program, self.name, args.join(" ")))
    }

    /// Runs `f` on a fresh thread that has entered this namespace; sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let handle = std::thread::spawn(move || -> Result<T> {
            enter(&file)?;
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// Runs `f` on a scoped thread that has entered this namespace: unlike [`Netns::run`], `f`
    /// may borrow from the caller (a dataplane handle, a listener).
    pub fn run_scoped<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.name, f)
    }

    /// Spawns a long-lived thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        Ok(std::thread::spawn(move || -> Result<T> {
            enter(&file)?;
            Ok(f())
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `f` on a scoped thread that has entered the named namespace (`/run/netns/<name>`), for
/// code that works on the calling thread's netns; a panic in `f` is resumed in the caller.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = PathBuf::from("/run/netns").join(name);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            enter(&file)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn enter(file: &File) -> Result<()> {
    // SAFETY: plain syscall on an fd we own; it only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} exited with {}: {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Names of namespaces that carry the project prefix (leftovers of crashed runs, or live runs).
pub fn project_namespaces() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PROJECT_PREFIX))
        .map(str::to_string)
        .collect()
}
