//! The diff between the desired state and what is in the datapath maps.
//!
//! [`plan`] compares a [`DesiredState`] with the [`AppliedState`] — a mirror of what was
//! written to the maps, plus id bookkeeping — and returns the minimal ordered list of
//! [`MapOp`]s that turns one into the other:
//!
//! 1. `SetBackend` for new backends (so rings never point at a missing backend),
//! 2. `WriteRing` into each changed VIP's *idle* ring,
//! 3. `SetVipAddr` for addresses gaining VIPs,
//! 4. `SetVip`: new VIPs and ring flips (the single update that switches tables),
//! 5. removals: `RemoveVip`, then `SetVipAddr`/`RemoveVipAddr` for addresses losing VIPs,
//!    `FlushFlows` of removed VIPs, and last `RemoveBackend` for backends no VIP uses.
//!
//! # Driving it
//!
//! ```text
//! let plan = plan::plan(&desired, &applied)?;     // pure; errors leave nothing to undo
//! for warning in &plan.warnings { tracing::warn!("{warning}") }
//! let mut done = 0;
//! // Each WriteRing's table, built a bounded batch ahead of its write (a plan holds what
//! // a table is built from, not its M entries: see `RingTable`).
//! let result = plan::with_tables(&plan.ops, plan::TABLE_BATCH_BYTES)
//!     .try_for_each(|(op, table)| { writer.apply(op, table)?; done += 1; Ok(()) });
//! applied = match result {
//!     Ok(()) => plan.applied,                         // mirror of the maps now
//!     Err(_) => plan.applied_after(&applied, done),   // mirror of what did get written
//! };
//! ```
//!
//! Because the applied state mirrors exactly the ops that succeeded, a failed apply never
//! makes a later plan write into a ring the kernel is reading.
//!
//! # Ids
//!
//! Backend ids are keyed by address and stay fixed while any VIP lists the address; id 0 is
//! never allocated. VIP ids stay fixed while the VIP exists; VIP `v` owns rings `2v` and
//! `2v+1`. Never-used ids are handed out first, and freed ids are reused oldest-freed first
//! (FIFO), so an id is reused as late as possible: a connection-table entry or counter still
//! naming a freed id is unlikely to meet its successor. Ids freed by a plan are never
//! reused within the same plan.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use lb_common::{Backend, FAMILY_V4, FAMILY_V6, NO_BACKEND, VipAddrKey, VipInfo, VipKey};

use crate::maglev::{self, MaglevError, MaglevWarning, WeightedBackend};
use crate::model::{self, DesiredState, ModelError};

/// Sizes fixed when the datapath maps are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maglev table size M (prime); every ring has M entries.
    pub table_size: u32,
    /// VIP ids are `0..max_vips`; rings `0..2·max_vips`.
    pub max_vips: u32,
    /// Backend ids are `1..max_backends` (0 is reserved).
    pub max_backends: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            table_size: lb_common::DEFAULT_MAGLEV_TABLE_SIZE,
            max_vips: lb_common::limits::MAX_VIPS,
            max_backends: lb_common::limits::MAX_BACKENDS,
        }
    }
}

/// One map update. Apply in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// `XLB_BACKENDS[id] = backend`.
    SetBackend {
        /// Backend id.
        id: u32,
        /// Its entry.
        backend: Backend,
    },
    /// `XLB_MAGLEV[ring·M .. ring·M + M] = table`. Always an idle ring.
    WriteRing {
        /// Ring number.
        ring: u32,
        /// The M backend ids, or what they are built from when written.
        table: RingTable,
    },
    /// `XLB_VIP_ADDRS[key] = vip_count` (number of VIPs on that address).
    SetVipAddr {
        /// The address.
        key: VipAddrKey,
        /// VIPs on it.
        vip_count: u32,
    },
    /// `XLB_VIPS[key] = info`: creates a VIP or flips its ring / flags atomically.
    SetVip {
        /// VIP key.
        key: VipKey,
        /// New value.
        info: VipInfo,
    },
    /// Delete `XLB_VIPS[key]`.
    RemoveVip {
        /// VIP key.
        key: VipKey,
    },
    /// Delete `XLB_VIP_ADDRS[key]` (no VIP left on the address).
    RemoveVipAddr {
        /// The address.
        key: VipAddrKey,
    },
    /// Delete the connection-table entries of a removed VIP.
    FlushFlows {
        /// The VIP's key (entries have `dst`/`dport`/`proto` equal to it; port 0 = any).
        vip: VipKey,
        /// Its former id (entries have `FlowState::vip_id` equal to it).
        vip_id: u32,
    },
    /// Delete `XLB_BACKENDS[id]` (no VIP uses the backend any more).
    RemoveBackend {
        /// Backend id.
        id: u32,
    },
}

/// The table a [`MapOp::WriteRing`] writes.
///
/// A plan holds what a new or changed ring's table is built from, not its M entries: a
/// first sync of 10,000 VIPs would otherwise hold 10,000 tables before the first write
/// (40 MB with M = 1009, 2.6 GB with M = 65537). The writer builds them a bounded batch at
/// a time ([`with_tables`]). Two tables are equal when they are the same variant with the
/// same contents (a planned table never equals a ready one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingTable {
    /// Built when written. Its inputs were checked when planned ([`maglev::check`]), and
    /// its warnings reported in the plan.
    Planned(Box<TableInputs>),
    /// A table at hand: read back from the maps, or built by the planner anyway.
    Ready(Arc<[u32]>),
}

/// What a planned ring's table is built from ([`maglev::build`]'s arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInputs {
    /// The VIP as named in messages.
    pub vip: String,
    /// M.
    pub table_size: u32,
    /// The VIP's backends with their ids and effective weights.
    pub backends: Vec<WeightedBackend>,
}

impl RingTable {
    /// The table: borrowed if ready, built if planned.
    pub fn build(&self) -> Result<Cow<'_, [u32]>, PlanError> {
        match self {
            RingTable::Ready(table) => Ok(Cow::Borrowed(table)),
            RingTable::Planned(inputs) => {
                maglev::build(&inputs.vip, inputs.table_size, &inputs.backends)
                    .map(|built| Cow::Owned(built.table))
                    .map_err(|source| PlanError::Maglev {
                        vip: inputs.vip.clone(),
                        source,
                    })
            }
        }
    }

    /// Bytes of the table once built.
    pub fn table_bytes(&self) -> usize {
        let entries = match self {
            RingTable::Ready(table) => table.len(),
            RingTable::Planned(inputs) => inputs.table_size as usize,
        };
        entries * std::mem::size_of::<u32>()
    }
}

/// Why no plan could be made. Nothing was planned; the applied state is still valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The desired state breaks a model rule.
    #[error("invalid desired state: {0}")]
    Invalid(#[from] ModelError),
    /// A Maglev table could not be built.
    #[error("VIP {vip}: {source}")]
    Maglev {
        /// The VIP.
        vip: String,
        /// Why.
        source: MaglevError,
    },
    /// More VIPs than the VIP table holds.
    #[error("{wanted} VIPs requested but max_vips is {max}")]
    TooManyVips {
        /// Desired VIPs.
        wanted: usize,
        /// The limit.
        max: u32,
    },
    /// More distinct backend addresses than backend ids.
    #[error(
        "{wanted} backend ids needed during this update (current and new) but max_backends \
         {max} allows {} (id 0 is reserved; ids of removed backends are freed only after the \
         update)",
        max.saturating_sub(1)
    )]
    TooManyBackends {
        /// Backend ids needed during the update.
        wanted: usize,
        /// The limit.
        max: u32,
    },
    /// New VIPs need ids still held by VIPs this same update removes.
    #[error(
        "{wanted} VIP ids needed during this update (current and new) but max_vips is {max}; \
         ids of removed VIPs are freed only after the update — apply the removals first"
    )]
    VipIdsExhausted {
        /// Ids needed during the update.
        wanted: usize,
        /// The limit.
        max: u32,
    },
}

/// Orderable form of a [`VipKey`] (the map type derives no `Ord`).
type VipKeyOrd = ([u32; 4], u16, u8, u8);
/// Orderable form of a [`VipAddrKey`].
type AddrOrd = (u8, [u32; 4]);

fn vip_ord(k: &VipKey) -> VipKeyOrd {
    (k.addr_be, k.port_be, k.proto, k.family)
}

fn addr_ord(k: &VipAddrKey) -> AddrOrd {
    (k.family, k.addr_be)
}

fn addr_key((family, addr_be): AddrOrd) -> VipAddrKey {
    VipAddrKey {
        addr_be,
        family,
        _pad: [0; 3],
    }
}

/// A 128-bit fingerprint of a Maglev table (two keyed SipHashes and the length): equal
/// tables have equal digests, and different ones practically never do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableDigest {
    hashes: [u64; 2],
    len: usize,
}

impl TableDigest {
    /// The digest of a table.
    pub fn of(table: &[u32]) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let bytes: &[u8] = bytemuck::cast_slice(table);
        let hash = |seed: u64| {
            let mut hasher = std::hash::BuildHasherDefault::<
                std::collections::hash_map::DefaultHasher,
            >::default()
            .build_hasher();
            hasher.write_u64(seed);
            hasher.write(bytes);
            hasher.finish()
        };
        TableDigest {
            hashes: [hash(0x243f_6a88_85a3_08d3), hash(0x1319_8a2e_0370_7344)],
            len: table.len(),
        }
    }
}

/// The inputs a ring's table was built from: (backend id, effective weight), by id.
type RingInputs = Arc<[(u32, u32)]>;

