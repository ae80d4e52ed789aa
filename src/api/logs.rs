//! `GET /api/v1/logs/stream`: Server-Sent Events of this node's log lines — the recent backlog
//! first, then live. `?level=warn` keeps that level and above.

use std::convert::Infallible;
use std::str::FromStr;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, ApiState};
use crate::observability::log_stream::LogLine;

#[derive(Deserialize)]
pub struct StreamQuery {
    level: Option<String>,
}

fn event(line: &LogLine) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event("log")
        .data(serde_json::to_string(line).unwrap_or_default()))
}

pub async fn stream(
    State(state): State<ApiState>,
    Query(q): Query<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let min = match q.level.as_deref() {
        None => tracing::Level::TRACE,
        Some(l) => tracing::Level::from_str(l).map_err(|_| {
            ApiError::field(
                "level",
                format!("{l:?} is not one of error, warn, info, debug, trace"),
            )
        })?,
    };
    // tracing orders levels by verbosity: ERROR < WARN < ... < TRACE.
    let wanted =
        move |line: &LogLine| tracing::Level::from_str(&line.level).is_ok_and(|level| level <= min);
    let (backlog, rx) = state.logs.subscribe();
    let backlog: Vec<_> = backlog.into_iter().filter(|l| wanted(l)).collect();
    let live = futures::stream::unfold(rx, move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(line) if wanted(&line) => return Some((event(&line), rx)),
                Ok(_) => continue,
                // A slow reader: say how many lines it missed, and go on.
                Err(RecvError::Lagged(n)) => {
                    let e = Event::default().event("dropped").data(n.to_string());
                    return Some((Ok(e), rx));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures::stream::iter(backlog)
        .map(|l| event(&l))
        .chain(live);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
