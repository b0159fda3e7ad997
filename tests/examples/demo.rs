//! `cargo xtask demo`: xlb on network namespaces with the embedded default config.
//!
//! Builds the topology the embedded config describes (a client, one LB node, three backends
//! running the decapsulator and a small TCP/UDP server), starts the datapath, sends a bounded
//! burst of real TCP connections and UDP requests from 50 client addresses, prints how they
//! spread over the backends and what the datapath counted, then tears everything down — also
//! on Ctrl-C.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xlb_tests::netns::PinDir;
use xlb_tests::testbed::*;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const CONNECTIONS: usize = 600;
const UDP_REQUESTS: u16 = 150;
const TIME_LIMIT: Duration = Duration::from_secs(60);

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    println!("xlb demo: building the topology of the embedded default config");
    println!(
        "  client 192.0.2.100-149 -> LB node 192.0.2.1 (XDP on eth0) -> backends 198.51.100.6/.10/.14"
    );
    let bed = Testbed::new(&TestbedOptions {
        backends: 3,
        client_addresses: 50,
    });
    bed.wait_for_neighbours();
    let _tcp: Vec<BackendServer> = bed
        .backends
        .iter()
        .map(|b| BackendServer::start(b, 80))
        .collect();
    let _udp: Vec<BackendServer> = bed
        .backends
        .iter()
        .map(|b| BackendServer::start(b, 53))
        .collect();
    let _peers = start_decap_and_peers(&bed);
    let pins = PinDir::new("demo");
    let dp = start_balancer(&bed, &pins, &[1, 1, 1]);
    println!(
        "  LB node namespace: {}   pins: {}",
        bed.lb.name,
        pins.path.display()
    );

    let started = Instant::now();
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0usize;
    let vip = SocketAddr::new(IpAddr::V4(VIP4), 80);
    for src in bed.client_addrs.iter().cycle().take(CONNECTIONS) {
        if STOP.load(Ordering::Relaxed) || started.elapsed() > TIME_LIMIT {
            break;
        }
        match tcp_request(&bed.client, IpAddr::V4(*src), vip) {
            Ok(who) => *by_backend.entry(who).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    let mut udp_by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for port in 30000..30000 + UDP_REQUESTS {
        if STOP.load(Ordering::Relaxed) || started.elapsed() > TIME_LIMIT {
            break;
        }
        let src = SocketAddr::new(
            IpAddr::V4(bed.client_addrs[port as usize % bed.client_addrs.len()]),
            port,
        );
        match udp_request(&bed.client, src, SocketAddr::new(IpAddr::V4(VIP4), 53)) {
            Ok(who) => *udp_by_backend.entry(who).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    let elapsed = started.elapsed();

    let total: usize = by_backend.values().sum();
    println!(
        "\n{total} TCP connections to {vip} in {:.1} s ({failed} failed):",
        elapsed.as_secs_f64()
    );
    for (backend, n) in &by_backend {
        println!(
            "  {backend:<10} {n:>5}  {:>5.1} %  {}",
            100.0 * *n as f64 / total.max(1) as f64,
            "#".repeat(n * 40 / total.max(1))
        );
    }
    let udp_total: usize = udp_by_backend.values().sum();
    println!("{udp_total} UDP requests to {VIP4}:53:");
    for (backend, n) in &udp_by_backend {
        println!(
            "  {backend:<10} {n:>5}  {:>5.1} %",
            100.0 * *n as f64 / udp_total.max(1) as f64
        );
    }

    let stats = dp.maps.stats().expect("read counters");
    println!("\ndatapath counters (non-zero):");
    for (name, value) in stats.fields() {
        if value != 0 {
            println!("  {name:<26} {value}");
        }
    }
    // Every map carries BTF, so bpftool prints the shared structs field by field.
    let vips_pin = format!("{}/XLB_VIPS", pins.path.display());
    println!("\n$ bpftool map dump pinned {vips_pin}   (first entry)");
    // Maps are not per network namespace; `ip netns exec` would also hide the host's bpffs.
    let dump = xlb_tests::netns::sh(&["bpftool", "map", "dump", "pinned", &vips_pin]);
    for line in dump.lines().take(16) {
        println!("  {line}");
    }
    println!(
        "(while a datapath runs, every map can be read that way: XLB_STATS, XLB_CONNTRACK, XLB_BACKENDS, ...)"
    );
    if STOP.load(Ordering::Relaxed) {
        println!("\ninterrupted: tearing down");
    }
    println!("\ntearing down the namespaces");
}
