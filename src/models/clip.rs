//! The CLIP text encoder, mirroring transformers' `CLIPTextModel` (`models/clip/modeling_clip.py`:
//! `CLIPTextEmbeddings`, `CLIPAttention`, `CLIPMLP`, `CLIPEncoderLayer`, `CLIPTextTransformer`) with its
//! parameter names, so `text_encoder/model.safetensors` loads unchanged.
//!
//! SD 2.x's "penultimate layer" needs nothing special: its text encoder config simply has 23 layers.
//!
//! Weights files come in two key layouts (see [`ClipKeyLayout`]): with transformers' `text_model.` level
//! (transformers 4, the hub's checkpoints) or without it (transformers 5's `CLIPTextModel`). [`ClipTextModel::load`]
//! decides the layout once from the file's keys and reads either under the `text_model.*` names, so everything
//! downstream (LoRA targeting by name, unused-tensor reports) sees one layout.
use super::nn::{Activation, Embedding, LayerNorm, Linear};
use super::weights::{stored_shapes, Weights};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The token embedding's name in the nested layout, which decides a file's layout.
const NESTED_PROBE: &str = "text_model.embeddings.token_embedding.weight";
/// The same tensor in the flat layout.
const FLAT_PROBE: &str = "embeddings.token_embedding.weight";

/// How a text encoder's weights file names its tensors. `text_projection.weight` (`CLIPTextModelWithProjection`)
/// is at the top level in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipKeyLayout {
    /// `text_model.embeddings.*`, `text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`: what
    /// transformers 4 writes for both classes (every SD checkpoint on the hub), and the names the modules ask
    /// for.
    Nested,
    /// `embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`: what transformers 5 writes for
    /// `CLIPTextModel` (which has no `text_model` submodule there).
    Flat,
}

