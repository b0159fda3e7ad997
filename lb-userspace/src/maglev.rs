//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, §3.4).
//!
//! # Algorithm
//!
//! Every backend derives a permutation of the `M` slots (M prime) from its address:
//! `offset = h1(addr) mod M`, `skip = h2(addr) mod (M − 1) + 1`, and its j-th preference is
//! `(offset + j·skip) mod M`. Because M is prime and `1 ≤ skip < M`, the permutation visits
//! every slot exactly once. Backends then take *turns*; on its turn a backend claims the
//! first slot of its permutation that is still empty. Each turn therefore fills exactly one
//! slot, and filling stops when all M slots are taken.
//!
//! # Weights
//!
//! Let `w_i` be backend i's weight, `W = max_i w_i` and `S = Σ w_i` over backends with
//! `w_i > 0` (weight-0 backends take no turns and get no slots). Turns happen in rounds
//! r = 1, 2, …; in round r the backends are visited in address order and backend i takes a
//! turn iff `⌊r·w_i / W⌋ > ⌊(r−1)·w_i / W⌋` — i.e. after r rounds it has had exactly
//! `⌊r·w_i / W⌋` turns (a Bresenham accumulator; heaviest backends turn every round). With
//! equal weights this is the paper's plain round robin.
//!
//! **Bound.** Let filling end in round R and `e_i = M·w_i / S` be backend i's ideal share.
//! Every turn fills one slot, so backend i ends with `count_i` slots where
//! `⌊(R−1)·w_i/W⌋ ≤ count_i ≤ ⌊R·w_i/W⌋`. The table was full after round R, so
//! `Σ⌊R·w_i/W⌋ ≥ M`, hence `R ≥ M·W/S`; it was not full after round R−1, so
//! `Σ⌊(R−1)·w_i/W⌋ ≤ M − 1`, hence `(R−1)·S/W − N < M − 1`. Substituting:
//!
//! ```text
//! e_i − w_i/W − 1  <  count_i  <  e_i + (N − 1)·w_i/S + w_i/W
//! ```
//!
//! so every backend is within 2 slots below and `1 + (N−1)·w_i/S` slots above its ideal
//! share (with equal weights: strictly within ±2 of M/N). [`slot_count_bounds`] returns it.
//!
//! # Determinism
//!
//! The table is a function of the *set* of (address, weight) pairs and the id the caller
//! assigns to each address: backends are sorted by address before anything else, and the
//! permutation hashes are SipHash-2-4 with fixed keys over the address bytes (not `std`'s
//! per-process randomized hasher), so every node and every restart computes the same table.
//!
//! # Speed
//!
//! Filled slots are tracked in a bitset (8 KiB for M = 65537, so it stays in L1), the walk
//! along a permutation is one add and one conditional subtract (no multiplication, no
//! division, no per-slot allocation). Probing costs about `M·ln M` in total, most of it in
//! the last few slots, where nearly every probe hits a filled slot. So once at most ≈ √M
//! slots are empty, the builder switches to the endgame: it keeps the empty slots in a list
//! and gives each turn the empty slot with the smallest permutation index
//! `j = (slot − offset)·skip⁻¹ mod M`, which is exactly the slot probing would have found
//! (every slot before the backend's current position is already filled). Weighted
//! schedules with very uneven weights use a heap of next-turn rounds instead of visiting
//! every backend every round; all schedules produce the same turn order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::net::IpAddr;

use lb_common::NO_BACKEND;

/// Largest accepted table size. Each ring holds M `u32`s and every VIP owns two rings, so
/// beyond this the rings alone would need gigabytes per few hundred VIPs.
pub const MAX_TABLE_SIZE: u32 = 1 << 24;

/// The paper's guidance: with fewer than ~100 slots per backend, load imbalance and
/// disruption on backend changes grow noticeably.
pub const MIN_SLOTS_PER_BACKEND: u64 = 100;

