//! The device-resident tick: the device part of a tick over a bucket of streams, written against static
//! buffers so that it can be captured once and replayed ([`crate::graph`]).
//!
//! Streams whose shapes and branches agree (a [`Recipe`]: mode, latent and image size, stages, guidance
//! layout, stream scheduler) share a bucket of 1, 2, 4 or 8 rows; a tick with 3 such streams replays the 4-row
//! bucket and the spare row computes on stale (finite) values that nobody reads. Per tick the host:
//! 1. uploads each stream's input once (img2img: the 8-bit frame, resized on the device when it is not at the
//!    stream's size; txt2img: its entry noise, drawn from the stream's own CPU generator as the eager tick draws
//!    it) and copies the stream's state and per-slot
//!    constants into its row with device-to-device copies (no host synchronisation);
//! 2. replays the bucket's graph: normalise, encode, the one UNet call over every slot of every row, the
//!    scheduler step, the stream-batch state updates in place, decode, and uint8 output;
//! 3. copies each row's state back to its stream and reads every output back in one copy.
//!
//! The math is the eager tick's ([`super::Stream::begin`] / [`super::Stream::finish`]), row by row, in the same
//! order of operations, so that on the CPU a replay gives the eager tick's numbers (see tests/graph.rs for what
//! is bit-identical and what is within a tolerance).
//!
//! Not captured yet (those streams take the eager tick, logged once): img2img through the KL autoencoder (its
//! latent sample draws noise from the stream's generator inside the encode; TAESD, the real-time choice, and
//! txt2img are captured), ControlNet conditioning, and streams without the stream batch
//! (`denoising_batch = false`).
use super::settings::{CfgType, ControlSource, Mode, StreamScheduler};
use super::Stream;
use crate::error::{Error, Result};
use crate::graph::{Backend, Graph, Static, StaticBuffers};
use crate::models::stable_diffusion::{Autoencoder, StableDiffusion, TextEmbedding};
use crate::models::unet::{AddedCond, UNetExtra};
use crate::transfer::{self, Staging};
use image::RgbImage;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The bucket sizes graphs are captured for.
pub const BUCKETS: [i64; 4] = [1, 2, 4, 8];

/// Graphs kept at once (each holds its static buffers and its private memory pool).
pub const GRAPH_CACHE: usize = 8;

/// The smallest bucket that holds `streams` (at most the largest bucket).
pub fn bucket_rows(streams: usize) -> i64 {
    BUCKETS.iter().copied().find(|&b| b >= streams as i64).unwrap_or(*BUCKETS.last().expect("buckets"))
}

/// How the UNet items of one stream are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Items {
    /// n items: the slots, conditional text only.
    Cond,
    /// n + 1: slot 0 unconditional, then the slots (`initialize` guidance).
    Initialize,
    /// 2n: the slots unconditional, then conditional (`full` guidance).
    Full,
}

/// What the stream-batch buffer is re-noised with between slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Renoise {
    /// LCM with `add_noise`: the stream's fixed noise of the next slot.
    InitNoise,
    /// LCM without noise.
    Nothing,
    /// DDIM: the guided noise prediction.
    Eps,
}

/// Everything that decides a tick's shapes and branches for one stream: streams with equal recipes share a
/// bucket and a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Recipe {
    mode: Mode,
    /// Latent channels, height, width.
    latent: [i64; 3],
    /// Image height, width.
    image: [i64; 2],
    n: i64,
    items: Items,
    /// Residual guidance applies (guidance > 1 with self-noise or initialize).
    residual: bool,
    /// Guidance combines an unconditional and a conditional prediction.
    guided: bool,
    /// The stock noise is updated after each step (self-noise and initialize, guided or not).
    stock_update: bool,
    renoise: Renoise,
    sdxl: bool,
}

impl Recipe {
    fn items_per_row(&self) -> i64 {
        match self.items {
            Items::Cond => self.n,
            Items::Initialize => self.n + 1,
            Items::Full => 2 * self.n,
        }
    }
}

