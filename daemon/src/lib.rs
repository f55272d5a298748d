//! vpcnetd: the per-node daemon.
pub mod dataplane;

pub mod ebpf_object {
    /// The eBPF object this daemon was built with.
    pub static BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpcnet-ebpf"));
}
