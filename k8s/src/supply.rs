//! This node's share of the cluster's addresses: blocks claimed through the API server on
//! demand and kept one step ahead of use, given back when they stay empty, and pods' fixed
//! addresses claimed cluster-wide.
//!
//! The node's store stays the authority inside its blocks; this module only decides which
//! blocks the store may use. It publishes the topology the store and the dataplane apply: the
//! watched one, plus blocks this node claimed that the watch has not shown yet, minus blocks it
//! is giving back, with other nodes' fixed addresses reserved. A block is given back only after
//! the store has stopped using it and holds nothing in it, so no address is ever handed out from
//! a block another node may claim next.

use crate::claims::{self, ClaimError};
use crate::crd::{self, IPBlock, IPClaim, IPClaimSpec};
use crate::fold::NodeInfo;
use crate::topology::Built;
use crate::watch::Published;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use vpcnet_ipam::{IpRange, Ipam};

/// A pod annotation: keep the pod's `vpcnet.io/ip` claimed for its StatefulSet, so the pod
/// recreated (on any node) gets it back.
pub const ANNOTATION_KEEP_IP: &str = "vpcnet.io/keep-ip";

/// How long an ADD waits for a block claim (API round trips and the store taking the block)
/// before it answers "try again".
const CLAIM_WAIT: Duration = Duration::from_secs(10);
/// How often the spare and give-back rules are looked at without a change to prompt it.
const TICK: Duration = Duration::from_secs(30);

/// Why a claim did not give what was asked, in words for `kubectl describe pod`. The daemon's
/// agent takes it as is (its `AddressSupply` port returns this type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupplyError {
    /// Another pod holds the address (refused; the ADD fails with a clear message).
    #[error("{0}")]
    Taken(String),
    /// No block is left in the subnet, cluster-wide.
    #[error("{0}")]
    Exhausted(String),
    /// Cannot be had now; retrying later may work (API server away, not synced, too slow).
    #[error("{0}")]
    Unavailable(String),
}

/// Why a block claim failed, as the metrics tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimFailure {
    /// Other nodes won the race for every block tried.
    Conflict,
    /// No block left in the subnet, cluster-wide.
    Exhausted,
    /// The API server refused or could not be reached.
    ApiError,
    /// The claim (and the store taking the block) did not complete within the ADD's bound.
    Timeout,
    /// Not synced yet, the subnet not in force, or this Node unknown.
    NotReady,
}

impl ClaimFailure {
    pub const ALL: [ClaimFailure; 5] = [
        ClaimFailure::Conflict,
        ClaimFailure::Exhausted,
        ClaimFailure::ApiError,
        ClaimFailure::Timeout,
        ClaimFailure::NotReady,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            ClaimFailure::Conflict => "conflict",
            ClaimFailure::Exhausted => "exhausted",
            ClaimFailure::ApiError => "api-error",
            ClaimFailure::Timeout => "timeout",
            ClaimFailure::NotReady => "not-ready",
        }
    }
}

/// Counters for the daemon's metrics.
#[derive(Debug, Default)]
pub struct SupplyCounters {
    pub blocks_claimed: AtomicU64,
    pub blocks_released: AtomicU64,
    /// Indexed like [`ClaimFailure::ALL`].
    claim_failures: [AtomicU64; ClaimFailure::ALL.len()],
    /// Fixed addresses refused because another pod holds them.
    pub fixed_refused: AtomicU64,
    /// Time of the last block claim (API call and the store taking it), in microseconds.
    pub last_claim_micros: AtomicU64,
}

impl SupplyCounters {
    fn failed(&self, why: ClaimFailure) {
        self.claim_failures[why as usize].fetch_add(1, Relaxed);
    }

    pub fn claim_failures(&self, why: ClaimFailure) -> u64 {
        self.claim_failures[why as usize].load(Relaxed)
    }
}

