//! The incremental compiler against the full one: after any sequence of object changes and local
//! allocation changes, a [`Regenerator`] holds what [`compile`] gives for the final state with the
//! allocations laid over it, up to the choice of identity numbers.

use super::compile::{
    Compiled, DirectionRules, FIRST_POD_ID, IdentityKey, PortSet, Version, compile, plan,
    plan_touched,
};
use super::incremental::{Change, Regenerator, diff_state, overlay_local};
use super::model::{ClusterState, ContainerPort, Namespace, ObjRef, Pod, PodRef, Protocol};
use super::prop_tests::{
    NS, NS_KEYS, POD_KEYS, PolicyGen, build, build_policy, cluster, labels_from, policy_gen,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

const NODE: &str = "n";

/// A remote identity number or a reserved one, so two compilations with different numbering
/// compare equal when they mean the same.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Remote {
    Reserved(u32),
    Key(IdentityKey),
}

#[derive(Debug, PartialEq, Eq)]
struct CanonDir {
    isolated: bool,
    identities: BTreeMap<Remote, PortSet>,
    cidrs: BTreeMap<super::cidr::Cidr, PortSet>,
}

#[derive(Debug, PartialEq, Eq)]
struct Canon {
    identities: BTreeSet<IdentityKey>,
    ip_identity: BTreeMap<Ipv4Addr, IdentityKey>,
    endpoints: BTreeMap<Ipv4Addr, (PodRef, IdentityKey, CanonDir, CanonDir)>,
}

fn canon(c: &Compiled) -> Canon {
    let key = |id: &u32| c.identities[id].clone();
    let remote = |id: &u32| {
        if *id < FIRST_POD_ID {
            Remote::Reserved(*id)
        } else {
            Remote::Key(key(id))
        }
    };
    let dir = |d: &DirectionRules| CanonDir {
        isolated: d.isolated,
        identities: d
            .identities
            .iter()
            .map(|(id, ps)| (remote(id), ps.clone()))
            .collect(),
        cidrs: d.cidrs.clone(),
    };
    let keys: BTreeSet<IdentityKey> = c.identities.values().cloned().collect();
    assert_eq!(
        keys.len(),
        c.identities.len(),
        "one label set under two numbers"
    );
    Canon {
        identities: keys,
        ip_identity: c
            .ip_identity
            .iter()
            .map(|(ip, id)| (*ip, key(id)))
            .collect(),
        endpoints: c
            .endpoints
            .iter()
            .map(|(ip, e)| {
                (
                    *ip,
                    (
                        e.pod.clone(),
                        key(&e.identity),
                        dir(&e.ingress),
                        dir(&e.egress),
                    ),
                )
            })
            .collect(),
    }
}

fn full(state: &ClusterState, local: &BTreeMap<PodRef, Ipv4Addr>) -> Compiled {
    compile(&overlay_local(state, local, NODE), Some(NODE))
}

/// Addresses pods and allocations draw from: few, so that addresses collide.
fn ip(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, k % 2, k % 5 + 1)
}

const SLOTS: usize = 7;

fn pod_name(i: usize) -> String {
    format!("pod{i}")
}

fn ports(bits: u8) -> Vec<ContainerPort> {
    [
        ("http", 80, Protocol::Tcp),
        ("http", 8080, Protocol::Tcp),
        ("dns", 53, Protocol::Udp),
        ("http", 81, Protocol::Udp),
    ]
    .iter()
    .enumerate()
    .filter(|(k, _)| bits & (1 << k) != 0)
    .map(|(_, (n, p, proto))| ContainerPort {
        name: Some(n.to_string()),
        port: *p,
        protocol: *proto,
    })
    .collect()
}

