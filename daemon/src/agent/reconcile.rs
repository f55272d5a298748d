//! Leaks: endpoints whose attachment is gone, and dataplane entries nothing owns.

use super::{Agent, AgentError, DataplaneOp};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::warn;

impl Agent {
    /// Releases allocations whose attachment is gone: the host veth no longer exists (ready
    /// ones), or it never appeared within the grace period (an ADD that died half-way). Also
    /// removes dataplane entries that no allocation owns. Returns the releases done.
    pub fn reconcile(&self, live_links: &HashSet<String>) -> Result<usize, AgentError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let grace_ms = self.config.pending_grace_secs * 1000;
        let records = self.ipam.list()?;
        let mut released = 0;
        for r in &records {
            if live_links.contains(&r.host_veth) {
                continue;
            }
            if !r.is_ready() && now_ms.saturating_sub(r.created_unix_ms) < grace_ms {
                continue;
            }
            warn!(container = %r.key.container_id, ifname = %r.key.ifname, ip = %r.ip(), veth = %r.host_veth,
                "attachment is gone; releasing its address");
            if self.release(&r.key)?.is_some() {
                released += 1;
            }
        }
        let owned: HashSet<Ipv4Addr> = self.ipam.list()?.iter().filter_map(|r| r.ipv4()).collect();
        let endpoints = self
            .fwd
            .endpoints()
            .map_err(AgentError::dataplane(DataplaneOp::ListEndpoints))?;
        // A pending orphan's entry is a live pod's, kept until the orphan is adopted.
        for ip in endpoints
            .into_iter()
            .filter(|ip| !owned.contains(ip) && !self.is_pending_orphan(*ip))
        {
            warn!(%ip, "dataplane endpoint without an allocation; removing it");
            if let Err(e) = self.fwd.remove_endpoint(ip) {
                warn!(%ip, error = %e, "removing orphan endpoint failed");
            }
        }
        self.metrics.reconcile_released.inc_by(released as u64);
        Ok(released)
    }
}
