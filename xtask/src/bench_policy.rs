//! `cargo xtask bench policy`: what NetworkPolicy enforcement costs on the datapath, and how soon a
//! manifest change is enforced.
//!
//! 1. Throughput (iperf3, one stream) and TCP request/response latency from a client pod to a server
//!    pod on the same node and on the other node, with no policy, then with one policy selecting the
//!    servers whose rules (100, 10,000, …) all miss the client but one. Variants are interleaved and
//!    repeated; medians are printed against the no-policy figures.
//! 2. Manifest change → enforcement: the client probes each server with UDP datagrams every
//!    millisecond, each on a 5-tuple not used before in the run (so conntrack cannot carry a verdict
//!    over), while the policy file is replaced atomically by one that denies the client, then by
//!    one that allows it again, and so on. The time from the rename to the first probe of the final
//!    run showing the new verdict is the figure (a probe counts as dropped only when no answer came
//!    within 500 ms); once with no other policy, once with the largest rule set in force beside the
//!    flipped policy. The daemons' logs say when each read the new state and wrote its maps.
//!
//! 3. Scale, in-process (no namespaces, no root): a generated cluster state of `--scale-pods` pods
//!    on `--scale-nodes` nodes with `--scale-policies` policies, compiled for one node. One remote
//!    pod's label change, one ADD and a change next to the 10,000-rule policy, each timed through
//!    the full compilation the agent did before (the state with the local allocations laid over
//!    it, every endpoint compiled) and through the incremental compiler it uses now, plus the
//!    dataplane's plan between two compilations; and this process's RSS holding the state, the
//!    compiler and one compiled copy (what the agent holds, besides its maps' mirror).
//!
//! Every pod is declared in the manifests directory (labels, and `vpcnet.io/ip` so both daemons know
//! every address) before its CNI ADD.

use crate::bench::{ms, percentile};
use crate::bench_dp::{iperf, median, rr};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use vpcnet_tests::cni::Pod;
use vpcnet_tests::probe::WhoAmI;
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

const NS: &str = "bench";
const OTHERS_NS: &str = "bench-others";
/// Pods that exist only in the manifests, each with its own labels: remote identities for the
/// filler rules (their addresses are outside every node's block and never receive traffic).
const PHANTOMS: usize = 50;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 10);
/// (label, node index, address) of the servers; node i's block is 10.20.{i+1}.0/24.
const SERVERS: [(&str, usize, Ipv4Addr); 2] = [
    ("same node", 0, Ipv4Addr::new(10, 20, 1, 20)),
    ("across nodes", 1, Ipv4Addr::new(10, 20, 2, 20)),
];
/// Ports bench_dp's helpers use.
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
/// The change-to-enforcement probes go to one of these UDP ports (more 5-tuples before one repeats).
pub(crate) const PROBE_PORTS: std::ops::RangeInclusive<u16> = 5300..=5303;
/// New-flow request/response: every request on a 5-tuple of its own goes to one of these UDP
/// ports, so each one is judged by the policy (a TCP connection is judged once, then conntrack).
const NEW_FLOW_PORTS: std::ops::RangeInclusive<u16> = 5320..=5323;
const NEW_FLOW_COLLECT: u16 = 9200;
/// Isolated throughput variant i allows the client on UDP `MARKER_BASE + i` and on no other marker,
/// so probing the markers tells which variant the dataplane enforces.
const MARKER_BASE: u16 = 5310;
/// Client source ports of the change-to-enforcement probes, used in turn.
pub(crate) const PROBE_SRC_PORTS: std::ops::Range<u16> = 10000..65000;
const POLICY_FILE: &str = "bench-policy.yaml";
const FLIP_FILE: &str = "bench-flip.yaml";
const PODS_FILE: &str = "bench-pods.yaml";

/// How long a probe's answer may take before the probe counts as dropped.
const PROBE_WAIT: Duration = Duration::from_millis(500);
/// Where the probers collect the answers (one port per path).
pub(crate) const COLLECT_BASE: u16 = 9100;
const PROBE_PERIOD: Duration = Duration::from_millis(1);
/// A new verdict counts as established once it has held this long.
const STABLE: Duration = Duration::from_millis(200);
/// Longest wait for one policy change to show; past it the latency part gives up.
const FLIP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a throughput variant to be enforced (compiling 10,000 rules included).
const VARIANT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    traffic: crate::bench::Traffic,
    /// Rule counts of the policy variants, each compared with no policy.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 10000])]
    rules: Vec<usize>,
    /// Policy changes per measured cluster state, alternating deny and allow.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Only the change-to-enforcement part.
    #[arg(long)]
    skip_throughput: bool,
    /// Only the throughput and request/response part.
    #[arg(long)]
    skip_latency: bool,
    /// Only the in-process scale part (no root needed).
    #[arg(long)]
    scale_only: bool,
    #[arg(long)]
    skip_scale: bool,
    #[arg(long, default_value_t = 50_000)]
    scale_pods: usize,
    #[arg(long, default_value_t = 1_000)]
    scale_nodes: usize,
    #[arg(long, default_value_t = 1_000)]
    scale_policies: usize,
    /// Changes timed per figure.
    #[arg(long, default_value_t = 200)]
    scale_changes: usize,
}

