//! Config file schema and validation.
//!
//! `load` parses the TOML file into typed sections and returns a validated [`Config`] plus
//! warnings. Serde does the mechanics: unknown keys are refused (`deny_unknown_fields`), every
//! number has a range, and the values the API and Raft also take (domains, ids, tags,
//! addresses, paths) are the [`crate::schema`] newtypes, so the file accepts exactly what they
//! accept. Only rules across fields are written here. Errors name the file, the line and the
//! field (`file:line: field: problem`); the line comes from the document's spans.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml_edit::{ImDocument, Item, Table, TableLike, Value};

pub use crate::schema::TlsMode;
use crate::schema::{
    self, BackendId, BackendTls, Cidr, DomainName, FieldRule, HealthPath, HostPort,
    SendProxyProtocol, Tag, MAX_BACKENDS, MAX_DOMAINS,
};

/// Most data-plane worker threads (`[proxy] threads`): each is a runtime with its own file
/// descriptors, and more threads than cores only adds switching.
pub const MAX_THREADS: i64 = 128;
/// Longest any timeout or interval in seconds may be (one day).
const DAY_SECS: i64 = 86_400;

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
    pub access_log: AccessLogConfig,
    pub metrics: MetricsConfig,
    pub health_check: HealthCheckConfig,
    pub resolver: ResolverConfig,
    pub virtual_hosts: Vec<VirtualHostConfig>,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// HTTPS listener. default 0.0.0.0:8443
    #[serde(deserialize_with = "listen_addr")]
    pub listen_addr: SocketAddr,
    /// Plain HTTP listener. default 0.0.0.0:8080
    #[serde(deserialize_with = "listen_addr")]
    pub listen_addr_http: SocketAddr,
    /// Management API. default 127.0.0.1:9080
    #[serde(deserialize_with = "listen_addr")]
    pub management_api_addr: SocketAddr,
    /// Data-plane worker threads. default 1, 1..=MAX_THREADS
    #[serde(deserialize_with = "int::<_, _, 1, MAX_THREADS>")]
    pub threads: usize,
    /// Upstream TCP connect timeout in ms. default 2000, at most 10 minutes
    #[serde(deserialize_with = "int::<_, _, 1, 600_000>")]
    pub upstream_connect_timeout_ms: u64,
    /// Upstream read timeout (time to first byte / between reads) in seconds -> 504. default 30
    #[serde(deserialize_with = "int::<_, _, 1, DAY_SECS>")]
    pub upstream_read_timeout_secs: u64,
    /// Client timeout in seconds: an idle keep-alive connection, a request body that stalls,
    /// and a client that takes nothing of its response for this long are given up.
    /// default 60
    #[serde(deserialize_with = "int::<_, _, 1, DAY_SECS>")]
    pub client_timeout_secs: u64,
    /// SIGTERM grace period: seconds in-flight requests get to finish (0: stop at once).
    /// default 30
    #[serde(deserialize_with = "int::<_, _, 0, DAY_SECS>")]
    pub shutdown_grace_secs: u64,
    /// A request announcing a longer body (`Content-Length`) is answered 413 before any
    /// backend is contacted. default 1 GiB, 1..=2^62
    #[serde(deserialize_with = "int::<_, _, 1, { 1 << 62 }>")]
    pub max_body_bytes: u64,
    /// Pass header names containing `_` on to backends (nginx's `underscores_in_headers`).
    /// default false: they are dropped.
    pub underscores_in_headers: bool,
    /// Keep a valid incoming `X-Request-Id` or make one, send it to the backend and back to
    /// the client (docs/logging.md). default true
    pub request_id: bool,
    /// TLS session tickets sealed with keys the cluster shares (a session resumes on any
    /// node). default true
    pub tls_session_tickets: bool,
    /// How often the leader makes a new ticket key; a ticket opens for one to two periods.
    /// default 43200 (12 h), 60..=604800
    #[serde(deserialize_with = "int::<_, _, 60, 604_800>")]
    pub tls_ticket_rotation_secs: u64,
    /// Optional default certificate (served when the client sends no SNI or an unknown name).
    /// Both or neither. Files must exist and be readable. When absent a self-signed one is made.
    #[serde(deserialize_with = "non_empty_path")]
    pub default_cert_path: Option<PathBuf>,
    #[serde(deserialize_with = "non_empty_path")]
    pub default_key_path: Option<PathBuf>,
    /// Peers whose `X-Forwarded-For`, `-Proto` and `-Host` are kept (the client address is
    /// appended to `X-Forwarded-For`); from anyone else they are replaced. default [], at
    /// most schema::MAX_TRUSTED_NETWORKS CIDRs
    #[serde(deserialize_with = "cidr_list")]
    pub trusted_forwarders: Vec<Cidr>,
    /// `[proxy.proxy_protocol]`: PROXY protocol headers from L4 load balancers.
    pub proxy_protocol: ProxyProtocolConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// Sources that must start every connection with a PROXY protocol header (v1 or v2); a
    /// header from anyone else closes the connection. default [] (headers are not looked
    /// for), at most schema::MAX_TRUSTED_NETWORKS CIDRs
    #[serde(deserialize_with = "cidr_list")]
    pub trusted: Vec<Cidr>,
    /// A trusted source's header must be complete within this many ms of the accept.
    /// default 5000, 100..=60000
    #[serde(deserialize_with = "int::<_, _, 100, 60_000>")]
    pub header_timeout_ms: u64,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        ProxyProtocolConfig {
            trusted: Vec::new(),
            header_timeout_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer token; None = no auth (only allowed when management_api_addr is loopback).
    #[serde(deserialize_with = "non_empty")]
    pub token: Option<String>,
    /// TLS certificate chain and key (PEM) for the management API. Both or neither. Required
    /// when management_api_addr is not loopback, unless allow_plaintext.
    #[serde(deserialize_with = "non_empty_path")]
    pub tls_cert_path: Option<PathBuf>,
    #[serde(deserialize_with = "non_empty_path")]
    pub tls_key_path: Option<PathBuf>,
    /// Instead of files: serve the certificate the cluster holds for this domain (a virtual
    /// host with `tls = "acme"`, issued and renewed by the leader, or an uploaded one); the
    /// node's default certificate until there is one.
    #[serde(deserialize_with = "opt_rule")]
    pub tls_domain: Option<DomainName>,
    /// default false: serve the API in plaintext beyond loopback anyway (logged loudly).
    pub allow_plaintext: bool,
    /// default None. CA certificate(s) (PEM) a client certificate must come from: clients
    /// without one are refused at the TLS handshake. Needs tls_cert_path.
    #[serde(deserialize_with = "non_empty_path")]
    pub client_ca_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// default 1, >= 1
    #[serde(deserialize_with = "int::<_, _, 1, { i64::MAX }>")]
    pub node_id: u64,
    /// default "./data/node-<node_id>" (relative paths are relative to the process cwd)
    #[serde(rename = "data_dir", deserialize_with = "non_empty_path")]
    data_dir_written: Option<PathBuf>,
    #[serde(skip)]
    pub data_dir: PathBuf,
    /// default 127.0.0.1:7101
    #[serde(deserialize_with = "listen_addr")]
    pub rpc_addr: SocketAddr,
    /// default 127.0.0.1:7946
    #[serde(deserialize_with = "listen_addr")]
    pub gossip_addr: SocketAddr,
    /// "host:port" strings, default []
    pub seeds: Vec<HostPort>,
    /// default 1, 1..=99
    #[serde(deserialize_with = "int::<_, _, 1, 99>")]
    pub bootstrap_expect: usize,
    /// default None. Required (non-empty) when bootstrap_expect > 1 or seeds non-empty.
    #[serde(deserialize_with = "non_empty")]
    pub secret: Option<String>,
    /// default None. Also accepted on receipt (RPC MACs, join proofs, sealed gossip), never
    /// used to send: for rolling the secret over (docs/cluster.md "Security").
    #[serde(deserialize_with = "non_empty")]
    pub secondary_secret: Option<String>,
    /// default "default"
    #[serde(deserialize_with = "cluster_id")]
    pub cluster_id: String,
    /// Take a Raft snapshot (and compact the log) every this many entries. default 5000
    #[serde(deserialize_with = "int::<_, _, 10, 100_000_000>")]
    pub snapshot_logs: u64,
    /// Mutual TLS on cluster RPC. default Required; Mixed and Off are for migrating a
    /// cluster from plaintext RPC (docs/cluster.md).
    pub rpc_tls: RpcTls,
    /// Where the cluster CA and this node's certificate come from. default: all None (the CA
    /// is derived from the secret).
    pub tls: ClusterTlsConfig,
}

