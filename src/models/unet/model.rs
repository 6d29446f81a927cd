//! diffusers' `UNet2DConditionModel` (diffusers/models/unets/unet_2d_condition.py) for SD 1.x/2.x and SDXL
//! configs (SD 1.5, SD 2.1, SD-Turbo, LCM, SDXL, SDXL-Turbo), with one timestep per batch item, and the
//! residuals a ControlNet adds.
use super::attention::{CrossContext, ImageContext, IpLayer, Transformer2DModel, TransformerSettings};
use super::blocks::{DownBlock, MidBlock, UpBlock};
use super::config::{UNetConfig, UNetPlan};
use super::embeddings::{batch_time_features, timestep_embedding, TimestepEmbedding};
use crate::error::{Error, Result};
use crate::models::nn::{Activation, Conv2d, GroupNorm};
use crate::models::resnet::ResnetSettings;
use crate::models::Weights;
use tch::{Kind, Tensor};

/// The denoising UNet, loaded by diffusers' parameter names (`conv_in`, `time_embedding.linear_1`,
/// `down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`, ...).
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    time_embed_act: Option<Activation>,
    /// SDXL's `text_time` added embedding: `add_time_proj` (sinusoidal, no weights) and `add_embedding`.
    add_embedding: Option<AddedTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    /// Every cross-attention, numbered in diffusers' `attn_processors` order (what IP-Adapters index).
    cross_layers: Vec<CrossAttentionLayer>,
}

/// One cross-attention of the UNet (an `attn2`), in diffusers' `attn_processors` order: the down blocks', then
/// the up blocks', then the mid block's.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossAttentionLayer {
    /// diffusers' module name, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub name: String,
    /// The attention's inner width (its queries').
    pub inner: i64,
    /// `"down"`, `"mid"` or `"up"`, the block index and the attention (`attentions.<i>`) within the block.
    pub part: &'static str,
    pub block: usize,
    pub attention: usize,
}

