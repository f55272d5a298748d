//! Connects the agent to the eBPF dataplane module.

use crate::agent::{DataplaneEndpoint, Forwarding, ForwardingError, Orphan};
use crate::config::{DaemonConfig, EndpointAttach};
use anyhow::Context as _;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use vpcnet_api::{CountersInfo, EndpointCounters};
use vpcnet_dataplane::{
    AttachMode, Dataplane, DataplaneConfig, Endpoint, PolicyMode, StartOptions, SyncStats,
};
use vpcnet_ipam::Ipam;
use vpcnet_policy::Compiled;

/// The dataplane behind the agent's `Forwarding` port: `Sync` with its own locks, so the port
/// just calls it.
struct Ebpf {
    dp: Dataplane,
}

impl Forwarding for Ebpf {
    fn add_endpoint(&self, ep: &DataplaneEndpoint<'_>) -> Result<(), ForwardingError> {
        let wiring = ep.wiring();
        Ok(self.dp.add_endpoint(&Endpoint {
            ip: ep.ip(),
            host_ifindex: wiring.host_ifindex,
            pod_mac: wiring.pod_mac,
            network_id: ep.network_id(),
        })?)
    }
    fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<(), ForwardingError> {
        Ok(self.dp.remove_endpoint(ip)?)
    }
    fn endpoints(&self) -> Result<Vec<Ipv4Addr>, ForwardingError> {
        Ok(self.dp.endpoints()?.into_iter().map(|e| e.ip).collect())
    }
    fn counters(&self) -> Result<CountersInfo, ForwardingError> {
        let c = self.dp.counters()?;
        Ok(CountersInfo {
            endpoints: c
                .endpoints
                .into_iter()
                .map(|e| EndpointCounters {
                    ip: e.ip.into(),
                    rx_packets: e.rx_packets,
                    rx_bytes: e.rx_bytes,
                    tx_packets: e.tx_packets,
                    tx_bytes: e.tx_bytes,
                })
                .collect(),
            drops: c.drops,
            node: c.node,
            // Filled in by the agent from the pinned map: see `conntrack_pin`.
            conntrack: None,
        })
    }
    fn describe(&self) -> String {
        format!(
            "eBPF (uplink {:?}, endpoints {:?}, NetworkPolicy {})",
            self.dp.attach_mode(),
            self.dp.endpoint_attach_mode(),
            if self.enforces_policy() {
                "enforced"
            } else {
                "off: no cluster state configured"
            }
        )
    }
    fn health(&self) -> Option<String> {
        self.dp.health()
    }
    fn enforces_policy(&self) -> bool {
        self.dp.policy_mode() == PolicyMode::Enforce
    }
    fn conntrack_pin(&self) -> Option<std::path::PathBuf> {
        Some(self.dp.conntrack_pin())
    }
    fn applied_policy(&self) -> Option<Compiled> {
        Some(self.dp.applied_policy().clone())
    }
    fn apply_topology(
        &self,
        networks: &[vpcnet_ipam::NetworkConfig],
        local_pod_cidrs: &[ipnetwork::IpNetwork],
    ) -> Result<(), ForwardingError> {
        Ok(self.dp.apply_topology(networks, local_pod_cidrs)?)
    }
    fn sync_policy(&self, new: &Compiled) -> Result<SyncStats, ForwardingError> {
        Ok(self.dp.sync_policy(new)?)
    }
}

/// `live`: the addresses of the store's endpoints, routed also when their block left the
/// topology.
fn dataplane_config(config: &DaemonConfig, live: Vec<std::net::IpAddr>) -> DataplaneConfig {
    DataplaneConfig {
        pin_dir: config.bpf_dir.clone(),
        uplink: config.uplink.clone(),
        networks: config.ipam.networks.clone(),
        local_pod_cidrs: crate::topology::local_pod_cidrs(&config.ipam, &config.node, live),
    }
}

