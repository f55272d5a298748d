//! ADD/DEL wall-clock latency of the plugin binary against the fake daemon, next to Debian's
//! reference bridge + host-local measured in the same run (machine noise is large, so only a
//! same-run comparison means anything).
//!
//! `VPCNET_BENCH_ITERS=100 cargo test --release -p vpcnet-cni --test latency -- --nocapture`

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn iterations() -> usize {
    std::env::var("VPCNET_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn summary(label: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = percentile(&v, 0.5);
    println!(
        "{label:<28} n={:<4} p50={:>7.2}ms p90={:>7.2}ms min={:>7.2}ms max={:>7.2}ms",
        v.len(),
        ms(p50),
        ms(percentile(&v, 0.9)),
        ms(v[0]),
        ms(v[v.len() - 1]),
    );
    p50
}

/// Times `iters` ADD+DEL pairs of `program` with the given config, each with a fresh container ID.
fn measure(
    program: &str,
    node: &Netns,
    pod: &Netns,
    conf: &str,
    tag: &str,
    iters: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    let netns = pod.path_string();
    for i in 0..iters {
        let cid = format!("{tag}{i:05}");
        let vars = |cmd: &'static str| {
            vec![
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", cid.as_str()),
                ("CNI_NETNS", netns.as_str()),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench",
                ),
            ]
        };
        let t = Instant::now();
        let out = run_plugin(program, node, &vars("ADD"), conf);
        adds.push(t.elapsed());
        assert!(out.success, "{tag} ADD {i}: {out:?}");
        let prev: Value = out.json().unwrap();
        let mut del_conf: Value = serde_json::from_str(conf).unwrap();
        del_conf["prevResult"] = prev;
        let del_conf = del_conf.to_string();
        let t = Instant::now();
        let out = run_plugin(program, node, &vars("DEL"), &del_conf);
        dels.push(t.elapsed());
        assert!(out.success, "{tag} DEL {i}: {out:?}");
    }
    (adds, dels)
}

#[test]
fn add_del_latency_against_reference_bridge() {
    let iters = iterations();
    let f = Fixture::new();
    let conf = f.conf("1.0.0", Value::Null);
    // One untimed round so page cache and the dynamic loader are warm for both contenders.
    measure(PLUGIN, &f.node, &f.pod, &conf, "warm", 1);
    let (adds, dels) = measure(PLUGIN, &f.node, &f.pod, &conf, "bench", iters);
    assert_eq!(f.daemon.allocations(), 0);

    let bridge = format!("{REF}/bridge", REF = "/usr/lib/cni");
    assert!(
        std::path::Path::new(&bridge).exists(),
        "{bridge} is missing: install containernetworking-plugins for the reference measurement"
    );
    let ref_node = netns("n");
    let ref_pod = netns("p");
    let data = TempDir::new();
    let ref_conf = json!({
        "cniVersion": "1.0.0",
        "name": "ref",
        "type": "bridge",
        "bridge": "cnibench0",
        "isGateway": true,
        "ipam": {"type": "host-local", "subnet": "10.88.0.0/16", "dataDir": data.0}
    })
    .to_string();
    measure(&bridge, &ref_node, &ref_pod, &ref_conf, "warm", 1);
    let (radds, rdels) = measure(&bridge, &ref_node, &ref_pod, &ref_conf, "ref", iters);

    println!("\nADD/DEL wall clock including fork+exec, {iters} iterations:");
    let add = summary("vpcnet ADD", adds);
    let del = summary("vpcnet DEL", dels);
    let radd = summary("bridge+host-local ADD", radds);
    let rdel = summary("bridge+host-local DEL", rdels);
    println!(
        "vpcnet/reference p50 ratio: ADD {:.2}, DEL {:.2}",
        add.as_secs_f64() / radd.as_secs_f64(),
        del.as_secs_f64() / rdel.as_secs_f64()
    );
}
