//! Body types of the forwarding path: no boxing, no per-frame allocation.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::access_log::LogRecord;
use super::client::{ExchangeError, UpstreamBody};
use super::h2_upstream::H2Stream;
use super::server::ActiveGuard;
use super::timer::{LazySleep, ReadIdle};
use super::upstream::InFlight;

/// Errors of body streams, as hyper wants them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body grew past its route's limit while streaming (answered with 413).
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of the route")]
pub struct BodyTooLarge;

/// The client sent no more of its request body within the request body timeout (answered
/// with 408).
#[derive(Debug, thiserror::Error)]
#[error("request body: nothing more from the client within the request body timeout")]
pub struct BodyTimedOut;

/// The request body sent upstream: the client's body, counted against the route's limit,
/// each wait for more of it bounded by the request body timeout (nginx's
/// `client_body_timeout`: without it a client trickling its body holds a connection to the
/// endpoint for ever).
#[derive(Debug)]
pub struct ReqBody {
    inner: Option<Incoming>,
    /// A body read whole before the exchange (the HTTP/1 fast path's small bodies).
    buffered: Option<Bytes>,
    remaining: u64,
    idle: ReadIdle,
    sleep: Option<LazySleep>,
}

impl ReqBody {
    /// Streams `inner`, failing with [`BodyTooLarge`] past `limit` bytes and with
    /// [`BodyTimedOut`] when a wait for more of it is longer than `read_timeout`.
    pub fn limited(inner: Incoming, limit: u64, read_timeout: Duration) -> Self {
        Self {
            inner: Some(inner),
            buffered: None,
            remaining: limit,
            idle: ReadIdle::new(read_timeout),
            sleep: None,
        }
    }

    /// A body already read whole (its length was checked against the route's limit).
    pub fn buffered(body: Bytes) -> Self {
        Self {
            remaining: body.len() as u64,
            buffered: (!body.is_empty()).then_some(body),
            ..Self::empty()
        }
    }

    /// The whole body, if it was read whole before the exchange and not sent yet (to go out
    /// in one write with the request head).
    pub fn take_buffered(&mut self) -> Option<Bytes> {
        if self.inner.is_some() {
            return None;
        }
        self.buffered.take()
    }

    /// No body.
    pub fn empty() -> Self {
        Self {
            inner: None,
            buffered: None,
            remaining: 0,
            idle: ReadIdle::new(Duration::MAX),
            sleep: None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(body) = this.buffered.take() {
            return Poll::Ready(Some(Ok(Frame::data(body))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) else {
            ready!(this.idle.poll_expired(&mut this.sleep, cx));
            this.inner = None;
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        };
        this.idle.progressed();
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.inner = None;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(b) = &self.buffered {
            return SizeHint::with_exact(b.len() as u64);
        }
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// See [`RespBody::length`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// A body of this many bytes and no head of its own (a local answer).
    Known(u64),
    /// The upstream's head says it (Content-Length), or the response has no body.
    FromHead,
    /// Not known up front (chunked or close-delimited upstream).
    Unknown,
}

enum Kind {
    Upstream(UpstreamBody),
    /// From an HTTP/2 upstream (hyper's client): data and trailers; the stream it holds on
    /// its connection is let go when the body is dropped.
    Streamed {
        body: Incoming,
        _stream: H2Stream,
        /// Bounds each wait for the endpoint's next frame, on `sleep`.
        idle: ReadIdle,
        sleep: Option<LazySleep>,
    },
    Full(Option<Bytes>),
}

/// Why an upstream response body ended before its end (in the access log, `body_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFailure {
    /// Nothing more of it came within the response timeout.
    Stalled,
    /// The endpoint's connection or stream broke, or its framing was invalid.
    Broken,
}

impl BodyFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stalled => "upstream_stalled",
            Self::Broken => "upstream_broken",
        }
    }
}

/// The response body sent downstream. Dropping it releases the endpoint's in-flight count and
/// the connection's busy mark, and writes the access log line (so that it has the byte count
/// and the full duration).
pub struct RespBody {
    kind: Kind,
    bytes: u64,
    in_flight: Option<InFlight>,
    _active: Option<ActiveGuard>,
    log: Option<Box<LogRecord>>,
    failure: Option<BodyFailure>,
    /// The client made a gRPC call: a stall ends the body with `grpc-status` trailers.
    grpc_client: bool,
}