/// Why a stream cannot take the captured tick (it takes the eager one), or `None` when it can.
pub fn uncapturable(sd: &StableDiffusion, stream: &Stream) -> Option<&'static str> {
    if matches!(sd.autoencoder, Autoencoder::Kl(_)) && stream.settings.mode == Mode::Img2img {
        return Some("the KL autoencoder samples img2img latents with noise from the stream's generator");
    }
    if stream.settings.control != ControlSource::None {
        return Some("ControlNet conditioning is not captured yet");
    }
    if stream.has_image_prompt() {
        return Some("IP-Adapter image prompts are not captured yet");
    }
    if !stream.settings.denoising_batch {
        return Some("streams without the stream batch run their stages one by one");
    }
    None
}

/// The recipe of a stream (call [`uncapturable`] first).
pub fn recipe(sd: &StableDiffusion, stream: &Stream) -> Recipe {
    let s = &stream.settings;
    let p = &stream.prepared;
    let guided = stream.guided();
    let items = match (guided, s.cfg_type) {
        (true, CfgType::Initialize) => Items::Initialize,
        (true, CfgType::Full) => Items::Full,
        _ => Items::Cond,
    };
    Recipe {
        mode: s.mode,
        latent: [p.latent_shape[1], p.latent_shape[2], p.latent_shape[3]],
        image: [s.height, s.width],
        n: p.n,
        items,
        residual: guided && matches!(s.cfg_type, CfgType::SelfNoise | CfgType::Initialize),
        guided: guided && s.cfg_type != CfgType::None,
        stock_update: matches!(s.cfg_type, CfgType::SelfNoise | CfgType::Initialize),
        renoise: match (s.scheduler, s.add_noise) {
            (StreamScheduler::Lcm, true) => Renoise::InitNoise,
            (StreamScheduler::Lcm, false) => Renoise::Nothing,
            (StreamScheduler::Ddim, _) => Renoise::Eps,
        },
        sdxl: sd.unet.takes_added_cond(),
    }
}

/// The static buffers of one bucket: `rows` streams of one recipe.
pub struct Bucket {
    recipe: Recipe,
    rows: i64,
    kind: Kind,
    /// img2img input frames, (rows, H, W, 3) uint8.
    frames: Static,
    /// txt2img entry noise, (rows, c, h, w) fp32 (drawn on the host as the eager tick draws it).
    entry_noise: Static,
    /// Stream-batch latents of slots 1..n, (rows * (n - 1), c, h, w); one row when n = 1 (unused).
    buffer: Static,
    /// Stock noise, fixed noise and fixed noise rolled by one slot: (rows * n, c, h, w).
    stock: Static,
    init_noise: Static,
    init_noise_rolled: Static,
    /// Per-slot scheduler constants, (rows * n, 1, 1, 1).
    alpha: Static,
    beta: Static,
    c_skip: Static,
    c_out: Static,
    alpha_next: Static,
    beta_next: Static,
    /// Per-slot UNet timesteps, (rows * n,) int64.
    timesteps: Static,
    /// Conditional and unconditional text per row, (rows, tokens, dim); SDXL's pooled text (rows, dim).
    cond: Static,
    uncond: Static,
    cond_pooled: Option<Static>,
    uncond_pooled: Option<Static>,
    /// SDXL time ids per row, (rows, 6).
    time_ids: Option<Static>,
    /// Guidance scale and residual-guidance delta per row, (rows, 1, 1, 1) fp32.
    guidance: Static,
    delta: Static,
    /// The output frames, (rows, H, W, 3) uint8.
    output: Static,
}

impl StaticBuffers for Bucket {
    fn statics(&self) -> Vec<(&'static str, &Static)> {
        let mut v = vec![
            ("frames", &self.frames),
            ("entry_noise", &self.entry_noise),
            ("buffer", &self.buffer),
            ("stock", &self.stock),
            ("init_noise", &self.init_noise),
            ("init_noise_rolled", &self.init_noise_rolled),
            ("alpha", &self.alpha),
            ("beta", &self.beta),
            ("c_skip", &self.c_skip),
            ("c_out", &self.c_out),
            ("alpha_next", &self.alpha_next),
            ("beta_next", &self.beta_next),
            ("timesteps", &self.timesteps),
            ("cond", &self.cond),
            ("uncond", &self.uncond),
            ("guidance", &self.guidance),
            ("delta", &self.delta),
            ("output", &self.output),
        ];
        for (name, s) in [
            ("cond_pooled", &self.cond_pooled),
            ("uncond_pooled", &self.uncond_pooled),
            ("time_ids", &self.time_ids),
        ] {
            if let Some(s) = s {
                v.push((name, s));
            }
        }
        v
    }
}

