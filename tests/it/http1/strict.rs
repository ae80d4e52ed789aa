//! HTTP/1.1 parsing at least as strict as the stricter of nginx and HAProxy where both refuse
//! (issue 13, item 6), as raw bytes on the wire. Each case runs on a fresh connection and
//! pipelined behind a request handed to Pingora's proxy (an HTTP/1.0 keep-alive request).
//! Pingora's proxy reads one request per hand-over and the connection then comes back to the
//! lean loop, so every HTTP/1 head is read by the lean parser; requests Pingora's proxy
//! serves (chunked bodies, HTTP/1.0) and HTTP/2, which only Pingora's parser reads, are
//! covered too.

use super::*;

/// Where a request is sent.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    /// First request of a fresh connection: the lean HTTP/1.1 loop reads it.
    Lean,
    /// Pipelined behind an HTTP/1.0 keep-alive request, in the same write: Pingora's proxy
    /// serves that one, then the connection comes back with this request already read.
    AfterHandOver,
}

const VIAS: [Via; 2] = [Via::Lean, Via::AfterHandOver];

/// Sends `raw` the `via` way; returns the answer to it (and the connection).
async fn exchange(node: &Node, host: &str, via: Via, raw: &[u8]) -> (Response, RawClient) {
    let mut c = RawClient::connect(node).await;
    match via {
        Via::Lean => c.send(raw).await,
        Via::AfterHandOver => {
            let mut both =
                format!("GET /first HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n")
                    .into_bytes();
            both.extend_from_slice(raw);
            c.send(&both).await;
            let first = c.response(false).await;
            assert_eq!(first.status, 200, "the handed-over request: {}", first.head);
        }
    }
    let r = c.response(false).await;
    (r, c)
}

/// An origin that echoes the head it received as the body; `/101...` answers 101, `/lz`
/// answers with a chunk size written with leading zeros.
async fn echo_origin() -> ScriptedOrigin {
    ScriptedOrigin::start(Arc::new(|req: &Received| {
        let path = req.head.split(' ').nth(1).unwrap_or("");
        if path.starts_with("/101") {
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nTUNNEL".to_vec(),
                After::KeepOpen,
            );
        }
        if path == "/" {
            return (answer("ready"), After::KeepOpen);
        }
        if path == "/lz" {
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000003\r\nabc\r\n0\r\n\r\n".to_vec(),
                After::KeepOpen,
            );
        }
        let body = format!("{}|body={}", req.head, String::from_utf8_lossy(&req.body));
        (answer(&body), After::KeepOpen)
    }))
    .await
}

async fn strict_node(origin: &ScriptedOrigin, host: &str, proxy: &str) -> Node {
    let node = node_with_origin_and(NodeOptions::new().proxy(proxy), origin, host).await;
    node.wait_route(host, "/", "ready").await;
    node
}

/// The requests the origin received for `path`.
fn seen(origin: &ScriptedOrigin, path: &str) -> Vec<Received> {
    origin
        .received()
        .into_iter()
        .filter(|r| r.head.split(' ').nth(1) == Some(path))
        .collect()
}

