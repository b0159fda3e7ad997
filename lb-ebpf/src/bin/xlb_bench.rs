//! Benchmark-only XDP programs for `cargo xtask bench forwarding` (never loaded by the agent).
//!
//! * `bench_gen` — a live-frames traffic generator: run with `BPF_PROG_RUN` and
//!   `BPF_F_TEST_XDP_LIVE_FRAMES` on the client's veth, it rewrites the UDP source port of
//!   the template frame from a per-CPU counter over `flows` flows, zeroes the UDP checksum
//!   and returns `XDP_TX` (the kernel turns that into a redirect out of the ingress device).
//!   The counter is also the number of frames offered. Live frames are recycled pages that
//!   keep whatever the last user wrote into them (the balancer's encapsulation, the kernel's
//!   DNAT and TTL decrement), so every run rewrites all 42 header bytes from the template in
//!   the config map instead of trusting the page.
//! * `bench_sink` — on backends: counts every IPv4 frame (per CPU) and drops it; everything
//!   else (ARP, IPv6 neighbour discovery) passes, so the LB node's neighbour entries for
//!   the backends stay resolved through a long run.
//! * `bench_redirect` — the ceiling on the LB node: rewrite both MACs from a one-entry
//!   config map and `bpf_redirect` to the configured ifindex. No parsing, no lookups.
//! * `bench_fanout` — the ceiling as a balancer has to reach it: the same MAC rewrite and
//!   `bpf_redirect`, to one of [`FANOUT`] backends chosen by UDP source port (the flows are
//!   source ports), so it pays the per-device transmit flushes of delivering to several
//!   backends that any load balancer pays. Reads the UDP header, nothing else.
//! * `bench_pass` — `return XDP_PASS` on the LB node for the kernel-forwarding case (native
//!   XDP_TX into a veth is delivered only when the peer runs an XDP program).
//! * `bench_lru_insert` — for `cargo xtask bench datapath`: the kernel's LRU insert of a
//!   never-seen IPv4 flow and nothing else, into a twin of the IPv4 connection table (same
//!   key and value types, same `BPF_F_NO_COMMON_LRU`; the harness gives it the real table's
//!   size). It is what any balancer with a kernel LRU connection table pays per new flow.
//!
//! Self-contained on purpose: its own header offsets, no shared maps, nothing pinned.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, xdp_action},
    btf_maps::{Array, LruHashMap, PerCpuArray},
    helpers::generated::{bpf_get_smp_processor_id, bpf_redirect},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{FlowKeyV4, FlowState, limits};

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// Ethernet + option-less IPv4 + UDP: the template frame the harness builds.
const UDP_SPORT_OFF: usize = ETH_LEN + 20;
const UDP_CSUM_OFF: usize = ETH_LEN + 20 + 6;
const HDR_END: usize = ETH_LEN + 20 + 8;

/// Generator settings (index 0), written by the harness before the run.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    /// Number of distinct flows (source ports); 0 is treated as 1.
    pub flows: u32,
    /// First source port, host order.
    pub base_port: u32,
    /// Ethernet + IPv4 (no options) + UDP headers of the frame (2 bytes of padding).
    pub hdr: [u8; 44],
}

/// Ceiling settings (index 0).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RedirectConfig {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}

#[btf_map]
static BENCH_GEN_CONFIG: Array<GenConfig, 1> = Array::new();

/// Frames the generator has offered (also its flow counter), per CPU.
#[btf_map]
static BENCH_GEN_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Frames the sink has received, per CPU.
#[btf_map]
static BENCH_SINK_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map]
static BENCH_REDIRECT_CONFIG: Array<RedirectConfig, 1> = Array::new();

/// Backends of `bench_fanout`.
pub const FANOUT: u32 = 3;

/// `bench_fanout` targets by index.
#[btf_map]
static BENCH_FANOUT_CONFIG: Array<RedirectConfig, { FANOUT as usize }> = Array::new();

