//! Kernel flows: flows the kernel carried, which must keep going through the kernel both ways.
//!
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
//!
//! [`SKB_MARK_REDIRECTED`]: vpcnet_common::SKB_MARK_REDIRECTED

use aya_ebpf::{macros::map, maps::LruHashMap};
use vpcnet_common::{
    FlowKey, FlowValue, KERNEL_FLOW_SYN_WINDOW_NS, KERNEL_FLOW_TCP_TIMEOUT_NS,
    KERNEL_FLOW_UDP_TIMEOUT_NS, MAX_KERNEL_FLOWS, NodeCounter,
};

use crate::{
    clock::{REFRESH_NS, now_ns},
    counters::count_node,
    packet::{IPPROTO_TCP, IPPROTO_UDP, Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Reply tuples of flows the kernel carried.
#[map]
static KERNEL_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(MAX_KERNEL_FLOWS, 0);

/// Whether the packet belongs to a flow this table can hold: a connection's TCP or UDP packet.
#[inline(always)]
fn applies(pkt: &Packet) -> bool {
    pkt.l4.tracked && (pkt.l4.key.proto == IPPROTO_TCP || pkt.l4.key.proto == IPPROTO_UDP)
}

#[inline(always)]
fn timeout(pkt: &Packet) -> u64 {
    if pkt.l4.key.proto == IPPROTO_TCP {
        KERNEL_FLOW_TCP_TIMEOUT_NS
    } else {
        KERNEL_FLOW_UDP_TIMEOUT_NS
    }
}

/// True when the packet's flow is one the kernel carried (and must keep carrying): a live
/// `KERNEL_FLOWS` entry. Refreshes the entry's expiry; drops it when a SYN shows the tuple is
/// being reused by a connection the kernel never saw open.
#[inline(always)]
pub(crate) fn carried(pkt: &Packet) -> bool {
    if !applies(pkt) {
        return false;
    }
    let Some(v) = KERNEL_FLOWS.get_ptr_mut(pkt.l4.key) else {
        return false;
    };
    let now = now_ns();
    // SAFETY: a value of the map; concurrent writers only store recent times, any of which is
    // fine (a torn or lost refresh delays expiry by at most a second's worth).
    let (expires, syn_ns, fin_ns) = unsafe { ((*v).expires_ns, (*v).syn_ns, (*v).fin_ns) };
    if expires <= now {
        return false;
    }
    if pkt.l4.tcp_flags & TCP_SYN != 0
        && (syn_ns <= fin_ns || now.saturating_sub(syn_ns) > KERNEL_FLOW_SYN_WINDOW_NS)
    {
        let _ = KERNEL_FLOWS.remove(pkt.l4.key);
        count_node(NodeCounter::KernelFlowStale);
        return false;
    }
    let fresh = now + timeout(pkt);
    // SAFETY: as above.
    unsafe {
        if fresh > expires + REFRESH_NS {
            (*v).expires_ns = fresh;
        }
        if pkt.l4.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*v).fin_ns = now;
        }
    }
    count_node(NodeCounter::KernelFlowHits);
    true
}

/// Records the reply tuple of a packet the kernel carried.
#[inline(always)]
pub(crate) fn record(pkt: &Packet) {
    if !applies(pkt) {
        return;
    }
    let key = pkt.reply_key();
    let now = now_ns();
    let expires = now + timeout(pkt);
    let syn = pkt.l4.tcp_flags & TCP_SYN != 0;
    let fin = pkt.l4.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    if let Some(v) = KERNEL_FLOWS.get_ptr_mut(key) {
        // SAFETY: see `carried`.
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
