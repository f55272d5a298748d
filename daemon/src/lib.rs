//! vpcnetd: the per-node daemon. IPAM, the eBPF dataplane and the socket the plugin talks to.

pub mod agent;
pub mod config;
pub mod ebpf_glue;
pub mod kubernetes;
pub mod links;
pub mod metrics;
pub mod run;
pub mod server;
pub mod state;
pub mod topology;
pub mod watch;
pub mod wire;
