use super::*;

fn parse(text: &str) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
    parse_str(Path::new("cfg.toml"), text)
}

fn ok(text: &str) -> Config {
    match parse(text) {
        Ok((c, w)) => {
            assert!(w.is_empty(), "unexpected warnings: {w:?}");
            c
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Asserts the error is `cfg.toml:<line>: <field>: ...<needle>...`.
fn assert_err(text: &str, line: usize, field: &str, needle: &str) {
    let msg = match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    };
    let prefix = format!("cfg.toml:{line}: {field}: ");
    assert!(
        msg.starts_with(&prefix),
        "want prefix {prefix:?}, got {msg:?}"
    );
    assert!(msg.contains(needle), "want {needle:?} in {msg:?}");
}

const SEED_EXAMPLE: &str = r#"
[proxy]
listen_addr = "0.0.0.0:443"
listen_addr_http = "0.0.0.0:80"
management_api_addr = "127.0.0.1:8080"

[lets_encrypt]
email = "admin@example.com"
staging = false
cache_dir = "/etc/pingora-ssl/certs"

[logging]
level = "info"
format = "json"  # or "text" for dev
output = "file"  # or "console"
file_path = "/var/log/pingora-proxy/proxy.log"

[metrics]
enabled = true
listen_addr = "0.0.0.0:9090"

[health_check]
interval_secs = 10
timeout_secs = 5
unhealthy_threshold = 3
healthy_threshold = 2

[[virtual_hosts]]
domain = "example.com"
enabled_backends_tag = "a"  # or "b" for AB switching
http_to_https = true

[[virtual_hosts]]
domain = "api.example.com"
enabled_backends_tag = "b"
http_to_https = true

[[backends]]
id = "web-v1"
address = "localhost:3001"
tags = ["a"]

[[backends]]
id = "web-v2"
address = "localhost:3002"
tags = ["b"]

[[backends]]
id = "api-server"
address = "192.168.1.100:8080"
tags = ["a", "b"]
"#;

#[test]
fn line_index_agrees_with_counting_newlines() {
    let text = "a = 1\n\n[b]\nc = 2\nlast";
    let starts = line_starts(text);
    for offset in 0..=text.len() {
        let by_index = starts.partition_point(|&s| s <= offset);
        assert_eq!(by_index, line_of(text, offset), "offset {offset}");
    }
}

#[test]
fn errors_deep_in_a_large_file_name_the_right_line() {
    let mut text = String::new();
    for i in 0..2_000 {
        text.push_str(&format!(
            "[[backends]]\nid = \"b{i}\"\naddress = \"127.0.0.1:{}\"\ntags = [\"t{i}\"]\n\n",
            1000 + i
        ));
    }
    let (cfg, _) = parse(&text).expect("valid");
    assert_eq!(cfg.backends.len(), 2_000);
    // Each entry is 5 lines; the duplicate's id sits on line 5 * 2000 + 2.
    text.push_str("[[backends]]\nid = \"b7\"\naddress = \"127.0.0.1:9\"\n");
    assert_err(
        &text,
        10_002,
        "backends[2000].id",
        "first defined on line 37",
    );
}

#[test]
fn seed_example_parses() {
    let c = ok(SEED_EXAMPLE);
    assert_eq!(c.proxy.listen_addr, "0.0.0.0:443".parse().unwrap());
    assert_eq!(c.logging.format, LogFormat::Json);
    assert_eq!(c.logging.output, LogOutput::File);
    assert_eq!(c.metrics.listen_addr, Some("0.0.0.0:9090".parse().unwrap()));
    assert_eq!(c.virtual_hosts.len(), 2);
    assert_eq!(c.virtual_hosts[0].tls, TlsMode::None);
    assert!(c.virtual_hosts[0].http_to_https);
    assert_eq!(c.backends[2].tags, vec!["a", "b"]);
    assert_eq!(
        c.lets_encrypt.cache_dir,
        Some(PathBuf::from("/etc/pingora-ssl/certs"))
    );
}

#[test]
fn example_file_parses_without_warnings() {
    let text = include_str!("../../config.example.toml");
    let (c, w) = match parse_str(Path::new("config.example.toml"), text) {
        Ok(r) => r,
        Err(e) => panic!("config.example.toml: {e}"),
    };
    assert!(w.is_empty(), "{w:?}");
    assert!(c.proxy.listen_addr.ip().is_loopback());
    assert!(c.proxy.listen_addr_http.ip().is_loopback());
    assert_eq!(c.api.token.as_deref(), Some("change-me"));
    assert_eq!(c.cluster.data_dir, PathBuf::from("./data/node-1"));
    assert!(c.lets_encrypt.staging);
    assert_eq!(c.health_check.path, "/health");
    assert_eq!(c.virtual_hosts.len(), 2);
    assert_eq!(c.backends.len(), 3);
}

#[test]
fn empty_file_gives_defaults() {
    let c = ok("");
    assert_eq!(c.proxy.listen_addr, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(c.proxy.listen_addr_http, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(
        c.proxy.management_api_addr,
        "127.0.0.1:9080".parse().unwrap()
    );
    assert_eq!(c.proxy.threads, 1);
    assert_eq!(c.proxy.upstream_connect_timeout_ms, 2000);
    assert_eq!(c.proxy.upstream_read_timeout_secs, 30);
    assert_eq!(c.proxy.client_timeout_secs, 60);
    assert_eq!(c.proxy.shutdown_grace_secs, 30);
    assert_eq!(c.proxy.max_body_bytes, 1 << 30);
    assert!(!c.proxy.underscores_in_headers);
    assert!(c.proxy.default_cert_path.is_none());
    assert!(c.api.token.is_none());
    assert_eq!(c.cluster.node_id, 1);
    assert_eq!(c.cluster.data_dir, PathBuf::from("./data/node-1"));
    assert_eq!(c.cluster.rpc_addr, "127.0.0.1:7101".parse().unwrap());
    assert_eq!(c.cluster.gossip_addr, "127.0.0.1:7946".parse().unwrap());
    assert!(c.cluster.seeds.is_empty());
    assert_eq!(c.cluster.bootstrap_expect, 1);
    assert!(c.cluster.secret.is_none());
    assert_eq!(c.cluster.cluster_id, "default");
    assert!(c.lets_encrypt.email.is_none());
    assert!(!c.lets_encrypt.staging);
    assert_eq!(c.logging.level, "info");
    assert_eq!(c.logging.format, LogFormat::Text);
    assert_eq!(c.logging.output, LogOutput::Console);
    assert!(c.metrics.enabled);
    assert!(c.metrics.listen_addr.is_none());
    assert_eq!(c.health_check.interval_secs, 10);
    assert_eq!(c.health_check.timeout_secs, 5);
    assert_eq!(c.health_check.unhealthy_threshold, 3);
    assert_eq!(c.health_check.healthy_threshold, 2);
    assert_eq!(c.health_check.path, "/health");
    assert_eq!(c.health_check.probers_per_backend, 2);
    assert!(c.virtual_hosts.is_empty() && c.backends.is_empty());
    assert_eq!(c.source_path, PathBuf::from("cfg.toml"));
    // Only comments and empty sections are just as valid.
    ok("# nothing here\n[proxy]\n[cluster]\n");
}

#[test]
fn data_dir_default_follows_node_id_and_relative_is_kept() {
    assert_eq!(
        ok("[cluster]\nnode_id = 3\n").cluster.data_dir,
        PathBuf::from("./data/node-3")
    );
    let c = parse_str(
        Path::new("/etc/pv/cfg.toml"),
        "[cluster]\ndata_dir = \"var/raft\"\n",
    )
    .map(|(c, _)| c);
    assert_eq!(c.ok().map(|c| c.cluster.data_dir), Some("var/raft".into()));
    assert_err(
        "[cluster]\ndata_dir = \"\"\n",
        2,
        "cluster.data_dir",
        "empty",
    );
}

#[test]
fn unknown_keys_are_errors() {
    assert_err(
        "[proxy]\nthreadz = 2\n",
        2,
        "proxy.threadz",
        "unknown field `threadz`",
    );
    assert_err(
        "\n[proxyy]\nthreads = 2\n",
        2,
        "proxyy",
        "unknown field `proxyy`",
    );
    assert_err("colour = 1\n", 1, "colour", "unknown field `colour`");
    assert_err(
        "[[virtual_hosts]]\ndomain = \"a.com\"\nenabled_backends_tag = \"a\"\n\n\
         [[virtual_hosts]]\ndomian = \"b.com\"\n",
        6,
        "virtual_hosts[1].domian",
        "unknown field `domian`",
    );
    assert_err(
        "backends = [{ id = \"x\", address = \"h:1\", tagz = [] }]\n",
        1,
        "backends[0].tagz",
        "unknown field `tagz`",
    );
}

#[test]
fn wrong_types_are_errors() {
    assert_err(
        "[proxy]\nthreads = \"two\"\n",
        2,
        "proxy.threads",
        "invalid type: string \"two\", expected an integer",
    );
    assert_err(
        "[[backends]]\nid = \"x\"\naddress = \"h:1\"\ntags = [\n  \"a\",\n  3,\n]\n",
        6,
        "backends[0].tags[1]",
        "invalid type: integer `3`",
    );
    assert_err("proxy = 3\n", 1, "proxy", "invalid type");
    assert_err(
        "[metrics]\nenabled = \"yes\"\n",
        2,
        "metrics.enabled",
        "expected a boolean",
    );
    // Dotted keys defeat the span tree; the line scan still names the key.
    assert_err(
        "proxy.threads = \"x\"\n",
        1,
        "proxy.threads",
        "expected an integer",
    );
}

#[test]
fn syntax_errors_name_the_line() {
    assert_err(
        "[proxy]\nthreads = \n",
        2,
        "proxy.threads",
        "invalid string",
    );
    let msg = parse("[proxy]\nthreads = 1\nthreads = 2\n")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.starts_with("cfg.toml:3: "), "{msg}");
    assert!(msg.contains("duplicate key `threads`"), "{msg}");
}

#[test]
fn duplicate_domain_case_insensitive() {
    let text = "\
[proxy]
threads = 1

[[backends]]
id = \"b1\"
address = \"127.0.0.1:3001\"
tags = [\"a\"]
[[virtual_hosts]]
domain = \"example.com\"
enabled_backends_tag = \"a\"
http_to_https = false

[[virtual_hosts]]
domain = \"Example.COM\"
enabled_backends_tag = \"a\"
";
    assert_err(
        text,
        14,
        "virtual_hosts[1].domain",
        "duplicate domain \"example.com\" (first defined on line 9)",
    );
}

#[test]
fn duplicate_backend_id() {
    let text = "[[backends]]\nid = \"x\"\naddress = \"h:1\"\n\
                [[backends]]\nid = \"x\"\naddress = \"h:2\"\n";
    assert_err(
        text,
        5,
        "backends[1].id",
        "duplicate backend id \"x\" (first defined on line 2)",
    );
    assert_err(
        "[[backends]]\nid = \"a b\"\naddress = \"h:1\"\n",
        2,
        "backends[0].id",
        "invalid backend id",
    );
    assert_err(
        "[[backends]]\naddress = \"h:1\"\n",
        1,
        "backends[0].id",
        "missing",
    );
    assert_err(
        "[[backends]]\nid = \"x\"\n",
        1,
        "backends[0].address",
        "missing",
    );
}

#[test]
fn bad_socket_addresses() {
    for (section, key) in [
        ("proxy", "listen_addr"),
        ("proxy", "listen_addr_http"),
        ("proxy", "management_api_addr"),
        ("cluster", "rpc_addr"),
        ("cluster", "gossip_addr"),
        ("metrics", "listen_addr"),
    ] {
        let text = format!("[{section}]\n\n{key} = \"localhost:99999\"\n");
        assert_err(
            &text,
            3,
            &format!("{section}.{key}"),
            "invalid socket address \"localhost:99999\"",
        );
    }
    assert_err(
        "[proxy]\nlisten_addr = \"localhost:8443\"\n",
        2,
        "proxy.listen_addr",
        "needs an IP",
    );
    assert!(parse("[proxy]\nlisten_addr = \"[::1]:8443\"\n").is_ok());
}

#[test]
fn listeners_must_not_share_a_port() {
    assert_err(
        "[proxy]\nmanagement_api_addr = \"127.0.0.1:8080\"\n",
        2,
        "proxy.management_api_addr",
        "clashes with proxy.listen_addr_http = 0.0.0.0:8080 (default)",
    );
    assert_err(
        "[proxy]\nlisten_addr = \"127.0.0.1:1\"\n[metrics]\nlisten_addr = \"127.0.0.1:1\"\n",
        4,
        "metrics.listen_addr",
        "clashes with proxy.listen_addr",
    );
    // gossip is UDP: same number as a TCP listener is fine.
    ok("[cluster]\ngossip_addr = \"127.0.0.1:7101\"\n");
}

fn backend_with_address(addr: &str) -> String {
    format!("[[backends]]\nid = \"x\"\naddress = \"{addr}\"\n")
}

#[test]
fn backend_addresses() {
    for good in [
        "localhost:3001",
        "10.0.0.1:80",
        "[::1]:8080",
        "web-1.internal:65535",
        "http://x:1",
        "https://x:1/",
    ] {
        assert!(parse(&backend_with_address(good)).is_ok(), "{good}");
    }
    for (bad, needle) in [
        ("ftp://x:1", "remove the scheme \"ftp://\" (use \"x:1\")"),
        ("https://x:1/api", "has no path"),
        ("x", "missing :port"),
        ("x:0", "not in 1..=65535"),
        ("x:65536", "not in 1..=65535"),
        ("x:http", "not in 1..=65535"),
        (":80", "host is empty"),
        ("my host:80", "whitespace"),
        ("::1:80", "brackets"),
        ("[::1]", "missing :port"),
        ("[zz]:1", "not an IPv6 address"),
        ("a/b:1", "invalid character"),
        // #13: an underscore is not valid in a host name (RFC 952/1123).
        ("web_1.internal:1", "underscore"),
        ("", "must not be empty"),
    ] {
        assert_err(&backend_with_address(bad), 3, "backends[0].address", needle);
    }
}

#[test]
fn backend_tls_from_the_scheme_or_a_table_of_files() {
    // The scheme alone: TLS with its defaults (verified, the system's CAs, the host as name).
    let c = ok(&backend_with_address("https://api.internal:8443"));
    assert_eq!(c.backends[0].address, "api.internal:8443");
    assert_eq!(
        c.backends[0].tls,
        Some(crate::schema::BackendTls::default())
    );
    assert_eq!(
        ok(&backend_with_address("http://api.internal:80")).backends[0].tls,
        None
    );

    let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
    let client = rcgen::generate_simple_self_signed(vec!["client.test".into()]).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    let table = |extra: &str| {
        format!(
            "[[backends]]\nid = \"x\"\naddress = \"api.internal:8443\"\n[backends.tls]\nserver_name = \"API.test\"\nca_bundle = \"ca.pem\"\n{extra}"
        )
    };
    let files = [
        ("ca.pem", ca.cert.pem()),
        ("client.crt", client.cert.pem()),
        ("client.key", client.key_pair.serialize_pem()),
        ("other.key", other.serialize_pem()),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let (_dir, r) = load_in_dir(
        &table("client_cert = \"client.crt\"\nclient_key = \"client.key\"\nhttp2 = true\n"),
        &files,
    );
    let (c, _) = r.expect("a tls table with its files");
    let tls = c.backends[0].tls.clone().expect("tls");
    assert_eq!(tls.server_name.as_deref(), Some("api.test"));
    assert_eq!(tls.ca_pem.as_deref(), Some(ca.cert.pem().as_str()));
    assert!(tls.verify && tls.http2 && tls.client_key_pem.is_some());

    // Refusals name the table and the file's field (not the API's name for it).
    for (extra, needle) in [
        (
            "client_cert = \"client.crt\"\nclient_key = \"other.key\"\n",
            "client_key does not match",
        ),
        (
            "client_cert = \"client.crt\"\n",
            "client_cert is given without client_key",
        ),
        ("client_key = \"missing.key\"\n", "file not found"),
    ] {
        let (_dir, r) = load_in_dir(&table(extra), &files);
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("backends[0].tls"), "{extra}: {msg}");
        assert!(msg.contains(needle), "{extra}: {msg}");
    }
    let (_dir, r) = load_in_dir(&table("sni = \"x\"\n"), &files);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains(":7: sni: unknown field `sni`"), "{msg}");
    let (_dir, r) = load_in_dir(
        &table("").replace("api.internal:8443", "http://api.internal:8443"),
        &files,
    );
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("http:// address"), "{msg}");
}

#[test]
fn seeds_must_be_host_port() {
    assert_err(
        "[cluster]\nsecret = \"s\"\nseeds = [\"10.0.0.2:7946\", \"node3\"]\n",
        3,
        "cluster.seeds[1]",
        "missing :port",
    );
    let c = ok("[cluster]\nsecret = \"s\"\nseeds = [\"node2:7946\", \"10.0.0.3:7946\"]\n");
    assert_eq!(c.cluster.seeds, vec!["node2:7946", "10.0.0.3:7946"]);
}

fn vhost(domain: &str) -> String {
    format!(
        "[[backends]]\nid = \"b\"\naddress = \"h:1\"\ntags = [\"a\"]\n\
         [[virtual_hosts]]\ndomain = \"{domain}\"\nenabled_backends_tag = \"a\"\n"
    )
}

#[test]
fn domains() {
    for good in ["example.com", "*.example.com", "localhost", "a-b.x1.io"] {
        assert!(parse(&vhost(good)).is_ok(), "{good}");
    }
    let c = ok(&vhost("WWW.Example.com"));
    assert_eq!(c.virtual_hosts[0].domain, "www.example.com");
    for bad in [
        "",
        "exa mple.com",
        "example..com",
        "example.com.",
        "-a.com",
        "a-.com",
        "a.*.com",
        "*",
        "ex_ample.com",
        "bücher.de",
        "http://example.com",
    ] {
        assert_err(&vhost(bad), 6, "virtual_hosts[0].domain", "");
    }
    assert_err(
        &vhost(&format!("{}.com", "a".repeat(64))),
        6,
        "virtual_hosts[0].domain",
        "longer than 63",
    );
    assert_err(
        "[[virtual_hosts]]\nenabled_backends_tag = \"a\"\n",
        1,
        "virtual_hosts[0].domain",
        "missing",
    );
}

#[test]
fn empty_tags() {
    assert_err(
        "[[virtual_hosts]]\ndomain = \"a.com\"\nenabled_backends_tag = \"\"\n",
        3,
        "virtual_hosts[0].enabled_backends_tag",
        "must not be empty",
    );
    assert_err(
        "[[virtual_hosts]]\ndomain = \"a.com\"\n",
        1,
        "virtual_hosts[0].enabled_backends_tag",
        "missing",
    );
    assert_err(
        "[[backends]]\nid = \"x\"\naddress = \"h:1\"\ntags = [\"a\", \" \"]\n",
        4,
        "backends[0].tags[1]",
        "must not be empty",
    );
}

#[test]
fn tag_without_backend_is_a_warning() {
    let text = "[[backends]]\nid = \"b\"\naddress = \"h:1\"\ntags = [\"a\"]\n\n\
                [[virtual_hosts]]\ndomain = \"x.com\"\nenabled_backends_tag = \"c\"\n";
    let (c, w) = match parse(text) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(c.virtual_hosts.len(), 1);
    assert_eq!(w.len(), 1, "{w:?}");
    let m = &w[0].message;
    assert!(
        m.starts_with("cfg.toml:8: virtual_hosts[0].enabled_backends_tag: "),
        "{m}"
    );
    assert!(
        m.contains("\"x.com\"") && m.contains("\"c\"") && m.contains("line 8"),
        "{m}"
    );
}

#[test]
fn tls_modes() {
    let with = |extra: &str| {
        format!(
            "[[virtual_hosts]]\ndomain = \"a.com\"\nenabled_backends_tag = \"a\"\n{extra}\
             [[backends]]\nid = \"b\"\naddress = \"h:1\"\ntags = [\"a\"]\n"
        )
    };
    ok(&with(""));
    assert_err(
        &with("tls = \"manual\"\n"),
        4,
        "virtual_hosts[0].cert_path",
        "required with tls = \"manual\"",
    );
    assert_err(
        &with("tls = \"manual\"\ncert_path = \"c.pem\"\n"),
        4,
        "virtual_hosts[0].key_path",
        "required with tls = \"manual\"",
    );
    assert_err(
        &with("tls = \"https\"\n"),
        4,
        "virtual_hosts[0].tls",
        "not one of acme|manual|none",
    );
    assert_err(
        &with("tls = \"acme\"\n"),
        4,
        "virtual_hosts[0].tls",
        "requires [lets_encrypt] email",
    );
    let acme = format!(
        "[lets_encrypt]\nemail = \"ops@example.com\"\n{}",
        with("tls = \"acme\"\n")
    );
    assert_eq!(ok(&acme).virtual_hosts[0].tls, TlsMode::Acme);
    // cert_path without tls = "manual" is ignored with a warning.
    let (_, w) = parse(&with("cert_path = \"c.pem\"\n")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].message.contains("virtual_hosts[0].cert_path"), "{w:?}");
}

const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

/// Writes `cfg.toml` (and the given files) into a temp dir and loads it from there.
fn load_in_dir(
    cfg: &str,
    files: &[(&str, &str)],
) -> (
    tempfile::TempDir,
    Result<(Config, Vec<ConfigWarning>), ConfigError>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write file");
    }
    let path = dir.path().join("cfg.toml");
    std::fs::write(&path, cfg).expect("write cfg");
    let result = load(&path);
    (dir, result)
}

