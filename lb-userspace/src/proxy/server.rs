//! Listeners, workers and the forwarding path.
//!
//! Each worker is an OS thread with a current-thread tokio runtime and its own SO_REUSEPORT
//! listening socket per listener, so the kernel spreads connections and a connection's
//! downstream socket, its upstream connections and its tasks stay on one thread. Requests
//! read the configuration through one `ArcSwap` load, so a reload never disturbs requests or
//! upgraded connections already running.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::access_log::LogRecord;
use super::body::{ReqBody, RespBody};
use super::client::{Exchange, ExchangeError, ResponseHead, UpstreamBody, UpstreamConn};
use super::config::{Annotations, ConfigError, ProxyConfig, UpstreamProtocol};
use super::h1guard::GuardedIo;
use super::h2_upstream::{self, BodyFault, NotProcessed, WatchedBody};
use super::head::{
    ClientText, Headers, Origin, RequestHead, RequestId, X_FORWARDED_PROTO, encode_request,
    nominated, original_client,
};
use super::metrics::{Metrics, RuleCounters};
use super::path;
use super::proxy_protocol;
use super::routing::RouteTable;
use super::timer::{LazySleep, Progress, until_stalled};
use super::tls::{CertStore, TlsError};
use super::upstream::{self, Endpoint, PickContext, Upstream, UpstreamMap};
use super::upstream_tls::TlsOrigination;

mod h1;

/// Why the proxy could not start or a configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// rustls refused the listener configuration.
    #[error("TLS listener configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// A worker thread or runtime could not be started.
    #[error("cannot start worker: {0}")]
    Worker(std::io::Error),
}

/// A matched route.
#[derive(Debug)]
pub(crate) struct Route {
    rule: Arc<str>,
    upstream: Arc<Upstream>,
    ssl_redirect: bool,
    max_body: u64,
    counters: RuleCounters,
}

/// Connection-level settings, captured when a connection is accepted.
#[derive(Debug, Clone)]
struct Settings {
    connect: Duration,
    header: Duration,
    /// Each wait for more of a client's request body (408).
    request_body: Duration,
    /// An upgraded connection silent both ways for this long is closed.
    tunnel_idle: Duration,
    response: Duration,
    idle: Duration,
    max_header_bytes: usize,
    h2_streams: u32,
    h2_pending_resets: usize,
    h2_local_resets: usize,
    access_log: bool,
    https_redirect_port: Option<u16>,
    merge_slashes: bool,
    /// `forwarded_headers.trusted_proxies`.
    trusted_proxies: Arc<[ipnet::IpNet]>,
    /// `request_id.enabled`.
    request_id: bool,
}

/// Everything a request reads, swapped as one unit on reload.
#[derive(Debug)]
pub(crate) struct State {
    cfg: Arc<ProxyConfig>,
    routes: RouteTable<Arc<Route>>,
    upstreams: UpstreamMap,
    certs: CertStore,
    no_match: RuleCounters,
    settings: Settings,
}

impl State {
    fn build(
        cfg: Arc<ProxyConfig>,
        previous: Option<&State>,
        metrics: &Metrics,
        workers: usize,
    ) -> Result<Self, ProxyError> {
        cfg.validate()?;
        let certs = CertStore::from_config(&cfg)?;
        let upstreams = upstream::build_upstreams(
            &cfg.services,
            &cfg.secrets,
            workers,
            previous.map(|p| &p.upstreams),
            metrics,
        )?;
        let mut routes = RouteTable::default();
        for (i, ing) in cfg.ingresses.iter().enumerate() {
            if !cfg.serves(ing) {
                continue;
            }
            let ann = Annotations::parse(ing, &format!("ingresses[{i}]"))?;
            let max_body = ann.max_body_bytes.unwrap_or(cfg.limits.max_body_bytes);
            let route = |rule: String, service: &str, port: u16| {
                let key = (ing.namespace.clone(), service.to_owned(), port);
                // validate() guarantees every backend names a configured service port.
                upstreams.get(&key).map(|u| {
                    Arc::new(Route {
                        counters: metrics.rule(&rule),
                        rule: rule.into(),
                        upstream: u.clone(),
                        ssl_redirect: ann.ssl_redirect,
                        max_body,
                    })
                })
            };
            if let Some(b) = &ing.default_backend
                && let Some(r) = route(
                    format!("{}/{}:default", ing.namespace, ing.name),
                    &b.service,
                    b.port,
                )
            {
                routes.set_default(r);
            }
            for rule in &ing.rules {
                for p in &rule.paths {
                    let label = format!(
                        "{}/{}:{}{}",
                        ing.namespace,
                        ing.name,
                        rule.host.as_deref().unwrap_or("*"),
                        p.path
                    );
                    if let Some(r) = route(label, &p.backend.service, p.backend.port) {
                        // Requests are matched in normal form (upper-case escapes); so
                        // are rules. Validation refused paths that cannot normalise.
                        let path = path::normalise(&p.path, cfg.paths.merge_slashes)
                            .unwrap_or(Cow::Borrowed(&p.path));
                        routes.add(rule.host.as_deref(), &path, p.path_type, r);
                    }
                }
            }
        }
        let t = &cfg.timeouts;
        let settings = Settings {
            connect: Duration::from_millis(t.connect_ms),
            header: Duration::from_millis(t.request_header_ms),
            request_body: Duration::from_millis(t.request_body_ms),
            tunnel_idle: Duration::from_millis(t.tunnel_idle_ms),
            response: Duration::from_millis(t.upstream_response_ms),
            idle: Duration::from_millis(t.idle_ms),
            max_header_bytes: cfg.limits.max_header_bytes,
            h2_streams: cfg.limits.h2_max_concurrent_streams,
            h2_pending_resets: cfg.limits.h2_max_pending_reset_streams,
            h2_local_resets: cfg.limits.h2_max_local_error_reset_streams,
            access_log: cfg.access_log,
            https_redirect_port: cfg.listen.https_redirect_port,
            merge_slashes: cfg.paths.merge_slashes,
            trusted_proxies: cfg.forwarded_headers.trusted_proxies.clone().into(),
            request_id: cfg.request_id.enabled,
        };
        Ok(Self {
            no_match: metrics.rule("-"),
            cfg,
            routes,
            upstreams,
            certs,
            settings,
        })
    }
}

/// State shared by all workers.
#[derive(Debug)]
struct Shared {
    state: ArcSwap<State>,
    metrics: Arc<Metrics>,
    workers: usize,
    /// Serialises reloads so that endpoint state carries over from the latest one.
    reload_lock: Mutex<()>,
    /// Set when shutdown begins: HTTP/1 responses then carry `Connection: close`.
    draining: AtomicBool,
    /// Open downstream connections, all workers.
    open: AtomicUsize,
    /// The lifecycle phase (HTTP/2 connections send GOAWAY when draining starts).
    phase: watch::Receiver<u8>,
}

