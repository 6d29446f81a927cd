//! Viewers of the shared (camera) stream: the `/view` WebSocket and MJPEG over HTTP (`/mjpeg`). Each gets the
//! stream's output JPEGs from a broadcast channel and sends nothing that matters; a viewer that falls behind
//! skips frames, one that stops reading is closed (its socket's writes stall past `server.idle_timeout_s`).
use super::ServerState;
use axum::extract::ws::{close_code, Message, WebSocket};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

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
            _ = shutdown.changed() => { super::session::close(&mut tx, close_code::AWAY, "server shutting down").await; break; }
            _ = tokio::time::sleep_until(last_seen + idle) => {
                timed_out();
                super::session::close(&mut tx, close_code::NORMAL, "idle").await;
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