/// SipHash keys of the two permutation hashes. Fixed forever: changing them moves every
/// flow on every VIP.
const OFFSET_KEY: (u64, u64) = (0x786c_625f_6d61_676c, 0x6576_5f6f_6666_7365);
const SKIP_KEY: (u64, u64) = (0x786c_625f_6d61_676c, 0x6576_5f73_6b69_7021);

/// One backend as input to [`build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightedBackend {
    /// The backend's address; it alone determines the backend's slot preferences.
    pub address: IpAddr,
    /// Relative share of the slots; 0 = no slots (draining).
    pub weight: u32,
    /// Backend id written into the table (never [`NO_BACKEND`]).
    pub id: u32,
}

/// Why a table could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// M must be prime for every `skip` to generate a full permutation.
    #[error("Maglev table size {0} is not a prime number")]
    NotPrime(u32),
    /// M outside `2..=MAX_TABLE_SIZE`.
    #[error("Maglev table size {0} is out of range (2..={MAX_TABLE_SIZE})")]
    SizeOutOfRange(u32),
    /// Id 0 means "no backend" in the table.
    #[error("backend {0} has the reserved id 0")]
    ReservedId(IpAddr),
    /// An address may appear once: it is the backend's identity.
    #[error("backend {0} is listed twice")]
    DuplicateAddress(IpAddr),
    /// Two addresses mapped to one id would be indistinguishable in the table.
    #[error("backend id {id} is given to both {first} and {second}")]
    DuplicateId {
        /// The shared id.
        id: u32,
        /// One address holding it.
        first: IpAddr,
        /// The other address holding it.
        second: IpAddr,
    },
}

/// Something worth logging about a table that was built anyway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaglevWarning {
    /// Fewer than [`MIN_SLOTS_PER_BACKEND`] slots per backend.
    SmallTable {
        /// The VIP the table belongs to, as named by the caller.
        vip: String,
        /// M.
        table_size: u32,
        /// Backends with a non-zero weight.
        backends: usize,
    },
}

impl fmt::Display for MaglevWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaglevWarning::SmallTable {
                vip,
                table_size,
                backends,
            } => write!(
                f,
                "VIP {vip}: Maglev table size {table_size} is below {MIN_SLOTS_PER_BACKEND} slots \
                 for each of its {backends} backends; expect uneven load and extra flow \
                 movement on backend changes (use a prime of at least {})",
                MIN_SLOTS_PER_BACKEND * *backends as u64
            ),
        }
    }
}

/// A built table and the warnings the caller should log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// `table[slot]` = backend id; all [`NO_BACKEND`] when no backend has a weight.
    pub table: Vec<u32>,
    /// Non-fatal findings (e.g. a table too small for the backend count).
    pub warnings: Vec<MaglevWarning>,
}

/// Whether `n` is prime (trial division: n ≤ 2^32 needs divisors up to 65536 at most).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Checks that `table_size` is usable as M.
pub fn validate_table_size(table_size: u32) -> Result<(), MaglevError> {
    if !(2..=MAX_TABLE_SIZE).contains(&table_size) {
        return Err(MaglevError::SizeOutOfRange(table_size));
    }
    if !is_prime(table_size) {
        return Err(MaglevError::NotPrime(table_size));
    }
    Ok(())
}

/// The open interval `(low, high)` that backend `weight`'s slot count lies in, for a table
/// of `table_size` slots shared by `active_backends` backends of total weight
/// `total_weight` and maximum weight `max_weight` (see the module docs for the proof).
pub fn slot_count_bounds(
    table_size: u32,
    weight: u32,
    max_weight: u32,
    total_weight: u64,
    active_backends: usize,
) -> (f64, f64) {
    if weight == 0 || total_weight == 0 || max_weight == 0 {
        return (-1.0, 1.0); // exactly 0 slots
    }
    let ideal = f64::from(table_size) * f64::from(weight) / total_weight as f64;
    let w_over_max = f64::from(weight) / f64::from(max_weight);
    let low = ideal - w_over_max - 1.0;
    let high = ideal
        + (active_backends as f64 - 1.0) * f64::from(weight) / total_weight as f64
        + w_over_max;
    (low, high)
}

