//! The namespace cluster itself: the VPC fabric, the router and its far subnets, and teardown.

use std::net::SocketAddrV4;
use vpcnet_tests::cluster::*;
use vpcnet_tests::probe::{self, WhoAmI};
use vpcnet_tests::{Cluster, ClusterSpec};

#[test]
fn vpc_host_reaches_physical_host_through_router_and_teardown_is_complete() {
    let cluster = Cluster::build(ClusterSpec::default()).expect("build cluster");
    let prefix = cluster.prefix.clone();
    assert_eq!(cluster.nodes.len(), 2);

    let server = WhoAmI::start(&cluster.phys_host, SocketAddrV4::new(PHYS_HOST_IP, 8080)).unwrap();
    probe::ping(&cluster.vpc_host, PHYS_HOST_IP).unwrap();
    // Routed, not NATed: the physical host sees the VPC host's own address.
    assert_eq!(
        probe::tcp(&cluster.vpc_host, SocketAddrV4::new(PHYS_HOST_IP, 8080)).unwrap(),
        VPC_HOST_IP
    );
    assert_eq!(
        probe::udp(&cluster.vpc_host, SocketAddrV4::new(PHYS_HOST_IP, 8080)).unwrap(),
        VPC_HOST_IP
    );
    // Nodes sit on the same fabric and route through the same router.
    for node in &cluster.nodes {
        probe::ping(&node.ns, VPC_HOST_IP).unwrap();
        assert_eq!(
            probe::tcp(&node.ns, SocketAddrV4::new(PHYS_HOST_IP, 8080)).unwrap(),
            node.ip
        );
    }
    // Nothing answers where nothing listens: the probe can fail.
    assert!(probe::tcp(&cluster.vpc_host, SocketAddrV4::new(PHYS_HOST_IP, 8081)).is_err());
    assert!(probe::ping(&cluster.vpc_host, "10.30.0.99".parse().unwrap()).is_err());
    drop(server);
    drop(cluster);

    let left: Vec<String> = vpcnet_tests::netns::project_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let pins: Vec<_> = std::fs::read_dir(BPF_ROOT)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !pins.iter().any(|p: &String| p.starts_with(&prefix)),
        "pins left behind: {pins:?}"
    );
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&prefix),
        "root-namespace links left behind"
    );
}
