//! `cargo xtask bench l7`: wrk on loopback against `xlb proxy`, nginx and HAProxy.
//!
//! Same route to the same cheap upstream (an nginx `return 200`), one worker each, keep-alive
//! on both sides, over HTTP and over TLS 1.3. On a 2-core machine wrk and the upstream are
//! pinned to CPU 0 and the proxy under test to CPU 1 (taskset). After a warm-up, `rounds`
//! interleaved rounds of `seconds` each; per proxy and scheme the medians of requests/s, p50,
//! p99 and the proxy's CPU time per request (utime+stime of its processes from
//! /proc/PID/stat over the run) are reported.
//!
//! Idle CPUs: by default the run holds a PM QoS request for a 0 µs wake-up latency
//! (/dev/cpu_dma_latency, the interface tuned's latency-performance profile and cyclictest
//! use), so idle CPUs poll instead of halting. In these VMs a halted vCPU goes back to the
//! host (cpuidle haltpoll with `guest_halt_poll_ns=0`), and waking it can take milliseconds
//! when the host is busy: that charged the proxy that leaves its CPU idle between requests —
//! the cheaper one — with the host's scheduling, not its own. Polling idle time is still idle
//! time in /proc, so the CPU figures are unchanged. `--idle-states` measures without it.
//!
//! `--h2-upstream` adds a third scheme, `h2c-up`: plain HTTP/1.1 from wrk, and HTTP/2
//! (cleartext, prior knowledge) from the proxy to the upstream, the same nginx `return 200`
//! on a second, `http2` listener. It is selected by the Host header `bench-h2.test` on the
//! proxies' HTTP ports: xlb's `protocol = "h2"` Service, nginx's `grpc_pass` (its only
//! HTTP/2 upstream module) and HAProxy's `proto h2`, each with its connection kept.
//!
//! `--post` adds the scheme `http-post`: the HTTP route with 1 KiB POST bodies
//! (`Content-Length`, as API clients send them), through a wrk script.
//!
//! The text output also shows how busy each CPU was (from /proc/stat, steal excluded) and the
//! load side's CPU time per request (everything on CPU 0: wrk, the upstream, their softirqs).
//! When the proxy's CPU is not saturated, requests/s is set by the load side, and that column
//! shows whether a proxy makes the load side's work per request dearer.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::util::{cargo, project_root, run_checked};

const PACKAGES: [&str; 3] = ["nginx", "haproxy", "wrk"];
const UPSTREAM_PORT: u16 = 18080;
/// The upstream's HTTP/2 (h2c) listener, for `--h2-upstream`.
const UPSTREAM_H2_PORT: u16 = 18180;
/// The Host that routes to the HTTP/2 upstream.
const H2_HOST: &str = "bench-h2.test";
/// The scheme name of `--h2-upstream` rounds.
const H2_UPSTREAM_SCHEME: &str = "h2c-up";
/// The scheme name of `--post` rounds, and the wrk script they use (in the bench directory).
const POST_SCHEME: &str = "http-post";
const POST_SCRIPT: &str = "post.lua";
/// The request body of `--post` rounds.
const POST_BODY_BYTES: usize = 1024;
const WRK_CONNECTIONS: u32 = 64;
const LOAD_CPU: &str = "0";
const PROXY_CPU: &str = "1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Xlb,
    Nginx,
    Haproxy,
}

impl Proxy {
    const ALL: [Proxy; 3] = [Proxy::Xlb, Proxy::Nginx, Proxy::Haproxy];

