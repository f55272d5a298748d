//! vpcnet's nftables table (`ip vpcnet`) in the node's netns: masquerade for internet-bound pod
//! traffic and the forward-chain guard that keeps the kernel from forwarding anything else to or
//! from pods.

use super::DataplaneError;
use super::plan::Plan;
use ipnetwork::Ipv4Network;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

pub const TABLE: &str = "vpcnet";

/// Host-side veths are named `vpc…` by the plugin; the guard matches them by this prefix.
pub const HOST_VETH_PREFIX: &str = "vpc";

fn set(out: &mut String, name: &str, elems: &[Ipv4Network]) {
    let _ = write!(
        out,
        "  set {name} {{\n    type ipv4_addr; flags interval; auto-merge;\n"
    );
    if !elems.is_empty() {
        let list: Vec<String> = elems.iter().map(|e| e.to_string()).collect();
        let _ = writeln!(out, "    elements = {{ {} }}", list.join(", "));
    }
    out.push_str("  }\n");
}

/// The whole table, replaced in one transaction (`table; delete table; table {…}`), so a restart
/// never opens a window without masquerade or without the guard. NAT state of existing flows
/// lives in conntrack, not in the table, so replacing it does not disturb them.
///
/// Forward chain, in order:
/// 1. `ct status dnat/snat accept`: masquerade replies (de-NATed to the pod) and kube-proxy style
///    DNAT are the only pod traffic the kernel is meant to forward;
/// 2. `masquerade_exclude` destinations are kernel-forwarded without SNAT, both ways;
/// 3. pods → anything the programs handle themselves (VPC, physical cloud, other pods): drop,
///    counted. With the programs attached these packets never reach netfilter (redirect_peer and
///    redirect_neigh bypass it), so a hit here means a program is missing — the eBPF path cannot be
///    silently replaced by the kernel's, and a later policy layer cannot be bypassed that way;
/// 4. anything else forwarded *to* a pod: drop, counted (the programs deliver all legitimate
///    inbound traffic themselves).
pub fn render(plan: &Plan, uplink: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{"
    );
    set(&mut s, "direct", &plan.direct);
    set(&mut s, "exclude", &plan.exclude);
    let local: Vec<Ipv4Network> = plan
        .routes
        .iter()
        .filter(|(_, a)| **a == vpcnet_common::ROUTE_LOCAL_BLOCK)
        .map(|((_, c), _)| *c)
        .collect();
    set(&mut s, "local_pods", &local);
    let p = HOST_VETH_PREFIX;
    let _ = write!(
        s,
        r#"  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct status dnat accept
    ct status snat accept
    iifname "{p}*" ip daddr @exclude accept
    oifname "{p}*" ip saddr @exclude accept
    iifname "{p}*" ip daddr @direct counter drop comment "pod to VPC without eBPF"
    oifname "{p}*" counter drop comment "to pod without eBPF"
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{uplink}" ip saddr @local_pods ip daddr != @direct ip daddr != @exclude masquerade
  }}
}}
"#
    );
    s
}

fn nft(script: &str) -> Result<(), DataplaneError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DataplaneError::Nft(format!("running nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| DataplaneError::Nft(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| DataplaneError::Nft(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(DataplaneError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Installs (or atomically replaces) the table. `nft` is a child process: it inherits the calling
/// thread's netns, which is the node's.
pub fn apply(plan: &Plan, uplink: &str) -> Result<(), DataplaneError> {
    nft(&render(plan, uplink))
}

/// Removes the table; succeeds when it is already gone.
pub fn remove() -> Result<(), DataplaneError> {
    nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
}