/// Builds the Maglev table of one VIP.
///
/// `vip` only names the VIP in warnings. `backends` may come in any order; the result
/// depends only on the set of (address, weight, id).
pub fn build(
    vip: &str,
    table_size: u32,
    backends: &[WeightedBackend],
) -> Result<MaglevTable, MaglevError> {
    build_with(vip, table_size, backends, Schedule::Auto)
}

/// What [`build`] would report for these inputs — the same error, or the same warnings —
/// without building the table (no `M`-sized allocation): a planner can reject bad inputs
/// and log warnings up front and build the table only when it is written.
pub fn check(
    vip: &str,
    table_size: u32,
    backends: &[WeightedBackend],
) -> Result<Vec<MaglevWarning>, MaglevError> {
    checked(vip, table_size, backends).map(|(_, warnings)| warnings)
}

/// Validates the inputs of a build; returns the backends with a weight, sorted by address,
/// and the warnings. [`build`] and [`check`] share it, so they never disagree.
fn checked(
    vip: &str,
    table_size: u32,
    backends: &[WeightedBackend],
) -> Result<(Vec<WeightedBackend>, Vec<MaglevWarning>), MaglevError> {
    validate_table_size(table_size)?;
    let mut sorted: Vec<WeightedBackend> = backends.to_vec();
    sorted.sort_unstable_by_key(|b| b.address);
    for pair in sorted.windows(2) {
        if pair[0].address == pair[1].address {
            return Err(MaglevError::DuplicateAddress(pair[0].address));
        }
    }
    let mut by_id: Vec<(u32, IpAddr)> = sorted.iter().map(|b| (b.id, b.address)).collect();
    by_id.sort_unstable();
    for pair in by_id.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(MaglevError::DuplicateId {
                id: pair[0].0,
                first: pair[0].1,
                second: pair[1].1,
            });
        }
    }
    if let Some(b) = sorted.iter().find(|b| b.id == NO_BACKEND) {
        return Err(MaglevError::ReservedId(b.address));
    }

    sorted.retain(|b| b.weight > 0);
    let mut warnings = Vec::new();
    if !sorted.is_empty() && u64::from(table_size) < MIN_SLOTS_PER_BACKEND * sorted.len() as u64 {
        warnings.push(MaglevWarning::SmallTable {
            vip: vip.to_owned(),
            table_size,
            backends: sorted.len(),
        });
    }
    Ok((sorted, warnings))
}

/// Turn-order strategies; all give the same order, they differ only in cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schedule {
    /// Pick by the weight distribution.
    Auto,
    /// Visit every backend every round (accumulator per backend).
    Rounds,
    /// Heap keyed by (round of next turn, backend index).
    Heap,
}

fn build_with(
    vip: &str,
    table_size: u32,
    backends: &[WeightedBackend],
    schedule: Schedule,
) -> Result<MaglevTable, MaglevError> {
    let (sorted, warnings) = checked(vip, table_size, backends)?;
    let mut filler = Filler::new(table_size, &sorted);
    if !sorted.is_empty() {
        let max_weight = sorted.iter().map(|b| b.weight).max().unwrap_or(1);
        let total_weight: u64 = sorted.iter().map(|b| u64::from(b.weight)).sum();
        let schedule = match schedule {
            Schedule::Auto => {
                // Visiting every backend each round costs N·W/S visits per turn; a heap
                // costs ~log2 N per turn but each step is several times dearer.
                let visits_per_turn = sorted.len() as u64 * u64::from(max_weight) / total_weight;
                let log_n = u64::from(usize::BITS - sorted.len().leading_zeros());
                if visits_per_turn <= 2 + log_n {
                    Schedule::Rounds
                } else {
                    Schedule::Heap
                }
            }
            explicit => explicit,
        };
        let weights: Vec<u32> = sorted.iter().map(|b| b.weight).collect();
        if schedule == Schedule::Heap {
            fill_heap(&mut filler, &weights, max_weight);
        } else if weights.iter().all(|&w| w == max_weight) {
            fill_round_robin(&mut filler);
        } else {
            fill_rounds(&mut filler, &weights, max_weight);
        }
    }
    Ok(MaglevTable {
        table: filler.table,
        warnings,
    })
}

