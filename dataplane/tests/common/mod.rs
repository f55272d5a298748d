//! The shared fixture of the dataplane's root-only tests: the harness's cluster of network
//! namespaces (two nodes, a VPC host, a router; no daemons) and pods wired as the CNI plugin
//! wires them, with the dataplanes started by the tests themselves.
//!
//! Everything lives in namespaces named `<prefix>-<role>` (a prefix per topology, from the
//! harness, starting with the project prefix so `cargo xtask clean` recognises leftovers); traffic
//! only goes to those namespaces' addresses; nothing is attached in the root namespace. Pins live
//! under `/sys/fs/bpf/vpcnet/<prefix>-node{1,2}`. The `Topology` guard removes all of it on drop,
//! panics included.
//!
//! ```text
//!             fabric bridge (10.20.0.0/16, the VPC subnet)
//!   node1 eth0 .0.11   node2 eth0 .0.12   vpc host .0.100   router .0.1
//!     pods p1 10.20.1.10, p2 10.20.1.11 (net 1)              ├ 10.30.0.1/24 ── phy 10.30.0.10
//!          p4 10.40.0.10 (net 2, unpeered)                   └ 203.0.113.1/24 ── inet 203.0.113.10
//!   node2: p3 10.20.1.140 (net 1)
//! ```

// Each test binary uses a part of the fixture.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vpcnet_dataplane::{AttachMode, Dataplane, DataplaneConfig, Endpoint, StartOptions};
use vpcnet_ipam::{NetworkConfig, SubnetConfig};
use vpcnet_tests::cluster::{remove_pins, wire_pod};
use vpcnet_tests::probe::{self, WhoAmI};
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

/// Runs `f` on a thread that has entered namespace `ns` (the dataplane works on the calling
/// thread's netns, like the daemon does inside the node's).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    vpcnet_tests::netns::in_netns(ns, f).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The topology tests flood pings and measure loss: one at a time, so a test's loss figure is
/// its own and not another's CPU contention on a small machine.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub const P1: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 10);
pub const P2: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 11);
pub const P3: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 140);
pub const P4: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 10);
pub const NODE1: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 11);
pub const VPC_HOST: Ipv4Addr = vpcnet_tests::cluster::VPC_HOST_IP;
pub const PHY_HOST: Ipv4Addr = vpcnet_tests::cluster::PHYS_HOST_IP;
pub const INET_HOST: Ipv4Addr = vpcnet_tests::cluster::INET_HOST_IP;

