//! Hostile and careless clients against a running daemon, next to one well-behaved client whose frame rate
//! shows what they cost it: the measurement behind docs/SECURITY.md's table (`examples/attack.rs`) and the
//! fairness tests (tests/attack.rs).
//!
//! The good client connects first, then sends a `frame_side` x `frame_side` JPEG, waits for its output, and
//! sends the next one; its outputs per second and 95th-percentile round trip are measured while one attack
//! runs.
use crate::error::{Error, Result};
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The daemon under test.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The server's token, when it has one.
    pub token: Option<String>,
    /// The side of the good client's square frames (the stream's size).
    pub frame_side: u32,
}

/// What the attacking client does, for the whole measurement.
#[derive(Debug, Clone, PartialEq)]
pub enum Attack {
    /// Nothing: the good client's baseline.
    None,
    /// One-colour PNG frames of `side` x `side`, back to back.
    BigFrames { side: u32 },
    /// One-colour 16-bit PNG frames of `side` x `side`, back to back from each of `connections` connections.
    Png16 { side: u32, connections: usize },
    /// `control_image` and a `side` x `side` PNG, back to back.
    ControlImages { side: u32 },
    /// A `settings` message asking for a `side` x `side` txt2img stream, then `generate` in a loop.
    GenerateFlood { side: i64 },
    /// `ping` messages back to back.
    TextFlood,
    /// `connections` connections each sending 15 KB of a request head that never ends, held open.
    PartialHeads { connections: usize },
    /// Connect, send `G`, close: `connections` times, then again, for the whole measurement.
    HalfRequests { connections: usize },
    /// A frame of the good client's size right after a `side` x `side` one, at 25 frames a second.
    SmallAfterBig { side: u32 },
}

impl Attack {
    /// How the table names the attack.
    pub fn describe(&self) -> String {
        match self {
            Attack::None => "nothing (baseline)".into(),
            Attack::BigFrames { side } => format!("{side}x{side} one-colour PNG frames, back to back"),
            Attack::Png16 { side, connections } => {
                format!("{side}x{side} 16-bit PNGs, back to back on {connections} connections")
            }
            Attack::ControlImages { side } => format!("`control_image` of {side}x{side}, back to back"),
            Attack::GenerateFlood { side } => {
                format!("`settings` {side}x{side} txt2img, then `generate` in a loop")
            }
            Attack::TextFlood => "`ping` messages back to back".into(),
            Attack::PartialHeads { connections } => {
                format!("{connections} connections each sending a partial request head (15 KB, no end)")
            }
            Attack::HalfRequests { connections } => {
                format!("connect, send `G`, close ({connections} at a time)")
            }
            Attack::SmallAfterBig { side } => {
                format!("a small frame right after a {side}x{side} one, at 25 fps")
            }
        }
    }
}

/// One row of the table: the good client's numbers while the attack ran, and what the attacker got back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub attack: String,
    pub good_fps: f64,
    pub good_p95_ms: f64,
    /// The codes of the `error` messages the attacker received, with counts (and `outputs`, `pongs`).
    pub attacker_got: BTreeMap<String, u64>,
}

fn ws_url(t: &Target) -> String {
    match &t.token {
        Some(token) => format!("ws://{}/ws?token={token}", t.addr),
        None => format!("ws://{}/ws", t.addr),
    }
}

async fn connect(t: &Target) -> Result<Ws> {
    let (ws, _) = tokio::time::timeout(Duration::from_secs(30), tokio_tungstenite::connect_async(ws_url(t)))
        .await
        .map_err(|_| Error::Model("connecting timed out".into()))?
        .map_err(|e| Error::Model(format!("cannot connect: {e}")))?;
    Ok(ws)
}

/// A JPEG frame of `side` x `side` (a gradient).
pub fn jpeg_frame(side: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 255 / side) as u8, (y * 255 / side) as u8, seed])
    });
    crate::io::image::encode_jpeg(&img, 90).unwrap_or_default()
}

