//! The release queue: releases the plugin could not hand to vpcnetd (daemon down, or its store
//! could not record them), left as files for the daemon to replay.
//!
//! One file per attachment, named by a hash of the length-prefixed (container ID, ifname) pair:
//! fixed length whatever the IDs (a runtime may send 256-character IDs, more than a file name
//! holds), and no two keys share a name the way `{container}-{ifname}` did for ("a-b", "c-d") and
//! ("a-b-c", "d"). The file carries the full key, which the reader checks against the name.
//!
//! An entry says when it was queued, so the daemon never lets it release an allocation made
//! after it (a pod re-added with the same container ID and ifname); see vpcnetd's replay.

use crate::AttachmentKey;
use serde::{Deserialize, Serialize};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What one queue file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedRelease {
    pub key: AttachmentKey,
    /// Wall-clock ms when the plugin gave up on handing the release over. Allocations of the
    /// key created after this instant belong to a later ADD and are not this release's.
    pub queued_unix_ms: u64,
    /// The address the runtime's prevResult named for the attachment, when DEL had one: a
    /// record holding another address is not the one this release was meant for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

impl QueuedRelease {
    pub fn now(key: AttachmentKey, ip: Option<IpAddr>) -> QueuedRelease {
        QueuedRelease {
            key,
            queued_unix_ms: unix_ms(SystemTime::now()),
            ip,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `r-` + 32 hex digits (the first 128 bits of SHA-256 over the length-prefixed pair) + `.json`.
pub fn file_name(key: &AttachmentKey) -> String {
    use sha2::Digest as _;
    let mut input = Vec::with_capacity(16 + key.container_id.len() + key.ifname.len());
    for part in [&key.container_id, &key.ifname] {
        input.extend_from_slice(&(part.len() as u64).to_be_bytes());
        input.extend_from_slice(part.as_bytes());
    }
    let digest = sha2::Sha256::digest(&input);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("r-{hex}.json")
}

pub fn path_for(dir: &Path, key: &AttachmentKey) -> PathBuf {
    dir.join(file_name(key))
}

/// Writes `entry` atomically (temporary file, fsync, rename, directory fsync): a reader only
/// ever sees complete entries, and one that was reported queued survives a crash. The
/// directory is created 0700 and the file 0600: they name pods.
pub fn enqueue(dir: &Path, entry: &QueuedRelease) -> io::Result<PathBuf> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let name = file_name(&entry.key);
    // Unique per process: concurrent plugins queueing the same key each write their own file
    // and the last rename wins whole.
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let dest = dir.join(&name);
    let data = serde_json::to_vec(entry).map_err(io::Error::other)?;
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        fs::rename(&tmp, &dest)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()?;
    Ok(dest)
}

/// Why a queue file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    #[error("it is neither a queued release nor a key: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("it holds the release of {key:?}, whose queue file is {expected}")]
    Misplaced {
        key: AttachmentKey,
        expected: String,
    },
}

/// Reads one queue file. Files of the old format (`{container}-{ifname}.json` holding a bare
/// key) are accepted, with their modification time (the rename keeps the write's) as the time
/// they were queued. A new-format file must sit under its key's name.
pub fn read(path: &Path) -> Result<QueuedRelease, EntryError> {
    let data = fs::read(path)?;
    if let Ok(entry) = serde_json::from_slice::<QueuedRelease>(&data) {
        let expected = file_name(&entry.key);
        if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
            return Err(EntryError::Misplaced {
                key: entry.key,
                expected,
            });
        }
        return Ok(entry);
    }
    let key: AttachmentKey = serde_json::from_slice(&data)?;
    let queued = fs::metadata(path)?.modified()?;
    Ok(QueuedRelease {
        key,
        queued_unix_ms: unix_ms(queued),
        ip: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key(c: &str, i: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: c.into(),
            ifname: i.into(),
        }
    }

    /// The name is part of the on-disk format: a plugin of one release queues, a daemon of the
    /// next replays, so the hashing must never change silently.
    #[test]
    fn names_are_stable_across_releases() {
        assert_eq!(
            file_name(&key("abc", "eth0")),
            "r-05740187d66326a291e0aa4ae08f31cd.json"
        );
    }

    #[test]
    fn names_are_fixed_length_and_distinct_where_the_old_ones_collided() {
        let a = file_name(&key("a-b", "c-d"));
        let b = file_name(&key("a-b-c", "d"));
        assert_ne!(a, b);
        assert_ne!(file_name(&key("ab", "c")), file_name(&key("a", "bc")));
        let long = file_name(&key(&"f".repeat(256), "eth0"));
        assert_eq!(long.len(), a.len());
        assert_eq!(a.len(), "r-".len() + 32 + ".json".len());
    }

    #[test]
    fn colliding_old_names_and_long_ids_queue_separately() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        let keys = [
            key("a-b", "c-d"),
            key("a-b-c", "d"),
            key(&"0123456789abcdef".repeat(16), "eth0"),
        ];
        for k in &keys {
            enqueue(&q, &QueuedRelease::now(k.clone(), None)).unwrap();
        }
        let mut back: Vec<AttachmentKey> = fs::read_dir(&q)
            .unwrap()
            .map(|e| read(&e.unwrap().path()).unwrap().key)
            .collect();
        back.sort();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(back, want, "every release kept, no temporary file left");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&q), 0o700);
        assert_eq!(mode(&path_for(&q, &keys[0])), 0o600);
    }

    #[test]
    fn old_format_files_are_read_with_their_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc-eth0.json");
        let before = unix_ms(SystemTime::now()).saturating_sub(2000);
        fs::write(&p, serde_json::to_vec(&key("abc", "eth0")).unwrap()).unwrap();
        let e = read(&p).unwrap();
        assert_eq!(e.key, key("abc", "eth0"));
        assert!(
            e.queued_unix_ms >= before,
            "{} < {before}",
            e.queued_unix_ms
        );
        assert_eq!(e.ip, None);
    }

    #[test]
    fn a_new_format_entry_under_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = enqueue(dir.path(), &QueuedRelease::now(key("a", "eth0"), None)).unwrap();
        let moved = dir.path().join(file_name(&key("b", "eth0")));
        fs::rename(&p, &moved).unwrap();
        assert!(matches!(read(&moved), Err(EntryError::Misplaced { .. })));
    }

    #[test]
    fn entries_written_with_an_ipv4_address_read_back_and_ipv6_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let k = key("abc", "eth0");
        // As the IPv4-only release wrote it.
        let old =
            r#"{"key":{"container_id":"abc","ifname":"eth0"},"queued_unix_ms":5,"ip":"10.1.2.3"}"#;
        let p = dir.path().join(file_name(&k));
        fs::write(&p, old).unwrap();
        let e = read(&p).unwrap();
        assert_eq!(e.ip, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(e.queued_unix_ms, 5);
        let v6 = QueuedRelease::now(k, Some("fd00::9".parse().unwrap()));
        let p = enqueue(dir.path(), &v6).unwrap();
        assert_eq!(read(&p).unwrap(), v6);
    }
}