/// One subnet as this node's supply sees it, for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetSupply {
    pub network: String,
    pub subnet: String,
    /// Addresses a dynamic allocation could take now in this node's blocks.
    pub free_here: u64,
    /// No block of the subnet is left to claim, cluster-wide.
    pub exhausted: bool,
}

#[derive(Default)]
struct Local {
    /// Claimed by this node, not yet seen in the watch: (network, subnet, block).
    pending: Vec<(String, String, IpNetwork)>,
    /// Being given back: taken out of the store's topology first, deleted after.
    draining: BTreeSet<(String, IpNetwork)>,
    /// Since when each of this node's blocks has held no address.
    empty_since: BTreeMap<(String, IpNetwork), Instant>,
    /// Subnets an ADD asked for: they keep a spare like the default subnet.
    demand: BTreeSet<(String, String)>,
    /// Why the last claim in a subnet failed, until one succeeds.
    failures: BTreeMap<(String, String), String>,
    /// Fixed addresses claimed (or moved) to this node that the watch may still show on
    /// another: not reserved here meanwhile.
    claimed_here: BTreeSet<(String, IpAddr)>,
}

pub struct Supply {
    node: String,
    blocks: Api<IPBlock>,
    ip_claims: Api<IPClaim>,
    client: kube::Client,
    published: Published,
    ipam: Arc<Ipam>,
    grace: Duration,
    local: Mutex<Local>,
    effective: watch::Sender<Option<Arc<Built>>>,
    /// One claim at a time: two ADDs finding the store full claim one block, not two.
    claiming: tokio::sync::Mutex<()>,
    wake: Notify,
    runtime: tokio::runtime::Handle,
    pub counters: SupplyCounters,
}

