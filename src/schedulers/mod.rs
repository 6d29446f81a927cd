//! Noise schedulers, value for value the same as diffusers 0.42.1's `DDIMScheduler`, `LCMScheduler` and
//! `EulerDiscreteScheduler` (same timesteps, same float32 coefficients), plus the DDPM forward process the
//! stream engine uses.
//!
//! A [`SchedulerConfig`] is `scheduler/scheduler_config.json` with every field optional: like diffusers'
//! `from_config`, each scheduler class fills the fields the file leaves out with ITS OWN defaults (DDIM built
//! from SD1.5's PNDM config gets DDIM's `clip_sample: true` unless the file says otherwise, and so on).
//!
//! A pipeline drives a [`Scheduler`] by index: `step_index` is always the position in [`Scheduler::timesteps`]
//! (the full list, img2img included), which is what diffusers' `step_index`/`begin_index` bookkeeping amounts
//! to. The loop diffusers runs is:
//! ```text
//! sched.set_timesteps(n)?;
//! let start = img2img_start_index(n, strength);  // txt2img: 0
//! // (diffusers' LatentConsistencyModelImg2ImgPipeline instead calls set_timesteps_with_strength(n, s)
//! //  and starts at 0)
//! latents = txt2img ? noise * init_noise_sigma : sched.add_noise(&x0, &noise, start)?;
//! for i in start..sched.timesteps().len() {
//!     let inp = sched.scale_model_input(&latents, i)?;
//!     let eps = unet(inp, timesteps()[i] as a tensor of timestep_kind());
//!     latents = sched.step(&eps, i, &latents)?.prev_sample;
//! }
//! ```
//! The Stable Diffusion pipelines also rewrite the config on load (`steps_offset` 1, `clip_sample` false):
//! see [`SchedulerConfig::with_sd_pipeline_overrides`].
pub mod ddim;
pub mod ddpm;
pub mod euler;
pub mod lcm;

pub use ddim::DdimScheduler;
pub use ddpm::{add_noise, alphas_cumprod};
pub use euler::EulerScheduler;
pub use lcm::{boundary_condition_scalings, lcm_timesteps, LcmScheduler};

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use std::str::FromStr;
use tch::{Kind, Tensor};

