//! The Kubernetes source against a real kube-apiserver (tests/src/kube.rs): Services and
//! EndpointSlices created, scaled, made terminating and deleted reach the desired state; a
//! bad object among good ones is skipped with an Event; two agents race for the Lease and
//! only the holder writes status. The source runs in-process, so no root is needed.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use lb_userspace::kubernetes::source::start;
use lb_userspace::kubernetes::translate::IPS_ANNOTATION;
use serde_json::json;
use xlb_tests::kube::KubeServer;
use xlb_tests::kube::runtime;
use xlb_tests::kube::source::{backends, delete, options, put, service, slice, vip, wait_update};

const WAIT: Duration = Duration::from_secs(30);

fn ready(ip: &str) -> serde_json::Value {
    json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}})
}

#[test]
fn kube_lifecycle_reaches_desired_state_and_status() {
    let server = KubeServer::shared();
    runtime().block_on(async {
        let client = server.client().await;
        let class = "test.xlb.dev/lifecycle";
        let mut rx = start(client.clone(), options(class, "node-a"));
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");

        put(&services, &service("default", "web", class, json!({"spec": {"sessionAffinity": "ClientIP"}}))).await;
        put(&slices, &slice("default", "web-1", "web", json!([ready("10.1.0.1"), ready("10.1.0.2")]))).await;
        let u = wait_update(&mut rx, "web with 2 backends", WAIT, |u| {
            vip(u, "default/web:http").is_some_and(|v| v.backends.len() == 2)
        })
        .await;
        let web = vip(&u, "default/web:http").expect("web");
        // Allocated from the pool (first usable address of 192.0.2.0/28).
        assert_eq!(web.key.to_string(), "192.0.2.1:80/tcp");
        assert!(web.source_affinity);
        assert!(u.since.elapsed() < WAIT);

        // The Lease holder (the only agent here) writes the allocated VIP to status.
        xlb_tests::agent_support::wait_for("status.loadBalancer written", WAIT, || {
            let text = server.get("/api/v1/namespaces/default/services/web")?;
            text.contains("\"ip\": \"192.0.2.1\"").then_some(())
        });

        // Scale up.
        put(&slices, &slice("default", "web-1", "web", json!([ready("10.1.0.1"), ready("10.1.0.2"), ready("10.1.0.3")]))).await;
        wait_update(&mut rx, "3 backends", WAIT, |u| {
            vip(u, "default/web:http").is_some_and(|v| v.backends.len() == 3)
        })
        .await;

        // One terminating but serving: draining; one not serving: gone.
        put(
            &slices,
            &slice(
                "default",
                "web-1",
                "web",
                json!([
                    ready("10.1.0.1"),
                    {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                ]),
            ),
        )
        .await;
        let u = wait_update(&mut rx, "one draining backend", WAIT, |u| {
            vip(u, "default/web:http").is_some_and(|v| v.backends.len() == 2)
        })
        .await;
        assert_eq!(
            backends(vip(&u, "default/web:http").expect("web")),
            vec![("10.1.0.1".into(), false), ("10.1.0.2".into(), true)]
        );

        // Slice deleted: no backends; Service deleted: no VIP.
        delete(&slices, "web-1").await;
        wait_update(&mut rx, "no backends", WAIT, |u| {
            vip(u, "default/web:http").is_some_and(|v| v.backends.is_empty())
        })
        .await;
        delete(&services, "web").await;
        wait_update(&mut rx, "no VIPs", WAIT, |u| u.translation.desired.vips.is_empty()).await;
    });
}

#[test]
fn kube_bad_object_is_skipped_with_event_and_others_keep_working() {
    let server = KubeServer::shared();
    runtime().block_on(async {
        let client = server.client().await;
        let class = "test.xlb.dev/bad";
        let mut rx = start(client.clone(), options(class, "node-a"));
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");

        let ips = |ip: &str| json!({"metadata": {"annotations": {IPS_ANNOTATION: ip}}});
        put(
            &services,
            &service("default", "good", class, ips("198.51.100.10")),
        )
        .await;
        put(
            &services,
            &service("default", "unparseable", class, ips("300.1.2.3")),
        )
        .await;
        put(
            &slices,
            &slice(
                "default",
                "good-1",
                "good",
                json!([ready("10.2.0.1"), ready("not-an-ip")]),
            ),
        )
        .await;
        let u = wait_update(&mut rx, "good served, unparseable skipped", WAIT, |u| {
            vip(u, "default/good:http").is_some_and(|v| v.backends.len() == 1)
                && u.translation
                    .skipped
                    .iter()
                    .any(|s| s.name == "unparseable")
        })
        .await;
        let reasons: Vec<String> = u
            .translation
            .skipped
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("Service default/unparseable")
                    && r.contains("\"300.1.2.3\" is not an IP address")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("EndpointSlice default/good-1") && r.contains("not-an-ip")),
            "{reasons:?}"
        );

        // A second Service wanting the same VIP and port: the newer one is skipped.
        tokio::time::sleep(Duration::from_millis(1100)).await; // creationTimestamp has 1 s resolution
        put(
            &services,
            &service("default", "thief", class, ips("198.51.100.10")),
        )
        .await;
        let u = wait_update(&mut rx, "thief skipped", WAIT, |u| {
            u.translation.skipped.iter().any(|s| s.name == "thief")
        })
        .await;
        assert!(vip(&u, "default/good:http").is_some());
        let thief = u
            .translation
            .skipped
            .iter()
            .find(|s| s.name == "thief")
            .expect("thief");
        assert!(
            thief
                .reason
                .contains("already served for Service default/good"),
            "{thief}"
        );

        // Each skipped object gets a Warning Event.
        let events: Api<Event> = Api::namespaced(client.clone(), "default");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let list = events
                .list(&ListParams::default())
                .await
                .expect("list events");
            let regarding: Vec<String> = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("Skipped"))
                .filter_map(|e| e.regarding.as_ref()?.name.clone())
                .collect();
            if ["unparseable", "thief", "good-1"]
                .iter()
                .all(|n| regarding.iter().any(|r| r == n))
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Skipped events missing: {regarding:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for name in ["good", "unparseable", "thief"] {
            delete(&services, name).await;
        }
        delete(&slices, "good-1").await;
    });
}

