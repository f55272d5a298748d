//! A store written by the schema-1 release (tests/fixtures/store-v1.redb, made by that
//! release's code; the sidecar store-v1.json lists what it wrote) opens with every allocation,
//! cooldown and cursor intact.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use vpcnet_ipam::{AllocRequest, AttachmentKey, Ipam, IpamConfig, IpamError, Lifecycle, PodInfo};

struct Copy {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sidecar: Value,
}

fn fixture_copy() -> Copy {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.redb");
    std::fs::copy(fixtures.join("store-v1.redb"), &path).unwrap();
    let sidecar: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("store-v1.json")).unwrap())
            .unwrap();
    Copy {
        _dir: dir,
        path,
        sidecar,
    }
}

fn config(c: &Copy) -> IpamConfig {
    serde_json::from_value(c.sidecar["config"].clone()).unwrap()
}

fn open(c: &Copy) -> Ipam {
    Ipam::open(&c.path, config(c), c.sidecar["node"].as_str().unwrap()).unwrap()
}

fn tables(path: &Path) -> Vec<String> {
    use redb::TableHandle;
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let mut names: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    names.sort();
    names
}

fn schema(path: &Path) -> u64 {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
    txn.open_table(meta)
        .unwrap()
        .get("schema_version")
        .unwrap()
        .unwrap()
        .value()
}

/// The v2 store's cooldown and cursor tables, decoded: address key → value.
fn v2_cooldown_and_cursors(path: &Path) -> (BTreeMap<String, u64>, BTreeMap<String, String>) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let decode = |k: &[u8]| -> String {
        match k {
            [4, a, b, c, d] => std::net::Ipv4Addr::new(*a, *b, *c, *d).to_string(),
            other => panic!("not an IPv4 address key: {other:?}"),
        }
    };
    let cooldown: TableDefinition<&[u8], u64> = TableDefinition::new("cooldown_v2");
    let cursors: TableDefinition<&str, &[u8]> = TableDefinition::new("cursors_v2");
    let cool = txn
        .open_table(cooldown)
        .unwrap()
        .iter()
        .unwrap()
        .map(|r| {
            let (k, v) = r.unwrap();
            (decode(k.value()), v.value())
        })
        .collect();
    let curs = txn
        .open_table(cursors)
        .unwrap()
        .iter()
        .unwrap()
        .map(|r| {
            let (k, v) = r.unwrap();
            (k.value().to_string(), decode(v.value()))
        })
        .collect();
    (cool, curs)
}

fn key(id: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: id.into(),
        ifname: "eth0".into(),
    }
}

fn alloc(ipam: &Ipam, id: &str, subnet: Option<&str>) -> Result<vpcnet_ipam::Endpoint, IpamError> {
    ipam.allocate(&AllocRequest {
        key: &key(id),
        pod: &PodInfo::default(),
        network: None,
        subnet,
        static_ip: None,
        host_veth: "veth-new",
    })
}

