#![no_std]
#![no_main]
//! vpcnet's tc (TCX) programs.
//!
//! * `endpoint_ingress` runs on every host-side veth (traffic *from* a pod) and forwards it:
//!   local pod → `bpf_redirect_peer`; routable destination → `bpf_redirect_neigh` out of the uplink,
//!   source kept; node address or internet → `TC_ACT_OK` (the kernel delivers it, or forwards it
//!   through vpcnet's nftables masquerade).
//! * `uplink_ingress` runs on the node's uplink: answers ARP for local pods (the VPC fabric reaches
//!   pods directly, like secondary IPs of a cloud NIC) and steers traffic for local pods straight
//!   into them.
//!
//! * `endpoint_egress` (host veth, towards the pod) and `uplink_egress` (uplink, out of the node)
//!   never forward anything: they record flows the *kernel* carried to or from a pod in
//!   `KERNEL_FLOWS`, so the two forwarding programs hand the other direction of those flows to the
//!   kernel too (see "Kernel flows" below). `endpoint_egress` also judges the pod's ingress
//!   policy for what the kernel delivers; `uplink_egress` never drops.
//! * Both host-veth programs drop what is neither IPv4 nor ARP (`not-ipv4`): pods are IPv4-only
//!   and policy judges IPv4 only. The uplink programs pass the node's own non-IPv4 traffic.
//! * NetworkPolicy: see [`enforce`]; the forwarding programs judge egress where a packet leaves
//!   its pod and ingress where it reaches its pod.
//!
//! Every `TC_ACT_SHOT` is counted in `DROPS` under a reason. All maps are pinned (the loader gives
//! the directory), so a daemon restart or program upgrade keeps every entry and counter.
//!
//! # Kernel flows
//! A flow the kernel has NAT state for must go through the kernel both ways: portmap hostPorts
//! (client → node:8080, DNAT to pod:80) and kube-proxy Services (pod → ClusterIP, DNAT to a
//! backend) only work if the replies pass conntrack's reverse NAT. The programs cannot see
//! conntrack (aya 0.14 cannot emit the `bpf_skb_ct_lookup` kfunc call, and a conntrack lookup on
//! every packet would cost more than a hash lookup), so they learn those flows from where the
//! kernel puts their packets:
//! * the kernel delivers a packet to a pod only through the host veth's egress — the programs'
//!   own deliveries (`bpf_redirect_peer`) skip it. `endpoint_egress` records the reply tuple of
//!   every TCP/UDP packet there; `endpoint_ingress` passes a pod packet matching one to the kernel
//!   (portmap: the pod's SYN-ACK gets de-NATed to node:8080; local Service backend: the backend's
//!   reply gets de-NATed to the ClusterIP).
//! * the kernel forwards a pod's packet out of the uplink with the pod's source only when it did
//!   not come through `bpf_redirect_neigh` — those carry [`SKB_MARK_REDIRECTED`], set by
//!   `endpoint_ingress` and cleared by `uplink_egress`. `uplink_egress` records the reply tuple of
//!   unmarked pod-sourced packets (Service DNATed to a remote backend, post-DNAT tuple);
//!   `uplink_ingress` passes a packet for a pod matching one to the kernel.
//!
//! Recording everything the kernel carried is safe: the reply of a kernel-carried packet always
//! belongs to the kernel (NAT, masquerade, node-local traffic). Entries expire after an idle
//! timeout (refreshed by both directions, at most once a second per flow) and the map is an LRU.
//! A stale entry must not capture a new connection that reuses its 5-tuple without the kernel:
//! a SYN looked up on the fast path only matches when a recorder saw a SYN of the flow within
//! [`KERNEL_FLOW_SYN_WINDOW_NS`] and after its last FIN/RST; otherwise the entry is deleted
//! (`kernel-flow-stale`).
//! Limits: TCP and UDP only (no ICMP errors of NATed flows, no non-first fragments).

