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
