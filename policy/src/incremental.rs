//! Incremental compilation: the [`Compiled`] of one node kept up to date object by object.
//!
//! [`crate::compile::Compiler`] recompiles every identity and every endpoint from a whole state;
//! at 50,000 pods that is far too much work for one label change. A [`Regenerator`] holds the
//! state itself and, per object change ([`Change`]), redoes only what the change can alter:
//!
//! - **Identities** are reference-counted per [`IdentityKey`]; a pod change moves one count (a
//!   namespace label change, the counts of that namespace's pods). A key whose count drops to
//!   zero is released at the end of the batch, so a pod deleted and re-created in one batch keeps
//!   its number.
//! - **Address → identity** is recomputed only for the addresses of changed pods.
//! - **Policies that select a local endpoint** (and only those: a node holds a few of a
//!   cluster's thousand policies) keep, per rule and pod peer, the set of identities the peer
//!   matches. An identity that appears or goes is matched against those peers alone; where one
//!   matches, the endpoints that policy selects are regenerated. Policies selecting nothing here
//!   cost nothing after they are stored.
//! - **Endpoints** are regenerated from those cached sets: an endpoint's rules depend on its own
//!   labels and ports, on the policies selecting it, on the identities their peers match, and (for
//!   egress ipBlocks with named ports) on the pods inside the block; each of these marks exactly
//!   the endpoints that depend on it.
//!
//! The result is the value [`crate::compile::compile`] gives for the same state with this node's
//! allocations laid over it ([`overlay_local`]), up to the choice of identity numbers — so the
//! dataplane's [`crate::compile::plan`] and its ordering guarantee apply unchanged. Selection is
//! implemented here again, not taken from [`crate::engine`], the oracle both are tested against.

use crate::cidr::{Cidr, lpm_closure, subtract};
use crate::compile::{
    Compiled, DirectionRules, EndpointRules, FIRST_POD_ID, ID_ANY, ID_HOST, IdentityKey,
    LAST_POD_ID, PortSet, Touched, split_ports,
};
use crate::model::{
    AddressIndex, ClusterState, Direction, Labels, NAMESPACE_NAME_LABEL, Namespace, NamespaceMatch,
    ObjRef, PeerMatch, Pod, PodRef, Policy, Protocol,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// One object added, changed or deleted.
#[derive(Debug, Clone)]
pub enum Change {
    UpsertNamespace(Arc<Namespace>),
    DeleteNamespace(String),
    UpsertPod(Arc<Pod>),
    DeletePod(PodRef),
    UpsertPolicy(Arc<Policy>),
    DeletePolicy(ObjRef),
}

/// The object changes of a state's last generations (see [`ClusterState::track_changes`]):
/// bounded, so a consumer that fell further behind compares or recompiles instead.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    pub(crate) tracked: bool,
    /// (generation before, generation after, changes), oldest first, each starting where the
    /// one before ended.
    entries: std::collections::VecDeque<(u64, u64, Arc<Vec<Change>>)>,
    /// Changes in `entries`.
    total: usize,
}

/// At most this many generations are kept, and about this many changes (the newest generation
/// is kept whatever its size).
const LOG_GENERATIONS: usize = 64;
const LOG_CHANGES: usize = 100_000;

impl ChangeLog {
    pub(crate) fn push(&mut self, from: u64, to: u64, changes: Vec<Change>) {
        if self.entries.back().is_some_and(|e| e.1 != from) {
            // Not a continuation of what is recorded: what is recorded no longer leads here.
            self.entries.clear();
            self.total = 0;
        }
        self.total += changes.len();
        self.entries.push_back((from, to, Arc::new(changes)));
        while self.entries.len() > LOG_GENERATIONS
            || (self.total > LOG_CHANGES && self.entries.len() > 1)
        {
            if let Some((_, _, c)) = self.entries.pop_front() {
                self.total -= c.len();
            }
        }
    }

    /// The changes from `from` to `to`, when the recorded ones span exactly that.
    pub(crate) fn since(&self, from: u64, to: u64) -> Option<Vec<Change>> {
        if self.entries.back()?.1 != to {
            return None;
        }
        let first = self.entries.iter().position(|e| e.0 == from)?;
        Some(
            self.entries
                .range(first..)
                .flat_map(|(_, _, c)| c.iter().cloned())
                .collect(),
        )
    }
}

