//! The status of Subnet objects (addresses used and free, blocks claimed, and conditions that
//! say what is wrong: an overlap, a network that is not in force, exhaustion) and of
//! VirtualNetwork objects (in force or not, and why: a duplicate id, a second default, ...).
//!
//! Every node computes the same status from the same watched objects and writes it only when
//! it differs from what the object shows, so the writes converge after the first node's and an
//! idle cluster writes nothing. No leader is needed, and a status never depends on one node.

use crate::claims;
use crate::crd::{Subnet, SubnetStatus, VirtualNetwork, VirtualNetworkStatus};
use crate::topology::{Built, ObjectKind};
use crate::watch::Published;
use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

/// At most one round of status writes this often: a burst of pod changes is one round.
const EVERY: Duration = Duration::from_secs(5);

/// What a Subnet's status should say now.
pub fn subnet_status(
    subnet: &Subnet,
    built: &Built,
    blocks: &[(String, String, IpNetwork)],
    pod_ips: &[IpAddr],
) -> SubnetStatus {
    let name = subnet.name_any();
    let problems = built.problems_of(ObjectKind::Subnet, &name);
    let in_force = built
        .ipam
        .network(&subnet.spec.network)
        .and_then(|n| n.subnet(&name));
    let mut used = 0u64;
    let mut free = 0u64;
    let mut claimed = 0u32;
    // Blocks of the subnet cluster-wide, and whether one is left to claim.
    let mut block_room = None;
    if let Some(s) = in_force {
        used = pod_ips.iter().filter(|ip| s.cidr.contains(**ip)).count() as u64;
        claimed = blocks
            .iter()
            .filter(|(n, sn, _)| *n == subnet.spec.network && *sn == name)
            .count() as u32;
        let size: u128 = match s.cidr {
            IpNetwork::V4(n) => 1u128 << (32 - u32::from(n.prefix())),
            IpNetwork::V6(n) => 1u128
                .checked_shl(128 - u32::from(n.prefix()))
                .unwrap_or(u128::MAX),
        };
        // Never handed out: the reserved ranges, and the network address, the IPv4 broadcast and
        // the gateway (the first host unless set) when outside them.
        let gateway = s.gateway.unwrap_or_else(|| next_addr(s.cidr.network()));
        let infra = [
            Some(s.cidr.network()),
            s.cidr.is_ipv4().then(|| s.cidr.broadcast()),
            Some(gateway),
        ];
        let reserved: u128 = s
            .reserved
            .iter()
            .map(|r| range_len(r.start, r.end))
            .sum::<u128>()
            + infra
                .into_iter()
                .flatten()
                .filter(|ip| !s.reserved.iter().any(|r| in_range(*ip, r.start, r.end)))
                .count() as u128;
        free = u64::try_from(
            size.saturating_sub(reserved)
                .saturating_sub(u128::from(used)),
        )
        .unwrap_or(u64::MAX);
        let block_size = built
            .block_sizes
            .get(&(subnet.spec.network.clone(), name.clone()))
            .copied()
            .unwrap_or(subnet.spec.block_size);
        let taken: BTreeSet<IpNetwork> = blocks
            .iter()
            .filter(|(n, _, _)| *n == subnet.spec.network)
            .map(|(_, _, b)| *b)
            .collect();
        let total = 1u128
            .checked_shl(u32::from(block_size.saturating_sub(s.cidr.prefix())))
            .unwrap_or(u128::MAX);
        let left = claims::free_blocks(s, block_size, &taken).next().is_some();
        block_room = Some((block_size, total, left, s.cidr));
    }
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let cond = |type_: &str, ok: bool, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: now.clone(),
        observed_generation: subnet.metadata.generation,
    };
    let mut conditions = vec![if problems.is_empty() && in_force.is_some() {
        cond("Ready", true, "InForce", "the subnet is in force".into())
    } else {
        cond("Ready", false, "Invalid", problems.join("; "))
    }];
    if let Some((block_size, total, left, cidr)) = block_room {
        let network = &subnet.spec.network;
        let what = format!("subnet {name:?} ({cidr}) of network {network:?}");
        let remedy = "widen spec.cidr, or add a Subnet and select namespaces to it";
        conditions.push(if free == 0 {
            cond(
                "Exhausted",
                true,
                "NoFreeAddress",
                format!(
                    "{what}: all addresses are in use ({used} pods, {claimed} of {total} blocks claimed): {remedy}"
                ),
            )
        } else if !left {
            // Nodes holding blocks still place pods; any other node's ADD of this subnet fails.
            cond(
                "Exhausted",
                true,
                "NoFreeBlock",
                format!(
                    "{what}: 0 of {total} blocks of /{block_size} free cluster-wide ({claimed} claimed by nodes, {} wholly reserved); its {free} free addresses are in blocks nodes hold, so only pods on those nodes get one: {remedy}",
                    total.saturating_sub(u128::from(claimed))
                ),
            )
        } else {
            cond(
                "Exhausted",
                false,
                "HasFreeAddresses",
                format!("{free} addresses free, {claimed} of {total} blocks of /{block_size} claimed"),
            )
        });
    }
    SubnetStatus {
        observed_generation: subnet.metadata.generation,
        used,
        free,
        blocks: claimed,
        conditions,
    }
}

