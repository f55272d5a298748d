//! Connection tracking for policy: the connections of policy-selected local pods, both
//! directions, so that only a connection's first packet needs a policy verdict.
//!
//! An allowed connection gets two entries, its tuple and the reply's, each with the
//! `POLICY_EPOCH` it was judged under; [`crate::policy::enforce`] decides what an entry means.
//! This table is not the kernel's conntrack and knows nothing of NAT (see
//! [`crate::kernel_flows`] for how the programs stay out of NATed flows).

use aya_ebpf::{macros::map, maps::LruHashMap};
use vpcnet_common::{
    CT_CLOSING_TIMEOUT_NS, CT_OTHER_TIMEOUT_NS, CT_REPLY, CT_TCP_TIMEOUT_NS, CtValue, FlowKey,
    MAX_CONNTRACK, NodeCounter,
};

use crate::{
    clock::{REFRESH_NS, now_ns},
    counters::count_node,
    packet::{IPPROTO_TCP, Packet, TCP_FIN, TCP_RST},
};

#[map]
static CONNTRACK: LruHashMap<FlowKey, CtValue> = LruHashMap::pinned(MAX_CONNTRACK, 0);

/// A live (unexpired) entry, as read when it was looked up.
pub(crate) struct Entry {
    value: *mut CtValue,
    now: u64,
    expires: u64,
    /// The `POLICY_EPOCH` the connection was last judged under.
    pub(crate) epoch: u32,
    flags: u32,
}

/// The packet's live entry, if its connection has one.
#[inline(always)]
pub(crate) fn lookup(pkt: &Packet) -> Option<Entry> {
    if !pkt.l4.tracked {
        return None;
    }
    // By reference, not a copy: with a copy the compiler specialises the rest of the program
    // for each outcome of the L4 parse, and the verifier walked nearly three times the
    // instructions.
    let key = &pkt.l4.key;
    let value = CONNTRACK.get_ptr_mut(key)?;
    let now = now_ns();
    // SAFETY: a value of the map; concurrent writers store recent times or the current epoch,
    // any of which is fine.
    let (expires, epoch, flags) = unsafe { ((*value).expires_ns, (*value).epoch, (*value).flags) };
    (expires > now).then_some(Entry {
        value,
        now,
        expires,
        epoch,
        flags,
    })
}

impl Entry {
    /// The packet travels against the connection's original direction.
    #[inline(always)]
    pub(crate) fn is_reply(&self) -> bool {
        self.flags & CT_REPLY != 0
    }

    /// The connection was judged again, and allowed, under `epoch`.
    #[inline(always)]
    pub(crate) fn revalidated(&self, epoch: u32) {
        // SAFETY: see `lookup`.
        unsafe { (*self.value).epoch = epoch };
    }

    /// Extends the entry's life for a packet of its connection; a TCP FIN or RST shortens it
    /// instead.
    #[inline(always)]
    pub(crate) fn refresh(&self, pkt: &Packet) {
        let timeout = if pkt.l4.key.proto != IPPROTO_TCP {
            CT_OTHER_TIMEOUT_NS
        } else if pkt.l4.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            CT_CLOSING_TIMEOUT_NS
        } else {
            CT_TCP_TIMEOUT_NS
        };
        let fresh = self.now + timeout;
        // SAFETY: see `lookup`.
        unsafe {
            if timeout == CT_CLOSING_TIMEOUT_NS {
                if fresh < self.expires {
                    (*self.value).expires_ns = fresh;
                }
            } else if fresh > self.expires + REFRESH_NS {
                (*self.value).expires_ns = fresh;
            }
        }
        count_node(NodeCounter::CtHits);
    }
}

/// Forgets the packet's direction of its connection. The other direction's entry still carries
/// the old epoch, so its next packet is judged again too.
#[inline(always)]
pub(crate) fn remove(pkt: &Packet) {
    let key = &pkt.l4.key;
    let _ = CONNTRACK.remove(key);
}

/// Tracks the connection the packet opens, judged allowed under `epoch`.
#[inline(always)]
pub(crate) fn create(pkt: &Packet, epoch: u32) {
    // Until it is established, a TCP connection gets the short timeout (a SYN flood must not
    // fill the table with six-hour entries).
    let expires_ns = now_ns() + CT_OTHER_TIMEOUT_NS;
    let fwd = CtValue {
        expires_ns,
        epoch,
        flags: 0,
    };
    let rev = CtValue {
        flags: CT_REPLY,
        ..fwd
    };
    let (key, reverse) = (pkt.l4.key, pkt.reply_key());
    for (key, value) in [(&key, &fwd), (&reverse, &rev)] {
        match CONNTRACK.insert(key, value, 0) {
            Ok(()) => count_node(NodeCounter::CtCreated),
            Err(_) => count_node(NodeCounter::CtInsertFailed),
        }
    }
}
