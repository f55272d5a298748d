//! `cargo xtask bench dataplane`: the eBPF dataplane against plain kernel routing on the same
//! topology, measured interleaved in one run so machine noise hits both alike.

use anyhow::{Context as _, Result, bail};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use vpcnet_tests::cluster::VPC_HOST_IP;
use vpcnet_tests::cni::Pod;
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

struct Setup {
    cluster: Cluster,
    pods: Vec<Pod>,
}

fn setup(dataplane: bool) -> Result<Setup> {
    let mut cluster = Cluster::build(ClusterSpec {
        nodes: 2,
        cooldown_secs: 30,
        dataplane,
    })?;
    for i in 0..2 {
        cluster.node_mut(i).start_daemon()?;
    }
    let pods = vec![
        cluster.add_pod(0, "bench", "a")?,
        cluster.add_pod(0, "bench", "b")?,
        cluster.add_pod(1, "bench", "c")?,
    ];
    Ok(Setup { cluster, pods })
}

/// (label, client, server, server address) for each measured path.
fn paths(s: &Setup) -> Vec<(&'static str, &Netns, &Netns, Ipv4Addr)> {
    vec![
        (
            "pod→pod same node",
            &s.pods[0].ns,
            &s.pods[1].ns,
            s.pods[1].ip,
        ),
        (
            "pod→pod across nodes",
            &s.pods[0].ns,
            &s.pods[2].ns,
            s.pods[2].ip,
        ),
        (
            "pod→VPC host",
            &s.pods[0].ns,
            &s.cluster.vpc_host,
            VPC_HOST_IP,
        ),
    ]
}

pub(crate) fn iperf(client: &Netns, server: &Netns, ip: Ipv4Addr, seconds: u32) -> Result<f64> {
    let mut srv = server
        .command("iperf3")?
        .args(["-s", "-1", "-B", &ip.to_string(), "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(150));
    let out = client
        .command("iperf3")?
        .args([
            "-c",
            &ip.to_string(),
            "-p",
            "5201",
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()?;
    let _ = srv.wait();
    if !out.status.success() {
        bail!(
            "iperf3 to {ip} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no bits_per_second in iperf3 output")
        .map(|b| b / 1e9)
}

/// 1-byte request/response over one TCP connection (TCP_NODELAY), returns sorted RTTs.
pub(crate) fn rr(client: &Netns, server: &Netns, ip: Ipv4Addr, n: usize) -> Result<Vec<Duration>> {
    let addr = SocketAddrV4::new(ip, 5202);
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server.spawn(move || -> std::io::Result<()> {
        let l = TcpListener::bind(addr)?;
        let _ = tx.send(());
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    })?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("rr server did not start")?;
    let rtts = client.run(move || -> std::io::Result<Vec<Duration>> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        let mut b = [7u8; 1];
        let mut rtts = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
            rtts.push(t.elapsed());
        }
        Ok(rtts)
    })??;
    let _ = srv.join();
    let mut rtts = rtts;
    rtts.sort();
    Ok(rtts)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(seconds: u32, reps: usize, round_trips: usize) -> Result<()> {
    println!(
        "\n== dataplane: eBPF vs kernel routing, same topology, interleaved, median of {reps} =="
    );
    let ebpf = setup(true)?;
    let kernel = setup(false)?;
    let (pe, pk) = (paths(&ebpf), paths(&kernel));
    println!(
        "{:<22} {:>11} {:>11} {:>7}   {:>10} {:>10} {:>10} {:>10} {:>7}",
        "path",
        "eBPF Gb/s",
        "kern Gb/s",
        "ratio",
        "eBPF p50",
        "kern p50",
        "eBPF p99",
        "kern p99",
        "ratio"
    );
    for (e, k) in pe.iter().zip(pk.iter()) {
        let (mut te, mut tk, mut le50, mut lk50, mut le99, mut lk99) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            te.push(iperf(e.1, e.2, e.3, seconds)?);
            tk.push(iperf(k.1, k.2, k.3, seconds)?);
            let re = rr(e.1, e.2, e.3, round_trips)?;
            let rk = rr(k.1, k.2, k.3, round_trips)?;
            let us = |v: &Vec<Duration>, p: f64| {
                v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
            };
            le50.push(us(&re, 0.5));
            lk50.push(us(&rk, 0.5));
            le99.push(us(&re, 0.99));
            lk99.push(us(&rk, 0.99));
        }
        let (te, tk) = (median(te), median(tk));
        let (le50, lk50, le99, lk99) = (median(le50), median(lk50), median(le99), median(lk99));
        println!(
            "{:<22} {:>11.2} {:>11.2} {:>6.0}%   {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>6.0}%",
            e.0,
            te,
            tk,
            te / tk * 100.0,
            le50,
            lk50,
            le99,
            lk99,
            le50 / lk50 * 100.0
        );
    }
    println!(
        "(throughput ratio goal ≥ 100 %, latency ratio = eBPF p50 / kernel p50, goal ≤ 100 %)"
    );
    Ok(())
}
