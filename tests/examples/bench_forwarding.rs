//! `cargo xtask bench forwarding`: packets per second through one LB-node namespace and the
//! LB node's CPU time per packet, for three cases interleaved in every round:
//!
//! * `xlb` — the real balancer (`xlb_balancer`, native XDP on the LB's eth0, Maglev over
//!   three backends, IP-in-IP toward the backend, XDP_REDIRECT to `b<i>`);
//! * `iptables` — the LB node's kernel forwards with a kube-proxy-style `iptables -t nat`
//!   DNAT chain (statistic mode over the three backends); eth0 runs `bench_pass` so the
//!   generator's native XDP_TX frames are delivered;
//! * `ceiling` — `bench_fanout` on eth0: MAC rewrite + `bpf_redirect` to one of the same three
//!   backends (`b1`–`b3`, by UDP source port), nothing else. Delivering to three devices costs
//!   per-device transmit flushes and wake-ups that a one-device redirect does not pay (about
//!   18 ns per packet here) and that any load balancer in this topology pays, so the ceiling
//!   does the same fan-out; the xlb-over-ceiling ratio is then the balancer's own work.
//! * `redirect1` (table only) — `bench_redirect`: the same to `b1` alone, for comparison.
//!
//! The generator is `bench_gen` run in the client namespace with `BPF_PROG_RUN` +
//! `BPF_F_TEST_XDP_LIVE_FRAMES` in one long call per run (pinned to CPU 0): 64-byte UDP
//! frames to 203.0.113.10:53 over `--flows` source ports, XDP_TX out of `c0` into the LB's
//! eth0 ring. Backends run `bench_sink` (count, XDP_DROP), so pps is what reached the
//! backends. The LB's eth0 uses threaded NAPI with its thread pinned to CPU 1; the
//! backends' NAPI threads go to CPU 0, so the LB thread's CPU time
//! (`/proc/PID/schedstat`) is the LB node's work alone: ns/pkt = that time / packets
//! delivered. The generator is shown not to be the limit by the offered rate next to the
//! delivered one, and by where the excess went: `c0`'s `tx_queue_0_xdp_xmit_errors`
//! (frames refused because the LB's receive ring was full) and the LB thread's CPU share.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use xlb_tests::bench_support::{
    cpu_times, enter_ns_path, ethtool_stats, in_ns_scoped, loadavg, mac_of, median, napi_threads,
    new_napi_threads, pin_to_cpu, set_fifo, set_threaded, task_runtime_ns, udp4_frame,
};
use xlb_tests::netns::{PinDir, sh};
use xlb_tests::testbed::{Testbed, TestbedOptions, VIP4, small_load_options, start_balancer};

const OBJECT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/ebpf/bpfel-unknown-none/release/xlb_bench"
);
const GEN_CPU: usize = 0;
const LB_CPU: usize = 1;
const WARMUP: Duration = Duration::from_secs(1);
const VIP_PORT: u16 = 53;
const FRAME_LEN: usize = 60;

