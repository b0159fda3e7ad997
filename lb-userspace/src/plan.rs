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
//! let result = plan.ops.iter().try_for_each(|op| { writer.apply(op)?; done += 1; Ok(()) });
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
        /// M backend ids.
        table: Arc<[u32]>,
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

    /// Updates the mirror for one op that was written successfully.
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
            MapOp::WriteRing { ring, table } => {
                self.rings.insert(*ring, TableDigest::of(table));
                self.ring_inputs.remove(ring);
            }
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

/// One planned VIP with its table inputs.
struct Prepared<'a> {
    ord: VipKeyOrd,
    key: VipKey,
    vip: &'a model::VipSpec,
    inputs: RingInputs,
    weighted: Vec<WeightedBackend>,
    needs_table: bool,
}

/// Tables needed by fewer VIPs than this are built inline, one after the other.
const PARALLEL_TABLES: usize = 256;

/// The tables of the VIPs that need one, built ahead on every core when there are many (a
/// first sync of 10,000 VIPs builds 10,000 tables); `None` where not built ahead. The
/// results are the builder's own, used in plan order, so the plan is the same.
type Built = Option<Result<maglev::MaglevTable, MaglevError>>;

fn build_tables(prepared: &[Prepared<'_>], table_size: u32) -> Vec<Built> {
    let mut out: Vec<Built> = (0..prepared.len()).map(|_| None).collect();
    let needed: Vec<usize> = (0..prepared.len())
        .filter(|&i| prepared[i].needs_table)
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if needed.len() < PARALLEL_TABLES || threads < 2 {
        return out;
    }
    let chunk = needed.len().div_ceil(threads);
    let results: Vec<Vec<(usize, Result<maglev::MaglevTable, MaglevError>)>> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = needed
                .chunks(chunk)
                .map(|indices| {
                    scope.spawn(move || {
                        indices
                            .iter()
                            .map(|&i| {
                                let p = &prepared[i];
                                (i, maglev::build(&p.vip.label(), table_size, &p.weighted))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            // A panicking worker leaves its tables to be built inline.
            workers.into_iter().filter_map(|w| w.join().ok()).collect()
        });
    for (i, result) in results.into_iter().flatten() {
        out[i] = Some(result);
    }
    out
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
    // Every planned VIP's inputs, and whether its table must be built (new, or inputs
    // not the cached ones of its active ring).
    let prepared: Vec<Prepared<'_>> = scope
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
            let needs_table = match applied.vips.get(ord) {
                Some((_, old)) => {
                    applied.ring_inputs.get(&old.ring) != Some(&inputs)
                        || !applied.rings.contains_key(&old.ring)
                }
                None => true,
            };
            Prepared {
                ord: *ord,
                key: *key,
                vip,
                inputs,
                weighted,
                needs_table,
            }
        })
        .collect();
    let mut prebuilt = build_tables(&prepared, limits.table_size);
    for (i, p) in prepared.into_iter().enumerate() {
        let Prepared {
            ord,
            key,
            vip,
            inputs,
            weighted,
            ..
        } = p;
        let (ord, key) = (&ord, &key);
        let mut build = |warnings: &mut Vec<MaglevWarning>| {
            prebuilt[i]
                .take()
                .unwrap_or_else(|| maglev::build(&vip.label(), limits.table_size, &weighted))
                .map(|built| {
                    warnings.extend(built.warnings);
                    Arc::<[u32]>::from(built.table)
                })
                .map_err(|source| PlanError::Maglev {
                    vip: vip.label(),
                    source,
                })
        };
        let flags = vip.flags();
        match applied.vips.get(ord) {
            Some((_, old)) => {
                let active = old.ring;
                let cached = applied.ring_inputs.get(&active) == Some(&inputs)
                    && applied.rings.contains_key(&active);
                let table_changed = if cached {
                    false
                } else {
                    let table = build(&mut warnings)?;
                    if applied.rings.get(&active) == Some(&TableDigest::of(&table)) {
                        ring_inputs.push((active, inputs.clone()));
                        false
                    } else {
                        let idle = if active == 2 * old.vip_id {
                            active + 1
                        } else {
                            2 * old.vip_id
                        };
                        write_rings.push(MapOp::WriteRing { ring: idle, table });
                        ring_inputs.push((idle, inputs.clone()));
                        set_vips.push(MapOp::SetVip {
                            key: *key,
                            info: VipInfo {
                                ring: idle,
                                flags,
                                ..*old
                            },
                        });
                        true
                    }
                };
                if !table_changed && old.flags != flags {
                    set_vips.push(MapOp::SetVip {
                        key: *key,
                        info: VipInfo { flags, ..*old },
                    });
                }
            }
            None => {
                let vip_id = vip_ids.take().ok_or(PlanError::VipIdsExhausted {
                    wanted: applied.vips.len() + new_vip_count,
                    max: limits.max_vips,
                })?;
                let ring = 2 * vip_id;
                let table = build(&mut warnings)?;
                write_rings.push(MapOp::WriteRing { ring, table });
                ring_inputs.push((ring, inputs.clone()));
                set_vips.push(MapOp::SetVip {
                    key: *key,
                    info: VipInfo {
                        vip_id,
                        ring,
                        flags,
                        _pad: 0,
                    },
                });
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
                        assert!(
                            table
                                .iter()
                                .all(|id| *id == NO_BACKEND || kernel.backends.contains_key(id)),
                            "round {round}: ring points at a missing backend"
                        );
                        tables.insert(*ring, table.clone());
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

    /// Enough new VIPs that their tables are built on several threads: every table is the
    /// builder's own for that VIP, in plan order, and a second plan writes nothing.
    #[test]
    fn tables_built_ahead_on_several_threads_are_each_vips_own() {
        let count = PARALLEL_TABLES * 2 + 3;
        let limits = Limits {
            table_size: M,
            max_vips: count as u32,
            max_backends: 4096,
        };
        let mut rng = StdRng::seed_from_u64(11);
        let vips: Vec<VipSpec> = (0..count)
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
            .collect();
        let desired = state(vips);
        let mut applied = AppliedState::new(limits);
        let plan = plan(&desired, &applied).unwrap();
        let after = plan.applied.clone();
        let mut rings = 0;
        let mut tables = plan.ops.iter().filter_map(|op| match op {
            MapOp::WriteRing { ring, table } => Some((*ring, table.clone())),
            _ => None,
        });
        let mut sorted: Vec<&VipSpec> = desired.vips.iter().map(|v| &**v).collect();
        sorted.sort_by_key(|v| vip_ord(&v.key.to_map_key()));
        for v in sorted {
            let (ring, table) = tables.next().unwrap();
            assert_eq!(after.vip(&v.key.to_map_key()).unwrap().ring, ring);
            let backends: Vec<WeightedBackend> = v
                .backends
                .iter()
                .map(|b| WeightedBackend {
                    address: b.address,
                    weight: b.effective_weight(),
                    id: after.backend_id(b.address).unwrap(),
                })
                .collect();
            assert_eq!(
                &table[..],
                &maglev::build("x", M, &backends).unwrap().table[..]
            );
            rings += 1;
        }
        assert_eq!(rings, count);
        applied = after;
        assert!(super::plan(&desired, &applied).unwrap().is_empty());
    }
}
