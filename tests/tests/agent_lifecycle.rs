//! The real `xlb agent` in a real network namespace: pins, adoption across a restart,
//! SIGTERM leaving the datapath running, `xlb unload`, and the CLI's error lines.

use std::time::Duration;

use lb_common::{FlowKey, FlowState, PROTO_TCP};
use lb_userspace::datapath::Maps;
use lb_userspace::model::address_words;
use xlb_tests::agent_support::*;
use xlb_tests::netns::PinDir;
use xlb_tests::require_root;

const VIPS: &str = WEB_VIP_TOML;

fn rx_packets(pin_dir: &PinDir) -> u64 {
    let stats = xlb_json(&["stats"], &pin_dir.path);
    stats["balancer"]["rx_packets"]
        .as_u64()
        .expect("rx_packets")
}

fn flow_key() -> FlowKey {
    FlowKey {
        src_be: address_words("192.0.2.2".parse().unwrap()).0,
        dst_be: address_words("203.0.113.10".parse().unwrap()).0,
        sport_be: 40_000u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: PROTO_TCP,
        family: lb_common::FAMILY_V4,
        _pad: [0; 2],
    }
}

#[test]
fn agent_restart_adopts_pins_and_keeps_the_datapath_running() {
    require_root();
    let topo = Topology::new("r");
    let pin_dir = PinDir::new("restart");
    let scratch = Scratch::new("restart");
    let config = scratch.path.join("xlb.toml");
    write_atomically(&config, &agent_config(&topo.lb_if, &pin_dir, VIPS));
    let state_dir = scratch.path.join("state");
    let args = [
        "agent",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];

    let mut agent = XlbProcess::spawn(&topo.lb, &args, scratch.path.join("agent1.log"));
    agent.wait_log("agent ready", Duration::from_secs(20));
    assert_eq!(
        Topology::xdp_program(&topo.lb, &topo.lb_if).as_deref(),
        Some("xlb_balancer")
    );
    let vips_before = xlb_json(&["vips"], &pin_dir.path);
    // A connection entry, as the kernel would have made it: it must survive the restart.
    let mut maps = Maps::open_pinned(&pin_dir.path).unwrap();
    maps.conntrack
        .insert(
            &flow_key(),
            &FlowState {
                backend_id: 2,
                vip_id: 0,
                last_seen_ns: 1,
            },
            0,
        )
        .unwrap();
    drop(maps);
    topo.send_to_lb(5);
    let rx_first = wait_for("balancer counters to move", Duration::from_secs(10), || {
        let rx = rx_packets(&pin_dir);
        (rx > 0).then_some(rx)
    });

    // SIGTERM: the agent exits cleanly, the program stays attached and keeps counting.
    assert!(
        agent.terminate(),
        "agent exits 0 on SIGTERM:\n{}",
        agent.log_text()
    );
    assert_eq!(
        Topology::xdp_program(&topo.lb, &topo.lb_if).as_deref(),
        Some("xlb_balancer"),
        "the program stays attached after the agent exits"
    );
    topo.send_to_lb(5);
    let rx_stopped = wait_for(
        "counters while the agent is stopped",
        Duration::from_secs(10),
        || {
            let rx = rx_packets(&pin_dir);
            (rx > rx_first).then_some(rx)
        },
    );
    // The CLI works with the agent stopped.
    assert_eq!(xlb_json(&["vips"], &pin_dir.path), vips_before);

    // Restart: pins adopted, nothing rewritten, ids and rings unchanged, counters continue.
    let mut agent = XlbProcess::spawn(&topo.lb, &args, scratch.path.join("agent2.log"));
    agent.wait_log("agent ready", Duration::from_secs(20));
    let log = agent.log_text();
    assert!(log.contains("adopted a running datapath"), "{log}");
    assert!(log.contains("kept the pinned XDP link"), "{log}");
    assert!(
        log.contains("ops=0"),
        "an unchanged config writes nothing on adoption: {log}"
    );
    let vips_after = xlb_json(&["vips"], &pin_dir.path);
    assert_eq!(vips_after[0]["vip_id"], vips_before[0]["vip_id"]);
    assert_eq!(vips_after[0]["ring"], vips_before[0]["ring"]);
    assert_eq!(vips_after[0]["backends"], {
        // Counters are part of the rows; ids, weights and slots must be identical.
        let mut b = vips_before[0]["backends"].clone();
        for (row, after) in b
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .zip(vips_after[0]["backends"].as_array().unwrap())
        {
            row["packets"] = after["packets"].clone();
            row["bytes"] = after["bytes"].clone();
        }
        b
    });
    assert!(
        rx_packets(&pin_dir) >= rx_stopped,
        "counters continue, not reset"
    );
    let maps = Maps::open_pinned(&pin_dir.path).unwrap();
    assert_eq!(
        maps.conntrack.get(&flow_key(), 0).unwrap().backend_id,
        2,
        "connection entries survive the restart"
    );
    drop(maps);
    let flows = xlb_json(&["conntrack", "--vip", "web"], &pin_dir.path);
    assert_eq!(flows.as_array().unwrap().len(), 1, "{flows}");
    assert_eq!(flows[0]["backend"], "198.51.100.12");

    assert!(agent.terminate());
    // Unload: detached, pins and state file gone.
    xlb_ok(&["unload", "--pin-dir", pin_dir.path.to_str().unwrap()]);
    assert_eq!(Topology::xdp_program(&topo.lb, &topo.lb_if), None);
    assert!(!pin_dir.path.exists());
    assert_eq!(
        std::fs::read_dir(&state_dir)
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the state file goes with the pins"
    );
}

#[test]
fn cli_without_pins_fails_with_one_line() {
    require_root();
    let missing = "/sys/fs/bpf/xlb-test-definitely-missing";
    for args in [
        vec!["vips", "--pin-dir", missing],
        vec!["stats", "--pin-dir", missing],
        vec!["unload", "--pin-dir", missing],
        vec![
            "explain",
            "192.0.2.2:1",
            "203.0.113.10:80",
            "tcp",
            "--pin-dir",
            missing,
        ],
    ] {
        let out = xlb(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
        assert!(stderr.contains("xlb-test-definitely-missing"), "{stderr}");
    }
}

#[test]
fn agent_with_an_invalid_config_does_not_start() {
    require_root();
    let topo = Topology::new("i");
    let pin_dir = PinDir::new("badstart");
    let scratch = Scratch::new("badstart");
    let config = scratch.path.join("xlb.toml");
    let text = agent_config(&topo.lb_if, &pin_dir, VIPS).replace("198.51.100.12", "198.51.100.300");
    write_atomically(&config, &text);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topo.lb.name))
        .arg(xlb_binary())
        .args(["agent", "--config", config.to_str().unwrap()])
        .env("XLB_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vips[0].backends[1].address") && stderr.contains("198.51.100.300"),
        "names the field and the value: {stderr}"
    );
    assert_eq!(Topology::xdp_program(&topo.lb, &topo.lb_if), None);
}
