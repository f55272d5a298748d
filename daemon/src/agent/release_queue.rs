//! Releases the plugin queued in files while the daemon was unreachable or could not record
//! them: replayed before serving and on every tick, and played first by an ADD of the same
//! attachment.

use super::{Agent, AgentError};
use crate::wire;
use std::sync::MutexGuard;
use tracing::{info, warn};
use vpcnet_api::AttachmentKey;
use vpcnet_api::release_queue::{self, EntryError};

/// What playing one queued release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Played {
    Released,
    /// Its allocation was already gone, or the key now holds a later one.
    Stale,
    /// No entry (played meanwhile, or set aside).
    Gone,
}

impl Agent {
    /// A release queued for this attachment is a DEL that came before this ADD (a runtime
    /// orders one container's operations), so it is played first: the ADD then gets a fresh
    /// allocation instead of the record the release was meant to free, and the entry is gone
    /// before it could free the new one. Costs one failed stat when nothing is queued.
    pub(super) fn consume_queued_release(&self, key: &AttachmentKey) -> Result<(), AgentError> {
        let path = release_queue::path_for(&self.config.release_queue, key);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(());
        }
        let _queue = self.lock_release_queue();
        self.play_queued(&path, Some(key)).map(|_| ())
    }

    fn lock_release_queue(&self) -> MutexGuard<'_, ()> {
        self.release_queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plays one queue file (the caller holds the queue lock) and removes it once done. A queued
    /// release only ever releases the allocation it was queued for: one created after the entry
    /// was queued, or holding another address than the DEL's prevResult named, belongs to a
    /// later ADD and is kept. Dropping an entry wrongly (the wall clock went back) only leaks
    /// until reconcile sees the veth gone; releasing wrongly would take a live pod's address.
    pub(super) fn play_queued(
        &self,
        path: &std::path::Path,
        expect: Option<&AttachmentKey>,
    ) -> Result<Played, AgentError> {
        let entry = match release_queue::read(path) {
            Ok(entry) => entry,
            // Played by someone else meanwhile.
            Err(EntryError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Played::Gone);
            }
            Err(err) => {
                warn!(file = %path.display(), %err, "unusable queued release; setting it aside");
                let _ = std::fs::rename(path, path.with_extension("bad"));
                return Ok(Played::Gone);
            }
        };
        if let Some(key) = expect
            && entry.key != *key
        {
            // A 128-bit name collision: not this attachment's release.
            return Ok(Played::Gone);
        }
        let key = wire::key(&entry.key);
        let played = match self.ipam.get(&key)? {
            Some(rec)
                if rec.created_unix_ms > entry.queued_unix_ms
                    || entry.ip.is_some_and(|ip| !rec.ips().any(|held| held == ip)) =>
            {
                info!(container = %entry.key.container_id, ifname = %entry.key.ifname, ip = %rec.ip(),
                    "queued release predates the attachment's allocation; dropped");
                Played::Stale
            }
            Some(_) => {
                self.release(&key)?;
                Played::Released
            }
            None => Played::Stale,
        };
        // Not made durable: if the removal is lost in a crash, the entry is older than any
        // later allocation of the key and is dropped as stale.
        let _ = std::fs::remove_file(path);
        Ok(played)
    }

    /// Replays releases the plugin queued while the daemon was unreachable or could not record
    /// them. Each file is removed only after its release committed; unusable files are set
    /// aside, not retried forever. Returns the releases done.
    pub fn replay_release_queue(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.config.release_queue) else {
            return 0;
        };
        let (mut done, mut stale) = (0, 0);
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            // Old-format files (`{container}-{ifname}.json`) are replayed too; `.` files are
            // the plugin's temporaries.
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let _queue = self.lock_release_queue();
            match self.play_queued(&path, None) {
                Ok(Played::Released) => done += 1,
                Ok(Played::Stale) => stale += 1,
                Ok(Played::Gone) => {}
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "queued release failed; will retry")
                }
            }
        }
        if done + stale > 0 {
            info!(released = done, stale, "replayed queued releases");
            self.metrics.queued_releases.inc_by(done as u64);
        }
        done
    }
}
