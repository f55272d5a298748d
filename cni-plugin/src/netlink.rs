//! Synchronous rtnetlink, just big enough for the plugin.
//!
//! A plugin invocation lives for milliseconds and does a handful of requests, so a blocking socket
//! with a request/ack loop is all we need; an async runtime would cost more start-up time than the
//! whole conversation with the kernel. A [`Netlink`] talks to the namespace it was opened in: open
//! one per namespace, from a thread that is inside it.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

/// Large enough for any single rtnetlink datagram (the kernel caps dump skbs well below this).
const RECV_BUF: usize = 64 * 1024;
const NLMSG_HDRLEN: usize = 16;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

#[derive(Debug, thiserror::Error)]
#[error("{op}: {cause}")]
pub struct NlError {
    pub op: String,
    pub errno: Option<i32>,
    cause: String,
}

impl NlError {
    fn kernel(op: &str, errno: i32, extack: Option<String>) -> Self {
        let mut cause = io::Error::from_raw_os_error(errno).to_string();
        if let Some(msg) = extack {
            cause = format!("{cause} ({msg})");
        }
        NlError {
            op: op.to_string(),
            errno: Some(errno),
            cause,
        }
    }

    fn io(op: &str, e: io::Error) -> Self {
        NlError {
            op: op.to_string(),
            errno: e.raw_os_error(),
            cause: e.to_string(),
        }
    }

