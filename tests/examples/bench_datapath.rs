//! `cargo xtask bench datapath`: per-packet cost of the balancer under BPF_PROG_TEST_RUN.
//!
//! The repeat trap: with `repeat > 1` the kernel runs the program again on its own output,
//! so an encapsulating program stops taking the measured path after the first iteration.
//! Here every run is one packet (`repeat = 1`), fresh from userspace; the kernel-reported
//! durations are averaged over `--runs` runs, and the median of `--rounds` rounds is
//! reported. A trivial `return XDP_PASS` program is measured the same way, interleaved in the
//! same rounds, as the floor; each run also checks the verdict so a class that fell off its
//! path would be reported, not timed.
//!
//! A table-only row, `kernel_lru_insert`, times `bench_lru_insert` from the `xlb_bench`
//! object: a program that only inserts a never-seen IPv4 flow into a twin of the connection
//! table (same types, flags and size). It is the part of `tcp4_new` no program can avoid
//! while its connection table is a kernel LRU map and every SYN is inserted.

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{PROTO_TCP, PROTO_UDP, program_names};
use xlb_tests::fixture::{FixtureEnv, LB0_MAC};
use xlb_tests::packets::{TcpFlags, tcp, udp, v4, v6};

struct Args {
    runs: u32,
    rounds: u32,
    json: bool,
    /// Measure only these classes (comma-separated; the floor always), e.g. while profiling.
    only: Option<String>,
    /// Connection-table size.
    conntrack_entries: u32,
    /// A profiling build of lb-ebpf (`--features profile`): its programs run in the same
    /// rounds on the same maps, as `e:NAME` (established TCP), `s:NAME` (the same SYN),
    /// `n:NAME` (a new SYN every run), `u:NAME` (UDP) and `6:NAME` (established TCP v6).
    variants: Option<std::path::PathBuf>,
    /// Percent of the slowest runs left out of each round's mean (0: plain mean). On a
    /// shared machine interrupts and preemption add microsecond spikes to single runs;
    /// trimming them makes A/B comparisons of a few nanoseconds possible.
    trim: f64,
}

