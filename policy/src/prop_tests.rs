//! Random small clusters and policies: the compiled form, run by its interpreter, must agree with
//! the engine on every probe, and update plans between two random states must stay within the
//! old state while narrowing and within the new one from widening on.

use super::compile::{Addr, Compiled, Compiler, plan};
use super::engine::{Peer, allowed};
use super::model::{ClusterState, ContainerPort, Namespace, Pod, Protocol};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub(super) const NS: [&str; 2] = ["n0", "n1"];

pub(super) fn labels_from(bits: u8, keys: [(&str, [&str; 2]); 2]) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    for (i, (k, vals)) in keys.iter().enumerate() {
        // Two bits per key: absent, absent, value 0, value 1.
        match (bits >> (2 * i)) & 3 {
            2 => {
                l.insert(k.to_string(), vals[0].to_string());
            }
            3 => {
                l.insert(k.to_string(), vals[1].to_string());
            }
            _ => {}
        }
    }
    l
}

pub(super) const NS_KEYS: [(&str, [&str; 2]); 2] = [("env", ["a", "b"]), ("team", ["p", "q"])];
pub(super) const POD_KEYS: [(&str, [&str; 2]); 2] = [("app", ["w", "d"]), ("tier", ["f", "b"])];

#[derive(Debug, Clone)]
pub(super) struct PodGen {
    pub(super) ns: usize,
    pub(super) subnet: u8,
    pub(super) ports: u8,
}

fn selector(bits: u8, keys: [(&str, [&str; 2]); 2]) -> LabelSelector {
    // Low 3 bits choose the form, the rest the key and value.
    let (k, vals) = keys[usize::from((bits >> 3) & 1)];
    let v = vals[usize::from((bits >> 4) & 1)].to_string();
    let req = |op: &str, values: Option<Vec<String>>| LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: k.into(),
            operator: op.into(),
            values,
        }]),
    };
    match bits & 7 {
        0 | 1 => LabelSelector::default(),
        2 => LabelSelector {
            match_labels: Some(BTreeMap::from([(k.to_string(), v)])),
            match_expressions: None,
        },
        3 => req("In", Some(vec![v])),
        4 => req("NotIn", Some(vec![v])),
        5 => req("Exists", None),
        6 => req("DoesNotExist", None),
        _ => req("In", Some(vals.iter().map(|s| s.to_string()).collect())),
    }
}

fn ip_block(bits: u8) -> IPBlock {
    let (cidr, except): (&str, &[&str]) = match bits % 7 {
        0 => ("10.0.0.0/16", &[]),
        1 => ("10.0.0.0/16", &["10.0.1.0/24"]),
        2 => ("10.0.0.0/24", &[]),
        3 => ("0.0.0.0/0", &["10.0.0.0/24", "10.0.1.2/32"]),
        4 => ("10.0.1.0/24", &["10.0.1.0/30"]),
        5 => ("10.0.0.2/32", &[]),
        _ => ("0.0.0.0/0", &[]),
    };
    IPBlock {
        cidr: cidr.into(),
        except: (!except.is_empty()).then(|| except.iter().map(|s| s.to_string()).collect()),
    }
}

fn peer(bits: u16) -> NetworkPolicyPeer {
    let b = (bits >> 2) as u8;
    let mut p = NetworkPolicyPeer::default();
    match bits & 3 {
        0 => p.pod_selector = Some(selector(b, POD_KEYS)),
        1 => p.namespace_selector = Some(selector(b, NS_KEYS)),
        2 => {
            p.pod_selector = Some(selector(b, POD_KEYS));
            p.namespace_selector = Some(selector(b.rotate_left(3), NS_KEYS));
        }
        _ => p.ip_block = Some(ip_block(b)),
    }
    p
}

fn port(bits: u8) -> NetworkPolicyPort {
    let p = |proto: &str, port: Option<IntOrString>, end: Option<i32>| NetworkPolicyPort {
        protocol: Some(proto.into()),
        port,
        end_port: end,
    };
    match bits % 8 {
        0 => p("UDP", None, None),
        1 => p("TCP", Some(IntOrString::Int(80)), None),
        2 => p("UDP", Some(IntOrString::Int(53)), None),
        3 => p("TCP", Some(IntOrString::Int(80)), Some(8080)),
        4 => p("TCP", Some(IntOrString::String("http".into())), None),
        5 => p("UDP", Some(IntOrString::String("dns".into())), None),
        6 => p("UDP", Some(IntOrString::String("http".into())), None),
        _ => p("SCTP", Some(IntOrString::Int(80)), None),
    }
}

