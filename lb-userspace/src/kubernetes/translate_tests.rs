use std::net::IpAddr;

use serde_json::{Value, json};

use crate::kubernetes::objects::{EndpointSlice, Service};

use super::*;

fn service(name: &str, extra: Value) -> Service {
    let mut v = json!({
        "metadata": {"namespace": "default", "name": name,
                     "annotations": {CLASS_ANNOTATION: DEFAULT_CLASS}},
        "spec": {"type": "LoadBalancer",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn slice(name: &str, service: &str, family: &str, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name,
                     "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": family,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
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

fn opts() -> TranslateOptions {
    TranslateOptions {
        pools: vec![
            "192.0.2.0/30".parse().unwrap(),
            "2001:db8::/126".parse().unwrap(),
        ],
        ..TranslateOptions::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn backends(t: &Translation, vip: usize) -> Vec<(IpAddr, BackendState, u32)> {
    t.desired.vips[vip]
        .backends
        .iter()
        .map(|b| (b.address, b.state, b.weight))
        .collect()
}

#[test]
fn ready_serving_terminating_map_to_active_draining_absent() {
    let svc = service("web", json!({"spec": {"loadBalancerIP": "198.51.100.1"}}));
    let es = slice(
        "web-1",
        "web",
        "IPv4",
        json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.5"]},
        ]),
    );
    let t = translate(&[svc], &[es], &opts());
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    assert_eq!(t.desired.vips.len(), 1);
    let vip = &t.desired.vips[0];
    assert_eq!(vip.name, "default/web:http");
    assert_eq!(vip.key.to_string(), "198.51.100.1:80/tcp");
    assert!(!vip.source_affinity);
    assert_eq!(
        backends(&t, 0),
        vec![
            (ip("10.0.0.1"), BackendState::Active, 1),
            (ip("10.0.0.2"), BackendState::Draining, 0),
            (ip("10.0.0.5"), BackendState::Active, 1),
        ]
    );
    t.desired.validate().unwrap();
}

#[test]
fn class_rules_and_classless_claim() {
    let other = service(
        "other",
        json!({"metadata": {"annotations": {CLASS_ANNOTATION: "example.com/other"}},
               "spec": {"loadBalancerIP": "198.51.100.2"}}),
    );
    let classless = service(
        "classless",
        json!({"metadata": {"annotations": null}, "spec": {"loadBalancerIP": "198.51.100.3"}}),
    );
    let by_field = service(
        "field",
        json!({"metadata": {"annotations": {}}, "spec": {"loadBalancerClass": DEFAULT_CLASS, "loadBalancerIP": "198.51.100.4"}}),
    );
    let cluster_ip = service(
        "cip",
        json!({"spec": {"type": "ClusterIP", "loadBalancerIP": "198.51.100.5"}}),
    );
    let all = [other, classless, by_field, cluster_ip];
    let t = translate(&all, &[] as &[EndpointSlice; 0], &opts());
    let names: Vec<_> = t.desired.vips.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["default/field:http"]);
    let claim = TranslateOptions {
        claim_classless: true,
        ..opts()
    };
    let t = translate(&all, &[] as &[EndpointSlice; 0], &claim);
    let mut names: Vec<_> = t.desired.vips.iter().map(|v| v.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["default/classless:http", "default/field:http"]);
}

#[test]
fn ports_by_name_and_number_tcp_udp_affinity() {
    let svc = service(
        "dns",
        json!({"spec": {"loadBalancerIP": "198.51.100.1", "sessionAffinity": "ClientIP",
                        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                  {"name": "http", "port": 8053}]}}),
    );
    let es = slice(
        "dns-1",
        "dns",
        "IPv4",
        json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]),
    );
    let t = translate(&[svc], &[es], &opts());
    assert_eq!(t.desired.vips.len(), 2);
    assert_eq!(t.desired.vips[0].key.to_string(), "198.51.100.1:53/udp");
    assert_eq!(t.desired.vips[1].key.to_string(), "198.51.100.1:8053/tcp");
    assert!(t.desired.vips.iter().all(|v| v.source_affinity));
    assert_eq!(backends(&t, 0).len(), 1);
    assert_eq!(backends(&t, 1).len(), 1);
}

#[test]
fn unnamed_single_port_matches_unnamed_slice_port() {
    let svc = service(
        "one",
        json!({"spec": {"loadBalancerIP": "198.51.100.1", "ports": [{"port": 443}]}}),
    );
    let es: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "one-x", "labels": {SERVICE_NAME_LABEL: "one"}},
        "addressType": "IPv4",
        "ports": [{"port": 8443, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.0.0.9"]}],
    }))
    .unwrap();
    let t = translate(&[svc], &[es], &opts());
    assert_eq!(t.desired.vips[0].name, "default/one:443/tcp");
    assert_eq!(
        backends(&t, 0),
        vec![(ip("10.0.0.9"), BackendState::Active, 1)]
    );
}

