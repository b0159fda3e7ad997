//! Profiling knobs: the balancer is generic over a stop point and a set of removed steps,
//! so `cargo xtask bench datapath` can time prefixes and A/B variants of the real code in
//! the same run (there is no `perf annotate` for JITed BPF in these VMs). The production
//! program is the `<0, 0>` instance; the variants exist only with the `profile` feature.

/// `STOP` values: the packet leaves with XDP_TX right after the numbered step.
/// 0 = never (the real program).
pub mod stop {
    /// Ethernet, IP and L4 headers parsed (plus the per-CPU stats pointer).
    pub const PARSED: u32 = 1;
    /// Node config read and the flow key built.
    pub const CONFIG: u32 = 2;
    /// Connection-table lookup done (established path).
    pub const CT_LOOKUP: u32 = 3;
    /// Backend entry read (established path).
    pub const BACKEND: u32 = 4;
    /// Clock read (both paths; first step of forwarding).
    pub const CLOCK: u32 = 5;
    /// Next hop from the per-CPU cache.
    pub const NEXT_HOP: u32 = 6;
    /// Headroom grown (`bpf_xdp_adjust_head`).
    pub const ADJUST_HEAD: u32 = 7;
    /// Outer headers written (Ethernet, IP, checksum).
    pub const ENCAP: u32 = 8;
    /// Outer Ethernet addresses written.
    pub const MACS: u32 = 21;
    /// Outer EtherType written.
    pub const ETHERTYPE: u32 = 22;
    /// VIP lookup done (new-flow path).
    pub const VIP: u32 = 11;
    /// Flow hash computed.
    pub const HASH: u32 = 12;
    /// Maglev slot read.
    pub const PICK: u32 = 13;
    /// Backend entry read (new-flow path).
    pub const NEW_BACKEND: u32 = 14;
    /// Connection entry inserted.
    pub const INSERT: u32 = 15;
}

/// `OFF` bits: steps removed or replaced.
pub mod off {
    /// No clock read at all: a constant time.
    pub const CLOCK: u32 = 1 << 0;
    /// No per-VIP / per-backend counters and no conntrack hit/miss counters.
    pub const STATS: u32 = 1 << 1;
    /// No next-hop cache: the configured gateway MAC out of the ingress interface.
    pub const NEXT_HOP: u32 = 1 << 2;
    /// IPv4 connection table with a common LRU (no `BPF_F_NO_COMMON_LRU`).
    #[cfg_attr(not(feature = "profile"), allow(dead_code))]
    pub const CT_COMMON: u32 = 1 << 3;
}

/// Leaves with XDP_TX at step `$k` of variant `$stop`.
macro_rules! stop_at {
    ($stop:expr, $k:expr) => {
        if $stop == $k {
            return Ok($crate::stats::Outcome::ForwardedTx);
        }
    };
}
pub(crate) use stop_at;

/// True if variant `$off` removes step `$bit`.
#[inline(always)]
pub const fn removed(off: u32, bit: u32) -> bool {
    off & bit != 0
}
