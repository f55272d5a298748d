//! NetworkPolicy: the verdict on a connection at whichever of its ends is a policy-selected
//! endpoint of this node, egress where a packet leaves its pod and ingress where it reaches it.
//!
//! A connection is judged by its first packet; allowed, it gets two [`crate::conntrack`]
//! entries (its tuple and the reply's), and later packets either way pass on the entry alone. An
//! entry written under an older `POLICY_EPOCH` (a policy narrowed since) is judged again — in the
//! connection's original direction — so narrowing cuts established connections it forbids
//! rather than letting them run until they go idle.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};
use vpcnet_common::{
    DIR_EGRESS, DIR_INGRESS, DropReason, EndpointInfo, ID_ANY, ID_HOST, ID_WORLD, MAX_IDENTITIES,
    MAX_POLICY_CIDRS, MAX_POLICY_ENTRIES, NODE_SCOPE, NodeCounter, POLICY_CIDR_PREFIX_BASE,
    POLICY_EGRESS_OPEN, POLICY_INGRESS_OPEN, POLICY_OPEN, POLICY_PREFIX_PROTO, PolicyCidrKey,
    PolicyKey, ROUTE_HOST,
};

use crate::{conntrack, counters::count_node, packet::Packet, topology::route};

/// What each local endpoint allows, per direction (see [`PolicyKey`]). Values are unused.
#[map]
static POLICY: LpmTrie<PolicyKey, u32> = LpmTrie::pinned(MAX_POLICY_ENTRIES, 0);

/// ipBlock prefixes per endpoint and direction → port-set number in `POLICY`.
#[map]
static POLICY_CIDRS: LpmTrie<PolicyCidrKey, u32> = LpmTrie::pinned(MAX_POLICY_CIDRS, 0);

/// Pod address → identity, for every pod of the cluster the daemon knows.
#[map]
static IDENTITIES: HashMap<u32, u32> = HashMap::pinned(MAX_IDENTITIES, 0);

/// Bumped by the daemon after a policy update narrowed anything or an endpoint went away:
/// connections judged under an older epoch are judged again on their next packet.
#[map]
static POLICY_EPOCH: Array<u32> = Array::pinned(1, 0);

/// The policy stage. Judges the packet with `pkt.src_ep` / `pkt.dst_ep` as the sender /
/// receiver when it is an endpoint of this node; nothing is looked up for pods no policy
/// selects.
#[inline(always)]
pub(crate) fn enforce(pkt: &Packet) -> Result<(), DropReason> {
    // Copied out before conntrack hands the packet's tuple to map helpers: what is read back
    // after such a call is unknown to the compiler, and the verifier explores both arms.
    let (src_ep, dst_ep) = (pkt.src_ep, pkt.dst_ep);
    let (src_ep, dst_ep) = (src_ep.as_ref(), dst_ep.as_ref());
    if !isolated(src_ep) && !isolated(dst_ep) {
        return Ok(());
    }
    let k = pkt.l4.key;
    let epoch = policy_epoch();
    if let Some(entry) = conntrack::lookup(pkt) {
        if entry.epoch != epoch {
            count_node(NodeCounter::CtRevalidated);
            let verdict = if entry.is_reply() {
                judge(k.dst, dst_ep, k.src, src_ep, k.proto, k.sport)
            } else {
                judge(k.src, src_ep, k.dst, dst_ep, k.proto, k.dport)
            };
            if verdict.is_err() {
                conntrack::remove(pkt);
                return verdict;
            }
            entry.revalidated(epoch);
        }
        entry.refresh(pkt);
        return Ok(());
    }
    judge(k.src, src_ep, k.dst, dst_ep, k.proto, k.dport)?;
    if pkt.l4.tracked && pkt.l4.opens {
        conntrack::create(pkt, epoch);
    }
    Ok(())
}

#[inline(always)]
fn isolated(ep: Option<&EndpointInfo>) -> bool {
    ep.is_some_and(|e| e.policy & POLICY_OPEN != POLICY_OPEN)
}

#[inline(always)]
fn policy_epoch() -> u32 {
    POLICY_EPOCH.get(0).copied().unwrap_or(0)
}

/// Judges a connection from `a` to `b` on `proto`/`port` at whichever of them is a local
/// endpoint: egress at `a`, ingress at `b`.
#[inline(always)]
fn judge(
    a: u32,
    a_ep: Option<&EndpointInfo>,
    b: u32,
    b_ep: Option<&EndpointInfo>,
    proto: u8,
    port: u16,
) -> Result<(), DropReason> {
    if let Some(ep) = a_ep
        && ep.policy & POLICY_EGRESS_OPEN == 0
        && !policy_allows(a, DIR_EGRESS, b, proto, port)
    {
        return Err(DropReason::PolicyEgress);
    }
    if let Some(ep) = b_ep
        && ep.policy & POLICY_INGRESS_OPEN == 0
        && !policy_allows(b, DIR_INGRESS, a, proto, port)
    {
        return Err(DropReason::PolicyIngress);
    }
    Ok(())
}

/// Identity of a remote address: a known pod's, the node's own, or "world".
#[inline(always)]
fn identity_of(addr: u32) -> u32 {
    // SAFETY: copied out at once.
    if let Some(id) = unsafe { IDENTITIES.get(addr) } {
        return *id;
    }
    if route(NODE_SCOPE, addr) == Some(ROUTE_HOST) {
        ID_HOST
    } else {
        ID_WORLD
    }
}

#[inline(always)]
fn policy_entry(endpoint: u32, dir: u8, remote: u32, proto: u8, port: u16) -> bool {
    let key = Key::new(
        POLICY_PREFIX_PROTO + 16,
        PolicyKey {
            endpoint,
            remote,
            dir,
            proto,
            port,
        },
    );
    POLICY.get(&key).is_some()
}

/// Whether `endpoint`'s rules for `dir` allow the peer at `remote` on `proto`/`port` (the
/// destination port of the connection). Three lookups at most, whatever the number of rules:
/// the peer's identity, "any peer", and the peer's address in the ipBlock trie.
#[inline(always)]
fn policy_allows(endpoint: u32, dir: u8, remote: u32, proto: u8, port: u16) -> bool {
    let id = identity_of(remote);
    if policy_entry(endpoint, dir, id, proto, port)
        || policy_entry(endpoint, dir, ID_ANY, proto, port)
    {
        return true;
    }
    // The node is recognised as such, not by address: ipBlocks do not match it.
    if id == ID_HOST {
        return false;
    }
    let key = Key::new(
        POLICY_CIDR_PREFIX_BASE + 32,
        PolicyCidrKey {
            endpoint,
            dir,
            _pad: [0; 3],
            addr: remote,
        },
    );
    match POLICY_CIDRS.get(&key) {
        Some(set) => policy_entry(endpoint, dir, *set, proto, port),
        None => false,
    }
}
