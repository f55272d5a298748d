//! What the daemon tells the programs about the node and its networks: the local endpoints, the
//! routes per network, which networks are peered, and the node's uplink.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};
use vpcnet_common::{
    DropReason, EndpointInfo, MAX_ENDPOINTS, MAX_PEERS, MAX_ROUTES, NodeConfig, PeerKey, RouteKey,
    RouteValue,
};

#[map]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);

#[map]
static ROUTES: LpmTrie<RouteKey, RouteValue> = LpmTrie::pinned(MAX_ROUTES, 0);

#[map]
static PEERS: HashMap<PeerKey, u32> = HashMap::pinned(MAX_PEERS, 0);

#[map]
static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// The local endpoint with address `ip`, copied out.
#[inline(always)]
pub(crate) fn endpoint(ip: u32) -> Option<EndpointInfo> {
    // SAFETY: the entry is copied out at once; userspace replaces values whole.
    unsafe { ENDPOINTS.get(ip) }.copied()
}

#[inline(always)]
pub(crate) fn is_endpoint(ip: u32) -> bool {
    // SAFETY: presence check only.
    unsafe { ENDPOINTS.get(ip) }.is_some()
}

/// The `ROUTE_*` action of the longest prefix of `network`'s routes that holds `addr`.
#[inline(always)]
pub(crate) fn route(network: u16, addr: u32) -> Option<u32> {
    let key = Key::new(32 + 32, RouteKey::new(network, addr));
    ROUTES.get(&key).map(|v| v.action)
}

#[inline(always)]
pub(crate) fn peered(a: u16, b: u16) -> bool {
    // SAFETY: the value is not dereferenced beyond a presence check.
    a == b || unsafe { PEERS.get(PeerKey { src: a, dst: b }) }.is_some()
}

#[inline(always)]
pub(crate) fn config() -> Result<NodeConfig, DropReason> {
    CONFIG
        .get(0)
        .copied()
        .filter(|c| c.uplink_ifindex != 0)
        .ok_or(DropReason::NotConfigured)
}
