//! A WebSocket client for `sdstream serve`: streams a folder of images (or a moving test pattern) and prints
//! each output's latency, keeping at most two frames in flight. When the connection drops (a daemon restarts,
//! or dies behind a load balancer) it reconnects with backoff (0.5 s doubling to 10 s, at least a refusal's
//! `retry_after_s`), restores its settings on the new stream (prompt, guidance, stages) and goes on numbering
//! its frames where it was. A stream that stops answering for 20 s is left for a new one the same way.
//!
//! ```sh
//! cargo run --release --example ws_client -- ws://127.0.0.1:8765/ws [FOLDER] [--frames N] [--prompt TEXT] \
//!     [--guidance G] [--t-index-list 32,45] [--save DIR]
//! ```
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn test_pattern(i: usize, w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let t = i as f32 * 0.15;
        let cx = (w as f32) * (0.5 + 0.3 * t.cos());
        let cy = (h as f32) * (0.5 + 0.3 * t.sin());
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if d < w as f32 * 0.15 {
            image::Rgb([240, 200, 40])
        } else {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 120])
        }
    })
}

/// What the client keeps across connections.
struct Run {
    url: String,
    files: Vec<PathBuf>,
    frames: usize,
    save: Option<PathBuf>,
    /// The settings this client asked for, sent again on every new stream.
    settings: serde_json::Map<String, serde_json::Value>,
    sent: usize,
    received: usize,
    /// Frames awaiting an answer: an output settles every frame up to the one that triggered it (older ones
    /// were answered or replaced on the daemon: latest-frame-wins), a refusal settles the last one sent, and
    /// no output for 10 s (or a dropped connection) settles them all as lost.
    sent_at: HashMap<u64, Instant>,
    latencies: Vec<f64>,
    reconnects: usize,
}

/// How a connection ended.
enum Ended {
    /// Every frame was sent and answered.
    Done,
    /// The connection dropped; reconnect after at least this long.
    Dropped(Duration),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://127.0.0.1:8765/ws".into());
    let (mut folder, mut frames, mut save) = (None::<PathBuf>, 60usize, None::<PathBuf>);
    let mut settings = serde_json::Map::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--frames" => frames = args.next().and_then(|v| v.parse().ok()).unwrap_or(frames),
            "--prompt" => {
                settings.insert("prompt".into(), args.next().unwrap_or_default().into());
            }
            "--guidance" => {
                let g: f64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(1.0);
                settings.insert("guidance".into(), g.into());
            }
            "--t-index-list" => {
                let stages: Vec<u64> = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|v| v.trim().parse().ok())
                    .collect();
                settings.insert("t_index_list".into(), stages.into());
            }
            "--save" => save = args.next().map(PathBuf::from),
            other => folder = Some(PathBuf::from(other)),
        }
    }
    let files = match &folder {
        Some(f) => sdstream::stream::offline::collect_inputs(std::slice::from_ref(f))?,
        None => Vec::new(),
    };
    if let Some(dir) = &save {
        std::fs::create_dir_all(dir)?;
    }
    let mut run = Run {
        url,
        files,
        frames,
        save,
        settings,
        sent: 0,
        received: 0,
        sent_at: HashMap::new(),
        latencies: Vec::new(),
        reconnects: 0,
    };
    let start = Instant::now();
    let mut backoff = Duration::from_millis(500);
    let mut failures = 0;
    loop {
        let ended = match connect(&run.url).await {
            Ok(ws) => {
                backoff = Duration::from_millis(500);
                failures = 0;
                stream(ws, &mut run).await?
            }
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    anyhow::bail!("cannot connect to {} after 30 tries: {e}", run.url);
                }
                eprintln!("cannot connect: {e}");
                Ended::Dropped(Duration::ZERO)
            }
        };
        match ended {
            Ended::Done => break,
            Ended::Dropped(at_least) => {
                let wait = backoff.max(at_least);
                eprintln!("reconnecting in {:.1} s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                run.reconnects += 1;
            }
        }
    }
    if run.latencies.is_empty() {
        anyhow::bail!("no output came back for {} frames", run.sent);
    }
    let l = &mut run.latencies;
    l.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
    println!(
        "{} frames in {:.2} s: {:.1} fps, latency p50 {:.1} ms p95 {:.1} ms, {} reconnects",
        run.received,
        start.elapsed().as_secs_f64(),
        run.received as f64 / start.elapsed().as_secs_f64(),
        p(0.5),
        p(0.95),
        run.reconnects
    );
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) =
        tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url)).await??;
    Ok(ws)
}

