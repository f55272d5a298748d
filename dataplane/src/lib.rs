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
//!   TCX attach fails). Endpoints: TCX by default, or classic clsact filters with
//!   [`StartOptions::endpoint_attach`] — measured on kernel 6.18: a TCX attach costs 8–20 ms per
//!   host veth, every time (the kernel waits for an RCU grace period under RTNL on every attach
//!   that adds a program), a classic filter 0.3–0.5 ms (clsact qdisc + filter). Upgrades and
//!   restarts swap programs in place either way (`bpf_link_update` ≈ 0.03 ms; filter replace at a
//!   fixed priority/handle ≈ 0.1 ms), losing no packet.
//!
//! # Pins (under `pin_dir`)
//! Maps by name (`ENDPOINTS`, `ENDPOINT_STATS`, `ROUTES`, `PEERS`, `CONFIG`, `DROPS`,
//! `NODE_STATS`, `KERNEL_FLOWS`, `POLICY`, `POLICY_CIDRS`, `IDENTITIES`, `POLICY_EPOCH`,
//! `CONNTRACK`), TCX links `link_uplink`/`link_uplink_out` and
//! `link_ep_<a>_<b>_<c>_<d>`/`link_out_<a>_<b>_<c>_<d>` (ingress/egress; bpffs names cannot
//! contain dots), `tc-classic` (and `tc-classic-egress`) markers when the uplink uses the
//! fallback.

mod nft;
mod plan;
mod policy;
mod sys;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapInfo, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnetwork::Ipv4Network;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vpcnet_common::{
    CtValue, DROP_REASON_NAMES, DROP_REASONS, EP_FLAG_EGRESS_TC_CLASSIC, EP_FLAG_TC_CLASSIC,
    EndpointInfo, EndpointStats, FlowKey, FlowValue, MAX_CONNTRACK, MAX_ENDPOINTS, MAX_IDENTITIES,
    MAX_KERNEL_FLOWS, MAX_PEERS, MAX_POLICY_CIDRS, MAX_POLICY_ENTRIES, MAX_ROUTES,
    NODE_COUNTER_NAMES, NODE_COUNTERS, NodeConfig, POLICY_OPEN, PeerKey, PolicyCidrKey, PolicyKey,
    RouteKey, RouteValue, ip_key,
};

pub use nft::{HOST_VETH_PREFIX, TABLE as NFT_TABLE};
use policy::{M_CONNTRACK, M_IDENTITIES, M_POLICY, M_POLICY_CIDRS, M_POLICY_EPOCH, PolicyTables};
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

const M_ENDPOINTS: &str = "ENDPOINTS";
const M_ENDPOINT_STATS: &str = "ENDPOINT_STATS";
const M_ROUTES: &str = "ROUTES";
const M_PEERS: &str = "PEERS";
const M_CONFIG: &str = "CONFIG";
const M_DROPS: &str = "DROPS";
const M_NODE_STATS: &str = "NODE_STATS";
const M_KERNEL_FLOWS: &str = "KERNEL_FLOWS";

