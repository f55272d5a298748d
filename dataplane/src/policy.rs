//! NetworkPolicy in the pinned maps: applies a [`compile::plan`] op by op and keeps a mirror of
//! what the maps hold, so the next plan is computed against the kernel's actual state (also after
//! a restart, when the mirror is read back from the pins).
//!
//! Layout (see `vpcnet_common`):
//! - `POLICY` (LPM): (endpoint, remote identity, direction, protocol, port prefix). A
//!   [`PortSet`] becomes its aligned port blocks; "every protocol and port" stops the key after
//!   the direction.
//! - `POLICY_CIDRS` (LPM): (endpoint, direction, address prefix) → a port-set number ≥
//!   `CIDR_SET_BASE`, whose ports are `POLICY` entries with that number as the remote. Equal port
//!   sets of one endpoint and direction share a number; a prefix switches set in one map write,
//!   so an ipBlock never passes through a state with both or neither set.
//! - `IDENTITIES`: pod address → identity. `EndpointInfo::policy`: which directions are open.
//!
//! Every op replaces entries so that the allowed set in between is the union of before and
//! after: new entries are written before stale ones are deleted. For the plan's narrow ops
//! (after ⊆ before) and widen ops (before ⊆ after) that union never exceeds what the plan allows
//! at that point.

use super::{DataplaneError, Records, ignore_missing, lock};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use vpcnet_common::{
    CIDR_SET_BASE, DIR_EGRESS, DIR_INGRESS, EndpointInfo, POLICY_CIDR_PREFIX_BASE,
    POLICY_EGRESS_OPEN, POLICY_INGRESS_OPEN, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_PROTO,
    PolicyCidrKey, PolicyKey, ip_key,
};
use vpcnet_policy::cidr::Cidr;
use vpcnet_policy::compile::{
    Compiled, DirectionRules, EndpointRules, Op, PortSet, UpdatePlan, Version,
};
use vpcnet_policy::model::{Direction, PodRef, Protocol};

/// How endpoints get their `EndpointInfo::policy` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    /// No cluster state is configured: nothing selects any pod, every endpoint is open.
    Open,
    /// The bits come from the applied policy; an endpoint the policy layer has not described yet
    /// is closed both ways.
    Enforce,
}

/// What one sync changed, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub ops: usize,
    pub narrowed: bool,
}

