//! `cargo xtask demo`: xlb on network namespaces with the embedded default config.
//!
//! Builds the topology the embedded config describes — a client with 50 addresses, one LB
//! node, three backends — and runs the real binaries: `xlb decap` and a small TCP/UDP server
//! on every backend, `xlb agent` (embedded default config) on the LB node. It sends a bounded
//! burst of real TCP connections and UDP requests, prints how they spread over the backends,
//! the `xlb vips` and `xlb stats` output and a `bpftool map dump`, then tears everything down
//! — also on Ctrl-C.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xlb_tests::agent_support::xlb;
use xlb_tests::scenario::AgentBed;
use xlb_tests::testbed::*;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const CONNECTIONS: usize = 1000;
const UDP_REQUESTS: u16 = 150;
const TIME_LIMIT: Duration = Duration::from_secs(60);

fn show(title: &str, out: std::process::Output) {
    println!("\n$ {title}");
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        println!("  {line}");
    }
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    println!("xlb demo: the topology of the embedded default config, in network namespaces");
    println!(
        "  client 192.0.2.100-149 -> LB node 192.0.2.1 (XDP on eth0) -> backends 198.51.100.6/.10/.14"
    );
    println!(
        "  VIPs 203.0.113.10:80/tcp, 203.0.113.10:53/udp, [2001:db8:f::10]:80/tcp on every backend's loopback"
    );
    let started = Instant::now();
    let mut ab = AgentBed::new("demo", 3);
    let pin = ab.pins.path.to_str().expect("utf-8").to_owned();
    // No --config: the agent runs its embedded default config.
    ab.start_agent_with(&["--pin-dir", &pin]);
    println!(
        "  xlb agent ready in LB namespace {} after {:.1} s (pins: {pin})",
        ab.bed.lb.name,
        started.elapsed().as_secs_f64()
    );

    let traffic_start = Instant::now();
    let vip = SocketAddr::new(IpAddr::V4(VIP4), 80);
    let srcs = ab.bed.client_addrs.clone();
    let (by_backend, failed) = in_ns(&ab.bed.client, move || {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0usize;
        for src in srcs.iter().cycle().take(CONNECTIONS) {
            if STOP.load(Ordering::Relaxed) || traffic_start.elapsed() > TIME_LIMIT {
                break;
            }
            match tcp_request_here(IpAddr::V4(*src), 0, vip) {
                Ok(who) => *seen.entry(who).or_default() += 1,
                Err(_) => failed += 1,
            }
        }
        (seen, failed)
    });
    let mut udp_by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for port in 30000..30000 + UDP_REQUESTS {
        if STOP.load(Ordering::Relaxed) || traffic_start.elapsed() > TIME_LIMIT {
            break;
        }
        let src = SocketAddr::new(
            IpAddr::V4(ab.bed.client_addrs[port as usize % ab.bed.client_addrs.len()]),
            port,
        );
        if let Ok(who) = udp_request(&ab.bed.client, src, SocketAddr::new(IpAddr::V4(VIP4), 53)) {
            *udp_by_backend.entry(who).or_default() += 1;
        }
    }
    let elapsed = traffic_start.elapsed();

    let total: usize = by_backend.values().sum();
    println!(
        "\n{total} TCP connections to {vip} in {:.1} s ({failed} failed), each from its own client address and port:",
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

    show(
        &format!("xlb vips --pin-dir {pin}"),
        xlb(&["vips", "--pin-dir", &pin]),
    );
    show(
        &format!("xlb stats --pin-dir {pin}"),
        xlb(&["stats", "--pin-dir", &pin]),
    );
    // Every map carries BTF, so bpftool prints the shared structs field by field. Maps are
    // not per network namespace, so this runs on the host.
    let vips_pin = format!("{pin}/XLB_VIPS");
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned", &vips_pin])
        .output()
        .expect("bpftool");
    println!("\n$ bpftool map dump pinned {vips_pin}   (first entry)");
    for line in String::from_utf8_lossy(&dump.stdout).lines().take(16) {
        println!("  {line}");
    }
    println!(
        "\nwhile an agent runs, every map reads that way: XLB_STATS, XLB_CONNTRACK, XLB_BACKENDS, ..."
    );
    if STOP.load(Ordering::Relaxed) {
        println!("\ninterrupted");
    }
    println!(
        "tearing down: agent, decapsulators, namespaces and pins ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    show(
        &format!("xlb unload --pin-dir {pin}"),
        xlb(&["unload", "--pin-dir", &pin]),
    );
    drop(ab);
}
