//! Test harness: clusters built out of network namespaces, the CNI plugin run as a runtime runs it,
//! and reachability probes. Used by the e2e tests, the demo and the benchmarks.

pub mod cluster;
pub mod cni;
pub mod netns;
pub mod probe;

pub use cluster::{Cluster, ClusterSpec, Node};
pub use netns::Netns;
