//! Daemon configuration files (configs/*.toml): the model, the server's limits and the default stream
//! settings. Command-line flags override any value.
use crate::error::{Error, Result};
use crate::stream::settings::{StreamSettings, StreamSettingsPatch};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A diffusers folder, a Hugging Face model id, or a single-file `.safetensors` checkpoint.
    pub model: String,
    /// For a single-file checkpoint: a diffusers folder or model id giving its configs, tokenizer and
    /// scheduler (unset: built-in SD 1.5 configs when the checkpoint's shapes are SD 1.x).
    pub model_config: Option<String>,
    /// A separate autoencoder (e.g. TAESD) replacing the model's VAE.
    pub vae: Option<String>,
    /// A ControlNet (folder or Hugging Face id) loaded next to the model, for `control = "canny"/"image"`
    /// streams.
    pub controlnet: Option<String>,
    pub device: String,
    /// Several devices, one engine (inference thread and model copy) on each: `devices = ["cuda:0", "cuda:1"]`
    /// (`--device cuda:0,cuda:1`). Set, it replaces `device`.
    pub devices: Vec<String>,
    pub dtype: String,
    /// LoRAs fused at load: `loras = [{ path = "...", scale = 1.0 }]` (path: a .safetensors file, a folder
    /// holding one, or a Hugging Face id). `--lora PATH[:SCALE]` flags add to these.
    pub loras: Vec<crate::models::lora::LoraSpec>,
    /// Capture each tick once and replay it: `auto` (CUDA graphs on a GPU, the eager tick on the CPU), `on`
    /// (on the CPU: the graph runner's CPU stand-in) or `off`.
    pub cuda_graphs: crate::graph::GraphMode,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            model: String::new(),
            model_config: None,
            vae: None,
            controlnet: None,
            device: "auto".into(),
            devices: Vec::new(),
            dtype: "fp16".into(),
            loras: Vec::new(),
            cuda_graphs: crate::graph::GraphMode::Auto,
        }
    }
}

