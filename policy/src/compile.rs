//! Compilation of the cluster state into per-endpoint rule sets for an eBPF dataplane.
//!
//! # Representation
//!
//! - **Identities.** Every pod with an address gets a numeric identity shared by all pods that no
//!   policy can tell apart: same namespace, same namespace labels, same pod labels and same named
//!   container ports. (Named ports are part of the key because an egress rule's named port is
//!   resolved on the *peer* pod: two pods with equal labels but different `serve-http` numbers must
//!   not share an entry.) Reserved: [`ID_ANY`] (an entry under it applies to every peer), [`ID_HOST`]
//!   (the local node), [`ID_WORLD`] (any address that is not a known pod). Pod identities start at
//!   [`FIRST_POD_ID`] and a number is never reused for another label set, so an entry keyed by a
//!   number keeps its meaning across updates.
//! - **`ip_identity`**: pod address → identity, for every known pod address (remote pods included).
//! - **Per endpoint and direction** ([`DirectionRules`]): `isolated`, `identities` (remote identity
//!   → [`PortSet`]) and `cidrs` (prefix → [`PortSet`]). The dataplane decides a new connection for
//!   an isolated endpoint with three exact lookups whatever the number of pods or policies:
//!   `identities[ip_identity(remote) or WORLD]`, `identities[ANY]`, and an LPM lookup of the remote
//!   address in `cidrs`; it is allowed when any of the three port sets contains (proto, port).
//!   The host is looked up as [`ID_HOST`] without an LPM lookup.
//! - **`cidrs` is LPM-exact**: `except` holes are resolved into non-overlapping prefixes
//!   ([`super::cidr::subtract`]) and every prefix's port set already includes the port sets of all
//!   shorter prefixes that contain it ([`super::cidr::lpm_closure`]). The longest match therefore
//!   carries the union of every ipBlock containing the address, and two blocks with different
//!   ports over overlapping prefixes cannot shadow each other.
//! - Named ports are resolved to numbers: for ingress on the endpoint itself, for egress on each
//!   peer identity (and, for an ipBlock, on each pod whose address is inside it, as a /32).
//! - Nothing is ever keyed by [`ID_WORLD`]; removing an address from `ip_identity` can therefore
//!   only narrow access. The update plan relies on that.
//!
//! Everything is in `BTreeMap`s and canonical [`PortSet`]s, so equal states compile to equal
//! values and [`plan`] can diff them.

use super::cidr::{Cidr, lpm_closure, lpm_lookup, subtract};
use super::model::{
    ClusterState, ContainerPort, Direction, Labels, NamespaceMatch, PeerMatch, Pod, PodRef, Policy,
    PortSel, Protocol, Rule,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

/// Key of entries that apply to every peer (rules without `from`/`to`); the node the endpoint
/// runs on; any address that is not a known pod (never used as an entry key). Shared with the
/// eBPF programs.
pub use vpcnet_common::{ID_ANY, ID_HOST, ID_WORLD};
pub const FIRST_POD_ID: u32 = 256;
/// Pod identities stay below the numbers the dataplane gives ipBlock port sets.
pub const LAST_POD_ID: u32 = vpcnet_common::CIDR_SET_BASE - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub proto: Protocol,
    pub start: u16,
    pub end: u16,
}

/// A canonical set of (protocol, port) pairs: ranges sorted, merged, non-adjacent. `all` means
/// every protocol and port, ICMP included (a rule without `ports`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSet {
    pub all: bool,
    pub ranges: Vec<PortRange>,
}

