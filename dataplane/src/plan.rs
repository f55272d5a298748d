//! Turns the network configuration into the content of the `ROUTES`/`PEERS` maps and the nftables
//! sets. Pure, so the isolation rules can be unit-tested without a kernel.

use super::DataplaneError;
use ipnetwork::Ipv4Network;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vpcnet_common::{NODE_SCOPE, ROUTE_DIRECT, ROUTE_HOST, ROUTE_ISOLATED, ROUTE_LOCAL_BLOCK};
use vpcnet_ipam::NetworkConfig;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (network id or NODE_SCOPE, normalised prefix) → action.
    pub routes: BTreeMap<(u16, Ipv4Network), u32>,
    /// Ordered pairs (src, dst) of distinct networks whose pods may talk; always both directions.
    pub peers: BTreeSet<(u16, u16)>,
    /// Destinations the programs forward themselves (never masqueraded, never kernel-forwarded).
    pub direct: Vec<Ipv4Network>,
    /// `masquerade_exclude` of every network: kernel-forwarded without SNAT.
    pub exclude: Vec<Ipv4Network>,
}

/// The IPv4 CIDRs of the configuration: the programs forward IPv4 only (IPv6 comes later).
fn v4(c: &ipnetwork::IpNetwork) -> Option<Ipv4Network> {
    match c {
        ipnetwork::IpNetwork::V4(n) => Some(*n),
        ipnetwork::IpNetwork::V6(_) => None,
    }
}

fn norm(n: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(n.network(), n.prefix()).unwrap_or(n)
}

