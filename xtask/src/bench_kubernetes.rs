//! `cargo xtask bench kubernetes`: vpcnet's Kubernetes mode against a real API server (envtest
//! convention: `KUBEBUILDER_ASSETS` names a directory with `kube-apiserver` and `etcd`; without
//! it this says so in one loud line and exits 0), next to a standalone-mode cluster built in the
//! same run as the reference. Both have two node daemons in network namespaces; the Kubernetes
//! ones reach the API server through a relay on their own loopback, as the e2e suite runs them.
//! This program plays kubelet's part: Pod objects bound to a node, the plugin run as a runtime
//! runs it, the pod's status written back.
//!
//! - ADD latency (the plugin's whole run, veth included) of `--pods` pods spread over both nodes,
//!   the two modes interleaved pod by pod; each pod's object is in its node's watched state first,
//!   as it is when a kubelet creates the sandbox.
//! - Block claims: the first pod of a fresh Subnet (a namespace selector serves it, no node holds
//!   a block of it yet) must claim a block through the API server before its ADD returns; the
//!   second pod of the same Subnet right after it must not. The daemon's log says when it had the
//!   block; its own claim figure is printed if its metrics expose one.
//! - API write → enforced on every node: a client pod on node1 probes a server pod on each node
//!   with UDP datagrams every millisecond, each on a 5-tuple of its own (as `bench policy`), while
//!   a NetworkPolicy selecting the servers is switched between admitting and refusing the client
//!   (`--flips` writes), then while the client's label is switched with the admitting policy in
//!   force. Per node, the time from the write's request going out (curl's own timings place it
//!   before the answer; the watch can deliver the change before the answer is back) to the first
//!   probe of the final run showing the new verdict; "every node" is the later of the two per
//!   write, also shown from the write's return. The standalone reference makes the same changes by
//!   replacing manifest files (timed from the rename).
//! - The daemons' RSS once the pods are in.

use crate::bench::{ms, percentile};
use crate::bench_policy::{
    COLLECT_BASE, Echo, Event, PROBE_PORTS, PROBE_SRC_PORTS, Prober, events_since, log_offsets,
    observe,
};
use crate::bench_policy::{parse_rfc3339, strip_ansi};
use crate::bench_scale::memory_of;
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use vpcnet_tests::apiserver::{ADMIN_TOKEN, ControlPlane};
use vpcnet_tests::cluster::{Node, PHYS_CIDR, ROUTER_VPC_IP, VPC_CIDR};
use vpcnet_tests::cni::{CniEnv, Pod, exec_plugin, net_config};
use vpcnet_tests::kube::{conflist, k8s_config, node_kubeconfig, wait_for};
use vpcnet_tests::relay::Relay;
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

#[derive(clap::Args)]
pub struct Options {
    /// Pods timed per mode (spread over both nodes).
    #[arg(long, default_value_t = 30)]
    pods: usize,
    /// Fresh Subnets whose first pod claims a block (spread over both nodes).
    #[arg(long, default_value_t = 6)]
    fresh_subnets: usize,
    /// Writes per change kind and mode, alternating refuse and admit.
    #[arg(long, default_value_t = 30)]
    flips: usize,
}

const NS: &str = "bench";
const NODES: usize = 2;
/// The standalone reference's fixed addresses (its blocks are 10.20.{node+1}.0/24); the
/// Kubernetes pods take theirs from the Subnet's blocks.
const REF_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 10);
const REF_SERVER_IPS: [Ipv4Addr; NODES] =
    [Ipv4Addr::new(10, 20, 1, 20), Ipv4Addr::new(10, 20, 2, 20)];
const POLICY: &str = "flip";
/// The Kubernetes `main` Subnet; the fresh ones lie above it, one /24 each.
const MAIN_CIDR: &str = "10.20.0.0/17";
const GOAL: Duration = Duration::from_secs(1);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn node_name(i: usize) -> String {
    format!("node{}", i + 1)
}

fn filler(i: usize) -> String {
    format!("pod-{i}")
}

