//! Cluster state as the agent sees it: where it comes from ([`source`]) and how this node's own
//! allocations are laid over it ([`cluster_state`]).

pub mod cluster_state;
pub mod kube;
pub mod source;
