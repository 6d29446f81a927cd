//! The KL autoencoder, mirroring diffusers' `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`) with
//! its `Encoder` / `Decoder` (`models/autoencoders/vae.py`), `DownEncoderBlock2D`, `UpDecoderBlock2D` and
//! `UNetMidBlock2D` (`models/unets/unet_2d_blocks.py`), `ResnetBlock2D` (`models/resnet.py`), the VAE's
//! `Attention` (`models/attention_processor.py`), `Downsample2D` and `Upsample2D`. Parameter names are
//! diffusers' own; mid-block attentions saved under the pre-0.14 names (`query`, `key`, `value`,
//! `proj_attn`) load too.
use super::nn::{Activation, Conv2d, GroupNorm, Linear};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use super::weights::Weights;
use super::OneOrMany;
use crate::error::{Error, Result};
use serde::Deserialize;
use tch::Tensor;

/// Every VAE block uses this GroupNorm epsilon (`resnet_eps=1e-6` in `Encoder` / `Decoder`).
const VAE_EPS: f64 = 1e-6;

/// `vae/config.json` (diffusers' `AutoencoderKL.__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub sample_size: OneOrMany<i64>,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        AutoencoderKLConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: OneOrMany::One(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::invalid("vae config", "block_out_channels is empty"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::invalid(
                "vae config",
                format!(
                    "{} down and {} up block types for {n} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            ));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| t.as_str() != "DownEncoderBlock2D") {
            return Err(Error::Unsupported(format!("VAE down block type `{t}`")));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| t.as_str() != "UpDecoderBlock2D") {
            return Err(Error::Unsupported(format!("VAE up block type `{t}`")));
        }
        Ok(())
    }
}

/// The VAE's resnets: diffusers' `ResnetBlock2D` without a time embedding, eps 1e-6.
fn resnet(w: &Weights, in_ch: i64, out_ch: i64, groups: i64, act: Activation) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        w,
        in_ch,
        out_ch,
        ResnetSettings { temb_channels: None, groups, eps: VAE_EPS, act },
        1.0,
    )
}

/// A linear layer of the mid-block attention, stored as `new` (`to_q`) or, in old checkpoints, as `old`
/// (`query`), possibly as a 1x1 convolution weight.
fn attention_linear(w: &Weights, new: &str, old: &str, ch: i64) -> Result<Linear> {
    let name =
        if !w.contains(&format!("{new}.weight")) && w.contains(&format!("{old}.weight")) { old } else { new };
    let lw = w.sub(name);
    match lw.shape_of("weight") {
        Some(s) if s == [ch, ch, 1, 1] => Ok(Linear {
            weight: lw.get("weight", &s)?.f_reshape([ch, ch])?,
            bias: Some(lw.get("bias", &[ch])?),
        }),
        _ => Linear::new(&lw, ch, ch, true),
    }
}

/// The mid block's `Attention` (single head over all channels, group norm in front, residual added):
/// diffusers' `Attention(..., residual_connection=True, _from_deprecated_attn_block=True)` with
/// `AttnProcessor2_0`.
#[derive(Debug)]
pub(crate) struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(w: &Weights, ch: i64, groups: i64) -> Result<Self> {
        Ok(VaeAttention {
            group_norm: GroupNorm::new(&w.sub("group_norm"), groups, ch, VAE_EPS)?,
            to_q: attention_linear(w, "to_q", "query", ch)?,
            to_k: attention_linear(w, "to_k", "key", ch)?,
            to_v: attention_linear(w, "to_v", "value", ch)?,
            to_out: attention_linear(w, "to_out.0", "proj_attn", ch)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.size4()?;
        let t = self.group_norm.forward(x)?.f_view([b, c, h * wd])?.f_transpose(1, 2)?;
        // (B, 1 head, HW, C)
        let q = self.to_q.forward(&t)?.f_unsqueeze(1)?;
        let k = self.to_k.forward(&t)?.f_unsqueeze(1)?;
        let v = self.to_v.forward(&t)?.f_unsqueeze(1)?;
        let o = Tensor::f_scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false)?;
        let o = self.to_out.forward(&o.f_squeeze_dim(1)?)?;
        let o = o.f_transpose(1, 2)?.f_reshape([b, c, h, wd])?;
        Ok(o.f_add(x)?)
    }
}

