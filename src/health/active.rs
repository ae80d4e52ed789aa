//! Active health checks: HTTP GET on the health path, or a TCP connect when the path is "".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::cluster::store::StateMachineStore;
use crate::config::HealthCheckConfig;
use crate::live::health::{ActiveState, Thresholds};
use crate::live::Live;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    pub healthy: bool,
    pub detail: String,
    pub latency_ms: u64,
}

/// Probes one backend once, at `addr` (what its `address` resolved to; `address` is the
/// `Host` of an HTTP probe).
pub async fn probe(
    client: &reqwest::Client,
    address: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> ProbeResult {
    let started = Instant::now();
    let (healthy, detail) = if path.is_empty() {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => (true, "TCP connect succeeded".to_string()),
            Ok(Err(e)) => (false, format!("TCP connect failed: {e}")),
            Err(_) => (
                false,
                format!("TCP connect timed out after {}ms", timeout.as_millis()),
            ),
        }
    } else {
        let url = format!("http://{addr}{path}");
        let get = client
            .get(&url)
            .header(reqwest::header::HOST, address)
            .timeout(timeout);
        match get.send().await {
            Ok(r) if r.status().is_success() || r.status().is_redirection() => {
                (true, format!("GET {path} answered {}", r.status().as_u16()))
            }
            Ok(r) => (
                false,
                format!("GET {path} answered {}", r.status().as_u16()),
            ),
            Err(e) if e.is_timeout() => (
                false,
                format!("GET {path} timed out after {}ms", timeout.as_millis()),
            ),
            Err(e) if e.is_connect() => (false, format!("GET {path}: connection failed")),
            Err(e) => (false, format!("GET {path} failed: {e}")),
        }
    };
    ProbeResult {
        healthy,
        detail,
        latency_ms: started.elapsed().as_millis() as u64,
    }
}

/// The probe client: no redirects followed, no connection reuse surprises.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(1)
        .build()
        .unwrap_or_default()
}

/// Probes `id` now and records the result in its health state (if a routing table knows
/// the backend yet).
pub async fn check_backend(
    live: &Live,
    client: &reqwest::Client,
    cfg: &HealthCheckConfig,
    id: &str,
    address: &str,
    path_override: Option<&str>,
) -> ProbeResult {
    let path = path_override.unwrap_or(&cfg.path);
    // A name with several addresses is probed at its first: health is kept per backend.
    let result = match live.addrs.addrs_for(address).first() {
        Some(addr) => {
            probe(
                client,
                address,
                *addr,
                path,
                Duration::from_secs(cfg.timeout_secs),
            )
            .await
        }
        None => ProbeResult {
            healthy: false,
            detail: match live.addrs.resolution(address).and_then(|r| r.error) {
                Some(e) => format!("{address} does not resolve: {e}"),
                None => format!("{address} is not resolved yet"),
            },
            latency_ms: 0,
        },
    };
    let Some(runtime) = live.backends.get(id) else {
        return result;
    };
    let thresholds = Thresholds {
        unhealthy: cfg.unhealthy_threshold,
        healthy: cfg.healthy_threshold,
    };
    if let Some(flip) =
        runtime
            .health
            .record_probe(result.healthy, result.detail.clone(), thresholds)
    {
        match flip {
            ActiveState::Down => {
                tracing::warn!(backend = id, detail = %result.detail, "backend marked unhealthy")
            }
            _ => tracing::info!(backend = id, "backend healthy again"),
        }
    }
    result
}

/// Probes every backend every `interval_secs`, a bounded number at a time. Unhealthy backends
/// keep being probed so they can come back.
pub async fn run(live: Arc<Live>, sm: StateMachineStore, cfg: HealthCheckConfig) {
    let client = client();
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let backends: Vec<(String, String, Option<String>)> = sm.with_state(|s| {
            s.backends
                .values()
                .map(|b| {
                    (
                        b.id.to_string(),
                        b.address.to_string(),
                        b.health_check_path.as_ref().map(|p| p.to_string()),
                    )
                })
                .collect()
        });
        futures::stream::iter(backends)
            .for_each_concurrent(64, |(id, address, path)| {
                let (live, client, cfg) = (&live, &client, &cfg);
                async move {
                    check_backend(live, client, cfg, &id, &address, path.as_deref()).await;
                }
            })
            .await;
    }
}
