//! TLS: certificate parsing, the SNI -> certificate map the data plane reads without locks,
//! and the default certificate for clients that send no (or an unknown) SNI name.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::state::{CertPair, Changes, State};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate found in the PEM chain")]
    NoCertificate,
    #[error("no private key found in the PEM key")]
    NoKey,
    #[error("invalid PEM in the certificate chain: {0}")]
    ChainPem(String),
    #[error("invalid PEM in the private key: {0}")]
    KeyPem(String),
    #[error("unsupported or invalid private key: {0}")]
    Key(String),
    #[error("the private key does not match the certificate")]
    Mismatch,
    #[error("cannot parse the leaf certificate: {0}")]
    X509(String),
}

/// Builds a rustls `CertifiedKey` from PEM chain + key, checking that they belong together.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::ChainPem(e.to_string()))?;
    let Some(leaf) = certs.first() else {
        return Err(CertError::NoCertificate);
    };
    // A leaf that does not parse is the certificate's fault, not a key mismatch.
    x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| CertError::X509(e.to_string()))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| CertError::KeyPem(e.to_string()))?
        .ok_or(CertError::NoKey)?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    let ck = CertifiedKey::new(certs, signing_key);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        // Keys whose public half cannot be extracted are accepted as-is.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err(CertError::Mismatch),
    }
}

/// Validates a PEM pair and reads the leaf's expiry and DNS names into a `CertPair`.
pub fn cert_pair(chain_pem: &str, key_pem: &str) -> Result<CertPair, CertError> {
    let ck = certified_key(chain_pem, key_pem)?;
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| CertError::X509(e.to_string()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| CertError::X509(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(CertPair {
        chain_pem: chain_pem.to_string(),
        key_pem: key_pem.to_string(),
        not_after: x509.validity().not_after.timestamp(),
        names,
    })
}

/// Issuer and serial number (hex) of the chain's first certificate, for the certs API.
pub fn leaf_details(chain_pem: &str) -> Option<(String, String)> {
    let der = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some((x509.issuer().to_string(), x509.raw_serial_as_string()))
}

/// A self-signed certificate, used as the default when none is configured.
pub fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names)?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

/// SNI name -> certificate, swapped atomically on every state change. The map is persistent
/// (`imbl`): an update copies what it touches, not every domain's entry.
pub struct CertStore {
    map: ArcSwap<imbl::HashMap<String, Arc<CertifiedKey>>>,
    default: Arc<CertifiedKey>,
    /// Parsed keys by domain, reused while the PEM is unchanged (parsing is not free).
    cache: Mutex<HashMap<String, (String, Arc<CertifiedKey>)>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("names", &self.map.load().len())
            .finish()
    }
}

impl CertStore {
    pub fn new(default: CertifiedKey) -> Self {
        Self {
            map: ArcSwap::from_pointee(imbl::HashMap::new()),
            default: Arc::new(default),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Updates the map from the replicated state: the domains named in `changes`, or all.
    pub fn publish(&self, state: &State, changes: &Changes) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut map = if changes.all {
            let keep: HashMap<String, (String, Arc<CertifiedKey>)> = std::mem::take(&mut *cache);
            *cache = keep
                .into_iter()
                .filter(|(d, _)| state.domains.get(d).is_some_and(|d| d.cert.is_some()))
                .collect();
            imbl::HashMap::new()
        } else {
            (**self.map.load()).clone()
        };
        let names: Box<dyn Iterator<Item = &str>> = if changes.all {
            Box::new(state.domains.keys().map(String::as_str))
        } else {
            Box::new(changes.domains.iter().map(String::as_str))
        };
        for name in names {
            let pair = state.domains.get(name).and_then(|d| d.cert.as_ref());
            let Some(pair) = pair else {
                map.remove(name);
                cache.remove(name);
                continue;
            };
            let ck = match cache.get(name) {
                Some((pem, ck)) if *pem == pair.chain_pem => ck.clone(),
                _ => match certified_key(&pair.chain_pem, &pair.key_pem) {
                    Ok(ck) => Arc::new(ck),
                    Err(e) => {
                        tracing::error!(domain = %name, error = %e, "stored certificate unusable; serving the default");
                        map.remove(name);
                        cache.remove(name);
                        continue;
                    }
                },
            };
            map.insert(name.to_string(), ck.clone());
            cache.insert(name.to_string(), (pair.chain_pem.clone(), ck));
        }
        self.map.store(Arc::new(map));
    }

    fn lookup(&self, name: &str) -> Arc<CertifiedKey> {
        let map = self.map.load();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ck) = map.get(&name) {
            return ck.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(ck) = map.get(&format!("*.{parent}")) {
                return ck.clone();
            }
        }
        self.default.clone()
    }
}