/// A one-colour PNG of `side` x `side`, 8 or 16 bits a channel.
pub fn png_frame(side: u32, sixteen_bits: bool) -> Vec<u8> {
    let image = if sixteen_bits {
        image::DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            side,
            side,
            image::Rgb([40000u16, 20000, 0]),
        ))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(side, side, image::Rgb([150, 80, 0])))
    };
    let mut out = std::io::Cursor::new(Vec::new());
    let _ = image::DynamicImage::write_to(&image, &mut out, image::ImageFormat::Png);
    out.into_inner()
}

/// Reads messages until the `ready` one.
async fn wait_ready(ws: &mut Ws) -> Result<serde_json::Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                match v["type"].as_str() {
                    Some("ready") => return Ok(v),
                    Some("error") => return Err(Error::Model(format!("refused: {v}"))),
                    _ => {}
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return Err(Error::Model("the connection closed before `ready`".into())),
        }
    }
}

/// Sends a frame and waits for its output (answering nothing else); false when the connection ended or no
/// output came within `limit`.
async fn round_trip(ws: &mut Ws, frame: &[u8], limit: Duration) -> Result<()> {
    ws.send(Message::binary(frame.to_vec())).await.map_err(|e| Error::Model(e.to_string()))?;
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(_)))) => return Ok(()),
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return Err(Error::Model("the good client's connection closed".into())),
            Err(_) => return Err(Error::Model("the good client got no output in time".into())),
        }
    }
}

/// The good client, connected and warmed up (ten round trips: libtorch's first calls on a fresh engine take
/// up to seconds).
async fn good_client_ready(t: &Target) -> Result<Ws> {
    let mut ws = connect(t).await?;
    wait_ready(&mut ws).await?;
    for i in 0..10u8 {
        round_trip(&mut ws, &jpeg_frame(t.frame_side, i), Duration::from_secs(30)).await?;
    }
    Ok(ws)
}

/// The good client for `duration`: outputs per second and the 95th-percentile round trip in milliseconds.
async fn good_client(t: &Target, mut ws: Ws, duration: Duration) -> Result<(f64, f64)> {
    let frames = [jpeg_frame(t.frame_side, 10), jpeg_frame(t.frame_side, 200)];
    let limit = duration.max(Duration::from_secs(30));
    let start = Instant::now();
    let mut round_trips = Vec::new();
    while start.elapsed() < duration {
        let sent = Instant::now();
        round_trip(&mut ws, &frames[round_trips.len() % 2], limit).await?;
        round_trips.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    let fps = round_trips.len() as f64 / start.elapsed().as_secs_f64();
    round_trips.sort_by(|a, b| a.total_cmp(b));
    let p95 = round_trips.get(((round_trips.len().max(1) - 1) as f64 * 0.95).round() as usize).copied();
    Ok((fps, p95.unwrap_or(f64::NAN)))
}

/// Counts what a connection receives: `error` codes, `outputs` and `pongs`.
async fn count_replies(
    mut rx: futures_util::stream::SplitStream<Ws>,
    tally: Arc<parking_lot::Mutex<BTreeMap<String, u64>>>,
) {
    while let Some(Ok(msg)) = rx.next().await {
        let key = match msg {
            Message::Binary(_) => "outputs".to_string(),
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                match v["type"].as_str() {
                    Some("error") => v["code"].as_str().unwrap_or("error").to_string(),
                    Some("pong") => "pongs".to_string(),
                    _ => continue,
                }
            }
            _ => continue,
        };
        *tally.lock().entry(key).or_default() += 1;
    }
}

/// Sends `messages` in turn, over and over, until `stop`; what comes back is counted in `tally`.
async fn flood(
    t: Target,
    first: Vec<Message>,
    messages: Vec<Message>,
    stop: Arc<AtomicBool>,
    tally: Arc<parking_lot::Mutex<BTreeMap<String, u64>>>,
) {
    let Ok(mut ws) = connect(&t).await else { return };
    if wait_ready(&mut ws).await.is_err() {
        return;
    }
    let (mut tx, rx) = ws.split();
    let reader = tokio::spawn(count_replies(rx, tally));
    for m in first {
        let _ = tx.send(m).await;
    }
    'outer: while !stop.load(Ordering::Relaxed) {
        for m in &messages {
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            let send = tokio::time::timeout(Duration::from_millis(200), tx.send(m.clone())).await;
            if matches!(send, Ok(Err(_))) {
                break 'outer;
            }
            tokio::task::yield_now().await;
        }
    }
    // The replies already on their way are counted (the daemon may have closed the connection), then the
    // socket just goes: no close handshake, which behind a flood would wait for the whole backlog.
    let mut reader = reader;
    if tokio::time::timeout(Duration::from_millis(500), &mut reader).await.is_err() {
        reader.abort();
    }
}

