//! `cargo xtask demo`: the product tour on a cluster built out of network namespaces.

use anyhow::Result;
use std::net::{Ipv4Addr, SocketAddrV4};
use vpcnet_tests::cluster::*;
use vpcnet_tests::cni::Pod;
use vpcnet_tests::probe::{self, WhoAmI};
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

const PORT: u16 = 7777;

pub fn run(keep: bool) -> Result<()> {
    let mut cluster = Cluster::build(ClusterSpec::default())?;
    println!("\n== vpcnet demo cluster {} ==", cluster.prefix);
    println!(
        "VPC subnet {VPC_CIDR} on a bridged fabric; router {ROUTER_VPC_IP} to the physical cloud {PHYS_CIDR} and the internet"
    );
    for n in &cluster.nodes {
        println!(
            "  {:<9} netns {:<24} uplink eth0 {}/16  pod block {}",
            n.name,
            n.ns.name(),
            n.ip,
            node_block(n.index)
        );
    }
    println!(
        "  {:<9} netns {:<24} {VPC_HOST_IP}",
        "vpc-host",
        cluster.vpc_host.name()
    );
    println!(
        "  {:<9} netns {:<24} {PHYS_HOST_IP}",
        "phys",
        cluster.phys_host.name()
    );
    println!(
        "  {:<9} netns {:<24} {INET_HOST_IP}",
        "internet",
        cluster.inet_host.name()
    );

    println!("\n== starting vpcnetd on every node ==");
    for i in 0..cluster.nodes.len() {
        cluster.node_mut(i).start_daemon()?;
        let status = cluster.node(i).ctl(&["status"])?;
        println!("{}:\n{}", cluster.node(i).name, indent(&status));
    }

    println!("== pods, created by the vpcnet plugin exactly as a runtime would ==");
    // The cluster state the daemons watch (standalone mode: a directory of manifests).
    const PODS: [(usize, &str, &str); 3] =
        [(0, "web-1", "web"), (0, "db-1", "db"), (1, "web-2", "web")];
    cluster.apply_manifest("shop.yaml", &shop_manifest(&PODS, &[]))?;
    let pods: Vec<Pod> = PODS
        .iter()
        .map(|(node, name, _)| cluster.add_pod(*node, "shop", name))
        .collect::<Result<_>>()?;
    // What the kubelet does next: report each pod's address in its status, so every node can
    // tell which pod a packet comes from.
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    cluster.apply_manifest("shop.yaml", &shop_manifest(&PODS, &ips))?;
    for p in &pods {
        println!(
            "  {:<6} on {:<6} {:<14} ADD result: {}",
            p.name,
            cluster.node(p.node).name,
            p.ip,
            p.result["ips"]
        );
    }

    println!("\n== reachability (TCP; cell = source address the far end saw) ==");
    let mut targets: Vec<(String, &Netns, Ipv4Addr)> =
        pods.iter().map(|p| (p.name.clone(), &p.ns, p.ip)).collect();
    targets.push(("vpc-host".into(), &cluster.vpc_host, VPC_HOST_IP));
    targets.push(("phys".into(), &cluster.phys_host, PHYS_HOST_IP));
    targets.push(("internet".into(), &cluster.inet_host, INET_HOST_IP));
    let _servers: Vec<WhoAmI> = targets
        .iter()
        .map(|(_, ns, ip)| WhoAmI::start(ns, SocketAddrV4::new(*ip, PORT)))
        .collect::<Result<_>>()?;
    let mut sources: Vec<(String, &Netns)> = pods.iter().map(|p| (p.name.clone(), &p.ns)).collect();
    sources.push(("vpc-host".into(), &cluster.vpc_host));
    sources.push(("phys".into(), &cluster.phys_host));
    print!("{:<10}", "from\\to");
    for (name, _, _) in &targets {
        print!("{name:>14}");
    }
    println!();
    for (name, ns) in &sources {
        print!("{name:<10}");
        for (tname, _, ip) in &targets {
            let cell = if tname == name {
                "-".to_string()
            } else {
                match probe::tcp(ns, SocketAddrV4::new(*ip, PORT)) {
                    Ok(seen) => seen.to_string(),
                    Err(_) => "FAIL".to_string(),
                }
            };
            print!("{cell:>14}");
        }
        println!();
    }
    println!(
        "Pods keep their own address towards pods, the VPC and the physical cloud; internet egress shows the node's."
    );

    println!("\n== NetworkPolicy: shop/db-1 accepts only app=web pods, on port {PORT} ==");
    cluster.apply_manifest("policy.yaml", &db_policy())?;
    let db = &pods[1];
    let to_db = |ns: &Netns, port: u16| probe::tcp(ns, SocketAddrV4::new(db.ip, port)).is_ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while to_db(&cluster.vpc_host, PORT) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _other = WhoAmI::start(&db.ns, SocketAddrV4::new(db.ip, PORT + 1))?;
    for (name, ns, port) in [
        ("web-1 (same node)", &pods[0].ns, PORT),
        ("web-2 (other node)", &pods[2].ns, PORT),
        ("web-1, other port", &pods[0].ns, PORT + 1),
        ("vpc-host", &cluster.vpc_host, PORT),
        ("phys", &cluster.phys_host, PORT),
    ] {
        let verdict = if to_db(ns, port) { "allowed" } else { "denied" };
        println!("  {name:<20} -> db-1:{port:<5} {verdict}");
    }
    println!("\n$ vpcnetctl policy shop/db-1");
    println!(
        "{}",
        indent(&cluster.node(0).ctl(&["policy", "shop/db-1"])?)
    );
    drop(_servers);

    println!("\n== vpcnetctl on node1 ==");
    println!("{}", indent(&cluster.node(0).ctl(&["list"])?));
    if let Ok(c) = cluster.node(0).ctl(&["counters"]) {
        println!("{}", indent(&c));
    }

    if keep {
        std::mem::forget(pods);
        cluster.keep();
        println!("The cluster stays up. Enter a namespace with e.g.:");
        println!("  ip netns exec {} bash", cluster.nodes[0].ns.name());
        println!("Remove it with: cargo xtask clean");
    } else {
        println!("tearing down (use --keep to explore)");
    }
    Ok(())
}

fn db_policy() -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{ name: db-from-web, namespace: shop }}
spec:
  podSelector: {{ matchLabels: {{ app: db }} }}
  ingress:
    - from: [{{ podSelector: {{ matchLabels: {{ app: web }} }} }}]
      ports: [{{ port: {PORT} }}]
"#
    )
}

/// Namespace `shop` and its pods (labels `app`), with `status.podIP` once known.
fn shop_manifest(pods: &[(usize, &str, &str)], ips: &[Ipv4Addr]) -> String {
    let mut m = String::from("apiVersion: v1\nkind: Namespace\nmetadata: { name: shop }\n");
    for (i, (_, name, app)) in pods.iter().enumerate() {
        m += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{ name: {name}, namespace: shop, labels: {{ app: {app} }} }}\n"
        );
        if let Some(ip) = ips.get(i) {
            m += &format!("status: {{ podIP: \"{ip}\" }}\n");
        }
    }
    m
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
