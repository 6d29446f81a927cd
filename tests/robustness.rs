//! Regression tests of issue 12 on loopback with the bundled tiny TEST model: budgets pace instead of dropping,
//! sizes are the server's, a client that stops reading is closed, and the engine survives panics and failed
//! ticks (with the `fault-injection` feature, as scripts/test.sh builds the tests).
mod common;

use common::daemon::*;

use futures_util::{SinkExt, StreamExt};
use sdstream::bench::attack::png_frame;
use sdstream::config::ServerConfig;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The frame-rate budget and the pixel cap scaled down for a test: 30 frames a second, 1024x1024 images.
fn server_config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".into(),
        max_clients: 12,
        max_message_bytes: 4 * 1024 * 1024,
        max_fps: 30.0,
        idle_timeout_s: 30,
        max_frame_pixels: 1024 * 1024,
        ..ServerConfig::default()
    }
}

/// The next output's `frame` header (its JPEG read and dropped), or the first `error`.
async fn next_output(ws: &mut Client) -> serde_json::Value {
    loop {
        let v = next_json(ws).await.expect("connection open");
        if v["type"] == "frame" || v["type"] == "error" {
            if v["type"] == "frame" {
                match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                    Some(Ok(Message::Binary(_))) => {}
                    other => panic!("expected the JPEG, got {other:?}"),
                }
            }
            return v;
        }
    }
}

fn frame(seed: u8) -> Message {
    Message::binary(sdstream::bench::attack::jpeg_frame(64, seed))
}

