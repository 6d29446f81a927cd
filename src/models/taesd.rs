//! The tiny autoencoder (TAESD), mirroring diffusers' `AutoencoderTiny`
//! (`models/autoencoders/autoencoder_tiny.py`) with its `EncoderTiny` / `DecoderTiny`
//! (`models/autoencoders/vae.py`) and `AutoencoderTinyBlock` (`models/unets/unet_2d_blocks.py`).
//! Parameter names follow the `nn.Sequential` indices: `encoder.layers.N...`, `decoder.layers.N...`.
use super::nn::{Activation, Conv2d};
use super::weights::Weights;
use crate::error::{Error, Result};
use serde::Deserialize;
use tch::Tensor;

/// `config.json` of an `AutoencoderTiny` (diffusers' `__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub encoder_block_out_channels: Vec<i64>,
    pub decoder_block_out_channels: Vec<i64>,
    pub act_fn: String,
    pub upsample_fn: String,
    pub latent_channels: i64,
    pub upsampling_scaling_factor: i64,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub latent_magnitude: f64,
    pub latent_shift: f64,
    pub force_upcast: bool,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        AutoencoderTinyConfig {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            act_fn: "relu".into(),
            upsample_fn: "nearest".into(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            force_upcast: false,
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }
}

impl AutoencoderTinyConfig {
    fn validate(&self) -> Result<()> {
        if self.encoder_block_out_channels.is_empty() || self.decoder_block_out_channels.is_empty() {
            return Err(Error::invalid("taesd config", "empty block_out_channels"));
        }
        if self.encoder_block_out_channels.len() != self.num_encoder_blocks.len() {
            return Err(Error::invalid(
                "taesd config",
                "`encoder_block_out_channels` should have the same length as `num_encoder_blocks`",
            ));
        }
        if self.decoder_block_out_channels.len() != self.num_decoder_blocks.len() {
            return Err(Error::invalid(
                "taesd config",
                "`decoder_block_out_channels` should have the same length as `num_decoder_blocks`",
            ));
        }
        if self.upsample_fn != "nearest" {
            return Err(Error::Unsupported(format!("TAESD upsample_fn `{}`", self.upsample_fn)));
        }
        if self.upsampling_scaling_factor < 1 {
            return Err(Error::invalid("taesd config", "upsampling_scaling_factor must be at least 1"));
        }
        Ok(())
    }
}

/// `AutoencoderTinyBlock`: `fuse(conv(x) + skip(x))` with `conv` = conv, act, conv, act, conv (indices
/// 0, 2, 4), `skip` a bias-free 1x1 conv where channels change, `fuse` a ReLU.
#[derive(Debug)]
struct TinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
    act: Activation,
}

impl TinyBlock {
    fn new(w: &Weights, in_ch: i64, out_ch: i64, act: Activation) -> Result<Self> {
        let c = w.sub("conv");
        Ok(TinyBlock {
            convs: [
                Conv2d::new(&c.sub(0), in_ch, out_ch, 3, 1, 1, true)?,
                Conv2d::new(&c.sub(2), out_ch, out_ch, 3, 1, 1, true)?,
                Conv2d::new(&c.sub(4), out_ch, out_ch, 3, 1, 1, true)?,
            ],
            skip: if in_ch != out_ch {
                Some(Conv2d::new(&w.sub("skip"), in_ch, out_ch, 1, 1, 0, false)?)
            } else {
                None
            },
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.convs[0].forward(x)?)?;
        let h = self.act.forward(&self.convs[1].forward(&h)?)?;
        let h = self.convs[2].forward(&h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(x)?,
            None => x.shallow_clone(),
        };
        Ok(h.f_add(&skip)?.f_relu()?)
    }
}

/// One entry of the `nn.Sequential` `layers`.
#[derive(Debug)]
enum Layer {
    Conv(Conv2d),
    Act(Activation),
    Block(TinyBlock),
    Upsample(i64),
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::Act(a) => a.forward(x),
            Layer::Block(b) => b.forward(x),
            Layer::Upsample(f) => {
                let (_, _, h, w) = x.size4()?;
                Ok(x.f_upsample_nearest2d([h * f, w * f], *f as f64, *f as f64)?)
            }
        }
    }
}

fn run(layers: &[Layer], x: Tensor) -> Result<Tensor> {
    layers.iter().try_fold(x, |h, l| l.forward(&h))
}

/// Builds `layers` one Sequential index at a time, naming each weight by its index.
struct SequentialBuilder {
    w: Weights,
    layers: Vec<Layer>,
}

impl SequentialBuilder {
    fn new(w: &Weights) -> Self {
        SequentialBuilder { w: w.sub("layers"), layers: Vec::new() }
    }