fn fresh_cidr(k: usize) -> String {
    format!("10.20.{}.0/24", 130 + k)
}

/// The policy selecting the servers: admits the client on the probe ports, or admits nobody.
fn flip_policy(admit: bool) -> Value {
    let from = if admit { "client" } else { "nobody" };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": POLICY, "namespace": NS},
           "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}],
                                 "ports": [{"protocol": "UDP", "port": *PROBE_PORTS.start(),
                                            "endPort": *PROBE_PORTS.end()}]}]}})
}

fn client_labels(admitted: bool) -> Value {
    json!({"app": if admitted { "client" } else { "client-off" }})
}

/// A pod object; `node` as the scheduler binds it, `ip` as a fixed-address annotation.
fn pod_doc(
    ns: &str,
    name: &str,
    labels: Value,
    node: Option<usize>,
    ip: Option<Ipv4Addr>,
) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "none"}]}});
    if let Some(n) = node {
        p["spec"]["nodeName"] = json!(node_name(n));
    }
    if let Some(ip) = ip {
        p["metadata"]["annotations"] = json!({"vpcnet.io/ip": ip.to_string()});
    }
    p
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// One timed write: how long it took as a whole (process, connection and TLS set-up included)
/// and how long its request was out before the answer came back.
#[derive(Clone, Copy)]
struct Write {
    took: Duration,
    in_flight: Duration,
}

/// The control plane, driven by kubectl for set-up and by curl for the timed writes (one HTTP
/// request, no discovery round trips: the write's return is the API server's answer).
struct Kube {
    cp: ControlPlane,
}

impl Kube {
    fn apply(&self, doc: &Value) -> Result<()> {
        self.cp
            .kubectl(&["apply", "-f", "-"], Some(&doc.to_string()))?;
        Ok(())
    }

    fn get(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.cp.kubectl(&a, None)?)?)
    }

    /// A JSON merge patch of `path`.
    fn patch(&self, path: &str, body: &Value) -> Result<Write> {
        let t = Instant::now();
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--cacert"])
            .arg(self.cp.dir().join("ca.crt"))
            .args([
                "-H",
                &format!("Authorization: Bearer {ADMIN_TOKEN}"),
                "-H",
                "Content-Type: application/merge-patch+json",
                "-X",
                "PATCH",
                "-o",
                "/dev/null",
                // curl's own clock: when the request was about to go out, and when the answer
                // was in (seconds since curl started).
                "-w",
                "%{time_pretransfer} %{time_total}",
                "--data-binary",
                &body.to_string(),
                &format!("{}{path}", self.cp.url),
            ])
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!(
                "PATCH {path}: {} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        let [sent, answered] = times[..] else {
            bail!("curl printed no timings: {:?}", out.stdout);
        };
        Ok(Write {
            took,
            in_flight: Duration::from_secs_f64((answered - sent).max(0.0)),
        })
    }

    /// What kubelet reports once the sandbox has its address.
    fn pod_running(&self, pod: &Pod) -> Result<()> {
        let ip = pod.ip.to_string();
        self.patch(
            &format!(
                "/api/v1/namespaces/{}/pods/{}/status",
                pod.namespace, pod.name
            ),
            &json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
        )?;
        Ok(())
    }

    fn version(&self) -> String {
        self.cp
            .kubectl(&["get", "--raw", "/version"], None)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["gitVersion"].as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    }
}

// The next three are copied from tests/tests/kubernetes_e2e.rs (not in tests/src): to be moved
// into the harness and shared.

/// One mode's cluster with its probe pods. Fields drop in order: the echo servers, the pods'
/// namespaces, the daemons and the fabric, then the relays.
struct Bed {
    label: &'static str,
    echo: Vec<Echo>,
    client: Pod,
    /// Server `k` runs on node `k`.
    servers: Vec<Pod>,
    pods: Vec<Pod>,
    cluster: Cluster,
    _relays: Vec<Relay>,
}