/// Lifecycle phases broadcast to the workers.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const STOPPED: u8 = 2;

/// A running proxy. Dropping it stops the workers.
#[derive(Debug)]
pub struct ProxyHandle {
    /// Bound plain-HTTP address (with the real port when configured with port 0).
    pub http_addr: Option<SocketAddr>,
    /// Bound TLS address.
    pub https_addr: Option<SocketAddr>,
    /// Bound metrics address.
    pub metrics_addr: Option<SocketAddr>,
    reloader: Reloader,
    stop: watch::Sender<u8>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Applies new configurations to a running proxy (cloneable, e.g. for a file watcher).
#[derive(Debug, Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
}

impl Reloader {
    /// Validates `cfg`, builds routes, certificates and upstreams, and swaps them in
    /// atomically. On error nothing changes. Listener addresses and the worker count are
    /// fixed at start; changes to them are reported and ignored.
    pub fn apply(&self, cfg: ProxyConfig) -> Result<(), ProxyError> {
        let _serial = self
            .shared
            .reload_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let current = self.shared.state.load_full();
        let result = State::build(
            Arc::new(cfg),
            Some(&current),
            &self.shared.metrics,
            self.shared.workers,
        );
        self.shared.metrics.reload(result.is_ok());
        let next = result?;
        if next.cfg.listen != current.cfg.listen {
            tracing::warn!("listen settings changed: they take effect after a restart");
        }
        self.shared.state.store(Arc::new(next));
        Ok(())
    }
}

impl ProxyHandle {
    /// See [`Reloader::apply`].
    pub fn apply(&self, cfg: ProxyConfig) -> Result<(), ProxyError> {
        self.reloader.apply(cfg)
    }

    /// A handle for applying configurations from elsewhere.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The metrics registry (for embedding and tests).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.reloader.shared.metrics.clone()
    }

    /// Stops the workers and waits for their threads. Connections still open are closed.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    /// Graceful shutdown: closes the listeners, lets open connections finish their requests
    /// (HTTP/1 responses get `Connection: close`, HTTP/2 connections GOAWAY) for up to
    /// `timeouts.shutdown_grace_ms`, then stops.
    pub fn drain(mut self) {
        let shared = &self.reloader.shared;
        let grace = Duration::from_millis(shared.state.load().cfg.timeouts.shutdown_grace_ms);
        shared.draining.store(true, Ordering::SeqCst);
        let _ = self.stop.send(DRAINING);
        let deadline = Instant::now() + grace;
        while shared.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = shared.open.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(
                connections = left,
                "grace period over; closing the remaining connections"
            );
        }
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(STOPPED);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    use socket2::{Domain, Socket, Type};
    let bind_err = |source| ProxyError::Bind { addr, source };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_err)?;
    s.set_reuse_address(true).map_err(bind_err)?;
    // One socket per worker on the same port: the kernel balances accepts across them.
    s.set_reuse_port(true).map_err(bind_err)?;
    s.set_nonblocking(true).map_err(bind_err)?;
    s.set_tcp_nodelay(true).map_err(bind_err)?;
    s.bind(&addr.into()).map_err(bind_err)?;
    s.listen(4096).map_err(bind_err)?;
    Ok(s.into())
}

/// One socket per worker, all on the same port (resolved from the first when port is 0).
fn bind_all(
    addr: SocketAddr,
    workers: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ProxyError> {
    let first = reuseport_listener(addr)?;
    let bound = first
        .local_addr()
        .map_err(|source| ProxyError::Bind { addr, source })?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(reuseport_listener(bound)?);
    }
    Ok((bound, all))
}

