//! One attachment's life: ADD allocates, the plugin reports it ready once wired, DEL (or GC, or
//! reconcile) releases it; CHECK compares.

use super::{Agent, AgentError, DataplaneEndpoint, DataplaneOp};
use crate::state::cluster_state;
use crate::state::source::{StateError, StateSource};
use crate::wire;
use std::collections::HashSet;
use std::net::IpAddr;
use tracing::{info, warn};
use vpcnet_api::{AllocateRequest, CheckRequest, EndpointReadyRequest, GcRequest};
use vpcnet_ipam::{AllocRequest, AttachmentKey, Endpoint, IpamError, Wiring};

impl Agent {
    pub fn allocate(&self, req: &AllocateRequest) -> Result<Endpoint, AgentError> {
        let _span = tracing::info_span!("allocate", container = %req.key.container_id, ifname = %req.key.ifname,
            pod = %format!("{}/{}", req.pod.namespace, req.pod.name)).entered();
        let addressing = match &self.state {
            Some(source) => addressing_from(source.as_ref(), req)?,
            None => Default::default(),
        };
        let annotated_ip = match &addressing.ip {
            Some(text) => Some(
                text.parse::<IpAddr>()
                    .map_err(|_| AgentError::BadAnnotation {
                        namespace: req.pod.namespace.clone(),
                        name: req.pod.name.clone(),
                        value: text.clone(),
                    })?,
            ),
            None => None,
        };
        if req.static_ips.len() > 1 {
            return Err(AgentError::TooManyStaticIps(req.static_ips.len()));
        }
        let static_ip = req.static_ips.first().copied().or(annotated_ip);
        let subnet = self.placed_subnet(req, addressing.subnet)?;
        self.consume_queued_release(&req.key)?;
        let (key, pod) = (wire::key(&req.key), wire::pod(&req.pod));
        // A retried ADD of a live pod whose endpoint was re-adopted gets it back; any other ADD
        // waits until no live pod's address is unrecorded.
        self.take_over_adopted(&key)?;
        let pending = self.orphans_pending();
        if pending > 0 && self.ipam.get(&key)?.is_none() {
            return Err(AgentError::Adopting(pending));
        }
        if let (Some(supply), Some(ip)) = (&self.supply, static_ip)
            && !req.pod.name.is_empty()
        {
            let net = self.ipam.network(req.network.as_deref())?;
            let sub = subnet.clone().or_else(|| {
                net.subnets
                    .iter()
                    .find(|s| s.cidr.contains(ip))
                    .map(|s| s.name.clone())
            });
            // Outside every subnet: IPAM refuses it below, with the subnets it could be in.
            if let Some(sub) = sub {
                supply.claim_address_now(&net.name, &sub, ip, &req.pod.namespace, &req.pod.name)?;
            }
        }
        let alloc = || {
            self.ipam.allocate(&AllocRequest {
                key: &key,
                pod: &pod,
                network: req.network.as_deref(),
                subnet: subnet.as_deref(),
                static_ip,
                host_veth: &req.host_veth,
            })
        };
        let record = match (alloc(), &self.supply) {
            // The node's blocks are full (or cooling down): claim one more and allocate from it.
            (
                Err(
                    IpamError::Exhausted {
                        network, subnet, ..
                    }
                    | IpamError::NoBlocks {
                        network, subnet, ..
                    },
                ),
                Some(supply),
            ) if static_ip.is_none() => {
                info!(%network, %subnet, "no room in this node's blocks; claiming a block");
                supply.claim_block_now(&network, &subnet).inspect_err(|_| {
                    self.metrics.alloc_failures.inc();
                })?;
                alloc()
            }
            (r, _) => r,
        }
        .inspect_err(|_| {
            self.metrics.alloc_failures.inc();
        })?;
        if let Some(supply) = &self.supply {
            supply.changed();
        }
        self.metrics.allocations.inc();
        info!(ip = %record.ip(), subnet = %record.subnet(), "allocated");
        Ok(record)
    }

