//! The operator CLI: reads the pinned maps directly (works with the agent stopped) plus
//! the agent's state file for what the maps do not hold (names, weights, states).
//!
//! Every command returns its output as text (a table, or JSON with `-o json`) so the
//! binary only prints it and the tests can parse it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use lb_common::{FAMILY_V4, FlowKey, FlowState, VIP_F_HASH_SRC_ONLY, VipInfo, VipKey};
use serde::Serialize;
use serde_json::json;

use crate::config::Config;
use crate::datapath::{DatapathError, Maps};
use crate::maglev::{self, WeightedBackend};
use crate::model::{Protocol, ServiceKey};
use crate::state::{self, PersistedState, PersistedVip, StateError};

/// Why a command failed; each is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No pins.
    #[error("no xlb datapath is pinned at {0} (is the agent running? pass --pin-dir)")]
    NotPinned(PathBuf),
    /// Not allowed to open the pins.
    #[error("permission denied opening the pinned maps at {0}: run as root (needs CAP_BPF)")]
    NotRoot(PathBuf),
    /// A map could not be read.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The state file is unreadable.
    #[error(transparent)]
    State(#[from] StateError),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A config given to `maglev diff` is invalid.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// The pinned maps and the agent's state file of one pin directory.
pub struct Pinned {
    /// Map handles.
    pub maps: Maps,
    /// The agent's last state, if it wrote one.
    pub state: Option<PersistedState>,
}

/// Opens the pins of `pin_dir` with a clear error for the usual failures.
pub fn open(pin_dir: &Path) -> Result<Pinned, CliError> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let probe = pin_dir.join(lb_common::map_names::VIPS);
    match std::fs::symlink_metadata(&probe) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(CliError::NotRoot(pin_dir.into()));
        }
        Err(_) if !root && !pin_dir.exists() => {
            // /sys/fs/bpf is usually not listable by other users either.
            return Err(CliError::NotPinned(pin_dir.into()));
        }
        Err(_) => return Err(CliError::NotPinned(pin_dir.into())),
    }
    let maps = Maps::open_pinned(pin_dir).map_err(|e| {
        if !root {
            CliError::NotRoot(pin_dir.into())
        } else {
            CliError::Datapath(e)
        }
    })?;
    let state = state::read(pin_dir)?;
    Ok(Pinned { maps, state })
}

fn key_service(key: &VipKey) -> ServiceKey {
    ServiceKey {
        address: words_address(&key.addr_be, key.family),
        protocol: if key.proto == lb_common::PROTO_UDP {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
        port: u16::from_be(key.port_be),
    }
}

fn words_address(words: &[u32; 4], family: u8) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    if family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

fn persisted_for<'a>(
    state: &'a Option<PersistedState>,
    service: &ServiceKey,
) -> Option<&'a PersistedVip> {
    state
        .as_ref()?
        .vips
        .iter()
        .find(|v| {
            v.address == service.address && v.protocol == service.protocol && v.port == service.port
        })
        .map(|v| &**v)
}

/// One backend row.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BackendRow {
    /// Address.
    pub address: IpAddr,
    /// Backend id.
    pub id: u32,
    /// Configured weight (from the state file; null without one).
    pub weight: Option<u32>,
    /// `active` / `draining` (from the state file).
    pub state: Option<String>,
    /// Slots in the VIP's live table.
    pub slots: u32,
    /// Share of the table in percent.
    pub share_percent: f64,
    /// Packets sent to the backend (all VIPs).
    pub packets: u64,
    /// Bytes sent to the backend (all VIPs).
    pub bytes: u64,
}

/// One VIP row.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VipRow {
    /// Name (the service key without a state file).
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// `tcp`/`udp`.
    pub protocol: Protocol,
    /// Port; 0 = any.
    pub port: u16,
    /// Forwarding mode.
    pub mode: String,
    /// Hash on the client address only.
    pub source_affinity: bool,
    /// VIP id.
    pub vip_id: u32,
    /// Live ring.
    pub ring: u32,
    /// Backends with slots.
    pub backends_active: usize,
    /// Backends configured (active + draining).
    pub backends_total: usize,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// New connections.
    pub new_connections: u64,
    /// The backends.
    pub backends: Vec<BackendRow>,
}