fn manual_vhost(cert: &str, key: &str) -> String {
    format!(
        "[[backends]]\nid = \"b\"\naddress = \"h:1\"\ntags = [\"a\"]\n\
         [[virtual_hosts]]\ndomain = \"a.com\"\nenabled_backends_tag = \"a\"\n\
         tls = \"manual\"\ncert_path = \"{cert}\"\nkey_path = \"{key}\"\n"
    )
}

#[test]
fn manual_cert_files_resolve_against_config_dir() {
    let (dir, r) = load_in_dir(
        &manual_vhost("cert.pem", "./key.pem"),
        &[("cert.pem", PEM), ("key.pem", PEM)],
    );
    let (c, w) = r.unwrap_or_else(|e| panic!("{e}"));
    assert!(w.is_empty());
    assert_eq!(
        c.virtual_hosts[0].cert_path,
        Some(dir.path().join("cert.pem"))
    );
    assert_eq!(
        c.virtual_hosts[0].key_path,
        Some(dir.path().join("./key.pem"))
    );
}

#[test]
fn manual_cert_file_missing_or_not_pem() {
    let (_dir, r) = load_in_dir(&manual_vhost("cert.pem", "key.pem"), &[("cert.pem", PEM)]);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("cfg.toml:10: virtual_hosts[0].key_path: file not found"),
        "{msg}"
    );
    assert!(msg.contains("key.pem"), "{msg}");

    let (_dir, r) = load_in_dir(
        &manual_vhost("cert.pem", "key.pem"),
        &[("cert.pem", "not pem"), ("key.pem", PEM)],
    );
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains(":9: virtual_hosts[0].cert_path: "), "{msg}");
    assert!(msg.contains("not a PEM file"), "{msg}");

    // A directory is not a certificate.
    let (_dir, r) = load_in_dir(&manual_vhost(".", "key.pem"), &[("key.pem", PEM)]);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("not a regular file"), "{msg}");
}

