//! The reference semantics of networking.k8s.io/v1 NetworkPolicy.
//!
//! This is written for obviousness, not speed: it walks every policy for every question. The
//! compiled form ([`super::compile`]) is checked against it on every probe of every test scenario.
//!
//! The rules, as the API documentation and the upstream e2e suite define them:
//! - a pod is isolated for a direction only when some policy selects it and governs that
//!   direction (policyTypes, defaulted: Ingress always, Egress when egress rules exist);
//! - an isolated pod accepts what the union of the selecting policies' rules allows;
//! - a connection needs egress allowed at the source AND ingress allowed at the destination;
//! - `ipBlock` matches by address, pod addresses included;
//! - a named port is looked up on the destination pod (the selected pod for ingress, the peer
//!   for egress); a destination that does not define it does not match;
//! - the node may always reach its own pods (kubelet probes), and a pod always reaches itself
//!   (loopback never leaves the pod's network namespace).

use super::PolicyError;
use super::model::{
    ClusterState, Direction, NamespaceMatch, ObjRef, PeerMatch, Pod, PodRef, Policy, PortMatch,
    PortSel, Protocol, Rule,
};
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

/// One end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Pod(PodRef),
    /// Any address. One that belongs to a known pod is treated as that pod, since that is all a
    /// dataplane can see.
    External(Ipv4Addr),
    /// The node hosting the pod at the other end (the kubelet, host-network processes). Host
    /// traffic is identified as such, not by address: ipBlocks do not match it.
    Node,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pod(p) => write!(f, "{p}"),
            Peer::External(ip) => write!(f, "{ip}"),
            Peer::Node => f.write_str("node"),
        }
    }
}

/// The outcome on one side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// That side is not a pod; no policy applies there.
    NotApplicable,
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// Allowed by these policies (each has a matching rule).
    Allowed(Vec<ObjRef>),
    /// Isolated by these policies, none of which allows it.
    Denied(Vec<ObjRef>),
    /// Allowed whatever the policies say (loopback, node to its own pod).
    Always(&'static str),
}

impl Decision {
    pub fn permits(&self) -> bool {
        !matches!(self, Decision::Denied(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// At the source pod.
    pub egress: Decision,
    /// At the destination pod.
    pub ingress: Decision,
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        self.egress.permits() && self.ingress.permits()
    }
}

/// A peer resolved against the state.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Remote<'a> {
    Pod(&'a Pod),
    Ip(Ipv4Addr),
    Node,
}

fn resolve<'a>(state: &'a ClusterState, p: &Peer) -> Result<Remote<'a>, PolicyError> {
    Ok(match p {
        Peer::Pod(r) => Remote::Pod(
            state
                .pod(r)
                .ok_or_else(|| PolicyError::UnknownPod(r.to_string()))?,
        ),
        Peer::External(ip) => state.pod_by_ip(*ip).map_or(Remote::Ip(*ip), Remote::Pod),
        Peer::Node => Remote::Node,
    })
}

/// Policies that select `pod` for `dir`, in namespace/name order.
pub fn selecting<'a>(
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

pub(crate) fn peer_matches(state: &ClusterState, peer: &PeerMatch, remote: Remote<'_>) -> bool {
    match (peer, remote) {
        (PeerMatch::Pods { namespaces, pods }, Remote::Pod(p)) => {
            let ns_ok = match namespaces {
                NamespaceMatch::PolicyNamespace(ns) => *ns == p.namespace,
                NamespaceMatch::Selector(s) => s.matches(&state.namespace_labels(&p.namespace)),
            };
            ns_ok && pods.matches(&p.labels)
        }
        (PeerMatch::IpBlock { cidr, except }, Remote::Pod(Pod { ip: Some(ip), .. })) => {
            cidr.contains(*ip) && !except.iter().any(|e| e.contains(*ip))
        }
        (PeerMatch::IpBlock { cidr, except }, Remote::Ip(ip)) => {
            cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
        }
        _ => false,
    }
}

