//! Timestep embeddings: diffusers' `get_timestep_embedding` / `Timesteps` and `TimestepEmbedding`
//! (diffusers/models/embeddings.py).
use crate::error::{Error, Result};
use crate::models::nn::{Activation, Linear};
use crate::models::Weights;
use tch::{Kind, Tensor};

/// diffusers' `get_timestep_embedding` (as called by `Timesteps`, scale 1, max period 10000): sinusoidal
/// features of one timestep per row, computed in fp32 whatever the dtype of `timesteps` (int or float),
/// with the same sequence of ops so the values match bit for bit.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let exponent = Tensor::f_arange(half, (Kind::Float, timesteps.device()))?
        .f_mul_scalar(-(10000f64).ln())?
        .f_div_scalar(half as f64 - freq_shift)?;
    let freqs = exponent.f_exp()?;
    let args = timesteps.f_unsqueeze(1)?.f_to_kind(Kind::Float)?.f_mul(&freqs.f_unsqueeze(0)?)?;
    let (sin, cos) = (args.f_sin()?, args.f_cos()?);
    let mut emb =
        if flip_sin_to_cos { Tensor::f_cat(&[cos, sin], -1)? } else { Tensor::f_cat(&[sin, cos], -1)? };
    if dim % 2 == 1 {
        emb = emb.f_constant_pad_nd([0, 1, 0, 0])?;
    }
    Ok(emb)
}

/// diffusers' `get_time_embed`: the timesteps (0-d, or one per batch item, or one for all) broadcast to `batch`,
/// then [`timestep_embedding`] in fp32 (the caller casts to the model's dtype).
pub fn batch_time_features(
    timesteps: &Tensor,
    batch: i64,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let t = match timesteps.dim() {
        0 => timesteps.f_unsqueeze(0)?,
        1 => timesteps.shallow_clone(),
        d => return Err(Error::invalid("timesteps", format!("expected shape (batch,), got a {d}-d tensor"))),
    };
    let n = t.size()[0];
    if n != batch && n != 1 {
        return Err(Error::invalid(
            "timesteps",
            format!("{n} timesteps for a batch of {batch} (give one per batch item, or one for all)"),
        ));
    }
    timestep_embedding(&t.f_expand([batch], false)?, dim, flip_sin_to_cos, freq_shift)
}

/// diffusers' `TimestepEmbedding`: `linear_1 -> act -> linear_2 [-> post_act]`, with the optional
/// `cond_proj` (LCM's guidance embedding, `time_cond_proj_dim`) added to the input first.
#[derive(Debug)]
pub struct TimestepEmbedding {
    cond_proj: Option<Linear>,
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(
        w: &Weights,
        in_channels: i64,
        time_embed_dim: i64,
        act: Activation,
        post_act: Option<Activation>,
        cond_proj_dim: Option<i64>,
    ) -> Result<Self> {
        let cond_proj = match cond_proj_dim {
            Some(d) => Some(Linear::new(&w.sub("cond_proj"), d, in_channels, false)?),
            None => None,
        };
        Ok(TimestepEmbedding {
            cond_proj,
            linear_1: Linear::new(&w.sub("linear_1"), in_channels, time_embed_dim, true)?,
            act,
            linear_2: Linear::new(&w.sub("linear_2"), time_embed_dim, time_embed_dim, true)?,
            post_act,
        })
    }

    /// Whether the model expects a `timestep_cond` input.
    pub fn has_cond_proj(&self) -> bool {
        self.cond_proj.is_some()
    }

    /// A `condition` for a model without `cond_proj` is an error (diffusers fails on it too).
    pub fn forward(&self, sample: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let mut x = match (condition, &self.cond_proj) {
            (Some(c), Some(p)) => sample.f_add(&p.forward(c)?)?,
            (Some(_), None) => {
                return Err(Error::invalid(
                    "timestep_cond",
                    "given, but this UNet has no `time_embedding.cond_proj` (its config has no time_cond_proj_dim)",
                ))
            }
            (None, _) => sample.shallow_clone(),
        };
        x = self.linear_1.forward(&x)?;
        x = self.act.forward(&x)?;
        x = self.linear_2.forward(&x)?;
        if let Some(a) = self.post_act {
            x = a.forward(&x)?;
        }
        Ok(x)
    }
}
