//! `xlb proxy --kubernetes` (the real binary) against a real kube-apiserver
//! (tests/src/kube.rs), with real HTTP upstreams on loopback and real TLS: an Ingress routes
//! HTTP and HTTPS (SNI); changing the Ingress, rotating its Secret and scaling its
//! EndpointSlices while a client drives requests loses none; an invalid Ingress among good
//! ones is rejected with an Event naming it while the others keep serving; served Ingresses
//! get the proxy's address in their status; a path whose Service is missing answers 503 while
//! the rest of its Ingress serves; an API-server outage leaves the last rules serving; a
//! Service annotated for TLS to its endpoints follows the CA in its Secret.
//!
//! Every test has its own namespace, IngressClass and controller name, so tests sharing one
//! API server never see each other's objects.

#[path = "proxy_support.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ListParams, Patch, PatchParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::version::{TLS12, TLS13};
use serde_json::{Value, json};
use support::{Pki, upstream};
use tokio::net::TcpStream;
use xlb_tests::kube::proxy::{ProxyProcess, namespace};
use xlb_tests::kube::source::{delete, put};
use xlb_tests::kube::{KubeOptions, KubeServer, runtime};

const WAIT: Duration = Duration::from_secs(20);

fn obj<K: k8s_openapi::serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("object json")
}

fn ingress_class(name: &str, controller: &str) -> IngressClass {
    obj(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": name}, "spec": {"controller": controller},
    }))
}

/// Service `web`: port 80 named `http`, targetPort `http` (resolved through the slices).
fn web_service(ns: &str) -> Service {
    obj(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]},
    }))
}

/// A slice of `web` whose `http` port is `upstream`'s port, with one ready endpoint.
fn web_slice(ns: &str, name: &str, upstream: SocketAddr) -> EndpointSlice {
    obj(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": upstream.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": [upstream.ip().to_string()], "conditions": {"ready": true}}],
    }))
}

fn tls_secret(ns: &str, name: &str, (crt, key): &(String, String)) -> Secret {
    use k8s_openapi::ByteString;
    Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_owned(), ByteString(crt.as_bytes().to_vec())),
                ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// A rule for `host` with one Prefix `/` path to `web` (port given as `{"name": ..}` or
/// `{"number": ..}`).
fn rule(host: &str, port: Value) -> Value {
    json!({"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": "web", "port": port}}}]}})
}

fn ingress(ns: &str, name: &str, class: &str, spec: Value, annotations: Value) -> Ingress {
    let mut spec = spec;
    spec["ingressClassName"] = json!(class);
    obj(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"namespace": ns, "name": name, "annotations": annotations},
        "spec": spec,
    }))
}

/// A test's own namespace, IngressClass (of a controller of its own) and Service `web`
/// backed by one upstream, with the APIs the test uses.
struct Scene {
    ns: &'static str,
    class: &'static str,
    controller: &'static str,
    slices: Api<EndpointSlice>,
    secrets: Api<Secret>,
    ingresses: Api<Ingress>,
    /// The upstream behind `web`'s first EndpointSlice (`web-1`).
    v1: support::Upstream,
}

impl Scene {
    async fn new(
        client: &kube::Client,
        ns: &'static str,
        class: &'static str,
        controller: &'static str,
    ) -> Scene {
        namespace(client, ns).await;
        let classes: Api<IngressClass> = Api::all(client.clone());
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        let scene = Scene {
            ns,
            class,
            controller,
            slices: Api::namespaced(client.clone(), ns),
            secrets: Api::namespaced(client.clone(), ns),
            ingresses: Api::namespaced(client.clone(), ns),
            v1: upstream("v1").await,
        };
        put(&classes, &ingress_class(class, controller)).await;
        put(&services, &web_service(ns)).await;
        put(&scene.slices, &web_slice(ns, "web-1", scene.v1.addr)).await;
        scene
    }

