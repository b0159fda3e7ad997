//! The agent's Prometheus endpoint (`node.metrics_listen`, default 127.0.0.1:9430).
//!
//! Datapath counters are read from the maps at scrape time (per-CPU values summed), so
//! they continue across agent restarts exactly as the kernel counts them. Agent-side
//! metrics (config applies, failures, apply latency) live in the process.
//!
//! | Metric | Labels | Meaning |
//! |---|---|---|
//! | `xlb_vip_packets_total`, `xlb_vip_bytes_total`, `xlb_vip_new_connections_total` | `vip`, `service` | per VIP |
//! | `xlb_backend_packets_total`, `xlb_backend_bytes_total` | `backend` | per backend address |
//! | `xlb_rx_packets_total` | | packets seen by the balancer |
//! | `xlb_packets_total` | `outcome` | each packet's single outcome (`DatapathStats::OUTCOMES`) |
//! | `xlb_conntrack_events_total` | `event` | hit, miss, insert_skipped (rate guard), insert_failed, udp_expired |
//! | `xlb_fib_gateway_fallback_total` | | next hop taken from `gateway_mac` |
//! | `xlb_conntrack_entries` | | entries in the connection table (walked per scrape) |
//! | `xlb_config_applies_total`, `xlb_config_apply_failures_total` | | config applies |
//! | `xlb_config_apply_seconds` | | config file event → maps updated |

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use lb_common::{BackendStats, DatapathStats, VipStats, map_names};

use crate::datapath::{Conntrack, DatapathError};
use crate::state::{PersistedState, PersistedVip};

/// Agent-side metrics, updated by the agent loop.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Successful applies.
    pub applies: Counter,
    /// Rejected or failed applies.
    pub apply_failures: Counter,
    /// Seconds from a config file event to the maps being updated.
    pub apply_latency: Histogram,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            applies: Counter::default(),
            apply_failures: Counter::default(),
            // 1 ms .. ~16 s.
            apply_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

/// The counter maps a scrape reads, opened from their pins. Not [`Maps`]: that maps the
/// whole Maglev array into memory (2 × max_vips × M slots — 160 MB for 10,000 VIPs at
/// M = 1009), which a second copy in the same process would add to its resident set again.
pub struct CounterMaps {
    stats: PerCpuArray<MapData, DatapathStats>,
    vip_stats: PerCpuArray<MapData, VipStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    conntrack: Conntrack,
}

impl CounterMaps {
    /// Opens the counter maps pinned under `dir`.
    pub fn open_pinned(dir: &std::path::Path) -> Result<Self, DatapathError> {
        fn open<T: TryFrom<Map, Error = MapError>>(
            dir: &std::path::Path,
            name: &'static str,
        ) -> Result<T, DatapathError> {
            let err = |source| DatapathError::Map { name, source };
            let data = MapData::from_pin(dir.join(name)).map_err(err)?;
            let map = Map::from_map_data(data).map_err(err)?;
            T::try_from(map).map_err(err)
        }
        Ok(CounterMaps {
            stats: open(dir, map_names::STATS)?,
            vip_stats: open(dir, map_names::VIP_STATS)?,
            backend_stats: open(dir, map_names::BACKEND_STATS)?,
            conntrack: Conntrack::open_pinned(dir)?,
        })
    }

    fn stats(&self) -> Result<DatapathStats, MapError> {
        const N: usize = lb_common::DATAPATH_COUNTERS;
        let per_cpu = self.stats.get(&0, 0)?;
        let mut sum = [0u64; N];
        for cpu in per_cpu.iter() {
            let values: &[u64; N] = bytemuck::cast_ref(cpu);
            for (total, v) in sum.iter_mut().zip(values) {
                *total += v;
            }
        }
        Ok(bytemuck::cast::<[u64; N], DatapathStats>(sum))
    }

    fn vip_stats(&self, vip_id: u32) -> Result<VipStats, MapError> {
        let per_cpu = self.vip_stats.get(&vip_id, 0)?;
        Ok(per_cpu.iter().fold(VipStats::default(), |a, s| VipStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            new_conns: a.new_conns + s.new_conns,
        }))
    }

    fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, MapError> {
        let per_cpu = self.backend_stats.get(&backend_id, 0)?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |a, s| BackendStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
            }))
    }

    fn conntrack_count(&self) -> u64 {
        self.conntrack.count()
    }
}

/// Reads the datapath maps on every scrape.
pub struct DatapathCollector {
    maps: Mutex<CounterMaps>,
    vips: SharedState,
}

