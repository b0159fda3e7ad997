//! Encapsulation toward the backend (direct server return): IPv4-in-IPv4, IPv6-in-IPv6 and
//! IPv4-in-IPv6, next hop from `bpf_fib_lookup` with a configured gateway MAC as fallback.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{Backend, DatapathConfig, DatapathStats, FAMILY_V4, FAMILY_V6};

use crate::maps::XLB_NEXTHOP;

use crate::checksum;
use crate::clock::Clock;
use crate::headers::*;
use crate::icmp;
use crate::parse::Packet;
use crate::probe::{self, off, stop, stop_at};
use crate::stats::Outcome;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const OUTER_TTL: u8 = 64;
/// How long a resolved next hop is reused: route and neighbour changes take effect within
/// this time. A FIB plus neighbour lookup costs more than the rest of the fast path.
const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

/// Where the encapsulated frame goes. MACs are kept as 16-bit words: every source is
/// 2-byte aligned, and the BPF backend copies a `[u8; 6]` one byte at a time.
struct NextHop {
    smac: [u16; 3],
    dmac: [u16; 3],
    ifindex: u32,
    /// Route MTU; 0 = unknown (no check).
    mtu: u32,
}

/// The backend a packet goes to.
pub struct Target<'a> {
    pub backend_id: u32,
    pub backend: &'a Backend,
    /// Flow hash for the outer IPv6 flow label (ECMP and the backend's RSS).
    pub flow_entropy: u32,
}

/// Encapsulates the packet toward the target backend and picks the verdict; answers with
/// ICMP when the result would not fit the egress MTU.
#[inline(always)]
pub fn forward<const STOP: u32, const OFF: u32>(
    ctx: &XdpContext,
    p: &Packet,
    target: &Target,
    cfg: &DatapathConfig,
    stats: &mut DatapathStats,
    clock: &mut Clock,
) -> Result<Outcome, Outcome> {
    let backend = target.backend;
    let flow_entropy = target.flow_entropy;
    let outer_is_v6 = backend.family == FAMILY_V6;
    if !outer_is_v6 && p.family == FAMILY_V6 {
        // IPv6-in-IPv4 is not offered; the agent refuses such a configuration.
        return Err(Outcome::DropEncapFailed);
    }
    let outer_len = if outer_is_v6 { IPV6_HLEN } else { IPV4_HLEN };
    let outer_total = p.ip_len + outer_len;
    let ingress = ctx.ingress_ifindex() as u32;

    let now = clock.now();
    stop_at!(STOP, stop::CLOCK);
    let hop = if probe::removed(OFF, off::NEXT_HOP) {
        Err(FibMiss::NoRoute)
    } else {
        next_hop(ctx, p, target, outer_total, ingress, cfg, now)
    };
    stop_at!(STOP, stop::NEXT_HOP);
    let hop = match hop {
        Ok(hop) if hop.mtu != 0 && outer_total > hop.mtu as usize => {
            return icmp::reply_too_big(ctx, p, hop.mtu.saturating_sub(outer_len as u32));
        }
        Ok(hop) => hop,
        Err(FibMiss::TooBig(mtu)) => {
            return icmp::reply_too_big(ctx, p, mtu.saturating_sub(outer_len as u32));
        }
        Err(FibMiss::NoRoute) => {
            let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Outcome::DropMalformed)?;
            if cfg.gateway_mac == [0u8; 6] {
                return Err(Outcome::DropFibFailure);
            }
            if cfg.fallback_mtu != 0 && outer_total > cfg.fallback_mtu as usize {
                return icmp::reply_too_big(ctx, p, cfg.fallback_mtu - outer_len as u32);
            }
            stats.fib_gateway_fallback += 1;
            NextHop {
                // The frame was addressed to this interface, so its destination MAC is ours.
                smac: unsafe { mac_words(&(*eth).dst) },
                dmac: mac_words(&cfg.gateway_mac),
                ifindex: ingress,
                mtu: 0,
            }
        }
    };

    // Grow the headroom for the outer header, then move the Ethernet header (and its VLAN
    // tag) to the new front.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(outer_len as i32)) } != 0 {
        return Err(Outcome::DropEncapFailed);
    }
    stop_at!(STOP, stop::ADJUST_HEAD);
    let l2_len = p.l2_len;
    if !has_bytes(ctx, 0, outer_len + l2_len + IPV4_HLEN) {
        return Err(Outcome::DropEncapFailed);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Outcome::DropEncapFailed)?;
    // SAFETY: the 12 address bytes at the checked front of the packet.
    unsafe {
        let w = eth as *mut [u16; 3];
        *w = hop.dmac;
        *w.add(1) = hop.smac;
    }
    stop_at!(STOP, stop::MACS);
    let outer_ethertype = if outer_is_v6 {
        ETH_P_IPV6_BE
    } else {
        ETH_P_IPV4_BE
    };
    if l2_len == ETH_HLEN + VLAN_HLEN {
        let old_tag: *const [u16; 2] =
            ptr_at(ctx, outer_len + ETH_HLEN - 2).ok_or(Outcome::DropEncapFailed)?;
        let new_tag: *mut [u16; 3] = ptr_at(ctx, ETH_HLEN - 2).ok_or(Outcome::DropEncapFailed)?;
        unsafe {
            let [tpid, tci] = *old_tag;
            *new_tag = [tpid, tci, outer_ethertype];
        }
    } else {
        unsafe { (*eth).proto_be = outer_ethertype };
    }
    stop_at!(STOP, stop::ETHERTYPE);

    let inner_proto = if p.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    if outer_is_v6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l2_len).ok_or(Outcome::DropEncapFailed)?;
        // Flow label from the flow hash: ECMP and the backend's RSS spread tunnels by flow.
        let first = (6u32 << 28) | ((p.tos as u32) << 20) | (flow_entropy & 0x000f_ffff);
        unsafe {
            *ip = Ipv6Hdr {
                ver_tc_flow_be: first.to_be(),
                payload_len_be: (p.ip_len as u16).to_be(),
                nexthdr: inner_proto,
                hop_limit: OUTER_TTL,
                saddr_be: cfg.tunnel_src_v6_be,
                daddr_be: backend.addr_be,
            };
        }
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l2_len).ok_or(Outcome::DropEncapFailed)?;
        // The packet fits the path MTU (checked above): DF lets routers beyond the first
        // hop report a smaller MTU instead of fragmenting the tunnel.
        let frag_off_be = if p.dont_fragment { IP_DF.to_be() } else { 0 };
        // The header as five 32-bit words in memory order (wire bytes read as little-endian),
        // checksummed from registers and stored whole: field-sized stores read back as
        // 16-bit words for the checksum stall store-to-load forwarding.
        let w0 = 0x45 | (p.tos as u32) << 8 | ((outer_total as u16).to_be() as u32) << 16;
        let w1 = (frag_off_be as u32) << 16;
        let w2 = OUTER_TTL as u32 | (inner_proto as u32) << 8;
        let (saddr_be, daddr_be) = (cfg.tunnel_src_v4_be, backend.addr_be[0]);
        let w2 = w2
            | (checksum::fold(checksum::sum_words(&[w0, w1, w2, saddr_be, daddr_be])) as u32) << 16;
        // SAFETY: `ptr_at` checked the 20 bytes.
        unsafe { *(ip as *mut [u32; 5]) = [w0, w1, w2, saddr_be, daddr_be] };
    }

    stop_at!(STOP, stop::ENCAP);
    if hop.ifindex == ingress {
        Ok(Outcome::ForwardedTx)
    } else {
        unsafe { bpf_redirect(hop.ifindex, 0) };
        Ok(Outcome::ForwardedRedirect)
    }
}