fn ord(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn range_len(a: IpAddr, b: IpAddr) -> u128 {
    ord(b).saturating_sub(ord(a)) + 1
}

fn in_range(ip: IpAddr, a: IpAddr, b: IpAddr) -> bool {
    ip.is_ipv4() == a.is_ipv4() && ord(a) <= ord(ip) && ord(ip) <= ord(b)
}

fn next_addr(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v) => IpAddr::V4(u32::from(v).wrapping_add(1).into()),
        IpAddr::V6(v) => IpAddr::V6(u128::from(v).wrapping_add(1).into()),
    }
}

/// What a VirtualNetwork's status should say now: whether it is in force, with how many
/// subnets, and what the topology found wrong with it (a duplicate id, a second default, a bad
/// CIDR, a peer that is not in force).
pub fn network_status(vn: &VirtualNetwork, built: &Built) -> VirtualNetworkStatus {
    let name = vn.name_any();
    let problems = built.problems_of(ObjectKind::VirtualNetwork, &name);
    let in_force = built.ipam.network(&name);
    let subnets = in_force.map_or(0, |n| n.subnets.len() as u32);
    let (ok, reason, message) = match (in_force, problems.is_empty()) {
        (Some(_), true) => (
            true,
            "InForce",
            format!("the network is in force with {subnets} subnets"),
        ),
        (Some(_), false) => (false, "Degraded", problems.join("; ")),
        (None, false) => (false, "Invalid", problems.join("; ")),
        (None, true) => (
            false,
            "NoSubnet",
            format!(
                "no Subnet of network {name:?} is in force: create one with spec.network: {name} (manifests/examples/network.yaml), or fix the problems its Subnets' status names"
            ),
        ),
    };
    VirtualNetworkStatus {
        observed_generation: vn.metadata.generation,
        subnets,
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: vn.metadata.generation,
        }],
    }
}

/// Conditions compared without when each last changed.
fn condition_key(cs: &[Condition]) -> Vec<(&str, &str, &str, &str)> {
    cs.iter()
        .map(|c| {
            (
                c.type_.as_str(),
                c.status.as_str(),
                c.reason.as_str(),
                c.message.as_str(),
            )
        })
        .collect()
}

/// The same status, ignoring when each condition last changed.
fn same(a: &SubnetStatus, b: &SubnetStatus) -> bool {
    let key = |s: &SubnetStatus| (s.observed_generation, s.used, s.free, s.blocks);
    key(a) == key(b) && condition_key(&a.conditions) == condition_key(&b.conditions)
}

fn same_network(a: &VirtualNetworkStatus, b: &VirtualNetworkStatus) -> bool {
    (a.observed_generation, a.subnets) == (b.observed_generation, b.subnets)
        && condition_key(&a.conditions) == condition_key(&b.conditions)
}

/// Keeps a condition's transition time while its status stays.
fn keep_transitions(want: &mut [Condition], have: &[Condition]) {
    for c in want {
        if let Some(old) = have
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
}

/// Writes `status` to the object `name` of `api`; a failure is only logged, the next round
/// tries again.
async fn write<K>(api: &Api<K>, kind: &str, name: &str, status: &impl serde::Serialize)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({ "status": status });
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(kind, name, error = %e, "status not written");
    }
}