impl ModelConfig {
    /// The devices to start an engine on: `devices`, or else `device` alone.
    pub fn device_list(&self) -> Vec<String> {
        if self.devices.is_empty() {
            vec![self.device.clone()]
        } else {
            self.devices.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    /// Required when listening on anything but loopback; clients present it as `?token=` or a Bearer header.
    pub token: Option<String>,
    pub max_clients: usize,
    pub max_message_bytes: usize,
    /// Frames per second accepted from one connection; faster frames are dropped (and counted).
    pub max_fps: f64,
    /// Seconds without any message from a client before it is disconnected.
    pub idle_timeout_s: u64,
    pub jpeg_quality: u8,
    /// Extra Origins allowed for browser clients (the server's own host is always allowed).
    pub allowed_origins: Vec<String>,
    /// Extra names accepted in `Host` (and in `Origin`) when no token is set, as `name` (on the daemon's port)
    /// or `name:port`; `localhost`, `127.0.0.1` and `[::1]` on the daemon's port always are. Protects a
    /// token-less daemon from DNS rebinding (docs/SECURITY.md).
    pub allowed_hosts: Vec<String>,
    /// TCP connections open at once, every route together (HTTP requests, WebSocket and MJPEG clients);
    /// more are refused with 503.
    pub max_connections: usize,
    /// `/view` and `/mjpeg` clients at once (together); more are refused with 503.
    pub max_viewers: usize,
    /// Plain HTTP requests (`/`, `/health`, `/metrics`) in progress at once; more are refused with 503.
    pub max_requests: usize,
    /// Seconds a client has to send a whole request head before its connection is closed.
    pub header_timeout_s: u64,
    /// Seconds a plain HTTP request may take before it is answered 408.
    pub request_timeout_s: u64,
    /// Synchronise the GPU around each stage so the per-stage timings in `frame`/`stats` are exact (costs a
    /// little speed); unset: on for the CPU, off for CUDA.
    pub measure_stages: Option<bool>,
    /// Let clients change the scale of the daemon's LoRAs with a `lora` message. The LoRAs are fused into the
    /// one model every stream shares, so a change shows in every client's output: off unless asked for.
    pub lora_control: bool,
    /// The most pixels (width x height, read from the image's header before decoding) of a frame or control
    /// image a client may send; larger ones are refused undecoded.
    pub max_frame_pixels: u64,
    /// The stream sizes clients may choose, as `"WIDTHxHEIGHT"`; empty: only the configured stream size.
    pub stream_sizes: Vec<String>,
    /// The longest text (JSON) message accepted, in bytes; longer ones are refused unparsed.
    pub max_text_bytes: usize,
    /// Streams one engine (one device) takes; beyond it on every engine a new client is refused with
    /// `server_full` and a retry hint. Unset: `max_clients`. `sdstream bench` suggests a value.
    pub max_streams_per_engine: Option<usize>,
    /// Seconds frames may wait for an engine without a tick before it counts as stalled (`/health/live`
    /// fails, it takes no new streams).
    pub engine_stall_s: u64,
}

impl ServerConfig {
    /// Streams one engine takes (`max_streams_per_engine`, or `max_clients`).
    pub fn streams_per_engine(&self) -> usize {
        self.max_streams_per_engine.unwrap_or(self.max_clients)
    }

    /// `listen` as a socket address; an error names the flag.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr> {
        self.listen
            .parse()
            .map_err(|e| Error::invalid("listen", format!("`{}`: {e} (expected IP:PORT)", self.listen)))
    }

    /// The stream sizes clients may choose: `stream_sizes`, or only `default` (the configured stream's size)
    /// when the list is empty.
    pub fn allowed_sizes(&self, default: (i64, i64)) -> Result<Vec<(i64, i64)>> {
        if self.stream_sizes.is_empty() {
            return Ok(vec![default]);
        }
        self.stream_sizes
            .iter()
            .map(|text| {
                let bad = || {
                    Error::invalid(
                        "server.stream_sizes",
                        format!("`{text}`: expected WIDTHxHEIGHT, e.g. 512x512"),
                    )
                };
                let (w, h) = text.split_once('x').ok_or_else(bad)?;
                Ok((w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?))
            })
            .collect()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8765".into(),
            token: None,
            max_clients: 8,
            max_message_bytes: 8 * 1024 * 1024,
            max_fps: 60.0,
            idle_timeout_s: 60,
            jpeg_quality: 85,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_connections: 256,
            max_viewers: 16,
            max_requests: 32,
            header_timeout_s: 10,
            request_timeout_s: 10,
            measure_stages: None,
            lora_control: false,
            max_frame_pixels: 4096 * 4096,
            stream_sizes: Vec::new(),
            max_text_bytes: 16 * 1024,
            max_streams_per_engine: None,
            engine_stall_s: 60,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    pub model: ModelConfig,
    pub server: ServerConfig,
    /// The stream settings that differ from the defaults (every client's stream starts with them).
    pub stream: StreamSettingsPatch,
}

impl DaemonConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: DaemonConfig = toml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        config.validate().map_err(|e| Error::config(path, e.to_string()))?;
        Ok(config)
    }

    /// The stream settings every stream starts with: the defaults with `[stream]` applied.
    pub fn stream_settings(&self) -> Result<StreamSettings> {
        StreamSettings::default().patched(&self.stream)
    }

