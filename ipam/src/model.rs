//! The configuration model of virtual networks (VPCs) and their subnets.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An inclusive range of addresses that IPAM never hands out (e.g. addresses used by VPC appliances).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRange {
    pub start: IpAddr,
    pub end: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    pub name: String,
    /// IPv4 or IPv6; the subnet's blocks, gateway and reserved ranges are of the same family.
    pub cidr: IpNetwork,
    /// The subnet's router (never allocated); defaults to the first host address.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub reserved: Vec<IpRange>,
    /// Blocks of this subnet owned by each node (standalone mode). Keyed by node name.
    #[serde(default)]
    pub blocks: BTreeMap<String, Vec<IpNetwork>>,
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
    pub routable_cidrs: Vec<IpNetwork>,
    /// Destinations never masqueraded even though not in `routable_cidrs`.
    #[serde(default)]
    pub masquerade_exclude: Vec<IpNetwork>,
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
    /// Empty in Kubernetes mode until VirtualNetwork and Subnet objects exist.
    #[serde(default)]
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

impl Default for IpamConfig {
    fn default() -> Self {
        IpamConfig {
            networks: Vec::new(),
            default_network: None,
            cooldown_secs: default_cooldown(),
        }
    }
}

/// An address as a number in one space for both families: IPv4 addresses are placed at their
/// IPv4-mapped IPv6 position (`::ffff:a.b.c.d`), so ranges of either family compare and sort
/// without a separate code path, and the allocator's arithmetic is the same for both.
pub(crate) fn ord(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The inverse of [`ord`] for an address of the given family.
pub(crate) fn addr_of(v4: bool, n: u128) -> IpAddr {
    if v4 {
        // Only called with numbers inside an IPv4 range, whose high bits are the mapped prefix.
        IpAddr::V4(Ipv4Addr::from((n & u128::from(u32::MAX)) as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

/// The inclusive range of `net` in [`ord`] numbers.
pub(crate) fn range_of(net: IpNetwork) -> (u128, u128) {
    let lo = ord(net.network());
    let hosts = match net {
        IpNetwork::V4(n) => u128::from(u32::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0)),
        IpNetwork::V6(n) => u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0),
    };
    (lo, lo.saturating_add(hosts))
}

/// The subnet's router when none is configured: the first host address.
fn first_host(cidr: IpNetwork) -> IpAddr {
    addr_of(cidr.is_ipv4(), range_of(cidr).0.saturating_add(1))
}

fn is_canonical(net: IpNetwork) -> bool {
    net.ip() == net.network()
}

fn same_family(a: IpAddr, b: IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// The smallest subnet prefix that leaves room for pods after the infrastructure addresses.
fn max_prefix(cidr: IpNetwork) -> u8 {
    if cidr.is_ipv4() { 30 } else { 126 }
}

/// A name ends up inside `network/subnet` labels, metric labels and log lines, so it must be
/// non-empty and free of separators and whitespace.
fn bad_name(name: &str) -> bool {
    name.is_empty()
        || name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
}

impl SubnetConfig {
    /// The address never handed to a pod because the VPC router answers on it.
    pub fn effective_gateway(&self) -> IpAddr {
        self.gateway.unwrap_or_else(|| first_host(self.cidr))
    }

    /// The blocks `node` allocates from (empty when the node owns none in this subnet).
    pub fn node_blocks(&self, node: &str) -> &[IpNetwork] {
        self.blocks.get(node).map(Vec::as_slice).unwrap_or(&[])
    }
}

impl NetworkConfig {
    pub fn subnet(&self, name: &str) -> Option<&SubnetConfig> {
        self.subnets.iter().find(|s| s.name == name)
    }

    /// `default_subnet`, else the first subnet.
    pub fn default_subnet(&self) -> Option<&SubnetConfig> {
        match &self.default_subnet {
            Some(name) => self.subnet(name),
            None => self.subnets.first(),
        }
    }
}

impl IpamConfig {
    pub fn network(&self, name: &str) -> Option<&NetworkConfig> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// `default_network`, else the first network.
    pub fn default_network(&self) -> Option<&NetworkConfig> {
        match &self.default_network {
            Some(name) => self.network(name),
            None => self.networks.first(),
        }
    }

    /// `Err(InvalidConfig)` listing every problem, so a daemon can refuse a bad file at load.
    pub fn validate(&self) -> Result<(), crate::IpamError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(crate::IpamError::InvalidConfig(problems.join("; ")))
        }
    }

    /// Every problem in the configuration, one sentence each; empty when it is usable.
    ///
    /// All problems are reported at once so an operator fixes the file in one round instead of
    /// one restart per mistake.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let names: Vec<&str> = self.networks.iter().map(|n| n.name.as_str()).collect();
        if let Some(d) = &self.default_network
            && !names.contains(&d.as_str())
        {
            p.push(format!(
                "default_network {d:?} is not one of the configured networks ({})",
                names.join(", ")
            ));
        }
        for (i, net) in self.networks.iter().enumerate() {
            let n = &net.name;
            if bad_name(n) {
                p.push(format!(
                    "network name {n:?} must be non-empty, without '/' or whitespace"
                ));
            }
            if self.networks[..i].iter().any(|o| o.name == *n) {
                p.push(format!("network name {n:?} is used twice"));
            }
            if net.id == 0 {
                p.push(format!("network {n:?} has id 0; ids run from 1 to 65535"));
            }
            if let Some(o) = self.networks[..i]
                .iter()
                .find(|o| o.id == net.id && net.id != 0)
            {
                p.push(format!(
                    "networks {:?} and {n:?} share id {}; ids must be unique",
                    o.name, net.id
                ));
            }
            for peer in &net.peers {
                if !names.contains(&peer.as_str()) {
                    p.push(format!("network {n:?} peers with unknown network {peer:?}"));
                }
            }
            if net.subnets.is_empty() {
                p.push(format!("network {n:?} has no subnets: add at least one"));
            }
            if let Some(d) = &net.default_subnet
                && net.subnet(d).is_none()
            {
                let subnets: Vec<&str> = net.subnets.iter().map(|s| s.name.as_str()).collect();
                p.push(format!(
                    "default_subnet {d:?} of network {n:?} is not one of its subnets ({})",
                    subnets.join(", ")
                ));
            }
            for (j, sub) in net.subnets.iter().enumerate() {
                subnet_problems(net, j, sub, &mut p);
            }
            // Within one network every address must have one owner, whichever node holds it.
            let mut blocks = Vec::new();
            for sub in &net.subnets {
                for (node, bs) in &sub.blocks {
                    for b in bs {
                        blocks.push((range_of(*b), format!("{b} of node {node:?}")));
                    }
                }
            }
            for (a, b) in overlaps(blocks) {
                p.push(format!("in network {n:?}, block {a} overlaps block {b}"));
            }
        }
        // Across networks CIDRs may overlap (VPCs often do), but one node cannot route one
        // address to two pods, so a node's blocks must be disjoint over all networks.
        let mut per_node: BTreeMap<&str, Vec<Labelled>> = BTreeMap::new();
        let mut network_of: BTreeMap<String, &str> = BTreeMap::new();
        for net in &self.networks {
            for sub in &net.subnets {
                for (node, bs) in &sub.blocks {
                    for b in bs {
                        let label = format!("{b} (network {:?})", net.name);
                        network_of.insert(label.clone(), &net.name);
                        per_node
                            .entry(node.as_str())
                            .or_default()
                            .push((range_of(*b), label));
                    }
                }
            }
        }
        for (node, blocks) in per_node {
            for (a, b) in overlaps(blocks) {
                // Same-network overlaps were reported above.
                if network_of.get(&a) != network_of.get(&b) {
                    p.push(format!("node {node:?} has overlapping blocks {a} and {b}"));
                }
            }
        }
        p
    }
}

fn subnet_problems(net: &NetworkConfig, j: usize, sub: &SubnetConfig, p: &mut Vec<String>) {
    let (n, s) = (&net.name, &sub.name);
    let at = format!("subnet {s:?} of network {n:?}");
    if bad_name(s) {
        p.push(format!(
            "{at}: the name must be non-empty, without '/' or whitespace"
        ));
    }
    if net.subnets[..j].iter().any(|o| o.name == *s) {
        p.push(format!("{at}: the name is used twice in the network"));
    }
    if !is_canonical(sub.cidr) {
        p.push(format!(
            "{at}: cidr {} has host bits set; did you mean {}/{}?",
            sub.cidr,
            sub.cidr.network(),
            sub.cidr.prefix()
        ));
    }
    if sub.cidr.prefix() > max_prefix(sub.cidr) {
        p.push(format!(
            "{at}: cidr {} leaves no room for pods after the network, broadcast and gateway \
             addresses; use a /{} or larger",
            sub.cidr,
            max_prefix(sub.cidr)
        ));
    }
    for o in &net.subnets[..j] {
        if o.name != *s
            && (o.cidr.contains(sub.cidr.network()) || sub.cidr.contains(o.cidr.network()))
        {
            p.push(format!(
                "{at}: cidr {} overlaps subnet {:?} ({})",
                sub.cidr, o.name, o.cidr
            ));
        }
    }
    let (lo, hi) = range_of(sub.cidr);
    if let Some(gw) = sub.gateway {
        let g = ord(gw);
        if !same_family(gw, sub.cidr) || !sub.cidr.contains(gw) {
            p.push(format!("{at}: gateway {gw} is outside {}", sub.cidr));
        } else if g == lo || (sub.cidr.is_ipv4() && g == hi) {
            p.push(format!(
                "{at}: gateway {gw} is the network or broadcast address of {}",
                sub.cidr
            ));
        }
    }
    for r in &sub.reserved {
        if r.start.is_ipv4() != r.end.is_ipv4() {
            p.push(format!(
                "{at}: reserved range {}-{} mixes IPv4 and IPv6",
                r.start, r.end
            ));
        } else if ord(r.start) > ord(r.end) {
            p.push(format!(
                "{at}: reserved range {}-{} ends before it starts",
                r.start, r.end
            ));
        }
        if !same_family(r.start, sub.cidr)
            || !same_family(r.end, sub.cidr)
            || !sub.cidr.contains(r.start)
            || !sub.cidr.contains(r.end)
        {
            p.push(format!(
                "{at}: reserved range {}-{} is not inside {}",
                r.start, r.end, sub.cidr
            ));
        }
    }
    for (node, blocks) in &sub.blocks {
        if node.is_empty() {
            p.push(format!("{at}: blocks are listed under an empty node name"));
        }
        for b in blocks {
            if !is_canonical(*b) {
                p.push(format!(
                    "{at}: block {b} of node {node:?} has host bits set; did you mean {}/{}?",
                    b.network(),
                    b.prefix()
                ));
            }
            let (b_lo, b_hi) = range_of(*b);
            if b.is_ipv4() != sub.cidr.is_ipv4() || b_lo < lo || b_hi > hi {
                p.push(format!(
                    "{at}: block {b} of node {node:?} is not inside the subnet's {}",
                    sub.cidr
                ));
            }
        }
    }
}

/// An inclusive address range and how to name it in a message.
type Labelled = ((u128, u128), String);

/// Pairs of labels whose inclusive ranges intersect.
fn overlaps(mut items: Vec<Labelled>) -> Vec<(String, String)> {
    items.sort_by_key(|((lo, hi), _)| (*lo, *hi));
    let mut out = Vec::new();
    for (i, ((lo, _), label)) in items.iter().enumerate() {
        // Sorted by start, so only earlier items can reach into this one.
        for ((_, prev_hi), prev) in items[..i].iter().rev() {
            if *prev_hi >= *lo {
                out.push((prev.clone(), label.clone()));
            }
        }
    }
    out
}
