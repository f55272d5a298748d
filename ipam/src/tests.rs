use crate::*;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;

fn net(s: &str) -> ipnetwork::IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn subnet(name: &str, cidr: &str, blocks: &[(&str, &str)]) -> SubnetConfig {
    let mut b: BTreeMap<String, Vec<ipnetwork::IpNetwork>> = BTreeMap::new();
    for (node, block) in blocks {
        b.entry(node.to_string()).or_default().push(net(block));
    }
    SubnetConfig {
        name: name.into(),
        cidr: net(cidr),
        gateway: None,
        reserved: vec![],
        blocks: b,
    }
}

fn network(name: &str, id: u16, subnets: Vec<SubnetConfig>) -> NetworkConfig {
    NetworkConfig {
        name: name.into(),
        id,
        routable_cidrs: vec![],
        masquerade_exclude: vec![],
        peers: vec![],
        default_subnet: None,
        subnets,
    }
}

/// vpc-a: pods-a 10.40.0.0/24 (n1: 10.40.0.0/29 whose .0 is the network address, .1 the gateway,
/// .2-.3 reserved → .4-.7 usable; n2: 10.40.0.8/29), pods-b 10.41.0.0/24 (n1: 10.41.0.16/28).
/// vpc-b: main 10.50.0.0/24 (n1: 10.50.0.248/29, whose .255 is the broadcast address).
fn config() -> IpamConfig {
    let mut pods_a = subnet(
        "pods-a",
        "10.40.0.0/24",
        &[("n1", "10.40.0.0/29"), ("n2", "10.40.0.8/29")],
    );
    pods_a.reserved = vec![IpRange {
        start: ip("10.40.0.2"),
        end: ip("10.40.0.3"),
    }];
    IpamConfig {
        networks: vec![
            network(
                "vpc-a",
                1,
                vec![
                    pods_a,
                    subnet("pods-b", "10.41.0.0/24", &[("n1", "10.41.0.16/28")]),
                ],
            ),
            network(
                "vpc-b",
                2,
                vec![subnet("main", "10.50.0.0/24", &[("n1", "10.50.0.248/29")])],
            ),
        ],
        default_network: None,
        cooldown_secs: 0,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.db");
    Fixture { _dir: dir, path }
}

fn key(id: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: id.into(),
        ifname: "eth0".into(),
    }
}

fn pod(name: &str) -> PodInfo {
    PodInfo {
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        infra_container_id: String::new(),
    }
}

struct Req {
    key: AttachmentKey,
    pod: PodInfo,
    network: Option<String>,
    subnet: Option<String>,
    static_ip: Option<IpAddr>,
}

impl Req {
    fn new(id: &str) -> Req {
        Req {
            key: key(id),
            pod: pod(&format!("pod-{id}")),
            network: None,
            subnet: None,
            static_ip: None,
        }
    }
    fn net(mut self, n: &str) -> Req {
        self.network = Some(n.into());
        self
    }
    fn sub(mut self, s: &str) -> Req {
        self.subnet = Some(s.into());
        self
    }
    fn ip(mut self, a: &str) -> Req {
        self.static_ip = Some(ip(a));
        self
    }
    fn run(&self, ipam: &Ipam) -> Result<Record, IpamError> {
        ipam.allocate(&AllocRequest {
            key: &self.key,
            pod: &self.pod,
            network: self.network.as_deref(),
            subnet: self.subnet.as_deref(),
            static_ip: self.static_ip,
            host_veth: "veth0",
        })
    }
}

/// The store's address key of an IPv4 address: family 4, then its octets.
fn v4key(a: IpAddr) -> Vec<u8> {
    let IpAddr::V4(a) = a else {
        panic!("{a} is not IPv4")
    };
    std::iter::once(4).chain(a.octets()).collect()
}

fn open(f: &Fixture, cfg: IpamConfig) -> Ipam {
    Ipam::open(&f.path, cfg, "n1").unwrap()
}

#[test]
fn default_selection() {
    let f = fixture();
    let ipam = open(&f, config());
    assert_eq!(ipam.network(None).unwrap().name, "vpc-a");
    let r = Req::new("a").run(&ipam).unwrap();
    assert_eq!((r.network(), r.subnet()), ("vpc-a", "pods-a"));
    assert_eq!(r.ip(), ip("10.40.0.4"));
    assert_eq!(r.addresses[0].prefix_len, 24);
    assert!(r.state == Lifecycle::Allocated);
    let r = Req::new("b").sub("pods-b").run(&ipam).unwrap();
    assert_eq!(r.ip(), ip("10.41.0.16"));
    let r = Req::new("c").net("vpc-b").run(&ipam).unwrap();
    assert_eq!((r.network(), r.subnet()), ("vpc-b", "main"));
    assert_eq!(r.ip(), ip("10.50.0.248"));
    drop(ipam);

    let mut cfg = config();
    cfg.default_network = Some("vpc-b".into());
    cfg.networks[0].default_subnet = Some("pods-b".into());
    let ipam = open(&f, cfg);
    assert_eq!(ipam.network(None).unwrap().name, "vpc-b");
    assert_eq!(Req::new("d").run(&ipam).unwrap().network(), "vpc-b");
    let r = Req::new("e").net("vpc-a").run(&ipam).unwrap();
    assert_eq!(r.subnet(), "pods-b");

    let e = Req::new("f").net("vpc-x").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::UnknownNetwork { .. }), "{e}");
    assert!(e.to_string().contains("vpc-a, vpc-b"), "{e}");
    let e = Req::new("f")
        .net("vpc-a")
        .sub("nope")
        .run(&ipam)
        .unwrap_err();
    assert!(matches!(e, IpamError::UnknownSubnet { .. }), "{e}");
    assert!(e.to_string().contains("pods-a, pods-b"), "{e}");
    assert!(matches!(
        ipam.network(Some("zzz")),
        Err(IpamError::UnknownNetwork { .. })
    ));
}

