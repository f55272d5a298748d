//! vpcnet first in a conflist, followed by Debian's reference plugins (containernetworking-plugins),
//! driven the way libcni drives a chain: each plugin gets the previous one's result as prevResult,
//! DEL runs in reverse order.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;

const REFERENCE_DIR: &str = "/usr/lib/cni";

fn reference(kind: &str) -> String {
    let path = Path::new(REFERENCE_DIR).join(kind);
    assert!(
        path.exists(),
        "{} is missing: install Debian's containernetworking-plugins (apt-get install \
         containernetworking-plugins) to run the chaining test",
        path.display()
    );
    path.display().to_string()
}

/// One plugin config of the list, as libcni builds it: list name and version injected, plus the
/// previous result.
fn plugin_conf(f: &Fixture, version: &str, plugin: &Value, prev: Option<&Value>) -> String {
    let mut conf = if plugin["type"] == "vpcnet" {
        serde_json::from_str::<Value>(&f.conf(version, Value::Null)).unwrap()
    } else {
        plugin.clone()
    };
    conf["name"] = json!("vpcnet-chain");
    conf["cniVersion"] = json!(version);
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    conf.to_string()
}

fn program(plugin: &Value) -> String {
    match plugin["type"].as_str().unwrap() {
        "vpcnet" => PLUGIN.to_string(),
        other => reference(other),
    }
}

#[test]
fn first_in_a_chain_with_tuning_bandwidth_portmap() {
    // Debian's plugins (1.1.1) speak up to 1.0.0.
    let version = "1.0.0";
    let f = Fixture::new();
    let chain = [
        json!({"type": "vpcnet"}),
        json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "1234"}}),
        json!({
            "type": "bandwidth",
            "capabilities": {"bandwidth": true},
            "runtimeConfig": {"bandwidth": {
                "ingressRate": 10_000_000, "ingressBurst": 1_000_000,
                "egressRate": 10_000_000, "egressBurst": 1_000_000
            }}
        }),
        json!({
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": [
                {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}
            ]}
        }),
    ];
    let cid = "chain0001";

    let mut prev: Option<Value> = None;
    for plugin in &chain {
        let conf = plugin_conf(&f, version, plugin, prev.as_ref());
        let vars = f.env("ADD", cid);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run_plugin(&program(plugin), &f.node, &vars, &conf);
        assert!(out.success, "{} ADD failed: {out:?}", plugin["type"]);
        prev = Some(out.json().unwrap());
    }
    let result = prev.unwrap();
    assert_eq!(result["ips"][0]["address"], "10.77.0.10/32");
    let veth = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(f.node.has_link(&veth));

    // Each later plugin really acted on what we reported.
    let somaxconn = f
        .pod
        .command("cat")
        .unwrap()
        .arg("/proc/sys/net/core/somaxconn")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&somaxconn.stdout).trim(), "1234");
    let qdisc = f.node.ip(&["-o", "link", "show"]).unwrap();
    assert!(qdisc.contains("bwp"), "bandwidth's ifb is missing: {qdisc}");
    let nat = f
        .node
        .command("iptables")
        .unwrap()
        .args(["-t", "nat", "-S"])
        .output()
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(nat.contains("18080"), "portmap's DNAT is missing: {nat}");

    // CHECK through the list with the final result, as libcni does. portmap 1.1.1 is left out:
    // its CHECK looks for the IPv6 DNAT chain whenever ip6tables exists, even for an IPv4-only
    // pod, and so fails on any plugin's result.
    for plugin in chain.iter().filter(|p| p["type"] != "portmap") {
        let conf = plugin_conf(&f, version, plugin, Some(&result));
        let vars = f.env("CHECK", cid);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run_plugin(&program(plugin), &f.node, &vars, &conf);
        assert!(out.success, "{} CHECK failed: {out:?}", plugin["type"]);
    }

    // DEL in reverse.
    for plugin in chain.iter().rev() {
        let conf = plugin_conf(&f, version, plugin, Some(&result));
        let vars = f.env("DEL", cid);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run_plugin(&program(plugin), &f.node, &vars, &conf);
        assert!(out.success, "{} DEL failed: {out:?}", plugin["type"]);
    }
    assert!(!f.node.has_link(&veth));
    assert!(!f.pod.has_link("eth0"));
    let links = f.node.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("bwp"), "{links}");
    assert_eq!(f.daemon.allocations(), 0);
}
