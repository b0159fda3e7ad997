//! The balancer: parse → VIP → connection table or Maglev → encapsulate → forward.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    DatapathConfig, DatapathStats, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VIP_F_HASH_SRC_ONLY,
    VipInfo, flow_hash,
};

use crate::clock::Clock;
use crate::conntrack;
use crate::encap::{self, Target};
use crate::headers::{TCP_FLAG_ACK, TCP_FLAG_SYN};
use crate::icmp;
use crate::keys::{self, Flow};
use crate::maglev;
use crate::maps::{XLB_BACK_STATS, XLB_CONFIG, XLB_VIP_ADDRS, XLB_VIP_STATS, XLB_VIPS};
use crate::parse::{self, Packet};
use crate::probe::{self, off, stop, stop_at};
use crate::stats::{self, Outcome};

/// Entry point body: every packet is counted once in `rx_packets` and once by outcome.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    run_variant::<0, 0>(ctx)
}

/// [`run`], stopped early at step `STOP` or without the steps in `OFF` (see
/// [`crate::probe`]); `<0, 0>` is the real program.
#[inline(always)]
pub fn run_variant<const STOP: u32, const OFF: u32>(ctx: &XdpContext) -> u32 {
    let Some(stats) = stats::datapath_stats() else {
        // Only possible if the stats map is missing: pass rather than black-hole traffic.
        return xdp_action::XDP_PASS;
    };
    stats.rx_packets += 1;
    let outcome = match try_balance::<STOP, OFF>(ctx, stats) {
        Ok(outcome) | Err(outcome) => outcome,
    };
    stats::count_outcome(stats, outcome);
    outcome.verdict()
}

#[inline(always)]
fn try_balance<const STOP: u32, const OFF: u32>(
    ctx: &XdpContext,
    stats: &mut DatapathStats,
) -> Result<Outcome, Outcome> {
    let (l2_len, ethertype) = parse::parse_ethernet(ctx)?;
    let p = parse::parse_ip(ctx, l2_len, ethertype)?;

    if p.is_fragment || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) {
        // Fragments (no ports past the first) and ICMP/other protocols: ours only if the
        // address carries a VIP. Fragments are dropped until consistent fragment
        // forwarding exists; the rest goes to the local stack.
        if !is_vip_address(&p) {
            return Err(Outcome::PassNotVip);
        }
        if p.is_fragment {
            return Err(Outcome::DropFragment);
        }
        // An ICMP error about a VIP flow belongs to the flow's backend: with direct server
        // return the backend's replies come from the VIP, so "fragmentation needed" for them
        // reaches this node, and the backend's path-MTU discovery depends on getting it.
        if let Some(outcome) = forward_icmp_error(ctx, &p, stats)? {
            return Ok(outcome);
        }
        return Err(Outcome::PassVipOtherProto);
    }

    let (sport_be, dport_be, tcp_flags) = parse::parse_l4(ctx, &p)?;
    stop_at!(STOP, stop::PARSED);
    // The rest is compiled once per address family: each copy looks up only its own
    // connection table, so every map lookup call in the object sees a single map and the
    // verifier inlines it (a call site LLVM shares between two maps becomes an indirect
    // call through the map's ops), and IPv4 code is built with the zero address words known.
    if p.family == FAMILY_V4 {
        balance_flow::<STOP, OFF, true>(ctx, &p, sport_be, dport_be, tcp_flags, stats)
    } else {
        balance_flow::<STOP, OFF, false>(ctx, &p, sport_be, dport_be, tcp_flags, stats)
    }
}

