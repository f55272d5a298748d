//! Truth tables after the upstream network-policy e2e suite: namespaces x, y, z (label ns=<name>)
//! × pods a, b, c (label pod=<name>), each serving 80 and 81 over TCP, UDP and SCTP under named
//! ports serve-<port>-<proto>. Every scenario (data in `scenarios.rs`, shared with the dataplane
//! e2e suite) states the verdict for every (source, destination, protocol/port) combination of the
//! nine pods as reachability matrices, rows = source, columns = destination in the order x/a x/b
//! x/c y/a y/b y/c z/a z/b z/c, `.` allowed, `X` denied. The compiled form is then checked against
//! the engine on every probe of every scenario, and update plans between scenarios are checked op
//! by op.

use super::compile::{Addr, Compiled, compile, plan};
use super::engine::{Peer, allowed, explain};
use super::model::{ClusterState, ContainerPort, Namespace, Pod, PodRef, Protocol};
use super::scenarios::{SCENARIOS, Scenario};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub(crate) const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub(crate) const PODS: [&str; 3] = ["a", "b", "c"];
const PROBES: [(Protocol, u16); 6] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 81),
    (Protocol::Udp, 80),
    (Protocol::Udp, 81),
    (Protocol::Sctp, 80),
    (Protocol::Sctp, 81),
];
/// Outside every pod address; 10.0.9.9 is inside 10.0.0.0/16, 192.168.7.7 is not.
const EXTERNAL: [&str; 2] = ["10.0.9.9", "192.168.7.7"];

pub(crate) fn pod_ip(ns: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, ns as u8 + 1, pod as u8 + 1)
}

pub(crate) fn base_cluster() -> ClusterState {
    let mut s = ClusterState::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        s.upsert_namespace(Namespace::new(
            *ns,
            BTreeMap::from([("ns".to_string(), ns.to_string())]),
        ));
        for (j, p) in PODS.iter().enumerate() {
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for proto in Protocol::ALL {
                    ports.push(ContainerPort {
                        name: Some(format!("serve-{port}-{}", proto.to_string().to_lowercase())),
                        port,
                        protocol: proto,
                    });
                }
            }
            s.upsert_pod(Pod {
                namespace: ns.to_string(),
                name: p.to_string(),
                labels: BTreeMap::from([("pod".to_string(), p.to_string())]),
                ip: Some(pod_ip(i, j)),
                node: Some(format!("node-{}", j % 2)),
                ports,
                annotations: Default::default(),
            });
        }
    }
    s
}

fn policy(ns: &str, name: &str, spec: &str) -> NetworkPolicy {
    let text = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    );
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{ns}/{name}: {e}\n{text}"))
}

/// Policies as (namespace, name, spec in YAML flow style).
pub(crate) fn cluster_with(policies: &[(&str, &str, &str)]) -> ClusterState {
    let mut s = base_cluster();
    for (ns, name, spec) in policies {
        s.upsert_policy(&policy(ns, name, spec))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    s
}

fn all_pods() -> Vec<PodRef> {
    NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| PodRef::new(*n, *p)))
        .collect()
}

fn parse_matrix(m: &str) -> Vec<Vec<bool>> {
    let pods = all_pods();
    let rows: Vec<&str> = m.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 9, "matrix needs 9 rows:\n{m}");
    rows.iter()
        .zip(&pods)
        .map(|(row, src)| {
            let (label, cells) = row.split_once(' ').expect("row: <src> <cells>");
            assert_eq!(label, src.to_string(), "row order");
            let cells: Vec<bool> = cells
                .trim()
                .chars()
                .map(|c| match c {
                    '.' => true,
                    'X' => false,
                    other => panic!("bad cell {other:?}"),
                })
                .collect();
            assert_eq!(cells.len(), 9, "row {label}");
            cells
        })
        .collect()
}

fn render(m: &[Vec<bool>]) -> String {
    let mut s = String::from("    x/a x/b x/c y/a y/b y/c z/a z/b z/c\n");
    for (src, row) in all_pods().iter().zip(m) {
        s += &format!(
            "{src} {}\n",
            row.iter()
                .map(|b| if *b { '.' } else { 'X' })
                .collect::<String>()
        );
    }
    s
}

fn probe_name(p: Protocol, port: u16) -> String {
    format!("{}/{port}", p.to_string().to_lowercase())
}

fn expected(s: &Scenario, proto: Protocol, port: u16) -> Vec<Vec<bool>> {
    let name = probe_name(proto, port);
    let m = s
        .expect
        .iter()
        .find(|(probes, _)| *probes == "*" || probes.split_whitespace().any(|p| p == name))
        .unwrap_or_else(|| panic!("{}: no expectation for {name}", s.name))
        .1;
    parse_matrix(m)
}

