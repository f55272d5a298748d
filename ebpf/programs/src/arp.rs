//! ARP on the uplink: the node answers for its pods, as a cloud NIC does for its secondary
//! addresses, so the VPC fabric reaches every pod directly.

use aya_ebpf::programs::TcContext;
use vpcnet_common::{DropReason, NodeCounter};

use crate::{
    action::{Action, Redirect, Verdict},
    counters::count_node,
    packet::{ETH_HLEN, OFF_ETH_DST, OFF_ETH_SRC},
    topology::{config, is_endpoint},
};

const OFF_ARP_HDR: usize = ETH_HLEN; // htype(2) ptype(2) hlen(1) plen(1) oper(2)
const OFF_ARP_OPER: usize = ETH_HLEN + 6;
const OFF_ARP_SHA: usize = ETH_HLEN + 8;
const OFF_ARP_SPA: usize = ETH_HLEN + 14;
const OFF_ARP_THA: usize = ETH_HLEN + 18;
const OFF_ARP_TPA: usize = ETH_HLEN + 24;

/// Answers "who has <pod ip>" with the uplink's MAC, rewriting the request in place and sending
/// it back out; everything else passes to the kernel.
#[inline(always)]
pub(crate) fn reply(ctx: &mut TcContext) -> Verdict {
    // htype=1 (Ethernet), ptype=0x0800, hlen=6, plen=4, oper=1 (request), all big-endian.
    let Ok(hdr) = ctx.load::<[u8; 8]>(OFF_ARP_HDR) else {
        return Ok(Action::Pass);
    };
    if hdr != [0, 1, 8, 0, 6, 4, 0, 1] {
        return Ok(Action::Pass);
    }
    let (Ok(sha), Ok(spa), Ok(tpa)) = (
        ctx.load::<[u8; 6]>(OFF_ARP_SHA),
        ctx.load::<u32>(OFF_ARP_SPA),
        ctx.load::<u32>(OFF_ARP_TPA),
    ) else {
        return Ok(Action::Pass);
    };
    // A gratuitous announcement by someone else claiming the address is not a question.
    if spa == tpa {
        return Ok(Action::Pass);
    }
    if !is_endpoint(tpa) {
        return Ok(Action::Pass);
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
    Ok(Action::Redirect(Redirect::Egress(cfg.uplink_ifindex)))
}