/// (map, key size, value size, max entries) as this build's programs expect them. A pin with
/// another layout (left by an incompatible older release) is replaced rather than reused, since a
/// program reading a differently-shaped value would misforward (and a counter array too short
/// for a new counter would silently not count).
const MAP_LAYOUTS: [(&str, usize, usize, u32); 13] = [
    (M_ENDPOINTS, 4, size_of::<EndpointInfo>(), MAX_ENDPOINTS),
    (
        M_ENDPOINT_STATS,
        4,
        size_of::<EndpointStats>(),
        MAX_ENDPOINTS,
    ),
    (
        M_ROUTES,
        4 + size_of::<RouteKey>(),
        size_of::<RouteValue>(),
        MAX_ROUTES,
    ),
    (M_PEERS, size_of::<PeerKey>(), 4, MAX_PEERS),
    (M_CONFIG, 4, size_of::<NodeConfig>(), 1),
    (M_DROPS, 4, 8, DROP_REASONS),
    (M_NODE_STATS, 4, 8, NODE_COUNTERS),
    (
        M_KERNEL_FLOWS,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        MAX_KERNEL_FLOWS,
    ),
    (M_POLICY, 4 + size_of::<PolicyKey>(), 4, MAX_POLICY_ENTRIES),
    (
        M_POLICY_CIDRS,
        4 + size_of::<PolicyCidrKey>(),
        4,
        MAX_POLICY_CIDRS,
    ),
    (M_IDENTITIES, 4, 4, MAX_IDENTITIES),
    (M_POLICY_EPOCH, 4, 4, 1),
    (
        M_CONNTRACK,
        size_of::<FlowKey>(),
        size_of::<CtValue>(),
        MAX_CONNTRACK,
    ),
];

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
    /// TCX is the default and what the uplink always uses first. Its cost: every TCX attach that
    /// adds a program waits for an RCU grace period (`tcx_entry_sync()` = `synchronize_rcu()`)
    /// while holding RTNL — measured here at 8–20 ms per host veth, every time, not only for the
    /// first link. A classic filter attaches in well under a millisecond, so `Classic` is the
    /// choice when CNI ADD latency matters more than link ownership. Either mode falls back to
    /// classic when TCX attach fails.
    pub endpoint_attach: AttachMode,
    /// Whether NetworkPolicy decides the endpoints' policy bits (see [`PolicyMode`]).
    pub policy: PolicyMode,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            endpoint_attach: AttachMode::Tcx,
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

/// The node's dataplane. Operates on the netns of the calling thread: create it and call it on a
/// thread that is in the node's netns (the daemon runs there entirely).
pub struct Dataplane {
    bpf: Ebpf,
    pin_dir: PathBuf,
    uplink: String,
    uplink_mode: AttachMode,
    endpoint_mode: AttachMode,
    nr_cpus: usize,
    timings: Timings,
    policy_mode: PolicyMode,
    policy: PolicyTables,
}

// The daemon keeps the dataplane behind a Mutex and calls it from spawn_blocking.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Dataplane>();
};

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("uplink", &self.uplink)
            .field("uplink_mode", &self.uplink_mode)
            .field("endpoint_mode", &self.endpoint_mode)
            .finish_non_exhaustive()
    }
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

impl Dataplane {
    /// Loads the programs with their maps pinned in `pin_dir` — adopting existing pins, so
    /// endpoints, counters and routes survive a restart — rewrites the routes/peers/config maps
    /// and the nftables table from `cfg`, and attaches (or updates in place) the uplink program and
    /// the endpoint program of every known endpoint. Established flows lose no packet: the old
    /// programs keep running until `bpf_link_update` swaps them atomically.
    pub fn start(cfg: DataplaneConfig) -> Result<Dataplane, DataplaneError> {
        Self::start_with(cfg, StartOptions::default())
    }

    /// [`Dataplane::start`] with explicit attach options.
    pub fn start_with(
        cfg: DataplaneConfig,
        opts: StartOptions,
    ) -> Result<Dataplane, DataplaneError> {
        let uplink_ifindex = sys::ifindex(&cfg.uplink)
            .ok_or_else(|| DataplaneError::NoSuchInterface(cfg.uplink.clone()))?;
        let (mac, node_addrs) =
            sys::interface_addresses(&cfg.uplink).map_err(io_err("listing interface addresses"))?;
        let uplink_mac = mac.ok_or_else(|| {
            DataplaneError::Config(format!("uplink {} has no Ethernet address", cfg.uplink))
        })?;
        let local_v4: Vec<Ipv4Network> = cfg
            .local_pod_cidrs
            .iter()
            .filter_map(|c| match c {
                ipnetwork::IpNetwork::V4(n) => Some(*n),
                ipnetwork::IpNetwork::V6(_) => None,
            })
            .collect();
        let plan = plan::plan(&cfg.networks, &local_v4, &node_addrs)?;

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
        drop_incompatible_pins(&cfg.pin_dir);

        let t = Instant::now();
        let bpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .load(ebpf_object::BYTES)?;
        let load = t.elapsed();
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| io_err(what)(e))?;
        let uplink_mode = if cfg.pin_dir.join(CLASSIC_MARKER).exists() {
            AttachMode::Classic
        } else {
            AttachMode::Tcx
        };
        let mut dp = Dataplane {
            bpf,
            pin_dir: cfg.pin_dir.clone(),
            uplink: cfg.uplink.clone(),
            uplink_mode,
            endpoint_mode: opts.endpoint_attach,
            nr_cpus,
            timings: Timings {
                load,
                ..Timings::default()
            },
            policy_mode: opts.policy,
            policy: PolicyTables::default(),
        };
        // What the pinned maps enforce now (they kept enforcing while no daemon ran); the next
        // policy sync is planned against exactly that.
        dp.policy = dp.read_policy()?;
        if dp.policy_mode == PolicyMode::Open {
            dp.open_all_endpoints()?;
        }
        let t = Instant::now();
        for name in PROGRAMS {
            dp.program(name)?.load()?;
        }
        dp.timings.verify = t.elapsed();

