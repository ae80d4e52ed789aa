//! HTTP/2 clients on the lean path (src/proxy/h1/h2.rs): requests without a body are
//! forwarded over the pooled HTTP/1.1 backend connections, not by Pingora's proxy (the
//! hand-over counter says which path served them); every framing of the backend's response
//! reaches the client as HTTP/2; a response the backend cuts short is a broken stream, not a
//! short body; failed backends are retried and answered as on HTTP/1.1.

use super::*;

/// A client that speaks HTTP/2 to the node's TLS listener (ALPN h2) for `host`.
fn h2_client(node: &Node, host: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .resolve(host, node.https_addr)
        .build()
        .expect("client")
}

fn script_by_path() -> Script {
    Arc::new(|req: &Received| {
        let path = req.head.split(' ').nth(1).unwrap_or("").to_string();
        let raw: Vec<u8> = match path.as_str() {
            "/length" => answer("hello"),
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
                Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n\
                5\r\nhello\r\n0006;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
                .to_vec(),
            "/close" => {
                return (
                    b"HTTP/1.1 200 OK\r\nX-Origin: 1\r\n\r\nuntil close".to_vec(),
                    After::Close,
                )
            }
            "/big" => {
                let body: String = (0..1024 * 1024)
                    .map(|i| char::from(b'a' + (i % 26) as u8))
                    .collect();
                answer(&body)
            }
            "/empty" => b"HTTP/1.1 204 No Content\r\nX-Origin: 1\r\n\r\n".to_vec(),
            "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter"
                .to_vec(),
            "/cut-length" => {
                let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this";
                return (raw.to_vec(), After::Close);
            }
            "/cut-chunked" => {
                let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
                return (raw.to_vec(), After::Close);
            }
            _ => answer(&format!("you asked {path}")),
        };
        (raw, After::KeepOpen)
    })
}

#[tokio::test]
async fn http2_requests_without_a_body_take_the_lean_path_for_every_response_framing() {
    let origin = ScriptedOrigin::start(script_by_path()).await;
    let node = node_with_origin(&origin, "h2.test").await;
    node.wait_route("h2.test", "/warm", "you asked /warm").await;
    let client = h2_client(&node, "h2.test");
    let url = |path: &str| format!("https://h2.test:{}{path}", node.https_addr.port());
    let handed_over_before = handovers(&node, "h2").await;

    let big: String = (0..1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let cases: [(&str, u16, &str); 6] = [
        ("/length", 200, "hello"),
        ("/chunked", 200, "hello world"),
        ("/close", 200, "until close"),
        ("/big", 200, &big),
        ("/empty", 204, ""),
        ("/early", 200, "after"),
    ];
    for round in 0..2 {
        for (path, status, body) in cases {
            let r = client
                .get(url(path))
                .header("cookie", "a=1")
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(r.version(), reqwest::Version::HTTP_2, "{path}");
            assert_eq!(r.status().as_u16(), status, "{path}");
            for hop in ["connection", "keep-alive", "transfer-encoding"] {
                assert!(
                    r.headers().get(hop).is_none(),
                    "{path}: {hop} sent to an h2 client"
                );
            }
            assert!(
                r.headers().get("x-request-id").is_some(),
                "{path}: our request id"
            );
            let got = r
                .text()
                .await
                .unwrap_or_else(|e| panic!("{path} body: {e}"));
            assert!(
                got == body,
                "{path} (round {round}): body of {} bytes",
                got.len()
            );
        }
        let r = client.head(url("/length")).send().await.expect("HEAD");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], "5", "HEAD keeps the length");
        assert_eq!(r.text().await.unwrap(), "");
    }
    assert_eq!(
        handovers(&node, "h2").await,
        handed_over_before,
        "no request without a body went to Pingora's proxy"
    );

    // The backend saw an HTTP/1.1 request with the forwarding headers.
    let seen = origin
        .received()
        .into_iter()
        .rfind(|r| r.head.starts_with("HEAD /length "))
        .expect("the HEAD request reached the origin");
    assert!(
        seen.head.starts_with("HEAD /length HTTP/1.1\r\n"),
        "{}",
        seen.head
    );
    assert_eq!(seen.header("host").as_deref(), Some("h2.test"));
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("https"));
    assert!(seen.header("x-request-id").is_some(), "{}", seen.head);

    // A request with a body goes to Pingora's proxy, on the same connection.
    let r = client
        .post(url("/posted"))
        .body("a body")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), "you asked /posted");
    assert_eq!(handovers(&node, "h2").await, handed_over_before + 1);
}

#[tokio::test]
async fn an_http2_response_the_backend_cuts_short_is_a_broken_stream() {
    let origin = ScriptedOrigin::start(script_by_path()).await;
    let node = node_with_origin(&origin, "cut.test").await;
    node.wait_route("cut.test", "/warm", "you asked /warm")
        .await;
    let client = h2_client(&node, "cut.test");
    for path in ["/cut-length", "/cut-chunked"] {
        let url = format!("https://cut.test:{}{path}", node.https_addr.port());
        let r = client.get(&url).send().await.expect("the head arrives");
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200, "{path}");
        let body = r.bytes().await;
        assert!(
            body.is_err(),
            "{path}: a body cut short must not end cleanly, got {body:?}"
        );
    }
    // The connection still serves other streams.
    let url = format!("https://cut.test:{}/length", node.https_addr.port());
    let r = client.get(&url).send().await.expect("next request");
    assert_eq!(r.text().await.unwrap(), "hello");
}

#[tokio::test]
async fn http2_requests_skip_a_dead_backend_and_get_our_answer_when_none_is_left() {
    let origin = ScriptedOrigin::start(script_by_path()).await;
    let node = node_with_origin(&origin, "live.test").await;
    // A port nothing listens on.
    let dead = bind_loopback().await.local_addr().unwrap().to_string();
    node.add_backend("dead-a", &dead, &["a"]).await;
    node.add_backend("dead-only", &dead, &["d"]).await;
    node.add_domain("dead.test", "d").await;
    node.wait_route("live.test", "/warm", "you asked /warm")
        .await;
    let handed_over_before = handovers(&node, "h2").await;

    let client = h2_client(&node, "live.test");
    let url = format!("https://live.test:{}/x", node.https_addr.port());
    for i in 0..10 {
        let r = client.get(&url).send().await.expect("request");
        assert_eq!(r.status(), 200, "request {i}: the dead backend is skipped");
        assert_eq!(r.text().await.unwrap(), "you asked /x");
    }

    let client = h2_client(&node, "dead.test");
    let url = format!("https://dead.test:{}/x", node.https_addr.port());
    let r = client.get(&url).send().await.expect("request");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let status = r.status().as_u16();
    assert!(status == 502 || status == 503, "got {status}");
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert!(r.headers().get("x-request-id").is_some());
    let body = r.text().await.unwrap();
    assert!(body.contains("dead.test"), "{body}");
    assert_eq!(handovers(&node, "h2").await, handed_over_before);
}
