//! Component timings: each piece of the per-frame work timed alone on the loaded model, warm-up iterations
//! first, the device synchronised before every clock read.
use super::stats::Summary;
use crate::error::{Error, Result};
use crate::models::stable_diffusion::{load_autoencoder, Autoencoder, StableDiffusion};
use crate::models::unet::{AddedCond, ImageCond, UNetExtra};
use crate::pipeline::MicroConditioning;
use crate::stream::batch::{tick, TickInput};
use crate::stream::settings::StreamSettings;
use crate::stream::Stream;
use image::RgbImage;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The timings of one component.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComponentResult {
    /// e.g. `unet b=2`, `taesd decode`, `engine tick (1 stream)`.
    pub name: String,
    pub warmup: usize,
    pub ms: Summary,
}

/// The host's per-frame rows, in the order they are reported (names are stable: scripts read them).
pub const HOST_ROWS: [&str; 7] = [
    "jpeg decode",
    "host resize",
    "host frame buffer",
    "host readback",
    "jpeg encode",
    "host per frame",
    "host per frame + resize",
];

/// What to time and how often.
#[derive(Debug, Clone)]
pub struct ComponentPlan {
    pub batch_sizes: Vec<i64>,
    pub warmup: usize,
    pub iters: usize,
    pub jpeg_quality: u8,
    /// Also time the captured tick on this backend.
    pub graphs: Option<crate::graph::Backend>,
    /// Also time the IP-Adapter loaded with the model: its image encoder (once per image) and the UNet with its
    /// decoupled cross-attention at each batch size (the extra attention per UNet call is the difference).
    pub ip_adapter: bool,
}