/// Plain round robin: every backend takes a turn every round (equal weights).
fn fill_round_robin(filler: &mut Filler) {
    let n = filler.perms.len();
    loop {
        for i in 0..n {
            if filler.turn(i) {
                return;
            }
        }
    }
}

/// Rounds with a Bresenham accumulator per backend: backend i turns when its accumulated
/// weight reaches `max_weight`, i.e. ⌊r·w_i/W⌋ turns after r rounds.
fn fill_rounds(filler: &mut Filler, weights: &[u32], max_weight: u32) {
    let max_weight = u64::from(max_weight);
    let mut acc = vec![0u64; weights.len()];
    loop {
        for (i, (acc, &w)) in acc.iter_mut().zip(weights).enumerate() {
            *acc += u64::from(w);
            if *acc >= max_weight {
                *acc -= max_weight;
                if filler.turn(i) {
                    return;
                }
            }
        }
    }
}

/// Same turn order as [`fill_rounds`], without visiting backends that do not turn: the
/// k-th turn of backend i falls in round ⌈k·W/w_i⌉, and ties go in backend order.
fn fill_heap(filler: &mut Filler, weights: &[u32], max_weight: u32) {
    let max_weight = u64::from(max_weight);
    let round_of = |turn: u64, w: u32| (turn * max_weight).div_ceil(u64::from(w));
    let mut turns_taken = vec![0u64; weights.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Reverse((round_of(1, w), i)))
        .collect();
    while let Some(Reverse((_, i))) = heap.pop() {
        if filler.turn(i) {
            return;
        }
        turns_taken[i] += 1;
        heap.push(Reverse((round_of(turns_taken[i] + 1, weights[i]), i)));
    }
}

/// One backend's walk along its permutation.
struct Permutation {
    /// Slot of the backend's next untried preference.
    position: u32,
    skip: u32,
    offset: u32,
    /// `skip⁻¹ mod M`, computed when the endgame starts.
    skip_inverse: u32,
    id: u32,
}

/// The table under construction.
struct Filler {
    size: u32,
    table: Vec<u32>,
    /// Bit s set = slot s taken.
    taken: Vec<u64>,
    remaining: u32,
    /// Switch to the endgame when this few slots are left.
    endgame_at: u32,
    /// Empty slots, once in the endgame.
    empty: Option<Vec<u32>>,
    /// ⌊2^64 / M⌋, for Barrett reduction modulo M in the endgame.
    reciprocal: u64,
    perms: Vec<Permutation>,
}

impl Filler {
    fn new(size: u32, backends: &[WeightedBackend]) -> Self {
        let perms = backends
            .iter()
            .map(|b| {
                let (offset, skip) = offset_and_skip(b.address, size);
                Permutation {
                    position: offset,
                    skip,
                    offset,
                    skip_inverse: 0,
                    id: b.id,
                }
            })
            .collect();
        Filler {
            size,
            table: vec![NO_BACKEND; size as usize],
            taken: vec![0; (size as usize).div_ceil(64)],
            remaining: size,
            // Probing with E slots left costs ~M/E probes per turn, the endgame scan costs E
            // (dearer) steps: break even near E = √M, which also measured best (0.5–1·√M).
            endgame_at: size.isqrt(),
            empty: None,
            reciprocal: u64::MAX / u64::from(size),
            perms,
        }
    }

