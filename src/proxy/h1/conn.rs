//! The connection loop: wait for a request head, decide with the shared request policy
//! (`rules`), and answer it ourselves or forward it; keep the connection or end it.

use std::time::Instant;

use pingora_core::server::ShutdownWatch;

use super::super::answers;
use super::super::chunked::ChunkedTracker;
use super::super::deadline::{deadline_after, Spares, Timer};
use super::super::replay::RequestEnd;
use super::super::request_id::RequestId;
use super::super::rules::{self, Decision};
use super::super::strict::Refusal;
use super::super::table::{Route, RoutingTable, Target};
use super::super::tls;
use super::super::DataPlane;
use super::client::{Client, Trace};
use super::parse::{expects_continue, parse_request, Parsed, RequestHead};
use super::{Counted, End, Outcome, VhostApp, MAX_HEAD};
use crate::clock;
use crate::observability::access_log::{Protocol, Record, Text};

/// How long a connection without a request in progress stays open once shutdown begins, for
/// its client's next request (answered, then the connection closes).
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

impl VhostApp {
    pub(super) async fn serve(&self, client: &mut Client, shutdown: &ShutdownWatch) -> End {
        // Registered once per connection, not once per request: both showed up in profiles.
        let mut shutdown_rx = shutdown.clone();
        let shutdown_signal = shutdown_rx.changed();
        tokio::pin!(shutdown_signal);
        let mut idle = Timer::new(Spares::Idle, deadline_after(self.client_timeout));
        let mut served: u64 = 0;
        let mut served_at_arm: u64 = 0;
        let mut draining = false;
        loop {
            // Wait for a complete request head.
            let mut head = loop {
                if client.filled > 0 {
                    match parse_request(
                        &client.buf[..client.filled],
                        &mut client.out,
                        client.client_ip.as_deref(),
                        client.tls,
                        client.trusted_forwarder,
                        self.strict,
                        self.request_ids,
                    ) {
                        Parsed::Request(head) => break head,
                        Parsed::HandOver(reason, Some((head_len, RequestEnd::Chunked))) => {
                            if let Err(end) =
                                Box::pin(self.check_chunked_start(client, head_len)).await
                            {
                                return end;
                            }
                            return End::HandOver(reason, Some((head_len, RequestEnd::Chunked)));
                        }
                        Parsed::HandOver(reason, one) => return End::HandOver(reason, one),
                        Parsed::Refuse(refusal) => {
                            return Box::pin(self.refuse(client, refusal)).await
                        }
                        Parsed::Partial if client.filled >= MAX_HEAD => {
                            return Box::pin(self.refuse(client, Refusal::HeadTooLarge)).await
                        }
                        Parsed::Partial => {}
                    }
                }
                let read = tokio::select! {
                    biased;
                    r = client.read_more(MAX_HEAD) => r,
                    // Draining: a connection without a request gets a short while to send one
                    // (answered with `Connection: close`) rather than being closed at once, under
                    // a pooled client that may be sending on it right then: that race failed
                    // requests during restarts. A request being read just finishes.
                    _ = &mut shutdown_signal, if client.filled == 0 && !draining => {
                        draining = true;
                        served_at_arm = served;
                        idle.reset(deadline_after(DRAIN_IDLE.min(self.client_timeout)));
                        continue;
                    }
                    _ = &mut idle => {
                        // The timer is re-armed only when it fires: a connection is closed
                        // after one to two client timeouts without a request.
                        if served == served_at_arm {
                            return End::Close;
                        }
                        served_at_arm = served;
                        idle.reset(deadline_after(self.client_timeout));
                        continue;
                    }
                };
                match read {
                    Ok(n) if n > 0 => {}
                    _ if client.filled >= MAX_HEAD => {
                        return Box::pin(self.refuse(client, Refusal::HeadTooLarge)).await
                    }
                    // End of stream or error.
                    _ => return End::Close,
                }
            };
            // A pool with an HTTP/2 backend: Pingora's proxy speaks HTTP/2 upstream, this
            // loop does not. One flag test while no backend is HTTP/2.
            if self.data.routes.load().needs_http2(&head.host) {
                let end = RequestEnd::Length(head.content_length as u64);
                return End::HandOver("backend-http2", Some((head.head_len, end)));
            }
            served += 1;
            // Draining: this answer says `Connection: close`, so a pooled client does not
            // send its next request down a connection about to close.
            head.close |= *shutdown.borrow();
            client.head_request = head.head_method;
            client.request_id = head.request_id;
            let _in_flight = Counted::new(&self.data.requests_in_flight);
            let (status, outcome) = self.handle(client, &head).await;
            self.metrics.request_done(status);
            match outcome {
                // Shutdown that began during this request drains the connection (above).
                Outcome::KeepAlive if !head.close => {
                    if client.socket_to_take && !client.take_socket() {
                        return End::Close;
                    }
                }
                Outcome::KeepAlive => return End::Close,
                Outcome::Close => {
                    // Ended early (our own answer, a failure, the backend's early answer):
                    // its body may be partly unread.
                    client.linger = head.content_length > 0;
                    return End::Close;
                }
            }
        }
    }