impl Bucket {
    /// Buffers for `rows` streams of `recipe`, shaped after `example` (a stream of that recipe). Scheduler
    /// constants start at 1 (c_skip at 0) so that rows no stream has used yet compute finite values.
    fn new(sd: &StableDiffusion, recipe: Recipe, rows: i64, example: &Stream) -> Result<Bucket> {
        let (device, kind) = (sd.device, sd.kind);
        let [c, h, w] = recipe.latent;
        let [ih, iw] = recipe.image;
        let n = recipe.n;
        let slots = rows * n;
        let zeros = |shape: &[i64], k: Kind| Static::zeros(shape, k, device);
        let ones = |shape: &[i64]| Static::new(Tensor::f_ones(shape, (kind, device))?);
        let col = [slots, 1, 1, 1];
        let hidden = example.uncond.hidden.size();
        let pooled = |e: &TextEmbedding| -> Result<Option<Static>> {
            e.pooled.as_ref().map(|p| zeros(&[rows, p.size()[1]], kind)).transpose()
        };
        Ok(Bucket {
            recipe,
            rows,
            kind,
            frames: zeros(&[rows, ih, iw, 3], Kind::Uint8)?,
            entry_noise: zeros(&[rows, c, h, w], Kind::Float)?,
            buffer: zeros(&[(rows * (n - 1)).max(1), c, h, w], kind)?,
            stock: zeros(&[slots, c, h, w], kind)?,
            init_noise: zeros(&[slots, c, h, w], kind)?,
            init_noise_rolled: zeros(&[slots, c, h, w], kind)?,
            alpha: ones(&col)?,
            beta: ones(&col)?,
            c_skip: zeros(&col, kind)?,
            c_out: ones(&col)?,
            alpha_next: ones(&col)?,
            beta_next: ones(&col)?,
            timesteps: zeros(&[slots], Kind::Int64)?,
            cond: zeros(&[rows, hidden[1], hidden[2]], kind)?,
            uncond: zeros(&[rows, hidden[1], hidden[2]], kind)?,
            cond_pooled: pooled(&example.uncond)?,
            uncond_pooled: pooled(&example.uncond)?,
            time_ids: example.time_ids.as_ref().map(|t| zeros(&[rows, t.size()[1]], kind)).transpose()?,
            guidance: Static::new(Tensor::f_ones([rows, 1, 1, 1], (Kind::Float, device))?)?,
            delta: Static::new(Tensor::f_ones([rows, 1, 1, 1], (Kind::Float, device))?)?,
            output: zeros(&[rows, ih, iw, 3], Kind::Uint8)?,
        })
    }

    /// Copies `stream`'s state, constants and conditioning into row `r` (device-to-device copies and fills).
    fn load_row(&self, r: i64, stream: &mut Stream, cond: &TextEmbedding) -> Result<()> {
        let n = self.recipe.n;
        let p = &stream.prepared;
        let slots = |s: &Static, t: &Tensor| s.write_rows(r * n, t);
        slots(&self.stock, &stream.stock_noise)?;
        slots(&self.init_noise, &p.init_noise)?;
        slots(&self.init_noise_rolled, &p.init_noise_rolled)?;
        slots(&self.alpha, &p.alpha)?;
        slots(&self.beta, &p.beta)?;
        slots(&self.c_skip, &p.c_skip)?;
        slots(&self.c_out, &p.c_out)?;
        slots(&self.alpha_next, &p.alpha_next)?;
        slots(&self.beta_next, &p.beta_next)?;
        slots(&self.timesteps, &p.timesteps)?;
        if let Some(buffer) = &stream.buffer {
            self.buffer.write_rows(r * (n - 1), buffer)?;
        }
        let uncond = &stream.uncond;
        self.cond.write_rows(r, &cond.hidden.f_to_kind(self.kind)?)?;
        self.uncond.write_rows(r, &uncond.hidden.f_to_kind(self.kind)?)?;
        for (dst, src) in [(&self.cond_pooled, &cond.pooled), (&self.uncond_pooled, &uncond.pooled)] {
            if let (Some(dst), Some(src)) = (dst, src) {
                dst.write_rows(r, &src.f_to_kind(self.kind)?)?;
            }
        }
        if let (Some(dst), Some(src)) = (&self.time_ids, &stream.time_ids) {
            dst.write_rows(r, src)?;
        }
        let _ = self.guidance.get().f_narrow(0, r, 1)?.f_fill_(stream.settings.guidance)?;
        let _ = self.delta.get().f_narrow(0, r, 1)?.f_fill_(stream.settings.delta)?;
        Ok(())
    }

