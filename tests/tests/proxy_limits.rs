//! Every timeout and limit of `xlb proxy`, and malformed requests. Timeouts are configured
//! short and only bounded from above (a closed connection must be observed within STEP):
//! nothing here measures speed.

#[path = "proxy_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::StatusCode;
use lb_userspace::proxy::config::{ANNOTATION_MAX_BODY, PathType::*, ProxyConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn limited_proxy(
    up: &Upstream,
    tweak: impl FnOnce(&mut ProxyConfig),
) -> lb_userspace::proxy::ProxyHandle {
    let mut cfg = base_config();
    cfg.services = vec![service("up", &[up.addr])];
    let mut ing = ingress("i", vec![(Some("l.test"), vec![path("/", Prefix, "up")])]);
    ing.annotations = BTreeMap::from([(ANNOTATION_MAX_BODY.to_owned(), "1024".to_owned())]);
    cfg.ingresses = vec![ing];
    cfg.limits.max_header_bytes = 4096;
    tweak(&mut cfg);
    start(cfg)
}

fn tracing_free_note(e: &hyper::Error) {
    eprintln!("h2 refused the oversized header block: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |_| {}).await;
    let addr = proxy.http_addr.expect("http");
    let mut req = get_req("l.test", "/");
    req.headers_mut()
        .insert("x-big", "a".repeat(8000).parse().expect("value"));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h1(tcp).await;
    assert_eq!(
        send1(&mut c, req).await.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    // HTTP/2 (h2c): the same limit.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h2(tcp).await;
    let mut req = hyper::Request::builder()
        .uri("http://l.test/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    req.headers_mut()
        .insert("x-big", "a".repeat(8000).parse().expect("value"));
    match c.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        // h2 may refuse the stream outright; either way it is not forwarded (hits below).
        Err(e) => tracing_free_note(&e),
    }
    // Just under the limit passes.
    let mut req = get_req("l.test", "/");
    req.headers_mut()
        .insert("x-big", "a".repeat(3000).parse().expect("value"));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h1(tcp).await;
    assert_eq!(send1(&mut c, req).await.status, StatusCode::OK);
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |_| {}).await;
    let addr = proxy.http_addr.expect("http");
    let post = |body: Vec<u8>| {
        hyper::Request::builder()
            .method("POST")
            .uri("/echo-body")
            .header("host", "l.test")
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h1(tcp).await;
    let got = send1(&mut c, post(vec![1; 1024])).await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "len=1024\n")
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h1(tcp).await;
    let got = send1(&mut c, post(vec![1; 1025])).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        up.hits(),
        1,
        "a declared oversize body is refused before any upstream"
    );

    // Chunked, no Content-Length: refused once the stream passes the limit.
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = (0..8)
        .map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![2u8; 512]))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/echo-body")
        .header("host", "l.test")
        .body(body)
        .expect("request");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let resp = within("chunked upload", s.send_request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_headers_are_cut_off() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |c| c.timeouts.request_header_ms = 300).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.http_addr.expect("http"))
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: l.test\r\nX-Slow: ")
        .await
        .expect("write");
    let mut buf = Vec::new();
    within("slowloris close", tcp.read_to_end(&mut buf))
        .await
        .expect("read");
    assert!(!String::from_utf8_lossy(&buf).contains("200"), "{buf:?}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |c| {
        c.timeouts.idle_ms = 300;
        c.timeouts.request_header_ms = 300;
    })
    .await;
    let addr = proxy.http_addr.expect("http");
    // HTTP/1.1: answer, then close once idle.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: l.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    within("h1 idle close", tcp.read_to_end(&mut buf))
        .await
        .expect("read");
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    // HTTP/2: GOAWAY once no stream has been active for idle_ms.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut c, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    let conn = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("http://l.test/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send2(&mut c, req).await.status, StatusCode::OK);
    let ended = within("h2 idle close", conn).await.expect("conn task");
    assert!(ended.is_ok(), "graceful close: {ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstreams_get_504_and_unreachable_ones_502() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |c| c.timeouts.upstream_response_ms = 200).await;
    let addr = proxy.http_addr.expect("http");
    assert_eq!(
        get(addr, "l.test", "/sleep/3000").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(get(addr, "l.test", "/sleep/0").await.status, StatusCode::OK);
    drop(proxy);

    // Connect timeout: a listener whose accept queue is full drops further SYNs.
    let blackhole =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    blackhole
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into(),
        )
        .expect("bind");
    blackhole.listen(0).expect("listen");
    let hole = blackhole
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        // Some of these complete into the queue, the rest hang in SYN_SENT; both fill it.
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(hole),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let mut cfg = base_config();
    cfg.timeouts.connect_ms = 200;
    cfg.services = vec![service("hole", &[hole])];
    cfg.ingresses = vec![ingress("h", vec![(None, vec![path("/", Prefix, "hole")])])];
    let proxy = start(cfg);
    let got = get(proxy.http_addr.expect("http"), "h.test", "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        got.body, "502 Bad Gateway\n",
        "error pages say nothing about internals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_may_wait_longer_for_its_response_head_than_the_proxy_default() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |c| {
        c.timeouts.upstream_response_ms = 200;
        let mut patient = service("patient", &[up.addr]);
        patient.timeouts.response_ms = Some(10_000);
        c.services.push(patient);
        c.ingresses.push(ingress(
            "p",
            vec![(Some("p.test"), vec![path("/", Prefix, "patient")])],
        ));
    })
    .await;
    let addr = proxy.http_addr.expect("http");
    // The same slow endpoint: 504 through the Service on the proxy's 200 ms, an answer
    // through the one that waits 10 s.
    assert_eq!(
        get(addr, "l.test", "/sleep/800").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    let got = get(addr, "p.test", "/sleep/800").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_reach_upstream() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |_| {}).await;
    let addr = proxy.http_addr.expect("http");
    let cases: [&[u8]; 7] = [
        b"GARBAGE\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: l.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: l.test\r\nBad Header: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: l.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: l.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: l.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: l.test\r\nTransfer-Encoding: gzip\r\n\r\n",
    ];
    for raw_req in cases {
        let resp = raw(addr, raw_req).await;
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "{:?} -> {resp:?}",
            String::from_utf8_lossy(raw_req)
        );
    }
    // Smuggling attempt after a clean request on the same connection.
    let resp = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: l.test\r\nContent-Length: 4\r\n\r\nbodyPOST / HTTP/1.1\r\nHost: l.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("HTTP/1.1 400"), "{resp}");
    assert_eq!(up.hits(), 1, "only the clean request was forwarded");
    // Missing Host on HTTP/1.1.
    let resp = raw(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_limit_is_advertised_and_rapid_reset_floods_are_cut_off() {
    let up = upstream("up").await;
    let proxy = limited_proxy(&up, |c| {
        c.limits.h2_max_concurrent_streams = 7;
        c.limits.h2_max_pending_reset_streams = 20;
    })
    .await;
    let addr = proxy.http_addr.expect("http");

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = within("h2 handshake", h2::client::handshake(tcp))
        .await
        .expect("h2");
    let conn = tokio::spawn(conn);
    let mut client = within("h2 ready", client.ready()).await.expect("ready");
    let req = || {
        http::Request::builder()
            .uri("http://l.test/")
            .body(())
            .expect("request")
    };
    let (resp, _) = client.send_request(req(), true).expect("send");
    assert_eq!(
        within("h2 response", resp)
            .await
            .expect("response")
            .status(),
        200
    );
    assert_eq!(
        client.current_max_send_streams(),
        7,
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );

    // Open and immediately reset streams, as fast as the connection takes them.
    let mut cut_off = false;
    for _ in 0..5_000 {
        let ready = match within("h2 ready", client.clone().ready()).await {
            Ok(c) => c,
            Err(_) => {
                cut_off = true;
                break;
            }
        };
        client = ready;
        match client.send_request(req(), false) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                cut_off = true;
                break;
            }
        }
    }
    assert!(cut_off, "5000 rapid resets were tolerated");
    let ended = within("h2 conn end", conn).await.expect("conn task");
    assert!(ended.is_err(), "GOAWAY with an error code: {ended:?}");
    // Other clients are unaffected.
    assert_eq!(get(addr, "l.test", "/").await.status, StatusCode::OK);
}

