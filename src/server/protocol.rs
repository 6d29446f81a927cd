//! The WebSocket protocol's messages (docs/PROTOCOL.md is the reference for client writers).
//!
//! Binary messages carry frames: client -> server one encoded image (JPEG or PNG), server -> client one JPEG.
//! Text messages are JSON objects with a `type`.
use crate::engine::{ModelInfo, StageTimes};
use crate::stream::settings::StreamSettings;
use serde::{Deserialize, Serialize};

/// Version of this protocol, sent in `ready`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Client -> server text messages. (`settings` carries arbitrary setting names next to `type`, so it is
/// parsed apart: see [`ClientMessage::parse`].)
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Change the prompt (and optionally the negative prompt) from the next frame on.
    Prompt {
        prompt: String,
        #[serde(default)]
        negative_prompt: Option<String>,
    },
    /// Change any stream settings (a partial object; the same names as in `ready.settings`).
    #[serde(skip)]
    Settings { settings: serde_json::Map<String, serde_json::Value> },
    /// Output JPEG quality (1..=100).
    Quality { quality: u8 },
    /// Ask a txt2img stream for its next frame (img2img streams are driven by the frames sent).
    Generate {},
    /// The id to give the next binary frame (default: one more than the last).
    FrameId { id: u64 },
    /// The next binary message is a control image for the stream's ControlNet (`control = "image"`), not a
    /// frame.
    ControlImage {},
    /// Change the scale of one of the daemon's LoRAs (by name; 0 unfuses it). Shared by every stream: only
    /// when the server allows it (`server.lora_control`).
    Lora { name: String, scale: f64 },
    Ping {
        #[serde(default)]
        nonce: Option<serde_json::Value>,
    },
}

/// The names of the client message types.
pub const CLIENT_TYPES: [&str; 8] =
    ["prompt", "settings", "quality", "generate", "frame_id", "control_image", "lora", "ping"];

/// Why a client text message was refused: an error code and a message for the client.
pub type Refusal = (&'static str, String);

impl ClientMessage {
    /// Parses one text message; the refusal says what was wrong.
    pub fn parse(text: &str) -> Result<ClientMessage, Refusal> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ("bad_json", format!("not JSON: {e}")))?;
        let Some(kind) = value.get("type").and_then(|t| t.as_str()).map(str::to_string) else {
            return Err(("bad_json", "a message must be a JSON object with a string `type`".into()));
        };
        if kind == "settings" {
            let mut map = value.as_object().cloned().unwrap_or_default();
            map.remove("type");
            return Ok(ClientMessage::Settings { settings: map });
        }
        serde_json::from_value(value).map_err(|e| {
            if CLIENT_TYPES.contains(&kind.as_str()) {
                ("bad_json", format!("`{kind}` message: {e}"))
            } else {
                ("unknown_type", format!("unknown message type `{kind}`; expected one of {CLIENT_TYPES:?}"))
            }
        })
    }
}

/// Limits the server enforces, sent in `ready` so clients can adapt.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_fps: f64,
    pub idle_timeout_s: u64,
    pub max_image_side: u32,
    /// Whether `lora` messages are accepted.
    pub lora_control: bool,
}

/// A LoRA as clients see it: its name and scale (not its file path).
#[derive(Debug, Clone, Serialize)]
pub struct ClientLora {
    pub name: String,
    pub scale: f64,
}

impl ClientLora {
    pub fn list(loras: &[crate::models::lora::LoraInfo]) -> Vec<ClientLora> {
        loras.iter().map(|l| ClientLora { name: l.name.clone(), scale: l.scale }).collect()
    }
}

/// Server -> client text messages.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Ready {
        protocol: u32,
        stream_id: u64,
        /// The engine (its index in the daemon) serving this stream; `model.device` is its device.
        engine: usize,
        model: &'a ModelInfo,
        settings: &'a StreamSettings,
        limits: &'a Limits,
        jpeg_quality: u8,
        /// The daemon's fused LoRAs (shared by every stream).
        loras: Vec<ClientLora>,
    },
    /// The LoRAs after a `lora` message changed one.
    Loras {
        loras: Vec<ClientLora>,
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
    Settings {
        settings: &'a StreamSettings,
    },
    /// A control image (announced with `control_image`) was accepted; frames from now on use it.
    ControlImage {
        width: u32,
        height: u32,
    },
    Error {
        /// A stable machine-readable code: bad_json, unknown_type, bad_frame, bad_control_image, bad_setting,
        /// rate_limited, too_large, server_full, unauthorized, idle_timeout, internal.
        code: &'a str,
        message: String,
        /// Whether the connection is closed after this message.
        fatal: bool,
        /// With `server_full`: seconds to wait before connecting again (to this server or another).
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
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
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"{e}","fatal":false}}"#)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_refusals_are_coded() {
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"prompt","prompt":"a"}"#),
            Ok(ClientMessage::Prompt { .. })
        ));
        match ClientMessage::parse(r#"{"type":"settings","cfg_type":"none","guidance":2}"#) {
            Ok(ClientMessage::Settings { settings }) => assert_eq!(settings.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(ClientMessage::parse("{").unwrap_err().0, "bad_json");
        assert_eq!(ClientMessage::parse("[1]").unwrap_err().0, "bad_json");
        assert_eq!(ClientMessage::parse(r#"{"type":"nope"}"#).unwrap_err().0, "unknown_type");
        assert_eq!(ClientMessage::parse(r#"{"type":"prompt"}"#).unwrap_err().0, "bad_json");
        assert_eq!(
            ClientMessage::parse(r#"{"type":"prompt","prompt":"a","x":1}"#).unwrap_err().0,
            "bad_json"
        );
    }
}
