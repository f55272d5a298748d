//! `cargo xtask bench scale`: a real vpcnetd holding a cluster-sized state — by default 50,000
//! pods on 1,000 nodes in 100 namespaces with 1,000 policies, generated into its manifests
//! directory (one file per node, pods of other nodes with `status.podIP` and `nodeName`) — with
//! this node's share of the pods (50) added through the plugin. Measured, against the goals and
//! against a small reference state (1,000 pods on 20 nodes, 20 policies) in the same run:
//!
//! - the daemon's RSS (VmRSS, and the peak VmHWM) once the state is loaded and the pods are in;
//! - one remote pod's label change → enforced on this node: the changed pod's address is the VPC
//!   host's, whose UDP probes to a local server (one every millisecond, a fresh 5-tuple each) a
//!   policy admits only with one of the two labels; the time from the rename of the pod's node
//!   file to the first probe of the final run showing the new verdict, as `bench policy`
//!   measures it;
//! - the daemon's CPU while idle with that state loaded.

use crate::bench::{ms, percentile};
use crate::bench_policy::{
    COLLECT_BASE, Echo, Event, PROBE_PORTS, PROBE_SRC_PORTS, Prober, events_since, log_offsets,
    observe,
};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime};
use vpcnet_tests::cluster::VPC_HOST_IP;
use vpcnet_tests::{Cluster, ClusterSpec};

#[derive(clap::Args)]
pub struct Options {
    #[arg(long, default_value_t = 50_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// The reference state, measured first.
    #[arg(long, default_value_t = 1_000)]
    ref_pods: usize,
    #[arg(long, default_value_t = 20)]
    ref_nodes: usize,
    #[arg(long, default_value_t = 20)]
    ref_policies: usize,
    /// Label changes timed per state, alternating deny and allow.
    #[arg(long, default_value_t = 40)]
    flips: usize,
    /// Seconds of idle CPU measured per state.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
}

const NAMESPACES: usize = 100;
/// Deployments per namespace: pods of one share their labels, as in a real cluster.
const APPS: usize = 20;
/// The harness's node; the generated nodes are node 0 (this one) and `node-<k>`.
const LOCAL: &str = "node1";
const PROBE_NS: &str = "probe";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 200);
/// Longest wait for the daemon to load a state and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
const SETTLE: Duration = Duration::from_secs(3);

fn node_name(k: usize) -> String {
    if k == 0 {
        LOCAL.into()
    } else {
        format!("node-{k}")
    }
}

fn node_file(k: usize) -> String {
    format!("node-{k:04}.json")
}

/// Remote pods' addresses: outside every block of the harness's VPC.
fn remote_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000u32 + i as u32)
}

fn labels(i: usize) -> Value {
    let (ns, app) = (i % NAMESPACES, (i / NAMESPACES) % APPS);
    let tier = ["web", "api", "db"][app % 3];
    json!({"app": format!("app-{app}"), "tier": tier, "team": format!("team-{}", ns % 10)})
}

fn pod(name: &str, namespace: &str, labels: Value, node: &str, ip: Option<Ipv4Addr>) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i",
                 "ports": [{"name": "http", "containerPort": 8080}]}]}
    });
    if let Some(ip) = ip {
        p["status"] = json!({"podIP": ip.to_string()});
    }
    p
}

/// The generated state: which pods exist where, and the one whose labels flip.
struct Gen {
    pods: usize,
    nodes: usize,
    policies: usize,
    /// Local pods: (namespace, name, address).
    local: Vec<(String, String, Ipv4Addr)>,
    flip_node: usize,
}

impl Gen {
    fn new(pods: usize, nodes: usize, policies: usize) -> Result<Gen> {
        if nodes < 2 || pods < nodes {
            bail!("need at least 2 nodes and a pod per node");
        }
        let local: Vec<_> = (0..pods)
            .filter(|i| i % nodes == 0)
            .enumerate()
            .map(|(j, i)| {
                (
                    format!("ns-{}", i % NAMESPACES),
                    format!("pod-{i}"),
                    Ipv4Addr::new(10, 20, 1, 10 + j as u8),
                )
            })
            .collect();
        if local.len() > 180 {
            bail!("{} local pods do not fit this node's /24", local.len());
        }
        Ok(Gen {
            pods,
            nodes,
            policies,
            local,
            flip_node: nodes / 2,
        })
    }