    fn other(op: &str, cause: impl Into<String>) -> Self {
        NlError {
            op: op.to_string(),
            errno: None,
            cause: cause.into(),
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == Some(errno)
    }
}

/// One request of a batch: what it does (for error messages), the message, and its flags.
pub struct Req {
    op: String,
    msg: RouteNetlinkMessage,
    flags: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    /// IFLA_LINK: for a veth, its peer's ifindex (in the peer's namespace).
    pub peer: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neigh {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub mac: Option<Vec<u8>>,
    pub permanent: bool,
}

pub struct VethSpec<'a> {
    pub host: &'a str,
    pub host_mac: [u8; 6],
    pub peer: &'a str,
    pub peer_mac: [u8; 6],
    pub mtu: u32,
    /// Namespace the peer is created in, so it never appears in the node namespace.
    pub peer_netns: RawFd,
}

pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NlError> {
        let sock =
            Socket::new(NETLINK_ROUTE).map_err(|e| NlError::io("opening netlink socket", e))?;
        // Extended acks carry the kernel's reason for an EINVAL and friends; capped acks stop it
        // echoing our whole request back. Both are optional niceties, so failures are ignored.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        Ok(Netlink {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends all requests in one datagram and waits for every ack. The kernel runs them in order
    /// and keeps going after a failure, so the first failure in request order is the one reported.
    pub fn apply(&mut self, reqs: Vec<Req>) -> Result<(), NlError> {
        if reqs.is_empty() {
            return Ok(());
        }
        let first_op = reqs[0].op.clone();
        let mut out = Vec::new();
        let mut pending: Vec<(u32, String, Option<NlError>, bool)> = Vec::new();
        for r in reqs {
            let seq = self.push(&mut out, r.msg, r.flags | NLM_F_REQUEST | NLM_F_ACK);
            pending.push((seq, r.op, None, false));
        }
        self.send(&out).map_err(|e| NlError::io(&first_op, e))?;
        while pending.iter().any(|p| !p.3) {
            self.recv().map_err(|e| NlError::io(&first_op, e))?;
            for (hdr, payload) in parse_all(&self.buf).map_err(|e| NlError::other(&first_op, e))? {
                let Some(p) = pending.iter_mut().find(|p| p.0 == hdr.sequence_number) else {
                    continue;
                };
                if let NetlinkPayload::Error(err) = payload {
                    if let Some(code) = err.code {
                        let extack = extack_msg(hdr.flags, &err.header);
                        p.2 = Some(NlError::kernel(&p.1, code.get().abs(), extack));
                    }
                    p.3 = true;
                }
            }
        }
        match pending.into_iter().find_map(|p| p.2) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A non-dump request answered by a single message (or an error).
    fn get(&mut self, op: &str, msg: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, NlError> {
        let mut out = Vec::new();
        let seq = self.push(&mut out, msg, NLM_F_REQUEST);
        self.send(&out).map_err(|e| NlError::io(op, e))?;
        loop {
            self.recv().map_err(|e| NlError::io(op, e))?;
            for (hdr, payload) in parse_all(&self.buf).map_err(|e| NlError::other(op, e))? {
                if hdr.sequence_number != seq {
                    continue;
                }
                match payload {
                    NetlinkPayload::InnerMessage(m) => return Ok(m),
                    NetlinkPayload::Error(err) => {
                        let extack = extack_msg(hdr.flags, &err.header);
                        let errno = err.code.map_or(libc::EPROTO, |c| c.get().abs());
                        return Err(NlError::kernel(op, errno, extack));
                    }
                    _ => return Err(NlError::other(op, "unexpected reply")),
                }
            }
        }
    }

    fn dump(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NlError> {
        // A dump that raced with a change is flagged as interrupted; a retry gets a consistent view.
        for _ in 0..3 {
            let mut out = Vec::new();
            let seq = self.push(&mut out, msg.clone(), NLM_F_REQUEST | NLM_F_DUMP);
            self.send(&out).map_err(|e| NlError::io(op, e))?;
            let mut items = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                self.recv().map_err(|e| NlError::io(op, e))?;
                for (hdr, payload) in parse_all(&self.buf).map_err(|e| NlError::other(op, e))? {
                    if hdr.sequence_number != seq {
                        continue;
                    }
                    interrupted |= hdr.flags & NLM_F_DUMP_INTR != 0;
                    match payload {
                        NetlinkPayload::InnerMessage(m) => items.push(m),
                        NetlinkPayload::Done(_) => break 'recv,
                        NetlinkPayload::Error(err) => {
                            let extack = extack_msg(hdr.flags, &err.header);
                            let errno = err.code.map_or(libc::EPROTO, |c| c.get().abs());
                            return Err(NlError::kernel(op, errno, extack));
                        }
                        _ => {}
                    }
                }
            }
            if !interrupted {
                return Ok(items);
            }
        }
        Err(NlError::other(
            op,
            "dump kept being interrupted by concurrent changes",
        ))
    }

    fn push(&mut self, out: &mut Vec<u8>, msg: RouteNetlinkMessage, flags: u16) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let len = nl.buffer_len();
        let start = out.len();
        out.resize(start + align4(len), 0);
        nl.serialize(&mut out[start..start + len]);
        self.seq
    }

    fn send(&self, data: &[u8]) -> io::Result<()> {
        let kernel = SocketAddr::new(0, 0);
        loop {
            match self.sock.send_to(data, &kernel, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn recv(&mut self) -> io::Result<()> {
        self.buf.clear();
        loop {
            match self.sock.recv(&mut self.buf, 0) {
                Ok(n) if n > self.buf.len() => {
                    return Err(io::Error::other(format!(
                        "netlink message of {n} bytes truncated to {}",
                        self.buf.len()
                    )));
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<(), NlError> {
        let mut peer = LinkMessage::default();
        peer.attributes = vec![
            LinkAttribute::IfName(spec.peer.to_string()),
            LinkAttribute::Address(spec.peer_mac.to_vec()),
            LinkAttribute::Mtu(spec.mtu),
            LinkAttribute::NetNsFd(spec.peer_netns),
        ];
        let mut msg = LinkMessage::default();
        // The host side comes up in the same request: one round trip less, and the node route
        // that follows needs an up device anyway.
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes = vec![
            LinkAttribute::IfName(spec.host.to_string()),
            LinkAttribute::Address(spec.host_mac.to_vec()),
            LinkAttribute::Mtu(spec.mtu),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        self.apply(vec![Req {
            op: format!("creating veth pair {}/{}", spec.host, spec.peer),
            msg: RouteNetlinkMessage::NewLink(msg),
            flags: NLM_F_CREATE | NLM_F_EXCL,
        }])
    }

    /// Deletes a link by name. Returns false when there was nothing to delete.
    pub fn del_link(&mut self, name: &str) -> Result<bool, NlError> {
        let mut msg = LinkMessage::default();
        msg.attributes = vec![LinkAttribute::IfName(name.to_string())];
        let res = self.apply(vec![Req {
            op: format!("deleting link {name}"),
            msg: RouteNetlinkMessage::DelLink(msg),
            flags: 0,
        }]);
        match res {
            Ok(()) => Ok(true),
            Err(e) if e.is(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NlError> {
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(name.to_string()),
            LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]),
        ];
        match self.get(
            &format!("looking up link {name}"),
            RouteNetlinkMessage::GetLink(msg),
        ) {
            Ok(RouteNetlinkMessage::NewLink(m)) => Ok(Some(link_from(m))),
            Ok(_) => Err(NlError::other(
                &format!("looking up link {name}"),
                "unexpected reply",
            )),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn addrs_v4(&mut self) -> Result<Vec<Addr>, NlError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let msgs = self.dump("listing addresses", RouteNetlinkMessage::GetAddress(msg))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.family == AddressFamily::Inet => {
                    let ip = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    });
                    let ip = ip.or_else(|| {
                        a.attributes.iter().find_map(|attr| match attr {
                            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    Some(Addr {
                        index: a.header.index,
                        ip,
                        prefix_len: a.header.prefix_len,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// IPv4 routes of the main table.
    pub fn routes_v4(&mut self) -> Result<Vec<Route>, NlError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let msgs = self.dump("listing routes", RouteNetlinkMessage::GetRoute(msg))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => {
                    let table = r
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            RouteAttribute::Table(t) => Some(*t),
                            _ => None,
                        })
                        .unwrap_or(r.header.table as u32);
                    if table != RouteHeader::RT_TABLE_MAIN as u32 {
                        return None;
                    }
                    let mut route = Route {
                        dst: Ipv4Addr::UNSPECIFIED,
                        prefix_len: r.header.destination_prefix_length,
                        gateway: None,
                        oif: None,
                        scope: r.header.scope.into(),
                    };
                    for a in &r.attributes {
                        match a {
                            RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                                route.gateway = Some(*ip)
                            }
                            RouteAttribute::Oif(i) => route.oif = Some(*i),
                            _ => {}
                        }
                    }
                    Some(route)
                }
                _ => None,
            })
            .collect())
    }

    pub fn neighs_v4(&mut self) -> Result<Vec<Neigh>, NlError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        let msgs = self.dump("listing neighbours", RouteNetlinkMessage::GetNeighbour(msg))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => {
                    let ip = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                        _ => None,
                    })?;
                    let mac = n.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::LinkLayerAddress(m) => Some(m.clone()),
                        _ => None,
                    });
                    Some(Neigh {
                        index: n.header.ifindex,
                        ip,
                        mac,
                        permanent: n.header.state == NeighbourState::Permanent,
                    })
                }
                _ => None,
            })
            .collect())
    }
}

pub fn set_up(index: u32, name: &str) -> Req {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    Req {
        op: format!("setting {name} up"),
        msg: RouteNetlinkMessage::SetLink(msg),
        flags: 0,
    }
}

pub fn set_mtu(index: u32, name: &str, mtu: u32) -> Req {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    Req {
        op: format!("setting the MTU of {name} to {mtu}"),
        msg: RouteNetlinkMessage::SetLink(msg),
        flags: 0,
    }
}

pub fn add_addr_v4(index: u32, name: &str, ip: Ipv4Addr, prefix_len: u8) -> Req {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = prefix_len;
    msg.header.scope = AddressScope::Universe;
    msg.header.index = index;
    msg.attributes = vec![
        AddressAttribute::Local(IpAddr::V4(ip)),
        AddressAttribute::Address(IpAddr::V4(ip)),
    ];
    Req {
        op: format!("adding address {ip}/{prefix_len} to {name}"),
        msg: RouteNetlinkMessage::NewAddress(msg),
        flags: NLM_F_CREATE | NLM_F_EXCL,
    }
}

/// How a new route relates to routes for the same prefix and metric through other devices.
#[derive(Debug, Clone, Copy)]
pub enum RouteMode {
    /// Take over the prefix (the node route to a pod address: whatever held it before is stale).
    Replace,
    /// Add behind existing ones (a pod's second attachment must not steal the first one's default
    /// route; on a fresh pod this is a plain add).
    Append,
}

/// A main-table IPv4 route out of `oif`; link scope when there is no gateway.
pub fn add_route_v4(
    oif: u32,
    name: &str,
    dst: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
    mode: RouteMode,
) -> Req {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = prefix_len;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Static;
    msg.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    msg.header.kind = RouteType::Unicast;
    if prefix_len > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    }
    if let Some(gw) = gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(oif));
    let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    Req {
        op: format!("adding route {dst}/{prefix_len}{via} dev {name}"),
        msg: RouteNetlinkMessage::NewRoute(msg),
        flags: match mode {
            RouteMode::Replace => NLM_F_CREATE | NLM_F_REPLACE,
            RouteMode::Append => NLM_F_CREATE | NLM_F_APPEND,
        },
    }
}

