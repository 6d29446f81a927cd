//! The WebSocket protocol's messages (docs/PROTOCOL.md is the reference for client writers).
//!
//! Binary messages carry frames: client -> server one encoded image (JPEG or PNG), server -> client one JPEG.
//! Text messages are JSON objects with a `type`.
use crate::engine::{ModelInfo, StageTimes};
use crate::stream::settings::{StreamSettings, StreamSettingsPatch};
use serde::{Deserialize, Serialize};

/// Version of this protocol, sent in `ready`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Client -> server text messages.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Change the prompt (and optionally the negative prompt) from the next frame on.
    Prompt {
        prompt: String,
        #[serde(default)]
        negative_prompt: Option<String>,
    },
    /// Change any stream settings: the fields to change sit next to `type`, named as in `ready.settings`.
    /// (Parsed apart, see [`ClientMessage::parse`], since serde cannot flatten a struct that refuses unknown
    /// fields.)
    #[serde(skip)]
    Settings(StreamSettingsPatch),
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

/// The machine-readable code of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a message of the protocol's shape.
    BadJson,
    UnknownType,
    /// A frame that is not an image, or larger than `limits.max_frame_pixels`.
    BadFrame,
    /// A control image that is not an image, too large, or sent to a stream without a ControlNet.
    BadControlImage,
    /// A setting out of range, of the wrong type, or a size the server does not offer.
    BadSetting,
    /// Over the connection's budget: frames are paced (the newest waits, older ones are dropped), text
    /// messages are refused.
    RateLimited,
    /// A message over `limits.max_message_bytes` (binary) or `limits.max_text_bytes` (text).
    TooLarge,
    /// Every stream slot is taken.
    ServerFull,
    Unauthorized,
    /// Not allowed on this server (e.g. `lora` without `server.lora_control`).
    Forbidden,
    IdleTimeout,
    /// The engine is failing (see `/health`); the stream cannot be served now.
    Unavailable,
    /// A frame was lost to a failed engine tick (the message names it); the stream was reset and goes on.
    FrameLost,
    Internal,
}

/// Why a client message was refused: its code and a message for the client.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

/// Deserialises `value` as `T`, naming the field that failed.
fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

impl ClientMessage {
    /// Parses one text message; the refusal says what was wrong.
    pub fn parse(text: &str) -> Result<ClientMessage, Refusal> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Refusal::new(ErrorCode::BadJson, format!("not JSON: {e}")))?;
        let Some(kind) = value.get("type").and_then(|t| t.as_str()).map(str::to_string) else {
            return Err(Refusal::new(
                ErrorCode::BadJson,
                "a message must be a JSON object with a string `type`",
            ));
        };
        if !CLIENT_TYPES.contains(&kind.as_str()) {
            return Err(Refusal::new(
                ErrorCode::UnknownType,
                format!("unknown message type `{kind}`; expected one of {CLIENT_TYPES:?}"),
            ));
        }
        if kind == "settings" {
            let mut map = value.as_object().cloned().unwrap_or_default();
            map.remove("type");
            if map.is_empty() {
                return Err(Refusal::new(
                    ErrorCode::BadSetting,
                    "a settings message needs at least one setting",
                ));
            }
            return typed(serde_json::Value::Object(map))
                .map(ClientMessage::Settings)
                .map_err(|e| Refusal::new(ErrorCode::BadSetting, e));
        }
        typed(value).map_err(|e| Refusal::new(ErrorCode::BadJson, format!("`{kind}` message: {e}")))
    }
}

/// Limits the server enforces, sent in `ready` so clients can adapt.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    /// The longest text message.
    pub max_text_bytes: usize,
    /// The connection's budget, in frames per second at the server's default settings (docs/PROTOCOL.md:
    /// costlier settings, big frames and text messages use more of it).
    pub max_fps: f64,
    pub idle_timeout_s: u64,
    pub max_image_side: u32,
    /// The most pixels of a frame or control image (width x height).
    pub max_frame_pixels: u64,
    /// The stream sizes a client may choose, `[width, height]`.
    pub stream_sizes: Vec<(i64, i64)>,
    /// Whether `lora` messages are accepted.
    pub lora_control: bool,
    /// Whether `control_image` messages are accepted (a ControlNet is loaded).
    pub control_images: bool,
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
        code: ErrorCode,
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
            format!(
                r#"{{"type":"error","code":"internal","message":"{}","fatal":false}}"#,
                e.to_string().replace('"', "'")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        ClientMessage::parse(text).unwrap_err().code
    }

    #[test]
    fn messages_parse_and_refusals_are_coded() {
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"prompt","prompt":"a"}"#),
            Ok(ClientMessage::Prompt { .. })
        ));
        match ClientMessage::parse(r#"{"type":"settings","cfg_type":"none","guidance":2}"#) {
            Ok(ClientMessage::Settings(p)) => {
                assert_eq!(p.cfg_type, Some(crate::stream::settings::CfgType::None));
                assert_eq!(p.guidance, Some(2.0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(code("{"), ErrorCode::BadJson);
        assert_eq!(code("[1]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"type":"nope"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"prompt"}"#), ErrorCode::BadJson);
        assert_eq!(code(r#"{"type":"prompt","prompt":"a","x":1}"#), ErrorCode::BadJson);
        assert_eq!(code(r#"{"type":"settings"}"#), ErrorCode::BadSetting);
        let e = ClientMessage::parse(r#"{"type":"settings","guidance":"high"}"#).unwrap_err();
        assert!(e.code == ErrorCode::BadSetting && e.message.contains("guidance"), "{e:?}");
        let e = ClientMessage::parse(r#"{"type":"settings","nope":1}"#).unwrap_err();
        assert!(e.message.contains("nope"), "{e:?}");
        let e = ClientMessage::parse(r#"{"type":"settings","mode":"img3img"}"#).unwrap_err();
        assert!(e.message.contains("mode") && e.message.contains("txt2img"), "{e:?}");
        let json = ServerMessage::Error {
            code: ErrorCode::RateLimited,
            message: "x".into(),
            fatal: false,
            retry_after_s: None,
        }
        .to_json();
        assert!(json.contains(r#""code":"rate_limited""#), "{json}");
    }
}
