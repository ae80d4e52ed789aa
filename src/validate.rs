//! Field rules shared by the config file and the API, so both accept exactly the same values.
//! Each function returns the normalised value or a message that says what is wrong.

/// A DNS name (optionally a "*." wildcard), lower-cased, without a trailing dot.
pub fn domain_name(raw: &str) -> Result<String, String> {
    let name = raw.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 253 {
        return Err(format!("{raw:?} is longer than 253 characters"));
    }
    let body = name.strip_prefix("*.").unwrap_or(&name);
    for label in body.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(format!(
                "{raw:?} is not a valid domain name (labels of letters, digits and '-', separated by dots; an optional leading \"*.\")"
            ));
        }
    }
    Ok(name)
}

/// A backend address: "host:port" with a name, IPv4 or [IPv6] host and a port 1-65535.
pub fn backend_address(raw: &str) -> Result<(), String> {
    if raw.contains("://") {
        return Err(format!(
            "{raw:?} must be host:port without a scheme (e.g. \"127.0.0.1:3001\")"
        ));
    }
    let bad = || {
        format!(
            "{raw:?} is not a host:port address (e.g. \"127.0.0.1:3001\" or \"app.internal:8080\")"
        )
    };
    let (host, port) = raw.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(format!("{raw:?}: port must be between 1 and 65535"));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| bad());
    }
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_err() && domain_name(host).is_err() {
        return Err(bad());
    }
    Ok(())
}

/// Backend ids appear in URLs and metrics labels: keep them simple.
pub fn backend_id(raw: &str) -> Result<(), String> {
    if raw.is_empty() || raw.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if !raw
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "{raw:?} may contain only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
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

/// A health-check path: "" (TCP connect check) or an absolute path.
pub fn health_path(raw: &str) -> Result<(), String> {
    if raw.is_empty() || raw.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{raw:?} must start with '/' (or be \"\" for a TCP connect check)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        assert_eq!(domain_name("Example.COM.").unwrap(), "example.com");
        assert_eq!(domain_name("*.example.com").unwrap(), "*.example.com");
        assert!(domain_name("").is_err());
        assert!(domain_name("exa mple.com").is_err());
        assert!(domain_name("-a.com").is_err());
        assert!(domain_name("a..com").is_err());
        assert!(domain_name("a.*.com").is_err());
    }

    #[test]
    fn addresses() {
        assert!(backend_address("127.0.0.1:3001").is_ok());
        assert!(backend_address("localhost:80").is_ok());
        assert!(backend_address("[::1]:80").is_ok());
        assert!(backend_address("http://x:1")
            .unwrap_err()
            .contains("scheme"));
        assert!(backend_address("not-an-address").is_err());
        assert!(backend_address("host:0").is_err());
        assert!(backend_address("host:70000").is_err());
        assert!(backend_address(":80").is_err());
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
