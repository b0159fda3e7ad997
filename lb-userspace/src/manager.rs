//! Turns a desired state into map writes: plan the difference against what is applied
//! ([`crate::plan`]), then write only that, in the plan's order.
//!
//! # Table replacement without an empty or half-written instant
//!
//! Each VIP owns two rings. A changed table is written into the VIP's *idle* ring; then one
//! hash-map update of `XLB_VIPS[vip]` flips `VipInfo.ring` to it. A packet reads `VipInfo`
//! once and then its ring, so it sees either the old table or the new one, whole.
//!
//! The ring just retired may still be read by a packet that loaded the old `VipInfo`
//! before the flip. Before the next write into any ring, the manager therefore waits one
//! RCU grace period ([`GracePeriod::wait`]: an update of a private
//! `BPF_MAP_TYPE_ARRAY_OF_MAPS`, after which the kernel has run `synchronize_rcu()`).
//! XDP programs run inside RCU read-side sections, so when it returns no packet that saw
//! the old `VipInfo` is still running.
//!
//! The grace period that makes a retired ring writable again is started in the background
//! right after the apply that retired it (a flip or a VIP removal), and remembers which
//! rings it covers. An apply joins only the grace periods covering a ring it is about to
//! write (and reaps finished ones): a `synchronize_rcu()` costs 10–30 ms on a busy
//! machine, which a change to one VIP should not pay for the ring another VIP retired a
//! moment ago. The first apply of a process waits a full grace period itself, which covers
//! rings retired by a previous agent process just before it exited; so does any apply
//! after a failed one or a failed background wait.
//!
//! # Tables
//!
//! A plan holds what each ring's table is built from, not the table: the tables are built
//! here, a batch of at most [`plan::TABLE_BATCH_BYTES`] at a time on every core, written,
//! recorded by digest and dropped, so the agent's memory for tables stays the same for
//! 10 or 10,000 VIPs and for any Maglev table size.
//!
//! # Backends
//!
//! Backend ids are keyed by address and stable (see [`crate::plan`]). A draining backend
//! keeps its entry (established flows keep reaching it) but gets no ring slots. When an id
//! is (re)assigned or removed, its per-CPU next-hop cache is zeroed, so a reused id never
//! starts with another address's route (the kernel compares the address too).

use lb_common::{Backend, map_names};

use crate::datapath::{DatapathError, GracePeriod, Maps};
use crate::maglev::MaglevWarning;
use crate::model::DesiredState;
use crate::plan::{self, AppliedState, Limits, MapOp, PlanError};
use crate::state::{self, StateError};

/// Why an apply failed. The maps hold exactly the ops that succeeded and
/// [`Manager::applied`] mirrors them.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Nothing was written.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A write failed after `completed` of `total` ops.
    #[error("map update {completed} of {total} failed: {source}")]
    Write {
        /// Ops written before the failure.
        completed: usize,
        /// Ops planned.
        total: usize,
        /// The failure.
        source: DatapathError,
    },
    /// A planned table could not be built when it was to be written, after `completed` of
    /// `total` ops. (Its inputs were checked when planned, so this is not expected.)
    #[error("map update {completed} of {total} not written: {source}")]
    Table {
        /// Ops written before the failure.
        completed: usize,
        /// Ops planned.
        total: usize,
        /// The failure.
        source: PlanError,
    },
    /// The grace-period wait failed; nothing was written.
    #[error(transparent)]
    GracePeriod(DatapathError),
    /// Reading the maps back failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// What an apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Map updates written.
    pub ops: usize,
    /// Tables written (rings).
    pub rings_written: usize,
    /// Connection entries deleted with removed VIPs.
    pub flows_flushed: u64,
    /// Warnings of the Maglev builder.
    pub warnings: Vec<MaglevWarning>,
}

/// Rings retired earlier that packets may still be reading.
struct Grace {
    /// Unknown (a new process, a failed apply or wait): every ring counts as retired, and
    /// a full grace period is waited before the next ring write.
    needed: bool,
    /// Grace periods in flight, each with the rings retired before it started.
    running: Vec<(GraceThread, Vec<u32>)>,
}

/// A background grace-period wait.
type GraceThread = std::thread::JoinHandle<Result<(), DatapathError>>;

/// Grace periods in flight at most; beyond, the oldest is joined.
const MAX_RUNNING_GRACE: usize = 32;

/// The map writer and its mirror of the maps.
pub struct Manager {
    applied: AppliedState,
    grace: std::sync::Arc<GracePeriod>,
    grace_state: Grace,
    /// The desired state last applied completely, for incremental plans.
    baseline: Option<plan::Baseline>,
    /// Keeps the next hops of backends resolved, off the apply path (see `neighbours`).
    neighbours: crate::neighbours::Resolver,
}

