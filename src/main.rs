//! Entry point: CLI, config, wiring of the data plane and the control plane, signals.
//! `main` is plain (no tokio runtime): Pingora's `run_forever` owns the runtimes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;

use pingora_vhost::cluster::store;
use pingora_vhost::config::{self, Config, TlsMode};
use pingora_vhost::control::{ControlPlane, ControlPlaneService};
use pingora_vhost::observability::access_log::{self, AccessLog};
use pingora_vhost::observability::{logging, Metrics};
use pingora_vhost::proxy::edge::Edge;
use pingora_vhost::proxy::h1::VhostApp;
use pingora_vhost::proxy::listeners::ProxyListeners;
use pingora_vhost::proxy::service::VhostProxy;
use pingora_vhost::proxy::tls::{self, CertStore, SniResolver};
use pingora_vhost::proxy::tls_accept::TlsListener;
use pingora_vhost::proxy::DataPlane;
use pingora_vhost::resolve;
use pingora_vhost::state::{Backend, Command, Domain};
use pingora_vhost::upgrade;

/// Longest a start waits for backend names to resolve before serving.
const PRIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

// The proxy allocates per request (headers, buffers): mimalloc is markedly cheaper than glibc
// malloc there (see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "pingora-vhost",
    version,
    about = "Clustered virtual-host reverse proxy"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// Validate the config file and exit (0 when valid).
    #[arg(long)]
    check: bool,
    /// Take over listening sockets from a running instance (Pingora graceful upgrade).
    #[arg(long, short = 'u')]
    upgrade: bool,
}

