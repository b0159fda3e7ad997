//! IngressClasses, Ingresses, `kubernetes.io/tls` Secrets, Services and EndpointSlices →
//! the proxy's [`ProxyConfig`]. Pure: no I/O, so every rule is tested on the host and every
//! proxy replica computes the same rules from the same objects.
//!
//! * **Which Ingresses.** `spec.ingressClassName` naming an IngressClass whose
//!   `spec.controller` is [`IngressOptions::controller`] (default [`CONTROLLER_NAME`], as in
//!   `deploy/ingressclass.yaml`). An Ingress without `spec.ingressClassName` is read through
//!   the legacy annotation [`LEGACY_CLASS_ANNOTATION`] (its value taken as an IngressClass
//!   name, because older manifests still carry it), and without either it belongs to the
//!   default class: the one IngressClass annotated [`DEFAULT_CLASS_ANNOTATION`]` = "true"`.
//!   With several default classes no class-less Ingress is served (Kubernetes' admission
//!   refuses to pick one, and so do we).
//! * **Backends.** `service.port.number` matches a Service port by number,
//!   `service.port.name` by name (TCP ports only). Endpoints: EndpointSlices labelled
//!   `kubernetes.io/service-name` in the Ingress's namespace, the slice port with the same
//!   name as the Service port (that is how the targetPort is resolved, named or not), ready
//!   endpoints only (`ready` unset counts as ready, as the API documents). A Service with no
//!   ready endpoint answers 503. A Service or Service port that does not exist (not yet
//!   created, or deleted) also answers 503 on its paths only, and the Ingress is reported in
//!   [`IngressTranslation::degraded`]: the Ingress's other paths keep serving, as with
//!   ingress-nginx, instead of one missing Service taking all of them down. Resource
//!   backends and ExternalName Services are refused.
//! * **Per-Service policy** comes from the Service's `xlb.dev/proxy-*` annotations
//!   ([`service_policy`]): balancing, the affinity header, passive and active health, TLS to
//!   the endpoints (its CA from a `kubernetes.io/tls` Secret's `ca.crt`, a client
//!   certificate from another's `tls.crt`/`tls.key`). An invalid one
//!   rejects the Ingresses that use the Service, naming the annotation.
//! * **Certificates.** Only Secrets named by a served Ingress's `spec.tls` (and the file's
//!   `tls.default_secret`, read as `namespace/name` of a Secret) are put into the config;
//!   each must be of type `kubernetes.io/tls` and its `tls.crt`/`tls.key` must load.
//! * **Bad Ingresses** are left out one by one with a [`Rejected`] naming them and the
//!   reason; everything else is served. The checks are [`ProxyConfig::validate`] and the
//!   certificate loader of the file path, run per Ingress and then on the whole, so an
//!   Ingress is accepted exactly when the same rules in a file would be.
//! * **Order.** Where rules overlap the first Ingress wins; Ingresses are ordered oldest
//!   first (`creationTimestamp`, then namespace/name), so an older Ingress is not displaced
//!   by a newer one claiming the same host and path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    Ingress, IngressBackend, IngressClass, IngressSpec, IngressTLS,
};

use super::translate::SERVICE_NAME_LABEL;
use crate::proxy::config::{self as pc, ConfigError, ProxyConfig};
use crate::proxy::tls::CertStore;
use crate::proxy::upstream_tls::TlsOrigination;

pub use crate::proxy::config::CONTROLLER_NAME;

