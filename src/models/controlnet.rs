//! diffusers' `ControlNetModel` (diffusers/models/controlnets/controlnet.py) for SD 1.x / 2.x and SDXL UNets: a
//! copy of the UNet's encoder (conv_in, time embedding and SDXL's added embedding, down blocks, mid block) that
//! also reads a conditioning image
//! through `controlnet_cond_embedding`, and returns one residual per UNet skip connection plus one for the mid
//! block, each through a 1x1 "zero convolution" (`controlnet_down_blocks.*`, `controlnet_mid_block`).
//!
//! The down and mid blocks are the UNet's own ([`DownBlock`], [`MidBlock`]), planned by [`UNetConfig::plan`]
//! from the UNet config a ControlNet config implies ([`ControlNetConfig::unet_config`]).
use super::loader::ModelSource;
use super::unet::attention::CrossContext;
use super::unet::blocks::{DownBlock, MidBlock};
use super::unet::config::TransformerLayers;
use super::unet::embeddings::{batch_time_features, TimestepEmbedding};
use super::unet::model::{AddedTimeEmbedding, DownPath};
use super::unet::{AddedCond, ControlResiduals, UNetConfig};
use super::{read_config, OneOrMany, Weights};
use crate::error::{Error, Result};
use crate::models::nn::{Activation, Conv2d};
use serde::{Deserialize, Deserializer};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn null_false<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// `controlnet/config.json`: the arguments of diffusers' `ControlNetModel.__init__`, each with diffusers'
/// default. Unknown fields are ignored (as diffusers ignores them: a `time_cond_proj_dim` in a ControlNet
/// config builds nothing, and diffusers' ControlNet pipelines never pass the guidance embedding to it).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    pub in_channels: i64,
    pub conditioning_channels: i64,
    #[serde(deserialize_with = "null_false")]
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub cross_attention_dim: i64,
    pub transformer_layers_per_block: TransformerLayers,
    pub encoder_hid_dim: Option<i64>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: OneOrMany<i64>,
    pub num_attention_heads: Option<OneOrMany<i64>>,
    #[serde(deserialize_with = "null_false")]
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    #[serde(deserialize_with = "null_false")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// "rgb" or "bgr": the order of the conditioning image's channels the model was trained on.
    pub controlnet_conditioning_channel_order: String,
    pub conditioning_embedding_out_channels: Vec<i64>,
    #[serde(deserialize_with = "null_false")]
    pub global_pool_conditions: bool,
}

impl Default for ControlNetConfig {
    /// diffusers' defaults (those of `ControlNetModel.__init__`).
    fn default() -> Self {
        let u = UNetConfig::default();
        ControlNetConfig {
            in_channels: 4,
            conditioning_channels: 3,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: u.down_block_types,
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: TransformerLayers::One(1),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            projection_class_embeddings_input_dim: None,
            controlnet_conditioning_channel_order: "rgb".into(),
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            global_pool_conditions: false,
        }
    }
}

fn unsupported(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("controlnet config `{field}`: {msg}"))
}