#[test]
fn default_cert_both_or_neither_and_readable() {
    assert_err(
        "[proxy]\ndefault_cert_path = \"c.pem\"\n",
        2,
        "proxy.default_key_path",
        "both or neither",
    );
    assert_err(
        "[proxy]\n\ndefault_key_path = \"k.pem\"\n",
        3,
        "proxy.default_cert_path",
        "both or neither",
    );
    let cfg = "[proxy]\ndefault_cert_path = \"c.pem\"\ndefault_key_path = \"k.pem\"\n";
    let (dir, r) = load_in_dir(cfg, &[("c.pem", PEM), ("k.pem", PEM)]);
    let (c, _) = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.proxy.default_cert_path, Some(dir.path().join("c.pem")));
    let (_dir, r) = load_in_dir(cfg, &[("c.pem", PEM)]);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains(":3: proxy.default_key_path: file not found"),
        "{msg}"
    );
}

#[test]
fn ca_bundle_must_exist() {
    let cfg = "[lets_encrypt]\nca_bundle = \"pebble.minica.pem\"\n";
    let (_dir, r) = load_in_dir(cfg, &[]);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains(":2: lets_encrypt.ca_bundle: file not found"),
        "{msg}"
    );
    let (dir, r) = load_in_dir(cfg, &[("pebble.minica.pem", PEM)]);
    let (c, _) = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.lets_encrypt.ca_bundle,
        Some(dir.path().join("pebble.minica.pem"))
    );
}

