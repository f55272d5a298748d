//! Kubernetes NetworkPolicy enforced by the eBPF dataplane, checked against the same truth tables
//! the policy engine is tested with (`policy/src/scenarios.rs`, included below, not copied).
//!
//! A 3-node cluster: namespace x's pods a, b, c on node 1, y's on node 2, z's on node 3, so pairs
//! inside a namespace stay on one node and every other pair crosses the fabric. Pod addresses
//! follow the engine tests' 10.0.<ns+1>.<pod+1>, moved into the VPC as 10.20.<ns+1>.<pod+1> (node
//! i's block is 10.20.<i+1>.0/24), and ipBlock CIDRs in the policies are rewritten the same way so
//! they keep their meaning. Every pod serves TCP and UDP on 80 and 81 and each scenario probes all
//! 9×9 pairs (self included) on tcp/80, tcp/81, udp/80, udp/81 at once, plus every node to its own
//! pods (kubelet probes are always allowed). SCTP expectations are left to the unit tests.
//!
//! All scenarios run in turn on one cluster, each replacing the same `policies.yaml`, so moving
//! from one to the next also exercises policy updates and deletions. After each write the test
//! waits until every daemon reports (`vpcnetctl policy`) that its dataplane enforces the new
//! cluster state generation, then probes; mismatching cells are re-probed until a deadline, and a
//! scenario passes only on a full pass without a wrong cell. A failure shows the expected and
//! observed matrices. `VPCNET_POLICY_SCENARIOS=<text>` runs only the scenarios whose name contains
//! it.
//!
//! A second test kills node 1's daemon with SIGKILL and restarts it under a default-deny policy
//! with one allow, probing without pause: the pinned maps keep enforcing while it is down, the
//! restart opens no window, and a policy changed while it was down is enforced after it returns.

#[path = "../../policy/src/scenarios.rs"]
mod scenarios;

use scenarios::{ALL, SCENARIOS, Scenario, XA_CLOSED};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vpcnet_tests::cni::Pod;
use vpcnet_tests::probe::{self, Outcome, Probe, Proto, WhoAmI};
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PROBES: [(Proto, u16); 4] = [
    (Proto::Tcp, 80),
    (Proto::Tcp, 81),
    (Proto::Udp, 80),
    (Proto::Udp, 81),
];
/// What a dropped probe costs: a scenario's pass takes about this long.
const DENY_TIMEOUT: Duration = Duration::from_millis(400);
/// Generous for a noisy 2-core machine; a converged scenario takes about a second.
const CONVERGE: Duration = Duration::from_secs(8);
const POLICY_FILE: &str = "policies.yaml";

/// Both tests build a 3-node cluster and time probes; running them one at a time keeps the
/// timeouts meaningful on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// Index of a pod in matrix order x/a x/b x/c y/a … z/c.
fn pod_index(ns: usize, pod: usize) -> usize {
    ns * 3 + pod
}

fn pod_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, (i / 3) as u8 + 1, (i % 3) as u8 + 1)
}

fn probe_name(k: usize) -> String {
    format!("{}/{}", PROBES[k].0, PROBES[k].1)
}

/// The engine tests' addresses (10.0.<ns+1>.<pod+1>) mapped into this cluster's VPC.
fn to_vpc(spec: &str) -> String {
    spec.replace("10.0.", "10.20.")
}

/// Namespaces and pods, with every pod's address, node and named ports, for every node's daemon.
fn cluster_manifests() -> String {
    let mut y = String::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{ name: {ns}, labels: {{ ns: {ns} }} }}\n"
        );
        for (p, pod) in PODS.iter().enumerate() {
            let mut ports = String::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP", "SCTP"] {
                    let _ = write!(
                        ports,
                        "\n        - {{ name: serve-{port}-{}, containerPort: {port}, protocol: {proto} }}",
                        proto.to_lowercase()
                    );
                }
            }
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\n  labels: {{ pod: {pod} }}\n  annotations: {{ vpcnet.io/ip: {ip} }}\nspec:\n  nodeName: node{node}\n  containers:\n    - name: serve\n      image: whoami\n      ports:{ports}\n",
                ip = pod_ip(pod_index(n, p)),
                node = n + 1,
            );
        }
    }
    y
}