/// Reads (and drops) everything that arrives until nothing but `stats` came for `quiet`.
async fn drain(ws: &mut Client, quiet: Duration) {
    let mut until = tokio::time::Instant::now() + quiet;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
        if !matches!(&m, Message::Text(t) if t.contains(r#""type":"stats""#)) {
            until = tokio::time::Instant::now() + quiet;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_pace_instead_of_dropping_and_sizes_are_the_servers() {
    let engine = engine();
    let server = start(&engine, server_config()).await;
    let mut ws = connect(&server).await;
    let r = ready(&mut ws).await;
    assert_eq!(r["limits"]["max_frame_pixels"], 1024 * 1024);
    assert_eq!(r["limits"]["stream_sizes"], serde_json::json!([[64, 64]]));
    assert_eq!(r["limits"]["control_images"], false);
    // A client at 25 fps under a 30 fps budget, with jitter (pairs 10 ms apart): nothing dropped, every frame
    // answered once, in order.
    for i in 0..30u64 {
        ws.send(frame(i as u8)).await.unwrap();
        let v = next_output(&mut ws).await;
        assert_eq!(v["type"], "frame", "frame {i}: {v}");
        assert_eq!(v["trigger_frame_id"], i, "{v}");
        let gap = if i % 2 == 0 { 10 } else { 70 };
        tokio::time::sleep(Duration::from_millis(gap)).await;
    }
    // Three frames back to back beyond the burst: the newest waits, the middle one is dropped and told.
    for _ in 0..3 {
        for i in 0..4u8 {
            ws.send(frame(i)).await.unwrap();
        }
    }
    let mut codes = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && !codes.contains(&"rate_limited".to_string()) {
        let v = next_output(&mut ws).await;
        codes.push(v["code"].as_str().unwrap_or("frame").to_string());
    }
    assert!(codes.contains(&"rate_limited".to_string()), "{codes:?}");
    drain(&mut ws, Duration::from_millis(1500)).await;
    // Sizes: only the server's.
    ws.send(Message::text(r#"{"type":"settings","width":512,"height":512}"#)).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert!(v["code"] == "bad_setting" && v["message"].as_str().unwrap().contains("64x64"), "{v}");
    // A control image without a ControlNet, a text message over the text limit.
    ws.send(Message::text(r#"{"type":"control_image"}"#)).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert_eq!(v["code"], "bad_control_image", "{v}");
    let long = format!(r#"{{"type":"prompt","prompt":"{}"}}"#, "a".repeat(20_000));
    ws.send(Message::text(long)).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert_eq!(v["code"], "too_large", "{v}");
    // A frame over the pixel cap is refused from its header.
    ws.send(Message::binary(png_frame(1025, false))).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert!(v["code"] == "bad_frame" && v["message"].as_str().unwrap().contains("max_frame_pixels"), "{v}");
    server.shutdown(Duration::from_secs(5)).await;
}

/// A value from Prometheus text.
fn metric_line(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?;
    line.rsplit(' ').next()?.parse().ok()
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

async fn health(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("null");
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed() {
    let engine = engine();
    let config = ServerConfig { idle_timeout_s: 2, max_fps: 1000.0, ..server_config() };
    let server = start(&engine, config).await;
    let addr = server.local_addr;
    // A client with a tiny receive buffer that sends pings with 15 KB nonces (each echoed in a pong) and never
    // reads: the daemon's writes stall once the kernel's buffers are full.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp).await.unwrap();
    let (mut tx, rx) = ws.split();
    let ping = Message::text(format!(r#"{{"type":"ping","nonce":"{}"}}"#, "x".repeat(15_000)));
    let sender = tokio::spawn(async move {
        for _ in 0..100_000 {
            if tx.send(ping.clone()).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    });
    let closed = tokio::time::timeout(Duration::from_secs(90), sender).await;
    assert!(
        matches!(closed, Ok(Ok(true))),
        "the daemon closed the connection of the client that stopped reading"
    );
    drop(rx);
    let text = metrics(addr).await;
    assert!(metric_line(&text, "sdstream_write_stalls_total").unwrap_or(0) >= 1, "{text}");
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_ticks_and_commands_fail_only_themselves_and_repeated_failures_make_health_503() {
    use sdstream::engine::Fault;
    let engine = engine();
    let server = start(&engine, ServerConfig { max_fps: 1000.0, ..server_config() }).await;
    let addr = server.local_addr;
    let mut ws = connect(&server).await;
    ready(&mut ws).await;
    let mut bystander = connect(&server).await;
    ready(&mut bystander).await;
    // Two stages: output k answers frame k - 1 after one warm-up frame.
    for i in 0..3u64 {
        ws.send(frame(i as u8)).await.unwrap();
        let v = next_output(&mut ws).await;
        assert_eq!(
            (v["warmup"].as_bool(), v["frame_id"].as_u64()),
            (Some(i == 0), Some(i.saturating_sub(1))),
            "{v}"
        );
    }
    for fault in [Fault::ErrorInTick, Fault::PanicInTick] {
        engine.handle().inject_fault(fault);
        ws.send(frame(9)).await.unwrap();
        let v = next_output(&mut ws).await;
        assert!(
            v["code"] == "frame_lost" && v["message"].as_str().unwrap().contains("frame 3"),
            "{fault:?}: {v}"
        );
        // The stream was reset: the next frame is a warm-up answering itself, then the ids are right again.
        ws.send(frame(4)).await.unwrap();
        let v = next_output(&mut ws).await;
        assert_eq!((v["warmup"].as_bool(), v["frame_id"].as_u64()), (Some(true), Some(4)), "{fault:?}: {v}");
        ws.send(frame(5)).await.unwrap();
        let v = next_output(&mut ws).await;
        assert_eq!((v["warmup"].as_bool(), v["frame_id"].as_u64()), (Some(false), Some(4)), "{fault:?}: {v}");
        ws.send(Message::text(r#"{"type":"frame_id","id":3}"#)).await.unwrap();
        // The bystander, whose stream was not in those ticks, is served on.
        bystander.send(frame(1)).await.unwrap();
        assert_eq!(next_output(&mut bystander).await["type"], "frame");
    }
    // A command that panics fails alone: the client gets an error, the engine goes on.
    engine.handle().inject_fault(Fault::PanicInCommand);
    ws.send(Message::text(r#"{"type":"settings","guidance":1.4}"#)).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(health(addr).await.0, 200, "two tick failures and a command failure, not in a row... yet");
    // Three failures in a row: unhealthy, with the reason; new clients are refused; a good tick recovers.
    for _ in 0..3 {
        engine.handle().inject_fault(Fault::ErrorInTick);
        ws.send(frame(7)).await.unwrap();
        assert_eq!(next_output(&mut ws).await["code"], "frame_lost");
    }
    let (status, body) = health(addr).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("injected fault"), "{body}");
    let mut refused = connect(&server).await;
    let v = next_json(&mut refused).await.unwrap();
    assert_eq!((v["code"].as_str(), v["fatal"].as_bool()), (Some("unavailable"), Some(true)), "{v}");
    ws.send(frame(8)).await.unwrap();
    assert_eq!(next_output(&mut ws).await["type"], "frame");
    let (status, body) = health(addr).await;
    assert_eq!(status, 200, "{body}");
    assert!(metric_line(&metrics(addr).await, "sdstream_engine_failures_total").unwrap() >= 6);
    server.shutdown(Duration::from_secs(5)).await;
}
