//! The daemon's network side: one port serving the browser page (`/`), WebSocket streams (`/ws`), a viewer
//! socket (`/view`) and MJPEG (`/mjpeg`) for the shared camera output, `/health` and Prometheus `/metrics`.
//! Loopback by default; any other address needs a token. Every connection is bounded (message size, clients,
//! frame rate, idle time) and its errors stay its own.
pub mod connection;
pub mod http;
pub mod metrics;
pub mod protocol;

use crate::config::ServerConfig;
use crate::engine::{EngineHandle, ModelInfo};
use crate::error::{Error, Result};
use crate::stream::settings::StreamSettings;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch, Semaphore};

/// The browser client, served at `/`.
pub const INDEX_HTML: &str = include_str!("../../web/index.html");

/// Everything a connection needs, shared.
pub struct ServerState {
    pub engine: EngineHandle,
    pub model: ModelInfo,
    pub config: ServerConfig,
    pub stream_defaults: StreamSettings,
    pub metrics: metrics::Metrics,
    /// Frames of the shared (camera) stream for viewers, as JPEG.
    pub viewers: broadcast::Sender<Bytes>,
    clients: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    /// Held by every connection task; the server waits until all are dropped.
    alive: tokio::sync::mpsc::Sender<()>,
}

/// Refuses to listen beyond loopback without a token.
pub fn check_listen(addr: &SocketAddr, token: &Option<String>) -> Result<()> {
    if !addr.ip().is_loopback() && token.as_deref().is_none_or(str::is_empty) {
        return Err(Error::invalid(
            "listen",
            format!(
                "{addr} is not a loopback address: set --token (clients then present it) to listen there"
            ),
        ));
    }
    Ok(())
}

/// Binds the daemon's port (after checking that a non-loopback address has a token). The daemon does this
/// before it loads the model, so a port in use is reported at once; [`Server::start_on`] then serves on it.
pub fn bind(config: &ServerConfig) -> Result<std::net::TcpListener> {
    let addr = config.listen_addr()?;
    check_listen(&addr, &config.token)?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| listen_error(addr, e))?;
    listener.set_nonblocking(true).map_err(|e| listen_error(addr, e))?;
    Ok(listener)
}

fn listen_error(addr: SocketAddr, e: std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    let advice = match e.kind() {
        K::AddrInUse => {
            ": the port is in use (another sdstream or another program listens there); stop it, or pick \
             another port with --listen"
        }
        K::PermissionDenied => ": not allowed (ports below 1024 need privileges); pick another with --listen",
        K::AddrNotAvailable => ": this machine has no such address; pick one of its own with --listen",
        _ => "",
    };
    Error::invalid("listen", format!("cannot listen on {addr}: {e}{advice}"))
}

/// A running server: the handle to stop it and the address it listens on.
pub struct Server {
    pub local_addr: SocketAddr,
    pub state: Arc<ServerState>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    alive_rx: tokio::sync::mpsc::Receiver<()>,
}

impl Server {
    /// Binds and starts accepting (on the current tokio runtime).
    pub async fn start(
        engine: EngineHandle,
        model: ModelInfo,
        config: ServerConfig,
        stream_defaults: StreamSettings,
    ) -> Result<Server> {
        let listener = bind(&config)?;
        Self::start_on(listener, engine, model, config, stream_defaults).await
    }

