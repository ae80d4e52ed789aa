//! chitchat's UDP transport, with every datagram sealed (ChaCha20-Poly1305, key derived from
//! the cluster secret) and replays refused.
//!
//! chitchat keeps its wire codec private, so this wraps its own `UdpSocket` rather than
//! re-implementing the codec: the inner chitchat socket listens on an ephemeral loopback port
//! and talks only to a "shim" socket of ours. To send, chitchat encodes the envelope to the
//! shim; we seal those bytes and send them from the public socket. To receive, we open a
//! datagram from the public socket and hand the plaintext to the inner socket, which decodes
//! it; we report the real sender's address to chitchat.
//!
//! Sealed datagram: `"PVG1"` | 12-byte random nonce | AEAD(sender node id u64 | sent at (Unix
//! ms) u64 | message id u32 | fragment index u8 | fragment count u8 | payload) with the magic
//! as associated data. A chitchat datagram may already be the largest UDP payload, so one
//! that does not fit with the seal's 54 bytes is sent as two sealed fragments and put back
//! together on receipt. Replays: the (sent at, nonce) pairs of each sender are remembered for
//! the clock window (`keyring::ReplayGuard`); older or repeated datagrams are dropped.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use chitchat::ChitchatEnvelope;

use crate::clock;
use crate::keyring::{Keyring, ReplayGuard, Stale, GOSSIP_TAG_LEN};
use crate::observability::Metrics;

const MAGIC: &[u8; 4] = b"PVG1";
const NONCE_LEN: usize = 12;
/// sender u64, sent at u64, message id u32, fragment index u8, fragment count u8.
const INNER_HEADER_LEN: usize = 8 + 8 + 4 + 1 + 1;
/// Bytes a seal adds to a payload.
pub const SEAL_OVERHEAD: usize = MAGIC.len() + NONCE_LEN + INNER_HEADER_LEN + GOSSIP_TAG_LEN;
/// The largest UDP payload over IPv4 (chitchat's own limit for a datagram).
const MAX_DATAGRAM: usize = 65_507;
/// Payload bytes per sealed datagram.
const MAX_FRAGMENT: usize = MAX_DATAGRAM - SEAL_OVERHEAD;
/// A chitchat datagram (≤ [`MAX_DATAGRAM`]) never needs more.
const MAX_FRAGMENTS: u8 = 2;
/// Partly received messages kept, and for how long.
const MAX_PARTIAL: usize = 32;
const PARTIAL_TTL: Duration = Duration::from_secs(2);
/// Replay memory: senders (real nodes and their restarts) and pairs per sender within the
/// clock window (a node sends a few datagrams a second to each peer).
const MAX_SENDERS: usize = 64;
const PAIRS_PER_SENDER: usize = 4096;

/// chitchat `Transport` that seals what chitchat's `UdpTransport` would send in clear.
pub struct SealedTransport {
    pub keys: Arc<Keyring>,
    pub node_id: u64,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let inner = UdpSocket::open(loopback).await?;
        let shim = tokio::net::UdpSocket::bind(loopback)
            .await
            .context("binding the gossip codec's loopback socket")?;
        Ok(Box::new(SealedSocket {
            inner_addr: inner.local_addr()?,
            shim_addr: shim.local_addr()?,
            outer,
            inner,
            shim,
            keys: self.keys.clone(),
            node_id: self.node_id,
            metrics: self.metrics.clone(),
            guard: ReplayGuard::new(MAX_SENDERS, PAIRS_PER_SENDER),
            partial: HashMap::new(),
            next_msg_id: u32::from_be_bytes(self.keys.random::<4>()),
            buf: vec![0; MAX_DATAGRAM + 1].into_boxed_slice(),
            pending: None,
            last_warn: None,
        }))
    }
}

struct SealedSocket {
    /// The public socket on `gossip_addr`: sealed datagrams only.
    outer: tokio::net::UdpSocket,
    /// chitchat's own socket, on loopback: its codec, fed and drained through `shim`.
    inner: UdpSocket,
    shim: tokio::net::UdpSocket,
    inner_addr: SocketAddr,
    shim_addr: SocketAddr,
    keys: Arc<Keyring>,
    node_id: u64,
    metrics: Arc<Metrics>,
    guard: ReplayGuard<u64>,
    /// Fragments received of messages not complete yet, by (sender, message id).
    partial: HashMap<(u64, u32), Partial>,
    next_msg_id: u32,
    buf: Box<[u8]>,
    /// The real sender of a plaintext handed to the inner socket whose envelope was not taken
    /// yet: chitchat cancels `recv` at every gossip tick, and the next call must finish it.
    pending: Option<SocketAddr>,
    last_warn: Option<Instant>,
}

struct Partial {
    started: Instant,
    parts: Vec<Option<Vec<u8>>>,
}

