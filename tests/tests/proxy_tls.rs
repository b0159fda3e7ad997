//! `xlb proxy` TLS termination: SNI certificate selection, default certificate, ALPN h2 and
//! http/1.1, TLS 1.2 and 1.3, HTTP→HTTPS redirects; and TLS to upstreams: verification,
//! pooled and resumed sessions, bodies, WebSockets and health checks over it. Real rustls
//! clients and servers, rcgen certificates.

#[path = "proxy_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use hyper::StatusCode;
use lb_userspace::proxy::config::{
    ANNOTATION_SSL_REDIRECT, ActiveHealth, IngressTls, PathType::*, ProxyConfig, TlsSecret,
    UpstreamTls,
};
use rustls::version::{TLS12, TLS13};
use support::*;

struct Fixture {
    pki: Pki,
    cfg: ProxyConfig,
    _up: Upstream,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// shop.test (+ *.shop.test, inline PEM, redirecting), api.test (PEM files), and a default
/// certificate for default.test and 127.0.0.1.
async fn fixture(name: &str) -> Fixture {
    let pki = Pki::new();
    let up = upstream("up").await;
    let dir = std::env::temp_dir().join(format!("xlb-proxy-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (api_crt, api_key) = pki.leaf(&["api.test"]);
    std::fs::write(dir.join("api.crt"), api_crt).expect("write cert");
    std::fs::write(dir.join("api.key"), api_key).expect("write key");
    let (shop_crt, shop_key) = pki.leaf(&["shop.test", "*.shop.test"]);
    let (def_crt, def_key) = pki.leaf(&["default.test", "127.0.0.1"]);

    let mut cfg = base_config();
    cfg.listen.https = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listen.https_redirect_port = Some(8443);
    cfg.tls.default_secret = Some("default/fallback".into());
    cfg.secrets = vec![
        TlsSecret {
            name: "shop".into(),
            cert_pem: Some(shop_crt),
            key_pem: Some(shop_key),
            ..Default::default()
        },
        TlsSecret {
            name: "api".into(),
            cert_file: Some(dir.join("api.crt")),
            key_file: Some(dir.join("api.key")),
            ..Default::default()
        },
        TlsSecret {
            name: "fallback".into(),
            cert_pem: Some(def_crt),
            key_pem: Some(def_key),
            ..Default::default()
        },
    ];
    cfg.services = vec![service("up", &[up.addr])];
    let mut shop = ingress(
        "shop",
        vec![
            (Some("shop.test"), vec![path("/", Prefix, "up")]),
            (Some("*.shop.test"), vec![path("/", Prefix, "up")]),
        ],
    );
    shop.tls = vec![IngressTls {
        hosts: vec!["shop.test".into(), "*.shop.test".into()],
        secret_name: "shop".into(),
    }];
    shop.annotations = BTreeMap::from([(ANNOTATION_SSL_REDIRECT.to_owned(), "true".to_owned())]);
    let mut api = ingress(
        "api",
        vec![
            (Some("api.test"), vec![path("/", Prefix, "up")]),
            (None, vec![path("/", Prefix, "up")]),
        ],
    );
    api.tls = vec![IngressTls {
        hosts: vec!["api.test".into()],
        secret_name: "api".into(),
    }];
    cfg.ingresses = vec![shop, api];
    Fixture {
        pki,
        cfg,
        _up: up,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_the_certificate_with_a_default_fallback() {
    let f = fixture("sni").await;
    let proxy = start(f.cfg.clone());
    let addr = proxy.https_addr.expect("https listener");
    let client = f.pki.client(&[b"http/1.1"], &[&TLS13, &TLS12]);
    for (sni, cn) in [
        ("shop.test", "shop.test"),
        ("eu.shop.test", "shop.test"),
        ("api.test", "api.test"),
        ("default.test", "default.test"),
    ] {
        let s = tls(&client, addr, sni)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(peer_cn(&s), cn, "SNI {sni}");
        let mut c = h1(s).await;
        let got = send1(&mut c, get_req(sni, "/")).await;
        assert_eq!(got.status, StatusCode::OK, "{sni}");
        assert_eq!(got.upstream_header("x-forwarded-proto"), Some("https"));
    }
    // No SNI at all (an IP address as server name): the default certificate.
    let s = tls(&client, addr, "127.0.0.1")
        .await
        .expect("handshake without SNI");
    assert_eq!(peer_cn(&s), "default.test");
    // A name covered by no certificate fails verification on the client: the default
    // certificate was served, not some other Ingress's.
    let err = tls(&client, addr, "a.b.shop.test")
        .await
        .expect_err("wildcard is one label");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_or_http11() {
    let f = fixture("alpn").await;
    let proxy = start(f.cfg.clone());
    let addr = proxy.https_addr.expect("https listener");

    let s = tls(
        &f.pki.client(&[b"h2", b"http/1.1"], &[&TLS13]),
        addr,
        "api.test",
    )
    .await
    .expect("tls");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut c = h2(s).await;
    // Several concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let req = hyper::Request::builder()
                .uri(format!("https://api.test/s/{i}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            send2(&mut c, req).await
        }));
    }
    for t in tasks {
        let got = t.await.expect("stream task");
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.version, hyper::Version::HTTP_2);
    }
    let req = hyper::Request::builder()
        .uri("https://api.test/last")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    assert_eq!(send2(&mut c, req).await.status, StatusCode::OK);

    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let s = tls(&f.pki.client(alpn, &[&TLS13]), addr, "api.test")
            .await
            .expect("tls");
        let mut c = h1(s).await;
        let got = send1(&mut c, get_req("api.test", "/one")).await;
        assert_eq!(got.version, hyper::Version::HTTP_11);
        assert_eq!(got.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_are_offered_and_tls13_only_is_enforced() {
    let f = fixture("versions").await;
    let proxy = start(f.cfg.clone());
    let addr = proxy.https_addr.expect("https listener");
    for (v, want) in [
        (&TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let s = tls(&f.pki.client(&[b"h2"], &[v]), addr, "shop.test")
            .await
            .expect("tls");
        assert_eq!(s.get_ref().1.protocol_version(), Some(want));
        let mut c = h2(s).await;
        let req = hyper::Request::builder()
            .uri("https://shop.test/")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        assert_eq!(send2(&mut c, req).await.status, StatusCode::OK);
    }
    drop(proxy);

    let mut cfg = f.cfg.clone();
    cfg.tls.tls13_only = true;
    let proxy = start(cfg);
    let addr = proxy.https_addr.expect("https listener");
    assert!(
        tls(&f.pki.client(&[], &[&TLS12]), addr, "shop.test")
            .await
            .is_err(),
        "TLS 1.2 refused"
    );
    assert!(
        tls(&f.pki.client(&[], &[&TLS13]), addr, "shop.test")
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_redirect_sends_plain_http_to_https() {
    let f = fixture("redirect").await;
    let proxy = start(f.cfg.clone());
    let got = get(proxy.http_addr.expect("http"), "shop.test", "/cart?id=7").await;
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        got.headers.get("location").and_then(|v| v.to_str().ok()),
        Some("https://shop.test:8443/cart?id=7")
    );
    assert!(
        got.backend().is_none(),
        "a redirect is answered by the proxy"
    );
    // Ingresses without the annotation are served over plain HTTP.
    let got = get(proxy.http_addr.expect("http"), "api.test", "/").await;
    assert_eq!(got.status, StatusCode::OK);
    // Over TLS the redirecting Ingress is proxied.
    let s = tls(
        &f.pki.client(&[], &[&TLS13]),
        proxy.https_addr.expect("https"),
        "shop.test",
    )
    .await
    .expect("tls");
    let mut c = h1(s).await;
    let got = send1(&mut c, get_req("shop.test", "/cart?id=7")).await;
    assert_eq!(got.status, StatusCode::OK);
}

/// A plain-HTTP proxy routing everything to Service `s` (endpoints `endpoints`, upstream TLS
/// `tls`), one endpoint failure not ejecting anything.
fn tls_upstream_config(endpoints: &[std::net::SocketAddr], tls: UpstreamTls) -> ProxyConfig {
    let mut cfg = base_config();
    let mut svc = service("s", endpoints);
    svc.tls = tls;
    svc.health.consecutive_failures = 0;
    cfg.services = vec![svc];
    cfg.ingresses = vec![ingress("i", vec![(None, vec![path("/", Prefix, "s")])])];
    cfg
}

fn verified(pki: &Pki, server_name: Option<&str>) -> UpstreamTls {
    UpstreamTls {
        enabled: true,
        server_name: server_name.map(str::to_owned),
        ca_pem: Some(pki.ca_pem.clone()),
        ..UpstreamTls::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_are_verified_pooled_resumed_and_carry_bodies_and_websockets() {
    let pki = Pki::new();
    let (up, seen) = tls_upstream("secure", &pki, &["backend.test"]).await;
    let proxy = start(tls_upstream_config(
        &[up.addr],
        verified(&pki, Some("backend.test")),
    ));
    let addr = proxy.http_addr.expect("http");

    // One client connection: its requests share one pooled upstream session.
    let tcp = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let mut s = h1(tcp).await;
    for i in 0..10 {
        let got = send1(&mut s, get_req("app.test", &format!("/n/{i}"))).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert_eq!(got.backend(), Some("secure"));
        assert!(got.body.contains(&format!("path=/n/{i}\n")), "{}", got.body);
    }
    let first = seen.completed();
    assert_eq!(
        first,
        [(Some("backend.test".to_owned()), false)],
        "one full handshake, with SNI, for ten requests"
    );

    // A body goes through the session (hyper's path of the proxy).
    let post = hyper::Request::post("/echo-body")
        .header("host", "app.test")
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            b'x';
            100_000
        ])))
        .expect("request");
    let got = send1(&mut s, post).await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "len=100000\n")
    );

    // Concurrent requests need more sessions; they resume the first one's.
    let slow = (0..4).map(|_| get(addr, "app.test", "/sleep/300"));
    for got in futures_util::future::join_all(slow).await {
        assert_eq!(got.status, StatusCode::OK);
    }
    let all = seen.completed();
    assert!(all.len() > first.len(), "{all:?}");
    assert!(
        all[first.len()..].iter().any(|(_, resumed)| *resumed),
        "later sessions resume: {all:?}"
    );

    // A WebSocket tunnels through a TLS session of its own.
    let mut ws = websocket(addr, "ws://app.test/chat").await;
    echo_round(&mut ws, "tls-upstream", 5).await;
    assert_eq!(seen.failed.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(
        seen.completed()
            .iter()
            .all(|(sni, _)| sni.as_deref() == Some("backend.test"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_that_does_not_verify_is_a_502_and_nothing_is_sent() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let (up, seen) = tls_upstream("secure", &pki, &["backend.test", "127.0.0.1"]).await;
    // (case, upstream TLS, status, request reaches the upstream, SNI the upstream sees)
    let cases = [
        (
            "a CA the certificate does not chain to",
            verified(&stranger, Some("backend.test")),
            StatusCode::BAD_GATEWAY,
            false,
            None,
        ),
        (
            "a name the certificate does not carry",
            verified(&pki, Some("other.test")),
            StatusCode::BAD_GATEWAY,
            false,
            None,
        ),
        (
            "no name: the certificate must carry the endpoint's address",
            verified(&pki, None),
            StatusCode::OK,
            true,
            None,
        ),
        (
            "verification off: any certificate",
            UpstreamTls {
                enabled: true,
                verify: false,
                server_name: Some("unrelated.test".into()),
                ..UpstreamTls::default()
            },
            StatusCode::OK,
            true,
            Some("unrelated.test"),
        ),
    ];
    for (case, tls, status, reaches, sni) in cases {
        let proxy = start(tls_upstream_config(&[up.addr], tls));
        let (hits, handshakes) = (up.hits(), seen.completed().len());
        let got = get(proxy.http_addr.expect("http"), "app.test", "/x").await;
        assert_eq!(got.status, status, "{case}: {}", got.body);
        assert_eq!(up.hits() > hits, reaches, "{case}");
        if reaches {
            assert_eq!(
                seen.completed()[handshakes..],
                [(sni.map(str::to_owned), false)],
                "{case}"
            );
        } else {
            assert!(
                !got.body.contains("certificate") && !got.body.contains("127.0.0.1"),
                "{case}: the error page says nothing about internals: {}",
                got.body
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_speak_tls_to_tls_upstreams() {
    let pki = Pki::new();
    let (secure, seen) = tls_upstream("secure", &pki, &["backend.test"]).await;
    // An endpoint that speaks plain HTTP only: its TLS check fails.
    let plain = upstream("plain").await;
    let mut tls = verified(&pki, Some("backend.test"));
    tls.verify = true;
    let mut cfg = tls_upstream_config(&[secure.addr, plain.addr], tls);
    cfg.services[0].active_health = ActiveHealth {
        path: Some("/status/200".into()),
        interval_ms: 100,
        timeout_ms: 100,
        ..ActiveHealth::default()
    };
    let proxy = start(cfg);
    endpoint_states(proxy.metrics_addr.expect("metrics"), "default/s:80", 1, 1).await;
    assert!(secure.hits() > 0, "checks reached the TLS endpoint");
    assert_eq!(
        seen.failed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "every check came over TLS"
    );
    let before = plain.hits();
    for _ in 0..10 {
        let got = get(proxy.http_addr.expect("http"), "app.test", "/x").await;
        assert_eq!(
            (got.status, got.backend()),
            (StatusCode::OK, Some("secure"))
        );
    }
    assert_eq!(plain.hits(), before, "the failed endpoint got no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_to_endpoints_that_require_one() {
    let pki = Pki::new();
    let clients = Pki::new();
    let (up, seen) = tls_upstream_with("mtls", &pki, &["backend.test"], Some(&clients)).await;
    let (crt, key) = clients.leaf(&["xlb-proxy.test"]);
    let (stranger_crt, stranger_key) = Pki::new().leaf(&["xlb-proxy.test"]);
    let client = |secret: &str| UpstreamTls {
        client_secret: Some(format!("default/{secret}")),
        ..verified(&pki, Some("backend.test"))
    };
    // (case, upstream TLS, status)
    let cases = [
        (
            "a certificate the endpoint trusts",
            client("proxy-client"),
            StatusCode::OK,
        ),
        (
            "no certificate",
            verified(&pki, Some("backend.test")),
            StatusCode::BAD_GATEWAY,
        ),
        (
            "a certificate from another CA",
            client("stranger"),
            StatusCode::BAD_GATEWAY,
        ),
    ];
    for (case, tls, status) in cases {
        let mut cfg = tls_upstream_config(&[up.addr], tls);
        cfg.secrets = vec![
            TlsSecret {
                name: "proxy-client".into(),
                cert_pem: Some(crt.clone()),
                key_pem: Some(key.clone()),
                ..Default::default()
            },
            TlsSecret {
                name: "stranger".into(),
                cert_pem: Some(stranger_crt.clone()),
                key_pem: Some(stranger_key.clone()),
                ..Default::default()
            },
        ];
        let proxy = start(cfg);
        let hits = up.hits();
        let got = get(proxy.http_addr.expect("http"), "app.test", "/x").await;
        assert_eq!(got.status, status, "{case}: {}", got.body);
        assert_eq!(up.hits() > hits, status == StatusCode::OK, "{case}");
    }
    assert_eq!(
        *seen.client_cns.lock().expect("lock"),
        ["xlb-proxy.test"],
        "only the trusted certificate completed a handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_comes_before_the_tls_handshake() {
    use tokio::io::AsyncWriteExt as _;
    let f = fixture("proxy-protocol").await;
    let mut cfg = f.cfg.clone();
    cfg.listen.proxy_protocol = true;
    let proxy = start(cfg);
    let addr = proxy.https_addr.expect("https");
    let mut tcp = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    tcp.write_all(b"PROXY TCP4 203.0.113.8 192.0.2.1 40001 443\r\n")
        .await
        .expect("write header");
    let name = rustls::pki_types::ServerName::try_from("api.test").expect("server name");
    let s = within(
        "TLS handshake",
        f.pki.client(&[b"http/1.1"], &[&TLS13]).connect(name, tcp),
    )
    .await
    .expect("TLS handshake after the header");
    assert_eq!(peer_cn(&s), "api.test");
    let mut c = h1(s).await;
    let got = send1(&mut c, get_req("api.test", "/")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.upstream_header("x-real-ip"), Some("203.0.113.8"));
    assert_eq!(got.upstream_header("x-forwarded-for"), Some("203.0.113.8"));
    assert_eq!(got.upstream_header("x-forwarded-proto"), Some("https"));
    // A plain TLS client without the header is refused.
    assert!(
        tls(&f.pki.client(&[], &[&TLS13]), addr, "api.test")
            .await
            .is_err()
    );
}
