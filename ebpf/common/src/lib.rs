#![no_std]
//! Map key/value layouts shared by the eBPF programs and vpcnetd. Every type is `#[repr(C)]` with
//! explicit padding so both sides agree byte for byte.
//!
//! Addresses are stored exactly as they sit in the packet (network byte order read as a native
//! `u32`), so the programs never byte-swap on the fast path; userspace converts with
//! [`ip_key`].

/// Reasons a program drops a packet; the index into the `DROPS` per-CPU array. A program never
/// returns `TC_ACT_SHOT` without bumping one of these, so every loss is visible in `vpcnetctl`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not Ethernet/IPv4 where IPv4 was required, or headers shorter than they claim.
    Malformed = 0,
    /// Source and destination belong to virtual networks that are not peered.
    Isolated = 1,
    /// Destination is inside this node's pod blocks but no endpoint has that address.
    NoEndpoint = 2,
    /// A redirect helper refused the packet (e.g. the target interface vanished).
    RedirectFailed = 3,
    /// TTL would reach zero on this hop.
    TtlExceeded = 4,
    /// A pod sent from an address that is not its own (or from an interface that is not its).
    Spoofed = 5,
    /// The node configuration map is empty: the daemon has not finished `start`.
    NotConfigured = 6,
    /// NetworkPolicy: the destination pod is isolated for ingress and nothing allows this peer.
    PolicyIngress = 7,
    /// NetworkPolicy: the source pod is isolated for egress and nothing allows this destination.
    PolicyEgress = 8,
    /// Neither IPv4 nor ARP, on a pod's host veth (from the pod, or towards it). Pods are
    /// IPv4-only and policy only understands IPv4: IPv6 (or anything else) passed to the kernel
    /// would bypass isolation and policy wherever the node forwards it.
    NotIpv4 = 9,
    MaxReason = 10,
}

pub const DROP_REASONS: u32 = DropReason::MaxReason as u32;

pub const DROP_REASON_NAMES: [&str; DROP_REASONS as usize] = [
    "malformed",
    "isolated",
    "no-endpoint",
    "redirect-failed",
    "ttl-exceeded",
    "spoofed",
    "not-configured",
    "policy-ingress",
    "policy-egress",
    "not-ipv4",
];

/// Node-wide event counters (index into the `NODE_STATS` per-CPU array): where traffic went, so a
/// test or an operator can tell the eBPF path from the kernel path.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeCounter {
    /// ARP requests for a local pod answered on the uplink.
    ArpReplies = 0,
    /// Pod to pod on this node (`bpf_redirect_peer`).
    PodToPod = 1,
    /// Pod to a routable destination (`bpf_redirect_neigh` out of the uplink).
    PodToUplink = 2,
    /// Pod traffic handed to the kernel (node addresses, masqueraded internet traffic).
    PodToKernel = 3,
    /// Uplink to a local pod (`bpf_redirect_peer`).
    UplinkToPod = 4,
    /// A pod's packet (host-veth ingress) or a packet for a pod (uplink ingress) handed to the
    /// kernel because its flow is in `KERNEL_FLOWS` (the kernel holds NAT state for it).
    KernelFlowHits = 5,
    /// New `KERNEL_FLOWS` entries written by the egress recorders.
    KernelFlowsRecorded = 6,
    /// `KERNEL_FLOWS` inserts the kernel refused (LRU free list exhausted under contention).
    KernelFlowRecordFailed = 7,
    /// A TCP SYN on a recorded tuple that the kernel had not seen open: a new connection reusing
    /// a stale entry's 5-tuple, so the entry was removed and the packet forwarded by the programs.
    KernelFlowStale = 8,
    /// New `CONNTRACK` entries (each allowed new connection writes two: one per direction).
    CtCreated = 9,
    /// `CONNTRACK` inserts the kernel refused. The connection's packets still pass (their policy
    /// verdict was "allowed"); its replies are judged by policy again and may be dropped.
    CtInsertFailed = 10,
    /// Packets passed by a live `CONNTRACK` entry instead of a policy lookup.
    CtHits = 11,
    /// Packets of an established connection judged again after a policy narrowed (`POLICY_EPOCH`
    /// moved on since the entry was written).
    CtRevalidated = 12,
    MaxCounter = 13,
}

pub const NODE_COUNTERS: u32 = NodeCounter::MaxCounter as u32;

pub const NODE_COUNTER_NAMES: [&str; NODE_COUNTERS as usize] = [
    "arp-replies",
    "pod-to-pod",
    "pod-to-uplink",
    "pod-to-kernel",
    "uplink-to-pod",
    "kernel-flow-hits",
    "kernel-flows-recorded",
    "kernel-flow-record-failed",
    "kernel-flow-stale",
    "ct-created",
    "ct-insert-failed",
    "ct-hits",
    "ct-revalidated",
];

