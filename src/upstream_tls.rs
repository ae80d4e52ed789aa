//! TLS to backends, for both request paths and the health probes: one rustls client
//! configuration per distinct backend `tls` setting (shared, so its session cache resumes
//! sessions across new connections, as nginx's `proxy_ssl_session_reuse`), the handshake,
//! and what a failed handshake means in words an operator can act on.
//!
//! Built when the routing table is compiled (control plane), never on the hot path.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::schema::{self, BackendTls, HostPort};

/// A TLS client for one backend setting.
pub struct UpstreamTls {
    connector: TlsConnector,
    name: ServerName<'static>,
    /// Non-zero; connections are pooled by address and this id, so a connection made with one
    /// name or client certificate never carries a request meant for another.
    pub id: u64,
    /// ALPN `h2` only: the backend must speak HTTP/2.
    pub http2: bool,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("http2", &self.http2)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no system CA certificates found (give the backend a ca_pem)")]
    NoSystemRoots,
    #[error("{0}")]
    Rule(#[from] schema::FieldError),
    #[error("ca_pem: {0}")]
    Ca(String),
    #[error("invalid server name {0:?}")]
    Name(String),
    #[error("TLS client set-up failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a handshake with a backend failed, by kind (for the log, the probe's detail and the
/// metrics), never by the error's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The certificate has expired (or is not valid yet).
    Expired,
    /// The certificate is not valid for the server name.
    WrongName,
    /// No trusted CA signed the certificate.
    UnknownIssuer,
    /// The backend wants a client certificate (or refused ours).
    ClientCertificate,
    /// `http2 = true` but the backend did not select `h2`.
    NoHttp2,
    /// Timed out.
    Timeout,
    /// Anything else: a protocol error, the connection closed mid-handshake.
    Other,
    /// TLS to the backend could not be set up at all (no system CAs): no handshake was tried.
    Setup,
}

impl HandshakeFailure {
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Expired => "certificate_expired",
            HandshakeFailure::WrongName => "certificate_wrong_name",
            HandshakeFailure::UnknownIssuer => "certificate_unknown_issuer",
            HandshakeFailure::ClientCertificate => "client_certificate",
            HandshakeFailure::NoHttp2 => "no_http2",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "handshake",
            HandshakeFailure::Setup => "setup",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HandshakeFailure::Expired => {
                "the backend's certificate has expired or is not yet valid"
            }
            HandshakeFailure::WrongName => {
                "the backend's certificate is not valid for its server name"
            }
            HandshakeFailure::UnknownIssuer => {
                "the backend's certificate is not signed by a trusted CA (ca_pem)"
            }
            HandshakeFailure::ClientCertificate => {
                "the backend requires a client certificate (or refused ours)"
            }
            HandshakeFailure::NoHttp2 => "the backend did not agree to HTTP/2 (ALPN h2)",
            HandshakeFailure::Timeout => "the TLS handshake timed out",
            HandshakeFailure::Other => "the TLS handshake failed",
            HandshakeFailure::Setup => {
                "TLS to the backend could not be set up (see the node's log)"
            }
        }
    }

    fn of(e: &io::Error) -> Self {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
            return if e.kind() == io::ErrorKind::TimedOut {
                HandshakeFailure::Timeout
            } else {
                HandshakeFailure::Other
            };
        };
        match inner {
            E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })
            | E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                HandshakeFailure::Expired
            }
            E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                HandshakeFailure::WrongName
            }
            E::InvalidCertificate(C::UnknownIssuer) => HandshakeFailure::UnknownIssuer,
            // Only ALPN we offer is refused: `h2` (no client offers `http/1.1` to be refused).
            E::AlertReceived(A::NoApplicationProtocol) => HandshakeFailure::NoHttp2,
            E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA)
            | E::AlertReceived(A::CertificateUnknown | A::AccessDenied) => {
                HandshakeFailure::ClientCertificate
            }
            _ => HandshakeFailure::Other,
        }
    }
}

/// A failed handshake: its kind and the library's words.
#[derive(Debug, thiserror::Error)]
#[error("{}: {detail}", kind.describe())]
pub struct HandshakeError {
    pub kind: HandshakeFailure,
    pub detail: String,
}