fn pod_addr(r: &PodRef) -> Ipv4Addr {
    let i = NAMESPACES.iter().position(|n| *n == r.namespace).unwrap();
    let j = PODS.iter().position(|n| *n == r.name).unwrap();
    pod_ip(i, j)
}

/// Every probe the compiled form is checked on: pod pairs, node, outside addresses, and a port
/// beyond the ones the pods serve.
pub(crate) fn all_probes() -> Vec<(Peer, Peer, Protocol, u16)> {
    let mut peers: Vec<Peer> = all_pods().into_iter().map(Peer::Pod).collect();
    peers.push(Peer::Node);
    peers.extend(EXTERNAL.iter().map(|e| Peer::External(e.parse().unwrap())));
    let mut out = Vec::new();
    for s in &peers {
        for d in &peers {
            if matches!(s, Peer::Pod(_)) || matches!(d, Peer::Pod(_)) {
                for (proto, port) in PROBES.iter().copied().chain([(Protocol::Tcp, 8080)]) {
                    out.push((s.clone(), d.clone(), proto, port));
                }
            }
        }
    }
    out
}

pub(crate) fn addr_of(state: &ClusterState, p: &Peer) -> Addr {
    match p {
        Peer::Pod(r) => Addr::Ip(state.pod(r).and_then(|p| p.ip).unwrap()),
        Peer::External(ip) => Addr::Ip(*ip),
        Peer::Node => Addr::Host,
    }
}

pub(crate) fn engine_says(
    state: &ClusterState,
    s: &Peer,
    d: &Peer,
    proto: Protocol,
    port: u16,
) -> bool {
    allowed(state, s, d, proto, port).unwrap().is_allowed()
}

pub(crate) fn check_compiled_agrees(
    state: &ClusterState,
    c: &Compiled,
    probes: &[(Peer, Peer, Protocol, u16)],
    ctx: &str,
) {
    for (s, d, proto, port) in probes {
        let want = engine_says(state, s, d, *proto, *port);
        let got = c.permits(addr_of(state, s), addr_of(state, d), *proto, *port);
        assert_eq!(
            got, want,
            "{ctx}: {s} -> {d} {proto}/{port}: compiled {got}, engine {want}"
        );
    }
}

#[test]
fn truth_tables() {
    assert!(SCENARIOS.len() >= 25, "{} scenarios", SCENARIOS.len());
    let pods = all_pods();
    for sc in SCENARIOS {
        let state = cluster_with(sc.policies);
        for (proto, port) in PROBES {
            let want = expected(sc, proto, port);
            let got: Vec<Vec<bool>> = pods
                .iter()
                .map(|s| {
                    pods.iter()
                        .map(|d| {
                            engine_says(
                                &state,
                                &Peer::Pod(s.clone()),
                                &Peer::Pod(d.clone()),
                                proto,
                                port,
                            )
                        })
                        .collect()
                })
                .collect();
            assert!(
                got == want,
                "{}: {}\nexpected:\n{}got:\n{}",
                sc.name,
                probe_name(proto, port),
                render(&want),
                render(&got)
            );
        }
        // Kubelet probes: the node reaches every pod, whatever the policies.
        for p in &pods {
            for (proto, port) in PROBES {
                assert!(
                    engine_says(&state, &Peer::Node, &Peer::Pod(p.clone()), proto, port),
                    "{}: node -> {p}",
                    sc.name
                );
            }
        }
    }
}

