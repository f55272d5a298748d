//! Netlink queries of the node namespace (the daemon runs inside it).

use futures::TryStreamExt as _;
use netlink_packet_route::link::LinkAttribute;
use std::collections::HashSet;

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
}