/// `dest` is the pod whose container ports give named ports their meaning.
pub(crate) fn port_matches(pm: &PortMatch, dest: Option<&Pod>, proto: Protocol, port: u16) -> bool {
    pm.protocol == proto
        && match &pm.port {
            PortSel::All => true,
            PortSel::Range(a, b) => (*a..=*b).contains(&port),
            PortSel::Named(n) => dest.is_some_and(|d| d.named_ports(n, proto).any(|p| p == port)),
        }
}

fn rule_matches(
    state: &ClusterState,
    rule: &Rule,
    remote: Remote<'_>,
    dest: Option<&Pod>,
    proto: Protocol,
    port: u16,
) -> bool {
    (rule.peers.is_empty() || rule.peers.iter().any(|p| peer_matches(state, p, remote)))
        && (rule.ports.is_empty()
            || rule
                .ports
                .iter()
                .any(|pm| port_matches(pm, dest, proto, port)))
}

fn decide(
    state: &ClusterState,
    local: &Pod,
    dir: Direction,
    remote: Remote<'_>,
    proto: Protocol,
    port: u16,
) -> Decision {
    let dest = match (dir, remote) {
        (Direction::Ingress, _) => Some(local),
        (Direction::Egress, Remote::Pod(p)) => Some(p),
        (Direction::Egress, _) => None,
    };
    let mut isolating = Vec::new();
    let mut allowing = Vec::new();
    for p in selecting(state, local, dir) {
        isolating.push(p.key());
        let rules = p.rules(dir).unwrap_or_default();
        if rules
            .iter()
            .any(|r| rule_matches(state, r, remote, dest, proto, port))
        {
            allowing.push(p.key());
        }
    }
    if isolating.is_empty() {
        Decision::NotIsolated
    } else if allowing.is_empty() {
        Decision::Denied(isolating)
    } else {
        Decision::Allowed(allowing)
    }
}

/// Whether a new connection from `src` to `dst` on `proto`/`port` is allowed.
pub fn allowed(
    state: &ClusterState,
    src: &Peer,
    dst: &Peer,
    proto: Protocol,
    port: u16,
) -> Result<Verdict, PolicyError> {
    let s = resolve(state, src)?;
    let d = resolve(state, dst)?;
    if let (Remote::Pod(a), Remote::Pod(b)) = (s, d)
        && a.key() == b.key()
    {
        return Ok(Verdict {
            egress: Decision::Always("loopback"),
            ingress: Decision::Always("loopback"),
        });
    }
    let egress = match s {
        Remote::Pod(p) => decide(state, p, Direction::Egress, d, proto, port),
        _ => Decision::NotApplicable,
    };
    let ingress = match (d, s) {
        (Remote::Pod(_), Remote::Node) => Decision::Always("node to its own pod"),
        (Remote::Pod(p), _) => decide(state, p, Direction::Ingress, s, proto, port),
        _ => Decision::NotApplicable,
    };
    Ok(Verdict { egress, ingress })
}

