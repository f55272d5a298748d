//! The eBPF dataplane: loads vpcnet's tc programs into the node's netns (the calling thread's),
//! keeps their maps in sync with the endpoints, and survives daemon restarts without dropping a
//! packet.
//!
//! # Forwarding
//! Pod traffic is forwarded by the programs, not by kernel routing:
//! * host-veth ingress (`endpoint_ingress`): local pod → MACs rewritten, `bpf_redirect_peer` into
//!   its netns; routable destination of the source's network → `bpf_redirect_neigh` out of the
//!   uplink with the pod's own source address; node addresses and internet destinations →
//!   `TC_ACT_OK`.
//! * uplink ingress (`uplink_ingress`): packets for a local pod go straight into it.
//! * except **kernel flows**: a packet of a flow the kernel carried is handed to the kernel
//!   (`TC_ACT_OK`) by both programs — see below.
//!
//! TTL is decremented on every forwarded hop (drop `ttl-exceeded` at ≤ 1).
//!
//! # Kernel flows (NAT done by the kernel: portmap hostPorts, kube-proxy Services)
//! Rule: a flow the kernel has NAT state for keeps going through the kernel in both directions.
//! Otherwise the redirect helpers skip conntrack's reverse NAT: a hostPort client
//! (→ node:8080, DNAT → pod:80) would get the pod's SYN-ACK from pod:80, and a pod talking to a
//! ClusterIP would get the backend's reply from the backend's address.
//!
//! The programs learn those flows from where the kernel puts packets, into the LRU map
//! `KERNEL_FLOWS` (reply 5-tuple → expiry), through two observer programs that never drop:
//! * `endpoint_egress` on each host veth (towards the pod): only packets the *kernel* delivers
//!   pass there (`bpf_redirect_peer` skips the host veth's egress), so the reply tuple of every
//!   TCP/UDP packet seen there is recorded. `endpoint_ingress` looks the pod's packets up and
//!   passes hits to the kernel: hostPort replies, local Service backends' replies.
//! * `uplink_egress` on the uplink: pod-sourced packets the kernel forwarded (Service DNATed to
//!   a remote backend, post-DNAT tuple) are recorded; the programs' own redirects are told apart
//!   by an `skb->mark` bit ([`vpcnet_common::SKB_MARK_REDIRECTED`]) that `endpoint_ingress` sets
//!   and `uplink_egress` clears. `uplink_ingress` passes packets for a pod that match to the
//!   kernel: the backend's replies get de-NATed to the ClusterIP.
//!
//! Why not conntrack itself (`bpf_skb_ct_lookup`): aya 0.14's loader cannot relocate kfunc calls,
//! and a conntrack lookup on every pod packet costs more than one hash lookup — the only
//! per-packet cost this adds to the pod↔pod / pod↔VPC path (plus reading the ports). Recording
//! everything the kernel carried is safe because the reply of such a packet is always the
//! kernel's (NAT, masquerade, node-local traffic); the nft forward chain accepts it with
//! `ct status dnat/snat`. Entries expire after an idle timeout refreshed by both directions
//! (TCP: conntrack's established timeout, UDP: 180 s) and the LRU bounds the map
//! ([`vpcnet_common::MAX_KERNEL_FLOWS`]); a TCP SYN on the fast path only matches an entry whose
//! flow the kernel saw open (a SYN within the last 60 s, after its last FIN/RST), so a new
//! connection reusing a stale tuple is never captured (the entry is dropped,
//! `kernel-flow-stale`). Counters: `kernel-flow-hits`, `kernel-flows-recorded`,
//! `kernel-flow-record-failed`. Not covered: ICMP errors of NATed flows, non-first fragments.
//! The observers follow their side's attach mode (TCX or classic).
//!
//! # NetworkPolicy
//! `endpoint_ingress` judges the source pod's egress (and the destination's ingress when it is a
//! pod of this node), `uplink_ingress` the destination's ingress, and `endpoint_egress` the
//! ingress of a pod the kernel delivers to (the node itself, hostPorts, masquerade replies).
//! Lookups: `IDENTITIES` (pod address → identity; a node address is `ID_HOST`), `POLICY`
//! (LPM over endpoint, remote identity, direction, protocol, port prefix), `POLICY_CIDRS`
//! (ipBlocks). Allowed connections of policy-selected pods go into `CONNTRACK` both ways; pods no
//! policy selects cost nothing (`EndpointInfo::policy` says which directions are open, and a
//! record without those bits is closed). Userspace side: `policy.rs`.
//!
//! # Choices
//! * **Masquerade** is nftables (table `ip vpcnet` in the node netns): internet traffic is the
//!   one class the programs hand to the kernel, which forwards it and masquerades it to the
//!   uplink address; replies come back through conntrack de-NAT and the `<pod>/32` route. That
//!   keeps NAT state in conntrack (shared with kube-proxy, visible with `conntrack -L`), not in a
//!   second NAT table of our own.
//! * **ARP** for pod addresses is answered by `uplink_ingress` itself (reply crafted in place,
//!   `bpf_redirect` out of the uplink). Unlike `proxy_arp`, it answers only for addresses that are
//!   endpoints right now — proxy_arp answers for anything the node has a route to, including the
//!   VPC router's and other nodes' addresses, which poisons the fabric's caches. It also means a
//!   node without the programs stops attracting traffic for its pods.
//! * **Kernel path blocked**: the table's forward chain drops (and counts) pod traffic to/from any
//!   VPC destination the programs should have handled, so nothing reaches pods behind the
//!   programs' back — see [`nft::render`].
//! * **Attach**: the uplink program through a TCX link pinned in `pin_dir` (clsact only when
//!   TCX attach fails). Endpoints: see [`StartOptions::endpoint_attach`] (the one place that
//!   states the default and why). Upgrades and restarts swap programs in place either way
//!   (`bpf_link_update` ≈ 0.03 ms; filter replace at a fixed priority/handle ≈ 0.1 ms), losing no
//!   packet.
//!
//! # The maps are a projection of the endpoints
//! The durable endpoint list is the caller's (the daemon's store), not the maps':
//! [`Dataplane::start_restoring`] / [`Dataplane::restore_endpoints`] make `ENDPOINTS` exactly
//! that list and attach this build's programs on every listed host veth. A pin whose layout
//! differs from this build's (an upgrade that changed a record) is recreated empty and refilled
//! from the list before any program is swapped to it (in enforce mode, the policy bits of
//! recreated records by the first policy sync) — see [`Dataplane::start_restoring`] for why that
//! order loses no packet.
//!
//! # Locks
//! [`Dataplane`] is `Sync` and used through `&self`. Endpoint work (ADD/DEL/restore: links and
//! attaches) and policy plans take different locks, so a long policy plan does not hold up an
//! ADD and an ADD's attach does not hold up a plan. Both write `ENDPOINTS` records (an ADD the
//! whole record, a plan its policy bits) through a third, short lock that also holds the policy
//! bits as the last plan left them, so whichever writes second sees the other's change. Lock
//! order: endpoint links → records/stats/epoch; policy → records/epoch; records, stats, epoch
//! and topology take no other lock.
//!
//! # Pins (under `pin_dir`)
//! Maps by name (`ENDPOINTS`, `ENDPOINT_STATS`, `ROUTES`, `PEERS`, `CONFIG`, `DROPS`,
//! `NODE_STATS`, `KERNEL_FLOWS`, `POLICY`, `POLICY_CIDRS`, `IDENTITIES`, `POLICY_EPOCH`,
//! `CONNTRACK`), TCX links `link_uplink`/`link_uplink_out` and
//! `link_ep_<a>_<b>_<c>_<d>`/`link_out_<a>_<b>_<c>_<d>` (ingress/egress; bpffs names cannot
//! contain dots), `tc-classic` (and `tc-classic-egress`) markers when the uplink uses the
//! fallback.

mod maps;
mod nft;
mod plan;
mod policy;
mod sys;

use aya::maps::MapInfo;
use aya::maps::PerCpuValues;
use aya::maps::lpm_trie::Key;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnetwork::Ipv4Network;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vpcnet_common::{
    CtValue, DROP_REASON_NAMES, EP_FLAG_EGRESS_TC_CLASSIC, EP_FLAG_TC_CLASSIC, EndpointInfo,
    EndpointStats, FlowKey, NODE_COUNTER_NAMES, NodeConfig, POLICY_OPEN, PeerKey, RouteKey,
    RouteValue, ip_key,
};

pub use maps::Layout as MapLayout;
pub use nft::{HOST_VETH_PREFIX, TABLE as NFT_TABLE};
use policy::PolicyTables;
pub use policy::{PolicyMode, SyncStats};

