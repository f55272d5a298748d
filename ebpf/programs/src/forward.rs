//! Forwarding: where a packet the policy stage let through goes, and the rewrites on the way.

use vpcnet_common::{
    DropReason, EndpointInfo, NODE_SCOPE, NodeCounter, ROUTE_DIRECT, ROUTE_HOST, ROUTE_ISOLATED,
    ROUTE_LOCAL_BLOCK, SKB_MARK_REDIRECTED,
};

use crate::{
    action::{Action, Redirect, Verdict},
    counters::{count_delivered, count_node},
    packet::{OFF_ETH_DST, OFF_ETH_SRC, OFF_IP_CSUM, OFF_IP_TTL, Packet},
    topology::{config, peered, route},
};

/// The fixed MAC of every host veth (vpcnet_api::HOST_VETH_MAC); pods address their gateway with it.
const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// A packet from the local pod `src_ep`: to another local pod, out of the uplink to a
/// routable destination (source kept), or to the kernel (node addresses, and the internet
/// through vpcnet's nftables masquerade).
#[inline(always)]
pub(crate) fn from_pod(pkt: &mut Packet, src_ep: &EndpointInfo) -> Verdict {
    let dst = pkt.dst();
    if let Some(dst_ep) = pkt.dst_ep {
        if !peered(src_ep.network_id, dst_ep.network_id) {
            return Err(DropReason::Isolated);
        }
        count_node(NodeCounter::PodToPod);
        return deliver(pkt, &dst_ep);
    }

    match route(NODE_SCOPE, dst) {
        Some(ROUTE_LOCAL_BLOCK) => return Err(DropReason::NoEndpoint),
        Some(ROUTE_HOST) => {
            count_node(NodeCounter::PodToKernel);
            return Ok(Action::Pass);
        }
        _ => {}
    }

    match route(src_ep.network_id, dst) {
        Some(ROUTE_DIRECT) => {
            let cfg = config()?;
            decrement_ttl(pkt)?;
            count_node(NodeCounter::PodToUplink);
            // Tells uplink_egress this one is ours, not kernel-forwarded.
            // SAFETY: reading a field of the context.
            let mark = unsafe { (*pkt.ctx.skb.skb).mark };
            pkt.ctx.set_mark(mark | SKB_MARK_REDIRECTED);
            // The kernel resolves the neighbour and fills in both MACs itself.
            Ok(Action::Redirect(Redirect::Neigh(cfg.uplink_ifindex)))
        }
        Some(ROUTE_ISOLATED) => Err(DropReason::Isolated),
        _ => {
            // Not a VPC destination: the kernel forwards it and nftables masquerades it.
            count_node(NodeCounter::PodToKernel);
            Ok(Action::Pass)
        }
    }
}

/// For a packet with no endpoint at its destination: inside this node's pod blocks there is
/// nothing else, so it is dropped; anything else is the kernel's.
#[inline(always)]
pub(crate) fn no_endpoint(dst: u32) -> Verdict {
    // Without this the kernel would route a packet for a departed pod back out of the uplink
    // (default route) and bounce it around the fabric until its TTL ran out.
    if route(NODE_SCOPE, dst) == Some(ROUTE_LOCAL_BLOCK) {
        return Err(DropReason::NoEndpoint);
    }
    Ok(Action::Pass)
}

/// Hands the packet to the local pod `ep`: MACs as the pod expects from its gateway, then
/// straight into the pod's netns (no second pass through the host stack).
#[inline(always)]
pub(crate) fn deliver(pkt: &mut Packet, ep: &EndpointInfo) -> Verdict {
    decrement_ttl(pkt)?;
    let ctx = &pkt.ctx;
    ctx.store(OFF_ETH_DST, &ep.mac, 0)
        .map_err(|_| DropReason::Malformed)?;
    ctx.store(OFF_ETH_SRC, &HOST_VETH_MAC, 0)
        .map_err(|_| DropReason::Malformed)?;
    count_delivered(pkt.dst(), ctx.len());
    Ok(Action::Redirect(Redirect::Peer(ep.ifindex)))
}

/// One routing hop: TTL - 1 with the header checksum patched incrementally.
#[inline(always)]
fn decrement_ttl(pkt: &mut Packet) -> Result<(), DropReason> {
    let ctx = &pkt.ctx;
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