enum FibMiss {
    /// The route's MTU is smaller than the encapsulated packet.
    TooBig(u32),
    /// No usable route or neighbour: use the gateway fallback.
    NoRoute,
}

/// The next hop toward `backend`: from this CPU's cache while fresh, else from
/// `bpf_fib_lookup` (which also reports the route MTU), refreshing the cache.
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    p: &Packet,
    target: &Target,
    outer_total: usize,
    ingress: u32,
    cfg: &DatapathConfig,
    now: u64,
) -> Result<NextHop, FibMiss> {
    let (backend_id, backend) = (target.backend_id, target.backend);
    let cached = XLB_NEXTHOP.get_ptr_mut(backend_id);
    if let Some(entry) = cached {
        let e = unsafe { &*entry };
        if e.expires_ns > now && e.backend_addr_be == backend.addr_be {
            return Ok(NextHop {
                smac: mac_words(&e.smac),
                dmac: mac_words(&e.dmac),
                ifindex: e.ifindex,
                mtu: e.mtu,
            });
        }
    }
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.ifindex = ingress;
    fib.__bindgen_anon_1.tot_len = outer_total as u16;
    fib.l4_protocol = if p.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    if backend.family == FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = p.tos;
        fib.__bindgen_anon_3.ipv4_src = cfg.tunnel_src_v4_be;
        fib.__bindgen_anon_4.ipv4_dst = backend.addr_be[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = cfg.tunnel_src_v6_be;
        fib.__bindgen_anon_4.ipv6_dst = backend.addr_be;
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let macs = unsafe { &fib.__bindgen_anon_6.__bindgen_anon_2 };
        // On success the kernel returns the route MTU in `mtu_result` (since 5.12).
        let mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as u32;
        if let Some(entry) = cached {
            unsafe {
                *entry = lb_common::NextHop {
                    backend_addr_be: backend.addr_be,
                    ifindex: fib.ifindex,
                    mtu,
                    smac: macs.smac,
                    dmac: macs.dmac,
                    _pad: 0,
                    expires_ns: now + NEXTHOP_TTL_NS,
                };
            }
        }
        Ok(NextHop {
            smac: mac_words(&macs.smac),
            dmac: mac_words(&macs.dmac),
            ifindex: fib.ifindex,
            mtu,
        })
    } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        Err(FibMiss::TooBig(
            unsafe { fib.__bindgen_anon_1.mtu_result } as u32
        ))
    } else {
        Err(FibMiss::NoRoute)
    }
}

/// A MAC address as three 16-bit words (wire order kept).
///
/// Every MAC passed here sits at an even offset of a struct with at least 2-byte alignment
/// (`lb_common::NextHop`, `DatapathConfig`, `bpf_fib_lookup`) or of the packet.
#[inline(always)]
fn mac_words(mac: &[u8; 6]) -> [u16; 3] {
    // SAFETY: 6 readable bytes; 2-byte aligned as described above.
    unsafe { core::ptr::read(mac.as_ptr() as *const [u16; 3]) }
}
