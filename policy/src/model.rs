//! Typed cluster state: what NetworkPolicy semantics depend on, and nothing else.
//!
//! Policies are validated on the way in (as the API server would have done), so everything
//! downstream works on a form where every field has exactly one meaning.

use super::PolicyError;
use super::cidr::Cidr;
use super::selector::Selector;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// The API server puts this label on every namespace (since 1.21), so selectors may rely on it
/// even when a manifest does not spell it out.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Standalone manifests have no `status.podIP`; vpcnet's own address annotation stands in.
pub const ANNOTATION_IP: &str = "vpcnet.io/ip";

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// IANA protocol number, as it appears in the IPv4 header.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The API spells these in upper case only; `tcp` is a validation error upstream.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    fn parse_or_tcp(s: Option<&String>) -> Result<Self, String> {
        match s {
            None => Ok(Protocol::Tcp),
            Some(p) => Protocol::parse(p)
                .ok_or_else(|| format!("protocol {p:?} is not one of TCP, UDP, SCTP")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// `namespace/name` of a pod or a policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjRef {
    pub namespace: String,
    pub name: String,
}

pub type PodRef = ObjRef;

impl ObjRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for ObjRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, n)) if !ns.is_empty() && !n.is_empty() => Ok(ObjRef::new(ns, n)),
            _ => Err(format!("{s:?} is not namespace/name")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// Includes [`NAMESPACE_NAME_LABEL`].
    pub labels: Labels,
    /// Kept for address selection (`vpcnet.io/subnet`), not used by policy.
    pub annotations: Labels,
}

impl Namespace {
    pub fn new(name: impl Into<String>, labels: Labels) -> Self {
        let name = name.into();
        let mut labels = labels;
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        Self {
            name,
            labels,
            annotations: Labels::new(),
        }
    }

    pub fn from_k8s(ns: &core::Namespace) -> Result<Self, PolicyError> {
        let name = ns.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(PolicyError::InvalidObject {
                kind: "Namespace",
                name: "(unnamed)".into(),
                reason: "metadata.name is missing".into(),
            });
        }
        Ok(Self {
            annotations: ns.metadata.annotations.clone().unwrap_or_default(),
            ..Self::new(name, ns.metadata.labels.clone().unwrap_or_default())
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Option<Ipv4Addr>,
    pub node: Option<String>,
    pub ports: Vec<ContainerPort>,
    /// Kept for address selection (`vpcnet.io/subnet`, `vpcnet.io/ip`), not used by policy.
    pub annotations: Labels,
}

impl Pod {
    pub fn key(&self) -> PodRef {
        ObjRef::new(&self.namespace, &self.name)
    }

    /// Container ports named `name` for `proto`. Several containers may reuse a name; each
    /// definition is honoured, as Kubernetes does not forbid it across containers.
    pub fn named_ports<'a>(
        &'a self,
        name: &'a str,
        proto: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.ports
            .iter()
            .filter(move |p| p.protocol == proto && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    pub fn from_k8s(pod: &core::Pod) -> Result<Self, PolicyError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let bad = |reason: String| PolicyError::InvalidObject {
            kind: "Pod",
            name: format!("{namespace}/{name}"),
            reason,
        };
        if name.is_empty() {
            return Err(bad("metadata.name is missing".into()));
        }
        let status = pod.status.as_ref();
        let status_ips = status.and_then(|s| s.pod_ip.clone()).into_iter().chain(
            status
                .and_then(|s| s.pod_ips.clone())
                .into_iter()
                .flatten()
                .map(|p| p.ip),
        );
        let annotated = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_IP).cloned());
        let mut ip = None;
        for text in status_ips.chain(annotated) {
            if text.contains(':') {
                continue; // IPv6: vpcnet is IPv4-only, policies cannot refer to it here.
            }
            ip = Some(
                text.parse::<Ipv4Addr>()
                    .map_err(|_| bad(format!("pod IP {text:?} is not an IPv4 address")))?,
            );
            break;
        }
        let mut ports = Vec::new();
        if let Some(spec) = &pod.spec {
            for c in &spec.containers {
                for p in c.ports.iter().flatten() {
                    let port = u16::try_from(p.container_port)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            bad(format!(
                                "container {} port {} is outside 1-65535",
                                c.name, p.container_port
                            ))
                        })?;
                    let protocol = Protocol::parse_or_tcp(p.protocol.as_ref()).map_err(bad)?;
                    ports.push(ContainerPort {
                        name: p.name.clone(),
                        port,
                        protocol,
                    });
                }
            }
        }
        ports.sort();
        ports.dedup();
        Ok(Pod {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            annotations: pod.metadata.annotations.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            namespace,
            name,
            ip,
            ports,
        })
    }
}

