//! diffusers' `LCMScheduler` (Latent Consistency Models), and the pieces of it StreamDiffusion reuses.
use super::{
    check_index, ddim::check_in_schedule, ddpm, torch_pow, torch_sqrt, ClassDefaults, Common, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind, StepOutput,
};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// `LCMScheduler.__init__` defaults.
pub(crate) const DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: "scaled_linear",
    timestep_spacing: "leading",
};

/// LCM's `sigma_data`.
const SIGMA_DATA: f32 = 0.5;

/// `get_scalings_for_boundary_condition_discrete(timestep)` -> `(c_skip, c_out)`, with sigma_data 0.5. The
/// pipelines pass the timestep as a tensor, so diffusers computes these in float32; so does this.
pub fn boundary_condition_scalings(timestep: f64, timestep_scaling: f64) -> (f64, f64) {
    let scaled = timestep as f32 * timestep_scaling as f32;
    let denom = torch_pow(scaled, 2.0) + SIGMA_DATA * SIGMA_DATA;
    let c_skip = SIGMA_DATA * SIGMA_DATA / denom;
    let c_out = scaled / torch_pow(denom, 0.5);
    (c_skip as f64, c_out as f64)
}

/// The timesteps `LCMScheduler.set_timesteps(num_inference_steps)` gives for `config` (strength 1; the
/// config's `original_inference_steps`, default 50). StreamDiffusion maps its `t_index_list` into the
/// 50-step list: `lcm_timesteps(config, 50)?[t_index]`.
pub fn lcm_timesteps(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Vec<i64>> {
    let mut s = LcmScheduler::new(config)?;
    s.set_timesteps(num_inference_steps)?;
    Ok(s.timesteps.iter().map(|&t| t as i64).collect())
}

#[derive(Debug, Clone)]
pub struct LcmScheduler {
    common: Common,
    alphas_cumprod_f64: Vec<f64>,
    original_inference_steps: usize,
    timestep_scaling: f64,
    /// `clip_sample` (LCM's default: false) and `clip_sample_range`.
    clip: Option<f64>,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
}

impl LcmScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(config, &DEFAULTS, false)?;
        Ok(LcmScheduler {
            alphas_cumprod_f64: common.alphas_cumprod.iter().map(|&a| a as f64).collect(),
            common,
            original_inference_steps: config.original_inference_steps.unwrap_or(50),
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0),
            clip: config.clip_sample.unwrap_or(false).then(|| config.clip_sample_range.unwrap_or(1.0)),
            num_inference_steps: None,
            timesteps: Vec::new(),
        })
    }

    /// LCM's schedule: the `original_inference_steps * strength` distillation timesteps `k*i - 1`, sampled
    /// down to `steps` (numpy's `floor(linspace(0, len, steps, endpoint=False))` indices).
    fn compute_timesteps(&self, steps: usize, strength: f64) -> Result<Vec<i64>> {
        let n_train = self.common.num_train_timesteps;
        let original = self.original_inference_steps;
        if original == 0 || original > n_train {
            return Err(Error::invalid(
                "original_inference_steps",
                format!("{original}: must be between 1 and num_train_timesteps ({n_train})"),
            ));
        }
        if steps == 0 || steps > n_train {
            return Err(Error::invalid(
                "num_inference_steps",
                format!("{steps}: must be between 1 and num_train_timesteps ({n_train})"),
            ));
        }
        let k = (n_train / original) as i64;
        let count = (original as f64 * strength) as usize;
        if count / steps < 1 {
            return Err(Error::invalid(
                "num_inference_steps",
                format!("{steps} is more than original_inference_steps x strength ({original} x {strength})"),
            ));
        }
        if steps > original {
            return Err(Error::invalid(
                "num_inference_steps",
                format!("{steps} is more than original_inference_steps ({original})"),
            ));
        }
        // lcm_origin_timesteps reversed: index j holds (count - j) * k - 1. numpy's
        // floor(linspace(0, count, steps, endpoint=False)) is floor(i * (count / steps)).
        let step = count as f64 / steps as f64;
        let indices = (0..steps).map(|i| (i as f64 * step).floor() as usize);
        Ok(indices.map(|j| (count - j) as i64 * k - 1).collect())
    }

    fn alpha_prod(&self, t: f64) -> f32 {
        self.common.alphas_cumprod[t as usize]
    }
}

impl Scheduler for LcmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.set_timesteps_with_strength(steps, 1.0)
    }

    /// `set_timesteps(steps, strength=strength)` as the LCM img2img pipeline calls it (then starts at index 0).
    fn set_timesteps_with_strength(&mut self, steps: usize, strength: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid("strength", format!("{strength}: must be in [0, 1]")));
        }
        let timesteps = self.compute_timesteps(steps, strength)?;
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

    /// LCM's multistep consistency step. On every step but the last (`step_index != num_inference_steps - 1`)
    /// it draws fresh noise of the model output's shape from the global CPU generator, as diffusers does.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<StepOutput> {
        check_index(&self.timesteps, step_index)?;
        let t = self.timesteps[step_index];
        let prev_t = self.timesteps.get(step_index + 1).copied().unwrap_or(t);
        let alpha_prod_t = self.alpha_prod(t);
        let alpha_prod_t_prev = self.alpha_prod(prev_t);
        let (beta_prod_t, beta_prod_t_prev) = (1.0 - alpha_prod_t, 1.0 - alpha_prod_t_prev);
        let (c_skip, c_out) = boundary_condition_scalings(t, self.timestep_scaling);
        let (sqrt_a, sqrt_b) = (torch_sqrt(alpha_prod_t) as f64, torch_sqrt(beta_prod_t) as f64);

        let mut pred_original = match self.common.prediction_type {
            PredictionType::Epsilon => {
                sample.f_sub(&model_output.f_mul_scalar(sqrt_b)?)?.f_div_scalar(sqrt_a)?
            }
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => {
                sample.f_mul_scalar(sqrt_a)?.f_sub(&model_output.f_mul_scalar(sqrt_b)?)?
            }
        };
        if let Some(range) = self.clip {
            pred_original = pred_original.f_clamp(-range, range)?;
        }
        let denoised = pred_original.f_mul_scalar(c_out)?.f_add(&sample.f_mul_scalar(c_skip)?)?;

        let last = self.num_inference_steps.is_none_or(|n| step_index + 1 == n);
        let prev_sample = if last {
            denoised.shallow_clone()
        } else {
            let noise =
                crate::device::randn_cpu(&model_output.size(), model_output.device(), denoised.kind())?;
            denoised
                .f_mul_scalar(torch_sqrt(alpha_prod_t_prev) as f64)?
                .f_add(&noise.f_mul_scalar(torch_sqrt(beta_prod_t_prev) as f64)?)?
        };
        Ok(StepOutput { prev_sample, denoised: Some(denoised) })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(&self.timesteps, step_index)?;
        ddpm::add_noise_in_sample_dtype(original, noise, self.alpha_prod(self.timesteps[step_index]))
    }
}