    fn name(self) -> &'static str {
        match self {
            Proxy::Xlb => "xlb",
            Proxy::Nginx => "nginx",
            Proxy::Haproxy => "haproxy",
        }
    }

    /// (http port, https port)
    fn ports(self) -> (u16, u16) {
        match self {
            Proxy::Xlb => (18081, 18441),
            Proxy::Nginx => (18082, 18442),
            Proxy::Haproxy => (18083, 18443),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    /// Share of CPU 0 (load side) and CPU 1 (proxy) that was busy over the run, 0..=1.
    load_busy: f64,
    proxy_busy: f64,
    /// CPU 0's busy time per request, µs.
    load_us_per_req: f64,
}

/// Children killed (by their own pid) when dropped.
struct Running {
    children: Vec<(Proxy, Child)>,
    upstream: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let all = self
            .children
            .iter_mut()
            .map(|(_, c)| c)
            .chain(std::iter::once(&mut self.upstream));
        for c in all {
            // SIGTERM lets nginx's master stop its workers (SIGKILL would orphan them, still
            // listening); anything left of the tree afterwards is killed by pid.
            let tree = process_tree(c.id());
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                sleep(Duration::from_millis(50));
            }
            for pid in tree {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .arg(pid.to_string())
                        .status();
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(
    json: bool,
    seconds: u32,
    rounds: u32,
    idle_states: bool,
    h2_upstream: bool,
    post: bool,
) -> Result<()> {
    ensure!(
        seconds >= 1 && rounds >= 1,
        "--seconds and --rounds must be at least 1"
    );
    ensure_packages()?;
    // Held until the run ends: closing the file withdraws the request.
    let _no_halt = if idle_states {
        None
    } else {
        Some(hold_zero_wakeup_latency()?)
    };
    let idle_mode = if idle_states {
        "idle CPUs may halt (--idle-states)"
    } else {
        "idle CPUs poll (0 µs wake-up latency held on /dev/cpu_dma_latency)"
    };
    // The xlb binary embeds the eBPF object; build it first on a fresh checkout.
    if !crate::ebpf::target_dir()
        .join("bpfel-unknown-none/release/lb-ebpf")
        .exists()
    {
        crate::ebpf::build(true)?;
    }
    cargo(&["build", "--release", "-p", "lb-userspace"])?;
    let root = project_root();
    let xlb = root.join("target/release/xlb");
    let dir = root.join("target/bench-l7");
    fs::create_dir_all(&dir)?;
    write_certificate(&dir)?;
    write_configs(&dir)?;

    let upstream = spawn_pinned(
        LOAD_CPU,
        Command::new("nginx").args([
            "-p",
            &path_str(&dir)?,
            "-c",
            &path_str(&dir.join("upstream.conf"))?,
            "-g",
            "daemon off;",
        ]),
    )?;
    let mut running = Running {
        children: Vec::new(),
        upstream,
    };
    running.children.push((
        Proxy::Xlb,
        spawn_pinned(
            PROXY_CPU,
            Command::new(&xlb)
                .args(["proxy", "--config", &path_str(&dir.join("xlb.toml"))?])
                .env("XLB_LOG", "warn,rustls=error"),
        )?,
    ));
    running.children.push((
        Proxy::Nginx,
        spawn_pinned(
            PROXY_CPU,
            Command::new("nginx").args([
                "-p",
                &path_str(&dir)?,
                "-c",
                &path_str(&dir.join("nginx.conf"))?,
                "-g",
                "daemon off;",
            ]),
        )?,
    ));
    running.children.push((
        Proxy::Haproxy,
        spawn_pinned(
            PROXY_CPU,
            Command::new("haproxy").args(["-db", "-f", &path_str(&dir.join("haproxy.cfg"))?]),
        )?,
    ));
    for p in Proxy::ALL {
        let (h, s) = p.ports();
        wait_port(h)?;
        wait_port(s)?;
    }
    wait_port(UPSTREAM_PORT)?;
    wait_port(UPSTREAM_H2_PORT)?;

    let mut schemes = vec!["http", "https"];
    if h2_upstream {
        schemes.push(H2_UPSTREAM_SCHEME);
    }
    if post {
        schemes.push(POST_SCHEME);
    }
    let schemes = &schemes[..];
    // Warm-up: connections, pools, caches, TLS session state.
    for p in Proxy::ALL {
        for scheme in schemes {
            wrk(p, scheme, 2)?;
        }
    }
    let mut samples: Vec<(Proxy, &str, Vec<Sample>)> = Proxy::ALL
        .iter()
        .flat_map(|p| schemes.iter().map(move |s| (*p, *s, Vec::new())))
        .collect();
    for round in 0..rounds as usize {
        // Interleaved: per round, each scheme's proxies run back to back (so the same-round
        // comparison below sees the machine in one state), the schemes alternate which goes
        // first, and the proxies' order rotates so none always runs first.
        let mut order = Vec::with_capacity(samples.len());
        let mut round_schemes = schemes.to_vec();
        round_schemes.rotate_left(round % schemes.len());
        for scheme in round_schemes {
            let mut proxies = Proxy::ALL;
            proxies.rotate_left(round % Proxy::ALL.len());
            for p in proxies {
                order.extend(samples.iter().position(|(q, s, _)| *q == p && *s == scheme));
            }
        }
        for i in order {
            let (p, scheme, _) = samples[i];
            let pids = process_tree(running.pid_of(p));
            let cpu0 = cpu_ticks(&pids)?;
            let stat0 = cpu_times()?;
            let out = wrk(p, scheme, seconds)?;
            let stat1 = cpu_times()?;
            let cpu1 = cpu_ticks(&pids)?;
            let ticks_per_s = clock_ticks_per_second();
            let cpu_us = (cpu1.saturating_sub(cpu0)) as f64 * 1e6 / ticks_per_s;
            let requests = out.requests.max(1) as f64;
            let (load, proxy) = (
                stat1.cpu(LOAD_CPU)?.since(stat0.cpu(LOAD_CPU)?),
                stat1.cpu(PROXY_CPU)?.since(stat0.cpu(PROXY_CPU)?),
            );
            let sample = Sample {
                rps: out.rps,
                p50_ms: out.p50_ms,
                p99_ms: out.p99_ms,
                cpu_us_per_req: cpu_us / requests,
                load_busy: load.busy_share(),
                proxy_busy: proxy.busy_share(),
                load_us_per_req: load.busy as f64 * 1e6 / ticks_per_s / requests,
            };
            if !json {
                eprintln!(
                    "round {}/{rounds} {:7} {:5}: {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  {:.1} µs CPU/req  \
                     busy load {:.0}% proxy {:.0}%  load {:.1} µs/req",
                    round + 1,
                    p.name(),
                    scheme,
                    sample.rps,
                    sample.p50_ms,
                    sample.p99_ms,
                    sample.cpu_us_per_req,
                    sample.load_busy * 100.0,
                    sample.proxy_busy * 100.0,
                    sample.load_us_per_req,
                );
            }
            samples[i].2.push(sample);
        }
    }

    let mut table = String::new();
    if !json {
        writeln!(
            table,
            "{:8} {:6} {:>10} {:>8} {:>8} {:>12} {:>10} {:>11} {:>13}",
            "proxy",
            "scheme",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU µs/req",
            "load busy",
            "proxy busy",
            "load µs/req"
        )?;
    }
    for (p, scheme, s) in &samples {
        let m = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
        let (rps, p50, p99, cpu) = (
            m(|s| s.rps),
            m(|s| s.p50_ms),
            m(|s| s.p99_ms),
            m(|s| s.cpu_us_per_req),
        );
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "proxy": p.name(), "scheme": scheme, "rps": round2(rps), "p50_ms": round3(p50),
                    "p99_ms": round3(p99), "cpu_us_per_req": round2(cpu),
                })
            );
        } else {
            writeln!(
                table,
                "{:8} {:6} {:>10.0} {:>8.3} {:>8.3} {:>12.2} {:>9.0}% {:>10.0}% {:>13.2}",
                p.name(),
                scheme,
                rps,
                p50,
                p99,
                cpu,
                m(|s| s.load_busy) * 100.0,
                m(|s| s.proxy_busy) * 100.0,
                m(|s| s.load_us_per_req),
            )?;
        }
    }
    print!("{table}");
    if !json {
        println!("{idle_mode}");
        print!(
            "{}",
            same_round_ratios(&samples, schemes, Proxy::Xlb, Proxy::Nginx)
        );
    }
    drop(running);
    Ok(())
}

