//! The `sdstream` command line: parses flags and calls the library.
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use sdstream::models::stable_diffusion::{LoadOptions, StableDiffusion};
use sdstream::pipeline::{self, GenerateParams};
use sdstream::schedulers::{SchedulerKind, TimestepSpacing};
use sdstream::stream::settings::{StreamSettings, StreamSettingsPatch};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sdstream", version, about = "Real-time Stable Diffusion on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one image from a prompt.
    Txt2img(Txt2Img),
    /// Transform one image guided by a prompt.
    Img2img(Img2Img),
    /// Run a sequence of images through one stream (StreamDiffusion's stream batch), one PNG out per input.
    Stream(StreamCmd),
    /// Run the daemon: WebSocket streams, the browser client, health and metrics on one port.
    Serve(ServeCmd),
    /// Run the daemon with a webcam feeding a shared stream shown to viewers (`/`, `/view`, `/mjpeg`).
    Webcam(WebcamCmd),
    /// List the cameras this machine has.
    Cameras,
    /// Benchmark the components and the daemon end to end (table, JSON, SVG plot, --compare).
    Bench(sdstream::bench::BenchArgs),
}

#[derive(Args)]
struct DaemonArgs {
    /// A TOML config (configs/*.toml); flags override its values. Optional when --model is given.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A diffusers folder, Hugging Face model id or single-file .safetensors checkpoint (overrides the
    /// config's).
    #[arg(long)]
    model: Option<String>,
    /// For a single-file --model: a diffusers folder or model id with its configs, tokenizer and scheduler
    /// (default: built-in SD 1.5 configs when the checkpoint is SD 1.x).
    #[arg(long, value_name = "DIR_OR_HUB_ID")]
    model_config: Option<String>,
    /// A separate autoencoder (e.g. TAESD) folder or id.
    #[arg(long)]
    vae: Option<String>,
    /// cpu, cuda, cuda:N or auto; a comma-separated list (cuda:0,cuda:1) starts one engine per device.
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    dtype: Option<String>,
    /// A LoRA to fuse at load, PATH[:SCALE] (a .safetensors file, a folder holding one, or a Hugging Face id);
    /// repeatable, added to the config's `[model] loras`.
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    lora: Vec<String>,
    /// A ControlNet folder or id loaded next to the model (overrides the config's `[model] controlnet`).
    #[arg(long)]
    controlnet: Option<String>,
    /// Capture each tick once and replay it (CUDA graphs): auto = on with CUDA, off on the CPU; `on` on the
    /// CPU runs the graph runner's CPU stand-in.
    #[arg(long, value_enum)]
    cuda_graphs: Option<sdstream::graph::GraphMode>,
    /// IP:PORT to listen on (default 127.0.0.1:8765). Anything but loopback needs --token.
    #[arg(long)]
    listen: Option<String>,
    /// A secret clients must present (?token= or Authorization: Bearer).
    #[arg(long)]
    token: Option<String>,
    #[arg(long)]
    max_clients: Option<usize>,
    /// Streams one engine takes before new clients are refused with a retry hint (default: --max-clients).
    #[arg(long)]
    max_streams_per_engine: Option<usize>,
    #[arg(long)]
    max_fps: Option<f64>,
    #[arg(long)]
    jpeg_quality: Option<u8>,
    /// Let clients change the LoRAs' scales (`lora` messages); every client shares them.
    #[arg(long)]
    lora_control: bool,
    /// Every stream setting as a flag; each one given overrides the defaults (or a config's value).
    #[command(flatten)]
    stream: StreamSettingsPatch,
}