    /// Checks the values a file or flags can get wrong.
    pub fn validate(&self) -> Result<()> {
        let stream = self.stream_settings()?;
        let s = &self.server;
        for (w, h) in s.allowed_sizes((stream.width, stream.height))? {
            let mut sized = stream.clone();
            (sized.width, sized.height) = (w, h);
            sized.validate().map_err(|e| Error::invalid("server.stream_sizes", e.to_string()))?;
        }
        if s.max_frame_pixels < 64 * 64 || s.max_frame_pixels > 16384 * 16384 {
            return Err(Error::invalid(
                "server.max_frame_pixels",
                format!("{} is not in 4096..=268435456", s.max_frame_pixels),
            ));
        }
        if s.max_text_bytes < 256 || s.max_text_bytes > s.max_message_bytes {
            return Err(Error::invalid(
                "server.max_text_bytes",
                format!("{} is not in 256..=max_message_bytes ({})", s.max_text_bytes, s.max_message_bytes),
            ));
        }
        if s.max_clients == 0 || s.max_clients > 1024 {
            return Err(Error::invalid(
                "server.max_clients",
                format!("{} is not in 1..=1024", s.max_clients),
            ));
        }
        if s.max_message_bytes < 1024 || s.max_message_bytes > 256 * 1024 * 1024 {
            return Err(Error::invalid(
                "server.max_message_bytes",
                format!("{} is not in 1 KiB..=256 MiB", s.max_message_bytes),
            ));
        }
        if !(s.max_fps.is_finite() && s.max_fps > 0.0 && s.max_fps <= 1000.0) {
            return Err(Error::invalid("server.max_fps", format!("{} is not in (0, 1000]", s.max_fps)));
        }
        if !(1..=100).contains(&s.jpeg_quality) {
            return Err(Error::invalid(
                "server.jpeg_quality",
                format!("{} is not in 1..=100", s.jpeg_quality),
            ));
        }
        if s.idle_timeout_s == 0 {
            return Err(Error::invalid("server.idle_timeout_s", "must be at least 1"));
        }
        for (name, v) in [
            ("server.max_connections", s.max_connections),
            ("server.max_viewers", s.max_viewers),
            ("server.max_requests", s.max_requests),
        ] {
            if v == 0 || v > 65536 {
                return Err(Error::invalid(name, format!("{v} is not in 1..=65536")));
            }
        }
        for (name, v) in [
            ("server.header_timeout_s", s.header_timeout_s),
            ("server.request_timeout_s", s.request_timeout_s),
        ] {
            if v == 0 || v > 3600 {
                return Err(Error::invalid(name, format!("{v} is not in 1..=3600")));
            }
        }
        if let Some(n) = s.max_streams_per_engine.filter(|n| *n == 0 || *n > 1024) {
            return Err(Error::invalid("server.max_streams_per_engine", format!("{n} is not in 1..=1024")));
        }
        if s.engine_stall_s == 0 || s.engine_stall_s > 3600 {
            return Err(Error::invalid(
                "server.engine_stall_s",
                format!("{} is not in 1..=3600", s.engine_stall_s),
            ));
        }
        if self.model.devices.iter().any(|d| d.trim().is_empty()) {
            return Err(Error::invalid(
                "model.devices",
                "an empty device name (expected cpu, cuda, cuda:N or auto)",
            ));
        }
        if let Some(h) = s.allowed_hosts.iter().find(|h| h.is_empty() || h.contains(['/', ' ', '@'])) {
            return Err(Error::invalid(
                "server.allowed_hosts",
                format!("`{h}` is not a host name (expected `name` or `name:port`)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = DaemonConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!c.model.model.is_empty(), "{}", path.display());
                n += 1;
            }
        }
        assert!(n >= 5, "only {n} configs found");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = toml::from_str::<DaemonConfig>("[server]\nlisten_port = 3").unwrap_err().to_string();
        assert!(e.contains("listen_port"), "{e}");
        let mut c = DaemonConfig::default();
        c.server.jpeg_quality = 0;
        assert!(c.validate().unwrap_err().to_string().contains("jpeg_quality"));
    }

    #[test]
    fn devices_replace_device_and_the_engine_limit_defaults_to_max_clients() {
        let c: DaemonConfig =
            toml::from_str("[model]\ndevice = \"cpu\"\ndevices = [\"cuda:0\", \"cuda:1\"]\n").unwrap();
        assert_eq!(c.model.device_list(), ["cuda:0", "cuda:1"]);
        let mut c = DaemonConfig::default();
        assert_eq!(c.model.device_list(), ["auto"]);
        assert_eq!(c.server.streams_per_engine(), c.server.max_clients);
        c.server.max_streams_per_engine = Some(3);
        assert_eq!(c.server.streams_per_engine(), 3);
        c.server.max_streams_per_engine = Some(0);
        assert!(c.validate().unwrap_err().to_string().contains("max_streams_per_engine"));
        c.server.max_streams_per_engine = None;
        c.model.devices = vec!["cpu".into(), " ".into()];
        assert!(c.validate().unwrap_err().to_string().contains("model.devices"));
    }
}
