//! The durable allocator: one redb file, one write transaction per mutating call.
//!
//! Tables (all kept consistent inside every transaction):
//! - `allocations`: (container id, ifname) → [`Record`] as JSON — the source of truth;
//! - `by_ip`: address → (container id, ifname) — the uniqueness index, rebuilt from
//!   `allocations` on open if the two disagree;
//! - `cooldown`: address → wall-clock ms of its release;
//! - `cursors`: "network/subnet" → next candidate address;
//! - `meta`: schema version;
//! - `write_check`: empty; [`Ipam::health`] writes and removes a row to see whether writes work.

use crate::IpamError;
use crate::model::{IpamConfig, NetworkConfig, SubnetConfig};
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vpcnet_api::{AttachmentKey, PodRef};

type KeyCols = (&'static str, &'static str);
const ALLOCATIONS: TableDefinition<KeyCols, &[u8]> = TableDefinition::new("allocations");
const BY_IP: TableDefinition<u32, KeyCols> = TableDefinition::new("by_ip");
const COOLDOWN: TableDefinition<u32, u64> = TableDefinition::new("cooldown");
const CURSORS: TableDefinition<&str, u32> = TableDefinition::new("cursors");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Scratch space for [`Ipam::health`]'s trial write; empty between trials.
const WRITE_CHECK: TableDefinition<&str, &[u8]> = TableDefinition::new("write_check");

/// Bumped when the tables change incompatibly, so an older build refuses a newer file instead of
/// misreading it.
const SCHEMA_VERSION: u64 = 1;

/// What the caller wants an address for.
#[derive(Debug, Clone, Copy)]
pub struct AllocRequest<'a> {
    pub key: &'a AttachmentKey,
    pub pod: &'a PodRef,
    /// `None` → `default_network`, else the first network.
    pub network: Option<&'a str>,
    /// `None` → the network's `default_subnet`, else its first subnet; with a `static_ip`, the
    /// subnet that contains the address.
    pub subnet: Option<&'a str>,
    pub static_ip: Option<Ipv4Addr>,
    pub host_veth: &'a str,
}

/// One committed allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: AttachmentKey,
    pub ip: Ipv4Addr,
    /// The subnet's prefix length (the pod interface itself gets a /32).
    pub prefix_len: u8,
    pub network: String,
    pub subnet: String,
    pub pod: PodRef,
    pub host_veth: String,
    pub created_unix_ms: u64,
    /// Set once the dataplane serves the endpoint ([`Ipam::mark_ready`]).
    pub ready: bool,
}

/// A subnet reduced to integer ranges, precomputed once per open.
#[derive(Debug)]
struct SubnetPlan {
    network_addr: u32,
    broadcast: u32,
    gateway: u32,
    reserved: Vec<(u32, u32)>,
    /// This node's blocks, sorted and disjoint (validated), inclusive.
    blocks: Vec<(u32, u32)>,
    blocks_text: String,
}

impl SubnetPlan {
    fn new(sub: &SubnetConfig, node: &str) -> SubnetPlan {
        let mut blocks: Vec<(u32, u32)> = sub
            .node_blocks(node)
            .iter()
            .map(|b| (u32::from(b.network()), u32::from(b.broadcast())))
            .collect();
        blocks.sort_unstable();
        let blocks_text = sub
            .node_blocks(node)
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        SubnetPlan {
            network_addr: u32::from(sub.cidr.network()),
            broadcast: u32::from(sub.cidr.broadcast()),
            gateway: u32::from(sub.effective_gateway()),
            reserved: sub
                .reserved
                .iter()
                .map(|r| (u32::from(r.start), u32::from(r.end)))
                .collect(),
            blocks,
            blocks_text,
        }
    }

    fn is_infra(&self, ip: u32) -> bool {
        ip == self.network_addr
            || ip == self.broadcast
            || ip == self.gateway
            || self.reserved.iter().any(|&(lo, hi)| lo <= ip && ip <= hi)
    }

    fn infra_what(&self, ip: u32) -> Option<String> {
        if ip == self.network_addr {
            Some("the network address".into())
        } else if ip == self.broadcast {
            Some("the broadcast address".into())
        } else if ip == self.gateway {
            Some("the gateway".into())
        } else {
            self.reserved
                .iter()
                .find(|&&(lo, hi)| lo <= ip && ip <= hi)
                .map(|&(lo, hi)| {
                    format!(
                        "in the reserved range {}-{}",
                        Ipv4Addr::from(lo),
                        Ipv4Addr::from(hi)
                    )
                })
        }
    }

    /// Addresses of `lo..=hi` that are infrastructure, counted without walking the range.
    fn infra_count_in(&self, lo: u32, hi: u32) -> u64 {
        let mut spans: Vec<(u32, u32)> = [self.network_addr, self.broadcast, self.gateway]
            .iter()
            .map(|&a| (a, a))
            .chain(self.reserved.iter().copied())
            .filter_map(|(a, b)| {
                let (a, b) = (a.max(lo), b.min(hi));
                (a <= b).then_some((a, b))
            })
            .collect();
        spans.sort_unstable();
        let mut total = 0u64;
        let mut covered_to: Option<u32> = None;
        for (a, b) in spans {
            let start = match covered_to {
                Some(c) if c >= b => continue,
                Some(c) if c >= a => c + 1,
                _ => a,
            };
            total += u64::from(b - start) + 1;
            covered_to = Some(b);
        }
        total
    }
}

