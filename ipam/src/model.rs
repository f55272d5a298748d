//! The configuration model of virtual networks (VPCs) and their subnets.

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// An inclusive range of addresses that IPAM never hands out (e.g. addresses used by VPC appliances).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    pub name: String,
    pub cidr: Ipv4Network,
    /// The subnet's router (never allocated); defaults to the first host address.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub reserved: Vec<IpRange>,
    /// Blocks of this subnet owned by each node (standalone mode). Keyed by node name.
    #[serde(default)]
    pub blocks: BTreeMap<String, Vec<Ipv4Network>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub name: String,
    /// Small numeric identity carried in the dataplane's maps (1..=65535), unique per network.
    pub id: u16,
    /// CIDRs routed directly (no SNAT) from this network's pods: the VPC's own ranges and any
    /// physical-cloud ranges reachable through the VPC router.
    #[serde(default)]
    pub routable_cidrs: Vec<Ipv4Network>,
    /// Destinations never masqueraded even though not in `routable_cidrs`.
    #[serde(default)]
    pub masquerade_exclude: Vec<Ipv4Network>,
    /// Other virtual networks whose pods may talk to this one's.
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default)]
    pub default_subnet: Option<String>,
    pub subnets: Vec<SubnetConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamConfig {
    pub networks: Vec<NetworkConfig>,
    /// Network used when a request names none; defaults to the first one.
    #[serde(default)]
    pub default_network: Option<String>,
    /// Seconds a released address rests before it is handed out again.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
}

fn default_cooldown() -> u64 {
    30
}
