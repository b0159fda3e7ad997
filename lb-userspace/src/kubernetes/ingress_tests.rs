use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde_json::{Value, json};

use super::*;
use crate::proxy::config::{Backend, PathType, UpstreamProtocol};

fn class(name: &str, controller: &str, default: bool) -> IngressClass {
    let annotations = if default {
        json!({DEFAULT_CLASS_ANNOTATION: "true"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"controller": controller},
    }))
    .unwrap()
}

/// An Ingress of class `xlb` routing `host`/ to Service `web` port `http` (by name).
fn ingress(name: &str, created: &str, extra: Value) -> Ingress {
    let mut v = json!({
        "metadata": {"namespace": "default", "name": name, "creationTimestamp": created},
        "spec": {
            "ingressClassName": "xlb",
            "rules": [{"host": format!("{name}.example.com"), "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "web", "port": {"name": "http"}}}},
            ]}}],
        },
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn service(name: &str, ports: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name},
        "spec": {"ports": ports},
    }))
    .unwrap()
}

fn web() -> Service {
    service(
        "web",
        json!([
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"},
            {"name": "admin", "port": 9000, "protocol": "TCP", "targetPort": 9001},
        ]),
    )
}

fn slice(name: &str, service: &str, family: &str, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": family,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "admin", "port": 9001, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ready(ip: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true}})
}

fn tls_secret(name: &str, host: &str) -> Secret {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    secret(name, TLS_SECRET_TYPE, &cert.pem(), &key.serialize_pem())
}

fn secret(name: &str, type_: &str, crt: &str, key: &str) -> Secret {
    let b = |s: &str| k8s_openapi::ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            namespace: Some("default".into()),
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(
            [
                ("tls.crt".to_owned(), b(crt)),
                ("tls.key".to_owned(), b(key)),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

struct World {
    node: ProxyConfig,
    classes: Vec<IngressClass>,
    ingresses: Vec<Ingress>,
    secrets: Vec<Secret>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    opts: IngressOptions,
}

impl World {
    fn new() -> Self {
        World {
            node: ProxyConfig::embedded_default().unwrap(),
            classes: vec![class("xlb", CONTROLLER_NAME, false)],
            ingresses: vec![],
            secrets: vec![],
            services: vec![web()],
            slices: vec![slice(
                "web-1",
                "web",
                "IPv4",
                json!([ready("10.0.0.1"), ready("10.0.0.2")]),
            )],
            opts: IngressOptions::default(),
        }
    }

    fn run(&self) -> IngressTranslation {
        let t = translate(
            &self.node,
            &self.classes,
            &self.ingresses,
            &self.secrets,
            &self.services,
            &self.slices,
            &self.opts,
        );
        // Whatever was accepted, the result is a valid file-equivalent config.
        t.config.validate().expect("translated config is valid");
        t
    }
}

fn served(t: &IngressTranslation) -> Vec<&str> {
    t.served.iter().map(|(_, n)| n.as_str()).collect()
}

fn rejected(t: &IngressTranslation) -> Vec<(&str, &str)> {
    t.rejected
        .iter()
        .map(|r| (r.name.as_str(), r.reason.as_str()))
        .collect()
}

/// The one rejection names Service `web` and says `says`.
fn assert_web_rejected(t: &IngressTranslation, annotations: &Value, says: &str) {
    let reasons = rejected(t);
    assert!(
        reasons.len() == 1
            && reasons[0].1.contains("service default/web")
            && reasons[0].1.contains(says),
        "{annotations}: {reasons:?}"
    );
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn an_ingress_becomes_rules_upstreams_and_endpoints() {
    let mut w = World::new();
    w.ingresses
        .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
    let t = w.run();
    assert_eq!(served(&t), ["a"]);
    assert!(t.rejected.is_empty());
    let ing = &t.config.ingresses[0];
    assert_eq!(ing.rules[0].host.as_deref(), Some("a.example.com"));
    assert_eq!(ing.rules[0].paths[0].path, "/");
    assert_eq!(ing.rules[0].paths[0].path_type, PathType::Prefix);
    // The port name resolved to the Service port number…
    assert_eq!(
        ing.rules[0].paths[0].backend,
        Backend {
            service: "web".into(),
            port: 80
        }
    );
    // …and the endpoints to the slice port of the same name (the targetPort).
    assert_eq!(t.config.services.len(), 1);
    assert_eq!(t.config.services[0].port, 80);
    assert_eq!(
        t.config.services[0].endpoints,
        addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])
    );
}

#[test]
fn port_by_number_and_by_name_resolve_to_the_same_target() {
    let mut w = World::new();
    let by = |port: Value| {
        json!({"spec": {"rules": [{"host": "x.example.com", "http": {"paths": [
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "web", "port": port}}}]}}]}})
    };
    w.ingresses.push(ingress(
        "num",
        "2024-01-01T00:00:00Z",
        by(json!({"number": 9000})),
    ));
    w.ingresses.push(ingress(
        "name",
        "2024-01-02T00:00:00Z",
        by(json!({"name": "admin"})),
    ));
    let t = w.run();
    assert_eq!(served(&t), ["name", "num"]);
    // One upstream for both: Service port 9000 → slice port "admin" = 9001.
    assert_eq!(t.config.services.len(), 1);
    assert_eq!(t.config.services[0].port, 9000);
    assert_eq!(
        t.config.services[0].endpoints,
        addrs(&["10.0.0.1:9001", "10.0.0.2:9001"])
    );
}

