//! Helpers shared by the daemon's root-only integration tests.

use std::fs::File;
use std::os::fd::AsRawFd as _;

/// Runs `f` on a thread that has entered namespace `ns` (the dataplane works on the calling
/// thread's netns, like the daemon does inside the node's).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: plain syscall on an fd we own; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}
