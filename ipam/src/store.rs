//! The durable allocator: one redb file, one write transaction per mutating call.
//!
//! Tables of schema 2 (all kept consistent inside every transaction):
//! - `endpoints`: (container id, ifname) → the [`Endpoint`] as a versioned JSON record of this
//!   module's own types — the source of truth;
//! - `by_ip_v2`: address → (container id, ifname) — the uniqueness index, rebuilt from
//!   `endpoints` on open if the two disagree;
//! - `cooldown_v2`: address → wall-clock ms of its release;
//! - `cursors_v2`: "network/subnet" → next candidate address;
//! - `meta`: schema version;
//! - `write_check`: empty; [`Ipam::health`] writes and removes a row to see whether writes work.
//!
//! Addresses are keyed `[family][address bytes]` (4 then 4 bytes, or 6 then 16), so both
//! families share the tables, and within a family the byte order is the numeric order the range
//! scans rely on. A schema-1 store (IPv4 `u32` keys, records in the wire protocol's types) is
//! migrated on open, in the open's one transaction.

use crate::IpamError;
use crate::endpoint::{Assigned, AttachmentKey, Endpoint, Lifecycle, PodInfo, Wiring};
use crate::model::{IpamConfig, NetworkConfig, SubnetConfig, addr_of, ord, range_of};
use crate::topology::TopologyChange;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type KeyCols = (&'static str, &'static str);
type IpKey = &'static [u8];
const ENDPOINTS: TableDefinition<KeyCols, &[u8]> = TableDefinition::new("endpoints");
const BY_IP: TableDefinition<IpKey, KeyCols> = TableDefinition::new("by_ip_v2");
const COOLDOWN: TableDefinition<IpKey, u64> = TableDefinition::new("cooldown_v2");
const CURSORS: TableDefinition<&str, IpKey> = TableDefinition::new("cursors_v2");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Scratch space for [`Ipam::health`]'s trial write; empty between trials.
const WRITE_CHECK: TableDefinition<&str, &[u8]> = TableDefinition::new("write_check");

/// Bumped when the tables change incompatibly, so an older build refuses a newer file instead of
/// misreading it. 1: IPv4 only, records in the wire protocol's types; 2: this layout.
const SCHEMA_VERSION: u64 = 2;

/// Candidates one dynamic allocation examines at most. An IPv6 block holds more addresses than
/// could ever be walked; the cursor moves past every allocation, so a free address is found
/// long before this bound unless nearly this many addresses in a row are taken.
const MAX_SCAN: usize = 1 << 20;

/// The schema-1 layout, read only by the migration.
mod v1 {
    use super::KeyCols;
    use redb::TableDefinition;
    use serde::Deserialize;
    use std::net::Ipv4Addr;

    pub const ALLOCATIONS: TableDefinition<KeyCols, &[u8]> = TableDefinition::new("allocations");
    pub const BY_IP: TableDefinition<u32, KeyCols> = TableDefinition::new("by_ip");
    pub const COOLDOWN: TableDefinition<u32, u64> = TableDefinition::new("cooldown");
    pub const CURSORS: TableDefinition<&str, u32> = TableDefinition::new("cursors");

    /// A schema-1 record: the wire protocol's pod type, one IPv4 address. Its embedded key
    /// is not read: the row key is the truth (as the consistency check holds).
    #[derive(Deserialize)]
    pub struct Record {
        pub ip: Ipv4Addr,
        pub prefix_len: u8,
        pub network: String,
        pub subnet: String,
        #[serde(default)]
        pub pod: Pod,
        pub host_veth: String,
        pub created_unix_ms: u64,
        pub ready: bool,
    }

    #[derive(Deserialize, Default)]
    pub struct Pod {
        #[serde(default)]
        pub namespace: String,
        #[serde(default)]
        pub name: String,
        #[serde(default)]
        pub uid: String,
        #[serde(default)]
        pub infra_container_id: String,
    }
}

/// The on-disk record types of schema 2. Separate from the public [`Endpoint`] so a change of
/// the API types is a compile error here, not a silent change of the file format.
mod disk {
    use serde::{Deserialize, Serialize};
    use std::net::IpAddr;

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "v")]
    pub enum Stored {
        #[serde(rename = "2")]
        V2(EndpointV2),
    }

    #[derive(Serialize, Deserialize)]
    pub struct EndpointV2 {
        pub container_id: String,
        pub ifname: String,
        pub pod: PodV2,
        pub addresses: Vec<AssignedV2>,
        pub host_veth: String,
        pub network_id: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub wiring: Option<WiringV2>,
        pub state: StateV2,
        pub created_unix_ms: u64,
    }

    #[derive(Serialize, Deserialize)]
    pub struct PodV2 {
        pub namespace: String,
        pub name: String,
        pub uid: String,
        pub infra_container_id: String,
    }

    #[derive(Serialize, Deserialize)]
    pub struct AssignedV2 {
        pub ip: IpAddr,
        pub prefix_len: u8,
        pub network: String,
        pub subnet: String,
    }

    #[derive(Serialize, Deserialize)]
    pub struct WiringV2 {
        pub host_ifindex: u32,
        pub pod_mac: [u8; 6],
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum StateV2 {
        Allocated,
        Wired,
        Ready { policy_revision: u64 },
        Releasing,
    }
}