#[derive(Debug, Clone)]
enum Step {
    /// Create or replace pod `slot`.
    Pod {
        slot: usize,
        ns: usize,
        labels: u8,
        ports: u8,
        ip: Option<u8>,
        on_node: bool,
    },
    PodLabels(usize, u8),
    DeletePod(usize),
    Namespace(usize, u8),
    DeleteNamespace(usize),
    Policy(usize, PolicyGen),
    DeletePolicy(usize),
    AddLocal {
        slot: usize,
        ns: usize,
        ip: u8,
    },
    RemoveLocal(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            0..SLOTS,
            0..NS.len(),
            any::<u8>(),
            any::<u8>(),
            prop::option::weighted(0.8, any::<u8>()),
            any::<bool>()
        )
            .prop_map(|(slot, ns, labels, ports, ip, on_node)| Step::Pod {
                slot,
                ns,
                labels,
                ports,
                ip,
                on_node
            }),
        (0..SLOTS, any::<u8>()).prop_map(|(s, l)| Step::PodLabels(s, l)),
        (0..SLOTS).prop_map(Step::DeletePod),
        (0..NS.len(), any::<u8>()).prop_map(|(n, l)| Step::Namespace(n, l)),
        (0..NS.len()).prop_map(Step::DeleteNamespace),
        (0usize..5, policy_gen()).prop_map(|(i, g)| Step::Policy(i, g)),
        (0usize..5).prop_map(Step::DeletePolicy),
        (0..SLOTS, 0..NS.len(), any::<u8>()).prop_map(|(slot, ns, ip)| Step::AddLocal {
            slot,
            ns,
            ip
        }),
        (0..SLOTS).prop_map(Step::RemoveLocal),
    ]
}

/// Plays `step` on the state and the local allocations; the regenerator gets the same, as object
/// changes (from a whole-state diff, as the agent does) and local calls.
fn play(
    step: &Step,
    state: &mut ClusterState,
    local: &mut BTreeMap<PodRef, Ipv4Addr>,
    regen: &mut Regenerator,
) {
    let before = state.clone();
    // Finds pod `slot` in whichever namespace it lives.
    let find = |state: &ClusterState, slot: usize| {
        state
            .pods()
            .find(|p| p.name == pod_name(slot))
            .map(|p| p.key())
    };
    match step {
        Step::Pod {
            slot,
            ns,
            labels,
            ports: p,
            ip: a,
            on_node,
        } => {
            if let Some(k) = find(state, *slot) {
                state.remove_pod(&k);
            }
            state.upsert_pod(Pod {
                namespace: NS[*ns].into(),
                name: pod_name(*slot),
                labels: labels_from(*labels, POD_KEYS),
                ip: a.map(ip),
                node: Some(if *on_node { NODE } else { "other" }.into()),
                ports: ports(*p),
                annotations: Default::default(),
            });
        }
        Step::PodLabels(slot, labels) => {
            if let Some(k) = find(state, *slot) {
                let mut p = state.pod(&k).unwrap().clone();
                p.labels = labels_from(*labels, POD_KEYS);
                state.upsert_pod(p);
            }
        }
        Step::DeletePod(slot) => {
            if let Some(k) = find(state, *slot) {
                state.remove_pod(&k);
            }
        }
        Step::Namespace(n, labels) => {
            state.upsert_namespace(Namespace::new(NS[*n], labels_from(*labels, NS_KEYS)))
        }
        Step::DeleteNamespace(n) => {
            state.remove_namespace(NS[*n]);
        }
        Step::Policy(i, g) => state
            .upsert_policy(&build_policy(*i, g))
            .expect("generated policies are valid"),
        Step::DeletePolicy(i) => {
            let gone: Vec<ObjRef> = state
                .policies()
                .filter(|p| p.name == format!("p{i}"))
                .map(|p| p.key())
                .collect();
            for k in gone {
                state.remove_policy(&k);
            }
        }
        Step::AddLocal { slot, ns, ip: a } => {
            let key = find(state, *slot).unwrap_or_else(|| ObjRef::new(NS[*ns], pod_name(*slot)));
            // One address per allocation: IPAM never hands out one address twice.
            let addr = ip(*a);
            if !local.values().any(|v| *v == addr) {
                local.insert(key.clone(), addr);
                regen.add_local(key, addr);
            }
        }
        Step::RemoveLocal(slot) => {
            let gone: Vec<PodRef> = local
                .keys()
                .filter(|k| k.name == pod_name(*slot))
                .cloned()
                .collect();
            for k in gone {
                local.remove(&k);
                regen.remove_local(&k);
            }
        }
    }
    regen.apply_all(diff_state(&before, state));
}

