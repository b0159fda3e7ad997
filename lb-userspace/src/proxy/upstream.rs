//! Upstreams: endpoints, load balancing, passive health and per-worker connection pools.
//!
//! Endpoint objects outlive reloads (they are carried over by address when a Service keeps
//! an endpoint), so pooled connections, in-flight counts and ejection state survive
//! configuration changes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderName;
use prometheus_client::metrics::counter::Counter;
use rand::Rng;

use super::client::UpstreamConn;
use super::config::{ActiveHealth, Balance, PassiveHealth, Service, TlsSecret, UpstreamProtocol};
use super::h2_upstream::{H2Slot, H2Stream};
use super::head::{Headers, SetValues};
use super::metrics::{EndpointStates, Metrics};
use super::tls::TlsError;
use super::upstream_tls::TlsOrigination;

/// Idle upstream connections kept per endpoint and worker.
const MAX_IDLE_PER_WORKER: usize = 512;
/// Virtual nodes per endpoint on the consistent-hash ring.
const RING_VNODES: usize = 160;

thread_local! {
    /// Index of the worker running on this thread (0 elsewhere, e.g. in tests' runtimes).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `i` so pools stay thread-local in practice.
pub(crate) fn set_worker_index(i: usize) {
    WORKER.with(|w| w.set(i));
}

fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// Milliseconds on a process-wide monotonic clock (for atomics).
/// An upstream's connect failures (refused, timed out, TLS handshake refused) are logged at
/// warn at most this often; the others at debug. A wrong CA or a dead Service is then seen
/// in the log without a line per request.
const CONNECT_WARN_INTERVAL_MS: u64 = 10_000;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One upstream endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Ejections since the last success; sets the backoff exponent.
    ejections: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected (0 = admitted).
    ejected_until: AtomicU64,
    /// Active health checks say it is down (see `proxy::health`).
    check_down: AtomicBool,
    /// Idle connections, one list per worker (no cross-thread wakeups on the hot path).
    /// Boxed: a connection moves between the pool, the exchange and the response body for
    /// every request, and a pointer moves faster than the connection.
    #[allow(clippy::vec_box)]
    idle: Box<[Mutex<Vec<Box<UpstreamConn>>>]>,
    /// For HTTP/2 Services: the multiplexed connection of each worker (see `h2_upstream`).
    h2: Box<[Mutex<H2Slot>]>,
    /// Its upstream's error counter, for failures noticed after the exchange (a response
    /// body that stalls or breaks).
    errors: Counter,
}

impl Endpoint {
    fn new(addr: SocketAddr, workers: usize, errors: Counter) -> Self {
        Self {
            errors,
            addr,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            check_down: AtomicBool::new(false),
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            h2: (0..workers.max(1))
                .map(|_| Mutex::new(H2Slot::default()))
                .collect(),
        }
    }

    fn admitted(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// Whether the endpoint is currently ejected.
    pub fn is_ejected(&self) -> bool {
        !self.admitted(now_ms())
    }

    /// Whether active health checks currently keep it out.
    pub fn is_checked_down(&self) -> bool {
        self.check_down.load(Ordering::Relaxed)
    }

    pub(crate) fn set_checked_down(&self, down: bool) {
        self.check_down.store(down, Ordering::Relaxed);
    }

    #[allow(clippy::vec_box)] // see `idle`
    fn idle_list(&self) -> &Mutex<Vec<Box<UpstreamConn>>> {
        &self.idle[worker_index() % self.idle.len()]
    }

    /// The most recently used idle connection (LIFO: the likeliest to be still open).
    pub(crate) fn checkout(&self) -> Option<Box<UpstreamConn>> {
        self.idle_list()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
    }

    /// Returns a connection whose last response has been read completely.
    pub(crate) fn checkin(&self, s: Box<UpstreamConn>) {
        let mut idle = self.idle_list().lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_PER_WORKER {
            idle.push(s);
        }
    }

    /// This worker's HTTP/2 connection state (see `h2_upstream::stream_for`).
    pub(crate) fn h2_slot(&self) -> std::sync::MutexGuard<'_, H2Slot> {
        self.h2[worker_index() % self.h2.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets this worker's HTTP/2 connection that `stream` is on (it failed under a
    /// request, or is going away).
    pub(crate) fn forget_h2_connection(&self, stream: &H2Stream) {
        self.h2_slot().forget(stream);
    }

    /// Counts a failure of a response body under its upstream's errors.
    pub(crate) fn count_error(&self) {
        self.errors.inc();
    }

    /// Counts a request in flight until the guard drops (least_request reads this).
    pub(crate) fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// Decrements the endpoint's in-flight count on drop.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a balancer may hash on.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The downstream client's address.
    pub client_ip: IpAddr,
    /// The request headers.
    pub(crate) headers: Headers<'a>,
    /// The encoded upstream head and where the values the proxy sets (Host, X-Forwarded-*,
    /// Forwarded) are in it: a hash header among those hashes what the upstream gets.
    pub(crate) set: Option<(&'a [u8], &'a SetValues)>,
}

impl PickContext<'_> {
    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        if let Some((head, set)) = self.set
            && let Some(v) = set.get(head, name)
        {
            return Some(v);
        }
        self.headers.get(name)
    }
}

