//! The six CNI verbs.

use crate::args::{Env, parse_cni_args};
use crate::config::{self, FALLBACK_VERSION, NetConf, SUPPORTED_VERSIONS, format_mac};
use crate::errors::{CniError, Result};
use crate::netlink::{self, Link, Netlink, NlError, RouteMode, VethSpec};
use crate::netns;
use crate::result::{self, Attachment};
use crate::watchdog;
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vpcnet_api::release_queue::{self, QueuedRelease};
use vpcnet_api::{
    AllocateRequest, Allocation, AttachmentKey, CheckRequest, ClientError, EndpointReadyRequest,
    GcRequest, HOST_VETH_MAC, POD_GATEWAY, RequestBody, ResponseBody, code, quote,
};

/// Allocation is a disk commit at the daemon, possibly behind other ADDs' commits or a slow
/// disk: seconds, not minutes. A daemon that needs longer is stuck, and failing fast with "try
/// again later" lets the runtime retry instead of holding the sandbox for a minute.
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(10);
/// EndpointReady programs the dataplane and syncs policy from the watched snapshot.
const ENDPOINT_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rollback's release runs after ADD already failed: a daemon that does not answer soon gets the
/// release through the queue instead, so waiting longer would only delay the runtime's retry.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(2);
/// DEL's release (which queues on timeout) and CHECK.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// GC can release many attachments, each its own disk commit.
const GC_TIMEOUT: Duration = Duration::from_secs(30);
/// containerd polls STATUS every 5 s; an answer must come well within that.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_MTU: u32 = 1500;

/// What one invocation produced, for `main` to print and log.
pub struct Invocation {
    /// The spec version error JSON must be written in.
    pub version: String,
    pub result: Result<Option<String>>,
    pub log_file: Option<PathBuf>,
    pub container_id: String,
    pub ifname: String,
}

pub fn dispatch(env: &Env, stdin: &mut dyn Read) -> Invocation {
    let mut inv = Invocation {
        version: FALLBACK_VERSION.to_string(),
        result: Ok(None),
        log_file: None,
        container_id: env.container_id.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
    };
    let command = env.command.as_str();
    match command {
        "" => {
            inv.result = Err(CniError::env("CNI_COMMAND is not set"));
            return inv;
        }
        // VERSION must work with any stdin, even none: it is how runtimes find out what to send.
        "VERSION" => {
            inv.result = Ok(Some(version_json()));
            return inv;
        }
        "ADD" | "DEL" | "CHECK" | "GC" | "STATUS" => {}
        other => {
            inv.result = Err(CniError::env(format!(
                "unknown CNI_COMMAND {} (expected ADD, DEL, CHECK, GC, STATUS or VERSION)",
                quote(other)
            )));
            return inv;
        }
    }
    watchdog::phase("reading the network configuration from stdin");
    let mut input = Vec::new();
    if let Err(e) = stdin.read_to_end(&mut input) {
        inv.result = Err(CniError::io(format!(
            "cannot read the network configuration from stdin: {e}"
        )));
        return inv;
    }
    if let Some(v) = sniff_version(&input) {
        inv.version = v;
    }
    crate::set_panic_version(&inv.version);
    let conf = match NetConf::parse(&input) {
        Ok(c) => c,
        Err(e) => {
            inv.result = Err(e);
            return inv;
        }
    };
    inv.log_file = conf.log_file.clone();
    watchdog::phase(format!("running {command}"));
    inv.result = match command {
        "ADD" => cmd_add(env, &conf).map(Some),
        "DEL" => cmd_del(env, &conf).map(|()| None),
        "CHECK" => cmd_check(env, &conf).map(|()| None),
        "GC" => cmd_gc(&conf).map(|()| None),
        _ => cmd_status(&conf).map(|()| None),
    };
    inv
}

