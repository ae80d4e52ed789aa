//! Field rules shared by the config file, the API and the replicated model.
//!
//! Each rule is a newtype that can only hold a valid value: the file (through serde), the API
//! (through [`FieldRule::parse`]) and Raft entries (serde again, on every node) all build it the
//! same way, so a value one of them accepts is exactly one the others accept. Every string and
//! list has a bound; docs/configuration.md lists them.

use std::borrow::Borrow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Deref;

use serde::{Deserialize, Serialize};

mod backend_tls;
pub use backend_tls::{backend_address, ca_certificates, client_identity, host_of, BackendTls};

/// Longest backend id and tag (a Kubernetes-like name: one DNS label's length).
pub const MAX_NAME_LEN: usize = 63;
/// Longest domain name and backend host name (RFC 1035).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest health-check path.
pub const MAX_PATH_LEN: usize = 1024;
/// Most tags one backend may carry.
pub const MAX_TAGS_PER_BACKEND: usize = 32;
/// Most domains and most backends a cluster holds (each).
pub const MAX_DOMAINS: usize = 200_000;
pub const MAX_BACKENDS: usize = 200_000;

/// Why a value breaks its field's rule. The caller adds where (file:line: field, or the
/// API's field name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FieldError(String);

impl FieldError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A string newtype that holds only values its rule accepts (normalised, e.g. lower-cased).
pub trait FieldRule: Sized {
    fn parse(raw: &str) -> Result<Self, FieldError>;
}

/// Deserializes a string through a [`FieldRule`].
pub struct RuleVisitor<T>(pub std::marker::PhantomData<T>);

impl<T: FieldRule> serde::de::Visitor<'_> for RuleVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        T::parse(v).map_err(E::custom)
    }
}

macro_rules! rule_newtype {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(into = "String")]
        pub struct $name(String);

        // A visitor rather than `try_from`: the rule's error is raised inside the value's own
        // deserializer, so toml gives it that value's span (an item of a list, not the list).
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(RuleVisitor::<$name>(std::marker::PhantomData))
            }
        }

        impl FieldRule for $name {
            fn parse(raw: &str) -> Result<Self, FieldError> {
                $check(raw).map(Self)
            }
        }
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = FieldError;
            fn try_from(s: String) -> Result<Self, FieldError> {
                <Self as FieldRule>::parse(&s)
            }
        }
        /// Test convenience: a literal that must be valid.
        #[cfg(test)]
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                <Self as FieldRule>::parse(s).unwrap_or_else(|e| panic!("test value {s:?}: {e}"))
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

rule_newtype!(
    /// A backend id: 1-63 characters of `[A-Za-z0-9._-]`, not only dots (`.` and `..` are
    /// path segments clients normalise away). Case is kept.
    BackendId,
    check_name_id
);
rule_newtype!(
    /// A backend tag: the same rule as a backend id.
    Tag,
    check_name_tag
);
rule_newtype!(
    /// A domain (virtual host): a lower-cased DNS name of at most 253 characters, with an
    /// optional leading `*.` wildcard; international names in their `xn--` form.
    DomainName,
    check_domain
);
rule_newtype!(
    /// A backend address: `host:port`, where host is an IPv4 address, a bracketed IPv6
    /// address or a DNS name, and port is 1-65535.
    HostPort,
    check_host_port
);
rule_newtype!(
    /// A health-check path: `""` (TCP connect check) or a path starting with `/`.
    HealthPath,
    check_health_path
);

/// How a domain gets its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Acme,
    Manual,
    None,
}

impl FieldRule for TlsMode {
    fn parse(raw: &str) -> Result<Self, FieldError> {
        match raw {
            "acme" => Ok(TlsMode::Acme),
            "manual" => Ok(TlsMode::Manual),
            "none" => Ok(TlsMode::None),
            other => Err(FieldError::new(format!(
                "{other:?} is not one of acme|manual|none"
            ))),
        }
    }
}

/// A backend that wants the client address before the request: the PROXY protocol header
/// sent on every new connection to it (`send_proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxyProtocol {
    V1,
    V2,
}

impl FieldRule for SendProxyProtocol {
    fn parse(raw: &str) -> Result<Self, FieldError> {
        match raw {
            "v1" => Ok(SendProxyProtocol::V1),
            "v2" => Ok(SendProxyProtocol::V2),
            other => Err(FieldError::new(format!("{other:?} is not one of v1|v2"))),
        }
    }
}

