//! Cluster-wide claims: a node's IPAM blocks and pods' fixed addresses.
//!
//! A claim is an object whose name is derived from what it claims (see [`crate::crd::block_name`]
//! and [`crate::crd::claim_name`]); the API server creates a name at most once, so of two nodes
//! claiming the same block at the same instant exactly one gets `201 Created` and the other
//! `409 AlreadyExists`. Nothing else coordinates nodes: no leader, no lock object.
//!
//! Within its blocks a node's own store stays the authority for who holds which address, so the
//! ADD path calls the API server only when the node must claim a block (or a pod asks for a
//! fixed address).

use crate::crd::{self, Cidr, IPBlock, IPBlockSpec, IPClaim, IPClaimSpec};
use crate::fold::NodeInfo;
use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, PostParams};
use std::collections::BTreeSet;
use std::net::IpAddr;
use vpcnet_ipam::SubnetConfig;

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Someone else created the name first: try another block, or the address is held.
    #[error("{what} is already claimed")]
    Taken { what: String },
    #[error(
        "subnet {subnet} has no unclaimed block of /{block_size} left ({claimed} claimed); add a Subnet or widen this one"
    )]
    Exhausted {
        subnet: String,
        block_size: u8,
        claimed: usize,
    },
    #[error("the API server refused the claim of {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// The blocks of `subnet` of prefix `block_size`, in address order, that nobody has claimed and
/// that hold at least one address IPAM could hand out (not all reserved).
///
/// One ordered walk over the blocks and the claimed ranges together: a run of claimed blocks is
/// skipped in one step, so the cost grows with the claims and the free blocks yielded, never
/// with the blocks × claims product (a /16 of /26 blocks with hundreds of claims stays cheap).
pub fn free_blocks<'a>(
    subnet: &'a SubnetConfig,
    block_size: u8,
    claimed: &BTreeSet<IpNetwork>,
) -> impl Iterator<Item = IpNetwork> + 'a {
    let base = subnet.cidr;
    let bits: u8 = if base.is_ipv4() { 32 } else { 128 };
    let count: u128 = if block_size >= base.prefix() && block_size <= bits {
        1u128
            .checked_shl(u32::from(block_size - base.prefix()))
            .unwrap_or(u128::MAX)
    } else {
        0
    };
    let mut taken: Vec<(u128, u128)> = claimed
        .iter()
        .filter(|c| c.is_ipv4() == base.is_ipv4())
        .map(|c| (ord(c.network()), ord(c.broadcast())))
        .collect();
    taken.sort_unstable();
    FreeBlocks {
        subnet,
        block_size,
        start: ord(base.network()),
        step_bits: u32::from(bits.saturating_sub(block_size)),
        next: 0,
        count,
        taken,
        at: 0,
    }
}

struct FreeBlocks<'a> {
    subnet: &'a SubnetConfig,
    block_size: u8,
    /// The subnet's first address.
    start: u128,
    /// log2 of a block's size.
    step_bits: u32,
    /// Index of the next block to look at, of `count`.
    next: u128,
    count: u128,
    /// Claimed ranges (first, last address), sorted by first.
    taken: Vec<(u128, u128)>,
    /// Ranges before `taken[at]` end before the next block: they can never overlap again.
    at: usize,
}

impl Iterator for FreeBlocks<'_> {
    type Item = IpNetwork;

    fn next(&mut self) -> Option<IpNetwork> {
        let last_offset = u128::MAX.checked_shr(128 - self.step_bits).unwrap_or(0);
        while self.next < self.count {
            let lo = self.start + self.next.checked_shl(self.step_bits).unwrap_or(0);
            let hi = lo + last_offset;
            while self.taken.get(self.at).is_some_and(|&(_, end)| end < lo) {
                self.at += 1;
            }
            if let Some(&(first, end)) = self.taken.get(self.at)
                && first <= hi
            {
                // Overlaps a claim: go on at the first block starting after it.
                let Some(past) = end.checked_add(1) else {
                    self.next = self.count;
                    break;
                };
                let off = past - self.start;
                let idx = off.checked_shr(self.step_bits).unwrap_or(0)
                    + u128::from(off & last_offset != 0);
                self.next = idx.max(self.next + 1);
                continue;
            }
            self.next += 1;
            let block = IpNetwork::new(addr(self.subnet.cidr.is_ipv4(), lo), self.block_size)
                .expect("prefix within family");
            if !all_reserved(self.subnet, block) {
                return Some(block);
            }
        }
        None
    }
}