fn dir_byte(d: Direction) -> u8 {
    match d {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

fn open_bit(d: Direction) -> u32 {
    match d {
        Direction::Ingress => POLICY_INGRESS_OPEN,
        Direction::Egress => POLICY_EGRESS_OPEN,
    }
}

/// The `POLICY` keys (with prefix lengths) for `ports` of one endpoint, remote and direction.
fn port_keys(
    endpoint: Ipv4Addr,
    remote: u32,
    dir: Direction,
    ports: &PortSet,
) -> Vec<Key<PolicyKey>> {
    let base = PolicyKey {
        endpoint: ip_key(endpoint.octets()),
        remote,
        dir: dir_byte(dir),
        proto: 0,
        port: 0,
    };
    if ports.all {
        return vec![Key::new(POLICY_PREFIX_ANY_PROTO, base)];
    }
    ports
        .port_prefixes()
        .into_iter()
        .map(|(proto, start, len)| {
            Key::new(
                POLICY_PREFIX_PROTO + u32::from(len),
                PolicyKey {
                    proto: proto.number(),
                    port: start.to_be(),
                    ..base
                },
            )
        })
        .collect()
}

fn key_id(k: &Key<PolicyKey>) -> (u32, PolicyKey) {
    (k.prefix_len(), k.data())
}

fn cidr_key(endpoint: Ipv4Addr, dir: Direction, prefix: Cidr) -> Key<PolicyCidrKey> {
    Key::new(
        POLICY_CIDR_PREFIX_BASE + u32::from(prefix.prefix_len()),
        PolicyCidrKey {
            endpoint: ip_key(endpoint.octets()),
            dir: dir_byte(dir),
            _pad: [0; 3],
            addr: ip_key(prefix.addr().octets()),
        },
    )
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SetKey {
    endpoint: Ipv4Addr,
    dir: Direction,
    ports: PortSet,
}

/// Userspace mirror of the policy maps.
#[derive(Debug, Default)]
pub struct PolicyTables {
    mirror: Compiled,
    /// The revision of the tracked compilation the mirror equals, when it is one applied in full:
    /// the next plan then looks only at the keys changed since (see
    /// [`Compiled::touched_since`]). `None` after a restart, a closing of every endpoint or a
    /// failed plan: the next plan compares everything.
    applied: Option<Version>,
    /// Port-set numbers in use: by content, with the number of prefixes pointing at them.
    sets: BTreeMap<SetKey, (u32, usize)>,
    /// The numbers of `sets`, so a new set finds a free number without scanning them all.
    numbers: BTreeSet<u32>,
    next_set: u32,
}

/// What a plan writes: the rule maps (under the policy lock) and, for isolation changes, the
/// endpoint records (under their own short lock, taken per op).
pub(super) struct Maps<'a> {
    pub policy: &'a mut LpmTrie<MapData, PolicyKey, u32>,
    pub cidrs: &'a mut LpmTrie<MapData, PolicyCidrKey, u32>,
    pub identities: &'a mut HashMap<MapData, u32, u32>,
    pub records: &'a Mutex<Records>,
}

impl PolicyTables {
    pub fn mirror(&self) -> &Compiled {
        &self.mirror
    }

    /// The plan from what the maps hold to `new`: over the keys `new` changed since the revision
    /// last applied when it is a later revision of the same compilation, else over everything.
    /// Both give the same ops (`plan_touched`'s contract), so the ordering guarantee holds alike.
    pub fn plan(&self, new: &Compiled) -> UpdatePlan {
        match self.applied.and_then(|v| new.touched_since(v)) {
            Some(touched) => vpcnet_policy::compile::plan_touched(&self.mirror, new, &touched),
            None => vpcnet_policy::compile::plan(&self.mirror, new),
        }
    }

    /// Records that the maps now hold `new` in full (its plan was applied without error).
    pub(super) fn applied(&mut self, new: &Compiled) {
        self.applied = new.version();
    }

    /// `EndpointInfo::policy` for an endpoint being (re)installed.
    pub fn flags(&self, ip: Ipv4Addr) -> u32 {
        self.mirror.endpoints.get(&ip).map_or(0, flags_of)
    }

    /// Rebuilds the mirror from the maps (after a restart).
    pub(super) fn read(
        policy: &LpmTrie<MapData, PolicyKey, u32>,
        cidrs: &LpmTrie<MapData, PolicyCidrKey, u32>,
        identities: &HashMap<MapData, u32, u32>,
        endpoints: &HashMap<MapData, u32, EndpointInfo>,
    ) -> Result<PolicyTables, DataplaneError> {
        let mut t = PolicyTables {
            next_set: CIDR_SET_BASE,
            ..Default::default()
        };
        let ip = |k: u32| Ipv4Addr::from(k.to_ne_bytes());
        let dir = |b: u8| {
            if b == DIR_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            }
        };
        let mut ports: BTreeMap<(Ipv4Addr, Direction, u32), PortSet> = BTreeMap::new();
        for k in policy.keys() {
            let k = k?;
            let d = k.data();
            let set = ports
                .entry((ip(d.endpoint), dir(d.dir), d.remote))
                .or_default();
            if k.prefix_len() <= POLICY_PREFIX_ANY_PROTO {
                *set = PortSet::all();
                continue;
            }
            let Some(proto) = Protocol::ALL.into_iter().find(|p| p.number() == d.proto) else {
                continue;
            };
            let bits = k.prefix_len().saturating_sub(POLICY_PREFIX_PROTO).min(16);
            let start = u16::from_be(d.port);
            let span = (1u32 << (16 - bits)) - 1;
            let end = (u32::from(start) + span).min(u32::from(u16::MAX)) as u16;
            set.add(proto, start, end);
        }
        let mut set_of_number: BTreeMap<u32, SetKey> = BTreeMap::new();
        for ((endpoint, d, remote), set) in ports {
            if remote >= CIDR_SET_BASE {
                t.next_set = t.next_set.max(remote + 1);
                let key = SetKey {
                    endpoint,
                    dir: d,
                    ports: set,
                };
                set_of_number.insert(remote, key.clone());
                t.sets.insert(key, (remote, 0));
                t.numbers.insert(remote);
            } else {
                rules_mut(&mut t.mirror, endpoint, d)
                    .identities
                    .insert(remote, set);
            }
        }
        for item in cidrs.iter() {
            let (k, number) = item?;
            let d = k.data();
            let Some(set) = set_of_number.get(&number) else {
                continue;
            };
            let Some(prefix) =
                Cidr::new(ip(d.addr), (k.prefix_len() - POLICY_CIDR_PREFIX_BASE) as u8)
            else {
                continue;
            };
            if let Some(e) = t.sets.get_mut(set) {
                e.1 += 1;
            }
            rules_mut(&mut t.mirror, ip(d.endpoint), dir(d.dir))
                .cidrs
                .insert(prefix, set.ports.clone());
        }
        for item in identities.iter() {
            let (k, id) = item?;
            t.mirror.ip_identity.insert(ip(k), id);
        }
        for item in endpoints.iter() {
            let (k, info) = item?;
            let e = endpoint_mut(&mut t.mirror, ip(k));
            e.ingress.isolated = info.policy & POLICY_INGRESS_OPEN == 0;
            e.egress.isolated = info.policy & POLICY_EGRESS_OPEN == 0;
        }
        Ok(t)
    }

    /// Marks every endpoint isolated both ways with no rules, which is what the maps enforce
    /// after a rule map was recreated (the records are then written closed). The next plan
    /// opens what the policy opens, after writing the rules (no window of wider access).
    pub(super) fn close_all(&mut self) {
        self.applied = None;
        for e in self.mirror.endpoints.values_mut() {
            e.ingress.isolated = true;
            e.egress.isolated = true;
        }
    }

    /// Applies `plan` phase by phase. Returns the number of ops and whether anything narrowed.
    pub(super) fn apply(
        &mut self,
        maps: &mut Maps<'_>,
        plan: &UpdatePlan,
    ) -> Result<SyncStats, DataplaneError> {
        let mut stats = SyncStats::default();
        // Set again by the caller once every op is in: a plan cut short leaves the mirror between
        // two revisions, so the next plan compares everything.
        self.applied = None;
        for (phase, ops) in plan.phases() {
            for op in ops {
                self.apply_op(maps, op)
                    .map_err(|e| DataplaneError::Command(format!("policy {phase} {op:?}: {e}")))?;
                stats.ops += 1;
            }
            if phase == "narrow" && !ops.is_empty() {
                stats.narrowed = true;
            }
        }
        Ok(stats)
    }

    fn apply_op(&mut self, maps: &mut Maps<'_>, op: &Op) -> Result<(), DataplaneError> {
        match op {
            Op::SetIsolated { endpoint, .. } => {
                self.mirror.apply(op);
                let bits = self.flags(*endpoint);
                lock(maps.records).set_policy(*endpoint, Some(bits))?;
                return Ok(());
            }
            Op::SetIdentity {
                endpoint,
                dir,
                remote,
                ports,
            } => {
                let old = self
                    .rules(*endpoint, *dir)
                    .and_then(|r| r.identities.get(remote))
                    .cloned()
                    .unwrap_or_default();
                replace_ports(
                    maps.policy,
                    &port_keys(*endpoint, *remote, *dir, &old),
                    &port_keys(*endpoint, *remote, *dir, ports),
                )?;
            }
            Op::DelIdentity {
                endpoint,
                dir,
                remote,
            } => {
                if let Some(old) = self
                    .rules(*endpoint, *dir)
                    .and_then(|r| r.identities.get(remote))
                    .cloned()
                {
                    replace_ports(maps.policy, &port_keys(*endpoint, *remote, *dir, &old), &[])?;
                }
            }
            Op::SetCidr {
                endpoint,
                dir,
                prefix,
                ports,
            } => {
                let old = self
                    .rules(*endpoint, *dir)
                    .and_then(|r| r.cidrs.get(prefix))
                    .cloned();
                if old.as_ref() != Some(ports) {
                    let number = self.acquire(maps, *endpoint, *dir, ports)?;
                    maps.cidrs
                        .insert(&cidr_key(*endpoint, *dir, *prefix), number, 0)?;
                    if let Some(old) = old {
                        self.release(maps, *endpoint, *dir, old)?;
                    }
                }
            }
            Op::DelCidr {
                endpoint,
                dir,
                prefix,
            } => {
                if let Some(old) = self
                    .rules(*endpoint, *dir)
                    .and_then(|r| r.cidrs.get(prefix))
                    .cloned()
                {
                    ignore_missing(maps.cidrs.remove(&cidr_key(*endpoint, *dir, *prefix)))?;
                    self.release(maps, *endpoint, *dir, old)?;
                }
            }
            Op::MapIp { ip, identity } => {
                maps.identities.insert(ip_key(ip.octets()), *identity, 0)?;
            }
            Op::UnmapIp { ip } => {
                ignore_missing(maps.identities.remove(&ip_key(ip.octets())))?;
            }
            Op::DelEndpoint { endpoint } => {
                if let Some(e) = self.mirror.endpoints.get(endpoint).cloned() {
                    for (dir, rules) in [
                        (Direction::Ingress, &e.ingress),
                        (Direction::Egress, &e.egress),
                    ] {
                        for (remote, ports) in &rules.identities {
                            replace_ports(
                                maps.policy,
                                &port_keys(*endpoint, *remote, dir, ports),
                                &[],
                            )?;
                        }
                        for (prefix, ports) in &rules.cidrs {
                            ignore_missing(maps.cidrs.remove(&cidr_key(*endpoint, dir, *prefix)))?;
                            self.release(maps, *endpoint, dir, ports.clone())?;
                        }
                    }
                }
                // A later ADD of this address starts closed, as the mirror now says.
                lock(maps.records).set_policy(*endpoint, None)?;
            }
        }
        self.mirror.apply(op);
        Ok(())
    }

    fn rules(&self, endpoint: Ipv4Addr, dir: Direction) -> Option<&DirectionRules> {
        self.mirror.endpoints.get(&endpoint).map(|e| e.dir(dir))
    }

    /// The number of the port set `ports` of this endpoint and direction, writing its entries
    /// first when it is new. Counts one more prefix pointing at it.
    fn acquire(
        &mut self,
        maps: &mut Maps<'_>,
        endpoint: Ipv4Addr,
        dir: Direction,
        ports: &PortSet,
    ) -> Result<u32, DataplaneError> {
        let key = SetKey {
            endpoint,
            dir,
            ports: ports.clone(),
        };
        if let Some(e) = self.sets.get_mut(&key) {
            e.1 += 1;
            return Ok(e.0);
        }
        let mut number = self.next_set.max(CIDR_SET_BASE);
        while self.numbers.contains(&number) {
            number = number.checked_add(1).unwrap_or(CIDR_SET_BASE);
        }
        self.next_set = number.checked_add(1).unwrap_or(CIDR_SET_BASE);
        replace_ports(maps.policy, &[], &port_keys(endpoint, number, dir, ports))?;
        self.sets.insert(key, (number, 1));
        self.numbers.insert(number);
        Ok(number)
    }

    /// One prefix less points at this set; its entries go when none does.
    fn release(
        &mut self,
        maps: &mut Maps<'_>,
        endpoint: Ipv4Addr,
        dir: Direction,
        ports: PortSet,
    ) -> Result<(), DataplaneError> {
        let key = SetKey {
            endpoint,
            dir,
            ports,
        };
        let Some(e) = self.sets.get_mut(&key) else {
            return Ok(());
        };
        e.1 = e.1.saturating_sub(1);
        if e.1 == 0 {
            let number = e.0;
            let stale = port_keys(endpoint, number, dir, &key.ports);
            self.sets.remove(&key);
            self.numbers.remove(&number);
            replace_ports(maps.policy, &stale, &[])?;
        }
        Ok(())
    }
}

fn flags_of(e: &EndpointRules) -> u32 {
    let mut f = 0;
    for d in [Direction::Ingress, Direction::Egress] {
        if !e.dir(d).isolated {
            f |= open_bit(d);
        }
    }
    f
}

fn endpoint_mut(c: &mut Compiled, ip: Ipv4Addr) -> &mut EndpointRules {
    c.endpoints.entry(ip).or_insert_with(|| EndpointRules {
        pod: PodRef::new("", ""),
        identity: vpcnet_common::ID_WORLD,
        ingress: DirectionRules {
            isolated: true,
            ..Default::default()
        },
        egress: DirectionRules {
            isolated: true,
            ..Default::default()
        },
    })
}

fn rules_mut(c: &mut Compiled, ip: Ipv4Addr, d: Direction) -> &mut DirectionRules {
    let e = endpoint_mut(c, ip);
    match d {
        Direction::Ingress => &mut e.ingress,
        Direction::Egress => &mut e.egress,
    }
}

/// Writes `new`, then deletes what of `old` is not in `new`.
fn replace_ports(
    map: &mut LpmTrie<MapData, PolicyKey, u32>,
    old: &[Key<PolicyKey>],
    new: &[Key<PolicyKey>],
) -> Result<(), DataplaneError> {
    let keep: BTreeSet<(u32, PolicyKey)> = new.iter().map(key_id).collect();
    for k in new {
        map.insert(k, 1, 0)?;
    }
    for k in old {
        if !keep.contains(&key_id(k)) {
            ignore_missing(map.remove(k))?;
        }
    }
    Ok(())
}

/// Bumps `POLICY_EPOCH`: established connections are judged again on their next packet.
pub(super) fn bump_epoch(epoch: &mut Array<MapData, u32>) -> Result<(), DataplaneError> {
    let cur = epoch.get(&0, 0)?;
    epoch.set(0, cur.wrapping_add(1), 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(keys: &[Key<PolicyKey>], proto: u8, port: u16) -> bool {
        keys.iter().any(|k| {
            let d = k.data();
            if k.prefix_len() == POLICY_PREFIX_ANY_PROTO {
                return true;
            }
            let bits = k.prefix_len() - POLICY_PREFIX_PROTO;
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            d.proto == proto && (port & mask) == u16::from_be(d.port)
        })
    }

    #[test]
    fn port_sets_become_exact_port_blocks() {
        let ep = Ipv4Addr::new(10, 0, 0, 1);
        let mut ps = PortSet::default();
        ps.add(Protocol::Tcp, 80, 90);
        ps.add(Protocol::Udp, 53, 53);
        ps.add(Protocol::Sctp, 0, u16::MAX);
        let keys = port_keys(ep, 300, Direction::Ingress, &ps);
        for port in 0..=u16::MAX {
            assert_eq!(
                covered(&keys, 6, port),
                (80..=90).contains(&port),
                "tcp {port}"
            );
            assert_eq!(covered(&keys, 17, port), port == 53, "udp {port}");
            assert!(covered(&keys, 132, port));
            assert!(!covered(&keys, 1, port));
        }
        // Aligned blocks: 80-90 takes 80-87, 88-89 and 90.
        assert!(keys.len() <= 5, "{} keys", keys.len());
        let all = port_keys(ep, 300, Direction::Egress, &PortSet::all());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].prefix_len(), POLICY_PREFIX_ANY_PROTO);
        assert_eq!(all[0].data().dir, DIR_EGRESS);
        assert!(port_keys(ep, 300, Direction::Egress, &PortSet::default()).is_empty());
    }
}