/// `scheduler_config.json`, every field optional so that each scheduler class applies its own defaults.
/// Keys this crate does not know are ignored (as diffusers ignores keys another class uses).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub dynamic_thresholding_ratio: Option<f64>,
    pub sample_max_value: Option<f64>,
    pub rescale_betas_zero_snr: Option<bool>,
    // LCM
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    // Euler
    pub interpolation_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`. Keys listed in `_use_default_values` are dropped first, as diffusers'
    /// `extract_init_dict` does, so that the class's own defaults apply to them.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::InvalidArgument { msg, .. } => Error::config(path, msg),
            e => e,
        })
    }

    /// Parses the JSON text of a scheduler config (see [`SchedulerConfig::from_file`]).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::invalid("scheduler config", e.to_string());
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
        if let Some(obj) = value.as_object_mut() {
            if let Some(serde_json::Value::Array(keys)) = obj.remove("_use_default_values") {
                for k in keys.iter().filter_map(|k| k.as_str()) {
                    obj.remove(k);
                }
            }
        }
        serde_json::from_value(value).map_err(bad)
    }

    /// The config as `StableDiffusionPipeline`/`StableDiffusionImg2ImgPipeline.__init__` leave it: they force
    /// `steps_offset` to 1 and `clip_sample` to false on whatever scheduler they are given (the LCM pipelines do
    /// not). Apply this to mirror those pipelines; it changes DDIM's (and Euler "leading") timesteps.
    pub fn with_sd_pipeline_overrides(mut self) -> Self {
        self.steps_offset = Some(1);
        self.clip_sample = Some(false);
        self
    }

    /// The config with `timestep_spacing` replaced by `spacing` when one is given: what diffusers'
    /// `Scheduler.from_config(config, timestep_spacing=...)` builds from (a keyword argument wins over the config's
    /// value, and over a class default the file's `_use_default_values` asked for). Every class here has the
    /// option; `LCMScheduler` takes it and, like diffusers', never reads it (its timesteps come from
    /// `original_inference_steps`), so for LCM the override changes nothing.
    pub fn with_timestep_spacing(mut self, spacing: Option<TimestepSpacing>) -> Self {
        if let Some(s) = spacing {
            self.timestep_spacing = Some(s.as_str().to_string());
        }
        self
    }

    /// Refuses options this crate does not implement, naming the option.
    fn refuse_unsupported(&self) -> Result<()> {
        let on = |v: Option<bool>| v.unwrap_or(false);
        for (name, value) in [
            ("thresholding", self.thresholding),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
        ] {
            if on(value) {
                return Err(Error::Unsupported(format!("scheduler option `{name}: true`")));
            }
        }
        Ok(())
    }
}

/// The schedulers this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Lcm,
    Euler,
    /// `EulerAncestralDiscreteScheduler` (`euler_a`).
    EulerAncestral,
}

impl FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ddim" => Ok(SchedulerKind::Ddim),
            "lcm" => Ok(SchedulerKind::Lcm),
            "euler" => Ok(SchedulerKind::Euler),
            "euler_a" | "euler-a" | "euler_ancestral" | "euler-ancestral" => {
                Ok(SchedulerKind::EulerAncestral)
            }
            other => {
                Err(Error::invalid("scheduler", format!("`{other}`: expected ddim, lcm, euler or euler_a")))
            }
        }
    }
}

impl SchedulerKind {
    /// The kind that reproduces diffusers' class `name`, if any.
    pub fn from_class_name(name: &str) -> Option<SchedulerKind> {
        [SchedulerKind::Ddim, SchedulerKind::Lcm, SchedulerKind::Euler, SchedulerKind::EulerAncestral]
            .into_iter()
            .find(|k| k.class_name() == name)
    }

    /// The diffusers class this kind reproduces.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
        }
    }
}

/// What a scheduler step gives back.
#[derive(Debug)]
pub struct StepOutput {
    /// The latents for the next step (`x_{t-1}`).
    pub prev_sample: Tensor,
    /// LCM: `denoised` (what the LCM pipeline decodes at the end). DDIM and Euler: `pred_original_sample`.
    pub denoised: Option<Tensor>,
}

/// A scheduler a diffusers-exact denoising loop can drive (see the module docs for the loop).
/// `step_index` is the position in [`Scheduler::timesteps`].
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;
    /// Computes the inference timesteps, as diffusers' `set_timesteps(steps)`.
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;
    /// `set_timesteps(steps, strength=...)`: only LCM takes a strength (its img2img pipeline); the others
    /// accept only 1.0 here and do img2img through [`img2img_start_index`].
    fn set_timesteps_with_strength(&mut self, steps: usize, strength: f64) -> Result<()> {
        if strength != 1.0 {
            return Err(Error::invalid(
                "strength",
                format!(
                    "{} takes no strength in set_timesteps; use img2img_start_index",
                    self.kind().class_name()
                ),
            ));
        }
        self.set_timesteps(steps)
    }
    /// The timesteps diffusers holds after `set_timesteps` (integers for DDIM/LCM, float32 values for Euler).
    fn timesteps(&self) -> &[f64];
    /// The dtype of diffusers' `scheduler.timesteps` (Int64 for DDIM/LCM, Float for Euler).
    fn timestep_kind(&self) -> Kind;
    /// `num_inference_steps` as last set, if any.
    fn num_inference_steps(&self) -> Option<usize>;
    /// The factor the initial txt2img noise is multiplied by (exact float32 value).
    fn init_noise_sigma(&self) -> f64;
    /// The training schedule's cumulative alpha products (float32 values, Euler's zero-SNR patch included).
    fn alphas_cumprod(&self) -> &[f64];
    /// Euler's sigmas (one more than the timesteps); `None` for the others.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    /// The UNet input for `sample` at `step_index` (identity except for Euler).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;
    /// One denoising step from `step_index`. LCM draws its noise with [`crate::device::randn_cpu`] (the global
    /// CPU generator) on every step but the last, as diffusers does with the pipeline's generator.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<StepOutput>;
    /// img2img noising at `timesteps()[step_index]` (DDPM forward process for DDIM/LCM, `x + sigma * noise`
    /// for Euler), as the pipeline's `scheduler.add_noise(x0, noise, timesteps[:1])` after `set_begin_index`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
}

/// Builds a scheduler of `kind` from `config` (with that class's defaults for the missing fields).
/// Timesteps are empty until [`Scheduler::set_timesteps`] is called.
pub fn build(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config)?),
        SchedulerKind::Lcm => Box::new(LcmScheduler::new(config)?),
        SchedulerKind::Euler => Box::new(EulerScheduler::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(EulerScheduler::ancestral(config)?),
    })
}

/// img2img's first kept step, as the pipelines' `get_timesteps(num_inference_steps, strength)` computes
/// `t_start` (and passes to `set_begin_index`; all three schedulers have order 1).
pub fn img2img_start_index(num_inference_steps: usize, strength: f64) -> usize {
    let init_timestep = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    num_inference_steps - init_timestep
}

// ---------------------------------------------------------------------------------------------------------
// Shared pieces: resolved options and numpy-exact helpers.

/// What the model output predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    fn parse(s: &str, accept_original_sample: bool) -> Result<Self> {
        match s {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            "original_sample" if accept_original_sample => Ok(PredictionType::Sample),
            other => Err(Error::invalid(
                "prediction_type",
                format!("`{other}`: expected epsilon, v_prediction or sample"),
            )),
        }
    }
}

/// How inference timesteps are spread over the training range (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    /// The three values, as diffusers spells them.
    pub const CHOICES: &'static str = "leading, trailing, linspace";

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            "linspace" => Ok(TimestepSpacing::Linspace),
            other => Err(Error::invalid(
                "timestep_spacing",
                format!("`{other}`: expected one of {}", Self::CHOICES),
            )),
        }
    }

    /// diffusers' spelling (`"trailing"`).
    pub fn as_str(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        }
    }
}

impl FromStr for TimestepSpacing {
    type Err = Error;
    /// Accepts diffusers' spellings only (as its schedulers compare them).
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s.trim())
    }
}

impl std::fmt::Display for TimestepSpacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One class's defaults for the fields all three share.
pub(crate) struct ClassDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub timestep_spacing: &'static str,
}

/// The options every scheduler here reads, resolved with the class's defaults and validated.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub num_train_timesteps: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// float32 values of diffusers' `alphas_cumprod` tensor.
    pub alphas_cumprod: Vec<f32>,
}

impl Common {
    pub fn resolve(
        config: &SchedulerConfig,
        d: &ClassDefaults,
        accept_original_sample: bool,
    ) -> Result<Self> {
        config.refuse_unsupported()?;
        let num_train_timesteps = config.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps == 0 {
            return Err(Error::invalid("num_train_timesteps", "must be at least 1"));
        }
        let prediction_type = PredictionType::parse(
            config.prediction_type.as_deref().unwrap_or("epsilon"),
            accept_original_sample,
        )?;
        let timestep_spacing =
            TimestepSpacing::parse(config.timestep_spacing.as_deref().unwrap_or(d.timestep_spacing))?;
        let alphas_cumprod = ddpm::alphas_cumprod_f32(config, d)?;
        Ok(Common {
            num_train_timesteps,
            prediction_type,
            timestep_spacing,
            steps_offset: config.steps_offset.unwrap_or(0),
            alphas_cumprod,
        })
    }
}

/// `np.linspace(start, stop, num)` (endpoint included) in float64, value for value.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for float64 values: numpy fills `start + i * ((start + step) - start)`.
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    let len = if len.is_finite() && len > 0.0 { len as usize } else { 0 };
    let delta = (start + step) - start;
    (0..len).map(|i| if i == 0 { start } else { start + i as f64 * delta }).collect()
}

/// libtorch's float32 `x ** e` on one CPU value. diffusers computes its coefficients on float32 0-dim tensors,
/// and libtorch's float32 `sqrt`/`pow` are not always correctly rounded (e.g. `sqrt(0.94337654)` is one ulp
/// off `f32::sqrt`), so these go through libtorch; `+ - * /` are IEEE in both and done in f32.
pub(crate) fn torch_pow(x: f32, e: f64) -> f32 {
    Tensor::from(x).pow_tensor_scalar(e).double_value(&[]) as f32
}

/// libtorch's float32 `x.sqrt()` on one CPU value (see [`torch_pow`]).
pub(crate) fn torch_sqrt(x: f32) -> f32 {
    Tensor::from(x).sqrt().double_value(&[]) as f32
}

/// Checks `step_index` against the timesteps set.
pub(crate) fn check_index(timesteps: &[f64], step_index: usize) -> Result<()> {
    if timesteps.is_empty() {
        return Err(Error::invalid("scheduler", "set_timesteps must be called before stepping"));
    }
    if step_index >= timesteps.len() {
        return Err(Error::invalid(
            "step_index",
            format!("{step_index} is past the {} timesteps set", timesteps.len()),
        ));
    }
    Ok(())
}
