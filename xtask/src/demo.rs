//! `cargo xtask demo`: the product tour on a cluster built out of network namespaces.

use anyhow::Result;
use std::net::{Ipv4Addr, SocketAddrV4};
use vpcnet_tests::cluster::*;
use vpcnet_tests::probe::{self, WhoAmI};
use vpcnet_tests::{Cluster, ClusterSpec};

pub fn run(keep: bool) -> Result<()> {
    let mut cluster = Cluster::build(ClusterSpec::default())?;
    println!("\n== vpcnet demo cluster {} ==", cluster.prefix);
    println!(
        "VPC subnet {VPC_CIDR} on a bridged fabric; router {ROUTER_VPC_IP} to the physical cloud {PHYS_CIDR} and the internet"
    );
    for n in &cluster.nodes {
        println!(
            "  {:<8} netns {:<24} uplink eth0 {}/16  pod block {}",
            n.name,
            n.ns.name(),
            n.ip,
            node_block(n.index)
        );
    }
    println!(
        "  {:<8} netns {:<24} {VPC_HOST_IP}",
        "vpc-host",
        cluster.vpc_host.name()
    );
    println!(
        "  {:<8} netns {:<24} {PHYS_HOST_IP}",
        "phys",
        cluster.phys_host.name()
    );
    println!(
        "  {:<8} netns {:<24} {INET_HOST_IP}",
        "internet",
        cluster.inet_host.name()
    );

    println!("\n== fabric reachability (TCP, source address seen by the far end) ==");
    let targets: Vec<(&str, &vpcnet_tests::Netns, Ipv4Addr)> = vec![
        ("vpc-host", &cluster.vpc_host, VPC_HOST_IP),
        ("phys", &cluster.phys_host, PHYS_HOST_IP),
        ("internet", &cluster.inet_host, INET_HOST_IP),
    ];
    let _servers: Vec<WhoAmI> = targets
        .iter()
        .map(|(_, ns, ip)| WhoAmI::start(ns, SocketAddrV4::new(*ip, 7777)))
        .collect::<Result<_>>()?;
    let mut sources: Vec<(String, &vpcnet_tests::Netns)> = cluster
        .nodes
        .iter()
        .map(|n| (n.name.clone(), &n.ns))
        .collect();
    sources.push(("vpc-host".into(), &cluster.vpc_host));
    print!("{:<10}", "from\\to");
    for (name, _, _) in &targets {
        print!("{name:>16}");
    }
    println!();
    for (name, ns) in &sources {
        print!("{name:<10}");
        for (_, _, ip) in &targets {
            let cell = match probe::tcp(ns, SocketAddrV4::new(*ip, 7777)) {
                Ok(seen) => format!("ok {seen}"),
                Err(_) => "FAIL".to_string(),
            };
            print!("{cell:>16}");
        }
        println!();
    }
    drop(_servers);
    if keep {
        cluster.keep();
        println!("\nThe cluster stays up. Enter a namespace with e.g.:");
        println!("  ip netns exec {} bash", cluster.nodes[0].ns.name());
        println!("Remove it with: cargo xtask clean");
    } else {
        println!("\ntearing down (use --keep to explore)");
    }
    Ok(())
}