/// What has been written to the maps, mirrored, plus id bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedState {
    limits: Limits,
    backends: BTreeMap<u32, Backend>,
    backend_ids: BTreeMap<IpAddr, u32>,
    free_backend_ids: VecDeque<u32>,
    next_backend_id: u32,
    vips: BTreeMap<VipKeyOrd, (VipKey, VipInfo)>,
    free_vip_ids: VecDeque<u32>,
    next_vip_id: u32,
    vip_addrs: BTreeMap<AddrOrd, u32>,
    /// What each ring holds, as a fingerprint: the tables themselves are in the map, and a
    /// copy here would be 4·M bytes per ring (40 MB for 10,000 VIPs with M = 1009).
    rings: BTreeMap<u32, TableDigest>,
    /// Cache: what each ring's table was built from, to skip rebuilding unchanged VIPs.
    ring_inputs: BTreeMap<u32, RingInputs>,
}

impl AppliedState {
    /// The state of freshly created (empty) maps.
    pub fn new(limits: Limits) -> Self {
        AppliedState {
            limits,
            backends: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            free_backend_ids: VecDeque::new(),
            next_backend_id: 1,
            vips: BTreeMap::new(),
            free_vip_ids: VecDeque::new(),
            next_vip_id: 0,
            vip_addrs: BTreeMap::new(),
            rings: BTreeMap::new(),
            ring_inputs: BTreeMap::new(),
        }
    }

    /// The map sizes this state was created for.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Backend id of an address, if it has one.
    pub fn backend_id(&self, address: IpAddr) -> Option<u32> {
        self.backend_ids.get(&address).copied()
    }

    /// Backend entries by id.
    pub fn backends(&self) -> impl Iterator<Item = (u32, &Backend)> {
        self.backends.iter().map(|(id, b)| (*id, b))
    }

    /// The VIP table entry of a VIP.
    pub fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.vips.get(&vip_ord(key)).map(|(_, info)| *info)
    }

    /// All VIP table entries.
    pub fn vips(&self) -> impl Iterator<Item = (&VipKey, &VipInfo)> {
        self.vips.values().map(|(k, i)| (k, i))
    }

    /// The VIP count recorded for an address.
    pub fn vip_addr_count(&self, key: &VipAddrKey) -> Option<u32> {
        self.vip_addrs.get(&addr_ord(key)).copied()
    }

    /// The fingerprint of the table last written to a ring (rings of removed VIPs are
    /// forgotten); compare with [`TableDigest::of`].
    pub fn ring(&self, ring: u32) -> Option<TableDigest> {
        self.rings.get(&ring).copied()
    }

    /// What [`record`](Self::record) does for a `WriteRing` of `ring`, given the table that
    /// was written: a writer that built a planned table records it without building it
    /// again.
    pub fn record_ring(&mut self, ring: u32, table: &[u32]) {
        self.rings.insert(ring, TableDigest::of(table));
        self.ring_inputs.remove(&ring);
    }

    /// Updates the mirror for one op that was written successfully. A planned
    /// `WriteRing`'s table is built for its digest: writers use
    /// [`record_ring`](Self::record_ring) with the table they wrote.
    pub fn record(&mut self, op: &MapOp) {
        match op {
            MapOp::SetBackend { id, backend } => {
                if let Some(old) = self.backends.insert(*id, *backend)
                    && let Some(address) = backend_address(&old)
                {
                    self.backend_ids.remove(&address);
                }
                if let Some(address) = backend_address(backend) {
                    self.backend_ids.insert(address, *id);
                }
                self.free_backend_ids.retain(|free| free != id);
                self.next_backend_id = self.next_backend_id.max(id.saturating_add(1));
            }
            MapOp::RemoveBackend { id } => {
                if let Some(old) = self.backends.remove(id) {
                    if let Some(address) = backend_address(&old) {
                        self.backend_ids.remove(&address);
                    }
                    self.free_backend_ids.push_back(*id);
                }
            }
            MapOp::WriteRing { ring, table } => match table.build() {
                Ok(table) => self.record_ring(*ring, &table),
                // Not writable either (the writer builds it the same way): whatever the
                // ring holds is unknown, and a plan rewrites it before it is used.
                Err(_) => {
                    self.rings.remove(ring);
                    self.ring_inputs.remove(ring);
                }
            },
            MapOp::SetVip { key, info } => {
                self.vips.insert(vip_ord(key), (*key, *info));
                self.free_vip_ids.retain(|free| *free != info.vip_id);
                self.next_vip_id = self.next_vip_id.max(info.vip_id.saturating_add(1));
            }
            MapOp::RemoveVip { key } => {
                if let Some((_, info)) = self.vips.remove(&vip_ord(key)) {
                    for ring in [2 * info.vip_id, 2 * info.vip_id + 1] {
                        self.rings.remove(&ring);
                        self.ring_inputs.remove(&ring);
                    }
                    self.free_vip_ids.push_back(info.vip_id);
                }
            }
            MapOp::SetVipAddr { key, vip_count } => {
                self.vip_addrs.insert(addr_ord(key), *vip_count);
            }
            MapOp::RemoveVipAddr { key } => {
                self.vip_addrs.remove(&addr_ord(key));
            }
            MapOp::FlushFlows { .. } => {}
        }
    }
}

pub(crate) fn backend_address(backend: &Backend) -> Option<IpAddr> {
    let bytes: Vec<u8> = backend
        .addr_be
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    match backend.family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

fn backend_entry(address: IpAddr) -> Backend {
    let (addr_be, family) = model::address_words(address);
    Backend {
        addr_be,
        family,
        _pad: [0; 3],
    }
}

/// The ops to reach a desired state, and the state after applying them.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Map updates, in the order they must be applied.
    pub ops: Vec<MapOp>,
    /// The applied state once every op succeeded.
    pub applied: AppliedState,
    /// Warnings to log (e.g. a Maglev table too small for a VIP's backend count).
    pub warnings: Vec<MaglevWarning>,
    /// Ring → inputs of the table it holds after this plan (cache entries).
    ring_inputs: Vec<(u32, RingInputs)>,
}

impl Plan {
    /// The applied state if only the first `completed` ops were written (a writer failed).
    pub fn applied_after(&self, before: &AppliedState, completed: usize) -> AppliedState {
        if completed >= self.ops.len() {
            return self.applied.clone();
        }
        let mut state = before.clone();
        for op in &self.ops[..completed] {
            state.record(op);
        }
        record_ring_inputs(&mut state, &self.ops, &self.ring_inputs, completed);
        state
    }

    /// True if there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Adds the cache entries of a plan whose first `completed` ops were recorded in `state`.
fn record_ring_inputs(
    state: &mut AppliedState,
    ops: &[MapOp],
    ring_inputs: &[(u32, RingInputs)],
    completed: usize,
) {
    if completed >= ops.len() {
        for (ring, inputs) in ring_inputs {
            state.ring_inputs.insert(*ring, inputs.clone());
        }
        return;
    }
    // A cached input list is true of a ring only if the ring holds that table: either
    // this plan did not rewrite it, or the rewrite got through.
    let rewritten = |ops: &[MapOp]| -> std::collections::HashSet<u32> {
        ops.iter()
            .filter_map(|op| match op {
                MapOp::WriteRing { ring, .. } => Some(*ring),
                _ => None,
            })
            .collect()
    };
    let planned = rewritten(ops);
    let written = rewritten(&ops[..completed]);
    for (ring, inputs) in ring_inputs {
        if (!planned.contains(ring) || written.contains(ring)) && state.rings.contains_key(ring) {
            state.ring_inputs.insert(*ring, inputs.clone());
        }
    }
}

/// The desired state that an [`AppliedState`] was last brought to completely, indexed so
/// that the next plan ([`plan_changes`]) looks only at the VIPs whose spec changed: with
/// 10,000 VIPs, one endpoint's change then costs one table instead of 10,000 comparisons
/// of inputs, id lookups and a copy of the whole applied state.
///
/// Only valid for the applied state it was made with, after every op of that plan was
/// written (then every VIP's active ring holds its cached inputs, and the backend ids are
/// exactly the addresses listed here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    vips: std::collections::HashMap<VipKeyOrd, Arc<model::VipSpec>>,
    /// VIPs listing each backend address.
    backend_refs: std::collections::HashMap<IpAddr, u32>,
    /// VIPs on each address.
    addr_counts: std::collections::HashMap<AddrOrd, u32>,
}

/// A plan as the manager uses it: the ops, applied to the manager's state in place.
#[derive(Debug)]
pub struct Changes {
    /// Map updates, in the order they must be applied.
    pub ops: Vec<MapOp>,
    /// Warnings to log.
    pub warnings: Vec<MaglevWarning>,
    ring_inputs: Vec<(u32, RingInputs)>,
    /// Planned from scratch (the baseline is rebuilt) or from a baseline (it is patched).
    full: bool,
    /// VIP specs that changed (`None`: removed).
    vips: Vec<(VipKeyOrd, Option<Arc<model::VipSpec>>)>,
    /// New reference counts of the backend addresses touched (0: none left).
    backend_refs: Vec<(IpAddr, u32)>,
    /// New VIP counts of the addresses touched (0: none left).
    addr_counts: Vec<(AddrOrd, u32)>,
}

