//! Following a directory of inputs (manifests, the mounted config) without spinning: inotify wakes
//! the poller on every change of an entry, never on reads (its own included, which would make it
//! spin); without inotify, or as a safety net for a lost event, it polls on a timer.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often a watched directory is polled although inotify watches it: only a safety net for
/// a lost event, so rare enough to keep an idle daemon idle.
pub const EVENT_FALLBACK_POLL: Duration = Duration::from_secs(10);

/// Calls `poll` on a blocking thread whenever an entry of `dir` changes (or every `interval`
/// without inotify, every [`EVENT_FALLBACK_POLL`] with it), until `owner` is dropped.
pub fn spawn_dir_watcher<T, F>(
    owner: &Arc<T>,
    dir: &Path,
    interval: Duration,
    what: &'static str,
    poll: F,
) -> tokio::task::JoinHandle<()>
where
    T: Send + Sync + 'static,
    F: Fn(&T) + Send + Sync + 'static,
{
    use notify::Watcher as _;
    use notify::event::{AccessKind, AccessMode, EventKind};
    let weak: Weak<T> = Arc::downgrade(owner);
    let wake = Arc::new(tokio::sync::Notify::new());
    let events = {
        let wake = wake.clone();
        notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
            let changed = match r {
                Ok(e) => match e.kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                    EventKind::Access(_) => false,
                    // Create, modify (data, metadata, rename), remove, and "rescan" after a
                    // queue overflow.
                    _ => true,
                },
                // Something was lost; look.
                Err(_) => true,
            };
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
            tokio::select! {
                _ = tick.tick() => {}
                _ = wake.notified() => {}
            }
            let Some(me) = weak.upgrade() else { return };
            let poll = poll.clone();
            // Small synchronous reads; a blocking thread keeps them off the async workers.
            if tokio::task::spawn_blocking(move || poll(&me))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}