#[test]
fn lets_encrypt_values() {
    assert_err(
        "[lets_encrypt]\nemail = \"nobody\"\n",
        2,
        "lets_encrypt.email",
        "not an email",
    );
    assert_err(
        "[lets_encrypt]\ndirectory_url = \"localhost:14000/dir\"\n",
        2,
        "lets_encrypt.directory_url",
        "https://",
    );
    assert_err(
        "[lets_encrypt]\nrenew_before_days = 400\n",
        2,
        "lets_encrypt.renew_before_days",
        "<= 365",
    );
    assert_err(
        "[lets_encrypt]\nemail = \"a@b.c\"\n[[virtual_hosts]]\ndomain = \"*.w.test\"\nenabled_backends_tag = \"a\"\ntls = \"acme\"\n",
        6,
        "virtual_hosts[0].tls",
        "wildcard",
    );
    assert_err(
        "[lets_encrypt]\nrenew_before_days = 0\n",
        2,
        "lets_encrypt.renew_before_days",
        ">= 1",
    );
    let c = ok("[lets_encrypt]\ndirectory_url = \"https://localhost:14000/dir\"\n");
    assert_eq!(c.lets_encrypt.renew_before_days, 30);
    assert_eq!(c.lets_encrypt.check_interval_secs, 60);
    assert_eq!(
        c.lets_encrypt.directory_url.as_deref(),
        Some("https://localhost:14000/dir")
    );
}

