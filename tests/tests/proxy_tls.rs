//! `xlb proxy` TLS termination: SNI certificate selection, default certificate, ALPN h2 and
//! http/1.1, TLS 1.2 and 1.3, HTTP→HTTPS redirects. Real rustls clients, rcgen certificates.

#[path = "proxy_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use hyper::StatusCode;
use lb_userspace::proxy::config::{
    ANNOTATION_SSL_REDIRECT, IngressTls, PathType::*, ProxyConfig, TlsSecret,
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