impl PortSet {
    pub fn all() -> Self {
        PortSet {
            all: true,
            ranges: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.ranges.is_empty()
    }

    pub fn contains(&self, proto: Protocol, port: u16) -> bool {
        self.all
            || self
                .ranges
                .iter()
                .any(|r| r.proto == proto && (r.start..=r.end).contains(&port))
    }

    pub fn add(&mut self, proto: Protocol, start: u16, end: u16) {
        if self.all {
            return;
        }
        self.ranges.push(PortRange { proto, start, end });
        self.normalize();
    }

    pub(crate) fn normalize(&mut self) {
        if self.all {
            self.ranges.clear();
            return;
        }
        self.ranges.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(self.ranges.len());
        for r in self.ranges.drain(..) {
            match out.last_mut() {
                Some(l) if l.proto == r.proto && u32::from(r.start) <= u32::from(l.end) + 1 => {
                    l.end = l.end.max(r.end);
                }
                _ => out.push(r),
            }
        }
        self.ranges = out;
    }

    /// Adds `other` without merging: for building a set from many rules, then
    /// [`Self::normalize`] once (merging after every rule made compiling N rules for one peer
    /// quadratic).
    pub(crate) fn absorb(&mut self, other: &PortSet) {
        if other.all {
            self.all = true;
            self.ranges.clear();
        } else if !self.all {
            self.ranges.extend(other.ranges.iter().copied());
        }
    }

    pub fn union(&mut self, other: &PortSet) {
        if other.all {
            self.all = true;
        } else {
            self.ranges.extend(other.ranges.iter().copied());
        }
        self.normalize();
    }

    pub fn intersection(&self, other: &PortSet) -> PortSet {
        if self.all {
            return other.clone();
        }
        if other.all {
            return self.clone();
        }
        let mut out = PortSet::default();
        for a in &self.ranges {
            for b in &other.ranges {
                if a.proto == b.proto {
                    let (s, e) = (a.start.max(b.start), a.end.min(b.end));
                    if s <= e {
                        out.ranges.push(PortRange {
                            proto: a.proto,
                            start: s,
                            end: e,
                        });
                    }
                }
            }
        }
        out.normalize();
        out
    }

    /// The ranges as aligned power-of-two blocks `(proto, first port, prefix length over the
    /// 16 port bits)`, for a dataplane that keys an LPM map by (…, proto, port).
    pub fn port_prefixes(&self) -> Vec<(Protocol, u16, u8)> {
        let mut out = Vec::new();
        for r in &self.ranges {
            let mut s = u32::from(r.start);
            let e = u32::from(r.end);
            while s <= e {
                let mut size = if s == 0 {
                    1 << 16
                } else {
                    1u32 << s.trailing_zeros()
                };
                while s + size - 1 > e {
                    size >>= 1;
                }
                out.push((r.proto, s as u16, 16 - size.trailing_zeros() as u8));
                s += size;
            }
        }
        out
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.all {
            return f.write_str("any");
        }
        if self.ranges.is_empty() {
            return f.write_str("none");
        }
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.start == r.end {
                write!(f, "{}/{}", r.proto, r.start)?;
            } else {
                write!(f, "{}/{}-{}", r.proto, r.start, r.end)?;
            }
        }
        Ok(())
    }
}

/// What makes pods distinguishable to policies (apart from their address, which `cidrs` handles).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    pub namespace_labels: Labels,
    pub labels: Labels,
    /// Named container ports only, sorted.
    pub named_ports: Vec<ContainerPort>,
}

impl IdentityKey {
    pub fn of(state: &ClusterState, pod: &Pod) -> Self {
        IdentityKey {
            namespace: pod.namespace.clone(),
            namespace_labels: state.namespace_labels(&pod.namespace).into_owned(),
            labels: pod.labels.clone(),
            named_ports: pod
                .ports
                .iter()
                .filter(|p| p.name.is_some())
                .cloned()
                .collect(),
        }
    }

    pub(crate) fn named<'a>(
        &'a self,
        name: &'a str,
        proto: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.named_ports
            .iter()
            .filter(move |p| p.protocol == proto && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    fn matches(&self, peer: &PeerMatch) -> bool {
        match peer {
            PeerMatch::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    NamespaceMatch::PolicyNamespace(ns) => *ns == self.namespace,
                    NamespaceMatch::Selector(s) => s.matches(&self.namespace_labels),
                };
                ns_ok && pods.matches(&self.labels)
            }
            _ => false,
        }
    }
}

/// Stable identity numbers across compilations: a key keeps its number while it exists, and a
/// released number is not handed out again (the counter only grows; after two billion label sets
/// it restarts above the reserved range, by which time no entry can still refer to the old
/// meaning).
#[derive(Debug, Clone)]
pub struct IdentityAllocator {
    by_key: BTreeMap<IdentityKey, u32>,
    next: u32,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        IdentityAllocator {
            by_key: BTreeMap::new(),
            next: FIRST_POD_ID,
        }
    }
}