    /// Starts `xlb proxy --kubernetes` for this scene's controller as `identity`, with
    /// `extra` arguments.
    fn proxy(&self, server: &KubeServer, identity: &str, extra: &[&str]) -> ProxyProcess {
        let mut args = vec![
            "--kube-controller",
            self.controller,
            "--kube-identity",
            identity,
        ];
        args.extend_from_slice(extra);
        tokio::task::block_in_place(|| ProxyProcess::start(server, &args))
    }
}

/// One GET of `path` over a fresh plain connection; errors are returned, not panicked on.
async fn try_get_path(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let io = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    request_path(io, host, path).await
}

/// One GET over a fresh plain connection; errors are returned, not panicked on.
async fn try_get(addr: SocketAddr, host: &str) -> Result<(StatusCode, String), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    request(tcp, host).await
}

/// One GET over a fresh TLS connection with SNI `host`; also the server's leaf certificate.
async fn try_get_tls(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    host: &str,
) -> Result<(StatusCode, String, Vec<u8>), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("server name");
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or("no server certificate")?;
    let (status, body) = request(tls, host).await?;
    Ok((status, body, cert))
}

async fn request<IO>(io: IO, host: &str) -> Result<(StatusCode, String), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    request_path(io, host, "/").await
}

async fn request_path<IO>(io: IO, host: &str, path: &str) -> Result<(StatusCode, String), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let work = async {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "no response within 5 s".to_owned())?
}

/// A client trusting `pki`'s CA that never resumes a session: a resumed handshake carries
/// no certificate, and the test must see which certificate each new handshake gets.
fn fresh_handshakes(pki: &Pki) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("trust CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13, &TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn backend(body: &str) -> Option<&str> {
    body.lines().find_map(|l| l.strip_prefix("backend="))
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("certificate PEM")
        .to_vec()
}