fn vip_row(pinned: &Pinned, key: &VipKey, info: &VipInfo) -> Result<VipRow, CliError> {
    let maps = &pinned.maps;
    let service = key_service(key);
    let persisted = persisted_for(&pinned.state, &service);
    let table = maps.maglev.read_ring(info.ring)?;
    let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
    for id in &table {
        if *id != lb_common::NO_BACKEND {
            *slots.entry(*id).or_default() += 1;
        }
    }
    let backend_entries: BTreeMap<u32, IpAddr> = maps
        .backend_entries()?
        .into_iter()
        .map(|(id, b)| (id, words_address(&b.addr_be, b.family)))
        .collect();
    let mut ids: BTreeSet<u32> = slots.keys().copied().collect();
    if let Some(p) = persisted {
        ids.extend(p.backends.iter().map(|b| b.id));
    }
    let mut backends = Vec::new();
    for id in ids {
        let Some(address) = backend_entries.get(&id).copied() else {
            continue;
        };
        let configured = persisted.and_then(|p| p.backends.iter().find(|b| b.id == id));
        let stats = maps.backend_stats(id)?;
        let count = slots.get(&id).copied().unwrap_or(0);
        backends.push(BackendRow {
            address,
            id,
            weight: configured.map(|b| b.weight),
            state: configured.map(|b| format!("{:?}", b.state).to_lowercase()),
            slots: count,
            share_percent: 100.0 * f64::from(count) / table.len().max(1) as f64,
            packets: stats.packets,
            bytes: stats.bytes,
        });
    }
    let stats = maps.vip_stats(info.vip_id)?;
    Ok(VipRow {
        name: persisted.map_or_else(|| service.to_string(), |p| p.name.clone()),
        address: service.address,
        protocol: service.protocol,
        port: service.port,
        mode: "encap".into(),
        source_affinity: info.flags & VIP_F_HASH_SRC_ONLY != 0,
        vip_id: info.vip_id,
        ring: info.ring,
        backends_active: slots.len(),
        backends_total: backends.len(),
        packets: stats.packets,
        bytes: stats.bytes,
        new_connections: stats.new_conns,
        backends,
    })
}

/// Every VIP, by id.
pub fn vip_rows(pinned: &Pinned) -> Result<Vec<VipRow>, CliError> {
    let mut entries = pinned.maps.vip_entries()?;
    entries.sort_by_key(|(_, info)| info.vip_id);
    entries
        .iter()
        .map(|(key, info)| vip_row(pinned, key, info))
        .collect()
}

