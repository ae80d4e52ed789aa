//! Backend names follow DNS: a real DNS server (dnsmasq on a loopback port, answering from a
//! hosts file the test rewrites) and a node whose `[resolver]` points at it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// dnsmasq serving `hosts` (and nothing else) on 127.0.0.1:`port`, with a 1 s TTL.
struct Dns {
    child: Child,
    hosts: PathBuf,
    port: u16,
}

impl Dns {
    fn start(dir: &Path) -> Dns {
        let port = free_port();
        let hosts = dir.join("dns-hosts");
        std::fs::write(&hosts, "").expect("write hosts file");
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("dnsmasq is not installed (scripts/bootstrap.sh installs dnsmasq-base)");
        let child = Command::new(bin)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local-ttl=1",
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        Dns { child, hosts, port }
    }

    /// Replaces the records and makes dnsmasq read them (SIGHUP re-reads --addn-hosts).
    fn set(&self, records: &[(&str, &str)]) {
        let text: String = records
            .iter()
            .map(|(ip, name)| format!("{ip} {name}\n"))
            .collect();
        std::fs::write(&self.hosts, text).expect("rewrite hosts file");
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill -HUP")
            .success();
        assert!(ok, "SIGHUP to dnsmasq failed");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends GETs one after another for `for_how_long`; returns each answer's body, or the error.
async fn bodies(
    client: &ProxyClient,
    host: &str,
    for_how_long: Duration,
) -> Vec<(Instant, Result<String, String>)> {
    let end = Instant::now() + for_how_long;
    let mut out = Vec::new();
    while Instant::now() < end {
        let r = match client.get(host, "/").await {
            Ok(r) if r.status == 200 => Ok(r.body),
            Ok(r) => Err(format!("{} {}", r.status, r.body)),
            Err(e) => Err(format!("{e:?}")),
        };
        out.push((Instant::now(), r));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out
}

#[tokio::test]
async fn backend_names_follow_dns_changes_and_keep_the_last_answer_when_dns_fails() {
    let dns_dir = tempfile::tempdir().expect("tempdir");
    let mut dns = Dns::start(dns_dir.path());
    // Two origins on one port, at two loopback addresses: a record change moves traffic.
    let port = free_port();
    let blue = Backend::start_on("blue", SocketAddr::from(([127, 0, 0, 2], port))).await;
    let green = Backend::start_on("green", SocketAddr::from(([127, 0, 0, 3], port))).await;
    let node = Node::start(NodeOptions::new().extra(&format!(
        "[resolver]\nservers = [\"127.0.0.1:{}\"]\nmin_ttl_secs = 1\nmax_ttl_secs = 2\n",
        dns.port
    )))
    .await;
    let name = "svc.pvtest.internal";
    let address = format!("{name}:{port}");

    // Unknown at first: the backend exists, shows why it has no address, and serves nothing.
    let created = node.add_backend("svc", &address, &["a"]).await;
    assert_eq!(
        created["resolved_addrs"],
        serde_json::json!([]),
        "{created}"
    );
    assert!(
        created["resolve_error"].is_string(),
        "a failed lookup is shown: {created}"
    );
    node.add_domain("dns.test", "a").await;
    assert_eq!(node.proxy_get("dns.test", "/").await.status, 503);

    // The name appears: a name that failed once is looked up again, and traffic starts.
    dns.set(&[("127.0.0.2", name)]);
    node.wait_route("dns.test", "/", "blue").await;
    let (_, b) = node.api_get("/api/v1/backends/svc").await;
    assert_eq!(
        b["resolved_addrs"],
        serde_json::json!([format!("127.0.0.2:{port}")]),
        "{b}"
    );
    assert!(b["resolve_error"].is_null(), "{b}");

    // The record changes while requests flow: traffic moves within the TTL (1 s, clamped to
    // at most 2 s), and no request fails: the old address serves until the switch.
    let client = node.proxy_client();
    let changed_at = Instant::now();
    dns.set(&[("127.0.0.3", name)]);
    let seen = bodies(&client, "dns.test", Duration::from_secs(5)).await;
    let failures: Vec<_> = seen.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "requests failed across the DNS change: {failures:?}"
    );
    let first_green = seen
        .iter()
        .position(|(_, r)| r.as_deref() == Ok("green"))
        .expect("traffic never moved to the new address");
    let moved_after = seen[first_green].0 - changed_at;
    assert!(
        moved_after < Duration::from_secs(4),
        "traffic moved {moved_after:?} after the change (TTL 1 s, ceiling 2 s)"
    );
    assert!(
        seen[first_green..]
            .iter()
            .all(|(_, r)| r.as_deref() == Ok("green")),
        "after the switch every request goes to the new address"
    );

    // Several answers: connections spread over all of them.
    dns.set(&[("127.0.0.2", name), ("127.0.0.3", name)]);
    wait_for(Duration::from_secs(6), "both addresses listed", || async {
        let (_, b) = node.api_get("/api/v1/backends/svc").await;
        (b["resolved_addrs"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;
    let seen = bodies(
        &client.without_keepalive(),
        "dns.test",
        Duration::from_secs(1),
    )
    .await;
    for who in ["blue", "green"] {
        assert!(
            seen.iter().any(|(_, r)| r.as_deref() == Ok(who)),
            "{who} got no request of {}",
            seen.len()
        );
    }

    // A restarted node serves its named backend from its very first request: the names are
    // looked up before the proxy listens, not a moment after.
    let mut node = node;
    node.kill9();
    node.spawn();
    let first = loop {
        match node
            .proxy_client()
            .without_keepalive()
            .get("dns.test", "/")
            .await
        {
            Ok(r) => break r,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    assert!(
        first.status == 200 && ["blue", "green"].contains(&first.body.as_str()),
        "the first request after a restart: {} {:?}",
        first.status,
        first.body
    );
    node.wait_ready().await;

    // The DNS server goes away: lookups fail, the last good answer stays in use.
    dns.set(&[("127.0.0.3", name)]);
    wait_for(Duration::from_secs(6), "one address again", || async {
        let (_, b) = node.api_get("/api/v1/backends/svc").await;
        (b["resolved_addrs"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    dns.stop();
    // Proxy until the failed lookup shows in the API, then a little longer.
    let mut seen = Vec::new();
    let mut shown = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while shown.is_none() && Instant::now() < deadline {
        seen.extend(bodies(&client, "dns.test", Duration::from_millis(500)).await);
        let (_, b) = node.api_get("/api/v1/backends/svc").await;
        shown = b["resolve_error"].is_string().then_some(b);
    }
    let b = shown.expect("the lookup error never showed in the API");
    seen.extend(bodies(&client, "dns.test", Duration::from_secs(2)).await);
    assert!(
        seen.iter().all(|(_, r)| r.as_deref() == Ok("green")),
        "a failing resolver must not take the backend away: {:?}",
        seen.iter()
            .filter(|(_, r)| r.as_deref() != Ok("green"))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        b["resolved_addrs"],
        serde_json::json!([format!("127.0.0.3:{port}")]),
        "{b}"
    );
    assert!(blue.requests() > 0 && green.requests() > 0);
}