/// Runs ADD for a pod as a runtime does and returns it with the plugin's run time.
fn add(c: &Cluster, node: usize, ns: &str, name: &str) -> Result<(Pod, Duration)> {
    let netns = Netns::create(&format!("{}-{ns}-{name}", c.prefix))?;
    let container_id = format!("bench{}{ns}{name}", c.prefix);
    let config = net_config(c.node(node), "1.1.0");
    let env = CniEnv::new("ADD", &container_id, &netns.path_string(), "eth0").k8s(ns, name);
    let out = exec_plugin(&c.node(node).ns, "vpcnet", &env, &config.to_string())?;
    if !out.success {
        bail!(
            "ADD of {ns}/{name} on {} failed: {} {}\n{}",
            node_name(node),
            out.stdout.trim(),
            out.stderr.trim(),
            c.node(node).log_tail()
        );
    }
    let result = out.json()?;
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in ADD result {result}"))?;
    let pod = Pod {
        name: name.into(),
        namespace: ns.into(),
        node,
        ns: netns,
        container_id,
        ifname: "eth0".into(),
        ip,
        result,
        config,
    };
    Ok((pod, out.elapsed))
}

/// Waits until the node's daemon has the pod in its cluster state (a runtime's ADD comes after
/// the pod's object exists; the bench times the ADD, not the watch).
fn wait_known(c: &Cluster, node: usize, ns: &str, name: &str) -> Result<()> {
    let n = c.node(node);
    let target = format!("{ns}/{name}");
    wait_for(
        &format!("{target} in {}'s state", n.name),
        Duration::from_secs(30),
        || n.ctl(&["policy", &target]).ok(),
    )
    .with_context(|| n.log_tail())?;
    Ok(())
}

fn kube_objects(o: &Options) -> Vec<Value> {
    let mut items = vec![json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS}})];
    for k in 0..o.fresh_subnets {
        let ns = format!("fresh-{k}");
        items.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"fresh": k.to_string()}}}));
        items.push(json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "Subnet",
            "metadata": {"name": ns},
            "spec": {"network": "vpc-a", "cidr": fresh_cidr(k), "blockSize": 26,
                     "namespaceSelector": {"matchLabels": {"fresh": k.to_string()}}}}));
        for name in ["first", "second"] {
            items.push(pod_doc(&ns, name, json!({}), Some(k % NODES), None));
        }
    }
    items.push(pod_doc(NS, "client", client_labels(true), Some(0), None));
    for k in 0..NODES {
        items.push(pod_doc(
            NS,
            &format!("server{k}"),
            json!({"app": "server"}),
            Some(k),
            None,
        ));
    }
    for i in 0..o.pods {
        items.push(pod_doc(
            NS,
            &filler(i),
            json!({"app": "filler"}),
            Some(i % NODES),
            None,
        ));
    }
    items.push(flip_policy(true));
    items
}

fn kube_bed(kube: &Kube, o: &Options) -> Result<(Bed, Duration)> {
    let cp = &kube.cp;
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds.yaml");
    cp.kubectl(&["apply", "-f", &crds.to_string_lossy()], None)?;
    cp.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        None,
    )?;
    let mut items: Vec<Value> = (0..NODES)
        .map(|i| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(i)}}))
        .collect();
    items.push(
        json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "VirtualNetwork",
        "metadata": {"name": "vpc-a"},
        "spec": {"id": 1, "default": true, "routableCidrs": [VPC_CIDR, PHYS_CIDR]}}),
    );
    items.push(json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": "main"},
        "spec": {"network": "vpc-a", "cidr": MAIN_CIDR, "gateway": ROUTER_VPC_IP.to_string(),
            "reserved": [{"start": "10.20.0.1", "end": "10.20.0.255"}],
            "blockSize": 26, "default": true}}));
    items.extend(kube_objects(o));
    kube.apply(&list(items))?;

    let mut c = Cluster::build(ClusterSpec {
        nodes: NODES,
        cooldown_secs: 1,
        dataplane: true,
    })?;
    let target: SocketAddr = cp
        .url
        .trim_start_matches("https://")
        .parse()
        .context("API server URL")?;
    let mut relays = Vec::new();
    for i in 0..NODES {
        let relay = Relay::start(&c.node(i).ns, target)?;
        let kc = node_kubeconfig(cp, c.node(i), relay.port)?;
        std::fs::write(&c.node(i).config_path, k8s_config(c.node(i), &kc))?;
        relays.push(relay);
    }
    let t0 = Instant::now();
    for i in 0..NODES {
        c.node_mut(i).spawn_daemon()?;
    }
    for i in 0..NODES {
        let node = c.node(i);
        wait_for("conflist written once ready", READY_TIMEOUT, || {
            conflist(node).exists().then_some(())
        })
        .with_context(|| node.log_tail())?;
    }
    let ready = t0.elapsed();
    let (client, servers) = probe_pods(&c, Some(kube))?;
    Ok((
        Bed {
            label: "kubernetes",
            echo: Vec::new(),
            client,
            servers,
            pods: Vec::new(),
            cluster: c,
            _relays: relays,
        },
        ready,
    ))
}

