//! Parsing Ethernet (one 802.1Q tag), IPv4 (options skipped), IPv6 (fixed header), TCP, UDP.
//!
//! Headers that the kernel itself would discard (truncated, bad version or IHL, lengths
//! beyond the frame) are `DropMalformed`: no decision about their destination can be
//! trusted, and dropping them here is what the stack would do a few microseconds later.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6};

use crate::headers::*;
use crate::stats::Outcome;

/// What the balancer needs to know about an IP packet.
pub struct Packet {
    /// Bytes of Ethernet header including a VLAN tag: 14 or 18.
    pub l2_len: usize,
    pub family: u8,
    /// IP protocol (IPv6: the next header of the fixed header).
    pub proto: u8,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// IP packet length (header + payload) from the IP header.
    pub ip_len: usize,
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    /// IPv4 TOS or IPv6 traffic class, copied to the outer header.
    pub tos: u8,
    /// IPv4 DF bit; always true for IPv6 (routers never fragment IPv6).
    pub dont_fragment: bool,
    /// IPv4 MF or offset set, or an IPv6 Fragment header.
    pub is_fragment: bool,
}

/// Returns the Ethernet header length (14 or 18 with one 802.1Q tag) and the EtherType.
#[inline(always)]
pub fn parse_ethernet(ctx: &XdpContext) -> Result<(usize, u16), Outcome> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Outcome::DropMalformed)?;
    let proto = unsafe { (*eth).proto_be };
    if proto != ETH_P_8021Q_BE {
        return Ok((ETH_HLEN, proto));
    }
    let inner: *const u16 = ptr_at(ctx, ETH_HLEN + 2).ok_or(Outcome::DropMalformed)?;
    Ok((ETH_HLEN + VLAN_HLEN, unsafe { *inner }))
}

/// Parses the IP header after `l2_len` bytes of Ethernet.
#[inline(always)]
pub fn parse_ip(ctx: &XdpContext, l2_len: usize, ethertype_be: u16) -> Result<Packet, Outcome> {
    if ethertype_be == ETH_P_IPV4_BE {
        parse_ipv4(ctx, l2_len)
    } else if ethertype_be == ETH_P_IPV6_BE {
        parse_ipv6(ctx, l2_len)
    } else {
        Err(Outcome::PassNotIp)
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l2_len: usize) -> Result<Packet, Outcome> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l2_len).ok_or(Outcome::DropMalformed)?;
    let ip = unsafe { &*ip };
    if ip.ver_ihl >> 4 != 4 {
        return Err(Outcome::DropMalformed);
    }
    let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be(ip.tot_len_be) as usize;
    if ihl < IPV4_HLEN || ip_len < ihl || l2_len + ip_len > packet_len(ctx) {
        return Err(Outcome::DropMalformed);
    }
    let frag = u16::from_be(ip.frag_off_be);
    Ok(Packet {
        l2_len,
        family: FAMILY_V4,
        proto: ip.proto,
        l4_off: l2_len + ihl,
        ip_len,
        src_be: [ip.saddr_be, 0, 0, 0],
        dst_be: [ip.daddr_be, 0, 0, 0],
        tos: ip.tos,
        dont_fragment: frag & IP_DF != 0,
        is_fragment: frag & IP_MF_AND_OFFSET != 0,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l2_len: usize) -> Result<Packet, Outcome> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l2_len).ok_or(Outcome::DropMalformed)?;
    let ip = unsafe { &*ip };
    let first = u32::from_be(ip.ver_tc_flow_be);
    if first >> 28 != 6 {
        return Err(Outcome::DropMalformed);
    }
    let ip_len = IPV6_HLEN + u16::from_be(ip.payload_len_be) as usize;
    if l2_len + ip_len > packet_len(ctx) {
        return Err(Outcome::DropMalformed);
    }
    let proto = ip.nexthdr;
    let is_extension = matches!(
        proto,
        IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_DSTOPTS
            | IPPROTO_AH
            | IPPROTO_ESP
            | IPPROTO_MH
            | IPPROTO_HIP
            | IPPROTO_SHIM6
    );
    if is_extension {
        return Err(Outcome::PassIpv6Ext);
    }
    Ok(Packet {
        l2_len,
        family: FAMILY_V6,
        proto,
        l4_off: l2_len + IPV6_HLEN,
        ip_len,
        src_be: ip.saddr_be,
        dst_be: ip.daddr_be,
        tos: (first >> 20) as u8,
        dont_fragment: true,
        is_fragment: proto == IPPROTO_FRAGMENT,
    })
}

/// Ports and TCP flags of a TCP or UDP packet; `DropMalformed` if the L4 header is
/// truncated (by the frame or by the IP length) or has a bad TCP data offset.
#[inline(always)]
pub fn parse_l4(ctx: &XdpContext, p: &Packet) -> Result<(u16, u16, u8), Outcome> {
    let l3_end = p.l2_len + p.ip_len;
    if p.proto == IPPROTO_TCP {
        if p.l4_off + TCP_HLEN > l3_end {
            return Err(Outcome::DropMalformed);
        }
        let tcp: *const TcpHdr = ptr_at(ctx, p.l4_off).ok_or(Outcome::DropMalformed)?;
        let tcp = unsafe { &*tcp };
        if ((tcp.doff_res >> 4) as usize) * 4 < TCP_HLEN {
            return Err(Outcome::DropMalformed);
        }
        Ok((tcp.sport_be, tcp.dport_be, tcp.flags))
    } else {
        if p.l4_off + UDP_HLEN > l3_end {
            return Err(Outcome::DropMalformed);
        }
        let udp: *const UdpHdr = ptr_at(ctx, p.l4_off).ok_or(Outcome::DropMalformed)?;
        let udp = unsafe { &*udp };
        Ok((udp.sport_be, udp.dport_be, 0))
    }
}