#[tokio::test]
async fn an_upgrade_needs_connection_upgrade_and_only_a_real_one_opens_a_tunnel() {
    let origin = echo_origin().await;
    let host = "upg.test";
    let node = strict_node(&origin, host, "").await;
    for via in VIAS {
        // `Upgrade` alone is not an upgrade: the request is served as any other, and the
        // backend never sees `Upgrade`.
        let path = format!("/plain-{via:?}");
        let raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\r\n");
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.head);
        let got = seen(&origin, &path);
        assert_eq!(got.len(), 1, "{via:?}");
        assert_eq!(got[0].header("upgrade"), None, "{via:?}: {}", got[0].head);
        assert!(
            !got[0].head.to_ascii_lowercase().contains("upgrade"),
            "{via:?}: {}",
            got[0].head
        );

        // A backend answering 101 to it does not get a tunnel: 502, nothing of the tunnel
        // reaches the client.
        for (name, extra) in [
            ("alone", "Upgrade: websocket\r\n"),
            (
                "post",
                "Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n",
            ),
            // Handed to Pingora's proxy (chunked body), which alone would take `Upgrade:
            // websocket` for an upgrade.
            (
                "chunked",
                "Upgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
            ),
            ("none", ""),
        ] {
            let method = if name == "alone" || name == "none" {
                "GET"
            } else {
                "POST"
            };
            let raw = format!("{method} /101-{name} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
            let (r, mut c) = exchange(&node, host, via, raw.as_bytes()).await;
            assert_eq!(r.status, 502, "{via:?} {name}: {}", r.head);
            while c.fill().await {}
            assert!(
                !String::from_utf8_lossy(&c.buf).contains("TUNNEL"),
                "{via:?} {name}"
            );
            // A success in between: three failures in a row would open the backend's breaker.
            let (r, _) = exchange(&node, host, Via::Lean, &get(host, "/ok")).await;
            assert_eq!(r.status, 200, "{}", r.head);
        }
    }
    // A real upgrade request still opens the tunnel.
    let raw =
        format!("GET /101-real HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    let (r, mut c) = exchange(&node, host, Via::Lean, raw.as_bytes()).await;
    assert_eq!(r.status, 101, "{}", r.head);
    while !String::from_utf8_lossy(&c.buf).contains("TUNNEL") {
        assert!(c.fill().await, "tunnel bytes expected");
    }
}

#[tokio::test]
async fn header_names_with_underscores_are_dropped_unless_configured() {
    let origin = echo_origin().await;
    let host = "under.test";
    let node = strict_node(&origin, host, "").await;
    for via in VIAS {
        let path = format!("/u-{via:?}");
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent_Length: 51\r\nX_Secret: 1\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok"
        );
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.head);
        let got = seen(&origin, &path);
        assert_eq!(got.len(), 1, "{via:?}");
        assert!(!got[0].head.contains('_'), "{via:?}: {}", got[0].head);
        assert_eq!(got[0].header("x-kept").as_deref(), Some("1"), "{via:?}");
        assert_eq!(got[0].body, b"ok", "{via:?}");
    }

    let origin = echo_origin().await;
    let host = "under-on.test";
    let node = strict_node(&origin, host, "underscores_in_headers = true").await;
    for via in VIAS {
        let path = format!("/u-{via:?}");
        let raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nX_Secret: 1\r\n\r\n");
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.head);
        let got = seen(&origin, &path);
        assert_eq!(
            got[0].header("x_secret").as_deref(),
            Some("1"),
            "{via:?}: {}",
            got[0].head
        );
    }
}

#[tokio::test]
async fn request_targets_with_raw_spaces_control_bytes_or_nul_are_400() {
    let origin = echo_origin().await;
    let host = "target.test";
    let node = strict_node(&origin, host, "").await;
    let cases: [&[u8]; 5] = [
        b"GET /a b HTTP/1.1\r\n",
        b"GET  /x HTTP/1.1\r\n",
        b"GET /n\0ul HTTP/1.1\r\n",
        b"GET /c\x01trl HTTP/1.1\r\n",
        b"GET /d\x7fel HTTP/1.1\r\n",
    ];
    for via in VIAS {
        for line in cases {
            let mut raw = line.to_vec();
            raw.extend_from_slice(format!("Host: {host}\r\n\r\n").as_bytes());
            let before = origin.received().len();
            let (r, mut c) = exchange(&node, host, via, &raw).await;
            assert_eq!(
                r.status,
                400,
                "{via:?} {:?}: {}",
                line.escape_ascii(),
                r.head
            );
            assert!(c.closed().await, "{via:?}: the connection ends after a 400");
            let first = usize::from(via == Via::AfterHandOver);
            assert_eq!(
                origin.received().len(),
                before + first,
                "{via:?} {:?}: reached the backend",
                line.escape_ascii()
            );
        }
    }
}

#[tokio::test]
async fn heads_over_the_limits_are_431_on_both_paths() {
    let origin = echo_origin().await;
    let host = "head.test";
    let node = strict_node(&origin, host, "").await;
    for via in VIAS {
        // 70 KiB in one header.
        let raw = format!(
            "GET /big HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 431, "{via:?}: {}", r.head);
        // 101 header fields.
        let mut raw = format!("GET /many HTTP/1.1\r\nHost: {host}\r\n");
        for i in 0..100 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 431, "{via:?}: {}", r.head);
        // 100 are fine.
        let mut raw = format!("GET /hundred HTTP/1.1\r\nHost: {host}\r\n");
        for i in 0..99 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.head);
    }
    assert!(!origin.head_arrived("/big"));
    assert!(!origin.head_arrived("/many"));
}

#[tokio::test]
async fn content_length_over_the_maximum_is_413_and_overflow_is_400_before_any_backend() {
    let origin = echo_origin().await;
    let host = "body.test";
    let node = strict_node(&origin, host, "max_body_bytes = 1000").await;
    for via in VIAS {
        let connections = origin.connections();
        // The body is not even sent: the answer comes first.
        let raw = format!("POST /over HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1001\r\n\r\n");
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 413, "{via:?}: {}", r.head);
        let raw = format!(
            "POST /overflow HTTP/1.1\r\nHost: {host}\r\nContent-Length: 9223372036854775808\r\n\r\n"
        );
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 400, "{via:?}: {}", r.head);
        if via == Via::Lean {
            assert_eq!(origin.connections(), connections, "a backend was contacted");
        }
        let raw = format!(
            "POST /limit HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\n{}",
            "b".repeat(1000)
        );
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.head);
    }
    // Heads, not just whole requests: a pooled backend connection carries a head without a
    // new connection.
    assert!(!origin.head_arrived("/over"));
    assert!(!origin.head_arrived("/overflow"));

    // A chunked body has no length to check up front: it is cut at the limit (413 while no
    // answer has started; its head has gone to a backend by then).
    for via in VIAS {
        let raw = format!(
            "POST /chunked-over HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
            "c".repeat(2000)
        );
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 413, "{via:?}: {}", r.head);
    }
    let raw = format!(
        "POST /chunked-limit HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{}\r\n0\r\n\r\n",
        "c".repeat(1000)
    );
    let (r, _) = exchange(&node, host, Via::Lean, raw.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.head);
}

