//! The daemon's network side: one port serving the browser page (`/`), WebSocket streams (`/ws`), a viewer
//! socket (`/view`) and MJPEG (`/mjpeg`) for the shared camera output, `/health` (with `/health/live` and
//! `/health/ready` for load balancers and orchestrators) and Prometheus `/metrics`.
//! axum routes on hyper connections served here one by one, so each has a header read timeout and is counted
//! (`sdstream_tcp_open`) until its socket closes. Loopback by default; any other address needs a token; with
//! no token only loopback (or configured) `Host` and `Origin` names are served (DNS rebinding). Every route has
//! a connection limit and a timeout (docs/SECURITY.md), and every connection's errors stay its own.
pub mod budget;
pub mod guard;
pub mod metrics;
pub mod prep;
pub mod protocol;
pub mod session;
pub mod viewers;

use crate::config::ServerConfig;
use crate::engine::pool::PoolHandle;
use crate::engine::{EngineHandle, ModelInfo};
use crate::error::{Error, Result};
use crate::stream::settings::StreamSettings;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use metrics::{Route, RouteGuard};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};

/// The browser client, served at `/`.
pub const INDEX_HTML: &str = include_str!("../../web/index.html");

/// The largest request head accepted (hyper's read buffer; a longer head is answered 431).
pub const MAX_HEAD: usize = 16 * 1024;

/// Everything a connection needs, shared.
pub struct ServerState {
    /// The engines; a new stream goes to the one with the most free slots.
    pub engines: PoolHandle,
    /// Engine 0's model (every engine runs the same model, each on its own device).
    pub model: ModelInfo,
    pub config: ServerConfig,
    pub stream_defaults: StreamSettings,
    pub metrics: metrics::Metrics,
    /// Frames of the shared (camera) stream for viewers, as JPEG.
    pub viewers: broadcast::Sender<Bytes>,
    /// The address the server listens on.
    pub local_addr: SocketAddr,
    /// `Host` values accepted without a token (lower case, with the port).
    allowed_hosts: Vec<String>,
    /// Decodes and resizes clients' images (big ones on a low-priority thread of their own).
    prep: prep::Preparer,
    clients: Arc<Semaphore>,
    viewer_slots: Arc<Semaphore>,
    request_slots: Arc<Semaphore>,
    tcp_slots: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    /// Held by every connection (its socket) and task; the server waits until all are dropped.
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
    /// Binds and starts accepting (on the current tokio runtime), serving streams on one engine.
    pub async fn start(
        engine: EngineHandle,
        model: ModelInfo,
        config: ServerConfig,
        stream_defaults: StreamSettings,
    ) -> Result<Server> {
        let listener = bind(&config)?;
        Self::start_on(listener, engine, model, config, stream_defaults).await
    }

    /// Starts accepting on a listener from [`bind`] (on the current tokio runtime), serving streams on one
    /// engine (up to `server.max_streams_per_engine`).
    pub async fn start_on(
        listener: std::net::TcpListener,
        engine: EngineHandle,
        model: ModelInfo,
        config: ServerConfig,
        stream_defaults: StreamSettings,
    ) -> Result<Server> {
        let engines = PoolHandle::new(
            vec![(engine, model)],
            config.streams_per_engine(),
            Duration::from_secs(config.engine_stall_s),
        );
        Self::start_pool_on(listener, engines, config, stream_defaults).await
    }

    /// Binds and starts accepting, serving streams on a pool of engines.
    pub async fn start_pool(
        engines: PoolHandle,
        config: ServerConfig,
        stream_defaults: StreamSettings,
    ) -> Result<Server> {
        let listener = bind(&config)?;
        Self::start_pool_on(listener, engines, config, stream_defaults).await
    }