struct Bed {
    // Drop order: servers first, then the pods' namespaces, then the cluster (daemons, fabric).
    _whoami: Vec<WhoAmI>,
    _echo: Vec<Echo>,
    client: Pod,
    servers: Vec<(&'static str, Pod)>,
    cluster: Cluster,
}

pub fn run(o: Options) -> Result<()> {
    if !o.skip_scale || o.scale_only {
        scale::run(
            o.scale_pods,
            o.scale_nodes,
            o.scale_policies,
            o.scale_changes,
        )?;
        if o.scale_only {
            return Ok(());
        }
    }
    let mut rules = o.rules.clone();
    rules.retain(|r| *r > 0);
    rules.sort();
    rules.dedup();
    println!(
        "\n== NetworkPolicy: 2 nodes, client pod {CLIENT_IP} on node1, servers {} ==",
        SERVERS
            .iter()
            .map(|(l, _, ip)| format!("{ip} ({l})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let bed = setup()?;
    if !o.skip_throughput {
        throughput(&bed, &rules, &o)?;
    }
    if !o.skip_latency {
        let mut backgrounds = vec![0];
        backgrounds.extend(rules.last().copied());
        change_to_enforcement(&bed, &backgrounds, o.changes)?;
    }
    Ok(())
}

fn setup() -> Result<Bed> {
    let mut cluster = Cluster::build(ClusterSpec {
        nodes: 2,
        cooldown_secs: 30,
        dataplane: true,
    })?;
    cluster.apply_manifest(PODS_FILE, &pods_manifest().to_string())?;
    for i in 0..2 {
        cluster.node_mut(i).start_daemon()?;
    }
    // The daemons must know the pods (and their annotated addresses) before the ADDs.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &cluster.nodes {
        while n.ctl(&["policy", &format!("{NS}/client")]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "{} did not load {PODS_FILE}; log:\n{}",
                    n.name,
                    n.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let add = |node: usize, name: &str, want: Ipv4Addr| -> Result<Pod> {
        let pod = cluster.add_pod_with(node, NS, name, |_| {})?;
        if pod.ip != want {
            bail!("{name} got {} instead of its annotated {want}", pod.ip);
        }
        Ok(pod)
    };
    let client = add(0, "client", CLIENT_IP)?;
    let mut servers = Vec::new();
    let mut whoami = Vec::new();
    let mut echo = Vec::new();
    for (i, (label, node, ip)) in SERVERS.iter().enumerate() {
        let pod = add(*node, &format!("server{i}"), *ip)?;
        for port in MARKER_BASE..MARKER_BASE + 8 {
            whoami.push(WhoAmI::start(&pod.ns, SocketAddrV4::new(*ip, port))?);
        }
        echo.push(Echo::start(
            &pod.ns,
            PROBE_PORTS
                .chain(NEW_FLOW_PORTS)
                .map(|port| SocketAddrV4::new(*ip, port)),
        )?);
        servers.push((*label, pod));
    }
    Ok(Bed {
        _whoami: whoami,
        _echo: echo,
        client,
        servers,
        cluster,
    })
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"bench": name}}})
}

fn pod(namespace: &str, name: &str, ip: Ipv4Addr, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels,
                        "annotations": {"vpcnet.io/ip": ip.to_string()}}})
}

fn pods_manifest() -> Value {
    let mut items = vec![namespace(NS), namespace(OTHERS_NS)];
    items.push(pod(NS, "client", CLIENT_IP, json!({"app": "client"})));
    for (i, (_, _, ip)) in SERVERS.iter().enumerate() {
        items.push(pod(
            NS,
            &format!("server{i}"),
            *ip,
            json!({"app": "server"}),
        ));
    }
    for j in 0..PHANTOMS {
        let ip = Ipv4Addr::new(10, 20, 200, j as u8 + 1);
        items.push(pod(
            OTHERS_NS,
            &format!("p{j}"),
            ip,
            json!({"role": format!("r{j}")}),
        ));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn addr(base: Ipv4Addr, offset: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + offset as u32)
}

/// Filler rule `k`: never matches the client's traffic, and spreads over every kind of compiled
/// entry: /32 and /28 address prefixes, single ports and port ranges, TCP and UDP, remote pod
/// identities in another namespace, and the client's own identity on ports it does not use.
fn filler_rule(k: usize) -> Value {
    let tcp = |port: usize| json!([{"protocol": "TCP", "port": port}]);
    if k % 97 == 96 {
        return json!({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                      "ports": tcp(40000 + k % 20000)});
    }
    match k % 4 {
        0 => {
            json!({"from": [{"ipBlock": {"cidr": format!("{}/32", addr(Ipv4Addr::new(10, 200, 0, 0), k))}}],
                    "ports": tcp(6000 + k % 2000)})
        }
        1 => {
            json!({"from": [{"ipBlock": {"cidr": format!("{}/32", addr(Ipv4Addr::new(10, 200, 0, 0), k))}}],
                    "ports": [{"protocol": "UDP", "port": 7000 + (k % 500) * 4, "endPort": 7003 + (k % 500) * 4}]})
        }
        2 => {
            json!({"from": [{"ipBlock": {"cidr": format!("{}/28", addr(Ipv4Addr::new(10, 202, 0, 0), 16 * k))}}],
                    "ports": tcp(8000 + k % 100)})
        }
        _ => json!({"from": [{"namespaceSelector": {"matchLabels": {"bench": OTHERS_NS}},
                              "podSelector": {"matchLabels": {"role": format!("r{}", k % PHANTOMS)}}}],
                    "ports": tcp(20000 + k / 4)}),
    }
}

/// One policy selecting the servers with `rules` ingress rules: `rules - 1` fillers, then one
/// allowing the client on `ports` ((protocol, port, endPort)).
fn policy(name: &str, rules: usize, ports: &[(&str, u16, u16)]) -> Value {
    let mut ingress: Vec<Value> = (0..rules.saturating_sub(1)).map(filler_rule).collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(proto, port, end)| {
            if port == end {
                json!({"protocol": proto, "port": port})
            } else {
                json!({"protocol": proto, "port": port, "endPort": end})
            }
        })
        .collect();
    ingress.push(
        json!({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": ports}),
    );
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": NS},
           "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                    "ingress": ingress}})
}

/// The policy of throughput variant `i` (1-based among the isolated variants) with `rules` rules.
fn variant_policy(i: usize, rules: usize) -> Value {
    policy(
        "bench",
        rules,
        &[
            ("TCP", IPERF_PORT, IPERF_PORT),
            ("TCP", RR_PORT, RR_PORT),
            ("UDP", MARKER_BASE + i as u16, MARKER_BASE + i as u16),
            ("UDP", *NEW_FLOW_PORTS.start(), *NEW_FLOW_PORTS.end()),
        ],
    )
}

/// Puts throughput variant `i` with `rules` rules (0: no policy file at all) in place.
fn write_variant(c: &Cluster, i: usize, rules: usize) -> Result<()> {
    if rules == 0 {
        match std::fs::remove_file(c.manifests_dir().join(POLICY_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    } else {
        c.apply_manifest(POLICY_FILE, &variant_policy(i, rules).to_string())
    }
}

/// One UDP datagram from an ephemeral port; whether an answer came within `wait`.
fn udp_answered(from: &Netns, to: SocketAddrV4, wait: Duration) -> Result<bool> {
    from.run(move || -> std::io::Result<bool> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(wait))?;
        s.connect(to)?;
        s.send(b"m")?;
        let mut buf = [0u8; 64];
        Ok(s.recv(&mut buf).is_ok())
    })?
    .context("marker probe")
}

/// Waits until every (server, UDP port) answers the client or not as `want` says, three passes in
/// a row. Returns when the first of those passes started, if that happened within `timeout`.
fn wait_verdicts(
    bed: &Bed,
    want: &[(Ipv4Addr, u16, bool)],
    timeout: Duration,
) -> Result<Option<Instant>> {
    let deadline = Instant::now() + timeout;
    let mut streak: Vec<Instant> = Vec::new();
    while Instant::now() < deadline {
        let pass = Instant::now();
        let mut all = true;
        for (ip, port, answered) in want {
            let got = udp_answered(
                &bed.client.ns,
                SocketAddrV4::new(*ip, *port),
                Duration::from_millis(30),
            )?;
            all &= got == *answered;
        }
        if !all {
            streak.clear();
        } else {
            streak.push(pass);
            if streak.len() == 3 {
                return Ok(Some(streak[0]));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}

/// Where each daemon's log ends now, to read what it logs after a change.
pub(crate) fn log_offsets(c: &Cluster) -> Vec<u64> {
    c.nodes
        .iter()
        .map(|n| {
            std::fs::metadata(n.dir.join("vpcnetd.log"))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .collect()
}

/// What a daemon logged about one policy change.
#[derive(Clone, Copy)]
pub(crate) enum Event {
    /// "cluster state loaded": the manifests were read and parsed.
    Loaded,
    /// "NetworkPolicy applied": the maps were written (map ops, milliseconds the sync took).
    Applied(u64, f64),
}

/// Per node: the policy events its daemon logged since `offsets`, with their log timestamps.
pub(crate) fn events_since(c: &Cluster, offsets: &[u64]) -> Vec<Vec<(Option<SystemTime>, Event)>> {
    c.nodes
        .iter()
        .zip(offsets)
        .map(|(n, from)| {
            let text = std::fs::read(n.dir.join("vpcnetd.log")).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(*from as usize..).unwrap_or_default());
            text.lines()
                .map(strip_ansi)
                .filter_map(|line| {
                    let field = |k: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(k))
                            .and_then(|v| v.parse::<f64>().ok())
                            .unwrap_or(0.0)
                    };
                    let event = if line.contains("NetworkPolicy applied") {
                        Event::Applied(field("ops=") as u64, field("ms="))
                    } else if line.contains("cluster state loaded") {
                        Event::Loaded
                    } else {
                        return None;
                    };
                    Some((
                        line.split_whitespace().next().and_then(parse_rfc3339),
                        event,
                    ))
                })
                .collect()
        })
        .collect()
}

/// `2026-11-22T12:23:44.123456Z` (tracing's default timestamp) as a `SystemTime`.
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let days = era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
    let secs = (days * 86400 + h * 3600 + mi * 60) as f64 + sec;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0)))
}