fn initial(
    nsl: &[u8],
    pods: &[super::prop_tests::PodGen],
    pl: &[u8],
    pols: &[PolicyGen],
    on_node: &[bool],
) -> ClusterState {
    let mut s = build(nsl, pods, pl, pols);
    // `build` puts every pod on one node; move some elsewhere.
    let moved: Vec<Pod> = s
        .pods()
        .enumerate()
        .filter(|(i, _)| !on_node[*i])
        .map(|(_, p)| Pod {
            node: Some("other".into()),
            ..p.clone()
        })
        .collect();
    for p in moved {
        s.upsert_pod(p);
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_compile(
        (nsl, pods, pl, pols) in cluster(),
        on_node in prop::collection::vec(any::<bool>(), 6),
        locals in prop::collection::vec((0..SLOTS, any::<u8>()), 0..4),
        steps in prop::collection::vec(step(), 0..16),
    ) {
        let mut state = initial(&nsl, &pods, &pl, &pols, &on_node);
        let mut local = BTreeMap::new();
        for (slot, a) in &locals {
            let key = state
                .pods()
                .find(|p| p.name == pod_name(*slot))
                .map(|p| p.key())
                .unwrap_or_else(|| ObjRef::new(NS[0], pod_name(*slot)));
            if !local.values().any(|v| *v == ip(*a)) {
                local.insert(key, ip(*a));
            }
        }
        let mut regen = Regenerator::new(NODE);
        regen.set_local(local.clone());
        regen.apply_all(diff_state(&ClusterState::new(), &state));
        prop_assert_eq!(canon(regen.compile()), canon(&full(&state, &local)));
        for (i, s) in steps.iter().enumerate() {
            play(s, &mut state, &mut local, &mut regen);
            let got = canon(regen.compile());
            let want = canon(&full(&state, &local));
            prop_assert_eq!(got, want, "after step {} {:?}", i, s);
        }
        // Every number in the output is one the output defines.
        let c = regen.compiled();
        for id in c.ip_identity.values() {
            prop_assert!(c.identities.contains_key(id));
        }
    }
}

/// Address map, and per endpoint its two directions.
type Enforced = (
    BTreeMap<Ipv4Addr, u32>,
    Vec<(Ipv4Addr, DirectionRules, DirectionRules)>,
);

/// What a dataplane holding `c` enforces: the rules and address map, not the labels of the
/// record (a mirror learns an endpoint's pod and identity from no op).
fn enforced(c: &Compiled) -> Enforced {
    (
        c.ip_identity.clone(),
        c.endpoints
            .iter()
            .map(|(ip, e)| (*ip, e.ingress.clone(), e.egress.clone()))
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A consumer that applied an earlier revision of the regenerator's output (one compile ago or
    /// several) plans over the touched keys only and gets the full plan, op for op; applied, it
    /// holds the output. A copy of the output is untracked.
    #[test]
    fn touched_plan_equals_full_plan(
        (nsl, pods, pl, pols) in cluster(),
        on_node in prop::collection::vec(any::<bool>(), 6),
        locals in prop::collection::vec((0..SLOTS, any::<u8>()), 0..4),
        steps in prop::collection::vec((step(), any::<bool>()), 0..16),
    ) {
        let mut state = initial(&nsl, &pods, &pl, &pols, &on_node);
        let mut local = BTreeMap::new();
        for (slot, a) in &locals {
            let key = state
                .pods()
                .find(|p| p.name == pod_name(*slot))
                .map(|p| p.key())
                .unwrap_or_else(|| ObjRef::new(NS[0], pod_name(*slot)));
            if !local.values().any(|v| *v == ip(*a)) {
                local.insert(key, ip(*a));
            }
        }
        let mut regen = Regenerator::new(NODE);
        regen.set_local(local.clone());
        regen.apply_all(diff_state(&ClusterState::new(), &state));
        let mut held = Compiled::default();
        let mut at: Option<Version> = None;
        let sync = |held: &mut Compiled, at: &mut Option<Version>, c: &Compiled| {
            let p = match at.and_then(|v| c.touched_since(v)) {
                Some(t) => {
                    let p = plan_touched(held, c, &t);
                    assert_eq!(&p, &plan(held, c), "touched {:?}", t);
                    p
                }
                None => plan(held, c),
            };
            for (_, ops) in p.phases() {
                for op in ops {
                    held.apply(op);
                }
            }
            assert_eq!(enforced(held), enforced(c));
            *at = c.version();
        };
        sync(&mut held, &mut at, regen.compile());
        prop_assert!(at.is_some(), "the regenerator's output is tracked");
        prop_assert!(regen.compiled().clone().version().is_none(), "a copy is untracked");
        for (s, then_sync) in &steps {
            play(s, &mut state, &mut local, &mut regen);
            let c = regen.compile();
            if *then_sync {
                sync(&mut held, &mut at, c);
            }
        }
        sync(&mut held, &mut at, regen.compile());
    }
}

/// Namespaces `a`, `b`, `c`, each with a local endpoint `web` whose policy admits pods labelled
/// `role=client` of its own namespace, plus 30 remote pods per namespace.
fn three_namespaces() -> (ClusterState, BTreeMap<PodRef, Ipv4Addr>) {
    let mut s = ClusterState::new();
    let mut local = BTreeMap::new();
    for (n, ns) in ["a", "b", "c"].iter().enumerate() {
        s.upsert_namespace(Namespace::new(*ns, Default::default()));
        let web = Pod {
            namespace: ns.to_string(),
            name: "web".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ip: None,
            node: Some(NODE.into()),
            ports: Vec::new(),
            annotations: Default::default(),
        };
        local.insert(web.key(), Ipv4Addr::new(10, 1, n as u8, 1));
        s.upsert_pod(web);
        for i in 0..30u8 {
            s.upsert_pod(Pod {
                namespace: ns.to_string(),
                name: format!("r{i}"),
                labels: [("role".to_string(), format!("r{}", i % 3))].into(),
                ip: Some(Ipv4Addr::new(10, 2, n as u8, i + 1)),
                node: Some("other".into()),
                ports: Vec::new(),
                annotations: Default::default(),
            });
        }
        let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(
            serde_json::json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}
            }),
        )
        .unwrap();
        s.upsert_policy(&np).unwrap();
    }
    (s, local)
}