#[test]
fn outside_addresses_and_ip_block_edges() {
    let ext = |s: &str| Peer::External(s.parse().unwrap());
    let xa = Peer::Pod(PodRef::new("x", "a"));
    let st = cluster_with(&[(
        "x",
        "a-from-block",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}]}]}",
    )]);
    assert!(engine_says(&st, &ext("10.0.9.9"), &xa, Protocol::Tcp, 80));
    assert!(!engine_says(
        &st,
        &ext("192.168.7.7"),
        &xa,
        Protocol::Tcp,
        80
    ));
    assert!(!engine_says(
        &st,
        &ext("10.0.2.200"),
        &xa,
        Protocol::Tcp,
        80
    ));
    // An "external" address that is a pod's is that pod.
    assert_eq!(
        engine_says(&st, &ext("10.0.2.1"), &xa, Protocol::Tcp, 80),
        engine_says(
            &st,
            &Peer::Pod(PodRef::new("y", "a")),
            &xa,
            Protocol::Tcp,
            80
        )
    );
    // Pod selectors never match outside addresses, even `{}` in every namespace.
    let st = cluster_with(&[(
        "x",
        "a-from-pods",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}}]}]}",
    )]);
    assert!(!engine_says(
        &st,
        &ext("192.168.7.7"),
        &xa,
        Protocol::Tcp,
        80
    ));
    assert!(engine_says(
        &st,
        &Peer::Pod(PodRef::new("z", "c")),
        &xa,
        Protocol::Tcp,
        80
    ));
    // Egress named ports never match an outside address (it has no container ports).
    let st = cluster_with(&[(
        "x",
        "a-out-named",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-80-tcp}]}]}",
    )]);
    assert!(!engine_says(
        &st,
        &xa,
        &ext("192.168.7.7"),
        Protocol::Tcp,
        80
    ));
    assert!(engine_says(
        &st,
        &xa,
        &Peer::Pod(PodRef::new("y", "b")),
        Protocol::Tcp,
        80
    ));
    // A pod isolated for egress reaches its node only through a rule that allows every peer.
    assert!(!engine_says(&st, &xa, &Peer::Node, Protocol::Tcp, 80));
    let st = cluster_with(&[(
        "x",
        "a-out-any",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: 80}]}]}",
    )]);
    assert!(engine_says(&st, &xa, &Peer::Node, Protocol::Tcp, 80));
    assert!(!engine_says(&st, &xa, &Peer::Node, Protocol::Tcp, 81));
    assert!(
        allowed(
            &st,
            &Peer::Pod(PodRef::new("q", "zz")),
            &xa,
            Protocol::Tcp,
            1
        )
        .is_err()
    );
}

#[test]
fn compiled_agrees_with_engine_on_every_probe() {
    let probes = all_probes();
    for sc in SCENARIOS {
        let state = cluster_with(sc.policies);
        let c = compile(&state, None);
        check_compiled_agrees(&state, &c, &probes, sc.name);
        // Compilation is deterministic.
        assert_eq!(c, compile(&state, None), "{}", sc.name);
    }
}

#[test]
fn node_filter_keeps_only_local_endpoints() {
    let state = cluster_with(&[("x", "deny", "{podSelector: {}}")]);
    let c = compile(&state, Some("node-0"));
    assert!(c.endpoints.values().all(|e| e.pod.name != "b"));
    assert_eq!(c.endpoints.len(), 6);
    assert_eq!(c.ip_identity.len(), 9, "remote pods still need identities");
}

/// Applies the plan between two scenarios op by op: while narrowing, nothing may be allowed that
/// the old state denied; from the widening phase on, nothing the new state denies; at the end the
/// dataplane equals the new compilation.
#[test]
fn update_plans_never_widen_beyond_old_or_new() {
    let probes: Vec<_> = all_probes()
        .into_iter()
        .filter(|(s, d, ..)| matches!(s, Peer::Pod(_)) && matches!(d, Peer::Pod(_)))
        .collect();
    let states: Vec<ClusterState> = SCENARIOS.iter().map(|s| cluster_with(s.policies)).collect();
    let mut pairs: Vec<(usize, usize)> = (1..states.len()).map(|i| (i - 1, i)).collect();
    pairs.extend((1..states.len()).map(|i| (i, i - 1)));
    pairs.push((0, 3));
    pairs.push((3, 0));
    for (i, j) in pairs {
        let mut compiler = super::compile::Compiler::new(None);
        let old = compiler.compile(&states[i]);
        let new = compiler.compile(&states[j]);
        let p = plan(&old, &new);
        let mut dp = old.clone();
        let allowed_in = |c: &Compiled| -> Vec<bool> {
            probes
                .iter()
                .map(|(s, d, proto, port)| {
                    c.permits(
                        addr_of(&states[i], s),
                        addr_of(&states[i], d),
                        *proto,
                        *port,
                    )
                })
                .collect()
        };
        let old_a = allowed_in(&old);
        let new_a = allowed_in(&new);
        for (phase, ops) in p.phases() {
            for op in ops {
                dp.apply(op);
                let now = allowed_in(&dp);
                let bound = if matches!(phase, "prepare" | "narrow") {
                    &old_a
                } else {
                    &new_a
                };
                for (k, (n, b)) in now.iter().zip(bound).enumerate() {
                    assert!(
                        !n || *b,
                        "{} -> {}: after {op:?} in {phase}, {:?} is allowed",
                        SCENARIOS[i].name,
                        SCENARIOS[j].name,
                        probes[k]
                    );
                }
            }
        }
        assert_eq!(dp.endpoints.len(), new.endpoints.len());
        for (ip, e) in &new.endpoints {
            assert_eq!(dp.endpoints[ip].ingress, e.ingress);
            assert_eq!(dp.endpoints[ip].egress, e.egress);
        }
        assert_eq!(dp.ip_identity, new.ip_identity);
    }
}

