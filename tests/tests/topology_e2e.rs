//! The topology changes at runtime: blocks, subnets and routable CIDRs edited in the config are
//! applied by the running daemons — no restart, and running pods never notice.

use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};
use vpcnet_tests::Cluster;
use vpcnet_tests::cluster::{PHYS_CIDR, PHYS_HOST_IP, VPC_CIDR};
use vpcnet_tests::probe::{self, WhoAmI};

/// Rewrites every node's config file with `edit` applied to its `ipam` section, atomically (as a
/// ConfigMap update lands), and waits until each daemon has applied topology `generation`.
fn change_topology(c: &Cluster, generation: u64, edit: impl Fn(&mut Value)) {
    for node in &c.nodes {
        let mut config: Value = serde_json::from_str(&c.daemon_config(node)).unwrap();
        // The edits accumulate: start from what the file holds now.
        let current: Value =
            serde_json::from_str(&std::fs::read_to_string(&node.config_path).unwrap()).unwrap();
        config["ipam"] = current["ipam"].clone();
        edit(&mut config["ipam"]);
        let tmp = node.config_path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        std::fs::rename(&tmp, &node.config_path).unwrap();
    }
    let needle = format!("generation={generation}");
    for node in &c.nodes {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = node.log_tail();
            if log
                .lines()
                .any(|l| l.contains("topology applied") && l.contains(&needle))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: topology {generation} not applied:\n{log}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn main_subnet(ipam: &mut Value) -> &mut Value {
    &mut ipam["networks"][0]["subnets"][0]
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let (net, len): (Ipv4Addr, u32) = (net.parse().unwrap(), len.parse().unwrap());
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

#[test]
fn blocks_subnets_and_routable_cidrs_change_without_a_restart_and_pods_keep_working() {
    let c = Cluster::started(2).unwrap();
    let pids: Vec<_> = (0..2).map(|i| c.node(i).daemon_pid()).collect();
    let a = c.add_pod(0, "x", "a").unwrap();
    let r = c.add_pod(1, "x", "r").unwrap();
    assert!(in_cidr(a.ip, "10.20.1.0/24"), "{}", a.ip);
    // 100 packets/s across the nodes for the whole test.
    let ping = probe::ping_flood(&a.ns, r.ip, 500, Duration::from_millis(10)).unwrap();

    // 1. node1's block is replaced: the old one is gone from the topology, a new one is in.
    change_topology(&c, 2, |ipam| {
        main_subnet(ipam)["blocks"]["node1"] = json!(["10.20.201.0/24"]);
    });
    let b = c.add_pod(0, "x", "b").unwrap();
    assert!(
        in_cidr(b.ip, "10.20.201.0/24"),
        "the next ADD uses the added block, never the removed one: {}",
        b.ip
    );
    for (from, to) in [(&r.ns, a.ip), (&r.ns, b.ip), (&c.vpc_host, a.ip)] {
        probe::ping(from, to).unwrap();
    }
    probe::ping(&c.vpc_host, b.ip).unwrap();
    assert!(
        c.node(0)
            .ctl(&["list"])
            .unwrap()
            .contains(&a.ip.to_string()),
        "the pod in the removed block is still known"
    );

    // 2. A subnet is added to the network, with a block for node1, and chosen by annotation.
    c.apply_manifest(
        "side.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: side, annotations: { vpcnet.io/subnet: side } }\n",
    )
    .unwrap();
    change_topology(&c, 3, |ipam| {
        let subnets = ipam["networks"][0]["subnets"].as_array_mut().unwrap();
        subnets.push(json!({
            "name": "side",
            "cidr": "10.21.0.0/16",
            "blocks": { "node1": ["10.21.1.0/24"] },
        }));
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        // The namespace manifest and the topology arrive independently; retry until both are in.
        match c.add_pod(0, "side", "s") {
            Ok(p) if in_cidr(p.ip, "10.21.1.0/24") => break p,
            Ok(p) => {
                let ip = p.ip;
                c.del_pod(p).unwrap();
                assert!(Instant::now() < deadline, "side pod got {ip}");
            }
            Err(e) => assert!(Instant::now() < deadline, "{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    probe::ping(&s.ns, a.ip).unwrap();
    probe::ping(&a.ns, s.ip).unwrap();

    // 3. Routable CIDRs change: without the physical cloud in them, pods' traffic there is
    // masqueraded; with it back, it keeps the pod's address.
    let port = 9000;
    let _phys = WhoAmI::start(&c.phys_host, SocketAddrV4::new(PHYS_HOST_IP, port)).unwrap();
    let to_phys = SocketAddrV4::new(PHYS_HOST_IP, port);
    assert_eq!(probe::tcp(&a.ns, to_phys).unwrap(), a.ip);
    change_topology(&c, 4, |ipam| {
        ipam["networks"][0]["routable_cidrs"] = json!([VPC_CIDR]);
    });
    assert_eq!(
        probe::tcp(&a.ns, to_phys).unwrap(),
        c.node(0).ip,
        "masqueraded once the physical cloud is no longer routable"
    );
    change_topology(&c, 5, |ipam| {
        ipam["networks"][0]["routable_cidrs"] = json!([VPC_CIDR, PHYS_CIDR]);
    });
    assert_eq!(probe::tcp(&a.ns, to_phys).unwrap(), a.ip);

    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) = probe::ping_summary(&text).expect("ping summary");
    assert_eq!(
        (sent, received),
        (500, 500),
        "no packet lost while the topology changed: {text}"
    );
    let after: Vec<_> = (0..2).map(|i| c.node(i).daemon_pid()).collect();
    assert_eq!(pids, after, "no daemon restarted");
    for p in [a, b, s] {
        assert!(c.del_pod(p).unwrap().success);
    }
}

#[test]
fn an_invalid_topology_change_is_refused_and_the_one_in_force_stays() {
    let c = Cluster::started(1).unwrap();
    let a = c.add_pod(0, "x", "a").unwrap();
    let node = c.node(0);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&node.config_path).unwrap()).unwrap();
    // A block outside its subnet.
    main_subnet(&mut config["ipam"])["blocks"]["node1"] = json!(["10.99.0.0/24"]);
    std::fs::write(&node.config_path, config.to_string()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.log_tail().contains("topology change rejected") {
        assert!(Instant::now() < deadline, "{}", node.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = c.add_pod(0, "x", "b").unwrap();
    assert!(
        in_cidr(b.ip, "10.20.1.0/24"),
        "old topology in force: {}",
        b.ip
    );
    probe::ping(&a.ns, b.ip).unwrap();
}
