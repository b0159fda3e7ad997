//! HTTP/2 to upstream endpoints (`Service.protocol = h2`): cleartext h2c with prior knowledge
//! and TLS with ALPN `h2`, requests multiplexed on one connection per endpoint and worker,
//! gRPC-shaped calls with response trailers, forwarding headers, HTTP/1.1 clients, upgrades
//! refused with 501, connect failures (502), body limits (413) and reconnection after the
//! upstream closes its connection. The upstreams are real HTTP/2 servers (the `h2` crate)
//! that record what they receive.

#[path = "proxy_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use hyper::StatusCode;
use lb_userspace::proxy::config::{
    ANNOTATION_MAX_BODY, ActiveHealth, PathType::*, ProxyConfig, Service, UpstreamProtocol,
    UpstreamTls,
};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// Requests the upstream holds until all of them have arrived (path ending in `/Together`).
const TOGETHER: usize = 20;

/// Requests the upstream holds until all of them have arrived (path ending in `/Crowd`):
/// more than the 100 streams an HTTP/2 client assumes before the server's SETTINGS.
const CROWD: usize = 120;

/// How long `/Slow` requests wait before their response head.
const SLOW_HEAD: Duration = Duration::from_millis(800);

/// Time given to the proxy to notice that an upstream connection closed: the tests check
/// that the *next* request reconnects, not a request racing the close.
const SETTLE: Duration = Duration::from_millis(100);

/// `/Drip` answers send [`DRIP_MESSAGES`] messages this far apart; `/Pause` answers send
/// two messages [`PAUSE`] apart. Against a response timeout of [`READ_TIMEOUT`], each drip
/// gap is shorter (but all of them together longer) and the pause longer.
const DRIP_GAP: Duration = Duration::from_millis(80);
const DRIP_MESSAGES: usize = 8;
const PAUSE: Duration = Duration::from_millis(2000);
const READ_TIMEOUT_MS: u64 = 400;

