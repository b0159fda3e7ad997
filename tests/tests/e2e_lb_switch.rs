//! Scenario 5: flows moved mid-connection from LB node 1 to LB node 2 (same config, no shared
//! state) keep working, because both nodes build identical Maglev tables from the same
//! backend set.
//!
//! ```text
//!                         ┌─ rl1 ── eth0 LB node 1 eth1 ─┐
//!  client ── c0 / rc ── router (ECMP for the VIP)          bridge ── backends 1..3
//!                         └─ rl2 ── eth0 LB node 2 eth1 ─┘   │
//!                         └────────── rb ─────────────────────┘ (return path)
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use xlb_tests::agent_support::{Scratch, XlbProcess, wait_for};
use xlb_tests::netns::{NetNs, PinDir};
use xlb_tests::testbed::{BackendHost, BackendServer, VIP4, ask, connect_here, in_ns};

fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
    a.exec(&["ethtool", "-K", a_if, "tx", "off"]);
    b.exec(&["ethtool", "-K", b_if, "tx", "off"]);
}

fn sysctls(ns: &NetNs, kvs: &[&str]) {
    for kv in kvs {
        ns.exec(&["sysctl", "-qw", kv]);
    }
}

const NO_RP_FILTER: [&str; 3] = [
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv6.conf.all.accept_dad=0",
];

fn config(pins: &PinDir) -> String {
    let mut s = format!(
        "[node]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\ntunnel_source_v4 = \"198.51.100.2\"\n\
         max_vips = 4\nmax_backends = 16\nconntrack_entries = 16384\npin_dir = \"{}\"\n\n\
         [[vips]]\nname = \"web\"\naddress = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\n",
        pins.path.display()
    );
    for i in 1..=3 {
        s.push_str(&format!(
            "\n[[vips.backends]]\naddress = \"198.51.100.1{i}\"\n"
        ));
    }
    s
}