/// Every address of `blocks`, starting at `cursor` (or the next block after it) and wrapping
/// round once, so recently released addresses are the last to be reused.
fn ring(blocks: &[(u32, u32)], cursor: u32) -> impl Iterator<Item = u32> + '_ {
    let (i, start) = match blocks.iter().position(|&(_, hi)| hi >= cursor) {
        Some(i) => (i, blocks[i].0.max(cursor)),
        None => (0, blocks.first().map_or(0, |b| b.0)),
    };
    let (head, tail) = blocks.split_at(i.min(blocks.len()));
    let (first, after) = match tail.split_first() {
        Some((first, after)) => (Some(*first), after),
        None => (None, tail),
    };
    let first_part = first.map(|(_, hi)| start..=hi).into_iter().flatten();
    let wrapped = first.map(|(lo, _)| lo..start).into_iter().flatten();
    first_part
        .chain(after.iter().flat_map(|&(lo, hi)| lo..=hi))
        .chain(head.iter().flat_map(|&(lo, hi)| lo..=hi))
        .chain(wrapped)
}

fn key_cols(key: &AttachmentKey) -> (&str, &str) {
    (key.container_id.as_str(), key.ifname.as_str())
}

fn key_of(cols: (&str, &str)) -> AttachmentKey {
    AttachmentKey {
        container_id: cols.0.to_string(),
        ifname: cols.1.to_string(),
    }
}

fn describe_key(key: &AttachmentKey) -> String {
    format!(
        "container {:?} interface {:?}",
        key.container_id, key.ifname
    )
}

fn describe(key: &AttachmentKey, pod: Option<&PodRef>) -> String {
    match pod {
        Some(p) if !p.name.is_empty() => {
            format!("pod {}/{} ({})", p.namespace, p.name, describe_key(key))
        }
        _ => describe_key(key),
    }
}

fn load<T: ReadableTable<KeyCols, &'static [u8]>>(
    table: &T,
    key: &AttachmentKey,
) -> Result<Option<Record>, IpamError> {
    match table.get(key_cols(key))? {
        Some(raw) => Ok(Some(serde_json::from_slice(raw.value())?)),
        None => Ok(None),
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Default)]
struct ScanStats {
    allocated: u32,
    cooling: u32,
    cooling_ms_left: u64,
    reserved: u32,
}

/// Durable IP address management for one node. `Send + Sync`: share it behind an `Arc`.
///
/// Every mutating call is one redb write transaction committed with
/// [`Durability::Immediate`] before it returns, so a crash at any instant leaves either the old
/// or the new state. Write transactions are serialised by redb; concurrent callers queue.
pub struct Ipam {
    /// Behind a lock so it can be swapped: after one failed write (a full disk) redb fails every
    /// later call with "Previous I/O error" until the file is closed and reopened, which also
    /// runs its repair. `None` between a failed reopen and the next attempt.
    db: RwLock<Option<Database>>,
    /// Set by a write that failed at the I/O level; the next call reopens the file first.
    reopen: AtomicBool,
    /// What the last failed write said, until a write succeeds ([`Ipam::health`]).
    failure: Mutex<Option<String>>,
    last_probe: Mutex<Option<Instant>>,
    path: PathBuf,
    config: IpamConfig,
    node: String,
    /// Parallel to `config.networks[i].subnets[j]`.
    plans: Vec<Vec<SubnetPlan>>,
    open_repairs: Vec<String>,
    #[cfg(test)]
    clock_skew_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Ipam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ipam")
            .field("path", &self.path)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Ipam {
    /// Opens (creating if needed) the store at `path` for `node`, after validating `config`.
    ///
    /// The two indexes are checked against each other and repaired from `allocations` if they
    /// disagree (each repair is logged and kept in [`Ipam::open_repairs`]). Allocations whose
    /// network or subnet left the configuration are kept and listed; they only cannot grow.
    pub fn open(path: &Path, config: IpamConfig, node: &str) -> Result<Ipam, IpamError> {
        if node.is_empty() || node.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(IpamError::InvalidConfig(format!(
                "node name {node:?} must be non-empty and without whitespace"
            )));
        }
        config.validate()?;
        let plans = config
            .networks
            .iter()
            .map(|n| n.subnets.iter().map(|s| SubnetPlan::new(s, node)).collect())
            .collect();
        let db = open_db(path).map_err(|e| {
            let why = match e {
                DatabaseError::DatabaseAlreadyOpen => {
                    "the file is open in another process (is another vpcnetd running?)".to_string()
                }
                other => other.to_string(),
            };
            IpamError::Store(format!("IPAM store {}: cannot open: {why}", path.display()))
        })?;
        let mut ipam = Ipam {
            db: RwLock::new(Some(db)),
            reopen: AtomicBool::new(false),
            failure: Mutex::new(None),
            last_probe: Mutex::new(None),
            path: path.to_path_buf(),
            config,
            node: node.to_string(),
            plans,
            open_repairs: Vec::new(),
            #[cfg(test)]
            clock_skew_ms: std::sync::atomic::AtomicU64::new(0),
        };
        let repairs = ipam.write("open", |txn, now| {
            let mut changed = false;
            {
                let mut meta = txn.open_table(META)?;
                let version = meta.get("schema_version")?.map(|g| g.value());
                match version {
                    None => {
                        meta.insert("schema_version", SCHEMA_VERSION)?;
                        changed = true;
                    }
                    Some(v) if v > SCHEMA_VERSION => {
                        return Err(IpamError::Store(format!(
                            "was written by a newer vpcnet (schema {v}, this build reads up to \
                             {SCHEMA_VERSION}): run the newer vpcnetd"
                        )));
                    }
                    Some(_) => {}
                }
            }
            let (repairs, repaired) = ipam.check(txn, now, true)?;
            Ok((repairs, changed || repaired))
        })?;
        for r in &repairs {
            tracing::warn!(path = %ipam.path.display(), "IPAM store repaired on open: {r}");
        }
        ipam.open_repairs = repairs;
        ipam.warn_orphans();
        Ok(ipam)
    }

