//! `xlb proxy` routing, forwarding headers, load balancing, passive health and metrics, over
//! real loopback sockets.

#[path = "proxy_support.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};

use hyper::StatusCode;
use lb_userspace::proxy::config::{
    ANNOTATION_SSL_REDIRECT, ActiveHealth, Backend, Balance, PassiveHealth, PathType::*,
};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_path_rules_follow_ingress_semantics() {
    let root = upstream("root").await;
    let api = upstream("api").await;
    let exact = upstream("exact").await;
    let wild = upstream("wild").await;
    let any = upstream("any").await;
    let fallback = upstream("fallback").await;
    let mut cfg = base_config();
    cfg.services = vec![
        service("root", &[root.addr]),
        service("api", &[api.addr]),
        service("exact", &[exact.addr]),
        service("wild", &[wild.addr]),
        service("any", &[any.addr]),
        service("fallback", &[fallback.addr]),
    ];
    cfg.ingresses = vec![
        ingress(
            "app",
            vec![
                (
                    Some("app.example.test"),
                    vec![
                        path("/", Prefix, "root"),
                        path("/api", Prefix, "api"),
                        path("/api", Exact, "exact"),
                        path("/legacy/", ImplementationSpecific, "api"),
                    ],
                ),
                (Some("*.example.test"), vec![path("/", Prefix, "wild")]),
                (None, vec![path("/any", Prefix, "any")]),
            ],
        ),
        {
            let mut d = ingress("fallback", vec![]);
            d.default_backend = Some(Backend {
                service: "fallback".into(),
                port: 80,
            });
            d
        },
    ];
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");

    let cases = [
        ("app.example.test", "/", "root"),
        ("APP.example.test:80", "/x", "root"),
        ("app.example.test", "/api", "exact"),
        ("app.example.test", "/api/", "api"),
        ("app.example.test", "/api/v1?q=1", "api"),
        ("app.example.test", "/apix", "root"),
        ("app.example.test", "/legacy", "api"),
        ("eu.example.test", "/whatever", "wild"),
        // Wildcards match exactly one label; deeper names fall to host-less rules.
        ("a.eu.example.test", "/any/1", "any"),
        ("example.test", "/any", "any"),
        ("other.test", "/nothing", "fallback"),
        ("a.eu.example.test", "/nothing", "fallback"),
    ];
    for (host, p, want) in cases {
        let got = get(addr, host, p).await;
        assert_eq!(got.status, StatusCode::OK, "{host}{p}: {got:?}");
        assert_eq!(got.backend(), Some(want), "{host}{p}");
    }
    let got = get(addr, "app.example.test", "/api/v1?q=1").await;
    assert!(
        got.body.contains("path=/api/v1?q=1\n"),
        "query forwarded: {}",
        got.body
    );
}