use aya_ebpf::{
    helpers::generated::{
        bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use vpcnet_common::{
    CT_CLOSING_TIMEOUT_NS, CT_OTHER_TIMEOUT_NS, CT_REPLY, CT_TCP_TIMEOUT_NS, CtValue, DIR_EGRESS,
    DIR_INGRESS, DROP_REASONS, DropReason, EndpointInfo, EndpointStats, FlowKey, FlowValue, ID_ANY,
    ID_HOST, ID_WORLD, KERNEL_FLOW_SYN_WINDOW_NS, KERNEL_FLOW_TCP_TIMEOUT_NS,
    KERNEL_FLOW_UDP_TIMEOUT_NS, MAX_CONNTRACK, MAX_ENDPOINTS, MAX_IDENTITIES, MAX_KERNEL_FLOWS,
    MAX_PEERS, MAX_POLICY_CIDRS, MAX_POLICY_ENTRIES, MAX_ROUTES, NODE_COUNTERS, NODE_SCOPE,
    NodeConfig, NodeCounter, POLICY_CIDR_PREFIX_BASE, POLICY_EGRESS_OPEN, POLICY_INGRESS_OPEN,
    POLICY_OPEN, POLICY_PREFIX_PROTO, PeerKey, PolicyCidrKey, PolicyKey, ROUTE_DIRECT, ROUTE_HOST,
    ROUTE_ISOLATED, ROUTE_LOCAL_BLOCK, RouteKey, RouteValue, SKB_MARK_REDIRECTED,
};

#[map]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map]
static ENDPOINT_STATS: PerCpuHashMap<u32, EndpointStats> = PerCpuHashMap::pinned(MAX_ENDPOINTS, 0);

#[map]
static ROUTES: LpmTrie<RouteKey, RouteValue> = LpmTrie::pinned(MAX_ROUTES, 0);

#[map]
static PEERS: HashMap<PeerKey, u32> = HashMap::pinned(MAX_PEERS, 0);

#[map]
static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASONS, 0);

#[map]
static NODE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(NODE_COUNTERS, 0);

/// Reply tuples of flows the kernel carried (see "Kernel flows" in the crate docs).
#[map]
static KERNEL_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(MAX_KERNEL_FLOWS, 0);

/// What each local endpoint allows, per direction (see [`PolicyKey`]). Values are unused.
#[map]
static POLICY: LpmTrie<PolicyKey, u32> = LpmTrie::pinned(MAX_POLICY_ENTRIES, 0);

/// ipBlock prefixes per endpoint and direction → port-set number in `POLICY`.
#[map]
static POLICY_CIDRS: LpmTrie<PolicyCidrKey, u32> = LpmTrie::pinned(MAX_POLICY_CIDRS, 0);

/// Pod address → identity, for every pod of the cluster the daemon knows.
#[map]
static IDENTITIES: HashMap<u32, u32> = HashMap::pinned(MAX_IDENTITIES, 0);

/// Bumped by the daemon after a policy update narrowed anything or an endpoint went away:
/// connections judged under an older epoch are judged again on their next packet.
#[map]
static POLICY_EPOCH: Array<u32> = Array::pinned(1, 0);

/// Connections of policy-selected local pods, both directions (see [`enforce`]).
#[map]
static CONNTRACK: LruHashMap<FlowKey, CtValue> = LruHashMap::pinned(MAX_CONNTRACK, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const OFF_ETH_DST: usize = 0;
const OFF_ETH_SRC: usize = 6;
const OFF_ETH_PROTO: usize = 12;

const OFF_IP_VER_IHL: usize = ETH_HLEN;
/// frag_off(2) ttl(1) protocol(1), read as one word.
const OFF_IP_FRAG: usize = ETH_HLEN + 6;
const OFF_IP_TTL: usize = ETH_HLEN + 8;
const OFF_IP_CSUM: usize = ETH_HLEN + 10;
const OFF_IP_SRC: usize = ETH_HLEN + 12;
const OFF_IP_DST: usize = ETH_HLEN + 16;

const OFF_ARP_HDR: usize = ETH_HLEN; // htype(2) ptype(2) hlen(1) plen(1) oper(2)
const OFF_ARP_OPER: usize = ETH_HLEN + 6;
const OFF_ARP_SHA: usize = ETH_HLEN + 8;
const OFF_ARP_SPA: usize = ETH_HLEN + 14;
const OFF_ARP_THA: usize = ETH_HLEN + 18;
const OFF_ARP_TPA: usize = ETH_HLEN + 24;

/// The fixed MAC of every host veth (vpcnet_api::HOST_VETH_MAC); pods address their gateway with it.
const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// `skb->pkt_type` of frames addressed to this host (as opposed to broadcast, multicast, or frames
/// a bridge flooded to us that belong to someone else).
const PACKET_HOST: u32 = 0;

// Spelled out here: the generated bindings type these differently per target.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
/// Observers return this: "no opinion" — the next TCX program / classic filter runs, the packet
/// passes when none is left.
const TC_ACT_UNSPEC: i32 = -1;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const TCP_ACK: u8 = 0x10;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const OFF_TCP_FLAGS: usize = 13;
/// A flow's expiry is rewritten at most this often (keeps a busy flow's cache line shared).
const REFRESH_NS: u64 = 1_000_000_000;

type Verdict = Result<i32, DropReason>;

#[inline(always)]
fn count_drop(reason: DropReason) {
    if let Some(slot) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run, so there is no other writer.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn count_node(counter: NodeCounter) {
    if let Some(slot) = NODE_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: as in count_drop.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn count_endpoint(ip: u32, bytes: u32, rx: bool) {
    if let Some(stats) = ENDPOINT_STATS.get_ptr_mut(ip) {
        // SAFETY: per-CPU value, see count_drop.
        unsafe {
            if rx {
                (*stats).rx_packets += 1;
                (*stats).rx_bytes += bytes as u64;
            } else {
                (*stats).tx_packets += 1;
                (*stats).tx_bytes += bytes as u64;
            }
        }
    }
}

#[inline(always)]
fn finish(verdict: Verdict) -> i32 {
    match verdict {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn route(network: u16, addr: u32) -> Option<u32> {
    let key = Key::new(32 + 32, RouteKey::new(network, addr));
    ROUTES.get(&key).map(|v| v.action)
}

#[inline(always)]
fn config() -> Result<NodeConfig, DropReason> {
    CONFIG
        .get(0)
        .copied()
        .filter(|c| c.uplink_ifindex != 0)
        .ok_or(DropReason::NotConfigured)
}

#[inline(always)]
fn peered(a: u16, b: u16) -> bool {
    // SAFETY: the value is not dereferenced beyond a presence check.
    a == b || unsafe { PEERS.get(PeerKey { src: a, dst: b }) }.is_some()
}

/// Validates the IPv4 header enough for the fields this program reads and rewrites; returns the
/// header length.
#[inline(always)]
fn check_ipv4(ctx: &TcContext) -> Result<usize, DropReason> {
    let ver_ihl: u8 = ctx
        .load(OFF_IP_VER_IHL)
        .map_err(|_| DropReason::Malformed)?;
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        return Err(DropReason::Malformed);
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if (ctx.len() as usize) < ETH_HLEN + ihl {
        return Err(DropReason::Malformed);
    }
    Ok(ihl)
}

/// A TCP/UDP packet's 5-tuple as it travels, and its TCP flags (0 for UDP).
struct Flow {
    key: FlowKey,
    tcp_flags: u8,
}

impl Flow {
    #[inline(always)]
    fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.key.dst,
            dst: self.key.src,
            sport: self.key.dport,
            dport: self.key.sport,
            proto: self.key.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn timeout(&self) -> u64 {
        if self.key.proto == IPPROTO_TCP {
            KERNEL_FLOW_TCP_TIMEOUT_NS
        } else {
            KERNEL_FLOW_UDP_TIMEOUT_NS
        }
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// True when the packet's flow is one the kernel carried (and must keep carrying): a live
/// `KERNEL_FLOWS` entry. Refreshes the entry's expiry; drops it when a SYN shows the tuple is
/// being reused by a connection the kernel never saw open.
#[inline(always)]
fn is_kernel_flow(flow: &Flow) -> bool {
    let Some(v) = KERNEL_FLOWS.get_ptr_mut(flow.key) else {
        return false;
    };
    let now = now_ns();
    // SAFETY: a value of the map; concurrent writers only store recent times, any of which is
    // fine (a torn or lost refresh delays expiry by at most a second's worth).
    let (expires, syn_ns, fin_ns) = unsafe { ((*v).expires_ns, (*v).syn_ns, (*v).fin_ns) };
    if expires <= now {
        return false;
    }
    if flow.tcp_flags & TCP_SYN != 0
        && (syn_ns <= fin_ns || now.saturating_sub(syn_ns) > KERNEL_FLOW_SYN_WINDOW_NS)
    {
        let _ = KERNEL_FLOWS.remove(flow.key);
        count_node(NodeCounter::KernelFlowStale);
        return false;
    }
    let fresh = now + flow.timeout();
    // SAFETY: as above.
    unsafe {
        if fresh > expires + REFRESH_NS {
            (*v).expires_ns = fresh;
        }
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*v).fin_ns = now;
        }
    }
    count_node(NodeCounter::KernelFlowHits);
    true
}

/// Records the reply tuple of a packet the kernel carried.
#[inline(always)]
fn record_kernel_flow(flow: &Flow) {
    let key = flow.reversed();
    let now = now_ns();
    let expires = now + flow.timeout();
    let syn = flow.tcp_flags & TCP_SYN != 0;
    let fin = flow.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    if let Some(v) = KERNEL_FLOWS.get_ptr_mut(key) {
        // SAFETY: see is_kernel_flow.
        unsafe {
            if syn {
                (*v).syn_ns = now;
            }
            if fin {
                (*v).fin_ns = now;
            }
            if expires > (*v).expires_ns + REFRESH_NS {
                (*v).expires_ns = expires;
            }
        }
        return;
    }
    let value = FlowValue {
        expires_ns: expires,
        syn_ns: if syn { now } else { 0 },
        fin_ns: if fin { now } else { 0 },
    };
    match KERNEL_FLOWS.insert(key, value, 0) {
        Ok(()) => count_node(NodeCounter::KernelFlowsRecorded),
        Err(_) => count_node(NodeCounter::KernelFlowRecordFailed),
    }
}

/// What policy and conntrack need of an IPv4 packet.
struct L4 {
    /// Ports in network byte order; ICMP echo carries its identifier as both ports; 0 where the
    /// protocol has no ports or this fragment does not carry them.
    key: FlowKey,
    tcp_flags: u8,
    /// The tuple identifies a connection (conntrack applies).
    tracked: bool,
    /// A packet that may open a connection: TCP SYN without ACK, any UDP/SCTP packet, an ICMP
    /// echo request. Only these create conntrack entries, so a reply cannot open the way for
    /// the direction it answers.
    opens: bool,
}

impl L4 {
    #[inline(always)]
    fn kernel_flow(&self) -> Option<Flow> {
        (self.tracked && (self.key.proto == IPPROTO_TCP || self.key.proto == IPPROTO_UDP))
            .then_some(Flow {
                key: self.key,
                tcp_flags: self.tcp_flags,
            })
    }
}

#[inline(always)]
fn l4_of(ctx: &TcContext, ihl: usize, src: u32, dst: u32) -> L4 {
    let mut out = L4 {
        key: FlowKey {
            src,
            dst,
            sport: 0,
            dport: 0,
            proto: 0,
            _pad: [0; 3],
        },
        tcp_flags: 0,
        tracked: false,
        opens: false,
    };
    let Ok(w) = ctx.load::<[u8; 4]>(OFF_IP_FRAG) else {
        return out;
    };
    let proto = w[3];
    out.key.proto = proto;
    if (w[0] & 0x1f) != 0 || w[1] != 0 {
        // A non-first fragment: no ports. Judged with port 0.
        return out;
    }
    let l4 = ETH_HLEN + ihl;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let Ok(ports) = ctx.load::<[u16; 2]>(l4) else {
                return out;
            };
            out.key.sport = ports[0];
            out.key.dport = ports[1];
            if proto == IPPROTO_TCP {
                let Ok(flags) = ctx.load::<u8>(l4 + OFF_TCP_FLAGS) else {
                    return out;
                };
                out.tcp_flags = flags;
                out.opens = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            } else {
                out.opens = true;
            }
            out.tracked = true;
        }
        IPPROTO_ICMP => {
            let (Ok(ty), Ok(id)) = (ctx.load::<u8>(l4), ctx.load::<u16>(l4 + 4)) else {
                return out;
            };
            if ty == ICMP_ECHO_REQUEST || ty == ICMP_ECHO_REPLY {
                out.key.sport = id;
                out.key.dport = id;
                out.tracked = true;
                out.opens = ty == ICMP_ECHO_REQUEST;
            }
        }
        _ => {}
    }
    out
}

#[inline(always)]
fn policy_epoch() -> u32 {
    POLICY_EPOCH.get(0).copied().unwrap_or(0)
}

/// Identity of a remote address: a known pod's, the node's own, or "world".
#[inline(always)]
fn identity_of(addr: u32) -> u32 {
    // SAFETY: copied out at once.
    if let Some(id) = unsafe { IDENTITIES.get(addr) } {
        return *id;
    }
    if route(NODE_SCOPE, addr) == Some(ROUTE_HOST) {
        ID_HOST
    } else {
        ID_WORLD
    }
}

#[inline(always)]
fn policy_entry(endpoint: u32, dir: u8, remote: u32, proto: u8, port: u16) -> bool {
    let key = Key::new(
        POLICY_PREFIX_PROTO + 16,
        PolicyKey {
            endpoint,
            remote,
            dir,
            proto,
            port,
        },
    );
    POLICY.get(&key).is_some()
}

/// Whether `endpoint`'s rules for `dir` allow the peer at `remote` on `proto`/`port` (the
/// destination port of the connection). Three lookups at most, whatever the number of rules:
/// the peer's identity, "any peer", and the peer's address in the ipBlock trie.
#[inline(always)]
fn policy_allows(endpoint: u32, dir: u8, remote: u32, proto: u8, port: u16) -> bool {
    let id = identity_of(remote);
    if policy_entry(endpoint, dir, id, proto, port)
        || policy_entry(endpoint, dir, ID_ANY, proto, port)
    {
        return true;
    }
    // The node is recognised as such, not by address: ipBlocks do not match it.
    if id == ID_HOST {
        return false;
    }
    let key = Key::new(
        POLICY_CIDR_PREFIX_BASE + 32,
        PolicyCidrKey {
            endpoint,
            dir,
            _pad: [0; 3],
            addr: remote,
        },
    );
    match POLICY_CIDRS.get(&key) {
        Some(set) => policy_entry(endpoint, dir, *set, proto, port),
        None => false,
    }
}

/// Judges a connection from `a` to `b` on `proto`/`port` at whichever of them is a local
/// endpoint: egress at `a`, ingress at `b`.
#[inline(always)]
fn judge(
    a: u32,
    a_ep: Option<&EndpointInfo>,
    b: u32,
    b_ep: Option<&EndpointInfo>,
    proto: u8,
    port: u16,
) -> Result<(), DropReason> {
    if let Some(ep) = a_ep
        && ep.policy & POLICY_EGRESS_OPEN == 0
        && !policy_allows(a, DIR_EGRESS, b, proto, port)
    {
        return Err(DropReason::PolicyEgress);
    }
    if let Some(ep) = b_ep
        && ep.policy & POLICY_INGRESS_OPEN == 0
        && !policy_allows(b, DIR_INGRESS, a, proto, port)
    {
        return Err(DropReason::PolicyIngress);
    }
    Ok(())
}

#[inline(always)]
fn isolated(ep: Option<&EndpointInfo>) -> bool {
    ep.is_some_and(|e| e.policy & POLICY_OPEN != POLICY_OPEN)
}

/// NetworkPolicy at one hook. `src_ep` / `dst_ep`: the sender / receiver when it is an endpoint
/// of this node. Nothing is looked up for pods no policy selects.
///
/// A connection is judged by its first packet; allowed, it gets two `CONNTRACK` entries (its
/// tuple and the reply's), and later packets either way pass on the entry alone. An entry
/// written under an older `POLICY_EPOCH` (a policy narrowed since) is judged again — in the
/// connection's original direction — so narrowing cuts established connections it forbids
/// rather than letting them run until they go idle.
#[inline(always)]
fn enforce(
    l4: &L4,
    src_ep: Option<&EndpointInfo>,
    dst_ep: Option<&EndpointInfo>,
) -> Result<(), DropReason> {
    if !isolated(src_ep) && !isolated(dst_ep) {
        return Ok(());
    }
    let k = &l4.key;
    let epoch = policy_epoch();
    if l4.tracked
        && let Some(v) = CONNTRACK.get_ptr_mut(k)
    {
        let now = now_ns();
        // SAFETY: a value of the map; concurrent writers store recent times or the current
        // epoch, any of which is fine.
        let (expires, entry_epoch, flags) = unsafe { ((*v).expires_ns, (*v).epoch, (*v).flags) };
        if expires > now {
            if entry_epoch != epoch {
                count_node(NodeCounter::CtRevalidated);
                let verdict = if flags & CT_REPLY != 0 {
                    judge(k.dst, dst_ep, k.src, src_ep, k.proto, k.sport)
                } else {
                    judge(k.src, src_ep, k.dst, dst_ep, k.proto, k.dport)
                };
                if verdict.is_err() {
                    let _ = CONNTRACK.remove(k);
                    return verdict;
                }
                // SAFETY: as above.
                unsafe { (*v).epoch = epoch };
            }
            let timeout = if k.proto != IPPROTO_TCP {
                CT_OTHER_TIMEOUT_NS
            } else if l4.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                CT_CLOSING_TIMEOUT_NS
            } else {
                CT_TCP_TIMEOUT_NS
            };
            let fresh = now + timeout;
            // SAFETY: as above.
            unsafe {
                if timeout == CT_CLOSING_TIMEOUT_NS {
                    if fresh < expires {
                        (*v).expires_ns = fresh;
                    }
                } else if fresh > expires + REFRESH_NS {
                    (*v).expires_ns = fresh;
                }
            }
            count_node(NodeCounter::CtHits);
            return Ok(());
        }
    }
    judge(k.src, src_ep, k.dst, dst_ep, k.proto, k.dport)?;
    if l4.tracked && l4.opens {
        // Until it is established, a TCP connection gets the short timeout (a SYN flood must
        // not fill the table with six-hour entries).
        let expires_ns = now_ns() + CT_OTHER_TIMEOUT_NS;
        let fwd = CtValue {
            expires_ns,
            epoch,
            flags: 0,
        };
        let rev = CtValue {
            flags: CT_REPLY,
            ..fwd
        };
        let reverse = FlowKey {
            src: k.dst,
            dst: k.src,
            sport: k.dport,
            dport: k.sport,
            proto: k.proto,
            _pad: [0; 3],
        };
        for (key, value) in [(k, &fwd), (&reverse, &rev)] {
            match CONNTRACK.insert(key, value, 0) {
                Ok(()) => count_node(NodeCounter::CtCreated),
                Err(_) => count_node(NodeCounter::CtInsertFailed),
            }
        }
    }
    Ok(())
}

/// One routing hop: TTL - 1 with the header checksum patched incrementally.
#[inline(always)]
fn decrement_ttl(ctx: &mut TcContext) -> Result<(), DropReason> {
    // TTL and protocol share one 16-bit checksum word.
    let old: u16 = ctx.load(OFF_IP_TTL).map_err(|_| DropReason::Malformed)?;
    let ttl: u8 = ctx.load(OFF_IP_TTL).map_err(|_| DropReason::Malformed)?;
    if ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    ctx.store(OFF_IP_TTL, &(ttl - 1), 0)
        .map_err(|_| DropReason::Malformed)?;
    let new: u16 = ctx.load(OFF_IP_TTL).map_err(|_| DropReason::Malformed)?;
    ctx.l3_csum_replace(OFF_IP_CSUM, old as u64, new as u64, 2)
        .map_err(|_| DropReason::Malformed)
}

/// Hands the packet to a local pod: MACs as the pod expects from its gateway, then straight into
/// the pod's netns (no second pass through the host stack).
#[inline(always)]
fn deliver(ctx: &mut TcContext, dst_ip: u32, ep: &EndpointInfo) -> Verdict {
    decrement_ttl(ctx)?;
    ctx.store(OFF_ETH_DST, &ep.mac, 0)
        .map_err(|_| DropReason::Malformed)?;
    ctx.store(OFF_ETH_SRC, &HOST_VETH_MAC, 0)
        .map_err(|_| DropReason::Malformed)?;
    count_endpoint(dst_ip, ctx.len(), true);
    // SAFETY: plain helper call.
    let ret = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    if ret != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT)
}

#[classifier]
pub fn endpoint_ingress(mut ctx: TcContext) -> i32 {
    finish(try_endpoint_ingress(&mut ctx))
}

fn try_endpoint_ingress(ctx: &mut TcContext) -> Verdict {
    let proto: u16 = ctx.load(OFF_ETH_PROTO).map_err(|_| DropReason::Malformed)?;
    match u16::from_be(proto) {
        ETH_P_IP => {}
        // The pod answers the node's ARP (the kernel's deliveries to it need its MAC).
        ETH_P_ARP => return Ok(TC_ACT_OK),
        // Pods are IPv4-only and policy judges IPv4 only: IPv6 (even link-local to the node)
        // and anything else would reach whatever the kernel forwards it to, unjudged.
        _ => return Err(DropReason::NotIpv4),
    }
    let ihl = check_ipv4(ctx)?;
    let src: u32 = ctx.load(OFF_IP_SRC).map_err(|_| DropReason::Malformed)?;
    let dst: u32 = ctx.load(OFF_IP_DST).map_err(|_| DropReason::Malformed)?;

    // SAFETY: the entry is copied out at once; userspace replaces values whole.
    let src_ep = unsafe { ENDPOINTS.get(src) }
        .copied()
        .ok_or(DropReason::Spoofed)?;
    // SAFETY: reading a field of the context.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if src_ep.ifindex != ingress {
        return Err(DropReason::Spoofed);
    }
    count_endpoint(src, ctx.len(), false);

    // SAFETY: as above.
    let dst_ep = unsafe { ENDPOINTS.get(dst) }.copied();
    let l4 = l4_of(ctx, ihl, src, dst);
    // Egress at the pod, and ingress too when the destination is a pod of this node. Before
    // the kernel-flow check: replies of NATed flows are judged (by conntrack) like any other.
    enforce(&l4, Some(&src_ep), dst_ep.as_ref())?;

    // The reply of a flow the kernel NATed (hostPort, Service): conntrack must reverse it.
    if let Some(flow) = l4.kernel_flow()
        && is_kernel_flow(&flow)
    {
        return Ok(TC_ACT_OK);
    }

    if let Some(dst_ep) = dst_ep {
        if !peered(src_ep.network_id, dst_ep.network_id) {
            return Err(DropReason::Isolated);
        }
        count_node(NodeCounter::PodToPod);
        return deliver(ctx, dst, &dst_ep);
    }

    match route(NODE_SCOPE, dst) {
        Some(ROUTE_LOCAL_BLOCK) => return Err(DropReason::NoEndpoint),
        Some(ROUTE_HOST) => {
            count_node(NodeCounter::PodToKernel);
            return Ok(TC_ACT_OK);
        }
        _ => {}
    }

    match route(src_ep.network_id, dst) {
        Some(ROUTE_DIRECT) => {
            let cfg = config()?;
            decrement_ttl(ctx)?;
            count_node(NodeCounter::PodToUplink);
            // Tells uplink_egress this one is ours, not kernel-forwarded.
            // SAFETY: reading a field of the context.
            let mark = unsafe { (*ctx.skb.skb).mark };
            ctx.set_mark(mark | SKB_MARK_REDIRECTED);
            // SAFETY: NULL params ask the kernel for a FIB lookup of the destination; it then
            // resolves the neighbour and fills in both MACs itself.
            let ret =
                unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
            if ret != TC_ACT_REDIRECT as i64 {
                return Err(DropReason::RedirectFailed);
            }
            Ok(TC_ACT_REDIRECT)
        }
        Some(ROUTE_ISOLATED) => Err(DropReason::Isolated),
        _ => {
            // Not a VPC destination: the kernel forwards it and nftables masquerades it.
            count_node(NodeCounter::PodToKernel);
            Ok(TC_ACT_OK)
        }
    }
}

#[classifier]
pub fn uplink_ingress(mut ctx: TcContext) -> i32 {
    finish(try_uplink_ingress(&mut ctx))
}

fn try_uplink_ingress(ctx: &mut TcContext) -> Verdict {
    let Ok(proto) = ctx.load::<u16>(OFF_ETH_PROTO) else {
        // Runt frames are the kernel's business on the uplink, not ours.
        return Ok(TC_ACT_OK);
    };
    match u16::from_be(proto) {
        ETH_P_ARP => arp_reply(ctx),
        ETH_P_IP => uplink_ipv4(ctx),
        _ => Ok(TC_ACT_OK),
    }
}

fn uplink_ipv4(ctx: &mut TcContext) -> Verdict {
    // SAFETY: reading a field of the context.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return Ok(TC_ACT_OK);
    }
    let Ok(dst) = ctx.load::<u32>(OFF_IP_DST) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(dst) }).copied() else {
        // Only endpoints live in this node's pod blocks. Without this the kernel would route a
        // packet for a departed pod back out of the uplink (default route) and bounce it around
        // the fabric until its TTL ran out.
        if route(NODE_SCOPE, dst) == Some(ROUTE_LOCAL_BLOCK) {
            return Err(DropReason::NoEndpoint);
        }
        return Ok(TC_ACT_OK);
    };
    let ihl = check_ipv4(ctx)?;
    let src: u32 = ctx.load(OFF_IP_SRC).map_err(|_| DropReason::Malformed)?;
    let l4 = l4_of(ctx, ihl, src, dst);
    // A reply of a flow the kernel forwarded out for a pod (Service DNAT to a remote backend):
    // conntrack must reverse it before the pod sees it (`endpoint_egress` judges it then).
    if let Some(flow) = l4.kernel_flow()
        && is_kernel_flow(&flow)
    {
        return Ok(TC_ACT_OK);
    }
    // The wire carries no network id, so the receiving side enforces isolation too: a source
    // inside another, unpeered network's subnets is refused whatever the sender's node did.
    if route(ep.network_id, src) == Some(ROUTE_ISOLATED) {
        return Err(DropReason::Isolated);
    }
    // The sender's node judged its egress; ingress is judged here, where the pod lives.
    enforce(&l4, None, Some(&ep))?;
    count_node(NodeCounter::UplinkToPod);
    deliver(ctx, dst, &ep)
}

