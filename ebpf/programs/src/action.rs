//! What a program does with a packet, and the one place that turns that into a tc return code.
//!
//! A drop is the `Err` of a [`Verdict`] and always carries a [`DropReason`]; [`finish`] counts it
//! in `DROPS` before it returns `TC_ACT_SHOT`. `TC_ACT_SHOT` and `DROPS` are private to this
//! module, so no stage can drop a packet without it being counted.
//!
//! Redirects are carried out here too, last: a helper that refuses one turns the packet into a
//! counted `redirect-failed` drop rather than a `TC_ACT_REDIRECT` to nowhere.

use aya_ebpf::{
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::map,
    maps::PerCpuArray,
};
use vpcnet_common::{DROP_REASONS, DropReason};

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASONS, 0);

// Spelled out here: the generated bindings type these differently per target.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
/// Observers return this: "no opinion" — the next TCX program / classic filter runs, the packet
/// passes when none is left.
const TC_ACT_UNSPEC: i32 = -1;

/// A program's decision about a packet it keeps (`Err(DropReason)` is the only way to drop).
#[derive(Clone, Copy)]
pub(crate) enum Action {
    /// `TC_ACT_OK`: the kernel carries on with the packet (delivers, forwards, NATs it).
    Pass,
    /// `TC_ACT_UNSPEC`: no opinion; what the observers return.
    Next,
    /// `TC_ACT_REDIRECT` to where the packet goes next.
    Redirect(Redirect),
}

/// The redirect helpers the programs use, each with its target interface.
#[derive(Clone, Copy)]
pub(crate) enum Redirect {
    /// `bpf_redirect_peer`: into the netns of the veth's peer (a local pod), skipping the host
    /// stack and the host veth's egress hook.
    Peer(u32),
    /// `bpf_redirect_neigh` out of the interface: the kernel's FIB and neighbour tables fill in
    /// both MACs.
    Neigh(u32),
    /// `bpf_redirect` to the interface's egress, the frame as it is.
    Egress(u32),
}

pub(crate) type Verdict = Result<Action, DropReason>;

#[inline(always)]
fn count_drop(reason: DropReason) {
    if let Some(slot) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run, so there is no other writer.
        unsafe { *slot += 1 };
    }
}

impl Redirect {
    #[inline(always)]
    fn perform(self) -> Result<(), DropReason> {
        // SAFETY: plain helper calls. For `Neigh`, NULL params ask the kernel for a FIB lookup of
        // the destination; for `Egress`, flags 0 means the interface's egress.
        let ret = unsafe {
            match self {
                Redirect::Peer(ifindex) => bpf_redirect_peer(ifindex, 0),
                Redirect::Neigh(ifindex) => {
                    bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0)
                }
                Redirect::Egress(ifindex) => bpf_redirect(ifindex, 0),
            }
        };
        if ret != TC_ACT_REDIRECT as i64 {
            return Err(DropReason::RedirectFailed);
        }
        Ok(())
    }
}

/// The tc return code of a verdict; counts the drop if it is one.
#[inline(always)]
pub(crate) fn finish(verdict: Verdict) -> i32 {
    let reason = match verdict {
        Ok(Action::Pass) => return TC_ACT_OK,
        Ok(Action::Next) => return TC_ACT_UNSPEC,
        Ok(Action::Redirect(to)) => match to.perform() {
            Ok(()) => return TC_ACT_REDIRECT,
            Err(reason) => reason,
        },
        Err(reason) => reason,
    };
    count_drop(reason);
    TC_ACT_SHOT
}