/// The last day `rpc_tls = "mixed"` and `"off"` are supported (docs/cluster.md).
pub const RPC_TLS_MIGRATION_END: &str = "2027-06-30";

/// `[cluster] rpc_tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum RpcTls {
    /// Only mutual TLS, both ways; a plaintext request is answered 426 and closed.
    #[default]
    Required,
    /// Accepts TLS and plaintext on the same port; dials TLS first, plaintext if the peer
    /// does not speak it (migration only).
    Mixed,
    /// Plaintext only, as before mutual TLS (migration only).
    Off,
}

/// `[cluster.tls]`: operator-provided CA files. None set: the automatic CA.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterTlsConfig {
    /// The cluster CA certificate(s), PEM; every one is trusted (several during a CA
    /// rotation). Required when any other key here is set.
    #[serde(deserialize_with = "non_empty_path")]
    pub ca_cert_path: Option<PathBuf>,
    /// The key of the first certificate in ca_cert_path: the node issues its own certificate.
    #[serde(deserialize_with = "non_empty_path")]
    pub ca_key_path: Option<PathBuf>,
    /// This node's certificate (naming `node-<node_id>.pingora-vhost.internal`) and key,
    /// issued by the operator. Both or neither; not with ca_key_path.
    #[serde(deserialize_with = "non_empty_path")]
    pub cert_path: Option<PathBuf>,
    #[serde(deserialize_with = "non_empty_path")]
    pub key_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LetsEncryptConfig {
    /// default None. Required when any virtual host has tls = "acme".
    #[serde(deserialize_with = "email")]
    pub email: Option<String>,
    /// default false
    pub staging: bool,
    /// default None (unused by the replicated design; kept for seed compatibility)
    #[serde(deserialize_with = "non_empty_path")]
    pub cache_dir: Option<PathBuf>,
    /// default None (then Let's Encrypt prod or staging per `staging`)
    #[serde(deserialize_with = "http_url")]
    pub directory_url: Option<String>,
    /// default None; if set the file must exist
    #[serde(deserialize_with = "non_empty_path")]
    pub ca_bundle: Option<PathBuf>,
    /// default 30: renew a certificate this many days before it expires
    #[serde(deserialize_with = "int::<_, _, 1, 365>")]
    pub renew_before_days: u64,
    /// default 60: how often the leader looks for certificates to issue or renew
    #[serde(deserialize_with = "int::<_, _, 1, DAY_SECS>")]
    pub check_interval_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LogOutput {
    Console,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// default "info"; must be one of trace|debug|info|warn|error
    #[serde(deserialize_with = "log_level")]
    pub level: String,
    /// default Text
    pub format: LogFormat,
    /// default Console
    pub output: LogOutput,
    /// required when output = "file"
    #[serde(deserialize_with = "non_empty_path")]
    pub file_path: Option<PathBuf>,
}

/// `[access_log]`: one line per request (docs/logging.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    /// default false
    pub enabled: bool,
    /// default "stdout"
    pub output: AccessLogOutput,
    /// required when output = "file"; reopened on SIGUSR1 (logrotate)
    #[serde(deserialize_with = "non_empty_path")]
    pub file_path: Option<PathBuf>,
    /// default "json"
    pub format: AccessLogFormat,
    /// Lines waiting for the writer thread; when full, lines are dropped and counted.
    /// default 65536, 1..=4194304
    #[serde(deserialize_with = "int::<_, _, 1, 4_194_304>")]
    pub queue_size: usize,
    /// How often the writer thread writes what is queued. default 100, 1..=10000
    #[serde(deserialize_with = "int::<_, _, 1, 10_000>")]
    pub flush_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AccessLogOutput {
    Stdout,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AccessLogFormat {
    Json,
    Combined,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// default true
    pub enabled: bool,
    /// default None: metrics only at /api/v1/metrics on the management API
    #[serde(deserialize_with = "opt_listen_addr")]
    pub listen_addr: Option<SocketAddr>,
    /// default 500, 0..=100000: domains with series of their own (the rest: domain="_other")
    #[serde(deserialize_with = "int::<_, _, 0, 100000>")]
    pub max_domain_series: usize,
    /// default 500, 0..=100000: backends with series of their own (the rest: backend="_other")
    #[serde(deserialize_with = "int::<_, _, 0, 100000>")]
    pub max_backend_series: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// default 10, 1..=3600
    #[serde(deserialize_with = "int::<_, _, 1, 3600>")]
    pub interval_secs: u64,
    /// default 5, 1..=3600
    #[serde(deserialize_with = "int::<_, _, 1, 3600>")]
    pub timeout_secs: u64,
    /// default 3, 1..=1000
    #[serde(deserialize_with = "int::<_, _, 1, 1000>")]
    pub unhealthy_threshold: u32,
    /// default 2, 1..=1000
    #[serde(deserialize_with = "int::<_, _, 1, 1000>")]
    pub healthy_threshold: u32,
    /// default "/health"; "" means TCP connect check. Non-empty must start with '/'.
    #[serde(deserialize_with = "rule")]
    pub path: HealthPath,
    /// How many of the live nodes probe each backend (rendezvous hashing, see docs/health.md);
    /// at or above the cluster size every node probes every backend. default 2, 1..=1000
    #[serde(deserialize_with = "int::<_, _, 1, 1000>")]
    pub probers_per_backend: usize,
    /// How long a passive ejection (a run of 5xx answers or timeouts from real traffic) keeps
    /// a backend out; each repeat doubles it. default 30, 1..=3600
    #[serde(deserialize_with = "int::<_, _, 1, 3600>")]
    pub passive_ejection_secs: u64,
    /// The longest an ejection lasts. default 300, 1..=86400, >= passive_ejection_secs
    #[serde(deserialize_with = "int::<_, _, 1, DAY_SECS>")]
    pub passive_ejection_max_secs: u64,
    /// The most of a pool that passive ejections may hold out at once, rounded down (so a
    /// lone backend is never ejected at 50). default 50, 0..=100
    #[serde(deserialize_with = "int::<_, _, 0, 100>")]
    pub passive_max_ejected_percent: u8,
}

/// `[resolver]`: how backend names are looked up (IP literals need no lookup).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverConfig {
    /// Name servers (`ip` or `ip:port`, port 53 by default). default empty: the system's
    /// (`/etc/resolv.conf`). The hosts file is read either way.
    #[serde(deserialize_with = "dns_servers")]
    pub servers: Vec<SocketAddr>,
    /// A name is looked up again after its TTL, but not sooner than this. default 5
    #[serde(deserialize_with = "int::<_, _, 1, DAY_SECS>")]
    pub min_ttl_secs: u64,
    /// ... and not later than this (an answer may change before its TTL says). default 60,
    /// >= min_ttl_secs
    #[serde(deserialize_with = "int::<_, _, 1, DAY_SECS>")]
    pub max_ttl_secs: u64,
}

#[derive(Debug, Clone)]
pub struct VirtualHostConfig {
    pub domain: DomainName,
    pub enabled_backends_tag: Tag,
    /// default false
    pub http_to_https: bool,
    /// default None (plain HTTP only; HTTPS requests get the default cert)
    pub tls: TlsMode,
    /// default true: this domain's requests are written to the access log
    pub access_log: bool,
    /// default true; false: query strings are left out of this domain's access log lines
    pub access_log_query: bool,
    /// with tls = "manual": both required, files must exist and be readable PEM
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub id: BackendId,
    pub address: HostPort,
    /// default []; at most schema::MAX_TAGS_PER_BACKEND, duplicates dropped
    pub tags: Vec<Tag>,
    /// optional per-backend override; must start with '/' or be "" (TCP check)
    pub health_check_path: Option<HealthPath>,
    /// optional: "v1" | "v2", a PROXY protocol header on every connection to the backend
    pub send_proxy_protocol: Option<SendProxyProtocol>,
    /// TLS to the backend: an `https://` address or a `tls` table (its files read here)
    pub tls: Option<BackendTls>,
}

/// A problem that does not stop the node (e.g. a domain whose tag no backend carries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
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
            request_id: true,
            tls_session_tickets: true,
            tls_ticket_rotation_secs: 43_200,
            default_cert_path: None,
            default_key_path: None,
            trusted_forwarders: Vec::new(),
            proxy_protocol: ProxyProtocolConfig::default(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 1,
            data_dir_written: None,
            data_dir: default_data_dir(1),
            rpc_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7101),
            gossip_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7946),
            seeds: Vec::new(),
            bootstrap_expect: 1,
            secret: None,
            secondary_secret: None,
            cluster_id: "default".to_string(),
            snapshot_logs: 5000,
            rpc_tls: RpcTls::Required,
            tls: ClusterTlsConfig::default(),
        }
    }
}

