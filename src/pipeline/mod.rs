//! Single-image txt2img and img2img, step for step as diffusers' StableDiffusionPipeline and
//! StableDiffusionImg2ImgPipeline (and, for SDXL models, StableDiffusionXLPipeline and
//! StableDiffusionXLImg2ImgPipeline) compute them, drawing noise from the seeded CPU generator in the same
//! order, so that on CPU in fp32 the same model, prompt and seed give the same picture.
use crate::device::{randn_cpu, seed_cpu};
use crate::error::{Error, Result};
use crate::models::controlnet::{ControlNetModel, ControlScale};
use crate::models::ip_adapter::IpScale;
use crate::models::stable_diffusion::{StableDiffusion, TextEmbedding};
use crate::models::unet::{AddedCond, ControlResiduals, ImageCond, UNetExtra};
use crate::schedulers::{self, SchedulerKind};
use tch::{Kind, Tensor};

/// A ControlNet's inputs for one generation, as diffusers' StableDiffusionControlNetPipeline takes them.
/// The ControlNet itself is the one loaded with the model ([`StableDiffusion::controlnet`]).
#[derive(Debug)]
pub struct Control {
    /// The conditioning image, (1, 3, height, width), RGB in [0, 1] (see [`control_image`]).
    pub image: Tensor,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// diffusers' `guess_mode` (forced on for `global_pool_conditions` ControlNets).
    pub guess_mode: bool,
    /// `control_guidance_start` / `control_guidance_end`: the fraction of the steps the ControlNet acts in.
    pub guidance_start: f64,
    pub guidance_end: f64,
}

impl Control {
    /// A control image at scale `scale`, acting on every step, not in guess mode (diffusers' defaults).
    pub fn new(image: Tensor, scale: f64) -> Self {
        Control { image, scale, guess_mode: false, guidance_start: 0.0, guidance_end: 1.0 }
    }

    fn validate(&self, p: &GenerateParams) -> Result<()> {
        let size = self.image.size();
        if size.len() != 4 || size[0] != 1 || size[1] != 3 {
            return Err(Error::invalid(
                "control image",
                format!("tensor of shape {size:?}, expected [1, 3, H, W]"),
            ));
        }
        if (size[3], size[2]) != (p.width, p.height) {
            return Err(Error::invalid(
                "control image",
                format!(
                    "is {}x{}, the generation is {}x{} (resize it with `control_image`)",
                    size[3], size[2], p.width, p.height
                ),
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid("controlnet scale", format!("{} is not finite", self.scale)));
        }
        if !(0.0..=1.0).contains(&self.guidance_start)
            || !(0.0..=1.0).contains(&self.guidance_end)
            || self.guidance_start >= self.guidance_end
        {
            return Err(Error::invalid(
                "control guidance start/end",
                format!(
                    "{}..{} is not a range 0 <= start < end <= 1",
                    self.guidance_start, self.guidance_end
                ),
            ));
        }
        Ok(())
    }
}

/// diffusers' control-image preprocessing (`VaeImageProcessor(do_convert_rgb=True, do_normalize=False)`):
/// resized to `width` x `height` when the size differs (Lanczos), RGB, scaled to [0, 1]; (1, 3, H, W) fp32.
pub fn control_image(img: &image::RgbImage, width: i64, height: i64) -> Result<Tensor> {
    if width <= 0 || height <= 0 {
        return Err(Error::invalid("control image", format!("target size {width}x{height}")));
    }
    let img = crate::io::image::resize(img.clone(), width as u32, height as u32);
    let raw = Tensor::f_from_data_size(img.as_raw(), &[height, width, 3], Kind::Uint8)?;
    Ok(raw.f_permute([2, 0, 1])?.f_unsqueeze(0)?.f_to_kind(Kind::Float)?.f_div_scalar(255.0)?)
}

/// An image prompt for one generation, as diffusers' pipelines take `ip_adapter_image` with
/// `set_ip_adapter_scale(scale)`. The IP-Adapter is the one loaded with the model
/// ([`StableDiffusion::load_ip_adapter`]).
#[derive(Debug, Clone)]
pub struct ImagePrompt {
    pub image: image::RgbImage,
    pub scale: IpScale,
}

/// The optional guides of a generation: a ControlNet's control image and an IP-Adapter's image prompt.
#[derive(Debug, Clone, Copy, Default)]
pub struct Guides<'a> {
    pub control: Option<&'a Control>,
    pub image_prompt: Option<&'a ImagePrompt>,
}