    /// Copies row `r`'s updated state back to `stream` (fresh tensors: the buffers are reused next tick).
    fn store_row(&self, r: i64, stream: &mut Stream) -> Result<()> {
        let n = self.recipe.n;
        stream.stock_noise = self.stock.get().f_narrow(0, r * n, n)?.f_detach_copy()?;
        if stream.buffer.is_some() {
            stream.buffer = Some(self.buffer.get().f_narrow(0, r * (n - 1), n - 1)?.f_detach_copy()?);
        }
        Ok(())
    }
}

/// (rows * k, ...) viewed as (rows, k, ...).
fn per_row(t: &Tensor, rows: i64) -> Result<Tensor> {
    let mut shape = t.size();
    let k = shape[0] / rows;
    shape[0] = k;
    shape.insert(0, rows);
    Ok(t.f_view(shape.as_slice())?)
}

/// (rows, k, ...) back to (rows * k, ...).
fn flat(t: &Tensor) -> Result<Tensor> {
    let mut shape = t.size();
    let k = shape.remove(1);
    shape[0] *= k;
    Ok(t.f_reshape(shape.as_slice())?)
}

/// (rows, ...) repeated `k` times per row: (rows, k, ...).
fn repeat_rows(t: &Tensor, k: i64) -> Result<Tensor> {
    let mut shape = t.size();
    shape.insert(1, k);
    Ok(t.f_unsqueeze(1)?.f_expand(shape.as_slice(), false)?)
}

