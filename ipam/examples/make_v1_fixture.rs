//! Writes ipam/tests/fixtures/store-v1.redb and its sidecar with the schema-v1 store: run once
//! with the v1 code (`cargo run --release -p vpcnet-ipam --example make_v1_fixture`).

use std::net::Ipv4Addr;
use vpcnet_api::{AttachmentKey, PodRef};
use vpcnet_ipam::{AllocRequest, Ipam, IpamConfig};

const CONFIG: &str = r#"{
  "networks": [
    {"name": "vpc-a", "id": 1, "subnets": [
      {"name": "pods-a", "cidr": "10.40.0.0/24",
       "reserved": [{"start": "10.40.0.2", "end": "10.40.0.3"}],
       "blocks": {"n1": ["10.40.0.0/28"]}},
      {"name": "pods-b", "cidr": "10.41.0.0/24", "blocks": {"n1": ["10.41.0.16/28"]}}
    ]},
    {"name": "vpc-b", "id": 2, "subnets": [
      {"name": "main", "cidr": "10.50.0.0/24", "blocks": {"n1": ["10.50.0.240/28"]}}
    ]}
  ],
  "cooldown_secs": 100000000
}"#;

fn main() {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let path = out.join("store-v1.redb");
    let _ = std::fs::remove_file(&path);
    let config: IpamConfig = serde_json::from_str(CONFIG).unwrap();
    let ipam = Ipam::open(&path, config, "n1").unwrap();
    let key = |id: &str| AttachmentKey {
        container_id: id.into(),
        ifname: "eth0".into(),
    };
    let pod = |name: &str| PodRef {
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        infra_container_id: String::new(),
    };
    let plan: &[(&str, Option<&str>, Option<&str>, Option<Ipv4Addr>)] = &[
        ("c1", None, None, None),
        ("c2", None, None, None),
        ("c3", None, None, None),
        ("c4", None, Some("pods-b"), None),
        ("c5", None, Some("pods-b"), None),
        ("c6", Some("vpc-b"), None, None),
        ("c7", Some("vpc-b"), None, None),
        ("s1", None, None, Some(Ipv4Addr::new(10, 40, 0, 200))),
    ];
    for (id, network, subnet, static_ip) in plan {
        let k = key(id);
        let p = pod(id);
        ipam.allocate(&AllocRequest {
            key: &k,
            pod: &p,
            network: *network,
            subnet: *subnet,
            static_ip: *static_ip,
            host_veth: &format!("veth{id}"),
        })
        .unwrap();
    }
    for id in ["c1", "c4", "s1", "c6"] {
        ipam.mark_ready(&key(id)).unwrap();
    }
    // Released into cooldown (a huge cooldown keeps them cooling when the test runs).
    for id in ["c2", "c5"] {
        ipam.release(&key(id)).unwrap();
    }
    let records = ipam.list().unwrap();
    assert!(ipam.verify().unwrap().is_empty());
    drop(ipam);

    // Read the raw v1 tables for the sidecar, so the test compares against what is on disk.
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let cooldown: Vec<(String, u64)> = txn
        .open_table(TableDefinition::<u32, u64>::new("cooldown"))
        .unwrap()
        .iter()
        .unwrap()
        .map(|r| {
            let (ip, at) = r.unwrap();
            (Ipv4Addr::from(ip.value()).to_string(), at.value())
        })
        .collect();
    let cursors: Vec<(String, String)> = txn
        .open_table(TableDefinition::<&str, u32>::new("cursors"))
        .unwrap()
        .iter()
        .unwrap()
        .map(|r| {
            let (name, ip) = r.unwrap();
            (name.value().to_string(), Ipv4Addr::from(ip.value()).to_string())
        })
        .collect();
    let sidecar = serde_json::json!({
        "config": serde_json::from_str::<serde_json::Value>(CONFIG).unwrap(),
        "node": "n1",
        "records": records,
        "cooldown": cooldown,
        "cursors": cursors,
    });
    std::fs::write(
        out.join("store-v1.json"),
        serde_json::to_string_pretty(&sidecar).unwrap() + "\n",
    )
    .unwrap();
}
