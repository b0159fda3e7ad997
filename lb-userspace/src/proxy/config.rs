//! The proxy's configuration model and its validation.
//!
//! The model maps one to one onto the Kubernetes objects `xlb proxy --kubernetes` feeds it
//! from (`crate::kubernetes::ingress`):
//! [`IngressClass`] ↔ `networking.k8s.io/v1` IngressClass, [`Ingress`] ↔ Ingress (with
//! `spec.rules[].http.paths` flattened to `rules[].paths`), [`TlsSecret`] ↔ a
//! `kubernetes.io/tls` Secret (`tls.crt`/`tls.key` as files or inline PEM) and [`Service`] ↔ one
//! port of a Service together with its ready endpoints (EndpointSlices). Everything else
//! (listeners, timeouts, limits) is proxy-wide and has no Kubernetes counterpart.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

/// The `spec.controller` value of IngressClasses this proxy serves.
pub const CONTROLLER_NAME: &str = "xlb.dev/proxy";
/// Ingress annotation: `"true"` redirects plain-HTTP requests of this Ingress to HTTPS (308).
pub const ANNOTATION_SSL_REDIRECT: &str = "xlb.dev/ssl-redirect";
/// Ingress annotation: request body limit in bytes for this Ingress (overrides
/// `limits.max_body_bytes`); larger bodies are refused with 413.
pub const ANNOTATION_MAX_BODY: &str = "xlb.dev/max-body-bytes";

/// The configuration compiled into the binary, used when `--config` is absent.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid TOML/YAML for this model.
    #[error("cannot parse {origin} as {format}: {message}")]
    Parse {
        /// File name or "embedded default".
        origin: String,
        /// "TOML" or "YAML".
        format: &'static str,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The model parsed but is inconsistent; `field` is the path of the offending field.
    #[error("invalid proxy config: {field}: {reason}")]
    Invalid {
        /// Path of the offending field, e.g. `ingresses[1].rules[0].paths[2].path`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The whole proxy configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Listening sockets and worker threads (changes need a restart).
    pub listen: Listen,
    /// Connection and request timeouts.
    pub timeouts: Timeouts,
    /// Size and concurrency limits.
    pub limits: Limits,
    /// How request paths are normalised before routing.
    pub paths: PathSettings,
    /// Proxy-wide TLS settings.
    pub tls: TlsSettings,
    /// Whose forwarding headers (`X-Forwarded-*`, `Forwarded`) are believed.
    pub forwarded_headers: ForwardedHeaders,
    /// `X-Request-ID` on requests to upstreams.
    pub request_id: RequestIdSettings,
    /// Emit one access log line per request (tracing target `xlb::access`).
    pub access_log: bool,
    /// IngressClasses; when empty every Ingress is served.
    pub ingress_classes: Vec<IngressClass>,
    /// Ingresses: host and path rules.
    pub ingresses: Vec<Ingress>,
    /// `kubernetes.io/tls` Secrets referenced by `ingresses[].tls` and `tls.default_secret`.
    pub secrets: Vec<TlsSecret>,
    /// Service ports and their endpoints, referenced by Ingress backends.
    pub services: Vec<Service>,
    /// Set by a live source (`xlb proxy --kubernetes`) whose certificates come and go with
    /// Ingresses: an HTTPS listener with no certificate at all is then accepted (handshakes
    /// fail until one exists) instead of being rejected as a file mistake — otherwise deleting
    /// the last TLS Ingress would freeze every later update. Not part of the file format.
    #[serde(skip)]
    pub dynamic_certificates: bool,
}

/// Listening sockets.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// Plain HTTP listener (HTTP/1.1 and h2c prior knowledge); `"off"` disables it.
    #[serde(deserialize_with = "opt_addr")]
    pub http: Option<SocketAddr>,
    /// TLS listener (ALPN h2 and http/1.1); `"off"` (the default) disables it.
    #[serde(deserialize_with = "opt_addr")]
    pub https: Option<SocketAddr>,
    /// Prometheus `/metrics`; loopback by default because metrics reveal topology.
    #[serde(deserialize_with = "opt_addr")]
    pub metrics: Option<SocketAddr>,
    /// Worker threads, each with its own runtime and SO_REUSEPORT listener; 0 = one per CPU.
    pub workers: usize,
    /// Port put into HTTPS redirect locations; absent = the default port 443 (omitted).
    pub https_redirect_port: Option<u16>,
    /// Every connection on both listeners starts with a PROXY protocol header (v1 or v2)
    /// naming the client, as a TCP load balancer in front sends it; connections without one
    /// are closed.
    pub proxy_protocol: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            https: None,
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
            workers: 0,
            https_redirect_port: None,
            proxy_protocol: false,
        }
    }
}

fn opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not an address:port ({e})")))
}

