//! Benchmarks: programs that print figures, each against a reference measured in the same run.

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vpcnet_tests::cni::{CniEnv, exec_plugin, net_config};
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

#[derive(Subcommand)]
pub enum Bench {
    /// CNI ADD/DEL latency of vpcnet vs Debian's bridge+host-local, and a 1,000-pod churn.
    Cni {
        /// ADD+DEL rounds per plugin for the latency comparison.
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        /// Pods in the churn run.
        #[arg(long, default_value_t = 1000)]
        pods: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Throughput (iperf3, one stream) and TCP request/response latency, eBPF vs kernel routing.
    Dataplane(Traffic),
    /// NetworkPolicy: throughput and TCP request/response with 0, 100 and 10,000 rules selecting the
    /// server, and the time from a manifest change to its enforcement.
    Policy(crate::bench_policy::Options),
    /// CPU seconds per idle minute of vpcnetd without and with `manifests_dir`.
    Idle(crate::bench_idle::Options),
    /// vpcnetd holding a 50,000-pod / 1,000-node / 1,000-policy state: RSS, a remote pod's label
    /// change to enforcement, idle CPU; against a 1,000-pod reference.
    Scale(crate::bench_scale::Options),
    /// The Kubernetes mode against a real API server (`KUBEBUILDER_ASSETS`): ADD latency and
    /// RSS against standalone mode, block-claim latency, API write → enforced on every node.
    Kubernetes(crate::bench_kubernetes::Options),
}

/// How much traffic the throughput and request/response benchmarks send.
#[derive(clap::Args, Clone, Copy)]
pub struct Traffic {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4)]
    pub seconds: u32,
    /// Interleaved repetitions of every measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 5000)]
    pub round_trips: usize,
}