impl Manager {
    /// A manager for maps that hold what `applied` says.
    pub fn new(applied: AppliedState) -> Result<Self, ManagerError> {
        Ok(Manager {
            applied,
            grace: std::sync::Arc::new(GracePeriod::new().map_err(ManagerError::GracePeriod)?),
            grace_state: Grace {
                needed: true,
                running: Vec::new(),
            },
            baseline: None,
            neighbours: crate::neighbours::Resolver::start(),
        })
    }

    /// A manager for maps that may already hold state (pins of an earlier agent): the
    /// mirror is read back from the maps.
    pub fn adopt(maps: &Maps, limits: Limits) -> Result<Self, ManagerError> {
        Self::new(state::rebuild_applied(maps, limits)?)
    }

    /// The mirror of the maps.
    pub fn applied(&self) -> &AppliedState {
        &self.applied
    }

    /// Plans `desired` against the maps and writes the difference.
    ///
    /// After a complete apply the manager keeps the state's [`plan::Baseline`]: the next
    /// plan looks only at the VIPs whose spec changed (one endpoint's change costs one
    /// table, not a pass over every VIP). After a failed write, or at start, it plans
    /// from scratch against what the maps hold.
    pub fn apply(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
    ) -> Result<ApplyReport, ManagerError> {
        let changes = plan::plan_changes(desired, &self.applied, self.baseline.as_ref())?;
        let mut report = ApplyReport {
            warnings: changes.warnings.clone(),
            ..ApplyReport::default()
        };
        let writes: std::collections::HashSet<u32> = changes
            .ops
            .iter()
            .filter_map(|op| match op {
                MapOp::WriteRing { ring, .. } => Some(*ring),
                _ => None,
            })
            .collect();
        if !writes.is_empty() {
            self.wait_grace(&writes)?;
        }
        // A ring is retired by a flip (a `SetVip` to the other ring) or a VIP's removal
        // (both its rings: its id, and so its rings, may go to a new VIP).
        let retired: Vec<u32> = changes
            .ops
            .iter()
            .flat_map(|op| match op {
                MapOp::SetVip { key, info } => self
                    .applied
                    .vip(key)
                    .filter(|old| old.ring != info.ring)
                    .map(|old| vec![old.ring])
                    .unwrap_or_default(),
                MapOp::RemoveVip { key } => self
                    .applied
                    .vip(key)
                    .map(|old| vec![2 * old.vip_id, 2 * old.vip_id + 1])
                    .unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect();
        let previous = self.baseline.take();
        let incremental = previous.is_some();
        let total = changes.ops.len();
        let mut failed = None;
        // Tables are built here, a bounded batch ahead of their writes (the plan holds
        // their inputs only), and dropped once written.
        for (done, (op, table)) in
            plan::with_tables(&changes.ops, plan::TABLE_BATCH_BYTES).enumerate()
        {
            // Recorded in place as written: no copy of the whole mirror per apply.
            let written = match (op, table) {
                (MapOp::WriteRing { ring, .. }, Some(table)) => {
                    table.map_err(Failure::Table).and_then(|table| {
                        write_ring(maps, *ring, &table, &mut report)?;
                        // The digest of the table at hand: no second build.
                        self.applied.record_ring(*ring, &table);
                        Ok(())
                    })
                }
                _ => write_op(maps, op, &mut report).map(|()| self.applied.record(op)),
            };
            if let Err(failure) = written {
                failed = Some((done, failure));
                break;
            }
            report.ops += 1;
        }
        if let Some((completed, failure)) = failed {
            self.grace_state.needed = true;
            // The mirror holds exactly the ops written; the next plan starts from scratch.
            changes.finish(&mut self.applied, completed, None);
            return Err(match failure {
                Failure::Write(source) => ManagerError::Write {
                    completed,
                    total,
                    source,
                },
                Failure::Table(source) => ManagerError::Table {
                    completed,
                    total,
                    source,
                },
            });
        }
        // Addresses that got a backend id now; after a full plan, every listed address.
        let new_addresses: Vec<std::net::IpAddr> = if incremental {
            changes
                .ops
                .iter()
                .filter_map(|op| match op {
                    MapOp::SetBackend { backend, .. } => plan::backend_address(backend),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        self.baseline = changes.finish(&mut self.applied, total, previous);
        if !retired.is_empty() {
            let grace = self.grace.clone();
            match std::thread::Builder::new()
                .name("xlb-grace".into())
                .spawn(move || grace.wait())
            {
                Ok(handle) => self.grace_state.running.push((handle, retired)),
                Err(_) => self.grace_state.needed = true,
            }
        }
        // XDP's FIB lookup reads the neighbour table but never fills it: keep the next hop
        // of every new backend resolved by the kernel (on the resolver's thread). After an
        // incremental plan every other listed address was handed over before.
        if incremental {
            self.neighbours.submit(new_addresses);
        } else {
            self.neighbours.submit(
                desired
                    .vips
                    .iter()
                    .flat_map(|v| v.backends.iter().map(|b| b.address))
                    .collect(),
            );
        }
        Ok(report)
    }
}

impl Manager {
    /// Makes sure the rings about to be written are out of the readers' hands: joins the
    /// grace periods covering them (and any that finished), or waits a full one when the
    /// state is unknown.
    fn wait_grace(&mut self, writes: &std::collections::HashSet<u32>) -> Result<(), ManagerError> {
        let running = std::mem::take(&mut self.grace_state.running);
        let excess = running.len().saturating_sub(MAX_RUNNING_GRACE);
        for (i, (handle, rings)) in running.into_iter().enumerate() {
            if i < excess || handle.is_finished() || rings.iter().any(|r| writes.contains(r)) {
                if !matches!(handle.join(), Ok(Ok(()))) {
                    self.grace_state.needed = true;
                }
            } else {
                self.grace_state.running.push((handle, rings));
            }
        }
        if self.grace_state.needed {
            self.grace.wait().map_err(ManagerError::GracePeriod)?;
            // Started after every retirement so far: it covers the ones in flight too.
            self.grace_state.needed = false;
            self.grace_state.running.clear();
        }
        Ok(())
    }
}

/// Why one op was not written.
enum Failure {
    /// The map update failed.
    Write(DatapathError),
    /// The ring's table could not be built.
    Table(PlanError),
}

impl From<DatapathError> for Failure {
    fn from(e: DatapathError) -> Self {
        Failure::Write(e)
    }
}

fn write_ring(
    maps: &mut Maps,
    ring: u32,
    table: &[u32],
    report: &mut ApplyReport,
) -> Result<(), DatapathError> {
    maps.maglev.write_ring(ring, table)?;
    report.rings_written += 1;
    Ok(())
}

fn write_op(maps: &mut Maps, op: &MapOp, report: &mut ApplyReport) -> Result<(), Failure> {
    let err = |name: &'static str| move |source| DatapathError::Map { name, source };
    match op {
        MapOp::SetBackend { id, backend } => {
            maps.backends
                .set(*id, backend, 0)
                .map_err(err(map_names::BACKENDS))?;
            maps.clear_nexthop(*id)?;
        }
        MapOp::RemoveBackend { id } => {
            // An array entry cannot be deleted; family 0 marks the id unused.
            maps.backends
                .set(*id, &Backend::default(), 0)
                .map_err(err(map_names::BACKENDS))?;
            maps.clear_nexthop(*id)?;
        }
        MapOp::WriteRing { ring, table } => {
            let table = table.build().map_err(Failure::Table)?;
            write_ring(maps, *ring, &table, report)?;
        }
        MapOp::SetVipAddr { key, vip_count } => {
            maps.vip_addrs
                .insert(key, vip_count, 0)
                .map_err(err(map_names::VIP_ADDRS))?;
        }
        MapOp::RemoveVipAddr { key } => {
            remove_if_present(maps.vip_addrs.remove(key)).map_err(err(map_names::VIP_ADDRS))?;
        }
        MapOp::SetVip { key, info } => {
            maps.vips
                .insert(key, info, 0)
                .map_err(err(map_names::VIPS))?;
        }
        MapOp::RemoveVip { key } => {
            remove_if_present(maps.vips.remove(key)).map_err(err(map_names::VIPS))?;
        }
        MapOp::FlushFlows { vip, vip_id } => {
            report.flows_flushed += maps.flush_flows(vip, *vip_id)?;
        }
    }
    Ok(())
}

/// A delete of a key that is already gone has the effect the plan wanted.
fn remove_if_present(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleting_a_missing_key_is_what_the_plan_wanted() {
        assert!(remove_if_present(Err(aya::maps::MapError::KeyNotFound)).is_ok());
        assert!(remove_if_present(Ok(())).is_ok());
        assert!(
            remove_if_present(Err(aya::maps::MapError::OutOfBounds {
                index: 1,
                max_entries: 1
            }))
            .is_err()
        );
    }
}
