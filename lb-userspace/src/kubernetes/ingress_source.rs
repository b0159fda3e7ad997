//! The live Kubernetes source of `xlb proxy --kubernetes`: reflectors over IngressClasses,
//! Ingresses, `kubernetes.io/tls` Secrets, Services and EndpointSlices; batched translation
//! ([`super::ingress`]) swapped into the running proxy; Events for rejected Ingresses; the
//! proxy's address written to the status of the Ingresses it serves.
//!
//! * **Batching.** The first watch event of a burst starts a window ([`IngressSourceOptions::batch`],
//!   50 ms); then the caches are translated once and, if the config changed, sent on.
//! * **Nothing partial.** Nothing is sent before all five caches finished their initial list,
//!   and a relist (after 410 Gone or a reconnect) swaps a cache only when complete, so an
//!   unreachable API server leaves the last applied config serving.
//! * **Secrets.** Only Secrets of type `kubernetes.io/tls` are watched (a field selector: the
//!   others never reach the proxy's memory), and only those named by a served Ingress or the
//!   file's `tls.default_secret` are used. RBAC cannot narrow list/watch by name, so the
//!   ServiceAccount can read every Secret in the watched namespaces; `--kube-namespace`
//!   narrows that to one namespace (with a Role instead of the ClusterRole).
//! * **Node settings.** The `--config` file (listeners, timeouts, limits, TLS settings) is
//!   watched and re-read on change and on SIGHUP; new settings go through the same batching
//!   and translation as an API event. Invalid ones are logged and the previous ones kept.
//! * **Status.** With publish addresses configured ([`Publish`]: fixed ones, or those of a
//!   Service such as the LoadBalancer Service whose VIP the xlb agent serves in front of the
//!   proxies), every served Ingress's `status.loadBalancer.ingress` is set to them (merge
//!   patch, only when different). All replicas publish the same addresses, so their writes
//!   agree and no election is needed. An Ingress that stops being served (another class,
//!   rejected) has the status cleared if it holds our addresses or this process wrote it, so
//!   tools that follow Ingress status (external-dns) stop pointing at us.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};

use super::ingress::{IngressOptions, IngressTranslation, Rejected, TLS_SECRET_TYPE, translate};
use super::source::SourceError;
use crate::proxy::ProxyConfig;

/// How the Ingress source runs.
#[derive(Clone, Debug)]
pub struct IngressSourceOptions {
    /// Which IngressClasses are ours.
    pub ingress: IngressOptions,
    /// Node-wide settings (from the proxy config file; see [`super::ingress::node_settings`]).
    pub node: ProxyConfig,
    /// Window that collects a burst of watch events into one translation.
    pub batch: Duration,
    /// What is written to `status.loadBalancer.ingress` of served Ingresses.
    pub publish: Publish,
    /// Watch only this namespace (IngressClasses are cluster-scoped and always watched).
    pub namespace: Option<String>,
    /// This proxy's identity in Events and as field manager.
    pub identity: String,
    /// A kubeconfig file; `None` infers (`KUBECONFIG`, `~/.kube/config`, in-cluster).
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl IngressSourceOptions {
    /// Defaults: the default controller name, 50 ms batches, all namespaces, no status.
    pub fn new(node: ProxyConfig, identity: String) -> Self {
        IngressSourceOptions {
            ingress: IngressOptions::default(),
            node,
            batch: Duration::from_millis(50),
            publish: Publish::Off,
            namespace: None,
            identity,
            kubeconfig: None,
        }
    }
}

/// Where the addresses written to Ingress status come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Publish {
    /// Status is not written.
    #[default]
    Off,
    /// These addresses: IPs as `ip`, anything else as `hostname`.
    Addresses(Vec<String>),
    /// The `status.loadBalancer.ingress` of this Service, followed live (no address while it
    /// has none). It must be in the watched namespace.
    Service {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl Publish {
    fn is_off(&self) -> bool {
        *self == Publish::Off
    }
}

/// One translated config for the proxy.
#[derive(Debug)]
pub struct IngressUpdate {
    /// The config to swap in, and what was rejected.
    pub translation: IngressTranslation,
    /// When the first API event of this batch arrived.
    pub since: Instant,
    /// Watches that expired (410 Gone) and were relisted so far.
    pub relists: u64,
}

/// Starts the source with the configured client; translated configs arrive on the channel.
/// Node settings sent on `node` later replace `opts.node` (and re-translate).
pub async fn spawn(
    opts: IngressSourceOptions,
    node: watch::Receiver<ProxyConfig>,
) -> Result<mpsc::Receiver<IngressUpdate>, SourceError> {
    let client = super::source::client(opts.kubeconfig.as_deref()).await?;
    Ok(start(client, opts, node))
}

/// Starts the source on `client` (a tokio task; it ends when the receiver is dropped).
pub fn start(
    client: kube::Client,
    opts: IngressSourceOptions,
    node: watch::Receiver<ProxyConfig>,
) -> mpsc::Receiver<IngressUpdate> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(run(client, opts, node, tx));
    rx
}

/// A watch stream of one kind feeding its store; items are `()` or `(kind, error)`.
type Events = futures_util::stream::BoxStream<'static, Result<(), (&'static str, watcher::Error)>>;

