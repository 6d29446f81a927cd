//! diffusers' `EulerDiscreteScheduler` as the Stable Diffusion pipelines drive it (`s_churn` 0, so no noise
//! is ever drawn in `step`), and `EulerAncestralDiscreteScheduler` (SD-Turbo's and SDXL-Turbo's scheduler): the
//! same schedule, with a step that goes down to `sigma_down` and adds fresh noise times `sigma_up`, drawn from
//! the process's seeded CPU generator as diffusers draws it from the pipeline's generator.
use super::{
    check_index, np_arange_f64, np_linspace, torch_pow, ClassDefaults, Common, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, StepOutput, TimestepSpacing,
};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

/// `EulerDiscreteScheduler.__init__` defaults.
pub(crate) const DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: "linear",
    timestep_spacing: "linspace",
};

#[derive(Debug, Clone)]
pub struct EulerScheduler {
    common: Common,
    alphas_cumprod_f64: Vec<f64>,
    /// `final_sigmas_type: sigma_min` (else "zero").
    final_sigma_min: bool,
    /// `timestep_type: continuous` with v-prediction: the UNet gets `0.25 * ln(sigma)` as its timestep.
    continuous_timesteps: bool,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
    /// float32 sigmas (the training ones, flipped, plus 0 until `set_timesteps`).
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    /// `EulerAncestralDiscreteScheduler`.
    ancestral: bool,
}

impl EulerScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Self::build(config, false)
    }

    /// diffusers' `EulerAncestralDiscreteScheduler` (it has no interpolation, final-sigma or timestep-type
    /// options: a config naming them, from another class, is read without them).
    pub fn ancestral(config: &SchedulerConfig) -> Result<Self> {
        Self::build(config, true)
    }

    fn build(config: &SchedulerConfig, ancestral: bool) -> Result<Self> {
        let mut common = Common::resolve(config, &DEFAULTS, true)?;
        common.alphas_cumprod = euler_alphas_cumprod(config)?;
        if ancestral {
            if common.prediction_type == PredictionType::Sample {
                return Err(Error::Unsupported(
                    "EulerAncestralDiscreteScheduler with prediction_type `sample` (diffusers does not implement it \
                     either)"
                        .into(),
                ));
            }
            return Self::with(common, false, false, true);
        }
        match config.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => {}
            "log_linear" => {
                return Err(Error::Unsupported("scheduler option `interpolation_type: log_linear`".into()))
            }
            other => {
                return Err(Error::invalid(
                    "interpolation_type",
                    format!("`{other}`: expected linear or log_linear"),
                ))
            }
        }
        let final_sigma_min = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(Error::invalid(
                    "final_sigmas_type",
                    format!("`{other}`: expected zero or sigma_min"),
                ))
            }
        };
        let continuous = match config.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => false,
            "continuous" => true,
            other => {
                return Err(Error::invalid(
                    "timestep_type",
                    format!("`{other}`: expected discrete or continuous"),
                ))
            }
        };
        Self::with(common, final_sigma_min, continuous, false)
    }

    fn with(common: Common, final_sigma_min: bool, continuous: bool, ancestral: bool) -> Result<Self> {
        let mut sigmas: Vec<f32> = training_sigmas(&common.alphas_cumprod)?.into_iter().rev().collect();
        sigmas.push(0.0);
        let mut s = EulerScheduler {
            alphas_cumprod_f64: common.alphas_cumprod.iter().map(|&a| a as f64).collect(),
            continuous_timesteps: continuous && common.prediction_type == PredictionType::VPrediction,
            common,
            final_sigma_min,
            num_inference_steps: None,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            sigmas_f64: Vec::new(),
            ancestral,
        };
        s.set_sigmas(sigmas);
        Ok(s)
    }

    fn set_sigmas(&mut self, sigmas: Vec<f32>) {
        self.sigmas_f64 = sigmas.iter().map(|&s| s as f64).collect();
        self.sigmas = sigmas;
    }

    /// The float32 timesteps of `set_timesteps` before sigma interpolation.
    fn spaced_timesteps(&self, steps: usize) -> Vec<f32> {
        let n_train = self.common.num_train_timesteps;
        match self.common.timestep_spacing {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (n_train - 1) as f64, steps).iter().rev().map(|&t| t as f32).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n_train / steps;
                let offset = self.common.steps_offset as f32;
                (0..steps).rev().map(|i| (i * ratio) as f32 + offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                np_arange_f64(n_train as f64, 0.0, -ratio)
                    .iter()
                    .map(|t| t.round_ties_even() as f32 - 1.0)
                    .collect()
            }
        }
    }

    fn sigma(&self, step_index: usize) -> f32 {
        self.sigmas[step_index]
    }
}

