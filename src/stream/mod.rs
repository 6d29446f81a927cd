//! One client's stream: StreamDiffusion's stream batch over a few denoising stages ("slots"), with residual
//! classifier-free guidance, the similarity filter and live prompt changes.
//!
//! Each frame costs one UNet call that carries every slot: the new frame's latent, noised to the first stage's
//! timestep, plus the latents of the previous frames that are still in flight at the later stages. A frame
//! therefore leaves `n - 1` frames after it entered; the first `n - 1` outputs are warm-up frames.
//!
//! The per-frame work is split in phases ([`Stream::begin`] builds this stream's share of a UNet batch,
//! [`Stream::finish`] takes its share of the prediction back) so that the engine can put the slots of many
//! streams into one UNet call (see [`batch`]).
pub mod batch;
pub mod control;
pub mod image_prompt;
pub mod offline;
pub mod prompts;
pub mod resident;
pub mod settings;
pub mod similarity;

use crate::device::CpuGenerator;
use crate::error::{Error, Result};
use crate::models::controlnet::ControlScale;
use crate::models::stable_diffusion::{StableDiffusion, TextEmbedding};
use crate::models::unet::{AddedCond, ControlResiduals, ImageCond, UNetExtra};
use crate::schedulers::{self, SchedulerKind};
use image_prompt::StreamImagePrompt;
use settings::{CfgType, ControlSource, Mode, StreamScheduler, StreamSettings, STREAM_SCHEDULE_STEPS};
use std::collections::VecDeque;
use tch::{Device, Kind, Tensor};

/// Per-stage constants, computed once per (seed, size, stages, scheduler): StreamDiffusion's `prepare`.
struct Prepared {
    n: i64,
    /// UNet timesteps of the slots, (n,) int64.
    timesteps: Tensor,
    /// sqrt(alpha_cumprod) and sqrt(1 - alpha_cumprod) per slot, (n, 1, 1, 1).
    alpha: Tensor,
    beta: Tensor,
    /// LCM boundary-condition scalings per slot (DDIM: 0 and 1).
    c_skip: Tensor,
    c_out: Tensor,
    /// alpha and beta of the next slot, with 1 after the last (for the stock-noise update).
    alpha_next: Tensor,
    beta_next: Tensor,
    /// The stream's fixed noise, one per slot, and the same rolled by one slot.
    init_noise: Tensor,
    init_noise_rolled: Tensor,
    latent_shape: [i64; 4],
}

fn column(values: &[f32], device: Device, kind: Kind) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?
        .f_view([values.len() as i64, 1, 1, 1])?
        .f_to_device(device)?
        .f_to_kind(kind)?)
}