fn reflect<K>(api: Api<K>, config: watcher::Config, kind: &'static str) -> (Store<K>, Events)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .map(move |r| r.map(|_| ()).map_err(|e| (kind, e)))
        .boxed();
    (store, stream)
}

fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn run(
    client: kube::Client,
    opts: IngressSourceOptions,
    node: watch::Receiver<ProxyConfig>,
    tx: mpsc::Sender<IngressUpdate>,
) {
    let ns = opts.namespace.as_deref();
    let all = watcher::Config::default();
    let (classes, s1) = reflect(
        Api::<IngressClass>::all(client.clone()),
        all.clone(),
        "IngressClass",
    );
    let (ingresses, s2) = reflect(api::<Ingress>(&client, ns), all.clone(), "Ingress");
    let (secrets, s3) = reflect(
        api::<Secret>(&client, ns),
        all.clone().fields(&format!("type={TLS_SECRET_TYPE}")),
        "Secret",
    );
    let (services, s4) = reflect(api::<Service>(&client, ns), all.clone(), "Service");
    let (slices, s5) = reflect(api::<EndpointSlice>(&client, ns), all, "EndpointSlice");
    // New node settings count as one more event: they go through the same batching.
    let node_changes: Events = futures_util::stream::unfold(node.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some((Ok(()), rx))
    })
    .boxed();
    let mut events = futures_util::stream::select_all([s1, s2, s3, s4, s5, node_changes]);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "xlb-proxy".into(),
            instance: Some(opts.identity.clone()),
        },
    );
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let mut last: Option<IngressTranslation> = None;
    // Ingresses whose status this process wrote: cleared when they stop being served.
    let mut written: BTreeSet<(String, String)> = BTreeSet::new();
    let mut pending: Option<Instant> = None;
    let mut relists = 0;
    loop {
        let next = match pending {
            Some(first) => {
                let left = (first + opts.batch).saturating_duration_since(Instant::now());
                tokio::time::timeout(left, events.next()).await.ok()
            }
            None => match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
                Ok(event) => Some(event),
                // Quiet period: retry status writes that failed (API server away, conflicts).
                Err(_) => {
                    if let Some(t) = &last
                        && !opts.publish.is_off()
                    {
                        write_status(&client, &ingresses, &services, t, &opts, &mut written).await;
                    }
                    continue;
                }
            },
        };
        match next {
            Some(Some(Ok(()))) => {
                pending.get_or_insert_with(Instant::now);
                continue;
            }
            Some(Some(Err((kind, e)))) => {
                if super::source::is_gone(&e) {
                    relists += 1;
                    tracing::info!(kind, "watch expired (410 Gone): relisting");
                } else {
                    tracing::warn!(kind, error = %e, "watch failed; retrying with backoff, last config keeps serving");
                }
                continue;
            }
            Some(None) => break,
            None => {}
        }
        let Some(since) = pending.take() else {
            continue;
        };
        if !(ready(&classes)
            && ready(&ingresses)
            && ready(&secrets)
            && ready(&services)
            && ready(&slices))
        {
            continue;
        }
        let (c, i, s, v, e) = (
            classes.state(),
            ingresses.state(),
            secrets.state(),
            services.state(),
            slices.state(),
        );
        let node_settings = node.borrow().clone();
        let translation = translate(
            &node_settings,
            c.iter().map(AsRef::as_ref),
            i.iter().map(AsRef::as_ref),
            s.iter().map(AsRef::as_ref),
            v.iter().map(AsRef::as_ref),
            e.iter().map(AsRef::as_ref),
            &opts.ingress,
        );
        for rejected in &translation.rejected {
            if reported.insert(rejected.to_string()) {
                tracing::warn!(ingress = %format!("{}/{}", rejected.namespace, rejected.name),
                    reason = %rejected.reason, "rejected an Ingress; everything else is served");
                publish(&recorder, rejected, "Rejected").await;
            }
        }
        for degraded in &translation.degraded {
            if reported.insert(degraded.to_string()) {
                tracing::warn!(ingress = %format!("{}/{}", degraded.namespace, degraded.name),
                    reason = %degraded.reason, "an Ingress backend is missing; its paths answer 503");
                publish(&recorder, degraded, "BackendMissing").await;
            }
        }
        // Once fixed, the same fault later deserves a new report.
        reported.retain(|r| {
            translation
                .rejected
                .iter()
                .chain(&translation.degraded)
                .any(|x| x.to_string() == *r)
        });
        for w in &translation.warnings {
            if warned.insert(w.clone()) {
                tracing::warn!("{w}");
            }
        }
        warned.retain(|w| translation.warnings.contains(w));
        if !opts.publish.is_off() {
            write_status(
                &client,
                &ingresses,
                &services,
                &translation,
                &opts,
                &mut written,
            )
            .await;
        }
        if last.as_ref() == Some(&translation) {
            continue;
        }
        last = Some(translation.clone());
        let update = IngressUpdate {
            translation,
            since,
            relists,
        };
        if tx.send(update).await.is_err() {
            break;
        }
    }
}