    /// Starts accepting on a listener from [`bind`], serving streams on a pool of engines.
    pub async fn start_pool_on(
        listener: std::net::TcpListener,
        engines: PoolHandle,
        config: ServerConfig,
        stream_defaults: StreamSettings,
    ) -> Result<Server> {
        if engines.is_empty() {
            return Err(Error::invalid("device", "no engine to serve streams on"));
        }
        let model = engines.info(0).clone();
        let listener =
            TcpListener::from_std(listener).map_err(|e| Error::invalid("listen", e.to_string()))?;
        let local_addr = listener.local_addr().map_err(|e| Error::invalid("listen", e.to_string()))?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (alive, alive_rx) = tokio::sync::mpsc::channel(1);
        let (viewers, _) = broadcast::channel(4);
        let allowed_hosts = guard::allowed_hosts(&config, local_addr);
        let state = Arc::new(ServerState {
            engines,
            model,
            clients: Arc::new(Semaphore::new(config.max_clients)),
            viewer_slots: Arc::new(Semaphore::new(config.max_viewers)),
            request_slots: Arc::new(Semaphore::new(config.max_requests)),
            tcp_slots: Arc::new(Semaphore::new(config.max_connections)),
            allowed_hosts,
            prep: prep::Preparer::new(config.max_clients * 2),
            local_addr,
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
    let router = router(state.clone());
    let mut shutdown = state.shutdown.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let Ok(slot) = state.tcp_slots.clone().try_acquire_owned() else {
                        state.metrics.tcp_refused.fetch_add(1, Ordering::Relaxed);
                        refuse_connection(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let io = TrackedIo::new(stream, slot, &state);
                    tokio::spawn(serve_connection(io, peer, router.clone(), state.clone()));
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

/// Answers a connection over `server.max_connections` with a 503 if its buffer takes it at once, and closes.
fn refuse_connection(stream: TcpStream) {
    let _ = stream.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 31\r\n\
          Connection: close\r\n\r\ntoo many connections; try later\n",
    );
}

/// One HTTP/1.1 connection: one request (every response but an upgrade says `Connection: close`), whose head
/// must arrive within `server.header_timeout_s`; a WebSocket upgrade takes the socket into its own task.
async fn serve_connection(io: TrackedIo, peer: SocketAddr, router: Router, state: Arc<ServerState>) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        tower::ServiceExt::oneshot(router.clone(), req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(state.config.header_timeout_s))
        .max_buf_size(MAX_HEAD);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut shutdown = state.shutdown.clone();
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(Duration::from_secs(2), conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            state.metrics.header_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!("connection from {peer}: {e}");
    }
}

/// A client's socket, counted in `sdstream_tcp_open` and holding its `server.max_connections` slot (and the
/// server's shutdown) until it is dropped, wherever it went (a WebSocket or MJPEG task takes it along). A
/// write that cannot go through for `server.idle_timeout_s` (the client stopped reading and the socket's
/// buffers are full) fails with `TimedOut`, which ends whatever was writing: no route can be held open by a
/// client that does not read.
struct TrackedIo {
    stream: TcpStream,
    state: Arc<ServerState>,
    /// Set while a write is pending: when it gives up.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_limit: Duration,
    _slot: OwnedSemaphorePermit,
    _alive: tokio::sync::mpsc::Sender<()>,
}

impl TrackedIo {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, state: &Arc<ServerState>) -> Self {
        state.metrics.tcp_accepted.fetch_add(1, Ordering::Relaxed);
        state.metrics.tcp_open.fetch_add(1, Ordering::Relaxed);
        TrackedIo {
            stream,
            state: state.clone(),
            stall: None,
            stall_limit: Duration::from_secs(state.config.idle_timeout_s),
            _slot: slot,
            _alive: state.alive.clone(),
        }
    }

    /// Passes a write's result on, turning a write pending for longer than the stall limit into an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stall = None;
            return poll;
        }
        let limit = self.stall_limit;
        let timer = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stall = None;
            self.state.metrics.write_stalls.fetch_add(1, Ordering::Relaxed);
            let msg = format!("the client read nothing for {} s", limit.as_secs());
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg)));
        }
        Poll::Pending
    }
}