impl UNet2DConditionModel {
    /// Builds the model from `w` (the `unet` weights, names without prefix); the config is validated first.
    pub fn new(w: &Weights, config: &UNetConfig) -> Result<Self> {
        let plan = config.plan()?;
        let ch = &config.block_out_channels;
        let act = Activation::parse(&config.act_fn)?;
        let parse_opt = |a: &Option<String>| a.as_deref().map(Activation::parse).transpose();

        let conv_in = Conv2d::new(
            &w.sub("conv_in"),
            config.in_channels,
            ch[0],
            config.conv_in_kernel,
            1,
            (config.conv_in_kernel - 1) / 2,
            true,
        )?;
        let time_embedding = TimestepEmbedding::new(
            &w.sub("time_embedding"),
            ch[0],
            plan.time_embed_dim,
            act,
            parse_opt(&config.timestep_post_act)?,
            config.time_cond_proj_dim,
        )?;
        let add_embedding = AddedTimeEmbedding::new(w, config, plan.time_embed_dim)?;
        let DownPath { down_blocks, mid_block, resnet: r, transformer: t } =
            DownPath::new(w, config, &plan, act)?;
        let up_blocks = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, p)| UpBlock::new(&w.sub("up_blocks").sub(i), p, r, t))
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out =
            GroupNorm::new(&w.sub("conv_norm_out"), plan.norm_num_groups, ch[0], config.norm_eps)?;
        let conv_out = Conv2d::new(
            &w.sub("conv_out"),
            ch[0],
            config.out_channels,
            config.conv_out_kernel,
            1,
            (config.conv_out_kernel - 1) / 2,
            true,
        )?;
        let mut unet = UNet2DConditionModel {
            config: config.clone(),
            conv_in,
            time_embedding,
            time_embed_act: parse_opt(&config.time_embedding_act_fn)?,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: act,
            conv_out,
            cross_layers: Vec::new(),
        };
        unet.number_cross_attentions();
        Ok(unet)
    }

    /// Numbers every cross-attention in diffusers' `attn_processors` order (down, up, mid) and records them.
    fn number_cross_attentions(&mut self) {
        fn visit(
            layers: &mut Vec<CrossAttentionLayer>,
            part: &'static str,
            block: usize,
            prefix: String,
            ts: &mut [Transformer2DModel],
        ) {
            for (a, t) in ts.iter_mut().enumerate() {
                for (k, attn) in t.cross_attentions_mut().enumerate() {
                    attn.ip_index = Some(layers.len());
                    layers.push(CrossAttentionLayer {
                        name: format!("{prefix}.attentions.{a}.transformer_blocks.{k}.attn2"),
                        inner: attn.inner_dim(),
                        part,
                        block,
                        attention: a,
                    });
                }
            }
        }
        let mut layers = Vec::new();
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            visit(&mut layers, "down", i, format!("down_blocks.{i}"), b.transformers_mut());
        }
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            visit(&mut layers, "up", i, format!("up_blocks.{i}"), b.transformers_mut());
        }
        if let Some(m) = &mut self.mid_block {
            visit(&mut layers, "mid", 0, "mid_block".into(), m.transformers_mut());
        }
        self.cross_layers = layers;
    }

    /// Every cross-attention, in diffusers' `attn_processors` order.
    pub fn cross_attention_layers(&self) -> &[CrossAttentionLayer] {
        &self.cross_layers
    }

    /// The image side of the cross-attention for one call (checked against the batch and the UNet).
    fn image_context<'a>(&self, c: &'a ImageCond<'a>, batch: i64, kind: Kind) -> Result<ImageContext<'a>> {
        let n = self.cross_layers.len();
        if c.layers.len() != n {
            return Err(Error::invalid(
                "image conditioning",
                format!("keys and values for {} cross-attentions, the UNet has {n}", c.layers.len()),
            ));
        }
        let size = c.tokens.size();
        if size.len() != 3 || size[0] != batch || c.scales.len() as i64 != batch {
            return Err(Error::invalid(
                "image conditioning",
                format!(
                    "tokens of shape {size:?} and {} rows of scales for a batch of {batch}",
                    c.scales.len()
                ),
            ));
        }
        if let Some(r) = c.scales.iter().find(|r| r.len() != n) {
            return Err(Error::invalid(
                "image conditioning",
                format!("a row has {} scales, the UNet has {n} cross-attentions", r.len()),
            ));
        }
        // Layer-major: scales[j] is the (B, 1, 1) column of cross-attention j.
        let flat: Vec<f32> = (0..n).flat_map(|j| c.scales.iter().map(move |r| r[j] as f32)).collect();
        let device = c.tokens.device();
        let scales = crate::transfer::to_device(&Tensor::f_from_slice(&flat)?, device)?
            .f_to_kind(kind)?
            .f_view([n as i64, batch, 1, 1])?;
        let active = (0..n).map(|j| c.scales.iter().any(|r| r[j] != 0.0)).collect();
        Ok(ImageContext { layers: c.layers, tokens: c.tokens.f_to_kind(kind)?, scales, active })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Whether the model takes a `timestep_cond` (LCM's guidance-scale embedding, `time_cond_proj_dim`).
    pub fn takes_timestep_cond(&self) -> bool {
        self.time_embedding.has_cond_proj()
    }

    /// The width of the text states the first cross-attention block attends to (`cross_attention_dim`).
    pub fn cross_attention_width(&self) -> i64 {
        match &self.config.cross_attention_dim {
            crate::models::OneOrMany::One(d) => *d,
            crate::models::OneOrMany::Many(v) => v.first().copied().unwrap_or(0),
        }
    }

    /// Whether the model takes SDXL's added conditions (pooled text embeddings and time ids).
    pub fn takes_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// The predicted noise (or v / x0, per the model) for `sample` (B, in_channels, H, W).
    ///
    /// `timesteps` holds one timestep per batch item, shape (B,), int or float; a 0-d or one-element tensor
    /// is used for the whole batch. `encoder_hidden_states` is (B, tokens, cross_attention_dim);
    /// `timestep_cond` (B, time_cond_proj_dim) only for models with `time_cond_proj_dim`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let extra = UNetExtra { timestep_cond, ..Default::default() };
        self.forward_with(sample, timesteps, encoder_hidden_states, &extra)
    }

    /// [`Self::forward`] with every optional input: the guidance embedding, SDXL's added conditions, a
    /// ControlNet's residuals and an IP-Adapter's image tokens.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        extra: &UNetExtra,
    ) -> Result<Tensor> {
        let (batch, _, height, width) = sample.size4()?;
        let kind = sample.f_kind()?;

        // diffusers forwards explicit upsample sizes when the latent is not a multiple of the overall factor.
        let num_upsamplers = self.up_blocks.len().saturating_sub(1) as u32;
        let factor = 2i64.pow(num_upsamplers);
        let forward_upsample_size = height % factor != 0 || width % factor != 0;

        let sample = if self.config.center_input_sample {
            sample.f_mul_scalar(2)?.f_sub_scalar(1.0)?
        } else {
            sample.shallow_clone()
        };

        let c = &self.config;
        let t = timesteps.f_to_device(sample.device())?;
        let emb = batch_time_features(&t, batch, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?
            .f_to_kind(kind)?;
        let emb = self.time_embedding.forward(&emb, extra.timestep_cond)?;
        let emb = AddedTimeEmbedding::apply(self.add_embedding.as_ref(), emb, extra.added_cond, "UNet")?;
        let emb = match self.time_embed_act {
            Some(a) => a.forward(&emb)?,
            None => emb,
        };

        let image = extra.image.map(|c| self.image_context(c, batch, kind)).transpose()?;
        let ctx = CrossContext { text: encoder_hidden_states, image: image.as_ref() };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &emb, ctx, &mut skips)?;
        }
        if let Some(residuals) = &extra.control {
            if residuals.down.len() != skips.len() {
                return Err(Error::invalid(
                    "controlnet residuals",
                    format!(
                        "{} down residuals, the UNet has {} skip connections",
                        residuals.down.len(),
                        skips.len()
                    ),
                ));
            }
            for (skip, r) in skips.iter_mut().zip(&residuals.down) {
                *skip = skip.f_add(r)?;
            }
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, ctx)?;
        }
        if let Some(residuals) = &extra.control {
            h = h.f_add(&residuals.mid)?;
        }
        let mut upsample_size = None;
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            if i != last && forward_upsample_size {
                let rest = skips.len().checked_sub(block.num_skips() + 1);
                let next = rest.and_then(|j| skips.get(j)).ok_or_else(|| {
                    Error::Model("unet: fewer skip connections than the up blocks need".into())
                })?;
                let (_, _, sh, sw) = next.size4()?;
                upsample_size = Some([sh, sw]);
            }
            h = block.forward(&h, &emb, ctx, &mut skips, upsample_size)?;
        }

        h = self.conv_norm_out.forward(&h)?;
        h = self.conv_act.forward(&h)?;
        self.conv_out.forward(&h)
    }
}

