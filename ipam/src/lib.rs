//! Durable IPAM for vpcnet: virtual networks → subnets → per-node blocks → allocations.
//!
//! [`Ipam`] hands out addresses from this node's blocks and records them in a redb file, so a
//! daemon restart or crash never forgets an address or hands one out twice. Released addresses
//! rest for `cooldown_secs` before reuse, so stale conntrack entries, ARP caches and routes of a
//! deleted pod never reach its successor.
//!
//! Addresses are unique per node across all networks, not per network: VPC CIDRs may overlap
//! in the configuration, but one node cannot route one address to two pods, so a node's blocks
//! must be disjoint over all networks and a static address held in one network is taken in all.

mod error;
pub mod model;
mod store;

pub use error::IpamError;
pub use model::*;
pub use store::{AllocRequest, Ipam, Record};

#[cfg(test)]
mod tests;
