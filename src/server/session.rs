//! One WebSocket stream connection: a [`Session`] owning one engine stream with its own settings. Its loop
//! never waits on a frame's decoding, so every message is stamped when it arrives; small handlers do the
//! work (`on_binary`, `on_text`, `on_prepared`, `on_release`, `on_output`, `on_stats`).
//!
//! What a client sends costs its own budget ([`super::budget`]): frames and `generate` are paced (the newest
//! waits for the budget, an older waiting one is dropped and counted as `rate_limited`), text messages and
//! control images over the budget are refused. Frames and control images are checked against
//! `server.max_frame_pixels` from their header, then decoded and resized to the stream's size on a blocking
//! thread, one at a time per connection, so the inference thread only ever sees stream-sized images. Every
//! error here is this client's alone: it is answered, and the connection closes only when it is fatal.
use super::budget::{self, Budget};
use super::protocol::{
    ClientLora, ClientMessage, ErrorCode, LatencySummary, Limits, Refusal, ServerMessage, PROTOCOL_VERSION,
};
use super::ServerState;
use crate::engine::pool::OpenError;
use crate::engine::{FailureSink, Output, OutputSink, StageTimes, StreamHandle};
use crate::stream::settings::{Mode, StreamSettings, StreamSettingsPatch};
use axum::extract::ws::{close_code, CloseCode, CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use image::RgbImage;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

type WsTx = SplitSink<WebSocket, Message>;
type WsRx = SplitStream<WebSocket>;

/// Sends a close frame and closes, giving up after 2 s each.
pub async fn close(tx: &mut WsTx, code: CloseCode, reason: &str) {
    let frame = CloseFrame { code, reason: reason.into() };
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.close()).await;
}

/// Refuses a new client (counted) with a fatal error, a retry hint for `server_full` and `unavailable`, and
/// closes with 1013 (try again later).
async fn refuse(
    tx: &mut WsTx,
    state: &ServerState,
    code: ErrorCode,
    message: String,
    retry_after_s: Option<u64>,
) {
    state.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
    let msg = ServerMessage::Error { code, message, fatal: true, retry_after_s };
    let _ = tx.send(Message::text(msg.to_json())).await;
    close(tx, close_code::AGAIN, "try again later").await;
}

/// Whether the session goes on after a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// The client is gone or the connection failed: end without more messages.
    Stop,
}

