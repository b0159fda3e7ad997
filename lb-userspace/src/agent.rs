//! `xlb agent`: loads the balancer, keeps the maps equal to the config file, serves metrics.
//!
//! * **Start.** Maps are pinned under `node.pin_dir` (adopted if already pinned, so
//!   conntrack entries and counters survive a restart). The applied state is read back
//!   from the maps ([`crate::state::rebuild_applied`]), the config is applied (on a
//!   restart with an unchanged config: no write at all), and only then is `xlb_balancer`
//!   attached to each interface through a pinned BPF link — or, if the link is pinned
//!   already, the program inside it is replaced atomically. Forwarding sysctls are turned
//!   on (`bpf_fib_lookup` answers FWD_DISABLED otherwise).
//! * **Running.** The config file is watched (its directory, so editors that replace the
//!   file by rename are seen); each change is parsed, validated and applied. An invalid
//!   file is rejected with the field and the reason, and the previous state keeps serving.
//! * **SIGTERM/SIGINT.** The agent exits; the program stays attached and the maps keep
//!   their contents. `xlb unload` detaches and removes everything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lb_common::program_names;

use crate::config::{Config, ConfigError, NodeSettings, ResolvedConfig};
use crate::datapath::{self, AttachMode, Attached, Datapath, DatapathError, LoadOptions};
use crate::manager::{Manager, ManagerError};
use crate::metrics::{self, AgentMetrics, DatapathCollector};
use crate::state::{self, PersistedState};

/// What the agent was asked to run.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The config file; `None` runs the embedded demo config.
    pub config_path: Option<PathBuf>,
    /// Overrides `node.pin_dir`.
    pub pin_dir: Option<PathBuf>,
    /// Overrides `node.xdp_mode`.
    pub mode: Option<AttachMode>,
    /// Overrides `node.metrics_listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of the state file the CLI reads.
    pub state_dir: PathBuf,
    /// `--kubernetes`: VIPs come from Services/EndpointSlices instead of the config file
    /// (which still supplies the node settings). See `docs/kubernetes.md`.
    pub kubernetes: Option<crate::kubernetes::source::SourceOptions>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config file is invalid.
    #[error("{path}: {source}")]
    Config {
        /// The file (or "embedded default").
        path: String,
        /// Why.
        source: ConfigError,
    },
    /// Loading, attaching or a map write failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The first apply failed.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The pinned maps were made with other sizes.
    #[error(
        "the pinned datapath at {pin_dir} was created with maglev_table_size {pinned}, the config \
         says {configured}; run `xlb unload --pin-dir {pin_dir}` first (this drops all connections)"
    )]
    SizeMismatch {
        /// Pin directory.
        pin_dir: String,
        /// Pinned size.
        pinned: u32,
        /// Configured size.
        configured: u32,
    },
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The metrics listener or the file watcher could not start.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn load_config(opts: &AgentOptions) -> Result<ResolvedConfig, AgentError> {
    let (config, path) = match &opts.config_path {
        Some(path) => (Config::from_path(path), path.to_string_lossy().into_owned()),
        None => (Ok(Config::embedded_default()), "embedded default".into()),
    };
    let mut resolved = config
        .and_then(|c| c.resolve())
        .map_err(|source| AgentError::Config { path, source })?;
    if let Some(pin_dir) = &opts.pin_dir {
        resolved.node.pin_dir = pin_dir.clone();
    }
    if let Some(listen) = opts.metrics_listen {
        resolved.node.metrics_listen = listen;
    }
    Ok(resolved)
}

/// Turns on IPv4 and IPv6 forwarding in this network namespace, logging what changed.
pub fn enable_forwarding() {
    for path in [
        "/proc/sys/net/ipv4/conf/all/forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        match std::fs::read_to_string(path) {
            Ok(value) if value.trim() == "1" => {
                tracing::debug!(sysctl = path, "forwarding already on");
            }
            Ok(_) => match std::fs::write(path, "1") {
                Ok(()) => tracing::info!(
                    sysctl = path,
                    "turned forwarding on (bpf_fib_lookup reports FWD_DISABLED without it)"
                ),
                Err(e) => tracing::warn!(sysctl = path, error = %e, "cannot turn forwarding on"),
            },
            Err(e) => tracing::warn!(sysctl = path, error = %e, "cannot read forwarding sysctl"),
        }
    }
}