#[test]
fn dynamic_skips_infrastructure_and_exhausts_with_actionable_message() {
    let f = fixture();
    let ipam = open(&f, config());
    let got: Vec<IpAddr> = (0..4)
        .map(|i| Req::new(&format!("k{i}")).run(&ipam).unwrap().ip())
        .collect();
    assert_eq!(
        got,
        ["10.40.0.4", "10.40.0.5", "10.40.0.6", "10.40.0.7"].map(ip)
    );
    let e = Req::new("k4").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::Exhausted { cooling: 0, .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "subnet \"pods-a\" of network \"vpc-a\" has no free address in node \"n1\"'s blocks \
         10.40.0.0/29 (4 allocated, 4 reserved): add a block for node \"n1\" to the subnet or \
         remove unused pods"
    );
    // The broadcast address of a subnet is never handed out.
    let got: Vec<IpAddr> = (0..7)
        .map(|i| {
            Req::new(&format!("b{i}"))
                .net("vpc-b")
                .run(&ipam)
                .unwrap()
                .ip()
        })
        .collect();
    assert_eq!(got.last(), Some(&ip("10.50.0.254")));
    assert!(Req::new("b7").net("vpc-b").run(&ipam).is_err());

    // A node without blocks gets a message that says how to add one.
    let ipam2 = {
        drop(ipam);
        Ipam::open(&f.path, config(), "n3").unwrap()
    };
    let e = Req::new("z").run(&ipam2).unwrap_err();
    assert!(matches!(e, IpamError::NoBlocks { .. }), "{e}");
    assert!(e.to_string().contains("nodes with blocks: n1, n2"), "{e}");
    assert!(e.to_string().contains("blocks: {n3: [<cidr>]}"), "{e}");
}

#[test]
fn static_addresses() {
    let f = fixture();
    let ipam = open(&f, config());
    let held = Req::new("holder").ip("10.40.0.5").run(&ipam).unwrap();
    assert_eq!(held.ip(), ip("10.40.0.5"));

    let e = Req::new("x").ip("10.40.0.5").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::AddressTaken { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("pod default/pod-holder (container \"holder\" interface \"eth0\")"),
        "{msg}"
    );
    assert!(msg.contains("pod default/pod-x"), "{msg}");

    let e = Req::new("x").ip("10.99.0.5").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::OutsideSubnet { .. }), "{e}");
    assert!(
        e.to_string().contains("10.40.0.0/24, 10.41.0.0/24"),
        "lists the network's subnets: {e}"
    );
    let e = Req::new("x")
        .sub("pods-b")
        .ip("10.40.0.9")
        .run(&ipam)
        .unwrap_err();
    assert!(matches!(e, IpamError::OutsideSubnet { .. }), "{e}");
    assert!(e.to_string().contains("10.41.0.0/24"), "{e}");

    for (addr, what) in [
        ("10.40.0.1", "the gateway"),
        ("10.40.0.0", "the network address"),
        ("10.40.0.255", "the broadcast address"),
        ("10.40.0.3", "reserved range 10.40.0.2-10.40.0.3"),
    ] {
        let e = Req::new("x").ip(addr).run(&ipam).unwrap_err();
        assert!(matches!(e, IpamError::Reserved { .. }), "{addr}: {e}");
        assert!(e.to_string().contains(what), "{e}");
    }

    // Outside this node's blocks (n2's block, and unassigned space) but inside the subnet.
    assert_eq!(
        Req::new("p1").ip("10.40.0.9").run(&ipam).unwrap().ip(),
        ip("10.40.0.9")
    );
    assert_eq!(
        Req::new("p2").ip("10.40.0.200").run(&ipam).unwrap().ip(),
        ip("10.40.0.200")
    );
    // Without a subnet, the subnet containing the address is chosen.
    let r = Req::new("p3").ip("10.41.0.77").run(&ipam).unwrap();
    assert_eq!(r.subnet(), "pods-b");
    // Dynamic allocation steps around statically held addresses.
    assert_eq!(Req::new("d1").run(&ipam).unwrap().ip(), ip("10.40.0.4"));
    assert_eq!(Req::new("d2").run(&ipam).unwrap().ip(), ip("10.40.0.6"));
}