#[test]
fn logging_values() {
    assert_err(
        "[logging]\nlevel = \"verbose\"\n",
        2,
        "logging.level",
        "trace|debug",
    );
    assert_err(
        "[logging]\nformat = \"xml\"\n",
        2,
        "logging.format",
        "json|text",
    );
    assert_err(
        "[logging]\noutput = \"syslog\"\n",
        2,
        "logging.output",
        "console|file",
    );
    assert_err(
        "[logging]\noutput = \"file\"\n",
        2,
        "logging.file_path",
        "required when output = \"file\"",
    );
    let c = ok("[logging]\nlevel = \"debug\"\noutput = \"file\"\nfile_path = \"p.log\"\n");
    assert_eq!(c.logging.level, "debug");
    assert_eq!(c.logging.file_path, Some(PathBuf::from("p.log")));
}

#[test]
fn access_log_values() {
    let c = ok("");
    assert!(!c.access_log.enabled);
    assert_eq!(c.access_log.output, AccessLogOutput::Stdout);
    assert_eq!(c.access_log.format, AccessLogFormat::Json);
    assert_eq!(c.access_log.queue_size, 65_536);
    assert_eq!(c.access_log.flush_interval_ms, 100);
    assert!(c.proxy.request_id);
    let cases = [
        ("format = \"xml\"\n", "access_log.format", "json|combined"),
        ("output = \"syslog\"\n", "access_log.output", "stdout|file"),
        (
            "output = \"file\"\n",
            "access_log.file_path",
            "required when output = \"file\"",
        ),
        ("queue_size = 0\n", "access_log.queue_size", ""),
        ("queue_size = 4194305\n", "access_log.queue_size", ""),
        (
            "flush_interval_ms = 0\n",
            "access_log.flush_interval_ms",
            "",
        ),
        (
            "flush_interval_ms = 10001\n",
            "access_log.flush_interval_ms",
            "",
        ),
        ("enabled = \"yes\"\n", "access_log.enabled", ""),
        ("file_path = \"\"\n", "access_log.file_path", ""),
        ("buffer = 1\n", "access_log.buffer", "unknown field"),
    ];
    for (line, field, needle) in cases {
        assert_err(&format!("[access_log]\n{line}"), 2, field, needle);
    }
    let c = ok(
        "[access_log]\nenabled = true\noutput = \"file\"\nfile_path = \"a.log\"\n\
                format = \"combined\"\nqueue_size = 1\nflush_interval_ms = 10000\n\
                [proxy]\nrequest_id = false\n",
    );
    assert!(c.access_log.enabled);
    assert_eq!(c.access_log.file_path, Some(PathBuf::from("a.log")));
    assert_eq!(c.access_log.format, AccessLogFormat::Combined);
    assert_eq!(c.access_log.queue_size, 1);
    assert!(!c.proxy.request_id);
    let (_, warnings) = parse("[access_log]\nfile_path = \"a.log\"\n").unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");

    // Per domain: on unless written off.
    let c = ok(&vhost("a.test"));
    assert!(c.virtual_hosts[0].access_log && c.virtual_hosts[0].access_log_query);
    let c = ok(&format!(
        "{}access_log = false\naccess_log_query = false\n",
        vhost("a.test")
    ));
    assert!(!c.virtual_hosts[0].access_log && !c.virtual_hosts[0].access_log_query);
}