/// Per node: the syncs since `offsets` and the entries its policy maps hold now.
fn sync_report(c: &Cluster, offsets: &[u64]) -> String {
    let mut out = Vec::new();
    for (n, events) in c.nodes.iter().zip(events_since(c, offsets)) {
        let syncs: Vec<(u64, f64)> = events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Applied(ops, ms) => Some((*ops, *ms)),
                Event::Loaded => None,
            })
            .collect();
        let entries = ["POLICY", "POLICY_CIDRS", "IDENTITIES"]
            .iter()
            .map(|m| match crate::bpfmap::count_entries(&n.bpf_dir.join(m)) {
                Ok(k) => format!("{m} {k}"),
                Err(_) => format!("{m} ?"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        out.push(format!(
            "{}: {} sync(s), {} map ops, slowest {:.0} ms; entries {entries}",
            n.name,
            syncs.len(),
            syncs.iter().map(|s| s.0).sum::<u64>(),
            syncs.iter().map(|s| s.1).fold(0.0, f64::max),
        ));
    }
    out.join("\n      ")
}

pub(crate) fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn throughput(bed: &Bed, rules: &[usize], o: &Options) -> Result<()> {
    // Variant 0 is "no policy"; variant i ≥ 1 has rules[i - 1] rules and marker MARKER_BASE + i.
    let variants: Vec<usize> = std::iter::once(0).chain(rules.iter().copied()).collect();
    println!(
        "\n== throughput and TCP request/response with 0 / {} rules selecting the server, interleaved, median of {} ==",
        rules
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(" / "),
        o.traffic.reps
    );
    // [variant][path] → per-rep figures
    let n = bed.servers.len();
    let mut gbps = vec![vec![Vec::new(); n]; variants.len()];
    let mut p50 = gbps.clone();
    let mut p99 = gbps.clone();
    let mut nf50 = gbps.clone();
    let mut nf99 = gbps.clone();
    let mut nf_lost = vec![0usize; n];
    // Per path: where the next new-flow run starts in the source ports, so no 5-tuple repeats.
    let mut src_cursor = vec![0usize; n];
    let new_flows = 2000;
    let mut enforced: Option<bool> = None;
    for rep in 0..o.traffic.reps {
        for j in 0..variants.len() {
            // Rotate the order so no variant always runs right after the same one.
            let v = (j + rep) % variants.len();
            let rules = variants[v];
            let offsets = log_offsets(&bed.cluster);
            write_variant(&bed.cluster, v, rules)?;
            let want: Vec<(Ipv4Addr, u16, bool)> = bed
                .servers
                .iter()
                .flat_map(|(_, p)| {
                    (1..variants.len())
                        .map(move |m| (p.ip, MARKER_BASE + m as u16, rules == 0 || m == v))
                })
                .collect();
            let start = Instant::now();
            if enforced == Some(false) {
                std::thread::sleep(Duration::from_secs(1));
            } else if let Some(seen) = wait_verdicts(bed, &want, VARIANT_TIMEOUT)? {
                if rules > 0 && enforced.is_none() {
                    enforced = Some(true);
                }
                println!(
                    "  rep {} variant {rules:>5} rules: in force {:.0} ms after the write (marker probes; 3 passes in a row)",
                    rep + 1,
                    ms(seen.saturating_duration_since(start))
                );
            } else if enforced == Some(true) {
                bail!(
                    "the {rules}-rule variant was not in force {VARIANT_TIMEOUT:?} after its manifest was written"
                );
            } else {
                enforced = Some(false);
                println!(
                    "  WARNING: the {rules}-rule policy was not enforced {VARIANT_TIMEOUT:?} after it was written \
                     (marker ports answered regardless): this dataplane does not enforce NetworkPolicy, so the \
                     variants below differ only in the daemon's work, not in the datapath"
                );
            }
            // Let the daemons finish whatever the change started (compiling, re-reading files).
            std::thread::sleep(Duration::from_secs(2));
            println!("      {}", sync_report(&bed.cluster, &offsets));
            for (k, (_, server)) in bed.servers.iter().enumerate() {
                gbps[v][k].push(iperf(
                    &bed.client.ns,
                    &server.ns,
                    server.ip,
                    o.traffic.seconds,
                )?);
                let rtts = rr(&bed.client.ns, &server.ns, server.ip, o.traffic.round_trips)?;
                p50[v][k].push(percentile(&rtts, 0.5).as_secs_f64() * 1e6);
                p99[v][k].push(percentile(&rtts, 0.99).as_secs_f64() * 1e6);
                let (rtts, lost) =
                    new_flow_rr(&bed.client.ns, server.ip, src_cursor[k], new_flows)?;
                src_cursor[k] += new_flows;
                nf50[v][k].push(percentile(&rtts, 0.5).as_secs_f64() * 1e6);
                nf99[v][k].push(percentile(&rtts, 0.99).as_secs_f64() * 1e6);
                nf_lost[k] += lost;
            }
        }
    }
    write_variant(&bed.cluster, 0, 0)?;
    println!(
        "{:<14} {:>7} {:>9} {:>9}   {:>10} {:>10} {:>9}   {:>10} {:>10} {:>9}",
        "path",
        "rules",
        "Gb/s",
        "% of 0",
        "rr p50",
        "rr p99",
        "% of 0",
        "new p50",
        "new p99",
        "% of 0"
    );
    for (k, (label, _)) in bed.servers.iter().enumerate() {
        let base_t = median(gbps[0][k].clone());
        let base_l = median(p50[0][k].clone());
        let base_n = median(nf50[0][k].clone());
        for (v, rules) in variants.iter().enumerate() {
            let t = median(gbps[v][k].clone());
            let l50 = median(p50[v][k].clone());
            let l99 = median(p99[v][k].clone());
            let n50 = median(nf50[v][k].clone());
            println!(
                "{:<14} {:>7} {:>9.2} {:>8.1}%   {:>8.1}µs {:>8.1}µs {:>8.1}%   {:>8.1}µs {:>8.1}µs {:>8.1}%",
                if v == 0 { *label } else { "" },
                rules,
                t,
                t / base_t * 100.0,
                l50,
                l99,
                l50 / base_l * 100.0,
                n50,
                median(nf99[v][k].clone()),
                n50 / base_n * 100.0
            );
        }
    }
    println!(
        "(goal: throughput ≥ 97 % of no policy; rr = 1-byte TCP request/response on one connection (conntrack \
         after the first packet); new = UDP request/response, {new_flows} per run, each on a new 5-tuple \
         (a policy lookup per request; {} of them lost); % = p50 / no-policy p50)",
        nf_lost.iter().sum::<usize>()
    );
    // Every run's figure, to judge the noise the medians hide.
    for (what, figures) in [("Gb/s", &gbps), ("rr p50 µs", &p50), ("new p50 µs", &nf50)] {
        println!(
            "  per run, {what}: {}",
            variants
                .iter()
                .zip(figures)
                .map(|(r, paths)| format!(
                    "{r} rules: {}",
                    paths
                        .iter()
                        .map(|reps| reps
                            .iter()
                            .map(|g| format!("{g:.1}"))
                            .collect::<Vec<_>>()
                            .join("/"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if enforced == Some(false) {
        println!("(NOT ENFORCED: see the warning above)");
    }
    Ok(())
}

/// `n` UDP request/response round trips to `to`, one after the other, each from a fresh socket on
/// its own source port (starting `first` ports into [`PROBE_SRC_PORTS`]) and the next port of
/// [`NEW_FLOW_PORTS`]: every request is a new flow. Returns the sorted RTTs and how many got no
/// answer within 200 ms.
fn new_flow_rr(
    client: &Netns,
    to: Ipv4Addr,
    first: usize,
    n: usize,
) -> Result<(Vec<Duration>, usize)> {
    client
        .run(move || -> std::io::Result<(Vec<Duration>, usize)> {
            let collector =
                UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, NEW_FLOW_COLLECT))?;
            collector.set_read_timeout(Some(Duration::from_millis(200)))?;
            let span = usize::from(PROBE_SRC_PORTS.end - PROBE_SRC_PORTS.start);
            let ports = *NEW_FLOW_PORTS.end() - *NEW_FLOW_PORTS.start() + 1;
            let (mut rtts, mut lost) = (Vec::with_capacity(n), 0);
            let mut buf = [0u8; 64];
            for i in 0..n {
                let src = PROBE_SRC_PORTS.start + ((first + i) % span) as u16;
                let Ok(s) = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, src)) else {
                    continue;
                };
                let mut payload = [0u8; 10];
                payload[..8].copy_from_slice(&(i as u64).to_le_bytes());
                payload[8..].copy_from_slice(&NEW_FLOW_COLLECT.to_le_bytes());
                let dst = NEW_FLOW_PORTS.start() + (i % usize::from(ports)) as u16;
                let t = Instant::now();
                s.send_to(&payload, SocketAddrV4::new(to, dst))?;
                loop {
                    match collector.recv(&mut buf) {
                        Ok(10) if buf[..8] == payload[..8] => {
                            rtts.push(t.elapsed());
                            break;
                        }
                        Ok(_) => {} // a late answer to an earlier request
                        Err(_) => {
                            lost += 1;
                            break;
                        }
                    }
                }
            }
            rtts.sort();
            Ok((rtts, lost))
        })?
        .context("new-flow request/response")
}

#[derive(Clone, Copy)]
struct Probe {
    sent: Instant,
    answered: bool,
}

/// Answers each probe datagram by sending it to the port its payload names at the sender's
/// address: a new flow, so the prober needs one collecting socket, not one socket per probe kept
/// open until its answer comes (answers may come late on a loaded machine). Stops on drop.
pub(crate) struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    pub(crate) fn start(ns: &Netns, addrs: impl Iterator<Item = SocketAddrV4>) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in addrs {
            // A socket stays in the namespace it was created in, whichever thread then uses it.
            let sock = ns.run(move || UdpSocket::bind(addr))??;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((10, peer)) = sock.recv_from(&mut buf) {
                        let port = u16::from_le_bytes([buf[8], buf[9]]);
                        let _ = sock.send_to(&buf[..10], (peer.ip(), port));
                    }
                }
            }));
        }
        Ok(Echo { stop, threads })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Send times of the probes (index = sequence number) and whether an answer came.