/// `UNetMidBlock2D` as the VAE builds it: resnet, (attention, resnet) — attention optional.
#[derive(Debug)]
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<VaeAttention>,
}

impl MidBlock {
    fn new(w: &Weights, ch: i64, groups: i64, act: Activation, add_attention: bool) -> Result<Self> {
        let rw = w.sub("resnets");
        let resnets = (0..2).map(|i| resnet(&rw.sub(i), ch, ch, groups, act)).collect::<Result<Vec<_>>>()?;
        let attentions = if add_attention {
            vec![VaeAttention::new(&w.sub("attentions").sub(0), ch, groups)?]
        } else {
            vec![]
        };
        Ok(MidBlock { resnets, attentions })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(a) = self.attentions.first() {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// `DownEncoderBlock2D`: resnets, then a `Downsample2D` (pad right/bottom by one, 3x3 conv, stride 2).
#[derive(Debug)]
pub(crate) struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    fn new(
        w: &Weights,
        in_ch: i64,
        out_ch: i64,
        layers: usize,
        groups: i64,
        act: Activation,
        down: bool,
    ) -> Result<Self> {
        let rw = w.sub("resnets");
        let resnets = (0..layers)
            .map(|i| resnet(&rw.sub(i), if i == 0 { in_ch } else { out_ch }, out_ch, groups, act))
            .collect::<Result<Vec<_>>>()?;
        let downsample =
            if down { Some(Downsample2D::new(&w.sub("downsamplers").sub(0), out_ch, 0)?) } else { None };
        Ok(DownEncoderBlock2D { resnets, downsample })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        if let Some(down) = &self.downsample {
            h = down.forward(&h)?;
        }
        Ok(h)
    }
}

/// `UpDecoderBlock2D`: resnets, then an `Upsample2D` (nearest x2, 3x3 conv).
#[derive(Debug)]
pub(crate) struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    fn new(
        w: &Weights,
        in_ch: i64,
        out_ch: i64,
        layers: usize,
        groups: i64,
        act: Activation,
        up: bool,
    ) -> Result<Self> {
        let rw = w.sub("resnets");
        let resnets = (0..layers)
            .map(|i| resnet(&rw.sub(i), if i == 0 { in_ch } else { out_ch }, out_ch, groups, act))
            .collect::<Result<Vec<_>>>()?;
        let upsample = if up { Some(Upsample2D::new(&w.sub("upsamplers").sub(0), out_ch)?) } else { None };
        Ok(UpDecoderBlock2D { resnets, upsample })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, None)?;
        }
        if let Some(up) = &self.upsample {
            h = up.forward(&h, None)?;
        }
        Ok(h)
    }
}

/// diffusers' `Encoder` (with `double_z=True`): image to the moments (mean, logvar) of the latent.
#[derive(Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(w: &Weights, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let (groups, act) = (cfg.norm_num_groups, Activation::parse(&cfg.act_fn)?);
        let conv_in = Conv2d::new(&w.sub("conv_in"), cfg.in_channels, boc[0], 3, 1, 1, true)?;
        let dw = w.sub("down_blocks");
        let mut down_blocks = Vec::new();
        let mut out_ch = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch;
            let last = i == boc.len() - 1;
            down_blocks.push(DownEncoderBlock2D::new(
                &dw.sub(i),
                in_ch,
                out_ch,
                cfg.layers_per_block,
                groups,
                act,
                !last,
            )?);
        }
        let top = *boc.last().unwrap_or(&0);
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(&w.sub("mid_block"), top, groups, act, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::new(&w.sub("conv_norm_out"), groups, top, VAE_EPS)?,
            conv_out: Conv2d::new(&w.sub("conv_out"), top, 2 * cfg.latent_channels, 3, 1, 1, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.f_silu()?)
    }
}