const PROG_UPLINK: &str = "uplink_ingress";
const PROG_ENDPOINT: &str = "endpoint_ingress";
const PROG_UPLINK_EGRESS: &str = "uplink_egress";
const PROG_ENDPOINT_EGRESS: &str = "endpoint_egress";
const PROGRAMS: [&str; 4] = [
    PROG_UPLINK,
    PROG_ENDPOINT,
    PROG_UPLINK_EGRESS,
    PROG_ENDPOINT_EGRESS,
];
const LINK_UPLINK: &str = "link_uplink";
const LINK_UPLINK_EGRESS: &str = "link_uplink_out";
const LINK_EP_PREFIX: &str = "link_ep_";
const LINK_EP_EGRESS_PREFIX: &str = "link_out_";
const CLASSIC_MARKER: &str = "tc-classic";
const CLASSIC_MARKER_EGRESS: &str = "tc-classic-egress";
/// Priority/handle of vpcnet's filters in classic mode, fixed so a restart replaces them in place.
const CLASSIC_PRIORITY: u16 = 1;
const CLASSIC_HANDLE: TcHandle = TcHandle::new(0, 0x7663);

/// The leading bytes of an `ENDPOINTS` value every release keeps: `ifindex: u32`, `mac: [u8; 6]`,
/// `network_id: u16`. New fields go after them, so a record of another layout still tells which
/// pod lived where ([`pinned_endpoints`]).
const ENDPOINT_RECORD_STABLE_PREFIX: usize = 12;

/// Map layouts this build's programs expect (for tools and tests that check pins).
pub const MAP_LAYOUTS: [MapLayout; 13] = maps::LAYOUTS;

#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// Per node, e.g. `/sys/fs/bpf/vpcnet/<node>`; maps and links are pinned here.
    pub pin_dir: PathBuf,
    /// Uplink interface name in the current netns.
    pub uplink: String,
    pub networks: Vec<vpcnet_ipam::NetworkConfig>,
    /// This node's pod blocks.
    /// This node's blocks, of either family (the programs use the IPv4 ones).
    pub local_pod_cidrs: Vec<ipnetwork::IpNetwork>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub network_id: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("eBPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    #[error("pinning: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("tc: {0}")]
    Tc(#[from] aya::programs::tc::TcError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("no interface {0} in this network namespace")]
    NoSuchInterface(String),
    #[error("no interface with index {0} in this network namespace")]
    NoSuchIfindex(u32),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nftables: {0}")]
    Nft(String),
    #[error("{0}")]
    Command(String),
    #[error("invalid dataplane configuration: {0}")]
    Config(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let context = context.into();
    move |source| DataplaneError::Io { context, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link pinned in `pin_dir` (kernel ≥ 6.6).
    Tcx,
    /// A clsact qdisc with a direct-action cls_bpf filter at a fixed priority/handle.
    Classic,
}

/// How [`Dataplane::start_with`] attaches programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartOptions {
    /// Mode for endpoints added from now on (existing endpoints keep theirs, recorded in the map).
    ///
    /// The default is `Classic`, as in the daemon's configuration (`endpoint_attach`), for CNI ADD
    /// latency: every TCX attach that adds a program waits for an RCU grace period
    /// (`tcx_entry_sync()` = `synchronize_rcu()`) while holding RTNL — measured on kernel 6.18 at
    /// 8–20 ms per host veth, every time, not only for the first link — while a classic filter
    /// (clsact qdisc + filter) attaches in 0.3–0.5 ms. `Tcx` gives the node owned, pinned links
    /// instead; it falls back to classic when TCX attach fails. The uplink always tries TCX first
    /// (one attach per start, so its cost does not matter).
    pub endpoint_attach: AttachMode,
    /// Whether NetworkPolicy decides the endpoints' policy bits (see [`PolicyMode`]).
    pub policy: PolicyMode,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            endpoint_attach: AttachMode::Classic,
            policy: PolicyMode::Open,
        }
    }
}

/// Timings of the last operations, for the ADD latency budget and `vpcnetctl`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// `EbpfLoader::load` (object parse, map create/adopt, relocation).
    pub load: Duration,
    /// Verifier load of both programs.
    pub verify: Duration,
    /// Attaching (or updating) the uplink programs (observer and forwarder).
    pub uplink_attach: Duration,
    /// Last `add_endpoint`: map entries + link, end to end.
    pub last_add_endpoint: Duration,
    /// Last endpoint link create/update alone.
    pub last_endpoint_attach: Duration,
    /// Whether the last endpoint link was updated in place (vs created).
    pub last_endpoint_updated: bool,
}

/// Per-endpoint packet and byte counters (`tx` = sent by the pod, `rx` = delivered to it by the
/// programs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointCounters {
    pub ip: Ipv4Addr,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// What [`Dataplane::counters`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub endpoints: Vec<EndpointCounters>,
    /// Drops by reason name.
    pub drops: Vec<(String, u64)>,
    /// Node-wide events by name.
    pub node: Vec<(String, u64)>,
}

/// What [`Dataplane::restore_endpoints`] did; every list is sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Endpoints of the list whose record was written (missing, or different from the list)
    /// before their programs were attached.
    pub written: Vec<Ipv4Addr>,
    /// Endpoints of the list whose record was already right (only their links were updated).
    pub kept: Vec<Ipv4Addr>,
    /// Records the list does not have, removed with their links.
    pub removed: Vec<Ipv4Addr>,
    /// Endpoints of the list not installed, and why (host veth gone, attach failed, …).
    pub skipped: Vec<(Ipv4Addr, String)>,
    /// Maps recreated at start because their pin had another layout.
    pub recreated_maps: Vec<&'static str>,
}

/// `ENDPOINTS` and the policy bits, under one short lock: see "Locks" in the crate docs.
struct Records {
    map: maps::Endpoints,
    mode: PolicyMode,
    /// `EndpointInfo::policy` per address as the applied policy sets it (Enforce mode); an
    /// address without an entry is closed both ways.
    bits: BTreeMap<Ipv4Addr, u32>,
}

impl Records {
    fn policy_bits(&self, ip: Ipv4Addr) -> u32 {
        match self.mode {
            PolicyMode::Open => POLICY_OPEN,
            PolicyMode::Enforce => self.bits.get(&ip).copied().unwrap_or(0),
        }
    }

    fn get(&self, ip: Ipv4Addr) -> Option<EndpointInfo> {
        self.map.0.get(&ip_key(ip.octets()), 0).ok()
    }

    /// Writes the record with the policy bits the applied policy gives it.
    fn write(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<EndpointInfo, DataplaneError> {
        let info = EndpointInfo {
            policy: self.policy_bits(ip),
            ..info
        };
        self.map.0.insert(ip_key(ip.octets()), info, 0)?;
        Ok(info)
    }

    /// Changes the record's attach flags only, if it is still there.
    fn set_flags(&mut self, ip: Ipv4Addr, flags: u32) -> Result<(), DataplaneError> {
        if let Some(info) = self.get(ip)
            && info.flags != flags
        {
            self.map
                .0
                .insert(ip_key(ip.octets()), EndpointInfo { flags, ..info }, 0)?;
        }
        Ok(())
    }

    /// A policy op decided the endpoint's bits.
    fn set_policy(&mut self, ip: Ipv4Addr, bits: Option<u32>) -> Result<(), DataplaneError> {
        match bits {
            Some(b) => {
                self.bits.insert(ip, b);
            }
            None => {
                self.bits.remove(&ip);
                return Ok(());
            }
        }
        if let Some(info) = self.get(ip) {
            let want = self.policy_bits(ip);
            if info.policy != want {
                self.map.0.insert(
                    ip_key(ip.octets()),
                    EndpointInfo {
                        policy: want,
                        ..info
                    },
                    0,
                )?;
            }
        }
        Ok(())
    }

    fn remove(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        ignore_missing(self.map.0.remove(&ip_key(ip.octets())))
    }

    fn dump(&self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>, DataplaneError> {
        let mut out = Vec::new();
        for item in self.map.0.iter() {
            let (k, v) = item?;
            out.push((Ipv4Addr::from(k.to_ne_bytes()), v));
        }
        Ok(out)
    }
}

/// Counter maps (written by the programs; userspace creates and removes per-endpoint slots).
struct Stats {
    endpoints: maps::EndpointStatsMap,
    drops: maps::Drops,
    node: maps::NodeStats,
}

/// The loaded programs and what attaching them needs: the endpoint lock.
struct Links {
    bpf: Ebpf,
    timings: Timings,
    /// The program swap [`Dataplane::start_restoring`] held back until the first policy sync.
    held: Option<HeldSwap>,
}

/// A program swap waiting for the policy bits of a recreated `ENDPOINTS` map: see
/// [`Dataplane::start_restoring`].
struct HeldSwap {
    endpoints: Vec<Endpoint>,
    uplink_ifindex: u32,
    /// Records written at start (for the report and the clean-up of an unreadable record's mode).
    written: BTreeSet<Ipv4Addr>,
}

/// The policy lock: the rule maps and the mirror of what they hold.
struct PolicyState {
    policy: maps::Policy,
    cidrs: maps::PolicyCidrs,
    identities: maps::Identities,
    tables: PolicyTables,
}

/// The topology lock: what `ROUTES`/`PEERS` and the nftables table are rendered from.
struct TopologyState {
    routes: maps::Routes,
    peers: maps::Peers,
}

/// The node's dataplane. Operates on the netns of the calling thread: create it and call it on a
/// thread that is in the node's netns (the daemon runs there entirely).
pub struct Dataplane {
    pin_dir: PathBuf,
    uplink: String,
    /// How the uplink program is attached: set when it is attached or swapped (TCX may fall
    /// back to classic), read without the endpoint lock.
    uplink_classic: AtomicBool,
    /// Whether [`Links::held`] holds a swap, so a policy sync need not take the endpoint lock to
    /// find out.
    swap_held: AtomicBool,
    endpoint_mode: AttachMode,
    policy_mode: PolicyMode,
    nr_cpus: usize,
    links: Mutex<Links>,
    records: Mutex<Records>,
    stats: Mutex<Stats>,
    policy: Mutex<PolicyState>,
    epoch: Mutex<maps::PolicyEpoch>,
    topology: Mutex<TopologyState>,
    /// Kept so the programs' config map lives as long as they are loaded by us.
    _config: maps::Config,
}

// The daemon calls the dataplane from several blocking tasks at once.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Dataplane>();
};

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("uplink", &self.uplink)
            .field("uplink_mode", &self.attach_mode())
            .field("endpoint_mode", &self.endpoint_mode)
            .finish_non_exhaustive()
    }
}