/// SDXL's added conditions (`added_cond_kwargs`): the pooled output of the second text encoder and the
/// micro-conditioning time ids (original size, crop top-left, target size).
#[derive(Debug)]
pub struct AddedCond {
    /// (B, projection width).
    pub text_embeds: Tensor,
    /// (B, number of ids), usually 6.
    pub time_ids: Tensor,
}

/// What a ControlNet adds to the UNet: one residual per skip connection, and one to the mid block's output.
#[derive(Debug)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// The UNet's optional inputs.
#[derive(Debug, Default)]
pub struct UNetExtra<'a> {
    /// LCM's guidance embedding, (B, time_cond_proj_dim).
    pub timestep_cond: Option<&'a Tensor>,
    /// SDXL's pooled text embeddings and time ids.
    pub added_cond: Option<&'a AddedCond>,
    /// A ControlNet's residuals.
    pub control: Option<&'a ControlResiduals>,
    /// An IP-Adapter's image tokens and per-row scales.
    pub image: Option<&'a ImageCond<'a>>,
}

/// An IP-Adapter's input to one UNet call: one row of image tokens and one row of scales per batch item, so rows
/// with an image and rows without one (zero tokens, scale 0) share the call.
#[derive(Debug)]
pub struct ImageCond<'a> {
    /// The adapter's keys and values, one per cross-attention ([`UNet2DConditionModel::cross_attention_layers`]).
    pub layers: &'a [IpLayer],
    /// (B, tokens, cross_attention_dim).
    pub tokens: Tensor,
    /// Per row, one scale per cross-attention (see `models::ip_adapter::layer_scales`).
    pub scales: Vec<Vec<f64>>,
}

