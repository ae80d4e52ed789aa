//! The HTTPS listener's TLS handshake, done by us rather than by Pingora's listener: its
//! `TlsSettings` build a rustls `ServerConfig` we cannot reach, and session tickets the whole
//! cluster can open (`tickets`) need one. The listener is a plain TCP one (`listeners`); its
//! connections are handshaken here before the HTTP paths see them.

use std::sync::Arc;
use std::time::Duration;

use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::Stream;
use rustls::server::ResolvesServerCert;
use rustls::ServerConfig;

use super::session_cache::SessionCache;
use super::tickets::Tickets;

/// Sessions kept per node for TLS 1.2 session ids, and for resumption when tickets are off.
const SESSION_CACHE: usize = 20_000;

/// aws-lc-rs for client handshakes: a resumed TLS 1.3 handshake still makes an X25519 key
/// pair and shared secret, and ring's X25519 (portable C) was 35 % of the node's CPU for new
/// connections that resume; aws-lc's (s2n-bignum assembly) halves that, and its SHA-384/512
/// and random numbers need no special CPU or system call (bench/README.md, session 14). The
/// control plane and backend connections stay on ring (fewer handshakes, nothing to gain).
///
/// The suites are aws-lc-rs's defaults with AES-128-GCM with SHA-256 first, then AES-256-GCM,
/// then ChaCha20 (for each protocol version). OpenSSL-based clients list
/// `TLS_AES_256_GCM_SHA384` first, whose key schedule hashes with SHA-384; SHA-256 runs on the
/// CPU's SHA instructions. AES-128-GCM is mandatory for every TLS 1.3 client, so each gets it;
/// a client that offers only ChaCha20 still gets ChaCha20. Go's TLS server makes the same
/// choice.
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

pub struct TlsListener {
    acceptor: Acceptor,
    /// A client that does not finish its handshake within this is dropped.
    timeout: Duration,
}

impl TlsListener {
    /// `tickets`: `None` when `[proxy] tls_session_tickets = false`.
    pub fn new(
        certs: Arc<dyn ResolvesServerCert>,
        tickets: Option<Arc<Tickets>>,
        timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(certs);
        // Our order, not the client's: AES-128-GCM with SHA-256 first (see `provider`).
        config.ignore_client_order = true;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = Arc::new(SessionCache::new(SESSION_CACHE));
        // One TLS 1.3 ticket per handshake (rustls: two), as OpenSSL sends after a
        // resumption: each costs a seal, a random nonce (a system call) and a record, and a
        // client resumes each new connection with one. A client that asks for more (RFC 9149
        // `ticket_request`) gets up to four.
        config.send_tls13_tickets = 1;
        config.max_tls13_tickets = 4;
        if let Some(tickets) = tickets {
            config.ticketer = tickets;
        }
        Ok(Self {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            timeout,
        })
    }

    /// The TLS handshake; `None` when it fails or times out (the connection is dropped, as
    /// Pingora's listener drops it).
    pub async fn handshake(&self, stream: Stream) -> Option<Stream> {
        let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        match tokio::time::timeout(self.timeout, self.acceptor.tls_handshake(*l4)).await {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::debug!("TLS handshake failed: {e}");
                None
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same suites as aws-lc-rs's defaults, only in our order.
    #[test]
    fn every_default_suite_is_kept_aes_128_gcm_first() {
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut theirs: Vec<_> = rustls::crypto::aws_lc_rs::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        theirs.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, theirs);
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
