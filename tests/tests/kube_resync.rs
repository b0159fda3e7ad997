//! The Kubernetes source across API-server trouble, each test with a server of its own:
//! a restart keeps the last state and the watches resume; an etcd compaction makes the
//! resumed watch answer 410 Gone, and the source relists and carries on.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use lb_userspace::kubernetes::source::start;
use serde_json::json;
use xlb_tests::kube::runtime;
use xlb_tests::kube::source::{options, put, service, slice, vip, wait_update};
use xlb_tests::kube::{KubeOptions, KubeServer};

const WAIT: Duration = Duration::from_secs(60);

fn endpoints(ips: &[&str]) -> serde_json::Value {
    ips.iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect()
}

/// Restarts the API server; blocking, so the runtime moves its other tasks off this thread.
fn restart(server: &KubeServer, compact: bool) {
    tokio::task::block_in_place(|| {
        if compact {
            server.compact_etcd();
        }
        server.stop_apiserver();
        server.start_apiserver();
    });
}

fn run_scenario(opts: KubeOptions, compact: bool) -> u64 {
    let server = KubeServer::start(opts);
    let server = &server;
    runtime().block_on(async {
        let client = server.client().await;
        let class = "test.xlb.dev/resync";
        let mut rx = start(client.clone(), options(class, "node-a"));
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let lb = json!({"spec": {"loadBalancerIP": "198.51.100.20"}});
        put(&services, &service("default", "web", class, lb.clone())).await;
        put(
            &slices,
            &slice("default", "web-1", "web", endpoints(&["10.3.0.1"])),
        )
        .await;
        wait_update(&mut rx, "web with 1 backend", WAIT, |u| {
            vip(u, "default/web:http").is_some_and(|v| v.backends.len() == 1)
        })
        .await;

        // Writes the watches do not see move etcd's revision past theirs, so after the
        // compaction their resourceVersion is gone.
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        for i in 0..5 {
            let cm: ConfigMap = serde_json::from_value(
                json!({"metadata": {"name": format!("churn-{i}")}, "data": {"i": i.to_string()}}),
            )
            .expect("cm");
            put(&maps, &cm).await;
        }
        restart(server, compact);

        // While the server was away nothing was sent (the last state keeps serving); now the
        // watches have resumed and see new changes.
        let client = server.client().await;
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        put(
            &slices,
            &slice(
                "default",
                "web-1",
                "web",
                endpoints(&["10.3.0.1", "10.3.0.2"]),
            ),
        )
        .await;
        let u = wait_update(&mut rx, "2 backends after the restart", WAIT, |u| {
            vip(u, "default/web:http").is_some_and(|v| v.backends.len() == 2)
        })
        .await;
        // Every update sent had web in it: an API-server outage never empties the state.
        assert!(vip(&u, "default/web:http").is_some());
        u.relists
    })
}

#[test]
fn kube_apiserver_restart_keeps_state_and_watches_resume() {
    run_scenario(KubeOptions::default(), false);
}

#[test]
fn kube_forced_410_gone_relists() {
    let relists = run_scenario(
        KubeOptions {
            no_watch_cache: true,
            ..KubeOptions::default()
        },
        true,
    );
    assert!(
        relists >= 1,
        "the resumed watch should have answered 410 Gone"
    );
}