struct Args {
    seconds: u32,
    rounds: u32,
    json: bool,
    flows: u32,
    verbose: bool,
    /// SCHED_FIFO for the NAPI threads (the LB's and the backends').
    rt: bool,
    /// Frames per live-frames batch (kernel maximum 256). The LB is woken once per batch,
    /// and its veth ring holds 256 frames: smaller batches wake it before the ring fills.
    batch: u32,
    /// Another build of lb-ebpf (e.g. the base of a change): its `xlb_balancer` runs as
    /// the table-only case `xlb-alt`, on the same maps, in the same interleaved rounds.
    xlb_object: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        seconds: 5,
        rounds: 5,
        json: false,
        flows: 4096,
        verbose: false,
        rt: true,
        batch: 256,
        xlb_object: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> u32 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} N"))
        };
        match arg.as_str() {
            "--seconds" => a.seconds = num("--seconds").clamp(1, 120),
            "--rounds" => a.rounds = num("--rounds").clamp(1, 50),
            "--flows" => a.flows = num("--flows").clamp(1, 60_000),
            "--json" => a.json = true,
            "--verbose" => a.verbose = true,
            "--no-rt" => a.rt = false,
            "--batch" => a.batch = num("--batch").clamp(1, 256),
            "--xlb-object" => a.xlb_object = it.next().map(Into::into),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

#[repr(C)]
#[derive(Clone, Copy)]
struct GenConfig {
    flows: u32,
    base_port: u32,
    /// Ethernet + IPv4 + UDP headers (42 bytes, zero-padded).
    hdr: [u8; 44],
}
// SAFETY: plain repr(C) data without padding (4 + 4 + 44), same layout as the eBPF side.
unsafe impl aya::Pod for GenConfig {}

#[repr(C)]
#[derive(Clone, Copy)]
struct RedirectConfig {
    ifindex: u32,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
}
// SAFETY: as above (4 + 6 + 6 = 16 bytes, no padding).
unsafe impl aya::Pod for RedirectConfig {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Xlb,
    Iptables,
    Ceiling,
    /// The single-device redirect (`bench_redirect`), shown for comparison.
    Redirect1,
    /// `--xlb-object`'s balancer (table only).
    XlbAlt,
}

impl Case {
    const ALL: [Case; 4] = [Case::Xlb, Case::Iptables, Case::Ceiling, Case::Redirect1];
    fn name(self) -> &'static str {
        match self {
            Case::Xlb => "xlb",
            Case::Iptables => "iptables",
            Case::Ceiling => "ceiling",
            Case::Redirect1 => "redirect1",
            Case::XlbAlt => "xlb-alt",
        }
    }

    /// The bench program on the LB's eth0, for the cases that are not xlb.
    fn program(self) -> &'static str {
        match self {
            Case::Iptables => "bench_pass",
            Case::Ceiling => "bench_fanout",
            Case::Xlb | Case::Redirect1 | Case::XlbAlt => "bench_redirect",
        }
    }
}

/// One measured run.
#[derive(Clone, Debug)]
struct Run {
    pps: f64,
    ns_per_pkt: f64,
    offered_pps: f64,
    /// Frames the LB's eth0 ring accepted from c0, per second.
    accepted_pps: f64,
    /// Frames refused by the LB's full receive ring, per second.
    ring_full_pps: f64,
    /// Share of the window the LB NAPI thread ran.
    napi_busy: f64,
    /// CPU 1's busy share (the NAPI thread plus whatever else ran there).
    cpu1_busy: f64,
    gen_cpu_busy: f64,
    counters: BTreeMap<String, i64>,
}

struct Bench {
    bed: Testbed,
    pins: PinDir,
    ebpf: Ebpf,
    sink_count: PerCpuArray<MapData, u64>,
    gen_count: PerCpuArray<MapData, u64>,
    c0_ifindex: u32,
    frame: Vec<u8>,
    baseline_napi: BTreeMap<i32, String>,
    backend_napi: BTreeSet<i32>,
    lb_napi: i32,
    seconds: u32,
    verbose: bool,
    rt: bool,
    batch: u32,
    xlb_object: Option<Vec<u8>>,
}

static STOP_SIGNALLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigusr1(_: libc::c_int) {
    STOP_SIGNALLED.fetch_add(1, Ordering::Relaxed);
}