#[derive(Default)]
struct ProbeLog {
    sent: Vec<Instant>,
    answered: Vec<bool>,
}

/// UDP probes from the client to one server every [`PROBE_PERIOD`], each from a fresh socket on
/// the next source port of [`PROBE_SRC_PORTS`] and to the next port of [`PROBE_PORTS`], so no
/// 5-tuple repeats within a run (a conntrack entry of an earlier, allowed probe cannot answer for
/// a later one). Answers come to one collecting port (see [`Echo`]). Stops on drop.
pub(crate) struct Prober {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<ProbeLog>>,
    thread: Option<JoinHandle<Result<std::io::Result<()>>>>,
}

impl Prober {
    pub(crate) fn start(ns: &Netns, to: Ipv4Addr, first_src: u16, collect: u16) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(ProbeLog::default()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = ns.spawn(move || probe_loop(to, first_src, collect, &s, &l))?;
        Ok(Prober {
            stop,
            log,
            thread: Some(thread),
        })
    }

    /// The probes sent in `[from, until)`, in sending order.
    fn between(&self, from: Instant, until: Instant) -> Vec<Probe> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let a = log.sent.partition_point(|s| *s < from);
        let b = log.sent.partition_point(|s| *s < until);
        (a..b.max(a))
            .map(|i| Probe {
                sent: log.sent[i],
                answered: log.answered[i],
            })
            .collect()
    }

    fn check(&mut self) -> Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished())
            && let Some(t) = self.thread.take()
        {
            match t.join() {
                Ok(Ok(Ok(()))) => bail!("prober stopped early"),
                Ok(Ok(Err(e))) => return Err(e).context("prober"),
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("prober panicked"),
            }
        }
        Ok(())
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn probe_loop(
    to: Ipv4Addr,
    first_src: u16,
    collect: u16,
    stop: &AtomicBool,
    log: &Mutex<ProbeLog>,
) -> std::io::Result<()> {
    let collector = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, collect))?;
    collector.set_nonblocking(true)?;
    let mut src = first_src;
    let mut dst = *PROBE_PORTS.start();
    let mut buf = [0u8; 64];
    let mut next = Instant::now();
    let lock = || log.lock().unwrap_or_else(|p| p.into_inner());
    while !stop.load(Ordering::Relaxed) {
        src = if src + 1 >= PROBE_SRC_PORTS.end {
            PROBE_SRC_PORTS.start
        } else {
            src + 1
        };
        dst = if dst == *PROBE_PORTS.end() {
            *PROBE_PORTS.start()
        } else {
            dst + 1
        };
        // A port still held by something else is skipped, not waited for.
        if let Ok(s) = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, src)) {
            let mut log = lock();
            let seq = log.sent.len() as u64;
            let mut payload = [0u8; 10];
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            payload[8..].copy_from_slice(&collect.to_le_bytes());
            log.sent.push(Instant::now());
            log.answered.push(false);
            drop(log);
            let _ = s.send_to(&payload, SocketAddrV4::new(to, dst));
        }
        while let Ok(10) = collector.recv(&mut buf) {
            let seq = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default()) as usize;
            if let Some(a) = lock().answered.get_mut(seq) {
                *a = true;
            }
        }
        next += PROBE_PERIOD;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(())
}