/// A poisoned lock means a panic mid-operation; the maps are still the kernel's truth and every
/// operation re-reads what it changes, so carrying on is safe.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which side of an interface a program sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// The forwarding programs (`uplink_ingress`, `endpoint_ingress`).
    In,
    /// The kernel-flow observers (`uplink_egress`, `endpoint_egress`).
    Out,
}

impl Dir {
    fn tc(self) -> TcAttachType {
        match self {
            Dir::In => TcAttachType::Ingress,
            Dir::Out => TcAttachType::Egress,
        }
    }
}

enum LinkTarget<'a> {
    Uplink(Dir),
    Endpoint(Ipv4Addr, &'a str, Dir),
}

/// An endpoint of the list, checked against the node: its host veth's name.
struct Checked<'a> {
    ep: &'a Endpoint,
    ifname: String,
    /// Whether the record had to be (re)written.
    written: bool,
}

impl Dataplane {
    /// [`Dataplane::start_with`] with the default options.
    pub fn start(cfg: DataplaneConfig) -> Result<Dataplane, DataplaneError> {
        Self::start_with(cfg, StartOptions::default())
    }

    /// Starts with the endpoint list the pinned `ENDPOINTS` map holds ([`pinned_endpoints`]): for
    /// callers without a durable list of their own. A restart keeps every endpoint; so does an
    /// upgrade that changed the record layout, as far as [`pinned_endpoints`] can still read it.
    pub fn start_with(
        cfg: DataplaneConfig,
        opts: StartOptions,
    ) -> Result<Dataplane, DataplaneError> {
        let eps = match pinned_endpoints(&cfg.pin_dir) {
            Ok(eps) => eps,
            Err(e) => {
                tracing::warn!(error = %e, "reading the pinned endpoints; starting without them");
                Vec::new()
            }
        };
        Self::start_restoring(cfg, opts, &eps).map(|(dp, _)| dp)
    }

    /// Loads the programs with their maps pinned in `pin_dir` — adopting existing pins, so
    /// counters, connections and policy survive a restart — writes the routes/peers/config maps
    /// and the nftables table from `cfg`, makes `ENDPOINTS` exactly `endpoints` and attaches (or
    /// updates in place) the uplink programs and the endpoint programs of every endpoint.
    ///
    /// Order, so that no packet is lost, also when a map was recreated:
    /// 1. pins of another layout are unlinked. The map behind such a pin lives on as long as a
    ///    program uses it: the previous release's programs, still attached, keep forwarding with
    ///    the old map and its entries;
    /// 2. the object is loaded: a new, empty map is created and pinned for every unlinked pin;
    /// 3. every map the new programs read is filled: config, routes, peers, then the endpoint
    ///    records from `endpoints`. Nothing runs the new programs yet, so nothing sees them empty;
    /// 4. only then are programs swapped — uplink first (it only needs the filled maps), then each
    ///    endpoint's host veth, in place (`bpf_link_update` / filter replace at a fixed
    ///    priority/handle: atomic per hook). A packet runs either the old program with the old
    ///    maps or the new one with the new, filled maps. When the last hook is swapped nothing
    ///    references the old map any more and the kernel frees it.
    ///
    /// In [`PolicyMode::Enforce`], a recreated `ENDPOINTS` map (with the rule maps kept) cannot
    /// be filled in full here: its records' policy bits are the policy's, which the old records'
    /// layout does not tell. Step 4 then waits for the caller's first [`Dataplane::sync_policy`]
    /// (the previous programs forward and enforce meanwhile, with the previous maps), so no
    /// program ever runs with a record whose bits are not yet written — swapping at once closed
    /// every pod for the milliseconds until that sync, and a ping or two at 100 pps was lost.
    /// An [`Dataplane::add_endpoint`] or [`Dataplane::restore_endpoints`] before that sync swaps
    /// first.
    ///
    /// Recreated policy maps cannot be refilled here (their content is the compiled policy, which
    /// the caller syncs next with [`Dataplane::sync_policy`]): in enforce mode every endpoint's
    /// policy bits are then closed until that sync has written the rules, so the new programs
    /// never judge traffic against a partial rule set (fail closed: denied, counted by reason).
    /// Recreated conntrack/kernel-flow maps start empty; a policy-selected connection is judged
    /// again on its next packet.
    pub fn start_restoring(
        cfg: DataplaneConfig,
        opts: StartOptions,
        endpoints: &[Endpoint],
    ) -> Result<(Dataplane, RestoreReport), DataplaneError> {
        let uplink_ifindex = sys::ifindex(&cfg.uplink)
            .ok_or_else(|| DataplaneError::NoSuchInterface(cfg.uplink.clone()))?;
        let (mac, node_addrs) =
            sys::interface_addresses(&cfg.uplink).map_err(io_err("listing interface addresses"))?;
        let uplink_mac = mac.ok_or_else(|| {
            DataplaneError::Config(format!("uplink {} has no Ethernet address", cfg.uplink))
        })?;
        let plan = plan::plan(&cfg.networks, &ipv4_only(&cfg.local_pod_cidrs), &node_addrs)?;

        std::fs::create_dir_all(&cfg.pin_dir)
            .map_err(io_err(format!("creating {}", cfg.pin_dir.display())))?;
        if !sys::is_bpffs(&cfg.pin_dir)
            .map_err(io_err(format!("statfs {}", cfg.pin_dir.display())))?
        {
            return Err(DataplaneError::Config(format!(
                "{} is not on a bpffs mount",
                cfg.pin_dir.display()
            )));
        }
        let recreated = drop_incompatible_pins(&cfg.pin_dir);

        let t = Instant::now();
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .load(ebpf_object::BYTES)?;
        let load = t.elapsed();
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| io_err(what)(e))?;
        let uplink_mode = if cfg.pin_dir.join(CLASSIC_MARKER).exists() {
            AttachMode::Classic
        } else {
            AttachMode::Tcx
        };
        let mut config = maps::Config::take(&mut bpf)?;
        let endpoints_map = maps::Endpoints::take(&mut bpf)?;
        let stats = Stats {
            endpoints: maps::EndpointStatsMap::take(&mut bpf)?,
            drops: maps::Drops::take(&mut bpf)?,
            node: maps::NodeStats::take(&mut bpf)?,
        };
        let mut policy = PolicyState {
            policy: maps::Policy::take(&mut bpf)?,
            cidrs: maps::PolicyCidrs::take(&mut bpf)?,
            identities: maps::Identities::take(&mut bpf)?,
            tables: PolicyTables::default(),
        };
        let epoch = maps::PolicyEpoch::take(&mut bpf)?;
        let mut topology = TopologyState {
            routes: maps::Routes::take(&mut bpf)?,
            peers: maps::Peers::take(&mut bpf)?,
        };
        // What the pinned maps enforce now (they kept enforcing while no daemon ran); the next
        // policy sync is planned against exactly that. A recreated rule map holds nothing, so
        // the mirror must not claim anything for it.
        let policy_recreated = recreated.iter().any(|m| maps::POLICY_MAPS.contains(m));
        policy.tables = PolicyTables::read(
            &policy.policy.0,
            &policy.cidrs.0,
            &policy.identities.0,
            &endpoints_map.0,
        )?;
        let mut bits: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        if !policy_recreated {
            for ip in policy.tables.mirror().endpoints.keys() {
                bits.insert(*ip, policy.tables.flags(*ip));
            }
        } else {
            tracing::warn!(
                maps = ?recreated,
                "policy maps recreated: every endpoint stays closed until the next policy sync"
            );
            // The mirror must say what the maps now enforce, or the next plan would skip
            // reopening an endpoint it believes open.
            policy.tables.close_all();
        }
        let records = Records {
            map: endpoints_map,
            mode: opts.policy,
            bits,
        };