fn encode(ep: &Endpoint) -> Result<Vec<u8>, IpamError> {
    use disk::*;
    let state = match ep.state {
        Lifecycle::Allocated => StateV2::Allocated,
        Lifecycle::Wired => StateV2::Wired,
        Lifecycle::Ready { policy_revision } => StateV2::Ready { policy_revision },
        Lifecycle::Releasing => StateV2::Releasing,
    };
    let rec = Stored::V2(EndpointV2 {
        container_id: ep.key.container_id.clone(),
        ifname: ep.key.ifname.clone(),
        pod: PodV2 {
            namespace: ep.pod.namespace.clone(),
            name: ep.pod.name.clone(),
            uid: ep.pod.uid.clone(),
            infra_container_id: ep.pod.infra_container_id.clone(),
        },
        addresses: ep
            .addresses
            .iter()
            .map(|a| AssignedV2 {
                ip: a.ip,
                prefix_len: a.prefix_len,
                network: a.network.clone(),
                subnet: a.subnet.clone(),
            })
            .collect(),
        host_veth: ep.host_veth.clone(),
        network_id: ep.network_id,
        wiring: ep.wiring.map(|w| WiringV2 {
            host_ifindex: w.host_ifindex,
            pod_mac: w.pod_mac,
        }),
        state,
        created_unix_ms: ep.created_unix_ms,
    });
    Ok(serde_json::to_vec(&rec)?)
}

fn decode(raw: &[u8]) -> Result<Endpoint, IpamError> {
    use disk::*;
    let Stored::V2(r) = serde_json::from_slice::<Stored>(raw)?;
    if r.addresses.is_empty() {
        return Err(IpamError::Store(
            "a stored record holds no address".to_string(),
        ));
    }
    Ok(Endpoint {
        key: AttachmentKey {
            container_id: r.container_id,
            ifname: r.ifname,
        },
        pod: PodInfo {
            namespace: r.pod.namespace,
            name: r.pod.name,
            uid: r.pod.uid,
            infra_container_id: r.pod.infra_container_id,
        },
        addresses: r
            .addresses
            .into_iter()
            .map(|a| Assigned {
                ip: a.ip,
                prefix_len: a.prefix_len,
                network: a.network,
                subnet: a.subnet,
            })
            .collect(),
        host_veth: r.host_veth,
        network_id: r.network_id,
        wiring: r.wiring.map(|w| Wiring {
            host_ifindex: w.host_ifindex,
            pod_mac: w.pod_mac,
        }),
        state: match r.state {
            StateV2::Allocated => Lifecycle::Allocated,
            StateV2::Wired => Lifecycle::Wired,
            StateV2::Ready { policy_revision } => Lifecycle::Ready { policy_revision },
            StateV2::Releasing => Lifecycle::Releasing,
        },
        created_unix_ms: r.created_unix_ms,
    })
}

/// `[4][4 bytes]` or `[6][16 bytes]`.
fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => std::iter::once(4).chain(a.octets()).collect(),
        IpAddr::V6(a) => std::iter::once(6).chain(a.octets()).collect(),
    }
}

fn ip_of_key(raw: &[u8]) -> Option<IpAddr> {
    match raw {
        [4, rest @ ..] => <[u8; 4]>::try_from(rest)
            .ok()
            .map(|o| Ipv4Addr::from(o).into()),
        [6, rest @ ..] => <[u8; 16]>::try_from(rest)
            .ok()
            .map(|o| Ipv6Addr::from(o).into()),
        _ => None,
    }
}

/// An address key as a person reads it.
fn show_key(raw: &[u8]) -> String {
    ip_of_key(raw).map_or_else(
        || format!("undecodable address key {raw:?}"),
        |ip| ip.to_string(),
    )
}

/// What the caller wants an address for.
#[derive(Debug, Clone, Copy)]
pub struct AllocRequest<'a> {
    pub key: &'a AttachmentKey,
    pub pod: &'a PodInfo,
    /// `None` → `default_network`, else the first network.
    pub network: Option<&'a str>,
    /// `None` → the network's `default_subnet`, else its first subnet; with a `static_ip`, the
    /// subnet that contains the address.
    pub subnet: Option<&'a str>,
    /// Of either family; the subnet chosen is one of that family.
    pub static_ip: Option<IpAddr>,
    pub host_veth: &'a str,
}

/// A subnet reduced to [`ord`] number ranges, precomputed once per topology.
#[derive(Debug)]
struct SubnetPlan {
    v4: bool,
    network_addr: u128,
    /// IPv4 only: IPv6 has no broadcast address, its last address is a host like any other.
    broadcast: Option<u128>,
    gateway: u128,
    reserved: Vec<(u128, u128)>,
    /// This node's blocks, sorted and disjoint (validated), inclusive.
    blocks: Vec<(u128, u128)>,
    blocks_text: String,
}

impl SubnetPlan {
    fn new(sub: &SubnetConfig, node: &str) -> SubnetPlan {
        let mut blocks: Vec<(u128, u128)> =
            sub.node_blocks(node).iter().map(|b| range_of(*b)).collect();
        blocks.sort_unstable();
        let blocks_text = sub
            .node_blocks(node)
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let (lo, hi) = range_of(sub.cidr);
        SubnetPlan {
            v4: sub.cidr.is_ipv4(),
            network_addr: lo,
            broadcast: sub.cidr.is_ipv4().then_some(hi),
            gateway: ord(sub.effective_gateway()),
            reserved: sub
                .reserved
                .iter()
                .map(|r| (ord(r.start), ord(r.end)))
                .collect(),
            blocks,
            blocks_text,
        }
    }

    fn addr(&self, n: u128) -> IpAddr {
        addr_of(self.v4, n)
    }

    fn is_infra(&self, ip: u128) -> bool {
        ip == self.network_addr
            || Some(ip) == self.broadcast
            || ip == self.gateway
            || self.reserved.iter().any(|&(lo, hi)| lo <= ip && ip <= hi)
    }

    fn infra_what(&self, ip: u128) -> Option<String> {
        if ip == self.network_addr {
            Some("the network address".into())
        } else if Some(ip) == self.broadcast {
            Some("the broadcast address".into())
        } else if ip == self.gateway {
            Some("the gateway".into())
        } else {
            self.reserved
                .iter()
                .find(|&&(lo, hi)| lo <= ip && ip <= hi)
                .map(|&(lo, hi)| {
                    format!("in the reserved range {}-{}", self.addr(lo), self.addr(hi))
                })
        }
    }

