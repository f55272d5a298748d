//! Durable IPAM for vpcnet: virtual networks → subnets → per-node blocks → endpoints.
//!
//! [`Ipam`] hands out addresses from this node's blocks and records them, with the endpoint's
//! lifecycle, in a redb file, so a daemon restart or crash never forgets an address or hands one
//! out twice, and a restarted daemon finds every endpoint it served. Released addresses rest for
//! `cooldown_secs` before reuse, so stale conntrack entries, ARP caches and routes of a deleted
//! pod never reach its successor.
//!
//! Subnets are IPv4 or IPv6; each allocates addresses of its own family. The topology can be
//! replaced at runtime ([`Ipam::apply_topology`]).
//!
//! Addresses are unique per node across all networks, not per network: VPC CIDRs may overlap
//! in the configuration, but one node cannot route one address to two pods, so a node's blocks
//! must be disjoint over all networks and a static address held in one network is taken in all.
//!
//! This crate knows nothing of the socket protocol: its key, pod and endpoint types are its own
//! and the daemon converts at its edge.

mod endpoint;
mod error;
pub mod model;
mod store;
mod topology;

pub use endpoint::{Assigned, AttachmentKey, Endpoint, Lifecycle, PodInfo, Record, Wiring};
pub use error::IpamError;
pub use model::*;
pub use store::{AllocRequest, Ipam};
pub use topology::TopologyChange;

#[cfg(test)]
mod tests;