impl Default for LetsEncryptConfig {
    fn default() -> Self {
        LetsEncryptConfig {
            email: None,
            staging: false,
            cache_dir: None,
            directory_url: None,
            ca_bundle: None,
            renew_before_days: 30,
            check_interval_secs: 60,
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

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            output: AccessLogOutput::Stdout,
            file_path: None,
            format: AccessLogFormat::Json,
            queue_size: 65_536,
            flush_interval_ms: 100,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen_addr: None,
            max_domain_series: 500,
            max_backend_series: 500,
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
            path: HealthPath::parse("/health").expect("a valid default"),
            probers_per_backend: 2,
            passive_ejection_secs: 30,
            passive_ejection_max_secs: 300,
            passive_max_ejected_percent: 50,
        }
    }
}

/// Default data dir for a node. Deliberately relative to the process working directory (not to
/// the config file's directory), like an explicit relative `data_dir`: it is where the node
/// *writes*, and operators expect `./data` to be next to where they started the binary.
fn default_data_dir(node_id: u64) -> PathBuf {
    PathBuf::from(format!("./data/node-{node_id}"))
}

// ---------------------------------------------------------------------------------------------
// Value rules for serde (`deserialize_with`); their messages get file:line: field from toml's
// span of the value.
// ---------------------------------------------------------------------------------------------

/// An integer in `MIN..=MAX`, converted to the field's type.
fn int<'de, D, T, const MIN: i64, const MAX: i64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error;
    let n = i64::deserialize(d)?;
    if n < MIN {
        return Err(D::Error::custom(format!("must be >= {MIN} (got {n})")));
    }
    if n > MAX {
        return Err(D::Error::custom(format!(
            "{n} is too large: must be <= {MAX}"
        )));
    }
    T::try_from(n).map_err(|_| D::Error::custom(format!("{n} is too large")))
}

/// A value checked by its shared field rule (`schema`).
fn rule<'de, D: Deserializer<'de>, T: FieldRule>(d: D) -> Result<T, D::Error> {
    d.deserialize_str(schema::RuleVisitor::<T>(std::marker::PhantomData))
}

fn opt_rule<'de, D: Deserializer<'de>, T: FieldRule>(d: D) -> Result<Option<T>, D::Error> {
    rule(d).map(Some)
}

/// A string checked by `f`, inside the value's own deserializer (so the error carries the
/// value's span, also for an item of a list).
fn checked<'de, D, T>(d: D, f: impl FnOnce(String) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Check<F>(F);
    impl<T, F: FnOnce(String) -> Result<T, String>> serde::de::Visitor<'_> for Check<F> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(v.to_string()).map_err(E::custom)
        }
    }
    d.deserialize_str(Check(f))
}