impl Drop for TrackedIo {
    fn drop(&mut self) {
        self.state.metrics.tcp_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, poll)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch(cx, poll)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The routes. Plain requests share `server.max_requests` and answer 408 after `server.request_timeout_s`;
/// every request first passes [`guard::check`] (token, Host, Origin).
fn router(state: Arc<ServerState>) -> Router {
    let timeout = Duration::from_secs(state.config.request_timeout_s);
    let plain = Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route(
            "/favicon.ico",
            get(|| async { (StatusCode::NO_CONTENT, [(header::CONTENT_TYPE, "image/x-icon")]) }),
        )
        .route("/health", get(health))
        .route("/health/live", get(health_live))
        .route("/health/ready", get(health_ready))
        .route("/metrics", get(metrics_page))
        .fallback(not_found)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout));
    Router::new()
        .route("/ws", get(ws_stream))
        .route("/view", get(ws_view))
        .route("/mjpeg", get(mjpeg))
        .merge(plain)
        // Every route is a GET: no request body is read.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(0))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::check))
        .with_state(state)
}

/// A plain-text refusal.
fn refusal(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], format!("{}\n", reason.into())).into_response()
}

/// A route's connection limit, reached: answered 503 with the reason.
struct Full {
    route: Route,
    limit: usize,
}

impl IntoResponse for Full {
    fn into_response(self) -> Response {
        let reason = format!("{} is full ({} at once); try again later", self.route.label(), self.limit);
        refusal(StatusCode::SERVICE_UNAVAILABLE, reason)
    }
}

/// A slot of a route's connection limit, or the refusal (counted).
fn slot(
    state: &ServerState,
    pool: &Arc<Semaphore>,
    route: Route,
    limit: usize,
) -> Result<OwnedSemaphorePermit, Full> {
    pool.clone().try_acquire_owned().map_err(|_| {
        state.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
        state.metrics.route(route).refused.fetch_add(1, Ordering::Relaxed);
        Full { route, limit }
    })
}

fn plain_slot(state: &ServerState, route: Route) -> Result<OwnedSemaphorePermit, Full> {
    slot(state, &state.request_slots, route, state.config.max_requests)
}

async fn index(State(state): State<Arc<ServerState>>) -> Response {
    let _slot = match plain_slot(&state, Route::Page) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], INDEX_HTML)
        .into_response()
}

async fn not_found(State(state): State<Arc<ServerState>>, req: axum::extract::Request) -> Response {
    let _slot = match plain_slot(&state, Route::Other) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    if req.headers().contains_key(header::UPGRADE) {
        return refusal(StatusCode::NOT_FOUND, "WebSocket endpoints: /ws, /view");
    }
    refusal(StatusCode::NOT_FOUND, "not found")
}

async fn health(State(state): State<Arc<ServerState>>) -> Response {
    let _slot = match plain_slot(&state, Route::Health) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    // Unhealthy when an engine's ticks keep failing (each engine says why); live and ready are the
    // load balancer's and orchestrator's probes below.
    let unhealthy = state.engines.unhealthy();
    let status = if unhealthy.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if unhealthy.is_empty() { "ok" } else { "unhealthy" },
        "reason": (!unhealthy.is_empty()).then(|| unhealthy.join("; ")),
        "engine_health": state.engines.health(),
        "model": &state.model,
        "clients": state.metrics.clients.load(Ordering::Relaxed),
        "max_clients": state.config.max_clients,
        "live": state.engines.live(),
        "ready": readiness(&state).is_ok(),
        "free": free_slots(&state),
        "engines": state.engines.loads(),
    });
    let headers = [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")];
    (status, headers, body.to_string()).into_response()
}

/// Stream slots a new client could take now: free engine slots, within `server.max_clients`.
fn free_slots(state: &ServerState) -> usize {
    let clients = state.metrics.clients.load(Ordering::Relaxed) as usize;
    state.engines.free().min(state.config.max_clients.saturating_sub(clients))
}

/// Whether the server takes one more stream (how many), or why not.
fn readiness(state: &ServerState) -> std::result::Result<usize, String> {
    if *state.shutdown.borrow() {
        return Err("shutting down".into());
    }
    match free_slots(state) {
        0 => {
            let mut why = format!(
                "full: {} clients, {} stream slots on {} engine(s)",
                state.metrics.clients.load(Ordering::Relaxed),
                state.engines.capacity().min(state.config.max_clients),
                state.engines.len()
            );
            for dead in not_live(state) {
                why.push_str(&format!("; {dead} (not live)"));
            }
            Err(why)
        }
        n => Ok(n),
    }
}