#[test]
fn cooldown_delays_reuse_and_survives_restart() {
    let f = fixture();
    let mut cfg = config();
    cfg.cooldown_secs = 30;
    let ipam = open(&f, cfg.clone());
    let recs: Vec<Record> = (0..4)
        .map(|i| Req::new(&format!("k{i}")).run(&ipam).unwrap())
        .collect();
    let freed = ipam.release(&recs[1].key).unwrap().unwrap();
    let e = Req::new("new").run(&ipam).unwrap_err();
    assert!(
        matches!(e, IpamError::Exhausted { cooling: 1.., .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("3 allocated, 1 cooling down for up to 30 s"),
        "{msg}"
    );
    assert!(msg.contains("become free again within 30 s"), "{msg}");
    assert_eq!(free_of(&ipam, "vpc-a/pods-a"), 0);

    drop(ipam);
    let ipam = open(&f, cfg.clone());
    assert!(Req::new("new").run(&ipam).is_err(), "cooldown is persisted");
    ipam.advance_clock_ms(29_000);
    let e = Req::new("new").run(&ipam).unwrap_err();
    assert!(e.to_string().contains("for up to 1 s"), "{e}");
    ipam.advance_clock_ms(1_000);
    assert_eq!(free_of(&ipam, "vpc-a/pods-a"), 1);
    assert_eq!(Req::new("new").run(&ipam).unwrap().ip(), freed.ip());

    // An explicitly requested address is honoured even while cooling down.
    ipam.release(&recs[2].key).unwrap().unwrap();
    let r = Req::new("pinned")
        .ip(&recs[2].ip().to_string())
        .run(&ipam)
        .unwrap();
    assert_eq!(r.ip(), recs[2].ip());
}

#[test]
fn release_stamped_in_the_future_waits_one_cooldown_from_now() {
    let f = fixture();
    let mut cfg = config();
    cfg.cooldown_secs = 10;
    let ipam = open(&f, cfg.clone());
    let recs: Vec<Record> = (0..4)
        .map(|i| Req::new(&format!("k{i}")).run(&ipam).unwrap())
        .collect();
    // Released "an hour from now", then the clock is set back by an hour (skew removed by
    // reopening).
    ipam.advance_clock_ms(3_600_000);
    ipam.release(&recs[0].key).unwrap();
    drop(ipam);
    let ipam = open(&f, cfg);
    assert!(Req::new("n").run(&ipam).is_err());
    ipam.advance_clock_ms(10_000);
    assert_eq!(Req::new("n").run(&ipam).unwrap().ip(), recs[0].ip());
}

#[test]
fn cursor_prefers_addresses_not_recently_freed() {
    let f = fixture();
    let ipam = open(&f, config());
    let a = Req::new("a").sub("pods-b").run(&ipam).unwrap();
    ipam.release(&a.key).unwrap();
    let b = Req::new("b").sub("pods-b").run(&ipam).unwrap();
    assert_eq!(b.ip(), ip("10.41.0.17"));
    drop(ipam);
    let ipam = open(&f, config());
    let c = Req::new("c").sub("pods-b").run(&ipam).unwrap();
    assert_eq!(c.ip(), ip("10.41.0.18"), "the cursor is persisted");
    let last: Vec<IpAddr> = (0..14)
        .map(|i| {
            Req::new(&format!("f{i}"))
                .sub("pods-b")
                .run(&ipam)
                .unwrap()
                .ip()
        })
        .collect();
    assert_eq!(last[12], ip("10.41.0.31"));
    assert_eq!(
        last[13],
        a.ip(),
        "wrapped round to the address released first"
    );
}

#[test]
fn allocate_is_idempotent_per_key() {
    let f = fixture();
    let ipam = open(&f, config());
    let first = Req::new("a").run(&ipam).unwrap();
    assert_eq!(Req::new("a").run(&ipam).unwrap(), first);
    let mut again = Req::new("a").ip("10.40.0.4");
    again.pod = pod("someone-else");
    assert_eq!(again.run(&ipam).unwrap(), first, "returned unchanged");
    let e = Req::new("a").ip("10.40.0.6").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::KeyHoldsOtherAddress { .. }), "{e}");
    assert!(e.to_string().contains("already holds 10.40.0.4"), "{e}");
    assert!(Req::new("a").net("vpc-b").run(&ipam).is_err());
    assert!(Req::new("a").sub("pods-b").run(&ipam).is_err());
    assert_eq!(ipam.list().unwrap().len(), 1);
    // A different interface of the same container is a different attachment.
    let mut eth1 = Req::new("a");
    eth1.key.ifname = "eth1".into();
    assert_ne!(eth1.run(&ipam).unwrap().ip(), first.ip());
}

#[test]
fn release_twice_and_lifecycle() {
    let f = fixture();
    let ipam = open(&f, config());
    let a = Req::new("a").run(&ipam).unwrap();
    assert_eq!(a.state, Lifecycle::Allocated);
    assert_eq!(a.network_id, 1);
    assert_eq!(a.wiring, None);
    let wiring = Wiring {
        host_ifindex: 7,
        pod_mac: [2, 0, 0, 0, 0, 9],
    };
    assert!(!ipam.mark_wired(&key("nobody"), wiring).unwrap());
    assert!(!ipam.mark_ready(&key("nobody"), 1).unwrap());
    // Ready before wired is refused, not silently recorded.
    let e = ipam.mark_ready(&a.key, 1).unwrap_err();
    assert!(matches!(e, IpamError::InvalidTransition { .. }), "{e}");
    assert!(e.to_string().contains("wired first"), "{e}");
    assert_eq!(
        ipam.get(&a.key).unwrap().unwrap().state,
        Lifecycle::Allocated
    );
    assert!(ipam.mark_wired(&a.key, wiring).unwrap());
    assert!(ipam.mark_wired(&a.key, wiring).unwrap(), "repeatable");
    assert!(ipam.mark_ready(&a.key, 3).unwrap());
    assert!(ipam.mark_ready(&a.key, 3).unwrap());
    assert!(
        ipam.mark_ready(&a.key, 4).unwrap(),
        "a newer policy revision"
    );
    let got = ipam.get(&a.key).unwrap().unwrap();
    assert_eq!(got.state, Lifecycle::Ready { policy_revision: 4 });
    assert_eq!(got.wiring, Some(wiring));
    assert!(got.is_ready());
    assert!(ipam.mark_releasing(&a.key).unwrap());
    for e in [
        ipam.mark_wired(&a.key, wiring).unwrap_err(),
        ipam.mark_ready(&a.key, 5).unwrap_err(),
        Req::new("a").run(&ipam).unwrap_err(),
    ] {
        assert!(matches!(e, IpamError::InvalidTransition { .. }), "{e}");
        assert!(e.to_string().contains("release has started"), "{e}");
    }
    let released = ipam.release(&a.key).unwrap().unwrap();
    assert_eq!(released.ip(), a.ip());
    assert_eq!(released.state, Lifecycle::Releasing);
    assert_eq!(released.wiring, Some(wiring));
    assert_eq!(ipam.release(&a.key).unwrap(), None);
    assert_eq!(ipam.get(&a.key).unwrap(), None);
    assert!(ipam.list().unwrap().is_empty());
    assert!(ipam.verify().unwrap().is_empty());
}

