//! A protocol fuzz test (issue 12): random and mutated client messages from a property-testing strategy,
//! against the daemon on loopback with the bundled tiny TEST model. Nothing may panic, the fuzzing client
//! always gets an answer (its pong, or a close with a reason), and a well-behaved neighbour is served after
//! every case. In its own test binary, so that the panic counter sees only this daemon.
mod common;

use futures_util::{SinkExt, StreamExt};
use sdstream::config::ServerConfig;
use sdstream::engine::{Engine, EngineConfig};
use sdstream::server::Server;
use sdstream::stream::settings::StreamSettings;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(60);

fn engine() -> Engine {
    let load = common::cpu_fp32(Some(common::fixture("models/tiny-taesd-test").display().to_string()));
    let c = EngineConfig::new(common::fixture("models/tiny-sd-test").display().to_string(), load);
    Engine::start(c).expect("the tiny test model loads")
}

fn server_config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".into(),
        max_clients: 4,
        max_message_bytes: 1024 * 1024,
        max_fps: 1000.0,
        idle_timeout_s: 30,
        max_frame_pixels: 1024 * 1024,
        ..ServerConfig::default()
    }
}

async fn start(engine: &Engine) -> Server {
    let defaults =
        StreamSettings { width: 64, height: 64, t_index_list: vec![32, 45], ..StreamSettings::default() };
    Server::start(engine.handle(), engine.info.clone(), server_config(), defaults)
        .await
        .expect("server starts")
}

async fn connect(server: &Server) -> Client {
    let url = format!("ws://{}/ws", server.local_addr);
    let (mut ws, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"ready""#) => return ws,
            Some(Ok(_)) => {}
            other => panic!("no ready: {other:?}"),
        }
    }
}

/// Sends a frame and waits for its output (skipping every other message).
async fn round_trip(ws: &mut Client) {
    ws.send(Message::binary(sdstream::bench::attack::jpeg_frame(64, 2))).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("an output in time") {
            Some(Ok(Message::Binary(_))) => return,
            Some(Ok(_)) => {}
            other => panic!("the neighbour's connection ended: {other:?}"),
        }
    }
}

async fn health_status(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_string()
}
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A JSON value of any kind, nested a little.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|v| v.into()),
        any::<u64>().prop_map(|v| v.into()),
        any::<f64>()
            .prop_map(|v| serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into)),
        "[ -~]{0,40}".prop_map(serde_json::Value::String),
        prop_oneof![Just("txt2img"), Just("self"), Just("full"), Just("image"), Just("slerp")]
            .prop_map(|s| serde_json::Value::String(s.into())),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 16] = [
    "prompt",
    "negative_prompt",
    "mode",
    "t_index_list",
    "strength",
    "steps",
    "cfg_type",
    "guidance",
    "seed",
    "width",
    "height",
    "control",
    "quality",
    "id",
    "name",
    "scale",
];

/// A protocol message: a typed one with random fields (mostly the protocol's names), random text, or
/// random bytes as a frame.
fn message() -> impl Strategy<Value = Message> {
    let typed = (
        prop::sample::select(sdstream::server::protocol::CLIENT_TYPES.to_vec()),
        prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()), json_value(), 0..4),
    )
        .prop_map(|(kind, fields)| {
            let mut m: serde_json::Map<String, serde_json::Value> =
                fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            m.insert("type".into(), kind.into());
            Message::text(serde_json::Value::Object(m).to_string())
        });
    prop_oneof![
        6 => typed,
        1 => ".{0,200}".prop_map(Message::text),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Message::binary),
        1 => (0usize..200, any::<u8>()).prop_map(|(at, b)| {
            // A valid JPEG with one byte changed.
            let mut jpeg = sdstream::bench::attack::jpeg_frame(64, 1);
            let at = at % jpeg.len();
            jpeg[at] = b;
            Message::binary(jpeg)
        }),
    ]
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn random_and_mutated_messages_never_break_the_daemon() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let engine = engine();
    let server = runtime.block_on(start(&engine));
    let neighbour = std::cell::RefCell::new(runtime.block_on(connect(&server)));
    let config = ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(messages in prop::collection::vec(message(), 1..40))| {
        runtime.block_on(async {
            let mut ws = connect(&server).await;
            for m in messages {
                if ws.send(m).await.is_err() {
                    break;
                }
            }
            // The fuzzing client's connection either still answers a ping or was closed with a reason.
            let _ = ws.send(Message::text(r#"{"type":"ping","nonce":"end"}"#)).await;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""nonce":"end""#) => break,
                    Ok(Some(Ok(_))) => {}
                    Ok(_) => break,
                    Err(_) => panic!("the fuzzing client got neither its pong nor a close"),
                }
                assert!(std::time::Instant::now() < deadline, "no pong");
            }
            // The neighbour is still served.
            round_trip(&mut neighbour.borrow_mut()).await;
        });
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic in the daemon");
    });
    let status = runtime.block_on(health_status(server.local_addr));
    assert!(status.contains(" 200 "), "{status}");
    runtime.block_on(server.shutdown(Duration::from_secs(5)));
}
