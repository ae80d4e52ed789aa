//! Backend name resolution, a control-plane task. Every backend address that is a name is
//! looked up again when its TTL runs out (clamped to `[resolver] min_ttl_secs` ..
//! `max_ttl_secs`), so a backend that moves (a Docker or Kubernetes service, a DNS failover)
//! is followed. Answers go into `live::addrs`; when the addresses to use change, the routing
//! table is recompiled. A failed lookup keeps the last good answer and is retried after the
//! minimum TTL; the error is shown in the API. Names resolve to IPv4 addresses when they have
//! any, to IPv6 ones otherwise (a backend named `localhost` often listens on 127.0.0.1 only).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use tokio::time::Instant;

use crate::clock::unix_ms;
use crate::config::ResolverConfig;
use crate::live::addrs::{target, Resolution, Target};
use crate::live::Live;

/// Lookups in flight at once.
const CONCURRENCY: usize = 16;
/// Upper bound on one lookup, whatever the resolver's own timeouts and retries add up to.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Per query to one server (the resolver tries each server, twice).
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

fn build(cfg: &ResolverConfig) -> TokioResolver {
    let provider = TokioConnectionProvider::default();
    let mut builder = if cfg.servers.is_empty() {
        match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(
                    "cannot read the system's resolver configuration ({e}); backend names \
                     resolve from the hosts file only (set [resolver] servers)"
                );
                TokioResolver::builder_with_config(HickoryConfig::new(), provider)
            }
        }
    } else {
        let servers: Vec<NameServerConfig> = cfg
            .servers
            .iter()
            .flat_map(|a| {
                [
                    NameServerConfig::new(*a, Protocol::Udp),
                    NameServerConfig::new(*a, Protocol::Tcp),
                ]
            })
            .collect();
        TokioResolver::builder_with_config(
            HickoryConfig::from_parts(None, vec![], servers),
            provider,
        )
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 2;
    opts.use_hosts_file = ResolveHosts::Always;
    // The resolver's cache must not serve an answer longer than we mean to keep it.
    opts.positive_max_ttl = Some(Duration::from_secs(cfg.max_ttl_secs));
    opts.negative_max_ttl = Some(Duration::from_secs(cfg.min_ttl_secs));
    builder.build()
}

/// A lookup's addresses (sorted, with the backend's port) and how long they are valid, or
/// why it failed.
type Answer = Result<(Vec<SocketAddr>, Duration), String>;

async fn lookup(resolver: &TokioResolver, host: &str, port: u16) -> Answer {
    let answer = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(host))
        .await
        .map_err(|_| format!("lookup timed out after {}s", LOOKUP_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
    let mut addrs: Vec<SocketAddr> = answer.iter().map(|ip| SocketAddr::new(ip, port)).collect();
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.is_empty() {
        return Err("no address records".to_string());
    }
    let ttl = answer
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    Ok((addrs, ttl))
}

/// The resolver and when each name is due for its next lookup.
struct Lookups {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
    due: HashMap<String, Instant>,
}

impl Lookups {
    fn new(cfg: &ResolverConfig) -> Self {
        Self {
            resolver: build(cfg),
            min_ttl: Duration::from_secs(cfg.min_ttl_secs),
            max_ttl: Duration::from_secs(cfg.max_ttl_secs),
            due: HashMap::new(),
        }
    }

    /// Looks up every name of `addresses` that is due, stores the answers in `live.addrs`,
    /// and forgets names no backend uses. True when the addresses to use changed.
    async fn pass(&mut self, live: &Live, addresses: Vec<String>) -> bool {
        let mut names: Vec<String> = addresses
            .into_iter()
            .filter(|a| matches!(target(a), Some(Target::Name { .. })))
            .collect();
        names.sort_unstable();
        names.dedup();
        live.addrs
            .retain(|a| names.binary_search_by(|n| n.as_str().cmp(a)).is_ok());
        self.due.retain(|a, _| names.binary_search(a).is_ok());

        let now = Instant::now();
        let todo: Vec<String> = names
            .into_iter()
            .filter(|a| self.due.get(a).is_none_or(|t| *t <= now))
            .collect();
        let resolver = &self.resolver;
        let answers: Vec<(String, Answer)> = futures::stream::iter(todo)
            .map(|address| async move {
                let answer = match target(&address) {
                    Some(Target::Name { host, port }) => lookup(resolver, host, port).await,
                    _ => Err("not a name".to_string()),
                };
                (address, answer)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;

        let mut changed = false;
        for (address, answer) in answers {
            let previous = live.addrs.resolution(&address).unwrap_or_default();
            let (next, resolution) = match answer {
                Ok((addrs, ttl)) => {
                    if previous.addrs != addrs && !previous.addrs.is_empty() {
                        tracing::info!(%address, ?addrs, "backend name resolves to new addresses");
                    }
                    let resolution = Resolution::new(addrs, Some(unix_ms()), None);
                    (ttl.clamp(self.min_ttl, self.max_ttl), resolution)
                }
                Err(error) => {
                    if previous.error.as_ref() != Some(&error) {
                        tracing::warn!(
                            %address,
                            %error,
                            kept = previous.addrs.len(),
                            "backend name does not resolve; keeping its last good addresses"
                        );
                    }
                    let resolution =
                        Resolution::new(previous.addrs, previous.resolved_unix_ms, Some(error));
                    (self.min_ttl, resolution)
                }
            };
            self.due.insert(address.clone(), Instant::now() + next);
            changed |= live.addrs.store(&address, resolution);
        }
        changed
    }

    fn next_due(&self) -> Instant {
        self.due
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + self.max_ttl)
    }
}

/// One bounded pass before the data plane starts, on a runtime of its own (the control
/// plane's does not exist yet): a restarted node must not answer 503 for backends named by
/// host name in the moment before its resolver task runs. Names that take longer are left
/// to that task. Says whether any name was looked up (the routing table then needs compiling
/// again).
pub fn prime(live: &Live, cfg: &ResolverConfig, addresses: Vec<String>, limit: Duration) -> bool {
    if !addresses
        .iter()
        .any(|a| matches!(target(a), Some(Target::Name { .. })))
    {
        return false;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("backend names not looked up before start: {e}");
            return false;
        }
    };
    runtime.block_on(async {
        let mut lookups = Lookups::new(cfg);
        if tokio::time::timeout(limit, lookups.pass(live, addresses))
            .await
            .is_err()
        {
            tracing::warn!(
                "some backend names did not resolve within {limit:?} of start; the resolver keeps trying"
            );
        }
    });
    true
}

/// Runs for ever. `addresses` lists the backend addresses of the current state;
/// `republish` recompiles the routing table from it.
pub async fn run(
    live: Arc<Live>,
    cfg: ResolverConfig,
    addresses: impl Fn() -> Vec<String>,
    republish: impl Fn(),
) {
    let mut lookups = Lookups::new(&cfg);
    loop {
        let changed = lookups.pass(&live, addresses()).await;
        let stored = live.addrs.stored();
        if changed {
            republish();
        }
        live.addrs.published(stored);
        tokio::select! {
            _ = tokio::time::sleep_until(lookups.next_due()) => {}
            // A compile met a name with no answer yet (a backend just added).
            _ = live.addrs.unresolved_name() => {}
        }
    }
}