fn ord(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr(v4: bool, n: u128) -> IpAddr {
    if v4 {
        IpAddr::V4((n as u32).into())
    } else {
        IpAddr::V6(n.into())
    }
}

/// Whether every address of `block` is reserved, the gateway, or the network/broadcast
/// address: a block nobody could allocate from is not worth claiming.
fn all_reserved(subnet: &SubnetConfig, block: IpNetwork) -> bool {
    let (lo, hi) = (ord(block.network()), ord(block.broadcast()));
    let mut n = lo;
    // Bounded: reserved ranges are few, and each step either jumps past one or stops.
    while n <= hi {
        let ip = addr(block.is_ipv4(), n);
        let infra = ip == subnet.cidr.network()
            || (subnet.cidr.is_ipv4() && ip == subnet.cidr.broadcast())
            || Some(ip) == subnet.gateway
            || (subnet.gateway.is_none() && n == ord(subnet.cidr.network()) + 1);
        if infra {
            n += 1;
            continue;
        }
        match subnet
            .reserved
            .iter()
            .find(|r| ord(r.start) <= n && n <= ord(r.end))
        {
            Some(r) => n = ord(r.end).saturating_add(1),
            None => return false,
        }
        if n == 0 {
            break;
        }
    }
    true
}

fn owned_by(node: &NodeInfo) -> Vec<OwnerReference> {
    vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name.clone(),
        uid: node.uid.clone(),
        block_owner_deletion: None,
        controller: None,
    }]
}

/// Claims `block` of `network`/`subnet` for `node`, owned by its Node object (so the garbage
/// collector frees the block when the node is deleted).
pub async fn claim_block(
    api: &Api<IPBlock>,
    node: &NodeInfo,
    network: &str,
    subnet: &str,
    block: IpNetwork,
) -> Result<IPBlock, ClaimError> {
    let mut obj = IPBlock::new(
        &crd::block_name(network, block),
        IPBlockSpec {
            network: network.into(),
            subnet: subnet.into(),
            cidr: Cidr(block.to_string()),
            node: node.name.clone(),
        },
    );
    obj.metadata.owner_references = Some(owned_by(node));
    let what = format!("block {block} of subnet {subnet}");
    create(api, &obj, what).await
}

/// Claims the first free block of `subnet` for `node`, trying the next one whenever another
/// node won the race for it. `claimed` is what this node knows to be taken (from its watch).
pub async fn claim_next_block(
    api: &Api<IPBlock>,
    node: &NodeInfo,
    network: &str,
    subnet: &SubnetConfig,
    block_size: u8,
    claimed: &BTreeSet<IpNetwork>,
) -> Result<IPBlock, ClaimError> {
    let mut lost = BTreeSet::new();
    // Each lost race adds a block to `lost`, so this ends after at most one try per block; the
    // number of tries is bounded further so a full subnet answers quickly.
    for _ in 0..MAX_TRIES {
        let known: BTreeSet<IpNetwork> = claimed.union(&lost).copied().collect();
        let Some(block) = free_blocks(subnet, block_size, &known).next() else {
            return Err(ClaimError::Exhausted {
                subnet: subnet.name.clone(),
                block_size,
                claimed: claimed.len() + lost.len(),
            });
        };
        match claim_block(api, node, network, &subnet.name, block).await {
            Err(ClaimError::Taken { .. }) => {
                tracing::debug!(%block, "another node claimed the block first; trying the next");
                lost.insert(block);
            }
            other => return other,
        }
    }
    // Not exhausted as far as this node knows: its watch is far behind the other nodes' claims.
    Err(ClaimError::Taken {
        what: format!(
            "every block of subnet {} this node tried ({MAX_TRIES}, free as far as its watch showed)",
            subnet.name
        ),
    })
}

/// Bounds the tries of one claim so a subnet others are filling answers quickly.
const MAX_TRIES: usize = 256;

/// Gives a block back. Gone already counts as given back.
pub async fn release_block(api: &Api<IPBlock>, name: &str) -> Result<(), ClaimError> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ClaimError::Api {
            what: format!("block {name}"),
            source,
        }),
    }
}

/// Claims `ip` of `network` for a pod. `owner` is the pod, or its StatefulSet when the pod
/// keeps its address across deletion and rescheduling.
pub async fn claim_ip(
    api: &Api<IPClaim>,
    network: &str,
    spec: IPClaimSpec,
    owner: OwnerReference,
) -> Result<IPClaim, ClaimError> {
    let ip: IpAddr = spec.ip.parse().map_err(|_| ClaimError::Taken {
        what: format!("{:?} (not an address)", spec.ip),
    })?;
    let mut obj = IPClaim::new(&crd::claim_name(network, ip), spec);
    obj.metadata.owner_references = Some(vec![owner]);
    let what = format!("address {ip} of network {network}");
    create(api, &obj, what).await
}

