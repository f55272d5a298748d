//! Watcher events folded into the agent's view of the cluster.
//!
//! Each watched kind arrives as a stream of `kube_runtime::watcher::Event`s. A (re)list is
//! buffered from `Init` to `InitDone` and then replaces that kind's objects at once, so objects
//! deleted while a watch was down disappear, and a half-done relist is never seen. The state is
//! "synced" once every kind has completed its first list; before that nothing is published, so no
//! pod is placed or isolated from a partial picture.
//!
//! Objects are converted as they arrive and the API objects are dropped: a pod costs its labels,
//! annotations, address, node and named ports, not its whole spec.

use crate::crd::{IPBlock, IPClaim, Subnet, VirtualNetwork};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use kube::ResourceExt as _;
use kube::runtime::watcher::Event;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use vpcnet_policy::ClusterState;
use vpcnet_policy::model::{self, ObjRef};

/// The kinds the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchedKind {
    Namespace,
    Pod,
    NetworkPolicy,
    Node,
    VirtualNetwork,
    Subnet,
    IPBlock,
    IPClaim,
}

impl WatchedKind {
    pub const ALL: [WatchedKind; 8] = [
        WatchedKind::Namespace,
        WatchedKind::Pod,
        WatchedKind::NetworkPolicy,
        WatchedKind::Node,
        WatchedKind::VirtualNetwork,
        WatchedKind::Subnet,
        WatchedKind::IPBlock,
        WatchedKind::IPClaim,
    ];

    /// The resource's plural, as RBAC and error messages name it.
    pub fn resource(self) -> &'static str {
        match self {
            WatchedKind::Namespace => "namespaces",
            WatchedKind::Pod => "pods",
            WatchedKind::NetworkPolicy => "networkpolicies.networking.k8s.io",
            WatchedKind::Node => "nodes",
            WatchedKind::VirtualNetwork => "virtualnetworks.vpcnet.io",
            WatchedKind::Subnet => "subnets.vpcnet.io",
            WatchedKind::IPBlock => "ipblocks.vpcnet.io",
            WatchedKind::IPClaim => "ipclaims.vpcnet.io",
        }
    }

    /// Whether a change of this kind changes the topology (and not the policy state).
    pub fn is_topology(self) -> bool {
        matches!(
            self,
            WatchedKind::VirtualNetwork | WatchedKind::Subnet | WatchedKind::IPBlock
        )
    }
}

/// What the agent keeps of a Node: enough to own claim objects by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub uid: String,
}

/// Everything watched, as the agent uses it.
#[derive(Debug, Default)]
pub struct Fold {
    state: ClusterState,
    pub networks: BTreeMap<String, VirtualNetwork>,
    pub subnets: BTreeMap<String, Subnet>,
    pub blocks: BTreeMap<String, IPBlock>,
    pub claims: BTreeMap<String, IPClaim>,
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Lists in progress, per kind.
    listing: BTreeMap<WatchedKind, Vec<ObjRef>>,
    listed: BTreeSet<WatchedKind>,
    /// Objects that could not be taken as they are, with why (and what was done instead).
    rejected: BTreeMap<(WatchedKind, ObjRef), String>,
    generation: u64,
}

/// What one event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changed {
    pub policy: bool,
    pub topology: bool,
    /// This event completed a list.
    pub listed: bool,
}

impl Changed {
    fn of(kind: WatchedKind) -> Self {
        Changed {
            policy: !kind.is_topology(),
            topology: kind.is_topology(),
            listed: false,
        }
    }
    pub fn any(self) -> bool {
        self.policy || self.topology || self.listed
    }
    pub fn merge(&mut self, o: Changed) {
        self.policy |= o.policy;
        self.topology |= o.topology;
        self.listed |= o.listed;
    }
}

/// A watched kind: how its objects enter and leave the fold.
pub trait Watched: kube::Resource + Clone + Send + 'static {
    const KIND: WatchedKind;
    fn key(&self) -> ObjRef {
        ObjRef::new(self.namespace().unwrap_or_default(), self.name_any())
    }
    fn upsert(self, fold: &mut Fold);
    fn remove(key: &ObjRef, fold: &mut Fold);
    fn keys(fold: &Fold) -> Vec<ObjRef>;
}

impl Fold {
    /// Whether every kind has been listed once.
    pub fn synced(&self) -> bool {
        WatchedKind::ALL.iter().all(|k| self.listed.contains(k))
    }