fn policies_yaml(label: &str, policies: &[(&str, &str, &str)]) -> String {
    let mut y = format!("# {label}\n");
    for (ns, name, spec) in policies {
        let _ = write!(
            y,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec: {}\n",
            to_vpc(spec)
        );
    }
    y
}

/// The cluster with its nine pods wired through the real plugin and daemons, each serving 80, 81.
/// Field order is drop order: servers, then pods, then the cluster.
struct Fixture {
    _servers: Vec<WhoAmI>,
    pods: Vec<Pod>,
    cluster: Cluster,
}

fn fixture() -> Fixture {
    let mut cluster = Cluster::build(ClusterSpec {
        nodes: 3,
        cooldown_secs: 30,
        dataplane: true,
    })
    .expect("cluster");
    // Pods are known before their ADD: the daemon isolates a pod from its first packet.
    cluster
        .apply_manifest("cluster.yaml", &cluster_manifests())
        .unwrap();
    cluster
        .apply_manifest(POLICY_FILE, &policies_yaml("none yet", &[]))
        .unwrap();
    for i in 0..3 {
        cluster.node_mut(i).start_daemon().expect("daemon");
    }
    let mut pods = Vec::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        for (p, name) in PODS.iter().enumerate() {
            let pod = cluster
                .add_pod(n, ns, name)
                .unwrap_or_else(|e| panic!("ADD {ns}/{name}: {e:#}"));
            assert_eq!(
                pod.ip,
                pod_ip(pod_index(n, p)),
                "{ns}/{name} got the annotated address"
            );
            pods.push(pod);
        }
    }
    let servers = pods
        .iter()
        .flat_map(|pod| {
            [80, 81].map(|port| {
                WhoAmI::start(&pod.ns, SocketAddrV4::new(pod.ip, port)).expect("server")
            })
        })
        .collect();
    Fixture {
        _servers: servers,
        pods,
        cluster,
    }
}

/// A probe's source: a pod (matrix index) or a node's own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Pod(usize),
    Node(usize),
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    src: Src,
    /// Destination pod (matrix index).
    dst: usize,
    /// Index into [`PROBES`].
    probe: usize,
    /// `None`: either verdict is fine (e.g. while a change is half applied).
    want: Option<bool>,
}

impl Cell {
    fn describe(&self) -> String {
        let src = match self.src {
            Src::Pod(i) => pod_name(i),
            Src::Node(n) => format!("node{}", n + 1),
        };
        format!("{src} -> {} {}", pod_name(self.dst), probe_name(self.probe))
    }
}

/// Verdicts per probe kind, rows = source, columns = destination.
type Matrix = [[bool; 9]; 9];

fn parse_matrix(m: &str) -> Matrix {
    let rows: Vec<&str> = m.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 9, "matrix needs 9 rows:\n{m}");
    let mut out = [[false; 9]; 9];
    for (i, row) in rows.iter().enumerate() {
        let (label, cells) = row.split_once(' ').expect("row: <src> <cells>");
        assert_eq!(label, pod_name(i), "row order");
        let cells: Vec<char> = cells.trim().chars().collect();
        assert_eq!(cells.len(), 9, "row {label}");
        for (j, c) in cells.iter().enumerate() {
            out[i][j] = match c {
                '.' => true,
                'X' => false,
                other => panic!("bad cell {other:?}"),
            };
        }
    }
    out
}

/// The scenario's matrix for each of [`PROBES`].
fn expectations(sc: &Scenario) -> [Matrix; 4] {
    expect_from(sc.name, sc.expect)
}

/// (probes, matrix) entries as in [`Scenario::expect`] → one matrix per [`PROBES`] entry.
fn expect_from(label: &str, entries: &[(&str, &str)]) -> [Matrix; 4] {
    std::array::from_fn(|k| {
        let name = probe_name(k);
        let m = entries
            .iter()
            .find(|(probes, _)| *probes == "*" || probes.split_whitespace().any(|p| p == name))
            .unwrap_or_else(|| panic!("{label}: no expectation for {name}"))
            .1;
        parse_matrix(m)
    })
}

