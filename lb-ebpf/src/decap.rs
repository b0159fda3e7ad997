//! The decapsulator for backends: strips the outer IPv4/IPv6 header of tunnel packets
//! addressed to one of this node's tunnel addresses (`XLB_DECAP_ADDRS`), so the kernel
//! delivers the inner packet to the VIP bound on loopback. The kernel here has no ipip
//! device, and DSR users need this anyway.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{FAMILY_V4, FAMILY_V6};

use crate::headers::*;
use crate::keys;
use crate::maps::XLB_DECAP_ADDRS;
use crate::parse;
use crate::stats::{DecapOutcome, count_decap};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let outcome = match try_decap(ctx) {
        Ok(o) | Err(o) => o,
    };
    count_decap(outcome)
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<DecapOutcome, DecapOutcome> {
    let (l2_len, ethertype) =
        parse::parse_ethernet(ctx).map_err(|_| DecapOutcome::DropMalformed)?;
    let (outer_len, inner_proto, local) = if ethertype == ETH_P_IPV4_BE {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l2_len).ok_or(DecapOutcome::DropMalformed)?;
        let ip = unsafe { &*ip };
        let frag = u16::from_be(ip.frag_off_be);
        if ip.ver_ihl >> 4 != 4
            || (ip.proto != IPPROTO_IPIP && ip.proto != IPPROTO_IPV6)
            || frag & IP_MF_AND_OFFSET != 0
        {
            // Not a tunnel packet we can strip (fragments of a tunnel go to the stack).
            return Err(DecapOutcome::PassNotTunnel);
        }
        let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
        if ihl < IPV4_HLEN {
            return Err(DecapOutcome::DropMalformed);
        }
        let key = keys::addr_key(&[ip.daddr_be, 0, 0, 0], FAMILY_V4);
        (ihl, ip.proto, key)
    } else if ethertype == ETH_P_IPV6_BE {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l2_len).ok_or(DecapOutcome::DropMalformed)?;
        let ip = unsafe { &*ip };
        if ip.nexthdr != IPPROTO_IPIP && ip.nexthdr != IPPROTO_IPV6 {
            return Err(DecapOutcome::PassNotTunnel);
        }
        let key = keys::addr_key(&ip.daddr_be, FAMILY_V6);
        (IPV6_HLEN, ip.nexthdr, key)
    } else {
        return Err(DecapOutcome::PassNotTunnel);
    };
    if unsafe { XLB_DECAP_ADDRS.get(local.get()) }.is_none() {
        return Err(DecapOutcome::PassNotLocal);
    }

    // The inner header must be whole and of the announced version.
    let inner_off = l2_len + outer_len;
    let inner_ethertype = if inner_proto == IPPROTO_IPIP {
        let inner: *const Ipv4Hdr = ptr_at(ctx, inner_off).ok_or(DecapOutcome::DropMalformed)?;
        if unsafe { (*inner).ver_ihl } >> 4 != 4 {
            return Err(DecapOutcome::DropMalformed);
        }
        ETH_P_IPV4_BE
    } else {
        let inner: *const Ipv6Hdr = ptr_at(ctx, inner_off).ok_or(DecapOutcome::DropMalformed)?;
        if u32::from_be(unsafe { (*inner).ver_tc_flow_be }) >> 28 != 6 {
            return Err(DecapOutcome::DropMalformed);
        }
        ETH_P_IPV6_BE
    };

    // Save the Ethernet header (MACs and VLAN tag), drop the outer IP header's bytes from
    // the front, and write the Ethernet header back with the inner EtherType.
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DecapOutcome::DropMalformed)?;
    let (dst, src) = unsafe { ((*eth).dst, (*eth).src) };
    let tag: *const [u16; 2] = ptr_at(ctx, ETH_HLEN - 2).ok_or(DecapOutcome::DropMalformed)?;
    let tag = unsafe { *tag };
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, outer_len as i32) } != 0 {
        return Err(DecapOutcome::DropMalformed);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DecapOutcome::DropMalformed)?;
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
    }
    if l2_len == ETH_HLEN + VLAN_HLEN {
        let tagged: *mut [u16; 3] = ptr_at(ctx, ETH_HLEN - 2).ok_or(DecapOutcome::DropMalformed)?;
        unsafe { *tagged = [tag[0], tag[1], inner_ethertype] };
    } else {
        unsafe { (*eth).proto_be = inner_ethertype };
    }
    Ok(DecapOutcome::Decapsulated)
}