/// One request as an upstream received it (recorded once its body has been read in full).
#[derive(Debug, Clone)]
struct Seen {
    version: http::Version,
    method: http::Method,
    /// Path and query.
    target: String,
    /// `:authority`.
    authority: Option<String>,
    headers: HeaderMap,
    body_len: usize,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What an upstream observed, shared with its connection tasks.
struct State {
    name: &'static str,
    /// TCP connections accepted.
    accepted: AtomicUsize,
    /// Connections whose socket has been closed (by either side).
    closed: AtomicUsize,
    /// TLS handshakes that failed.
    tls_failed: AtomicUsize,
    /// ALPN protocol of each completed TLS handshake.
    alpn: Mutex<Vec<Option<Vec<u8>>>>,
    /// Requests whose body ended in an error (reset by the proxy).
    body_errors: AtomicUsize,
    /// Paced answers (`/Drip`, `/Pause`) the proxy reset before they were complete.
    answers_reset: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    together: tokio::sync::Barrier,
    /// Holds requests whose path ends in `/Crowd` until [`CROWD`] have arrived.
    crowd: tokio::sync::Barrier,
    /// SETTINGS_MAX_CONCURRENT_STREAMS of connections accepted from now on (0: none sent).
    max_streams: AtomicUsize,
    /// This many requests whose path ends in `/Crash` close their connection at once, as a
    /// restarting server does (no GOAWAY, no answer); later ones are answered.
    crashes: AtomicUsize,
    /// This many requests whose path ends in `/Refuse` are reset with REFUSED_STREAM once
    /// [`State::refuse_after`] bytes of their body have arrived (or it ended).
    refusals: AtomicUsize,
    refuse_after: AtomicUsize,
    /// Requests reset with REFUSED_STREAM so far.
    refused: AtomicUsize,
    /// This many new (cleartext) connections are served by [`goaway_on_first_request`].
    goaway_connections: AtomicUsize,
    /// What `grpc.health.v1.Health/Check` answers: a `ServingStatus` (1 SERVING,
    /// 2 NOT_SERVING), or 0 for "not implemented" (grpc-status 12, trailers only).
    health: AtomicUsize,
}

/// A loopback HTTP/2 server (h2c, or TLS with the given ALPN) answering every request 200
/// with a body and the trailers `grpc-status: 0`, `grpc-message: ok`.
///
/// gRPC requests (`content-type: application/grpc…`) get a gRPC message `hello from NAME`;
/// others get `backend=NAME\npath=TARGET\nlen=BODY_LENGTH\n` as text.
struct H2Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    goaway: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Upstream {
    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// The health checks seen so far (requests for `target`); there must be some.
    fn checks(&self, target: &str) -> Vec<Seen> {
        let checks: Vec<Seen> = self
            .seen()
            .into_iter()
            .filter(|s| s.target == target)
            .collect();
        assert!(!checks.is_empty(), "no check reached {}", self.state.name);
        checks
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    fn alpn(&self) -> Vec<Option<Vec<u8>>> {
        self.state.alpn.lock().expect("lock").clone()
    }

    /// Shuts every open connection down gracefully (GOAWAY, then close once idle).
    fn goaway(&self) {
        self.goaway.send_modify(|g| *g += 1);
    }

    /// Sets what the gRPC health service answers (see [`State::health`]).
    fn set_health(&self, status: usize) {
        self.state.health.store(status, Ordering::SeqCst);
    }

    /// Waits until `n` connections have been closed.
    async fn closed(&self, n: usize) {
        within("upstream connections closed", async {
            while self.state.closed.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// Stops the server abruptly: the listener and every connection are closed (no GOAWAY).
    async fn stop(&mut self) {
        self.task.abort();
        let _ = within("upstream stops", &mut self.task).await;
        self.closed(self.accepted()).await;
    }
}

/// Counts a connection closed when dropped; declared before the connection, dropped after it.
struct Closed(Arc<State>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Starts an h2c upstream on 127.0.0.1.
async fn h2_upstream(name: &'static str) -> H2Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    serve(name, listener, None)
}

/// Starts an h2c upstream on `addr` (a port a stopped upstream used).
fn h2_upstream_at(name: &'static str, addr: SocketAddr) -> H2Upstream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind the same port again");
    serve(name, socket.listen(128).expect("listen"), None)
}

/// Starts an HTTP/2 upstream behind TLS with a certificate of `pki` for `hosts`, selecting
/// among `alpn` (it speaks HTTP/2 whatever the handshake negotiated).
async fn h2_tls_upstream(
    name: &'static str,
    pki: &Pki,
    hosts: &[&str],
    alpn: &[&[u8]],
) -> H2Upstream {
    let (certs, key) = pki.leaf_der(hosts);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    serve(
        name,
        listener,
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))),
    )
}

fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> H2Upstream {
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new(State {
        name,
        accepted: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        tls_failed: AtomicUsize::new(0),
        alpn: Mutex::new(Vec::new()),
        body_errors: AtomicUsize::new(0),
        answers_reset: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
        together: tokio::sync::Barrier::new(TOGETHER),
        crowd: tokio::sync::Barrier::new(CROWD),
        max_streams: AtomicUsize::new(0),
        crashes: AtomicUsize::new(0),
        refusals: AtomicUsize::new(0),
        refuse_after: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        goaway_connections: AtomicUsize::new(0),
        health: AtomicUsize::new(1),
    });
    let (goaway, mut rx) = tokio::sync::watch::channel(0u64);
    let st = state.clone();
    let task = tokio::spawn(async move {
        // Owned here: aborting this task drops the set, which aborts every connection.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            while conns.try_join_next().is_some() {}
            st.accepted.fetch_add(1, Ordering::SeqCst);
            // A clone starts where `rx` is: mark past GOAWAYs seen, they were for older
            // connections.
            rx.borrow_and_update();
            let (st, tls, rx) = (st.clone(), tls.clone(), rx.clone());
            conns.spawn(async move {
                let _closed = Closed(st.clone());
                // Pinned in a named local so that it (and its socket) drops before `_closed`.
                let mut conn = Box::pin(async move {
                    match tls {
                        None if take_one(&st.goaway_connections) => {
                            goaway_on_first_request(tcp).await;
                        }
                        None => serve_connection(tcp, st, rx).await,
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(s) => {
                                let alpn = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                                st.alpn.lock().expect("lock").push(alpn);
                                serve_connection(s, st, rx).await;
                            }
                            Err(_) => {
                                st.tls_failed.fetch_add(1, Ordering::SeqCst);
                            }
                        },
                    }
                });
                (&mut conn).await;
                drop(conn);
            });
        }
    });
    H2Upstream {
        addr,
        state,
        goaway,
        task,
    }
}

async fn serve_connection<IO>(
    io: IO,
    state: Arc<State>,
    mut goaway: tokio::sync::watch::Receiver<u64>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    match state.max_streams.load(Ordering::SeqCst) {
        0 => {}
        n => {
            builder.max_concurrent_streams(u32::try_from(n).expect("a small limit"));
        }
    }
    let Ok(mut conn) = builder.handshake(io).await else {
        return;
    };
    let mut watching = true;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let path = req.uri().path();
                    if path.ends_with("/Crash") && take_one(&state.crashes) {
                        // Dropping the connection closes the socket without a GOAWAY.
                        break;
                    }
                    if path.ends_with("/Refuse") && take_one(&state.refusals) {
                        tokio::spawn(refuse(state.clone(), req, respond));
                        continue;
                    }
                    tokio::spawn(answer(state.clone(), req, respond));
                }
                _ => break,
            },
            changed = goaway.changed(), if watching => {
                watching = false;
                if changed.is_ok() {
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

/// Takes one from a countdown; false at zero.
fn take_one(n: &AtomicUsize) -> bool {
    n.try_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Resets the request's stream with REFUSED_STREAM (RFC 9113 §8.7: not processed, safe to
/// retry) once [`State::refuse_after`] bytes of its body have arrived or it ended.
async fn refuse(
    state: Arc<State>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let after = state.refuse_after.load(Ordering::SeqCst);
    let mut body = req.into_body();
    let mut len = 0;
    while len < after {
        let Some(Ok(chunk)) = body.data().await else {
            break;
        };
        len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    respond.send_reset(h2::Reason::REFUSED_STREAM);
    state.refused.fetch_add(1, Ordering::SeqCst);
}

/// An HTTP/2 server that starts to shut down as the first request arrives, written frame by
/// frame so the GOAWAY's last stream is exact: it answers the client's first HEADERS with
/// GOAWAY (last stream 0, NO_ERROR), so that request was not processed, and closes.
async fn goaway_on_first_request(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const GOAWAY: u8 = 7;
    let mut preface = [0u8; 24];
    if tcp.read_exact(&mut preface).await.is_err() {
        return;
    }
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // Our SETTINGS: none, the defaults.
    let _ = tcp.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]).await;
    loop {
        let mut head = [0u8; 9];
        if tcp.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if tcp.read_exact(&mut payload).await.is_err() {
            return;
        }
        match head[3] {
            SETTINGS if head[4] & 1 == 0 => {
                let _ = tcp.write_all(&[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0]).await;
            }
            HEADERS => {
                let mut goaway = vec![0, 0, 8, GOAWAY, 0, 0, 0, 0, 0];
                goaway.extend_from_slice(&[0; 8]); // last stream 0, NO_ERROR
                let _ = tcp.write_all(&goaway).await;
                let _ = tcp.shutdown().await;
                // Let the client read it all before the socket closes.
                tokio::time::sleep(SETTLE).await;
                return;
            }
            _ => {}
        }
    }
}

async fn answer(
    state: Arc<State>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let (parts, mut body) = req.into_parts();
    let mut len = 0;
    let mut received = Vec::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                len += c.len();
                let _ = body.flow_control().release_capacity(c.len());
                received.extend_from_slice(&c);
            }
            Err(_) => {
                state.body_errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    state.seen.lock().expect("lock").push(Seen {
        version: parts.version,
        method: parts.method.clone(),
        target: target.clone(),
        authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
        headers: parts.headers.clone(),
        body_len: len,
        body: Bytes::from(received),
    });
    if parts.uri.path() == "/grpc.health.v1.Health/Check" {
        answer_health(&state, respond);
        return;
    }
    // Answers that end with their head: a 204, and a 200 without content-length.
    let bodiless = match parts.uri.path() {
        p if p.ends_with("/NoContent") => Some(204),
        p if p.ends_with("/Empty") => Some(200),
        _ => None,
    };
    if let Some(status) = bodiless {
        let resp = http::Response::builder()
            .status(status)
            .header("x-backend", state.name)
            .body(())
            .expect("response");
        let _ = respond.send_response(resp, true);
        return;
    }
    if parts.uri.path().ends_with("/Together") {
        state.together.wait().await;
    }
    if parts.uri.path().ends_with("/Crowd") {
        state.crowd.wait().await;
    }
    if parts.uri.path().ends_with("/Slow") {
        // A streaming call whose server sends its head with its first message, later.
        tokio::time::sleep(SLOW_HEAD).await;
    }
    let grpc = parts
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (content_type, payload) = if grpc {
        (
            "application/grpc",
            grpc_frame(format!("hello from {}", state.name).as_bytes()),
        )
    } else {
        (
            "text/plain",
            Bytes::from(format!(
                "backend={}\npath={target}\nlen={len}\n",
                state.name
            )),
        )
    };
    let resp = http::Response::builder()
        .status(200)
        .header("content-type", content_type)
        .header("x-backend", state.name)
        .body(())
        .expect("response");
    let Ok(mut send) = respond.send_response(resp, false) else {
        return;
    };
    let (messages, gap) = match parts.uri.path() {
        p if p.ends_with("/Drip") => (DRIP_MESSAGES, DRIP_GAP),
        p if p.ends_with("/Pause") => (2, PAUSE),
        _ => (1, Duration::ZERO),
    };
    for i in 0..messages {
        if i > 0 {
            tokio::select! {
                () = tokio::time::sleep(gap) => {}
                _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => {
                    state.answers_reset.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        if send.send_data(payload.clone(), false).is_err() {
            return;
        }
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers.insert("grpc-message", http::HeaderValue::from_static("ok"));
    let _ = send.send_trailers(trailers);
}

/// A gRPC length-prefixed message (uncompressed).
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(msg.len()).expect("small").to_be_bytes());
    out.extend_from_slice(msg);
    Bytes::from(out)
}

/// An h2c (prior knowledge) client connection to the proxy's plain listener.
async fn h2c(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to proxy");
    let (send, conn) = within("h2c handshake", h2::client::handshake(tcp))
        .await
        .expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A response as an HTTP/2 client got it, trailers included.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Reply {
    /// Asserts a gRPC trailers-only error answer: 200, `grpc-status: code`,
    /// `grpc-message: message`, no body.
    fn assert_grpc_error(&self, code: &str, message: &str) {
        let header = |name: &str| self.headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(self.status, StatusCode::OK, "{self:?}");
        assert_eq!(header("content-type"), Some("application/grpc"), "{self:?}");
        assert_eq!(header("grpc-status"), Some(code), "{self:?}");
        assert_eq!(header("grpc-message"), Some(message), "{self:?}");
        assert!(self.body.is_empty(), "{self:?}");
        assert_eq!(self.trailers, None, "trailers-only: {self:?}");
    }

    fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v| v.to_str().ok())
    }
}

/// Sends `req` with `body` (as DATA frames, in these chunks, no content-length added) and
/// returns the response head; a body the proxy stops reading is abandoned.
async fn send_h2(
    client: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Vec<Bytes>,
) -> http::Response<h2::RecvStream> {
    let mut c = within("h2 ready", client.clone().ready())
        .await
        .expect("connection ready");
    let (resp, mut send) = c.send_request(req, body.is_empty()).expect("send request");
    let n = body.len();
    for (i, chunk) in body.into_iter().enumerate() {
        if send.send_data(chunk, i + 1 == n).is_err() {
            break;
        }
    }
    within("h2 response", resp).await.expect("response")
}

/// [`send_h2`], then reads the body and trailers.
async fn exchange(
    client: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Vec<Bytes>,
) -> Reply {
    read_reply(send_h2(client, req, body).await).await
}

/// Reads a response's body and trailers.
async fn read_reply(resp: http::Response<h2::RecvStream>) -> Reply {
    let (parts, mut recv) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = within("h2 body", recv.data()).await {
        let chunk = chunk.expect("body chunk");
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = within("h2 trailers", recv.trailers())
        .await
        .expect("trailers");
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
    }
}

/// Answers a gRPC health check with [`State::health`].
fn answer_health(state: &State, mut respond: h2::server::SendResponse<Bytes>) {
    let status = state.health.load(Ordering::SeqCst);
    let mut resp = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    if status == 0 {
        resp = resp.header("grpc-status", "12");
        let _ = respond.send_response(resp.body(()).expect("response"), true);
        return;
    }
    let Ok(mut send) = respond.send_response(resp.body(()).expect("response"), false) else {
        return;
    };
    // HealthCheckResponse { status = 1: varint }.
    let message = [0x08, u8::try_from(status).expect("a small status")];
    if send.send_data(grpc_frame(&message), false).is_ok() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = send.send_trailers(trailers);
    }
}

/// A unary gRPC-shaped call: POST, `content-type: application/grpc`, `te: trailers`.
fn grpc_request(authority: &str, method: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "xlb-test-grpc/1.0")
        .body(())
        .expect("request")
}

/// [`TOGETHER`] gRPC calls to `grpc.test` at once, from as many client connections to
/// `addr` (all connected first); each must succeed with `grpc-status: 0`.
async fn calls_together(addr: SocketAddr) -> Vec<Reply> {
    held_calls(addr, TOGETHER, "/helloworld.Greeter/Together").await
}

/// `n` gRPC calls to `method` at once (see [`calls_together`]).
async fn held_calls(addr: SocketAddr, n: usize, method: &str) -> Vec<Reply> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(h2c(addr).await);
    }
    let calls = clients.iter().enumerate().map(|(i, client)| {
        exchange(
            client,
            grpc_request("grpc.test", method),
            vec![grpc_frame(format!("call {i}").as_bytes())],
        )
    });
    let replies = futures_util::future::join_all(calls).await;
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, StatusCode::OK, "call {i}");
        assert_eq!(reply.trailer("grpc-status"), Some("0"), "call {i}");
    }
    replies
}

