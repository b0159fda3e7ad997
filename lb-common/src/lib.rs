//! Types and functions shared by xlb's eBPF programs (`lb-ebpf`) and its userspace
//! (`lb-userspace`). Everything here is defined exactly once and compiled for both sides,
//! so the kernel and userspace agree bit for bit on map layouts and on the flow hash.
//!
//! Rules for map types (checked by the size asserts at the bottom of `maps.rs`):
//! `#[repr(C)]`, explicit padding fields, no `bool`/enum/`Option`, byte order in the field
//! name (`_be` = network byte order as it appears on the wire).
#![no_std]
#![deny(missing_docs)]

pub mod hash;
pub mod maps;

pub use hash::{flow_hash, maglev_slot};
pub use maps::*;

/// Default Maglev lookup-table size (a prime, as in the Maglev paper and Katran).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;

/// Backend id 0 is never allocated: a Maglev slot holding 0 means "no backend".
pub const NO_BACKEND: u32 = 0;

/// Address family tag stored in map keys and values: IPv4.
pub const FAMILY_V4: u8 = 4;
/// Address family tag stored in map keys and values: IPv6.
pub const FAMILY_V6: u8 = 6;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Names of the maps in the eBPF object; also their file names under the pin directory.
/// Kept at most 15 characters (the kernel's map-name limit) so `bpftool` shows them whole.
pub mod map_names {
    /// VIP table: [`crate::VipKey`] → [`crate::VipInfo`].
    pub const VIPS: &str = "XLB_VIPS";
    /// Addresses that carry at least one VIP: [`crate::VipAddrKey`] → `u32` VIP count.
    pub const VIP_ADDRS: &str = "XLB_VIP_ADDRS";
    /// Backends by id: `u32` → [`crate::Backend`].
    pub const BACKENDS: &str = "XLB_BACKENDS";
    /// All Maglev rings back to back: `ring * M + slot` → backend id.
    pub const MAGLEV: &str = "XLB_MAGLEV";
    /// IPv6 connection table: [`crate::FlowKey`] → [`crate::FlowState`]. (Before the
    /// IPv4 table existed it held IPv4 flows too; a load moves any it finds.)
    pub const CONNTRACK: &str = "XLB_CONNTRACK";
    /// IPv4 connection table: [`crate::FlowKeyV4`] → [`crate::FlowState`].
    pub const CONNTRACK4: &str = "XLB_CONNTRACK4";
    /// Per-CPU coarse-clock cache, one [`crate::ClockCache`] at index 0.
    pub const CLOCK: &str = "XLB_CLOCK";
    /// Node-wide datapath settings, one [`crate::DatapathConfig`] at index 0.
    pub const CONFIG: &str = "XLB_CONFIG";
    /// Per-CPU verdict and drop-reason counters, one [`crate::DatapathStats`] at index 0.
    pub const STATS: &str = "XLB_STATS";
    /// Per-CPU per-VIP counters indexed by VIP id: [`crate::VipStats`].
    pub const VIP_STATS: &str = "XLB_VIP_STATS";
    /// Per-CPU per-backend counters indexed by backend id: [`crate::BackendStats`].
    pub const BACKEND_STATS: &str = "XLB_BACK_STATS";
    /// Per-CPU next-hop cache by backend id: [`crate::NextHop`].
    pub const NEXTHOP: &str = "XLB_NEXTHOP";
    /// Per-CPU new-connection rate guard state: [`crate::RateGuard`].
    pub const RATE_GUARD: &str = "XLB_RATE";
    /// Decapsulation: local tunnel endpoint addresses, [`crate::VipAddrKey`] → `u32`.
    pub const DECAP_ADDRS: &str = "XLB_DECAP_ADDRS";
    /// Decapsulation counters, one per-CPU [`crate::DecapStats`] at index 0.
    pub const DECAP_STATS: &str = "XLB_DECAP_STATS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// The load balancer (XDP), attached to the LB node's interfaces.
    pub const BALANCER: &str = "xlb_balancer";
    /// The decapsulator (XDP), attached to backends' interfaces.
    pub const DECAP: &str = "xlb_decap";
    /// `return XDP_PASS`: the benchmark floor, and the program put on veth peers so that
    /// native XDP_TX frames are delivered.
    pub const PASS: &str = "xlb_pass";
}

/// Compile-time defaults for map sizes; the agent overrides them at load time.
pub mod limits {
    /// Default number of VIPs (VIP ids are `0..MAX_VIPS`).
    pub const MAX_VIPS: u32 = 64;
    /// Default number of backend ids (id 0 is reserved).
    pub const MAX_BACKENDS: u32 = 4096;
    /// Default number of entries of each connection table (IPv4 and IPv6).
    pub const CONNTRACK_ENTRIES: u32 = 1 << 20;
    /// Maximum number of tunnel endpoint addresses the decapsulator recognises.
    pub const MAX_DECAP_ADDRS: u32 = 64;
}