#[test]
fn only_ready_endpoints_of_ip_slices_count() {
    let mut w = World::new();
    w.slices = vec![
        slice(
            "web-1",
            "web",
            "IPv4",
            json!([
                ready("10.0.0.1"),
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                // `ready` unset counts as ready.
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["not-an-ip"], "conditions": {"ready": true}},
                ready("0.0.0.0"),
            ]),
        ),
        slice(
            "web-2",
            "web",
            "IPv6",
            json!([ready("fd00::1"), ready("10.0.0.1")]),
        ),
        slice("web-3", "web", "FQDN", json!([ready("web.example.com")])),
        slice("other", "other", "IPv4", json!([ready("10.9.9.9")])),
    ];
    w.ingresses
        .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
    let t = w.run();
    assert_eq!(
        t.config.services[0].endpoints,
        addrs(&["10.0.0.1:8080", "10.0.0.3:8080", "[fd00::1]:8080"])
    );
}

#[test]
fn no_endpoints_still_serves_the_rule_with_an_empty_upstream() {
    let mut w = World::new();
    w.slices.clear();
    w.ingresses
        .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
    let t = w.run();
    assert_eq!(served(&t), ["a"]);
    assert!(t.config.services[0].endpoints.is_empty());
}

#[test]
fn class_selection_by_controller_default_and_legacy_annotation() {
    let mut w = World::new();
    w.classes = vec![
        class("xlb", CONTROLLER_NAME, false),
        class("nginx", "k8s.io/ingress-nginx", false),
    ];
    let no_class = json!({"spec": {"ingressClassName": null}});
    w.ingresses = vec![
        ingress("mine", "2024-01-01T00:00:00Z", json!({})),
        ingress(
            "theirs",
            "2024-01-01T00:00:00Z",
            json!({"spec": {"ingressClassName": "nginx"}}),
        ),
        ingress(
            "unknown",
            "2024-01-01T00:00:00Z",
            json!({"spec": {"ingressClassName": "gone"}}),
        ),
        ingress("classless", "2024-01-01T00:00:00Z", no_class.clone()),
        ingress(
            "legacy",
            "2024-01-01T00:00:00Z",
            json!({"metadata": {"annotations": {LEGACY_CLASS_ANNOTATION: "xlb"}},
                   "spec": {"ingressClassName": null}}),
        ),
        // spec.ingressClassName wins over the annotation.
        ingress(
            "both",
            "2024-01-01T00:00:00Z",
            json!({"metadata": {"annotations": {LEGACY_CLASS_ANNOTATION: "xlb"}},
                   "spec": {"ingressClassName": "nginx"}}),
        ),
    ];
    // Other controllers' Ingresses are neither served nor reported.
    let t = w.run();
    assert_eq!(served(&t), ["legacy", "mine"]);
    assert!(t.rejected.is_empty());

    // Our class as the default: class-less Ingresses are ours.
    w.classes[0] = class("xlb", CONTROLLER_NAME, true);
    assert_eq!(served(&w.run()), ["classless", "legacy", "mine"]);

    // Two default classes: ambiguous, class-less Ingresses are nobody's.
    w.classes[1] = class("nginx", "k8s.io/ingress-nginx", true);
    assert_eq!(served(&w.run()), ["legacy", "mine"]);

    // Another controller name: the other class is ours now.
    w.opts.controller = "k8s.io/ingress-nginx".into();
    assert_eq!(served(&w.run()), ["both", "theirs"]);
}

