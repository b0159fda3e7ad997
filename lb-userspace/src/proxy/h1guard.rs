//! Refuses HTTP/1 requests that carry both `Content-Length` and `Transfer-Encoding`.
//!
//! Such requests are the classic request-smuggling vector. RFC 9112 §6.1 lets a server either
//! reject them or drop `Content-Length`; hyper does the latter, and the handler cannot tell
//! afterwards, so this byte-stream guard sits between the socket and hyper. It follows message
//! boundaries (request line, headers, Content-Length or chunked bodies) and, on the second of
//! the two headers in one head, overwrites that header's `:` with a space. hyper then fails to
//! parse the head and answers 400 itself, so the request never reaches routing or an upstream.
//!
//! The scan is a small state machine over the bytes hyper reads anyway; body data is skipped
//! in bulk. Anything it does not understand switches it off (hyper then judges on its own):
//! upgrades, CONNECT, malformed framing.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    ContentLength,
    TransferEncoding,
    Upgrade,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Before a request line (CRLFs between messages are tolerated).
    MessageStart,
    RequestLine,
    LineStart,
    Name,
    Value(Header),
    HeadEndLf,
    Body(u64),
    ChunkSize,
    ChunkExt,
    ChunkSizeLf,
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    TrailerLineStart,
    TrailerLine,
    TrailerEndLf,
    Off,
}

/// The scanner's state for one connection.
#[derive(Debug)]
pub struct Scanner {
    st: St,
    /// Lower-cased header name prefix (long enough for the names we care about).
    name: [u8; 18],
    name_len: usize,
    /// First bytes of the request line, to spot CONNECT and the h2 preface.
    method: [u8; 8],
    method_len: usize,
    has_cl: bool,
    has_te: bool,
    upgrade: bool,
    cl: u64,
    /// Last non-blank bytes of a Transfer-Encoding value (is the final coding "chunked"?).
    te_tail: [u8; 7],
    chunk: u64,
    chunk_digits: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            st: St::MessageStart,
            name: [0; 18],
            name_len: 0,
            method: [0; 8],
            method_len: 0,
            has_cl: false,
            has_te: false,
            upgrade: false,
            cl: 0,
            te_tail: [0; 7],
            chunk: 0,
            chunk_digits: false,
        }
    }
}

impl Scanner {
    fn new_message(&mut self) {
        *self = Self::default();
    }

    fn classify(&self) -> Header {
        match &self.name[..self.name_len] {
            b"content-length" => Header::ContentLength,
            b"transfer-encoding" => Header::TransferEncoding,
            b"upgrade" => Header::Upgrade,
            _ => Header::Other,
        }
    }