    /// Addresses of `lo..=hi` that are infrastructure, counted without walking the range.
    fn infra_count_in(&self, lo: u128, hi: u128) -> u128 {
        let mut spans: Vec<(u128, u128)> =
            [Some(self.network_addr), self.broadcast, Some(self.gateway)]
                .iter()
                .flatten()
                .map(|&a| (a, a))
                .chain(self.reserved.iter().copied())
                .filter_map(|(a, b)| {
                    let (a, b) = (a.max(lo), b.min(hi));
                    (a <= b).then_some((a, b))
                })
                .collect();
        spans.sort_unstable();
        let mut total = 0u128;
        let mut covered_to: Option<u128> = None;
        for (a, b) in spans {
            let start = match covered_to {
                Some(c) if c >= b => continue,
                Some(c) if c >= a => c + 1,
                _ => a,
            };
            total = total.saturating_add(b - start).saturating_add(1);
            covered_to = Some(b);
        }
        total
    }
}

/// Every address of `blocks`, starting at `cursor` (or the next block after it) and wrapping
/// round once, so recently released addresses are the last to be reused.
fn ring(blocks: &[(u128, u128)], cursor: u128) -> impl Iterator<Item = u128> + '_ {
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

/// The configuration in force and what is derived from it, swapped whole by
/// [`Ipam::apply_topology`].
#[derive(Debug)]
struct Topology {
    config: IpamConfig,
    /// Parallel to `config.networks[i].subnets[j]`.
    plans: Vec<Vec<SubnetPlan>>,
}

