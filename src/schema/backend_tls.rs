//! TLS to a backend (`tls` on a backend): the rule its fields follow wherever the value is
//! read — the config file (after its files are read), the API, a Raft entry or snapshot.
//! PEM text is checked here (it parses, the key matches the certificate), so a value that
//! would fail every handshake never enters the replicated state.

use std::net::IpAddr;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::{dns_labels, FieldError, HostPort, MAX_DOMAIN_LEN};

/// Largest `ca_pem`: a private CA or a few (the public roots come from the system when
/// `ca_pem` is absent; a full public bundle per backend would be replicated 100,000 times).
pub const MAX_CA_PEM: usize = 64 * 1024;
/// Largest client certificate chain and key.
pub const MAX_CLIENT_PEM: usize = 16 * 1024;

/// TLS to a backend, as replicated. `Hash` and `Eq` over every field: backends with the same
/// settings share one client configuration (and its session cache).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Raw")]
pub struct BackendTls {
    /// The name sent as SNI and checked against the backend's certificate; absent: the
    /// host of the backend's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// CA certificates (PEM) that sign the backend's certificate; absent: the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Check the backend's certificate (chain and name). On unless turned off.
    pub verify: bool,
    /// A client certificate chain and key (PEM) for backends that require one (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_pem: Option<String>,
    /// Speak HTTP/2 to the backend (ALPN `h2`, which the backend must select).
    pub http2: bool,
}

impl Default for BackendTls {
    fn default() -> Self {
        Self {
            server_name: None,
            ca_pem: None,
            verify: true,
            client_cert_pem: None,
            client_key_pem: None,
            http2: false,
        }
    }
}

/// The wire shape before the rule: every field optional, unknown ones refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    server_name: Option<String>,
    #[serde(default)]
    ca_pem: Option<String>,
    #[serde(default)]
    verify: Option<bool>,
    #[serde(default)]
    client_cert_pem: Option<String>,
    #[serde(default)]
    client_key_pem: Option<String>,
    #[serde(default)]
    http2: Option<bool>,
}

impl TryFrom<Raw> for BackendTls {
    type Error = FieldError;

    fn try_from(raw: Raw) -> Result<Self, FieldError> {
        BackendTls {
            server_name: raw.server_name,
            ca_pem: raw.ca_pem,
            verify: raw.verify.unwrap_or(true),
            client_cert_pem: raw.client_cert_pem,
            client_key_pem: raw.client_key_pem,
            http2: raw.http2.unwrap_or(false),
        }
        .checked()
    }
}

impl BackendTls {
    /// The value if it follows the rule; the error names the sub-field.
    pub fn checked(mut self) -> Result<Self, FieldError> {
        if let Some(name) = &self.server_name {
            self.server_name = Some(check_server_name(name)?);
        }
        if let Some(pem) = &self.ca_pem {
            ca_certificates(pem).map_err(|e| FieldError::new(format!("ca_pem: {e}")))?;
        }
        match (&self.client_cert_pem, &self.client_key_pem) {
            (None, None) => {}
            (Some(cert), Some(key)) => check_client_pair(cert, key)?,
            (Some(_), None) => {
                return Err(FieldError::new(
                    "client_cert_pem is given without client_key_pem (both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(FieldError::new(
                    "client_key_pem is given without client_cert_pem (both or neither)",
                ))
            }
        }
        Ok(self)
    }

    /// The name to send and check: `server_name`, else the address's host.
    pub fn effective_server_name<'a>(&'a self, address: &'a HostPort) -> &'a str {
        self.server_name
            .as_deref()
            .unwrap_or_else(|| host_of(address))
    }
}