pub fn run(what: Bench) -> Result<()> {
    match what {
        Bench::Cni {
            rounds,
            pods,
            concurrency,
        } => cni(rounds, pods, concurrency),
        Bench::Dataplane(t) => crate::bench_dp::run(t.seconds, t.reps, t.round_trips),
        Bench::Policy(o) => crate::bench_policy::run(o),
        Bench::Idle(o) => crate::bench_idle::run(o),
        Bench::Scale(o) => crate::bench_scale::run(o),
        Bench::Kubernetes(o) => crate::bench_kubernetes::run(o),
    }
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Lat {
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn cni(rounds: usize, pods: usize, concurrency: usize) -> Result<()> {
    let mut cluster = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: true,
    })?;
    // The cluster's blocks are /24s; the churn needs room for `pods` addresses on one node.
    let cfg_path = cluster.node(0).config_path.clone();
    let text = std::fs::read_to_string(&cfg_path)?.replace("10.20.1.0/24", "10.20.16.0/20");
    std::fs::write(&cfg_path, text)?;
    cluster.node_mut(0).start_daemon()?;
    let node = &cluster.node(0);
    let state = cluster.dir.join("hostlocal");
    let reference = json!({
        "cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "cnibr0",
        "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/16"}]], "dataDir": state},
    });
    let ours = net_config(node, "1.1.0");
    let sandboxes: Vec<Netns> = (0..4)
        .map(|i| Netns::create(&format!("{}-s{i}", cluster.prefix)))
        .collect::<Result<_>>()?;

    println!("\n== CNI ADD/DEL latency, {rounds} rounds each, same node namespace, interleaved ==");
    let mut vp = Lat {
        add: Vec::new(),
        del: Vec::new(),
    };
    let mut rf = Lat {
        add: Vec::new(),
        del: Vec::new(),
    };
    for r in 0..rounds {
        let ns = &sandboxes[r % sandboxes.len()];
        let path = ns.path().to_string_lossy().into_owned();
        for (plugin, cfg, lat) in [("vpcnet", &ours, &mut vp), ("bridge", &reference, &mut rf)] {
            let id = format!("bench{plugin}{r}");
            let env = CniEnv::new("ADD", &id, &path, "eth0").k8s("bench", &id);
            let add = exec_plugin(&node.ns, plugin, &env, &cfg.to_string())?;
            if !add.success {
                bail!("{plugin} ADD failed: {} {}", add.stdout, add.stderr);
            }
            let mut del_cfg = cfg.clone();
            del_cfg["prevResult"] = add.json()?;
            let mut del_env = env.clone();
            del_env.command = "DEL".into();
            let del = exec_plugin(&node.ns, plugin, &del_env, &del_cfg.to_string())?;
            if !del.success {
                bail!("{plugin} DEL failed: {} {}", del.stdout, del.stderr);
            }
            lat.add.push(add.elapsed);
            lat.del.push(del.elapsed);
        }
    }
    for l in [&mut vp, &mut rf] {
        l.add.sort();
        l.del.sort();
    }
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9}",
        "plugin", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    for (name, l) in [("vpcnet", &vp), ("bridge+host-local (ref)", &rf)] {
        println!(
            "{:<28} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms",
            name,
            ms(percentile(&l.add, 0.5)),
            ms(percentile(&l.add, 0.99)),
            ms(percentile(&l.del, 0.5)),
            ms(percentile(&l.del, 0.99))
        );
    }
    let ratio = ms(percentile(&vp.add, 0.5)) / ms(percentile(&rf.add, 0.5));
    println!(
        "vpcnet ADD p50 / reference ADD p50 = {ratio:.3} (goal ≤ 0.200); DEL ratio = {:.3}",
        ms(percentile(&vp.del, 0.5)) / ms(percentile(&rf.del, 0.5))
    );
    drop(sandboxes);

    println!("\n== churn: {pods} pods ADD then DEL at concurrency {concurrency} (vpcnet) ==");
    let netns: Vec<Netns> = (0..pods)
        .map(|i| Netns::create(&format!("{}-c{i}", cluster.prefix)))
        .collect::<Result<_>>()
        .context("creating pod namespaces")?;
    let failures = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<serde_json::Value>>> =
        (0..pods).map(|_| std::sync::Mutex::new(None)).collect();
    let phase = |command: &str| -> Duration {
        let next = AtomicUsize::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= pods {
                            break;
                        }
                        let id = format!("churn{i}");
                        let env =
                            CniEnv::new(command, &id, &netns[i].path().to_string_lossy(), "eth0")
                                .k8s("churn", &id);
                        let mut cfg = ours.clone();
                        if command == "DEL"
                            && let Some(prev) = results[i].lock().map(|g| g.clone()).ok().flatten()
                        {
                            cfg["prevResult"] = prev;
                        }
                        match exec_plugin(&node.ns, "vpcnet", &env, &cfg.to_string()) {
                            Ok(out) if out.success => {
                                if command == "ADD"
                                    && let (Ok(v), Ok(mut g)) = (out.json(), results[i].lock())
                                {
                                    *g = Some(v);
                                }
                            }
                            Ok(out) => {
                                if failures.fetch_add(1, Ordering::Relaxed) < 3 {
                                    eprintln!("{command} {id} failed: {}", out.stdout.trim());
                                }
                            }
                            Err(e) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{command} {id}: {e:#}");
                            }
                        }
                    }
                });
            }
        });
        start.elapsed()
    };
    let add = phase("ADD");
    let add_failures = failures.swap(0, Ordering::Relaxed);
    let del = phase("DEL");
    let del_failures = failures.load(Ordering::Relaxed);
    println!(
        "ADD: {pods} pods in {:.2} s = {:.0} pods/s, {add_failures} failures",
        add.as_secs_f64(),
        pods as f64 / add.as_secs_f64()
    );
    println!(
        "DEL: {pods} pods in {:.2} s = {:.0} pods/s, {del_failures} failures",
        del.as_secs_f64(),
        pods as f64 / del.as_secs_f64()
    );
    let left = node
        .ctl(&["list"])?
        .lines()
        .filter(|l| l.contains("churn"))
        .count();
    println!("allocations left after DEL: {left}");
    Ok(())
}