#[tokio::test]
async fn repeated_chunked_and_malformed_chunked_bodies_are_400() {
    let origin = echo_origin().await;
    let host = "te.test";
    let node = strict_node(&origin, host, "").await;

    // A malformed first chunk size, in the same packet as the head: refused before any
    // head goes upstream (Pingora's proxy, which would take this request, has no backend
    // connection yet: it would open one).
    let connections = origin.connections();
    let raw = format!(
        "POST /mc HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    );
    let (r, _) = exchange(&node, host, Via::Lean, raw.as_bytes()).await;
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(origin.connections(), connections, "a backend was contacted");
    assert!(!origin.head_arrived("/mc"));

    for via in VIAS {
        for te in ["chunked, chunked", "chunked\r\nTransfer-Encoding: chunked"] {
            let raw = format!(
                "POST /te HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            );
            let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
            assert_eq!(r.status, 400, "{via:?} {te:?}: {}", r.head);
        }
    }
    assert!(!origin.head_arrived("/te"));
}

#[tokio::test]
async fn chunk_sizes_with_leading_zeros_are_accepted() {
    let origin = echo_origin().await;
    let host = "zeros.test";
    let node = strict_node(&origin, host, "").await;
    for via in VIAS {
        // In a response.
        let (r, _) = exchange(&node, host, via, &get(host, "/lz")).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.head);
        assert!(
            r.body_text().contains("abc"),
            "{via:?}: {:?}",
            r.body_text()
        );
        // In a request body.
        let raw = format!(
            "POST /lzr HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000003\r\nabc\r\n0\r\n\r\n"
        );
        let (r, _) = exchange(&node, host, via, raw.as_bytes()).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.head);
        assert!(
            r.body_text().contains("abc"),
            "{via:?}: {:?}",
            r.body_text()
        );
    }
    // Responses Pingora's proxy relays (to HTTP/1.0, to a chunked request, over HTTP/2) go
    // through Pingora's parser, which allows 16 digits in all: `backend_conn` takes the
    // extra zeros out.
    let mut c = RawClient::connect(&node).await;
    c.send(format!("GET /lz HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.body_text().contains("abc"), "{:?}", r.body_text());
    let raw = format!(
        "POST /lz HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    );
    let (r, _) = exchange(&node, host, Via::Lean, raw.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.body_text().contains("abc"), "{:?}", r.body_text());
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .resolve(host, node.https_addr)
        .build()
        .expect("client");
    let r = h2
        .get(format!("https://{host}:{}/lz", node.https_addr.port()))
        .send()
        .await
        .expect("GET over HTTP/2");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "abc");
}

#[tokio::test]
async fn a_malformed_chunked_body_after_the_head_never_reaches_a_backend() {
    let origin = echo_origin().await;
    let host = "late-chunk.test";
    // Health probes open connections of their own: a new backend is probed at once, then
    // once per interval. Counted from after the first probe, with no second one to come.
    let options = NodeOptions::new().health_interval(3600);
    let node = node_with_origin_and(options, &origin, host).await;
    node.wait_route(host, "/", "ready").await;
    let probed = || origin.probes() > 0;
    let waiting = std::time::Instant::now();
    while !probed() {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "no health probe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connections = origin.connections();
    // The head alone, then a malformed size line: the head is held until the first size
    // line is read.
    let mut c = RawClient::connect(&node).await;
    c.send(
        format!("POST /late HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(b"zz\r\nhello\r\n0\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(origin.connections(), connections, "a backend was contacted");
    assert!(!origin.head_arrived("/late"));

    // A valid body sent the same way, even a byte at a time, is served.
    let mut c = RawClient::connect(&node).await;
    c.send(
        format!("POST /late-ok HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await;
    for b in b"0005\r\nhello\r\n0\r\n\r\n" {
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.send(std::slice::from_ref(b)).await;
    }
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{}", r.head);
    // Pingora's proxy sends the body on as it came, chunk by chunk: its data is `hello`.
    let text = r.body_text();
    let chunked = text.split("|body=").nth(1).unwrap_or("");
    let data: String = chunked.split("\r\n").skip(1).step_by(2).collect();
    assert_eq!(data, "hello", "{text:?}");

    // A client that waits for `100 Continue` is not waited for: its head goes on (the
    // backend is contacted before any body byte is sent).
    let mut c = RawClient::connect(&node).await;
    c.send(
        format!("POST /late-100 HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !origin.head_arrived("/late-100") {
        assert!(
            std::time::Instant::now() < deadline,
            "the head of a request waiting for 100 Continue was held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.send(b"5\r\nhello\r\n0\r\n\r\n").await;
    let mut r = c.response(false).await;
    while r.status == 100 {
        r = c.response(false).await;
    }
    assert_eq!(r.status, 200, "{}", r.head);
}

#[tokio::test]
async fn requests_pipelined_after_a_handed_over_one_are_served() {
    let origin = echo_origin().await;
    let host = "pipe-ho.test";
    let node = strict_node(&origin, host, "").await;
    let mut c = RawClient::connect(&node).await;
    let mut all = format!(
        "POST /chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    .into_bytes();
    all.extend(get(host, "/second"));
    all.extend(
        format!("GET /third HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n")
            .into_bytes(),
    );
    all.extend(get(host, "/fourth"));
    c.send(&all).await;
    for path in ["/chunked", "/second", "/third", "/fourth"] {
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        assert!(
            r.body_text().contains(&format!(" {path} ")),
            "{path}: {}",
            r.body_text()
        );
    }
}

/// HTTP/2 is read by Pingora's parser only: the same rules hold there (`service`).
#[tokio::test]
async fn http2_requests_follow_the_same_rules() {
    let origin = echo_origin().await;
    let host = "h2strict.test";
    let node = strict_node(&origin, host, "max_body_bytes = 1000").await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .resolve(host, node.https_addr)
        .build()
        .expect("client");
    let url = |path: &str| format!("https://{host}:{}{path}", node.https_addr.port());

    // Header names with underscores are dropped.
    let r = client
        .get(url("/h2-under"))
        .header("x_secret", "1")
        .header("x-kept", "1")
        .send()
        .await
        .expect("GET over HTTP/2");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let got = seen(&origin, "/h2-under");
    assert_eq!(got.len(), 1);
    assert!(!got[0].head.contains('_'), "{}", got[0].head);
    assert_eq!(got[0].header("x-kept").as_deref(), Some("1"));

    // Heads over 64 KiB or with more than 100 fields: 431.
    let r = client
        .get(url("/h2-big"))
        .header("x-big", "a".repeat(70 * 1024))
        .send()
        .await
        .expect("GET over HTTP/2");
    assert_eq!(r.status(), 431);
    let mut many = client.get(url("/h2-many"));
    for i in 0..101 {
        many = many.header(format!("x-{i}"), "v");
    }
    assert_eq!(many.send().await.expect("GET").status(), 431);

    // A body announced over the limit: 413, no backend sees it.
    let r = client
        .post(url("/h2-over"))
        .body(vec![b'x'; 1001])
        .send()
        .await
        .expect("POST over HTTP/2");
    assert_eq!(r.status(), 413);
    let r = client
        .post(url("/h2-limit"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .expect("POST over HTTP/2");
    assert_eq!(r.status(), 200);
    for path in ["/h2-big", "/h2-many", "/h2-over"] {
        assert!(!origin.head_arrived(path), "{path} reached the backend");
    }
}

/// The same over TLS (the connection is Pingora's TLS stream throughout): `openssl s_client`
/// as a raw client.
#[tokio::test]
async fn requests_pipelined_after_a_hand_over_are_served_over_tls() {
    let origin = echo_origin().await;
    let host = "pipe-tls.test";
    let node = strict_node(&origin, host, "").await;
    let mut all = format!(
        "POST /chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    all.push_str(&format!("GET /second HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    all.push_str(&format!(
        "GET /third HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n"
    ));
    all.push_str(&format!(
        "GET /fourth HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    ));
    let addr = node.https_addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut child = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &addr,
                "-servername",
                "pipe-tls.test",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(all.as_bytes()).expect("write");
        let mut out = String::new();
        let mut stdout = child.stdout.take().expect("stdout");
        // The proxy closes after the last answer (`Connection: close`).
        let _ = stdout.read_to_string(&mut out);
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        out
    })
    .await
    .expect("client task");
    for path in ["/chunked", "/second", "/third", "/fourth"] {
        assert!(
            out.contains(&format!("POST {path} ")) || out.contains(&format!("GET {path} ")),
            "{path} not answered: {out}"
        );
    }
    assert_eq!(out.matches("HTTP/1.1 200").count(), 4, "{out}");
}