impl From<bool> for Flow {
    /// `true` (a send went through) continues.
    fn from(ok: bool) -> Flow {
        if ok {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }
}

/// Runs a stream connection until the client leaves, a fatal error, or server shutdown.
pub async fn run_stream(ws: WebSocket, peer: SocketAddr, state: Arc<ServerState>) {
    let (tx, rx) = ws.split();
    state.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let Some((session, outputs)) = Session::open(tx, peer, state).await else { return };
    session.run(rx, outputs).await;
}

/// The largest frame id: 2^53 - 1, the largest integer a JSON number (a JavaScript client's) keeps exactly.
pub const MAX_FRAME_ID: u64 = (1 << 53) - 1;

/// The ids given to a connection's frames: one more than the last, up to [`MAX_FRAME_ID`] and then from 0
/// again (never an overflow), or what the client set with `frame_id`.
#[derive(Debug, Default)]
struct FrameIds {
    next: u64,
}

impl FrameIds {
    fn take(&mut self) -> u64 {
        let id = self.next;
        self.next = if id >= MAX_FRAME_ID { 0 } else { id + 1 };
        id
    }
}

/// Counts a client in `clients` for as long as it lives.
struct ClientGuard(Arc<ServerState>);

impl Drop for ClientGuard {
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
    fn new() -> Self {
        StatsWindow {
            last: Instant::now(),
            frames_in: 0,
            frames_out: 0,
            latencies: Vec::new(),
            stages: StageTimes::default(),
        }
    }

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

/// A frame (or `generate`) waiting for the connection's budget.
struct Held {
    id: u64,
    arrived: Instant,
    /// The encoded image and its pixel count (from its header); `None` for `generate`.
    input: Option<(Bytes, u64)>,
}

/// What the engine hands a session.
enum FromEngine {
    Output(Output),
    /// A frame lost to a failed tick: its id and why.
    Lost {
        frame_id: u64,
        reason: String,
    },
}

/// What a blocking preparation thread hands back.
enum Prepared {
    Frame { id: u64, arrived: Instant, image: crate::error::Result<RgbImage> },
    Control { size: (u32, u32), image: crate::error::Result<RgbImage> },
}

/// A preparation started by [`Session::on_release`].
type PrepJob = tokio::sync::oneshot::Receiver<Prepared>;

/// One client's stream connection.
pub struct Session {
    state: Arc<ServerState>,
    peer: SocketAddr,
    tx: WsTx,
    handle: Arc<StreamHandle>,
    /// The engine serving the stream (its index in the daemon's pool).
    engine: usize,
    settings: StreamSettings,
    /// The sizes this client may choose.
    sizes: Vec<(i64, i64)>,
    quality: u8,
    ids: FrameIds,
    /// When recent frames arrived (for the latency of the outputs they trigger), the last 64.
    arrivals: VecDeque<(u64, Instant)>,
    budget: Budget,
    /// Messages handled: every message costs one; over it messages are dropped unread.
    reads: Budget,
    /// Bytes read: over it the socket is not read from.
    read_bytes: Budget,
    /// Messages dropped unread: over it (a flood) the connection is closed.
    flood: Budget,
    held: Option<Held>,
    /// A control image waiting for the preparation thread: its bytes and size.
    control_pending: Option<(Bytes, (u32, u32))>,
    /// Set by a `control_image` message: the next binary message is a control image, not a frame.
    control_next: bool,
    rate_limited: u64,
    last_notice: Option<Instant>,
    last_activity: tokio::time::Instant,
    window: StatsWindow,
    _client: ClientGuard,
    /// This client's slot of `server.max_clients`.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Session {
    /// Takes a client slot, opens the engine stream and sends `ready`; `None` (after telling the client why)
    /// when the server is full or the stream cannot be opened.
    async fn open(
        mut tx: WsTx,
        peer: SocketAddr,
        state: Arc<ServerState>,
    ) -> Option<(Session, tokio::sync::mpsc::Receiver<FromEngine>)> {
        let Ok(permit) = state.clients.clone().try_acquire_owned() else {
            let msg = format!("the server is full ({} clients); try again later", state.config.max_clients);
            refuse(&mut tx, &state, ErrorCode::ServerFull, msg, Some(crate::engine::pool::RETRY_AFTER_S))
                .await;
            return None;
        };
        state.metrics.clients.fetch_add(1, Ordering::Relaxed);
        let client = ClientGuard(state.clone());
        tracing::debug!("client {peer} connected");

        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<FromEngine>(4);
        let lost_tx = out_tx.clone();
        let sink: OutputSink = Box::new(move |o| out_tx.try_send(FromEngine::Output(o)).is_ok());
        let failures: FailureSink = Box::new(move |frame_id, reason| {
            let _ = lost_tx.try_send(FromEngine::Lost { frame_id, reason: reason.to_string() });
        });
        // The stream goes to the engine with the most free slots; with none the client is told when to retry.
        let engines = state.engines.clone();
        let defaults = state.stream_defaults.clone();
        let open = move || engines.open_stream_with_sinks(defaults, sink, Some(failures));
        let (handle, engine) = match tokio::task::spawn_blocking(open).await {
            Ok(Ok(o)) => (Arc::new(o.stream), o.engine),
            Ok(Err(OpenError::Full { retry_after_s, message })) => {
                refuse(&mut tx, &state, ErrorCode::ServerFull, message, Some(retry_after_s)).await;
                return None;
            }
            Ok(Err(OpenError::Unavailable { retry_after_s, message })) => {
                refuse(&mut tx, &state, ErrorCode::Unavailable, message, Some(retry_after_s)).await;
                return None;
            }
            Ok(Err(OpenError::Engine(e))) => {
                refuse(&mut tx, &state, ErrorCode::Internal, format!("cannot open a stream: {e}"), None)
                    .await;
                return None;
            }
            Err(_) => return None,
        };
        let config = &state.config;
        let defaults = &state.stream_defaults;
        let sizes = config.allowed_sizes((defaults.width, defaults.height)).unwrap_or_default();
        let limits = Limits {
            max_message_bytes: config.max_message_bytes,
            max_text_bytes: config.max_text_bytes,
            max_fps: config.max_fps,
            idle_timeout_s: config.idle_timeout_s,
            max_image_side: crate::io::image::MAX_IMAGE_SIDE,
            max_frame_pixels: config.max_frame_pixels,
            stream_sizes: sizes.clone(),
            lora_control: config.lora_control,
            control_images: state.engines.info(engine).controlnet.is_some(),
        };
        let ready = ServerMessage::Ready {
            protocol: PROTOCOL_VERSION,
            stream_id: handle.id,
            engine,
            model: state.engines.info(engine),
            settings: defaults,
            limits: &limits,
            jpeg_quality: config.jpeg_quality,
            loras: ClientLora::list(&state.engines.loras()),
        };
        if tx.send(Message::text(ready.to_json())).await.is_err() {
            close_stream(handle).await;
            return None;
        }
        let session = Session {
            peer,
            tx,
            settings: defaults.clone(),
            sizes,
            quality: config.jpeg_quality,
            ids: FrameIds::default(),
            arrivals: VecDeque::new(),
            budget: Budget::new(config.max_fps, Instant::now()),
            reads: Budget::new(budget::MESSAGES_PER_FRAME * config.max_fps + 20.0, Instant::now()),
            read_bytes: Budget::new(budget::READ_BYTES_PER_S, Instant::now()),
            flood: Budget::new(
                budget::FLOOD_FACTOR * (budget::MESSAGES_PER_FRAME * config.max_fps + 20.0),
                Instant::now(),
            ),
            held: None,
            control_pending: None,
            control_next: false,
            rate_limited: 0,
            last_notice: None,
            last_activity: tokio::time::Instant::now(),
            window: StatsWindow::new(),
            handle,
            engine,
            _client: client,
            _slot: permit,
            state: state.clone(),
        };
        Some((session, out_rx))
    }

