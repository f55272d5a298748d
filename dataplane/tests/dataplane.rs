//! End-to-end tests of the eBPF dataplane on a topology of network namespaces (root only); the
//! topology is the shared fixture in `common/`. Each test builds its own topology (namespaces
//! and pins of its own prefix) and checks one behaviour; `serial()` keeps the ones that send
//! traffic from measuring each other's load.

mod common;
use common::*;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};

/// Both attach modes install endpoints (node1 TCX, node2 classic filters), a second ADD updates
/// in place, and the dataplane lists what it holds.
#[test]
fn both_attach_modes_install_endpoints_and_a_second_add_updates_in_place() {
    require_root();
    let _serial = serial();
    let mut ph = Phases::new();
    let (topo, eps) = Topology::build();
    ph.done("topology");

    let dp1 = topo.start("node1");
    let dp2 = topo.start("node2");
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
        add_timed(&dp1, &n1, &eps[name], name);
    }
    add_timed(&dp2, &n2, &eps["p3"], "p3 (classic filter)");
    add_timed(&dp2, &n2, &eps["p3"], "p3 again (classic filter replace)");
    // Idempotent: the second ADD updates the link in place.
    let t = add_timed(&dp1, &n1, &eps["p1"], "p1 again (link update)");
    assert!(t.last_endpoint_updated, "second add must update in place");
    let listed = dp1.endpoints().unwrap();
    assert_eq!(
        listed,
        vec![eps["p1"].clone(), eps["p2"].clone(), eps["p4"].clone()]
    );
    ph.done("start + endpoints");
    // Both modes carry traffic, both ways across the nodes.
    topo.pings(&[("p1", P3, true), ("p3", P1, true)]);
}

/// Who reaches whom: pods of a network on a node and across nodes, the VPC and beyond its
/// router; nothing between the two networks, on a node or across.
fn ping_matrix(topo: &Topology) {
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
}

/// Whether `ping <args>` from `from` got its answers.
fn ping_answered(topo: &Topology, from: &str, args: &[&str]) -> bool {
    let mut argv = vec!["ping", "-q", "-W", "1"];
    argv.extend_from_slice(args);
    topo.exec(from, &argv).output().unwrap().status.success()
}

/// No VPC packet went through the kernel's forward path on either node.
fn assert_kernel_path_unused(topo: &Topology) {
    for node in ["n1", "n2"] {
        assert_eq!(
            topo.guard_drops(node),
            0,
            "VPC traffic went through the kernel on {node}"
        );
    }
}

#[test]
fn pods_reach_their_network_and_nothing_of_the_other() {
    require_root();
    let _serial = serial();
    let s = Started::new();
    ping_matrix(&s.topo);
    assert_kernel_path_unused(&s.topo);
}

/// No SNAT inside the VPC, to the physical cloud or between pods; masquerade to the internet.
#[test]
fn sources_survive_inside_the_vpc_and_are_masqueraded_to_the_internet() {
    require_root();
    let _serial = serial();
    let s = Started::new();
    let topo = &s.topo;
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
    assert_kernel_path_unused(topo);
}

/// The receiving node enforces isolation too: a VPC-side sender using an address of network
/// 2's subnet is refused by node1 before reaching a network-1 pod.
#[test]
fn the_receiving_node_enforces_isolation() {
    require_root();
    let _serial = serial();
    let s = Started::new();
    let (topo, dp1) = (&s.topo, &s.dp1);
    topo.ip("vpc", "addr add 10.40.0.99/32 dev eth0");
    let before = drop_count(dp1, "isolated");
    let p1 = P1.to_string();
    let args = ["-c", "2", "-i", "0.2", "-I", "10.40.0.99", &p1];
    assert!(
        !ping_answered(topo, "vpc", &args),
        "isolated source must not reach p1"
    );
    assert!(
        drop_count(dp1, "isolated") > before,
        "receiver-side isolation drop counted"
    );
    topo.ip("vpc", "addr del 10.40.0.99/32 dev eth0");
    assert_kernel_path_unused(topo);
}

