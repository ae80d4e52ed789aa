//! The dashboard page, rendered by headless Chromium (Debian package `chromium`) against a real
//! node: what an operator sees after the page's scripts ran.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Loads `url` in headless Chromium, lets its scripts run, and returns the resulting DOM.
fn rendered_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox", // tests run as root
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("chromium must be installed (scripts/bootstrap.sh installs the chromium package)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the table row whose first cell is `first_cell`, and its cells' classes.
fn row<'a>(dom: &'a str, table_id: &str, first_cell: &str) -> Option<&'a str> {
    let table = &dom[dom.find(&format!("id=\"{table_id}\""))?..];
    let table = &table[..table.find("</table>")?];
    table
        .split("<tr>")
        .find(|r| r.starts_with(&format!("<td>{first_cell}</td>")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_cluster_domains_backends_and_health() {
    let live = Backend::start("LIVE").await;
    let node = Node::start(NodeOptions::new().extra(&format!(
        "[[virtual_hosts]]\ndomain = \"shop.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"web-live\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"web-dead\"\naddress = \"{}\"\ntags = [\"b\"]\n",
        live.address(),
        dead_address()
    )))
    .await;
    node.wait_backend_health("web-dead", false, Duration::from_secs(15))
        .await;

    let base = format!("http://{}", node.api_addr);
    let dom = rendered_dom(&format!("{base}/dashboard#token={TOKEN}"));
    assert!(
        dom.contains("id=\"node-id\">1<"),
        "node id in the header:\n{dom}"
    );
    assert!(dom.contains("id=\"role\">Leader<"), "role:\n{dom}");
    let member = row(&dom, "members", "1 (leader)").unwrap_or_else(|| panic!("member row:\n{dom}"));
    assert!(member.contains("class=\"up\">alive<"), "{member}");
    let domain = row(&dom, "domains", "shop.test").unwrap_or_else(|| panic!("domain row:\n{dom}"));
    assert!(domain.contains("<td>a</td>"), "active tag a: {domain}");
    assert!(domain.contains("switch a↔b"), "switch button: {domain}");
    let up = row(&dom, "backends", "web-live").unwrap_or_else(|| panic!("web-live row:\n{dom}"));
    assert!(up.contains("class=\"up\">up<"), "web-live is up: {up}");
    let down = row(&dom, "backends", "web-dead").unwrap_or_else(|| panic!("web-dead row:\n{dom}"));
    assert!(
        down.contains("class=\"down\">down<"),
        "web-dead is down: {down}"
    );
    assert!(
        dom.contains("node started"),
        "the live log shows this node's lines:\n{dom}"
    );
    assert!(
        !dom.contains("log.file="),
        "log-crate noise is stripped:\n{dom}"
    );

    // Without a token the page asks for one and shows no data.
    let dom = rendered_dom(&format!("{base}/dashboard"));
    assert!(
        dom.contains("the API wants a valid bearer token"),
        "asks for the token:\n{dom}"
    );
    assert!(
        row(&dom, "domains", "shop.test").is_none(),
        "no data without a token"
    );
    // `/` leads to the dashboard.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/dashboard")
    );
}