fn standalone_bed(o: &Options) -> Result<Bed> {
    let mut c = Cluster::build(ClusterSpec {
        nodes: NODES,
        cooldown_secs: 30,
        dataplane: true,
    })?;
    let mut items = vec![json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS}})];
    for (k, ip) in REF_SERVER_IPS.iter().enumerate() {
        items.push(pod_doc(
            NS,
            &format!("server{k}"),
            json!({"app": "server"}),
            Some(k),
            Some(*ip),
        ));
    }
    for i in 0..o.pods {
        items.push(pod_doc(
            NS,
            &filler(i),
            json!({"app": "filler"}),
            Some(i % NODES),
            None,
        ));
    }
    c.apply_manifest("pods.json", &list(items).to_string())?;
    write_ref_client(&c, true)?;
    c.apply_manifest("flip.json", &flip_policy(true).to_string())?;
    for i in 0..NODES {
        c.node_mut(i).start_daemon()?;
    }
    let (client, servers) = probe_pods(&c, None)?;
    Ok(Bed {
        label: "standalone",
        echo: Vec::new(),
        client,
        servers,
        pods: Vec::new(),
        cluster: c,
        _relays: Vec::new(),
    })
}

fn write_ref_client(c: &Cluster, admitted: bool) -> Result<()> {
    let doc = pod_doc(
        NS,
        "client",
        client_labels(admitted),
        Some(0),
        Some(REF_CLIENT_IP),
    );
    c.apply_manifest("client.json", &doc.to_string())
}

/// The client (node1) and one server per node, added and (Kubernetes) reported running.
fn probe_pods(c: &Cluster, kube: Option<&Kube>) -> Result<(Pod, Vec<Pod>)> {
    let mut pods = Vec::new();
    for (node, name) in [(0, "client".to_string())]
        .into_iter()
        .chain((0..NODES).map(|k| (k, format!("server{k}"))))
    {
        for n in 0..NODES {
            wait_known(c, n, NS, &name)?;
        }
        let (pod, _) = add(c, node, NS, &name)?;
        if let Some(k) = kube {
            k.pod_running(&pod)?;
        }
        pods.push(pod);
    }
    let client = pods.remove(0);
    Ok((client, pods))
}

fn memory(bed: &Bed) -> Result<Vec<(f64, f64)>> {
    bed.cluster
        .nodes
        .iter()
        .map(|n| memory_of(n.daemon_pid().context("vpcnetd pid")?))
        .collect()
}

/// Block claims by this node's daemon logged since `offset`: (log time, the line).
fn claims_logged(node: &Node, offset: u64) -> Vec<(Option<SystemTime>, String)> {
    let text = std::fs::read(node.dir.join("vpcnetd.log")).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default());
    text.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("claimed an IPAM block"))
        .map(|l| (l.split_whitespace().next().and_then(parse_rfc3339), l))
        .collect()
}