    /// Backend `i` claims its next preferred empty slot. Returns true when the table is full.
    #[inline]
    fn turn(&mut self, i: usize) -> bool {
        if self.remaining <= self.endgame_at {
            return self.endgame_turn(i);
        }
        let size = self.size;
        let perm = &mut self.perms[i];
        let mut pos = perm.position;
        loop {
            let (word, bit) = ((pos / 64) as usize, 1u64 << (pos % 64));
            let next = pos + perm.skip;
            let next = if next >= size { next - size } else { next };
            if self.taken[word] & bit == 0 {
                self.taken[word] |= bit;
                self.table[pos as usize] = perm.id;
                perm.position = next;
                break;
            }
            pos = next;
        }
        self.remaining -= 1;
        self.remaining == 0
    }

    #[cold]
    fn start_endgame(&mut self) -> Vec<u32> {
        for perm in &mut self.perms {
            perm.skip_inverse = mod_pow(perm.skip, self.size - 2, self.size);
        }
        (0..self.size)
            .filter(|&s| self.taken[(s / 64) as usize] & (1 << (s % 64)) == 0)
            .collect()
    }

    fn endgame_turn(&mut self, i: usize) -> bool {
        let mut empty = match self.empty.take() {
            Some(e) => e,
            None => self.start_endgame(),
        };
        let size = u64::from(self.size);
        let perm = &self.perms[i];
        let (offset, inverse) = (u64::from(perm.offset), u64::from(perm.skip_inverse));
        let reciprocal = self.reciprocal;
        // Position of `slot` in this backend's permutation: slot = offset + j·skip (mod M).
        // The product is below 2^49 (M ≤ 2^24); Barrett reduction avoids a 64-bit division.
        let index_of = |slot: u32| {
            let x = (u64::from(slot) + size - offset) * inverse;
            let quotient = ((u128::from(x) * u128::from(reciprocal)) >> 64) as u64;
            let r = x - quotient * size;
            if r >= size { r - size } else { r }
        };
        let mut best = 0usize;
        let mut best_index = u64::MAX;
        for (k, &slot) in empty.iter().enumerate() {
            let j = index_of(slot);
            if j < best_index {
                best_index = j;
                best = k;
            }
        }
        let slot = empty.swap_remove(best);
        self.table[slot as usize] = perm.id;
        self.taken[(slot / 64) as usize] |= 1 << (slot % 64);
        self.remaining -= 1;
        self.empty = Some(empty);
        self.remaining == 0
    }
}