/// Every pod pair on every probe, plus every node to its own pods (always allowed: kubelet
/// probes). `want` maps (probe, src, dst) to the expectation.
fn cells(want: impl Fn(usize, usize, usize) -> Option<bool>) -> Vec<Cell> {
    let mut out = Vec::new();
    for probe in 0..PROBES.len() {
        for src in 0..9 {
            for dst in 0..9 {
                out.push(Cell {
                    src: Src::Pod(src),
                    dst,
                    probe,
                    want: want(probe, src, dst),
                });
            }
        }
        for dst in 0..9 {
            out.push(Cell {
                src: Src::Node(dst / 3),
                dst,
                probe,
                want: Some(true),
            });
        }
    }
    out
}

fn cells_for(expect: &[Matrix; 4]) -> Vec<Cell> {
    cells(|k, s, d| Some(expect[k][s][d]))
}

/// Cells where two expectations agree keep it; the others may be either while moving between them.
fn cells_between(old: &[Matrix; 4], new: &[Matrix; 4]) -> Vec<Cell> {
    cells(|k, s, d| (old[k][s][d] == new[k][s][d]).then_some(new[k][s][d]))
}

/// Probes the given cells all at once from their sources' namespaces; one outcome per cell.
/// `nodes` are the node namespaces by index (may be empty when no cell starts on a node).
fn probe_cells(pods: &[Pod], nodes: &[&Netns], cells: &[&Cell], timeout: Duration) -> Vec<Outcome> {
    let sources: Vec<Src> = (0..9)
        .map(Src::Pod)
        .chain((0..nodes.len()).map(Src::Node))
        .collect();
    let mut batches = Vec::new();
    let mut slots = Vec::new();
    for s in &sources {
        let mine: Vec<usize> = (0..cells.len()).filter(|&i| cells[i].src == *s).collect();
        if mine.is_empty() {
            continue;
        }
        let ns = match s {
            Src::Pod(i) => &pods[*i].ns,
            Src::Node(n) => nodes[*n],
        };
        let probes = mine
            .iter()
            .map(|&i| {
                let (proto, port) = PROBES[cells[i].probe];
                Probe {
                    proto,
                    to: SocketAddrV4::new(pod_ip(cells[i].dst), port),
                }
            })
            .collect();
        batches.push((ns, probes));
        slots.push(mine);
    }
    let results = probe::probe_parallel(batches, timeout).expect("probing");
    let mut out = vec![Err("not probed".to_string()); cells.len()];
    for (mine, res) in slots.into_iter().zip(results) {
        for (i, o) in mine.into_iter().zip(res) {
            out[i] = o;
        }
    }
    // No NAT between pods: an answer to a pod must name that pod as the source.
    for (c, o) in cells.iter().zip(&out) {
        if let (Src::Pod(s), Ok(seen)) = (c.src, o) {
            assert_eq!(
                *seen,
                pod_ip(s),
                "{}: the server saw another source",
                c.describe()
            );
        }
    }
    out
}

/// Probes `cells` round after round while `action` runs (and once more after it returns);
/// returns the number of rounds and every cell that was not as expected, with its round.
fn watch_while(pods: &[Pod], cells: &[Cell], action: impl FnOnce()) -> (usize, Vec<String>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let refs: Vec<&Cell> = cells.iter().collect();
            let (mut rounds, mut wrong) = (0, Vec::new());
            loop {
                let last = stop.load(Ordering::Relaxed);
                let out = probe_cells(pods, &[], &refs, Duration::from_millis(800));
                for (c, o) in cells.iter().zip(out) {
                    if !matches(c, &o) {
                        wrong.push(format!("round {rounds}: {}: {o:?}", c.describe()));
                    }
                }
                rounds += 1;
                if last {
                    return (rounds, wrong);
                }
            }
        });
        action();
        stop.store(true, Ordering::Relaxed);
        watcher.join().expect("watcher thread")
    })
}

impl Fixture {
    fn probe(&self, cells: &[&Cell], timeout: Duration) -> Vec<Outcome> {
        let nodes: Vec<&Netns> = self.cluster.nodes.iter().map(|n| &n.ns).collect();
        probe_cells(&self.pods, &nodes, cells, timeout)
    }

