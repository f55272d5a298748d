//! What can go wrong in the agent, in its own terms. The socket edge (`crate::wire`) turns each
//! into the protocol's code and message; the text here is that message, word for word.

use super::forwarding::ForwardingError;
use crate::state::cluster_state::ANNOTATION_IP;
use crate::state::source::StateError;
use std::net::{IpAddr, Ipv4Addr};
use vpcnet_ipam::{AttachmentKey, IpamError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// An ADD came before the cluster state did: placing the pod now would ignore its
    /// annotations and policies. Transient: the runtime retries.
    /// A cluster-wide claim (block or fixed address) failed.
    #[error(transparent)]
    Supply(#[from] super::SupplyError),
    #[error(
        "{0}; vpcnetd places pods only once it has the cluster state (pod annotations, NetworkPolicy) — the runtime retries the ADD; if this persists, check `vpcnetctl status` and the source"
    )]
    NotSynced(StateError),
    /// Live pods' addresses are being re-adopted: handing one out now could give it twice.
    #[error(
        "vpcnetd is re-adopting {0} address(es) that live pods on this node hold but its IPAM store had no record of (the store was lost or replaced); it needs the network topology to place them — the runtime retries the ADD"
    )]
    Adopting(usize),
    #[error(
        "pod {namespace}/{name} has annotation {ANNOTATION_IP}={value:?}, which is not an IP address"
    )]
    BadAnnotation {
        namespace: String,
        name: String,
        value: String,
    },
    #[error("{0} static addresses requested; vpcnet gives a pod one address")]
    TooManyStaticIps(usize),
    #[error(
        "no allocation for container {} ifname {}: it was released (DEL or GC) while ADD ran",
        .0.container_id, .0.ifname
    )]
    UnknownAttachment(AttachmentKey),
    #[error(
        "endpoint reports {} but {} was allocated to it",
        show_ips(reported),
        show_ips(allocated)
    )]
    AddressMismatch {
        reported: Vec<IpAddr>,
        allocated: Vec<IpAddr>,
    },
    #[error(
        "container {} ifname {} holds only IPv6 addresses ({}); this node's dataplane forwards IPv4 only: give the network an IPv4 subnet",
        .key.container_id, .key.ifname, join(ips)
    )]
    Ipv6Only {
        key: AttachmentKey,
        ips: Vec<IpAddr>,
    },
    #[error(
        "container has {} in vpcnetd but {} in its result",
        show_ips(held),
        show_ips(checked)
    )]
    CheckMismatch {
        held: Vec<IpAddr>,
        checked: Vec<IpAddr>,
    },
    #[error("vpcnetd has no allocation for container {} ifname {}", .0.container_id, .0.ifname)]
    CheckUnknown(AttachmentKey),
    #[error("{op}: {source}")]
    Dataplane {
        op: DataplaneOp,
        #[source]
        source: ForwardingError,
    },
    /// GC went on past failed releases; the ones that failed are listed.
    #[error("GC released {released} but failed for {}", .failed.len())]
    GcIncomplete {
        released: usize,
        failed: Vec<AgentError>,
    },
    #[error("no cluster state: set `manifests_dir` in the vpcnetd config to read NetworkPolicies")]
    NoClusterState,
    /// `vpcnetctl policy` asked while the source has no state.
    #[error("cluster state: {0}")]
    ClusterState(StateError),
    /// The policy sync has no state to compile (the maps keep what they enforce).
    #[error("no cluster state to enforce NetworkPolicy from: {0}")]
    NoStateToEnforce(StateError),
    /// `vpcnetctl policy` named a pod the state does not know.
    #[error(transparent)]
    Explain(vpcnet_policy::PolicyError),
}

/// The dataplane operation that failed, as the message's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneOp {
    SyncPolicy,
    Install(Ipv4Addr),
    Remove(Ipv4Addr),
    ListEndpoints,
    ReadCounters,
}

impl std::fmt::Display for DataplaneOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataplaneOp::SyncPolicy => f.write_str("programming NetworkPolicy"),
            DataplaneOp::Install(ip) => write!(f, "programming the dataplane for {ip}"),
            DataplaneOp::Remove(ip) => write!(f, "removing {ip} from the dataplane"),
            DataplaneOp::ListEndpoints => f.write_str("listing dataplane endpoints"),
            DataplaneOp::ReadCounters => f.write_str("reading dataplane counters"),
        }
    }
}

impl AgentError {
    pub(crate) fn dataplane(op: DataplaneOp) -> impl FnOnce(ForwardingError) -> AgentError {
        move |source| AgentError::Dataplane { op, source }
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn show_ips(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        "no address".to_string()
    } else {
        join(ips)
    }
}