impl Prepared {
    fn new(sd: &StableDiffusion, s: &StreamSettings, gen: &mut CpuGenerator) -> Result<Self> {
        let stages = s.stages();
        let n = stages.len() as i64;
        let (device, kind) = (sd.device, sd.kind);
        // StreamDiffusion's `LCMScheduler.from_config(pipe.scheduler.config)`, with the stream's override.
        let config = &sd.scheduler_config.clone().with_timestep_spacing(s.timestep_spacing);
        let all = schedulers::lcm_timesteps(config, STREAM_SCHEDULE_STEPS)?;
        let abar = schedulers::alphas_cumprod(SchedulerKind::Lcm, config)?;
        let timestep_scaling = config.timestep_scaling.unwrap_or(10.0);
        let mut ts = Vec::new();
        let (mut alpha, mut beta, mut c_skip, mut c_out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &i in &stages {
            let t = *all.get(i).ok_or_else(|| {
                Error::invalid("t_index_list", format!("index {i} is past the {}-step schedule", all.len()))
            })?;
            ts.push(t);
            let a = abar[t as usize] as f32;
            alpha.push(a.sqrt());
            beta.push((1.0 - a).sqrt());
            let (skip, out) = match s.scheduler {
                StreamScheduler::Lcm => schedulers::boundary_condition_scalings(t as f64, timestep_scaling),
                StreamScheduler::Ddim => (0.0, 1.0),
            };
            c_skip.push(skip as f32);
            c_out.push(out as f32);
        }
        let mut alpha_next = alpha[1..].to_vec();
        alpha_next.push(1.0);
        let mut beta_next = beta[1..].to_vec();
        beta_next.push(1.0);
        let f = sd.vae_scale_factor();
        let latent_shape = [1, sd.unet_config.in_channels, s.height / f, s.width / f];
        // StreamDiffusion draws the init noise first thing after seeding, in fp32 on the CPU: one per slot with
        // the stream batch, a single one without (where it is then never used).
        let rows = if s.denoising_batch { n } else { 1 };
        let init_noise =
            gen.randn(&[rows, latent_shape[1], latent_shape[2], latent_shape[3]], Device::Cpu, Kind::Float)?;
        let init_noise = init_noise
            .f_expand([n, latent_shape[1], latent_shape[2], latent_shape[3]], false)?
            .f_contiguous()?;
        let init_noise = init_noise.f_to_device(device)?.f_to_kind(kind)?;
        let init_noise_rolled = init_noise.f_roll([-1], [0])?;
        Ok(Prepared {
            n,
            timesteps: Tensor::f_from_slice(&ts)?.f_to_device(device)?,
            alpha: column(&alpha, device, kind)?,
            beta: column(&beta, device, kind)?,
            c_skip: column(&c_skip, device, kind)?,
            c_out: column(&c_out, device, kind)?,
            alpha_next: column(&alpha_next, device, kind)?,
            beta_next: column(&beta_next, device, kind)?,
            init_noise,
            init_noise_rolled,
            latent_shape,
        })
    }

    /// The scheduler's denoised estimate for latents `x` and noise prediction `eps`, per slot.
    fn denoise(&self, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        boundary_denoise(x, eps, &self.alpha, &self.beta, &self.c_out, &self.c_skip)
    }

    /// [`Prepared::denoise`] for slot `k` alone.
    fn denoise_slot(&self, k: i64, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let row = |t: &Tensor| t.f_narrow(0, k, 1);
        boundary_denoise(
            x,
            eps,
            &row(&self.alpha)?,
            &row(&self.beta)?,
            &row(&self.c_out)?,
            &row(&self.c_skip)?,
        )
    }
}

/// A stream with a control source needs a ControlNet loaded with the model.
fn check_control(sd: &StableDiffusion, s: &StreamSettings) -> Result<()> {
    if s.control != ControlSource::None && sd.controlnet.is_none() {
        return Err(Error::invalid(
            "control",
            format!(
                "{:?} needs a ControlNet: start sdstream with --controlnet (or [model] controlnet)",
                s.control
            )
            .to_lowercase(),
        ));
    }
    Ok(())
}

/// `c_out * (x - beta * eps) / alpha + c_skip * x`: LCM's boundary-condition step (DDIM: c_out 1, c_skip 0).
fn boundary_denoise(
    x: &Tensor,
    eps: &Tensor,
    alpha: &Tensor,
    beta: &Tensor,
    c_out: &Tensor,
    c_skip: &Tensor,
) -> Result<Tensor> {
    let f_theta = x.f_sub(&beta.f_mul(eps)?)?.f_div(alpha)?;
    Ok(c_out.f_mul(&f_theta)?.f_add(&c_skip.f_mul(x)?)?)
}

/// Classifier-free guidance: `uncond + g * (cond - uncond)`.
fn guide(uncond: &Tensor, cond: &Tensor, g: f64) -> Result<Tensor> {
    Ok(uncond.f_add(&cond.f_sub(uncond)?.f_mul_scalar(g)?)?)
}

/// This stream's share of a UNet batch.
pub struct UnetWork {
    pub sample: Tensor,
    pub timesteps: Tensor,
    /// Per item: the text states and, for SDXL, the pooled text embedding.
    pub embeddings: TextEmbedding,
    /// SDXL's time ids per item (original size, crop, target size: the stream's frame size), else `None`.
    pub time_ids: Option<Tensor>,
    /// The ControlNet's inputs for these items, when the stream uses one.
    pub control: Option<ControlWork>,
    /// The IP-Adapter's inputs for these items, when the stream has an image prompt.
    pub image: Option<ImageWork>,
}

/// A stream's share of the IP-Adapter's input: its items' image tokens and its scale at every cross-attention.
pub struct ImageWork {
    /// (items, tokens, cross_attention_dim): the image's tokens, its "no image" tokens on guidance rows.
    pub tokens: Tensor,
    /// One per cross-attention of the UNet, the same for every item.
    pub scales: Vec<f64>,
}

/// A stream's share of a ControlNet batch: one control image and one conditioning scale per UNet item (each
/// slot uses the control image of the frame it is denoising; slots whose frame had none get scale 0).
pub struct ControlWork {
    /// (items, 3, H, W), RGB in [0, 1].
    pub images: Tensor,
    pub scales: Vec<f64>,
}

/// The control images of the frames in the slots, shifted along with the latent buffer.
struct ControlSlots {
    /// (n, 3, H, W): slot k holds the control image of the frame in slot k.
    images: Tensor,
    /// 1 where that frame had a control image, 0 where it had none.
    active: Vec<f64>,
}

impl UnetWork {
    /// The UNet's prediction for `works` stacked into one batch, in order: one ControlNet call over the items
    /// that have control (the others get no residuals), then one UNet call.
    pub fn predict_all(sd: &StableDiffusion, works: &[UnetWork]) -> Result<Tensor> {
        let cat =
            |f: &dyn Fn(&UnetWork) -> &Tensor| Tensor::f_cat(&works.iter().map(f).collect::<Vec<_>>(), 0);
        let sample = cat(&|w| &w.sample)?;
        let timesteps = cat(&|w| &w.timesteps)?;
        let emb = TextEmbedding::cat(&works.iter().map(|w| &w.embeddings).collect::<Vec<_>>())?;
        let added = match (&emb.pooled, works.iter().map(|w| w.time_ids.as_ref()).collect::<Option<Vec<_>>>())
        {
            (Some(p), Some(ids)) => {
                Some(AddedCond { text_embeds: p.shallow_clone(), time_ids: Tensor::f_cat(&ids, 0)? })
            }
            _ => None,
        };
        let residuals = control_residuals(sd, works, &sample, &timesteps, &emb.hidden, added.as_ref())?;
        let image = image_cond(sd, works)?;
        let extra = UNetExtra {
            added_cond: added.as_ref(),
            control: residuals.as_ref(),
            image: image.as_ref(),
            ..Default::default()
        };
        sd.unet.forward_with(&sample, &timesteps, &emb.hidden, &extra)
    }
}

/// The IP-Adapter's input for the stacked batch, when any stream has an image prompt: each stream's rows carry
/// its tokens and scales; the rows of streams without one get zero tokens at scale 0 (which adds nothing), so
/// they share the call.
fn image_cond<'a>(sd: &'a StableDiffusion, works: &[UnetWork]) -> Result<Option<ImageCond<'a>>> {
    let Some(first) = works.iter().find_map(|w| w.image.as_ref()) else { return Ok(None) };
    let model = sd.image_prompt.as_ref().ok_or_else(|| {
        Error::invalid("ip image", "a stream has an image prompt but no IP-Adapter is loaded")
    })?;
    let layers = model.adapter.layers();
    let token_shape = first.tokens.size();
    let mut tokens = Vec::with_capacity(works.len());
    let mut scales = Vec::new();
    for w in works {
        let items = w.sample.size()[0];
        match &w.image {
            Some(i) => {
                tokens.push(i.tokens.shallow_clone());
                scales.extend(std::iter::repeat_n(i.scales.clone(), items as usize));
            }
            None => {
                let t = &first.tokens;
                tokens
                    .push(Tensor::f_zeros([items, token_shape[1], token_shape[2]], (t.kind(), t.device()))?);
                scales.extend(std::iter::repeat_n(vec![0.0; layers.len()], items as usize));
            }
        }
    }
    Ok(Some(ImageCond { layers, tokens: Tensor::f_cat(&tokens, 0)?, scales }))
}