/// True once the store finished its first list (without waiting).
fn ready<K: kube::Resource + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures_util::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

/// A Warning Event on the Ingress (`reason`: `Rejected` or `BackendMissing`).
async fn publish(recorder: &Recorder, rejected: &Rejected, reason: &str) {
    let reference = ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("Ingress".into()),
        namespace: Some(rejected.namespace.clone()),
        name: Some(rejected.name.clone()),
        ..ObjectReference::default()
    };
    // Event notes are limited to 1 kB by the API.
    let note: String = rejected.reason.chars().take(1000).collect();
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Translate".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, "cannot publish the Event for an Ingress");
    }
}

/// The status entries for the publish addresses: IPs as `ip`, the rest as `hostname`.
pub fn status_entries(publish: &[String]) -> Vec<serde_json::Value> {
    publish
        .iter()
        .map(|a| match a.parse::<IpAddr>() {
            Ok(ip) => serde_json::json!({"ip": ip.to_string()}),
            Err(_) => serde_json::json!({"hostname": a}),
        })
        .collect()
}

/// The addresses to publish now, as status entries (None: status is not written).
fn wanted_status(publish: &Publish, services: &Store<Service>) -> Option<Vec<serde_json::Value>> {
    match publish {
        Publish::Off => None,
        Publish::Addresses(a) => Some(status_entries(a)),
        Publish::Service { namespace, name } => Some(
            services
                .get(&reflector::ObjectRef::new(name).within(namespace))
                .and_then(|s| s.status.clone())
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .into_iter()
                .flatten()
                .map(|i| entry(i.ip, i.hostname))
                .collect(),
        ),
    }
}

fn entry(ip: Option<String>, hostname: Option<String>) -> serde_json::Value {
    match (ip, hostname) {
        (Some(ip), _) => serde_json::json!({"ip": ip}),
        (None, Some(h)) => serde_json::json!({"hostname": h}),
        (None, None) => serde_json::json!({}),
    }
}

