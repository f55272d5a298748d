//! The agent's port to the forwarding layer: the eBPF dataplane (`crate::ebpf_glue`), or
//! nothing at all (kernel routes). Implementations are shared by every request at once and keep
//! their own locks, as the dataplane does.

use std::net::Ipv4Addr;
use vpcnet_api::CountersInfo;
use vpcnet_dataplane::{DataplaneError, SyncStats};
use vpcnet_ipam::{Endpoint, Wiring};
use vpcnet_policy::Compiled;

#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// A store endpoint as the dataplane forwards it: wired, with an IPv4 address (the dataplane
/// forwards IPv4 only today), and the id its network has in the topology in force.
#[derive(Debug, Clone, Copy)]
pub struct DataplaneEndpoint<'a> {
    endpoint: &'a Endpoint,
    ip: Ipv4Addr,
    wiring: Wiring,
    network_id: u16,
}

impl<'a> DataplaneEndpoint<'a> {
    /// `None` when the endpoint has no IPv4 address or is not wired yet.
    pub fn new(endpoint: &'a Endpoint, network_id: u16) -> Option<Self> {
        Some(DataplaneEndpoint {
            endpoint,
            ip: endpoint.ipv4()?,
            wiring: endpoint.wiring?,
            network_id,
        })
    }

    pub fn endpoint(&self) -> &'a Endpoint {
        self.endpoint
    }

    /// The address forwarded: the endpoint's first IPv4 address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn wiring(&self) -> Wiring {
        self.wiring
    }

    pub fn network_id(&self) -> u16 {
        self.network_id
    }
}

/// The forwarding layer as the agent sees it.
pub trait Forwarding: Send + Sync {
    fn add_endpoint(&self, ep: &DataplaneEndpoint<'_>) -> Result<(), ForwardingError>;
    fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<(), ForwardingError>;
    fn endpoints(&self) -> Result<Vec<Ipv4Addr>, ForwardingError>;
    fn counters(&self) -> Result<CountersInfo, ForwardingError>;
    fn describe(&self) -> String;
    /// What is wrong with the installed dataplane now (cheap: called by every STATUS and
    /// /healthz).
    fn health(&self) -> Option<String> {
        None
    }
    /// Whether NetworkPolicy is enforced (the eBPF dataplane with a cluster state source).
    fn enforces_policy(&self) -> bool {
        false
    }
    /// Where the conntrack map is pinned (walked outside any dataplane lock).
    fn conntrack_pin(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// A copy of what the policy maps hold now. Asked for once per daemon run, to seed the
    /// policy compiler with the identities the maps already use.
    fn applied_policy(&self) -> Option<Compiled> {
        None
    }
    /// Takes the policy maps to `new` without a moment of wider access.
    fn sync_policy(&self, _new: &Compiled) -> Result<SyncStats, ForwardingError> {
        Ok(SyncStats::default())
    }
    /// Takes routes, peers and masquerade exclusions to a new topology, live. Kernel routes
    /// have nothing to program: the plugin's per-pod host routes do not depend on it.
    fn apply_topology(
        &self,
        _networks: &[vpcnet_ipam::NetworkConfig],
        _local_pod_cidrs: &[ipnetwork::IpNetwork],
    ) -> Result<(), ForwardingError> {
        Ok(())
    }
}

/// Plain kernel routing: the plugin's host routes do the forwarding; nothing to program.
pub struct KernelRoutes;

impl Forwarding for KernelRoutes {
    fn add_endpoint(&self, _: &DataplaneEndpoint<'_>) -> Result<(), ForwardingError> {
        Ok(())
    }
    fn remove_endpoint(&self, _: Ipv4Addr) -> Result<(), ForwardingError> {
        Ok(())
    }
    fn endpoints(&self) -> Result<Vec<Ipv4Addr>, ForwardingError> {
        Ok(Vec::new())
    }
    fn counters(&self) -> Result<CountersInfo, ForwardingError> {
        Ok(CountersInfo {
            endpoints: Vec::new(),
            drops: Vec::new(),
            node: Vec::new(),
            conntrack: None,
        })
    }
    fn describe(&self) -> String {
        "kernel routes (no eBPF)".into()
    }
}