/// The engines that are not live, each with why.
fn not_live(state: &ServerState) -> Vec<String> {
    let loads = state.engines.loads().into_iter().filter(|l| !l.live);
    loads.map(|l| format!("engine {} ({}): {}", l.index, l.device, l.reason)).collect()
}

/// Liveness: the process answers and every engine's inference thread runs and takes its frames (a
/// stalled or dead engine makes this 503, so an orchestrator restarts the daemon). No token needed.
async fn health_live(State(state): State<Arc<ServerState>>) -> Response {
    let _slot = match plain_slot(&state, Route::Health) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    let dead = not_live(&state);
    // `refusal` is the plain-text answer every route uses, here for a 200 too.
    if dead.is_empty() {
        refusal(StatusCode::OK, format!("live: {} engine(s)", state.engines.len()))
    } else {
        refusal(StatusCode::SERVICE_UNAVAILABLE, format!("not live: {}", dead.join("; ")))
    }
}

/// Readiness: one more stream fits (a live engine has a free slot, `server.max_clients` is not reached, the
/// server is not shutting down); else 503 with `Retry-After`. Load balancers send new clients elsewhere
/// while it fails; the streams already here go on. No token needed.
async fn health_ready(State(state): State<Arc<ServerState>>) -> Response {
    let _slot = match plain_slot(&state, Route::Health) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    match readiness(&state) {
        Ok(free) => refusal(StatusCode::OK, format!("ready: {free} free stream slot(s)")),
        Err(why) => {
            let mut r = refusal(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}"));
            r.headers_mut().insert(header::RETRY_AFTER, crate::engine::pool::RETRY_AFTER_S.into());
            r
        }
    }
}

async fn metrics_page(State(state): State<Arc<ServerState>>) -> Response {
    let _slot = match plain_slot(&state, Route::Metrics) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    let e = &state.engines;
    let extra = [
        ("engine_ticks_total", "Engine ticks (batched UNet calls), every engine.", e.total(|c| &c.ticks)),
        ("prompt_cache_hits_total", "Prompt embedding cache hits.", e.total(|c| &c.prompt_cache_hits)),
        ("prompt_cache_misses_total", "Prompt embedding cache misses.", e.total(|c| &c.prompt_cache_misses)),
        ("text_encoder_calls_total", "Text encoder calls.", e.total(|c| &c.text_encoder_calls)),
        (
            "engine_failures_total",
            "Engine ticks and commands that failed (their streams were reset), every engine.",
            e.failures_total(),
        ),
    ];
    let mut body = state.metrics.render(&extra);
    body.push_str(&metrics::render_engines(&e.loads(), readiness(&state).is_ok()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4"), (header::CACHE_CONTROL, "no-store")], body)
        .into_response()
}

/// The WebSocket settings: message and frame size caps, write buffers, and the token subprotocol echoed back.
fn configure(ws: WebSocketUpgrade, state: &ServerState) -> WebSocketUpgrade {
    let max = state.config.max_message_bytes;
    let ws = ws
        .max_message_size(max)
        .max_frame_size(max)
        .write_buffer_size(128 * 1024)
        .max_write_buffer_size(4 * max.max(1 << 20));
    match state.config.token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => ws.protocols([format!("{}{token}", guard::TOKEN_PROTOCOL_PREFIX)]),
        None => ws,
    }
}

async fn ws_stream(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    configure(ws, &state).on_upgrade(move |socket| async move {
        let _open = RouteGuard::new(state.metrics.route(Route::Ws));
        session::run_stream(socket, peer, state.clone()).await;
    })
}

async fn ws_view(State(state): State<Arc<ServerState>>, ws: WebSocketUpgrade) -> Response {
    let slot = match slot(&state, &state.viewer_slots, Route::View, state.config.max_viewers) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    configure(ws, &state).on_upgrade(move |socket| async move {
        let _slot = slot;
        let _open = RouteGuard::new(state.metrics.route(Route::View));
        viewers::run_viewer(socket, state.clone()).await;
    })
}

async fn mjpeg(State(state): State<Arc<ServerState>>) -> Response {
    let slot = match slot(&state, &state.viewer_slots, Route::Mjpeg, state.config.max_viewers) {
        Ok(s) => s,
        Err(full) => return full.into_response(),
    };
    viewers::mjpeg_response(state, slot)
}