/// IngressClass annotation marking the cluster's default class.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The pre-`ingressClassName` annotation; read only when `spec.ingressClassName` is unset.
pub const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// The Secret type carrying `tls.crt` and `tls.key`.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// Service annotation: `round_robin`, `least_request`, `random` or `consistent_hash`.
pub const PROXY_LOAD_BALANCE: &str = "xlb.dev/proxy-load-balance";
/// Service annotation: header whose value `consistent_hash` hashes (implies it).
pub const PROXY_HASH_BY: &str = "xlb.dev/proxy-upstream-hash-by";
/// Service annotation: consecutive failures that eject an endpoint (0: no passive health).
pub const PROXY_MAX_FAILS: &str = "xlb.dev/proxy-max-fails";
/// Service annotation: path of active health checks (switches them on).
pub const PROXY_CHECK_PATH: &str = "xlb.dev/proxy-health-check-path";
/// Service annotation: milliseconds between active checks.
pub const PROXY_CHECK_INTERVAL: &str = "xlb.dev/proxy-health-check-interval-ms";
/// Service annotation: milliseconds an active check may take.
pub const PROXY_CHECK_TIMEOUT: &str = "xlb.dev/proxy-health-check-timeout-ms";
/// Service annotation: check with the gRPC health checking protocol for this service name
/// (`""`: the server as a whole) instead of `GET path`; needs `GRPC` or `GRPCS`.
pub const PROXY_CHECK_GRPC_SERVICE: &str = "xlb.dev/proxy-health-check-grpc-service";
/// Service annotation: milliseconds to connect to an endpoint (TLS and HTTP/2 handshakes
/// included); default the proxy's `timeouts.connect_ms`.
pub const PROXY_CONNECT_TIMEOUT: &str = "xlb.dev/proxy-connect-timeout-ms";
/// Service annotation: milliseconds from sending a request to the response head (504
/// after); default the proxy's `timeouts.upstream_response_ms`. ingress-nginx's
/// `proxy-read-timeout`, for long polls and streams that answer late.
pub const PROXY_RESPONSE_TIMEOUT: &str = "xlb.dev/proxy-response-timeout-ms";
/// Service annotation: Host header of active checks.
pub const PROXY_CHECK_HOST: &str = "xlb.dev/proxy-health-check-host";
/// Service annotation: failed checks in a row that take an endpoint out.
pub const PROXY_CHECK_UNHEALTHY: &str = "xlb.dev/proxy-health-check-unhealthy-threshold";
/// Service annotation: passed checks in a row that bring it back.
pub const PROXY_CHECK_HEALTHY: &str = "xlb.dev/proxy-health-check-healthy-threshold";

/// Service annotation: the protocol spoken to the endpoints: `HTTP` (default) or `HTTPS`
/// (HTTP/1.1), `GRPC` or `GRPCS` (HTTP/2 without or with TLS; any HTTP/2 service, not
/// only gRPC).
pub const PROXY_BACKEND_PROTOCOL: &str = "xlb.dev/proxy-backend-protocol";
/// Service annotation: `"true"` (default) or `"false"`: verify the endpoints' certificates.
pub const PROXY_SSL_VERIFY: &str = "xlb.dev/proxy-ssl-verify";
/// Service annotation: SNI and the name endpoint certificates must carry (default: none,
/// the certificate must carry the endpoint's IP address).
pub const PROXY_SSL_NAME: &str = "xlb.dev/proxy-ssl-name";
/// Service annotation: a `kubernetes.io/tls` Secret in the Service's namespace whose
/// `ca.crt` endpoint certificates must chain to (cert-manager writes it).
pub const PROXY_SSL_SECRET: &str = "xlb.dev/proxy-ssl-secret";
/// Service annotation: a `kubernetes.io/tls` Secret in the Service's namespace whose
/// `tls.crt`/`tls.key` are presented to endpoints that ask for a client certificate.
pub const PROXY_SSL_CLIENT_SECRET: &str = "xlb.dev/proxy-ssl-client-secret";

/// A Service port's `appProtocol` that selects HTTP/2 without TLS to its endpoints.
pub const APP_PROTOCOL_H2C: &str = "kubernetes.io/h2c";

/// A Service's proxy policy from its annotations ([`service_policy`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePolicy {
    /// A config Service template (name, port and endpoints left empty; the TLS CA not yet
    /// filled in).
    pub service: pc::Service,
    /// [`PROXY_SSL_SECRET`]: the Secret holding the CA of the endpoints' certificates.
    pub ca_secret: Option<String>,
    /// [`PROXY_SSL_CLIENT_SECRET`]: the Secret holding the client certificate.
    pub client_secret: Option<String>,
}

