//! One structured access-log line per request, on tracing target `xlb::access`.
//!
//! The line is written when the response body is dropped (fully sent, or abandoned by the
//! client), so it carries the byte count and the full duration; the subscriber adds the time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

/// Everything known about a request when its response head is ready.
#[derive(Debug)]
pub struct LogRecord {
    /// When the request head was received.
    pub start: Instant,
    /// Downstream peer.
    pub client: SocketAddr,
    /// The original client: the peer's address, or behind a trusted proxy the address its
    /// `X-Forwarded-For` names (`forwarded_headers.trusted_proxies`).
    pub real_ip: IpAddr,
    /// The `X-Request-ID` sent upstream, when the proxy sets one (`request_id.enabled`).
    pub request_id: Option<Box<str>>,
    /// Request method.
    pub method: http::Method,
    /// Host as requested (Host header or :authority).
    pub host: String,
    /// Path and query as requested.
    pub path: String,
    /// Matched rule label (see `metrics`), `-` when none matched.
    pub rule: Arc<str>,
    /// Upstream endpoint that answered, if any.
    pub upstream: Option<SocketAddr>,
    /// Response status.
    pub status: u16,
}

impl LogRecord {
    /// Writes the line: `bytes` of body sent, and why an upstream body ended early
    /// (`body_error`, `-` when it did not).
    pub fn emit(&self, bytes: u64, body_error: Option<&str>) {
        let duration_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let upstream = self.upstream.map(|u| u.to_string());
        tracing::info!(
            target: "xlb::access",
            client = %self.client,
            real_ip = %self.real_ip,
            request_id = self.request_id.as_deref().unwrap_or("-"),
            method = %self.method,
            host = %self.host,
            path = %self.path,
            rule = %self.rule,
            upstream = upstream.as_deref().unwrap_or("-"),
            status = self.status,
            bytes,
            body_error = body_error.unwrap_or("-"),
            duration_us,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn line_has_every_field() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let record = LogRecord {
                start: Instant::now(),
                client: "192.0.2.1:4000".parse().expect("addr"),
                real_ip: "203.0.113.5".parse().expect("addr"),
                request_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
                method: http::Method::GET,
                host: "a.test".into(),
                path: "/x?y=1".into(),
                rule: Arc::from("default/i:a.test/"),
                upstream: Some("127.0.0.1:9000".parse().expect("addr")),
                status: 200,
            };
            record.emit(42, None);
            record.emit(7, Some("upstream_stalled"));
        });
        let line =
            String::from_utf8(capture.0.lock().expect("capture lock").clone()).expect("utf-8");
        for field in [
            "xlb::access",
            "client=192.0.2.1:4000",
            "real_ip=203.0.113.5",
            "request_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"",
            "method=GET",
            "host=a.test",
            "path=/x?y=1",
            "rule=default/i:a.test/",
            "upstream=\"127.0.0.1:9000\"",
            "status=200",
            "bytes=42",
            "body_error=\"-\"",
            "duration_us=",
            "bytes=7",
            "body_error=\"upstream_stalled\"",
        ] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
    }
}
