//! Config file schema and validation.
//!
//! `load` parses the TOML file, checks every field and returns a validated [`Config`] plus
//! warnings. Errors name the file, the line and the field (`file:line: field: problem`).

use crate::validate::{
    backend_id as validate_backend_id, domain_name as validate_domain,
    health_path as validate_health_path, host_port as validate_host_port,
};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The whole validated config file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Path the config was loaded from (for messages).
    pub source_path: PathBuf,
    pub proxy: ProxyConfig,
    pub api: ApiConfig,
    pub cluster: ClusterConfig,
    pub lets_encrypt: LetsEncryptConfig,
    pub logging: LoggingConfig,
    pub metrics: MetricsConfig,
    pub health_check: HealthCheckConfig,
    pub resolver: ResolverConfig,
    pub virtual_hosts: Vec<VirtualHostConfig>,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// HTTPS listener. default 0.0.0.0:8443
    pub listen_addr: SocketAddr,
    /// Plain HTTP listener. default 0.0.0.0:8080
    pub listen_addr_http: SocketAddr,
    /// Management API. default 127.0.0.1:9080
    pub management_api_addr: SocketAddr,
    /// Data-plane worker threads. default 1, must be >= 1
    pub threads: usize,
    /// Upstream TCP connect timeout in ms. default 2000
    pub upstream_connect_timeout_ms: u64,
    /// Upstream read timeout (time to first byte / between reads) in seconds -> 504. default 30
    pub upstream_read_timeout_secs: u64,
    /// Client timeout in seconds: an idle keep-alive connection, a request body that stalls,
    /// and a client that takes nothing of its response for this long are given up.
    /// default 60
    pub client_timeout_secs: u64,
    /// SIGTERM grace period: seconds in-flight requests get to finish. default 30
    pub shutdown_grace_secs: u64,
    /// A request announcing a longer body (`Content-Length`) is answered 413 before any
    /// backend is contacted. default 1 GiB, must be >= 1
    pub max_body_bytes: u64,
    /// Pass header names containing `_` on to backends (nginx's `underscores_in_headers`).
    /// default false: they are dropped.
    pub underscores_in_headers: bool,
    /// Optional default certificate (served when the client sends no SNI or an unknown name).
    /// Both or neither. Files must exist and be readable. When absent a self-signed one is made.
    pub default_cert_path: Option<PathBuf>,
    pub default_key_path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Bearer token; None = no auth (only allowed when management_api_addr is loopback).
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// default 1, must be >= 1
    pub node_id: u64,
    /// default "./data/node-<node_id>" (relative paths are relative to the process cwd)
    pub data_dir: PathBuf,
    /// default 127.0.0.1:7101
    pub rpc_addr: SocketAddr,
    /// default 127.0.0.1:7946
    pub gossip_addr: SocketAddr,
    /// "host:port" strings, default []
    pub seeds: Vec<String>,
    /// default 1, must be >= 1
    pub bootstrap_expect: usize,
    /// default None. Required (non-empty) when bootstrap_expect > 1 or seeds non-empty.
    pub secret: Option<String>,
    /// default "default"
    pub cluster_id: String,
    /// Take a Raft snapshot (and compact the log) every this many entries. default 5000, >= 10
    pub snapshot_logs: u64,
}

#[derive(Debug, Clone)]
pub struct LetsEncryptConfig {
    /// default None. Required when any virtual host has tls = "acme".
    pub email: Option<String>,
    /// default false
    pub staging: bool,
    /// default None (unused by the replicated design; kept for seed compatibility)
    pub cache_dir: Option<PathBuf>,
    /// default None (then Let's Encrypt prod or staging per `staging`)
    pub directory_url: Option<String>,
    /// default None; if set the file must exist
    pub ca_bundle: Option<PathBuf>,
    /// default 30: renew a certificate this many days before it expires
    pub renew_before_days: u64,
    /// default 60: how often the leader looks for certificates to issue or renew
    pub check_interval_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    Console,
    File,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    /// default "info"; must be one of trace|debug|info|warn|error
    pub level: String,
    /// default Text
    pub format: LogFormat,
    /// default Console
    pub output: LogOutput,
    /// required when output = "file"
    pub file_path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// default true
    pub enabled: bool,
    /// default None: metrics only at /api/v1/metrics on the management API
    pub listen_addr: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    /// default 10, >= 1
    pub interval_secs: u64,
    /// default 5, >= 1
    pub timeout_secs: u64,
    /// default 3, >= 1
    pub unhealthy_threshold: u32,
    /// default 2, >= 1
    pub healthy_threshold: u32,
    /// default "/health"; "" means TCP connect check. Non-empty must start with '/'.
    pub path: String,
}

/// `[resolver]`: how backend names are looked up (IP literals need no lookup).
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// Name servers (`ip` or `ip:port`, port 53 by default). default empty: the system's
    /// (`/etc/resolv.conf`). The hosts file is read either way.
    pub servers: Vec<SocketAddr>,
    /// A name is looked up again after its TTL, but not sooner than this. default 5, >= 1
    pub min_ttl_secs: u64,
    /// ... and not later than this (an answer may change before its TTL says). default 60,
    /// >= min_ttl_secs
    pub max_ttl_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Acme,
    Manual,
    None,
}