/// The captured work: one tick over every row of the bucket (see the module docs). The same operations, in
/// the same order, as the eager [`Stream::begin`], UNet call and [`Stream::finish`].
fn tick_work(b: &Bucket, sd: &StableDiffusion) -> Result<()> {
    let r = b.recipe;
    let (rows, n, kind) = (b.rows, r.n, b.kind);
    let column = |s: &Static| per_row(s.get(), rows);
    // Entry latents (rows, c, h, w).
    let (alpha, beta) = (column(&b.alpha)?, column(&b.beta)?);
    let init = column(&b.init_noise)?;
    let entry = match r.mode {
        Mode::Img2img => {
            // io::image::to_tensor's preprocessing: x / 255 * 2 - 1 in fp32, then the model's dtype.
            let img = b.frames.get().f_permute([0, 3, 1, 2])?.f_to_kind(Kind::Float)?;
            // Contiguous (NCHW), as the eager tick's batch is: convolutions pick their kernels by layout.
            let img = img
                .f_div_scalar(255.0)?
                .f_mul_scalar(2.0)?
                .f_sub_scalar(1.0)?
                .f_to_kind(kind)?
                .f_contiguous()?;
            let z = sd.autoencoder.encode_scaled(&img, |_| {
                Err(Error::Model("the captured tick cannot sample the KL autoencoder".into()))
            })?;
            alpha.f_select(1, 0)?.f_mul(&z)?.f_add(&beta.f_select(1, 0)?.f_mul(&init.f_select(1, 0)?)?)?
        }
        Mode::Txt2img => b.entry_noise.get().f_to_kind(kind)?,
    };
    // The slots: the entry latent, then the buffer; the stock noise moves one slot on.
    let mut stock = column(&b.stock)?;
    let x = if n > 1 {
        let kept = stock.f_narrow(1, 0, n - 1)?;
        stock = Tensor::f_cat(&[init.f_narrow(1, 0, 1)?, kept], 1)?;
        Tensor::f_cat(&[entry.f_unsqueeze(1)?, per_row(b.buffer.get(), rows)?], 1)?
    } else {
        entry.f_unsqueeze(1)?
    };
    // One UNet call over every item of every row.
    let t = column(&b.timesteps)?;
    let cond_n = repeat_rows(b.cond.get(), n)?;
    let (sample, timesteps, hidden, uncond_rows) = match r.items {
        Items::Cond => (x.shallow_clone(), t.shallow_clone(), cond_n, 0),
        Items::Initialize => (
            Tensor::f_cat(&[&x.f_narrow(1, 0, 1)?, &x], 1)?,
            Tensor::f_cat(&[&t.f_narrow(1, 0, 1)?, &t], 1)?,
            Tensor::f_cat(&[&b.uncond.get().f_unsqueeze(1)?, &cond_n], 1)?,
            1,
        ),
        Items::Full => (
            Tensor::f_cat(&[&x, &x], 1)?,
            Tensor::f_cat(&[&t, &t], 1)?,
            Tensor::f_cat(&[&repeat_rows(b.uncond.get(), n)?, &cond_n], 1)?,
            n,
        ),
    };
    let m = r.items_per_row();
    let added = match (&b.cond_pooled, &b.uncond_pooled, &b.time_ids) {
        (Some(cp), Some(up), Some(ids)) => {
            let pooled = if uncond_rows > 0 {
                Tensor::f_cat(&[&repeat_rows(up.get(), uncond_rows)?, &repeat_rows(cp.get(), n)?], 1)?
            } else {
                repeat_rows(cp.get(), n)?
            };
            Some(AddedCond { text_embeds: flat(&pooled)?, time_ids: flat(&repeat_rows(ids.get(), m)?)? })
        }
        _ => None,
    };
    let extra = UNetExtra { added_cond: added.as_ref(), ..Default::default() };
    let sample = flat(&sample)?.f_contiguous()?;
    let pred = sd.unet.forward_with(&sample, &flat(&timesteps)?, &flat(&hidden)?.f_contiguous()?, &extra)?;
    let pred = per_row(&pred, rows)?;
    // Guidance.
    let (text, mut uncond) = match r.items {
        Items::Initialize => {
            stock = Tensor::f_cat(&[pred.f_narrow(1, 0, 1)?, stock.f_narrow(1, 1, n - 1)?], 1)?;
            (pred.f_narrow(1, 1, n)?, None)
        }
        Items::Full => (pred.f_narrow(1, n, n)?, Some(pred.f_narrow(1, 0, n)?)),
        Items::Cond => (pred, None),
    };
    // Scalars per row (fp32, as the eager tick multiplies by an f64 scalar in the tensors' opmath).
    let per_item = |s: &Static| -> Result<Tensor> { Ok(s.get().f_unsqueeze(1)?) };
    if r.residual {
        uncond = Some(stock.f_mul(&per_item(&b.delta)?)?.f_to_kind(kind)?);
    }
    let eps = match (r.guided, uncond) {
        (true, Some(u)) => u.f_add(&text.f_sub(&u)?.f_mul(&per_item(&b.guidance)?)?.f_to_kind(kind)?)?,
        _ => text,
    };
    let (c_out, c_skip) = (column(&b.c_out)?, column(&b.c_skip)?);
    let denoise = |x: &Tensor, eps: &Tensor| -> Result<Tensor> {
        let f_theta = x.f_sub(&beta.f_mul(eps)?)?.f_div(&alpha)?;
        Ok(c_out.f_mul(&f_theta)?.f_add(&c_skip.f_mul(x)?)?)
    };
    let denoised = denoise(&x, &eps)?;
    if r.stock_update {
        let scaled_noise = beta.f_mul(&stock)?;
        let delta_x = denoise(&scaled_noise, &eps)?;
        let delta_x = column(&b.alpha_next)?.f_mul(&delta_x)?.f_div(&column(&b.beta_next)?)?;
        stock = column(&b.init_noise_rolled)?.f_add(&delta_x)?;
    }
    b.stock.write(&flat(&stock)?)?;
    let latent = if n > 1 {
        let head = denoised.f_narrow(1, 0, n - 1)?;
        let renoise = match r.renoise {
            Renoise::InitNoise => Some(init.f_narrow(1, 1, n - 1)?),
            Renoise::Nothing => None,
            Renoise::Eps => Some(eps.f_narrow(1, 0, n - 1)?),
        };
        let mut next = alpha.f_narrow(1, 1, n - 1)?.f_mul(&head)?;
        if let Some(noise) = renoise {
            next = next.f_add(&beta.f_narrow(1, 1, n - 1)?.f_mul(&noise)?)?;
        }
        b.buffer.write(&flat(&next)?)?;
        denoised.f_select(1, n - 1)?
    } else {
        denoised.f_select(1, 0)?
    };
    // Decode and io::image::to_rgb8's postprocessing: (x / 2 + 0.5).clamp(0, 1) * 255, rounded, uint8, NHWC.
    let image = sd.autoencoder.decode_scaled(&latent.f_contiguous()?)?.f_to_kind(Kind::Float)?;
    let u8 = image
        .f_div_scalar(2.0)?
        .f_add_scalar(0.5)?
        .f_clamp(0.0, 1.0)?
        .f_mul_scalar(255.0)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?
        .f_permute([0, 2, 3, 1])?;
    b.output.write(&u8)
}