impl Supply {
    /// Must be called inside the runtime the claims run on.
    pub fn new(
        client: kube::Client,
        node: impl Into<String>,
        published: Published,
        ipam: Arc<Ipam>,
        grace: Duration,
    ) -> Arc<Supply> {
        Arc::new(Supply {
            node: node.into(),
            blocks: Api::all(client.clone()),
            ip_claims: Api::all(client.clone()),
            client,
            published,
            ipam,
            grace,
            local: Mutex::default(),
            effective: watch::Sender::new(None),
            claiming: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            runtime: tokio::runtime::Handle::current(),
            counters: SupplyCounters::default(),
        })
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topology this node's store and dataplane should apply (`None` until the watches have
    /// synced).
    pub fn topology(&self) -> watch::Receiver<Option<Arc<Built>>> {
        self.effective.subscribe()
    }

    /// Prompts a look at the spare and give-back rules (after an allocation, a release, or the
    /// store applying a topology).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The subnet a Subnet's namespace selector gives a namespace with `labels`.
    pub fn subnet_for_namespace(
        &self,
        labels: &vpcnet_policy::model::Labels,
    ) -> Option<(String, String)> {
        let b = self.effective.borrow();
        let s = b.as_ref()?.subnet_for_namespace(labels)?;
        Some((s.network.clone(), s.subnet.clone()))
    }

    /// Why this node cannot serve pods yet: no network defined, or no block in hand.
    pub fn problems(&self) -> Vec<String> {
        let Some(built) = self.effective.borrow().clone() else {
            return vec!["waiting for the VirtualNetwork, Subnet and IPBlock lists".into()];
        };
        let mut out = Vec::new();
        let Some(net) = built.ipam.default_network() else {
            out.push("no VirtualNetwork with a usable Subnet exists: create one (manifests/examples/network.yaml)".into());
            return out;
        };
        let held = self.ipam.config();
        let mine = held
            .networks
            .iter()
            .flat_map(|n| &n.subnets)
            .any(|s| !s.node_blocks(&self.node).is_empty());
        if !mine {
            let sub = net.default_subnet().map(|s| s.name.as_str()).unwrap_or("?");
            let why = self
                .local()
                .failures
                .get(&(net.name.clone(), sub.to_string()))
                .cloned()
                .unwrap_or_else(|| "the claim is in progress".into());
            out.push(format!(
                "no IPAM block of subnet {sub:?} (network {:?}) is claimed for this node yet: {why}",
                net.name
            ));
        }
        out
    }

    /// Warnings to show while serving: subnets whose claims fail.
    pub fn warnings(&self) -> Vec<String> {
        self.local()
            .failures
            .iter()
            .map(|((n, s), why)| {
                format!("claiming a block of subnet {s:?} (network {n:?}) fails: {why}")
            })
            .collect()
    }

    /// Every subnet in force: this node's free addresses in it, and whether a block is left to
    /// claim cluster-wide (what the metrics show).
    pub fn subnet_supply(&self) -> Vec<SubnetSupply> {
        let Some(built) = self.effective.borrow().clone() else {
            return Vec::new();
        };
        let mut claimed: BTreeMap<String, BTreeSet<IpNetwork>> = BTreeMap::new();
        {
            let f = self
                .published
                .fold
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for b in f.blocks.values() {
                if let Ok(cidr) = b.spec.cidr.0.parse() {
                    claimed
                        .entry(b.spec.network.clone())
                        .or_default()
                        .insert(cidr);
                }
            }
        }
        for (n, _, b) in &self.local().pending {
            claimed.entry(n.clone()).or_default().insert(*b);
        }
        let free = free_by_subnet(&self.ipam);
        let none = BTreeSet::new();
        let mut out = Vec::new();
        for net in &built.ipam.networks {
            for sub in &net.subnets {
                let key = (net.name.clone(), sub.name.clone());
                let size = built.block_sizes.get(&key).copied().unwrap_or(26);
                let taken = claimed.get(&net.name).unwrap_or(&none);
                out.push(SubnetSupply {
                    exhausted: claims::free_blocks(sub, size, taken).next().is_none(),
                    free_here: free.get(&key).copied().unwrap_or(0),
                    network: key.0,
                    subnet: key.1,
                });
            }
        }
        out
    }

    /// Recomputes the published topology from the watched one and this node's own changes.
    fn refresh(&self) {
        let Some(built) = self.published.topology.borrow().clone() else {
            return;
        };
        let claims: Vec<IPClaim> = {
            let f = self
                .published
                .fold
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            f.claims.values().cloned().collect()
        };
        let mut l = self.local();
        let node = self.node.as_str();
        l.pending.retain(|(n, s, b)| !holds(&built, node, n, s, *b));
        l.claimed_here.retain(|(n, ip)| {
            claims
                .iter()
                .any(|c| c.spec.network == *n && c.spec.ip == ip.to_string() && c.spec.node != node)
        });
        l.draining
            .retain(|(n, b)| built_blocks(&built, node).any(|(bn, _, bb)| bn == n && bb == *b));
        let mut eff = (*built).clone();
        for net in &mut eff.ipam.networks {
            for sub in &mut net.subnets {
                let list = sub.blocks.entry(node.to_string()).or_default();
                for (n, s, b) in &l.pending {
                    if *n == net.name && *s == sub.name && !list.contains(b) {
                        list.push(*b);
                    }
                }
                list.retain(|b| !l.draining.contains(&(net.name.clone(), *b)));
                list.sort();
                if list.is_empty() {
                    sub.blocks.remove(node);
                }
                // Another node's pod holds these: never hand them out here.
                for c in &claims {
                    let Ok(ip) = c.spec.ip.parse::<IpAddr>() else {
                        continue;
                    };
                    if c.spec.network == net.name
                        && c.spec.node != node
                        && !l.claimed_here.contains(&(net.name.clone(), ip))
                        && sub.cidr.contains(ip)
                        && ip != sub.cidr.network()
                    {
                        sub.reserved.push(IpRange { start: ip, end: ip });
                    }
                }
            }
        }
        drop(l);
        let eff = Arc::new(eff);
        self.effective.send_if_modified(|cur| {
            if cur.as_deref() == Some(&*eff) {
                false
            } else {
                *cur = Some(eff);
                true
            }
        });
    }

    /// Follows the watches and keeps this node's blocks: call once, it runs until the daemon
    /// stops.
    pub async fn run(self: Arc<Self>) {
        let mut topo = self.published.topology.clone();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = topo.changed() => if r.is_err() { return },
                () = self.wake.notified() => {}
                _ = tick.tick() => {}
            }
            self.refresh();
            if !self.applied() {
                // The store takes the new topology first; its apply wakes this loop again.
                continue;
            }
            self.keep_spares().await;
            self.give_back().await;
        }
    }

    /// Whether the store has applied the topology published last.
    fn applied(&self) -> bool {
        let eff = self.effective.borrow().clone();
        eff.is_some_and(|e| self.ipam.config().networks == e.ipam.networks)
    }

    /// Subnets that keep a spare: the default subnet of the default network, every subnet this
    /// node holds a block of, and every subnet an ADD asked for.
    fn used_subnets(&self, built: &Built) -> BTreeSet<(String, String)> {
        let mut used = self.local().demand.clone();
        if let Some(net) = built.ipam.default_network()
            && let Some(sub) = net.default_subnet()
        {
            used.insert((net.name.clone(), sub.name.clone()));
        }
        for (n, s, _) in built_blocks(built, &self.node) {
            used.insert((n.to_string(), s.to_string()));
        }
        used
    }

    /// Claims a block in every used subnet whose free addresses here fell below half a block:
    /// an ADD then finds room without waiting for the API server, unless pods arrive faster
    /// than a claim round trip.
    async fn keep_spares(&self) {
        let Some(built) = self.effective.borrow().clone() else {
            return;
        };
        let free = free_by_subnet(&self.ipam);
        for (n, s) in self.used_subnets(&built) {
            let Some(size) = built.block_sizes.get(&(n.clone(), s.clone())) else {
                continue;
            };
            let have = free.get(&(n.clone(), s.clone())).copied().unwrap_or(0);
            if u128::from(have) * 2 < block_capacity(&built, &n, &s, *size)
                && let Err(e) = self.claim_block(&n, &s).await
            {
                tracing::warn!(network = %n, subnet = %s, error = %e, "keeping a spare block failed");
            }
        }
    }

    /// Claims the next free block of `network`/`subnet` for this node and publishes it; returns
    /// once it is published (not yet applied by the store).
    async fn claim_block(&self, network: &str, subnet: &str) -> Result<IpNetwork, SupplyError> {
        let _one = self.claiming.lock().await;
        let key = (network.to_string(), subnet.to_string());
        let not_ready = |text: String| {
            self.counters.failed(ClaimFailure::NotReady);
            self.local().failures.insert(key.clone(), text.clone());
            SupplyError::Unavailable(text)
        };
        let Some(built) = self.effective.borrow().clone() else {
            return Err(not_ready("the topology is not synced yet".into()));
        };
        let Some(sub) = built
            .ipam
            .network(network)
            .and_then(|n| n.subnet(subnet))
            .cloned()
        else {
            return Err(not_ready(format!(
                "subnet {subnet:?} of network {network:?} is not in force"
            )));
        };
        let size = built.block_sizes.get(&key).copied().unwrap_or(26);
        let (node, claimed) = {
            let f = self
                .published
                .fold
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let node: Option<NodeInfo> = f.nodes.get(&self.node).cloned();
            let claimed: BTreeSet<IpNetwork> = f
                .blocks
                .values()
                .filter(|b| b.spec.network == network)
                .filter_map(|b| b.spec.cidr.0.parse().ok())
                .collect();
            (node, claimed)
        };
        let Some(node) = node else {
            return Err(not_ready(format!(
                "Node {:?} is not known to the API server: VPCNET_NODE must be this node's name (spec.nodeName), and RBAC must allow watching nodes",
                self.node
            )));
        };
        let mut claimed = claimed;
        claimed.extend(self.local().pending.iter().map(|(_, _, b)| *b));
        let started = Instant::now();
        let result =
            claims::claim_next_block(&self.blocks, &node, network, &sub, size, &claimed).await;
        match result {
            Ok(obj) => {
                let block: IpNetwork = obj.spec.cidr.0.parse().map_err(|_| {
                    SupplyError::Unavailable("the API server returned a bad block".into())
                })?;
                {
                    let mut l = self.local();
                    l.pending.push((network.into(), subnet.into(), block));
                    l.failures.remove(&key);
                }
                self.counters.blocks_claimed.fetch_add(1, Relaxed);
                self.counters
                    .last_claim_micros
                    .store(started.elapsed().as_micros() as u64, Relaxed);
                tracing::info!(%block, network, subnet, "claimed an IPAM block");
                self.refresh();
                Ok(block)
            }
            Err(e) => {
                let (why, err) = match e {
                    ClaimError::Exhausted { .. } => {
                        let in_subnet = claimed.iter().filter(|b| sub.cidr.contains(b.network()));
                        let text = exhausted_message(
                            network,
                            &sub,
                            size,
                            in_subnet.count(),
                            free_by_subnet(&self.ipam).get(&key).copied().unwrap_or(0),
                        );
                        (ClaimFailure::Exhausted, SupplyError::Exhausted(text))
                    }
                    ClaimError::Taken { .. } => (
                        ClaimFailure::Conflict,
                        SupplyError::Unavailable(format!(
                            "{e}: other nodes are claiming blocks of subnet {subnet:?} faster than this node sees them; retrying"
                        )),
                    ),
                    ClaimError::Api { .. } => (
                        ClaimFailure::ApiError,
                        SupplyError::Unavailable(e.to_string()),
                    ),
                };
                self.counters.failed(why);
                self.local().failures.insert(key, err.to_string());
                Err(err)
            }
        }
    }

    /// For an ADD that found no room in `network`/`subnet`: claims a block and returns once the
    /// store can allocate from it. Blocking; call from a blocking thread.
    pub fn claim_block_now(&self, network: &str, subnet: &str) -> Result<(), SupplyError> {
        self.local()
            .demand
            .insert((network.to_string(), subnet.to_string()));
        self.bounded(
            || format!("no block of subnet {subnet:?} of network {network:?} could be claimed"),
            async {
                let block = self.claim_block(network, subnet).await?;
                // The daemon applies the published topology; wait for the store to hold it.
                while !self
                    .ipam
                    .config()
                    .network(network)
                    .and_then(|n| n.subnet(subnet))
                    .is_some_and(|s| s.node_blocks(&self.node).contains(&block))
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(())
            },
        )
    }

    /// Runs a claim on the daemon's runtime from a blocking thread, bounded by [`CLAIM_WAIT`]:
    /// an ADD answers "try again" rather than hang on an API server that does not answer.
    fn bounded<T>(
        &self,
        what: impl FnOnce() -> String,
        claim: impl Future<Output = Result<T, SupplyError>>,
    ) -> Result<T, SupplyError> {
        self.runtime.block_on(async {
            tokio::time::timeout(CLAIM_WAIT, claim)
                .await
                .unwrap_or_else(|_| {
                    self.counters.failed(ClaimFailure::Timeout);
                    Err(SupplyError::Unavailable(format!(
                        "{} within {CLAIM_WAIT:?} (is the API server reachable?)",
                        what()
                    )))
                })
        })
    }

    /// Gives back blocks that held nothing for the grace period, keeping at least one per
    /// subnet and never going below the spare rule.
    async fn give_back(&self) {
        let Some(built) = self.effective.borrow().clone() else {
            return;
        };
        let Ok(live) = self.ipam.list() else {
            return;
        };
        let live: Vec<IpAddr> = live
            .iter()
            .flat_map(|e| e.ips().collect::<Vec<_>>())
            .collect();
        let free = free_by_subnet(&self.ipam);
        let now = Instant::now();
        let mine: Vec<(String, String, IpNetwork)> = built_blocks(&built, &self.node)
            .map(|(n, s, b)| (n.to_string(), s.to_string(), b))
            .collect();
        let mut candidates = Vec::new();
        {
            let mut l = self.local();
            let pending: BTreeSet<IpNetwork> = l.pending.iter().map(|(_, _, b)| *b).collect();
            l.empty_since
                .retain(|(n, b), _| mine.iter().any(|(mn, _, mb)| mn == n && mb == b));
            for (n, s, b) in &mine {
                let k = (n.clone(), *b);
                if live.iter().any(|ip| b.contains(*ip)) || pending.contains(b) {
                    l.empty_since.remove(&k);
                    continue;
                }
                let since = *l.empty_since.entry(k).or_insert(now);
                if now.duration_since(since) < self.grace {
                    continue;
                }
                let in_subnet = mine.iter().filter(|(mn, ms, _)| mn == n && ms == s).count();
                let size = built
                    .block_sizes
                    .get(&(n.clone(), s.clone()))
                    .copied()
                    .unwrap_or(26);
                let cap = block_capacity(&built, n, s, size);
                let have = u128::from(free.get(&(n.clone(), s.clone())).copied().unwrap_or(0));
                if in_subnet > 1 && have.saturating_sub(cap) * 2 >= cap {
                    candidates.push((n.clone(), *b));
                }
            }
        }
        // One per look: each changes what the next should decide.
        if let Some((network, block)) = candidates.into_iter().next() {
            self.release(&network, block).await;
        }
    }

    async fn release(&self, network: &str, block: IpNetwork) {
        self.local().draining.insert((network.to_string(), block));
        self.refresh();
        // Wait (bounded) for the store to stop using it; then nothing can be allocated there.
        let deadline = Instant::now() + CLAIM_WAIT;
        let in_store = |s: &Self| {
            s.ipam
                .config()
                .networks
                .iter()
                .filter(|n| n.name == network)
                .flat_map(|n| &n.subnets)
                .any(|sub| sub.node_blocks(&s.node).contains(&block))
        };
        while in_store(self) {
            if Instant::now() > deadline {
                self.undrain(network, block, "the store did not drop it in time");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // An ADD may have allocated there just before the store switched.
        let used = self
            .ipam
            .list()
            .map(|l| l.iter().any(|e| e.ips().any(|ip| block.contains(ip))))
            .unwrap_or(true);
        if used {
            self.undrain(network, block, "an address was allocated in it meanwhile");
            return;
        }
        match claims::release_block(&self.blocks, &crd::block_name(network, block)).await {
            Ok(()) => {
                self.counters.blocks_released.fetch_add(1, Relaxed);
                tracing::info!(%block, network, "gave back an IPAM block that stayed empty");
            }
            Err(e) => self.undrain(network, block, &e.to_string()),
        }
    }

    fn undrain(&self, network: &str, block: IpNetwork, why: &str) {
        tracing::info!(%block, network, why, "keeping the block");
        let mut l = self.local();
        l.draining.remove(&(network.to_string(), block));
        l.empty_since.remove(&(network.to_string(), block));
        drop(l);
        self.refresh();
    }

    /// Claims `ip` of `network` cluster-wide for the pod `namespace/name` on this node, before
    /// the store allocates it: refused when another pod holds it. A pod annotated
    /// `vpcnet.io/keep-ip: "true"` that belongs to a StatefulSet has the claim owned by the
    /// StatefulSet, so the address outlives the pod. Blocking; call from a blocking thread.
    pub fn claim_address_now(
        &self,
        network: &str,
        subnet: &str,
        ip: IpAddr,
        namespace: &str,
        name: &str,
    ) -> Result<(), SupplyError> {
        let r = self.bounded(
            || format!("the claim of {ip} of network {network:?} did not complete"),
            async {
                self.claim_address(network, subnet, ip, namespace, name)
                    .await?;
                self.local().claimed_here.insert((network.to_string(), ip));
                self.refresh();
                // The store must no longer hold it reserved for the node it comes from.
                while self
                    .ipam
                    .config()
                    .network(network)
                    .into_iter()
                    .flat_map(|n| &n.subnets)
                    .any(|s| s.reserved.iter().any(|r| r.start == ip && r.end == ip))
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(())
            },
        );
        if let Err(SupplyError::Taken(_)) = &r {
            self.counters.fixed_refused.fetch_add(1, Relaxed);
        }
        r
    }

    async fn claim_address(
        &self,
        network: &str,
        subnet: &str,
        ip: IpAddr,
        namespace: &str,
        name: &str,
    ) -> Result<(), SupplyError> {
        let api_err = |e: kube::Error| {
            self.counters.failed(ClaimFailure::ApiError);
            SupplyError::Unavailable(format!("claiming {ip}: {e}"))
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .map_err(api_err)?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let keep = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_KEEP_IP))
            .is_some_and(|v| v == "true");
        let set = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "StatefulSet" && o.controller == Some(true))
            .cloned();
        let owner = match (keep, set) {
            (true, Some(s)) => OwnerReference {
                block_owner_deletion: None,
                controller: None,
                ..s
            },
            _ => OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: name.into(),
                uid: uid.clone(),
                block_owner_deletion: None,
                controller: None,
            },
        };
        // Another pod of the cluster may already hold it without a claim (a pod of another node
        // that took it dynamically): refuse rather than duplicate an address.
        if let IpAddr::V4(v4) = ip {
            let f = self
                .published
                .fold
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(p) = f.state().pod_by_ip(v4)
                && (p.namespace != namespace || p.name != name)
            {
                return Err(SupplyError::Taken(format!(
                    "{ip} is in use by pod {}/{}: delete that pod or choose another address",
                    p.namespace, p.name
                )));
            }
        }
        let spec = IPClaimSpec {
            network: network.into(),
            subnet: subnet.into(),
            ip: ip.to_string(),
            namespace: namespace.into(),
            pod: name.into(),
            node: self.node.clone(),
        };
        match claims::claim_ip(&self.ip_claims, network, spec.clone(), owner.clone()).await {
            Ok(_) => Ok(()),
            Err(ClaimError::Taken { .. }) => {
                let cname = crd::claim_name(network, ip);
                let held = self.ip_claims.get(&cname).await.map_err(api_err)?;
                if held.spec.namespace != namespace || held.spec.pod != name {
                    return Err(SupplyError::Taken(format!(
                        "{ip} of network {network:?} is claimed by pod {}/{} (IPClaim {cname}): delete that pod (or its StatefulSet) or choose another address",
                        held.spec.namespace, held.spec.pod
                    )));
                }
                // The same pod again (recreated, maybe on another node): move the claim here and
                // to this incarnation, unless its StatefulSet owns it.
                let owners = held.metadata.owner_references.clone().unwrap_or_default();
                let by_set = owners.iter().any(|o| o.kind == "StatefulSet");
                let patch = serde_json::json!({
                    "metadata": { "ownerReferences": if by_set && keep { owners } else { vec![owner] } },
                    "spec": { "node": self.node, "subnet": subnet },
                });
                self.ip_claims
                    .patch(&cname, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(api_err)?;
                Ok(())
            }
            Err(e) => {
                self.counters.failed(ClaimFailure::ApiError);
                Err(SupplyError::Unavailable(e.to_string()))
            }
        }
    }
}

