//! The control plane: one Pingora background service that, inside a runtime of its own, starts
//! Raft, the cluster RPC listener, the management API and the metrics listener, seeds a new
//! cluster from the config file, and on shutdown waits for in-flight requests to finish.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::net::TcpListener;

use crate::acme;
use crate::api::{self, ApiState};
use crate::cluster::store::{self, LogStore, StateMachineStore};
use crate::cluster::tls::{self, ClusterTls};
use crate::cluster::{election, membership, rpc, ClusterNode};
use crate::config::Config;
use crate::gossip::Gossip;
use crate::health;
use crate::keyring::Keyring;
use crate::observability::log_stream::LogStream;
use crate::observability::Metrics;
use crate::proxy::DataPlane;
use crate::resolve;
use crate::state::{Command, State};
use crate::supervise::Tasks;
use crate::upgrade;

pub struct ControlPlane {
    pub config: Config,
    /// The opened Raft store; `None` after a graceful upgrade, where the old process still
    /// holds it and it is opened once that process has exited.
    pub store: Mutex<Option<(LogStore, StateMachineStore)>>,
    pub publisher: store::Publisher,
    pub logs: Arc<LogStream>,
    pub data: Arc<DataPlane>,
    pub metrics: Arc<Metrics>,
    /// The config file's domains and backends, as the seed command for a new cluster.
    pub seed: Command,
}

/// The Pingora background service that hosts the control plane.
pub struct ControlPlaneService(Arc<ControlPlane>);

impl ControlPlaneService {
    pub fn new(plane: ControlPlane) -> Self {
        Self(Arc::new(plane))
    }
}

#[async_trait]
impl BackgroundService for ControlPlaneService {
    /// Runs the control plane on a multi-threaded runtime of its own, on a thread of its own,
    /// and awaits its end. Pingora's runtimes are one single-threaded runtime per worker
    /// thread in this binary (`work_stealing = false`, which saves the proxy's request path
    /// ~2 % of CPU), and on one thread a slow disk sync or ACME call would hold up the API and
    /// gossip. This must await, not block: on SIGINT Pingora stops its runtimes without
    /// telling the services, and a blocked runtime thread would keep the process alive.
    async fn start(&self, shutdown: ShutdownWatch) {
        let plane = self.0.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("control plane".to_string())
            .spawn(move || {
                let _ = done_tx.send(plane.run_on_own_runtime(shutdown));
            });
        let result = match spawned {
            Err(e) => Err(anyhow::Error::new(e).context("starting the control plane's thread")),
            Ok(_) => done_rx
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the control plane panicked"))),
        };
        if let Err(e) = result {
            tracing::error!("control plane failed: {e:#}");
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Worker threads of the control plane's runtime.
const CONTROL_PLANE_THREADS: usize = 2;

/// Binds `addr`, retrying briefly: a restarting node may find the port still held for a
/// moment by its predecessor.
async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline && e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr} ({what})")),
        }
    }
}