    /// The session's loop: one handler per event, until the client leaves, a fatal error or shutdown.
    async fn run(mut self, mut rx: WsRx, mut outputs: tokio::sync::mpsc::Receiver<FromEngine>) {
        let mut shutdown = self.state.shutdown.clone();
        let idle = Duration::from_secs(self.state.config.idle_timeout_s);
        let mut stats = tokio::time::interval(Duration::from_secs(1));
        stats.tick().await;
        let mut prep: Option<PrepJob> = None;
        loop {
            let release = if prep.is_none() { self.release_at() } else { None };
            let now = Instant::now();
            let read_at = self.read_bytes.ready_at(now);
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            let flow = tokio::select! {
                _ = shutdown.changed() => {
                    close(&mut self.tx, close_code::AWAY, "server shutting down").await;
                    Flow::Stop
                }
                _ = tokio::time::sleep_until(self.last_activity + idle) => {
                    let msg = format!("no message for {} s", idle.as_secs());
                    self.send_error(ErrorCode::IdleTimeout, msg, true).await;
                    close(&mut self.tx, close_code::NORMAL, "idle").await;
                    Flow::Stop
                }
                msg = rx.next(), if read_at <= now => self.on_read(msg).await,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(read_at)), if read_at > now => Flow::Continue,
                done = async { prep.as_mut().expect("guarded by is_some").await }, if prep.is_some() => {
                    prep = None;
                    match done {
                        Ok(p) => self.on_prepared(p).await,
                        // Dropped (the big-image queue was full): as if replaced by a newer frame.
                        Err(_) => Flow::Continue,
                    }
                }
                _ = tokio::time::sleep_until(release.map_or(far, tokio::time::Instant::from_std)), if release.is_some() => {
                    prep = self.on_release();
                    Flow::Continue
                }
                Some(event) = outputs.recv() => match event {
                    FromEngine::Output(out) => self.on_output(out).await,
                    FromEngine::Lost { frame_id, reason } => {
                        let msg = format!("frame {frame_id} was lost ({reason}); the stream was reset and goes on");
                        self.send_error(ErrorCode::FrameLost, msg, false).await
                    }
                },
                _ = stats.tick() => self.on_stats().await,
            };
            if flow == Flow::Stop {
                break;
            }
        }
        drop(prep);
        let c = &self.handle.counters;
        let dropped = c.dropped_input.load(Ordering::Relaxed) + c.dropped_output.load(Ordering::Relaxed);
        self.state.metrics.frames_dropped.fetch_add(dropped, Ordering::Relaxed);
        tracing::debug!("client {} left", self.peer);
        close_stream(self.handle).await;
    }

