//! The CNI plugin and the daemon together, driven exactly as a container runtime drives them.

use serde_json::json;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use vpcnet_tests::cni::{CniEnv, exec_plugin, net_config};
use vpcnet_tests::probe::{self, WhoAmI};
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

fn cluster(nodes: usize) -> Cluster {
    let mut c = Cluster::build(ClusterSpec {
        nodes,
        cooldown_secs: 30,
        dataplane: true,
    })
    .expect("cluster");
    for i in 0..nodes {
        c.node_mut(i).start_daemon().expect("daemon");
    }
    c
}

fn in_block(ip: Ipv4Addr, node: usize) -> bool {
    let o = ip.octets();
    o[0] == 10 && o[1] == 20 && o[2] == node as u8 + 1
}

#[test]
fn add_wires_the_pod_and_pods_reach_each_other() {
    let c = cluster(1);
    let a = c.add_pod(0, "default", "a").unwrap();
    let b = c.add_pod(0, "default", "b").unwrap();
    assert_ne!(a.ip, b.ip);
    assert!(in_block(a.ip, 0) && in_block(b.ip, 0), "{} {}", a.ip, b.ip);

    let addrs =
        a.ns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
    assert!(addrs.contains(&format!("{}/32", a.ip)), "{addrs}");
    let routes = a.ns.ip(&["route", "show"]).unwrap();
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let neigh = a.ns.ip(&["neigh", "show", "169.254.1.1"]).unwrap();
    assert!(
        neigh.contains("ee:ee:ee:ee:ee:ee") && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    let result = &a.result;
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");

    // The node (through the gateway) and the other pod, with source addresses kept.
    probe::ping(&a.ns, c.node(0).ip).unwrap();
    probe::ping(&a.ns, b.ip).unwrap();
    let _srv = WhoAmI::start(&b.ns, SocketAddrV4::new(b.ip, 80)).unwrap();
    assert_eq!(
        probe::tcp(&a.ns, SocketAddrV4::new(b.ip, 80)).unwrap(),
        a.ip
    );
    assert_eq!(
        probe::udp(&a.ns, SocketAddrV4::new(b.ip, 80)).unwrap(),
        a.ip
    );

    // ADD for the same (container, ifname) is not a second address.
    let list = c.node(0).ctl(&["list"]).unwrap();
    assert_eq!(
        list.lines().filter(|l| l.contains("10.20.")).count(),
        2,
        "{list}"
    );
}

#[test]
fn check_passes_then_fails_after_the_address_is_removed() {
    let c = cluster(1);
    let a = c.add_pod(0, "default", "a").unwrap();
    let stdin = a.config_with_prev().to_string();
    let ok = exec_plugin(&c.node(0).ns, "vpcnet", &a.env("CHECK"), &stdin).unwrap();
    assert!(ok.success, "{ok:?}");
    a.ns.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    let bad = exec_plugin(&c.node(0).ns, "vpcnet", &a.env("CHECK"), &stdin).unwrap();
    assert!(!bad.success);
    let err = bad.json().unwrap();
    assert!(err["code"].as_u64().unwrap() > 0, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains(&a.ip.to_string()),
        "{err}"
    );
}

#[test]
fn del_is_idempotent_and_accepts_an_empty_netns() {
    let c = cluster(1);
    let a = c.add_pod(0, "default", "a").unwrap();
    let node = &c.node(0).ns;
    let first = exec_plugin(
        node,
        "vpcnet",
        &a.env("DEL"),
        &a.config_with_prev().to_string(),
    )
    .unwrap();
    assert!(first.success, "{first:?}");
    let again = exec_plugin(
        node,
        "vpcnet",
        &a.env("DEL"),
        &a.config_with_prev().to_string(),
    )
    .unwrap();
    assert!(again.success, "{again:?}");
    // containerd's RemovePodSandbox: no netns, no prevResult.
    let mut env = a.env("DEL");
    env.netns = String::new();
    let bare = exec_plugin(
        node,
        "vpcnet",
        &env,
        &net_config(c.node(0), "1.1.0").to_string(),
    )
    .unwrap();
    assert!(bare.success, "{bare:?}");
    let list = c.node(0).ctl(&["list"]).unwrap();
    assert!(!list.contains(&a.ip.to_string()), "{list}");
    let links = node.ip(&["-o", "link"]).unwrap();
    assert!(!links.contains(": vpc"), "host veth left behind: {links}");
}

#[test]
fn gc_removes_all_but_the_valid_attachments() {
    let c = cluster(1);
    let pods: Vec<_> = (0..4)
        .map(|i| c.add_pod(0, "default", &format!("p{i}")).unwrap())
        .collect();
    let mut config = net_config(c.node(0), "1.1.0");
    config["cni.dev/valid-attachments"] = json!([
        {"containerID": pods[0].container_id, "ifname": "eth0"},
        {"containerID": pods[2].container_id, "ifname": "eth0"},
    ]);
    let env = CniEnv::new("GC", "", "", "");
    let out = exec_plugin(&c.node(0).ns, "vpcnet", &env, &config.to_string()).unwrap();
    assert!(out.success, "{out:?}");
    assert!(
        out.stdout.trim().is_empty(),
        "GC prints nothing on success: {}",
        out.stdout
    );
    let list = c.node(0).ctl(&["list"]).unwrap();
    for (i, p) in pods.iter().enumerate() {
        assert_eq!(
            list.contains(&p.ip.to_string()),
            i == 0 || i == 2,
            "pod {i}: {list}"
        );
    }
    // The collected pods' interfaces are gone too.
    let links = c.node(0).ns.ip(&["-o", "link"]).unwrap();
    assert_eq!(links.matches(": vpc").count(), 2, "{links}");
}

#[test]
fn chained_with_portmap_a_host_port_reaches_the_pod() {
    // eBPF dataplane: the pod's replies to the DNATed flow must go back through the kernel
    // (conntrack's reverse NAT), which the programs learn from the host veth's egress.
    let c = cluster(1);
    let node = &c.node(0).ns;
    let pod_ns = Netns::create(&format!("{}-pm", c.prefix)).unwrap();
    let id = "portmapcontainer01";
    let mut cfg = net_config(c.node(0), "1.0.0");
    cfg["name"] = json!("vpcnet");
    let env = CniEnv::new("ADD", id, &pod_ns.path().to_string_lossy(), "eth0").k8s("default", "pm");
    let first = exec_plugin(node, "vpcnet", &env, &cfg.to_string()).unwrap();
    assert!(first.success, "{first:?}");
    let result = first.json().unwrap();
    let pod_ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let portmap = json!({
        "cniVersion": "1.0.0", "name": "vpcnet", "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
        "prevResult": result,
    });
    let second = exec_plugin(node, "portmap", &env, &portmap.to_string()).unwrap();
    assert!(second.success, "portmap ADD: {second:?}");
    let _srv = WhoAmI::start(&pod_ns, SocketAddrV4::new(pod_ip, 80)).unwrap();
    probe::tcp(&c.vpc_host, SocketAddrV4::new(c.node(0).ip, 8080))
        .expect("host port reaches the pod");
    // DEL in reverse chain order.
    let mut del = env.clone();
    del.command = "DEL".into();
    let mut pm_del = portmap.clone();
    pm_del["prevResult"] = result.clone();
    assert!(
        exec_plugin(node, "portmap", &del, &pm_del.to_string())
            .unwrap()
            .success
    );
    let mut v_del = cfg.clone();
    v_del["prevResult"] = result;
    assert!(
        exec_plugin(node, "vpcnet", &del, &v_del.to_string())
            .unwrap()
            .success
    );
}

#[test]
fn daemon_down_add_fails_del_queues_status_unavailable_and_replay_releases() {
    let mut c = cluster(1);
    let a = c.add_pod(0, "default", "a").unwrap();
    c.node_mut(0).kill_daemon();
    let node = &c.node(0).ns;

    let b_ns = Netns::create(&format!("{}-b", c.prefix)).unwrap();
    let env =
        CniEnv::new("ADD", "cid-b", &b_ns.path().to_string_lossy(), "eth0").k8s("default", "b");
    let add = exec_plugin(
        node,
        "vpcnet",
        &env,
        &net_config(c.node(0), "1.1.0").to_string(),
    )
    .unwrap();
    assert_eq!(add.error_code(), Some(11), "{add:?}");
    assert!(
        add.json().unwrap()["msg"]
            .as_str()
            .unwrap()
            .contains("vpcnetd"),
        "{add:?}"
    );
    let links = node.ip(&["-o", "link"]).unwrap();
    assert_eq!(
        links.matches(": vpc").count(),
        1,
        "a failed ADD leaves nothing behind: {links}"
    );

    let status = exec_plugin(
        node,
        "vpcnet",
        &CniEnv::new("STATUS", "", "", ""),
        &net_config(c.node(0), "1.1.0").to_string(),
    )
    .unwrap();
    assert_eq!(status.error_code(), Some(50), "{status:?}");

    let del = exec_plugin(
        node,
        "vpcnet",
        &a.env("DEL"),
        &a.config_with_prev().to_string(),
    )
    .unwrap();
    assert!(del.success, "{del:?}");
    assert!(
        !node.ip(&["-o", "link"]).unwrap().contains(": vpc"),
        "DEL removes the interface even without the daemon"
    );
    let queued: Vec<_> = std::fs::read_dir(&c.node(0).release_queue)
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(queued.len(), 1, "one queued release");

    c.node_mut(0).start_daemon().unwrap();
    let list = c.node(0).ctl(&["list"]).unwrap();
    assert!(
        !list.contains(&a.ip.to_string()),
        "replayed release: {list}"
    );
    assert_eq!(
        std::fs::read_dir(&c.node(0).release_queue).unwrap().count(),
        0
    );
    let status = exec_plugin(
        &c.node(0).ns,
        "vpcnet",
        &CniEnv::new("STATUS", "", "", ""),
        &net_config(c.node(0), "1.1.0").to_string(),
    )
    .unwrap();
    assert!(status.success, "{status:?}");
}

#[test]
fn bad_input_gets_its_spec_code() {
    let c = cluster(1);
    let node = &c.node(0).ns;
    let pod = Netns::create(&format!("{}-x", c.prefix)).unwrap();
    let path = pod.path().to_string_lossy().into_owned();
    let cfg = net_config(c.node(0), "1.1.0");
    let add = |env: &CniEnv, stdin: &str| exec_plugin(node, "vpcnet", env, stdin).unwrap();

    let garbage = add(&CniEnv::new("ADD", "c1", &path, "eth0"), "{not json");
    assert_eq!(garbage.error_code(), Some(6), "{garbage:?}");
    let mut old = cfg.clone();
    old["cniVersion"] = json!("0.1.0");
    assert_eq!(
        add(&CniEnv::new("ADD", "c1", &path, "eth0"), &old.to_string()).error_code(),
        Some(1)
    );
    let no_if = add(&CniEnv::new("ADD", "c1", &path, ""), &cfg.to_string());
    assert_eq!(no_if.error_code(), Some(4), "{no_if:?}");
    assert!(no_if.stdout.contains("CNI_IFNAME"), "{no_if:?}");
    let mut unknown = CniEnv::new("ADD", "c1", &path, "eth0");
    unknown.args = "FOO=bar".into();
    assert_eq!(add(&unknown, &cfg.to_string()).error_code(), Some(4));
    let no_ns = add(
        &CniEnv::new("ADD", "c1", "/run/netns/does-not-exist", "eth0"),
        &cfg.to_string(),
    );
    assert!(no_ns.error_code().is_some(), "{no_ns:?}");

    // Static addresses: outside the subnet, and taken.
    let mut outside = CniEnv::new("ADD", "c2", &path, "eth0");
    outside.args = "IgnoreUnknown=1;IP=192.0.2.7".into();
    let o = add(&outside, &cfg.to_string());
    assert_eq!(o.error_code(), Some(102), "{o:?}");
    let a = c.add_pod(0, "default", "a").unwrap();
    let mut taken = CniEnv::new("ADD", "c3", &path, "eth0");
    taken.args = format!("IgnoreUnknown=1;IP={}", a.ip);
    let t = add(&taken, &cfg.to_string());
    assert_eq!(t.error_code(), Some(101), "{t:?}");
    assert!(t.stdout.contains("default/a"), "names the holder: {t:?}");
    // A free static address is honoured.
    let mut free = CniEnv::new("ADD", "c4", &path, "eth0");
    free.args = "IgnoreUnknown=1;IP=10.20.1.200".into();
    let f = add(&free, &cfg.to_string());
    assert!(f.success, "{f:?}");
    assert_eq!(f.json().unwrap()["ips"][0]["address"], "10.20.1.200/32");
    // Nothing panics, ever: no backtraces on stderr.
    for out in [&garbage, &no_if, &o, &t] {
        assert!(!out.stderr.contains("panicked"), "{out:?}");
    }
}

#[test]
fn restart_keeps_allocations_and_parallel_adds_get_distinct_addresses() {
    let mut c = cluster(1);
    let pods: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let c = &c;
                s.spawn(move || c.add_pod(0, "default", &format!("q{i}")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let mut ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 16, "16 parallel ADDs, 16 distinct addresses");
    let before = c.node(0).ctl(&["list"]).unwrap();
    c.node_mut(0).kill_daemon();
    c.node_mut(0).start_daemon().unwrap();
    let after = c.node(0).ctl(&["list"]).unwrap();
    assert_eq!(before, after, "a kill -9 forgets nothing");
    let next = c.add_pod(0, "default", "after").unwrap();
    assert!(!ips.contains(&next.ip));
}

#[test]
fn reconcile_releases_an_address_whose_interface_vanished() {
    let c = cluster(1);
    let a = c.add_pod(0, "default", "a").unwrap();
    // The pod namespace disappears without a DEL (node crash, runtime bug): its veth goes with it.
    let ip = a.ip;
    drop(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = c.node(0).ctl(&["list"]).unwrap();
        if !list.contains(&ip.to_string()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not reconciled: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