/// A Service port: its endpoints and policy.
#[derive(Debug)]
pub struct Upstream {
    /// `namespace/name:port`, the metrics and access-log label.
    pub name: Arc<str>,
    endpoints: Vec<Arc<Endpoint>>,
    balance: Balance,
    hash_header: Option<HeaderName>,
    /// (hash, endpoint index), sorted by hash.
    ring: Vec<(u64, usize)>,
    health: PassiveHealth,
    active: ActiveHealth,
    /// TLS to the endpoints (None: plain HTTP).
    tls: Option<Arc<TlsOrigination>>,
    /// The HTTP version spoken to the endpoints.
    protocol: UpstreamProtocol,
    /// The Service's own connect and response timeouts (None: the proxy's).
    connect_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    /// When a connect failure was last logged at warn (`u64::MAX`: never).
    last_connect_warn: AtomicU64,
    next: AtomicUsize,
    /// Pre-resolved metric handles (no label lookups per request).
    pub(crate) errors: Counter,
    ejections: Counter,
    pub(crate) check_failures: Counter,
}

fn hash_of(v: impl Hash) -> u64 {
    // DefaultHasher::new() has fixed keys: the same key maps to the same endpoint in every
    // worker and across restarts, which affinity needs.
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl Upstream {
    /// Builds an upstream, reusing endpoint objects of `previous` with the same address
    /// (and its TLS client) unless the TLS settings changed: pooled connections of the old
    /// kind must not be reused. `client` is the Secret `svc.tls.client_secret` names. Fails
    /// when the TLS settings' CA or client certificate does not load.
    pub fn new(
        svc: &Service,
        client: Option<&TlsSecret>,
        workers: usize,
        previous: Option<&Upstream>,
        metrics: &Metrics,
    ) -> Result<Self, TlsError> {
        let name: Arc<str> = format!("{}/{}:{}", svc.namespace, svc.name, svc.port).into();
        let same_transport = |p: &&Upstream| {
            p.protocol == svc.protocol
                && match (&p.tls, svc.tls.enabled) {
                    (None, false) => true,
                    (Some(t), true) => t.built_from(&svc.tls, client, svc.protocol),
                    _ => false,
                }
        };
        let previous = previous.filter(same_transport);
        let tls = match previous {
            Some(p) => p.tls.clone(),
            None => TlsOrigination::for_protocol(&svc.tls, client, &name, svc.protocol)?,
        };
        let errors = metrics.upstream_errors(&name);
        let endpoints: Vec<Arc<Endpoint>> = svc
            .endpoints
            .iter()
            .map(|addr| {
                previous
                    .and_then(|p| p.endpoints.iter().find(|e| e.addr == *addr).cloned())
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*addr, workers, errors.clone())))
            })
            .collect();
        if !svc.active_health.enabled() {
            // Checks switched off by this config: their verdicts no longer apply.
            for e in &endpoints {
                e.set_checked_down(false);
            }
        }
        let mut ring = Vec::new();
        if svc.balance == Balance::ConsistentHash {
            for (i, e) in endpoints.iter().enumerate() {
                for v in 0..RING_VNODES {
                    ring.push((hash_of((e.addr, v)), i));
                }
            }
            ring.sort_unstable();
        }
        Ok(Self {
            errors,
            ejections: metrics.upstream_ejections(&name),
            check_failures: metrics.upstream_health_check_failures(&name),
            name,
            endpoints,
            balance: svc.balance,
            hash_header: svc
                .hash_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            ring,
            health: svc.health.clone(),
            active: svc.active_health.clone(),
            tls,
            protocol: svc.protocol,
            connect_timeout: svc.timeouts.connect_ms.map(Duration::from_millis),
            response_timeout: svc.timeouts.response_ms.map(Duration::from_millis),
            last_connect_warn: AtomicU64::new(u64::MAX),
            next: AtomicUsize::new(0),
        })
    }

    /// The connect timeout for this Service's endpoints: its own, else `proxy_wide`.
    pub fn connect_timeout(&self, proxy_wide: Duration) -> Duration {
        self.connect_timeout.unwrap_or(proxy_wide)
    }

    /// The wait for a response head from this Service's endpoints: its own, else
    /// `proxy_wide`.
    pub fn response_timeout(&self, proxy_wide: Duration) -> Duration {
        self.response_timeout.unwrap_or(proxy_wide)
    }

    /// Logs a failed connect to `e`: at warn for the first one in
    /// [`CONNECT_WARN_INTERVAL_MS`] (over all workers), else at debug.
    pub fn log_connect_failure(&self, e: &Endpoint, error: &dyn std::fmt::Display) {
        if self.connect_warn_due(now_ms()) {
            tracing::warn!(upstream = %self.name, endpoint = %e.addr, %error,
                "upstream connect failed (further failures of this upstream within 10 s are logged at debug)");
        } else {
            tracing::debug!(upstream = %self.name, endpoint = %e.addr, %error,
                "upstream connect failed");
        }
    }

    fn connect_warn_due(&self, now: u64) -> bool {
        let last = self.last_connect_warn.load(Ordering::Relaxed);
        (last == u64::MAX || now.saturating_sub(last) >= CONNECT_WARN_INTERVAL_MS)
            && self
                .last_connect_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// TLS to the endpoints, if the Service asks for it.
    pub fn tls(&self) -> Option<&TlsOrigination> {
        self.tls.as_deref()
    }

    /// [`Upstream::tls`], shared (for work that outlives the request).
    pub(crate) fn tls_shared(&self) -> Option<&Arc<TlsOrigination>> {
        self.tls.as_ref()
    }

    /// The HTTP version spoken to the endpoints.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// The endpoints, in config order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// How many endpoints are available, ejected, or held out by active checks now.
    pub fn endpoint_states(&self) -> EndpointStates {
        let now = now_ms();
        let mut n = EndpointStates::default();
        for e in &self.endpoints {
            if e.is_checked_down() {
                n.check_failed += 1;
            } else if !e.admitted(now) {
                n.ejected += 1;
            } else {
                n.available += 1;
            }
        }
        n
    }

    /// Active health check settings (`path` None: off).
    pub fn active_health(&self) -> &ActiveHealth {
        &self.active
    }

    /// Chooses an endpoint, skipping ejected ones, ones active checks hold down, and
    /// `exclude` (the endpoint of a failed first attempt). When every endpoint is out,
    /// ejection and checks are ignored ("panic mode"):
    /// trying a possibly-recovered endpoint beats failing every request.
    pub fn pick(&self, ctx: &PickContext<'_>, exclude: Option<&Endpoint>) -> Option<Arc<Endpoint>> {
        self.pick_by(self.affinity(ctx), exclude)
    }

    /// The request's key on the consistent-hash ring (the hash header's value, else the
    /// client IP); 0 for the other policies. Computed once per request, so retries need
    /// the request's headers no more.
    pub fn affinity(&self, ctx: &PickContext<'_>) -> u64 {
        if self.balance != Balance::ConsistentHash {
            return 0;
        }
        match self.hash_header.as_ref().and_then(|h| ctx.header(h)) {
            Some(v) => hash_of(v),
            None => hash_of(ctx.client_ip),
        }
    }

    /// [`Upstream::pick`] with the key from [`Upstream::affinity`].
    pub fn pick_by(&self, affinity: u64, exclude: Option<&Endpoint>) -> Option<Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        // The clock is read only if some endpoint has been ejected (0: never, or re-admitted
        // by a success).
        let now = std::cell::OnceCell::new();
        let usable = |e: &Endpoint, respect_ejection: bool| {
            exclude.is_none_or(|x| !std::ptr::eq(x, e))
                && (!respect_ejection
                    || (!e.check_down.load(Ordering::Relaxed)
                        && (e.ejected_until.load(Ordering::Relaxed) == 0
                            || e.admitted(*now.get_or_init(now_ms)))))
        };
        self.pick_with(affinity, |e| usable(e, true))
            .or_else(|| self.pick_with(affinity, |e| usable(e, false)))
    }

    fn pick_with(&self, affinity: u64, ok: impl Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
        let n = self.endpoints.len();
        match self.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.endpoints[(start + i) % n])
                    .find(|e| ok(e))
                    .cloned()
            }
            Balance::Random => {
                let start = rand::rng().random_range(0..n);
                (0..n)
                    .map(|i| &self.endpoints[(start + i) % n])
                    .find(|e| ok(e))
                    .cloned()
            }
            Balance::LeastRequest => {
                let less_loaded = |a: &Arc<Endpoint>, b: &Arc<Endpoint>| {
                    let load = |e: &Endpoint| e.in_flight.load(Ordering::Relaxed);
                    if load(b) < load(a) {
                        b.clone()
                    } else {
                        a.clone()
                    }
                };
                let mut rng = rand::rng();
                if self.endpoints.iter().all(|e| ok(e)) {
                    // Fast path, no allocation: two random distinct endpoints.
                    if n == 1 {
                        return Some(self.endpoints[0].clone());
                    }
                    let a = rng.random_range(0..n);
                    let b = (a + rng.random_range(1..n)) % n;
                    return Some(less_loaded(&self.endpoints[a], &self.endpoints[b]));
                }
                let healthy: Vec<&Arc<Endpoint>> =
                    self.endpoints.iter().filter(|e| ok(e)).collect();
                match healthy.len() {
                    0 => None,
                    1 => Some(healthy[0].clone()),
                    m => {
                        let a = rng.random_range(0..m);
                        let b = (a + rng.random_range(1..m)) % m;
                        Some(less_loaded(healthy[a], healthy[b]))
                    }
                }
            }
            Balance::ConsistentHash => {
                let start = self.ring.partition_point(|(h, _)| *h < affinity);
                let len = self.ring.len();
                (0..len)
                    .map(|i| &self.endpoints[self.ring[(start + i) % len].1])
                    .find(|e| ok(e))
                    .cloned()
            }
        }
    }

    /// A connect failure or a 5xx: counts towards ejection.
    pub fn record_failure(&self, e: &Endpoint) {
        let limit = self.health.consecutive_failures;
        if limit == 0 {
            return;
        }
        let failures = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= limit && e.admitted(now_ms()) {
            e.consecutive_failures.store(0, Ordering::Relaxed);
            let n = e.ejections.fetch_add(1, Ordering::Relaxed);
            let backoff = self
                .health
                .base_ejection_ms
                .saturating_mul(1u64 << n.min(20))
                .min(self.health.max_ejection_ms);
            e.ejected_until.store(now_ms() + backoff, Ordering::Relaxed);
            self.ejections.inc();
            tracing::warn!(upstream = %self.name, endpoint = %e.addr, backoff_ms = backoff, "endpoint ejected");
        }
    }

    /// A successful exchange resets the failure streak and the backoff.
    pub fn record_success(&self, e: &Endpoint) {
        // Plain loads first: the common case writes nothing (no cache-line ping-pong).
        if e.consecutive_failures.load(Ordering::Relaxed) != 0 {
            e.consecutive_failures.store(0, Ordering::Relaxed);
        }
        let until = e.ejected_until.load(Ordering::Relaxed);
        if e.ejections.load(Ordering::Relaxed) != 0 && until <= now_ms() {
            e.ejections.store(0, Ordering::Relaxed);
            // Past its ejection: 0 says so without a clock read in `pick` (unless another
            // request has just ejected it again).
            let _ =
                e.ejected_until
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// Upstreams by `(namespace, name, port)`.
pub type UpstreamMap = HashMap<(String, String, u16), Arc<Upstream>>;

/// Builds all upstreams of a config, carrying endpoint state over from `previous`.
/// `secrets` holds the client certificates Services' `tls.client_secret` names.
pub fn build_upstreams(
    services: &[Service],
    secrets: &[TlsSecret],
    workers: usize,
    previous: Option<&UpstreamMap>,
    metrics: &Metrics,
) -> Result<UpstreamMap, TlsError> {
    services
        .iter()
        .map(|s| {
            let key = (s.namespace.clone(), s.name.clone(), s.port);
            let prev = previous.and_then(|p| p.get(&key)).map(|u| &**u);
            let client = s.tls.client_secret.as_deref().and_then(|c| {
                let (ns, name) = c.split_once('/')?;
                secrets.iter().find(|x| x.namespace == ns && x.name == name)
            });
            Ok((
                key,
                Arc::new(Upstream::new(s, client, workers, prev, metrics)?),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::UpstreamTls;
    use http::HeaderMap;

    fn svc(balance: Balance, n: u16) -> Service {
        Service {
            name: "s".into(),
            endpoints: (0..n)
                .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
                .collect(),
            balance,
            health: PassiveHealth {
                consecutive_failures: 2,
                base_ejection_ms: 60_000,
                max_ejection_ms: 120_000,
            },
            ..Default::default()
        }
    }

    fn ctx(h: &HeaderMap, last: u8) -> PickContext<'_> {
        PickContext {
            client_ip: IpAddr::from([10, 0, 0, last]),
            headers: Headers::Map(h),
            set: None,
        }
    }

    #[test]
    fn round_robin_cycles() {
        let m = Metrics::new();
        let u = Upstream::new(&svc(Balance::RoundRobin, 3), None, 1, None, &m).expect("upstream");
        let h = HeaderMap::new();
        let picks: Vec<u16> = (0..6)
            .map(|_| u.pick(&ctx(&h, 1), None).unwrap().addr.port())
            .collect();
        assert_eq!(picks, [9000, 9001, 9002, 9000, 9001, 9002]);
    }

    #[test]
    fn ejection_skips_and_panic_mode_uses_all() {
        let m = Metrics::new();
        let u = Upstream::new(&svc(Balance::RoundRobin, 2), None, 1, None, &m).expect("upstream");
        let h = HeaderMap::new();
        let e0 = u.endpoints()[0].clone();
        u.record_failure(&e0);
        assert!(!e0.is_ejected());
        u.record_failure(&e0);
        assert!(e0.is_ejected());
        for _ in 0..4 {
            assert_eq!(u.pick(&ctx(&h, 1), None).unwrap().addr.port(), 9001);
        }
        let e1 = u.endpoints()[1].clone();
        u.record_failure(&e1);
        u.record_failure(&e1);
        assert!(u.pick(&ctx(&h, 1), None).is_some(), "panic mode");
        assert!(
            u.pick(&ctx(&h, 1), Some(&e1))
                .is_some_and(|e| e.addr.port() == 9000)
        );
    }

    #[test]
    fn ejected_endpoint_is_readmitted_after_backoff_and_backoff_doubles() {
        let m = Metrics::new();
        let mut s = svc(Balance::RoundRobin, 2);
        s.health = PassiveHealth {
            consecutive_failures: 1,
            base_ejection_ms: 20,
            max_ejection_ms: 1_000,
        };
        let u = Upstream::new(&s, None, 1, None, &m).expect("upstream");
        let e0 = u.endpoints()[0].clone();
        u.record_failure(&e0);
        assert!(e0.is_ejected());
        let first = e0.ejected_until.load(Ordering::Relaxed) - now_ms();
        // Bounded wait: the 20 ms backoff must expire within 2 s.
        for _ in 0..200 {
            if !e0.is_ejected() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!e0.is_ejected(), "re-admitted after the backoff");
        u.record_failure(&e0);
        let second = e0.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!(
            second > first,
            "second ejection lasts longer ({second} ms vs {first} ms)"
        );
        u.record_success(&e0);
        assert_eq!(
            e0.ejections.load(Ordering::Relaxed),
            2,
            "a success while ejected keeps the backoff"
        );
    }

    #[test]
    fn consistent_hash_is_sticky_and_spreads() {
        let m = Metrics::new();
        let u =
            Upstream::new(&svc(Balance::ConsistentHash, 4), None, 1, None, &m).expect("upstream");
        let h = HeaderMap::new();
        let mut seen = std::collections::HashSet::new();
        for last in 0..64u8 {
            let a = u.pick(&ctx(&h, last), None).unwrap().addr;
            assert_eq!(u.pick(&ctx(&h, last), None).unwrap().addr, a);
            seen.insert(a);
        }
        assert!(
            seen.len() >= 3,
            "64 clients over 4 endpoints used only {seen:?}"
        );
    }

    #[test]
    fn consistent_hash_on_header() {
        let m = Metrics::new();
        let mut s = svc(Balance::ConsistentHash, 4);
        s.hash_header = Some("x-user".into());
        let u = Upstream::new(&s, None, 1, None, &m).expect("upstream");
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        let a = u.pick(&ctx(&h, 1), None).unwrap().addr;
        for last in 2..20 {
            assert_eq!(
                u.pick(&ctx(&h, last), None).unwrap().addr,
                a,
                "same header, other client"
            );
        }
    }

    #[test]
    fn least_request_prefers_idle_endpoint() {
        let m = Metrics::new();
        let u = Upstream::new(&svc(Balance::LeastRequest, 2), None, 1, None, &m).expect("upstream");
        let h = HeaderMap::new();
        let _busy: Vec<InFlight> = (0..5).map(|_| u.endpoints()[0].start_request()).collect();
        for _ in 0..10 {
            assert_eq!(u.pick(&ctx(&h, 1), None).unwrap().addr.port(), 9001);
        }
    }

    #[test]
    fn endpoints_survive_rebuild() {
        let m = Metrics::new();
        let a = Upstream::new(&svc(Balance::Random, 2), None, 1, None, &m).expect("upstream");
        let b = Upstream::new(&svc(Balance::Random, 3), None, 1, Some(&a), &m).expect("upstream");
        assert!(Arc::ptr_eq(&a.endpoints()[1], &b.endpoints()[1]));
        for _ in 0..20 {
            assert!(b.pick(&ctx(&HeaderMap::new(), 1), None).is_some());
        }
    }

    #[test]
    fn connect_failures_are_warned_about_once_per_interval() {
        let m = Metrics::new();
        let u = Upstream::new(&svc(Balance::RoundRobin, 1), None, 1, None, &m).expect("upstream");
        // (ms since start, warn due, why)
        let steps = [
            (0, true, "the first failure"),
            (5_000, false, "within the interval"),
            (9_999, false, "still within"),
            (10_000, true, "the interval has passed"),
            (10_001, false, "a new interval started"),
            (25_000, true, "long after"),
        ];
        for (now, want, why) in steps {
            assert_eq!(u.connect_warn_due(now), want, "{now} ms: {why}");
        }
    }

    #[test]
    fn a_change_of_transport_starts_with_fresh_endpoints_and_pools() {
        let m = Metrics::new();
        let plain = svc(Balance::RoundRobin, 2);
        let tls = |name: &str| Service {
            tls: UpstreamTls {
                enabled: true,
                verify: false,
                server_name: Some(name.to_owned()),
                ..UpstreamTls::default()
            },
            ..svc(Balance::RoundRobin, 2)
        };
        let a = Upstream::new(&plain, None, 1, None, &m).expect("upstream");
        let b = Upstream::new(&tls("a.internal"), None, 1, Some(&a), &m).expect("upstream");
        let c = Upstream::new(&tls("a.internal"), None, 1, Some(&b), &m).expect("upstream");
        let d = Upstream::new(&tls("b.internal"), None, 1, Some(&c), &m).expect("upstream");
        let e = Upstream::new(&plain, None, 1, Some(&d), &m).expect("upstream");
        let f = Upstream::new(&plain, None, 1, Some(&e), &m).expect("upstream");
        let h2 = |s: Service| Service {
            protocol: UpstreamProtocol::H2,
            ..s
        };
        let g = Upstream::new(&h2(plain.clone()), None, 1, Some(&f), &m).expect("upstream");
        let h = Upstream::new(&h2(plain.clone()), None, 1, Some(&g), &m).expect("upstream");
        let i = Upstream::new(&h2(tls("b.internal")), None, 1, Some(&h), &m).expect("upstream");
        let j = Upstream::new(&tls("b.internal"), None, 1, Some(&i), &m).expect("upstream");
        let kept = |x: &Upstream, y: &Upstream| Arc::ptr_eq(&x.endpoints()[0], &y.endpoints()[0]);
        // (before, after, endpoints (and pooled connections) kept, why)
        let steps = [
            (&a, &b, false, "plain → TLS"),
            (&b, &c, true, "same TLS settings"),
            (&c, &d, false, "another server name"),
            (&d, &e, false, "TLS → plain"),
            (&e, &f, true, "plain → plain"),
            (&f, &g, false, "HTTP/1.1 → HTTP/2"),
            (&g, &h, true, "HTTP/2 → HTTP/2"),
            (&h, &i, false, "h2c → h2 over TLS"),
            (
                &i,
                &j,
                false,
                "HTTP/2 over TLS → HTTP/1.1 over TLS, same TLS settings",
            ),
        ];
        for (x, y, want, why) in steps {
            assert_eq!(kept(x, y), want, "{why}");
        }
        assert!(a.tls().is_none() && f.tls().is_none());
        assert!(
            std::ptr::eq(b.tls().expect("tls"), c.tls().expect("tls")),
            "unchanged settings keep the client (and its session cache)"
        );
    }
}