/// Node settings that need maps re-created or the agent restarted to change.
fn restart_only_changes(
    old: &NodeSettings,
    new: &NodeSettings,
) -> Result<Vec<&'static str>, ConfigError> {
    let invalid = |path: &str, what: &str| ConfigError::Invalid {
        path: path.into(),
        reason: format!(
            "{what} sizes the pinned maps; changing it needs `xlb unload` and an agent restart \
             (keeping the running value)"
        ),
    };
    if old.limits.table_size != new.limits.table_size {
        return Err(invalid("node.maglev_table_size", "the Maglev table size"));
    }
    if old.limits.max_vips != new.limits.max_vips {
        return Err(invalid("node.max_vips", "max_vips"));
    }
    if old.limits.max_backends != new.limits.max_backends {
        return Err(invalid("node.max_backends", "max_backends"));
    }
    if old.conntrack_entries != new.conntrack_entries {
        return Err(invalid("node.conntrack_entries", "conntrack_entries"));
    }
    let mut later = Vec::new();
    if old.interfaces != new.interfaces {
        later.push("node.interfaces");
    }
    if old.xdp_mode != new.xdp_mode {
        later.push("node.xdp_mode");
    }
    if old.pin_dir != new.pin_dir {
        later.push("node.pin_dir");
    }
    if old.metrics_listen != new.metrics_listen {
        later.push("node.metrics_listen");
    }
    Ok(later)
}

/// The running agent's state, owned by the agent loop.
struct Running {
    opts: AgentOptions,
    datapath: Datapath,
    manager: Manager,
    node: NodeSettings,
    metrics: AgentMetrics,
    vips_for_metrics: crate::metrics::SharedState,
    /// The last state from Kubernetes (`--kubernetes`); `None` until the first sync.
    kube: Option<Arc<crate::kubernetes::translate::Translation>>,
    /// API event → maps updated, for `--kubernetes`.
    kube_latency: prometheus_client::metrics::histogram::Histogram,
    /// Wall-clock time (Unix seconds) at which the initial list completed.
    kube_listed_at: FloatGauge,
    /// Initial list complete → the first state written to the maps, seconds.
    kube_initial_sync: FloatGauge,
    /// `--kubernetes`: the state file is written off the apply path.
    persister: Option<Persister>,
    /// Describes each applied state for the state file and metrics, reusing unchanged VIPs.
    describer: crate::state::Describer,
    /// Set once a state is in the maps (`/readyz`).
    ready: Arc<std::sync::atomic::AtomicBool>,
}

type FloatGauge = prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>;

/// Shortest time between two state-file writes of a `--kubernetes` agent.
const STATE_WRITE_INTERVAL: Duration = Duration::from_millis(500);

/// Writes state files on a thread of its own, newest first: with `--kubernetes` a file of
/// 10,000 VIPs takes tens of milliseconds to serialise and write, which the next change
/// would otherwise wait for. A state superseded before its turn is never written.
struct Persister {
    slot: Arc<(
        std::sync::Mutex<Option<Arc<PersistedState>>>,
        std::sync::Condvar,
    )>,
}

