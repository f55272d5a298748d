//! The topology from the watched VirtualNetwork, Subnet and IPBlock objects.
//!
//! One bad object must not take the cluster's networking down with it, so each object is checked
//! on its own and against the objects created before it: a network reusing an id, a subnet
//! overlapping another of its network, a CIDR that is not one — each is left out of the topology
//! and its problem is reported for the object's status, while everything else stays in force.
//! The older object wins a conflict, so creating a bad object never displaces a good one.

use crate::crd::{IPBlock, Subnet, VirtualNetwork};
use ipnetwork::IpNetwork;
use kube::ResourceExt as _;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use vpcnet_ipam::{IpRange, IpamConfig, NetworkConfig, SubnetConfig};
use vpcnet_policy::model::Labels;
use vpcnet_policy::selector::Selector;

/// Which kind of object a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    VirtualNetwork,
    Subnet,
}

/// A Subnet's namespace selector, for placing pods whose pod and namespace carry no annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct SubnetSelector {
    pub network: String,
    pub subnet: String,
    pub selector: Selector,
}

/// The topology the objects describe, and what is wrong with the ones left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    /// Networks without an usable subnet are left out (IPAM needs one); an empty `networks`
    /// means there is nothing to allocate from yet.
    pub ipam: IpamConfig,
    /// Sentences per object, empty for objects in force without a problem.
    pub problems: BTreeMap<(ObjectKind, String), Vec<String>>,
    pub selectors: Vec<SubnetSelector>,
    /// Every subnet's block prefix length, keyed (network, subnet).
    pub block_sizes: BTreeMap<(String, String), u8>,
}

impl Default for Built {
    fn default() -> Self {
        Built {
            ipam: IpamConfig {
                networks: Vec::new(),
                default_network: None,
                cooldown_secs: 0,
            },
            problems: BTreeMap::new(),
            selectors: Vec::new(),
            block_sizes: BTreeMap::new(),
        }
    }
}

impl Built {
    fn problem(&mut self, kind: ObjectKind, name: &str, text: String) {
        self.problems
            .entry((kind, name.to_string()))
            .or_default()
            .push(text);
    }

    /// The subnet whose namespace selector selects a namespace with `labels`: the oldest such
    /// Subnet when several do (so creating a second one never moves a namespace's new pods).
    /// An annotation on the pod or its namespace takes precedence over this.
    pub fn subnet_for_namespace(&self, labels: &Labels) -> Option<&SubnetSelector> {
        self.selectors.iter().find(|s| s.selector.matches(labels))
    }

