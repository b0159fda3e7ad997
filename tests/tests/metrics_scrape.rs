//! The agent's `/metrics` endpoint over real loopback sockets, read by a real HTTP client
//! (hyper): the text is streamed chunked as it is encoded, arrives whole and equal to the
//! registry rendered in one piece, and a scraper that goes away mid-response neither
//! wedges the endpoint nor stops the next scrape; the probes `/healthz` and `/readyz`
//! answer without a scrape. No root needed.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use lb_userspace::metrics::{render, serve};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

/// A registry with as many series as the agent has for 50,000 backends (~3 MB of text).
fn large_registry() -> Registry {
    let family = Family::<BackendLabels, Counter>::default();
    for i in 0..50_000u32 {
        let [_, a, b, c] = i.to_be_bytes();
        family
            .get_or_create(&BackendLabels {
                backend: format!("10.{a}.{b}.{c}"),
            })
            .inc_by(u64::from(i) * 7);
    }
    let mut registry = Registry::default();
    registry.register("xlb_backend_packets", "Packets sent to a backend", family);
    registry
}

async fn get(port: u16, path: &str) -> (u16, Option<String>, String) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let coding = response
        .headers()
        .get("transfer-encoding")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a complete body")
        .to_bytes();
    (
        status,
        coding,
        String::from_utf8(body.to_vec()).expect("utf-8"),
    )
}

#[test]
fn metrics_are_streamed_whole_survive_a_scraper_that_leaves_and_probes_are_cheap() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let registry = std::sync::Arc::new(large_registry());
        let expected = render(&registry);
        assert!(expected.len() > 2_000_000, "{} bytes", expected.len());
        assert!(expected.ends_with("# EOF\n"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = tokio::spawn(serve(listener, registry.clone(), ready.clone()));

        let (status, coding, body) =
            tokio::time::timeout(Duration::from_secs(60), get(port, "/metrics"))
                .await
                .expect("a scrape within 60 s");
        assert_eq!(status, 200);
        assert_eq!(coding.as_deref(), Some("chunked"));
        assert_eq!(body.len(), expected.len());
        assert!(
            body == expected,
            "the streamed text differs from the rendered one"
        );

        // The tests' own scraper decodes the same text.
        let raw = tokio::task::spawn_blocking(move || {
            xlb_tests::agent_support::fetch_metrics(port, Duration::from_secs(60))
        })
        .await
        .expect("fetch thread");
        assert!(
            raw.as_deref() == Some(expected.as_str()),
            "fetch_metrics decoded another text"
        );

        // A scraper that reads a few bytes and goes away.
        let mut quitter = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        quitter
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("request");
        let mut head = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(60), quitter.read(&mut head))
            .await
            .expect("the first bytes within 60 s")
            .expect("read");
        assert!(head[..n].starts_with(b"HTTP/1.1 200 OK"));
        drop(quitter);

        // The endpoint still serves, whole.
        let (status, _, body) =
            tokio::time::timeout(Duration::from_secs(60), get(port, "/metrics"))
                .await
                .expect("a scrape after the quitter within 60 s");
        assert_eq!(status, 200);
        assert!(body == expected);

        let (status, _, body) = tokio::time::timeout(Duration::from_secs(60), get(port, "/other"))
            .await
            .expect("a 404 within 60 s");
        assert_eq!(status, 404);
        assert_eq!(body, "see /metrics, /healthz, /readyz\n");

        // Probes: alive at once, ready once the agent says so.
        let probe = |path: &'static str| async move {
            let (status, coding, body) =
                tokio::time::timeout(Duration::from_secs(60), get(port, path))
                    .await
                    .expect("a probe within 60 s");
            assert_eq!(coding, None, "{path} has a Content-Length");
            (status, body)
        };
        assert_eq!(probe("/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(
            probe("/readyz").await,
            (503, "not ready: no state applied yet\n".to_owned())
        );
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(probe("/readyz").await, (200, "ready\n".to_owned()));
        server.abort();
    });
}
