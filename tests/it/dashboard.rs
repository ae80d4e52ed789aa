//! The dashboard page, rendered by headless Chromium (Debian package `chromium`) against a real
//! node: what an operator sees after the page's scripts ran.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// Loads `url` in headless Chromium, lets its scripts run, and returns the resulting DOM.
pub(crate) fn rendered_dom(url: &str) -> String {
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
pub(crate) fn row<'a>(dom: &'a str, table_id: &str, first_cell: &str) -> Option<&'a str> {
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

/// A headless Chromium driven over the DevTools protocol (one page), killed on drop.
struct Browser {
    child: std::process::Child,
    _profile: tempfile::TempDir,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let port = free_port();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--remote-debugging-port={port}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromium must be installed (scripts/bootstrap.sh)");
        let http = reqwest::Client::new();
        // The page's URL goes through `location.href` below: a `#fragment` in /json/new's query
        // would be cut off as that request's own fragment.
        let new_page = format!("http://127.0.0.1:{port}/json/new?about:blank");
        let page: serde_json::Value = wait_for(
            Duration::from_secs(20),
            "Chromium's DevTools endpoint",
            || {
                let (http, new_page) = (http.clone(), new_page.clone());
                async move {
                    let r = http.put(&new_page).send().await.ok()?;
                    r.json::<serde_json::Value>().await.ok()
                }
            },
        )
        .await;
        let ws_url = page["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("no webSocketDebuggerUrl in {page}"))
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("DevTools websocket");
        let mut browser = Browser {
            child,
            _profile: profile,
            ws,
            next_id: 0,
        };
        browser
            .eval(&format!("location.href = {}; true", serde_json::json!(url)))
            .await;
        browser
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let params = serde_json::json!({
            "expression": expression, "awaitPromise": true, "returnByValue": true});
        // A call that lands while the page navigates fails; callers poll, so it reads as null.
        let Ok(result) = self.call("Runtime.evaluate", params).await else {
            return serde_json::Value::Null;
        };
        if let Some(ex) = result["exceptionDetails"].as_object() {
            panic!("page script failed: {ex:?}");
        }
        result["result"]["value"].clone()
    }

    /// A PNG screenshot of the element `selector` (as the page draws it, pixels).
    async fn screenshot(&mut self, selector: &str) -> Vec<u8> {
        let rect = self
            .eval(&format!(
                "(() => {{ const r = document.querySelector({}).getBoundingClientRect(); \
                 return [r.left + scrollX, r.top + scrollY, r.width, r.height]; }})()",
                serde_json::json!(selector)
            ))
            .await;
        let n = |i: usize| rect[i].as_f64().unwrap_or(0.0);
        let params = serde_json::json!({"format": "png", "captureBeyondViewport": true,
            "clip": {"x": n(0), "y": n(1), "width": n(2), "height": n(3), "scale": 1}});
        let shot = self
            .call("Page.captureScreenshot", params)
            .await
            .expect("a screenshot");
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot")
    }