/// Starts the proxy: binds the listeners and spawns the workers. Call from any context (it
/// does not need a runtime).
pub fn start(cfg: ProxyConfig) -> Result<ProxyHandle, ProxyError> {
    let workers = cfg.worker_count();
    let metrics = Arc::new(Metrics::new());
    let state = State::build(Arc::new(cfg), None, &metrics, workers)?;
    let listen = state.cfg.listen.clone();
    // A property of the listeners (what the load balancer in front sends): fixed at start.
    let proxy_protocol = listen.proxy_protocol;
    let tls13_only = state.cfg.tls.tls13_only;
    let (stop, stop_rx) = watch::channel(RUNNING);
    let shared = Arc::new(Shared {
        state: ArcSwap::from_pointee(state),
        metrics,
        workers,
        reload_lock: Mutex::new(()),
        draining: AtomicBool::new(false),
        open: AtomicUsize::new(0),
        phase: stop_rx.clone(),
    });

    let (http_addr, mut http_socks) = match listen.http {
        Some(a) => {
            let (b, s) = bind_all(a, workers)?;
            (Some(b), s)
        }
        None => (None, Vec::new()),
    };
    let (https_addr, mut https_socks) = match listen.https {
        Some(a) => {
            let (b, s) = bind_all(a, workers)?;
            (Some(b), s)
        }
        None => (None, Vec::new()),
    };
    let tls = if https_addr.is_some() {
        let s = shared.clone();
        let lookup = move |sni: Option<&str>| s.state.load().certs.lookup(sni);
        Some(tokio_rustls::TlsAcceptor::from(super::tls::server_config(
            Arc::new(lookup),
            tls13_only,
        )?))
    } else {
        None
    };
    let mut metrics_sock = match listen.metrics {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|source| ProxyError::Bind { addr, source })?;
            l.set_nonblocking(true)
                .map_err(|source| ProxyError::Bind { addr, source })?;
            Some(l)
        }
        None => None,
    };
    let metrics_addr = match &metrics_sock {
        Some(l) => Some(l.local_addr().map_err(|source| {
            ProxyError::Bind {
                addr: listen
                    .metrics
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
                source,
            }
        })?),
        None => None,
    };

    let mut threads = Vec::with_capacity(workers);
    for w in 0..workers {
        let http = http_socks.pop();
        let https = https_socks.pop();
        let metrics_l = if w == 0 { metrics_sock.take() } else { None };
        let shared = shared.clone();
        let tls = tls.clone();
        let mut stop_rx = stop_rx.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ProxyError::Worker)?;
        let t = std::thread::Builder::new()
            .name(format!("xlb-proxy-{w}"))
            .spawn(move || {
                upstream::set_worker_index(w);
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    if let Some(l) = http {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => tasks.push(tokio::spawn(accept_loop(
                                l,
                                shared.clone(),
                                None,
                                proxy_protocol,
                            ))),
                            Err(e) => tracing::error!(error = %e, "http listener"),
                        }
                    }
                    if let (Some(l), Some(tls)) = (https, tls) {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => tasks.push(tokio::spawn(accept_loop(
                                l,
                                shared.clone(),
                                Some(tls),
                                proxy_protocol,
                            ))),
                            Err(e) => tracing::error!(error = %e, "https listener"),
                        }
                    }
                    // Active health checks: one task for all workers, on the first.
                    let health_task = (w == 0).then(|| {
                        let s = shared.clone();
                        tokio::spawn(super::health::run(move || {
                            s.state
                                .load()
                                .upstreams
                                .values()
                                .filter(|u| u.active_health().enabled())
                                .cloned()
                                .collect()
                        }))
                    });
                    let mut metrics_task = None;
                    if let Some(l) = metrics_l {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => {
                                let serving = shared.clone();
                                let scraped = shared.clone();
                                metrics_task = Some(tokio::spawn(super::metrics::serve(
                                    l,
                                    shared.metrics.clone(),
                                    Arc::new(move || !serving.draining.load(Ordering::Relaxed)),
                                    Arc::new(move || {
                                        let state = scraped.state.load();
                                        scraped.metrics.set_upstream_endpoints(
                                            state
                                                .upstreams
                                                .values()
                                                .map(|u| (&*u.name, u.endpoint_states())),
                                        );
                                    }),
                                )))
                            }
                            Err(e) => tracing::error!(error = %e, "metrics listener"),
                        }
                    }
                    // Draining: stop accepting (dropping the listeners refuses new
                    // connections) while the connection tasks finish.
                    let _ = stop_rx.wait_for(|p| *p >= DRAINING).await;
                    for t in tasks {
                        t.abort();
                    }
                    // Stopped (or the handle dropped): returning drops the runtime and with it
                    // every connection still open.
                    let _ = stop_rx.wait_for(|p| *p >= STOPPED).await;
                    for t in metrics_task.into_iter().chain(health_task) {
                        t.abort();
                    }
                });
                // Connections still open go with the runtime; then the recycled timers.
                drop(rt);
                super::timer::clear_spares();
            })
            .map_err(ProxyError::Worker)?;
        threads.push(t);
    }
    Ok(ProxyHandle {
        http_addr,
        https_addr,
        metrics_addr,
        reloader: Reloader { shared },
        stop,
        threads,
    })
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxy_protocol: bool,
) {
    let gauge = shared
        .metrics
        .open_connections(if tls.is_some() { "https" } else { "http" });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        let gauge = gauge.clone();
        tokio::spawn(async move {
            gauge.inc();
            shared.open.fetch_add(1, Ordering::SeqCst);
            serve_connection(shared.clone(), stream, peer, tls, proxy_protocol).await;
            shared.open.fetch_sub(1, Ordering::SeqCst);
            gauge.dec();
        });
    }
}

/// Per-connection context shared by the connection's requests.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    peer: SocketAddr,
    https: bool,
    /// The client address as written in X-Forwarded-For and Forwarded.
    client_text: ClientText,
    /// When the peer is a trusted proxy: the trusted networks, to find the original client
    /// in its requests' `X-Forwarded-For`.
    trusted_proxies: Option<Arc<[ipnet::IpNet]>>,
    active: AtomicUsize,
    last_active_ms: AtomicU64,
    born: Instant,
    /// Whether requests mark the connection busy for the idle watchdog (HTTP/2 only).
    track_idle: bool,
    /// A spare buffer for upstream request heads: an HTTP/1 connection has one request at a
    /// time, so after its first request no head needs an allocation.
    head_buf: Mutex<Vec<u8>>,
}

impl ConnCtx {
    fn take_head_buf(&self) -> Vec<u8> {
        std::mem::take(&mut *self.head_buf.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn put_head_buf(&self, buf: Vec<u8>) {
        // A head of huge headers is not worth keeping.
        if buf.capacity() <= 16 * 1024 {
            *self.head_buf.lock().unwrap_or_else(|e| e.into_inner()) = buf;
        }
    }

    /// Where a request with these headers came from.
    fn origin<'a>(&'a self, headers: &Headers<'_>) -> Origin<'a> {
        Origin {
            peer: &self.client_text,
            trusted: self.trusted_proxies.is_some(),
            client: match &self.trusted_proxies {
                None => self.peer.ip(),
                Some(nets) => original_client(self.peer.ip(), headers, nets),
            },
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }
}

/// Marks a request in flight on its connection until dropped (with the response body).
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<ConnCtx>);

impl ActiveGuard {
    fn new(c: Arc<ConnCtx>) -> Self {
        c.active.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain connection starts with the HTTP/2 preface (h2c with prior knowledge).
async fn starts_with_h2_preface(s: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 24];
    // Bounded: a client dribbling a partial preface is cut off by the caller's header timeout.
    for _ in 0..1000 {
        let n = s.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(false)
}

async fn serve_connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    mut peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxy_protocol: bool,
) {
    let settings = shared.state.load().settings.clone();
    if proxy_protocol {
        // The load balancer's header names the client, who then stands for the peer
        // everywhere: forwarding headers, trust, affinity, logs.
        match tokio::time::timeout(settings.header, proxy_protocol::read_header(&mut stream)).await
        {
            Ok(Ok(client)) => peer = client.unwrap_or(peer),
            Ok(Err(e)) => {
                shared.metrics.proxy_protocol_rejected();
                tracing::debug!(%peer, error = %e, "connection closed");
                return;
            }
            Err(_) => {
                shared.metrics.proxy_protocol_rejected();
                tracing::debug!(%peer, "PROXY header timed out");
                return;
            }
        }
    }
    let mut ctx = ConnCtx {
        peer,
        https: tls.is_some(),
        client_text: ClientText::new(peer.ip()),
        trusted_proxies: super::config::is_in(&settings.trusted_proxies, peer.ip())
            .then(|| settings.trusted_proxies.clone()),
        active: AtomicUsize::new(0),
        last_active_ms: AtomicU64::new(0),
        born: Instant::now(),
        track_idle: false,
        head_buf: Mutex::new(Vec::new()),
    };
    match tls {
        Some(acceptor) => {
            let accepted = tokio::time::timeout(settings.header, acceptor.accept(stream)).await;
            let tls_stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                ctx.track_idle = true;
                serve_h2(shared, Arc::new(ctx), TokioIo::new(tls_stream), &settings).await;
            } else {
                h1::serve(shared, Arc::new(ctx), tls_stream, &settings).await;
            }
        }
        None => {
            match tokio::time::timeout(settings.header, starts_with_h2_preface(&stream)).await {
                Ok(Ok(true)) => {
                    ctx.track_idle = true;
                    serve_h2(shared, Arc::new(ctx), TokioIo::new(stream), &settings).await
                }
                Ok(Ok(false)) => h1::serve(shared, Arc::new(ctx), stream, &settings).await,
                _ => {}
            }
        }
    }
}

fn service(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<RespBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<RespBody>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req| {
        // Everything that needs the request head runs here, synchronously, when hyper hands
        // over the request; the future keeps only what the exchange needs (see `prepare`).
        let prepared = prepare(&shared, &ctx, req);
        let shared = shared.clone();
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&shared, ctx, prepared).await) }
    })
}

