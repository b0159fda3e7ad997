//! `cargo xtask bench kubernetes`: the real `xlb agent --kubernetes` against the real
//! kube-apiserver (1.20.2, etcd, on loopback) with N Services × E endpoints.
//!
//! 1. A network namespace of its own (a veth pair, 192.0.2.1/24 and a route to the backends'
//!    10.0.0.0/8 via 192.0.2.2) that the whole bench process enters first, so etcd, the API
//!    server, the agent and the bench's own client share its loopback. No packet is sent.
//! 2. The Services (LoadBalancer, the agent's class, one requested VIP each from
//!    198.18.0.0/15) and one EndpointSlice per Service are created with bounded concurrency.
//! 3. The agent starts (release build, real pinned maps in a private bpffs directory, XDP on
//!    the veth). Initial sync = from the initial list completing (the agent's gauge
//!    `xlb_kubernetes_initial_list_completed_timestamp_seconds`, wall clock) to the bench
//!    seeing every VIP in the pinned VIP map (polled: a random sample of keys every 2 ms,
//!    then the full count). Then every VIP's active ring is checked against its expected
//!    backends — a wrong or partial state fails the bench instead of being timed.
//! 4. After the Lease holder's status writes have settled, C single-endpoint changes, one at
//!    a time: an endpoint flips between ready and draining (serving + terminating) by a JSON
//!    merge patch of its slice; each is timed from just before the API request to its
//!    backend id appearing in / leaving the VIP's active ring in the pinned map.
//! 5. The agent's peak RSS (`VmHWM`), read before any metrics scrape; the peak after one
//!    scrape (10,000 VIPs and 100,000 backends: 12.7 MB of text, streamed) is reported apart.
//!
//! Profiling: `XLB_BENCH_AGENT_BINARY` runs another build of `xlb` (say one built with
//! `--no-default-features`, without jemalloc) and `XLB_BENCH_AGENT_WRAPPER` a command in front
//! of it (`heaptrack`); see docs/agent.md ("Memory").

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use xlb_tests::agent_support::{Scratch, metric_value};
use xlb_tests::bench_kube::{self, MapsProbe, Memory, percentile, poll};
use xlb_tests::bench_support::loadavg;
use xlb_tests::kube::{KubeOptions, KubeServer, runtime};
use xlb_tests::netns::{NetNs, PinDir};

const CLASS: &str = "bench.xlb.dev/kubernetes";
const NAMESPACE: &str = "xlb-bench";
const METRICS_PORT: u16 = 9430;
const TARGET_SYNC_S: f64 = 1.0;
const TARGET_P99_MS: f64 = 50.0;
const TARGET_RSS_MB: f64 = 100.0;

struct Args {
    services: usize,
    endpoints: usize,
    changes: usize,
    concurrency: usize,
    json: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        services: 10_000,
        endpoints: 10,
        changes: 1_000,
        concurrency: 32,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |it: &mut dyn Iterator<Item = String>, name: &str| -> usize {
        it.next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} N"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--services" => args.services = num(&mut it, "--services"),
            "--endpoints" => args.endpoints = num(&mut it, "--endpoints"),
            "--changes" => args.changes = num(&mut it, "--changes"),
            "--concurrency" => args.concurrency = num(&mut it, "--concurrency"),
            "--json" => args.json = true,
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        (1..=bench_kube::MAX_SERVICES).contains(&args.services),
        "--services between 1 and {}",
        bench_kube::MAX_SERVICES
    );
    assert!(
        (1..=100).contains(&args.endpoints),
        "--endpoints between 1 and 100 (the slice schema's limit)"
    );
    assert!(args.concurrency >= 1, "--concurrency at least 1");
    args
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// Progress on stderr (stdout carries only the result).
fn say(text: &str) {
    eprintln!("bench kubernetes: {text}");
}

