//! The CLIP image encoder of IP-Adapter, mirroring transformers' `CLIPVisionModelWithProjection`
//! (`models/clip/modeling_clip.py`: `CLIPVisionEmbeddings`, `CLIPVisionTransformer`, the shared encoder layers of
//! [`super::clip`]) with its parameter names, and the image preprocessing of transformers' `CLIPImageProcessor`
//! (what diffusers' `load_ip_adapter` sets up when the pipeline has no feature extractor).
//!
//! Weights files name their tensors `vision_model.*` plus `visual_projection.weight` (transformers 4 and 5 both
//! write this for the class); files without the `vision_model.` level are read too.
use super::clip::{ClipEncoderLayer, LayerDims};
use super::nn::{Activation, Conv2d, Embedding, LayerNorm, Linear};
use super::weights::{stored_shapes, Weights};
use super::{read_config, LoadTimer};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// `image_encoder/config.json` (transformers' `CLIPVisionConfig`, or a `CLIPConfig` whose `vision_config` it
/// is); absent fields take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: i64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        ClipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

/// OpenAI CLIP's normalisation (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// transformers' `CLIPVisionModelWithProjection`: patch and position embeddings, `pre_layrnorm` (sic), the
/// encoder layers, `post_layernorm` of the class token and `visual_projection`.
#[derive(Debug)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    config: ClipVisionConfig,
    device: Device,
    kind: Kind,
}

