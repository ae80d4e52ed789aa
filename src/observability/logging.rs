//! Structured logging setup from `[logging]`: text or JSON, console or file.

use std::fs::OpenOptions;

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use tracing_subscriber::fmt::{self, writer::BoxMakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::log_stream::{LogStream, StreamLayer};

use crate::config::{LogFormat, LogOutput, LoggingConfig};

/// Installs the logger; every event also goes to the returned [`LogStream`] (for
/// `GET /api/v1/logs/stream`).
pub fn init(cfg: &LoggingConfig) -> anyhow::Result<Arc<LogStream>> {
    // RUST_LOG overrides the file's level, as users of tracing expect.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(directives(&cfg.level)));
    let writer: BoxMakeWriter = match (cfg.output, &cfg.file_path) {
        (LogOutput::File, Some(path)) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating log directory {}", dir.display()))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        _ => BoxMakeWriter::new(std::io::stderr),
    };
    // Colour only on an interactive console: not in files, pipes or journald.
    let ansi = cfg.output == LogOutput::Console && std::io::stderr().is_terminal();
    let output: Box<dyn Layer<Registry> + Send + Sync> = match cfg.format {
        LogFormat::Json => fmt::layer()
            .json()
            .with_target(true)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_target(true)
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
    };
    let stream = Arc::new(LogStream::default());
    tracing_subscriber::registry()
        .with(output)
        .with(StreamLayer(stream.clone()))
        .with(filter)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(stream)
}

/// The filter for `[logging] level`. openraft is very chatty at info. rustls and Pingora's
/// connection code log what a client did to one connection at `warn` (an IP address sent as
/// SNI, a peer gone before our TLS close_notify, a failed handshake): one line per
/// connection, a flood any client can start and that costs CPU per connection. nginx logs
/// the like at `info`; they are kept out unless the level is `debug` or `trace`.
fn directives(level: &str) -> String {
    match level {
        "debug" | "trace" => format!("{level},openraft=warn"),
        _ => format!("{level},openraft=warn,rustls=error,pingora_core::protocols=error"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::{EnvFilter, Layer};

    use super::directives;

    struct Seen(Arc<AtomicBool>);
    impl<S: tracing::Subscriber> Layer<S> for Seen {
        fn on_event(&self, _: &tracing::Event<'_>, _: Context<'_, S>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the event `emit` logs passes the filter made for `[logging] level`.
    fn passes(level: &str, emit: fn()) -> bool {
        let seen = Arc::new(AtomicBool::new(false));
        let subscriber = tracing_subscriber::registry()
            .with(Seen(seen.clone()))
            .with(EnvFilter::new(directives(level)));
        tracing::subscriber::with_default(subscriber, emit);
        seen.load(Ordering::SeqCst)
    }

    #[test]
    fn client_caused_connection_warnings_stay_out_unless_debugging() {
        let sni: fn() = || tracing::warn!(target: "rustls::msgs::handshake", "IP as SNI");
        let shutdown: fn() =
            || tracing::warn!(target: "pingora_core::protocols::tls::rustls::server", "shutdown");
        let rustls_error: fn() = || tracing::error!(target: "rustls::conn", "bad");
        let ours: fn() = || tracing::warn!(target: "pingora_vhost::proxy", "ours");
        let raft_info: fn() = || tracing::info!(target: "openraft::core", "chatty");
        let pingora_warn: fn() = || tracing::warn!(target: "pingora_core::server", "server");
        // (level, event, passes)
        let table: &[(&str, fn(), bool)] = &[
            ("info", sni, false),
            ("info", shutdown, false),
            ("warn", sni, false),
            ("info", rustls_error, true),
            ("info", ours, true),
            ("warn", ours, true),
            ("error", ours, false),
            ("info", raft_info, false),
            ("info", pingora_warn, true),
            ("debug", sni, true),
            ("debug", shutdown, true),
            ("trace", sni, true),
            ("debug", raft_info, false),
        ];
        for (i, (level, emit, expected)) in table.iter().enumerate() {
            assert_eq!(passes(level, *emit), *expected, "row {i} at level {level}");
        }
    }
}
