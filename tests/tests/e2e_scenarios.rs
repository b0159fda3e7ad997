//! The promises operators care about, proven with real sockets through the real binaries:
//! `xlb agent` on the LB node (native XDP on veth), `xlb decap` on every backend, servers
//! bound on the VIP. Each test builds its own namespaces and pin directories and removes them,
//! also on failure; all traffic stays inside them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use xlb_tests::scenario::*;
use xlb_tests::testbed::*;

fn vip4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP4), port)
}

fn share_report(seen: &BTreeMap<String, usize>) -> String {
    let total: usize = seen.values().sum();
    seen.iter()
        .map(|(k, v)| format!("{k} {:.1}%", 100.0 * *v as f64 / total as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Scenario 1: each backend's share of 3,000 connections is within ±3 points of its weight
/// share, for weights 1:1:1 and then (applied live) 1:2:3.
#[test]
fn balance_follows_weights() {
    let mut ab = AgentBed::new("bal", 3);
    ab.write_config(&[web_vip(&ab.bed, &[1, 1, 1])]);
    ab.start_agent();
    for (round, weights) in [[1u32, 1, 1], [1, 2, 3]].iter().enumerate() {
        if round > 0 {
            ab.apply(&[web_vip(&ab.bed, weights)]);
        }
        let (seen, failed) = spread(&ab.bed, vip4(80), 3000);
        let total: usize = seen.values().sum();
        println!(
            "weights {weights:?}: {total} connections, {failed} failed: {}",
            share_report(&seen)
        );
        assert_eq!(failed, 0, "every connection must be answered");
        let sum: u32 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let got = *seen.get(&format!("backend-{}", i + 1)).unwrap_or(&0) as f64 / total as f64;
            let want = *w as f64 / sum as f64;
            assert!(
                (got - want).abs() <= 0.03,
                "backend-{}: share {:.3}, weight share {:.3}",
                i + 1,
                got,
                want
            );
        }
    }
}

/// One exchange on an open connection: the answer and how long it took.
fn exchange(stream: &mut TcpStream) -> std::io::Result<(String, Duration)> {
    let t = Instant::now();
    let who = ask(stream)?;
    Ok((who, t.elapsed()))
}

/// Scenario 2: 100 long-lived connections keep exchanging data while a backend is added,
/// one is drained and another removed: no reset or stall on any connection whose backend
/// still exists, and new connections avoid the drained backend.
#[test]
fn long_lived_flows_survive_backend_changes() {
    let mut ab = AgentBed::new("live", 4);
    let mut vip = web_vip(&ab.bed, &[1, 1, 1]);
    ab.write_config(std::slice::from_ref(&vip));
    ab.start_agent();

    let srcs = ab.bed.client_addrs.clone();
    let mut conns: Vec<(TcpStream, String)> = in_ns(&ab.bed.client, move || {
        srcs.iter()
            .cycle()
            .take(100)
            .map(|src| {
                let mut s = connect_here(IpAddr::V4(*src), 0, vip4(80)).expect("connect");
                let who = ask(&mut s).expect("first answer");
                (s, who)
            })
            .collect()
    });
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for (_, who) in &conns {
        *per_backend.entry(who.clone()).or_default() += 1;
    }
    println!("100 long-lived connections: {per_backend:?}");

    // Broken connections are allowed only for the removed backend.
    let removed = "backend-2".to_string();
    let mut worst = Duration::ZERO;
    let mut broken_elsewhere = Vec::new();
    let mut broken_on_removed = 0;
    let mut round = |conns: &mut Vec<(TcpStream, String)>, removed_yet: bool| {
        for (i, (s, who)) in conns.iter_mut().enumerate() {
            match exchange(s) {
                Ok((answer, took)) if answer == *who => worst = worst.max(took),
                other if removed_yet && *who == removed => {
                    let _ = other;
                    broken_on_removed += 1;
                }
                other => broken_elsewhere.push(format!("conn {i} on {who}: {other:?}")),
            }
        }
    };
    let mut rounds = |conns: &mut Vec<(TcpStream, String)>, n: usize, removed_yet: bool| {
        for _ in 0..n {
            round(conns, removed_yet);
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    rounds(&mut conns, 3, false);
    // Add backend 4.
    vip.backends.push(BackendSpec {
        address: IpAddr::V4(ab.bed.backends[3].addr),
        weight: 1,
        draining: false,
    });
    ab.apply(std::slice::from_ref(&vip));
    rounds(&mut conns, 3, false);
    // Drain backend 1: established flows stay, new ones go elsewhere.
    vip.backends[0].draining = true;
    ab.apply(std::slice::from_ref(&vip));
    rounds(&mut conns, 3, false);
    let (fresh, failed) = spread(&ab.bed, vip4(80), 300);
    println!("300 new connections after draining backend-1: {fresh:?} ({failed} failed)");
    assert_eq!(failed, 0);
    assert!(
        !fresh.contains_key("backend-1"),
        "a new connection went to the drained backend"
    );
    assert!(
        fresh.contains_key("backend-4"),
        "the added backend takes new connections"
    );
    // Remove backend 2.
    vip.backends.remove(1);
    ab.apply(std::slice::from_ref(&vip));
    // Connections on the removed backend may now fail; drop them after their failure.
    rounds(&mut conns, 1, true);
    conns.retain(|(_, who)| *who != removed);
    rounds(&mut conns, 3, true);

    println!(
        "slowest exchange {worst:?}; {broken_on_removed} exchanges failed on the removed backend"
    );
    assert!(
        broken_elsewhere.is_empty(),
        "connections broke on backends that still exist: {broken_elsewhere:?}"
    );
    assert!(
        worst < Duration::from_secs(1),
        "an exchange stalled for {worst:?}"
    );
}

/// Scenario 3: removing one of N = 4 backends moves at most 1.2 × 1/N of new flows.
#[test]
fn removing_one_of_n_backends_moves_few_flows() {
    let mut ab = AgentBed::new("move", 4);
    let mut vip = web_vip(&ab.bed, &[1, 1, 1, 1]);
    ab.write_config(std::slice::from_ref(&vip));
    ab.start_agent();
    let srcs = ab.bed.client_addrs.clone();
    let flows: Vec<(IpAddr, u16)> = (0..1000)
        .map(|i| {
            (
                IpAddr::V4(srcs[i % srcs.len()]),
                41000 + (i / srcs.len()) as u16,
            )
        })
        .collect();
    let run = |client: &xlb_tests::netns::NetNs, flows: Vec<(IpAddr, u16)>| -> Vec<String> {
        in_ns(client, move || {
            flows
                .iter()
                .map(|(src, port)| tcp_request_here(*src, *port, vip4(80)).expect("request"))
                .collect()
        })
    };
    let before = run(&ab.bed.client, flows.clone());
    vip.backends.pop();
    ab.apply(std::slice::from_ref(&vip));
    let after = run(&ab.bed.client, flows);
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let on_removed = before.iter().filter(|b| *b == "backend-4").count();
    let moved_share = moved as f64 / before.len() as f64;
    println!(
        "removing 1 of 4 backends moved {moved} of 1000 flows ({:.1} %; {on_removed} were on the removed backend; bound {:.1} %)",
        100.0 * moved_share,
        100.0 * 1.2 / 4.0
    );
    assert!(
        after.iter().all(|b| b != "backend-4"),
        "a flow still reached the removed backend"
    );
    assert!(moved_share <= 1.2 / 4.0, "moved {moved_share:.3} of flows");
}

/// Scenario 4: `kill -9` of the agent during traffic, then a restart: zero failed requests.
#[test]
fn agent_kill_and_restart_drops_nothing() {
    let mut ab = AgentBed::new("kill", 3);
    ab.write_config(&[web_vip(&ab.bed, &[1, 1, 1])]);
    ab.start_agent();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    // Long-lived connections, opened before the kill.
    let srcs = ab.bed.client_addrs.clone();
    let mut held: Vec<(TcpStream, String)> = in_ns(&ab.bed.client, move || {
        srcs.iter()
            .take(20)
            .map(|s| {
                let mut c = connect_here(IpAddr::V4(*s), 0, vip4(80)).expect("connect");
                let who = ask(&mut c).expect("answer");
                (c, who)
            })
            .collect()
    });
    let traffic = {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        let srcs = ab.bed.client_addrs.clone();
        let client = ab.bed.client.name.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{client}")).unwrap();
            // SAFETY: setns affects only this thread.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
                0
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            for src in srcs.iter().cycle() {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                match tcp_request_here(IpAddr::V4(*src), 0, vip4(80)) {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let mut held_failures = 0;
    let mut exchange_all = |held: &mut Vec<(TcpStream, String)>| {
        for (c, who) in held.iter_mut() {
            if ask(c).ok().as_ref() != Some(who) {
                held_failures += 1;
            }
        }
    };
    std::thread::sleep(Duration::from_millis(800));
    exchange_all(&mut held);
    ab.kill_agent();
    let during_before = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(800));
    exchange_all(&mut held);
    let while_dead = done.load(Ordering::Relaxed) - during_before;
    ab.start_agent();
    std::thread::sleep(Duration::from_millis(800));
    exchange_all(&mut held);
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let (ok, failed) = (
        done.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    println!(
        "{ok} requests ({while_dead} while the agent was dead), {failed} failed; {held_failures} failed exchanges on 20 long-lived connections"
    );
    assert!(while_dead > 0, "traffic ran while the agent was down");
    assert_eq!(failed, 0, "requests failed across kill -9 and restart");
    assert_eq!(
        held_failures, 0,
        "long-lived connections broke across kill -9 and restart"
    );
    assert!(
        ab.agent_log().contains("adopted"),
        "the restarted agent adopted the pinned datapath:\n{}",
        ab.agent_log()
    );
}

/// Scenario 6: UDP flows stick to one backend; an IPv6 VIP works end to end (IPv6-in-IPv6).
#[test]
fn udp_sticks_and_ipv6_vip_works() {
    let mut ab = AgentBed::new("udp6", 3);
    let web = web_vip(&ab.bed, &[1, 1, 1]);
    let mut dns = web.clone();
    dns.name = "dns".into();
    dns.protocol = "udp";
    dns.port = 53;
    let web6 = VipSpec {
        name: "web6".into(),
        address: IpAddr::V6(VIP6),
        protocol: "tcp",
        port: 80,
        backends: ab
            .bed
            .backends
            .iter()
            .map(|b| BackendSpec {
                address: IpAddr::V6(b.addr6),
                weight: 1,
                draining: false,
            })
            .collect(),
    };
    ab.write_config(&[web, dns, web6]);
    // The agent, not the test bed, must keep the backends' neighbours resolved.
    ab.bed.lb.ip(&["neigh", "flush", "all"]);
    ab.bed.lb.ip(&["-6", "neigh", "flush", "all"]);
    for b in &ab.bed.backends {
        let _ = std::process::Command::new("ip")
            .args([
                "-n",
                &ab.bed.lb.name,
                "neigh",
                "del",
                &b.addr.to_string(),
                "dev",
                &format!("b{}", b.index),
            ])
            .output();
        let _ = std::process::Command::new("ip")
            .args([
                "-n",
                &ab.bed.lb.name,
                "-6",
                "neigh",
                "del",
                &b.addr6.to_string(),
                "dev",
                &format!("b{}", b.index),
            ])
            .output();
    }
    ab.start_agent();
    // The entries appear right after the apply and resolve within milliseconds.
    let lb = &ab.bed.lb;
    let wanted: Vec<String> = ab
        .bed
        .backends
        .iter()
        .flat_map(|b| [b.addr.to_string(), b.addr6.to_string()])
        .collect();
    xlb_tests::agent_support::wait_for(
        "managed neighbour entries from the agent",
        Duration::from_secs(10),
        || {
            let neigh = format!(
                "{}{}",
                lb.ip(&["neigh", "show"]),
                lb.ip(&["-6", "neigh", "show"])
            );
            wanted
                .iter()
                .all(|addr| {
                    neigh.lines().any(|l| {
                        l.starts_with(&format!("{addr} "))
                            && l.contains("managed")
                            && l.contains("lladdr")
                    })
                })
                .then_some(())
        },
    );

    let src = ab.bed.client_addrs[0];
    let per_flow: Vec<Vec<String>> = in_ns(&ab.bed.client, move || {
        (0..20u16)
            .map(|i| {
                let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(src), 33000 + i)).unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                (0..10)
                    .map(|_| {
                        socket.send_to(b"who", vip4(53)).unwrap();
                        let mut buf = [0u8; 64];
                        let (n, _) = socket.recv_from(&mut buf).expect("UDP answer");
                        String::from_utf8_lossy(&buf[..n]).into_owned()
                    })
                    .collect()
            })
            .collect()
    });
    let mut used = std::collections::BTreeSet::new();
    for answers in &per_flow {
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "a UDP flow changed backend: {answers:?}"
        );
        used.insert(answers[0].clone());
    }
    println!("20 UDP flows × 10 datagrams, each on one backend; backends used: {used:?}");
    assert!(used.len() >= 2, "UDP flows spread over backends");

    let src6 = ab.bed.client_addr6;
    let answers: Vec<std::io::Result<String>> = in_ns(&ab.bed.client, move || {
        (0..100)
            .map(|_| tcp_request_here(IpAddr::V6(src6), 0, SocketAddr::new(IpAddr::V6(VIP6), 80)))
            .collect()
    });
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for a in answers {
        *seen.entry(a.expect("IPv6 request answered")).or_default() += 1;
    }
    println!("100 TCP connections to [{VIP6}]:80: {seen:?}");
    assert_eq!(seen.len(), 3, "IPv6 connections reach every backend");
}

/// Scenario 7: packets that no longer fit once encapsulated get ICMP "fragmentation
/// needed"; with path-MTU discovery the client completes a 1 MB upload.
#[test]
fn path_mtu_discovery_completes_a_1mb_upload() {
    let mut ab = AgentBed::new("mtu", 3);
    ab.write_config(&[web_vip(&ab.bed, &[1, 1, 1])]);
    ab.start_agent();
    let before = ab.stats();
    let src = ab.bed.client_addrs[0];
    let answer = in_ns(&ab.bed.client, move || -> std::io::Result<String> {
        let mut s = connect_here(IpAddr::V4(src), 0, vip4(80))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"UPLOAD 1048576\n")?;
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..16 {
            s.write_all(&chunk)?;
        }
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut line)?;
        Ok(line.trim().to_owned())
    })
    .expect("upload through the balancer");
    let after = ab.stats();
    println!(
        "upload answer: {answer}; ICMP too-big replies sent: {}",
        after.too_big_icmp_sent - before.too_big_icmp_sent
    );
    assert!(
        answer.ends_with(" 1048576"),
        "the backend received the whole megabyte: {answer}"
    );
    assert!(
        after.too_big_icmp_sent > before.too_big_icmp_sent,
        "the client was told the usable MTU"
    );
}

/// Builds a raw Ethernet frame from the client to the LB node's MAC.
fn raw_frame(lb_mac: [u8; 6], client_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut f = lb_mac.to_vec();
    f.extend_from_slice(&client_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(ip);
    f
}

fn mac_of(ns: &xlb_tests::netns::NetNs, iface: &str) -> [u8; 6] {
    let text = ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")]);
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Scenario 8: a malformed config mid-run is rejected and traffic is unaffected; a burst of
/// crafted malformed packets through the LB node is never forwarded, and the drop counter
/// matches the burst.
#[test]
fn bad_config_and_malformed_packets_change_nothing() {
    let mut ab = AgentBed::new("bad", 3);
    ab.write_config(&[web_vip(&ab.bed, &[1, 1, 1])]);
    ab.start_agent();
    // A config with an invalid backend address: rejected by name, the last good state serves.
    let good = ab.config_text(&[web_vip(&ab.bed, &[1, 1, 1])]);
    xlb_tests::agent_support::write_atomically(
        &ab.config_path,
        &good.replace("198.51.100.10", "198.51.100.300"),
    );
    xlb_tests::agent_support::wait_for("the rejection", Duration::from_secs(20), || {
        ab.agent_log().contains("config rejected").then_some(())
    });
    let log = ab.agent_log();
    let line = log
        .lines()
        .find(|l| l.contains("config rejected"))
        .unwrap_or_default()
        .to_owned();
    println!("agent: {line}");
    assert!(
        line.contains("vips[0].backends[1].address"),
        "the message names the field: {line}"
    );
    let (seen, failed) = spread(&ab.bed, vip4(80), 300);
    assert_eq!(failed, 0, "traffic unaffected by the rejected config");
    assert_eq!(seen.len(), 3, "all three backends still serve: {seen:?}");

    // Crafted malformed packets to the VIP, sent raw from the client's interface.
    let lb_mac = mac_of(&ab.bed.lb, "eth0");
    let client_mac = mac_of(&ab.bed.client, "c0");
    let mut good_ip = vec![
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 100, 203, 0, 113, 10,
    ];
    good_ip.extend_from_slice(&[
        0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    let mut variants: Vec<Vec<u8>> = Vec::new();
    let mut bad = good_ip.clone();
    bad[0] = 0x44; // IHL 4
    variants.push(bad);
    let mut bad = good_ip.clone();
    bad[0] = 0x55; // version 5
    variants.push(bad);
    let mut bad = good_ip.clone();
    bad[2..4].copy_from_slice(&1400u16.to_be_bytes()); // total length beyond the frame
    variants.push(bad);
    let mut bad = good_ip.clone();
    bad[32] = 0x30; // TCP data offset 3
    variants.push(bad);
    variants.push(good_ip[..30].to_vec()); // TCP header cut short (total length says 40)
    let frames: Vec<Vec<u8>> = variants
        .iter()
        .map(|ip| raw_frame(lb_mac, client_mac, ip))
        .collect();
    let before = ab.stats();
    let burst = 500usize;
    let sent = in_ns(&ab.bed.client, move || {
        // SAFETY: raw packet socket bound to c0; frames are written whole.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let ifindex = libc::if_nametoindex(c"c0".as_ptr());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            let mut sent = 0;
            for i in 0..burst {
                let f = &frames[i % frames.len()];
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if n == f.len() as isize {
                    sent += 1;
                }
            }
            libc::close(fd);
            sent
        }
    });
    let after = xlb_tests::agent_support::wait_for(
        "the burst to be counted",
        Duration::from_secs(5),
        || {
            let s = ab.stats();
            (s.drop_malformed - before.drop_malformed >= sent as u64).then_some(s)
        },
    );
    let dropped = after.drop_malformed - before.drop_malformed;
    let forwarded = (after.forwarded_tx + after.forwarded_redirect)
        - (before.forwarded_tx + before.forwarded_redirect);
    println!("sent {sent} malformed frames: drop_malformed +{dropped}, forwarded +{forwarded}");
    assert_eq!(sent, burst);
    assert_eq!(
        dropped, sent as u64,
        "every malformed frame counted as a malformed drop"
    );
    assert_eq!(forwarded, 0, "no malformed frame was forwarded");
}
