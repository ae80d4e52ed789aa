//! Field rules shared by the config file and the API, so both accept exactly the same values.
//! Each function returns the normalised value or a message that says what is wrong.

use std::net::Ipv6Addr;

/// `host:port` where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn host_port(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty (expected host:port)".to_string());
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        let suggestion = rest.split('/').next().unwrap_or(rest);
        return Err(format!(
            "{s:?} is not host:port: remove the scheme \"{scheme}://\" (use {suggestion:?})"
        ));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("{s:?} is not host:port: it contains whitespace"));
    }
    let port = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?} is not host:port: missing ']' after the IPv6 address"))?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| format!("{s:?} is not host:port: {host:?} is not an IPv6 address"))?;
        after
            .strip_prefix(':')
            .ok_or_else(|| format!("{s:?} is not host:port: missing :port"))?
    } else {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| {
            format!("{s:?} is not host:port: missing :port (e.g. 127.0.0.1:3001)")
        })?;
        if host.contains(':') {
            return Err(format!(
                "{s:?} is not host:port: put an IPv6 address in brackets, e.g. [::1]:3001"
            ));
        }
        if host.is_empty() {
            return Err(format!("{s:?} is not host:port: the host is empty"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!(
                "{s:?} is not host:port: invalid character in host {host:?}"
            ));
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p >= 1 => Ok(()),
        _ => Err(format!(
            "{s:?} is not host:port: port {port:?} is not in 1..=65535"
        )),
    }
}

/// Returns the lower-cased domain, or why it is not a valid DNS name.
pub fn domain_name(raw: &str) -> Result<String, String> {
    let d = raw.to_ascii_lowercase();
    let bad = |why: &str| Err(format!("invalid domain {raw:?}: {why}"));
    if d.is_empty() {
        return bad("must not be empty");
    }
    if d.len() > 253 {
        return bad("longer than 253 characters");
    }
    if d.ends_with('.') {
        return bad("remove the trailing '.'");
    }
    let rest = d.strip_prefix("*.").unwrap_or(&d);
    for label in rest.split('.') {
        if label.is_empty() {
            return bad("empty label");
        }
        if label.contains('*') {
            return bad("a wildcard is only allowed as a leading \"*.\"");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return bad(
                "only letters, digits, '-' and '.' are allowed (use the xn-- form for \
                 international names)",
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label must not start or end with '-'");
        }
    }
    Ok(d)
}

pub fn backend_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_string());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "invalid backend id {id:?}: only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// "" means a TCP connect check; anything else is an HTTP path.
pub fn health_path(p: &str) -> Result<(), String> {
    if p.is_empty() || (p.starts_with('/') && !p.chars().any(char::is_whitespace)) {
        Ok(())
    } else {
        Err(format!(
            "{p:?} must be \"\" (TCP connect check) or a path starting with '/' without spaces"
        ))
    }
}

pub fn tag(raw: &str) -> Result<(), String> {
    if raw.trim().is_empty() {
        return Err("a tag must not be empty".into());
    }
    if raw.len() > 64 || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{raw:?} must be at most 64 characters without spaces"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        assert_eq!(domain_name("Example.COM").unwrap(), "example.com");
        assert!(domain_name("example.com.").is_err());
        assert_eq!(domain_name("*.example.com").unwrap(), "*.example.com");
        assert!(domain_name("").is_err());
        assert!(domain_name("exa mple.com").is_err());
        assert!(domain_name("-a.com").is_err());
        assert!(domain_name("a..com").is_err());
        assert!(domain_name("a.*.com").is_err());
    }

    #[test]
    fn addresses() {
        assert!(host_port("127.0.0.1:3001").is_ok());
        assert!(host_port("localhost:80").is_ok());
        assert!(host_port("[::1]:80").is_ok());
        assert!(host_port("http://x:1").unwrap_err().contains("scheme"));
        assert!(host_port("not-an-address").is_err());
        assert!(host_port("host:0").is_err());
        assert!(host_port("host:70000").is_err());
        assert!(host_port(":80").is_err());
    }

    #[test]
    fn ids_tags_paths() {
        assert!(backend_id("web-v1").is_ok());
        assert!(backend_id("a/b").is_err());
        assert!(backend_id("").is_err());
        assert!(tag("a").is_ok());
        assert!(tag("").is_err());
        assert!(tag("a b").is_err());
        assert!(health_path("").is_ok());
        assert!(health_path("/h").is_ok());
        assert!(health_path("h").is_err());
    }
}