/// The proxy policy a Service's `xlb.dev/proxy-*` annotations ask for. Other annotations,
/// `xlb.dev/` ones of the L4 agent included, are ignored; an unknown `xlb.dev/proxy-` one
/// is an error.
pub fn service_policy(svc: &Service) -> Result<ServicePolicy, String> {
    let mut out = pc::Service::default();
    let Some(annotations) = svc.metadata.annotations.as_ref() else {
        return Ok(ServicePolicy::default());
    };
    let mut balance = None;
    let mut ca_secret = None;
    let mut client_secret = None;
    let mut tls_detail = None;
    let mut backend_protocol = String::from("HTTP");
    for (k, v) in annotations {
        let bad = |what: &str| format!("annotation {k}: {v:?} is not {what}");
        let number = || v.trim().parse::<u64>().map_err(|_| bad("a number"));
        let count = || v.trim().parse::<u32>().map_err(|_| bad("a count"));
        match k.as_str() {
            PROXY_LOAD_BALANCE => {
                balance = Some(match v.trim() {
                    "round_robin" => pc::Balance::RoundRobin,
                    "least_request" => pc::Balance::LeastRequest,
                    "random" => pc::Balance::Random,
                    "consistent_hash" => pc::Balance::ConsistentHash,
                    _ => {
                        return Err(bad("round_robin, least_request, random or consistent_hash"));
                    }
                });
            }
            PROXY_HASH_BY => {
                if http::HeaderName::from_bytes(v.trim().as_bytes()).is_err() {
                    return Err(bad("a header name"));
                }
                out.hash_header = Some(v.trim().to_owned());
            }
            PROXY_MAX_FAILS => out.health.consecutive_failures = count()?,
            PROXY_CHECK_PATH => out.active_health.path = Some(v.trim().to_owned()),
            PROXY_CHECK_INTERVAL => out.active_health.interval_ms = number()?,
            PROXY_CHECK_TIMEOUT => out.active_health.timeout_ms = number()?,
            PROXY_CHECK_HOST => out.active_health.host = Some(v.trim().to_owned()),
            PROXY_CONNECT_TIMEOUT | PROXY_RESPONSE_TIMEOUT => {
                let ms = number()
                    .ok()
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| bad("a positive number of milliseconds"))?;
                if k == PROXY_CONNECT_TIMEOUT {
                    out.timeouts.connect_ms = Some(ms);
                } else {
                    out.timeouts.response_ms = Some(ms);
                }
            }
            PROXY_CHECK_GRPC_SERVICE => {
                out.active_health.grpc_service = Some(v.trim().to_owned());
            }
            PROXY_CHECK_UNHEALTHY => out.active_health.unhealthy_threshold = count()?,
            PROXY_CHECK_HEALTHY => out.active_health.healthy_threshold = count()?,
            PROXY_BACKEND_PROTOCOL => {
                let named = v.trim().to_ascii_uppercase();
                (out.tls.enabled, out.protocol) = match named.as_str() {
                    "HTTP" => (false, pc::UpstreamProtocol::Http1),
                    "HTTPS" => (true, pc::UpstreamProtocol::Http1),
                    "GRPC" => (false, pc::UpstreamProtocol::H2),
                    "GRPCS" => (true, pc::UpstreamProtocol::H2),
                    _ => return Err(bad("HTTP, HTTPS, GRPC or GRPCS")),
                };
                backend_protocol = named;
            }
            PROXY_SSL_VERIFY => {
                out.tls.verify = match v.trim() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("\"true\" or \"false\"")),
                };
                tls_detail = Some(k.as_str());
            }
            PROXY_SSL_NAME => {
                let name = v.trim();
                if rustls_pki_types::ServerName::try_from(name).is_err() {
                    return Err(bad("a DNS name or an IP address"));
                }
                out.tls.server_name = Some(name.to_owned());
                tls_detail = Some(k.as_str());
            }
            PROXY_SSL_SECRET | PROXY_SSL_CLIENT_SECRET => {
                let n = v.trim();
                let dns_subdomain = !n.is_empty()
                    && n.len() <= 253
                    && n.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)
                    });
                if !dns_subdomain {
                    return Err(bad("the name of a Secret in the Service's namespace"));
                }
                let slot = if k == PROXY_SSL_SECRET {
                    &mut ca_secret
                } else {
                    &mut client_secret
                };
                *slot = Some(n.to_owned());
                tls_detail = Some(k.as_str());
            }
            _ if k.starts_with("xlb.dev/proxy-") => {
                return Err(format!("annotation {k}: unknown xlb.dev/proxy- annotation"));
            }
            _ => {}
        }
    }
    out.balance = match (balance, &out.hash_header) {
        (None, Some(_)) => pc::Balance::ConsistentHash,
        (Some(b), Some(_)) if b != pc::Balance::ConsistentHash => {
            return Err(format!(
                "annotation {PROXY_HASH_BY} needs {PROXY_LOAD_BALANCE} consistent_hash (or none)"
            ));
        }
        (b, _) => b.unwrap_or_default(),
    };
    out.active_health
        .validate("xlb.dev/proxy-health-check-* annotations")
        .map_err(|e| e.to_string())?;
    if out.active_health.grpc_service.is_some() && out.protocol != pc::UpstreamProtocol::H2 {
        return Err(format!(
            "annotation {PROXY_CHECK_GRPC_SERVICE}: gRPC health checks need \
             {PROXY_BACKEND_PROTOCOL}: GRPC or GRPCS"
        ));
    }
    if !out.tls.enabled {
        if let Some(k) = tls_detail {
            return Err(format!(
                "annotation {k}: the endpoints are spoken to without TLS \
                 (set {PROXY_BACKEND_PROTOCOL}: HTTPS or GRPCS)"
            ));
        }
    } else if out.tls.verify && ca_secret.is_none() {
        return Err(format!(
            "annotation {PROXY_BACKEND_PROTOCOL}: {backend_protocol} verifies the endpoints' certificates: \
             set {PROXY_SSL_SECRET} to a Secret whose ca.crt they chain to, \
             or {PROXY_SSL_VERIFY}: \"false\" to encrypt without authenticating them"
        ));
    } else if !out.tls.verify && ca_secret.is_some() {
        return Err(format!(
            "annotation {PROXY_SSL_SECRET}: not used with {PROXY_SSL_VERIFY}: \"false\""
        ));
    }
    Ok(ServicePolicy {
        service: out,
        ca_secret,
        client_secret,
    })
}