/// One ControlNet call over the rows of the stacked batch whose stream has control; zero residuals elsewhere.
fn control_residuals(
    sd: &StableDiffusion,
    works: &[UnetWork],
    sample: &Tensor,
    t: &Tensor,
    emb: &Tensor,
    added: Option<&AddedCond>,
) -> Result<Option<ControlResiduals>> {
    if works.iter().all(|w| w.control.is_none()) {
        return Ok(None);
    }
    let net = sd.controlnet.as_ref().ok_or_else(|| {
        Error::invalid("control", "a stream asks for ControlNet conditioning but no ControlNet is loaded")
    })?;
    // Rows of the stacked batch that have control.
    let mut rows = Vec::new();
    let mut images = Vec::new();
    let mut scales = Vec::new();
    let mut offset = 0i64;
    for w in works {
        let size = w.sample.size()[0];
        if let Some(c) = &w.control {
            rows.extend(offset..offset + size);
            images.push(c.images.shallow_clone());
            scales.extend_from_slice(&c.scales);
        }
        offset += size;
    }
    let total = offset;
    let images = Tensor::f_cat(&images, 0)?;
    if rows.len() as i64 == total {
        return Ok(Some(net.forward(
            sample,
            t,
            emb,
            added,
            &images,
            ControlScale::PerItem(&scales),
            false,
        )?));
    }
    let index = Tensor::f_from_slice(&rows)?.f_to_device(sample.device())?;
    let added = match added {
        Some(a) => Some(AddedCond {
            text_embeds: a.text_embeds.f_index_select(0, &index)?,
            time_ids: a.time_ids.f_index_select(0, &index)?,
        }),
        None => None,
    };
    let r = net.forward(
        &sample.f_index_select(0, &index)?,
        &t.f_index_select(0, &index)?,
        &emb.f_index_select(0, &index)?,
        added.as_ref(),
        &images,
        ControlScale::PerItem(&scales),
        false,
    )?;
    let scatter = |part: &Tensor| -> Result<Tensor> {
        let mut shape = part.size();
        shape[0] = total;
        let full = Tensor::f_zeros(&shape, (part.kind(), part.device()))?;
        Ok(full.f_index_copy(0, &index, part)?)
    };
    Ok(Some(ControlResiduals {
        down: r.down.iter().map(scatter).collect::<Result<Vec<_>>>()?,
        mid: scatter(&r.mid)?,
    }))
}

/// `t` with its first dimension expanded to `n` rows.
fn rows(t: &Tensor, n: i64) -> Result<Tensor> {
    let mut shape = t.size();
    shape[0] = n;
    Ok(t.f_expand(&shape, false)?)
}

/// What a stream gives for one input frame.
pub enum FrameResult {
    /// The latent (1, 4, h, w) leaving the last slot, to decode. `warmup` is true for the first `n - 1`
    /// frames of a multi-stage stream (their content comes from the empty buffer).
    Latent { latent: Tensor, answers: u64, warmup: bool },
}