/// The agent process: SIGKILLed on drop, then `xlb unload` removes its datapath.
struct Agent {
    child: Option<Child>,
    xlb: PathBuf,
    pin_dir: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "the agent exited ({status}); log tail:\n{}",
                tail(&self.log_text())
            );
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(&self.xlb)
            .args(["unload", "--pin-dir"])
            .arg(&self.pin_dir)
            .env("XLB_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn xlb_binary() -> Result<PathBuf> {
    // Profiling another build (e.g. one without jemalloc, for heaptrack).
    if let Some(path) = std::env::var_os("XLB_BENCH_AGENT_BINARY") {
        return Ok(PathBuf::from(path));
    }
    // target/release/examples/bench_kubernetes → target/release/xlb
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .context("bench executable lives in target/<profile>/examples")?
        .join("xlb");
    ensure!(
        path.exists(),
        "{} missing: `cargo xtask bench kubernetes` builds it (cargo build --release -p lb-userspace)",
        path.display()
    );
    Ok(path)
}

/// Scrapes the agent's metrics on the namespace's loopback (the bench is inside it).
fn scrape() -> Option<String> {
    xlb_tests::agent_support::fetch_metrics(METRICS_PORT, Duration::from_secs(30))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

struct Results {
    create_services_s: f64,
    create_slices_s: f64,
    agent_start_to_list_s: f64,
    initial_sync_s: f64,
    agent_initial_sync_s: f64,
    creation_end_to_complete_s: f64,
    status_writes_s: f64,
    change_ms: Vec<f64>,
    api_ms: Vec<f64>,
    agent_event_to_maps_mean_ms: f64,
    memory: Memory,
    hwm_after_scrape_kib: u64,
    metrics_bytes: usize,
    verified_vips: usize,
    verified_backends: usize,
}

fn main() -> Result<()> {
    let args = parse_args();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root: the bench loads XDP, pins maps and creates a network namespace"
    );
    let xlb = xlb_binary()?;
    let load_before = loadavg();

    // The namespace first, entered before any thread exists: every thread and child process
    // started later (runtime workers, etcd, kube-apiserver, the agent) is inside it.
    let ns = NetNs::new("xbk");
    ns.ip(&[
        "link", "add", "xbk0", "type", "veth", "peer", "name", "xbk1",
    ]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "xbk0"]);
    ns.ip(&["link", "set", "xbk0", "up"]);
    ns.ip(&["link", "set", "xbk1", "up"]);
    ns.ip(&[
        "route",
        "add",
        "10.0.0.0/8",
        "via",
        "192.0.2.2",
        "dev",
        "xbk0",
    ]);
    ns.enter_current_thread();

    let table_size = (100 * args.endpoints as u32..)
        .find(|&n| is_prime(n))
        .expect("a prime");
    let max_vips = args.services as u32;
    let max_backends = (args.services * args.endpoints) as u32 + 1 + 64;
    let maglev_mib = 2.0 * f64::from(max_vips) * f64::from(table_size) * 8.0 / (1 << 20) as f64;
    say(&format!(
        "{} Services × {} endpoints; maglev_table_size {table_size} (prime ≥ 100 × {}), \
         max_vips {max_vips}, max_backends {max_backends}, conntrack_entries 65536 \
         (Maglev map {maglev_mib:.0} MiB); load average {load_before}",
        args.services, args.endpoints, args.endpoints
    ));

    say("starting etcd and kube-apiserver on the namespace's loopback");
    let server = KubeServer::start(KubeOptions::default());
    let _gated = bench_kube::GatedApiserver::replace(&server)?;
    let rt = runtime();
    let client = rt.block_on(server.client());

    // Creation.
    let services_api: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices_api: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let (create_services_s, create_slices_s) = rt.block_on(async {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns_object: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))?;
        namespaces
            .create(&PostParams::default(), &ns_object)
            .await?;
        let started = Instant::now();
        bench_kube::create_all(&services_api, args.services, args.concurrency, |i| {
            bench_kube::service(NAMESPACE, i, CLASS)
        })
        .await?;
        let services_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        bench_kube::create_all(&slices_api, args.services, args.concurrency, |i| {
            bench_kube::slice(NAMESPACE, i, args.endpoints)
        })
        .await?;
        anyhow::Ok((services_s, started.elapsed().as_secs_f64()))
    })?;
    say(&format!(
        "created {} Services in {create_services_s:.1} s and {} EndpointSlices in \
         {create_slices_s:.1} s ({} requests in flight)",
        args.services, args.services, args.concurrency
    ));
    let creation_end = Instant::now();

    // The agent.
    let pin_dir = PinDir::new("kbench");
    let scratch = Scratch::new("kbench");
    let config = scratch.path.join("xlb.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ninterfaces = [\"xbk0\"]\ntunnel_source_v4 = \"192.0.2.1\"\n\
             maglev_table_size = {table_size}\nmax_vips = {max_vips}\n\
             max_backends = {max_backends}\nconntrack_entries = 65536\n\
             metrics_listen = \"127.0.0.1:{METRICS_PORT}\"\npin_dir = \"{}\"\n",
            pin_dir.path.display()
        ),
    )?;
    let log = scratch.path.join("agent.log");
    // `XLB_BENCH_AGENT_WRAPPER="heaptrack"` (words split on spaces) runs the agent under a
    // profiler; the figures are then the profiler's, not the agent's.
    let wrapper: Vec<String> = std::env::var("XLB_BENCH_AGENT_WRAPPER")
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&xlb);
            c
        }
        None => Command::new(&xlb),
    };
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
    // agent dies with the bench even if the bench is killed before its guards run.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(scratch.path.join("state"))
        .args(["--kubernetes", "--kubeconfig"])
        .arg(&server.kubeconfig)
        .args(["--kube-class", CLASS, "--kube-identity", "bench-node"])
        .env("XLB_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting xlb agent")?;
    let agent_started = Instant::now();
    let agent_started_unix = unix_now();
    let mut agent = Agent {
        child: Some(child),
        xlb: xlb.clone(),
        pin_dir: pin_dir.path.clone(),
        log,
    };
    say(&format!("agent started (pid {})", agent.pid()));

    // Wait for the maps, then for every VIP.
    let probe = poll(
        "the agent's pinned maps",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            agent.check_running().ok()?;
            agent
                .log_text()
                .contains("agent ready")
                .then(|| MapsProbe::open(&pin_dir.path).ok())
                .flatten()
        },
    )?;
    let mut sample: Vec<usize> = (0..args.services).collect();
    sample.shuffle(&mut StdRng::seed_from_u64(7));
    sample.truncate(64);
    let wait = Duration::from_secs(600);
    poll(
        "a sample of the VIPs in the map",
        wait,
        Duration::from_millis(2),
        || {
            sample
                .iter()
                .all(|&i| probe.active_ring(i).is_some())
                .then_some(())
        },
    )?;
    poll(
        "every VIP in the map",
        wait,
        Duration::from_millis(1),
        || (probe.vip_count() == args.services).then_some(()),
    )?;
    let complete_unix = unix_now();
    let creation_end_to_complete_s = creation_end.elapsed().as_secs_f64();
    let seen_after_start = agent_started.elapsed();
    agent.check_running()?;
    say(&format!(
        "all {} VIPs in the pinned map {:.2} s after the agent started; verifying every ring",
        args.services,
        seen_after_start.as_secs_f64()
    ));
    let ids = probe.verify(args.services, args.endpoints)?;
    let verified_vips = args.services;
    let verified_backends = ids.len();

    // Status writes by the Lease holder (this agent) make a Service MODIFIED event each;
    // the change phase starts once they are done.
    let status_started = Instant::now();
    poll(
        "the status writes",
        Duration::from_secs(600),
        Duration::from_millis(200),
        || {
            let text = agent.log_text();
            let written: usize = text
                .lines()
                .filter(|l| l.contains("status written"))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("services="))
                        .and_then(|n| n.parse::<usize>().ok())
                })
                .sum();
            (written >= args.services).then_some(())
        },
    )?;
    let with_status = rt.block_on(async {
        let list = services_api.list(&ListParams::default()).await?;
        anyhow::Ok(
            list.items
                .iter()
                .filter(|s| {
                    s.status
                        .as_ref()
                        .and_then(|st| st.load_balancer.as_ref())
                        .and_then(|lb| lb.ingress.as_ref())
                        .is_some_and(|i| !i.is_empty())
                })
                .count(),
        )
    })?;
    ensure!(
        with_status == args.services,
        "{with_status} of {} Services have status.loadBalancer.ingress",
        args.services
    );
    let status_writes_s = status_started.elapsed().as_secs_f64();
    // The status writes' watch events settle (each batch finds the state unchanged).
    std::thread::sleep(Duration::from_secs(2));

    // Single-endpoint changes.
    say(&format!("{} single-endpoint changes", args.changes));
    let mut draining: BTreeMap<usize, Vec<bool>> = BTreeMap::new();
    let mut change_ms = Vec::with_capacity(args.changes);
    let mut api_ms = Vec::with_capacity(args.changes);
    for k in 0..args.changes {
        let i = (k * 7919 + 13) % args.services;
        let j = (k * 3) % args.endpoints;
        let state = draining
            .entry(i)
            .or_insert_with(|| vec![false; args.endpoints]);
        state[j] = !state[j];
        let want_in_ring = !state[j];
        let address = bench_kube::endpoint(i, j, args.endpoints);
        let id = *ids.get(&address).context("backend id")?;
        let state = state.clone();
        let started = Instant::now();
        rt.block_on(bench_kube::set_endpoints(&slices_api, i, &state))?;
        api_ms.push(started.elapsed().as_secs_f64() * 1e3);
        poll(
            &format!("change {k} ({address} of VIP {})", bench_kube::vip(i)),
            Duration::from_secs(30),
            Duration::from_micros(200),
            || (probe.in_ring(i, id) == Some(want_in_ring)).then_some(()),
        )?;
        change_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    agent.check_running()?;
    // The backend ids did not move: draining keeps a backend's entry.
    ensure!(
        probe.backend_ids()? == ids,
        "backend ids changed during the change phase"
    );

    let memory = Memory::of(agent.pid()).context("agent /proc status")?;
    let metrics = scrape().context("scraping the agent's metrics")?;
    let hwm_after_scrape_kib = Memory::of(agent.pid()).map_or(0, |m| m.hwm_kib);
    let listed_unix = metric_value(
        &metrics,
        "xlb_kubernetes_initial_list_completed_timestamp_seconds",
    )
    .filter(|v| *v > 0.0)
    .context("no initial-list timestamp in the agent's metrics")?;
    let agent_initial_sync_s =
        metric_value(&metrics, "xlb_kubernetes_initial_sync_seconds").unwrap_or(f64::NAN);
    let count = metric_value(&metrics, "xlb_kubernetes_event_to_maps_seconds_count");
    let sum = metric_value(&metrics, "xlb_kubernetes_event_to_maps_seconds_sum");
    let agent_event_to_maps_mean_ms = match (count, sum) {
        (Some(c), Some(s)) if c > 0.0 => s / c * 1e3,
        _ => f64::NAN,
    };
    ensure!(
        listed_unix >= agent_started_unix && listed_unix <= complete_unix,
        "the list completed at {listed_unix}, outside agent start {agent_started_unix} .. \
         maps complete {complete_unix}"
    );
    let results = Results {
        create_services_s,
        create_slices_s,
        agent_start_to_list_s: listed_unix - agent_started_unix,
        initial_sync_s: complete_unix - listed_unix,
        agent_initial_sync_s,
        creation_end_to_complete_s,
        status_writes_s,
        change_ms,
        api_ms,
        agent_event_to_maps_mean_ms,
        memory,
        hwm_after_scrape_kib,
        metrics_bytes: metrics.len(),
        verified_vips,
        verified_backends,
    };
    report(&args, table_size, &results, &load_before);
    drop(agent);
    drop(_gated);
    drop(server);
    Ok(())
}

