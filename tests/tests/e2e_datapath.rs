//! Real sockets through the real XDP datapath: a client namespace opens TCP connections and
//! sends UDP datagrams to VIPs; the LB node's XDP program encapsulates them toward backends
//! whose XDP decapsulator hands them to a server bound on the VIP; the server answers the
//! client directly. Maps are programmed through `lb-userspace`'s datapath API and Maglev.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use xlb_tests::netns::PinDir;
use xlb_tests::testbed::*;

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