/// Outcome of one change on one path.
pub(crate) struct Observed {
    /// From the rename to the first probe of the final run showing the new verdict.
    pub(crate) latency: Duration,
    /// Probes that showed the old verdict after the first one showing the new.
    pub(crate) flaps: usize,
}

/// Waits until the probes sent after `t0` show `answered` steadily for [`STABLE`]. A probe is
/// judged once [`PROBE_WAIT`] has passed since it was sent: an unanswered probe then really was
/// dropped (on a loaded machine answers can take tens of milliseconds).
pub(crate) fn observe(p: &mut Prober, t0: Instant, answered: bool) -> Result<Option<Observed>> {
    loop {
        p.check()?;
        let decided_until = Instant::now() - PROBE_WAIT;
        let decided = p.between(t0, decided_until);
        if let Some(first_new) = decided.iter().position(|x| x.answered == answered) {
            // Start of the final run of probes showing the new verdict.
            let settled = decided
                .iter()
                .rposition(|x| x.answered != answered)
                .map_or(0, |i| i + 1);
            if settled < decided.len() && decided[settled].sent + STABLE < decided_until {
                return Ok(Some(Observed {
                    latency: decided[settled].sent.saturating_duration_since(t0),
                    flaps: decided[first_new..settled]
                        .iter()
                        .filter(|x| x.answered != answered)
                        .count(),
                }));
            }
        }
        if t0.elapsed() > FLIP_TIMEOUT + PROBE_WAIT {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A small deterministic generator for the pauses between changes (no dependency for it).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn change_to_enforcement(bed: &Bed, backgrounds: &[usize], flips: usize) -> Result<()> {
    println!(
        "\n== manifest change → enforcement: {flips} atomic replacements of one policy file, alternating \
         deny/allow; UDP probe every {} ms per path, fresh 5-tuple each, dropped if unanswered after {} ms ==",
        PROBE_PERIOD.as_millis(),
        PROBE_WAIT.as_millis()
    );
    let allow = policy(
        "bench-flip",
        1,
        &[("UDP", *PROBE_PORTS.start(), *PROBE_PORTS.end())],
    )
    .to_string();
    let mut deny = policy("bench-flip", 1, &[("UDP", 1, 1)]);
    deny["spec"]["ingress"][0]["from"] = json!([{"ipBlock": {"cidr": "192.0.2.1/32"}}]);
    let deny = deny.to_string();
    // Each path's probes start their source ports in their own half of the range.
    let half = (PROBE_SRC_PORTS.end - PROBE_SRC_PORTS.start) / 2;
    let mut probers: Vec<Prober> = bed
        .servers
        .iter()
        .enumerate()
        .map(|(k, (_, s))| {
            Prober::start(
                &bed.client.ns,
                s.ip,
                PROBE_SRC_PORTS.start + half * k as u16,
                COLLECT_BASE + k as u16,
            )
        })
        .collect::<Result<_>>()?;
    let mut rng = Lcg(0x5eed);
    println!(
        "{:<30} {:<14} {:<6} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "cluster state", "path", "to", "p50", "p90", "p99", "max", "flaps"
    );
    for &background in backgrounds {
        write_variant(&bed.cluster, backgrounds.len(), background)?;
        bed.cluster.apply_manifest(FLIP_FILE, &allow)?;
        let t0 = Instant::now();
        for p in probers.iter_mut() {
            if observe(p, t0, true)?.is_none() {
                bail!(
                    "the client's probes are not answered with the allowing policy in place ({FLIP_TIMEOUT:?})"
                );
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        // [path][deny, allow]
        let mut lat = vec![[Vec::new(), Vec::new()]; probers.len()];
        let mut flaps = vec![[0usize; 2]; probers.len()];
        // Per node: from the rename to "state loaded", and to "maps written", per change.
        let mut loaded = vec![Vec::new(); bed.cluster.nodes.len()];
        let mut written = loaded.clone();
        let mut ops = Vec::new();
        let mut slowest_write = Duration::ZERO;
        for f in 0..flips {
            let answered = f % 2 == 1;
            let offsets = log_offsets(&bed.cluster);
            let (before, wall0) = (Instant::now(), SystemTime::now());
            bed.cluster
                .apply_manifest(FLIP_FILE, if answered { &allow } else { &deny })?;
            // The change exists once the rename returned; writing the file is not the daemons'
            // time (on a busy disk it can take a while).
            let t0 = Instant::now();
            slowest_write = slowest_write.max(t0 - before);
            for (k, p) in probers.iter_mut().enumerate() {
                match observe(p, t0, answered)? {
                    Some(o) => {
                        lat[k][answered as usize].push(o.latency);
                        flaps[k][answered as usize] += o.flaps;
                    }
                    None => {
                        let _ = std::fs::remove_file(bed.cluster.manifests_dir().join(FLIP_FILE));
                        bail!(
                            "change {} ({}) not observed on the {} path within {FLIP_TIMEOUT:?}: the dataplane \
                             does not enforce NetworkPolicy (or applies changes far too slowly); \
                             giving up the change-to-enforcement measurement",
                            f + 1,
                            if answered { "allow" } else { "deny" },
                            bed.servers[k].0
                        );
                    }
                }
            }
            // A random pause so the changes do not lock onto the daemons' polling phase.
            std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
            let events = events_since(&bed.cluster, &offsets);
            for (k, node) in events.iter().enumerate() {
                let first = |want: fn(&Event) -> bool| {
                    node.iter()
                        .find(|(_, e)| want(e))
                        .and_then(|(at, _)| at.as_ref()?.duration_since(wall0).ok())
                };
                loaded[k].extend(first(|e| matches!(e, Event::Loaded)));
                written[k].extend(first(|e| matches!(e, Event::Applied(..))));
                ops.extend(node.iter().filter_map(|(_, e)| match e {
                    Event::Applied(n, _) => Some(*n),
                    Event::Loaded => None,
                }));
            }
        }
        let state = if background == 0 {
            "no other policy".to_string()
        } else {
            format!("+ {background}-rule policy")
        };
        for (k, (label, _)) in bed.servers.iter().enumerate() {
            for (d, dir) in ["deny", "allow"].iter().enumerate() {
                let mut v = lat[k][d].clone();
                v.sort();
                println!(
                    "{:<30} {:<14} {:<6} {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>6}",
                    if k == 0 && d == 0 { state.as_str() } else { "" },
                    if d == 0 { *label } else { "" },
                    dir,
                    ms(percentile(&v, 0.5)),
                    ms(percentile(&v, 0.9)),
                    ms(percentile(&v, 0.99)),
                    ms(v.last().copied().unwrap_or_default()),
                    flaps[k][d]
                );
            }
        }
        for (k, n) in bed.cluster.nodes.iter().enumerate() {
            for (what, v) in [("state read", &loaded[k]), ("maps written", &written[k])] {
                let mut v = v.clone();
                v.sort();
                println!(
                    "{:<30} {:<21} {:>6.1}ms {:>6.1}ms {:>6.1}ms {:>6.1}ms   ({} of {} changes)",
                    "",
                    format!("{} {what}", n.name),
                    ms(percentile(&v, 0.5)),
                    ms(percentile(&v, 0.9)),
                    ms(percentile(&v, 0.99)),
                    ms(v.last().copied().unwrap_or_default()),
                    v.len(),
                    flips
                );
            }
        }
        ops.sort();
        // The daemons walk their conntrack map every 5 s (metrics) holding the dataplane lock; how
        // big it is now and how long one walk takes, for outliers of "maps written".
        let ct: Vec<String> = bed
            .cluster
            .nodes
            .iter()
            .map(|n| {
                let t = Instant::now();
                match crate::bpfmap::count_entries(&n.bpf_dir.join("CONNTRACK")) {
                    Ok(k) => format!(
                        "{} CONNTRACK {k} entries (one key walk {:.0} ms)",
                        n.name,
                        ms(t.elapsed())
                    ),
                    Err(e) => format!("{}: {e:#}", n.name),
                }
            })
            .collect();
        println!("{:<30} ({})", "", ct.join("; "));
        println!(
            "{:<30} (times from when the rename returned, the daemons' log clocks against this one's; \
             map ops per sync p50 {}, max {}; writing the file took up to {:.1} ms)",
            "",
            ops.get(ops.len() / 2).copied().unwrap_or(0),
            ops.last().copied().unwrap_or(0),
            ms(slowest_write)
        );
    }
    std::fs::remove_file(bed.cluster.manifests_dir().join(FLIP_FILE))?;
    write_variant(&bed.cluster, 0, 0)?;
    println!(
        "(goal: p99 ≤ 100 ms; {} changes per row; flaps = probes showing the old verdict after one showed the new)",
        flips / 2
    );
    Ok(())
}

/// Part 3: the compile-level figures at cluster scale, in-process.
mod scale {
    use crate::bench::{ms, percentile};
    use anyhow::{Context as _, Result};
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};
    use vpcnet_policy::compile::{Compiled, Compiler, plan};
    use vpcnet_policy::incremental::{Regenerator, diff_state, overlay_local};
    use vpcnet_policy::model::{
        ClusterState, ContainerPort, Namespace, ObjRef, Pod, PodRef, Protocol,
    };

    const NODE: &str = "node-0";
    const NAMESPACES: usize = 100;
    /// Deployments per namespace: pods of one share their labels, as in a real cluster.
    const APPS: usize = 20;

    fn node_of(i: usize, nodes: usize) -> String {
        format!("node-{}", i % nodes)
    }

    fn pod_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000u32 + 0x1_0000 + i as u32)
    }

    fn labels(app: usize, ns: usize) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app".to_string(), format!("app-{app}")),
            (
                "tier".to_string(),
                ["web", "api", "db"][app % 3].to_string(),
            ),
            ("team".to_string(), format!("team-{}", ns % 10)),
        ])
    }

    fn pod(i: usize, nodes: usize) -> Pod {
        let ns = i % NAMESPACES;
        let app = (i / NAMESPACES) % APPS;
        Pod {
            namespace: format!("ns-{ns}"),
            name: format!("pod-{i}"),
            labels: labels(app, ns),
            ip: Some(pod_ip(i)),
            node: Some(node_of(i, nodes)),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            annotations: Default::default(),
        }
    }

    /// Policy `k` of a namespace: selects one app, admits the next app of its namespace and
    /// the same app of the namespaces of one team, on a named and a numbered port; every third
    /// also limits egress to its namespace and an external block.
    fn policy(ns: usize, k: usize) -> vpcnet_policy::model::Policy {
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
        let np = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("p-{k}"), "namespace": format!("ns-{ns}")},
            "spec": spec
        }))
        .expect("generated policy");
        vpcnet_policy::model::Policy::from_k8s(&np).expect("valid policy")
    }

    fn big_policy(rules: usize) -> vpcnet_policy::model::Policy {
        let ingress: Vec<_> = (0..rules)
            .map(|r| {
                json!({"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", r % APPS)}},
                                 "namespaceSelector": {"matchLabels": {"team": format!("team-{}", r % 10)}}}],
                       "ports": [{"protocol": "TCP", "port": 10000 + (r % 5000)}]})
            })
            .collect();
        let np = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "big", "namespace": "ns-0"},
            "spec": {"podSelector": {"matchLabels": {"app": "app-0"}}, "ingress": ingress}
        }))
        .expect("generated policy");
        vpcnet_policy::model::Policy::from_k8s(&np).expect("valid policy")
    }

    fn state(pods: usize, nodes: usize, policies: usize) -> ClusterState {
        let mut s = ClusterState::new();
        for n in 0..NAMESPACES {
            s.upsert_namespace(Namespace::new(
                format!("ns-{n}"),
                BTreeMap::from([("team".to_string(), format!("team-{}", n % 10))]),
            ));
        }
        for i in 0..pods {
            s.upsert_pod(pod(i, nodes));
        }
        for k in 0..policies {
            s.insert_policy(policy(k % NAMESPACES, (k / NAMESPACES) % APPS));
        }
        s
    }

    fn local_of(s: &ClusterState) -> BTreeMap<PodRef, Ipv4Addr> {
        s.pods()
            .filter(|p| p.node.as_deref() == Some(NODE))
            .filter_map(|p| Some((p.key(), p.ip?)))
            .collect()
    }

    fn rss_mib() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<f64>()
                    .ok()
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

    struct Figures {
        before: Vec<Duration>,
        diff: Vec<Duration>,
        after: Vec<Duration>,
        plan: Vec<Duration>,
        regenerated: Vec<usize>,
    }

    fn print(what: &str, f: &mut Figures) {
        for v in [&mut f.before, &mut f.diff, &mut f.after, &mut f.plan] {
            v.sort();
        }
        f.regenerated.sort();
        let row = |label: &str, v: &[Duration]| {
            println!(
                "{:<44} {:<26} {:>8.2}ms {:>8.2}ms {:>8.2}ms  ({} samples)",
                if label.starts_with("full") { what } else { "" },
                label,
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.99)),
                ms(v.last().copied().unwrap_or_default()),
                v.len()
            )
        };
        row("full compile (before)", &f.before);
        row("whole-state diff (now)", &f.diff);
        row("incremental compile (now)", &f.after);
        row("plan old → new (both)", &f.plan);
        println!(
            "{:<44} endpoints regenerated per change: median {}, max {}",
            "",
            f.regenerated
                .get(f.regenerated.len() / 2)
                .copied()
                .unwrap_or(0),
            f.regenerated.last().copied().unwrap_or(0)
        );
    }

    /// Times `changes` state changes made by `mutate` through both compilers. The full
    /// compilation is timed on every tenth change only (it is the slow one).
    fn measure(
        base: &mut ClusterState,
        local: &mut BTreeMap<PodRef, Ipv4Addr>,
        regen: &mut Regenerator,
        full: &mut Compiler,
        changes: usize,
        mut mutate: impl FnMut(usize, &mut ClusterState, &mut BTreeMap<PodRef, Ipv4Addr>),
    ) -> Figures {
        let mut f = Figures {
            before: Vec::new(),
            diff: Vec::new(),
            after: Vec::new(),
            plan: Vec::new(),
            regenerated: Vec::new(),
        };
        let mut last: Compiled = regen.compiled().clone();
        for i in 0..changes {
            let before = base.clone();
            mutate(i, base, local);
            // A whole-state source (the manifest directory) is diffed first; the agent skips
            // that when the state did not change (an ADD), and a watch source has the
            // object changes already.
            let t = Instant::now();
            let changes = if before.generation() == base.generation() {
                Vec::new()
            } else {
                diff_state(&before, base)
            };
            f.diff.push(t.elapsed());
            let t = Instant::now();
            regen.apply_all(changes);
            regen.set_local(local.clone());
            regen.compile();
            f.after.push(t.elapsed());
            let c = regen.compiled();
            f.regenerated.push(regen.stats().endpoints);
            let t = Instant::now();
            let p = plan(&last, c);
            f.plan.push(t.elapsed());
            std::hint::black_box(&p);
            last = c.clone();
            if i.is_multiple_of(10) {
                let t = Instant::now();
                let c = full.compile(&overlay_local(base, local, NODE));
                f.before.push(t.elapsed());
                std::hint::black_box(&c);
            }
        }
        f
    }

    pub fn run(pods: usize, nodes: usize, policies: usize, changes: usize) -> Result<()> {
        println!(
            "\n== scale, in-process: {pods} pods on {nodes} nodes in {NAMESPACES} namespaces, {policies} policies; \
             compiled for {NODE} ==",
        );
        let rss0 = rss_mib();
        let t = Instant::now();
        let mut base = state(pods, nodes, policies);
        let mut local = local_of(&base);
        let built = t.elapsed();
        let rss_state = rss_mib();

        let t = Instant::now();
        let mut full = Compiler::new(Some(NODE.into()));
        let first = full.compile(&overlay_local(&base, &local, NODE));
        let full_first = t.elapsed();
        let t = Instant::now();
        let mut regen = Regenerator::new(NODE);
        regen.set_local(local.clone());
        regen.apply_all(diff_state(&ClusterState::new(), &base));
        let c = regen.compile();
        let regen_first = t.elapsed();
        anyhow::ensure!(
            c.endpoints.len() == first.endpoints.len()
                && c.ip_identity.len() == first.ip_identity.len(),
            "incremental and full compilation disagree on the generated state"
        );
        println!(
            "state generated in {:.0} ms: {} local endpoints, {} identities, {} addresses",
            ms(built),
            c.endpoints.len(),
            c.identities.len(),
            c.ip_identity.len()
        );
        println!(
            "first compilation: full {:.0} ms, incremental (from nothing) {:.0} ms",
            ms(full_first),
            ms(regen_first)
        );
        drop(first);
        let rss_all = rss_mib();
        println!(
            "{:<44} {:<26} {:>10} {:>10} {:>10}",
            "change", "", "p50", "p99", "max"
        );

        // A remote pod's labels flip between two apps, alternately matched by policies that
        // select pods on this node.
        let remote = (0..pods)
            .find(|i| node_of(*i, nodes) != NODE && (i / NAMESPACES) % APPS == 3)
            .context("no remote pod to change")?;
        let key = ObjRef::new(
            format!("ns-{}", remote % NAMESPACES),
            format!("pod-{remote}"),
        );
        let mut f = measure(
            &mut base,
            &mut local,
            &mut regen,
            &mut full,
            changes,
            |i, s, _| {
                let mut p = s.pod(&key).expect("generated").clone();
                p.labels.insert(
                    "app".into(),
                    format!("app-{}", if i % 2 == 0 { 4 } else { 3 }),
                );
                s.upsert_pod(p);
            },
        );
        print("one remote pod's label change", &mut f);

        // ADD then DEL of a pod on this node (its own labels come from the state).
        let new_pod = |i: usize| ObjRef::new("ns-1", format!("added-{i}"));
        let mut f = measure(
            &mut base,
            &mut local,
            &mut regen,
            &mut full,
            changes,
            |i, _, l| {
                if i % 2 == 0 {
                    l.insert(new_pod(i), Ipv4Addr::new(10, 255, 0, (i % 250) as u8 + 1));
                } else {
                    l.remove(&new_pod(i - 1));
                }
            },
        );
        print("ADD / DEL of a local pod", &mut f);

        // The 10,000-rule policy in force on a local endpoint; a small policy beside it flips.
        base.insert_policy(big_policy(10_000));
        let mut f = measure(
            &mut base,
            &mut local,
            &mut regen,
            &mut full,
            changes.min(40),
            |i, s, _| {
                let mut p = policy(0, 5);
                p.name = "flip".into();
                if i % 2 == 0 {
                    s.insert_policy(p);
                } else {
                    s.remove_policy(&ObjRef::new("ns-0", "flip"));
                }
            },
        );
        print("policy change beside the 10,000-rule policy", &mut f);
        println!(
            "RSS of this process: {:.0} MiB at start, {:.0} MiB with the state, {:.0} MiB with the \
             incremental compiler and its output (goal for the daemon: ≤ 150 MiB)",
            rss0, rss_state, rss_all
        );
        println!(
            "(goal: one pod's label change enforced ≤ 100 ms p99; compile + plan are this process's share)"
        );
        Ok(())
    }
}