/// diffusers' `Decoder`: latent to image.
#[derive(Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(w: &Weights, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let (groups, act) = (cfg.norm_num_groups, Activation::parse(&cfg.act_fn)?);
        let top = rev[0];
        let conv_in = Conv2d::new(&w.sub("conv_in"), cfg.latent_channels, top, 3, 1, 1, true)?;
        let mid_block = MidBlock::new(&w.sub("mid_block"), top, groups, act, cfg.mid_block_add_attention)?;
        let uw = w.sub("up_blocks");
        let mut up_blocks = Vec::new();
        let mut out_ch = top;
        for (i, &ch) in rev.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch;
            let last = i == rev.len() - 1;
            up_blocks.push(UpDecoderBlock2D::new(
                &uw.sub(i),
                in_ch,
                out_ch,
                cfg.layers_per_block + 1,
                groups,
                act,
                !last,
            )?);
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(&w.sub("conv_norm_out"), groups, bottom, VAE_EPS)?,
            conv_out: Conv2d::new(&w.sub("conv_out"), bottom, cfg.out_channels, 3, 1, 1, true)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.f_silu()?)
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the latent distribution `encode` returns.
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments (B, 2C, h, w) into mean and logvar.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let parts = moments.f_chunk(2, 1)?;
        let [mean, logvar]: [Tensor; 2] = parts
            .try_into()
            .map_err(|_| Error::Model("VAE moments do not split into mean and logvar".into()))?;
        let logvar = logvar.f_clamp(-30.0, 20.0)?;
        let std = logvar.f_mul_scalar(0.5)?.f_exp()?;
        Ok(DiagonalGaussian { mean, logvar, std })
    }

    /// `mean + std * noise` (`latent_dist.sample(generator)` with the caller's standard-normal `noise`).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok(self.mean.f_add(&self.std.f_mul(noise)?)?)
    }

    /// The mean (`latent_dist.mode()`).
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

/// diffusers' `AutoencoderKL` (no tiling or slicing).
#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
    /// The dtype of the weights (fp32 for an SDXL VAE upcast under an fp16 model).
    kind: tch::Kind,
}

impl AutoencoderKL {
    /// Loads `encoder.*`, `decoder.*`, `quant_conv.*` and `post_quant_conv.*` from `w`.
    pub fn new(w: &Weights, cfg: AutoencoderKLConfig) -> Result<Self> {
        cfg.validate()?;
        let lc = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(&w.sub("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0, true)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(&w.sub("post_quant_conv"), lc, lc, 1, 1, 0, true)?)
        } else {
            None
        };
        Ok(AutoencoderKL {
            encoder: Encoder::new(&w.sub("encoder"), &cfg)?,
            decoder: Decoder::new(&w.sub("decoder"), &cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg,
            kind: w.kind(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The dtype the VAE computes in (its weights' dtype).
    pub fn kind(&self) -> tch::Kind {
        self.kind
    }

    /// The latent distribution of `image` (B, in_channels, H, W) in [-1, 1]; H and W multiples of
    /// [`AutoencoderKL::downscale_factor`].
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        let mut h = self.encoder.forward(image)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        DiagonalGaussian::from_moments(&h)
    }

    /// The image (B, out_channels, H, W), roughly in [-1, 1], for unscaled latents `z` (divide by
    /// [`AutoencoderKL::scaling_factor`] first, as diffusers' pipelines do).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `shift_factor` (None for SD 1.x / 2.x).
    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    /// Pixels per latent along each side: `2^(len(block_out_channels) - 1)` (8 for SD).
    pub fn downscale_factor(&self) -> i64 {
        1 << (self.config.block_out_channels.len() - 1)
    }

    pub fn latent_channels(&self) -> i64 {
        self.config.latent_channels
    }
}
