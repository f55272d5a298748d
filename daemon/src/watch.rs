//! Following a directory of inputs (manifests, the mounted config) without spinning: inotify wakes
//! the poller on every change of an entry, never on reads (its own included, which would make it
//! spin); without inotify, or as a safety net for a lost event, it polls on a timer.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often a watched directory is polled although inotify watches it: only a safety net for
/// a lost event, so rare enough to keep an idle daemon idle.
pub const EVENT_FALLBACK_POLL: Duration = Duration::from_secs(10);

/// What woke a poll: the entries named by the events since the last one, or `None` when anything
/// may have changed (the first look, a timer, a lost event or one naming no entry).
pub type Changed = Option<Vec<std::path::PathBuf>>;

/// Entries named since the last poll.
#[derive(Default)]
struct Named {
    all: bool,
    paths: std::collections::BTreeSet<std::path::PathBuf>,
}

/// Calls `poll` on a blocking thread whenever an entry of `dir` that `relevant` accepts changes
/// (or every `interval` without inotify, every [`EVENT_FALLBACK_POLL`] with it), until `owner`
/// is dropped. Other entries' events wake nothing: a directory shared with a log, a store or an
/// editor's temporary files would otherwise have each of their writes poll it.
pub fn spawn_dir_watcher<T, R, F>(
    owner: &Arc<T>,
    dir: &Path,
    interval: Duration,
    what: &'static str,
    relevant: R,
    poll: F,
) -> tokio::task::JoinHandle<()>
where
    T: Send + Sync + 'static,
    R: Fn(&Path) -> bool + Send + Sync + 'static,
    F: Fn(&T, Changed) + Send + Sync + 'static,
{
    use notify::Watcher as _;
    use notify::event::{AccessKind, AccessMode, EventKind};
    let weak: Weak<T> = Arc::downgrade(owner);
    let wake = Arc::new(tokio::sync::Notify::new());
    let named = Arc::new(std::sync::Mutex::new(Named::default()));
    let events = {
        let (wake, named) = (wake.clone(), named.clone());
        notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
            let mut n = named.lock().unwrap_or_else(|p| p.into_inner());
            let changed = match r {
                Ok(e) => {
                    let kind = match e.kind {
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                        EventKind::Access(_) => false,
                        // Create, modify (data, metadata, rename), remove, and "rescan" after a
                        // queue overflow.
                        _ => true,
                    };
                    if !kind {
                        false
                    } else if e.paths.is_empty() || e.need_rescan() {
                        // Naming no entry, it may concern any.
                        n.all = true;
                        true
                    } else {
                        let mut any = false;
                        for p in e.paths.into_iter().filter(|p| relevant(p)) {
                            n.paths.insert(p);
                            any = true;
                        }
                        any
                    }
                }
                // Something was lost; look.
                Err(_) => {
                    n.all = true;
                    true
                }
            };
            drop(n);
            if changed {
                wake.notify_one();
            }
        })
    };
    let events = events.and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    let (events, interval) = match events {
        Ok(w) => (Some(w), interval.max(EVENT_FALLBACK_POLL)),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e,
                "no inotify watch on the {what}; changes are seen by polling only");
            (None, interval)
        }
    };
    let poll = Arc::new(poll);
    tokio::spawn(async move {
        let _events = events;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let timer = tokio::select! {
                _ = tick.tick() => true,
                _ = wake.notified() => false,
            };
            let Some(me) = weak.upgrade() else { return };
            let changed: Changed = {
                let mut n = named.lock().unwrap_or_else(|p| p.into_inner());
                let n = std::mem::take(&mut *n);
                if timer || n.all {
                    None
                } else if n.paths.is_empty() {
                    // Only entries the poll does not read changed.
                    continue;
                } else {
                    Some(n.paths.into_iter().collect())
                }
            };
            let poll = poll.clone();
            // Small synchronous reads; a blocking thread keeps them off the async workers.
            if tokio::task::spawn_blocking(move || poll(&me, changed))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// Whether `path` names a `..`-prefixed entry: a mounted ConfigMap or Secret swaps its content
/// by renaming its `..data` symlink, and the entries a reader follows are symlinks through it.
pub fn is_projection_entry(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".."))
}
