//! End-to-end tests of the eBPF dataplane on a topology of network namespaces (root only).
//!
//! Everything lives in namespaces named `<prefix>-<role>` created here (prefix unique per run and
//! starting with the project prefix `vpcn`, so `cargo xtask clean` recognises leftovers); traffic
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

mod common;
use common::in_ns;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};
use vpcnet_dataplane::{self, AttachMode, Dataplane, DataplaneConfig, Endpoint, StartOptions};
use vpcnet_ipam::{NetworkConfig, SubnetConfig};

const P1: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 10);
const P2: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 11);
const P3: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 140);
const P4: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 10);
const NODE1: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 11);
const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
const PHY_HOST: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 10);
const INET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    pin_dirs: Vec<PathBuf>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pins first: removing a link pin detaches its program; then the namespaces (and with
        // them every interface, route and nft table of the run).
        for d in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn add_ns(&mut self, role: &str) -> String {
        let name = self.ns(role);
        run(Command::new("ip").args(["netns", "add", &name]));
        self.namespaces.push(name.clone());
        self.ip(role, "link set lo up");
        name
    }

    fn ip(&self, role: &str, args: &str) -> String {
        let out = run(Command::new("ip")
            .arg("-n")
            .arg(self.ns(role))
            .args(args.split_whitespace()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn exec(&self, role: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(role)]).args(args);
        c
    }

    fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/vpcnet/{}-{node}", self.prefix))
    }

    /// Plugs `role`'s `ifname` into the fabric bridge with `addr`, default route via the router.
    fn on_fabric(&self, role: &str, ifname: &str, addr: &str, gw: Option<&str>) {
        let port = format!("f{role}");
        self.ip(
            role,
            &format!(
                "link add {ifname} type veth peer name {port} netns {}",
                self.ns("fab")
            ),
        );
        self.ip("fab", &format!("link set {port} master br0 up"));
        self.ip(role, &format!("addr add {addr} dev {ifname}"));
        self.ip(role, &format!("link set {ifname} up"));
        if let Some(gw) = gw {
            self.ip(role, &format!("route add default via {gw}"));
        }
    }

    /// Wires a pod exactly as the CNI plugin does. Returns the endpoint for the dataplane.
    fn pod(
        &mut self,
        role: &str,
        node: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
        network_id: u16,
    ) -> Endpoint {
        self.add_ns(role);
        let veth = format!("vpc{role}{}", "0".repeat(11 - role.len()));
        let mac_s = mac.map(|b| format!("{b:02x}")).join(":");
        self.ip(
            node,
            &format!(
                "link add {veth} type veth peer name eth0 netns {}",
                self.ns(role)
            ),
        );
        self.ip(
            node,
            &format!("link set {veth} address ee:ee:ee:ee:ee:ee up"),
        );
        self.ip(node, &format!("route add {ip}/32 dev {veth} scope link"));
        self.ip(role, &format!("link set eth0 address {mac_s} up"));
        self.ip(role, &format!("addr add {ip}/32 dev eth0"));
        self.ip(role, "route add 169.254.1.1/32 dev eth0 scope link");
        self.ip(role, "route add default via 169.254.1.1 dev eth0");
        self.ip(
            role,
            "neigh add 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent",
        );
        let line = self.ip(node, &format!("-o link show {veth}"));
        let host_ifindex = line
            .split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("ifindex of {veth} in {line:?}"));
        Endpoint {
            ip,
            host_ifindex,
            pod_mac: mac,
            network_id,
        }
    }

    /// `tag` keeps the namespaces of tests running in parallel (same process id) apart.
    fn build(tag: &str) -> (Topology, BTreeMap<&'static str, Endpoint>) {
        let prefix = format!("vpcn{tag}{:x}", std::process::id() & 0xfffff);
        let mut t = Topology {
            prefix,
            namespaces: Vec::new(),
            pin_dirs: Vec::new(),
        };
        t.pin_dirs = vec![t.pin_dir("node1"), t.pin_dir("node2")];
        for d in &t.pin_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        for role in ["fab", "n1", "n2", "vpc", "rtr", "phy", "inet"] {
            t.add_ns(role);
        }
        t.ip("fab", "link add br0 type bridge");
        t.ip("fab", "link set br0 up");
        t.on_fabric("n1", "eth0", "10.20.0.11/16", Some("10.20.0.1"));
        t.on_fabric("n2", "eth0", "10.20.0.12/16", Some("10.20.0.1"));
        t.on_fabric("vpc", "eth0", "10.20.0.100/16", Some("10.20.0.1"));
        t.on_fabric("rtr", "up0", "10.20.0.1/16", None);
        for (role, ifname, raddr, haddr, gw) in [
            ("phy", "phy0", "10.30.0.1/24", "10.30.0.10/24", "10.30.0.1"),
            (
                "inet",
                "inet0",
                "203.0.113.1/24",
                "203.0.113.10/24",
                "203.0.113.1",
            ),
        ] {
            t.ip(
                "rtr",
                &format!(
                    "link add {ifname} type veth peer name eth0 netns {}",
                    t.ns(role)
                ),
            );
            t.ip("rtr", &format!("addr add {raddr} dev {ifname}"));
            t.ip("rtr", &format!("link set {ifname} up"));
            t.ip(role, &format!("addr add {haddr} dev eth0"));
            t.ip(role, "link set eth0 up");
            t.ip(role, &format!("route add default via {gw}"));
        }
        run(&mut t.exec("rtr", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]));
        let mut eps = BTreeMap::new();
        eps.insert("p1", t.pod("p1", "n1", P1, [2, 0, 0, 0, 1, 10], 1));
        eps.insert("p2", t.pod("p2", "n1", P2, [2, 0, 0, 0, 1, 11], 1));
        eps.insert("p3", t.pod("p3", "n2", P3, [2, 0, 0, 0, 1, 140], 1));
        eps.insert("p4", t.pod("p4", "n1", P4, [2, 0, 0, 0, 4, 10], 2));
        (t, eps)
    }

    fn config(&self, node: &str) -> DataplaneConfig {
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
    fn start(&self, node: &str) -> Dataplane {
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

    fn ping(&self, from: &str, to: Ipv4Addr, count: u32) -> Child {
        let count = count.to_string();
        let to = to.to_string();
        self.exec(
            from,
            &[
                "ping", "-q", "-n", "-c", &count, "-i", "0.2", "-W", "1", &to,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ping")
    }

    /// Runs all pings at once; asserts each one's outcome (reachable or not).
    fn pings(&self, cases: &[(&str, Ipv4Addr, bool)]) {
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
    fn peer_seen(&self, server: &str, addr: Ipv4Addr, client: &str) -> Ipv4Addr {
        let sa = SocketAddr::from((addr, 7000));
        self.peer_seen_via(server, sa, client, sa, None)
            .unwrap_or_else(|e| panic!("{client} -> {sa}: {e}"))
    }

    /// A one-shot TCP server on `bind` in `server` answers with the peer address it saw;
    /// `client` connects to `connect` (from `src_port` when given) and reads the answer. The
    /// client only gets it if every reply came back from `connect` — through NAT that means
    /// de-NATed by conntrack. Never hangs: the server gives up after 4 s.
    fn peer_seen_via(
        &self,
        server: &str,
        bind: SocketAddr,
        client: &str,
        connect: SocketAddr,
        src_port: Option<u16>,
    ) -> Result<Ipv4Addr, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let server_ns = self.ns(server);
        let client_ns = self.ns(client);
        std::thread::scope(|s| {
            s.spawn(|| {
                in_ns(&server_ns, move || {
                    let l = TcpListener::bind(bind).expect("bind");
                    l.set_nonblocking(true).unwrap();
                    tx.send(()).unwrap();
                    let deadline = Instant::now() + Duration::from_secs(4);
                    while Instant::now() < deadline {
                        match l.accept() {
                            Ok((mut c, peer)) => {
                                c.set_nonblocking(false).unwrap();
                                let _ = c.write_all(peer.ip().to_string().as_bytes());
                                return;
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                })
            });
            rx.recv().unwrap();
            in_ns(&client_ns, move || {
                let mut c = connect_from(connect, src_port).map_err(|e| format!("connect: {e}"))?;
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut s = String::new();
                c.read_to_string(&mut s).map_err(|e| format!("read: {e}"))?;
                s.parse().map_err(|e| format!("answer {s:?}: {e}"))
            })
        })
    }

    /// Packets counted by the nft guard's drop rules in `node`'s netns.
    fn guard_drops(&self, node: &str) -> u64 {
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
fn connect_from(to: SocketAddr, src_port: Option<u16>) -> std::io::Result<TcpStream> {
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

fn drop_count(dp: &Dataplane, reason: &str) -> u64 {
    dp.counters()
        .unwrap()
        .drops
        .iter()
        .find(|(r, _)| r == reason)
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no drop reason {reason}"))
}

fn node_count(dp: &Dataplane, name: &str) -> u64 {
    dp.node_counters()
        .unwrap()
        .iter()
        .find(|(r, _)| r == name)
        .map(|(_, n)| *n)
        .unwrap()
}

fn require_root() {
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

struct Phases(Instant, Instant);
impl Phases {
    fn new() -> Self {
        Phases(Instant::now(), Instant::now())
    }
    fn done(&mut self, name: &str) {
        eprintln!(
            "[dataplane] {name}: {:.0} ms (total {:.1} s)",
            self.1.elapsed().as_secs_f64() * 1e3,
            self.0.elapsed().as_secs_f64()
        );
        self.1 = Instant::now();
    }
}

#[test]
fn dataplane_end_to_end() {
    require_root();
    let mut ph = Phases::new();
    let (topo, eps) = Topology::build("dp");
    ph.done("topology");

    // --- start + endpoints -------------------------------------------------------------------
    let mut dp1 = topo.start("node1");
    let mut dp2 = topo.start("node2");
    let t = dp1.timings();
    eprintln!(
        "[dataplane] node1 start: load {:?}, verify {:?}, uplink attach {:?}, mode {:?}",
        t.load,
        t.verify,
        t.uplink_attach,
        dp1.attach_mode()
    );
    assert_eq!(dp1.attach_mode(), vpcnet_dataplane::AttachMode::Tcx);
    let n1 = topo.ns("n1");
    let n2 = topo.ns("n2");
    for name in ["p1", "p2", "p4"] {
        let ep = eps[name].clone();
        let dp = &mut dp1;
        in_ns(&n1, || dp.add_endpoint(&ep).expect("add_endpoint"));
        let t = dp1.timings();
        eprintln!(
            "[dataplane] add_endpoint {name}: total {:?}, attach {:?}",
            t.last_add_endpoint, t.last_endpoint_attach
        );
    }
    {
        let ep = eps["p3"].clone();
        let dp = &mut dp2;
        in_ns(&n2, || dp.add_endpoint(&ep).expect("add_endpoint"));
        let t = dp2.timings();
        eprintln!(
            "[dataplane] add_endpoint p3 (classic filter): total {:?}, attach {:?}",
            t.last_add_endpoint, t.last_endpoint_attach
        );
        let ep = eps["p3"].clone();
        let dp = &mut dp2;
        in_ns(&n2, || dp.add_endpoint(&ep).expect("add_endpoint again"));
        let t = dp2.timings();
        eprintln!(
            "[dataplane] add_endpoint p3 again (classic filter replace): total {:?}, attach {:?}",
            t.last_add_endpoint, t.last_endpoint_attach
        );
    }
    // Idempotent: the second ADD updates the link in place.
    {
        let ep = eps["p1"].clone();
        let dp = &mut dp1;
        in_ns(&n1, || dp.add_endpoint(&ep).expect("add_endpoint again"));
        let t = dp1.timings();
        assert!(t.last_endpoint_updated, "second add must update in place");
        eprintln!(
            "[dataplane] add_endpoint p1 again (link update): total {:?}, attach {:?}",
            t.last_add_endpoint, t.last_endpoint_attach
        );
    }
    let listed = dp1.endpoints().unwrap();
    assert_eq!(
        listed,
        vec![eps["p1"].clone(), eps["p2"].clone(), eps["p4"].clone()]
    );
    ph.done("start + endpoints");

    // --- reachability ------------------------------------------------------------------------
    topo.pings(&[
        ("p1", P2, true),        // same node
        ("p2", P1, true),        // same node, other way
        ("p1", P3, true),        // across nodes
        ("p3", P1, true),        // across nodes, other way
        ("p1", VPC_HOST, true),  // pod -> VPC host
        ("vpc", P3, true),       // VPC host -> pod (ARP answered by node2's program)
        ("p3", PHY_HOST, true),  // through the VPC router, no SNAT
        ("p1", INET_HOST, true), // masqueraded
        ("p4", P1, false),       // net 2 -> net 1, same node
        ("p1", P4, false),       // net 1 -> net 2, same node
        ("p4", P3, false),       // net 2 -> net 1, across nodes (dropped at node1)
        ("p3", P4, false),       // net 1 -> net 2, across nodes (dropped at node2)
    ]);
    ph.done("pings");
    assert_eq!(
        topo.peer_seen("phy", PHY_HOST, "p1"),
        P1,
        "no SNAT to the physical cloud"
    );
    assert_eq!(
        topo.peer_seen("vpc", VPC_HOST, "p3"),
        P3,
        "no SNAT in the VPC"
    );
    assert_eq!(topo.peer_seen("p1", P1, "p3"), P3, "no SNAT between pods");
    assert_eq!(
        topo.peer_seen("inet", INET_HOST, "p1"),
        NODE1,
        "internet traffic leaves with the node's address"
    );
    ph.done("tcp peers");

    // The receiving node enforces isolation too: a VPC-side sender using an address of network
    // 2's subnet is refused by node1 before reaching a network-1 pod.
    topo.ip("vpc", "addr add 10.40.0.99/32 dev eth0");
    let before = drop_count(&dp1, "isolated");
    let out = topo
        .exec(
            "vpc",
            &[
                "ping",
                "-q",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "10.40.0.99",
                &P1.to_string(),
            ],
        )
        .output()
        .unwrap();
    assert!(!out.status.success(), "isolated source must not reach p1");
    assert!(
        drop_count(&dp1, "isolated") > before,
        "receiver-side isolation drop counted"
    );
    topo.ip("vpc", "addr del 10.40.0.99/32 dev eth0");

    // A routed hop decrements TTL; a packet arriving with TTL 1 is dropped and counted.
    let before = drop_count(&dp1, "ttl-exceeded");
    let out = topo
        .exec(
            "p1",
            &[
                "ping",
                "-q",
                "-c",
                "1",
                "-t",
                "1",
                "-W",
                "1",
                &P2.to_string(),
            ],
        )
        .output()
        .unwrap();
    assert!(!out.status.success(), "TTL 1 must not cross the node");
    assert_eq!(drop_count(&dp1, "ttl-exceeded"), before + 1);

    // A pod sending from an address that is not its own is refused (anti-spoofing).
    topo.ip("p1", "addr add 10.20.1.99/32 dev eth0");
    let before = drop_count(&dp1, "spoofed");
    let out = topo
        .exec(
            "p1",
            &[
                "ping",
                "-q",
                "-c",
                "1",
                "-W",
                "1",
                "-I",
                "10.20.1.99",
                &VPC_HOST.to_string(),
            ],
        )
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "spoofed source must not leave the node"
    );
    assert!(drop_count(&dp1, "spoofed") > before);
    topo.ip("p1", "addr del 10.20.1.99/32 dev eth0");

    // Counters moved, drops are named, and the kernel forward path was never used for VPC traffic.
    let c = dp1.counters().unwrap();
    let p1c = c
        .endpoints
        .iter()
        .find(|e| e.ip == P1)
        .expect("p1 counters");
    assert!(p1c.tx_packets >= 10 && p1c.rx_packets >= 10, "{p1c:?}");
    assert!(p1c.tx_bytes > 0 && p1c.rx_bytes > 0);
    assert!(drop_count(&dp1, "isolated") >= 4, "{:?}", c.drops);
    assert!(drop_count(&dp2, "isolated") >= 2);
    assert!(node_count(&dp2, "arp-replies") >= 1);
    assert!(node_count(&dp1, "pod-to-uplink") >= 3);
    assert!(node_count(&dp1, "pod-to-pod") >= 3);
    assert_eq!(
        topo.guard_drops("n1"),
        0,
        "VPC traffic went through the kernel"
    );
    assert_eq!(
        topo.guard_drops("n2"),
        0,
        "VPC traffic went through the kernel"
    );
    eprintln!("[dataplane] node1 counters: {c:?}");
    ph.done("counters");

    // --- restart from pins under load: 0 loss ---------------------------------------------
    let echo_ns = topo.ns("vpc");
    let p1_ns = topo.ns("p1");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (restart_ms, mut dp1, dp2) = std::thread::scope(|s| {
        s.spawn(|| {
            in_ns(&echo_ns, move || {
                let l = TcpListener::bind((VPC_HOST, 7001)).unwrap();
                ready_tx.send(()).unwrap();
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 4];
                while c.read_exact(&mut buf).is_ok() {
                    c.write_all(&buf).unwrap();
                }
            })
        });
        ready_rx.recv().unwrap();
        let mut stream = in_ns(&p1_ns, || {
            let s = TcpStream::connect_timeout(&(VPC_HOST, 7001).into(), Duration::from_secs(3))
                .expect("connect echo");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        });
        let mut echo = |n: u32| {
            stream.write_all(&n.to_be_bytes()).unwrap();
            let mut b = [0u8; 4];
            stream.read_exact(&mut b).expect("echo after restart");
            assert_eq!(u32::from_be_bytes(b), n);
        };
        echo(1);
        let flood = |from: &str, to: Ipv4Addr| {
            topo.exec(
                from,
                &[
                    "ping",
                    "-q",
                    "-n",
                    "-c",
                    "250",
                    "-i",
                    "0.01",
                    "-W",
                    "1",
                    &to.to_string(),
                ],
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
        };
        let a = flood("p1", P3);
        let b = flood("p2", VPC_HOST);
        std::thread::sleep(Duration::from_millis(600));
        let t = Instant::now();
        drop(dp1);
        let dp1 = topo.start("node1");
        drop(dp2);
        let dp2 = topo.start("node2");
        let restart = t.elapsed();
        echo(2);
        for (name, child) in [("p1->p3", a), ("p2->vpc", b)] {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("250 received") && text.contains(" 0% packet loss"),
                "{name} lost packets across restart: {text}"
            );
        }
        echo(3);
        drop(stream);
        (restart, dp1, dp2)
    });
    eprintln!("[dataplane] restart of both nodes under load: {restart_ms:?}, 0 lost");
    assert_eq!(
        dp1.endpoints().unwrap().len(),
        3,
        "endpoints adopted from pins"
    );
    assert!(
        dp1.counters()
            .unwrap()
            .endpoints
            .iter()
            .any(|e| e.ip == P1 && e.tx_packets >= 250),
        "counters adopted from pins"
    );
    ph.done("restart under load");

    // --- remove / re-add an endpoint ---------------------------------------------------------
    let pin_p2 = topo.pin_dir("node1").join("link_ep_10_20_1_11");
    assert!(pin_p2.exists());
    {
        let dp = &mut dp1;
        in_ns(&n1, || {
            dp.remove_endpoint(P2).unwrap();
            dp.remove_endpoint(P2).expect("remove is idempotent");
        });
    }
    assert!(!pin_p2.exists());
    let before = drop_count(&dp1, "no-endpoint");
    topo.pings(&[("p1", P2, false)]);
    assert!(drop_count(&dp1, "no-endpoint") > before);
    {
        let ep = eps["p2"].clone();
        let dp = &mut dp1;
        in_ns(&n1, || dp.add_endpoint(&ep).unwrap());
    }
    topo.pings(&[("p1", P2, true)]);
    ph.done("remove/re-add");

    // --- programs detached: the kernel must not forward pod traffic --------------------------
    for (role, node) in [("n1", "node1"), ("n2", "node2")] {
        let pin_dir = topo.pin_dir(node);
        in_ns(&topo.ns(role), || {
            vpcnet_dataplane::detach_programs(&pin_dir, "eth0").expect("detach")
        });
    }
    topo.pings(&[
        ("p1", VPC_HOST, false),
        ("p1", P3, false),
        ("vpc", P1, false),
        ("p3", VPC_HOST, false),
        ("p1", P2, false),
    ]);
    assert!(
        topo.guard_drops("n1") > 0,
        "the nft guard dropped the kernel-path packets"
    );
    assert!(
        topo.guard_drops("n2") > 0,
        "node2's guard too (classic endpoint detached)"
    );
    ph.done("detached: kernel path blocked");

    // A restart heals it: endpoints whose link vanished are re-attached.
    drop(dp1);
    drop(dp2);
    let dp1 = topo.start("node1");
    let dp2 = topo.start("node2");
    topo.pings(&[("p1", P3, true), ("vpc", P1, true), ("p1", P2, true)]);
    drop(dp1);
    drop(dp2);
    ph.done("restart re-attaches");

    // --- uninstall ---------------------------------------------------------------------------
    for (role, node) in [("n1", "node1"), ("n2", "node2")] {
        let pin_dir = topo.pin_dir(node);
        in_ns(&topo.ns(role), || {
            vpcnet_dataplane::uninstall(&pin_dir, "eth0").expect("uninstall");
            vpcnet_dataplane::uninstall(&pin_dir, "eth0").expect("uninstall is idempotent");
            for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, progs) = SchedClassifier::query_tcx("eth0", dir).unwrap();
                assert!(progs.is_empty(), "programs left on the uplink");
            }
        });
        assert!(!pin_dir.exists(), "pins left in {}", pin_dir.display());
        let qdiscs = run(&mut topo.exec(role, &["tc", "qdisc", "show"]));
        let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
        assert!(!qdiscs.contains("clsact"), "qdisc left: {qdiscs}");
        let tables = run(&mut topo.exec(role, &["nft", "list", "tables"]));
        assert!(
            !String::from_utf8_lossy(&tables.stdout).contains("vpcnet"),
            "nft table left"
        );
    }
    in_ns(&n1, || {
        for veth in ["vpcp1000000000", "vpcp2000000000", "vpcp4000000000"] {
            for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, progs) = SchedClassifier::query_tcx(veth, dir).unwrap();
                assert!(progs.is_empty(), "program left on {veth}");
            }
        }
    });
    for dir in ["ingress", "egress"] {
        let filters = run(&mut topo.exec(
            "n2",
            &["tc", "filter", "show", "dev", "vpcp3000000000", dir],
        ));
        assert!(
            filters.stdout.is_empty(),
            "classic {dir} filter left on p3's veth"
        );
    }
    // Without the programs nobody answers ARP for the pods: forget what the fabric learned.
    for role in ["vpc", "n2", "rtr"] {
        topo.ip(role, "neigh flush all");
    }
    topo.pings(&[
        ("p1", VPC_HOST, false),
        ("p1", P3, false),
        ("vpc", P1, false),
    ]);
    ph.done("uninstall");
}

#[test]
fn uninstall_of_nothing_is_ok() {
    require_root();
    let prefix = format!("vpcndq{:x}", std::process::id() & 0xfffff);
    let ns = format!("{prefix}-n");
    run(Command::new("ip").args(["netns", "add", &ns]));
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _g = Guard(ns.clone());
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/vpcnet/{prefix}-none"));
    in_ns(&ns, || {
        vpcnet_dataplane::uninstall(&pin_dir, "lo").expect("nothing to remove is not an error")
    });
}

/// Flows the kernel NATs keep going through the kernel both ways (conntrack's reverse NAT):
/// a portmap-style hostPort (VPC host → node1:8080, DNAT → p2:80) and kube-proxy-style Services
/// (pod → virtual IP, DNAT → a backend pod on the other node, or on the same node). The DNAT rules
/// live in a table of the test's own in node1's netns; node2 uses classic filters, so both attach
/// modes of the observers are exercised.
#[test]
fn kernel_nat_flows_are_reverse_natted() {
    require_root();
    let mut ph = Phases::new();
    let (topo, eps) = Topology::build("dn");
    let mut dp1 = topo.start("node1");
    let mut dp2 = topo.start("node2");
    let n1 = topo.ns("n1");
    let n2 = topo.ns("n2");
    for name in ["p1", "p2"] {
        let ep = eps[name].clone();
        let dp = &mut dp1;
        in_ns(&n1, || dp.add_endpoint(&ep).expect("add_endpoint"));
    }
    {
        let ep = eps["p3"].clone();
        let dp = &mut dp2;
        in_ns(&n2, || dp.add_endpoint(&ep).expect("add_endpoint"));
    }
    ph.done("topology + start");

    const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
    let rules = format!(
        "table ip vpcnt_test {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {NODE1} tcp dport 8080 dnat to {P2}:80
    ip daddr {VIP_REMOTE} tcp dport 80 dnat to {P3}:80
    ip daddr {VIP_LOCAL} tcp dport 80 dnat to {P2}:80
  }}
}}
"
    );
    let mut nft = topo
        .exec("n1", &["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft rules");

    let sa = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    // hostPort: the client gets its answer from node1:8080, the pod sees the client (no SNAT).
    let hits = node_count(&dp1, "kernel-flow-hits");
    assert_eq!(
        topo.peer_seen_via("p2", sa(P2, 80), "vpc", sa(NODE1, 8080), None),
        Ok(VPC_HOST),
        "hostPort through DNAT"
    );
    assert!(node_count(&dp1, "kernel-flow-hits") > hits);
    // Service, backend on the other node: the reply arrives on node1's uplink.
    assert_eq!(
        topo.peer_seen_via("p3", sa(P3, 80), "p1", sa(VIP_REMOTE, 80), None),
        Ok(P1),
        "Service with a remote backend"
    );
    // Service, backend on the same node.
    assert_eq!(
        topo.peer_seen_via("p2", sa(P2, 80), "p1", sa(VIP_LOCAL, 80), None),
        Ok(P1),
        "Service with a local backend"
    );
    ph.done("DNAT flows");

    // A new connection reusing a hostPort flow's 5-tuple without NAT (straight to the pod) is
    // the programs' again: the recorded entry is stale and must not capture it.
    let stale = node_count(&dp1, "kernel-flow-stale");
    assert_eq!(
        topo.peer_seen_via("p2", sa(P2, 80), "vpc", sa(NODE1, 8080), Some(41000)),
        Ok(VPC_HOST)
    );
    assert_eq!(
        topo.peer_seen_via("p2", sa(P2, 80), "vpc", sa(P2, 80), Some(41000)),
        Ok(VPC_HOST),
        "direct connection reusing the tuple of a closed NAT flow"
    );
    assert!(node_count(&dp1, "kernel-flow-stale") > stale);
    // And the eBPF paths are untouched.
    assert_eq!(topo.peer_seen("p3", P3, "p1"), P1);
    assert_eq!(topo.peer_seen("p2", P2, "p1"), P1);
    assert_eq!(topo.peer_seen("p1", P1, "vpc"), VPC_HOST);
    assert_eq!(topo.guard_drops("n1"), 0, "guard drops on node1");
    assert_eq!(topo.guard_drops("n2"), 0, "guard drops on node2");
    eprintln!(
        "[dataplane] node1 counters: {:?}",
        dp1.node_counters().unwrap()
    );
    eprintln!(
        "[dataplane] node2 counters: {:?}",
        dp2.node_counters().unwrap()
    );
    ph.done("tuple reuse + eBPF paths");

    // Throughput of the eBPF paths (informational): pod to pod on a node, pod to pod across.
    if Command::new("iperf3").arg("--version").output().is_ok() {
        for (server, ip, client) in [("p2", P2, "p1"), ("p3", P3, "p1")] {
            let mut srv = topo
                .exec(server, &["iperf3", "-s", "-1", "-B", &ip.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let out = topo
                .exec(client, &["iperf3", "-c", &ip.to_string(), "-t", "3", "-J"])
                .output()
                .unwrap();
            let _ = srv.wait();
            let text = String::from_utf8_lossy(&out.stdout);
            let gbps = text
                .split("\"sum_received\"")
                .nth(1)
                .and_then(|t| t.split("\"bits_per_second\":").nth(1))
                .and_then(|t| t.split([',', '\n', '}']).next())
                .and_then(|t| t.trim().parse::<f64>().ok())
                .map(|b| b / 1e9);
            eprintln!("[dataplane] iperf3 {client} -> {server}: {gbps:?} Gbit/s");
        }
        ph.done("iperf3");
    }

    for (role, node) in [("n1", "node1"), ("n2", "node2")] {
        let pin_dir = topo.pin_dir(node);
        in_ns(&topo.ns(role), || {
            vpcnet_dataplane::uninstall(&pin_dir, "eth0").expect("uninstall")
        });
    }
    drop((dp1, dp2));
}