/// One client's stream state.
pub struct Stream {
    pub id: u64,
    settings: StreamSettings,
    prepared: Prepared,
    generator: CpuGenerator,
    buffer: Option<Tensor>,
    stock_noise: Tensor,
    cond: prompts::PromptState,
    uncond: TextEmbedding,
    /// SDXL's time ids for one item, (1, 6), when the model takes them.
    time_ids: Option<Tensor>,
    filter: similarity::SimilarityFilter,
    /// Input frame ids in flight, oldest first (the output of a frame leaves n - 1 frames later).
    in_flight: VecDeque<u64>,
    /// The slot latents of the frame being processed between begin and finish.
    pending_x: Option<Tensor>,
    /// Per-slot control images (None while the stream's control is `none`).
    control_slots: Option<ControlSlots>,
    /// The last control image the client sent, (1, 3, H, W) in [0, 1] at the stream's size.
    control_image: Option<Tensor>,
    /// The last decoded output (1, 3, H, W) in [-1, 1], returned for skipped frames.
    pub previous_output: Option<Tensor>,
    /// The last latent that left the last slot (before decoding).
    last_latent: Option<Tensor>,
    pub frames_skipped: u64,
    /// The IP-Adapter image prompt, when the client gave one.
    image_prompt: Option<StreamImagePrompt>,
}

impl Stream {
    /// A stream with `settings` (validated), its prompt embeddings given by the caller (who owns the prompt
    /// cache).
    pub fn new(
        id: u64,
        sd: &StableDiffusion,
        settings: StreamSettings,
        cond: TextEmbedding,
        uncond: TextEmbedding,
    ) -> Result<Self> {
        settings.validate()?;
        check_control(sd, &settings)?;
        let f = sd.vae_scale_factor();
        if settings.width % f != 0 || settings.height % f != 0 {
            return Err(Error::invalid("width/height", format!("must be multiples of {f} for this model")));
        }
        let mut generator = CpuGenerator::new(settings.seed)?;
        let prepared = Prepared::new(sd, &settings, &mut generator)?;
        let stock_noise = prepared.init_noise.f_zeros_like()?;
        let buffer = Self::empty_buffer(&prepared)?;
        let time_ids = Self::time_ids(sd, &settings)?;
        Ok(Stream {
            id,
            filter: similarity::SimilarityFilter::new(settings.seed),
            settings,
            prepared,
            generator,
            buffer,
            stock_noise,
            cond: prompts::PromptState::new(cond),
            uncond,
            time_ids,
            in_flight: VecDeque::new(),
            pending_x: None,
            control_slots: None,
            control_image: None,
            previous_output: None,
            last_latent: None,
            frames_skipped: 0,
            image_prompt: None,
        })
    }

    /// SDXL: the frame size as original and target size, no crop (what diffusers' SDXL pipelines use).
    fn time_ids(sd: &StableDiffusion, s: &StreamSettings) -> Result<Option<Tensor>> {
        if !sd.unet.takes_added_cond() {
            return Ok(None);
        }
        let default = crate::pipeline::MicroConditioning::default();
        Ok(Some(default.time_ids_tensor(s.height, s.width, 1, sd.device, sd.kind)?))
    }

    /// This stream's conditioning for `n` items: embeddings and, for SDXL, time ids.
    fn items(&self, emb: &TextEmbedding, n: i64) -> Result<(TextEmbedding, Option<Tensor>)> {
        let time_ids = self.time_ids.as_ref().map(|t| rows(t, n)).transpose()?;
        Ok((emb.map(|t| rows(t, n))?, time_ids))
    }

    fn empty_buffer(p: &Prepared) -> Result<Option<Tensor>> {
        if p.n > 1 {
            let [_, c, h, w] = p.latent_shape;
            Ok(Some(Tensor::f_zeros([p.n - 1, c, h, w], (p.init_noise.kind(), p.init_noise.device()))?))
        } else {
            Ok(None)
        }
    }

    pub fn settings(&self) -> &StreamSettings {
        &self.settings
    }

    /// The latent that last left the last slot (what was decoded for the last output).
    pub fn last_latent(&self) -> Option<Tensor> {
        self.last_latent.as_ref().map(Tensor::shallow_clone)
    }

    /// Whether this stream runs the stream batch (and so can share a UNet call with other streams).
    pub fn batched(&self) -> bool {
        self.settings.denoising_batch
    }

    /// Number of denoising slots.
    pub fn slots(&self) -> i64 {
        self.prepared.n
    }

    /// Applies new settings (already validated by the caller with [`StreamSettings::patched`]). Prompt
    /// embeddings change through [`Stream::set_prompt_embeddings`]. Only a change of seed, size, stages, mode or
    /// stream scheduler re-primes the stream; everything else takes effect on the next frame with the latent
    /// buffer flowing on.
    pub fn apply_settings(&mut self, sd: &StableDiffusion, next: StreamSettings) -> Result<()> {
        next.validate()?;
        check_control(sd, &next)?;
        if (next.width, next.height) != (self.settings.width, self.settings.height) {
            self.control_image = None;
        }
        if self.settings.needs_reprime(&next) || next.control == ControlSource::None {
            self.control_slots = None;
        }
        if self.settings.needs_reprime(&next) {
            self.reprime(sd, &next)?;
        }
        self.settings = next;
        Ok(())
    }