    /// The subnet the pod's annotations name, else (on Kubernetes) the one a Subnet's namespace
    /// selector gives its namespace, else `None` (the network's default subnet).
    fn placed_subnet(
        &self,
        req: &AllocateRequest,
        annotated: Option<String>,
    ) -> Result<Option<String>, AgentError> {
        let (Some(supply), Some(source), None) = (&self.supply, &self.state, &annotated) else {
            return Ok(annotated);
        };
        let Some(ns) = source
            .namespace(&req.pod.namespace)
            .map_err(AgentError::NotSynced)?
        else {
            return Ok(None);
        };
        let Some((network, subnet)) = supply.subnet_for_namespace(&ns.labels) else {
            return Ok(None);
        };
        // A selector places pods only within the network the request is for.
        let wanted = match &req.network {
            Some(n) => n.clone(),
            None => match self.ipam.network(None) {
                Ok(n) => n.name,
                Err(_) => return Ok(None),
            },
        };
        Ok((wanted == network).then_some(subnet))
    }

    /// Records the endpoint's wiring, brings the policy up to it and installs it in the
    /// dataplane; it is then ready, under the policy generation the last sync applied.
    pub fn endpoint_ready(&self, req: &EndpointReadyRequest) -> Result<(), AgentError> {
        let _span = tracing::info_span!("endpoint_ready", container = %req.key.container_id, ifname = %req.key.ifname).entered();
        let key = wire::key(&req.key);
        self.take_over_adopted(&key)?;
        let mut record = self
            .ipam
            .get(&key)?
            .ok_or_else(|| AgentError::UnknownAttachment(key.clone()))?;
        if !same_ips(&record, &req.ips) {
            return Err(AgentError::AddressMismatch {
                reported: req.ips.clone(),
                allocated: record.ips().collect(),
            });
        }
        let ipv6_only = |record: &Endpoint| AgentError::Ipv6Only {
            key: key.clone(),
            ips: record.ips().collect(),
        };
        if record.ipv4().is_none() {
            return Err(ipv6_only(&record));
        }
        let network_id = self.ipam.network(Some(record.network()))?.id;
        let wiring = Wiring {
            host_ifindex: req.host_ifindex,
            pod_mac: req.pod_mac,
        };
        // Durable before the dataplane entry exists: a restarted daemon rebuilds the entry from
        // the store.
        self.ipam.mark_wired(&key, wiring)?;
        record.wiring = Some(wiring);
        // The pod's policy (and its address's identity for everyone else) goes in before its
        // endpoint: isolated from the first packet. If it cannot, the endpoint is installed
        // closed and the sync loop opens it when the cluster state is back.
        if let Err(e) = self.sync_policy() {
            warn!(error = %e, "NetworkPolicy not updated for the new pod; it stays closed until the next successful sync");
        }
        // Wired just above; without an IPv4 address it was refused before.
        let Some(ep) = DataplaneEndpoint::new(&record, network_id) else {
            return Err(ipv6_only(&record));
        };
        self.fwd
            .add_endpoint(&ep)
            .map_err(AgentError::dataplane(DataplaneOp::Install(ep.ip())))?;
        // The policy revision the endpoint was installed under: the cluster state generation
        // the last sync applied (0 without a cluster state source).
        let revision = self.policy.lock().generation.unwrap_or(0);
        self.ipam.mark_ready(&key, revision)?;
        Ok(())
    }

    /// Removes the dataplane entry before the address is freed, so an address can never be
    /// handed to a new pod while the old pod's entry still points at a dead interface. Returns
    /// the endpoint released, `None` when there was none (a repeated DEL).
    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Endpoint>, AgentError> {
        let _span =
            tracing::info_span!("release", container = %key.container_id, ifname = %key.ifname)
                .entered();
        self.take_over_adopted(key)?;
        let Some(record) = self.ipam.get(key)? else {
            return Ok(None);
        };
        // Marked first, so a daemon restarted mid-release does not rebuild the entry.
        self.ipam.mark_releasing(key)?;
        if let Some(ip) = record.ipv4() {
            self.fwd
                .remove_endpoint(ip)
                .map_err(AgentError::dataplane(DataplaneOp::Remove(ip)))?;
        }
        let released = self.ipam.release(key)?;
        if let Some(r) = &released {
            self.metrics.releases.inc();
            info!(ip = %r.ip(), "released");
            if let Some(supply) = &self.supply {
                supply.changed();
            }
            // Its rules and identity go with the next sync; the endpoint entry is gone already.
            self.policy.dirty.notify_one();
        }
        Ok(released)
    }