fn install_stop_handler() {
    // SAFETY: installs an async-signal-safe handler; no SA_RESTART, so the long BPF_PROG_RUN
    // returns EINTR when the harness signals the generator thread.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

fn sum_percpu(map: &PerCpuArray<MapData, u64>) -> u64 {
    map.get(&0, 0)
        .map(|v| v.iter().sum())
        .expect("read a per-CPU counter")
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut Xdp {
    ebpf.program_mut(name)
        .unwrap_or_else(|| panic!("{name} missing from {OBJECT}"))
        .try_into()
        .expect("an XDP program")
}

/// Stops the generator thread when dropped (also on panic): signals it until it returns.
/// Whoever drops it sets the generator's stop flag first (or the hard deadline ends it).
struct GenStopper {
    tid: libc::pthread_t,
    done: &'static AtomicBool,
}

impl Drop for GenStopper {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.done.load(Ordering::Acquire) && Instant::now() < deadline {
            // SAFETY: the thread is alive until `done` is set (it is joined by the scope).
            unsafe { libc::pthread_kill(self.tid, libc::SIGUSR1) };
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Clone)]
struct Snapshot {
    at: Instant,
    sink: u64,
    gen_frames: u64,
    napi_ns: u64,
    cpus: Vec<(u64, u64)>,
    counters: BTreeMap<String, u64>,
    /// When the (slow, subprocess) interface counters were read: their own time base.
    counters_at: Instant,
}

impl Bench {
    fn setup(args: &Args) -> Self {
        xlb_tests::require_root();
        ensure_iptables();
        assert!(
            std::path::Path::new(OBJECT).exists(),
            "{OBJECT} missing: run `cargo xtask build-ebpf`"
        );
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(ncpu >= 2, "needs two CPUs (generator on 0, LB NAPI on 1)");
        let baseline_napi = napi_threads();
        let bed = Testbed::new(&TestbedOptions {
            backends: 3,
            client_addresses: 1,
        });
        let pins = PinDir::new("benchfwd");
        let mut ebpf = Ebpf::load_file(OBJECT).expect("load xlb_bench");
        for p in [
            "bench_gen",
            "bench_sink",
            "bench_redirect",
            "bench_fanout",
            "bench_pass",
        ] {
            xdp(&mut ebpf, p).load().expect("verifier accepts it");
        }
        let sink_count =
            PerCpuArray::try_from(ebpf.take_map("BENCH_SINK_COUNT").expect("map")).unwrap();
        let gen_count =
            PerCpuArray::try_from(ebpf.take_map("BENCH_GEN_COUNT").expect("map")).unwrap();
        let frame = udp4_frame(
            mac_of(&bed.lb, "eth0"),
            mac_of(&bed.client, "c0"),
            bed.client_addrs[0],
            VIP4,
            10_000,
            VIP_PORT,
            FRAME_LEN,
        );
        let mut hdr = [0u8; 44];
        hdr[..42].copy_from_slice(&frame[..42]);
        let mut gen_cfg: Array<MapData, GenConfig> =
            Array::try_from(ebpf.take_map("BENCH_GEN_CONFIG").expect("map")).unwrap();
        gen_cfg
            .set(
                0,
                &GenConfig {
                    flows: args.flows,
                    base_port: 10_000,
                    hdr,
                },
                0,
            )
            .unwrap();
        let mut redir_cfg: Array<MapData, RedirectConfig> =
            Array::try_from(ebpf.take_map("BENCH_REDIRECT_CONFIG").expect("map")).unwrap();
        redir_cfg
            .set(
                0,
                &RedirectConfig {
                    ifindex: bed.lb.ifindex("b1"),
                    dst_mac: mac_of(&bed.backends[0].ns, "eth0"),
                    src_mac: mac_of(&bed.lb, "b1"),
                },
                0,
            )
            .unwrap();
        // The fan-out ceiling: backend i gets source ports ≡ i (mod 3), like xlb's three.
        let mut fanout_cfg: Array<MapData, RedirectConfig> =
            Array::try_from(ebpf.take_map("BENCH_FANOUT_CONFIG").expect("map")).unwrap();
        for (i, b) in bed.backends.iter().enumerate() {
            let link = format!("b{}", i + 1);
            fanout_cfg
                .set(
                    i as u32,
                    &RedirectConfig {
                        ifindex: bed.lb.ifindex(&link),
                        dst_mac: mac_of(&b.ns, "eth0"),
                        src_mac: mac_of(&bed.lb, &link),
                    },
                    0,
                )
                .unwrap();
        }

        // Backends: sink on eth0 (this also gives each a NAPI), threaded, pinned to CPU 0.
        let before = napi_threads();
        for b in &bed.backends {
            let prog = xdp(&mut ebpf, "bench_sink");
            in_ns_scoped(&b.ns, || prog.attach(c"eth0", XdpMode::Driver)).expect("attach sink");
            set_threaded(&b.ns, "eth0");
        }
        let backend_napi: BTreeSet<i32> = new_napi_threads(&before, &BTreeSet::new())
            .into_iter()
            .collect();
        assert_eq!(
            backend_napi.len(),
            bed.backends.len(),
            "one NAPI thread per backend expected"
        );
        for &pid in &backend_napi {
            pin_to_cpu(pid, GEN_CPU);
            if args.rt {
                // The backends stand for other machines: never starved by the generator.
                set_fifo(pid, 2);
            }
        }
        // LB eth0: GRO keeps its NAPI alive across program swaps; threaded.
        bed.lb.exec(&["ethtool", "-K", "eth0", "gro", "on"]);
        set_threaded(&bed.lb, "eth0");
        install_iptables(&bed);
        bed.wait_for_neighbours();

        let c0_ifindex = bed.client.ifindex("c0");
        install_stop_handler();
        let mut bench = Self {
            bed,
            pins,
            ebpf,
            sink_count,
            gen_count,
            c0_ifindex,
            frame,
            baseline_napi,
            backend_napi,
            lb_napi: 0,
            seconds: args.seconds,
            verbose: args.verbose,
            rt: args.rt,
            batch: args.batch,
            xlb_object: args
                .xlb_object
                .as_ref()
                .map(|p| std::fs::read(p).expect("read --xlb-object")),
        };
        bench.refresh_lb_napi();
        drop((gen_cfg, redir_cfg));
        bench
    }

    /// Finds the LB eth0's NAPI thread (the one that is neither old nor a backend's) and pins
    /// it to its CPU. Called before every run in case a program swap recreated it.
    fn refresh_lb_napi(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = new_napi_threads(&self.baseline_napi, &self.backend_napi);
            if found.len() == 1 {
                self.lb_napi = found[0];
                pin_to_cpu(self.lb_napi, LB_CPU);
                if self.rt {
                    // "Its own CPU" on a machine shared with builds.
                    set_fifo(self.lb_napi, 1);
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cannot tell the LB's NAPI thread: candidates {found:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn snapshot(&self) -> Snapshot {
        let at = Instant::now();
        let sink = sum_percpu(&self.sink_count);
        let gen_frames = sum_percpu(&self.gen_count);
        let napi_ns = task_runtime_ns(self.lb_napi).expect("LB NAPI thread alive");
        let cpus = cpu_times();
        let mut counters = BTreeMap::new();
        let eth_start = Instant::now();
        for (ns, ifaces, tag) in [
            (&self.bed.client, vec!["c0"], "client"),
            (&self.bed.lb, vec!["eth0", "b1", "b2", "b3"], "lb"),
        ] {
            for iface in ifaces {
                for (k, v) in ethtool_stats(ns, iface) {
                    counters.insert(format!("{tag}:{iface}:{k}"), v);
                }
            }
        }
        let counters_at = eth_start + (Instant::now() - eth_start) / 2;
        Snapshot {
            at,
            sink,
            gen_frames,
            napi_ns,
            cpus,
            counters,
            counters_at,
        }
    }

    /// Attaches the case's LB program, runs the generator for warm-up + `seconds`, measures
    /// the window in between, then detaches.
    fn run_case(&mut self, case: Case) -> Run {
        let lb = &self.bed.lb;
        // Keep the balancer (and its links) alive for the run; dropping it detaches.
        let mut held_dp = None;
        let mut held_alt = None;
        let mut link = None;
        match case {
            Case::Xlb => held_dp = Some(start_balancer(&self.bed, &self.pins, &[1, 1, 1])),
            Case::XlbAlt => {
                // Configure the pinned maps as for xlb, detach its balancer (dropping it),
                // then attach the other build's balancer on those maps.
                drop(start_balancer(&self.bed, &self.pins, &[1, 1, 1]));
                let opts = small_load_options(&self.pins);
                let object = self.xlb_object.as_deref().expect("--xlb-object");
                let mut alt = lb_userspace::datapath::loader(&opts)
                    .load(object)
                    .expect("load --xlb-object");
                let prog: &mut Xdp = alt
                    .program_mut(lb_common::program_names::BALANCER)
                    .expect("xlb_balancer in --xlb-object")
                    .try_into()
                    .expect("an XDP program");
                prog.load().expect("verifier accepts --xlb-object");
                in_ns_scoped(lb, || prog.attach(c"eth0", XdpMode::Driver))
                    .expect("attach --xlb-object on LB eth0");
                held_alt = Some(alt);
            }
            Case::Iptables | Case::Ceiling | Case::Redirect1 => {
                let prog = xdp(&mut self.ebpf, case.program());
                link = Some(
                    in_ns_scoped(lb, || prog.attach(c"eth0", XdpMode::Driver))
                        .expect("attach on LB eth0"),
                );
            }
        }
        self.refresh_lb_napi();
        let run = self.generate_and_measure();
        if let Some(id) = link {
            let prog = xdp(&mut self.ebpf, case.program());
            in_ns_scoped(&self.bed.lb, || prog.detach(id)).expect("detach");
        }
        drop(held_dp);
        drop(held_alt);
        run
    }

    fn generate_and_measure(&mut self) -> Run {
        static DONE: AtomicBool = AtomicBool::new(false);
        static STOP: AtomicBool = AtomicBool::new(false);
        DONE.store(false, Ordering::Release);
        STOP.store(false, Ordering::Release);
        let hard_deadline =
            WARMUP + Duration::from_secs(u64::from(self.seconds)) * 2 + Duration::from_secs(30);
        let window = Duration::from_secs(u64::from(self.seconds));
        // Hard bound even if every stop signal were missed: at most ~20 Mpps × the run.
        let repeat = (20_000_000u64 * (window + WARMUP).as_secs().max(1) * 3)
            .min(u64::from(u32::MAX)) as u32;
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(self.frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.c0_ifindex.to_ne_bytes());
        let ns_path = format!("/run/netns/{}", self.bed.client.name);
        let frame = self.frame.clone();
        let this = &*self;
        let rt = self.rt;
        let batch = self.batch;
        let prog: &Xdp = this
            .ebpf
            .program("bench_gen")
            .expect("bench_gen")
            .try_into()
            .expect("an XDP program");
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let generator = s.spawn(move || {
                enter_ns_path(&ns_path);
                pin_to_cpu(0, GEN_CPU);
                // Below the backends' FIFO threads (it yields to them between batches),
                // ahead of everything else on its CPU (CPU shares between cgroups would
                // otherwise give it a fraction of the CPU on a busy machine).
                set_fifo(0, if rt { 1 } else { 0 });
                // SAFETY: pthread_self has no preconditions.
                tx.send(unsafe { libc::pthread_self() }).unwrap();
                let t = Instant::now();
                // One long call; re-issued only if it ends before the harness stops it
                // (a stray signal, or `repeat` exhausted), never past the hard deadline.
                let mut calls = 0u32;
                let r = loop {
                    calls += 1;
                    let r = prog.test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&ctx),
                        repeat,
                        attrs: TestRunAttrs::new().xdp_live_frames(batch),
                        ..Default::default()
                    });
                    if STOP.load(Ordering::Acquire) || t.elapsed() > hard_deadline {
                        break r;
                    }
                };
                DONE.store(true, Ordering::Release);
                (r, calls, t.elapsed())
            });
            let tid = rx.recv_timeout(Duration::from_secs(5)).expect("generator");
            let stopper = GenStopper { tid, done: &DONE };
            std::thread::sleep(WARMUP);
            assert!(
                !DONE.load(Ordering::Acquire),
                "generator ended early: {:?}",
                generator.join()
            );
            let a = this.snapshot();
            std::thread::sleep(window);
            let b = this.snapshot();
            assert!(
                !DONE.load(Ordering::Acquire),
                "generator ended early: {:?}",
                generator.join()
            );
            STOP.store(true, Ordering::Release);
            drop(stopper);
            let (result, calls, took) = generator.join().expect("generator thread");
            if this.verbose {
                eprintln!(
                    "generator: {calls} call(s), last {result:?}, {took:?}; SIGUSR1 handled {} times so far",
                    STOP_SIGNALLED.load(Ordering::Relaxed)
                );
            }
            match result {
                Ok(_) => {}
                Err(e) => {
                    let interrupted = format!("{e:?}").contains("Interrupted")
                        || std::error::Error::source(&e)
                            .map(|s| s.to_string().contains("nterrupted"))
                            .unwrap_or(false);
                    if !interrupted && this.verbose {
                        eprintln!("generator ended with {e:?}");
                    }
                }
            }
            this.measure(&a, &b)
        })
    }

    fn measure(&self, a: &Snapshot, b: &Snapshot) -> Run {
        let dt = b.at.duration_since(a.at).as_secs_f64();
        let dt_counters = b.counters_at.duration_since(a.counters_at).as_secs_f64();
        let delivered = (b.sink - a.sink) as f64;
        let napi = (b.napi_ns - a.napi_ns) as f64;
        let d = |k: &str| -> i64 {
            b.counters.get(k).copied().unwrap_or(0) as i64
                - a.counters.get(k).copied().unwrap_or(0) as i64
        };
        let busy = |cpu: usize| -> f64 {
            let (b1, t1) = b.cpus.get(cpu).copied().unwrap_or((0, 1));
            let (b0, t0) = a.cpus.get(cpu).copied().unwrap_or((0, 0));
            (b1 - b0) as f64 / (t1 - t0).max(1) as f64
        };
        let counters: BTreeMap<String, i64> = b
            .counters
            .keys()
            .map(|k| (k.clone(), d(k)))
            .filter(|(_, v)| *v != 0)
            .collect();
        Run {
            pps: delivered / dt,
            ns_per_pkt: if delivered > 0.0 {
                napi / delivered
            } else {
                f64::NAN
            },
            offered_pps: (b.gen_frames - a.gen_frames) as f64 / dt,
            accepted_pps: d("client:c0:tx_queue_0_xdp_xmit") as f64 / dt_counters,
            ring_full_pps: d("client:c0:tx_queue_0_xdp_xmit_errors") as f64 / dt_counters,
            napi_busy: napi / (dt * 1e9),
            cpu1_busy: busy(LB_CPU),
            gen_cpu_busy: busy(GEN_CPU),
            counters,
        }
    }
}

