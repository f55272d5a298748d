//! NetworkPolicy enforcement properties beyond the truth tables: isolation from the first packet
//! after ADD (also for a pod the cluster state does not know), stateful replies through the BPF
//! conntrack, ICMP, the node's own traffic, and established connections cut when a policy
//! narrows.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vpcnet_tests::probe::{self, WhoAmI};
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

const XA: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 10);
const YA: Ipv4Addr = Ipv4Addr::new(10, 20, 2, 10);
const YB: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 11);
const ECHO_PORT: u16 = 8080;

fn pod(ns: &str, name: &str, label: &str, ip: Ipv4Addr, node: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{ pod: {label} }}
  annotations: {{ vpcnet.io/ip: "{ip}" }}
spec:
  nodeName: {node}
  containers: [{{ name: c, image: c, ports: [{{ name: http, containerPort: 80 }}] }}]
"#
    )
}

fn cluster_manifest(c: &Cluster) -> String {
    let n0 = &c.node(0).name;
    let n1 = &c.node(1).name;
    let mut m = String::from(
        r#"apiVersion: v1
kind: Namespace
metadata: { name: x, labels: { ns: x } }
---
apiVersion: v1
kind: Namespace
metadata: { name: y, labels: { ns: y } }
"#,
    );
    m += &pod("x", "a", "a", XA, n0);
    m += &pod("y", "a", "a", YA, n1);
    m += &pod("y", "b", "b", YB, n0);
    m
}

/// Ingress to every pod of x only from y's pod=a on `ports` (TCP); egress of y/b only to y/a:80.
fn policies(ports: &[u16], icmp_rule: bool) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("{{ port: {p} }}")).collect();
    let icmp = if icmp_rule {
        "\n    - from: [{ namespaceSelector: { matchLabels: { ns: y } }, podSelector: { matchLabels: { pod: a } } }]"
    } else {
        ""
    };
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{ name: x-from-ya, namespace: x }}
spec:
  podSelector: {{}}
  ingress:
    - from: [{{ namespaceSelector: {{ matchLabels: {{ ns: y }} }}, podSelector: {{ matchLabels: {{ pod: a }} }} }}]
      ports: [{}]{icmp}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{ name: yb-egress, namespace: y }}
spec:
  podSelector: {{ matchLabels: {{ pod: b }} }}
  policyTypes: [Egress]
  egress:
    - to: [{{ podSelector: {{ matchLabels: {{ pod: a }} }} }}]
      ports: [{{ port: 80 }}]
"#,
        ports.join(", ")
    )
}

fn counter(c: &Cluster, node: usize, name: &str) -> u64 {
    let text = c.node(node).ctl(&["counters"]).unwrap();
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(name)).then(|| it.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no counter {name} in:\n{text}"))
}

