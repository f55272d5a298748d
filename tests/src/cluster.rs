//! A Kubernetes-like cluster built out of network namespaces.
//!
//! ```text
//!   pods ──veth── node1 ─┐                         ┌── phys host 10.30.0.10   ("physical cloud")
//!   pods ──veth── node2 ─┼─ fabric (bridge, VPC) ──┤ router
//!               vpc host ┘   10.20.0.0/16          └── internet host 203.0.113.10
//! ```
//! Nothing is created in the root namespace: every veth is made with both ends already inside
//! namespaces of this run, so no traffic can reach a real interface.

use crate::netns::{Netns, PROJECT_PREFIX, run_prefix};
use anyhow::{Context as _, Result, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const VPC_CIDR: &str = "10.20.0.0/16";
pub const VPC_PREFIX_LEN: u8 = 16;
pub const ROUTER_VPC_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);
pub const VPC_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
pub const PHYS_CIDR: &str = "10.30.0.0/24";
pub const ROUTER_PHYS_IP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 1);
pub const PHYS_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 10);
pub const ROUTER_INET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const INET_HOST_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A second virtual network, isolated from the first unless peered.
pub const NET_B_CIDR: &str = "10.40.0.0/16";

/// Root of pinned BPF objects of all runs; each node pins under `<root>/<prefix>-<node>`.
pub const BPF_ROOT: &str = "/sys/fs/bpf/vpcnet";

pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, 0, 11 + i as u8)
}

/// This node's block of the VPC subnet ("secondary IPs" of its NIC).
pub fn node_block(i: usize) -> String {
    format!("10.20.{}.0/24", i + 1)
}

pub fn node_block_b(i: usize) -> String {
    format!("10.40.{}.0/24", i + 1)
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// Seconds before a released address is reused (tests shorten it).
    pub cooldown_secs: u64,
    /// Whether vpcnetd loads the eBPF dataplane (`false`: plain kernel routes).
    pub dataplane: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 2,
            cooldown_secs: 30,
            dataplane: true,
        }
    }
}

pub struct Node {
    pub name: String,
    pub index: usize,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub release_queue: PathBuf,
    pub bpf_dir: PathBuf,
    daemon: Option<Child>,
}

pub struct Cluster {
    pub prefix: String,
    pub spec: ClusterSpec,
    pub dir: PathBuf,
    // Drop order matters: nodes (daemons) first, then the hosts and the fabric.
    pub nodes: Vec<Node>,
    pub vpc_host: Netns,
    pub phys_host: Netns,
    pub inet_host: Netns,
    pub router: Netns,
    pub fabric: Netns,
    keep: bool,
}

impl Cluster {
    /// A cluster of `nodes` with the default spec (eBPF dataplane), every daemon started.
    pub fn started(nodes: usize) -> Result<Cluster> {
        let mut c = Cluster::build(ClusterSpec {
            nodes,
            ..ClusterSpec::default()
        })?;
        for i in 0..nodes {
            c.node_mut(i).start_daemon()?;
        }
        Ok(c)
    }

    pub fn build(spec: ClusterSpec) -> Result<Cluster> {
        let prefix = run_prefix();
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(dir.join("manifests"))?;
        let ns = |role: &str| Netns::create(&format!("{prefix}-{role}"));
        let fabric = ns("fabric")?;
        let router = ns("router")?;
        let vpc_host = ns("vpchost")?;
        let phys_host = ns("phys")?;
        let inet_host = ns("inet")?;
        let mut cluster = Cluster {
            prefix: prefix.clone(),
            spec: spec.clone(),
            dir,
            nodes: Vec::new(),
            vpc_host,
            phys_host,
            inet_host,
            router,
            fabric,
            keep: false,
        };
        cluster.wire_fabric()?;
        for i in 0..spec.nodes {
            cluster.add_node(i)?;
        }
        Ok(cluster)
    }