/// What every single-image generation takes.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// Used when guidance > 1 (classifier-free guidance); empty when not given, as in diffusers.
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// Replaces the scheduler config's `timestep_spacing` (diffusers' `from_config(config,
    /// timestep_spacing=...)`); `None` keeps the model's.
    pub timestep_spacing: Option<schedulers::TimestepSpacing>,
    pub guidance: f64,
    pub width: i64,
    pub height: i64,
    /// Skips this many final CLIP layers (diffusers' clip_skip).
    pub clip_skip: Option<usize>,
    /// SDXL only: the size and crop conditioning (ignored by other models).
    pub micro: MicroConditioning,
}

/// SDXL's micro-conditioning, as diffusers' SDXL pipelines take it: `original_size` and `target_size` as
/// (height, width), `crops_coords_top_left` as (top, left). Sizes left `None` are the generated image's size
/// (diffusers' defaults); the negative side uses the same values (diffusers, when no negative ones are given).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroConditioning {
    pub original_size: Option<(i64, i64)>,
    pub crops_coords_top_left: (i64, i64),
    pub target_size: Option<(i64, i64)>,
}

impl MicroConditioning {
    /// `add_time_ids` for an image of `height` x `width` (the default: (h, w), (0, 0), (h, w)).
    pub fn time_ids(&self, height: i64, width: i64) -> [f64; 6] {
        let (oh, ow) = self.original_size.unwrap_or((height, width));
        let (top, left) = self.crops_coords_top_left;
        let (th, tw) = self.target_size.unwrap_or((height, width));
        [oh as f64, ow as f64, top as f64, left as f64, th as f64, tw as f64]
    }

    /// [`Self::time_ids`] as the UNet takes them: one row per batch item, (rows, 6), in `kind` on `device`.
    pub fn time_ids_tensor(
        &self,
        height: i64,
        width: i64,
        rows: i64,
        device: tch::Device,
        kind: Kind,
    ) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&self.time_ids(height, width))?
            .f_to_kind(kind)?
            .f_to_device(device)?
            .f_unsqueeze(0)?
            .f_repeat([rows, 1])?)
    }

    fn validate(&self) -> Result<()> {
        for (name, size) in [("original_size", self.original_size), ("target_size", self.target_size)] {
            if let Some((h, w)) = size {
                if !(1..=16384).contains(&h) || !(1..=16384).contains(&w) {
                    return Err(Error::invalid(name, format!("{w}x{h} is not within 1..=16384 per side")));
                }
            }
        }
        let (top, left) = self.crops_coords_top_left;
        if !(0..=16384).contains(&top) || !(0..=16384).contains(&left) {
            return Err(Error::invalid("crop", format!("({top}, {left}) is not within 0..=16384")));
        }
        Ok(())
    }
}

impl GenerateParams {
    /// Checks sizes and counts against the model; errors name the flag.
    pub fn validate(&self, sd: &StableDiffusion) -> Result<()> {
        let f = sd.vae_scale_factor();
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v <= 0 || v % 8 != 0 || v % f != 0 {
                return Err(Error::invalid(name, format!("{v} is not a positive multiple of {}", f.max(8))));
            }
            if v > 4096 {
                return Err(Error::invalid(name, format!("{v} is larger than 4096")));
            }
        }
        if self.steps == 0 || self.steps > 1000 {
            return Err(Error::invalid("steps", format!("{} is not in 1..=1000", self.steps)));
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Err(Error::invalid("guidance", format!("{} is not a finite value >= 0", self.guidance)));
        }
        self.micro.validate()
    }
}

/// The conditioning a denoising loop needs: text embeddings (negative first when guided), for
/// guidance-distilled UNets (LCM) the guidance embedding, for SDXL the pooled text and time ids, and an
/// IP-Adapter's image tokens (the "no image" tokens first when guided).
struct Conditioning<'a> {
    embeddings: Tensor,
    guided: bool,
    timestep_cond: Option<Tensor>,
    added_cond: Option<AddedCond>,
    image: Option<ImageCond<'a>>,
}

