//! The control plane is supervised: a task that dies takes the node down with a clear log
//! line and a non-zero exit (for systemd or Docker to restart it), instead of serving on
//! without membership, health exchange or its API.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test]
async fn a_control_plane_task_that_panics_ends_the_process_with_a_clear_log_line() {
    for task in ["health exchange", "membership", "election", "resolver"] {
        let node = Node::new_unstarted(NodeOptions::new());
        let mut child = Command::new(bin_path())
            .arg("--config")
            .arg(&node.config_path)
            .env("PINGORA_VHOST_TEST_FAULT", task)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pingora-vhost");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("the node kept running with its {task:?} task dead");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("read stderr");
        assert_eq!(
            status.code(),
            Some(1),
            "exit status for {task:?}; stderr:\n{stderr}"
        );
        let line = format!("control-plane task {task:?} panicked");
        assert!(
            stderr.contains(&line),
            "the log names the task and what happened ({line}); stderr:\n{stderr}"
        );
    }
}
