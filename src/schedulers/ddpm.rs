//! The training noise schedule (betas, `alphas_cumprod`) and the DDPM forward process.
//!
//! The schedule is computed with libtorch float32 ops in the order diffusers uses (`torch.linspace`,
//! `torch.cumprod`, which accumulates in double on the CPU), so the values are bit-identical to diffusers'.
use super::{ClassDefaults, SchedulerConfig, SchedulerKind};
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// diffusers' `alphas_cumprod` for a scheduler of `kind` built from `config` (that class's defaults for missing
/// fields), as float32 values widened to f64 (what [`super::Scheduler::alphas_cumprod`] gives without building
/// one; Euler's zero-SNR patch of the last value included).
pub fn alphas_cumprod(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Vec<f64>> {
    let ac = match kind {
        SchedulerKind::Ddim => alphas_cumprod_f32(config, &super::ddim::DEFAULTS)?,
        SchedulerKind::Lcm => alphas_cumprod_f32(config, &super::lcm::DEFAULTS)?,
        SchedulerKind::Euler | SchedulerKind::EulerAncestral => super::euler::euler_alphas_cumprod(config)?,
    };
    Ok(ac.into_iter().map(f64::from).collect())
}

/// The DDPM forward process `sqrt(a) * x0 + sqrt(1 - a) * noise` with `a = alpha_cumprod_t`: the two square
/// roots are taken by libtorch in float32 (as `alphas_cumprod[t].sqrt()` on a float32 CPU tensor,
/// StreamDiffusion's way), then applied in the tensors' dtype. For float32 tensors this equals diffusers'
/// DDIM/LCM `add_noise` bit for bit.
pub fn add_noise(x0: &Tensor, noise: &Tensor, alpha_cumprod_t: f64) -> Result<Tensor> {
    let a = alpha_cumprod_t as f32;
    let (sqrt_a, sqrt_1ma) = (super::torch_sqrt(a), super::torch_sqrt(1.0 - a));
    Ok(x0.f_mul_scalar(sqrt_a as f64)?.f_add(&noise.f_mul_scalar(sqrt_1ma as f64)?)?)
}

/// DDIM/LCM `add_noise` exactly as diffusers writes it: `alphas_cumprod` is first cast to the sample's dtype,
/// then the square roots are taken in that dtype (equal to [`add_noise`] for float32).
pub(crate) fn add_noise_in_sample_dtype(x0: &Tensor, noise: &Tensor, alpha_cumprod_t: f32) -> Result<Tensor> {
    let shape = vec![1i64; x0.dim()];
    let a = Tensor::f_from_slice(&[alpha_cumprod_t])?.f_to_kind(x0.kind())?.f_to_device(x0.device())?;
    let sqrt_a = a.f_pow_tensor_scalar(0.5)?.f_reshape(&shape)?;
    let sqrt_1ma = a.f_neg()?.f_add_scalar(1.0)?.f_pow_tensor_scalar(0.5)?.f_reshape(&shape)?;
    Ok(sqrt_a.f_mul(x0)?.f_add(&sqrt_1ma.f_mul(noise)?)?)
}

/// Betas as diffusers' `__init__` builds them, as a float32 CPU tensor.
fn betas(config: &SchedulerConfig, d: &ClassDefaults) -> Result<Tensor> {
    let n = config.num_train_timesteps.unwrap_or(1000) as i64;
    let opts = (Kind::Float, Device::Cpu);
    if let Some(trained) = &config.trained_betas {
        let v: Vec<f32> = trained.iter().map(|&b| b as f32).collect();
        return Ok(Tensor::f_from_slice(&v)?);
    }
    let start = config.beta_start.unwrap_or(d.beta_start);
    let end = config.beta_end.unwrap_or(d.beta_end);
    match config.beta_schedule.as_deref().unwrap_or(d.beta_schedule) {
        "linear" => Ok(Tensor::f_linspace(start, end, n, opts)?),
        "scaled_linear" => {
            Ok(Tensor::f_linspace(start.powf(0.5), end.powf(0.5), n, opts)?.f_pow_tensor_scalar(2)?)
        }
        "squaredcos_cap_v2" => Ok(Tensor::f_from_slice(&betas_for_alpha_bar(n as usize))?),
        other => Err(Error::invalid(
            "beta_schedule",
            format!("`{other}`: expected linear, scaled_linear or squaredcos_cap_v2"),
        )),
    }
}

/// `betas_for_alpha_bar(n)` with the cosine transform and `max_beta` 0.999: Python float (f64) math, then
/// float32.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powf(2.0);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr(betas)`, op for op.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor> {
    let alphas = betas.f_neg()?.f_add_scalar(1.0)?;
    let mut sqrt = alphas.f_cumprod(0, None::<Kind>)?.f_sqrt()?;
    let n = sqrt.size()[0];
    let s0 = sqrt.f_get(0)?.copy();
    let st = sqrt.f_get(n - 1)?.copy();
    let _ = sqrt.f_sub_(&st)?;
    let _ = sqrt.f_mul_(&s0.f_div(&s0.f_sub(&st)?)?)?;
    let bar = sqrt.f_pow_tensor_scalar(2)?;
    let alphas = bar.f_slice(0, 1, n, 1)?.f_div(&bar.f_slice(0, 0, n - 1, 1)?)?;
    let alphas = Tensor::f_cat(&[bar.f_slice(0, 0, 1, 1)?, alphas], 0)?;
    Ok(alphas.f_neg()?.f_add_scalar(1.0)?)
}

/// `alphas_cumprod = cumprod(1 - betas)` (after the optional zero-SNR rescale), as float32 values.
pub(crate) fn alphas_cumprod_f32(config: &SchedulerConfig, d: &ClassDefaults) -> Result<Vec<f32>> {
    let mut betas = betas(config, d)?;
    if config.rescale_betas_zero_snr.unwrap_or(false) {
        betas = rescale_zero_terminal_snr(&betas)?;
    }
    let ac = betas.f_neg()?.f_add_scalar(1.0)?.f_cumprod(0, None::<Kind>)?;
    Ok(Vec::<f32>::try_from(&ac)?)
}