        // Maps first, programs second: a freshly attached program must never see an empty config.
        {
            let mut config: Array<_, NodeConfig> = Array::try_from(dp.map_mut(M_CONFIG)?)?;
            config.set(
                0,
                NodeConfig {
                    uplink_ifindex,
                    uplink_mac,
                    _pad: [0; 2],
                },
                0,
            )?;
        }
        dp.sync_routes(&plan)?;
        dp.sync_peers(&plan)?;
        set_ip_forward()?;
        nft::apply(&plan, &cfg.uplink)?;

        let t = Instant::now();
        // The observer first: flows the kernel carries from now on are recorded before the
        // forwarding program can look for them.
        let egress_wanted = if cfg.pin_dir.join(CLASSIC_MARKER_EGRESS).exists() {
            AttachMode::Classic
        } else {
            dp.uplink_mode
        };
        let egress = dp.attach(LinkTarget::Uplink(Dir::Out), uplink_ifindex, egress_wanted)?;
        if egress == AttachMode::Classic && egress_wanted != AttachMode::Classic {
            std::fs::write(dp.pin_dir.join(CLASSIC_MARKER_EGRESS), b"")
                .map_err(io_err("writing the classic-mode marker"))?;
        }
        let mode = dp.attach(LinkTarget::Uplink(Dir::In), uplink_ifindex, dp.uplink_mode)?;
        if mode != dp.uplink_mode {
            std::fs::write(dp.pin_dir.join(CLASSIC_MARKER), b"")
                .map_err(io_err("writing the classic-mode marker"))?;
            dp.uplink_mode = mode;
        }
        dp.timings.uplink_attach = t.elapsed();
        dp.readopt_endpoints()?;
        tracing::info!(
            pin_dir = %dp.pin_dir.display(),
            uplink = %dp.uplink,
            uplink_mode = ?dp.uplink_mode,
            load_ms = load.as_secs_f64() * 1e3,
            verify_ms = dp.timings.verify.as_secs_f64() * 1e3,
            uplink_attach_ms = dp.timings.uplink_attach.as_secs_f64() * 1e3,
            "dataplane started"
        );
        Ok(dp)
    }

    /// How the uplink program is attached.
    pub fn attach_mode(&self) -> AttachMode {
        self.uplink_mode
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
        let mut pins = vec![M_ENDPOINTS];
        if self.uplink_mode == AttachMode::Tcx {
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
        self.timings
    }

    /// Installs the endpoint: map entries, then the endpoint program on the host veth (pinned link),
    /// all in place before it returns. Idempotent; an existing link on the same veth is updated in
    /// place, one left on another veth (address reused) is replaced.
    pub fn add_endpoint(&mut self, ep: &Endpoint) -> Result<(), DataplaneError> {
        let t = Instant::now();
        if ep.network_id == vpcnet_common::NODE_SCOPE {
            return Err(DataplaneError::Config(format!(
                "endpoint {}: network id 0 is reserved",
                ep.ip
            )));
        }
        let ifname =
            sys::ifname(ep.host_ifindex).ok_or(DataplaneError::NoSuchIfindex(ep.host_ifindex))?;
        let key = ip_key(ep.ip.octets());
        let nr_cpus = self.nr_cpus;
        let default_mode = self.endpoint_mode;
        let policy = self.endpoint_policy(ep.ip);
        let (existed, mut info) = {
            let mut stats: PerCpuHashMap<_, u32, EndpointStats> =
                PerCpuHashMap::try_from(self.map_mut(M_ENDPOINT_STATS)?)?;
            // Keep the counters of a re-added endpoint (idempotent ADD, restart reconcile).
            if stats.get(&key, 0).is_err() {
                let zero = PerCpuValues::try_from(vec![EndpointStats::default(); nr_cpus])
                    .map_err(io_err("per-CPU values"))?;
                stats.insert(key, zero, 0)?;
            }
            let mut eps: HashMap<_, u32, EndpointInfo> =
                HashMap::try_from(self.map_mut(M_ENDPOINTS)?)?;
            let old = eps.get(&key, 0).ok();
            // A re-ADD on the same veth keeps its attach mode; a new veth gets the default.
            let mode = match old {
                Some(o) if o.ifindex == ep.host_ifindex => mode_of(&o),
                _ => default_mode,
            };
            let info = EndpointInfo {
                ifindex: ep.host_ifindex,
                mac: ep.pod_mac,
                network_id: ep.network_id,
                flags: flags_for(mode, mode),
                policy,
            };
            // The entry goes in before the program: its first packet must find its source.
            eps.insert(key, info, 0)?;
            (old.is_some(), info)
        };
        let ta = Instant::now();
        let wanted = mode_of(&info);
        match self.attach_endpoint(ep.ip, &ifname, ep.host_ifindex, wanted) {
            Ok(flags) if flags != info.flags => {
                info.flags = flags;
                let mut eps: HashMap<_, u32, EndpointInfo> =
                    HashMap::try_from(self.map_mut(M_ENDPOINTS)?)?;
                eps.insert(key, info, 0)?;
            }
            Ok(_) => {}
            Err(e) => {
                if !existed {
                    let _ = sys::detach_and_unpin(&self.ep_pin(ep.ip));
                    let _ = sys::detach_and_unpin(&self.ep_egress_pin(ep.ip));
                    let _ = self.remove_entries(key);
                }
                return Err(e);
            }
        }
        self.timings.last_endpoint_attach = ta.elapsed();
        self.timings.last_add_endpoint = t.elapsed();
        Ok(())
    }

    /// Removes the endpoint's link (detaching the program) and map entries. Idempotent.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        let key = ip_key(ip.octets());
        let info = {
            let eps: HashMap<_, u32, EndpointInfo> = HashMap::try_from(self.map(M_ENDPOINTS)?)?;
            eps.get(&key, 0).ok()
        };
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
        self.remove_entries(key)?;
        // Connections of the departed pod must not carry over to a pod that reuses its address.
        if info.is_some() {
            self.bump_policy_epoch()?;
        }
        Ok(())
    }

    /// `EndpointInfo::policy` for an endpoint being (re)installed.
    fn endpoint_policy(&self, ip: Ipv4Addr) -> u32 {
        match self.policy_mode {
            PolicyMode::Open => POLICY_OPEN,
            PolicyMode::Enforce => self.policy.flags(ip),
        }
    }

    fn open_all_endpoints(&mut self) -> Result<(), DataplaneError> {
        let mut eps: HashMap<_, u32, EndpointInfo> = HashMap::try_from(self.map_mut(M_ENDPOINTS)?)?;
        let raw: Vec<(u32, EndpointInfo)> = eps.iter().collect::<Result<_, _>>()?;
        for (k, info) in raw {
            if info.policy != POLICY_OPEN {
                eps.insert(
                    k,
                    EndpointInfo {
                        policy: POLICY_OPEN,
                        ..info
                    },
                    0,
                )?;
            }
        }
        Ok(())
    }

    fn read_policy(&self) -> Result<PolicyTables, DataplaneError> {
        PolicyTables::read(
            &LpmTrie::try_from(self.map(M_POLICY)?)?,
            &LpmTrie::try_from(self.map(M_POLICY_CIDRS)?)?,
            &HashMap::try_from(self.map(M_IDENTITIES)?)?,
            &HashMap::try_from(self.map(M_ENDPOINTS)?)?,
        )
    }

    /// What the policy maps hold (address → identity included), as the compile layer's type.
    pub fn applied_policy(&self) -> &vpcnet_policy::Compiled {
        self.policy.mirror()
    }

    /// Takes the policy maps from what they hold to `new` along [`vpcnet_policy::compile::plan`],
    /// phase after phase; when anything narrowed, established connections are judged again.
    pub fn sync_policy(
        &mut self,
        new: &vpcnet_policy::Compiled,
    ) -> Result<SyncStats, DataplaneError> {
        let plan = vpcnet_policy::compile::plan(self.policy.mirror(), new);
        if plan.is_empty() {
            return Ok(SyncStats::default());
        }
        let mut tables = std::mem::take(&mut self.policy);
        let result = self.with_policy_maps(|maps| tables.apply(maps, &plan));
        self.policy = tables;
        let stats = result?;
        if stats.narrowed {
            self.bump_policy_epoch()?;
        }
        Ok(stats)
    }

    fn with_policy_maps<T>(
        &mut self,
        f: impl FnOnce(&mut policy::Maps<'_>) -> Result<T, DataplaneError>,
    ) -> Result<T, DataplaneError> {
        let [Some(p), Some(c), Some(i), Some(e)] =
            self.bpf
                .maps_disjoint_mut([M_POLICY, M_POLICY_CIDRS, M_IDENTITIES, M_ENDPOINTS])
        else {
            return Err(DataplaneError::Missing("policy maps"));
        };
        let mut maps = policy::Maps {
            policy: LpmTrie::try_from(p)?,
            cidrs: LpmTrie::try_from(c)?,
            identities: HashMap::try_from(i)?,
            endpoints: HashMap::try_from(e)?,
        };
        f(&mut maps)
    }

    fn bump_policy_epoch(&mut self) -> Result<(), DataplaneError> {
        let mut epoch: Array<_, u32> = Array::try_from(self.map_mut(M_POLICY_EPOCH)?)?;
        policy::bump_epoch(&mut epoch)
    }

    /// The pinned conntrack map, for [`conntrack_entries`] (which needs no `&Dataplane`).
    pub fn conntrack_pin(&self) -> PathBuf {
        self.pin_dir.join(M_CONNTRACK)
    }
}

