//! What the agent applied, in two forms:
//!
//! * [`rebuild_applied`] reconstructs the planner's [`AppliedState`] from the pinned maps
//!   themselves when an agent starts on a running datapath. The maps are the truth (a
//!   previous agent may have died in the middle of an apply), so ids, active rings and
//!   address counts are read back, never guessed.
//! * [`PersistedState`] is the metadata the maps do not hold (VIP names, weights, backend
//!   states), written as JSON after every apply for the CLI. bpffs holds no regular files,
//!   so the file lives in a state directory (default [`DEFAULT_STATE_DIR`]) and a symlink
//!   named [`datapath::STATE_LINK_NAME`] in the pin directory points at it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lb_common::{Backend, VipInfo, VipKey};
use serde::{Deserialize, Serialize};

use crate::datapath::{self, DatapathError, Maps};
use crate::model::{BackendState, DesiredState, Protocol, VipSpec};
use crate::plan::{AppliedState, Limits, MapOp, RingTable};

/// Default directory of the state files.
pub const DEFAULT_STATE_DIR: &str = "/run/xlb";

/// Errors reading the maps back or reading/writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A map could not be read.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The pinned maps hold something no agent writes.
    #[error("pinned maps are inconsistent ({0}); remove them with `xlb unload`")]
    Inconsistent(String),
    /// The state file could not be written or read.
    #[error("state file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Rebuilds the planner's mirror of the maps from the maps.
///
/// Ids in use are recorded as such; unused ids below the highest one in use go to the free
/// lists, so they are reused (the planner reuses freed ids after never-used ones). Only the
/// *active* ring of each VIP is recorded: the planner always writes a changed table into
/// the other (idle) ring and flips `VipInfo.ring`, so whatever the idle ring holds —
/// possibly a half-written table of a crashed apply — is never read by a packet before it
/// has been rewritten whole. The manager additionally waits an RCU grace period before
/// writing any ring (see [`crate::manager`]), which also covers a ring retired by a
/// previous agent's flip just before it exited.
pub fn rebuild_applied(maps: &Maps, limits: Limits) -> Result<AppliedState, StateError> {
    let mut applied = AppliedState::new(limits);
    let rings = maps.maglev.rings();
    if maps.maglev.table_size() != limits.table_size || rings != 2 * limits.max_vips {
        return Err(StateError::Inconsistent(format!(
            "the pinned Maglev map holds {rings} rings of {}; the config wants {} rings of {} \
             (maglev_table_size or max_vips changed)",
            maps.maglev.table_size(),
            2 * limits.max_vips,
            limits.table_size
        )));
    }

    let backends = maps.backend_entries()?;
    for (id, backend) in &backends {
        if *id == lb_common::NO_BACKEND || *id >= limits.max_backends {
            return Err(StateError::Inconsistent(format!(
                "backend id {id} outside 1..{}",
                limits.max_backends
            )));
        }
        applied.record(&MapOp::SetBackend {
            id: *id,
            backend: *backend,
        });
    }

    let vips = maps.vip_entries()?;
    for (key, info) in &vips {
        if info.vip_id >= limits.max_vips || info.ring / 2 != info.vip_id {
            return Err(StateError::Inconsistent(format!(
                "VIP id {} with ring {} (max_vips {})",
                info.vip_id, info.ring, limits.max_vips
            )));
        }
        let table = maps.maglev.read_ring(info.ring)?;
        applied.record(&MapOp::WriteRing {
            ring: info.ring,
            table: RingTable::Ready(table.into()),
        });
        applied.record(&MapOp::SetVip {
            key: *key,
            info: *info,
        });
    }
    record_id_holes(
        &mut applied,
        backends.iter().map(|(id, _)| *id),
        vips.iter().map(|(_, info)| info.vip_id),
    );

    for (key, vip_count) in maps.vip_addr_entries()? {
        applied.record(&MapOp::SetVipAddr { key, vip_count });
    }
    Ok(applied)
}