#[derive(Debug, Clone)]
pub struct VirtualHostConfig {
    /// lower-cased; valid DNS name (letters, digits, '-', '.'; optional leading "*." wildcard)
    pub domain: String,
    /// non-empty
    pub enabled_backends_tag: String,
    /// default false
    pub http_to_https: bool,
    /// default None (plain HTTP only; HTTPS requests get the default cert)
    pub tls: TlsMode,
    /// with tls = "manual": both required, files must exist and be readable PEM
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// non-empty, [A-Za-z0-9._-]
    pub id: String,
    /// "host:port" (host may be a name such as localhost, an IPv4, or [IPv6]); port 1..=65535
    pub address: String,
    /// default []; each non-empty
    pub tags: Vec<String>,
    /// optional per-backend override; must start with '/' or be "" (TCP check)
    pub health_check_path: Option<String>,
}

/// A problem that does not stop the node (e.g. a domain whose tag no backend carries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `path:line: field: message`
    #[error("{path}:{line}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------------------------

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443),
            listen_addr_http: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080),
            management_api_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9080),
            threads: 1,
            upstream_connect_timeout_ms: 2000,
            upstream_read_timeout_secs: 30,
            client_timeout_secs: 60,
            shutdown_grace_secs: 30,
            max_body_bytes: 1 << 30,
            underscores_in_headers: false,
            default_cert_path: None,
            default_key_path: None,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 1,
            data_dir: default_data_dir(1),
            rpc_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7101),
            gossip_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7946),
            seeds: Vec::new(),
            bootstrap_expect: 1,
            secret: None,
            cluster_id: "default".to_string(),
            snapshot_logs: 5000,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
            output: LogOutput::Console,
            file_path: None,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen_addr: None,
        }
    }
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            servers: Vec::new(),
            min_ttl_secs: 5,
            max_ttl_secs: 60,
        }
    }
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval_secs: 10,
            timeout_secs: 5,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            path: "/health".to_string(),
        }
    }
}

/// Default data dir for a node. Deliberately relative to the process working directory (not to
/// the config file's directory), like an explicit relative `data_dir`: it is where the node
/// *writes*, and operators expect `./data` to be next to where they started the binary.
fn default_data_dir(node_id: u64) -> PathBuf {
    PathBuf::from(format!("./data/node-{node_id}"))
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Reads and validates the config file at `path`.
///
/// Relative certificate/key/CA paths are resolved against the directory of `path`.
pub fn load(path: &Path) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(path, &text)
}

/// Validates config `text` as if it had been read from `path` (used for messages and to
/// resolve relative certificate paths).
pub fn parse_str(path: &Path, text: &str) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    let mut checker = Checker {
        path,
        line_starts: line_starts(text),
        base_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        warnings: Vec::new(),
    };
    let config = checker.build(raw)?;
    Ok((config, checker.warnings))
}

// ---------------------------------------------------------------------------------------------
// Raw (as written) schema. Every leaf is optional and spanned so that validation can point at
// the exact line; `deny_unknown_fields` turns typos into errors instead of silent defaults.
// ---------------------------------------------------------------------------------------------

