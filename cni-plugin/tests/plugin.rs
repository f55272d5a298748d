//! The plugin binary, run as a runtime runs it, inside namespaces owned by each test, against a fake
//! vpcnetd. Needs root (it creates network namespaces).

mod common;

use common::*;
use serde_json::{Value, json};
use vpcnet_api::{RequestBody, code};

fn host_veth(result: &Value) -> String {
    result["interfaces"][0]["name"]
        .as_str()
        .expect("host veth in result")
        .to_string()
}

#[test]
fn version_lists_supported_versions() {
    let node = netns("n");
    let out = run_plugin(PLUGIN, &node, &[("CNI_COMMAND", "VERSION")], "");
    out.expect_ok();
    let v = out.json().unwrap();
    let versions: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(versions, ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    assert!(v["cniVersion"].is_string());
    // podman sends a config with VERSION; it must not matter.
    let out = run_plugin(
        PLUGIN,
        &node,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"0.4.0"}"#,
    );
    out.expect_ok();
}

#[test]
fn add_wires_the_pod_then_check_then_del_twice() {
    let f = Fixture::new();
    let out = f.add("c0ffee01", "1.1.0");
    out.expect_ok();
    assert!(
        out.stderr.is_empty(),
        "stderr must stay quiet: {}",
        out.stderr
    );
    let r = out.json().unwrap();
    let veth = host_veth(&r);
    assert_eq!(r["cniVersion"], "1.1.0");
    assert!(veth.starts_with("vpc") && veth.len() <= 15, "{veth}");
    assert_eq!(r["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], f.pod.path_string());
    assert_eq!(r["interfaces"][1]["mtu"], 1450);
    assert_eq!(r["ips"][0]["address"], "10.77.0.10/32");
    assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(r["ips"][0]["interface"], 1);
    assert!(r["ips"][0].get("version").is_none());
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(r["routes"][0]["gw"], "169.254.1.1");

    // Pod side.
    let link = f.pod.ip(&["-d", "link", "show", "dev", "eth0"]).unwrap();
    assert!(link.contains("mtu 1450"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let pod_mac = r["interfaces"][1]["mac"].as_str().unwrap();
    assert!(link.contains(pod_mac), "{link}");
    let addr = f.pod.ip(&["-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains("inet 10.77.0.10/32"), "{addr}");
    let routes = f.pod.ip(&["-4", "route", "show"]).unwrap();
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(routes.contains("169.254.1.1 dev eth0"), "{routes}");
    assert!(routes.contains("scope link"), "{routes}");
    let neigh = f.pod.ip(&["-4", "neigh", "show", "dev", "eth0"]).unwrap();
    assert!(
        neigh.contains("169.254.1.1 lladdr ee:ee:ee:ee:ee:ee PERMANENT"),
        "{neigh}"
    );
    let dad = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/accept_dad").is_ok();
    if dad {
        let out = f
            .pod
            .command("cat")
            .unwrap()
            .arg("/proc/sys/net/ipv6/conf/eth0/accept_dad")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }

    // Node side.
    let hl = f.node.ip(&["link", "show", "dev", &veth]).unwrap();
    assert!(hl.contains("ee:ee:ee:ee:ee:ee"), "{hl}");
    assert!(hl.contains("UP"), "{hl}");
    assert!(hl.contains("mtu 1450"), "{hl}");
    let nroutes = f.node.ip(&["-4", "route", "show"]).unwrap();
    assert!(
        nroutes.contains(&format!("10.77.0.10 dev {veth}")) && nroutes.contains("scope link"),
        "{nroutes}"
    );

    // The daemon saw the allocation and the endpoint with the real ifindex.
    let reqs = f.daemon.requests();
    let RequestBody::Allocate(alloc) = &reqs[0] else {
        panic!("{reqs:?}")
    };
    assert_eq!(alloc.key.container_id, "c0ffee01");
    assert_eq!(alloc.key.ifname, "eth0");
    assert_eq!(alloc.pod.namespace, "default");
    assert_eq!(alloc.pod.name, "web-0");
    assert_eq!(alloc.pod.uid, "uid-1");
    assert_eq!(alloc.host_veth, veth);
    assert_eq!(alloc.netns, f.pod.path_string());
    let RequestBody::EndpointReady(ready) = &reqs[1] else {
        panic!("{reqs:?}")
    };
    let ifindex: u32 = hl.split(':').next().unwrap().trim().parse().unwrap();
    assert_eq!(ready.host_ifindex, ifindex);
    assert_eq!(ready.host_veth, veth);
    assert_eq!(
        ready.ips,
        ["10.77.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        ready
            .pod_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        pod_mac
    );

    // Traffic between the node namespace and the pod, over the veth only.
    f.node
        .ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"])
        .unwrap();
    let ping = f
        .node
        .command("ping")
        .unwrap()
        .args(["-c", "1", "-W", "2", "10.77.0.10"])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "node -> pod ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let ping = f
        .pod
        .command("ping")
        .unwrap()
        .args(["-c", "1", "-W", "2", "192.0.2.1"])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "pod -> node ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // CHECK passes on the fresh attachment...
    let conf_with_prev = f.conf("1.1.0", json!({ "prevResult": r }));
    f.run(&f.env("CHECK", "c0ffee01"), &conf_with_prev)
        .expect_ok();
    assert!(matches!(
        f.daemon.requests().last(),
        Some(RequestBody::Check(_))
    ));
    // ...and names what broke once the address is gone.
    f.pod.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    let msg = f
        .run(&f.env("CHECK", "c0ffee01"), &conf_with_prev)
        .expect_error(code::CHECK_FAILED as u64);
    assert!(msg.contains("10.77.0.10/32"), "{msg}");
    // CHECK without prevResult is a config error.
    f.run(&f.env("CHECK", "c0ffee01"), &f.conf("1.1.0", Value::Null))
        .expect_error(code::INVALID_CONFIG as u64);

    // DEL removes both ends and releases; a second DEL is still fine.
    f.daemon.clear_requests();
    f.run(&f.env("DEL", "c0ffee01"), &conf_with_prev)
        .expect_ok();
    assert!(!f.node.has_link(&veth));
    assert!(!f.pod.has_link("eth0"));
    let nroutes = f.node.ip(&["-4", "route", "show"]).unwrap();
    assert!(!nroutes.contains("10.77.0.10"), "{nroutes}");
    f.run(&f.env("DEL", "c0ffee01"), &conf_with_prev)
        .expect_ok();
    let releases = f
        .daemon
        .requests()
        .iter()
        .filter(|r| matches!(r, RequestBody::Release { .. }))
        .count();
    assert_eq!(releases, 2);
    assert_eq!(f.daemon.allocations(), 0);
}

#[test]
fn check_fails_on_missing_route_neighbour_and_daemon_error() {
    let f = Fixture::new();
    let r = f.add("c0ffee02", "1.0.0").expect_ok().json().unwrap();
    let conf = f.conf("1.0.0", json!({ "prevResult": r }));
    f.run(&f.env("CHECK", "c0ffee02"), &conf).expect_ok();

    f.pod
        .ip(&["neigh", "del", "169.254.1.1", "dev", "eth0"])
        .unwrap();
    f.pod.ip(&["route", "del", "default"]).unwrap();
    let msg = f
        .run(&f.env("CHECK", "c0ffee02"), &conf)
        .expect_error(code::CHECK_FAILED as u64);
    assert!(msg.contains("default route"), "{msg}");
    assert!(msg.contains("neighbour"), "{msg}");

    f.pod
        .ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])
        .unwrap();
    f.pod
        .ip(&[
            "neigh",
            "add",
            "169.254.1.1",
            "lladdr",
            "ee:ee:ee:ee:ee:ee",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
        .unwrap();
    f.run(&f.env("CHECK", "c0ffee02"), &conf).expect_ok();

    // The daemon's own verdict is passed through untouched.
    f.daemon.set(|b| {
        b.check_error = Some(vpcnet_api::ApiError::new(
            code::CHECK_FAILED,
            "no allocation for this key",
        ))
    });
    let msg = f
        .run(&f.env("CHECK", "c0ffee02"), &conf)
        .expect_error(code::CHECK_FAILED as u64);
    assert_eq!(msg, "no allocation for this key");
}

#[test]
fn del_with_empty_netns_and_no_prev_result() {
    let f = Fixture::new();
    let r = f.add("c0ffee03", "1.0.0").expect_ok().json().unwrap();
    let veth = host_veth(&r);
    // containerd's RemovePodSandbox DEL: no namespace, no prevResult.
    let mut vars = f.env("DEL", "c0ffee03");
    set_var(&mut vars, "CNI_NETNS", "");
    f.run(&vars, &f.conf("1.0.0", Value::Null)).expect_ok();
    assert!(!f.node.has_link(&veth));
    remove_var(&mut vars, "CNI_NETNS");
    f.run(&vars, &f.conf("1.0.0", Value::Null)).expect_ok();
    // DEL of something that never existed.
    f.run(&f.env("DEL", "neverexisted"), &f.conf("1.0.0", Value::Null))
        .expect_ok();
}

#[test]
fn del_with_daemon_down_queues_the_release() {
    let mut f = Fixture::new();
    let r = f.add("c0ffee04", "1.0.0").expect_ok().json().unwrap();
    let veth = host_veth(&r);
    f.daemon.stop();
    let out = f.run(
        &f.env("DEL", "c0ffee04"),
        &f.conf("1.0.0", json!({ "prevResult": r })),
    );
    out.expect_ok();
    assert!(out.stdout.trim().is_empty(), "{out:?}");
    assert!(!f.node.has_link(&veth));
    assert!(!f.pod.has_link("eth0"));
    let q = f.queue_dir();
    let meta = std::fs::metadata(&q).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let entries: Vec<_> = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let key = vpcnet_api::AttachmentKey {
        container_id: "c0ffee04".into(),
        ifname: "eth0".into(),
    };
    assert_eq!(entries, vec![vpcnet_api::release_queue::file_name(&key)]);
    let entry =
        vpcnet_api::release_queue::read(&vpcnet_api::release_queue::path_for(&q, &key)).unwrap();
    assert_eq!(entry.key, key);
    // The address from prevResult, so a replay can never release another allocation of the key.
    let ip: std::net::IpAddr = r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(entry.ip, Some(ip));
}

#[test]
fn del_returns_daemon_errors() {
    let f = Fixture::new();
    let r = f.add("c0ffee05", "1.0.0").expect_ok().json().unwrap();
    f.daemon.set(|b| {
        b.release_error = Some(vpcnet_api::ApiError::new(
            code::INTERNAL,
            "store is read-only",
        ))
    });
    let msg = f
        .run(
            &f.env("DEL", "c0ffee05"),
            &f.conf("1.0.0", json!({ "prevResult": r })),
        )
        .expect_error(code::INTERNAL as u64);
    assert_eq!(msg, "store is read-only");
    // The interface is gone regardless; the runtime's retry only has the release left to do.
    assert!(!f.node.has_link(&host_veth(&r)));
}

#[test]
fn add_with_daemon_down_is_try_again_later() {
    let mut f = Fixture::new();
    f.daemon.stop();
    let out = f.add("c0ffee06", "1.0.0");
    let msg = out.expect_error(code::TRY_AGAIN_LATER as u64);
    assert!(msg.contains("vpcnetd is not reachable at"), "{msg}");
    assert!(
        msg.contains(&f.daemon.socket.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("DaemonSet"), "{msg}");
    assert_eq!(out.json().unwrap()["cniVersion"], "1.0.0");
    assert!(!f.pod.has_link("eth0"));
    let links = f.node.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("vpc"), "{links}");
}

#[test]
fn add_failure_after_allocate_rolls_back_and_reports_the_original_error() {
    let f = Fixture::with(Behavior {
        endpoint_ready_error: Some(vpcnet_api::ApiError::new(
            code::DATAPLANE,
            "cannot attach the eBPF program",
        )),
        ..Behavior::default()
    });
    let out = f.add("c0ffee07", "1.0.0");
    let msg = out.expect_error(code::DATAPLANE as u64);
    assert_eq!(msg, "cannot attach the eBPF program");
    assert!(!f.pod.has_link("eth0"));
    let links = f.node.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("vpc"), "{links}");
    assert!(matches!(
        f.daemon.requests().last(),
        Some(RequestBody::Release { .. })
    ));
    assert_eq!(f.daemon.allocations(), 0);
}

#[test]
fn an_ipv6_address_in_the_allocation_is_a_clear_error_not_dropped() {
    let f = Fixture::with(Behavior {
        also_v6: Some("fd00:77::10".parse().unwrap()),
        ..Behavior::default()
    });
    let out = f.add("c0ffee1d", "1.0.0");
    let msg = out.expect_error(code::INVALID_CONFIG as u64);
    assert!(msg.contains("fd00:77::10"), "{msg}");
    assert!(msg.contains("IPv4 pods only"), "{msg}");
    // Nothing half-configured stays behind, and the allocation is handed back.
    assert!(!f.pod.has_link("eth0"));
    let links = f.node.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("vpc"), "{links}");
    assert_eq!(f.daemon.allocations(), 0);
}

#[test]
fn add_replaces_a_stale_host_veth() {
    let f = Fixture::new();
    let r = f.add("c0ffee08", "1.0.0").expect_ok().json().unwrap();
    let veth = host_veth(&r);
    f.run(&f.env("DEL", "c0ffee08"), &f.conf("1.0.0", Value::Null))
        .expect_ok();
    // What an ADD that died half-way leaves: a link with the attachment's host veth name, here with
    // its peer in the node namespace too.
    f.node
        .ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "stalepeer",
        ])
        .unwrap();
    let r2 = f.add("c0ffee08", "1.0.0").expect_ok().json().unwrap();
    assert_eq!(host_veth(&r2), veth);
    assert!(!f.node.has_link("stalepeer"), "the stale pair was removed");
    assert!(f.pod.has_link("eth0"));
}

#[test]
fn add_with_existing_pod_interface_fails_cleanly() {
    let f = Fixture::new();
    f.pod
        .ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
        ])
        .unwrap();
    let msg = f.add("c0ffee09", "1.0.0").expect_error(code::IO as u64);
    assert!(msg.contains("eth0 already exists"), "{msg}");
    let links = f.node.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("vpc"), "{links}");
    assert_eq!(f.daemon.allocations(), 0, "rolled back");
}