    fn wire_fabric(&mut self) -> Result<()> {
        self.fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        self.fabric.ip(&["link", "set", "br0", "up"])?;
        attach(
            &self.fabric,
            "p-router",
            &self.router,
            "vpc0",
            &format!("{ROUTER_VPC_IP}/16"),
        )?;
        attach(
            &self.fabric,
            "p-vpchost",
            &self.vpc_host,
            "eth0",
            &format!("{VPC_HOST_IP}/16"),
        )?;
        self.vpc_host
            .ip(&["route", "add", "default", "via", &ROUTER_VPC_IP.to_string()])?;

        veth(&self.router, "phys0", &self.phys_host, "eth0")?;
        self.router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_PHYS_IP}/24"),
            "dev",
            "phys0",
        ])?;
        self.phys_host
            .ip(&["addr", "add", &format!("{PHYS_HOST_IP}/24"), "dev", "eth0"])?;
        self.phys_host.ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_PHYS_IP.to_string(),
        ])?;

        veth(&self.router, "inet0", &self.inet_host, "eth0")?;
        self.router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_INET_IP}/24"),
            "dev",
            "inet0",
        ])?;
        self.inet_host
            .ip(&["addr", "add", &format!("{INET_HOST_IP}/24"), "dev", "eth0"])?;
        self.inet_host.ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_INET_IP.to_string(),
        ])?;

        sysctl(&self.router, "net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    fn add_node(&mut self, i: usize) -> Result<()> {
        let name = format!("node{}", i + 1);
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let ip = node_ip(i);
        attach(
            &self.fabric,
            &format!("p-{name}"),
            &ns,
            "eth0",
            &format!("{ip}/16"),
        )?;
        ns.ip(&["route", "add", "default", "via", &ROUTER_VPC_IP.to_string()])?;
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let node = Node {
            socket: dir.join("vpcnetd.sock"),
            release_queue: dir.join("release-queue"),
            config_path: dir.join("vpcnetd.yaml"),
            bpf_dir: PathBuf::from(BPF_ROOT).join(format!("{}-{name}", self.prefix)),
            name,
            index: i,
            ns,
            ip,
            dir,
            daemon: None,
        };
        std::fs::write(&node.config_path, self.daemon_config(&node))?;
        self.nodes.push(node);
        Ok(())
    }

    /// The vpcnetd configuration of one node (JSON is YAML, and needs no YAML writer here).
    pub fn daemon_config(&self, node: &Node) -> String {
        let blocks_a: serde_json::Map<_, _> = (0..self.spec.nodes)
            .map(|i| (format!("node{}", i + 1), serde_json::json!([node_block(i)])))
            .collect();
        let blocks_b: serde_json::Map<_, _> = (0..self.spec.nodes)
            .map(|i| {
                (
                    format!("node{}", i + 1),
                    serde_json::json!([node_block_b(i)]),
                )
            })
            .collect();
        let config = serde_json::json!({
            "node": node.name,
            "uplink": "eth0",
            "state_dir": node.dir.join("state"),
            "socket": node.socket,
            "release_queue": node.release_queue,
            "bpf_dir": node.bpf_dir,
            "dataplane": if self.spec.dataplane { "ebpf" } else { "kernel" },
            "reconcile_interval_secs": 5,
            "manifests_dir": self.manifests_dir(),
            // Loopback of the node's own namespace: every node can use the same port.
            "metrics_addr": "127.0.0.1:9962",
            "ipam": {
                "cooldown_secs": self.spec.cooldown_secs,
                "default_network": "vpc-a",
                "networks": [
                    {
                        "name": "vpc-a",
                        "id": 1,
                        "routable_cidrs": [VPC_CIDR, PHYS_CIDR],
                        "subnets": [{
                            "name": "main",
                            "cidr": VPC_CIDR,
                            "gateway": ROUTER_VPC_IP,
                            // Nodes, the router and VPC hosts live in 10.20.0.0/24.
                            "reserved": [{"start": "10.20.0.1", "end": "10.20.0.255"}],
                            "blocks": blocks_a,
                        }]
                    },
                    {
                        "name": "vpc-b",
                        "id": 2,
                        "routable_cidrs": [NET_B_CIDR],
                        "subnets": [{
                            "name": "main",
                            "cidr": NET_B_CIDR,
                            "blocks": blocks_b,
                        }]
                    }
                ]
            }
        });
        serde_json::to_string_pretty(&config).unwrap_or_default()
    }

    /// The standalone cluster state every node's daemon reads (Namespace, Pod, NetworkPolicy YAML).
    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes (or replaces) one manifest file atomically, as `kubectl apply` of a file would.
    pub fn apply_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let dir = self.manifests_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join(file))?;
        Ok(())
    }

    /// Leaves namespaces, daemons and pins in place when the cluster is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
        for n in &mut self.nodes {
            n.ns.keep();
            n.daemon = None;
        }
        for ns in [
            &mut self.vpc_host,
            &mut self.phys_host,
            &mut self.inet_host,
            &mut self.router,
            &mut self.fabric,
        ] {
            ns.keep();
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// Every namespace of the run, for listings.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut v = vec![
            &self.fabric,
            &self.router,
            &self.vpc_host,
            &self.phys_host,
            &self.inet_host,
        ];
        v.extend(self.nodes.iter().map(|n| &n.ns));
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for n in &mut self.nodes {
            n.stop_daemon();
            let _ = remove_pins(&n.bpf_dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    /// Starts vpcnetd inside the node namespace and waits until its socket answers.
    pub fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with(|_| {}, true)
    }

    /// Starts vpcnetd with `adjust` applied to its command first (limits, umask, ...); waits until
    /// it says it is ready only if `wait_ready`.
    pub fn start_daemon_with(
        &mut self,
        adjust: impl FnOnce(&mut Command),
        wait_ready: bool,
    ) -> Result<()> {
        if self.daemon.is_some() {
            bail!("vpcnetd already runs on {}", self.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("vpcnetd.log"))?;
        let mut cmd = self.ns.command(bin_path("vpcnetd"))?;
        cmd.arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        adjust(&mut cmd);
        let child = cmd.spawn().context("starting vpcnetd")?;
        self.daemon = Some(child);
        if wait_ready {
            self.wait_ready(Duration::from_secs(20))
        } else {
            Ok(())
        }
    }

    /// Starts vpcnetd without waiting for it: callers keep running plugins against a daemon
    /// that is still starting (chaos tests).
    pub fn spawn_daemon(&mut self) -> Result<()> {
        self.start_daemon_with(|_| {}, false)
    }

    /// The running daemon's process id.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Waits until the daemon answers STATUS, ready or not, and returns the answer.
    pub fn wait_answering(&mut self, timeout: Duration) -> Result<vpcnet_api::StatusInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.daemon_running() {
                bail!(
                    "vpcnetd on {} is not running; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(vpcnet_api::ResponseBody::Status(s)) = vpcnet_api::call(
                &self.socket,
                vpcnet_api::RequestBody::Status,
                Duration::from_millis(500),
            ) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "vpcnetd on {} does not answer; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.daemon.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.daemon = None;
                bail!(
                    "vpcnetd on {} exited with {status}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            let status = vpcnet_api::call(
                &self.socket,
                vpcnet_api::RequestBody::Status,
                Duration::from_millis(500),
            );
            if let Ok(vpcnet_api::ResponseBody::Status(s)) = status
                && s.ready
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "vpcnetd on {} not ready after {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, like a crash or an OOM kill.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait, like a DaemonSet rollout.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn daemon_running(&mut self) -> bool {
        match self.daemon.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("vpcnetd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs `vpcnetctl` against this node's daemon.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = crate::netns::run(
            Command::new(bin_path("vpcnetctl"))
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

/// A veth pair whose ends are created directly inside two namespaces of the run.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// The next hop of every pod: a link-local address the node side answers for.
pub const POD_GATEWAY: &str = "169.254.1.1";
/// The MAC of every host-side veth, the one the pod's permanent neighbour entry names.
pub const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// Wires `pod` to `node` as the plugin does, without the plugin: a veth pair (`veth` on the
/// node, `eth0` in the pod), the pod's /32 with a default route through [`POD_GATEWAY`] and a
/// permanent neighbour entry for it, the node's host route. For tests of what sits below the
/// plugin (the dataplane); returns the host veth's ifindex.
pub fn wire_pod(node: &Netns, pod: &Netns, veth: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<u32> {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    let ip32 = format!("{ip}/32");
    node.ip(&[
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ])?;
    node.ip(&["link", "set", veth, "address", HOST_VETH_MAC, "up"])?;
    node.ip(&["route", "add", &ip32, "dev", veth, "scope", "link"])?;
    pod.ip(&["link", "set", "eth0", "address", &mac, "up"])?;
    pod.ip(&["addr", "add", &ip32, "dev", "eth0"])?;
    let gw32 = format!("{POD_GATEWAY}/32");
    pod.ip(&["route", "add", &gw32, "dev", "eth0", "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])?;
    pod.ip(&[
        "neigh",
        "add",
        POD_GATEWAY,
        "lladdr",
        HOST_VETH_MAC,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    node.ifindex(veth)
}

/// Plugs `host` into the fabric bridge with `addr` on its side.
fn attach(fabric: &Netns, port: &str, host: &Netns, ifname: &str, addr: &str) -> Result<()> {
    veth(fabric, port, host, ifname)?;
    fabric.ip(&["link", "set", port, "master", "br0"])?;
    host.ip(&["addr", "add", addr, "dev", ifname])?;
    Ok(())
}

pub fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    ns.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
        .map(|_| ())
}

/// Directory holding the project's binaries: `VPCNET_BIN_DIR`, else the cargo profile directory this
/// test executable was built into (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VPCNET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin_path(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Removes a pin directory (unlinking pins releases the programs and maps once nothing else holds them).
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes leftovers of crashed runs: namespaces and pin directories with the project prefix.
/// Returns what was removed.
pub fn clean_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    for ns in crate::netns::project_namespaces() {
        if Command::new("ip")
            .args(["netns", "del", &ns])
            .status()
            .is_ok_and(|s| s.success())
        {
            removed.push(format!("netns {ns}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir(BPF_ROOT) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PROJECT_PREFIX) && remove_pins(&e.path()).is_ok() {
                removed.push(format!("pins {}", e.path().display()));
            }
        }
    }
    // The shared root itself, once empty (never from a test's teardown: a parallel test may be about
    // to create its node directory in it).
    if std::fs::remove_dir(BPF_ROOT).is_ok() {
        removed.push(format!("empty {BPF_ROOT}"));
    }
    // Root-namespace links are never created by the harness; remove any with the prefix anyway, in
    // case a crashed experiment left one.
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line
                .split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or(""))
            else {
                continue;
            };
            if name.starts_with(PROJECT_PREFIX)
                && Command::new("ip")
                    .args(["link", "del", name])
                    .status()
                    .is_ok_and(|s| s.success())
            {
                removed.push(format!("link {name}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PROJECT_PREFIX) && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    removed
}
