//! Owns the control plane's long-running tasks. Each is meant to run for the life of the
//! process; one that panics or returns is a fault the node cannot serve through correctly
//! (no membership loop, no health exchange, no API), so [`Tasks::watch`] reports which task
//! ended and how, and the caller exits non-zero for its supervisor (systemd, Docker) to
//! restart the node.
//!
//! Debug builds read `PINGORA_VHOST_TEST_FAULT=<task name>`: that task panics shortly after
//! it starts, so tests can check the whole path with the real binary.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};

/// How a supervised task ended.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnded {
    #[error("control-plane task {0:?} panicked: {1}")]
    Panicked(&'static str, String),
    #[error("control-plane task {0:?} ended unexpectedly")]
    Returned(&'static str),
    #[error("control-plane task {0:?} failed: {1}")]
    Failed(&'static str, String),
}

#[derive(Default)]
pub struct Tasks {
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    /// Starts `task` under supervision. It should never return.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn_fallible(name, async move {
            task.await;
            Ok(())
        });
    }

    /// Starts a task that may end with an error (a listener that fails).
    pub fn spawn_fallible(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        let injected = injected_fault(name);
        let handle = self.set.spawn(async move {
            if injected {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                panic!("fault injected by PINGORA_VHOST_TEST_FAULT");
            }
            task.await
        });
        self.names.insert(handle.id(), name);
    }

    /// Waits until some task ends and says which and how. Pending for ever with no tasks.
    pub async fn watch(&mut self) -> TaskEnded {
        let Some(joined) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let name = |id: Id| self.names.get(&id).copied().unwrap_or("unnamed");
        match joined {
            Ok((id, Ok(()))) => TaskEnded::Returned(name(id)),
            Ok((id, Err(e))) => TaskEnded::Failed(name(id), e),
            Err(e) => {
                let name = name(e.id());
                if e.is_panic() {
                    let payload = e.into_panic();
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".to_string());
                    TaskEnded::Panicked(name, message)
                } else {
                    TaskEnded::Returned(name)
                }
            }
        }
    }
}

#[cfg(debug_assertions)]
fn injected_fault(name: &str) -> bool {
    std::env::var("PINGORA_VHOST_TEST_FAULT").is_ok_and(|v| v == name)
}

#[cfg(not(debug_assertions))]
fn injected_fault(_name: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_the_task_that_ended_and_how() {
        let mut tasks = Tasks::default();
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("returns", async {});
        assert!(matches!(
            tasks.watch().await,
            TaskEnded::Returned("returns")
        ));
        tasks.spawn("panics", async { panic!("boom") });
        match tasks.watch().await {
            TaskEnded::Panicked("panics", m) => assert_eq!(m, "boom"),
            other => panic!("unexpected {other:?}"),
        }
        tasks.spawn_fallible("fails", async { Err("port gone".to_string()) });
        assert!(matches!(tasks.watch().await, TaskEnded::Failed("fails", _)));
    }
}
