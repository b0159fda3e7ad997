//! Live config changes through the real `xlb agent`: a change reaches the maps, an invalid
//! file is rejected and leaves the maps untouched, a removed VIP takes its connection
//! entries and next-hop cache with it, and the CLI's JSON reads back what was configured.

use std::path::Path;
use std::time::Duration;

use lb_common::{FlowKey, FlowState, NextHop, PROTO_TCP, PROTO_UDP};
use lb_userspace::datapath::Maps;
use lb_userspace::model::address_words;
use serde_json::Value;
use xlb_tests::agent_support::*;
use xlb_tests::netns::PinDir;
use xlb_tests::require_root;

const WEB: &str = WEB_VIP_TOML;

const WEB_AND_DNS: &str = r#"
[[vips]]
name = "web"
address = "203.0.113.10"
port = 80
[[vips.backends]]
address = "198.51.100.11"
weight = 3
[[vips.backends]]
address = "198.51.100.12"
state = "draining"
[[vips.backends]]
address = "198.51.100.13"

[[vips]]
name = "dns"
address = "203.0.113.53"
protocol = "udp"
port = 53
source_affinity = true
[[vips.backends]]
address = "198.51.100.21"
"#;

const METRICS_PORT: u16 = 9430;

struct Running {
    topo: Topology,
    pin_dir: PinDir,
    scratch: Scratch,
    config: std::path::PathBuf,
    agent: XlbProcess,
}

fn start(tag: &str, vips: &str) -> Running {
    require_root();
    let topo = Topology::new(tag);
    let pin_dir = PinDir::new(tag);
    let scratch = Scratch::new(tag);
    let config = scratch.path.join("xlb.toml");
    write_atomically(&config, &agent_config(&topo.lb_if, &pin_dir, vips));
    let state_dir = scratch.path.join("state");
    let mut agent = XlbProcess::spawn(
        &topo.lb,
        &[
            "agent",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state_dir.to_str().unwrap(),
        ],
        scratch.path.join("agent.log"),
    );
    agent.wait_log("agent ready", Duration::from_secs(20));
    Running {
        topo,
        pin_dir,
        scratch,
        config,
        agent,
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.agent.terminate();
        let _ = xlb(&["unload", "--pin-dir", self.pin_dir.path.to_str().unwrap()]);
    }
}

fn vips(pin_dir: &Path) -> Value {
    xlb_json(&["vips"], pin_dir)
}

/// The configuration-derived part of `xlb vips -o json` (counters dropped).
fn shape(vips: &Value) -> Value {
    let mut vips = vips.clone();
    for vip in vips.as_array_mut().unwrap() {
        let vip = vip.as_object_mut().unwrap();
        for counter in ["packets", "bytes", "new_connections"] {
            vip.remove(counter);
        }
        for backend in vip["backends"].as_array_mut().unwrap() {
            let backend = backend.as_object_mut().unwrap();
            backend.remove("packets");
            backend.remove("bytes");
        }
    }
    vips
}

fn backend<'a>(vip: &'a Value, address: &str) -> &'a Value {
    vip["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address)
        .unwrap_or_else(|| panic!("backend {address} missing in {vip}"))
}

fn flow(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_be: address_words(src.parse().unwrap()).0,
        dst_be: address_words(dst.parse().unwrap()).0,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        family: lb_common::FAMILY_V4,
        _pad: [0; 2],
    }
}