type Field<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    proxy: Option<RawProxy>,
    api: Option<RawApi>,
    cluster: Option<RawCluster>,
    lets_encrypt: Option<RawLetsEncrypt>,
    logging: Option<RawLogging>,
    metrics: Option<RawMetrics>,
    health_check: Option<RawHealthCheck>,
    resolver: Option<RawResolver>,
    virtual_hosts: Option<Vec<Spanned<RawVirtualHost>>>,
    backends: Option<Vec<Spanned<RawBackend>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen_addr: Field<String>,
    listen_addr_http: Field<String>,
    management_api_addr: Field<String>,
    threads: Field<i64>,
    upstream_connect_timeout_ms: Field<i64>,
    upstream_read_timeout_secs: Field<i64>,
    client_timeout_secs: Field<i64>,
    shutdown_grace_secs: Field<i64>,
    max_body_bytes: Field<i64>,
    underscores_in_headers: Option<bool>,
    default_cert_path: Field<String>,
    default_key_path: Field<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    token: Field<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    node_id: Field<i64>,
    data_dir: Field<String>,
    rpc_addr: Field<String>,
    gossip_addr: Field<String>,
    seeds: Field<Vec<Spanned<String>>>,
    bootstrap_expect: Field<i64>,
    secret: Field<String>,
    cluster_id: Field<String>,
    snapshot_logs: Field<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLetsEncrypt {
    email: Field<String>,
    staging: Option<bool>,
    cache_dir: Field<String>,
    directory_url: Field<String>,
    ca_bundle: Field<String>,
    renew_before_days: Field<i64>,
    check_interval_secs: Field<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    level: Field<String>,
    format: Field<String>,
    output: Field<String>,
    file_path: Field<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    listen_addr: Field<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResolver {
    servers: Field<Vec<Spanned<String>>>,
    min_ttl_secs: Field<i64>,
    max_ttl_secs: Field<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    interval_secs: Field<i64>,
    timeout_secs: Field<i64>,
    unhealthy_threshold: Field<i64>,
    healthy_threshold: Field<i64>,
    path: Field<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVirtualHost {
    domain: Field<String>,
    enabled_backends_tag: Field<String>,
    http_to_https: Option<bool>,
    tls: Field<String>,
    cert_path: Field<String>,
    key_path: Field<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    id: Field<String>,
    address: Field<String>,
    tags: Option<Vec<Spanned<String>>>,
    health_check_path: Field<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

struct Checker<'a> {
    path: &'a Path,
    /// Byte offset where each line starts: spans become line numbers in O(log n), so a
    /// 10,000-entry file loads in linear time.
    line_starts: Vec<usize>,
    /// Directory of the config file: base for relative certificate/key/CA paths.
    base_dir: PathBuf,
    warnings: Vec<ConfigWarning>,
}

/// A listener address plus where it was written (None = default), for the port-clash check.
struct Listener {
    field: &'static str,
    addr: SocketAddr,
    span: Option<Range<usize>>,
}

impl Checker<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        self.line_starts
            .partition_point(|&start| start <= span.start)
    }

    fn error(&self, span: &Range<usize>, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(span),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Warnings use the same `file:line: field: message` shape as errors.
    fn warn(&mut self, span: &Range<usize>, field: &str, message: impl std::fmt::Display) {
        let message = format!(
            "{}:{}: {}: {}",
            self.path.display(),
            self.line(span),
            field,
            message
        );
        self.warnings.push(ConfigWarning { message });
    }

    fn socket_addr(
        &self,
        raw: &Field<String>,
        field: &str,
        default: SocketAddr,
    ) -> Result<SocketAddr, ConfigError> {
        match raw {
            None => Ok(default),
            Some(v) => parse_socket_addr(v.get_ref()).map_err(|m| self.error(&v.span(), field, m)),
        }
    }

    /// An integer with a lower bound, converted to the public field's type.
    fn int<T: TryFrom<i64>>(
        &self,
        raw: &Field<i64>,
        field: &str,
        default: T,
        min: i64,
    ) -> Result<T, ConfigError> {
        let Some(v) = raw else { return Ok(default) };
        let n = *v.get_ref();
        if n < min {
            return Err(self.error(&v.span(), field, format!("must be >= {min} (got {n})")));
        }
        T::try_from(n).map_err(|_| self.error(&v.span(), field, format!("{n} is too large")))
    }

    /// A string that must not be empty or blank when given.
    fn non_empty(&self, v: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
        if v.get_ref().trim().is_empty() {
            return Err(self.error(&v.span(), field, "must not be empty"));
        }
        Ok(v.get_ref().clone())
    }

    /// Relative paths of files the node *reads* are relative to the config file's directory, so
    /// a config and its certificates can move together.
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Resolves a PEM file path and checks that it exists, is readable and looks like PEM, so a
    /// typo is reported by `--check` instead of at the first TLS handshake.
    fn pem_file(&self, v: &Spanned<String>, field: &str) -> Result<PathBuf, ConfigError> {
        let raw = self.non_empty(v, field)?;
        let resolved = self.resolve(&raw);
        let err = |m: String| self.error(&v.span(), field, m);
        let meta = std::fs::metadata(&resolved).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err(format!("file not found: {}", resolved.display())),
            _ => err(format!("cannot access {}: {e}", resolved.display())),
        })?;
        if !meta.is_file() {
            return Err(err(format!("{} is not a regular file", resolved.display())));
        }
        let bytes = std::fs::read(&resolved)
            .map_err(|e| err(format!("cannot read {}: {e}", resolved.display())))?;
        if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(err(format!(
                "{} is not a PEM file (no \"-----BEGIN\" line)",
                resolved.display()
            )));
        }
        Ok(resolved)
    }

    fn build(&mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let raw_proxy = raw.proxy.unwrap_or_default();
        let raw_cluster = raw.cluster.unwrap_or_default();
        let raw_metrics = raw.metrics.unwrap_or_default();

        let proxy = self.proxy(&raw_proxy)?;
        let api = self.api(&raw.api.unwrap_or_default(), &raw_proxy, &proxy)?;
        let cluster = self.cluster(&raw_cluster)?;
        let lets_encrypt = self.lets_encrypt(&raw.lets_encrypt.unwrap_or_default())?;
        let logging = self.logging(&raw.logging.unwrap_or_default())?;
        let metrics = self.metrics(&raw_metrics)?;
        let health_check = self.health_check(&raw.health_check.unwrap_or_default())?;
        let resolver = self.resolver(&raw.resolver.unwrap_or_default())?;
        let backends = self.backends(&raw.backends.unwrap_or_default())?;
        let virtual_hosts = self.virtual_hosts(
            &raw.virtual_hosts.unwrap_or_default(),
            &lets_encrypt,
            &backends,
        )?;

        let span = |f: &Field<String>| f.as_ref().map(Spanned::span);
        let mut listeners = vec![
            Listener {
                field: "proxy.listen_addr",
                addr: proxy.listen_addr,
                span: span(&raw_proxy.listen_addr),
            },
            Listener {
                field: "proxy.listen_addr_http",
                addr: proxy.listen_addr_http,
                span: span(&raw_proxy.listen_addr_http),
            },
            Listener {
                field: "proxy.management_api_addr",
                addr: proxy.management_api_addr,
                span: span(&raw_proxy.management_api_addr),
            },
            Listener {
                field: "cluster.rpc_addr",
                addr: cluster.rpc_addr,
                span: span(&raw_cluster.rpc_addr),
            },
        ];
        if let Some(addr) = metrics.listen_addr {
            listeners.push(Listener {
                field: "metrics.listen_addr",
                addr,
                span: span(&raw_metrics.listen_addr),
            });
        }
        // gossip_addr is UDP, so it may share a port number with the TCP listeners.
        self.check_listener_clash(&listeners)?;

        Ok(Config {
            source_path: self.path.to_path_buf(),
            proxy,
            api,
            cluster,
            lets_encrypt,
            logging,
            metrics,
            health_check,
            resolver,
            virtual_hosts,
            backends,
        })
    }

    /// Two TCP listeners on the same port either fail to bind or (with SO_REUSEPORT) silently
    /// split traffic; both are worth catching at `--check` time.
    fn check_listener_clash(&self, listeners: &[Listener]) -> Result<(), ConfigError> {
        for (i, b) in listeners.iter().enumerate() {
            for a in &listeners[..i] {
                let port_clash = a.addr.port() == b.addr.port() && a.addr.port() != 0;
                let ip_clash = a.addr.ip() == b.addr.ip()
                    || a.addr.ip().is_unspecified()
                    || b.addr.ip().is_unspecified();
                if !(port_clash && ip_clash) {
                    continue;
                }
                // Report on the one the user wrote (a default cannot be "wrong" on its own).
                let (at, other) = match (&b.span, &a.span) {
                    (Some(_), _) => (b, a),
                    _ => (a, b),
                };
                let span = at.span.clone().unwrap_or(0..0);
                let how = if other.span.is_some() {
                    ""
                } else {
                    " (default)"
                };
                return Err(self.error(
                    &span,
                    at.field,
                    format!(
                        "{} clashes with {} = {}{}: listeners need distinct ports",
                        at.addr, other.field, other.addr, how
                    ),
                ));
            }
        }
        Ok(())
    }

    fn proxy(&self, raw: &RawProxy) -> Result<ProxyConfig, ConfigError> {
        let d = ProxyConfig::default();
        let listen_addr = self.socket_addr(&raw.listen_addr, "proxy.listen_addr", d.listen_addr)?;
        let listen_addr_http = self.socket_addr(
            &raw.listen_addr_http,
            "proxy.listen_addr_http",
            d.listen_addr_http,
        )?;
        let management_api_addr = self.socket_addr(
            &raw.management_api_addr,
            "proxy.management_api_addr",
            d.management_api_addr,
        )?;
        let threads = self.int(&raw.threads, "proxy.threads", d.threads, 1)?;
        let upstream_connect_timeout_ms = self.int(
            &raw.upstream_connect_timeout_ms,
            "proxy.upstream_connect_timeout_ms",
            d.upstream_connect_timeout_ms,
            1,
        )?;
        let upstream_read_timeout_secs = self.int(
            &raw.upstream_read_timeout_secs,
            "proxy.upstream_read_timeout_secs",
            d.upstream_read_timeout_secs,
            1,
        )?;
        let client_timeout_secs = self.int(
            &raw.client_timeout_secs,
            "proxy.client_timeout_secs",
            d.client_timeout_secs,
            1,
        )?;
        // 0 is allowed: stop immediately without waiting for in-flight requests.
        let shutdown_grace_secs = self.int(
            &raw.shutdown_grace_secs,
            "proxy.shutdown_grace_secs",
            d.shutdown_grace_secs,
            0,
        )?;
        let max_body_bytes = self.int(
            &raw.max_body_bytes,
            "proxy.max_body_bytes",
            d.max_body_bytes,
            1,
        )?;
        let underscores_in_headers = raw
            .underscores_in_headers
            .unwrap_or(d.underscores_in_headers);
        let (default_cert_path, default_key_path) =
            match (&raw.default_cert_path, &raw.default_key_path) {
                (None, None) => (None, None),
                (Some(c), None) => {
                    return Err(self.error(
                        &c.span(),
                        "proxy.default_key_path",
                        "required when default_cert_path is set (both or neither)",
                    ))
                }
                (None, Some(k)) => {
                    return Err(self.error(
                        &k.span(),
                        "proxy.default_cert_path",
                        "required when default_key_path is set (both or neither)",
                    ))
                }
                (Some(c), Some(k)) => (
                    Some(self.pem_file(c, "proxy.default_cert_path")?),
                    Some(self.pem_file(k, "proxy.default_key_path")?),
                ),
            };
        Ok(ProxyConfig {
            listen_addr,
            listen_addr_http,
            management_api_addr,
            threads,
            upstream_connect_timeout_ms,
            upstream_read_timeout_secs,
            client_timeout_secs,
            shutdown_grace_secs,
            max_body_bytes,
            underscores_in_headers,
            default_cert_path,
            default_key_path,
        })
    }

    fn api(
        &self,
        raw: &RawApi,
        raw_proxy: &RawProxy,
        proxy: &ProxyConfig,
    ) -> Result<ApiConfig, ConfigError> {
        // An empty token is rejected outright: it reads like auth is on while it is not.
        let token = match &raw.token {
            Some(t) => Some(self.non_empty(t, "api.token")?),
            None => None,
        };
        let addr = proxy.management_api_addr;
        if token.is_none() && !addr.ip().is_loopback() {
            // Only reachable with an explicit address (the default is loopback).
            let span = raw_proxy
                .management_api_addr
                .as_ref()
                .map(Spanned::span)
                .unwrap_or(0..0);
            return Err(self.error(
                &span,
                "api.token",
                format!("refusing to expose the management API on {addr} without [api] token"),
            ));
        }
        Ok(ApiConfig { token })
    }

    fn cluster(&self, raw: &RawCluster) -> Result<ClusterConfig, ConfigError> {
        let d = ClusterConfig::default();
        let node_id: u64 = self.int(&raw.node_id, "cluster.node_id", d.node_id, 1)?;
        let data_dir = match &raw.data_dir {
            // Kept as written: relative to the process cwd (see `default_data_dir`).
            Some(v) => PathBuf::from(self.non_empty(v, "cluster.data_dir")?),
            None => default_data_dir(node_id),
        };
        let rpc_addr = self.socket_addr(&raw.rpc_addr, "cluster.rpc_addr", d.rpc_addr)?;
        let gossip_addr =
            self.socket_addr(&raw.gossip_addr, "cluster.gossip_addr", d.gossip_addr)?;
        let mut seeds = Vec::new();
        if let Some(list) = &raw.seeds {
            for (i, s) in list.get_ref().iter().enumerate() {
                let field = format!("cluster.seeds[{i}]");
                validate_host_port(s.get_ref()).map_err(|m| self.error(&s.span(), &field, m))?;
                seeds.push(s.get_ref().clone());
            }
        }
        let bootstrap_expect: usize =
            self.int(&raw.bootstrap_expect, "cluster.bootstrap_expect", 1, 1)?;
        let secret = match &raw.secret {
            Some(v) => Some(self.non_empty(v, "cluster.secret")?),
            None => None,
        };
        if secret.is_none() && (bootstrap_expect > 1 || !seeds.is_empty()) {
            // Point at whatever made the secret necessary.
            let (span, why) = match (&raw.seeds, &raw.bootstrap_expect) {
                (Some(s), _) if !seeds.is_empty() => (s.span(), "seeds are set"),
                (_, Some(b)) => (b.span(), "bootstrap_expect > 1"),
                _ => (0..0, "this is a multi-node cluster"),
            };
            return Err(self.error(
                &span,
                "cluster.secret",
                format!("required because {why}: it authenticates cluster RPC between nodes"),
            ));
        }
        let cluster_id = match &raw.cluster_id {
            Some(v) => self.non_empty(v, "cluster.cluster_id")?,
            None => d.cluster_id,
        };
        let snapshot_logs = self.int(
            &raw.snapshot_logs,
            "cluster.snapshot_logs",
            d.snapshot_logs,
            10,
        )?;
        Ok(ClusterConfig {
            node_id,
            data_dir,
            rpc_addr,
            gossip_addr,
            seeds,
            bootstrap_expect,
            secret,
            cluster_id,
            snapshot_logs,
        })
    }

    fn lets_encrypt(&self, raw: &RawLetsEncrypt) -> Result<LetsEncryptConfig, ConfigError> {
        let email = match &raw.email {
            Some(v) => {
                let e = self.non_empty(v, "lets_encrypt.email")?;
                if !e.contains('@') || e.chars().any(char::is_whitespace) {
                    return Err(self.error(
                        &v.span(),
                        "lets_encrypt.email",
                        format!("{e:?} is not an email address"),
                    ));
                }
                Some(e)
            }
            None => None,
        };
        // Kept as written (relative to the cwd): a directory the node writes, like data_dir.
        let cache_dir = match &raw.cache_dir {
            Some(v) => Some(PathBuf::from(self.non_empty(v, "lets_encrypt.cache_dir")?)),
            None => None,
        };
        let directory_url = match &raw.directory_url {
            Some(v) => {
                let u = self.non_empty(v, "lets_encrypt.directory_url")?;
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    return Err(self.error(
                        &v.span(),
                        "lets_encrypt.directory_url",
                        format!("{u:?} must be an http:// or https:// URL"),
                    ));
                }
                Some(u)
            }
            None => None,
        };
        let ca_bundle = match &raw.ca_bundle {
            Some(v) => Some(self.pem_file(v, "lets_encrypt.ca_bundle")?),
            None => None,
        };
        Ok(LetsEncryptConfig {
            email,
            staging: raw.staging.unwrap_or(false),
            cache_dir,
            directory_url,
            ca_bundle,
            renew_before_days: {
                let days: u64 = self.int(
                    &raw.renew_before_days,
                    "lets_encrypt.renew_before_days",
                    30,
                    1,
                )?;
                if days > 365 {
                    let span = raw
                        .renew_before_days
                        .as_ref()
                        .map(Spanned::span)
                        .unwrap_or_default();
                    return Err(self.error(
                        &span,
                        "lets_encrypt.renew_before_days",
                        format!("must be <= 365 (got {days})"),
                    ));
                }
                days
            },
            check_interval_secs: self.int(
                &raw.check_interval_secs,
                "lets_encrypt.check_interval_secs",
                60,
                1,
            )?,
        })
    }

    fn logging(&mut self, raw: &RawLogging) -> Result<LoggingConfig, ConfigError> {
        let d = LoggingConfig::default();
        let level = match &raw.level {
            Some(v) => match v.get_ref().as_str() {
                l @ ("trace" | "debug" | "info" | "warn" | "error") => l.to_string(),
                other => {
                    return Err(self.error(
                        &v.span(),
                        "logging.level",
                        format!("{other:?} is not one of trace|debug|info|warn|error"),
                    ))
                }
            },
            None => d.level,
        };
        let format = match &raw.format {
            Some(v) => match v.get_ref().as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                other => {
                    return Err(self.error(
                        &v.span(),
                        "logging.format",
                        format!("{other:?} is not one of json|text"),
                    ))
                }
            },
            None => d.format,
        };
        let output = match &raw.output {
            Some(v) => match v.get_ref().as_str() {
                "console" => LogOutput::Console,
                "file" => LogOutput::File,
                other => {
                    return Err(self.error(
                        &v.span(),
                        "logging.output",
                        format!("{other:?} is not one of console|file"),
                    ))
                }
            },
            None => d.output,
        };
        // Kept as written (relative to the cwd): a file the node writes, like data_dir.
        let file_path = match &raw.file_path {
            Some(v) => Some(PathBuf::from(self.non_empty(v, "logging.file_path")?)),
            None => None,
        };
        match (output, &file_path, &raw.output, &raw.file_path) {
            (LogOutput::File, None, Some(o), _) => {
                return Err(self.error(
                    &o.span(),
                    "logging.file_path",
                    "required when output = \"file\"",
                ))
            }
            (LogOutput::Console, Some(_), _, Some(f)) => self.warn(
                &f.span(),
                "logging.file_path",
                "ignored because output is not \"file\"",
            ),
            _ => {}
        }
        Ok(LoggingConfig {
            level,
            format,
            output,
            file_path,
        })
    }

    fn metrics(&self, raw: &RawMetrics) -> Result<MetricsConfig, ConfigError> {
        let listen_addr = match &raw.listen_addr {
            Some(v) => Some(
                parse_socket_addr(v.get_ref())
                    .map_err(|m| self.error(&v.span(), "metrics.listen_addr", m))?,
            ),
            None => None,
        };
        Ok(MetricsConfig {
            enabled: raw.enabled.unwrap_or(true),
            listen_addr,
        })
    }

    fn resolver(&self, raw: &RawResolver) -> Result<ResolverConfig, ConfigError> {
        let d = ResolverConfig::default();
        let mut servers = Vec::new();
        for (i, s) in raw
            .servers
            .iter()
            .flat_map(|l| l.get_ref().iter())
            .enumerate()
        {
            let text = s.get_ref();
            let addr = text
                .parse::<SocketAddr>()
                .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .ok()
                .filter(|a| a.port() != 0)
                .ok_or_else(|| {
                    self.error(
                        &s.span(),
                        &format!("resolver.servers[{i}]"),
                        format!("{text:?} is not an IP address or IP:port (port 1-65535)"),
                    )
                })?;
            servers.push(addr);
        }
        let min_ttl_secs = self.int(
            &raw.min_ttl_secs,
            "resolver.min_ttl_secs",
            d.min_ttl_secs,
            1,
        )?;
        let max_ttl_secs: u64 = self.int(
            &raw.max_ttl_secs,
            "resolver.max_ttl_secs",
            d.max_ttl_secs,
            1,
        )?;
        if max_ttl_secs < min_ttl_secs {
            let span = raw
                .max_ttl_secs
                .as_ref()
                .or(raw.min_ttl_secs.as_ref())
                .map(Spanned::span)
                .unwrap_or_default();
            return Err(self.error(
                &span,
                "resolver.max_ttl_secs",
                format!("must be >= resolver.min_ttl_secs ({max_ttl_secs} < {min_ttl_secs})"),
            ));
        }
        Ok(ResolverConfig {
            servers,
            min_ttl_secs,
            max_ttl_secs,
        })
    }

    fn health_check(&self, raw: &RawHealthCheck) -> Result<HealthCheckConfig, ConfigError> {
        let d = HealthCheckConfig::default();
        let path = match &raw.path {
            Some(v) => {
                validate_health_path(v.get_ref())
                    .map_err(|m| self.error(&v.span(), "health_check.path", m))?;
                v.get_ref().clone()
            }
            None => d.path,
        };
        Ok(HealthCheckConfig {
            interval_secs: self.int(
                &raw.interval_secs,
                "health_check.interval_secs",
                d.interval_secs,
                1,
            )?,
            timeout_secs: self.int(
                &raw.timeout_secs,
                "health_check.timeout_secs",
                d.timeout_secs,
                1,
            )?,
            unhealthy_threshold: self.int(
                &raw.unhealthy_threshold,
                "health_check.unhealthy_threshold",
                d.unhealthy_threshold,
                1,
            )?,
            healthy_threshold: self.int(
                &raw.healthy_threshold,
                "health_check.healthy_threshold",
                d.healthy_threshold,
                1,
            )?,
            path,
        })
    }

    fn backends(&self, raw: &[Spanned<RawBackend>]) -> Result<Vec<BackendConfig>, ConfigError> {
        let mut out = Vec::with_capacity(raw.len());
        // id -> line of first definition, for the duplicate message.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, entry) in raw.iter().enumerate() {
            let b = entry.get_ref();
            let field = |name: &str| format!("backends[{i}].{name}");

            let id_field = field("id");
            let Some(id_raw) = &b.id else {
                return Err(self.error(&entry.span(), &id_field, "missing (required)"));
            };
            let id = id_raw.get_ref();
            validate_backend_id(id).map_err(|m| self.error(&id_raw.span(), &id_field, m))?;
            if let Some(first) = seen.get(id) {
                return Err(self.error(
                    &id_raw.span(),
                    &id_field,
                    format!("duplicate backend id {id:?} (first defined on line {first})"),
                ));
            }
            seen.insert(id.clone(), self.line(&id_raw.span()));

            let addr_field = field("address");
            let Some(addr_raw) = &b.address else {
                return Err(self.error(&entry.span(), &addr_field, "missing (required)"));
            };
            validate_host_port(addr_raw.get_ref())
                .map_err(|m| self.error(&addr_raw.span(), &addr_field, m))?;

            let mut tags = Vec::new();
            for (j, t) in b.tags.iter().flatten().enumerate() {
                let tag = self.non_empty(t, &field(&format!("tags[{j}]")))?;
                tags.push(tag);
            }

            let health_check_path = match &b.health_check_path {
                Some(v) => {
                    validate_health_path(v.get_ref())
                        .map_err(|m| self.error(&v.span(), &field("health_check_path"), m))?;
                    Some(v.get_ref().clone())
                }
                None => None,
            };

            out.push(BackendConfig {
                id: id.clone(),
                address: addr_raw.get_ref().clone(),
                tags,
                health_check_path,
            });
        }
        Ok(out)
    }

    fn virtual_hosts(
        &mut self,
        raw: &[Spanned<RawVirtualHost>],
        lets_encrypt: &LetsEncryptConfig,
        backends: &[BackendConfig],
    ) -> Result<Vec<VirtualHostConfig>, ConfigError> {
        let mut out = Vec::with_capacity(raw.len());
        let carried_tags: std::collections::HashSet<&str> = backends
            .iter()
            .flat_map(|b| b.tags.iter().map(String::as_str))
            .collect();
        // lower-cased domain -> line of first definition, for the duplicate message.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, entry) in raw.iter().enumerate() {
            let v = entry.get_ref();
            let field = |name: &str| format!("virtual_hosts[{i}].{name}");

            let domain_field = field("domain");
            let Some(domain_raw) = &v.domain else {
                return Err(self.error(&entry.span(), &domain_field, "missing (required)"));
            };
            let domain = validate_domain(domain_raw.get_ref())
                .map_err(|m| self.error(&domain_raw.span(), &domain_field, m))?;
            if let Some(first) = seen.get(&domain) {
                return Err(self.error(
                    &domain_raw.span(),
                    &domain_field,
                    format!("duplicate domain {domain:?} (first defined on line {first})"),
                ));
            }
            seen.insert(domain.clone(), self.line(&domain_raw.span()));

            let tag_field = field("enabled_backends_tag");
            let Some(tag_raw) = &v.enabled_backends_tag else {
                return Err(self.error(&entry.span(), &tag_field, "missing (required)"));
            };
            let tag = self.non_empty(tag_raw, &tag_field)?;

            let tls_field = field("tls");
            let tls = match &v.tls {
                None => TlsMode::None,
                Some(t) => match t.get_ref().as_str() {
                    "acme" => TlsMode::Acme,
                    "manual" => TlsMode::Manual,
                    "none" => TlsMode::None,
                    other => {
                        return Err(self.error(
                            &t.span(),
                            &tls_field,
                            format!("{other:?} is not one of acme|manual|none"),
                        ))
                    }
                },
            };
            let tls_span = v.tls.as_ref().map(Spanned::span).unwrap_or(entry.span());

            let (cert_path, key_path) = match tls {
                TlsMode::Manual => {
                    let (Some(c), Some(k)) = (&v.cert_path, &v.key_path) else {
                        let missing = if v.cert_path.is_none() {
                            "cert_path"
                        } else {
                            "key_path"
                        };
                        return Err(self.error(
                            &tls_span,
                            &field(missing),
                            "required with tls = \"manual\" (cert_path and key_path)",
                        ));
                    };
                    (
                        Some(self.pem_file(c, &field("cert_path"))?),
                        Some(self.pem_file(k, &field("key_path"))?),
                    )
                }
                TlsMode::Acme | TlsMode::None => {
                    for (name, p) in [("cert_path", &v.cert_path), ("key_path", &v.key_path)] {
                        if let Some(p) = p {
                            self.warn(
                                &p.span(),
                                &field(name),
                                "ignored because tls is not \"manual\"",
                            );
                        }
                    }
                    (None, None)
                }
            };
            if tls == TlsMode::Acme && domain.starts_with("*.") {
                return Err(self.error(
                    &tls_span,
                    &tls_field,
                    format!("\"acme\" cannot issue a certificate for the wildcard {domain:?} (HTTP-01 validation); use tls = \"manual\""),
                ));
            }
            if tls == TlsMode::Acme && lets_encrypt.email.is_none() {
                return Err(self.error(
                    &tls_span,
                    &tls_field,
                    "tls = \"acme\" requires [lets_encrypt] email (the ACME account contact)",
                ));
            }

            // Not an error: backends can be added through the API after start.
            if !carried_tags.contains(tag.as_str()) {
                let line = self.line(&tag_raw.span());
                self.warn(
                    &tag_raw.span(),
                    &tag_field,
                    format!(
                        "domain {domain:?} (line {line}) uses tag {tag:?}, which no backend carries; \
                         its requests get 503 until a backend with that tag exists"
                    ),
                );
            }

            out.push(VirtualHostConfig {
                domain,
                enabled_backends_tag: tag,
                http_to_https: v.http_to_https.unwrap_or(false),
                tls,
                cert_path,
                key_path,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Value rules (pure; return the message, the caller adds file/line/field)
// ---------------------------------------------------------------------------------------------

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        let hint = if s.contains("://") {
            "; remove the scheme"
        } else if s.rsplit_once(':').is_some_and(|(h, _)| h.parse::<IpAddr>().is_err()) {
            "; a listen address needs an IP, not a host name"
        } else {
            ""
        };
        format!("invalid socket address {s:?}: expected IP:port such as 127.0.0.1:8080 or [::1]:8080{hint}")
    })
}

