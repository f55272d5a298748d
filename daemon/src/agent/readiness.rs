//! The daemon's one verdict on whether it can serve pods, and STATUS around it.

use super::{Agent, AgentError};
use std::sync::TryLockError;
use vpcnet_api::StatusInfo;

/// The daemon's one verdict on whether it can serve pods; STATUS and /healthz both report it, so
/// they can never disagree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub problems: Vec<String>,
    /// What an operator should know while it is still ready.
    pub warnings: Vec<String>,
}

impl Readiness {
    /// One line, for STATUS's message.
    pub fn message(&self) -> String {
        self.problems
            .iter()
            .chain(&self.warnings)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// One reason per line, for /healthz.
    pub fn text(&self) -> String {
        self.problems
            .iter()
            .chain(&self.warnings)
            .map(|p| format!("{p}\n"))
            .collect()
    }
}

impl Agent {
    /// Whether an ADD would work now and pods would get what they are owed: the store accepts
    /// writes, the dataplane is installed, and (with a cluster state source) there is a state to
    /// take addressing and policy from and the dataplane enforces it.
    pub fn readiness(&self) -> Readiness {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        if let Some(e) = self.ipam.health() {
            problems.push(format!("IPAM store: {e}"));
        }
        if let Some(e) = self.fwd.health() {
            problems.push(format!("dataplane: {e}"));
        }
        let orphans = self.orphans_pending();
        if orphans > 0 {
            problems.push(format!(
                "re-adopting {orphans} address(es) live pods hold that the IPAM store has no record of; ADD waits for the network topology to place them"
            ));
        }
        let mut have_state = true;
        if let Some(source) = &self.state {
            match source.snapshot() {
                Err(e) => {
                    have_state = false;
                    problems.push(format!(
                        "no cluster state has been read yet (pod annotations and NetworkPolicy come from it): {e}"
                    ));
                }
                Ok(_) => {
                    if let Some(e) = source.last_error() {
                        warnings.push(format!(
                            "the newest cluster state was rejected; the last good one stays in force: {e}"
                        ));
                    }
                }
            }
        }
        if let Some(supply) = &self.supply {
            problems.extend(supply.problems());
            warnings.extend(supply.warnings());
        }
        // Without a state the sync fails for the reason already given. A sync holds this lock
        // for its whole run (a large policy takes a while); STATUS does not wait for it, that
        // sync's outcome is the next verdict.
        let sync = match self.policy.sync.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if have_state
            && let Some(sync) = sync
            && let Some(e) = &sync.last_error
        {
            problems.push(format!(
                "NetworkPolicy sync is failing (new pods stay closed, the rest keep the previous policy): {e}"
            ));
        }
        Readiness {
            ready: problems.is_empty(),
            problems,
            warnings,
        }
    }

    pub fn status(&self) -> Result<StatusInfo, AgentError> {
        let readiness = self.readiness();
        let allocations = self.ipam.list()?.len() as u64;
        Ok(StatusInfo {
            ready: readiness.ready,
            node: self.config.node.clone(),
            allocations,
            free: self.ipam.free_counts()?,
            dataplane: self.fwd.describe(),
            message: readiness.message(),
        })
    }
}
