//! A client stream that first replays bytes already read from it. The fast HTTP/1 path
//! (`h1`) reads a request before it knows whether it can serve it; when it cannot (upgrade,
//! chunked body, HTTP/1.0, ...) it hands the connection to Pingora's full proxy through this
//! wrapper, so Pingora parses the request from its first byte. Where the request's end is
//! known, the wrapper lets Pingora read up to it and no further, and the connection comes
//! back to the lean loop for the next request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora_core::protocols::{SocketDigest, TimingDigest};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::chunked::ChunkedTracker;

/// Where the request handed over ends, so that Pingora's proxy reads that request and
/// nothing after it: the connection then comes back to the lean loop, which reads every
/// HTTP/1 request head itself (one parser, one set of rules, `strict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEnd {
    Length(u64),
    Chunked,
}

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(ChunkedTracker),
    /// The request is read: further reads wait (they are the next request's, for the lean
    /// loop). Pingora's proxy only reads here to notice a client leaving early.
    Done,
}

#[derive(Debug)]
struct Fence {
    /// Bytes of the request head still to be read (all of it is in the prefix).
    head_left: usize,
    body: Body,
}

#[derive(Debug)]
pub struct Replayed {
    prefix: Bytes,
    inner: Stream,
    /// `None`: everything passes (upgrades, malformed requests: the connection does not
    /// come back).
    fence: Option<Fence>,
    /// Reads from `inner` while fenced (what is past the end goes back to `prefix`).
    scratch: Vec<u8>,
    /// A chunked body as Pingora reads it (leading zeros of sizes taken out), not yet read.
    ready: Bytes,
}

impl Replayed {
    pub fn new(prefix: Bytes, inner: Stream) -> Self {
        Self {
            prefix,
            inner,
            fence: None,
            scratch: Vec::new(),
            ready: Bytes::new(),
        }
    }

    /// Pingora's proxy reads one request (head of `head_len` bytes, body ending as `end`
    /// says) and then nothing more of the connection.
    pub fn one_request(prefix: Bytes, inner: Stream, head_len: usize, end: RequestEnd) -> Self {
        let body = match end {
            RequestEnd::Length(n) => Body::Length(n),
            RequestEnd::Chunked => Body::Chunked(ChunkedTracker::default()),
        };
        Self {
            prefix,
            inner,
            fence: Some(Fence {
                head_left: head_len,
                body,
            }),
            scratch: Vec::new(),
            ready: Bytes::new(),
        }
    }

    /// Pingora's proxy read exactly the fenced request: the head and the body up to its end.
    /// Otherwise (no fence, a chunked body our tracker refused, a body Pingora's parser saw
    /// end earlier than ours) the connection must not go on.
    pub fn request_done(&self) -> bool {
        matches!(
            &self.fence,
            Some(Fence {
                head_left: 0,
                body: Body::Done | Body::Length(0),
            })
        ) && self.ready.is_empty()
    }

    /// The bytes read but not consumed (the next request's), and the stream.
    pub fn into_parts(self) -> (Bytes, Stream) {
        (self.prefix, self.inner)
    }