/// Value of `ENDPOINTS`, keyed by the pod address ([`ip_key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Host-side veth, the target of `bpf_redirect_peer`.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub network_id: u16,
    pub flags: u32,
    /// NetworkPolicy state: [`POLICY_INGRESS_OPEN`] / [`POLICY_EGRESS_OPEN`]. A direction whose bit
    /// is clear is isolated: only what the policy maps allow passes (nothing, if they hold no
    /// entry for the endpoint). So a record written without policy knowledge denies everything
    /// — fail closed.
    pub policy: u32,
}

/// `EndpointInfo::policy`: no NetworkPolicy selects the pod for ingress.
pub const POLICY_INGRESS_OPEN: u32 = 1;
/// `EndpointInfo::policy`: no NetworkPolicy selects the pod for egress.
pub const POLICY_EGRESS_OPEN: u32 = 2;
pub const POLICY_OPEN: u32 = POLICY_INGRESS_OPEN | POLICY_EGRESS_OPEN;

/// `EndpointInfo::flags`: the endpoint program sits on the host veth as a classic clsact filter
/// (not a pinned TCX link). Recorded in the pinned map so a restarted daemon knows how to update it.
pub const EP_FLAG_TC_CLASSIC: u32 = 1;
/// `EndpointInfo::flags`: the observer program (`endpoint_egress`) sits on the host veth's egress
/// as a classic clsact filter. Normally set together with [`EP_FLAG_TC_CLASSIC`].
pub const EP_FLAG_EGRESS_TC_CLASSIC: u32 = 2;

/// Per-endpoint traffic counters (`ENDPOINT_STATS`, per CPU, keyed like `ENDPOINTS`). `tx` is what
/// the pod sent, `rx` what was delivered to it by the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// Data part of the `ROUTES` LPM key. The network id is always matched in full (the prefix length
/// stored with it is `32 + cidr prefix`), so one trie holds every network's view of the world.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteKey {
    /// Big-endian network id; [`NODE_SCOPE`] for node-wide entries.
    pub network: u32,
    pub addr: u32,
}

impl RouteKey {
    pub const fn new(network: u16, addr: u32) -> Self {
        RouteKey {
            network: (network as u32).to_be(),
            addr,
        }
    }
}

/// Pseudo network id of node-wide `ROUTES` entries (own pod blocks, node addresses); real network
/// ids start at 1.
pub const NODE_SCOPE: u16 = 0;

/// Leave through the uplink with `bpf_redirect_neigh`, source address kept.
pub const ROUTE_DIRECT: u32 = 1;
/// Another virtual network's range: drop (reason `isolated`).
pub const ROUTE_ISOLATED: u32 = 2;
/// (node scope) One of this node's pod blocks: only endpoints live there.
pub const ROUTE_LOCAL_BLOCK: u32 = 3;
/// (node scope) An address of the node itself: the kernel's to deliver.
pub const ROUTE_HOST: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteValue {
    pub action: u32,
    pub flags: u32,
}

/// Single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub uplink_ifindex: u32,
    pub uplink_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// `PEERS` key: an ordered pair of network ids; present (value 1) when pods of `src` may reach pods
/// of `dst`. Userspace always writes both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    pub src: u16,
    pub dst: u16,
}

/// `KERNEL_FLOWS` key: a TCP/UDP 5-tuple exactly as the packets the lookup is done for carry it
/// (addresses and ports in network byte order). The recorders store the *reverse* of the packet
/// they see, i.e. the tuple of the reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `KERNEL_FLOWS` value. Times are `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// The entry is ignored from this moment on (idle timeout, refreshed by traffic both ways).
    pub expires_ns: u64,
    /// Last time a recorder saw a TCP SYN of this flow go through the kernel (0 = never).
    pub syn_ns: u64,
    /// Last time a TCP FIN or RST of this flow was seen, either way (0 = never).
    pub fin_ns: u64,
}

/// Idle timeout of a TCP `KERNEL_FLOWS` entry: conntrack's default for established flows
/// (`nf_conntrack_tcp_timeout_established`), so an entry never expires before the kernel's NAT
/// state does. Stale entries cannot capture a new connection (see [`KERNEL_FLOW_SYN_WINDOW_NS`]).
pub const KERNEL_FLOW_TCP_TIMEOUT_NS: u64 = 432_000 * 1_000_000_000;
/// Idle timeout of a UDP entry: a little above conntrack's `nf_conntrack_udp_timeout_stream`
/// (120 s), so the kernel's NAT state goes first.
pub const KERNEL_FLOW_UDP_TIMEOUT_NS: u64 = 180 * 1_000_000_000;
/// A TCP SYN (or SYN-ACK) looked up on the fast path matches an entry only if a recorder saw a
/// SYN of the flow pass through the kernel this recently, and after the flow's last FIN/RST;
/// otherwise the tuple is being reused by a connection the kernel never saw open, and the entry
/// is dropped. 60 s covers the whole SYN-ACK retransmission schedule (1+2+4+8+16 s).
pub const KERNEL_FLOW_SYN_WINDOW_NS: u64 = 60 * 1_000_000_000;