/// Chunks a `/drip` answer sends, [`DRIP_GAP`] apart: each gap is shorter than
/// [`READ_TIMEOUT_MS`], all of them together longer.
const DRIP_CHUNKS: usize = 8;
const DRIP_GAP: Duration = Duration::from_millis(80);
const READ_TIMEOUT_MS: u64 = 400;
/// The `/big` answer: far more than loopback socket buffers hold, so that a client that
/// stops reading stops the proxy reading too.
const BIG: usize = 32 << 20;

/// A raw HTTP/1.1 upstream whose answers come at a pace the path sets: `/drip` sends
/// [`DRIP_CHUNKS`] chunks of `tick\n`; `/stall` sends one chunk, then nothing until the
/// proxy closes the connection (counted in the returned counter) or 30 s pass; `/big`
/// sends [`BIG`] bytes with a Content-Length.
async fn paced_upstream() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cut = Arc::new(AtomicUsize::new(0));
    let counter = cut.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let cut = counter.clone();
            tokio::spawn(async move {
                // One request per connection is enough here: the answer says so.
                let Some(head) = read_request_head(&mut s).await else {
                    return;
                };
                let mut buf = [0u8; 1];
                let line = String::from_utf8_lossy(&head);
                let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                let chunked =
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                match path.as_str() {
                    "/drip" => {
                        let _ = s.write_all(chunked).await;
                        for _ in 0..DRIP_CHUNKS {
                            let _ = s.write_all(b"5\r\ntick\n\r\n").await;
                            tokio::time::sleep(DRIP_GAP).await;
                        }
                        let _ = s.write_all(b"0\r\n\r\n").await;
                    }
                    "/stall" => {
                        let _ = s.write_all(chunked).await;
                        let _ = s.write_all(b"6\r\nfirst\n\r\n").await;
                        let closed =
                            tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf));
                        if let Ok(Ok(0)) = closed.await {
                            cut.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    _ => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\nConnection: close\r\n\r\n"
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let block = vec![b'x'; 64 << 10];
                        for _ in 0..BIG / block.len() {
                            if s.write_all(&block).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, cut, task)
}

/// Waits until `counter` reaches `n`.
async fn reaches(what: &str, counter: &AtomicUsize, n: usize) {
    within(what, async {
        while counter.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stalls_past_the_response_timeout_is_cut() {
    let (up, cut, task) = paced_upstream().await;
    let mut cfg = one_route("p.test", "/", "paced", &[up]);
    cfg.timeouts.upstream_response_ms = READ_TIMEOUT_MS;
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http");

    // Each gap shorter than the timeout, the whole answer longer: it arrives whole.
    let got = get(addr, "p.test", "/drip").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "tick\n".repeat(DRIP_CHUNKS));

    // A body that stops: the client gets what came, then a broken body (HTTP/1.1: the
    // connection closes before the last chunk; HTTP/2: the stream is reset), and the
    // proxy lets go of the endpoint's connection.
    let stall = || get_req("p.test", "/stall");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    assert_cut(within("h1 head", h1(tcp).await.send_request(stall())).await).await;
    reaches("endpoint connection closed", &cut, 1).await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    assert_cut(within("h2 head", h2(tcp).await.send_request(stall())).await).await;
    reaches("endpoint connection closed", &cut, 2).await;

    // A client that stops reading for longer than the timeout is not the endpoint's fault:
    // the clock runs only while the proxy waits for the endpoint.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut c = h1(tcp).await;
    let resp = within("h1 head", c.send_request(get_req("p.test", "/big")))
        .await
        .expect("head");
    tokio::time::sleep(Duration::from_millis(4 * READ_TIMEOUT_MS)).await;
    let body = within("big body", resp.into_body().collect())
        .await
        .expect("the whole body");
    assert_eq!(body.to_bytes().len(), BIG);

    assert_upstream_errors(&proxy, "default/paced:80", 2, "each stalled body counts").await;
    task.abort();
}

/// Asserts an answer came with status 200 and a body that breaks off (it must not look
/// complete).
async fn assert_cut(resp: hyper::Result<hyper::Response<hyper::body::Incoming>>) {
    let resp = resp.expect("head");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within("body", resp.into_body().collect()).await;
    assert!(body.is_err(), "a cut body must not look complete: {body:?}");
}

/// A request body of `chunks` pieces of 1 KiB, `gap` apart; then its end, or with `stall`
/// nothing more for as long as the client holds it.
fn paced_body(chunks: usize, gap: Duration, stall: bool) -> StreamBody<PacedStream> {
    StreamBody::new(Box::pin(futures_util::stream::unfold(
        0,
        move |sent| async move {
            if sent == chunks {
                if stall {
                    std::future::pending::<()>().await;
                }
                return None;
            }
            if sent > 0 {
                tokio::time::sleep(gap).await;
            }
            let piece = hyper::body::Frame::data(Bytes::from(vec![b'u'; 1024]));
            Some((Ok(piece), sent + 1))
        },
    )))
}

type PacedStream = std::pin::Pin<
    Box<
        dyn futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>
            + Send,
    >,
>;

/// POSTs `body` to `/echo-body` on `p.test` over HTTP/1.1 or h2c; the answer's status and
/// body.
async fn post_paced<B>(addr: SocketAddr, http2: bool, body: B) -> (StatusCode, String)
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let req = hyper::Request::builder()
        .method("POST")
        .uri("http://p.test/echo-body")
        .header("host", "p.test")
        .body(body)
        .expect("request");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let io = hyper_util::rt::TokioIo::new(tcp);
    let resp = if http2 {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .expect("h2");
        tokio::spawn(conn);
        within("h2 upload", s.send_request(req)).await
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
        tokio::spawn(conn);
        within("h1 upload", s.send_request(req)).await
    }
    .expect("response");
    let status = resp.status();
    let body = within("answer body", resp.into_body().collect())
        .await
        .expect("answer body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_timed_per_pause_and_long_uploads_are_not_cut() {
    let up = upstream("up").await;
    let mut cfg = one_route("p.test", "/", "up", &[up.addr]);
    cfg.timeouts.request_body_ms = READ_TIMEOUT_MS;
    cfg.timeouts.upstream_response_ms = READ_TIMEOUT_MS;
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http");
    for http2 in [false, true] {
        // An upload three times as long as either timeout, never pausing for as long: the
        // endpoint gets all of it and answers.
        let got = post_paced(addr, http2, paced_body(DRIP_CHUNKS * 2, DRIP_GAP, false)).await;
        assert_eq!(
            got,
            (StatusCode::OK, format!("len={}\n", DRIP_CHUNKS * 2 * 1024)),
            "http2: {http2}"
        );
        // A client that stops sending its body: 408, and its request goes no further.
        let got = post_paced(addr, http2, paced_body(2, DRIP_GAP, true)).await;
        assert_eq!(
            got,
            (
                StatusCode::REQUEST_TIMEOUT,
                "408 Request Timeout\n".to_owned()
            ),
            "http2: {http2}"
        );
    }
    assert_eq!(
        up.hits(),
        4,
        "the cut requests reached the endpoint, unanswered"
    );

    // A small body with a Content-Length is read whole before the request goes upstream
    // (the HTTP/1.1 fast path), under the same bound per pause.
    let head = b"POST /echo-body HTTP/1.1\r\nHost: p.test\r\nContent-Length: 100\r\n\r\n";
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head).await.expect("head");
    tcp.write_all(&[b'a'; 40]).await.expect("first part");
    tokio::time::sleep(Duration::from_millis(READ_TIMEOUT_MS / 2)).await;
    tcp.write_all(&[b'b'; 60]).await.expect("rest");
    let mut answer = vec![0u8; 4096];
    let n = within("answer", tcp.read(&mut answer)).await.expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("len=100\n"), "{answer}");
    assert_eq!(up.hits(), 5);

    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head).await.expect("head");
    tcp.write_all(&[b'a'; 40]).await.expect("first part");
    let mut answer = Vec::new();
    within(
        "408, then the connection closes",
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("408 Request Timeout\n"), "{answer}");
    assert_eq!(up.hits(), 5, "a body never completed does not go upstream");
}