pub fn add_permanent_neigh_v4(index: u32, name: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Req {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes = vec![
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)),
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
    ];
    Req {
        op: format!("adding permanent neighbour {ip} on {name}"),
        msg: RouteNetlinkMessage::NewNeighbour(msg),
        flags: NLM_F_CREATE | NLM_F_REPLACE,
    }
}

fn link_from(m: LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        peer: None,
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(mac) => link.mac = mac,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::Link(peer) => link.peer = Some(peer),
            _ => {}
        }
    }
    link
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

type Parsed = (NetlinkHeader, NetlinkPayload<RouteNetlinkMessage>);

fn parse_all(buf: &[u8]) -> Result<Vec<Parsed>, String> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(format!("malformed netlink message (length {len})"));
        }
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len])
            .map_err(|e| format!("cannot decode netlink reply: {e}"))?;
        out.push(msg.into_parts());
        off += align4(len);
    }
    Ok(out)
}

/// The kernel's human-readable reason from an extended ack, when it sent one.
fn extack_msg(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < NLMSG_HDRLEN {
        return None;
    }
    let orig_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize
    };
    let mut off = align4(orig_len);
    while off + 4 <= payload.len() {
        let len = u16::from_ne_bytes([payload[off], payload[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([payload[off + 2], payload[off + 3]]) & 0x3fff;
        if len < 4 || off + len > payload.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let raw = &payload[off + 4..off + len];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            return Some(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
        off += align4(len);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extack_message_is_extracted() {
        let mut payload = vec![0u8; NLMSG_HDRLEN];
        let text = b"Device for nexthop is not up\0";
        let len = (4 + text.len()) as u16;
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        assert_eq!(
            extack_msg(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload).as_deref(),
            Some("Device for nexthop is not up")
        );
        assert_eq!(extack_msg(NLM_F_CAPPED, &payload), None);
        assert_eq!(
            extack_msg(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload[..20]),
            None
        );
    }
}
