//! diffusers' `DDIMScheduler` with `eta = 0` (what the Stable Diffusion pipelines pass).
use super::{
    check_index, ddpm, np_arange_f64, np_linspace, torch_pow, ClassDefaults, Common, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind, StepOutput, TimestepSpacing,
};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// `DDIMScheduler.__init__` defaults.
pub(crate) const DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
    timestep_spacing: "leading",
};

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    common: Common,
    alphas_cumprod_f64: Vec<f64>,
    /// `final_alpha_cumprod`: 1 with `set_alpha_to_one` (default true), else `alphas_cumprod[0]`.
    final_alpha_cumprod: f32,
    /// `clip_sample` (DDIM's default: true) and `clip_sample_range` (default 1.0).
    clip: Option<f64>,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(config, &DEFAULTS, false)?;
        let final_alpha_cumprod =
            if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { common.alphas_cumprod[0] };
        let clip = config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(DdimScheduler {
            alphas_cumprod_f64: common.alphas_cumprod.iter().map(|&a| a as f64).collect(),
            common,
            final_alpha_cumprod,
            clip,
            num_inference_steps: None,
            timesteps: Vec::new(),
        })
    }

    /// `alphas_cumprod[t]`, or `final_alpha_cumprod` for a negative `t`.
    fn alpha_prod(&self, t: i64) -> f32 {
        if t >= 0 {
            self.common.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

/// The inference timesteps of DDIM's `set_timesteps` (integers).
pub(crate) fn ddim_timesteps(c: &Common, steps: usize) -> Result<Vec<i64>> {
    let n_train = c.num_train_timesteps;
    if steps == 0 || steps > n_train {
        return Err(Error::invalid(
            "num_inference_steps",
            format!("{steps}: must be between 1 and num_train_timesteps ({n_train})"),
        ));
    }
    Ok(match c.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
            .iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / steps;
            (0..steps).rev().map(|i| (i * ratio) as i64 + c.steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange_f64(n_train as f64, 0.0, -ratio)
                .iter()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect()
        }
    })
}

/// Refuses timesteps past the training schedule (diffusers would fail indexing `alphas_cumprod`).
pub(crate) fn check_in_schedule(timesteps: &[i64], len: usize) -> Result<()> {
    match timesteps.iter().find(|&&t| t < 0 || t as usize >= len) {
        Some(t) => Err(Error::invalid(
            "steps_offset",
            format!("timestep {t} falls outside the {len}-step training schedule"),
        )),
        None => Ok(()),
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let timesteps = ddim_timesteps(&self.common, steps)?;
        check_in_schedule(&timesteps, self.common.alphas_cumprod.len())?;
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = Some(steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn timestep_kind(&self) -> Kind {
        Kind::Int64
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod_f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(&self.timesteps, step_index)?;
        Ok(sample.shallow_clone())
    }

    /// DDIM's step with eta 0; the coefficients are float32 as diffusers' 0-dim tensors are. Note diffusers'
    /// previous timestep is always `t - num_train_timesteps / num_inference_steps`, whatever the spacing.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<StepOutput> {
        check_index(&self.timesteps, step_index)?;
        let n = self.num_inference_steps.unwrap_or(self.timesteps.len());
        let t = self.timesteps[step_index] as i64;
        let prev_t = t - (self.common.num_train_timesteps / n) as i64;
        let alpha_prod_t = self.alpha_prod(t);
        let alpha_prod_t_prev = self.alpha_prod(prev_t);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (torch_pow(alpha_prod_t, 0.5) as f64, torch_pow(beta_prod_t, 0.5) as f64);

        let (mut pred_original, pred_epsilon) = match self.common.prediction_type {
            PredictionType::Epsilon => (
                sample.f_sub(&model_output.f_mul_scalar(sqrt_b)?)?.f_div_scalar(sqrt_a)?,
                model_output.shallow_clone(),
            ),
            PredictionType::Sample => {
                let eps = sample.f_sub(&model_output.f_mul_scalar(sqrt_a)?)?.f_div_scalar(sqrt_b)?;
                (model_output.shallow_clone(), eps)
            }
            PredictionType::VPrediction => (
                sample.f_mul_scalar(sqrt_a)?.f_sub(&model_output.f_mul_scalar(sqrt_b)?)?,
                model_output.f_mul_scalar(sqrt_a)?.f_add(&sample.f_mul_scalar(sqrt_b)?)?,
            ),
        };
        if let Some(range) = self.clip {
            pred_original = pred_original.f_clamp(-range, range)?;
        }
        // eta = 0: std_dev_t is 0, so the direction coefficient is sqrt(1 - alpha_prod_t_prev - 0).
        let dir = torch_pow(1.0 - alpha_prod_t_prev - 0.0, 0.5) as f64;
        let sqrt_a_prev = torch_pow(alpha_prod_t_prev, 0.5) as f64;
        let prev_sample = pred_original.f_mul_scalar(sqrt_a_prev)?.f_add(&pred_epsilon.f_mul_scalar(dir)?)?;
        Ok(StepOutput { prev_sample, denoised: Some(pred_original) })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(&self.timesteps, step_index)?;
        ddpm::add_noise_in_sample_dtype(original, noise, self.alpha_prod(self.timesteps[step_index] as i64))
    }
}