/// What this proxy serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressOptions {
    /// `spec.controller` of the IngressClasses served.
    pub controller: String,
}

impl Default for IngressOptions {
    fn default() -> Self {
        IngressOptions {
            controller: CONTROLLER_NAME.into(),
        }
    }
}

/// An Ingress of ours that is not served, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejected {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// What is wrong, naming the field or the missing object.
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Ingress {}/{}: {}",
            self.namespace, self.name, self.reason
        )
    }
}

/// The result of one translation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IngressTranslation {
    /// What the proxy serves: the node settings plus the accepted Ingresses, their Services
    /// and Secrets. Always valid ([`ProxyConfig::validate`]).
    pub config: ProxyConfig,
    /// `(namespace, name)` of the Ingresses in `config`, sorted: their status gets the
    /// proxy's address.
    pub served: Vec<(String, String)>,
    /// Ingresses of ours left out, sorted.
    pub rejected: Vec<Rejected>,
    /// Served Ingresses with paths answering 503 because their Service or Service port does
    /// not exist, sorted (one entry per problem).
    pub degraded: Vec<Rejected>,
    /// Problems that are not an Ingress's (the default certificate), for the log.
    pub warnings: Vec<String>,
}

/// The node-wide part of a proxy config file: listeners, timeouts, limits, TLS settings,
/// access log. Its IngressClasses, Ingresses, Secrets and Services are dropped (they come
/// from the API); the names of what was dropped are returned for a warning.
pub fn node_settings(mut file: ProxyConfig) -> (ProxyConfig, Vec<&'static str>) {
    let mut dropped = Vec::new();
    if !file.ingress_classes.is_empty() {
        dropped.push("ingress_classes");
    }
    if !file.ingresses.is_empty() {
        dropped.push("ingresses");
    }
    if !file.secrets.is_empty() {
        dropped.push("secrets");
    }
    if !file.services.is_empty() {
        dropped.push("services");
    }
    file.ingress_classes.clear();
    file.ingresses.clear();
    file.secrets.clear();
    file.services.clear();
    file.dynamic_certificates = true;
    (file, dropped)
}

/// Reads the node settings from `path` (the embedded default without one), warns about the
/// objects the file holds (they come from the API), and checks them alone.
pub fn load_node_settings(path: Option<&std::path::Path>) -> Result<ProxyConfig, ConfigError> {
    let file = match path {
        Some(p) => ProxyConfig::read(p)?,
        None => ProxyConfig::embedded_default()?,
    };
    let (node, dropped) = node_settings(file);
    if !dropped.is_empty() {
        tracing::warn!(
            ignored = ?dropped,
            "with --kubernetes the config file supplies node settings only; its objects are ignored"
        );
    }
    validate_node(&node)?;
    Ok(node)
}

/// Checks the node settings alone (what can be checked before any object is known).
pub fn validate_node(node: &ProxyConfig) -> Result<(), ConfigError> {
    let (mut bare, _) = node_settings(node.clone());
    // The default Secret comes from the API later; its absence is a warning then.
    bare.tls.default_secret = None;
    bare.validate()
}

type Key = (String, String);

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The objects of one translation, indexed.
struct Index<'a> {
    services: BTreeMap<Key, &'a Service>,
    /// By (namespace, service name).
    slices: BTreeMap<Key, Vec<&'a EndpointSlice>>,
    secrets: BTreeMap<Key, &'a Secret>,
    /// Secrets already checked: the config form, or why it does not load.
    checked: BTreeMap<Key, Result<pc::TlsSecret, String>>,
}

