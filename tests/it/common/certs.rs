//! Self-signed certificates for the TLS tests.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// A fresh self-signed certificate for `names`.
pub fn self_signed(names: &[&str]) -> TestCert {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed cert");
    TestCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        der: ck.cert.der().to_vec(),
    }
}

impl TestCert {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`; returns their paths.
    pub fn write_files(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        File::create(&cert)
            .and_then(|mut f| f.write_all(self.cert_pem.as_bytes()))
            .expect("write cert file");
        File::create(&key)
            .and_then(|mut f| f.write_all(self.key_pem.as_bytes()))
            .expect("write key file");
        (cert, key)
    }
}

/// A certificate authority for tests (cluster CA files, client certificates of the API).
pub struct TestCa {
    pub cert_pem: String,
    pub key_pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A fresh CA named `name`.
pub fn test_ca(name: &str) -> TestCa {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    TestCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert,
        key,
    }
}

fn owned(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

impl TestCa {
    /// A certificate for `names`, usable by a server and by a client.
    pub fn issue(&self, names: &[&str]) -> TestCert {
        let mut params = rcgen::CertificateParams::new(owned(names)).expect("params");
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params)
    }

    /// A server certificate for `names` that expired yesterday.
    pub fn issue_expired(&self, names: &[&str]) -> TestCert {
        let mut params = rcgen::CertificateParams::new(owned(names)).expect("params");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
        self.sign(params)
    }

    /// A certificate with `params` and a fresh key, signed by this CA.
    fn sign(&self, params: rcgen::CertificateParams) -> TestCert {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("issue certificate");
        TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes `<stem>.crt` and `<stem>.key` into `dir`; returns their paths.
    pub fn write_files(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        TestCert {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            der: Vec::new(),
        }
        .write_files(dir, stem)
    }

    /// The same CA as the node's library sees it (to issue node certificates in tests).
    pub fn issuer(&self) -> pingora_vhost::cluster::pki::Issuer {
        pingora_vhost::cluster::pki::Issuer::from_pem(&self.cert_pem, &self.key_pem)
            .expect("CA as issuer")
    }
}