    /// Kinds whose first list has not completed.
    pub fn unlisted(&self) -> Vec<WatchedKind> {
        WatchedKind::ALL
            .into_iter()
            .filter(|k| !self.listed.contains(k))
            .collect()
    }

    pub fn rejected(&self) -> impl Iterator<Item = (&(WatchedKind, ObjRef), &String)> {
        self.rejected.iter()
    }

    /// The policy-facing state, with a generation that grows with every call that follows a
    /// change.
    pub fn cluster_state(&mut self) -> Arc<ClusterState> {
        self.generation += 1;
        self.state.set_generation(self.generation);
        Arc::new(self.state.clone())
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn apply<K: Watched>(&mut self, event: Event<K>) -> Changed {
        match event {
            Event::Init => {
                self.listing.insert(K::KIND, Vec::new());
                Changed::default()
            }
            Event::InitApply(obj) => {
                // Applied as it comes (so a large list is not held twice); what the list did
                // not name is removed at InitDone. Nothing is published before InitDone.
                let key = obj.key();
                self.listing.entry(K::KIND).or_default().push(key);
                obj.upsert(self);
                Changed::default()
            }
            Event::InitDone => {
                let listed: BTreeSet<ObjRef> = self
                    .listing
                    .remove(&K::KIND)
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                for gone in K::keys(self).into_iter().filter(|k| !listed.contains(k)) {
                    K::remove(&gone, self);
                    self.rejected.remove(&(K::KIND, gone));
                }
                self.listed.insert(K::KIND);
                Changed {
                    listed: true,
                    ..Changed::of(K::KIND)
                }
            }
            Event::Apply(obj) => {
                obj.upsert(self);
                Changed::of(K::KIND)
            }
            Event::Delete(obj) => {
                let key = obj.key();
                K::remove(&key, self);
                self.rejected.remove(&(K::KIND, key));
                Changed::of(K::KIND)
            }
        }
    }

    fn accepted(&mut self, kind: WatchedKind, key: &ObjRef) {
        self.rejected.remove(&(kind, key.clone()));
    }

    fn reject(&mut self, kind: WatchedKind, key: ObjRef, why: String) {
        tracing::warn!(kind = ?kind, object = %key, %why, "object taken in a restricted form");
        self.rejected.insert((kind, key), why);
    }
}

impl Watched for Namespace {
    const KIND: WatchedKind = WatchedKind::Namespace;
    fn upsert(self, fold: &mut Fold) {
        let key = Watched::key(&self);
        match model::Namespace::from_k8s(&self) {
            Ok(ns) => {
                fold.accepted(Self::KIND, &key);
                fold.state.upsert_namespace(ns);
            }
            Err(e) => fold.reject(Self::KIND, key, e.to_string()),
        }
    }
    fn remove(key: &ObjRef, fold: &mut Fold) {
        fold.state.remove_namespace(&key.name);
    }
    fn keys(fold: &Fold) -> Vec<ObjRef> {
        fold.state
            .namespaces()
            .map(|n| ObjRef::new("", &n.name))
            .collect()
    }
}

impl Watched for Pod {
    const KIND: WatchedKind = WatchedKind::Pod;
    fn upsert(mut self, fold: &mut Fold) {
        let key = Watched::key(&self);
        // A pod that has finished holds no address any more (its IP may already be another
        // pod's): it is not in the state at all.
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            fold.state.remove_pod(&key);
            fold.accepted(Self::KIND, &key);
            return;
        }
        match model::Pod::from_k8s(&self) {
            Ok(p) => {
                fold.accepted(Self::KIND, &key);
                fold.state.upsert_pod(p);
            }
            Err(e) => {
                // A port the model refuses: the pod is kept without named ports, so rules
                // naming them match nothing (narrower, never wider).
                if let Some(spec) = self.spec.as_mut() {
                    for c in &mut spec.containers {
                        c.ports = None;
                    }
                }
                let mut why = e.to_string();
                match model::Pod::from_k8s(&self) {
                    Ok(p) => {
                        why.push_str("; kept without its container ports");
                        fold.state.upsert_pod(p);
                    }
                    Err(e2) => {
                        why = e2.to_string();
                        fold.state.remove_pod(&key);
                    }
                }
                fold.reject(Self::KIND, key, why);
            }
        }
    }
    fn remove(key: &ObjRef, fold: &mut Fold) {
        fold.state.remove_pod(key);
    }
    fn keys(fold: &Fold) -> Vec<ObjRef> {
        fold.state.pods().map(|p| p.key()).collect()
    }
}