    fn conv(&mut self, in_ch: i64, out_ch: i64, stride: i64, bias: bool) -> Result<()> {
        let c = Conv2d::new(&self.w.sub(self.layers.len()), in_ch, out_ch, 3, stride, 1, bias)?;
        self.layers.push(Layer::Conv(c));
        Ok(())
    }

    fn block(&mut self, ch: i64, act: Activation) -> Result<()> {
        let b = TinyBlock::new(&self.w.sub(self.layers.len()), ch, ch, act)?;
        self.layers.push(Layer::Block(b));
        Ok(())
    }
}

/// diffusers' `EncoderTiny`: image in [-1, 1] (mapped to [0, 1] first) to raw latents.
#[derive(Debug)]
pub struct EncoderTiny {
    layers: Vec<Layer>,
}

impl EncoderTiny {
    fn new(w: &Weights, cfg: &AutoencoderTinyConfig, act: Activation) -> Result<Self> {
        let mut s = SequentialBuilder::new(w);
        let boc = &cfg.encoder_block_out_channels;
        for (i, (&ch, &n)) in boc.iter().zip(&cfg.num_encoder_blocks).enumerate() {
            if i == 0 {
                s.conv(cfg.in_channels, ch, 1, true)?;
            } else {
                // diffusers uses the block's own channel count as input here, as TAESD's checkpoints do
                s.conv(ch, ch, 2, false)?;
            }
            for _ in 0..n {
                s.block(ch, act)?;
            }
        }
        s.conv(*boc.last().unwrap_or(&0), cfg.latent_channels, 1, true)?;
        Ok(EncoderTiny { layers: s.layers })
    }

    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        run(&self.layers, image.f_add_scalar(1.0)?.f_div_scalar(2.0)?)
    }
}

/// diffusers' `DecoderTiny`: raw latents (soft-clamped by `tanh(x / 3) * 3`) to an image in [-1, 1].
#[derive(Debug)]
pub struct DecoderTiny {
    layers: Vec<Layer>,
}

impl DecoderTiny {
    fn new(w: &Weights, cfg: &AutoencoderTinyConfig, act: Activation) -> Result<Self> {
        let mut s = SequentialBuilder::new(w);
        let boc = &cfg.decoder_block_out_channels;
        s.conv(cfg.latent_channels, boc[0], 1, true)?;
        s.layers.push(Layer::Act(act));
        for (i, (&ch, &n)) in boc.iter().zip(&cfg.num_decoder_blocks).enumerate() {
            let last = i == boc.len() - 1;
            for _ in 0..n {
                s.block(ch, act)?;
            }
            if !last {
                s.layers.push(Layer::Upsample(cfg.upsampling_scaling_factor));
            }
            s.conv(ch, if last { cfg.out_channels } else { ch }, 1, last)?;
        }
        Ok(DecoderTiny { layers: s.layers })
    }

    pub fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let x = latents.f_div_scalar(3.0)?.f_tanh()?.f_mul_scalar(3.0)?;
        Ok(run(&self.layers, x)?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?)
    }
}

/// diffusers' `AutoencoderTiny` (no tiling or slicing).
#[derive(Debug)]
pub struct AutoencoderTiny {
    encoder: EncoderTiny,
    decoder: DecoderTiny,
    config: AutoencoderTinyConfig,
}

impl AutoencoderTiny {
    /// Loads `encoder.layers.*` and `decoder.layers.*` from `w`.
    pub fn new(w: &Weights, cfg: AutoencoderTinyConfig) -> Result<Self> {
        cfg.validate()?;
        let act = Activation::parse(&cfg.act_fn)?;
        Ok(AutoencoderTiny {
            encoder: EncoderTiny::new(&w.sub("encoder"), &cfg, act)?,
            decoder: DecoderTiny::new(&w.sub("decoder"), &cfg, act)?,
            config: cfg,
        })
    }

    pub fn config(&self) -> &AutoencoderTinyConfig {
        &self.config
    }

    /// `AutoencoderTiny.encode(image).latents` for `image` (B, 3, H, W) in [-1, 1].
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        self.encoder.forward(image)
    }

    /// `AutoencoderTiny.decode(latents).sample`: an image (B, 3, H, W) in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decoder.forward(latents)
    }

    /// `scaling_factor` (1.0 for TAESD: its latents are already on the UNet's scale).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Pixels per latent along each side: one stride-2 conv per encoder stage after the first.
    pub fn downscale_factor(&self) -> i64 {
        1 << (self.config.encoder_block_out_channels.len() - 1)
    }

    pub fn latent_channels(&self) -> i64 {
        self.config.latent_channels
    }
}
