//! ACME against Pebble, Let's Encrypt's test CA (Debian package `pebble`), with
//! `pebble-challtestsrv` answering every DNS name with 127.0.0.1. Pebble validates HTTP-01
//! against a node's real plain-HTTP listener and issues real certificates, which the tests
//! check by a TLS handshake that verifies the chain up to Pebble's issuing root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

/// Pebble + challtestsrv, on free loopback ports, killed on drop.
struct Pebble {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    acme_port: u16,
    management_port: u16,
    /// The CA that signed Pebble's own HTTPS certificate (for `[lets_encrypt] ca_bundle`).
    ca_pem_path: PathBuf,
    client: reqwest::Client,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl Pebble {
    /// Ports and TLS material; the processes start in [`Pebble::start`], once the port Pebble
    /// validates HTTP-01 on (a node's plain-HTTP listener) is known.
    fn prepare() -> Pebble {
        let dir = tempfile::Builder::new()
            .prefix("pvh-pebble-")
            .tempdir()
            .expect("temp dir");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "pingora-vhost test CA for Pebble",
        );
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &ca, &ca_key).expect("Pebble cert");
        let ca_pem_path = dir.path().join("ca.pem");
        write(&ca_pem_path, &ca.pem());
        write(&dir.path().join("cert.pem"), &cert.pem());
        write(&dir.path().join("key.pem"), &key.serialize_pem());
        let ca_cert = reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA for reqwest");
        let client = reqwest::Client::builder()
            .add_root_certificate(ca_cert)
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        Pebble {
            dir,
            children: Vec::new(),
            acme_port: free_port(),
            management_port: free_port(),
            ca_pem_path,
            client,
        }
    }

    fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// `[lets_encrypt]` for a node that uses this Pebble.
    fn lets_encrypt_config(&self) -> String {
        format!(
            "[lets_encrypt]\nemail = \"ops@example.test\"\ndirectory_url = \"{}\"\nca_bundle = '{}'\ncheck_interval_secs = 1\n",
            self.directory_url(),
            self.ca_pem_path.display()
        )
    }

    fn spawn(&mut self, program: &str, args: &[String], log: &str) {
        let out = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {program}: {e} (scripts/bootstrap.sh installs the Debian package `pebble`)")
            });
        self.children.push(child);
    }

    /// Starts challtestsrv (DNS: every name is 127.0.0.1) and Pebble, which validates
    /// HTTP-01 on `http_port`.
    async fn start(&mut self, http_port: u16) {
        let dns = free_addr();
        let s = |v: &str| v.to_string();
        self.spawn(
            "pebble-challtestsrv",
            &[
                s("-defaultIPv4"),
                s("127.0.0.1"),
                s("-defaultIPv6"),
                s(""),
                s("-dns01"),
                dns.to_string(),
                s("-http01"),
                s(""),
                s("-https01"),
                s(""),
                s("-tlsalpn01"),
                s(""),
                s("-management"),
                free_addr().to_string(),
            ],
            "challtestsrv.log",
        );
        let config = json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{}", self.acme_port),
            "managementListenAddress": format!("127.0.0.1:{}", self.management_port),
            "certificate": "cert.pem",
            "privateKey": "key.pem",
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        write(&self.dir.path().join("pebble.json"), &config.to_string());
        self.spawn(
            "pebble",
            &[
                s("-config"),
                s("pebble.json"),
                s("-dnsserver"),
                dns.to_string(),
            ],
            "pebble.log",
        );
        let client = self.client.clone();
        let url = self.directory_url();
        wait_for(Duration::from_secs(20), "Pebble's ACME directory", || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => Some(()),
                    _ => None,
                }
            }
        })
        .await;
    }

    /// Pebble's issuing root (regenerated at every Pebble start).
    async fn issuing_root(&self) -> reqwest::Certificate {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management_port);
        let pem = self
            .client
            .get(&url)
            .send()
            .await
            .expect("GET /roots/0")
            .text()
            .await
            .expect("root PEM");
        reqwest::Certificate::from_pem(pem.as_bytes()).expect("Pebble root")
    }

    fn logs(&self) -> String {
        ["pebble.log", "challtestsrv.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("----- {f} -----\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// GET https://{domain}/ through `https_addr` with SNI = domain, trusting only Pebble's root:
/// succeeds only when the node serves a certificate for `domain` that Pebble issued.
async fn get_verified(
    root: &reqwest::Certificate,
    domain: &str,
    https_addr: SocketAddr,
) -> Result<(u16, String), String> {
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root.clone())
        .resolve(domain, https_addr)
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("https://{domain}:{}/", https_addr.port());
    let r = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

async fn wait_verified(
    pebble: &Pebble,
    node: &Node,
    domain: &str,
    body: &str,
    what: &str,
) -> Duration {
    let root = pebble.issuing_root().await;
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(60);
    let mut last;
    loop {
        last = get_verified(&root, domain, node.https_addr).await;
        if matches!(&last, Ok((200, b)) if b == body) {
            return started.elapsed();
        }
        if std::time::Instant::now() >= deadline {
            let (_, certs) = node.api_get(&format!("/api/v1/certs/{domain}")).await;
            panic!(
                "{what}: no Pebble-issued certificate for {domain} within 60 s; last attempt: \
                 {last:?}\ncerts API: {certs:#}\n{}\n{}",
                pebble.logs(),
                node.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn cert_view(node: &Node, domain: &str) -> Value {
    let (status, v) = node.api_get(&format!("/api/v1/certs/{domain}")).await;
    assert_eq!(status, 200, "GET /api/v1/certs/{domain}: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_domain_gets_a_pebble_certificate_and_renews_on_request() {
    let backend = Backend::start("ACME-BACKEND").await;
    let mut pebble = Pebble::prepare();
    let options = NodeOptions::new().extra(&format!(
        "{}\n[[virtual_hosts]]\ndomain = \"acme.test\"\nenabled_backends_tag = \"a\"\ntls = \"acme\"\n\n\
         [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"a\"]\n",
        pebble.lets_encrypt_config(),
        backend.address()
    ));
    let node = Node::new_unstarted(options);
    pebble.start(node.http_addr.port()).await;
    let node = node.start_spawned().await;

    let took = wait_verified(
        &pebble,
        &node,
        "acme.test",
        "ACME-BACKEND",
        "first issuance",
    )
    .await;
    eprintln!("acme.test: Pebble certificate served {took:?} after the node was ready");
    let first = cert_view(&node, "acme.test").await;
    assert_eq!(first["tls"], "acme", "{first:#}");
    let cert = &first["certificate"];
    assert_eq!(cert["names"], json!(["acme.test"]), "{first:#}");
    assert!(
        cert["issuer"].as_str().unwrap_or("").contains("Pebble"),
        "issued by Pebble: {first:#}"
    );
    assert_eq!(cert["expiring_soon"], false, "{first:#}");
    assert_eq!(first["acme"]["last_error"], Value::Null, "{first:#}");
    assert!(first["acme"]["last_success"].is_string(), "{first:#}");
    let (status, list) = node.api_list("/api/v1/certs").await;
    assert_eq!(status, 200);
    assert!(list.to_string().contains("acme.test"), "{list}");

    // Manual renewal: a new certificate (new serial) replaces the old one.
    let (status, body) = node.api_post_empty("/api/v1/certs/acme.test/renew").await;
    assert_eq!(status, 202, "renew: {body}");
    let old_serial = cert["serial"].as_str().unwrap_or("").to_string();
    let renewed = wait_for(Duration::from_secs(60), "a renewed certificate", || async {
        let v = cert_view(&node, "acme.test").await;
        let serial = v["certificate"]["serial"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (serial != old_serial && !serial.is_empty()).then_some(v)
    })
    .await;
    assert_eq!(renewed["acme"]["renew_requested"], false, "{renewed:#}");
    wait_verified(&pebble, &node, "acme.test", "ACME-BACKEND", "after renewal").await;

    // Renewal is for ACME domains only; unknown domains are 404.
    node.add_domain("plain.test", "a").await;
    let (status, body) = node.api_post_empty("/api/v1/certs/plain.test/renew").await;
    assert_eq!(status, 409, "renew of a tls=none domain: {body}");
    let (status, _) = node
        .api_post_empty("/api/v1/certs/missing.test/renew")
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_challenge_is_answered_by_a_follower_the_ca_validates_against() {
    let backend = Backend::start("CLUSTER-ACME").await;
    let mut pebble = Pebble::prepare();
    let le = pebble.lets_encrypt_config();
    let mut cluster = Cluster::start(3, |_| NodeOptions::new().extra(&le)).await;
    let (leader, follower) = cluster.leader_and_follower().await;
    // Pebble validates only against the follower: the leader runs the order, so this passes
    // only if the challenge answer is replicated and applied there before `set_ready`.
    pebble.start(cluster.node(follower).http_addr.port()).await;

    let n = cluster.node(leader);
    n.add_backend("b", &backend.address(), &["a"]).await;
    let (status, body) = n
        .api_post(
            "/api/v1/domains",
            json!({"domain": "cluster-acme.test", "enabled_backends_tag": "a", "tls": "acme"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // Every node serves the issued certificate (chain + key are in Raft).
    for id in 1..=3 {
        wait_verified(
            &pebble,
            cluster.node(id),
            "cluster-acme.test",
            "CLUSTER-ACME",
            &format!("node {id}"),
        )
        .await;
    }
    let v = cert_view(cluster.node(follower), "cluster-acme.test").await;
    assert_eq!(v["acme"]["consecutive_failures"], 0, "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_validation_is_reported_and_the_domain_keeps_serving() {
    let backend = Backend::start("STILL-SERVING").await;
    let mut pebble = Pebble::prepare();
    let node = Node::new_unstarted(NodeOptions::new().extra(&format!(
        "{}\n[[virtual_hosts]]\ndomain = \"fails.test\"\nenabled_backends_tag = \"a\"\ntls = \"acme\"\n\n\
         [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"a\"]\n",
        pebble.lets_encrypt_config(),
        backend.address()
    )));
    // Pebble validates on a port where nothing listens: the challenge cannot succeed.
    let dead_port: u16 = dead_address()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    pebble.start(dead_port).await;
    let node = node.start_spawned().await;

    let v = wait_for(
        Duration::from_secs(60),
        "the failed order in the certs API",
        || async {
            let v = cert_view(&node, "fails.test").await;
            v["acme"]["last_error"].is_string().then_some(v)
        },
    )
    .await;
    assert_eq!(
        v["certificate"],
        Value::Null,
        "no certificate was issued: {v:#}"
    );
    assert!(
        v["acme"]["consecutive_failures"].as_u64().unwrap_or(0) >= 1,
        "{v:#}"
    );
    assert_eq!(
        v["acme"]["order_in_flight"],
        Value::Null,
        "lease released: {v:#}"
    );
    let metrics = node.metrics_text().await;
    assert!(
        metrics.contains("pingora_vhost_acme_orders_total{result=\"error\"}"),
        "failed order counted:\n{metrics}"
    );
    // The domain keeps serving plain HTTP (and HTTPS with the default certificate).
    node.wait_route("fails.test", "/", "STILL-SERVING").await;
}

/// `[api] tls_domain`: the management API serves the certificate the node obtained through
/// its own ACME for that domain (issued by Pebble here, verified against Pebble's root with the
/// domain as the name), and the node's default certificate until then, so an operator can
/// reach the API before the first issuance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_api_serves_the_certificate_issued_through_acme_for_its_domain() {
    let backend = Backend::start("API-ACME").await;
    let mut pebble = Pebble::prepare();
    let options = NodeOptions::new()
        .api("tls_domain = \"api.acme.test\"")
        .extra(&format!(
            "{}\n[[virtual_hosts]]\ndomain = \"api.acme.test\"\nenabled_backends_tag = \"a\"\ntls = \"acme\"\n\n\
             [[backends]]\nid = \"b1\"\naddress = \"{}\"\ntags = [\"a\"]\n",
            pebble.lets_encrypt_config(),
            backend.address()
        ));
    let mut node = Node::new_unstarted(options);
    pebble.start(node.http_addr.port()).await;
    node.spawn();
    let api = node.api_addr;
    let url = format!("https://api.acme.test:{}/api/v1/health", api.port());
    // Reachable at once, with the default certificate (not verifiable yet).
    let insecure = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("api.acme.test", api)
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    wait_for(Duration::from_secs(30), "the API over TLS", || async {
        let r = insecure.get(&url).send().await.ok()?;
        (r.status().as_u16() == 200).then_some(())
    })
    .await;
    let plain = reqwest::Client::new()
        .get(format!("http://{api}/api/v1/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");

    // Once issued, the API's certificate verifies against Pebble's root for the domain.
    let root = pebble.issuing_root().await;
    let verifying = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .resolve("api.acme.test", api)
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "the API serves the Pebble-issued certificate",
        || async {
            let r = verifying.get(&url).send().await.ok()?;
            (r.status().as_u16() == 200).then_some(())
        },
    )
    .await;
    // The token-protected API over that verified channel.
    let (status, body) = {
        let r = verifying
            .get(format!(
                "https://api.acme.test:{}/api/v1/domains",
                api.port()
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET over verified TLS");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("api.acme.test"), "{body}");
}