/// Polls `check` every 50 ms (async) until it returns `Some` or `timeout` passes.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> F,
) -> T {
    try_eventually(timeout, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// [`eventually`] returning `None` on timeout, for callers that add context.
async fn try_eventually<T, F: Future<Output = Option<T>>>(
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `status.loadBalancer.ingress` entries of an Ingress as `ip`/`hostname` strings.
async fn status_of(api: &Api<Ingress>, name: &str) -> Vec<String> {
    api.get(name)
        .await
        .expect("get ingress")
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.or(i.hostname))
        .collect()
}

/// [`eventually`] for conditions on what the driver saw; the panic shows it.
async fn driven<F: Future<Output = Option<()>>>(
    seen: &Mutex<Seen>,
    what: &str,
    check: impl FnMut() -> F,
) {
    if try_eventually(WAIT, check).await.is_none() {
        let s = seen.lock().expect("seen");
        let tail = &s.backends[s.backends.len().saturating_sub(10)..];
        panic!(
            "timed out after {WAIT:?} waiting for {what}; the client saw {} ok, failures {:?}, \
             last backends {tail:?}",
            s.ok, s.failures
        );
    }
}

/// What the continuous client saw.
#[derive(Default)]
struct Seen {
    ok: usize,
    failures: Vec<String>,
    /// Backends that answered, HTTP and HTTPS, in order. Both schemes route to the same
    /// round-robin upstream and alternate, so one scheme alone sees every other pick only:
    /// with two endpoints, always the same one.
    backends: Vec<String>,
    /// The leaf certificate of the latest HTTPS response.
    cert: Vec<u8>,
}

/// Drives HTTP (app host) and HTTPS (secure host, a new handshake each time) requests until
/// `stop`; every response must be a 200 from an upstream.
fn drive(
    http: SocketAddr,
    https: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        // Bounded: the test stops it, and it can never outlive three minutes (generous so
        // a loaded CI machine does not stop the client before the test's last check).
        let end = Instant::now() + Duration::from_secs(180);
        while !stop.load(Ordering::SeqCst) && Instant::now() < end {
            let plain = try_get(http, "app.example.test").await;
            let secure = try_get_tls(&connector, https, "secure.example.test").await;
            record(&mut s.lock().expect("seen lock"), plain, secure);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (seen, task)
}

type Plain = Result<(StatusCode, String), String>;
type Secure = Result<(StatusCode, String, Vec<u8>), String>;

fn record(seen: &mut Seen, plain: Plain, secure: Secure) {
    match plain {
        Ok((StatusCode::OK, body)) if backend(&body).is_some() => {
            seen.ok += 1;
            let b = backend(&body).unwrap_or_default().to_owned();
            seen.backends.push(b);
        }
        other => seen.failures.push(format!("http: {other:?}")),
    }
    match secure {
        Ok((StatusCode::OK, body, cert)) if backend(&body).is_some() => {
            seen.ok += 1;
            seen.cert = cert;
            seen.backends
                .push(backend(&body).unwrap_or_default().to_owned());
        }
        other => seen
            .failures
            .push(format!("https: {:?}", other.map(|(s, b, _)| (s, b)))),
    }
}

#[test]
fn kube_proxy_routes_and_swaps_ingress_secret_and_endpoints_without_failed_requests() {
    let server = KubeServer::shared();
    // Built (or found up to date) before the clock starts: cargo may wait on other builds.
    xlb_tests::agent_support::xlb_binary();
    let started = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "kube_proxy: {:>6.2} s {what}",
            started.elapsed().as_secs_f64()
        );
    };
    runtime().block_on(async {
        let client = server.client().await;
        let scene = Scene::new(&client, "kproxy-live", "xlb-live", "test.xlb.dev/live").await;
        let (ns, class) = (scene.ns, scene.class);
        let (slices, secrets) = (&scene.slices, &scene.secrets);
        // References, so the polling closures below can copy them into their futures.
        let ingresses = &scene.ingresses;

        let v2 = upstream("v2").await;
        let pki = Pki::new();
        let first_cert = pki.leaf(&["secure.example.test"]);
        put(secrets, &tls_secret(ns, "web-tls", &first_cert)).await;
        let spec = |extra_rules: Vec<Value>| {
            let mut rules = vec![
                rule("app.example.test", json!({"name": "http"})),
                rule("secure.example.test", json!({"number": 80})),
            ];
            rules.extend(extra_rules);
            json!({"tls": [{"hosts": ["secure.example.test"], "secretName": "web-tls"}],
                   "rules": rules})
        };
        put(ingresses, &ingress(ns, "web", class, spec(vec![]), json!({}))).await;

        phase("objects created");
        let proxy = scene.proxy(
            server,
            "test-live",
            &["--kube-namespace", ns, "--kube-publish-address", "192.0.2.80"],
        );

        phase("proxy serving");
        // HTTP by Host, HTTPS by SNI with the Secret's certificate; port by name and number.
        let (status, body) = try_get(proxy.http, "app.example.test").await.expect("http");
        assert_eq!((status, backend(&body)), (StatusCode::OK, Some("v1")), "{body}");
        let connector = fresh_handshakes(&pki);
        let (status, body, cert) = try_get_tls(&connector, proxy.https, "secure.example.test")
            .await
            .expect("https");
        assert_eq!((status, backend(&body)), (StatusCode::OK, Some("v1")), "{body}");
        assert_eq!(cert, der(&first_cert.0), "the Secret's certificate is served");
        // Unknown hosts are not routed.
        let (status, _) = try_get(proxy.http, "new.example.test").await.expect("http");
        assert_eq!(status, StatusCode::NOT_FOUND);

        // Status gets the publish address.
        eventually("Ingress status with the proxy's address", WAIT, || async move {
            (status_of(ingresses, "web").await == ["192.0.2.80"]).then_some(())
        })
        .await;

        phase("status written");
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, driver) = drive(proxy.http, proxy.https, connector.clone(), stop.clone());
        let (seen, http) = (&seen, proxy.http);

        // 1. A new host on the Ingress.
        put(
            ingresses,
            &ingress(ns, "web", class, spec(vec![rule("new.example.test", json!({"name": "http"}))]), json!({})),
        )
        .await;
        eventually("the new host to be routed", WAIT, || async move {
            match try_get(http, "new.example.test").await {
                Ok((StatusCode::OK, body)) => (backend(&body) == Some("v1")).then_some(()),
                _ => None,
            }
        })
        .await;

        phase("new host routed");
        // 2. Secret rotation: new handshakes get the new certificate.
        let second_cert = pki.leaf(&["secure.example.test"]);
        put(secrets, &tls_secret(ns, "web-tls", &second_cert)).await;
        let want = &der(&second_cert.0);
        driven(seen, "the rotated certificate to be served", || async move {
            (seen.lock().expect("seen").cert == *want).then_some(())
        })
        .await;

        phase("certificate rotated");
        // 3. Scale out to v2, then in (v1's slice deleted).
        put(slices, &web_slice(ns, "web-2", v2.addr)).await;
        driven(seen, "v2 to receive requests", || async move {
            seen.lock().expect("seen").backends.iter().any(|b| b == "v2").then_some(())
        })
        .await;
        phase("v2 serving");
        delete(slices, "web-1").await;
        let mark = seen.lock().expect("seen").backends.len();
        driven(seen, "only v2 to receive requests", || async move {
            let s = seen.lock().expect("seen");
            let tail = &s.backends[mark..];
            // 20 in a row after the deletion: round robin over v1+v2 would alternate.
            (tail.len() >= 20 && tail[tail.len() - 20..].iter().all(|b| b == "v2")).then_some(())
        })
        .await;

        phase("scaled in");
        stop.store(true, Ordering::SeqCst);
        driver.await.expect("driver task");
        let seen = seen.lock().expect("seen");
        assert!(seen.failures.is_empty(), "failed requests during the changes: {:?}", seen.failures);
        assert!(seen.ok >= 50, "only {} requests were driven", seen.ok);
        eprintln!(
            "kube_proxy: {} requests through an Ingress change, a Secret rotation and a scale out/in, 0 failed",
            seen.ok
        );
        drop(proxy);
    });
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn kube_proxy_rejects_an_invalid_ingress_with_an_event_and_serves_the_others() {
    let server = KubeServer::shared();
    runtime().block_on(async {
        let client = server.client().await;
        let scene = Scene::new(&client, "kproxy-bad", "xlb-bad", "test.xlb.dev/bad").await;
        let (ns, class) = (scene.ns, scene.class);
        let secrets = &scene.secrets;
        let events: Api<Event> = Api::namespaced(client.clone(), ns);
        let ingresses = &scene.ingresses;
        let plain = |host: &str| json!({"rules": [rule(host, json!({"name": "http"}))]});
        put(
            ingresses,
            &ingress(ns, "good", class, plain("good.example.test"), json!({})),
        )
        .await;
        let mut no_secret = plain("nosecret.example.test");
        no_secret["tls"] =
            json!([{"hosts": ["nosecret.example.test"], "secretName": "missing-tls"}]);
        put(
            ingresses,
            &ingress(ns, "no-secret", class, no_secret, json!({})),
        )
        .await;
        put(
            ingresses,
            &ingress(
                ns,
                "bad-annotation",
                class,
                plain("badann.example.test"),
                json!({"xlb.dev/max-body-bytes": "lots"}),
            ),
        )
        .await;
        // One path names a Service that does not exist: that path answers 503, the other
        // path of the same Ingress serves.
        put(
            ingresses,
            &ingress(
                ns,
                "partial",
                class,
                json!({"rules": [{"host": "partial.example.test", "http": {"paths": [
                    {"path": "/ok", "pathType": "Prefix",
                     "backend": {"service": {"name": "web", "port": {"name": "http"}}}},
                    {"path": "/gone", "pathType": "Prefix",
                     "backend": {"service": {"name": "gone", "port": {"number": 80}}}},
                ]}}]}),
                json!({}),
            ),
        )
        .await;
        // Another controller's Ingress: neither served nor reported.
        put(
            ingresses,
            &ingress(
                ns,
                "foreign",
                "someone-else",
                plain("foreign.example.test"),
                json!({}),
            ),
        )
        .await;

        // The addresses to publish come from a Service's status, as from the LoadBalancer
        // Service in front of the proxies (ClusterIP here, so no L4 agent claims it).
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        put(
            &services,
            &obj(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": ns, "name": "proxy-lb"},
                "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            })),
        )
        .await;
        let set_lb_status = |entry: Value| {
            let services = services.clone();
            async move {
                services
                    .patch_status(
                        "proxy-lb",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [entry]}}})),
                    )
                    .await
                    .expect("set the Service's status");
            }
        };
        set_lb_status(json!({"hostname": "proxy.example.test"})).await;
        let publish = format!("{ns}/proxy-lb");

        let mut proxy = scene.proxy(
            server,
            "test-bad",
            &["--kube-namespace", ns, "--kube-publish-service", &publish],
        );

        let (status, body) = try_get(proxy.http, "good.example.test")
            .await
            .expect("http");
        assert_eq!(
            (status, backend(&body)),
            (StatusCode::OK, Some("v1")),
            "{body}"
        );
        for host in [
            "nosecret.example.test",
            "badann.example.test",
            "foreign.example.test",
        ] {
            let (status, _) = try_get(proxy.http, host).await.expect("http");
            assert_eq!(status, StatusCode::NOT_FOUND, "{host} must not be routed");
        }

        // One Warning Event per rejected Ingress, naming it, with the reason.
        let event_for = |name: &'static str| {
            let events = events.clone();
            async move {
                events
                    .list(&ListParams::default())
                    .await
                    .expect("list events")
                    .items
                    .into_iter()
                    .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            }
        };
        let e = eventually("an Event for no-secret", WAIT, || event_for("no-secret")).await;
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("Rejected"));
        let regarding = e.regarding.expect("regarding");
        assert_eq!(regarding.kind.as_deref(), Some("Ingress"));
        assert_eq!(regarding.namespace.as_deref(), Some(ns));
        let note = e.note.unwrap_or_default();
        assert!(
            note.contains("secret kproxy-bad/missing-tls not found"),
            "{note}"
        );
        let e = eventually("an Event for bad-annotation", WAIT, || {
            event_for("bad-annotation")
        })
        .await;
        let note = e.note.unwrap_or_default();
        assert!(note.contains("xlb.dev/max-body-bytes"), "{note}");
        assert!(
            event_for("good").await.is_none(),
            "no Event for the good Ingress"
        );
        let e = eventually("an Event for partial", WAIT, || event_for("partial")).await;
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("BackendMissing"));
        let note = e.note.unwrap_or_default();
        assert!(note.contains("service kproxy-bad/gone not found"), "{note}");
        let (status, body) = try_get_path(proxy.http, "partial.example.test", "/ok")
            .await
            .expect("http");
        assert_eq!(
            (status, backend(&body)),
            (StatusCode::OK, Some("v1")),
            "{body}"
        );
        let (status, _) = try_get_path(proxy.http, "partial.example.test", "/gone")
            .await
            .expect("http");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            event_for("foreign").await.is_none(),
            "no Event for another controller's Ingress"
        );
        let log = proxy.log_text();
        assert!(
            log.contains("kproxy-bad/no-secret") && log.contains("rejected an Ingress"),
            "{log}"
        );

        // Status: the served Ingress gets the hostname; rejected and foreign ones nothing.
        eventually("good's status", WAIT, || async move {
            (status_of(ingresses, "good").await == ["proxy.example.test"]).then_some(())
        })
        .await;
        assert!(status_of(ingresses, "no-secret").await.is_empty());
        assert!(status_of(ingresses, "foreign").await.is_empty());

        // The missing Secret appears: the Ingress is served, live.
        let http = proxy.http;
        let pki = Pki::new();
        put(
            secrets,
            &tls_secret(ns, "missing-tls", &pki.leaf(&["nosecret.example.test"])),
        )
        .await;
        eventually(
            "no-secret to be served once its Secret exists",
            WAIT,
            || async move {
                matches!(
                    try_get(http, "nosecret.example.test").await,
                    Ok((StatusCode::OK, _))
                )
                .then_some(())
            },
        )
        .await;
        let connector = fresh_handshakes(&pki);
        let (status, _, _) = try_get_tls(&connector, proxy.https, "nosecret.example.test")
            .await
            .expect("https with the new Secret");
        assert_eq!(status, StatusCode::OK);
        eventually("no-secret's status", WAIT, || async move {
            (status_of(ingresses, "no-secret").await == ["proxy.example.test"]).then_some(())
        })
        .await;
        // The other bad one is still refused and the good one still served.
        let (status, _) = try_get(proxy.http, "badann.example.test")
            .await
            .expect("http");
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = try_get(proxy.http, "good.example.test")
            .await
            .expect("http");
        assert_eq!(status, StatusCode::OK);

        // The published Service's address changes: served Ingresses follow.
        set_lb_status(json!({"ip": "192.0.2.99"})).await;
        eventually("good's status to follow the Service", WAIT, || async move {
            (status_of(ingresses, "good").await == ["192.0.2.99"]).then_some(())
        })
        .await;
        // An Ingress handed to another controller is no longer ours: its status is cleared.
        put(
            ingresses,
            &ingress(
                ns,
                "good",
                "someone-else",
                plain("good.example.test"),
                json!({}),
            ),
        )
        .await;
        eventually("good's status cleared", WAIT, || async move {
            status_of(ingresses, "good").await.is_empty().then_some(())
        })
        .await;
        assert_eq!(status_of(ingresses, "no-secret").await, ["192.0.2.99"]);

        // The node settings file is re-read live: a lower body limit answers 413; a file
        // that does not validate is refused and the last good settings keep serving.
        let http = proxy.http;
        let post = move |len: usize| async move {
            let req = format!(
                "POST / HTTP/1.1\r\nHost: nosecret.example.test\r\nContent-Length: {len}\r\n\
                     Connection: close\r\n\r\n{}",
                "x".repeat(len)
            );
            support::raw(http, req.as_bytes()).await
        };
        assert!(post(100).await.starts_with("HTTP/1.1 200 "));
        let file = proxy.config_path();
        let base = std::fs::read_to_string(&file).expect("read proxy.toml");
        std::fs::write(&file, format!("{base}[limits]\nmax_body_bytes = 16\n")).expect("write");
        eventually("the new body limit", WAIT, || async move {
            post(100).await.starts_with("HTTP/1.1 413 ").then_some(())
        })
        .await;
        std::fs::write(&file, format!("{base}[limits]\nmax_header_bytes = 10\n")).expect("write");
        tokio::task::block_in_place(|| {
            proxy.wait_log("node settings rejected", WAIT);
        });
        assert!(
            post(100).await.starts_with("HTTP/1.1 413 "),
            "last good settings serve"
        );
        assert!(post(10).await.starts_with("HTTP/1.1 200 "));
        drop(proxy);
    });
}

