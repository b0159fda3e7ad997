//! Live reconfiguration: 100 configuration changes under load with zero failed requests and
//! zero dropped WebSockets; invalid configurations are rejected; the config file is watched.

#[path = "proxy_support.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use lb_userspace::proxy::config::{Balance, IngressTls, PathType::*, ProxyConfig, TlsSecret};
use rustls::version::TLS13;
use support::*;

/// Change number `i`: endpoints, balancing policy, an extra route and the certificate vary.
fn generation(i: usize, ups: &[std::net::SocketAddr], certs: &[(String, String)]) -> ProxyConfig {
    let mut cfg = base_config();
    let eps: Vec<_> = match i % 3 {
        0 => ups.to_vec(),
        1 => vec![ups[0]],
        _ => vec![ups[1]],
    };
    let mut s = service("app", &eps);
    s.balance = [Balance::RoundRobin, Balance::LeastRequest, Balance::Random][i % 3];
    cfg.listen.https = Some("127.0.0.1:0".parse().expect("addr"));
    let (crt, key) = certs[i % certs.len()].clone();
    cfg.secrets = vec![TlsSecret {
        name: "app".into(),
        cert_pem: Some(crt),
        key_pem: Some(key),
        ..Default::default()
    }];
    cfg.services = vec![s, service("ws", &ups[..1])];
    let mut ing = ingress(
        "app",
        vec![(
            Some("app.test"),
            vec![
                path("/", Prefix, "app"),
                path(&format!("/gen/{i}"), Exact, "app"),
                path("/ws", Prefix, "ws"),
            ],
        )],
    );
    ing.tls = vec![IngressTls {
        hosts: vec!["app.test".into()],
        secret_name: "app".into(),
    }];
    cfg.ingresses = vec![ing];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_reloads_under_load_drop_nothing() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let ups = [a.addr, b.addr];
    let pki = Pki::new();
    let certs = vec![pki.leaf(&["app.test"]), pki.leaf(&["app.test"])];
    let proxy = start(generation(0, &ups, &certs));
    let http = proxy.http_addr.expect("http");
    let https = proxy.https_addr.expect("https");

    // Open WebSockets first; they must survive every change.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(websocket(http, "ws://app.test/ws").await);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    // Keep-alive HTTP/1.1 clients, a fresh-connection client, and HTTP/2 over TLS.
    for k in 0..3 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
            let mut c = h1(tcp).await;
            for n in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let got = send1(&mut c, get_req("app.test", &format!("/load/{k}/{n}"))).await;
                if got.status == StatusCode::OK {
                    &ok
                } else {
                    &failed
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            for n in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let got = get(http, "app.test", &format!("/fresh/{n}")).await;
                if got.status == StatusCode::OK {
                    &ok
                } else {
                    &failed
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = pki.client(&[b"h2"], &[&TLS13]);
        load.push(tokio::spawn(async move {
            let s = tls(&client, https, "app.test").await.expect("tls");
            let mut c = h2(s).await;
            for n in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = hyper::Request::builder()
                    .uri(format!("https://app.test/h2/{n}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("request");
                let got = send2(&mut c, req).await;
                if got.status == StatusCode::OK {
                    &ok
                } else {
                    &failed
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    for i in 1..=100 {
        proxy
            .apply(generation(i, &ups, &certs))
            .unwrap_or_else(|e| panic!("change {i}: {e}"));
        // The route added by this change is live at once.
        assert_eq!(
            get(http, "app.test", &format!("/gen/{i}")).await.status,
            StatusCode::OK,
            "change {i}"
        );
        if i % 10 == 0 {
            for (j, ws) in sockets.iter_mut().enumerate() {
                echo_round(ws, &format!("change {i} socket {j}"), 1).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        within("load task", t).await.expect("load task panicked");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok >= 100, "load ran ({ok} requests)");
    for ws in &mut sockets {
        within("ws close", ws.close(None))
            .await
            .expect("close after reloads");
    }
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    assert!(
        m.contains("xlb_proxy_config_reloads_total{result=\"ok\"} 100"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_rejected_and_the_old_one_kept() {
    let up = upstream("up").await;
    let mut cfg = base_config();
    cfg.services = vec![service("up", &[up.addr])];
    cfg.ingresses = vec![ingress(
        "i",
        vec![(Some("a.test"), vec![path("/", Prefix, "up")])],
    )];
    let proxy = start(cfg.clone());
    let http = proxy.http_addr.expect("http");

    let mut bad = cfg.clone();
    bad.ingresses[0].rules[0].paths[0].backend.service = "missing".into();
    let err = proxy.apply(bad).expect_err("dangling backend");
    assert!(
        err.to_string()
            .contains("ingresses[0].rules[0].paths[0].backend"),
        "{err}"
    );

    let mut bad_cert = cfg.clone();
    bad_cert.listen.https = Some("127.0.0.1:0".parse().expect("addr"));
    bad_cert.tls.default_secret = Some("default/broken".into());
    bad_cert.secrets = vec![TlsSecret {
        name: "broken".into(),
        cert_pem: Some("not a certificate".into()),
        key_pem: Some("not a key".into()),
        ..Default::default()
    }];
    let err = proxy.apply(bad_cert).expect_err("unparsable certificate");
    assert!(err.to_string().contains("default/broken"), "{err}");

    assert_eq!(
        get(http, "a.test", "/").await.status,
        StatusCode::OK,
        "old config still serves"
    );
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    assert!(
        m.contains("xlb_proxy_config_reloads_total{result=\"rejected\"} 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_changes_are_watched_and_applied() {
    let up = upstream("up").await;
    let dir = std::env::temp_dir().join(format!("xlb-proxy-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("proxy.yaml");
    let yaml = |p: &str| {
        format!(
            "listen: {{ http: \"127.0.0.1:0\", metrics: \"off\", workers: 1 }}\n\
             services:\n  - {{ name: up, port: 80, endpoints: [\"{}\"] }}\n\
             ingresses:\n  - name: i\n    rules:\n      - host: w.test\n        paths:\n          - {{ path: {p}, path_type: Exact, backend: {{ service: up, port: 80 }} }}\n",
            up.addr
        )
    };
    std::fs::write(&file, yaml("/one")).expect("write config");
    let proxy = start(ProxyConfig::load(&file).expect("YAML config loads"));
    let http = proxy.http_addr.expect("http");
    let _watch = lb_userspace::proxy::watch::watch(file.clone(), proxy.reloader()).expect("watch");
    assert_eq!(get(http, "w.test", "/one").await.status, StatusCode::OK);
    assert_eq!(
        get(http, "w.test", "/two").await.status,
        StatusCode::NOT_FOUND
    );

    // An invalid edit is ignored...
    std::fs::write(&file, "listen: [").expect("write broken config");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(http, "w.test", "/one").await.status, StatusCode::OK);
    // ...and a valid one is applied (editors replace the file: write + rename).
    let tmp = dir.join(".proxy.yaml.tmp");
    std::fs::write(&tmp, yaml("/two")).expect("write config");
    std::fs::rename(&tmp, &file).expect("rename");
    let pause = Duration::from_millis(50);
    let applied = answers_within(http, "w.test", "/two", StatusCode::OK, 100, pause).await;
    assert!(applied, "the watched change was not applied within 5 s");
    assert_eq!(
        get(http, "w.test", "/one").await.status,
        StatusCode::NOT_FOUND
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_requests_in_flight_and_refuses_new_connections() {
    let up = upstream("up").await;
    let mut cfg = base_config();
    cfg.timeouts.shutdown_grace_ms = 5_000;
    cfg.services = vec![service("up", &[up.addr])];
    cfg.ingresses = vec![ingress("i", vec![(None, vec![path("/", Prefix, "up")])])];
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http");
    let admin = proxy.metrics_addr.expect("metrics");
    for (path, status) in [
        ("/healthz", StatusCode::OK),
        ("/readyz", StatusCode::OK),
        ("/metricz", StatusCode::NOT_FOUND),
    ] {
        assert_eq!(get(admin, "127.0.0.1", path).await.status, status, "{path}");
    }

    // HTTP/1.1 with a slow request in flight, and an idle HTTP/2 connection.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c1 = h1(tcp).await;
    let slow = tokio::spawn(async move { send1(&mut c1, get_req("d.test", "/sleep/800")).await });
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut c2, conn2) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    let conn2 = tokio::spawn(conn2);
    let req = hyper::Request::builder()
        .uri("http://d.test/")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    assert_eq!(send2(&mut c2, req).await.status, StatusCode::OK);
    // Let the slow request reach the upstream before draining starts.
    for _ in 0..100 {
        if up.hits() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let drained = tokio::task::spawn_blocking(move || proxy.drain());
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listeners stay open while draining");
    // While it drains (the slow request holds it open), readiness fails and liveness holds.
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    let pause = Duration::from_millis(10);
    let unready = answers_within(admin, "127.0.0.1", "/readyz", unavailable, 20, pause).await;
    assert!(unready, "/readyz still 200 while draining");
    assert_eq!(
        get(admin, "127.0.0.1", "/healthz").await.status,
        StatusCode::OK
    );
    let got = within("slow request", slow).await.expect("request task");
    assert_eq!(
        got.status,
        StatusCode::OK,
        "the request in flight completes"
    );
    assert_eq!(
        got.headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let ended = within("h2 GOAWAY", conn2).await.expect("h2 task");
    assert!(ended.is_ok(), "HTTP/2 closed gracefully: {ended:?}");
    within("drain", drained).await.expect("drain returns");
}