    /// Fresh state for `settings`: the fixed noise drawn again from the seed, an empty latent buffer, zero
    /// stock noise, nothing in flight.
    fn reprime(&mut self, sd: &StableDiffusion, settings: &StreamSettings) -> Result<()> {
        let mut generator = CpuGenerator::new(settings.seed)?;
        let prepared = Prepared::new(sd, settings, &mut generator)?;
        self.buffer = Self::empty_buffer(&prepared)?;
        self.stock_noise = prepared.init_noise.f_zeros_like()?;
        self.prepared = prepared;
        self.generator = generator;
        self.filter = similarity::SimilarityFilter::new(settings.seed);
        self.in_flight.clear();
        self.pending_x = None;
        self.time_ids = Self::time_ids(sd, settings)?;
        Ok(())
    }

    /// Puts the stream back in a consistent state after a tick that failed part-way (its buffer, stock noise
    /// and in-flight frame ids may have advanced or not): re-primed as if just opened with its settings,
    /// prompts and control image kept. The next outputs are warm-up frames answering the frames given, so
    /// no output is ever attributed to the wrong frame.
    pub fn reset(&mut self, sd: &StableDiffusion) -> Result<()> {
        let settings = self.settings.clone();
        self.reprime(sd, &settings)?;
        self.control_slots = None;
        self.previous_output = None;
        self.last_latent = None;
        Ok(())
    }

    /// A new image prompt (IP-Adapter; see [`image_prompt`]), or none: takes effect on the next frame.
    pub fn set_image_prompt(&mut self, prompt: Option<StreamImagePrompt>) {
        self.image_prompt = prompt;
    }

    /// Whether the stream has an image prompt.
    pub fn has_image_prompt(&self) -> bool {
        self.image_prompt.is_some()
    }

    /// This stream's image input for `uncond` "no image" items followed by `cond` image items.
    fn image_items(&self, uncond: i64, cond: i64) -> Result<Option<ImageWork>> {
        let Some(ip) = &self.image_prompt else { return Ok(None) };
        let kind = self.prepared.init_noise.kind();
        let e = &ip.embedding;
        let mut parts = Vec::new();
        if uncond > 0 {
            parts.push(rows(&e.uncond, uncond)?);
        }
        parts.push(rows(&e.cond, cond)?);
        Ok(Some(ImageWork { tokens: Tensor::f_cat(&parts, 0)?.f_to_kind(kind)?, scales: ip.scales.clone() }))
    }

    /// New text conditioning: blended in over the configured number of frames (the unconditional one at once).
    pub fn set_prompt_embeddings(&mut self, cond: TextEmbedding, uncond: TextEmbedding) {
        let s = &self.settings;
        self.cond.set_target(cond, s.prompt_transition_frames, s.prompt_interpolation);
        self.uncond = uncond;
    }

    /// Whether `image` ((1, 3, H, W) in [-1, 1]) should be skipped by the similarity filter.
    pub fn should_skip(&mut self, image: &Tensor) -> Result<bool> {
        if !self.settings.similarity_filter || self.settings.mode == Mode::Txt2img {
            return Ok(false);
        }
        let s = &self.settings;
        let skip = self.filter.should_skip(image, s.similarity_threshold, s.max_skip_frames)?;
        if skip {
            self.frames_skipped += 1;
        }
        Ok(skip)
    }

    /// [`Stream::should_skip`] decided on the host from the 8-bit frame (the captured tick's filter: no device
    /// read).
    pub fn should_skip_rgb(&mut self, image: &image::RgbImage) -> bool {
        if !self.settings.similarity_filter || self.settings.mode == Mode::Txt2img {
            return false;
        }
        let s = &self.settings;
        let skip = self.filter.should_skip_rgb(image, s.similarity_threshold, s.max_skip_frames);
        if skip {
            self.frames_skipped += 1;
        }
        skip
    }

    /// Noise for the VAE's latent sample of this stream's next frame (drawn from the stream's generator, as
    /// StreamDiffusion draws it from its pipeline generator).
    pub fn vae_sample_noise(&mut self, shape: &[i64], device: Device, kind: Kind) -> Result<Tensor> {
        self.generator.randn(shape, device, kind)
    }