/// The IP-Adapter's input for every step: the image's tokens (after the "no image" tokens when guided, as
/// diffusers' `prepare_ip_adapter_image_embeds` orders them) and the scale of every cross-attention.
fn image_cond<'a>(sd: &'a StableDiffusion, prompt: &ImagePrompt, guided: bool) -> Result<ImageCond<'a>> {
    let model = sd.image_prompt.as_ref().ok_or_else(|| {
        Error::invalid("ip image", "given, but no IP-Adapter is loaded (pass --ip-adapter)")
    })?;
    let emb = model.embed(&prompt.image)?;
    let tokens = if guided { Tensor::f_cat(&[&emb.uncond, &emb.cond], 0)? } else { emb.cond };
    let rows = tokens.size()[0] as usize;
    let scales = sd.ip_layer_scales(&prompt.scale)?;
    Ok(ImageCond {
        layers: model.adapter.layers(),
        tokens: tokens.f_to_device(sd.device)?.f_to_kind(sd.kind)?,
        scales: vec![scales; rows],
    })
}

/// `height` x `width` is the generated image's size (SDXL's original and target size).
fn conditioning<'a>(
    sd: &'a StableDiffusion,
    p: &GenerateParams,
    height: i64,
    width: i64,
    image_prompt: Option<&ImagePrompt>,
) -> Result<Conditioning<'a>> {
    let cond = sd.encode_text(&p.prompt, p.clip_skip)?;
    // diffusers: classifier-free guidance only when guidance > 1 and the UNet has no guidance embedding.
    let has_guidance_embedding = sd.unet_config.time_cond_proj_dim.is_some();
    let guided = p.guidance > 1.0 && !has_guidance_embedding;
    let text = if guided {
        let neg = sd.encode_negative(p.negative_prompt.as_deref(), &cond)?;
        TextEmbedding::cat(&[&neg, &cond])?
    } else {
        cond
    };
    let batch = text.hidden.size()[0];
    let timestep_cond = match sd.unet_config.time_cond_proj_dim {
        Some(dim) => {
            Some(guidance_embedding(&[p.guidance - 1.0], dim)?.f_to_device(sd.device)?.f_to_kind(sd.kind)?)
        }
        None => None,
    };
    let added_cond = match text.pooled {
        Some(pooled) => {
            let time_ids = p.micro.time_ids_tensor(height, width, batch, sd.device, sd.kind)?;
            Some(AddedCond { text_embeds: pooled, time_ids })
        }
        None => None,
    };
    let image = image_prompt.map(|ip| image_cond(sd, ip, guided)).transpose()?;
    Ok(Conditioning { embeddings: text.hidden, guided, timestep_cond, added_cond, image })
}

/// The scheduler config a pipeline builds the chosen scheduler from: SD pipelines' load-time overrides
/// ([`pipeline_scheduler_config`]); SDXL pipelines take the model's config as it is. A `timestep_spacing` in
/// `p` then replaces the config's, as `Class.from_config(pipe.scheduler.config, timestep_spacing=...)` does.
fn scheduler_config(sd: &StableDiffusion, p: &GenerateParams) -> schedulers::SchedulerConfig {
    let config = if sd.is_sdxl() {
        sd.scheduler_config.clone()
    } else {
        pipeline_scheduler_config(&sd.scheduler_config)
    };
    config.with_timestep_spacing(p.timestep_spacing)
}

/// The sinusoidal guidance-scale embedding of guidance-distilled models (diffusers'
/// `get_guidance_scale_embedding`), (len(w), dim) in fp32.
pub fn guidance_embedding(w: &[f64], dim: i64) -> Result<Tensor> {
    let w = Tensor::f_from_slice(w)?.f_to_kind(Kind::Float)?.f_mul_scalar(1000.0)?;
    let half = dim / 2;
    let scale = Tensor::from(10000.0f32).f_log()?.f_div_scalar((half - 1) as f64)?;
    let freqs = Tensor::f_arange(half, (Kind::Float, tch::Device::Cpu))?.f_mul(&scale.f_neg()?)?.f_exp()?;
    let emb = w.f_unsqueeze(1)?.f_mul(&freqs.f_unsqueeze(0)?)?;
    let mut emb = Tensor::f_cat(&[emb.f_sin()?, emb.f_cos()?], 1)?;
    if dim % 2 == 1 {
        emb = emb.f_constant_pad_nd([0, 1])?;
    }
    Ok(emb)
}