impl DaemonArgs {
    fn config(&self) -> Result<sdstream::config::DaemonConfig> {
        let mut c = match &self.config {
            Some(path) => sdstream::config::DaemonConfig::from_file(path)?,
            None if self.model.is_some() => sdstream::config::DaemonConfig::default(),
            None => anyhow::bail!("pass --config configs/NAME.toml or --model M"),
        };
        if let Some(v) = &self.model {
            c.model.model = v.clone();
        }
        if let Some(v) = &self.model_config {
            c.model.model_config = Some(v.clone());
        }
        if let Some(v) = &self.vae {
            c.model.vae = Some(v.clone());
        }
        if let Some(v) = &self.controlnet {
            c.model.controlnet = Some(v.clone());
        }
        if let Some(v) = &self.device {
            let list: Vec<String> = v.split(',').map(|d| d.trim().to_string()).collect();
            if list.len() > 1 {
                c.model.devices = list;
            } else {
                c.model.device = v.clone();
                c.model.devices.clear();
            }
        }
        if let Some(v) = &self.dtype {
            c.model.dtype = v.clone();
        }
        for l in &self.lora {
            c.model.loras.push(l.parse()?);
        }
        if let Some(v) = self.cuda_graphs {
            c.model.cuda_graphs = v;
        }
        if let Some(v) = &self.listen {
            c.server.listen = v.clone();
        }
        if let Some(v) = &self.token {
            c.server.token = Some(v.clone());
        }
        if self.lora_control {
            c.server.lora_control = true;
        }
        if let Some(v) = self.max_clients {
            c.server.max_clients = v;
        }
        if let Some(v) = self.max_streams_per_engine {
            c.server.max_streams_per_engine = Some(v);
        }
        if let Some(v) = self.max_fps {
            c.server.max_fps = v;
        }
        if let Some(v) = self.jpeg_quality {
            c.server.jpeg_quality = v;
        }
        c.stream = c.stream.then(&self.stream);
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args)]
struct ServeCmd {
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Args)]
struct WebcamCmd {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// The camera's index (see `sdstream cameras`).
    #[arg(long, default_value_t = 0)]
    camera: u32,
    /// Also write every output frame as JPEG into this folder.
    #[arg(long)]
    save_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// A diffusers-layout model folder, a Hugging Face model id (e.g. stabilityai/sd-turbo), or a single-file
    /// .safetensors checkpoint (SD 1.x, original LDM layout).
    #[arg(long, default_value = "models/tiny-sd-test")]
    model: String,
    /// For a single-file --model: a diffusers folder or model id with its configs, tokenizer and scheduler
    /// (default: built-in SD 1.5 configs when the checkpoint is SD 1.x).
    #[arg(long, value_name = "DIR_OR_HUB_ID")]
    model_config: Option<String>,
    /// A separate autoencoder folder or model id (e.g. a TAESD) replacing the model's VAE.
    #[arg(long)]
    vae: Option<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    dtype: String,
    /// A LoRA to fuse at load, PATH[:SCALE] (a .safetensors file, a folder holding one, or a Hugging Face id);
    /// repeatable.
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    lora: Vec<String>,
    /// A ControlNet folder or Hugging Face id (diffusers ControlNetModel) loaded next to the model; it must
    /// be made for the model's family (SD 1.x or SD 2.x).
    #[arg(long)]
    controlnet: Option<String>,
}

impl ModelArgs {
    fn load(&self) -> Result<StableDiffusion> {
        let opts = LoadOptions {
            device: sdstream::device::parse_device(&self.device)?,
            kind: sdstream::device::parse_dtype(&self.dtype)?,
            vae: self.vae.clone(),
            controlnet: self.controlnet.clone(),
            model_config: self.model_config.clone(),
        };
        let t0 = std::time::Instant::now();
        let mut sd = StableDiffusion::load(&self.model, &opts)
            .with_context(|| format!("loading model `{}`", self.model))?;
        for l in &self.lora {
            let spec: sdstream::models::lora::LoraSpec = l.parse()?;
            sd.load_lora(&spec).with_context(|| format!("loading LoRA `{}`", spec.path))?;
        }
        tracing::info!(
            "loaded {} on {:?} in {} ({}, {:.1}s)",
            self.model,
            opts.device,
            sdstream::device::dtype_name(opts.kind),
            sd.autoencoder.name(),
            t0.elapsed().as_secs_f64()
        );
        if sdstream::models::is_test_model(&sd.source.root) {
            tracing::warn!(
                "`{}` is a random-weight TEST model: its images are noise-like by design",
                self.model
            );
        }
        Ok(sd)
    }
}

