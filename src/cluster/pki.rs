//! The cluster's certificates: the CA (derived from the cluster secret, or the operator's CA
//! files) and the node certificates it issues. A node certificate names exactly one node id, as
//! the DNS name `node-<id>.pingora-vhost.internal`, and serves both ends of a connection
//! (server and client authentication). Pure: no file or network I/O (`tls.rs` reads files and
//! builds the rustls configurations).
//!
//! The automatic CA: its Ed25519 key is the HKDF seed `keyring` derives from the cluster secret
//! and id, and its certificate is built the same way on every node (fixed name, serial and
//! validity), so every node holding the secret trusts the same CA and can issue its own
//! certificate: nothing is generated at bootstrap, nothing is distributed.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ED25519,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use super::NodeId;

/// Node names are `node-<id>.` + this (a reserved private name: it never resolves anywhere).
pub const NODE_NAME_DOMAIN: &str = "pingora-vhost.internal";
/// Lifetime of a certificate a node issues for itself.
pub const NODE_CERT_DAYS: i64 = 30;
/// A node certificate starts this long before its issue time (clocks a little apart).
const BACKDATE: Duration = Duration::hours(1);

/// The DNS name a node certificate carries for `id`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.{NODE_NAME_DOMAIN}")
}

/// The node id a certificate name stands for (`node_name`'s inverse).
pub fn node_id_of_name(name: &str) -> Option<NodeId> {
    let id = name
        .strip_prefix("node-")?
        .strip_suffix(NODE_NAME_DOMAIN)?
        .strip_suffix('.')?;
    // Digits only (no sign, no leading "+"), so one id has one name.
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("not a PEM certificate")]
    NoCertificate,
    #[error("not a certificate (DER): {0}")]
    Parse(String),
    #[error("the CA key is not the key of the CA certificate")]
    KeyMismatch,
}

/// A CA that can issue node certificates.
pub struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The certificate peers trust (the operator's own DER for a file CA).
    pub anchor: CertificateDer<'static>,
}

/// A node certificate and its key.
pub struct NodeCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// PKCS#8 v1 of an Ed25519 private key (RFC 8410): a fixed prefix, then the 32-byte seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

impl Issuer {
    /// The automatic CA of a cluster: the same on every node holding `seed`.
    pub fn derived(seed: &[u8; 32]) -> Result<Self, PkiError> {
        let pkcs8 = PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed));
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ED25519)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "pingora-vhost");
        // The key's fingerprint in the name: during a secret rollover two derived CAs are
        // trusted, and a certificate's issuer name then points at exactly one of them.
        let id = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
        dn.push(
            DnType::CommonName,
            format!(
                "pingora-vhost cluster CA {}",
                crate::keyring::hex(&id.as_ref()[..8])
            ),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // Fixed, so every node builds the same certificate (a trust anchor's dates are not
        // checked; node certificates carry their own).
        params.serial_number = Some(SerialNumber::from(1u64));
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key)?;
        let anchor = cert.der().clone();
        Ok(Self { cert, key, anchor })
    }

    /// An operator's CA: its certificate and private key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let anchor = first_cert(cert_pem)?;
        let key = KeyPair::from_pem(key_pem)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&anchor)
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        if x509.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
            return Err(PkiError::KeyMismatch);
        }
        // Re-signed only to carry the CA's name and key identifier into what it issues; the
        // operator's certificate stays the trust anchor.
        let cert = CertificateParams::from_ca_cert_der(&anchor)?.self_signed(&key)?;
        Ok(Self { cert, key, anchor })
    }

    /// A fresh key and certificate for `node_id`, valid from a little before `now` for
    /// [`NODE_CERT_DAYS`].
    pub fn issue(&self, node_id: NodeId, now: OffsetDateTime) -> Result<NodeCert, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node_name(node_id)])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("pingora-vhost node {node_id}"));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(NODE_CERT_DAYS);
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) = (
            params.not_before.unix_timestamp(),
            params.not_after.unix_timestamp(),
        );
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_before,
            not_after,
        })
    }
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or(PkiError::NoCertificate)
}

/// What a certificate (DER) says about a node: the node ids its DNS names stand for, and its
/// validity (Unix seconds).
pub struct Names {
    pub node_ids: Vec<NodeId>,
    pub not_before: i64,
    pub not_after: i64,
}

pub fn names(der: &[u8]) -> Result<Names, PkiError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let node_ids = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => node_id_of_name(d),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Names {
        node_ids,
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip_and_nothing_else_parses() {
        assert_eq!(node_name(3), "node-3.pingora-vhost.internal");
        for id in [1, 3, 99, u64::MAX] {
            assert_eq!(node_id_of_name(&node_name(id)), Some(id));
        }
        for bad in [
            "node-.pingora-vhost.internal",
            "node-+3.pingora-vhost.internal",
            "node-3.pingora-vhost.internal.evil",
            "node-3pingora-vhost.internal",
            "node-3.other.internal",
            "node-x.pingora-vhost.internal",
            "3.pingora-vhost.internal",
            "node-99999999999999999999999.pingora-vhost.internal",
        ] {
            assert_eq!(node_id_of_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_derived_ca_is_the_same_for_the_same_seed_and_issues_named_certificates() {
        let a = Issuer::derived(&[7; 32]).unwrap();
        assert_eq!(a.anchor, Issuer::derived(&[7; 32]).unwrap().anchor);
        assert_ne!(a.anchor, Issuer::derived(&[8; 32]).unwrap().anchor);
        let now = OffsetDateTime::now_utc();
        let cert = a.issue(4, now).unwrap();
        let n = names(&cert.chain[0]).unwrap();
        assert_eq!(n.node_ids, vec![4]);
        assert_eq!(n.not_after, cert.not_after);
        assert!(n.not_before < now.unix_timestamp() && n.not_after > now.unix_timestamp());
    }

    #[test]
    fn an_operator_ca_must_come_with_its_own_key() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let other = KeyPair::generate().unwrap();
        assert!(Issuer::from_pem(&ca.pem(), &key.serialize_pem()).is_ok());
        assert!(matches!(
            Issuer::from_pem(&ca.pem(), &other.serialize_pem()),
            Err(PkiError::KeyMismatch)
        ));
        assert!(matches!(
            Issuer::from_pem("no pem here", &key.serialize_pem()),
            Err(PkiError::NoCertificate)
        ));
    }
}