/// The host part of `host:port` (an IPv6 address without its brackets).
pub fn host_of(address: &HostPort) -> &str {
    let s: &str = address;
    let host = s.rsplit_once(':').map_or(s, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A backend address as given by a user: `host:port`, or with a scheme, `https://host:port`
/// (TLS to the backend) or `http://host:port` (plain). The scheme is `Some(true)` for https,
/// `Some(false)` for http, `None` when there is none.
pub fn backend_address(raw: &str) -> Result<(HostPort, Option<bool>), FieldError> {
    use super::FieldRule;
    let (rest, tls) = if let Some(rest) = raw.strip_prefix("https://") {
        (rest, Some(true))
    } else if let Some(rest) = raw.strip_prefix("http://") {
        (rest, Some(false))
    } else {
        (raw, None)
    };
    // A trailing slash is harmless; a path is not something a backend address can carry.
    let rest = match (tls, rest.strip_suffix('/')) {
        (Some(_), Some(trimmed)) => trimmed,
        _ => rest,
    };
    if tls.is_some() && rest.contains('/') {
        return Err(FieldError::new(format!(
            "{raw:?}: a backend address has no path (use scheme://host:port)"
        )));
    }
    Ok((HostPort::parse(rest)?, tls))
}

fn check_server_name(raw: &str) -> Result<String, FieldError> {
    let bad = |why: &str| {
        Err(FieldError::new(format!(
            "server_name {raw:?} is not a DNS name or an IP address: {why}"
        )))
    };
    if raw.is_empty() {
        return bad("it is empty");
    }
    if raw.len() > MAX_DOMAIN_LEN {
        return bad("longer than 253 characters");
    }
    if raw.parse::<IpAddr>().is_ok() {
        return Ok(raw.to_string());
    }
    let name = raw.to_ascii_lowercase();
    match dns_labels(&name) {
        Ok(()) => Ok(name),
        Err(why) => bad(why),
    }
}

/// The CA certificates of a `ca_pem`: at least one, each a certificate X.509 can parse.
pub fn ca_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if pem.len() > MAX_CA_PEM {
        return Err(format!(
            "at most {MAX_CA_PEM} bytes (got {}); leave it out to use the system's CAs",
            pem.len()
        ));
    }
    let certs = pem_certificates(pem)?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    for (i, cert) in certs.iter().enumerate() {
        if x509_parser::parse_x509_certificate(cert).is_err() {
            return Err(format!("certificate {} is not valid X.509", i + 1));
        }
    }
    Ok(certs)
}

/// A client certificate chain and its key, parsed (for the handshake).
pub fn client_identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), FieldError> {
    for (field, pem) in [("client_cert_pem", cert_pem), ("client_key_pem", key_pem)] {
        if pem.len() > MAX_CLIENT_PEM {
            return Err(FieldError::new(format!(
                "{field}: at most {MAX_CLIENT_PEM} bytes (got {})",
                pem.len()
            )));
        }
    }
    let chain =
        pem_certificates(cert_pem).map_err(|e| FieldError::new(format!("client_cert_pem: {e}")))?;
    if chain.is_empty() {
        return Err(FieldError::new("client_cert_pem: no PEM certificate found"));
    }
    let key = match rustls_pemfile::private_key(&mut key_pem.as_bytes()) {
        Ok(Some(key)) => key,
        Ok(None) => return Err(FieldError::new("client_key_pem: no PEM private key found")),
        Err(e) => return Err(FieldError::new(format!("client_key_pem: invalid PEM: {e}"))),
    };
    Ok((chain, key))
}

fn check_client_pair(cert_pem: &str, key_pem: &str) -> Result<(), FieldError> {
    let (chain, key) = client_identity(cert_pem, key_pem)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| FieldError::new(format!("client_key_pem: unsupported or invalid key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain, signer)
        .keys_match()
        .map_err(|_| {
            FieldError::new("client_key_pem does not match the certificate in client_cert_pem")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::FieldRule;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn parse(json: serde_json::Value) -> Result<BackendTls, String> {
        serde_json::from_value::<BackendTls>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_verify_and_http1() {
        let t = parse(serde_json::json!({})).unwrap();
        assert_eq!(t, BackendTls::default());
        assert!(t.verify && !t.http2);
    }

    /// Table-driven: what each field refuses, and that the message names it.
    #[test]
    fn refusals_name_the_field() {
        let (cert, key) = self_signed("client.test");
        let (_, other_key) = self_signed("other.test");
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!({"server_name": ""}), "server_name"),
            (serde_json::json!({"server_name": "a b"}), "server_name"),
            (
                serde_json::json!({"server_name": "x".repeat(300)}),
                "server_name",
            ),
            (serde_json::json!({"ca_pem": "not pem"}), "ca_pem: no PEM"),
            (
                serde_json::json!({"ca_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}),
                "ca_pem: certificate 1",
            ),
            (
                serde_json::json!({"ca_pem": "x".repeat(MAX_CA_PEM + 1)}),
                "ca_pem: at most",
            ),
            (
                serde_json::json!({"client_cert_pem": cert}),
                "client_key_pem",
            ),
            (
                serde_json::json!({"client_key_pem": key}),
                "client_cert_pem",
            ),
            (
                serde_json::json!({"client_cert_pem": cert, "client_key_pem": "junk"}),
                "client_key_pem: no PEM private key",
            ),
            (
                serde_json::json!({"client_cert_pem": cert, "client_key_pem": other_key}),
                "does not match",
            ),
            (serde_json::json!({"verify": "yes"}), "invalid type"),
            (serde_json::json!({"sni": "a.test"}), "unknown field `sni`"),
        ];
        for (value, expected) in cases {
            let err = parse(value.clone()).expect_err(&value.to_string());
            assert!(err.contains(expected), "{value}: {err}");
        }
    }

    #[test]
    fn accepts_names_addresses_and_matching_pairs() {
        let (cert, key) = self_signed("client.test");
        let (ca, _) = self_signed("ca.test");
        let t = parse(serde_json::json!({
            "server_name": "API.Internal",
            "ca_pem": ca,
            "verify": false,
            "client_cert_pem": cert,
            "client_key_pem": key,
            "http2": true,
        }))
        .unwrap();
        assert_eq!(t.server_name.as_deref(), Some("api.internal"));
        assert!(!t.verify && t.http2);
        let t = parse(serde_json::json!({"server_name": "10.0.0.1"})).unwrap();
        assert_eq!(t.server_name.as_deref(), Some("10.0.0.1"));
        // A replicated value reads back as written.
        let again: BackendTls = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(again, t);
    }

    #[test]
    fn server_name_defaults_to_the_address_host() {
        let t = BackendTls::default();
        for (address, host) in [
            ("api.internal:8443", "api.internal"),
            ("10.0.0.2:443", "10.0.0.2"),
            ("[::1]:8443", "::1"),
        ] {
            let a = HostPort::parse(address).unwrap();
            assert_eq!(t.effective_server_name(&a), host);
        }
    }
}
