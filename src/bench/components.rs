//! Component timings: each piece of the per-frame work timed alone on the loaded model, warm-up iterations
//! first, the device synchronised before every clock read.
use super::stats::Summary;
use crate::error::Result;
use crate::models::stable_diffusion::{load_autoencoder, Autoencoder, StableDiffusion};
use crate::models::unet::{AddedCond, UNetExtra};
use crate::pipeline::MicroConditioning;
use crate::stream::batch::{tick, TickInput};
use crate::stream::settings::StreamSettings;
use crate::stream::Stream;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Tensor};

/// The timings of one component.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComponentResult {
    /// e.g. `unet b=2`, `taesd decode`, `engine tick (1 stream)`.
    pub name: String,
    pub warmup: usize,
    pub ms: Summary,
}

/// What to time and how often.
#[derive(Debug, Clone)]
pub struct ComponentPlan {
    pub batch_sizes: Vec<i64>,
    pub warmup: usize,
    pub iters: usize,
    pub jpeg_quality: u8,
    /// Also time the captured tick on this backend.
    pub graphs: Option<crate::graph::Backend>,
}

impl ComponentPlan {
    /// Timed pieces in a run (for the progress bar): UNet per batch, text encoder, up to two autoencoders
    /// (encode and decode), the engine tick, JPEG encode and decode.
    pub fn count(&self) -> usize {
        self.batch_sizes.len() + 1 + 4 + 1 + 2 + usize::from(self.graphs.is_some())
    }
}

/// Waits for the device's queued work (a no-op on CPU), so that a clock read after it is true.
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

struct Timer<'a> {
    device: Device,
    plan: &'a ComponentPlan,
    progress: &'a ProgressBar,
    results: Vec<ComponentResult>,
}

impl Timer<'_> {
    fn time(&mut self, name: impl Into<String>, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        let name = name.into();
        self.progress.set_message(name.clone());
        for _ in 0..self.plan.warmup {
            f()?;
        }
        let mut samples = Vec::with_capacity(self.plan.iters);
        for _ in 0..self.plan.iters {
            sync(self.device);
            let t0 = Instant::now();
            f()?;
            sync(self.device);
            samples.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        self.results.push(ComponentResult { name, warmup: self.plan.warmup, ms: Summary::of(&samples) });
        self.progress.inc(1);
        Ok(())
    }

    fn autoencoder(&mut self, label: &str, ae: &Autoencoder, image: &Tensor, latents: &Tensor) -> Result<()> {
        let (device, kind) = (image.device(), image.kind());
        self.time(format!("{label} encode"), || {
            drop(ae.encode_scaled(image, |shape| Ok(Tensor::f_randn(shape, (kind, device))?))?);
            Ok(())
        })?;
        self.time(format!("{label} decode"), || {
            drop(ae.decode_scaled(latents)?);
            Ok(())
        })
    }
}

fn autoencoder_label(ae: &Autoencoder) -> &'static str {
    match ae {
        Autoencoder::Kl(_) => "vae",
        Autoencoder::Tiny(_) => "taesd",
    }
}