/// Translates the objects; `node` supplies the node-wide settings (see [`node_settings`]).
pub fn translate<'a>(
    node: &ProxyConfig,
    classes: impl IntoIterator<Item = &'a IngressClass>,
    ingresses: impl IntoIterator<Item = &'a Ingress>,
    secrets: impl IntoIterator<Item = &'a Secret>,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    opts: &IngressOptions,
) -> IngressTranslation {
    let (mut base, _) = node_settings(node.clone());
    let mut index = Index {
        services: services
            .into_iter()
            .map(|s| (key(&s.metadata), s))
            .collect(),
        slices: BTreeMap::new(),
        secrets: secrets.into_iter().map(|s| (key(&s.metadata), s)).collect(),
        checked: BTreeMap::new(),
    };
    for slice in slices {
        let (ns, _) = key(&slice.metadata);
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            index
                .slices
                .entry((ns, svc.clone()))
                .or_default()
                .push(slice);
        }
    }

    let mut out = IngressTranslation::default();
    if let Some(d) = base.tls.default_secret.clone() {
        let found = d
            .split_once('/')
            .ok_or_else(|| "is not namespace/name".to_owned())
            .and_then(|(ns, name)| index.secret(ns, name));
        match found {
            Ok(secret) => base.secrets.push(secret),
            Err(reason) => {
                out.warnings.push(format!(
                    "tls.default_secret {d:?}: {reason}; serving without a default certificate"
                ));
                base.tls.default_secret = None;
            }
        }
    }

    let ours = select(classes, ingresses, &opts.controller);
    let mut candidates = Vec::new();
    for ing in ours {
        let (namespace, name) = key(&ing.metadata);
        let reject = |reason: String| Rejected {
            namespace: namespace.clone(),
            name: name.clone(),
            reason,
        };
        match index.ingress(ing).and_then(|c| check_alone(&base, c)) {
            Ok(c) => candidates.push(c),
            Err(reason) => out.rejected.push(reject(reason)),
        }
    }

    // All together; conflicts between Ingresses (two default backends) show only here, and
    // then the Ingresses are added one at a time so the later one of a conflict is refused.
    let mut all = base.clone();
    for c in &candidates {
        c.add_to(&mut all);
    }
    let config = if all.validate().is_ok() {
        all
    } else {
        let mut acc = base.clone();
        for c in &candidates {
            let mut next = acc.clone();
            c.add_to(&mut next);
            match next.validate() {
                Ok(()) => acc = next,
                Err(e) => out.rejected.push(Rejected {
                    namespace: c.ingress.namespace.clone(),
                    name: c.ingress.name.clone(),
                    reason: describe(&e),
                }),
            }
        }
        acc
    };
    out.served = config
        .ingresses
        .iter()
        .map(|i| (i.namespace.clone(), i.name.clone()))
        .collect();
    out.served.sort();
    for c in &candidates {
        let (ns, name) = (&c.ingress.namespace, &c.ingress.name);
        if out.served.iter().any(|(n, m)| n == ns && m == name) {
            out.degraded.extend(c.missing.iter().map(|reason| Rejected {
                namespace: ns.clone(),
                name: name.clone(),
                reason: reason.clone(),
            }));
        }
    }
    out.degraded.sort();
    out.rejected.sort();
    out.config = config;
    out
}

/// A backend without endpoints for a Service or port that does not exist: the number asked
/// for, or for a port asked by name the highest number the Service does not use (so it
/// cannot alias one of its real ports).
fn unresolved(
    namespace: &str,
    service: &str,
    number: Option<u16>,
    taken: &[i32],
    services: &mut BTreeMap<(String, u16), pc::Service>,
) -> pc::Backend {
    let port = number.unwrap_or_else(|| {
        (1..=u16::MAX)
            .rev()
            .find(|p| !taken.contains(&i32::from(*p)))
            .unwrap_or(u16::MAX)
    });
    services
        .entry((service.to_owned(), port))
        .or_insert_with(|| pc::Service {
            name: service.to_owned(),
            namespace: namespace.to_owned(),
            port,
            endpoints: Vec::new(),
            ..pc::Service::default()
        });
    pc::Backend {
        service: service.to_owned(),
        port,
    }
}