/// Runs the attack until `stop`.
async fn attack(
    t: Target,
    attack: Attack,
    stop: Arc<AtomicBool>,
    tally: Arc<parking_lot::Mutex<BTreeMap<String, u64>>>,
) {
    match attack {
        Attack::None => {}
        Attack::BigFrames { side } => {
            let png = Message::binary(png_frame(side, false));
            flood(t, vec![], vec![png], stop, tally).await;
        }
        Attack::Png16 { side, connections } => {
            let png = Message::binary(png_frame(side, true));
            let tasks: Vec<_> = (0..connections)
                .map(|_| {
                    tokio::spawn(flood(t.clone(), vec![], vec![png.clone()], stop.clone(), tally.clone()))
                })
                .collect();
            for task in tasks {
                let _ = task.await;
            }
        }
        Attack::ControlImages { side } => {
            let announce = Message::text(r#"{"type":"control_image"}"#);
            flood(t, vec![], vec![announce, Message::binary(png_frame(side, false))], stop, tally).await;
        }
        Attack::GenerateFlood { side } => {
            let big = format!(r#"{{"type":"settings","mode":"txt2img","width":{side},"height":{side}}}"#);
            let first = vec![Message::text(big), Message::text(r#"{"type":"settings","mode":"txt2img"}"#)];
            flood(t, first, vec![Message::text(r#"{"type":"generate"}"#)], stop, tally).await;
        }
        Attack::TextFlood => {
            flood(t, vec![], vec![Message::text(r#"{"type":"ping","nonce":1}"#)], stop, tally).await;
        }
        Attack::PartialHeads { connections } => {
            let mut held = Vec::new();
            let head = format!("GET / HTTP/1.1\r\nHost: {}\r\nX-Pad: {}", t.addr, "a".repeat(15_000));
            for _ in 0..connections {
                if let Ok(mut s) = tokio::net::TcpStream::connect(t.addr).await {
                    let _ = s.write_all(head.as_bytes()).await;
                    held.push(s);
                }
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            *tally.lock().entry("held".into()).or_default() += held.len() as u64;
        }
        Attack::HalfRequests { connections } => {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..connections {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(t.addr).await {
                        let _ = s.write_all(b"G").await;
                        *tally.lock().entry("closed".into()).or_default() += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Attack::SmallAfterBig { side } => {
            let Ok(mut ws) = connect(&t).await else { return };
            if wait_ready(&mut ws).await.is_err() {
                return;
            }
            let (mut tx, rx) = ws.split();
            let reader = tokio::spawn(count_replies(rx, tally));
            let (big, small) = (png_frame(side, false), jpeg_frame(t.frame_side, 1));
            let mut tick = tokio::time::interval(Duration::from_millis(80));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if tx.send(Message::binary(big.clone())).await.is_err()
                    || tx.send(Message::binary(small.clone())).await.is_err()
                {
                    break;
                }
            }
            reader.abort();
        }
    }
}

/// Measures the good client (connected first) for `duration` while `what` runs (started `warmup` before the
/// measurement).
pub async fn measure(t: &Target, what: Attack, warmup: Duration, duration: Duration) -> Result<Row> {
    let ws = good_client_ready(t).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(parking_lot::Mutex::new(BTreeMap::new()));
    let mut task = tokio::spawn(attack(t.clone(), what.clone(), stop.clone(), tally.clone()));
    tokio::time::sleep(warmup).await;
    let measured = good_client(t, ws, duration).await;
    stop.store(true, Ordering::Relaxed);
    if tokio::time::timeout(Duration::from_secs(3), &mut task).await.is_err() {
        task.abort();
    }
    let (good_fps, good_p95_ms) = measured?;
    let attacker_got = tally.lock().clone();
    Ok(Row { attack: what.describe(), good_fps, good_p95_ms, attacker_got })
}

/// A process's resident memory in MB (from `/proc/PID/status`), when it can be read.
pub fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
