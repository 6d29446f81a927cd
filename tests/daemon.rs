//! The daemon on loopback: protocol, limits and reliability (issue: garbage, huge messages, bad JSON, unknown
//! types, out-of-range settings, a PNG bomb, hundreds of connect/disconnect cycles, several clients at once
//! each getting only their own frames), with the real engine on the bundled tiny TEST model. Every wait is
//! bounded.
mod common;

use common::daemon::*;

use futures_util::{SinkExt, StreamExt};
use sdstream::config::ServerConfig;
use sdstream::engine::{Engine, EngineConfig};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn server_config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".into(),
        max_clients: 4,
        max_message_bytes: 2 * 1024 * 1024,
        max_fps: 1000.0,
        idle_timeout_s: 30,
        ..ServerConfig::default()
    }
}

/// Waits for the next output: its `frame` header and the JPEG.
async fn next_frame(ws: &mut Client) -> (serde_json::Value, Vec<u8>) {
    let header = loop {
        let v = next_json(ws).await.expect("connection open");
        if v["type"] == "frame" {
            break v;
        }
        assert_ne!(v["type"], "error", "unexpected error: {v}");
    };
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => (header, b.to_vec()),
        other => panic!("expected the JPEG after a frame header, got {other:?}"),
    }
}

fn test_jpeg(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, seed]));
    sdstream::io::image::encode_jpeg(&img, 90).unwrap()
}

