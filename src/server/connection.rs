//! One WebSocket connection = one stream with its own settings. Frames in are decoded off the async threads
//! and handed to the engine latest-frame-wins; outputs come back through a bounded channel, are JPEG-encoded
//! off the async threads and sent with a `frame` message before each. Every error here is this client's
//! alone: it is answered, and the connection closes only when the error is fatal.
use super::protocol::{ClientLora, ClientMessage, LatencySummary, Limits, ServerMessage, PROTOCOL_VERSION};
use super::ServerState;
use crate::engine::pool::OpenError;
use crate::engine::{Output, OutputSink, StageTimes, StreamHandle};
use axum::extract::ws::{close_code, CloseCode, CloseFrame, Message, WebSocket};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

type WsTx = futures_util::stream::SplitSink<WebSocket, Message>;

async fn send_json(tx: &mut WsTx, msg: &ServerMessage<'_>) -> bool {
    tx.send(Message::text(msg.to_json())).await.is_ok()
}

async fn send_error(tx: &mut WsTx, code: &str, message: impl Into<String>, fatal: bool) -> bool {
    send_json(tx, &ServerMessage::Error { code, message: message.into(), fatal, retry_after_s: None }).await
}

/// Refuses a new client for lack of room (`server_full`, with when to try again) and closes with 1013.
async fn refuse_full(tx: &mut WsTx, state: &ServerState, message: String, retry_after_s: u64) {
    state.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
    let msg = ServerMessage::Error {
        code: "server_full",
        message,
        fatal: true,
        retry_after_s: Some(retry_after_s),
    };
    send_json(tx, &msg).await;
    close(tx, close_code::AGAIN, "server full").await;
}

async fn close(tx: &mut WsTx, code: CloseCode, reason: &str) {
    let frame = CloseFrame { code, reason: reason.into() };
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.close()).await;
}

/// Counts a client in `clients` for as long as it lives.
struct ClientGuard<'a>(&'a ServerState);

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.metrics.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Rolling per-second numbers for `stats`.
struct StatsWindow {
    last: Instant,
    frames_in: u64,
    frames_out: u64,
    latencies: Vec<f64>,
    stages: StageTimes,
}

impl StatsWindow {
    fn summary(&mut self) -> LatencySummary {
        let l = &mut self.latencies;
        if l.is_empty() {
            return LatencySummary::default();
        }
        l.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
        LatencySummary { p50: pick(0.5), p95: pick(0.95), max: *l.last().unwrap_or(&0.0) }
    }
}