    /// The latent entering slot 0 for this frame: for img2img the encoded frame (already in the UNet's scale)
    /// noised to the first stage with the first slot's fixed noise; for txt2img fresh noise from the stream's
    /// generator (pass `None`).
    pub fn entry_latent(&mut self, encoded: Option<&Tensor>) -> Result<Tensor> {
        let p = &self.prepared;
        match (self.settings.mode, encoded) {
            (Mode::Img2img, Some(z)) => {
                let noise0 = p.init_noise.f_narrow(0, 0, 1)?;
                Ok(p.alpha.f_narrow(0, 0, 1)?.f_mul(z)?.f_add(&p.beta.f_narrow(0, 0, 1)?.f_mul(&noise0)?)?)
            }
            (Mode::Txt2img, _) => {
                let (device, kind) = (p.init_noise.device(), p.init_noise.kind());
                self.generator
                    .randn(&p.latent_shape, Device::Cpu, Kind::Float)?
                    .f_to_device(device)?
                    .f_to_kind(kind)
                    .map_err(Into::into)
            }
            (Mode::Img2img, None) => Err(Error::invalid("frame", "an img2img stream needs an input frame")),
        }
    }

    /// Sets the control image for the frames that enter from now on (`control = "image"`): any RGB image,
    /// resized to the stream's size and scaled to [0, 1] as diffusers prepares control images.
    pub fn set_control_image(&mut self, image: &image::RgbImage) -> Result<()> {
        let s = &self.settings;
        let t = crate::pipeline::control_image(image, s.width, s.height)?;
        let p = &self.prepared;
        self.control_image = Some(t.f_to_device(p.init_noise.device())?.f_to_kind(p.init_noise.kind())?);
        Ok(())
    }

    /// The control image of a frame entering now: Canny edges of `frame` ((1, 3, H, W) in [-1, 1]), the
    /// client's last control image, or none.
    pub fn frame_control(&self, frame: Option<&Tensor>) -> Result<Option<Tensor>> {
        let s = &self.settings;
        match (s.control, frame) {
            (ControlSource::None, _) => Ok(None),
            (ControlSource::Image, _) => Ok(self.control_image.as_ref().map(Tensor::shallow_clone)),
            (ControlSource::Canny, Some(f)) => {
                let rgb01 = f.f_add_scalar(1.0)?.f_div_scalar(2.0)?.f_clamp(0.0, 1.0)?;
                Ok(Some(control::canny(&rgb01, s.canny_low, s.canny_high)?))
            }
            (ControlSource::Canny, None) => Ok(None),
        }
    }

    /// Shifts the per-slot control images: the entering frame's control into slot 0, the others one slot on.
    /// Gives this frame's per-slot images (n, 3, H, W) and scales, or None without control.
    fn shift_control(&mut self, entry: Option<Tensor>) -> Result<Option<(Tensor, Vec<f64>)>> {
        if self.settings.control == ControlSource::None {
            self.control_slots = None;
            return Ok(None);
        }
        let p = &self.prepared;
        let (device, kind) = (p.init_noise.device(), p.init_noise.kind());
        let (h, w) = (self.settings.height, self.settings.width);
        let slots = match self.control_slots.take() {
            Some(c) => c,
            None => ControlSlots {
                images: Tensor::f_zeros([p.n, 3, h, w], (kind, device))?,
                active: vec![0.0; p.n as usize],
            },
        };
        let (first, active0) = match entry {
            Some(img) => (img.f_to_device(device)?.f_to_kind(kind)?, 1.0),
            None => (Tensor::f_zeros([1, 3, h, w], (kind, device))?, 0.0),
        };
        let images = Tensor::f_cat(&[&first, &slots.images.f_narrow(0, 0, p.n - 1)?], 0)?;
        let mut active = vec![active0];
        active.extend_from_slice(&slots.active[..p.n as usize - 1]);
        let scales = active.iter().map(|a| a * self.settings.controlnet_scale).collect();
        let out = images.shallow_clone();
        self.control_slots = Some(ControlSlots { images, active });
        Ok(Some((out, scales)))
    }

    fn guided(&self) -> bool {
        self.settings.guidance > 1.0
    }

