//! The maps as a projection of the endpoint list (an upgrade that changes a map's layout keeps
//! every pod forwarding) and a live topology change, on the shared fixture (root only).

mod common;
use common::*;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData, MapInfo};
use vpcnet_dataplane::{AttachMode, Dataplane, Endpoint, PolicyMode, StartOptions};
use vpcnet_ipam::SubnetConfig;

/// What an older release would have left: an `ENDPOINTS` hash map whose records are 4 bytes
/// longer than this build's (a field appended), holding `eps` and pinned at `pin`.
fn pin_endpoints_of_another_layout(pin: &Path, eps: &[Endpoint]) {
    let layout = vpcnet_dataplane::MAP_LAYOUTS[0];
    assert_eq!(layout.name, "ENDPOINTS");
    let value_size = layout.value_size + 4;
    let entries: Vec<(Vec<u8>, Vec<u8>)> = eps
        .iter()
        .map(|ep| {
            let mut value = vec![0xa5u8; value_size];
            value[0..4].copy_from_slice(&ep.host_ifindex.to_ne_bytes());
            value[4..10].copy_from_slice(&ep.pod_mac);
            value[10..12].copy_from_slice(&ep.network_id.to_ne_bytes());
            (ep.ip.octets().to_vec(), value)
        })
        .collect();
    replace_pin_with_hash_map(pin, 4, value_size, layout.max_entries, &entries);
}

/// The records the pinned `ENDPOINTS` map holds, read through its own handle.
fn pinned_ips(pin: &Path) -> Vec<Ipv4Addr> {
    let map = Map::HashMap(MapData::from_pin(pin).expect("ENDPOINTS pin"));
    let eps: HashMap<_, u32, vpcnet_common::EndpointInfo> = HashMap::try_from(&map).unwrap();
    let mut ips: Vec<Ipv4Addr> = eps
        .keys()
        .map(|k| Ipv4Addr::from(k.unwrap().to_ne_bytes()))
        .collect();
    ips.sort();
    ips
}

/// An upgrade whose `ENDPOINTS` record has another layout: the pin is recreated, refilled from
/// the caller's endpoint list and every host veth moved to the new programs, with no packet
/// lost at 100 pps between two pods of the node and from the VPC into one of them.
#[test]
fn upgrade_with_a_changed_endpoint_layout_loses_nothing() {
    require_root();
    let _serial = serial();
    let mut ph = Phases::new();
    let Started {
        topo,
        eps,
        dp1,
        dp2,
    } = Started::new();
    topo.pings(&[("p1", P2, true), ("vpc", P1, true)]);
    let pin_dir = topo.pin_dir("node1");
    let pin = pin_dir.join("ENDPOINTS");
    let listed = vec![eps["p1"].clone(), eps["p2"].clone(), eps["p4"].clone()];
    ph.done("started");

    // The previous daemon exits; its programs keep forwarding from their links.
    drop(dp1);
    pin_endpoints_of_another_layout(&pin, &listed);
    let info = MapInfo::from_pin(&pin).unwrap();
    assert_ne!(
        info.value_size() as usize,
        vpcnet_dataplane::MAP_LAYOUTS[0].value_size
    );
    // The records still say which pod lives where, whatever their length.
    let salvaged = in_ns(&topo.ns("n1"), || {
        vpcnet_dataplane::pinned_endpoints(&pin_dir).unwrap()
    });
    assert_eq!(salvaged, listed, "records read across layouts");

    let a = flood(&topo, "p1", P2, 300);
    let b = flood(&topo, "vpc", P1, 300);
    std::thread::sleep(Duration::from_millis(700));
    let cfg = topo.config("node1");
    let eps_for_start = listed.clone();
    let (dp1, report) = in_ns(&topo.ns("n1"), move || {
        Dataplane::start_restoring(
            cfg,
            StartOptions {
                endpoint_attach: AttachMode::Tcx,
                policy: PolicyMode::Open,
            },
            &eps_for_start,
        )
        .expect("start after the upgrade")
    });
    assert_no_loss("p1 -> p2", a, 300);
    assert_no_loss("vpc -> p1", b, 300);
    ph.done("upgrade under load");
    assert_eq!(report.recreated_maps, vec!["ENDPOINTS"]);
    assert_eq!(report.written, vec![P1, P2, P4], "{report:?}");
    assert!(
        report.removed.is_empty() && report.skipped.is_empty(),
        "{report:?}"
    );
    let info = MapInfo::from_pin(&pin).unwrap();
    assert_eq!(
        info.value_size() as usize,
        vpcnet_dataplane::MAP_LAYOUTS[0].value_size,
        "the pin has this build's layout"
    );
    assert_eq!(pinned_ips(&pin), vec![P1, P2, P4]);
    assert_eq!(dp1.endpoints().unwrap(), listed);
    topo.pings(&[("p1", P3, true), ("p3", P2, true), ("p4", P1, false)]);

    // The programs on the host veths read the new map: a record deleted from it behind the
    // dataplane's back stops p2's traffic, and a restore from the list brings it back.
    {
        let mut map = Map::HashMap(MapData::from_pin(&pin).unwrap());
        let mut m: HashMap<_, u32, vpcnet_common::EndpointInfo> =
            HashMap::try_from(&mut map).unwrap();
        m.remove(&u32::from_ne_bytes(P2.octets())).unwrap();
    }
    topo.pings(&[("p1", P2, false)]);
    let report = in_ns(&topo.ns("n1"), || dp1.restore_endpoints(&listed).unwrap());
    assert_eq!(report.written, vec![P2], "{report:?}");
    assert_eq!(report.kept, vec![P1, P4], "{report:?}");
    topo.pings(&[("p1", P2, true)]);

    // An endpoint the list no longer has goes, with its links.
    let report = in_ns(&topo.ns("n1"), || {
        dp1.restore_endpoints(&listed[..1]).unwrap()
    });
    assert_eq!(report.removed, vec![P2, P4], "{report:?}");
    assert!(!pin_dir.join("link_ep_10_20_1_11").exists());
    assert_eq!(pinned_ips(&pin), vec![P1]);
    topo.pings(&[("p1", P2, false), ("vpc", P1, true)]);
    ph.done("restore from the list");
    drop((dp1, dp2));
}