    pub fn config(&self) -> &IpamConfig {
        &self.config
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inconsistencies found (and repaired where possible) when the store was opened; empty
    /// after a clean shutdown or crash, since every transaction keeps the indexes consistent.
    pub fn open_repairs(&self) -> &[String] {
        &self.open_repairs
    }

    /// The named network, or the default one (`default_network`, else the first).
    pub fn network(&self, name: Option<&str>) -> Result<&NetworkConfig, IpamError> {
        let i = self.network_index(name)?;
        self.config
            .networks
            .get(i)
            .ok_or_else(|| IpamError::InvalidConfig("no networks are configured".into()))
    }

    /// Allocates an address for `req.key`, or returns the key's existing record unchanged.
    ///
    /// A retried ADD therefore gets the same address. It is an error
    /// ([`IpamError::KeyHoldsOtherAddress`]) if the retry explicitly asks for a different
    /// static address, network or subnet than the one the key holds.
    ///
    /// Dynamic addresses come only from this node's blocks, starting after the last one handed
    /// out in the subnet. A static address:
    /// - must lie in the subnet (when `subnet` is `None`, the network's subnet containing it is
    ///   used), and not be its network, broadcast, gateway or reserved address;
    /// - may lie outside this node's blocks: operators pin addresses (StatefulSets, appliances)
    ///   and the address is still node-unique through the store's index; keeping such
    ///   addresses out of other nodes' blocks is the operator's part;
    /// - is honoured even while cooling down, since the operator asked for exactly this address
    ///   (typically a pod recreated with its pinned IP) and refusing would only delay it.
    pub fn allocate(&self, req: &AllocRequest) -> Result<Record, IpamError> {
        self.write("allocate", |txn, now| {
            let mut allocs = txn.open_table(ALLOCATIONS)?;
            if let Some(existing) = load(&allocs, req.key)? {
                check_same(&existing, req)?;
                return Ok((existing, false));
            }
            let (ni, si) = self.select(req.network, req.subnet, req.static_ip)?;
            let (net, sub, plan) = self.subnet_at(ni, si)?;
            let mut by_ip = txn.open_table(BY_IP)?;
            let mut cooldown = txn.open_table(COOLDOWN)?;
            let ip = match req.static_ip {
                Some(ip) => {
                    self.check_static(ip, net, sub, plan, &allocs, &by_ip, req)?;
                    u32::from(ip)
                }
                None => {
                    let mut cursors = txn.open_table(CURSORS)?;
                    let cursor_name = format!("{}/{}", net.name, sub.name);
                    let ip = self.scan(
                        net,
                        sub,
                        plan,
                        &cursor_name,
                        &cursors,
                        &by_ip,
                        &mut cooldown,
                        now,
                    )?;
                    cursors.insert(cursor_name.as_str(), ip.wrapping_add(1))?;
                    ip
                }
            };
            cooldown.remove(ip)?;
            let rec = Record {
                key: req.key.clone(),
                ip: Ipv4Addr::from(ip),
                prefix_len: sub.cidr.prefix(),
                network: net.name.clone(),
                subnet: sub.name.clone(),
                pod: req.pod.clone(),
                host_veth: req.host_veth.to_string(),
                created_unix_ms: now,
                ready: false,
            };
            let json = serde_json::to_vec(&rec)?;
            allocs.insert(key_cols(req.key), json.as_slice())?;
            by_ip.insert(ip, key_cols(req.key))?;
            Ok((rec, true))
        })
    }

    /// Records that the dataplane serves the attachment; `false` if it holds no address.
    ///
    /// Not fsync'd: losing the flag in a crash only turns the record back into a pending one, whose
    /// veth still exists, so reconcile keeps it and the next durable commit persists the flag. It
    /// saves one disk flush on every CNI ADD.
    pub fn mark_ready(&self, key: &AttachmentKey) -> Result<bool, IpamError> {
        self.write_with("mark ready", Durability::None, |txn, _| {
            let mut allocs = txn.open_table(ALLOCATIONS)?;
            let Some(mut rec) = load(&allocs, key)? else {
                return Ok((false, false));
            };
            if rec.ready {
                return Ok((true, false));
            }
            rec.ready = true;
            let json = serde_json::to_vec(&rec)?;
            allocs.insert(key_cols(key), json.as_slice())?;
            Ok((true, true))
        })
    }

    /// Releases the key's address into cooldown; `None` (and no error) if it holds none, so a
    /// repeated DEL is harmless.
    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Record>, IpamError> {
        self.write("release", |txn, now| {
            let mut t = Tables::open(txn)?;
            let rec = t.release(key, now)?;
            let changed = rec.is_some();
            Ok((rec, changed))
        })
    }

    /// Releases, in one transaction, every allocation whose key is not in `valid` (restricted
    /// to `network` when given — including networks no longer configured) — CNI GC.
    pub fn release_all_except(
        &self,
        valid: &HashSet<AttachmentKey>,
        network: Option<&str>,
    ) -> Result<Vec<Record>, IpamError> {
        self.write("garbage collection", |txn, now| {
            let mut t = Tables::open(txn)?;
            let mut doomed = Vec::new();
            for row in t.allocs.iter()? {
                let (k, v) = row?;
                let key = key_of(k.value());
                if valid.contains(&key) {
                    continue;
                }
                let in_scope = match (network, serde_json::from_slice::<Record>(v.value())) {
                    (None, _) => true,
                    (Some(n), Ok(rec)) => rec.network == n,
                    // Unreadable records are kept out of a scoped GC: we cannot tell their
                    // network, and an unscoped GC still collects them.
                    (Some(_), Err(_)) => false,
                };
                if in_scope {
                    doomed.push(key);
                }
            }
            let mut released = Vec::new();
            for key in &doomed {
                if let Some(rec) = t.release(key, now)? {
                    released.push(rec);
                }
            }
            Ok((released, !doomed.is_empty()))
        })
    }

    /// Releases the given keys in one transaction; returns the records that existed.
    pub fn release_many(&self, keys: &[AttachmentKey]) -> Result<Vec<Record>, IpamError> {
        self.write("release", |txn, now| {
            let mut t = Tables::open(txn)?;
            let mut released = Vec::new();
            for key in keys {
                if let Some(rec) = t.release(key, now)? {
                    released.push(rec);
                }
            }
            let changed = !released.is_empty();
            Ok((released, changed))
        })
    }

    pub fn get(&self, key: &AttachmentKey) -> Result<Option<Record>, IpamError> {
        self.read("read", |txn| load(&txn.open_table(ALLOCATIONS)?, key))
    }

    /// Every allocation, ordered by key. Records that cannot be decoded are logged and left
    /// out (their addresses stay reserved).
    pub fn list(&self) -> Result<Vec<Record>, IpamError> {
        self.read("list", |txn| {
            let allocs = txn.open_table(ALLOCATIONS)?;
            let mut out = Vec::new();
            for row in allocs.iter()? {
                let (k, v) = row?;
                match serde_json::from_slice::<Record>(v.value()) {
                    Ok(rec) => out.push(rec),
                    Err(e) => tracing::warn!(
                        path = %self.path.display(),
                        "IPAM record of {} cannot be decoded ({e}); its address stays reserved",
                        describe_key(&key_of(k.value()))
                    ),
                }
            }
            Ok(out)
        })
    }

    /// `("network/subnet", free)` for every configured subnet, in configuration order: the
    /// addresses of this node's blocks a dynamic allocation could take now (not allocated,
    /// reserved, gateway, network/broadcast or cooling down). 0 for subnets without blocks here.
    /// What is wrong with the store right now (for STATUS and /healthz): the error of the last
    /// failed write, until writes succeed again.
    ///
    /// While a failure is recorded this tries a write at most once per second, so readiness
    /// returns when the disk has room again rather than with the next pod. The trial grows the
    /// file by more than any record does: on a full disk a small update can still fit in pages
    /// redb has free while every allocation fails.
    pub fn health(&self) -> Option<String> {
        lock(&self.failure).as_ref()?;
        let due = {
            let mut last = lock(&self.last_probe);
            let due = last.is_none_or(|t| t.elapsed() >= HEALTH_PROBE_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            let blob = vec![0u8; 64 << 10];
            let put = self.write("write check", |txn, _| {
                txn.open_table(WRITE_CHECK)?
                    .insert("blob", blob.as_slice())?;
                Ok(((), true))
            });
            let cleared = put.and_then(|()| {
                self.write("write check", |txn, _| {
                    txn.open_table(WRITE_CHECK)?.remove("blob")?;
                    Ok(((), true))
                })
            });
            if cleared.is_ok()
                && let Some(was) = lock(&self.failure).take()
            {
                tracing::info!(path = %self.path.display(), "IPAM store writable again (was: {was})");
            }
        }
        lock(&self.failure).clone()
    }

    pub fn free_counts(&self) -> Result<Vec<(String, u64)>, IpamError> {
        let now = self.now_ms();
        self.read("count free addresses", |txn| {
            let by_ip = txn.open_table(BY_IP)?;
            let cooldown = txn.open_table(COOLDOWN)?;
            let mut out = Vec::new();
            for (ni, net) in self.config.networks.iter().enumerate() {
                for (si, sub) in net.subnets.iter().enumerate() {
                    let Some(plan) = self.plans.get(ni).and_then(|p| p.get(si)) else {
                        continue;
                    };
                    let mut free = 0u64;
                    for &(lo, hi) in &plan.blocks {
                        let mut taken = HashSet::new();
                        for row in by_ip.range(lo..=hi)? {
                            let ip = row?.0.value();
                            if !plan.is_infra(ip) {
                                taken.insert(ip);
                            }
                        }
                        let mut cooling = 0u64;
                        for row in cooldown.range(lo..=hi)? {
                            let (ip, released) = row?;
                            let ip = ip.value();
                            if !plan.is_infra(ip)
                                && !taken.contains(&ip)
                                && self.cooling_ms_left(released.value(), now).is_some()
                            {
                                cooling += 1;
                            }
                        }
                        let size = u64::from(hi - lo) + 1;
                        free += size
                            .saturating_sub(plan.infra_count_in(lo, hi))
                            .saturating_sub(taken.len() as u64)
                            .saturating_sub(cooling);
                    }
                    out.push((format!("{}/{}", net.name, sub.name), free));
                }
            }
            Ok(out)
        })
    }

    /// Checks the indexes against `allocations` without changing anything; one sentence per
    /// inconsistency (empty when healthy).
    pub fn verify(&self) -> Result<Vec<String>, IpamError> {
        self.write("verify", |txn, now| {
            Ok((self.check(txn, now, false)?.0, false))
        })
    }

    fn network_index(&self, name: Option<&str>) -> Result<usize, IpamError> {
        let nets = &self.config.networks;
        let wanted = name.or(self.config.default_network.as_deref());
        match wanted {
            Some(n) => {
                nets.iter()
                    .position(|x| x.name == n)
                    .ok_or_else(|| IpamError::UnknownNetwork {
                        name: n.to_string(),
                        known: nets
                            .iter()
                            .map(|x| x.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
            }
            None if nets.is_empty() => Err(IpamError::InvalidConfig(
                "no networks are configured".into(),
            )),
            None => Ok(0),
        }
    }

    fn select(
        &self,
        network: Option<&str>,
        subnet: Option<&str>,
        static_ip: Option<Ipv4Addr>,
    ) -> Result<(usize, usize), IpamError> {
        let ni = self.network_index(network)?;
        let net = self.network(network)?;
        let cidrs = |subs: &mut dyn Iterator<Item = &SubnetConfig>| {
            subs.map(|s| s.cidr.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let si = match (subnet, static_ip) {
            (Some(name), _) => {
                let si = net
                    .subnets
                    .iter()
                    .position(|s| s.name == name)
                    .ok_or_else(|| IpamError::UnknownSubnet {
                        network: net.name.clone(),
                        name: name.to_string(),
                        known: net
                            .subnets
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                if let (Some(ip), Some(sub)) = (static_ip, net.subnets.get(si))
                    && !sub.cidr.contains(ip)
                {
                    return Err(IpamError::OutsideSubnet {
                        ip,
                        where_: format!("subnet {:?} of network {:?}", sub.name, net.name),
                        cidrs: sub.cidr.to_string(),
                    });
                }
                si
            }
            (None, Some(ip)) => {
                let default = net.default_subnet().map(|s| s.name.as_str());
                let containing = |s: &&SubnetConfig| s.cidr.contains(ip);
                net.subnets
                    .iter()
                    .position(|s| containing(&s) && Some(s.name.as_str()) == default)
                    .or_else(|| net.subnets.iter().position(|s| containing(&s)))
                    .ok_or_else(|| IpamError::OutsideSubnet {
                        ip,
                        where_: format!("every subnet of network {:?}", net.name),
                        cidrs: cidrs(&mut net.subnets.iter()),
                    })?
            }
            (None, None) => match &net.default_subnet {
                Some(d) => net
                    .subnets
                    .iter()
                    .position(|s| &s.name == d)
                    .ok_or_else(|| {
                        IpamError::InvalidConfig(format!(
                            "default_subnet {d:?} of network {:?} does not exist",
                            net.name
                        ))
                    })?,
                None => 0,
            },
        };
        Ok((ni, si))
    }

    fn subnet_at(
        &self,
        ni: usize,
        si: usize,
    ) -> Result<(&NetworkConfig, &SubnetConfig, &SubnetPlan), IpamError> {
        let net = self.config.networks.get(ni);
        let sub = net.and_then(|n| n.subnets.get(si));
        let plan = self.plans.get(ni).and_then(|p| p.get(si));
        match (net, sub, plan) {
            (Some(n), Some(s), Some(p)) => Ok((n, s, p)),
            _ => Err(IpamError::InvalidConfig(format!(
                "network {ni} has no subnet {si} (internal inconsistency)"
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_static(
        &self,
        ip: Ipv4Addr,
        net: &NetworkConfig,
        sub: &SubnetConfig,
        plan: &SubnetPlan,
        allocs: &Table<KeyCols, &[u8]>,
        by_ip: &Table<u32, KeyCols>,
        req: &AllocRequest,
    ) -> Result<(), IpamError> {
        if let Some(what) = plan.infra_what(u32::from(ip)) {
            return Err(IpamError::Reserved {
                ip,
                network: net.name.clone(),
                subnet: sub.name.clone(),
                what,
            });
        }
        let holder = by_ip.get(u32::from(ip))?.map(|g| key_of(g.value()));
        if let Some(holder) = holder {
            let holder_rec = load(allocs, &holder).ok().flatten();
            let (network, subnet) = match &holder_rec {
                Some(r) => (r.network.clone(), r.subnet.clone()),
                None => (net.name.clone(), sub.name.clone()),
            };
            return Err(IpamError::AddressTaken {
                ip,
                network,
                subnet,
                holder: describe(&holder, holder_rec.as_ref().map(|r| &r.pod)),
                requester: describe(req.key, Some(req.pod)),
            });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn scan(
        &self,
        net: &NetworkConfig,
        sub: &SubnetConfig,
        plan: &SubnetPlan,
        cursor_name: &str,
        cursors: &Table<&str, u32>,
        by_ip: &Table<u32, KeyCols>,
        cooldown: &mut Table<u32, u64>,
        now: u64,
    ) -> Result<u32, IpamError> {
        if plan.blocks.is_empty() {
            return Err(IpamError::NoBlocks {
                network: net.name.clone(),
                subnet: sub.name.clone(),
                node: self.node.clone(),
                nodes_with_blocks: if sub.blocks.is_empty() {
                    "none".to_string()
                } else {
                    sub.blocks.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            });
        }
        let cursor = cursors.get(cursor_name)?.map_or(0, |g| g.value());
        let mut stats = ScanStats::default();
        let mut clock_went_back = Vec::new();
        let mut found = None;
        for ip in ring(&plan.blocks, cursor) {
            if plan.is_infra(ip) {
                stats.reserved = stats.reserved.saturating_add(1);
                continue;
            }
            if by_ip.get(ip)?.is_some() {
                stats.allocated = stats.allocated.saturating_add(1);
                continue;
            }
            let released = cooldown.get(ip)?.map(|g| g.value());
            if let Some(released) = released
                && let Some(left) = self.cooling_ms_left(released, now)
            {
                stats.cooling = stats.cooling.saturating_add(1);
                stats.cooling_ms_left = stats.cooling_ms_left.max(left);
                if released > now {
                    clock_went_back.push(ip);
                }
                continue;
            }
            found = Some(ip);
            break;
        }
        // Restart the cooldown of releases stamped in the future (the wall clock was set back)
        // from now, so they wait one cooldown instead of the size of the jump.
        for ip in clock_went_back {
            cooldown.insert(ip, now)?;
        }
        found.ok_or_else(|| IpamError::Exhausted {
            network: net.name.clone(),
            subnet: sub.name.clone(),
            node: self.node.clone(),
            blocks: plan.blocks_text.clone(),
            allocated: stats.allocated,
            cooling: stats.cooling,
            cooling_secs_left: u32::try_from(stats.cooling_ms_left.div_ceil(1000))
                .unwrap_or(u32::MAX),
            reserved: stats.reserved,
        })
    }

    /// Milliseconds until an address released at `released` may be reused, if it still cools.
    /// A release stamped in the future (the clock went back) counts as a full cooldown.
    fn cooling_ms_left(&self, released: u64, now: u64) -> Option<u64> {
        let cooldown = self.config.cooldown_secs.saturating_mul(1000);
        if cooldown == 0 {
            return None;
        }
        if released > now {
            return Some(cooldown);
        }
        cooldown
            .checked_sub(now - released)
            .filter(|&left| left > 0)
    }

    /// Compares the tables; with `repair`, fixes `by_ip` and `cooldown` from `allocations` and
    /// prunes expired cooldowns. Returns the inconsistencies and whether anything was written.
    fn check(
        &self,
        txn: &WriteTransaction,
        now: u64,
        repair: bool,
    ) -> Result<(Vec<String>, bool), IpamError> {
        let mut t = Tables::open(txn)?;
        let mut problems = Vec::new();
        let mut changed = false;

        let mut records: BTreeMap<AttachmentKey, Option<Record>> = BTreeMap::new();
        for row in t.allocs.iter()? {
            let (k, v) = row?;
            let key = key_of(k.value());
            match serde_json::from_slice::<Record>(v.value()) {
                Ok(rec) => {
                    records.insert(key, Some(rec));
                }
                Err(e) => {
                    problems.push(format!(
                        "the record of {} cannot be decoded ({e}); its address stays reserved",
                        describe_key(&key)
                    ));
                    records.insert(key, None);
                }
            }
        }
        let mut index: BTreeMap<u32, AttachmentKey> = BTreeMap::new();
        for row in t.by_ip.iter()? {
            let (ip, k) = row?;
            index.insert(ip.value(), key_of(k.value()));
        }

        // Record rows whose embedded key disagrees with the row key: trust the row key.
        let mut rewrite = Vec::new();
        for (key, rec) in records.iter_mut() {
            if let Some(rec) = rec
                && rec.key != *key
            {
                problems.push(format!(
                    "the record stored under {} names {}; fixed to its row",
                    describe_key(key),
                    describe_key(&rec.key)
                ));
                rec.key = key.clone();
                rewrite.push(rec.clone());
            }
        }

        let mut holders: BTreeMap<u32, Vec<&Record>> = BTreeMap::new();
        for rec in records.values().flatten() {
            holders.entry(u32::from(rec.ip)).or_default().push(rec);
        }
        let mut set_index = Vec::new();
        for (ip, recs) in &holders {
            let addr = Ipv4Addr::from(*ip);
            if recs.len() > 1 {
                let who: Vec<String> = recs
                    .iter()
                    .map(|r| describe(&r.key, Some(&r.pod)))
                    .collect();
                problems.push(format!(
                    "{addr} is held by {} attachments ({}); release all but one",
                    recs.len(),
                    who.join("; ")
                ));
            }
            let owners: Vec<&AttachmentKey> = recs.iter().map(|r| &r.key).collect();
            match index.get(ip) {
                Some(k) if owners.contains(&k) => {}
                other => {
                    // The oldest holder keeps the index entry: it is the one most likely in use.
                    let Some(oldest) = recs.iter().min_by_key(|r| r.created_unix_ms) else {
                        continue;
                    };
                    problems.push(match other {
                        Some(k) => format!(
                            "the index maps {addr} to {} but {} holds it; index fixed",
                            describe_key(k),
                            describe_key(&oldest.key)
                        ),
                        None => format!(
                            "{addr} of {} was missing from the index; index fixed",
                            describe_key(&oldest.key)
                        ),
                    });
                    set_index.push((*ip, oldest.key.clone()));
                }
            }
        }
        let mut unindex = Vec::new();
        for (ip, key) in &index {
            let addr = Ipv4Addr::from(*ip);
            match records.get(key) {
                // Unreadable record: keep its address out of circulation.
                Some(None) => {}
                Some(Some(rec)) if u32::from(rec.ip) == *ip => {}
                Some(Some(_)) | None if !holders.contains_key(ip) => {
                    problems.push(format!(
                        "the index maps {addr} to {} which does not hold it; entry removed",
                        describe_key(key)
                    ));
                    unindex.push(*ip);
                }
                // Re-pointed above at the real holder.
                _ => {}
            }
        }

        let mut cooled_out = Vec::new();
        let mut clamp = Vec::new();
        for row in t.cooldown.iter()? {
            let (ip, released) = row?;
            let (ip, released) = (ip.value(), released.value());
            if holders.contains_key(&ip) || self.cooling_ms_left(released, now).is_none() {
                cooled_out.push(ip);
            } else if released > now {
                clamp.push(ip);
            }
        }

        if repair {
            for rec in &rewrite {
                let json = serde_json::to_vec(rec)?;
                t.allocs.insert(key_cols(&rec.key), json.as_slice())?;
            }
            for (ip, key) in &set_index {
                t.by_ip.insert(*ip, key_cols(key))?;
            }
            for ip in &unindex {
                t.by_ip.remove(*ip)?;
            }
            // Housekeeping, not inconsistencies: not reported.
            for ip in &cooled_out {
                t.cooldown.remove(*ip)?;
            }
            for ip in &clamp {
                t.cooldown.insert(*ip, now)?;
            }
            changed = !(rewrite.is_empty()
                && set_index.is_empty()
                && unindex.is_empty()
                && cooled_out.is_empty()
                && clamp.is_empty());
        }
        Ok((problems, changed))
    }

    fn warn_orphans(&self) {
        let Ok(records) = self.list() else { return };
        let mut orphans = BTreeMap::<String, u64>::new();
        for rec in &records {
            let known = self
                .config
                .network(&rec.network)
                .is_some_and(|n| n.subnet(&rec.subnet).is_some());
            if !known {
                *orphans
                    .entry(format!("{}/{}", rec.network, rec.subnet))
                    .or_default() += 1;
            }
        }
        for (subnet, n) in orphans {
            tracing::warn!(
                "{n} allocation(s) in {subnet}, which is no longer configured, are kept until \
                 their pods are deleted; no new addresses are allocated there"
            );
        }
    }

    /// Runs `f` in one write transaction with immediate durability, committing only when it
    /// reports a change; an error aborts everything `f` wrote.
    fn write<T>(
        &self,
        what: &str,
        f: impl FnOnce(&WriteTransaction, u64) -> Result<(T, bool), IpamError>,
    ) -> Result<T, IpamError> {
        self.write_with(what, Durability::Immediate, f)
    }

    fn write_with<T>(
        &self,
        what: &str,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, u64) -> Result<(T, bool), IpamError>,
    ) -> Result<T, IpamError> {
        let result = self
            .with_db(|db| {
                let mut txn = db.begin_write()?;
                txn.set_durability(durability)?;
                let (out, changed) = f(&txn, self.now_ms())?;
                if changed {
                    txn.commit()?;
                } else {
                    txn.abort()?;
                }
                Ok(out)
            })
            .map_err(|e| self.in_context(what, e));
        // Cleared only by `health`'s trial write: one small write succeeding proves little.
        if let Err(IpamError::StoreUnavailable(msg)) = &result {
            tracing::warn!(path = %self.path.display(), "{msg}");
            *lock(&self.failure) = Some(msg.clone());
        }
        result
    }

    fn read<T>(
        &self,
        what: &str,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, IpamError>,
    ) -> Result<T, IpamError> {
        self.with_db(|db| f(&db.begin_read()?))
            .map_err(|e| self.in_context(what, e))
    }

    /// Runs `f` on the open database, reopening it first if an earlier call failed at the I/O
    /// level. Any such failure of `f` schedules the reopen for the next call.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, IpamError>,
    ) -> Result<T, IpamError> {
        if self.reopen.load(Ordering::Acquire) {
            self.reopen_db()?;
        }
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let Some(db) = guard.as_ref() else {
            self.reopen.store(true, Ordering::Release);
            return Err(IpamError::StoreUnavailable(
                "the file could not be reopened after a failed write".into(),
            ));
        };
        let result = f(db);
        if matches!(result, Err(IpamError::StoreUnavailable(_))) {
            self.reopen.store(true, Ordering::Release);
        }
        result
    }

    /// Closes and reopens the file. Transactions hold the read lock, so none is running.
    fn reopen_db(&self) -> Result<(), IpamError> {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // Another caller may have reopened it while this one waited for the lock.
        if !self.reopen.load(Ordering::Acquire) {
            return Ok(());
        }
        // The old handle holds the file lock; it must be gone before the file is opened again.
        *guard = None;
        let db = open_db(&self.path)?;
        *guard = Some(db);
        self.reopen.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "IPAM store reopened after a failed write");
        Ok(())
    }

    /// Names the file in storage errors; an operator's first question is which disk failed.
    fn in_context(&self, what: &str, e: IpamError) -> IpamError {
        match e {
            IpamError::Store(msg) => IpamError::Store(format!(
                "IPAM store {}: {what} failed: {msg}",
                self.path.display()
            )),
            IpamError::StoreUnavailable(msg) => IpamError::StoreUnavailable(format!(
                "IPAM store {}: {what} failed: {msg}",
                self.path.display()
            )),
            other => other,
        }
    }

    fn now_ms(&self) -> u64 {
        let now = wall_clock_ms();
        #[cfg(test)]
        let now = now.saturating_add(
            self.clock_skew_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        now
    }

    /// Moves this instance's clock forward, to test cooldowns without sleeping.
    #[cfg(test)]
    pub(crate) fn advance_clock_ms(&self, ms: u64) {
        self.clock_skew_ms
            .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often [`Ipam::health`] retries a write while writes fail.
const HEALTH_PROBE_EVERY: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_db(path: &Path) -> Result<Database, DatabaseError> {
    let mut builder = Database::builder();
    // The store holds a few hundred bytes per pod; redb's 1 GiB default cache would only
    // inflate the daemon's footprint under memory pressure.
    builder.set_cache_size(8 << 20);
    let shown = path.display().to_string();
    let logged = AtomicBool::new(false);
    builder.set_repair_callback(move |_| {
        if !logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %shown, "IPAM store was not closed cleanly; redb is repairing it");
        }
    });
    builder.create(path)
}

/// The error for a retried ADD that asks for something other than what the key holds.
fn check_same(existing: &Record, req: &AllocRequest) -> Result<(), IpamError> {
    let mut asks = Vec::new();
    if let Some(ip) = req.static_ip
        && ip != existing.ip
    {
        asks.push(format!("address {ip}"));
    }
    if let Some(n) = req.network
        && n != existing.network
    {
        asks.push(format!("network {n:?}"));
    }
    if let Some(s) = req.subnet
        && s != existing.subnet
    {
        asks.push(format!("subnet {s:?}"));
    }
    if asks.is_empty() {
        return Ok(());
    }
    Err(IpamError::KeyHoldsOtherAddress {
        key: describe(&existing.key, Some(&existing.pod)),
        ip: existing.ip,
        network: existing.network.clone(),
        subnet: existing.subnet.clone(),
        requested: asks.join(", "),
    })
}

/// The tables a release touches, opened once per transaction.
struct Tables<'txn> {
    allocs: Table<'txn, KeyCols, &'static [u8]>,
    by_ip: Table<'txn, u32, KeyCols>,
    cooldown: Table<'txn, u32, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, IpamError> {
        Ok(Tables {
            allocs: txn.open_table(ALLOCATIONS)?,
            by_ip: txn.open_table(BY_IP)?,
            cooldown: txn.open_table(COOLDOWN)?,
        })
    }

    fn release(&mut self, key: &AttachmentKey, now: u64) -> Result<Option<Record>, IpamError> {
        let decoded = match self.allocs.remove(key_cols(key))? {
            None => return Ok(None),
            Some(raw) => serde_json::from_slice::<Record>(raw.value()),
        };
        let ips: Vec<u32> = match &decoded {
            Ok(rec) => vec![u32::from(rec.ip)],
            Err(e) => {
                tracing::warn!(
                    "releasing the undecodable record of {} ({e}); freeing its indexed addresses",
                    describe_key(key)
                );
                let mut ips = Vec::new();
                for row in self.by_ip.iter()? {
                    let (ip, k) = row?;
                    if k.value() == key_cols(key) {
                        ips.push(ip.value());
                    }
                }
                ips
            }
        };
        for ip in ips {
            let held_by_key = self
                .by_ip
                .get(ip)?
                .is_some_and(|g| g.value() == key_cols(key));
            // Another holder in the index means the store was inconsistent; leave its entry.
            if held_by_key {
                self.by_ip.remove(ip)?;
                self.cooldown.insert(ip, now)?;
            }
        }
        Ok(decoded.ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(blocks: &[(u32, u32)], cursor: u32) -> Vec<u32> {
        ring(blocks, cursor).collect()
    }

    #[test]
    fn ring_starts_at_cursor_and_wraps_once() {
        let b = [(10, 12), (20, 21)];
        assert_eq!(ring_of(&b, 0), [10, 11, 12, 20, 21]);
        assert_eq!(ring_of(&b, 11), [11, 12, 20, 21, 10]);
        assert_eq!(ring_of(&b, 15), [20, 21, 10, 11, 12]);
        assert_eq!(ring_of(&b, 21), [21, 10, 11, 12, 20]);
        assert_eq!(ring_of(&b, 22), [10, 11, 12, 20, 21]);
        assert!(ring_of(&[], 5).is_empty());
        let top = [(u32::MAX - 1, u32::MAX)];
        assert_eq!(ring_of(&top, u32::MAX), [u32::MAX, u32::MAX - 1]);
    }

    #[test]
    fn infra_count_merges_overlaps() {
        let plan = SubnetPlan {
            network_addr: 0,
            broadcast: 255,
            gateway: 1,
            reserved: vec![(1, 5), (4, 8), (250, 255)],
            blocks: vec![],
            blocks_text: String::new(),
        };
        assert_eq!(plan.infra_count_in(0, 15), 9);
        assert_eq!(plan.infra_count_in(6, 15), 3);
        assert_eq!(plan.infra_count_in(240, 255), 6);
        assert_eq!(plan.infra_count_in(16, 31), 0);
    }

    #[test]
    fn ipam_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Ipam>();
    }
}