#[test]
fn numeric_minimums() {
    for (section, key) in [
        ("proxy", "threads"),
        ("proxy", "upstream_connect_timeout_ms"),
        ("proxy", "upstream_read_timeout_secs"),
        ("proxy", "client_timeout_secs"),
        ("proxy", "max_body_bytes"),
        ("cluster", "node_id"),
        ("cluster", "bootstrap_expect"),
        ("health_check", "interval_secs"),
        ("health_check", "timeout_secs"),
        ("health_check", "unhealthy_threshold"),
        ("health_check", "healthy_threshold"),
        ("health_check", "probers_per_backend"),
        ("health_check", "passive_ejection_secs"),
        ("health_check", "passive_ejection_max_secs"),
    ] {
        let text = format!("[{section}]\n{key} = 0\n");
        assert_err(
            &text,
            2,
            &format!("{section}.{key}"),
            "must be >= 1 (got 0)",
        );
    }
    assert_err(
        "[proxy]\nshutdown_grace_secs = -1\n",
        2,
        "proxy.shutdown_grace_secs",
        "must be >= 0",
    );
    assert_eq!(
        ok("[proxy]\nshutdown_grace_secs = 0\n")
            .proxy
            .shutdown_grace_secs,
        0
    );
    assert_err(
        "[health_check]\nhealthy_threshold = 5000000000\n",
        2,
        "health_check.healthy_threshold",
        "too large",
    );
    assert_err(
        "[health_check]\nprobers_per_backend = 1001\n",
        2,
        "health_check.probers_per_backend",
        "must be <= 1000",
    );
    assert_eq!(
        ok("[health_check]\nprobers_per_backend = 1000\n")
            .health_check
            .probers_per_backend,
        1000
    );
}

#[test]
fn passive_ejection_bounds() {
    let c = ok("");
    assert_eq!(
        (
            c.health_check.passive_ejection_secs,
            c.health_check.passive_ejection_max_secs,
            c.health_check.passive_max_ejected_percent
        ),
        (30, 300, 50)
    );
    assert_err(
        "[health_check]\npassive_ejection_secs = 60\npassive_ejection_max_secs = 30\n",
        3,
        "health_check.passive_ejection_max_secs",
        "must be >= health_check.passive_ejection_secs (30 < 60)",
    );
    assert_err(
        "[health_check]\npassive_max_ejected_percent = 101\n",
        2,
        "health_check.passive_max_ejected_percent",
        "must be <= 100",
    );
    assert_err(
        "[health_check]\npassive_ejection_secs = 3601\n",
        2,
        "health_check.passive_ejection_secs",
        "must be <= 3600",
    );
    let c = ok("[health_check]\npassive_max_ejected_percent = 0\npassive_ejection_secs = 3600\npassive_ejection_max_secs = 86400\n");
    assert_eq!(c.health_check.passive_max_ejected_percent, 0);
}

#[test]
fn health_paths() {
    assert_err(
        "[health_check]\npath = \"health\"\n",
        2,
        "health_check.path",
        "starting with '/'",
    );
    assert_eq!(ok("[health_check]\npath = \"\"\n").health_check.path, "");
    assert_err(
        "[[backends]]\nid = \"x\"\naddress = \"h:1\"\nhealth_check_path = \"ping\"\n",
        4,
        "backends[0].health_check_path",
        "starting with '/'",
    );
    let c = ok("[[backends]]\nid = \"x\"\naddress = \"h:1\"\nhealth_check_path = \"/up\"\n");
    assert_eq!(c.backends[0].health_check_path.as_deref(), Some("/up"));
}

#[test]
fn secret_required_for_multi_node() {
    assert_err(
        "[cluster]\nbootstrap_expect = 3\n",
        2,
        "cluster.secret",
        "bootstrap_expect > 1",
    );
    assert_err(
        "[cluster]\n\nseeds = [\"10.0.0.2:7946\"]\n",
        3,
        "cluster.secret",
        "seeds are set",
    );
    assert_err(
        "[cluster]\nsecret = \"\"\n",
        2,
        "cluster.secret",
        "must not be empty",
    );
    assert_eq!(
        ok("[cluster]\nbootstrap_expect = 3\nsecret = \"s3\"\n")
            .cluster
            .bootstrap_expect,
        3
    );
    assert_err(
        "[cluster]\nsecondary_secret = \"old\"\n",
        2,
        "cluster.secret",
        "required when secondary_secret",
    );
    assert_err(
        "[cluster]\nsecret = \"s\"\nsecondary_secret = \"\"\n",
        3,
        "cluster.secondary_secret",
        "must not be empty",
    );
    let c = ok("[cluster]\nsecret = \"new\"\nsecondary_secret = \"old\"\n");
    assert_eq!(c.cluster.secondary_secret.as_deref(), Some("old"));
}

#[test]
fn public_management_api_needs_token() {
    assert_err(
        "[proxy]\nmanagement_api_addr = \"0.0.0.0:9080\"\n",
        2,
        "api.token",
        "refusing to expose the management API on 0.0.0.0:9080 without [api] token",
    );
    assert_err(
        "[proxy]\nmanagement_api_addr = \"10.0.0.1:9080\"\n[api]\ntoken = \"\"\n",
        4,
        "api.token",
        "must not be empty",
    );
    let c = ok(
        "[proxy]\nmanagement_api_addr = \"0.0.0.0:9080\"\n[api]\ntoken = \"t\"\nallow_plaintext = true\n",
    );
    assert_eq!(c.api.token.as_deref(), Some("t"));
    // Loopback without a token is allowed (no auth).
    assert!(ok("[proxy]\nmanagement_api_addr = \"[::1]:9080\"\n")
        .api
        .token
        .is_none());
}

#[test]
fn public_management_api_needs_tls_or_an_explicit_plaintext() {
    assert_err(
        "[proxy]\nmanagement_api_addr = \"0.0.0.0:9080\"\n[api]\ntoken = \"t\"\n",
        2,
        "api.tls_cert_path",
        "refusing to serve the management API on 0.0.0.0:9080 in plaintext",
    );
    assert_err(
        "[api]\ntls_cert_path = \"c.pem\"\n",
        2,
        "api.tls_key_path",
        "both or neither",
    );
    assert_err(
        "[api]\ntls_key_path = \"k.pem\"\n",
        2,
        "api.tls_cert_path",
        "both or neither",
    );
    assert_err(
        "[api]\ntls_cert_path = \"/nonexistent/c.pem\"\ntls_key_path = \"/nonexistent/k.pem\"\n",
        2,
        "api.tls_cert_path",
        "file not found",
    );
    // Loopback needs neither.
    assert!(ok("[api]\ntoken = \"t\"\n").api.tls_cert_path.is_none());
}