    pub fn check(&self, req: &CheckRequest) -> Result<(), AgentError> {
        let key = wire::key(&req.key);
        self.take_over_adopted(&key)?;
        match self.ipam.get(&key)? {
            // The lifecycle is not checked: "ready" is not fsync'd (see `Ipam::mark_ready`), and
            // the plugin has already verified the interfaces themselves.
            Some(r) if same_ips(&r, &req.ips) => Ok(()),
            Some(r) => Err(AgentError::CheckMismatch {
                held: r.ips().collect(),
                checked: req.ips.clone(),
            }),
            None => Err(AgentError::CheckUnknown(key)),
        }
    }

    /// Releases every endpoint (of `req.network`, if set) that is not in `req.valid`, going on
    /// past failures; returns what it released.
    pub fn gc(&self, req: &GcRequest) -> Result<Vec<Endpoint>, AgentError> {
        let valid: HashSet<AttachmentKey> = req.valid.iter().map(wire::key).collect();
        // A valid attachment whose endpoint was re-adopted keeps it, under its own key.
        for key in &valid {
            self.take_over_adopted(key)?;
        }
        let doomed: Vec<Endpoint> = self
            .ipam
            .list()?
            .into_iter()
            .filter(|r| !valid.contains(&r.key))
            .filter(|r| req.network.as_deref().is_none_or(|n| n == r.network()))
            .collect();
        let mut released = Vec::new();
        let mut failed = Vec::new();
        // Keep going past errors: GC must collect what it can.
        for r in doomed {
            match self.release(&r.key) {
                Ok(Some(a)) => released.push(a),
                Ok(None) => {}
                Err(e) => failed.push(e),
            }
        }
        self.metrics.gc_released.inc_by(released.len() as u64);
        if failed.is_empty() {
            Ok(released)
        } else {
            Err(AgentError::GcIncomplete {
                released: released.len(),
                failed,
            })
        }
    }
}

/// The pod's addressing from the watched state (a lookup, no file I/O and no copy of the state
/// on the ADD path). Until the source has synced, the ADD is refused as "try again": placing the
/// pod now would ignore its annotations (the default subnet instead of its own) and start it
/// without knowing which policies isolate it.
fn addressing_from(
    source: &dyn StateSource,
    req: &AllocateRequest,
) -> Result<cluster_state::PodAddressing, AgentError> {
    if !source.synced() {
        return Err(AgentError::NotSynced(source.snapshot().err().unwrap_or(
            StateError::NotSynced {
                origin: source.origin(),
                cause: None,
            },
        )));
    }
    if req.pod.name.is_empty() {
        return Ok(Default::default());
    }
    let pod = source
        .pod(&req.pod.namespace, &req.pod.name)
        .map_err(AgentError::NotSynced)?;
    if pod.is_none() && source.has_every_pod() {
        let origin = source.origin();
        return Err(AgentError::NotSynced(StateError::NotSynced {
            origin: origin.clone(),
            cause: Some(Box::new(StateError::Watch {
                origin,
                reason: format!(
                    "pod {}/{} is not in the watched state yet",
                    req.pod.namespace, req.pod.name
                ),
            })),
        }));
    }
    let ns = source
        .namespace(&req.pod.namespace)
        .map_err(AgentError::NotSynced)?;
    Ok(cluster_state::pod_addressing(pod.as_deref(), ns.as_deref()))
}

/// Whether the endpoint holds exactly `ips` (in any order).
fn same_ips(r: &Endpoint, ips: &[IpAddr]) -> bool {
    let mut held: Vec<IpAddr> = r.ips().collect();
    let mut want = ips.to_vec();
    held.sort();
    want.sort();
    held == want
}
