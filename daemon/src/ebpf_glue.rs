//! Connects the service to the eBPF dataplane module.

use crate::config::DaemonConfig;
use crate::service::Forwarding;
use vpcnet_ipam::Ipam;

pub fn forwarding(_config: &DaemonConfig, _ipam: &Ipam) -> anyhow::Result<Box<dyn Forwarding>> {
    anyhow::bail!("the eBPF dataplane is not wired in yet")
}

pub fn uninstall_node(_config: &DaemonConfig) -> anyhow::Result<()> {
    anyhow::bail!("the eBPF dataplane is not wired in yet")
}