/// `base^exp mod m` (m < 2^32).
fn mod_pow(base: u32, mut exp: u32, m: u32) -> u32 {
    let m = u64::from(m);
    let mut base = u64::from(base) % m;
    let mut result = 1 % m;
    while exp > 0 {
        if exp & 1 == 1 {
            result = result * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    result as u32
}

/// The bytes a backend's permutation is derived from: family tag, then the address octets.
fn address_bytes(address: IpAddr) -> ([u8; 17], usize) {
    let mut bytes = [0u8; 17];
    match address {
        IpAddr::V4(a) => {
            bytes[0] = lb_common::FAMILY_V4;
            bytes[1..5].copy_from_slice(&a.octets());
            (bytes, 5)
        }
        IpAddr::V6(a) => {
            bytes[0] = lb_common::FAMILY_V6;
            bytes[1..17].copy_from_slice(&a.octets());
            (bytes, 17)
        }
    }
}

/// The paper's `offset` and `skip` of a backend for table size `size` (prime, ≥ 2).
pub fn offset_and_skip(address: IpAddr, size: u32) -> (u32, u32) {
    let (bytes, len) = address_bytes(address);
    let data = &bytes[..len];
    let offset = siphash24(OFFSET_KEY.0, OFFSET_KEY.1, data) % u64::from(size);
    let skip = siphash24(SKIP_KEY.0, SKIP_KEY.1, data) % u64::from(size - 1) + 1;
    (offset as u32, skip as u32)
}

/// SipHash-2-4 (Aumasson & Bernstein), written out so the permutation can never change
/// with a toolchain update.
fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    };
    let (words, tail) = data.as_chunks::<8>();
    for word in words {
        compress(&mut v, u64::from_le_bytes(*word));
    }
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    let last = u64::from_le_bytes(last) | ((data.len() as u64 & 0xff) << 56);
    compress(&mut v, last);
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn equal(n: u32) -> Vec<WeightedBackend> {
        (1..=n)
            .map(|i| WeightedBackend {
                address: v4(i),
                weight: 1,
                id: i,
            })
            .collect()
    }

    fn counts(table: &[u32]) -> BTreeMap<u32, usize> {
        let mut c = BTreeMap::new();
        for &id in table {
            *c.entry(id).or_default() += 1;
        }
        c
    }

    /// The paper's algorithm written as plainly as possible (full permutation arrays, a
    /// per-round accumulator), to check the optimised builder against.
    fn reference(size: u32, backends: &[WeightedBackend]) -> Vec<u32> {
        let mut b: Vec<_> = backends.iter().filter(|b| b.weight > 0).copied().collect();
        b.sort_by_key(|b| b.address);
        let mut table = vec![NO_BACKEND; size as usize];
        if b.is_empty() {
            return table;
        }
        let perms: Vec<Vec<u32>> = b
            .iter()
            .map(|b| {
                let (offset, skip) = offset_and_skip(b.address, size);
                (0..size as u64)
                    .map(|j| ((offset as u64 + j * skip as u64) % size as u64) as u32)
                    .collect()
            })
            .collect();
        let max = b.iter().map(|b| b.weight).max().unwrap() as u64;
        let mut acc = vec![0u64; b.len()];
        let mut next = vec![0usize; b.len()];
        let mut filled = 0;
        loop {
            for i in 0..b.len() {
                acc[i] += b[i].weight as u64;
                if acc[i] < max {
                    continue;
                }
                acc[i] -= max;
                let mut slot = perms[i][next[i]];
                while table[slot as usize] != NO_BACKEND {
                    next[i] += 1;
                    slot = perms[i][next[i]];
                }
                table[slot as usize] = b[i].id;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    return table;
                }
            }
        }
    }

    fn random_backends(rng: &mut StdRng, n: usize, max_weight: u32) -> Vec<WeightedBackend> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        while out.len() < n {
            let address = if rng.random_bool(0.3) {
                IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
            };
            if seen.insert(address) {
                out.push(WeightedBackend {
                    address,
                    weight: rng.random_range(0..=max_weight),
                    id: out.len() as u32 + 1,
                });
            }
        }
        out
    }

    #[test]
    fn siphash_matches_reference() {
        // std's (deprecated, but still SipHash-2-4) implementation as an independent oracle.
        #[allow(deprecated)]
        fn std_sip(k0: u64, k1: u64, data: &[u8]) -> u64 {
            use std::hash::Hasher;
            let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
            h.write(data);
            h.finish()
        }
        let key0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let key1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        // Published vector: key 00..0f, empty message.
        assert_eq!(siphash24(key0, key1, &[]), 0x726f_db47_dd0e_0e31);
        let data: Vec<u8> = (0..40).collect();
        for len in 0..data.len() {
            assert_eq!(
                siphash24(key0, key1, &data[..len]),
                std_sip(key0, key1, &data[..len])
            );
        }
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537));
        assert!(is_prime(655_373));
        assert!(!is_prime(65_536));
        assert!(!is_prime(65_535));
        assert!(is_prime(4_294_967_291)); // largest 32-bit prime
        assert!(!is_prime(4_294_967_295));
    }

    #[test]
    fn table_size_is_validated() {
        assert_eq!(
            build("v", 65_536, &equal(3)),
            Err(MaglevError::NotPrime(65_536))
        );
        assert_eq!(
            build("v", 1, &equal(3)),
            Err(MaglevError::SizeOutOfRange(1))
        );
        assert_eq!(
            build("v", 16_777_259, &equal(3)),
            Err(MaglevError::SizeOutOfRange(16_777_259))
        );
    }

    #[test]
    fn bad_backend_lists_are_rejected() {
        let mut b = equal(3);
        b[2].address = b[0].address;
        assert_eq!(
            build("v", 13, &b),
            Err(MaglevError::DuplicateAddress(v4(1)))
        );
        let mut b = equal(3);
        b[2].id = 1;
        assert!(matches!(
            build("v", 13, &b),
            Err(MaglevError::DuplicateId { id: 1, .. })
        ));
        let mut b = equal(3);
        b[1].id = 0;
        assert_eq!(build("v", 13, &b), Err(MaglevError::ReservedId(v4(2))));
    }

    #[test]
    fn small_table_warns_naming_the_vip() {
        let built = build("web 192.0.2.10:80/tcp", 251, &equal(3)).unwrap();
        assert_eq!(built.warnings.len(), 1);
        let text = built.warnings[0].to_string();
        assert!(text.starts_with("VIP web 192.0.2.10:80/tcp: "), "{text}");
        assert!(text.contains("300"), "{text}");
        assert!(build("v", 307, &equal(3)).unwrap().warnings.is_empty());
        // Draining backends do not count.
        let mut b = equal(4);
        b[3].weight = 0;
        assert!(build("v", 307, &b).unwrap().warnings.is_empty());
    }

    /// `check` gives what `build` gives — the error or the warnings — for good and bad
    /// inputs alike (the planner relies on it: it checks when planning, builds when writing).
    #[test]
    fn check_agrees_with_build() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut outcomes = std::collections::BTreeSet::new();
        for case in 0..400 {
            let size = [250, 13, 251, 1_009][case % 4];
            let n = rng.random_range(0..12);
            let mut backends = random_backends(&mut rng, n, 3);
            if n > 1 {
                match rng.random_range(0..6) {
                    0 => backends[n - 1].id = 0,
                    1 => backends[n - 1].id = backends[0].id,
                    2 => backends[n - 1].address = backends[0].address,
                    _ => {}
                }
            }
            let built = build("v", size, &backends).map(|b| b.warnings);
            let checked = check("v", size, &backends);
            assert_eq!(checked, built, "case {case}");
            outcomes.insert(match &checked {
                Ok(w) => format!("ok {}", w.len()),
                Err(e) => format!("{e:?}")
                    .split(['(', ' '])
                    .next()
                    .unwrap()
                    .to_owned(),
            });
        }
        // Every kind of outcome came up: errors of each kind, warnings and none.
        assert!(outcomes.len() >= 6, "{outcomes:?}");
    }

    #[test]
    fn no_weighted_backend_gives_an_empty_table() {
        assert_eq!(build("v", 13, &[]).unwrap().table, vec![NO_BACKEND; 13]);
        let mut b = equal(2);
        b[0].weight = 0;
        b[1].weight = 0;
        assert_eq!(build("v", 13, &b).unwrap().table, vec![NO_BACKEND; 13]);
    }

    #[test]
    fn matches_reference_for_every_schedule() {
        let mut rng = StdRng::seed_from_u64(1);
        for case in 0..60 {
            let size = [2, 3, 13, 251, 1_009, 4_099][case % 6];
            let n = rng.random_range(1..20);
            let max_weight = [1, 3, 100, u32::MAX][case % 4];
            let backends = random_backends(&mut rng, n, max_weight);
            let expected = reference(size, &backends);
            for schedule in [Schedule::Auto, Schedule::Rounds, Schedule::Heap] {
                let built = build_with("v", size, &backends, schedule).unwrap();
                assert_eq!(built.table, expected, "case {case} {schedule:?}");
            }
        }
    }

    #[test]
    fn slot_counts_stay_within_the_derived_bound() {
        let mut rng = StdRng::seed_from_u64(2);
        for case in 0..40 {
            let size = [65_537, 10_007, 1_009][case % 3];
            let n = rng.random_range(1..60);
            let max_weight = [1, 2, 10, 1_000][case % 4];
            let backends = random_backends(&mut rng, n, max_weight);
            let table = build("v", size, &backends).unwrap().table;
            let counts = counts(&table);
            let active: Vec<_> = backends.iter().filter(|b| b.weight > 0).collect();
            let max = active.iter().map(|b| b.weight).max().unwrap_or(0);
            let total: u64 = active.iter().map(|b| u64::from(b.weight)).sum();
            for b in &backends {
                let got = counts.get(&b.id).copied().unwrap_or(0) as f64;
                let (low, high) = slot_count_bounds(size, b.weight, max, total, active.len());
                assert!(
                    low < got && got < high,
                    "case {case}: backend weight {} got {got} slots, bound ({low}, {high})",
                    b.weight
                );
            }
            if active.is_empty() {
                assert!(table.iter().all(|&id| id == NO_BACKEND));
            } else {
                assert!(table.iter().all(|&id| id != NO_BACKEND));
            }
        }
    }

    #[test]
    fn equal_weights_differ_by_at_most_one_slot() {
        let table = build("v", 65_537, &equal(100)).unwrap().table;
        let c = counts(&table);
        assert_eq!(c.len(), 100);
        let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
        assert!(max - min <= 1, "{min}..{max}");
    }

    #[test]
    fn weight_zero_gets_no_slots() {
        let mut b = equal(5);
        b[2].weight = 0;
        let table = build("v", 10_007, &b).unwrap().table;
        assert!(!table.contains(&3));
        assert_eq!(counts(&table).len(), 4);
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..10 {
            let mut backends = random_backends(&mut rng, 30, 5);
            let first = build("v", 10_007, &backends).unwrap().table;
            backends.shuffle(&mut rng);
            assert_eq!(build("v", 10_007, &backends).unwrap().table, first);
        }
    }

    #[test]
    fn removing_a_backend_moves_about_one_nth_and_adding_it_back_restores() {
        let mut worst = 0.0f64;
        for n in [5u32, 10, 50, 100] {
            let size = 65_537;
            let all = equal(n);
            let before = build("v", size, &all).unwrap().table;
            for removed in [1, n / 2 + 1, n] {
                let rest: Vec<_> = all.iter().filter(|b| b.id != removed).copied().collect();
                let after = build("v", size, &rest).unwrap().table;
                let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                // Slots of the removed backend must move; anything else is disruption.
                let owned = before.iter().filter(|&&id| id == removed).count();
                let fraction = moved as f64 / f64::from(size);
                let ideal = 1.0 / f64::from(n);
                println!(
                    "N={n}: removing backend {removed} moved {moved} slots ({:.3}%, ideal {:.3}%, \
                     {owned} owned)",
                    fraction * 100.0,
                    ideal * 100.0
                );
                assert!(moved >= owned);
                // Maglev trades a little disruption for balance (the paper's Fig. 10); at
                // M ≥ 650·N we measure at most ~1.6× the ideal 1/N.
                assert!(fraction <= 1.75 * ideal, "N={n}: {fraction}");
                worst = worst.max(fraction / ideal);
                let mut back = rest.clone();
                back.push(all[(removed - 1) as usize]);
                assert_eq!(build("v", size, &back).unwrap().table, before);
            }
        }
        println!("worst moved/ideal ratio: {worst:.3}");
    }

    #[test]
    fn weights_shift_share_proportionally() {
        let mut b = equal(4);
        b[0].weight = 3; // 3 : 1 : 1 : 1
        let table = build("v", 60_013, &b).unwrap().table;
        let c = counts(&table);
        let heavy = c[&1] as f64;
        let light = c[&2] as f64;
        assert!((heavy / light - 3.0).abs() < 0.01, "{heavy} vs {light}");
    }
}
