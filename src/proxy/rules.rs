//! The request policy, once for both request paths (`h1`, the lean HTTP/1.1 loop, and
//! `service`, Pingora's proxy): what a request gets (an ACME challenge answer, 404, the https
//! redirect, or its virtual host's pool), the wait for peers' health verdicts after a start,
//! and the limit on attempts. Each path only turns a [`Decision`] into its own wire format;
//! a new rule (a header policy, a rate limit) goes here, not into both paths.

use super::answers::{https_location, ACME_CHALLENGE_PREFIX};
use super::table::{RoutingTable, Target};
use crate::live::Live;

/// Backends one request may be tried on (connect failures, failures before an answer).
pub const MAX_ATTEMPTS: usize = 16;

/// What a request gets.
#[derive(Debug)]
pub enum Decision {
    /// An ACME HTTP-01 challenge this cluster is answering: 200 with the key authorization
    /// (every node answers: the CA may validate against any of them).
    AcmeChallenge(String),
    /// No virtual host for the name: 404.
    UnknownHost,
    /// `http_to_https` on plain HTTP: 301 to this location (ACME challenges excepted).
    Redirect(String),
    /// Proxy to the virtual host's active pool.
    Proxy(Target),
}

impl Decision {
    /// `host` is normalised (`answers::normalize_host`); `target` is the origin-form request
    /// target (path and query).
    pub fn for_request(
        table: &RoutingTable,
        host: &str,
        target: &str,
        tls: bool,
        https_port: u16,
    ) -> Decision {
        let path = target.split('?').next().unwrap_or("");
        let token = path.strip_prefix(ACME_CHALLENGE_PREFIX);
        if let Some(key_authorization) = token.and_then(|t| table.challenge(t)) {
            return Decision::AcmeChallenge(key_authorization.to_string());
        }
        let Some(route) = table.lookup(host) else {
            return Decision::UnknownHost;
        };
        if !tls && route.http_to_https && token.is_none() {
            return Decision::Redirect(https_location(host, https_port, target));
        }
        Decision::Proxy(route)
    }
}

/// Before the first pick after a start: waits until peers' health verdicts are known (a
/// gossip round, at most `live::gate::PEER_VIEW_WAIT`), rather than send a request to a
/// backend the cluster knows is down. One atomic load once the gate is open.
pub async fn await_peer_view(live: &Live) {
    if !live.peer_view.is_open() {
        live.peer_view.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Domain, State, TlsMode};

    fn table() -> RoutingTable {
        let mut s = State::default();
        for (name, redirect) in [("plain.test", false), ("secure.test", true)] {
            s.domains.insert(
                name.into(),
                Domain {
                    domain: name.into(),
                    enabled_backends_tag: "a".into(),
                    http_to_https: redirect,
                    tls: TlsMode::None,
                    access_log: true,
                    access_log_query: true,
                    cert: None,
                },
            );
        }
        s.acme.challenges.insert("tok".into(), "tok.key".into());
        super::super::table::compile(&s, &Live::default())
    }

    #[test]
    fn decisions() {
        let t = table();
        let decide = |host: &str, target: &str, tls: bool| match Decision::for_request(
            &t, host, target, tls, 8443,
        ) {
            Decision::AcmeChallenge(k) => format!("acme {k}"),
            Decision::UnknownHost => "404".to_string(),
            Decision::Redirect(l) => format!("301 {l}"),
            Decision::Proxy(r) => format!("proxy {}", r.domain),
        };
        let cases = [
            ("plain.test", "/", false, "proxy plain.test"),
            ("plain.test", "/", true, "proxy plain.test"),
            (
                "secure.test",
                "/x?y=1",
                false,
                "301 https://secure.test:8443/x?y=1",
            ),
            ("secure.test", "/x", true, "proxy secure.test"),
            ("nope.test", "/", false, "404"),
            // Challenges are answered for any host, before the redirect, and never redirected.
            (
                "nope.test",
                "/.well-known/acme-challenge/tok",
                false,
                "acme tok.key",
            ),
            (
                "secure.test",
                "/.well-known/acme-challenge/tok?x",
                false,
                "acme tok.key",
            ),
            (
                "secure.test",
                "/.well-known/acme-challenge/other",
                false,
                "proxy secure.test",
            ),
            (
                "nope.test",
                "/.well-known/acme-challenge/other",
                false,
                "404",
            ),
        ];
        for (host, target, tls, want) in cases {
            assert_eq!(decide(host, target, tls), want, "{host} {target} tls={tls}");
        }
    }
}