fn version_json() -> String {
    serde_json::json!({
        "cniVersion": FALLBACK_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The caller's version if it is one we speak, so even a config error is reported in its format.
fn sniff_version(input: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(input).ok()?;
    let version = v.get("cniVersion")?.as_str()?;
    SUPPORTED_VERSIONS
        .contains(&version)
        .then(|| version.to_string())
}

pub use vpcnet_api::host_veth_name as veth_name;

fn nl_err(e: NlError) -> CniError {
    CniError::io(e.to_string())
}

fn key_of(container_id: &str, ifname: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    }
}

fn call(
    conf: &NetConf,
    body: RequestBody,
    timeout: Duration,
) -> std::result::Result<ResponseBody, ClientError> {
    vpcnet_api::call(&conf.socket(), body, timeout)
}

fn unexpected(verb: &str, resp: &ResponseBody) -> CniError {
    CniError::internal(format!(
        "vpcnetd answered {verb} with an unexpected {resp:?}"
    ))
}

/// The pod's namespace, refused when it is the plugin's own: the /32 and the default route would
/// land on the node (the reference plugins' skel refuses the same).
fn open_pod_netns(netns_path: &str) -> Result<File> {
    watchdog::phase(format!("opening CNI_NETNS {}", quote(netns_path)));
    let ns = netns::open(netns_path).map_err(|e| {
        CniError::env(format!(
            "cannot open network namespace {} (CNI_NETNS): {e}",
            quote(netns_path)
        ))
    })?;
    let own = netns::is_own(&ns).map_err(|e| {
        CniError::env(format!(
            "cannot tell whether CNI_NETNS {} is the plugin's own network namespace: {e}",
            quote(netns_path)
        ))
    })?;
    if own {
        return Err(CniError::env(format!(
            "CNI_NETNS {} is the network namespace the plugin runs in (the node's), not a pod's",
            quote(netns_path)
        )));
    }
    Ok(ns)
}

fn random_mac() -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most mac.len() bytes into the buffer we own.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        return Err(CniError::io(format!(
            "getrandom for the pod MAC: {}",
            io::Error::last_os_error()
        )));
    }
    // Locally administered, unicast.
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

// ---------------------------------------------------------------------------------------------
// ADD

struct AddPlan<'a> {
    key: AttachmentKey,
    ifname: &'a str,
    netns_path: &'a str,
    ns: File,
    host_veth: String,
    pod_mac: [u8; 6],
}

fn cmd_add(env: &Env, conf: &NetConf) -> Result<String> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    let args = parse_cni_args(&env.args)?;
    // The capability (runtimeConfig) wins over CNI_ARGS, as in the reference plugins.
    let mut static_ips = conf.static_ips()?;
    if static_ips.is_empty() {
        static_ips = args.ips.clone();
    }
    let pod_mac = match conf.mac()?.or(args.mac) {
        Some(m) => m,
        None => random_mac()?,
    };
    let ns = open_pod_netns(netns_path)?;
    let plan = AddPlan {
        key: key_of(container_id, ifname),
        ifname,
        netns_path,
        ns,
        host_veth: veth_name(container_id, ifname),
        pod_mac,
    };

    let mut nl = Netlink::open().map_err(nl_err)?;

    let socket = conf.socket().display().to_string();
    watchdog::phase(format!("sending allocate to vpcnetd at {}", quote(&socket)));
    let req = RequestBody::Allocate(AllocateRequest {
        key: plan.key.clone(),
        pod: args.pod,
        network: conf.network.clone(),
        static_ips: static_ips.into_iter().map(IpAddr::V4).collect(),
        host_veth: plan.host_veth.clone(),
        netns: netns_path.to_string(),
    });
    // The daemon commits the allocation to disk (an fsync) while we create the veth pair, which
    // needs nothing from the answer: the two slowest steps of ADD overlap.
    let pending = vpcnet_api::send(&conf.socket(), req, ALLOCATE_TIMEOUT)
        .map_err(|e| CniError::daemon("allocate", &socket, e))?;
    let provisional_mtu = conf.mtu.unwrap_or(DEFAULT_MTU);
    watchdog::phase("creating the veth pair");
    let created = nl.create_veth(&veth_spec(&plan, provisional_mtu));
    watchdog::phase(format!(
        "waiting for vpcnetd at {} to answer allocate",
        quote(&socket)
    ));
    let alloc = match pending.receive() {
        Ok(ResponseBody::Allocated(a)) => Ok(a),
        Ok(ResponseBody::Error(e)) => Err(e.into()),
        Ok(other) => Err(unexpected("allocate", &other)),
        Err(e) => Err(CniError::daemon("allocate", &socket, e)),
    };
    let alloc = match (created, alloc) {
        (Ok(()), Ok(a)) => a,
        (Err(e), Ok(a)) if e.is(libc::EEXIST) => {
            // Allocation is idempotent per attachment, so `a` is the address a live attachment
            // of this container and ifname carries.
            watchdog::phase("inspecting the interfaces already there");
            if let Err(e) = replace_leftover(&mut nl, &plan, &a, provisional_mtu) {
                if e.code != code::ATTACHMENT_EXISTS {
                    rollback(&mut nl, conf, &plan);
                }
                return Err(e);
            }
            a
        }
        (Err(e), Err(alloc_err)) if e.is(libc::EEXIST) => {
            // Something already has our names and the daemon said no: that may be the live
            // attachment, and a rollback would delete it and release its address. This call
            // created nothing, so it undoes nothing.
            return Err(alloc_err);
        }
        (created, alloc) => {
            // Whatever failed first, nothing of this attachment may stay behind.
            rollback(&mut nl, conf, &plan);
            return Err(match (created, alloc) {
                (_, Err(e)) => e,
                (Err(e), _) => nl_err(e),
                _ => CniError::internal("ADD failed without an error"),
            });
        }
    };

    match wire(&mut nl, conf, &plan, &alloc, provisional_mtu) {
        Ok(att) => {
            let out = result::render(&conf.cni_version, conf.prev_result.as_ref(), &att);
            Ok(out.to_string())
        }
        Err(e) => {
            rollback(&mut nl, conf, &plan);
            Err(e)
        }
    }
}