/// The daemon's own block-claim figures, if its metrics expose any.
fn claim_metrics(node: &Node) -> Vec<String> {
    let Ok(out) = node
        .ns
        .exec("curl", &["-sS", "-m", "2", "http://127.0.0.1:9962/metrics"])
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("claim") || l.contains("block")))
        .map(str::to_string)
        .collect()
}

struct Claims {
    claiming: Vec<Duration>,
    not_claiming: Vec<Duration>,
    /// ADD start → "claimed an IPAM block" in the daemon's log.
    logged: Vec<Duration>,
    /// Fresh subnets already holding a block before their first ADD (should be 0).
    preclaimed: usize,
}

fn block_claims(kube: &Kube, bed: &mut Bed, o: &Options) -> Result<Claims> {
    let blocks = kube.get(&["ipblocks"])?;
    let preclaimed = blocks["items"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|b| {
                    b["spec"]["subnet"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("fresh-"))
                })
                .count()
        })
        .unwrap_or(0);
    let mut f = Claims {
        claiming: Vec::new(),
        not_claiming: Vec::new(),
        logged: Vec::new(),
        preclaimed,
    };
    for k in 0..o.fresh_subnets {
        let ns = format!("fresh-{k}");
        let node = k % NODES;
        let inside = |ip: Ipv4Addr| ip.octets()[..3] == [10, 20, 130 + k as u8];
        for name in ["first", "second"] {
            wait_known(&bed.cluster, node, &ns, name)?;
        }
        let offset = std::fs::metadata(bed.cluster.node(node).dir.join("vpcnetd.log"))?.len();
        let wall0 = SystemTime::now();
        let (first, took) = add(&bed.cluster, node, &ns, "first")?;
        let (second, took2) = add(&bed.cluster, node, &ns, "second")?;
        for p in [&first, &second] {
            if !inside(p.ip) {
                bail!(
                    "{ns}/{} got {}, outside its Subnet {}",
                    p.name,
                    p.ip,
                    fresh_cidr(k)
                );
            }
        }
        f.claiming.push(took);
        f.not_claiming.push(took2);
        std::thread::sleep(Duration::from_millis(200));
        let claimed = claims_logged(bed.cluster.node(node), offset);
        f.logged.extend(
            claimed
                .iter()
                .find(|(_, l)| l.contains(&ns))
                .and_then(|(at, _)| at.as_ref()?.duration_since(wall0).ok()),
        );
        kube.pod_running(&first)?;
        kube.pod_running(&second)?;
        bed.pods.push(first);
        bed.pods.push(second);
    }
    for v in [&mut f.claiming, &mut f.not_claiming, &mut f.logged] {
        v.sort();
    }
    Ok(f)
}

/// Per-write latencies of one kind of change on one bed, from the moment the write's request
/// went out (the API server may publish the change before its answer is back).
#[derive(Default)]
struct Enforced {
    /// [node] request sent → the node's server shows the new verdict.
    per_node: Vec<Vec<Duration>>,
    /// The later of the nodes, per write.
    every: Vec<Duration>,
    /// The same from the write's return (0 when enforced before the answer was back).
    every_from_return: Vec<Duration>,
    /// [node] request sent → "NetworkPolicy applied" in the node's log.
    written: Vec<Vec<Duration>>,
    /// How long the writes took as a whole, and their requests' time in flight.
    write: Vec<Duration>,
    in_flight: Vec<Duration>,
    flaps: usize,
}

/// A small deterministic generator for the pauses between changes.
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