pub(crate) fn describe_peer(peer: &PeerMatch) -> String {
    match peer {
        PeerMatch::Pods {
            namespaces: NamespaceMatch::PolicyNamespace(ns),
            pods,
        } => format!("pods matching {pods} in namespace {ns}"),
        PeerMatch::Pods {
            namespaces: NamespaceMatch::Selector(nss),
            pods,
        } => {
            if nss.is_everything() {
                format!("pods matching {pods} in any namespace")
            } else {
                format!("pods matching {pods} in namespaces matching {nss}")
            }
        }
        PeerMatch::IpBlock { cidr, except } if except.is_empty() => {
            format!("addresses in {cidr}")
        }
        PeerMatch::IpBlock { cidr, except } => format!(
            "addresses in {cidr} except {}",
            except
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        PeerMatch::Ipv6Block(c) => format!("IPv6 block {c} (matches nothing: pods are IPv4)"),
    }
}

fn describe_port(pm: &PortMatch, dest: Option<&Pod>) -> String {
    match &pm.port {
        PortSel::All => format!("all {} ports", pm.protocol),
        PortSel::Range(a, b) if a == b => format!("{} {a}", pm.protocol),
        PortSel::Range(a, b) => format!("{} {a}-{b}", pm.protocol),
        PortSel::Named(n) => match dest {
            Some(d) => {
                let ports: Vec<String> = d
                    .named_ports(n, pm.protocol)
                    .map(|p| p.to_string())
                    .collect();
                if ports.is_empty() {
                    format!(
                        "{} port {n:?} (not defined by this pod: matches nothing)",
                        pm.protocol
                    )
                } else {
                    format!("{} port {n:?} (= {})", pm.protocol, ports.join(", "))
                }
            }
            None => format!(
                "{} port {n:?} (as named by each destination pod)",
                pm.protocol
            ),
        },
    }
}

/// What `vpcnetctl policy <ns>/<pod>` prints: which policies select the pod and what they let
/// through, one direction at a time.
pub fn explain(state: &ClusterState, pod: &PodRef) -> Result<String, PolicyError> {
    let p = state
        .pod(pod)
        .ok_or_else(|| PolicyError::UnknownPod(pod.to_string()))?;
    let mut out = String::new();
    let labels = |l: &super::model::Labels| {
        if l.is_empty() {
            "(none)".to_string()
        } else {
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let _ = writeln!(
        out,
        "pod {pod}  ip {}  node {}",
        p.ip.map_or("(none)".into(), |i| i.to_string()),
        p.node.as_deref().unwrap_or("(unscheduled)")
    );
    let _ = writeln!(out, "  labels: {}", labels(&p.labels));
    let _ = writeln!(
        out,
        "  namespace labels: {}",
        labels(&state.namespace_labels(&p.namespace))
    );
    for dir in [Direction::Ingress, Direction::Egress] {
        let pols: Vec<&Policy> = selecting(state, p, dir).collect();
        let (verb, prep) = match dir {
            Direction::Ingress => ("receive", "from"),
            Direction::Egress => ("send", "to"),
        };
        if pols.is_empty() {
            let _ = writeln!(
                out,
                "{dir}: not isolated (no policy selects it for {dir}): may {verb} anything"
            );
            continue;
        }
        let _ = writeln!(
            out,
            "{dir}: isolated by {} polic{}; may {verb} only what these allow:",
            pols.len(),
            if pols.len() == 1 { "y" } else { "ies" }
        );
        for pol in pols {
            let rules = pol.rules(dir).unwrap_or_default();
            if rules.is_empty() {
                let _ = writeln!(out, "  {}: no {dir} rules (allows nothing)", pol.key());
                continue;
            }
            let _ = writeln!(out, "  {}:", pol.key());
            for (i, r) in rules.iter().enumerate() {
                let who = if r.peers.is_empty() {
                    "anyone".to_string()
                } else {
                    r.peers
                        .iter()
                        .map(describe_peer)
                        .collect::<Vec<_>>()
                        .join("; or ")
                };
                let dest = (dir == Direction::Ingress).then_some(p);
                let what = if r.ports.is_empty() {
                    "on any port and protocol".to_string()
                } else {
                    format!(
                        "on {}",
                        r.ports
                            .iter()
                            .map(|pm| describe_port(pm, dest))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let _ = writeln!(out, "    rule {}: {prep} {who}, {what}", i + 1);
            }
        }
    }
    if state.policies().any(|pol| pol.namespace == p.namespace) {
        Ok(out)
    } else {
        let _ = writeln!(
            out,
            "(no NetworkPolicy exists in namespace {})",
            p.namespace
        );
        Ok(out)
    }
}
