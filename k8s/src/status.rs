//! The status of Subnet objects: addresses used and free, blocks claimed, and conditions that
//! say what is wrong (an overlap, a network that is not in force, exhaustion).
//!
//! Every node computes the same status from the same watched objects and writes it only when
//! it differs from what the object shows, so the writes converge after the first node's and an
//! idle cluster writes nothing. No leader is needed, and a status never depends on one node.

use crate::claims;
use crate::crd::{Subnet, SubnetStatus};
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
    pod_ips: &[std::net::IpAddr],
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

/// The same status, ignoring when each condition last changed.
fn same(a: &SubnetStatus, b: &SubnetStatus) -> bool {
    let key = |s: &SubnetStatus| {
        (
            s.observed_generation,
            s.used,
            s.free,
            s.blocks,
            s.conditions
                .iter()
                .map(|c| {
                    (
                        c.type_.clone(),
                        c.status.clone(),
                        c.reason.clone(),
                        c.message.clone(),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    key(a) == key(b)
}

/// Keeps every Subnet's status current until the daemon stops.
pub async fn run(client: kube::Client, published: Published) {
    let api: Api<Subnet> = Api::all(client);
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
        let (subnets, blocks, pod_ips) = {
            let f = published.fold.lock().unwrap_or_else(|p| p.into_inner());
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
            let ips: Vec<std::net::IpAddr> = f
                .state()
                .pods()
                .filter_map(|p| p.ip.map(std::net::IpAddr::V4))
                .collect();
            (subnets, blocks, ips)
        };
        for s in &subnets {
            let want = subnet_status(s, &built, &blocks, &pod_ips);
            if s.status.as_ref().is_some_and(|have| same(have, &want)) {
                continue;
            }
            // Keep a condition's transition time while its status stays.
            let mut want = want;
            if let Some(have) = &s.status {
                for c in &mut want.conditions {
                    if let Some(old) = have
                        .conditions
                        .iter()
                        .find(|o| o.type_ == c.type_ && o.status == c.status)
                    {
                        c.last_transition_time = old.last_transition_time.clone();
                    }
                }
            }
            let patch = serde_json::json!({"status": want});
            if let Err(e) = api
                .patch_status(
                    &s.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::debug!(subnet = %s.name_any(), error = %e, "Subnet status not written");
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Cidr, SubnetSpec, VirtualNetwork, VirtualNetworkSpec};

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