#[test]
fn static_ip_and_mac_from_capabilities_and_args() {
    let f = Fixture::new();
    let conf = f.conf(
        "1.0.0",
        json!({
            "capabilities": {"ips": true, "mac": true},
            "runtimeConfig": {"ips": ["10.77.3.4/24"], "mac": "02:42:ac:11:00:09"}
        }),
    );
    let r = f
        .run(&f.env("ADD", "c0ffee10"), &conf)
        .expect_ok()
        .json()
        .unwrap();
    assert_eq!(r["ips"][0]["address"], "10.77.3.4/32");
    assert_eq!(r["interfaces"][1]["mac"], "02:42:ac:11:00:09");
    let link = f.pod.ip(&["link", "show", "dev", "eth0"]).unwrap();
    assert!(link.contains("02:42:ac:11:00:09"), "{link}");
    let RequestBody::Allocate(a) = &f.daemon.requests()[0] else {
        panic!()
    };
    assert_eq!(
        a.static_ips,
        vec!["10.77.3.4".parse::<std::net::Ipv4Addr>().unwrap()]
    );

    // podman's --ip/--mac-address arrive as CNI_ARGS.
    let pod2 = netns("p");
    let mut vars = f.env("ADD", "c0ffee11");
    set_var(&mut vars, "CNI_NETNS", &pod2.path_string());
    set_var(
        &mut vars,
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.77.5.6;MAC=02:00:00:00:00:42",
    );
    let r = f
        .run(&vars, &f.conf("1.0.0", Value::Null))
        .expect_ok()
        .json()
        .unwrap();
    assert_eq!(r["ips"][0]["address"], "10.77.5.6/32");
    assert_eq!(r["interfaces"][1]["mac"], "02:00:00:00:00:42");
}

