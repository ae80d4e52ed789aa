//! Active health checks: HTTP GET on the health path, or a TCP connect when the path is "".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::store::StateMachineStore;
use crate::config::HealthCheckConfig;
use crate::live::health::{ActiveState, Thresholds};
use crate::live::Live;
use crate::proxy_protocol::{self, Version};
use crate::schema::SendProxyProtocol;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    pub healthy: bool,
    pub detail: String,
    pub latency_ms: u64,
}

/// Probes one backend once, at `addr` (what its `address` resolved to; `address` is the
/// `Host` of an HTTP probe). A backend that wants the PROXY protocol gets a `LOCAL` /
/// `UNKNOWN` header first (a probe relays no client).
pub async fn probe(
    client: &reqwest::Client,
    address: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    send_proxy: Option<SendProxyProtocol>,
) -> ProbeResult {
    let started = Instant::now();
    let (healthy, detail) = if let Some(version) = send_proxy {
        let header = proxy_protocol::local(match version {
            SendProxyProtocol::V1 => Version::V1,
            SendProxyProtocol::V2 => Version::V2,
        });
        match tokio::time::timeout(timeout, probe_raw(address, addr, path, header)).await {
            Ok(r) => r,
            Err(_) if path.is_empty() => (
                false,
                format!("TCP connect timed out after {}ms", timeout.as_millis()),
            ),
            Err(_) => (
                false,
                format!("GET {path} timed out after {}ms", timeout.as_millis()),
            ),
        }
    } else if path.is_empty() {
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

/// A probe that starts with a PROXY protocol header: reqwest cannot send one, so the GET is
/// written by hand (HTTP/1.1, `Connection: close`) and only the status line is read.
async fn probe_raw(address: &str, addr: SocketAddr, path: &str, header: &[u8]) -> (bool, String) {
    let mut conn = match tokio::net::TcpStream::connect(addr).await {
        Ok(c) => c,
        Err(e) if path.is_empty() => return (false, format!("TCP connect failed: {e}")),
        Err(_) => return (false, format!("GET {path}: connection failed")),
    };
    let mut request = header.to_vec();
    if !path.is_empty() {
        request.extend_from_slice(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
    }
    if let Err(e) = conn.write_all(&request).await {
        return (
            false,
            format!("sending the PROXY protocol header failed: {e}"),
        );
    }
    if path.is_empty() {
        return (true, "TCP connect succeeded".to_string());
    }
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let status = head
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) if (200..400).contains(&code) => (true, format!("GET {path} answered {code}")),
        Some(code) => (false, format!("GET {path} answered {code}")),
        None => (false, format!("GET {path} failed: no HTTP answer")),
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
    send_proxy: Option<SendProxyProtocol>,
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
                send_proxy,
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
        type Probed = (String, String, Option<String>, Option<SendProxyProtocol>);
        let backends: Vec<Probed> = sm.with_state(|s| {
            s.backends
                .values()
                .map(|b| {
                    (
                        b.id.to_string(),
                        b.address.to_string(),
                        b.health_check_path.as_ref().map(|p| p.to_string()),
                        b.send_proxy_protocol,
                    )
                })
                .collect()
        });
        futures::stream::iter(backends)
            .for_each_concurrent(64, |(id, address, path, send_proxy)| {
                let (live, client, cfg) = (&live, &client, &cfg);
                async move {
                    let path = path.as_deref();
                    check_backend(live, client, cfg, &id, &address, path, send_proxy).await;
                }
            })
            .await;
    }
}