impl ComponentPlan {
    /// Timed pieces in a run (for the progress bar): UNet per batch, text encoder, up to two autoencoders
    /// (encode and decode), the engine tick, and the host's per-frame rows (see [`HOST_ROWS`]).
    pub fn count(&self) -> usize {
        self.batch_sizes.len()
            + 1
            + 4
            + 1
            + HOST_ROWS.len()
            + usize::from(self.graphs.is_some())
            + if self.ip_adapter { 1 + self.batch_sizes.len() } else { 0 }
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
        let extra = UNetExtra {
            timestep_cond: cond.as_ref(),
            added_cond: added.as_ref(),
            control: None,
            image: None,
        };
        timer.time(format!("unet b={b}"), || {
            drop(sd.unet.forward_with(&sample, &timesteps, &context, &extra)?);
            Ok(())
        })?;
        if let (true, Some(model)) = (plan.ip_adapter, &sd.image_prompt) {
            // Every row with an image at scale 1: the decoupled cross-attention runs in every cross-attention.
            let a = &model.adapter;
            let image = ImageCond {
                layers: a.layers(),
                tokens: Tensor::f_randn([b, a.tokens(), a.cross_dim()], (kind, device))?,
                scales: vec![vec![1.0; a.layers().len()]; b as usize],
            };
            let extra = UNetExtra { image: Some(&image), ..extra };
            timer.time(format!("unet+ip-adapter b={b}"), || {
                drop(sd.unet.forward_with(&sample, &timesteps, &context, &extra)?);
                Ok(())
            })?;
        }
    }
    if let (true, Some(model)) = (plan.ip_adapter, &sd.image_prompt) {
        // Once per style image: CLIPImageProcessor, the vision encoder and the projection, for the image and for
        // "no image" (what guidance needs), as a stream caches them.
        let style = super::pattern::textured(w as u32, h as u32, 1);
        timer.time("ip-adapter image embed", || {
            drop(model.embed(&style)?);
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
        timer.time(format!("captured tick (1 stream, {})", backend.name()), || {
            let input =
                crate::stream::resident::ResidentInput { stream: &mut stream, frame_id, image: Some(&rgb) };
            frame_id += 1;
            graphs.run(sd, vec![input])?;
            Ok(())
        })?;
    }

    host(&mut timer, device, w as u32, h as u32, plan.jpeg_quality)?;
    Ok(timer.results)
}

/// The size of the camera-like frame that `host resize` scales to the stream's size.
pub const RESIZE_FROM: (u32, u32) = (640, 480);

/// The host's work per frame per stream at the stream's size, each piece alone on one thread, then chained:
/// `jpeg decode` (a client's frame), `host resize` (a 640x480 frame to the stream's size, the daemon's Lanczos3),
/// `host frame buffer` (the uint8 frame into a host buffer for the upload: pinned memory with CUDA),
/// `host readback` (a uint8 output from the device into host memory, through pinned memory with CUDA, and into
/// the image the encoder takes; on CPU one copy), `jpeg encode` (the daemon's output encoding), then
/// `host per frame` (decode, frame buffer, readback, encode in a row: a frame at the stream's size) and
/// `host per frame + resize` (the same from a 640x480 frame). The pictures are photo-like stills
/// (`pattern::textured`), which cost JPEG about what camera frames and diffusion outputs do.
fn host(timer: &mut Timer<'_>, device: Device, w: u32, h: u32, quality: u8) -> Result<()> {
    use crate::io::image::{decode, encode_jpeg, resize};
    let still = super::pattern::textured(w, h, 0);
    let jpeg = encode_jpeg(&still, quality)?;
    let camera = encode_jpeg(&super::pattern::textured(RESIZE_FROM.0, RESIZE_FROM.1, 0), quality)?;
    let camera_rgb = decode(&camera, "benchmark frame")?;
    let len = (w * h * 3) as usize;
    let shape = [h as i64, w as i64, 3];
    let pinned =
        |t: Tensor| -> Result<Tensor> { Ok(if device.is_cuda() { t.f_pin_memory(device)? } else { t }) };
    let upload = pinned(Tensor::f_empty(shape, (Kind::Uint8, Device::Cpu))?)?;
    let download = pinned(Tensor::f_empty(shape, (Kind::Uint8, Device::Cpu))?)?;
    // A uint8 output on the device (what the tick's last step leaves for readback).
    let output = Tensor::f_from_data_size(still.as_raw(), &shape, Kind::Uint8)?.f_to_device(device)?;

    let to_buffer = |img: &RgbImage| -> Result<()> {
        if img.as_raw().len() != len {
            return Err(Error::invalid("benchmark frame", "not at the stream's size"));
        }
        // SAFETY: `upload` is a contiguous uint8 CPU tensor of exactly `len` elements that nothing else
        // references, and `img` holds `len` bytes; the regions cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(img.as_raw().as_ptr(), upload.data_ptr() as *mut u8, len) };
        Ok(())
    };
    let mut download = download;
    let mut readback = || -> Result<RgbImage> {
        let mut data = vec![0u8; len];
        if device.is_cuda() {
            download.f_copy_(&output)?;
            download.f_copy_data_u8(&mut data, len)?;
        } else {
            output.f_copy_data_u8(&mut data, len)?;
        }
        RgbImage::from_raw(w, h, data).ok_or_else(|| Error::Model("readback of the wrong size".into()))
    };

    timer.time("jpeg decode", || {
        decode(&jpeg, "benchmark frame")?;
        Ok(())
    })?;
    timer.time("host resize", || {
        drop(resize(camera_rgb.clone(), w, h));
        Ok(())
    })?;
    timer.time("host frame buffer", || to_buffer(&still))?;
    timer.time("host readback", || {
        readback()?;
        Ok(())
    })?;
    timer.time("jpeg encode", || {
        encode_jpeg(&still, quality)?;
        Ok(())
    })?;
    timer.time("host per frame", || {
        to_buffer(&decode(&jpeg, "benchmark frame")?)?;
        encode_jpeg(&readback()?, quality)?;
        Ok(())
    })?;
    timer.time("host per frame + resize", || {
        to_buffer(&resize(decode(&camera, "benchmark frame")?, w, h))?;
        encode_jpeg(&readback()?, quality)?;
        Ok(())
    })
}
