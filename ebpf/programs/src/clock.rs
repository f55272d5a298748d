//! Time for the expiring tables (conntrack, kernel flows).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

/// A flow's expiry is rewritten at most this often (keeps a busy flow's cache line shared).
pub(crate) const REFRESH_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC at tick resolution: what userspace compares expiries with too.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}