#[test]
fn lifecycle_survives_reopen() {
    let f = fixture();
    let ipam = open(&f, config());
    let a = Req::new("a").run(&ipam).unwrap();
    let b = Req::new("b").net("vpc-b").run(&ipam).unwrap();
    let wiring = Wiring {
        host_ifindex: 42,
        pod_mac: [2, 1, 2, 3, 4, 5],
    };
    ipam.mark_wired(&a.key, wiring).unwrap();
    ipam.mark_ready(&a.key, 9).unwrap();
    ipam.mark_wired(&b.key, wiring).unwrap();
    drop(ipam);
    let ipam = open(&f, config());
    let listed = ipam.list().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].state, Lifecycle::Ready { policy_revision: 9 });
    assert_eq!(listed[0].wiring, Some(wiring));
    assert_eq!(listed[1].state, Lifecycle::Wired);
    assert_eq!(listed[1].network_id, 2);
    assert_eq!(listed[1].addresses[0].network, "vpc-b");
}

#[test]
fn release_all_except_and_release_many() {
    let f = fixture();
    let ipam = open(&f, config());
    for id in ["a1", "a2", "a3"] {
        Req::new(id).run(&ipam).unwrap();
    }
    for id in ["b1", "b2"] {
        Req::new(id).net("vpc-b").run(&ipam).unwrap();
    }
    let valid: HashSet<AttachmentKey> = [key("a1"), key("b1")].into_iter().collect();
    let gone = ipam.release_all_except(&valid, Some("vpc-a")).unwrap();
    let mut ids: Vec<&str> = gone.iter().map(|r| r.key.container_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["a2", "a3"]);
    assert_eq!(ipam.list().unwrap().len(), 3);
    assert!(
        ipam.release_all_except(&valid, Some("vpc-a"))
            .unwrap()
            .is_empty()
    );
    assert!(
        ipam.release_all_except(&valid, Some("nonexistent"))
            .unwrap()
            .is_empty()
    );
    let gone = ipam.release_all_except(&valid, None).unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].key, key("b2"));

    let gone = ipam
        .release_many(&[key("a1"), key("missing"), key("b1"), key("a1")])
        .unwrap();
    assert_eq!(gone.len(), 2);
    assert!(ipam.list().unwrap().is_empty());
    assert!(ipam.verify().unwrap().is_empty());
}

fn free_of(ipam: &Ipam, name: &str) -> u64 {
    ipam.free_counts()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

#[test]
fn free_counts() {
    let f = fixture();
    let mut cfg = config();
    cfg.cooldown_secs = 5;
    let ipam = open(&f, cfg);
    assert_eq!(
        ipam.free_counts().unwrap(),
        vec![
            ("vpc-a/pods-a".to_string(), 4),
            ("vpc-a/pods-b".to_string(), 16),
            ("vpc-b/main".to_string(), 7),
        ]
    );
    let a = Req::new("a").run(&ipam).unwrap();
    // Pinned outside this node's blocks: does not change this node's free count.
    Req::new("p").ip("10.40.0.100").run(&ipam).unwrap();
    assert_eq!(free_of(&ipam, "vpc-a/pods-a"), 3);
    ipam.release(&a.key).unwrap();
    assert_eq!(free_of(&ipam, "vpc-a/pods-a"), 3, "cooling");
    ipam.advance_clock_ms(5_000);
    assert_eq!(free_of(&ipam, "vpc-a/pods-a"), 4);
    drop(ipam);
    let ipam = Ipam::open(&f.path, config(), "n3").unwrap();
    assert!(ipam.free_counts().unwrap().iter().all(|(_, n)| *n == 0));
}

#[test]
fn records_of_removed_networks_are_kept() {
    let f = fixture();
    let ipam = open(&f, config());
    let b = Req::new("b").net("vpc-b").run(&ipam).unwrap();
    drop(ipam);
    let mut cfg = config();
    cfg.networks.pop();
    let ipam = open(&f, cfg);
    assert_eq!(ipam.list().unwrap(), vec![b.clone()]);
    assert_eq!(
        Req::new("b").run(&ipam).unwrap(),
        b,
        "idempotent retry still answers"
    );
    let e = Req::new("c").net("vpc-b").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::UnknownNetwork { .. }));
    assert_eq!(
        ipam.release_all_except(&HashSet::new(), Some("vpc-b"))
            .unwrap(),
        vec![b]
    );
}

#[test]
fn open_repairs_inconsistent_indexes() {
    use redb::{ReadableTableMetadata, TableDefinition};
    let f = fixture();
    let ipam = open(&f, config());
    let a = Req::new("a").run(&ipam).unwrap();
    let b = Req::new("b").run(&ipam).unwrap();
    assert!(ipam.open_repairs().is_empty());
    drop(ipam);
    {
        let by_ip: TableDefinition<&[u8], (&str, &str)> = TableDefinition::new("by_ip_v2");
        let db = redb::Database::create(&f.path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(by_ip).unwrap();
            t.remove(v4key(a.ip()).as_slice()).unwrap();
            t.insert(v4key(ip("10.40.0.7")).as_slice(), ("ghost", "eth0"))
                .unwrap();
            t.insert(v4key(b.ip()).as_slice(), ("a", "eth0")).unwrap();
            assert_eq!(t.len().unwrap(), 2);
        }
        txn.commit().unwrap();
    }
    let ipam = open(&f, config());
    assert_eq!(ipam.open_repairs().len(), 3, "{:?}", ipam.open_repairs());
    assert!(ipam.verify().unwrap().is_empty());
    // The repaired index protects both held addresses; the ghost's address is free again.
    let c = Req::new("c").run(&ipam).unwrap();
    let d = Req::new("d").run(&ipam).unwrap();
    let mut ips: Vec<IpAddr> = vec![a.ip(), b.ip(), c.ip(), d.ip()];
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 4);
}

