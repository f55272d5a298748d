//! Durable IPAM for vpcnet: virtual networks → subnets → per-node blocks → allocations.
//!
//! (skeleton: the types below are the contract the daemon builds against)

pub mod model;

pub use model::*;