        let t = Instant::now();
        for name in PROGRAMS {
            program(&mut bpf, name)?.load()?;
        }
        let verify = t.elapsed();

        // Maps first, programs second: a freshly attached program must never see an empty config.
        config.0.set(
            0,
            NodeConfig {
                uplink_ifindex,
                uplink_mac,
                _pad: [0; 2],
            },
            0,
        )?;
        sync_routes(&mut topology.routes, &plan)?;
        sync_peers(&mut topology.peers, &plan)?;
        set_ip_forward()?;
        nft::apply(&plan, &cfg.uplink)?;

        let dp = Dataplane {
            pin_dir: cfg.pin_dir.clone(),
            uplink: cfg.uplink.clone(),
            uplink_classic: AtomicBool::new(uplink_mode == AttachMode::Classic),
            swap_held: AtomicBool::new(false),
            endpoint_mode: opts.endpoint_attach,
            policy_mode: opts.policy,
            nr_cpus,
            links: Mutex::new(Links {
                bpf,
                timings: Timings {
                    load,
                    verify,
                    ..Timings::default()
                },
                held: None,
            }),
            records: Mutex::new(records),
            stats: Mutex::new(stats),
            policy: Mutex::new(policy),
            epoch: Mutex::new(epoch),
            topology: Mutex::new(topology),
            _config: config,
        };
        let mut links = lock(&dp.links);
        if opts.policy == PolicyMode::Open {
            dp.open_all_endpoints()?;
        }
        let mut report = RestoreReport {
            recreated_maps: recreated,
            ..Default::default()
        };
        let checked = dp.write_records(endpoints, &mut report)?;
        // A recreated ENDPOINTS map cannot say which directions the policy opens (the old
        // records' layout is not this build's): its records are closed until the first policy
        // sync. Swapping now would make the new programs deny every pod's traffic for the
        // moment between this return and that sync, while the previous programs, still
        // attached, enforce the previous bits with the previous map. So they keep forwarding
        // until the sync has written the bits; the swap follows it ([`Self::sync_policy`]).
        // A recreated rule map is different: its rules are gone for old and new programs
        // alike, so nothing is gained by waiting and everything stays closed until the sync.
        let hold = opts.policy == PolicyMode::Enforce
            && !policy_recreated
            && report
                .recreated_maps
                .contains(&maps::Endpoints::LAYOUT.name);
        if hold {
            tracing::info!(
                "ENDPOINTS recreated: the previous programs keep forwarding until the first policy sync has written the new records' policy bits"
            );
            links.held = Some(HeldSwap {
                endpoints: endpoints.to_vec(),
                uplink_ifindex,
                written: report.written.iter().copied().collect(),
            });
            dp.swap_held.store(true, Ordering::Release);
        } else {
            dp.swap_uplink(&mut links, uplink_ifindex)?;
            dp.attach_restored(&mut links, checked, &mut report)?;
        }
        let timings = links.timings;
        drop(links);
        tracing::info!(
            pin_dir = %dp.pin_dir.display(),
            uplink = %dp.uplink,
            uplink_mode = ?dp.attach_mode(),
            swap_held = hold,
            load_ms = timings.load.as_secs_f64() * 1e3,
            verify_ms = timings.verify.as_secs_f64() * 1e3,
            uplink_attach_ms = timings.uplink_attach.as_secs_f64() * 1e3,
            endpoints = report.written.len() + report.kept.len(),
            removed = report.removed.len(),
            skipped = report.skipped.len(),
            "dataplane started"
        );
        Ok((dp, report))
    }

    /// Attaches, or swaps in place, the uplink programs: the observer first, so flows the kernel
    /// carries from now on are recorded before the forwarding program can look for them.
    fn swap_uplink(&self, links: &mut Links, uplink_ifindex: u32) -> Result<(), DataplaneError> {
        let t = Instant::now();
        let uplink_mode = self.attach_mode();
        let egress_wanted = if self.pin_dir.join(CLASSIC_MARKER_EGRESS).exists() {
            AttachMode::Classic
        } else {
            uplink_mode
        };
        let egress = self.attach(
            links,
            LinkTarget::Uplink(Dir::Out),
            uplink_ifindex,
            egress_wanted,
        )?;
        if egress == AttachMode::Classic && egress_wanted != AttachMode::Classic {
            std::fs::write(self.pin_dir.join(CLASSIC_MARKER_EGRESS), b"")
                .map_err(io_err("writing the classic-mode marker"))?;
        }
        let mode = self.attach(
            links,
            LinkTarget::Uplink(Dir::In),
            uplink_ifindex,
            uplink_mode,
        )?;
        if mode != uplink_mode {
            std::fs::write(self.pin_dir.join(CLASSIC_MARKER), b"")
                .map_err(io_err("writing the classic-mode marker"))?;
            self.uplink_classic
                .store(mode == AttachMode::Classic, Ordering::Release);
        }
        links.timings.uplink_attach = t.elapsed();
        Ok(())
    }

    /// Runs the program swap [`Dataplane::start_restoring`] held back, if any: the uplink, then
    /// the endpoints of its list that still have their record (a release since start removed
    /// the others), with the records as the policy sync left them. Kept for the next call when
    /// it fails.
    fn release_held_swap(&self, links: &mut Links) -> Result<(), DataplaneError> {
        let Some(held) = links.held.take() else {
            return Ok(());
        };
        let result = self.run_held_swap(links, &held);
        match &result {
            Ok(report) => {
                self.swap_held.store(false, Ordering::Release);
                tracing::info!(
                    written = report.written.len(),
                    kept = report.kept.len(),
                    skipped = ?report.skipped,
                    "policy bits written: programs swapped to the recreated ENDPOINTS map"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "swapping the programs after the policy sync failed; retried on the next");
                links.held = Some(held);
            }
        }
        result.map(|_| ())
    }

    fn run_held_swap(
        &self,
        links: &mut Links,
        held: &HeldSwap,
    ) -> Result<RestoreReport, DataplaneError> {
        let still: Vec<Endpoint> = {
            let records = lock(&self.records);
            held.endpoints
                .iter()
                .filter(|e| {
                    records
                        .get(e.ip)
                        .is_some_and(|r| r.ifindex == e.host_ifindex)
                })
                .cloned()
                .collect()
        };
        let mut report = RestoreReport::default();
        let mut checked = self.write_records(&still, &mut report)?;
        for c in &mut checked {
            c.written |= held.written.contains(&c.ep.ip);
        }
        self.swap_uplink(links, held.uplink_ifindex)?;
        self.attach_restored(links, checked, &mut report)?;
        Ok(report)
    }

    /// Makes `ENDPOINTS` exactly `endpoints`: writes missing records and records that differ
    /// from the list, (re)attaches this build's programs on every listed host veth (in place
    /// where a link or filter exists), and removes records and links the list does not have.
    /// Records are written before any attach, so a swapped program finds its endpoint. An
    /// endpoint whose host veth is gone, is not a vpcnet veth, or whose pinned link belongs to
    /// another interface is skipped (a reused ifindex must never receive another pod's traffic).
    pub fn restore_endpoints(
        &self,
        endpoints: &[Endpoint],
    ) -> Result<RestoreReport, DataplaneError> {
        let mut links = lock(&self.links);
        self.release_held_swap(&mut links)?;
        let mut report = RestoreReport::default();
        let checked = self.write_records(endpoints, &mut report)?;
        self.attach_restored(&mut links, checked, &mut report)?;
        Ok(report)
    }

    /// Phase 1 of a restore: the records. Called with the endpoint lock held.
    fn write_records<'a>(
        &self,
        endpoints: &'a [Endpoint],
        report: &mut RestoreReport,
    ) -> Result<Vec<Checked<'a>>, DataplaneError> {
        let mut checked = Vec::new();
        let mut seen = BTreeSet::new();
        for ep in endpoints {
            if !seen.insert(ep.ip) {
                report.skipped.push((ep.ip, "listed twice".into()));
                continue;
            }
            if ep.network_id == vpcnet_common::NODE_SCOPE {
                report
                    .skipped
                    .push((ep.ip, "network id 0 is reserved".into()));
                continue;
            }
            let Some(ifname) =
                sys::ifname(ep.host_ifindex).filter(|n| n.starts_with(HOST_VETH_PREFIX))
            else {
                report.skipped.push((
                    ep.ip,
                    format!("no vpcnet host veth with index {}", ep.host_ifindex),
                ));
                continue;
            };
            if let Ok(link) = sys::pinned_link_info(&self.ep_pin(ep.ip))
                && link.ifindex != 0
                && link.ifindex != ep.host_ifindex
            {
                report.skipped.push((
                    ep.ip,
                    format!("its link is bound to interface {}", link.ifindex),
                ));
                continue;
            }
            checked.push(Checked {
                ep,
                ifname,
                written: false,
            });
        }
        let mut records = lock(&self.records);
        for c in &mut checked {
            let old = records.get(c.ep.ip);
            let flags = match old {
                // Same veth: keep the mode it is attached with.
                Some(o) if o.ifindex == c.ep.host_ifindex => o.flags,
                _ => self.default_flags(c.ep.ip),
            };
            let want = EndpointInfo {
                ifindex: c.ep.host_ifindex,
                mac: c.ep.pod_mac,
                network_id: c.ep.network_id,
                flags,
                policy: records.policy_bits(c.ep.ip),
            };
            if old != Some(want) {
                records.write(c.ep.ip, want)?;
                c.written = true;
            }
        }
        drop(records);
        for c in &checked {
            self.ensure_stats(c.ep.ip)?;
        }
        Ok(checked)
    }

    /// Attach flags for an endpoint without a usable record: the mode its pinned link shows
    /// (a link pin means TCX), else the configured default.
    fn default_flags(&self, ip: Ipv4Addr) -> u32 {
        if sys::pinned_link_info(&self.ep_pin(ip)).is_ok() {
            flags_for(AttachMode::Tcx, AttachMode::Tcx)
        } else {
            flags_for(self.endpoint_mode, self.endpoint_mode)
        }
    }

    /// Phase 2 of a restore: links, then what the list no longer has.
    fn attach_restored(
        &self,
        links: &mut Links,
        checked: Vec<Checked<'_>>,
        report: &mut RestoreReport,
    ) -> Result<(), DataplaneError> {
        let listed: BTreeSet<Ipv4Addr> = checked.iter().map(|c| c.ep.ip).collect();
        for c in checked {
            let ip = c.ep.ip;
            let Some(info) = lock(&self.records).get(ip) else {
                report.skipped.push((ip, "record vanished".into()));
                continue;
            };
            match self.attach_endpoint(links, ip, &c.ifname, c.ep.host_ifindex, mode_of(&info)) {
                Ok(flags) => {
                    lock(&self.records).set_flags(ip, flags)?;
                    if c.written && mode_of(&info) == AttachMode::Tcx {
                        // A release that attached classic filters recorded that in a record we
                        // could not read: take such a filter off so the old program stops.
                        let _ = aya::programs::tc::qdisc_detach_program(
                            &c.ifname,
                            TcAttachType::Ingress,
                            PROG_ENDPOINT,
                        );
                        let _ = aya::programs::tc::qdisc_detach_program(
                            &c.ifname,
                            TcAttachType::Egress,
                            PROG_ENDPOINT_EGRESS,
                        );
                    }
                    if c.written {
                        report.written.push(ip);
                    } else {
                        report.kept.push(ip);
                    }
                }
                Err(e) => {
                    tracing::warn!(%ip, error = %e, "attaching a restored endpoint failed");
                    report.skipped.push((ip, format!("attach: {e}")));
                }
            }
        }
        let stale: Vec<(Ipv4Addr, EndpointInfo)> = lock(&self.records)
            .dump()?
            .into_iter()
            .filter(|(ip, _)| !listed.contains(ip))
            .collect();
        for (ip, info) in stale {
            tracing::info!(%ip, ifindex = info.ifindex, "endpoint not in the list; removed");
            self.remove_locked(ip, Some(info))?;
            report.removed.push(ip);
        }
        let dir = std::fs::read_dir(&self.pin_dir)
            .map_err(io_err(format!("reading {}", self.pin_dir.display())))?;
        let records = lock(&self.records);
        for entry in dir.flatten() {
            let fname = entry.file_name().to_string_lossy().into_owned();
            if let Some(ip) = fname
                .strip_prefix(LINK_EP_PREFIX)
                .or_else(|| fname.strip_prefix(LINK_EP_EGRESS_PREFIX))
                && !ip
                    .replace('_', ".")
                    .parse()
                    .is_ok_and(|ip| records.get(ip).is_some())
            {
                tracing::info!(pin = %fname, "removing link pin without an endpoint");
                let _ = sys::detach_and_unpin(&entry.path());
            }
        }
        report.written.sort();
        report.kept.sort();
        report.removed.sort();
        report.skipped.sort();
        Ok(())
    }

    /// How the uplink program is attached.
    pub fn attach_mode(&self) -> AttachMode {
        if self.uplink_classic.load(Ordering::Acquire) {
            AttachMode::Classic
        } else {
            AttachMode::Tcx
        }
    }

    pub fn policy_mode(&self) -> PolicyMode {
        self.policy_mode
    }

    /// How new endpoints are attached.
    pub fn endpoint_attach_mode(&self) -> AttachMode {
        self.endpoint_mode
    }

    /// What is missing from the installed dataplane, checked cheaply (a stat per pin): the map
    /// pins a restarted daemon adopts, and the uplink program's pinned TCX link. `None` when
    /// intact. The programs keep running on this process's handles either way; without the pins
    /// the next vpcnetd would start from empty maps and pods would lose forwarding and policy.
    pub fn health(&self) -> Option<String> {
        let mut pins = vec![maps::Endpoints::LAYOUT.name];
        if self.attach_mode() == AttachMode::Tcx {
            pins.push(LINK_UPLINK);
        }
        let missing: Vec<String> = pins
            .iter()
            .map(|name| self.pin_dir.join(name))
            .filter(|pin| !pin.exists())
            .map(|pin| pin.display().to_string())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "pinned dataplane objects are gone ({}): was the pin directory removed or bpffs unmounted? \
                 Restart vpcnetd to reinstall them",
                missing.join(", ")
            )
        })
    }

    pub fn timings(&self) -> Timings {
        lock(&self.links).timings
    }

    /// Recomputes routes, peers and the nftables table from a new topology and applies the
    /// difference while pods keep running: every wanted `ROUTES`/`PEERS` entry is written before
    /// any stale one is deleted (an entry in both the old and the new topology never disappears),
    /// and the table is replaced in one `nft -f` transaction. Endpoints and policy are untouched.
    /// The node's own addresses are read again, as at start.
    pub fn apply_topology(
        &self,
        networks: &[vpcnet_ipam::NetworkConfig],
        local_pod_cidrs: &[ipnetwork::IpNetwork],
    ) -> Result<(), DataplaneError> {
        let (_, node_addrs) = sys::interface_addresses(&self.uplink)
            .map_err(io_err("listing interface addresses"))?;
        let plan = plan::plan(networks, &ipv4_only(local_pod_cidrs), &node_addrs)?;
        let mut topo = lock(&self.topology);
        sync_routes(&mut topo.routes, &plan)?;
        sync_peers(&mut topo.peers, &plan)?;
        nft::apply(&plan, &self.uplink)?;
        tracing::info!(
            routes = plan.routes.len(),
            peers = plan.peers.len(),
            "topology applied"
        );
        Ok(())
    }

    /// Installs the endpoint: map entries, then the endpoint program on the host veth (pinned link),
    /// all in place before it returns. Idempotent; an existing link on the same veth is updated in
    /// place, one left on another veth (address reused) is replaced.
    pub fn add_endpoint(&self, ep: &Endpoint) -> Result<(), DataplaneError> {
        let t = Instant::now();
        if ep.network_id == vpcnet_common::NODE_SCOPE {
            return Err(DataplaneError::Config(format!(
                "endpoint {}: network id 0 is reserved",
                ep.ip
            )));
        }
        let ifname =
            sys::ifname(ep.host_ifindex).ok_or(DataplaneError::NoSuchIfindex(ep.host_ifindex))?;
        let mut links = lock(&self.links);
        // A pod added before the first policy sync needs the new uplink program to be reached.
        self.release_held_swap(&mut links)?;
        // Keep the counters of a re-added endpoint (idempotent ADD, restart reconcile).
        self.ensure_stats(ep.ip)?;
        let (existed, info) = {
            let mut records = lock(&self.records);
            let old = records.get(ep.ip);
            // A re-ADD on the same veth keeps its attach mode; a new veth gets the default.
            let mode = match old {
                Some(o) if o.ifindex == ep.host_ifindex => mode_of(&o),
                _ => self.endpoint_mode,
            };
            // The entry goes in before the program: its first packet must find its source.
            let info = records.write(
                ep.ip,
                EndpointInfo {
                    ifindex: ep.host_ifindex,
                    mac: ep.pod_mac,
                    network_id: ep.network_id,
                    flags: flags_for(mode, mode),
                    policy: 0,
                },
            )?;
            (old.is_some(), info)
        };
        let ta = Instant::now();
        match self.attach_endpoint(&mut links, ep.ip, &ifname, ep.host_ifindex, mode_of(&info)) {
            Ok(flags) => lock(&self.records).set_flags(ep.ip, flags)?,
            Err(e) => {
                if !existed {
                    let _ = sys::detach_and_unpin(&self.ep_pin(ep.ip));
                    let _ = sys::detach_and_unpin(&self.ep_egress_pin(ep.ip));
                    let _ = self.remove_entries(ep.ip);
                }
                return Err(e);
            }
        }
        links.timings.last_endpoint_attach = ta.elapsed();
        links.timings.last_add_endpoint = t.elapsed();
        Ok(())
    }

    /// Removes the endpoint's link (detaching the program) and map entries. Idempotent.
    pub fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        let _links = lock(&self.links);
        let info = lock(&self.records).get(ip);
        self.remove_locked(ip, info)
    }

    /// [`Dataplane::remove_endpoint`] with the endpoint lock held.
    fn remove_locked(
        &self,
        ip: Ipv4Addr,
        info: Option<EndpointInfo>,
    ) -> Result<(), DataplaneError> {
        for pin in [self.ep_pin(ip), self.ep_egress_pin(ip)] {
            sys::detach_and_unpin(&pin).map_err(io_err(format!("detaching {}", pin.display())))?;
        }
        if let Some(info) = info
            && let Some(name) = sys::ifname(info.ifindex)
        {
            if mode_of(&info) == AttachMode::Classic {
                let _ = aya::programs::tc::qdisc_detach_program(
                    &name,
                    TcAttachType::Ingress,
                    PROG_ENDPOINT,
                );
            }
            if egress_mode_of(&info) == AttachMode::Classic {
                let _ = aya::programs::tc::qdisc_detach_program(
                    &name,
                    TcAttachType::Egress,
                    PROG_ENDPOINT_EGRESS,
                );
            }
        }
        self.remove_entries(ip)?;
        // Connections of the departed pod must not carry over to a pod that reuses its address.
        if info.is_some() {
            self.bump_policy_epoch()?;
        }
        Ok(())
    }

    fn ensure_stats(&self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        let key = ip_key(ip.octets());
        let mut stats = lock(&self.stats);
        if stats.endpoints.0.get(&key, 0).is_err() {
            let zero = PerCpuValues::try_from(vec![EndpointStats::default(); self.nr_cpus])
                .map_err(io_err("per-CPU values"))?;
            stats.endpoints.0.insert(key, zero, 0)?;
        }
        Ok(())
    }

    fn open_all_endpoints(&self) -> Result<(), DataplaneError> {
        let mut records = lock(&self.records);
        for (ip, info) in records.dump()? {
            if info.policy != POLICY_OPEN {
                records.write(ip, info)?;
            }
        }
        Ok(())
    }

    /// What the policy maps hold (address → identity included), as the compile layer's type.
    /// Holds the policy lock while the guard lives.
    pub fn applied_policy(&self) -> AppliedPolicy<'_> {
        AppliedPolicy(lock(&self.policy))
    }

    /// Takes the policy maps from what they hold to `new` along [`vpcnet_policy::compile::plan`],
    /// phase after phase; when anything narrowed, established connections are judged again.
    /// When `new` is a later revision of the regenerator output applied last, only the endpoints
    /// and addresses it changed since are compared (the same plan, at the cost of the change).
    ///
    /// The first sync after a start that recreated `ENDPOINTS` also swaps the programs (see
    /// [`Dataplane::start_restoring`]), after the policy lock is released.
    pub fn sync_policy(&self, new: &vpcnet_policy::Compiled) -> Result<SyncStats, DataplaneError> {
        let stats = self.apply_policy(new)?;
        if self.swap_held.load(Ordering::Acquire) {
            self.release_held_swap(&mut lock(&self.links))?;
        }
        Ok(stats)
    }

    fn apply_policy(&self, new: &vpcnet_policy::Compiled) -> Result<SyncStats, DataplaneError> {
        let mut guard = lock(&self.policy);
        let st = &mut *guard;
        let plan = st.tables.plan(new);
        if plan.is_empty() {
            st.tables.applied(new);
            return Ok(SyncStats::default());
        }
        let mut maps = policy::Maps {
            policy: &mut st.policy.0,
            cidrs: &mut st.cidrs.0,
            identities: &mut st.identities.0,
            records: &self.records,
        };
        let stats = st.tables.apply(&mut maps, &plan)?;
        st.tables.applied(new);
        if stats.narrowed {
            self.bump_policy_epoch()?;
        }
        Ok(stats)
    }

    fn bump_policy_epoch(&self) -> Result<(), DataplaneError> {
        policy::bump_epoch(&mut lock(&self.epoch).0)
    }

    /// The pinned conntrack map, for [`conntrack_entries`] (which needs no `&Dataplane`).
    pub fn conntrack_pin(&self) -> PathBuf {
        self.pin_dir.join(maps::CONNTRACK.name)
    }

    /// The endpoint records `ENDPOINTS` holds, by address (for reconcile and diagnostics).
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, DataplaneError> {
        let mut out: Vec<Endpoint> = lock(&self.records)
            .dump()?
            .into_iter()
            .map(|(ip, v)| Endpoint {
                ip,
                host_ifindex: v.ifindex,
                pod_mac: v.mac,
                network_id: v.network_id,
            })
            .collect();
        out.sort_by_key(|e| e.ip);
        Ok(out)
    }

    /// Per-endpoint packets/bytes and drops by reason.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        let stats = lock(&self.stats);
        let mut endpoints = Vec::new();
        for item in stats.endpoints.0.iter() {
            let (k, per_cpu) = item?;
            let mut c = EndpointCounters {
                ip: Ipv4Addr::from(k.to_ne_bytes()),
                rx_packets: 0,
                rx_bytes: 0,
                tx_packets: 0,
                tx_bytes: 0,
            };
            for s in per_cpu.iter() {
                c.rx_packets += s.rx_packets;
                c.rx_bytes += s.rx_bytes;
                c.tx_packets += s.tx_packets;
                c.tx_bytes += s.tx_bytes;
            }
            endpoints.push(c);
        }
        endpoints.sort_by_key(|c| c.ip);
        Ok(Counters {
            endpoints,
            drops: per_cpu_sums(&stats.drops.0, &DROP_REASON_NAMES)?,
            node: per_cpu_sums(&stats.node.0, &NODE_COUNTER_NAMES)?,
        })
    }

    /// Node-wide counters by name (ARP replies, pod-to-pod, pod-to-uplink, pod-to-kernel,
    /// uplink-to-pod): where traffic went.
    pub fn node_counters(&self) -> Result<Vec<(String, u64)>, DataplaneError> {
        per_cpu_sums(&lock(&self.stats).node.0, &NODE_COUNTER_NAMES)
    }

    fn ep_pin(&self, ip: Ipv4Addr) -> PathBuf {
        self.pin_dir.join(format!("{LINK_EP_PREFIX}{}", pin_ip(ip)))
    }

    fn ep_egress_pin(&self, ip: Ipv4Addr) -> PathBuf {
        self.pin_dir
            .join(format!("{LINK_EP_EGRESS_PREFIX}{}", pin_ip(ip)))
    }

    /// Attaches (or updates) both programs of an endpoint: the observer first (so flows the
    /// kernel delivers are recorded before the forwarding program looks), then the forwarding
    /// program, the observer in the mode the forwarding program ended up with. Returns the
    /// `EndpointInfo::flags` describing the result.
    fn attach_endpoint(
        &self,
        links: &mut Links,
        ip: Ipv4Addr,
        ifname: &str,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<u32, DataplaneError> {
        let egress = self.attach(
            links,
            LinkTarget::Endpoint(ip, ifname, Dir::Out),
            ifindex,
            mode,
        )?;
        let egress_updated = links.timings.last_endpoint_updated;
        let ingress = self.attach(
            links,
            LinkTarget::Endpoint(ip, ifname, Dir::In),
            ifindex,
            mode,
        )?;
        let egress = if ingress != egress {
            // TCX refused the forwarding program: keep both on one mechanism.
            self.detach_endpoint_egress(ip, ifname, egress);
            self.attach(
                links,
                LinkTarget::Endpoint(ip, ifname, Dir::Out),
                ifindex,
                ingress,
            )?
        } else {
            egress
        };
        links.timings.last_endpoint_updated &= egress_updated;
        Ok(flags_for(ingress, egress))
    }

    fn detach_endpoint_egress(&self, ip: Ipv4Addr, ifname: &str, mode: AttachMode) {
        match mode {
            AttachMode::Tcx => {
                let _ = sys::detach_and_unpin(&self.ep_egress_pin(ip));
            }
            AttachMode::Classic => {
                let _ = aya::programs::tc::qdisc_detach_program(
                    ifname,
                    TcAttachType::Egress,
                    PROG_ENDPOINT_EGRESS,
                );
            }
        }
    }

    fn remove_entries(&self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        lock(&self.records).remove(ip)?;
        ignore_missing(lock(&self.stats).endpoints.0.remove(&ip_key(ip.octets())))
    }

    /// Attaches the target's program, or swaps the program of its existing link/filter in place.
    /// Returns the mode actually used (TCX falls back to classic when the kernel refuses it).
    fn attach(
        &self,
        links: &mut Links,
        target: LinkTarget<'_>,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<AttachMode, DataplaneError> {
        let (prog_name, pin, ifname, dir) = match target {
            LinkTarget::Uplink(Dir::In) => (
                PROG_UPLINK,
                self.pin_dir.join(LINK_UPLINK),
                self.uplink.clone(),
                Dir::In,
            ),
            LinkTarget::Uplink(Dir::Out) => (
                PROG_UPLINK_EGRESS,
                self.pin_dir.join(LINK_UPLINK_EGRESS),
                self.uplink.clone(),
                Dir::Out,
            ),
            LinkTarget::Endpoint(ip, name, Dir::In) => {
                (PROG_ENDPOINT, self.ep_pin(ip), name.to_string(), Dir::In)
            }
            LinkTarget::Endpoint(ip, name, Dir::Out) => (
                PROG_ENDPOINT_EGRESS,
                self.ep_egress_pin(ip),
                name.to_string(),
                Dir::Out,
            ),
        };
        links.timings.last_endpoint_updated = false;
        if mode == AttachMode::Classic {
            attach_classic(&mut links.bpf, prog_name, &ifname, dir)?;
            return Ok(AttachMode::Classic);
        }
        if let Ok(info) = sys::pinned_link_info(&pin) {
            if info.link_type == sys::BPF_LINK_TYPE_TCX && info.ifindex == ifindex {
                let link =
                    SchedClassifierLink::try_from(FdLink::from(PinnedLink::from_pin(&pin)?))?;
                let prog = program(&mut links.bpf, prog_name)?;
                let id = prog.attach_to_link(link)?;
                // The pin holds the link; our descriptor is not needed.
                drop(prog.take_link(id)?);
                links.timings.last_endpoint_updated = true;
                return Ok(AttachMode::Tcx);
            }
            // Defunct (interface gone) or bound to another interface (address reused): the pin
            // is the link's last reference, so removing it detaches the old one.
            tracing::info!(pin = %pin.display(), link_ifindex = info.ifindex, ifindex, "replacing stale link");
        }
        if pin.exists() {
            sys::detach_and_unpin(&pin).map_err(io_err(format!("detaching {}", pin.display())))?;
        }
        let prog = program(&mut links.bpf, prog_name)?;
        let attached = prog.attach_with_options(
            &ifname,
            dir.tc(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        );
        match attached {
            Ok(id) => {
                let fd: FdLink = prog.take_link(id)?.try_into()?;
                drop(fd.pin(&pin)?);
                Ok(AttachMode::Tcx)
            }
            Err(e) => {
                tracing::warn!(error = %e, interface = %ifname, "TCX attach failed; falling back to clsact");
                attach_classic(&mut links.bpf, prog_name, &ifname, dir)?;
                Ok(AttachMode::Classic)
            }
        }
    }
}

/// [`Dataplane::applied_policy`]: the policy mirror, borrowed under the policy lock.
pub struct AppliedPolicy<'a>(MutexGuard<'a, PolicyState>);

