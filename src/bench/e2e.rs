//! End to end: the real daemon (engine + `Server` on 127.0.0.1:0) in this process, and K WebSocket clients on
//! loopback, each streaming a moving test pattern as JPEG, at a target rate or as fast as replies come, with at
//! most `in_flight` frames unanswered. Latency is measured by the client from sending a frame to receiving the
//! JPEG it triggered.
use super::stats::Summary;
use crate::config::ServerConfig;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::server::Server;
use crate::stream::settings::StreamSettings;
use futures_util::{SinkExt, StreamExt};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The per-stage fields of the daemon's `frame` messages.
pub const STAGES: [&str; 7] =
    ["queue_ms", "preprocess_ms", "encode_ms", "unet_ms", "decode_ms", "postprocess_ms", "total_ms"];

/// How the clients stream.
#[derive(Debug, Clone)]
pub struct E2ePlan {
    /// Measured frames per stream.
    pub frames: usize,
    /// Frames per stream sent first and left out of the statistics.
    pub warmup_frames: usize,
    /// Frames per second each client sends; `None`: as fast as replies come.
    pub target_fps: Option<f64>,
    /// The most frames a client leaves unanswered.
    pub in_flight: usize,
    /// How long a client waits for a reply before counting its unanswered frames as lost.
    pub reply_timeout: Duration,
    pub jpeg_quality: u8,
}

/// One scenario's results (K streams at once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eResult {
    pub streams: usize,
    pub frames_per_stream: usize,
    pub warmup_frames: usize,
    pub target_fps: Option<f64>,
    pub in_flight: usize,
    /// Frames sent and outputs received, over all streams (warm-up included).
    pub sent: u64,
    pub received: u64,
    /// Measured outputs (their trigger frame came after the warm-up frames).
    pub measured: u64,
    /// Frames sent that triggered no output (replaced while waiting: latest-frame-wins, rate-limited, lost).
    pub dropped: u64,
    pub errors: u64,
    /// The daemon's own counters from each stream's last `stats` message, summed: inputs replaced while
    /// waiting (latest-frame-wins), outputs dropped for a slow consumer, frames over the rate limit.
    pub daemon_dropped_input: u64,
    pub daemon_dropped_output: u64,
    pub daemon_rate_limited: u64,
    /// From the first measured frame sent to the last measured output received, over all streams.
    pub duration_s: f64,
    /// Measured outputs per second, all streams together.
    pub throughput_fps: f64,
    /// Each stream's measured outputs per second.
    pub per_stream_fps: Summary,
    /// Send of the frame that triggered an output -> receipt of that output's JPEG.
    pub latency_ms: Summary,
    /// Send of the frame an output answers -> its receipt (adds the stream batch's n-1 frames of delay).
    pub content_latency_ms: Summary,
    /// The daemon's per-stage times from its `frame` messages.
    pub stages_ms: BTreeMap<String, Summary>,
    /// Every measured latency sample (ms), for plots.
    pub latency_samples_ms: Vec<f64>,
}

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    sent: u64,
    received: u64,
    errors: u64,
    daemon: [u64; 3],
    first_measured_send: Option<Instant>,
    last_measured_receive: Option<Instant>,
    latency: Vec<f64>,
    content_latency: Vec<f64>,
    stages: BTreeMap<String, Vec<f64>>,
}

/// Starts the engine and the daemon, runs one scenario per entry of `scenarios` (number of concurrent
/// streams), and shuts everything down.
pub fn run(
    engine_config: EngineConfig,
    settings: &StreamSettings,
    scenarios: &[usize],
    plan: &E2ePlan,
    progress: &ProgressBar,
) -> Result<Vec<E2eResult>> {
    let engine = Engine::start(engine_config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| Error::Model(format!("cannot start the tokio runtime: {e}")))?;
    let max_streams = scenarios.iter().copied().max().unwrap_or(1);
    let results = runtime.block_on(async {
        let config = ServerConfig {
            listen: "127.0.0.1:0".into(),
            max_clients: max_streams,
            max_fps: 100_000.0,
            idle_timeout_s: plan.reply_timeout.as_secs().max(60),
            jpeg_quality: plan.jpeg_quality,
            ..ServerConfig::default()
        };
        let server = Server::start(engine.handle(), engine.info.clone(), config, settings.clone()).await?;
        let mut results = Vec::new();
        for &k in scenarios {
            progress.set_message(format!("end to end, {k} stream{}", if k == 1 { "" } else { "s" }));
            // The previous scenario's connections must have ended on the server side before the next one
            // takes every client slot.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while server.state.metrics.clients.load(std::sync::atomic::Ordering::Relaxed) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let r = scenario(server.local_addr, settings, k, plan, progress).await;
            match r {
                Ok(r) => results.push(r),
                Err(e) => {
                    server.shutdown(Duration::from_secs(5)).await;
                    return Err(e);
                }
            }
        }
        server.shutdown(Duration::from_secs(5)).await;
        Ok::<_, Error>(results)
    })?;
    engine.shutdown();
    Ok(results)
}