/// Timeouts in milliseconds; all must be positive.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// TCP connect to an upstream endpoint.
    pub connect_ms: u64,
    /// Reading a request's header block (and the TLS handshake): the slowloris bound.
    pub request_header_ms: u64,
    /// Each wait for more of a client's request body once its head has arrived (nginx's
    /// `client_body_timeout`); a client that pauses longer gets 408 and its request is
    /// abandoned at the endpoint. A gRPC call whose `grpc-timeout` is longer may pause until
    /// then.
    pub request_body_ms: u64,
    /// How long an endpoint may keep a request waiting (504): to take each piece of the
    /// request, then from the request's end to the response head, then for each further
    /// piece of the response body (the body is cut: nginx's `proxy_read_timeout`). Time spent
    /// waiting for the client's request body does not count.
    /// A gRPC call to an `h2` Service whose `grpc-timeout` (the client's deadline) is longer
    /// waits until then. Upgraded connections (WebSockets) are not bounded by it.
    pub upstream_response_ms: u64,
    /// A downstream connection with no request in flight is closed after this long.
    pub idle_ms: u64,
    /// An upgraded connection (WebSocket) with no bytes in either direction for this long is
    /// closed (HAProxy's `timeout tunnel`). WebSocket libraries ping every 20–60 s; a tunnel
    /// silent for an hour has almost surely lost a peer that left without closing.
    pub tunnel_idle_ms: u64,
    /// On SIGTERM: how long open connections may finish their requests after the listeners
    /// close, before the rest are cut.
    pub shutdown_grace_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: 2_000,
            request_header_ms: 10_000,
            request_body_ms: 60_000,
            upstream_response_ms: 60_000,
            idle_ms: 60_000,
            tunnel_idle_ms: 3_600_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// Size and concurrency limits.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request header block in bytes; larger is refused with 431.
    pub max_header_bytes: usize,
    /// Default request body limit in bytes (per Ingress: annotation `xlb.dev/max-body-bytes`);
    /// larger is refused with 413.
    pub max_body_bytes: u64,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before they are accepted; beyond this the connection
    /// is closed with GOAWAY (rapid-reset protection, CVE-2023-44487).
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2 streams the proxy may reset because of client protocol errors before the
    /// connection is closed (the other half of rapid-reset protection).
    pub h2_max_local_error_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            h2_max_concurrent_streams: 128,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
        }
    }
}

/// Request path normalisation (see `proxy::path`): escapes of unreserved characters are
/// decoded and `.`/`..` segments removed before routing, always; the upstream gets the same
/// normalised path.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathSettings {
    /// Merge runs of `/` into one (nginx's `merge_slashes`). Turn off only for backends whose
    /// paths carry meaningful empty segments.
    pub merge_slashes: bool,
}

impl Default for PathSettings {
    fn default() -> Self {
        Self {
            merge_slashes: true,
        }
    }
}

/// Proxy-wide TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// `namespace/name` of the Secret served when no Ingress TLS host matches the SNI (or
    /// there is no SNI); without it such handshakes fail.
    pub default_secret: Option<String>,
    /// Only offer TLS 1.3 (default: TLS 1.2 and 1.3).
    pub tls13_only: bool,
}

/// Whose forwarding headers are believed.
///
/// By default none: the proxy is the edge, and a client's own `X-Forwarded-For`,
/// `X-Forwarded-Proto`, `X-Forwarded-Host`, `Forwarded` and `X-Real-IP` are replaced, so no
/// client can pass itself off as another address. Behind another proxy (a cloud load
/// balancer that speaks HTTP, a CDN) its networks go in `trusted_proxies`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardedHeaders {
    /// Networks (`10.0.0.0/8`) or addresses (`192.0.2.7`) of proxies in front of this one.
    /// A request from one of them keeps its `X-Forwarded-For` and `Forwarded` (the proxy
    /// appends its own element), its `X-Forwarded-Proto` and `X-Forwarded-Host` pass on and
    /// count (`https` there means no HTTPS redirect), and its original client is read from
    /// `X-Forwarded-For`, right to left, past every trusted address (nginx's
    /// `real_ip_recursive`): that address is the `X-Real-IP`, the access log's `real_ip` and
    /// the key of client-address affinity.
    #[serde(deserialize_with = "nets")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// `X-Request-ID`: one identifier per request, sent upstream and logged, so that a request
/// can be followed from the access log into the application's logs (ingress-nginx's
/// `generate-request-id`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestIdSettings {
    /// Send `X-Request-ID` upstream and log it as `request_id`: the client's own when it is
    /// well-formed (1 to 128 characters of letters, digits and `-_.:+/=@`), else 32 random
    /// hexadecimal digits.
    pub enabled: bool,
}

impl Default for RequestIdSettings {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Whether `ip` is in one of `nets` (an IPv4-mapped IPv6 address counts as IPv4).
pub(crate) fn is_in(nets: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// Networks, where a bare address stands for itself (`/32`, `/128`).
fn nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|t| {
            let t = t.trim();
            t.parse::<ipnet::IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!("{t:?} is not an address or a network"))
                })
        })
        .collect()
}

/// An IngressClass.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressClass {
    /// `metadata.name`.
    pub name: String,
    /// `spec.controller`; Ingresses of classes with another controller are ignored.
    pub controller: String,
    /// The `ingressclass.kubernetes.io/is-default-class` annotation: Ingresses without a class
    /// belong to this one.
    pub is_default: bool,
}

impl Default for IngressClass {
    fn default() -> Self {
        Self {
            name: String::new(),
            controller: CONTROLLER_NAME.to_owned(),
            is_default: false,
        }
    }
}

/// An Ingress.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ingress {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`; backends and TLS secrets are looked up in it.
    pub namespace: String,
    /// `metadata.annotations`; the proxy reads the `xlb.dev/` ones and ignores the rest.
    pub annotations: BTreeMap<String, String>,
    /// `spec.ingressClassName`.
    pub class_name: Option<String>,
    /// `spec.defaultBackend`: serves requests that match no rule (one per proxy).
    pub default_backend: Option<Backend>,
    /// `spec.tls`.
    pub tls: Vec<IngressTls>,
    /// `spec.rules`.
    pub rules: Vec<IngressRule>,
}

impl Default for Ingress {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: "default".to_owned(),
            annotations: BTreeMap::new(),
            class_name: None,
            default_backend: None,
            tls: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// `spec.tls[]`: the hosts a Secret's certificate is served for.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressTls {
    /// Host names (exact or `*.wildcard`) matched against SNI.
    pub hosts: Vec<String>,
    /// Name of a `kubernetes.io/tls` Secret in the Ingress's namespace.
    pub secret_name: String,
}

