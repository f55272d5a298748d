//! Upgrades that change a pinned map's layout: the maps are a projection of the endpoints the
//! store records, rebuilt from them, so forwarding never depends on what an older release left in
//! a map.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vpcnet_tests::Cluster;
use vpcnet_tests::probe;

/// Replaces the pinned `map` with an empty one of another layout, as an older release with a
/// different record would have left it. The programs attached now keep the map they were loaded
/// with (the pin is only a name), so forwarding goes on until the next daemon swaps them.
fn pin_map_of_another_layout(pin_dir: &Path, map: &str, key: u32, value: u32) {
    let pin = pin_dir.join(map);
    std::fs::remove_file(&pin).unwrap();
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "hash",
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", "1024", "name", map])
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_upgrade_that_changes_the_endpoint_map_layout_loses_no_packet() {
    let mut c = Cluster::started(2).unwrap();
    let a = c.add_pod(0, "x", "a").unwrap();
    let b = c.add_pod(0, "x", "b").unwrap();
    let r = c.add_pod(1, "x", "r").unwrap();
    // 100 packets/s, across nodes and on one node, through the upgrade of both daemons.
    let across = probe::ping_flood(&a.ns, r.ip, 400, Duration::from_millis(10)).unwrap();
    let local = probe::ping_flood(&b.ns, a.ip, 400, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..2 {
        c.node_mut(i).stop_daemon();
        let pins = c.node(i).bpf_dir.clone();
        // A record grown by a field: another value size, and another key size for good measure.
        pin_map_of_another_layout(&pins, "ENDPOINTS", 4, 64);
        c.node_mut(i).start_daemon().unwrap();
    }
    for (name, ping) in [("a -> r", across), ("b -> a", local)] {
        let out = ping.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) = probe::ping_summary(&text).expect("ping summary");
        assert_eq!(
            (sent, received),
            (400, 400),
            "{name}: no ping lost across an upgrade that changed the endpoint map: {text}\n{}",
            c.node(0).log_tail()
        );
    }
    // And the map is whole again: every pod reachable from the VPC, new pods work.
    for ip in [a.ip, b.ip] {
        probe::ping(&c.vpc_host, ip).unwrap();
    }
    probe::ping(&c.vpc_host, r.ip).unwrap();
    let n = c.add_pod(0, "x", "n").unwrap();
    probe::ping(&r.ns, n.ip).unwrap();
}
