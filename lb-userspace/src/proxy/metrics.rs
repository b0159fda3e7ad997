//! Prometheus metrics (prometheus-client) and the `/metrics` endpoint.
//!
//! Label lookups happen when routes and upstreams are built, not per request: routes and
//! upstreams keep clones of their counters (clones share the same atomic).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// HTTP status class label (`1xx` .. `5xx`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum StatusClass {
    /// 1xx
    Informational,
    /// 2xx
    Success,
    /// 3xx
    Redirection,
    /// 4xx
    ClientError,
    /// 5xx
    ServerError,
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rule: String,
    class: StatusClass,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointStateLabels {
    upstream: String,
    state: &'static str,
}

/// How many of an upstream's endpoints are in each state (for the endpoints gauge).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStates {
    /// Usable: neither ejected nor failing active checks.
    pub available: i64,
    /// Ejected by passive health (its backoff has not run out).
    pub ejected: i64,
    /// Held out by failed active health checks.
    pub check_failed: i64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Per-rule request counters by status class.
#[derive(Debug, Clone)]
pub struct RuleCounters([Counter; 5]);

impl RuleCounters {
    /// Counts one response.
    pub fn count(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.0[i].inc();
    }
}

/// All proxy metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
    upstream_errors: Family<UpstreamLabels, Counter>,
    upstream_ejections: Family<UpstreamLabels, Counter>,
    upstream_check_failures: Family<UpstreamLabels, Counter>,
    upstream_endpoints: Family<EndpointStateLabels, Gauge>,
    open_connections: Family<ListenerLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    proxy_protocol_rejected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("xlb_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by matched rule and status class",
            requests.clone(),
        );
        // 100 µs .. ~13 s
        let latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            latency.clone(),
        );
        let upstream_errors = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream connect failures, timeouts and broken exchanges",
            upstream_errors.clone(),
        );
        let upstream_ejections = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_ejections",
            "Endpoints ejected by passive health checking",
            upstream_ejections.clone(),
        );
        let upstream_check_failures = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_health_check_failures",
            "Failed active health checks",
            upstream_check_failures.clone(),
        );
        let upstream_endpoints = Family::<EndpointStateLabels, Gauge>::default();
        registry.register(
            "upstream_endpoints",
            "Endpoints per upstream by state (available, ejected, check_failed), at scrape time",
            upstream_endpoints.clone(),
        );
        let open_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Open downstream connections by listener",
            open_connections.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        let proxy_protocol_rejected = Counter::default();
        registry.register(
            "proxy_protocol_rejected",
            "Connections closed for a missing or invalid PROXY protocol header",
            proxy_protocol_rejected.clone(),
        );
        Self {
            proxy_protocol_rejected,
            registry: Mutex::new(registry),
            requests,
            latency,
            upstream_errors,
            upstream_ejections,
            upstream_check_failures,
            upstream_endpoints,
            open_connections,
            reloads,
        }
    }

    /// Counters for a rule label.
    pub fn rule(&self, rule: &str) -> RuleCounters {
        use StatusClass::*;
        RuleCounters(
            [
                Informational,
                Success,
                Redirection,
                ClientError,
                ServerError,
            ]
            .map(|class| {
                self.requests
                    .get_or_create(&RequestLabels {
                        rule: rule.to_owned(),
                        class,
                    })
                    .clone()
            }),
        )
    }

    /// The error counter of an upstream.
    pub fn upstream_errors(&self, upstream: &str) -> Counter {
        self.upstream_errors
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    /// The ejection counter of an upstream.
    pub fn upstream_ejections(&self, upstream: &str) -> Counter {
        self.upstream_ejections
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    /// The failed-active-health-checks counter of an upstream.
    pub fn upstream_health_check_failures(&self, upstream: &str) -> Counter {
        self.upstream_check_failures
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .clone()
    }

    /// Replaces the endpoints gauge with the current upstreams' counts (upstreams a reload
    /// removed disappear from it).
    pub fn set_upstream_endpoints<'a>(
        &self,
        upstreams: impl Iterator<Item = (&'a str, EndpointStates)>,
    ) {
        self.upstream_endpoints.clear();
        for (upstream, n) in upstreams {
            for (state, count) in [
                ("available", n.available),
                ("ejected", n.ejected),
                ("check_failed", n.check_failed),
            ] {
                self.upstream_endpoints
                    .get_or_create(&EndpointStateLabels {
                        upstream: upstream.to_owned(),
                        state,
                    })
                    .set(count);
            }
        }
    }

    /// The open-connections gauge of a listener ("http" or "https").
    pub fn open_connections(&self, listener: &str) -> Gauge {
        self.open_connections
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .clone()
    }

    /// Counts a connection closed for its PROXY protocol header.
    pub fn proxy_protocol_rejected(&self) {
        self.proxy_protocol_rejected.inc();
    }

    /// Records the time to response head.
    pub fn observe_latency(&self, seconds: f64) {
        self.latency.observe(seconds);
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Serves, until the task is dropped:
/// - `GET /metrics`: the text exposition, after `before_scrape` has updated what is computed
///   at scrape time;
/// - `GET /healthz`: 200 while the worker serving it runs (a liveness probe);
/// - `GET /readyz`: 200 while `ready()` says so, 503 otherwise (a readiness probe: the proxy
///   answers 503 once it drains, so a load balancer stops sending before its listeners close);
/// - anything else: 404.
///
/// Probes get their own paths so they cost nothing as rules grow (`/metrics` encodes every
/// rule's series).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        let before_scrape = before_scrape.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    if req.uri().path() == "/metrics" {
                        before_scrape();
                    }
                    let resp = answer(req.uri().path(), &metrics, &*ready);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection failed");
            }
        });
    }
}

fn answer(
    path: &str,
    metrics: &Metrics,
    ready: &(dyn Fn() -> bool + Send + Sync),
) -> hyper::Response<super::body::RespBody> {
    use super::body::RespBody;
    use http::StatusCode;
    let (status, body): (StatusCode, RespBody) = match path {
        "/metrics" => (StatusCode::OK, RespBody::full(metrics.encode())),
        "/healthz" => (StatusCode::OK, RespBody::full("ok\n")),
        "/readyz" if ready() => (StatusCode::OK, RespBody::full("ready\n")),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            RespBody::full("draining\n"),
        ),
        _ => (StatusCode::NOT_FOUND, RespBody::full("not found\n")),
    };
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() = status;
    let content_type = if path == "/metrics" && status == StatusCode::OK {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