async fn serve_h1<I>(shared: Arc<Shared>, ctx: Arc<ConnCtx>, io: TokioIo<I>, s: &Settings)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(super::timer::RecyclingTimer)
        // hyper starts this timer whenever it waits for a request head, so it also bounds
        // how long a keep-alive connection may sit idle (see docs/proxy.md).
        // ... and so it is also the keep-alive idle timeout for HTTP/1.1: no per-connection
        // watchdog timer has to be polled on every wake-up.
        .header_read_timeout(s.header.min(s.idle))
        .max_header_size(s.max_header_bytes)
        .max_buf_size(s.max_header_bytes.max(8192) + 4096);
    let conn = b
        .serve_connection(io, service(shared, ctx.clone()))
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(peer = %ctx.peer, error = %e, "connection ended with error");
    }
}

async fn serve_h2<I>(shared: Arc<Shared>, ctx: Arc<ConnCtx>, io: TokioIo<I>, s: &Settings)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(s.h2_streams)
        .max_pending_accept_reset_streams(s.h2_pending_resets)
        .max_local_error_reset_streams(s.h2_local_resets)
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX));
    let phase = shared.phase.clone();
    let conn = b.serve_connection(io, service(shared, ctx.clone()));
    drive_with_idle_timeout(conn, &ctx, s.idle, phase, |c| c.graceful_shutdown()).await;
}

/// Runs an HTTP/2 connection, shutting it down gracefully (GOAWAY) once it has had no stream
/// in flight for `idle`, or when the proxy starts draining.
async fn drive_with_idle_timeout<C, E>(
    conn: C,
    ctx: &ConnCtx,
    idle: Duration,
    mut phase: watch::Receiver<u8>,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = pin!(conn);
    let mut shutdown = Some(shutdown);
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %ctx.peer, error = %e, "connection ended with error");
                }
                return;
            }
            changed = phase.wait_for(|p| *p >= DRAINING), if !draining => {
                draining = true;
                if changed.is_ok() && let Some(f) = shutdown.take() {
                    f(conn.as_mut());
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let Some(f) = shutdown.take() else {
                    // Graceful shutdown did not finish within another idle period: drop it.
                    return;
                };
                let last = ctx.born + Duration::from_millis(ctx.last_active_ms.load(Ordering::Relaxed));
                let idle_until = tokio::time::Instant::from_std(last + idle);
                if ctx.active.load(Ordering::Relaxed) == 0 && idle_until <= tokio::time::Instant::now() {
                    f(conn.as_mut());
                    deadline = tokio::time::Instant::now() + idle;
                } else {
                    shutdown = Some(f);
                    deadline = idle_until.max(tokio::time::Instant::now() + Duration::from_millis(50));
                }
            }
        }
    }
}

/// The text of an error page: the status line's, nothing about internals.
fn error_text(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "400 Bad Request\n",
        StatusCode::NOT_FOUND => "404 Not Found\n",
        StatusCode::REQUEST_TIMEOUT => "408 Request Timeout\n",
        StatusCode::PAYLOAD_TOO_LARGE => "413 Content Too Large\n",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "431 Request Header Fields Too Large\n",
        StatusCode::BAD_GATEWAY => "502 Bad Gateway\n",
        StatusCode::SERVICE_UNAVAILABLE => "503 Service Unavailable\n",
        StatusCode::GATEWAY_TIMEOUT => "504 Gateway Timeout\n",
        _ => "error\n",
    }
}

/// Error pages: status line text only, nothing about internals.
fn error_page(status: StatusCode) -> Response<RespBody> {
    let text = error_text(status);
    let mut r = Response::new(RespBody::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// What the answer's form depends on in the client's request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Client {
    /// HTTP/1.x (a draining proxy marks answers `Connection: close`).
    pub(super) http1: bool,
    /// A gRPC call (HTTP/2, `content-type: application/grpc…`): errors answered the gRPC way.
    pub(super) grpc: bool,
}

/// The outcome of forwarding, for metrics and the access log.
struct Outcome {
    resp: Response<RespBody>,
    route: Option<Arc<Route>>,
    endpoint: Option<SocketAddr>,
    /// `resp` is the proxy's own error page, not an endpoint's answer.
    error_page: bool,
}

impl Outcome {
    fn local(status: StatusCode, route: Option<Arc<Route>>) -> Self {
        Self {
            resp: error_page(status),
            route,
            endpoint: None,
            error_page: true,
        }
    }
}

/// The proxy's error `status` as a gRPC client expects it: a trailers-only response (200,
/// `grpc-status`, `grpc-message`, no body), with the code gRPC's own HTTP-status mapping
/// gives (so clients read the same code as before, with a message), and
/// RESOURCE_EXHAUSTED for a body over the route's limit, as gRPC servers answer a message
/// over their limit.
fn grpc_error(status: StatusCode) -> Response<RespBody> {
    let code = match status.as_u16() {
        400 => "13",                   // INTERNAL
        401 => "16",                   // UNAUTHENTICATED
        403 => "7",                    // PERMISSION_DENIED
        404 => "12",                   // UNIMPLEMENTED
        413 => "8",                    // RESOURCE_EXHAUSTED
        429 | 502 | 503 | 504 => "14", // UNAVAILABLE
        _ => "2",                      // UNKNOWN
    };
    let mut r = Response::new(RespBody::empty());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static(code));
    // The error page's text: printable ASCII without '%', so no percent-encoding.
    h.insert(
        "grpc-message",
        HeaderValue::from_static(error_text(status).trim_end()),
    );
    r
}

/// A request as far as it can be taken without waiting: routed, checked, and when it goes
/// upstream, its head encoded.
struct Prepared {
    start: Instant,
    active: Option<ActiveGuard>,
    state: Arc<State>,
    client: Client,
    /// For the access log, when it is on.
    log_fields: Option<Box<LogFields>>,
    next: Next,
}

