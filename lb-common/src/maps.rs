//! Keys and values of xlb's BPF maps. One definition, used by both sides.

/// Declares `#[repr(C)]` map types with the derives both sides need, and — behind the
/// `user` feature — `bytemuck::Pod` (whose derive rejects implicit padding at compile time)
/// plus `aya::Pod` so aya's typed maps accept them.
macro_rules! map_types {
    ($( $(#[$meta:meta])* pub struct $name:ident { $($body:tt)* } )*) => {$(
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
        pub struct $name { $($body)* }

        // SAFETY: `#[repr(C)]`, every field is an integer or an integer array, and the
        // `bytemuck::Pod` derive above proves there is no implicit padding.
        #[cfg(feature = "user")]
        unsafe impl aya::Pod for $name {}
    )*};
}

map_types! {
    /// Key of the VIP table. Port 0 means "any port" for that address and protocol.
    pub struct VipKey {
        /// VIP address as wire bytes in four words; IPv4 uses word 0, the rest is zero.
        pub addr_be: [u32; 4],
        /// Destination port, network byte order; 0 for an any-port VIP.
        pub port_be: u16,
        /// IP protocol: [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
        pub proto: u8,
        /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`].
        pub family: u8,
    }

    /// Value of the VIP table.
    pub struct VipInfo {
        /// Index into the per-VIP counters.
        pub vip_id: u32,
        /// Which Maglev ring the VIP uses now: entries `ring * M .. ring * M + M` of
        /// `XLB_MAGLEV`. The agent writes a new table into an idle ring and then swaps this
        /// field with one map update, so packets never see a half-written table.
        pub ring: u32,
        /// `VIP_F_*` bits.
        pub flags: u32,
        /// Explicit padding; always zero.
        pub _pad: u32,
    }

    /// Key of the VIP-address and decapsulation-address sets.
    pub struct VipAddrKey {
        /// Address as wire bytes in four words; IPv4 uses word 0.
        pub addr_be: [u32; 4],
        /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`].
        pub family: u8,
        /// Explicit padding; always zero.
        pub _pad: [u8; 3],
    }

    /// A backend (real server), indexed by backend id.
    pub struct Backend {
        /// Tunnel destination: the backend's address as wire bytes; IPv4 uses word 0.
        pub addr_be: [u32; 4],
        /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`]; 0 marks an unused id.
        pub family: u8,
        /// Explicit padding; always zero.
        pub _pad: [u8; 3],
    }

    /// Key of the IPv6 connection table (`XLB_CONNTRACK`): a flow's 5-tuple as seen on the
    /// wire. Also the family-neutral form userspace lists both tables in.
    pub struct FlowKey {
        /// Client address (wire bytes; IPv4 in word 0).
        pub src_be: [u32; 4],
        /// VIP address (wire bytes; IPv4 in word 0).
        pub dst_be: [u32; 4],
        /// Client port, network byte order.
        pub sport_be: u16,
        /// VIP port, network byte order.
        pub dport_be: u16,
        /// IP protocol.
        pub proto: u8,
        /// Address family.
        pub family: u8,
        /// Explicit padding; always zero.
        pub _pad: [u8; 2],
    }

    /// Key of the IPv4 connection table (`XLB_CONNTRACK4`): a flow's 5-tuple as seen on
    /// the wire. IPv4 flows have their own table because the kernel hashes and compares
    /// every byte of a key on each lookup and insert: 16 bytes instead of [`FlowKey`]'s 40,
    /// and 80 instead of 104 bytes of kernel memory per entry.
    pub struct FlowKeyV4 {
        /// Client address (wire bytes).
        pub src_be: u32,
        /// VIP address (wire bytes).
        pub dst_be: u32,
        /// Client port, network byte order.
        pub sport_be: u16,
        /// VIP port, network byte order.
        pub dport_be: u16,
        /// IP protocol.
        pub proto: u8,
        /// Explicit padding; always zero.
        pub _pad: [u8; 3],
    }

    /// Value of the connection table.
    pub struct FlowState {
        /// Backend the flow is pinned to.
        pub backend_id: u32,
        /// VIP the flow belongs to.
        pub vip_id: u32,
        /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) when the flow was last refreshed. TCP entries are stamped at
        /// creation; UDP entries are refreshed at most once a second (to keep the cache line
        /// clean) and expire after the configured idle time.
        pub last_seen_ns: u64,
    }

    /// Node-wide datapath settings (one entry, index 0). All zero = not configured yet.
    pub struct DatapathConfig {
        /// Maglev table size M (prime). Every ring has M entries.
        pub maglev_table_size: u32,
        /// New connections a CPU may insert per second; above it inserts are skipped
        /// (flows are still forwarded by Maglev). 0 disables the guard.
        pub new_conn_rate_limit: u32,
        /// UDP connection entries idle longer than this are re-picked.
        pub udp_idle_timeout_ns: u64,
        /// Outer source address for IPv4 tunnels (wire bytes).
        pub tunnel_src_v4_be: u32,
        /// MTU assumed toward backends when the route lookup cannot tell (gateway fallback).
        pub fallback_mtu: u32,
        /// Outer source address for IPv6 tunnels (wire bytes).
        pub tunnel_src_v6_be: [u32; 4],
        /// Next-hop MAC used when `bpf_fib_lookup` cannot resolve one; all zero = none.
        pub gateway_mac: [u8; 6],
        /// Explicit padding; always zero.
        pub _pad: [u8; 2],
    }

    /// Per-CPU verdict and drop-reason counters of the balancer (one entry).
    ///
    /// Every packet is counted in `rx_packets` and in exactly one of the outcome fields
    /// listed in [`DatapathStats::OUTCOMES`]; the rest are detail counters.
    pub struct DatapathStats {
        /// Packets seen by the balancer.
        pub rx_packets: u64,
        /// Outcome: not IPv4/IPv6 (ARP, LLDP, ...): XDP_PASS.
        pub pass_not_ip: u64,
        /// Outcome: IP, but not addressed to a VIP: XDP_PASS, untouched.
        pub pass_not_vip: u64,
        /// Outcome: IPv6 with an extension header other than Fragment: XDP_PASS.
        pub pass_ipv6_ext: u64,
        /// Outcome: ICMP or another non-TCP/UDP protocol to a VIP address: XDP_PASS.
        pub pass_vip_other_proto: u64,
        /// Outcome: truncated or invalid headers: XDP_DROP.
        pub drop_malformed: u64,
        /// Outcome: IP fragment addressed to a VIP address: XDP_DROP.
        pub drop_fragment: u64,
        /// Outcome: too big after encapsulation, answered with ICMP "fragmentation needed" /
        /// ICMPv6 "packet too big": XDP_TX of the reply.
        pub too_big_icmp_sent: u64,
        /// Outcome: too big after encapsulation and no ICMP could be built: XDP_DROP.
        pub drop_too_big: u64,
        /// Outcome: the VIP has no backend (empty table or removed backend): XDP_DROP.
        pub drop_no_backend: u64,
        /// Outcome: no route to the backend and no gateway MAC configured: XDP_DROP.
        pub drop_fib_failure: u64,
        /// Outcome: the packet could not be grown or rewritten: XDP_DROP.
        pub drop_encap_failed: u64,
        /// Outcome: encapsulated and sent back out of the ingress interface: XDP_TX.
        pub forwarded_tx: u64,
        /// Outcome: encapsulated and redirected to another interface: XDP_REDIRECT.
        pub forwarded_redirect: u64,
        /// Detail: connection-table hits.
        pub conntrack_hit: u64,
        /// Detail: new Maglev picks (misses, SYNs, expired UDP, vanished backends).
        pub conntrack_miss: u64,
        /// Detail: inserts skipped by the new-connection rate guard.
        pub conntrack_insert_skipped: u64,
        /// Detail: inserts the kernel refused.
        pub conntrack_insert_failed: u64,
        /// Detail: UDP entries found idle past the timeout and re-picked.
        pub conntrack_udp_expired: u64,
        /// Detail: next hop taken from the configured gateway MAC.
        pub fib_gateway_fallback: u64,
        /// Detail: ICMP errors about a VIP flow (e.g. "fragmentation needed" for a backend's
        /// direct reply) sent on to the flow's backend.
        pub icmp_to_backend: u64,
    }

    /// Per-CPU counters of one VIP.
    pub struct VipStats {
        /// Packets forwarded (or answered) for this VIP.
        pub packets: u64,
        /// Bytes of those packets at L3 (inner IP length).
        pub bytes: u64,
        /// New connections (Maglev picks).
        pub new_conns: u64,
    }

    /// Per-CPU counters of one backend.
    pub struct BackendStats {
        /// Packets sent to this backend.
        pub packets: u64,
        /// Inner bytes sent to this backend.
        pub bytes: u64,
    }

    /// Per-CPU cache of the route to a backend (indexed by backend id), so the FIB and
    /// neighbour lookups run once a second per backend and CPU instead of per packet.
    pub struct NextHop {
        /// The backend address this entry was resolved for (an id reused for another
        /// address misses).
        pub backend_addr_be: [u32; 4],
        /// Egress interface.
        pub ifindex: u32,
        /// MTU of the route (L3 bytes).
        pub mtu: u32,
        /// Source MAC (the egress interface's).
        pub smac: [u8; 6],
        /// Next-hop MAC.
        pub dmac: [u8; 6],
        /// Explicit padding; always zero.
        pub _pad: u32,
        /// `bpf_ktime_get_coarse_ns()` after which the entry is looked up again.
        pub expires_ns: u64,
    }

    /// Per-CPU cache of the coarse clock (one entry), keyed by jiffies.
    ///
    /// `bpf_ktime_get_coarse_ns()` is a helper call that costs as much as a map lookup,
    /// while `bpf_jiffies64()` is inlined by the verifier into one load. The coarse clock
    /// only moves on a tick, like jiffies, so the datapath reads it once per tick and CPU
    /// and reuses the value until jiffies move.
    pub struct ClockCache {
        /// `bpf_jiffies64()` when `coarse_ns` was read.
        pub jiffies: u64,
        /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) read at that tick.
        pub coarse_ns: u64,
    }

    /// Per-CPU state of the new-connection rate guard.
    pub struct RateGuard {
        /// Start of the current one-second window (`bpf_ktime_get_coarse_ns`).
        pub window_start_ns: u64,
        /// Inserts made in the current window.
        pub inserts: u64,
    }

    /// Per-CPU counters of the decapsulation program (one entry).
    pub struct DecapStats {
        /// Packets seen.
        pub rx_packets: u64,
        /// Outcome: outer header stripped, inner packet passed to the stack.
        pub decapsulated: u64,
        /// Outcome: not an IP-in-IP / IP-in-IPv6 packet: XDP_PASS, untouched.
        pub pass_not_tunnel: u64,
        /// Outcome: a tunnel packet for an address that is not ours: XDP_PASS, untouched.
        pub pass_not_local: u64,
        /// Outcome: truncated or invalid headers: XDP_DROP.
        pub drop_malformed: u64,
    }
}

/// Number of `u64` counters in [`DatapathStats`].
pub const DATAPATH_COUNTERS: usize = 21;

/// [`VipInfo::flags`]: hash on the source address only (session affinity).
pub const VIP_F_HASH_SRC_ONLY: u32 = 1 << 0;

impl DatapathStats {
    /// Names of the outcome counters, in field order. Each packet lands in exactly one.
    pub const OUTCOMES: [&'static str; 13] = [
        "pass_not_ip",
        "pass_not_vip",
        "pass_ipv6_ext",
        "pass_vip_other_proto",
        "drop_malformed",
        "drop_fragment",
        "too_big_icmp_sent",
        "drop_too_big",
        "drop_no_backend",
        "drop_fib_failure",
        "drop_encap_failed",
        "forwarded_tx",
        "forwarded_redirect",
    ];

    /// Every counter as `(name, value)`, in field order.
    pub fn fields(&self) -> [(&'static str, u64); DATAPATH_COUNTERS] {
        [
            ("rx_packets", self.rx_packets),
            ("pass_not_ip", self.pass_not_ip),
            ("pass_not_vip", self.pass_not_vip),
            ("pass_ipv6_ext", self.pass_ipv6_ext),
            ("pass_vip_other_proto", self.pass_vip_other_proto),
            ("drop_malformed", self.drop_malformed),
            ("drop_fragment", self.drop_fragment),
            ("too_big_icmp_sent", self.too_big_icmp_sent),
            ("drop_too_big", self.drop_too_big),
            ("drop_no_backend", self.drop_no_backend),
            ("drop_fib_failure", self.drop_fib_failure),
            ("drop_encap_failed", self.drop_encap_failed),
            ("forwarded_tx", self.forwarded_tx),
            ("forwarded_redirect", self.forwarded_redirect),
            ("conntrack_hit", self.conntrack_hit),
            ("conntrack_miss", self.conntrack_miss),
            ("conntrack_insert_skipped", self.conntrack_insert_skipped),
            ("conntrack_insert_failed", self.conntrack_insert_failed),
            ("conntrack_udp_expired", self.conntrack_udp_expired),
            ("fib_gateway_fallback", self.fib_gateway_fallback),
            ("icmp_to_backend", self.icmp_to_backend),
        ]
    }
}

impl FlowKey {
    /// The key of this flow in the IPv4 table, if it is an IPv4 flow.
    pub const fn to_v4(&self) -> Option<FlowKeyV4> {
        if self.family != crate::FAMILY_V4 {
            return None;
        }
        Some(FlowKeyV4 {
            src_be: self.src_be[0],
            dst_be: self.dst_be[0],
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            _pad: [0; 3],
        })
    }
}

impl FlowKeyV4 {
    /// The same flow as a family-neutral [`FlowKey`].
    pub const fn to_flow_key(&self) -> FlowKey {
        FlowKey {
            src_be: [self.src_be, 0, 0, 0],
            dst_be: [self.dst_be, 0, 0, 0],
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        }
    }
}

impl DecapStats {
    /// Every counter as `(name, value)`, in field order.
    pub fn fields(&self) -> [(&'static str, u64); 5] {
        [
            ("rx_packets", self.rx_packets),
            ("decapsulated", self.decapsulated),
            ("pass_not_tunnel", self.pass_not_tunnel),
            ("pass_not_local", self.pass_not_local),
            ("drop_malformed", self.drop_malformed),
        ]
    }
}

// Layout is part of the kernel/userspace contract: a size change here must be deliberate.
const _: () = {
    assert!(size_of::<VipKey>() == 20);
    assert!(size_of::<VipInfo>() == 16);
    assert!(size_of::<VipAddrKey>() == 20);
    assert!(size_of::<Backend>() == 20);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<FlowKeyV4>() == 16);
    assert!(size_of::<ClockCache>() == 16);
    assert!(size_of::<FlowState>() == 16);
    assert!(size_of::<DatapathConfig>() == 48);
    assert!(size_of::<DatapathStats>() == DATAPATH_COUNTERS * 8);
    assert!(size_of::<VipStats>() == 24);
    assert!(size_of::<BackendStats>() == 16);
    assert!(size_of::<RateGuard>() == 16);
    assert!(size_of::<NextHop>() == 48);
    assert!(size_of::<DecapStats>() == 40);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_flow_keys_convert_both_ways() {
        let key = FlowKey {
            src_be: [u32::from_ne_bytes([192, 0, 2, 7]), 0, 0, 0],
            dst_be: [u32::from_ne_bytes([203, 0, 113, 10]), 0, 0, 0],
            sport_be: 40_000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        };
        let v4 = key.to_v4().expect("an IPv4 flow");
        assert_eq!(v4.src_be, key.src_be[0]);
        assert_eq!(v4.dst_be, key.dst_be[0]);
        assert_eq!(
            (v4.sport_be, v4.dport_be, v4.proto),
            (key.sport_be, key.dport_be, 6)
        );
        assert_eq!(v4._pad, [0; 3]);
        assert_eq!(v4.to_flow_key(), key);
    }

    #[test]
    fn ipv6_flow_keys_have_no_ipv4_form() {
        let key = FlowKey {
            src_be: [1, 2, 3, 4],
            family: crate::FAMILY_V6,
            ..FlowKey::default()
        };
        assert_eq!(key.to_v4(), None);
    }
}