/// The same upgrade on a node that enforces NetworkPolicy: a recreated record's policy bits are
/// the policy's, which the old record's layout does not tell, so they are written by the first
/// policy sync, and the programs are swapped only after it. Until then the previous programs
/// forward with the previous maps; swapping at start denied every pod (`policy-ingress` /
/// `policy-egress`) until that sync, a ping or two at 100 pps across a daemon upgrade.
#[test]
fn an_enforcing_upgrade_with_a_changed_endpoint_layout_swaps_after_the_policy_sync() {
    require_root();
    let _serial = serial();
    let Started {
        topo,
        eps,
        dp1,
        dp2,
    } = Started::new();
    let n1 = topo.ns("n1");
    let pin_dir = topo.pin_dir("node1");
    let pin = pin_dir.join("ENDPOINTS");
    let listed = vec![eps["p1"].clone(), eps["p2"].clone(), eps["p4"].clone()];
    let enforce = StartOptions {
        endpoint_attach: AttachMode::Tcx,
        policy: PolicyMode::Enforce,
    };
    let start = |listed: &[Endpoint]| {
        let cfg = topo.config("node1");
        let listed = listed.to_vec();
        in_ns(&n1, move || {
            Dataplane::start_restoring(cfg, enforce, &listed).expect("start enforcing")
        })
    };

    // node1 enforcing, with the records' bits as no policy sets them (open): what it enforces.
    drop(dp1);
    let (dp1, report) = start(&listed);
    assert!(report.recreated_maps.is_empty(), "{report:?}");
    let enforced = dp1.applied_policy().clone();
    assert_eq!(enforced.endpoints.len(), listed.len());
    assert!(
        enforced
            .endpoints
            .values()
            .all(|e| !e.ingress.isolated && !e.egress.isolated),
        "{enforced:?}"
    );
    topo.pings(&[("p1", P2, true), ("vpc", P1, true)]);

    drop(dp1);
    pin_endpoints_of_another_layout(&pin, &listed);
    let a = flood(&topo, "p1", P2, 300);
    let b = flood(&topo, "vpc", P1, 300);
    std::thread::sleep(Duration::from_millis(700));
    let (dp1, report) = start(&listed);
    assert_eq!(report.recreated_maps, vec!["ENDPOINTS"]);
    // Before the policy sync: the records are closed, and traffic still flows.
    assert!(
        policy_bits(&pin).values().all(|b| *b == 0),
        "closed until the sync"
    );
    topo.pings(&[("p1", P2, true), ("vpc", P1, true)]);
    std::thread::sleep(Duration::from_millis(300));
    in_ns(&n1, || dp1.sync_policy(&enforced)).expect("the first policy sync");
    assert_no_loss("p1 -> p2", a, 300);
    assert_no_loss("vpc -> p1", b, 300);
    assert!(
        policy_bits(&pin)
            .values()
            .all(|b| *b == vpcnet_common::POLICY_OPEN),
        "the sync wrote the bits"
    );

    // The programs read the new map now: a record deleted from it stops p2's traffic.
    {
        let mut map = Map::HashMap(MapData::from_pin(&pin).unwrap());
        let mut m: HashMap<_, u32, vpcnet_common::EndpointInfo> =
            HashMap::try_from(&mut map).unwrap();
        m.remove(&u32::from_ne_bytes(P2.octets())).unwrap();
    }
    topo.pings(&[("p1", P2, false), ("vpc", P1, true)]);
    let report = in_ns(&n1, || dp1.restore_endpoints(&listed).unwrap());
    assert_eq!(report.written, vec![P2], "{report:?}");
    topo.pings(&[("p1", P2, true)]);
    drop((dp1, dp2));
}