/// What the access log needs of a request head, taken before the head is consumed.
pub(crate) struct LogFields {
    method: Method,
    /// Host as requested.
    host: String,
    /// Path and query as requested.
    path: String,
    /// The original client ([`Origin::client`]).
    real_ip: std::net::IpAddr,
    /// `X-Request-ID`, when the proxy sets it.
    request_id: Option<Box<str>>,
}

// `Forward` is the common case and moves once; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// Answered locally (error, redirect); boxed, as these are the exception.
    Done(Box<Outcome>),
    Forward(Forward),
}

/// What the upstream exchange needs of a request.
struct Forward {
    route: Arc<Route>,
    method: Method,
    /// The encoded upstream request head.
    head: Vec<u8>,
    chunked: bool,
    body: ReqBody,
    /// The request's key for consistent hashing.
    affinity: u64,
    /// The request's header map, emptied: the response head is read into it (hyper hands
    /// the response's map back for the next request head, so the maps circulate).
    headers: HeaderMap,
    /// For the HTTP/1.1 fast path: the response's header lines go here instead of into
    /// `headers` (see [`h1`]).
    raw_lines: Option<Vec<u8>>,
    /// Set by the exchange: the upstream's response carried a Date header.
    upstream_date: bool,
    /// See [`Routed::te_trailers`].
    te_trailers: bool,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Runs when hyper hands the request over. The request's URI and header values are slices
/// of hyper's read buffer; hyper reserves room in that buffer right after dispatching the
/// request (to notice a client closing mid-request), and while any slice is alive that
/// means a fresh 8 KiB allocation. So the head is consumed here and dropped before hyper
/// gets there.
fn prepare(shared: &Shared, ctx: &Arc<ConnCtx>, req: Request<Incoming>) -> Prepared {
    let start = Instant::now();
    let active = ctx.track_idle.then(|| ActiveGuard::new(ctx.clone()));
    let state = shared.state.load_full();
    let origin = ctx.origin(&Headers::Map(req.headers()));
    let request_id = state
        .settings
        .request_id
        .then(|| RequestId::of(&Headers::Map(req.headers())));
    let log_fields = state.settings.access_log.then(|| {
        Box::new(LogFields {
            method: req.method().clone(),
            host: request_host(&req).unwrap_or("-").to_owned(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            real_ip: origin.client,
            request_id: request_id.as_ref().map(|id| id.as_str().into()),
        })
    });
    let http1 = req.version() <= Version::HTTP_11;
    let grpc = !http1
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let next = route_request(&state, ctx, origin, request_id.as_ref(), req);
    Prepared {
        start,
        active,
        state,
        client: Client { http1, grpc },
        log_fields,
        next,
    }
}

async fn handle(shared: &Shared, ctx: Arc<ConnCtx>, prepared: Prepared) -> Response<RespBody> {
    let Prepared {
        start,
        active,
        state,
        client,
        log_fields,
        next,
    } = prepared;
    let out = match next {
        Next::Done(out) => *out,
        Next::Forward(f) => forward(&state, &ctx, f).await,
    };
    finish(shared, &ctx, start, &state, client, log_fields, active, out)
}

/// Counts the answer in the metrics, marks it `Connection: close` when draining (for an
/// HTTP/1 connection served by hyper), and attaches the access-log record and the busy mark
/// to its body.
#[allow(clippy::too_many_arguments)]
fn finish(
    shared: &Shared,
    ctx: &ConnCtx,
    start: Instant,
    state: &State,
    client: Client,
    log_fields: Option<Box<LogFields>>,
    active: Option<ActiveGuard>,
    out: Outcome,
) -> Response<RespBody> {
    let Client { http1, grpc } = client;
    let status = out.resp.status();
    match &out.route {
        Some(r) => r.counters.count(status.as_u16()),
        None => state.no_match.count(status.as_u16()),
    }
    shared
        .metrics
        .observe_latency(start.elapsed().as_secs_f64());
    // A gRPC call's error is answered the gRPC way, and counted and logged with the HTTP
    // status it stands for.
    let mut resp = if grpc && out.error_page && status.as_u16() >= 400 {
        grpc_error(status)
    } else {
        out.resp
    };
    if grpc {
        resp.body_mut().set_grpc_client();
    }
    if http1 && status != StatusCode::SWITCHING_PROTOCOLS && shared.draining.load(Ordering::Relaxed)
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(fields) = log_fields {
        let LogFields {
            method,
            host,
            path,
            real_ip,
            request_id,
        } = *fields;
        resp.body_mut().set_log(Some(Box::new(LogRecord {
            start,
            client: ctx.peer,
            real_ip,
            request_id,
            method,
            host,
            path,
            rule: out
                .route
                .as_ref()
                .map_or_else(|| Arc::from("-"), |r| r.rule.clone()),
            upstream: out.endpoint,
            status: status.as_u16(),
        })));
    }
    if let Some(active) = active {
        resp.body_mut().set_active(active);
    }
    resp
}

fn request_host(req: &Request<Incoming>) -> Option<&str> {
    host_of(req.uri(), req.headers())
}

/// The target's authority (absolute form, HTTP/2 `:authority`), else the Host header.
fn host_of<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()))
}

fn header_bytes(h: &HeaderMap) -> usize {
    h.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum()
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Routes a request and, when it goes upstream, encodes its head; consumes the request head.
/// A request head as routing sees it, from hyper's request or the fast path's parse.
struct View<'a> {
    method: &'a Method,
    /// HTTP/1.1 (only such requests can ask for an upgrade).
    http11: bool,
    path: &'a str,
    /// Origin-form target: path and query.
    target: &'a str,
    /// The target's authority, else the first Host header (None: 400).
    host: Option<&'a str>,
    headers: Headers<'a>,
    /// Where the request came from ([`ConnCtx::origin`]).
    origin: Origin<'a>,
    /// Its `X-Request-ID`, when the proxy sets one.
    request_id: Option<&'a RequestId>,
    /// Content-Length (or HTTP/2's content-length).
    declared_len: Option<u64>,
    /// A body follows.
    has_body: bool,
}

/// A routed request whose upstream head is encoded.
struct Routed {
    route: Arc<Route>,
    chunked: bool,
    upgrade: bool,
    affinity: u64,
    /// The client accepts trailers (`TE: trailers`) and the upstream speaks HTTP/2: the
    /// hop-by-hop TE is sent on to it (gRPC servers require it).
    te_trailers: bool,
}