// ---------------------------------------------------------------------------------------------
// toml errors -> file:line: field: message
// ---------------------------------------------------------------------------------------------

fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    // toml's messages can span lines ("invalid string\nexpected ..."); keep ours on one line.
    let message = err
        .message()
        .trim_end()
        .replace('\n', "; ")
        .replace("expected i64", "expected an integer");
    let (line, field) = match err.span() {
        Some(span) => {
            let unknown = backticked_after(&message, "unknown field `");
            let field = field_by_tree(text, &span, unknown.as_deref())
                .or_else(|| field_by_lines(text, span.start, unknown.as_deref()));
            (line_of(text, span.start), field)
        }
        None => (1, None),
    };
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        field: field.unwrap_or_else(|| "(toml)".to_string()),
        message,
    }
}

/// `name` from a message such as "unknown field `name`, expected ...".
fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.split_once(prefix)?.1;
    Some(rest.split_once('`')?.0.to_string())
}

/// A schema-free, spanned view of the document, used only to name the field an error points at.
enum Node {
    Table(Vec<(Spanned<String>, Spanned<Node>)>),
    Array(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(x) = a.next_element()? {
                    items.push(x);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(e) = a.next_entry()? {
                    entries.push(e);
                }
                Ok(Node::Table(entries))
            }
        }
        d.deserialize_any(NodeVisitor)
    }
}