#[test]
fn tls_secrets_referenced_are_loaded_and_others_ignored() {
    let mut w = World::new();
    w.secrets = vec![
        tls_secret("a-tls", "a.example.com"),
        tls_secret("unused", "u.example.com"),
    ];
    w.ingresses.push(ingress(
        "a",
        "2024-01-01T00:00:00Z",
        json!({"spec": {"tls": [{"hosts": ["a.example.com"], "secretName": "a-tls"}]}}),
    ));
    let t = w.run();
    assert_eq!(served(&t), ["a"]);
    assert_eq!(t.config.secrets.len(), 1);
    assert_eq!(t.config.secrets[0].name, "a-tls");
    assert!(
        t.config.secrets[0]
            .cert_pem
            .as_deref()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert_eq!(t.config.ingresses[0].tls[0].hosts, ["a.example.com"]);
    CertStore::from_config(&t.config).expect("certificates load");
}

#[test]
fn service_annotations_set_the_proxy_policy() {
    let annotated = |annotations: Value| {
        let mut w = World::new();
        w.services[0].metadata.annotations = serde_json::from_value(annotations).unwrap();
        w.ingresses
            .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
        w.run()
    };
    let t = annotated(json!({
        PROXY_HASH_BY: "x-session",
        PROXY_MAX_FAILS: "0",
        PROXY_CHECK_PATH: "/healthz",
        PROXY_CHECK_INTERVAL: "1000",
        PROXY_CHECK_TIMEOUT: "500",
        PROXY_CHECK_HOST: "web.internal",
        PROXY_CHECK_UNHEALTHY: "4",
        PROXY_CHECK_HEALTHY: "1",
        PROXY_CONNECT_TIMEOUT: "250",
        PROXY_RESPONSE_TIMEOUT: "3600000",
        // The L4 agent's annotations are not the proxy's business.
        "xlb.dev/load-balancer-ips": "198.51.100.1",
    }));
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    let s = &t.config.services[0];
    assert_eq!(
        s.balance,
        pc::Balance::ConsistentHash,
        "implied by the hash header"
    );
    assert_eq!(s.hash_header.as_deref(), Some("x-session"));
    assert_eq!(s.health.consecutive_failures, 0);
    assert_eq!(s.active_health.path.as_deref(), Some("/healthz"));
    assert_eq!(
        (s.active_health.interval_ms, s.active_health.timeout_ms),
        (1000, 500)
    );
    assert_eq!(s.active_health.host.as_deref(), Some("web.internal"));
    assert_eq!(
        (s.timeouts.connect_ms, s.timeouts.response_ms),
        (Some(250), Some(3_600_000))
    );
    assert_eq!(
        (
            s.active_health.unhealthy_threshold,
            s.active_health.healthy_threshold
        ),
        (4, 1)
    );
    let t = annotated(json!({PROXY_LOAD_BALANCE: "least_request"}));
    assert_eq!(t.config.services[0].balance, pc::Balance::LeastRequest);
    assert_eq!(t.config.services[0].active_health.path, None);

    // Each bad one rejects the Ingress using the Service, naming the annotation.
    for (annotations, says) in [
        (json!({PROXY_LOAD_BALANCE: "ewma"}), PROXY_LOAD_BALANCE),
        (json!({PROXY_MAX_FAILS: "many"}), PROXY_MAX_FAILS),
        (json!({PROXY_HASH_BY: "bad header"}), PROXY_HASH_BY),
        (
            json!({PROXY_HASH_BY: "x-a", PROXY_LOAD_BALANCE: "random"}),
            PROXY_HASH_BY,
        ),
        (json!({PROXY_CHECK_PATH: "healthz"}), "health-check"),
        (
            json!({PROXY_CHECK_PATH: "/h", PROXY_CHECK_TIMEOUT: "60000"}),
            "health-check",
        ),
        (
            json!({"xlb.dev/proxy-retries": "3"}),
            "xlb.dev/proxy-retries",
        ),
        (
            json!({PROXY_CHECK_PATH: "/h", PROXY_CHECK_HEALTHY: "0"}),
            "health-check",
        ),
        (json!({PROXY_CHECK_UNHEALTHY: "-1"}), PROXY_CHECK_UNHEALTHY),
        (json!({PROXY_RESPONSE_TIMEOUT: "0"}), PROXY_RESPONSE_TIMEOUT),
        (json!({PROXY_CONNECT_TIMEOUT: "5s"}), PROXY_CONNECT_TIMEOUT),
    ] {
        let t = annotated(annotations.clone());
        assert!(served(&t).is_empty(), "{annotations}");
        assert_web_rejected(&t, &annotations, says);
    }
}

#[test]
fn backend_protocol_annotations_set_tls_to_the_endpoints() {
    let with = |annotations: Value, secrets: Vec<Secret>| {
        let mut w = World::new();
        w.services[0].metadata.annotations = serde_json::from_value(annotations).unwrap();
        w.secrets = secrets;
        w.ingresses
            .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
        w.run()
    };
    // A cert-manager style Secret: tls.crt, tls.key and the issuer's ca.crt.
    let mut ca = tls_secret("web-ca", "web.internal");
    let ca_pem = String::from_utf8(ca.data.as_ref().unwrap()["tls.crt"].0.clone()).unwrap();
    ca.data.as_mut().unwrap().insert(
        "ca.crt".into(),
        k8s_openapi::ByteString(ca_pem.clone().into()),
    );

    let t = with(
        json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_SECRET: "web-ca",
               PROXY_SSL_NAME: "web.internal"}),
        vec![ca.clone()],
    );
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    let tls = &t.config.services[0].tls;
    assert!(tls.enabled && tls.verify);
    assert_eq!(tls.server_name.as_deref(), Some("web.internal"));
    assert_eq!(tls.ca_pem.as_deref(), Some(ca_pem.as_str()));
    t.config.validate().expect("a valid config");

    let t = with(
        json!({PROXY_BACKEND_PROTOCOL: "https", PROXY_SSL_VERIFY: "false"}),
        vec![],
    );
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    let tls = &t.config.services[0].tls;
    assert!(tls.enabled && !tls.verify && tls.ca_pem.is_none());

    let t = with(json!({PROXY_BACKEND_PROTOCOL: "HTTP"}), vec![]);
    assert!(!t.config.services[0].tls.enabled);
    assert_eq!(t.config.services[0].protocol, UpstreamProtocol::Http1);

    // GRPC and GRPCS: HTTP/2 to the endpoints, without and with TLS (verified as HTTPS).
    let t = with(json!({PROXY_BACKEND_PROTOCOL: "GRPC"}), vec![]);
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    assert_eq!(t.config.services[0].protocol, UpstreamProtocol::H2);
    assert!(!t.config.services[0].tls.enabled);
    let t = with(
        json!({PROXY_BACKEND_PROTOCOL: "GRPC", PROXY_CHECK_GRPC_SERVICE: "demo.Greeter"}),
        vec![],
    );
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    assert_eq!(
        t.config.services[0].active_health.grpc_service.as_deref(),
        Some("demo.Greeter")
    );
    t.config.validate().expect("a valid config");
    let t = with(
        json!({PROXY_BACKEND_PROTOCOL: "grpcs", PROXY_SSL_SECRET: "web-ca"}),
        vec![ca.clone()],
    );
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    assert_eq!(t.config.services[0].protocol, UpstreamProtocol::H2);
    assert!(t.config.services[0].tls.enabled && t.config.services[0].tls.verify);
    t.config.validate().expect("a valid config");

    // Mutual TLS: the client certificate's Secret goes into the config with the Service.
    let t = with(
        json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_SECRET: "web-ca",
               PROXY_SSL_CLIENT_SECRET: "proxy-client"}),
        vec![ca.clone(), tls_secret("proxy-client", "xlb-proxy")],
    );
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    assert_eq!(
        t.config.services[0].tls.client_secret.as_deref(),
        Some("default/proxy-client")
    );
    assert_eq!(t.config.secrets.len(), 1);
    assert_eq!(t.config.secrets[0].name, "proxy-client");
    t.config.validate().expect("a valid config");

    let no_ca = secret("plain", TLS_SECRET_TYPE, &ca_pem, "key");
    // Each bad combination rejects the Ingress using the Service, naming the annotation.
    for (annotations, secrets, says) in [
        (
            json!({PROXY_BACKEND_PROTOCOL: "h2"}),
            vec![],
            PROXY_BACKEND_PROTOCOL,
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS"}),
            vec![],
            PROXY_SSL_SECRET,
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "GRPCS"}),
            vec![],
            "GRPCS verifies",
        ),
        (
            json!({PROXY_CHECK_GRPC_SERVICE: ""}),
            vec![],
            "gRPC health checks need",
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "GRPC", PROXY_CHECK_GRPC_SERVICE: "",
                   PROXY_CHECK_PATH: "/healthz"}),
            vec![],
            "not both",
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "GRPC", PROXY_SSL_NAME: "web.internal"}),
            vec![],
            "spoken to without TLS",
        ),
        (
            json!({PROXY_SSL_VERIFY: "false"}),
            vec![],
            "spoken to without TLS",
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_VERIFY: "no"}),
            vec![],
            PROXY_SSL_VERIFY,
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_NAME: "not a name"}),
            vec![],
            PROXY_SSL_NAME,
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_SECRET: "other/web-ca"}),
            vec![ca.clone()],
            PROXY_SSL_SECRET,
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_SECRET: "missing"}),
            vec![],
            "secret default/missing not found",
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_SECRET: "plain"}),
            vec![no_ca],
            "has no ca.crt",
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_VERIFY: "false",
                   PROXY_SSL_SECRET: "web-ca"}),
            vec![ca.clone()],
            PROXY_SSL_SECRET,
        ),
        (
            json!({PROXY_BACKEND_PROTOCOL: "HTTPS", PROXY_SSL_VERIFY: "false",
                   PROXY_SSL_CLIENT_SECRET: "gone"}),
            vec![],
            "secret default/gone not found",
        ),
        (
            json!({PROXY_SSL_CLIENT_SECRET: "web-ca"}),
            vec![ca.clone()],
            "spoken to without TLS",
        ),
    ] {
        let t = with(annotations.clone(), secrets);
        assert!(served(&t).is_empty(), "{annotations}");
        assert_web_rejected(&t, &annotations, says);
    }
}