/// An h2c upstream called `name` behind a one-worker proxy routing `grpc.test` to it, and
/// the proxy's plain-HTTP address.
async fn h2_scene(
    name: &'static str,
) -> (H2Upstream, lb_userspace::proxy::ProxyHandle, SocketAddr) {
    let up = h2_upstream(name).await;
    let proxy = start(h2_config(vec![("grpc.test", h2_service("g", &[up.addr]))]));
    let addr = proxy.http_addr.expect("http");
    (up, proxy, addr)
}

/// A Service port whose endpoints speak HTTP/2.
fn h2_service(name: &str, endpoints: &[SocketAddr]) -> Service {
    let mut s = service(name, endpoints);
    s.protocol = UpstreamProtocol::H2;
    s
}

/// A plain-HTTP proxy with one worker (so one upstream connection per endpoint), routing
/// `host` to each Service.
fn h2_config(routes: Vec<(&str, Service)>) -> ProxyConfig {
    let mut cfg = base_config();
    cfg.listen.workers = 1;
    cfg.ingresses = vec![ingress(
        "i",
        routes
            .iter()
            .map(|(host, s)| (Some(*host), vec![path("/", Prefix, &s.name)]))
            .collect(),
    )];
    cfg.services = routes.into_iter().map(|(_, s)| s).collect();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2c_keeps_trailers_and_multiplexes_one_upstream_connection() {
    let (up, _proxy, addr) = h2_scene("g1").await;

    let client = h2c(addr).await;
    let message = grpc_frame(&[b'x'; 100]);
    let reply = exchange(
        &client,
        grpc_request("grpc.test", "/helloworld.Greeter/SayHello"),
        vec![message.clone()],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/grpc"[..])
    );
    assert_eq!(reply.body, grpc_frame(b"hello from g1"));
    assert_eq!(
        reply.trailer("grpc-status"),
        Some("0"),
        "trailers reach the client: {:?}",
        reply.trailers
    );
    assert_eq!(reply.trailer("grpc-message"), Some("ok"));

    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.version, http::Version::HTTP_2);
    assert_eq!(s.method, http::Method::POST);
    assert_eq!(s.target, "/helloworld.Greeter/SayHello");
    assert_eq!(s.authority.as_deref(), Some("grpc.test"));
    assert_eq!(s.header("te"), Some("trailers"), "{:?}", s.headers);
    assert_eq!(s.header("content-type"), Some("application/grpc"));
    assert_eq!(s.header("user-agent"), Some("xlb-test-grpc/1.0"));
    assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.header("x-forwarded-host"), Some("grpc.test"));
    assert_eq!(
        s.header("forwarded"),
        Some("for=127.0.0.1;host=\"grpc.test\";proto=http")
    );
    assert_eq!(s.body_len, message.len());

    // 20 calls from 20 client connections, all in flight at once: the upstream answers none
    // of them before all have arrived, over the one connection of the one worker.
    for (i, reply) in calls_together(addr).await.iter().enumerate() {
        assert_eq!(reply.body, grpc_frame(b"hello from g1"), "call {i}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 1 + TOGETHER);
    assert!(
        seen.iter()
            .all(|s| s.version == http::Version::HTTP_2 && s.header("te") == Some("trailers")),
        "{seen:?}"
    );
    assert_eq!(
        up.accepted(),
        1,
        "one multiplexed upstream connection for the whole test"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_a_cold_endpoint_opens_one_connection() {
    // Behind TLS, so that opening the connection takes several round trips.
    let pki = Pki::new();
    let up = h2_tls_upstream("cold", &pki, &["backend.test"], &[b"h2"]).await;
    let mut svc = h2_service("g", &[up.addr]);
    svc.tls = UpstreamTls {
        enabled: true,
        server_name: Some("backend.test".into()),
        ca_pem: Some(pki.ca_pem.clone()),
        ..UpstreamTls::default()
    };
    let proxy = start(h2_config(vec![("grpc.test", svc)]));
    let addr = proxy.http_addr.expect("http");
    // Every call finds no upstream connection yet: they must share the one being opened.
    calls_together(addr).await;
    assert_eq!(up.accepted(), 1, "no connection storm at a cold endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_clients_reach_h2_upstreams_with_forwarding_headers_and_no_hop_by_hop_ones() {
    let (up, _proxy, addr) = h2_scene("g2").await;

    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let mut c = h1(tcp).await;
    let req = hyper::Request::builder()
        .uri("/plain/page?x=1&y=two")
        .header("host", "grpc.test")
        .header("x-forwarded-for", "192.0.2.7")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-kept", "yes")
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    let got = send1(&mut c, req).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.version, hyper::Version::HTTP_11);
    assert_eq!(got.body, "backend=g2\npath=/plain/page?x=1&y=two\nlen=0\n");
    assert_eq!(
        got.headers.get("x-backend").map(|v| v.as_bytes()),
        Some(&b"g2"[..])
    );

    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.version, http::Version::HTTP_2);
    assert_eq!(s.method, http::Method::GET);
    assert_eq!(s.target, "/plain/page?x=1&y=two");
    assert_eq!(
        s.authority.as_deref(),
        Some("grpc.test"),
        "Host → :authority"
    );
    // The client is not a trusted proxy: its own X-Forwarded-For is replaced.
    assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(s.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(s.header("x-forwarded-proto"), Some("http"));
    assert_eq!(s.header("x-forwarded-host"), Some("grpc.test"));
    assert_eq!(
        s.header("forwarded"),
        Some("for=127.0.0.1;host=\"grpc.test\";proto=http")
    );
    assert_eq!(s.header("x-kept"), Some("yes"));
    for hop in [
        "connection",
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "upgrade",
        "transfer-encoding",
    ] {
        assert_eq!(s.header(hop), None, "{hop} must not be forwarded");
    }

    // A body with Content-Length, on the same client connection.
    let post = hyper::Request::post("/upload")
        .header("host", "grpc.test")
        .body(http_body_util::Full::new(Bytes::from(vec![b'y'; 10_000])))
        .expect("request");
    let got = send1(&mut c, post).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "backend=g2\npath=/upload\nlen=10000\n");

    // Fresh client connections share the upstream connection.
    for i in 0..5 {
        let got = get(addr, "grpc.test", &format!("/n/{i}")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, format!("backend=g2\npath=/n/{i}\nlen=0\n"));
    }
    assert_eq!(up.seen().len(), 7);
    assert_eq!(up.accepted(), 1, "one upstream connection for every client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_must_select_h2_by_alpn() {
    let pki = Pki::new();
    let good = h2_tls_upstream("good", &pki, &["backend.test"], &[b"h2"]).await;
    // Speaks HTTP/2 behind a handshake that offers only http/1.1: the proxy must not use it.
    let bad = h2_tls_upstream("bad", &pki, &["backend.test"], &[b"http/1.1"]).await;
    // Completes the handshake without selecting any protocol, then speaks HTTP/2: only the
    // proxy's own ALPN check keeps requests from it.
    let silent = h2_tls_upstream("silent", &pki, &["backend.test"], &[]).await;
    let tls = UpstreamTls {
        enabled: true,
        server_name: Some("backend.test".into()),
        ca_pem: Some(pki.ca_pem.clone()),
        ..UpstreamTls::default()
    };
    let mut good_svc = h2_service("good", &[good.addr]);
    good_svc.tls = tls.clone();
    let mut bad_svc = h2_service("bad", &[bad.addr]);
    bad_svc.tls = tls.clone();
    bad_svc.health.consecutive_failures = 0;
    let mut silent_svc = h2_service("silent", &[silent.addr]);
    silent_svc.tls = tls;
    silent_svc.health.consecutive_failures = 0;
    let proxy = start(h2_config(vec![
        ("good.test", good_svc),
        ("bad.test", bad_svc),
        ("silent.test", silent_svc),
    ]));
    let addr = proxy.http_addr.expect("http");

    let got = get(addr, "good.test", "/secure?q=1").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.body, "backend=good\npath=/secure?q=1\nlen=0\n");
    // And from an HTTP/2 client, with trailers.
    let client = h2c(addr).await;
    let reply = exchange(
        &client,
        grpc_request("good.test", "/svc.S/Call"),
        vec![grpc_frame(b"ping")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, grpc_frame(b"hello from good"));
    assert_eq!(reply.trailer("grpc-status"), Some("0"));
    let seen = good.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|s| s.version == http::Version::HTTP_2
                && s.authority.as_deref() == Some("good.test")),
        "{seen:?}"
    );
    assert_eq!(good.alpn(), [Some(b"h2".to_vec())], "one session, ALPN h2");

    let got = get(addr, "bad.test", "/secure").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
    assert!(bad.seen().is_empty(), "{:?}", bad.seen());
    assert!(
        bad.alpn().iter().all(|p| p.as_deref() != Some(&b"h2"[..])),
        "{:?}",
        bad.alpn()
    );
    eprintln!(
        "bad upstream: {} handshakes failed, {:?} completed",
        bad.state.tls_failed.load(Ordering::SeqCst),
        bad.alpn()
    );

    let got = get(addr, "silent.test", "/secure").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
    assert_eq!(
        got.body, "502 Bad Gateway\n",
        "error pages say nothing about internals"
    );
    // The proxy may answer before this end of the handshake has been recorded.
    within("silent upstream's handshake", async {
        while silent.alpn().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        silent.alpn(),
        [None],
        "the handshake completed, without ALPN"
    );
    assert!(silent.seen().is_empty(), "{:?}", silent.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_upstream_connection_is_replaced_by_the_next_request() {
    let (mut up, _proxy, addr) = h2_scene("first").await;

    let got = get(addr, "grpc.test", "/one").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(up.accepted(), 1);

    // Graceful shutdown: GOAWAY, then the upstream closes the idle connection.
    up.goaway();
    up.closed(1).await;
    tokio::time::sleep(SETTLE).await;
    let got = get(addr, "grpc.test", "/after-goaway").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.body, "backend=first\npath=/after-goaway\nlen=0\n");
    assert_eq!(up.accepted(), 2, "a new connection after GOAWAY");
    // The new connection is reused.
    let client = h2c(addr).await;
    let reply = exchange(
        &client,
        grpc_request("grpc.test", "/svc.S/Call"),
        vec![grpc_frame(b"ping")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.trailer("grpc-status"), Some("0"));
    assert_eq!(up.accepted(), 2);

    // The server goes away without a word and comes back on the same port.
    let endpoint = up.addr;
    up.stop().await;
    tokio::time::sleep(SETTLE).await;
    let again = h2_upstream_at("second", endpoint);
    let got = get(addr, "grpc.test", "/after-restart").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.body, "backend=second\npath=/after-restart\nlen=0\n");
    assert_eq!(again.accepted(), 1);
    let reply = exchange(
        &h2c(addr).await,
        grpc_request("grpc.test", "/svc.S/Call"),
        vec![grpc_frame(b"ping")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, grpc_frame(b"hello from second"));
    assert_eq!(again.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_breaks_under_a_request_resends_it_only_when_safe() {
    let (up, _proxy, addr) = h2_scene("crashy").await;
    let got = get(addr, "grpc.test", "/warm").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(up.accepted(), 1);

    // A GET (idempotent, no body) on the connection that breaks is sent again on a new one.
    up.state.crashes.store(1, Ordering::SeqCst);
    let got = get(addr, "grpc.test", "/a/Crash").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(got.body, "backend=crashy\npath=/a/Crash\nlen=0\n");
    assert_eq!(
        up.accepted(),
        2,
        "the request went again on a second connection"
    );

    // A POST might have been acted upon: it is answered 502, not repeated.
    up.state.crashes.store(1, Ordering::SeqCst);
    let client = h2c(addr).await;
    let reply = exchange(
        &client,
        grpc_request("grpc.test", "/svc.S/Crash"),
        vec![grpc_frame(b"once")],
    )
    .await;
    reply.assert_grpc_error("14", "502 Bad Gateway");
    assert!(
        up.seen().iter().all(|s| s.method != http::Method::POST),
        "{:?}",
        up.seen()
    );
    assert_eq!(up.accepted(), 2, "no second attempt");

    // Resending is bounded: an endpoint that breaks every connection gets 502.
    up.state.crashes.store(10, Ordering::SeqCst);
    let got = get(addr, "grpc.test", "/b/Crash").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.body);
    assert_eq!(up.accepted(), 5, "the first try and two resends");

    // A PUT may be repeated: its body is sent again whole on a new connection.
    up.state.crashes.store(1, Ordering::SeqCst);
    let put = http::Request::builder()
        .method("PUT")
        .uri("http://grpc.test/c/Crash")
        .body(())
        .expect("request");
    let reply = exchange(&client, put, message_chunks(20_000)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "backend=crashy\npath=/c/Crash\nlen=20005\n");
    assert_eq!(up.accepted(), 7, "the broken connection and a new one");
}

/// A gRPC message of `n` bytes, sent in chunks of 8 KiB.
fn message_chunks(n: usize) -> Vec<Bytes> {
    let message = grpc_frame(&vec![b'm'; n]);
    (0..message.len())
        .step_by(8192)
        .map(|at| message.slice(at..message.len().min(at + 8192)))
        .collect()
}

/// The bytes of `chunks` in one piece.
fn joined(chunks: &[Bytes]) -> Bytes {
    Bytes::from(chunks.concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_an_endpoint_refuses_go_again_with_their_body_if_it_was_kept() {
    let (up, _proxy, addr) = h2_scene("refusing").await;
    let client = h2c(addr).await;
    let call = |sent: Vec<Bytes>| {
        let client = client.clone();
        async move { exchange(&client, grpc_request("grpc.test", "/svc.S/Refuse"), sent).await }
    };

    // Refused at once (a POST): sent again, on the same connection, body and all.
    up.state.refusals.store(1, Ordering::SeqCst);
    let sent = message_chunks(10_000);
    let reply = call(sent.clone()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.trailer("grpc-status"), Some("0"));
    assert_eq!(up.state.refused.load(Ordering::SeqCst), 1);
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, joined(&sent));
    assert_eq!(
        up.accepted(),
        1,
        "REFUSED_STREAM leaves the connection usable"
    );

    // Refused halfway through its body: the part already sent goes again, then the rest.
    up.state.refuse_after.store(20_000, Ordering::SeqCst);
    up.state.refusals.store(1, Ordering::SeqCst);
    let sent = message_chunks(40_000);
    let reply = call(sent.clone()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(up.state.refused.load(Ordering::SeqCst), 2);
    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].body, joined(&sent));

    // Refused after more than the proxy keeps for a replay (64 KiB) had been sent: 502.
    up.state.refuse_after.store(80_000, Ordering::SeqCst);
    up.state.refusals.store(1, Ordering::SeqCst);
    let reply = call(message_chunks(100_000)).await;
    reply.assert_grpc_error("14", "502 Bad Gateway");
    assert_eq!(up.state.refused.load(Ordering::SeqCst), 3);
    assert_eq!(up.seen().len(), 2, "not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_an_endpoint_declines_with_goaway_goes_again_on_a_new_connection() {
    let (up, _proxy, addr) = h2_scene("draining").await;
    up.state.goaway_connections.store(1, Ordering::SeqCst);
    let client = h2c(addr).await;
    let sent = message_chunks(10_000);
    let reply = exchange(
        &client,
        grpc_request("grpc.test", "/svc.S/Drain"),
        sent.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.trailer("grpc-status"), Some("0"));
    assert_eq!(
        up.accepted(),
        2,
        "the connection that went away, then a new one"
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, http::Method::POST);
    assert_eq!(seen[0].body, joined(&sent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_speak_http2_to_h2_services() {
    let good = h2_upstream("h2-only").await;
    // An endpoint that speaks HTTP/1.1 only: an HTTP/2 check of it fails.
    let old = upstream("http1-only").await;
    let mut svc = h2_service("g", &[good.addr, old.addr]);
    svc.active_health = ActiveHealth {
        path: Some("/healthz".into()),
        interval_ms: 100,
        timeout_ms: 100,
        ..ActiveHealth::default()
    };
    let proxy = start(h2_config(vec![("grpc.test", svc)]));
    endpoint_states(proxy.metrics_addr.expect("metrics"), "default/g:80", 1, 1).await;
    for c in &good.checks("/healthz") {
        assert_eq!(c.version, http::Version::HTTP_2);
        assert_eq!(c.method, http::Method::GET);
        assert_eq!(c.header("user-agent"), Some("xlb-health-check"));
    }
    let before = old.hits();
    for i in 0..10 {
        let got = get(
            proxy.http_addr.expect("http"),
            "grpc.test",
            &format!("/r{i}"),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert!(got.body.starts_with("backend=h2-only\n"), "{}", got.body);
    }
    assert_eq!(
        old.hits(),
        before,
        "the endpoint that failed its check got no request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_take_out_endpoints_that_are_not_serving() {
    let a = h2_upstream("a").await;
    let b = h2_upstream("b").await;
    b.set_health(2); // NOT_SERVING
    let mut svc = h2_service("g", &[a.addr, b.addr]);
    svc.active_health = ActiveHealth {
        grpc_service: Some("demo.Greeter".into()),
        interval_ms: 100,
        timeout_ms: 100,
        unhealthy_threshold: 1,
        healthy_threshold: 1,
        ..ActiveHealth::default()
    };
    let proxy = start(h2_config(vec![("grpc.test", svc)]));
    let metrics_addr = proxy.metrics_addr.expect("metrics");
    let states =
        |available, failed| endpoint_states(metrics_addr, "default/g:80", available, failed);
    states(1, 1).await;
    for c in &a.checks("/grpc.health.v1.Health/Check") {
        assert_eq!(c.version, http::Version::HTTP_2);
        assert_eq!(c.method, http::Method::POST);
        assert_eq!(c.header("content-type"), Some("application/grpc"));
        assert_eq!(c.header("te"), Some("trailers"));
        assert_eq!(c.header("user-agent"), Some("xlb-health-check"));
        // HealthCheckRequest { service: "demo.Greeter" } in one gRPC frame.
        assert_eq!(&c.body[..], b"\0\0\0\0\x0e\x0a\x0cdemo.Greeter");
    }
    let addr = proxy.http_addr.expect("http");
    for i in 0..10 {
        let got = get(addr, "grpc.test", &format!("/r{i}")).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert!(got.body.starts_with("backend=a\n"), "{}", got.body);
    }

    b.set_health(1); // SERVING again: back in.
    states(2, 0).await;
    a.set_health(0); // The health service is gone (grpc-status 12): out.
    states(1, 1).await;
    let got = get(addr, "grpc.test", "/after").await;
    assert!(got.body.starts_with("backend=b\n"), "{}", got.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_to_an_unreachable_endpoint_go_to_another() {
    let live = h2_upstream("live").await;
    let mut svc = h2_service("g", &[dead_address().await, live.addr]);
    // No ejection, so round robin keeps offering the dead endpoint.
    svc.health.consecutive_failures = 0;
    let proxy = start(h2_config(vec![("grpc.test", svc)]));
    let client = h2c(proxy.http_addr.expect("http")).await;
    for i in 0..4 {
        let reply = exchange(
            &client,
            grpc_request("grpc.test", "/svc.S/Call"),
            vec![grpc_frame(format!("call {i}").as_bytes())],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}");
        assert_eq!(reply.body, grpc_frame(b"hello from live"), "call {i}");
    }
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    assert!(
        m.contains("xlb_proxy_upstream_errors_total{upstream=\"default/g:80\"} 4\n"),
        "each call met the dead endpoint first (a call and its retry take a turn each): {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_end_with_their_head_are_framed_for_http11_clients() {
    let up = h2_upstream("heads").await;
    let proxy = start(h2_config(vec![("grpc.test", h2_service("g", &[up.addr]))]));
    // Pipelined on one connection: the second answer parses only if the first is framed right.
    let out = raw(
        proxy.http_addr.expect("http"),
        b"GET /a/NoContent HTTP/1.1\r\nHost: grpc.test\r\n\r\n\
          GET /b/Empty HTTP/1.1\r\nHost: grpc.test\r\n\r\n\
          GET /c HTTP/1.1\r\nHost: grpc.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let heads: Vec<&str> = out.split("\r\n\r\n").collect();
    assert!(heads.len() >= 3, "{out:?}");
    assert!(heads[0].starts_with("HTTP/1.1 204 "), "{out:?}");
    assert!(
        !heads[0].to_ascii_lowercase().contains("content-length"),
        "no Content-Length in a 204 (RFC 9110 §8.6): {out:?}"
    );
    assert!(heads[1].starts_with("HTTP/1.1 200 "), "{out:?}");
    assert!(
        heads[1].to_ascii_lowercase().contains("content-length: 0"),
        "an empty 200 says so, or the client would wait for the connection to close: {out:?}"
    );
    assert!(heads[2].starts_with("HTTP/1.1 200 "), "{out:?}");
    assert!(heads[3].contains("backend=heads\npath=/c\n"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_to_h2_services_get_501() {
    let (up, _proxy, addr) = h2_scene("g5").await;
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let err = within(
        "ws handshake",
        tokio_tungstenite::client_async("ws://grpc.test/chat", tcp),
    )
    .await
    .expect_err("no upgrade over HTTP/2");
    assert!(err.to_string().contains("501"), "{err}");
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // Ordinary requests to the Service still work.
    assert_eq!(get(addr, "grpc.test", "/chat").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_h2_endpoint_is_a_502() {
    let mut svc = h2_service("g", &[dead_address().await]);
    svc.health.consecutive_failures = 0;
    let proxy = start(h2_config(vec![("grpc.test", svc)]));
    let addr = proxy.http_addr.expect("http");
    let got = get(addr, "grpc.test", "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        got.body, "502 Bad Gateway\n",
        "error pages say nothing about internals"
    );
    let reply = exchange(
        &h2c(addr).await,
        grpc_request("grpc.test", "/svc.S/Call"),
        vec![grpc_frame(b"ping")],
    )
    .await;
    reply.assert_grpc_error("14", "502 Bad Gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_h2_bodies_over_the_route_limit_get_413() {
    let up = h2_upstream("g7").await;
    let mut cfg = h2_config(vec![("grpc.test", h2_service("g", &[up.addr]))]);
    cfg.ingresses[0].annotations =
        BTreeMap::from([(ANNOTATION_MAX_BODY.to_owned(), "1024".to_owned())]);
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http");
    let post = |path: &str| {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://grpc.test{path}"))
            .body(())
            .expect("request")
    };
    let chunks = |n: usize, size: usize| (0..n).map(|_| Bytes::from(vec![3u8; size])).collect();

    // Under the limit, streamed without content-length: forwarded in full.
    let client = h2c(addr).await;
    let reply = exchange(&client, post("/small"), chunks(2, 500)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "backend=g7\npath=/small\nlen=1000\n");

    // Over it, streamed without content-length: 413 once the stream passes the limit.
    let client = h2c(addr).await;
    let resp = send_h2(&client, post("/big"), chunks(8, 512)).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Over it, declared: 413.
    let client = h2c(addr).await;
    let mut req = post("/declared");
    req.headers_mut()
        .insert("content-length", http::HeaderValue::from_static("2000"));
    let resp = send_h2(&client, req, vec![Bytes::from(vec![4u8; 2000])]).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let seen = up.seen();
    assert!(
        seen.iter().all(|s| s.body_len <= 1024),
        "no oversized body completed upstream: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| s.target != "/declared"),
        "a declared oversized body is refused before any upstream: {seen:?}"
    );
    eprintln!(
        "upstream saw {} reset bodies",
        up.state.body_errors.load(Ordering::SeqCst)
    );
}

#[test]
fn protocol_is_spelled_h2_or_http1_in_toml() {
    let toml = |protocol: &str| {
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nmetrics = \"off\"\n\n\
             [[services]]\nname = \"grpc\"\nport = 80\nendpoints = [\"127.0.0.1:50051\"]\n{protocol}\n"
        )
    };
    let parse = |text: String| ProxyConfig::from_toml_str(&text, "test");
    assert_eq!(
        parse(toml("protocol = \"h2\"")).expect("h2").services[0].protocol,
        UpstreamProtocol::H2
    );
    assert_eq!(
        parse(toml("protocol = \"http1\"")).expect("http1").services[0].protocol,
        UpstreamProtocol::Http1
    );
    assert_eq!(
        parse(toml("")).expect("default").services[0].protocol,
        UpstreamProtocol::Http1
    );
    assert!(parse(toml("protocol = \"h3\"")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_deadline_longer_than_the_response_timeout_is_waited_for() {
    let up = h2_upstream("slow").await;
    let mut cfg = h2_config(vec![("grpc.test", h2_service("g", &[up.addr]))]);
    cfg.timeouts.upstream_response_ms = 200;
    let proxy = start(cfg);
    let client = h2c(proxy.http_addr.expect("http")).await;
    let call = |deadline: Option<&str>| {
        let mut req = grpc_request("grpc.test", "/svc.S/Slow");
        if let Some(d) = deadline {
            req.headers_mut().insert(
                "grpc-timeout",
                http::HeaderValue::from_str(d).expect("value"),
            );
        }
        exchange(&client, req, vec![grpc_frame(b"watch")])
    };

    // No deadline: the head is late for upstream_response_ms.
    let reply = call(None).await;
    reply.assert_grpc_error("14", "504 Gateway Timeout");
    // The client gave the call 10 s: the proxy waits for the head.
    let reply = call(Some("10S")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.trailer("grpc-status"), Some("0"));
    // A deadline shorter than upstream_response_ms or malformed changes nothing.
    for deadline in ["50m", "10s", "123456789S"] {
        call(Some(deadline))
            .await
            .assert_grpc_error("14", "504 Gateway Timeout");
    }
    let seen = up.seen();
    assert!(
        seen.iter().any(|s| s.header("grpc-timeout") == Some("10S")),
        "the deadline goes on to the endpoint: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_open_when_an_endpoint_limits_its_streams() {
    let (up, _proxy, addr) = h2_scene("limited").await;
    up.state.max_streams.store(4, Ordering::SeqCst);
    // 20 calls the endpoint holds until all have arrived, 4 streams per connection: without
    // more connections 16 would wait for a stream forever.
    calls_together(addr).await;
    assert_eq!(up.accepted(), TOGETHER / 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_sets_no_stream_limit_takes_120_calls_on_one_connection() {
    let (up, _proxy, addr) = h2_scene("unlimited").await;
    // An HTTP/2 client keeps to 100 streams until the server's SETTINGS arrive; this server
    // states no limit, so once they have, one connection carries them all.
    let replies = held_calls(addr, CROWD, "/svc.S/Crowd").await;
    assert_eq!(replies.len(), CROWD);
    assert_eq!(up.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_errors_reach_grpc_clients_as_grpc_status() {
    let up = h2_upstream("g").await;
    let mut cfg = h2_config(vec![
        ("grpc.test", h2_service("g", &[up.addr])),
        ("empty.test", h2_service("empty", &[])),
    ]);
    cfg.ingresses[0].annotations =
        BTreeMap::from([(ANNOTATION_MAX_BODY.to_owned(), "1024".to_owned())]);
    let proxy = start(cfg);
    let client = h2c(proxy.http_addr.expect("http")).await;
    let call =
        |host: &str, body: Vec<Bytes>| exchange(&client, grpc_request(host, "/svc.S/Call"), body);

    // No route (404 → UNIMPLEMENTED), no endpoint (503 → UNAVAILABLE), a message over the
    // route's body limit (413 → RESOURCE_EXHAUSTED).
    call("nowhere.test", vec![grpc_frame(b"x")])
        .await
        .assert_grpc_error("12", "404 Not Found");
    call("empty.test", vec![grpc_frame(b"x")])
        .await
        .assert_grpc_error("14", "503 Service Unavailable");
    call("grpc.test", message_chunks(4096))
        .await
        .assert_grpc_error("8", "413 Content Too Large");
    // A call that reaches the endpoint gets its answer; the endpoint saw only that one.
    let reply = call("grpc.test", vec![grpc_frame(b"x")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.trailer("grpc-status"), Some("0"));
    assert_eq!(up.seen().len(), 1);

    // Other HTTP/2 requests keep the plain error page.
    let plain = http::Request::builder()
        .uri("http://empty.test/")
        .body(())
        .expect("request");
    let reply = exchange(&client, plain, Vec::new()).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body, "503 Service Unavailable\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stalls_past_the_response_timeout_is_cut() {
    let up = h2_upstream("g").await;
    let mut cfg = h2_config(vec![("grpc.test", h2_service("g", &[up.addr]))]);
    cfg.timeouts.upstream_response_ms = READ_TIMEOUT_MS;
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http");
    let client = h2c(addr).await;
    let call = |method: &str, deadline: Option<&str>| {
        let mut req = grpc_request("grpc.test", method);
        if let Some(d) = deadline {
            req.headers_mut().insert(
                "grpc-timeout",
                http::HeaderValue::from_str(d).expect("value"),
            );
        }
        exchange(&client, req, vec![grpc_frame(b"watch")])
    };
    let message = grpc_frame(b"hello from g");
    let state = up.state.clone();
    let reset = |n| {
        let state = state.clone();
        within("the endpoint's stream reset", async move {
            while state.answers_reset.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Each gap shorter than the timeout, the whole stream longer: it arrives whole.
    let reply = call("/svc.S/Drip", None).await;
    assert_eq!(reply.body, joined(&vec![message.clone(); DRIP_MESSAGES]));
    assert_eq!(reply.trailer("grpc-status"), Some("0"));

    // A pause longer than the timeout: the call ends after the first message with
    // UNAVAILABLE, as for a late head, and the endpoint's stream is reset.
    let reply = call("/svc.S/Pause", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, message);
    assert_eq!(reply.trailer("grpc-status"), Some("14"), "{reply:?}");
    assert_eq!(reply.trailer("grpc-message"), Some("504 Gateway Timeout"));
    reset(1).await;

    // The client's deadline covers the pause: the call completes.
    let reply = call("/svc.S/Pause", Some("10S")).await;
    assert_eq!(reply.body, joined(&[message.clone(), message.clone()]));
    assert_eq!(reply.trailer("grpc-status"), Some("0"));

    // A request that is not a gRPC call gets its stream reset after the first message.
    let plain = http::Request::builder()
        .uri("http://grpc.test/svc.S/Pause")
        .body(())
        .expect("request");
    let (parts, mut recv) = send_h2(&client, plain, Vec::new()).await.into_parts();
    assert_eq!(parts.status, StatusCode::OK);
    let mut received = Vec::new();
    let end = loop {
        match within("h2 body", recv.data()).await {
            Some(Ok(chunk)) => {
                let _ = recv.flow_control().release_capacity(chunk.len());
                received.extend_from_slice(&chunk);
            }
            other => break other,
        }
    };
    assert_eq!(
        received, b"backend=g\npath=/svc.S/Pause\nlen=0\n",
        "the first part only"
    );
    assert!(
        matches!(end, Some(Err(_))),
        "a cut body must not look complete: {end:?}"
    );
    reset(2).await;

    assert_upstream_errors(&proxy, "default/g:80", 2, "each stalled body counts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streams_are_timed_per_pause_not_as_a_whole() {
    let up = h2_upstream("g").await;
    let mut cfg = h2_config(vec![("grpc.test", h2_service("g", &[up.addr]))]);
    cfg.timeouts.upstream_response_ms = READ_TIMEOUT_MS;
    cfg.timeouts.request_body_ms = READ_TIMEOUT_MS;
    let proxy = start(cfg);
    let client = h2c(proxy.http_addr.expect("http")).await;
    // A client stream of `messages`, DRIP_GAP apart, then its end or (with `stall`) nothing
    // more until the answer comes.
    let upload = |messages: usize, stall: bool| {
        let client = client.clone();
        async move {
            let mut c = within("h2 ready", client.ready()).await.expect("ready");
            let (resp, mut send) = c
                .send_request(grpc_request("grpc.test", "/svc.S/Upload"), false)
                .expect("send request");
            for i in 0..messages {
                if i > 0 {
                    tokio::time::sleep(DRIP_GAP).await;
                }
                send.send_data(grpc_frame(&[b'm'; 100]), false)
                    .expect("send message");
            }
            if !stall {
                send.send_data(Bytes::new(), true).expect("end of stream");
            }
            let reply = read_reply(within("h2 response", resp).await.expect("response")).await;
            drop(send);
            reply
        }
    };

    // Three times as long as either timeout, never pausing for as long: the endpoint gets
    // every message and answers.
    let reply = upload(DRIP_MESSAGES * 2, false).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.trailer("grpc-status"), Some("0"), "{reply:?}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, DRIP_MESSAGES * 2 * 105);

    // A client that stops sending: 408, as gRPC's HTTP mapping gives it (UNKNOWN), and the
    // endpoint's stream is reset.
    upload(2, true)
        .await
        .assert_grpc_error("2", "408 Request Timeout");
    within("the endpoint saw the request body fail", async {
        while up.state.body_errors.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