/// Routes a request head and encodes its upstream head into `head`; the `Err` is the local
/// answer (400 without host, 404, redirect, 413).
fn route_view(
    state: &State,
    ctx: &ConnCtx,
    v: &View<'_>,
    head: &mut Vec<u8>,
) -> Result<Routed, Box<Outcome>> {
    let s = &state.settings;
    let Some(host) = v.host else {
        return Err(Box::new(Outcome::local(StatusCode::BAD_REQUEST, None)));
    };
    // Routing and the upstream see the normalised path (see `proxy::path`).
    let Ok(path) = path::normalise(v.path, s.merge_slashes) else {
        return Err(Box::new(Outcome::local(StatusCode::BAD_REQUEST, None)));
    };
    let Some(route) = state.routes.lookup(Some(host), &path).cloned() else {
        return Err(Box::new(Outcome::local(StatusCode::NOT_FOUND, None)));
    };
    // Behind a trusted proxy, the scheme the client used is the one that proxy names.
    if route.ssl_redirect
        && !ctx.https
        && !(v.origin.trusted
            && v.headers
                .get(&X_FORWARDED_PROTO)
                .is_some_and(|p| p.trim_ascii().eq_ignore_ascii_case(b"https")))
    {
        return Err(Box::new(redirect_to_https(
            v.target,
            host,
            s.https_redirect_port,
            route,
        )));
    }
    if v.declared_len.is_some_and(|n| n > route.max_body) {
        return Err(Box::new(Outcome::local(
            StatusCode::PAYLOAD_TOO_LARGE,
            Some(route),
        )));
    }
    // A body of unknown length is sent chunked; one with a declared length keeps its
    // Content-Length header.
    let chunked = v.has_body && v.declared_len.is_none();
    let target = match path {
        Cow::Borrowed(_) => Cow::Borrowed(v.target),
        // The query (everything after the path) is passed on as the client sent it.
        Cow::Owned(mut p) => {
            p.push_str(v.target.get(v.path.len()..).unwrap_or_default());
            Cow::Owned(p)
        }
    };
    let encoded = encode_request(
        head,
        &RequestHead {
            method: v.method,
            target: &target,
            host,
            headers: v.headers,
            may_upgrade: v.http11,
            chunked,
            origin: v.origin,
            https: ctx.https,
            request_id: v.request_id,
        },
    );
    let affinity = route.upstream.affinity(&PickContext {
        client_ip: v.origin.client,
        headers: v.headers,
        set: Some((head, &encoded.set)),
    });
    let te_trailers = route.upstream.protocol() == UpstreamProtocol::H2
        && v.headers
            .get(&header::TE)
            .is_some_and(|te| nominated(te).any(|t| t.eq_ignore_ascii_case(b"trailers")));
    Ok(Routed {
        route,
        chunked,
        upgrade: encoded.upgrade,
        affinity,
        te_trailers,
    })
}

/// Routes a request (from hyper) and, when it goes upstream, encodes its head; consumes the
/// request head.
fn route_request(
    state: &State,
    ctx: &ConnCtx,
    origin: Origin<'_>,
    request_id: Option<&RequestId>,
    req: Request<Incoming>,
) -> Next {
    let s = &state.settings;
    let (mut parts, body) = req.into_parts();
    if parts.version == Version::HTTP_2 && header_bytes(&parts.headers) > s.max_header_bytes {
        return Next::Done(Box::new(Outcome::local(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            None,
        )));
    }
    let mut head = ctx.take_head_buf();
    let routed = route_view(
        state,
        ctx,
        &View {
            method: &parts.method,
            http11: parts.version == Version::HTTP_11,
            path: parts.uri.path(),
            // Upstreams get origin-form (HTTP/2 requests arrive in absolute form).
            target: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            host: host_of(&parts.uri, &parts.headers),
            headers: Headers::Map(&parts.headers),
            origin,
            request_id,
            // hyper's body knows the declared length (Content-Length, or HTTP/2's
            // content-length): no header lookup.
            declared_len: body.size_hint().exact(),
            has_body: !body.is_end_stream(),
        },
        &mut head,
    );
    let routed = match routed {
        Ok(r) => r,
        Err(out) => {
            ctx.put_head_buf(head);
            return Next::Done(out);
        }
    };
    let client_upgrade = routed.upgrade.then(|| {
        // hyper hands the upgraded connection over through the request's extensions.
        let mut req = Request::new(());
        *req.extensions_mut() = std::mem::take(&mut parts.extensions);
        hyper::upgrade::on(&mut req)
    });
    // A gRPC client stream may pause for as long as the client gave the call.
    let body_wait = if body.is_end_stream() {
        s.request_body
    } else {
        h2_upstream::grpc_timeout(&parts.headers).map_or(s.request_body, |t| t.max(s.request_body))
    };
    let mut headers = parts.headers;
    headers.clear();
    Next::Forward(Forward {
        headers,
        raw_lines: None,
        upstream_date: false,
        body: ReqBody::limited(body, routed.route.max_body, body_wait),
        route: routed.route,
        method: parts.method,
        head,
        chunked: routed.chunked,
        affinity: routed.affinity,
        te_trailers: routed.te_trailers,
        upgrade: client_upgrade,
    })
}

async fn forward(state: &State, ctx: &ConnCtx, mut f: Forward) -> Outcome {
    let out = exchange(state, &mut f).await;
    ctx.put_head_buf(std::mem::take(&mut f.head));
    out
}