    /// Scans bytes in order, possibly neutralising a `:`. Returns true if it did.
    pub fn scan(&mut self, buf: &mut [u8]) -> bool {
        let mut poisoned = false;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.st {
                St::Off => return poisoned,
                St::MessageStart => {
                    if b != b'\r' && b != b'\n' {
                        self.st = St::RequestLine;
                        continue; // re-read this byte as part of the request line
                    }
                }
                St::RequestLine => {
                    if b != b'\n' && self.method_len < self.method.len() {
                        self.method[self.method_len] = b;
                        self.method_len += 1;
                    } else {
                        // The method's first bytes are kept; the rest of the line is skipped
                        // in bulk.
                        let Some(p) = find_byte(&buf[i..], b'\n') else {
                            return poisoned;
                        };
                        i += p;
                        let m = &self.method[..self.method_len];
                        if m.starts_with(b"CONNECT ") || m.starts_with(b"PRI ") {
                            self.st = St::Off;
                        } else {
                            self.st = St::LineStart;
                        }
                    }
                }
                St::LineStart => match b {
                    b'\r' => self.st = St::HeadEndLf,
                    b'\n' => self.end_of_head(),
                    // Obsolete line folding: hyper rejects it; stop judging.
                    b' ' | b'\t' => self.st = St::Off,
                    _ => {
                        self.name_len = 0;
                        self.st = St::Name;
                        continue;
                    }
                },
                St::Name => {
                    // Collect the name in a tight loop up to ':' (or a bare line end).
                    let mut j = i;
                    while j < buf.len() && buf[j] != b':' && buf[j] != b'\n' {
                        if self.name_len < self.name.len() {
                            self.name[self.name_len] = buf[j].to_ascii_lowercase();
                            self.name_len += 1;
                        } else {
                            self.name[0] = 0; // too long to be one we track
                        }
                        j += 1;
                    }
                    if j == buf.len() {
                        return poisoned;
                    }
                    i = j;
                    let b = buf[i];
                    if b == b':' {
                        let h = self.classify();
                        match h {
                            Header::ContentLength => self.has_cl = true,
                            Header::TransferEncoding => self.has_te = true,
                            Header::Upgrade => self.upgrade = true,
                            Header::Other => {}
                        }
                        if self.has_cl
                            && self.has_te
                            && matches!(h, Header::ContentLength | Header::TransferEncoding)
                        {
                            buf[i] = b' ';
                            poisoned = true;
                            // hyper will refuse this head and close the connection.
                            self.st = St::Off;
                            return poisoned;
                        }
                        self.st = St::Value(h);
                    } else {
                        self.st = St::Off; // a header line without ':'; hyper's call
                    }
                }
                St::Value(Header::Upgrade | Header::Other) => {
                    // Values of headers that do not matter here are skipped in bulk.
                    let Some(p) = find_byte(&buf[i..], b'\n') else {
                        return poisoned;
                    };
                    i += p + 1;
                    self.st = St::LineStart;
                    continue;
                }
                St::Value(h) => {
                    if b == b'\n' {
                        self.st = St::LineStart;
                    } else {
                        match h {
                            Header::ContentLength => match b {
                                b'0'..=b'9' => {
                                    let Some(v) = self
                                        .cl
                                        .checked_mul(10)
                                        .and_then(|v| v.checked_add(u64::from(b - b'0')))
                                    else {
                                        self.st = St::Off;
                                        return poisoned;
                                    };
                                    self.cl = v;
                                }
                                b' ' | b'\t' | b'\r' => {}
                                // Lists ("5, 5") and junk: hyper decides.
                                _ => self.st = St::Off,
                            },
                            Header::TransferEncoding => {
                                if !matches!(b, b' ' | b'\t' | b'\r') {
                                    self.te_tail.rotate_left(1);
                                    self.te_tail[6] = b.to_ascii_lowercase();
                                }
                            }
                            Header::Upgrade | Header::Other => {}
                        }
                    }
                }
                St::HeadEndLf => {
                    if b == b'\n' {
                        self.end_of_head();
                    } else {
                        self.st = St::Off;
                    }
                }
                St::Body(n) => {
                    let take = n.min((buf.len() - i) as u64);
                    i += take as usize;
                    let left = n - take;
                    if left == 0 {
                        self.new_message();
                    } else {
                        self.st = St::Body(left);
                    }
                    continue;
                }
                St::ChunkSize => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        match self
                            .chunk
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(u64::from(d)))
                        {
                            Some(v) => {
                                self.chunk = v;
                                self.chunk_digits = true;
                            }
                            None => self.st = St::Off,
                        }
                    }
                    b';' | b' ' | b'\t' => self.st = St::ChunkExt,
                    b'\r' => self.st = St::ChunkSizeLf,
                    b'\n' => self.end_of_chunk_size(),
                    _ => self.st = St::Off,
                },
                St::ChunkExt => match b {
                    b'\r' => self.st = St::ChunkSizeLf,
                    b'\n' => self.end_of_chunk_size(),
                    _ => {}
                },
                St::ChunkSizeLf => {
                    if b == b'\n' {
                        self.end_of_chunk_size();
                    } else {
                        self.st = St::Off;
                    }
                }
                St::ChunkData(n) => {
                    let take = n.min((buf.len() - i) as u64);
                    i += take as usize;
                    let left = n - take;
                    self.st = if left == 0 {
                        St::ChunkDataCr
                    } else {
                        St::ChunkData(left)
                    };
                    continue;
                }
                St::ChunkDataCr => {
                    self.st = match b {
                        b'\r' => St::ChunkDataLf,
                        b'\n' => self.next_chunk(),
                        _ => St::Off,
                    }
                }
                St::ChunkDataLf => {
                    self.st = if b == b'\n' {
                        self.next_chunk()
                    } else {
                        St::Off
                    };
                }
                St::TrailerLineStart => match b {
                    b'\r' => self.st = St::TrailerEndLf,
                    b'\n' => self.new_message(),
                    _ => self.st = St::TrailerLine,
                },
                St::TrailerLine => {
                    let Some(p) = find_byte(&buf[i..], b'\n') else {
                        return poisoned;
                    };
                    i += p + 1;
                    self.st = St::TrailerLineStart;
                    continue;
                }
                St::TrailerEndLf => {
                    if b == b'\n' {
                        self.new_message();
                    } else {
                        self.st = St::Off;
                    }
                }
            }
            i += 1;
        }
        poisoned
    }

    fn next_chunk(&mut self) -> St {
        self.chunk = 0;
        self.chunk_digits = false;
        St::ChunkSize
    }

    fn end_of_chunk_size(&mut self) {
        if !self.chunk_digits {
            self.st = St::Off;
        } else if self.chunk == 0 {
            self.st = St::TrailerLineStart;
        } else {
            self.st = St::ChunkData(self.chunk);
        }
    }

    fn end_of_head(&mut self) {
        if self.upgrade {
            // The connection may switch protocols after this message.
            self.st = St::Off;
        } else if self.has_te {
            if &self.te_tail == b"chunked" {
                self.chunk = 0;
                self.chunk_digits = false;
                self.st = St::ChunkSize;
            } else {
                self.st = St::Off; // hyper answers 400 for a non-chunked final coding
            }
        } else if self.has_cl && self.cl > 0 {
            self.st = St::Body(self.cl);
        } else {
            self.new_message();
        }
    }
}