fn veth_spec<'a>(plan: &'a AddPlan<'_>, mtu: u32) -> VethSpec<'a> {
    VethSpec {
        host: &plan.host_veth,
        host_mac: HOST_VETH_MAC,
        peer: plan.ifname,
        peer_mac: plan.pod_mac,
        mtu,
        peer_netns: plan.ns.as_raw_fd(),
    }
}

/// Creating the pair hit EEXIST: decide from the kernel whether the attachment is live.
///
/// Live means the host veth and the pod interface exist, are the two ends of one veth pair, and
/// the pod end carries the address the daemon holds for this attachment: that is a pod wired by
/// an earlier ADD, and a repeated ADD must leave it (and whatever chained plugins configured on
/// it) alone, so the answer is ATTACHMENT_EXISTS. The kernel is the judge, not the daemon's
/// `ready` flag: that flag is not durable, and the daemon answers allocate identically for a
/// live and a half-built attachment.
///
/// Anything less is a leftover of an ADD that died half-way. The host veth's name is ours by
/// construction, so it is removed (taking a pod end paired with it along) and the pair created
/// again. A pod interface that is not paired with our host veth is not ours: it stays, and ADD
/// fails.
///
/// Only reached after EEXIST, so the common path stays at one netlink round trip.
fn replace_leftover(
    nl: &mut Netlink,
    plan: &AddPlan<'_>,
    alloc: &Allocation,
    mtu: u32,
) -> Result<()> {
    let ip = pod_ipv4(&plan.key, alloc)?;
    let host = nl.link_by_name(&plan.host_veth).map_err(nl_err)?;
    let pod = std::thread::scope(|s| {
        s.spawn(|| inspect_pod(&plan.ns, plan.ifname, ip))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    if let (Some(h), Some((p, has_ip))) = (&host, &pod)
        && h.peer == Some(p.index)
        && p.peer == Some(h.index)
        && *has_ip
    {
        return Err(CniError::new(
            code::ATTACHMENT_EXISTS,
            format!(
                "container {} is already attached: {} in {} has {}/32 and host veth {}; \
                 the repeated ADD left it untouched (DEL it first to re-create it)",
                quote(&plan.key.container_id),
                plan.ifname,
                quote(plan.netns_path),
                ip,
                plan.host_veth
            ),
        ));
    }
    if host.is_none() {
        return Err(already_exists(plan));
    }
    nl.del_link(&plan.host_veth).map_err(nl_err)?;
    match nl.create_veth(&veth_spec(plan, mtu)) {
        Ok(()) => Ok(()),
        Err(e) if e.is(libc::EEXIST) => Err(already_exists(plan)),
        Err(e) => Err(nl_err(e)),
    }
}

fn already_exists(plan: &AddPlan<'_>) -> CniError {
    CniError::io(format!(
        "interface {} already exists in {} and is not one vpcnet created for this container",
        plan.ifname,
        quote(plan.netns_path)
    ))
}

/// The address to configure in the pod. This plugin wires IPv4 only: an allocation with an IPv6
/// address is refused (code 7, a configuration the operator fixes) rather than half-configured
/// with the IPv6 address silently dropped. The runtime's DEL after the failed ADD releases it.
fn pod_ipv4(key: &AttachmentKey, alloc: &Allocation) -> Result<Ipv4Addr> {
    let v6: Vec<String> = alloc
        .ips
        .iter()
        .filter(|i| i.address.is_ipv6())
        .map(|i| i.address.to_string())
        .collect();
    if !v6.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "vpcnetd allocated IPv6 address {} to container {} in subnet {} of network {}, \
                 but this vpcnet plugin configures IPv4 pods only: give the pod an IPv4 subnet \
                 (the network's default_subnet or the pod's vpcnet.io/subnet annotation)",
                v6.join(", "),
                quote(&key.container_id),
                quote(&alloc.subnet),
                quote(&alloc.network)
            ),
        ));
    }
    alloc
        .ips
        .iter()
        .find_map(|i| match i.address {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .ok_or_else(|| CniError::internal("vpcnetd answered allocate without an address"))
}

/// Runs on its own thread: the pod interface (if any) and whether it carries `ip`/32.
fn inspect_pod(ns: &File, ifname: &str, ip: Ipv4Addr) -> Result<Option<(Link, bool)>> {
    netns::enter(ns)
        .map_err(|e| CniError::io(format!("entering the pod network namespace: {e}")))?;
    let mut nl = Netlink::open().map_err(nl_err)?;
    let Some(link) = nl.link_by_name(ifname).map_err(nl_err)? else {
        return Ok(None);
    };
    let has_ip = nl
        .addrs_v4()
        .map_err(nl_err)?
        .iter()
        .any(|a| a.index == link.index && a.ip == ip && a.prefix_len == 32);
    Ok(Some((link, has_ip)))
}

fn wire(
    nl: &mut Netlink,
    conf: &NetConf,
    plan: &AddPlan<'_>,
    alloc: &Allocation,
    provisional_mtu: u32,
) -> Result<Attachment> {
    let mtu = conf.mtu.or(alloc.mtu).unwrap_or(DEFAULT_MTU);
    let ip = pod_ipv4(&plan.key, alloc)?;
    // The veth was created before the daemon's MTU was known; fix it only when it differs.
    let fix_mtu = (mtu != provisional_mtu).then_some(mtu);

    // Pod and node sides are independent until EndpointReady; doing them concurrently hides one
    // side's netlink round trips behind the other's.
    let (pod, host) = std::thread::scope(|s| {
        let pod = s.spawn(|| configure_pod(&plan.ns, plan.ifname, ip, fix_mtu));
        let host = configure_host(nl, &plan.host_veth, ip, fix_mtu);
        (pod.join(), host)
    });
    pod.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    let host_link = host?;

    let socket = conf.socket().display().to_string();
    let req = RequestBody::EndpointReady(EndpointReadyRequest {
        key: plan.key.clone(),
        ips: vec![ip.into()],
        host_veth: plan.host_veth.clone(),
        host_ifindex: host_link.index,
        pod_mac: plan.pod_mac,
    });
    watchdog::phase(format!(
        "waiting for vpcnetd at {} to answer endpoint_ready",
        quote(&socket)
    ));
    match call(conf, req, ENDPOINT_READY_TIMEOUT) {
        Ok(ResponseBody::Ok) => {}
        Ok(ResponseBody::Error(e)) => return Err(e.into()),
        Ok(other) => return Err(unexpected("endpoint_ready", &other)),
        Err(e) => return Err(CniError::daemon("endpoint_ready", &socket, e)),
    }
    Ok(Attachment {
        host_veth: plan.host_veth.clone(),
        host_mac: HOST_VETH_MAC,
        ifname: plan.ifname.to_string(),
        pod_mac: plan.pod_mac,
        netns: plan.netns_path.to_string(),
        ip,
        mtu,
    })
}

/// Runs on its own thread: enters the pod namespace and wires the pod side with a netlink socket
/// opened there.
fn configure_pod(ns: &File, ifname: &str, ip: Ipv4Addr, mtu: Option<u32>) -> Result<()> {
    netns::enter(ns)
        .map_err(|e| CniError::io(format!("entering the pod network namespace: {e}")))?;
    // Without this the kernel runs IPv6 DAD on the new link and the link-local address stays
    // tentative for a second; nothing in the pod needs DAD on a point-to-point veth.
    netns::write_sysctl_if_present(&format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"), "0")
        .map_err(|e| CniError::io(format!("disabling IPv6 DAD on {ifname}: {e}")))?;
    let mut nl = Netlink::open().map_err(nl_err)?;
    let link = nl
        .link_by_name(ifname)
        .map_err(nl_err)?
        .ok_or_else(|| CniError::io(format!("{ifname} vanished from the pod namespace")))?;
    let i = link.index;
    let mut reqs = Vec::with_capacity(6);
    if let Some(mtu) = mtu {
        reqs.push(netlink::set_mtu(i, ifname, mtu));
    }
    reqs.extend([
        netlink::add_addr_v4(i, ifname, ip, 32),
        netlink::set_up(i, ifname),
        netlink::add_route_v4(i, ifname, POD_GATEWAY, 32, None, RouteMode::Append),
        netlink::add_route_v4(
            i,
            ifname,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(POD_GATEWAY),
            RouteMode::Append,
        ),
        // The host veth answers for the gateway; a permanent entry means no ARP round trip before
        // the pod's first packet and nothing that can go stale.
        netlink::add_permanent_neigh_v4(i, ifname, POD_GATEWAY, HOST_VETH_MAC),
    ]);
    nl.apply(reqs).map_err(nl_err)
}

/// Node side: the host veth is already up (created so); route the pod's address to it so the node
/// itself (kubelet probes) can reach the pod.
fn configure_host(
    nl: &mut Netlink,
    host_veth: &str,
    ip: Ipv4Addr,
    mtu: Option<u32>,
) -> Result<Link> {
    let link = nl
        .link_by_name(host_veth)
        .map_err(nl_err)?
        .ok_or_else(|| CniError::io(format!("host veth {host_veth} vanished after creation")))?;
    let mut reqs = Vec::with_capacity(2);
    if let Some(mtu) = mtu {
        reqs.push(netlink::set_mtu(link.index, host_veth, mtu));
    }
    reqs.push(netlink::add_route_v4(
        link.index,
        host_veth,
        ip,
        32,
        None,
        RouteMode::Replace,
    ));
    nl.apply(reqs).map_err(nl_err)?;
    Ok(link)
}

/// Best effort: the original error is what the runtime must see.
fn rollback(nl: &mut Netlink, conf: &NetConf, plan: &AddPlan<'_>) {
    watchdog::phase("rolling back (removing the veth, releasing the address)");
    let _ = nl.del_link(&plan.host_veth);
    let req = RequestBody::Release {
        key: plan.key.clone(),
    };
    let queue = match call(conf, req, ROLLBACK_TIMEOUT) {
        Err(e) => queueable(&e),
        Ok(ResponseBody::Error(e)) => e.code == code::TRY_AGAIN_LATER,
        Ok(_) => false,
    };
    if queue {
        // Queued now, so a retried ADD of this attachment has the daemon consume it first.
        let _ = enqueue_release(&conf.release_queue(), &plan.key, None);
    }
}

// ---------------------------------------------------------------------------------------------
// DEL

fn cmd_del(env: &Env, conf: &NetConf) -> Result<()> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    // CNI_NETNS is not needed: removing the host end of the pair removes the pod end with it, and
    // the second DEL of a sandbox comes without a namespace at all.
    let host_veth = veth_name(container_id, ifname);
    let mut nl = Netlink::open().map_err(nl_err)?;
    // If the veth cannot be removed the address must not be released: it is still routed here.
    nl.del_link(&host_veth).map_err(nl_err)?;
    let ip = conf
        .prev_result
        .as_ref()
        .and_then(|prev| result::find_prev(prev, ifname))
        .map(|p| p.ip);
    release(conf, key_of(container_id, ifname), ip)
}

/// Connection-level failures where handing the release to the queue is safe: release is
/// idempotent on the daemon side, and a queued entry never releases an allocation made after it.
fn queueable(e: &ClientError) -> bool {
    matches!(e, ClientError::Unreachable { .. } | ClientError::Io { .. })
}

/// Releases the attachment's address, or queues the release when the daemon cannot take it now:
/// unreachable, or reachable but unable to record it (its store is failing, code 11). The veth is
/// gone by then, so failing DEL would only make the runtime retry what the queue already does.
fn release(conf: &NetConf, key: AttachmentKey, ip: Option<Ipv4Addr>) -> Result<()> {
    let socket = conf.socket().display().to_string();
    let why = match call(
        conf,
        RequestBody::Release { key: key.clone() },
        CALL_TIMEOUT,
    ) {
        Ok(ResponseBody::Released { .. }) | Ok(ResponseBody::Ok) => return Ok(()),
        Ok(ResponseBody::Error(e)) if e.code == code::TRY_AGAIN_LATER => {
            format!(
                "vpcnetd at {socket} could not record the release ({})",
                e.msg
            )
        }
        Ok(ResponseBody::Error(e)) => return Err(e.into()),
        Ok(other) => return Err(unexpected("release", &other)),
        Err(e) if queueable(&e) => {
            format!("vpcnetd at {socket} could not be asked to release the address ({e})")
        }
        Err(e) => return Err(CniError::daemon("release", &socket, e)),
    };
    let dir = conf.release_queue();
    enqueue_release(&dir, &key, ip).map(|_| ()).map_err(|qe| {
        CniError::io(format!(
            "{why}, and queueing the release in {} failed: {qe}",
            dir.display()
        ))
    })
}

/// Leaves a release for the daemon to replay (see `vpcnet_api::release_queue`): written
/// atomically under a fixed-length name derived from the key, stamped with the time it was
/// queued so it can never release a later allocation of the same key.
pub fn enqueue_release(
    dir: &Path,
    key: &AttachmentKey,
    ip: Option<Ipv4Addr>,
) -> io::Result<PathBuf> {
    release_queue::enqueue(dir, &QueuedRelease::now(key.clone(), ip.map(IpAddr::V4)))
}

// ---------------------------------------------------------------------------------------------
// CHECK

fn cmd_check(env: &Env, conf: &NetConf) -> Result<()> {
    if !config::version_at_least(&conf.cni_version, "0.4.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, got {}",
                conf.cni_version
            ),
        ));
    }
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns_path = env.netns()?;
    parse_cni_args(&env.args)?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::config("CHECK needs prevResult in the network configuration"))?;
    let want = result::find_prev(prev, ifname).ok_or_else(|| {
        CniError::check(format!(
            "prevResult has no IPv4 address for interface {ifname}"
        ))
    })?;
    let ns = open_pod_netns(netns_path)?;
    let host_veth = veth_name(container_id, ifname);
    let mut nl = Netlink::open().map_err(nl_err)?;

    let (pod, host) = std::thread::scope(|s| {
        let pod = s.spawn(|| check_pod(&ns, ifname, netns_path, &want));
        let host = check_host(&mut nl, &host_veth, want.ip);
        (pod.join(), host)
    });
    let mut problems = pod.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    problems.extend(host?);
    if !problems.is_empty() {
        return Err(CniError::check(problems.join("; ")));
    }

    let socket = conf.socket().display().to_string();
    watchdog::phase(format!(
        "waiting for vpcnetd at {} to answer check",
        quote(&socket)
    ));
    let req = RequestBody::Check(CheckRequest {
        key: key_of(container_id, ifname),
        ips: vec![want.ip.into()],
    });
    match call(conf, req, CALL_TIMEOUT) {
        Ok(ResponseBody::Ok) => Ok(()),
        Ok(ResponseBody::Error(e)) => Err(e.into()),
        Ok(other) => Err(unexpected("check", &other)),
        Err(e) => Err(CniError::daemon("check", &socket, e)),
    }
}

