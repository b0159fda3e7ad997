//! The real `xlb agent --kubernetes` in a network namespace with etcd and kube-apiserver on
//! that namespace's loopback: Services and EndpointSlices reach the pinned maps (read back
//! with `xlb vips -o json`), scaling and termination show up as backend changes, and the
//! Lease holder writes the allocated VIP to the Service's status. Needs root.

use std::time::Duration;

use serde_json::{Value, json};
use xlb_tests::agent_support::*;
use xlb_tests::kube::{KubeOptions, KubeServer};
use xlb_tests::netns::{NetNs, PinDir};
use xlb_tests::require_root;

const CLASS: &str = "test.xlb.dev/agent";
const WAIT: Duration = Duration::from_secs(30);

fn apply(server: &KubeServer, scratch: &Scratch, name: &str, object: Value) {
    let path = scratch.path.join(format!("{name}.json"));
    std::fs::write(&path, object.to_string()).expect("write manifest");
    let path = path.to_str().expect("utf-8 path");
    // Not `kubectl apply`: it takes the CRD-served EndpointSlice for the built-in type and
    // sends a strategic merge patch, which custom resources do not accept.
    let (ok, out) = server.kubectl(&["replace", "-f", path]);
    if !ok && out.contains("NotFound") {
        let (ok, out) = server.kubectl(&["create", "-f", path]);
        assert!(ok, "kubectl create {name}: {out}");
    } else {
        assert!(ok, "kubectl replace {name}: {out}");
    }
}

fn slice(endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "web-1",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// `(address, state)` of the backends of the VIP named `name` in the pinned maps.
fn backends(pin_dir: &PinDir, name: &str) -> Option<Vec<(String, String)>> {
    let vips = xlb_json(&["vips"], &pin_dir.path);
    let vip = vips.as_array()?.iter().find(|v| v["name"] == name)?;
    let mut out: Vec<(String, String)> = vip["backends"]
        .as_array()?
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or("").to_owned(),
                b["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    out.sort();
    Some(out)
}

#[test]
fn kube_agent_programs_services_into_the_maps() {
    let mut node = Node::start("xk", "", &["--kube-pool", "203.0.113.0/28"]);
    let (server, scratch, pin_dir) = (&node.server, &node.scratch, &node.pin_dir);

    apply(
        server,
        scratch,
        "service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "web",
                         "annotations": {"xlb.dev/load-balancer-class": CLASS}},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        }),
    );
    let ready = |ip: &str| json!({"addresses": [ip], "conditions": {"ready": true}});
    apply(
        server,
        scratch,
        "slice",
        slice(json!([ready("198.51.100.11"), ready("198.51.100.12")])),
    );
    wait_for("web with 2 backends in the maps", WAIT, || {
        backends(pin_dir, "default/web:http").filter(|b| b.len() == 2)
    });
    let vips = xlb_json(&["vips"], &pin_dir.path);
    let web = vips
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "default/web:http")
        .unwrap();
    assert_eq!(
        web["address"], "203.0.113.1",
        "allocated from the pool: {web}"
    );

    // Scaled to 3, then one terminating (serving): draining in the maps.
    apply(
        server,
        scratch,
        "slice",
        slice(json!([
            ready("198.51.100.11"),
            ready("198.51.100.12"),
            ready("198.51.100.13")
        ])),
    );
    wait_for("3 backends", WAIT, || {
        backends(pin_dir, "default/web:http").filter(|b| b.len() == 3)
    });
    apply(
        server,
        scratch,
        "slice",
        slice(json!([
            ready("198.51.100.11"),
            {"addresses": ["198.51.100.12"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ])),
    );
    let got = wait_for("one draining backend", WAIT, || {
        backends(pin_dir, "default/web:http")
            .filter(|b| b.len() == 2 && b.iter().any(|(_, s)| s == "draining"))
    });
    assert_eq!(
        got[0],
        ("198.51.100.11".to_owned(), "active".to_owned()),
        "{got:?}"
    );

    // The first sync is in the maps: ready.
    assert_eq!(
        get_in(&node.ns, 9430, "/readyz"),
        Some((200, "ready\n".to_owned()))
    );
    // API event → maps updated is measured.
    let text = scrape_metrics(&node.ns, 9430).expect("metrics served");
    let observed = metric_value(&text, "xlb_kubernetes_event_to_maps_seconds_count");
    assert!(
        observed.is_some_and(|n| n >= 3.0),
        "event-to-maps histogram: {observed:?}"
    );

    // The only agent holds the Lease and writes status.
    wait_for("status written", WAIT, || {
        let (ok, out) = server.kubectl(&[
            "get",
            "service",
            "web",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]);
        (ok && out.trim() == "203.0.113.1").then_some(())
    });

    // API server away: the maps keep the last state; back: changes flow again.
    let before = backends(pin_dir, "default/web:http");
    server.stop_apiserver();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        backends(pin_dir, "default/web:http"),
        before,
        "state changed without an API server"
    );
    server.start_apiserver();
    apply(
        server,
        scratch,
        "slice",
        slice(json!([ready("198.51.100.11"), ready("198.51.100.14")])),
    );
    wait_for("the change after the restart", WAIT, || {
        backends(pin_dir, "default/web:http")
            .filter(|b| b.iter().any(|(a, _)| a == "198.51.100.14"))
    });

    // Deleted: the VIP leaves the maps.
    let (ok, out) = server.kubectl(&["delete", "service", "web"]);
    assert!(ok, "{out}");
    wait_for("web gone from the maps", WAIT, || {
        backends(pin_dir, "default/web:http")
            .is_none()
            .then_some(())
    });
    assert!(node.agent.log_text().contains("kubernetes state applied"));
    let _ = node.agent.terminate();
}