/// Longest free-form string in the file (paths, token, secret, URLs).
const MAX_STRING_LEN: usize = 4096;
/// Longest `cluster_id`: it travels in every gossip packet.
const MAX_CLUSTER_ID_LEN: usize = 64;

/// An empty or blank string reads like "set" while it means nothing: refused. So are control
/// characters and strings over [`MAX_STRING_LEN`].
fn non_empty_string(s: String) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else if s.len() > MAX_STRING_LEN {
        Err(format!(
            "{} bytes long; at most {MAX_STRING_LEN} are allowed",
            s.len()
        ))
    } else if s.chars().any(char::is_control) {
        Err("must not contain control characters".into())
    } else {
        Ok(s)
    }
}

fn cluster_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |s| {
        let s = non_empty_string(s)?;
        if s.len() > MAX_CLUSTER_ID_LEN {
            return Err(format!(
                "{} bytes long; at most {MAX_CLUSTER_ID_LEN} are allowed (it is sent in every gossip packet)",
                s.len()
            ));
        }
        Ok(s)
    })
}

fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, non_empty_string).map(Some)
}

/// serde default for switches that are on unless written off.
fn yes() -> bool {
    true
}

fn non_empty_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    checked(d, non_empty_string).map(|s| Some(PathBuf::from(s)))
}

fn email<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |e| {
        let e = non_empty_string(e)?;
        if !e.contains('@') || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{e:?} is not an email address"));
        }
        Ok(Some(e))
    })
}

fn http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, |u| {
        let u = non_empty_string(u)?;
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(format!("{u:?} must be an http:// or https:// URL"));
        }
        Ok(Some(u))
    })
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |l| match l.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" => Ok(l),
        other => Err(format!(
            "{other:?} is not one of trace|debug|info|warn|error"
        )),
    })
}

impl TryFrom<String> for LogFormat {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(format!("{other:?} is not one of json|text")),
        }
    }
}

impl TryFrom<String> for AccessLogOutput {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "stdout" => Ok(AccessLogOutput::Stdout),
            "file" => Ok(AccessLogOutput::File),
            other => Err(format!("{other:?} is not one of stdout|file")),
        }
    }
}

impl TryFrom<String> for AccessLogFormat {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "json" => Ok(AccessLogFormat::Json),
            "combined" => Ok(AccessLogFormat::Combined),
            other => Err(format!("{other:?} is not one of json|combined")),
        }
    }
}

impl TryFrom<String> for RpcTls {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "required" => Ok(RpcTls::Required),
            "mixed" => Ok(RpcTls::Mixed),
            "off" => Ok(RpcTls::Off),
            other => Err(format!("{other:?} is not one of required|mixed|off")),
        }
    }
}

impl TryFrom<String> for LogOutput {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "console" => Ok(LogOutput::Console),
            "file" => Ok(LogOutput::File),
            other => Err(format!("{other:?} is not one of console|file")),
        }
    }
}

/// A listener: IP:port with a port 1-65535 (port 0 would bind a random port, and
/// `rpc_addr` is advertised to peers).
fn parse_listen_addr(s: String) -> Result<SocketAddr, String> {
    let addr = s.parse::<SocketAddr>().map_err(|_| {
        let hint = if s.contains("://") {
            "; remove the scheme"
        } else if s.rsplit_once(':').is_some_and(|(h, _)| h.parse::<IpAddr>().is_err()) {
            "; a listen address needs an IP, not a host name"
        } else {
            ""
        };
        format!("invalid socket address {s:?}: expected IP:port such as 127.0.0.1:8080 or [::1]:8080{hint}")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{s:?}: port 0 is not allowed (use a fixed port 1-65535)"
        ));
    }
    Ok(addr)
}

fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    checked(d, parse_listen_addr)
}

fn opt_listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    listen_addr(d).map(Some)
}

/// One name server: `ip` or `ip:port` (port 53 by default).
struct DnsServer(SocketAddr);

impl<'de> Deserialize<'de> for DnsServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |text| {
            text.parse::<SocketAddr>()
                .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .ok()
                .filter(|a| a.port() != 0)
                .map(DnsServer)
                .ok_or_else(|| format!("{text:?} is not an IP address or IP:port (port 1-65535)"))
        })
    }
}

/// A bounded list of networks (the bound is checked on the whole list, the networks each).
fn cidr_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    use serde::de::Error;
    let list = Vec::<Cidr>::deserialize(d)?;
    if list.len() > schema::MAX_TRUSTED_NETWORKS {
        return Err(D::Error::custom(format!(
            "{} networks; at most {} are allowed",
            list.len(),
            schema::MAX_TRUSTED_NETWORKS
        )));
    }
    Ok(list)
}

fn dns_servers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    Ok(Vec::<DnsServer>::deserialize(d)?
        .into_iter()
        .map(|s| s.0)
        .collect())
}

// ---------------------------------------------------------------------------------------------
// The file as written: sections are the public structs above; entries keep required fields
// optional so a missing one is reported on its entry's line.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    proxy: ProxyConfig,
    api: ApiConfig,
    cluster: ClusterConfig,
    lets_encrypt: LetsEncryptConfig,
    logging: LoggingConfig,
    access_log: AccessLogConfig,
    metrics: MetricsConfig,
    health_check: HealthCheckConfig,
    resolver: ResolverConfig,
    virtual_hosts: Vec<FileVirtualHost>,
    backends: Vec<FileBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVirtualHost {
    domain: Option<DomainName>,
    enabled_backends_tag: Option<Tag>,
    #[serde(default)]
    http_to_https: bool,
    #[serde(default, deserialize_with = "opt_rule")]
    tls: Option<TlsMode>,
    #[serde(default = "yes")]
    access_log: bool,
    #[serde(default = "yes")]
    access_log_query: bool,
    #[serde(default, deserialize_with = "non_empty_path")]
    cert_path: Option<PathBuf>,
    #[serde(default, deserialize_with = "non_empty_path")]
    key_path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    id: Option<BackendId>,
    #[serde(default, deserialize_with = "backend_address")]
    address: Option<(HostPort, Option<bool>)>,
    #[serde(default)]
    tags: Vec<Tag>,
    health_check_path: Option<HealthPath>,
    #[serde(default, deserialize_with = "opt_rule")]
    send_proxy_protocol: Option<SendProxyProtocol>,
    tls: Option<FileBackendTls>,
}

/// A backend's `tls` table: files instead of the API's PEM text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackendTls {
    server_name: Option<String>,
    #[serde(default, deserialize_with = "non_empty_path")]
    ca_bundle: Option<PathBuf>,
    #[serde(default = "yes")]
    verify: bool,
    #[serde(default, deserialize_with = "non_empty_path")]
    client_cert: Option<PathBuf>,
    #[serde(default, deserialize_with = "non_empty_path")]
    client_key: Option<PathBuf>,
    #[serde(default)]
    http2: bool,
}