#[test]
fn dual_stack_allocates_per_family_and_matches_slices_by_family() {
    let svc = service("ds", json!({"spec": {"ipFamilies": ["IPv4", "IPv6"]}}));
    let v4 = slice("ds-4", "ds", "IPv4", json!([{"addresses": ["10.0.0.1"]}]));
    let v6 = slice("ds-6", "ds", "IPv6", json!([{"addresses": ["fd00::1"]}]));
    let t = translate(&[svc], &[v4, v6], &opts());
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    let keys: Vec<String> = t.desired.vips.iter().map(|v| v.key.to_string()).collect();
    // /30 keeps network and broadcast out: .1 is the first address handed out.
    assert_eq!(keys, ["192.0.2.1:80/tcp", "[2001:db8::]:80/tcp"]);
    assert_eq!(
        backends(&t, 0),
        vec![(ip("10.0.0.1"), BackendState::Active, 1)]
    );
    assert_eq!(
        backends(&t, 1),
        vec![(ip("fd00::1"), BackendState::Active, 1)]
    );
    assert_eq!(
        t.addresses[&("default".to_string(), "ds".to_string())],
        vec![ip("192.0.2.1"), ip("2001:db8::")]
    );
}

#[test]
fn ipam_never_reuses_and_reads_status_back() {
    // "a" holds .1 through its status (written by a leader before a restart); "b" and "c"
    // are new and get the next free addresses; "d" finds the pool exhausted.
    let a = service(
        "a",
        json!({"metadata": {"creationTimestamp": "2026-01-04T00:00:00Z"},
               "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}),
    );
    let b = service(
        "b",
        json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    let c = service(
        "c",
        json!({"metadata": {"creationTimestamp": "2026-01-02T00:00:00Z"}}),
    );
    let d = service(
        "d",
        json!({"metadata": {"creationTimestamp": "2026-01-03T00:00:00Z"}}),
    );
    let t = translate(
        &[d.clone(), c.clone(), b.clone(), a.clone()],
        &[] as &[EndpointSlice; 0],
        &opts(),
    );
    let got = |t: &Translation, n: &str| {
        t.addresses
            .get(&("default".to_string(), n.to_string()))
            .cloned()
    };
    assert_eq!(got(&t, "a"), Some(vec![ip("192.0.2.1")]));
    assert_eq!(got(&t, "b"), Some(vec![ip("192.0.2.2")]));
    assert_eq!(got(&t, "c"), None);
    let all: Vec<IpAddr> = t.addresses.values().flatten().copied().collect();
    let unique: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(
        all.len(),
        unique.len(),
        "an address was handed out twice: {all:?}"
    );
    assert_eq!(all.len(), 2, "a /30 has two usable addresses");
    assert_eq!(t.skipped.len(), 2, "{:?}", t.skipped);
    assert!(
        t.skipped
            .iter()
            .all(|s| s.reason.contains("no free IPv4 address"))
    );
    assert_eq!(t.skipped[0].name, "c");
    // The order the objects arrive in does not matter.
    let again = translate(&[a, b, c, d], &[] as &[EndpointSlice; 0], &opts());
    assert_eq!(again, t);
}

#[test]
fn bad_objects_are_skipped_and_the_rest_keeps_working() {
    let good = service("good", json!({"spec": {"loadBalancerIP": "198.51.100.1"}}));
    let bad_ip = service("bad-ip", json!({"spec": {"loadBalancerIP": "300.1.1.1"}}));
    let loopback = service(
        "lo",
        json!({"metadata": {"annotations": {IPS_ANNOTATION: "127.0.0.1"}}}),
    );
    let dup = service(
        "dup",
        json!({"metadata": {"creationTimestamp": "2030-01-01T00:00:00Z"}, "spec": {"loadBalancerIP": "198.51.100.1"}}),
    );
    let other_port = service(
        "other-port",
        json!({"spec": {"loadBalancerIP": "198.51.100.1", "ports": [{"name": "https", "port": 443}]}}),
    );
    let sctp = service(
        "sctp",
        json!({"spec": {"loadBalancerIP": "198.51.100.9", "ports": [{"port": 9, "protocol": "SCTP"}]}}),
    );
    let es = slice(
        "good-1",
        "good",
        "IPv4",
        json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["not-an-ip"]}, {"addresses": ["198.51.100.1"]}]),
    );
    let t = translate(
        &[good, bad_ip, loopback, dup, other_port, sctp],
        &[es],
        &opts(),
    );
    let served: Vec<_> = t.desired.vips.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(served, ["default/good:http", "default/other-port:https"]);
    assert_eq!(
        backends(&t, 0),
        vec![(ip("10.0.0.1"), BackendState::Active, 1)]
    );
    let reasons: Vec<String> = t.skipped.iter().map(ToString::to_string).collect();
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    assert!(
        has("Service default/bad-ip: spec.loadBalancerIP \"300.1.1.1\" is not an IP address"),
        "{reasons:?}"
    );
    assert!(
        has(
            "Service default/lo: annotation xlb.dev/load-balancer-ips 127.0.0.1 is a loopback address"
        ),
        "{reasons:?}"
    );
    assert!(
        has("Service default/dup: 198.51.100.1:80/tcp is already served for Service default/good"),
        "{reasons:?}"
    );
    assert!(
        has("Service default/sctp: port 9 protocol SCTP is not supported"),
        "{reasons:?}"
    );
    assert!(
        has("EndpointSlice default/good-1: endpoint address \"not-an-ip\""),
        "{reasons:?}"
    );
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    t.desired.validate().unwrap();
}

