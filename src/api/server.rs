//! The HTTP server under the management API, the metrics listener and the cluster RPC:
//! hyper with limits set so that requests over our documented limits reach the router, which
//! answers them in the API's error format (see [`super::errors`]), instead of hyper closing
//! them with an empty answer.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Hyper's own ceiling on a request head: above [`super::errors::MAX_HEAD_BYTES`], so heads
/// between the two get a JSON 431; beyond it hyper closes the connection with an empty 431.
const HYPER_MAX_BUF: usize = 256 * 1024;
/// Hyper's own ceiling on the header count (above [`super::errors::MAX_HEADERS`]).
const HYPER_MAX_HEADERS: usize = 1000;

pub async fn serve(listener: TcpListener, app: axum::Router) -> Result<(), String> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(HYPER_MAX_BUF)
        .max_headers(HYPER_MAX_HEADERS);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            // Out of descriptors and the like: back off instead of spinning.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        tokio::spawn(async move {
            // A client that goes away mid-request is not worth a log line.
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}