impl Watched for NetworkPolicy {
    const KIND: WatchedKind = WatchedKind::NetworkPolicy;
    fn upsert(self, fold: &mut Fold) {
        let key = Watched::key(&self);
        match fold.state.upsert_policy(&self) {
            Ok(()) => fold.accepted(Self::KIND, &key),
            Err(e) => {
                // Fail closed: the pods it selects are isolated both ways with nothing allowed,
                // as if the policy allowed nothing; if even its selector is unreadable, every
                // pod of its namespace is.
                let deny = |selector| NetworkPolicy {
                    metadata: self.metadata.clone(),
                    spec: Some(NetworkPolicySpec {
                        pod_selector: selector,
                        policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                        ingress: None,
                        egress: None,
                    }),
                };
                let selector = self.spec.as_ref().and_then(|s| s.pod_selector.clone());
                let why = if fold.state.upsert_policy(&deny(selector)).is_ok() {
                    format!("{e}; enforced as deny-all for the pods it selects until it is fixed")
                } else {
                    fold.state
                        .upsert_policy(&deny(Some(Default::default())))
                        .expect("an empty selector is always valid");
                    format!(
                        "{e}; enforced as deny-all for every pod of its namespace until it is fixed"
                    )
                };
                fold.reject(Self::KIND, key, why);
            }
        }
    }
    fn remove(key: &ObjRef, fold: &mut Fold) {
        fold.state.remove_policy(key);
    }
    fn keys(fold: &Fold) -> Vec<ObjRef> {
        fold.state.policies().map(|p| p.key()).collect()
    }
}

impl Watched for Node {
    const KIND: WatchedKind = WatchedKind::Node;
    fn upsert(self, fold: &mut Fold) {
        let name = self.name_any();
        let uid = self.metadata.uid.clone().unwrap_or_default();
        fold.nodes.insert(name.clone(), NodeInfo { name, uid });
    }
    fn remove(key: &ObjRef, fold: &mut Fold) {
        fold.nodes.remove(&key.name);
    }
    fn keys(fold: &Fold) -> Vec<ObjRef> {
        fold.nodes.keys().map(|n| ObjRef::new("", n)).collect()
    }
}

macro_rules! cluster_scoped {
    ($ty:ty, $kind:ident, $field:ident) => {
        impl Watched for $ty {
            const KIND: WatchedKind = WatchedKind::$kind;
            fn upsert(self, fold: &mut Fold) {
                fold.$field.insert(self.name_any(), self);
            }
            fn remove(key: &ObjRef, fold: &mut Fold) {
                fold.$field.remove(&key.name);
            }
            fn keys(fold: &Fold) -> Vec<ObjRef> {
                fold.$field.keys().map(|n| ObjRef::new("", n)).collect()
            }
        }
    };
}