/// The position of the first `needle` in `hay`, eight bytes at a time.
fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(needle);
    let (chunks, rest) = hay.as_chunks::<8>();
    let mut at = 0;
    for chunk in chunks {
        let x = u64::from_le_bytes(*chunk) ^ pattern;
        // Bytes equal to `needle` are zero in `x`; the lowest flagged byte is exact.
        let zero = x.wrapping_sub(LO) & !x & HI;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    rest.iter().position(|b| *b == needle).map(|p| at + p)
}

pin_project_lite::pin_project! {
    /// An I/O stream whose reads pass through a [`Scanner`].
    pub struct GuardedIo<T> {
        #[pin]
        inner: T,
        scanner: Scanner,
    }
}

impl<T> GuardedIo<T> {
    /// Wraps a downstream HTTP/1 stream.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            scanner: Scanner::default(),
        }
    }
}

impl<T: AsyncRead> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && this.scanner.st != St::Off
            && buf.filled().len() > before
        {
            let filled = buf.filled_mut();
            if this.scanner.scan(&mut filled[before..]) {
                tracing::debug!("request with both Content-Length and Transfer-Encoding refused");
            }
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` split into `step`-byte reads; returns the bytes as hyper would see them.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut s = Scanner::default();
        let mut out = input.to_vec();
        let mut hit = false;
        for chunk in out.chunks_mut(step) {
            hit |= s.scan(chunk);
        }
        (out, hit)
    }

    #[test]
    fn conflicting_framing_is_poisoned_in_any_split() {
        let req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in 1..req.len() {
            let (out, hit) = run(req, step);
            assert!(hit, "step {step}");
            assert!(
                out.windows(18).any(|w| w == b"Transfer-Encoding "),
                "step {step}"
            );
        }
        let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n";
        assert!(run(req, 7).1);
    }

    #[test]
    fn bodies_are_skipped_so_their_text_is_not_judged() {
        // A body that looks like headers, then a clean second request.
        let body = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n";
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        req.extend_from_slice(b"10;ext=1\r\nContent-Length: \r\n0\r\nX-Trailer: 1\r\n\r\n");
        req.extend_from_slice(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        for step in [1, 3, 10, req.len()] {
            let (out, hit) = run(&req, step);
            assert!(hit, "the third request conflicts (step {step})");
            // Only the third request's header was touched.
            let touched: Vec<usize> = out
                .iter()
                .zip(&req)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(touched.len(), 1);
            assert!(touched[0] > req.len() - 40, "step {step}: {touched:?}");
        }
    }

    #[test]
    fn find_byte_finds_the_first_occurrence() {
        let hay: Vec<u8> = (0..40u8).map(|i| b'a' + i % 20).collect();
        for needle in [b'a', b'b', b'h', b'i', b'p', b't', b'z', 0xff, 0x80] {
            assert_eq!(
                find_byte(&hay, needle),
                hay.iter().position(|b| *b == needle),
                "{needle}"
            );
            for start in 0..hay.len() {
                assert_eq!(
                    find_byte(&hay[start..], needle),
                    hay[start..].iter().position(|b| *b == needle),
                    "{needle} from {start}"
                );
            }
        }
        // Bytes just above the needle (borrow cases) do not fool it.
        assert_eq!(
            find_byte(b"\x0b\x0b\x0b\x0b\x0b\x0b\x0b\x0b\x0a", b'\n'),
            Some(8)
        );
        assert_eq!(find_byte(b"\x01\x00\x0b\x0a", b'\n'), Some(3));
    }

    #[test]
    fn long_and_odd_header_names_are_tracked_in_any_split() {
        // A name longer than the tracked prefix that starts like a tracked one.
        let req = b"POST / HTTP/1.1\r\nContent-Length-Extra-Long: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in 1..req.len() {
            assert!(!run(req, step).1, "step {step}");
        }
        let req = b"PUT /x HTTP/1.1\r\nX-A: a:b\r\ntransfer-ENCODING: gzip, chunked\r\nContent-Length:7\r\n\r\n";
        for step in 1..req.len() {
            assert!(run(req, step).1, "step {step}");
        }
    }

    #[test]
    fn clean_traffic_is_untouched() {
        let req = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\n\r\n";
        let (out, hit) = run(req, 4);
        assert!(!hit);
        assert_eq!(&out[..], &req[..]);
    }
}