    async fn send(&mut self, msg: &ServerMessage<'_>) -> Flow {
        self.tx.send(Message::text(msg.to_json())).await.is_ok().into()
    }

    async fn send_error(&mut self, code: ErrorCode, message: impl Into<String>, fatal: bool) -> Flow {
        if !fatal {
            self.state.metrics.messages_bad.fetch_add(1, Ordering::Relaxed);
        }
        self.send(&ServerMessage::Error { code, message: message.into(), fatal, retry_after_s: None }).await
    }

    async fn refuse(&mut self, r: Refusal) -> Flow {
        self.send_error(r.code, r.message, false).await
    }

    /// A message read: its bytes are charged (reading pauses when they are over the byte budget), and it is
    /// handled when within the message budget, dropped unread otherwise.
    async fn on_read(&mut self, msg: Option<Result<Message, axum::Error>>) -> Flow {
        let now = Instant::now();
        let bytes = match &msg {
            Some(Ok(Message::Binary(b))) => b.len(),
            Some(Ok(Message::Text(t))) => t.len(),
            _ => 0,
        };
        self.read_bytes.charge(bytes as f64 + 64.0, now);
        let data = matches!(&msg, Some(Ok(Message::Binary(_) | Message::Text(_))));
        if data && !self.reads.try_take(1.0, now) {
            self.last_activity = tokio::time::Instant::now();
            self.rate_limited += 1;
            self.state.metrics.messages_shed.fetch_add(1, Ordering::Relaxed);
            let max = budget::MESSAGES_PER_FRAME * self.state.config.max_fps + 20.0;
            self.flood.charge(1.0, now);
            if self.flood.ready_at(now) > now + Duration::from_secs(1) {
                let msg = format!(
                    "closed: a flood of messages ({}x the {max} a second this server takes)",
                    budget::FLOOD_FACTOR
                );
                self.send_error(ErrorCode::RateLimited, msg, true).await;
                close(&mut self.tx, close_code::POLICY, "message flood").await;
                return Flow::Stop;
            }
            return self
                .rate_limited_notice(format!("more than {max} messages a second are dropped unread"))
                .await;
        }
        self.on_message(msg).await
    }

