//! The node agent: what vpcnetd does for each request and on each tick, independent of the
//! transport. Every method is blocking (IPAM commits to disk, the dataplane talks to the
//! kernel); the server calls them from `spawn_blocking`.
//!
//! Split by concern: [`endpoints`] (ADD, ready, DEL, CHECK, GC), [`policy`] (the NetworkPolicy
//! sync), [`release_queue`] (releases the plugin queued while the daemon was away),
//! [`readiness`] (STATUS and /healthz), [`reconcile`] (leaks). Errors are the agent's own
//! ([`AgentError`]); `crate::wire` turns them into the protocol's.

mod adopt;
mod endpoints;
mod error;
mod forwarding;
mod policy;
mod readiness;
mod reconcile;
mod release_queue;
mod supply;
#[cfg(test)]
mod tests;

pub use adopt::{Orphan, orphans};
pub use error::{AgentError, DataplaneOp};
pub use forwarding::{DataplaneEndpoint, Forwarding, ForwardingError, KernelRoutes};
pub use readiness::Readiness;
pub use supply::{AddressSupply, SupplyError};

use crate::config::DaemonConfig;
use crate::metrics::Metrics;
use crate::state::source::StateSource;
use std::sync::{Arc, Mutex};
use vpcnet_api::CountersInfo;
use vpcnet_ipam::{Endpoint, Ipam};

pub struct Agent {
    ipam: Arc<Ipam>,
    /// Cluster state for addressing and NetworkPolicy (standalone: the watched manifest
    /// directory).
    state: Option<Arc<dyn StateSource>>,
    fwd: Box<dyn Forwarding>,
    /// Kubernetes: blocks and fixed addresses claimed through the API server.
    supply: Option<Arc<dyn AddressSupply>>,
    config: DaemonConfig,
    metrics: Arc<Metrics>,
    mtu: u32,
    policy: policy::PolicySyncer,
    /// Held while a queued release is played, so an ADD that finds its attachment's entry waits
    /// for a replay already playing it, and no replay plays it after that ADD allocated.
    release_queue: Mutex<()>,
    /// Live pods' addresses found on the node but not in the store, until recorded.
    orphans: Mutex<Vec<adopt::Orphan>>,
    /// Whether the store may hold adopted endpoints (a runtime call may take one over).
    adopted: std::sync::atomic::AtomicBool,
}

impl Agent {
    /// An agent without a cluster state source (no addressing annotations, no NetworkPolicy)
    /// and with metrics of its own; see [`Agent::with_state_source`] and
    /// [`Agent::with_metrics`].
    pub fn new(config: DaemonConfig, ipam: Arc<Ipam>, fwd: Box<dyn Forwarding>, mtu: u32) -> Agent {
        Agent {
            ipam,
            state: None,
            fwd,
            supply: None,
            config,
            metrics: Default::default(),
            mtu,
            policy: Default::default(),
            release_queue: Mutex::new(()),
            orphans: Mutex::new(Vec::new()),
            adopted: Default::default(),
        }
    }

    /// Takes pod addressing and NetworkPolicy from `source`; ADDs wait until it has synced.
    pub fn with_state_source(mut self, source: Arc<dyn StateSource>) -> Agent {
        self.state = Some(source);
        self
    }

    /// Claims blocks and fixed addresses from `supply` when the store has none.
    pub fn with_address_supply(mut self, supply: Arc<dyn AddressSupply>) -> Agent {
        self.supply = Some(supply);
        self
    }

    pub fn address_supply(&self) -> Option<&Arc<dyn AddressSupply>> {
        self.supply.as_ref()
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Agent {
        self.metrics = metrics;
        self
    }

    pub fn ipam(&self) -> &Arc<Ipam> {
        &self.ipam
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The MTU pods are given.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    pub fn state_source(&self) -> Option<&Arc<dyn StateSource>> {
        self.state.as_ref()
    }

    pub fn forwarding(&self) -> &dyn Forwarding {
        &*self.fwd
    }

    /// Every endpoint in the store.
    pub fn list(&self) -> Result<Vec<Endpoint>, AgentError> {
        Ok(self.ipam.list()?)
    }

    /// Dataplane counters; the conntrack walk (~0.1 s for a full map) reads the pinned map
    /// directly, holding none of the dataplane's locks, so ADDs and policy syncs do not wait
    /// for it.
    pub fn counters(&self) -> Result<CountersInfo, AgentError> {
        let err = AgentError::dataplane(DataplaneOp::ReadCounters);
        let mut c = self.fwd.counters().map_err(err)?;
        if let Some(pin) = self.fwd.conntrack_pin() {
            c.conntrack = Some(
                vpcnet_dataplane::conntrack_entries(&pin)
                    .map_err(|e| AgentError::dataplane(DataplaneOp::ReadCounters)(e.into()))?,
            );
        }
        Ok(c)
    }

    /// Makes every /metrics scrape refresh the dataplane gauges first: fresh when read, and
    /// nothing spent on them while nobody reads them.
    pub fn refresh_metrics_on_scrape(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.metrics.refresh_on_scrape(Box::new(move || {
            if let Some(a) = me.upgrade() {
                a.refresh_dataplane_metrics();
            }
        }));
    }

    /// Copies the dataplane's conntrack figures into the Prometheus gauges.
    pub fn refresh_dataplane_metrics(&self) {
        let Ok(c) = self.counters() else {
            return;
        };
        if let Some((live, _)) = c.conntrack {
            self.metrics.conntrack_live.set(live as i64);
        }
        for (name, n) in &c.node {
            match name.as_str() {
                "ct-created" => {
                    self.metrics.conntrack_created.set(*n as i64);
                }
                "ct-insert-failed" => {
                    self.metrics.conntrack_insert_failed.set(*n as i64);
                }
                _ => {}
            }
        }
    }
}
