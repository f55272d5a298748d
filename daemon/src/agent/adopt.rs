//! Endpoints the node still serves when the store has no record of them.
//!
//! A store lost or replaced while pods ran (a wiped state directory, a corrupt file moved
//! aside) would otherwise hand a live pod's address to the next pod and tear down the pod's
//! dataplane entry as an orphan. The node itself remembers: the plugin routes every pod's
//! address to its host veth (a /32 in the node namespace), and the pinned endpoint map holds
//! the pod's MAC. At start the daemon collects such addresses ([`Orphan`]); once the topology
//! says which subnet each is in, they are recorded under an adopted key
//! ([`AttachmentKey::adopted`]), and the first runtime call for the attachment whose veth it
//! is (ADD retry, CHECK, DEL, GC) takes the endpoint over under its real key. Until every
//! orphan is settled, ADD answers "try again": the next pod could otherwise get a live pod's
//! address.

use super::{Agent, AgentError, DataplaneEndpoint, DataplaneOp};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{info, warn};
use vpcnet_ipam::{Assigned, AttachmentKey, Endpoint, IpamConfig, Lifecycle, PodInfo, Wiring};

/// A live pod's address the store does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub ip: Ipv4Addr,
    pub host_veth: String,
    /// From the pinned endpoint map, when it still had the pod.
    pub wiring: Option<Wiring>,
    /// The network id the pinned map had, used until the topology is known.
    pub network_id: Option<u16>,
}

/// The orphans among the node's host routes: a /32 to a vpcnet host veth whose address no
/// endpoint of the store holds. `pinned` is what the pinned endpoint map says about addresses
/// (ifindex, MAC, network id); it counts only when its interface is the route's.
pub fn orphans(
    routes: &[(Ipv4Addr, String)],
    held: &std::collections::HashSet<IpAddr>,
    pinned: &std::collections::BTreeMap<Ipv4Addr, (u32, [u8; 6], u16)>,
    ifindex: impl Fn(&str) -> Option<u32>,
) -> Vec<Orphan> {
    let mut out: Vec<Orphan> = Vec::new();
    for (ip, dev) in routes {
        if !vpcnet_api::is_host_veth_name(dev)
            || held.contains(&IpAddr::V4(*ip))
            || out.iter().any(|o| o.ip == *ip)
        {
            continue;
        }
        let pin = pinned
            .get(ip)
            .filter(|(index, _, _)| ifindex(dev) == Some(*index));
        out.push(Orphan {
            ip: *ip,
            host_veth: dev.clone(),
            wiring: pin.map(|(index, mac, _)| Wiring {
                host_ifindex: *index,
                pod_mac: *mac,
            }),
            network_id: pin.map(|(_, _, id)| *id),
        });
    }
    out
}

impl Agent {
    /// Starts the agent with the orphans found on the node; ADD waits until they are settled.
    pub fn with_orphans(self, orphans: Vec<Orphan>) -> Agent {
        let adopted_in_store = self
            .ipam
            .list()
            .map(|l| l.iter().any(|e| e.key.is_adopted()))
            .unwrap_or(true);
        if !orphans.is_empty() {
            warn!(
                count = orphans.len(),
                "live pods' addresses the IPAM store has no record of (store lost or replaced?); re-adopting them"
            );
        }
        self.adopted
            .store(adopted_in_store || !orphans.is_empty(), Ordering::Relaxed);
        *self.orphans.lock().unwrap_or_else(PoisonError::into_inner) = orphans;
        self
    }

    /// Addresses of live pods not yet recorded (see the module doc).
    pub fn orphans_pending(&self) -> usize {
        self.orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn pending_orphan_ips(&self) -> Vec<Ipv4Addr> {
        self.orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|o| o.ip)
            .collect()
    }