/// Host veth egress (towards the pod): every packet here was delivered by the kernel (the
/// programs' deliveries skip this hook), so its flow is the kernel's. Judges the pod's ingress
/// policy (the node's own traffic, hostPort DNAT, replies of masqueraded connections) and
/// records the flow.
#[classifier]
pub fn endpoint_egress(ctx: TcContext) -> i32 {
    match kernel_delivery(&ctx) {
        Ok(()) => TC_ACT_UNSPEC,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn kernel_delivery(ctx: &TcContext) -> Result<(), DropReason> {
    let Ok(proto) = ctx.load::<u16>(OFF_ETH_PROTO) else {
        return Err(DropReason::Malformed);
    };
    match u16::from_be(proto) {
        ETH_P_IP => {}
        // The node resolving the pod's MAC.
        ETH_P_ARP => return Ok(()),
        // Fail closed towards the pod as well: what policy cannot judge does not get in.
        _ => return Err(DropReason::NotIpv4),
    }
    let Ok(ihl) = check_ipv4(ctx) else {
        return Ok(());
    };
    let (Ok(src), Ok(dst)) = (ctx.load::<u32>(OFF_IP_SRC), ctx.load::<u32>(OFF_IP_DST)) else {
        return Ok(());
    };
    let l4 = l4_of(ctx, ihl, src, dst);
    // SAFETY: copied out at once.
    let dst_ep = unsafe { ENDPOINTS.get(dst) }.copied();
    // The source pod's egress (if it is one of ours) was judged where it left its pod.
    enforce(&l4, None, dst_ep.as_ref())?;
    if let Some(flow) = l4.kernel_flow() {
        record_kernel_flow(&flow);
    }
    Ok(())
}

/// Uplink egress: records pod-sourced packets the kernel forwarded (unmarked); clears the mark of
/// the programs' own redirects. Never drops.
#[classifier]
pub fn uplink_egress(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & SKB_MARK_REDIRECTED != 0 {
        ctx.set_mark(mark & !SKB_MARK_REDIRECTED);
        return TC_ACT_UNSPEC;
    }
    let Ok(src) = ctx.load::<u32>(OFF_IP_SRC) else {
        return TC_ACT_UNSPEC;
    };
    // Node-originated and masqueraded traffic (source = a node address) is not a pod's.
    // SAFETY: presence check only.
    if unsafe { ENDPOINTS.get(src) }.is_some() {
        record_ipv4(&ctx);
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn record_ipv4(ctx: &TcContext) {
    let Ok(proto) = ctx.load::<u16>(OFF_ETH_PROTO) else {
        return;
    };
    if u16::from_be(proto) != ETH_P_IP {
        return;
    }
    let Ok(ihl) = check_ipv4(ctx) else {
        return;
    };
    let (Ok(src), Ok(dst)) = (ctx.load::<u32>(OFF_IP_SRC), ctx.load::<u32>(OFF_IP_DST)) else {
        return;
    };
    if let Some(flow) = l4_of(ctx, ihl, src, dst).kernel_flow() {
        record_kernel_flow(&flow);
    }
}

/// Answers "who has <pod ip>" with the uplink's MAC, rewriting the request in place.
fn arp_reply(ctx: &mut TcContext) -> Verdict {
    // htype=1 (Ethernet), ptype=0x0800, hlen=6, plen=4, oper=1 (request), all big-endian.
    let Ok(hdr) = ctx.load::<[u8; 8]>(OFF_ARP_HDR) else {
        return Ok(TC_ACT_OK);
    };
    if hdr != [0, 1, 8, 0, 6, 4, 0, 1] {
        return Ok(TC_ACT_OK);
    }
    let (Ok(sha), Ok(spa), Ok(tpa)) = (
        ctx.load::<[u8; 6]>(OFF_ARP_SHA),
        ctx.load::<u32>(OFF_ARP_SPA),
        ctx.load::<u32>(OFF_ARP_TPA),
    ) else {
        return Ok(TC_ACT_OK);
    };
    // A gratuitous announcement by someone else claiming the address is not a question.
    if spa == tpa {
        return Ok(TC_ACT_OK);
    }
    // SAFETY: presence check only.
    if unsafe { ENDPOINTS.get(tpa) }.is_none() {
        return Ok(TC_ACT_OK);
    }
    let cfg = config()?;
    let reply: u16 = 2u16.to_be();
    let m = |_| DropReason::Malformed;
    ctx.store(OFF_ETH_DST, &sha, 0).map_err(m)?;
    ctx.store(OFF_ETH_SRC, &cfg.uplink_mac, 0).map_err(m)?;
    ctx.store(OFF_ARP_OPER, &reply, 0).map_err(m)?;
    ctx.store(OFF_ARP_SHA, &cfg.uplink_mac, 0).map_err(m)?;
    ctx.store(OFF_ARP_SPA, &tpa, 0).map_err(m)?;
    ctx.store(OFF_ARP_THA, &sha, 0).map_err(m)?;
    ctx.store(OFF_ARP_TPA, &spa, 0).map_err(m)?;
    count_node(NodeCounter::ArpReplies);
    // SAFETY: plain helper call; flags 0 = egress of the same uplink.
    let ret = unsafe { bpf_redirect(cfg.uplink_ifindex, 0) };
    if ret != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
