//! WebSocket (HTTP/1.1 Upgrade) proxying, both directions, over plain HTTP and TLS.

#[path = "proxy_support.rs"]
mod support;

use futures_util::{SinkExt, StreamExt};
use lb_userspace::proxy::config::{IngressTls, PathType::*, TlsSecret};
use rustls::version::TLS13;
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_tunnelled_over_http_and_https() {
    let pki = Pki::new();
    let up = upstream("ws").await;
    let (crt, key) = pki.leaf(&["ws.test"]);
    let mut cfg = base_config();
    cfg.listen.https = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.secrets = vec![TlsSecret {
        name: "ws".into(),
        cert_pem: Some(crt),
        key_pem: Some(key),
        ..Default::default()
    }];
    cfg.services = vec![service("ws", &[up.addr])];
    let mut ing = ingress(
        "ws",
        vec![(Some("ws.test"), vec![path("/chat", Prefix, "ws")])],
    );
    ing.tls = vec![IngressTls {
        hosts: vec!["ws.test".into()],
        secret_name: "ws".into(),
    }];
    cfg.ingresses = vec![ing];
    let proxy = start(cfg);

    let mut ws = websocket(proxy.http_addr.expect("http"), "ws://ws.test/chat/room1").await;
    echo_round(&mut ws, "plain", 20).await;
    // Large binary frames cross in both directions too.
    let blob = vec![7u8; 256 * 1024];
    within("ws send", ws.send(Message::binary(blob.clone())))
        .await
        .expect("send");
    let back = within("ws echo", ws.next())
        .await
        .expect("open")
        .expect("message");
    assert_eq!(back.into_data().len(), blob.len());
    within("ws close", ws.close(None)).await.expect("close");

    let s = tls(
        &pki.client(&[b"http/1.1"], &[&TLS13]),
        proxy.https_addr.expect("https"),
        "ws.test",
    )
    .await
    .expect("tls");
    let (mut ws, _) = within(
        "wss handshake",
        tokio_tungstenite::client_async("wss://ws.test/chat", s),
    )
    .await
    .expect("websocket over TLS through the proxy");
    echo_round(&mut ws, "tls", 20).await;
    assert_eq!(up.hits(), 2, "one upgrade request per WebSocket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_to_an_unrouted_path_is_refused() {
    let up = upstream("ws").await;
    let mut cfg = base_config();
    cfg.services = vec![service("ws", &[up.addr])];
    cfg.ingresses = vec![ingress(
        "ws",
        vec![(Some("ws.test"), vec![path("/chat", Exact, "ws")])],
    )];
    let proxy = start(cfg);
    let tcp = tokio::net::TcpStream::connect(proxy.http_addr.expect("http"))
        .await
        .expect("connect");
    let err = within(
        "ws handshake",
        tokio_tungstenite::client_async("ws://ws.test/other", tcp),
    )
    .await
    .expect_err("no route");
    assert!(err.to_string().contains("404"), "{err}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_silent_both_ways_for_the_tunnel_idle_timeout_is_closed() {
    const IDLE_MS: u64 = 400;
    let up = upstream("ws").await;
    let mut cfg = one_route("ws.test", "/chat", "ws", &[up.addr]);
    cfg.timeouts.tunnel_idle_ms = IDLE_MS;
    let proxy = start(cfg);
    let mut ws = websocket(proxy.http_addr.expect("http"), "ws://ws.test/chat").await;
    // Talking every 100 ms for three times the timeout keeps it open.
    for i in 0..12 {
        echo_round(&mut ws, &format!("keep-{i}"), 1).await;
        tokio::time::sleep(std::time::Duration::from_millis(IDLE_MS / 4)).await;
    }
    // Silent both ways for longer: the proxy closes it (without a close frame: it does not
    // speak WebSocket, it splices bytes).
    tokio::time::sleep(std::time::Duration::from_millis(IDLE_MS * 3)).await;
    let after = within("the tunnel closed", ws.next()).await;
    assert!(
        matches!(after, None | Some(Err(_))),
        "a silent tunnel must be closed: {after:?}"
    );
    assert_eq!(up.hits(), 1, "one upgrade request");
}