/// Our Ingresses, oldest first.
fn select<'a>(
    classes: impl IntoIterator<Item = &'a IngressClass>,
    ingresses: impl IntoIterator<Item = &'a Ingress>,
    controller: &str,
) -> Vec<&'a Ingress> {
    let mut by_name: BTreeMap<&str, bool> = BTreeMap::new();
    let mut defaults = Vec::new();
    for class in classes {
        let Some(name) = class.metadata.name.as_deref() else {
            continue;
        };
        let mine = class
            .spec
            .as_ref()
            .and_then(|s| s.controller.as_deref())
            .is_some_and(|c| c == controller);
        by_name.insert(name, mine);
        let is_default = class
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
            .is_some_and(|v| v == "true");
        if is_default {
            defaults.push(mine);
        }
    }
    let default_is_ours = defaults == [true];
    let mut ours: Vec<&Ingress> = ingresses
        .into_iter()
        .filter(|ing| match class_of(ing) {
            Some(class) => by_name.get(class).copied().unwrap_or(false),
            None => default_is_ours,
        })
        .collect();
    ours.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, key(&a.metadata))
            .cmp(&(&b.metadata.creation_timestamp, key(&b.metadata)))
    });
    ours
}

/// `spec.ingressClassName`, else the legacy annotation.
fn class_of(ing: &Ingress) -> Option<&str> {
    ing.spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .or_else(|| {
            ing.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION))
                .map(String::as_str)
        })
}

/// One Ingress in config form, with the Services and Secrets it needs.
struct Candidate {
    ingress: pc::Ingress,
    services: Vec<pc::Service>,
    secrets: Vec<pc::TlsSecret>,
    /// Backends that answer 503 because their Service or port is missing.
    missing: Vec<String>,
}

impl Candidate {
    fn add_to(&self, cfg: &mut ProxyConfig) {
        cfg.ingresses.push(self.ingress.clone());
        for s in &self.services {
            if !cfg
                .services
                .iter()
                .any(|o| o.namespace == s.namespace && o.name == s.name && o.port == s.port)
            {
                cfg.services.push(s.clone());
            }
        }
        for s in &self.secrets {
            if !cfg
                .secrets
                .iter()
                .any(|o| o.namespace == s.namespace && o.name == s.name)
            {
                cfg.secrets.push(s.clone());
            }
        }
    }
}

/// The Ingress validated on its own (with the node settings and the default certificate).
fn check_alone(base: &ProxyConfig, c: Candidate) -> Result<Candidate, String> {
    let mut alone = base.clone();
    c.add_to(&mut alone);
    alone.validate().map_err(|e| describe(&e))?;
    Ok(c)
}

/// A validation error without the model's `ingresses[N].` prefix (the Event names the
/// Ingress already; the rest of the path is the field inside it).
fn describe(e: &ConfigError) -> String {
    match e {
        ConfigError::Invalid { field, reason } => {
            let inner = field
                .strip_prefix("ingresses[")
                .and_then(|rest| rest.split_once(']'))
                .map(|(_, tail)| tail.trim_start_matches('.'));
            match inner {
                Some("") => reason.clone(),
                Some(tail) => format!("{tail}: {reason}"),
                None => format!("{field}: {reason}"),
            }
        }
        other => other.to_string(),
    }
}