/// The scheduler config as diffusers' StableDiffusionPipeline leaves it after loading (its `__init__` forces
/// `steps_offset` to 1 and turns a true `clip_sample` off, on the scheduler it was loaded with) and before the
/// chosen scheduler class is built from it with `from_config`. A `clip_sample` the file does not name is true
/// for a loaded DDIM/DDPM scheduler (their default), so it is turned off too; for other loaded classes it stays
/// absent and the chosen class's own default applies.
pub fn pipeline_scheduler_config(c: &schedulers::SchedulerConfig) -> schedulers::SchedulerConfig {
    let mut c = c.clone();
    c.steps_offset = Some(1);
    let loaded_clips_by_default =
        matches!(c.class_name.as_deref(), Some("DDIMScheduler") | Some("DDPMScheduler"));
    if c.clip_sample.is_some() || loaded_clips_by_default {
        c.clip_sample = Some(false);
    }
    c
}

/// The ControlNet and its prepared inputs for a denoising loop.
struct ControlRun<'a> {
    net: &'a ControlNetModel,
    control: &'a Control,
    /// The control image on the model's device and dtype, duplicated for guidance unless in guess mode.
    image: Tensor,
    guess_mode: bool,
}

fn control_run<'a>(
    sd: &'a StableDiffusion,
    p: &GenerateParams,
    control: Option<&'a Control>,
    guided: bool,
) -> Result<Option<ControlRun<'a>>> {
    let Some(control) = control else { return Ok(None) };
    let net = sd.controlnet.as_ref().ok_or_else(|| {
        Error::invalid("control image", "given, but no ControlNet is loaded (pass --controlnet)")
    })?;
    control.validate(p)?;
    let guess_mode = control.guess_mode || net.forces_guess_mode();
    let image = control.image.f_to_device(sd.device)?.f_to_kind(sd.kind)?;
    let image = if guided && !guess_mode { Tensor::f_cat(&[&image, &image], 0)? } else { image };
    Ok(Some(ControlRun { net, control, image, guess_mode }))
}

impl ControlRun<'_> {
    /// diffusers' `controlnet_keep`: 0 outside [start, end) of the loop's steps, else 1.
    fn keep(&self, i: usize, n: usize) -> f64 {
        let (i, n) = (i as f64, n as f64);
        let off = i / n < self.control.guidance_start || (i + 1.0) / n > self.control.guidance_end;
        if off {
            0.0
        } else {
            1.0
        }
    }

    /// The residuals for one step, as diffusers' ControlNet pipelines compute them: in guess mode with
    /// guidance, from the conditional half only, zeros for the unconditional half.
    #[allow(clippy::too_many_arguments)]
    fn residuals(
        &self,
        scheduler: &dyn schedulers::Scheduler,
        step: usize,
        latents: &Tensor,
        input: &Tensor,
        t: &Tensor,
        cond: &Conditioning<'_>,
        keep: f64,
    ) -> Result<ControlResiduals> {
        let scale = ControlScale::One(self.control.scale * keep);
        if self.guess_mode && cond.guided {
            // diffusers: in guess mode only the conditional half goes through the ControlNet.
            let x = scheduler.scale_model_input(latents, step)?;
            let second = |t: &Tensor| -> Result<Tensor> { Ok(t.f_chunk(2, 0)?.remove(1)) };
            let text = second(&cond.embeddings)?;
            let added = match &cond.added_cond {
                Some(a) => {
                    Some(AddedCond { text_embeds: second(&a.text_embeds)?, time_ids: second(&a.time_ids)? })
                }
                None => None,
            };
            let t1 = t.f_narrow(0, 0, 1)?;
            let r = self.net.forward(&x, &t1, &text, added.as_ref(), &self.image, scale, true)?;
            let zeros_first =
                |d: &Tensor| -> Result<Tensor> { Ok(Tensor::f_cat(&[&d.f_zeros_like()?, d], 0)?) };
            Ok(ControlResiduals {
                down: r.down.iter().map(zeros_first).collect::<Result<Vec<_>>>()?,
                mid: zeros_first(&r.mid)?,
            })
        } else {
            let added = cond.added_cond.as_ref();
            self.net.forward(input, t, &cond.embeddings, added, &self.image, scale, self.guess_mode)
        }
    }
}