    /// Probes until every cell matches its expectation in one full pass (a pass of every cell,
    /// after any re-probes of single cells, so a half-applied change cannot pass for the result),
    /// or fails at `deadline` with the expected and observed matrices.
    fn converge(&self, label: &str, cells: &[Cell], deadline: Duration) -> Result<Passes, String> {
        let start = Instant::now();
        let all: Vec<usize> = (0..cells.len()).collect();
        let mut last: Vec<Outcome> = vec![Err("not probed".into()); cells.len()];
        let mut pending = all.clone();
        let mut passes = Passes::default();
        loop {
            let full = pending.len() == cells.len();
            let batch: Vec<&Cell> = pending.iter().map(|&i| &cells[i]).collect();
            let outcomes = self.probe(&batch, DENY_TIMEOUT);
            passes.count += 1;
            let mut wrong = Vec::new();
            for (&i, o) in pending.iter().zip(outcomes) {
                if !matches(&cells[i], &o) {
                    wrong.push(i);
                }
                last[i] = o;
            }
            if wrong.is_empty() {
                if full {
                    passes.elapsed = start.elapsed();
                    return Ok(passes);
                }
                pending = all.clone();
                continue;
            }
            if start.elapsed() > deadline {
                return Err(report(label, cells, &last, start.elapsed()));
            }
            pending = wrong;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One full pass, nothing may change: a cell expected denied must never answer, and one
    /// expected allowed gets two more tries (a dropped probe on a busy machine is not a verdict,
    /// an answer that should not have come is).
    fn hold(&self, label: &str, cells: &[Cell]) -> Result<(), String> {
        let refs: Vec<&Cell> = cells.iter().collect();
        let mut last = self.probe(&refs, DENY_TIMEOUT);
        for attempt in 0..3 {
            let leaked = cells
                .iter()
                .zip(&last)
                .any(|(c, o)| c.want == Some(false) && o.is_ok());
            let wrong: Vec<usize> = (0..cells.len())
                .filter(|&i| !matches(&cells[i], &last[i]))
                .collect();
            if wrong.is_empty() {
                return Ok(());
            }
            if leaked || attempt == 2 {
                return Err(report(label, cells, &last, Duration::ZERO));
            }
            let retry: Vec<&Cell> = wrong.iter().map(|&i| &cells[i]).collect();
            for (i, o) in wrong.iter().zip(self.probe(&retry, Duration::from_secs(1))) {
                last[*i] = o;
            }
        }
        unreachable!("the last attempt returns")
    }

    fn apply_policies(&self, label: &str, policies: &[(&str, &str, &str)]) {
        self.cluster
            .apply_manifest(POLICY_FILE, &policies_yaml(label, policies))
            .unwrap();
    }

    /// Writes the policies and waits until every node's daemon enforces a cluster state newer
    /// than the one it enforced before (a content change always makes a new generation). Returns
    /// how long that took.
    fn apply_and_wait(
        &self,
        label: &str,
        policies: &[(&str, &str, &str)],
    ) -> Result<Duration, String> {
        let before = self.enforced_generations();
        let start = Instant::now();
        self.apply_policies(label, policies);
        loop {
            let now = self.enforced_generations();
            if now.iter().zip(&before).all(|(n, b)| n.is_some() && n != b) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > CONVERGE {
                return Err(format!(
                    "scenario {label:?}: the daemons did not all apply the new policies within \
                     {CONVERGE:?}: enforced cluster state generations {before:?} before, {now:?} now"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What `vpcnetctl policy` reports as the cluster state generation each node's dataplane
    /// enforces (`None`: not applied, or the last update failed).
    fn enforced_generations(&self) -> Vec<Option<u64>> {
        self.cluster
            .nodes
            .iter()
            .map(|n| {
                let text = n.ctl(&["policy", "x/a"]).ok()?;
                let (_, rest) = text.split_once("cluster state generation ")?;
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.cluster.nodes {
            let _ = writeln!(s, "--- {} vpcnetd log tail:\n{}", n.name, n.log_tail());
        }
        s
    }
}

#[derive(Debug, Default)]
struct Passes {
    count: usize,
    elapsed: Duration,
}

fn matches(c: &Cell, o: &Outcome) -> bool {
    c.want.is_none_or(|w| w == o.is_ok())
}

/// Expected and observed matrices side by side for every probe kind with a wrong cell, the node
/// cells, and the wrong cells with what the probe saw.
fn report(label: &str, cells: &[Cell], last: &[Outcome], waited: Duration) -> String {
    let mut s = format!("scenario {label:?}: not as expected after {waited:.1?}\n");
    let mark = |w: Option<bool>| match w {
        Some(true) => '.',
        Some(false) => 'X',
        None => '?',
    };
    for k in 0..PROBES.len() {
        let of_probe: Vec<usize> = (0..cells.len())
            .filter(|&i| cells[i].probe == k && matches!(cells[i].src, Src::Pod(_)))
            .collect();
        if of_probe.iter().all(|&i| matches(&cells[i], &last[i])) {
            continue;
        }
        let _ = writeln!(
            s,
            "{}: rows = source, columns = destination x/a x/b x/c y/a y/b y/c z/a z/b z/c",
            probe_name(k)
        );
        let _ = writeln!(s, "     expected   observed");
        for src in 0..9 {
            let (mut want, mut seen) = (String::new(), String::new());
            for dst in 0..9 {
                let i = *of_probe
                    .iter()
                    .find(|&&i| cells[i].src == Src::Pod(src) && cells[i].dst == dst)
                    .expect("every pair is probed");
                want.push(mark(cells[i].want));
                seen.push(if last[i].is_ok() { '.' } else { 'X' });
            }
            let flag = if want
                .chars()
                .zip(seen.chars())
                .any(|(w, o)| w != '?' && w != o)
            {
                "  <-"
            } else {
                ""
            };
            let _ = writeln!(s, "{} {want}  {seen}{flag}", pod_name(src));
        }
    }
    let wrong: Vec<usize> = (0..cells.len())
        .filter(|&i| !matches(&cells[i], &last[i]))
        .collect();
    let _ = writeln!(s, "{} wrong cells:", wrong.len());
    for &i in wrong.iter().take(40) {
        let seen = match &last[i] {
            Ok(ip) => format!("answered (server saw {ip})"),
            Err(e) => format!("no answer ({e})"),
        };
        let _ = writeln!(
            s,
            "  {}: expected {}, {seen}",
            cells[i].describe(),
            if cells[i].want == Some(true) {
                "allowed"
            } else {
                "denied"
            }
        );
    }
    s
}

/// Deny ingress in x and y both; the next scenario deletes y's policy.
const DENY_X_AND_Y: &str = "
x/a .XXXXX...
x/b X.XXXX...
x/c XX.XXX...
y/a XXX.XX...
y/b XXXX.X...
y/c XXXXX....
z/a XXXXXX...
z/b XXXXXX...
z/c XXXXXX...";

const DENY_X: &str = "
x/a .XX......
x/b X.X......
x/c XX.......
y/a XXX......
y/b XXX......
y/c XXX......
z/a XXX......
z/b XXX......
z/c XXX......";

/// Scenarios only the dataplane needs: updates in place and deletions, checked one after another.
const E2E_SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "e2e: every policy deleted, traffic is restored",
        policies: &[],
        expect: &[("*", ALL)],
    },
    Scenario {
        name: "e2e: update in place, before (x/a open on tcp/80 only)",
        policies: &[(
            "x",
            "a-port",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: TCP, port: 80}]}]}",
        )],
        expect: &[("tcp/80", ALL), ("*", XA_CLOSED)],
    },
    Scenario {
        name: "e2e: update in place, after (the same policy now opens tcp/81 only)",
        policies: &[(
            "x",
            "a-port",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: TCP, port: 81}]}]}",
        )],
        expect: &[("tcp/81", ALL), ("*", XA_CLOSED)],
    },
    Scenario {
        name: "e2e: default deny ingress in x and in y",
        policies: &[
            ("x", "deny", "{podSelector: {}}"),
            ("y", "deny", "{podSelector: {}}"),
        ],
        expect: &[("*", DENY_X_AND_Y)],
    },
    Scenario {
        name: "e2e: y's policy deleted, x's kept (node→pod still allowed in x)",
        policies: &[("x", "deny", "{podSelector: {}}")],
        expect: &[("*", DENY_X)],
    },
    Scenario {
        name: "e2e: default deny ingress and egress everywhere",
        policies: &[
            (
                "x",
                "deny",
                "{podSelector: {}, policyTypes: [Ingress, Egress]}",
            ),
            (
                "y",
                "deny",
                "{podSelector: {}, policyTypes: [Ingress, Egress]}",
            ),
            (
                "z",
                "deny",
                "{podSelector: {}, policyTypes: [Ingress, Egress]}",
            ),
        ],
        expect: &[(
            "*",
            "
x/a .XXXXXXXX
x/b X.XXXXXXX
x/c XX.XXXXXX
y/a XXX.XXXXX
y/b XXXX.XXXX
y/c XXXXX.XXX
z/a XXXXXX.XX
z/b XXXXXXX.X
z/c XXXXXXXX.",
        )],
    },
    Scenario {
        name: "e2e: all of it deleted at once, traffic is restored",
        policies: &[],
        expect: &[("*", ALL)],
    },
];