/// `spec.rules[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressRule {
    /// Exact host or `*.example.com` (matches exactly one label); absent = every host.
    pub host: Option<String>,
    /// `http.paths`.
    pub paths: Vec<HttpPath>,
}

/// `spec.rules[].http.paths[]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpPath {
    /// Absolute path, starting with `/`.
    pub path: String,
    /// How `path` is matched.
    pub path_type: PathType,
    /// Where matching requests go.
    pub backend: Backend,
}

impl Default for HttpPath {
    fn default() -> Self {
        Self {
            path: "/".to_owned(),
            path_type: PathType::Prefix,
            backend: Backend::default(),
        }
    }
}

/// `pathType`, spelled as in Kubernetes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathType {
    /// The request path equals `path` (case-sensitive).
    Exact,
    /// `path` is an element-wise prefix of the request path (split on `/`).
    #[default]
    Prefix,
    /// Treated as `Prefix` by this proxy.
    ImplementationSpecific,
}

/// `IngressBackend.service`: a Service port in the Ingress's namespace.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backend {
    /// Service name.
    pub service: String,
    /// Service port number (port names are not supported).
    pub port: u16,
}

/// A `kubernetes.io/tls` Secret.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSecret {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `tls.crt` as a PEM file (chain, leaf first); exclusive with `cert_pem`.
    pub cert_file: Option<PathBuf>,
    /// `tls.key` as a PEM file; exclusive with `key_pem`.
    pub key_file: Option<PathBuf>,
    /// `tls.crt` inline (PEM text).
    pub cert_pem: Option<String>,
    /// `tls.key` inline (PEM text).
    pub key_pem: Option<String>,
}

impl Default for TlsSecret {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: "default".to_owned(),
            cert_file: None,
            key_file: None,
            cert_pem: None,
            key_pem: None,
        }
    }
}

/// One port of a Service and its ready endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Service {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The Service port Ingress backends refer to.
    pub port: u16,
    /// Ready endpoint addresses; empty = 503.
    pub endpoints: Vec<SocketAddr>,
    /// The HTTP version spoken to the endpoints: `http1` (default) or `h2` (gRPC needs it).
    pub protocol: UpstreamProtocol,
    /// Load-balancing policy across `endpoints`.
    pub balance: Balance,
    /// For `consistent_hash`: hash this request header; absent = hash the client address.
    pub hash_header: Option<String>,
    /// Passive health checking.
    pub health: PassiveHealth,
    /// Active health checking (off unless `path` is set).
    pub active_health: ActiveHealth,
    /// TLS to the endpoints (off unless `enabled`).
    pub tls: UpstreamTls,
    /// This Service's own timeouts; unset ones are the proxy's `timeouts`.
    pub timeouts: ServiceTimeouts,
}

/// Timeouts of one Service (ingress-nginx's `proxy-connect-timeout` and
/// `proxy-read-timeout`, per Service here): long polls, server-sent events, or gRPC streams
/// without a deadline that go quiet for long need a longer `response_ms` than the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceTimeouts {
    /// Connect to an endpoint, TLS and HTTP/2 handshakes included; unset:
    /// `timeouts.connect_ms`.
    pub connect_ms: Option<u64>,
    /// Request sent → response head (504), and each wait for more of the body; unset:
    /// `timeouts.upstream_response_ms`.
    pub response_ms: Option<u64>,
}

impl ServiceTimeouts {
    /// Checks the settings; `f` names them in the error.
    pub(crate) fn validate(&self, f: &str) -> Result<(), ConfigError> {
        for (name, v) in [
            ("connect_ms", self.connect_ms),
            ("response_ms", self.response_ms),
        ] {
            if v == Some(0) {
                return Err(invalid(format!("{f}.{name}"), "must be positive"));
            }
        }
        Ok(())
    }
}

impl Default for Service {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: "default".to_owned(),
            port: 80,
            endpoints: Vec::new(),
            protocol: UpstreamProtocol::Http1,
            balance: Balance::RoundRobin,
            hash_header: None,
            health: PassiveHealth::default(),
            active_health: ActiveHealth::default(),
            tls: UpstreamTls::default(),
            timeouts: ServiceTimeouts::default(),
        }
    }
}

/// TLS from the proxy to a Service's endpoints (HTTPS upstreams; ingress-nginx's
/// `backend-protocol: HTTPS`). Requests, active health checks and upgraded connections all go
/// over TLS. The certificate is verified by default: against `ca_file` / `ca_pem`, for
/// `server_name`, else for the endpoint's IP address.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTls {
    /// Speak TLS to the endpoints.
    pub enabled: bool,
    /// Sent as SNI and required in the endpoint's certificate; absent = no SNI, and the
    /// certificate must carry the endpoint's IP address.
    pub server_name: Option<String>,
    /// Verify the endpoint's certificate chain and name. `false` encrypts without
    /// authenticating the endpoint (for self-signed pod certificates): anyone on the path
    /// can then read and change the traffic.
    pub verify: bool,
    /// PEM file of the CA certificates endpoint certificates must chain to; exclusive with
    /// `ca_pem`.
    pub ca_file: Option<PathBuf>,
    /// The same, inline (a Secret's `ca.crt`).
    pub ca_pem: Option<String>,
    /// `namespace/name` of a `secrets[]` entry whose certificate and key are presented when
    /// an endpoint asks for a client certificate (mutual TLS).
    pub client_secret: Option<String>,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        Self {
            enabled: false,
            server_name: None,
            verify: true,
            ca_file: None,
            ca_pem: None,
            client_secret: None,
        }
    }
}