/// Names the deepest key whose key or value span holds the error span. Precise for inline tables
/// and multi-line arrays; returns None when the tree cannot be built (syntax errors, and toml's
/// spans do not support dotted keys or datetimes), then `field_by_lines` takes over.
fn field_by_tree(text: &str, span: &Range<usize>, unknown: Option<&str>) -> Option<String> {
    let root: Node = toml::from_str(text).ok()?;
    let inside = |outer: &Range<usize>| outer.start <= span.start && span.end <= outer.end;
    let mut path = String::new();
    let mut node = &root;
    loop {
        let next = match node {
            Node::Table(entries) => entries.iter().find_map(|(k, v)| {
                if k.span() == *span || inside(&v.span()) {
                    Some((format!(".{}", k.get_ref()), k.span() == *span, v))
                } else {
                    None
                }
            }),
            Node::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| inside(&v.span()).then(|| (format!("[{i}]"), false, v))),
            Node::Leaf => None,
        };
        match next {
            Some((segment, is_key, child)) => {
                path.push_str(&segment);
                if is_key {
                    break;
                }
                node = child.get_ref();
            }
            None => {
                // The error is on a key inside this table that the tree did not pin down.
                if let Some(name) = unknown {
                    path.push('.');
                    path.push_str(name);
                }
                break;
            }
        }
    }
    let path = path.trim_start_matches('.').to_string();
    (!path.is_empty()).then_some(path)
}