async fn exchange(state: &State, f: &mut Forward) -> Outcome {
    if f.route.upstream.protocol() == UpstreamProtocol::H2 {
        return exchange_h2(state, f).await;
    }
    let s = &state.settings;
    let route = &f.route;
    let body = &mut f.body;
    let upstream = &route.upstream;
    let idempotent = is_idempotent(&f.method);
    let upgrade = f.upgrade.is_some();
    let response_wait = upstream.response_timeout(s.response);
    // A pooled connection may have been closed by the upstream while idle. Requests that can
    // be re-sent find out by trying; the others get a liveness probe first.
    let probe_pooled = !idempotent || !body.is_end_stream();
    let mut body_touched = false;
    let mut excluded: Option<Arc<Endpoint>> = None;
    let mut connect_attempts = 2u8;
    let mut stale_resends = 4u8;
    loop {
        let ep = match next_endpoint(upstream, f.affinity, excluded.as_ref()) {
            Ok(ep) => ep,
            Err(status) => return Outcome::local(status, Some(route.clone())),
        };
        let in_flight = ep.start_request();
        let (mut conn, reused) = match connection_for(
            &ep,
            upstream.tls(),
            upstream.connect_timeout(s.connect),
            upgrade,
            // Once the re-send budget is spent, every request probes.
            probe_pooled || stale_resends == 0,
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                upstream.log_connect_failure(&ep, &e);
                upstream.errors.inc();
                upstream.record_failure(&ep);
                connect_attempts -= 1;
                // Nothing of the request has been sent (nor its body read): whatever its
                // method, it may go to another endpoint, as nginx's `proxy_next_upstream
                // error` does.
                if connect_attempts > 0 {
                    excluded = Some(ep);
                    continue;
                }
                return Outcome {
                    endpoint: Some(ep.addr),
                    ..Outcome::local(StatusCode::BAD_GATEWAY, Some(route.clone()))
                };
            }
        };
        let exchanged = conn
            .exchange(
                &f.head,
                &f.method,
                f.chunked,
                body,
                &mut body_touched,
                Exchange {
                    timeout: response_wait,
                    headers: &mut f.headers,
                    raw: f.raw_lines.as_mut(),
                },
            )
            .await;
        let head = match exchanged {
            Ok(head) => head,
            Err(ExchangeError::Stale) if reused && !body_touched && stale_resends > 0 => {
                // Closed while idle in the pool: nothing was processed, send it again.
                stale_resends -= 1;
                continue;
            }
            Err(ExchangeError::BodyTooLarge(_)) => {
                return Outcome::local(StatusCode::PAYLOAD_TOO_LARGE, Some(route.clone()));
            }
            Err(ExchangeError::ClientTimedOut(_)) => {
                return Outcome::local(StatusCode::REQUEST_TIMEOUT, Some(route.clone()));
            }
            Err(ExchangeError::RequestBody(e)) => {
                tracing::debug!(error = %e, "client request body failed");
                return Outcome::local(StatusCode::BAD_REQUEST, Some(route.clone()));
            }
            Err(ExchangeError::TimedOut) => {
                upstream.errors.inc();
                upstream.record_failure(&ep);
                return Outcome {
                    endpoint: Some(ep.addr),
                    ..Outcome::local(StatusCode::GATEWAY_TIMEOUT, Some(route.clone()))
                };
            }
            Err(e) => {
                tracing::debug!(endpoint = %ep.addr, error = %e, "upstream exchange failed");
                upstream.errors.inc();
                upstream.record_failure(&ep);
                return Outcome {
                    endpoint: Some(ep.addr),
                    ..Outcome::local(StatusCode::BAD_GATEWAY, Some(route.clone()))
                };
            }
        };
        f.upstream_date = head.has_date;
        if head.status.is_server_error() {
            upstream.record_failure(&ep);
        } else {
            upstream.record_success(&ep);
        }
        let endpoint = Some(ep.addr);
        if head.status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = f.upgrade.take()
        {
            let resp = tunnel(*conn, head, client_upgrade, in_flight, s.tunnel_idle);
            return Outcome {
                resp,
                route: Some(route.clone()),
                endpoint,
                error_page: false,
            };
        }
        // nginx's `proxy_read_timeout`: the response timeout also bounds each wait for
        // more of the body.
        let body = UpstreamBody::new(conn, &head, ep.clone(), response_wait);
        let mut resp = Response::new(RespBody::upstream(body, in_flight));
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        return Outcome {
            resp,
            route: Some(route.clone()),
            endpoint,
            error_page: false,
        };
    }
}

/// The endpoint for the next attempt, skipping `excluded` (that of a failed first attempt).
/// Without one, the answer: 503 when the upstream has no endpoint at all, else the 502 of
/// the failed attempt (there is no *other* endpoint to retry on).
fn next_endpoint(
    upstream: &Upstream,
    affinity: u64,
    excluded: Option<&Arc<Endpoint>>,
) -> Result<Arc<Endpoint>, StatusCode> {
    upstream
        .pick_by(affinity, excluded.map(|e| &**e))
        .ok_or(if excluded.is_some() {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        })
}