impl ControlNetConfig {
    /// Reads `controlnet/config.json` (or a standalone ControlNet's `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_config(path.as_ref())
    }

    /// The UNet config whose encoder half this ControlNet copies: same blocks, heads, widths and time
    /// embedding (diffusers' ControlNet has no `time_embedding_dim`, post activation or guidance embedding).
    /// The up path is the mirror of the down path; it is only planned, never built. Refuses what is not
    /// supported, naming the ControlNet config's field.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        if let Some(t) = self.addition_embed_type.as_deref().filter(|t| *t != "text_time") {
            return Err(unsupported(
                "addition_embed_type",
                format!("{t:?}: only SDXL's \"text_time\" added embedding is supported"),
            ));
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(unsupported(
                "mid_block_type",
                format!("{:?} (only \"UNetMidBlock2DCrossAttn\" is supported)", self.mid_block_type),
            ));
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            return Err(Error::invalid(
                "controlnet config `conditioning_embedding_out_channels`",
                "is empty",
            ));
        }
        if let Some(x) = self
            .conditioning_embedding_out_channels
            .iter()
            .chain([&self.conditioning_channels])
            .find(|&&x| x <= 0)
        {
            return Err(Error::invalid(
                "controlnet config `conditioning_embedding_out_channels`",
                format!("has a non-positive entry {x}"),
            ));
        }
        match self.controlnet_conditioning_channel_order.as_str() {
            "rgb" | "bgr" => {}
            other => {
                return Err(unsupported(
                    "controlnet_conditioning_channel_order",
                    format!("{other:?} (\"rgb\" or \"bgr\")"),
                ))
            }
        }
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`, and the blocks take
        // their head count from it; the UNet config carries head counts in `attention_head_dim`.
        let heads = self.num_attention_heads.clone().unwrap_or_else(|| self.attention_head_dim.clone());
        let up_block_types = self
            .down_block_types
            .iter()
            .rev()
            .map(|t| t.replace("DownBlock2D", "UpBlock2D"))
            .collect::<Vec<_>>();
        let c = UNetConfig {
            in_channels: self.in_channels,
            out_channels: self.in_channels,
            center_input_sample: false,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: self.mid_block_type.clone(),
            up_block_types,
            only_cross_attention: self.only_cross_attention.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: OneOrMany::One(self.layers_per_block),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            act_fn: self.act_fn.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: OneOrMany::One(self.cross_attention_dim),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: self.encoder_hid_dim_type.clone(),
            attention_head_dim: heads,
            num_attention_heads: None,
            use_linear_projection: self.use_linear_projection,
            class_embed_type: self.class_embed_type.clone(),
            addition_embed_type: self.addition_embed_type.clone(),
            addition_time_embed_dim: self.addition_time_embed_dim,
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
            resnet_time_scale_shift: self.resnet_time_scale_shift.clone(),
            projection_class_embeddings_input_dim: self.projection_class_embeddings_input_dim,
            ..UNetConfig::default()
        };
        c.plan().map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(m.replacen("unet config", "controlnet config", 1)),
            Error::InvalidArgument { what, msg } => {
                Error::InvalidArgument { what: what.replacen("unet config", "controlnet config", 1), msg }
            }
            e => e,
        })?;
        Ok(c)
    }

    /// Checks that this ControlNet fits a UNet: same latent channels, cross-attention width and encoder
    /// structure (the residuals must match the UNet's skip connections in number and shape).
    pub fn check_fits(&self, unet: &UNetConfig) -> Result<()> {
        let mine = self.unet_config()?.plan()?;
        let theirs = unet.plan()?;
        let cross = theirs.down.first().map(|b| b.cross_attention_dim).unwrap_or(0);
        if cross != self.cross_attention_dim {
            return Err(Error::invalid(
                "controlnet",
                format!(
                    "its cross_attention_dim is {}, the model's UNet (and text encoder) use {cross}: the \
                     ControlNet was made for another model family (e.g. SD 1.5 vs SD 2.1)",
                    self.cross_attention_dim
                ),
            ));
        }
        if self.addition_embed_type != unet.addition_embed_type
            || self.projection_class_embeddings_input_dim != unet.projection_class_embeddings_input_dim
        {
            return Err(Error::invalid(
                "controlnet",
                format!(
                    "its added embedding ({:?}, input width {:?}) differs from the UNet's ({:?}, {:?}): an SDXL \
                     ControlNet needs an SDXL model and the other way round",
                    self.addition_embed_type,
                    self.projection_class_embeddings_input_dim,
                    unet.addition_embed_type,
                    unet.projection_class_embeddings_input_dim
                ),
            ));
        }
        if self.in_channels != unet.in_channels {
            return Err(Error::invalid(
                "controlnet",
                format!("in_channels {} vs the UNet's {}", self.in_channels, unet.in_channels),
            ));
        }
        let shape = |p: &super::unet::config::UNetPlan| {
            p.down.iter().map(|b| (b.out_channels, b.num_layers, b.add_sampler)).collect::<Vec<_>>()
        };
        if shape(&mine) != shape(&theirs) || unet.block_out_channels != self.block_out_channels {
            return Err(Error::invalid(
                "controlnet",
                format!(
                    "its down blocks (block_out_channels {:?}, layers_per_block {}) do not match the UNet's \
                     (block_out_channels {:?}): the residuals would not fit the UNet's skip connections",
                    self.block_out_channels, self.layers_per_block, unet.block_out_channels
                ),
            ));
        }
        Ok(())
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: conv_in, then pairs of convs (the second of each pair with
/// stride 2), SiLU after each, and conv_out to the UNet's first block width.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(w: &Weights, in_ch: i64, channels: &[i64], out_ch: i64) -> Result<Self> {
        let conv_in = Conv2d::new(&w.sub("conv_in"), in_ch, channels[0], 3, 1, 1, true)?;
        let mut blocks = Vec::new();
        for (i, pair) in channels.windows(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            blocks.push(Conv2d::new(&w.sub("blocks").sub(2 * i), a, a, 3, 1, 1, true)?);
            blocks.push(Conv2d::new(&w.sub("blocks").sub(2 * i + 1), a, b, 3, 2, 1, true)?);
        }
        let last = channels[channels.len() - 1];
        let conv_out = Conv2d::new(&w.sub("conv_out"), last, out_ch, 3, 1, 1, true)?;
        Ok(ConditioningEmbedding { conv_in, blocks, conv_out })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?.f_silu()?;
        for b in &self.blocks {
            h = b.forward(&h)?.f_silu()?;
        }
        self.conv_out.forward(&h)
    }

    /// How many times the embedding halves the image's sides.
    fn downscale_factor(&self) -> i64 {
        1 << (self.blocks.len() / 2)
    }
}

/// How the residuals are scaled: diffusers' `conditioning_scale` (one for the batch, or one per batch item
/// for a stream batch that mixes clients) and `guess_mode`.
#[derive(Debug, Clone, Copy)]
pub enum ControlScale<'a> {
    One(f64),
    PerItem(&'a [f64]),
}

/// diffusers' `ControlNetModel`, loaded by its parameter names.
#[derive(Debug)]
pub struct ControlNetModel {
    config: ControlNetConfig,
    unet_config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    /// SDXL ControlNets: the `text_time` added embedding, as in the UNet.
    add_embedding: Option<AddedTimeEmbedding>,
    cond_embedding: ConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    zero_down: Vec<Conv2d>,
    zero_mid: Conv2d,
}

impl ControlNetModel {
    /// Builds the model from `w` (the ControlNet's weights, names without prefix).
    pub fn new(w: &Weights, config: &ControlNetConfig) -> Result<Self> {
        let unet_config = config.unet_config()?;
        let plan = unet_config.plan()?;
        let ch = &config.block_out_channels;
        let act = Activation::parse(&config.act_fn)?;
        let conv_in = Conv2d::new(&w.sub("conv_in"), config.in_channels, ch[0], 3, 1, 1, true)?;
        let time_embedding =
            TimestepEmbedding::new(&w.sub("time_embedding"), ch[0], plan.time_embed_dim, act, None, None)?;
        let add_embedding = AddedTimeEmbedding::new(w, &unet_config, plan.time_embed_dim)?;
        let cond_embedding = ConditioningEmbedding::new(
            &w.sub("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            ch[0],
        )?;
        let path = DownPath::new(w, &unet_config, &plan, act)?;
        let down_blocks = path.down_blocks;
        let mid_block = path.mid_block.ok_or_else(|| unsupported("mid_block_type", "null"))?;
        // One zero conv per skip connection: conv_in's output, every resnet of every block, every downsampler.
        let mut widths = vec![ch[0]];
        for p in &plan.down {
            widths.extend(std::iter::repeat_n(p.out_channels, p.num_layers as usize));
            if p.add_sampler {
                widths.push(p.out_channels);
            }
        }
        let zero_down = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| Conv2d::new(&w.sub("controlnet_down_blocks").sub(i), c, c, 1, 1, 0, true))
            .collect::<Result<Vec<_>>>()?;
        let last = ch[ch.len() - 1];
        let zero_mid = Conv2d::new(&w.sub("controlnet_mid_block"), last, last, 1, 1, 0, true)?;
        Ok(ControlNetModel {
            config: config.clone(),
            unet_config,
            conv_in,
            time_embedding,
            add_embedding,
            cond_embedding,
            down_blocks,
            mid_block,
            zero_down,
            zero_mid,
        })
    }

    /// Loads a ControlNet from a folder (or hub id) holding `config.json` and
    /// `diffusion_pytorch_model[.fp16].safetensors`; a pipeline-style folder with a `controlnet/` subfolder
    /// works too.
    pub fn load(spec: &str, device: Device, kind: Kind) -> Result<Self> {
        let src = ModelSource::resolve_component(spec).or_else(|e| {
            // A pipeline-style folder that keeps the ControlNet in controlnet/.
            let sub = Path::new(spec).join("controlnet");
            if sub.join("config.json").is_file() {
                ModelSource::resolve_component(&sub.display().to_string())
            } else {
                Err(e)
            }
        })?;
        let dir = if src.root.join("config.json").is_file() || !src.root.join("controlnet").is_dir() {
            ""
        } else {
            "controlnet"
        };
        let rel = |f: &str| if dir.is_empty() { f.to_string() } else { format!("{dir}/{f}") };
        let config_path = src.file(&rel("config.json"))?;
        if let Some(class) = super::loader::class_name(&config_path)? {
            if class != "ControlNetModel" {
                return Err(Error::config(
                    config_path,
                    format!(
                        "is a `{class}`, not a `ControlNetModel` (pass a ControlNet folder to --controlnet)"
                    ),
                ));
            }
        }
        let config = ControlNetConfig::from_file(&config_path)?;
        let w = Weights::from_safetensors(&src.weights(dir, "diffusion_pytorch_model", kind)?, device, kind)?;
        let model = ControlNetModel::new(&w, &config)?;
        let unused = w.unused();
        if !unused.is_empty() {
            tracing::warn!(
                "controlnet {spec}: {} stored tensors were not used, e.g. {}",
                unused.len(),
                unused[0]
            );
        }
        Ok(model)
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The UNet config implied by this ControlNet (its encoder half).
    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet_config
    }

    /// Whether diffusers' pipelines run this model in guess mode whatever the caller asks
    /// (`global_pool_conditions`).
    pub fn forces_guess_mode(&self) -> bool {
        self.config.global_pool_conditions
    }

    /// Pixels of the conditioning image per latent along each side (8 for SD ControlNets).
    pub fn cond_downscale_factor(&self) -> i64 {
        self.cond_embedding.downscale_factor()
    }

    /// The residuals for `sample` (B, in_channels, h, w) at `timesteps` ((B,) or one for all), with text
    /// embeddings `encoder_hidden_states` (B, tokens, cross_attention_dim) and the conditioning image
    /// `cond` (B, conditioning_channels, h * 8, w * 8), RGB in [0, 1] (flipped to BGR here for "bgr" models);
    /// `added`: SDXL's pooled text and time ids, for SDXL ControlNets only.
    #[allow(clippy::too_many_arguments)] // diffusers' ControlNetModel.forward inputs, one by one
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
        cond: &Tensor,
        scale: ControlScale,
        guess_mode: bool,
    ) -> Result<ControlResiduals> {
        let (batch, _, height, width) = sample.size4()?;
        let (cb, cc, ch, cw) = cond.size4()?;
        let f = self.cond_downscale_factor();
        if cb != batch || cc != self.config.conditioning_channels || ch != height * f || cw != width * f {
            return Err(Error::invalid(
                "control image",
                format!(
                    "shape [{cb}, {cc}, {ch}, {cw}], the ControlNet expects [{batch}, {}, {}, {}] for latents \
                     of {height}x{width}",
                    self.config.conditioning_channels,
                    height * f,
                    width * f
                ),
            ));
        }
        let kind = sample.f_kind()?;
        let cond = match self.config.controlnet_conditioning_channel_order.as_str() {
            "bgr" => cond.f_flip([1])?,
            _ => cond.shallow_clone(),
        };
        let cond = cond.f_to_kind(kind)?;

        let c = &self.config;
        let emb = batch_time_features(
            &timesteps.f_to_device(sample.device())?,
            batch,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
        )?
        .f_to_kind(kind)?;
        let emb = self.time_embedding.forward(&emb, None)?;
        let emb = AddedTimeEmbedding::apply(self.add_embedding.as_ref(), emb, added, "ControlNet")?;

        let mut h = self.conv_in.forward(sample)?;
        h = h.f_add(&self.cond_embedding.forward(&cond)?)?;
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &emb, CrossContext::text(encoder_hidden_states), &mut skips)?;
        }
        h = self.mid_block.forward(&h, &emb, CrossContext::text(encoder_hidden_states))?;

        let mut down =
            skips.iter().zip(&self.zero_down).map(|(s, c)| c.forward(s)).collect::<Result<Vec<_>>>()?;
        let mut mid = self.zero_mid.forward(&h)?;

        let device = sample.device();
        let per_item = |s: &[f64]| -> Result<Tensor> {
            if s.len() as i64 != batch {
                return Err(Error::invalid(
                    "controlnet scale",
                    format!("{} scales for a batch of {batch}", s.len()),
                ));
            }
            Ok(Tensor::f_from_slice(s)?
                .f_to_kind(Kind::Float)?
                .f_to_device(device)?
                .f_view([batch, 1, 1, 1])?)
        };
        if guess_mode && !self.config.global_pool_conditions {
            // diffusers: scales = logspace(-1, 0, n + 1) * conditioning_scale, from 0.1 (first residual)
            // to 1.0 (the mid block's).
            let count = down.len() as i64 + 1;
            let logs = Tensor::f_logspace(-1.0, 0.0, count, 10.0, (Kind::Float, device))?;
            let scales: Vec<Tensor> = match scale {
                ControlScale::One(s) => {
                    let logs = logs.f_mul_scalar(s)?;
                    (0..count).map(|i| logs.f_get(i)).collect::<std::result::Result<_, _>>()?
                }
                ControlScale::PerItem(s) => {
                    let s = per_item(s)?;
                    (0..count).map(|i| s.f_mul(&logs.f_get(i)?)).collect::<std::result::Result<_, _>>()?
                }
            };
            for (d, s) in down.iter_mut().zip(&scales) {
                *d = d.f_mul(s)?;
            }
            mid = mid.f_mul(&scales[scales.len() - 1])?;
        } else {
            match scale {
                ControlScale::One(s) => {
                    for d in down.iter_mut() {
                        *d = d.f_mul_scalar(s)?;
                    }
                    mid = mid.f_mul_scalar(s)?;
                }
                ControlScale::PerItem(s) => {
                    let s = per_item(s)?;
                    for d in down.iter_mut() {
                        *d = d.f_mul(&s)?;
                    }
                    mid = mid.f_mul(&s)?;
                }
            }
        }
        if self.config.global_pool_conditions {
            for d in down.iter_mut() {
                *d = d.f_mean_dim([2i64, 3].as_slice(), true, None)?;
            }
            mid = mid.f_mean_dim([2i64, 3].as_slice(), true, None)?;
        }
        Ok(ControlResiduals { down, mid })
    }
}

/// The number of parameters the ControlNet built from `config` has (no memory is allocated for them).
pub fn parameter_count(config: &ControlNetConfig) -> Result<i64> {
    let w = Weights::shapes_only(Kind::Float);
    ControlNetModel::new(&w, config)?;
    Ok(w.requested_parameter_count())
}