    /// Starts accepting on a listener from [`bind`] (on the current tokio runtime).
    pub async fn start_on(
        listener: std::net::TcpListener,
        engine: EngineHandle,
        model: ModelInfo,
        config: ServerConfig,
        stream_defaults: StreamSettings,
    ) -> Result<Server> {
        let listener =
            TcpListener::from_std(listener).map_err(|e| Error::invalid("listen", e.to_string()))?;
        let local_addr = listener.local_addr().map_err(|e| Error::invalid("listen", e.to_string()))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (alive, alive_rx) = tokio::sync::mpsc::channel(1);
        let (viewers, _) = broadcast::channel(4);
        let state = Arc::new(ServerState {
            engine,
            model,
            clients: Arc::new(Semaphore::new(config.max_clients)),
            config,
            stream_defaults,
            metrics: metrics::Metrics::default(),
            viewers,
            shutdown: shutdown_rx,
            alive,
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        tracing::info!("listening on http://{local_addr}/ (WebSocket streams at ws://{local_addr}/ws)");
        Ok(Server { local_addr, state, shutdown, task, alive_rx })
    }

    /// Stops accepting, tells every connection to close (with a close frame), and waits for them (at most
    /// `grace`).
    pub async fn shutdown(self, grace: Duration) {
        let Server { shutdown, task, state, mut alive_rx, .. } = self;
        let _ = shutdown.send(true);
        let _ = task.await;
        drop(state);
        // Each connection holds a clone of `alive`; recv returns None once all are gone.
        let _ = tokio::time::timeout(grace, alive_rx.recv()).await;
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<ServerState>) {
    let mut shutdown = state.shutdown.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    tokio::spawn(async move {
                        let _alive = state.alive.clone();
                        route(stream, peer, state).await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Whether the request carries the server's token (when one is set).
fn authorized(state: &ServerState, req: &http::Request) -> bool {
    let Some(token) = state.config.token.as_deref().filter(|t| !t.is_empty()) else { return true };
    let given = req
        .query_param("token")
        .or_else(|| req.header("authorization").and_then(|h| h.strip_prefix("Bearer ")).map(str::to_string));
    given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Browsers send Origin; it must name this server's own host (or a configured origin). Non-browser clients
/// send none and are judged by the token alone.
fn origin_allowed(state: &ServerState, req: &http::Request) -> bool {
    let Some(origin) = req.header("origin") else { return true };
    if state.config.allowed_origins.iter().any(|o| o == origin) {
        return true;
    }
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
    req.header("host").is_some_and(|host| host.eq_ignore_ascii_case(origin_host))
}

async fn route(mut stream: TcpStream, peer: SocketAddr, state: Arc<ServerState>) {
    let Some(req) = http::peek_request(&stream, Duration::from_secs(10)).await else {
        return;
    };
    let ws = req.is_websocket_upgrade();
    if !authorized(&state, &req) {
        state.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
        http::consume_head(&mut stream, &req).await;
        http::respond(&mut stream, "401 Unauthorized", "text/plain", b"missing or wrong token\n", "").await;
        return;
    }
    if ws && !origin_allowed(&state, &req) {
        state.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
        http::consume_head(&mut stream, &req).await;
        http::respond(&mut stream, "403 Forbidden", "text/plain", b"origin not allowed\n", "").await;
        return;
    }
    match (req.method.as_str(), req.path.as_str(), ws) {
        ("GET", "/ws", true) => connection::run_stream(stream, peer, state).await,
        ("GET", "/view", true) => connection::run_viewer(stream, state).await,
        ("GET", "/", false) | ("GET", "/index.html", false) => {
            http::consume_head(&mut stream, &req).await;
            http::respond(&mut stream, "200 OK", "text/html; charset=utf-8", INDEX_HTML.as_bytes(), "").await;
        }
        ("GET", "/favicon.ico", false) => {
            http::consume_head(&mut stream, &req).await;
            http::respond(&mut stream, "204 No Content", "image/x-icon", b"", "").await;
        }
        ("GET", "/health", false) => {
            http::consume_head(&mut stream, &req).await;
            let body = serde_json::json!({
                "status": "ok",
                "model": &state.model,
                "clients": state.metrics.clients.load(Ordering::Relaxed),
                "max_clients": state.config.max_clients,
            });
            http::respond(&mut stream, "200 OK", "application/json", body.to_string().as_bytes(), "").await;
        }
        ("GET", "/metrics", false) => {
            http::consume_head(&mut stream, &req).await;
            let c = state.engine.counters();
            let extra = [
                ("engine_ticks_total", "Engine ticks (batched UNet calls).", c.ticks.load(Ordering::Relaxed)),
                (
                    "prompt_cache_hits_total",
                    "Prompt embedding cache hits.",
                    c.prompt_cache_hits.load(Ordering::Relaxed),
                ),
                (
                    "prompt_cache_misses_total",
                    "Prompt embedding cache misses.",
                    c.prompt_cache_misses.load(Ordering::Relaxed),
                ),
                (
                    "text_encoder_calls_total",
                    "Text encoder calls.",
                    c.text_encoder_calls.load(Ordering::Relaxed),
                ),
            ];
            let body = state.metrics.render(&extra);
            http::respond(&mut stream, "200 OK", "text/plain; version=0.0.4", body.as_bytes(), "").await;
        }
        ("GET", "/mjpeg", false) => {
            http::consume_head(&mut stream, &req).await;
            connection::run_mjpeg(stream, state).await;
        }
        (_, _, true) => {
            http::consume_head(&mut stream, &req).await;
            http::respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"WebSocket endpoints: /ws, /view\n",
                "",
            )
            .await;
        }
        _ => {
            http::consume_head(&mut stream, &req).await;
            http::respond(&mut stream, "404 Not Found", "text/plain", b"not found\n", "").await;
        }
    }
}