/// The rustls hook: picks the certificate by SNI on every handshake.
#[derive(Debug)]
pub struct SniResolver(pub Arc<CertStore>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match hello.server_name() {
            Some(name) => self.0.lookup(name),
            None => self.0.default.clone(),
        })
    }
}

/// Always the certificate held for one name, whatever the client asks for (the management
/// API's `[api] tls_domain`): the default certificate until the cluster holds one.
#[derive(Debug)]
pub struct NamedResolver {
    pub store: Arc<CertStore>,
    pub name: String,
}

impl ResolvesServerCert for NamedResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.lookup(&self.name))
    }
}

/// The TLS version of a connection, from its digest, as nginx names it.
pub fn tls_version(
    digest: Option<&pingora_core::protocols::tls::SslDigest>,
) -> Option<&'static str> {
    // Pingora's rustls digest names versions as rustls does ("TLSv1_3").
    match digest?.version.as_ref() {
        "TLSv1_3" | "TLSv1.3" => Some("TLSv1.3"),
        "TLSv1_2" | "TLSv1.2" => Some("TLSv1.2"),
        "" => None,
        _ => Some("other"),
    }
}

// The SNI name of each TLS connection being served on this worker thread, by its digest's
// address, for the access log. Pingora's digest does not carry the name, and its HTTP/2
// sessions give the proxy nothing else of the connection; a connection's requests are all
// served on the thread that accepted it (no work stealing), so a per-thread map is enough
// and needs no lock.
std::thread_local! {
    static SNI_BY_DIGEST: std::cell::RefCell<HashMap<usize, Arc<str>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// Keeps a connection's SNI name findable (`sni_of`) until dropped.
pub struct SniRegistration(usize);

impl Drop for SniRegistration {
    fn drop(&mut self) {
        SNI_BY_DIGEST.with(|m| m.borrow_mut().remove(&self.0));
    }
}

fn digest_key(digest: &pingora_core::protocols::tls::SslDigest) -> usize {
    digest as *const _ as usize
}

/// Registers the SNI name of a TLS connection (`stream`), if it sent one.
pub fn register_sni(stream: &pingora_core::protocols::Stream) -> Option<SniRegistration> {
    let digest = stream.get_ssl_digest()?;
    let name: Arc<str> = Arc::from(stream.get_ssl()?.server_name()?);
    let key = digest_key(&digest);
    SNI_BY_DIGEST.with(|m| m.borrow_mut().insert(key, name));
    Some(SniRegistration(key))
}

/// The SNI name registered for the connection with this digest.
pub fn sni_of(digest: Option<&pingora_core::protocols::tls::SslDigest>) -> Option<Arc<str>> {
    let key = digest_key(digest?);
    SNI_BY_DIGEST.with(|m| m.borrow().get(&key).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_roundtrip_and_mismatch() {
        let (c1, k1) = self_signed(&["a.test"]).unwrap();
        let (_, k2) = self_signed(&["b.test"]).unwrap();
        let p = cert_pair(&c1, &k1).unwrap();
        assert_eq!(p.names, vec!["a.test".to_string()]);
        assert!(p.not_after > 0);
        assert!(matches!(cert_pair(&c1, &k2), Err(CertError::Mismatch)));
        assert!(matches!(cert_pair("", &k1), Err(CertError::NoCertificate)));
        assert!(matches!(cert_pair(&c1, "junk"), Err(CertError::NoKey)));
    }
}