#[test]
fn second_open_and_newer_schema_are_refused() {
    use redb::TableDefinition;
    let f = fixture();
    let ipam = open(&f, config());
    let e = Ipam::open(&f.path, config(), "n1").unwrap_err();
    assert!(e.to_string().contains("another process"), "{e}");
    assert!(matches!(e, IpamError::Store(_)), "{e}");
    drop(ipam);
    {
        let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
        let db = redb::Database::create(&f.path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(meta)
            .unwrap()
            .insert("schema_version", 99)
            .unwrap();
        txn.commit().unwrap();
    }
    let e = Ipam::open(&f.path, config(), "n1").unwrap_err();
    assert!(e.to_string().contains("newer vpcnet"), "{e}");
    assert!(e.to_string().contains(&f.path.display().to_string()), "{e}");
}

fn invalid(cfg: IpamConfig, needle: &str) {
    let f = fixture();
    match Ipam::open(&f.path, cfg, "n1") {
        Err(e @ IpamError::InvalidConfig(_)) => {
            assert!(e.to_string().contains(needle), "{needle:?} not in {e}");
        }
        other => panic!("expected InvalidConfig containing {needle:?}, got {other:?}"),
    }
    assert!(
        !f.path.exists(),
        "no store is created for an invalid config"
    );
}

#[test]
fn config_validation() {
    let mut c = config();
    c.networks[1].name = "vpc-a".into();
    invalid(c, "network name \"vpc-a\" is used twice");

    let mut c = config();
    c.networks[1].id = 1;
    invalid(c, "share id 1");

    let mut c = config();
    c.networks[0].id = 0;
    invalid(c, "has id 0");

    let mut c = config();
    c.networks[0].subnets[1].name = "pods-a".into();
    invalid(c, "the name is used twice");

    let mut c = config();
    c.networks[0].subnets[1].name = "a/b".into();
    invalid(c, "without '/'");

    let mut c = config();
    c.networks[0].subnets[0]
        .blocks
        .insert("n3".into(), vec![net("10.99.0.0/28")]);
    invalid(c, "block 10.99.0.0/28 of node \"n3\" is not inside");

    let mut c = config();
    c.networks[0].subnets[0]
        .blocks
        .insert("n3".into(), vec![net("10.40.0.4/30")]);
    invalid(c, "overlaps block");

    let mut c = config();
    c.networks[0].subnets[0]
        .blocks
        .insert("n3".into(), vec![net("10.40.0.5/30")]);
    invalid(c, "host bits set; did you mean 10.40.0.4/30");

    let mut c = config();
    c.networks[0].subnets[1].cidr = net("10.40.0.128/25");
    c.networks[0].subnets[1].blocks.clear();
    invalid(c, "overlaps subnet \"pods-a\"");

    let mut c = config();
    c.networks[0].subnets[0].gateway = Some(ip("10.41.0.1"));
    invalid(c, "gateway 10.41.0.1 is outside 10.40.0.0/24");

    let mut c = config();
    c.networks[0].subnets[0].gateway = Some(ip("10.40.0.255"));
    invalid(c, "network or broadcast");

    let mut c = config();
    c.networks[0].subnets[0].reserved = vec![IpRange {
        start: ip("10.40.0.9"),
        end: ip("10.40.1.2"),
    }];
    invalid(c, "is not inside 10.40.0.0/24");

    let mut c = config();
    c.networks[0].subnets[0].reserved = vec![IpRange {
        start: ip("10.40.0.9"),
        end: ip("10.40.0.2"),
    }];
    invalid(c, "ends before it starts");

    let mut c = config();
    c.default_network = Some("vpc-z".into());
    invalid(
        c,
        "default_network \"vpc-z\" is not one of the configured networks (vpc-a, vpc-b)",
    );

    let mut c = config();
    c.networks[0].default_subnet = Some("nope".into());
    invalid(c, "default_subnet \"nope\" of network \"vpc-a\"");

    let mut c = config();
    c.networks[0].peers = vec!["vpc-q".into()];
    invalid(c, "peers with unknown network \"vpc-q\"");

    let mut c = config();
    c.networks[1].subnets[0].cidr = net("10.50.0.0/31");
    c.networks[1].subnets[0].blocks.clear();
    invalid(c, "use a /30 or larger");

    let mut c = config();
    c.networks[1].subnets.clear();
    invalid(c, "has no subnets");

    // An empty topology is valid (see an_empty_topology_opens_and_the_first_network_is_used_live);
    // a default naming a network that is not there is not.
    invalid(
        IpamConfig {
            networks: vec![],
            default_network: Some("vpc".into()),
            cooldown_secs: 30,
        },
        "default_network \"vpc\"",
    );

    // Overlapping VPC CIDRs are fine, but not one node's blocks across them.
    let mut c = config();
    c.networks[1].subnets[0] = subnet("main", "10.40.0.0/24", &[("n1", "10.40.0.0/28")]);
    invalid(c, "node \"n1\" has overlapping blocks");
    let mut c = config();
    c.networks[1].subnets[0] = subnet("main", "10.40.0.0/24", &[("n1", "10.40.0.128/28")]);
    assert!(c.problems().is_empty(), "{:?}", c.problems());

    // Every problem is reported at once.
    let mut c = config();
    c.networks[0].id = 0;
    c.networks[1].peers = vec!["x".into()];
    assert_eq!(c.problems().len(), 2);

    let f = fixture();
    assert!(matches!(
        Ipam::open(&f.path, config(), ""),
        Err(IpamError::InvalidConfig(_))
    ));
}

#[test]
fn config_defaults_from_yaml_like_json() {
    let c: IpamConfig = serde_json::from_str(
        r#"{"networks":[{"name":"v","id":7,"subnets":[{"name":"s","cidr":"10.0.0.0/24",
            "blocks":{"n1":["10.0.0.0/26"]}}]}]}"#,
    )
    .unwrap();
    assert_eq!(c.cooldown_secs, 30);
    assert!(c.problems().is_empty());
    assert_eq!(c.networks[0].subnets[0].effective_gateway(), ip("10.0.0.1"));
}