fn report(args: &Args, table_size: u32, r: &Results, load_before: &str) {
    let mut sorted = r.change_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mut api = r.api_ms.clone();
    api.sort_by(f64::total_cmp);
    let (p50, p99, max) = if sorted.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN)
    } else {
        (
            percentile(&sorted, 50.0),
            percentile(&sorted, 99.0),
            sorted[sorted.len() - 1],
        )
    };
    let api_p50 = if api.is_empty() {
        f64::NAN
    } else {
        percentile(&api, 50.0)
    };
    let rss_mb = r.memory.hwm_kib as f64 / 1024.0;
    let load_after = loadavg();
    if args.json {
        let json = serde_json::json!({
            "services": args.services,
            "initial_sync_s": round(r.initial_sync_s, 3),
            "change_p50_ms": round(p50, 2),
            "change_p99_ms": round(p99, 2),
            "rss_mb": round(rss_mb, 1),
            "endpoints": args.endpoints,
            "changes": args.changes,
            "maglev_table_size": table_size,
            "create_services_s": round(r.create_services_s, 2),
            "create_slices_s": round(r.create_slices_s, 2),
            "agent_start_to_list_s": round(r.agent_start_to_list_s, 3),
            "creation_end_to_complete_s": round(r.creation_end_to_complete_s, 3),
            "rss_anon_mb": round(r.memory.anon_kib as f64 / 1024.0, 1),
            "rss_file_mb": round((r.memory.file_kib + r.memory.shmem_kib) as f64 / 1024.0, 1),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        });
        println!("{json}");
        return;
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "xlb agent --kubernetes: {} Services × {} endpoints, {} changes \
         (maglev_table_size {table_size})",
        args.services, args.endpoints, args.changes
    );
    println!(
        "verified in the pinned maps: {} VIPs, {} backends, every ring holds exactly its VIP's backends",
        r.verified_vips, r.verified_backends
    );
    println!();
    println!("{:<52} {:>12}  target", "measure", "value");
    let row = |name: &str, value: String, target: &str| {
        println!("{name:<52} {value:>12}  {target}");
    };
    row(
        "create Services (API)",
        format!("{:.1} s", r.create_services_s),
        "",
    );
    row(
        "create EndpointSlices (API)",
        format!("{:.1} s", r.create_slices_s),
        "",
    );
    row(
        "agent start → initial list complete",
        format!("{:.2} s", r.agent_start_to_list_s),
        "",
    );
    row(
        "initial list complete → all VIPs in the maps",
        format!("{:.3} s", r.initial_sync_s),
        &format!(
            "< {TARGET_SYNC_S} s: {}",
            verdict(r.initial_sync_s < TARGET_SYNC_S)
        ),
    );
    row(
        "  (agent's own figure, list → apply returned)",
        format!("{:.3} s", r.agent_initial_sync_s),
        "",
    );
    row(
        "end of creation → all VIPs in the maps",
        format!("{:.2} s", r.creation_end_to_complete_s),
        "",
    );
    row(
        "status writes (Lease holder, all Services)",
        format!("≤ {:.1} s", r.status_writes_s),
        "",
    );
    row("change → maps updated, p50", format!("{p50:.1} ms"), "");
    row(
        "change → maps updated, p99",
        format!("{p99:.1} ms"),
        &format!("< {TARGET_P99_MS} ms: {}", verdict(p99 < TARGET_P99_MS)),
    );
    row("change → maps updated, max", format!("{max:.1} ms"), "");
    row(
        "  of which the API request, p50",
        format!("{api_p50:.1} ms"),
        "",
    );
    row(
        "  agent histogram event → maps, mean",
        format!("{:.1} ms", r.agent_event_to_maps_mean_ms),
        "",
    );
    row(
        "agent peak RSS (VmHWM)",
        format!("{rss_mb:.1} MB"),
        &format!("< {TARGET_RSS_MB} MB: {}", verdict(rss_mb < TARGET_RSS_MB)),
    );
    row(
        "  RSS at the end: anonymous / file+shmem",
        format!(
            "{:.0} / {:.0} MB",
            r.memory.anon_kib as f64 / 1024.0,
            (r.memory.file_kib + r.memory.shmem_kib) as f64 / 1024.0
        ),
        "",
    );
    row(
        "  peak RSS after one metrics scrape",
        format!("{:.1} MB", r.hwm_after_scrape_kib as f64 / 1024.0),
        &format!("({:.1} MB of metrics text)", r.metrics_bytes as f64 / 1e6),
    );
    println!();
    println!("load average before {load_before}, after {load_after} (2 cores, shared machine)");
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}