    pub(crate) fn is_pending_orphan(&self, ip: Ipv4Addr) -> bool {
        self.orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|o| o.ip == ip)
    }

    /// Records the orphans the topology in force can place; returns how many were adopted.
    /// Without any network yet (Kubernetes, before the first VirtualNetwork) they wait. An
    /// address in no subnet of a topology that has networks is given up: nothing could have
    /// allocated it.
    pub fn adopt_orphans(&self) -> usize {
        let mut pending = self.orphans.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.is_empty() {
            return 0;
        }
        let topology = self.ipam.config();
        if topology.networks.is_empty() {
            return 0;
        }
        let state = self.state.as_ref().and_then(|s| s.snapshot().ok());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut adopted = 0;
        for o in pending.drain(..) {
            let Some((assigned, network_id)) = place(&topology, o.ip) else {
                warn!(ip = %o.ip, veth = %o.host_veth,
                    "routed to a pod but in no subnet of the topology; not adopted");
                continue;
            };
            let pod = state
                .as_ref()
                .and_then(|s| s.pod_by_ip(o.ip))
                .filter(|p| p.node.as_deref() == Some(self.ipam.node()))
                .map(|p| PodInfo {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    ..Default::default()
                })
                .unwrap_or_default();
            let ep = Endpoint {
                key: AttachmentKey::adopted(&o.host_veth),
                pod,
                addresses: vec![assigned],
                host_veth: o.host_veth.clone(),
                network_id,
                wiring: o.wiring,
                state: if o.wiring.is_some() {
                    Lifecycle::Wired
                } else {
                    Lifecycle::Allocated
                },
                created_unix_ms: now_ms,
            };
            match self.adopt_one(&ep) {
                Ok(true) => {
                    adopted += 1;
                    info!(ip = %o.ip, veth = %o.host_veth, pod = %format!("{}/{}", ep.pod.namespace, ep.pod.name),
                        wired = o.wiring.is_some(), "re-adopted a live pod's address");
                }
                Ok(false) => {}
                Err(e) => warn!(ip = %o.ip, error = %e, "re-adopting a live pod's address failed"),
            }
        }
        self.adopted.store(true, Ordering::Relaxed);
        self.policy.dirty.notify_one();
        if let Some(supply) = &self.supply {
            supply.changed();
        }
        adopted
    }

    fn adopt_one(&self, ep: &Endpoint) -> Result<bool, AgentError> {
        if !self.ipam.adopt(ep)? {
            return Ok(false);
        }
        // Its dataplane entry was kept by the restore; written again so it carries this
        // topology's network id. Without a MAC it cannot be forwarded: the address stays held
        // while the veth lives, and the pod is served again once recreated.
        if let Some(dp) = DataplaneEndpoint::new(ep, ep.network_id) {
            self.fwd
                .add_endpoint(&dp)
                .map_err(AgentError::dataplane(DataplaneOp::Install(dp.ip())))?;
            let revision = self.policy.lock().generation.unwrap_or(0);
            self.ipam.mark_ready(&ep.key, revision)?;
        }
        Ok(true)
    }

    /// Gives the runtime's attachment `key` the endpoint adopted for its veth, if there is one
    /// and the key holds nothing yet. Free on a node that never adopted anything.
    pub(crate) fn take_over_adopted(&self, key: &AttachmentKey) -> Result<(), AgentError> {
        if !self.adopted.load(Ordering::Relaxed) || key.is_adopted() {
            return Ok(());
        }
        if self.ipam.get(key)?.is_some() {
            return Ok(());
        }
        let from =
            AttachmentKey::adopted(&vpcnet_api::host_veth_name(&key.container_id, &key.ifname));
        if let Some(ep) = self.ipam.rekey(&from, key)? {
            info!(container = %key.container_id, ifname = %key.ifname, ip = %ep.ip(),
                "the runtime's attachment took over its re-adopted endpoint");
        }
        Ok(())
    }
}

/// The subnet an address is in, as the store records it, and its network's id.
fn place(topology: &IpamConfig, ip: Ipv4Addr) -> Option<(Assigned, u16)> {
    let ip = IpAddr::V4(ip);
    topology.networks.iter().find_map(|n| {
        n.subnets.iter().find(|s| s.cidr.contains(ip)).map(|s| {
            (
                Assigned {
                    ip,
                    prefix_len: s.cidr.prefix(),
                    network: n.name.clone(),
                    subnet: s.name.clone(),
                },
                n.id,
            )
        })
    })
}