impl std::ops::Deref for AppliedPolicy<'_> {
    type Target = vpcnet_policy::Compiled;
    fn deref(&self) -> &vpcnet_policy::Compiled {
        self.0.tables.mirror()
    }
}

fn program<'a>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let p = bpf.program_mut(name).ok_or(DataplaneError::Missing(name))?;
    Ok(p.try_into()?)
}

fn per_cpu_sums(
    arr: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    names: &[&str],
) -> Result<Vec<(String, u64)>, DataplaneError> {
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let v = arr.get(&(i as u32), 0)?;
        out.push((name.to_string(), v.iter().sum()));
    }
    Ok(out)
}

/// Classic clsact filter at a fixed priority/handle: replaced in place when present, created
/// otherwise. The filter (not a link) keeps the program attached after we exit.
fn attach_classic(
    bpf: &mut Ebpf,
    prog_name: &'static str,
    ifname: &str,
    dir: Dir,
) -> Result<(), DataplaneError> {
    match aya::programs::tc::qdisc_add_clsact(ifname) {
        Ok(()) => {}
        Err(aya::programs::tc::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(aya::programs::tc::TcError::AlreadyAttached) => {}
        Err(e) => return Err(e.into()),
    }
    let prog = program(bpf, prog_name)?;
    let existing =
        SchedClassifierLink::attached(ifname, dir.tc(), CLASSIC_PRIORITY, CLASSIC_HANDLE, None)
            .map_err(io_err(format!("interface {ifname}")))?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        Err(_) => prog.attach_with_options(
            ifname,
            dir.tc(),
            TcAttachOptions::Netlink(NlOptions {
                priority: CLASSIC_PRIORITY,
                handle: CLASSIC_HANDLE,
                classid: None,
            }),
        )?,
    };
    // Dropping an aya netlink link detaches the filter; the filter must outlive us.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Makes `ROUTES` equal to the plan without a moment where a wanted entry is missing:
/// upsert everything wanted, then delete what is no longer wanted.
fn sync_routes(routes: &mut maps::Routes, plan: &plan::Plan) -> Result<(), DataplaneError> {
    let routes = &mut routes.0;
    let mut wanted = BTreeSet::new();
    for ((net, cidr), action) in &plan.routes {
        let data = RouteKey::new(*net, ip_key(cidr.network().octets()));
        let prefix = 32 + u32::from(cidr.prefix());
        wanted.insert((prefix, data.network, data.addr));
        routes.insert(
            &Key::new(prefix, data),
            RouteValue {
                action: *action,
                flags: 0,
            },
            0,
        )?;
    }
    let stale: Vec<Key<RouteKey>> = routes
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(&(k.prefix_len(), k.data().network, k.data().addr)))
        .collect();
    for k in stale {
        ignore_missing(routes.remove(&k))?;
    }
    Ok(())
}