/// What an ADD answers when no block of `subnet` is left: where the addresses are, and what an
/// operator can do about it.
fn exhausted_message(
    network: &str,
    subnet: &vpcnet_ipam::SubnetConfig,
    block_size: u8,
    claimed: usize,
    free_here: u64,
) -> String {
    let total = 1u128
        .checked_shl(u32::from(block_size.saturating_sub(subnet.cidr.prefix())))
        .unwrap_or(u128::MAX);
    let reserved = total.saturating_sub(claimed as u128);
    format!(
        "subnet {:?} ({}) of network {network:?} is exhausted: 0 of {total} blocks of /{block_size} free cluster-wide ({claimed} claimed by nodes, {reserved} wholly reserved), {free_here} addresses free in this node's blocks; widen the Subnet's spec.cidr, add a Subnet and select this namespace to it, or delete pods of this subnet (addresses released within the cooldown come back by themselves)",
        subnet.name, subnet.cidr
    )
}

/// Whether `built` gives `block` of `network`/`subnet` to `node`.
fn holds(built: &Built, node: &str, network: &str, subnet: &str, block: IpNetwork) -> bool {
    built
        .ipam
        .network(network)
        .and_then(|n| n.subnet(subnet))
        .is_some_and(|s| s.node_blocks(node).contains(&block))
}

