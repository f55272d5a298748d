//! The NetworkPolicy sync: this node's compilation kept up to date incrementally and the
//! dataplane's policy maps taken there, group-committed across concurrent callers.

use super::{Agent, AgentError, DataplaneOp};
use crate::state::cluster_state;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::info;
use vpcnet_dataplane::SyncStats;

/// State of the policy sync between runs.
#[derive(Default)]
pub struct PolicySync {
    /// This node's compilation, kept up to date per object change; `None` until seeded from
    /// what the pinned maps hold.
    regen: Option<vpcnet_policy::incremental::Regenerator>,
    /// The cluster state `regen` was last fed, to feed it only the next state's differences;
    /// kept only for a source whose states do not record their changes (a kept state would make
    /// a recording source copy the whole state for its next change instead of updating it).
    fed: Option<Arc<vpcnet_policy::ClusterState>>,
    /// Generation of the state `regen` was last fed: what the next state's change log is asked
    /// for.
    fed_generation: Option<u64>,
    /// This node's endpoints `regen` was last given.
    local: Option<std::collections::BTreeMap<vpcnet_policy::model::PodRef, std::net::Ipv4Addr>>,
    /// Generation of the cluster state last applied.
    pub(super) generation: Option<u64>,
    pub(super) last_error: Option<String>,
    /// Requests up to this ticket were covered by a successful sync that started after them.
    covered: u64,
}

/// The sync's state and what schedules it.
#[derive(Default)]
pub(super) struct PolicySyncer {
    /// Taken before any dataplane lock, and held for a whole sync.
    pub(super) sync: Mutex<PolicySync>,
    /// Wakes the policy sync loop (a pod went away).
    pub(super) dirty: tokio::sync::Notify,
    /// Sync tickets handed out (see [`Agent::sync_policy`]).
    requests: AtomicU64,
}

impl PolicySyncer {
    pub(super) fn lock(&self) -> MutexGuard<'_, PolicySync> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Agent {
    /// Resolves when a change calls for a policy sync beyond the cluster state's own
    /// notifications (an endpoint went away).
    pub async fn policy_dirty(&self) {
        self.policy.dirty.notified().await
    }

    /// Brings this node's compilation up to the current cluster state and local allocations
    /// (incrementally: see `vpcnet_policy::incremental`) and takes the dataplane's policy maps
    /// there. A no-op without a cluster state source.
    /// Without a readable state the maps keep what they enforce (new pods stay closed).
    pub fn sync_policy(&self) -> Result<SyncStats, AgentError> {
        self.sync_policy_work().map(|(stats, _)| stats)
    }