    /// One DevTools call; its result.
    async fn call(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.next_id += 1;
        let id = self.next_id;
        let call = serde_json::json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(call.to_string().into()))
            .await
            .expect("send to DevTools");
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("DevTools answer within 30 s")
                .expect("DevTools stream open")
                .expect("DevTools message");
            let Message::Text(text) = msg else { continue };
            let v: serde_json::Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                if !v["error"].is_null() {
                    return Err(v["error"].clone());
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Clicks the first button in the element `target` (a JS expression), then waits until
    /// `condition` holds in the page.
    async fn click_and_wait(&mut self, target: &str, condition: &str, what: &str) {
        self.eval(&format!("{target}.querySelector('button').click(); true"))
            .await;
        self.wait_until(condition, what).await;
    }

    /// Polls `condition` (a JS expression) in the page until it is true.
    async fn wait_until(&mut self, condition: &str, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.eval(condition).await != serde_json::Value::Bool(true) {
            assert!(
                std::time::Instant::now() < deadline,
                "dashboard: {what} did not happen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The operator's a/b cutover and drain, clicked on the dashboard, change the cluster: the
/// proxy follows the switch, and the page shows the new state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_buttons_switch_a_domain_and_drain_a_backend() {
    let blue = Backend::start("BLUE").await;
    let green = Backend::start("GREEN").await;
    let node = Node::start(NodeOptions::new().extra(&format!(
        "[[virtual_hosts]]\ndomain = \"cut.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"blue\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"green\"\naddress = \"{}\"\ntags = [\"b\"]\n",
        blue.address(),
        green.address()
    )))
    .await;
    node.wait_route("cut.test", "/", "BLUE").await;
    node.wait_backend_health("green", true, Duration::from_secs(15))
        .await;

    let mut page =
        Browser::open(&format!("http://{}/dashboard#token={TOKEN}", node.api_addr)).await;
    let row = |table: &str, first: &str| {
        format!(
            "[...document.querySelectorAll('#{table} tbody tr')].find(r => r.cells[0].textContent === '{first}')"
        )
    };
    page.wait_until(
        &format!("!!{}", row("domains", "cut.test")),
        "the domain row",
    )
    .await;
    // The operator confirms the dialog.
    page.eval("window.confirm = () => true; true").await;

    page.click_and_wait(
        &row("domains", "cut.test"),
        &format!(
            "{}.cells[1].textContent === 'b'",
            row("domains", "cut.test")
        ),
        "the switched tag shown",
    )
    .await;
    let (_, d) = node.api_get("/api/v1/domains/cut.test").await;
    assert_eq!(d["enabled_backends_tag"], "b", "{d}");
    let r = node.proxy_get("cut.test", "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "GREEN"),
        "traffic follows the switch"
    );

    page.click_and_wait(
        &row("backends", "green"),
        &format!(
            "{}.cells[3].textContent === 'draining'",
            row("backends", "green")
        ),
        "the drained backend shown",
    )
    .await;
    let (_, b) = node.api_get("/api/v1/backends/green").await;
    assert_eq!(b["draining"], true, "{b}");
    page.click_and_wait(
        &row("backends", "green"),
        &format!("{}.cells[3].textContent === 'up'", row("backends", "green")),
        "the undrained backend shown",
    )
    .await;
    let (_, b) = node.api_get("/api/v1/backends/green").await;
    assert_eq!(b["draining"], false, "{b}");
}

/// Types `text` into the domain search box.
async fn search(page: &mut Browser, text: &str) {
    page.eval(&format!(
        "(() => {{ const s = document.getElementById('domain-search'); s.value = {}; \
         s.dispatchEvent(new Event('input')); return true; }})()",
        serde_json::json!(text)
    ))
    .await;
}

/// #15: with 100,000 domains the page shows one page of them (not 100,000 rows), its first data
/// is on screen within 2 s of navigation by the browser's own clock, and the search box and
/// the page buttons reach any domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_and_searches_100k_domains() {
    const N: usize = 100_000;
    let origin = Backend::start("ORIGIN").await;
    let mut seed = String::with_capacity(N * 80);
    seed.push_str(&format!(
        "[[backends]]\nid = \"web\"\naddress = \"{}\"\ntags = [\"a\"]\n\n",
        origin.address()
    ));
    for i in 0..N {
        seed.push_str(&format!(
            "[[virtual_hosts]]\ndomain = \"d{i}.many.test\"\nenabled_backends_tag = \"a\"\n"
        ));
    }
    let node = Node::start(
        NodeOptions::new()
            // Reading a 7 MB config file takes a while in a debug build.
            .start_timeout(Duration::from_secs(180))
            .extra(&seed),
    )
    .await;
    wait_for(Duration::from_secs(120), "the seed applied", || async {
        let (_, page) = node.api_get("/api/v1/domains?limit=1").await;
        (page["total"] == N).then_some(())
    })
    .await;
    node.wait_route("d99999.many.test", "/", "ORIGIN").await;

    let mut page =
        Browser::open(&format!("http://{}/dashboard#token={TOKEN}", node.api_addr)).await;
    page.wait_until(
        "performance.getEntriesByName('pvh-first-data').length === 1",
        "the first data on screen",
    )
    .await;
    // Milliseconds from the start of the navigation to the frame after the tables were
    // filled, by the browser's performance timeline.
    let first_data_ms = page
        .eval("performance.getEntriesByName('pvh-first-data')[0].startTime")
        .await
        .as_f64()
        .expect("a mark time");
    eprintln!(
        "dashboard with {N} domains: first data on screen {first_data_ms:.0} ms after navigation"
    );
    assert!(
        first_data_ms < 2000.0,
        "first paint with data took {first_data_ms:.0} ms (bound 2000 ms)"
    );
    let rows = "document.querySelectorAll('#domains tbody tr')";
    assert_eq!(
        page.eval(&format!("{rows}.length")).await,
        50,
        "one page of rows"
    );
    let count = "document.querySelector('[data-list=domains] .count').textContent";
    assert_eq!(page.eval(count).await, format!("1–50 of {N}"));

    // The search box finds one domain among 100,000.
    search(&mut page, "D77777.many").await;
    page.wait_until(
        &format!("{rows}.length === 1 && {rows}[0].cells[0].textContent === 'd77777.many.test'"),
        "the searched domain alone in the table",
    )
    .await;
    assert_eq!(page.eval(count).await, "1–1 of 1");

    // A broader prefix pages: d1 matches 11,111 domains; the next page starts after the first.
    search(&mut page, "d1").await;
    page.wait_until(
        &format!("{count} === '1–50 of 11111'"),
        "the d1 prefix's first page",
    )
    .await;
    let first_of_page_1 = page.eval(&format!("{rows}[0].cells[0].textContent")).await;
    page.eval("document.querySelector('[data-list=domains] .next').click(); true")
        .await;
    page.wait_until(&format!("{count} === '51–100 of 11111'"), "the second page")
        .await;
    let first_of_page_2 = page.eval(&format!("{rows}[0].cells[0].textContent")).await;
    assert_ne!(first_of_page_1, first_of_page_2);
    page.eval("document.querySelector('[data-list=domains] .prev').click(); true")
        .await;
    page.wait_until(
        &format!("{count} === '1–50 of 11111'"),
        "back to the first page",
    )
    .await;
    assert_eq!(
        page.eval(&format!("{rows}[0].cells[0].textContent")).await,
        first_of_page_1
    );
}

/// Pixels of `png` within a small distance of the colour `rgb`.
fn pixels_like(png_bytes: &[u8], rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("a PNG screenshot");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG frame");
    let channels = info.color_type.samples();
    buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|px| {
            px.len() >= 3 && (0..3).all(|i| (i32::from(px[i]) - i32::from(rgb[i])).abs() <= 40)
        })
        .count()
}

/// The traffic charts (issue #14 item 8): per domain and per backend, drawn in the page from
/// the node's own 15-minute history; they show requests, 5xx and latency, move as traffic
/// flows, and the screenshot of a chart has its line in it (not only the DOM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_charts_draw_domain_and_backend_traffic_and_move_with_it() {
    let live = Backend::start("LIVE").await;
    let node = Node::start(NodeOptions::new().extra(&format!(
        "[[virtual_hosts]]\ndomain = \"busy.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[virtual_hosts]]\ndomain = \"broken.test\"\nenabled_backends_tag = \"b\"\n\n\
         [[backends]]\nid = \"web-live\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"web-dead\"\naddress = \"{}\"\ntags = [\"b\"]\n",
        live.address(),
        dead_address()
    )))
    .await;
    node.wait_route("busy.test", "/", "LIVE").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (client, stop) = (node.proxy_client(), stop.clone());
        tokio::spawn(async move {
            // Bounded: the test stops it, and it ends by itself after a minute anyway.
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < until
            {
                let _ = client.get("busy.test", "/slow?ms=4").await;
                let _ = client.get("broken.test", "/").await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let mut page =
        Browser::open(&format!("http://{}/dashboard#token={TOKEN}", node.api_addr)).await;
    let chart = |box_id: &str, name: &str, svg: &str| {
        format!("document.querySelector('#{box_id} .chart[data-name=\"{name}\"] svg.{svg}')")
    };
    let lines = |box_id: &str, name: &str, svg: &str| {
        format!(
            "({}?.querySelectorAll('polyline').length ?? 0)",
            chart(box_id, name, svg)
        )
    };
    // Requests and 5xx lines per domain; latency per backend.
    page.wait_until(
        &format!("{} >= 1", lines("domain-charts", "busy.test", "rate")),
        "the busy domain's request chart",
    )
    .await;
    page.wait_until(
        &format!("{} === 2", lines("domain-charts", "broken.test", "rate")),
        "the broken domain's 5xx line",
    )
    .await;
    page.wait_until(
        &format!("{} >= 1", lines("backend-charts", "web-live", "latency")),
        "the backend's latency chart",
    )
    .await;
    // It moves: the next 5 s point changes the line.
    let points = format!(
        "{}.querySelector('polyline').getAttribute('points')",
        chart("domain-charts", "busy.test", "rate")
    );
    let before = page.eval(&points).await;
    page.wait_until(
        &format!("{points} !== {before}"),
        "the chart to move with the next point",
    )
    .await;
    // The pixels: the request line (#0969da) is drawn in the chart's area.
    let shot = page
        .screenshot(".chart[data-name=\"busy.test\"] svg.rate")
        .await;
    let blue = pixels_like(&shot, [0x09, 0x69, 0xda]);
    assert!(blue >= 20, "the request line is on screen: {blue} pixels");
    let shot = page
        .screenshot(".chart[data-name=\"broken.test\"] svg.rate")
        .await;
    let red = pixels_like(&shot, [0xcf, 0x22, 0x2e]);
    assert!(red >= 20, "the 5xx line is on screen: {red} pixels");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();

    // The API behind it.
    let (status, s) = node.api_get("/api/v1/stats/series?domain=busy.test").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["step_secs"], 5);
    assert_eq!(s["domains"][0]["name"], "busy.test");
    assert!(
        s["backends"].as_array().is_some_and(|b| b.is_empty()),
        "{s}"
    );
    let last = s["domains"][0]["points"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(last["requests_per_sec"].as_f64().unwrap() > 0.0, "{last}");
    // 4 ms requests: in the (2.5 ms, 5 ms] bucket or above.
    assert!(last["p50_ms"].as_f64().unwrap() >= 2.5, "{last}");
    let (status, e) = node.api_get("/api/v1/stats/series?limit=0").await;
    assert_eq!(status, 400, "{e}");
}
