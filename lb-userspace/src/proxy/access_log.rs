//! One structured access-log line per request, on tracing target `xlb::access`.
//!
//! The line is written when the response body is dropped (fully sent, or abandoned by the
//! client), so it carries the byte count and the full duration; the subscriber adds the time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Everything known about a request when its response head is ready.
#[derive(Debug)]
pub struct LogRecord {
    /// When the request head was received.
    pub start: Instant,
    /// Downstream peer.
    pub client: SocketAddr,
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
    /// Writes the line.
    pub fn emit(&self, bytes: u64) {
        let duration_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let upstream = self.upstream.map(|u| u.to_string());
        tracing::info!(
            target: "xlb::access",
            client = %self.client,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            rule = %self.rule,
            upstream = upstream.as_deref().unwrap_or("-"),
            status = self.status,
            bytes,
            duration_us,
        );
    }
}