/// The last applied state, shared by the agent (which replaces it after each apply) with
/// the collector and the state-file writer: one copy for all three.
pub type SharedState = Arc<RwLock<Option<Arc<PersistedState>>>>;

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl DatapathCollector {
    /// `maps`: handles on the pinned counters; `vips`: names and ids, replaced after each
    /// apply.
    pub fn new(maps: CounterMaps, vips: SharedState) -> Self {
        DatapathCollector {
            maps: Mutex::new(maps),
            vips,
        }
    }
}

fn counter<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn plain_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

/// A counter family read from one stats struct: name, help, which field.
type Family<S> = (&'static str, &'static str, fn(&S) -> u64);

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(maps) = self.maps.lock() else {
            return Ok(());
        };
        let state = self.vips.read().ok().and_then(|v| v.clone());
        let vips: &[std::sync::Arc<PersistedVip>] = state.as_deref().map_or(&[], |s| &s.vips);

        // Every counter is read once into compact rows; label strings are made while a
        // series is encoded and dropped right after. (Label vectors built up front for
        // 10,000 VIPs and 100,000 backends held ~25 MB for the length of a scrape.)
        let mut vip_rows: Vec<(&PersistedVip, VipStats)> = Vec::with_capacity(vips.len());
        let mut backend_rows: Vec<(u32, std::net::IpAddr)> = vips
            .iter()
            .flat_map(|vip| vip.backends.iter().map(|b| (b.id, b.address)))
            .collect();
        // A backend shared by several VIPs is one series.
        backend_rows.sort_unstable_by_key(|(id, _)| *id);
        backend_rows.dedup_by_key(|(id, _)| *id);
        let backend_rows: Vec<(std::net::IpAddr, BackendStats)> = backend_rows
            .into_iter()
            .filter_map(|(id, address)| Some((address, maps.backend_stats(id).ok()?)))
            .collect();
        for vip in vips {
            if let Ok(stats) = maps.vip_stats(vip.vip_id) {
                vip_rows.push((vip, stats));
            }
        }
        let vip_labels = |vip: &PersistedVip| {
            let service = crate::model::ServiceKey {
                address: vip.address,
                protocol: vip.protocol,
                port: vip.port,
            }
            .to_string();
            [("vip", vip.name.clone()), ("service", service)]
        };
        let vip_families: [Family<VipStats>; 3] = [
            ("xlb_vip_packets", "Packets forwarded for a VIP", |s| {
                s.packets
            }),
            ("xlb_vip_bytes", "L3 bytes forwarded for a VIP", |s| s.bytes),
            (
                "xlb_vip_new_connections",
                "New connections (Maglev picks) of a VIP",
                |s| s.new_conns,
            ),
        ];
        for (name, help, value) in vip_families {
            counter(
                &mut encoder,
                name,
                help,
                vip_rows
                    .iter()
                    .map(|(vip, stats)| (vip_labels(vip), value(stats))),
            )?;
        }
        let backend_families: [Family<BackendStats>; 2] = [
            ("xlb_backend_packets", "Packets sent to a backend", |s| {
                s.packets
            }),
            ("xlb_backend_bytes", "Inner bytes sent to a backend", |s| {
                s.bytes
            }),
        ];
        for (name, help, value) in backend_families {
            counter(
                &mut encoder,
                name,
                help,
                backend_rows
                    .iter()
                    .map(|(address, stats)| ([("backend", address.to_string())], value(stats))),
            )?;
        }

        if let Ok(stats) = maps.stats() {
            let fields = stats.fields();
            let value = |name: &str| {
                fields
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, v)| *v)
            };
            plain_counter(
                &mut encoder,
                "xlb_rx_packets",
                "Packets seen by the balancer",
                value("rx_packets"),
            )?;
            let outcomes: Vec<([(&str, &str); 1], u64)> = lb_common::DatapathStats::OUTCOMES
                .iter()
                .map(|name| ([("outcome", *name)], value(name)))
                .collect();
            counter(
                &mut encoder,
                "xlb_packets",
                "Packets by outcome (each packet has exactly one)",
                outcomes,
            )?;
            let events: Vec<([(&str, &str); 1], u64)> = [
                ("hit", "conntrack_hit"),
                ("miss", "conntrack_miss"),
                ("insert_skipped", "conntrack_insert_skipped"),
                ("insert_failed", "conntrack_insert_failed"),
                ("udp_expired", "conntrack_udp_expired"),
            ]
            .iter()
            .map(|(label, field)| ([("event", *label)], value(field)))
            .collect();
            counter(
                &mut encoder,
                "xlb_conntrack_events",
                "Connection-table events; insert_skipped counts inserts skipped by the \
                 new-connection rate guard",
                events,
            )?;
            plain_counter(
                &mut encoder,
                "xlb_fib_gateway_fallback",
                "Next hops taken from the configured gateway MAC",
                value("fib_gateway_fallback"),
            )?;
        }
        let entries = maps.conntrack_count();
        let metric = encoder.encode_descriptor(
            "xlb_conntrack_entries",
            "Entries in the connection table",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(entries as i64).encode(metric)?;
        Ok(())
    }
}