fn main() {
    // Both ring and aws-lc-rs are in the dependency tree: pick one before any TLS config.
    pingora_rustls::install_default_crypto_provider();
    let cli = Cli::parse();
    let (cfg, warnings) = match config::load(&cli.config) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let seed = match seed_command(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    if cli.check {
        for w in &warnings {
            eprintln!("warning: {}", w.message);
        }
        println!("{}: ok", cli.config.display());
        return;
    }
    if let Err(e) = run(cli, cfg, warnings, seed) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The config file's domains and backends as the command that seeds a new cluster. Manual
/// certificates are read and checked here, so `--check` catches a bad pair too.
fn seed_command(cfg: &Config) -> anyhow::Result<Command> {
    let mut domains = Vec::new();
    for vh in &cfg.virtual_hosts {
        let cert = match (vh.tls, &vh.cert_path, &vh.key_path) {
            (TlsMode::Manual, Some(c), Some(k)) => {
                Some(read_pair(&cfg.source_path, &vh.domain, c, k)?)
            }
            _ => None,
        };
        domains.push(Domain {
            domain: vh.domain.clone(),
            enabled_backends_tag: vh.enabled_backends_tag.clone(),
            http_to_https: vh.http_to_https,
            tls: vh.tls,
            cert,
            access_log: vh.access_log,
            access_log_query: vh.access_log_query,
        });
    }
    let backends = cfg
        .backends
        .iter()
        .map(|b| Backend {
            id: b.id.clone(),
            address: b.address.clone(),
            tags: b.tags.clone(),
            health_check_path: b.health_check_path.clone(),
            draining: false,
            send_proxy_protocol: b.send_proxy_protocol,
            tls: b.tls.clone().map(Box::new),
        })
        .collect();
    Ok(Command::Seed { domains, backends })
}

fn read_pair(
    cfg_path: &Path,
    domain: &str,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<pingora_vhost::state::CertPair> {
    let c = std::fs::read_to_string(cert).with_context(|| {
        format!(
            "{}: virtual host {domain}: reading cert_path {}",
            cfg_path.display(),
            cert.display()
        )
    })?;
    let k = std::fs::read_to_string(key).with_context(|| {
        format!(
            "{}: virtual host {domain}: reading key_path {}",
            cfg_path.display(),
            key.display()
        )
    })?;
    tls::cert_pair(&c, &k).with_context(|| {
        format!(
            "{}: virtual host {domain}: cert_path {} / key_path {}",
            cfg_path.display(),
            cert.display(),
            key.display()
        )
    })
}

fn default_certificate(cfg: &Config) -> anyhow::Result<rustls::sign::CertifiedKey> {
    let (chain, key) = match (&cfg.proxy.default_cert_path, &cfg.proxy.default_key_path) {
        (Some(c), Some(k)) => (
            std::fs::read_to_string(c)
                .with_context(|| format!("reading default_cert_path {}", c.display()))?,
            std::fs::read_to_string(k)
                .with_context(|| format!("reading default_key_path {}", k.display()))?,
        ),
        _ => tls::self_signed(&["localhost"])
            .context("generating the default self-signed certificate")?,
    };
    tls::certified_key(&chain, &key).context("default certificate")
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data_dir {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting permissions on {}", dir.display()))?;
    }
    Ok(())
}

fn run(
    cli: Cli,
    cfg: Config,
    warnings: Vec<config::ConfigWarning>,
    seed: Command,
) -> anyhow::Result<()> {
    let logs = logging::init(&cfg.logging)?;
    for w in &warnings {
        tracing::warn!("{}", w.message);
    }
    let data_dir = cfg.cluster.data_dir.clone();
    create_private_dir(&data_dir)?;

    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    pingora_vhost::observability::traffic::configure(
        cfg.metrics.max_domain_series,
        cfg.metrics.max_backend_series,
    );
    // Before anything else can receive it: SIGUSR1 would otherwise end the process.
    access_log::install_reopen_signal()?;
    let hc = &cfg.health_check;
    pingora_vhost::live::ejection::configure(pingora_vhost::live::ejection::Policy {
        base_ms: hc.passive_ejection_secs * 1000,
        max_ms: hc.passive_ejection_max_secs * 1000,
        max_ejected_percent: hc.passive_max_ejected_percent,
    });
    let access_log = AccessLog::start(&cfg.access_log, cfg.cluster.node_id, &metrics)?;
    let data = Arc::new(
        DataPlane::new(CertStore::new(default_certificate(&cfg)?))
            .with_ticket_rotation(std::time::Duration::from_secs(
                cfg.proxy.tls_ticket_rotation_secs,
            ))
            .with_access_log(access_log),
    );
    let publisher: store::Publisher = {
        let data = data.clone();
        Arc::new(move |state, changes| data.publish(state, changes))
    };
    let store = if cli.upgrade {
        // The running process holds the store until it exits: serve its state meanwhile.
        let handoff = upgrade::fetch(
            &upgrade::socket_path(&data_dir),
            std::time::Duration::from_secs(10),
        )?;
        upgrade::adopt(&data, &handoff);
        tracing::info!(
            domains = handoff.state.domains.len(),
            backends = handoff.state.backends.len(),
            "graceful upgrade: serving the running process's state; send it SIGQUIT now"
        );
        None
    } else {
        // Loads the last known state before anything listens: the proxy serves it at once,
        // with its backend names resolved (bounded).
        let (log, sm) =
            store::open(&data_dir, publisher.clone()).context("opening the Raft store")?;
        let addresses =
            sm.with_state(|s| s.backends.values().map(|b| b.address.to_string()).collect());
        // Opening compiled the table once; again only if names were looked up (a full
        // compile is most of a restart at 100,000 domains).
        if resolve::prime(&data.live, &cfg.resolver, addresses, PRIME_LIMIT) {
            let stored = data.live.addrs.stored();
            sm.with_state(|s| data.publish_routes(s));
            data.live.addrs.published(stored);
        }
        Some((log, sm))
    };

    // For operators (`kill -QUIT $(cat .../pingora-vhost.pid)`); Pingora writes it only when
    // daemonized. Written once this process owns the node (store opened or state handed over),
    // so a mistaken second start cannot overwrite the running process's pid.
    let pid_file = data_dir.join("pingora-vhost.pid");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&pid_file)
            .and_then(|mut f| writeln!(f, "{}", std::process::id()))
            .with_context(|| format!("writing {}", pid_file.display()))?;
    }

    let conf = ServerConf {
        threads: cfg.proxy.threads,
        max_retries: pingora_vhost::proxy::rules::MAX_ATTEMPTS,
        // One single-threaded runtime per worker thread, as nginx workers: a connection stays
        // on the thread that accepted it. Measured ~2 % less CPU per proxied request than
        // tokio's work-stealing scheduler (bench/README.md). The control plane brings its own
        // multi-threaded runtime (control.rs).
        work_stealing: false,
        grace_period_seconds: Some(cfg.proxy.shutdown_grace_secs),
        graceful_shutdown_timeout_seconds: Some(2),
        pid_file: pid_file.display().to_string(),
        upgrade_sock: data_dir.join("upgrade.sock").display().to_string(),
        ..Default::default()
    };
    let opt = Opt {
        upgrade: cli.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let edge = Arc::new(Edge::new(&cfg.proxy, metrics.clone()));
    let proxy = VhostProxy {
        edge,
        data: data.clone(),
        metrics: metrics.clone(),
        connect_timeout: std::time::Duration::from_millis(cfg.proxy.upstream_connect_timeout_ms),
        read_timeout: std::time::Duration::from_secs(cfg.proxy.upstream_read_timeout_secs),
        https_port: cfg.proxy.listen_addr.port(),
        client_timeout: std::time::Duration::from_secs(cfg.proxy.client_timeout_secs),
        strict: pingora_vhost::proxy::strict::Strictness {
            max_body_bytes: cfg.proxy.max_body_bytes,
            underscores_in_headers: cfg.proxy.underscores_in_headers,
        },
        request_ids: cfg.proxy.request_id,
    };
    // HTTP/1.1 takes the lean path; HTTP/2 and unusual requests go on to Pingora's proxy.
    let tls = TlsListener::new(
        Arc::new(SniResolver(data.certs.clone())),
        cfg.proxy.tls_session_tickets.then(|| data.tickets.clone()),
        std::time::Duration::from_secs(cfg.proxy.client_timeout_secs),
    )
    .context("TLS settings")?;
    let app = Arc::new(VhostApp::new(proxy, &server.configuration).with_tls(tls));
    // Plain HTTP on our own accept loop, HTTPS on Pingora's listener (`proxy::listeners`).
    let proxy_service = ProxyListeners::new(app, cfg.proxy.listen_addr_http, cfg.proxy.listen_addr);

    let mut control = background_service(
        "control plane",
        ControlPlaneService::new(ControlPlane {
            config: cfg,
            store: Mutex::new(store),
            publisher,
            logs,
            data,
            metrics,
            seed,
        }),
    );
    // Its Pingora runtime only awaits the control plane's own runtime (control.rs).
    control.threads = Some(1);
    server.add_service(proxy_service);
    server.add_service(control);
    server.run_forever();
}