/// Puts the unused ids below the highest one in use of each kind (`backend_ids`,
/// `vip_ids`: those in use, already recorded) on the free lists, lowest first. Recorded as
/// set then removed, the planner's only way into its free lists: all sets first, while the
/// free lists are still empty (a set scans them), then all removals, so that this is linear
/// in the ids, not quadratic (100,000 backends would take ~10^10 steps).
fn record_id_holes(
    applied: &mut AppliedState,
    backend_ids: impl Iterator<Item = u32>,
    vip_ids: impl Iterator<Item = u32>,
) {
    /// The ids below the highest of `used` that are not in it, ascending, from `first`.
    fn holes(used: impl Iterator<Item = u32>, first: u32) -> Vec<u32> {
        let mut used: Vec<u32> = used.collect();
        used.sort_unstable();
        used.dedup();
        let Some(&highest) = used.last() else {
            return Vec::new();
        };
        let mut used = used.into_iter().peekable();
        (first..highest)
            .filter(|id| {
                while used.next_if(|u| u < id).is_some() {}
                used.peek() != Some(id)
            })
            .collect()
    }

    let backend_holes = holes(backend_ids, 1);
    for &hole in &backend_holes {
        applied.record(&MapOp::SetBackend {
            id: hole,
            backend: Backend::default(),
        });
    }
    for &hole in &backend_holes {
        applied.record(&MapOp::RemoveBackend { id: hole });
    }

    let placeholder = |hole: u32| VipKey {
        addr_be: [u32::MAX, hole, 0, 0],
        port_be: 0,
        proto: 0,
        family: 0,
    };
    let vip_holes = holes(vip_ids, 0);
    for &hole in &vip_holes {
        applied.record(&MapOp::SetVip {
            key: placeholder(hole),
            info: VipInfo {
                vip_id: hole,
                ring: 2 * hole,
                flags: 0,
                _pad: 0,
            },
        });
    }
    for &hole in &vip_holes {
        applied.record(&MapOp::RemoveVip {
            key: placeholder(hole),
        });
    }
}

/// One backend of a VIP as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedBackend {
    /// Address.
    pub address: IpAddr,
    /// Backend id in the maps.
    pub id: u32,
    /// Configured weight.
    pub weight: u32,
    /// Active or draining.
    pub state: BackendState,
}

/// One VIP as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedVip {
    /// Name.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Port (0 = any).
    pub port: u16,
    /// Hash on the client address only.
    pub source_affinity: bool,
    /// VIP id in the maps.
    pub vip_id: u32,
    /// Backends.
    pub backends: Vec<PersistedBackend>,
}

/// The agent's last successful apply, for the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// Format version.
    pub version: u32,
    /// When it was written (Unix milliseconds).
    pub written_unix_ms: u64,
    /// The config file the agent serves, if any.
    pub config_path: Option<PathBuf>,
    /// Maglev table size.
    pub table_size: u32,
    /// The VIPs (shared with the [`Describer`] that reuses unchanged ones).
    pub vips: Vec<Arc<PersistedVip>>,
}

impl PersistedState {
    /// Describes `desired` with the ids of `applied`.
    pub fn describe(
        desired: &DesiredState,
        applied: &AppliedState,
        config_path: Option<&Path>,
    ) -> PersistedState {
        Describer::default().describe(desired, applied, config_path)
    }
}

/// Describes successive desired states, reusing the description of every VIP whose spec is
/// the very same `Arc` as last time with the same VIP id: the agent describes after every
/// apply, and with 10,000 VIPs a full description (100,000 backend-id lookups) cost more
/// than the one-endpoint change it followed.
///
/// Reuse is sound because an unchanged spec means unchanged backend ids: a backend keeps
/// its id while any VIP lists its address, and this one does. A description holding a
/// backend without an id (a failed apply) is never reused.
#[derive(Default)]
pub struct Describer {
    last: std::collections::HashMap<crate::model::ServiceKey, (Arc<VipSpec>, Arc<PersistedVip>)>,
}

impl Describer {
    /// Describes `desired` with the ids of `applied`.
    pub fn describe(
        &mut self,
        desired: &DesiredState,
        applied: &AppliedState,
        config_path: Option<&Path>,
    ) -> PersistedState {
        let mut next = std::collections::HashMap::with_capacity(desired.vips.len());
        let vips = desired
            .vips
            .iter()
            .filter_map(|vip| {
                let info = applied.vip(&vip.key.to_map_key())?;
                let described = match self.last.get(&vip.key) {
                    Some((spec, described))
                        if Arc::ptr_eq(spec, vip) && described.vip_id == info.vip_id =>
                    {
                        described.clone()
                    }
                    _ => Arc::new(describe_vip(vip, info.vip_id, applied)),
                };
                if described.backends.iter().all(|b| b.id != 0) {
                    next.insert(vip.key, (vip.clone(), described.clone()));
                }
                Some(described)
            })
            .collect();
        self.last = next;
        PersistedState {
            version: 1,
            written_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            config_path: config_path.map(Path::to_path_buf),
            table_size: applied.limits().table_size,
            vips,
        }
    }
}