#[test]
fn old_result_versions_carry_ip_version() {
    for version in ["0.3.0", "0.3.1", "0.4.0"] {
        let f = Fixture::new();
        let r = f.add("c0ffee12", version).expect_ok().json().unwrap();
        assert_eq!(r["cniVersion"], version);
        assert_eq!(r["ips"][0]["version"], "4", "{version}");
        assert!(r["interfaces"][1].get("mtu").is_none());
    }
}

#[test]
fn config_mtu_overrides_the_daemon() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", json!({"mtu": 1300}));
    f.run(&f.env("ADD", "c0ffee13"), &conf).expect_ok();
    let link = f.pod.ip(&["link", "show", "dev", "eth0"]).unwrap();
    assert!(link.contains("mtu 1300"), "{link}");
}

#[test]
fn gc_removes_released_attachments_only() {
    let f = Fixture::new();
    let keep = f.add("keep0001", "1.1.0").expect_ok().json().unwrap();
    let mut vars = f.env("ADD", "gone0001");
    set_var(&mut vars, "CNI_IFNAME", "eth1");
    let gone = f
        .run(&vars, &f.conf("1.1.0", Value::Null))
        .expect_ok()
        .json()
        .unwrap();
    let (keep_veth, gone_veth) = (host_veth(&keep), host_veth(&gone));
    assert_ne!(keep_veth, gone_veth);

    let conf = f.conf(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "keep0001", "ifname": "eth0"}]}),
    );
    let out = f.run(&[("CNI_COMMAND", "GC".to_string())], &conf);
    out.expect_ok();
    assert!(out.stdout.trim().is_empty(), "{out:?}");
    assert!(f.node.has_link(&keep_veth));
    assert!(!f.node.has_link(&gone_veth));
    assert!(f.pod.has_link("eth0"));
    assert!(!f.pod.has_link("eth1"));
    let Some(RequestBody::Gc(gc)) = f.daemon.requests().last().cloned() else {
        panic!()
    };
    assert_eq!(gc.valid.len(), 1);
    assert_eq!(gc.valid[0].container_id, "keep0001");

    // Without the list GC must refuse rather than release everything.
    f.run(
        &[("CNI_COMMAND", "GC".to_string())],
        &f.conf("1.1.0", Value::Null),
    )
    .expect_error(code::INVALID_CONFIG as u64);
    assert!(f.node.has_link(&keep_veth));
}