impl UpstreamTls {
    /// The client for `tls` to a backend at `address`: shared with every backend of the same
    /// setting and host.
    pub fn for_backend(tls: &BackendTls, address: &HostPort) -> Result<Arc<Self>, SetupError> {
        static BUILT: LazyLock<Mutex<HashMap<u64, Weak<UpstreamTls>>>> =
            LazyLock::new(Default::default);
        let name = tls.effective_server_name(address);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (tls, name).hash(&mut h);
        let id = h.finish().max(1);
        let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = built.get(&id).and_then(Weak::upgrade) {
            return Ok(found);
        }
        let made = Arc::new(Self::build(tls, name, id)?);
        // Forget settings no backend uses any more.
        built.retain(|_, w| w.strong_count() > 0);
        built.insert(id, Arc::downgrade(&made));
        Ok(made)
    }

    fn build(tls: &BackendTls, name: &str, id: u64) -> Result<Self, SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if tls.verify {
            let roots = match &tls.ca_pem {
                Some(pem) => {
                    let mut roots = RootCertStore::empty();
                    let certs = schema::ca_certificates(pem).map_err(SetupError::Ca)?;
                    roots.add_parsable_certificates(certs);
                    Arc::new(roots)
                }
                None => system_roots()?,
            };
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        };
        let mut config = match (&tls.client_cert_pem, &tls.client_key_pem) {
            (Some(cert), Some(key)) => {
                let (chain, key) = schema::client_identity(cert, key)?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = if tls.http2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let name =
            ServerName::try_from(name.to_string()).map_err(|_| SetupError::Name(name.into()))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            id,
            http2: tls.http2,
        })
    }

    /// The TLS handshake on a connected socket (after any PROXY protocol header). The caller
    /// bounds it in time.
    pub async fn handshake(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let stream = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| HandshakeError {
                kind: match HandshakeFailure::of(&e) {
                    HandshakeFailure::NoHttp2 if !self.http2 => HandshakeFailure::Other,
                    kind => kind,
                },
                detail: e.to_string(),
            })?;
        if self.http2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(HandshakeError {
                kind: HandshakeFailure::NoHttp2,
                detail: "ALPN selected no h2".into(),
            });
        }
        Ok(stream)
    }
}

/// The system's CA certificates, read once.
fn system_roots() -> Result<Arc<RootCertStore>, SetupError> {
    static ROOTS: LazyLock<Option<Arc<RootCertStore>>> = LazyLock::new(|| {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        (!roots.is_empty()).then(|| Arc::new(roots))
    });
    ROOTS.clone().ok_or(SetupError::NoSystemRoots)
}

/// `verify = false`: any certificate is taken (the handshake's signatures still are checked,
/// so the connection is encrypted to whoever holds the key). As nginx's default
/// `proxy_ssl_verify off`; here it must be asked for.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::FieldRule;

    #[test]
    fn one_client_per_setting_and_host() {
        let a = HostPort::parse("api.internal:8443").unwrap();
        let b = HostPort::parse("other.internal:8443").unwrap();
        let tls = BackendTls {
            verify: false,
            ..BackendTls::default()
        };
        let x = UpstreamTls::for_backend(&tls, &a).unwrap();
        let y = UpstreamTls::for_backend(&tls, &a).unwrap();
        let z = UpstreamTls::for_backend(&tls, &b).unwrap();
        assert!(Arc::ptr_eq(&x, &y));
        assert_ne!(x.id, z.id);
        let h2 = BackendTls {
            http2: true,
            ..tls.clone()
        };
        assert_ne!(UpstreamTls::for_backend(&h2, &a).unwrap().id, x.id);
    }

    #[test]
    fn failures_are_classified_by_kind() {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        let io = |e: E| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                io(E::InvalidCertificate(C::Expired)),
                HandshakeFailure::Expired,
            ),
            (
                io(E::InvalidCertificate(C::NotValidForName)),
                HandshakeFailure::WrongName,
            ),
            (
                io(E::InvalidCertificate(C::UnknownIssuer)),
                HandshakeFailure::UnknownIssuer,
            ),
            (
                io(E::AlertReceived(A::CertificateRequired)),
                HandshakeFailure::ClientCertificate,
            ),
            (
                io(E::AlertReceived(A::HandshakeFailure)),
                HandshakeFailure::Other,
            ),
            (
                io(E::AlertReceived(A::NoApplicationProtocol)),
                HandshakeFailure::NoHttp2,
            ),
            (
                io::Error::from(io::ErrorKind::TimedOut),
                HandshakeFailure::Timeout,
            ),
            (
                io::Error::from(io::ErrorKind::UnexpectedEof),
                HandshakeFailure::Other,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(HandshakeFailure::of(&e), kind, "{e}");
        }
    }
}