fn describe_vip(vip: &VipSpec, vip_id: u32, applied: &AppliedState) -> PersistedVip {
    PersistedVip {
        name: vip.name.clone(),
        address: vip.key.address,
        protocol: vip.key.protocol,
        port: vip.key.port,
        source_affinity: vip.source_affinity,
        vip_id,
        backends: vip
            .backends
            .iter()
            .map(|b| PersistedBackend {
                address: b.address,
                id: applied.backend_id(b.address).unwrap_or(0),
                weight: b.weight,
                state: b.state,
            })
            .collect(),
    }
}

/// The state file of a pin directory: one file per pin directory in `state_dir`, named
/// after the pin directory's path.
pub fn state_file_for(pin_dir: &Path, state_dir: &Path) -> PathBuf {
    let flat: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    state_dir.join(format!("{flat}.json"))
}

fn file_err(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |e| StateError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes the state atomically (temporary file, then rename) and points the pin
/// directory's symlink at it.
pub fn write(pin_dir: &Path, state_dir: &Path, state: &PersistedState) -> Result<(), StateError> {
    let path = state_file_for(pin_dir, state_dir);
    std::fs::create_dir_all(state_dir).map_err(file_err(state_dir))?;
    let tmp = path.with_extension("json.tmp");
    // Compact: with 100,000 backends the pretty form is twice the bytes and the time, on
    // a thread that shares the node's cores with the change path (`jq .` reads it well).
    // Streamed to the file: with 100,000 backends the text is ~10 MB, which a buffer
    // growing to it would hold (twice, while it doubles) at the agent's busiest moment.
    let file = std::fs::File::create(&tmp).map_err(file_err(&tmp))?;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
    serde_json::to_writer(&mut out, state).map_err(|e| StateError::File {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    std::io::Write::flush(&mut out).map_err(file_err(&tmp))?;
    drop(out);
    std::fs::rename(&tmp, &path).map_err(file_err(&path))?;
    let link = pin_dir.join(datapath::STATE_LINK_NAME);
    if std::fs::read_link(&link).ok().as_deref() != Some(path.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&path, &link).map_err(file_err(&link))?;
    }
    Ok(())
}

/// Reads the state the pin directory's symlink points at; `None` if there is none.
pub fn read(pin_dir: &Path) -> Result<Option<PersistedState>, StateError> {
    let link = pin_dir.join(datapath::STATE_LINK_NAME);
    let text = match std::fs::read(&link) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err(&link)(e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| StateError::File {
            path: link,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The applied state with backends `backend_ids` and VIPs `vip_ids` in use, as
    /// `rebuild_applied` records them before the holes.
    fn in_use(backend_ids: &[u32], vip_ids: &[u32]) -> AppliedState {
        let mut applied = AppliedState::new(Limits {
            table_size: 13,
            max_vips: 1 << 20,
            max_backends: 1 << 20,
        });
        for &id in backend_ids {
            let (addr_be, family) = crate::model::address_words(IpAddr::from([10, 0, 0, 0]));
            let mut addr_be = addr_be;
            addr_be[0] ^= id; // a distinct address per id
            applied.record(&MapOp::SetBackend {
                id,
                backend: Backend {
                    addr_be,
                    family,
                    _pad: [0; 3],
                },
            });
        }
        for &vip_id in vip_ids {
            applied.record(&MapOp::WriteRing {
                ring: 2 * vip_id + 1,
                table: RingTable::Ready(vec![1; 13].into()),
            });
            applied.record(&MapOp::SetVip {
                key: VipKey {
                    addr_be: [vip_id, 0, 0, 0],
                    port_be: 80,
                    proto: 6,
                    family: lb_common::FAMILY_V4,
                },
                info: VipInfo {
                    vip_id,
                    ring: 2 * vip_id + 1,
                    flags: 0,
                    _pad: 0,
                },
            });
        }
        applied
    }

    /// The quadratic loops `rebuild_applied` had before: the reference for the free lists.
    fn record_id_holes_quadratic(applied: &mut AppliedState, backends: &[u32], vips: &[u32]) {
        let highest_backend = backends.iter().copied().max().unwrap_or(0);
        for hole in 1..highest_backend {
            if !backends.contains(&hole) {
                applied.record(&MapOp::SetBackend {
                    id: hole,
                    backend: Backend::default(),
                });
                applied.record(&MapOp::RemoveBackend { id: hole });
            }
        }
        if let Some(highest) = vips.iter().copied().max() {
            for hole in 0..highest {
                if !vips.contains(&hole) {
                    let placeholder = VipKey {
                        addr_be: [u32::MAX, hole, 0, 0],
                        port_be: 0,
                        proto: 0,
                        family: 0,
                    };
                    applied.record(&MapOp::SetVip {
                        key: placeholder,
                        info: VipInfo {
                            vip_id: hole,
                            ring: 2 * hole,
                            flags: 0,
                            _pad: 0,
                        },
                    });
                    applied.record(&MapOp::RemoveVip { key: placeholder });
                }
            }
        }
    }

    /// Ids in use as the maps list them (any order), with holes anywhere: the same state as
    /// the old quadratic loops — the same free lists in the same order, so the next plan
    /// hands out the same ids.
    #[test]
    fn id_holes_are_freed_as_before() {
        use rand::rngs::StdRng;
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        let mut cases: Vec<(Vec<u32>, Vec<u32>)> = vec![
            (vec![], vec![]),
            (vec![1], vec![0]),
            (vec![5], vec![4]),
            (vec![3, 1, 2], vec![2, 0, 1]),
        ];
        for _ in 0..50 {
            let density = rng.random_range(0.05..1.0);
            let mut backends: Vec<u32> = (1..rng.random_range(1..300))
                .filter(|_| rng.random_bool(density))
                .collect();
            let mut vips: Vec<u32> = (0..rng.random_range(0..150))
                .filter(|_| rng.random_bool(density))
                .collect();
            backends.shuffle(&mut rng);
            vips.shuffle(&mut rng);
            cases.push((backends, vips));
        }
        let mut with_holes = 0;
        for (backends, vips) in cases {
            let mut expected = in_use(&backends, &vips);
            record_id_holes_quadratic(&mut expected, &backends, &vips);
            let mut got = in_use(&backends, &vips);
            record_id_holes(&mut got, backends.iter().copied(), vips.iter().copied());
            assert_eq!(got, expected, "backends {backends:?} vips {vips:?}");
            if got != in_use(&backends, &vips) {
                with_holes += 1;
            }
        }
        assert!(with_holes > 40, "the cases have holes: {with_holes}");
    }

    /// 200,000 backend ids and 100,000 VIP ids, every other one in use: linear, where the
    /// old loops took ~10^10 steps.
    #[test]
    fn many_id_holes_are_freed_quickly() {
        let backends: Vec<u32> = (1..200_000).filter(|id| id % 2 == 0).rev().collect();
        let vips: Vec<u32> = (0..100_000).filter(|id| id % 2 == 1).collect();
        let mut applied = in_use(&backends, &vips);
        let started = std::time::Instant::now();
        record_id_holes(&mut applied, backends.iter().copied(), vips.iter().copied());
        let elapsed = started.elapsed();
        assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    fn state_file_name_flattens_the_pin_dir() {
        assert_eq!(
            state_file_for(Path::new("/sys/fs/bpf/xlb"), Path::new("/run/xlb")),
            PathBuf::from("/run/xlb/sys_fs_bpf_xlb.json")
        );
    }

    #[test]
    fn persisted_state_round_trips_through_json() {
        let state = PersistedState {
            version: 1,
            written_unix_ms: 5,
            config_path: Some("/etc/xlb.toml".into()),
            table_size: 251,
            vips: vec![Arc::new(PersistedVip {
                name: "web".into(),
                address: "192.0.2.10".parse().unwrap(),
                protocol: Protocol::Udp,
                port: 53,
                source_affinity: true,
                vip_id: 3,
                backends: vec![PersistedBackend {
                    address: "2001:db8::1".parse().unwrap(),
                    id: 7,
                    weight: 2,
                    state: BackendState::Draining,
                }],
            })],
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.contains("\"draining\""), "{text}");
        assert_eq!(
            serde_json::from_str::<PersistedState>(&text).unwrap(),
            state
        );
    }
}