impl Index<'_> {
    fn ingress(&mut self, ing: &Ingress) -> Result<Candidate, String> {
        let (namespace, name) = key(&ing.metadata);
        let default_spec = IngressSpec::default();
        let spec = ing.spec.as_ref().unwrap_or(&default_spec);
        let mut services = BTreeMap::new();
        let mut missing = Vec::new();
        let mut c = pc::Ingress {
            name,
            namespace: namespace.clone(),
            annotations: ing.metadata.annotations.clone().unwrap_or_default(),
            class_name: class_of(ing).map(str::to_owned),
            ..pc::Ingress::default()
        };
        let mut secrets = Vec::new();
        if let Some(b) = &spec.default_backend {
            c.default_backend = Some(
                self.backend(&namespace, b, &mut services, &mut secrets, &mut |m| {
                    missing.push(format!("defaultBackend: {m}"))
                })
                .map_err(|e| format!("defaultBackend: {e}"))?,
            );
        }
        for (i, tls) in spec.tls.iter().flatten().enumerate() {
            // Without secretName the hosts are served with the default certificate (the API
            // leaves it optional for exactly that; ingress-nginx does the same).
            if tls.secret_name.is_none() {
                continue;
            }
            c.tls.push(
                self.tls(&namespace, tls, &mut secrets)
                    .map_err(|e| format!("tls[{i}]: {e}"))?,
            );
        }
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            // A rule without `http` routes nothing (it may exist for TLS alone).
            let Some(http) = &rule.http else { continue };
            let mut paths = Vec::new();
            for (j, p) in http.paths.iter().enumerate() {
                let at = || format!("rules[{i}].http.paths[{j}]");
                let path_type = match p.path_type.as_str() {
                    "Exact" => pc::PathType::Exact,
                    "Prefix" => pc::PathType::Prefix,
                    "ImplementationSpecific" => pc::PathType::ImplementationSpecific,
                    other => return Err(format!("{}: unknown pathType {other:?}", at())),
                };
                let backend = self
                    .backend(
                        &namespace,
                        &p.backend,
                        &mut services,
                        &mut secrets,
                        &mut |m| missing.push(format!("{}.backend: {m}", at())),
                    )
                    .map_err(|e| format!("{}.backend: {e}", at()))?;
                paths.push(pc::HttpPath {
                    // Only ImplementationSpecific may leave the path out: it then means all.
                    path: p.path.clone().unwrap_or_else(|| "/".into()),
                    path_type,
                    backend,
                });
            }
            c.rules.push(pc::IngressRule {
                host: rule.host.clone(),
                paths,
            });
        }
        Ok(Candidate {
            ingress: c,
            services: services.into_values().collect(),
            secrets,
            missing,
        })
    }

    fn tls(
        &mut self,
        namespace: &str,
        tls: &IngressTLS,
        secrets: &mut Vec<pc::TlsSecret>,
    ) -> Result<pc::IngressTls, String> {
        let name = tls.secret_name.clone().ok_or("no secretName")?;
        let secret = self.secret(namespace, &name)?;
        if !secrets.iter().any(|s| s.name == name) {
            secrets.push(secret);
        }
        Ok(pc::IngressTls {
            hosts: tls.hosts.clone().unwrap_or_default(),
            secret_name: name,
        })
    }

    /// The Secret in config form, checked to load (each Secret once per translation).
    fn secret(&mut self, namespace: &str, name: &str) -> Result<pc::TlsSecret, String> {
        let k = (namespace.to_owned(), name.to_owned());
        if let Some(done) = self.checked.get(&k) {
            return done.clone();
        }
        let result = load_secret(self.secrets.get(&k).copied(), namespace, name);
        self.checked.insert(k, result.clone());
        result
    }

    /// The config backend of an Ingress backend. A missing Service or Service port is not
    /// an error: the backend then has no endpoints (503) and `missing` hears why.
    fn backend(
        &self,
        namespace: &str,
        backend: &IngressBackend,
        services: &mut BTreeMap<(String, u16), pc::Service>,
        secrets: &mut Vec<pc::TlsSecret>,
        missing: &mut dyn FnMut(String),
    ) -> Result<pc::Backend, String> {
        if backend.resource.is_some() {
            return Err("resource backends are not supported".into());
        }
        let sb = backend.service.as_ref().ok_or("no service")?;
        let id = format!("{namespace}/{}", sb.name);
        let wanted = sb.port.as_ref().ok_or("no service port")?;
        let asked_number = match (&wanted.number, &wanted.name) {
            (Some(n), _) => Some(
                u16::try_from(*n)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("service port {n} out of range"))?,
            ),
            (None, Some(_)) => None,
            (None, None) => return Err("service port has neither number nor name".into()),
        };
        let Some(svc) = self.services.get(&(namespace.to_owned(), sb.name.clone())) else {
            missing(format!("service {id} not found; its paths answer 503"));
            return Ok(unresolved(namespace, &sb.name, asked_number, &[], services));
        };
        let spec = svc
            .spec
            .as_ref()
            .ok_or_else(|| format!("service {id} has no spec"))?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return Err(format!(
                "service {id}: ExternalName services are not supported"
            ));
        }
        let found = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .find(|p| match (&wanted.number, &wanted.name) {
                (Some(n), _) => p.port == *n,
                (None, Some(name)) => p.name.as_deref() == Some(name.as_str()),
                (None, None) => false,
            });
        let Some(port) = found else {
            missing(match (&wanted.number, &wanted.name) {
                (Some(n), _) => format!("service {id} has no TCP port {n}; its paths answer 503"),
                (_, name) => format!(
                    "service {id} has no TCP port named {:?}; its paths answer 503",
                    name.as_deref().unwrap_or("")
                ),
            });
            let taken: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
            return Ok(unresolved(
                namespace,
                &sb.name,
                asked_number,
                &taken,
                services,
            ));
        };
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("service {id}: port {} out of range", port.port))?;
        let port_name = port.name.as_deref().unwrap_or("");
        let ServicePolicy {
            service: mut policy,
            ca_secret,
            client_secret,
        } = service_policy(svc).map_err(|e| format!("service {id}: {e}"))?;
        // The standard application protocol `kubernetes.io/h2c` (KEP-3726) on the port asks
        // for cleartext HTTP/2 unless the annotation decides the protocol.
        let annotated = svc
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(PROXY_BACKEND_PROTOCOL));
        if !annotated && port.app_protocol.as_deref() == Some(APP_PROTOCOL_H2C) {
            policy.protocol = pc::UpstreamProtocol::H2;
        }
        if let Some(name) = client_secret {
            let key = (namespace.to_owned(), name.clone());
            let secret = load_secret(self.secrets.get(&key).copied(), namespace, &name)
                .map_err(|e| format!("service {id}: annotation {PROXY_SSL_CLIENT_SECRET}: {e}"))?;
            policy.tls.client_secret = Some(format!("{namespace}/{name}"));
            if !secrets.iter().any(|s| s.name == name) {
                secrets.push(secret);
            }
        }
        if let Some(secret) = ca_secret {
            let key = (namespace.to_owned(), secret.clone());
            policy.tls.ca_pem = Some(
                load_ca(self.secrets.get(&key).copied(), namespace, &secret)
                    .map_err(|e| format!("service {id}: annotation {PROXY_SSL_SECRET}: {e}"))?,
            );
        }
        services
            .entry((sb.name.clone(), number))
            .or_insert_with(|| pc::Service {
                name: sb.name.clone(),
                namespace: namespace.to_owned(),
                port: number,
                endpoints: self.endpoints(namespace, &sb.name, port_name),
                ..policy
            });
        Ok(pc::Backend {
            service: sb.name.clone(),
            port: number,
        })
    }

    /// Ready endpoints of a Service port, sorted and unique. Unusable addresses (unparseable,
    /// unspecified, FQDN slices) are left out: the rest of the Service keeps working.
    fn endpoints(&self, namespace: &str, service: &str, port_name: &str) -> Vec<SocketAddr> {
        let mut out = BTreeSet::new();
        let slices = self.slices.get(&(namespace.to_owned(), service.to_owned()));
        for slice in slices.into_iter().flatten() {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .find(|p| p.name.as_deref().unwrap_or("") == port_name)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
            else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                for a in &ep.addresses {
                    if let Ok(ip) = a.parse::<IpAddr>()
                        && !ip.is_unspecified()
                    {
                        out.insert(SocketAddr::new(ip, port));
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

/// The `ca.crt` of a `kubernetes.io/tls` Secret, loaded once to prove it works.
fn load_ca(secret: Option<&Secret>, namespace: &str, name: &str) -> Result<String, String> {
    let id = format!("{namespace}/{name}");
    let secret = secret.ok_or_else(|| {
        format!("secret {id} not found (only Secrets of type {TLS_SECRET_TYPE} are read)")
    })?;
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .ok_or_else(|| format!("secret {id} has no ca.crt"))?;
    let pem = String::from_utf8(pem.0.clone())
        .map_err(|_| format!("secret {id}: ca.crt is not PEM text"))?;
    let probe = pc::UpstreamTls {
        enabled: true,
        ca_pem: Some(pem.clone()),
        ..pc::UpstreamTls::default()
    };
    TlsOrigination::from_config(&probe, None, &id).map_err(|e| e.to_string())?;
    Ok(pem)
}

/// A `kubernetes.io/tls` Secret as the config's inline PEM, loaded once to prove it works.
fn load_secret(
    secret: Option<&Secret>,
    namespace: &str,
    name: &str,
) -> Result<pc::TlsSecret, String> {
    let id = format!("{namespace}/{name}");
    let secret = secret.ok_or_else(|| format!("secret {id} not found"))?;
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    if type_ != TLS_SECRET_TYPE {
        return Err(format!(
            "secret {id} is of type {type_:?}, not {TLS_SECRET_TYPE:?}"
        ));
    }
    let field = |k: &str| -> Result<String, String> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .ok_or_else(|| format!("secret {id} has no {k}"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| format!("secret {id}: {k} is not PEM text"))
    };
    let s = pc::TlsSecret {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        cert_pem: Some(field("tls.crt")?),
        key_pem: Some(field("tls.key")?),
        ..pc::TlsSecret::default()
    };
    // The file path's loader, through a config whose only certificate is this one.
    let probe = ProxyConfig {
        tls: pc::TlsSettings {
            default_secret: Some(id),
            ..pc::TlsSettings::default()
        },
        secrets: vec![s.clone()],
        ..ProxyConfig::default()
    };
    CertStore::from_config(&probe).map_err(|e| e.to_string())?;
    Ok(s)
}

#[cfg(test)]
#[path = "ingress_tests.rs"]
mod tests;