    /// Checks the start of a chunked request body before Pingora's proxy sends the head
    /// upstream, as nginx reads it before choosing a backend: what has arrived, and at least
    /// the first chunk size line unless the client waits for `100 Continue`. A malformed one
    /// never reaches a backend. `Err` is how the connection ends instead.
    async fn check_chunked_start(&self, client: &mut Client, head_len: usize) -> Result<(), End> {
        // A size line with its extensions fits in this (nginx: its header buffers).
        const MAX_SIZE_LINE: usize = 8 * 1024;
        let waits_for_continue = expects_continue(&client.buf[..head_len]);
        let limit = head_len + MAX_SIZE_LINE;
        let mut tracker = ChunkedTracker::default();
        let mut checked = head_len;
        loop {
            match tracker.feed(&client.buf[checked..client.filled]) {
                Err(_) => {
                    let refusal = Refusal::BadRequest("malformed chunked body");
                    return Err(self.refuse(client, refusal).await);
                }
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
            }
            checked = client.filled;
            if tracker.size_line_read() || waits_for_continue {
                return Ok(());
            }
            if client.filled >= limit {
                let refusal = Refusal::BadRequest("chunk size line too long");
                return Err(self.refuse(client, refusal).await);
            }
            match tokio::time::timeout(self.client_timeout, client.read_more(limit)).await {
                Ok(Ok(n)) if n > 0 => {}
                // End of stream, an error, or a client that stalled.
                _ => return Err(End::Close),
            }
        }
    }

    /// Answers a request refused by the rules in `strict` and ends the connection (what the
    /// client still sends is read away, so our answer is not lost to a reset).
    async fn refuse(&self, client: &mut Client, refusal: Refusal) -> End {
        client.head_request = false;
        client.request_id = RequestId::NONE;
        let started = self.data.access_log.is_on().then(Instant::now);
        let sent_before = client.sent;
        let (status, _) = self
            .answer(
                client,
                refusal.status(),
                &refusal.to_string(),
                None,
                Outcome::Close,
            )
            .await;
        self.metrics.request_done(status);
        if let Some(started) = started {
            // What is known of a request refused before it was understood: who, and what
            // it got.
            let mut record = Record::new(&connection_text(client), Protocol::Http11);
            record.unix_ms = clock::coarse_unix_ms();
            record.bytes_in = client.filled as u64;
            finish_record(record, client, status, sent_before, started, &self.data);
        }
        client.linger = true;
        End::Close
    }

    /// Answers one request; returns the status sent (0 when none) and what comes next.
    async fn handle(&self, client: &mut Client, head: &RequestHead) -> (u16, Outcome) {
        // Timed always: the traffic series' latency histograms (`observability::traffic`).
        let started = Instant::now();
        let logging = self.data.access_log.is_on();
        // Read the request target (and, when the request is logged, its text) before the
        // client buffer moves on.
        let (decision, record) = {
            let target = std::str::from_utf8(&client.buf[head.target.clone()]).unwrap_or("/");
            let table = self.data.routes.load();
            let decision =
                Decision::for_request(&table, &head.host, target, client.tls, self.https_port);
            let record = logging
                .then(|| start_record(client, head, &table, &decision))
                .flatten();
            (decision, record)
        };
        client.trace = Trace {
            timing: true,
            ..Trace::default()
        };
        let sent_before = client.sent;
        let (status, outcome, route) = self.answer_decision(client, head, decision).await;
        let bytes_in = (head.head_len + head.content_length) as u64;
        if let Some(route) = &route {
            let duration_us = started.elapsed().as_micros() as u64;
            let sent = client.sent - sent_before;
            route
                .route
                .traffic
                .counters()
                .record(status, bytes_in, sent, duration_us);
        }
        if let Some(mut record) = record {
            let trace = client.trace;
            if let (Some(route), Some(i)) = (&route, trace.backend) {
                if let Some(u) = route.upstreams.get(i) {
                    record.set_backend(u.id.as_bytes(), trace.backend_addr);
                }
            }
            record.attempts = trace.attempts;
            record.upstream_connect_us = trace.connect_us;
            record.upstream_duration_us = trace.upstream_us;
            record.bytes_in = bytes_in;
            finish_record(record, client, status, sent_before, started, &self.data);
        }
        (status, outcome)
    }