impl ControlPlane {
    fn run_on_own_runtime(&self, mut shutdown: ShutdownWatch) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(CONTROL_PLANE_THREADS)
            .thread_name("control plane")
            .enable_all()
            .build()
            .context("starting the control plane's runtime")?;
        let result = runtime.block_on(self.run(&mut shutdown));
        // Tasks still running (listeners, timers) end with the runtime.
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    }

    async fn run(&self, shutdown: &mut ShutdownWatch) -> anyhow::Result<()> {
        let cfg = &self.config;
        let opened = self.store.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (log, sm) = match opened {
            Some(s) => s,
            None => self.open_store_after_old_process().await?,
        };
        let mut tasks = Tasks::default();
        if let Some(listener) = upgrade::bind(&upgrade::socket_path(&cfg.cluster.data_dir)) {
            tasks.spawn(
                "upgrade handoff",
                upgrade::serve(listener, sm.clone(), self.data.clone()),
            );
        }
        let api_tls = api_tls(&cfg.api, &self.data.certs)?;
        if api_tls.is_none() && !cfg.proxy.management_api_addr.ip().is_loopback() {
            tracing::warn!(
                addr = %cfg.proxy.management_api_addr,
                "[api] allow_plaintext = true: the management API is served WITHOUT TLS beyond \
                 loopback; its bearer token crosses the network in clear"
            );
        }
        let api_listener = bind(cfg.proxy.management_api_addr, "management API").await?;
        let rpc_listener = bind(cfg.cluster.rpc_addr, "cluster RPC").await?;
        let keys = Arc::new(Keyring::new(
            cfg.cluster.secret.as_deref(),
            cfg.cluster.secondary_secret.as_deref(),
            &cfg.cluster.cluster_id,
        ));
        let rpc_tls = {
            let (cluster, seeds) = (cfg.cluster.clone(), keys.ca_seeds());
            tokio::task::spawn_blocking(move || cluster_tls(&cluster, seeds))
                .await
                .context("loading the cluster TLS identity")??
        };
        let gossip =
            Arc::new(Gossip::start(&cfg.cluster, keys.clone(), self.metrics.clone()).await?);
        let node = ClusterNode::start(&cfg.cluster, log, sm.clone(), gossip, keys, rpc_tls.clone())
            .await
            .context("starting Raft")?;
        tasks.spawn("cluster TLS rotation", tls::run_rotation(rpc_tls.clone()));
        tasks.spawn(
            "membership",
            membership::run(node.clone(), cfg.cluster.bootstrap_expect),
        );
        tasks.spawn("election", election::run(node.clone()));
        tasks.spawn(
            "health probes",
            health::active::run(
                self.data.live.clone(),
                sm.clone(),
                node.gossip.clone(),
                cfg.health_check.clone(),
            ),
        );
        tasks.spawn("resolver", {
            let (sm, data) = (sm.clone(), self.data.clone());
            resolve::run(
                self.data.live.clone(),
                cfg.resolver.clone(),
                {
                    let sm = sm.clone();
                    move || {
                        sm.with_state(|s| {
                            s.backends.values().map(|b| b.address.to_string()).collect()
                        })
                    }
                },
                // A full compile: seconds at 100,000 domains in a debug build. Off the
                // worker's other tasks (Raft heartbeats among them).
                move || tokio::task::block_in_place(|| sm.with_state(|s| data.publish_routes(s))),
            )
        });
        tasks.spawn(
            "health exchange",
            health::shared::run(
                self.data.live.clone(),
                node.gossip.clone(),
                cfg.health_check.probers_per_backend,
                {
                    let node = node.clone();
                    move || node.other_member_ids()
                },
                {
                    let data = self.data.clone();
                    move || data.routes.load().pool_members()
                },
            ),
        );
        let data = self.data.clone();
        self.metrics
            .set_renderer(move |out: &mut String| data.render_metrics(out));
        tasks.spawn_fallible("metrics sampler", {
            let (metrics, data) = (self.metrics.clone(), self.data.clone());
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut seconds = 0u64;
                loop {
                    tick.tick().await;
                    metrics.sample();
                    seconds += 1;
                    if seconds.is_multiple_of(crate::observability::traffic::STEP_SECS) {
                        // A pass over every route (100,000 at scale): off the runtime.
                        let (m, d) = (metrics.clone(), data.clone());
                        tokio::task::spawn_blocking(move || {
                            m.history
                                .sample(crate::clock::coarse_unix_ms(), d.traffic_snapshot())
                        })
                        .await
                        .map_err(|e| format!("sampling the traffic series: {e}"))?;
                    }
                }
            }
        });
        if cfg.proxy.tls_session_tickets {
            tasks.spawn(
                "TLS ticket keys",
                crate::ticket_keys::run(
                    node.clone(),
                    Duration::from_secs(cfg.proxy.tls_ticket_rotation_secs),
                ),
            );
        }
        // Domains can turn to tls = "acme" through the API at any time: always watch.
        tasks.spawn(
            "acme",
            acme::run(node.clone(), cfg.lets_encrypt.clone(), self.metrics.clone()),
        );
        tasks.spawn_fallible(
            "cluster RPC",
            api::server::serve_maybe_tls(
                rpc_listener,
                rpc::router(node.clone(), self.metrics.clone()),
                rpc_listen(&rpc_tls, &self.metrics),
            ),
        );
        let api_state = ApiState::new(
            node.clone(),
            self.data.clone(),
            self.metrics.clone(),
            self.logs.clone(),
            cfg.api.token.clone(),
            cfg.health_check.clone(),
        );
        if let (true, Some(addr)) = (cfg.metrics.enabled, cfg.metrics.listen_addr) {
            let listener = bind(addr, "metrics").await?;
            let metrics = self.metrics.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let m = metrics.clone();
                    async move { m.render() }
                }),
            );
            tasks.spawn_fallible("metrics listener", serve(listener, app));
        }
        tracing::info!(
            node_id = cfg.cluster.node_id,
            api = %cfg.proxy.management_api_addr,
            http = %cfg.proxy.listen_addr_http,
            https = %cfg.proxy.listen_addr,
            "node started"
        );
        let seed_task = seed_or_compare(
            node.clone(),
            self.seed.clone(),
            cfg.source_path.display().to_string(),
        );
        if cfg.cluster.bootstrap_expect == 1 && cfg.cluster.seeds.is_empty() {
            // A lone node elects itself in milliseconds: seed before the API answers, so a
            // client that sees the node up also sees the file's domains.
            seed_task.await;
        } else {
            // Ends by itself once the cluster is seeded (or the file compared).
            tokio::spawn(seed_task);
        }
        tasks.spawn_fallible(
            "management API",
            api::server::serve_maybe_tls(api_listener, api::router(api_state), api_tls),
        );

        tokio::select! {
            _ = shutdown.changed() => {}
            ended = tasks.watch() => {
                // Serving on without, say, membership or the health exchange would look
                // healthy and be wrong: let the supervisor restart the node.
                return Err(anyhow::Error::new(ended).context("the node cannot run on"));
            }
        }
        self.drain(Duration::from_secs(cfg.proxy.shutdown_grace_secs))
            .await;
        // Bounded: the process must exit even if a Raft task hangs.
        if tokio::time::timeout(Duration::from_secs(5), node.raft.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("Raft did not shut down within 5 s; exiting anyway");
        }
        // The last requests' lines are written before the process ends.
        self.data.access_log.flush(Duration::from_secs(2)).await;
        tracing::info!("shut down cleanly");
        std::process::exit(0);
    }

    /// After a graceful upgrade: waits until the old process (draining after SIGQUIT) exits
    /// and releases the Raft store, then opens it (which publishes the committed state).
    async fn open_store_after_old_process(&self) -> anyhow::Result<(LogStore, StateMachineStore)> {
        let data_dir = &self.config.cluster.data_dir;
        // Pingora's 5 s socket close window, then the old process's drain.
        let limit = Duration::from_secs(self.config.proxy.shutdown_grace_secs + 60);
        let started = Instant::now();
        tracing::info!("graceful upgrade: waiting for the old process to release the Raft store");
        loop {
            match store::open(data_dir, self.publisher.clone()) {
                Ok(s) => {
                    tracing::info!(
                        waited_ms = started.elapsed().as_millis() as u64,
                        "graceful upgrade: Raft store opened; this process now runs the node"
                    );
                    return Ok(s);
                }
                Err(store::OpenError::Locked { .. }) if started.elapsed() < limit => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e @ store::OpenError::Locked { .. }) => {
                    return Err(e).with_context(|| {
                        format!("graceful upgrade: the old process did not release the store within {limit:?}")
                    })
                }
                Err(e) => return Err(e).context("graceful upgrade: opening the Raft store"),
            }
        }
    }

    /// Listeners stopped accepting when the shutdown was broadcast; wait for the requests
    /// still in flight (bounded by the grace period), then let the process exit.
    async fn drain(&self, grace: Duration) {
        let started = Instant::now();
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutdown requested: draining in-flight requests"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        loop {
            let n = self.data.requests_in_flight.load(Ordering::Relaxed);
            // Connections without a request close within a second of the shutdown (or after
            // their next answer): waiting for them keeps a pooled client's next request from
            // meeting a connection closed by the process exit.
            let open = self.data.connections_open.load(Ordering::Relaxed);
            if n <= 0 && open <= 0 {
                tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
                return;
            }
            if started.elapsed() >= grace {
                tracing::warn!(
                    in_flight = n,
                    connections_open = open,
                    "grace period over; closing remaining requests"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// This node's cluster TLS identity, from `[cluster.tls]` or the CA derived from the secret.
/// Blocking (files, key generation).
fn cluster_tls(
    cluster: &crate::config::ClusterConfig,
    seeds: Vec<[u8; 32]>,
) -> anyhow::Result<Arc<ClusterTls>> {
    let t = &cluster.tls;
    let source = match (&t.ca_cert_path, &t.ca_key_path, &t.cert_path, &t.key_path) {
        (Some(ca_cert), Some(ca_key), _, _) => tls::Source::CaFiles {
            ca_cert: ca_cert.clone(),
            ca_key: ca_key.clone(),
        },
        (Some(ca_cert), None, Some(cert), Some(key)) => tls::Source::CertFiles {
            ca_cert: ca_cert.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        // The config allows no other combination.
        _ => tls::Source::Derived { seeds },
    };
    let tls = ClusterTls::load(cluster.rpc_tls, cluster.node_id, source)
        .context("[cluster.tls]: this node's certificate")?;
    let current = tls.current();
    tracing::info!(
        mode = ?cluster.rpc_tls,
        not_after = current.not_after,
        "cluster RPC: node certificate ready"
    );
    Ok(Arc::new(tls))
}

/// How the RPC listener treats connections for `[cluster] rpc_tls`.
fn rpc_listen(tls: &Arc<ClusterTls>, metrics: &Arc<Metrics>) -> Option<api::server::TlsListen> {
    use api::server::{ConnEvent, Plaintext};
    let plaintext = match tls.mode {
        crate::config::RpcTls::Off => return None,
        crate::config::RpcTls::Mixed => Plaintext::Serve,
        crate::config::RpcTls::Required => Plaintext::Refuse,
    };
    let (tls, metrics) = (tls.clone(), metrics.clone());
    // One warning per 10 s at most: a misconfigured peer retries several times a second.
    let last_warned = std::sync::atomic::AtomicU64::new(0);
    let warn = move |what: &str| {
        let now = crate::clock::unix_ms();
        let last = last_warned.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!("refused cluster RPC connection: {what} (counted in pingora_vhost_cluster_rpc_refused_total)");
        }
    };
    Some(api::server::TlsListen {
        config: Arc::new(move || tls.current().server.clone()),
        plaintext,
        on_event: Arc::new(move |event| match event {
            ConnEvent::HandshakeFailed => {
                metrics.cluster_rpc_refused("tls");
                warn("TLS handshake failed (no certificate of the cluster CA, or not TLS)");
            }
            ConnEvent::PlaintextRefused => {
                metrics.cluster_rpc_refused("plaintext");
                warn("plaintext while [cluster] rpc_tls = \"required\" (a peer with rpc_tls = \"off\"?)");
            }
            ConnEvent::PlaintextServed => metrics.cluster_rpc_plaintext(),
        }),
    })
}

/// The management API's TLS settings, when `[api] tls_cert_path` / `tls_key_path` or
/// `tls_domain` are set (with client certificates required when `client_ca_path` is).
fn api_tls(
    api: &crate::config::ApiConfig,
    certs: &Arc<crate::proxy::tls::CertStore>,
) -> anyhow::Result<Option<api::server::TlsListen>> {
    let files = match (&api.tls_cert_path, &api.tls_key_path, &api.tls_domain) {
        (Some(cert), Some(key), _) => Some((cert, key)),
        (_, _, Some(_)) => None,
        _ => return Ok(None),
    };
    let read =
        |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions for the management API")?;
    let builder = match &api.client_ca_path {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut &read(ca)?[..]) {
                roots
                    .add(c.with_context(|| format!("[api] client_ca_path {}", ca.display()))?)
                    .with_context(|| format!("[api] client_ca_path {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .with_context(|| format!("[api] client_ca_path {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = match (files, &api.tls_domain) {
        (Some((cert, key)), _) => {
            let certs = rustls_pemfile::certs(&mut &read(cert)?[..])
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("[api] tls_cert_path {}", cert.display()))?;
            let key = rustls_pemfile::private_key(&mut &read(key)?[..])
                .with_context(|| format!("[api] tls_key_path {}", key.display()))?
                .with_context(|| format!("[api] tls_key_path {}: no private key", key.display()))?;
            builder.with_single_cert(certs, key).context(
                "[api] tls_cert_path / tls_key_path: certificate and key do not form a pair",
            )?
        }
        (None, Some(domain)) => {
            builder.with_cert_resolver(Arc::new(crate::proxy::tls::NamedResolver {
                store: certs.clone(),
                name: domain.to_string(),
            }))
        }
        (None, None) => return Ok(None),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(api::server::TlsListen::fixed(Arc::new(config))))
}

async fn serve(listener: TcpListener, app: axum::Router) -> Result<(), String> {
    api::server::serve(listener, app).await
}

/// Bytes of JSON per seed entry: a seed of 100,000 domains is tens of MB, far more than one
/// log entry may hold (`cluster::network::MAX_ENTRY_BYTES`), and smaller entries commit
/// faster on slow disks.
const SEED_PART_BYTES: usize = 256 * 1024;

/// Writes the seed as one entry, or in parts that apply together with the last one. A failed
/// attempt is started over (under a new seed id) while this node leads an unseeded cluster.
async fn propose_seed(node: &ClusterNode, seed: &Command, file: &str) {
    let Command::Seed { domains, backends } = seed else {
        return;
    };
    let mut backoff = Duration::from_secs(1);
    while node.is_leader() && !node.sm.with_state(|s| s.seeded) {
        // Unique per attempt: a new attempt replaces a half-written one.
        let seed_id = crate::clock::unix_ms()
            .wrapping_mul(1000)
            .wrapping_add(node.node_id);
        let parts =
            crate::state::seed_parts(seed_id, domains.clone(), backends.clone(), SEED_PART_BYTES);
        let count = parts.len();
        let mut failed = None;
        for (i, part) in parts.into_iter().enumerate() {
            match node.write(part).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failed = Some((i, e.to_string())),
                Err(e) => failed = Some((i, e.to_string())),
            }
            if failed.is_some() {
                break;
            }
        }
        match failed {
            None => {
                tracing::info!(parts = count, "seeded the cluster from {file}");
                return;
            }
            Some((i, e)) => tracing::warn!(
                "seeding from {file} failed at part {}/{count}: {e}; starting over in {backoff:?}",
                i + 1
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// On a new cluster, the leader applies the file's seed once. On an existing one, a file that
/// differs from the replicated state gets one warning and changes nothing.
async fn seed_or_compare(node: Arc<ClusterNode>, seed: Command, file: String) {
    if node
        .wait_for_leader(Duration::from_secs(60))
        .await
        .is_none()
    {
        tracing::warn!("no leader after 60s; the config file seed waits for a quorum");
        return;
    }
    if !node.sm.with_state(|s| s.seeded) {
        if node.is_leader() {
            propose_seed(&node, &seed, &file).await;
        }
        return;
    }
    if let Command::Seed { domains, backends } = &seed {
        let differs = node.sm.with_state(|s: &State| {
            let same_domains = domains.len() == s.domains.len()
                && domains.iter().all(|d| {
                    s.domains.get(d.domain.as_str()).is_some_and(|x| {
                        x.enabled_backends_tag == d.enabled_backends_tag
                            && x.http_to_https == d.http_to_https
                            && x.tls == d.tls
                            && x.access_log == d.access_log
                            && x.access_log_query == d.access_log_query
                    })
                });
            let same_backends = backends.len() == s.backends.len()
                && backends.iter().all(|b| {
                    s.backends
                        .get(b.id.as_str())
                        .is_some_and(|x| x.address == b.address && x.tags == b.tags)
                });
            !(same_domains && same_backends)
        });
        if differs {
            tracing::warn!(
                "{file}: [[virtual_hosts]]/[[backends]] differ from the replicated state; the cluster state is authoritative and was NOT changed (use the API to change it)"
            );
        }
    }
}
