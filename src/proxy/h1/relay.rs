//! The response relay: read the backend's response head, pass it (or a rewritten one) on,
//! then the body by its framing (length, chunked, until close), flushing as it comes.

use tokio::io::AsyncReadExt;

use super::super::backend_io::BackendIo;
use super::super::chunked::ChunkedTracker;
use super::super::deadline::IoDeadline;
use super::client::Client;
use super::forward::{AttemptError, UpstreamFault};
use super::parse::{parse_response, Framing, ParsedResponse, RequestHead};
use super::{Outcome, VhostApp, MAX_HEAD};

impl VhostApp {
    /// Reads the response and sends it to the client. Returns the status, whether the
    /// backend connection can be reused, and what happens to the client connection.
    pub(super) async fn relay_response(
        &self,
        client: &mut Client,
        head: &RequestHead,
        upstream: &mut BackendIo,
        resp: &mut Vec<u8>,
        (reused, replayable, close_client): (bool, bool, bool),
    ) -> Result<(u16, bool, Outcome), AttemptError> {
        let failed = |fault: UpstreamFault| AttemptError::Upstream { fault, reused };
        let mut filled = 0;
        if client.resp_head.capacity() == 0 {
            // Given back while the connection was idle (`Client::read_more`).
            client.resp_head = super::buffers::take_head();
        }
        let parsed = loop {
            if filled > 0 {
                match parse_response(
                    &resp[..filled],
                    head.head_method,
                    close_client,
                    client.request_id.as_bytes(),
                    &mut client.resp_head,
                ) {
                    ParsedResponse::Partial => {}
                    ParsedResponse::Invalid => return Err(failed(UpstreamFault::InvalidHead)),
                    ParsedResponse::Response(r) if r.status == 101 => {
                        // Only an upgrade request may be answered with 101; those go to Pingora.
                        return Err(failed(UpstreamFault::InvalidHead));
                    }
                    ParsedResponse::Response(r) if (100..200).contains(&r.status) => {
                        // Informational answer: pass it on, then read the final one.
                        if client.send(&resp[..r.head_len]).await.is_err() {
                            return Err(AttemptError::Client);
                        }
                        resp.copy_within(r.head_len..filled, 0);
                        filled -= r.head_len;
                        continue;
                    }
                    ParsedResponse::Response(r) => break r,
                }
            }
            filled += self
                .read_head_more(upstream, resp, filled, &mut client.deadline, reused)
                .await?;
        };
        let body_in_buf = filled - parsed.head_len;
        let (first_body, mut left, mut chunks) = match parsed.framing {
            Framing::Empty => (0, 0u64, None),
            Framing::Length(n) => {
                let here = (body_in_buf as u64).min(n);
                (here as usize, n - here, None)
            }
            Framing::Chunked => {
                let mut tracker = ChunkedTracker::default();
                match tracker.feed(&resp[parsed.head_len..filled]) {
                    Ok(Some(end)) => (end, 0, None),
                    Ok(None) => (body_in_buf, 0, Some(tracker)),
                    Err(_) => return Err(failed(UpstreamFault::InvalidHead)),
                }
            }
            Framing::UntilClose => (body_in_buf, 0, None),
        };
        // From here on bytes reach the client: no more retries.
        if replayable {
            client.consume(head.head_len + head.content_length);
        }
        let extra = body_in_buf > first_body;
        let body = &resp[parsed.head_len..parsed.head_len + first_body];
        let sent = if parsed.pass_through {
            let head_and_body = &resp[..parsed.head_len + first_body];
            client.write_out(head_and_body, false).await
        } else {
            let mut rewritten = std::mem::take(&mut client.resp_head);
            rewritten.extend_from_slice(body);
            let sent = client.write_out(&rewritten, false).await;
            client.resp_head = rewritten;
            sent
        };
        if sent.is_err() {
            return Ok((parsed.status, false, Outcome::Close));
        }
        // Pingora's client stream buffers writes: the rest of a body may come slowly (SSE,
        // long polls), so the client gets what has arrived at once.
        let complete = left == 0 && chunks.is_none() && parsed.framing != Framing::UntilClose;
        if !complete && client.write_out(&[], true).await.is_err() {
            return Ok((parsed.status, false, Outcome::Close));
        }
        let mut clean_end = true;
        match parsed.framing {
            Framing::Empty => {}
            Framing::Length(_) => {
                while left > 0 {
                    let want = usize::try_from(left).unwrap_or(usize::MAX).min(resp.len());
                    match self.relay_some(client, upstream, &mut resp[..want]).await {
                        Some(n) => left -= n as u64,
                        None => {
                            clean_end = false;
                            break;
                        }
                    }
                }
            }
            Framing::Chunked => {
                if let Some(mut tracker) = chunks.take() {
                    loop {
                        let n = match client
                            .deadline
                            .run(self.read_timeout, upstream.read(resp))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => n,
                            _ => {
                                clean_end = false;
                                break;
                            }
                        };
                        let end = match tracker.feed(&resp[..n]) {
                            Ok(Some(end)) => Some(end),
                            Ok(None) => None,
                            Err(_) => {
                                clean_end = false;
                                break;
                            }
                        };
                        let upto = end.unwrap_or(n);
                        if client.write_out(&resp[..upto], true).await.is_err() {
                            clean_end = false;
                            break;
                        }
                        if let Some(end) = end {
                            if end < n {
                                // Bytes after the body: the backend connection is not reused.
                                let _ = client.write_out(&[], true).await;
                                return Ok((parsed.status, false, Outcome::KeepAlive));
                            }
                            break;
                        }
                    }
                }
            }
            Framing::UntilClose => loop {
                match client
                    .deadline
                    .run(self.read_timeout, upstream.read(resp))
                    .await
                {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        if client.write_out(&resp[..n], true).await.is_err() {
                            clean_end = false;
                            break;
                        }
                    }
                    _ => {
                        clean_end = false;
                        break;
                    }
                }
            },
        }
        if client.write_out(&[], true).await.is_err() {
            return Ok((parsed.status, false, Outcome::Close));
        }
        if !clean_end {
            return Ok((parsed.status, false, Outcome::Close));
        }
        let outcome = if parsed.framing == Framing::UntilClose {
            Outcome::Close
        } else {
            Outcome::KeepAlive
        };
        Ok((parsed.status, parsed.keep_alive && !extra, outcome))
    }

    /// Reads more of a backend's response head into `resp` after its first `filled` bytes
    /// (growing it up to the head limit, then the head is invalid); returns the bytes read.
    /// Both client protocols read heads this way (`h2` too).
    pub(super) async fn read_head_more(
        &self,
        upstream: &mut BackendIo,
        resp: &mut Vec<u8>,
        filled: usize,
        deadline: &mut IoDeadline,
        reused: bool,
    ) -> Result<usize, AttemptError> {
        let failed = |fault: UpstreamFault| AttemptError::Upstream { fault, reused };
        if filled == resp.len() {
            if resp.len() >= MAX_HEAD {
                return Err(failed(UpstreamFault::InvalidHead));
            }
            resp.resize(resp.len() * 2, 0);
        }
        let read = deadline.run(self.read_timeout, upstream.read(&mut resp[filled..]));
        match read.await {
            Err(_) => Err(AttemptError::Timeout),
            Ok(Err(_)) => Err(failed(UpstreamFault::Read)),
            Ok(Ok(0)) => Err(failed(UpstreamFault::Closed)),
            Ok(Ok(n)) => Ok(n),
        }
    }

    /// Copies one read of the backend's body to the client; `None` on error or timeout.
    async fn relay_some(
        &self,
        client: &mut Client,
        upstream: &mut BackendIo,
        chunk: &mut [u8],
    ) -> Option<usize> {
        let n = match client
            .deadline
            .run(self.read_timeout, upstream.read(chunk))
            .await
        {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        client.write_out(&chunk[..n], true).await.ok()?;
        Some(n)
    }
}