/// The registry with both metric sets.
pub fn registry(agent: &AgentMetrics, datapath: DatapathCollector) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "xlb_config_applies",
        "Config applies that reached the maps",
        agent.applies.clone(),
    );
    registry.register(
        "xlb_config_apply_failures",
        "Config changes rejected (invalid) or failed while writing",
        agent.apply_failures.clone(),
    );
    registry.register(
        "xlb_config_apply_seconds",
        "Time from a config file change to the maps being updated",
        agent.apply_latency.clone(),
    );
    registry.register_collector(Box::new(datapath));
    registry
}

/// Bytes of text sent to the scraper at a time.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks encoded ahead of the socket.
const CHUNKS_AHEAD: usize = 4;

/// A `fmt::Write` that hands the text over in chunks of about [`CHUNK_BYTES`]. A closed
/// receiver (the scraper went away) fails the write, which stops the encoding.
struct ChunkWriter {
    chunk: String,
    to: tokio::sync::mpsc::Sender<Result<String, ()>>,
}

impl ChunkWriter {
    fn flush(&mut self) -> std::fmt::Result {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, String::with_capacity(CHUNK_BYTES));
        self.to
            .blocking_send(Ok(chunk))
            .map_err(|_| std::fmt::Error)
    }
}

impl std::fmt::Write for ChunkWriter {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.chunk.push_str(text);
        if self.chunk.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

/// Encodes the registry in the text format on a blocking thread, a chunk at a time: the
/// text of 100,000 backends is ~13 MB, and a scrape holds at most [`CHUNKS_AHEAD`] + 1
/// chunks of it (holding it whole added ~20 MB to the agent's peak). The last item is
/// `Err` if the encoding failed, and the response must then end short.
fn render_chunks(registry: Arc<Registry>) -> tokio::sync::mpsc::Receiver<Result<String, ()>> {
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChunkWriter {
            chunk: String::with_capacity(CHUNK_BYTES),
            to: tx,
        };
        let encoded = prometheus_client::encoding::text::encode(&mut writer, &registry)
            .and_then(|()| writer.flush());
        if encoded.is_err() {
            let _ = writer.to.blocking_send(Err(()));
        }
    });
    rx
}

/// Renders the registry in the text format, whole (for tests and tools).
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
        let _ = writeln!(text, "# encoding failed");
    }
    text
}

/// Serves on `listener` until the task is dropped:
///
/// * `GET /metrics`: the registry, sent chunked as it is encoded ([`render_chunks`]);
/// * `GET /healthz`: 200 while the agent's loop serves requests (the liveness probe);
/// * `GET /readyz`: 200 once `ready` is set — the agent has applied its first state —
///   else 503 (the readiness probe: a DaemonSet rollout moves to the next node only
///   once this one is programmed).
///
/// Probes cost nothing: a scrape of 100,000 backends reads every counter and encodes
/// 12.7 MB of text. A minimal HTTP/1.1 responder: one request per connection, which is
/// how Prometheus, kubelet and curl ask.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            if path == "/metrics" || path.starts_with("/metrics?") {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; \
                            version=1.0.0; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\
                            Connection: close\r\n\r\n";
                let mut chunks = render_chunks(registry);
                let mut ok = stream.write_all(head.as_bytes()).await.is_ok();
                while ok {
                    match chunks.recv().await {
                        Some(Ok(chunk)) => {
                            let size = format!("{:x}\r\n", chunk.len());
                            ok = stream.write_all(size.as_bytes()).await.is_ok()
                                && stream.write_all(chunk.as_bytes()).await.is_ok()
                                && stream.write_all(b"\r\n").await.is_ok();
                        }
                        // Complete: the last chunk.
                        None => {
                            let _ = stream.write_all(b"0\r\n\r\n").await;
                            break;
                        }
                        // The encoding failed: no last chunk, so the scrape fails whole.
                        Some(Err(())) => {
                            tracing::warn!("metrics encoding failed; response cut short");
                            break;
                        }
                    }
                }
            } else {
                let (status, body) = match path.split('?').next() {
                    Some("/healthz") => ("200 OK", "ok\n"),
                    Some("/readyz") if ready.load(std::sync::atomic::Ordering::Relaxed) => {
                        ("200 OK", "ready\n")
                    }
                    Some("/readyz") => (
                        "503 Service Unavailable",
                        "not ready: no state applied yet\n",
                    ),
                    _ => ("404 Not Found", "see /metrics, /healthz, /readyz\n"),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: \
                     {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if stream.write_all(head.as_bytes()).await.is_ok() {
                    let _ = stream.write_all(body.as_bytes()).await;
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}
