//! Packet fixtures through BPF_PROG_TEST_RUN on the real compiled object: for each input
//! packet, the expected verdict, the expected output bytes (compared whole; checksums
//! included) and the exact counter deltas (every counter not listed must stay unchanged).

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use lb_common::map_names;
use lb_common::{
    ClockCache, FlowKey, FlowState, PROTO_TCP, PROTO_UDP, RateGuard, VIP_F_HASH_SRC_ONLY,
    program_names,
};
use lb_userspace::datapath::{Datapath, LoadOptions};
use xlb_tests::fixture::*;
use xlb_tests::packets::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const BALANCER: &str = program_names::BALANCER;
const DECAP: &str = program_names::DECAP;

/// What the output packet must be.
enum Output {
    /// Exactly the input.
    Unchanged,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// Not compared (the packet is dropped; its buffer is meaningless).
    Dropped,
}

struct Case {
    name: String,
    program: &'static str,
    packet: Vec<u8>,
    ingress: u32,
    verdict: u32,
    output: Output,
    /// Expected non-zero counter deltas (see `FixtureEnv::counters`).
    counters: Vec<(String, u64)>,
}

fn c(names: &[(&str, u64)]) -> Vec<(String, u64)> {
    names.iter().map(|(n, d)| ((*n).to_owned(), *d)).collect()
}

/// Counters a forwarded packet moves: outcome, conntrack detail, VIP and backend.
fn fwd_counters(
    outcome: &str,
    ct: &str,
    vip: u32,
    backend: u32,
    ip_len: usize,
    new: bool,
) -> Vec<(String, u64)> {
    let mut v = c(&[("rx_packets", 1), (outcome, 1), (ct, 1)]);
    v.push((format!("vip{vip}_packets"), 1));
    v.push((format!("vip{vip}_bytes"), ip_len as u64));
    if new {
        v.push((format!("vip{vip}_new_conns"), 1));
    }
    v.push((format!("backend{backend}_packets"), 1));
    v.push((format!("backend{backend}_bytes"), ip_len as u64));
    v
}