impl UpstreamTls {
    /// Checks the settings (not the CA's contents: they are loaded with the upstream); `f`
    /// names them in the error.
    pub(crate) fn validate(&self, f: &str) -> Result<(), ConfigError> {
        if !self.enabled {
            if self.server_name.is_some()
                || self.ca_file.is_some()
                || self.ca_pem.is_some()
                || self.client_secret.is_some()
            {
                return Err(invalid(
                    f.to_owned(),
                    "settings given but enabled = false (set enabled = true to use TLS)",
                ));
            }
            return Ok(());
        }
        if let Some(n) = &self.server_name
            && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
        {
            return Err(invalid(
                format!("{f}.server_name"),
                format!("{n:?} is neither a DNS name nor an IP address"),
            ));
        }
        match (&self.ca_file, &self.ca_pem, self.verify) {
            (Some(_), Some(_), _) => Err(invalid(
                f.to_owned(),
                "set at most one of ca_file and ca_pem",
            )),
            (None, None, true) => Err(invalid(
                f.to_owned(),
                "verify = true needs the CA to verify against: set ca_file or ca_pem \
                 (or verify = false to encrypt without authenticating the endpoints)",
            )),
            (Some(_), None, false) | (None, Some(_), false) => Err(invalid(
                f.to_owned(),
                "a CA is given but verify = false: it would not be used",
            )),
            _ => Ok(()),
        }
    }
}

/// The HTTP version spoken to a Service's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over pooled connections, one request at a time per connection.
    #[default]
    Http1,
    /// HTTP/2, requests multiplexed on one connection per endpoint and worker: with `tls`
    /// the endpoint must pick `h2` by ALPN, without it the connection starts with the HTTP/2
    /// preface (h2c "prior knowledge", as gRPC servers expect). Response trailers (gRPC's
    /// status) are passed to HTTP/2 clients.
    H2,
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Endpoints in turn.
    #[default]
    RoundRobin,
    /// Power of two choices: the less loaded of two random endpoints.
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Consistent hash (ring) of `hash_header` or the client address: affinity.
    ConsistentHash,
}

/// Active health: every endpoint is asked `GET path` (or, with `grpc_service`, the gRPC
/// health checking protocol's `Check`) on its own connection every `interval_ms`; a 2xx or
/// 3xx answer (`SERVING`) within `timeout_ms` passes. An endpoint that fails
/// `unhealthy_threshold` checks in a row (or its very first check) gets no requests until it
/// passes `healthy_threshold` in a row. As with passive ejection, when every endpoint is down
/// they are all used ("panic mode").
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActiveHealth {
    /// Path (and query) to ask for; absent (and no `grpc_service`) disables active checks.
    pub path: Option<String>,
    /// For HTTP/2 Services: check with `grpc.health.v1.Health/Check` for this service name
    /// (`""`: the server as a whole) instead of `GET path`; only `SERVING` passes.
    /// Exclusive with `path`.
    pub grpc_service: Option<String>,
    /// Host header of the check; absent = the endpoint's address.
    pub host: Option<String>,
    /// Time between the end of one check and the start of the next.
    pub interval_ms: u64,
    /// Connect plus response status line.
    pub timeout_ms: u64,
    /// Consecutive failed checks that take an endpoint out.
    pub unhealthy_threshold: u32,
    /// Consecutive passed checks that bring it back.
    pub healthy_threshold: u32,
}

impl Default for ActiveHealth {
    fn default() -> Self {
        Self {
            path: None,
            grpc_service: None,
            host: None,
            interval_ms: 5_000,
            timeout_ms: 2_000,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

impl ActiveHealth {
    /// Whether checks are on.
    pub fn enabled(&self) -> bool {
        self.path.is_some() || self.grpc_service.is_some()
    }

    /// Checks the settings; `f` names them in the error.
    pub(crate) fn validate(&self, f: &str) -> Result<(), ConfigError> {
        match (&self.path, &self.grpc_service) {
            (None, None) => return Ok(()),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{f}.grpc_service"),
                    "set either path (an HTTP check) or grpc_service (a gRPC one), not both",
                ));
            }
            // Written into a request line: a visible-ASCII origin-form target only.
            (Some(path), None)
                if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                return Err(invalid(
                    format!("{f}.path"),
                    format!("{path:?} must start with '/' and hold visible ASCII only"),
                ));
            }
            (None, Some(name))
                if name.len() > 255 || !name.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                return Err(invalid(
                    format!("{f}.grpc_service"),
                    format!("{name:?} is not a gRPC service name"),
                ));
            }
            _ => {}
        }
        if let Some(h) = &self.host
            && (h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(format!("{f}.host"), format!("{h:?} is not a host")));
        }
        if self.interval_ms < 100 || self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(invalid(
                f.to_owned(),
                "need interval_ms >= 100 and 0 < timeout_ms <= interval_ms",
            ));
        }
        if self.unhealthy_threshold == 0 || self.healthy_threshold == 0 {
            return Err(invalid(f.to_owned(), "thresholds must be at least 1"));
        }
        Ok(())
    }
}

/// Passive health: ejection after consecutive failures, re-admission after a backoff.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PassiveHealth {
    /// Consecutive connect failures or 5xx responses that eject an endpoint; 0 disables.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further consecutive ejection doubles it.
    pub base_ejection_ms: u64,
    /// Cap on the ejection duration.
    pub max_ejection_ms: u64,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 5_000,
            max_ejection_ms: 60_000,
        }
    }
}