cluster_scoped!(VirtualNetwork, VirtualNetwork, networks);
cluster_scoped!(Subnet, Subnet, subnets);
cluster_scoped!(IPBlock, IPBlock, blocks);
cluster_scoped!(IPClaim, IPClaim, claims);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, labels: serde_json::Value, ip: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": {"nodeName": "n2", "containers": [{"name": "c",
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "phase": "Running"},
        }))
        .unwrap()
    }

    fn ns(name: &str) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {"kubernetes.io/metadata.name": name}}}))
        .unwrap()
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
            .unwrap()
    }

    /// Completes the first list of every kind but the ones given, with no objects.
    fn list_empty_except(fold: &mut Fold, except: &[WatchedKind]) {
        macro_rules! empty {
            ($ty:ty) => {
                if !except.contains(&<$ty as Watched>::KIND) {
                    fold.apply::<$ty>(Event::Init);
                    fold.apply::<$ty>(Event::InitDone);
                }
            };
        }
        empty!(Namespace);
        empty!(Pod);
        empty!(NetworkPolicy);
        empty!(Node);
        empty!(VirtualNetwork);
        empty!(Subnet);
        empty!(IPBlock);
        empty!(IPClaim);
    }

    #[test]
    fn synced_only_when_every_initial_list_is_complete() {
        let mut f = Fold::default();
        assert!(!f.synced());
        list_empty_except(&mut f, &[WatchedKind::Pod]);
        assert!(!f.synced());
        assert_eq!(f.unlisted(), [WatchedKind::Pod]);
        f.apply::<Pod>(Event::Init);
        f.apply(Event::InitApply(pod(
            "a",
            "p1",
            json!({"app": "x"}),
            "10.0.0.5",
        )));
        assert!(!f.synced(), "a list in progress is not a list");
        let c = f.apply::<Pod>(Event::InitDone);
        assert!(c.listed && c.policy && !c.topology);
        assert!(f.synced());
        assert_eq!(f.state().pods().count(), 1);
    }

    #[test]
    fn add_modify_delete_and_a_relist_that_drops_what_was_deleted_meanwhile() {
        let mut f = Fold::default();
        list_empty_except(&mut f, &[]);
        f.apply(Event::Apply(ns("a")));
        f.apply(Event::Apply(pod(
            "a",
            "p1",
            json!({"app": "x"}),
            "10.0.0.5",
        )));
        f.apply(Event::Apply(pod(
            "a",
            "p2",
            json!({"app": "y"}),
            "10.0.0.6",
        )));
        // Modify: the label change is what the state holds now.
        f.apply(Event::Apply(pod(
            "a",
            "p1",
            json!({"app": "z"}),
            "10.0.0.5",
        )));
        let p1 = f.state().pod(&ObjRef::new("a", "p1")).unwrap();
        assert_eq!(p1.labels["app"], "z");
        assert_eq!(p1.node.as_deref(), Some("n2"));
        assert_eq!(p1.ports[0].name.as_deref(), Some("http"));
        f.apply(Event::Delete(pod("a", "p2", json!({}), "10.0.0.6")));
        assert!(f.state().pod(&ObjRef::new("a", "p2")).is_none());

        // The watch expired (410) and the watcher relists: p1 was deleted while it was down,
        // p3 created. Until InitDone, the state still holds p1.
        f.apply(Event::Apply(pod("a", "p4", json!({}), "10.0.0.8")));
        f.apply::<Pod>(Event::Init);
        f.apply(Event::InitApply(pod("a", "p3", json!({}), "10.0.0.7")));
        assert!(f.state().pod(&ObjRef::new("a", "p1")).is_some());
        f.apply::<Pod>(Event::InitDone);
        let names: Vec<String> = f.state().pods().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["p3"]);
        // Other kinds are untouched by a pod relist.
        assert!(f.state().namespace("a").is_some());
    }

    #[test]
    fn finished_pods_hold_no_address() {
        let mut f = Fold::default();
        let mut done = pod("a", "job", json!({}), "10.0.0.9");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        f.apply(Event::Apply(pod("a", "job", json!({}), "10.0.0.9")));
        f.apply(Event::Apply(done));
        assert!(f.state().pod(&ObjRef::new("a", "job")).is_none());
    }

    #[test]
    fn an_unreadable_policy_is_enforced_as_deny_all_not_dropped() {
        let mut f = Fold::default();
        list_empty_except(&mut f, &[]);
        f.apply(Event::Apply(ns("a")));
        // An ipBlock the model refuses (not a CIDR).
        let np = policy(
            "a",
            "weird",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"ipBlock": {"cidr": "not-a-cidr"}}]}]}),
        );
        f.apply(Event::Apply(np));
        let p = f.state().policies().next().expect("policy kept");
        assert_eq!(p.ingress.as_deref().map(<[_]>::len), Some(0));
        assert_eq!(p.egress.as_deref().map(<[_]>::len), Some(0));
        let (key, why) = f.rejected().next().unwrap();
        assert_eq!(key.0, WatchedKind::NetworkPolicy);
        assert!(why.contains("deny-all for the pods it selects"), "{why}");
        // Fixed: the real policy replaces it and the rejection is gone.
        f.apply(Event::Apply(policy(
            "a",
            "weird",
            json!({"podSelector": {"matchLabels": {"app": "db"}},
                   "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
        )));
        assert_eq!(f.rejected().count(), 0);
        let p = f.state().policies().next().unwrap();
        assert_eq!(p.ingress.as_deref().map(<[_]>::len), Some(1));
    }

    #[test]
    fn generations_grow_and_topology_kinds_are_told_apart() {
        let mut f = Fold::default();
        list_empty_except(&mut f, &[]);
        let g1 = f.cluster_state().generation();
        let c = f.apply(Event::Apply(crate::crd::VirtualNetwork::new(
            "vpc",
            crate::crd::VirtualNetworkSpec {
                id: 1,
                default: true,
                routable_cidrs: vec![],
                masquerade_exclude: vec![],
                peers: vec![],
            },
        )));
        assert!(c.topology && !c.policy);
        assert!(f.cluster_state().generation() > g1);
        assert_eq!(f.networks.len(), 1);
    }
}