#[test]
fn live_config_change_reaches_the_maps_and_cli_json_reads_back_the_config() {
    let mut run = start("live", WEB);
    let before = vips(&run.pin_dir.path);
    assert_eq!(before.as_array().unwrap().len(), 1);
    let id_11 = backend(&before[0], "198.51.100.11")["id"].clone();
    let id_12 = backend(&before[0], "198.51.100.12")["id"].clone();

    write_atomically(
        &run.config,
        &agent_config(&run.topo.lb_if, &run.pin_dir, WEB_AND_DNS),
    );
    let after = wait_for(
        "the new config in the maps",
        Duration::from_secs(10),
        || {
            let v = vips(&run.pin_dir.path);
            (v.as_array().unwrap().len() == 2).then_some(v)
        },
    );
    run.agent.wait_log("config applied", Duration::from_secs(5));

    // The CLI's JSON is the config: names, keys, flags, weights, states.
    let web = &after[0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["address"], "203.0.113.10");
    assert_eq!(web["protocol"], "tcp");
    assert_eq!(web["port"], 80);
    assert_eq!(web["mode"], "encap");
    assert_eq!(web["source_affinity"], false);
    assert_eq!(web["backends_total"], 3);
    assert_eq!(
        web["backends_active"], 2,
        "the draining backend has no slots"
    );
    let b11 = backend(web, "198.51.100.11");
    let b12 = backend(web, "198.51.100.12");
    let b13 = backend(web, "198.51.100.13");
    assert_eq!(b11["id"], id_11, "backend ids are stable");
    assert_eq!(
        b12["id"], id_12,
        "a draining backend keeps its id and entry"
    );
    assert_eq!(
        (b11["weight"].as_u64(), b11["state"].as_str()),
        (Some(3), Some("active"))
    );
    assert_eq!(
        (b12["weight"].as_u64(), b12["state"].as_str()),
        (Some(1), Some("draining"))
    );
    assert_eq!(b12["slots"], 0);
    let (s11, s13) = (
        b11["slots"].as_u64().unwrap(),
        b13["slots"].as_u64().unwrap(),
    );
    assert_eq!(s11 + s13, 251);
    assert!(
        (s11 as f64 / s13 as f64 - 3.0).abs() < 0.2,
        "weights 3:1 give {s11}:{s13}"
    );
    assert_ne!(
        web["ring"], before[0]["ring"],
        "a changed table goes to the idle ring"
    );
    let dns = &after[1];
    assert_eq!(
        (
            dns["name"].as_str(),
            dns["protocol"].as_str(),
            dns["port"].as_u64()
        ),
        (Some("dns"), Some("udp"), Some(53))
    );
    assert_eq!(dns["source_affinity"], true);
    assert_eq!(backend(dns, "198.51.100.21")["slots"], 251);

    // explain agrees with the live table, and shows a connection entry when there is one.
    let explained = xlb_json(
        &["explain", "192.0.2.2:40000", "203.0.113.10:80", "tcp"],
        &run.pin_dir.path,
    );
    let hash = lb_common::flow_hash(
        &address_words("192.0.2.2".parse().unwrap()).0,
        40_000u16.to_be(),
        80u16.to_be(),
        PROTO_TCP,
        false,
    );
    assert_eq!(explained["hash"], hash);
    assert_eq!(explained["slot"], hash % 251);
    let maps = Maps::open_pinned(&run.pin_dir.path).unwrap();
    let ring = web["ring"].as_u64().unwrap() as u32;
    assert_eq!(
        explained["maglev_backend_id"],
        maps.maglev.slot(ring, hash % 251).unwrap()
    );
    assert_eq!(explained["conntrack"], Value::Null);
    drop(maps);

    // maglev diff: the live config moves nothing; dropping a backend moves some slots.
    let same = scratch_config(&run, "same.toml", WEB_AND_DNS);
    let diff = xlb_json(
        &["maglev", "diff", "--config", same.to_str().unwrap()],
        &run.pin_dir.path,
    );
    assert!(
        diff.as_array()
            .unwrap()
            .iter()
            .all(|r| r["change"] == "unchanged"),
        "{diff}"
    );
    let fewer = scratch_config(
        &run,
        "fewer.toml",
        &WEB_AND_DNS.replace(
            "address = \"198.51.100.13\"\n",
            "address = \"198.51.100.14\"\n",
        ),
    );
    let diff = xlb_json(
        &["maglev", "diff", "--config", fewer.to_str().unwrap()],
        &run.pin_dir.path,
    );
    let moved = diff[0]["moved_percent"].as_f64().unwrap();
    assert_eq!(diff[0]["change"], "changed");
    assert!(
        moved > 10.0 && moved < 80.0,
        "replacing one of two active backends moved {moved}%"
    );
    assert_eq!(diff[1]["change"], "unchanged");

    // Metrics: one apply, its latency observed, per-VIP series.
    let text = wait_for("metrics", Duration::from_secs(10), || {
        scrape_metrics(&run.topo.lb, METRICS_PORT)
    });
    assert_eq!(
        metric_value(&text, "xlb_config_applies_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "xlb_config_apply_failures_total"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&text, "xlb_config_apply_seconds_count"),
        Some(1.0)
    );
    assert!(
        metric_value(
            &text,
            "xlb_vip_packets_total{vip=\"dns\",service=\"203.0.113.53:53/udp\"}"
        )
        .is_some(),
        "{text}"
    );
    assert!(metric_value(&text, "xlb_packets_total{outcome=\"drop_no_backend\"}").is_some());
    assert!(
        metric_value(
            &text,
            "xlb_conntrack_events_total{event=\"insert_skipped\"}"
        )
        .is_some()
    );
    assert_eq!(metric_value(&text, "xlb_conntrack_entries"), Some(0.0));
}

fn scratch_config(run: &Running, name: &str, vips: &str) -> std::path::PathBuf {
    let path = run.scratch.path.join(name);
    std::fs::write(&path, agent_config(&run.topo.lb_if, &run.pin_dir, vips)).unwrap();
    path
}

#[test]
fn invalid_config_is_rejected_and_the_maps_stay_untouched() {
    let mut run = start("inval", WEB_AND_DNS);
    let before = vips(&run.pin_dir.path);
    let maps = Maps::open_pinned(&run.pin_dir.path).unwrap();
    let rings_before: Vec<Vec<u32>> = (0..maps.maglev.rings())
        .map(|r| maps.maglev.read_ring(r).unwrap())
        .collect();

    let invalid = WEB_AND_DNS
        .replace("weight = 3", "weight = 70000")
        .replace("198.51.100.13", "198.51.100.14");
    write_atomically(
        &run.config,
        &agent_config(&run.topo.lb_if, &run.pin_dir, &invalid),
    );
    run.agent
        .wait_log("config rejected", Duration::from_secs(10));
    let log = run.agent.log_text();
    assert!(
        log.contains("vips[0].backends[0].weight"),
        "the message names the field: {log}"
    );
    assert!(log.contains("70000"), "and the value: {log}");

    assert_eq!(shape(&vips(&run.pin_dir.path)), shape(&before));
    let rings_after: Vec<Vec<u32>> = (0..maps.maglev.rings())
        .map(|r| maps.maglev.read_ring(r).unwrap())
        .collect();
    assert!(rings_after == rings_before, "no ring was written");
    let text = wait_for("metrics", Duration::from_secs(10), || {
        scrape_metrics(&run.topo.lb, METRICS_PORT)
    });
    assert_eq!(
        metric_value(&text, "xlb_config_apply_failures_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric_value(&text, "xlb_config_applies_total"), Some(0.0));

    // A syntax error is rejected too, and a valid file afterwards applies.
    write_atomically(&run.config, "[node\ninterfaces = ");
    wait_for("second rejection", Duration::from_secs(10), || {
        (run.agent.log_text().matches("config rejected").count() >= 2).then_some(())
    });
    assert_eq!(shape(&vips(&run.pin_dir.path)), shape(&before));
    write_atomically(
        &run.config,
        &agent_config(&run.topo.lb_if, &run.pin_dir, WEB),
    );
    wait_for("the valid config applied", Duration::from_secs(10), || {
        (vips(&run.pin_dir.path).as_array().unwrap().len() == 1).then_some(())
    });
}

#[test]
fn removing_a_vip_flushes_its_connections_and_backend_state() {
    let run = start("flush", WEB_AND_DNS);
    let mut maps = Maps::open_pinned(&run.pin_dir.path).unwrap();
    let web_flow = flow("192.0.2.2", 40_000, "203.0.113.10", 80, PROTO_TCP);
    let dns_flow = flow("192.0.2.2", 40_001, "203.0.113.53", 53, PROTO_UDP);
    let ids = vips(&run.pin_dir.path);
    let dns_backend = backend(&ids[1], "198.51.100.21")["id"].as_u64().unwrap() as u32;
    let web_id = ids[0]["vip_id"].as_u64().unwrap() as u32;
    let dns_id = ids[1]["vip_id"].as_u64().unwrap() as u32;
    for (key, vip_id, backend_id) in [(web_flow, web_id, 1), (dns_flow, dns_id, dns_backend)] {
        maps.conntrack
            .insert(
                &key,
                &FlowState {
                    backend_id,
                    vip_id,
                    last_seen_ns: 1,
                },
                0,
            )
            .unwrap();
    }
    // A cached next hop for the backend that goes away with the VIP.
    let cpus = aya::util::nr_cpus().unwrap().get() as usize;
    let cached = NextHop {
        ifindex: 7,
        mtu: 1500,
        expires_ns: u64::MAX,
        ..NextHop::default()
    };
    maps.nexthop
        .set(
            dns_backend,
            aya::maps::PerCpuValues::try_from(vec![cached; cpus]).unwrap(),
            0,
        )
        .unwrap();

    write_atomically(
        &run.config,
        &agent_config(&run.topo.lb_if, &run.pin_dir, WEB),
    );
    wait_for("the dns VIP removed", Duration::from_secs(10), || {
        (vips(&run.pin_dir.path).as_array().unwrap().len() == 1).then_some(())
    });
    assert!(
        maps.conntrack.get(&dns_flow, 0).is_err(),
        "the removed VIP's entries are flushed"
    );
    assert_eq!(
        maps.conntrack.get(&web_flow, 0).unwrap().vip_id,
        web_id,
        "other VIPs' entries stay"
    );
    assert_eq!(
        maps.backends.get(&dns_backend, 0).unwrap().family,
        0,
        "backend entry cleared"
    );
    let per_cpu = maps.nexthop.get(&dns_backend, 0).unwrap();
    assert!(
        per_cpu.iter().all(|n| *n == NextHop::default()),
        "next-hop cache zeroed on every CPU"
    );
    let entries: Vec<(FlowKey, FlowState)> = maps.conntrack_entries(10);
    assert_eq!(entries.len(), 1);
}