fn check(env: &FixtureEnv, case: &Case) -> Result<(), String> {
    let before = env.counters();
    let out = env.run_packet(case.program, &case.packet, case.ingress);
    let after = env.counters();
    let mut problems = Vec::new();
    if out.verdict != case.verdict {
        problems.push(format!("verdict {} (want {})", out.verdict, case.verdict));
    }
    match &case.output {
        Output::Unchanged if out.packet != case.packet => problems.push(format!(
            "packet changed:\n  got  {}\n  want {}",
            hex(&out.packet),
            hex(&case.packet)
        )),
        Output::Bytes(want) if &out.packet != want => problems.push(format!(
            "output differs:\n  got  {}\n  want {}",
            hex(&out.packet),
            hex(want)
        )),
        _ => {}
    }
    let got = counter_deltas(&before, &after);
    let want: BTreeMap<String, u64> = case.counters.iter().cloned().collect();
    if got != want {
        problems.push(format!("counter deltas {got:?} (want {want:?})"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failures: Vec<String>,
}

impl Tally {
    fn case(&mut self, env: &FixtureEnv, case: Case) {
        match check(env, &case) {
            Ok(()) => self.passed += 1,
            Err(e) => self.failures.push(format!("{}: {e}", case.name)),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_be: addr_words(src),
        dst_be: addr_words(dst),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        family: family(src),
        _pad: [0; 2],
    }
}

fn backend_addr(id: u32) -> IpAddr {
    match id {
        1 => v4("198.51.100.11"),
        2 => v4("198.51.100.12"),
        3 => v4("198.51.100.13"),
        4 => v6("2001:db8:b::21"),
        5 => v6("2001:db8:b::22"),
        6 => v4("203.0.113.20"),
        7 => v4("198.18.0.7"),
        8 => v6("2001:db8:3::20"),
        _ => panic!("no backend {id}"),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every CPU's entry of the datapath's clock cache set to `value`.
fn set_clock_cache(env: &FixtureEnv, value: ClockCache) {
    let mut clock: PerCpuArray<MapData, ClockCache> = PerCpuArray::try_from(
        aya::maps::Map::from_map_data(
            MapData::from_pin(env.pins.path.join(lb_common::map_names::CLOCK)).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let cpus = aya::util::nr_cpus().unwrap().get() as usize;
    clock
        .set(0, PerCpuValues::try_from(vec![value; cpus]).unwrap(), 0)
        .unwrap();
}

/// CPU 0's clock cache entry (the fixture thread runs on CPU 0).
fn clock_cache(env: &FixtureEnv) -> ClockCache {
    env.dp.maps.clock.get(&0, 0).unwrap()[0]
}

/// The ICMPv4 "fragmentation needed" reply xlb must send, built from RFC 792/1191.
fn expected_frag_needed(orig: &[u8], vip: IpAddr, client: IpAddr, mtu: u16) -> Vec<u8> {
    let quote = &orig[14..14 + 68];
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let sum = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut out = Vec::new();
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&LB0_MAC);
    out.extend_from_slice(&[0x08, 0x00]);
    let (IpAddr::V4(s), IpAddr::V4(d)) = (vip, client) else {
        panic!("v4 only")
    };
    let mut ip = vec![0x45, 0xc0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&s.octets());
    ip.extend_from_slice(&d.octets());
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&icmp);
    out
}

/// The ICMPv6 "packet too big" reply xlb must send, built from RFC 4443.
fn expected_packet_too_big(orig: &[u8], vip: IpAddr, client: IpAddr, mtu: u32) -> Vec<u8> {
    let quote = &orig[14..14 + 1232];
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let (IpAddr::V6(s), IpAddr::V6(d)) = (vip, client) else {
        panic!("v6 only")
    };
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&s.octets());
    pseudo.extend_from_slice(&d.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = internet_checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut out = Vec::new();
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&LB0_MAC);
    out.extend_from_slice(&[0x86, 0xdd]);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    out.extend_from_slice(&[58, 64]);
    out.extend_from_slice(&s.octets());
    out.extend_from_slice(&d.octets());
    out.extend_from_slice(&icmp);
    out
}

#[test]
fn datapath_packet_fixtures() {
    FixtureEnv::run(FixtureEnv::small(), |env| {
        for id in 1..=8 {
            env.add_backend(id, backend_addr(id));
        }
        let vip4 = v4("192.0.2.10");
        let vip6 = v6("2001:db8:1::10");
        let client4 = v4("192.0.2.100");
        let client6 = v6("2001:db8:c::100");
        let v_tcp4 = env.add_vip(vip4, 80, PROTO_TCP, 0, &[1, 2, 3]);
        let v_udp4 = env.add_vip(vip4, 53, PROTO_UDP, 0, &[1, 2, 3]);
        let v_any = env.add_vip(v4("192.0.2.11"), 0, PROTO_TCP, 0, &[1]);
        let v_tcp6 = env.add_vip(vip6, 80, PROTO_TCP, 0, &[4, 5]);
        let v_udp6 = env.add_vip(vip6, 53, PROTO_UDP, 0, &[4, 5]);
        let v_4in6 = env.add_vip(v4("192.0.2.12"), 80, PROTO_TCP, 0, &[4]);
        let v_redirect = env.add_vip(v4("192.0.2.13"), 80, PROTO_TCP, 0, &[6]);
        let _v_empty = env.add_vip(v4("192.0.2.14"), 80, PROTO_TCP, 0, &[]);
        let v_fallback = env.add_vip(v4("192.0.2.15"), 80, PROTO_TCP, 0, &[7]);
        let v_affinity = env.add_vip(
            v4("192.0.2.16"),
            80,
            PROTO_TCP,
            VIP_F_HASH_SRC_ONLY,
            &[1, 2, 3],
        );
        let v_stale = env.add_vip(v4("192.0.2.17"), 80, PROTO_TCP, 0, &[9]);
        let v_redirect6 = env.add_vip(v6("2001:db8:1::13"), 80, PROTO_TCP, 0, &[8]);

        let lb0 = env.lb0;
        let mut t = Tally::default();
        let malformed = |name: &str, packet: Vec<u8>| Case {
            name: name.into(),
            program: BALANCER,
            packet,
            ingress: lb0,
            verdict: XDP_DROP,
            output: Output::Dropped,
            counters: c(&[("rx_packets", 1), ("drop_malformed", 1)]),
        };
        let passes = |name: &str, packet: Vec<u8>, counter: &str| Case {
            name: name.into(),
            program: BALANCER,
            packet,
            ingress: lb0,
            verdict: XDP_PASS,
            output: Output::Unchanged,
            counters: c(&[("rx_packets", 1), (counter, 1)]),
        };
        let syn4 = |sport: u16, dst: IpAddr, dport: u16| {
            tcp(LB0_MAC, client4, sport, dst, dport, TcpFlags::SYN, 0)
        };

        // ---- L2/L3/L4 parsing: malformed input is dropped and counted, never forwarded.
        // (BPF_PROG_TEST_RUN refuses frames under 14 bytes, as NICs never deliver them.)
        let mut bare = vec![0xff; 12];
        bare.extend_from_slice(&[0x08, 0x00]);
        t.case(
            env,
            malformed("Ethernet header alone with the IPv4 EtherType", bare),
        );
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        t.case(
            env,
            passes("ARP passes untouched", arp.clone(), "pass_not_ip"),
        );
        t.case(
            env,
            passes(
                "VLAN-tagged ARP passes untouched",
                with_vlan(&arp, 42),
                "pass_not_ip",
            ),
        );
        t.case(
            env,
            malformed("802.1Q tag cut short", with_vlan(&arp, 42)[..16].to_vec()),
        );
        let good = syn4(40000, vip4, 80);
        t.case(
            env,
            malformed("IPv4 header truncated", good[..14 + 10].to_vec()),
        );
        let mut bad = good.clone();
        bad[14] = 0x55;
        t.case(env, malformed("IPv4 version 5", bad));
        let mut bad = good.clone();
        bad[14] = 0x44;
        fix_ipv4_checksum(&mut bad, 14);
        t.case(env, malformed("IPv4 IHL 4 (below minimum)", bad));
        let mut bad = good.clone();
        bad[16..18].copy_from_slice(&2000u16.to_be_bytes());
        t.case(env, malformed("IPv4 total length beyond the frame", bad));
        let mut bad = good.clone();
        bad[16..18].copy_from_slice(&16u16.to_be_bytes());
        t.case(
            env,
            malformed("IPv4 total length below the header length", bad),
        );
        let mut bad = good[..14 + 20 + 10].to_vec();
        bad[16..18].copy_from_slice(&30u16.to_be_bytes());
        fix_ipv4_checksum(&mut bad, 14);
        t.case(env, malformed("TCP header truncated", bad));
        let mut bad = good.clone();
        bad[14 + 20 + 12] = 0x40;
        t.case(env, malformed("TCP data offset 4", bad));
        let u = udp(LB0_MAC, client4, 5353, vip4, 53, 0);
        let mut bad = u[..14 + 20 + 4].to_vec();
        bad[16..18].copy_from_slice(&24u16.to_be_bytes());
        fix_ipv4_checksum(&mut bad, 14);
        t.case(env, malformed("UDP header truncated", bad));
        let g6 = tcp(LB0_MAC, client6, 40000, vip6, 80, TcpFlags::SYN, 0);
        t.case(
            env,
            malformed("IPv6 header truncated", g6[..14 + 30].to_vec()),
        );
        let mut bad = g6.clone();
        bad[18..20].copy_from_slice(&1000u16.to_be_bytes());
        t.case(env, malformed("IPv6 payload length beyond the frame", bad));
        let mut bad = g6.clone();
        bad[14] = 0x40;
        t.case(env, malformed("IPv6 with version 4", bad));
        let mut hbh = g6.clone();
        hbh[14 + 6] = 0; // next header: hop-by-hop options
        t.case(
            env,
            passes("IPv6 hop-by-hop header passes", hbh, "pass_ipv6_ext"),
        );
        let mut rh = g6.clone();
        rh[14 + 6] = 43; // routing header
        t.case(
            env,
            passes("IPv6 routing header passes", rh, "pass_ipv6_ext"),
        );

        // ---- Not ours: untouched.
        t.case(
            env,
            passes(
                "TCP to a non-VIP address",
                syn4(40000, v4("192.0.2.200"), 80),
                "pass_not_vip",
            ),
        );
        t.case(
            env,
            passes(
                "TCP to a VIP address on another port",
                syn4(40000, vip4, 8080),
                "pass_not_vip",
            ),
        );
        t.case(
            env,
            passes(
                "UDP to a VIP address on a TCP-only port",
                udp(LB0_MAC, client4, 5000, vip4, 80, 8),
                "pass_not_vip",
            ),
        );
        t.case(
            env,
            passes(
                "IPv6 to a non-VIP address",
                tcp(
                    LB0_MAC,
                    client6,
                    1,
                    v6("2001:db8:1::99"),
                    80,
                    TcpFlags::SYN,
                    0,
                ),
                "pass_not_vip",
            ),
        );
        t.case(
            env,
            passes(
                "ICMP echo to a VIP address goes to the stack",
                icmp4_echo(LB0_MAC, v4("192.0.2.100"), v4("192.0.2.10")),
                "pass_vip_other_proto",
            ),
        );
        t.case(
            env,
            passes(
                "ICMP echo to another address",
                icmp4_echo(LB0_MAC, v4("192.0.2.100"), v4("192.0.2.99")),
                "pass_not_vip",
            ),
        );

        // ---- Fragments to a VIP are dropped (consistent fragment forwarding comes later).
        let mut frag = syn4(40001, vip4, 80);
        frag[20] = 0x20; // MF
        fix_ipv4_checksum(&mut frag, 14);
        t.case(
            env,
            Case {
                name: "IPv4 first fragment to a VIP".into(),
                program: BALANCER,
                packet: frag,
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[("rx_packets", 1), ("drop_fragment", 1)]),
            },
        );
        let mut frag = syn4(40001, vip4, 80);
        frag[20..22].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128 bytes
        fix_ipv4_checksum(&mut frag, 14);
        t.case(
            env,
            Case {
                name: "IPv4 later fragment to a VIP".into(),
                program: BALANCER,
                packet: frag,
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[("rx_packets", 1), ("drop_fragment", 1)]),
            },
        );
        let mut frag = syn4(40001, v4("192.0.2.200"), 80);
        frag[20] = 0x20;
        fix_ipv4_checksum(&mut frag, 14);
        t.case(
            env,
            passes("IPv4 fragment to a non-VIP passes", frag, "pass_not_vip"),
        );
        let mut frag6 = g6.clone();
        frag6[14 + 6] = 44;
        t.case(
            env,
            Case {
                name: "IPv6 fragment header to a VIP".into(),
                program: BALANCER,
                packet: frag6,
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[("rx_packets", 1), ("drop_fragment", 1)]),
            },
        );

        // ---- Forwarding, IPv4 in IPv4 through the router on lb0 (XDP_TX).
        let fwd4 = |env: &FixtureEnv,
                    name: &str,
                    pkt: Vec<u8>,
                    l2: usize,
                    vip: u32,
                    sport: u16,
                    dport: u16,
                    proto: u8,
                    ct: &str,
                    new: bool,
                    src: IpAddr| {
            let (backend, hash) = env.predict(vip, src, sport, dport, proto);
            let expected = expected_encap(
                &pkt,
                l2,
                LB0_MAC,
                ROUTER_MAC,
                tunnel_src_v4(),
                backend_addr(backend),
                hash,
            );
            let ip_len = pkt.len() - l2;
            Case {
                name: name.into(),
                program: BALANCER,
                packet: pkt,
                ingress: env.lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters: fwd_counters("forwarded_tx", ct, vip, backend, ip_len, new),
            }
        };
        let p = syn4(41000, vip4, 80);
        let case = fwd4(
            env,
            "TCP v4 SYN: Maglev pick, IPIP via router",
            p,
            14,
            v_tcp4,
            41000,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);
        let p = tcp(LB0_MAC, client4, 41000, vip4, 80, TcpFlags::ACK, 100);
        let case = fwd4(
            env,
            "TCP v4 ACK of that flow: conntrack hit",
            p,
            14,
            v_tcp4,
            41000,
            80,
            PROTO_TCP,
            "conntrack_hit",
            false,
            client4,
        );
        t.case(env, case);
        // IPv4 flows live in the IPv4 table under the 16-byte key, as userspace builds it.
        let key41000 = flow_key(client4, 41000, vip4, 80, PROTO_TCP);
        let in_v4 = env.dp.maps.conntrack.v4.get(&key41000.to_v4().unwrap(), 0);
        let in_v6 = env.dp.maps.conntrack.v6.get(&key41000, 0);
        match (in_v4, in_v6) {
            (Ok(state), Err(_)) if state.vip_id == v_tcp4 => t.passed += 1,
            (v4, v6) => t.failures.push(format!(
                "IPv4 flow table placement: XLB_CONNTRACK4 {v4:?}, XLB_CONNTRACK {v6:?}"
            )),
        }
        let p = tcp(LB0_MAC, client4, 41001, vip4, 80, TcpFlags::ACK, 10);
        let case = fwd4(
            env,
            "TCP v4 ACK with no entry: new pick",
            p,
            14,
            v_tcp4,
            41001,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);

        // An entry that disagrees with the table wins for established packets…
        let (predicted, hash) = env.predict(v_tcp4, client4, 41002, 80, PROTO_TCP);
        let other = if predicted == 1 { 2 } else { 1 };
        let key = flow_key(client4, 41002, vip4, 80, PROTO_TCP);
        env.dp
            .maps
            .conntrack
            .insert(
                &key,
                &FlowState {
                    backend_id: other,
                    vip_id: v_tcp4,
                    last_seen_ns: monotonic_ns(),
                },
                0,
            )
            .unwrap();
        let p = tcp(LB0_MAC, client4, 41002, vip4, 80, TcpFlags::ACK, 0);
        let expected = expected_encap(
            &p,
            14,
            LB0_MAC,
            ROUTER_MAC,
            tunnel_src_v4(),
            backend_addr(other),
            hash,
        );
        let ip_len = p.len() - 14;
        t.case(
            env,
            Case {
                name: "established flow stays on its recorded backend".into(),
                program: BALANCER,
                packet: p,
                ingress: lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters: fwd_counters(
                    "forwarded_tx",
                    "conntrack_hit",
                    v_tcp4,
                    other,
                    ip_len,
                    false,
                ),
            },
        );
        // …but a SYN always takes a fresh pick and rewrites the entry.
        let p = syn4(41002, vip4, 80);
        let case = fwd4(
            env,
            "SYN re-picks despite a stale entry",
            p,
            14,
            v_tcp4,
            41002,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);
        let entry = env.dp.maps.conntrack.get(&key, 0).expect("entry after SYN");
        if entry.backend_id != predicted {
            t.failures.push(format!(
                "SYN re-pick: entry holds backend {} (want {predicted})",
                entry.backend_id
            ));
        }
        // An entry whose backend was removed is re-picked.
        let key = flow_key(client4, 41003, vip4, 80, PROTO_TCP);
        env.dp
            .maps
            .conntrack
            .insert(
                &key,
                &FlowState {
                    backend_id: 9,
                    vip_id: v_tcp4,
                    last_seen_ns: monotonic_ns(),
                },
                0,
            )
            .unwrap();
        let p = tcp(LB0_MAC, client4, 41003, vip4, 80, TcpFlags::ACK, 0);
        let case = fwd4(
            env,
            "entry pointing at a removed backend is re-picked",
            p,
            14,
            v_tcp4,
            41003,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);

        let p = with_ipv4_options(&syn4(41004, vip4, 80), 2);
        let case = fwd4(
            env,
            "IPv4 options are skipped and carried inside",
            p,
            14,
            v_tcp4,
            41004,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);
        let p = with_vlan(&syn4(41005, vip4, 80), 7);
        let case = fwd4(
            env,
            "802.1Q-tagged TCP keeps its tag",
            p,
            18,
            v_tcp4,
            41005,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);
        let p = udp(LB0_MAC, client4, 5000, vip4, 53, 32);
        let case = fwd4(
            env,
            "UDP v4: new flow, IPIP",
            p,
            14,
            v_udp4,
            5000,
            53,
            PROTO_UDP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);
        let p = udp(LB0_MAC, client4, 5000, vip4, 53, 32);
        let case = fwd4(
            env,
            "UDP v4: conntrack hit",
            p,
            14,
            v_udp4,
            5000,
            53,
            PROTO_UDP,
            "conntrack_hit",
            false,
            client4,
        );
        t.case(env, case);
        // A UDP entry last seen 2 s ago (past the 1 s refresh interval, within the 30 s
        // timeout) is hit and re-stamped with the coarse clock the datapath caches per
        // jiffy: the stamp must be CLOCK_MONOTONIC_COARSE as userspace reads it.
        let key5000 = flow_key(client4, 5000, vip4, 53, PROTO_UDP);
        let mut state = env.dp.maps.conntrack.get(&key5000, 0).expect("UDP entry");
        state.last_seen_ns = monotonic_ns() - 2_000_000_000;
        env.dp.maps.conntrack.insert(&key5000, &state, 0).unwrap();
        let p = udp(LB0_MAC, client4, 5000, vip4, 53, 32);
        let before = monotonic_ns();
        let case = fwd4(
            env,
            "UDP v4: hit on an entry older than the refresh interval",
            p,
            14,
            v_udp4,
            5000,
            53,
            PROTO_UDP,
            "conntrack_hit",
            false,
            client4,
        );
        t.case(env, case);
        let after = monotonic_ns();
        let stamped = env.dp.maps.conntrack.get(&key5000, 0).unwrap().last_seen_ns;
        // One tick of slack: jiffies and the coarse clock move one after the other.
        if stamped + 20_000_000 < before || stamped > after {
            t.failures.push(format!(
                "UDP refresh stamp {stamped} outside [{before}, {after}] (CLOCK_MONOTONIC_COARSE)"
            ));
        } else {
            t.passed += 1;
        }
        // The per-CPU clock cache is only trusted for the jiffy it was read in: a stale
        // entry (jiffy 1, time 5 ns) is re-read, so the 2 s old entry is a hit, not expired.
        let mut state = env.dp.maps.conntrack.get(&key5000, 0).unwrap();
        state.last_seen_ns = monotonic_ns() - 2_000_000_000;
        env.dp.maps.conntrack.insert(&key5000, &state, 0).unwrap();
        set_clock_cache(
            env,
            ClockCache {
                jiffies: 1,
                coarse_ns: 5,
            },
        );
        let p = udp(LB0_MAC, client4, 5000, vip4, 53, 32);
        let case = fwd4(
            env,
            "UDP v4: a stale per-CPU clock cache is refreshed, not trusted",
            p,
            14,
            v_udp4,
            5000,
            53,
            PROTO_UDP,
            "conntrack_hit",
            false,
            client4,
        );
        t.case(env, case);
        let cache = clock_cache(env);
        if cache.jiffies <= 1 || cache.coarse_ns.abs_diff(monotonic_ns()) > 1_000_000_000 {
            t.failures
                .push(format!("clock cache not refreshed on CPU 0: {cache:?}"));
        } else {
            t.passed += 1;
        }
        // An idle UDP entry (last seen at boot) has expired: re-picked and counted.
        let (predicted, _) = env.predict(v_udp4, client4, 5001, 53, PROTO_UDP);
        let stale = if predicted == 3 { 2 } else { 3 };
        let key = flow_key(client4, 5001, vip4, 53, PROTO_UDP);
        env.dp
            .maps
            .conntrack
            .insert(
                &key,
                &FlowState {
                    backend_id: stale,
                    vip_id: v_udp4,
                    last_seen_ns: 1,
                },
                0,
            )
            .unwrap();
        let p = udp(LB0_MAC, client4, 5001, vip4, 53, 32);
        let mut case = fwd4(
            env,
            "UDP entry idle past the timeout is re-picked",
            p,
            14,
            v_udp4,
            5001,
            53,
            PROTO_UDP,
            "conntrack_miss",
            true,
            client4,
        );
        case.counters.push(("conntrack_udp_expired".into(), 1));
        t.case(env, case);
        let p = syn4(41006, v4("192.0.2.11"), 8443);
        let case = fwd4(
            env,
            "any-port VIP matches port 8443",
            p,
            14,
            v_any,
            41006,
            8443,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        t.case(env, case);
        for sport in [41007u16, 52000] {
            let p = syn4(sport, v4("192.0.2.16"), 80);
            let case = fwd4(
                env,
                &format!("source-affinity VIP, client port {sport}"),
                p,
                14,
                v_affinity,
                sport,
                80,
                PROTO_TCP,
                "conntrack_miss",
                true,
                client4,
            );
            t.case(env, case);
        }
        let (a, _) = env.predict(v_affinity, client4, 41007, 80, PROTO_TCP);
        let (b, _) = env.predict(v_affinity, client4, 52000, 80, PROTO_TCP);
        if a != b {
            t.failures.push(
                "source affinity: two ports of one client predicted on different backends".into(),
            );
        }

        // ---- IPv6 and IPv4-in-IPv6.
        let fwd6 = |env: &FixtureEnv,
                    name: &str,
                    pkt: Vec<u8>,
                    vip: u32,
                    src: IpAddr,
                    sport: u16,
                    dport: u16,
                    proto: u8,
                    ct: &str,
                    new: bool| {
            let (backend, hash) = env.predict(vip, src, sport, dport, proto);
            let expected = expected_encap(
                &pkt,
                14,
                LB0_MAC,
                ROUTER_MAC,
                tunnel_src_v6(),
                backend_addr(backend),
                hash,
            );
            let ip_len = pkt.len() - 14;
            Case {
                name: name.into(),
                program: BALANCER,
                packet: pkt,
                ingress: env.lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters: fwd_counters("forwarded_tx", ct, vip, backend, ip_len, new),
            }
        };
        let p = tcp(LB0_MAC, client6, 42000, vip6, 80, TcpFlags::SYN, 0);
        let case = fwd6(
            env,
            "TCP v6 SYN: IPv6-in-IPv6",
            p,
            v_tcp6,
            client6,
            42000,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
        );
        t.case(env, case);
        let p = tcp(LB0_MAC, client6, 42000, vip6, 80, TcpFlags::ACK, 200);
        let case = fwd6(
            env,
            "TCP v6 established: conntrack hit",
            p,
            v_tcp6,
            client6,
            42000,
            80,
            PROTO_TCP,
            "conntrack_hit",
            false,
        );
        t.case(env, case);
        match env
            .dp
            .maps
            .conntrack
            .v6
            .get(&flow_key(client6, 42000, vip6, 80, PROTO_TCP), 0)
        {
            Ok(state) if state.vip_id == v_tcp6 => t.passed += 1,
            other => t.failures.push(format!(
                "IPv6 flow table placement: XLB_CONNTRACK {other:?}"
            )),
        }
        let p = udp(LB0_MAC, client6, 6000, vip6, 53, 40);
        let case = fwd6(
            env,
            "UDP v6: IPv6-in-IPv6",
            p,
            v_udp6,
            client6,
            6000,
            53,
            PROTO_UDP,
            "conntrack_miss",
            true,
        );
        t.case(env, case);
        let p = syn4(42001, v4("192.0.2.12"), 80);
        let case = fwd6(
            env,
            "TCP v4 to an IPv6 backend: IPv4-in-IPv6",
            p,
            v_4in6,
            client4,
            42001,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
        );
        t.case(env, case);

        // ---- Next hop on another interface: XDP_REDIRECT with that interface's MACs.
        let p = syn4(43000, v4("192.0.2.13"), 80);
        let (_, hash) = env.predict(v_redirect, client4, 43000, 80, PROTO_TCP);
        let expected = expected_encap(
            &p,
            14,
            LB1_MAC,
            DIRECT_BACKEND_MAC,
            tunnel_src_v4(),
            backend_addr(6),
            hash,
        );
        let ip_len = p.len() - 14;
        t.case(
            env,
            Case {
                name: "backend behind another interface: XDP_REDIRECT".into(),
                program: BALANCER,
                packet: p,
                ingress: lb0,
                verdict: XDP_REDIRECT,
                output: Output::Bytes(expected),
                counters: fwd_counters(
                    "forwarded_redirect",
                    "conntrack_miss",
                    v_redirect,
                    6,
                    ip_len,
                    true,
                ),
            },
        );
        let p = tcp(
            LB0_MAC,
            client6,
            43001,
            v6("2001:db8:1::13"),
            80,
            TcpFlags::SYN,
            0,
        );
        let (_, hash) = env.predict(v_redirect6, client6, 43001, 80, PROTO_TCP);
        let expected = expected_encap(
            &p,
            14,
            LB1_MAC,
            DIRECT_BACKEND_MAC,
            tunnel_src_v6(),
            backend_addr(8),
            hash,
        );
        let ip_len = p.len() - 14;
        t.case(
            env,
            Case {
                name: "IPv6 backend behind another interface: XDP_REDIRECT".into(),
                program: BALANCER,
                packet: p,
                ingress: lb0,
                verdict: XDP_REDIRECT,
                output: Output::Bytes(expected),
                counters: fwd_counters(
                    "forwarded_redirect",
                    "conntrack_miss",
                    v_redirect6,
                    8,
                    ip_len,
                    true,
                ),
            },
        );

        // ---- No route: the configured gateway MAC, or a counted drop without one.
        let p = syn4(44000, v4("192.0.2.15"), 80);
        let (_, hash) = env.predict(v_fallback, client4, 44000, 80, PROTO_TCP);
        let expected = expected_encap(
            &p,
            14,
            LB0_MAC,
            FALLBACK_GW_MAC,
            tunnel_src_v4(),
            backend_addr(7),
            hash,
        );
        let ip_len = p.len() - 14;
        let mut counters = fwd_counters(
            "forwarded_tx",
            "conntrack_miss",
            v_fallback,
            7,
            ip_len,
            true,
        );
        counters.push(("fib_gateway_fallback".into(), 1));
        t.case(
            env,
            Case {
                name: "no route to the backend: gateway MAC fallback".into(),
                program: BALANCER,
                packet: p,
                ingress: lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters,
            },
        );
        env.set_config(|cfg| cfg.gateway_mac = [0; 6]);
        let p = syn4(44001, v4("192.0.2.15"), 80);
        let mut counters = c(&[
            ("rx_packets", 1),
            ("drop_fib_failure", 1),
            ("conntrack_miss", 1),
        ]);
        counters.push((format!("vip{v_fallback}_new_conns"), 1));
        t.case(
            env,
            Case {
                name: "no route and no gateway: counted drop".into(),
                program: BALANCER,
                packet: p,
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters,
            },
        );
        env.set_config(|_| {});

        // ---- No backend.
        t.case(
            env,
            Case {
                name: "VIP with an empty table".into(),
                program: BALANCER,
                packet: syn4(45000, v4("192.0.2.14"), 80),
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[
                    ("rx_packets", 1),
                    ("drop_no_backend", 1),
                    ("conntrack_miss", 1),
                ]),
            },
        );
        t.case(
            env,
            Case {
                name: "table slot names an unused backend id".into(),
                program: BALANCER,
                packet: syn4(45001, v4("192.0.2.17"), 80),
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[
                    ("rx_packets", 1),
                    ("drop_no_backend", 1),
                    ("conntrack_miss", 1),
                ]),
            },
        );
        let _ = v_stale;

        // ---- MTU: answer with the usable MTU, drop the original.
        let big = tcp(LB0_MAC, client4, 46000, vip4, 80, TcpFlags::ACK, 1460); // IP length 1500
        let expected = expected_frag_needed(&big, vip4, client4, 1480);
        t.case(
            env,
            Case {
                name: "IPv4 DF packet too big once encapsulated: ICMP frag needed".into(),
                program: BALANCER,
                packet: big.clone(),
                ingress: lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters: c(&[
                    ("rx_packets", 1),
                    ("too_big_icmp_sent", 1),
                    ("conntrack_miss", 1),
                    (&format!("vip{v_tcp4}_new_conns"), 1),
                ]),
            },
        );
        let mut no_df = big.clone();
        no_df[20] = 0;
        fix_ipv4_checksum(&mut no_df, 14);
        t.case(
            env,
            Case {
                name: "IPv4 too big without DF: counted drop".into(),
                program: BALANCER,
                packet: no_df,
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[("rx_packets", 1), ("drop_too_big", 1), ("conntrack_hit", 1)]),
            },
        );
        let big6 = tcp(LB0_MAC, client6, 46001, vip6, 80, TcpFlags::ACK, 1440); // IP length 1500
        let expected = expected_packet_too_big(&big6, vip6, client6, 1460);
        t.case(
            env,
            Case {
                name: "IPv6 packet too big once encapsulated: ICMPv6 packet too big".into(),
                program: BALANCER,
                packet: big6,
                ingress: lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters: c(&[
                    ("rx_packets", 1),
                    ("too_big_icmp_sent", 1),
                    ("conntrack_miss", 1),
                    (&format!("vip{v_tcp6}_new_conns"), 1),
                ]),
            },
        );
        env.set_config(|cfg| cfg.fallback_mtu = 1400);
        let mid = tcp(
            LB0_MAC,
            client4,
            46002,
            v4("192.0.2.15"),
            80,
            TcpFlags::ACK,
            1360,
        ); // IP 1400
        let expected = expected_frag_needed(&mid, v4("192.0.2.15"), client4, 1380);
        t.case(
            env,
            Case {
                name: "gateway fallback path checks the configured fallback MTU".into(),
                program: BALANCER,
                packet: mid,
                ingress: lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters: c(&[
                    ("rx_packets", 1),
                    ("too_big_icmp_sent", 1),
                    ("conntrack_miss", 1),
                    (&format!("vip{v_fallback}_new_conns"), 1),
                ]),
            },
        );
        env.set_config(|_| {});

        // ---- New-connection rate guard: above the limit inserts are skipped, packets still go.
        env.set_config(|cfg| cfg.new_conn_rate_limit = 1);
        {
            let mut rate: PerCpuArray<MapData, RateGuard> = PerCpuArray::try_from(
                aya::maps::Map::from_map_data(
                    MapData::from_pin(env.pins.path.join("XLB_RATE")).unwrap(),
                )
                .unwrap(),
            )
            .unwrap();
            let cpus = aya::util::nr_cpus().unwrap();
            let full = RateGuard {
                window_start_ns: monotonic_ns(),
                inserts: 1,
            };
            rate.set(
                0,
                PerCpuValues::try_from(vec![full; cpus.get() as usize]).unwrap(),
                0,
            )
            .unwrap();
        }
        let p = syn4(47000, vip4, 80);
        let mut case = fwd4(
            env,
            "rate guard full: insert skipped, packet forwarded",
            p,
            14,
            v_tcp4,
            47000,
            80,
            PROTO_TCP,
            "conntrack_miss",
            true,
            client4,
        );
        case.counters.push(("conntrack_insert_skipped".into(), 1));
        t.case(env, case);
        if env
            .dp
            .maps
            .conntrack
            .get(&flow_key(client4, 47000, vip4, 80, PROTO_TCP), 0)
            .is_ok()
        {
            t.failures
                .push("rate guard: the skipped flow was inserted anyway".into());
        }
        env.set_config(|_| {});

        // ---- ICMP errors about a VIP flow go to the flow's backend (path MTU of the
        // backends' direct replies), as the original packet was encapsulated.
        let router = v4("198.51.100.250");
        let icmp_case = |env: &FixtureEnv,
                         name: &str,
                         pkt: Vec<u8>,
                         vip: u32,
                         backend: u32,
                         entropy: u32,
                         outer_src: IpAddr| {
            let expected = expected_encap(
                &pkt,
                14,
                LB0_MAC,
                ROUTER_MAC,
                outer_src,
                backend_addr(backend),
                entropy,
            );
            let ip_len = pkt.len() - 14;
            let mut counters = c(&[
                ("rx_packets", 1),
                ("forwarded_tx", 1),
                ("icmp_to_backend", 1),
            ]);
            counters.push((format!("vip{vip}_packets"), 1));
            counters.push((format!("vip{vip}_bytes"), ip_len as u64));
            counters.push((format!("backend{backend}_packets"), 1));
            counters.push((format!("backend{backend}_bytes"), ip_len as u64));
            let _ = env;
            Case {
                name: name.into(),
                program: BALANCER,
                packet: pkt,
                ingress: lb0,
                verdict: XDP_TX,
                output: Output::Bytes(expected),
                counters,
            }
        };
        // Flow 41000 has a connection entry from the SYN case above.
        let tracked = env
            .dp
            .maps
            .conntrack
            .get(&flow_key(client4, 41000, vip4, 80, PROTO_TCP), 0)
            .expect("entry of flow 41000")
            .backend_id;
        let reply = tcp(LB0_MAC, vip4, 80, client4, 41000, TcpFlags::ACK, 1400);
        let p = icmp_too_big_to_vip(LB0_MAC, router, vip4, &reply, 1400);
        t.case(
            env,
            icmp_case(
                env,
                "ICMP frag needed for a tracked flow's reply goes to its backend",
                p,
                v_tcp4,
                tracked,
                0,
                tunnel_src_v4(),
            ),
        );
        let (picked, _) = env.predict(v_tcp4, client4, 47777, 80, PROTO_TCP);
        let reply = tcp(LB0_MAC, vip4, 80, client4, 47777, TcpFlags::ACK, 1400);
        let p = icmp_too_big_to_vip(LB0_MAC, router, vip4, &reply, 1400);
        t.case(
            env,
            icmp_case(
                env,
                "ICMP frag needed for an untracked flow goes to Maglev's backend",
                p,
                v_tcp4,
                picked,
                0,
                tunnel_src_v4(),
            ),
        );
        let (picked6, hash6) = env.predict(v_tcp6, client6, 42000, 80, PROTO_TCP);
        let tracked6 = env
            .dp
            .maps
            .conntrack
            .get(&flow_key(client6, 42000, vip6, 80, PROTO_TCP), 0)
            .map(|s| s.backend_id)
            .unwrap_or(picked6);
        let reply6 = tcp(LB0_MAC, vip6, 80, client6, 42000, TcpFlags::ACK, 1300);
        let p = icmp_too_big_to_vip(
            LB0_MAC,
            v6("2001:db8:1::fe"),
            vip6,
            &reply6[..14 + 40 + 20 + 64],
            1280,
        );
        t.case(
            env,
            icmp_case(
                env,
                "ICMPv6 packet too big for a v6 flow's reply goes to its backend",
                p,
                v_tcp6,
                tracked6,
                hash6,
                tunnel_src_v6(),
            ),
        );
        let foreign = tcp(
            LB0_MAC,
            v4("192.0.2.200"),
            80,
            client4,
            41000,
            TcpFlags::ACK,
            0,
        );
        let p = icmp_too_big_to_vip(LB0_MAC, router, vip4, &foreign, 1400);
        t.case(
            env,
            passes(
                "ICMP error quoting a packet the VIP did not send goes to the stack",
                p,
                "pass_vip_other_proto",
            ),
        );

        // ---- Decapsulation on backends.
        let local4 = v4("198.51.100.11");
        let local6 = v6("2001:db8:b::21");
        env.dp
            .maps
            .decap_addrs
            .insert(&addr_key(local4), &1, 0)
            .unwrap();
        env.dp
            .maps
            .decap_addrs
            .insert(&addr_key(local6), &1, 0)
            .unwrap();
        let inner = syn4(48000, vip4, 80);
        let outer = expected_encap(&inner, 14, LB0_MAC, ROUTER_MAC, tunnel_src_v4(), local4, 0);
        let mut want = outer[..12].to_vec();
        want.extend_from_slice(&inner[12..]);
        let decap_ok = |name: &str, packet: Vec<u8>, want: Vec<u8>| Case {
            name: name.into(),
            program: DECAP,
            packet,
            ingress: lb0,
            verdict: XDP_PASS,
            output: Output::Bytes(want),
            counters: c(&[("decap_rx_packets", 1), ("decap_decapsulated", 1)]),
        };
        t.case(
            env,
            decap_ok(
                "decap IPv4-in-IPv4 for a local address",
                outer.clone(),
                want,
            ),
        );
        let inner6 = tcp(LB0_MAC, client6, 48001, vip6, 80, TcpFlags::SYN, 0);
        let outer6 = expected_encap(
            &inner6,
            14,
            LB0_MAC,
            ROUTER_MAC,
            tunnel_src_v6(),
            local6,
            77,
        );
        let mut want = outer6[..12].to_vec();
        want.extend_from_slice(&inner6[12..]);
        t.case(env, decap_ok("decap IPv6-in-IPv6", outer6, want));
        let outer46 = expected_encap(&inner, 14, LB0_MAC, ROUTER_MAC, tunnel_src_v6(), local6, 5);
        let mut want = outer46[..12].to_vec();
        want.extend_from_slice(&inner[12..]);
        t.case(
            env,
            decap_ok(
                "decap IPv4-in-IPv6 restores the IPv4 EtherType",
                outer46,
                want,
            ),
        );
        let tagged_inner = with_vlan(&inner, 9);
        let tagged_outer = expected_encap(
            &tagged_inner,
            18,
            LB0_MAC,
            ROUTER_MAC,
            tunnel_src_v4(),
            local4,
            0,
        );
        let mut want = tagged_outer[..12].to_vec();
        want.extend_from_slice(&tagged_inner[12..]);
        t.case(
            env,
            decap_ok("decap keeps an 802.1Q tag", tagged_outer, want),
        );
        let foreign = expected_encap(
            &inner,
            14,
            LB0_MAC,
            ROUTER_MAC,
            tunnel_src_v4(),
            v4("198.51.100.99"),
            0,
        );
        t.case(
            env,
            Case {
                name: "decap leaves tunnels to other addresses alone".into(),
                program: DECAP,
                packet: foreign,
                ingress: lb0,
                verdict: XDP_PASS,
                output: Output::Unchanged,
                counters: c(&[("decap_rx_packets", 1), ("decap_pass_not_local", 1)]),
            },
        );
        t.case(
            env,
            Case {
                name: "decap leaves plain TCP alone".into(),
                program: DECAP,
                packet: inner.clone(),
                ingress: lb0,
                verdict: XDP_PASS,
                output: Output::Unchanged,
                counters: c(&[("decap_rx_packets", 1), ("decap_pass_not_tunnel", 1)]),
            },
        );
        let mut broken = outer.clone();
        broken[14 + 20] = 0x65; // inner "IPv4" with version 6
        t.case(
            env,
            Case {
                name: "decap drops a tunnel whose inner header is not IPv4".into(),
                program: DECAP,
                packet: broken,
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[("decap_rx_packets", 1), ("decap_drop_malformed", 1)]),
            },
        );
        t.case(
            env,
            Case {
                name: "decap drops a tunnel cut inside the inner header".into(),
                program: DECAP,
                packet: outer[..14 + 20 + 8].to_vec(),
                ingress: lb0,
                verdict: XDP_DROP,
                output: Output::Dropped,
                counters: c(&[("decap_rx_packets", 1), ("decap_drop_malformed", 1)]),
            },
        );

        // ---- Round trip: what the balancer emits, the decapsulator turns back into the
        // client's packet (MACs aside).
        let original = syn4(49000, vip4, 80);
        let (backend, _) = env.predict(v_tcp4, client4, 49000, 80, PROTO_TCP);
        env.dp
            .maps
            .decap_addrs
            .insert(&addr_key(backend_addr(backend)), &1, 0)
            .unwrap();
        let lb_out = env.run_packet(BALANCER, &original, lb0);
        let be_out = env.run_packet(DECAP, &lb_out.packet, lb0);
        if lb_out.verdict != XDP_TX
            || be_out.verdict != XDP_PASS
            || be_out.packet[12..] != original[12..]
        {
            t.failures.push(format!(
                "round trip: balancer {} decap {} output {}",
                lb_out.verdict,
                be_out.verdict,
                hex(&be_out.packet)
            ));
        } else {
            t.passed += 1;
        }

        let total = t.passed + t.failures.len();
        println!(
            "packet fixtures: {} passed, {} failed (of {total})",
            t.passed,
            t.failures.len()
        );
        assert!(
            total >= 40,
            "the fixture table must hold at least 40 cases, has {total}"
        );
        assert!(
            t.failures.is_empty(),
            "fixture failures:\n{}",
            t.failures.join("\n")
        );

        // Every packet the balancer saw landed in exactly one outcome counter.
        let stats = env.dp.maps.stats().unwrap();
        let fields: BTreeMap<_, _> = stats.fields().into_iter().collect();
        let outcomes: u64 = lb_common::DatapathStats::OUTCOMES
            .iter()
            .map(|n| fields[n])
            .sum();
        assert_eq!(
            outcomes, stats.rx_packets,
            "outcome counters must add up to rx_packets"
        );
    });
}

