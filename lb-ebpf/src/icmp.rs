//! "Fragmentation needed" (ICMPv4 type 3 code 4) and "packet too big" (ICMPv6 type 2)
//! replies for packets that would exceed the egress MTU once encapsulated. The original is
//! turned into the reply in place and sent back out of the ingress interface (XDP_TX), so
//! the client's path-MTU discovery lowers its segment size and the connection proceeds.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::FAMILY_V4;

use crate::checksum;
use crate::headers::*;
use crate::keys::{self, Flow};
use crate::parse::Packet;
use crate::stats::Outcome;

/// Bytes of the original IPv4 packet quoted: the largest IPv4 header (60) plus the 8 bytes
/// that hold the ports — a constant, so the checksum is over a verifier-known length.
const QUOTE_V4: usize = 68;
/// Bytes of the original IPv6 packet quoted: as much as fits the 1280-byte minimum MTU
/// (RFC 4443 §2.4(c)): 1280 - 40 (IPv6) - 8 (ICMPv6).
const QUOTE_V6: usize = 1232;
/// Smallest MTU a reply may announce (RFC 791 / RFC 8200).
const MIN_MTU_V4: u32 = 68;
const MIN_MTU_V6: u32 = 1280;

/// Answers the client with the MTU it may use (`usable_mtu` = egress MTU less the tunnel
/// overhead). Returns `Ok(TooBigIcmpSent)` (XDP_TX) or `Err(DropTooBig)`.
#[inline(always)]
pub fn reply_too_big(ctx: &XdpContext, p: &Packet, usable_mtu: u32) -> Result<Outcome, Outcome> {
    if p.family == FAMILY_V4 {
        // Without DF the sender asked routers to fragment, which XDP cannot do; such a
        // sender also ignores "fragmentation needed". Drop and count.
        if !p.dont_fragment || usable_mtu < MIN_MTU_V4 || p.ip_len < QUOTE_V4 {
            return Err(Outcome::DropTooBig);
        }
        reply_v4(ctx, p, usable_mtu)
    } else {
        if usable_mtu < MIN_MTU_V6 || p.ip_len < QUOTE_V6 {
            return Err(Outcome::DropTooBig);
        }
        reply_v6(ctx, p, usable_mtu)
    }
}

/// Cuts the packet to L2 + `quote` bytes of the original IP packet and makes room in front
/// for `reply_hdrs` bytes of new IP + ICMP headers. Returns the original MAC addresses.
#[inline(always)]
fn reshape(
    ctx: &XdpContext,
    l2_len: usize,
    quote: usize,
    reply_hdrs: usize,
) -> Result<([u8; 6], [u8; 6]), Outcome> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Outcome::DropTooBig)?;
    let (orig_dst, orig_src) = unsafe { ((*eth).dst, (*eth).src) };
    let shrink = packet_len(ctx) as i64 - (l2_len + quote) as i64;
    if shrink > 0 && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, -(shrink as i32)) } != 0 {
        return Err(Outcome::DropTooBig);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(reply_hdrs as i32)) } != 0 {
        return Err(Outcome::DropTooBig);
    }
    Ok((orig_dst, orig_src))
}

/// Writes the Ethernet header of the reply (MACs swapped, VLAN tag kept).
#[inline(always)]
fn write_l2(
    ctx: &XdpContext,
    l2_len: usize,
    reply_hdrs: usize,
    macs: ([u8; 6], [u8; 6]),
    ethertype_be: u16,
) -> Result<(), Outcome> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Outcome::DropTooBig)?;
    unsafe {
        (*eth).dst = macs.1;
        (*eth).src = macs.0;
    }
    if l2_len == ETH_HLEN + VLAN_HLEN {
        let old_tag: *const [u16; 2] =
            ptr_at(ctx, reply_hdrs + ETH_HLEN - 2).ok_or(Outcome::DropTooBig)?;
        let new_tag: *mut [u16; 3] = ptr_at(ctx, ETH_HLEN - 2).ok_or(Outcome::DropTooBig)?;
        unsafe {
            let [tpid, tci] = *old_tag;
            *new_tag = [tpid, tci, ethertype_be];
        }
    } else {
        unsafe { (*eth).proto_be = ethertype_be };
    }
    Ok(())
}

#[inline(always)]
fn reply_v4(ctx: &XdpContext, p: &Packet, usable_mtu: u32) -> Result<Outcome, Outcome> {
    const HDRS: usize = IPV4_HLEN + ICMP_HLEN;
    let l2_len = p.l2_len;
    let macs = reshape(ctx, l2_len, QUOTE_V4, HDRS)?;
    if !has_bytes(ctx, l2_len, HDRS + QUOTE_V4) {
        return Err(Outcome::DropTooBig);
    }
    write_l2(ctx, l2_len, HDRS, macs, ETH_P_IPV4_BE)?;

    let ip: *mut Ipv4Hdr = ptr_at(ctx, l2_len).ok_or(Outcome::DropTooBig)?;
    let icmp: *mut IcmpHdr = ptr_at(ctx, l2_len + IPV4_HLEN).ok_or(Outcome::DropTooBig)?;
    let quote: *const [u8; QUOTE_V4] = ptr_at(ctx, l2_len + HDRS).ok_or(Outcome::DropTooBig)?;
    unsafe {
        *ip = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: 0xc0, // internetwork control, as routers send ICMP errors
            tot_len_be: ((HDRS + QUOTE_V4) as u16).to_be(),
            id_be: 0,
            frag_off_be: 0,
            ttl: 64,
            proto: IPPROTO_ICMP,
            check: 0,
            saddr_be: p.dst_be[0],
            daddr_be: p.src_be[0],
        };
        (*ip).check = checksum::fold(checksum::ipv4_header_sum(ip as *const u16));
        *icmp = IcmpHdr {
            kind: 3,
            code: 4,
            check: 0,
            rest_be: (usable_mtu & 0xffff).to_be(),
        };
        let mut sum = checksum::sum_bytes(quote as *const u8, QUOTE_V4 as u32, 0);
        sum += sum_words::<4>(icmp as *const u16);
        (*icmp).check = checksum::fold(sum);
    }
    Ok(Outcome::TooBigIcmpSent)
}