impl Persister {
    fn start(pin_dir: PathBuf, state_dir: PathBuf) -> Self {
        let slot: Arc<(
            std::sync::Mutex<Option<Arc<PersistedState>>>,
            std::sync::Condvar,
        )> = Arc::default();
        let shared = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("xlb-state".into())
            .spawn(move || {
                let (lock, ready) = &*shared;
                loop {
                    let next = {
                        let Ok(mut pending) = lock.lock() else { return };
                        loop {
                            if let Some(state) = pending.take() {
                                break state;
                            }
                            pending = match ready.wait(pending) {
                                Ok(p) => p,
                                Err(_) => return,
                            };
                        }
                    };
                    let started = Instant::now();
                    if let Err(e) = state::write(&pin_dir, &state_dir, &next) {
                        tracing::warn!("{e}");
                    }
                    // Serialising 10,000 VIPs costs tens of milliseconds of CPU: during a
                    // stream of changes the file follows at most twice a second (always
                    // ending on the newest state) instead of taking a core from the changes.
                    std::thread::sleep(STATE_WRITE_INTERVAL.saturating_sub(started.elapsed()));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the state writer thread");
        }
        Persister { slot }
    }

    fn submit(&self, state: Arc<PersistedState>) {
        let (lock, ready) = &*self.slot;
        if let Ok(mut pending) = lock.lock() {
            *pending = Some(state);
            ready.notify_one();
        }
    }
}

impl Running {
    fn persist(&mut self, desired: &crate::model::DesiredState) -> Result<(), AgentError> {
        let persisted = Arc::new(self.describer.describe(
            desired,
            self.manager.applied(),
            self.opts.config_path.as_deref(),
        ));
        if let Ok(mut vips) = self.vips_for_metrics.write() {
            *vips = Some(persisted.clone());
        }
        match &self.persister {
            // All writes of a `--kubernetes` agent go through the one thread, in order.
            Some(persister) => persister.submit(persisted),
            None => state::write(&self.node.pin_dir, &self.opts.state_dir, &persisted)?,
        }
        Ok(())
    }

    /// Re-reads the config after a file event at `since`.
    fn reload(&mut self, since: Instant) {
        let path = self
            .opts
            .config_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("(embedded)"));
        let resolved = match load_config(&self.opts)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                restart_only_changes(&self.node, &r.node)
                    .map(|later| (r, later))
                    .map_err(|e| format!("{}: {e}", path.display()))
            }) {
            Ok((resolved, later)) => {
                for field in later {
                    tracing::warn!(
                        field,
                        "changed in the config; takes effect at the next agent start"
                    );
                }
                resolved
            }
            Err(message) => {
                self.metrics.apply_failures.inc();
                tracing::error!("config rejected, previous state keeps serving: {message}");
                return;
            }
        };
        let datapath_config = resolved.node.datapath_config();
        if self.datapath.maps.config().ok() != Some(datapath_config)
            && let Err(e) = self.datapath.maps.set_config(&datapath_config)
        {
            self.metrics.apply_failures.inc();
            tracing::error!("writing node settings failed: {e}");
            return;
        }
        let mut resolved = resolved;
        if self.opts.kubernetes.is_some() {
            // The file supplies node settings only; VIPs stay Kubernetes' (or, before the
            // first sync, what the maps hold).
            match &self.kube {
                Some(kube) => resolved.desired = kube.desired.clone(),
                None => return,
            }
        }
        match self
            .manager
            .apply(&mut self.datapath.maps, &resolved.desired)
        {
            Ok(report) => {
                let elapsed = since.elapsed();
                self.metrics.applies.inc();
                self.metrics.apply_latency.observe(elapsed.as_secs_f64());
                for warning in &report.warnings {
                    tracing::warn!("{warning}");
                }
                // The state file first: once "config applied" is logged, the CLI reads the
                // new config (it takes names, weights and states from that file).
                if let Err(e) = self.persist(&resolved.desired) {
                    tracing::warn!("{e}");
                }
                tracing::info!(
                    ops = report.ops,
                    rings = report.rings_written,
                    flows_flushed = report.flows_flushed,
                    ms = elapsed.as_secs_f64() * 1e3,
                    "config applied"
                );
                // Node fields that apply live (timeouts, tunnel sources) are kept; the
                // restart-only ones keep their running values.
                let running = self.node.clone();
                self.node = NodeSettings {
                    interfaces: running.interfaces,
                    xdp_mode: running.xdp_mode,
                    pin_dir: running.pin_dir,
                    metrics_listen: running.metrics_listen,
                    ..resolved.node
                };
            }
            Err(e) => {
                self.metrics.apply_failures.inc();
                tracing::error!("config not applied, previous state keeps serving: {e}");
                if let Err(e) = self.persist(&resolved.desired) {
                    tracing::warn!("{e}");
                }
            }
        }
    }
}

