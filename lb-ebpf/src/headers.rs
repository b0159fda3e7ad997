//! Wire header layouts, bounds-checked access to packet memory, and protocol constants.
//!
//! Fields are read with plain loads: the kernel allows unaligned packet access on the
//! architectures xlb supports (x86-64, arm64), and byte-wise reads would cost instructions
//! on every packet. Multi-byte fields are named `_be` and kept in network byte order.

use aya_ebpf::programs::XdpContext;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

// EtherTypes in network byte order, as read from the packet on a little-endian host.
pub const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MH: u8 = 135;
pub const IPPROTO_HIP: u8 = 139;
pub const IPPROTO_SHIM6: u8 = 140;

/// IPv4 `frag_off` bits (host order).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF_AND_OFFSET: u16 = 0x3fff;

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    /// version (4 bits), traffic class (8), flow label (20), network byte order.
    pub ver_tc_flow_be: u32,
    pub payload_len_be: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub seq_be: u32,
    pub ack_seq_be: u32,
    /// Data offset (high 4 bits) and reserved bits.
    pub doff_res: u8,
    pub flags: u8,
    pub window_be: u16,
    pub check: u16,
    pub urg_ptr_be: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub len_be: u16,
    pub check: u16,
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// "unused" + next-hop MTU (ICMPv4 frag needed) or MTU (ICMPv6 packet too big).
    pub rest_be: u32,
}

/// Pointer to a `T` at `offset` bytes into the packet, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// True if the packet holds at least `len` bytes from `offset`.
#[inline(always)]
pub fn has_bytes(ctx: &XdpContext, offset: usize, len: usize) -> bool {
    ctx.data() + offset + len <= ctx.data_end()
}

/// Packet length in bytes.
#[inline(always)]
pub fn packet_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
