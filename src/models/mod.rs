//! The Stable Diffusion model stack. Every module mirrors diffusers' parameter names so that official
//! safetensors load unchanged, and reads its shapes from the model's own config.json.
pub mod clip;
pub mod clip_vision;
pub mod controlnet;
pub mod hub;
pub mod ip_adapter;
pub mod loader;
pub mod lora;
pub mod nn;
pub mod resnet;
pub mod single_file;
pub mod stable_diffusion;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use weights::Weights;

use crate::error::{Error, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// Times a component's load for the log, leaving out the time spent downloading its files from the hub (the
/// download reports its own).
pub(crate) struct LoadTimer {
    t0: Instant,
    fetched0: Duration,
}

impl LoadTimer {
    pub(crate) fn start() -> Self {
        LoadTimer { t0: Instant::now(), fetched0: hub::fetch_time() }
    }

    /// Logs `loaded WHAT in N s`.
    pub(crate) fn done(self, what: &str) {
        let fetched = hub::fetch_time().saturating_sub(self.fetched0);
        let took = self.t0.elapsed().saturating_sub(fetched).as_secs_f64();
        if fetched < Duration::from_millis(50) {
            tracing::info!("loaded {what} in {took:.2} s");
        } else {
            tracing::info!("loaded {what} in {took:.2} s (after {:.1} s downloading)", fetched.as_secs_f64());
        }
    }
}

/// Reads a JSON config file (config.json, scheduler_config.json, ...) into `T`; a missing file, bad JSON or a
/// wrong field is an error naming the file and the field.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

/// A value that configs give either once for all blocks or as one entry per block
/// (`attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for each of `n` blocks; a list of the wrong length is an error naming `field`.
    pub fn per_block(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => {
                Err(Error::invalid(field, format!("has {} entries, the model has {n} blocks", v.len())))
            }
        }
    }
}

/// Whether a model folder is marked as a random-weight test model (a `README.md` or `TEST_MODEL` file saying
/// so at its root). Such models are named as test models wherever they appear.
pub fn is_test_model(root: &Path) -> bool {
    root.join("TEST_MODEL").exists()
        || std::fs::read_to_string(root.join("README.md"))
            .map(|s| s.to_ascii_lowercase().contains("random-weight test model"))
            .unwrap_or(false)
}