/// Builds the maps' content.
///
/// Per network N (key = N's id):
/// * N's `routable_cidrs` and N's own subnets → direct;
/// * every subnet of every other network M → direct if N and M are peered, else isolated. Peering
///   is symmetric in effect: either side naming the other is enough, and both directions are
///   written. For the exact same prefix isolation wins over N's own routable list, so listing a
///   neighbour's range as routable cannot open a hole.
///
/// Node scope: this node's pod blocks (only endpoints live there) and the node's own addresses
/// (delivered by the kernel: kubelet probes, node-local services).
pub fn plan(
    networks: &[NetworkConfig],
    local_pod_cidrs: &[Ipv4Network],
    node_addrs: &[Ipv4Addr],
) -> Result<Plan, DataplaneError> {
    let mut ids = BTreeMap::new();
    for n in networks {
        if n.id == NODE_SCOPE {
            return Err(DataplaneError::Config(format!(
                "network {}: id 0 is reserved",
                n.name
            )));
        }
        if let Some(other) = ids.insert(n.id, &n.name) {
            return Err(DataplaneError::Config(format!(
                "networks {other} and {} share id {}",
                n.name, n.id
            )));
        }
    }
    let by_name: BTreeMap<&str, u16> = networks.iter().map(|n| (n.name.as_str(), n.id)).collect();
    let mut p = Plan::default();
    for n in networks {
        for peer in &n.peers {
            match by_name.get(peer.as_str()) {
                Some(&id) if id != n.id => {
                    p.peers.insert((n.id, id));
                    p.peers.insert((id, n.id));
                }
                Some(_) => {}
                None => {
                    tracing::warn!(network = %n.name, peer = %peer, "peer network not configured; ignored")
                }
            }
        }
    }
    for n in networks {
        for c in n
            .routable_cidrs
            .iter()
            .chain(n.subnets.iter().map(|s| &s.cidr))
            .filter_map(v4)
        {
            p.routes.insert((n.id, norm(c)), ROUTE_DIRECT);
        }
    }
    for n in networks {
        for m in networks.iter().filter(|m| m.id != n.id) {
            let action = if p.peers.contains(&(n.id, m.id)) {
                ROUTE_DIRECT
            } else {
                ROUTE_ISOLATED
            };
            for cidr in m.subnets.iter().filter_map(|s| v4(&s.cidr)) {
                let key = (n.id, norm(cidr));
                // Isolation wins over a direct entry for the same prefix.
                if action == ROUTE_ISOLATED || !p.routes.contains_key(&key) {
                    p.routes.insert(key, action);
                }
            }
        }
    }
    for c in local_pod_cidrs {
        p.routes.insert((NODE_SCOPE, norm(*c)), ROUTE_LOCAL_BLOCK);
    }
    for a in node_addrs {
        p.routes
            .insert((NODE_SCOPE, Ipv4Network::from(*a)), ROUTE_HOST);
    }
    let mut direct: BTreeSet<Ipv4Network> = networks
        .iter()
        .flat_map(|n| {
            n.routable_cidrs
                .iter()
                .chain(n.subnets.iter().map(|s| &s.cidr))
        })
        .filter_map(v4)
        .map(norm)
        .collect();
    direct.extend(local_pod_cidrs.iter().map(|c| norm(*c)));
    p.direct = direct.into_iter().collect();
    let exclude: BTreeSet<Ipv4Network> = networks
        .iter()
        .flat_map(|n| n.masquerade_exclude.iter())
        .filter_map(v4)
        .map(norm)
        .collect();
    p.exclude = exclude.into_iter().collect();
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpcnet_ipam::SubnetConfig;

    fn net(name: &str, id: u16, routable: &[&str], subnet: &str, peers: &[&str]) -> NetworkConfig {
        NetworkConfig {
            name: name.into(),
            id,
            routable_cidrs: routable.iter().map(|c| c.parse().unwrap()).collect(),
            masquerade_exclude: vec![],
            peers: peers.iter().map(|s| s.to_string()).collect(),
            default_subnet: None,
            subnets: vec![SubnetConfig {
                name: "s".into(),
                cidr: subnet.parse().unwrap(),
                gateway: None,
                reserved: vec![],
                blocks: Default::default(),
            }],
        }
    }

    fn n(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn unpeered_networks_are_isolated_both_ways() {
        let nets = [
            net(
                "a",
                1,
                &["10.20.0.0/16", "10.40.0.0/24"],
                "10.20.0.0/16",
                &[],
            ),
            net("b", 2, &[], "10.40.0.0/24", &[]),
        ];
        let p = plan(
            &nets,
            &[n("10.20.1.0/25")],
            &["10.20.0.11".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(
            p.routes[&(1, n("10.40.0.0/24"))],
            ROUTE_ISOLATED,
            "isolation beats routable"
        );
        assert_eq!(p.routes[&(2, n("10.20.0.0/16"))], ROUTE_ISOLATED);
        assert_eq!(p.routes[&(1, n("10.20.0.0/16"))], ROUTE_DIRECT);
        assert_eq!(p.routes[&(0, n("10.20.1.0/25"))], ROUTE_LOCAL_BLOCK);
        assert_eq!(p.routes[&(0, n("10.20.0.11/32"))], ROUTE_HOST);
        assert!(p.peers.is_empty());
    }

    #[test]
    fn peering_on_one_side_is_symmetric() {
        let nets = [
            net("a", 1, &["10.20.0.0/16"], "10.20.0.0/16", &["b"]),
            net("b", 2, &[], "10.40.0.5/24", &[]),
        ];
        let p = plan(&nets, &[], &[]).unwrap();
        assert_eq!(
            p.routes[&(1, n("10.40.0.0/24"))],
            ROUTE_DIRECT,
            "normalised prefix"
        );
        assert_eq!(p.routes[&(2, n("10.20.0.0/16"))], ROUTE_DIRECT);
        assert!(p.peers.contains(&(1, 2)) && p.peers.contains(&(2, 1)));
    }

    #[test]
    fn duplicate_and_reserved_ids_are_refused() {
        let nets = [
            net("a", 1, &[], "10.20.0.0/16", &[]),
            net("b", 1, &[], "10.40.0.0/24", &[]),
        ];
        assert!(plan(&nets, &[], &[]).is_err());
        assert!(plan(&[net("z", 0, &[], "10.1.0.0/16", &[])], &[], &[]).is_err());
    }
}