/// Connection-tracking entries: (live, expired but not yet evicted). Walks the whole map (about
/// 1 µs per entry), through its own handle on the pin so no caller's lock is held meanwhile.
pub fn conntrack_entries(pin: &Path) -> Result<(u64, u64), DataplaneError> {
    let data = MapData::from_pin(pin)?;
    let ct: HashMap<_, FlowKey, CtValue> = HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
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

impl Dataplane {
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, DataplaneError> {
        let eps: HashMap<_, u32, EndpointInfo> = HashMap::try_from(self.map(M_ENDPOINTS)?)?;
        let mut out = Vec::new();
        for item in eps.iter() {
            let (k, v) = item?;
            out.push(Endpoint {
                ip: Ipv4Addr::from(k.to_ne_bytes()),
                host_ifindex: v.ifindex,
                pod_mac: v.mac,
                network_id: v.network_id,
            });
        }
        out.sort_by_key(|e| e.ip);
        Ok(out)
    }

    /// Per-endpoint packets/bytes (`tx` = sent by the pod, `rx` = delivered to it by the programs)
    /// and drops by reason.
    pub fn counters(&self) -> Result<vpcnet_api::CountersInfo, DataplaneError> {
        let stats: PerCpuHashMap<_, u32, EndpointStats> =
            PerCpuHashMap::try_from(self.map(M_ENDPOINT_STATS)?)?;
        let mut endpoints = Vec::new();
        for item in stats.iter() {
            let (k, per_cpu) = item?;
            let mut c = vpcnet_api::EndpointCounters {
                ip: Ipv4Addr::from(k.to_ne_bytes()).into(),
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
        let drops = self.per_cpu_sums(M_DROPS, &DROP_REASON_NAMES)?;
        Ok(vpcnet_api::CountersInfo {
            endpoints,
            drops,
            node: self.node_counters()?,
            // Filled in by the caller outside its lock: see `conntrack_entries`.
            conntrack: None,
        })
    }

    /// Node-wide counters by name (ARP replies, pod-to-pod, pod-to-uplink, pod-to-kernel,
    /// uplink-to-pod): where traffic went.
    pub fn node_counters(&self) -> Result<Vec<(String, u64)>, DataplaneError> {
        self.per_cpu_sums(M_NODE_STATS, &NODE_COUNTER_NAMES)
    }

    fn per_cpu_sums(
        &self,
        map: &'static str,
        names: &[&str],
    ) -> Result<Vec<(String, u64)>, DataplaneError> {
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(map)?)?;
        let mut out = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let v = arr.get(&(i as u32), 0)?;
            out.push((name.to_string(), v.iter().sum()));
        }
        Ok(out)
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DataplaneError> {
        self.bpf.map(name).ok_or(DataplaneError::Missing(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.bpf.map_mut(name).ok_or(DataplaneError::Missing(name))
    }

    fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DataplaneError> {
        let p = self
            .bpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing(name))?;
        Ok(p.try_into()?)
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
        &mut self,
        ip: Ipv4Addr,
        ifname: &str,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<u32, DataplaneError> {
        let egress = self.attach(LinkTarget::Endpoint(ip, ifname, Dir::Out), ifindex, mode)?;
        let egress_updated = self.timings.last_endpoint_updated;
        let ingress = self.attach(LinkTarget::Endpoint(ip, ifname, Dir::In), ifindex, mode)?;
        let egress = if ingress != egress {
            // TCX refused the forwarding program: keep both on one mechanism.
            self.detach_endpoint_egress(ip, ifname, egress);
            self.attach(LinkTarget::Endpoint(ip, ifname, Dir::Out), ifindex, ingress)?
        } else {
            egress
        };
        self.timings.last_endpoint_updated &= egress_updated;
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

    fn remove_entries(&mut self, key: u32) -> Result<(), DataplaneError> {
        {
            let mut eps: HashMap<_, u32, EndpointInfo> =
                HashMap::try_from(self.map_mut(M_ENDPOINTS)?)?;
            ignore_missing(eps.remove(&key))?;
        }
        let mut stats: PerCpuHashMap<_, u32, EndpointStats> =
            PerCpuHashMap::try_from(self.map_mut(M_ENDPOINT_STATS)?)?;
        ignore_missing(stats.remove(&key))
    }

    /// Attaches the target's program, or swaps the program of its existing link/filter in place.
    /// Returns the mode actually used (TCX falls back to classic when the kernel refuses it).
    fn attach(
        &mut self,
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
        self.timings.last_endpoint_updated = false;
        if mode == AttachMode::Classic {
            self.attach_classic(prog_name, &ifname, dir)?;
            return Ok(AttachMode::Classic);
        }
        if let Ok(info) = sys::pinned_link_info(&pin) {
            if info.link_type == sys::BPF_LINK_TYPE_TCX && info.ifindex == ifindex {
                let link =
                    SchedClassifierLink::try_from(FdLink::from(PinnedLink::from_pin(&pin)?))?;
                let prog = self.program(prog_name)?;
                let id = prog.attach_to_link(link)?;
                // The pin holds the link; our descriptor is not needed.
                drop(prog.take_link(id)?);
                self.timings.last_endpoint_updated = true;
                return Ok(AttachMode::Tcx);
            }
            // Defunct (interface gone) or bound to another interface (address reused): the pin
            // is the link's last reference, so removing it detaches the old one.
            tracing::info!(pin = %pin.display(), link_ifindex = info.ifindex, ifindex, "replacing stale link");
        }
        if pin.exists() {
            sys::detach_and_unpin(&pin).map_err(io_err(format!("detaching {}", pin.display())))?;
        }
        let prog = self.program(prog_name)?;
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
                self.attach_classic(prog_name, &ifname, dir)?;
                Ok(AttachMode::Classic)
            }
        }
    }

    /// Classic clsact filter at a fixed priority/handle: replaced in place when present, created
    /// otherwise. The filter (not a link) keeps the program attached after we exit.
    fn attach_classic(
        &mut self,
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
        let prog = self.program(prog_name)?;
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

    /// After a restart: updates the program of every endpoint link in place; re-attaches endpoints
    /// whose link is missing but whose host veth still exists; forgets endpoints whose veth is gone
    /// (a reused ifindex must never receive another pod's traffic) and pins without an endpoint.
    fn readopt_endpoints(&mut self) -> Result<(), DataplaneError> {
        let mut known = BTreeSet::new();
        let raw: Vec<(u32, EndpointInfo)> = {
            let eps: HashMap<_, u32, EndpointInfo> = HashMap::try_from(self.map(M_ENDPOINTS)?)?;
            eps.iter().collect::<Result<_, _>>()?
        };
        for (key, info) in raw {
            let ip = Ipv4Addr::from(key.to_ne_bytes());
            known.insert(ip);
            let mode = mode_of(&info);
            let name = sys::ifname(info.ifindex)
                .filter(|n| n.starts_with(HOST_VETH_PREFIX))
                .filter(|_| match sys::pinned_link_info(&self.ep_pin(ip)) {
                    Ok(link) => link.ifindex == info.ifindex,
                    Err(_) => true,
                });
            match name {
                Some(name) => {
                    // Also attaches the observer of an endpoint added by a release without it.
                    match self.attach_endpoint(ip, &name, info.ifindex, mode) {
                        Ok(flags) if flags != info.flags => {
                            let mut eps: HashMap<_, u32, EndpointInfo> =
                                HashMap::try_from(self.map_mut(M_ENDPOINTS)?)?;
                            eps.insert(key, EndpointInfo { flags, ..info }, 0)?;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(%ip, error = %e, "re-attaching endpoint failed")
                        }
                    }
                }
                None => {
                    tracing::warn!(%ip, ifindex = info.ifindex, "host veth gone; endpoint forgotten");
                    let _ = sys::detach_and_unpin(&self.ep_pin(ip));
                    let _ = sys::detach_and_unpin(&self.ep_egress_pin(ip));
                    self.remove_entries(key)?;
                }
            }
        }
        let dir = std::fs::read_dir(&self.pin_dir)
            .map_err(io_err(format!("reading {}", self.pin_dir.display())))?;
        for entry in dir.flatten() {
            let fname = entry.file_name().to_string_lossy().into_owned();
            if let Some(ip) = fname
                .strip_prefix(LINK_EP_PREFIX)
                .or_else(|| fname.strip_prefix(LINK_EP_EGRESS_PREFIX))
                && !ip
                    .replace('_', ".")
                    .parse()
                    .is_ok_and(|ip| known.contains(&ip))
            {
                tracing::info!(pin = %fname, "removing link pin without an endpoint");
                let _ = sys::detach_and_unpin(&entry.path());
            }
        }
        Ok(())
    }

    /// Makes `ROUTES` equal to the plan without a moment where a wanted entry is missing:
    /// upsert everything wanted, then delete what is no longer wanted.
    fn sync_routes(&mut self, plan: &plan::Plan) -> Result<(), DataplaneError> {
        let mut routes: LpmTrie<_, RouteKey, RouteValue> =
            LpmTrie::try_from(self.map_mut(M_ROUTES)?)?;
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

    fn sync_peers(&mut self, plan: &plan::Plan) -> Result<(), DataplaneError> {
        let mut peers: HashMap<_, PeerKey, u32> = HashMap::try_from(self.map_mut(M_PEERS)?)?;
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

/// Removes map pins whose key/value sizes differ from this build's, so the loader recreates them.
fn drop_incompatible_pins(pin_dir: &Path) {
    for (name, key, value, max_entries) in MAP_LAYOUTS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        match MapInfo::from_pin(&path) {
            Ok(info)
                if info.key_size() as usize == key
                    && info.value_size() as usize == value
                    && info.max_entries() == max_entries => {}
            Ok(info) => {
                tracing::warn!(
                    map = name,
                    key_size = info.key_size(),
                    value_size = info.value_size(),
                    max_entries = info.max_entries(),
                    "pinned map has another layout; recreating it (its entries are lost)"
                );
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => {
                tracing::warn!(map = name, error = %e, "unreadable map pin; recreating it");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
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
    if let Ok(m) = MapData::from_pin(pin_dir.join(M_ENDPOINTS)) {
        let map = aya::maps::Map::HashMap(m);
        if let Ok(eps) = HashMap::<_, u32, EndpointInfo>::try_from(&map) {
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

/// The eBPF object this dataplane was built with (built by `build.rs`): the loader and its programs
/// can never drift apart on a node.
pub mod ebpf_object {
    pub static BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpcnet-ebpf"));
}
