//! A node whose IPAM store is lost while its pods run (the state directory wiped, the file
//! moved aside) re-adopts the addresses its live pods hold: they keep forwarding, no new pod
//! gets one of them, and each is freed only by its own attachment's DEL.

use std::time::Duration;
use vpcnet_tests::Cluster;
use vpcnet_tests::cni::exec_plugin;
use vpcnet_tests::probe;

#[test]
fn a_node_that_lost_its_store_re_adopts_its_live_pods_and_loses_no_packet() {
    let mut c = Cluster::started(2).unwrap();
    let a = c.add_pod(0, "x", "a").unwrap();
    let b = c.add_pod(0, "x", "b").unwrap();
    let r = c.add_pod(1, "x", "r").unwrap();
    let across = probe::ping_flood(&a.ns, r.ip, 400, Duration::from_millis(10)).unwrap();
    let back = probe::ping_flood(&r.ns, b.ip, 400, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    c.node_mut(0).kill_daemon();
    let db = c.node(0).dir.join("state").join("ipam.redb");
    std::fs::remove_file(&db).unwrap();
    c.node_mut(0).start_daemon().unwrap();

    for (name, ping) in [("a -> r", across), ("r -> b", back)] {
        let out = ping.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) = probe::ping_summary(&text).expect("ping summary");
        assert_eq!(
            (sent, received),
            (400, 400),
            "{name}: no ping lost while the node re-adopted its pods: {text}\n{}",
            c.node(0).log_tail()
        );
    }
    let list = c.node(0).ctl(&["list"]).unwrap();
    for ip in [a.ip, b.ip] {
        assert!(list.contains(&ip.to_string()), "{ip} held again:\n{list}");
    }

    // New pods never get a live pod's address.
    let mut fresh = Vec::new();
    for i in 0..4 {
        let p = c.add_pod(0, "x", &format!("n{i}")).unwrap();
        assert!(p.ip != a.ip && p.ip != b.ip, "{} handed out again", p.ip);
        probe::ping(&r.ns, p.ip).unwrap();
        fresh.push(p);
    }
    probe::ping(&c.vpc_host, a.ip).unwrap();

    // The runtime's CHECK of a re-adopted pod passes: its attachment takes the endpoint over.
    let check = exec_plugin(
        &c.node(0).ns,
        "vpcnet",
        &a.env("CHECK"),
        &a.config_with_prev().to_string(),
    )
    .unwrap();
    check.expect_ok();
    // Its DEL frees exactly its address; b keeps its own.
    let a_ip = a.ip;
    c.del_pod(a).unwrap().expect_ok();
    let list = c.node(0).ctl(&["list"]).unwrap();
    assert!(!list.contains(&a_ip.to_string()), "{a_ip} freed:\n{list}");
    assert!(list.contains(&b.ip.to_string()), "{} kept:\n{list}", b.ip);
    probe::ping(&r.ns, b.ip).unwrap();
}