/// An 8-bit (H, W, 3) frame on the device resized to `height` x `width` on the device: antialiased bicubic
/// (torch's `interpolate(..., mode="bicubic", antialias=True)`), rounded back to 8 bits. The eager tick resizes
/// on the host with Lanczos; the two differ by a few levels at edges.
pub fn resize_on_device(frame: &Tensor, height: i64, width: i64) -> Result<Tensor> {
    let x = frame.f_permute([2, 0, 1])?.f_unsqueeze(0)?.f_to_kind(Kind::Float)?;
    let y = x.f_internal_upsample_bicubic2d_aa([height, width], false, None, None)?;
    Ok(y.f_clamp(0.0, 255.0)?.f_round()?.f_to_kind(Kind::Uint8)?.f_squeeze_dim(0)?.f_permute([1, 2, 0])?)
}

/// One stream's frame for the captured tick.
pub struct ResidentInput<'a> {
    pub stream: &'a mut Stream,
    pub frame_id: u64,
    /// img2img: the frame (resized on the device when it is not at the stream's size); txt2img: `None`.
    pub image: Option<&'a RgbImage>,
}

/// What one stream gets from the captured tick.
pub struct ResidentOutput {
    pub stream_id: u64,
    pub answers: u64,
    pub frame_id: u64,
    pub image: RgbImage,
    pub warmup: bool,
}

/// One stream's output before its pixels are back on the host.
#[derive(Debug, Clone, Copy)]
pub struct OutputMeta {
    pub stream_id: u64,
    pub answers: u64,
    pub frame_id: u64,
    pub warmup: bool,
}

/// A bucket's outputs on their way back: `readback` holds one image per entry of `outputs`, in order.
pub struct InFlight {
    pub readback: transfer::Readback,
    pub outputs: Vec<OutputMeta>,
}

impl InFlight {
    /// Waits for the pixels (see [`transfer::Readback::wait`]).
    pub fn wait(self) -> Result<Vec<ResidentOutput>> {
        let images = self.readback.wait()?;
        Ok(self
            .outputs
            .into_iter()
            .zip(images)
            .map(|(m, image)| ResidentOutput {
                stream_id: m.stream_id,
                answers: m.answers,
                frame_id: m.frame_id,
                image,
                warmup: m.warmup,
            })
            .collect())
    }
}

struct Cached {
    graph: Graph<Bucket>,
    staging: Staging,
    /// For frames not at the stream's size (their own shape).
    resize_staging: Staging,
    last_used: u64,
}

/// The captured tick's graphs, one per (recipe, bucket size), least recently used dropped first.
pub struct ResidentTick {
    backend: Backend,
    graphs: HashMap<(Recipe, i64), Cached>,
    uses: u64,
    /// Captures made so far (a re-capture follows a change of shapes).
    pub captures: u64,
}