fn ensure_iptables() {
    let have = std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("iptables missing: installing it with apt-get");
        sh(&[
            "timeout", "300", "apt-get", "install", "-y", "-q", "iptables",
        ]);
    }
}

/// kube-proxy's iptables mode for one ClusterIP-style service with three endpoints: a
/// service chain that picks an endpoint chain with `statistic --mode random`, each endpoint
/// chain a DNAT. (No masquerade: the backends' replies would go back through the LB anyway.)
fn install_iptables(bed: &Testbed) {
    let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-XLBBENCH - [0:0]\n");
    let n = bed.backends.len();
    for b in &bed.backends {
        rules += &format!(":KUBE-SEP-XLB{} - [0:0]\n", b.index);
    }
    rules += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    rules += &format!(
        "-A KUBE-SERVICES -d {VIP4}/32 -p udp -m udp --dport {VIP_PORT} -j KUBE-SVC-XLBBENCH\n"
    );
    for (i, b) in bed.backends.iter().enumerate() {
        let left = n - i;
        if left > 1 {
            rules += &format!(
                "-A KUBE-SVC-XLBBENCH -m statistic --mode random --probability {:.11} -j KUBE-SEP-XLB{}\n",
                1.0 / left as f64,
                b.index
            );
        } else {
            rules += &format!("-A KUBE-SVC-XLBBENCH -j KUBE-SEP-XLB{}\n", b.index);
        }
        rules += &format!(
            "-A KUBE-SEP-XLB{} -p udp -m udp -j DNAT --to-destination {}:{VIP_PORT}\n",
            b.index, b.addr
        );
    }
    rules += "COMMIT\n";
    let path = std::env::temp_dir().join(format!("xlb-bench-iptables-{}", std::process::id()));
    std::fs::write(&path, rules).expect("write rules");
    let res = std::panic::catch_unwind(|| {
        bed.lb
            .exec(&["iptables-restore", "--noflush", path.to_str().unwrap()])
    });
    let _ = std::fs::remove_file(&path);
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
}