/// The API server goes away: the proxy keeps serving its last rules; once it is back, changes
/// flow again. Its own API server (the shared one must stay up for the other tests).
#[test]
fn kube_proxy_keeps_serving_while_the_api_server_is_down() {
    let server = KubeServer::start(KubeOptions::default());
    let server = &server;
    runtime().block_on(async {
        let client = server.client().await;
        let scene = Scene::new(
            &client,
            "kproxy-outage",
            "xlb-outage",
            "test.xlb.dev/outage",
        )
        .await;
        let (ns, class) = (scene.ns, scene.class);
        let ingresses = &scene.ingresses;
        let plain = |host: &str| json!({"rules": [rule(host, json!({"name": "http"}))]});
        put(
            ingresses,
            &ingress(ns, "app", class, plain("app.example.test"), json!({})),
        )
        .await;
        let proxy = scene.proxy(server, "test-outage", &[]);
        let http = proxy.http;
        let served = |host: &'static str| async move {
            matches!(try_get(http, host).await, Ok((StatusCode::OK, _))).then_some(())
        };
        eventually("app served", WAIT, || served("app.example.test")).await;

        tokio::task::block_in_place(|| server.stop_apiserver());
        // Longer than a batch, a watch retry and its backoff: nothing may be torn down.
        let until = Instant::now() + Duration::from_secs(4);
        let mut requests = 0;
        while Instant::now() < until {
            let (status, body) = try_get(http, "app.example.test")
                .await
                .expect("served during the outage");
            assert_eq!(
                (status, backend(&body)),
                (StatusCode::OK, Some("v1")),
                "{body}"
            );
            requests += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(requests > 10, "only {requests} requests during the outage");

        tokio::task::block_in_place(|| server.start_apiserver());
        let client = server.client().await;
        let ingresses: Api<Ingress> = Api::namespaced(client, ns);
        put(
            &ingresses,
            &ingress(ns, "later", class, plain("later.example.test"), json!({})),
        )
        .await;
        eventually("a change after the API server came back", WAIT, || {
            served("later.example.test")
        })
        .await;
        eventually("app still served", WAIT, || served("app.example.test")).await;
        drop(proxy);
    });
}

