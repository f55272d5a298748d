#![no_std]
#![no_main]
//! vpcnet's tc (TCX) programs. This file holds the entry points and the order of their stages;
//! the stages live in the modules:
//!
//! * [`packet`]: parsing, and [`packet::Packet`], the per-packet context each stage reads (and
//!   the forwarding stages rewrite) in turn: parse → policy (with [`conntrack`]) →
//!   [`kernel_flows`] → [`forward`].
//! * [`action`]: what a program returns — [`action::Verdict`], an [`action::Action`] or a
//!   drop with its reason, made a tc return code in one place that counts every drop.
//! * [`topology`] (endpoints, routes, peerings, node config), [`policy`], [`conntrack`],
//!   [`kernel_flows`], [`forward`], [`arp`], [`counters`] (where traffic went).
//!
//! The programs:
//! * `endpoint_ingress` runs on every host-side veth (traffic *from* a pod) and forwards it:
//!   local pod → `bpf_redirect_peer`; routable destination → `bpf_redirect_neigh` out of the uplink,
//!   source kept; node address or internet → `TC_ACT_OK` (the kernel delivers it, or forwards it
//!   through vpcnet's nftables masquerade).
//! * `uplink_ingress` runs on the node's uplink: answers ARP for local pods (the VPC fabric reaches
//!   pods directly, like secondary IPs of a cloud NIC) and steers traffic for local pods straight
//!   into them.
//! * `endpoint_egress` (host veth, towards the pod) and `uplink_egress` (uplink, out of the node)
//!   never forward anything: they record flows the *kernel* carried to or from a pod in
//!   `KERNEL_FLOWS`, so the two forwarding programs hand the other direction of those flows to the
//!   kernel too (see [`kernel_flows`]). `endpoint_egress` also judges the pod's ingress policy
//!   for what the kernel delivers; `uplink_egress` never drops.
//! * Both host-veth programs drop what is neither IPv4 nor ARP (`not-ipv4`): pods are IPv4-only
//!   and policy judges IPv4 only. The uplink programs pass the node's own non-IPv4 traffic.
//! * NetworkPolicy: see [`policy`]; the forwarding programs judge egress where a packet leaves
//!   its pod and ingress where it reaches its pod.
//!
//! Every `TC_ACT_SHOT` is counted in `DROPS` under a reason (see [`action`]). All maps are
//! pinned (the loader gives the directory), so a daemon restart or program upgrade keeps every
//! entry and counter.

mod action;
mod arp;
mod clock;
mod conntrack;
mod counters;
mod forward;
mod kernel_flows;
mod packet;
mod policy;
mod topology;

use aya_ebpf::{macros::classifier, programs::TcContext};
use vpcnet_common::{DropReason, NodeCounter, ROUTE_ISOLATED, SKB_MARK_REDIRECTED};

use crate::{
    action::{Action, Verdict, finish},
    counters::{count_node, count_sent},
    packet::{EtherType, Packet},
};

#[classifier]
pub fn endpoint_ingress(ctx: TcContext) -> i32 {
    finish(from_pod(ctx))
}

#[inline(always)]
fn from_pod(ctx: TcContext) -> Verdict {
    match packet::ethertype(&ctx).ok_or(DropReason::Malformed)? {
        EtherType::Ipv4 => {}
        // The pod answers the node's ARP (the kernel's deliveries to it need its MAC).
        EtherType::Arp => return Ok(Action::Pass),
        // Pods are IPv4-only and policy judges IPv4 only: IPv6 (even link-local to the node)
        // and anything else would reach whatever the kernel forwards it to, unjudged.
        EtherType::Other => return Err(DropReason::NotIpv4),
    }
    let mut pkt = Packet::parse(ctx)?;

    let src_ep = topology::endpoint(pkt.src()).ok_or(DropReason::Spoofed)?;
    // SAFETY: reading a field of the context.
    let ingress = unsafe { (*pkt.ctx.skb.skb).ingress_ifindex };
    if src_ep.ifindex != ingress {
        return Err(DropReason::Spoofed);
    }
    count_sent(pkt.src(), pkt.ctx.len());
    pkt.src_ep = Some(src_ep);
    pkt.dst_ep = topology::endpoint(pkt.dst());

    // Egress at the pod, and ingress too when the destination is a pod of this node. Before
    // the kernel-flow check: replies of NATed flows are judged (by conntrack) like any other.
    policy::enforce(&pkt)?;

    // The reply of a flow the kernel NATed (hostPort, Service): conntrack must reverse it.
    if kernel_flows::carried(&pkt) {
        return Ok(Action::Pass);
    }

    forward::from_pod(&mut pkt, &src_ep)
}