/// Times every component of `sd` at the stream `settings`' size. When the model runs with a TAESD, the
/// model's own AutoencoderKL (from a diffusers folder) is loaded and timed too (and the other way round is not possible: a model has
/// no TAESD of its own).
pub fn run(
    sd: &StableDiffusion,
    settings: &StreamSettings,
    plan: &ComponentPlan,
    progress: &ProgressBar,
) -> Result<Vec<ComponentResult>> {
    let _guard = tch::no_grad_guard();
    let (device, kind) = (sd.device, sd.kind);
    let mut timer = Timer { device, plan, progress, results: Vec::new() };
    let (w, h) = (settings.width, settings.height);
    let f = sd.vae_scale_factor();
    let channels = sd.unet_config.in_channels;
    let dim = sd.unet.cross_attention_width();

    timer.time("text encoder", || {
        drop(sd.encode_text(&settings.prompt, None)?);
        Ok(())
    })?;

    for &b in &plan.batch_sizes {
        let sample = Tensor::f_randn([b, channels, h / f, w / f], (kind, device))?;
        let steps: Vec<i64> = (0..b).map(|i| 999 - 100 * i).collect();
        let timesteps = Tensor::f_from_slice(&steps)?.f_to_device(device)?;
        let context = Tensor::f_randn([b, 77, dim], (kind, device))?;
        let cond = match sd.unet_config.time_cond_proj_dim {
            Some(d) => Some(Tensor::f_randn([b, d], (kind, device))?),
            None => None,
        };
        // SDXL: pooled text embeddings and the time ids of this size.
        let added = match &sd.text_encoder_2 {
            Some(te2) => Some(AddedCond {
                text_embeds: Tensor::f_randn([b, te2.config().projection_dim], (kind, device))?,
                time_ids: MicroConditioning::default().time_ids_tensor(h, w, b, device, kind)?,
            }),
            None => None,
        };
        let extra = UNetExtra { timestep_cond: cond.as_ref(), added_cond: added.as_ref(), control: None };
        timer.time(format!("unet b={b}"), || {
            drop(sd.unet.forward_with(&sample, &timesteps, &context, &extra)?);
            Ok(())
        })?;
    }

    let image = Tensor::f_rand([1, 3, h, w], (kind, device))?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?;
    let latents = Tensor::f_randn([1, channels, h / f, w / f], (kind, device))?;
    timer.autoencoder(autoencoder_label(&sd.autoencoder), &sd.autoencoder, &image, &latents)?;
    // A single-file checkpoint has no `vae/` folder of its own to load the model's VAE from.
    let single_file = std::path::Path::new(&sd.source.spec).is_file();
    let own_vae = matches!(sd.autoencoder, Autoencoder::Tiny(_)) && !single_file;
    if own_vae {
        let own = load_autoencoder(&sd.source, "vae", device, kind, sd.is_sdxl())?;
        timer.autoencoder(autoencoder_label(&own), &own, &image, &latents)?;
    } else {
        progress.inc(2);
    }

    let cond = sd.encode_text(&settings.prompt, None)?;
    let uncond = sd.encode_text(&settings.negative_prompt, None)?;
    let mut stream = Stream::new(1, sd, settings.clone(), cond, uncond)?;
    let frame = super::pattern::frame(w as u32, h as u32, 0, 0);
    let frame = crate::io::image::to_tensor(&frame, device, kind)?;
    let mut frame_id = 0u64;
    timer.time("engine tick (1 stream)", || {
        let input = TickInput { stream: &mut stream, frame_id, image: Some(frame.shallow_clone()) };
        frame_id += 1;
        tick(sd, vec![input], false)?;
        Ok(())
    })?;
    if let Some(backend) = plan.graphs {
        // The same frame through the captured tick (one replay, the uint8 output read back), beside the eager
        // tick above (which stops at the decoded tensor).
        let cond = sd.encode_text(&settings.prompt, None)?;
        let uncond = sd.encode_text(&settings.negative_prompt, None)?;
        let mut stream = Stream::new(2, sd, settings.clone(), cond, uncond)?;
        let rgb = super::pattern::frame(w as u32, h as u32, 0, 0);
        let mut graphs = crate::stream::resident::ResidentTick::new(backend);
        let mut frame_id = 0u64;
        timer.time(&format!("captured tick (1 stream, {})", backend.name()), || {
            let input =
                crate::stream::resident::ResidentInput { stream: &mut stream, frame_id, image: Some(&rgb) };
            frame_id += 1;
            graphs.run(sd, vec![input])?;
            Ok(())
        })?;
    }

    let rgb = super::pattern::frame(w as u32, h as u32, 3, 0);
    let jpeg = crate::io::image::encode_jpeg(&rgb, plan.jpeg_quality)?;
    timer.time("jpeg encode", || {
        crate::io::image::encode_jpeg(&rgb, plan.jpeg_quality)?;
        Ok(())
    })?;
    timer.time("jpeg decode", || {
        crate::io::image::decode(&jpeg, "benchmark frame")?;
        Ok(())
    })?;
    Ok(timer.results)
}