impl Running {
    /// Applies a state from the Kubernetes source; the previous state keeps serving if the
    /// apply fails.
    fn apply_kubernetes(&mut self, mut update: crate::kubernetes::source::Update) {
        let translation = update.translation.clone();
        let desired = &translation.desired;
        if let Some(listed) = update.listed {
            let at = std::time::SystemTime::now()
                .checked_sub(listed.elapsed())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            if let Some(at) = at {
                self.kube_listed_at.set(at.as_secs_f64());
            }
        }
        match self.manager.apply(&mut self.datapath.maps, desired) {
            Ok(report) => {
                self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                let elapsed = update.since.elapsed();
                self.metrics.applies.inc();
                self.kube_latency.observe(elapsed.as_secs_f64());
                for warning in &report.warnings {
                    tracing::warn!("{warning}");
                }
                tracing::info!(
                    vips = desired.vips.len(),
                    ops = report.ops,
                    ms = elapsed.as_secs_f64() * 1e3,
                    "kubernetes state applied"
                );
                if let Some(listed) = update.listed {
                    let sync = listed.elapsed();
                    self.kube_initial_sync.set(sync.as_secs_f64());
                    tracing::info!(
                        vips = desired.vips.len(),
                        ms = sync.as_secs_f64() * 1e3,
                        "initial Kubernetes state in the maps (from the end of the initial list)"
                    );
                }
            }
            Err(e) => {
                self.metrics.apply_failures.inc();
                tracing::error!("kubernetes state not applied, previous state keeps serving: {e}");
            }
        }
        // Statuses name the VIPs the translation decided, for every node alike: written
        // after this node's maps, applied or not.
        update.applied();
        if let Err(e) = self.persist(desired) {
            tracing::warn!("{e}");
        }
        self.kube = Some(translation);
    }
}

