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
    MaxReason = 7,
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
    MaxCounter = 5,
}

pub const NODE_COUNTERS: u32 = NodeCounter::MaxCounter as u32;

pub const NODE_COUNTER_NAMES: [&str; NODE_COUNTERS as usize] = [
    "arp-replies",
    "pod-to-pod",
    "pod-to-uplink",
    "pod-to-kernel",
    "uplink-to-pod",
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
    /// Reserved for the policy layer (0 = no policy).
    pub policy_id: u32,
}

/// `EndpointInfo::flags`: the endpoint program sits on the host veth as a classic clsact filter
/// (not a pinned TCX link). Recorded in the pinned map so a restarted daemon knows how to update it.
pub const EP_FLAG_TC_CLASSIC: u32 = 1;

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

/// The map key of an IPv4 address given as its four octets.
pub const fn ip_key(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

pub const MAX_ENDPOINTS: u32 = 16384;
pub const MAX_ROUTES: u32 = 16384;
pub const MAX_PEERS: u32 = 4096;

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
    }
}