#[derive(Args)]
struct GenArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// ddim, lcm, euler or euler_a (Euler ancestral: SD-Turbo's and SDXL-Turbo's own scheduler); `auto`: the
    /// model's own scheduler class, as diffusers uses it, or DDIM when that class is not one of these (SD 1.5's
    /// PNDM).
    #[arg(long, default_value = "auto")]
    scheduler: String,
    /// leading, trailing or linspace: replaces the scheduler config's timestep_spacing, as diffusers'
    /// `Scheduler.from_config(config, timestep_spacing=...)` (LCM, like diffusers', does not use it).
    #[arg(long, value_name = "SPACING")]
    timestep_spacing: Option<TimestepSpacing>,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Image width in pixels (txt2img: the model's default when not given, as in diffusers: 512 for SD 1.5,
    /// SD-Turbo and SDXL-Turbo, 1024 for SDXL; img2img: the input's width).
    #[arg(long)]
    width: Option<i64>,
    /// Image height in pixels (txt2img: the model's default when not given; img2img: the input's height).
    #[arg(long)]
    height: Option<i64>,
    /// Skip this many final CLIP layers.
    #[arg(long)]
    clip_skip: Option<usize>,
    /// SDXL micro-conditioning: the original size to condition on, WIDTHxHEIGHT (default: the image's size).
    #[arg(long, value_name = "WxH")]
    original_size: Option<String>,
    /// SDXL micro-conditioning: the crop's top-left corner, LEFT,TOP (default 0,0).
    #[arg(long, value_name = "LEFT,TOP")]
    crop: Option<String>,
    /// SDXL micro-conditioning: the target size, WIDTHxHEIGHT (default: the image's size).
    #[arg(long, value_name = "WxH")]
    target_size: Option<String>,
    #[arg(long, default_value = "out.png")]
    output: PathBuf,
    /// The ControlNet's conditioning image (edges, depth, pose, ... as the ControlNet expects), resized to the
    /// output size; needs --controlnet.
    #[arg(long)]
    control_image: Option<PathBuf>,
    /// How strongly the ControlNet steers (diffusers' controlnet_conditioning_scale).
    #[arg(long, default_value_t = 1.0)]
    controlnet_scale: f64,
    /// The fraction of the steps where the ControlNet starts acting (control_guidance_start).
    #[arg(long, default_value_t = 0.0)]
    control_start: f64,
    /// The fraction of the steps where the ControlNet stops acting (control_guidance_end).
    #[arg(long, default_value_t = 1.0)]
    control_end: f64,
    /// diffusers' guess mode: the ControlNet sees no prompt and its residuals ramp from 0.1 to 1.
    #[arg(long)]
    guess_mode: bool,
    #[command(flatten)]
    ip: IpArgs,
}

/// The IP-Adapter flags (`txt2img`, `img2img`, `stream`).
#[derive(Args)]
struct IpArgs {
    /// An IP-Adapter (an image as a prompt; plain or plus, SD 1.x or SDXL): a .safetensors file, whose image
    /// encoder is the image_encoder/ folder beside it (h94/IP-Adapter's layout), or a file of a Hugging Face
    /// model, owner/name/path.safetensors (e.g. h94/IP-Adapter/models/ip-adapter_sd15.safetensors); needs
    /// --ip-image.
    #[arg(long, value_name = "PATH_OR_HUB_FILE")]
    ip_adapter: Option<String>,
    /// The image prompt (PNG or JPEG) for --ip-adapter.
    #[arg(long, value_name = "IMG")]
    ip_image: Option<PathBuf>,
    /// How strongly the image prompt steers: a number, or diffusers' per-block dictionary as JSON, e.g.
    /// '{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}' (parts not named get 0).
    #[arg(long, value_name = "X_OR_JSON", default_value = "1.0")]
    ip_scale: String,
    /// The CLIP image encoder for --ip-adapter: a folder or a Hugging Face id, optionally with a subfolder
    /// (owner/name/subfolder); default: the image_encoder/ folder beside the adapter.
    #[arg(long, value_name = "DIR_OR_ID")]
    ip_image_encoder: Option<String>,
}