#[test]
fn app_protocol_h2c_selects_http2_unless_the_annotation_decides() {
    let with = |annotations: Value| {
        let mut w = World::new();
        w.services[0] = service(
            "web",
            json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web",
                    "appProtocol": APP_PROTOCOL_H2C}]),
        );
        w.services[0].metadata.annotations = serde_json::from_value(annotations).unwrap();
        w.ingresses
            .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
        let t = w.run();
        assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
        t.config.services[0].protocol
    };
    assert_eq!(with(json!({})), UpstreamProtocol::H2);
    assert_eq!(
        with(json!({PROXY_BACKEND_PROTOCOL: "HTTP"})),
        UpstreamProtocol::Http1,
        "the annotation wins"
    );
    // Another appProtocol keeps HTTP/1.1.
    let mut w = World::new();
    w.services[0] = service(
        "web",
        json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web",
                "appProtocol": "http"}]),
    );
    w.ingresses
        .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
    assert_eq!(w.run().config.services[0].protocol, UpstreamProtocol::Http1);
}

#[test]
fn tls_hosts_without_a_secret_use_the_default_certificate() {
    let mut w = World::new();
    w.ingresses.push(ingress(
        "a",
        "2024-01-01T00:00:00Z",
        json!({"spec": {"tls": [{"hosts": ["a.example.com"]}]}}),
    ));
    let t = w.run();
    assert_eq!(served(&t), ["a"], "{:?}", t.rejected);
    assert!(t.config.ingresses[0].tls.is_empty());
    assert!(t.config.secrets.is_empty());
}