    /// The pods of node `k`; on the flip node, the VPC host as a pod with `probe: <flip>`.
    fn node_doc(&self, k: usize, flip: &str) -> String {
        let mut items: Vec<Value> = Vec::new();
        let mut j = 0;
        for i in (k..self.pods).step_by(self.nodes) {
            let (ns, name) = (format!("ns-{}", i % NAMESPACES), format!("pod-{i}"));
            if k == 0 {
                // Declared with the address IPAM is to give it; the plugin adds it.
                let mut p = pod(&name, &ns, labels(i), LOCAL, None);
                p["metadata"]["annotations"] = json!({"vpcnet.io/ip": self.local[j].2.to_string()});
                j += 1;
                items.push(p);
            } else {
                items.push(pod(
                    &name,
                    &ns,
                    labels(i),
                    &node_name(k),
                    Some(remote_ip(i)),
                ));
            }
        }
        if k == self.flip_node {
            let mut l = labels(3 * NAMESPACES + 1);
            l["probe"] = json!(flip);
            items.push(pod(
                "probe-peer",
                "ns-1",
                l,
                &node_name(k),
                Some(VPC_HOST_IP),
            ));
        }
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    }

    /// Policy `k` of a namespace (as `bench policy`'s in-process scale part): selects one app,
    /// admits the next app of its namespace and the same app of the namespaces of one team, on a
    /// named and a numbered port; every third also limits egress to its namespace and a block.
    fn policy(ns: usize, k: usize) -> Value {
        let mut spec = json!({
            "podSelector": {"matchLabels": {"app": format!("app-{k}")}},
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": format!("app-{}", (k + 1) % APPS)}}},
                    {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", k % 10)}},
                     "podSelector": {"matchLabels": {"app": format!("app-{k}")}}}
                ],
                "ports": [{"protocol": "TCP", "port": "http"}, {"protocol": "TCP", "port": 9090}]
            }]
        });
        if k.is_multiple_of(3) {
            spec["egress"] = json!([
                {"to": [{"podSelector": {}}]},
                {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]}
            ]);
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
        }
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": format!("p-{k}"), "namespace": format!("ns-{ns}")},
               "spec": spec})
    }

    /// Writes every file; returns the bytes written.
    fn write(&self, c: &Cluster) -> Result<u64> {
        let mut total = 0u64;
        let mut put = |file: &str, text: String| -> Result<()> {
            total += text.len() as u64;
            c.apply_manifest(file, &text)
        };
        let mut items: Vec<Value> = (0..NAMESPACES)
            .map(|n| {
                json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": format!("ns-{n}"), "labels": {"team": format!("team-{}", n % 10)}}})
            })
            .collect();
        items
            .push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PROBE_NS}}));
        put(
            "namespaces.json",
            json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
        )?;
        let policies: Vec<Value> = (0..self.policies)
            .map(|k| Gen::policy(k % NAMESPACES, (k / NAMESPACES) % APPS))
            .collect();
        put(
            "policies.json",
            json!({"apiVersion": "v1", "kind": "List", "items": policies}).to_string(),
        )?;
        let mut server = pod("server", PROBE_NS, json!({"role": "server"}), LOCAL, None);
        server["metadata"]["annotations"] = json!({"vpcnet.io/ip": SERVER_IP.to_string()});
        let probe_policy = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "probe", "namespace": PROBE_NS},
            "spec": {"podSelector": {"matchLabels": {"role": "server"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {},
                                            "podSelector": {"matchLabels": {"probe": "allowed"}}}],
                                  "ports": [{"protocol": "UDP", "port": *PROBE_PORTS.start(),
                                             "endPort": *PROBE_PORTS.end()}]}]}
        });
        put(
            "probe.json",
            json!({"apiVersion": "v1", "kind": "List", "items": [server, probe_policy]})
                .to_string(),
        )?;
        for k in 0..self.nodes {
            put(&node_file(k), self.node_doc(k, "allowed"))?;
        }
        Ok(total)
    }
}

