//! Outcomes and counters. Every packet ends in exactly one [`Outcome`], counted once in
//! `XLB_STATS` by the program entry; the outcome decides the XDP verdict.

use aya_ebpf::bindings::xdp_action;
use lb_common::{DatapathStats, DecapStats};

use crate::maps::{XLB_DECAP_STATS, XLB_STATS};

/// How a packet left the balancer.
#[derive(Clone, Copy)]
pub enum Outcome {
    PassNotIp,
    PassNotVip,
    PassIpv6Ext,
    PassVipOtherProto,
    DropMalformed,
    DropFragment,
    TooBigIcmpSent,
    DropTooBig,
    DropNoBackend,
    DropFibFailure,
    DropEncapFailed,
    ForwardedTx,
    ForwardedRedirect,
}

impl Outcome {
    #[inline(always)]
    pub fn verdict(self) -> u32 {
        match self {
            Outcome::PassNotIp
            | Outcome::PassNotVip
            | Outcome::PassIpv6Ext
            | Outcome::PassVipOtherProto => xdp_action::XDP_PASS,
            Outcome::TooBigIcmpSent | Outcome::ForwardedTx => xdp_action::XDP_TX,
            Outcome::ForwardedRedirect => xdp_action::XDP_REDIRECT,
            Outcome::DropMalformed
            | Outcome::DropFragment
            | Outcome::DropTooBig
            | Outcome::DropNoBackend
            | Outcome::DropFibFailure
            | Outcome::DropEncapFailed => xdp_action::XDP_DROP,
        }
    }
}

/// This CPU's balancer counters. Index 0 of a per-CPU array always exists, so `None`
/// only happens if the map is missing, in which case counting is skipped.
#[inline(always)]
pub fn datapath_stats() -> Option<&'static mut DatapathStats> {
    XLB_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn count_outcome(stats: &mut DatapathStats, outcome: Outcome) {
    let field = match outcome {
        Outcome::PassNotIp => &mut stats.pass_not_ip,
        Outcome::PassNotVip => &mut stats.pass_not_vip,
        Outcome::PassIpv6Ext => &mut stats.pass_ipv6_ext,
        Outcome::PassVipOtherProto => &mut stats.pass_vip_other_proto,
        Outcome::DropMalformed => &mut stats.drop_malformed,
        Outcome::DropFragment => &mut stats.drop_fragment,
        Outcome::TooBigIcmpSent => &mut stats.too_big_icmp_sent,
        Outcome::DropTooBig => &mut stats.drop_too_big,
        Outcome::DropNoBackend => &mut stats.drop_no_backend,
        Outcome::DropFibFailure => &mut stats.drop_fib_failure,
        Outcome::DropEncapFailed => &mut stats.drop_encap_failed,
        Outcome::ForwardedTx => &mut stats.forwarded_tx,
        Outcome::ForwardedRedirect => &mut stats.forwarded_redirect,
    };
    *field += 1;
}

/// How a packet left the decapsulator.
#[derive(Clone, Copy)]
pub enum DecapOutcome {
    Decapsulated,
    PassNotTunnel,
    PassNotLocal,
    DropMalformed,
}

#[inline(always)]
pub fn count_decap(outcome: DecapOutcome) -> u32 {
    if let Some(p) = XLB_DECAP_STATS.get_ptr_mut(0) {
        let stats: &mut DecapStats = unsafe { &mut *p };
        stats.rx_packets += 1;
        match outcome {
            DecapOutcome::Decapsulated => stats.decapsulated += 1,
            DecapOutcome::PassNotTunnel => stats.pass_not_tunnel += 1,
            DecapOutcome::PassNotLocal => stats.pass_not_local += 1,
            DecapOutcome::DropMalformed => stats.drop_malformed += 1,
        }
    }
    match outcome {
        DecapOutcome::DropMalformed => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}