impl IpArgs {
    /// The image prompt the flags name (the image read, the scale parsed); an error when only one of
    /// --ip-adapter and --ip-image is given.
    fn image_prompt(&self) -> Result<Option<pipeline::ImagePrompt>> {
        let scale: sdstream::models::ip_adapter::IpScale =
            self.ip_scale.parse().context("invalid --ip-scale")?;
        match (&self.ip_adapter, &self.ip_image) {
            (None, None) => {
                if self.ip_image_encoder.is_some() {
                    anyhow::bail!("--ip-image-encoder needs an --ip-adapter");
                }
                Ok(None)
            }
            (Some(_), None) => anyhow::bail!("--ip-adapter needs an --ip-image"),
            (None, Some(_)) => anyhow::bail!("--ip-image needs an --ip-adapter"),
            (Some(_), Some(path)) => {
                let image = sdstream::io::image::read(path)
                    .with_context(|| format!("reading the --ip-image {}", path.display()))?;
                Ok(Some(pipeline::ImagePrompt { image, scale }))
            }
        }
    }

    /// Loads the --ip-adapter (if any) next to the model.
    fn load_into(&self, sd: &mut StableDiffusion) -> Result<()> {
        if let Some(spec) = &self.ip_adapter {
            sd.load_ip_adapter(spec, self.ip_image_encoder.as_deref())
                .with_context(|| format!("loading IP-Adapter `{spec}`"))?;
        }
        Ok(())
    }
}

impl GenArgs {
    /// Loads the model, its LoRAs and the --ip-adapter.
    fn load(&self) -> Result<StableDiffusion> {
        let mut sd = self.model.load()?;
        self.ip.load_into(&mut sd)?;
        Ok(sd)
    }

    /// The ControlNet input the flags name, read and resized to `width` x `height`; an error when only one
    /// of --controlnet and --control-image is given.
    fn control(&self, width: i64, height: i64) -> Result<Option<pipeline::Control>> {
        match (&self.model.controlnet, &self.control_image) {
            (None, None) => Ok(None),
            (Some(_), None) => anyhow::bail!("--controlnet needs a --control-image"),
            (None, Some(_)) => anyhow::bail!("--control-image needs a --controlnet"),
            (Some(_), Some(path)) => {
                let rgb = sdstream::io::image::read(path)?;
                if (rgb.width() as i64, rgb.height() as i64) != (width, height) {
                    tracing::info!(
                        "resizing the control image from {}x{} to {width}x{height}",
                        rgb.width(),
                        rgb.height()
                    );
                }
                Ok(Some(pipeline::Control {
                    image: pipeline::control_image(&rgb, width, height)?,
                    scale: self.controlnet_scale,
                    guess_mode: self.guess_mode,
                    guidance_start: self.control_start,
                    guidance_end: self.control_end,
                }))
            }
        }
    }