    async fn on_message(&mut self, msg: Option<Result<Message, axum::Error>>) -> Flow {
        self.last_activity = tokio::time::Instant::now();
        let msg = match msg {
            None => return Flow::Stop,
            Some(Err(e)) => {
                let capacity = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<tungstenite::Error>())
                    .and_then(|e| match e {
                        tungstenite::Error::Capacity(c) => Some(c.to_string()),
                        _ => None,
                    });
                if let Some(c) = capacity {
                    let limit = self.state.config.max_message_bytes;
                    self.state.metrics.messages_bad.fetch_add(1, Ordering::Relaxed);
                    self.send_error(ErrorCode::TooLarge, format!("{c}; the limit is {limit} bytes"), true)
                        .await;
                    close(&mut self.tx, close_code::SIZE, "message too big").await;
                } else {
                    tracing::debug!("client {}: {e}", self.peer);
                }
                return Flow::Stop;
            }
            Some(Ok(m)) => m,
        };
        match msg {
            Message::Binary(data) if self.control_next => {
                self.control_next = false;
                self.on_control_image(data).await
            }
            Message::Binary(data) => self.on_binary(data).await,
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Ping(_) | Message::Pong(_) => Flow::Continue,
            Message::Close(_) => Flow::Stop,
        }
    }

    /// A frame: its size is read from its header (refused above `max_frame_pixels`), and it waits for the
    /// budget, replacing a frame still waiting.
    async fn on_binary(&mut self, data: Bytes) -> Flow {
        let id = self.ids.take();
        let arrived = Instant::now();
        self.state.metrics.frames_in.fetch_add(1, Ordering::Relaxed);
        self.window.frames_in += 1;
        let pixels = match self.check_image(&data, "frame") {
            Ok((w, h)) => w as u64 * h as u64,
            Err(message) => {
                self.state.metrics.frames_bad.fetch_add(1, Ordering::Relaxed);
                return self.send_error(ErrorCode::BadFrame, format!("frame {id}: {message}"), false).await;
            }
        };
        self.hold(Held { id, arrived, input: Some((data, pixels)) }).await
    }

    /// The size of an encoded image from its header, within `max_frame_pixels`; the error says why not.
    fn check_image(&self, data: &[u8], what: &str) -> Result<(u32, u32), String> {
        let (w, h) = crate::io::image::probe(data, what).map_err(|e| e.to_string())?;
        let max = self.state.config.max_frame_pixels;
        if w as u64 * h as u64 > max {
            return Err(format!("{w}x{h} is more than this server's max_frame_pixels ({max})"));
        }
        Ok((w, h))
    }

    /// Puts a frame or `generate` in the waiting place, dropping the one there (counted, and told at most
    /// once a second).
    async fn hold(&mut self, held: Held) -> Flow {
        if self.held.replace(held).is_none() {
            return Flow::Continue;
        }
        self.rate_limited += 1;
        self.state.metrics.frames_rate_limited.fetch_add(1, Ordering::Relaxed);
        let cost = budget::frame_cost(&self.settings, &self.state.stream_defaults, None);
        let what = format!("frames are paced (the newest waits, older ones are dropped); this stream costs {cost:.2} a frame");
        self.rate_limited_notice(what).await
    }