/// A Service whose endpoints speak TLS (the `xlb.dev/proxy-backend-protocol` annotation)
/// with their CA in a Secret: refused while the Secret holds another CA, served once the
/// Secret is rotated to the right one; no restart, nothing else touched.
#[test]
fn kube_proxy_speaks_tls_to_annotated_services_and_follows_their_ca_secret() {
    let server = KubeServer::shared();
    runtime().block_on(async {
        let client = server.client().await;
        let scene = Scene::new(
            &client,
            "kproxy-upstream-tls",
            "xlb-upstream-tls",
            "test.xlb.dev/upstream-tls",
        )
        .await;
        let (ns, class) = (scene.ns, scene.class);
        let pki = Pki::new();
        let (secure, seen) = support::tls_upstream("secure", &pki, &["secure.internal"]).await;
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        put(
            &services,
            &obj(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": ns, "name": "secure", "annotations": {
                    "xlb.dev/proxy-backend-protocol": "HTTPS",
                    "xlb.dev/proxy-ssl-secret": "secure-ca",
                    "xlb.dev/proxy-ssl-name": "secure.internal",
                }},
                "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                    "targetPort": "https"}]},
            })),
        )
        .await;
        put(
            &scene.slices,
            &obj(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": ns, "name": "secure-1",
                             "labels": {"kubernetes.io/service-name": "secure"}},
                "addressType": "IPv4",
                "ports": [{"name": "https", "port": secure.addr.port(), "protocol": "TCP"}],
                "endpoints": [{"addresses": [secure.addr.ip().to_string()],
                               "conditions": {"ready": true}}],
            })),
        )
        .await;
        // As cert-manager writes it: the leaf, its key and the issuing CA in ca.crt.
        let ca_secret = |ca: &Pki| {
            let mut s = tls_secret(ns, "secure-ca", &ca.leaf(&["secure.internal"]));
            s.data.get_or_insert_default().insert(
                "ca.crt".into(),
                k8s_openapi::ByteString(ca.ca_pem.clone().into_bytes()),
            );
            s
        };
        put(&scene.secrets, &ca_secret(&Pki::new())).await;
        let spec = json!({"rules": [{"host": "secure.example.test", "http": {"paths": [
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "secure", "port": {"name": "https"}}}}]}}]});
        put(
            &scene.ingresses,
            &ingress(ns, "secure", class, spec, json!({})),
        )
        .await;
        let proxy = scene.proxy(server, "test-upstream-tls", &[]);
        let http = proxy.http;
        let answers = |want: StatusCode| async move {
            matches!(try_get(http, "secure.example.test").await,
                Ok((status, _)) if status == want)
            .then_some(())
        };
        eventually(
            "502 while the Secret holds a CA the endpoint's certificate does not chain to",
            WAIT,
            || answers(StatusCode::BAD_GATEWAY),
        )
        .await;
        assert_eq!(
            secure.hits(),
            0,
            "no request reached an unverified endpoint"
        );

        put(&scene.secrets, &ca_secret(&pki)).await;
        eventually("served once the CA is right", WAIT, || {
            answers(StatusCode::OK)
        })
        .await;
        let (_, body) = try_get(http, "secure.example.test").await.expect("served");
        assert_eq!(backend(&body), Some("secure"), "{body}");
        assert!(
            seen.completed()
                .iter()
                .all(|(sni, _)| sni.as_deref() == Some("secure.internal")),
            "{:?}",
            seen.completed()
        );
        drop(proxy);
    });
}
