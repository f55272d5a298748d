#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use vpcnet_common::{DROP_REASONS, EndpointStats};

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

#[map]
static NODE_STATS: PerCpuArray<EndpointStats> = PerCpuArray::with_max_entries(1, 0);

/// Counts what crosses the uplink; the forwarding programs come with the dataplane issue.
#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    if let Some(stats) = NODE_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*stats).rx_packets += 1;
            (*stats).rx_bytes += ctx.len() as u64;
        }
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
