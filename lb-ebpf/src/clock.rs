//! One clock read per packet at most, and a helper call once per tick at most.
//!
//! The coarse clock (CLOCK_MONOTONIC_COARSE, tick resolution) is enough: every timeout is a
//! second or more. Its helper call still costs as much as a map lookup (~30 ns measured
//! here), while `bpf_jiffies64()` is inlined by the verifier into a single load. Both move
//! on the tick, so each CPU keeps the coarse time of the current jiffy in `XLB_CLOCK` and
//! calls the helper only when jiffies moved. The first reader in a packet pays; the rest
//! reuse the value. Traffic that never needs the time (passed packets) never reads it.
//!
//! Jiffies and the coarse clock are updated one after the other on the tick; a reader in
//! between can cache the previous tick's time for one tick (a few milliseconds old), which
//! no timeout of a second or more notices.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::XLB_CLOCK;

/// The packet's arrival time, read on first use.
pub struct Clock {
    ns: u64,
}

impl Clock {
    /// `OFF`: profiling knobs ([`crate::probe::off::CLOCK`] replaces the clock by a
    /// constant); 0 in the real program.
    #[inline(always)]
    pub const fn new<const OFF: u32>() -> Self {
        let ns = if crate::probe::removed(OFF, crate::probe::off::CLOCK) {
            1 << 40
        } else {
            0
        };
        Clock { ns }
    }

    /// Nanoseconds since boot (coarse), the same value for the whole packet.
    #[inline(always)]
    pub fn now(&mut self) -> u64 {
        if self.ns == 0 {
            self.ns = coarse_ns();
        }
        self.ns
    }
}

#[inline(always)]
fn coarse_ns() -> u64 {
    // SAFETY: no arguments, no preconditions (inlined by the verifier as a load).
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = XLB_CLOCK.get_ptr_mut(0) else {
        // SAFETY: the helper has no arguments and no preconditions.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program run.
    let cache = unsafe { &mut *cache };
    if cache.jiffies != jiffies {
        // Jiffies start near 2^32 on 64-bit kernels, so the all-zero entry never matches.
        cache.jiffies = jiffies;
        // SAFETY: as above.
        cache.coarse_ns = unsafe { bpf_ktime_get_coarse_ns() };
    }
    cache.coarse_ns
}