/// The policy bits of every record the pinned `ENDPOINTS` map holds.
fn policy_bits(pin: &Path) -> std::collections::BTreeMap<Ipv4Addr, u32> {
    let map = Map::HashMap(MapData::from_pin(pin).expect("ENDPOINTS pin"));
    let eps: HashMap<_, u32, vpcnet_common::EndpointInfo> = HashMap::try_from(&map).unwrap();
    eps.iter()
        .map(|r| {
            let (k, v) = r.unwrap();
            (Ipv4Addr::from(k.to_ne_bytes()), v.policy)
        })
        .collect()
}

/// A topology change applied live: peering two networks, a new subnet with a block of this node,
/// and a routable CIDR removed take effect at once, while pods keep forwarding without loss.
#[test]
fn topology_changes_apply_live() {
    require_root();
    let _serial = serial();
    let mut ph = Phases::new();
    let s = Started::new();
    let (topo, dp1) = (&s.topo, &s.dp1);
    let n1 = topo.ns("n1");
    topo.pings(&[("p1", P4, false), ("p4", P1, false)]);
    assert_eq!(
        topo.peer_seen("phy", PHY_HOST, "p1"),
        P1,
        "routable: no SNAT"
    );
    ph.done("started");

    let mut cfg = topo.config("node1");
    // vpc-a peers vpc-b; vpc-a gets a new subnet with a block on node1; 10.30.0.0/24 (the
    // physical cloud) is no longer routable for vpc-a, so its traffic there is masqueraded.
    cfg.networks[0].peers = vec!["vpc-b".into()];
    cfg.networks[0]
        .routable_cidrs
        .retain(|c| *c != "10.30.0.0/24".parse().unwrap());
    cfg.networks[0].subnets.push(SubnetConfig {
        name: "extra".into(),
        cidr: "10.50.0.0/24".parse().unwrap(),
        gateway: None,
        reserved: vec![],
        blocks: [("node1".to_string(), vec!["10.50.0.0/26".parse().unwrap()])].into(),
    });
    cfg.local_pod_cidrs.push("10.50.0.0/26".parse().unwrap());

    let a = flood(topo, "p1", P2, 300);
    let b = flood(topo, "p1", P3, 300);
    std::thread::sleep(Duration::from_millis(500));
    in_ns(&n1, || {
        dp1.apply_topology(&cfg.networks, &cfg.local_pod_cidrs)
            .expect("apply_topology")
    });
    assert_no_loss("p1 -> p2 across the change", a, 300);
    assert_no_loss("p1 -> p3 across the change", b, 300);
    ph.done("applied under load");

    topo.pings(&[("p1", P4, true), ("p4", P1, true), ("p1", P2, true)]);
    assert_eq!(
        topo.peer_seen("phy", PHY_HOST, "p1"),
        NODE1,
        "no longer routable: masqueraded"
    );
    // A pod in the new block.
    const P5: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 10);
    let mut s = s;
    let p5 = s.topo.pod("p5", "n1", P5, [2, 0, 0, 0, 5, 10], 1);
    in_ns(&n1, || s.dp1.add_endpoint(&p5).expect("add p5"));
    s.topo.pings(&[("p1", P5, true), ("p5", P1, true)]);
    assert_eq!(
        s.topo.guard_drops("n1"),
        0,
        "nothing went through the kernel"
    );

    // And back: the original topology isolates vpc-b again.
    let orig = s.topo.config("node1");
    in_ns(&n1, || {
        s.dp1
            .apply_topology(&orig.networks, &orig.local_pod_cidrs)
            .expect("apply_topology back")
    });
    s.topo.pings(&[("p1", P4, false), ("p1", P2, true)]);
    assert_eq!(s.topo.peer_seen("phy", PHY_HOST, "p1"), P1);
    ph.done("new block, and back");
}