/// `PEERS` to the plan, wanted entries first (see [`sync_routes`]).
fn sync_peers(peers: &mut maps::Peers, plan: &plan::Plan) -> Result<(), DataplaneError> {
    let peers = &mut peers.0;
    for (src, dst) in &plan.peers {
        peers.insert(
            PeerKey {
                src: *src,
                dst: *dst,
            },
            1,
            0,
        )?;
    }
    let stale: Vec<PeerKey> = peers
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !plan.peers.contains(&(k.src, k.dst)))
        .collect();
    for k in stale {
        ignore_missing(peers.remove(&k))?;
    }
    Ok(())
}

/// Connection-tracking entries: (live, expired but not yet evicted). Walks the whole map (about
/// 1 µs per entry), through its own handle on the pin so no caller's lock is held meanwhile.
pub fn conntrack_entries(pin: &Path) -> Result<(u64, u64), DataplaneError> {
    let data = aya::maps::MapData::from_pin(pin)?;
    let ct: aya::maps::HashMap<_, FlowKey, CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
    let now = sys::monotonic_ns();
    let (mut live, mut expired) = (0, 0);
    for item in ct.iter() {
        let (_, v) = item?;
        if v.expires_ns > now {
            live += 1;
        } else {
            expired += 1;
        }
    }
    Ok((live, expired))
}