fn parse_args() -> Args {
    let mut args = Args {
        runs: 1_000_000,
        rounds: 5,
        json: false,
        only: None,
        conntrack_entries: 1 << 20,
        variants: None,
        trim: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => args.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--rounds" => args.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--json" => args.json = true,
            "--only" => args.only = it.next(),
            "--conntrack-entries" => {
                args.conntrack_entries = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--conntrack-entries N")
            }
            "--variants" => args.variants = it.next().map(Into::into),
            "--trim" => args.trim = it.next().and_then(|v| v.parse().ok()).expect("--trim PCT"),
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

struct Class {
    name: String,
    program: String,
    /// From the `--variants` object rather than the embedded one.
    variant: bool,
    /// From [`BENCH_OBJECT`] rather than the embedded one.
    bench_object: bool,
    /// Packets cycled through (one per run).
    packets: Vec<Vec<u8>>,
    verdict: u32,
    /// Every run carries a flow never seen before (source address and port rewritten).
    fresh_flows: bool,
    /// New-connection rate limit per CPU while this class runs (0 = guard off).
    rate_limit: u32,
    /// Shown in the table only (not part of the JSON classes).
    table_only: bool,
}

/// The benchmark-only programs (`lb-ebpf/src/bin/xlb_bench.rs`), built by `build-ebpf`.
const BENCH_OBJECT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/ebpf/bpfel-unknown-none/release/xlb_bench"
);

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn main() {
    let args = parse_args();
    let mut load = FixtureEnv::small();
    // Room for every distinct new flow of a round, so the new-flow class measures inserts
    // into a table that is not thrashing (the LRU still recycles between rounds).
    load.conntrack_entries = args.conntrack_entries;
    let variant_opts = load.clone();
    FixtureEnv::run(load, move |env| {
        let client4 = v4("192.0.2.100");
        let client6 = v6("2001:db8:c::100");
        let vip4 = v4("192.0.2.10");
        let vip6 = v6("2001:db8:1::10");
        for id in 1..=3 {
            env.add_backend(id, v4(&format!("198.51.100.{}", 10 + id)));
            env.add_backend(10 + id, v6(&format!("2001:db8:b::{}", 20 + id)));
        }
        env.add_vip(vip4, 80, PROTO_TCP, 0, &[1, 2, 3]);
        env.add_vip(vip4, 53, PROTO_UDP, 0, &[1, 2, 3]);
        env.add_vip(vip6, 80, PROTO_TCP, 0, &[11, 12, 13]);
        // The benchmark measures inserts, so the new-connection rate guard is off.
        env.set_config(|cfg| cfg.new_conn_rate_limit = 0);

        // A SYN template; `measure` gives every run its own source address and port.
        let syn = tcp(LB0_MAC, client4, 1024, vip4, 80, TcpFlags::SYN, 0);
        let est4 = tcp(LB0_MAC, client4, 40000, vip4, 80, TcpFlags::ACK, 64);
        let udp4 = udp(LB0_MAC, client4, 5000, vip4, 53, 64);
        let est6 = tcp(LB0_MAC, client6, 40000, vip6, 80, TcpFlags::ACK, 64);
        let other = tcp(
            LB0_MAC,
            client4,
            40000,
            v4("192.0.2.200"),
            80,
            TcpFlags::ACK,
            64,
        );
        // Establish the flows the hit classes use.
        for p in [&est4, &udp4, &est6] {
            let out = env.run_packet(program_names::BALANCER, p, env.lb0);
            assert_eq!(out.verdict, XDP_TX, "warm-up forward");
        }

        let class = |name: &str, program: &str, packets: Vec<Vec<u8>>, verdict| Class {
            name: name.to_owned(),
            program: program.to_owned(),
            variant: false,
            bench_object: false,
            packets,
            verdict,
            fresh_flows: false,
            rate_limit: 0,
            table_only: false,
        };
        let classes = vec![
            class("floor", program_names::PASS, vec![other.clone()], XDP_PASS),
            // Every SYN inserted: the guard is off.
            Class {
                fresh_flows: true,
                ..class(
                    "tcp4_new",
                    program_names::BALANCER,
                    vec![syn.clone()],
                    XDP_TX,
                )
            },
            // As Katran was measured: its 125k/s-per-CPU insert guard skips most inserts of a
            // tight loop. Shown for comparison only.
            Class {
                fresh_flows: true,
                rate_limit: 125_000,
                table_only: true,
                ..class(
                    "tcp4_new_guarded",
                    program_names::BALANCER,
                    vec![syn.clone()],
                    XDP_TX,
                )
            },
            // Katran's way of timing a new flow: the same SYN every run, so each insert
            // replaces the flow's own entry (a hot bucket and a just-freed node) instead of
            // evicting a cold one. Shown for comparison only.
            Class {
                table_only: true,
                ..class(
                    "tcp4_new_same_flow",
                    program_names::BALANCER,
                    vec![syn.clone()],
                    XDP_TX,
                )
            },
            class(
                "tcp4_established",
                program_names::BALANCER,
                vec![est4.clone()],
                XDP_TX,
            ),
            class("udp4", program_names::BALANCER, vec![udp4.clone()], XDP_TX),
            class("tcp6", program_names::BALANCER, vec![est6.clone()], XDP_TX),
            class(
                "pass",
                program_names::BALANCER,
                vec![other.clone()],
                XDP_PASS,
            ),
            // The kernel's LRU insert of a never-seen flow, alone (the program makes its keys).
            Class {
                bench_object: true,
                table_only: true,
                ..class(
                    "kernel_lru_insert",
                    "bench_lru_insert",
                    vec![other],
                    XDP_PASS,
                )
            },
        ];
        let mut bench_ebpf = aya::EbpfLoader::new()
            .map_max_entries("BENCH_LRU4", args.conntrack_entries)
            .load_file(BENCH_OBJECT)
            .expect("load xlb_bench (cargo xtask build-ebpf builds it)");
        {
            let prog: &mut aya::programs::Xdp = bench_ebpf
                .program_mut("bench_lru_insert")
                .expect("bench_lru_insert")
                .try_into()
                .expect("an XDP program");
            prog.load().expect("load bench_lru_insert");
        }
        // Profiling variants: loaded on the same pinned maps, so they see the same VIPs,
        // backends and flows.
        let mut variants = args.variants.as_ref().map(|path| {
            let mut opts = variant_opts.clone();
            opts.pin_dir = env.pins.path.clone();
            let object = std::fs::read(path).expect("read the variants object");
            lb_userspace::datapath::loader(&opts)
                .load(&object)
                .expect("load the variants object")
        });
        let mut classes = classes;
        if let Some(ebpf) = variants.as_mut() {
            let names: Vec<String> = ebpf
                .programs()
                .map(|(n, _)| n.to_owned())
                // `xlb_balancer` too: another build's balancer (e.g. the base of a change)
                // runs against this one in the same rounds.
                .filter(|n| n.starts_with("xlb_"))
                .filter(|n| n.as_str() != program_names::DECAP && n.as_str() != program_names::PASS)
                .collect();
            for name in names {
                let prog: &mut aya::programs::Xdp = ebpf
                    .program_mut(&name)
                    .expect("variant")
                    .try_into()
                    .expect("an XDP program");
                prog.load().expect("load variant");
                for (tag, packet, fresh) in [
                    ("e", &est4, false),
                    ("s", &syn, false),
                    ("n", &syn, true),
                    ("u", &udp4, false),
                    ("6", &est6, false),
                ] {
                    classes.push(Class {
                        variant: true,
                        fresh_flows: fresh,
                        table_only: true,
                        ..class(
                            &format!("{tag}:{name}"),
                            &name,
                            vec![packet.clone()],
                            XDP_TX,
                        )
                    });
                }
            }
        }

        // With `--only`, classes run (and print) in the order given.
        let rank = |c: &Class| {
            args.only
                .as_deref()
                .and_then(|o| o.split(',').position(|o| o == c.name))
                .unwrap_or(0)
        };
        classes.sort_by_key(|c| if c.name == "floor" { 0 } else { 1 + rank(c) });
        let classes: Vec<Class> = classes
            .into_iter()
            .filter(|c| {
                c.name == "floor"
                    || args
                        .only
                        .as_deref()
                        .is_none_or(|o| o.split(',').any(|o| o == c.name))
                        && (!c.variant || args.only.is_some())
            })
            .collect();
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); classes.len()];
        let mut next_flow = 0u64;
        for round in 0..args.rounds {
            // Interleave classes within every round so drift hits all of them alike.
            for (i, class) in classes.iter().enumerate() {
                env.set_config(|cfg| cfg.new_conn_rate_limit = class.rate_limit);
                let prog = if class.variant {
                    variants
                        .as_ref()
                        .and_then(|e| e.program(&class.program))
                        .expect("variant program")
                        .try_into()
                        .expect("an XDP program")
                } else if class.bench_object {
                    bench_ebpf
                        .program(&class.program)
                        .expect("bench program")
                        .try_into()
                        .expect("an XDP program")
                } else {
                    let name = if class.program == program_names::PASS {
                        program_names::PASS
                    } else {
                        program_names::BALANCER
                    };
                    env.dp.program(name).expect("program")
                };
                let ns = measure(env, prog, class, args.runs, args.trim, &mut next_flow);
                results[i].push(ns);
                if !args.json {
                    eprintln!(
                        "round {}/{}: {:<17} {:>7.1} ns",
                        round + 1,
                        args.rounds,
                        class.name,
                        ns
                    );
                }
            }
        }
        let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
        let floor = medians[0];
        let targets = [
            ("tcp4_new", 5.5, 6.1),
            ("tcp4_established", 2.8, 3.07),
            ("udp4", 3.3, 3.67),
        ];
        if !args.json {
            println!(
                "xlb datapath, BPF_PROG_TEST_RUN, one packet per run, {} runs x {} rounds (median)",
                args.runs, args.rounds
            );
            println!(
                "{:<18} {:>9} {:>9} {:>8} {:>8} {:>12}",
                "class", "ns/pkt", "net ns", "ratio", "target", "Katran ratio"
            );
        }
        for (class, ns) in classes.iter().zip(&medians).skip(1) {
            let ratio = ns / floor;
            if args.json && class.table_only {
                continue;
            }
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"class": class.name, "ns_per_pkt": round1(*ns), "floor_ns": round1(floor), "ratio": (ratio * 100.0).round() / 100.0})
                );
            } else {
                let (target, katran) = targets
                    .iter()
                    .find(|t| t.0 == class.name)
                    .map(|t| (format!("<= {:.1}", t.1), format!("{:.2}", t.2)))
                    .unwrap_or(("-".into(), "-".into()));
                println!(
                    "{:<18} {:>9.1} {:>9.1} {:>8.2} {:>8} {:>12}",
                    class.name,
                    ns,
                    ns - floor,
                    ratio,
                    target,
                    katran
                );
            }
        }
        if !args.json {
            println!(
                "floor (return XDP_PASS): {floor:.1} ns; Katran measured here the same way: 203 / 242 / 402 ns against a 66 ns floor"
            );
            let median_of = |name: &str| {
                classes
                    .iter()
                    .position(|c| c.name == name)
                    .map(|i| medians[i])
            };
            if let (Some(new), Some(insert)) =
                (median_of("tcp4_new"), median_of("kernel_lru_insert"))
            {
                let insert_net = insert - floor;
                println!(
                    "the kernel's LRU insert alone: {insert_net:.1} ns net = {:.2}x the floor; \
                     tcp4_new without it: {:.1} ns = {:.2}x",
                    insert_net / floor,
                    new - insert_net,
                    (new - insert_net) / floor
                );
            }
        }
    });
}