/// Line-based fallback: the enclosing `[table]`/`[[array]]` header (with its index) plus the key
/// written on or above the error line.
fn field_by_lines(text: &str, offset: usize, unknown: Option<&str>) -> Option<String> {
    let err_line = line_of(text, offset);
    let mut prefix = String::new();
    let mut key: Option<String> = None;
    let mut array_counts: HashMap<String, usize> = HashMap::new();
    for (i, raw_line) in text.lines().enumerate().take(err_line) {
        let l = strip_comment(raw_line).trim();
        if let Some((name, is_array)) = header(l) {
            if i + 1 == err_line {
                return Some(name);
            }
            prefix = if is_array {
                let n = array_counts.entry(name.clone()).or_insert(0);
                let p = format!("{name}[{n}]");
                *n += 1;
                p
            } else {
                name
            };
            key = None;
        } else if let Some((k, _)) = l.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                key = Some(k.to_string());
            }
        }
    }
    let name = unknown.map(str::to_string).or(key)?;
    Some(if prefix.is_empty() {
        name
    } else {
        format!("{prefix}.{name}")
    })
}

fn header(l: &str) -> Option<(String, bool)> {
    if let Some(rest) = l.strip_prefix("[[") {
        Some((rest.split_once("]]")?.0.trim().to_string(), true))
    } else if let Some(rest) = l.strip_prefix('[') {
        Some((rest.split_once(']')?.0.trim().to_string(), false))
    } else {
        None
    }
}

