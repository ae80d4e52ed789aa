//! Mutual TLS between nodes (docs/cluster.md "Mutual TLS between nodes"): where this node's
//! certificate and the cluster CA come from, the rustls configurations built from them (both
//! ends present a node certificate and accept only the cluster CA's), and their rotation.
//!
//! A node dials a peer by a name that carries the peer's node id ([`dial_name`]); the
//! verifier checks that the peer's certificate names exactly that id, so a node holding a
//! valid certificate for another id cannot stand in for the one Raft meant to reach.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use super::pki::{self, Issuer, PkiError};
use super::NodeId;
use crate::config::RpcTls;

/// Where the cluster CA and this node's certificate come from (`[cluster.tls]`).
#[derive(Debug, Clone)]
pub enum Source {
    /// The CA keys derived from the cluster secret (primary first, then the secondary during
    /// a rollover): the node issues its own certificate with the first.
    Derived { seeds: Vec<[u8; 32]> },
    /// The operator's CA certificate(s) and the first one's key: the node issues its own.
    CaFiles { ca_cert: PathBuf, ca_key: PathBuf },
    /// The operator's CA certificate(s), and this node's certificate and key.
    CertFiles {
        ca_cert: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("{path}: {source}")]
    Pki { path: PathBuf, source: PkiError },
    #[error("issuing this node's certificate: {0}")]
    Issue(PkiError),
    #[error("{path} names node ids {names:?}, not this node ({node_id}): a node certificate must carry the DNS name {}", pki::node_name(*node_id))]
    NotThisNode {
        path: PathBuf,
        names: Vec<NodeId>,
        node_id: NodeId,
    },
    #[error("{path} expired or is not valid yet")]
    NotValidNow { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

/// The configurations of one identity (one certificate).
pub struct Current {
    /// Grows by one with each new identity (clients built from an older one are replaced).
    pub generation: u64,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// Validity of this node's certificate, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The bytes of the files it was built from (a change is noticed by comparing).
    files: Vec<Vec<u8>>,
}

/// This node's cluster TLS: the mode and the current identity (swapped on rotation).
pub struct ClusterTls {
    pub mode: RpcTls,
    node_id: NodeId,
    source: Source,
    current: ArcSwap<Current>,
    generations: AtomicU64,
}

/// A reissued or re-read certificate is taken this often at most (and the files are compared
/// this often).
const CHECK_EVERY: Duration = Duration::from_secs(60);

impl ClusterTls {
    /// Loads (or issues) this node's certificate. Blocking: file reads and key generation.
    pub fn load(mode: RpcTls, node_id: NodeId, source: Source) -> Result<Self, TlsError> {
        let current = build(&source, node_id, 1)?;
        Ok(Self {
            mode,
            node_id,
            source,
            current: ArcSwap::from_pointee(current),
            generations: AtomicU64::new(1),
        })
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Takes a new identity when `force`d (SIGHUP), when the node's own certificate is two
    /// thirds through its life (it is reissued), or when the files changed. Blocking. On an
    /// error the current identity stays.
    fn refresh(&self, force: bool) -> Result<Option<i64>, TlsError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let cur = self.current();
        let due = now >= cur.not_before + (cur.not_after - cur.not_before) * 2 / 3;
        let changed = match &self.source {
            Source::Derived { .. } => false,
            Source::CaFiles { ca_cert, ca_key } => cur.files != read_all(&[ca_cert, ca_key])?,
            Source::CertFiles { ca_cert, cert, key } => {
                cur.files != read_all(&[ca_cert, cert, key])?
            }
        };
        if !(force || due || changed) {
            return Ok(None);
        }
        let mut next = build(&self.source, self.node_id, 0)?;
        next.generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let not_after = next.not_after;
        self.current.store(Arc::new(next));
        Ok(Some(not_after))
    }
}

/// Re-reads or reissues the certificate on SIGHUP and checks every minute whether it is due
/// (see [`ClusterTls::refresh`]). Connections already open keep their certificate; new ones
/// get the new one.
pub async fn run_rotation(tls: Arc<ClusterTls>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "cannot listen for SIGHUP ({e}); node certificates are still checked every minute"
            );
            None
        }
    };
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let force = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let t = tls.clone();
        match tokio::task::spawn_blocking(move || t.refresh(force)).await {
            Ok(Ok(Some(not_after))) => tracing::info!(
                node_id = tls.node_id,
                not_after,
                reason = if force {
                    "SIGHUP"
                } else {
                    "due or files changed"
                },
                "cluster TLS: new node certificate in use for new connections"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!("cluster TLS: keeping the current certificate: {e}"),
            Err(e) => tracing::warn!("cluster TLS: refresh task failed: {e}"),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_all(paths: &[&PathBuf]) -> Result<Vec<Vec<u8>>, TlsError> {
    paths.iter().map(|p| read(p)).collect()
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.to_path_buf(),
            what: "unreadable PEM certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate",
        });
    }
    Ok(certs)
}

fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, TlsError> {
    std::str::from_utf8(bytes).map_err(|_| TlsError::Pem {
        path: path.to_path_buf(),
        what: "not PEM text",
    })
}

/// Reads or issues the identity of `source` and builds its configurations.
fn build(source: &Source, node_id: NodeId, generation: u64) -> Result<Current, TlsError> {
    let now = time::OffsetDateTime::now_utc();
    let (anchors, chain, key, files) = match source {
        Source::Derived { seeds } => {
            let issuers = seeds
                .iter()
                .map(Issuer::derived)
                .collect::<Result<Vec<_>, _>>()
                .map_err(TlsError::Issue)?;
            let node = issuers[0].issue(node_id, now).map_err(TlsError::Issue)?;
            let anchors = issuers.into_iter().map(|i| i.anchor).collect();
            (anchors, node.chain, node.key, Vec::new())
        }
        Source::CaFiles { ca_cert, ca_key } => {
            let files = read_all(&[ca_cert, ca_key])?;
            let anchors = certs(ca_cert, &files[0])?;
            let issuer = Issuer::from_pem(utf8(ca_cert, &files[0])?, utf8(ca_key, &files[1])?)
                .map_err(|source| TlsError::Pki {
                    path: ca_key.clone(),
                    source,
                })?;
            let node = issuer.issue(node_id, now).map_err(TlsError::Issue)?;
            (anchors, node.chain, node.key, files)
        }
        Source::CertFiles { ca_cert, cert, key } => {
            let files = read_all(&[ca_cert, cert, key])?;
            let anchors = certs(ca_cert, &files[0])?;
            let chain = certs(cert, &files[1])?;
            let private = rustls_pemfile::private_key(&mut &files[2][..])
                .ok()
                .flatten()
                .ok_or_else(|| TlsError::Pem {
                    path: key.clone(),
                    what: "no private key",
                })?;
            (anchors, chain, private, files)
        }
    };
    let leaf = pki::names(&chain[0]).map_err(|e| TlsError::Pki {
        path: cert_path(source_cert(source)),
        source: e,
    })?;
    if !leaf.node_ids.contains(&node_id) || leaf.node_ids.len() != 1 {
        return Err(TlsError::NotThisNode {
            path: cert_path(source_cert(source)),
            names: leaf.node_ids,
            node_id,
        });
    }
    let unix = now.unix_timestamp();
    if !(leaf.not_before..leaf.not_after).contains(&unix) {
        return Err(TlsError::NotValidNow {
            path: cert_path(source_cert(source)),
        });
    }
    let (server, client) = configs(anchors, chain, key)?;
    Ok(Current {
        generation,
        server,
        client,
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        files,
    })
}

fn source_cert(source: &Source) -> Option<&Path> {
    match source {
        Source::CertFiles { cert, .. } => Some(cert),
        _ => None,
    }
}

