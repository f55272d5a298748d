//! Kubernetes NetworkPolicy: the cluster model, exact semantics, and compilation for the dataplane.
//!
//! - [`model`]: typed cluster state (namespaces, pods, validated policies) with a generation counter.
//! - [`manifest`]: Kubernetes manifests (YAML/JSON documents) parsed and validated into the model;
//!   the agent's manifest-directory source and the tests feed states through it.
//! - [`selector`]: label selectors.
//! - [`engine`]: the reference semantics — the oracle every other representation is tested against.
//! - [`cidr`]: IPv4 prefixes, `except` resolution and the LPM-exact prefix table.
//! - [`compile`]: per-endpoint rule sets keyed by numeric identities and prefixes, for an eBPF
//!   dataplane whose lookup cost does not depend on the number of pods or policies, plus the
//!   ordered update plan between two compilations.
//! - [`incremental`]: the same compilation kept up to date per object change, for one node:
//!   work proportional to what a change touches, not to the cluster.
//!
//! Enforcement lives elsewhere: the dataplane crate turns a [`Compiled`] into pinned eBPF maps
//! along [`compile::plan`] (see `dataplane/policy.rs`), and the service
//! (`Service::sync_policy`) feeds the watched state's changes and this node's IPAM allocations
//! to an [`incremental::Regenerator`] on every state change, before every new endpoint and after
//! every release.

pub mod cidr;
pub mod compile;
pub mod engine;
pub mod incremental;
pub mod manifest;
pub mod model;
pub mod selector;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod scenarios;

use std::path::PathBuf;

pub use compile::{Compiled, compile};
pub use engine::{Peer, Verdict, allowed, explain};
pub use model::{ClusterState, Protocol};

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
    #[error("unknown pod {0}")]
    UnknownPod(String),
}
