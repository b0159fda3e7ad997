//! Body types of the forwarding path: no boxing, no per-frame allocation.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::access_log::LogRecord;
use super::client::UpstreamBody;
use super::h2_upstream::H2Stream;
use super::server::ActiveGuard;
use super::upstream::InFlight;

/// Errors of body streams, as hyper wants them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body grew past its route's limit while streaming (answered with 413).
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of the route")]
pub struct BodyTooLarge;

/// The request body sent upstream: the client's body, counted against the route's limit.
#[derive(Debug)]
pub struct ReqBody {
    inner: Option<Incoming>,
    remaining: u64,
}

impl ReqBody {
    /// Streams `inner`, failing with [`BodyTooLarge`] past `limit` bytes.
    pub fn limited(inner: Incoming, limit: u64) -> Self {
        Self {
            inner: Some(inner),
            remaining: limit,
        }
    }

    /// No body.
    pub fn empty() -> Self {
        Self {
            inner: None,
            remaining: 0,
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
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
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
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
    },
    Full(Option<Bytes>),
}

/// The response body sent downstream. Dropping it releases the endpoint's in-flight count and
/// the connection's busy mark, and writes the access log line (so that it has the byte count
/// and the full duration).
pub struct RespBody {
    kind: Kind,
    bytes: u64,
    _in_flight: Option<InFlight>,
    _active: Option<ActiveGuard>,
    log: Option<Box<LogRecord>>,
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
        b._in_flight = Some(in_flight);
        b
    }

    /// An HTTP/2 upstream's body, counted in flight on its endpoint and holding its stream
    /// until dropped.
    pub(crate) fn streamed(body: Incoming, in_flight: InFlight, stream: H2Stream) -> Self {
        let mut b = Self::new(Kind::Streamed {
            body,
            _stream: stream,
        });
        b._in_flight = Some(in_flight);
        b
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            bytes: 0,
            _in_flight: None,
            _active: None,
            log: None,
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
            Kind::Upstream(up) => Pin::new(up).poll_frame(cx),
            Kind::Streamed { body: b, .. } => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
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

impl Drop for RespBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.emit(self.bytes);
        }
    }
}