pub fn run(cmd: &mut Command) -> Output {
    vpcnet_tests::netns::run(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The harness's cluster of namespaces (fabric, router, VPC, physical and internet hosts, two
/// nodes) without its daemons, the dataplanes started by the test itself on the nodes, and the
/// pods wired by hand. Tests name namespaces by role: `fab`, `rtr`, `vpc`, `phy`, `inet`,
/// `n1`, `n2`, and each pod's own name.
pub struct Topology {
    /// Dropped before the cluster, after the pins: see `Drop`.
    pods: Vec<Netns>,
    cluster: Cluster,
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pins first: removing a link pin detaches its program; then the namespaces (and with
        // them every interface, route and nft table of the run).
        for n in &self.cluster.nodes {
            let _ = remove_pins(&n.bpf_dir);
        }
        self.pods.clear();
    }
}

impl Topology {
    /// A fresh topology with pods p1, p2, p4 wired on node1 and p3 on node2 (not yet known to
    /// any dataplane). Its namespaces and pins carry a prefix of their own, so topologies of
    /// tests running at once never meet.
    pub fn build() -> (Topology, BTreeMap<&'static str, Endpoint>) {
        let cluster = Cluster::build(ClusterSpec {
            nodes: 2,
            ..ClusterSpec::default()
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
        let mut t = Topology {
            pods: Vec::new(),
            cluster,
        };
        let mut eps = BTreeMap::new();
        eps.insert("p1", t.pod("p1", "n1", P1, [2, 0, 0, 0, 1, 10], 1));
        eps.insert("p2", t.pod("p2", "n1", P2, [2, 0, 0, 0, 1, 11], 1));
        eps.insert("p3", t.pod("p3", "n2", P3, [2, 0, 0, 0, 1, 140], 1));
        eps.insert("p4", t.pod("p4", "n1", P4, [2, 0, 0, 0, 4, 10], 2));
        (t, eps)
    }

    pub fn netns(&self, role: &str) -> &Netns {
        let c = &self.cluster;
        match role {
            "fab" => &c.fabric,
            "rtr" => &c.router,
            "vpc" => &c.vpc_host,
            "phy" => &c.phys_host,
            "inet" => &c.inet_host,
            "n1" => &c.node(0).ns,
            "n2" => &c.node(1).ns,
            pod => {
                let name = format!("{}-{pod}", c.prefix);
                self.pods
                    .iter()
                    .find(|n| n.name() == name)
                    .unwrap_or_else(|| panic!("no namespace of role {role}"))
            }
        }
    }

    pub fn ns(&self, role: &str) -> String {
        self.netns(role).name().to_string()
    }

    /// `ip -n <role's ns> <args>`; panics on failure.
    pub fn ip(&self, role: &str, args: &str) -> String {
        let args: Vec<&str> = args.split_whitespace().collect();
        self.netns(role)
            .ip(&args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A command that runs inside `role`'s namespace.
    pub fn exec(&self, role: &str, args: &[&str]) -> Command {
        let mut c = self
            .netns(role)
            .command(args[0])
            .unwrap_or_else(|e| panic!("{e:#}"));
        c.args(&args[1..]);
        c
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        let i = if node == "node1" { 0 } else { 1 };
        self.cluster.node(i).bpf_dir.clone()
    }

    /// Wires a pod exactly as the CNI plugin does. Returns the endpoint for the dataplane.
    pub fn pod(
        &mut self,
        role: &str,
        node: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
        network_id: u16,
    ) -> Endpoint {
        let ns = Netns::create(&format!("{}-{role}", self.cluster.prefix))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let veth = format!("vpc{role}{}", "0".repeat(11 - role.len()));
        let host_ifindex = wire_pod(self.netns(node), &ns, &veth, ip, mac)
            .unwrap_or_else(|e| panic!("wiring {role}: {e:#}"));
        self.pods.push(ns);
        Endpoint {
            ip,
            host_ifindex,
            pod_mac: mac,
            network_id,
        }
    }

    pub fn config(&self, node: &str) -> DataplaneConfig {
        let net = |s: &str| s.parse().unwrap();
        let subnet = |cidr: &str, blocks: &[(&str, &str)]| SubnetConfig {
            name: "main".into(),
            cidr: net(cidr),
            gateway: None,
            reserved: vec![],
            blocks: blocks
                .iter()
                .map(|(n, b)| (n.to_string(), vec![net(b)]))
                .collect(),
        };
        let networks = vec![
            NetworkConfig {
                name: "vpc-a".into(),
                id: 1,
                routable_cidrs: vec![net("10.20.0.0/16"), net("10.30.0.0/24")],
                masquerade_exclude: vec![],
                peers: vec![],
                default_subnet: None,
                subnets: vec![subnet(
                    "10.20.0.0/16",
                    &[("node1", "10.20.1.0/25"), ("node2", "10.20.1.128/25")],
                )],
            },
            NetworkConfig {
                name: "vpc-b".into(),
                id: 2,
                routable_cidrs: vec![net("10.40.0.0/16")],
                masquerade_exclude: vec![],
                peers: vec![],
                default_subnet: None,
                subnets: vec![subnet("10.40.0.0/24", &[("node1", "10.40.0.0/26")])],
            },
        ];
        let local_pod_cidrs = networks
            .iter()
            .flat_map(|n| n.subnets.iter())
            .flat_map(|s| s.blocks.get(node).cloned().unwrap_or_default())
            .collect();
        DataplaneConfig {
            pin_dir: self.pin_dir(node),
            uplink: "eth0".into(),
            networks,
            local_pod_cidrs,
        }
    }

    /// node1 attaches endpoints with TCX links (the default), node2 with classic filters, so
    /// both modes carry traffic, survive restarts and uninstall cleanly.
    pub fn start(&self, node: &str) -> Dataplane {
        let (ns, endpoint_attach) = if node == "node1" {
            (self.ns("n1"), AttachMode::Tcx)
        } else {
            (self.ns("n2"), AttachMode::Classic)
        };
        let cfg = self.config(node);
        in_ns(&ns, move || {
            Dataplane::start_with(
                cfg,
                StartOptions {
                    endpoint_attach,
                    ..Default::default()
                },
            )
            .expect("Dataplane::start")
        })
    }

    /// `count` pings 0.2 s apart, each given 1 s.
    pub fn ping(&self, from: &str, to: Ipv4Addr, count: u32) -> Child {
        probe::ping_flood(self.netns(from), to, count, Duration::from_millis(200))
            .unwrap_or_else(|e| panic!("ping from {from}: {e:#}"))
    }

    /// Runs all pings at once; asserts each one's outcome (reachable or not).
    pub fn pings(&self, cases: &[(&str, Ipv4Addr, bool)]) {
        let children: Vec<_> = cases
            .iter()
            .map(|(from, to, ok)| {
                (
                    *from,
                    *to,
                    *ok,
                    self.ping(from, *to, if *ok { 3 } else { 2 }),
                )
            })
            .collect();
        let mut failures = Vec::new();
        for (from, to, ok, child) in children {
            let out = child.wait_with_output().expect("ping");
            if out.status.success() != ok {
                failures.push(format!(
                    "{from} -> {to}: expected {}, got: {}",
                    if ok { "reachable" } else { "unreachable" },
                    String::from_utf8_lossy(&out.stdout).trim()
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "ping failures:\n{}",
            failures.join("\n")
        );
    }

    /// Connects from `client` to a one-shot TCP server in `server` and returns the peer address
    /// the server saw.
    pub fn peer_seen(&self, server: &str, addr: Ipv4Addr, client: &str) -> Ipv4Addr {
        let sa = SocketAddr::from((addr, 7000));
        self.peer_seen_via(server, sa, client, sa, None)
            .unwrap_or_else(|e| panic!("{client} -> {sa}: {e}"))
    }

    /// A one-shot TCP server on `bind` in `server` answers with the peer address it saw;
    /// `client` connects to `connect` (from `src_port` when given) and reads the answer. The
    /// client only gets it if every reply came back from `connect` — through NAT that means
    /// de-NATed by conntrack. Never hangs: the server gives up after 4 s.
    pub fn peer_seen_via(
        &self,
        server: &str,
        bind: SocketAddr,
        client: &str,
        connect: SocketAddr,
        src_port: Option<u16>,
    ) -> Result<Ipv4Addr, String> {
        let SocketAddr::V4(bind) = bind else {
            unreachable!("IPv4 only")
        };
        let _server = WhoAmI::start(self.netns(server), bind).map_err(|e| format!("{e:#}"))?;
        in_ns(&self.ns(client), move || {
            let mut c = connect_from(connect, src_port).map_err(|e| format!("connect: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).map_err(|e| format!("read: {e}"))?;
            s.parse().map_err(|e| format!("answer {s:?}: {e}"))
        })
    }

    /// Packets counted by the nft guard's drop rules in `node`'s netns.
    pub fn guard_drops(&self, node: &str) -> u64 {
        let out = run(&mut self.exec(node, &["nft", "list", "chain", "ip", "vpcnet", "forward"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("drop"))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                it.position(|w| w == "packets")?;
                it.next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

/// `TcpStream::connect_timeout`, optionally from a fixed source port (to reuse a 5-tuple).
pub fn connect_from(to: SocketAddr, src_port: Option<u16>) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let Some(port) = src_port else {
        return TcpStream::connect_timeout(&to, Duration::from_secs(3));
    };
    let SocketAddr::V4(to) = to else {
        unreachable!("IPv4 only")
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned by the TcpStream built at once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        // Bounds the blocking connect below.
        stream.set_write_timeout(Some(Duration::from_secs(3)))?;
        let local = sin(Ipv4Addr::UNSPECIFIED, port);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*to.ip(), to.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

pub fn drop_count(dp: &Dataplane, reason: &str) -> u64 {
    dp.counters()
        .unwrap()
        .drops
        .iter()
        .find(|(r, _)| r == reason)
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no drop reason {reason}"))
}

pub fn node_count(dp: &Dataplane, name: &str) -> u64 {
    dp.node_counters()
        .unwrap()
        .iter()
        .find(|(r, _)| r == name)
        .map(|(_, n)| *n)
        .unwrap()
}

pub fn require_root() {
    // SAFETY: trivial getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the dataplane tests need root (netns, bpffs, TCX); run them as root"
    );
    assert!(
        std::path::Path::new("/sys/fs/bpf").exists(),
        "/sys/fs/bpf missing"
    );
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
    }
}

pub struct Phases(Instant, Instant);
impl Phases {
    pub fn new() -> Self {
        Phases(Instant::now(), Instant::now())
    }
    pub fn done(&mut self, name: &str) {
        eprintln!(
            "[dataplane] {name}: {:.0} ms (total {:.1} s)",
            self.1.elapsed().as_secs_f64() * 1e3,
            self.0.elapsed().as_secs_f64()
        );
        self.1 = Instant::now();
    }
}

/// A topology with both dataplanes started and every pod installed: node1 with p1, p2, p4,
/// node2 with p3.
pub struct Started {
    pub topo: Topology,
    pub eps: BTreeMap<&'static str, Endpoint>,
    pub dp1: Dataplane,
    pub dp2: Dataplane,
}

impl Started {
    pub fn new() -> Started {
        let (topo, eps) = Topology::build();
        let dp1 = topo.start("node1");
        let dp2 = topo.start("node2");
        let s = Started {
            topo,
            eps,
            dp1,
            dp2,
        };
        for name in ["p1", "p2", "p4"] {
            s.add("node1", name);
        }
        s.add("node2", "p3");
        s
    }

    pub fn dp(&self, node: &str) -> &Dataplane {
        if node == "node1" {
            &self.dp1
        } else {
            &self.dp2
        }
    }

    pub fn node_ns(&self, node: &str) -> String {
        self.topo.ns(if node == "node1" { "n1" } else { "n2" })
    }

    pub fn add(&self, node: &str, pod: &str) {
        let ep = self.eps[pod].clone();
        let dp = self.dp(node);
        in_ns(&self.node_ns(node), || {
            dp.add_endpoint(&ep).expect("add_endpoint")
        });
    }

    /// Restarts node1's dataplane (drop, start from the pins), the way a daemon restart does.
    pub fn restart_node1(self) -> Started {
        let Started {
            topo,
            eps,
            dp1,
            dp2,
        } = self;
        drop(dp1);
        let dp1 = topo.start("node1");
        Started {
            topo,
            eps,
            dp1,
            dp2,
        }
    }
}

/// A `ping -i 0.01` (100 pps) of `count` packets from `from` to `to`, for loss across a change.
pub fn flood(topo: &Topology, from: &str, to: Ipv4Addr, count: u32) -> Child {
    probe::ping_flood(topo.netns(from), to, count, Duration::from_millis(10))
        .unwrap_or_else(|e| panic!("flood from {from}: {e:#}"))
}

/// Waits for a [`flood`] and asserts it lost nothing.
pub fn assert_no_loss(name: &str, child: Child, count: u32) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        probe::ping_summary(&text),
        Some((count, count)),
        "{name} lost packets: {text}"
    );
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> i64 {
    // SAFETY: `attr` is a zeroed `union bpf_attr` prefix for `cmd`; the pointers in it refer to
    // buffers alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    assert!(r >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    r
}

/// Replaces the map pinned at `pin` by a new hash map of the given shape holding `entries`: what
/// a release with another layout of that map would have left. The replaced map lives on while
/// the programs attached before use it, as it would during a real upgrade.
pub fn replace_pin_with_hash_map(
    pin: &Path,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    entries: &[(Vec<u8>, Vec<u8>)],
) {
    use std::os::unix::ffi::OsStrExt as _;
    let name = pin.file_name().unwrap().as_bytes();
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&BPF_MAP_TYPE_HASH.to_ne_bytes());
    attr[4..8].copy_from_slice(&(key_size as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(value_size as u32).to_ne_bytes());
    attr[12..16].copy_from_slice(&max_entries.to_ne_bytes());
    let n = name.len().min(15);
    attr[28..28 + n].copy_from_slice(&name[..n]);
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr) as u32;
    for (key, value) in entries {
        assert_eq!((key.len(), value.len()), (key_size, value_size));
        let mut attr = [0u8; 32];
        attr[0..4].copy_from_slice(&fd.to_ne_bytes());
        attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr);
    }
    std::fs::remove_file(pin).unwrap_or_else(|e| panic!("removing {}: {e}", pin.display()));
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&fd.to_ne_bytes());
    sys_bpf(BPF_OBJ_PIN, &mut attr);
    // SAFETY: our descriptor; the pin holds the map now.
    unsafe { libc::close(fd as i32) };
}
