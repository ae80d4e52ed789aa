//! Process lifecycle: persistence across kill -9, the config file vs the replicated state,
//! SIGTERM drain, and `--check`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// 5. Persistence
// ---------------------------------------------------------------------------------------------

fn assert_private(path: &Path) {
    let meta = std::fs::metadata(path).unwrap();
    let mode = meta.permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o077,
        0,
        "{} holds private keys: must not be group/world accessible (mode {mode:o})",
        path.display()
    );
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            assert_private(&entry.unwrap().path());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill9() {
    let a = Backend::start("A").await;
    let b = Backend::start("B").await;
    let mut node = Node::start_default().await;

    node.add_backend("pa", &a.address(), &["a"]).await;
    node.add_domain("persist.test", "a").await;
    // kill -9 right after the 201.
    node.kill9();
    node.restart().await;
    let (status, d) = node.api_get("/api/v1/domains/persist.test").await;
    assert_eq!(
        status, 200,
        "domain acknowledged before kill -9 must survive: {d}"
    );
    node.wait_route("persist.test", "/", "A").await;

    // An update (a/b switch) acknowledged just before kill -9 survives too.
    node.add_backend("pb", &b.address(), &["b"]).await;
    let (status, body) = node
        .api_post(
            "/api/v1/domains/persist.test/switch",
            json!({"tag": "b", "force": true}),
        )
        .await;
    assert_eq!(status, 200, "switch: {body}");
    node.kill9();
    node.restart().await;
    let (status, be) = node.api_get("/api/v1/backends/pb").await;
    assert_eq!(
        status, 200,
        "backend acknowledged before kill -9 must survive: {be}"
    );
    let (_, d) = node.api_get("/api/v1/domains/persist.test").await;
    assert_eq!(
        d["enabled_backends_tag"], "b",
        "switch survives kill -9: {d}"
    );
    node.wait_route("persist.test", "/", "B").await;
    for i in 0..5 {
        let r = node.proxy_get("persist.test", "/").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "B"),
            "request {i} after restart should go to tag b"
        );
    }

    // A delete acknowledged before kill -9 stays deleted.
    let (status, _) = node.api_delete("/api/v1/backends/pa").await;
    assert_eq!(status, 204);
    node.kill9();
    node.restart().await;
    let (status, be) = node.api_get("/api/v1/backends/pa").await;
    assert_eq!(
        status, 404,
        "deleted backend stays deleted after kill -9: {be}"
    );

    // The data dir holds private keys: 0700 dir, no group/world access to anything inside.
    assert_private(&node.data_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_does_not_overwrite_replicated_state() {
    let s = Backend::start("S").await;
    let p = Backend::start("P").await;
    let f = Backend::start("F").await;
    let seed = format!(
        r#"
[[virtual_hosts]]
domain = "seed.test"
enabled_backends_tag = "a"

[[backends]]
id = "seed-be"
address = "{}"
tags = ["a"]
"#,
        s.address()
    );
    let mut node = Node::start(NodeOptions::new().extra(&seed)).await;
    node.wait_route("seed.test", "/", "S").await;

    node.add_backend("api-be", &p.address(), &["p"]).await;
    node.add_domain("api.test", "p").await;
    node.wait_route("api.test", "/", "P").await;
    // The seed domain is changed through the API: the API change must win over the file.
    let (status, body) = node
        .api_put(
            "/api/v1/domains/seed.test",
            json!({"enabled_backends_tag": "p"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Restart with a file whose vhosts/backends differ.
    let changed = format!(
        r#"
[[virtual_hosts]]
domain = "fileonly.test"
enabled_backends_tag = "a"

[[virtual_hosts]]
domain = "seed.test"
enabled_backends_tag = "a"

[[backends]]
id = "file-be"
address = "{}"
tags = ["a"]
"#,
        f.address()
    );
    node.set_extra(&changed);
    node.restart().await;

    let (status, d) = node.api_get("/api/v1/domains/api.test").await;
    assert_eq!(status, 200, "API-created domain must remain: {d}");
    let (status, d) = node.api_get("/api/v1/domains/fileonly.test").await;
    assert_eq!(
        status, 404,
        "file-only domain must not be added after bootstrap: {d}"
    );
    let (status, b) = node.api_get("/api/v1/backends/file-be").await;
    assert_eq!(
        status, 404,
        "file-only backend must not be added after bootstrap: {b}"
    );
    let (status, b) = node.api_get("/api/v1/backends/seed-be").await;
    assert_eq!(
        status, 200,
        "backend missing from the new file is not removed: {b}"
    );
    let (_, d) = node.api_get("/api/v1/domains/seed.test").await;
    assert_eq!(
        d["enabled_backends_tag"], "p",
        "the file's value must not overwrite the API change: {d}"
    );

    node.wait_route("api.test", "/", "P").await;
    let r = node.proxy_get("seed.test", "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "P"),
        "seed.test follows the replicated tag p, not the file's a"
    );
    let r = node.proxy_get("fileonly.test", "/").await;
    assert_eq!(r.status, 404, "fileonly.test is not routed: {:?}", r.body);
    assert_eq!(f.requests(), 0, "the file-only backend got no traffic");
}

// ---------------------------------------------------------------------------------------------
// 14. SIGTERM drains in-flight requests and exits 0
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_request_finish_then_exits_zero() {
    const GRACE_SECS: u64 = 5;
    let slow = Backend::start("SLOW").await;
    let mut node =
        Node::start(NodeOptions::new().proxy(&format!("shutdown_grace_secs = {GRACE_SECS}"))).await;
    node.add_backend("slow", &slow.address(), &["a"]).await;
    node.add_domain("drain.test", "a").await;
    node.wait_route("drain.test", "/", "SLOW").await;

    let in_flight = slow
        .park_slow_request(node.proxy_client(), "drain.test", 1500)
        .await;

    let sent = Instant::now();
    node.sigterm();
    let r = tokio::time::timeout(Duration::from_secs(15), in_flight)
        .await
        .expect("in-flight request did not finish within 15 s after SIGTERM")
        .expect("request task")
        .expect("in-flight request must complete after SIGTERM, not be cut off");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "SLOW"),
        "in-flight request completes with the backend's answer"
    );

    let bound = Duration::from_secs(GRACE_SECS + 10);
    let status = node
        .wait_exit(bound)
        .await
        .unwrap_or_else(|| panic!("node still running {bound:?} after SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end in exit code 0, got {status} after {:?}",
        sent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_at_once() {
    let mut node = Node::start_default().await;
    node.add_backend("b", "127.0.0.1:9", &["a"]).await;
    let sent = Instant::now();
    // SAFETY: kill(2) on the pid of the child this test started.
    let rc = unsafe { libc::kill(node.pid() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0, "kill(SIGINT) failed");
    let bound = Duration::from_secs(10);
    let status = node
        .wait_exit(bound)
        .await
        .unwrap_or_else(|| panic!("node still running {bound:?} after SIGINT"));
    assert!(
        status.code().is_some(),
        "SIGINT must end the process by itself, got {status} after {:?}",
        sent.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// SIGQUIT: Pingora's graceful upgrade
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_upgrade_hands_over_without_failed_requests() {
    let origin = Backend::start("ORIGIN").await;
    let mut node = Node::start(NodeOptions::new().proxy("shutdown_grace_secs = 1")).await;
    node.add_backend("o", &origin.address(), &["a"]).await;
    // A dead backend in the same pool, known down before the upgrade: the new process must
    // inherit that verdict, not rediscover it with client requests.
    node.add_backend("dead", &dead_address(), &["a"]).await;
    node.add_domain("upgrade.test", "a").await;
    node.wait_route("upgrade.test", "/", "ORIGIN").await;
    node.wait_backend_health("dead", false, Duration::from_secs(15))
        .await;

    // Clients keep coming, each on a new connection, through the whole handover.
    let load = GetLoop::start(node.proxy_client(), "upgrade.test", "ORIGIN");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let old_pid = node.pid();
    let pid_file = node.data_dir().join("pingora-vhost.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old_pid.to_string(),
        "the pid file names the running process"
    );
    let sent_at = Instant::now();
    let old_exit = node.upgrade_and_wait_old().await;
    assert_eq!(
        old_exit.code(),
        Some(0),
        "the old process must drain and exit 0 after SIGQUIT\n{}",
        node.logs()
    );
    // The new process took over: listeners, API, and the Raft store with everything in it.
    node.wait_ready().await;
    assert_ne!(node.pid(), old_pid);
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        node.pid().to_string(),
        "after the upgrade the pid file names the new process"
    );
    assert!(node.is_running(), "the new process must keep running");
    let (status, domains) = node.api_list("/api/v1/domains").await;
    assert_eq!(status, 200);
    assert!(
        domains.to_string().contains("upgrade.test"),
        "state kept: {domains}"
    );
    node.add_domain("after-upgrade.test", "a").await;
    node.wait_route("after-upgrade.test", "/", "ORIGIN").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Past the new process's first health ticks, with traffic still flowing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (sent, failed) = load.finish().await;
    let (_, dead) = node.api_get("/api/v1/backends/dead").await;
    assert_eq!(
        dead["requests"], 0,
        "the new process sent requests to a backend the old one knew was down: {dead:#}"
    );
    eprintln!(
        "graceful upgrade: old process exited {:?} after the upgrade began (SIGQUIT 0.5 s in); {sent} requests, {} failed",
        sent_at.elapsed(),
        failed.len()
    );
    assert!(sent > 100, "the load must span the handover");
    assert!(
        failed.is_empty(),
        "requests failed during the graceful upgrade: {failed:?}\n{}",
        node.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// 12. `--check`
// ---------------------------------------------------------------------------------------------

struct CheckConfig {
    /// Replaces the HTTPS listen address (to make it invalid).
    listen_addr: Option<&'static str>,
    proxy_extra: String,
    health_extra: String,
    tail: String,
}

impl CheckConfig {
    fn render(&self, dir: &Path) -> String {
        format!(
            r#"[proxy]
listen_addr = "{https}"
listen_addr_http = "127.0.0.1:{http}"
management_api_addr = "127.0.0.1:{api}"
threads = 1
{proxy_extra}
[api]
token = "test-token"

[cluster]
node_id = 1
data_dir = '{data}'
rpc_addr = "127.0.0.1:{rpc}"
gossip_addr = "127.0.0.1:{gossip}"
bootstrap_expect = 1
secret = "s3cret"

[health_check]
interval_secs = 1
timeout_secs = 1
{health_extra}
{tail}"#,
            https = self
                .listen_addr
                .map(str::to_string)
                .unwrap_or_else(|| format!("127.0.0.1:{}", free_port())),
            http = free_port(),
            api = free_port(),
            rpc = free_port(),
            gossip = free_port(),
            data = dir.join("data").display(),
            proxy_extra = self.proxy_extra,
            health_extra = self.health_extra,
            tail = self.tail,
        )
    }
}

fn valid_tail(cert: &Path, key: &Path) -> String {
    format!(
        r#"
[[virtual_hosts]]
domain = "one.test"
enabled_backends_tag = "a"
http_to_https = true
tls = "manual"
cert_path = '{}'
key_path = '{}'

[[virtual_hosts]]
domain = "two.test"
enabled_backends_tag = "b"

[[backends]]
id = "web-1"
address = "127.0.0.1:3001"
tags = ["a"]

[[backends]]
id = "web-2"
address = "localhost:3002"
tags = ["b"]
health_check_path = "/ready"
"#,
        cert.display(),
        key.display()
    )
}

/// 1-based number of the first line of `text` containing `needle`, searching from `after`.
fn line_of(text: &str, needle: &str, after: usize) -> usize {
    text.lines()
        .enumerate()
        .skip(after)
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in config:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flag_validates_config_files() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(&["one.test"]);
    let (cert_path, key_path) = cert.write_files(dir.path(), "one");
    let base = || CheckConfig {
        listen_addr: None,
        proxy_extra: String::new(),
        health_extra: String::new(),
        tail: valid_tail(&cert_path, &key_path),
    };

    // A valid file exits 0 (and does not start serving: it returns promptly).
    let good = dir.path().join("good.toml");
    std::fs::write(&good, base().render(dir.path())).unwrap();
    let out = run_check(&good).await;
    assert!(
        out.status.success(),
        "--check on a valid file must exit 0, got {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(
        !dir.path().join("data").exists(),
        "--check must not create the data dir (it only validates)"
    );

    struct Case {
        file: &'static str,
        field: &'static str,
        config: CheckConfig,
        /// Text on the line the error must point at (for duplicates: either occurrence).
        lines: Vec<&'static str>,
    }
    let dup_tail = format!(
        "{}\n[[virtual_hosts]]\ndomain = \"one.test\"\nenabled_backends_tag = \"b\"\n",
        base().tail
    );
    let cases = vec![
        Case {
            file: "dup-vhost.toml",
            field: "domain",
            config: CheckConfig {
                tail: dup_tail,
                ..base()
            },
            lines: vec!["domain = \"one.test\""],
        },
        Case {
            file: "unknown-key.toml",
            field: "listen_adress",
            config: CheckConfig {
                proxy_extra: "listen_adress = \"127.0.0.1:1\"\n".into(),
                ..base()
            },
            lines: vec!["listen_adress"],
        },
        Case {
            file: "wrong-type.toml",
            field: "unhealthy_threshold",
            config: CheckConfig {
                health_extra: "unhealthy_threshold = \"three\"\n".into(),
                ..base()
            },
            lines: vec!["unhealthy_threshold"],
        },
        Case {
            file: "negative-timeout.toml",
            field: "upstream_read_timeout_secs",
            config: CheckConfig {
                proxy_extra: "upstream_read_timeout_secs = -5\n".into(),
                ..base()
            },
            lines: vec!["upstream_read_timeout_secs"],
        },
        Case {
            file: "bad-listen.toml",
            field: "listen_addr",
            config: CheckConfig {
                listen_addr: Some("not-an-address"),
                ..base()
            },
            lines: vec!["not-an-address"],
        },
        Case {
            file: "bad-backend-addr.toml",
            field: "address",
            config: CheckConfig {
                tail: format!(
                    "{}\n[[backends]]\nid = \"web-3\"\naddress = \"not-an-address\"\ntags = [\"a\"]\n",
                    base().tail
                ),
                ..base()
            },
            lines: vec!["not-an-address"],
        },
        Case {
            file: "missing-cert.toml",
            field: "cert_path",
            config: CheckConfig {
                tail: format!(
                    "{}\n[[virtual_hosts]]\ndomain = \"three.test\"\nenabled_backends_tag = \"a\"\n\
                     tls = \"manual\"\ncert_path = '/nonexistent/three.crt'\nkey_path = '{}'\n",
                    base().tail,
                    key_path.display()
                ),
                ..base()
            },
            lines: vec!["/nonexistent/three.crt"],
        },
    ];

    let mut failures = Vec::new();
    for case in cases {
        let path = dir.path().join(case.file);
        let text = case.config.render(dir.path());
        std::fs::write(&path, &text).unwrap();
        // For duplicates accept the first or the second occurrence.
        let mut lines = Vec::new();
        for needle in &case.lines {
            let first = line_of(&text, needle, 0);
            lines.push(first);
            if let Some((i, _)) = text
                .lines()
                .enumerate()
                .skip(first)
                .find(|(_, l)| l.contains(needle))
            {
                lines.push(i + 1);
            }
        }
        let out = run_check(&path).await;
        let err = &out.stderr;
        let problems: Vec<String> = [
            out.status
                .success()
                .then(|| "exit status 0 (expected non-zero)".to_string()),
            (!err.contains(case.file))
                .then(|| format!("stderr does not name the file {}", case.file)),
            (!lines.iter().any(|l| err.contains(&format!(":{l}:"))))
                .then(|| format!("stderr does not contain the line `:{}:`", lines[0])),
            (!mentions_field(err, case.field))
                .then(|| format!("stderr does not name the field `{}`", case.field)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {}",
                case.file,
                problems.join("; "),
                err.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "--check must reject each invalid file naming file, line and field:\n{}",
        failures.join("\n")
    );
}

/// #13: `--check` is the truth. Each file holds values at the edge of their documented ranges
/// (before, `threads = 65536` passed `--check` and then panicked); each passes `--check` and
/// the node then starts and answers. Values one past the edge are refused by `--check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_edge_of_their_ranges_pass_check_and_start() {
    let edges: [(&str, &str, &str); 4] = [
        ("threads = 1", "threads = 128", "threads = 129"),
        (
            "[health_check]\ninterval_secs = 1\ntimeout_secs = 1",
            "[health_check]\ninterval_secs = 3600\ntimeout_secs = 3600\nunhealthy_threshold = 1000\nhealthy_threshold = 1000",
            "[health_check]\ninterval_secs = 3601\ntimeout_secs = 1",
        ),
        (
            "threads = 1",
            "threads = 1\nupstream_connect_timeout_ms = 600000\nupstream_read_timeout_secs = 86400\nclient_timeout_secs = 86400\nshutdown_grace_secs = 0",
            "threads = 1\nupstream_connect_timeout_ms = 600001",
        ),
        (
            "[health_check]",
            "[resolver]\nmin_ttl_secs = 86400\nmax_ttl_secs = 86400\n[lets_encrypt]\nrenew_before_days = 365\ncheck_interval_secs = 86400\n[health_check]",
            "[resolver]\nmax_ttl_secs = 86401\n[health_check]",
        ),
    ];
    for (from, edge, beyond) in edges {
        let mut node = Node::new_unstarted(NodeOptions::new());
        let base = node.config_text();
        assert!(base.contains(from), "the base config has {from:?}");
        std::fs::write(&node.config_path, base.replacen(from, beyond, 1)).expect("write");
        let out = run_check(&node.config_path).await;
        assert!(
            !out.status.success(),
            "--check must refuse {beyond:?}: {}",
            out.stderr
        );
        std::fs::write(&node.config_path, base.replacen(from, edge, 1)).expect("write");
        let out = run_check(&node.config_path).await;
        assert!(
            out.status.success(),
            "--check must pass {edge:?}: {}",
            out.stderr
        );
        node.spawn();
        node.wait_ready().await;
        let (status, _) = node.api_get("/api/v1/cluster/status").await;
        assert_eq!(status, 200, "a node started with {edge:?} answers");
        node.sigterm();
        assert!(
            node.wait_exit(Duration::from_secs(20)).await.is_some(),
            "the node started with {edge:?} stops on SIGTERM"
        );
    }
}