fn conntrack_live(c: &Cluster, node: usize) -> u64 {
    let text = c.node(node).ctl(&["counters"]).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("conntrack entries: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no conntrack line in:\n{text}"))
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Polls `f` until it returns true or the deadline passes.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A line-echo server: every line received is sent back. Stops on drop.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(ns: &Netns, addr: SocketAddrV4) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            let mut w = conn.try_clone().unwrap();
                            for line in BufReader::new(conn).lines() {
                                let Ok(line) = line else { return };
                                if writeln!(w, "{line}").is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
        .unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Echo { stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends one line on an open connection and waits (briefly) for its echo.
fn roundtrip(conn: &mut TcpStream, reader: &mut BufReader<TcpStream>, n: u32) -> bool {
    if writeln!(conn, "line {n}").is_err() {
        return false;
    }
    let mut got = String::new();
    matches!(reader.read_line(&mut got), Ok(k) if k > 0) && got.trim() == format!("line {n}")
}

#[test]
fn policy_is_enforced_from_the_first_packet_and_statefully() {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 2,
        cooldown_secs: 1,
        dataplane: true,
    })
    .unwrap();
    c.apply_manifest("cluster.yaml", &cluster_manifest(&c))
        .unwrap();
    c.apply_manifest("policies.yaml", &policies(&[80, ECHO_PORT], false))
        .unwrap();
    c.node_mut(0).start_daemon().unwrap();
    c.node_mut(1).start_daemon().unwrap();

    let ya = c.add_pod(1, "y", "a").unwrap();
    let yb = c.add_pod(0, "y", "b").unwrap();
    assert_eq!((ya.ip, yb.ip), (YA, YB), "vpcnet.io/ip annotations");
    let _ya_srv = WhoAmI::start(&ya.ns, sock(YA, 80)).unwrap();
    let _ya_srv81 = WhoAmI::start(&ya.ns, sock(YA, 81)).unwrap();
    // y/b is also egress-isolated (y/a only), so its packets to x/a fall at its own egress.
    let policy_drops =
        |c: &Cluster| counter(c, 0, "policy-ingress") + counter(c, 0, "policy-egress");
    let denied_before = policy_drops(&c);

    // Isolated before ADD returns: no waiting, no retry. A pod's own server starts after its
    // ADD, so the first connections below are the pod's first packets.
    let xa = c.add_pod(0, "x", "a").unwrap();
    assert_eq!(xa.ip, XA);
    let _xa_srv = WhoAmI::start(&xa.ns, sock(XA, 80)).unwrap();
    assert!(
        probe::tcp(&yb.ns, sock(XA, 80)).is_err(),
        "y/b reached x/a right after ADD"
    );
    assert_eq!(
        probe::tcp(&ya.ns, sock(XA, 80)).unwrap(),
        YA,
        "y/a (allowed, other node) is refused at x/a's first packet"
    );
    assert!(policy_drops(&c) > denied_before, "the drop is counted");
    // The node itself (kubelet probes) always reaches its pods.
    assert_eq!(
        probe::tcp(&c.node(0).ns, sock(XA, 80)).unwrap(),
        c.node(0).ip,
        "node to its own pod"
    );

    // A pod the cluster state has never heard of is a label-less pod of its namespace: x's
    // default deny covers it, x's allow rule lets y/a in.
    let ghost = c.add_pod(0, "x", "ghost").unwrap();
    let _ghost_srv = WhoAmI::start(&ghost.ns, sock(ghost.ip, 80)).unwrap();
    assert!(
        probe::tcp(&yb.ns, sock(ghost.ip, 80)).is_err(),
        "unknown pod open"
    );
    assert_eq!(probe::tcp(&ya.ns, sock(ghost.ip, 80)).unwrap(), YA);

    // Egress of y/b: only y/a TCP 80.
    let ct_before = counter(&c, 0, "ct-created");
    assert_eq!(probe::tcp(&yb.ns, sock(YA, 80)).unwrap(), YB);
    assert!(
        probe::tcp(&yb.ns, sock(YA, 81)).is_err(),
        "y/b egress to :81"
    );
    assert!(probe::udp(&yb.ns, sock(YA, 80)).is_err(), "y/b egress UDP");
    assert!(probe::ping(&yb.ns, YA).is_err(), "y/b egress ICMP");
    assert!(counter(&c, 0, "ct-created") > ct_before);
    assert!(conntrack_live(&c, 0) > 0);
    // Replies pass through conntrack: y/b answers x/a although y/b's egress does not allow
    // x/a (the connection is allowed: x/a's egress and y/b's ingress are open).
    let _yb_srv = WhoAmI::start(&yb.ns, sock(YB, 80)).unwrap();
    assert_eq!(probe::tcp(&xa.ns, sock(YB, 80)).unwrap(), XA);

    // ICMP: only a rule without ports opens it; echo replies come back through conntrack.
    assert!(
        probe::ping(&ya.ns, XA).is_err(),
        "ICMP through a TCP-only rule"
    );
    c.apply_manifest("policies.yaml", &policies(&[80, ECHO_PORT], true))
        .unwrap();
    eventually("ping y/a -> x/a allowed", Duration::from_secs(5), || {
        probe::ping(&ya.ns, XA).is_ok()
    });

    // An established connection is judged again when a policy narrows: after the port is
    // removed from the rule, the open connection stops working.
    let _echo = Echo::start(&xa.ns, sock(XA, ECHO_PORT));
    let mut conn = ya
        .ns
        .run(|| TcpStream::connect_timeout(&sock(XA, ECHO_PORT).into(), Duration::from_secs(2)))
        .unwrap()
        .expect("connect y/a -> x/a:8080");
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    assert!(
        roundtrip(&mut conn, &mut reader, 0),
        "echo before the change"
    );
    let revalidated_before = counter(&c, 0, "ct-revalidated");
    // (The ports-less ICMP rule would allow every port: it goes too.)
    c.apply_manifest("policies.yaml", &policies(&[80], false))
        .unwrap();
    let mut n = 1;
    eventually(
        "the established connection to a port no longer allowed is cut",
        Duration::from_secs(5),
        || {
            n += 1;
            !roundtrip(&mut conn, &mut reader, n)
        },
    );
    assert!(counter(&c, 0, "ct-revalidated") > revalidated_before);
    // What stays allowed still works, on new and existing rules alike.
    assert_eq!(probe::tcp(&ya.ns, sock(XA, 80)).unwrap(), YA);
    assert!(probe::tcp(&yb.ns, sock(XA, 80)).is_err());

    let text = c.node(0).ctl(&["policy", "x/a"]).unwrap();
    assert!(
        text.contains("Enforced by this node's eBPF dataplane"),
        "{text}"
    );
}

