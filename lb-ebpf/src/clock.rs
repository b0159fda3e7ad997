//! One clock read per packet at most.
//!
//! The coarse clock (CLOCK_MONOTONIC_COARSE, tick resolution) is enough: every timeout is a
//! second or more. Still, its helper call costs as much as a map lookup, and a UDP packet
//! or a new flow needs the time in two places (connection table and next-hop cache), so the
//! first reader pays and the rest reuse the value. Traffic that never needs it (passed
//! packets) never reads it.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

/// The packet's arrival time, read on first use.
pub struct Clock {
    ns: u64,
}

impl Clock {
    #[inline(always)]
    pub const fn new() -> Self {
        Clock { ns: 0 }
    }

    /// Nanoseconds since boot (coarse), the same value for the whole packet.
    #[inline(always)]
    pub fn now(&mut self) -> u64 {
        if self.ns == 0 {
            // SAFETY: the helper has no arguments and no preconditions.
            self.ns = unsafe { bpf_ktime_get_coarse_ns() };
        }
        self.ns
    }
}