fn built_blocks<'a>(
    built: &'a Built,
    node: &'a str,
) -> impl Iterator<Item = (&'a str, &'a str, IpNetwork)> + 'a {
    built.ipam.networks.iter().flat_map(move |n| {
        n.subnets.iter().flat_map(move |s| {
            s.node_blocks(node)
                .iter()
                .map(move |b| (n.name.as_str(), s.name.as_str(), *b))
        })
    })
}

/// Free addresses of this node's blocks per (network, subnet).
fn free_by_subnet(ipam: &Ipam) -> BTreeMap<(String, String), u64> {
    ipam.free_counts()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, n)| {
            let (net, sub) = k.split_once('/')?;
            Some(((net.to_string(), sub.to_string()), n))
        })
        .collect()
}

/// Addresses in one block of the subnet (all of them: a VPC hands out a block's network and
/// broadcast addresses like any other).
fn block_capacity(built: &Built, network: &str, subnet: &str, size: u8) -> u128 {
    let bits = built
        .ipam
        .network(network)
        .and_then(|n| n.subnet(subnet))
        .map(|s| if s.cidr.is_ipv4() { 32 } else { 128 })
        .unwrap_or(32);
    1u128
        .checked_shl(u32::from(bits - size.min(bits)))
        .unwrap_or(u128::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_says_where_the_addresses_are_and_what_to_do() {
        let sub = vpcnet_ipam::SubnetConfig {
            name: "s1".into(),
            cidr: "10.20.0.0/24".parse().unwrap(),
            gateway: None,
            reserved: Vec::new(),
            blocks: BTreeMap::new(),
        };
        let text = exhausted_message("vpc", &sub, 26, 3, 5);
        for part in [
            "subnet \"s1\" (10.20.0.0/24) of network \"vpc\"",
            "0 of 4 blocks of /26 free cluster-wide",
            "3 claimed by nodes, 1 wholly reserved",
            "5 addresses free in this node's blocks",
            "widen the Subnet's spec.cidr, add a Subnet",
        ] {
            assert!(text.contains(part), "{part:?} not in {text:?}");
        }
    }

    #[test]
    fn every_failure_reason_has_its_own_counter_and_label() {
        let c = SupplyCounters::default();
        for (i, why) in ClaimFailure::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                c.failed(why);
            }
        }
        let labels: BTreeSet<&str> = ClaimFailure::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(labels.len(), ClaimFailure::ALL.len());
        for (i, why) in ClaimFailure::ALL.into_iter().enumerate() {
            assert_eq!(c.claim_failures(why), i as u64 + 1, "{why:?}");
        }
    }
}
