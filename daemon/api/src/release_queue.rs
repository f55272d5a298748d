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
use std::net::Ipv4Addr;
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
    pub ip: Option<Ipv4Addr>,
}

impl QueuedRelease {
    pub fn now(key: AttachmentKey, ip: Option<Ipv4Addr>) -> QueuedRelease {
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
    let mut input = Vec::with_capacity(16 + key.container_id.len() + key.ifname.len());
    for part in [&key.container_id, &key.ifname] {
        input.extend_from_slice(&(part.len() as u64).to_be_bytes());
        input.extend_from_slice(part.as_bytes());
    }
    let digest = sha256(&input);
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

/// SHA-256 (FIPS 180-4), kept here rather than as a dependency: the queue names are its only use
/// and the plugin binary stays small.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
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

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_matches_the_fips_vectors() {
        assert_eq!(
            hex(sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hex(sha256(&vec![b'a'; 1_000_000])),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
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
}
