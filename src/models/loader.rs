//! Finding and loading a diffusers-layout model: a local folder or a Hugging Face model id resolved through
//! the Hugging Face cache (downloading when online, with progress: see `models::hub`). Prefers
//! `*.fp16.safetensors` variants when loading in fp16.
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tch::Kind;

/// Where a model's files are: a folder laid out as diffusers saves pipelines (model_index.json, unet/, vae/,
/// text_encoder/, tokenizer/, scheduler/), or a single component folder (a TAESD or VAE folder).
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// What the user named: a path or a model id.
    pub spec: String,
    /// The local folder holding the files (for a hub id: the snapshot folder in hf-hub's cache).
    pub root: PathBuf,
    hub_id: Option<String>,
}

/// The files every pipeline folder has, fetched first for a hub id (the others are fetched as they are needed,
/// optional ones only where they exist).
const PIPELINE_FILES: &[&str] = &[
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
];

pub(crate) fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && *p != ".."
        })
        && !spec.starts_with('.')
}

impl ModelSource {
    /// Resolves `spec`: an existing folder is used as is; otherwise a `owner/name` model id is looked up in
    /// the hf-hub cache and downloaded where possible. `component_files` are the files to fetch for a hub id
    /// (defaults to a full pipeline's configs).
    pub fn resolve(spec: &str) -> Result<Self> {
        Self::resolve_with(spec, PIPELINE_FILES)
    }

    /// A local folder holding a model's configs, standing for `spec` (a single-file checkpoint's configs).
    pub fn local(spec: &str, root: PathBuf) -> Self {
        ModelSource { spec: spec.into(), root, hub_id: None }
    }

    /// Resolves a single-component folder (config.json + weights at its root), e.g. a TAESD.
    pub fn resolve_component(spec: &str) -> Result<Self> {
        Self::resolve_with(spec, &["config.json"])
    }

    fn resolve_with(spec: &str, files: &[&str]) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource { spec: spec.into(), root: path.to_path_buf(), hub_id: None });
        }
        if !looks_like_hub_id(spec) {
            return Err(Error::invalid(
                "model",
                format!("`{spec}` is neither a folder nor a Hugging Face model id (owner/name)"),
            ));
        }
        let mut root = None;
        for f in files {
            let p = hub_file(spec, f)?;
            if root.is_none() {
                let depth = f.split('/').count();
                root = p.ancestors().nth(depth).map(Path::to_path_buf);
            }
        }
        let root = root.ok_or_else(|| Error::invalid("model", format!("`{spec}`: no files resolved")))?;
        Ok(ModelSource { spec: spec.into(), root, hub_id: Some(spec.into()) })
    }

    /// Path of a file that must exist (fetched from the hub for a model id).
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        let p = self.root.join(rel);
        if p.is_file() {
            return Ok(p);
        }
        match &self.hub_id {
            Some(id) => hub_file(id, rel),
            None => Err(Error::io(&p, std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"))),
        }
    }

    /// Whether an optional file exists (locally, or for a model id in the cache or on the hub).
    pub fn optional_file(&self, rel: &str) -> Option<PathBuf> {
        self.file(rel).ok()
    }

    /// The safetensors weight files of a component: `<dir>/<stem>.fp16.safetensors` first when loading in
    /// fp16 or bf16 and it exists, else `<dir>/<stem>.safetensors`, else a sharded `.safetensors.index.json`.
    pub fn weights(&self, dir: &str, stem: &str, kind: Kind) -> Result<Vec<PathBuf>> {
        let join = |name: String| if dir.is_empty() { name } else { format!("{dir}/{name}") };
        let mut candidates = Vec::new();
        if matches!(kind, Kind::Half | Kind::BFloat16) {
            candidates.push(join(format!("{stem}.fp16.safetensors")));
        }
        candidates.push(join(format!("{stem}.safetensors")));
        for c in &candidates {
            if let Some(p) = self.optional_file(c) {
                return Ok(vec![p]);
            }
        }
        let index = join(format!("{stem}.safetensors.index.json"));
        if let Some(p) = self.optional_file(&index) {
            return self.sharded(&p, dir);
        }
        let bin = join(format!("{stem}.bin"));
        if self.root.join(&bin).is_file() {
            return Err(Error::Unsupported(format!(
                "{}: only .safetensors weights are loaded (found a pickle .bin); convert it with diffusers' \
                 save_pretrained(safe_serialization=True)",
                self.root.join(bin).display()
            )));
        }
        Err(Error::io(
            self.root.join(&candidates[candidates.len() - 1]),
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        ))
    }

    fn sharded(&self, index: &Path, dir: &str) -> Result<Vec<PathBuf>> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let idx: Index = super::read_config(index)?;
        let mut names: Vec<&String> = idx.weight_map.values().collect();
        names.sort();
        names.dedup();
        names
            .iter()
            .map(|n| self.file(&if dir.is_empty() { n.to_string() } else { format!("{dir}/{n}") }))
            .collect()
    }
}

/// A file of a hub model: from the Hugging Face cache, else downloaded with progress (see [`super::hub`]).
pub(crate) fn hub_file(id: &str, rel: &str) -> Result<PathBuf> {
    super::hub::file(id, rel)
}

/// The `_class_name` a config names.
pub fn class_name(config: &Path) -> Result<Option<String>> {
    let v: serde_json::Value = super::read_config(config)?;
    Ok(v.get("_class_name").and_then(|c| c.as_str()).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("stabilityai/sd-turbo"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
    }
}
