//! The UNet's down, mid and up blocks (diffusers/models/unets/unet_2d_blocks.py): `CrossAttnDownBlock2D` and
//! `DownBlock2D` as [`DownBlock`], `UNetMidBlock2DCrossAttn` as [`MidBlock`], `CrossAttnUpBlock2D` and
//! `UpBlock2D` as [`UpBlock`] (the plain variants are the same blocks without attentions).
use super::attention::{CrossContext, Transformer2DModel, TransformerSettings};
use super::config::{BlockKind, BlockPlan, MidPlan};
use crate::error::{Error, Result};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use crate::models::Weights;
use tch::Tensor;

fn attentions(w: &Weights, plan: &BlockPlan, t: TransformerSettings) -> Result<Vec<Transformer2DModel>> {
    if plan.kind == BlockKind::Plain {
        return Ok(Vec::new());
    }
    (0..plan.num_layers)
        .map(|i| {
            Transformer2DModel::new(
                &w.sub("attentions").sub(i),
                plan.out_channels,
                plan.num_heads,
                plan.transformer_layers,
                plan.cross_attention_dim,
                t,
            )
        })
        .collect()
}

/// diffusers' `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without): resnet [-> attention] per
/// layer, then an optional `downsamplers.0`. Every intermediate output is kept as a skip connection.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// The block's attentions (`attentions.<i>`), in order.
    pub(crate) fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    pub fn new(
        w: &Weights,
        plan: &BlockPlan,
        r: ResnetSettings,
        t: TransformerSettings,
        downsample_padding: i64,
    ) -> Result<Self> {
        let resnets = (0..plan.num_layers)
            .map(|i| {
                let in_ch = if i == 0 { plan.in_channels } else { plan.out_channels };
                ResnetBlock2D::new(&w.sub("resnets").sub(i), in_ch, plan.out_channels, r, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let downsampler = if plan.add_sampler {
            Some(Downsample2D::new(&w.sub("downsamplers").sub(0), plan.out_channels, downsample_padding)?)
        } else {
            None
        };
        Ok(DownBlock { resnets, attentions: attentions(w, plan, t)?, downsampler })
    }

    /// Returns the block's output and appends its skip connections to `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: CrossContext<'_>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, ctx)?;
            }
            skips.push(h.shallow_clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.shallow_clone());
        }
        Ok(h)
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn` (one layer): resnet, attention, resnet, the resnets scaled by
/// `mid_block_scale_factor`.
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// The block's attentions (`attentions.<i>`), in order.
    pub(crate) fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    pub fn new(
        w: &Weights,
        plan: &MidPlan,
        r: ResnetSettings,
        t: TransformerSettings,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let c = plan.channels;
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(&w.sub("resnets").sub(i), c, c, r, output_scale_factor))
            .collect::<Result<Vec<_>>>()?;
        let attn = Transformer2DModel::new(
            &w.sub("attentions").sub(0),
            c,
            plan.num_heads,
            plan.transformer_layers,
            plan.cross_attention_dim,
            t,
        )?;
        Ok(MidBlock { resnets, attentions: vec![attn] })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: CrossContext<'_>) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, ctx)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// diffusers' `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without): per layer, concatenate the
/// last skip connection on channels, resnet [-> attention]; then an optional `upsamplers.0`.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// The block's attentions (`attentions.<i>`), in order.
    pub(crate) fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    pub fn new(w: &Weights, plan: &BlockPlan, r: ResnetSettings, t: TransformerSettings) -> Result<Self> {
        let n = plan.num_layers;
        let resnets = (0..n)
            .map(|i| {
                let skip_ch = if i == n - 1 { plan.in_channels } else { plan.out_channels };
                let in_ch = if i == 0 { plan.prev_output_channels } else { plan.out_channels };
                ResnetBlock2D::new(&w.sub("resnets").sub(i), in_ch + skip_ch, plan.out_channels, r, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if plan.add_sampler {
            Some(Upsample2D::new(&w.sub("upsamplers").sub(0), plan.out_channels)?)
        } else {
            None
        };
        Ok(UpBlock { resnets, attentions: attentions(w, plan, t)?, upsampler })
    }

    /// How many skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Pops this block's skip connections off the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: CrossContext<'_>,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<[i64; 2]>,
    ) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| Error::Model("unet: ran out of skip connections".into()))?;
            h = Tensor::f_cat(&[h, skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, ctx)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}