#[test]
fn a_remote_label_change_regenerates_only_the_endpoints_it_touches() {
    let (mut state, local) = three_namespaces();
    let mut regen = Regenerator::new(NODE);
    regen.set_local(local.clone());
    regen.apply_all(diff_state(&ClusterState::new(), &state));
    regen.compile();
    assert_eq!(regen.stats().endpoints, 3);

    // A remote pod of `b` becomes a client: a new identity only b's policy matches.
    let before = state.clone();
    let mut p = state.pod(&ObjRef::new("b", "r4")).unwrap().clone();
    p.labels.insert("role".into(), "client".into());
    state.upsert_pod(p);
    let changes = diff_state(&before, &state);
    assert_eq!(changes.len(), 1, "{changes:?}");
    regen.apply_all(changes);
    let c = regen.compile().clone();
    assert_eq!(regen.stats().endpoints, 1, "{:?}", regen.stats());
    assert_eq!(regen.stats().identities_added, 1);
    assert_eq!(canon(&c), canon(&full(&state, &local)));
    let b_web = &c.endpoints[&Ipv4Addr::new(10, 1, 1, 1)];
    let client = c.ip_identity[&Ipv4Addr::new(10, 2, 1, 5)];
    assert!(b_web.ingress.identities.contains_key(&client));

    // A label change to a label set that exists already and no policy here names: only the
    // address → identity map moves, no endpoint is rebuilt.
    let before = state.clone();
    let mut p = state.pod(&ObjRef::new("c", "r1")).unwrap().clone();
    p.labels.insert("role".into(), "r2".into());
    state.upsert_pod(p);
    regen.apply_all(diff_state(&before, &state));
    let c = regen.compile().clone();
    assert_eq!(regen.stats().endpoints, 0, "{:?}", regen.stats());
    assert_eq!(canon(&c), canon(&full(&state, &local)));

    // An unchanged state is no work at all.
    regen.apply_all(diff_state(&state, &state.clone()));
    regen.compile();
    assert_eq!(regen.stats(), Default::default());
}