impl ClipVisionModel {
    /// Loads an image encoder folder (`config.json` and `model.safetensors`, as `save_pretrained` writes them).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let timer = LoadTimer::start();
        let config_path = dir.join("config.json");
        let mut value: serde_json::Value = read_config(&config_path)?;
        // A full CLIPConfig keeps the vision tower's settings under `vision_config`.
        if let Some(v) = value.get_mut("vision_config") {
            value = v.take();
        }
        let config: ClipVisionConfig =
            serde_json::from_value(value).map_err(|e| Error::config(&config_path, e.to_string()))?;
        let file = dir.join("model.safetensors");
        if !file.is_file() {
            if dir.join("pytorch_model.bin").is_file() {
                return Err(Error::Unsupported(format!(
                    "{}: only .safetensors weights are loaded (found a pickle pytorch_model.bin); convert it with \
                     transformers' save_pretrained(safe_serialization=True)",
                    dir.display()
                )));
            }
            return Err(Error::io(
                &file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "image encoder weights not found"),
            ));
        }
        let names = stored_shapes(&file)?;
        let w = if names.keys().any(|n| n.starts_with("vision_model.")) {
            Weights::from_safetensors(&[&file], device, kind)?
        } else {
            Weights::from_safetensors_renamed(
                &[&file],
                device,
                kind,
                |n| {
                    if n.starts_with("visual_projection.") {
                        n.to_string()
                    } else {
                        format!("vision_model.{n}")
                    }
                },
                "stored without the `vision_model.` prefix",
            )?
        };
        let model = Self::new(&w, config)?;
        let unused: Vec<String> = w
            .unused()
            .into_iter()
            .filter(|n| !n.ends_with("position_ids") && !n.starts_with("text_"))
            .collect();
        if !unused.is_empty() {
            tracing::warn!(
                "image encoder: {} stored tensors were not used, e.g. {}",
                unused.len(),
                unused[0]
            );
        }
        timer.done(&format!("image encoder {}", dir.display()));
        Ok(model)
    }

    pub fn new(w: &Weights, config: ClipVisionConfig) -> Result<Self> {
        let c = &config;
        if c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(Error::Model(format!(
                "image encoder: hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if c.patch_size <= 0 || c.image_size % c.patch_size != 0 {
            return Err(Error::Model(format!(
                "image encoder: image_size {} is not a multiple of patch_size {}",
                c.image_size, c.patch_size
            )));
        }
        let vm = w.sub("vision_model");
        let emb = vm.sub("embeddings");
        let positions = (c.image_size / c.patch_size).pow(2) + 1;
        if let Some(shape) = emb.shape_of("position_ids") {
            let _ = emb.get_kind("position_ids", &shape, Kind::Int64)?;
        }
        let dims = LayerDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            act: Activation::parse(&c.hidden_act)?,
            eps: c.layer_norm_eps,
            causal: false,
        };
        let lw = vm.sub("encoder").sub("layers");
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&lw.sub(i), &dims))
            .collect::<Result<_>>()?;
        Ok(ClipVisionModel {
            class_embedding: emb.get("class_embedding", &[c.hidden_size])?,
            patch_embedding: Conv2d::new(
                &emb.sub("patch_embedding"),
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                c.patch_size,
                0,
                false,
            )?,
            position_embedding: Embedding::new(&emb.sub("position_embedding"), positions, c.hidden_size)?,
            pre_layrnorm: LayerNorm::new(&vm.sub("pre_layrnorm"), c.hidden_size, c.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::new(&vm.sub("post_layernorm"), c.hidden_size, c.layer_norm_eps)?,
            visual_projection: Linear::new(
                &w.sub("visual_projection"),
                c.hidden_size,
                c.projection_dim,
                false,
            )?,
            device: w.device(),
            kind: w.kind(),
            config,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// transformers' `CLIPImageProcessor` with diffusers' settings for IP-Adapter (`size` = `crop_size` = the
    /// encoder's `image_size`): the shortest side resized to `image_size` (PIL's bicubic, as the processor's PIL
    /// backend does), a centre crop, x / 255, OpenAI CLIP's mean and std. Gives (1, 3, S, S) in fp32 on the CPU.
    pub fn preprocess(&self, image: &image::RgbImage) -> Result<Tensor> {
        preprocess(image, self.config.image_size)
    }

    /// The hidden states after the embeddings (`hidden_states[0]`) and after each layer, for `pixels`
    /// (B, 3, S, S); `upto` layers are run.
    fn run(&self, pixels: &Tensor, upto: usize) -> Result<Tensor> {
        let c = &self.config;
        let size = pixels.size();
        if size.len() != 4 || size[1] != c.num_channels || size[2] != c.image_size || size[3] != c.image_size
        {
            return Err(Error::invalid(
                "image encoder input",
                format!(
                    "shape {size:?}, expected [B, {}, {}, {}]",
                    c.num_channels, c.image_size, c.image_size
                ),
            ));
        }
        let x = pixels.f_to_device(self.device)?.f_to_kind(self.kind)?;
        let b = size[0];
        let patches = self.patch_embedding.forward(&x)?.f_flatten(2, -1)?.f_transpose(1, 2)?;
        let class =
            self.class_embedding.f_view([1, 1, c.hidden_size])?.f_expand([b, 1, c.hidden_size], false)?;
        let tokens = Tensor::f_cat(&[class, patches], 1)?;
        let n = tokens.size()[1];
        let ids = Tensor::f_arange(n, (Kind::Int64, self.device))?.f_unsqueeze(0)?;
        let mut h = self.pre_layrnorm.forward(&tokens.f_add(&self.position_embedding.forward(&ids)?)?)?;
        for layer in &self.layers[..upto] {
            h = layer.forward(&h)?;
        }
        Ok(h)
    }

    /// `image_embeds`: the projected, post-layer-normed class token, (B, projection_dim). What the plain
    /// IP-Adapter projects.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        let h = self.run(pixels, self.layers.len())?;
        let pooled = self.post_layernorm.forward(&h.f_select(1, 0)?)?;
        self.visual_projection.forward(&pooled)
    }

    /// `hidden_states[-2]` of `output_hidden_states=True`: the output of the last layer but one, (B, tokens,
    /// hidden_size). What the "plus" IP-Adapters resample.
    pub fn penultimate(&self, pixels: &Tensor) -> Result<Tensor> {
        self.run(pixels, self.layers.len().saturating_sub(1))
    }

    /// `last_hidden_state`, (B, tokens, hidden_size).
    pub fn last_hidden_state(&self, pixels: &Tensor) -> Result<Tensor> {
        self.run(pixels, self.layers.len())
    }
}

/// See [`ClipVisionModel::preprocess`].
pub fn preprocess(image: &image::RgbImage, size: i64) -> Result<Tensor> {
    let (w, h) = (image.width() as i64, image.height() as i64);
    if w == 0 || h == 0 || size <= 0 {
        return Err(Error::invalid("image", format!("{w}x{h} cannot be resized to {size}")));
    }
    // transformers' get_resize_output_image_size(default_to_square=False): the short side becomes `size`, the
    // long side int(size * long / short).
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let scaled_long = (size as f64 * long as f64 / short as f64) as i64;
    let (nw, nh) = if w <= h { (size, scaled_long) } else { (scaled_long, size) };
    let resized = crate::io::image::resize_bicubic_pil(image, nw as u32, nh as u32);
    let top = (nh - size) / 2;
    let left = (nw - size) / 2;
    let raw = Tensor::f_from_data_size(resized.as_raw(), &[nh, nw, 3], Kind::Uint8)?;
    let crop = raw.f_narrow(0, top, size)?.f_narrow(1, left, size)?;
    // np_rescale multiplies in float64 and casts to float32; np_normalize then works in float32.
    let x = crop
        .f_permute([2, 0, 1])?
        .f_to_kind(Kind::Double)?
        .f_mul_scalar(1.0 / 255.0)?
        .f_to_kind(Kind::Float)?;
    let mean = Tensor::f_from_slice(&CLIP_MEAN)?.f_to_kind(Kind::Float)?.f_view([3, 1, 1])?;
    let std = Tensor::f_from_slice(&CLIP_STD)?.f_to_kind(Kind::Float)?.f_view([3, 1, 1])?;
    Ok(x.f_sub(&mean)?.f_div(&std)?.f_unsqueeze(0)?.f_contiguous()?)
}
