//! Structured logging setup from `[logging]`: text or JSON, console or file.

use std::fs::OpenOptions;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogOutput, LoggingConfig};

pub fn init(cfg: &LoggingConfig) -> anyhow::Result<()> {
    // RUST_LOG overrides the file's level, as users of tracing expect.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},openraft=warn", cfg.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let writer: tracing_subscriber::fmt::writer::BoxMakeWriter = match (cfg.output, &cfg.file_path)
    {
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
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        _ => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let res = match cfg.format {
        LogFormat::Json => builder.json().with_writer(writer).try_init(),
        LogFormat::Text => builder.with_writer(writer).try_init(),
    };
    res.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