    /// Starts a frame: stacks the entry latent with the in-flight slots and builds this stream's share of the
    /// UNet batch (n items; n + 1 with `initialize` guidance; 2n with `full`).
    ///
    /// `control` is the entering frame's control image ([`Stream::frame_control`]).
    pub fn begin(&mut self, entry: Tensor, frame_id: u64, control: Option<Tensor>) -> Result<UnetWork> {
        let control = self.shift_control(control)?;
        let p = &self.prepared;
        let x = match &self.buffer {
            Some(buffer) => {
                let first_noise = p.init_noise.f_narrow(0, 0, 1)?;
                let kept = self.stock_noise.f_narrow(0, 0, p.n - 1)?;
                self.stock_noise = Tensor::f_cat(&[first_noise, kept], 0)?;
                Tensor::f_cat(&[&entry, buffer], 0)?
            }
            None => entry,
        };
        let kind = p.init_noise.kind();
        let cond = self.cond.advance()?.map(|t| Ok(t.f_to_kind(kind)?))?;
        let uncond = self.uncond.map(|t| Ok(t.f_to_kind(kind)?))?;
        let (cond_n, time_ids_n) = self.items(&cond, p.n)?;
        // The ControlNet sees the same items as the UNet: each slot with its frame's control image.
        let work = match (self.guided(), self.settings.cfg_type) {
            (true, CfgType::Initialize) => {
                let (uncond_1, ids_1) = self.items(&uncond, 1)?;
                UnetWork {
                    sample: Tensor::f_cat(&[&x.f_narrow(0, 0, 1)?, &x], 0)?,
                    timesteps: Tensor::f_cat(&[&p.timesteps.f_narrow(0, 0, 1)?, &p.timesteps], 0)?,
                    embeddings: TextEmbedding::cat(&[&uncond_1, &cond_n])?,
                    time_ids: ids_1.zip(time_ids_n).map(|(a, b)| Tensor::f_cat(&[a, b], 0)).transpose()?,
                    control: control
                        .map(|(img, s)| -> Result<ControlWork> {
                            let scales = [&s[..1], &s[..]].concat();
                            Ok(ControlWork {
                                images: Tensor::f_cat(&[&img.f_narrow(0, 0, 1)?, &img], 0)?,
                                scales,
                            })
                        })
                        .transpose()?,
                    image: self.image_items(1, p.n)?,
                }
            }
            (true, CfgType::Full) => {
                let (uncond_n, _) = self.items(&uncond, p.n)?;
                UnetWork {
                    sample: Tensor::f_cat(&[&x, &x], 0)?,
                    timesteps: Tensor::f_cat(&[&p.timesteps, &p.timesteps], 0)?,
                    embeddings: TextEmbedding::cat(&[&uncond_n, &cond_n])?,
                    time_ids: time_ids_n.map(|t| Tensor::f_cat(&[&t, &t], 0)).transpose()?,
                    control: control
                        .map(|(img, s)| -> Result<ControlWork> {
                            Ok(ControlWork {
                                images: Tensor::f_cat(&[&img, &img], 0)?,
                                scales: [&s[..], &s[..]].concat(),
                            })
                        })
                        .transpose()?,
                    image: self.image_items(p.n, p.n)?,
                }
            }
            _ => UnetWork {
                sample: x.shallow_clone(),
                timesteps: p.timesteps.shallow_clone(),
                embeddings: cond_n,
                time_ids: time_ids_n,
                control: control.map(|(images, scales)| ControlWork { images, scales }),
                image: self.image_items(0, p.n)?,
            },
        };
        self.pending_x = Some(x);
        self.in_flight.push_back(frame_id);
        Ok(work)
    }

    /// Finishes a frame from this stream's share of the UNet prediction: guidance, the per-slot scheduler step,
    /// the stock-noise and buffer updates. Gives the latent leaving the last slot.
    pub fn finish(&mut self, model_pred: &Tensor) -> Result<FrameResult> {
        let x = self.pending_x.take().ok_or_else(|| Error::Model("stream finish without begin".into()))?;
        let p = &self.prepared;
        let (guided, cfg, g) = (self.guided(), self.settings.cfg_type, self.settings.guidance);
        let (text, mut uncond) = match (guided, cfg) {
            (true, CfgType::Initialize) => {
                let rest = self.stock_noise.f_narrow(0, 1, p.n - 1)?;
                self.stock_noise = Tensor::f_cat(&[&model_pred.f_narrow(0, 0, 1)?, &rest], 0)?;
                (model_pred.f_narrow(0, 1, p.n)?, None)
            }
            (true, CfgType::Full) => {
                let parts = model_pred.f_chunk(2, 0)?;
                (parts[1].shallow_clone(), Some(parts[0].shallow_clone()))
            }
            _ => (model_pred.shallow_clone(), None),
        };
        if guided && matches!(cfg, CfgType::SelfNoise | CfgType::Initialize) {
            uncond = Some(self.stock_noise.f_mul_scalar(self.settings.delta)?);
        }
        let eps = match (guided && cfg != CfgType::None, uncond) {
            (true, Some(u)) => guide(&u, &text, g)?,
            _ => text,
        };
        let denoised = p.denoise(&x, &eps)?;
        if matches!(cfg, CfgType::SelfNoise | CfgType::Initialize) {
            let scaled_noise = p.beta.f_mul(&self.stock_noise)?;
            let delta_x = p.denoise(&scaled_noise, &eps)?;
            let delta_x = p.alpha_next.f_mul(&delta_x)?.f_div(&p.beta_next)?;
            self.stock_noise = p.init_noise_rolled.f_add(&delta_x)?;
        }
        let latent = if let Some(buffer) = &mut self.buffer {
            let n = p.n;
            let head = denoised.f_narrow(0, 0, n - 1)?;
            let renoise = match (self.settings.scheduler, self.settings.add_noise) {
                (StreamScheduler::Lcm, true) => Some(p.init_noise.f_narrow(0, 1, n - 1)?),
                (StreamScheduler::Lcm, false) => None,
                (StreamScheduler::Ddim, _) => Some(eps.f_narrow(0, 0, n - 1)?),
            };
            let mut next = p.alpha.f_narrow(0, 1, n - 1)?.f_mul(&head)?;
            if let Some(noise) = renoise {
                next = next.f_add(&p.beta.f_narrow(0, 1, n - 1)?.f_mul(&noise)?)?;
            }
            *buffer = next;
            denoised.f_narrow(0, n - 1, 1)?
        } else {
            denoised
        };
        let warmup = (self.in_flight.len() as i64) < p.n;
        let answers = if warmup {
            *self.in_flight.back().unwrap_or(&0)
        } else {
            self.in_flight.pop_front().unwrap_or(0)
        };
        self.last_latent = Some(latent.shallow_clone());
        Ok(FrameResult::Latent { latent, answers, warmup })
    }