/// `host:port`, `https://host:port` or `http://host:port` (`schema::backend_address`).
fn backend_address<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<(HostPort, Option<bool>)>, D::Error> {
    checked(d, |raw| {
        schema::backend_address(&raw).map_err(|e| e.to_string())
    })
    .map(Some)
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Reads and validates the config file at `path`.
///
/// Relative certificate/key/CA paths are resolved against the directory of `path`.
pub fn load(path: &Path) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..at]);
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(&text, at),
            field: "(file)".into(),
            message: format!("invalid UTF-8 at byte {at}: the file must be UTF-8 text"),
        }
    })?;
    parse_str(path, &text)
}

/// Validates config `text` as if it had been read from `path` (used for messages and to
/// resolve relative certificate paths).
pub fn parse_str(path: &Path, text: &str) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
    let doc = Doc::new(path, text);
    let file: FileConfig = toml::from_str(text).map_err(|e| doc.toml_error(&e))?;
    let mut checker = Checker {
        doc,
        base_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        warnings: Vec::new(),
    };
    let config = checker.build(file)?;
    Ok((config, checker.warnings))
}

// ---------------------------------------------------------------------------------------------
// Rules across fields
// ---------------------------------------------------------------------------------------------

struct Checker<'a> {
    doc: Doc<'a>,
    /// Directory of the config file: base for relative certificate/key/CA paths.
    base_dir: PathBuf,
    warnings: Vec<ConfigWarning>,
}