/// A datapath pinned before the IPv4 connection table existed kept IPv4 flows in
/// `XLB_CONNTRACK` under the 40-byte key. Loading over its pins moves them to
/// `XLB_CONNTRACK4`, so an upgrade keeps established flows on their backends.
#[test]
fn ipv4_entries_of_an_older_datapath_move_to_the_ipv4_table() {
    FixtureEnv::run(FixtureEnv::small(), |env| {
        for id in 1..=3 {
            env.add_backend(id, backend_addr(id));
        }
        let vip4 = v4("192.0.2.10");
        let client4 = v4("192.0.2.100");
        let v_tcp4 = env.add_vip(vip4, 80, PROTO_TCP, 0, &[1, 2, 3]);
        let (predicted, hash) = env.predict(v_tcp4, client4, 43000, 80, PROTO_TCP);
        let recorded = if predicted == 1 { 2 } else { 1 };
        let key = flow_key(client4, 43000, vip4, 80, PROTO_TCP);
        let state = FlowState {
            backend_id: recorded,
            vip_id: v_tcp4,
            last_seen_ns: monotonic_ns(),
        };
        // The old layout: the IPv4 flow in the one table, and no IPv4 table pinned.
        env.dp.maps.conntrack.v6.insert(&key, &state, 0).unwrap();
        std::fs::remove_file(env.pins.path.join(map_names::CONNTRACK4)).unwrap();

        let reloaded = Datapath::load(&LoadOptions {
            pin_dir: env.pins.path.clone(),
            ..FixtureEnv::small()
        })
        .expect("load over the old pins");
        assert_eq!(
            reloaded
                .maps
                .conntrack
                .v4
                .get(&key.to_v4().unwrap(), 0)
                .ok(),
            Some(state),
            "the entry is in the IPv4 table"
        );
        assert!(
            reloaded.maps.conntrack.v6.get(&key, 0).is_err(),
            "and no longer in the IPv6 table"
        );
        assert!(env.pins.path.join(map_names::CONNTRACK4).exists());
        // The new balancer finds it: an ACK goes to the recorded backend, not Maglev's.
        let p = tcp(LB0_MAC, client4, 43000, vip4, 80, TcpFlags::ACK, 0);
        let out = reloaded
            .test_run(BALANCER, &p, Some(env.lb0))
            .expect("test run");
        assert_eq!(out.verdict, XDP_TX);
        assert_eq!(
            hex(&out.packet),
            hex(&expected_encap(
                &p,
                14,
                LB0_MAC,
                ROUTER_MAC,
                tunnel_src_v4(),
                backend_addr(recorded),
                hash,
            )),
            "forwarded to the recorded backend {recorded} (Maglev would pick {predicted})"
        );
    });
}