/// Which namespaces a pod peer's pods may live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceMatch {
    /// Only `podSelector` was given: the policy's own namespace.
    PolicyNamespace(String),
    Selector(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// Pods whose namespace AND labels both match (one peer with both selectors is an AND; a
    /// missing `podSelector` is "all pods").
    Pods {
        namespaces: NamespaceMatch,
        pods: Selector,
    },
    /// Addresses in `cidr` outside every `except`, pod addresses included.
    IpBlock { cidr: Cidr, except: Vec<Cidr> },
    /// An IPv6 block: valid, but no IPv4 address can match it.
    Ipv6Block(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSel {
    /// `port` omitted: every port of the protocol.
    All,
    /// `port` (and `endPort`), inclusive.
    Range(u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortSel,
}

/// One ingress or egress rule. An empty list means "all" (the API treats a missing and an
/// empty `from`/`to`/`ports` alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<PeerMatch>,
    pub ports: Vec<PortMatch>,
}

/// A validated NetworkPolicy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// `None` when the policy does not govern this direction (policyTypes); `Some(vec![])`
    /// isolates without allowing anything.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub raw: NetworkPolicy,
}

impl Policy {
    pub fn key(&self) -> ObjRef {
        ObjRef::new(&self.namespace, &self.name)
    }

    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    pub fn from_k8s(np: &NetworkPolicy) -> Result<Self, PolicyError> {
        let name = np.metadata.name.clone().unwrap_or_default();
        let namespace = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let bad = |reason: String| PolicyError::InvalidPolicy {
            policy: format!("{namespace}/{name}"),
            reason,
        };
        if name.is_empty() {
            return Err(bad("metadata.name is missing".into()));
        }
        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = Selector::parse(&spec.pod_selector.unwrap_or_default())
            .map_err(|e| bad(format!("spec.podSelector: {e}")))?;

        // Defaulting as the API server does it: an absent or empty policyTypes means Ingress,
        // plus Egress when there is at least one egress rule.
        let types = spec.policy_types.unwrap_or_default();
        let (has_ingress, has_egress) = if types.is_empty() {
            (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))
        } else {
            let mut i = false;
            let mut e = false;
            for t in &types {
                match t.as_str() {
                    "Ingress" => i = true,
                    "Egress" => e = true,
                    other => {
                        return Err(bad(format!(
                            "policyTypes entry {other:?} is not Ingress or Egress"
                        )));
                    }
                }
            }
            (i, e)
        };

        let rule = |what: &str,
                    i: usize,
                    peers: Option<&Vec<NetworkPolicyPeer>>,
                    ports: Option<&Vec<NetworkPolicyPort>>|
         -> Result<Rule, PolicyError> {
            let mut out = Rule {
                peers: Vec::new(),
                ports: Vec::new(),
            };
            for (j, p) in peers.into_iter().flatten().enumerate() {
                out.peers.push(
                    parse_peer(p, &namespace)
                        .map_err(|e| bad(format!("spec.{what}[{i}] peer {j}: {e}")))?,
                );
            }
            for (j, p) in ports.into_iter().flatten().enumerate() {
                out.ports.push(
                    parse_port(p).map_err(|e| bad(format!("spec.{what}[{i}].ports[{j}]: {e}")))?,
                );
            }
            Ok(out)
        };
        // Rules of a direction the policy does not govern are still validated (the API server
        // would reject them too) but then dropped.
        let ingress = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| rule("ingress", i, r.from.as_ref(), r.ports.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let egress = spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| rule("egress", i, r.to.as_ref(), r.ports.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            pod_selector,
            ingress: has_ingress.then_some(ingress),
            egress: has_egress.then_some(egress),
            raw: np.clone(),
            namespace,
            name,
        })
    }
}