#[test]
fn same_endpoint_in_two_slices_active_wins() {
    let svc = service("web", json!({"spec": {"loadBalancerIP": "198.51.100.1"}}));
    let a = slice(
        "web-a",
        "web",
        "IPv4",
        json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}}]),
    );
    let b = slice(
        "web-b",
        "web",
        "IPv4",
        json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]),
    );
    let other_ns: EndpointSlice = {
        let mut s = slice("web-c", "web", "IPv4", json!([{"addresses": ["10.0.0.7"]}]));
        s.metadata.namespace = Some("elsewhere".into());
        s
    };
    let t = translate(&[svc], &[a, b, other_ns], &opts());
    assert_eq!(
        backends(&t, 0),
        vec![(ip("10.0.0.1"), BackendState::Active, 1)]
    );
}

#[test]
fn pools_parse() {
    let p: Pool = "10.0.0.10-10.0.0.12".parse().unwrap();
    let used = BTreeSet::from([ip("10.0.0.10")]);
    assert_eq!(allocate(&[p], false, &used), Some(ip("10.0.0.11")));
    assert_eq!(allocate(&[p], true, &used), None);
    let big: Pool = "2001:db8::/64".parse().unwrap();
    assert_eq!(
        allocate(&[big], true, &BTreeSet::new()),
        Some(ip("2001:db8::"))
    );
    let slash32: Pool = "10.1.1.1/32".parse().unwrap();
    assert_eq!(
        allocate(&[slash32], false, &BTreeSet::new()),
        Some(ip("10.1.1.1"))
    );
    assert!("10.0.0.5-10.0.0.1".parse::<Pool>().is_err());
    assert!("10.0.0.0/33".parse::<Pool>().is_err());
    assert!("10.0.0.1-2001:db8::1".parse::<Pool>().is_err());
    assert!("nope".parse::<Pool>().is_err());
}