/// Watches the config file's directory and sends the time of each event for the file.
fn watch(
    path: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<Instant>,
) -> Result<notify::RecommendedWatcher, AgentError> {
    crate::filewatch::watch_file(path, move || {
        let _ = tx.send(Instant::now());
    })
    .map_err(|e| AgentError::Io {
        what: format!("watching {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let resolved = load_config(&opts)?;
    let node = resolved.node.clone();
    let mode = opts.mode.unwrap_or_else(|| node.xdp_mode.into());
    // Bound first: a port in use must fail the start before anything is attached.
    let listener = tokio::net::TcpListener::bind(node.metrics_listen)
        .await
        .map_err(|source| AgentError::Io {
            what: format!("listening for metrics on {}", node.metrics_listen),
            source,
        })?;
    enable_forwarding();

    let load = LoadOptions {
        pin_dir: node.pin_dir.clone(),
        maglev_table_size: node.limits.table_size,
        max_vips: node.limits.max_vips,
        max_backends: node.limits.max_backends,
        conntrack_entries: node.conntrack_entries,
    };
    let mut datapath = Datapath::load(&load)?;
    let pinned = datapath.maps.config()?;
    if pinned.maglev_table_size != 0 && pinned.maglev_table_size != node.limits.table_size {
        return Err(AgentError::SizeMismatch {
            pin_dir: node.pin_dir.display().to_string(),
            pinned: pinned.maglev_table_size,
            configured: node.limits.table_size,
        });
    }
    let mut manager = Manager::adopt(&datapath.maps, node.limits)?;
    let adopted_vips = manager.applied().vips().count();
    if adopted_vips > 0 {
        tracing::info!(
            vips = adopted_vips,
            backends = manager.applied().backends().count(),
            pin_dir = %node.pin_dir.display(),
            "adopted a running datapath: maps and connection entries kept"
        );
    }
    datapath.maps.set_config(&node.datapath_config())?;
    let started = Instant::now();
    let mut resolved = resolved;
    let mut kube_rx = None;
    if let Some(kube) = &opts.kubernetes {
        if !resolved.desired.vips.is_empty() {
            tracing::warn!(
                "--kubernetes: the config file's vips are ignored; VIPs come from Services"
            );
        }
        // Nothing is applied until the first complete sync: the adopted maps keep serving,
        // also when the API server is unreachable at start.
        resolved.desired = crate::model::DesiredState::default();
        kube_rx = Some(
            crate::kubernetes::source::spawn(kube.clone())
                .await
                .map_err(|e| AgentError::Io {
                    what: "starting the Kubernetes source".into(),
                    source: std::io::Error::other(e.to_string()),
                })?,
        );
    } else {
        let report = manager.apply(&mut datapath.maps, &resolved.desired)?;
        for warning in &report.warnings {
            tracing::warn!("{warning}");
        }
        tracing::info!(
            ops = report.ops,
            rings = report.rings_written,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "initial config applied"
        );
    }
    for iface in &node.interfaces {
        match datapath.attach_pinned(program_names::BALANCER, iface, mode)? {
            Attached::Adopted => tracing::info!(
                iface,
                "kept the pinned XDP link; program replaced atomically"
            ),
            Attached::Native => tracing::info!(iface, "attached in native mode"),
            Attached::Generic { native_error: None } => {
                tracing::info!(iface, "attached in generic mode")
            }
            Attached::Generic {
                native_error: Some(e),
            } => tracing::warn!(
                iface,
                native_error = %e,
                "native XDP failed; attached in generic mode (much slower)"
            ),
        }
    }

    // Links pinned by an earlier agent for interfaces the config no longer lists.
    for iface in datapath::pinned_links(&node.pin_dir, program_names::BALANCER) {
        if !node.interfaces.contains(&iface) {
            datapath::detach_pinned(&node.pin_dir, program_names::BALANCER, &iface)?;
            tracing::info!(iface, "detached: no longer in node.interfaces");
        }
    }

    let metrics = AgentMetrics::default();
    let vips_for_metrics: crate::metrics::SharedState = Arc::new(RwLock::new(None));
    let mut running = Running {
        opts: opts.clone(),
        datapath,
        manager,
        node: node.clone(),
        metrics: metrics.clone(),
        vips_for_metrics: vips_for_metrics.clone(),
        kube: None,
        kube_latency: prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        ),
        kube_listed_at: FloatGauge::default(),
        kube_initial_sync: FloatGauge::default(),
        persister: opts
            .kubernetes
            .is_some()
            .then(|| Persister::start(node.pin_dir.clone(), opts.state_dir.clone())),
        describer: crate::state::Describer::default(),
        // A config file's state is in the maps by now; Kubernetes' after the first sync.
        ready: Arc::new(std::sync::atomic::AtomicBool::new(
            opts.kubernetes.is_none(),
        )),
    };
    running.persist(&resolved.desired)?;

    let collector = DatapathCollector::new(
        metrics::CounterMaps::open_pinned(&node.pin_dir)?,
        vips_for_metrics,
    );
    let mut registry = metrics::registry(&metrics, collector);
    if opts.kubernetes.is_some() {
        registry.register(
            "xlb_kubernetes_event_to_maps_seconds",
            "From the first API event of a batch to the maps being updated",
            running.kube_latency.clone(),
        );
        registry.register(
            "xlb_kubernetes_initial_list_completed_timestamp_seconds",
            "When the initial list of Services and EndpointSlices completed (Unix time)",
            running.kube_listed_at.clone(),
        );
        registry.register(
            "xlb_kubernetes_initial_sync_seconds",
            "From the initial list completing to its state being written to the maps",
            running.kube_initial_sync.clone(),
        );
    }
    let registry = Arc::new(registry);
    tracing::info!(listen = %node.metrics_listen, "metrics at /metrics");
    let metrics_task = tokio::spawn(metrics::serve(listener, registry, running.ready.clone()));

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = match &opts.config_path {
        Some(path) => Some(watch(path, tx)?),
        None => None,
    };
    let io = |what: &'static str| {
        move |source| AgentError::Io {
            what: what.into(),
            source,
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("installing the SIGTERM handler"))?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(io("installing the SIGINT handler"))?;
    tracing::info!(pin_dir = %node.pin_dir.display(), "agent ready");
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(update) = async { kube_rx.as_mut()?.recv().await }, if kube_rx.is_some() => {
                running.apply_kubernetes(update);
            }
            Some(first) = rx.recv() => {
                // Editors write in several steps: let the burst settle, then read once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                running.reload(first);
            }
        }
    }
    metrics_task.abort();
    tracing::info!(
        pin_dir = %node.pin_dir.display(),
        "exiting; the datapath keeps running (`xlb unload` removes it)"
    );
    Ok(())
}