/// Three pings from `from` to `to`; how many were answered.
fn pings_answered(from: &Netns, to: Ipv4Addr) -> u32 {
    let out = from
        .command("ping")
        .unwrap()
        .args(["-c3", "-i0.2", "-W1", "-q", &to.to_string()])
        .output()
        .unwrap();
    probe::ping_summary(&String::from_utf8_lossy(&out.stdout)).map_or(0, |(_, got)| got)
}

#[test]
fn an_isolated_pod_stays_isolated_when_its_policy_file_becomes_a_dangling_symlink() {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 1,
        dataplane: true,
    })
    .unwrap();
    let n0 = c.node(0).name.clone();
    let mut m = String::from("apiVersion: v1\nkind: Namespace\nmetadata: { name: x }\n");
    m += &pod("x", "a", "a", XA, &n0);
    m += &pod("x", "b", "b", Ipv4Addr::new(10, 20, 1, 12), &n0);
    c.apply_manifest("cluster.yaml", &m).unwrap();
    // As a ConfigMap volume holds it: the name in the directory is a symlink into a subdirectory.
    let data = c.manifests_dir().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("deny.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: deny-a, namespace: x }\nspec: { podSelector: { matchLabels: { pod: a } }, policyTypes: [Ingress] }\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("data/deny.yaml", c.manifests_dir().join("deny.yaml")).unwrap();
    c.node_mut(0).start_daemon().unwrap();
    let xa = c.add_pod(0, "x", "a").unwrap();
    let xb = c.add_pod(0, "x", "b").unwrap();
    assert_eq!(pings_answered(&xb.ns, xa.ip), 0, "x/a is isolated");

    std::fs::remove_file(data.join("deny.yaml")).unwrap();
    // A change inside a subdirectory fires no event in the watched one: the periodic poll sees it.
    let log = c.node(0).dir.join("vpcnetd.log");
    eventually(
        "the daemon reports the dangling symlink",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("a symlink to data/deny.yaml, which does not exist")
        },
    );
    assert_eq!(
        pings_answered(&xb.ns, xa.ip),
        0,
        "a dangling policy symlink opened x/a"
    );

    // Removing the entry itself is a deletion (and shows the watcher was alive all along).
    std::fs::remove_file(c.manifests_dir().join("deny.yaml")).unwrap();
    eventually(
        "x/a open after its policy is deleted",
        Duration::from_secs(5),
        || pings_answered(&xb.ns, xa.ip) == 3,
    );
}

#[test]
fn non_ipv4_from_or_to_a_pod_is_dropped_and_counted() {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 1,
        dataplane: true,
    })
    .unwrap();
    c.node_mut(0).start_daemon().unwrap();
    let p = c.add_pod(0, "x", "v6").unwrap();
    let host_veth = p.result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("sandbox").is_none())
        .and_then(|i| i["name"].as_str())
        .unwrap()
        .to_string();
    let node = c.node(0);
    // A node with IPv6 on the pod's link (as a dual-stack node would have), and a pod that gave
    // itself an address (NET_ADMIN).
    for (ns, dev) in [(&node.ns, host_veth.as_str()), (&p.ns, "eth0")] {
        vpcnet_tests::cluster::sysctl(ns, &format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")
            .unwrap();
    }
    node.ns
        .ip(&[
            "-6",
            "addr",
            "add",
            "fd00:76::1/64",
            "dev",
            &host_veth,
            "nodad",
        ])
        .unwrap();
    p.ns.ip(&["-6", "addr", "add", "fd00:76::2/64", "dev", "eth0", "nodad"])
        .unwrap();
    let not_ipv4 = |c: &Cluster| {
        let text = c.node(0).ctl(&["counters"]).unwrap();
        text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("not-ipv4")).then(|| it.next()?.parse::<u64>().ok())?
        })
    };
    let dropped = not_ipv4(&c).unwrap_or(0);
    let ping6 = |ns: &Netns, to: &str| ns.exec("ping", &["-6", "-c1", "-W1", "-q", to]).is_ok();
    assert!(
        !ping6(&p.ns, "fd00:76::1"),
        "the pod reached the node over IPv6"
    );
    assert!(
        !ping6(&node.ns, "fd00:76::2"),
        "the node reached the pod over IPv6"
    );
    assert!(not_ipv4(&c).unwrap() > dropped, "not counted");
    // IPv4 through the kernel still works, ARP included (the node resolves the pod's MAC).
    probe::ping(&node.ns, p.ip).unwrap();
}