#[inline(always)]
fn balance_flow<const STOP: u32, const OFF: u32, const V4: bool>(
    ctx: &XdpContext,
    p: &Packet,
    sport_be: u16,
    dport_be: u16,
    tcp_flags: u8,
    stats: &mut DatapathStats,
) -> Result<Outcome, Outcome> {
    let cfg: &DatapathConfig = XLB_CONFIG.get(0).ok_or(Outcome::PassNotVip)?;
    let p = &Packet {
        family: if V4 { FAMILY_V4 } else { FAMILY_V6 },
        src_be: if V4 { [p.src_be[0], 0, 0, 0] } else { p.src_be },
        dst_be: if V4 { [p.dst_be[0], 0, 0, 0] } else { p.dst_be },
        ..*p
    };
    let flow = Flow {
        src_be: p.src_be,
        dst_be: p.dst_be,
        ports: keys::ports(sport_be, dport_be),
        proto: p.proto,
        family: p.family,
    };
    // The 5-tuple hash labels IPv6 tunnels (ECMP and the backend's RSS keep a flow together).
    let flow_label = || flow_hash(&p.src_be, sport_be, dport_be, p.proto, false);

    // Established flows: the connection table alone decides, so they skip the VIP lookup.
    // Its entries exist only for VIP flows (the agent deletes a VIP's entries when it
    // removes the VIP). A SYN starts a new connection: always a fresh pick, so a reused
    // 5-tuple follows the current table rather than a stale entry.
    stop_at!(STOP, stop::CONFIG);
    let mut clock = Clock::new::<OFF>();
    let no_stats = probe::removed(OFF, off::STATS);
    let is_syn = p.proto == PROTO_TCP && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let tracked = if is_syn {
        None
    } else {
        let found = conntrack::lookup::<OFF>(&flow, cfg, stats, &mut clock);
        stop_at!(STOP, stop::CT_LOOKUP);
        let tracked = found.and_then(|(id, vip_id)| maglev::backend(id).map(|b| (id, vip_id, b)));
        stop_at!(STOP, stop::BACKEND);
        tracked
    };
    let (backend_id, vip_id, backend, entropy) = match tracked {
        Some((id, vip_id, backend)) => {
            if !no_stats {
                stats.conntrack_hit += 1;
            }
            let entropy = if backend.family == lb_common::FAMILY_V6 {
                flow_label()
            } else {
                0
            };
            (id, vip_id, backend, entropy)
        }
        None => {
            // Miss, SYN, expired UDP entry, or the recorded backend is gone.
            let info = lookup_vip(p, dport_be).ok_or(Outcome::PassNotVip)?;
            stop_at!(STOP, stop::VIP);
            if !no_stats {
                stats.conntrack_miss += 1;
            }
            let five_tuple = flow_label();
            let pick_hash = if info.flags & VIP_F_HASH_SRC_ONLY != 0 {
                flow_hash(&p.src_be, sport_be, dport_be, p.proto, true)
            } else {
                five_tuple
            };
            stop_at!(STOP, stop::HASH);
            let id = maglev::pick(info, pick_hash, cfg).ok_or(Outcome::DropNoBackend)?;
            stop_at!(STOP, stop::PICK);
            let backend = maglev::backend(id).ok_or(Outcome::DropNoBackend)?;
            stop_at!(STOP, stop::NEW_BACKEND);
            conntrack::insert::<OFF>(&flow, id, info.vip_id, cfg, stats, &mut clock);
            stop_at!(STOP, stop::INSERT);
            if !no_stats && let Some(v) = XLB_VIP_STATS.get_ptr_mut(info.vip_id) {
                unsafe { (*v).new_conns += 1 };
            }
            (id, info.vip_id, backend, five_tuple)
        }
    };

    let target = Target {
        backend_id,
        backend,
        flow_entropy: entropy,
    };
    let outcome = encap::forward::<STOP, OFF>(ctx, p, &target, cfg, stats, &mut clock)?;
    if !no_stats && matches!(outcome, Outcome::ForwardedTx | Outcome::ForwardedRedirect) {
        count_forwarded(vip_id, backend_id, p.ip_len as u64);
    }
    Ok(outcome)
}

/// Sends an ICMP error quoting a packet of a VIP flow to that flow's backend: the one in the
/// connection table, else the one Maglev picks. `Ok(None)`: not such an error.
#[inline(always)]
fn forward_icmp_error(
    ctx: &XdpContext,
    p: &Packet,
    stats: &mut DatapathStats,
) -> Result<Option<Outcome>, Outcome> {
    let Some(flow) = icmp::quoted_vip_flow(ctx, p) else {
        return Ok(None);
    };
    let (sport_be, dport_be) = (flow.sport_be(), flow.dport_be());
    // One copy for both families (unlike `balance_flow`): LLVM may share one lookup call
    // between the two connection tables, which the verifier then cannot inline. Fine for
    // ICMP errors; not for every packet.
    let cfg: &DatapathConfig = XLB_CONFIG.get(0).ok_or(Outcome::PassVipOtherProto)?;
    let entropy = flow_hash(&flow.src_be, sport_be, dport_be, flow.proto, false);
    let mut clock = Clock::new::<0>();
    let (backend_id, vip_id) = match conntrack::lookup::<0>(&flow, cfg, stats, &mut clock) {
        Some((id, vip_id)) if maglev::backend(id).is_some() => (id, vip_id),
        _ => {
            let vip = Packet {
                dst_be: flow.dst_be,
                proto: flow.proto,
                ..*p
            };
            let Some(info) = lookup_vip(&vip, dport_be) else {
                return Ok(None);
            };
            let src_only = info.flags & VIP_F_HASH_SRC_ONLY != 0;
            let hash = flow_hash(&flow.src_be, sport_be, dport_be, flow.proto, src_only);
            let Some(id) = maglev::pick(info, hash, cfg) else {
                return Ok(None);
            };
            (id, info.vip_id)
        }
    };
    let backend = maglev::backend(backend_id).ok_or(Outcome::DropNoBackend)?;
    let target = Target {
        backend_id,
        backend,
        flow_entropy: entropy,
    };
    let outcome = encap::forward::<0, 0>(ctx, p, &target, cfg, stats, &mut clock)?;
    if matches!(outcome, Outcome::ForwardedTx | Outcome::ForwardedRedirect) {
        stats.icmp_to_backend += 1;
        count_forwarded(vip_id, backend_id, p.ip_len as u64);
    }
    Ok(Some(outcome))
}

#[inline(always)]
fn count_forwarded(vip_id: u32, backend_id: u32, bytes: u64) {
    if let Some(v) = XLB_VIP_STATS.get_ptr_mut(vip_id) {
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

/// The VIP for (destination, port, protocol), falling back to the address's any-port VIP.
#[inline(always)]
fn lookup_vip(p: &Packet, dport_be: u16) -> Option<&'static VipInfo> {
    let key = keys::vip_key(&p.dst_be, dport_be, p.proto, p.family);
    if let Some(info) = unsafe { XLB_VIPS.get(key.get()) } {
        return Some(info);
    }
    let key = keys::vip_key(&p.dst_be, 0, p.proto, p.family);
    unsafe { XLB_VIPS.get(key.get()) }
}

#[inline(always)]
fn is_vip_address(p: &Packet) -> bool {
    let key = keys::addr_key(&p.dst_be, p.family);
    unsafe { XLB_VIP_ADDRS.get(key.get()) }.is_some()
}
