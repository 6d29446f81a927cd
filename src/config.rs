//! Daemon configuration files (configs/*.toml): the model, the server's limits and the default stream
//! settings. Command-line flags override any value.
use crate::error::{Error, Result};
use crate::stream::settings::StreamSettings;
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
            dtype: "fp16".into(),
            loras: Vec::new(),
            cuda_graphs: crate::graph::GraphMode::Auto,
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
    /// Synchronise the GPU around each stage so the per-stage timings in `frame`/`stats` are exact (costs a
    /// little speed); unset: on for the CPU, off for CUDA.
    pub measure_stages: Option<bool>,
    /// Let clients change the scale of the daemon's LoRAs with a `lora` message. The LoRAs are fused into the
    /// one model every stream shares, so a change shows in every client's output: off unless asked for.
    pub lora_control: bool,
}

impl ServerConfig {
    /// `listen` as a socket address; an error names the flag.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr> {
        self.listen
            .parse()
            .map_err(|e| Error::invalid("listen", format!("`{}`: {e} (expected IP:PORT)", self.listen)))
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
            measure_stages: None,
            lora_control: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    pub model: ModelConfig,
    pub server: ServerConfig,
    pub stream: StreamSettings,
}

impl DaemonConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: DaemonConfig = toml::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        config.validate().map_err(|e| Error::config(path, e.to_string()))?;
        Ok(config)
    }

    /// Checks the values a file or flags can get wrong.
    pub fn validate(&self) -> Result<()> {
        self.stream.validate()?;
        let s = &self.server;
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
}