/// Rewrites the template's IPv4 source and TCP source port to flow number `n` (unique over
/// 256 × 64,512 = 16.5M flows) and fixes both checksums.
fn make_fresh(packet: &mut [u8], n: u64) {
    let src = [203, 0, 113, (n % 256) as u8];
    let sport = 1024 + ((n / 256) % 64_512) as u16;
    packet[26..30].copy_from_slice(&src);
    packet[34..36].copy_from_slice(&sport.to_be_bytes());
    packet[24..26].copy_from_slice(&[0, 0]);
    let ip_sum = xlb_tests::packets::internet_checksum(&packet[14..34]);
    packet[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp_len = packet.len() - 34;
    let mut pseudo = Vec::with_capacity(12 + tcp_len);
    pseudo.extend_from_slice(&packet[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    packet[50..52].copy_from_slice(&[0, 0]);
    pseudo.extend_from_slice(&packet[34..]);
    let tcp_sum = xlb_tests::packets::internet_checksum(&pseudo);
    packet[50..52].copy_from_slice(&tcp_sum.to_be_bytes());
}

fn measure(
    env: &FixtureEnv,
    prog: &aya::programs::Xdp,
    class: &Class,
    runs: u32,
    trim: f64,
    next_flow: &mut u64,
) -> f64 {
    let mut ctx = [0u8; 24];
    ctx[12..16].copy_from_slice(&env.lb0.to_ne_bytes());
    let mut out = vec![0u8; 2048];
    let mut durations: Vec<u32> = Vec::with_capacity(runs as usize);
    let mut fresh = class.packets[0].clone();
    // One untimed run first: it inserts the flow of a hit class into a variant's own maps.
    for n in 0..=runs as usize {
        let packet = if class.fresh_flows {
            make_fresh(&mut fresh, *next_flow);
            *next_flow += 1;
            &fresh
        } else {
            &class.packets[n % class.packets.len()]
        };
        ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..Default::default()
            })
            .expect("test run");
        assert_eq!(
            res.return_value, class.verdict,
            "{} left its path",
            class.name
        );
        if n > 0 {
            durations.push(res.duration.as_nanos().min(u32::MAX as u128) as u32);
        }
    }
    if trim > 0.0 {
        durations.sort_unstable();
        let keep = ((durations.len() as f64) * (1.0 - trim / 100.0)).ceil() as usize;
        durations.truncate(keep.max(1));
    }
    durations.iter().map(|&d| d as u64).sum::<u64>() as f64 / durations.len() as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