impl std::fmt::Debug for RespBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespBody")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl RespBody {
    /// A fixed body (error pages, redirects, metrics).
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self::new(Kind::Full(Some(b.into())))
    }

    /// No body.
    pub fn empty() -> Self {
        Self::new(Kind::Full(None))
    }

    /// An upstream body, counted in flight on its endpoint until dropped.
    pub(crate) fn upstream(body: UpstreamBody, in_flight: InFlight) -> Self {
        let mut b = Self::new(Kind::Upstream(body));
        b.in_flight = Some(in_flight);
        b
    }

    /// An HTTP/2 upstream's body, counted in flight on its endpoint and holding its stream
    /// until dropped; a wait for its next frame longer than `read_timeout` ends it.
    pub(crate) fn streamed(
        body: Incoming,
        in_flight: InFlight,
        stream: H2Stream,
        read_timeout: Duration,
    ) -> Self {
        let mut b = Self::new(Kind::Streamed {
            body,
            _stream: stream,
            idle: ReadIdle::new(read_timeout),
            sleep: None,
        });
        b.in_flight = Some(in_flight);
        b
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            bytes: 0,
            in_flight: None,
            _active: None,
            log: None,
            failure: None,
            grpc_client: false,
        }
    }

    /// The client made a gRPC call: if the upstream body stalls, the call ends with
    /// trailers (`grpc-status` 14, as the proxy's other 504s) rather than a reset stream.
    pub(crate) fn set_grpc_client(&mut self) {
        self.grpc_client = true;
    }

    /// Records why the upstream body failed, counting it as an upstream error.
    fn failed(&mut self, failure: BodyFailure) {
        self.failure = Some(failure);
        if let Some(f) = &self.in_flight {
            f.endpoint().count_error();
        }
    }

    /// Attaches the access-log record written when the body is dropped.
    pub(crate) fn set_log(&mut self, log: Option<Box<LogRecord>>) {
        self.log = log;
    }

    /// How the body's length reaches the client (for a server writing heads itself).
    pub(crate) fn length(&self) -> BodyLength {
        match &self.kind {
            Kind::Full(b) => BodyLength::Known(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(up) if up.unknown_length() => BodyLength::Unknown,
            Kind::Upstream(_) => BodyLength::FromHead,
            // HTTP/2 knows the length from content-length (then in the head) or from the
            // stream ending with the head.
            Kind::Streamed { body: b, .. } if b.is_end_stream() => BodyLength::Known(0),
            Kind::Streamed { body: b, .. } if b.size_hint().exact().is_some() => {
                BodyLength::FromHead
            }
            Kind::Streamed { .. } => BodyLength::Unknown,
        }
    }

    /// Keeps the connection marked busy (for the idle timeout) until the body is dropped.
    pub(crate) fn set_active(&mut self, active: ActiveGuard) {
        self._active = Some(active);
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(up) => match ready!(Pin::new(up).poll_frame(cx)) {
                Some(Err(e)) => {
                    let stalled = matches!(
                        e.downcast_ref::<ExchangeError>(),
                        Some(ExchangeError::BodyStalled)
                    );
                    this.failed(if stalled {
                        BodyFailure::Stalled
                    } else {
                        BodyFailure::Broken
                    });
                    Poll::Ready(Some(Err(e)))
                }
                r => Poll::Ready(r),
            },
            Kind::Streamed {
                body, idle, sleep, ..
            } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    this.failed(BodyFailure::Broken);
                    Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                }
                Poll::Ready(r) => {
                    idle.progressed();
                    Poll::Ready(r.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
                }
                Poll::Pending => {
                    ready!(idle.poll_expired(sleep, cx));
                    this.failed(BodyFailure::Stalled);
                    // Dropping the upstream body resets its stream at the endpoint; what is
                    // sent downstream is the body's last frame.
                    this.kind = Kind::Full(None);
                    if this.grpc_client {
                        Poll::Ready(Some(Ok(Frame::trailers(stalled_grpc_trailers()))))
                    } else {
                        Poll::Ready(Some(Err(Box::new(ExchangeError::BodyStalled) as BoxError)))
                    }
                }
            },
        };
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            this.bytes += d.len() as u64;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(inc) => inc.is_end_stream(),
            Kind::Streamed { body: b, .. } => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(inc) => inc.size_hint(),
            Kind::Streamed { body: b, .. } => b.size_hint(),
        }
    }
}

/// The trailers a gRPC call ends with when its upstream body stalls: UNAVAILABLE, with the
/// text of the 504 it stands for (as the proxy's answer to a late response head).
fn stalled_grpc_trailers() -> HeaderMap {
    let mut t = HeaderMap::with_capacity(2);
    t.insert("grpc-status", HeaderValue::from_static("14"));
    t.insert(
        "grpc-message",
        HeaderValue::from_static("504 Gateway Timeout"),
    );
    t
}

impl Drop for RespBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.emit(self.bytes, self.failure.map(BodyFailure::as_str));
        }
    }
}
