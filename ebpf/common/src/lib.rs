#![no_std]
//! Map key/value layouts shared by the eBPF programs and vpcnetd. Every type is `#[repr(C)]` with
//! explicit padding so both sides agree byte for byte.

/// Reasons a program drops a packet; the index into the `DROPS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not Ethernet/IPv4 where IPv4 was required, or headers shorter than they claim.
    Malformed = 0,
    MaxReason = 1,
}

pub const DROP_REASONS: u32 = DropReason::MaxReason as u32;

pub const DROP_REASON_NAMES: [&str; DROP_REASONS as usize] = ["malformed"];

/// Per-endpoint traffic counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no padding holes that could leak uninitialised bytes.
    unsafe impl aya::Pod for super::EndpointStats {}
}
