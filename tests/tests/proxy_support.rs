//! Shared helpers of the `proxy_*` tests: loopback upstreams, config builders, HTTP/TLS
//! clients and a throwaway PKI. Other test files include this file with `#[path]`; built on
//! its own it checks the helpers themselves.
#![allow(dead_code)] // each test binary uses a different subset

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_userspace::proxy::config::{
    Backend as IngressBackend, HttpPath, Ingress, IngressRule, PathType, ProxyConfig, Service,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for any single network step of a test.
pub const STEP: Duration = Duration::from_secs(10);

/// Fails the test if `f` takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

/// A loopback upstream that describes each request in its response body.
///
/// Paths: `/status/N` answers status N; `/sleep/MS` answers after MS milliseconds;
/// `/echo-body` answers `len=N` with the request body length; a WebSocket upgrade is
/// accepted and echoes messages; anything else answers 200.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests received (upgrades included).
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts an upstream named `name` on 127.0.0.1.
pub async fn upstream(name: &'static str) -> Upstream {
    serve_upstream(name, None).await.0
}

/// What a TLS upstream saw of its clients' handshakes.
#[derive(Debug, Default)]
pub struct Handshakes {
    /// SNI of each completed handshake (None: no SNI), and whether it resumed a session.
    pub completed: std::sync::Mutex<Vec<(Option<String>, bool)>>,
    /// Handshakes that failed (the client refused the certificate, or spoke no TLS).
    pub failed: AtomicUsize,
    /// The common name of each client certificate presented.
    pub client_cns: std::sync::Mutex<Vec<String>>,
}

impl Handshakes {
    /// The completed handshakes so far.
    pub fn completed(&self) -> Vec<(Option<String>, bool)> {
        self.completed.lock().expect("lock").clone()
    }
}

/// Starts an upstream like [`upstream`] that speaks only TLS (1.2 and 1.3, ALPN http/1.1),
/// with a certificate of `pki` for `hosts`.
pub async fn tls_upstream(
    name: &'static str,
    pki: &Pki,
    hosts: &[&str],
) -> (Upstream, Arc<Handshakes>) {
    tls_upstream_with(name, pki, hosts, None).await
}

/// [`tls_upstream`] that also requires a client certificate issued by `client_ca`, if given.
pub async fn tls_upstream_with(
    name: &'static str,
    pki: &Pki,
    hosts: &[&str],
    client_ca: Option<&Pki>,
) -> (Upstream, Arc<Handshakes>) {
    let (certs, key) = pki.leaf_der(hosts);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.ca_der.clone()).expect("client CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(certs, key).expect("server cert");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let (up, seen) = serve_upstream(name, Some(acceptor)).await;
    (up, seen.expect("handshake log"))
}

async fn serve_upstream(
    name: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (Upstream, Option<Arc<Handshakes>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = tls.as_ref().map(|_| Arc::new(Handshakes::default()));
    let (h, log) = (hits.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (h, tls, log) = (h.clone(), tls.clone(), log.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    answer(name, req)
                });
                let http = hyper::server::conn::http1::Builder::new();
                let (Some(acceptor), Some(log)) = (tls, log) else {
                    let _ = http
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                    return;
                };
                let s = match acceptor.accept(stream).await {
                    Ok(s) => s,
                    Err(_) => {
                        log.failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let session = s.get_ref().1;
                let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                let sni = session.server_name().map(str::to_owned);
                if let Some(certs) = session.peer_certificates() {
                    let cn = x509_cn(certs[0].as_ref()).1;
                    log.client_cns.lock().expect("lock").push(cn);
                }
                log.completed.lock().expect("lock").push((sni, resumed));
                let _ = http
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (Upstream { addr, hits, task }, seen)
}

async fn answer(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(key) = req.headers().get("sec-websocket-key").cloned() {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                } else if msg.is_close() {
                    break;
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .expect("101 response");
        return Ok(resp);
    }
    let mut status = StatusCode::OK;
    let mut text = format!(
        "backend={name}\nmethod={}\npath={}\n",
        req.method(),
        req.uri()
    );
    for (k, v) in req.headers() {
        text.push_str(&format!(
            "h:{k}={}\n",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
    } else if let Some(ms) = path.strip_prefix("/sleep/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    } else if path == "/echo-body" {
        let n = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(usize::MAX);
        text = format!("len={n}\n");
    }
    let resp = Response::builder()
        .status(status)
        .header("x-backend", name)
        .header("connection", "keep-alive, x-upstream-private")
        .header("x-upstream-private", "1")
        .body(Full::new(Bytes::from(text)))
        .expect("response");
    Ok(resp)
}

/// A Service port in namespace `default`.
pub fn service(name: &str, endpoints: &[SocketAddr]) -> Service {
    Service {
        name: name.to_owned(),
        port: 80,
        endpoints: endpoints.to_vec(),
        ..Default::default()
    }
}

/// A path of a rule, backed by `service`:80.
pub fn path(p: &str, path_type: PathType, service: &str) -> HttpPath {
    HttpPath {
        path: p.to_owned(),
        path_type,
        backend: IngressBackend {
            service: service.to_owned(),
            port: 80,
        },
    }
}

/// An Ingress in namespace `default` with one rule per `(host, paths)`.
pub fn ingress(name: &str, rules: Vec<(Option<&str>, Vec<HttpPath>)>) -> Ingress {
    Ingress {
        name: name.to_owned(),
        rules: rules
            .into_iter()
            .map(|(host, paths)| IngressRule {
                host: host.map(str::to_owned),
                paths,
            })
            .collect(),
        ..Default::default()
    }
}

/// Loopback-only listeners on ephemeral ports, two workers, access log on.
pub fn base_config() -> ProxyConfig {
    let mut c = ProxyConfig::default();
    c.listen.http = Some("127.0.0.1:0".parse().expect("addr"));
    c.listen.https = None;
    c.listen.metrics = Some("127.0.0.1:0".parse().expect("addr"));
    c.listen.workers = 2;
    c.access_log = true;
    c
}

/// [`base_config`] with one Service `name` (port 80, these endpoints) and one Ingress
/// routing `host` + the `prefix` to it.
pub fn one_route(host: &str, prefix: &str, name: &str, endpoints: &[SocketAddr]) -> ProxyConfig {
    let mut c = base_config();
    c.services = vec![service(name, endpoints)];
    c.ingresses = vec![ingress(
        name,
        vec![(Some(host), vec![path(prefix, PathType::Prefix, name)])],
    )];
    c
}

/// Asserts the proxy's `xlb_proxy_upstream_errors_total` for `upstream` (as
/// `namespace/name:port`) is `n`.
pub async fn assert_upstream_errors(
    proxy: &lb_userspace::proxy::ProxyHandle,
    upstream: &str,
    n: u64,
    why: &str,
) {
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    let line = format!("xlb_proxy_upstream_errors_total{{upstream=\"{upstream}\"}} {n}\n");
    assert!(m.contains(&line), "{why}: {m}");
}

/// Reads from `s` until a request head has ended (for raw test upstreams that answer one
/// request per connection); None if the connection ends first.
pub async fn read_request_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// A loopback address nothing listens on (bound, then released): connects are refused.
pub async fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// A response with its body read.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub version: hyper::Version,
    pub body: String,
}

impl Got {
    /// The upstream that answered (`backend=` line), if any.
    pub fn backend(&self) -> Option<&str> {
        self.body.lines().find_map(|l| l.strip_prefix("backend="))
    }

    /// A request header as the upstream saw it.
    pub fn upstream_header(&self, name: &str) -> Option<&str> {
        let prefix = format!("h:{name}=");
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }
}

async fn read(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = within("response body", body.collect())
        .await
        .expect("body")
        .to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// An HTTP/1.1 client connection.
pub async fn h1<IO>(io: IO) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = within(
        "h1 handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    send
}

/// An HTTP/2 client connection.
pub async fn h2<IO>(io: IO) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = within(
        "h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// A GET request for `host` + `path`.
pub fn get_req(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Sends on an HTTP/1.1 connection and reads the response.
pub async fn send1(
    s: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Got {
    within("h1 ready", s.ready())
        .await
        .expect("connection ready");
    read(
        within("h1 response", s.send_request(req))
            .await
            .expect("h1 response"),
    )
    .await
}

/// Sends on an HTTP/2 connection and reads the response.
pub async fn send2(
    s: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Got {
    read(
        within("h2 response", s.send_request(req))
            .await
            .expect("h2 response"),
    )
    .await
}

/// One GET over a fresh plain connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to proxy");
    let mut s = h1(tcp).await;
    send1(&mut s, get_req(host, path)).await
}

/// Asks `GET path` of `host` up to `tries` times, `pause` apart, until the answer is
/// `status`; whether it came.
pub async fn answers_within(
    addr: SocketAddr,
    host: &str,
    path: &str,
    status: StatusCode,
    tries: u32,
    pause: Duration,
) -> bool {
    for _ in 0..tries {
        if get(addr, host, path).await.status == status {
            return true;
        }
        tokio::time::sleep(pause).await;
    }
    false
}

/// Writes raw bytes and reads until the proxy closes the connection (or [`STEP`] passes).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to proxy");
    tcp.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the proxy's metrics count `available` and `check_failed` endpoints for
/// `upstream` (`namespace/service:port`), as active health checks settle.
pub async fn endpoint_states(
    metrics_addr: SocketAddr,
    upstream: &str,
    available: usize,
    check_failed: usize,
) {
    let want = [("available", available), ("check_failed", check_failed)].map(|(state, n)| {
        format!("xlb_proxy_upstream_endpoints{{upstream=\"{upstream}\",state=\"{state}\"}} {n}\n")
    });
    within("endpoint states settle", async {
        loop {
            let m = metrics(metrics_addr).await;
            if want.iter().all(|w| m.contains(w.as_str())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// The text of the proxy's `/metrics`.
pub async fn metrics(addr: SocketAddr) -> String {
    let got = get(addr, "127.0.0.1", "/metrics").await;
    assert_eq!(got.status, StatusCode::OK);
    got.body
}

/// A WebSocket to `url` through the proxy's plain listener at `addr` (answered 101).
pub async fn websocket(
    addr: SocketAddr,
    url: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to proxy");
    let (ws, resp) = within("ws handshake", tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `n` text messages and expects each echoed back.
pub async fn echo_round<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, tag: &str, n: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..n {
        let text = format!("{tag}-{i}");
        within("ws send", ws.send(Message::text(text.clone())))
            .await
            .expect("send");
        let back = within("ws echo", ws.next())
            .await
            .expect("stream open")
            .expect("message");
        assert_eq!(back, Message::text(text));
    }
}

/// A throwaway CA and leaf certificates.
pub struct Pki {
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    /// The CA certificate as PEM (what a Secret's `ca.crt` holds).
    pub ca_pem: String,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "xlb test CA");
        let key = rcgen::KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        Self {
            ca_der: cert.der().clone(),
            ca_pem: cert.pem(),
            ca_params: params,
            ca_key: key,
        }
    }

    /// (certificate PEM, key PEM) for `hosts`, with CN = first host.
    pub fn leaf(&self, hosts: &[&str]) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(
            hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
        )
        .expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hosts[0]);
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    }

    /// [`Pki::leaf`] parsed, as a rustls server takes it.
    pub fn leaf_der(
        &self,
        hosts: &[&str],
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        use rustls::pki_types::pem::PemObject as _;
        let (crt, key) = self.leaf(hosts);
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(crt.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("leaf PEM");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
        (certs, key)
    }

    /// A client trusting this CA, offering `alpn`, limited to `versions`.
    pub fn client(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("trust CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

/// A TLS connection to the proxy with SNI `sni`.
pub async fn tls(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = within("connect", TcpStream::connect(addr)).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("server name");
    within("TLS handshake", connector.connect(name, tcp)).await
}

/// The common name of the certificate the server presented.
pub fn peer_cn(s: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let certs = s
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate");
    let (_, x509) = x509_cn(certs[0].as_ref());
    x509
}

/// Extracts the CN by scanning the DER for the commonName OID (2.5.4.3); enough for rcgen
/// certificates, which carry exactly one CN in the subject (the issuer's CN comes first).
fn x509_cn(der: &[u8]) -> (usize, String) {
    const OID_CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let mut found = Vec::new();
    let mut i = 0;
    while i + OID_CN.len() + 2 < der.len() {
        if der[i..i + OID_CN.len()] == OID_CN {
            let len = der[i + OID_CN.len() + 1] as usize;
            let start = i + OID_CN.len() + 2;
            if start + len <= der.len() {
                found.push(String::from_utf8_lossy(&der[start..start + len]).into_owned());
            }
        }
        i += 1;
    }
    (found.len(), found.last().cloned().unwrap_or_default())
}

/// Starts the proxy, failing the test on error.
pub fn start(cfg: ProxyConfig) -> lb_userspace::proxy::ProxyHandle {
    lb_userspace::proxy::start(cfg).expect("proxy starts")
}

#[tokio::test]
async fn helper_upstream_describes_requests() {
    let up = upstream("u1").await;
    let got = get(up.addr, "example.test", "/status/418").await;
    assert_eq!(got.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(got.backend(), Some("u1"));
    assert_eq!(got.upstream_header("host"), Some("example.test"));
    assert_eq!(up.hits(), 1);
}

#[test]
fn helper_pki_issues_leaf_for_hosts() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf(&["a.test", "*.b.test"]);
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(key.contains("PRIVATE KEY"));
}