    /// The problems of one object (empty when it is in force and well).
    pub fn problems_of(&self, kind: ObjectKind, name: &str) -> &[String] {
        self.problems
            .get(&(kind, name.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Oldest first, then by name: the order conflicts are decided in.
fn by_age<K: kube::Resource>(objs: &[K]) -> Vec<&K> {
    let mut v: Vec<&K> = objs.iter().collect();
    v.sort_by(|a, b| {
        let t = |o: &K| o.meta().creation_timestamp.as_ref().map(|t| t.0);
        t(a).cmp(&t(b))
            .then_with(|| a.meta().name.cmp(&b.meta().name))
    });
    v
}

fn cidr(text: &str, field: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = text
        .parse()
        .map_err(|_| format!("{field} {text:?} is not a CIDR"))?;
    if net.ip() != net.network() {
        return Err(format!(
            "{field} {text:?} has host bits set; write {}/{}",
            net.network(),
            net.prefix()
        ));
    }
    Ok(net)
}

fn cidrs(list: &[crate::crd::Cidr], field: &str) -> Result<Vec<IpNetwork>, String> {
    list.iter()
        .enumerate()
        .map(|(i, c)| cidr(&c.0, &format!("{field}[{i}]")))
        .collect()
}

fn ip(text: &str, field: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("{field} {text:?} is not an IP address"))
}

fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Builds the topology. `cooldown_secs` is the node's own setting (not cluster data).
pub fn build(
    networks: &[VirtualNetwork],
    subnets: &[Subnet],
    blocks: &[IPBlock],
    cooldown_secs: u64,
) -> Built {
    let mut out = Built::default();
    let mut nets: Vec<NetworkConfig> = Vec::new();
    let mut default_network = None;
    for vn in by_age(networks) {
        let name = vn.name_any();
        let spec = &vn.spec;
        let mut bad = Vec::new();
        if spec.id == 0 {
            bad.push("spec.id 0 is reserved; ids run from 1 to 65535".to_string());
        }
        if let Some(o) = nets.iter().find(|o| o.id == spec.id) {
            bad.push(format!(
                "spec.id {} is already used by VirtualNetwork {:?}; give this network another id",
                spec.id, o.name
            ));
        }
        let routable = cidrs(&spec.routable_cidrs, "spec.routableCidrs").map_err(|e| bad.push(e));
        let masq =
            cidrs(&spec.masquerade_exclude, "spec.masqueradeExclude").map_err(|e| bad.push(e));
        let (Ok(routable_cidrs), Ok(masquerade_exclude), true) = (routable, masq, bad.is_empty())
        else {
            for b in bad {
                out.problem(ObjectKind::VirtualNetwork, &name, b);
            }
            continue;
        };
        if spec.default {
            match &default_network {
                None => default_network = Some(name.clone()),
                Some(d) => out.problem(
                    ObjectKind::VirtualNetwork,
                    &name,
                    format!("VirtualNetwork {d:?} is already the default network; this one is not"),
                ),
            }
        }
        nets.push(NetworkConfig {
            name,
            id: spec.id,
            routable_cidrs,
            masquerade_exclude,
            peers: spec.peers.clone(),
            default_subnet: None,
            subnets: Vec::new(),
        });
    }

    for sn in by_age(subnets) {
        let name = sn.name_any();
        let spec = &sn.spec;
        let Some(net) = nets.iter_mut().find(|n| n.name == spec.network) else {
            out.problem(
                ObjectKind::Subnet,
                &name,
                format!(
                    "spec.network {:?} names no VirtualNetwork in force; create it (or fix its problems)",
                    spec.network
                ),
            );
            continue;
        };
        let parsed = (|| {
            let cidr = cidr(&spec.cidr.0, "spec.cidr")?;
            let gateway = spec
                .gateway
                .as_deref()
                .map(|g| ip(g, "spec.gateway"))
                .transpose()?;
            let reserved = spec
                .reserved
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    Ok(IpRange {
                        start: ip(&r.start, &format!("spec.reserved[{i}].start"))?,
                        end: ip(&r.end, &format!("spec.reserved[{i}].end"))?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let max = if cidr.is_ipv4() { 32 } else { 128 };
            if spec.block_size < cidr.prefix() || spec.block_size > max {
                return Err(format!(
                    "spec.blockSize {} must lie between the subnet's prefix length {} and {max}",
                    spec.block_size,
                    cidr.prefix()
                ));
            }
            if let Some(o) = net.subnets.iter().find(|o| overlaps(o.cidr, cidr)) {
                return Err(format!(
                    "spec.cidr {cidr} overlaps Subnet {:?} ({}) of the same network",
                    o.name, o.cidr
                ));
            }
            Ok(SubnetConfig {
                name: name.clone(),
                cidr,
                gateway,
                reserved,
                blocks: BTreeMap::new(),
            })
        })();
        let subnet = match parsed {
            Ok(s) => s,
            Err(e) => {
                out.problem(ObjectKind::Subnet, &name, e);
                continue;
            }
        };
        // What IPAM would refuse (a gateway outside the CIDR, a tiny subnet, a bad name...) is
        // found by IPAM's own checks, on this one subnet alone.
        let alone = IpamConfig {
            networks: vec![NetworkConfig {
                subnets: vec![subnet.clone()],
                peers: Vec::new(),
                // The network's default may be another subnet, not part of this check.
                default_subnet: None,
                ..net.clone()
            }],
            default_network: None,
            cooldown_secs,
        };
        let problems = alone.problems();
        if !problems.is_empty() {
            for p in problems {
                out.problem(ObjectKind::Subnet, &name, p);
            }
            continue;
        }
        if spec.default {
            match &net.default_subnet {
                None => net.default_subnet = Some(name.clone()),
                Some(d) => out.problem(
                    ObjectKind::Subnet,
                    &name,
                    format!(
                        "Subnet {d:?} is already the default of network {:?}; this one is not",
                        net.name
                    ),
                ),
            }
        }
        if let Some(sel) = &spec.namespace_selector {
            match Selector::parse(sel) {
                Ok(selector) => out.selectors.push(SubnetSelector {
                    network: net.name.clone(),
                    subnet: name.clone(),
                    selector,
                }),
                Err(e) => {
                    // The subnet stays usable by annotation; it just selects no namespace.
                    out.problem(
                        ObjectKind::Subnet,
                        &name,
                        format!("spec.namespaceSelector: {e}; it selects no namespace until fixed"),
                    );
                }
            }
        }
        out.block_sizes
            .insert((net.name.clone(), name.clone()), spec.block_size);
        net.subnets.push(subnet);
    }

    // Blocks: each claimed block lands in its subnet under its node. A claim that does not fit
    // its subnet (edited by hand, or left from a subnet since replaced) is not routed.
    let mut seen = BTreeSet::new();
    for b in blocks {
        let Ok(block) = cidr(&b.spec.cidr.0, "spec.cidr") else {
            continue;
        };
        let Some(subnet) = nets
            .iter_mut()
            .filter(|n| n.name == b.spec.network)
            .flat_map(|n| n.subnets.iter_mut())
            .find(|s| s.name == b.spec.subnet)
        else {
            continue;
        };
        if !subnet.cidr.contains(block.network())
            || block.prefix() < subnet.cidr.prefix()
            || !seen.insert((b.spec.network.clone(), block))
        {
            continue;
        }
        let list = subnet.blocks.entry(b.spec.node.clone()).or_default();
        list.push(block);
        list.sort();
    }

    // Peers must name networks in force; a dangling peer is dropped (and said), not fatal.
    let in_force: BTreeSet<String> = nets
        .iter()
        .filter(|n| !n.subnets.is_empty())
        .map(|n| n.name.clone())
        .collect();
    for n in &mut nets {
        let (keep, gone): (Vec<String>, Vec<String>) =
            n.peers.drain(..).partition(|p| in_force.contains(p));
        n.peers = keep;
        for p in gone {
            out.problem(
                ObjectKind::VirtualNetwork,
                &n.name,
                format!("spec.peers names {p:?}, which is not a VirtualNetwork with a usable Subnet; not peered"),
            );
        }
    }
    nets.retain(|n| !n.subnets.is_empty());
    if default_network
        .as_ref()
        .is_some_and(|d| !in_force.contains(d))
    {
        default_network = None;
    }
    out.ipam = IpamConfig {
        networks: nets,
        default_network,
        cooldown_secs,
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Cidr, IPBlockSpec, SubnetSpec, VirtualNetworkSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn aged<K: kube::Resource>(mut o: K, secs: i64) -> K {
        o.meta_mut().creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs).unwrap(),
        ));
        o
    }

    fn vnet(name: &str, id: u16, age: i64) -> VirtualNetwork {
        aged(
            VirtualNetwork::new(
                name,
                VirtualNetworkSpec {
                    id,
                    default: false,
                    routable_cidrs: vec![Cidr("10.0.0.0/8".into())],
                    masquerade_exclude: vec![],
                    peers: vec![],
                },
            ),
            age,
        )
    }

    fn subnet(name: &str, network: &str, cidr: &str, age: i64) -> Subnet {
        aged(
            Subnet::new(
                name,
                SubnetSpec {
                    network: network.into(),
                    cidr: Cidr(cidr.into()),
                    gateway: None,
                    reserved: vec![],
                    block_size: 26,
                    default: false,
                    namespace_selector: None,
                },
            ),
            age,
        )
    }

    fn block(network: &str, subnet: &str, cidr: &str, node: &str) -> IPBlock {
        let net: IpNetwork = cidr.parse().unwrap();
        IPBlock::new(
            &crate::crd::block_name(network, net),
            IPBlockSpec {
                network: network.into(),
                subnet: subnet.into(),
                cidr: Cidr(cidr.into()),
                node: node.into(),
            },
        )
    }

    /// Found on a real API server: the per-subnet check carried the network's default subnet
    /// along, so every subnet after the default one was refused.
    #[test]
    fn a_second_subnet_next_to_the_default_one_is_in_force() {
        let mut main = subnet("main", "vpc", "10.20.0.0/17", 0);
        main.spec.default = true;
        let built = build(
            &[vnet("vpc", 1, 0)],
            &[main, subnet("team-b", "vpc", "10.20.128.0/20", 1)],
            &[],
            30,
        );
        assert!(built.problems.is_empty(), "{:?}", built.problems);
        assert_eq!(built.ipam.networks[0].subnets.len(), 2);
        assert_eq!(
            built.ipam.networks[0].default_subnet.as_deref(),
            Some("main")
        );
    }

    #[test]
    fn objects_become_the_ipam_topology_with_each_nodes_blocks() {
        let built = build(
            &[vnet("vpc", 1, 0)],
            &[subnet("a", "vpc", "10.20.0.0/16", 0)],
            &[
                block("vpc", "a", "10.20.0.64/26", "n1"),
                block("vpc", "a", "10.20.0.0/26", "n1"),
                block("vpc", "a", "10.20.0.128/26", "n2"),
            ],
            30,
        );
        assert!(built.problems.is_empty(), "{:?}", built.problems);
        built.ipam.validate().unwrap();
        let s = &built.ipam.networks[0].subnets[0];
        assert_eq!(
            s.blocks["n1"],
            [
                "10.20.0.0/26".parse::<IpNetwork>().unwrap(),
                "10.20.0.64/26".parse().unwrap()
            ]
        );
        assert_eq!(s.blocks["n2"].len(), 1);
        assert_eq!(built.block_sizes[&("vpc".into(), "a".into())], 26);
    }

    #[test]
    fn a_bad_or_conflicting_object_is_left_out_and_the_older_one_wins() {
        let mut bad_cidr = subnet("typo", "vpc", "10.40.0.1/16", 5);
        bad_cidr.spec.block_size = 26;
        let built = build(
            &[vnet("vpc", 1, 0), vnet("copy", 1, 10), vnet("other", 2, 20)],
            &[
                subnet("newer", "vpc", "10.20.128.0/17", 10),
                subnet("older", "vpc", "10.20.0.0/16", 0),
                bad_cidr,
                subnet("orphan", "nope", "10.50.0.0/16", 0),
            ],
            &[block("vpc", "older", "10.99.0.0/26", "n1")],
            30,
        );
        let names: Vec<_> = built
            .ipam
            .networks
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["vpc"],
            "networks without a usable subnet are not in force"
        );
        let subnets: Vec<_> = built.ipam.networks[0]
            .subnets
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(subnets, ["older"]);
        assert!(
            built.ipam.networks[0].subnets[0].blocks.is_empty(),
            "a block outside its subnet is not routed"
        );
        let p = |k, n| built.problems_of(k, n).join(" | ");
        assert!(
            p(ObjectKind::VirtualNetwork, "copy")
                .contains("already used by VirtualNetwork \"vpc\"")
        );
        assert!(p(ObjectKind::Subnet, "newer").contains("overlaps Subnet \"older\""));
        assert!(p(ObjectKind::Subnet, "typo").contains("host bits"));
        assert!(p(ObjectKind::Subnet, "orphan").contains("names no VirtualNetwork"));
        assert!(p(ObjectKind::Subnet, "older").is_empty());
        built.ipam.validate().unwrap();
    }

    #[test]
    fn namespaces_are_placed_by_the_oldest_subnet_selecting_them() {
        let sel = |app: &str| {
            Some(serde_json::from_value(serde_json::json!({"matchLabels": {"team": app}})).unwrap())
        };
        let mut a = subnet("a", "vpc", "10.20.0.0/16", 0);
        a.spec.namespace_selector = sel("blue");
        let mut b = subnet("b", "vpc", "10.21.0.0/16", 5);
        b.spec.namespace_selector = sel("blue");
        let mut bad = subnet("bad", "vpc", "10.22.0.0/16", 6);
        bad.spec.namespace_selector = Some(
            serde_json::from_value(
                serde_json::json!({"matchExpressions": [{"key": "x", "operator": "Near"}]}),
            )
            .unwrap(),
        );
        let built = build(&[vnet("vpc", 1, 0)], &[b, a, bad], &[], 30);
        let labels = |t: &str| Labels::from([("team".to_string(), t.to_string())]);
        assert_eq!(
            built.subnet_for_namespace(&labels("blue")).unwrap().subnet,
            "a"
        );
        assert!(built.subnet_for_namespace(&labels("red")).is_none());
        assert!(built.problems_of(ObjectKind::Subnet, "bad")[0].contains("namespaceSelector"));
        assert_eq!(
            built.ipam.networks[0].subnets.len(),
            3,
            "a bad selector does not take the subnet out"
        );
    }

    #[test]
    fn ipams_own_checks_apply_to_each_subnet_and_dangling_peers_are_dropped() {
        let mut gw = subnet("gw", "vpc", "10.20.0.0/16", 0);
        gw.spec.gateway = Some("10.30.0.1".into());
        let mut small = subnet("small", "vpc", "10.21.0.0/24", 0);
        small.spec.block_size = 20;
        let mut peered = vnet("vpc", 1, 0);
        peered.spec.peers = vec!["ghost".into()];
        let built = build(
            &[peered],
            &[gw, small, subnet("ok", "vpc", "10.22.0.0/16", 1)],
            &[],
            30,
        );
        assert!(!built.problems_of(ObjectKind::Subnet, "gw").is_empty());
        assert!(built.problems_of(ObjectKind::Subnet, "small")[0].contains("blockSize 20"));
        assert!(built.problems_of(ObjectKind::VirtualNetwork, "vpc")[0].contains("\"ghost\""));
        assert!(built.ipam.networks[0].peers.is_empty());
        built.ipam.validate().unwrap();
    }
}