impl Changes {
    /// Completes `applied` after the first `completed` ops were written and each recorded
    /// with [`AppliedState::record`]; with every op written, returns the baseline for the
    /// next plan (`previous` is the one this plan was made from).
    pub fn finish(
        self,
        applied: &mut AppliedState,
        completed: usize,
        previous: Option<Baseline>,
    ) -> Option<Baseline> {
        record_ring_inputs(applied, &self.ops, &self.ring_inputs, completed);
        if completed < self.ops.len() {
            return None;
        }
        let mut baseline = match previous {
            Some(previous) if !self.full => previous,
            _ => Baseline::default(),
        };
        for (ord, spec) in self.vips {
            match spec {
                Some(spec) => baseline.vips.insert(ord, spec),
                None => baseline.vips.remove(&ord),
            };
        }
        for (address, count) in self.backend_refs {
            if count == 0 {
                baseline.backend_refs.remove(&address);
            } else {
                baseline.backend_refs.insert(address, count);
            }
        }
        for (addr, count) in self.addr_counts {
            if count == 0 {
                baseline.addr_counts.remove(&addr);
            } else {
                baseline.addr_counts.insert(addr, count);
            }
        }
        Some(baseline)
    }
}

/// Id allocator over a copy of the applied bookkeeping: never-used ids first, then the
/// oldest freed one.
struct Ids {
    free: VecDeque<u32>,
    next: u32,
    end: u32,
}

impl Ids {
    fn take(&mut self) -> Option<u32> {
        if self.next < self.end {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.free.pop_front()
        }
    }

    fn available(&self) -> usize {
        self.free.len() + self.end.saturating_sub(self.next) as usize
    }
}

/// Computes the ops that turn `applied` into `desired`. Pure: on error nothing is planned.
pub fn plan(desired: &DesiredState, applied: &AppliedState) -> Result<Plan, PlanError> {
    let changes = plan_changes(desired, applied, None)?;
    let mut next = applied.clone();
    for op in &changes.ops {
        next.record(op);
    }
    record_ring_inputs(
        &mut next,
        &changes.ops,
        &changes.ring_inputs,
        changes.ops.len(),
    );
    Ok(Plan {
        ops: changes.ops,
        applied: next,
        warnings: changes.warnings,
        ring_inputs: changes.ring_inputs,
    })
}

/// What one plan looks at.
struct Scope<'a> {
    /// VIPs to plan, by key: every desired VIP, or those whose spec changed.
    vips: BTreeMap<VipKeyOrd, (VipKey, &'a Arc<model::VipSpec>)>,
    /// Applied VIPs no longer desired, by key.
    removed: Vec<(VipKey, u32)>,
    /// Wanted backend addresses without an id, in order.
    new_backends: Vec<IpAddr>,
    /// Ids of backends no VIP lists any more.
    gone_backends: BTreeSet<u32>,
    /// VIP addresses whose count may change → wanted count (0: none).
    addrs: BTreeMap<AddrOrd, u32>,
}

/// [`plan`] without the copy of the applied state: the same ops, warnings and resulting
/// state. With the `baseline` of `applied` only the VIPs whose spec differs from it are
/// looked at (the others would plan no op).
pub fn plan_changes(
    desired: &DesiredState,
    applied: &AppliedState,
    baseline: Option<&Baseline>,
) -> Result<Changes, PlanError> {
    match baseline {
        None => desired.validate()?,
        Some(base) => {
            // The baseline passed validation. Its unchanged VIPs' backends need no second
            // look unless a VIP address is new (one of them might be that address now).
            let new_vip_address = desired.vips.iter().any(|v| {
                let key = v.key.to_map_key();
                !base.addr_counts.contains_key(&(key.family, key.addr_be))
            });
            desired.validate_reusing(|i| {
                let vip = &desired.vips[i];
                !new_vip_address
                    && base
                        .vips
                        .get(&vip_ord(&vip.key.to_map_key()))
                        .is_some_and(|old| old == vip)
            })?;
        }
    }
    let limits = applied.limits;
    if desired.vips.len() > limits.max_vips as usize {
        return Err(PlanError::TooManyVips {
            wanted: desired.vips.len(),
            max: limits.max_vips,
        });
    }
    let mut baseline_vips = Vec::new();
    let mut backend_refs = Vec::new();
    let mut addr_counts = Vec::new();
    let scope = match baseline {
        None => {
            let wanted_backends = desired.backend_addresses();
            let desired_vips: BTreeMap<VipKeyOrd, (VipKey, &Arc<model::VipSpec>)> = desired
                .vips
                .iter()
                .map(|v| {
                    let key = v.key.to_map_key();
                    (vip_ord(&key), (key, v))
                })
                .collect();
            let mut refs: std::collections::HashMap<IpAddr, u32> =
                std::collections::HashMap::with_capacity(wanted_backends.len());
            let mut addrs: BTreeMap<AddrOrd, u32> = BTreeMap::new();
            for (ord, (key, vip)) in &desired_vips {
                for b in &vip.backends {
                    *refs.entry(b.address).or_default() += 1;
                }
                *addrs.entry((key.family, key.addr_be)).or_default() += 1;
                baseline_vips.push((*ord, Some(Arc::clone(vip))));
            }
            backend_refs.extend(refs);
            addr_counts.extend(addrs.iter().map(|(a, c)| (*a, *c)));
            for addr in applied.vip_addrs.keys() {
                addrs.entry(*addr).or_insert(0);
            }
            Scope {
                removed: applied
                    .vips
                    .iter()
                    .filter(|(ord, _)| !desired_vips.contains_key(*ord))
                    .map(|(_, (key, info))| (*key, info.vip_id))
                    .collect(),
                vips: desired_vips,
                new_backends: wanted_backends
                    .iter()
                    .filter(|a| !applied.backend_ids.contains_key(a))
                    .copied()
                    .collect(),
                gone_backends: applied
                    .backend_ids
                    .iter()
                    .filter(|(address, _)| !wanted_backends.contains(address))
                    .map(|(_, &id)| id)
                    .collect(),
                addrs,
            }
        }
        Some(base) => {
            let mut vips = BTreeMap::new();
            let mut kept = 0usize;
            let mut refs: std::collections::HashMap<IpAddr, i64> = Default::default();
            let mut addrs: BTreeMap<AddrOrd, i64> = BTreeMap::new();
            let mut count = |spec: &model::VipSpec, key: &VipKey, delta: i64| {
                for b in &spec.backends {
                    *refs.entry(b.address).or_default() += delta;
                }
                *addrs.entry((key.family, key.addr_be)).or_default() += delta;
            };
            for vip in &desired.vips {
                let key = vip.key.to_map_key();
                let ord = vip_ord(&key);
                match base.vips.get(&ord) {
                    Some(old) if old == vip => {
                        kept += 1;
                        continue;
                    }
                    Some(old) => {
                        kept += 1;
                        count(old, &key, -1);
                    }
                    None => {}
                }
                count(vip, &key, 1);
                baseline_vips.push((ord, Some(vip.clone())));
                vips.insert(ord, (key, vip));
            }
            let mut removed = Vec::new();
            // Keys are unique (validated): every baseline VIP not kept is gone.
            if kept < base.vips.len() {
                let wanted: std::collections::HashSet<VipKeyOrd> = desired
                    .vips
                    .iter()
                    .map(|v| vip_ord(&v.key.to_map_key()))
                    .collect();
                let mut gone: Vec<(&VipKeyOrd, &Arc<model::VipSpec>)> = base
                    .vips
                    .iter()
                    .filter(|(ord, _)| !wanted.contains(*ord))
                    .collect();
                gone.sort_unstable_by_key(|(ord, _)| **ord);
                for (ord, spec) in gone {
                    let key = spec.key.to_map_key();
                    count(spec, &key, -1);
                    baseline_vips.push((*ord, None));
                    if let Some((key, info)) = applied.vips.get(ord) {
                        removed.push((*key, info.vip_id));
                    }
                }
            }
            let mut new_backends = Vec::new();
            let mut gone_backends = BTreeSet::new();
            for (address, delta) in refs {
                if delta == 0 {
                    continue;
                }
                let now = i64::from(base.backend_refs.get(&address).copied().unwrap_or(0)) + delta;
                let now = u32::try_from(now.max(0)).unwrap_or(u32::MAX);
                backend_refs.push((address, now));
                match (now > 0, applied.backend_ids.get(&address)) {
                    (true, None) => new_backends.push(address),
                    (false, Some(&id)) => {
                        gone_backends.insert(id);
                    }
                    _ => {}
                }
            }
            new_backends.sort_unstable();
            let mut wanted_addrs = BTreeMap::new();
            for (addr, delta) in addrs {
                if delta == 0 {
                    continue;
                }
                let now = i64::from(base.addr_counts.get(&addr).copied().unwrap_or(0)) + delta;
                let now = u32::try_from(now.max(0)).unwrap_or(u32::MAX);
                addr_counts.push((addr, now));
                wanted_addrs.insert(addr, now);
            }
            Scope {
                vips,
                removed,
                new_backends,
                gone_backends,
                addrs: wanted_addrs,
            }
        }
    };
    let (ops, warnings, ring_inputs) = plan_scope(&scope, applied)?;
    Ok(Changes {
        ops,
        warnings,
        ring_inputs,
        full: baseline.is_none(),
        vips: baseline_vips,
        backend_refs,
        addr_counts,
    })
}

type Planned = (Vec<MapOp>, Vec<MaglevWarning>, Vec<(u32, RingInputs)>);

/// What a planned VIP needs for its table.
enum Need {
    /// Nothing: its active ring holds the table of these inputs (cached).
    Cached,
    /// Nothing: the table was built and is the one its active ring holds.
    Same,
    /// A write of this table.
    Write(RingTable),
}