/// Runs the scheduler's loop from `start` over its timesteps, starting from `latents`.
fn denoise(
    sd: &StableDiffusion,
    scheduler: &mut dyn schedulers::Scheduler,
    cond: &Conditioning<'_>,
    guidance: f64,
    mut latents: Tensor,
    start: usize,
    control: Option<&ControlRun>,
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    let n = timesteps.len().saturating_sub(start);
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        let input =
            if cond.guided { Tensor::f_cat(&[&latents, &latents], 0)? } else { latents.shallow_clone() };
        let input = scheduler.scale_model_input(&input, i)?;
        let batch = input.size()[0];
        let t = Tensor::f_full([batch], t, (scheduler.timestep_kind(), sd.device))?;
        let cond_b =
            cond.timestep_cond.as_ref().map(|c| c.f_expand([batch, c.size()[1]], false)).transpose()?;
        let residuals = match control {
            Some(c) => Some(c.residuals(&*scheduler, i, &latents, &input, &t, cond, c.keep(i - start, n))?),
            None => None,
        };
        let extra = UNetExtra {
            timestep_cond: cond_b.as_ref(),
            added_cond: cond.added_cond.as_ref(),
            control: residuals.as_ref(),
            image: cond.image.as_ref(),
        };
        let eps = sd.unet.forward_with(&input, &t, &cond.embeddings, &extra)?;
        let eps = if cond.guided {
            let parts = eps.f_chunk(2, 0)?;
            let (uncond, text) = (&parts[0], &parts[1]);
            uncond.f_add(&text.f_sub(uncond)?.f_mul_scalar(guidance)?)?
        } else {
            eps
        };
        latents = scheduler.step(&eps, i, &latents)?.prev_sample;
    }
    Ok(latents)
}

/// Latents of a txt2img generation (before decoding), as diffusers' StableDiffusionPipeline computes them.
pub fn txt2img_latents(sd: &StableDiffusion, p: &GenerateParams) -> Result<Tensor> {
    txt2img_latents_with(sd, p, None)
}

/// [`txt2img_latents`] with an optional ControlNet input, as diffusers' StableDiffusionControlNetPipeline
/// computes it.
pub fn txt2img_latents_with(
    sd: &StableDiffusion,
    p: &GenerateParams,
    control: Option<&Control>,
) -> Result<Tensor> {
    txt2img_latents_guided(sd, p, Guides { control, image_prompt: None })
}

/// [`txt2img_latents`] with optional guides: a ControlNet input and an IP-Adapter image prompt (diffusers'
/// pipelines with `ip_adapter_image`).
pub fn txt2img_latents_guided(
    sd: &StableDiffusion,
    p: &GenerateParams,
    guides: Guides<'_>,
) -> Result<Tensor> {
    let control = guides.control;
    p.validate(sd)?;
    // The seeded draws (initial noise, LCM's step noise) come from the process's CPU generator.
    let _rng = crate::device::rng_lock();
    let _guard = tch::no_grad_guard();
    let cond = conditioning(sd, p, p.height, p.width, guides.image_prompt)?;
    let mut scheduler = schedulers::build(p.scheduler, &scheduler_config(sd, p))?;
    scheduler.set_timesteps(p.steps)?;
    let f = sd.vae_scale_factor();
    let channels = sd.unet_config.in_channels;
    let control = control_run(sd, p, control, cond.guided)?;
    seed_cpu(p.seed);
    let latents = randn_cpu(&[1, channels, p.height / f, p.width / f], sd.device, sd.kind)?
        .f_mul_scalar(scheduler.init_noise_sigma())?;
    denoise(sd, scheduler.as_mut(), &cond, p.guidance, latents, 0, control.as_ref())
}

/// A txt2img image, (1, 3, H, W) in [-1, 1].
pub fn txt2img(sd: &StableDiffusion, p: &GenerateParams) -> Result<Tensor> {
    txt2img_with(sd, p, None)
}

/// A txt2img image with an optional ControlNet input, (1, 3, H, W) in [-1, 1].
pub fn txt2img_with(sd: &StableDiffusion, p: &GenerateParams, control: Option<&Control>) -> Result<Tensor> {
    txt2img_guided(sd, p, Guides { control, image_prompt: None })
}

