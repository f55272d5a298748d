//! Where traffic went: node-wide event counters and per-endpoint traffic counters. Drops are
//! counted elsewhere, by the only code that can drop ([`crate::action`]).

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use vpcnet_common::{EndpointStats, MAX_ENDPOINTS, NODE_COUNTERS, NodeCounter};

#[map]
static ENDPOINT_STATS: PerCpuHashMap<u32, EndpointStats> = PerCpuHashMap::pinned(MAX_ENDPOINTS, 0);

#[map]
static NODE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(NODE_COUNTERS, 0);

#[inline(always)]
pub(crate) fn count_node(counter: NodeCounter) {
    if let Some(slot) = NODE_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run, so there is no other writer.
        unsafe { *slot += 1 };
    }
}

/// A packet the pod at `ip` sent.
#[inline(always)]
pub(crate) fn count_sent(ip: u32, bytes: u32) {
    if let Some(stats) = ENDPOINT_STATS.get_ptr_mut(ip) {
        // SAFETY: per-CPU value, see count_node.
        unsafe {
            (*stats).tx_packets += 1;
            (*stats).tx_bytes += bytes as u64;
        }
    }
}

/// A packet the programs delivered to the pod at `ip`.
#[inline(always)]
pub(crate) fn count_delivered(ip: u32, bytes: u32) {
    if let Some(stats) = ENDPOINT_STATS.get_ptr_mut(ip) {
        // SAFETY: per-CPU value, see count_node.
        unsafe {
            (*stats).rx_packets += 1;
            (*stats).rx_bytes += bytes as u64;
        }
    }
}