#[inline(always)]
fn reply_v6(ctx: &XdpContext, p: &Packet, usable_mtu: u32) -> Result<Outcome, Outcome> {
    const HDRS: usize = IPV6_HLEN + ICMP_HLEN;
    const ICMP_LEN: usize = ICMP_HLEN + QUOTE_V6;
    let l2_len = p.l2_len;
    let macs = reshape(ctx, l2_len, QUOTE_V6, HDRS)?;
    if !has_bytes(ctx, l2_len, HDRS + QUOTE_V6) {
        return Err(Outcome::DropTooBig);
    }
    write_l2(ctx, l2_len, HDRS, macs, ETH_P_IPV6_BE)?;

    let ip: *mut Ipv6Hdr = ptr_at(ctx, l2_len).ok_or(Outcome::DropTooBig)?;
    let icmp: *mut IcmpHdr = ptr_at(ctx, l2_len + IPV6_HLEN).ok_or(Outcome::DropTooBig)?;
    let quote: *const [u8; QUOTE_V6] = ptr_at(ctx, l2_len + HDRS).ok_or(Outcome::DropTooBig)?;
    unsafe {
        *ip = Ipv6Hdr {
            ver_tc_flow_be: (6u32 << 28).to_be(),
            payload_len_be: (ICMP_LEN as u16).to_be(),
            nexthdr: IPPROTO_ICMPV6,
            hop_limit: 64,
            saddr_be: p.dst_be,
            daddr_be: p.src_be,
        };
        *icmp = IcmpHdr {
            kind: 2,
            code: 0,
            check: 0,
            rest_be: usable_mtu.to_be(),
        };
        // Pseudo-header (RFC 8200 §8.1): addresses, upper-layer length, next header.
        let mut sum = sum_addr(&p.dst_be) + sum_addr(&p.src_be);
        sum += (ICMP_LEN as u16).to_be() as u64 + (IPPROTO_ICMPV6 as u16).to_be() as u64;
        sum += sum_words::<4>(icmp as *const u16);
        // bpf_csum_diff takes at most 512 bytes per call.
        let q = quote as *const u8;
        sum += checksum::sum_bytes(q, 512, 0);
        sum += checksum::sum_bytes(q.add(512), 512, 0);
        sum += checksum::sum_bytes(q.add(1024), (QUOTE_V6 - 1024) as u32, 0);
        (*icmp).check = checksum::fold(sum);
    }
    Ok(Outcome::TooBigIcmpSent)
}

#[inline(always)]
fn sum_addr(words: &[u32; 4]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum += (words[i] & 0xffff) as u64 + (words[i] >> 16) as u64;
        i += 1;
    }
    sum
}

#[inline(always)]
unsafe fn sum_words<const N: usize>(ptr: *const u16) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        sum += unsafe { *ptr.add(i) } as u64;
        i += 1;
    }
    sum
}

/// ICMPv4 types that quote an offending packet and matter to its sender.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMPv6 error types that quote an offending packet.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;

/// If `p` is an ICMP error quoting a TCP/UDP packet sent *from* the VIP it is addressed to
/// (a backend's direct reply), the flow as the balancer keys it: client → VIP.
#[inline(always)]
pub fn quoted_vip_flow(ctx: &XdpContext, p: &Packet) -> Option<Flow> {
    let icmp: *const IcmpHdr = ptr_at(ctx, p.l4_off)?;
    let kind = unsafe { (*icmp).kind };
    let inner_off = p.l4_off + ICMP_HLEN;
    let (src_be, dst_be, proto, ports_off) = if p.family == FAMILY_V4 {
        if p.proto != IPPROTO_ICMP || (kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED) {
            return None;
        }
        let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off)?;
        let inner = unsafe { &*inner };
        let ihl = ((inner.ver_ihl & 0x0f) as usize) * 4;
        if inner.ver_ihl >> 4 != 4 || ihl < IPV4_HLEN {
            return None;
        }
        (
            [inner.saddr_be, 0, 0, 0],
            [inner.daddr_be, 0, 0, 0],
            inner.proto,
            inner_off + ihl,
        )
    } else {
        if p.proto != IPPROTO_ICMPV6
            || (kind != ICMPV6_DEST_UNREACH
                && kind != ICMPV6_PKT_TOOBIG
                && kind != ICMPV6_TIME_EXCEED)
        {
            return None;
        }
        let inner: *const Ipv6Hdr = ptr_at(ctx, inner_off)?;
        let inner = unsafe { &*inner };
        if u32::from_be(inner.ver_tc_flow_be) >> 28 != 6 {
            return None;
        }
        (
            inner.saddr_be,
            inner.daddr_be,
            inner.nexthdr,
            inner_off + IPV6_HLEN,
        )
    };
    // Only errors about packets the VIP sent are ours to pass on.
    if (proto != IPPROTO_TCP && proto != lb_common::PROTO_UDP) || src_be != p.dst_be {
        return None;
    }
    let ports: *const [u16; 2] = ptr_at(ctx, ports_off)?;
    let [vip_port_be, client_port_be] = unsafe { *ports };
    Some(Flow {
        src_be: dst_be,
        dst_be: src_be,
        ports: keys::ports(client_port_be, vip_port_be),
        proto,
        family: p.family,
    })
}
