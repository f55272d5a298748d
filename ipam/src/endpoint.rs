//! IPAM's own view of an attachment: who it is, what it holds, and how far it got.
//!
//! These types are IPAM's, not the socket protocol's: the daemon converts at its edge, so a
//! protocol change can never silently change what is on disk (the store encodes them through
//! its own versioned record types, see `store.rs`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Identity of one attachment: what CNI calls (container ID, ifname).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

/// Marks the key of an endpoint re-adopted from the node (see [`AttachmentKey::adopted`]). A
/// CNI container ID never contains ':' (the spec allows letters, digits, '_', '.', '-'), so no
/// runtime's key can collide with one.
const ADOPTED: &str = "adopted:";

impl AttachmentKey {
    /// The key of an endpoint the node still had (its host veth routes a live pod's address)
    /// when the store had no record of it. The runtime's (container ID, ifname) is unknown then;
    /// the host veth's name is derived from it, so the first runtime call whose attachment
    /// names that veth takes the endpoint over ([`crate::Ipam::rekey`]).
    pub fn adopted(host_veth: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: format!("{ADOPTED}{host_veth}"),
            ifname: String::new(),
        }
    }

    pub fn is_adopted(&self) -> bool {
        self.container_id.starts_with(ADOPTED)
    }
}

/// The pod an attachment belongs to, as far as the runtime told the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `K8S_POD_INFRA_CONTAINER_ID`, when the runtime sent it.
    pub infra_container_id: String,
}

/// One address an endpoint holds, of either family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub ip: IpAddr,
    /// The subnet's prefix length (the pod interface itself gets a host route).
    pub prefix_len: u8,
    pub network: String,
    pub subnet: String,
}

/// What the dataplane needs to forward to the pod, known once its veth exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wiring {
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
}

/// How far an endpoint got. Moves only forward (see [`Lifecycle::can_become`]), so a late
/// "ready" from an ADD that raced its DEL cannot resurrect an endpoint being released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Lifecycle {
    /// Addresses committed; the pod's interfaces may not exist yet.
    Allocated,
    /// The pod's interfaces exist ([`Endpoint::wiring`] says where).
    Wired,
    /// The dataplane serves it, with the policy of this revision (0: not tracked).
    Ready { policy_revision: u64 },
    /// A release has started; its addresses go once the dataplane entry is gone.
    Releasing,
}

impl Lifecycle {
    /// Whether `self → next` is a valid step. Repeating a step is valid (retried calls), and a
    /// ready endpoint may be wired again (a retried ADD re-creates the veth) or move to a newer
    /// policy revision.
    pub fn can_become(&self, next: &Lifecycle) -> bool {
        use Lifecycle::*;
        match (self, next) {
            (Releasing, Releasing) => true,
            (Releasing, _) => false,
            (_, Releasing) => true,
            (Allocated | Wired | Ready { .. }, Wired) => true,
            (Wired | Ready { .. }, Ready { .. }) => true,
            (_, Allocated) => false,
            (Allocated, Ready { .. }) => false,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Lifecycle::Allocated => "allocated",
            Lifecycle::Wired => "wired",
            Lifecycle::Ready { .. } => "ready",
            Lifecycle::Releasing => "releasing",
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Lifecycle::Ready { .. })
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lifecycle::Ready { policy_revision } => write!(f, "ready (policy {policy_revision})"),
            other => f.write_str(other.name()),
        }
    }
}

/// One attachment as IPAM keeps it: the unit a restarted daemon rebuilds its dataplane from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub key: AttachmentKey,
    pub pod: PodInfo,
    /// Never empty for a committed endpoint; the first is the one allocated first.
    pub addresses: Vec<Assigned>,
    pub host_veth: String,
    /// The dataplane identity of the endpoint's network, fixed at allocation.
    pub network_id: u16,
    /// Set by [`crate::Ipam::mark_wired`].
    pub wiring: Option<Wiring>,
    pub state: Lifecycle,
    pub created_unix_ms: u64,
}

/// The name older code used for an allocation.
pub type Record = Endpoint;

impl Endpoint {
    /// The first address (an endpoint always holds at least one).
    pub fn ip(&self) -> IpAddr {
        self.addresses
            .first()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip)
    }

    /// The first IPv4 address, for the parts of the node that only forward IPv4 today.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a.ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }

    /// The first IPv6 address.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.addresses.iter().find_map(|a| match a.ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        })
    }

    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().map(|a| a.ip)
    }

    /// The network of the first address (every address of an endpoint is in one network).
    pub fn network(&self) -> &str {
        self.addresses.first().map_or("", |a| a.network.as_str())
    }

    /// The subnet of the first address.
    pub fn subnet(&self) -> &str {
        self.addresses.first().map_or("", |a| a.subnet.as_str())
    }

    pub fn is_ready(&self) -> bool {
        self.state.is_ready()
    }
}
