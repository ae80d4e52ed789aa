//! The access log (`[access_log]`, docs/logging.md): one line per request, written off the
//! request path.
//!
//! A request hands a compact [`Record`] to a bounded queue and goes on: it never waits and
//! never does I/O for the log. When the queue is full the record is dropped and counted
//! (`pingora_vhost_access_log_dropped_total{reason="queue_full"}`). One writer thread wakes
//! every `flush_interval_ms`, formats what is queued (JSON or combined) and writes it in
//! batches of up to 64 KiB, one `write` each. Waking on a timer, not per record, keeps the
//! request path free of wake-up system calls (a sender wakes a receiver only when one is
//! blocked in `recv`, and this one never is).
//!
//! `SIGUSR1` reopens the file (logrotate: rename, then signal; nginx's convention).

mod format;
mod record;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

pub use format::json_string;
pub use record::{Field, Protocol, Record, Text};

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogOutput};
use crate::observability::Metrics;

/// A batch is written once it reaches this size (nginx's `buffer=64k`).
const BATCH: usize = 64 * 1024;

/// Set by the SIGUSR1 handler, taken by the writer thread.
static REOPEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    REOPEN.store(true, Ordering::Relaxed);
}

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("opening the access log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("starting the access log writer thread: {0}")]
    Thread(io::Error),
    #[error("installing the SIGUSR1 handler: {0}")]
    Signal(io::Error),
}

/// Makes SIGUSR1 ask for the access log file to be reopened. Installed whether or not the
/// log is on: without a handler, SIGUSR1 (sent by a logrotate script) ends the process.
pub fn install_reopen_signal() -> Result<(), AccessLogError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
    // stores to an atomic, which is async-signal-safe.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(AccessLogError::Signal(io::Error::last_os_error()));
    }
    Ok(())
}

/// Flush requests from the control plane (at shutdown) and the writer's answer.
#[derive(Default)]
struct FlushState {
    requested: AtomicU64,
    done: AtomicU64,
}

struct Sink {
    queue: SyncSender<Record>,
    queue_full: prometheus::IntCounter,
    flush: Arc<FlushState>,
}

/// The request paths' handle: off, or a queue to the writer thread.
pub struct AccessLog {
    sink: Option<Sink>,
}

impl AccessLog {
    pub fn off() -> Self {
        Self { sink: None }
    }

    /// Opens the output (an error here stops the start: a log that cannot be written is a
    /// configuration error) and starts the writer thread; `off()` when not enabled.
    pub fn start(
        cfg: &AccessLogConfig,
        node_id: u64,
        metrics: &Metrics,
    ) -> Result<Self, AccessLogError> {
        if !cfg.enabled {
            return Ok(Self::off());
        }
        let output = match (cfg.output, &cfg.file_path) {
            (AccessLogOutput::File, Some(path)) => Output::File {
                file: open(path)?,
                path: path.clone(),
            },
            _ => Output::Stdout(io::stdout()),
        };
        let (queue, records) = sync_channel(cfg.queue_size);
        let flush = Arc::new(FlushState::default());
        let mut writer = Writer {
            output,
            format: cfg.format,
            node_id,
            lines: metrics.access_log_lines.clone(),
            write_errors: metrics
                .access_log_dropped
                .with_label_values(&["write_error"]),
            flush: flush.clone(),
            buf: Vec::with_capacity(BATCH + 4096),
            in_buf: 0,
            last_error_log: None,
        };
        let interval = Duration::from_millis(cfg.flush_interval_ms);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(records, interval))
            .map_err(AccessLogError::Thread)?;
        Ok(Self {
            sink: Some(Sink {
                queue,
                queue_full: metrics
                    .access_log_dropped
                    .with_label_values(&["queue_full"]),
                flush,
            }),
        })
    }

    /// Whether records are wanted at all (checked before building one).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// Queues a record; never waits. A full queue drops it (counted).
    pub fn log(&self, record: Record) {
        if let Some(sink) = &self.sink {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                sink.queue.try_send(record)
            {
                sink.queue_full.inc();
            }
        }
    }

    /// Waits (up to `limit`) until what was queued before the call is written. For the
    /// shutdown: the process exits right after.
    pub async fn flush(&self, limit: Duration) {
        let Some(sink) = &self.sink else { return };
        let wanted = sink.flush.requested.fetch_add(1, Ordering::Relaxed) + 1;
        let until = tokio::time::Instant::now() + limit;
        while sink.flush.done.load(Ordering::Acquire) < wanted
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn open(path: &Path) -> Result<File, AccessLogError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| AccessLogError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(err)
}

enum Output {
    Stdout(io::Stdout),
    File { path: PathBuf, file: File },
}

struct Writer {
    output: Output,
    format: AccessLogFormat,
    node_id: u64,
    lines: prometheus::IntCounter,
    write_errors: prometheus::IntCounter,
    flush: Arc<FlushState>,
    buf: Vec<u8>,
    /// Lines in `buf`.
    in_buf: u64,
    last_error_log: Option<std::time::Instant>,
}

impl Writer {
    fn run(&mut self, records: std::sync::mpsc::Receiver<Record>, interval: Duration) {
        loop {
            let flush_wanted = self.flush.requested.load(Ordering::Relaxed);
            if REOPEN.swap(false, Ordering::Relaxed) {
                self.write_batch();
                self.reopen();
            }
            let disconnected = loop {
                match records.try_recv() {
                    Ok(record) => {
                        self.format(&record);
                        if self.buf.len() >= BATCH {
                            self.write_batch();
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break false,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break true,
                }
            };
            self.write_batch();
            self.flush.done.store(flush_wanted, Ordering::Release);
            if disconnected {
                return;
            }
            std::thread::sleep(interval);
        }
    }

    fn format(&mut self, r: &Record) {
        match self.format {
            AccessLogFormat::Json => format::json_line(&mut self.buf, r, self.node_id),
            AccessLogFormat::Combined => format::combined_line(&mut self.buf, r),
        }
        self.in_buf += 1;
    }

    fn write_batch(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let written = match &mut self.output {
            Output::Stdout(out) => out.lock().write_all(&self.buf),
            Output::File { file, .. } => file.write_all(&self.buf),
        };
        match written {
            Ok(()) => self.lines.inc_by(self.in_buf),
            Err(e) => {
                self.write_errors.inc_by(self.in_buf);
                self.warn(format_args!("access log: writing failed: {e}"));
            }
        }
        self.buf.clear();
        self.in_buf = 0;
    }

    /// After SIGUSR1: the file at the configured path from now on (logrotate has renamed the
    /// old one). If it cannot be opened, the old file stays in use.
    fn reopen(&mut self) {
        if let Output::File { path, file } = &mut self.output {
            match open(path) {
                Ok(new) => {
                    *file = new;
                    tracing::info!(path = %path.display(), "access log reopened (SIGUSR1)");
                }
                Err(e) => {
                    let msg = format!("access log: {e}; still writing to the old file");
                    self.warn(format_args!("{msg}"));
                }
            }
        }
    }

    /// At most one warning per 10 s: a full disk must not flood the process log.
    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = std::time::Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_error_log = Some(now);
            tracing::warn!("{msg}");
        }
    }
}