/// VmRSS and VmHWM of a process, in MiB.
pub(crate) fn memory_of(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

struct Figures {
    label: String,
    megabytes: f64,
    ready: Duration,
    rss_loaded: (f64, f64),
    rss_after: (f64, f64),
    /// Rename → enforced, per flip.
    enforced: Vec<Duration>,
    /// Rename → "cluster state loaded" / "NetworkPolicy applied" in the daemon's log.
    read: Vec<Duration>,
    written: Vec<Duration>,
    flaps: usize,
    /// CPU % of one core while idle, context switches per second.
    idle_cpu: f64,
    idle_switches: f64,
}

fn measure(label: &str, g: &Gen, o: &Options) -> Result<Figures> {
    println!(
        "\n-- {label}: {} pods on {} nodes, {} policies, {} local pods --",
        g.pods,
        g.nodes,
        g.policies,
        g.local.len() + 1
    );
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: true,
    })?;
    let t = Instant::now();
    let bytes = g.write(&c)?;
    println!(
        "manifests: {:.1} MB in {} files, written in {:.1} s",
        bytes as f64 / 1e6,
        g.nodes + 3,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    c.node_mut(0).start_daemon_with(|_| {}, false)?;
    let ready = loop {
        // Fails at once when the daemon exited.
        if c.node_mut(0).wait_answering(READY_TIMEOUT)?.ready {
            break t.elapsed();
        }
        if t.elapsed() > READY_TIMEOUT {
            bail!("vpcnetd not ready; log:\n{}", c.node(0).log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let pid = c.node(0).daemon_pid().context("vpcnetd pid")?;
    println!("daemon ready {:.1} s after start", ready.as_secs_f64());
    let t = Instant::now();
    let mut pods = Vec::new();
    for (ns, name, want) in &g.local {
        let p = c.add_pod(0, ns, name)?;
        if p.ip != *want {
            bail!("{ns}/{name} got {} instead of its annotated {want}", p.ip);
        }
        pods.push(p);
    }
    let server = c.add_pod(0, PROBE_NS, "server")?;
    if server.ip != SERVER_IP {
        bail!("the server got {} instead of {SERVER_IP}", server.ip);
    }
    println!(
        "{} pods added through the plugin in {:.1} s",
        pods.len() + 1,
        t.elapsed().as_secs_f64()
    );
    let _echo = Echo::start(
        &server.ns,
        PROBE_PORTS.map(|port| SocketAddrV4::new(SERVER_IP, port)),
    )?;
    let mut prober = Prober::start(&c.vpc_host, SERVER_IP, PROBE_SRC_PORTS.start, COLLECT_BASE)?;
    if observe(&mut prober, Instant::now(), true)?.is_none() {
        bail!("the VPC host's probes are not answered while its pod is allowed");
    }
    std::thread::sleep(SETTLE);
    let rss_loaded = memory_of(pid)?;

    let mut f = Figures {
        label: label.into(),
        megabytes: bytes as f64 / 1e6,
        ready,
        rss_loaded,
        rss_after: (0.0, 0.0),
        enforced: Vec::new(),
        read: Vec::new(),
        written: Vec::new(),
        flaps: 0,
        idle_cpu: 0.0,
        idle_switches: 0.0,
    };
    let mut rng = 0x5eed_u64;
    for i in 0..o.flips {
        let answered = i % 2 == 1;
        let doc = g.node_doc(g.flip_node, if answered { "allowed" } else { "denied" });
        let offsets = log_offsets(&c);
        let wall0 = SystemTime::now();
        c.apply_manifest(&node_file(g.flip_node), &doc)?;
        let t0 = Instant::now();
        match observe(&mut prober, t0, answered)? {
            Some(obs) => {
                f.enforced.push(obs.latency);
                f.flaps += obs.flaps;
            }
            None => bail!(
                "label change {} ({}) not enforced in time; log:\n{}",
                i + 1,
                if answered { "allow" } else { "deny" },
                c.node(0).log_tail()
            ),
        }
        // A pause so the changes do not lock onto the daemon's polling phase.
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(20 + (rng >> 33) % 80));
        let events = events_since(&c, &offsets);
        let first = |want: fn(&Event) -> bool| {
            events[0]
                .iter()
                .find(|(_, e)| want(e))
                .and_then(|(at, _)| at.as_ref()?.duration_since(wall0).ok())
        };
        f.read.extend(first(|e| matches!(e, Event::Loaded)));
        f.written.extend(first(|e| matches!(e, Event::Applied(..))));
    }
    drop(prober);
    std::thread::sleep(SETTLE);
    let (cpu0, sw0) = crate::bench_idle::cpu_of(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(o.idle_seconds));
    let (cpu1, sw1) = crate::bench_idle::cpu_of(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    f.idle_cpu = (cpu1 - cpu0) / secs * 100.0;
    f.idle_switches = (sw1 - sw0) as f64 / secs;
    f.rss_after = memory_of(pid)?;
    for v in [&mut f.enforced, &mut f.read, &mut f.written] {
        v.sort();
    }
    drop(pods);
    drop(server);
    Ok(f)
}

/// The machine's load averages: the latencies measured here are only comparable between runs
/// on a similarly loaded machine.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn run(o: Options) -> Result<()> {
    println!("load average at the start: {}", load_average());
    println!(
        "\n== vpcnetd at scale: one node in namespaces, the cluster state generated into its manifests \
         directory; {} label changes of one remote pod per state, UDP probe every ms from its address ==",
        o.flips
    );
    let reference = measure(
        "reference",
        &Gen::new(o.ref_pods, o.ref_nodes, o.ref_policies)?,
        &o,
    )?;
    let scale = measure("goal state", &Gen::new(o.pods, o.nodes, o.policies)?, &o)?;
    println!(
        "\n{:<46} {:>18} {:>18} {:>14}",
        "figure",
        format!("{} (ref)", reference.label),
        scale.label,
        "goal"
    );
    let row = |what: &str, a: String, b: String, goal: &str| {
        println!("{what:<46} {a:>18} {b:>18} {goal:>14}");
    };
    let both = |f: &dyn Fn(&Figures) -> String| (f(&reference), f(&scale));
    let (a, b) = both(&|f| format!("{:.1} MB", f.megabytes));
    row("manifests", a, b, "");
    let (a, b) = both(&|f| format!("{:.1} s", f.ready.as_secs_f64()));
    row("start → ready (state loaded, policy synced)", a, b, "");
    let (a, b) = both(&|f| format!("{:.0} MiB", f.rss_loaded.0));
    row("daemon VmRSS, state loaded + pods added", a, b, "≤ 150 MiB");
    let (a, b) = both(&|f| format!("{:.0} MiB", f.rss_after.0));
    row(
        "daemon VmRSS after the changes and idling",
        a,
        b,
        "≤ 150 MiB",
    );
    let (a, b) = both(&|f| format!("{:.0} MiB", f.rss_after.1));
    row("daemon VmHWM (peak, start included)", a, b, "");
    for (what, pick, goal) in [
        ("label change → enforced p50", 0.5, ""),
        ("label change → enforced p99", 0.99, "≤ 100 ms"),
        ("label change → enforced max", 1.0, ""),
    ] {
        let (a, b) = both(&|f| format!("{:.1} ms", ms(percentile(&f.enforced, pick))));
        row(what, a, b, goal);
    }
    for (what, pick) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = both(&|f| format!("{:.1} ms", ms(percentile(&f.read, pick))));
        row(&format!("  rename → state loaded (log) {what}"), a, b, "");
        let (a, b) = both(&|f| format!("{:.1} ms", ms(percentile(&f.written, pick))));
        row(&format!("  rename → maps written (log) {what}"), a, b, "");
    }
    let (a, b) = both(&|f| format!("{}", f.flaps));
    row("flaps (old verdict after the new one)", a, b, "0");
    let (a, b) = both(&|f| format!("{:.3} %", f.idle_cpu));
    row(
        &format!("idle CPU over {} s (one core)", o.idle_seconds),
        a,
        b,
        "~0 %",
    );
    let (a, b) = both(&|f| format!("{:.1}/s", f.idle_switches));
    row("idle context switches", a, b, "");
    println!(
        "({} changes per state; a probe counts as dropped when unanswered after 500 ms; log times \
         are the daemon's clock against this one's)",
        o.flips
    );
    println!("load average at the end: {}", load_average());
    Ok(())
}
