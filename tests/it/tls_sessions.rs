//! TLS session resumption shared by the cluster (#16): the ticket keys are replicated, so a
//! session ticket one node issued resumes on another node without a full handshake, checked
//! with a real TLS client (`openssl s_client`, which saves and offers sessions).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

const HOST: &str = "resume.test";

/// One TLS connection with `openssl s_client`: offers the session in `sess_in` if given,
/// saves the session it ends with to `sess_out`; returns what s_client printed.
async fn s_client(node: &Node, version: &str, sess_in: Option<&Path>, sess_out: &Path) -> String {
    let connect = node.https_addr.to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-servername",
        HOST,
        version,
        "-ign_eof",
        "-sess_out",
        sess_out.to_str().expect("utf-8 path"),
    ];
    if let Some(sess_in) = sess_in {
        args.extend(["-sess_in", sess_in.to_str().expect("utf-8 path")]);
    }
    let mut child = tokio::process::Command::new("openssl")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl s_client runs");
    // A request read to the end: TLS 1.3 tickets come after the handshake, with the answer.
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(request.as_bytes()).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("s_client finished within 15 s")
        .expect("s_client output");
    format!(
        "{}\n--- stderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Adds `HOST` with `cert` through `node`'s API.
async fn add_domain(node: &Node, cert: &TestCert) {
    let (status, body) = node
        .api_post(
            "/api/v1/domains",
            json!({
                "domain": HOST,
                "enabled_backends_tag": "a",
                "cert_pem": cert.cert_pem,
                "key_pem": cert.key_pem,
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Whether s_client's session was resumed (`Reused, TLSv1.x`) rather than new (`New, ...`).
fn reused(out: &str) -> bool {
    out.lines().any(|l| l.starts_with("Reused,"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ticket_from_one_node_resumes_on_another() {
    let cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let cert = self_signed(&[HOST]);
    add_domain(cluster.node(1), &cert).await;
    // Another cluster (its own keys) with the same certificate: it cannot open the tickets.
    let stranger = Node::start_default().await;
    add_domain(&stranger, &cert).await;

    let dir = tempfile::tempdir().expect("temp dir");
    for version in ["-tls1_3", "-tls1_2"] {
        let first = dir.path().join(format!("first{version}.pem"));
        let second = dir.path().join(format!("second{version}.pem"));
        // The first ticket key is made by the leader within seconds of the start.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (on_node1, on_node2) = loop {
            let on_node1 = s_client(cluster.node(1), version, None, &first).await;
            let on_node2 = s_client(cluster.node(2), version, Some(&first), &second).await;
            if reused(&on_node2) || Instant::now() > deadline {
                break (on_node1, on_node2);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(!reused(&on_node1), "{version}: a first connection is new");
        if version == "-tls1_3" {
            // One ticket per handshake, full or resumed (docs/tls.md).
            for (what, out) in [("full", &on_node1), ("resumed", &on_node2)] {
                let tickets = out
                    .matches("Post-Handshake New Session Ticket arrived")
                    .count();
                assert_eq!(tickets, 1, "{version} {what} handshake:\n{out}");
            }
        }
        assert!(
            reused(&on_node2),
            "{version}: node 1's session did not resume on node 2:\n{on_node2}"
        );
        // The same ticket on node 3 (s_client saves no session after a TLS 1.2 resumption).
        let third = dir.path().join(format!("third{version}.pem"));
        let on_node3 = s_client(cluster.node(3), version, Some(&first), &third).await;
        assert!(reused(&on_node3), "{version}: node 3:\n{on_node3}");
        // A node that does not hold the cluster's keys makes a full handshake.
        let elsewhere = s_client(&stranger, version, Some(&first), &third).await;
        assert!(
            !reused(&elsewhere),
            "{version}: another cluster resumed:\n{elsewhere}"
        );
    }
    // The keys never show in the API.
    for path in ["/api/v1/cluster/status", "/api/v1/domains"] {
        let (_, body) = cluster.node(1).api_get(path).await;
        assert!(!body.to_string().contains("secret_hex"), "{path}: {body}");
    }
}

/// The server picks TLS_AES_128_GCM_SHA256 when the client offers it, whatever the client's
/// order (its SHA-256 key schedule runs on the CPU's SHA instructions; docs/tls.md), and a
/// client that offers only another suite still gets that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_chooses_aes_128_gcm_when_offered() {
    let backend = Backend::start("A").await;
    let node = Node::start_default().await;
    node.add_backend("a1", &backend.address(), &["a"]).await;
    add_domain(&node, &self_signed(&[HOST])).await;
    let connect = node.https_addr.to_string();
    for (offered, expected) in [
        (
            "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        ("TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"),
    ] {
        let out = tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &connect,
                "-servername",
                HOST,
                "-tls1_3",
            ])
            .args(["-ciphersuites", offered])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(15), out)
            .await
            .expect("s_client finished within 15 s")
            .expect("openssl s_client runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("Cipher is {expected}")),
            "offered {offered}: expected {expected}:\n{text}"
        );
    }
    // TLS 1.2 the same way.
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &connect, "-servername", HOST, "-tls1_2"])
        .args(["-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("openssl s_client runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("AES128-GCM-SHA256"), "TLS 1.2:\n{text}");
}

/// With tickets off, sessions resume from the node's own cache (`proxy/session_cache.rs`):
/// a TLS 1.3 session once (it is taken when used), a TLS 1.2 session id as often as the
/// client offers it; another node has no such session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tickets_sessions_resume_from_the_nodes_cache() {
    let options = || NodeOptions::new().proxy("tls_session_tickets = false");
    let node = Node::start(options()).await;
    let other = Node::start(options()).await;
    let cert = self_signed(&[HOST]);
    add_domain(&node, &cert).await;
    add_domain(&other, &cert).await;
    let dir = tempfile::tempdir().expect("temp dir");
    for version in ["-tls1_3", "-tls1_2"] {
        let first = dir.path().join(format!("first{version}.pem"));
        let second = dir.path().join(format!("second{version}.pem"));
        let third = dir.path().join(format!("third{version}.pem"));
        let new = s_client(&node, version, None, &first).await;
        assert!(!reused(&new), "{version}: a first connection is new");
        let again = s_client(&node, version, Some(&first), &second).await;
        assert!(
            reused(&again),
            "{version}: not resumed from the cache:\n{again}"
        );
        let once_more = s_client(&node, version, Some(&first), &third).await;
        assert_eq!(
            reused(&once_more),
            version == "-tls1_2",
            "{version}: a TLS 1.3 session resumes once, a TLS 1.2 session id again:\n{once_more}"
        );
        let elsewhere = s_client(&other, version, Some(&first), &third).await;
        assert!(
            !reused(&elsewhere),
            "{version}: another node resumed:\n{elsewhere}"
        );
    }
}