/// Writes both MACs as six 16-bit loads and stores. A copy between the map value and the
/// packet (which LLVM cannot prove apart) compiles to two calls of a `memmove`
/// subprogram, and a BPF-to-BPF call costs ~10 ns here: the ceiling would be slower than
/// the work it stands for. Volatile accesses keep LLVM from turning the words back into
/// that copy.
#[inline(always)]
fn write_macs(data: usize, cfg: &RedirectConfig) {
    let dst = data as *mut u16;
    // The config's MACs start at offsets 4 and 10 of a 4-byte-aligned map value.
    let src = cfg.dst_mac.as_ptr() as *const u16;
    // SAFETY: the 12 MAC bytes are inside the Ethernet header the caller checked, and
    // `dst_mac` + `src_mac` are 12 contiguous bytes of the config.
    unsafe {
        for i in 0..6 {
            dst.add(i).write_volatile(src.add(i).read_volatile());
        }
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64, 1>) -> u64 {
    match map.get_ptr_mut(0) {
        Some(p) => {
            // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
            unsafe {
                let n = *p;
                *p = n + 1;
                n
            }
        }
        None => 0,
    }
}

/// The live-frames generator.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + HDR_END > end {
        return xdp_action::XDP_ABORTED;
    }
    let p = data as *mut u8;
    let Some(cfg) = BENCH_GEN_CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let tpl = cfg.hdr.as_ptr();
    // SAFETY: reads stay in the 44-byte template; writes stay in [data, data + 42), checked.
    unsafe {
        for i in 0..5 {
            let w = core::ptr::read_unaligned(tpl.add(8 * i) as *const u64);
            core::ptr::write_unaligned(p.add(8 * i) as *mut u64, w);
        }
        *p.add(40) = *tpl.add(40);
        *p.add(41) = *tpl.add(41);
        let ethertype = u16::from_be_bytes([*p.add(12), *p.add(13)]);
        if ethertype != ETH_P_IP || *p.add(ETH_LEN + 9) != IPPROTO_UDP {
            return xdp_action::XDP_ABORTED;
        }
    }
    let (flows, base) = (if cfg.flows == 0 { 1 } else { cfg.flows }, cfg.base_port);
    let n = bump(&BENCH_GEN_COUNT);
    let port = (base + (n as u32) % flows) as u16;
    let [hi, lo] = port.to_be_bytes();
    // SAFETY: inside the checked header range.
    unsafe {
        *p.add(UDP_SPORT_OFF) = hi;
        *p.add(UDP_SPORT_OFF + 1) = lo;
        // UDP over IPv4 may carry no checksum; the IPv4 header is untouched.
        *p.add(UDP_CSUM_OFF) = 0;
        *p.add(UDP_CSUM_OFF + 1) = 0;
    }
    xdp_action::XDP_TX
}

/// The backends' counter.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + ETH_LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let p = data as *const u8;
    // SAFETY: inside the checked Ethernet header.
    let ethertype = unsafe { u16::from_be_bytes([*p.add(12), *p.add(13)]) };
    if ethertype != ETH_P_IP {
        return xdp_action::XDP_PASS;
    }
    bump(&BENCH_SINK_COUNT);
    xdp_action::XDP_DROP
}

/// The ceiling: MAC rewrite and redirect, nothing else.
#[xdp]
pub fn bench_redirect(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + ETH_LEN > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let Some(cfg) = BENCH_REDIRECT_CONFIG.get(0) else {
        return xdp_action::XDP_DROP;
    };
    write_macs(data, cfg);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(cfg.ifindex, 0) as u32 }
}

/// Lets the LB node's kernel stack take the frames (kernel-forwarding case).
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[xdp]
pub fn bench_fanout(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + HDR_END > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the source port is inside the checked headers.
    let sport = u16::from_be(unsafe { *((data + UDP_SPORT_OFF) as *const u16) });
    let Some(cfg) = BENCH_FANOUT_CONFIG.get(u32::from(sport) % FANOUT) else {
        return xdp_action::XDP_DROP;
    };
    write_macs(data, cfg);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(cfg.ifindex, 0) as u32 }
}

/// Twin of the IPv4 connection table (`XLB_CONNTRACK4`) for `bench_lru_insert`.
#[btf_map]
static BENCH_LRU4: LruHashMap<
    FlowKeyV4,
    FlowState,
    { limits::CONNTRACK_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Keys inserted so far, per CPU.
#[btf_map]
static BENCH_LRU_NEXT: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Inserts the next never-seen key (the CPU's counter, and the CPU in the key so two CPUs
/// never insert the same one). `XDP_PASS` when the kernel took it, `XDP_ABORTED` if not.
#[xdp]
pub fn bench_lru_insert(_ctx: XdpContext) -> u32 {
    let n = bump(&BENCH_LRU_NEXT);
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let key = FlowKeyV4 {
        src_be: n as u32,
        dst_be: cpu,
        sport_be: (n >> 32) as u16,
        dport_be: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let value = FlowState {
        backend_id: 1,
        vip_id: 1,
        last_seen_ns: 0,
    };
    match BENCH_LRU4.insert(&key, &value, 0) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}