/// [`exchange`] with an HTTP/2 upstream: the request goes on this worker's multiplexed
/// connection to the endpoint (see `h2_upstream`). Connect failures and 5xx count towards
/// ejection as over HTTP/1.1, and a request is retried once on another endpoint after a
/// connect failure; a request the connection closed before taking, or that the endpoint
/// declined unprocessed, is sent again (see `h2_upstream::REPLAY_LIMIT`).
async fn exchange_h2(state: &State, f: &mut Forward) -> Outcome {
    let s = &state.settings;
    let route = &f.route;
    let upstream = &route.upstream;
    let local = |status| Outcome::local(status, Some(route.clone()));
    if f.upgrade.is_some() {
        // Upgrades over HTTP/2 need extended CONNECT (RFC 8441) at both ends.
        return local(StatusCode::NOT_IMPLEMENTED);
    }
    let https = upstream.tls().is_some();
    let Some(req) = h2_upstream::request_from_head(&f.head, &f.method, https, f.te_trailers) else {
        return local(StatusCode::BAD_REQUEST);
    };
    // A gRPC call's deadline is the client's to set: a long-lived stream whose server sends
    // no headers until its first message is not cut at `upstream_response_ms` if the client
    // gave it longer. (Never shorter: the client enforces its own deadline.)
    let service_wait = upstream.response_timeout(s.response);
    let response_wait =
        h2_upstream::grpc_timeout(req.headers()).map_or(service_wait, |t| t.max(service_wait));
    let (body, handle) = WatchedBody::new(std::mem::replace(&mut f.body, ReqBody::empty()));
    let mut req = req.map(|()| body);
    let idempotent = is_idempotent(&f.method);
    let mut excluded: Option<Arc<Endpoint>> = None;
    let mut connect_attempts = 2u8;
    let mut resends = 2u8;
    // Requests a closing connection handed back unsent: several of a worker's connections to
    // an endpoint that rotates them may be closing at once.
    let mut unsent_resends = 4u8;
    loop {
        let ep = match next_endpoint(upstream, f.affinity, excluded.as_ref()) {
            Ok(ep) => ep,
            Err(status) => return local(status),
        };
        let failed = |status| {
            upstream.errors.inc();
            upstream.record_failure(&ep);
            Outcome {
                endpoint: Some(ep.addr),
                ..local(status)
            }
        };
        let in_flight = ep.start_request();
        let (mut sender, mut stream) = match h2_upstream::stream_for(
            &ep,
            upstream.tls_shared(),
            upstream.connect_timeout(s.connect),
        )
        .await
        {
            Ok(sender_and_stream) => sender_and_stream,
            Err(e) => {
                upstream.log_connect_failure(&ep, &e);
                connect_attempts -= 1;
                // Nothing was sent: any request (a gRPC call is a POST) may go elsewhere.
                if connect_attempts > 0 {
                    upstream.errors.inc();
                    upstream.record_failure(&ep);
                    excluded = Some(ep);
                    continue;
                }
                return failed(StatusCode::BAD_GATEWAY);
            }
        };
        handle.attempt_started();
        let mut timer = LazySleep::new(tokio::time::Instant::now() + response_wait);
        let sent = until_stalled(
            sender.try_send_request(req),
            &mut timer,
            response_wait,
            || handle.waiting(),
        )
        .await;
        let resp = match sent {
            None if handle.fault() == Some(BodyFault::TimedOut) => {
                return local(StatusCode::REQUEST_TIMEOUT);
            }
            None => return failed(StatusCode::GATEWAY_TIMEOUT),
            Some(Ok(resp)) => resp,
            Some(Err(mut e)) => {
                if let Some(back) = e.take_message()
                    && unsent_resends > 0
                {
                    // The connection closed before the request went out (GOAWAY, reset):
                    // nothing reached the endpoint; open a new one and send it again.
                    tracing::debug!(endpoint = %ep.addr, error = %e.into_error(),
                        "upstream HTTP/2 connection closed before taking the request; sending it again");
                    ep.forget_h2_connection(&stream);
                    unsent_resends -= 1;
                    req = back;
                    continue;
                }
                match handle.fault() {
                    Some(BodyFault::TooLarge) => return local(StatusCode::PAYLOAD_TOO_LARGE),
                    Some(BodyFault::TimedOut) => return local(StatusCode::REQUEST_TIMEOUT),
                    Some(BodyFault::Client) => return local(StatusCode::BAD_REQUEST),
                    None => {}
                }
                let e = e.into_error();
                let declined = h2_upstream::not_processed(&e);
                // A request the endpoint declined unprocessed (RFC 9113 §8.7: an endpoint
                // draining with GOAWAY, or refusing a stream) may go again whatever its
                // method; one the connection broke under (an endpoint restarting closes it
                // without GOAWAY) only if it may be repeated. Either needs its body whole.
                let replay = (resends > 0 && (declined.is_some() || idempotent))
                    .then(|| handle.replay())
                    .flatten();
                let Some(body) = replay else {
                    tracing::debug!(endpoint = %ep.addr, error = %e, ?declined,
                        "upstream HTTP/2 exchange failed");
                    return failed(StatusCode::BAD_GATEWAY);
                };
                tracing::debug!(endpoint = %ep.addr, error = %e, ?declined,
                    "upstream HTTP/2 exchange failed; sending the request again");
                resends -= 1;
                if declined == Some(NotProcessed::Refused) {
                    stream.refused();
                } else {
                    ep.forget_h2_connection(&stream);
                }
                if declined.is_some() && upstream.endpoints().len() > 1 {
                    // A draining or saturated endpoint: another one takes it.
                    excluded = Some(ep);
                }
                let Some(again) =
                    h2_upstream::request_from_head(&f.head, &f.method, https, f.te_trailers)
                else {
                    return local(StatusCode::BAD_REQUEST);
                };
                req = again.map(|()| body);
                continue;
            }
        };
        handle.answered();
        let (mut parts, body) = resp.into_parts();
        if parts.status.is_server_error() {
            upstream.record_failure(&ep);
        } else {
            upstream.record_success(&ep);
        }
        f.upstream_date = parts.headers.contains_key(header::DATE);
        parts.version = Version::HTTP_11;
        return Outcome {
            // The deadline that held for the head also bounds each wait for the next frame.
            resp: Response::from_parts(
                parts,
                RespBody::streamed(body, in_flight, stream, response_wait),
            ),
            route: Some(route.clone()),
            endpoint: Some(ep.addr),
            error_page: false,
        };
    }
}

/// A pooled connection to `ep` (probed for liveness if `probe`), else a new one. Upgrades
/// always get a new connection: it becomes the tunnel. Returns whether it was pooled.
async fn connection_for(
    ep: &Arc<Endpoint>,
    tls: Option<&TlsOrigination>,
    connect_timeout: Duration,
    upgrade: bool,
    probe: bool,
) -> std::io::Result<(Box<UpstreamConn>, bool)> {
    if !upgrade {
        // Bounded by the pool size; dead connections are dropped as they are found.
        while let Some(mut c) = ep.checkout() {
            if !probe || c.looks_alive() {
                return Ok((c, true));
            }
        }
    }
    // Boxed: connecting is rare once pools are warm, and its future would otherwise make
    // every request's future (moved by hyper when it takes the request) a third larger.
    Ok((
        Box::pin(UpstreamConn::connect(ep.addr, connect_timeout, tls)).await?,
        false,
    ))
}

/// Answers 101 downstream and splices the client's upgraded connection with the upstream
/// socket (bytes the upstream sent right after its 101 are delivered first).
fn tunnel(
    conn: UpstreamConn,
    head: ResponseHead,
    client: hyper::upgrade::OnUpgrade,
    in_flight: upstream::InFlight,
    idle: Duration,
) -> Response<RespBody> {
    let (up, leftover) = conn.into_parts();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let client = match client.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        if !leftover.is_empty() && client.write_all(&leftover).await.is_err() {
            return;
        }
        // Bytes read on either side keep the tunnel open; a tunnel silent both ways for
        // `idle` is closed (HAProxy's `timeout tunnel`): a peer that vanished without a FIN
        // would otherwise hold both sockets for ever.
        let start = tokio::time::Instant::now();
        let progress = Progress::new(start);
        let mut client = Traffic {
            io: client,
            progress: &progress,
        };
        let mut up = Traffic {
            io: up,
            progress: &progress,
        };
        let copy = tokio::io::copy_bidirectional(&mut client, &mut up);
        let mut timer = LazySleep::new(start + idle);
        match until_stalled(copy, &mut timer, idle, || progress.waiting()).await {
            None => tracing::debug!(?idle, "upgraded connection idle; closed"),
            Some(Err(e)) => tracing::debug!(error = %e, "upgraded connection ended with error"),
            Some(Ok(_)) => {}
        }
    });
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = head.headers;
    resp
}

/// One side of a tunnel, telling `progress` whenever bytes arrive from it.
struct Traffic<'a, IO> {
    io: IO,
    progress: &'a Progress,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Traffic<'_, IO> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.progress.advanced();
        }
        r
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Traffic<'_, IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn redirect_to_https(pq: &str, host: &str, port: Option<u16>, route: Arc<Route>) -> Outcome {
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest
            .split(']')
            .next()
            .map_or(host.to_owned(), |h| format!("[{h}]")),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned(),
    };
    let location = match port {
        Some(p) if p != 443 => format!("https://{bare}:{p}{pq}"),
        _ => format!("https://{bare}{pq}"),
    };
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Outcome {
        resp,
        route: Some(route),
        endpoint: None,
        error_page: false,
    }
}
