//! Packet parsing, and [`Packet`]: the per-packet context the stages of a program pass along.
//!
//! Only Ethernet + IPv4 is parsed. Header fields are read with `bpf_skb_load_bytes` (the
//! `TcContext::load` helper), so a short packet is an `Err`, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use vpcnet_common::{DropReason, EndpointInfo, FlowKey};

pub(crate) const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
pub(crate) const OFF_ETH_DST: usize = 0;
pub(crate) const OFF_ETH_SRC: usize = 6;
const OFF_ETH_PROTO: usize = 12;

const OFF_IP_VER_IHL: usize = ETH_HLEN;
/// frag_off(2) ttl(1) protocol(1), read as one word.
const OFF_IP_FRAG: usize = ETH_HLEN + 6;
pub(crate) const OFF_IP_TTL: usize = ETH_HLEN + 8;
pub(crate) const OFF_IP_CSUM: usize = ETH_HLEN + 10;
const OFF_IP_SRC: usize = ETH_HLEN + 12;
const OFF_IP_DST: usize = ETH_HLEN + 16;

const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const TCP_ACK: u8 = 0x10;
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
const OFF_TCP_FLAGS: usize = 13;

/// `skb->pkt_type` of frames addressed to this host (as opposed to broadcast, multicast, or frames
/// a bridge flooded to us that belong to someone else).
const PACKET_HOST: u32 = 0;

pub(crate) enum EtherType {
    Ipv4,
    Arp,
    Other,
}

/// The frame's EtherType; `None` for a runt frame.
#[inline(always)]
pub(crate) fn ethertype(ctx: &TcContext) -> Option<EtherType> {
    let proto: u16 = ctx.load(OFF_ETH_PROTO).ok()?;
    Some(match u16::from_be(proto) {
        ETH_P_IP => EtherType::Ipv4,
        ETH_P_ARP => EtherType::Arp,
        _ => EtherType::Other,
    })
}

/// The IPv4 source field, read without validating anything (a cheap pre-filter).
#[inline(always)]
pub(crate) fn ipv4_src(ctx: &TcContext) -> Option<u32> {
    ctx.load(OFF_IP_SRC).ok()
}

/// The IPv4 destination field, read without validating anything (a cheap pre-filter).
#[inline(always)]
pub(crate) fn ipv4_dst(ctx: &TcContext) -> Option<u32> {
    ctx.load(OFF_IP_DST).ok()
}

#[inline(always)]
pub(crate) fn addressed_to_host(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the context.
    unsafe { (*ctx.skb.skb).pkt_type == PACKET_HOST }
}

/// One IPv4 packet on its way through a program: parsed once, then read (and for the
/// forwarding stages rewritten, through `ctx`) by each stage in turn — policy with its
/// conntrack, kernel flows, forwarding. The endpoints are filled in by the program, which knows
/// which sides it may trust to be local pods.
pub(crate) struct Packet {
    pub(crate) ctx: TcContext,
    pub(crate) l4: L4,
    /// The sender, when it is an endpoint of this node the program has authenticated.
    pub(crate) src_ep: Option<EndpointInfo>,
    /// The receiver, when it is an endpoint of this node.
    pub(crate) dst_ep: Option<EndpointInfo>,
}

/// What policy, conntrack and the kernel-flow table need of an IPv4 packet.
pub(crate) struct L4 {
    /// The tuple as the packet carries it. Ports in network byte order; ICMP echo carries its
    /// identifier as both ports; 0 where the protocol has no ports or this fragment does not
    /// carry them.
    pub(crate) key: FlowKey,
    /// TCP flags; 0 for other protocols.
    pub(crate) tcp_flags: u8,
    /// The tuple identifies a connection (conntrack applies).
    pub(crate) tracked: bool,
    /// A packet that may open a connection: TCP SYN without ACK, any UDP/SCTP packet, an ICMP
    /// echo request. Only these create conntrack entries, so a reply cannot open the way for
    /// the direction it answers.
    pub(crate) opens: bool,
}

impl Packet {
    /// Parses an IPv4 packet (the caller has checked the EtherType). `Malformed` when the
    /// header is not one this program can read and rewrite; a missing or truncated L4 header is
    /// not an error (the packet is judged with ports 0 and not tracked).
    #[inline(always)]
    pub(crate) fn parse(ctx: TcContext) -> Result<Self, DropReason> {
        let ihl = check_ipv4(&ctx)?;
        let src: u32 = ctx.load(OFF_IP_SRC).map_err(|_| DropReason::Malformed)?;
        let dst: u32 = ctx.load(OFF_IP_DST).map_err(|_| DropReason::Malformed)?;
        let mut pkt = Packet {
            ctx,
            l4: L4 {
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
            },
            src_ep: None,
            dst_ep: None,
        };
        pkt.parse_l4(ihl);
        Ok(pkt)
    }

    #[inline(always)]
    fn parse_l4(&mut self, ihl: usize) {
        let ctx = &self.ctx;
        let Ok(w) = ctx.load::<[u8; 4]>(OFF_IP_FRAG) else {
            return;
        };
        let proto = w[3];
        self.l4.key.proto = proto;
        if (w[0] & 0x1f) != 0 || w[1] != 0 {
            // A non-first fragment: no ports. Judged with port 0.
            return;
        }
        let l4 = ETH_HLEN + ihl;
        match proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
                let Ok(ports) = ctx.load::<[u16; 2]>(l4) else {
                    return;
                };
                self.l4.key.sport = ports[0];
                self.l4.key.dport = ports[1];
                if proto == IPPROTO_TCP {
                    let Ok(flags) = ctx.load::<u8>(l4 + OFF_TCP_FLAGS) else {
                        return;
                    };
                    self.l4.tcp_flags = flags;
                    self.l4.opens = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                } else {
                    self.l4.opens = true;
                }
                self.l4.tracked = true;
            }
            IPPROTO_ICMP => {
                let (Ok(ty), Ok(id)) = (ctx.load::<u8>(l4), ctx.load::<u16>(l4 + 4)) else {
                    return;
                };
                if ty == ICMP_ECHO_REQUEST || ty == ICMP_ECHO_REPLY {
                    self.l4.key.sport = id;
                    self.l4.key.dport = id;
                    self.l4.tracked = true;
                    self.l4.opens = ty == ICMP_ECHO_REQUEST;
                }
            }
            _ => {}
        }
    }

    #[inline(always)]
    pub(crate) fn src(&self) -> u32 {
        self.l4.key.src
    }

    #[inline(always)]
    pub(crate) fn dst(&self) -> u32 {
        self.l4.key.dst
    }

    /// The tuple of the packets that answer this one.
    #[inline(always)]
    pub(crate) fn reply_key(&self) -> FlowKey {
        FlowKey {
            src: self.l4.key.dst,
            dst: self.l4.key.src,
            sport: self.l4.key.dport,
            dport: self.l4.key.sport,
            proto: self.l4.key.proto,
            _pad: [0; 3],
        }
    }
}

/// Validates the IPv4 header enough for the fields the programs read and rewrite; returns the
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