#[test]
fn status_reports_daemon_health() {
    let mut f = Fixture::new();
    let status = [("CNI_COMMAND", "STATUS".to_string())];
    let out = f.run(&status, &f.conf("1.1.0", Value::Null));
    out.expect_ok();
    assert!(out.stdout.trim().is_empty());

    f.daemon.set(|b| b.ready = false);
    let msg = f
        .run(&status, &f.conf("1.1.0", Value::Null))
        .expect_error(code::UNAVAILABLE as u64);
    assert!(
        msg.contains("not ready") && msg.contains("ENI not attached yet"),
        "{msg}"
    );

    f.daemon.stop();
    let msg = f
        .run(&status, &f.conf("1.1.0", Value::Null))
        .expect_error(code::UNAVAILABLE as u64);
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(
        msg.contains(&f.daemon.socket.display().to_string()),
        "{msg}"
    );
}

#[test]
fn input_errors_are_spec_errors() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", Value::Null);

    let out = f.run(&f.env("ADD", "c0ffee20"), "this is not json");
    out.expect_error(code::DECODE as u64);
    assert!(!out.stderr.contains("panicked"), "{out:?}");

    let msg = f
        .run(
            &f.env("ADD", "c0ffee20"),
            r#"{"cniVersion":"0.2.0","name":"x"}"#,
        )
        .expect_error(code::INCOMPATIBLE_VERSION as u64);
    assert!(msg.contains("0.2.0"), "{msg}");

    let mut vars = f.env("ADD", "c0ffee20");
    remove_var(&mut vars, "CNI_IFNAME");
    let msg = f.run(&vars, &conf).expect_error(code::INVALID_ENV as u64);
    assert!(msg.contains("CNI_IFNAME"), "{msg}");

    let mut vars = f.env("ADD", "c0ffee20");
    remove_var(&mut vars, "CNI_CONTAINERID");
    let msg = f.run(&vars, &conf).expect_error(code::INVALID_ENV as u64);
    assert!(msg.contains("CNI_CONTAINERID"), "{msg}");

    let mut vars = f.env("ADD", "c0ffee20");
    set_var(&mut vars, "CNI_NETNS", "/run/netns/vpcnt-does-not-exist");
    let msg = f.run(&vars, &conf).expect_error(code::INVALID_ENV as u64);
    assert!(msg.contains("/run/netns/vpcnt-does-not-exist"), "{msg}");

    let mut vars = f.env("ADD", "c0ffee20");
    set_var(&mut vars, "CNI_ARGS", "K8S_POD_NAME=x;FOO=bar");
    let msg = f.run(&vars, &conf).expect_error(code::INVALID_ENV as u64);
    assert!(msg.contains("FOO"), "{msg}");

    let msg = f
        .run(&[("CNI_COMMAND", "FROB".to_string())], &conf)
        .expect_error(code::INVALID_ENV as u64);
    assert!(msg.contains("FROB"), "{msg}");
    f.run(&[], &conf).expect_error(code::INVALID_ENV as u64);

    f.run(
        &f.env("ADD", "c0ffee20"),
        r#"{"cniVersion":"1.0.0","mtu":"x"}"#,
    )
    .expect_error(code::INVALID_CONFIG as u64);

    // None of that reached the daemon or left anything behind.
    assert!(f.daemon.requests().is_empty());
    assert!(!f.pod.has_link("eth0"));
}

#[test]
fn log_file_gets_one_line_per_invocation() {
    let f = Fixture::new();
    let log = f.dir.0.join("vpcnet.log");
    let mut vars = f.env("ADD", "c0ffee30");
    set_var(&mut vars, "VPCNET_LOG_FILE", &log.display().to_string());
    f.run(&vars, &f.conf("1.0.0", Value::Null)).expect_ok();
    set_var(&mut vars, "CNI_COMMAND", "DEL");
    f.run(&vars, "garbage").expect_error(code::DECODE as u64);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("ADD container=c0ffee30 ifname=eth0") && lines[0].ends_with("ok"));
    assert!(
        lines[1].contains("DEL") && lines[1].contains("code=6"),
        "{text}"
    );
}
