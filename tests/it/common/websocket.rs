//! A websocket client (tokio-tungstenite) for upgrades through the proxy.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Connects to `addr` and upgrades `GET <path>` with `Host: host` to a websocket. tungstenite's
/// client handshake requires the `101` and checks `Sec-WebSocket-Accept` against the random key
/// it sent; a failed upgrade panics with what came back.
pub async fn ws_connect(addr: SocketAddr, host: &str, path: &str) -> WebSocketStream<TcpStream> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("ws connect timed out")
        .expect("ws connect");
    let request = format!("ws://{host}{path}")
        .into_client_request()
        .expect("websocket request");
    let handshake = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("websocket handshake response timed out");
    match handshake {
        Ok((ws, _response)) => ws,
        Err(WsError::Http(resp)) => panic!(
            "websocket upgrade through the proxy should answer 101, got {} {:?} {:?}",
            resp.status(),
            resp.headers(),
            resp.body().as_deref().map(String::from_utf8_lossy)
        ),
        Err(e) => panic!("websocket handshake through the proxy failed: {e}"),
    }
}

/// Sends one text message.
pub async fn ws_send_text(ws: &mut WebSocketStream<TcpStream>, text: &str) {
    ws.send(Message::text(text))
        .await
        .expect("send websocket text");
}

/// Reads messages until a text message arrives (pings are answered by tungstenite, pongs and
/// binary skipped); returns its text. Panics on close or after 10 s.
pub async fn ws_recv_text(ws: &mut WebSocketStream<TcpStream>) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.as_str().to_string(),
                Some(Ok(Message::Close(_))) | None => {
                    panic!("websocket closed by peer instead of echoing")
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("read websocket message: {e}"),
            }
        }
    })
    .await
    .expect("no websocket message within 10 s")
}