/// Sends a frame and waits for its output, proving the connection (and the engine) still work.
async fn round_trip(ws: &mut Client) {
    ws.send(Message::binary(test_jpeg(1))).await.unwrap();
    let (header, jpeg) = next_frame(ws).await;
    assert!(header["timings"]["unet_ms"].as_f64().is_some(), "{header}");
    assert!(sdstream::io::image::decode(&jpeg, "output").is_ok(), "the output is a JPEG");
}

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_answered_and_the_connection_stays_open() {
    let engine = engine();
    let server = start(&engine, server_config()).await;
    let mut ws = connect(&server).await;
    let r = ready(&mut ws).await;
    assert_eq!(r["model"]["test_model"], true);
    assert_eq!(r["settings"]["width"], 64);
    round_trip(&mut ws).await;

    for (msg, code) in [
        ("this is not json", "bad_json"),
        ("[1,2,3]", "bad_json"),
        (r#"{"type":"launch_missiles"}"#, "unknown_type"),
        (r#"{"type":"prompt"}"#, "bad_json"),
        (r#"{"type":"settings","width":100}"#, "bad_setting"),
        (r#"{"type":"settings","guidance":1e9}"#, "bad_setting"),
        (r#"{"type":"settings","t_index_list":[45,32]}"#, "bad_setting"),
        (r#"{"type":"settings","model_path":"/etc/passwd"}"#, "bad_setting"),
        (r#"{"type":"quality","quality":0}"#, "bad_setting"),
        (r#"{"type":"frame_id","id":18446744073709551615}"#, "bad_setting"),
        (r#"{"type":"frame_id","id":9007199254740992}"#, "bad_setting"),
    ] {
        ws.send(Message::text(msg)).await.unwrap();
        let v = next_json(&mut ws).await.expect("still open");
        assert_eq!(v["type"], "error", "{msg} -> {v}");
        assert_eq!(v["code"], code, "{msg} -> {v}");
        assert_eq!(v["fatal"], false, "{msg} -> {v}");
    }
    // Garbage bytes and a PNG that declares a huge size: answered for that frame only.
    ws.send(Message::binary(vec![0x42u8; 1000])).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert_eq!(v["code"], "bad_frame", "{v}");
    tokio::time::sleep(Duration::from_millis(10)).await; // stay under the frame-rate cap
    ws.send(Message::binary(png_bomb())).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert_eq!(v["code"], "bad_frame", "{v}");

    // A valid settings change is acknowledged with the new settings; the old ones stayed before it.
    ws.send(Message::text(r#"{"type":"settings","guidance":1.5,"cfg_type":"none"}"#)).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert_eq!(v["type"], "settings", "{v}");
    assert_eq!(v["settings"]["guidance"], 1.5);
    assert_eq!(v["settings"]["width"], 64, "the refused width change left the size alone");
    ws.send(Message::text(r#"{"type":"ping","nonce":7}"#)).await.unwrap();
    assert_eq!(next_json(&mut ws).await.unwrap()["nonce"], 7);
    tokio::time::sleep(Duration::from_millis(10)).await;
    round_trip(&mut ws).await;
    drop(ws);
    server.shutdown(Duration::from_secs(5)).await;
}

/// A PNG whose header declares 100000 x 100000 pixels (40 GB decoded).
fn png_bomb() -> Vec<u8> {
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    let crc = crc32(&ihdr);
    png.extend_from_slice(&crc.to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]);
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_message_closes_only_that_connection() {
    let engine = engine();
    let server = start(&engine, server_config()).await;
    let mut victim = connect(&server).await;
    ready(&mut victim).await;
    let mut bystander = connect(&server).await;
    ready(&mut bystander).await;
    // 100 MB against a 2 MB limit.
    let _ = victim.send(Message::binary(vec![0u8; 100 * 1024 * 1024])).await;
    let mut saw_too_large = false;
    while let Some(v) = next_json(&mut victim).await {
        if v["code"] == "too_large" {
            saw_too_large = true;
        }
    }
    assert!(saw_too_large, "the client is told its message was too large");
    round_trip(&mut bystander).await;
    let mut fresh = connect(&server).await;
    ready(&mut fresh).await;
    round_trip(&mut fresh).await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clients_each_get_only_their_own_frames() {
    let engine = engine();
    let server = start(&engine, server_config()).await;
    let mut clients = Vec::new();
    for i in 0..3u64 {
        let mut ws = connect(&server).await;
        let r = ready(&mut ws).await;
        // Each client numbers its frames in its own range, and runs one stage so outputs answer at once.
        ws.send(Message::text(format!(r#"{{"type":"frame_id","id":{}}}"#, (i + 1) * 1000))).await.unwrap();
        ws.send(Message::text(r#"{"type":"settings","t_index_list":[40]}"#)).await.unwrap();
        assert_eq!(next_json(&mut ws).await.unwrap()["type"], "settings");
        clients.push((i, r["stream_id"].as_u64().unwrap(), ws));
    }
    let ids: std::collections::HashSet<u64> = clients.iter().map(|c| c.1).collect();
    assert_eq!(ids.len(), 3, "one stream per connection");
    for round in 0..4u64 {
        for (i, _, ws) in clients.iter_mut() {
            ws.send(Message::binary(test_jpeg(*i as u8 * 60))).await.unwrap();
        }
        for (i, _, ws) in clients.iter_mut() {
            let (header, _) = next_frame(ws).await;
            let want = (*i + 1) * 1000 + round;
            assert_eq!(header["frame_id"], want, "client {i} got {header}");
        }
    }
    let c = engine.counters();
    assert!(c.ticks.load(std::sync::atomic::Ordering::Relaxed) > 0);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_connect_disconnect_cycles_leave_nothing_behind() {
    let engine = engine();
    // Clients that vanish without a close frame hold their slot until the server sees the socket end.
    let server = start(&engine, ServerConfig { max_clients: 32, ..server_config() }).await;
    // Warm up the allocator and caches before measuring.
    for _ in 0..20 {
        let mut ws = connect(&server).await;
        ready(&mut ws).await;
    }
    let before = rss_mb();
    for i in 0..300 {
        let mut ws = connect(&server).await;
        ready(&mut ws).await;
        if i % 3 == 0 {
            // Leave mid-frame.
            ws.send(Message::binary(test_jpeg(2))).await.unwrap();
        }
        if i % 2 == 0 {
            let _ = ws.close(None).await;
        }
    }
    // Raw TCP garbage and half-open sockets.
    for _ in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(server.local_addr).await.unwrap();
        tcp.write_all(b"\x16\x03\x01garbage that is not http\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    }
    // Every stream is closed once its connection is gone.
    let deadline = std::time::Instant::now() + WAIT;
    while engine.counters().streams_open.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        assert!(std::time::Instant::now() < deadline, "streams were left open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = rss_mb() - before;
    eprintln!("memory grew by {grown:.1} MB over 300 cycles");
    assert!(grown < 150.0, "memory grew by {grown:.1} MB over 300 connect/disconnect cycles");
    let mut ws = connect(&server).await;
    ready(&mut ws).await;
    round_trip(&mut ws).await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_a_reason() {
    let engine = engine();
    let config = ServerConfig { max_clients: 1, idle_timeout_s: 2, max_fps: 5.0, ..server_config() };
    let server = start(&engine, config).await;
    let mut first = connect(&server).await;
    ready(&mut first).await;
    // A second client is told the server is full.
    let mut second = connect(&server).await;
    let v = next_json(&mut second).await.expect("a refusal message");
    assert_eq!(v["code"], "server_full", "{v}");
    assert_eq!(v["fatal"], true);
    assert!(next_json(&mut second).await.is_none(), "then closed");
    // Frames above the rate cap are dropped and the client is told.
    for _ in 0..5 {
        first.send(Message::binary(test_jpeg(3))).await.unwrap();
    }
    loop {
        let v = next_json(&mut first).await.expect("the rate-limited client stays connected");
        if v["code"] == "rate_limited" {
            break;
        }
        if v["type"] == "frame" {
            let _ = first.next().await;
        }
    }
    // Silence past the idle timeout closes the connection with a reason.
    let mut idle_error = false;
    while let Some(v) = next_json(&mut first).await {
        if v["code"] == "idle_timeout" {
            idle_error = true;
        }
        if v["type"] == "frame" {
            let _ = first.next().await;
        }
    }
    assert!(idle_error, "the idle client is told why it is disconnected");
    // The slot is free again (once the server side of the closed connection has ended).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut third = connect(&server).await;
        let v = next_json(&mut third).await.expect("a first message");
        if v["type"] == "ready" {
            break;
        }
        assert_eq!(v["code"], "server_full", "{v}");
        assert!(std::time::Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_origin_and_http_endpoints() {
    let engine = engine();
    let config = ServerConfig { token: Some("s3cret".into()), ..server_config() };
    let server = start(&engine, config).await;
    let addr = server.local_addr;
    let get = |path: &'static str, headers: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).to_string()
    };
    assert!(get("/health", "").await.starts_with("HTTP/1.1 401"));
    let health = get("/health?token=s3cret", "").await;
    assert!(health.starts_with("HTTP/1.1 200") && health.contains("\"test_model\":true"), "{health}");
    let metrics = get("/metrics", "Authorization: Bearer s3cret\r\n").await;
    assert!(metrics.contains("sdstream_latency_ms_bucket"), "{metrics}");
    let page = get("/?token=s3cret", "").await;
    assert!(page.contains("<title>sdstream</title>"));
    assert!(get("/nothing?token=s3cret", "").await.starts_with("HTTP/1.1 404"));
    // WebSocket: no token, wrong origin, then right.
    let url = format!("ws://{addr}/ws");
    assert!(tokio_tungstenite::connect_async(url.clone()).await.is_err(), "no token is refused");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "{url}?token=s3cret"
    ))
    .unwrap();
    req.headers_mut().insert("Origin", "http://evil.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err(), "a foreign Origin is refused");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?token=s3cret")).await.unwrap();
    ready(&mut ws).await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn listening_beyond_loopback_needs_a_token() {
    let addr: std::net::SocketAddr = "0.0.0.0:8765".parse().unwrap();
    let e = sdstream::server::check_listen(&addr, &None).unwrap_err().to_string();
    assert!(e.contains("--token"), "{e}");
    assert!(sdstream::server::check_listen(&addr, &Some("t".into())).is_ok());
    assert!(sdstream::server::check_listen(&"127.0.0.1:1".parse().unwrap(), &None).is_ok());
}

/// A `lora` message changes a fused LoRA's scale for everyone, only where the server allows it; bad names or
/// scales are refused without closing the connection. (That a scale change changes the pictures, exactly as
/// diffusers' would, is tested in tests/lora.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_scales_change_live_only_when_the_server_allows_it() {
    let mut c = EngineConfig::new(
        common::fixture("tests/fixtures/models/sd1-tiny").display().to_string(),
        common::cpu_fp32(None),
    );
    c.loras = vec![sdstream::models::lora::LoraSpec {
        path: common::fixture("tests/fixtures/lora/sd1_peft.safetensors").display().to_string(),
        scale: 1.0,
    }];
    let engine = Engine::start(c).expect("sd1-tiny with its test LoRA loads");
    let set = |scale: f64| format!(r#"{{"type":"lora","name":"sd1_peft","scale":{scale}}}"#);

    // Off by default: refused, connection open.
    let server = start(&engine, server_config()).await;
    let mut ws = connect(&server).await;
    let r = ready(&mut ws).await;
    assert_eq!(r["limits"]["lora_control"], false, "{r}");
    assert_eq!(r["loras"][0]["name"], "sd1_peft", "{r}");
    assert_eq!(r["loras"][0]["scale"], 1.0, "{r}");
    assert!(r["loras"][0].get("path").is_none(), "clients are not told server paths: {r}");
    ws.send(Message::text(set(0.0))).await.unwrap();
    let v = next_json(&mut ws).await.expect("still open");
    assert_eq!(v["code"], "forbidden", "{v}");
    assert_eq!(engine.handle().loras()[0].scale, 1.0);
    round_trip(&mut ws).await;
    drop(ws);
    server.shutdown(Duration::from_secs(5)).await;

    // Allowed: the scale changes for the engine (every stream) and is reported back.
    let server = start(&engine, ServerConfig { lora_control: true, ..server_config() }).await;
    let mut ws = connect(&server).await;
    assert_eq!(ready(&mut ws).await["limits"]["lora_control"], true);
    round_trip(&mut ws).await;
    ws.send(Message::text(set(0.25))).await.unwrap();
    let v = next_json(&mut ws).await.unwrap();
    assert_eq!(v["type"], "loras", "{v}");
    assert_eq!(v["loras"][0]["scale"], 0.25, "{v}");
    assert_eq!(engine.handle().loras()[0].scale, 0.25);
    tokio::time::sleep(Duration::from_millis(5)).await;
    round_trip(&mut ws).await;
    for (msg, code) in [
        (r#"{"type":"lora","name":"nope","scale":1}"#, "bad_setting"),
        (r#"{"type":"lora","name":"sd1_peft","scale":1e9}"#, "bad_setting"),
        (r#"{"type":"lora","name":"sd1_peft"}"#, "bad_json"),
    ] {
        ws.send(Message::text(msg)).await.unwrap();
        let v = next_json(&mut ws).await.expect("still open");
        assert_eq!(v["code"], code, "{msg} -> {v}");
    }
    assert_eq!(engine.handle().loras()[0].scale, 0.25, "refused changes left the scale alone");
    // A new client sees the scale in force.
    let mut other = connect(&server).await;
    assert_eq!(ready(&mut other).await["loras"][0]["scale"], 0.25);
    drop((ws, other));
    server.shutdown(Duration::from_secs(5)).await;
}

// ---- The daemon under attack (issue 12): leaks, limits, timeouts, DNS rebinding, token forms. ----

/// Sends `request` on a fresh connection and reads the answer until the server closes.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

fn get_with(path: &str, host: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

/// A value from `/metrics` (asked for with a legitimate Host, and the token if any); None when refused.
async fn try_metric(addr: std::net::SocketAddr, name: &str) -> Option<u64> {
    let text = raw(addr, &get_with("/metrics?token=s3cret", &addr.to_string(), "")).await;
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
    line.and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    try_metric(addr, name).await.unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Waits (bounded) until `name` in `/metrics` is `want`. `sdstream_tcp_open` counts the asking connection.
async fn await_metric(addr: std::net::SocketAddr, name: &str, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        // (None while the server is still full of connections it has not yet seen end.)
        let v = try_metric(addr, name).await;
        if v == Some(want) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{name} stayed at {v:?}, expected {want}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sockets of this process's network namespace on local port `port` in CLOSE-WAIT (state 08).
fn close_wait_sockets(port: u16) -> usize {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && f[3] == "08"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_heads_and_half_requests_leave_nothing_behind() {
    let engine = engine();
    let config = ServerConfig { header_timeout_s: 1, ..server_config() };
    let server = start(&engine, config).await;
    let addr = server.local_addr;

    // A head that never ends is dropped after the header timeout (and not much later).
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {}", "a".repeat(8000)).as_bytes())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a partial head kept its connection for 10 s");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");
    assert!(metric(addr, "sdstream_header_timeouts_total").await >= 1);

    // So is a connection that sends nothing at all.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a silent connection stayed open: {read:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");

    // Bursts of partial heads that the client closes, and of connect, `G`, close: no socket stays behind.
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let bytes = if i % 2 == 0 {
            "G".to_string()
        } else {
            format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nX: y")
        };
        tcp.write_all(bytes.as_bytes()).await.unwrap();
        clients.push(tcp);
    }
    drop(clients);
    // Only the connection asking for the metrics is open, well before any header timeout could have fired...
    let t = std::time::Instant::now();
    await_metric(addr, "sdstream_tcp_open", 1).await;
    // ...and no socket is left in CLOSE-WAIT.
    while close_wait_sockets(addr.port()) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} sockets in CLOSE-WAIT",
            close_wait_sockets(addr.port())
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(raw(addr, &get_with("/health", &addr.to_string(), "")).await.starts_with("HTTP/1.1 200"));
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mjpeg_clients_that_leave_are_gone_and_limits_refuse() {
    let engine = engine();
    let config = ServerConfig { max_viewers: 20, max_connections: 40, ..server_config() };
    let server = start(&engine, config).await;
    let addr = server.local_addr;
    let mut viewers = Vec::new();
    for _ in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(get_with("/mjpeg", &addr.to_string(), "").as_bytes()).await.unwrap();
        let mut head = vec![0u8; 512];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut head)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("multipart/x-mixed-replace"), "{head}");
        viewers.push(tcp);
    }
    assert_eq!(metric(addr, "sdstream_route_open{route=\"/mjpeg\"}").await, 20);
    // One more viewer is over the limit: refused with a reason.
    let full = raw(addr, &get_with("/mjpeg", &addr.to_string(), "")).await;
    assert!(full.starts_with("HTTP/1.1 503") && full.contains("/mjpeg is full"), "{full}");
    // Over `max_connections` (40, 20 held): refused at once.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let over = raw(addr, "GET /health HTTP/1.1\r\n\r\n").await;
    assert!(over.starts_with("HTTP/1.1 503"), "{over}");
    drop(held);
    drop(viewers);
    await_metric(addr, "sdstream_route_open{route=\"/mjpeg\"}", 0).await;
    await_metric(addr, "sdstream_tcp_open", 1).await;
    assert!(metric(addr, "sdstream_tcp_refused_total").await >= 1);
    server.shutdown(Duration::from_secs(5)).await;
}

/// A web page on a rebinding domain (`evil.example` resolving to 127.0.0.1) says its name in `Host` and
/// `Origin`: refused on every route when there is no token; the daemon's own names work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_hosts_and_origins_are_refused_on_every_route() {
    let engine = engine();
    let config = ServerConfig { allowed_hosts: vec!["box.lan".into()], ..server_config() };
    let server = start(&engine, config).await;
    let addr = server.local_addr;
    let port = addr.port();
    let evil = format!("evil.example:{port}");
    let evil_origin = format!("Origin: http://evil.example:{port}\r\n");
    let ws_upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for path in ["/", "/health", "/metrics", "/mjpeg", "/ws", "/view", "/nothing"] {
        let upgrade = if path == "/ws" || path == "/view" { ws_upgrade } else { "" };
        let r = raw(addr, &get_with(path, &evil, &format!("{evil_origin}{upgrade}"))).await;
        assert!(r.starts_with("HTTP/1.1 403") && r.contains("DNS rebinding"), "{path}: {r}");
        let r = raw(addr, &get_with(path, &evil, upgrade)).await;
        assert!(r.starts_with("HTTP/1.1 403"), "{path} with a foreign Host: {r}");
        let r = raw(addr, &get_with(path, &addr.to_string(), &format!("{evil_origin}{upgrade}"))).await;
        assert!(r.starts_with("HTTP/1.1 403") && r.contains("origin"), "{path} with a foreign Origin: {r}");
    }
    assert!(raw(addr, "GET /health HTTP/1.0\r\n\r\n").await.starts_with("HTTP/1.0 403"), "no Host");
    // The daemon's own names, with or without a matching Origin, and a configured one.
    for host in
        [addr.to_string(), format!("localhost:{port}"), format!("[::1]:{port}"), format!("Box.LAN:{port}")]
    {
        let r = raw(addr, &get_with("/health", &host, "")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{host}: {r}");
        let r = raw(addr, &get_with("/", &host, &format!("Origin: http://localhost:{port}\r\n"))).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("<title>sdstream</title>"), "{host}: {r}");
    }
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{addr}/ws"
    ))
    .unwrap();
    req.headers_mut().insert("Origin", format!("http://{addr}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("same-origin upgrade");
    ready(&mut ws).await;
    assert!(metric(addr, "sdstream_route_refused_total{route=\"/ws\"}").await >= 3);
    // Shutdown closes the stream with a close frame.
    let shutdown = tokio::spawn(server.shutdown(Duration::from_secs(5)));
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    shutdown.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_may_come_as_header_subprotocol_or_query() {
    let engine = engine();
    let config = ServerConfig { token: Some("s3cret".into()), ..server_config() };
    let server = start(&engine, config).await;
    let addr = server.local_addr;
    let request = |query: &str, header: Option<(&'static str, &str)>| {
        let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            format!("ws://{addr}/ws{query}"),
        )
        .unwrap();
        if let Some((k, v)) = header {
            req.headers_mut().insert(k, v.parse().unwrap());
        }
        req
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(request("", Some(("Authorization", "Bearer s3cret"))))
        .await
        .expect("a Bearer token");
    ready(&mut ws).await;
    let (mut ws, response) = tokio_tungstenite::connect_async(request(
        "",
        Some(("Sec-WebSocket-Protocol", "sdstream.token.s3cret")),
    ))
    .await
    .expect("a token subprotocol");
    assert_eq!(response.headers()["sec-websocket-protocol"], "sdstream.token.s3cret");
    ready(&mut ws).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(request("?token=s3cret", None)).await.expect("a query token");
    ready(&mut ws).await;
    for (query, header) in [
        ("", Some(("Sec-WebSocket-Protocol", "sdstream.token.wrong"))),
        ("", Some(("Authorization", "Bearer wrong"))),
        ("?token=wrong", None),
        ("", None),
    ] {
        match tokio_tungstenite::connect_async(request(query, header)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 401, "{query} {header:?}")
            }
            other => panic!("{query} {header:?}: expected 401, got {:?}", other.map(|(_, r)| r.status())),
        }
    }
    server.shutdown(Duration::from_secs(5)).await;
}

/// A `/view` socket that answers no ping is closed after the idle timeout; one that does stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_that_answer_nothing_are_closed_after_the_idle_timeout() {
    let engine = engine();
    let server = start(&engine, ServerConfig { idle_timeout_s: 1, ..server_config() }).await;
    let addr = server.local_addr;
    let view = "sdstream_route_open{route=\"/view\"}";
    // Never polled: its pings are never answered.
    let (silent, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/view")).await.unwrap();
    let (mut polite, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/view")).await.unwrap();
    await_metric(addr, view, 2).await;
    // The polite viewer reads (and so answers pings) for 2.5 idle timeouts: it is not closed.
    let polite_closed = tokio::time::timeout(Duration::from_millis(2500), async {
        loop {
            match polite.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(polite_closed.is_err(), "a viewer that answers pings was closed");
    await_metric(addr, view, 1).await;
    assert_eq!(metric(addr, "sdstream_route_timeouts_total{route=\"/view\"}").await, 1);
    drop((silent, polite));
    await_metric(addr, view, 0).await;
    server.shutdown(Duration::from_secs(5)).await;
}