#[test]
fn truth_tables_enforced_by_the_dataplane() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let fx = fixture();
    eprintln!("cluster with 9 pods up in {:.1?}", started.elapsed());
    let mut failures = Vec::new();
    // `VPCNET_POLICY_SCENARIOS=<text>` runs only the scenarios whose name contains it.
    let only = std::env::var("VPCNET_POLICY_SCENARIOS").unwrap_or_default();
    let run: Vec<&Scenario> = SCENARIOS
        .iter()
        .chain(E2E_SCENARIOS)
        .filter(|s| s.name.contains(&only))
        .collect();
    assert!(!run.is_empty(), "no scenario matches {only:?}");
    // The fixture starts without policies; an unchanged set makes no new generation to wait for.
    let mut current: &[(&str, &str, &str)] = &[];
    for sc in &run {
        let expect = expectations(sc);
        let applied = if sc.policies == current {
            fx.apply_policies(sc.name, sc.policies);
            Ok(Duration::ZERO)
        } else {
            fx.apply_and_wait(sc.name, sc.policies)
        };
        current = sc.policies;
        // Probed even when the daemons did not report the change: the matrix tells more.
        match (applied, fx.converge(sc.name, &cells_for(&expect), CONVERGE)) {
            (Ok(applied), Ok(p)) => eprintln!(
                "ok   {:<76} applied in {:>7.1?}, {} probe passes, {:.2?}",
                sc.name, applied, p.count, p.elapsed
            ),
            (applied, probed) => {
                let report = [applied.err(), probed.err()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("\n");
                eprintln!("FAIL {report}");
                failures.push(report);
            }
        }
    }
    eprintln!("{} scenarios in {:.1?}", run.len(), started.elapsed());
    assert!(
        failures.is_empty(),
        "{} scenarios failed:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        fx.logs()
    );
}

