//! Active health checks (a Service's `active_health`): each endpoint is asked `GET path`
//! (in HTTP/2 for `h2` Services), or with `grpc_service` the gRPC health checking protocol's
//! `grpc.health.v1.Health/Check`, on a fresh connection, one check at a time per endpoint, `interval_ms` after the previous one
//! ended. The verdict is a flag on the endpoint that `Upstream::pick` reads; passive ejection
//! works alongside.
//!
//! One task (on worker 0) runs every check. It reads the current configuration on each tick,
//! so reloads that add, change or remove checks need no bookkeeping, and endpoints that a
//! reload keeps keep their verdict (the endpoint objects carry over).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};

use super::config::{ActiveHealth, UpstreamProtocol};
use super::h2_upstream;
use super::upstream::{Endpoint, Upstream};
use super::upstream_tls::UpstreamIo;

/// How often due checks are looked for; intervals are rounded up to it.
const TICK: Duration = Duration::from_millis(50);
/// Checks in flight at once, over all upstreams (a check holds a socket).
const MAX_CONCURRENT: usize = 256;
/// Bytes read looking for the status line.
const MAX_STATUS_LINE: usize = 1024;

/// An endpoint's run of results. Only the checker task touches it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Streak {
    passes: u32,
    failures: u32,
    /// A result has been recorded.
    checked: bool,
}

impl Streak {
    /// Records one result for an endpoint that is currently `down`; returns the new state
    /// when it changes. An endpoint's first check decides at once (a dead endpoint is not
    /// given `unhealthy_threshold` intervals of traffic after a start or reload); later
    /// ones need the thresholds.
    pub(crate) fn record(&mut self, passed: bool, down: bool, cfg: &ActiveHealth) -> Option<bool> {
        let first = !self.checked;
        self.checked = true;
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            (down && self.passes >= cfg.healthy_threshold).then_some(false)
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            (!down && (first || self.failures >= cfg.unhealthy_threshold)).then_some(true)
        }
    }
}

struct Tracked {
    endpoint: Weak<Endpoint>,
    /// The upstream the endpoint was last seen in (its settings and metric handles).
    upstream: Arc<Upstream>,
    streak: Streak,
    running: bool,
    /// When the next check may start (None: now).
    due: Option<Instant>,
}

/// Runs checks for the upstreams `current()` returns (those whose `active_health` is on),
/// until the task is aborted.
pub(crate) async fn run(current: impl Fn() -> Vec<Arc<Upstream>>) {
    // Keyed by the endpoint's address in memory: the Weak held here keeps that allocation
    // from being reused while the entry exists.
    let mut tracked: HashMap<usize, Tracked> = HashMap::new();
    let mut checks: JoinSet<(usize, Result<u16, String>)> = JoinSet::new();
    // Which endpoint a task checks, so a task that failed (it cannot, but if it did) still
    // frees its endpoint for the next check instead of leaving it "running" for ever.
    let mut keys: HashMap<tokio::task::Id, usize> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => start_due(&current(), &mut tracked, &mut checks, &mut keys),
            Some(joined) = checks.join_next_with_id() => {
                let (key, result) = match joined {
                    Ok((id, done)) => {
                        keys.remove(&id);
                        done
                    }
                    Err(e) => match keys.remove(&e.id()) {
                        Some(key) => (key, Err(format!("check task failed: {e}"))),
                        None => continue,
                    },
                };
                finish(&mut tracked, key, result);
            }
        }
    }
}

