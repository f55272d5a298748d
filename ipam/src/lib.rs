//! Durable IPAM for vpcnet: virtual networks → subnets → per-node blocks → allocations.
//!
//! [`Ipam`] hands out addresses from this node's blocks and records them in a redb file, so a
//! daemon restart or crash never forgets an address or hands one out twice. Released addresses
//! rest for `cooldown_secs` before reuse, so stale conntrack entries, ARP caches and routes of a
//! deleted pod never reach its successor.

mod error;
pub mod model;
mod store;

pub use error::IpamError;
pub use model::*;
pub use store::{AllocRequest, Ipam, Record};

#[cfg(test)]
mod tests;