/// Writes `status.loadBalancer.ingress` of served Ingresses where it differs, and clears it
/// on Ingresses no longer served that hold our addresses or that this process wrote.
async fn write_status(
    client: &kube::Client,
    ingresses: &Store<Ingress>,
    services: &Store<Service>,
    translation: &IngressTranslation,
    opts: &IngressSourceOptions,
    written: &mut BTreeSet<(String, String)>,
) {
    let Some(wanted) = wanted_status(&opts.publish, services) else {
        return;
    };
    let params = PatchParams {
        field_manager: Some(format!("xlb-proxy/{}", opts.identity)),
        ..PatchParams::default()
    };
    let served: BTreeSet<&(String, String)> = translation.served.iter().collect();
    for ing in ingresses.state() {
        let (Some(namespace), Some(name)) = (&ing.metadata.namespace, &ing.metadata.name) else {
            continue;
        };
        let key = (namespace.clone(), name.clone());
        let current: Vec<serde_json::Value> = ing
            .status
            .clone()
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .into_iter()
            .flatten()
            .map(|i| entry(i.ip, i.hostname))
            .collect();
        let target = if served.contains(&key) {
            &wanted
        } else if !current.is_empty() && ((current == wanted) || written.contains(&key)) {
            &Vec::new()
        } else {
            written.remove(&key);
            continue;
        };
        if current == *target {
            continue;
        }
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": target}}});
        let api = Api::<Ingress>::namespaced(client.clone(), namespace);
        let what = format!("{namespace}/{name}");
        match api.patch_status(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) if target.is_empty() && !served.contains(&key) => {
                written.remove(&key);
                tracing::info!(ingress = %what, "no longer served: status cleared");
            }
            Ok(_) => {
                written.insert(key);
                tracing::info!(ingress = %what, addresses = ?target, "status written");
            }
            Err(e) => {
                tracing::warn!(ingress = %what, error = %e, "status write failed; retried on the next change or within 10 s")
            }
        }
    }
}

/// Runs the proxy from Kubernetes until SIGTERM/SIGINT: waits for the first complete
/// translation, starts the listeners with it, then swaps every later one in live.
pub async fn serve(
    opts: IngressSourceOptions,
    node_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (node_tx, node_rx) = watch::channel(opts.node.clone());
    // The node settings file is re-read when it changes and on SIGHUP; settings that do not
    // validate are logged and the previous ones kept.
    let reread_node = {
        let file = node_file.clone();
        std::sync::Arc::new(
            move || match super::ingress::load_node_settings(file.as_deref()) {
                Ok(n) => {
                    if node_tx.send_if_modified(|cur| {
                        let changed = *cur != n;
                        *cur = n;
                        changed
                    }) {
                        tracing::info!("node settings changed; re-translating");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "node settings rejected; keeping the previous ones")
                }
            },
        )
    };
    let _node_watch = match &node_file {
        Some(p) => {
            let reread = reread_node.clone();
            Some(
                crate::proxy::watch::on_change(p.clone(), move || reread())
                    .context("watching the node settings file")?,
            )
        }
        None => None,
    };
    let mut rx = spawn(opts, node_rx)
        .await
        .context("connecting to the Kubernetes API")?;
    tracing::info!(
        "waiting for the initial lists of IngressClasses, Ingresses, Secrets, Services and EndpointSlices"
    );
    // Listeners open only with a complete rule set: answering 404 for every host while the
    // lists load would fail requests during a rolling update.
    let first = tokio::select! {
        u = rx.recv() => u.context("the Kubernetes source ended before its first list")?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
        _ = term.recv() => return Ok(()),
    };
    log_update(&first);
    let handle = crate::proxy::start(first.translation.config).context("starting the proxy")?;
    tracing::info!(
        http = ?handle.http_addr,
        https = ?handle.https_addr,
        metrics = ?handle.metrics_addr,
        "xlb proxy running"
    );
    let reloader = handle.reloader();
    loop {
        tokio::select! {
            u = rx.recv() => {
                let Some(update) = u else {
                    anyhow::bail!("the Kubernetes source ended");
                };
                log_update(&update);
                let r = reloader.clone();
                let since = update.since;
                // Building routes and loading certificates is CPU work: off the runtime.
                let result = tokio::task::spawn_blocking(move || r.apply(update.translation.config)).await?;
                match result {
                    Ok(()) => tracing::info!(latency_ms = since.elapsed().as_millis() as u64, "kubernetes configuration applied"),
                    Err(e) => tracing::error!(error = %e, "kubernetes configuration rejected; keeping the previous one"),
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => reread_node(),
        }
    }
    tracing::info!("draining connections, then shutting down");
    tokio::task::spawn_blocking(move || handle.drain()).await?;
    Ok(())
}

fn log_update(u: &IngressUpdate) {
    tracing::info!(
        ingresses = u.translation.served.len(),
        rejected = u.translation.rejected.len(),
        services = u.translation.config.services.len(),
        endpoints = u
            .translation
            .config
            .services
            .iter()
            .map(|s| s.endpoints.len())
            .sum::<usize>(),
        secrets = u.translation.config.secrets.len(),
        relists = u.relists,
        "kubernetes state translated"
    );
}