/// The endpoints the `ENDPOINTS` map pinned in `pin_dir` records, also when an older or newer
/// release left it with another value layout (read through the leading fields every release
/// keeps: host ifindex, MAC, network). Empty when there is no pin. For callers whose durable
/// store lacks a field the map has (and for [`Dataplane::start_with`]).
pub fn pinned_endpoints(pin_dir: &Path) -> Result<Vec<Endpoint>, DataplaneError> {
    let path = pin_dir.join(maps::Endpoints::LAYOUT.name);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let info = MapInfo::from_pin(&path)?;
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    if key_size != 4 || value_size < ENDPOINT_RECORD_STABLE_PREFIX {
        return Err(DataplaneError::Config(format!(
            "{}: key size {key_size}, value size {value_size}: not an endpoint map",
            path.display()
        )));
    }
    let raw = sys::dump_pinned_map_raw(&path, key_size, value_size)
        .map_err(io_err(format!("reading {}", path.display())))?;
    let mut out: Vec<Endpoint> = raw
        .into_iter()
        .map(|(k, v)| Endpoint {
            ip: Ipv4Addr::new(k[0], k[1], k[2], k[3]),
            host_ifindex: u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            pod_mac: [v[4], v[5], v[6], v[7], v[8], v[9]],
            network_id: u16::from_ne_bytes([v[10], v[11]]),
        })
        .collect();
    out.sort_by_key(|e| e.ip);
    Ok(out)
}
fn mode_of(info: &EndpointInfo) -> AttachMode {
    if info.flags & EP_FLAG_TC_CLASSIC != 0 {
        AttachMode::Classic
    } else {
        AttachMode::Tcx
    }
}

