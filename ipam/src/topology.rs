//! What a topology update changed, for the log line an operator reads after editing it.

use crate::model::{IpamConfig, NetworkConfig};
use std::collections::BTreeSet;
use std::fmt;

/// The difference between two topologies, as seen from one node. Names are `network/subnet`;
/// blocks are `network/subnet cidr` and only this node's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyChange {
    pub networks_added: Vec<String>,
    pub networks_removed: Vec<String>,
    /// Networks present before and after whose own attributes changed (id, routable CIDRs,
    /// masquerade exclusions, peers, default subnet).
    pub networks_changed: Vec<String>,
    pub subnets_added: Vec<String>,
    pub subnets_removed: Vec<String>,
    /// Subnets present before and after whose CIDR, gateway or reserved ranges changed.
    pub subnets_changed: Vec<String>,
    pub blocks_added: Vec<String>,
    pub blocks_removed: Vec<String>,
    /// The default network or the cooldown changed.
    pub defaults_changed: bool,
}

fn network_attrs_differ(a: &NetworkConfig, b: &NetworkConfig) -> bool {
    a.id != b.id
        || a.routable_cidrs != b.routable_cidrs
        || a.masquerade_exclude != b.masquerade_exclude
        || a.peers != b.peers
        || a.default_subnet != b.default_subnet
}

impl TopologyChange {
    pub fn between(old: &IpamConfig, new: &IpamConfig, node: &str) -> TopologyChange {
        let mut c = TopologyChange {
            defaults_changed: old.default_network != new.default_network
                || old.cooldown_secs != new.cooldown_secs,
            ..TopologyChange::default()
        };
        let subnets = |cfg: &IpamConfig| -> BTreeSet<String> {
            cfg.networks
                .iter()
                .flat_map(|n| {
                    n.subnets
                        .iter()
                        .map(move |s| format!("{}/{}", n.name, s.name))
                })
                .collect()
        };
        let blocks = |cfg: &IpamConfig| -> BTreeSet<String> {
            cfg.networks
                .iter()
                .flat_map(|n| {
                    n.subnets.iter().flat_map(move |s| {
                        s.node_blocks(node)
                            .iter()
                            .map(move |b| format!("{}/{} {b}", n.name, s.name))
                    })
                })
                .collect()
        };
        for n in &new.networks {
            match old.network(&n.name) {
                None => c.networks_added.push(n.name.clone()),
                Some(o) => {
                    if network_attrs_differ(o, n) {
                        c.networks_changed.push(n.name.clone());
                    }
                    for s in &n.subnets {
                        if let Some(os) = o.subnet(&s.name)
                            && (os.cidr != s.cidr
                                || os.gateway != s.gateway
                                || os.reserved != s.reserved)
                        {
                            c.subnets_changed.push(format!("{}/{}", n.name, s.name));
                        }
                    }
                }
            }
        }
        c.networks_removed = old
            .networks
            .iter()
            .filter(|o| new.network(&o.name).is_none())
            .map(|o| o.name.clone())
            .collect();
        let (os, ns) = (subnets(old), subnets(new));
        c.subnets_added = ns.difference(&os).cloned().collect();
        c.subnets_removed = os.difference(&ns).cloned().collect();
        let (ob, nb) = (blocks(old), blocks(new));
        c.blocks_added = nb.difference(&ob).cloned().collect();
        c.blocks_removed = ob.difference(&nb).cloned().collect();
        c
    }

    pub fn is_empty(&self) -> bool {
        *self == TopologyChange::default()
    }
}

impl fmt::Display for TopologyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let parts = [
            ("networks added", &self.networks_added),
            ("networks removed", &self.networks_removed),
            ("networks changed", &self.networks_changed),
            ("subnets added", &self.subnets_added),
            ("subnets removed", &self.subnets_removed),
            ("subnets changed", &self.subnets_changed),
            ("blocks added", &self.blocks_added),
            ("blocks removed", &self.blocks_removed),
        ];
        let mut out: Vec<String> = parts
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(what, v)| format!("{what}: {}", v.join(", ")))
            .collect();
        if self.defaults_changed {
            out.push("default network or cooldown changed".to_string());
        }
        f.write_str(&out.join("; "))
    }
}
