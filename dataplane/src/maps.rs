//! Typed handles on the pinned maps, one type per map: its name, key/value types and size limit
//! in one place, taken out of the loaded object once at start ([`aya::Ebpf::take_map`]) so no
//! code path looks a map up by string or can get its key/value types wrong.
//!
//! [`LAYOUTS`] is what this build's programs expect of each pin; [`super::drop_incompatible_pins`]
//! compares the pins against it before the object is loaded.

use super::DataplaneError;
use aya::Ebpf;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap};
use vpcnet_common::{
    CtValue, DROP_REASONS, EndpointInfo, EndpointStats, FlowKey, FlowValue, MAX_CONNTRACK,
    MAX_ENDPOINTS, MAX_IDENTITIES, MAX_KERNEL_FLOWS, MAX_PEERS, MAX_POLICY_CIDRS,
    MAX_POLICY_ENTRIES, MAX_ROUTES, NODE_COUNTERS, NodeConfig, PeerKey, PolicyCidrKey, PolicyKey,
    RouteKey, RouteValue,
};

/// A map's shape as the programs of this build declare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub name: &'static str,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
}

/// LPM trie keys carry a 4-byte prefix length in front of the data.
const LPM: usize = 4;

macro_rules! typed_map {
    ($(#[$doc:meta])* $ty:ident = $name:literal: $handle:ty,
        key $key:expr, value $value:expr, max $max:expr) => {
        $(#[$doc])*
        pub struct $ty(pub $handle);

        impl $ty {
            pub const LAYOUT: Layout = Layout {
                name: $name,
                key_size: $key,
                value_size: $value,
                max_entries: $max,
            };

            /// Moves the map out of the loaded object (once: a second take finds nothing).
            pub fn take(bpf: &mut Ebpf) -> Result<Self, DataplaneError> {
                let map = bpf.take_map($name).ok_or(DataplaneError::Missing($name))?;
                Ok($ty(map.try_into()?))
            }
        }
    };
}

typed_map!(
    /// Pod address → its record (host veth, MAC, network, attach flags, policy bits).
    Endpoints = "ENDPOINTS": HashMap<MapData, u32, EndpointInfo>,
    key 4, value size_of::<EndpointInfo>(), max MAX_ENDPOINTS
);
typed_map!(
    /// Per-CPU packet/byte counters per pod address.
    EndpointStatsMap = "ENDPOINT_STATS": PerCpuHashMap<MapData, u32, EndpointStats>,
    key 4, value size_of::<EndpointStats>(), max MAX_ENDPOINTS
);
typed_map!(
    /// (network, prefix) → forwarding action.
    Routes = "ROUTES": LpmTrie<MapData, RouteKey, RouteValue>,
    key LPM + size_of::<RouteKey>(), value size_of::<RouteValue>(), max MAX_ROUTES
);
typed_map!(
    /// Peered network pairs.
    Peers = "PEERS": HashMap<MapData, PeerKey, u32>,
    key size_of::<PeerKey>(), value 4, max MAX_PEERS
);
typed_map!(
    /// The node's uplink (one entry).
    Config = "CONFIG": Array<MapData, NodeConfig>,
    key 4, value size_of::<NodeConfig>(), max 1
);
typed_map!(
    /// Drops by reason (index into `DROP_REASON_NAMES`).
    Drops = "DROPS": PerCpuArray<MapData, u64>,
    key 4, value 8, max DROP_REASONS
);
typed_map!(
    /// Node-wide event counters (index into `NODE_COUNTER_NAMES`).
    NodeStats = "NODE_STATS": PerCpuArray<MapData, u64>,
    key 4, value 8, max NODE_COUNTERS
);
typed_map!(
    /// NetworkPolicy rules (LPM over endpoint, remote, direction, protocol, port).
    Policy = "POLICY": LpmTrie<MapData, PolicyKey, u32>,
    key LPM + size_of::<PolicyKey>(), value 4, max MAX_POLICY_ENTRIES
);
typed_map!(
    /// ipBlock prefixes → port-set number.
    PolicyCidrs = "POLICY_CIDRS": LpmTrie<MapData, PolicyCidrKey, u32>,
    key LPM + size_of::<PolicyCidrKey>(), value 4, max MAX_POLICY_CIDRS
);
typed_map!(
    /// Address → security identity.
    Identities = "IDENTITIES": HashMap<MapData, u32, u32>,
    key 4, value 4, max MAX_IDENTITIES
);
typed_map!(
    /// Bumped when policy narrows: established connections are judged again.
    PolicyEpoch = "POLICY_EPOCH": Array<MapData, u32>,
    key 4, value 4, max 1
);

/// Maps the programs own alone (userspace only reads them through their pins, without a
/// handle): listed for the layout check.
pub const KERNEL_FLOWS: Layout = Layout {
    name: "KERNEL_FLOWS",
    key_size: size_of::<FlowKey>(),
    value_size: size_of::<FlowValue>(),
    max_entries: MAX_KERNEL_FLOWS,
};
pub const CONNTRACK: Layout = Layout {
    name: "CONNTRACK",
    key_size: size_of::<FlowKey>(),
    value_size: size_of::<CtValue>(),
    max_entries: MAX_CONNTRACK,
};

/// Every pinned map, as this build's programs expect it. A pin with another layout (left by an
/// incompatible older release) is replaced rather than reused, since a program reading a
/// differently-shaped value would misforward (and a counter array too short for a new counter
/// would silently not count).
pub const LAYOUTS: [Layout; 13] = [
    Endpoints::LAYOUT,
    EndpointStatsMap::LAYOUT,
    Routes::LAYOUT,
    Peers::LAYOUT,
    Config::LAYOUT,
    Drops::LAYOUT,
    NodeStats::LAYOUT,
    KERNEL_FLOWS,
    Policy::LAYOUT,
    PolicyCidrs::LAYOUT,
    Identities::LAYOUT,
    PolicyEpoch::LAYOUT,
    CONNTRACK,
];

/// The maps whose content is the compiled policy: recreating one of them loses rules, which the
/// next policy sync writes again.
pub const POLICY_MAPS: [&str; 3] = [
    Policy::LAYOUT.name,
    PolicyCidrs::LAYOUT.name,
    Identities::LAYOUT.name,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_is_listed_once() {
        let mut names: Vec<&str> = LAYOUTS.iter().map(|l| l.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), LAYOUTS.len());
        assert!(
            LAYOUTS
                .iter()
                .all(|l| l.key_size > 0 && l.value_size > 0 && l.max_entries > 0)
        );
    }
}