    /// Reads the next bytes of the request body (from the prefix, else the stream) into
    /// `scratch`, at most `max`.
    fn poll_fill_scratch(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<std::io::Result<()>> {
        self.scratch.clear();
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(max);
            self.scratch.extend_from_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        self.scratch.resize(max.min(16 * 1024), 0);
        let mut rb = ReadBuf::new(&mut self.scratch);
        let polled = Pin::new(&mut *self.inner).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.scratch.truncate(n);
        polled
    }
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let Some(fence) = this.fence.as_mut() else {
            if !this.prefix.is_empty() {
                let n = this.prefix.len().min(buf.remaining());
                buf.put_slice(&this.prefix[..n]);
                this.prefix.advance(n);
                return Poll::Ready(Ok(()));
            }
            return Pin::new(&mut *this.inner).poll_read(cx, buf);
        };
        if !this.ready.is_empty() {
            let n = this.ready.len().min(buf.remaining());
            buf.put_slice(&this.ready[..n]);
            this.ready.advance(n);
            return Poll::Ready(Ok(()));
        }
        if fence.head_left > 0 {
            let n = fence.head_left.min(this.prefix.len()).min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            fence.head_left -= n;
            return Poll::Ready(Ok(()));
        }
        // Leading zeros taken out of a chunked body can leave nothing to pass on from one
        // read: read on (an empty read would look like the end of the stream).
        loop {
            let Some(fence) = this.fence.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let max = match &fence.body {
                Body::Done => return Poll::Pending,
                Body::Length(0) => {
                    fence.body = Body::Done;
                    return Poll::Pending;
                }
                Body::Length(left) => usize::try_from(*left).unwrap_or(usize::MAX),
                Body::Chunked(_) => usize::MAX,
            }
            .min(buf.remaining());
            std::task::ready!(this.poll_fill_scratch(cx, max))?;
            let n = this.scratch.len();
            let Some(fence) = this.fence.as_mut().filter(|_| n > 0) else {
                // End of stream.
                return Poll::Ready(Ok(()));
            };
            let mut upto = n;
            let before = buf.filled().len();
            match &mut fence.body {
                Body::Length(left) => {
                    *left -= n as u64;
                    if *left == 0 {
                        fence.body = Body::Done;
                    }
                    buf.put_slice(&this.scratch);
                }
                Body::Chunked(tracker) => {
                    let mut out = Vec::with_capacity(n + 1);
                    match tracker.feed_normalized(&this.scratch, &mut out) {
                        Ok(Some(end)) => {
                            upto = end;
                            fence.body = Body::Done;
                        }
                        Ok(None) => {}
                        // Pingora's parser refuses it and closes: nothing to hold back.
                        Err(_) => {
                            this.fence = None;
                            out.clear();
                            out.extend_from_slice(&this.scratch);
                        }
                    }
                    let now = out.len().min(buf.remaining());
                    buf.put_slice(&out[..now]);
                    if now < out.len() {
                        this.ready = Bytes::copy_from_slice(&out[now..]);
                    }
                }
                Body::Done => {}
            }
            if upto < n {
                let mut rest = this.scratch[upto..].to_vec();
                rest.extend_from_slice(&this.prefix);
                this.prefix = Bytes::from(rest);
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Replayed {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Replayed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Replayed {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Replayed {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Replayed {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Replayed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

// Peeking is only used for the h2c preface, which this proxy does not enable.
#[async_trait]
impl Peek for Replayed {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn replays_the_prefix_then_reads_the_stream() {
        let mock = tokio_test_stream(b" world");
        let mut s = Replayed::new(Bytes::from_static(b"hello"), mock);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    /// Reads until the fence holds (a read that does not complete).
    async fn read_fenced(s: &mut Replayed) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = [0u8; 7];
        loop {
            let read = s.read(&mut chunk);
            match tokio::time::timeout(std::time::Duration::from_millis(100), read).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
                _ => return got,
            }
        }
    }

    #[tokio::test]
    async fn one_request_reads_up_to_the_end_of_the_body_and_no_further() {
        let head = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        let mut prefix = head.to_vec();
        prefix.extend_from_slice(b"helloGET /next");
        let mut s = Replayed::one_request(
            Bytes::from(prefix),
            tokio_test_stream(b" HTTP/1.1\r\n"),
            head.len(),
            RequestEnd::Length(5),
        );
        let got = read_fenced(&mut s).await;
        assert_eq!(&got[head.len()..], b"hello");
        assert!(s.request_done());
        assert_eq!(&s.into_parts().0[..], b"GET /next");
    }

    #[tokio::test]
    async fn a_chunked_body_ends_at_its_last_chunk_with_leading_zeros_but_one_taken_out() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut prefix = head.to_vec();
        prefix.extend_from_slice(b"00000000000000003\r\nabc\r\n0");
        let mut s = Replayed::one_request(
            Bytes::from(prefix),
            tokio_test_stream(b"000\r\n\r\nGET /next"),
            head.len(),
            RequestEnd::Chunked,
        );
        let got = read_fenced(&mut s).await;
        assert_eq!(
            got[head.len()..].escape_ascii().to_string(),
            "03\\r\\nabc\\r\\n0\\r\\n\\r\\n"
        );
        assert!(s.request_done());
        // What follows the body is left unread, in the prefix or in the stream.
        let (prefix, mut rest) = s.into_parts();
        let mut next = prefix.to_vec();
        rest.read_to_end(&mut next).await.unwrap();
        assert_eq!(next, b"GET /next");
    }

    #[tokio::test]
    async fn a_malformed_chunked_body_is_not_a_request_done() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut prefix = head.to_vec();
        prefix.extend_from_slice(b"zz\r\n");
        let mut s = Replayed::one_request(
            Bytes::from(prefix),
            tokio_test_stream(b""),
            head.len(),
            RequestEnd::Chunked,
        );
        read_fenced(&mut s).await;
        assert!(!s.request_done());
    }

    fn tokio_test_stream(data: &'static [u8]) -> Stream {
        // A real socket pair: Pingora's l4 stream from a connected Unix socket.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut b = b;
        std::io::Write::write_all(&mut b, data).unwrap();
        drop(b);
        let a = tokio::net::UnixStream::from_std(a).unwrap();
        Box::new(pingora_core::protocols::l4::stream::Stream::from(a))
    }
}