/// vpc-a with the IPv4 subnets of [`config`] plus `pods6` fd00:40::/64 (n1: fd00:40::/126, whose
/// ::0 is the network address and ::1 the gateway → ::2-::3 usable) and `wide6` fd00:41::/64
/// whose whole range is n1's block.
fn dual_config() -> IpamConfig {
    let mut c = config();
    c.networks[0]
        .subnets
        .push(subnet("pods6", "fd00:40::/64", &[("n1", "fd00:40::/126")]));
    c.networks[0]
        .subnets
        .push(subnet("wide6", "fd00:41::/64", &[("n1", "fd00:41::/64")]));
    c
}

#[test]
fn ipv6_subnets_allocate_ipv6_addresses() {
    let f = fixture();
    let ipam = open(&f, dual_config());
    let a = Req::new("a").sub("pods6").run(&ipam).unwrap();
    assert_eq!(a.ip(), ip("fd00:40::2"));
    assert_eq!(a.addresses[0].prefix_len, 64);
    assert_eq!(a.ipv4(), None);
    assert_eq!(a.ipv6(), Some("fd00:40::2".parse().unwrap()));
    let b = Req::new("b").sub("pods6").run(&ipam).unwrap();
    assert_eq!(b.ip(), ip("fd00:40::3"));
    let e = Req::new("c").sub("pods6").run(&ipam).unwrap_err();
    assert!(
        matches!(e, IpamError::Exhausted { allocated: 2, .. }),
        "{e}"
    );
    // The IPv4 subnets are untouched by the IPv6 ones.
    assert_eq!(Req::new("v4").run(&ipam).unwrap().ip(), ip("10.40.0.4"));
    // Static IPv6, found by the subnet that contains it.
    let s = Req::new("s").ip("fd00:41::abcd").run(&ipam).unwrap();
    assert_eq!(s.subnet(), "wide6");
    let e = Req::new("t").ip("fd00:41::abcd").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::AddressTaken { .. }), "{e}");
    let e = Req::new("t").ip("fd00:40::1").run(&ipam).unwrap_err();
    assert!(e.to_string().contains("the gateway"), "{e}");
    // A /64 block: the scan is bounded and the count saturates rather than overflows.
    let w = Req::new("w").sub("wide6").run(&ipam).unwrap();
    assert_eq!(w.ip(), ip("fd00:41::2"));
    assert_eq!(
        free_of(&ipam, "vpc-a/wide6"),
        u64::MAX - 3,
        "2^64 - network - gateway - 2 held"
    );
    assert_eq!(free_of(&ipam, "vpc-a/pods6"), 0);
    ipam.release(&a.key).unwrap();
    assert_eq!(free_of(&ipam, "vpc-a/pods6"), 1, "cooldown 0: free at once");
    assert!(ipam.verify().unwrap().is_empty());
    drop(ipam);
    // Cursors and index survive a restart per family.
    let ipam = open(&f, dual_config());
    assert_eq!(
        Req::new("w2").sub("wide6").run(&ipam).unwrap().ip(),
        ip("fd00:41::3")
    );
    assert_eq!(
        Req::new("a2").sub("pods6").run(&ipam).unwrap().ip(),
        ip("fd00:40::2")
    );
}

#[test]
fn ipv6_config_validation() {
    let mut c = dual_config();
    c.networks[0].subnets[2].blocks = [("n1".to_string(), vec![net("10.40.0.64/28")])]
        .into_iter()
        .collect();
    invalid(c, "is not inside the subnet's fd00:40::/64");
    let mut c = dual_config();
    c.networks[0].subnets[2].gateway = Some(ip("10.40.0.1"));
    invalid(c, "gateway 10.40.0.1 is outside fd00:40::/64");
    let mut c = dual_config();
    c.networks[0].subnets[2].cidr = net("fd00:40::/127");
    c.networks[0].subnets[2].blocks.clear();
    invalid(c, "use a /126 or larger");
    let mut c = dual_config();
    c.networks[0].subnets[2].reserved = vec![IpRange {
        start: ip("fd00:40::5"),
        end: ip("10.40.0.9"),
    }];
    invalid(c, "mixes IPv4 and IPv6");
    // The last address of an IPv6 subnet is a host, not a broadcast address.
    let mut c = dual_config();
    c.networks[0].subnets[2].gateway = Some(ip("fd00:40::ffff:ffff:ffff:ffff"));
    assert!(c.problems().is_empty(), "{:?}", c.problems());
}

#[test]
fn ipv6_subnet_parses_from_yaml() {
    let c: IpamConfig = serde_yaml::from_str(
        "networks:\n- name: v\n  id: 7\n  routable_cidrs: [10.0.0.0/8, 'fd00::/8']\n  subnets:\n  \
         - name: s4\n    cidr: 10.0.0.0/24\n    blocks: {n1: [10.0.0.0/26]}\n  \
         - name: s6\n    cidr: 'fd00:7::/64'\n    gateway: 'fd00:7::1'\n    \
         reserved: [{start: 'fd00:7::2', end: 'fd00:7::9'}]\n    blocks: {n1: ['fd00:7::/112']}\n",
    )
    .unwrap();
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    let s6 = &c.networks[0].subnets[1];
    assert!(s6.cidr.is_ipv6());
    assert_eq!(s6.node_blocks("n1")[0], net("fd00:7::/112"));
    let f = fixture();
    let ipam = open(&f, c);
    // ::0 network, ::1 gateway, ::2-::9 reserved.
    assert_eq!(
        Req::new("a").sub("s6").run(&ipam).unwrap().ip(),
        ip("fd00:7::a")
    );
}