fn fmt_mpps(pps: f64) -> String {
    format!("{:.2}", pps / 1e6)
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let mut bench = Bench::setup(&args);
    if args.rt {
        // The harness only sleeps, reads counters and stops the generator: keep it ahead of
        // the FIFO NAPI threads so it reads on time.
        set_fifo(0, 3);
    }
    let ld_start = loadavg();
    let mut runs: BTreeMap<&'static str, Vec<Run>> = BTreeMap::new();
    let mut cases = Case::ALL.to_vec();
    if args.xlb_object.is_some() {
        cases.push(Case::XlbAlt);
    }
    for round in 0..args.rounds {
        // Rotate the order so no case always runs first after a swap.
        for k in 0..cases.len() {
            let case = cases[(k + round as usize) % cases.len()];
            let r = bench.run_case(case);
            if args.verbose {
                eprintln!(
                    "round {round} {:<8} delivered {} Mpps, {:.0} ns/pkt, offered {} Mpps, \
                     ring accepted {} Mpps, ring full {} Mpps, LB NAPI busy {:.0} %, CPU1 {:.0} %, CPU0 {:.0} %",
                    case.name(),
                    fmt_mpps(r.pps),
                    r.ns_per_pkt,
                    fmt_mpps(r.offered_pps),
                    fmt_mpps(r.accepted_pps),
                    fmt_mpps(r.ring_full_pps),
                    r.napi_busy * 100.0,
                    r.cpu1_busy * 100.0,
                    r.gen_cpu_busy * 100.0,
                );
                for (k, v) in &r.counters {
                    eprintln!("    {k} {v:+}");
                }
            }
            if r.pps < 0.01 * r.accepted_pps {
                eprintln!(
                    "warning: round {round} {}: the LB took {} Mpps but the backends got {} Mpps; \
                     counters: {:?}",
                    case.name(),
                    fmt_mpps(r.accepted_pps),
                    fmt_mpps(r.pps),
                    r.counters
                );
            }
            runs.entry(case.name()).or_default().push(r);
        }
    }
    let ld_end = loadavg();
    let med = |case: Case, f: fn(&Run) -> f64| median(runs[case.name()].iter().map(f).collect());
    let pps = |c| med(c, |r| r.pps);
    let ns = |c| med(c, |r| r.ns_per_pkt);

    if args.json {
        for case in [Case::Xlb, Case::Iptables, Case::Ceiling] {
            println!(
                "{}",
                serde_json::json!({
                    "case": case.name(),
                    "pps": pps(case).round() as u64,
                    "ns_per_pkt": (ns(case) * 10.0).round() / 10.0,
                })
            );
        }
    } else {
        println!(
            "forwarding through one LB node: {FRAME_LEN}-byte UDP, {} flows, {} rounds × {} s (median), \
             LB NAPI threaded on CPU {LB_CPU}, generator on CPU {GEN_CPU}",
            args.flows, args.rounds, args.seconds
        );
        println!(
            "{:<9} {:>10} {:>9} | {:>11} {:>11} {:>11} {:>8} {:>6}",
            "case", "Mpps", "ns/pkt", "offered", "LB ring in", "ring full", "LB busy", "CPU1"
        );
        for &case in &cases {
            println!(
                "{:<9} {:>10} {:>9.0} | {:>11} {:>11} {:>11} {:>7.0}% {:>5.0}%",
                case.name(),
                fmt_mpps(pps(case)),
                ns(case),
                fmt_mpps(med(case, |r| r.offered_pps)),
                fmt_mpps(med(case, |r| r.accepted_pps)),
                fmt_mpps(med(case, |r| r.ring_full_pps)),
                med(case, |r| r.napi_busy) * 100.0,
                med(case, |r| r.cpu1_busy) * 100.0,
            );
        }
        println!(
            "(offered / LB ring in / ring full in Mpps; LB busy = the LB NAPI thread's share of the window)"
        );
    }
    let check = |ok: bool| if ok { "ok" } else { "MISSED" };
    let r_ipt = pps(Case::Xlb) / pps(Case::Iptables);
    let r_ceil = pps(Case::Xlb) / pps(Case::Ceiling);
    let r_cpu = ns(Case::Xlb) / ns(Case::Ceiling);
    let r_cpu1 = ns(Case::Xlb) / ns(Case::Redirect1);
    let summary = [
        format!(
            "xlb / iptables pps   {r_ipt:>6.2}×   (target ≥ 3×)     {}",
            check(r_ipt >= 3.0)
        ),
        format!(
            "xlb / ceiling pps    {:>6.1} %   (target ≥ 70 %)   {}",
            r_ceil * 100.0,
            check(r_ceil >= 0.7)
        ),
        format!(
            "xlb / ceiling ns/pkt {r_cpu:>6.2}×   (target ≤ 1.5×)   {}",
            check(r_cpu <= 1.5)
        ),
        format!(
            "xlb / redirect1 ns/pkt {r_cpu1:.2}× (against a redirect to one backend only; \
             the ceiling's fan-out to three costs {:+.0} ns/pkt)",
            ns(Case::Ceiling) - ns(Case::Redirect1)
        ),
        format!(
            "iptables ns/pkt / xlb ns/pkt {:.1}×",
            ns(Case::Iptables) / ns(Case::Xlb)
        ),
    ];
    // Generator evidence: every case saw frames refused at a full LB ring while the LB's NAPI
    // thread was busy, i.e. the LB side, not the generator, set the rate.
    let mut evidence = Vec::new();
    for case in Case::ALL {
        let rs = &runs[case.name()];
        let min_excess = rs
            .iter()
            .map(|r| r.ring_full_pps / r.offered_pps.max(1.0))
            .fold(f64::INFINITY, f64::min);
        let min_busy = rs.iter().map(|r| r.napi_busy).fold(f64::INFINITY, f64::min);
        // Refused frames alone could be bursts from a generator that is slower on average;
        // together with a LB thread that had no idle time left, the LB set the rate.
        let verdict = if min_excess > 0.05 && min_busy > 0.85 {
            "LB-bound: the generator was not the limit"
        } else if min_excess > 0.05 {
            "LB ring overflowed in bursts while its thread still idled (wake-up bound): pps \
             understates the LB's capacity; ns/pkt still holds"
        } else {
            "NOT shown LB-bound: the generator may be the limit"
        };
        evidence.push(format!(
            "{:<8} offered ≥ {:.2}× delivered; ≥ {:.0} % of offered frames refused at the LB's full eth0 ring (c0 tx_queue_0_xdp_xmit_errors); LB NAPI busy ≥ {:.0} % → {verdict}",
            case.name(),
            rs.iter()
                .map(|r| r.offered_pps / r.pps.max(1.0))
                .fold(f64::INFINITY, f64::min),
            min_excess * 100.0,
            min_busy * 100.0,
        ));
    }
    let footer = format!(
        "load average at start {ld_start}, at end {ld_end}; total {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let out: Vec<String> = summary
        .into_iter()
        .chain(evidence)
        .chain([footer])
        .collect();
    for l in out {
        if args.json {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    }
}