/// `xlb conntrack` lists the flows of both tables and `xlb explain` finds each one, with
/// the backend the kernel recorded.
#[test]
fn cli_lists_and_explains_ipv4_and_ipv6_connections() {
    use lb_userspace::cli::{self, Output};
    use lb_userspace::model::Protocol;
    use std::net::SocketAddr;

    FixtureEnv::run(FixtureEnv::small(), |env| {
        for id in 1..=5 {
            env.add_backend(id, backend_addr(id));
        }
        let (vip4, vip6) = (v4("192.0.2.10"), v6("2001:db8:1::10"));
        let (client4, client6) = (v4("192.0.2.100"), v6("2001:db8:c::100"));
        let v_tcp4 = env.add_vip(vip4, 80, PROTO_TCP, 0, &[1, 2, 3]);
        let v_udp6 = env.add_vip(vip6, 53, PROTO_UDP, 0, &[4, 5]);
        let syn = tcp(LB0_MAC, client4, 44000, vip4, 80, TcpFlags::SYN, 0);
        let dns = udp(LB0_MAC, client6, 6000, vip6, 53, 16);
        for p in [&syn, &dns] {
            assert_eq!(env.run_packet(BALANCER, p, env.lb0).verdict, XDP_TX);
        }
        let (b4, _) = env.predict(v_tcp4, client4, 44000, 80, PROTO_TCP);
        let (b6, _) = env.predict(v_udp6, client6, 6000, 53, PROTO_UDP);

        let pinned = cli::open(&env.pins.path).expect("open the pins");
        let listed: serde_json::Value =
            serde_json::from_str(&cli::conntrack(&pinned, None, 100, Output::Json).unwrap())
                .unwrap();
        let rows = listed.as_array().expect("a JSON array");
        assert_eq!(rows.len(), 2, "one entry per flow: {listed}");
        for (client, vip, proto, backend) in [
            ("192.0.2.100:44000", "192.0.2.10:80", "tcp", b4),
            ("[2001:db8:c::100]:6000", "[2001:db8:1::10]:53", "udp", b6),
        ] {
            let row = rows
                .iter()
                .find(|r| r["client"] == client)
                .unwrap_or_else(|| panic!("{client} missing from {listed}"));
            assert_eq!(row["vip"], vip);
            assert_eq!(row["protocol"], proto);
            assert_eq!(row["backend_id"], backend);
            assert_eq!(row["backend"], backend_addr(backend).to_string());
        }

        for (src, dst, proto, backend) in [
            ("192.0.2.100:44000", "192.0.2.10:80", Protocol::Tcp, b4),
            (
                "[2001:db8:c::100]:6000",
                "[2001:db8:1::10]:53",
                Protocol::Udp,
                b6,
            ),
        ] {
            let src: SocketAddr = src.parse().unwrap();
            let dst: SocketAddr = dst.parse().unwrap();
            let e = cli::explain(&pinned, src, dst, proto).unwrap();
            let entry = e
                .conntrack
                .unwrap_or_else(|| panic!("explain {src} -> {dst}: no conntrack entry"));
            assert_eq!(entry.backend_id, backend, "explain {src} -> {dst}");
        }
    });
}