    /// The scheduler the flag names; `auto` resolves to the model's own class (DDIM before the model is loaded,
    /// when only the flags are being checked).
    fn scheduler(&self, sd: Option<&StableDiffusion>) -> Result<SchedulerKind> {
        if self.scheduler.trim() != "auto" {
            return self.scheduler.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--scheduler `{}`: expected auto (the model's own), ddim, lcm, euler or euler_a",
                    self.scheduler
                )
            });
        }
        let class = sd.and_then(|sd| sd.scheduler_config.class_name.clone());
        Ok(match class.as_deref().and_then(SchedulerKind::from_class_name) {
            Some(kind) => kind,
            None => {
                if let Some(c) = class {
                    tracing::info!(
                        "the model's scheduler {c} is not implemented here: using DDIM (--scheduler)"
                    );
                }
                SchedulerKind::Ddim
            }
        })
    }

    /// The parameters for `sd` (its default size and scheduler where the flags give none), or checked against
    /// the flags alone before the model is loaded.
    fn params(&self, sd: Option<&StableDiffusion>) -> Result<GenerateParams> {
        let (height, width) = sd.map(StableDiffusion::default_size).unwrap_or((512, 512));
        Ok(GenerateParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: self.seed,
            steps: self.steps,
            scheduler: self.scheduler(sd)?,
            timestep_spacing: self.timestep_spacing,
            guidance: self.guidance,
            width: self.width.unwrap_or(width),
            height: self.height.unwrap_or(height),
            clip_skip: self.clip_skip,
            micro: pipeline::MicroConditioning {
                original_size: self
                    .original_size
                    .as_deref()
                    .map(|v| parse_pair(v, 'x', "--original-size"))
                    .transpose()?,
                crops_coords_top_left: match self.crop.as_deref() {
                    Some(v) => parse_pair(v, ',', "--crop")?,
                    None => (0, 0),
                },
                target_size: self
                    .target_size
                    .as_deref()
                    .map(|v| parse_pair(v, 'x', "--target-size"))
                    .transpose()?,
            },
        })
    }
}

/// `AxB` (or `A,B`) as diffusers' (B, A): sizes are given as WIDTHxHEIGHT and a crop as LEFT,TOP on the command
/// line, and diffusers takes (height, width) and (top, left).
fn parse_pair(v: &str, sep: char, flag: &str) -> Result<(i64, i64)> {
    let parsed = v
        .split_once(sep)
        .and_then(|(a, b)| Some((a.trim().parse::<i64>().ok()?, b.trim().parse::<i64>().ok()?)));
    match parsed {
        Some((a, b)) => Ok((b, a)),
        None => anyhow::bail!("{flag} {v:?}: expected two integers separated by '{sep}'"),
    }
}

#[derive(Args)]
struct Txt2Img {
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Args)]
struct Img2Img {
    #[command(flatten)]
    gen: GenArgs,
    /// The input image (PNG or JPEG); resized to --width x --height when those are given and differ.
    #[arg(long)]
    image: PathBuf,
    /// How much to change the image, in (0, 1].
    #[arg(long, default_value_t = 0.6)]
    strength: f64,
}

#[derive(Args)]
struct StreamCmd {
    #[command(flatten)]
    model: ModelArgs,
    /// Input images: files and/or folders (their PNG/JPEG files in name order).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output folder: one PNG per input, under the input's file name.
    #[arg(long)]
    output: PathBuf,
    /// A fixed control image for `--control image` (needs --controlnet).
    #[arg(long)]
    control_image: Option<PathBuf>,
    /// Every stream setting as a flag; each one given overrides the defaults (or a config's value).
    #[command(flatten)]
    stream: StreamSettingsPatch,
    #[command(flatten)]
    ip: IpArgs,
}