/// Most entries in a list of trusted networks (`[proxy.proxy_protocol] trusted`,
/// `[proxy] trusted_forwarders`): each connection is checked against all of them.
pub const MAX_TRUSTED_NETWORKS: usize = 64;

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), or one address (a host
/// network). Host bits must be zero, so a typo such as `10.0.0.1/8` is refused rather than
/// read as something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the network. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a
    /// dual-stack socket reports) is matched as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FieldRule for Cidr {
    fn parse(raw: &str) -> Result<Self, FieldError> {
        let bad = || {
            FieldError::new(format!(
                "{raw:?} is not a network such as 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7"
            ))
        };
        let (ip, prefix) = match raw.split_once('/') {
            Some((ip, p))
                if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 =>
            {
                (ip, Some(p.parse::<u8>().map_err(|_| bad())?))
            }
            Some(_) => return Err(bad()),
            None => (raw, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(FieldError::new(format!(
                "{raw:?}: the prefix length must be at most {max}"
            )));
        }
        let cidr = Cidr { net, prefix };
        if !cidr.contains(net) || net.to_canonical() != net {
            return Err(FieldError::new(format!(
                "{raw:?} has host bits set: write the network address (e.g. 10.0.0.0/8)"
            )));
        }
        Ok(cidr)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(RuleVisitor::<Cidr>(std::marker::PhantomData))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// A backend's tags: at most [`MAX_TAGS_PER_BACKEND`], duplicates dropped (first kept).
/// Linear: a set, not a scan per tag.
pub fn tag_list(raw: Vec<Tag>) -> Result<Vec<Tag>, FieldError> {
    if raw.len() > MAX_TAGS_PER_BACKEND {
        return Err(FieldError::new(format!(
            "{} tags given, at most {MAX_TAGS_PER_BACKEND} are allowed",
            raw.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(raw.len());
    Ok(raw
        .into_iter()
        .filter(|t| seen.insert(t.0.clone()))
        .collect())
}

fn check_name(raw: &str, what: &str) -> Result<String, FieldError> {
    if raw.trim().is_empty() {
        return Err(FieldError::new("must not be empty"));
    }
    if raw.len() > MAX_NAME_LEN {
        return Err(FieldError::new(format!(
            "invalid {what} (length {}): at most {MAX_NAME_LEN} characters",
            raw.len()
        )));
    }
    if !raw
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(FieldError::new(format!(
            "invalid {what} {raw:?}: only letters, digits, '.', '_' and '-' are allowed \
             (at most {MAX_NAME_LEN})"
        )));
    }
    if raw.chars().all(|c| c == '.') {
        return Err(FieldError::new(format!(
            "invalid {what} {raw:?}: must contain a letter, digit, '_' or '-'"
        )));
    }
    Ok(raw.to_string())
}

fn check_name_id(raw: &str) -> Result<String, FieldError> {
    check_name(raw, "backend id")
}

fn check_name_tag(raw: &str) -> Result<String, FieldError> {
    check_name(raw, "tag")
}

/// Checks the labels of a DNS name (no wildcard, no trailing dot). `Err` is the reason.
fn dns_labels(name: &str) -> Result<(), &'static str> {
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.contains('*') {
            return Err("a wildcard is only allowed as a leading \"*.\"");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(
                "only letters, digits, '-' and '.' are allowed (use the xn-- form for \
                 international names)",
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label must not start or end with '-'");
        }
    }
    // RFC 3696 §2: a top-level label is never all-numeric, so "1.2.3.4" is an address.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err("the last label is all digits (an IP address is not a domain name)");
    }
    if name.split('.').any(|l| l.starts_with("xn--")) {
        let (_, result) = idna::domain_to_unicode(name);
        if result.is_err() {
            return Err("an xn-- label is not valid punycode");
        }
    }
    Ok(())
}

fn check_domain(raw: &str) -> Result<String, FieldError> {
    let d = raw.to_ascii_lowercase();
    let bad = |why: &str| Err(FieldError::new(format!("invalid domain {raw:?}: {why}")));
    if d.is_empty() {
        return bad("must not be empty");
    }
    if d.len() > MAX_DOMAIN_LEN {
        return bad("longer than 253 characters");
    }
    if d.ends_with('.') {
        return bad("remove the trailing '.'");
    }
    match dns_labels(d.strip_prefix("*.").unwrap_or(&d)) {
        Ok(()) => Ok(d),
        Err(why) => bad(why),
    }
}

fn check_host_port(s: &str) -> Result<String, FieldError> {
    let bad = |why: String| Err(FieldError::new(format!("{s:?} is not host:port: {why}")));
    if s.is_empty() {
        return Err(FieldError::new("must not be empty (expected host:port)"));
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        let suggestion = rest.split('/').next().unwrap_or(rest);
        return bad(format!(
            "remove the scheme \"{scheme}://\" (use {suggestion:?})"
        ));
    }
    if s.chars().any(char::is_whitespace) {
        return bad("it contains whitespace".into());
    }
    let port = if let Some(rest) = s.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return bad("missing ']' after the IPv6 address".into());
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return bad(format!("{host:?} is not an IPv6 address"));
        }
        match after.strip_prefix(':') {
            Some(p) => p,
            None => return bad("missing :port".into()),
        }
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return bad("missing :port (e.g. 127.0.0.1:3001)".into());
        };
        if host.contains(':') {
            return bad("put an IPv6 address in brackets, e.g. [::1]:3001".into());
        }
        if host.is_empty() {
            return bad("the host is empty".into());
        }
        if host.len() > MAX_DOMAIN_LEN {
            return bad(format!(
                "the host is longer than {MAX_DOMAIN_LEN} characters"
            ));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        {
            return bad(format!(
                "invalid character in host {host:?} (letters, digits, '-' and '.'; an \
                 underscore is not valid in a host name)"
            ));
        }
        let numeric = host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()));
        if numeric {
            if host.parse::<Ipv4Addr>().is_err() {
                return bad(format!("{host:?} is not an IPv4 address"));
            }
        } else if let Err(why) = dns_labels(host) {
            return bad(format!("host {host:?}: {why}"));
        }
        port
    };
    let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u16>() {
        Ok(p) if digits && p >= 1 => Ok(s.to_string()),
        _ => bad(format!("port {port:?} is not in 1..=65535")),
    }
}

