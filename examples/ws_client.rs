//! A WebSocket client for `sdstream serve`: streams a folder of images (or a moving test pattern) and prints
//! each output's latency, keeping at most two frames in flight.
//!
//! ```sh
//! cargo run --release --example ws_client -- ws://127.0.0.1:8765/ws [FOLDER] [--frames N] [--prompt TEXT] [--save DIR]
//! ```
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use tokio_tungstenite::tungstenite::Message;

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

#[tokio::main(flavor = "current_thread")]
#[allow(clippy::too_many_lines)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://127.0.0.1:8765/ws".into());
    let (mut folder, mut frames, mut prompt, mut save) =
        (None::<PathBuf>, 60usize, None::<String>, None::<PathBuf>);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--frames" => frames = args.next().and_then(|v| v.parse().ok()).unwrap_or(frames),
            "--prompt" => prompt = args.next(),
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
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
    let ready: serde_json::Value = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t)?,
        other => anyhow::bail!("expected a ready message, got {other:?}"),
    };
    let (w, h) = (
        ready["settings"]["width"].as_u64().unwrap_or(512) as u32,
        ready["settings"]["height"].as_u64().unwrap_or(512) as u32,
    );
    println!("connected: model {} ({}), {w}x{h}", ready["model"]["model"], ready["model"]["device"]);
    if let Some(p) = prompt {
        ws.send(Message::text(serde_json::json!({"type": "prompt", "prompt": p}).to_string())).await?;
    }
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    // Frames awaiting an answer are the ids in `sent_at`: an output settles every frame up to the one that
    // triggered it (older ones were answered or replaced on the daemon: latest-frame-wins), a refusal settles
    // the last one sent, and silence for 10 s settles them all as lost.
    let (mut sent, mut received) = (0usize, 0usize);
    let mut header: Option<serde_json::Value> = None;
    let mut latencies = Vec::new();
    // Stay under the server's frame-rate cap.
    let max_fps = ready["limits"]["max_fps"].as_f64().unwrap_or(30.0);
    let interval = std::time::Duration::from_secs_f64(1.0 / (max_fps * 0.9));
    let mut last_send: Option<Instant> = None;
    let start = Instant::now();
    while sent < frames || !sent_at.is_empty() {
        while sent_at.len() < 2 && sent < frames {
            if let Some(t) = last_send {
                tokio::time::sleep(interval.saturating_sub(t.elapsed())).await;
            }
            last_send = Some(Instant::now());
            let jpeg = match files.get(sent % files.len().max(1)) {
                Some(path) => sdstream::io::image::encode_jpeg(
                    &sdstream::io::image::resize(sdstream::io::image::read(path)?, w, h),
                    90,
                )?,
                None => sdstream::io::image::encode_jpeg(&test_pattern(sent, w, h), 90)?,
            };
            sent_at.insert(sent as u64, Instant::now());
            ws.send(Message::binary(jpeg)).await?;
            sent += 1;
        }
        let Ok(next) = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await else {
            eprintln!("no answer for 10 s: counting {} frames in flight as lost", sent_at.len());
            sent_at.clear();
            continue;
        };
        match next {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                match v["type"].as_str() {
                    Some("frame") => header = Some(v),
                    Some("error") => {
                        eprintln!("server error: {} {}", v["code"], v["message"]);
                        if v["code"] == "bad_frame" || v["code"] == "rate_limited" {
                            // That frame gets no answer.
                            if let Some(&last) = sent_at.keys().max() {
                                sent_at.remove(&last);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Binary(jpeg))) => {
                received += 1;
                let h = header.take().unwrap_or_default();
                let trigger = h["trigger_frame_id"].as_u64().unwrap_or(0);
                let ms =
                    sent_at.remove(&trigger).map(|t| t.elapsed().as_secs_f64() * 1e3).unwrap_or(f64::NAN);
                sent_at.retain(|&id, _| id > trigger);
                latencies.push(ms);
                println!(
                    "frame {:>4} (answers {:>4}{}): {:7.1} ms round trip, unet {:.1} ms",
                    trigger,
                    h["frame_id"],
                    if h["warmup"] == true { ", warm-up" } else { "" },
                    ms,
                    h["timings"]["unet_ms"].as_f64().unwrap_or(f64::NAN)
                );
                if let Some(dir) = &save {
                    std::fs::write(dir.join(format!("{trigger:06}.jpg")), &jpeg)?;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => anyhow::bail!("connection error: {e}"),
            None => anyhow::bail!("the server closed the connection"),
        }
    }
    if latencies.is_empty() {
        anyhow::bail!("no output came back for {sent} frames");
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "{received} frames in {:.2} s: {:.1} fps, latency p50 {:.1} ms p95 {:.1} ms",
        start.elapsed().as_secs_f64(),
        received as f64 / start.elapsed().as_secs_f64(),
        p(0.5),
        p(0.95)
    );
    let _ = ws.close(None).await;
    Ok(())
}