/// One planned VIP with its table inputs.
struct Prepared<'a> {
    ord: VipKeyOrd,
    key: VipKey,
    vip: &'a model::VipSpec,
    /// Its entry in the VIP table, if it has one.
    old: Option<VipInfo>,
    inputs: RingInputs,
    need: Need,
}

/// Bytes of tables a writer builds ahead of their writes ([`with_tables`]): about 500
/// tables with M = 1009, 8 with M = 65537. Large enough that the cores building a batch
/// in parallel each get plenty of work (twice [`PARALLEL_SLOTS`]), small next to
/// the agent's other memory: with 8 MiB, the batch was an eighth of the agent's heap at
/// the peak of a first sync of 10,000 VIPs.
pub const TABLE_BATCH_BYTES: usize = 2 << 20;

/// Bytes of changed tables a plan keeps when it had to build them anyway (to compare an
/// existing VIP's new table with its active one): written without a second build. Beyond
/// this they are dropped and rebuilt when written, so a plan stays small whatever M.
const KEPT_TABLE_BYTES: usize = 4 << 20;

/// A batch is built on several threads from this many slots in all (256 tables of
/// M = 1009, 4 of M = 65537); below, spawning threads costs more than it saves.
const PARALLEL_SLOTS: usize = 1 << 18;

/// Builds the tables (planned ones; ready ones are borrowed), on every core when there
/// are enough slots to build. Results in input order; a table's bytes are alive only until
/// the caller drops them.
fn build_batch<'a>(tables: &[&'a RingTable]) -> Vec<Result<Cow<'a, [u32]>, PlanError>> {
    let slots: usize = tables
        .iter()
        .filter(|t| matches!(t, RingTable::Planned(_)))
        .map(|t| t.table_bytes() / std::mem::size_of::<u32>())
        .sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if slots < PARALLEL_SLOTS || threads < 2 || tables.len() < 2 {
        return tables.iter().map(|t| t.build()).collect();
    }
    let chunk = tables.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = tables
            .chunks(chunk)
            .map(|part| {
                let worker = scope.spawn(move || part.iter().map(|t| t.build()).collect());
                (part, worker)
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|(part, worker)| {
                // A panicking worker leaves its tables to be built here.
                worker
                    .join()
                    .unwrap_or_else(|_| part.iter().map(|t| t.build()).collect::<Vec<_>>())
            })
            .collect()
    })
}

/// How many of `tables` (at least one) fit in `budget` bytes.
fn batch_len<'a>(tables: impl Iterator<Item = &'a RingTable>, budget: usize) -> usize {
    let mut bytes = 0usize;
    let mut len = 0;
    for table in tables {
        bytes = bytes.saturating_add(table.table_bytes());
        if len > 0 && bytes > budget {
            break;
        }
        len += 1;
    }
    len
}

/// The ops in order, each `WriteRing` with its table — built a batch of consecutive
/// rings at a time (on every core for large batches) just before they are written, and
/// at most `batch_bytes` of tables (or one table) at once: a writer's memory for tables
/// does not grow with the number of rings or with M. Drop each table once written.
pub fn with_tables(ops: &[MapOp], batch_bytes: usize) -> WithTables<'_> {
    WithTables {
        ops,
        next: 0,
        batch_bytes,
        built: VecDeque::new(),
        batches: 0,
        largest_batch_bytes: 0,
    }
}

/// Iterator of [`with_tables`]: `(op, table)`, the table `Some` for a `WriteRing` only.
pub struct WithTables<'a> {
    ops: &'a [MapOp],
    next: usize,
    batch_bytes: usize,
    /// Tables of the rings from `next` on, built ahead.
    built: VecDeque<Result<Cow<'a, [u32]>, PlanError>>,
    batches: usize,
    largest_batch_bytes: usize,
}

impl WithTables<'_> {
    /// Batches built so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Bytes of the largest batch built so far.
    pub fn largest_batch_bytes(&self) -> usize {
        self.largest_batch_bytes
    }
}

fn ring_table(op: &MapOp) -> Option<&RingTable> {
    match op {
        MapOp::WriteRing { table, .. } => Some(table),
        _ => None,
    }
}

impl<'a> Iterator for WithTables<'a> {
    type Item = (&'a MapOp, Option<Result<Cow<'a, [u32]>, PlanError>>);

    fn next(&mut self) -> Option<Self::Item> {
        let ops = self.ops;
        let op = ops.get(self.next)?;
        if ring_table(op).is_some() && self.built.is_empty() {
            let following = ops[self.next..].iter().map_while(ring_table);
            let len = batch_len(following, self.batch_bytes);
            let batch: Vec<&'a RingTable> = ops[self.next..self.next + len]
                .iter()
                .filter_map(ring_table)
                .collect();
            let bytes = batch.iter().map(|t| t.table_bytes()).sum();
            self.built = build_batch(&batch).into();
            self.batches += 1;
            self.largest_batch_bytes = self.largest_batch_bytes.max(bytes);
        }
        self.next += 1;
        let table = ring_table(op).and_then(|_| self.built.pop_front());
        Some((op, table))
    }
}