impl ClipKeyLayout {
    /// The layout of a file holding the tensors `names`, decided by where the token embedding is (nested when
    /// both are present); `None` when it is in neither place.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut flat = false;
        for n in names {
            if n == NESTED_PROBE {
                return Some(ClipKeyLayout::Nested);
            }
            flat |= n == FLAT_PROBE;
        }
        flat.then_some(ClipKeyLayout::Flat)
    }

    /// The name the modules ask for (the nested layout's) of the stored tensor `stored`.
    pub fn canonical_name(self, stored: &str) -> String {
        match self {
            ClipKeyLayout::Flat if !stored.starts_with("text_projection.") => format!("text_model.{stored}"),
            _ => stored.to_string(),
        }
    }

    /// How errors describe the layout.
    pub fn describe(self) -> &'static str {
        match self {
            ClipKeyLayout::Nested => "`text_model.*` key layout (transformers 4)",
            ClipKeyLayout::Flat => "stored without the `text_model.` prefix (transformers 5)",
        }
    }
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`); absent fields take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (only read for `CLIPTextModelWithProjection`).
    pub projection_dim: i64,
    /// Picks the pooled token: transformers takes the highest id's position when this is 2 (older configs,
    /// as SDXL's), otherwise the first position holding this id.
    pub eos_token_id: i64,
    /// `["CLIPTextModelWithProjection"]` for SDXL's second text encoder (pooled output + projection).
    pub architectures: Vec<String>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            eos_token_id: 2,
            architectures: Vec::new(),
        }
    }
}

/// `CLIPTextEmbeddings`: token embedding plus learned absolute position embedding.
#[derive(Debug)]
struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
    max_positions: i64,
}

impl ClipTextEmbeddings {
    fn new(w: &Weights, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(ClipTextEmbeddings {
            token_embedding: Embedding::new(&w.sub("token_embedding"), cfg.vocab_size, cfg.hidden_size)?,
            position_embedding: Embedding::new(
                &w.sub("position_embedding"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
            )?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = *input_ids.size().last().unwrap_or(&0);
        if seq_len > self.max_positions {
            return Err(Error::invalid(
                "input_ids",
                format!("{seq_len} tokens, the text encoder has {} positions", self.max_positions),
            ));
        }
        let positions = Tensor::f_arange(seq_len, (Kind::Int64, input_ids.device()))?.f_unsqueeze(0)?;
        let tokens = self.token_embedding.forward(input_ids)?;
        Ok(tokens.f_add(&self.position_embedding.forward(&positions)?)?)
    }
}

/// The widths of one CLIP encoder layer; the text and the vision transformer share the layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerDims {
    pub hidden: i64,
    pub intermediate: i64,
    pub heads: i64,
    pub act: Activation,
    pub eps: f64,
    /// The text model's causal mask; the vision model attends to every token.
    pub causal: bool,
}

impl LayerDims {
    fn text(cfg: &ClipTextConfig) -> Result<Self> {
        Ok(LayerDims {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            act: Activation::parse(&cfg.hidden_act)?,
            eps: cfg.layer_norm_eps,
            causal: true,
        })
    }
}

/// `CLIPAttention`: multi-head self-attention, causal in the text model.
#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
    head_dim: i64,
    causal: bool,
}

impl ClipAttention {
    fn new(w: &Weights, dims: &LayerDims) -> Result<Self> {
        let d = dims.hidden;
        Ok(ClipAttention {
            q_proj: Linear::new(&w.sub("q_proj"), d, d, true)?,
            k_proj: Linear::new(&w.sub("k_proj"), d, d, true)?,
            v_proj: Linear::new(&w.sub("v_proj"), d, d, true)?,
            out_proj: Linear::new(&w.sub("out_proj"), d, d, true)?,
            heads: dims.heads,
            head_dim: d / dims.heads,
            causal: dims.causal,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.size3()?;
        let split = |p: &Linear| -> Result<Tensor> {
            Ok(p.forward(x)?.f_view([b, t, self.heads, self.head_dim])?.f_transpose(1, 2)?)
        };
        let (q, k, v) = (split(&self.q_proj)?, split(&self.k_proj)?, split(&self.v_proj)?);
        let scale = (self.head_dim as f64).powf(-0.5);
        let o = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            self.causal,
            Some(scale),
            false,
        )?;
        let o = o.f_transpose(1, 2)?.f_reshape([b, t, c])?;
        self.out_proj.forward(&o)
    }
}

/// `CLIPMLP`: fc1, activation, fc2.
#[derive(Debug)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    fn new(w: &Weights, dims: &LayerDims) -> Result<Self> {
        Ok(ClipMlp {
            fc1: Linear::new(&w.sub("fc1"), dims.hidden, dims.intermediate, true)?,
            fc2: Linear::new(&w.sub("fc2"), dims.intermediate, dims.hidden, true)?,
            act: dims.act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug)]
pub(crate) struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub(crate) fn new(w: &Weights, dims: &LayerDims) -> Result<Self> {
        Ok(ClipEncoderLayer {
            self_attn: ClipAttention::new(&w.sub("self_attn"), dims)?,
            layer_norm1: LayerNorm::new(&w.sub("layer_norm1"), dims.hidden, dims.eps)?,
            mlp: ClipMlp::new(&w.sub("mlp"), dims)?,
            layer_norm2: LayerNorm::new(&w.sub("layer_norm2"), dims.hidden, dims.eps)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.f_add(&self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        Ok(h.f_add(&self.mlp.forward(&self.layer_norm2.forward(&h)?)?)?)
    }
}

/// transformers' `CLIPTextModel` (its `text_model`, a `CLIPTextTransformer`), or `CLIPTextModelWithProjection`
/// (SDXL's second text encoder: adds `text_projection` of the pooled output) when the config names it.
#[derive(Debug)]
pub struct ClipTextModel {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads a text encoder's safetensors files (`text_encoder/model.safetensors`, or its shards) in either key
    /// layout ([`ClipKeyLayout`], decided once from the files' keys), and gives the weight store with it, whose
    /// names are the nested layout's either way. Files in neither layout are an error naming both probes.
    pub fn load<P: AsRef<Path>>(
        paths: &[P],
        cfg: ClipTextConfig,
        device: Device,
        kind: Kind,
    ) -> Result<(Self, Weights)> {
        let mut names = Vec::new();
        for p in paths {
            names.extend(stored_shapes(p.as_ref())?.into_keys());
        }
        let files = paths.iter().map(|p| p.as_ref().display().to_string()).collect::<Vec<_>>().join(", ");
        let layout = ClipKeyLayout::detect(names.iter().map(String::as_str)).ok_or_else(|| {
            Error::config(
                &files,
                format!(
                    "not a CLIP text encoder's weights: neither `{NESTED_PROBE}` (transformers 4 layout) nor \
                     `{FLAT_PROBE}` (transformers 5 layout, without `text_model.`) is there ({} tensors{})",
                    names.len(),
                    names.iter().min().map(|n| format!(", e.g. `{n}`")).unwrap_or_default()
                ),
            )
        })?;
        let w = match layout {
            ClipKeyLayout::Nested => Weights::from_safetensors(paths, device, kind)?,
            ClipKeyLayout::Flat => Weights::from_safetensors_renamed(
                paths,
                device,
                kind,
                |n| layout.canonical_name(n),
                layout.describe(),
            )?,
        };
        Ok((Self::new(&w, cfg)?, w))
    }

    /// Loads the weights under `text_model.` (the `position_ids` buffer some checkpoints carry is marked used):
    /// a store in the nested layout (a file in either layout: [`ClipTextModel::load`]).
    pub fn new(w: &Weights, cfg: ClipTextConfig) -> Result<Self> {
        if cfg.num_attention_heads <= 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(Error::Model(format!(
                "text encoder: hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let tm = w.sub("text_model");
        let emb = tm.sub("embeddings");
        // A non-persistent buffer in transformers; older checkpoints store it. Read it (as used), ignore it.
        if let Some(shape) = emb.shape_of("position_ids") {
            let _ = emb.get_kind("position_ids", &shape, Kind::Int64)?;
        }
        let embeddings = ClipTextEmbeddings::new(&emb, &cfg)?;
        let lw = tm.sub("encoder").sub("layers");
        let dims = LayerDims::text(&cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&lw.sub(i), &dims))
            .collect::<Result<_>>()?;
        let final_layer_norm =
            LayerNorm::new(&tm.sub("final_layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?;
        let text_projection = if cfg.architectures.iter().any(|a| a == "CLIPTextModelWithProjection") {
            Some(Linear::new(&w.sub("text_projection"), cfg.hidden_size, cfg.projection_dim, false)?)
        } else {
            None
        };
        Ok(ClipTextModel { embeddings, layers, final_layer_norm, text_projection, config: cfg })
    }

    /// Whether this is a `CLIPTextModelWithProjection` (it has a pooled, projected output).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// What SDXL's `encode_prompt` reads from one text encoder run with `output_hidden_states=True`:
    /// `hidden_states[-(k + 1)]` (no final layer norm; SDXL uses `k = clip_skip + 1`) and, for a
    /// `CLIPTextModelWithProjection`, `text_embeds` (the final-normed state at the end-of-text token, projected).
    pub fn hidden_and_pooled(&self, input_ids: &Tensor, k: usize) -> Result<(Tensor, Option<Tensor>)> {
        let Some(projection) = &self.text_projection else {
            return Ok((self.hidden_state(input_ids, k)?, None));
        };
        if input_ids.dim() != 2 {
            return Err(Error::invalid(
                "input_ids",
                format!("shape {:?}, expected (batch, tokens)", input_ids.size()),
            ));
        }
        let n = self.layers.len();
        if k > n {
            return Err(Error::invalid(
                "clip_skip",
                format!("{k} skips more than the text encoder's {n} layers"),
            ));
        }
        let ids = input_ids.f_to_kind(Kind::Int64)?.f_to_device(self.final_layer_norm.weight.device())?;
        let mut h = self.embeddings.forward(&ids)?;
        let mut kept = if k == n { Some(h.shallow_clone()) } else { None };
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 == n - k {
                kept = Some(h.shallow_clone());
            }
        }
        let last = self.final_layer_norm.forward(&h)?;
        let eos = if self.config.eos_token_id == 2 {
            ids.f_argmax(-1, false)?
        } else {
            ids.f_eq(self.config.eos_token_id)?.f_to_kind(Kind::Int)?.f_argmax(-1, false)?
        };
        let rows = Tensor::f_arange(ids.size()[0], (Kind::Int64, ids.device()))?;
        let pooled = last.f_index(&[Some(rows), Some(eos)])?;
        let kept = kept.ok_or_else(|| Error::Model("text encoder: no hidden state kept".into()))?;
        Ok((kept, Some(projection.forward(&pooled)?)))
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `last_hidden_state` for `input_ids` (B, L) int64: (B, L, hidden_size), after the final layer norm.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_skip(input_ids, 0)
    }

    /// What diffusers' `encode_prompt(..., clip_skip=k)` gives: `hidden_states[-(k + 1)]` (the output of the
    /// last layer but `k`) passed through the final layer norm. `k = 0` is [`ClipTextModel::forward`].
    pub fn forward_with_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let h = self.hidden_state(input_ids, clip_skip)?;
        self.final_layer_norm.forward(&h)
    }

    /// `hidden_states[-(k + 1)]` of transformers' `output_hidden_states=True`, without the final layer norm:
    /// `k = 0` is the last layer's output, `k = num_hidden_layers` the embeddings.
    pub fn hidden_state(&self, input_ids: &Tensor, k: usize) -> Result<Tensor> {
        if k > self.layers.len() {
            return Err(Error::invalid(
                "clip_skip",
                format!("{k} skips more than the text encoder's {} layers", self.layers.len()),
            ));
        }
        if input_ids.dim() != 2 {
            return Err(Error::invalid(
                "input_ids",
                format!("shape {:?}, expected (batch, tokens)", input_ids.size()),
            ));
        }
        let ids = input_ids.f_to_kind(Kind::Int64)?.f_to_device(self.final_layer_norm.weight.device())?;
        let mut h = self.embeddings.forward(&ids)?;
        for layer in &self.layers[..self.layers.len() - k] {
            h = layer.forward(&h)?;
        }
        Ok(h)
    }
}
