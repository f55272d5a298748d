//! Kubernetes NetworkPolicy: the cluster model, exact semantics, and compilation for the dataplane.
//!
//! - [`model`]: typed cluster state (namespaces, pods, validated policies) with a generation counter.
//! - [`source`]: one [`source::StateSource`] interface; [`source::ManifestDir`] feeds it from a
//!   directory of ordinary manifests (the API-server watcher will implement the same trait).
//! - [`selector`]: label selectors.
//! - [`engine`]: the reference semantics — the oracle every other representation is tested against.
//! - [`cidr`]: IPv4 prefixes, `except` resolution and the LPM-exact prefix table.
//! - [`compile`]: per-endpoint rule sets keyed by numeric identities and prefixes, for an eBPF
//!   dataplane whose lookup cost does not depend on the number of pods or policies, plus the
//!   ordered update plan between two compilations.
//!
//! Not yet done (the eBPF enforcement):
//! - map layouts, e.g. an LPM keyed by (endpoint, direction, identity, protocol, port prefix) built
//!   from [`compile::PortSet`]'s port prefixes, and a per-endpoint address-prefix map whose value
//!   indexes a port-set table;
//! - applying [`compile::plan`]'s phases in order, each fully written before the next starts;
//! - an endpoint without a policy record is treated as closed (fail closed from the first packet);
//! - connection tracking so replies of allowed connections pass (the engine judges new ones only);
//! - wiring: `ManifestDir::spawn_watcher` → compile for this node → plan → maps, with pod addresses
//!   laid over from IPAM (`ClusterState::set_pod_ip`); later a kube-rs `StateSource`.

pub mod cidr;
pub mod compile;
pub mod engine;
pub mod model;
pub mod selector;
pub mod source;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod scenarios;

use std::path::PathBuf;

pub use compile::{Compiled, compile};
pub use engine::{Peer, Verdict, allowed, explain};
pub use model::{ClusterState, Protocol};
pub use source::{ManifestDir, StateSource};

/// Everything that can go wrong between manifests and a compiled rule set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("label selector: {0}")]
    Selector(#[from] selector::SelectorError),
    #[error("NetworkPolicy {policy}: {reason}")]
    InvalidPolicy { policy: String, reason: String },
    #[error("{kind} {name}: {reason}")]
    InvalidObject {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("{file}: document {document}: {reason}")]
    Manifest {
        file: PathBuf,
        /// 1-based position of the YAML document inside the file.
        document: usize,
        reason: String,
    },
    #[error("{kind} {name} is defined twice: in {first} and in {second}")]
    Duplicate {
        kind: &'static str,
        name: String,
        first: String,
        second: String,
    },
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("unknown pod {0}")]
    UnknownPod(String),
}