async fn scenario(
    addr: SocketAddr,
    settings: &StreamSettings,
    streams: usize,
    plan: &E2ePlan,
    progress: &ProgressBar,
) -> Result<E2eResult> {
    let total = plan.frames + plan.warmup_frames;
    // Every client connects first; they start streaming together.
    let start = Arc::new(tokio::sync::Barrier::new(streams));
    let mut tasks = Vec::new();
    for i in 0..streams {
        let frames = super::pattern::jpeg_frames(
            settings.width as u32,
            settings.height as u32,
            total.min(60) as u32,
            i as u32,
            plan.jpeg_quality,
        )?;
        let (plan, start, progress) = (plan.clone(), start.clone(), progress.clone());
        tasks.push(tokio::spawn(async move { client(addr, frames, total, &plan, start, &progress).await }));
    }
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.map_err(|e| Error::Model(format!("a benchmark client panicked: {e}")))??);
    }
    Ok(summarise(streams, plan, logs))
}

fn summarise(streams: usize, plan: &E2ePlan, logs: Vec<ClientLog>) -> E2eResult {
    let first = logs.iter().filter_map(|l| l.first_measured_send).min();
    let last = logs.iter().filter_map(|l| l.last_measured_receive).max();
    let duration_s = match (first, last) {
        (Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let measured: u64 = logs.iter().map(|l| l.latency.len() as u64).sum();
    let per_stream: Vec<f64> = logs
        .iter()
        .filter_map(|l| match (l.first_measured_send, l.last_measured_receive) {
            (Some(a), Some(b)) if b > a => Some(l.latency.len() as f64 / b.duration_since(a).as_secs_f64()),
            _ => None,
        })
        .collect();
    let all = |f: &dyn Fn(&ClientLog) -> &Vec<f64>| {
        logs.iter().flat_map(|l| f(l).iter().copied()).collect::<Vec<_>>()
    };
    let latency = all(&|l| &l.latency);
    let stages_ms = STAGES
        .iter()
        .map(|s| {
            let v: Vec<f64> =
                logs.iter().flat_map(|l| l.stages.get(*s).into_iter().flatten().copied()).collect();
            (s.to_string(), Summary::of(&v))
        })
        .collect();
    let sent: u64 = logs.iter().map(|l| l.sent).sum();
    let received: u64 = logs.iter().map(|l| l.received).sum();
    E2eResult {
        streams,
        frames_per_stream: plan.frames,
        warmup_frames: plan.warmup_frames,
        target_fps: plan.target_fps,
        in_flight: plan.in_flight,
        sent,
        received,
        measured,
        dropped: sent.saturating_sub(received),
        errors: logs.iter().map(|l| l.errors).sum(),
        daemon_dropped_input: logs.iter().map(|l| l.daemon[0]).sum(),
        daemon_dropped_output: logs.iter().map(|l| l.daemon[1]).sum(),
        daemon_rate_limited: logs.iter().map(|l| l.daemon[2]).sum(),
        duration_s,
        throughput_fps: if duration_s > 0.0 { measured as f64 / duration_s } else { 0.0 },
        per_stream_fps: Summary::of(&per_stream),
        latency_ms: Summary::of(&latency),
        content_latency_ms: Summary::of(&all(&|l| &l.content_latency)),
        stages_ms,
        latency_samples_ms: latency,
    }
}

fn ws_error(e: impl std::fmt::Display) -> Error {
    Error::Model(format!("benchmark client: {e}"))
}

/// One client: connects, waits for `ready` and the start barrier, then streams `total` frames.
async fn client(
    addr: SocketAddr,
    frames: Vec<Vec<u8>>,
    total: usize,
    plan: &E2ePlan,
    start: Arc<tokio::sync::Barrier>,
    progress: &ProgressBar,
) -> Result<ClientLog> {
    let url = format!("ws://{addr}/ws");
    let (ws, _) = tokio::time::timeout(plan.reply_timeout, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| ws_error("connecting timed out"))?
        .map_err(ws_error)?;
    let (mut tx, mut rx) = ws.split();
    loop {
        match tokio::time::timeout(plan.reply_timeout, rx.next()).await.map_err(|_| ws_error("no `ready`"))? {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).map_err(ws_error)?;
                match v["type"].as_str() {
                    Some("ready") => break,
                    Some("error") => return Err(ws_error(format!("the daemon refused the stream: {v}"))),
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(ws_error(e)),
            None => return Err(ws_error("the daemon closed the connection before `ready`")),
        }
    }
    start.wait().await;

    let frames: Vec<bytes::Bytes> = frames.into_iter().map(bytes::Bytes::from).collect();
    let interval = plan.target_fps.map(|f| Duration::from_secs_f64(1.0 / f));
    let mut log = ClientLog::default();
    let mut sent_at: Vec<Instant> = Vec::with_capacity(total);
    // Outputs come in trigger order: every frame up to the last trigger seen is settled (answered or dropped).
    let mut settled = 0usize;
    let mut header: Option<serde_json::Value> = None;
    let mut next_due = Instant::now();
    // The last time something moved (a frame sent or an output received): the reply timeout runs from it.
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        let unanswered = sent_at.len() - settled;
        if sent_at.len() < total && unanswered < plan.in_flight && now >= next_due {
            let frame = frames[sent_at.len() % frames.len()].clone();
            tx.send(Message::Binary(frame)).await.map_err(ws_error)?;
            if sent_at.len() == plan.warmup_frames {
                log.first_measured_send = Some(now);
            }
            sent_at.push(now);
            last_progress = now;
            log.sent += 1;
            if let Some(i) = interval {
                next_due = (next_due + i).max(now);
            }
            continue;
        }
        if sent_at.len() >= total && unanswered == 0 {
            break;
        }
        let wake = if sent_at.len() < total && unanswered < plan.in_flight {
            tokio::time::Instant::from_std(next_due)
        } else {
            tokio::time::Instant::from_std(last_progress + plan.reply_timeout)
        };
        let msg = tokio::select! {
            m = rx.next() => m,
            _ = tokio::time::sleep_until(wake) => {
                if sent_at.len() - settled >= plan.in_flight || sent_at.len() >= total {
                    // No reply in time: the unanswered frames are lost.
                    tracing::warn!("benchmark client: no reply within {:?}", plan.reply_timeout);
                    progress.inc((sent_at.len() - settled) as u64);
                    settled = sent_at.len();
                    last_progress = Instant::now();
                }
                continue;
            }
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).map_err(ws_error)?;
                match v["type"].as_str() {
                    Some("frame") => header = Some(v),
                    Some("stats") => log.daemon = daemon_counters(&v),
                    // A frame the daemon's per-connection pacing dropped (a newer one replaced it while it
                    // waited) is counted in the daemon's `rate_limited`, not as an error.
                    Some("error") if v["code"] == "rate_limited" => {}
                    Some("error") => {
                        log.errors += 1;
                        if v["fatal"].as_bool() == Some(true) {
                            return Err(ws_error(format!("the daemon closed the stream: {v}")));
                        }
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Binary(_))) => {
                let received = Instant::now();
                let Some(h) = header.take() else { continue };
                let trigger = h["trigger_frame_id"].as_u64().unwrap_or(0) as usize;
                let answers = h["frame_id"].as_u64().unwrap_or(trigger as u64) as usize;
                if trigger >= sent_at.len() {
                    continue;
                }
                log.received += 1;
                last_progress = received;
                progress.inc((trigger + 1).saturating_sub(settled) as u64);
                settled = settled.max(trigger + 1);
                if trigger >= plan.warmup_frames {
                    log.latency.push(received.duration_since(sent_at[trigger]).as_secs_f64() * 1e3);
                    let answered = sent_at.get(answers).copied().unwrap_or(sent_at[trigger]);
                    log.content_latency.push(received.duration_since(answered).as_secs_f64() * 1e3);
                    for s in STAGES {
                        if let Some(x) = h["timings"][s].as_f64() {
                            log.stages.entry(s.to_string()).or_default().push(x);
                        }
                    }
                    log.last_measured_receive = Some(received);
                }
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(ws_error("the daemon closed the connection mid-run"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(ws_error(e)),
        }
    }
    // One more `stats` message (about once a second) brings the daemon's counters up to date.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, rx.next()).await {
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).map_err(ws_error)?;
            if v["type"] == "stats" {
                log.daemon = daemon_counters(&v);
                break;
            }
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(log)
}

fn daemon_counters(stats: &serde_json::Value) -> [u64; 3] {
    ["dropped_input", "dropped_output", "rate_limited"].map(|k| stats[k].as_u64().unwrap_or(0))
}