    /// Tells the client (at most once a second) that something went over its budget.
    async fn rate_limited_notice(&mut self, what: String) -> Flow {
        let now = Instant::now();
        if self.last_notice.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return Flow::Continue;
        }
        self.last_notice = Some(now);
        let msg = format!(
            "over this connection's budget ({} frames a second at the server's default settings): {what}",
            self.state.config.max_fps
        );
        self.send_error(ErrorCode::RateLimited, msg, false).await
    }

    /// When the waiting work can start (the preparation thread being free): a control image at once, a
    /// frame when the budget allows.
    fn release_at(&mut self) -> Option<Instant> {
        let now = Instant::now();
        if self.control_pending.is_some() {
            return Some(now);
        }
        self.held.as_ref()?;
        Some(self.budget.ready_at(now))
    }

    /// Starts the waiting work: a control image's or a frame's preparation (decode and resize on a blocking
    /// thread), or hands a `generate` to the engine.
    fn on_release(&mut self) -> Option<PrepJob> {
        let max = self.state.config.max_frame_pixels;
        let size = Some((self.settings.width as u32, self.settings.height as u32));
        let free = 4 * self.settings.width as u64 * self.settings.height as u64;
        let prep = &self.state.prep;
        if let Some((data, size_in)) = self.control_pending.take() {
            let big = size_in.0 as u64 * size_in.1 as u64 > free;
            return Some(prep.run(big, move || Prepared::Control {
                size: size_in,
                image: crate::io::image::decode_within(&data, "control image", max, size),
            }));
        }
        let held = self.held.take()?;
        let pixels = held.input.as_ref().map(|(_, p)| *p);
        let cost = budget::frame_cost(&self.settings, &self.state.stream_defaults, pixels);
        if !self.budget.try_take(cost, Instant::now()) {
            self.held = Some(held);
            return None;
        }
        match held.input {
            Some((data, pixels)) => {
                let Held { id, arrived, .. } = held;
                Some(self.state.prep.run(pixels > free, move || Prepared::Frame {
                    id,
                    arrived,
                    image: crate::io::image::decode_within(&data, "frame", max, size),
                }))
            }
            None => {
                self.remember_arrival(held.id, held.arrived);
                self.handle.submit_with_id(held.id, None);
                None
            }
        }
    }

    async fn on_prepared(&mut self, prepared: Prepared) -> Flow {
        match prepared {
            Prepared::Frame { id, arrived, image: Ok(image) } => {
                self.remember_arrival(id, arrived);
                self.handle.submit_with_id(id, Some(image));
                Flow::Continue
            }
            Prepared::Frame { id, image: Err(e), .. } => {
                self.state.metrics.frames_bad.fetch_add(1, Ordering::Relaxed);
                self.send_error(ErrorCode::BadFrame, format!("frame {id}: {e}"), false).await
            }
            Prepared::Control { size: (width, height), image: Ok(image) } => {
                let h = self.handle.clone();
                match tokio::task::spawn_blocking(move || h.set_control_image(image)).await {
                    Ok(Ok(())) => self.send(&ServerMessage::ControlImage { width, height }).await,
                    Ok(Err(e)) => self.send_error(ErrorCode::BadControlImage, e.to_string(), false).await,
                    Err(_) => Flow::Stop,
                }
            }
            Prepared::Control { image: Err(e), .. } => {
                self.send_error(ErrorCode::BadControlImage, e.to_string(), false).await
            }
        }
    }

    /// A control image (announced by `control_image`): checked from its header and charged to the budget at
    /// once (refused when over it), then prepared like a frame.
    async fn on_control_image(&mut self, data: Bytes) -> Flow {
        let size = match self.check_image(&data, "control image") {
            Ok(size) => size,
            Err(message) => return self.send_error(ErrorCode::BadControlImage, message, false).await,
        };
        let pixels = size.0 as u64 * size.1 as u64;
        let cost = budget::CONTROL_IMAGE_COST + budget::input_cost(&self.settings, Some(pixels));
        if !self.budget.try_take(cost, Instant::now()) {
            self.state.metrics.text_rate_limited.fetch_add(1, Ordering::Relaxed);
            return self.rate_limited_notice("a control image was refused".into()).await;
        }
        self.control_pending = Some((data, size));
        Flow::Continue
    }

    fn remember_arrival(&mut self, id: u64, at: Instant) {
        self.arrivals.push_back((id, at));
        if self.arrivals.len() > 64 {
            self.arrivals.pop_front();
        }
    }

    /// A text message: refused unparsed when too long, charged to the budget, then parsed and handled.
    async fn on_text(&mut self, text: &str) -> Flow {
        let max = self.state.config.max_text_bytes;
        if text.len() > max {
            let msg = format!("a text message of {} bytes; the limit is {max}", text.len());
            return self.send_error(ErrorCode::TooLarge, msg, false).await;
        }
        if !self.budget.try_take(budget::TEXT_COST, Instant::now()) {
            self.state.metrics.text_rate_limited.fetch_add(1, Ordering::Relaxed);
            return self.rate_limited_notice("text messages are refused unread".into()).await;
        }
        let msg = match ClientMessage::parse(text) {
            Ok(m) => m,
            Err(r) => return self.refuse(r).await,
        };
        match msg {
            ClientMessage::Prompt { prompt, negative_prompt } => {
                let patch =
                    StreamSettingsPatch { prompt: Some(prompt), negative_prompt, ..Default::default() };
                self.on_settings(patch).await
            }
            ClientMessage::Settings(patch) => self.on_settings(patch).await,
            ClientMessage::Quality { quality } => {
                if !(1..=100).contains(&quality) {
                    let msg = format!("quality {quality} is not in 1..=100");
                    return self.send_error(ErrorCode::BadSetting, msg, false).await;
                }
                self.quality = quality;
                Flow::Continue
            }
            ClientMessage::Generate {} => {
                if self.settings.mode != Mode::Txt2img {
                    let msg = "`generate` is for txt2img streams; send frames to an img2img stream";
                    return self.send_error(ErrorCode::BadSetting, msg, false).await;
                }
                let id = self.ids.take();
                self.hold(Held { id, arrived: Instant::now(), input: None }).await
            }
            ClientMessage::FrameId { id } => {
                if id > MAX_FRAME_ID {
                    let msg = format!(
                        "frame ids go up to {MAX_FRAME_ID} (2^53 - 1, the largest integer JSON numbers keep exactly)"
                    );
                    return self.send_error(ErrorCode::BadSetting, msg, false).await;
                }
                self.ids.next = id;
                Flow::Continue
            }
            ClientMessage::ControlImage {} => {
                if self.state.engines.info(self.engine).controlnet.is_none() {
                    let msg = "this server has no ControlNet loaded: control images are not accepted";
                    return self.send_error(ErrorCode::BadControlImage, msg, false).await;
                }
                self.control_next = true;
                Flow::Continue
            }
            ClientMessage::Lora { name, scale } => self.on_lora(name, scale).await,
            ClientMessage::Ping { nonce } => self.send(&ServerMessage::Pong { nonce }).await,
        }
    }

    /// A `prompt` or `settings` message: checked here (the sizes this server offers, every value's range),
    /// charged, then applied by the engine.
    async fn on_settings(&mut self, patch: StreamSettingsPatch) -> Flow {
        let size = patch.size_from(&self.settings);
        if size != (self.settings.width, self.settings.height) && !self.sizes.contains(&size) {
            let offered: Vec<String> = self.sizes.iter().map(|(w, h)| format!("{w}x{h}")).collect();
            let msg = format!(
                "{}x{} is not offered by this server; it offers {}",
                size.0,
                size.1,
                offered.join(", ")
            );
            return self.send_error(ErrorCode::BadSetting, msg, false).await;
        }
        if let Err(e) = self.settings.patched(&patch) {
            return self.send_error(ErrorCode::BadSetting, e.to_string(), false).await;
        }
        if !self.budget.try_take(budget::SETTINGS_COST, Instant::now()) {
            self.state.metrics.text_rate_limited.fetch_add(1, Ordering::Relaxed);
            let msg = "over this connection's budget: the settings change was refused (nothing changed)";
            return self.send_error(ErrorCode::RateLimited, msg, false).await;
        }
        let h = self.handle.clone();
        match tokio::task::spawn_blocking(move || h.update_settings(patch)).await {
            Ok(Ok(next)) => {
                self.settings = next;
                let json = ServerMessage::Settings { settings: &self.settings }.to_json();
                self.tx.send(Message::text(json)).await.is_ok().into()
            }
            Ok(Err(e)) => self.send_error(engine_error_code(&e), e.to_string(), false).await,
            Err(_) => self.send_error(ErrorCode::Internal, "settings update failed", false).await,
        }
    }

    async fn on_lora(&mut self, name: String, scale: f64) -> Flow {
        if !self.state.config.lora_control {
            let msg =
                "changing LoRA scales is off on this server (it changes every client's output); start the \
                       daemon with --lora-control or set server.lora_control";
            return self.send_error(ErrorCode::Forbidden, msg, false).await;
        }
        let engines = self.state.engines.clone();
        match tokio::task::spawn_blocking(move || engines.set_lora_scale(&name, scale)).await {
            Ok(Ok(loras)) => self.send(&ServerMessage::Loras { loras: ClientLora::list(&loras) }).await,
            Ok(Err(e)) => self.send_error(ErrorCode::BadSetting, e.to_string(), false).await,
            Err(_) => self.send_error(ErrorCode::Internal, "LoRA update failed", false).await,
        }
    }

    /// An output of the engine: JPEG-encoded on a blocking thread, sent after its `frame` header.
    async fn on_output(&mut self, out: Output) -> Flow {
        let q = self.quality;
        let Output { image, answers, frame_id, warmup, skipped, times, .. } = out;
        let encoded = tokio::task::spawn_blocking(move || crate::io::image::encode_jpeg(&image, q)).await;
        let Ok(Ok(jpeg)) = encoded else {
            return self.send_error(ErrorCode::Internal, "could not encode the output frame", false).await;
        };
        let latency = self
            .arrivals
            .iter()
            .find(|(id, _)| *id == frame_id)
            .map(|(_, t)| t.elapsed().as_secs_f64() * 1e3);
        let header = ServerMessage::Frame {
            frame_id: answers,
            trigger_frame_id: frame_id,
            warmup,
            skipped,
            timings: &times,
            bytes: jpeg.len(),
        };
        if self.send(&header).await == Flow::Stop || self.tx.send(Message::binary(jpeg)).await.is_err() {
            return Flow::Stop;
        }
        self.state.metrics.frames_out.fetch_add(1, Ordering::Relaxed);
        self.window.frames_out += 1;
        self.window.stages = times;
        if let Some(ms) = latency {
            self.state.metrics.observe_latency(ms);
            self.window.latencies.push(ms);
        }
        Flow::Continue
    }

    async fn on_stats(&mut self) -> Flow {
        let secs = self.window.last.elapsed().as_secs_f64().max(1e-3);
        let c = self.handle.counters.clone();
        let latency_ms = self.window.summary();
        let stages = self.window.stages;
        let stats = ServerMessage::Stats {
            fps_in: self.window.frames_in as f64 / secs,
            fps_out: self.window.frames_out as f64 / secs,
            frames_in: c.frames_in.load(Ordering::Relaxed),
            frames_out: c.frames_out.load(Ordering::Relaxed),
            dropped_input: c.dropped_input.load(Ordering::Relaxed),
            dropped_output: c.dropped_output.load(Ordering::Relaxed),
            rate_limited: self.rate_limited,
            skipped: c.skipped.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            latency_ms,
            stages_ms: &stages,
        };
        let flow = self.send(&stats).await;
        self.window = StatsWindow::new();
        flow
    }
}

/// The code of an engine's refusal: a bad value is the client's (`bad_setting`), anything else the engine's.
fn engine_error_code(e: &crate::error::Error) -> ErrorCode {
    match e {
        crate::error::Error::InvalidArgument { .. } => ErrorCode::BadSetting,
        _ => ErrorCode::Internal,
    }
}

/// Closes an engine stream (dropping its handle may wait on the engine's command queue: not on an async
/// thread).
async fn close_stream(handle: Arc<StreamHandle>) {
    let _ = tokio::task::spawn_blocking(move || drop(handle)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_ids_count_up_and_wrap_at_the_json_limit() {
        let mut ids = FrameIds::default();
        assert_eq!((ids.take(), ids.take()), (0, 1));
        ids.next = MAX_FRAME_ID;
        assert_eq!((ids.take(), ids.take()), (MAX_FRAME_ID, 0));
    }
}