/// Euler's `alphas_cumprod`: with `rescale_betas_zero_snr`, Euler alone sets the last value to 2^-24 so that
/// its sigma stays finite.
pub(crate) fn euler_alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let mut ac = super::ddpm::alphas_cumprod_f32(config, &DEFAULTS)?;
    if config.rescale_betas_zero_snr.unwrap_or(false) {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(ac)
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` on the float32 tensor, in training order.
fn training_sigmas(alphas_cumprod: &[f32]) -> Result<Vec<f32>> {
    let ac = Tensor::f_from_slice(alphas_cumprod)?;
    let sigmas = ac.f_neg()?.f_add_scalar(1.0)?.f_div(&ac)?.f_pow_tensor_scalar(0.5)?;
    Ok(Vec::<f32>::try_from(&sigmas)?)
}

/// diffusers' `(sigma**2 + 1) ** 0.5` on a float32 0-dim tensor.
fn sqrt_sigma_sq_plus_one(sigma: f32) -> f32 {
    torch_pow(torch_pow(sigma, 2.0) + 1.0, 0.5)
}

/// `np.interp(x, arange(len(fp)), fp)` in float64, as numpy computes it.
fn interp_on_integer_grid(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / ((j + 1) as f64 - j as f64);
    slope * (x - j as f64) + fp[j]
}

impl Scheduler for EulerScheduler {
    fn kind(&self) -> SchedulerKind {
        if self.ancestral {
            SchedulerKind::EulerAncestral
        } else {
            SchedulerKind::Euler
        }
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::invalid("num_inference_steps", "must be at least 1"));
        }
        let timesteps = self.spaced_timesteps(steps);
        let train: Vec<f64> =
            training_sigmas(&self.common.alphas_cumprod)?.iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f32> =
            timesteps.iter().map(|&t| interp_on_integer_grid(t as f64, &train) as f32).collect();
        let a0 = self.common.alphas_cumprod[0];
        sigmas.push(if self.final_sigma_min { torch_pow((1.0 - a0) / a0, 0.5) } else { 0.0 });
        self.timesteps = if self.continuous_timesteps {
            // torch: 0.25 * sigma.log() on each float32 0-dim tensor.
            let mut v = Vec::with_capacity(steps);
            for &s in &sigmas[..steps] {
                v.push(Tensor::from(s).f_log()?.f_mul_scalar(0.25)?.double_value(&[]) as f32 as f64);
            }
            v
        } else {
            timesteps.iter().map(|&t| t as f64).collect()
        };
        self.set_sigmas(sigmas);
        self.num_inference_steps = Some(steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn timestep_kind(&self) -> Kind {
        Kind::Float
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// The largest sigma ("linspace"/"trailing"), or `sqrt(max_sigma^2 + 1)` ("leading"), in float32.
    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match self.common.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => sqrt_sigma_sq_plus_one(max) as f64,
        }
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod_f64
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }

    /// `sample / sqrt(sigma^2 + 1)`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(&self.timesteps, step_index)?;
        let sigma = self.sigma(step_index);
        Ok(sample.f_div_scalar(sqrt_sigma_sq_plus_one(sigma) as f64)?)
    }

    /// The Euler step in float32 (diffusers upcasts the sample), cast back to the model output's dtype.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<StepOutput> {
        check_index(&self.timesteps, step_index)?;
        let sample = sample.f_to_kind(Kind::Float)?;
        let sigma = self.sigma(step_index);
        let sigma_hat = sigma * (0.0 + 1.0); // gamma is 0 with s_churn 0
        let pred_original = match self.common.prediction_type {
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::Epsilon => sample.f_sub(&model_output.f_mul_scalar(sigma_hat as f64)?)?,
            PredictionType::VPrediction => {
                let c_out = -sigma / sqrt_sigma_sq_plus_one(sigma);
                let c_in = torch_pow(sigma, 2.0) + 1.0;
                model_output.f_mul_scalar(c_out as f64)?.f_add(&sample.f_div_scalar(c_in as f64)?)?
            }
        };
        let derivative = sample.f_sub(&pred_original)?.f_div_scalar(sigma_hat as f64)?;
        if !self.ancestral {
            let dt = self.sigmas[step_index + 1] - sigma_hat;
            let prev_sample =
                sample.f_add(&derivative.f_mul_scalar(dt as f64)?)?.f_to_kind(model_output.kind())?;
            return Ok(StepOutput { prev_sample, denoised: Some(pred_original) });
        }
        // Ancestral: down to sigma_down, then fresh noise times sigma_up (float32 0-dim tensor arithmetic).
        let (from, to) = (sigma, self.sigmas[step_index + 1]);
        let sq = |x: f32| torch_pow(x, 2.0);
        let sigma_up = torch_pow(sq(to) * (sq(from) - sq(to)) / sq(from), 0.5);
        let sigma_down = torch_pow(sq(to) - sq(sigma_up), 0.5);
        let dt = sigma_down - sigma;
        let prev = sample.f_add(&derivative.f_mul_scalar(dt as f64)?)?;
        let noise =
            crate::device::randn_cpu(&model_output.size(), model_output.device(), model_output.kind())?;
        let prev_sample =
            prev.f_add(&noise.f_mul_scalar(sigma_up as f64)?)?.f_to_kind(model_output.kind())?;
        Ok(StepOutput { prev_sample, denoised: Some(pred_original) })
    }

    /// `original + noise * sigma` with the sigma of `step_index` cast to the sample's dtype first.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(&self.timesteps, step_index)?;
        let shape = vec![1i64; original.dim()];
        let sigma = Tensor::f_from_slice(&[self.sigma(step_index)])?
            .f_to_kind(original.kind())?
            .f_to_device(original.device())?
            .f_reshape(&shape)?;
        Ok(original.f_add(&noise.f_mul(&sigma)?)?)
    }
}