#[classifier]
pub fn uplink_ingress(mut ctx: TcContext) -> i32 {
    match packet::ethertype(&ctx) {
        Some(EtherType::Arp) => finish(arp::reply(&mut ctx)),
        Some(EtherType::Ipv4) => finish(from_fabric(ctx)),
        // Runt frames and other protocols are the kernel's business on the uplink, not ours.
        Some(EtherType::Other) | None => finish(Ok(Action::Pass)),
    }
}

#[inline(always)]
fn from_fabric(ctx: TcContext) -> Verdict {
    if !packet::addressed_to_host(&ctx) {
        return Ok(Action::Pass);
    }
    let Some(dst) = packet::ipv4_dst(&ctx) else {
        return Ok(Action::Pass);
    };
    // Only endpoints live in this node's pod blocks.
    let Some(ep) = topology::endpoint(dst) else {
        return forward::no_endpoint(dst);
    };
    let mut pkt = Packet::parse(ctx)?;
    pkt.dst_ep = Some(ep);
    // A reply of a flow the kernel forwarded out for a pod (Service DNAT to a remote backend):
    // conntrack must reverse it before the pod sees it (`endpoint_egress` judges it then).
    if kernel_flows::carried(&pkt) {
        return Ok(Action::Pass);
    }
    // The wire carries no network id, so the receiving side enforces isolation too: a source
    // inside another, unpeered network's subnets is refused whatever the sender's node did.
    if topology::route(ep.network_id, pkt.src()) == Some(ROUTE_ISOLATED) {
        return Err(DropReason::Isolated);
    }
    // The sender's node judged its egress; ingress is judged here, where the pod lives.
    policy::enforce(&pkt)?;
    count_node(NodeCounter::UplinkToPod);
    forward::deliver(&mut pkt, &ep)
}

/// Host veth egress (towards the pod): every packet here was delivered by the kernel (the
/// programs' deliveries skip this hook), so its flow is the kernel's. Judges the pod's ingress
/// policy (the node's own traffic, hostPort DNAT, replies of masqueraded connections) and
/// records the flow.
#[classifier]
pub fn endpoint_egress(ctx: TcContext) -> i32 {
    finish(kernel_delivery(ctx))
}

#[inline(always)]
fn kernel_delivery(ctx: TcContext) -> Verdict {
    match packet::ethertype(&ctx).ok_or(DropReason::Malformed)? {
        EtherType::Ipv4 => {}
        // The node resolving the pod's MAC.
        EtherType::Arp => return Ok(Action::Next),
        // Fail closed towards the pod as well: what policy cannot judge does not get in.
        EtherType::Other => return Err(DropReason::NotIpv4),
    }
    // What cannot be parsed is not policy's to judge here: the kernel delivers only what its
    // own checks let through.
    let Ok(mut pkt) = Packet::parse(ctx) else {
        return Ok(Action::Next);
    };
    // The source pod's egress (if it is one of ours) was judged where it left its pod.
    pkt.dst_ep = topology::endpoint(pkt.dst());
    policy::enforce(&pkt)?;
    kernel_flows::record(&pkt);
    Ok(Action::Next)
}

/// Uplink egress: records pod-sourced packets the kernel forwarded (unmarked); clears the mark of
/// the programs' own redirects. Never drops.
#[classifier]
pub fn uplink_egress(ctx: TcContext) -> i32 {
    kernel_forward(ctx);
    finish(Ok(Action::Next))
}

#[inline(always)]
fn kernel_forward(ctx: TcContext) {
    // SAFETY: reading a field of the context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & SKB_MARK_REDIRECTED != 0 {
        ctx.set_mark(mark & !SKB_MARK_REDIRECTED);
        return;
    }
    // Node-originated and masqueraded traffic (source = a node address) is not a pod's.
    if !packet::ipv4_src(&ctx).is_some_and(topology::is_endpoint) {
        return;
    }
    if !matches!(packet::ethertype(&ctx), Some(EtherType::Ipv4)) {
        return;
    }
    if let Ok(pkt) = Packet::parse(ctx) {
        kernel_flows::record(&pkt);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