/// The object changes that take `old` to `new`, for a source that publishes whole states. One
/// ordered walk per kind; an object shared by both states (the same `Arc`) costs a pointer
/// comparison, so this is cheap next to compiling even when most of a large state is unchanged.
/// Kinds policy does not read ([`crate::model::Kind`]) are not diffed.
pub fn diff_state(old: &ClusterState, new: &ClusterState) -> Vec<Change> {
    let mut out = Vec::new();
    diff_map(
        old.namespace_map(),
        new.namespace_map(),
        |n| Change::UpsertNamespace(n.clone()),
        |k| Change::DeleteNamespace(k.clone()),
        &mut out,
    );
    diff_map(
        old.pod_map(),
        new.pod_map(),
        |p| Change::UpsertPod(p.clone()),
        |k| Change::DeletePod(k.clone()),
        &mut out,
    );
    diff_map(
        old.policy_map(),
        new.policy_map(),
        |p| Change::UpsertPolicy(p.clone()),
        |k| Change::DeletePolicy(k.clone()),
        &mut out,
    );
    out
}

fn diff_map<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, Arc<V>>,
    new: &BTreeMap<K, Arc<V>>,
    upsert: impl Fn(&Arc<V>) -> Change,
    delete: impl Fn(&K) -> Change,
    out: &mut Vec<Change>,
) {
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => return,
            (Some((ko, _)), None) => {
                out.push(delete(ko));
                o.next();
            }
            (None, Some((_, vn))) => {
                out.push(upsert(vn));
                n.next();
            }
            (Some((ko, vo)), Some((kn, vn))) => match ko.cmp(kn) {
                std::cmp::Ordering::Less => {
                    out.push(delete(ko));
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push(upsert(vn));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(vo, vn) && vo != vn {
                        out.push(upsert(vn));
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

/// The cluster state as `node`'s policy sees it, given the node's own allocations (pod →
/// address): every allocation is a pod on this node with the allocated address (IPAM knows it
/// before the API's `status.podIP` does); an allocation whose pod the state does not know stands
/// for a pod without labels in its namespace, so a namespace's default-deny covers it from its
/// first packet; a pod the state places on this node without an allocation has no endpoint here.
/// The whole-state form of what a [`Regenerator`] maintains, for full compilation.
pub fn overlay_local(
    state: &ClusterState,
    local: &BTreeMap<PodRef, Ipv4Addr>,
    node: &str,
) -> ClusterState {
    let mut out = state.clone();
    for (key, ip) in local {
        let mut pod = out
            .pod(key)
            .cloned()
            .unwrap_or_else(|| blank_pod(key.clone()));
        if pod.ip != Some(*ip) || pod.node.as_deref() != Some(node) {
            pod.ip = Some(*ip);
            pod.node = Some(node.to_string());
            out.upsert_pod(pod);
        }
    }
    let strays: Vec<Pod> = out
        .pods()
        .filter(|p| p.node.as_deref() == Some(node) && !local.contains_key(&p.key()))
        .cloned()
        .collect();
    for mut p in strays {
        p.node = None;
        out.upsert_pod(p);
    }
    out
}

fn blank_pod(key: PodRef) -> Pod {
    Pod {
        namespace: key.namespace,
        name: key.name,
        labels: Labels::new(),
        ip: None,
        node: None,
        ports: Vec::new(),
        annotations: Labels::new(),
    }
}

/// What the last [`Regenerator::compile`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegenStats {
    /// Endpoints whose rules were rebuilt.
    pub endpoints: usize,
    /// Identities created and released.
    pub identities_added: usize,
    pub identities_released: usize,
}

/// One pod as the node sees it.
#[derive(Debug, Clone)]
struct Entry {
    /// As the cluster state has it.
    cluster: Option<Arc<Pod>>,
    /// With the local allocation's address (the same `Arc` when nothing differs).
    pod: Arc<Pod>,
    /// Identity, when the pod has an address.
    id: Option<u32>,
}

/// One peer of one rule, resolved.
#[derive(Debug, Clone)]
enum PeerCache {
    /// The identities the peer matches, kept up to date.
    Pods {
        peer: PeerMatch,
        matched: BTreeSet<u32>,
    },
    Block {
        cidr: Cidr,
        except: Vec<Cidr>,
        /// `cidr` minus `except`, as non-overlapping prefixes.
        prefixes: Vec<Cidr>,
    },
    Ipv6,
}

#[derive(Debug, Clone)]
struct RuleCache {
    fixed: PortSet,
    named: Vec<(String, Protocol)>,
    /// No `from`/`to`: every peer.
    everyone: bool,
    peers: Vec<PeerCache>,
}

/// The resolved rules of a policy that selects at least one local endpoint.
#[derive(Debug, Clone, Default)]
struct PolicyCache {
    ingress: Vec<RuleCache>,
    egress: Vec<RuleCache>,
    /// An egress rule that gives named ports to every identity: any identity change touches it.
    all_identities: bool,
    /// Egress ipBlocks with named ports: their /32 entries follow the pods inside.
    named_blocks: Vec<(Cidr, Vec<Cidr>)>,
}

impl PolicyCache {
    fn dir(&self, d: Direction) -> &[RuleCache] {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

#[derive(Debug, Clone)]
struct PolicyEntry {
    policy: Arc<Policy>,
    /// Addresses of the local endpoints it selects.
    selected: BTreeSet<Ipv4Addr>,
    /// `Some` exactly when `selected` is not empty.
    cache: Option<PolicyCache>,
}

/// The endpoint at an address: the local pod that owns it, as selected.
#[derive(Debug, Clone)]
struct Endpoint {
    key: PodRef,
    pod: Arc<Pod>,
}

/// Keeps one node's [`Compiled`] up to date per object change. See the module documentation.
#[derive(Debug, Clone)]
pub struct Regenerator {
    node: String,
    namespaces: BTreeMap<String, Arc<Namespace>>,
    pods: BTreeMap<PodRef, Entry>,
    policies: BTreeMap<ObjRef, PolicyEntry>,
    /// This node's allocations.
    local: BTreeMap<PodRef, Ipv4Addr>,
    by_ip: AddressIndex,
    /// Identity number and how many pods hold it.
    ids: HashMap<IdentityKey, (u32, usize)>,
    /// Identities whose count reached zero in this batch.
    unused: BTreeSet<u32>,
    next_id: u32,
    /// Numbers a previous process gave the pods at these addresses, and those already taken.
    seeds: BTreeMap<Ipv4Addr, u32>,
    seeds_taken: BTreeSet<u32>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Endpoints to rebuild at the next [`Regenerator::compile`].
    dirty: BTreeSet<Ipv4Addr>,
    /// Keys of `out` changed since the last compile, for its change log.
    touched: Touched,
    out: Compiled,
    /// Identities created since the last compile.
    added: usize,
    stats: RegenStats,
}

impl Regenerator {
    /// For the node `node`: its endpoints are the pods given by [`Regenerator::set_local`] and
    /// friends, whatever node the cluster state says a pod runs on.
    pub fn new(node: impl Into<String>) -> Self {
        Regenerator {
            node: node.into(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            local: BTreeMap::new(),
            by_ip: AddressIndex::default(),
            ids: HashMap::new(),
            unused: BTreeSet::new(),
            next_id: FIRST_POD_ID,
            seeds: BTreeMap::new(),
            seeds_taken: BTreeSet::new(),
            endpoints: BTreeMap::new(),
            dirty: BTreeSet::new(),
            touched: Touched::default(),
            out: Compiled::default(),
            added: 0,
            stats: RegenStats::default(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Adopts the numbers the dataplane's maps give these addresses (read back after a restart),
    /// so an unchanged label set keeps its number and the first sync rewrites nothing that did
    /// not change. Call before the first change. A seeded number goes to the first label set
    /// found at one of its addresses, and never to another.
    pub fn seed(&mut self, known: impl IntoIterator<Item = (Ipv4Addr, u32)>) {
        for (ip, id) in known {
            if !(FIRST_POD_ID..=LAST_POD_ID).contains(&id) {
                continue;
            }
            self.seeds.insert(ip, id);
            if id >= self.next_id {
                self.next_id = if id >= LAST_POD_ID {
                    FIRST_POD_ID
                } else {
                    id + 1
                };
            }
        }
    }

    /// The cluster state generation the output is labelled with.
    pub fn set_generation(&mut self, generation: u64) {
        self.out.generation = generation;
    }

    pub fn apply(&mut self, change: Change) {
        match change {
            Change::UpsertNamespace(ns) => self.set_namespace(ns.name.clone(), Some(ns)),
            Change::DeleteNamespace(name) => self.set_namespace(name, None),
            Change::UpsertPod(pod) => {
                let key = pod.key();
                self.set_cluster_pod(key, Some(pod))
            }
            Change::DeletePod(key) => self.set_cluster_pod(key, None),
            Change::UpsertPolicy(p) => self.upsert_policy(p),
            Change::DeletePolicy(key) => self.remove_policy(&key),
        }
    }

    pub fn apply_all(&mut self, changes: impl IntoIterator<Item = Change>) {
        for c in changes {
            self.apply(c);
        }
    }

    /// This node's allocations, all of them (one address per pod). Only the differences to the
    /// previous set are worked on.
    pub fn set_local(&mut self, local: BTreeMap<PodRef, Ipv4Addr>) {
        let gone: Vec<PodRef> = self
            .local
            .keys()
            .filter(|k| !local.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove_local(&k);
        }
        for (k, ip) in local {
            self.add_local(k, ip);
        }
    }

    pub fn add_local(&mut self, key: PodRef, ip: Ipv4Addr) {
        if self.local.get(&key) == Some(&ip) {
            return;
        }
        self.local.insert(key.clone(), ip);
        self.refresh_pod(&key);
    }

    pub fn remove_local(&mut self, key: &PodRef) {
        if self.local.remove(key).is_some() {
            self.refresh_pod(key);
        }
    }

    pub fn local(&self) -> &BTreeMap<PodRef, Ipv4Addr> {
        &self.local
    }

    /// Brings the output up to date with every change so far and returns it.
    pub fn compile(&mut self) -> &Compiled {
        let mut stats = RegenStats::default();
        for id in std::mem::take(&mut self.unused) {
            let Some(key) = self.out.identities.get(&id).cloned() else {
                continue;
            };
            if self.ids.get(&key).is_some_and(|(_, n)| *n == 0) {
                self.ids.remove(&key);
                self.out.identities.remove(&id);
                self.identity_gone(id);
                stats.identities_released += 1;
            }
        }
        stats.identities_added = std::mem::take(&mut self.added);
        for ip in std::mem::take(&mut self.dirty) {
            let Some(ep) = self.endpoints.get(&ip) else {
                continue;
            };
            let rules = EndpointRules {
                pod: ep.key.clone(),
                identity: self.pods[&ep.key].id.expect("an endpoint has an address"),
                ingress: self.direction(&ep.pod, Direction::Ingress),
                egress: self.direction(&ep.pod, Direction::Egress),
            };
            self.out.endpoints.insert(ip, rules);
            self.touched.endpoints.insert(ip);
            stats.endpoints += 1;
        }
        self.stats = stats;
        self.out.record(std::mem::take(&mut self.touched));
        &self.out
    }

    /// The output as of the last [`Regenerator::compile`].
    pub fn compiled(&self) -> &Compiled {
        &self.out
    }

    pub fn stats(&self) -> RegenStats {
        self.stats
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        match self.namespaces.get(ns) {
            Some(n) => n.labels.clone(),
            None => Labels::from([(NAMESPACE_NAME_LABEL.into(), ns.into())]),
        }
    }

    fn identity_key(&self, pod: &Pod) -> IdentityKey {
        IdentityKey {
            namespace: pod.namespace.clone(),
            namespace_labels: self.namespace_labels(&pod.namespace),
            labels: pod.labels.clone(),
            named_ports: pod
                .ports
                .iter()
                .filter(|p| p.name.is_some())
                .cloned()
                .collect(),
        }
    }

    fn set_namespace(&mut self, name: String, ns: Option<Arc<Namespace>>) {
        let before = self.namespace_labels(&name);
        match ns {
            Some(ns) => self.namespaces.insert(name.clone(), ns),
            None => self.namespaces.remove(&name),
        };
        if self.namespace_labels(&name) == before {
            return; // Annotations only: nothing policy reads.
        }
        let keys: Vec<PodRef> = self
            .pods
            .range(ObjRef::new(name.clone(), "")..)
            .take_while(|(k, _)| k.namespace == name)
            .filter(|(_, e)| e.id.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let e = &self.pods[&k];
            let (pod, old) = (e.pod.clone(), e.id);
            let id = self.intern(self.identity_key(&pod), pod.ip.expect("has an identity"));
            self.pods.get_mut(&k).expect("listed").id = Some(id);
            if let Some(old) = old {
                self.unref(old);
            }
            self.touch_ip(pod.ip.expect("has an identity"));
        }
    }

    fn set_cluster_pod(&mut self, key: PodRef, pod: Option<Arc<Pod>>) {
        match (self.pods.get_mut(&key), pod) {
            (Some(e), pod) => e.cluster = pod,
            (None, None) => return,
            (None, Some(pod)) => {
                // A placeholder the refresh replaces.
                self.pods.insert(
                    key.clone(),
                    Entry {
                        cluster: Some(pod.clone()),
                        pod,
                        id: None,
                    },
                );
                self.refresh_inserted(&key);
                return;
            }
        }
        self.refresh_pod(&key);
    }

    /// The pod as this node sees it, from the cluster's and the local allocation.
    fn effective(&self, key: &PodRef, cluster: Option<&Arc<Pod>>) -> Option<Arc<Pod>> {
        match (cluster, self.local.get(key)) {
            (None, None) => None,
            (Some(p), None) => Some(p.clone()),
            (Some(p), Some(ip)) if p.ip == Some(*ip) => Some(p.clone()),
            (c, Some(ip)) => {
                let mut p = c.map_or_else(|| blank_pod(key.clone()), |p| Pod::clone(p));
                p.ip = Some(*ip);
                Some(Arc::new(p))
            }
        }
    }

    /// A pod just inserted with `pod` = its cluster object and no identity yet.
    fn refresh_inserted(&mut self, key: &PodRef) {
        let e = &self.pods[key];
        let new = self
            .effective(key, e.cluster.as_ref())
            .expect("has a cluster object");
        let id = new.ip.map(|ip| self.intern(self.identity_key(&new), ip));
        let e = self.pods.get_mut(key).expect("inserted");
        e.pod = new.clone();
        e.id = id;
        if let Some(ip) = new.ip {
            self.by_ip.insert(ip, key.clone());
            self.touch_ip(ip);
        }
    }

    /// Recomputes one pod after its cluster object or local allocation changed.
    fn refresh_pod(&mut self, key: &PodRef) {
        let Some(e) = self.pods.get(key) else {
            // Only a local allocation (no cluster object) can create a pod here.
            let Some(new) = self.effective(key, None) else {
                return;
            };
            self.pods.insert(
                key.clone(),
                Entry {
                    cluster: None,
                    pod: new,
                    id: None,
                },
            );
            // `refresh_inserted` computes the effective pod from `cluster`, which is None here;
            // do its work directly.
            let pod = self.pods[key].pod.clone();
            let ip = pod.ip.expect("a local allocation has an address");
            let id = self.intern(self.identity_key(&pod), ip);
            self.pods.get_mut(key).expect("inserted").id = Some(id);
            self.by_ip.insert(ip, key.clone());
            self.touch_ip(ip);
            return;
        };
        let (old, old_id) = (e.pod.clone(), e.id);
        let new = self.effective(key, e.cluster.as_ref());
        let Some(new) = new else {
            self.pods.remove(key);
            if let Some(ip) = old.ip {
                self.unindex_ip(key, ip);
                self.touch_ip(ip);
            }
            if let Some(id) = old_id {
                self.unref(id);
            }
            return;
        };
        if Arc::ptr_eq(&old, &new) || *old == *new {
            // Same content (keep whichever is shared with the state), but the local allocation
            // may have come or gone: the address's endpoint is decided again.
            self.pods.get_mut(key).expect("present").pod = new.clone();
            if let Some(ip) = new.ip {
                self.touch_ip(ip);
            }
            return;
        }
        let id = new.ip.map(|ip| self.intern(self.identity_key(&new), ip));
        let e = self.pods.get_mut(key).expect("present");
        e.pod = new.clone();
        e.id = id;
        if let Some(old_id) = old_id {
            self.unref(old_id);
        }
        if old.ip != new.ip
            && let Some(ip) = old.ip
        {
            self.unindex_ip(key, ip);
        }
        if let Some(ip) = new.ip {
            self.by_ip.insert(ip, key.clone());
        }
        for ip in [old.ip, new.ip]
            .into_iter()
            .flatten()
            .collect::<BTreeSet<_>>()
        {
            self.touch_ip(ip);
        }
    }

    fn unindex_ip(&mut self, key: &PodRef, ip: Ipv4Addr) {
        self.by_ip.remove(ip, key);
    }

    /// One more pod holds `key`.
    fn intern(&mut self, key: IdentityKey, ip: Ipv4Addr) -> u32 {
        if let Some((id, n)) = self.ids.get_mut(&key) {
            *n += 1;
            return *id;
        }
        let id = match self.seeds.get(&ip) {
            Some(s) if self.seeds_taken.insert(*s) => *s,
            _ => {
                let id = self.next_id;
                self.next_id = if id >= LAST_POD_ID {
                    FIRST_POD_ID
                } else {
                    id + 1
                };
                id
            }
        };
        self.ids.insert(key.clone(), (id, 1));
        self.identity_added(id, &key);
        self.out.identities.insert(id, key);
        self.added += 1;
        id
    }

    /// One pod less holds identity `id`; at zero it goes at the end of the batch.
    fn unref(&mut self, id: u32) {
        let key = &self.out.identities[&id];
        let slot = self.ids.get_mut(key).expect("interned");
        slot.1 -= 1;
        if slot.1 == 0 {
            self.unused.insert(id);
        }
    }

    /// A new identity: added to the peers it matches, endpoints depending on them marked.
    fn identity_added(&mut self, id: u32, key: &IdentityKey) {
        for entry in self.policies.values_mut() {
            let Some(cache) = &mut entry.cache else {
                continue;
            };
            let mut touched = cache.all_identities;
            for rule in cache.ingress.iter_mut().chain(cache.egress.iter_mut()) {
                for peer in &mut rule.peers {
                    if let PeerCache::Pods { peer, matched } = peer
                        && key_matches(key, peer)
                    {
                        matched.insert(id);
                        touched = true;
                    }
                }
            }
            if touched {
                self.dirty.extend(entry.selected.iter().copied());
            }
        }
    }

    fn identity_gone(&mut self, id: u32) {
        for entry in self.policies.values_mut() {
            let Some(cache) = &mut entry.cache else {
                continue;
            };
            let mut touched = cache.all_identities;
            for rule in cache.ingress.iter_mut().chain(cache.egress.iter_mut()) {
                for peer in &mut rule.peers {
                    if let PeerCache::Pods { matched, .. } = peer {
                        touched |= matched.remove(&id);
                    }
                }
            }
            if touched {
                self.dirty.extend(entry.selected.iter().copied());
            }
        }
    }

    /// Something about the pods at `ip` changed: its owner, its identity, its endpoint.
    fn touch_ip(&mut self, ip: Ipv4Addr) {
        // Two pods may briefly report one address; the first by namespace/name owns it, as
        // `ClusterState::pod_by_ip` decides for everyone else.
        let owner = self.by_ip.owner(ip).map(|k| (k.clone(), &self.pods[k]));
        let id = owner.as_ref().and_then(|(_, e)| e.id);
        let before = match id {
            Some(id) => self.out.ip_identity.insert(ip, id),
            None => self.out.ip_identity.remove(&ip),
        };
        if before != id {
            self.touched.addresses.insert(ip);
        }
        let new_ep = owner
            .filter(|(k, _)| self.local.get(k) == Some(&ip))
            .map(|(k, e)| Endpoint {
                key: k,
                pod: e.pod.clone(),
            });
        let unchanged = match (self.endpoints.get(&ip), &new_ep) {
            (Some(a), Some(b)) => a.key == b.key && Arc::ptr_eq(&a.pod, &b.pod),
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            if let Some(old) = self.endpoints.remove(&ip) {
                self.unselect(ip, &old.pod);
                self.out.endpoints.remove(&ip);
                self.touched.endpoints.insert(ip);
                self.dirty.remove(&ip);
            }
            if let Some(ep) = new_ep {
                self.select(ip, &ep.pod);
                self.endpoints.insert(ip, ep);
            }
        }
        if self.endpoints.contains_key(&ip) {
            // Its identity may have changed even when its pod did not (namespace labels).
            self.dirty.insert(ip);
        }
        // Egress ipBlocks with named ports give each pod inside its own entry.
        for entry in self.policies.values() {
            if let Some(cache) = &entry.cache
                && cache
                    .named_blocks
                    .iter()
                    .any(|(c, except)| in_block(ip, c, except))
            {
                self.dirty.extend(entry.selected.iter().copied());
            }
        }
    }

    /// Policies of `pod`'s namespace whose selector matches it.
    fn selecting_keys(&self, pod: &Pod) -> Vec<ObjRef> {
        self.policies
            .range(ObjRef::new(pod.namespace.clone(), "")..)
            .take_while(|(k, _)| k.namespace == pod.namespace)
            .filter(|(_, e)| e.policy.pod_selector.matches(&pod.labels))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn select(&mut self, ip: Ipv4Addr, pod: &Pod) {
        for k in self.selecting_keys(pod) {
            let entry = self.policies.get_mut(&k).expect("listed");
            entry.selected.insert(ip);
            if entry.cache.is_none() {
                entry.cache = Some(build_cache(&entry.policy, &self.out.identities));
            }
        }
    }

    fn unselect(&mut self, ip: Ipv4Addr, pod: &Pod) {
        for k in self.selecting_keys(pod) {
            let entry = self.policies.get_mut(&k).expect("listed");
            entry.selected.remove(&ip);
            if entry.selected.is_empty() {
                // Kept only while it selects something here: identity changes walk the caches.
                entry.cache = None;
            }
        }
    }

    fn upsert_policy(&mut self, p: Arc<Policy>) {
        let key = p.key();
        if let Some(old) = self.policies.get(&key)
            && (Arc::ptr_eq(&old.policy, &p) || old.policy.raw == p.raw)
        {
            self.policies.get_mut(&key).expect("present").policy = p;
            return;
        }
        self.remove_policy(&key);
        let selected: BTreeSet<Ipv4Addr> = self
            .endpoints
            .iter()
            .filter(|(_, ep)| {
                ep.pod.namespace == p.namespace && p.pod_selector.matches(&ep.pod.labels)
            })
            .map(|(ip, _)| *ip)
            .collect();
        let cache = (!selected.is_empty()).then(|| build_cache(&p, &self.out.identities));
        self.dirty.extend(selected.iter().copied());
        self.policies.insert(
            key,
            PolicyEntry {
                policy: p,
                selected,
                cache,
            },
        );
    }

    fn remove_policy(&mut self, key: &ObjRef) {
        if let Some(old) = self.policies.remove(key) {
            self.dirty.extend(old.selected);
        }
    }

    /// The rules of one endpoint for one direction, from the caches.
    fn direction(&self, pod: &Pod, dir: Direction) -> DirectionRules {
        let mut out = DirectionRules::default();
        let mut cidrs: Vec<(Cidr, PortSet)> = Vec::new();
        let allow = |m: &mut BTreeMap<u32, PortSet>, id: u32, ps: &PortSet| {
            if !ps.is_empty() {
                m.entry(id).or_default().absorb(ps);
            }
        };
        let with_named = |fixed: &PortSet,
                          named: &[(String, Protocol)],
                          ports: &dyn Fn(&str, Protocol) -> Vec<u16>| {
            let mut ps = fixed.clone();
            for (n, proto) in named {
                for port in ports(n, *proto) {
                    ps.add(*proto, port, port);
                }
            }
            ps
        };
        let policies = self
            .policies
            .range(ObjRef::new(pod.namespace.clone(), "")..)
            .take_while(|(k, _)| k.namespace == pod.namespace)
            .map(|(_, e)| e)
            .filter(|e| {
                e.policy.rules(dir).is_some() && e.policy.pod_selector.matches(&pod.labels)
            });
        for entry in policies {
            out.isolated = true;
            let cache = entry
                .cache
                .as_ref()
                .expect("a policy selecting a local endpoint has its cache");
            for rule in cache.dir(dir) {
                match dir {
                    Direction::Ingress => {
                        // Named ports resolved on the destination: the endpoint itself.
                        let ps = with_named(&rule.fixed, &rule.named, &|n, proto| {
                            pod.named_ports(n, proto).collect()
                        });
                        if rule.everyone {
                            allow(&mut out.identities, ID_ANY, &ps);
                        }
                        for peer in &rule.peers {
                            match peer {
                                PeerCache::Pods { matched, .. } => {
                                    for id in matched {
                                        allow(&mut out.identities, *id, &ps);
                                    }
                                }
                                PeerCache::Block { prefixes, .. } => {
                                    if !ps.is_empty() {
                                        cidrs.extend(prefixes.iter().map(|c| (*c, ps.clone())));
                                    }
                                }
                                PeerCache::Ipv6 => {}
                            }
                        }
                    }
                    Direction::Egress => {
                        // Named ports resolved on each destination identity.
                        let per_id = |id: u32| {
                            if rule.named.is_empty() {
                                return rule.fixed.clone();
                            }
                            let k = &self.out.identities[&id];
                            with_named(&rule.fixed, &rule.named, &|n, proto| {
                                k.named(n, proto).collect()
                            })
                        };
                        if rule.everyone {
                            allow(&mut out.identities, ID_ANY, &rule.fixed);
                            if !rule.named.is_empty() {
                                for id in self.out.identities.keys() {
                                    allow(&mut out.identities, *id, &per_id(*id));
                                }
                            }
                        }
                        for peer in &rule.peers {
                            match peer {
                                PeerCache::Pods { matched, .. } => {
                                    for id in matched {
                                        allow(&mut out.identities, *id, &per_id(*id));
                                    }
                                }
                                PeerCache::Block {
                                    cidr,
                                    except,
                                    prefixes,
                                } => {
                                    if !rule.fixed.is_empty() {
                                        cidrs.extend(
                                            prefixes.iter().map(|c| (*c, rule.fixed.clone())),
                                        );
                                    }
                                    if !rule.named.is_empty() {
                                        for (ip, owner) in self.owners_in(*cidr) {
                                            if except.iter().any(|e| e.contains(ip)) {
                                                continue;
                                            }
                                            let ps = with_named(
                                                &rule.fixed,
                                                &rule.named,
                                                &|n, proto| owner.named_ports(n, proto).collect(),
                                            );
                                            if !ps.is_empty() {
                                                cidrs.push((Cidr::host(ip), ps));
                                            }
                                        }
                                    }
                                }
                                PeerCache::Ipv6 => {}
                            }
                        }
                    }
                }
            }
        }
        for ps in out.identities.values_mut() {
            ps.normalize();
        }
        if out.isolated && dir == Direction::Ingress {
            // The kubelet must reach its pods whatever the policies say.
            out.identities.insert(ID_HOST, PortSet::all());
        }
        out.cidrs = lpm_closure(cidrs, |a, b| a.union(b));
        out
    }

    /// The owning pod of every address inside `cidr`.
    fn owners_in(&self, cidr: Cidr) -> impl Iterator<Item = (Ipv4Addr, &Pod)> {
        let first = cidr.addr();
        let last = Ipv4Addr::from(
            u32::from(first)
                | u32::MAX
                    .checked_shr(u32::from(cidr.prefix_len()))
                    .unwrap_or(0),
        );
        self.by_ip
            .owners(first, last)
            .map(|(ip, k)| (ip, self.pods[k].pod.as_ref()))
    }
}

fn in_block(ip: Ipv4Addr, cidr: &Cidr, except: &[Cidr]) -> bool {
    cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
}

/// Whether pods of identity `key` are peers `peer` names.
fn key_matches(key: &IdentityKey, peer: &PeerMatch) -> bool {
    match peer {
        PeerMatch::Pods { namespaces, pods } => {
            let in_namespace = match namespaces {
                NamespaceMatch::PolicyNamespace(ns) => *ns == key.namespace,
                NamespaceMatch::Selector(s) => s.matches(&key.namespace_labels),
            };
            in_namespace && pods.matches(&key.labels)
        }
        PeerMatch::IpBlock { .. } | PeerMatch::Ipv6Block(_) => false,
    }
}

fn build_cache(p: &Policy, identities: &BTreeMap<u32, IdentityKey>) -> PolicyCache {
    let mut cache = PolicyCache::default();
    for dir in [Direction::Ingress, Direction::Egress] {
        let mut rules = Vec::new();
        for rule in p.rules(dir).unwrap_or_default() {
            let (fixed, named) = split_ports(rule);
            let named: Vec<(String, Protocol)> =
                named.into_iter().map(|(n, p)| (n.to_string(), p)).collect();
            let everyone = rule.peers.is_empty();
            if dir == Direction::Egress && everyone && !named.is_empty() {
                cache.all_identities = true;
            }
            let peers = rule
                .peers
                .iter()
                .map(|peer| match peer {
                    PeerMatch::Pods { .. } => PeerCache::Pods {
                        matched: identities
                            .iter()
                            .filter(|(_, k)| key_matches(k, peer))
                            .map(|(id, _)| *id)
                            .collect(),
                        peer: peer.clone(),
                    },
                    PeerMatch::IpBlock { cidr, except } => {
                        if dir == Direction::Egress && !named.is_empty() {
                            cache.named_blocks.push((*cidr, except.clone()));
                        }
                        PeerCache::Block {
                            cidr: *cidr,
                            except: except.clone(),
                            prefixes: subtract(*cidr, except),
                        }
                    }
                    PeerMatch::Ipv6Block(_) => PeerCache::Ipv6,
                })
                .collect();
            rules.push(RuleCache {
                fixed,
                named,
                everyone,
                peers,
            });
        }
        match dir {
            Direction::Ingress => cache.ingress = rules,
            Direction::Egress => cache.egress = rules,
        }
    }
    cache
}