#[test]
fn a_new_local_pod_regenerates_itself_and_identity_numbers_stay() {
    let (state, mut local) = three_namespaces();
    let mut regen = Regenerator::new(NODE);
    regen.set_local(local.clone());
    regen.apply_all(diff_state(&ClusterState::new(), &state));
    let first = regen.compile().clone();

    // An ADD of a pod the state does not know: one endpoint, closed by nothing here.
    let key = ObjRef::new("a", "new");
    local.insert(key.clone(), Ipv4Addr::new(10, 1, 0, 2));
    regen.add_local(key.clone(), Ipv4Addr::new(10, 1, 0, 2));
    let c = regen.compile().clone();
    assert_eq!(regen.stats().endpoints, 1, "{:?}", regen.stats());
    assert_eq!(canon(&c), canon(&full(&state, &local)));
    for (ip, id) in &first.ip_identity {
        assert_eq!(c.ip_identity.get(ip), Some(id), "{ip} was renumbered");
    }

    // Gone again: its endpoint goes, the rest stays as it was.
    local.remove(&key);
    regen.remove_local(&key);
    let c = regen.compile().clone();
    assert_eq!(c, first);
}

#[test]
fn seeded_numbers_are_kept_and_never_given_to_another_label_set() {
    let (state, local) = three_namespaces();
    let r0 = Ipv4Addr::new(10, 2, 0, 1); // a/r0, role=r0
    let r1 = Ipv4Addr::new(10, 2, 0, 2); // a/r1, role=r1
    let mut regen = Regenerator::new(NODE);
    regen.seed([(r0, 5000), (r1, 5000)]);
    regen.set_local(local);
    regen.apply_all(diff_state(&ClusterState::new(), &state));
    let c = regen.compile();
    assert_eq!(c.ip_identity[&r0], 5000);
    assert_ne!(c.ip_identity[&r1], 5000, "two label sets under one number");
    assert!(
        c.ip_identity
            .values()
            .filter(|id| **id != 5000)
            .all(|id| *id > 5000)
    );
}

#[test]
fn diff_state_sees_only_what_changed() {
    let (a, _) = three_namespaces();
    let mut b = a.clone();
    assert!(diff_state(&a, &b).is_empty());
    b.remove_pod(&ObjRef::new("a", "r0"));
    b.remove_namespace("c");
    let p = b.policies().next().unwrap().clone();
    let mut raw = p.raw.clone();
    raw.metadata.name = Some("other".into());
    b.upsert_policy(&raw).unwrap();
    let changes = diff_state(&a, &b);
    assert!(
        matches!(
            changes.as_slice(),
            [
                Change::DeleteNamespace(n),
                Change::DeletePod(k),
                Change::UpsertPolicy(np)
            ] if n == "c" && *k == ObjRef::new("a", "r0") && np.name == "other"
        ),
        "{changes:?}"
    );
    let shared = Arc::new(a.pod(&ObjRef::new("b", "r0")).unwrap().clone());
    let mut c = a.clone();
    c.upsert_pod(shared.clone());
    let mut d = a.clone();
    d.upsert_pod(shared);
    assert!(diff_state(&c, &d).is_empty());
}
