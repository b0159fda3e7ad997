//! Body types of the forwarding path: no boxing, no per-frame allocation.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use super::access_log::LogRecord;
use super::server::ActiveGuard;
use super::upstream::{Endpoint, InFlight};

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

enum Kind {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

/// The response body sent downstream. Dropping it returns the upstream connection to the
/// pool if the body was read to its end, releases the endpoint's in-flight count and writes
/// the access log line (so that it has the byte count and the full duration).
pub struct RespBody {
    kind: Kind,
    done: bool,
    bytes: u64,
    pooled: Option<(Arc<Endpoint>, SendRequest<ReqBody>)>,
    _in_flight: Option<InFlight>,
    _active: Option<ActiveGuard>,
    log: Option<Box<LogRecord>>,
}

impl std::fmt::Debug for RespBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespBody")
            .field("done", &self.done)
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

    /// An upstream body; the connection goes back to `pooled` once it has been read fully.
    pub(crate) fn upstream(
        body: Incoming,
        pooled: Option<(Arc<Endpoint>, SendRequest<ReqBody>)>,
        in_flight: Option<InFlight>,
    ) -> Self {
        let done = body.is_end_stream();
        let mut b = Self::new(Kind::Upstream(body));
        b.done = done;
        b.pooled = pooled;
        b._in_flight = in_flight;
        b
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            done: false,
            bytes: 0,
            pooled: None,
            _in_flight: None,
            _active: None,
            log: None,
        }
    }

    /// Attaches the access-log record written when the body is dropped.
    pub(crate) fn set_log(&mut self, log: Option<Box<LogRecord>>) {
        self.log = log;
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
            Kind::Upstream(inc) => match ready!(Pin::new(inc).poll_frame(cx)) {
                Some(Ok(f)) => Poll::Ready(Some(Ok(f))),
                Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e) as BoxError))),
                None => Poll::Ready(None),
            },
        };
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.done = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(inc) => inc.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(inc) => inc.size_hint(),
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        if let Some((ep, sender)) = self.pooled.take()
            && (self.done || self.is_end_stream())
        {
            ep.checkin(sender);
        }
        if let Some(log) = self.log.take() {
            log.emit(self.bytes);
        }
    }
}