#[test]
fn undecodable_record_is_reported_and_freed_by_release() {
    use redb::TableDefinition;
    let f = fixture();
    let ipam = open(&f, config());
    let a = Req::new("a").run(&ipam).unwrap();
    drop(ipam);
    {
        let t: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("endpoints");
        let db = redb::Database::create(&f.path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(t)
            .unwrap()
            .insert(("a", "eth0"), b"{\"v\":\"99\"}".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let ipam = open(&f, config());
    let report = |problems: &[String]| {
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("cannot be decoded"), "{problems:?}");
        assert!(problems[0].contains("\"a\""), "{problems:?}");
    };
    report(ipam.open_repairs());
    report(&ipam.verify().unwrap());
    assert!(ipam.list().unwrap().is_empty());
    // Still reserved: the next dynamic allocation skips it.
    assert_ne!(Req::new("b").run(&ipam).unwrap().ip(), a.ip());
    assert_eq!(ipam.release(&key("a")).unwrap(), None, "nothing decodable");
    let left = ipam.verify().unwrap();
    assert!(left.is_empty(), "the release freed it: {left:?}");
    assert_eq!(
        Req::new("c")
            .ip(&a.ip().to_string())
            .run(&ipam)
            .unwrap()
            .ip(),
        a.ip()
    );
}

#[test]
fn topology_block_and_subnet_added_are_used_at_once() {
    let f = fixture();
    let ipam = open(&f, config());
    for i in 0..4 {
        Req::new(&format!("k{i}")).run(&ipam).unwrap();
    }
    assert!(matches!(
        Req::new("k4").run(&ipam).unwrap_err(),
        IpamError::Exhausted { .. }
    ));
    let mut c = config();
    c.networks[0].subnets[0]
        .blocks
        .get_mut("n1")
        .unwrap()
        .push(net("10.40.0.32/29"));
    c.networks[1]
        .subnets
        .push(subnet("extra", "10.51.0.0/24", &[("n1", "10.51.0.8/29")]));
    let change = ipam.apply_topology(c.clone()).unwrap();
    assert_eq!(
        change.blocks_added,
        ["vpc-a/pods-a 10.40.0.32/29", "vpc-b/extra 10.51.0.8/29"]
    );
    assert_eq!(change.subnets_added, ["vpc-b/extra"]);
    assert!(change.blocks_removed.is_empty() && change.subnets_removed.is_empty());
    assert!(change.to_string().contains("blocks added"), "{change}");
    assert_eq!(Req::new("k4").run(&ipam).unwrap().ip(), ip("10.40.0.32"));
    let x = Req::new("x").net("vpc-b").sub("extra").run(&ipam).unwrap();
    assert_eq!(x.ip(), ip("10.51.0.8"));
    assert_eq!(ipam.config(), c);
    assert!(
        ipam.apply_topology(c).unwrap().is_empty(),
        "same again: no change"
    );
}

#[test]
fn topology_removed_block_is_never_handed_out_again() {
    let f = fixture();
    let mut two = config();
    // pods-b: n1 owns 10.41.0.16/28 and 10.41.0.32/30.
    two.networks[0].subnets[1]
        .blocks
        .get_mut("n1")
        .unwrap()
        .push(net("10.41.0.32/30"));
    let ipam = open(&f, two.clone());
    let live = Req::new("live").ip("10.41.0.33").run(&ipam).unwrap();
    let change = ipam.apply_topology(config()).unwrap();
    assert_eq!(change.blocks_removed, ["vpc-a/pods-b 10.41.0.32/30"]);
    // The live endpoint stays listed; dynamic allocations only come from the remaining block.
    assert!(ipam.list().unwrap().contains(&live));
    let got: Vec<IpAddr> = (0..16)
        .map_while(|i| Req::new(&format!("d{i}")).sub("pods-b").run(&ipam).ok())
        .map(|r| r.ip())
        .collect();
    assert_eq!(got.len(), 16);
    assert!(got.iter().all(|a| a.to_string().starts_with("10.41.0.")));
    assert!(got.iter().all(|a| match a {
        IpAddr::V4(v4) => (16..32).contains(&v4.octets()[3]),
        IpAddr::V6(_) => false,
    }));
    // Released, its address does not come back while the block is gone.
    assert_eq!(ipam.release(&live.key).unwrap().unwrap().ip(), live.ip());
    assert!(matches!(
        Req::new("more").sub("pods-b").run(&ipam).unwrap_err(),
        IpamError::Exhausted { .. }
    ));
    assert!(ipam.verify().unwrap().is_empty());
    // The block back: its addresses are usable again.
    ipam.apply_topology(two).unwrap();
    assert_eq!(
        Req::new("more").sub("pods-b").run(&ipam).unwrap().ip(),
        ip("10.41.0.32")
    );
}

#[test]
fn topology_removed_subnet_keeps_its_endpoints_releasable() {
    let f = fixture();
    let ipam = open(&f, config());
    let b = Req::new("b").sub("pods-b").run(&ipam).unwrap();
    let mut c = config();
    c.networks[0].subnets.pop();
    let change = ipam.apply_topology(c).unwrap();
    assert_eq!(change.subnets_removed, ["vpc-a/pods-b"]);
    assert_eq!(change.blocks_removed, ["vpc-a/pods-b 10.41.0.16/28"]);
    assert_eq!(ipam.list().unwrap(), vec![b.clone()]);
    assert_eq!(
        Req::new("b").run(&ipam).unwrap(),
        b,
        "a retried ADD still answers"
    );
    let e = Req::new("n").sub("pods-b").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::UnknownSubnet { .. }), "{e}");
    let e = Req::new("n").ip("10.41.0.20").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::OutsideSubnet { .. }), "{e}");
    assert!(!free_counts_names(&ipam).contains(&"vpc-a/pods-b".to_string()));
    assert_eq!(ipam.release(&b.key).unwrap().unwrap(), b);
    assert!(ipam.list().unwrap().is_empty());
    assert!(ipam.verify().unwrap().is_empty());
}