/// Attach mode of an endpoint's observer (`endpoint_egress`).
fn egress_mode_of(info: &EndpointInfo) -> AttachMode {
    if info.flags & EP_FLAG_EGRESS_TC_CLASSIC != 0 {
        AttachMode::Classic
    } else {
        AttachMode::Tcx
    }
}

fn flags_for(ingress: AttachMode, egress: AttachMode) -> u32 {
    let mut flags = 0;
    if ingress == AttachMode::Classic {
        flags |= EP_FLAG_TC_CLASSIC;
    }
    if egress == AttachMode::Classic {
        flags |= EP_FLAG_EGRESS_TC_CLASSIC;
    }
    flags
}

/// An address as it appears in pin names (bpffs refuses names with dots).
fn pin_ip(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}_{}_{}_{}", o[0], o[1], o[2], o[3])
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), DataplaneError> {
    match r {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The kernel forwards the one class of pod traffic the programs hand it (masqueraded internet
/// traffic). Read before write: most nodes have it on already and a write is then a no-op.
fn set_ip_forward() -> Result<(), DataplaneError> {
    // /proc/sys/net resolves to the netns of the opening thread, i.e. the node's.
    const P: &str = "/proc/sys/net/ipv4/ip_forward";
    let cur = std::fs::read_to_string(P).map_err(io_err(P))?;
    if cur.trim() != "1" {
        std::fs::write(P, b"1").map_err(io_err(P))?;
    }
    Ok(())
}

/// Unlinks map pins whose key/value sizes differ from this build's, so the loader creates them
/// anew; returns their names. The unlinked maps stay alive while the previous programs use them
/// (see [`Dataplane::start_restoring`]).
fn drop_incompatible_pins(pin_dir: &Path) -> Vec<&'static str> {
    let mut dropped = Vec::new();
    for l in maps::LAYOUTS {
        let path = pin_dir.join(l.name);
        if !path.exists() {
            continue;
        }
        match MapInfo::from_pin(&path) {
            Ok(info)
                if info.key_size() as usize == l.key_size
                    && info.value_size() as usize == l.value_size
                    && info.max_entries() == l.max_entries => {}
            Ok(info) => {
                tracing::warn!(
                    map = l.name,
                    key_size = info.key_size(),
                    value_size = info.value_size(),
                    max_entries = info.max_entries(),
                    "pinned map has another layout; recreating it and refilling it before the programs switch to it"
                );
                let _ = std::fs::remove_file(&path);
                dropped.push(l.name);
            }
            Err(e) => {
                tracing::warn!(map = l.name, error = %e, "unreadable map pin; recreating it");
                let _ = std::fs::remove_file(&path);
                dropped.push(l.name);
            }
        }
    }
    dropped
}

/// Interfaces carrying a classic vpcnet filter, with its side and the program's name: the uplink
/// when the node fell back to clsact, and every endpoint recorded with [`EP_FLAG_TC_CLASSIC`] /
/// [`EP_FLAG_EGRESS_TC_CLASSIC`].
fn classic_attachments(pin_dir: &Path, uplink: &str) -> Vec<(String, Dir, &'static str)> {
    let mut out = Vec::new();
    if pin_dir.join(CLASSIC_MARKER).exists() {
        out.push((uplink.to_string(), Dir::In, PROG_UPLINK));
        // The observer follows the forwarding program's mode.
        out.push((uplink.to_string(), Dir::Out, PROG_UPLINK_EGRESS));
    } else if pin_dir.join(CLASSIC_MARKER_EGRESS).exists() {
        out.push((uplink.to_string(), Dir::Out, PROG_UPLINK_EGRESS));
    }
    if let Ok(m) = aya::maps::MapData::from_pin(pin_dir.join(maps::Endpoints::LAYOUT.name)) {
        let map = aya::maps::Map::HashMap(m);
        if let Ok(eps) = aya::maps::HashMap::<_, u32, EndpointInfo>::try_from(&map) {
            for (_, v) in eps.iter().filter_map(Result::ok) {
                let Some(name) = sys::ifname(v.ifindex) else {
                    continue;
                };
                if mode_of(&v) == AttachMode::Classic {
                    out.push((name.clone(), Dir::In, PROG_ENDPOINT));
                }
                if egress_mode_of(&v) == AttachMode::Classic {
                    out.push((name, Dir::Out, PROG_ENDPOINT_EGRESS));
                }
            }
        }
    }
    out
}

/// Detaches every vpcnet program of the node at once (synchronously): TCX links are detached and
/// unpinned, classic filters deleted. Maps and the nftables table stay: pod traffic then stops
/// instead of falling back to the kernel path (the guard drops it), and the next
/// [`Dataplane::start`] re-attaches everything. For maintenance, and for proving that forwarding
/// is the programs' doing.
pub fn detach_programs(pin_dir: &Path, uplink: &str) -> Result<(), Vec<DataplaneError>> {
    detach_all(pin_dir, &classic_attachments(pin_dir, uplink))
}

fn detach_all(
    pin_dir: &Path,
    classic: &[(String, Dir, &'static str)],
) -> Result<(), Vec<DataplaneError>> {
    let mut errors = Vec::new();
    match std::fs::read_dir(pin_dir) {
        Ok(dir) => {
            for p in dir.flatten().map(|e| e.path()) {
                if p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
                    && let Err(e) = sys::detach_and_unpin(&p)
                {
                    errors.push(io_err(format!("detaching {}", p.display()))(e));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(io_err(format!("reading {}", pin_dir.display()))(e)),
    }
    for (ifname, dir, prog) in classic {
        match aya::programs::tc::qdisc_detach_program(ifname, dir.tc(), prog) {
            Ok(()) => {}
            Err(aya::programs::tc::TcError::IoError(e))
                if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(e.into()),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Removes everything [`Dataplane::start`] installed in the calling thread's netns and under
/// `pin_dir`: links (detaching the programs), classic filters and their clsact qdiscs, map pins,
/// the directory, and the nftables table. Keeps going past failures and returns them all.
pub fn uninstall(pin_dir: &Path, uplink: &str) -> Result<(), Vec<DataplaneError>> {
    let mut errors = Vec::new();
    // Read before the ENDPOINTS pin goes away.
    let classic = classic_attachments(pin_dir, uplink);
    // Programs first, so none is left running against maps about to disappear.
    if let Err(e) = detach_all(pin_dir, &classic) {
        errors.extend(e);
    }
    match std::fs::read_dir(pin_dir) {
        Ok(dir) => {
            for p in dir.flatten().map(|e| e.path()) {
                if let Err(e) = std::fs::remove_file(&p) {
                    errors.push(io_err(format!("removing {}", p.display()))(e));
                }
            }
            if let Err(e) = std::fs::remove_dir(pin_dir) {
                errors.push(io_err(format!("removing {}", pin_dir.display()))(e));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(io_err(format!("reading {}", pin_dir.display()))(e)),
    }
    let ifnames: BTreeSet<&String> = classic.iter().map(|(n, _, _)| n).collect();
    for ifname in ifnames {
        // aya has no qdisc delete; tc is part of iproute2, which every node has.
        match std::process::Command::new("tc")
            .args(["qdisc", "del", "dev", ifname, "clsact"])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                // Someone (or an earlier partial uninstall) removed it already.
                if !err.contains("Cannot find") && !err.contains("Invalid handle") {
                    errors.push(DataplaneError::Command(format!(
                        "tc qdisc del dev {ifname} clsact: {}",
                        err.trim()
                    )));
                }
            }
            Err(e) => errors.push(io_err(format!("tc qdisc del dev {ifname} clsact"))(e)),
        }
    }
    if let Err(e) = nft::remove() {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The programs forward IPv4 only, for now: the IPv6 blocks of a dual-stack topology are left
/// to a later dataplane.
fn ipv4_only(cidrs: &[ipnetwork::IpNetwork]) -> Vec<Ipv4Network> {
    cidrs
        .iter()
        .filter_map(|c| match c {
            ipnetwork::IpNetwork::V4(n) => Some(*n),
            ipnetwork::IpNetwork::V6(_) => None,
        })
        .collect()
}

/// The eBPF object this dataplane was built with (built by `build.rs`): the loader and its programs
/// can never drift apart on a node.
pub mod ebpf_object {
    pub static BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpcnet-ebpf"));
}