/// IPv6 through Kubernetes into the maps: a Service asking for an IPv6 VIP (the API server
/// here is single-stack IPv4, so through the `xlb.dev/load-balancer-ips` annotation), a UDP
/// port whose EndpointSlice port carries a different number under the same name,
/// `sessionAffinity: ClientIP`, and an IPv6 EndpointSlice beside an IPv4 one that must be
/// left out.
#[test]
fn kube_agent_programs_ipv6_udp_with_affinity() {
    let mut node = Node::start("xk6", "tunnel_source_v6 = \"2001:db8:a::1\"", &[]);
    let (server, scratch, pin_dir) = (&node.server, &node.scratch, &node.pin_dir);

    apply(
        server,
        scratch,
        "service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "dns",
                         "annotations": {"xlb.dev/load-balancer-class": CLASS,
                                         "xlb.dev/load-balancer-ips": "2001:db8:f::53"}},
            "spec": {"type": "LoadBalancer", "sessionAffinity": "ClientIP",
                     "ports": [{"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]},
        }),
    );
    let slice = |name: &str, family: &str, addresses: &[&str]| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": name,
                         "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": family,
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": addresses.iter()
                .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
                .collect::<Vec<_>>(),
        })
    };
    apply(
        server,
        scratch,
        "slice6",
        slice("dns-v6", "IPv6", &["2001:db8:b:1::2", "2001:db8:b:2::2"]),
    );
    apply(
        server,
        scratch,
        "slice4",
        slice("dns-v4", "IPv4", &["198.51.100.53"]),
    );
    // The CLI takes backend states from the agent's state file, written at most twice a
    // second: until it catches up with the maps a backend's state reads as unknown ("").
    let got = wait_for("the IPv6 UDP VIP with 2 backends", WAIT, || {
        backends(pin_dir, "default/dns:dns")
            .filter(|b| b.len() == 2 && b.iter().all(|(_, state)| !state.is_empty()))
    });
    assert_eq!(
        got,
        vec![
            ("2001:db8:b:1::2".to_owned(), "active".to_owned()),
            ("2001:db8:b:2::2".to_owned(), "active".to_owned()),
        ],
        "only the IPv6 slice's endpoints"
    );
    let vips = xlb_json(&["vips"], &pin_dir.path);
    let dns = vips
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "default/dns:dns")
        .expect("the VIP")
        .clone();
    assert_eq!(dns["address"], "2001:db8:f::53", "{dns}");
    assert_eq!(dns["protocol"], "udp", "{dns}");
    assert_eq!(dns["port"], 53, "{dns}");
    assert_eq!(dns["source_affinity"], true, "{dns}");

    // One IPv6 endpoint becomes not ready: it leaves the VIP.
    apply(
        server,
        scratch,
        "slice6",
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": "dns-v6",
                         "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv6",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["2001:db8:b:1::2"], "conditions": {"ready": true}},
                {"addresses": ["2001:db8:b:2::2"], "conditions": {"ready": false}},
            ],
        }),
    );
    wait_for("one IPv6 backend left", WAIT, || {
        backends(pin_dir, "default/dns:dns").filter(|b| b.len() == 1)
    });
    let _ = node.agent.terminate();
}

/// One LB node for a test: a namespace with a veth pair, etcd and kube-apiserver on its
/// loopback, and `xlb agent --kubernetes` attached to the veth. Fields drop in order: the
/// agent is killed before the datapath is unloaded and the rest torn down.
struct Node {
    agent: XlbProcess,
    _unload: Unload,
    scratch: Scratch,
    pin_dir: PinDir,
    server: KubeServer,
    ns: NetNs,
}

impl Node {
    /// `tag` names the namespace, interfaces and directories; `node_extra` is added to the
    /// config's `[node]`, `args` to the agent's command line.
    fn start(tag: &str, node_extra: &str, args: &[&str]) -> Node {
        require_root();
        let ns = NetNs::new(tag);
        let (lb_if, peer_if) = (format!("{tag}a"), format!("{tag}b"));
        ns.ip(&[
            "link", "add", &lb_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &lb_if]);
        ns.ip(&["link", "set", &lb_if, "up"]);
        ns.ip(&["link", "set", &peer_if, "up"]);
        let server = KubeServer::start(KubeOptions {
            netns: Some(ns.name.clone()),
            ..KubeOptions::default()
        });
        let pin_dir = PinDir::new(tag);
        let scratch = Scratch::new(tag);
        let config = scratch.path.join("xlb.toml");
        let text = agent_config(&lb_if, &pin_dir, "").replacen(
            "[node]\n",
            &format!("[node]\n{node_extra}\n"),
            1,
        );
        write_atomically(&config, &text);
        let state_dir = scratch.path.join("state");
        let unload = Unload(pin_dir.path.clone());
        let identity = format!("node-{tag}");
        let mut argv = vec![
            "agent",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--kubernetes",
            "--kubeconfig",
            server.kubeconfig.to_str().unwrap(),
            "--kube-class",
            CLASS,
            "--kube-identity",
            &identity,
        ];
        argv.extend_from_slice(args);
        let mut agent = XlbProcess::spawn(&ns, &argv, scratch.path.join("agent.log"));
        agent.wait_log("agent ready", Duration::from_secs(20));
        Node {
            agent,
            _unload: unload,
            scratch,
            pin_dir,
            server,
            ns,
        }
    }
}

/// Unloads the datapath at the end, also when the test fails.
struct Unload(std::path::PathBuf);

impl Drop for Unload {
    fn drop(&mut self) {
        let _ = xlb(&["unload", "--pin-dir", self.0.to_str().unwrap()]);
    }
}
