//! Netlink queries of the node namespace (the daemon runs inside it).

use futures::TryStreamExt as _;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

/// One rtnetlink connection for the daemon's (the node's) namespace, created inside it.
pub struct NodeNetlink {
    handle: rtnetlink::Handle,
}

impl NodeNetlink {
    pub fn new() -> std::io::Result<NodeNetlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(NodeNetlink { handle })
    }

    pub async fn link_names(&self) -> Result<HashSet<String>, rtnetlink::Error> {
        let mut links = self.handle.link().get().execute();
        let mut names = HashSet::new();
        while let Some(msg) = links.try_next().await? {
            for attr in msg.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.insert(name);
                }
            }
        }
        Ok(names)
    }

    pub async fn link_mtu(&self, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        if let Some(msg) = links.try_next().await? {
            for attr in msg.attributes {
                if let LinkAttribute::Mtu(mtu) = attr {
                    return Ok(Some(mtu));
                }
            }
        }
        Ok(None)
    }

    /// The node's IPv4 host routes (`a.b.c.d/32 dev X`) with the name of their interface: the
    /// plugin routes every pod's address to its host veth this way, so these outlive the
    /// daemon's own records.
    pub async fn host_routes_v4(&self) -> Result<Vec<(Ipv4Addr, String)>, rtnetlink::Error> {
        let mut names = HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links.try_next().await? {
            let index = msg.header.index;
            for attr in msg.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.insert(index, name);
                }
            }
        }
        let query = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut routes = self.handle.route().get(query).execute();
        let mut out = Vec::new();
        while let Some(msg) = routes.try_next().await? {
            if msg.header.destination_prefix_length != 32 {
                continue;
            }
            let (mut dst, mut oif) = (None, None);
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if let (Some(dst), Some(name)) = (dst, oif.and_then(|i| names.get(&i))) {
                out.push((dst, name.clone()));
            }
        }
        Ok(out)
    }
}