impl ResidentTick {
    pub fn new(backend: Backend) -> ResidentTick {
        ResidentTick { backend, graphs: HashMap::new(), uses: 0, captures: 0 }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Graphs held now.
    pub fn graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Runs one tick for `inputs` (all capturable: see [`uncapturable`]; similarity decisions already made)
    /// and waits for the outputs.
    pub fn run(
        &mut self,
        sd: &StableDiffusion,
        inputs: Vec<ResidentInput<'_>>,
    ) -> Result<Vec<ResidentOutput>> {
        let mut outputs = Vec::new();
        for bucket in self.start(sd, inputs)? {
            outputs.extend(bucket.wait()?);
        }
        Ok(outputs)
    }

    /// Runs one tick for `inputs` without waiting for the device: the outputs come back per bucket, to be
    /// waited for (on another thread, say). Streams are grouped by recipe, each group in buckets of at most 8
    /// rows.
    pub fn start(&mut self, sd: &StableDiffusion, inputs: Vec<ResidentInput<'_>>) -> Result<Vec<InFlight>> {
        let _guard = tch::no_grad_guard();
        let mut groups: Vec<(Recipe, Vec<ResidentInput<'_>>)> = Vec::new();
        for input in inputs {
            let key = recipe(sd, input.stream);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push(input),
                None => groups.push((key, vec![input])),
            }
        }
        let mut outputs = Vec::new();
        for (key, mut group) in groups {
            while !group.is_empty() {
                let take = group.len().min(*BUCKETS.last().expect("buckets") as usize);
                let chunk: Vec<ResidentInput<'_>> = group.drain(..take).collect();
                outputs.push(self.run_bucket(sd, key, chunk)?);
            }
        }
        Ok(outputs)
    }

    fn run_bucket(
        &mut self,
        sd: &StableDiffusion,
        key: Recipe,
        mut inputs: Vec<ResidentInput<'_>>,
    ) -> Result<InFlight> {
        let rows = bucket_rows(inputs.len());
        self.uses += 1;
        if !self.graphs.contains_key(&(key, rows)) {
            if self.graphs.len() >= GRAPH_CACHE {
                let oldest = self.graphs.iter().min_by_key(|(_, c)| c.last_used).map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.graphs.remove(&k);
                }
            }
            let bucket = Bucket::new(sd, key, rows, inputs[0].stream)?;
            let [ih, iw] = key.image;
            let staging = Staging::new(&[ih, iw, 3], Kind::Uint8, sd.device)?;
            let resize_staging = Staging::new(&[ih, iw, 3], Kind::Uint8, sd.device)?;
            let graph = Graph::capture(bucket, sd, tick_work, self.backend)?;
            self.captures += 1;
            tracing::info!("captured the tick for {} row(s) of {:?} ({})", rows, key, graph.backend_name());
            self.graphs.insert((key, rows), Cached { graph, staging, resize_staging, last_used: 0 });
        }
        let cached = self.graphs.get_mut(&(key, rows)).expect("inserted above");
        cached.last_used = self.uses;
        let b = cached.graph.buffers();
        for (r, input) in inputs.iter_mut().enumerate() {
            let r = r as i64;
            let stream = &mut *input.stream;
            let cond = stream.cond.advance()?;
            b.load_row(r, stream, &cond)?;
            match (key.mode, input.image) {
                (Mode::Img2img, Some(img)) => {
                    let [ih, iw] = key.image;
                    let row = b.frames.get().f_select(0, r)?;
                    if (img.height() as i64, img.width() as i64) == (ih, iw) {
                        transfer::upload_image(img, &row, &mut cached.staging)?;
                    } else {
                        // Uploaded at its own size (still one upload), resized on the device.
                        let raw = transfer::image_tensor(img)?;
                        let on_device = Tensor::f_empty(raw.size(), (Kind::Uint8, sd.device))?;
                        transfer::upload(&raw, &on_device, &mut cached.resize_staging)?;
                        row.shallow_clone().f_copy_(&resize_on_device(&on_device, ih, iw)?)?;
                    }
                }
                (Mode::Txt2img, _) => {
                    let p = &stream.prepared;
                    let noise = stream.generator.randn(&p.latent_shape, Device::Cpu, Kind::Float)?;
                    transfer::upload(&noise, &b.entry_noise.get().f_narrow(0, r, 1)?, &mut cached.staging)?;
                }
                (Mode::Img2img, None) => {
                    return Err(Error::invalid("frame", "an img2img stream needs an input frame"))
                }
            }
            stream.in_flight.push_back(input.frame_id);
        }
        cached.graph.replay(sd)?;
        let b = cached.graph.buffers();
        let count = inputs.len() as i64;
        let mut outputs = Vec::with_capacity(inputs.len());
        for (r, input) in inputs.iter_mut().enumerate() {
            let stream = &mut *input.stream;
            b.store_row(r as i64, stream)?;
            let warmup = (stream.in_flight.len() as i64) < key.n;
            let answers = if warmup {
                *stream.in_flight.back().unwrap_or(&0)
            } else {
                stream.in_flight.pop_front().unwrap_or(0)
            };
            outputs.push(OutputMeta { stream_id: stream.id, answers, frame_id: input.frame_id, warmup });
        }
        let readback = transfer::readback(&b.output.get().f_narrow(0, 0, count)?)?;
        Ok(InFlight { readback, outputs })
    }
}