/// Runs a stream connection until the client leaves, a fatal error, or server shutdown.
pub async fn run_stream(ws: WebSocket, peer: SocketAddr, state: Arc<ServerState>) {
    let (mut tx, mut rx) = ws.split();
    state.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let Ok(_permit) = state.clients.clone().try_acquire_owned() else {
        let msg = format!("the server is full ({} clients); try again later", state.config.max_clients);
        refuse_full(&mut tx, &state, msg, crate::engine::pool::RETRY_AFTER_S).await;
        return;
    };
    state.metrics.clients.fetch_add(1, Ordering::Relaxed);
    let _guard = ClientGuard(&state);
    tracing::debug!("client {peer} connected");

    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Output>(2);
    let sink: OutputSink = Box::new(move |o| out_tx.try_send(o).is_ok());
    // The stream goes to the engine with the most free slots; with none free the client is told when to retry.
    let engines = state.engines.clone();
    let defaults = state.stream_defaults.clone();
    let opened = tokio::task::spawn_blocking(move || engines.open_stream_with_sink(defaults, sink)).await;
    let (handle, engine) = match opened {
        Ok(Ok(o)) => (Arc::new(o.stream), o.engine),
        Ok(Err(OpenError::Full { retry_after_s, message })) => {
            refuse_full(&mut tx, &state, message, retry_after_s).await;
            return;
        }
        Ok(Err(OpenError::Engine(e))) => {
            send_error(&mut tx, "internal", format!("cannot open a stream: {e}"), true).await;
            close(&mut tx, close_code::AGAIN, "no stream").await;
            return;
        }
        Err(_) => return,
    };
    let limits = Limits {
        max_message_bytes: state.config.max_message_bytes,
        max_fps: state.config.max_fps,
        idle_timeout_s: state.config.idle_timeout_s,
        max_image_side: crate::io::image::MAX_IMAGE_SIDE,
        lora_control: state.config.lora_control,
    };
    let mut settings = state.stream_defaults.clone();
    let mut quality = state.config.jpeg_quality;
    let ready = ServerMessage::Ready {
        protocol: PROTOCOL_VERSION,
        stream_id: handle.id,
        engine,
        model: state.engines.info(engine),
        settings: &settings,
        limits: &limits,
        jpeg_quality: quality,
        loras: ClientLora::list(&state.engines.loras()),
    };
    if !send_json(&mut tx, &ready).await {
        return;
    }

    let mut shutdown = state.shutdown.clone();
    let idle = Duration::from_secs(state.config.idle_timeout_s);
    let mut last_activity = tokio::time::Instant::now();
    let min_interval = Duration::from_secs_f64(1.0 / state.config.max_fps);
    let mut last_frame: Option<Instant> = None;
    let mut next_frame_id: u64 = 0;
    // Set by a `control_image` message: the next binary message is a control image, not a frame.
    let mut control_next = false;
    let mut arrivals: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut rate_limited: u64 = 0;
    let mut last_rate_notice: Option<Instant> = None;
    let mut stats_timer = tokio::time::interval(Duration::from_secs(1));
    stats_timer.tick().await;
    let mut window = StatsWindow {
        last: Instant::now(),
        frames_in: 0,
        frames_out: 0,
        latencies: Vec::new(),
        stages: StageTimes::default(),
    };

    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                close(&mut tx, close_code::AWAY, "server shutting down").await;
                break;
            }
            _ = tokio::time::sleep_until(last_activity + idle) => {
                send_error(&mut tx, "idle_timeout", format!("no message for {} s", idle.as_secs()), true).await;
                close(&mut tx, close_code::NORMAL, "idle").await;
                break;
            }
            msg = rx.next() => {
                last_activity = tokio::time::Instant::now();
                let msg = match msg {
                    None => break,
                    Some(Err(e)) => {
                        let capacity = std::error::Error::source(&e)
                            .and_then(|s| s.downcast_ref::<tungstenite::Error>())
                            .and_then(|e| match e { tungstenite::Error::Capacity(c) => Some(c), _ => None });
                        if let Some(c) = capacity {
                            state.metrics.messages_bad.fetch_add(1, Ordering::Relaxed);
                            send_error(&mut tx, "too_large", format!("{c}; the limit is {} bytes", state.config.max_message_bytes), true).await;
                            close(&mut tx, close_code::SIZE, "message too big").await;
                        } else {
                            tracing::debug!("client {peer}: {e}");
                        }
                        break;
                    }
                    Some(Ok(m)) => m,
                };
                match msg {
                    Message::Binary(data) if control_next => {
                        control_next = false;
                        let h = handle.clone();
                        let result = tokio::task::spawn_blocking(move || {
                            let img = crate::io::image::decode(&data, "control image")?;
                            let size = img.dimensions();
                            h.set_control_image(img).map(|_| size)
                        })
                        .await;
                        let sent = match result {
                            Ok(Ok((width, height))) => send_json(&mut tx, &ServerMessage::ControlImage { width, height }).await,
                            Ok(Err(e)) => {
                                state.metrics.messages_bad.fetch_add(1, Ordering::Relaxed);
                                send_error(&mut tx, "bad_control_image", e.to_string(), false).await
                            }
                            Err(_) => false,
                        };
                        if !sent { break; }
                    }
                    Message::Binary(data) => {
                        let id = next_frame_id;
                        next_frame_id = next_id(id);
                        state.metrics.frames_in.fetch_add(1, Ordering::Relaxed);
                        window.frames_in += 1;
                        let now = Instant::now();
                        if last_frame.is_some_and(|t| now.duration_since(t) < min_interval.mul_f64(0.9)) {
                            rate_limited += 1;
                            state.metrics.frames_rate_limited.fetch_add(1, Ordering::Relaxed);
                            if last_rate_notice.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
                                last_rate_notice = Some(now);
                                let msg = format!("frames above {} fps are dropped", state.config.max_fps);
                                if !send_error(&mut tx, "rate_limited", msg, false).await { break; }
                            }
                            continue;
                        }
                        last_frame = Some(now);
                        let decoded = tokio::task::spawn_blocking(move || crate::io::image::decode(&data, "frame")).await;
                        match decoded {
                            Ok(Ok(img)) => {
                                remember_arrival(&mut arrivals, id, now);
                                handle.submit_with_id(id, Some(img));
                            }
                            Ok(Err(e)) => {
                                state.metrics.frames_bad.fetch_add(1, Ordering::Relaxed);
                                if !send_error(&mut tx, "bad_frame", format!("frame {id}: {e}"), false).await { break; }
                            }
                            Err(_) => break,
                        }
                    }
                    Message::Text(text) if text.contains("control_image") && matches!(ClientMessage::parse(text.as_str()), Ok(ClientMessage::ControlImage {})) => {
                        control_next = true;
                    }
                    Message::Text(text) => {
                        let reply = handle_text(text.as_str(), &state, &handle, &mut settings, &mut quality, &mut next_frame_id, &mut arrivals).await;
                        if let Some((code, message)) = reply.error {
                            state.metrics.messages_bad.fetch_add(1, Ordering::Relaxed);
                            if !send_error(&mut tx, code, message, false).await { break; }
                        } else if let Some(json) = reply.json {
                            if tx.send(Message::text(json)).await.is_err() { break; }
                        }
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => break,
                }
            }
            Some(out) = out_rx.recv() => {
                let q = quality;
                let Output { image, answers, frame_id, warmup, skipped, times, .. } = out;
                let encoded = tokio::task::spawn_blocking(move || crate::io::image::encode_jpeg(&image, q)).await;
                let Ok(Ok(jpeg)) = encoded else {
                    if !send_error(&mut tx, "internal", "could not encode the output frame", false).await { break; }
                    continue;
                };
                let latency = arrivals.iter().find(|(id, _)| *id == frame_id).map(|(_, t)| t.elapsed().as_secs_f64() * 1e3);
                let header = ServerMessage::Frame { frame_id: answers, trigger_frame_id: frame_id, warmup, skipped, timings: &times, bytes: jpeg.len() };
                if !send_json(&mut tx, &header).await || tx.send(Message::binary(jpeg)).await.is_err() {
                    break;
                }
                state.metrics.frames_out.fetch_add(1, Ordering::Relaxed);
                window.frames_out += 1;
                window.stages = times;
                if let Some(ms) = latency {
                    state.metrics.observe_latency(ms);
                    window.latencies.push(ms);
                }
            }
            _ = stats_timer.tick() => {
                let secs = window.last.elapsed().as_secs_f64().max(1e-3);
                let c = &handle.counters;
                let dropped_input = c.dropped_input.load(Ordering::Relaxed);
                let dropped_output = c.dropped_output.load(Ordering::Relaxed);
                let latency_ms = window.summary();
                let stats = ServerMessage::Stats {
                    fps_in: window.frames_in as f64 / secs,
                    fps_out: window.frames_out as f64 / secs,
                    frames_in: c.frames_in.load(Ordering::Relaxed),
                    frames_out: c.frames_out.load(Ordering::Relaxed),
                    dropped_input,
                    dropped_output,
                    rate_limited,
                    skipped: c.skipped.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                    latency_ms,
                    stages_ms: &window.stages,
                };
                if !send_json(&mut tx, &stats).await { break; }
                window.last = Instant::now();
                window.frames_in = 0;
                window.frames_out = 0;
                window.latencies.clear();
            }
        }
    }
    let dropped = handle.counters.dropped_input.load(Ordering::Relaxed)
        + handle.counters.dropped_output.load(Ordering::Relaxed);
    state.metrics.frames_dropped.fetch_add(dropped, Ordering::Relaxed);
    // Closing the stream (dropping the handle) may wait on the engine's command queue: not on an async thread.
    let _ = tokio::task::spawn_blocking(move || drop(handle)).await;
    tracing::debug!("client {peer} left");
}