/// diffusers' `text_time` added embedding (SDXL's UNet and ControlNet): `add_time_proj` turns every time id
/// into `time_dim` sinusoidal features, which are concatenated after the pooled text embedding and fed to
/// `add_embedding`.
#[derive(Debug)]
pub(crate) struct AddedTimeEmbedding {
    time_dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    embedding: TimestepEmbedding,
}

impl AddedTimeEmbedding {
    /// Built when the config says `addition_embed_type = "text_time"` (already validated by its plan).
    pub fn new(w: &Weights, config: &UNetConfig, time_embed_dim: i64) -> Result<Option<Self>> {
        let (Some("text_time"), Some(time_dim), Some(in_dim)) = (
            config.addition_embed_type.as_deref(),
            config.addition_time_embed_dim,
            config.projection_class_embeddings_input_dim,
        ) else {
            return Ok(None);
        };
        let embedding = TimestepEmbedding::new(
            &w.sub("add_embedding"),
            in_dim,
            time_embed_dim,
            Activation::Silu,
            None,
            None,
        )?;
        Ok(Some(AddedTimeEmbedding {
            time_dim,
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
            embedding,
        }))
    }

    /// `emb` plus the added embedding of `added`; errors name what is missing or not expected.
    pub fn apply(this: Option<&Self>, emb: Tensor, added: Option<&AddedCond>, what: &str) -> Result<Tensor> {
        match (this, added) {
            (Some(add), Some(c)) => Ok(emb.f_add(&add.forward(c, emb.f_kind()?)?)?),
            (Some(_), None) => Err(Error::invalid(
                "added_cond",
                format!("this {what} (addition_embed_type \"text_time\", SDXL) needs pooled text embeddings and time ids"),
            )),
            (None, Some(_)) => Err(Error::invalid(
                "added_cond",
                format!("given, but this {what} has no added embedding (its config has no addition_embed_type)"),
            )),
            (None, None) => Ok(emb),
        }
    }

    fn forward(&self, c: &AddedCond, kind: Kind) -> Result<Tensor> {
        let batch = c.text_embeds.size().first().copied().unwrap_or(0);
        let ids = c.time_ids.f_flatten(0, -1)?;
        let t = timestep_embedding(&ids, self.time_dim, self.flip_sin_to_cos, self.freq_shift)?
            .f_reshape([batch, -1])?;
        let x = Tensor::f_cat(&[c.text_embeds.f_to_kind(Kind::Float)?, t], -1)?.f_to_kind(kind)?;
        self.embedding.forward(&x, None)
    }
}

/// The down path the UNet shares with diffusers' ControlNet: the down blocks and the mid block, and the resnet
/// and transformer settings they were built with.
pub(crate) struct DownPath {
    pub down_blocks: Vec<DownBlock>,
    /// `None` when the config has no mid block.
    pub mid_block: Option<MidBlock>,
    pub resnet: ResnetSettings,
    pub transformer: TransformerSettings,
}

impl DownPath {
    pub fn new(w: &Weights, config: &UNetConfig, plan: &UNetPlan, act: Activation) -> Result<Self> {
        let resnet = ResnetSettings {
            temb_channels: Some(plan.time_embed_dim),
            groups: plan.norm_num_groups,
            eps: config.norm_eps,
            act,
        };
        let transformer = TransformerSettings {
            groups: plan.norm_num_groups,
            use_linear_projection: config.use_linear_projection,
            // diffusers 0.42's scaled-dot-product attention path never reads `upcast_attention`: attention runs
            // in the model's dtype. Doing the same keeps fp16 parity and the fast half-precision kernels.
            upcast_attention: false,
        };
        let (r, t) = (resnet, transformer);
        let down_blocks = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, p)| DownBlock::new(&w.sub("down_blocks").sub(i), p, r, t, config.downsample_padding))
            .collect::<Result<Vec<_>>>()?;
        let mid_block = match &plan.mid {
            Some(p) => Some(MidBlock::new(&w.sub("mid_block"), p, r, t, config.mid_block_scale_factor)?),
            None => None,
        };
        Ok(DownPath { down_blocks, mid_block, resnet, transformer })
    }
}

/// The number of parameters the model built from `config` has (no memory is allocated for them).
pub fn parameter_count(config: &UNetConfig) -> Result<i64> {
    let w = Weights::shapes_only(Kind::Float);
    UNet2DConditionModel::new(&w, config)?;
    Ok(w.requested_parameter_count())
}
