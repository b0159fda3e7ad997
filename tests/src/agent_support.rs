//! Helpers for the `agent_*` tests: the real `xlb` binary run inside a test's network
//! namespace, a two-namespace topology, bounded polling.
//!
//! The binary is entered into the namespace with `nsenter --net` rather than
//! `ip netns exec`: the latter remounts /sys, which hides the bpffs at /sys/fs/bpf.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::netns::{NetNs, PinDir, unique_name};

/// Path of the `xlb` binary next to this test executable, built once per test process
/// (`cargo test -p xlb-tests` does not build other packages' binaries by itself).
pub fn xlb_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> → target/<profile>/xlb
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("test executable lives in target/<profile>/deps");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-userspace/Cargo.toml");
            let mut build = Command::new(cargo);
            build
                .args(["build", "--bin", "xlb", "--manifest-path"])
                .arg(&manifest);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build");
            assert!(status.success(), "building the xlb binary failed");
            let path = profile_dir.join("xlb");
            assert!(path.exists(), "{} missing after the build", path.display());
            path
        })
        .clone()
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `xlb ARGS` (the CLI; it reads pins, so no namespace is needed).
pub fn xlb(args: &[&str]) -> Output {
    Command::new(xlb_binary())
        .args(args)
        .env("XLB_LOG", "warn")
        .output()
        .expect("run xlb")
}