#[derive(Debug, Clone)]
struct RuleGen {
    /// None: no `from`/`to` at all.
    peers: Option<Vec<u16>>,
    ports: Vec<u8>,
}

#[derive(Debug, Clone)]
pub(super) struct PolicyGen {
    ns: usize,
    sel: u8,
    types: u8,
    ingress: Option<Vec<RuleGen>>,
    egress: Option<Vec<RuleGen>>,
}

fn rule_gen() -> impl Strategy<Value = RuleGen> {
    (
        prop::option::weighted(0.8, prop::collection::vec(any::<u16>(), 0..3)),
        prop::collection::vec(any::<u8>(), 0..3),
    )
        .prop_map(|(peers, ports)| RuleGen { peers, ports })
}

pub(super) fn policy_gen() -> impl Strategy<Value = PolicyGen> {
    (
        0..NS.len(),
        any::<u8>(),
        0u8..4,
        prop::option::of(prop::collection::vec(rule_gen(), 0..3)),
        prop::option::of(prop::collection::vec(rule_gen(), 0..3)),
    )
        .prop_map(|(ns, sel, types, ingress, egress)| PolicyGen {
            ns,
            sel,
            types,
            ingress,
            egress,
        })
}

pub(super) fn build_policy(i: usize, g: &PolicyGen) -> NetworkPolicy {
    let peers = |r: &RuleGen| {
        r.peers
            .as_ref()
            .map(|v| v.iter().map(|b| peer(*b)).collect())
    };
    let ports =
        |r: &RuleGen| (!r.ports.is_empty()).then(|| r.ports.iter().map(|b| port(*b)).collect());
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(format!("p{i}")),
            namespace: Some(NS[g.ns].into()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(g.sel, POD_KEYS)),
            policy_types: match g.types {
                0 => None,
                1 => Some(vec!["Ingress".into()]),
                2 => Some(vec!["Egress".into()]),
                _ => Some(vec!["Ingress".into(), "Egress".into()]),
            },
            ingress: g.ingress.as_ref().map(|rs| {
                rs.iter()
                    .map(|r| NetworkPolicyIngressRule {
                        from: peers(r),
                        ports: ports(r),
                    })
                    .collect()
            }),
            egress: g.egress.as_ref().map(|rs| {
                rs.iter()
                    .map(|r| NetworkPolicyEgressRule {
                        to: peers(r),
                        ports: ports(r),
                    })
                    .collect()
            }),
        }),
    }
}

pub(super) fn build(
    ns_labels: &[u8],
    pods: &[PodGen],
    pod_labels: &[u8],
    policies: &[PolicyGen],
) -> ClusterState {
    let mut s = ClusterState::new();
    for (i, n) in NS.iter().enumerate() {
        s.upsert_namespace(Namespace::new(*n, labels_from(ns_labels[i], NS_KEYS)));
    }
    for (i, g) in pods.iter().enumerate() {
        let all_ports = [
            ("http", 80, Protocol::Tcp),
            ("http", 8080, Protocol::Tcp),
            ("dns", 53, Protocol::Udp),
            ("http", 81, Protocol::Udp),
        ];
        let ports = all_ports
            .iter()
            .enumerate()
            .filter(|(k, _)| g.ports & (1 << k) != 0)
            .map(|(_, (n, p, proto))| ContainerPort {
                name: Some(n.to_string()),
                port: *p,
                protocol: *proto,
            })
            .collect();
        s.upsert_pod(Pod {
            namespace: NS[g.ns].into(),
            name: format!("pod{i}"),
            labels: labels_from(pod_labels[i], POD_KEYS),
            ip: Some(Ipv4Addr::new(10, 0, g.subnet, i as u8 + 1)),
            node: Some("n".into()),
            ports,
            annotations: Default::default(),
        });
    }
    for (i, p) in policies.iter().enumerate() {
        s.upsert_policy(&build_policy(i, p))
            .expect("generated policies are valid");
    }
    s
}