/// Why a datagram was dropped (the `reason` label of `pingora_vhost_gossip_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// Not sealed at all (plain chitchat, junk).
    Unsealed,
    /// Sealed, but no accepted key opens it: forged, altered, or another secret / cluster.
    Forged,
    /// Opens, but its timestamp is outside the clock window.
    Clock,
    /// Opens, and was received before.
    Replay,
}

impl Dropped {
    fn reason(self) -> &'static str {
        match self {
            Dropped::Unsealed => "unsealed",
            Dropped::Forged => "forged",
            Dropped::Clock => "clock",
            Dropped::Replay => "replay",
        }
    }
}

fn is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        OutOfMemory | ConnectionReset | ConnectionRefused
    )
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.outer
            .local_addr()
            .context("failed to get UDP socket address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        // A send cancelled midway may have left its plaintext on the shim: not for this one.
        while self.shim.try_recv_from(&mut self.buf).is_ok() {}
        self.inner.send(self.shim_addr, envelope).await?;
        let len = loop {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(1), self.shim.recv_from(&mut self.buf))
                    .await
                    .context("gossip codec socket delivered nothing")??;
            if from == self.inner_addr {
                break n;
            }
        };
        let plain = self.buf[..len].to_vec();
        let msg_id = self.next_msg_id;
        self.next_msg_id = self.next_msg_id.wrapping_add(1);
        let chunks: Vec<&[u8]> = if plain.is_empty() {
            vec![&plain[..]]
        } else {
            plain.chunks(MAX_FRAGMENT).collect()
        };
        let count = chunks.len() as u8;
        let mut sent = 0;
        for (index, chunk) in chunks.into_iter().enumerate() {
            let datagram = self.seal(msg_id, index as u8, count, chunk);
            sent += self
                .outer
                .send_to(&datagram, to)
                .await
                .context("failed to send gossip to peer")?;
        }
        Ok(SendOutcome {
            num_bytes_sent: sent,
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if let Some(from) = self.pending {
                // chitchat drops a datagram it cannot decode: never wait long for it.
                match tokio::time::timeout(Duration::from_millis(100), self.inner.recv()).await {
                    Err(_) => self.pending = None,
                    Ok(Err(e)) => return Err(e),
                    // Only our shim may feed the codec (a local process could send to it).
                    Ok(Ok(out)) if out.from_addr != self.shim_addr => {}
                    Ok(Ok(out)) => {
                        self.pending = None;
                        return Ok(RecvOutcome {
                            from_addr: from,
                            envelope: out.envelope,
                            num_bytes_received: out.num_bytes_received,
                        });
                    }
                }
                continue;
            }
            let (n, from) = match self.outer.recv_from(&mut self.buf).await {
                Ok(r) => r,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e).context("fatal UDP recv error"),
            };
            let datagram = self.buf[..n].to_vec();
            match self.open(&datagram) {
                Ok(Some(plain)) => {
                    self.shim
                        .send_to(&plain, self.inner_addr)
                        .await
                        .context("feeding the gossip codec socket")?;
                    self.pending = Some(from);
                }
                Ok(None) => {}
                Err(drop) => {
                    self.metrics.gossip_dropped(drop.reason());
                    // One line every 10 s at most: a flood must not flood the log too.
                    if self
                        .last_warn
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                    {
                        self.last_warn = Some(Instant::now());
                        tracing::warn!(
                            from = %from,
                            reason = drop.reason(),
                            "dropped a gossip datagram (see pingora_vhost_gossip_dropped_total)"
                        );
                    }
                }
            }
        }
    }
}

impl SealedSocket {
    fn seal(&self, msg_id: u32, index: u8, count: u8, payload: &[u8]) -> Vec<u8> {
        let nonce = self.keys.random::<NONCE_LEN>();
        let mut body = Vec::with_capacity(INNER_HEADER_LEN + payload.len() + GOSSIP_TAG_LEN);
        body.extend_from_slice(&self.node_id.to_be_bytes());
        body.extend_from_slice(&clock::unix_ms().to_be_bytes());
        body.extend_from_slice(&msg_id.to_be_bytes());
        body.push(index);
        body.push(count);
        body.extend_from_slice(payload);
        self.keys.seal_gossip(nonce, MAGIC, &mut body);
        let mut datagram = Vec::with_capacity(MAGIC.len() + NONCE_LEN + body.len());
        datagram.extend_from_slice(MAGIC);
        datagram.extend_from_slice(&nonce);
        datagram.extend_from_slice(&body);
        datagram
    }

