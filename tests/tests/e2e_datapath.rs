//! Real sockets through the real XDP datapath: a client namespace opens TCP connections and
//! sends UDP datagrams to VIPs; the LB node's XDP program encapsulates them toward backends
//! whose XDP decapsulator hands them to a server bound on the VIP; the server answers the
//! client directly. Maps are programmed through `lb-userspace`'s datapath API and Maglev.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use aya::programs::XdpMode;
use lb_common::{
    Backend, DatapathConfig, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VipAddrKey, VipInfo,
    VipKey, program_names,
};
use lb_userspace::datapath::{Datapath, LoadOptions};
use lb_userspace::maglev::{self, WeightedBackend};
use xlb_tests::netns::PinDir;
use xlb_tests::packets::addr_words;
use xlb_tests::testbed::*;

const M: u32 = 65_537;

fn small(pins: &PinDir) -> LoadOptions {
    LoadOptions {
        pin_dir: pins.path.clone(),
        maglev_table_size: M,
        max_vips: 8,
        max_backends: 64,
        conntrack_entries: 65_536,
    }
}

/// Loads the balancer in the LB namespace, attaches it to l0 (native XDP), and programs one
/// TCP and one UDP VIP on each address family over the backends with the given weights.
fn start_balancer(bed: &Testbed, pins: &PinDir, weights: &[u32]) -> Datapath {
    let opts = small(pins);
    let backends: Vec<(IpAddr, IpAddr, u32)> = bed
        .backends
        .iter()
        .zip(weights)
        .map(|(b, w)| (IpAddr::V4(b.addr), IpAddr::V6(b.addr6), *w))
        .collect();
    in_ns(&bed.lb, move || {
        let mut dp = Datapath::load(&opts).expect("load datapath");
        dp.attach(program_names::BALANCER, "l0", XdpMode::Driver)
            .expect("attach balancer");
        let cfg = DatapathConfig {
            maglev_table_size: M,
            new_conn_rate_limit: 0,
            udp_idle_timeout_ns: 30_000_000_000,
            tunnel_src_v4_be: addr_words(IpAddr::V4(LB_CLIENT_SIDE))[0],
            fallback_mtu: 1500,
            tunnel_src_v6_be: addr_words(IpAddr::V6(LB_CLIENT_SIDE6)),
            gateway_mac: [0; 6],
            _pad: [0; 2],
        };
        dp.maps.set_config(&cfg).unwrap();
        // Backend ids: IPv4 i, IPv6 32 + i.
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (i, (a4, a6, w)) in backends.iter().enumerate() {
            let id4 = i as u32 + 1;
            let id6 = 32 + i as u32 + 1;
            dp.maps
                .backends
                .set(
                    id4,
                    &Backend {
                        addr_be: addr_words(*a4),
                        family: FAMILY_V4,
                        _pad: [0; 3],
                    },
                    0,
                )
                .unwrap();
            dp.maps
                .backends
                .set(
                    id6,
                    &Backend {
                        addr_be: addr_words(*a6),
                        family: FAMILY_V6,
                        _pad: [0; 3],
                    },
                    0,
                )
                .unwrap();
            v4.push(WeightedBackend {
                address: *a4,
                weight: *w,
                id: id4,
            });
            v6.push(WeightedBackend {
                address: *a6,
                weight: *w,
                id: id6,
            });
        }
        let vips = [
            (IpAddr::V4(VIP4), 80u16, PROTO_TCP, &v4),
            (IpAddr::V4(VIP4), 53, PROTO_UDP, &v4),
            (IpAddr::V6(VIP6), 80, PROTO_TCP, &v6),
            (IpAddr::V6(VIP6), 53, PROTO_UDP, &v6),
        ];
        for (vip_id, (addr, port, proto, set)) in vips.iter().enumerate() {
            let table = maglev::build(&format!("{addr}:{port}"), M, set)
                .expect("maglev")
                .table;
            let ring = 2 * vip_id as u32;
            dp.maps.maglev.write_ring(ring, &table).unwrap();
            let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
            let key = VipKey {
                addr_be: addr_words(*addr),
                port_be: port.to_be(),
                proto: *proto,
                family,
            };
            dp.maps
                .vips
                .insert(
                    &key,
                    &VipInfo {
                        vip_id: vip_id as u32,
                        ring,
                        flags: 0,
                        _pad: 0,
                    },
                    0,
                )
                .unwrap();
            let akey = VipAddrKey {
                addr_be: addr_words(*addr),
                family,
                _pad: [0; 3],
            };
            let n = dp.maps.vip_addrs.get(&akey, 0).unwrap_or(0);
            dp.maps.vip_addrs.insert(&akey, &(n + 1), 0).unwrap();
        }
        dp
    })
}

