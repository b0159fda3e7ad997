//! Every map of the datapath. Sizes here are compile-time defaults; the agent sets the real
//! ones at load time (`EbpfLoader::set_max_entries`). All maps carry BTF (`#[btf_map]`) so
//! `bpftool map dump` pretty-prints them, and pin by name under the agent's pin directory so
//! a restarted agent adopts them without dropping a flow.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    Backend, BackendStats, ClockCache, DatapathConfig, DatapathStats, DecapStats, FlowKey,
    FlowKeyV4, FlowState, NextHop, RateGuard, VipAddrKey, VipInfo, VipKey, VipStats, limits,
};

const MAX_VIPS: usize = limits::MAX_VIPS as usize;
const MAX_BACKENDS: usize = limits::MAX_BACKENDS as usize;
/// Two rings per VIP (the live one and the one being rewritten) of the default size M.
const MAGLEV_ENTRIES: usize = 2 * MAX_VIPS * lb_common::DEFAULT_MAGLEV_TABLE_SIZE as usize;

/// VIP table: (address, port, protocol) → VIP id, ring and flags. Port 0 = any port.
#[btf_map(pin_by_name)]
pub static XLB_VIPS: HashMap<VipKey, VipInfo, MAX_VIPS> = HashMap::new();

/// Addresses that carry a VIP, so fragments and non-TCP/UDP traffic to a VIP address are
/// told apart from traffic that is none of our business (value: number of VIPs).
#[btf_map(pin_by_name)]
pub static XLB_VIP_ADDRS: HashMap<VipAddrKey, u32, MAX_VIPS> = HashMap::new();

/// Backends by id (id 0 unused). A drained backend stays here so its flows keep working.
#[btf_map(pin_by_name)]
pub static XLB_BACKENDS: Array<Backend, MAX_BACKENDS> = Array::new();

/// All Maglev rings back to back: entry `ring * M + slot` is a backend id (0 = none).
/// Memory-mappable so the agent writes a 65,537-entry table as a memory copy.
#[btf_map(pin_by_name)]
pub static XLB_MAGLEV: Array<u32, MAGLEV_ENTRIES, { BPF_F_MMAPABLE as usize }> = Array::new();

/// IPv4 connection table: 5-tuple → backend.
///
/// A shared LRU hash with `BPF_F_NO_COMMON_LRU`: the hash table is shared, so a flow that
/// RSS moves to another CPU (queue count change, IRQ rebalancing) is still found, and
/// `xlb conntrack` dumps one table; the LRU lists are per CPU, so inserts and evictions do
/// not contend on a global lock the way a common-LRU map does under a SYN flood. Katran's
/// array of per-CPU LRU maps avoids the lock too, but loses a flow's state whenever it
/// changes CPU and makes every lookup from userspace a search over all CPUs' maps.
///
/// Measured here (`bench datapath`, profiling build): a common LRU inserts the same flow
/// again ~85 ns faster, but a never-seen flow into a full 1M-entry table ~200 ns slower
/// (it rotates and shrinks 128 entries at a time under the global lock), so the per-CPU
/// lists stay.
#[btf_map(pin_by_name)]
pub static XLB_CONNTRACK4: LruHashMap<
    FlowKeyV4,
    FlowState,
    { limits::CONNTRACK_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// IPv6 connection table, like [`XLB_CONNTRACK4`] with 40-byte keys.
#[btf_map(pin_by_name)]
pub static XLB_CONNTRACK: LruHashMap<
    FlowKey,
    FlowState,
    { limits::CONNTRACK_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Node settings (index 0).
#[btf_map(pin_by_name)]
pub static XLB_CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Verdict and drop-reason counters (index 0), per CPU.
#[btf_map(pin_by_name)]
pub static XLB_STATS: PerCpuArray<DatapathStats, 1> = PerCpuArray::new();

/// Per-VIP counters by VIP id, per CPU.
#[btf_map(pin_by_name)]
pub static XLB_VIP_STATS: PerCpuArray<VipStats, MAX_VIPS> = PerCpuArray::new();

/// Per-backend counters by backend id, per CPU.
#[btf_map(pin_by_name)]
pub static XLB_BACK_STATS: PerCpuArray<BackendStats, MAX_BACKENDS> = PerCpuArray::new();

/// Next-hop cache by backend id, per CPU (no cache-line sharing between CPUs).
#[btf_map(pin_by_name)]
pub static XLB_NEXTHOP: PerCpuArray<NextHop, MAX_BACKENDS> = PerCpuArray::new();

/// The coarse time of the current jiffy (index 0), per CPU: see `clock.rs`.
#[btf_map(pin_by_name)]
pub static XLB_CLOCK: PerCpuArray<ClockCache, 1> = PerCpuArray::new();

/// New-connection rate guard window (index 0), per CPU.
#[btf_map(pin_by_name)]
pub static XLB_RATE: PerCpuArray<RateGuard, 1> = PerCpuArray::new();

/// Decapsulator: the tunnel endpoint addresses of this node.
#[btf_map(pin_by_name)]
pub static XLB_DECAP_ADDRS: HashMap<VipAddrKey, u32, { limits::MAX_DECAP_ADDRS as usize }> =
    HashMap::new();

/// Decapsulator counters (index 0), per CPU.
#[btf_map(pin_by_name)]
pub static XLB_DECAP_STATS: PerCpuArray<DecapStats, 1> = PerCpuArray::new();

/// Profiling builds only: the IPv4 connection table with a common LRU, to A/B the choice
/// above (`off::CT_COMMON`).
#[cfg(feature = "profile")]
pub mod profile {
    use super::*;

    #[btf_map(pin_by_name)]
    pub static XLB_P_CT4_C: LruHashMap<
        FlowKeyV4,
        FlowState,
        { limits::CONNTRACK_ENTRIES as usize },
    > = LruHashMap::new();
}
