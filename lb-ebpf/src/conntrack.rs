//! Connection tracking: flows stay on their backend while the backend exists, whatever
//! happens to the Maglev tables (backend added, drained, or another one removed).
//!
//! IPv4 flows live in `XLB_CONNTRACK4` (16-byte keys), IPv6 flows in `XLB_CONNTRACK`
//! (40-byte keys): the kernel hashes and compares the whole key on every lookup and insert.

use lb_common::{DatapathConfig, DatapathStats, FAMILY_V4, FlowState, PROTO_UDP};

use crate::clock::Clock;
use crate::keys::{self, Flow};
use crate::maps::{XLB_CONNTRACK, XLB_CONNTRACK4, XLB_RATE};
#[allow(unused_imports)]
use crate::probe::{self, off};

/// UDP entries are re-stamped at most this often, so a busy flow does not dirty the
/// entry's cache line on every packet.
const UDP_REFRESH_NS: u64 = 1_000_000_000;
/// Length of a rate-guard window.
const RATE_WINDOW_NS: u64 = 1_000_000_000;

/// The flow's entry, if any. `OFF` selects a profiling variant of the IPv4 table.
#[inline(always)]
fn entry<const OFF: u32>(flow: &Flow) -> Option<*mut FlowState> {
    if flow.family == FAMILY_V4 {
        let key = keys::flow_key_v4(flow);
        #[cfg(feature = "profile")]
        if probe::removed(OFF, off::CT_COMMON) {
            return crate::maps::profile::XLB_P_CT4_C.get_ptr_mut(key.get());
        }
        XLB_CONNTRACK4.get_ptr_mut(key.get())
    } else {
        XLB_CONNTRACK.get_ptr_mut(keys::flow_key(flow).get())
    }
}

#[inline(always)]
fn store<const OFF: u32>(flow: &Flow, state: &FlowState) -> Result<(), i32> {
    if flow.family == FAMILY_V4 {
        let key = keys::flow_key_v4(flow);
        #[cfg(feature = "profile")]
        if probe::removed(OFF, off::CT_COMMON) {
            return crate::maps::profile::XLB_P_CT4_C.insert(key.get(), state, 0);
        }
        XLB_CONNTRACK4.insert(key.get(), state, 0)
    } else {
        XLB_CONNTRACK.insert(keys::flow_key(flow).get(), state, 0)
    }
}

/// `(backend id, VIP id)` recorded for the flow, if any and still fresh.
#[inline(always)]
pub fn lookup<const OFF: u32>(
    flow: &Flow,
    cfg: &DatapathConfig,
    stats: &mut DatapathStats,
    clock: &mut Clock,
) -> Option<(u32, u32)> {
    let state = entry::<OFF>(flow)?;
    // SAFETY: the pointer is valid for this program run (RCU); concurrent writers only
    // store whole u64/u32 fields, so a torn read cannot produce a wrong backend id.
    let state = unsafe { &mut *state };
    if flow.proto == PROTO_UDP {
        let now = clock.now();
        let idle = now.wrapping_sub(state.last_seen_ns);
        if idle > cfg.udp_idle_timeout_ns {
            stats.conntrack_udp_expired += 1;
            return None;
        }
        if idle > UDP_REFRESH_NS {
            state.last_seen_ns = now;
        }
    }
    Some((state.backend_id, state.vip_id))
}

/// Records a new flow unless this CPU is above the new-connection rate limit, in which
/// case the insert is skipped (the flow is still forwarded by Maglev, which picks the same
/// backend as long as the table is unchanged) so a flood cannot evict established flows.
#[inline(always)]
pub fn insert<const OFF: u32>(
    flow: &Flow,
    backend_id: u32,
    vip_id: u32,
    cfg: &DatapathConfig,
    stats: &mut DatapathStats,
    clock: &mut Clock,
) {
    let now = clock.now();
    if cfg.new_conn_rate_limit != 0
        && let Some(guard) = XLB_RATE.get_ptr_mut(0)
    {
        let guard = unsafe { &mut *guard };
        if now.wrapping_sub(guard.window_start_ns) >= RATE_WINDOW_NS {
            guard.window_start_ns = now;
            guard.inserts = 0;
        }
        if guard.inserts >= cfg.new_conn_rate_limit as u64 {
            stats.conntrack_insert_skipped += 1;
            return;
        }
        guard.inserts += 1;
    }
    let state = keys::flow_state(backend_id, vip_id, now);
    if store::<OFF>(flow, state.get()).is_err() {
        stats.conntrack_insert_failed += 1;
    }
}