/// Attaches the decapsulator on every backend's eth0 and, on the client, the pass program
/// (native XDP_TX toward a veth is delivered only when its peer runs an XDP program).
fn start_decap_and_peers(bed: &Testbed) -> Vec<(PinDir, Datapath)> {
    let mut held = Vec::new();
    for b in &bed.backends {
        let pins = PinDir::new(&format!("decap{}", b.index));
        let mut opts = small(&pins);
        opts.maglev_table_size = 3;
        let (a4, a6) = (b.addr, b.addr6);
        let dp = in_ns(&b.ns, move || {
            let mut dp = Datapath::load(&opts).expect("load decap");
            dp.attach(program_names::DECAP, "eth0", XdpMode::Driver)
                .expect("attach decap");
            for addr in [IpAddr::V4(a4), IpAddr::V6(a6)] {
                let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
                dp.maps
                    .decap_addrs
                    .insert(
                        &VipAddrKey {
                            addr_be: addr_words(addr),
                            family,
                            _pad: [0; 3],
                        },
                        &1,
                        0,
                    )
                    .unwrap();
            }
            dp
        });
        held.push((pins, dp));
    }
    let pins = PinDir::new("clientpass");
    let mut opts = small(&pins);
    opts.maglev_table_size = 3;
    let dp = in_ns(&bed.client, move || {
        let mut dp = Datapath::load(&opts).expect("load pass");
        dp.attach(program_names::PASS, "c0", XdpMode::Driver)
            .expect("attach pass");
        dp
    });
    held.push((pins, dp));
    held
}

#[test]
fn tcp_and_udp_over_ipv4_and_ipv6_reach_every_backend_through_xdp() {
    let bed = Testbed::new(&TestbedOptions::default());
    bed.wait_for_neighbours();
    let _servers: Vec<BackendServer> = bed
        .backends
        .iter()
        .map(|b| BackendServer::start(b, 80))
        .collect();
    let _udp: Vec<BackendServer> = bed
        .backends
        .iter()
        .map(|b| BackendServer::start(b, 53))
        .collect();
    let pins = PinDir::new("e2e-lb");
    let _peers = start_decap_and_peers(&bed);
    let dp = start_balancer(&bed, &pins, &[1, 1, 1]);

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = 0;
    let vip4 = SocketAddr::new(IpAddr::V4(VIP4), 80);
    for (n, src) in bed.client_addrs.iter().cycle().take(300).enumerate() {
        match tcp_request(&bed.client, IpAddr::V4(*src), vip4) {
            Ok(who) => *seen.entry(who).or_default() += 1,
            Err(e) => {
                failures += 1;
                eprintln!("tcp4 request {n} from {src}: {e}");
            }
        }
    }
    let vip6 = SocketAddr::new(IpAddr::V6(VIP6), 80);
    for _ in 0..60 {
        match tcp_request(&bed.client, IpAddr::V6(bed.client_addr6), vip6) {
            Ok(who) => *seen.entry(format!("v6 {who}")).or_default() += 1,
            Err(e) => {
                failures += 1;
                eprintln!("tcp6: {e}");
            }
        }
    }
    for port in 20000..20060u16 {
        let src = SocketAddr::new(IpAddr::V4(bed.client_addrs[0]), port);
        match udp_request(&bed.client, src, SocketAddr::new(IpAddr::V4(VIP4), 53)) {
            Ok(who) => *seen.entry(format!("udp {who}")).or_default() += 1,
            Err(e) => {
                failures += 1;
                eprintln!("udp4: {e}");
            }
        }
    }
    let stats = dp.maps.stats().unwrap();
    println!("answers by backend: {seen:?}");
    println!(
        "datapath: {:?}",
        stats
            .fields()
            .iter()
            .filter(|(_, v)| *v != 0)
            .collect::<Vec<_>>()
    );
    assert_eq!(failures, 0, "every request must be answered");
    for i in 1..=3 {
        assert!(
            seen.contains_key(&format!("backend-{i}")),
            "tcp4 never reached backend-{i}: {seen:?}"
        );
        assert!(
            seen.contains_key(&format!("v6 backend-{i}"))
                || seen.keys().filter(|k| k.starts_with("v6")).count() >= 2,
            "tcp6 spread: {seen:?}"
        );
    }
    assert!(
        stats.forwarded_redirect > 300,
        "packets went through XDP_REDIRECT: {stats:?}"
    );
    assert_eq!(
        stats.drop_malformed + stats.drop_fib_failure + stats.drop_no_backend,
        0,
        "{stats:?}"
    );
}