fn check_pod(
    ns: &File,
    ifname: &str,
    netns_path: &str,
    want: &result::PrevAttachment,
) -> Result<Vec<String>> {
    netns::enter(ns)
        .map_err(|e| CniError::io(format!("entering the pod network namespace: {e}")))?;
    let mut nl = Netlink::open().map_err(nl_err)?;
    let Some(link) = nl.link_by_name(ifname).map_err(nl_err)? else {
        return Ok(vec![format!(
            "interface {ifname} does not exist in {netns_path}"
        )]);
    };
    let mut problems = Vec::new();
    let i = link.index;
    if !link.up {
        problems.push(format!("interface {ifname} is down"));
    }
    if let Some(mac) = &want.mac
        && !mac.eq_ignore_ascii_case(&format_mac(&link.mac))
    {
        problems.push(format!(
            "interface {ifname} has MAC {} instead of {mac}",
            format_mac(&link.mac)
        ));
    }
    let addrs = nl.addrs_v4().map_err(nl_err)?;
    if !addrs
        .iter()
        .any(|a| a.index == i && a.ip == want.ip && a.prefix_len == 32)
    {
        problems.push(format!("address {}/32 is missing on {ifname}", want.ip));
    }
    let routes = nl.routes_v4().map_err(nl_err)?;
    if !routes.iter().any(|r| {
        r.prefix_len == 32 && r.dst == POD_GATEWAY && r.gateway.is_none() && r.oif == Some(i)
    }) {
        problems.push(format!("route {POD_GATEWAY}/32 dev {ifname} is missing"));
    }
    if !routes
        .iter()
        .any(|r| r.prefix_len == 0 && r.gateway == Some(POD_GATEWAY) && r.oif == Some(i))
    {
        problems.push(format!(
            "default route via {POD_GATEWAY} dev {ifname} is missing"
        ));
    }
    let neighs = nl.neighs_v4().map_err(nl_err)?;
    if !neighs.iter().any(|n| {
        n.index == i
            && n.ip == POD_GATEWAY
            && n.permanent
            && n.mac.as_deref() == Some(&HOST_VETH_MAC[..])
    }) {
        problems.push(format!(
            "permanent neighbour {POD_GATEWAY} lladdr {} is missing on {ifname}",
            format_mac(&HOST_VETH_MAC)
        ));
    }
    Ok(problems)
}