fn save(image: &tch::Tensor, path: &std::path::Path) -> Result<()> {
    let rgb = sdstream::io::image::to_rgb8(image)?;
    sdstream::io::image::write_png(&rgb, path)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Txt2img(a) => {
            a.gen.params(None)?; // flags checked before a large model is loaded
            let image_prompt = a.gen.ip.image_prompt()?;
            let sd = a.gen.load()?;
            let params = a.gen.params(Some(&sd))?;
            let control = a.gen.control(params.width, params.height)?;
            let guides = pipeline::Guides { control: control.as_ref(), image_prompt: image_prompt.as_ref() };
            let image = pipeline::txt2img_guided(&sd, &params, guides)?;
            save(&image, &a.gen.output)
        }
        Command::Img2img(a) => {
            a.gen.params(None)?; // flags checked before a large model is loaded
            let rgb = sdstream::io::image::read(&a.image)?;
            let (w, h) =
                (a.gen.width.unwrap_or(rgb.width() as i64), a.gen.height.unwrap_or(rgb.height() as i64));
            if w <= 0 || h <= 0 || w > 4096 || h > 4096 {
                anyhow::bail!("invalid --width/--height {w}x{h}: expected 1..=4096");
            }
            let rgb = sdstream::io::image::resize(rgb, w as u32, h as u32);
            let control = a.gen.control(rgb.width() as i64, rgb.height() as i64)?;
            let image_prompt = a.gen.ip.image_prompt()?;
            let sd = a.gen.load()?;
            let mut params = a.gen.params(Some(&sd))?;
            params.width = rgb.width() as i64;
            params.height = rgb.height() as i64;
            let input = sdstream::io::image::to_tensor(&rgb, sd.device, sd.kind)?;
            let guides = pipeline::Guides { control: control.as_ref(), image_prompt: image_prompt.as_ref() };
            let image = pipeline::img2img_guided(&sd, &params, &input, a.strength, guides)?;
            save(&image, &a.gen.output)
        }
        Command::Serve(a) => Ok(sdstream::daemon::run(a.daemon.config()?, None)?),
        Command::Webcam(a) => {
            let camera = sdstream::daemon::CameraOptions { index: a.camera, save_dir: a.save_dir.clone() };
            Ok(sdstream::daemon::run(a.daemon.config()?, Some(camera))?)
        }
        Command::Cameras => {
            let cams = sdstream::io::camera::list()?;
            if cams.is_empty() {
                println!("no cameras found");
            }
            for c in cams {
                println!("{}: {} ({})", c.index, c.name, c.description);
            }
            Ok(())
        }
        Command::Bench(a) => {
            sdstream::bench::run(&a)?;
            Ok(())
        }
        Command::Stream(a) => {
            let settings = StreamSettings::default().patched(&a.stream)?;
            let image_prompt = a.ip.image_prompt()?;
            let files = sdstream::stream::offline::collect_inputs(&a.input)?;
            use sdstream::stream::settings::ControlSource;
            let control = match (settings.control, &a.control_image) {
                (ControlSource::Image, Some(p)) => Some(sdstream::io::image::read(p)?),
                (ControlSource::Image, None) => anyhow::bail!("--control image needs a --control-image"),
                (_, Some(_)) => anyhow::bail!("--control-image needs --control image"),
                (_, None) => None,
            };
            if settings.control != ControlSource::None && a.model.controlnet.is_none() {
                anyhow::bail!("--control {:?} needs a --controlnet", settings.control);
            }
            let mut sd = a.model.load()?;
            a.ip.load_into(&mut sd)?;
            let reports = sdstream::stream::offline::run_files_with(
                &sd,
                settings.clone(),
                &files,
                &a.output,
                control.as_ref(),
                image_prompt.as_ref(),
            )?;
            let mut failed = 0;
            for r in &reports {
                match (&r.output, &r.error) {
                    (_, Some(e)) => {
                        failed += 1;
                        eprintln!("{}: {e}", r.input.display());
                    }
                    (Some(out), None) => println!(
                        "{} -> {}{}{}",
                        r.input.display(),
                        out.display(),
                        if r.warmup { " (warm-up frame)" } else { "" },
                        if r.skipped { " (skipped: similar to the previous frame)" } else { "" }
                    ),
                    (None, None) => println!("{}: no output yet (warm-up)", r.input.display()),
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} frames could not be read", reports.len());
            }
            Ok(())
        }
    }
}

fn main() {
    sdstream::device::init();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
