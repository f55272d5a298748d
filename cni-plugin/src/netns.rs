//! Entering the pod's network namespace.
//!
//! Only a dedicated thread ever enters the pod namespace: `setns` changes the calling thread only,
//! so the main thread stays in the node namespace and each side keeps its own netlink socket.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

const NSFS_MAGIC: i64 = 0x6e73_6673;
/// Before nsfs (Linux < 3.19) namespace files lived on procfs.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;
/// `_IO(0xb7, 0x3)`: asks an nsfs file which kind of namespace it is (Linux ≥ 4.11).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens a namespace path and makes sure it is a network namespace: anything else would otherwise
/// only fail later, inside the thread, with a less helpful EINVAL.
///
/// The open never blocks: `CNI_NETNS` naming a FIFO would otherwise hang the plugin in `open(2)`
/// until a writer shows up, and O_NONBLOCK makes a FIFO (or a device) open at once, after which
/// the filesystem check rejects it.
pub fn open(path: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: fstatfs only writes into the zeroed struct we pass, for an fd we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on some targets, not on others
    let fs = st.f_type as i64;
    if (fs != NSFS_MAGIC && fs != PROC_SUPER_MAGIC) || !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace file",
        ));
    }
    // SAFETY: an ioctl without argument on an fd we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind >= 0 && kind != libc::CLONE_NEWNET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a namespace file, but not of a network namespace",
        ));
    }
    Ok(file)
}

/// Whether `ns` is the namespace this process runs in. Wiring a "pod" there would put the pod's
/// address and default route on the node itself.
pub fn is_own(ns: &File) -> io::Result<bool> {
    let own = std::fs::metadata("/proc/self/ns/net")?;
    let theirs = ns.metadata()?;
    Ok(own.dev() == theirs.dev() && own.ino() == theirs.ino())
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
