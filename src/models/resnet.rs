//! The convolutional pieces the UNet and the VAE share: diffusers' `ResnetBlock2D` (diffusers/models/resnet.py),
//! `Downsample2D` (downsampling.py) and `Upsample2D` (upsampling.py), in the configurations
//! `UNet2DConditionModel` and `AutoencoderKL` use.
use crate::error::Result;
use crate::models::nn::{Activation, Conv2d, GroupNorm, Linear};
use crate::models::Weights;
use tch::Tensor;

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"`, `skip_time_act=False`, pre-norm:
/// `norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2`, plus the input (through a 1x1
/// `conv_shortcut` when the channel count changes), divided by `output_scale_factor`. The VAE's resnets have no
/// time embedding (`temb_channels` None).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

/// The hyper-parameters shared by every resnet of a UNet (or of a VAE).
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// Width of the time embedding; None for resnets without one (the VAE's).
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub act: Activation,
}

impl ResnetBlock2D {
    pub fn new(
        w: &Weights,
        in_ch: i64,
        out_ch: i64,
        s: ResnetSettings,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(Conv2d::new(&w.sub("conv_shortcut"), in_ch, out_ch, 1, 1, 0, true)?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(&w.sub("norm1"), s.groups, in_ch, s.eps)?,
            conv1: Conv2d::new(&w.sub("conv1"), in_ch, out_ch, 3, 1, 1, true)?,
            time_emb_proj: match s.temb_channels {
                Some(t) => Some(Linear::new(&w.sub("time_emb_proj"), t, out_ch, true)?),
                None => None,
            },
            norm2: GroupNorm::new(&w.sub("norm2"), s.groups, out_ch, s.eps)?,
            conv2: Conv2d::new(&w.sub("conv2"), out_ch, out_ch, 3, 1, 1, true)?,
            conv_shortcut,
            act: s.act,
            output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.norm1.forward(x)?;
        h = self.act.forward(&h)?;
        h = self.conv1.forward(&h)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&self.act.forward(temb)?)?.f_unsqueeze(-1)?.f_unsqueeze(-1)?;
            h = h.f_add(&t)?;
        }
        h = self.norm2.forward(&h)?;
        h = self.act.forward(&h)?;
        h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.shallow_clone(),
        };
        Ok(shortcut.f_add(&h)?.f_div_scalar(self.output_scale_factor)?)
    }
}

/// diffusers' `Downsample2D(use_conv=True, name="op")`: a stride-2 3x3 conv; with `padding=0` the input is
/// first padded by one on the right and bottom, as diffusers does.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(w: &Weights, channels: i64, padding: i64) -> Result<Self> {
        Ok(Downsample2D {
            conv: Conv2d::new(&w.sub("conv"), channels, channels, 3, 2, padding, true)?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            self.conv.forward(&x.f_constant_pad_nd([0, 1, 0, 1])?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour x2 (or to `output_size`, which diffusers passes
/// when the latent size is not a multiple of the UNet's overall factor) then a 3x3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(w: &Weights, channels: i64) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::new(&w.sub("conv"), channels, channels, 3, 1, 1, true)? })
    }

    pub fn forward(&self, x: &Tensor, output_size: Option<[i64; 2]>) -> Result<Tensor> {
        let up = match output_size {
            // F.interpolate(scale_factor=2.0): the output size is floor(2 * size), the scale goes to the kernel.
            None => {
                let (_, _, h, w) = x.size4()?;
                x.f_upsample_nearest2d([2 * h, 2 * w], Some(2.0), Some(2.0))?
            }
            // F.interpolate(size=...): no scale, the kernel derives it from the sizes.
            Some(size) => x.f_upsample_nearest2d(size, None::<f64>, None::<f64>)?,
        };
        self.conv.forward(&up)
    }
}