fn parse_peer(p: &NetworkPolicyPeer, policy_ns: &str) -> Result<PeerMatch, String> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => parse_ip_block(b),
        (Some(_), _, _) => {
            Err("ipBlock cannot be combined with a pod or namespace selector".into())
        }
        (None, None, None) => Err("a peer needs podSelector, namespaceSelector or ipBlock".into()),
        (None, ns, pods) => Ok(PeerMatch::Pods {
            namespaces: match ns {
                None => NamespaceMatch::PolicyNamespace(policy_ns.to_string()),
                Some(s) => NamespaceMatch::Selector(
                    Selector::parse(s).map_err(|e| format!("namespaceSelector: {e}"))?,
                ),
            },
            pods: match pods {
                None => Selector::everything(),
                Some(s) => Selector::parse(s).map_err(|e| format!("podSelector: {e}"))?,
            },
        }),
    }
}

fn parse_ip_block(b: &IPBlock) -> Result<PeerMatch, String> {
    if b.cidr.contains(':') {
        if b.except.iter().flatten().any(|e| !e.contains(':')) {
            return Err(format!("ipBlock {}: except mixes address families", b.cidr));
        }
        return Ok(PeerMatch::Ipv6Block(b.cidr.clone()));
    }
    let cidr: Cidr = b.cidr.parse().map_err(|e| format!("ipBlock: {e}"))?;
    let mut except = Vec::new();
    for e in b.except.iter().flatten() {
        let hole: Cidr = e.parse().map_err(|e| format!("ipBlock except: {e}"))?;
        // The API server requires each except to be a strict subset of cidr.
        if !cidr.covers(&hole) || hole == cidr {
            return Err(format!(
                "ipBlock except {hole} is not strictly inside cidr {cidr}"
            ));
        }
        except.push(hole);
    }
    except.sort();
    except.dedup();
    Ok(PeerMatch::IpBlock { cidr, except })
}

/// IANA_SVC_NAME: what a container port name (and so a named policy port) may be.
fn valid_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

fn parse_port(p: &NetworkPolicyPort) -> Result<PortMatch, String> {
    let protocol = Protocol::parse_or_tcp(p.protocol.as_ref())?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSel::All,
        (None, Some(_)) => return Err("endPort needs port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let start = u16::try_from(*n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {n} is outside 1-65535"))?;
            let end = match end {
                None => start,
                Some(e) => u16::try_from(e)
                    .ok()
                    .filter(|e| *e >= start)
                    .ok_or_else(|| format!("endPort {e} is not within {start}-65535"))?,
            };
            PortSel::Range(start, end)
        }
        (Some(IntOrString::String(name)), None) => {
            if !valid_port_name(name) {
                return Err(format!("{name:?} is not a valid port name"));
            }
            PortSel::Named(name.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err("endPort cannot be used with a named port".into());
        }
    };
    Ok(PortMatch { protocol, port })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// Objects of kinds NetworkPolicy does not read — Node, Service, EndpointSlice, the CRDs to come
/// — carried in the same published state, so every consumer of a source sees one consistent
/// snapshot. A kind is any Rust type naming itself through [`Kind`]; the state stores it shared
/// and type-erased, keyed by the kind's name, then `namespace/name` (empty namespace for
/// cluster-scoped objects). Policy compilation and [`crate::incremental::diff_state`] ignore
/// them: a consumer that needs per-object changes of a kind diffs [`ClusterState::objects`].
pub trait Kind: std::any::Any + Send + Sync {
    /// Unique among kinds: `Node`, `Service`, `vpcnet.io/v1/Subnet`.
    const KIND: &'static str;
}