/// Deny ingress in x, plus one allow: y/a → x/a on tcp/80; then the allow moves to y/b on tcp/81.
const RESTART_BEFORE: &[(&str, &str, &str)] = &[
    ("x", "deny", "{podSelector: {}}"),
    (
        "x",
        "allow",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}], ports: [{protocol: TCP, port: 80}]}]}",
    ),
];
const RESTART_AFTER: &[(&str, &str, &str)] = &[
    ("x", "deny", "{podSelector: {}}"),
    (
        "x",
        "allow",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}], ports: [{protocol: TCP, port: 81}]}]}",
    ),
];

/// [`DENY_X`] with `row`'s source also reaching x/a on `probe`.
fn deny_x_but(row: &str, probe: &str) -> [Matrix; 4] {
    let opened: String = DENY_X
        .lines()
        .map(|l| {
            if l.starts_with(row) {
                format!("{row} .XX......\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    expect_from(row, &[(probe, &opened), ("*", DENY_X)])
}

/// While a node's daemon is down its pinned programs and maps keep enforcing; the restarted daemon
/// takes over without a window, and converges to a policy changed while it was away.
#[test]
fn enforcement_survives_a_daemon_crash_and_catches_up_after_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut fx = fixture();
    let before = deny_x_but("y/a", "tcp/80");
    let after = deny_x_but("y/b", "tcp/81");
    let before_cells = cells_for(&before);
    let fail = |what: &str, e: String, fx: &Fixture| -> ! { panic!("{what}: {e}\n{}", fx.logs()) };

    if let Err(e) = fx
        .apply_and_wait("restart: before", RESTART_BEFORE)
        .and_then(|_| fx.converge("restart: before", &before_cells, CONVERGE))
    {
        fail("before the crash", e, &fx);
    }

    // Watched without pause through the crash and the restart: no denied cell may answer at any
    // moment, and the allowed ones keep answering. x's pods (and their ingress rules) live on
    // node1, the node whose daemon dies.
    let watched: Vec<Cell> = [
        (3, 0, 0, true),  // y/a -> x/a tcp/80: the allow
        (4, 0, 0, false), // y/b -> x/a tcp/80
        (3, 0, 1, false), // y/a -> x/a tcp/81
        (3, 0, 2, false), // y/a -> x/a udp/80
        (1, 0, 0, false), // x/b -> x/a tcp/80, same node
        (8, 2, 3, false), // z/c -> x/c udp/81
        (0, 4, 0, true),  // x/a -> y/b tcp/80: egress is open
        (2, 1, 2, false), // x/c -> x/b udp/80, same node
    ]
    .into_iter()
    .map(|(src, dst, probe, want)| Cell {
        src: Src::Pod(src),
        dst,
        probe,
        want: Some(want),
    })
    .collect();
    let watch = |label: &str, fx: &mut Fixture, action: &mut dyn FnMut(&mut Cluster)| {
        let Fixture { pods, cluster, .. } = fx;
        let (rounds, wrong) = watch_while(pods, &watched, || action(cluster));
        if !wrong.is_empty() {
            fail(
                label,
                format!("{} of {rounds} rounds:\n{}", wrong.len(), wrong.join("\n")),
                fx,
            );
        }
        eprintln!(
            "{label}: {rounds} rounds of {} watched cells as expected",
            watched.len()
        );
    };

    // 1. kill -9 and back, nothing changed meanwhile.
    watch("kill -9 of node1's daemon", &mut fx, &mut |c| {
        c.node_mut(0).kill_daemon();
        std::thread::sleep(Duration::from_millis(500));
    });
    assert!(!fx.cluster.node_mut(0).daemon_running());
    for pass in ["first", "second"] {
        if let Err(e) = fx.hold(&format!("daemon down, {pass} full pass"), &before_cells) {
            fail("while the daemon is down", e, &fx);
        }
    }
    watch("restart of node1's daemon", &mut fx, &mut |c| {
        c.node_mut(0).start_daemon().expect("restart");
        // Whatever the restarted daemon does first (reconcile, re-plan) happens in here.
        std::thread::sleep(Duration::from_secs(2));
    });
    if let Err(e) = fx.hold("after the restart", &before_cells) {
        fail("after the restart", e, &fx);
    }

    // 2. The policy changes while the daemon is down: the other nodes follow at once, node1's
    // pinned maps keep the old rules; the restarted daemon catches up.
    fx.cluster.node_mut(0).kill_daemon();
    fx.apply_policies("restart: after", RESTART_AFTER);
    std::thread::sleep(Duration::from_secs(1));
    if let Err(e) = fx.hold("changed while down", &cells_between(&before, &after)) {
        fail("policy changed while the daemon is down", e, &fx);
    }
    fx.cluster.node_mut(0).start_daemon().expect("restart");
    match fx.converge(
        "restart: after",
        &cells_for(&after),
        Duration::from_secs(20),
    ) {
        Ok(p) => eprintln!(
            "restarted daemon converged in {:.2?} ({} passes)",
            p.elapsed, p.count
        ),
        Err(e) => fail("after the restart with a changed policy", e, &fx),
    }
    eprintln!("restart test done in {:.1?}", started.elapsed());
}
