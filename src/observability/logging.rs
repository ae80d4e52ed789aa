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
        .unwrap_or_else(|_| EnvFilter::new(format!("{},openraft=warn", cfg.level)));
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