#[test]
fn read_error_names_the_file() {
    let msg = load(Path::new("/nonexistent/dir/cfg.toml"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.starts_with("/nonexistent/dir/cfg.toml: cannot read config file"),
        "{msg}"
    );
}

#[test]
fn every_syntax_error_says_what_is_wrong() {
    // #13: these gave an empty message.
    for (text, line, needle) in [
        ("[proxy]\nthreads =", 2, "value is missing"),
        ("# hi \0 there\n[proxy]\n", 1, "U+0000"),
        ("# esc \u{1b} x\n", 1, "U+001B"),
        ("# cr \r x\n", 1, "U+000D"),
    ] {
        let msg = parse(text).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.starts_with(&format!("cfg.toml:{line}: ")),
            "{text:?}: {msg}"
        );
        assert!(msg.contains(needle), "{text:?}: {msg}");
    }
}

#[test]
fn invalid_utf8_names_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cfg.toml");
    std::fs::write(&path, b"[proxy]\n# \xff\xfe\n").expect("write");
    let msg = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("cfg.toml:2: ") && msg.contains("UTF-8"),
        "{msg}"
    );
}

#[test]
fn every_number_has_a_range_so_check_is_the_truth() {
    // #13: these passed --check and then crashed the node.
    for (text, line, field, needle) in [
        ("[proxy]\nthreads = 65536\n", 2, "proxy.threads", "<= 128"),
        (
            "[proxy]\nthreads = 2147483648\n",
            2,
            "proxy.threads",
            "<= 128",
        ),
        (
            "[proxy]\nthreads = 9223372036854775807\n",
            2,
            "proxy.threads",
            "too large",
        ),
        (
            "[cluster]\nrpc_addr = \"127.0.0.1:0\"\n",
            2,
            "cluster.rpc_addr",
            "port 0",
        ),
        (
            "[proxy]\nlisten_addr = \"127.0.0.1:0\"\n",
            2,
            "proxy.listen_addr",
            "port 0",
        ),
        (
            "[cluster]\nbootstrap_expect = 1000\n",
            2,
            "cluster.bootstrap_expect",
            "<= 99",
        ),
        (
            "[proxy]\nclient_timeout_secs = 99999999999\n",
            2,
            "proxy.client_timeout_secs",
            "<= 86400",
        ),
    ] {
        assert_err(text, line, field, needle);
    }
}

#[test]
fn file_values_follow_the_shared_rules() {
    // #13: the file accepted values the API refuses; now both use schema.rs.
    let backend = |extra: &str| format!("[[backends]]\nid = \"x\"\naddress = \"h:1\"\n{extra}");
    assert_err(
        &backend("tags = [\"blue green\"]\n"),
        4,
        "backends[0].tags[0]",
        "only letters",
    );
    assert_err(
        &backend(&format!("tags = [\"{}\"]\n", "t".repeat(64))),
        4,
        "backends[0].tags[0]",
        "at most 63",
    );
    let many: Vec<String> = (0..33).map(|i| format!("\"t{i}\"")).collect();
    assert_err(
        &backend(&format!("tags = [{}]\n", many.join(", "))),
        4,
        "backends[0].tags",
        "at most 32",
    );
    for bad in [
        "..:80",
        "-:80",
        "a..b:80",
        "999.999.999.999:80",
        "my_host:80",
        "127.0.0.1:+80",
    ] {
        assert_err(&backend_with_address(bad), 3, "backends[0].address", "");
    }
    assert_err(
        "[[backends]]\nid = \"..\"\naddress = \"h:1\"\n",
        2,
        "backends[0].id",
        "must contain",
    );
    assert_err(
        &vhost("1.2.3.4"),
        6,
        "virtual_hosts[0].domain",
        "all digits",
    );
    assert_err(
        &vhost("xn--a.com"),
        6,
        "virtual_hosts[0].domain",
        "punycode",
    );
}

#[test]
fn request_strictness_keys() {
    let c = ok("[proxy]\nunderscores_in_headers = true\nmax_body_bytes = 5\n");
    assert!(c.proxy.underscores_in_headers);
    assert_eq!(c.proxy.max_body_bytes, 5);
}

#[test]
fn free_form_strings_are_bounded() {
    assert_err(
        &format!("[cluster]\ncluster_id = \"{}\"\n", "c".repeat(65)),
        2,
        "cluster.cluster_id",
        "at most 64",
    );
    assert_err(
        &format!("[api]\ntoken = \"{}\"\n", "t".repeat(4097)),
        2,
        "api.token",
        "at most 4096",
    );
    assert_err("[api]\ntoken = \"a\\u0007b\"\n", 2, "api.token", "control");
}

