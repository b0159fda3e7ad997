//! xlb's XDP programs.
//!
//! * `xlb_balancer` — the L4 load balancer: parse, VIP match, connection tracking, Maglev
//!   pick, IP-in-IP / IPv6 encapsulation toward the backend (direct server return).
//! * `xlb_decap` — runs on backends: strips the tunnel header so the kernel delivers the
//!   inner packet to the VIP bound on the backend's loopback.
//! * `xlb_pass` — `return XDP_PASS`: the benchmark floor, and the program put on veth peers
//!   so native XDP_TX frames are delivered.
//!
//! The code is split by concern; each `#[xdp]` entry is a thin wrapper over a `try_*`
//! function that returns `Result<verdict, Outcome>`, and every outcome is counted once.
#![no_std]
#![no_main]

mod balancer;
mod checksum;
mod clock;
mod conntrack;
mod decap;
mod encap;
mod headers;
mod icmp;
mod keys;
mod maglev;
mod maps;
mod parse;
mod probe;
mod stats;

#[cfg(feature = "profile")]
mod variants;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// The load balancer. `inline(always)`: `#[xdp]` wraps this function in the real entry
/// point, and LLVM otherwise leaves the whole balancer behind a BPF-to-BPF call.
#[xdp]
#[inline(always)]
pub fn xlb_balancer(ctx: XdpContext) -> u32 {
    balancer::run(&ctx)
}

/// The backend-side decapsulator (`inline(always)`: see `xlb_balancer`).
#[xdp]
#[inline(always)]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    decap::run(&ctx)
}

/// The trivial program: benchmark floor and veth-peer helper.
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never executed.
    loop {}
}

/// `bpf_fib_lookup` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