/// Random EndpointSlice edits (endpoints, conditions, labels, bad and VIP addresses,
/// slices created and deleted) over Services that are served, conflicting, dual-stack,
/// allocated or skipped: patching the previous translation gives exactly the full
/// translation of the same objects, step after step.
#[test]
fn patching_slice_changes_equals_translating_everything() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let services: Vec<Service> = (0..8)
        .map(|i| {
            let created = format!("2024-01-01T00:00:0{i}Z");
            let extra = match i {
                // Requested addresses, one port or two.
                0 | 1 => json!({"spec": {"loadBalancerIP": format!("198.51.100.{}", i + 1)}}),
                2 => json!({"metadata": {"annotations": {IPS_ANNOTATION: "198.51.100.3,2001:db8:5::3"}},
                            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                               {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
                // Allocated from the pools, dual stack.
                3 => json!({"spec": {"ipFamilies": ["IPv4", "IPv6"]}}),
                4 => json!({}),
                // Conflicts with svc0 (newer): skipped after its backends were read.
                5 => json!({"spec": {"loadBalancerIP": "198.51.100.1"}}),
                // A protocol xlb does not serve, on its second port.
                6 => json!({"spec": {"loadBalancerIP": "198.51.100.7",
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                      {"name": "sctp", "port": 9, "protocol": "SCTP"}]}}),
                // Not ours.
                _ => json!({"metadata": {"annotations": {CLASS_ANNOTATION: "other"}}}),
            };
            let mut svc = service(&format!("svc{i}"), extra);
            svc.metadata.creation_timestamp = Some(serde_json::from_value(json!(created)).unwrap());
            svc
        })
        .collect();
    let addresses = [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.4",
        "fd00::1",
        "fd00::2",
        // A VIP, a loopback address, garbage.
        "198.51.100.2",
        "127.0.0.1",
        "not-an-ip",
    ];
    let random_slice = |rng: &mut StdRng, name: &str| -> EndpointSlice {
        let family = if rng.random_bool(0.3) { "IPv6" } else { "IPv4" };
        let endpoints: Vec<Value> = (0..rng.random_range(0..4))
            .map(|_| {
                let mut conditions = serde_json::Map::new();
                for c in ["ready", "serving", "terminating"] {
                    if rng.random_bool(0.6) {
                        conditions.insert(c.into(), json!(rng.random_bool(0.5)));
                    }
                }
                json!({"addresses": [addresses[rng.random_range(0..addresses.len())]],
                       "conditions": conditions})
            })
            .collect();
        let service = format!("svc{}", rng.random_range(0..9));
        slice(name, &service, family, json!(endpoints))
    };
    let mut patched_steps = 0;
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut slices: Vec<EndpointSlice> = (0..8)
            .map(|j| random_slice(&mut rng, &format!("es{j}")))
            .collect();
        let (mut previous, mut index) = translate_indexed(&services, &slices, &opts());
        let mut next_name = slices.len();
        for step in 0..60 {
            let mut changes: Vec<SliceChange> = Vec::new();
            for _ in 0..rng.random_range(1..3) {
                let label = |s: &EndpointSlice| s.label(SERVICE_NAME_LABEL).map(str::to_owned);
                match rng.random_range(0..4) {
                    0 if !slices.is_empty() => {
                        let gone = slices.remove(rng.random_range(0..slices.len()));
                        changes.push(("default".into(), gone.metadata.name.clone().unwrap(), None));
                    }
                    1 => {
                        let name = format!("es{next_name}");
                        next_name += 1;
                        let new = random_slice(&mut rng, &name);
                        changes.push(("default".into(), name, label(&new)));
                        slices.push(new);
                    }
                    _ if !slices.is_empty() => {
                        let j = rng.random_range(0..slices.len());
                        let name = slices[j].metadata.name.clone().unwrap();
                        slices[j] = random_slice(&mut rng, &name);
                        changes.push(("default".into(), name, label(&slices[j])));
                    }
                    _ => {}
                }
            }
            let (full, full_index) = translate_indexed(&services, &slices, &opts());
            // The cache lookup the source does, over the slices as they are now.
            let lookup = |namespace: &str, name: &str| {
                slices.iter().find(|s| {
                    s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                        && s.metadata.name.as_deref() == Some(name)
                })
            };
            match patch_slices(&previous, &mut index, changes, lookup) {
                Patch::Changed(patched) => {
                    patched_steps += 1;
                    assert_eq!(patched, full, "seed {seed} step {step}");
                }
                Patch::Unchanged => assert_eq!(previous, full, "seed {seed} step {step}"),
                Patch::Full => index = full_index,
            }
            previous = full;
        }
    }
    // Most steps touch only served Services: the patch path is what was tested.
    assert!(patched_steps > 200, "only {patched_steps} steps patched");
}