fn start_due(
    upstreams: &[Arc<Upstream>],
    tracked: &mut HashMap<usize, Tracked>,
    checks: &mut JoinSet<(usize, Result<u16, String>)>,
    keys: &mut HashMap<tokio::task::Id, usize>,
) {
    let now = Instant::now();
    let mut seen = std::collections::HashSet::new();
    for up in upstreams {
        let cfg = up.active_health();
        if !cfg.enabled() {
            continue;
        }
        for ep in up.endpoints() {
            let key = Arc::as_ptr(ep) as usize;
            seen.insert(key);
            let t = tracked.entry(key).or_insert_with(|| Tracked {
                endpoint: Arc::downgrade(ep),
                upstream: up.clone(),
                streak: Streak::default(),
                running: false,
                due: None,
            });
            t.upstream = up.clone();
            if t.running || t.due.is_some_and(|d| d > now) || checks.len() >= MAX_CONCURRENT {
                continue;
            }
            t.running = true;
            let host = cfg.host.clone().unwrap_or_else(|| ep.addr.to_string());
            let (addr, timeout) = (ep.addr, Duration::from_millis(cfg.timeout_ms));
            let up = up.clone();
            let scheme = if up.tls().is_some() { "https" } else { "http" };
            let task = match (&cfg.grpc_service, up.protocol()) {
                (Some(service), _) => {
                    let req = grpc_health_request(scheme, &host, service);
                    checks.spawn(async move {
                        let connect = UpstreamIo::connect(addr, timeout, up.tls());
                        (key, check_h2(connect, req, true, timeout).await)
                    })
                }
                (None, UpstreamProtocol::Http1) => {
                    let path = cfg.path.as_deref().unwrap_or("/");
                    let request = format!(
                        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-health-check\r\n\
                         Accept: */*\r\nConnection: close\r\n\r\n"
                    );
                    checks.spawn(async move {
                        let connect = UpstreamIo::connect(addr, timeout, up.tls());
                        (key, check(connect, request.as_bytes(), timeout).await)
                    })
                }
                (None, UpstreamProtocol::H2) => {
                    let path = cfg.path.as_deref().unwrap_or("/");
                    let req = http::Request::get(format!("{scheme}://{host}{path}"))
                        .header(http::header::USER_AGENT, "xlb-health-check")
                        .body(Full::new(Bytes::new()));
                    checks.spawn(async move {
                        let connect = UpstreamIo::connect(addr, timeout, up.tls());
                        (key, check_h2(connect, req, false, timeout).await)
                    })
                }
            };
            keys.insert(task.id(), key);
        }
    }
    // Endpoints no longer checked (removed, or their Service's checks switched off).
    tracked.retain(|k, t| seen.contains(k) || t.running);
}

fn finish(tracked: &mut HashMap<usize, Tracked>, key: usize, result: Result<u16, String>) {
    let Some(t) = tracked.get_mut(&key) else {
        return;
    };
    t.running = false;
    let cfg = t.upstream.active_health();
    t.due = Some(Instant::now() + Duration::from_millis(cfg.interval_ms));
    let Some(ep) = t.endpoint.upgrade() else {
        return;
    };
    let passed = matches!(result, Ok(200..=399));
    if !passed {
        t.upstream.check_failures.inc();
    }
    let verdict = match &result {
        Ok(status) => format!("status {status}"),
        Err(e) => e.clone(),
    };
    match t.streak.record(passed, ep.is_checked_down(), cfg) {
        Some(true) => {
            ep.set_checked_down(true);
            tracing::warn!(upstream = %t.upstream.name, endpoint = %ep.addr, %verdict,
                "endpoint failed its health check: taken out");
        }
        Some(false) => {
            ep.set_checked_down(false);
            tracing::info!(upstream = %t.upstream.name, endpoint = %ep.addr, %verdict,
                "endpoint passes its health check again: back in");
        }
        None => tracing::debug!(upstream = %t.upstream.name, endpoint = %ep.addr, %verdict,
            "health check"),
    }
}

/// One check: connect (with TLS if the Service's endpoints speak it), send `request`, read
/// the status line. The status code, or why there is none.
async fn check(
    connect: impl Future<Output = std::io::Result<UpstreamIo>>,
    request: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let exchange = async {
        let mut s = connect.await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        s.flush().await.map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            if buf.len() >= MAX_STATUS_LINE {
                return Err("no status line".to_owned());
            }
            let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before a status line".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        status_code(&buf).ok_or_else(|| "malformed status line".to_owned())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())))
}

/// [`check`] for an HTTP/2 endpoint: `req` on a connection of its own. With `grpc`, `req`
/// is a gRPC health check and passes (as status 200) only if it answers `SERVING`.
async fn check_h2(
    connect: impl Future<Output = std::io::Result<UpstreamIo>>,
    req: http::Result<http::Request<Full<Bytes>>>,
    grpc: bool,
    timeout: Duration,
) -> Result<u16, String> {
    let exchange = async {
        let req = req.map_err(|e| format!("request: {e}"))?;
        let io = connect.await.map_err(|e| format!("connect: {e}"))?;
        let (mut sender, _) = h2_upstream::handshake::<Full<Bytes>>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP/2 request: {e}"))?;
        let status = resp.status().as_u16();
        if !grpc || status != 200 {
            return Ok(status);
        }
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_GRPC_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("gRPC answer: {e}"))?;
        // A call that fails at once answers with headers only ("Trailers-Only").
        let trailers = body.trailers().cloned().unwrap_or_default();
        let grpc_status = trailers
            .get("grpc-status")
            .or_else(|| parts.headers.get("grpc-status"))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if grpc_status.as_deref() != Some("0") {
            return Err(format!(
                "grpc-status {}",
                grpc_status.as_deref().unwrap_or("missing")
            ));
        }
        match serving_status(&body.to_bytes()) {
            Some(SERVING) => Ok(200),
            Some(other) => Err(format!("gRPC health status {other} (1 is SERVING)")),
            None => Err("malformed gRPC health answer".to_owned()),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())))
}

/// Bytes of a gRPC health answer read at most (the message is a few bytes).
const MAX_GRPC_ANSWER: usize = 4096;
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// The gRPC health checking protocol's `Check` call for `service` ("" = the server).
fn grpc_health_request(
    scheme: &str,
    host: &str,
    service: &str,
) -> http::Result<http::Request<Full<Bytes>>> {
    // HealthCheckRequest { string service = 1; } as protobuf, in one uncompressed gRPC frame.
    let mut message = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    http::Request::post(format!("{scheme}://{host}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "xlb-health-check")
        .body(Full::new(Bytes::from(frame)))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of a gRPC-framed `HealthCheckResponse` (0, UNKNOWN, when absent, as in
/// proto3); None if the frame or the message is malformed or compressed.
fn serving_status(body: &[u8]) -> Option<u64> {
    let (&compressed, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if compressed != 0 || rest.len() != 4 + len {
        return None;
    }
    let mut m = &rest[4..];
    let mut status = 0;
    while !m.is_empty() {
        let key = read_varint(&mut m)?;
        match key & 7 {
            0 => {
                let v = read_varint(&mut m)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => m = m.get(8..)?,
            2 => {
                let n = usize::try_from(read_varint(&mut m)?).ok()?;
                m = m.get(n..)?;
            }
            5 => m = m.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

/// The code of an `HTTP/1.x NNN ...` status line.
fn status_code(head: &[u8]) -> Option<u16> {
    let rest = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let digits = rest.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !matches!(rest.get(3), Some(b' ' | b'\r')) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(unhealthy: u32, healthy: u32) -> ActiveHealth {
        ActiveHealth {
            path: Some("/healthz".into()),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            ..ActiveHealth::default()
        }
    }

    #[test]
    fn the_first_failure_decides_then_thresholds_apply() {
        let c = cfg(3, 2);
        let mut s = Streak::default();
        let mut down = false;
        // (check passed, state change expected, why)
        let steps = [
            (false, Some(true), "the first check fails: out at once"),
            (true, None, "one pass is not enough"),
            (true, Some(false), "two passes in a row: back in"),
            (false, None, "one failure of three"),
            (false, None, "two of three"),
            (true, None, "a pass resets the failures"),
            (false, None, "one of three again"),
            (false, None, "two of three"),
            (false, Some(true), "three in a row: out"),
            (true, None, "one pass"),
            (false, None, "a failure resets the passes"),
            (true, None, "one pass"),
            (true, Some(false), "two in a row: back in"),
        ];
        for (i, (passed, want, why)) in steps.into_iter().enumerate() {
            let got = s.record(passed, down, &c);
            assert_eq!(got, want, "step {i}: {why}");
            down = got.unwrap_or(down);
        }
    }

    #[test]
    fn a_healthy_first_check_changes_nothing() {
        let mut s = Streak::default();
        assert_eq!(s.record(true, false, &cfg(1, 1)), None);
        assert_eq!(s.record(false, false, &cfg(2, 1)), None);
    }

    #[test]
    fn grpc_health_messages_are_encoded_and_decoded() {
        let req = grpc_health_request("http", "10.0.0.9:50051", "demo.Greeter").expect("request");
        assert_eq!(
            req.uri(),
            "http://10.0.0.9:50051/grpc.health.v1.Health/Check"
        );
        assert_eq!(req.headers()["te"], "trailers");
        let body = futures_util::FutureExt::now_or_never(req.into_body().collect())
            .expect("ready")
            .expect("full body")
            .to_bytes();
        // The frame header, then field 1 (tag 0x0a), length 12, the name.
        assert_eq!(&body[..], b"\0\0\0\0\x0e\x0a\x0cdemo.Greeter");
        let whole = grpc_health_request("https", "h", "").expect("request");
        let body = futures_util::FutureExt::now_or_never(whole.into_body().collect())
            .expect("ready")
            .expect("full body")
            .to_bytes();
        assert_eq!(
            &body[..],
            b"\0\0\0\0\0",
            "the server as a whole: an empty message"
        );

        // (answer, status)
        let cases: [(&[u8], Option<u64>); 8] = [
            (b"\0\0\0\0\x02\x08\x01", Some(SERVING)),
            (b"\0\0\0\0\x02\x08\x02", Some(2)),
            (b"\0\0\0\0\0", Some(0)),
            // An unknown length-delimited field before the status is skipped.
            (b"\0\0\0\0\x06\x12\x02hi\x08\x01", Some(SERVING)),
            (b"\x01\0\0\0\x02\x08\x01", None),
            (b"\0\0\0\0\x03\x08\x01", None),
            (b"\0\0\0\0\x02\x08\x81", None),
            (b"\0\0\0", None),
        ];
        for (answer, want) in cases {
            assert_eq!(serving_status(answer), want, "{answer:?}");
        }
        let mut long = Vec::new();
        put_varint(&mut long, 300);
        assert_eq!(long, [0xac, 0x02]);
        assert_eq!(read_varint(&mut &long[..]), Some(300));
    }

    #[test]
    fn status_lines_are_parsed_strictly() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503\r\n"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/2 200\r\n"), None);
    }
}