fn check_health_path(p: &str) -> Result<String, FieldError> {
    if p.len() > MAX_PATH_LEN {
        return Err(FieldError::new(format!(
            "a health-check path is at most {MAX_PATH_LEN} characters (got {})",
            p.len()
        )));
    }
    if p.is_empty() || (p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic())) {
        Ok(p.to_string())
    } else {
        Err(FieldError::new(format!(
            "{p:?} must be \"\" (TCP connect check) or a path starting with '/' without spaces \
             or control characters (percent-encode others)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (input, Ok(normalised) or Err(needle in the message)).
    type Case = (&'static str, Result<&'static str, &'static str>);

    fn run<T: FieldRule + Deref<Target = str> + fmt::Debug>(cases: &[Case]) {
        for (input, want) in cases {
            let got = T::parse(input);
            match (want, &got) {
                (Ok(norm), Ok(v)) => assert_eq!(&**v, *norm, "{input:?}"),
                (Err(needle), Err(e)) => {
                    assert!(
                        e.to_string().contains(needle),
                        "{input:?}: {e} lacks {needle:?}"
                    )
                }
                _ => panic!("{input:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn domains() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        let cases: Vec<Case> = vec![
            ("Example.COM", Ok("example.com")),
            ("*.example.com", Ok("*.example.com")),
            ("localhost", Ok("localhost")),
            ("xn--bcher-kva.de", Ok("xn--bcher-kva.de")),
            ("example.com.", Err("trailing")),
            ("", Err("empty")),
            ("exa mple.com", Err("only letters")),
            ("-a.com", Err("start or end")),
            ("a..com", Err("empty label")),
            ("a.*.com", Err("wildcard")),
            ("*", Err("wildcard")),
            ("bücher.de", Err("xn--")),
            ("1.2.3.4", Err("all digits")),
            ("xn--zz-.com", Err("start or end")),
            ("xn--a.com", Err("punycode")),
            (
                Box::leak(long_label.into_boxed_str()),
                Err("longer than 63"),
            ),
            (Box::leak(long_name.into_boxed_str()), Err("253")),
        ];
        run::<DomainName>(&cases);
    }

    #[test]
    fn host_ports() {
        let long_host = format!("{}:80", vec!["a".repeat(60); 5].join("."));
        let cases: Vec<Case> = vec![
            ("127.0.0.1:3001", Ok("127.0.0.1:3001")),
            ("localhost:80", Ok("localhost:80")),
            ("[::1]:80", Ok("[::1]:80")),
            ("web-1.internal:65535", Ok("web-1.internal:65535")),
            ("http://x:1", Err("remove the scheme")),
            ("not-an-address", Err("missing :port")),
            ("host:0", Err("1..=65535")),
            ("host:70000", Err("1..=65535")),
            ("127.0.0.1:+80", Err("1..=65535")),
            (":80", Err("host is empty")),
            ("..:80", Err("empty label")),
            ("-:80", Err("start or end")),
            ("a..b:80", Err("empty label")),
            ("999.999.999.999:80", Err("not an IPv4")),
            ("1.2.3:80", Err("not an IPv4")),
            ("my_host:80", Err("underscore")),
            ("[zz]:1", Err("not an IPv6")),
            ("::1:80", Err("brackets")),
            (
                Box::leak(long_host.into_boxed_str()),
                Err("longer than 253"),
            ),
            ("", Err("must not be empty")),
        ];
        run::<HostPort>(&cases);
    }

    #[test]
    fn ids_and_tags() {
        let long = "a".repeat(64);
        let max = "a".repeat(63);
        let cases: Vec<Case> = vec![
            ("web-v1", Ok("web-v1")),
            ("Web_V1.2", Ok("Web_V1.2")),
            (
                Box::leak(max.into_boxed_str()),
                Ok(Box::leak("a".repeat(63).into_boxed_str())),
            ),
            (Box::leak(long.into_boxed_str()), Err("at most 63")),
            ("a/b", Err("only letters")),
            ("a b", Err("only letters")),
            ("", Err("must not be empty")),
            (" ", Err("must not be empty")),
            (".", Err("must contain")),
            ("..", Err("must contain")),
        ];
        run::<BackendId>(&cases);
        run::<Tag>(&cases);
    }

    #[test]
    fn health_paths() {
        let cases: Vec<Case> = vec![
            ("", Ok("")),
            ("/h", Ok("/h")),
            ("h", Err("starting with '/'")),
            ("/a b", Err("without spaces")),
            ("/a\u{7}", Err("control")),
        ];
        run::<HealthPath>(&cases);
        assert!(HealthPath::parse(&format!("/{}", "a".repeat(MAX_PATH_LEN))).is_err());
    }

    #[test]
    fn tag_lists_are_bounded_and_deduplicated_in_linear_time() {
        let t = |s: &str| Tag::parse(s).unwrap();
        assert_eq!(
            tag_list(vec![t("a"), t("b"), t("a")]).unwrap(),
            vec![t("a"), t("b")]
        );
        let many: Vec<Tag> = (0..=MAX_TAGS_PER_BACKEND)
            .map(|i| t(&format!("t{i}")))
            .collect();
        assert!(tag_list(many)
            .unwrap_err()
            .to_string()
            .contains("at most 32"));
    }

    #[test]
    fn serde_goes_through_the_rule() {
        assert!(serde_json::from_str::<BackendId>("\"..\"").is_err());
        assert_eq!(
            serde_json::from_str::<DomainName>("\"A.com\"").unwrap(),
            "a.com"
        );
        assert_eq!(
            serde_json::to_string(&Tag::parse("blue").unwrap()).unwrap(),
            "\"blue\""
        );
    }
    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (net, inside, outside) in [
            ("10.0.0.0/8", "10.255.0.1", "11.0.0.1"),
            ("192.0.2.7", "192.0.2.7", "192.0.2.8"),
            ("0.0.0.0/0", "203.0.113.9", "::1"),
            ("2001:db8::/32", "2001:db8:ffff::1", "2001:db9::1"),
            ("::/0", "::1", "10.0.0.1"),
            ("10.0.0.0/8", "::ffff:10.1.2.3", "::ffff:11.1.2.3"),
            ("::1", "::1", "::2"),
        ] {
            let c = Cidr::parse(net).unwrap();
            assert!(c.contains(ip(inside)), "{net} holds {inside}");
            assert!(!c.contains(ip(outside)), "{net} does not hold {outside}");
        }
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "example.com",
            "",
            "10.0.0.0/8/8",
            "::ffff:10.0.0.0/104",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} refused");
        }
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(SendProxyProtocol::parse("v2"), Ok(SendProxyProtocol::V2));
        assert!(SendProxyProtocol::parse("V2").is_err());
    }
}
