//! Entering the pod's network namespace.
//!
//! Only a dedicated thread ever enters the pod namespace: `setns` changes the calling thread only,
//! so the main thread stays in the node namespace and each side keeps its own netlink socket.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const NSFS_MAGIC: i64 = 0x6e73_6673;
/// Before nsfs (Linux < 3.19) namespace files lived on procfs.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Opens a namespace path and makes sure it is one: a plain file would otherwise only fail later,
/// inside the thread, with a less helpful EINVAL.
pub fn open(path: &str) -> io::Result<File> {
    let file = File::open(path)?;
    // SAFETY: fstatfs only writes into the zeroed struct we pass, for an fd we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on some targets, not on others
    let fs = st.f_type as i64;
    if fs != NSFS_MAGIC && fs != PROC_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace file",
        ));
    }
    Ok(file)
}

/// Moves the calling thread into the namespace. Only call this on a thread created for the purpose.
pub fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own; it affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a per-interface sysctl of the calling thread's namespace (/proc/sys/net follows the
/// opener's namespace). A missing file is fine: it means that protocol is disabled.
pub fn write_sysctl_if_present(path: &str, value: &str) -> io::Result<()> {
    match std::fs::write(path, value) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
