//! The status of Subnet objects: addresses used and free, blocks claimed, and conditions that
//! say what is wrong (an overlap, a network that is not in force, exhaustion).
//!
//! Every node computes the same status from the same watched objects and writes it only when
//! it differs from what the object shows, so the writes converge after the first node's and an
//! idle cluster writes nothing. No leader is needed, and a status never depends on one node.

use crate::crd::{Subnet, SubnetStatus};
use crate::topology::{Built, ObjectKind};
use crate::watch::Published;
use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use std::time::Duration;

/// At most one round of status writes this often: a burst of pod changes is one round.
const EVERY: Duration = Duration::from_secs(5);

/// What a Subnet's status should say now; `None` for subnets not in the watch.
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
        let reserved: u128 = s
            .reserved
            .iter()
            .map(|r| range_len(r.start, r.end))
            .sum::<u128>()
            + u128::from(s.gateway.is_some());
        free = u64::try_from(
            size.saturating_sub(reserved)
                .saturating_sub(u128::from(used)),
        )
        .unwrap_or(u64::MAX);
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
    if in_force.is_some() {
        let exhausted = free == 0;
        conditions.push(cond(
            "Exhausted",
            exhausted,
            if exhausted { "NoFreeAddress" } else { "HasFreeAddresses" },
            if exhausted {
                format!(
                    "all addresses of {name} are in use ({used} pods): widen spec.cidr or add a Subnet and select namespaces to it"
                )
            } else {
                format!("{free} addresses free")
            },
        ));
    }
    SubnetStatus {
        observed_generation: subnet.metadata.generation,
        used,
        free,
        blocks: claimed,
        conditions,
    }
}

fn range_len(a: std::net::IpAddr, b: std::net::IpAddr) -> u128 {
    let n = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v) => u128::from(u32::from(v)),
        std::net::IpAddr::V6(v) => u128::from(v),
    };
    n(b).saturating_sub(n(a)) + 1
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