#[test]
fn proxy_protocol_and_forwarders() {
    let c = ok(
        "[proxy]\ntrusted_forwarders = [\"192.0.2.0/24\", \"2001:db8::1\"]\n\
                [proxy.proxy_protocol]\ntrusted = [\"10.0.0.0/8\"]\nheader_timeout_ms = 250\n\
                [[backends]]\nid = \"x\"\naddress = \"x:1\"\nsend_proxy_protocol = \"v2\"\n",
    );
    assert_eq!(c.proxy.trusted_forwarders.len(), 2);
    assert_eq!(c.proxy.proxy_protocol.trusted[0].to_string(), "10.0.0.0/8");
    assert_eq!(c.proxy.proxy_protocol.header_timeout_ms, 250);
    assert_eq!(
        c.backends[0].send_proxy_protocol,
        Some(SendProxyProtocol::V2)
    );
    let d = ok("");
    assert!(d.proxy.proxy_protocol.trusted.is_empty() && d.proxy.trusted_forwarders.is_empty());
    assert_eq!(d.proxy.proxy_protocol.header_timeout_ms, 5000);
    assert_eq!(d.backends.len(), 0);

    assert_err(
        "[proxy.proxy_protocol]\ntrusted = [\n  \"10.0.0.0/8\",\n  \"10.0.0.1/8\",\n]\n",
        4,
        "proxy.proxy_protocol.trusted",
        "host bits set",
    );
    assert_err(
        "[proxy]\ntrusted_forwarders = [\"nope\"]\n",
        2,
        "proxy.trusted_forwarders[0]",
        "is not a network",
    );
    let many: Vec<String> = (0..=schema::MAX_TRUSTED_NETWORKS)
        .map(|i| format!("\"10.0.{i}.0/24\""))
        .collect();
    assert_err(
        &format!("[proxy]\ntrusted_forwarders = [{}]\n", many.join(", ")),
        2,
        "proxy.trusted_forwarders",
        "at most 64",
    );
    assert_err(
        "[proxy.proxy_protocol]\nheader_timeout_ms = 50\n",
        2,
        "proxy.proxy_protocol.header_timeout_ms",
        "must be >= 100",
    );
    assert_err(
        "[[backends]]\nid = \"x\"\naddress = \"x:1\"\nsend_proxy_protocol = \"v3\"\n",
        4,
        "backends[0].send_proxy_protocol",
        "not one of v1|v2",
    );
}

#[test]
fn cluster_tls_files_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let pem = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        p.display().to_string()
    };
    let (ca, key, cert, nkey) = (pem("ca.crt"), pem("ca.key"), pem("n.crt"), pem("n.key"));
    let c = ok("");
    assert_eq!(c.cluster.rpc_tls, RpcTls::Required);
    assert!(c.cluster.tls.ca_cert_path.is_none());
    let c = ok(&format!(
        "[cluster.tls]\nca_cert_path = '{ca}'\nca_key_path = '{key}'\n"
    ));
    assert_eq!(
        c.cluster.tls.ca_key_path.unwrap().display().to_string(),
        key
    );
    let c = ok(&format!(
        "[cluster.tls]\nca_cert_path = '{ca}'\ncert_path = '{cert}'\nkey_path = '{nkey}'\n"
    ));
    assert!(c.cluster.tls.cert_path.is_some() && c.cluster.tls.ca_key_path.is_none());
    assert_err(
        &format!("[cluster.tls]\nca_key_path = '{key}'\n"),
        2,
        "cluster.tls.ca_cert_path",
        "required when any [cluster.tls] file is set",
    );
    assert_err(
        &format!("[cluster.tls]\nca_cert_path = '{ca}'\n"),
        2,
        "cluster.tls.ca_key_path",
        "needs ca_key_path, or cert_path and key_path",
    );
    assert_err(
        &format!(
            "[cluster.tls]\nca_cert_path = '{ca}'\nca_key_path = '{key}'\ncert_path = '{cert}'\nkey_path = '{nkey}'\n"
        ),
        3,
        "cluster.tls.ca_key_path",
        "not both",
    );
    assert_err(
        &format!("[cluster.tls]\nca_cert_path = '{ca}'\ncert_path = '{cert}'\n"),
        3,
        "cluster.tls.key_path",
        "both or neither",
    );
    assert_err(
        "[cluster.tls]\nca_cert_path = '/nonexistent/ca.crt'\nca_key_path = '/x'\n",
        2,
        "cluster.tls.ca_cert_path",
        "file not found",
    );
    assert_err(
        "[cluster]\nrpc_tls = \"on\"\n",
        2,
        "cluster.rpc_tls",
        "is not one of required|mixed|off",
    );
    for mode in ["mixed", "off"] {
        let (c, w) = parse(&format!("[cluster]\nrpc_tls = \"{mode}\"\n")).unwrap();
        assert_ne!(c.cluster.rpc_tls, RpcTls::Required);
        assert!(
            w.len() == 1 && w[0].message.contains(RPC_TLS_MIGRATION_END),
            "{w:?}"
        );
    }
}

#[test]
fn api_client_ca_needs_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("clients.crt");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert_err(
        &format!("[api]\nclient_ca_path = '{}'\n", ca.display()),
        2,
        "api.tls_cert_path",
        "required when client_ca_path is set",
    );
    assert_err(
        &format!(
            "[api]\ntls_domain = 'api.example.com'\ntls_cert_path = '{0}'\ntls_key_path = '{0}'\n",
            ca.display()
        ),
        2,
        "api.tls_domain",
        "set either tls_domain or tls_cert_path/tls_key_path, not both",
    );
    assert_err(
        "[api]\ntls_domain = 'not a domain'\n",
        2,
        "api.tls_domain",
        "",
    );
    let c = ok(&format!(
        "[api]\ntls_domain = 'api.example.com'\nclient_ca_path = '{}'\n",
        ca.display()
    ));
    assert_eq!(
        c.api.tls_domain.map(|d| d.to_string()).as_deref(),
        Some("api.example.com")
    );
    let c = ok("[proxy]\nmanagement_api_addr = '0.0.0.0:9080'\n[api]\ntoken = 't'\ntls_domain = 'api.example.com'\n");
    assert!(
        c.api.tls_cert_path.is_none(),
        "tls_domain is TLS for the plaintext check"
    );
    let c = ok(&format!(
        "[api]\ntls_cert_path = '{0}'\ntls_key_path = '{0}'\nclient_ca_path = '{0}'\n",
        ca.display()
    ));
    assert_eq!(c.api.client_ca_path, Some(ca));
}

#[test]
fn session_ticket_keys() {
    let c = ok("");
    assert!(c.proxy.tls_session_tickets);
    assert_eq!(c.proxy.tls_ticket_rotation_secs, 43_200);
    let c = ok("[proxy]\ntls_session_tickets = false\ntls_ticket_rotation_secs = 60\n");
    assert!(!c.proxy.tls_session_tickets);
    assert_eq!(c.proxy.tls_ticket_rotation_secs, 60);
    for bad in ["59", "604801", "-1"] {
        assert_err(
            &format!("[proxy]\ntls_ticket_rotation_secs = {bad}\n"),
            2,
            "proxy.tls_ticket_rotation_secs",
            "",
        );
    }
}
