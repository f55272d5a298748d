//! Connects the service to the eBPF dataplane module.

use crate::config::{DaemonConfig, EndpointAttach};
use crate::service::{EndpointSpec, Forwarding};
use anyhow::Context as _;
use std::net::Ipv4Addr;
use vpcnet_api::CountersInfo;
use vpcnet_dataplane::{
    AttachMode, Dataplane, DataplaneConfig, Endpoint, PolicyMode, StartOptions, SyncStats,
};
use vpcnet_ipam::Ipam;
use vpcnet_policy::Compiled;

struct Ebpf(Dataplane);

impl Forwarding for Ebpf {
    fn add_endpoint(&mut self, ep: &EndpointSpec) -> Result<(), String> {
        self.0
            .add_endpoint(&Endpoint {
                ip: ep.ip,
                host_ifindex: ep.host_ifindex,
                pod_mac: ep.pod_mac,
                network_id: ep.network_id,
            })
            .map_err(|e| e.to_string())
    }
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), String> {
        self.0.remove_endpoint(ip).map_err(|e| e.to_string())
    }
    fn endpoints(&self) -> Result<Vec<Ipv4Addr>, String> {
        self.0
            .endpoints()
            .map(|v| v.into_iter().map(|e| e.ip).collect())
            .map_err(|e| e.to_string())
    }
    fn counters(&self) -> Result<CountersInfo, String> {
        self.0.counters().map_err(|e| e.to_string())
    }
    fn describe(&self) -> String {
        format!(
            "eBPF (uplink {:?}, endpoints {:?}, NetworkPolicy {})",
            self.0.attach_mode(),
            self.0.endpoint_attach_mode(),
            if self.enforces_policy() {
                "enforced"
            } else {
                "off: no cluster state configured"
            }
        )
    }
    fn health(&self) -> Result<(), String> {
        self.0.health().map_or(Ok(()), Err)
    }
    fn enforces_policy(&self) -> bool {
        self.0.policy_mode() == PolicyMode::Enforce
    }
    fn conntrack_pin(&self) -> Option<std::path::PathBuf> {
        Some(self.0.conntrack_pin())
    }
    fn applied_policy(&self) -> Option<&Compiled> {
        Some(self.0.applied_policy())
    }
    fn sync_policy(&mut self, new: &Compiled) -> Result<SyncStats, String> {
        self.0.sync_policy(new).map_err(|e| e.to_string())
    }
}

fn dataplane_config(config: &DaemonConfig) -> DataplaneConfig {
    let node = &config.node;
    DataplaneConfig {
        pin_dir: config.bpf_dir.clone(),
        uplink: config.uplink.clone(),
        networks: config.ipam.networks.clone(),
        local_pod_cidrs: config
            .ipam
            .networks
            .iter()
            .flat_map(|n| n.subnets.iter())
            .flat_map(|s| s.blocks.get(node).cloned().unwrap_or_default())
            .collect(),
    }
}

pub fn forwarding(config: &DaemonConfig, _ipam: &Ipam) -> anyhow::Result<Box<dyn Forwarding>> {
    let endpoint_attach = match config.endpoint_attach {
        EndpointAttach::Classic => AttachMode::Classic,
        EndpointAttach::Tcx => AttachMode::Tcx,
    };
    // Without a cluster state nothing can select a pod; with one, pods are closed until the
    // policy layer has described them.
    let policy = if config.manifests_dir.is_some() {
        PolicyMode::Enforce
    } else {
        PolicyMode::Open
    };
    let dp = Dataplane::start_with(
        dataplane_config(config),
        StartOptions {
            endpoint_attach,
            policy,
        },
    )?;
    Ok(Box::new(Ebpf(dp)))
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