/// Direction byte of the policy keys.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Remote identities (the compile layer's numbers): entries under `ID_ANY` apply to every peer;
/// `ID_HOST` is the local node (one of its own addresses); `ID_WORLD` is any address that is
/// neither a known pod nor the node, and keys no entry.
pub const ID_ANY: u32 = 0;
pub const ID_HOST: u32 = 1;
pub const ID_WORLD: u32 = 2;
/// Remote "identities" at and above this value name a port set reached through `POLICY_CIDRS`
/// (an ipBlock's prefix → this number → `POLICY` entries), never a pod.
pub const CIDR_SET_BASE: u32 = 0x8000_0000;

/// Data part of the `POLICY` LPM key: what an endpoint allows in one direction. Endpoint, remote
/// and direction are always matched in full; after them the key may stop (prefix
/// [`POLICY_PREFIX_ANY_PROTO`]: every protocol and port, ICMP included), stop after the protocol
/// ([`POLICY_PREFIX_PROTO`]: every port of it), or cover an aligned block of ports
/// (`POLICY_PREFIX_PROTO + n`, the port's first n bits). So a rule with a port range costs a few
/// entries and the lookup one trie walk, whatever the number of rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The endpoint's address ([`ip_key`]).
    pub endpoint: u32,
    /// Remote identity (native order; only ever matched in full).
    pub remote: u32,
    pub dir: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Network byte order, as in the packet: prefixes of it are port blocks.
    pub port: u16,
}

pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
pub const POLICY_PREFIX_PROTO: u32 = 80;

/// Data part of the `POLICY_CIDRS` LPM key (prefix `64 + cidr prefix length`). The value is the
/// port-set number ([`CIDR_SET_BASE`] + n) to look up in `POLICY` as the remote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyCidrKey {
    pub endpoint: u32,
    pub dir: u8,
    pub _pad: [u8; 3],
    /// As in the packet ([`ip_key`]).
    pub addr: u32,
}

pub const POLICY_CIDR_PREFIX_BASE: u32 = 64;

/// `CONNTRACK` value. The key is a [`FlowKey`] as the packet it matches carries it; ICMP echo
/// uses the identifier as both ports so a request and its reply are each other's reverse.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns` after which the entry is ignored.
    pub expires_ns: u64,
    /// `POLICY_EPOCH` when the connection was last judged by policy.
    pub epoch: u32,
    /// [`CT_REPLY`] when the key is the reply direction of the connection.
    pub flags: u32,
}

pub const CT_REPLY: u32 = 1;
/// Idle timeouts, as Cilium's defaults: established TCP 6 h, closing TCP 10 s, others 60 s.
pub const CT_TCP_TIMEOUT_NS: u64 = 21_600 * 1_000_000_000;
pub const CT_CLOSING_TIMEOUT_NS: u64 = 10 * 1_000_000_000;
pub const CT_OTHER_TIMEOUT_NS: u64 = 60 * 1_000_000_000;

/// `skb->mark` bit `endpoint_ingress` sets on the packets it `bpf_redirect_neigh`s to the uplink,
/// so `uplink_egress` can tell them from pod packets the kernel forwarded (and clears it again:
/// the bit never leaves the node nor reaches netfilter, which redirected packets bypass).
pub const SKB_MARK_REDIRECTED: u32 = 0x0400_0000;

/// The map key of an IPv4 address given as its four octets.
pub const fn ip_key(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

pub const MAX_ENDPOINTS: u32 = 16384;
pub const MAX_ROUTES: u32 = 16384;
pub const MAX_PEERS: u32 = 4096;
/// Flows the kernel has NAT state for, per node (LRU: the least recently used entry makes room).
pub const MAX_KERNEL_FLOWS: u32 = 65536;
/// Policy entries per node (an LPM trie allocates only what is used).
pub const MAX_POLICY_ENTRIES: u32 = 1 << 20;
pub const MAX_POLICY_CIDRS: u32 = 1 << 18;
/// Pod address → identity, cluster-wide.
pub const MAX_IDENTITIES: u32 = 1 << 18;
/// Connections of policy-selected local pods (two entries each; LRU: the least recently used
/// makes room, so a full map evicts idle flows instead of refusing new ones).
pub const MAX_CONNTRACK: u32 = 1 << 17;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): plain-old-data, repr(C), every byte is a declared field (no padding holes that
    // could leak uninitialised bytes into the kernel).
    unsafe impl aya::Pod for super::EndpointStats {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::RouteKey {}
    unsafe impl aya::Pod for super::RouteValue {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyCidrKey {}
    unsafe impl aya::Pod for super::CtValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<EndpointInfo>(), 20);
        assert_eq!(size_of::<EndpointStats>(), 32);
        assert_eq!(size_of::<RouteKey>(), 8);
        assert_eq!(size_of::<RouteValue>(), 8);
        assert_eq!(size_of::<NodeConfig>(), 12);
        assert_eq!(size_of::<PeerKey>(), 4);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<FlowValue>(), 24);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyCidrKey>(), 12);
        assert_eq!(size_of::<CtValue>(), 16);
    }
}