/// The endpoints to restore: the store's endpoints (the durable list) whose host veth is on the
/// node, with the wiring the store recorded when they became ready. An endpoint recorded by a
/// release that did not store its wiring (a store migrated from schema 1) takes its pod MAC from
/// the pinned map's record, readable across record layouts (see `pinned_endpoints`). One without
/// any known MAC is left out: its pod was never wired to the dataplane (the plugin's ADD failed
/// before), and the agent's reconcile handles it like a pod without an endpoint.
fn durable_endpoints(config: &DaemonConfig, ipam: &Ipam) -> anyhow::Result<Vec<Endpoint>> {
    let records = ipam.list().context("listing allocations")?;
    let pinned: BTreeMap<Ipv4Addr, Endpoint> = if records.iter().all(|r| r.wiring.is_some()) {
        BTreeMap::new()
    } else {
        match vpcnet_dataplane::pinned_endpoints(&config.bpf_dir) {
            Ok(eps) => eps.into_iter().map(|e| (e.ip, e)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "pinned endpoint records unreadable");
                BTreeMap::new()
            }
        }
    };
    let mut out = Vec::new();
    for r in records {
        // The dataplane forwards IPv4 only, for now.
        let Some(ip) = r.ipv4() else { continue };
        let Some(host_ifindex) = ifindex(&r.host_veth) else {
            continue;
        };
        let Some(mac) = r
            .wiring
            .as_ref()
            .map(|w| w.pod_mac)
            .or_else(|| pinned.get(&ip).map(|e| e.pod_mac))
        else {
            tracing::warn!(%ip, "no pod MAC recorded for the endpoint; not restored");
            continue;
        };
        out.push(Endpoint {
            ip,
            host_ifindex,
            pod_mac: mac,
            network_id: r.network_id,
        });
    }
    Ok(out)
}

pub(crate) fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// What the pinned endpoint map says about each address: (host ifindex, pod MAC, network id).
/// Empty when there is no map (a fresh node) or it cannot be read.
pub fn pinned_wiring(config: &DaemonConfig) -> BTreeMap<Ipv4Addr, (u32, [u8; 6], u16)> {
    match vpcnet_dataplane::pinned_endpoints(&config.bpf_dir) {
        Ok(eps) => eps
            .into_iter()
            .map(|e| (e.ip, (e.host_ifindex, e.pod_mac, e.network_id)))
            .collect(),
        Err(_) => BTreeMap::new(),
    }
}

/// `orphans`: live pods' addresses the store lost (see `crate::agent::Orphan`); their entries
/// are kept (those with a known MAC restored) until the agent has adopted them.
pub fn forwarding(
    config: &DaemonConfig,
    ipam: &Ipam,
    orphans: &[Orphan],
) -> anyhow::Result<Box<dyn Forwarding>> {
    let endpoint_attach = match config.endpoint_attach {
        EndpointAttach::Classic => AttachMode::Classic,
        EndpointAttach::Tcx => AttachMode::Tcx,
    };
    // Without a cluster state nothing can select a pod; with one, pods are closed until the
    // policy layer has described them.
    let policy = if config.has_cluster_state() {
        PolicyMode::Enforce
    } else {
        PolicyMode::Open
    };
    let mut endpoints = durable_endpoints(config, ipam)?;
    endpoints.extend(orphans.iter().filter_map(|o| {
        let w = o.wiring?;
        Some(Endpoint {
            ip: o.ip,
            host_ifindex: w.host_ifindex,
            pod_mac: w.pod_mac,
            network_id: o.network_id?,
        })
    }));
    let live = ipam
        .list()
        .context("listing allocations")?
        .iter()
        .flat_map(|ep| ep.ips().collect::<Vec<_>>())
        .chain(orphans.iter().map(|o| std::net::IpAddr::V4(o.ip)))
        .collect();
    let (dp, report) = Dataplane::start_restoring(
        dataplane_config(config, live),
        StartOptions {
            endpoint_attach,
            policy,
        },
        &endpoints,
    )?;
    for (ip, why) in &report.skipped {
        tracing::warn!(%ip, reason = %why, "endpoint not restored");
    }
    tracing::info!(
        written = report.written.len(),
        kept = report.kept.len(),
        removed = report.removed.len(),
        recreated_maps = ?report.recreated_maps,
        "endpoints restored from the store"
    );
    Ok(Box::new(Ebpf { dp }))
}

pub fn uninstall_node(config: &DaemonConfig) -> anyhow::Result<()> {
    vpcnet_dataplane::uninstall(&config.bpf_dir, &config.uplink)
        .map_err(|errors| {
            let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            anyhow::anyhow!(
                "uninstall finished with {} error(s): {}",
                errors.len(),
                text.join("; ")
            )
        })
        .context("removing the dataplane")?;
    println!(
        "vpcnet dataplane removed from this node ({} and nftables table)",
        config.bpf_dir.display()
    );
    Ok(())
}