type AnyObject = Arc<dyn std::any::Any + Send + Sync>;

/// The open bucket of other kinds (see [`Kind`]).
#[derive(Clone, Default)]
struct Others(BTreeMap<&'static str, BTreeMap<ObjRef, AnyObject>>);

impl fmt::Debug for Others {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v.len())))
            .finish()
    }
}

/// Which pods report which address, in (address, pod) order: the owner of a contested address is
/// the first pod by namespace/name. One flat set rather than a set per address: at 50,000 pods a
/// one-element `BTreeSet` per address costs a whole B-tree node (over 500 bytes) each.
#[derive(Debug, Clone, Default)]
pub(crate) struct AddressIndex(BTreeSet<(Ipv4Addr, PodRef)>);

impl AddressIndex {
    pub(crate) fn insert(&mut self, ip: Ipv4Addr, key: PodRef) {
        self.0.insert((ip, key));
    }

    pub(crate) fn remove(&mut self, ip: Ipv4Addr, key: &PodRef) {
        // The tuple key needs an owned pod key; a removal is rare next to lookups.
        self.0.remove(&(ip, key.clone()));
    }

    /// The owner of `ip`: the first pod by namespace/name reporting it.
    pub(crate) fn owner(&self, ip: Ipv4Addr) -> Option<&PodRef> {
        self.from(ip)
            .next()
            .filter(|(i, _)| *i == ip)
            .map(|(_, k)| k)
    }

    /// The owner of every address in `first..=last`, in address order.
    pub(crate) fn owners(
        &self,
        first: Ipv4Addr,
        last: Ipv4Addr,
    ) -> impl Iterator<Item = (Ipv4Addr, &PodRef)> {
        let mut prev: Option<Ipv4Addr> = None;
        self.from(first)
            .take_while(move |(ip, _)| *ip <= last)
            .filter(move |(ip, _)| prev.replace(*ip) != Some(*ip))
    }

    fn from(&self, ip: Ipv4Addr) -> impl Iterator<Item = (Ipv4Addr, &PodRef)> {
        // The empty name sorts before every pod of the address.
        self.0
            .range((ip, ObjRef::new("", ""))..)
            .map(|(ip, k)| (*ip, k))
    }
}

