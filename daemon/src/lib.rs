//! vpcnetd: the per-node daemon. IPAM, the eBPF dataplane and the socket the plugin talks to.

pub mod cluster_state;
pub mod config;
pub mod dataplane;
pub mod ebpf_glue;
pub mod links;
pub mod metrics;
pub mod policy;
pub mod run;
pub mod server;
pub mod service;

pub mod ebpf_object {
    /// The eBPF object this daemon was built with.
    pub static BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpcnet-ebpf"));
}
