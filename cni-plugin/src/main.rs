//! `vpcnet`: the CNI plugin binary. Wires a pod to the node with a veth pair and asks vpcnetd for
//! the address; all logic lives in the modules, this file only does process-level plumbing.

mod args;
mod commands;
mod config;
mod errors;
mod netlink;
mod netns;
mod result;
mod watchdog;

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

static PANIC_VERSION: OnceLock<String> = OnceLock::new();

/// Lets the panic hook answer in the caller's spec version once we know it.
pub fn set_panic_version(v: &str) {
    let _ = PANIC_VERSION.set(v.to_string());
}

/// The spec version error JSON is written in when it is not `main` that writes it.
pub fn caller_version() -> &'static str {
    PANIC_VERSION
        .get()
        .map(String::as_str)
        .unwrap_or(config::FALLBACK_VERSION)
}

fn main() {
    // A runtime can only parse JSON on stdout: a panic must end as code-199 error JSON, never as a
    // backtrace. Exiting from the hook also stops a panicking helper thread from racing main.
    std::panic::set_hook(Box::new(|info| {
        if !watchdog::claim_output() {
            // The watchdog is printing and exiting; a second document would corrupt its answer.
            loop {
                std::thread::park();
            }
        }
        let version = caller_version();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let where_ = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let err = errors::CniError::internal(format!("vpcnet bug: {what}")).with_details(where_);
        let _ = writeln!(std::io::stdout().lock(), "{}", err.to_json(version));
        std::process::exit(1);
    }));

    let started = Instant::now();
    let env = args::Env::from_process();
    watchdog::start(&env.command);
    let inv = commands::dispatch(&env, &mut std::io::stdin().lock());
    if !watchdog::claim_output() {
        // The watchdog answered already and ends the process.
        loop {
            std::thread::park();
        }
    }
    let mut stdout = std::io::stdout().lock();
    let exit = match &inv.result {
        Ok(Some(out)) => {
            let _ = writeln!(stdout, "{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&inv.version));
            1
        }
    };
    let _ = stdout.flush();
    log_invocation(&env, &inv, started);
    std::process::exit(exit);
}

/// One line per invocation when asked for; a plugin has no other place to leave a trail.
fn log_invocation(env: &args::Env, inv: &commands::Invocation, started: Instant) {
    let Some(path) = std::env::var_os("VPCNET_LOG_FILE")
        .map(PathBuf::from)
        .or_else(|| inv.log_file.clone())
    else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let outcome = match &inv.result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error code={} msg={:?}", e.code, e.msg),
    };
    // The environment is the runtime's, up to 128 KiB a variable: a line stays a line.
    let field = |s: &str| vpcnet_api::bounded(s.to_string(), 300);
    let line = format!(
        "{now:.3} {} container={} ifname={} {}us {outcome}\n",
        field(&env.command),
        field(&inv.container_id),
        field(&inv.ifname),
        started.elapsed().as_micros()
    );
    if let Ok(mut f) = open_log(&path) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The log names pods and containers: readable by root only. A symlink planted at the path is
/// refused rather than followed, so the plugin cannot be made to append to another file.
fn open_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    // A log left by an older release was created with the umask's mode.
    if meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}