/// xlb against a peer round by round: the machine's speed drifts between rounds by more
/// than the proxies differ, and a proxy's runs in one round are seconds apart.
fn same_round_ratios(
    samples: &[(Proxy, &str, Vec<Sample>)],
    schemes: &[&str],
    a: Proxy,
    b: Proxy,
) -> String {
    let mut out = String::new();
    let of = |p: Proxy, scheme: &str| {
        samples
            .iter()
            .find(|(q, s, _)| *q == p && *s == scheme)
            .map(|(_, _, v)| v.as_slice())
            .unwrap_or_default()
    };
    for &scheme in schemes {
        let (xs, ys) = (of(a, scheme), of(b, scheme));
        let ratios = |f: fn(&Sample) -> f64| -> String {
            let r: Vec<f64> = xs.iter().zip(ys).map(|(x, y)| f(x) / f(y)).collect();
            if r.is_empty() {
                return "-".into();
            }
            let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let n = r.len();
            format!("{:.3} ({lo:.2}–{hi:.2}, n={n})", median(r))
        };
        let _ = writeln!(
            out,
            "{} / {} {scheme:6} same-round ratio, median (range): req/s {}  p99 {}  CPU/req {}",
            a.name(),
            b.name(),
            ratios(|s| s.rps),
            ratios(|s| s.p99_ms),
            ratios(|s| s.cpu_us_per_req),
        );
    }
    out
}