#[test]
fn explain_reads_like_a_sentence() {
    let sc = SCENARIOS
        .iter()
        .find(|s| s.name.starts_with("union of two"))
        .unwrap();
    let state = cluster_with(sc.policies);
    let text = explain(&state, &PodRef::new("x", "a")).unwrap();
    assert!(text.contains("ingress: isolated by 2 policies"), "{text}");
    assert!(text.contains("x/a-from-b-80"), "{text}");
    assert!(
        text.contains("from pods matching pod=b in namespace x, on TCP 80"),
        "{text}"
    );
    assert!(
        text.contains("pods matching (all) in namespaces matching ns=z"),
        "{text}"
    );
    assert!(text.contains("egress: not isolated"), "{text}");
    let named = cluster_with(&[(
        "x",
        "n",
        "{podSelector: {}, policyTypes: [Ingress, Egress], ingress: [{ports: [{port: serve-80-tcp}, {port: nope}]}], egress: []}",
    )]);
    let text = explain(&named, &PodRef::new("x", "b")).unwrap();
    assert!(text.contains("TCP port \"serve-80-tcp\" (= 80)"), "{text}");
    assert!(text.contains("not defined by this pod"), "{text}");
    assert!(text.contains("egress: isolated by 1 policy"), "{text}");
    assert!(text.contains("no egress rules (allows nothing)"), "{text}");
    assert!(explain(&named, &PodRef::new("x", "nope")).is_err());
    // `egress: []` without policyTypes does not make an egress policy.
    let st = cluster_with(&[("x", "n", "{podSelector: {}, egress: []}")]);
    let text = explain(&st, &PodRef::new("x", "b")).unwrap();
    assert!(text.contains("egress: not isolated"), "{text}");
}

#[test]
fn invalid_policies_are_rejected_with_the_reason() {
    let bad = [
        ("{podSelector: {}, policyTypes: [Sideways]}", "policyTypes"),
        (
            "{podSelector: {}, ingress: [{from: [{}]}]}",
            "needs podSelector",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
            "cannot be combined",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
            "not an IPv4 CIDR",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}",
            "not strictly inside",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}}]}]}",
            "not strictly inside",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: 0}]}]}",
            "outside 1-65535",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: 70000}]}]}",
            "outside 1-65535",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: 81, endPort: 80}]}]}",
            "endPort",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{endPort: 80}]}]}",
            "endPort needs port",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: http, endPort: 80}]}]}",
            "named port",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: Not_A_Name}]}]}",
            "not a valid port name",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{protocol: tcp, port: 80}]}]}",
            "protocol",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{protocol: ICMP}]}]}",
            "protocol",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
            "needs at least one value",
        ),
        (
            "{podSelector: {matchLabels: {'bad key': a}}}",
            "invalid label key",
        ),
    ];
    for (spec, why) in bad {
        let mut s = base_cluster();
        let gen_before = s.generation();
        let e = s
            .upsert_policy(&policy("x", "bad", spec))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x/bad") && e.contains(why), "{spec}: {e}");
        assert_eq!(
            s.generation(),
            gen_before,
            "a rejected policy changes nothing"
        );
    }
    // IPv6 blocks are valid and match no IPv4 address; a missing spec denies all ingress.
    let st = cluster_with(&[
        (
            "x",
            "v6",
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: '::/0'}}]}]}",
        ),
        ("y", "nospec", "null"),
    ]);
    let yb = Peer::Pod(PodRef::new("y", "b"));
    assert!(!engine_says(
        &st,
        &yb,
        &Peer::Pod(PodRef::new("x", "a")),
        Protocol::Tcp,
        80
    ));
    assert!(!engine_says(
        &st,
        &Peer::Pod(PodRef::new("x", "a")),
        &yb,
        Protocol::Tcp,
        80
    ));
    check_compiled_agrees(&st, &compile(&st, None), &all_probes(), "v6");
}

#[test]
fn pod_addresses_come_from_the_model() {
    // Sanity of the fixture the tables rely on.
    let s = base_cluster();
    for r in all_pods() {
        assert_eq!(s.pod(&r).unwrap().ip, Some(pod_addr(&r)));
    }
}