/// Runs `xlb ARGS`, panicking with stderr unless it succeeds; returns stdout.
pub fn xlb_ok(args: &[&str]) -> String {
    let out = xlb(args);
    assert!(
        out.status.success(),
        "xlb {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `xlb ARGS -o json --pin-dir DIR` and parses the output.
pub fn xlb_json(args: &[&str], pin_dir: &Path) -> serde_json::Value {
    let mut full: Vec<&str> = args.to_vec();
    let pin = pin_dir.to_str().expect("utf-8 pin dir");
    full.extend(["-o", "json", "--pin-dir", pin]);
    serde_json::from_str(&xlb_ok(&full)).expect("CLI JSON parses")
}

/// An `xlb` process inside a namespace; SIGKILLed on drop if still running.
pub struct XlbProcess {
    child: Option<Child>,
    /// Its stderr (logs), written to a file so the test can read it while it runs.
    pub log: PathBuf,
}

impl XlbProcess {
    /// Starts `xlb ARGS` inside `ns`.
    pub fn spawn(ns: &NetNs, args: &[&str], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg(xlb_binary())
            .args(args)
            .env("XLB_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn xlb via nsenter");
        Self {
            child: Some(child),
            log,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "xlb exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} in the xlb log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill on the pid of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "xlb did not exit within 10 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for XlbProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Two namespaces joined by a veth pair: the balancer node (`lb`, interface `lb_if`,
/// 192.0.2.1/24) and a client (`client`, 192.0.2.2/24).
pub struct Topology {
    pub lb: NetNs,
    pub client: NetNs,
    pub lb_if: String,
    pub client_if: String,
}

impl Topology {
    pub fn new(tag: &str) -> Self {
        let lb = NetNs::new(&format!("xa{tag}"));
        let client = NetNs::new(&format!("xc{tag}"));
        let lb_if = unique_name("xl");
        let client_if = unique_name("xk");
        lb.ip(&[
            "link",
            "add",
            &lb_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &client.name,
        ]);
        lb.ip(&["addr", "add", "192.0.2.1/24", "dev", &lb_if]);
        lb.ip(&["link", "set", &lb_if, "up"]);
        client.ip(&["addr", "add", "192.0.2.2/24", "dev", &client_if]);
        client.ip(&["link", "set", &client_if, "up"]);
        Self {
            lb,
            client,
            lb_if,
            client_if,
        }
    }

    /// Sends `count` UDP datagrams from the client to the balancer node's address
    /// (port 9, discard). Whether they are answered does not matter: the balancer sees
    /// them (and the ARP exchange before them) on its interface.
    pub fn send_to_lb(&self, count: u32) {
        let name = self.client.name.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{name}")).expect("netns file");
            // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let socket = std::net::UdpSocket::bind("192.0.2.2:0").expect("bind in client ns");
            for _ in 0..count {
                let _ = socket.send_to(b"xlb-test", "192.0.2.1:9");
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .join()
        .expect("sender thread");
    }

    /// The XDP program attached to `iface` in `ns` (its name), if any.
    pub fn xdp_program(ns: &NetNs, iface: &str) -> Option<String> {
        let text = ns.ip(&["-d", "link", "show", "dev", iface]);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("prog/xdp"))?;
        let name = line
            .split_whitespace()
            .skip_while(|w| *w != "name")
            .nth(1)?;
        Some(name.to_owned())
    }
}

/// One TCP VIP, 203.0.113.10:80, over two backends: the agent tests' base config.
pub const WEB_VIP_TOML: &str = r#"
[[vips]]
name = "web"
address = "203.0.113.10"
port = 80
[[vips.backends]]
address = "198.51.100.11"
[[vips.backends]]
address = "198.51.100.12"
"#;

/// A config for the agent tests: small maps, one interface, the given VIP section.
pub fn agent_config(iface: &str, pin_dir: &PinDir, vips_toml: &str) -> String {
    format!(
        r#"[node]
interfaces = ["{iface}"]
tunnel_source_v4 = "192.0.2.1"
maglev_table_size = 251
max_vips = 8
max_backends = 32
conntrack_entries = 1024
pin_dir = "{}"

{vips_toml}
"#,
        pin_dir.path.display()
    )
}

/// Writes `text` to `path` atomically (temporary file and rename), as editors and
/// config-management tools do.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// A scratch directory for configs, logs and state files, removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(&format!("xlb-{tag}-")));
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Fetches `http://127.0.0.1:PORT/metrics` from inside `ns` (bounded by timeouts): the
/// body, `None` if it did not come whole with status 200.
pub fn scrape_metrics(ns: &NetNs, port: u16) -> Option<String> {
    get_in(ns, port, "/metrics").and_then(|(status, body)| (status == 200).then_some(body))
}

/// `GET PATH` on `127.0.0.1:PORT` from inside `ns` (bounded by timeouts): status and body.
pub fn get_in(ns: &NetNs, port: u16, path: &str) -> Option<(u16, String)> {
    let name = ns.name.clone();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{name}")).ok()?;
        // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        if rc != 0 {
            return None;
        }
        get(port, &path, Duration::from_secs(5))
    })
    .join()
    .ok()
    .flatten()
}

/// `GET /metrics` on `127.0.0.1:PORT` of the calling thread's namespace: the body (chunked
/// transfer coding decoded), `None` on a failure, another status or a body cut short.
pub fn fetch_metrics(port: u16, read_timeout: Duration) -> Option<String> {
    get(port, "/metrics", read_timeout).and_then(|(status, body)| (status == 200).then_some(body))
}

/// `GET PATH` on `127.0.0.1:PORT` of the calling thread's namespace, one request per
/// connection: status and body ([`http_body`]).
pub fn get(port: u16, path: &str, read_timeout: Duration) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(read_timeout)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let status = std::str::from_utf8(raw.get(9..12)?).ok()?.parse().ok()?;
    Some((status, http_body(&raw)?))
}

/// The body of a raw HTTP/1.1 response read to its end (`Connection: close`): chunked
/// transfer coding decoded; `None` if malformed or if a chunked body lacks its last chunk.
pub fn http_body(raw: &[u8]) -> Option<String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split])
        .ok()?
        .to_ascii_lowercase();
    let mut rest = &raw[split + 4..];
    if !head.contains("\r\ntransfer-encoding: chunked") {
        return String::from_utf8(rest.to_vec()).ok();
    }
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return String::from_utf8(body).ok();
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

/// The value of a metric line `name{labels} value` (exact series text before the value).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