/// A routed hop decrements TTL; a packet arriving with TTL 1 is dropped and counted.
#[test]
fn ttl_1_is_dropped_and_counted() {
    require_root();
    let _serial = serial();
    let s = Started::new();
    let (topo, dp1) = (&s.topo, &s.dp1);
    let before = drop_count(dp1, "ttl-exceeded");
    let p2 = P2.to_string();
    assert!(
        !ping_answered(topo, "p1", &["-c", "1", "-t", "1", &p2]),
        "TTL 1 must not cross the node"
    );
    assert_eq!(drop_count(dp1, "ttl-exceeded"), before + 1);
    assert_kernel_path_unused(topo);
}

/// A pod sending from an address that is not its own is refused (anti-spoofing).
#[test]
fn a_spoofed_source_is_refused() {
    require_root();
    let _serial = serial();
    let s = Started::new();
    let (topo, dp1) = (&s.topo, &s.dp1);
    topo.ip("p1", "addr add 10.20.1.99/32 dev eth0");
    let before = drop_count(dp1, "spoofed");
    let vpc = VPC_HOST.to_string();
    assert!(
        !ping_answered(topo, "p1", &["-c", "1", "-I", "10.20.1.99", &vpc]),
        "spoofed source must not leave the node"
    );
    assert!(drop_count(dp1, "spoofed") > before);
    topo.ip("p1", "addr del 10.20.1.99/32 dev eth0");
    assert_kernel_path_unused(topo);
}

/// After the ping matrix the counters moved: per endpoint, per drop reason (isolation on both
/// nodes), per path; and the kernel's forward path saw no VPC packet.
#[test]
fn counters_follow_the_traffic_and_name_the_drops() {
    require_root();
    let _serial = serial();
    let s = Started::new();
    let (topo, dp1, dp2) = (&s.topo, &s.dp1, &s.dp2);
    ping_matrix(topo);
    let c = dp1.counters().unwrap();
    let p1c = c
        .endpoints
        .iter()
        .find(|e| e.ip == P1)
        .expect("p1 counters");
    assert!(p1c.tx_packets >= 10 && p1c.rx_packets >= 10, "{p1c:?}");
    assert!(p1c.tx_bytes > 0 && p1c.rx_bytes > 0);
    assert!(drop_count(dp1, "isolated") >= 4, "{:?}", c.drops);
    assert!(drop_count(dp2, "isolated") >= 2);
    assert!(node_count(dp2, "arp-replies") >= 1);
    assert!(node_count(dp1, "pod-to-uplink") >= 3);
    assert!(node_count(dp1, "pod-to-pod") >= 3);
    assert_kernel_path_unused(topo);
    eprintln!("[dataplane] node1 counters: {c:?}");
}