/// `write(admit)` makes the change that admits or refuses the client and returns its timing;
/// `flips` writes alternate, starting with a refusal.
fn enforcement(
    bed: &Bed,
    probers: &mut [Prober],
    flips: usize,
    what: &str,
    mut write: impl FnMut(bool) -> Result<Write>,
) -> Result<Enforced> {
    write(true)?;
    let t0 = Instant::now();
    for (k, p) in probers.iter_mut().enumerate() {
        if observe(p, t0, true)?.is_none() {
            bail!(
                "{}: the client's probes to {} are not answered while admitted; log:\n{}",
                bed.label,
                bed.servers[k].ip,
                bed.cluster.node(k).log_tail()
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut e = Enforced {
        per_node: vec![Vec::new(); NODES],
        written: vec![Vec::new(); NODES],
        ..Enforced::default()
    };
    let mut rng = Lcg(0x5eed);
    for f in 0..flips {
        let admit = f % 2 == 1;
        let offsets = log_offsets(&bed.cluster);
        let w = write(admit)?;
        let (back, wall_back) = (Instant::now(), SystemTime::now());
        // The change may exist from the moment the request went out.
        let (t0, wall0) = (back - w.in_flight, wall_back - w.in_flight);
        e.write.push(w.took);
        e.in_flight.push(w.in_flight);
        let mut latest = Duration::ZERO;
        for (k, p) in probers.iter_mut().enumerate() {
            match observe(p, t0, admit)? {
                Some(obs) => {
                    e.per_node[k].push(obs.latency);
                    e.flaps += obs.flaps;
                    latest = latest.max(obs.latency);
                }
                None => bail!(
                    "{}: {what} {} ({}) not enforced on {} in time; log:\n{}",
                    bed.label,
                    f + 1,
                    if admit { "admit" } else { "refuse" },
                    node_name(k),
                    bed.cluster.node(k).log_tail()
                ),
            }
        }
        e.every.push(latest);
        e.every_from_return.push(latest.saturating_sub(w.in_flight));
        // A random pause so the writes do not lock onto any periodic work of the daemons.
        std::thread::sleep(Duration::from_millis(20 + rng.below(80)));
        for (k, events) in events_since(&bed.cluster, &offsets).iter().enumerate() {
            e.written[k].extend(
                events
                    .iter()
                    .find(|(_, ev)| matches!(ev, Event::Applied(..)))
                    .and_then(|(at, _)| at.as_ref()?.duration_since(wall0).ok()),
            );
        }
    }
    for v in e.per_node.iter_mut().chain(e.written.iter_mut()) {
        v.sort();
    }
    for v in [
        &mut e.every,
        &mut e.every_from_return,
        &mut e.write,
        &mut e.in_flight,
    ] {
        v.sort();
    }
    Ok(e)
}

fn probers(bed: &Bed) -> Result<Vec<Prober>> {
    // Each path's probes start their source ports in their own half of the range.
    let half = (PROBE_SRC_PORTS.end - PROBE_SRC_PORTS.start) / NODES as u16;
    bed.servers
        .iter()
        .enumerate()
        .map(|(k, s)| {
            Prober::start(
                &bed.client.ns,
                s.ip,
                PROBE_SRC_PORTS.start + half * k as u16,
                COLLECT_BASE + k as u16,
            )
        })
        .collect()
}

/// Both kinds of change on one bed: (NetworkPolicy, pod label).
fn changes(bed: &Bed, kube: Option<&Kube>, flips: usize) -> Result<(Enforced, Enforced)> {
    let mut p = probers(bed)?;
    let policy = enforcement(bed, &mut p, flips, "policy change", |admit| match kube {
        Some(k) => k.patch(
            &format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/{POLICY}"),
            &json!({"spec": flip_policy(admit)["spec"]}),
        ),
        None => {
            let t = Instant::now();
            bed.cluster
                .apply_manifest("flip.json", &flip_policy(admit).to_string())?;
            // The rename at its end is the change.
            Ok(Write {
                took: t.elapsed(),
                in_flight: Duration::ZERO,
            })
        }
    })?;
    let label = enforcement(bed, &mut p, flips, "label change", |admit| match kube {
        Some(k) => k.patch(
            &format!("/api/v1/namespaces/{NS}/pods/client"),
            &json!({"metadata": {"labels": client_labels(admit)}}),
        ),
        None => {
            let t = Instant::now();
            write_ref_client(&bed.cluster, admit)?;
            Ok(Write {
                took: t.elapsed(),
                in_flight: Duration::ZERO,
            })
        }
    })?;
    Ok((policy, label))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn row(what: &str, a: String, b: String, goal: &str) {
    println!("{what:<52} {a:>14} {b:>16} {goal:>10}");
}

fn dur(d: Duration) -> String {
    format!("{:.1} ms", ms(d))
}

fn pct(v: &[Duration], p: f64) -> String {
    if v.is_empty() {
        "n/a".into()
    } else {
        dur(percentile(v, p))
    }
}

pub fn run(o: Options) -> Result<()> {
    let Some(assets) = ControlPlane::assets_or_skip("bench kubernetes") else {
        return Ok(());
    };
    if o.pods == 0 || o.fresh_subnets == 0 || o.flips < 2 {
        bail!("need at least one pod, one fresh subnet and two flips");
    }
    println!("load average at the start: {}", load_average());
    let t = Instant::now();
    let kube = Kube {
        cp: ControlPlane::start(&assets).context("starting etcd + kube-apiserver")?,
    };
    let version = kube.version();
    println!(
        "\n== vpcnet in Kubernetes mode against kube-apiserver {version} ({}), 2 node daemons in \
         namespaces; reference: a 2-node standalone cluster in the same run ==",
        assets.display()
    );
    println!("control plane up in {:.1} s", t.elapsed().as_secs_f64());
    let (mut k8s, ready) = kube_bed(&kube, &o)?;
    println!(
        "Kubernetes daemons ready (conflist written) {:.1} s after start",
        ready.as_secs_f64()
    );
    let mut reference = standalone_bed(&o)?;
    for bed in [&mut k8s, &mut reference] {
        bed.echo = bed
            .servers
            .iter()
            .map(|s| Echo::start(&s.ns, PROBE_PORTS.map(|port| SocketAddrV4::new(s.ip, port))))
            .collect::<Result<_>>()?;
    }

    // ADD latency, the modes interleaved pod by pod.
    let offsets = log_offsets(&k8s.cluster);
    let mut lat = [Vec::new(), Vec::new()];
    for i in 0..o.pods {
        let node = i % NODES;
        for (m, bed) in [&mut k8s, &mut reference].into_iter().enumerate() {
            wait_known(&bed.cluster, node, NS, &filler(i))?;
            let (pod, took) = add(&bed.cluster, node, NS, &filler(i))?;
            lat[m].push(took);
            if m == 0 {
                kube.pod_running(&pod)?;
            }
            bed.pods.push(pod);
        }
    }
    for v in &mut lat {
        v.sort();
    }
    let claims_during: usize = k8s
        .cluster
        .nodes
        .iter()
        .zip(&offsets)
        .map(|(n, off)| claims_logged(n, *off).len())
        .sum();
    std::thread::sleep(Duration::from_secs(2));
    let rss = [memory(&k8s)?, memory(&reference)?];

    let claims = block_claims(&kube, &mut k8s, &o)?;
    let daemon_claim: Vec<String> = k8s
        .cluster
        .nodes
        .iter()
        .flat_map(|n| {
            claim_metrics(n)
                .into_iter()
                .map(|l| format!("{}: {l}", n.name))
                .collect::<Vec<_>>()
        })
        .collect();

    let k8s_changes = changes(&k8s, Some(&kube), o.flips)?;
    let ref_changes = changes(&reference, None, o.flips)?;

    println!(
        "\n{:<52} {:>14} {:>16} {:>10}",
        "figure", "kubernetes", "standalone (ref)", "goal"
    );
    println!(
        "-- ADD (plugin run, veth included), {} pods per mode over 2 nodes, interleaved --",
        o.pods
    );
    for (what, p) in [("ADD p50", 0.5), ("ADD p99", 0.99), ("ADD max", 1.0)] {
        row(what, pct(&lat[0], p), pct(&lat[1], p), "");
    }
    row(
        "ADD p50 kubernetes / standalone",
        format!(
            "{:.2}",
            ms(percentile(&lat[0], 0.5)) / ms(percentile(&lat[1], 0.5))
        ),
        String::new(),
        "",
    );
    row(
        "block claims logged during these ADDs",
        claims_during.to_string(),
        "-".into(),
        "0",
    );
    println!(
        "-- block claim: first pod of a fresh Subnet vs the second, {} Subnets --",
        o.fresh_subnets
    );
    for (what, p) in [("p50", 0.5), ("max", 1.0)] {
        row(
            &format!("ADD that claims a block {what}"),
            pct(&claims.claiming, p),
            "-".into(),
            "",
        );
        row(
            &format!("ADD in the same Subnet right after {what}"),
            pct(&claims.not_claiming, p),
            "-".into(),
            "",
        );
        row(
            &format!("  ADD start → \"claimed an IPAM block\" (log) {what}"),
            pct(&claims.logged, p),
            "-".into(),
            "",
        );
    }
    row(
        "fresh Subnets holding a block before their first ADD",
        claims.preclaimed.to_string(),
        "-".into(),
        "0",
    );
    if daemon_claim.is_empty() {
        println!(
            "  (the daemon's own claim time is not exposed: no claim or block metric on /metrics)"
        );
    } else {
        for l in &daemon_claim {
            println!("  daemon metric {l}");
        }
    }
    for (kind, a, b) in [
        ("NetworkPolicy", &k8s_changes.0, &ref_changes.0),
        ("pod label", &k8s_changes.1, &ref_changes.1),
    ] {
        println!(
            "-- {kind} write → enforced, {} writes alternating refuse/admit; request sent (rename \
             for the reference) → first probe of the new verdict --",
            o.flips
        );
        for k in 0..NODES {
            for (what, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
                row(
                    &format!("{} {what}", node_name(k)),
                    pct(&a.per_node[k], p),
                    pct(&b.per_node[k], p),
                    "",
                );
            }
        }
        for (what, p, goal) in [
            ("p50", 0.5, ""),
            ("p99", 0.99, "≤ 1000 ms"),
            ("max", 1.0, ""),
        ] {
            row(
                &format!("every node {what}"),
                pct(&a.every, p),
                pct(&b.every, p),
                goal,
            );
        }
        for (what, p) in [("p50", 0.5), ("p99", 0.99)] {
            row(
                &format!("  every node, from the write's return {what}"),
                pct(&a.every_from_return, p),
                pct(&b.every_from_return, p),
                "",
            );
        }
        for k in 0..NODES {
            row(
                &format!("  {} maps written (log) p50", node_name(k)),
                pct(&a.written[k], 0.5),
                pct(&b.written[k], 0.5),
                "",
            );
        }
        row(
            "  the write itself p50 (curl PATCH / file rename)",
            pct(&a.write, 0.5),
            pct(&b.write, 0.5),
            "",
        );
        row(
            "  its request in flight p50 (sent → answer)",
            pct(&a.in_flight, 0.5),
            "-".into(),
            "",
        );
        row(
            "flaps (old verdict after the new one)",
            a.flaps.to_string(),
            b.flaps.to_string(),
            "0",
        );
        let p99 = percentile(&a.every, 0.99);
        println!(
            "  kubernetes p99 over every node: {} the goal",
            if p99 <= GOAL { "meets" } else { "MISSES" }
        );
    }
    println!(
        "-- daemon memory once the probe pods and the {} timed pods are in --",
        o.pods
    );
    for (k, (a, b)) in rss[0].iter().zip(&rss[1]).enumerate() {
        row(
            &format!("{} vpcnetd VmRSS", node_name(k)),
            format!("{:.1} MiB", a.0),
            format!("{:.1} MiB", b.0),
            "",
        );
        row(
            &format!("{} vpcnetd VmHWM (peak)", node_name(k)),
            format!("{:.1} MiB", a.1),
            format!("{:.1} MiB", b.1),
            "",
        );
    }
    println!(
        "(a probe counts as dropped when unanswered after 500 ms; log times are the daemons' \
         clocks against this one's; the Kubernetes daemons reach the API server through a TCP \
         relay on their namespace's loopback)"
    );
    println!("load average at the end: {}", load_average());
    drop(k8s);
    drop(reference);
    drop(kube);
    Ok(())
}