/// Records when frame `id` arrived (for the latency of the output it triggers), keeping the last 64.
fn remember_arrival(arrivals: &mut VecDeque<(u64, Instant)>, id: u64, at: Instant) {
    arrivals.push_back((id, at));
    if arrivals.len() > 64 {
        arrivals.pop_front();
    }
}

struct TextReply {
    json: Option<String>,
    error: Option<(&'static str, String)>,
}

impl TextReply {
    fn error(code: &'static str, msg: impl Into<String>) -> Self {
        TextReply { json: None, error: Some((code, msg.into())) }
    }
    fn none() -> Self {
        TextReply { json: None, error: None }
    }
}

async fn apply_patch(
    handle: &Arc<StreamHandle>,
    patch: serde_json::Value,
    settings: &mut crate::stream::settings::StreamSettings,
) -> TextReply {
    let h = handle.clone();
    match tokio::task::spawn_blocking(move || h.update_settings(patch)).await {
        Ok(Ok(next)) => {
            *settings = next;
            TextReply { json: Some(ServerMessage::Settings { settings }.to_json()), error: None }
        }
        Ok(Err(e)) => TextReply::error("bad_setting", e.to_string()),
        Err(_) => TextReply::error("internal", "settings update failed"),
    }
}

async fn handle_text(
    text: &str,
    state: &ServerState,
    handle: &Arc<StreamHandle>,
    settings: &mut crate::stream::settings::StreamSettings,
    quality: &mut u8,
    next_frame_id: &mut u64,
    arrivals: &mut VecDeque<(u64, Instant)>,
) -> TextReply {
    let msg = match ClientMessage::parse(text) {
        Ok(m) => m,
        Err((code, message)) => return TextReply::error(code, message),
    };
    match msg {
        ClientMessage::Prompt { prompt, negative_prompt } => {
            let mut patch = serde_json::json!({ "prompt": prompt });
            if let Some(n) = negative_prompt {
                patch["negative_prompt"] = n.into();
            }
            apply_patch(handle, patch, settings).await
        }
        ClientMessage::Settings { settings: map } => {
            if map.is_empty() {
                return TextReply::error("bad_setting", "a settings message needs at least one setting");
            }
            apply_patch(handle, serde_json::Value::Object(map), settings).await
        }
        ClientMessage::Quality { quality: q } => {
            if !(1..=100).contains(&q) {
                return TextReply::error("bad_setting", format!("quality {q} is not in 1..=100"));
            }
            *quality = q;
            TextReply::none()
        }
        ClientMessage::Generate {} => {
            if settings.mode != crate::stream::settings::Mode::Txt2img {
                return TextReply::error(
                    "bad_setting",
                    "`generate` is for txt2img streams; send frames to an img2img stream",
                );
            }
            let id = *next_frame_id;
            *next_frame_id = next_id(id);
            remember_arrival(arrivals, id, Instant::now());
            handle.submit_with_id(id, None);
            TextReply::none()
        }
        ClientMessage::FrameId { id } => {
            if id > MAX_FRAME_ID {
                return TextReply::error(
                    "bad_setting",
                    format!("frame ids go up to {MAX_FRAME_ID} (2^53 - 1, the largest integer JSON numbers keep exactly)"),
                );
            }
            *next_frame_id = id;
            TextReply::none()
        }
        // Handled by the connection loop (it changes how the next binary message is read).
        ClientMessage::ControlImage {} => TextReply::none(),
        ClientMessage::Lora { name, scale } => {
            if !state.config.lora_control {
                return TextReply::error(
                    "forbidden",
                    "changing LoRA scales is off on this server (it changes every client's output); start the \
                     daemon with --lora-control or set server.lora_control",
                );
            }
            let engines = state.engines.clone();
            match tokio::task::spawn_blocking(move || engines.set_lora_scale(&name, scale)).await {
                Ok(Ok(loras)) => TextReply {
                    json: Some(ServerMessage::Loras { loras: ClientLora::list(&loras) }.to_json()),
                    error: None,
                },
                Ok(Err(e)) => TextReply::error("bad_setting", e.to_string()),
                Err(_) => TextReply::error("internal", "LoRA update failed"),
            }
        }
        ClientMessage::Ping { nonce } => {
            TextReply { json: Some(ServerMessage::Pong { nonce }.to_json()), error: None }
        }
    }
}

/// A viewer socket: receives the shared (camera) stream's output JPEGs, sends nothing that matters. It is
/// pinged every half `server.idle_timeout_s`; a viewer that answers nothing (no pong, no message) for
/// `idle_timeout_s`, or takes that long to take a frame, is closed (counted in its route's timeouts).
pub async fn run_viewer(ws: WebSocket, state: Arc<ServerState>) {
    let (mut tx, mut rx) = ws.split();
    let mut frames = state.viewers.subscribe();
    let mut shutdown = state.shutdown.clone();
    let idle = Duration::from_secs(state.config.idle_timeout_s);
    let mut last_seen = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(idle / 2);
    let timed_out = || {
        let route = state.metrics.route(super::metrics::Route::View);
        route.timeouts.fetch_add(1, Ordering::Relaxed);
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => { close(&mut tx, close_code::AWAY, "server shutting down").await; break; }
            _ = tokio::time::sleep_until(last_seen + idle) => {
                timed_out();
                close(&mut tx, close_code::NORMAL, "idle").await;
                break;
            }
            _ = ping.tick() => {
                if !matches!(tokio::time::timeout(idle, tx.send(Message::Ping(Bytes::new()))).await, Ok(Ok(()))) {
                    timed_out();
                    break;
                }
            }
            msg = rx.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                _ => last_seen = tokio::time::Instant::now(),
            },
            frame = frames.recv() => match frame {
                Ok(jpeg) => {
                    if !matches!(tokio::time::timeout(idle, tx.send(Message::Binary(jpeg))).await, Ok(Ok(()))) {
                        timed_out();
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    }
}

/// MJPEG over HTTP (multipart/x-mixed-replace) of the shared (camera) stream, for `<img>` tags and players.
/// The body ends at server shutdown, or when the client goes (hyper sees the end of its socket and drops the
/// body, with the viewer slot `slot` in it).
pub fn mjpeg_response(state: Arc<ServerState>, slot: OwnedSemaphorePermit) -> Response {
    let viewer = MjpegViewer::new(state, slot);
    let body = futures_util::stream::unfold(viewer, |mut v| async move {
        loop {
            let frame = tokio::select! {
                _ = v.shutdown.changed() => return None,
                frame = v.frames.recv() => frame,
            };
            match frame {
                Ok(jpeg) => {
                    let head = format!(
                        "--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                        jpeg.len()
                    );
                    let mut part = Vec::with_capacity(head.len() + jpeg.len() + 2);
                    part.extend_from_slice(head.as_bytes());
                    part.extend_from_slice(&jpeg);
                    part.extend_from_slice(b"\r\n");
                    return Some((Ok::<_, std::convert::Infallible>(Bytes::from(part)), v));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    (
        [
            (axum::http::header::CONTENT_TYPE, "multipart/x-mixed-replace; boundary=frame"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// One `/mjpeg` client, counted in its route's `open` gauge until its body is dropped.
struct MjpegViewer {
    frames: tokio::sync::broadcast::Receiver<Bytes>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    state: Arc<ServerState>,
    _slot: OwnedSemaphorePermit,
}

impl MjpegViewer {
    fn new(state: Arc<ServerState>, slot: OwnedSemaphorePermit) -> Self {
        let c = state.metrics.route(super::metrics::Route::Mjpeg);
        c.open.fetch_add(1, Ordering::Relaxed);
        c.total.fetch_add(1, Ordering::Relaxed);
        MjpegViewer {
            frames: state.viewers.subscribe(),
            shutdown: state.shutdown.clone(),
            state,
            _slot: slot,
        }
    }
}

impl Drop for MjpegViewer {
    fn drop(&mut self) {
        self.state.metrics.route(super::metrics::Route::Mjpeg).open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Publishes a JPEG to every viewer (no-op without viewers).
pub fn publish(state: &ServerState, jpeg: Bytes) {
    let _ = state.viewers.send(jpeg);
}

/// The largest frame id: 2^53 - 1, the largest integer a JSON number (a JavaScript client's) keeps exactly.
pub const MAX_FRAME_ID: u64 = (1 << 53) - 1;

/// The id after `id`, counting up to [`MAX_FRAME_ID`] and then from 0 again (never an overflow).
fn next_id(id: u64) -> u64 {
    if id >= MAX_FRAME_ID {
        0
    } else {
        id + 1
    }
}