#[test]
fn v1_store_migrates_with_everything_intact() {
    let c = fixture_copy();
    assert_eq!(schema(&c.path), 1, "the fixture is a schema-1 store");
    assert!(tables(&c.path).contains(&"allocations".to_string()));
    let ipam = open(&c);
    assert!(ipam.open_repairs().is_empty(), "{:?}", ipam.open_repairs());
    assert!(ipam.verify().unwrap().is_empty());

    // Every allocation, field by field.
    let want = c.sidecar["records"].as_array().unwrap();
    let got = ipam.list().unwrap();
    assert_eq!(got.len(), want.len());
    assert_eq!(got.len(), 6);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            g.key.container_id,
            w["key"]["container_id"].as_str().unwrap()
        );
        assert_eq!(g.key.ifname, w["key"]["ifname"].as_str().unwrap());
        assert_eq!(g.addresses.len(), 1);
        let a = &g.addresses[0];
        assert_eq!(a.ip, w["ip"].as_str().unwrap().parse::<IpAddr>().unwrap());
        assert_eq!(u64::from(a.prefix_len), w["prefix_len"].as_u64().unwrap());
        assert_eq!(a.network, w["network"].as_str().unwrap());
        assert_eq!(a.subnet, w["subnet"].as_str().unwrap());
        assert_eq!(g.pod.namespace, w["pod"]["namespace"].as_str().unwrap());
        assert_eq!(g.pod.name, w["pod"]["name"].as_str().unwrap());
        assert_eq!(g.pod.uid, w["pod"]["uid"].as_str().unwrap());
        assert_eq!(g.host_veth, w["host_veth"].as_str().unwrap());
        assert_eq!(g.created_unix_ms, w["created_unix_ms"].as_u64().unwrap());
        let want_state = if w["ready"].as_bool().unwrap() {
            Lifecycle::Ready { policy_revision: 0 }
        } else {
            Lifecycle::Allocated
        };
        assert_eq!(g.state, want_state, "{}", g.key.container_id);
        assert_eq!(g.wiring, None);
        let net_id = if a.network == "vpc-a" { 1 } else { 2 };
        assert_eq!(g.network_id, net_id);
        assert_eq!(ipam.get(&g.key).unwrap().as_ref(), Some(g));
    }

    // Cooldowns and cursors, exactly as the v1 tables held them.
    let (cool, curs) = v2_cooldown_and_cursors(&c.path_after_close(ipam));
    let want_cool: BTreeMap<String, u64> = c.sidecar["cooldown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
        .collect();
    let want_curs: BTreeMap<String, String> = c.sidecar["cursors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()))
        .collect();
    assert_eq!(want_cool.len(), 2);
    assert_eq!(want_curs.len(), 3);
    assert_eq!(cool, want_cool);
    assert_eq!(curs, want_curs);
    // The v1 tables are gone; the file says schema 2.
    let names = tables(&c.path);
    for v1 in ["allocations", "by_ip", "cooldown", "cursors"] {
        assert!(!names.contains(&v1.to_string()), "{v1} left in {names:?}");
    }
    assert_eq!(schema(&c.path), 2);

    // Second open: a no-op (nothing repaired, same contents), and the migrated state behaves:
    // the index protects held addresses, cooldowns hold, cursors continue.
    let ipam = open(&c);
    assert!(ipam.open_repairs().is_empty(), "{:?}", ipam.open_repairs());
    assert_eq!(ipam.list().unwrap(), got);
    // pods-a: cursor at .7; .4 c1, .6 c3 held, .5 cooling (released by c2) → .7, then .8.
    assert_eq!(
        alloc(&ipam, "n1", None).unwrap().ip().to_string(),
        "10.40.0.7"
    );
    assert_eq!(
        alloc(&ipam, "n2", None).unwrap().ip().to_string(),
        "10.40.0.8"
    );
    // pods-b: cursor at .18; .17 cools.
    assert_eq!(
        alloc(&ipam, "n3", Some("pods-b")).unwrap().ip().to_string(),
        "10.41.0.18"
    );
    // The static address is held.
    let e = ipam
        .allocate(&AllocRequest {
            key: &key("n4"),
            pod: &PodInfo::default(),
            network: None,
            subnet: None,
            static_ip: Some("10.40.0.200".parse().unwrap()),
            host_veth: "x",
        })
        .unwrap_err();
    assert!(matches!(e, IpamError::AddressTaken { .. }), "{e}");
    // Migrated endpoints move on through their lifecycle and release into cooldown.
    let c3 = key("c3");
    let wiring = vpcnet_ipam::Wiring {
        host_ifindex: 5,
        pod_mac: [2, 0, 0, 0, 0, 1],
    };
    assert!(ipam.mark_wired(&c3, wiring).unwrap());
    assert!(ipam.mark_ready(&c3, 1).unwrap());
    assert_eq!(
        ipam.release(&c3).unwrap().unwrap().ip().to_string(),
        "10.40.0.6"
    );
    assert!(ipam.verify().unwrap().is_empty());
}

#[test]
fn v1_store_with_an_undecodable_record_keeps_its_address_and_reports_it() {
    let c = fixture_copy();
    {
        let t: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("allocations");
        let db = redb::Database::open(&c.path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(t)
            .unwrap()
            .insert(("c7", "eth0"), b"not json".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let ipam = open(&c);
    let repairs = ipam.open_repairs();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert!(repairs[0].contains("cannot be decoded"), "{repairs:?}");
    assert!(repairs[0].contains("\"c7\""), "{repairs:?}");
    assert_eq!(ipam.verify().unwrap(), repairs);
    assert_eq!(ipam.list().unwrap().len(), 5);
    // c7's 10.50.0.241 stays reserved: vpc-b's next address skips it.
    let next = ipam
        .allocate(&AllocRequest {
            key: &key("b1"),
            pod: &PodInfo::default(),
            network: Some("vpc-b"),
            subnet: None,
            static_ip: None,
            host_veth: "x",
        })
        .unwrap();
    assert_eq!(next.ip().to_string(), "10.50.0.242");
    // Its DEL frees it (into cooldown).
    assert_eq!(ipam.release(&key("c7")).unwrap(), None);
    assert!(ipam.verify().unwrap().is_empty());
}

impl Copy {
    /// Closes the store (so the test can read the file directly) and returns its path.
    fn path_after_close(&self, ipam: Ipam) -> PathBuf {
        drop(ipam);
        self.path.clone()
    }
}