fn free_counts_names(ipam: &Ipam) -> Vec<String> {
    ipam.free_counts()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn topology_network_attributes_and_invalid_updates() {
    let f = fixture();
    let ipam = open(&f, config());
    let a = Req::new("a").run(&ipam).unwrap();
    let mut c = config();
    c.networks[0].routable_cidrs = vec![net("10.0.0.0/8"), net("fd00::/8")];
    c.networks[1].peers = vec!["vpc-a".into()];
    let change = ipam.apply_topology(c.clone()).unwrap();
    assert_eq!(change.networks_changed, ["vpc-a", "vpc-b"]);
    assert!(change.blocks_added.is_empty() && change.subnets_added.is_empty());
    assert_eq!(ipam.network(Some("vpc-a")).unwrap().routable_cidrs.len(), 2);
    assert_eq!(ipam.list().unwrap(), vec![a.clone()], "endpoints untouched");
    // An invalid topology is refused and the one in force stays.
    let mut bad = c.clone();
    bad.networks[1].id = 1;
    let e = ipam.apply_topology(bad).unwrap_err();
    assert!(matches!(e, IpamError::InvalidConfig(_)), "{e}");
    assert_eq!(ipam.config(), c);
    assert_eq!(Req::new("b").run(&ipam).unwrap().ip(), ip("10.40.0.5"));
}

/// A Kubernetes node starts before any VirtualNetwork exists: the store opens, an ADD is told
/// what to create, and the first topology applied is used at once.
#[test]
fn an_empty_topology_opens_and_the_first_network_is_used_live() {
    let f = fixture();
    let ipam = Ipam::open(&f.path, IpamConfig::default(), "n1").unwrap();
    let e = Req::new("a").run(&ipam).unwrap_err();
    assert!(matches!(e, IpamError::NoNetworks), "{e}");
    assert!(e.to_string().contains("create a VirtualNetwork"), "{e}");
    assert!(ipam.free_counts().unwrap().is_empty());
    ipam.apply_topology(config()).unwrap();
    assert_eq!(Req::new("a").run(&ipam).unwrap().ip(), ip("10.40.0.4"));
}

fn adopted(veth: &str, addr: &str) -> Endpoint {
    Endpoint {
        key: AttachmentKey::adopted(veth),
        pod: pod("live"),
        addresses: vec![Assigned {
            ip: ip(addr),
            prefix_len: 24,
            network: "vpc-a".into(),
            subnet: "pods-a".into(),
        }],
        host_veth: veth.into(),
        network_id: 1,
        wiring: None,
        state: Lifecycle::Wired,
        created_unix_ms: 0,
    }
}

#[test]
fn an_adopted_address_is_never_handed_out_and_survives_a_reopen() {
    let f = fixture();
    {
        let ipam = open(&f, config());
        // n1's usable addresses in pods-a are .4-.7: adopt .4 and .5, the scan must skip them.
        assert!(ipam.adopt(&adopted("vpc0000000000a", "10.40.0.4")).unwrap());
        assert!(ipam.adopt(&adopted("vpc0000000000b", "10.40.0.5")).unwrap());
        assert!(AttachmentKey::adopted("vpc0000000000a").is_adopted());
        assert!(!key("a").is_adopted());
    }
    let ipam = open(&f, config());
    let got: Vec<IpAddr> = ["x", "y"]
        .iter()
        .map(|id| Req::new(id).run(&ipam).unwrap().ip())
        .collect();
    assert_eq!(got, [ip("10.40.0.6"), ip("10.40.0.7")]);
    assert!(matches!(
        Req::new("z").run(&ipam),
        Err(IpamError::Exhausted { .. })
    ));
    // A static request for an adopted address names the holder instead of taking it.
    assert!(Req::new("w").ip("10.40.0.4").run(&ipam).is_err());
}

#[test]
fn adopt_refuses_a_held_key_or_address_and_writes_nothing() {
    let f = fixture();
    let ipam = open(&f, config());
    let held = Req::new("a").run(&ipam).unwrap();
    let mut clash = adopted("vpc0000000000a", &held.ip().to_string());
    assert!(!ipam.adopt(&clash).unwrap());
    clash.addresses[0].ip = ip("10.40.0.6");
    assert!(ipam.adopt(&clash).unwrap());
    assert!(!ipam.adopt(&clash).unwrap(), "the key is held now");
    assert_eq!(ipam.list().unwrap().len(), 2);
    assert!(ipam.verify().unwrap().is_empty(), "indexes stay consistent");
    let mut none = adopted("vpc0000000000c", "10.40.0.7");
    none.addresses.clear();
    assert!(ipam.adopt(&none).is_err());
}

#[test]
fn rekey_moves_an_adopted_endpoint_to_the_runtimes_key_once() {
    let f = fixture();
    let ipam = open(&f, config());
    let ep = adopted("vpc0000000000a", "10.40.0.6");
    assert!(ipam.adopt(&ep).unwrap());
    let moved = ipam.rekey(&ep.key, &key("c1")).unwrap().unwrap();
    assert_eq!(
        (moved.key.clone(), moved.ip()),
        (key("c1"), ip("10.40.0.6"))
    );
    assert!(ipam.get(&ep.key).unwrap().is_none());
    assert_eq!(ipam.get(&key("c1")).unwrap().unwrap().ip(), ip("10.40.0.6"));
    assert!(
        ipam.rekey(&ep.key, &key("c2")).unwrap().is_none(),
        "nothing left to move"
    );
    assert!(ipam.verify().unwrap().is_empty());
    // Released under its new key, the address cools down and the index is clean.
    assert!(ipam.release(&key("c1")).unwrap().is_some());
    assert!(ipam.list().unwrap().is_empty());
    assert!(ipam.verify().unwrap().is_empty());
    // A key already holding an endpoint is never overwritten.
    let a = Req::new("a").run(&ipam).unwrap();
    assert!(ipam.adopt(&adopted("vpc0000000000b", "10.40.0.7")).unwrap());
    assert!(
        ipam.rekey(&AttachmentKey::adopted("vpc0000000000b"), &a.key)
            .unwrap()
            .is_none()
    );
    assert_eq!(ipam.list().unwrap().len(), 2);
}
