//! Test harness: clusters built out of network namespaces, the CNI plugin run as a runtime runs it,
//! a fake agent for the plugin's own tests, and reachability probes. Used by the e2e tests, the
//! plugin's and the dataplane's tests, the demo and the benchmarks.

pub mod apiserver;
pub mod cluster;
pub mod cni;
pub mod fake_daemon;
pub mod kube;
pub mod netns;
pub mod probe;
pub mod relay;

pub use cluster::{Cluster, ClusterSpec, Node};
pub use netns::Netns;