    /// A whole frame without the stream batch: the stages run one after another (one UNet call each), each
    /// estimate re-noised to the next stage with fresh noise from the stream's generator; no latency, no
    /// warm-up. StreamDiffusion's `use_denoising_batch=False`.
    ///
    /// `control` is the frame's control image ([`Stream::frame_control`]); every stage uses it.
    pub fn run_sequential(
        &mut self,
        sd: &StableDiffusion,
        entry: Tensor,
        frame_id: u64,
        control: Option<Tensor>,
    ) -> Result<FrameResult> {
        let control = match (self.settings.control, control) {
            (ControlSource::None, _) | (_, None) => None,
            (_, Some(c)) => Some(c.f_to_device(sd.device)?.f_to_kind(sd.kind)?),
        };
        let p = &self.prepared;
        let (device, kind) = (p.init_noise.device(), p.init_noise.kind());
        let cond = self.cond.advance()?.map(|t| Ok(t.f_to_kind(kind)?))?;
        let uncond = self.uncond.map(|t| Ok(t.f_to_kind(kind)?))?;
        let (guided, cfg, g) = (self.guided(), self.settings.cfg_type, self.settings.guidance);
        // Without the stream batch StreamDiffusion never updates the stock noise (but `initialize` still puts
        // the real unconditional prediction in its first row).
        let mut stock = self.stock_noise.f_narrow(0, 0, 1)?.f_zeros_like()?;
        let mut x = entry;
        let (cond_1, ids_1) = self.items(&cond, 1)?;
        for k in 0..p.n {
            let t = p.timesteps.f_narrow(0, k, 1)?;
            let mut work = match (guided, cfg) {
                (true, CfgType::Full) | (true, CfgType::Initialize) => UnetWork {
                    sample: Tensor::f_cat(&[&x, &x], 0)?,
                    timesteps: Tensor::f_cat(&[&t, &t], 0)?,
                    embeddings: TextEmbedding::cat(&[&uncond, &cond_1])?,
                    time_ids: ids_1.as_ref().map(|t| Tensor::f_cat(&[t, t], 0)).transpose()?,
                    control: None,
                    image: self.image_items(1, 1)?,
                },
                _ => UnetWork {
                    sample: x.shallow_clone(),
                    timesteps: t,
                    embeddings: cond_1.shallow_clone(),
                    time_ids: ids_1.as_ref().map(Tensor::shallow_clone),
                    control: None,
                    image: self.image_items(0, 1)?,
                },
            };
            if let Some(c) = &control {
                let items = work.sample.size()[0];
                work.control = Some(ControlWork {
                    images: c.f_expand([items, c.size()[1], c.size()[2], c.size()[3]], false)?,
                    scales: vec![self.settings.controlnet_scale; items as usize],
                });
            }
            let pred = UnetWork::predict_all(sd, std::slice::from_ref(&work))?;
            let eps = match (guided, cfg) {
                (true, CfgType::Full) => {
                    let parts = pred.f_chunk(2, 0)?;
                    guide(&parts[0], &parts[1], g)?
                }
                (true, CfgType::Initialize) => {
                    let parts = pred.f_chunk(2, 0)?;
                    stock = parts[0].shallow_clone();
                    guide(&stock.f_mul_scalar(self.settings.delta)?, &parts[1], g)?
                }
                (true, CfgType::SelfNoise) => guide(&stock.f_mul_scalar(self.settings.delta)?, &pred, g)?,
                _ => pred,
            };
            let x0 = p.denoise_slot(k, &x, &eps)?;
            if k + 1 < p.n {
                let mut next = p.alpha.f_narrow(0, k + 1, 1)?.f_mul(&x0)?;
                let noise = match (self.settings.scheduler, self.settings.add_noise) {
                    (StreamScheduler::Lcm, true) => Some(
                        self.generator
                            .randn(&p.latent_shape, Device::Cpu, Kind::Float)?
                            .f_to_device(device)?
                            .f_to_kind(kind)?,
                    ),
                    (StreamScheduler::Lcm, false) => None,
                    (StreamScheduler::Ddim, _) => Some(eps),
                };
                if let Some(noise) = noise {
                    next = next.f_add(&p.beta.f_narrow(0, k + 1, 1)?.f_mul(&noise)?)?;
                }
                x = next;
            } else {
                x = x0;
            }
        }
        self.last_latent = Some(x.shallow_clone());
        Ok(FrameResult::Latent { latent: x, answers: frame_id, warmup: false })
    }
}