    /// The plaintext of a complete chitchat datagram, None while fragments are missing.
    fn open(&mut self, datagram: &[u8]) -> Result<Option<Vec<u8>>, Dropped> {
        if datagram.len() < SEAL_OVERHEAD || &datagram[..MAGIC.len()] != MAGIC {
            return Err(Dropped::Unsealed);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&datagram[MAGIC.len()..MAGIC.len() + NONCE_LEN]);
        let mut body = datagram[MAGIC.len() + NONCE_LEN..].to_vec();
        let (len, _) = (self.keys)
            .open_gossip(nonce, MAGIC, &mut body)
            .ok_or(Dropped::Forged)?;
        body.truncate(len);
        let field = |range: std::ops::Range<usize>| &body[range];
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(field(at..at + 8));
            u64::from_be_bytes(b)
        };
        let sender = u64_at(0);
        let sent_ms = u64_at(8);
        let mut id = [0u8; 4];
        id.copy_from_slice(field(16..20));
        let msg_id = u32::from_be_bytes(id);
        let (index, count) = (body[20], body[21]);
        // Only a key holder can have sealed a bad header: a bug, not an attack; drop it.
        if count == 0 || count > MAX_FRAGMENTS || index >= count {
            return Err(Dropped::Forged);
        }
        let mut n = [0u8; 16];
        n[..NONCE_LEN].copy_from_slice(&nonce);
        self.guard
            .check(&sender, sent_ms, u128::from_be_bytes(n), clock::unix_ms())
            .map_err(|e| match e {
                Stale::Clock => Dropped::Clock,
                Stale::Replay => Dropped::Replay,
            })?;
        let payload = body.split_off(INNER_HEADER_LEN);
        if count == 1 {
            return Ok(Some(payload));
        }
        self.partial
            .retain(|_, p| p.started.elapsed() < PARTIAL_TTL);
        if self.partial.len() >= MAX_PARTIAL && !self.partial.contains_key(&(sender, msg_id)) {
            return Ok(None);
        }
        let entry = self
            .partial
            .entry((sender, msg_id))
            .or_insert_with(|| Partial {
                started: Instant::now(),
                parts: vec![None; usize::from(count)],
            });
        if entry.parts.len() != usize::from(count) {
            return Ok(None);
        }
        entry.parts[usize::from(index)] = Some(payload);
        if entry.parts.iter().all(Option::is_some) {
            let parts = self
                .partial
                .remove(&(sender, msg_id))
                .map(|p| p.parts)
                .unwrap_or_default();
            return Ok(Some(parts.into_iter().flatten().flatten().collect()));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitchat::{ChitchatMessage, ProtocolVersion};

    fn syn(cluster_id: String) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id,
                digest: Default::default(),
            },
        }
    }

    async fn socket(secret: &str, node_id: u64, metrics: &Arc<Metrics>) -> Box<dyn Socket> {
        let t = SealedTransport {
            keys: Arc::new(Keyring::new(Some(secret), None, "c")),
            node_id,
            metrics: metrics.clone(),
        };
        t.open(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap()
    }

    fn count(metrics: &Metrics, reason: &str) -> String {
        let needle = format!("pingora_vhost_gossip_dropped_total{{reason=\"{reason}\"}} ");
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(needle.as_str()).map(str::to_string))
            .unwrap_or_else(|| "0".into())
    }

    #[tokio::test]
    async fn sealed_gossip_round_trips_in_fragments_and_drops_what_it_must() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let mut a = socket("s", 1, &metrics).await;
        let mut b = socket("s", 2, &metrics).await;
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let wire = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();

        // Near chitchat's largest datagram: does not fit with the seal, goes as two fragments.
        let big = "x".repeat(MAX_DATAGRAM - 20);
        let sent = a.send(b_addr, syn(big.clone())).await.unwrap();
        assert!(sent.num_bytes_sent > MAX_DATAGRAM, "{sent:?}");
        let got = tokio::time::timeout(Duration::from_secs(2), b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.from_addr, a_addr);
        assert_eq!(got.envelope, syn(big));

        // What crosses the wire: sealed, and the plaintext nowhere in it.
        a.send(wire.local_addr().unwrap(), syn("visible-cluster-id".into()))
            .await
            .unwrap();
        let mut buf = vec![0u8; 70_000];
        let (n, _) = wire.recv_from(&mut buf).await.unwrap();
        let datagram = buf[..n].to_vec();
        assert!(datagram.starts_with(MAGIC));
        assert!(!datagram
            .windows(b"visible-cluster-id".len())
            .any(|w| w == b"visible-cluster-id"));

        // Delivered once, replayed once, forged, unsealed, and sealed under another secret.
        wire.send_to(&datagram, b_addr).await.unwrap();
        wire.send_to(&datagram, b_addr).await.unwrap();
        let mut forged = datagram.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        wire.send_to(&forged, b_addr).await.unwrap();
        wire.send_to(b"plain chitchat", b_addr).await.unwrap();
        let mut other = socket("other", 3, &metrics).await;
        other.send(b_addr, syn("x".into())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), b.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.envelope, syn("visible-cluster-id".into()));
        // Nothing else comes through.
        assert!(tokio::time::timeout(Duration::from_millis(500), b.recv())
            .await
            .is_err());
        assert_eq!(count(&metrics, "replay"), "1");
        assert_eq!(count(&metrics, "forged"), "2");
        assert_eq!(count(&metrics, "unsealed"), "1");
    }
}