/// One connection: `ready`, the settings restored, then frames until done or the connection drops.
async fn stream(mut ws: Ws, run: &mut Run) -> anyhow::Result<Ended> {
    let ready: serde_json::Value = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t)?,
        other => {
            eprintln!("expected a ready message, got {other:?}");
            return Ok(Ended::Dropped(Duration::ZERO));
        }
    };
    if ready["type"] == "error" {
        eprintln!("refused: {} {}", ready["code"], ready["message"]);
        let retry = ready["retry_after_s"].as_u64().unwrap_or(0);
        return Ok(Ended::Dropped(Duration::from_secs(retry)));
    }
    let (w, h) = (
        ready["settings"]["width"].as_u64().unwrap_or(512) as u32,
        ready["settings"]["height"].as_u64().unwrap_or(512) as u32,
    );
    println!(
        "connected: model {} ({}, engine {}), {w}x{h}",
        ready["model"]["model"], ready["model"]["device"], ready["engine"]
    );
    // The new stream starts from the server's defaults: ask again for what this client set, and continue the
    // frame numbering (a dropped connection's frames in flight are lost).
    run.sent_at.clear();
    let frame_id = serde_json::json!({"type": "frame_id", "id": run.sent});
    if ws.send(Message::text(frame_id.to_string())).await.is_err() {
        return Ok(Ended::Dropped(Duration::ZERO));
    }
    if !run.settings.is_empty() {
        let mut patch = run.settings.clone();
        patch.insert("type".into(), "settings".into());
        if ws.send(Message::text(serde_json::Value::Object(patch).to_string())).await.is_err() {
            return Ok(Ended::Dropped(Duration::ZERO));
        }
    }
    let max_fps = ready["limits"]["max_fps"].as_f64().unwrap_or(30.0);
    let interval = Duration::from_secs_f64(1.0 / (max_fps * 0.9));
    let mut last_send: Option<Instant> = None;
    let mut header: Option<serde_json::Value> = None;
    // When this stream last answered; a slow first answer (a cold engine) never counts as silence.
    let mut last_output: Option<Instant> = None;
    while run.sent < run.frames || !run.sent_at.is_empty() {
        while run.sent_at.len() < 2 && run.sent < run.frames {
            if let Some(t) = last_send {
                tokio::time::sleep(interval.saturating_sub(t.elapsed())).await;
            }
            last_send = Some(Instant::now());
            let jpeg = match run.files.get(run.sent % run.files.len().max(1)) {
                Some(path) => sdstream::io::image::encode_jpeg(
                    &sdstream::io::image::resize(sdstream::io::image::read(path)?, w, h),
                    90,
                )?,
                None => sdstream::io::image::encode_jpeg(&test_pattern(run.sent, w, h), 90)?,
            };
            if ws.send(Message::binary(jpeg)).await.is_err() {
                return Ok(Ended::Dropped(Duration::ZERO));
            }
            run.sent_at.insert(run.sent as u64, Instant::now());
            run.sent += 1;
        }
        // Silence is judged by outputs, not messages (the daemon sends `stats` every second regardless): a
        // frame unanswered for 10 s is lost; a stream that answered before and then nothing for 20 s while
        // frames go out has an engine that died or stalled, and a new stream goes to a live one (or another
        // daemon).
        let stale: Vec<u64> = run
            .sent_at
            .iter()
            .filter(|(_, t)| t.elapsed() >= Duration::from_secs(10))
            .map(|(id, _)| *id)
            .collect();
        if !stale.is_empty() {
            eprintln!("no output for 10 s: counting {} frames in flight as lost", stale.len());
            for id in stale {
                run.sent_at.remove(&id);
            }
            if last_output.is_some_and(|t| t.elapsed() >= Duration::from_secs(20)) {
                eprintln!("no output for 20 s: leaving this stream for a new one");
                return Ok(Ended::Dropped(Duration::ZERO));
            }
            continue;
        }
        let Ok(next) = tokio::time::timeout(Duration::from_secs(1), ws.next()).await else { continue };
        match next {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                match v["type"].as_str() {
                    Some("frame") => header = Some(v),
                    Some("settings") => println!("settings in force: {}", v["settings"]),
                    Some("error") => {
                        eprintln!("server error: {} {}", v["code"], v["message"]);
                        if v["code"] == "bad_frame" || v["code"] == "rate_limited" {
                            // That frame gets no answer.
                            if let Some(&last) = run.sent_at.keys().max() {
                                run.sent_at.remove(&last);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Binary(jpeg))) => {
                run.received += 1;
                last_output = Some(Instant::now());
                let h = header.take().unwrap_or_default();
                let trigger = h["trigger_frame_id"].as_u64().unwrap_or(0);
                let ms =
                    run.sent_at.remove(&trigger).map(|t| t.elapsed().as_secs_f64() * 1e3).unwrap_or(f64::NAN);
                run.sent_at.retain(|&id, _| id > trigger);
                run.latencies.push(ms);
                println!(
                    "frame {:>4} (answers {:>4}{}): {:7.1} ms round trip, unet {:.1} ms",
                    trigger,
                    h["frame_id"],
                    if h["warmup"] == true { ", warm-up" } else { "" },
                    ms,
                    h["timings"]["unet_ms"].as_f64().unwrap_or(f64::NAN)
                );
                if let Some(dir) = &run.save {
                    std::fs::write(dir.join(format!("{trigger:06}.jpg")), &jpeg)?;
                }
            }
            Some(Ok(Message::Close(frame))) => {
                eprintln!("the server closed the connection: {frame:?}");
                return Ok(Ended::Dropped(Duration::ZERO));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                eprintln!("connection error: {e}");
                return Ok(Ended::Dropped(Duration::ZERO));
            }
            None => {
                eprintln!("the connection ended");
                return Ok(Ended::Dropped(Duration::ZERO));
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(Ended::Done)
}