/// Cuts a trailing `# comment`, ignoring '#' inside quoted strings.
fn strip_comment(l: &str) -> &str {
    let mut quote: Option<char> = None;
    for (i, c) in l.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') => return &l[..i],
            _ => {}
        }
    }
    l
}

/// Offsets of the first byte of every line (line 1 starts at 0).
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
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
        let text = include_str!("../config.example.toml");
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
    fn request_strictness_keys() {
        let c = ok("[proxy]\nunderscores_in_headers = true\nmax_body_bytes = 5\n");
        assert!(c.proxy.underscores_in_headers);
        assert_eq!(c.proxy.max_body_bytes, 5);
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
        assert_eq!(c.proxy.max_body_bytes, 1 << 30);
        assert!(!c.proxy.underscores_in_headers);
        assert_eq!(c.proxy.shutdown_grace_secs, 30);
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
            "web_1.internal:65535",
        ] {
            assert!(parse(&backend_with_address(good)).is_ok(), "{good}");
        }
        for (bad, needle) in [
            ("http://x:1", "remove the scheme \"http://\" (use \"x:1\")"),
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
            ("", "must not be empty"),
        ] {
            assert_err(&backend_with_address(bad), 3, "backends[0].address", needle);
        }
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
        let c = ok("[proxy]\nmanagement_api_addr = \"0.0.0.0:9080\"\n[api]\ntoken = \"t\"\n");
        assert_eq!(c.api.token.as_deref(), Some("t"));
        // Loopback without a token is allowed (no auth).
        assert!(ok("[proxy]\nmanagement_api_addr = \"[::1]:9080\"\n")
            .api
            .token
            .is_none());
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
}