impl Checker<'_> {
    fn error(&self, at: &str, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.doc.path.to_path_buf(),
            line: self.doc.line(at),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Warnings use the same `file:line: field: message` shape as errors.
    fn warn(&mut self, at: &str, message: impl std::fmt::Display) {
        let message = format!(
            "{}:{}: {}: {}",
            self.doc.path.display(),
            self.doc.line(at),
            display_path(at),
            message
        );
        self.warnings.push(ConfigWarning { message });
    }

    /// Relative paths of files the node *reads* are relative to the config file's directory, so
    /// a config and its certificates can move together. The file must exist, be readable and
    /// look like PEM, so a typo is reported by `--check` instead of at the first handshake.
    fn pem_file(&self, p: &Path, at: &str) -> Result<PathBuf, ConfigError> {
        let resolved = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        };
        let err = |m: String| self.error(at, &display_path(at), m);
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

    fn build(&mut self, file: FileConfig) -> Result<Config, ConfigError> {
        let mut proxy = file.proxy;
        match (&proxy.default_cert_path, &proxy.default_key_path) {
            (Some(_), None) => {
                return Err(self.error(
                    "proxy.default_cert_path",
                    "proxy.default_key_path",
                    "required when default_cert_path is set (both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(self.error(
                    "proxy.default_key_path",
                    "proxy.default_cert_path",
                    "required when default_key_path is set (both or neither)",
                ))
            }
            (Some(c), Some(k)) => {
                proxy.default_cert_path = Some(self.pem_file(c, "proxy.default_cert_path")?);
                proxy.default_key_path = Some(self.pem_file(k, "proxy.default_key_path")?);
            }
            (None, None) => {}
        }
        let addr = proxy.management_api_addr;
        if file.api.token.is_none() && !addr.ip().is_loopback() {
            return Err(self.error(
                "proxy.management_api_addr",
                "api.token",
                format!("refusing to expose the management API on {addr} without [api] token"),
            ));
        }
        let mut api = file.api;
        match (&api.tls_cert_path, &api.tls_key_path) {
            (Some(_), None) => {
                return Err(self.error(
                    "api.tls_cert_path",
                    "api.tls_key_path",
                    "required when tls_cert_path is set (both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(self.error(
                    "api.tls_key_path",
                    "api.tls_cert_path",
                    "required when tls_key_path is set (both or neither)",
                ))
            }
            (Some(_), Some(_)) if api.tls_domain.is_some() => {
                return Err(self.error(
                    "api.tls_domain",
                    "api.tls_domain",
                    "set either tls_domain or tls_cert_path/tls_key_path, not both",
                ))
            }
            (Some(c), Some(k)) => {
                api.tls_cert_path = Some(self.pem_file(c, "api.tls_cert_path")?);
                api.tls_key_path = Some(self.pem_file(k, "api.tls_key_path")?);
            }
            (None, None)
                if !addr.ip().is_loopback() && !api.allow_plaintext && api.tls_domain.is_none() =>
            {
                return Err(self.error(
                    "proxy.management_api_addr",
                    "api.tls_cert_path",
                    format!(
                        "refusing to serve the management API on {addr} in plaintext (the bearer \
                         token would cross the network in clear): set [api] tls_cert_path and \
                         tls_key_path, or tls_domain, or allow_plaintext = true"
                    ),
                ));
            }
            (None, None) => {}
        }
        if let Some(ca) = &api.client_ca_path {
            if api.tls_cert_path.is_none() && api.tls_domain.is_none() {
                return Err(self.error(
                    "api.client_ca_path",
                    "api.tls_cert_path",
                    "required when client_ca_path is set, or tls_domain (client certificates need TLS)",
                ));
            }
            api.client_ca_path = Some(self.pem_file(ca, "api.client_ca_path")?);
        }
        let mut cluster = file.cluster;
        self.cluster_tls(&mut cluster.tls)?;
        match cluster.rpc_tls {
            RpcTls::Required => {}
            RpcTls::Mixed => self.warn(
                "cluster.rpc_tls",
                format!(
                    "\"mixed\" also accepts and sends plaintext cluster RPC: a migration \
                     setting, supported until {RPC_TLS_MIGRATION_END} (docs/cluster.md)"
                ),
            ),
            RpcTls::Off => self.warn(
                "cluster.rpc_tls",
                format!(
                    "\"off\": cluster RPC is not encrypted (Raft entries, certificate keys and \
                     API writes cross the network in clear); supported until \
                     {RPC_TLS_MIGRATION_END} (docs/cluster.md)"
                ),
            ),
        }
        cluster.data_dir = cluster
            .data_dir_written
            .clone()
            .unwrap_or_else(|| default_data_dir(cluster.node_id));
        if cluster.secret.is_none() && (cluster.bootstrap_expect > 1 || !cluster.seeds.is_empty()) {
            let (at, why) = if cluster.seeds.is_empty() {
                ("cluster.bootstrap_expect", "bootstrap_expect > 1")
            } else {
                ("cluster.seeds", "seeds are set")
            };
            return Err(self.error(
                at,
                "cluster.secret",
                format!("required because {why}: it authenticates cluster RPC between nodes"),
            ));
        }
        if cluster.secret.is_none() && cluster.secondary_secret.is_some() {
            return Err(self.error(
                "cluster.secondary_secret",
                "cluster.secret",
                "required when secondary_secret is set (the primary secret is the one used to send)",
            ));
        }
        let mut lets_encrypt = file.lets_encrypt;
        if let Some(ca) = &lets_encrypt.ca_bundle {
            lets_encrypt.ca_bundle = Some(self.pem_file(ca, "lets_encrypt.ca_bundle")?);
        }
        let logging = file.logging;
        match (logging.output, &logging.file_path) {
            (LogOutput::File, None) => {
                return Err(self.error(
                    "logging.output",
                    "logging.file_path",
                    "required when output = \"file\"",
                ))
            }
            (LogOutput::Console, Some(_)) => self.warn(
                "logging.file_path",
                "ignored because output is not \"file\"",
            ),
            _ => {}
        }
        let access_log = file.access_log;
        match (access_log.output, &access_log.file_path) {
            (AccessLogOutput::File, None) => {
                return Err(self.error(
                    "access_log.output",
                    "access_log.file_path",
                    "required when output = \"file\"",
                ))
            }
            (AccessLogOutput::Stdout, Some(_)) => self.warn(
                "access_log.file_path",
                "ignored because output is not \"file\"",
            ),
            _ => {}
        }
        let hc = &file.health_check;
        if hc.passive_ejection_max_secs < hc.passive_ejection_secs {
            return Err(self.error(
                "health_check.passive_ejection_max_secs",
                "health_check.passive_ejection_max_secs",
                format!(
                    "must be >= health_check.passive_ejection_secs ({} < {})",
                    hc.passive_ejection_max_secs, hc.passive_ejection_secs
                ),
            ));
        }
        let resolver = file.resolver;
        if resolver.max_ttl_secs < resolver.min_ttl_secs {
            return Err(self.error(
                "resolver.max_ttl_secs",
                "resolver.max_ttl_secs",
                format!(
                    "must be >= resolver.min_ttl_secs ({} < {})",
                    resolver.max_ttl_secs, resolver.min_ttl_secs
                ),
            ));
        }
        let backends = self.backends(file.backends)?;
        let virtual_hosts = self.virtual_hosts(file.virtual_hosts, &lets_encrypt, &backends)?;
        let metrics = file.metrics;
        self.check_listener_clash(&proxy, &cluster, &metrics)?;
        Ok(Config {
            source_path: self.doc.path.to_path_buf(),
            proxy,
            api,
            cluster,
            lets_encrypt,
            logging,
            access_log,
            metrics,
            health_check: file.health_check,
            resolver,
            virtual_hosts,
            backends,
        })
    }

    /// `[cluster.tls]`: a CA certificate with either its key or this node's certificate and
    /// key, or nothing (the automatic CA).
    fn cluster_tls(&self, tls: &mut ClusterTlsConfig) -> Result<(), ConfigError> {
        let Some(ca) = tls.ca_cert_path.clone() else {
            for (at, set) in [
                ("cluster.tls.ca_key_path", tls.ca_key_path.is_some()),
                ("cluster.tls.cert_path", tls.cert_path.is_some()),
                ("cluster.tls.key_path", tls.key_path.is_some()),
            ] {
                if set {
                    return Err(self.error(
                        at,
                        "cluster.tls.ca_cert_path",
                        "required when any [cluster.tls] file is set (the CA peers must come from)",
                    ));
                }
            }
            return Ok(());
        };
        tls.ca_cert_path = Some(self.pem_file(&ca, "cluster.tls.ca_cert_path")?);
        match (&tls.ca_key_path, &tls.cert_path, &tls.key_path) {
            (Some(k), None, None) => {
                tls.ca_key_path = Some(self.pem_file(k, "cluster.tls.ca_key_path")?);
            }
            (None, Some(c), Some(k)) => {
                tls.cert_path = Some(self.pem_file(c, "cluster.tls.cert_path")?);
                tls.key_path = Some(self.pem_file(k, "cluster.tls.key_path")?);
            }
            (Some(_), _, _) => {
                return Err(self.error(
                    "cluster.tls.ca_key_path",
                    "cluster.tls.ca_key_path",
                    "set either ca_key_path (the node issues its own certificate) or                      cert_path and key_path, not both",
                ))
            }
            (None, None, None) => {
                return Err(self.error(
                    "cluster.tls.ca_cert_path",
                    "cluster.tls.ca_key_path",
                    "ca_cert_path needs ca_key_path, or cert_path and key_path",
                ))
            }
            (None, Some(_), None) => {
                return Err(self.error(
                    "cluster.tls.cert_path",
                    "cluster.tls.key_path",
                    "required when cert_path is set (both or neither)",
                ))
            }
            (None, None, Some(_)) => {
                return Err(self.error(
                    "cluster.tls.key_path",
                    "cluster.tls.cert_path",
                    "required when key_path is set (both or neither)",
                ))
            }
        }
        Ok(())
    }

    /// Two TCP listeners on the same port either fail to bind or (with SO_REUSEPORT) silently
    /// split traffic; both are worth catching at `--check` time. gossip_addr is UDP, so it may
    /// share a port number with them.
    fn check_listener_clash(
        &self,
        proxy: &ProxyConfig,
        cluster: &ClusterConfig,
        metrics: &MetricsConfig,
    ) -> Result<(), ConfigError> {
        let mut listeners = vec![
            ("proxy.listen_addr", proxy.listen_addr),
            ("proxy.listen_addr_http", proxy.listen_addr_http),
            ("proxy.management_api_addr", proxy.management_api_addr),
            ("cluster.rpc_addr", cluster.rpc_addr),
        ];
        if let Some(addr) = metrics.listen_addr {
            listeners.push(("metrics.listen_addr", addr));
        }
        for (i, &(b_field, b)) in listeners.iter().enumerate() {
            for &(a_field, a) in &listeners[..i] {
                let ip_clash =
                    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                if a.port() != b.port() || !ip_clash {
                    continue;
                }
                // Report on the one the user wrote (a default cannot be "wrong" on its own).
                let written = |f: &str| self.doc.span(f).is_some();
                let ((at, at_addr), (other, other_addr)) = if written(b_field) {
                    ((b_field, b), (a_field, a))
                } else {
                    ((a_field, a), (b_field, b))
                };
                let how = if written(other) { "" } else { " (default)" };
                return Err(self.error(
                    at,
                    at,
                    format!(
                        "{at_addr} clashes with {other} = {other_addr}{how}: listeners need distinct ports"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn backends(&self, raw: Vec<FileBackend>) -> Result<Vec<BackendConfig>, ConfigError> {
        if raw.len() > MAX_BACKENDS {
            let at = format!("backends.{MAX_BACKENDS}");
            return Err(self.error(&at, "backends", format!("at most {MAX_BACKENDS} backends")));
        }
        let mut out = Vec::with_capacity(raw.len());
        // id -> index of the first definition, for the duplicate message.
        let mut seen: HashMap<BackendId, usize> = HashMap::new();
        for (i, b) in raw.into_iter().enumerate() {
            let at = |name: &str| format!("backends.{i}.{name}");
            let entry = format!("backends.{i}");
            let Some(id) = b.id else {
                return Err(self.error(&entry, &display_path(&at("id")), "missing (required)"));
            };
            if let Some(first) = seen.get(&id) {
                let first_line = self.doc.line(&format!("backends.{first}.id"));
                return Err(self.error(
                    &at("id"),
                    &display_path(&at("id")),
                    format!(
                        "duplicate backend id {:?} (first defined on line {first_line})",
                        &*id
                    ),
                ));
            }
            seen.insert(id.clone(), i);
            let Some((address, scheme_tls)) = b.address else {
                return Err(self.error(
                    &entry,
                    &display_path(&at("address")),
                    "missing (required)",
                ));
            };
            let tls = match (b.tls, scheme_tls) {
                (Some(_), Some(false)) => {
                    return Err(self.error(
                        &at("tls"),
                        &display_path(&at("tls")),
                        "a tls table with an http:// address: use https:// or no scheme",
                    ))
                }
                (Some(file), _) => Some(self.backend_tls(file, &at("tls"))?),
                (None, Some(true)) => Some(BackendTls::default()),
                (None, _) => None,
            };
            let tags = schema::tag_list(b.tags)
                .map_err(|e| self.error(&at("tags"), &display_path(&at("tags")), e.to_string()))?;
            out.push(BackendConfig {
                id,
                address,
                tags,
                health_check_path: b.health_check_path,
                send_proxy_protocol: b.send_proxy_protocol,
                tls,
            });
        }
        Ok(out)
    }

    /// Reads a backend's `tls` files and checks the result by the rule the API and Raft use.
    fn backend_tls(&self, file: FileBackendTls, at: &str) -> Result<BackendTls, ConfigError> {
        let read = |p: &Option<PathBuf>, name: &str| -> Result<Option<String>, ConfigError> {
            let Some(p) = p else { return Ok(None) };
            let field = format!("{at}.{name}");
            let path = self.pem_file(p, &field)?;
            std::fs::read_to_string(&path).map(Some).map_err(|e| {
                self.error(
                    &field,
                    &display_path(&field),
                    format!("cannot read {}: {e}", path.display()),
                )
            })
        };
        BackendTls {
            server_name: file.server_name,
            ca_pem: read(&file.ca_bundle, "ca_bundle")?,
            verify: file.verify,
            client_cert_pem: read(&file.client_cert, "client_cert")?,
            client_key_pem: read(&file.client_key, "client_key")?,
            http2: file.http2,
        }
        .checked()
        // The rule names the API's fields (ca_pem, ...): say which file they came from.
        .map_err(|e| {
            let msg = e
                .to_string()
                .replace("ca_pem", "ca_bundle")
                .replace("client_cert_pem", "client_cert")
                .replace("client_key_pem", "client_key");
            self.error(at, &display_path(at), msg)
        })
    }

    fn virtual_hosts(
        &mut self,
        raw: Vec<FileVirtualHost>,
        lets_encrypt: &LetsEncryptConfig,
        backends: &[BackendConfig],
    ) -> Result<Vec<VirtualHostConfig>, ConfigError> {
        if raw.len() > MAX_DOMAINS {
            let at = format!("virtual_hosts.{MAX_DOMAINS}");
            return Err(self.error(
                &at,
                "virtual_hosts",
                format!("at most {MAX_DOMAINS} domains"),
            ));
        }
        let carried_tags: std::collections::HashSet<&str> = backends
            .iter()
            .flat_map(|b| b.tags.iter().map(|t| t.as_str()))
            .collect();
        let mut out = Vec::with_capacity(raw.len());
        // domain -> index of the first definition, for the duplicate message.
        let mut seen: HashMap<DomainName, usize> = HashMap::new();
        for (i, v) in raw.into_iter().enumerate() {
            let at = |name: &str| format!("virtual_hosts.{i}.{name}");
            let entry = format!("virtual_hosts.{i}");
            let Some(domain) = v.domain else {
                return Err(self.error(&entry, &display_path(&at("domain")), "missing (required)"));
            };
            if let Some(first) = seen.get(&domain) {
                let first_line = self.doc.line(&format!("virtual_hosts.{first}.domain"));
                return Err(self.error(
                    &at("domain"),
                    &display_path(&at("domain")),
                    format!(
                        "duplicate domain {:?} (first defined on line {first_line})",
                        &*domain
                    ),
                ));
            }
            seen.insert(domain.clone(), i);
            let Some(tag) = v.enabled_backends_tag else {
                return Err(self.error(
                    &entry,
                    &display_path(&at("enabled_backends_tag")),
                    "missing (required)",
                ));
            };
            let tls = v.tls.unwrap_or(TlsMode::None);
            // Errors about tls point at the tls key, or the entry when it is implied.
            let tls_at = if v.tls.is_some() {
                at("tls")
            } else {
                entry.clone()
            };
            let (cert_path, key_path) = match tls {
                TlsMode::Manual => {
                    let (Some(c), Some(k)) = (&v.cert_path, &v.key_path) else {
                        let missing = if v.cert_path.is_none() {
                            "cert_path"
                        } else {
                            "key_path"
                        };
                        return Err(self.error(
                            &tls_at,
                            &display_path(&at(missing)),
                            "required with tls = \"manual\" (cert_path and key_path)",
                        ));
                    };
                    (
                        Some(self.pem_file(c, &at("cert_path"))?),
                        Some(self.pem_file(k, &at("key_path"))?),
                    )
                }
                TlsMode::Acme | TlsMode::None => {
                    for (name, p) in [("cert_path", &v.cert_path), ("key_path", &v.key_path)] {
                        if p.is_some() {
                            self.warn(&at(name), "ignored because tls is not \"manual\"");
                        }
                    }
                    (None, None)
                }
            };
            if tls == TlsMode::Acme && domain.starts_with("*.") {
                return Err(self.error(
                    &tls_at,
                    &display_path(&at("tls")),
                    format!("\"acme\" cannot issue a certificate for the wildcard {:?} (HTTP-01 validation); use tls = \"manual\"", &*domain),
                ));
            }
            if tls == TlsMode::Acme && lets_encrypt.email.is_none() {
                return Err(self.error(
                    &tls_at,
                    &display_path(&at("tls")),
                    "tls = \"acme\" requires [lets_encrypt] email (the ACME account contact)",
                ));
            }
            // Not an error: backends can be added through the API after start.
            if !carried_tags.contains(tag.as_str()) {
                let line = self.doc.line(&at("enabled_backends_tag"));
                self.warn(
                    &at("enabled_backends_tag"),
                    format!(
                        "domain {:?} (line {line}) uses tag {:?}, which no backend carries; \
                         its requests get 503 until a backend with that tag exists",
                        &*domain, &*tag
                    ),
                );
            }
            out.push(VirtualHostConfig {
                domain,
                enabled_backends_tag: tag,
                http_to_https: v.http_to_https,
                tls,
                access_log: v.access_log,
                access_log_query: v.access_log_query,
                cert_path,
                key_path,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The document's spans: field path <-> line. Paths are dotted with numeric indices
// ("backends.3.id"); messages show them as "backends[3].id".
// ---------------------------------------------------------------------------------------------

struct Doc<'a> {
    path: &'a Path,
    text: &'a str,
    /// The spanned document, parsed only when a line must be found (an error or a warning):
    /// a valid file without warnings is parsed once, by serde. None when the text does not
    /// parse (then toml's own error is reported).
    doc: std::cell::OnceCell<Option<ImDocument<&'a str>>>,
    /// Byte offset where each line starts: spans become line numbers in O(log n), so a
    /// 100,000-entry file loads in linear time.
    line_starts: Vec<usize>,
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }

    fn table_like(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    /// Child by key or index, with the key's own span.
    fn child(self, segment: &str) -> Option<(Node<'a>, Option<Range<usize>>)> {
        if let Ok(i) = segment.parse::<usize>() {
            let item = match self {
                Node::Item(i) => i,
                Node::Value(v) => return Some((Node::Value(v.as_array()?.get(i)?), None)),
                Node::Table(_) => return None,
            };
            if let Some(aot) = item.as_array_of_tables() {
                return Some((Node::Table(aot.get(i)?), None));
            }
            return Some((Node::Value(item.as_array()?.get(i)?), None));
        }
        let (key, item) = self.table_like()?.get_key_value(segment)?;
        Some((Node::Item(item), key.span()))
    }

    /// Children in order, with their path segment and key span.
    fn children(self) -> Vec<(String, Node<'a>, Option<Range<usize>>)> {
        if let Some(t) = self.table_like() {
            return t
                .iter()
                .filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    Some((k.to_string(), Node::Item(item), key.span()))
                })
                .collect();
        }
        let array = match self {
            Node::Item(i) => {
                if let Some(aot) = i.as_array_of_tables() {
                    return aot
                        .iter()
                        .enumerate()
                        .map(|(n, t)| (n.to_string(), Node::Table(t), None))
                        .collect();
                }
                i.as_array()
            }
            Node::Value(v) => v.as_array(),
            Node::Table(_) => None,
        };
        array
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(n, v)| (n.to_string(), Node::Value(v), None))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// "backends.3.id" -> "backends[3].id".
fn display_path(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

impl<'a> Doc<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        Doc {
            path,
            text,
            doc: std::cell::OnceCell::new(),
            line_starts: line_starts(text),
        }
    }

    fn tree(&self) -> Option<&ImDocument<&'a str>> {
        self.doc
            .get_or_init(|| ImDocument::parse(self.text).ok())
            .as_ref()
    }

    /// Span of the value at `path` (or of the deepest written part of it).
    fn span(&self, path: &str) -> Option<Range<usize>> {
        let mut node = Node::Table(self.tree()?.as_table());
        let mut span = None;
        for seg in path.split('.') {
            match node.child(seg) {
                Some((child, _)) => {
                    node = child;
                    span = child.span().or(span);
                }
                None => return None,
            }
        }
        span
    }

    /// Line of `path`, or of its nearest written ancestor (1 when none is written).
    fn line(&self, path: &str) -> usize {
        let mut p = path;
        loop {
            if let Some(span) = self.span(p) {
                return self.line_starts.partition_point(|&s| s <= span.start);
            }
            match p.rsplit_once('.') {
                Some((parent, _)) => p = parent,
                None => return 1,
            }
        }
    }

    /// The deepest field whose key or value holds `span`.
    fn path_at(&self, span: &Range<usize>, unknown: Option<&str>) -> Option<String> {
        let mut node = Node::Table(self.tree()?.as_table());
        let inside = |outer: Option<Range<usize>>| {
            outer.is_some_and(|o| o.start <= span.start && span.end <= o.end)
        };
        let mut path: Vec<String> = Vec::new();
        loop {
            let next = node.children().into_iter().find_map(|(seg, child, key)| {
                if key.as_ref() == Some(span) {
                    Some((seg, None))
                } else if inside(child.span()) {
                    Some((seg, Some(child)))
                } else {
                    None
                }
            });
            match next {
                Some((seg, child)) => {
                    path.push(seg);
                    match child {
                        Some(c) => node = c,
                        None => break,
                    }
                }
                None => {
                    // The error is on a key inside this table that the tree did not pin down.
                    path.extend(unknown.map(str::to_string));
                    break;
                }
            }
        }
        (!path.is_empty()).then(|| display_path(&path.join(".")))
    }

    fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        // toml's messages can span lines ("invalid string\nexpected ..."); keep ours on one line.
        let message = err
            .message()
            .trim_end()
            .replace('\n', "; ")
            .replace("expected i64", "expected an integer");
        let message = if message.is_empty() {
            // toml leaves the message empty for some syntax errors: say what is at the spot.
            match err.span().and_then(|sp| self.text.get(sp.start..)) {
                Some(rest) if rest.lines().next().unwrap_or("").trim().is_empty() => {
                    "a value is missing (the line ends here)".to_string()
                }
                Some(rest) => match rest.chars().next() {
                    Some(c) if c.is_control() => format!(
                        "control character U+{:04X} is not allowed here (not even in a comment)",
                        u32::from(c)
                    ),
                    Some(c) => format!("invalid TOML syntax at {c:?}"),
                    None => "a value is missing (the file ends here)".to_string(),
                },
                None => "invalid TOML syntax".to_string(),
            }
        } else {
            message
        };
        let (line, field) = match err.span() {
            Some(span) => {
                let unknown = backticked_after(&message, "unknown field `");
                let field = self
                    .path_at(&span, unknown.as_deref())
                    .or_else(|| field_by_lines(self.text, span.start, unknown.as_deref()));
                (line_of(self.text, span.start), field)
            }
            None => (1, None),
        };
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            field: field.unwrap_or_else(|| "(toml)".to_string()),
            message,
        }
    }
}

/// `name` from a message such as "unknown field `name`, expected ...".
fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.split_once(prefix)?.1;
    Some(rest.split_once('`')?.0.to_string())
}

/// Line-based fallback for text that does not parse: the enclosing `[table]`/`[[array]]`
/// header (with its index) plus the key written on or above the error line.
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
mod tests;