/// A txt2img image with optional guides, (1, 3, H, W) in [-1, 1].
pub fn txt2img_guided(sd: &StableDiffusion, p: &GenerateParams, guides: Guides<'_>) -> Result<Tensor> {
    let latents = txt2img_latents_guided(sd, p, guides)?;
    let _guard = tch::no_grad_guard();
    sd.autoencoder.decode_scaled(&latents)
}

/// Latents of an img2img generation from `image` ((1, 3, H, W) in [-1, 1]) at `strength` in (0, 1].
pub fn img2img_latents(
    sd: &StableDiffusion,
    p: &GenerateParams,
    image: &Tensor,
    strength: f64,
) -> Result<Tensor> {
    img2img_latents_with(sd, p, image, strength, None)
}

/// [`img2img_latents`] with an optional ControlNet input, as diffusers'
/// StableDiffusionControlNetImg2ImgPipeline computes it.
pub fn img2img_latents_with(
    sd: &StableDiffusion,
    p: &GenerateParams,
    image: &Tensor,
    strength: f64,
    control: Option<&Control>,
) -> Result<Tensor> {
    img2img_latents_guided(sd, p, image, strength, Guides { control, image_prompt: None })
}

/// [`img2img_latents`] with optional guides: a ControlNet input and an IP-Adapter image prompt.
pub fn img2img_latents_guided(
    sd: &StableDiffusion,
    p: &GenerateParams,
    image: &Tensor,
    strength: f64,
    guides: Guides<'_>,
) -> Result<Tensor> {
    let control = guides.control;
    p.validate(sd)?;
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::invalid("strength", format!("{strength} is not in (0, 1]")));
    }
    let _rng = crate::device::rng_lock();
    let _guard = tch::no_grad_guard();
    let (_, _, height, width) = image.size4()?;
    let cond = conditioning(sd, p, height, width, guides.image_prompt)?;
    let mut scheduler = schedulers::build(p.scheduler, &scheduler_config(sd, p))?;
    scheduler.set_timesteps(p.steps)?;
    // diffusers' get_timesteps: keep the last int(steps * strength) timesteps.
    let total = scheduler.timesteps().len();
    let start = schedulers::img2img_start_index(p.steps, strength);
    if start >= total {
        return Err(Error::invalid(
            "strength",
            format!(
                "{strength} with {} steps leaves no denoising step; raise --strength or --steps",
                p.steps
            ),
        ));
    }
    let control = control_run(sd, p, control, cond.guided)?;
    seed_cpu(p.seed);
    let image = image.f_to_device(sd.device)?.f_to_kind(sd.kind)?;
    let (device, kind) = (sd.device, sd.kind);
    let init_latents = sd.autoencoder.encode_scaled(&image, |shape| randn_cpu(shape, device, kind))?;
    let noise = randn_cpu(&init_latents.size(), device, kind)?;
    let latents = scheduler.add_noise(&init_latents, &noise, start)?;
    denoise(sd, scheduler.as_mut(), &cond, p.guidance, latents, start, control.as_ref())
}

/// An img2img image, (1, 3, H, W) in [-1, 1].
pub fn img2img(sd: &StableDiffusion, p: &GenerateParams, image: &Tensor, strength: f64) -> Result<Tensor> {
    img2img_with(sd, p, image, strength, None)
}

/// An img2img image with an optional ControlNet input, (1, 3, H, W) in [-1, 1].
pub fn img2img_with(
    sd: &StableDiffusion,
    p: &GenerateParams,
    image: &Tensor,
    strength: f64,
    control: Option<&Control>,
) -> Result<Tensor> {
    img2img_guided(sd, p, image, strength, Guides { control, image_prompt: None })
}

/// An img2img image with optional guides, (1, 3, H, W) in [-1, 1].
pub fn img2img_guided(
    sd: &StableDiffusion,
    p: &GenerateParams,
    image: &Tensor,
    strength: f64,
    guides: Guides<'_>,
) -> Result<Tensor> {
    let latents = img2img_latents_guided(sd, p, image, strength, guides)?;
    let _guard = tch::no_grad_guard();
    sd.autoencoder.decode_scaled(&latents)
}