/// An existing VIP whose inputs are not the cached ones of its active ring may still get
/// the same table (a cold cache after a restart; a weight change that moves no slot):
/// builds those tables, in bounded batches, and compares their digests with the active
/// rings' so that an equal one is not written again. A changed table is kept for its
/// write while the kept ones fit in [`KEPT_TABLE_BYTES`]; beyond, it is built again when
/// written.
fn compare_with_active_rings(
    prepared: &mut [Prepared<'_>],
    applied: &AppliedState,
) -> Result<(), PlanError> {
    let existing: Vec<usize> = (0..prepared.len())
        .filter(|&i| prepared[i].old.is_some() && matches!(prepared[i].need, Need::Write(_)))
        .collect();
    let mut kept = 0usize;
    let mut start = 0;
    while start < existing.len() {
        let table_of = |i: &usize| match &prepared[*i].need {
            Need::Write(table) => Some(table),
            _ => None,
        };
        let len = batch_len(
            existing[start..].iter().filter_map(table_of),
            TABLE_BATCH_BYTES,
        );
        let batch: Vec<&RingTable> = existing[start..start + len]
            .iter()
            .filter_map(table_of)
            .collect();
        // (VIP, its new need) — `None`: unchanged, the planned table is written.
        let mut outcomes: Vec<(usize, Option<Need>)> = Vec::with_capacity(len);
        for (&i, table) in existing[start..].iter().zip(build_batch(&batch)) {
            let table = table?;
            let active = prepared[i].old.map(|old| old.ring);
            let same =
                active.and_then(|ring| applied.rings.get(&ring)) == Some(&TableDigest::of(&table));
            let bytes = std::mem::size_of_val(&table[..]);
            let need = if same {
                Some(Need::Same)
            } else if kept + bytes <= KEPT_TABLE_BYTES {
                kept += bytes;
                Some(Need::Write(RingTable::Ready(table.into_owned().into())))
            } else {
                None
            };
            outcomes.push((i, need));
        }
        for (i, need) in outcomes {
            if let Some(need) = need {
                prepared[i].need = need;
            }
        }
        start += len;
    }
    Ok(())
}

fn plan_scope(scope: &Scope<'_>, applied: &AppliedState) -> Result<Planned, PlanError> {
    let limits = applied.limits;
    // Backend ids: kept for every address still listed somewhere, new ones allocated in
    // address order.
    let mut ids = Ids {
        free: applied.free_backend_ids.clone(),
        next: applied.next_backend_id.max(1),
        end: limits.max_backends,
    };
    let too_many = PlanError::TooManyBackends {
        wanted: applied.backend_ids.len() + scope.new_backends.len(),
        max: limits.max_backends,
    };
    if scope.new_backends.len() > ids.available() {
        return Err(too_many);
    }
    // Hashed: looked up once per backend of every planned VIP.
    let mut new_ids: std::collections::HashMap<IpAddr, u32> =
        std::collections::HashMap::with_capacity(scope.new_backends.len());
    let mut set_backends = Vec::new();
    for address in &scope.new_backends {
        let id = ids
            .take()
            .filter(|&id| id != NO_BACKEND)
            .ok_or_else(|| too_many.clone())?;
        set_backends.push(MapOp::SetBackend {
            id,
            backend: backend_entry(*address),
        });
        new_ids.insert(*address, id);
    }
    let backend_id = |address: &IpAddr| {
        applied
            .backend_ids
            .get(address)
            .or_else(|| new_ids.get(address))
            .copied()
    };

    // VIPs.
    let mut vip_ids = Ids {
        free: applied.free_vip_ids.clone(),
        next: applied.next_vip_id,
        end: limits.max_vips,
    };
    let new_vip_count = scope
        .vips
        .keys()
        .filter(|k| !applied.vips.contains_key(*k))
        .count();
    if new_vip_count > vip_ids.available() {
        return Err(PlanError::VipIdsExhausted {
            wanted: applied.vips.len() + new_vip_count,
            max: limits.max_vips,
        });
    }
    let mut write_rings = Vec::new();
    let mut set_vips = Vec::new();
    let mut warnings = Vec::new();
    let mut ring_inputs = Vec::new();
    // Every planned VIP's inputs, and whether it needs a table (new, or inputs not the
    // cached ones of its active ring). The inputs are checked here, in plan order (the
    // first error is the plan's, nothing is written), and the builder's warnings taken;
    // the table itself is built when written.
    let mut prepared: Vec<Prepared<'_>> = scope
        .vips
        .iter()
        .map(|(ord, (key, vip))| {
            let mut inputs: Vec<(u32, u32)> = Vec::with_capacity(vip.backends.len());
            let mut weighted = Vec::with_capacity(vip.backends.len());
            for b in &vip.backends {
                // Every desired backend got an id above.
                let Some(id) = backend_id(&b.address) else {
                    continue;
                };
                inputs.push((id, b.effective_weight()));
                weighted.push(WeightedBackend {
                    address: b.address,
                    weight: b.effective_weight(),
                    id,
                });
            }
            inputs.sort_unstable();
            let inputs: RingInputs = inputs.into();
            let old = applied.vips.get(ord).map(|(_, info)| *info);
            let cached = old.is_some_and(|old| {
                applied.ring_inputs.get(&old.ring) == Some(&inputs)
                    && applied.rings.contains_key(&old.ring)
            });
            let need = if cached {
                Need::Cached
            } else {
                let label = vip.label();
                match maglev::check(&label, limits.table_size, &weighted) {
                    Ok(found) => warnings.extend(found),
                    Err(source) => return Err(PlanError::Maglev { vip: label, source }),
                }
                Need::Write(RingTable::Planned(Box::new(TableInputs {
                    vip: label,
                    table_size: limits.table_size,
                    backends: weighted,
                })))
            };
            Ok(Prepared {
                ord: *ord,
                key: *key,
                vip,
                old,
                inputs,
                need,
            })
        })
        .collect::<Result<_, PlanError>>()?;
    compare_with_active_rings(&mut prepared, applied)?;
    for p in prepared {
        let Prepared {
            ord,
            key,
            vip,
            old,
            inputs,
            need,
        } = p;
        let flags = vip.flags();
        match (old, need) {
            (Some(old), need) => {
                let table_changed = match need {
                    Need::Cached => false,
                    Need::Same => {
                        ring_inputs.push((old.ring, inputs));
                        false
                    }
                    Need::Write(table) => {
                        let idle = if old.ring == 2 * old.vip_id {
                            old.ring + 1
                        } else {
                            2 * old.vip_id
                        };
                        write_rings.push(MapOp::WriteRing { ring: idle, table });
                        ring_inputs.push((idle, inputs));
                        set_vips.push(MapOp::SetVip {
                            key,
                            info: VipInfo {
                                ring: idle,
                                flags,
                                ..old
                            },
                        });
                        true
                    }
                };
                if !table_changed && old.flags != flags {
                    set_vips.push(MapOp::SetVip {
                        key,
                        info: VipInfo { flags, ..old },
                    });
                }
            }
            (None, Need::Write(table)) => {
                let vip_id = vip_ids.take().ok_or(PlanError::VipIdsExhausted {
                    wanted: applied.vips.len() + new_vip_count,
                    max: limits.max_vips,
                })?;
                let ring = 2 * vip_id;
                write_rings.push(MapOp::WriteRing { ring, table });
                ring_inputs.push((ring, inputs));
                set_vips.push(MapOp::SetVip {
                    key,
                    info: VipInfo {
                        vip_id,
                        ring,
                        flags,
                        _pad: 0,
                    },
                });
            }
            (None, Need::Cached | Need::Same) => {
                unreachable!("VIP {ord:?}: a VIP without a ring always needs a table")
            }
        }
    }

    // VIP addresses: how many VIPs each carries.
    let mut addrs_up = Vec::new();
    let mut addrs_down = Vec::new();
    let mut addrs_gone = Vec::new();
    for (addr, &count) in &scope.addrs {
        let old = applied.vip_addrs.get(addr);
        if count == 0 {
            if old.is_some() {
                addrs_gone.push(MapOp::RemoveVipAddr {
                    key: addr_key(*addr),
                });
            }
            continue;
        }
        match old {
            Some(&old) if old == count => {}
            old => {
                let op = MapOp::SetVipAddr {
                    key: addr_key(*addr),
                    vip_count: count,
                };
                // A count that grows must be in place before the new VIP; one that shrinks
                // is lowered after the VIP is gone.
                if old.is_some_and(|&old| old > count) {
                    addrs_down.push(op);
                } else {
                    addrs_up.push(op);
                }
            }
        }
    }
    addrs_down.append(&mut addrs_gone);

    // Removals.
    let mut remove_vips = Vec::new();
    let mut flushes = Vec::new();
    for (key, vip_id) in &scope.removed {
        remove_vips.push(MapOp::RemoveVip { key: *key });
        flushes.push(MapOp::FlushFlows {
            vip: *key,
            vip_id: *vip_id,
        });
    }
    let mut remove_backends: Vec<MapOp> = scope
        .gone_backends
        .iter()
        .map(|&id| MapOp::RemoveBackend { id })
        .collect();

    let mut ops = set_backends;
    ops.append(&mut write_rings);
    ops.append(&mut addrs_up);
    ops.append(&mut set_vips);
    ops.append(&mut remove_vips);
    ops.append(&mut addrs_down);
    ops.append(&mut flushes);
    ops.append(&mut remove_backends);
    Ok((ops, warnings, ring_inputs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, BackendState, ForwardingMode, Protocol, ServiceKey, VipSpec};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const M: u32 = 251;

    /// The table `maglev::build` makes for `vip` with the backend ids `applied` assigned.
    fn expected_table(vip: &VipSpec, applied: &AppliedState) -> Vec<u32> {
        let backends: Vec<WeightedBackend> = vip
            .backends
            .iter()
            .map(|b| WeightedBackend {
                address: b.address,
                weight: b.effective_weight(),
                id: applied.backend_id(b.address).unwrap(),
            })
            .collect();
        maglev::build("x", M, &backends).unwrap().table
    }

    fn limits() -> Limits {
        Limits {
            table_size: M,
            max_vips: 8,
            max_backends: 32,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn vip(address: &str, port: u16, backends: &[&str]) -> VipSpec {
        VipSpec {
            name: String::new(),
            key: ServiceKey {
                address: ip(address),
                protocol: Protocol::Tcp,
                port,
            },
            source_affinity: false,
            forwarding: ForwardingMode::Encap,
            backends: backends
                .iter()
                .map(|b| BackendSpec {
                    address: ip(b),
                    weight: 1,
                    state: BackendState::Active,
                })
                .collect(),
        }
    }

    fn state(vips: Vec<VipSpec>) -> DesiredState {
        DesiredState {
            vips: vips.into_iter().map(Arc::new).collect(),
        }
    }

    /// Plans and applies; returns the ops.
    fn step(desired: &DesiredState, applied: &mut AppliedState) -> Vec<MapOp> {
        let plan = plan(desired, applied).unwrap();
        *applied = plan.applied;
        plan.ops
    }

    fn kind(op: &MapOp) -> &'static str {
        match op {
            MapOp::SetBackend { .. } => "SetBackend",
            MapOp::WriteRing { .. } => "WriteRing",
            MapOp::SetVipAddr { .. } => "SetVipAddr",
            MapOp::SetVip { .. } => "SetVip",
            MapOp::RemoveVip { .. } => "RemoveVip",
            MapOp::RemoveVipAddr { .. } => "RemoveVipAddr",
            MapOp::FlushFlows { .. } => "FlushFlows",
            MapOp::RemoveBackend { .. } => "RemoveBackend",
        }
    }

    fn kinds(ops: &[MapOp]) -> Vec<&'static str> {
        ops.iter().map(kind).collect()
    }

    fn web() -> VipSpec {
        vip(
            "192.0.2.10",
            80,
            &["198.51.100.11", "198.51.100.12", "198.51.100.13"],
        )
    }

    #[test]
    fn first_plan_creates_everything_in_order() {
        let mut applied = AppliedState::new(limits());
        let ops = step(&state(vec![web()]), &mut applied);
        assert_eq!(
            kinds(&ops),
            [
                "SetBackend",
                "SetBackend",
                "SetBackend",
                "WriteRing",
                "SetVipAddr",
                "SetVip"
            ]
        );
        let ids: Vec<u32> = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::SetBackend { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [1, 2, 3], "id 0 is never allocated");
        let MapOp::WriteRing { ring, table } = &ops[3] else {
            unreachable!()
        };
        assert_eq!(*ring, 0);
        let table = table.build().unwrap();
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(|&id| (1..=3).contains(&id)));
        let MapOp::SetVip { key, info } = &ops[5] else {
            unreachable!()
        };
        assert_eq!(*key, web().key.to_map_key());
        assert_eq!((info.vip_id, info.ring, info.flags), (0, 0, 0));
        let MapOp::SetVipAddr { vip_count, .. } = &ops[4] else {
            unreachable!()
        };
        assert_eq!(*vip_count, 1);
    }

    #[test]
    fn applying_twice_yields_no_ops() {
        let mut applied = AppliedState::new(limits());
        let desired = state(vec![
            web(),
            vip("192.0.2.10", 443, &["198.51.100.11"]),
            vip("2001:db8::10", 0, &["2001:db8::11"]),
        ]);
        assert!(!step(&desired, &mut applied).is_empty());
        let again = plan(&desired, &applied).unwrap();
        assert!(again.is_empty(), "{:?}", again.ops);
        // Also when the cache of ring inputs is cold (e.g. after a partial apply).
        let mut cold = applied.clone();
        cold.ring_inputs.clear();
        assert!(plan(&desired, &cold).unwrap().is_empty());
    }

    #[test]
    fn one_backend_change_rewrites_one_ring_and_flips_one_vip() {
        let other = vip("192.0.2.20", 80, &["198.51.100.21"]);
        let mut applied = AppliedState::new(limits());
        step(&state(vec![web(), other.clone()]), &mut applied);
        let web_key = web().key.to_map_key();
        let before = applied.vip(&web_key).unwrap();

        let mut changed = web();
        changed.backends.push(changed.backends[0]);
        changed.backends[3].address = ip("198.51.100.14");
        let ops = step(&state(vec![changed.clone(), other.clone()]), &mut applied);
        assert_eq!(kinds(&ops), ["SetBackend", "WriteRing", "SetVip"]);
        let MapOp::WriteRing { ring, .. } = &ops[1] else {
            unreachable!()
        };
        assert_eq!(*ring, 2 * before.vip_id + 1, "the idle ring");
        let after = applied.vip(&web_key).unwrap();
        assert_eq!((after.vip_id, after.ring), (before.vip_id, *ring));

        // And back: the new table goes to the other ring, the added backend is removed last.
        let ops = step(&state(vec![web(), other]), &mut applied);
        assert_eq!(kinds(&ops), ["WriteRing", "SetVip", "RemoveBackend"]);
        assert_eq!(applied.vip(&web_key).unwrap().ring, before.ring);
        assert_eq!(ops[2], MapOp::RemoveBackend { id: 5 });
    }

    #[test]
    fn table_matches_maglev_and_draining_keeps_entry_without_slots() {
        let mut applied = AppliedState::new(limits());
        step(&state(vec![web()]), &mut applied);
        let mut draining = web();
        draining.backends[1].state = BackendState::Draining;
        let ops = step(&state(vec![draining.clone()]), &mut applied);
        assert_eq!(kinds(&ops), ["WriteRing", "SetVip"], "no RemoveBackend");
        let id = applied.backend_id(ip("198.51.100.12")).unwrap();
        assert!(applied.backends().any(|(i, _)| i == id));
        let info = applied.vip(&web().key.to_map_key()).unwrap();
        let table = expected_table(&draining, &applied);
        assert!(!table.contains(&id));
        assert_eq!(applied.ring(info.ring), Some(TableDigest::of(&table)));
        // Weight 0 is the same as draining: table unchanged, nothing written.
        let mut zero = web();
        zero.backends[1].weight = 0;
        assert!(plan(&state(vec![zero]), &applied).unwrap().is_empty());
    }

    #[test]
    fn adding_a_draining_backend_writes_its_entry_but_no_ring() {
        let mut applied = AppliedState::new(limits());
        step(&state(vec![web()]), &mut applied);
        let mut more = web();
        more.backends.push(BackendSpec {
            address: ip("198.51.100.99"),
            weight: 1,
            state: BackendState::Draining,
        });
        let ops = step(&state(vec![more.clone()]), &mut applied);
        assert_eq!(kinds(&ops), ["SetBackend"]);
        assert!(plan(&state(vec![more]), &applied).unwrap().is_empty());
    }

    #[test]
    fn flag_change_is_a_single_vip_update() {
        let mut applied = AppliedState::new(limits());
        step(&state(vec![web()]), &mut applied);
        let mut sticky = web();
        sticky.source_affinity = true;
        let ops = step(&state(vec![sticky]), &mut applied);
        assert_eq!(
            ops,
            [MapOp::SetVip {
                key: web().key.to_map_key(),
                info: VipInfo {
                    vip_id: 0,
                    ring: 0,
                    flags: lb_common::VIP_F_HASH_SRC_ONLY,
                    _pad: 0
                }
            }]
        );
    }

    #[test]
    fn unchanged_vips_produce_no_ops() {
        let a = web();
        let b = vip("192.0.2.20", 80, &["198.51.100.21"]);
        let mut applied = AppliedState::new(limits());
        step(&state(vec![a.clone(), b.clone()]), &mut applied);
        let mut b2 = b.clone();
        b2.backends[0].weight = 3; // alone, its table does not change
        let c = vip("192.0.2.30", 80, &["198.51.100.31"]);
        let ops = step(&state(vec![c.clone(), b2, a.clone()]), &mut applied);
        let a_key = a.key.to_map_key();
        let b_key = b.key.to_map_key();
        for op in &ops {
            if let MapOp::SetVip { key, .. } = op {
                assert_ne!(*key, a_key);
                assert_ne!(*key, b_key);
            }
        }
        assert_eq!(
            kinds(&ops),
            ["SetBackend", "WriteRing", "SetVipAddr", "SetVip"]
        );
    }

    #[test]
    fn removing_a_vip_removes_all_of_it_last() {
        let a = web();
        let b = vip("192.0.2.10", 443, &["198.51.100.11", "198.51.100.50"]);
        let mut applied = AppliedState::new(limits());
        step(&state(vec![a.clone(), b.clone()]), &mut applied);
        let addr = VipAddrKey {
            addr_be: a.key.to_map_key().addr_be,
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        assert_eq!(applied.vip_addr_count(&addr), Some(2));
        let b_info = applied.vip(&b.key.to_map_key()).unwrap();
        let only_b = applied.backend_id(ip("198.51.100.50")).unwrap();

        let ops = step(&state(vec![a.clone()]), &mut applied);
        assert_eq!(
            ops,
            [
                MapOp::RemoveVip {
                    key: b.key.to_map_key()
                },
                MapOp::SetVipAddr {
                    key: addr,
                    vip_count: 1
                },
                MapOp::FlushFlows {
                    vip: b.key.to_map_key(),
                    vip_id: b_info.vip_id
                },
                MapOp::RemoveBackend { id: only_b },
            ]
        );
        // 198.51.100.11 is still used by `a`: same id, no removal.
        assert_eq!(applied.backend_id(ip("198.51.100.11")), Some(1));

        let ops = step(&state(vec![]), &mut applied);
        assert_eq!(
            kinds(&ops),
            [
                "RemoveVip",
                "RemoveVipAddr",
                "FlushFlows",
                "RemoveBackend",
                "RemoveBackend",
                "RemoveBackend"
            ]
        );
        assert!(plan(&state(vec![]), &applied).unwrap().is_empty());
    }

    #[test]
    fn freed_ids_are_reused_oldest_first_and_never_within_one_plan() {
        let small = Limits {
            table_size: M,
            max_vips: 2,
            max_backends: 4, // ids 1, 2, 3
        };
        let mut applied = AppliedState::new(small);
        let a = vip("192.0.2.10", 80, &["198.51.100.1", "198.51.100.2"]);
        step(&state(vec![a.clone()]), &mut applied);
        // Replacing .1 by .3 in one plan: .3 cannot take id 1, it gets the fresh id 3.
        let b = vip("192.0.2.10", 80, &["198.51.100.2", "198.51.100.3"]);
        let ops = step(&state(vec![b]), &mut applied);
        assert_eq!(
            ops[0],
            MapOp::SetBackend {
                id: 3,
                backend: backend_entry(ip("198.51.100.3"))
            }
        );
        assert_eq!(ops.last(), Some(&MapOp::RemoveBackend { id: 1 }));
        // Free .2 (id 2), then ask for two new backends: ids 1 then 2 (oldest freed first).
        step(
            &state(vec![vip("192.0.2.10", 80, &["198.51.100.3"])]),
            &mut applied,
        );
        let c = vip(
            "192.0.2.10",
            80,
            &["198.51.100.3", "198.51.100.4", "198.51.100.5"],
        );
        step(&state(vec![c]), &mut applied);
        assert_eq!(applied.backend_id(ip("198.51.100.4")), Some(1));
        assert_eq!(applied.backend_id(ip("198.51.100.5")), Some(2));

        // VIP ids: remove VIP 0, add two VIPs -> fresh id 1 first, then 0.
        let mut applied = AppliedState::new(small);
        step(&state(vec![vip("192.0.2.10", 80, &[])]), &mut applied);
        step(&state(vec![]), &mut applied);
        let two = state(vec![vip("192.0.2.20", 80, &[]), vip("192.0.2.30", 80, &[])]);
        step(&two, &mut applied);
        let ids: Vec<u32> = applied.vips().map(|(_, i)| i.vip_id).collect();
        assert_eq!(ids, [1, 0]);
    }

    #[test]
    fn limits_are_enforced_without_a_partial_plan() {
        let small = Limits {
            table_size: M,
            max_vips: 1,
            max_backends: 3,
        };
        let applied = AppliedState::new(small);
        let two_vips = state(vec![web(), vip("192.0.2.20", 80, &[])]);
        assert_eq!(
            plan(&two_vips, &applied).unwrap_err().to_string(),
            "2 VIPs requested but max_vips is 1"
        );
        assert_eq!(
            plan(&state(vec![web()]), &applied).unwrap_err().to_string(),
            "3 backend ids needed during this update (current and new) but max_backends 3 \
             allows 2 (id 0 is reserved; ids of removed backends are freed only after the \
             update)"
        );
        // Swapping the only VIP for another needs two ids during the update.
        let mut applied = AppliedState::new(small);
        step(&state(vec![vip("192.0.2.10", 80, &[])]), &mut applied);
        let swap = state(vec![vip("192.0.2.20", 80, &[])]);
        assert!(matches!(
            plan(&swap, &applied),
            Err(PlanError::VipIdsExhausted { wanted: 2, max: 1 })
        ));
        let bad_size = AppliedState::new(Limits {
            table_size: 250,
            ..small
        });
        assert!(matches!(
            plan(&state(vec![vip("192.0.2.10", 80, &[])]), &bad_size),
            Err(PlanError::Maglev {
                source: MaglevError::NotPrime(250),
                ..
            })
        ));
    }

    #[test]
    fn invalid_desired_state_is_rejected() {
        let applied = AppliedState::new(limits());
        let dup = state(vec![web(), web()]);
        assert_eq!(
            plan(&dup, &applied).unwrap_err().to_string(),
            "invalid desired state: vips[1]: duplicates vips[0]: both are 192.0.2.10:80/tcp"
        );
    }

    #[test]
    fn small_table_warning_names_the_vip() {
        let applied = AppliedState::new(limits());
        let mut named = web();
        named.name = "web".into();
        let plan = plan(&state(vec![named]), &applied).unwrap();
        assert_eq!(plan.warnings.len(), 1);
        assert!(
            plan.warnings[0]
                .to_string()
                .starts_with("VIP web (192.0.2.10:80/tcp): ")
        );
    }

    /// Random walks over desired states with random partial failures. Checks, against a
    /// simulated kernel, that no op ever writes a ring a VIP is using, no table points at a
    /// missing backend, and after a full apply the maps match the desired state exactly.
    #[test]
    fn random_walk_keeps_the_datapath_consistent() {
        let mut rng = StdRng::seed_from_u64(7);
        let vip_pool = ["192.0.2.10", "192.0.2.11", "2001:db8::10"];
        let v4_backends: Vec<String> = (1..=12).map(|i| format!("198.51.100.{i}")).collect();
        let v6_backends: Vec<String> = (1..=6).map(|i| format!("2001:db8:1::{i}")).collect();
        let mut applied = AppliedState::new(Limits {
            table_size: M,
            max_vips: 8,
            max_backends: 64,
        });
        // What the kernel's rings hold (the applied state keeps fingerprints only).
        let mut tables: BTreeMap<u32, Arc<[u32]>> = BTreeMap::new();
        for round in 0..300 {
            let mut vips = Vec::new();
            for address in vip_pool {
                for port in [80u16, 0] {
                    if !rng.random_bool(0.5) {
                        continue;
                    }
                    let mut v = vip(address, port, &[]);
                    v.source_affinity = rng.random_bool(0.3);
                    let pool: Vec<&String> = if address.contains(':') {
                        v6_backends.iter().collect()
                    } else {
                        v4_backends.iter().chain(&v6_backends).collect()
                    };
                    for b in pool {
                        if rng.random_bool(0.3) {
                            v.backends.push(BackendSpec {
                                address: ip(b),
                                weight: rng.random_range(0..4),
                                state: if rng.random_bool(0.2) {
                                    BackendState::Draining
                                } else {
                                    BackendState::Active
                                },
                            });
                        }
                    }
                    vips.push(v);
                }
            }
            let desired = state(vips);
            let plan = plan(&desired, &applied).unwrap();
            // A writer that fails part-way through one plan in four.
            let completed = if rng.random_bool(0.25) {
                rng.random_range(0..=plan.ops.len())
            } else {
                plan.ops.len()
            };
            let mut kernel = applied.clone();
            for op in &plan.ops[..completed] {
                match op {
                    MapOp::WriteRing { ring, table } => {
                        assert!(
                            kernel.vips().all(|(_, info)| info.ring != *ring),
                            "round {round}: wrote ring {ring} while in use"
                        );
                        let table: Arc<[u32]> = table.build().unwrap().into();
                        assert!(
                            table
                                .iter()
                                .all(|id| *id == NO_BACKEND || kernel.backends.contains_key(id)),
                            "round {round}: ring points at a missing backend"
                        );
                        tables.insert(*ring, table);
                    }
                    MapOp::SetVip { info, .. } => {
                        assert!(kernel.rings.contains_key(&info.ring), "unwritten ring");
                        assert!(info.vip_id < 8 && info.ring / 2 == info.vip_id);
                    }
                    MapOp::RemoveBackend { id } => {
                        for (_, info) in kernel.vips() {
                            assert!(!tables[&info.ring].contains(id), "still in a ring");
                        }
                    }
                    MapOp::SetBackend { id, .. } => assert_ne!(*id, NO_BACKEND),
                    _ => {}
                }
                kernel.record(op);
            }
            applied = plan.applied_after(&applied, completed);
            assert_eq!(applied.backends, kernel.backends);
            assert_eq!(applied.vips, kernel.vips);
            assert_eq!(applied.rings, kernel.rings);
            if completed == plan.ops.len() {
                assert!(
                    super::plan(&desired, &applied).unwrap().is_empty(),
                    "round {round}: second plan not empty"
                );
                assert_eq!(applied.vips.len(), desired.vips.len());
                assert_eq!(applied.backends.len(), desired.backend_addresses().len());
                for v in &desired.vips {
                    let info = applied.vip(&v.key.to_map_key()).unwrap();
                    assert_eq!(info.flags, v.flags());
                    let expected = expected_table(v, &applied);
                    assert_eq!(&tables[&info.ring][..], &expected[..]);
                    assert_eq!(applied.rings[&info.ring], TableDigest::of(&expected));
                }
                let total: u32 = applied.vip_addrs.values().sum();
                assert_eq!(total as usize, desired.vips.len());
            }
        }
    }

    /// Random small edits of a state (a backend's state or weight, a VIP added, removed
    /// or renamed, affinity flipped), some large ones, and writers failing part-way: the
    /// plan from a baseline must be the full plan, op for op, and leave the same state.
    #[test]
    fn plans_from_a_baseline_equal_full_plans() {
        for seed in 0..4u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let limits = Limits {
                table_size: M,
                max_vips: 24,
                max_backends: 96,
            };
            let addresses = ["192.0.2.10", "192.0.2.11", "192.0.2.12", "2001:db8::10"];
            let v4: Vec<String> = (1..=40).map(|i| format!("198.51.100.{i}")).collect();
            let v6: Vec<String> = (1..=10).map(|i| format!("2001:db8:1::{i}")).collect();
            let random_backend = |rng: &mut StdRng, v6_vip: bool| {
                let pick = if v6_vip || rng.random_bool(0.1) {
                    &v6[rng.random_range(0..v6.len())]
                } else {
                    &v4[rng.random_range(0..v4.len())]
                };
                BackendSpec {
                    address: ip(pick),
                    weight: rng.random_range(0..3),
                    state: if rng.random_bool(0.2) {
                        BackendState::Draining
                    } else {
                        BackendState::Active
                    },
                }
            };
            let random_vip = |rng: &mut StdRng| {
                let address = addresses[rng.random_range(0..addresses.len())];
                let mut v = vip(address, rng.random_range(0..6) * 10, &[]);
                v.name = format!("v{}", rng.random_range(0..1000));
                for _ in 0..rng.random_range(0..6) {
                    let b = random_backend(rng, address.contains(':'));
                    if v.backends.iter().all(|o| o.address != b.address) {
                        v.backends.push(b);
                    }
                }
                v
            };
            let mut desired = state(Vec::new());
            let mut full = AppliedState::new(limits);
            let mut incremental = AppliedState::new(limits);
            let mut baseline: Option<Baseline> = None;
            for round in 0..300 {
                let mut next = desired.clone();
                let edits = if rng.random_bool(0.05) {
                    20
                } else {
                    1 + rng.random_range(0..3)
                };
                for _ in 0..edits {
                    let n = next.vips.len();
                    match rng.random_range(0..6) {
                        0 | 1 if n > 0 => {
                            let v = Arc::make_mut(&mut next.vips[rng.random_range(0..n)]);
                            let v6_vip = v.key.address.is_ipv6();
                            if !v.backends.is_empty() && rng.random_bool(0.5) {
                                let i = rng.random_range(0..v.backends.len());
                                if rng.random_bool(0.5) {
                                    v.backends.remove(i);
                                } else {
                                    v.backends[i].state = match v.backends[i].state {
                                        BackendState::Active => BackendState::Draining,
                                        BackendState::Draining => BackendState::Active,
                                    };
                                }
                            } else {
                                let b = random_backend(&mut rng, v6_vip);
                                if v.backends.iter().all(|o| o.address != b.address) {
                                    v.backends.push(b);
                                }
                            }
                        }
                        2 if n > 0 => {
                            next.vips.remove(rng.random_range(0..n));
                        }
                        3 if n > 0 => {
                            let v = Arc::make_mut(&mut next.vips[rng.random_range(0..n)]);
                            if rng.random_bool(0.5) {
                                v.source_affinity = !v.source_affinity;
                            } else {
                                v.name.push('x');
                            }
                        }
                        _ => next.vips.push(Arc::new(random_vip(&mut rng))),
                    }
                }
                // Keep only valid states (the planner rejects the others before anything).
                let mut keys = BTreeSet::new();
                let mut names = BTreeSet::new();
                next.vips
                    .retain(|v| keys.insert(v.key) && names.insert(v.name.clone()));
                let vip_addresses: BTreeSet<IpAddr> =
                    next.vips.iter().map(|v| v.key.address).collect();
                // Copy-on-write, as the Kubernetes source does: untouched specs stay the
                // same `Arc`, so the planner's reuse of their validation is exercised.
                for v in &mut next.vips {
                    if v.backends
                        .iter()
                        .any(|b| vip_addresses.contains(&b.address))
                    {
                        Arc::make_mut(v)
                            .backends
                            .retain(|b| !vip_addresses.contains(&b.address));
                    }
                }
                if next.vips.len() > 12 {
                    next.vips.truncate(12);
                }
                next.validate().unwrap();
                desired = next;

                let plan = match plan(&desired, &full) {
                    Ok(plan) => plan,
                    Err(e) => {
                        // Same verdict from the baseline, and nothing changes.
                        let err =
                            plan_changes(&desired, &incremental, baseline.as_ref()).unwrap_err();
                        assert_eq!(err, e, "seed {seed} round {round}");
                        continue;
                    }
                };
                let changes = plan_changes(&desired, &incremental, baseline.as_ref()).unwrap();
                assert_eq!(changes.ops, plan.ops, "seed {seed} round {round}");
                assert_eq!(changes.warnings, plan.warnings, "seed {seed} round {round}");
                let completed = if rng.random_bool(0.1) {
                    rng.random_range(0..=plan.ops.len())
                } else {
                    plan.ops.len()
                };
                full = plan.applied_after(&full, completed);
                for op in &changes.ops[..completed] {
                    incremental.record(op);
                }
                baseline = changes.finish(&mut incremental, completed, baseline.take());
                assert_eq!(incremental, full, "seed {seed} round {round}");
                assert_eq!(baseline.is_some(), completed == plan.ops.len());
            }
        }
    }

    /// The incremental plan skips re-checking the backends of unchanged VIPs, but not when a
    /// new VIP address appears: an unchanged VIP's backend at that address must still be
    /// refused (packets would loop), exactly as a full plan refuses it.
    #[test]
    fn a_new_vip_address_rechecks_unchanged_vips_backends() {
        let mut applied = AppliedState::new(limits());
        let first = state(vec![vip(
            "192.0.2.10",
            80,
            &["198.51.100.1", "198.51.100.2"],
        )]);
        let changes = plan_changes(&first, &applied, None).unwrap();
        for op in &changes.ops {
            applied.record(op);
        }
        let total = changes.ops.len();
        let baseline = changes.finish(&mut applied, total, None).unwrap();

        // The same spec (same Arc), plus a VIP on one of its backends' addresses.
        let mut next = first.clone();
        next.vips
            .push(Arc::new(vip("198.51.100.2", 443, &["198.51.100.3"])));
        let full = plan_changes(&next, &applied, None).unwrap_err();
        let incremental = plan_changes(&next, &applied, Some(&baseline)).unwrap_err();
        assert_eq!(incremental, full);
        assert!(
            incremental
                .to_string()
                .contains("vips[0].backends[1].address: 198.51.100.2 is a VIP address"),
            "{incremental}"
        );

        // A change elsewhere with no new VIP address: the unchanged VIP is not re-checked,
        // and the changed one is.
        let mut changed = first.clone();
        changed
            .vips
            .push(Arc::new(vip("192.0.2.10", 443, &["192.0.2.10"])));
        let err = plan_changes(&changed, &applied, Some(&baseline)).unwrap_err();
        assert!(
            err.to_string()
                .contains("vips[1].backends[0].address: 192.0.2.10 is a VIP address"),
            "{err}"
        );
    }

    /// `count` VIPs with up to 5 backends each out of 1,000 addresses.
    fn many_vips(count: usize, seed: u64) -> Vec<VipSpec> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..count)
            .map(|i| {
                let backends: Vec<String> = (0..rng.random_range(0..6))
                    .map(|_| {
                        format!(
                            "10.{}.{}.1",
                            rng.random_range(0..4),
                            rng.random_range(0..250)
                        )
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
                vip(&format!("192.0.{}.{}", 2 + i / 250, i % 250 + 1), 80, &refs)
            })
            .collect()
    }

    /// The table of `vip` with the ids of `applied`, as `maglev::build` makes it.
    fn table_of(vip: &VipSpec, applied: &AppliedState, table_size: u32) -> Vec<u32> {
        let backends: Vec<WeightedBackend> = vip
            .backends
            .iter()
            .map(|b| WeightedBackend {
                address: b.address,
                weight: b.effective_weight(),
                id: applied.backend_id(b.address).unwrap(),
            })
            .collect();
        maglev::build("x", table_size, &backends).unwrap().table
    }

    /// A plan of new VIPs holds what their tables are built from, not the tables: the
    /// same inputs whatever M, so a plan's memory does not grow with M.
    #[test]
    fn a_plan_holds_no_table_of_a_new_vip_whatever_m() {
        let desired = state(many_vips(40, 3));
        let plan_with = |table_size: u32| {
            let applied = AppliedState::new(Limits {
                table_size,
                max_vips: 64,
                max_backends: 4096,
            });
            plan_changes(&desired, &applied, None).unwrap().ops
        };
        let (small, large) = (plan_with(M), plan_with(65_537));
        assert_eq!(small.len(), large.len());
        let mut rings = 0;
        for (a, b) in small.iter().zip(&large) {
            match (a, b) {
                (
                    MapOp::WriteRing {
                        ring: ring_a,
                        table: RingTable::Planned(a),
                    },
                    MapOp::WriteRing {
                        ring: ring_b,
                        table: RingTable::Planned(b),
                    },
                ) => {
                    assert_eq!(ring_a, ring_b);
                    assert_eq!((a.table_size, b.table_size), (M, 65_537));
                    assert_eq!((&a.vip, &a.backends), (&b.vip, &b.backends));
                    rings += 1;
                }
                (MapOp::WriteRing { .. }, _) | (_, MapOp::WriteRing { .. }) => {
                    panic!("a plan holds a table: {a:?} / {b:?}")
                }
                _ => assert_eq!(a, b),
            }
        }
        assert_eq!(rings, 40);
    }

    /// Enough new VIPs for several batches, each big enough to be built on several
    /// threads: every table is its VIP's own, in plan order, no batch is over its budget,
    /// and a second plan writes nothing.
    #[test]
    fn tables_built_when_written_in_bounded_batches_are_each_vips_own() {
        let budget = PARALLEL_SLOTS * 4 * 3 / 2;
        let per_batch = budget / (4 * M as usize);
        let count = per_batch * 2 + per_batch / 2;
        let desired = state(many_vips(count, 11));
        let mut applied = AppliedState::new(Limits {
            table_size: M,
            max_vips: count as u32,
            max_backends: 4096,
        });
        let plan = plan(&desired, &applied).unwrap();
        let after = plan.applied.clone();
        let mut sorted: Vec<&VipSpec> = desired.vips.iter().map(|v| &**v).collect();
        sorted.sort_by_key(|v| vip_ord(&v.key.to_map_key()));
        let mut sorted = sorted.into_iter();
        let mut writes = with_tables(&plan.ops, budget);
        let mut rings = 0;
        for (op, table) in writes.by_ref() {
            let MapOp::WriteRing { ring, .. } = op else {
                assert!(table.is_none());
                continue;
            };
            let v = sorted.next().unwrap();
            assert_eq!(after.vip(&v.key.to_map_key()).unwrap().ring, *ring);
            assert_eq!(&table.unwrap().unwrap()[..], &table_of(v, &after, M)[..]);
            rings += 1;
        }
        assert_eq!(rings, count);
        assert_eq!(writes.batches(), 3);
        assert_eq!(writes.largest_batch_bytes(), per_batch * 4 * M as usize);
        assert!(writes.largest_batch_bytes() <= budget);
        // A budget below one table still builds one at a time.
        let mut one_by_one = with_tables(&plan.ops, 1);
        assert_eq!(
            one_by_one.by_ref().filter(|(_, t)| t.is_some()).count(),
            count
        );
        assert_eq!(one_by_one.batches(), count);
        applied = after;
        assert!(super::plan(&desired, &applied).unwrap().is_empty());
    }

    /// Existing VIPs whose inputs changed: their new tables are built to compare with the
    /// active rings; the plan keeps at most `KEPT_TABLE_BYTES` of them, the others are
    /// built again when written, and either way the rings get the right tables.
    #[test]
    fn changed_tables_kept_by_a_plan_are_bounded() {
        const BIG_M: u32 = 65_537;
        let count = 2 * KEPT_TABLE_BYTES / (4 * BIG_M as usize) + 3;
        let limits = Limits {
            table_size: BIG_M,
            max_vips: count as u32,
            max_backends: 4096,
        };
        let mut before: Vec<VipSpec> = (0..count)
            .map(|i| vip(&format!("192.0.2.{}", i + 1), 80, &["10.0.0.1", "10.0.0.2"]))
            .collect();
        let mut applied = AppliedState::new(limits);
        step(&state(before.clone()), &mut applied);
        for v in &mut before {
            v.backends[1].address = ip("10.0.0.3");
        }
        let desired = state(before);
        let changes = plan_changes(&desired, &applied, None).unwrap();
        let (mut ready, mut planned) = (0, 0);
        for op in &changes.ops {
            match op {
                MapOp::WriteRing {
                    table: RingTable::Ready(table),
                    ..
                } => ready += table.len() * 4,
                MapOp::WriteRing {
                    table: RingTable::Planned(_),
                    ..
                } => planned += 1,
                _ => {}
            }
        }
        assert_eq!(
            ready,
            KEPT_TABLE_BYTES / (4 * BIG_M as usize) * 4 * BIG_M as usize
        );
        assert!(planned > 0);
        let mut written = 0;
        for (op, table) in with_tables(&changes.ops, TABLE_BATCH_BYTES) {
            if let MapOp::WriteRing { ring, .. } = op {
                let v = desired
                    .vips
                    .iter()
                    .find(|v| applied.vip(&v.key.to_map_key()).unwrap().ring == ring ^ 1)
                    .unwrap();
                let mut ids = applied.clone();
                ids.record(&changes.ops[0]); // the new backend's id
                assert_eq!(&table.unwrap().unwrap()[..], &table_of(v, &ids, BIG_M)[..]);
                written += 1;
            }
        }
        assert_eq!(written, count);
    }
}