/// What the proxy loads from a file: TOML unless the extension is `.yaml`/`.yml`.
impl ProxyConfig {
    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml_str(EMBEDDED_DEFAULT, "embedded default")
    }

    /// Parses TOML and validates.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            format: "TOML",
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses YAML and validates.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            format: "YAML",
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::read(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a file without validating it: for `xlb proxy --kubernetes`, which
    /// keeps only the node-wide settings and validates them with the objects from the API.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let origin = path.display().to_string();
        let parse = |format: &'static str, message: String| ConfigError::Parse {
            origin: origin.clone(),
            format,
            message,
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                serde_norway::from_str(&text).map_err(|e| parse("YAML", e.to_string()))
            }
            _ => toml::from_str(&text).map_err(|e| parse("TOML", e.to_string())),
        }
    }

    /// Worker threads to run (resolves `listen.workers = 0`).
    pub fn worker_count(&self) -> usize {
        if self.listen.workers > 0 {
            self.listen.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Whether an Ingress is served by this proxy (IngressClass semantics).
    pub fn serves(&self, ing: &Ingress) -> bool {
        if self.ingress_classes.is_empty() {
            return true;
        }
        let class = match &ing.class_name {
            Some(name) => self.ingress_classes.iter().find(|c| &c.name == name),
            None => self.ingress_classes.iter().find(|c| c.is_default),
        };
        class.is_some_and(|c| c.controller == CONTROLLER_NAME)
    }

    /// Checks everything the model's types cannot express; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_proxy_wide()?;

        let mut class_names = HashSet::new();
        let mut defaults = 0;
        for (i, c) in self.ingress_classes.iter().enumerate() {
            let f = format!("ingress_classes[{i}]");
            check_name(&c.name, &format!("{f}.name"))?;
            if !class_names.insert(c.name.as_str()) {
                return Err(invalid(
                    format!("{f}.name"),
                    format!("duplicate class {:?}", c.name),
                ));
            }
            if c.controller.is_empty() {
                return Err(invalid(format!("{f}.controller"), "must not be empty"));
            }
            defaults += usize::from(c.is_default);
        }
        if defaults > 1 {
            return Err(invalid(
                "ingress_classes",
                "more than one class has is_default = true",
            ));
        }

        let mut secrets = HashSet::new();
        for (i, s) in self.secrets.iter().enumerate() {
            let f = format!("secrets[{i}]");
            check_name(&s.name, &format!("{f}.name"))?;
            check_name(&s.namespace, &format!("{f}.namespace"))?;
            if !secrets.insert((s.namespace.as_str(), s.name.as_str())) {
                return Err(invalid(
                    f,
                    format!("duplicate secret {}/{}", s.namespace, s.name),
                ));
            }
            match (&s.cert_file, &s.cert_pem) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(invalid(
                        format!("{f}.cert_file"),
                        "set exactly one of cert_file and cert_pem",
                    ));
                }
            }
            match (&s.key_file, &s.key_pem) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(invalid(
                        format!("{f}.key_file"),
                        "set exactly one of key_file and key_pem",
                    ));
                }
            }
        }
        if let Some(d) = &self.tls.default_secret {
            let found = d
                .split_once('/')
                .is_some_and(|(ns, name)| secrets.contains(&(ns, name)));
            if !found {
                return Err(invalid(
                    "tls.default_secret",
                    format!("{d:?} does not name a secret as namespace/name"),
                ));
            }
        }

        let mut services = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let f = format!("services[{i}]");
            check_name(&s.name, &format!("{f}.name"))?;
            check_name(&s.namespace, &format!("{f}.namespace"))?;
            if s.port == 0 {
                return Err(invalid(format!("{f}.port"), "must be 1..=65535"));
            }
            if !services.insert((s.namespace.as_str(), s.name.as_str(), s.port)) {
                return Err(invalid(
                    f,
                    format!(
                        "duplicate service port {}/{}:{}",
                        s.namespace, s.name, s.port
                    ),
                ));
            }
            let mut seen = HashSet::new();
            for (j, e) in s.endpoints.iter().enumerate() {
                if !seen.insert(e) {
                    return Err(invalid(
                        format!("{f}.endpoints[{j}]"),
                        format!("duplicate endpoint {e}"),
                    ));
                }
                if e.port() == 0 || e.ip().is_unspecified() {
                    return Err(invalid(
                        format!("{f}.endpoints[{j}]"),
                        format!("{e} is not a usable address"),
                    ));
                }
            }
            if let Some(h) = &s.hash_header {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(invalid(
                        format!("{f}.hash_header"),
                        format!("{h:?} is not a header name"),
                    ));
                }
                if s.balance != Balance::ConsistentHash {
                    return Err(invalid(
                        format!("{f}.hash_header"),
                        "only used with balance = \"consistent_hash\"",
                    ));
                }
            }
            let h = &s.health;
            if h.consecutive_failures > 0
                && (h.base_ejection_ms == 0 || h.max_ejection_ms < h.base_ejection_ms)
            {
                return Err(invalid(
                    format!("{f}.health"),
                    "need 0 < base_ejection_ms <= max_ejection_ms",
                ));
            }
            s.active_health.validate(&format!("{f}.active_health"))?;
            if s.active_health.grpc_service.is_some() && s.protocol != UpstreamProtocol::H2 {
                return Err(invalid(
                    format!("{f}.active_health.grpc_service"),
                    "gRPC health checks need protocol = \"h2\"",
                ));
            }
            s.tls.validate(&format!("{f}.tls"))?;
            s.timeouts.validate(&format!("{f}.timeouts"))?;
            if let Some(c) = &s.tls.client_secret {
                let found = c
                    .split_once('/')
                    .is_some_and(|(ns, name)| secrets.contains(&(ns, name)));
                if !found {
                    return Err(invalid(
                        format!("{f}.tls.client_secret"),
                        format!("{c:?} does not name a secret as namespace/name"),
                    ));
                }
            }
        }

        let mut ingresses = HashSet::new();
        let mut default_backend: Option<String> = None;
        for (i, ing) in self.ingresses.iter().enumerate() {
            let f = format!("ingresses[{i}]");
            check_name(&ing.name, &format!("{f}.name"))?;
            check_name(&ing.namespace, &format!("{f}.namespace"))?;
            if !ingresses.insert((ing.namespace.as_str(), ing.name.as_str())) {
                return Err(invalid(
                    f,
                    format!("duplicate ingress {}/{}", ing.namespace, ing.name),
                ));
            }
            if let Some(c) = &ing.class_name
                && !self.ingress_classes.is_empty()
                && !class_names.contains(c.as_str())
            {
                return Err(invalid(
                    format!("{f}.class_name"),
                    format!("no ingress class {c:?}"),
                ));
            }
            Annotations::parse(ing, &f)?;
            let service_exists = |b: &Backend| {
                services.contains(&(ing.namespace.as_str(), b.service.as_str(), b.port))
            };
            if let Some(b) = &ing.default_backend {
                if !service_exists(b) {
                    return Err(invalid(
                        format!("{f}.default_backend"),
                        format!("no service port {}/{}:{}", ing.namespace, b.service, b.port),
                    ));
                }
                if self.serves(ing) {
                    if let Some(other) = &default_backend {
                        return Err(invalid(
                            format!("{f}.default_backend"),
                            format!("{other} already sets the default backend"),
                        ));
                    }
                    default_backend = Some(f.clone());
                }
            }
            for (j, t) in ing.tls.iter().enumerate() {
                let tf = format!("{f}.tls[{j}]");
                if !secrets.contains(&(ing.namespace.as_str(), t.secret_name.as_str())) {
                    return Err(invalid(
                        format!("{tf}.secret_name"),
                        format!("no secret {}/{}", ing.namespace, t.secret_name),
                    ));
                }
                for (k, h) in t.hosts.iter().enumerate() {
                    check_host(h, &format!("{tf}.hosts[{k}]"))?;
                }
            }
            for (j, r) in ing.rules.iter().enumerate() {
                let rf = format!("{f}.rules[{j}]");
                if let Some(h) = &r.host {
                    check_host(h, &format!("{rf}.host"))?;
                }
                if r.paths.is_empty() {
                    return Err(invalid(
                        format!("{rf}.paths"),
                        "a rule needs at least one path",
                    ));
                }
                for (k, p) in r.paths.iter().enumerate() {
                    let pf = format!("{rf}.paths[{k}]");
                    if !p.path.starts_with('/') {
                        return Err(invalid(
                            format!("{pf}.path"),
                            format!("{:?} must start with '/'", p.path),
                        ));
                    }
                    if p.path.bytes().any(|b| {
                        b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?' || b == b'#'
                    }) {
                        return Err(invalid(
                            format!("{pf}.path"),
                            format!("{:?} contains whitespace, '?' or '#'", p.path),
                        ));
                    }
                    if let Some(problem) =
                        super::path::rule_path_problem(&p.path, self.paths.merge_slashes)
                    {
                        return Err(invalid(format!("{pf}.path"), problem));
                    }
                    if !service_exists(&p.backend) {
                        return Err(invalid(
                            format!("{pf}.backend"),
                            format!(
                                "no service port {}/{}:{}",
                                ing.namespace, p.backend.service, p.backend.port
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_proxy_wide(&self) -> Result<(), ConfigError> {
        if self.listen.http.is_none() && self.listen.https.is_none() {
            return Err(invalid(
                "listen",
                "at least one of http and https is needed",
            ));
        }
        if self.listen.workers > 256 {
            return Err(invalid("listen.workers", "at most 256"));
        }
        if self.listen.https.is_some()
            && !self.dynamic_certificates
            && self.tls.default_secret.is_none()
            && !self.ingresses.iter().any(|i| !i.tls.is_empty())
        {
            return Err(invalid(
                "listen.https",
                "no certificate: set tls.default_secret or an ingress tls section",
            ));
        }
        let t = &self.timeouts;
        for (name, v) in [
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.request_header_ms", t.request_header_ms),
            ("timeouts.request_body_ms", t.request_body_ms),
            ("timeouts.upstream_response_ms", t.upstream_response_ms),
            ("timeouts.idle_ms", t.idle_ms),
            ("timeouts.tunnel_idle_ms", t.tunnel_idle_ms),
            ("timeouts.shutdown_grace_ms", t.shutdown_grace_ms),
        ] {
            if v == 0 {
                return Err(invalid(name, "must be positive"));
            }
        }
        let l = &self.limits;
        if l.max_header_bytes < 1024 {
            return Err(invalid("limits.max_header_bytes", "must be at least 1024"));
        }
        if l.h2_max_concurrent_streams == 0 {
            return Err(invalid(
                "limits.h2_max_concurrent_streams",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// The `xlb.dev/` annotations of an Ingress, parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Annotations {
    pub ssl_redirect: bool,
    pub max_body_bytes: Option<u64>,
}

impl Annotations {
    pub(crate) fn parse(ing: &Ingress, field: &str) -> Result<Self, ConfigError> {
        let mut a = Self::default();
        for (k, v) in &ing.annotations {
            let f = || format!("{field}.annotations.{k:?}");
            match k.as_str() {
                ANNOTATION_SSL_REDIRECT => {
                    a.ssl_redirect = v
                        .parse()
                        .map_err(|_| invalid(f(), format!("{v:?} is not true/false")))?;
                }
                ANNOTATION_MAX_BODY => {
                    a.max_body_bytes = Some(
                        v.parse()
                            .map_err(|_| invalid(f(), format!("{v:?} is not a byte count")))?,
                    );
                }
                _ if k.starts_with("xlb.dev/") => {
                    return Err(invalid(f(), "unknown xlb.dev annotation"));
                }
                // Other controllers' annotations are legitimately present on shared Ingresses.
                _ => {}
            }
        }
        Ok(a)
    }
}

/// A DNS-1123 label-ish name (Kubernetes object names).
fn check_name(name: &str, field: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not a lowercase DNS name"),
        ))
    }
}

/// An Ingress host: a lowercase DNS name, optionally `*.` followed by one; no IPs, no port.
fn check_host(host: &str, field: &str) -> Result<(), ConfigError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !labels_ok {
        return Err(invalid(
            field,
            format!("{host:?} is not a lowercase DNS name (optionally starting with \"*.\")"),
        ));
    }
    if name.parse::<std::net::IpAddr>().is_ok()
        || name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(invalid(
            field,
            format!("{host:?}: IP addresses are not allowed as hosts"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ProxyConfig {
        ProxyConfig::from_toml_str(
            r#"
            [[services]]
            name = "web"
            port = 80
            endpoints = ["127.0.0.1:9000"]

            [[ingresses]]
            name = "web"
            [[ingresses.rules]]
            host = "app.example.com"
            [[ingresses.rules.paths]]
            path = "/"
            path_type = "Prefix"
            backend = { service = "web", port = 80 }
            "#,
            "test",
        )
        .expect("base config is valid")
    }

    fn field_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let cfg = ProxyConfig::embedded_default().expect("embedded default parses");
        assert!(cfg.listen.http.is_some());
        assert_eq!(cfg.listen.metrics.map(|a| a.ip().is_loopback()), Some(true));
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../../deploy/proxy.example.toml");
        let cfg = ProxyConfig::from_toml_str(text, "example").expect("example parses");
        assert!(!cfg.ingresses.is_empty());
        let cart = cfg
            .services
            .iter()
            .find(|s| s.name == "cart")
            .expect("cart");
        assert_eq!(cart.timeouts.response_ms, Some(3_600_000));
        assert_eq!(cfg.timeouts.request_body_ms, 60_000);
        assert_eq!(cfg.timeouts.tunnel_idle_ms, 3_600_000);
        assert_eq!(cfg.forwarded_headers.trusted_proxies.len(), 1);
        assert!(cfg.request_id.enabled);
        assert!(!cfg.listen.proxy_protocol);
        let off =
            ProxyConfig::from_toml_str("[request_id]\nenabled = false\n", "t").expect("parses");
        assert!(!off.request_id.enabled);
        assert!(ProxyConfig::default().request_id.enabled, "on by default");
    }

    #[test]
    fn zero_body_and_tunnel_timeouts_are_rejected_by_name() {
        let mut c = ProxyConfig::default();
        c.timeouts.request_body_ms = 0;
        let e = c.validate().expect_err("0 ms");
        assert!(e.to_string().contains("timeouts.request_body_ms"), "{e}");
        let mut c = ProxyConfig::default();
        c.timeouts.tunnel_idle_ms = 0;
        let e = c.validate().expect_err("0 ms");
        assert!(e.to_string().contains("timeouts.tunnel_idle_ms"), "{e}");
        let c = ProxyConfig::from_toml_str("[timeouts]\nrequest_body_ms = 5000\n", "t")
            .expect("parses");
        assert_eq!(c.timeouts.request_body_ms, 5_000);
    }

    #[test]
    fn trusted_proxies_take_networks_and_addresses_and_name_a_bad_entry() {
        let c = ProxyConfig::from_toml_str(
            "[forwarded_headers]\ntrusted_proxies = [\"10.1.2.3/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n",
            "t",
        )
        .expect("parses");
        let f = &c.forwarded_headers;
        assert_eq!(f.trusted_proxies[0].to_string(), "10.0.0.0/8");
        assert_eq!(f.trusted_proxies[1].to_string(), "192.0.2.7/32");
        for (peer, trusted) in [
            ("10.200.0.1", true),
            ("::ffff:10.0.0.9", true),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("2001:db8:1::1", true),
            ("2001:db9::1", false),
        ] {
            assert_eq!(
                is_in(&f.trusted_proxies, peer.parse().expect("ip")),
                trusted,
                "{peer}"
            );
        }
        let none = ProxyConfig::default().forwarded_headers.trusted_proxies;
        assert!(!is_in(&none, "127.0.0.1".parse().expect("ip")));
        let e = ProxyConfig::from_toml_str(
            "[forwarded_headers]\ntrusted_proxies = [\"10.0.0.0/8\", \"lb.internal\"]\n",
            "t",
        )
        .expect_err("a name is not a network");
        let e = e.to_string();
        assert!(
            e.contains("trusted_proxies") && e.contains("\"lb.internal\""),
            "{e}"
        );
    }

    #[test]
    fn yaml_and_toml_agree() {
        let yaml = r#"
services:
  - name: web
    port: 80
    endpoints: ["127.0.0.1:9000"]
ingresses:
  - name: web
    rules:
      - host: app.example.com
        paths:
          - path: /
            path_type: Prefix
            backend: { service: web, port: 80 }
"#;
        assert_eq!(
            ProxyConfig::from_yaml_str(yaml, "y").expect("yaml parses"),
            base()
        );
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = base();
        c.ingresses[0].rules[0].paths[0].path = "nope".into();
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ingresses[0].rules[0].paths[0].path"
        );

        let mut c = base();
        c.services[0].active_health.path = Some("healthz".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "services[0].active_health.path"
        );
        c.services[0].active_health.grpc_service = Some(String::new());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "services[0].active_health.grpc_service",
            "path and grpc_service"
        );
        c.services[0].active_health.path = None;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "services[0].active_health.grpc_service",
            "gRPC checks of an HTTP/1.1 Service"
        );
        c.services[0].protocol = UpstreamProtocol::H2;
        c.validate().expect("valid gRPC check");
        c.services[0].active_health.grpc_service = Some("bad name".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "services[0].active_health.grpc_service"
        );
        c.services[0].active_health.grpc_service = None;
        c.services[0].protocol = UpstreamProtocol::Http1;
        c.services[0].active_health.path = Some("/healthz".into());
        c.validate().expect("valid active check");
        c.services[0].active_health.timeout_ms = 10_000;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "services[0].active_health"
        );

        // A path requests can never match once normalised.
        let mut c = base();
        c.ingresses[0].rules[0].paths[0].path = "/web/../api".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("ingresses[0].rules[0].paths[0].path") && err.contains("\"/api\""),
            "{err}"
        );
        c.ingresses[0].rules[0].paths[0].path = "/web//api".into();
        assert!(c.validate().is_err());
        c.paths.merge_slashes = false;
        c.validate()
            .expect("empty segments can match when slashes are kept");

        let mut c = base();
        c.ingresses[0].rules[0].paths[0].backend.port = 81;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ingresses[0].rules[0].paths[0].backend"
        );

        let mut c = base();
        c.ingresses[0].rules[0].host = Some("*.*.example.com".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ingresses[0].rules[0].host"
        );

        let mut c = base();
        c.ingresses[0].rules[0].host = Some("10.0.0.1".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ingresses[0].rules[0].host"
        );

        let mut c = base();
        c.timeouts.connect_ms = 0;
        assert_eq!(field_of(c.validate().unwrap_err()), "timeouts.connect_ms");

        let mut c = base();
        c.services[0].timeouts.response_ms = Some(0);
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "services[0].timeouts.response_ms"
        );
        c.services[0].timeouts = ServiceTimeouts {
            connect_ms: Some(100),
            response_ms: Some(3_600_000),
        };
        c.validate().expect("positive Service timeouts");

        let mut c = base();
        c.ingresses[0]
            .annotations
            .insert(ANNOTATION_MAX_BODY.into(), "lots".into());
        assert!(field_of(c.validate().unwrap_err()).contains("annotations"));

        let mut c = base();
        c.listen.https = Some("127.0.0.1:0".parse().unwrap());
        assert_eq!(field_of(c.validate().unwrap_err()), "listen.https");

        let mut c = base();
        c.services[0].hash_header = Some("x-user".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "services[0].hash_header"
        );
    }

    #[test]
    fn upstream_tls_settings_are_validated() {
        let on = UpstreamTls {
            enabled: true,
            ..UpstreamTls::default()
        };
        // (settings, the error's field and words; None: valid)
        let cases = [
            (UpstreamTls::default(), None),
            (
                UpstreamTls {
                    verify: false,
                    ..on.clone()
                },
                None,
            ),
            (
                UpstreamTls {
                    ca_pem: Some("pem".into()),
                    server_name: Some("api.internal".into()),
                    ..on.clone()
                },
                None,
            ),
            (
                UpstreamTls {
                    ca_file: Some("/etc/ca.pem".into()),
                    server_name: Some("10.0.0.7".into()),
                    ..on.clone()
                },
                None,
            ),
            (on.clone(), Some(("services[0].tls", "ca_file or ca_pem"))),
            (
                UpstreamTls {
                    ca_pem: Some("pem".into()),
                    ca_file: Some("/etc/ca.pem".into()),
                    ..on.clone()
                },
                Some(("services[0].tls", "at most one")),
            ),
            (
                UpstreamTls {
                    ca_pem: Some("pem".into()),
                    verify: false,
                    ..on.clone()
                },
                Some(("services[0].tls", "not be used")),
            ),
            (
                UpstreamTls {
                    server_name: Some("bad name!".into()),
                    verify: false,
                    ..on.clone()
                },
                Some(("services[0].tls.server_name", "neither")),
            ),
            (
                UpstreamTls {
                    server_name: Some("api.internal".into()),
                    ..UpstreamTls::default()
                },
                Some(("services[0].tls", "enabled = false")),
            ),
            (
                UpstreamTls {
                    client_secret: Some("default/missing".into()),
                    verify: false,
                    ..on.clone()
                },
                Some(("services[0].tls.client_secret", "does not name a secret")),
            ),
        ];
        for (tls, want) in cases {
            let mut c = base();
            c.services[0].tls = tls.clone();
            match (c.validate(), want) {
                (Ok(()), None) => {}
                (Err(ConfigError::Invalid { field, reason }), Some((f, words))) => {
                    assert!(
                        field == f && reason.contains(words),
                        "{tls:?}: {field}: {reason}"
                    );
                }
                (got, _) => panic!("{tls:?}: {got:?}, want {want:?}"),
            }
        }
        let toml = "[[services]]\nname = \"api\"\nport = 443\n\
                    [services.tls]\nenabled = true\nverify = false\n";
        let c = ProxyConfig::from_toml_str(toml, "t").expect("parses");
        assert!(c.services[0].tls.enabled && !c.services[0].tls.verify);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = ProxyConfig::from_toml_str("[listen]\nhttp_port = 1\n", "t").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn ingress_class_selection() {
        let mut c = base();
        c.ingress_classes = vec![
            IngressClass {
                name: "xlb".into(),
                is_default: true,
                ..Default::default()
            },
            IngressClass {
                name: "other".into(),
                controller: "k8s.io/other".into(),
                ..Default::default()
            },
        ];
        assert!(c.serves(&c.ingresses[0]));
        c.ingresses[0].class_name = Some("other".into());
        assert!(!c.serves(&c.ingresses[0]));
        c.ingresses[0].class_name = Some("missing".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ingresses[0].class_name"
        );
    }
}