#[test]
fn each_bad_ingress_is_rejected_alone_with_a_reason() {
    let mut w = World::new();
    w.secrets = vec![
        tls_secret("good-tls", "good.example.com"),
        secret("garbage", TLS_SECRET_TYPE, "not a certificate", "not a key"),
        secret("opaque", "Opaque", "x", "y"),
    ];
    let t0 = "2024-01-01T00:00:00Z";
    let tls = |secret: &str| json!({"spec": {"tls": [{"hosts": ["x.example.com"], "secretName": secret}]}});
    let path = |p: &str| {
        json!({"spec": {"rules": [{"host": "x.example.com", "http": {"paths": [
            {"path": p, "pathType": "ImplementationSpecific",
             "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}})
    };
    let backend = |b: Value| {
        json!({"spec": {"rules": [{"host": "x.example.com", "http": {"paths": [
            {"path": "/", "pathType": "Prefix", "backend": b}]}}]}})
    };
    w.ingresses = vec![
        ingress("good", t0, tls("good-tls")),
        ingress("missing-secret", t0, tls("nope")),
        ingress("bad-cert", t0, tls("garbage")),
        ingress("wrong-type", t0, tls("opaque")),
        ingress(
            "bad-host",
            t0,
            json!({"spec": {"rules": [{"host": "Bad_Host.example.com", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}),
        ),
        ingress("bad-path", t0, path("/a?b")),
        // ImplementationSpecific paths skip the API server's segment checks.
        ingress("dot-path", t0, path("/a/../b")),
        ingress(
            "resource",
            t0,
            backend(json!({"resource": {"kind": "Bucket", "name": "b"}})),
        ),
        ingress(
            "annotation",
            t0,
            json!({"metadata": {"annotations": {"xlb.dev/max-body-bytes": "lots"}}}),
        ),
    ];
    let t = w.run();
    assert_eq!(served(&t), ["good"]);
    let reasons = rejected(&t);
    let reason = |name: &str| {
        reasons
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} not rejected: {reasons:?}"))
            .1
    };
    assert_eq!(reasons.len(), 8, "{reasons:?}");
    assert!(
        reason("dot-path").starts_with("rules[0].paths[0].path:")
            && reason("dot-path").contains("did you mean \"/b\""),
        "{}",
        reason("dot-path")
    );
    assert!(reason("missing-secret").contains("secret default/nope not found"));
    assert!(
        reason("bad-cert").contains("default/garbage"),
        "{}",
        reason("bad-cert")
    );
    assert!(reason("wrong-type").contains("Opaque"));
    assert!(
        reason("bad-host").starts_with("rules[0].host:"),
        "{}",
        reason("bad-host")
    );
    assert!(
        reason("bad-path").starts_with("rules[0].paths[0].path:"),
        "{}",
        reason("bad-path")
    );
    assert!(reason("resource").contains("resource backends"));
    assert!(reason("annotation").contains("xlb.dev/max-body-bytes"));
    // The Display form names the object.
    let line = t
        .rejected
        .iter()
        .find(|r| r.name == "bad-cert")
        .unwrap()
        .to_string();
    assert!(line.starts_with("Ingress default/bad-cert: "), "{line}");
}

#[test]
fn a_missing_service_or_port_answers_503_on_its_paths_only() {
    let mut w = World::new();
    let path =
        |p: &str, backend: Value| json!({"path": p, "pathType": "Prefix", "backend": backend});
    w.ingresses = vec![ingress(
        "mixed",
        "2024-01-01T00:00:00Z",
        json!({"spec": {"rules": [{"host": "x.example.com", "http": {"paths": [
            path("/ok", json!({"service": {"name": "web", "port": {"number": 80}}})),
            path("/gone", json!({"service": {"name": "gone", "port": {"number": 8080}}})),
            path("/gone-named", json!({"service": {"name": "gone", "port": {"name": "http"}}})),
            path("/no-port", json!({"service": {"name": "web", "port": {"name": "grpc"}}})),
        ]}}]}}),
    )];
    let t = w.run();
    assert_eq!(served(&t), ["mixed"], "{:?}", t.rejected);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    let reasons: Vec<&str> = t.degraded.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("paths[1].backend: service default/gone not found")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r
                .contains("paths[3].backend: service default/web has no TCP port named \"grpc\"")),
        "{reasons:?}"
    );
    let ing = &t.config.ingresses[0];
    let backend_of = |p: &str| {
        ing.rules[0]
            .paths
            .iter()
            .find(|x| x.path == p)
            .map(|x| (x.backend.service.clone(), x.backend.port))
            .unwrap()
    };
    let endpoints_of = |(name, port): (String, u16)| {
        t.config
            .services
            .iter()
            .find(|s| s.name == name && s.port == port)
            .map(|s| s.endpoints.clone())
            .unwrap_or_else(|| panic!("no service {name}:{port}"))
    };
    // The healthy path keeps its endpoints; the others have none (503).
    assert!(!endpoints_of(backend_of("/ok")).is_empty());
    assert_eq!(backend_of("/gone"), ("gone".into(), 8080));
    assert!(endpoints_of(backend_of("/gone")).is_empty());
    assert!(endpoints_of(backend_of("/gone-named")).is_empty());
    // A port asked by a name the Service lacks does not alias one of its real ports.
    let (name, port) = backend_of("/no-port");
    assert_eq!(name, "web");
    assert_ne!(port, 80);
    assert!(endpoints_of((name, port)).is_empty());
}

#[test]
fn conflicting_default_backends_reject_the_newer_ingress() {
    let mut w = World::new();
    let default_backend =
        json!({"spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}});
    w.ingresses = vec![
        ingress("newer", "2024-02-01T00:00:00Z", default_backend.clone()),
        ingress("older", "2024-01-01T00:00:00Z", default_backend),
        ingress("plain", "2024-03-01T00:00:00Z", json!({})),
    ];
    let t = w.run();
    assert_eq!(served(&t), ["older", "plain"]);
    assert_eq!(rejected(&t).len(), 1);
    assert_eq!(t.rejected[0].name, "newer");
    assert!(
        t.rejected[0]
            .reason
            .contains("already sets the default backend"),
        "{:?}",
        t.rejected
    );
    // Oldest first: the first Ingress in the config is the older one.
    assert_eq!(t.config.ingresses[0].name, "older");
}

#[test]
fn node_settings_come_from_the_file_and_its_objects_are_dropped() {
    let file = ProxyConfig::from_toml_str(
        include_str!("../../../deploy/proxy.example.toml"),
        "example",
    )
    .unwrap();
    assert!(!file.ingresses.is_empty());
    let (node, dropped) = node_settings(file.clone());
    assert!(dropped.contains(&"ingresses") && dropped.contains(&"services"));
    assert!(node.ingresses.is_empty() && node.services.is_empty() && node.secrets.is_empty());
    assert_eq!(node.listen, file.listen);
    assert_eq!(node.timeouts, file.timeouts);
    assert_eq!(node.limits, file.limits);

    let mut w = World::new();
    w.node = file;
    w.node.timeouts.connect_ms = 1234;
    w.ingresses
        .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
    let t = w.run();
    assert_eq!(t.config.timeouts.connect_ms, 1234);
    assert_eq!(served(&t), ["a"]);
}

#[test]
fn https_without_any_certificate_does_not_freeze_updates() {
    let mut w = World::new();
    w.node.listen.https = Some("127.0.0.1:8443".parse().unwrap());
    // A file with HTTPS and no certificate is refused…
    assert!(w.node.validate().is_err());
    // …but from Kubernetes, where the last TLS Ingress may go away, it is not.
    validate_node(&w.node).expect("node settings alone are valid");
    w.ingresses
        .push(ingress("a", "2024-01-01T00:00:00Z", json!({})));
    assert_eq!(served(&w.run()), ["a"]);
}

#[test]
fn the_default_certificate_is_a_secret_named_in_the_file() {
    let mut w = World::new();
    w.node.tls.default_secret = Some("default/fallback".into());
    validate_node(&w.node).expect("valid before the Secret is known");
    let t = w.run();
    assert_eq!(t.config.tls.default_secret, None);
    assert!(
        t.warnings[0].contains("default/fallback"),
        "{:?}",
        t.warnings
    );

    w.secrets
        .push(tls_secret("fallback", "fallback.example.com"));
    let t = w.run();
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(
        t.config.tls.default_secret.as_deref(),
        Some("default/fallback")
    );
    assert_eq!(t.config.secrets[0].name, "fallback");
}

#[test]
fn translation_is_deterministic_whatever_the_input_order() {
    let mut w = World::new();
    w.ingresses = vec![
        ingress("b", "2024-01-01T00:00:00Z", json!({})),
        ingress("a", "2024-01-01T00:00:00Z", json!({})),
        ingress("c", "2023-01-01T00:00:00Z", json!({})),
    ];
    let first = w.run();
    w.ingresses.reverse();
    w.slices.reverse();
    assert_eq!(w.run(), first);
    let names: Vec<_> = first
        .config
        .ingresses
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(names, ["c", "a", "b"]);
}