async fn create<K>(api: &Api<K>, obj: &K, what: String) -> Result<K, ClaimError>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(o) => Ok(o),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(ClaimError::Taken { what }),
        Err(source) => Err(ClaimError::Api { what, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use vpcnet_ipam::IpRange;

    fn subnet(cidr: &str, reserved: &[(&str, &str)]) -> SubnetConfig {
        SubnetConfig {
            name: "s".into(),
            cidr: cidr.parse().unwrap(),
            gateway: None,
            reserved: reserved
                .iter()
                .map(|(a, b)| IpRange {
                    start: a.parse().unwrap(),
                    end: b.parse().unwrap(),
                })
                .collect(),
            blocks: BTreeMap::new(),
        }
    }

    fn nets(v: &[&str]) -> BTreeSet<IpNetwork> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn free_blocks_skip_claimed_overlapping_and_fully_reserved_ones() {
        // The first /26 is all reserved (the VPC's appliances), the second claimed, a /27
        // claimed by hand overlaps the fourth.
        let s = subnet("10.20.0.0/24", &[("10.20.0.1", "10.20.0.63")]);
        let claimed = nets(&["10.20.0.64/26", "10.20.0.224/27"]);
        let free: Vec<String> = free_blocks(&s, 26, &claimed)
            .map(|b| b.to_string())
            .collect();
        assert_eq!(free, ["10.20.0.128/26"]);
        assert_eq!(free_blocks(&s, 24, &BTreeSet::new()).count(), 1);
        assert_eq!(
            free_blocks(&s, 23, &BTreeSet::new()).count(),
            0,
            "block larger than the subnet"
        );
    }

    /// The definition, block by block against every claim.
    fn free_blocks_slowly(
        s: &SubnetConfig,
        size: u8,
        claimed: &BTreeSet<IpNetwork>,
    ) -> Vec<IpNetwork> {
        let n = 1u32 << (size - s.cidr.prefix());
        (0..n)
            .map(|i| {
                let first = u32::from(match s.cidr.network() {
                    IpAddr::V4(a) => a,
                    IpAddr::V6(_) => unreachable!(),
                }) + (i << (32 - size));
                IpNetwork::new(IpAddr::V4(first.into()), size).unwrap()
            })
            .filter(|b| {
                !claimed
                    .iter()
                    .any(|c| c.contains(b.network()) || b.contains(c.network()))
            })
            .filter(|b| !all_reserved(s, *b))
            .collect()
    }

    #[test]
    fn free_blocks_match_the_definition() {
        // Claims of every shape: block-sized, smaller, larger, outside the subnet, the other
        // family, adjacent and nested; plus reserved ranges.
        let s = subnet(
            "10.1.0.0/20",
            &[("10.1.0.1", "10.1.0.127"), ("10.1.3.0", "10.1.3.255")],
        );
        let mut seed = 0x9e37_79b9_u32;
        let mut rnd = |m: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % m
        };
        for round in 0..200 {
            let mut claimed = nets(&["10.2.0.0/26", "fd00::/122"]);
            for _ in 0..rnd(40) {
                let prefix = 22 + rnd(9) as u8;
                let at = 0x0a01_0000 + rnd(1 << 13) * 4;
                claimed.insert(IpNetwork::new(IpAddr::V4(at.into()), prefix).unwrap());
            }
            for size in [24, 26, 28] {
                let fast: Vec<IpNetwork> = free_blocks(&s, size, &claimed).collect();
                assert_eq!(
                    fast,
                    free_blocks_slowly(&s, size, &claimed),
                    "round {round} /{size} {claimed:?}"
                );
            }
        }
    }

    #[test]
    fn free_blocks_of_a_wide_subnet_walk_past_runs_of_claims() {
        // A /16 of /26 blocks, every block but a few claimed: the walk finds the free ones
        // without visiting the claimed ones one by one against every claim.
        let s = subnet("10.0.0.0/16", &[]);
        let free_at = [7u32, 500, 1023];
        let claimed: BTreeSet<IpNetwork> = (0..1024u32)
            .filter(|i| !free_at.contains(i))
            .map(|i| IpNetwork::new(IpAddr::V4((0x0a00_0000 + i * 64).into()), 26).unwrap())
            .collect();
        let free: Vec<String> = free_blocks(&s, 26, &claimed)
            .map(|b| b.to_string())
            .collect();
        assert_eq!(free, ["10.0.1.192/26", "10.0.125.0/26", "10.0.255.192/26"]);
        let mut all = claimed.clone();
        all.extend(nets(&["10.0.1.192/26", "10.0.125.0/26", "10.0.255.192/26"]));
        assert_eq!(free_blocks(&s, 26, &all).next(), None);
    }

    #[test]
    fn ipv6_blocks_are_enumerated_lazily() {
        let s = subnet("fd00::/64", &[]);
        let none = BTreeSet::new();
        let mut it = free_blocks(&s, 122, &none);
        assert_eq!(it.next().unwrap().to_string(), "fd00::/122");
        assert_eq!(it.next().unwrap().to_string(), "fd00::40/122");
    }
}