/// A restart of both dataplanes from their pins under 100 pps floods and an open TCP connection
/// loses nothing; endpoints and counters are adopted from the pins.
#[test]
fn restart_under_load_loses_nothing() {
    require_root();
    let _serial = serial();
    let mut ph = Phases::new();
    let Started {
        topo,
        eps: _,
        dp1,
        dp2,
    } = Started::new();
    ph.done("topology + endpoints");
    // --- restart from pins under load: 0 loss ---------------------------------------------
    let echo_ns = topo.ns("vpc");
    let p1_ns = topo.ns("p1");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (restart_ms, dp1, dp2) = std::thread::scope(|s| {
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
        let flood = |from: &str, to: Ipv4Addr| common::flood(&topo, from, to, 250);
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

    drop((dp1, dp2));
}

/// A removed endpoint stops forwarding at once (its link pin goes); re-adding it restores it.
#[test]
fn remove_and_readd_endpoint() {
    require_root();
    let _serial = serial();
    let mut ph = Phases::new();
    let s = Started::new();
    let (topo, eps, dp1) = (&s.topo, &s.eps, &s.dp1);
    let n1 = topo.ns("n1");
    // --- remove / re-add an endpoint ---------------------------------------------------------
    let pin_p2 = topo.pin_dir("node1").join("link_ep_10_20_1_11");
    assert!(pin_p2.exists());
    {
        let dp = dp1;
        in_ns(&n1, || {
            dp.remove_endpoint(P2).unwrap();
            dp.remove_endpoint(P2).expect("remove is idempotent");
        });
    }
    assert!(!pin_p2.exists());
    let before = drop_count(dp1, "no-endpoint");
    topo.pings(&[("p1", P2, false)]);
    assert!(drop_count(dp1, "no-endpoint") > before);
    {
        let ep = eps["p2"].clone();
        let dp = dp1;
        in_ns(&n1, || dp.add_endpoint(&ep).unwrap());
    }
    topo.pings(&[("p1", P2, true)]);
    ph.done("remove/re-add");
}

/// With the programs detached the nft guard keeps the kernel from forwarding pod traffic; a
/// restart re-attaches every endpoint whose link vanished.
#[test]
fn detached_programs_block_the_kernel_path_until_restart() {
    require_root();
    let _serial = serial();
    let mut ph = Phases::new();
    let Started {
        topo,
        eps: _,
        dp1,
        dp2,
    } = Started::new();
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
}

/// Uninstall removes links, filters, qdiscs, pins and the nft table, is idempotent, and leaves
/// the pods unreachable (nothing answers ARP for them any more).
#[test]
fn uninstall_removes_everything() {
    require_root();
    let _serial = serial();
    let mut ph = Phases::new();
    let Started {
        topo,
        eps: _,
        dp1,
        dp2,
    } = Started::new();
    topo.pings(&[("p1", P3, true), ("vpc", P1, true)]);
    let n1 = topo.ns("n1");
    drop(dp1);
    drop(dp2);
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
    let ns = vpcnet_tests::Netns::fresh("n").unwrap_or_else(|e| panic!("{e:#}"));
    let pin_dir =
        PathBuf::from(vpcnet_tests::cluster::BPF_ROOT).join(format!("{}-none", ns.name()));
    in_ns(ns.name(), || {
        vpcnet_dataplane::uninstall(&pin_dir, "lo").expect("nothing to remove is not an error")
    });
}

const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// Flows the kernel NATs keep going through the kernel both ways (conntrack's reverse NAT):
/// a portmap-style hostPort (VPC host → node1:8080, DNAT → p2:80) and kube-proxy-style Services
/// (pod → virtual IP, DNAT → a backend pod on the other node, or on the same node). The DNAT rules
/// live in a table of the test's own in node1's netns; node2 uses classic filters, so both attach
/// modes of the observers are exercised. p1 and p2 on node1, p3 on node2.
struct NatBed {
    topo: Topology,
    dp1: vpcnet_dataplane::Dataplane,
    dp2: vpcnet_dataplane::Dataplane,
}

impl NatBed {
    fn new() -> NatBed {
        let (topo, eps) = Topology::build();
        let dp1 = topo.start("node1");
        let dp2 = topo.start("node2");
        let n1 = topo.ns("n1");
        let n2 = topo.ns("n2");
        for name in ["p1", "p2"] {
            let ep = eps[name].clone();
            let dp = &dp1;
            in_ns(&n1, || dp.add_endpoint(&ep).expect("add_endpoint"));
        }
        {
            let ep = eps["p3"].clone();
            let dp = &dp2;
            in_ns(&n2, || dp.add_endpoint(&ep).expect("add_endpoint"));
        }
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
        NatBed { topo, dp1, dp2 }
    }

    /// hostPort: the client gets its answer from node1:8080, the pod sees the client (no SNAT).
    fn host_port(&self) {
        let hits = node_count(&self.dp1, "kernel-flow-hits");
        assert_eq!(
            self.topo
                .peer_seen_via("p2", sa(P2, 80), "vpc", sa(NODE1, 8080), None),
            Ok(VPC_HOST),
            "hostPort through DNAT"
        );
        assert!(node_count(&self.dp1, "kernel-flow-hits") > hits);
    }

    /// Service, backend on the other node: the reply arrives on node1's uplink.
    fn remote_service(&self) {
        assert_eq!(
            self.topo
                .peer_seen_via("p3", sa(P3, 80), "p1", sa(VIP_REMOTE, 80), None),
            Ok(P1),
            "Service with a remote backend"
        );
    }

    /// Service, backend on the same node.
    fn local_service(&self) {
        assert_eq!(
            self.topo
                .peer_seen_via("p2", sa(P2, 80), "p1", sa(VIP_LOCAL, 80), None),
            Ok(P1),
            "Service with a local backend"
        );
    }

    /// Uninstalls both nodes (the pins and links of a run go with it, and must).
    fn finish(self) {
        for (role, node) in [("n1", "node1"), ("n2", "node2")] {
            let pin_dir = self.topo.pin_dir(node);
            in_ns(&self.topo.ns(role), || {
                vpcnet_dataplane::uninstall(&pin_dir, "eth0").expect("uninstall")
            });
        }
        let NatBed { topo, dp1, dp2 } = self;
        drop((dp1, dp2));
        drop(topo);
    }
}

/// Runs `check` on a NAT bed of its own (one test at a time) and uninstalls it after.
fn on_nat_bed(check: impl FnOnce(&NatBed)) {
    require_root();
    let _serial = serial();
    let bed = NatBed::new();
    check(&bed);
    bed.finish();
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn a_host_port_flow_is_reverse_natted_by_the_kernel() {
    on_nat_bed(NatBed::host_port);
}

#[test]
fn a_service_with_a_remote_backend_is_reverse_natted_by_the_kernel() {
    on_nat_bed(NatBed::remote_service);
}

#[test]
fn a_service_with_a_local_backend_is_reverse_natted_by_the_kernel() {
    on_nat_bed(NatBed::local_service);
}

/// A new connection reusing a hostPort flow's 5-tuple without NAT (straight to the pod) is
/// the programs' again: the recorded entry is stale and must not capture it.
#[test]
fn a_nat_flows_tuple_reused_without_nat_is_the_programs_again() {
    on_nat_bed(|bed| {
        let (topo, dp1) = (&bed.topo, &bed.dp1);
        let stale = node_count(dp1, "kernel-flow-stale");
        assert_eq!(
            topo.peer_seen_via("p2", sa(P2, 80), "vpc", sa(NODE1, 8080), Some(41000)),
            Ok(VPC_HOST)
        );
        assert_eq!(
            topo.peer_seen_via("p2", sa(P2, 80), "vpc", sa(P2, 80), Some(41000)),
            Ok(VPC_HOST),
            "direct connection reusing the tuple of a closed NAT flow"
        );
        assert!(node_count(dp1, "kernel-flow-stale") > stale);
    });
}

/// Next to the kernel's NAT flows the eBPF paths are untouched: pods and the VPC still reach
/// each other through the programs, never the kernel's forward path.
#[test]
fn kernel_nat_flows_leave_the_ebpf_paths_alone() {
    on_nat_bed(|bed| {
        let mut ph = Phases::new();
        bed.host_port();
        bed.remote_service();
        bed.local_service();
        ph.done("DNAT flows");
        let (topo, dp1, dp2) = (&bed.topo, &bed.dp1, &bed.dp2);
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
        ph.done("eBPF paths");

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
    });
}

/// Adds `ep` from inside `ns` and prints what it cost (the ADD latency budget's figures).
fn add_timed(
    dp: &vpcnet_dataplane::Dataplane,
    ns: &str,
    ep: &vpcnet_dataplane::Endpoint,
    what: &str,
) -> vpcnet_dataplane::Timings {
    in_ns(ns, || dp.add_endpoint(ep).expect("add_endpoint"));
    let t = dp.timings();
    eprintln!(
        "[dataplane] add_endpoint {what}: total {:?}, attach {:?}",
        t.last_add_endpoint, t.last_endpoint_attach
    );
    t
}