fn cert_path(p: Option<&Path>) -> PathBuf {
    p.map_or_else(
        || PathBuf::from("(issued node certificate)"),
        Path::to_path_buf,
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side (a client certificate from the CA is required) and the client side (the
/// peer's certificate must come from the CA and name the id dialed) of one identity.
pub fn configs(
    anchors: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), TlsError> {
    let mut roots = RootCertStore::empty();
    for a in anchors {
        roots.add(a)?;
    }
    let roots = Arc::new(roots);
    let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    // Both ends are this program: TLS 1.3 only.
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let servers = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier { inner: servers }))
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}

/// The host name a node dials peer `id` at `ip` by: `node-<id>.ip-<hex of the address>.rpc.invalid`.
/// The verifier reads the id back (the certificate must name it); the cluster client's
/// resolver reads the address back (`.invalid` never resolves anywhere else, RFC 2606).
pub fn dial_name(id: NodeId, ip: IpAddr) -> String {
    let hex = match ip {
        IpAddr::V4(v4) => crate::keyring::hex(&v4.octets()),
        IpAddr::V6(v6) => crate::keyring::hex(&v6.octets()),
    };
    format!("node-{id}.ip-{hex}.rpc.invalid")
}

/// [`dial_name`]'s inverse.
pub fn parse_dial_name(host: &str) -> Option<(NodeId, IpAddr)> {
    let mut labels = host.strip_suffix(".rpc.invalid")?.split('.');
    let id = labels.next()?.strip_prefix("node-")?;
    let hex = labels.next()?.strip_prefix("ip-")?;
    if labels.next().is_some() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bytes = crate::keyring::unhex(hex)?;
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((id.parse().ok()?, ip))
}

/// Checks a peer's certificate: from the cluster CA (webpki), and naming the node id that was
/// dialed (taken from the dial name) instead of the name dialed.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = match server_name {
            ServerName::DnsName(d) => parse_dial_name(d.as_ref()).map(|(id, _)| id),
            _ => None,
        }
        .ok_or_else(|| {
            rustls::Error::General("a cluster peer dialed without its node id".into())
        })?;
        let expected = ServerName::try_from(pki::node_name(id))
            .map_err(|_| rustls::Error::General("node name".into()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &expected, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn dial_names_round_trip_and_nothing_else_parses() {
        let v4 = IpAddr::from(Ipv4Addr::new(10, 0, 0, 7));
        let v6 = IpAddr::from(Ipv6Addr::LOCALHOST);
        assert_eq!(dial_name(3, v4), "node-3.ip-0a000007.rpc.invalid");
        for (id, ip) in [(3, v4), (u64::MAX, v6)] {
            let name = dial_name(id, ip);
            assert!(ServerName::try_from(name.clone()).is_ok(), "{name}");
            assert_eq!(parse_dial_name(&name), Some((id, ip)));
        }
        for bad in [
            "node-3.ip-0a000007.rpc.invalid.evil",
            "node-3.ip-0a0000.rpc.invalid",
            "node-3.x.ip-0a000007.rpc.invalid",
            "node-+3.ip-0a000007.rpc.invalid",
            "3.ip-0a000007.rpc.invalid",
            "node-3.0a000007.rpc.invalid",
            "127.0.0.1",
        ] {
            assert_eq!(parse_dial_name(bad), None, "{bad}");
        }
    }

    /// What the dialing side accepts: a certificate from the cluster CA naming the id dialed;
    /// not one naming another id, not one from another CA.
    #[test]
    fn a_peer_must_present_a_certificate_of_the_cluster_ca_for_the_id_dialed() {
        let ca = Issuer::derived(&[1; 32]).unwrap();
        let other_ca = Issuer::derived(&[2; 32]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let mine = ca.issue(1, now).unwrap();
        // The client side builds (the configuration a node dials with).
        configs(vec![ca.anchor.clone()], mine.chain, mine.key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.anchor.clone()).unwrap();
        let v = PeerVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap(),
        };
        let check = |cert: &pki::NodeCert, dialed: NodeId| {
            let name =
                ServerName::try_from(dial_name(dialed, IpAddr::from([127, 0, 0, 1]))).unwrap();
            v.verify_server_cert(&cert.chain[0], &[], &name, &[], UnixTime::now())
        };
        let peer2 = ca.issue(2, now).unwrap();
        assert!(check(&peer2, 2).is_ok());
        assert!(
            check(&peer2, 3).is_err(),
            "a certificate for node 2 passed as node 3"
        );
        let foreign = other_ca.issue(2, now).unwrap();
        assert!(
            check(&foreign, 2).is_err(),
            "another CA's certificate passed"
        );
        // An IP address or a plain name is never accepted as a dial name.
        let ip = ServerName::from(IpAddr::from([127, 0, 0, 1]));
        assert!(v
            .verify_server_cert(&peer2.chain[0], &[], &ip, &[], UnixTime::now())
            .is_err());
        let plain = ServerName::try_from(pki::node_name(2)).unwrap();
        assert!(v
            .verify_server_cert(&peer2.chain[0], &[], &plain, &[], UnixTime::now())
            .is_err());
    }

    /// A whole handshake in memory between the configurations of two nodes: with a common CA
    /// it completes (both ends authenticated); a server of another CA or a client without a
    /// certificate of the CA is refused.
    #[test]
    fn two_nodes_of_one_ca_complete_a_mutual_handshake_and_others_do_not() {
        use rustls::{ClientConnection, ServerConnection};
        fn handshake(
            client: Arc<ClientConfig>,
            server: Arc<ServerConfig>,
            dialed: NodeId,
        ) -> Result<(), rustls::Error> {
            let name =
                ServerName::try_from(dial_name(dialed, IpAddr::from([10, 0, 0, 2]))).unwrap();
            let mut c = ClientConnection::new(client, name)?;
            let mut s = ServerConnection::new(server)?;
            while c.is_handshaking() || s.is_handshaking() {
                let mut buf = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut buf).unwrap();
                }
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets()?;
                buf.clear();
                while s.wants_write() {
                    s.write_tls(&mut buf).unwrap();
                }
                if buf.is_empty() && c.is_handshaking() == s.is_handshaking() {
                    break;
                }
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets()?;
            }
            Ok(())
        }
        let now = time::OffsetDateTime::now_utc();
        let node = |ca: &Issuer, id| {
            let cert = ca.issue(id, now).unwrap();
            configs(vec![ca.anchor.clone()], cert.chain, cert.key).unwrap()
        };
        let (ca, other) = (
            Issuer::derived(&[1; 32]).unwrap(),
            Issuer::derived(&[2; 32]).unwrap(),
        );
        let (_, client1) = node(&ca, 1);
        let (server2, client2) = node(&ca, 2);
        let (foreign_server, foreign_client) = node(&other, 2);
        let started = std::time::Instant::now();
        for _ in 0..10 {
            handshake(client1.clone(), server2.clone(), 2).unwrap();
        }
        eprintln!(
            "mutual TLS 1.3 handshake in memory: {:?} each (both ends, this build)",
            started.elapsed() / 10
        );
        assert!(handshake(client1.clone(), foreign_server, 2).is_err());
        assert!(handshake(foreign_client, server2.clone(), 2).is_err());
        // The right node, dialed as another id.
        assert!(handshake(client1, server2, 3).is_err());
        let _ = client2;
    }

    /// During a secret rollover both derived CAs are trusted: a certificate of either passes.
    #[test]
    fn both_cas_of_a_rollover_are_trusted() {
        let (new, old) = (
            Issuer::derived(&[1; 32]).unwrap(),
            Issuer::derived(&[2; 32]).unwrap(),
        );
        let mut roots = RootCertStore::empty();
        roots.add(new.anchor.clone()).unwrap();
        roots.add(old.anchor.clone()).unwrap();
        let v = PeerVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap(),
        };
        let name = ServerName::try_from(dial_name(2, IpAddr::from([127, 0, 0, 1]))).unwrap();
        let now = time::OffsetDateTime::now_utc();
        for ca in [&new, &old] {
            let cert = ca.issue(2, now).unwrap();
            assert!(v
                .verify_server_cert(&cert.chain[0], &[], &name, &[], UnixTime::now())
                .is_ok());
        }
        let third = Issuer::derived(&[3; 32]).unwrap().issue(2, now).unwrap();
        assert!(v
            .verify_server_cert(&third.chain[0], &[], &name, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn a_node_refuses_a_certificate_for_another_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_pem(&ca.pem(), &ca_key.serialize_pem()).unwrap();
        let node = issuer.issue(5, time::OffsetDateTime::now_utc()).unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let cert_pem = pem_of("CERTIFICATE", &node.chain[0]);
        let key_pem = pem_of("PRIVATE KEY", node.key.secret_der());
        let source = Source::CertFiles {
            ca_cert: write("ca.crt", ca.pem()),
            cert: write("node.crt", cert_pem),
            key: write("node.key", key_pem),
        };
        let tls = ClusterTls::load(RpcTls::Required, 5, source.clone()).unwrap();
        // A key file that does not match (half-written files, a mistake): the current
        // identity stays; once the pair matches again it is taken.
        let other = issuer.issue(5, time::OffsetDateTime::now_utc()).unwrap();
        let key_path = dir.path().join("node.key");
        std::fs::write(&key_path, pem_of("PRIVATE KEY", other.key.secret_der())).unwrap();
        assert!(tls.refresh(false).is_err());
        assert_eq!(tls.current().generation, 1);
        std::fs::write(&key_path, pem_of("PRIVATE KEY", node.key.secret_der())).unwrap();
        assert!(tls.refresh(true).unwrap().is_some());
        assert_eq!(tls.current().generation, 2);
        assert!(matches!(
            ClusterTls::load(RpcTls::Required, 3, source),
            Err(TlsError::NotThisNode { .. })
        ));
        let ca_source = Source::CaFiles {
            ca_cert: write("ca2.crt", ca.pem()),
            ca_key: write("ca2.key", ca_key.serialize_pem()),
        };
        let tls = ClusterTls::load(RpcTls::Required, 3, ca_source).unwrap();
        assert_eq!(tls.current().generation, 1);
        // Not due, files unchanged: nothing; forced: a new identity.
        assert!(tls.refresh(false).unwrap().is_none());
        assert!(tls.refresh(true).unwrap().is_some());
        assert_eq!(tls.current().generation, 2);
    }

    fn pem_of(label: &str, der: &[u8]) -> String {
        use base64_encode as b64;
        let body = b64(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