/// `/public/../admin` must not reach the `/public` rule's backend (which would resolve the
/// dots itself and serve `/admin`): routing and the upstream both see the normalised path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_routing_and_forwarding() {
    let public = upstream("public").await;
    let admin = upstream("admin").await;
    let mut cfg = base_config();
    cfg.services = vec![
        service("public", &[public.addr]),
        service("admin", &[admin.addr]),
    ];
    cfg.ingresses = vec![ingress(
        "i",
        vec![(
            Some("n.test"),
            vec![
                path("/public", Prefix, "public"),
                path("/admin", Prefix, "admin"),
                path("/caf%C3%A9", Exact, "public"),
            ],
        )],
    )];
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");
    let request = |method: &str, target: &str| {
        let body = if method == "POST" { "abc" } else { "" };
        format!(
            "{method} {target} HTTP/1.1\r\nHost: n.test\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    // (request target, backend, path and query the backend saw)
    let cases = [
        ("/public/../admin/x", "admin", "/admin/x"),
        (
            "/public/%2e%2e/admin?q=/../%2e",
            "admin",
            "/admin?q=/../%2e",
        ),
        ("/public/%2E./admin", "admin", "/admin"),
        ("//public///a/./b/", "public", "/public/a/b/"),
        (
            "/admin/..//public/%7Euser/a%2fb",
            "public",
            "/public/~user/a%2Fb",
        ),
        ("/caf%c3%a9", "public", "/caf%C3%A9"),
        ("/public/x", "public", "/public/x"),
    ];
    // GET without a body takes the HTTP/1 fast path; POST with one goes through hyper.
    for method in ["GET", "POST"] {
        for (target, backend, seen) in cases {
            let got = raw(addr, request(method, target).as_bytes()).await;
            assert!(got.starts_with("HTTP/1.1 200 "), "{method} {target}: {got}");
            assert!(
                got.contains(&format!("backend={backend}\n")),
                "{method} {target} goes to {backend}: {got}"
            );
            assert!(
                got.contains(&format!("path={seen}\n")),
                "{method} {target} arrives as {seen}: {got}"
            );
        }
    }
    // HTTP/2 (hyper's path, and a request target hyper's URI parser keeps as sent).
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h2(tcp).await;
    let got = send2(
        &mut c,
        get_req("n.test", "http://n.test/public/%2e%2e/admin/y"),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.backend(), Some("admin"));
    assert!(got.body.contains("path=/admin/y\n"), "{}", got.body);

    // Unusable paths are refused without a trip upstream.
    let hits = public.hits() + admin.hits();
    for target in [
        "/..",
        "/public/../../admin",
        "/public/%2e%2e/%2E%2E/admin",
        "/public/%zz",
        "/public/a%4",
        "/public/%00",
    ] {
        for method in ["GET", "POST"] {
            let got = raw(addr, request(method, target).as_bytes()).await;
            assert!(got.starts_with("HTTP/1.1 400 "), "{method} {target}: {got}");
        }
    }
    assert_eq!(
        public.hits() + admin.hits(),
        hits,
        "nothing refused went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_get_a_bare_404() {
    let up = upstream("up").await;
    let mut cfg = base_config();
    cfg.services = vec![service("up", &[up.addr])];
    cfg.ingresses = vec![ingress(
        "i",
        vec![(Some("a.test"), vec![path("/a", Exact, "up")])],
    )];
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");
    let got = get(addr, "a.test", "/a/b").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.body, "404 Not Found\n");
    assert!(
        got.headers.get("server").is_none(),
        "no server banner: {:?}",
        got.headers
    );
    let got = get(addr, "b.test", "/a").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_added_and_hop_by_hop_headers_removed() {
    let up = upstream("up").await;
    let mut cfg = base_config();
    cfg.services = vec![service("up", &[up.addr])];
    cfg.ingresses = vec![ingress("i", vec![(None, vec![path("/", Prefix, "up")])])];
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h1(tcp).await;
    let req = hyper::Request::builder()
        .uri("/h")
        .header("host", "app.test:8080")
        .header("x-forwarded-for", "192.0.2.7")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-kept", "yes")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let got = send1(&mut c, req).await;
    assert_eq!(got.status, StatusCode::OK);
    // The client is not a trusted proxy: its own X-Forwarded-For is replaced, not extended.
    assert_eq!(got.upstream_header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(got.upstream_header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(got.upstream_header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        got.upstream_header("x-forwarded-host"),
        Some("app.test:8080")
    );
    assert_eq!(
        got.upstream_header("forwarded"),
        Some("for=127.0.0.1;host=\"app.test:8080\";proto=http")
    );
    assert_eq!(got.upstream_header("x-kept"), Some("yes"));
    for hop in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert_eq!(
            got.upstream_header(hop),
            None,
            "{hop} must not be forwarded"
        );
    }
    // The upstream nominated x-upstream-private in its Connection header.
    assert!(
        got.headers.get("x-upstream-private").is_none(),
        "{:?}",
        got.headers
    );
    assert_eq!(
        got.headers.get("x-backend").map(|v| v.as_bytes()),
        Some(&b"up"[..])
    );
    // The same connection keeps working (pooled upstream connection reused).
    let again = send1(&mut c, get_req("app.test:8080", "/again")).await;
    assert_eq!(again.status, StatusCode::OK);
    // Absolute-form target: its authority wins over Host, upstream gets origin-form.
    let resp = raw(
        addr,
        b"GET http://abs.test/p?q=1 HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("path=/p?q=1\n"), "{resp}");
    assert!(resp.contains("h:host=abs.test\n"), "{resp}");
}

/// A GET from `from` (a loopback address) with these request headers; what came back.
async fn get_from(
    from: std::net::IpAddr,
    addr: std::net::SocketAddr,
    host: &str,
    headers: &[(&str, &str)],
    h2c: bool,
) -> Got {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind((from, 0).into()).expect("bind");
    let tcp = within("connect", socket.connect(addr))
        .await
        .expect("connect");
    let mut req = get_req(host, "/who");
    for (k, v) in headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("name");
        req.headers_mut().append(name, v.parse().expect("value"));
    }
    if h2c {
        *req.uri_mut() = format!("http://{host}/who").parse().expect("uri");
        send2(&mut h2(tcp).await, req).await
    } else {
        send1(&mut h1(tcp).await, req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_forwarding_headers_are_kept_and_name_the_client() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let mut cfg = base_config();
    let mut sticky = service("sticky", &[a.addr, b.addr]);
    sticky.balance = Balance::ConsistentHash; // on the client address
    cfg.services = vec![service("up", &[a.addr]), sticky];
    let mut secure = ingress(
        "s",
        vec![(Some("secure.test"), vec![path("/", Prefix, "up")])],
    );
    secure.annotations = BTreeMap::from([(ANNOTATION_SSL_REDIRECT.to_owned(), "true".to_owned())]);
    cfg.ingresses = vec![
        ingress(
            "i",
            vec![
                (Some("app.test"), vec![path("/", Prefix, "up")]),
                (Some("sticky.test"), vec![path("/", Prefix, "sticky")]),
            ],
        ),
        secure,
    ];
    // 127.0.0.1 is the load balancer in front; 127.0.0.2 is a client that reached the proxy
    // directly.
    cfg.forwarded_headers.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");
    let lb: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    let direct: std::net::IpAddr = "127.0.0.2".parse().expect("ip");
    let forwarded = [
        ("x-forwarded-for", "198.51.100.7, 203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
        ("forwarded", "for=203.0.113.9;proto=https"),
        ("x-real-ip", "198.51.100.7"),
    ];

    // Over the HTTP/1.1 fast path and over HTTP/2 (hyper's header map): the same head.
    for h2c in [false, true] {
        let got = get_from(lb, addr, "app.test", &forwarded, h2c).await;
        assert_eq!(got.status, StatusCode::OK, "h2c {h2c}: {}", got.body);
        let upstream_saw = |got: &Got, want: [(&str, &str); 5]| {
            for (name, value) in want {
                assert_eq!(got.upstream_header(name), Some(value), "h2c {h2c}: {name}");
            }
        };
        // 203.0.113.9 is the first address from the right that is not a trusted proxy: what
        // a client wrote to the left of it is not believed.
        upstream_saw(
            &got,
            [
                ("x-forwarded-for", "198.51.100.7, 203.0.113.9, 127.0.0.1"),
                ("x-real-ip", "203.0.113.9"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "shop.example"),
                (
                    "forwarded",
                    "for=203.0.113.9;proto=https, for=127.0.0.1;host=\"app.test\";proto=http",
                ),
            ],
        );

        // The same headers from a client that is not a trusted proxy are replaced.
        let got = get_from(direct, addr, "app.test", &forwarded, h2c).await;
        assert_eq!(got.status, StatusCode::OK, "h2c {h2c}: {}", got.body);
        upstream_saw(
            &got,
            [
                ("x-forwarded-for", "127.0.0.2"),
                ("x-real-ip", "127.0.0.2"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "app.test"),
                ("forwarded", "for=127.0.0.2;host=\"app.test\";proto=http"),
            ],
        );
    }

    // TLS ended at the trusted proxy: its `X-Forwarded-Proto: https` means no redirect
    // (else every request would loop back as a 308); from anyone else it is not believed.
    let https = [("x-forwarded-proto", "https")];
    let got = get_from(lb, addr, "secure.test", &https, false).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    let got = get_from(lb, addr, "secure.test", &[], false).await;
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
    let got = get_from(direct, addr, "secure.test", &https, false).await;
    assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);

    // Client-address affinity keys on the original client, not on the proxy in front
    // (which would send every client to one endpoint).
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for client in 1..=16 {
        let xff = format!("203.0.113.{client}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let got = get_from(lb, addr, "sticky.test", &[("x-forwarded-for", &xff)], false).await;
            seen.insert(got.backend().expect("backend").to_owned());
        }
        assert_eq!(
            seen.len(),
            1,
            "client {xff} moved between endpoints: {seen:?}"
        );
        *per_backend
            .entry(seen.into_iter().next().expect("one"))
            .or_default() += 1;
    }
    assert_eq!(
        per_backend.len(),
        2,
        "16 clients all on one endpoint: {per_backend:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_reaches_its_upstream_with_a_request_id() {
    let up = upstream("up").await;
    let proxy = start(one_route("app.test", "/", "up", &[up.addr]));
    let addr = proxy.http_addr.expect("http listener");
    let mut off = one_route("app.test", "/", "up", &[up.addr]);
    off.request_id.enabled = false;
    let proxy_off = start(off);
    let addr_off = proxy_off.http_addr.expect("http listener");
    let lo: std::net::IpAddr = "127.0.0.1".parse().expect("ip");

    for h2c in [false, true] {
        let mut ids = std::collections::HashSet::new();
        for _ in 0..4 {
            let got = get_from(lo, addr, "app.test", &[], h2c).await;
            let id = got.upstream_header("x-request-id").expect("x-request-id");
            assert!(
                id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()),
                "h2c {h2c}: {id}"
            );
            ids.insert(id.to_owned());
        }
        assert_eq!(ids.len(), 4, "h2c {h2c}: one ID per request: {ids:?}");
        // A client's well-formed ID is kept (it may be tracing the request itself); one
        // that could forge a log field is replaced.
        let got = get_from(lo, addr, "app.test", &[("x-request-id", "9f2c-77")], h2c).await;
        assert_eq!(
            got.upstream_header("x-request-id"),
            Some("9f2c-77"),
            "h2c {h2c}"
        );
        let forged = [("x-request-id", "1 status=200")];
        let got = get_from(lo, addr, "app.test", &forged, h2c).await;
        let id = got.upstream_header("x-request-id").expect("x-request-id");
        assert_eq!(id.len(), 32, "h2c {h2c}: {id}");
        // Turned off, the proxy neither adds one nor touches the client's.
        let got = get_from(lo, addr_off, "app.test", &[], h2c).await;
        assert_eq!(got.upstream_header("x-request-id"), None, "h2c {h2c}");
        let got = get_from(lo, addr_off, "app.test", &forged, h2c).await;
        assert_eq!(
            got.upstream_header("x-request-id"),
            Some("1 status=200"),
            "h2c {h2c}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_names_the_client() {
    use tokio::io::AsyncWriteExt as _;
    let up = upstream("up").await;
    let mut cfg = one_route("app.test", "/", "up", &[up.addr]);
    cfg.listen.proxy_protocol = true;
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");

    // v1, in the same segment as the request (as load balancers send it).
    let resp = raw(
        addr,
        b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 80\r\n\
          GET /who HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("h:x-forwarded-for=203.0.113.7\n"), "{resp}");
    assert!(resp.contains("h:x-real-ip=203.0.113.7\n"), "{resp}");

    // v2 (binary, IPv6), then a keep-alive HTTP/1.1 client and then HTTP/2 on the bytes
    // after it: the header is taken off exactly.
    for h2c in [false, true] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
        header.extend_from_slice(
            &"2001:db8::9"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        header.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        header.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
        tcp.write_all(&header).await.expect("write header");
        let got = if h2c {
            let mut req = get_req("app.test", "/who");
            *req.uri_mut() = "http://app.test/who".parse().expect("uri");
            send2(&mut h2(tcp).await, req).await
        } else {
            let mut c = h1(tcp).await;
            let first = send1(&mut c, get_req("app.test", "/a")).await;
            assert_eq!(first.upstream_header("x-real-ip"), Some("2001:db8::9"));
            send1(&mut c, get_req("app.test", "/b")).await
        };
        assert_eq!(got.status, StatusCode::OK, "h2c {h2c}");
        assert_eq!(
            got.upstream_header("x-forwarded-for"),
            Some("2001:db8::9"),
            "h2c {h2c}"
        );
        assert_eq!(
            got.upstream_header("forwarded"),
            Some("for=\"[2001:db8::9]\";host=\"app.test\";proto=http"),
            "h2c {h2c}"
        );
    }

    // No header, or a broken one: closed without an answer, and counted; the upstream
    // never sees them.
    let hits = up.hits();
    for bad in [
        &b"GET /who HTTP/1.1\r\nHost: app.test\r\n\r\n"[..],
        b"PROXY TCP4 nowhere 192.0.2.1 1 2\r\nGET /who HTTP/1.1\r\nHost: app.test\r\n\r\n",
    ] {
        let resp = raw(addr, bad).await;
        assert_eq!(resp, "", "{:?}", String::from_utf8_lossy(bad));
    }
    assert_eq!(up.hits(), hits);
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    assert!(
        m.contains("xlb_proxy_proxy_protocol_rejected_total 2\n"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_and_consistent_hash_sticks() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let mut cfg = base_config();
    let mut rr = service("rr", &[a.addr, b.addr]);
    rr.balance = Balance::RoundRobin;
    let mut ch = service("ch", &[a.addr, b.addr]);
    ch.balance = Balance::ConsistentHash;
    ch.hash_header = Some("x-user".into());
    let mut lr = service("lr", &[a.addr, b.addr]);
    lr.balance = Balance::LeastRequest;
    let mut rnd = service("rnd", &[a.addr, b.addr]);
    rnd.balance = Balance::Random;
    cfg.services = vec![rr, ch, lr, rnd];
    cfg.ingresses = vec![ingress(
        "i",
        vec![
            (Some("rr.test"), vec![path("/", Prefix, "rr")]),
            (Some("ch.test"), vec![path("/", Prefix, "ch")]),
            (Some("lr.test"), vec![path("/", Prefix, "lr")]),
            (Some("rnd.test"), vec![path("/", Prefix, "rnd")]),
        ],
    )];
    cfg.listen.workers = 1; // one round-robin cursor view
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..10 {
        let got = get(addr, "rr.test", "/").await;
        *counts
            .entry(got.backend().expect("backend").to_owned())
            .or_default() += 1;
    }
    assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&5), "{counts:?}");

    for user in ["alice", "bob", "carol", "dave"] {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut c = h1(tcp).await;
            let mut req = get_req("ch.test", "/");
            req.headers_mut()
                .insert("x-user", user.parse().expect("value"));
            seen.insert(
                send1(&mut c, req)
                    .await
                    .backend()
                    .expect("backend")
                    .to_owned(),
            );
        }
        assert_eq!(seen.len(), 1, "{user} must stick to one endpoint: {seen:?}");
    }
    for host in ["lr.test", "rnd.test"] {
        for _ in 0..6 {
            let got = get(addr, host, "/").await;
            assert!(matches!(got.backend(), Some("a" | "b")), "{host}: {got:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_and_the_endpoint_ejected() {
    let live = upstream("live").await;
    let dead = dead_address().await;
    let mut cfg = base_config();
    let mut s = service("s", &[dead, live.addr]);
    s.health = PassiveHealth {
        consecutive_failures: 2,
        base_ejection_ms: 60_000,
        max_ejection_ms: 60_000,
    };
    cfg.services = vec![s];
    cfg.ingresses = vec![ingress("i", vec![(None, vec![path("/", Prefix, "s")])])];
    cfg.listen.workers = 1;
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");
    // Nothing of a request is sent when the connect fails: a POST with a body is retried too
    // (round robin sends one of the first two requests to the dead endpoint first).
    for i in 0..2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut c = h1(tcp).await;
        let mut req = get_req("x.test", "/");
        *req.method_mut() = hyper::Method::POST;
        *req.body_mut() = http_body_util::Full::new(bytes::Bytes::from_static(b"order=1"));
        let got = send1(&mut c, req).await;
        assert_eq!(
            (got.status, got.backend()),
            (StatusCode::OK, Some("live")),
            "POST {i} is retried on the live endpoint"
        );
    }
    for i in 0..10 {
        let got = get(addr, "x.test", "/").await;
        assert_eq!(
            got.status,
            StatusCode::OK,
            "GET {i} is retried on the live endpoint"
        );
        assert_eq!(got.backend(), Some("live"));
    }
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    assert!(
        m.contains("xlb_proxy_upstream_ejections_total{upstream=\"default/s:80\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("xlb_proxy_upstream_endpoints{upstream=\"default/s:80\",state=\"ejected\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("xlb_proxy_upstream_errors_total{upstream=\"default/s:80\"} 2"),
        "{m}"
    );
    // Once ejected, even a POST (never retried) goes to the live endpoint.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = h1(tcp).await;
    let mut req = get_req("x.test", "/");
    *req.method_mut() = hyper::Method::POST;
    assert_eq!(send1(&mut c, req).await.status, StatusCode::OK);
}

/// An upstream that answers every request with the status in `status` (and `x-backend:
/// sick`), counting health checks (`/healthz`) and other requests apart.
struct SickUpstream {
    addr: std::net::SocketAddr,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    checks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SickUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn sick_upstream(status: u16) -> SickUpstream {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let status = std::sync::Arc::new(AtomicU16::new(status));
    let checks = std::sync::Arc::new(AtomicUsize::new(0));
    let requests = std::sync::Arc::new(AtomicUsize::new(0));
    let (st, ch, rq) = (status.clone(), checks.clone(), requests.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (st, ch, rq) = (st.clone(), ch.clone(), rq.clone());
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut s).await else {
                    return;
                };
                if head.starts_with(b"GET /healthz ") {
                    ch.fetch_add(1, Ordering::SeqCst);
                } else {
                    rq.fetch_add(1, Ordering::SeqCst);
                }
                let code = st.load(Ordering::SeqCst);
                let resp = format!(
                    "HTTP/1.1 {code} X\r\nx-backend: sick\r\ncontent-length: 0\r\n\
                     connection: close\r\n\r\n"
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    SickUpstream {
        addr,
        status,
        checks,
        requests,
        task,
    }
}

/// Who answered a GET: the `backend=` line of a support upstream, else `x-backend`.
async fn answered_by(addr: std::net::SocketAddr) -> (StatusCode, String) {
    let got = get(addr, "x.test", "/").await;
    let who = got
        .backend()
        .map(str::to_owned)
        .or_else(|| {
            got.headers
                .get("x-backend")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (got.status, who)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_endpoints_out_and_bring_them_back() {
    use std::sync::atomic::Ordering;
    let healthy = upstream("healthy").await;
    let sick = sick_upstream(503).await;
    let dead = dead_address().await;
    let mut cfg = base_config();
    let mut s = service("s", &[healthy.addr, sick.addr, dead]);
    // Passive ejection off: only the active checks keep traffic away.
    s.health.consecutive_failures = 0;
    s.active_health = ActiveHealth {
        path: Some("/healthz".into()),
        interval_ms: 100,
        timeout_ms: 100,
        unhealthy_threshold: 2,
        healthy_threshold: 2,
        ..ActiveHealth::default()
    };
    cfg.services = vec![s];
    cfg.ingresses = vec![ingress("i", vec![(None, vec![path("/", Prefix, "s")])])];
    let proxy = start(cfg.clone());
    let addr = proxy.http_addr.expect("http listener");

    // The first failed check of each takes the sick and the dead endpoint out.
    let mut clean_run = 0;
    for _ in 0..200 {
        if clean_run == 30 {
            break;
        }
        clean_run = if answered_by(addr).await == (StatusCode::OK, "healthy".into()) {
            clean_run + 1
        } else {
            0
        };
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        clean_run, 30,
        "30 requests in a row answered by the healthy endpoint"
    );
    let before = sick.requests.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(answered_by(addr).await, (StatusCode::OK, "healthy".into()));
    }
    assert_eq!(
        sick.requests.load(Ordering::SeqCst),
        before,
        "nothing reaches the sick one"
    );
    assert!(sick.checks.load(Ordering::SeqCst) >= 1);
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    for (state, n) in [("available", 1), ("ejected", 0), ("check_failed", 2)] {
        let line = format!(
            "xlb_proxy_upstream_endpoints{{upstream=\"default/s:80\",state=\"{state}\"}} {n}\n"
        );
        assert!(m.contains(&line), "{line} in {m}");
    }

    // Recovered: two passed checks bring it back into the rotation.
    sick.status.store(200, Ordering::SeqCst);
    let mut back = false;
    for _ in 0..200 {
        if answered_by(addr).await.1 == "sick" {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(back, "the recovered endpoint gets requests again");
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    let failures = m
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "xlb_proxy_upstream_health_check_failures_total{upstream=\"default/s:80\"} ",
            )
        })
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        failures.is_some_and(|n| n >= 2),
        "failed checks counted: {m}"
    );
    assert!(
        m.contains(
            "xlb_proxy_upstream_endpoints{upstream=\"default/s:80\",state=\"available\"} 2\n"
        ),
        "the recovered endpoint counts as available: {m}"
    );

    // Sick again, then a reload that switches checks off: the verdict no longer applies.
    sick.status.store(503, Ordering::SeqCst);
    let mut out = false;
    for _ in 0..200 {
        let before = sick.requests.load(Ordering::SeqCst);
        for _ in 0..6 {
            answered_by(addr).await;
        }
        if sick.requests.load(Ordering::SeqCst) == before {
            out = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(out, "the endpoint is taken out again");
    cfg.services[0].active_health.path = None;
    proxy.apply(cfg).expect("reload without checks");
    let before = sick.requests.load(Ordering::SeqCst);
    for _ in 0..6 {
        answered_by(addr).await;
    }
    assert!(
        sick.requests.load(Ordering::SeqCst) > before,
        "without checks the endpoint is in the rotation again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_eject_an_endpoint_and_metrics_count_them() {
    let bad = upstream("bad").await;
    let good = upstream("good").await;
    let mut cfg = base_config();
    let mut s = service("s", &[bad.addr, good.addr]);
    s.health = PassiveHealth {
        consecutive_failures: 3,
        base_ejection_ms: 60_000,
        max_ejection_ms: 60_000,
    };
    cfg.services = vec![s];
    cfg.ingresses = vec![ingress("i", vec![(None, vec![path("/", Prefix, "s")])])];
    cfg.listen.workers = 1;
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http listener");
    // Round robin alternates; "bad" answers 500 to /status/500 (so does "good": only the
    // endpoint that reaches 3 consecutive failures first is ejected).
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get(addr, "x.test", "/status/500").await.status);
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::INTERNAL_SERVER_ERROR),
        "{statuses:?}"
    );
    let m = metrics(proxy.metrics_addr.expect("metrics")).await;
    assert!(
        m.contains("xlb_proxy_upstream_ejections_total{upstream=\"default/s:80\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("xlb_proxy_requests_total{rule=\"default/i:*/\",class=\"5xx\"} 6"),
        "{m}"
    );
    assert!(
        m.contains("xlb_proxy_open_connections{listener=\"http\"}"),
        "{m}"
    );
    assert!(
        m.contains("xlb_proxy_request_duration_seconds_count 6"),
        "{m}"
    );
    let got = get(addr, "x.test", "/fine").await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "panic mode still routes when all are ejected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served_on_the_plain_listener() {
    let up = upstream("up").await;
    let mut cfg = base_config();
    cfg.services = vec![service("up", &[up.addr])];
    cfg.ingresses = vec![ingress(
        "i",
        vec![(Some("h2.test"), vec![path("/", Prefix, "up")])],
    )];
    let proxy = start(cfg);
    let tcp = tokio::net::TcpStream::connect(proxy.http_addr.expect("http"))
        .await
        .expect("connect");
    let mut c = h2(tcp).await;
    for i in 0..3 {
        let req = hyper::Request::builder()
            .uri(format!("http://h2.test/n/{i}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let got = send2(&mut c, req).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.version, hyper::Version::HTTP_2);
        assert!(
            got.body.contains(&format!("path=/n/{i}\n")),
            "origin-form upstream: {}",
            got.body
        );
        assert_eq!(got.upstream_header("host"), Some("h2.test"));
    }
    // A request body without Content-Length goes upstream chunked.
    let req = hyper::Request::builder()
        .method("POST")
        .uri("http://h2.test/echo-body")
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            b'x';
            100_000
        ])))
        .expect("request");
    let got = send2(&mut c, req).await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "len=100000\n")
    );
}

/// A hand-written upstream: reads one request head per connection, writes `response`, then
/// closes the connection (whatever the response says about keep-alive).
async fn one_shot_upstream(
    response: &'static [u8],
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_framing_and_connections_closed_while_pooled() {
    let (chunked, t1) =
        one_shot_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n").await;
    let (until_close, t2) =
        one_shot_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close").await;
    // Claims keep-alive but closes: the pooled connection is dead by the next request.
    let (closer, t3) = one_shot_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let mut cfg = base_config();
    cfg.listen.workers = 1;
    cfg.services = vec![
        service("chunked", &[chunked]),
        service("close", &[until_close]),
        service("closer", &[closer]),
    ];
    cfg.ingresses = vec![ingress(
        "i",
        vec![
            (Some("chunked.test"), vec![path("/", Prefix, "chunked")]),
            (Some("close.test"), vec![path("/", Prefix, "close")]),
            (Some("closer.test"), vec![path("/", Prefix, "closer")]),
        ],
    )];
    let proxy = start(cfg);
    let addr = proxy.http_addr.expect("http");
    let got = get(addr, "chunked.test", "/").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "hello world")
    );
    let got = get(addr, "close.test", "/").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "until close")
    );
    for i in 0..5 {
        let got = get(addr, "closer.test", &format!("/get/{i}")).await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (StatusCode::OK, "ok"),
            "GET {i}"
        );
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut c = h1(tcp).await;
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/post")
            .header("host", "closer.test")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"payload",
            )))
            .expect("request");
        let got = send1(&mut c, req).await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (StatusCode::OK, "ok"),
            "POST {i}"
        );
    }
    for t in [t1, t2, t3] {
        t.abort();
    }
}
