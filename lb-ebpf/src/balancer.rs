//! The balancer: parse → VIP → connection table or Maglev → encapsulate → forward.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    DatapathConfig, DatapathStats, FlowKey, PROTO_TCP, PROTO_UDP, VIP_F_HASH_SRC_ONLY, VipAddrKey,
    VipInfo, VipKey, flow_hash,
};

use crate::conntrack;
use crate::encap;
use crate::headers::{TCP_FLAG_ACK, TCP_FLAG_SYN};
use crate::maglev;
use crate::maps::{XLB_BACK_STATS, XLB_CONFIG, XLB_VIP_ADDRS, XLB_VIP_STATS, XLB_VIPS};
use crate::parse::{self, Packet};
use crate::stats::{self, Outcome};

/// Entry point body: every packet is counted once in `rx_packets` and once by outcome.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(stats) = stats::datapath_stats() else {
        // Only possible if the stats map is missing: pass rather than black-hole traffic.
        return xdp_action::XDP_PASS;
    };
    stats.rx_packets += 1;
    let outcome = match try_balance(ctx, stats) {
        Ok(outcome) | Err(outcome) => outcome,
    };
    stats::count_outcome(stats, outcome);
    outcome.verdict()
}

#[inline(always)]
fn try_balance(ctx: &XdpContext, stats: &mut DatapathStats) -> Result<Outcome, Outcome> {
    let (l2_len, ethertype) = parse::parse_ethernet(ctx)?;
    let p = parse::parse_ip(ctx, l2_len, ethertype)?;

    if p.is_fragment || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) {
        // Fragments (no ports past the first) and ICMP/other protocols: ours only if the
        // address carries a VIP. Fragments are dropped until consistent fragment
        // forwarding exists; the rest goes to the local stack.
        if !is_vip_address(&p) {
            return Err(Outcome::PassNotVip);
        }
        return Err(if p.is_fragment {
            Outcome::DropFragment
        } else {
            Outcome::PassVipOtherProto
        });
    }

    let (sport_be, dport_be, tcp_flags) = parse::parse_l4(ctx, &p)?;
    let info = lookup_vip(&p, dport_be).ok_or(Outcome::PassNotVip)?;
    let cfg: &DatapathConfig = XLB_CONFIG.get(0).ok_or(Outcome::PassNotVip)?;

    let key = FlowKey {
        src_be: p.src_be,
        dst_be: p.dst_be,
        sport_be,
        dport_be,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    };
    // A SYN starts a new connection: always a fresh pick, so a reused 5-tuple follows the
    // current table rather than a stale entry.
    let is_syn = p.proto == PROTO_TCP && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let tracked = if is_syn {
        None
    } else {
        conntrack::lookup(&key, cfg, stats)
    };
    let src_only = info.flags & VIP_F_HASH_SRC_ONLY != 0;
    // The hash picks new flows and, for IPv6 tunnels, fills the outer flow label.
    let hash = || flow_hash(&p.src_be, sport_be, dport_be, p.proto, src_only);

    let (backend_id, backend, flow_hash) =
        match tracked.and_then(|id| maglev::backend(id).map(|b| (id, b))) {
            Some((id, backend)) => {
                stats.conntrack_hit += 1;
                let entropy = if backend.family == lb_common::FAMILY_V6 {
                    hash()
                } else {
                    0
                };
                (id, backend, entropy)
            }
            None => {
                // Miss, SYN, expired UDP entry, or the recorded backend is gone.
                stats.conntrack_miss += 1;
                let hash = hash();
                let id = maglev::pick(info, hash, cfg).ok_or(Outcome::DropNoBackend)?;
                let backend = maglev::backend(id).ok_or(Outcome::DropNoBackend)?;
                conntrack::insert(&key, id, info.vip_id, cfg, stats);
                if let Some(v) = XLB_VIP_STATS.get_ptr_mut(info.vip_id) {
                    unsafe { (*v).new_conns += 1 };
                }
                (id, backend, hash)
            }
        };

    let outcome = encap::forward(ctx, &p, backend_id, backend, cfg, stats, flow_hash)?;
    let bytes = p.ip_len as u64;
    if matches!(outcome, Outcome::ForwardedTx | Outcome::ForwardedRedirect) {
        if let Some(v) = XLB_VIP_STATS.get_ptr_mut(info.vip_id) {
            unsafe {
                (*v).packets += 1;
                (*v).bytes += bytes;
            }
        }
        if let Some(b) = XLB_BACK_STATS.get_ptr_mut(backend_id) {
            unsafe {
                (*b).packets += 1;
                (*b).bytes += bytes;
            }
        }
    }
    Ok(outcome)
}

/// The VIP for (destination, port, protocol), falling back to the address's any-port VIP.
#[inline(always)]
fn lookup_vip(p: &Packet, dport_be: u16) -> Option<&'static VipInfo> {
    let mut key = VipKey {
        addr_be: p.dst_be,
        port_be: dport_be,
        proto: p.proto,
        family: p.family,
    };
    if let Some(info) = unsafe { XLB_VIPS.get(&key) } {
        return Some(info);
    }
    key.port_be = 0;
    unsafe { XLB_VIPS.get(&key) }
}

#[inline(always)]
fn is_vip_address(p: &Packet) -> bool {
    let key = VipAddrKey {
        addr_be: p.dst_be,
        family: p.family,
        _pad: [0; 3],
    };
    unsafe { XLB_VIP_ADDRS.get(&key) }.is_some()
}
