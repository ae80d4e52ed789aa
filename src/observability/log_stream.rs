//! Recent log lines for `GET /api/v1/logs/stream`: a tracing layer keeps the last
//! [`BACKLOG`] events in a ring and broadcasts new ones to the stream's subscribers.
//! Only emitted events cost anything (the proxy's hot path logs nothing normally).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

pub const BACKLOG: usize = 500;

#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    pub unix_ms: u64,
    pub level: String,
    pub target: String,
    pub message: String,
}

pub struct LogStream {
    recent: Mutex<VecDeque<Arc<LogLine>>>,
    live: broadcast::Sender<Arc<LogLine>>,
}

impl Default for LogStream {
    fn default() -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(BACKLOG)),
            live: broadcast::channel(1024).0,
        }
    }
}

impl LogStream {
    /// The backlog and a receiver for what comes after it (no line lost or doubled between).
    pub fn subscribe(&self) -> (Vec<Arc<LogLine>>, broadcast::Receiver<Arc<LogLine>>) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        (recent.iter().cloned().collect(), self.live.subscribe())
    }

    fn push(&self, line: LogLine) {
        let line = Arc::new(line);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == BACKLOG {
            recent.pop_front();
        }
        recent.push_back(line.clone());
        // Sent under the lock, so a subscriber sees each line once: in the backlog or live.
        let _ = self.live.send(line);
    }
}

/// The tracing layer feeding a [`LogStream`].
pub struct StreamLayer(pub Arc<LogStream>);

/// Renders `message` first, then `key=value` for the other fields, like the text log.
/// Events bridged from the `log` crate (Pingora logs that way) carry their real target in
/// `log.target` and source locations in other `log.*` fields, which are noise here.
#[derive(Default)]
struct Render {
    message: String,
    fields: String,
    log_target: Option<String>,
}

impl Visit for Render {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            name if name.starts_with("log.") => {}
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "log.target" => self.log_target = Some(value.to_string()),
            name if name.starts_with("log.") => {}
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }
}

impl<S: Subscriber> Layer<S> for StreamLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut r = Render::default();
        event.record(&mut r);
        let meta = event.metadata();
        self.0.push(LogLine {
            unix_ms: crate::clock::unix_ms(),
            level: meta.level().to_string(),
            target: r.log_target.unwrap_or_else(|| meta.target().to_string()),
            message: format!("{}{}", r.message, r.fields),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn keeps_a_bounded_backlog_and_streams_new_lines() {
        let stream = Arc::new(LogStream::default());
        let subscriber = tracing_subscriber::registry().with(StreamLayer(stream.clone()));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..BACKLOG + 5 {
                tracing::info!(n = i, "line");
            }
        });
        let (backlog, mut rx) = stream.subscribe();
        assert_eq!(backlog.len(), BACKLOG);
        assert_eq!(backlog[0].message, "line n=5");
        assert_eq!(backlog[0].level, "INFO");
        let subscriber = tracing_subscriber::registry().with(StreamLayer(stream.clone()));
        tracing::subscriber::with_default(subscriber, || tracing::warn!(backend = "b1", "down"));
        let live = rx.try_recv().expect("a live line");
        assert_eq!(
            (live.level.as_str(), live.message.as_str()),
            ("WARN", "down backend=b1")
        );
    }
}