#[test]
fn kube_two_agents_race_for_the_lease_one_writes_status() {
    let server = KubeServer::shared();
    runtime().block_on(async {
        let client = server.client().await;
        let class = "test.xlb.dev/race";
        let opts_a = options(class, "node-a");
        let lease_name = opts_a.lease_name.clone();
        let mut a = start(client.clone(), opts_a);
        let mut b = start(client.clone(), options(class, "node-b"));
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        put(&services, &service("default", "raced", class, json!({}))).await;
        // Both program the same VIP from the same data, leader or not.
        let ua = wait_update(&mut a, "a sees raced", WAIT, |u| {
            vip(u, "default/raced:http").is_some()
        })
        .await;
        let ub = wait_update(&mut b, "b sees raced", WAIT, |u| {
            vip(u, "default/raced:http").is_some()
        })
        .await;
        assert_eq!(ua.translation.desired, ub.translation.desired);

        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
        // The Lease is created by whichever agent's first attempt lands first.
        let deadline = std::time::Instant::now() + WAIT;
        let holder = loop {
            let lease = leases.get_opt(&lease_name).await.expect("get lease");
            if let Some(holder) = lease.and_then(|l| l.spec?.holder_identity) {
                break holder;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nobody took the Lease"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(holder == "node-a" || holder == "node-b", "{holder}");

        // Status written, and only by the holder (the field manager names the agent).
        let deadline = std::time::Instant::now() + WAIT;
        let managers = loop {
            let svc = services.get("raced").await.expect("get raced");
            let ip = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .and_then(|i| i.first())
                .and_then(|i| i.ip.clone());
            if ip.is_some() {
                assert_eq!(ip.as_deref(), Some("192.0.2.1"));
                break svc
                    .metadata
                    .managed_fields
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|m| m.manager)
                    .filter(|m| m.starts_with("xlb/"))
                    .collect::<Vec<_>>();
            }
            assert!(std::time::Instant::now() < deadline, "status never written");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(managers, vec![format!("xlb/{holder}")]);
        delete(&services, "raced").await;
    });
}

/// Status writers of a Service (field managers named `xlb/…`).
async fn status_writers(services: &Api<Service>, name: &str) -> Option<(String, Vec<String>)> {
    let svc = services.get_opt(name).await.ok()??;
    let ip = svc.status?.load_balancer?.ingress?.first()?.ip.clone()?;
    let managers = svc
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .filter(|m| m.starts_with("xlb/"))
        .collect();
    Some((ip, managers))
}

/// Waits (bounded by [`WAIT`]) for a Service's status to be written; its first ingress
/// address and the `xlb/…` field managers.
async fn wait_status_writers(
    services: &Api<Service>,
    name: &str,
    what: &str,
) -> (String, Vec<String>) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(written) = status_writers(services, name).await {
            return written;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn kube_lease_fails_over_when_the_holder_goes_away() {
    let server = KubeServer::shared();
    let class = "test.xlb.dev/failover";
    let short = |identity: &str| {
        let mut opts = options(class, identity);
        opts.lease_duration = Duration::from_secs(4);
        opts
    };
    // Agent A in a runtime of its own: dropping that runtime is the agent dying.
    let rt_a = runtime();
    let mut a = rt_a.block_on(async { start(server.client().await, short("node-a")) });
    // A's agent: applies every update (which releases its status writes).
    rt_a.spawn(async move {
        while let Some(mut update) = a.recv().await {
            update.applied();
        }
    });
    let rt = runtime();
    rt.block_on(async {
        let client = server.client().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        put(&services, &service("default", "first", class, json!({}))).await;
        let (ip, managers) = wait_status_writers(&services, "first", "A never wrote status").await;
        assert_eq!(ip, "192.0.2.1");
        assert_eq!(managers, ["xlb/node-a"]);
    });
    // A goes away with its runtime.
    drop(rt_a);
    rt.block_on(async {
        let client = server.client().await;
        let mut b = start(client.clone(), short("node-b"));
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        put(&services, &service("default", "second", class, json!({}))).await;
        // B programs both at once (followers do not wait for status) …
        let u = wait_update(&mut b, "B sees both", WAIT, |u| {
            vip(u, "default/first:http").is_some() && vip(u, "default/second:http").is_some()
        })
        .await;
        assert_eq!(
            vip(&u, "default/second:http")
                .expect("second")
                .key
                .to_string(),
            "192.0.2.2:80/tcp"
        );
        // … and takes the Lease over once A's expires, then writes the new Service's status.
        let (ip, managers) =
            wait_status_writers(&services, "second", "B never took over the status writes").await;
        assert_eq!(ip, "192.0.2.2");
        assert_eq!(managers, ["xlb/node-b"]);
        delete(&services, "first").await;
        delete(&services, "second").await;
    });
}

/// The Lease holder writes a Service's status once its update was applied: until the
/// consumer (the agent) says so, the VIP it decided stays out of the status.
#[test]
fn kube_status_is_written_after_the_update_is_applied() {
    let server = KubeServer::shared();
    runtime().block_on(async {
        let client = server.client().await;
        let class = "test.xlb.dev/after-apply";
        let mut rx = start(client.clone(), options(class, "node-a"));
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        put(&services, &service("default", "held", class, json!({}))).await;
        // Received but not applied.
        let deadline = std::time::Instant::now() + WAIT;
        let mut held = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let update = tokio::time::timeout(left, rx.recv())
                .await
                .expect("no update with the Service")
                .expect("the source ended");
            if vip(&update, "default/held:http").is_some() {
                break update;
            }
        };
        // The Lease is taken within its first attempt; give the writer time it would use.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            status_writers(&services, "held").await,
            None,
            "status written before the update was applied"
        );
        held.applied();
        let (ip, managers) = wait_status_writers(
            &services,
            "held",
            "status never written after the update was applied",
        )
        .await;
        assert_eq!(ip, "192.0.2.1");
        assert_eq!(managers, ["xlb/node-a"]);
        delete(&services, "held").await;
    });
}