/// Renders rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
    out
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// `xlb vips`.
pub fn vips(pinned: &Pinned, output: Output) -> Result<String, CliError> {
    let rows = vip_rows(pinned)?;
    Ok(match output {
        Output::Json => to_json(&rows),
        Output::Table => table(
            &[
                "NAME",
                "VIP",
                "MODE",
                "BACKENDS",
                "PACKETS",
                "BYTES",
                "NEW CONNS",
            ],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        ServiceKey {
                            address: r.address,
                            protocol: r.protocol,
                            port: r.port,
                        }
                        .to_string(),
                        r.mode.clone(),
                        format!("{}/{}", r.backends_active, r.backends_total),
                        r.packets.to_string(),
                        r.bytes.to_string(),
                        r.new_connections.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    })
}

/// Finds a VIP by name, by `address:port/proto`, or by address if only one VIP has it.
pub fn select_vip<'a>(rows: &'a [VipRow], selector: &str) -> Result<&'a VipRow, CliError> {
    let by_name: Vec<&VipRow> = rows
        .iter()
        .filter(|r| {
            r.name == selector
                || ServiceKey {
                    address: r.address,
                    protocol: r.protocol,
                    port: r.port,
                }
                .to_string()
                    == selector
        })
        .collect();
    if let [row] = by_name.as_slice() {
        return Ok(row);
    }
    if let Ok(address) = selector.trim_matches(['[', ']']).parse::<IpAddr>() {
        let by_address: Vec<&VipRow> = rows.iter().filter(|r| r.address == address).collect();
        match by_address.as_slice() {
            [row] => return Ok(row),
            [] => {}
            many => {
                return Err(CliError::Usage(format!(
                    "{selector} carries {} VIPs; name one: {}",
                    many.len(),
                    many.iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Err(CliError::Usage(format!(
        "no VIP named {selector} (try `xlb vips`)"
    )))
}

/// `xlb backends VIP`.
pub fn backends(pinned: &Pinned, selector: &str, output: Output) -> Result<String, CliError> {
    let rows = vip_rows(pinned)?;
    let vip = select_vip(&rows, selector)?;
    Ok(match output {
        Output::Json => to_json(&vip.backends),
        Output::Table => table(
            &[
                "BACKEND", "ID", "WEIGHT", "STATE", "SLOTS", "SHARE", "PACKETS", "BYTES",
            ],
            &vip.backends
                .iter()
                .map(|b| {
                    vec![
                        b.address.to_string(),
                        b.id.to_string(),
                        b.weight.map_or("-".into(), |w| w.to_string()),
                        b.state.clone().unwrap_or_else(|| "-".into()),
                        b.slots.to_string(),
                        format!("{:.2}%", b.share_percent),
                        b.packets.to_string(),
                        b.bytes.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    })
}

/// `xlb stats`.
pub fn stats(pinned: &Pinned, output: Output) -> Result<String, CliError> {
    let stats = pinned.maps.stats()?;
    let decap = pinned.maps.decap_stats()?;
    let entries = pinned.maps.conntrack_count();
    Ok(match output {
        Output::Json => {
            let balancer: serde_json::Map<String, serde_json::Value> = stats
                .fields()
                .iter()
                .map(|(n, v)| ((*n).to_owned(), json!(v)))
                .collect();
            let decap: serde_json::Map<String, serde_json::Value> = decap
                .fields()
                .iter()
                .map(|(n, v)| ((*n).to_owned(), json!(v)))
                .collect();
            to_json(&json!({
                "balancer": balancer,
                "decap": decap,
                "conntrack_entries": entries,
            }))
        }
        Output::Table => {
            let mut rows: Vec<Vec<String>> = stats
                .fields()
                .iter()
                .map(|(n, v)| vec![(*n).to_owned(), v.to_string()])
                .collect();
            rows.push(vec!["conntrack_entries".into(), entries.to_string()]);
            rows.extend(
                decap
                    .fields()
                    .iter()
                    .map(|(n, v)| vec![format!("decap_{n}"), v.to_string()]),
            );
            table(&["COUNTER", "VALUE"], &rows)
        }
    })
}

fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One connection entry.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FlowRow {
    /// Client.
    pub client: SocketAddr,
    /// VIP address and port.
    pub vip: SocketAddr,
    /// `tcp`/`udp`.
    pub protocol: Protocol,
    /// VIP name, if known.
    pub vip_name: Option<String>,
    /// Backend id.
    pub backend_id: u32,
    /// Backend address, if the id is in use.
    pub backend: Option<IpAddr>,
    /// Seconds since the entry was stamped.
    pub age_seconds: f64,
}

fn flow_row(
    key: &FlowKey,
    state: &FlowState,
    rows: &[VipRow],
    backends: &BTreeMap<u32, IpAddr>,
) -> FlowRow {
    let protocol = if key.proto == lb_common::PROTO_UDP {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    FlowRow {
        client: SocketAddr::new(
            words_address(&key.src_be, key.family),
            u16::from_be(key.sport_be),
        ),
        vip: SocketAddr::new(
            words_address(&key.dst_be, key.family),
            u16::from_be(key.dport_be),
        ),
        protocol,
        vip_name: rows
            .iter()
            .find(|r| r.vip_id == state.vip_id)
            .map(|r| r.name.clone()),
        backend_id: state.backend_id,
        backend: backends.get(&state.backend_id).copied(),
        age_seconds: monotonic_coarse_ns().saturating_sub(state.last_seen_ns) as f64 / 1e9,
    }
}

/// `xlb conntrack`.
pub fn conntrack(
    pinned: &Pinned,
    vip: Option<&str>,
    limit: usize,
    output: Output,
) -> Result<String, CliError> {
    let rows = vip_rows(pinned)?;
    let selected = vip.map(|s| select_vip(&rows, s)).transpose()?;
    let backends: BTreeMap<u32, IpAddr> = pinned
        .maps
        .backend_entries()?
        .into_iter()
        .map(|(id, b)| (id, words_address(&b.addr_be, b.family)))
        .collect();
    let flows: Vec<FlowRow> = pinned
        .maps
        .conntrack_entries(usize::MAX)
        .iter()
        .filter(|(_, state)| selected.is_none_or(|v| v.vip_id == state.vip_id))
        .take(limit)
        .map(|(key, state)| flow_row(key, state, &rows, &backends))
        .collect();
    Ok(match output {
        Output::Json => to_json(&flows),
        Output::Table => table(
            &["CLIENT", "VIP", "PROTO", "NAME", "BACKEND", "AGE"],
            &flows
                .iter()
                .map(|f| {
                    vec![
                        f.client.to_string(),
                        f.vip.to_string(),
                        f.protocol.to_string(),
                        f.vip_name.clone().unwrap_or_else(|| "-".into()),
                        f.backend.map_or_else(
                            || format!("id {} (gone)", f.backend_id),
                            |a| a.to_string(),
                        ),
                        format!("{:.1}s", f.age_seconds),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    })
}

/// What `xlb explain` found.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Explanation {
    /// The VIP that matched (name), if any.
    pub vip: Option<String>,
    /// Its id.
    pub vip_id: Option<u32>,
    /// Flow hash.
    pub hash: Option<u32>,
    /// Hash over the source address only (session affinity).
    pub source_only: bool,
    /// Table slot.
    pub slot: Option<u32>,
    /// Ring read.
    pub ring: Option<u32>,
    /// Backend id in the slot.
    pub maglev_backend_id: Option<u32>,
    /// Its address.
    pub maglev_backend: Option<IpAddr>,
    /// The connection entry, if the flow has one (it wins over the table).
    pub conntrack: Option<FlowRow>,
    /// One-line summary.
    pub verdict: String,
}

/// Parses `tcp`/`udp`/`6`/`17`.
pub fn parse_protocol(text: &str) -> Result<Protocol, CliError> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Ok(Protocol::Tcp),
        "udp" | "17" => Ok(Protocol::Udp),
        other => Err(CliError::Usage(format!(
            "{other}: protocol must be tcp or udp"
        ))),
    }
}

/// `xlb explain SRC:PORT DST:PORT PROTO`.
pub fn explain(
    pinned: &Pinned,
    src: SocketAddr,
    dst: SocketAddr,
    protocol: Protocol,
) -> Result<Explanation, CliError> {
    let maps = &pinned.maps;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(CliError::Usage(
            "source and destination families differ".into(),
        ));
    }
    let rows = vip_rows(pinned)?;
    let (src_be, family) = crate::model::address_words(src.ip());
    let (dst_be, _) = crate::model::address_words(dst.ip());
    let key = |port: u16| {
        ServiceKey {
            address: dst.ip(),
            protocol,
            port,
        }
        .to_map_key()
    };
    let entry = [key(dst.port()), key(0)]
        .into_iter()
        .find_map(|k| maps.vips.get(&k, 0).ok());
    let backends: BTreeMap<u32, IpAddr> = maps
        .backend_entries()?
        .into_iter()
        .map(|(id, b)| (id, words_address(&b.addr_be, b.family)))
        .collect();
    let flow_key = FlowKey {
        src_be,
        dst_be,
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: protocol.number(),
        family,
        _pad: [0; 2],
    };
    let conntrack = maps
        .conntrack
        .get(&flow_key, 0)
        .ok()
        .map(|state| flow_row(&flow_key, &state, &rows, &backends));
    let Some(info) = entry else {
        return Ok(Explanation {
            vip: None,
            vip_id: None,
            hash: None,
            source_only: false,
            slot: None,
            ring: None,
            maglev_backend_id: None,
            maglev_backend: None,
            conntrack,
            verdict: format!("{dst}/{protocol} is not a VIP: the balancer passes the packet"),
        });
    };
    let source_only = info.flags & VIP_F_HASH_SRC_ONLY != 0;
    let hash = lb_common::flow_hash(
        &src_be,
        src.port().to_be(),
        dst.port().to_be(),
        protocol.number(),
        source_only,
    );
    let slot = lb_common::maglev_slot(hash, maps.maglev.table_size());
    let id = maps.maglev.slot(info.ring, slot)?;
    let name = rows
        .iter()
        .find(|r| r.vip_id == info.vip_id)
        .map(|r| r.name.clone());
    let maglev_backend = backends.get(&id).copied();
    let verdict = match (&conntrack, maglev_backend) {
        (Some(flow), _) => format!(
            "established: conntrack pins the flow to backend {} (id {})",
            flow.backend.map_or("(gone)".into(), |a| a.to_string()),
            flow.backend_id
        ),
        (None, Some(address)) => format!("new flow: Maglev picks backend {address} (id {id})"),
        (None, None) => "no backend: the VIP has an empty table, the packet is dropped".into(),
    };
    Ok(Explanation {
        vip: name,
        vip_id: Some(info.vip_id),
        hash: Some(hash),
        source_only,
        slot: Some(slot),
        ring: Some(info.ring),
        maglev_backend_id: Some(id),
        maglev_backend,
        conntrack,
        verdict,
    })
}

/// Renders an [`Explanation`].
pub fn render_explanation(e: &Explanation, output: Output) -> String {
    match output {
        Output::Json => to_json(e),
        Output::Table => {
            let mut out = String::new();
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            out.push_str(&format!("vip:      {}\n", opt(e.vip.clone())));
            out.push_str(&format!(
                "hash:     {}{}\n",
                opt(e.hash.map(|h| format!("{h:#010x}"))),
                if e.source_only {
                    " (source address only)"
                } else {
                    ""
                }
            ));
            out.push_str(&format!(
                "slot:     {} of ring {}\n",
                opt(e.slot.map(|s| s.to_string())),
                opt(e.ring.map(|r| r.to_string()))
            ));
            out.push_str(&format!(
                "maglev:   {}\n",
                opt(e.maglev_backend_id.map(|id| format!(
                    "backend id {id} ({})",
                    e.maglev_backend.map_or("none".into(), |a| a.to_string())
                )))
            ));
            out.push_str(&format!(
                "conntrack: {}\n",
                e.conntrack.as_ref().map_or("no entry".into(), |f| format!(
                    "backend id {} ({}), stamped {:.1}s ago",
                    f.backend_id,
                    f.backend.map_or("gone".into(), |a| a.to_string()),
                    f.age_seconds
                ))
            ));
            out.push_str(&format!("=> {}\n", e.verdict));
            out
        }
    }
}

/// Orderable form of a [`VipKey`].
type VipKeyOrd = ([u32; 4], u16, u8, u8);

/// Per VIP, what applying a new config would do to its table.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MaglevDiffRow {
    /// VIP name (from the new config).
    pub vip: String,
    /// `changed`, `unchanged`, `new` or `removed`.
    pub change: String,
    /// Slots whose backend would change.
    pub slots_moved: u32,
    /// Table size.
    pub table_size: u32,
    /// Share of the table that would move, in percent.
    pub moved_percent: f64,
}

/// `xlb maglev diff --config NEW`: builds NEW's tables with the live backend ids and
/// compares them slot by slot with the live rings.
pub fn maglev_diff(pinned: &Pinned, new_config: &Path) -> Result<Vec<MaglevDiffRow>, CliError> {
    let config_err = |reason: String| CliError::Config {
        path: new_config.to_path_buf(),
        reason,
    };
    let resolved = Config::from_path(new_config)
        .and_then(|c| c.resolve())
        .map_err(|e| config_err(e.to_string()))?;
    let maps = &pinned.maps;
    let m = maps.maglev.table_size();
    if resolved.node.limits.table_size != m {
        return Err(config_err(format!(
            "node.maglev_table_size {} differs from the live {m}: every slot would be rebuilt \
             after `xlb unload`",
            resolved.node.limits.table_size
        )));
    }
    let live_ids: BTreeMap<IpAddr, u32> = maps
        .backend_entries()?
        .into_iter()
        .map(|(id, b)| (words_address(&b.addr_be, b.family), id))
        .collect();
    let mut live_vips: BTreeMap<VipKeyOrd, (VipKey, VipInfo)> = maps
        .vip_entries()?
        .into_iter()
        .map(|(k, i)| ((k.addr_be, k.port_be, k.proto, k.family), (k, i)))
        .collect();
    // Addresses new to the datapath get ids no live slot holds, so their slots count as moved.
    let mut next_placeholder = u32::MAX;
    let mut placeholder_ids: BTreeMap<IpAddr, u32> = BTreeMap::new();
    let mut rows = Vec::new();
    for vip in &resolved.desired.vips {
        let key = vip.key.to_map_key();
        let weighted: Vec<WeightedBackend> = vip
            .backends
            .iter()
            .map(|b| WeightedBackend {
                address: b.address,
                weight: b.effective_weight(),
                id: live_ids.get(&b.address).copied().unwrap_or_else(|| {
                    *placeholder_ids.entry(b.address).or_insert_with(|| {
                        next_placeholder -= 1;
                        next_placeholder + 1
                    })
                }),
            })
            .collect();
        let built =
            maglev::build(&vip.label(), m, &weighted).map_err(|e| config_err(e.to_string()))?;
        match live_vips.remove(&(key.addr_be, key.port_be, key.proto, key.family)) {
            Some((_, info)) => {
                let live = maps.maglev.read_ring(info.ring)?;
                let moved = live
                    .iter()
                    .zip(&built.table)
                    .filter(|(a, b)| a != b)
                    .count() as u32;
                rows.push(MaglevDiffRow {
                    vip: vip.name.clone(),
                    change: if moved == 0 { "unchanged" } else { "changed" }.into(),
                    slots_moved: moved,
                    table_size: m,
                    moved_percent: 100.0 * f64::from(moved) / f64::from(m.max(1)),
                });
            }
            None => rows.push(MaglevDiffRow {
                vip: vip.name.clone(),
                change: "new".into(),
                slots_moved: 0,
                table_size: m,
                moved_percent: 0.0,
            }),
        }
    }
    for (key, _) in live_vips.values() {
        let service = key_service(key);
        rows.push(MaglevDiffRow {
            vip: persisted_for(&pinned.state, &service)
                .map_or_else(|| service.to_string(), |p| p.name.clone()),
            change: "removed".into(),
            slots_moved: m,
            table_size: m,
            moved_percent: 100.0,
        });
    }
    Ok(rows)
}

/// Renders `maglev diff` rows.
pub fn render_maglev_diff(rows: &[MaglevDiffRow], output: Output) -> String {
    match output {
        Output::Json => to_json(&rows),
        Output::Table => table(
            &["VIP", "CHANGE", "SLOTS MOVED", "MOVED"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.vip.clone(),
                        r.change.clone(),
                        format!("{}/{}", r.slots_moved, r.table_size),
                        format!("{:.2}%", r.moved_percent),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_addresses() {
        for text in ["192.0.2.7", "2001:db8::42"] {
            let address: IpAddr = text.parse().unwrap();
            let (words, family) = crate::model::address_words(address);
            assert_eq!(words_address(&words, family), address);
        }
    }

    #[test]
    fn service_of_a_map_key_is_the_config_key() {
        let service = ServiceKey {
            address: "203.0.113.5".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        assert_eq!(key_service(&service.to_map_key()), service);
    }

    #[test]
    fn table_aligns_columns() {
        let text = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(text, "A    BB\nxyz  1\n");
    }

    #[test]
    fn protocols_parse() {
        assert_eq!(parse_protocol("TCP").unwrap(), Protocol::Tcp);
        assert_eq!(parse_protocol("17").unwrap(), Protocol::Udp);
        assert!(parse_protocol("icmp").is_err());
    }

    fn row(name: &str, address: &str, port: u16) -> VipRow {
        VipRow {
            name: name.into(),
            address: address.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
            mode: "encap".into(),
            source_affinity: false,
            vip_id: 0,
            ring: 0,
            backends_active: 0,
            backends_total: 0,
            packets: 0,
            bytes: 0,
            new_connections: 0,
            backends: Vec::new(),
        }
    }

    #[test]
    fn vips_are_selected_by_name_key_or_unique_address() {
        let rows = [
            row("web", "192.0.2.10", 80),
            row("tls", "192.0.2.10", 443),
            row("dns", "192.0.2.53", 53),
        ];
        assert_eq!(select_vip(&rows, "tls").unwrap().port, 443);
        assert_eq!(select_vip(&rows, "192.0.2.10:80/tcp").unwrap().name, "web");
        assert_eq!(select_vip(&rows, "192.0.2.53").unwrap().name, "dns");
        let ambiguous = select_vip(&rows, "192.0.2.10").unwrap_err().to_string();
        assert!(ambiguous.contains("web, tls"), "{ambiguous}");
        assert!(select_vip(&rows, "nope").is_err());
    }
}