fn check_host(nl: &mut Netlink, host_veth: &str, ip: Ipv4Addr) -> Result<Vec<String>> {
    let Some(link) = nl.link_by_name(host_veth).map_err(nl_err)? else {
        return Ok(vec![format!("host veth {host_veth} does not exist")]);
    };
    let mut problems = Vec::new();
    if !link.up {
        problems.push(format!("host veth {host_veth} is down"));
    }
    let routes = nl.routes_v4().map_err(nl_err)?;
    if !routes
        .iter()
        .any(|r| r.prefix_len == 32 && r.dst == ip && r.oif == Some(link.index))
    {
        problems.push(format!("node route {ip}/32 dev {host_veth} is missing"));
    }
    Ok(problems)
}

// ---------------------------------------------------------------------------------------------
// GC

fn cmd_gc(conf: &NetConf) -> Result<()> {
    if !config::version_at_least(&conf.cni_version, "1.1.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "GC needs cniVersion 1.1.0 or later, got {}",
                conf.cni_version
            ),
        ));
    }
    // Treating a missing list as empty would release every pod on the node.
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::config("GC needs cni.dev/valid-attachments in the network configuration")
    })?;
    let valid = valid
        .iter()
        .map(|a| key_of(&a.container_id, &a.ifname))
        .collect();
    let socket = conf.socket().display().to_string();
    watchdog::phase(format!(
        "waiting for vpcnetd at {} to answer gc",
        quote(&socket)
    ));
    let req = RequestBody::Gc(GcRequest {
        valid,
        network: conf.network.clone(),
    });
    let released = match call(conf, req, GC_TIMEOUT) {
        Ok(ResponseBody::GcDone { released }) => released,
        Ok(ResponseBody::Error(e)) => return Err(e.into()),
        Ok(other) => return Err(unexpected("gc", &other)),
        Err(e) => return Err(CniError::daemon("gc", &socket, e)),
    };
    if released.is_empty() {
        return Ok(());
    }
    let mut nl = Netlink::open().map_err(nl_err)?;
    // Keep going past failures: one stuck link must not keep the rest around.
    let failures: Vec<String> = released
        .iter()
        .filter_map(|a| {
            nl.del_link(&veth_name(&a.key.container_id, &a.key.ifname))
                .err()
                .map(|e| e.to_string())
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::io(format!(
            "GC released {} attachments but could not remove some links: {}",
            released.len(),
            failures.join("; ")
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// STATUS

fn cmd_status(conf: &NetConf) -> Result<()> {
    if !config::version_at_least(&conf.cni_version, "1.1.0") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "STATUS needs cniVersion 1.1.0 or later, got {}",
                conf.cni_version
            ),
        ));
    }
    let socket = quote(&conf.socket().display().to_string());
    let unavailable = |msg: String| CniError::new(code::UNAVAILABLE, msg);
    watchdog::phase(format!("waiting for vpcnetd at {socket} to answer status"));
    match call(conf, RequestBody::Status, STATUS_TIMEOUT) {
        Ok(ResponseBody::Status(info)) if info.ready => Ok(()),
        Ok(ResponseBody::Status(info)) => {
            let why = if info.message.is_empty() {
                "no reason given".to_string()
            } else {
                info.message
            };
            Err(unavailable(format!(
                "vpcnetd at {socket} is not ready: {why}"
            )))
        }
        Ok(ResponseBody::Error(e)) => Err(unavailable(format!(
            "vpcnetd at {socket} is not ready: {}",
            e.msg
        ))
        .with_details(e.details)),
        Ok(other) => Err(unavailable(format!(
            "vpcnetd at {socket} answered STATUS with an unexpected {other:?}"
        ))),
        Err(e) => Err(unavailable(format!(
            "vpcnetd is unreachable at {socket}: {e} — is the vpcnet DaemonSet pod running on \
             this node?"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn veth_names_are_deterministic_short_and_distinct() {
        let a = veth_name("0123456789abcdef", "eth0");
        assert_eq!(a, veth_name("0123456789abcdef", "eth0"));
        assert!(a.len() <= crate::args::MAX_IFNAME, "{a}");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("vpc"));
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(vpcnet_api::is_host_veth_name(&a));
        assert!(!vpcnet_api::is_host_veth_name("vpc0"));
        assert!(!vpcnet_api::is_host_veth_name("eth0xxxxxxxxxx"));
        assert_ne!(a, veth_name("0123456789abcdef", "eth1"));
        assert_ne!(a, veth_name("0123456789abcdeg", "eth0"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(veth_name("ab", "c"), veth_name("a", "bc"));
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..32 {
            let m = random_mac().unwrap();
            assert_eq!(m[0] & 0x01, 0);
            assert_eq!(m[0] & 0x02, 0x02);
        }
    }

    #[test]
    fn version_json_lists_all() {
        let v: serde_json::Value = serde_json::from_str(&version_json()).unwrap();
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn dispatch_errors_without_touching_the_system() {
        let run = |cmd: &str, stdin: &str, extra: &[(&str, &str)]| {
            let mut vars: Vec<(String, String)> = vec![("CNI_COMMAND".into(), cmd.into())];
            vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let env =
                Env::from_lookup(|k| vars.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()));
            dispatch(&env, &mut stdin.as_bytes())
        };
        let inv = run("ADD", "{{{", &[]);
        assert_eq!(inv.result.unwrap_err().code, code::DECODE);
        let inv = run("ADD", r#"{"cniVersion":"0.2.0"}"#, &[]);
        assert_eq!(inv.result.unwrap_err().code, code::INCOMPATIBLE_VERSION);
        let inv = run(
            "ADD",
            r#"{"cniVersion":"0.4.0"}"#,
            &[("CNI_CONTAINERID", "c")],
        );
        assert_eq!(inv.version, "0.4.0");
        let e = inv.result.unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_IFNAME"), "{}", e.msg);
        let inv = run("BOGUS", "", &[]);
        assert_eq!(inv.result.unwrap_err().code, code::INVALID_ENV);
        let inv = run("GC", r#"{"cniVersion":"1.1.0"}"#, &[]);
        assert_eq!(inv.result.unwrap_err().code, code::INVALID_CONFIG);
        let inv = run("CHECK", r#"{"cniVersion":"0.3.1"}"#, &[]);
        assert_eq!(inv.result.unwrap_err().code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn queue_file_is_complete_json() {
        let dir = std::env::temp_dir().join(format!("vpcnt-q-{}", std::process::id()));
        let key = key_of("abc", "eth0");
        let path =
            enqueue_release(&dir.join("queue"), &key, Some(Ipv4Addr::new(10, 0, 0, 5))).unwrap();
        assert_eq!(path.file_name().unwrap(), &*release_queue::file_name(&key));
        let back = release_queue::read(&path).unwrap();
        assert_eq!(back.key, key);
        assert_eq!(back.ip, Some(Ipv4Addr::new(10, 0, 0, 5).into()));
        let names: Vec<_> = fs::read_dir(dir.join("queue")).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 9 item 2: `{container}-{ifname}.json` gave ("a-b","c-d") and ("a-b-c","d") one
    /// file, and a 256-character container ID a name longer than NAME_MAX.
    #[test]
    fn queue_names_neither_collide_nor_overflow() {
        let dir = std::env::temp_dir().join(format!("vpcnt-q2-{}", std::process::id()));
        let keys = [
            key_of("a-b", "c-d"),
            key_of("a-b-c", "d"),
            key_of(&"c".repeat(256), "eth0"),
        ];
        let mut paths = Vec::new();
        for k in &keys {
            paths.push(enqueue_release(&dir, k, None).expect("queued"));
        }
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), keys.len(), "one file per key: {paths:?}");
        for (p, k) in paths.iter().zip({
            let mut ks: Vec<_> = keys.iter().collect();
            ks.sort_by_key(|k| release_queue::file_name(k));
            ks
        }) {
            assert_eq!(&release_queue::read(p).unwrap().key, k);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