fn probes(state: &ClusterState) -> Vec<(Peer, Peer, Protocol, u16)> {
    let mut peers: Vec<Peer> = state.pods().map(|p| Peer::Pod(p.key())).collect();
    peers.push(Peer::Node);
    peers.push(Peer::External(Ipv4Addr::new(10, 0, 0, 200)));
    peers.push(Peer::External(Ipv4Addr::new(10, 0, 1, 2)));
    peers.push(Peer::External(Ipv4Addr::new(192, 168, 1, 1)));
    let mut out = Vec::new();
    for s in &peers {
        for d in &peers {
            if !(matches!(s, Peer::Pod(_)) || matches!(d, Peer::Pod(_))) {
                continue;
            }
            for (proto, port) in [
                (Protocol::Tcp, 80),
                (Protocol::Tcp, 81),
                (Protocol::Tcp, 8080),
                (Protocol::Udp, 53),
                (Protocol::Udp, 81),
                (Protocol::Sctp, 80),
            ] {
                out.push((s.clone(), d.clone(), proto, port));
            }
        }
    }
    out
}

fn addr(state: &ClusterState, p: &Peer) -> Addr {
    match p {
        Peer::Pod(r) => Addr::Ip(
            state
                .pod(r)
                .and_then(|p| p.ip)
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
        ),
        Peer::External(ip) => Addr::Ip(*ip),
        Peer::Node => Addr::Host,
    }
}

fn matrix(c: &Compiled, state: &ClusterState, probes: &[(Peer, Peer, Protocol, u16)]) -> Vec<bool> {
    probes
        .iter()
        .map(|(s, d, proto, port)| c.permits(addr(state, s), addr(state, d), *proto, *port))
        .collect()
}

pub(super) fn cluster() -> impl Strategy<Value = (Vec<u8>, Vec<PodGen>, Vec<u8>, Vec<PolicyGen>)> {
    (
        prop::collection::vec(any::<u8>(), 2),
        prop::collection::vec(
            (0..NS.len(), 0u8..2, any::<u8>()).prop_map(|(ns, subnet, ports)| PodGen {
                ns,
                subnet,
                ports,
            }),
            1..6,
        ),
        prop::collection::vec(any::<u8>(), 6),
        prop::collection::vec(policy_gen(), 0..4),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn compiled_matches_engine((nsl, pods, pl, pols) in cluster()) {
        let state = build(&nsl, &pods, &pl, &pols);
        let c = super::compile::compile(&state, None);
        for (s, d, proto, port) in probes(&state) {
            let want = allowed(&state, &s, &d, proto, port).unwrap().is_allowed();
            let got = c.permits(addr(&state, &s), addr(&state, &d), proto, port);
            prop_assert_eq!(got, want, "{} -> {} {}/{}\n{:#?}", s, d, proto, port, c);
        }
    }

    #[test]
    fn update_plan_stays_within_old_then_new(
        (nsl, pods, pl, pols) in cluster(),
        nsl2 in prop::collection::vec(any::<u8>(), 2),
        pl2 in prop::collection::vec(any::<u8>(), 6),
        pols2 in prop::collection::vec(policy_gen(), 0..4),
    ) {
        let old_state = build(&nsl, &pods, &pl, &pols);
        let new_state = build(&nsl2, &pods, &pl2, &pols2);
        let mut compiler = Compiler::new(None);
        let old = compiler.compile(&old_state);
        let new = compiler.compile(&new_state);
        let pr = probes(&old_state);
        let old_m = matrix(&old, &old_state, &pr);
        let new_m = matrix(&new, &old_state, &pr);
        let p = plan(&old, &new);
        let mut dp = old.clone();
        for (phase, ops) in p.phases() {
            let bound = if matches!(phase, "prepare" | "narrow") { &old_m } else { &new_m };
            for op in ops {
                dp.apply(op);
                for (k, (now, b)) in matrix(&dp, &old_state, &pr).iter().zip(bound).enumerate() {
                    prop_assert!(!now || *b, "after {:?} ({}): {:?}", op, phase, pr[k]);
                }
            }
        }
        prop_assert_eq!(matrix(&dp, &old_state, &pr), new_m);
        prop_assert!(plan(&dp, &new).narrow.is_empty() && plan(&dp, &new).widen.is_empty());
    }
}
