//! Issue 9 item 4: a full state disk must not wedge the store until restart. Runs against a real
//! 3 MiB tmpfs mounted under a temporary directory (needs root; skipped, loudly, without it).

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vpcnet_ipam::{
    AllocRequest, AttachmentKey, Ipam, IpamConfig, IpamError, NetworkConfig, PodInfo, Record,
    SubnetConfig,
};

fn config() -> IpamConfig {
    IpamConfig {
        networks: vec![NetworkConfig {
            name: "vpc".into(),
            id: 1,
            routable_cidrs: vec![],
            masquerade_exclude: vec![],
            peers: vec![],
            default_subnet: None,
            subnets: vec![SubnetConfig {
                name: "pods".into(),
                cidr: "10.0.0.0/16".parse().unwrap(),
                gateway: None,
                reserved: vec![],
                blocks: [("n1".to_string(), vec!["10.0.0.0/16".parse().unwrap()])]
                    .into_iter()
                    .collect(),
            }],
        }],
        default_network: None,
        cooldown_secs: 0,
    }
}

fn key(i: usize) -> AttachmentKey {
    AttachmentKey {
        // Long IDs make each record big, so the disk fills in a few hundred allocations.
        container_id: format!("{i:08}{}", "c".repeat(200)),
        ifname: "eth0".into(),
    }
}

fn alloc(ipam: &Ipam, i: usize) -> Result<Record, IpamError> {
    let pod = PodInfo {
        namespace: "ns".into(),
        name: format!("pod-{i}-{}", "p".repeat(200)),
        ..PodInfo::default()
    };
    ipam.allocate(&AllocRequest {
        key: &key(i),
        pod: &pod,
        network: None,
        subnet: None,
        static_ip: None,
        host_veth: "vpc0",
    })
}

/// A tmpfs mounted on a directory of its own, unmounted on drop (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("vpcnet-test-tmpfs")
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes `path` until the disk refuses more; returns the bytes written.
fn fill(path: &PathBuf) -> u64 {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let chunk = vec![0xa5u8; 4096];
    let mut n = 0;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    let _ = f.sync_all();
    n
}

#[test]
fn a_full_disk_fails_writes_with_try_again_and_recovers_without_restart() {
    let Some(fs) = Tmpfs::mount("3m") else {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let db = fs.path().join("ipam.redb");
    let ipam = Ipam::open(&db, config(), "n1").unwrap();
    assert_eq!(ipam.health(), None);

    let mut held: BTreeMap<AttachmentKey, Ipv4Addr> = BTreeMap::new();
    for i in 0..20 {
        let r = alloc(&ipam, i).unwrap();
        held.insert(r.key.clone(), r.ipv4().unwrap());
    }
    // Whatever redb had preallocated is used up by allocating on: the first failure is the
    // disk's, then every write fails while it stays full.
    let filler = fs.path().join("filler");
    fill(&filler);
    let mut next = 20;
    let full = loop {
        match alloc(&ipam, next) {
            Ok(r) => {
                held.insert(r.key.clone(), r.ipv4().unwrap());
                next += 1;
                assert!(next < 20_000, "the disk never filled");
            }
            Err(e) => break e,
        }
    };
    let failed_key = key(next);
    let msg = full.to_string();
    assert!(matches!(full, IpamError::StoreUnavailable(_)), "{msg}");
    assert!(msg.contains("disk is full"), "{msg}");
    assert!(
        msg.contains(&db.display().to_string()),
        "names the file: {msg}"
    );
    let health = ipam.health().expect("health reports the failing store");
    assert!(health.contains("disk is full"), "{health}");

    // Still full: releases fail the same way (nothing changes), health keeps saying so.
    let (victim, victim_ip) = held.iter().next().map(|(k, ip)| (k.clone(), *ip)).unwrap();
    let e = ipam.release(&victim).unwrap_err();
    assert!(matches!(e, IpamError::StoreUnavailable(_)), "{e}");
    let e = alloc(&ipam, next + 1).unwrap_err();
    assert!(matches!(e, IpamError::StoreUnavailable(_)), "{e}");
    assert!(ipam.health().is_some());

    // Space comes back: health clears by itself (no write needed from a caller) ...
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ipam.health().is_some() {
        assert!(
            Instant::now() < deadline,
            "health still failing after space returned: {:?}",
            ipam.health()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ... and writes work again in the same process.
    let released = ipam
        .release(&victim)
        .unwrap()
        .expect("the record was still there");
    assert_eq!(released.ipv4().unwrap(), victim_ip);
    held.remove(&victim);
    let again = alloc(&ipam, next).unwrap();
    held.insert(again.key.clone(), again.ipv4().unwrap());

    // Nothing lost, nothing duplicated, nothing half-written, and the failed allocations left
    // no trace.
    let listed: BTreeMap<AttachmentKey, Ipv4Addr> = ipam
        .list()
        .unwrap()
        .into_iter()
        .map(|r| (r.key.clone(), r.ipv4().unwrap()))
        .collect();
    assert_eq!(listed, held);
    let ips: HashSet<Ipv4Addr> = listed.values().copied().collect();
    assert_eq!(ips.len(), listed.len(), "an address is held twice");
    assert!(!listed.contains_key(&key(next + 1)));
    assert!(listed.contains_key(&failed_key), "its retry succeeded");
    assert_eq!(ipam.verify().unwrap(), Vec::<String>::new());

    // And the file reopens cleanly with the same contents.
    drop(ipam);
    let ipam = Ipam::open(&db, config(), "n1").unwrap();
    let reopened: BTreeMap<AttachmentKey, Ipv4Addr> = ipam
        .list()
        .unwrap()
        .into_iter()
        .map(|r| (r.key.clone(), r.ipv4().unwrap()))
        .collect();
    assert_eq!(reopened, held);
    drop(ipam);
}
