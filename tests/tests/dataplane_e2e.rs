//! The eBPF dataplane driven by the real daemon and plugin: reachability, isolation, counters, and
//! restarts under load.

use serde_json::json;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use vpcnet_tests::Cluster;
use vpcnet_tests::cluster::*;
use vpcnet_tests::probe::{self, WhoAmI};

fn cluster() -> Cluster {
    Cluster::started(2).unwrap()
}

#[test]
fn reachability_matrix_isolation_and_counters() {
    let c = cluster();
    let a = c.add_pod(0, "x", "a").unwrap();
    let b = c.add_pod(0, "x", "b").unwrap();
    let r = c.add_pod(1, "x", "r").unwrap();
    let iso = c
        .add_pod_with(0, "y", "iso", |cfg| cfg["network"] = json!("vpc-b"))
        .unwrap();
    assert!(iso.ip.to_string().starts_with("10.40.1."), "{}", iso.ip);

    let port = 9000;
    let servers: Vec<WhoAmI> = [
        (&a.ns, a.ip),
        (&b.ns, b.ip),
        (&r.ns, r.ip),
        (&iso.ns, iso.ip),
    ]
    .into_iter()
    .chain([
        (&c.vpc_host, VPC_HOST_IP),
        (&c.phys_host, PHYS_HOST_IP),
        (&c.inet_host, INET_HOST_IP),
    ])
    .map(|(ns, ip)| WhoAmI::start(ns, SocketAddrV4::new(ip, port)).unwrap())
    .collect();
    let to = |ip| SocketAddrV4::new(ip, port);
    // Pod-sourced traffic keeps the pod's address everywhere but the internet.
    for (src, dst) in [
        (&a, b.ip),
        (&a, r.ip),
        (&r, a.ip),
        (&a, VPC_HOST_IP),
        (&a, PHYS_HOST_IP),
        (&r, PHYS_HOST_IP),
    ] {
        assert_eq!(
            probe::tcp(&src.ns, to(dst)).unwrap(),
            src.ip,
            "{} -> {dst}",
            src.name
        );
        assert_eq!(
            probe::udp(&src.ns, to(dst)).unwrap(),
            src.ip,
            "{} -> {dst} (udp)",
            src.name
        );
    }
    assert_eq!(
        probe::tcp(&a.ns, to(INET_HOST_IP)).unwrap(),
        c.node(0).ip,
        "masqueraded to node1"
    );
    assert_eq!(
        probe::tcp(&r.ns, to(INET_HOST_IP)).unwrap(),
        c.node(1).ip,
        "masqueraded to node2"
    );
    // The VPC and the physical cloud reach pods directly (the node answers ARP for them).
    assert_eq!(probe::tcp(&c.vpc_host, to(a.ip)).unwrap(), VPC_HOST_IP);
    assert_eq!(probe::tcp(&c.phys_host, to(r.ip)).unwrap(), PHYS_HOST_IP);
    probe::ping(&c.vpc_host, b.ip).unwrap();
    // Virtual networks are isolated both ways, on one node and across nodes.
    for (src, dst) in [
        (&iso.ns, a.ip),
        (&iso.ns, r.ip),
        (&a.ns, iso.ip),
        (&r.ns, iso.ip),
    ] {
        assert!(
            probe::tcp(src, to(dst)).is_err(),
            "{} -> {dst} must be isolated",
            src.name()
        );
    }
    let counters = c.node(0).ctl(&["--json", "counters"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&counters).unwrap();
    let ep = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == a.ip.to_string())
        .cloned()
        .unwrap();
    assert!(
        ep["tx_packets"].as_u64().unwrap() > 10 && ep["rx_packets"].as_u64().unwrap() > 10,
        "{ep}"
    );
    let isolated = v["drops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d[0] == "isolated")
        .unwrap()[1]
        .as_u64()
        .unwrap();
    assert!(isolated > 0, "isolation drops are counted: {v}");
    drop(servers);
}

/// An echo stream: the client sends a numbered chunk every 10 ms and checks the echo.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    client: std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>,
    _server: std::thread::JoinHandle<anyhow::Result<()>>,
}

fn start_stream(
    server_ns: &vpcnet_tests::Netns,
    server_ip: Ipv4Addr,
    client_ns: &vpcnet_tests::Netns,
) -> Stream {
    let addr = SocketAddrV4::new(server_ip, 9100);
    let (tx, rx) = std::sync::mpsc::channel();
    let server = server_ns
        .spawn(move || {
            let l = TcpListener::bind(addr).unwrap();
            tx.send(()).unwrap();
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop2, sent2) = (stop.clone(), sent.clone());
    let client = client_ns
        .spawn(move || -> anyhow::Result<()> {
            let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let chunk = [i.to_le_bytes(); 64].concat();
                s.write_all(&chunk)?;
                let mut back = vec![0u8; chunk.len()];
                s.read_exact(&mut back)?;
                anyhow::ensure!(back == chunk, "echo {i} corrupted");
                i += 1;
                sent2.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
        .unwrap();
    Stream {
        stop,
        sent,
        client,
        _server: server,
    }
}

#[test]
fn kill_and_upgrade_under_load_lose_nothing() {
    let mut c = cluster();
    let a = c.add_pod(0, "x", "a").unwrap();
    let r = c.add_pod(1, "x", "r").unwrap();
    let stream = start_stream(&r.ns, r.ip, &a.ns);
    // 100 packets/s for 6 s across node boundaries, through both daemons' restarts.
    let ping = probe::ping_flood(&a.ns, r.ip, 600, Duration::from_millis(10)).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..2 {
        c.node_mut(i).kill_daemon();
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..2 {
        c.node_mut(i).start_daemon().unwrap();
    }
    std::thread::sleep(Duration::from_millis(800));
    // A rollout: SIGTERM, and the new daemon replaces the programs in place (bpf_link_update /
    // filter replace) while the old ones keep forwarding.
    for i in 0..2 {
        c.node_mut(i).stop_daemon();
        c.node_mut(i).start_daemon().unwrap();
    }
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) = probe::ping_summary(&text).expect("ping summary");
    stream.stop.store(true, Ordering::Relaxed);
    let streamed = stream.sent.load(Ordering::Relaxed);
    stream
        .client
        .join()
        .unwrap()
        .unwrap()
        .expect("the TCP stream survives");
    assert_eq!(
        (sent, received),
        (600, 600),
        "no ping lost across kill -9 and upgrade: {text}"
    );
    assert!(
        streamed > 200,
        "stream made progress throughout: {streamed} echoes"
    );
    // State survived too: the pods are still known and still reachable.
    assert!(
        c.node(0)
            .ctl(&["list"])
            .unwrap()
            .contains(&a.ip.to_string())
    );
    probe::ping(&a.ns, r.ip).unwrap();
}