impl IdentityAllocator {
    /// Adopts numbers a previous process gave out (read back from the dataplane after a restart),
    /// so unchanged label sets keep their numbers and new ones get numbers never seen before.
    pub fn seed(&mut self, known: impl IntoIterator<Item = (IdentityKey, u32)>) {
        for (k, id) in known {
            if !(FIRST_POD_ID..=LAST_POD_ID).contains(&id) {
                continue;
            }
            if id >= self.next {
                self.next = if id >= LAST_POD_ID {
                    FIRST_POD_ID
                } else {
                    id + 1
                };
            }
            if !self.by_key.values().any(|v| *v == id) {
                self.by_key.entry(k).or_insert(id);
            }
        }
    }

    fn assign(&mut self, keys: BTreeSet<IdentityKey>) -> BTreeMap<IdentityKey, u32> {
        let mut out = BTreeMap::new();
        for k in keys {
            let id = match self.by_key.get(&k) {
                Some(id) => *id,
                None => {
                    let id = self.next;
                    self.next = if self.next >= LAST_POD_ID {
                        FIRST_POD_ID
                    } else {
                        self.next + 1
                    };
                    id
                }
            };
            out.insert(k, id);
        }
        self.by_key = out.clone();
        out
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionRules {
    pub isolated: bool,
    pub identities: BTreeMap<u32, PortSet>,
    /// LPM-exact: see the module documentation.
    pub cidrs: BTreeMap<Cidr, PortSet>,
}

impl DirectionRules {
    /// A record the dataplane holds for an endpoint it knows nothing about yet: deny.
    fn closed() -> Self {
        DirectionRules {
            isolated: true,
            ..Default::default()
        }
    }

    /// What the dataplane does for a remote with identity `remote` and address `ip`.
    pub fn permits(&self, remote: u32, ip: Option<Ipv4Addr>, proto: Protocol, port: u16) -> bool {
        if !self.isolated {
            return true;
        }
        let hit = |s: Option<&PortSet>| s.is_some_and(|s| s.contains(proto, port));
        hit(self.identities.get(&remote))
            || hit(self.identities.get(&ID_ANY))
            || ip.is_some_and(|ip| hit(lpm_lookup(&self.cidrs, ip)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRules {
    pub pod: PodRef,
    pub identity: u32,
    pub ingress: DirectionRules,
    pub egress: DirectionRules,
}

impl EndpointRules {
    pub fn dir(&self, d: Direction) -> &DirectionRules {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    fn dir_mut(&mut self, d: Direction) -> &mut DirectionRules {
        match d {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub generation: u64,
    pub identities: BTreeMap<u32, IdentityKey>,
    pub ip_identity: BTreeMap<Ipv4Addr, u32>,
    /// Keyed by the endpoint's address.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointRules>,
    /// Which keys each revision changed, when this value is kept up to date by a
    /// [`crate::incremental::Regenerator`]: not part of the value (see [`Compiled::touched_since`]).
    log: ChangeLog,
}

/// Equal rules, whatever their change logs.
impl PartialEq for Compiled {
    fn eq(&self, other: &Self) -> bool {
        self.generation == other.generation
            && self.identities == other.identities
            && self.ip_identity == other.ip_identity
            && self.endpoints == other.endpoints
    }
}

impl Eq for Compiled {}

/// One revision of one tracked [`Compiled`]: what a consumer records after applying it in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    lineage: u64,
    revision: u64,
}

/// The keys of a [`Compiled`] whose entries may differ between two of its revisions; every other
/// key is the same in both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// Addresses of endpoints added, removed or regenerated.
    pub endpoints: BTreeSet<Ipv4Addr>,
    /// Addresses whose `ip_identity` entry may have changed.
    pub addresses: BTreeSet<Ipv4Addr>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.addresses.is_empty()
    }

    fn len(&self) -> usize {
        self.endpoints.len() + self.addresses.len()
    }

    fn absorb(&mut self, other: &Touched) {
        self.endpoints.extend(other.endpoints.iter().copied());
        self.addresses.extend(other.addresses.iter().copied());
    }
}

/// Keys recorded per revision, at most this many over all kept revisions: a consumer further
/// behind plans over everything, which is always correct.
const LOG_KEYS: usize = 1 << 16;

/// Lineage numbers: one per tracked value in this process, never 0 (untracked).
static LINEAGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The change log of a tracked [`Compiled`].
#[derive(Debug, Default)]
struct ChangeLog {
    /// 0: untracked (compiled in full, a copy, or built by hand).
    lineage: u64,
    revision: u64,
    /// `entries` hold every change of the revisions after this one.
    covered: u64,
    entries: std::collections::VecDeque<(u64, Touched)>,
    keys: usize,
}

/// A copy is untracked: its fields are public and may be changed without a log entry, so a
/// consumer must never plan it by the original's log.
impl Clone for ChangeLog {
    fn clone(&self) -> Self {
        ChangeLog::default()
    }
}

impl Compiled {
    /// The revision this value is at, when it is tracked (kept by a
    /// [`crate::incremental::Regenerator`], not a copy).
    pub fn version(&self) -> Option<Version> {
        (self.log.lineage != 0).then_some(Version {
            lineage: self.log.lineage,
            revision: self.log.revision,
        })
    }

    /// The keys that may differ between revision `since` of this value and now, if the log still
    /// holds them; `None` for another lineage, an untracked value or a revision too far back.
    /// [`plan_touched`] over them equals [`plan`] from a dataplane holding revision `since`.
    pub fn touched_since(&self, since: Version) -> Option<Touched> {
        let log = &self.log;
        if log.lineage == 0
            || since.lineage != log.lineage
            || since.revision < log.covered
            || since.revision > log.revision
        {
            return None;
        }
        let mut out = Touched::default();
        for (_, t) in log.entries.iter().filter(|(r, _)| *r > since.revision) {
            out.absorb(t);
        }
        Some(out)
    }

    /// Ends a revision that changed `touched` (the regenerator's output only).
    pub(crate) fn record(&mut self, touched: Touched) {
        let log = &mut self.log;
        if log.lineage == 0 {
            // Nothing before now is known: a consumer of an earlier value plans in full.
            log.lineage = LINEAGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            log.covered = log.revision;
            log.entries.clear();
            log.keys = 0;
        }
        log.revision += 1;
        if touched.is_empty() {
            return;
        }
        log.keys += touched.len();
        log.entries.push_back((log.revision, touched));
        while log.keys > LOG_KEYS {
            let Some((r, t)) = log.entries.pop_front() else {
                break;
            };
            log.keys -= t.len();
            log.covered = r;
        }
    }
}

/// Where a packet comes from or goes to, as the dataplane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    Ip(Ipv4Addr),
    Host,
}

impl Compiled {
    fn remote(&self, a: Addr) -> (u32, Option<Ipv4Addr>) {
        match a {
            Addr::Host => (ID_HOST, None),
            Addr::Ip(ip) => (
                self.ip_identity.get(&ip).copied().unwrap_or(ID_WORLD),
                Some(ip),
            ),
        }
    }

    /// "What would the dataplane do": the reference interpreter of this representation. Egress is
    /// checked at the source endpoint and ingress at the destination endpoint, each only if the
    /// address is an endpoint here; traffic a pod sends to itself never reaches the dataplane.
    pub fn permits(&self, src: Addr, dst: Addr, proto: Protocol, port: u16) -> bool {
        if let (Addr::Ip(a), Addr::Ip(b)) = (src, dst)
            && a == b
            && self.endpoints.contains_key(&a)
        {
            return true;
        }
        let egress_ok = match src {
            Addr::Ip(ip) => self.endpoints.get(&ip).is_none_or(|ep| {
                let (id, rip) = self.remote(dst);
                ep.egress.permits(id, rip, proto, port)
            }),
            Addr::Host => true,
        };
        let ingress_ok = match dst {
            Addr::Ip(ip) => self.endpoints.get(&ip).is_none_or(|ep| {
                let (id, rip) = self.remote(src);
                ep.ingress.permits(id, rip, proto, port)
            }),
            Addr::Host => true,
        };
        egress_ok && ingress_ok
    }
}

/// Keeps identity numbers stable between compilations of successive states.
#[derive(Debug, Clone, Default)]
pub struct Compiler {
    alloc: IdentityAllocator,
    node: Option<String>,
}

impl Compiler {
    /// `node`: compile endpoints only for pods on this node (`None`: every pod with an address).
    pub fn new(node: Option<String>) -> Self {
        Compiler {
            alloc: IdentityAllocator::default(),
            node,
        }
    }

    /// See [`IdentityAllocator::seed`].
    pub fn seed(&mut self, known: impl IntoIterator<Item = (IdentityKey, u32)>) {
        self.alloc.seed(known)
    }

    pub fn compile(&mut self, state: &ClusterState) -> Compiled {
        let with_ip: Vec<(&Pod, Ipv4Addr)> = state
            .pods()
            .filter_map(|p| p.ip.map(|ip| (p, ip)))
            .collect();
        let keys: BTreeSet<IdentityKey> = with_ip
            .iter()
            .map(|(p, _)| IdentityKey::of(state, p))
            .collect();
        let ids = self.alloc.assign(keys);
        let mut out = Compiled {
            generation: state.generation(),
            identities: ids.iter().map(|(k, v)| (*v, k.clone())).collect(),
            ..Default::default()
        };
        for (p, ip) in &with_ip {
            // pod_by_ip decides which pod owns a contested address, for everyone alike.
            if state.pod_by_ip(*ip).is_some_and(|o| o.key() == p.key()) {
                out.ip_identity.insert(*ip, ids[&IdentityKey::of(state, p)]);
            }
        }
        for (p, ip) in &with_ip {
            if self.node.is_some() && p.node != self.node {
                continue;
            }
            if state.pod_by_ip(*ip).is_none_or(|o| o.key() != p.key()) {
                continue;
            }
            let ep = EndpointRules {
                pod: p.key(),
                identity: ids[&IdentityKey::of(state, p)],
                ingress: direction(state, p, Direction::Ingress, &ids, &with_ip),
                egress: direction(state, p, Direction::Egress, &ids, &with_ip),
            };
            out.endpoints.insert(*ip, ep);
        }
        out
    }
}

/// One-off compilation with fresh identity numbers.
pub fn compile(state: &ClusterState, node: Option<&str>) -> Compiled {
    Compiler::new(node.map(str::to_string)).compile(state)
}

/// Policies that select `pod` for `dir`. Written here, not taken from the engine: the engine is
/// the oracle this compilation is tested against, and sharing its selection would hide a bug in
/// both.
fn selecting<'a>(
    state: &'a ClusterState,
    pod: &'a Pod,
    dir: Direction,
) -> impl Iterator<Item = &'a Policy> + 'a {
    state.policies().filter(move |p| {
        p.namespace == pod.namespace
            && p.rules(dir).is_some()
            && p.pod_selector.matches(&pod.labels)
    })
}

/// Ports of `rule` that do not depend on the destination, and the named ones that do.
pub(crate) fn split_ports(rule: &Rule) -> (PortSet, Vec<(&str, Protocol)>) {
    if rule.ports.is_empty() {
        return (PortSet::all(), Vec::new());
    }
    let mut fixed = PortSet::default();
    let mut named = Vec::new();
    for pm in &rule.ports {
        match &pm.port {
            PortSel::All => fixed.add(pm.protocol, 0, u16::MAX),
            PortSel::Range(a, b) => fixed.add(pm.protocol, *a, *b),
            PortSel::Named(n) => named.push((n.as_str(), pm.protocol)),
        }
    }
    (fixed, named)
}

fn direction(
    state: &ClusterState,
    pod: &Pod,
    dir: Direction,
    ids: &BTreeMap<IdentityKey, u32>,
    pods: &[(&Pod, Ipv4Addr)],
) -> DirectionRules {
    let mut out = DirectionRules::default();
    let mut cidrs: Vec<(Cidr, PortSet)> = Vec::new();
    let allow = |m: &mut BTreeMap<u32, PortSet>, id: u32, ps: &PortSet| {
        if !ps.is_empty() {
            m.entry(id).or_default().absorb(ps);
        }
    };
    for pol in selecting(state, pod, dir) {
        out.isolated = true;
        for rule in pol.rules(dir).unwrap_or_default() {
            let (fixed, named) = split_ports(rule);
            // Named ports resolved on one destination: the endpoint itself for ingress.
            let resolve = |name_src: &dyn Fn(&str, Protocol) -> Vec<u16>| {
                let mut ps = fixed.clone();
                for (n, proto) in &named {
                    for port in name_src(n, *proto) {
                        ps.add(*proto, port, port);
                    }
                }
                ps
            };
            match dir {
                Direction::Ingress => {
                    let ps = resolve(&|n, proto| pod.named_ports(n, proto).collect());
                    if rule.peers.is_empty() {
                        allow(&mut out.identities, ID_ANY, &ps);
                    }
                    for peer in &rule.peers {
                        match peer {
                            PeerMatch::Pods { .. } => {
                                for (_, id) in ids.iter().filter(|(k, _)| k.matches(peer)) {
                                    allow(&mut out.identities, *id, &ps);
                                }
                            }
                            PeerMatch::IpBlock { cidr, except } => {
                                if !ps.is_empty() {
                                    for c in subtract(*cidr, except) {
                                        cidrs.push((c, ps.clone()));
                                    }
                                }
                            }
                            PeerMatch::Ipv6Block(_) => {}
                        }
                    }
                }
                Direction::Egress => {
                    // Fixed ports hold for every peer; named ones per destination pod.
                    let per_id = |k: &IdentityKey| resolve(&|n, proto| k.named(n, proto).collect());
                    if rule.peers.is_empty() {
                        allow(&mut out.identities, ID_ANY, &fixed);
                        if !named.is_empty() {
                            for (k, id) in ids {
                                allow(&mut out.identities, *id, &per_id(k));
                            }
                        }
                    }
                    for peer in &rule.peers {
                        match peer {
                            PeerMatch::Pods { .. } => {
                                for (k, id) in ids.iter().filter(|(k, _)| k.matches(peer)) {
                                    allow(&mut out.identities, *id, &per_id(k));
                                }
                            }
                            PeerMatch::IpBlock { cidr, except } => {
                                if !fixed.is_empty() {
                                    for c in subtract(*cidr, except) {
                                        cidrs.push((c, fixed.clone()));
                                    }
                                }
                                if !named.is_empty() {
                                    for (p, ip) in pods {
                                        let inside = cidr.contains(*ip)
                                            && !except.iter().any(|e| e.contains(*ip));
                                        if inside
                                            && state
                                                .pod_by_ip(*ip)
                                                .is_some_and(|o| o.key() == p.key())
                                        {
                                            let ps = resolve(&|n, proto| {
                                                p.named_ports(n, proto).collect()
                                            });
                                            if !ps.is_empty() {
                                                cidrs.push((Cidr::host(*ip), ps));
                                            }
                                        }
                                    }
                                }
                            }
                            PeerMatch::Ipv6Block(_) => {}
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

/// One change to the dataplane's maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    SetIsolated {
        endpoint: Ipv4Addr,
        dir: Direction,
        isolated: bool,
    },
    SetIdentity {
        endpoint: Ipv4Addr,
        dir: Direction,
        remote: u32,
        ports: PortSet,
    },
    DelIdentity {
        endpoint: Ipv4Addr,
        dir: Direction,
        remote: u32,
    },
    SetCidr {
        endpoint: Ipv4Addr,
        dir: Direction,
        prefix: Cidr,
        ports: PortSet,
    },
    DelCidr {
        endpoint: Ipv4Addr,
        dir: Direction,
        prefix: Cidr,
    },
    MapIp {
        ip: Ipv4Addr,
        identity: u32,
    },
    UnmapIp {
        ip: Ipv4Addr,
    },
    DelEndpoint {
        endpoint: Ipv4Addr,
    },
}

/// The changes from one compilation to the next, in the order they must be applied.
///
/// # The ordering rule
///
/// "Add the new allows, then remove the old ones" is wrong: a connection needs egress at one
/// endpoint AND ingress at another, so widening A's egress before narrowing B's ingress briefly
/// allows A→B although neither the old nor the new policies did. Likewise a rewritten LPM value
/// or a remapped address can combine old and new meanings. The rule is:
///
/// 1. `prepare` — only endpoints (directions) that are not isolated in the dataplane yet: write
///    their new entries (no effect while not isolated) and create records for new endpoints in
///    the closed (isolated, empty) state.
/// 2. `narrow` — everywhere, only ever take away: set `isolated` where the new state isolates,
///    delete entries the new state lacks, shrink changed entries to old∩new, and unmap
///    addresses whose identity changes or goes away (unmapped = [`ID_WORLD`], which keys
///    nothing). After every single op, each endpoint allows a subset of what it allowed before;
///    at the end, a subset of old∩new. (For `cidrs`, values are LPM-closed, so the fallback to a
///    shorter prefix after a delete can only lose ports.)
/// 3. `widen` — map addresses to their new identities, write entries to their new values, clear
///    `isolated` where the new state does not isolate. After every op each endpoint allows a
///    subset of the new state; at the end, exactly the new state.
/// 4. `cleanup` — delete stale entries of endpoints that are no longer isolated, and records of
///    endpoints that are gone.
///
/// Within a phase the order is free, so a phase may be applied as one batch. Between phases the
/// dataplane must be fully updated (map updates are synchronous, so applying them in order is
/// enough). The bound holds because identity numbers are never reused for another label set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdatePlan {
    pub prepare: Vec<Op>,
    pub narrow: Vec<Op>,
    pub widen: Vec<Op>,
    pub cleanup: Vec<Op>,
}

impl UpdatePlan {
    pub fn is_empty(&self) -> bool {
        self.prepare.is_empty()
            && self.narrow.is_empty()
            && self.widen.is_empty()
            && self.cleanup.is_empty()
    }

    pub fn phases(&self) -> [(&'static str, &[Op]); 4] {
        [
            ("prepare", &self.prepare),
            ("narrow", &self.narrow),
            ("widen", &self.widen),
            ("cleanup", &self.cleanup),
        ]
    }
}

fn entry_ops<K: Ord + Copy>(
    old: &BTreeMap<K, PortSet>,
    new: &BTreeMap<K, PortSet>,
    set: impl Fn(K, PortSet) -> Op,
    del: impl Fn(K) -> Op,
    narrow: &mut Vec<Op>,
    widen: &mut Vec<Op>,
) {
    for (k, o) in old {
        match new.get(k) {
            None => narrow.push(del(*k)),
            Some(n) if n == o => {}
            Some(n) => {
                let both = o.intersection(n);
                if both.is_empty() {
                    narrow.push(del(*k));
                } else if both != *o {
                    narrow.push(set(*k, both.clone()));
                }
                if both != *n {
                    widen.push(set(*k, n.clone()));
                }
            }
        }
    }
    for (k, n) in new {
        if !old.contains_key(k) {
            widen.push(set(*k, n.clone()));
        }
    }
}

/// Replace every entry of `old` by those of `new` in one phase (used where `isolated` is off).
fn replace_ops<K: Ord + Copy>(
    old: &BTreeMap<K, PortSet>,
    new: &BTreeMap<K, PortSet>,
    set: impl Fn(K, PortSet) -> Op,
    del: impl Fn(K) -> Op,
    out: &mut Vec<Op>,
) {
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(del(*k));
        }
    }
    for (k, n) in new {
        if old.get(k) != Some(n) {
            out.push(set(*k, n.clone()));
        }
    }
}

/// The ordered changes that take a dataplane holding `old` to `new` (see [`UpdatePlan`]).
pub fn plan(old: &Compiled, new: &Compiled) -> UpdatePlan {
    let mut p = UpdatePlan::default();
    for (ip, ne) in &new.endpoints {
        endpoint_ops(&mut p, *ip, old.endpoints.get(ip), ne);
    }
    for ip in old.endpoints.keys() {
        if !new.endpoints.contains_key(ip) {
            removed_endpoint_ops(&mut p, *ip);
        }
    }
    for (ip, id) in &old.ip_identity {
        if new.ip_identity.get(ip) != Some(id) {
            p.narrow.push(Op::UnmapIp { ip: *ip });
        }
    }
    for (ip, id) in &new.ip_identity {
        if old.ip_identity.get(ip) != Some(id) {
            p.widen.push(Op::MapIp {
                ip: *ip,
                identity: *id,
            });
        }
    }
    p
}

/// [`plan`] restricted to the keys in `touched`: the same plan, op for op and in the same order,
/// when `old` and `new` agree on every other key — as a dataplane that applied revision `v` of a
/// tracked `new` does on the keys outside `new.touched_since(v)`. Work proportional to the
/// change instead of to every endpoint and every known address.
pub fn plan_touched(old: &Compiled, new: &Compiled, touched: &Touched) -> UpdatePlan {
    let mut p = UpdatePlan::default();
    for ip in &touched.endpoints {
        if let Some(ne) = new.endpoints.get(ip) {
            endpoint_ops(&mut p, *ip, old.endpoints.get(ip), ne);
        }
    }
    for ip in &touched.endpoints {
        if old.endpoints.contains_key(ip) && !new.endpoints.contains_key(ip) {
            removed_endpoint_ops(&mut p, *ip);
        }
    }
    for ip in &touched.addresses {
        if let Some(id) = old.ip_identity.get(ip)
            && new.ip_identity.get(ip) != Some(id)
        {
            p.narrow.push(Op::UnmapIp { ip: *ip });
        }
    }
    for ip in &touched.addresses {
        if let Some(id) = new.ip_identity.get(ip)
            && old.ip_identity.get(ip) != Some(id)
        {
            p.widen.push(Op::MapIp {
                ip: *ip,
                identity: *id,
            });
        }
    }
    p
}

/// The ops of one endpoint present in the new state (`oe`: what the dataplane holds for it).
fn endpoint_ops(
    p: &mut UpdatePlan,
    endpoint: Ipv4Addr,
    oe: Option<&EndpointRules>,
    ne: &EndpointRules,
) {
    let closed = DirectionRules::closed();
    for dir in [Direction::Ingress, Direction::Egress] {
        let o = oe.map_or(&closed, |e| e.dir(dir));
        let n = ne.dir(dir);
        if oe.is_none() {
            p.prepare.push(Op::SetIsolated {
                endpoint,
                dir,
                isolated: true,
            });
        }
        let set_id = |remote, ports| Op::SetIdentity {
            endpoint,
            dir,
            remote,
            ports,
        };
        let del_id = |remote| Op::DelIdentity {
            endpoint,
            dir,
            remote,
        };
        let set_c = |prefix, ports| Op::SetCidr {
            endpoint,
            dir,
            prefix,
            ports,
        };
        let del_c = |prefix| Op::DelCidr {
            endpoint,
            dir,
            prefix,
        };
        if !o.isolated {
            replace_ops(&o.identities, &n.identities, set_id, del_id, &mut p.prepare);
            replace_ops(&o.cidrs, &n.cidrs, set_c, del_c, &mut p.prepare);
            if n.isolated {
                p.narrow.push(Op::SetIsolated {
                    endpoint,
                    dir,
                    isolated: true,
                });
            }
        } else if n.isolated {
            entry_ops(
                &o.identities,
                &n.identities,
                set_id,
                del_id,
                &mut p.narrow,
                &mut p.widen,
            );
            entry_ops(
                &o.cidrs,
                &n.cidrs,
                set_c,
                del_c,
                &mut p.narrow,
                &mut p.widen,
            );
        } else {
            p.widen.push(Op::SetIsolated {
                endpoint,
                dir,
                isolated: false,
            });
            replace_ops(&o.identities, &n.identities, set_id, del_id, &mut p.cleanup);
            replace_ops(&o.cidrs, &n.cidrs, set_c, del_c, &mut p.cleanup);
        }
    }
}

/// The ops of an endpoint gone from the new state.
fn removed_endpoint_ops(p: &mut UpdatePlan, endpoint: Ipv4Addr) {
    for dir in [Direction::Ingress, Direction::Egress] {
        p.narrow.push(Op::SetIsolated {
            endpoint,
            dir,
            isolated: true,
        });
    }
    p.cleanup.push(Op::DelEndpoint { endpoint });
}

impl Compiled {
    /// Applies one op as the dataplane would, for tests and dry runs.
    pub fn apply(&mut self, op: &Op) {
        // A plain helper keeps the borrow checker out of the match arms.
        fn with(c: &mut Compiled, ip: Ipv4Addr, f: impl FnOnce(&mut EndpointRules)) {
            let e = c.endpoints.entry(ip).or_insert_with(|| EndpointRules {
                pod: PodRef::new("", ""),
                identity: ID_WORLD,
                ingress: DirectionRules::closed(),
                egress: DirectionRules::closed(),
            });
            f(e)
        }
        match op.clone() {
            Op::SetIsolated {
                endpoint,
                dir,
                isolated,
            } => with(self, endpoint, |e| e.dir_mut(dir).isolated = isolated),
            Op::SetIdentity {
                endpoint,
                dir,
                remote,
                ports,
            } => with(self, endpoint, |e| {
                e.dir_mut(dir).identities.insert(remote, ports);
            }),
            Op::DelIdentity {
                endpoint,
                dir,
                remote,
            } => with(self, endpoint, |e| {
                e.dir_mut(dir).identities.remove(&remote);
            }),
            Op::SetCidr {
                endpoint,
                dir,
                prefix,
                ports,
            } => with(self, endpoint, |e| {
                e.dir_mut(dir).cidrs.insert(prefix, ports);
            }),
            Op::DelCidr {
                endpoint,
                dir,
                prefix,
            } => with(self, endpoint, |e| {
                e.dir_mut(dir).cidrs.remove(&prefix);
            }),
            Op::MapIp { ip, identity } => {
                self.ip_identity.insert(ip, identity);
            }
            Op::UnmapIp { ip } => {
                self.ip_identity.remove(&ip);
            }
            Op::DelEndpoint { endpoint } => {
                self.endpoints.remove(&endpoint);
            }
        }
    }
}
