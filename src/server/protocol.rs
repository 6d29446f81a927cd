//! The WebSocket protocol's messages (docs/PROTOCOL.md is the reference for client writers).
//!
//! Binary messages carry frames: client -> server one encoded image (JPEG or PNG), server -> client one JPEG.
//! Text messages are JSON objects with a `type`.
use crate::engine::{ModelInfo, StageTimes};
use crate::stream::settings::StreamSettings;
use serde::{Deserialize, Serialize};

/// Version of this protocol, sent in `ready`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Client -> server text messages.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Change the prompt (and optionally the negative prompt) from the next frame on.
    Prompt { prompt: String, #[serde(default)] negative_prompt: Option<String> },
    /// Change any stream settings (a partial object; the same names as in `ready.settings`).
    Settings {
        #[serde(flatten)]
        settings: serde_json::Map<String, serde_json::Value>,
    },
    /// Output JPEG quality (1..=100).
    Quality { quality: u8 },
    /// Ask a txt2img stream for its next frame (img2img streams are driven by the frames sent).
    Generate {},
    /// The id to give the next binary frame (default: one more than the last).
    FrameId { id: u64 },
    Ping {
        #[serde(default)]
        nonce: Option<serde_json::Value>,
    },
}

/// Limits the server enforces, sent in `ready` so clients can adapt.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_fps: f64,
    pub idle_timeout_s: u64,
    pub max_image_side: u32,
}

/// Server -> client text messages.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Ready {
        protocol: u32,
        stream_id: u64,
        model: &'a ModelInfo,
        settings: &'a StreamSettings,
        limits: &'a Limits,
        jpeg_quality: u8,
    },
    /// Sent right before each output frame's binary message.
    Frame {
        /// The id of the input frame this output answers.
        frame_id: u64,
        /// The frame whose arrival produced this output (differs from frame_id for multi-stage streams).
        trigger_frame_id: u64,
        warmup: bool,
        skipped: bool,
        timings: &'a StageTimes,
        bytes: usize,
    },
    /// The settings now in force, after a `settings` or `prompt` message.
    Settings { settings: &'a StreamSettings },
    Error {
        /// A stable machine-readable code: bad_json, unknown_type, bad_frame, bad_setting, rate_limited,
        /// too_large, server_full, unauthorized, idle_timeout, internal.
        code: &'a str,
        message: String,
        /// Whether the connection is closed after this message.
        fatal: bool,
    },
    Stats {
        fps_in: f64,
        fps_out: f64,
        frames_in: u64,
        frames_out: u64,
        dropped_input: u64,
        dropped_output: u64,
        rate_limited: u64,
        skipped: u64,
        errors: u64,
        latency_ms: LatencySummary,
        stages_ms: &'a StageTimes,
    },
    Pong {
        nonce: Option<serde_json::Value>,
    },
}

/// Latency percentiles over the last second's outputs (receive at the server to send), in milliseconds.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!(r#"{{"type":"error","code":"internal","message":"{e}","fatal":false}}"#))
    }
}