/// The Lease holder's status writes come back as Service events; [`is_status_echo`] lets
/// the source skip translating them. Whenever it says so, translating everything again
/// must give the same translation and index, on random clusters: requested, status-held
/// and allocated addresses, dual stack, exhausted pools, conflicts, Services not ours, and
/// statuses rewritten to the decided addresses, to others, or cleared, step after step.
#[test]
fn status_echo_translates_the_same() {
    use rand::rngs::StdRng;
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};

    // Small pools, so that allocation order matters and pools run out.
    let opts = TranslateOptions {
        pools: vec![
            "192.0.2.1-192.0.2.4".parse().unwrap(),
            "198.51.100.8/30".parse().unwrap(),
            "2001:db8::/126".parse().unwrap(),
        ],
        ..TranslateOptions::default()
    };
    let addresses = [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
        "198.51.100.9",
        "203.0.113.5",
        "2001:db8::1",
        "2001:db8::2",
        "not-an-ip",
    ];
    let status = |ips: &[&str]| -> Option<crate::kubernetes::objects::ServiceStatus> {
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        Some(serde_json::from_value(json!({"loadBalancer": {"ingress": ingress}})).unwrap())
    };
    let random_service = |rng: &mut StdRng, i: usize| -> Service {
        let mut extra = json!({"metadata": {
            // Ties on purpose: then the name orders.
            "creationTimestamp": format!("2024-01-01T00:00:0{}Z", rng.random_range(0..4))}});
        match rng.random_range(0..10) {
            0 => merge(
                &mut extra,
                json!({"spec": {"loadBalancerIP": addresses.choose(rng).unwrap()}}),
            ),
            1 => merge(
                &mut extra,
                json!({"spec": {"ipFamilies": ["IPv4", "IPv6"]}}),
            ),
            2 => merge(&mut extra, json!({"spec": {"ipFamilies": ["IPv6"]}})),
            3 => merge(
                &mut extra,
                json!({"metadata": {"annotations": {CLASS_ANNOTATION: "other"}}}),
            ),
            _ => {}
        }
        if rng.random_bool(0.3) {
            // Another port number: two Services on one address conflict only on the same port.
            merge(
                &mut extra,
                json!({"spec": {"ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}}),
            );
        }
        let mut svc = service(&format!("svc{i}"), extra);
        if rng.random_bool(0.3) {
            svc.status = status(&[addresses.choose(rng).unwrap()]);
        }
        svc
    };
    let endpoints = json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                           {"addresses": ["fd00::1"], "conditions": {"ready": true}}]);
    let mut echoes = 0;
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = rng.random_range(3..9);
        let mut services: Vec<Service> = (0..count).map(|i| random_service(&mut rng, i)).collect();
        let slices: Vec<EndpointSlice> = (0..count)
            .flat_map(|i| {
                let name = format!("svc{i}");
                [
                    slice(&format!("{name}-v4"), &name, "IPv4", endpoints.clone()),
                    slice(&format!("{name}-v6"), &name, "IPv6", endpoints.clone()),
                ]
            })
            .collect();
        for step in 0..40 {
            let (previous, index) = translate_indexed(&services, &slices, &opts);
            let j = rng.random_range(0..services.len());
            let before = services[j].clone();
            let id = ("default".to_string(), format!("svc{j}"));
            let decided: Option<Vec<String>> = previous
                .addresses
                .get(&id)
                .map(|a| a.iter().map(ToString::to_string).collect());
            let mut after = before.clone();
            match rng.random_range(0..6) {
                // What the status writer writes.
                0..=2 => {
                    if let Some(decided) = &decided {
                        let ips: Vec<&str> = decided.iter().map(String::as_str).collect();
                        after.status = status(&ips);
                    }
                }
                3 => after.status = status(&[addresses.choose(&mut rng).unwrap()]),
                4 => after.status = None,
                // The spec changes too.
                _ => after = random_service(&mut rng, j),
            }
            let echo = is_status_echo(&previous, &index, &before, &after);
            let written = decided
                .as_ref()
                .is_some_and(|d| after.ingress_ips().eq(d.iter()));
            if before.same_but_status(&after) && written && index.patchable {
                assert!(
                    echo,
                    "seed {seed} step {step}: the status writer's own write"
                );
            }
            services[j] = after;
            if echo {
                echoes += 1;
                let (again, again_index) = translate_indexed(&services, &slices, &opts);
                assert_eq!(again, previous, "seed {seed} step {step}");
                assert_eq!(again_index, index, "seed {seed} step {step}");
            }
        }
    }
    assert!(echoes > 300, "only {echoes} echoes were checked");
}

#[test]
fn status_echo_is_only_the_decided_addresses() {
    let opts = opts();
    let a = service("a", json!({}));
    let (previous, index) = translate_indexed(std::slice::from_ref(&a), &[], &opts);
    let with_status = |ips: Value| {
        let mut s = a.clone();
        s.status = serde_json::from_value(json!({"loadBalancer": {"ingress": ips}})).unwrap();
        s
    };
    assert_eq!(
        previous.addresses.values().next(),
        Some(&vec![ip("192.0.2.1")])
    );
    assert!(is_status_echo(
        &previous,
        &index,
        &a,
        &with_status(json!([{"ip": "192.0.2.1"}]))
    ));
    // Another address, one more, none, or a changed spec: translate again.
    for ips in [
        json!([{"ip": "192.0.2.2"}]),
        json!([{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}]),
        json!([]),
    ] {
        assert!(!is_status_echo(&previous, &index, &a, &with_status(ips)));
    }
    let mut moved = with_status(json!([{"ip": "192.0.2.1"}]));
    moved.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    assert!(!is_status_echo(&previous, &index, &a, &moved));
}