impl Topology {
    fn new(config: IpamConfig, node: &str) -> Topology {
        let plans = config
            .networks
            .iter()
            .map(|n| n.subnets.iter().map(|s| SubnetPlan::new(s, node)).collect())
            .collect();
        Topology { config, plans }
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
            None if nets.is_empty() => Err(IpamError::NoNetworks),
            None => Ok(0),
        }
    }

    fn network(&self, name: Option<&str>) -> Result<&NetworkConfig, IpamError> {
        let i = self.network_index(name)?;
        self.config.networks.get(i).ok_or(IpamError::NoNetworks)
    }

    fn select(
        &self,
        network: Option<&str>,
        subnet: Option<&str>,
        static_ip: Option<IpAddr>,
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

fn describe(key: &AttachmentKey, pod: Option<&PodInfo>) -> String {
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
) -> Result<Option<Endpoint>, IpamError> {
    match table.get(key_cols(key))? {
        Some(raw) => Ok(Some(decode(raw.value())?)),
        None => Ok(None),
    }
}

fn save(table: &mut Table<KeyCols, &[u8]>, ep: &Endpoint) -> Result<(), IpamError> {
    let raw = encode(ep)?;
    table.insert(key_cols(&ep.key), raw.as_slice())?;
    Ok(())
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
/// [`Durability::Immediate`] before it returns (the lifecycle steps documented otherwise
/// excepted), so a crash at any instant leaves either the old or the new state. Write
/// transactions are serialised by redb; concurrent callers queue.
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
    /// Swapped inside a write transaction, so every allocation sees the topology in force when
    /// its transaction began, and none started after a swap sees the old one.
    topology: RwLock<Arc<Topology>>,
    node: String,
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
    /// A schema-1 store is migrated to schema 2 first (in the same transaction). The two
    /// indexes are then checked against each other and repaired from `endpoints` if they
    /// disagree (each repair is logged and kept in [`Ipam::open_repairs`]). Endpoints whose
    /// network or subnet left the configuration are kept and listed; they only cannot grow.
    pub fn open(path: &Path, config: IpamConfig, node: &str) -> Result<Ipam, IpamError> {
        if node.is_empty() || node.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(IpamError::InvalidConfig(format!(
                "node name {node:?} must be non-empty and without whitespace"
            )));
        }
        config.validate()?;
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
            topology: RwLock::new(Arc::new(Topology::new(config, node))),
            node: node.to_string(),
            open_repairs: Vec::new(),
            #[cfg(test)]
            clock_skew_ms: std::sync::atomic::AtomicU64::new(0),
        };
        let repairs = ipam.write("open", |txn, now| {
            let mut changed = false;
            let version = txn
                .open_table(META)?
                .get("schema_version")?
                .map(|g| g.value());
            match version {
                None => changed = true,
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(IpamError::Store(format!(
                        "was written by a newer vpcnet (schema {v}, this build reads up to \
                         {SCHEMA_VERSION}): run the newer vpcnetd"
                    )));
                }
                Some(1) => {
                    ipam.migrate_v1(txn)?;
                    changed = true;
                }
                Some(_) => {}
            }
            if changed {
                txn.open_table(META)?
                    .insert("schema_version", SCHEMA_VERSION)?;
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

    /// The configuration in force (a copy: [`Ipam::apply_topology`] may replace it any time).
    pub fn config(&self) -> IpamConfig {
        self.topology().config.clone()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inconsistencies found (and repaired where possible) when the store was opened; empty
    /// after a clean shutdown or crash, since every transaction keeps the indexes consistent.
    /// Records that cannot be decoded are listed here too: their addresses stay reserved until
    /// the attachment is released (by DEL or GC) — never silently forever.
    pub fn open_repairs(&self) -> &[String] {
        &self.open_repairs
    }

    /// The named network, or the default one (`default_network`, else the first).
    pub fn network(&self, name: Option<&str>) -> Result<NetworkConfig, IpamError> {
        self.topology().network(name).cloned()
    }

    fn topology(&self) -> Arc<Topology> {
        self.topology
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the topology (networks, subnets, this node's blocks, cooldown) without a
    /// restart. `config` is validated first; on error nothing changes.
    ///
    /// - A block or subnet added is used by the next allocation.
    /// - Addresses of a removed block or subnet are never handed out dynamically again (a
    ///   static address must still lie in a configured subnet). Live endpoints there stay
    ///   listed and releasable; their released addresses only cool down.
    /// - Network attributes (routable CIDRs, peers, masquerade exclusions) are configuration
    ///   only here; the dataplane applies them.
    ///
    /// The swap happens inside a write transaction: an allocation running now finishes on the
    /// old topology, every later one uses the new.
    pub fn apply_topology(&self, config: IpamConfig) -> Result<TopologyChange, IpamError> {
        config.validate()?;
        let next = Arc::new(Topology::new(config, &self.node));
        let change = self.write("apply topology", |_txn, _| {
            let mut slot = self
                .topology
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let change = TopologyChange::between(&slot.config, &next.config, &self.node);
            *slot = next;
            Ok((change, false))
        })?;
        if !change.is_empty() {
            tracing::info!(path = %self.path.display(), "IPAM topology changed: {change}");
            self.warn_orphans();
        }
        Ok(change)
    }

    /// Allocates an address for `req.key`, or returns the key's existing endpoint unchanged.
    ///
    /// A retried ADD therefore gets the same address. It is an error
    /// ([`IpamError::KeyHoldsOtherAddress`]) if the retry explicitly asks for a different
    /// static address, network or subnet than the one the key holds, and
    /// ([`IpamError::InvalidTransition`]) if the key's release has started.
    ///
    /// Dynamic addresses come only from this node's blocks, starting after the last one handed
    /// out in the subnet, in the subnet's family. A static address:
    /// - must lie in the subnet (when `subnet` is `None`, the network's subnet containing it is
    ///   used), and not be its network, broadcast, gateway or reserved address;
    /// - may lie outside this node's blocks: operators pin addresses (StatefulSets, appliances)
    ///   and the address is still node-unique through the store's index; keeping such
    ///   addresses out of other nodes' blocks is the operator's part;
    /// - is honoured even while cooling down, since the operator asked for exactly this address
    ///   (typically a pod recreated with its pinned IP) and refusing would only delay it.
    pub fn allocate(&self, req: &AllocRequest) -> Result<Endpoint, IpamError> {
        self.write("allocate", |txn, now| {
            let topo = self.topology();
            let mut allocs = txn.open_table(ENDPOINTS)?;
            if let Some(existing) = load(&allocs, req.key)? {
                if existing.state == Lifecycle::Releasing {
                    return Err(invalid_transition(
                        &existing,
                        Lifecycle::Allocated,
                        "; its release has started: let the runtime's DEL finish, then ADD again",
                    ));
                }
                check_same(&existing, req)?;
                return Ok((existing, false));
            }
            let (ni, si) = topo.select(req.network, req.subnet, req.static_ip)?;
            let (net, sub, plan) = topo.subnet_at(ni, si)?;
            let mut by_ip = txn.open_table(BY_IP)?;
            let mut cooldown = txn.open_table(COOLDOWN)?;
            let ip = match req.static_ip {
                Some(ip) => {
                    self.check_static(ip, net, sub, plan, &allocs, &by_ip, req)?;
                    ip
                }
                None => {
                    let mut cursors = txn.open_table(CURSORS)?;
                    let cursor_name = format!("{}/{}", net.name, sub.name);
                    let ip = self.scan(
                        &topo,
                        net,
                        sub,
                        plan,
                        &cursor_name,
                        &cursors,
                        &by_ip,
                        &mut cooldown,
                        now,
                    )?;
                    let next = ip_key(plan.addr(ord(ip).wrapping_add(1)));
                    cursors.insert(cursor_name.as_str(), next.as_slice())?;
                    ip
                }
            };
            let ipk = ip_key(ip);
            cooldown.remove(ipk.as_slice())?;
            let ep = Endpoint {
                key: req.key.clone(),
                pod: req.pod.clone(),
                addresses: vec![Assigned {
                    ip,
                    prefix_len: sub.cidr.prefix(),
                    network: net.name.clone(),
                    subnet: sub.name.clone(),
                }],
                host_veth: req.host_veth.to_string(),
                network_id: net.id,
                wiring: None,
                state: Lifecycle::Allocated,
                created_unix_ms: now,
            };
            save(&mut allocs, &ep)?;
            by_ip.insert(ipk.as_slice(), key_cols(req.key))?;
            Ok((ep, true))
        })
    }

    /// Records that the pod's interfaces exist and where (allocated → wired); `false` if the
    /// key holds no address. Committed durably: it is what a restarted daemon rebuilds the
    /// dataplane's endpoint entries from.
    pub fn mark_wired(&self, key: &AttachmentKey, wiring: Wiring) -> Result<bool, IpamError> {
        self.transition(
            "mark wired",
            Durability::Immediate,
            key,
            Lifecycle::Wired,
            Some(wiring),
        )
    }

    /// Records that the dataplane serves the endpoint with the policy of `policy_revision`
    /// (wired → ready, or ready at a newer revision); `false` if the key holds no address.
    ///
    /// Not fsync'd: losing this step in a crash only turns the endpoint back into a wired one,
    /// whose veth still exists, so reconcile keeps it and the next durable commit persists the
    /// step. It saves one disk flush on every CNI ADD.
    pub fn mark_ready(&self, key: &AttachmentKey, policy_revision: u64) -> Result<bool, IpamError> {
        self.transition(
            "mark ready",
            Durability::None,
            key,
            Lifecycle::Ready { policy_revision },
            None,
        )
    }

    /// Records that the endpoint's release has started (its dataplane entry is going); `false`
    /// if the key holds no address. A restarted daemon must not rebuild such an endpoint.
    ///
    /// Not fsync'd: the release that follows commits durably and persists it; if the release
    /// never comes, losing the mark in a crash leaves the endpoint as it was, and the runtime
    /// retries its DEL.
    pub fn mark_releasing(&self, key: &AttachmentKey) -> Result<bool, IpamError> {
        self.transition(
            "mark releasing",
            Durability::None,
            key,
            Lifecycle::Releasing,
            None,
        )
    }

    fn transition(
        &self,
        what: &str,
        durability: Durability,
        key: &AttachmentKey,
        next: Lifecycle,
        wiring: Option<Wiring>,
    ) -> Result<bool, IpamError> {
        self.write_with(what, durability, |txn, _| {
            let mut allocs = txn.open_table(ENDPOINTS)?;
            let Some(mut ep) = load(&allocs, key)? else {
                return Ok((false, false));
            };
            if !ep.state.can_become(&next) {
                let why = match (ep.state, next) {
                    (Lifecycle::Releasing, _) => {
                        "; its release has started (a DEL ran meanwhile): let the DEL finish, \
                         then ADD again"
                    }
                    (Lifecycle::Allocated, Lifecycle::Ready { .. }) => {
                        "; it must be wired first (an internal error of vpcnetd)"
                    }
                    _ => "",
                };
                return Err(invalid_transition(&ep, next, why));
            }
            let wiring = wiring.or(ep.wiring);
            if ep.state == next && ep.wiring == wiring {
                return Ok((true, false));
            }
            ep.state = next;
            ep.wiring = wiring;
            save(&mut allocs, &ep)?;
            Ok((true, true))
        })
    }

    /// Records an endpoint the node already serves but the store does not know (a store lost
    /// or replaced while pods ran): the addresses a live pod holds must never be handed out
    /// again. `false`, and nothing written, when the key or any of its addresses is already
    /// held. The addresses leave cooldown; they are in use. Unlike [`Ipam::allocate`] the
    /// addresses are not checked against this node's blocks: the pod has them already.
    pub fn adopt(&self, ep: &Endpoint) -> Result<bool, IpamError> {
        if ep.addresses.is_empty() {
            return Err(IpamError::InvalidConfig(format!(
                "adopting {} without an address",
                describe_key(&ep.key)
            )));
        }
        self.write("adopt", |txn, _| {
            let mut t = Tables::open(txn)?;
            if t.allocs.get(key_cols(&ep.key))?.is_some() {
                return Ok((false, false));
            }
            let keys: Vec<Vec<u8>> = ep.ips().map(ip_key).collect();
            for k in &keys {
                if t.by_ip.get(k.as_slice())?.is_some() {
                    return Ok((false, false));
                }
            }
            save(&mut t.allocs, ep)?;
            for k in &keys {
                t.by_ip.insert(k.as_slice(), key_cols(&ep.key))?;
                t.cooldown.remove(k.as_slice())?;
            }
            Ok((true, true))
        })
    }

    /// Moves the endpoint of `from` to the key `to` (an adopted endpoint taken over by the
    /// runtime's attachment). `None`, and nothing changed, when `from` holds nothing or `to`
    /// already holds an endpoint.
    pub fn rekey(
        &self,
        from: &AttachmentKey,
        to: &AttachmentKey,
    ) -> Result<Option<Endpoint>, IpamError> {
        self.write("take over an adopted endpoint", |txn, _| {
            let mut t = Tables::open(txn)?;
            if t.allocs.get(key_cols(to))?.is_some() {
                return Ok((None, false));
            }
            let Some(mut ep) = load(&t.allocs, from)? else {
                return Ok((None, false));
            };
            t.allocs.remove(key_cols(from))?;
            ep.key = to.clone();
            save(&mut t.allocs, &ep)?;
            for k in ep.ips().map(ip_key) {
                t.by_ip.insert(k.as_slice(), key_cols(to))?;
            }
            Ok((Some(ep), true))
        })
    }

    /// Releases the key's addresses into cooldown; `None` (and no error) if it holds none, so a
    /// repeated DEL is harmless.
    pub fn release(&self, key: &AttachmentKey) -> Result<Option<Endpoint>, IpamError> {
        self.write("release", |txn, now| {
            let mut t = Tables::open(txn)?;
            let removed = t.release(key, now)?;
            // An undecodable record is removed too (and its addresses freed): commit that.
            let changed = removed.is_some();
            Ok((removed.flatten(), changed))
        })
    }

    /// Releases, in one transaction, every endpoint whose key is not in `valid` (restricted
    /// to `network` when given — including networks no longer configured) — CNI GC.
    pub fn release_all_except(
        &self,
        valid: &HashSet<AttachmentKey>,
        network: Option<&str>,
    ) -> Result<Vec<Endpoint>, IpamError> {
        self.write("garbage collection", |txn, now| {
            let mut t = Tables::open(txn)?;
            let mut doomed = Vec::new();
            for row in t.allocs.iter()? {
                let (k, v) = row?;
                let key = key_of(k.value());
                if valid.contains(&key) {
                    continue;
                }
                let in_scope = match (network, decode(v.value())) {
                    (None, _) => true,
                    (Some(n), Ok(rec)) => rec.network() == n,
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
                if let Some(Some(rec)) = t.release(key, now)? {
                    released.push(rec);
                }
            }
            Ok((released, !doomed.is_empty()))
        })
    }

    /// Releases the given keys in one transaction; returns the endpoints that existed.
    pub fn release_many(&self, keys: &[AttachmentKey]) -> Result<Vec<Endpoint>, IpamError> {
        self.write("release", |txn, now| {
            let mut t = Tables::open(txn)?;
            let mut released = Vec::new();
            let mut changed = false;
            for key in keys {
                match t.release(key, now)? {
                    Some(Some(rec)) => released.push(rec),
                    Some(None) => {}
                    None => continue,
                }
                changed = true;
            }
            Ok((released, changed))
        })
    }

    pub fn get(&self, key: &AttachmentKey) -> Result<Option<Endpoint>, IpamError> {
        self.read("read", |txn| load(&txn.open_table(ENDPOINTS)?, key))
    }

    /// Every endpoint, ordered by key, with its lifecycle and wiring: enough to rebuild the
    /// dataplane's endpoint entries after a restart. Records that cannot be decoded are logged
    /// and left out (their addresses stay reserved; [`Ipam::verify`] names them).
    pub fn list(&self) -> Result<Vec<Endpoint>, IpamError> {
        self.read("list", |txn| {
            let allocs = txn.open_table(ENDPOINTS)?;
            let mut out = Vec::new();
            for row in allocs.iter()? {
                let (k, v) = row?;
                match decode(v.value()) {
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

    /// `("network/subnet", free)` for every configured subnet, in configuration order: the
    /// addresses of this node's blocks a dynamic allocation could take now (not allocated,
    /// reserved, gateway, network/broadcast or cooling down), saturating at `u64::MAX` for
    /// IPv6 blocks. 0 for subnets without blocks here.
    pub fn free_counts(&self) -> Result<Vec<(String, u64)>, IpamError> {
        let now = self.now_ms();
        let topo = self.topology();
        self.read("count free addresses", |txn| {
            let by_ip = txn.open_table(BY_IP)?;
            let cooldown = txn.open_table(COOLDOWN)?;
            let mut out = Vec::new();
            for (ni, net) in topo.config.networks.iter().enumerate() {
                for (si, sub) in net.subnets.iter().enumerate() {
                    let Some(plan) = topo.plans.get(ni).and_then(|p| p.get(si)) else {
                        continue;
                    };
                    let mut free = 0u128;
                    for &(lo, hi) in &plan.blocks {
                        let (lo_k, hi_k) = (ip_key(plan.addr(lo)), ip_key(plan.addr(hi)));
                        let mut taken = HashSet::new();
                        for row in by_ip.range(lo_k.as_slice()..=hi_k.as_slice())? {
                            let row = row?;
                            if let Some(ip) = ip_of_key(row.0.value())
                                && !plan.is_infra(ord(ip))
                            {
                                taken.insert(ord(ip));
                            }
                        }
                        let mut cooling = 0u128;
                        for row in cooldown.range(lo_k.as_slice()..=hi_k.as_slice())? {
                            let (ip, released) = row?;
                            let Some(ip) = ip_of_key(ip.value()).map(ord) else {
                                continue;
                            };
                            if !plan.is_infra(ip)
                                && !taken.contains(&ip)
                                && self.cooling_ms_left(&topo, released.value(), now).is_some()
                            {
                                cooling += 1;
                            }
                        }
                        let size = (hi - lo).saturating_add(1);
                        free = free.saturating_add(
                            size.saturating_sub(plan.infra_count_in(lo, hi))
                                .saturating_sub(taken.len() as u128)
                                .saturating_sub(cooling),
                        );
                    }
                    out.push((
                        format!("{}/{}", net.name, sub.name),
                        u64::try_from(free).unwrap_or(u64::MAX),
                    ));
                }
            }
            Ok(out)
        })
    }

    /// Checks the indexes against `endpoints` without changing anything; one sentence per
    /// inconsistency or undecodable record (empty when healthy).
    pub fn verify(&self) -> Result<Vec<String>, IpamError> {
        self.write("verify", |txn, now| {
            Ok((self.check(txn, now, false)?.0, false))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn check_static(
        &self,
        ip: IpAddr,
        net: &NetworkConfig,
        sub: &SubnetConfig,
        plan: &SubnetPlan,
        allocs: &Table<KeyCols, &[u8]>,
        by_ip: &Table<IpKey, KeyCols>,
        req: &AllocRequest,
    ) -> Result<(), IpamError> {
        if let Some(what) = plan.infra_what(ord(ip)) {
            return Err(IpamError::Reserved {
                ip,
                network: net.name.clone(),
                subnet: sub.name.clone(),
                what,
            });
        }
        let holder = by_ip.get(ip_key(ip).as_slice())?.map(|g| key_of(g.value()));
        if let Some(holder) = holder {
            let holder_rec = load(allocs, &holder).ok().flatten();
            let (network, subnet) = match &holder_rec {
                Some(r) => (r.network().to_string(), r.subnet().to_string()),
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
        topo: &Topology,
        net: &NetworkConfig,
        sub: &SubnetConfig,
        plan: &SubnetPlan,
        cursor_name: &str,
        cursors: &Table<&str, IpKey>,
        by_ip: &Table<IpKey, KeyCols>,
        cooldown: &mut Table<IpKey, u64>,
        now: u64,
    ) -> Result<IpAddr, IpamError> {
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
        // A cursor of the other family (the subnet's CIDR changed family) starts over.
        let cursor = cursors
            .get(cursor_name)?
            .and_then(|g| ip_of_key(g.value()))
            .filter(|ip| ip.is_ipv4() == plan.v4)
            .map_or(0, ord);
        let mut stats = ScanStats::default();
        let mut clock_went_back = Vec::new();
        let mut found = None;
        for n in ring(&plan.blocks, cursor).take(MAX_SCAN) {
            if plan.is_infra(n) {
                stats.reserved = stats.reserved.saturating_add(1);
                continue;
            }
            let ip = plan.addr(n);
            let k = ip_key(ip);
            if by_ip.get(k.as_slice())?.is_some() {
                stats.allocated = stats.allocated.saturating_add(1);
                continue;
            }
            let released = cooldown.get(k.as_slice())?.map(|g| g.value());
            if let Some(released) = released
                && let Some(left) = self.cooling_ms_left(topo, released, now)
            {
                stats.cooling = stats.cooling.saturating_add(1);
                stats.cooling_ms_left = stats.cooling_ms_left.max(left);
                if released > now {
                    clock_went_back.push(k);
                }
                continue;
            }
            found = Some(ip);
            break;
        }
        // Restart the cooldown of releases stamped in the future (the wall clock was set back)
        // from now, so they wait one cooldown instead of the size of the jump.
        for k in clock_went_back {
            cooldown.insert(k.as_slice(), now)?;
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
    fn cooling_ms_left(&self, topo: &Topology, released: u64, now: u64) -> Option<u64> {
        let cooldown = topo.config.cooldown_secs.saturating_mul(1000);
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

    /// Rewrites the schema-1 tables into schema 2 and drops them. Every allocation, index
    /// entry, cooldown and cursor is carried over; a record that cannot be decoded is copied
    /// as it is, so its address stays reserved and [`Ipam::check`] reports it.
    fn migrate_v1(&self, txn: &WriteTransaction) -> Result<(), IpamError> {
        let topo = self.topology();
        let (mut records, mut unreadable, mut cooling, mut cursors) = (0, 0, 0, 0);
        {
            let old_allocs = txn.open_table(v1::ALLOCATIONS)?;
            let old_by_ip = txn.open_table(v1::BY_IP)?;
            let old_cooldown = txn.open_table(v1::COOLDOWN)?;
            let old_cursors = txn.open_table(v1::CURSORS)?;
            let mut allocs = txn.open_table(ENDPOINTS)?;
            let mut by_ip = txn.open_table(BY_IP)?;
            let mut cooldown = txn.open_table(COOLDOWN)?;
            let mut cursor_t = txn.open_table(CURSORS)?;
            for row in old_allocs.iter()? {
                let (k, v) = row?;
                let cols = k.value();
                match serde_json::from_slice::<v1::Record>(v.value()) {
                    Ok(r) => {
                        let ep = Endpoint {
                            // The row key is the truth (as `check` holds); the embedded one
                            // only ever repeated it.
                            key: key_of(cols),
                            pod: PodInfo {
                                namespace: r.pod.namespace,
                                name: r.pod.name,
                                uid: r.pod.uid,
                                infra_container_id: r.pod.infra_container_id,
                            },
                            addresses: vec![Assigned {
                                ip: r.ip.into(),
                                prefix_len: r.prefix_len,
                                network: r.network.clone(),
                                subnet: r.subnet,
                            }],
                            host_veth: r.host_veth,
                            // 0 when the network is gone: it has no identity to carry.
                            network_id: topo.config.network(&r.network).map_or(0, |n| n.id),
                            wiring: None,
                            // Schema 1 knew no wiring nor revision: a ready endpoint's entry
                            // is found again through its host veth.
                            state: if r.ready {
                                Lifecycle::Ready { policy_revision: 0 }
                            } else {
                                Lifecycle::Allocated
                            },
                            created_unix_ms: r.created_unix_ms,
                        };
                        save(&mut allocs, &ep)?;
                        records += 1;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "IPAM migration: the schema-1 record of {} cannot be decoded \
                             ({e}); copied as it is, its address stays reserved",
                            describe_key(&key_of(cols))
                        );
                        allocs.insert(cols, v.value())?;
                        unreadable += 1;
                    }
                }
            }
            for row in old_by_ip.iter()? {
                let (ip, k) = row?;
                let ipk = ip_key(Ipv4Addr::from(ip.value()).into());
                by_ip.insert(ipk.as_slice(), k.value())?;
            }
            for row in old_cooldown.iter()? {
                let (ip, at) = row?;
                let ipk = ip_key(Ipv4Addr::from(ip.value()).into());
                cooldown.insert(ipk.as_slice(), at.value())?;
                cooling += 1;
            }
            for row in old_cursors.iter()? {
                let (name, ip) = row?;
                let ipk = ip_key(Ipv4Addr::from(ip.value()).into());
                cursor_t.insert(name.value(), ipk.as_slice())?;
                cursors += 1;
            }
        }
        // Dropped, not kept: nothing reads them again, and a later schema-1 build refuses
        // the file by its version rather than misreading stale tables.
        txn.delete_table(v1::ALLOCATIONS)?;
        txn.delete_table(v1::BY_IP)?;
        txn.delete_table(v1::COOLDOWN)?;
        txn.delete_table(v1::CURSORS)?;
        tracing::info!(
            path = %self.path.display(),
            records,
            unreadable,
            cooling,
            cursors,
            "IPAM store migrated from schema 1 to {SCHEMA_VERSION}"
        );
        Ok(())
    }

    /// Compares the tables; with `repair`, fixes `by_ip` and `cooldown` from `endpoints` and
    /// prunes expired cooldowns. Returns the inconsistencies and whether anything was written.
    fn check(
        &self,
        txn: &WriteTransaction,
        now: u64,
        repair: bool,
    ) -> Result<(Vec<String>, bool), IpamError> {
        let topo = self.topology();
        let mut t = Tables::open(txn)?;
        let mut problems = Vec::new();
        let mut changed = false;

        let mut records: BTreeMap<AttachmentKey, Option<Endpoint>> = BTreeMap::new();
        for row in t.allocs.iter()? {
            let (k, v) = row?;
            let key = key_of(k.value());
            match decode(v.value()) {
                Ok(rec) => {
                    records.insert(key, Some(rec));
                }
                Err(e) => {
                    problems.push(format!(
                        "the record of {} cannot be decoded ({e}); its address stays reserved \
                         until the attachment is deleted (CNI DEL or GC)",
                        describe_key(&key)
                    ));
                    records.insert(key, None);
                }
            }
        }
        let mut index: BTreeMap<Vec<u8>, AttachmentKey> = BTreeMap::new();
        for row in t.by_ip.iter()? {
            let (ip, k) = row?;
            index.insert(ip.value().to_vec(), key_of(k.value()));
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

        let mut holders: BTreeMap<Vec<u8>, Vec<&Endpoint>> = BTreeMap::new();
        for rec in records.values().flatten() {
            for ip in rec.ips() {
                holders.entry(ip_key(ip)).or_default().push(rec);
            }
        }
        let mut set_index = Vec::new();
        for (ipk, recs) in &holders {
            let addr = show_key(ipk);
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
            match index.get(ipk) {
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
                    set_index.push((ipk.clone(), oldest.key.clone()));
                }
            }
        }
        let mut unindex = Vec::new();
        for (ipk, key) in &index {
            let addr = show_key(ipk);
            match records.get(key) {
                // Unreadable record: keep its address out of circulation.
                Some(None) => {}
                Some(Some(rec)) if rec.ips().any(|ip| ip_key(ip) == *ipk) => {}
                Some(Some(_)) | None if !holders.contains_key(ipk) => {
                    problems.push(format!(
                        "the index maps {addr} to {} which does not hold it; entry removed",
                        describe_key(key)
                    ));
                    unindex.push(ipk.clone());
                }
                // Re-pointed above at the real holder.
                _ => {}
            }
        }

        let mut cooled_out = Vec::new();
        let mut clamp = Vec::new();
        for row in t.cooldown.iter()? {
            let (ipk, released) = row?;
            let (ipk, released) = (ipk.value().to_vec(), released.value());
            if holders.contains_key(&ipk) || self.cooling_ms_left(&topo, released, now).is_none() {
                cooled_out.push(ipk);
            } else if released > now {
                clamp.push(ipk);
            }
        }

        if repair {
            for rec in &rewrite {
                save(&mut t.allocs, rec)?;
            }
            for (ipk, key) in &set_index {
                t.by_ip.insert(ipk.as_slice(), key_cols(key))?;
            }
            for ipk in &unindex {
                t.by_ip.remove(ipk.as_slice())?;
            }
            // Housekeeping, not inconsistencies: not reported.
            for ipk in &cooled_out {
                t.cooldown.remove(ipk.as_slice())?;
            }
            for ipk in &clamp {
                t.cooldown.insert(ipk.as_slice(), now)?;
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
        let topo = self.topology();
        let mut orphans = BTreeMap::<String, u64>::new();
        for rec in &records {
            for a in &rec.addresses {
                let known = topo
                    .config
                    .network(&a.network)
                    .is_some_and(|n| n.subnet(&a.subnet).is_some());
                if !known {
                    *orphans
                        .entry(format!("{}/{}", a.network, a.subnet))
                        .or_default() += 1;
                }
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

fn invalid_transition(ep: &Endpoint, next: Lifecycle, why: &str) -> IpamError {
    IpamError::InvalidTransition {
        key: describe(&ep.key, Some(&ep.pod)),
        from: ep.state.to_string(),
        to: next.to_string(),
        why: why.to_string(),
    }
}

/// The error for a retried ADD that asks for something other than what the key holds.
fn check_same(existing: &Endpoint, req: &AllocRequest) -> Result<(), IpamError> {
    let mut asks = Vec::new();
    if let Some(ip) = req.static_ip
        && !existing.ips().any(|held| held == ip)
    {
        asks.push(format!("address {ip}"));
    }
    if let Some(n) = req.network
        && n != existing.network()
    {
        asks.push(format!("network {n:?}"));
    }
    if let Some(s) = req.subnet
        && s != existing.subnet()
    {
        asks.push(format!("subnet {s:?}"));
    }
    if asks.is_empty() {
        return Ok(());
    }
    Err(IpamError::KeyHoldsOtherAddress {
        key: describe(&existing.key, Some(&existing.pod)),
        ip: existing.ip(),
        network: existing.network().to_string(),
        subnet: existing.subnet().to_string(),
        requested: asks.join(", "),
    })
}

/// The tables a release touches, opened once per transaction.
struct Tables<'txn> {
    allocs: Table<'txn, KeyCols, &'static [u8]>,
    by_ip: Table<'txn, IpKey, KeyCols>,
    cooldown: Table<'txn, IpKey, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, IpamError> {
        Ok(Tables {
            allocs: txn.open_table(ENDPOINTS)?,
            by_ip: txn.open_table(BY_IP)?,
            cooldown: txn.open_table(COOLDOWN)?,
        })
    }

    /// Removes the endpoint and puts its addresses into cooldown: `None` if the key holds
    /// nothing, `Some(None)` if its record could not be decoded (removed all the same). Whether the address's block
    /// or subnet is still configured does not matter: the cooldown table is no pool, an address
    /// only comes back through a configured block's scan.
    fn release(
        &mut self,
        key: &AttachmentKey,
        now: u64,
    ) -> Result<Option<Option<Endpoint>>, IpamError> {
        let decoded = match self.allocs.remove(key_cols(key))? {
            None => return Ok(None),
            Some(raw) => decode(raw.value()),
        };
        let ips: Vec<Vec<u8>> = match &decoded {
            Ok(rec) => rec.ips().map(ip_key).collect(),
            Err(e) => {
                tracing::warn!(
                    "releasing the undecodable record of {} ({e}); freeing its indexed addresses",
                    describe_key(key)
                );
                let mut ips = Vec::new();
                for row in self.by_ip.iter()? {
                    let (ip, k) = row?;
                    if k.value() == key_cols(key) {
                        ips.push(ip.value().to_vec());
                    }
                }
                ips
            }
        };
        for ipk in ips {
            let held_by_key = self
                .by_ip
                .get(ipk.as_slice())?
                .is_some_and(|g| g.value() == key_cols(key));
            // Another holder in the index means the store was inconsistent; leave its entry.
            if held_by_key {
                self.by_ip.remove(ipk.as_slice())?;
                self.cooldown.insert(ipk.as_slice(), now)?;
            }
        }
        Ok(Some(decoded.ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(blocks: &[(u128, u128)], cursor: u128) -> Vec<u128> {
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
        let top = [(u128::MAX - 1, u128::MAX)];
        assert_eq!(ring_of(&top, u128::MAX), [u128::MAX, u128::MAX - 1]);
    }

    #[test]
    fn infra_count_merges_overlaps() {
        let plan = SubnetPlan {
            v4: true,
            network_addr: 0,
            broadcast: Some(255),
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
    fn address_keys_are_family_tagged_and_ordered() {
        let a: IpAddr = "10.0.0.9".parse().unwrap();
        let b: IpAddr = "10.0.1.0".parse().unwrap();
        let c: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(ip_key(a), [4, 10, 0, 0, 9]);
        assert_eq!(ip_key(c).len(), 17);
        assert!(ip_key(a) < ip_key(b), "numeric order within a family");
        for ip in [a, b, c] {
            assert_eq!(ip_of_key(&ip_key(ip)), Some(ip));
        }
        assert_eq!(ip_of_key(&[4, 1, 2]), None);
        assert_eq!(ip_of_key(&[9, 1, 2, 3, 4]), None);
    }

    #[test]
    fn ipam_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Ipam>();
    }
}