#[test]
fn flows_moved_between_lb_nodes_keep_working() {
    xlb_tests::require_root();
    let client = NetNs::new("xsc");
    let router = NetNs::new("xsr");
    let switch = NetNs::new("xss");
    let lbs = [NetNs::new("xsl1-"), NetNs::new("xsl2-")];
    for ns in [&client, &router, &switch, &lbs[0], &lbs[1]] {
        sysctls(ns, &NO_RP_FILTER);
    }
    // client <-> router
    veth(&client, "c0", &router, "rc");
    client.ip(&["addr", "add", "192.0.2.100/24", "dev", "c0"]);
    for i in 101..=130 {
        client.ip(&["addr", "add", &format!("192.0.2.{i}/24"), "dev", "c0"]);
    }
    client.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    router.ip(&["addr", "add", "192.0.2.1/24", "dev", "rc"]);
    sysctls(
        &router,
        &[
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv4.conf.rc.rp_filter=0",
        ],
    );
    // the backend LAN: a bridge in the switch namespace
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let attach = |ns: &NetNs, ns_if: &str, sw_if: &str| {
        veth(ns, ns_if, &switch, sw_if);
        switch.ip(&["link", "set", sw_if, "master", "br0"]);
        // Native XDP_REDIRECT into a veth is delivered when the peer has GRO on.
        switch.exec(&["ethtool", "-K", sw_if, "gro", "on"]);
    };
    attach(&router, "rb", "swr");
    router.ip(&["addr", "add", "198.51.100.1/24", "dev", "rb"]);
    sysctls(&router, &["net.ipv4.conf.rb.rp_filter=0"]);
    // router <-> LB nodes, and LB nodes on the backend LAN
    let mut nexthops = Vec::new();
    for (i, lb) in lbs.iter().enumerate() {
        let rl = format!("rl{}", i + 1);
        veth(&router, &rl, lb, "eth0");
        let base = 128 + 4 * i as u8;
        router.ip(&[
            "addr",
            "add",
            &format!("203.0.113.{}/30", base + 1),
            "dev",
            &rl,
        ]);
        lb.ip(&[
            "addr",
            "add",
            &format!("203.0.113.{}/30", base + 2),
            "dev",
            "eth0",
        ]);
        nexthops.push(format!("203.0.113.{}", base + 2));
        attach(lb, "eth1", &format!("swl{}", i + 1));
        lb.ip(&[
            "addr",
            "add",
            &format!("198.51.100.{}/24", 2 + i),
            "dev",
            "eth1",
        ]);
        lb.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("203.0.113.{}", base + 1),
        ]);
        sysctls(
            lb,
            &[
                "net.ipv4.conf.all.forwarding=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.eth1.rp_filter=0",
            ],
        );
        sysctls(&router, &[&format!("net.ipv4.conf.{rl}.rp_filter=0")]);
    }
    let ecmp = |targets: &[&String]| {
        let mut args: Vec<String> =
            vec!["route".into(), "replace".into(), "203.0.113.10/32".into()];
        for t in targets {
            args.extend(["nexthop".into(), "via".into(), (*t).clone()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        router.ip(&refs);
    };
    ecmp(&[&nexthops[0], &nexthops[1]]);
    // backends
    let mut backends = Vec::new();
    for index in 1..=3 {
        let ns = NetNs::new(&format!("xsb{index}-"));
        sysctls(&ns, &NO_RP_FILTER);
        attach(&ns, "eth0", &format!("swb{index}"));
        let addr = Ipv4Addr::new(198, 51, 100, 10 + index as u8);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", "198.51.100.1"]);
        ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
        sysctls(&ns, &["net.ipv4.conf.eth0.rp_filter=0"]);
        for lb in &lbs {
            lb.ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "dev",
                "eth1",
                "managed",
            ]);
        }
        backends.push(BackendHost {
            ns,
            index,
            addr,
            addr6: Ipv6Addr::UNSPECIFIED,
        });
    }

    let scratch = Scratch::new("switch");
    let _servers: Vec<BackendServer> = backends
        .iter()
        .map(|b| BackendServer::start(b, 80))
        .collect();
    let mut keep = Vec::new();
    for b in &backends {
        let pins = PinDir::new(&format!("sw-decap{}", b.index));
        let pin = pins.path.to_str().unwrap().to_owned();
        let mut p = XlbProcess::spawn(
            &b.ns,
            &["decap", "--iface", "eth0", "--pin-dir", &pin],
            scratch.path.join(format!("decap{}.log", b.index)),
        );
        p.wait_log("decapsulating", Duration::from_secs(20));
        keep.push((pins, p));
    }
    let mut agents = Vec::new();
    for (i, lb) in lbs.iter().enumerate() {
        let pins = PinDir::new(&format!("sw-lb{}", i + 1));
        let cfg = scratch.path.join(format!("lb{}.toml", i + 1));
        std::fs::write(&cfg, config(&pins)).unwrap();
        let state = scratch.path.join(format!("state{}", i + 1));
        let args = [
            "agent",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ];
        let mut p = XlbProcess::spawn(lb, &args, scratch.path.join(format!("agent{}.log", i + 1)));
        p.wait_log("config applied", Duration::from_secs(30));
        agents.push((pins, p));
    }
    wait_for(
        "LB nodes to resolve the backends",
        Duration::from_secs(10),
        || {
            lbs.iter()
                .all(|lb| {
                    let t = lb.ip(&["neigh", "show", "dev", "eth1"]);
                    backends.iter().all(|b| {
                        t.lines()
                            .any(|l| l.starts_with(&format!("{} ", b.addr)) && l.contains("lladdr"))
                    })
                })
                .then_some(())
        },
    );

    let vip = SocketAddr::new(IpAddr::V4(VIP4), 80);
    let mut conns: Vec<(TcpStream, String)> = in_ns(&client, move || {
        (0..60)
            .map(|i| {
                let src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100 + (i % 31) as u8));
                let mut s = connect_here(src, 0, vip).expect("connect through the LB nodes");
                let who = ask(&mut s).expect("answer");
                (s, who)
            })
            .collect()
    });
    let forwarded = |i: usize| {
        let m = lb_userspace::datapath::Maps::open_pinned(&agents[i].0.path).unwrap();
        let s = m.stats().unwrap();
        (s.forwarded_tx + s.forwarded_redirect, s.conntrack_miss)
    };
    let round = |conns: &mut Vec<(TcpStream, String)>| -> usize {
        let mut failed = 0;
        for (s, who) in conns.iter_mut() {
            if ask(s).ok().as_ref() != Some(&*who) {
                failed += 1;
            }
        }
        failed
    };
    assert_eq!(round(&mut conns), 0);
    let (lb1_before, _) = forwarded(0);
    let (lb2_before, _) = forwarded(1);
    println!(
        "ECMP over both LB nodes: node 1 forwarded {lb1_before}, node 2 forwarded {lb2_before}"
    );
    assert!(
        lb1_before > 0 && lb2_before > 0,
        "ECMP spread the flows over both LB nodes"
    );
    let per_backend: BTreeMap<&String, usize> =
        conns.iter().fold(BTreeMap::new(), |mut m, (_, w)| {
            *m.entry(w).or_default() += 1;
            m
        });
    println!("60 connections: {per_backend:?}");

    // Move every flow to LB node 2, then to LB node 1: neither has seen the other's flows.
    let mut failures = 0;
    for (target, name) in [(1usize, "LB node 2"), (0, "LB node 1")] {
        let (_, misses_before) = forwarded(target);
        ecmp(&[&nexthops[target]]);
        for _ in 0..3 {
            failures += round(&mut conns);
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, misses_after) = forwarded(target);
        println!(
            "all flows on {name}: {} Maglev picks for flows it had not seen, {failures} failed exchanges so far",
            misses_after - misses_before
        );
    }
    assert_eq!(failures, 0, "moved connections broke");
    drop(agents);
    drop(keep);
}