    /// Turns the decision into an answer; the route comes back for the access log.
    async fn answer_decision(
        &self,
        client: &mut Client,
        head: &RequestHead,
        decision: Decision,
    ) -> (u16, Outcome, Option<Target>) {
        // An answer of ours leaves any request body unread: close unless there is none (or
        // the connection ends anyway: asked by the client, or draining).
        let own_answer_outcome = if head.content_length == 0 && !head.close {
            Outcome::KeepAlive
        } else {
            Outcome::Close
        };
        let (status, outcome) = match decision {
            Decision::AcmeChallenge(key_authorization) => {
                client.consume(head.head_len);
                self.answer(client, 200, &key_authorization, None, own_answer_outcome)
                    .await
            }
            Decision::UnknownHost => {
                client.consume(head.head_len);
                let body = answers::no_virtual_host(&head.host);
                self.answer(client, 404, &body, None, own_answer_outcome)
                    .await
            }
            Decision::Redirect(location) => {
                client.consume(head.head_len);
                self.answer(client, 301, "", Some(&location), own_answer_outcome)
                    .await
            }
            Decision::Proxy(route) => {
                rules::await_peer_view(&self.data.live).await;
                let (status, outcome) = self.forward(client, head, &route).await;
                return (status, outcome, Some(route));
            }
        };
        (status, outcome, None)
    }

    /// Sends an answer of ours (plain text, or an empty redirect).
    pub(super) async fn answer(
        &self,
        client: &mut Client,
        status: u16,
        body: &str,
        location: Option<&str>,
        outcome: Outcome,
    ) -> (u16, Outcome) {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut out = std::mem::take(&mut client.out);
        out.clear();
        out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
        if let Some(location) = location {
            out.extend_from_slice(format!("location: {location}\r\n").as_bytes());
        } else {
            out.extend_from_slice(
                b"content-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n",
            );
        }
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        if !client.request_id.is_none() {
            out.extend_from_slice(b"x-request-id: ");
            out.extend_from_slice(client.request_id.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if matches!(outcome, Outcome::Close) {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !client.head_request {
            out.extend_from_slice(body.as_bytes());
        }
        let sent = client.send(&out).await;
        client.out = out;
        match sent {
            Ok(()) => (status, outcome),
            Err(_) => (status, Outcome::Close),
        }
    }
}

/// The access log text every record of this connection has: the client and the TLS facts.
fn connection_text(client: &Client) -> Text<'_> {
    Text {
        client_ip: client.client_ip.as_deref().unwrap_or("").as_bytes(),
        sni: client.sni.as_deref().unwrap_or("").as_bytes(),
        ..Text::default()
    }
}

/// The access log record of a request, with its text copied out of the client buffer; `None`
/// when its domain's log is off.
fn start_record(
    client: &Client,
    head: &RequestHead,
    table: &RoutingTable,
    decision: &Decision,
) -> Option<Record> {
    let looked_up;
    let route: Option<&Route> = match decision {
        Decision::Proxy(target) => Some(&target.route),
        // Our answers for a known domain (the https redirect) follow its switches too.
        Decision::Redirect(_) => {
            looked_up = table.lookup(&head.host);
            looked_up.as_ref().map(|t| &*t.route)
        }
        Decision::AcmeChallenge(_) | Decision::UnknownHost => None,
    };
    if route.is_some_and(|r| !r.access_log) {
        return None;
    }
    let target = &client.buf[head.target.clone()];
    let (path, query) = match target.iter().position(|b| *b == b'?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &[][..]),
    };
    let keep_query = route.is_none_or(|r| r.access_log_query);
    let text = Text {
        method: &client.buf[head.method.clone()],
        host: head.host.as_bytes(),
        path,
        query: if keep_query { query } else { b"" },
        request_id: head.request_id.as_bytes(),
        user_agent: &client.buf[head.user_agent.clone()],
        referer: &client.buf[head.referer.clone()],
        tag: route.map_or(&b""[..], |r| r.tag.as_bytes()),
        ..connection_text(client)
    };
    let mut record = Record::new(&text, Protocol::Http11);
    record.unix_ms = clock::coarse_unix_ms();
    Some(record)
}

/// Fills in what the answer did and queues the record.
fn finish_record(
    mut record: Record,
    client: &Client,
    status: u16,
    sent_before: u64,
    started: Instant,
    data: &DataPlane,
) {
    record.status = status;
    // The address the connection settled on (a PROXY protocol header's, if any).
    record.client_port = client.client_addr.map_or(0, |a| a.port());
    record.tls_version = tls::tls_version(client.ssl.as_deref());
    record.bytes_out = client.sent - sent_before;
    record.duration_us = started.elapsed().as_micros() as u64;
    data.access_log.log(record);
}
