//! Helpers for the tests that drive the daemon on loopback with the bundled tiny TEST model: the engine, the
//! server, and a WebSocket client's waits (each bounded).
use futures_util::StreamExt;
use sdstream::config::ServerConfig;
use sdstream::engine::{Engine, EngineConfig};
use sdstream::server::Server;
use sdstream::stream::settings::StreamSettings;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The longest any single wait may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// An engine on the tiny TEST model (with the tiny TAESD), fp32 on the CPU, up to 64 streams.
pub fn engine() -> Engine {
    let load = super::cpu_fp32(Some(super::fixture("models/tiny-taesd-test").display().to_string()));
    let mut c = EngineConfig::new(super::fixture("models/tiny-sd-test").display().to_string(), load);
    c.max_streams = 64;
    Engine::start(c).expect("the tiny test model loads")
}

/// Streams of 64x64 with two stages.
pub fn stream_defaults() -> StreamSettings {
    StreamSettings { width: 64, height: 64, t_index_list: vec![32, 45], ..StreamSettings::default() }
}

/// A server for `engine` with `config` and [`stream_defaults`].
pub async fn start(engine: &Engine, config: ServerConfig) -> Server {
    Server::start(engine.handle(), engine.info.clone(), config, stream_defaults())
        .await
        .expect("server starts")
}

pub async fn connect(server: &Server) -> Client {
    let url = format!("ws://{}/ws", server.local_addr);
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    ws
}

/// The next text message as JSON (skipping `stats` and binary messages), or None when the connection closed.
pub async fn next_json(ws: &mut Client) -> Option<serde_json::Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a message in time") {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] != "stats" {
                    return Some(v);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// Reads `ready`, the first message.
pub async fn ready(ws: &mut Client) -> serde_json::Value {
    let v = next_json(ws).await.expect("ready");
    assert_eq!(v["type"], "ready", "{v}");
    v
}
