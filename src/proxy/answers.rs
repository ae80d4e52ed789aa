//! What the proxy answers by itself, shared by both request paths (`h1` and `service`):
//! host normalisation, the plain-text error bodies and the https redirect target.

use super::table::Route;

pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Host as routed: lower-cased, without port or final dot. IPv6 literals keep their brackets.
pub fn normalize_host(raw: &str) -> String {
    let without_port = if raw.starts_with('[') {
        match raw.split_once(']') {
            Some((inside, _)) => &raw[..inside.len() + 1],
            None => raw,
        }
    } else {
        raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw)
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

pub fn no_virtual_host(host: &str) -> String {
    format!("404 Not Found: no virtual host is configured for {host:?}\n")
}

pub fn no_healthy_backend(route: &Route) -> String {
    format!(
        "503 Service Unavailable: no healthy backend for {} (tag {:?})\n",
        route.domain, route.tag
    )
}

pub fn every_backend_failed(route: &Route) -> String {
    format!(
        "502 Bad Gateway: every backend of {} (tag {:?}) failed to connect\n",
        route.domain, route.tag
    )
}

pub fn could_not_connect(host: &str) -> String {
    format!("502 Bad Gateway: could not connect to any backend for {host}\n")
}

pub fn backend_tls_failed(host: &str, why: &str) -> String {
    format!("503 Service Unavailable: no backend for {host} could be reached over TLS ({why})\n")
}

pub fn backend_timed_out(host: &str) -> String {
    format!("504 Gateway Timeout: the backend for {host} did not answer in time\n")
}

pub fn backend_failed(host: &str, what: &str) -> String {
    format!("502 Bad Gateway: the backend for {host} failed: {what}\n")
}

/// `Location` of the http -> https redirect; the port is omitted when it is 443.
pub fn https_location(host: &str, https_port: u16, path_and_query: &str) -> String {
    match https_port {
        443 => format!("https://{host}{path_and_query}"),
        port => format!("https://{host}:{port}{path_and_query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("a.test"), "a.test");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host(""), "");
    }

    #[test]
    fn redirect_target() {
        assert_eq!(
            https_location("a.test", 443, "/x?y=1"),
            "https://a.test/x?y=1"
        );
        assert_eq!(https_location("a.test", 8443, "/"), "https://a.test:8443/");
    }
}