    /// [`Agent::sync_policy`], saying whether it did any work: a sync that finds the state and
    /// this node's endpoints as the last successful sync left them returns at once (the
    /// periodic tick must cost nothing on an idle node), and so does one covered by another.
    pub fn sync_policy_work(&self) -> Result<(SyncStats, bool), AgentError> {
        let Some(source) = &self.state else {
            return Ok((SyncStats::default(), false));
        };
        // Group commit: concurrent ADDs each need "a sync that saw my allocation", not a sync
        // each. A sync that started after this ticket was taken read IPAM and the cluster state
        // after this caller's allocation and state change, so it covers this request.
        let requests = &self.policy.requests;
        let ticket = requests.fetch_add(1, SeqCst) + 1;
        let started = std::time::Instant::now();
        let mut sync = self.policy.lock();
        if sync.covered >= ticket {
            return Ok((SyncStats::default(), false));
        }
        let covers = requests.load(SeqCst);
        let result: Result<(SyncStats, u64, bool), AgentError> = (|| {
            let state = source.snapshot().map_err(AgentError::NoStateToEnforce)?;
            let records = self.ipam.list()?;
            let local = cluster_state::local_endpoints(&records);
            let sync = &mut *sync;
            // A recording source changes its state in place, the generation moving on each
            // change; any other source publishes a new allocation per change.
            let same_state = sync.fed_generation == Some(state.generation())
                && (state.tracks_changes()
                    || sync.fed.as_ref().is_some_and(|f| Arc::ptr_eq(f, &state)));
            if sync.regen.is_some()
                && sync.last_error.is_none()
                && same_state
                && sync.local.as_ref() == Some(&local)
            {
                // The compilation and the maps' mirror are what this input gives already.
                return Ok((SyncStats::default(), state.generation(), false));
            }
            // What changed since the state last fed: from the state's own change log (a change
            // costs its objects), else by comparing with the state kept.
            let logged = match sync.fed_generation {
                Some(g) if !same_state => state.changes_since(g),
                _ => None,
            };
            if logged.is_none() && !same_state && sync.fed.is_none() {
                // Nothing to take the compilation from its input to this one: start afresh
                // (as after a restart, seeded with the numbers the maps use).
                sync.regen = None;
            }
            let fresh = sync.regen.is_none();
            let regen = match &mut sync.regen {
                Some(r) => r,
                slot @ None => {
                    if !self.fwd.enforces_policy() {
                        return Ok((SyncStats::default(), state.generation(), false));
                    }
                    let mut r = vpcnet_policy::incremental::Regenerator::new(&self.config.node);
                    // Keep the numbers the pinned maps use, so a restart rewrites nothing that
                    // did not change.
                    if let Some(applied) = self.fwd.applied_policy() {
                        r.seed(applied.ip_identity.iter().map(|(ip, id)| (*ip, *id)));
                    }
                    sync.fed = None;
                    sync.fed_generation = None;
                    slot.insert(r)
                }
            };
            // Only what changed since the last sync is worked on: an ADD is its own endpoint,
            // a remote pod's label change the endpoints whose rules name it. Compiled without
            // any dataplane lock: ADDs keep installing endpoints meanwhile (the plan is computed
            // against the maps' mirror under the dataplane's policy lock).
            let t_compile = std::time::Instant::now();
            let changes = match (logged, &sync.fed) {
                _ if fresh => vpcnet_policy::incremental::diff_state(&Default::default(), &state),
                _ if same_state => Vec::new(),
                (Some(changes), _) => changes,
                (None, Some(fed)) => vpcnet_policy::incremental::diff_state(fed, &state),
                (None, None) => unreachable!("a regenerator without a way to follow is reset"),
            };
            let changed = changes.len();
            regen.apply_all(changes);
            // The state replaced is freed after the maps are written, not before: at a large
            // state that is thousands of frees on the way to enforcing the change.
            let replaced = if state.tracks_changes() {
                sync.fed.take()
            } else {
                sync.fed.replace(state.clone())
            };
            sync.fed_generation = Some(state.generation());
            regen.set_local(local.clone());
            sync.local = Some(local);
            regen.set_generation(state.generation());
            regen.compile();
            let (compiled, regen_stats) = (regen.compiled(), regen.stats());
            let compile_ms = t_compile.elapsed().as_secs_f64() * 1e3;
            let stats = self
                .fwd
                .sync_policy(compiled)
                .map_err(AgentError::dataplane(DataplaneOp::SyncPolicy))?;
            drop(replaced);
            tracing::debug!(
                objects_changed = changed,
                endpoints_regenerated = regen_stats.endpoints,
                compile_ms,
                total_ms = started.elapsed().as_secs_f64() * 1e3,
                "policy sync stages"
            );
            Ok((stats, state.generation(), true))
        })();
        match result {
            Ok((stats, generation, false)) => {
                sync.covered = covers;
                sync.generation = Some(generation);
                sync.last_error = None;
                Ok((stats, false))
            }
            Ok((stats, generation, true)) => {
                sync.covered = covers;
                sync.generation = Some(generation);
                sync.last_error = None;
                self.metrics.policy_syncs.inc();
                self.metrics.policy_ops.inc_by(stats.ops as u64);
                self.metrics
                    .policy_sync_seconds
                    .observe(started.elapsed().as_secs_f64());
                if stats.ops > 0 {
                    info!(
                        ops = stats.ops,
                        narrowed = stats.narrowed,
                        generation,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "NetworkPolicy applied"
                    );
                }
                Ok((stats, true))
            }
            Err(e) => {
                self.metrics.policy_sync_failures.inc();
                // Bounded as the socket bounds it: STATUS and /healthz repeat it.
                sync.last_error = Some(vpcnet_api::bounded(e.to_string(), vpcnet_api::MAX_MESSAGE));
                Err(e)
            }
        }
    }

    /// `vpcnetctl policy`: what the policies say about one pod, and whether this node enforces
    /// it.
    pub fn explain_policy(&self, namespace: &str, name: &str) -> Result<String, AgentError> {
        let source = self.state.as_ref().ok_or(AgentError::NoClusterState)?;
        let state = source.snapshot().map_err(AgentError::ClusterState)?;
        let pod = vpcnet_policy::model::ObjRef::new(namespace, name);
        // As the sync sees it: this node's pods with their allocated addresses.
        let records = self.ipam.list()?;
        let state = cluster_state::with_local_allocations(&state, &records, &self.config.node);
        let mut text = vpcnet_policy::explain(&state, &pod).map_err(AgentError::Explain)?;
        if let Some(e) = source.last_error() {
            text.push_str(&format!(
                "\nwarning: the newest manifests were rejected, the last good state is shown: {e}\n"
            ));
        }
        if self.fwd.enforces_policy() {
            let sync = self.policy.lock();
            match (&sync.last_error, sync.generation) {
                (Some(e), _) => text.push_str(&format!(
                    "\nwarning: the last NetworkPolicy update failed; the dataplane enforces the one before: {e}\n"
                )),
                (None, Some(g)) => text.push_str(&format!(
                    "\nEnforced by this node's eBPF dataplane (cluster state generation {g}).\n"
                )),
                (None, None) => text.push_str(
                    "\nnote: no cluster state applied yet; new pods on this node are closed until one is.\n",
                ),
            }
        } else {
            // An operator must not assume isolation that is not there.
            text.push_str("\nnote: this node's dataplane (kernel routes) does not enforce NetworkPolicy; this is what the policies say.\n");
        }
        Ok(text)
    }
}