impl Running {
    fn pid_of(&self, p: Proxy) -> u32 {
        self.children
            .iter()
            .find(|(q, _)| *q == p)
            .map_or(0, |(_, c)| c.id())
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_owned).context("non-UTF-8 path")
}

/// Installs nginx, haproxy and wrk with apt-get if any is missing (idempotent).
fn ensure_packages() -> Result<()> {
    crate::setup::apt_install("bench l7", &PACKAGES)
}

fn write_certificate(dir: &Path) -> Result<()> {
    let (crt, key) = (dir.join("bench.crt"), dir.join("bench.key"));
    if !crt.exists() || !key.exists() {
        run_checked(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "3650",
                    "-subj",
                    "/CN=bench.test",
                    "-addext",
                    "subjectAltName=DNS:bench.test",
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&crt)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
    }
    let pem = fs::read_to_string(&crt)? + &fs::read_to_string(&key)?;
    fs::write(dir.join("bench.pem"), pem)?;
    Ok(())
}

fn write_configs(dir: &Path) -> Result<()> {
    let d = path_str(dir)?;
    let common = format!(
        "worker_processes 1;\nuser root;\npid {d}/{{name}}.pid;\nerror_log {d}/{{name}}.error.log warn;\n\
         events {{ worker_connections 4096; }}\n"
    );
    let temp = format!(
        "client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp; \
         uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;"
    );
    fs::create_dir_all(dir.join("tmp"))?;
    fs::write(
        dir.join(POST_SCRIPT),
        format!(
            "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {POST_BODY_BYTES})\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )?;
    fs::write(
        dir.join("upstream.conf"),
        common.replace("{name}", "upstream")
            + &format!(
                "http {{ access_log off; {temp} keepalive_requests 10000000; keepalive_timeout 300s;\n\
                 http2_max_concurrent_streams 1024;\n\
                 server {{ listen 127.0.0.1:{UPSTREAM_PORT} reuseport backlog=4096; \
                 location / {{ default_type text/plain; return 200 \"ok\\n\"; }} }}\n\
                 server {{ listen 127.0.0.1:{UPSTREAM_H2_PORT} http2 reuseport backlog=4096; \
                 location / {{ default_type text/plain; return 200 \"ok\\n\"; }} }} }}\n"
            ),
    )?;
    let (nh, ns) = Proxy::Nginx.ports();
    fs::write(
        dir.join("nginx.conf"),
        common.replace("{name}", "nginx")
            + &format!(
                "http {{ access_log off; {temp} keepalive_requests 10000000; keepalive_timeout 300s;\n\
                 upstream up {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 128; keepalive_requests 10000000; keepalive_timeout 300s; }}\n\
                 server {{ listen 127.0.0.1:{nh} backlog=4096; listen 127.0.0.1:{ns} ssl backlog=4096;\n\
                 ssl_certificate {d}/bench.crt; ssl_certificate_key {d}/bench.key; ssl_protocols TLSv1.3;\n\
                 location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
                 upstream up2 {{ server 127.0.0.1:{UPSTREAM_H2_PORT}; keepalive 128; keepalive_requests 10000000; keepalive_timeout 300s; }}\n\
                 server {{ listen 127.0.0.1:{nh}; server_name {H2_HOST}; location / {{ grpc_pass grpc://up2; }} }} }}\n"
            ),
    )?;
    let (hh, hs) = Proxy::Haproxy.ports();
    fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread 1\n  maxconn 8192\n  pidfile {d}/haproxy.pid\n\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n  \
             timeout http-keep-alive 300s\n  http-reuse always\n\n\
             frontend fe\n  bind 127.0.0.1:{hh}\n  bind 127.0.0.1:{hs} ssl crt {d}/bench.pem ssl-min-ver TLSv1.3\n  \
             use_backend be2 if {{ hdr(host) -i {H2_HOST} }}\n  default_backend be\n\n\
             backend be\n  server up 127.0.0.1:{UPSTREAM_PORT}\n\n\
             backend be2\n  server up2 127.0.0.1:{UPSTREAM_H2_PORT} proto h2\n"
        ),
    )?;
    let (xh, xs) = Proxy::Xlb.ports();
    fs::write(
        dir.join("xlb.toml"),
        format!(
            "access_log = false\n\n[listen]\nhttp = \"127.0.0.1:{xh}\"\nhttps = \"127.0.0.1:{xs}\"\nmetrics = \"off\"\nworkers = 1\n\n\
             [tls]\ndefault_secret = \"default/bench\"\ntls13_only = true\n\n\
             [timeouts]\nidle_ms = 300000\nrequest_header_ms = 300000\n\n\
             [[secrets]]\nname = \"bench\"\ncert_file = \"{d}/bench.crt\"\nkey_file = \"{d}/bench.key\"\n\n\
             [[services]]\nname = \"up\"\nport = 80\nendpoints = [\"127.0.0.1:{UPSTREAM_PORT}\"]\n\n\
             [[services]]\nname = \"up2\"\nport = 80\nendpoints = [\"127.0.0.1:{UPSTREAM_H2_PORT}\"]\nprotocol = \"h2\"\n\n\
             [[ingresses]]\nname = \"bench\"\n[[ingresses.rules]]\n[[ingresses.rules.paths]]\npath = \"/\"\n\
             path_type = \"Prefix\"\nbackend = {{ service = \"up\", port = 80 }}\n\
             [[ingresses.rules]]\nhost = \"{H2_HOST}\"\n[[ingresses.rules.paths]]\npath = \"/\"\n\
             path_type = \"Prefix\"\nbackend = {{ service = \"up2\", port = 80 }}\n"
        ),
    )?;
    Ok(())
}

fn spawn_pinned(cpu: &str, cmd: &mut Command) -> Result<Child> {
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = cmd
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    let mut pinned = Command::new("taskset");
    pinned
        .arg("-c")
        .arg(cpu)
        .arg(&program)
        .args(&args)
        .stdout(Stdio::null());
    for (k, v) in envs {
        match v {
            Some(v) => pinned.env(k, v),
            None => pinned.env_remove(k),
        };
    }
    // taskset execs the program, so the child's pid is the program's.
    pinned
        .spawn()
        .with_context(|| format!("starting {program:?}"))
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on 127.0.0.1:{port} after 20 s")
}

struct WrkOut {
    rps: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
}

fn wrk(p: Proxy, scheme: &str, seconds: u32) -> Result<WrkOut> {
    let (url, host) = match scheme {
        "https" => (format!("https://127.0.0.1:{}/", p.ports().1), "bench.test"),
        H2_UPSTREAM_SCHEME => (format!("http://127.0.0.1:{}/", p.ports().0), H2_HOST),
        _ => (format!("http://127.0.0.1:{}/", p.ports().0), "bench.test"),
    };
    let script = project_root().join("target/bench-l7").join(POST_SCRIPT);
    let script_args = if scheme == POST_SCHEME {
        vec!["-s".to_owned(), path_str(&script)?]
    } else {
        Vec::new()
    };
    let out = Command::new("taskset")
        .args([
            "-c",
            LOAD_CPU,
            "wrk",
            "-t1",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .args(&script_args)
        .args(["-H", &format!("Host: {host}"), &url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk against {} failed: {text}{}",
            p.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors against {} {scheme}:\n{text}", p.name());
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<WrkOut> {
    let mut out = WrkOut {
        rps: f64::NAN,
        requests: 0,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
    };
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            out.rps = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            out.p50_ms = duration_ms(v.trim())?;
        } else if let Some(v) = line.strip_prefix("99%") {
            out.p99_ms = duration_ms(v.trim())?;
        } else if line.contains(" requests in ") {
            out.requests = line
                .split_whitespace()
                .next()
                .context("request count")?
                .parse()?;
        }
    }
    ensure!(
        out.rps.is_finite() && out.p50_ms.is_finite() && out.p99_ms.is_finite() && out.requests > 0
    );
    Ok(out)
}

/// wrk prints durations as `812.00us`, `1.23ms`, `2.00s`.
fn duration_ms(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("duration {v:?}")
    };
    Ok(num.parse::<f64>()? * scale)
}

/// The pid and its descendants (nginx master + worker).
fn process_tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        if let Ok(children) = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) {
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    pids
}

/// utime + stime of the processes, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the parenthesised command name (which may contain spaces).
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("stat format")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); utime and stime are fields 14 and 15.
        let utime: u64 = f.get(11).context("utime")?.parse()?;
        let stime: u64 = f.get(12).context("stime")?.parse()?;
        total += utime + stime;
    }
    Ok(total)
}

/// Asks the kernel for a 0 µs CPU wake-up latency (idle CPUs poll) while the file is open.
fn hold_zero_wakeup_latency() -> Result<fs::File> {
    use std::io::Write as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .context("opening /dev/cpu_dma_latency (run as root, or pass --idle-states)")?;
    f.write_all(&0i32.to_ne_bytes())
        .context("writing the latency request to /dev/cpu_dma_latency")?;
    Ok(f)
}

/// One CPU's time from /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuTime {
    /// user + nice + system + irq + softirq
    busy: u64,
    /// idle + iowait
    idle: u64,
}

impl CpuTime {
    fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            busy: self.busy.saturating_sub(earlier.busy),
            idle: self.idle.saturating_sub(earlier.idle),
        }
    }

    /// Busy share of the time the CPU was ours (steal, taken by the hypervisor, is left out).
    fn busy_share(self) -> f64 {
        self.busy as f64 / (self.busy + self.idle).max(1) as f64
    }
}

/// The per-CPU lines of /proc/stat.
struct CpuTimes(String);

impl CpuTimes {
    fn cpu(&self, cpu: &str) -> Result<CpuTime> {
        let prefix = format!("cpu{cpu} ");
        let line = self
            .0
            .lines()
            .find(|l| l.starts_with(&prefix))
            .with_context(|| format!("no cpu{cpu} line in /proc/stat"))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().context("/proc/stat field"))
            .collect::<Result<_>>()?;
        ensure!(f.len() >= 7, "short /proc/stat line {line:?}");
        // user nice system idle iowait irq softirq [steal guest guest_nice]
        Ok(CpuTime {
            busy: f[0] + f[1] + f[2] + f[5] + f[6],
            idle: f[3] + f[4],
        })
    }
}

fn cpu_times() -> Result<CpuTimes> {
    Ok(CpuTimes(
        fs::read_to_string("/proc/stat").context("reading /proc/stat")?,
    ))
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