/// Keeps every Subnet's and VirtualNetwork's status current until the daemon stops.
pub async fn run(client: kube::Client, published: Published) {
    let api: Api<Subnet> = Api::all(client.clone());
    let networks_api: Api<VirtualNetwork> = Api::all(client);
    let mut state = published.state.clone();
    let mut topology = published.topology.clone();
    loop {
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = topology.changed() => if r.is_err() { return },
        }
        let Some(built) = topology.borrow_and_update().clone() else {
            continue;
        };
        state.borrow_and_update();
        let (networks, subnets, blocks, pod_ips) = {
            let f = published.fold.lock().unwrap_or_else(|p| p.into_inner());
            let networks: Vec<VirtualNetwork> = f.networks.values().cloned().collect();
            let subnets: Vec<Subnet> = f.subnets.values().cloned().collect();
            let blocks: Vec<(String, String, IpNetwork)> = f
                .blocks
                .values()
                .filter_map(|b| {
                    Some((
                        b.spec.network.clone(),
                        b.spec.subnet.clone(),
                        b.spec.cidr.0.parse().ok()?,
                    ))
                })
                .collect();
            let ips: Vec<IpAddr> = f
                .state()
                .pods()
                .filter_map(|p| p.ip.map(IpAddr::V4))
                .collect();
            (networks, subnets, blocks, ips)
        };
        for vn in &networks {
            let mut want = network_status(vn, &built);
            if let Some(have) = &vn.status {
                if same_network(have, &want) {
                    continue;
                }
                keep_transitions(&mut want.conditions, &have.conditions);
            }
            write(&networks_api, "VirtualNetwork", &vn.name_any(), &want).await;
        }
        for s in &subnets {
            let mut want = subnet_status(s, &built, &blocks, &pod_ips);
            if let Some(have) = &s.status {
                if same(have, &want) {
                    continue;
                }
                keep_transitions(&mut want.conditions, &have.conditions);
            }
            write(&api, "Subnet", &s.name_any(), &want).await;
        }
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Cidr, SubnetSpec, VirtualNetworkSpec};

    fn objects(cidr: &str) -> (VirtualNetwork, Subnet) {
        let vn = VirtualNetwork::new(
            "vpc",
            VirtualNetworkSpec {
                id: 1,
                default: true,
                routable_cidrs: vec![],
                masquerade_exclude: vec![],
                peers: vec![],
            },
        );
        let sub = Subnet::new(
            "s1",
            SubnetSpec {
                network: "vpc".into(),
                cidr: Cidr(cidr.into()),
                gateway: None,
                reserved: vec![],
                block_size: 26,
                default: true,
                namespace_selector: None,
            },
        );
        (vn, sub)
    }

    fn exhausted(st: &SubnetStatus) -> &Condition {
        st.conditions
            .iter()
            .find(|c| c.type_ == "Exhausted")
            .unwrap()
    }

    fn blocks(v: &[&str]) -> Vec<(String, String, IpNetwork)> {
        v.iter()
            .map(|b| ("vpc".into(), "s1".into(), b.parse().unwrap()))
            .collect()
    }

    fn ips(n: u8) -> Vec<IpAddr> {
        (0..n).map(|i| IpAddr::from([10, 20, 0, 2 + i])).collect()
    }

    #[test]
    fn exhausted_when_every_block_is_claimed_and_says_what_to_do() {
        let (vn, sub) = objects("10.20.0.0/24");
        let built = crate::topology::build(&[vn], std::slice::from_ref(&sub), &[], 30);
        let st = subnet_status(&sub, &built, &blocks(&["10.20.0.0/26"]), &ips(3));
        let c = exhausted(&st);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "HasFreeAddresses")
        );
        assert!(
            c.message.contains("1 of 4 blocks of /26 claimed"),
            "{}",
            c.message
        );

        let all = blocks(&[
            "10.20.0.0/26",
            "10.20.0.64/26",
            "10.20.0.128/26",
            "10.20.0.192/26",
        ]);
        let st = subnet_status(&sub, &built, &all, &ips(3));
        let c = exhausted(&st);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "NoFreeBlock")
        );
        for part in [
            "subnet \"s1\" (10.20.0.0/24) of network \"vpc\"",
            "0 of 4 blocks of /26 free cluster-wide (4 claimed by nodes, 0 wholly reserved)",
            "widen spec.cidr, or add a Subnet",
        ] {
            assert!(c.message.contains(part), "{part:?} not in {:?}", c.message);
        }
        assert_eq!(st.blocks, 4);
    }

    #[test]
    fn network_status_names_a_duplicate_id_and_a_network_without_subnet() {
        let (vn, sub) = objects("10.20.0.0/24");
        let mut copy = vn.clone();
        // Same age: the name decides which is older.
        copy.metadata.name = Some("vpc-copy".into());
        copy.spec.default = false;
        let mut lonely = vn.clone();
        lonely.metadata.name = Some("lonely".into());
        lonely.spec.id = 7;
        lonely.spec.default = false;
        let nets = [vn.clone(), copy.clone(), lonely.clone()];
        let built = crate::topology::build(&nets, std::slice::from_ref(&sub), &[], 30);
        let ready = |v: &VirtualNetwork| network_status(v, &built).conditions[0].clone();
        let ok = ready(&vn);
        assert_eq!(
            (ok.status.as_str(), ok.reason.as_str()),
            ("True", "InForce")
        );
        assert_eq!(network_status(&vn, &built).subnets, 1);
        let dup = ready(&copy);
        assert_eq!(
            (dup.status.as_str(), dup.reason.as_str()),
            ("False", "Invalid")
        );
        assert!(
            dup.message
                .contains("spec.id 1 is already used by VirtualNetwork \"vpc\""),
            "{}",
            dup.message
        );
        let none = ready(&lonely);
        assert_eq!(
            (none.status.as_str(), none.reason.as_str()),
            ("False", "NoSubnet")
        );
        assert!(
            none.message.contains("spec.network: lonely"),
            "{}",
            none.message
        );
        // Recomputed, it is the same status: nothing to write.
        assert!(same_network(
            &network_status(&copy, &built),
            &network_status(&copy, &built)
        ));
    }

    #[test]
    fn exhausted_when_every_address_is_in_use() {
        let (vn, mut sub) = objects("10.20.0.0/28");
        sub.spec.block_size = 28;
        let built = crate::topology::build(&[vn], std::slice::from_ref(&sub), &[], 30);
        let st = subnet_status(&sub, &built, &blocks(&["10.20.0.0/28"]), &ips(13));
        assert_eq!(st.free, 0, "{st:?}");
        let c = exhausted(&st);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "NoFreeAddress")
        );
        assert!(
            c.message
                .contains("all addresses are in use (13 pods, 1 of 1 blocks claimed)"),
            "{}",
            c.message
        );
    }
}