/// Everything policy decisions depend on, with a generation that moves on every change.
///
/// Objects are shared (`Arc`): states are rebuilt and diffed on every change, and an object
/// that did not change is the same allocation in both, so comparing it costs a pointer.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    generation: u64,
    namespaces: BTreeMap<String, Arc<Namespace>>,
    pods: BTreeMap<PodRef, Arc<Pod>>,
    policies: BTreeMap<ObjRef, Arc<Policy>>,
    by_ip: AddressIndex,
    others: Others,
    /// The object changes of the last generations, for a source that updates its published
    /// state in place (see [`ClusterState::track_changes`]).
    log: crate::incremental::ChangeLog,
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// For a source that rebuilds the state from scratch and must keep counting upwards.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Marks this state as one whose source records every change it makes
    /// ([`ClusterState::record_changes`]): a consumer then follows it through
    /// [`ClusterState::changes_since`] and need not keep an earlier state to compare with.
    pub fn track_changes(&mut self) {
        self.log.tracked = true;
    }

    pub fn tracks_changes(&self) -> bool {
        self.log.tracked
    }

    /// Records that `changes` took the state from generation `from` to the current one.
    pub fn record_changes(&mut self, from: u64, changes: Vec<crate::incremental::Change>) {
        self.log.push(from, self.generation, changes);
    }

    /// The object changes from generation `generation` to the current one, oldest first, when
    /// the recorded ones reach back that far (`Some(empty)` at the current generation); `None`
    /// for a state that does not track its changes.
    pub fn changes_since(&self, generation: u64) -> Option<Vec<crate::incremental::Change>> {
        if !self.log.tracked {
            return None;
        }
        if generation == self.generation {
            return Some(Vec::new());
        }
        self.log.since(generation, self.generation)
    }

    pub fn upsert_namespace(&mut self, ns: impl Into<Arc<Namespace>>) {
        let ns = ns.into();
        self.generation += 1;
        self.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn remove_namespace(&mut self, name: &str) -> Option<Namespace> {
        self.generation += 1;
        self.namespaces.remove(name).map(Arc::unwrap_or_clone)
    }

    pub fn upsert_pod(&mut self, pod: impl Into<Arc<Pod>>) {
        let pod = pod.into();
        self.generation += 1;
        let key = pod.key();
        self.unindex(&key);
        if let Some(ip) = pod.ip {
            self.by_ip.insert(ip, key.clone());
        }
        self.pods.insert(key, pod);
    }

    /// Adds a pod not in the state yet; `false` (and nothing changes) when one of its key is.
    pub(crate) fn insert_new_pod(&mut self, pod: Arc<Pod>) -> bool {
        match self.pods.entry(pod.key()) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                self.generation += 1;
                if let Some(ip) = pod.ip {
                    self.by_ip.insert(ip, v.key().clone());
                }
                v.insert(pod);
                true
            }
        }
    }

    pub(crate) fn insert_new_namespace(&mut self, ns: Arc<Namespace>) -> bool {
        if self.namespaces.contains_key(&ns.name) {
            return false;
        }
        self.upsert_namespace(ns);
        true
    }

    pub(crate) fn insert_new_policy(&mut self, p: Arc<Policy>) -> bool {
        if self.policies.contains_key(&p.key()) {
            return false;
        }
        self.insert_policy(p);
        true
    }

    /// Takes objects out as shared, without the copy `remove_*` makes of one still shared with
    /// another state.
    pub(crate) fn take_namespace(&mut self, name: &str) -> Option<Arc<Namespace>> {
        let ns = self.namespaces.remove(name)?;
        self.generation += 1;
        Some(ns)
    }

    pub(crate) fn take_pod(&mut self, key: &PodRef) -> Option<Arc<Pod>> {
        self.unindex(key);
        let pod = self.pods.remove(key)?;
        self.generation += 1;
        Some(pod)
    }

    pub(crate) fn take_policy(&mut self, key: &ObjRef) -> Option<Arc<Policy>> {
        let p = self.policies.remove(key)?;
        self.generation += 1;
        Some(p)
    }

    pub fn remove_pod(&mut self, key: &PodRef) -> Option<Pod> {
        self.generation += 1;
        self.unindex(key);
        self.pods.remove(key).map(Arc::unwrap_or_clone)
    }

    /// For a daemon that learns addresses from IPAM rather than from the pod objects.
    pub fn set_pod_ip(&mut self, key: &PodRef, ip: Option<Ipv4Addr>) -> Result<(), PolicyError> {
        let mut pod = self
            .pods
            .get(key)
            .map(|p| Pod::clone(p))
            .ok_or_else(|| PolicyError::UnknownPod(key.to_string()))?;
        pod.ip = ip;
        self.upsert_pod(pod);
        Ok(())
    }

    fn unindex(&mut self, key: &PodRef) {
        if let Some(ip) = self.pods.get(key).and_then(|p| p.ip) {
            self.by_ip.remove(ip, key);
        }
    }

    pub fn upsert_policy(&mut self, np: &NetworkPolicy) -> Result<(), PolicyError> {
        self.insert_policy(Policy::from_k8s(np)?);
        Ok(())
    }

    /// An already validated policy.
    pub fn insert_policy(&mut self, p: impl Into<Arc<Policy>>) {
        let p = p.into();
        self.generation += 1;
        self.policies.insert(p.key(), p);
    }

    pub fn remove_policy(&mut self, key: &ObjRef) -> Option<Policy> {
        self.generation += 1;
        self.policies.remove(key).map(Arc::unwrap_or_clone)
    }

    /// Adds or replaces an object of another kind (see [`Kind`]).
    pub fn upsert_object<K: Kind>(&mut self, key: ObjRef, obj: impl Into<Arc<K>>) {
        self.generation += 1;
        let obj: Arc<K> = obj.into();
        self.others.0.entry(K::KIND).or_default().insert(key, obj);
    }

    pub fn remove_object<K: Kind>(&mut self, key: &ObjRef) -> Option<Arc<K>> {
        self.generation += 1;
        let bucket = self.others.0.get_mut(K::KIND)?;
        let obj = bucket.remove(key)?;
        if bucket.is_empty() {
            self.others.0.remove(K::KIND);
        }
        obj.downcast().ok()
    }

    pub fn object<K: Kind>(&self, key: &ObjRef) -> Option<Arc<K>> {
        self.others
            .0
            .get(K::KIND)?
            .get(key)?
            .clone()
            .downcast()
            .ok()
    }

    /// Every object of kind `K`, by `namespace/name`.
    pub fn objects<K: Kind>(&self) -> impl Iterator<Item = (&ObjRef, &K)> {
        self.others
            .0
            .get(K::KIND)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k, v.downcast_ref::<K>()?)))
    }

    /// The shared objects, for diffing two states by pointer.
    pub(crate) fn namespace_map(&self) -> &BTreeMap<String, Arc<Namespace>> {
        &self.namespaces
    }

    pub(crate) fn pod_map(&self) -> &BTreeMap<PodRef, Arc<Pod>> {
        &self.pods
    }

    pub(crate) fn policy_map(&self) -> &BTreeMap<ObjRef, Arc<Policy>> {
        &self.policies
    }

    /// The pod as shared by the state: what a lookup at ADD hands out without copying.
    pub fn pod_shared(&self, key: &PodRef) -> Option<&Arc<Pod>> {
        self.pods.get(key)
    }

    pub fn namespace_shared(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.get(name)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values().map(|n| n.as_ref())
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values().map(|p| p.as_ref())
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values().map(|p| p.as_ref())
    }

    pub fn pod(&self, key: &PodRef) -> Option<&Pod> {
        self.pods.get(key).map(|p| p.as_ref())
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name).map(|n| n.as_ref())
    }

    /// A pod's namespace labels. A namespace the state has not (yet) seen still carries its
    /// name label, which is all the API server would guarantee about it.
    pub fn namespace_labels(&self, ns: &str) -> Cow<'_, Labels> {
        match self.namespaces.get(ns) {
            Some(n) => Cow::Borrowed(&n.labels),
            None => Cow::Owned(Labels::from([(NAMESPACE_NAME_LABEL.into(), ns.into())])),
        }
    }

    /// The pod holding `ip`. Two pods may briefly report the same address (one terminating);
    /// the first by namespace/name wins so that every consumer makes the same choice.
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.by_ip
            .owner(ip)
            .and_then(|k| self.pods.get(k))
            .map(|p| p.as_ref())
    }

    /// Same objects, whatever the generation.
    pub fn same_content(&self, other: &ClusterState) -> bool {
        self.namespaces == other.namespaces
            && self.pods == other.pods
            && self.policies.len() == other.policies.len()
            && self
                .policies
                .iter()
                .zip(other.policies.iter())
                .all(|((ka, a), (kb, b))| ka == kb && (Arc::ptr_eq(a, b) || a.raw == b.raw))
            && self.others.0.len() == other.others.0.len()
            && self
                .others
                .0
                .iter()
                .zip(other.others.0.iter())
                .all(|((ka, a), (kb, b))| {
                    ka == kb
                        && a.len() == b.len()
                        && a.iter()
                            .zip(b.iter())
                            .all(|((ra, oa), (rb, ob))| ra == rb && Arc::ptr_eq(oa, ob))
                })
    }
}
