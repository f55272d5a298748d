//! The last line of defence for "every plugin call ends in bounded time".
//!
//! Each daemon call has its own timeout, but a socket timeout bounds one `read(2)`, not a call (a
//! daemon that trickles bytes never trips it), `connect(2)` to a listener whose backlog is full
//! blocks without one, and a stuck kernel call has no timeout at all. A runtime waiting on a hung
//! plugin holds the pod's sandbox lock until its own 2-minute timeout, so a thread started first
//! in `main` ends the process with spec error JSON (code 11, naming what the call was waiting for)
//! once the verb's bound has passed.

use crate::errors::CniError;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vpcnet_api::code;

/// ADD's own timeouts add up to 10 s (allocate) + 5 s (endpoint_ready) + 2 s (rollback's release)
/// in the worst case that still ends cleanly; 20 s leaves room for netlink and the disk, and stays
/// far below the kubelet's 2-minute runtime timeout.
const DEFAULT_BOUND: Duration = Duration::from_secs(20);
/// containerd asks for STATUS every 5 s; the call itself waits at most 3 s for the daemon.
const STATUS_BOUND: Duration = Duration::from_secs(6);
/// GC may release many attachments, each a disk commit at the daemon (30 s call timeout).
const GC_BOUND: Duration = Duration::from_secs(40);
/// After losing the race for stdout, how long `main` may take to finish printing.
const PRINT_GRACE: Duration = Duration::from_secs(2);

static OUTPUT_CLAIMED: AtomicBool = AtomicBool::new(false);
static PHASE: Mutex<String> = Mutex::new(String::new());

pub fn bound_for(command: &str) -> Duration {
    match command {
        "STATUS" => STATUS_BOUND,
        "GC" => GC_BOUND,
        _ => DEFAULT_BOUND,
    }
}

/// Records what the call is doing now, for the watchdog's message.
pub fn phase(what: impl Into<String>) {
    let mut p = PHASE.lock().unwrap_or_else(|e| e.into_inner());
    *p = what.into();
}

fn current_phase() -> String {
    PHASE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Only one party may write to stdout: the runtime parses exactly one JSON document. Returns
/// whether the caller won; the loser must not print.
pub fn claim_output() -> bool {
    !OUTPUT_CLAIMED.swap(true, Ordering::SeqCst)
}

/// Starts the watchdog for `command`; it outlives nothing but the process.
pub fn start(command: &str) {
    let bound = bound_for(command);
    let command = command.to_string();
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(bound);
            fire(&command, bound)
        });
    // Without the thread the call is unbounded again, but still correct; nothing to report to.
    drop(spawned);
}

fn fire(command: &str, bound: Duration) -> ! {
    if claim_output() {
        let phase = current_phase();
        let doing = if phase.is_empty() {
            String::new()
        } else {
            format!(" while {phase}")
        };
        let err = CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "vpcnet {} did not finish within {} s{doing}; gave up so the runtime can retry",
                vpcnet_api::quote(command),
                bound.as_secs()
            ),
        );
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", err.to_json(crate::caller_version()));
        let _ = out.flush();
        std::process::exit(1);
    }
    // `main` is printing its own answer; give it a moment, but a stdout nobody reads must not
    // hold the process either.
    std::thread::sleep(PRINT_GRACE);
    // SAFETY: _exit ends the process without running anything else; nothing is left to clean up.
    unsafe { libc::_exit(1) }
}
