//! `sdstream bench`: component timings and end-to-end runs through the real daemon, with a terminal table,
//! a progress bar, JSON for machines, an SVG latency plot and `--compare` ratios against an earlier report.
//!
//! `--random-model sd-turbo|sd15` benchmarks a random-weight BENCHMARK model at a real architecture (see
//! [`random_model`]): speed does not depend on weight values, so speed runs need no real weights.
pub mod attack;
pub mod components;
pub mod e2e;
pub mod graph_check;
pub mod pattern;
pub mod random_model;
pub mod report;
pub mod stats;

use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::models::stable_diffusion::{LoadOptions, StableDiffusion};
use crate::stream::settings::{CfgType, StreamSettings, StreamSettingsPatch};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The command line of `sdstream bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A diffusers folder or Hugging Face model id.
    #[arg(long, conflicts_with = "random_model", required_unless_present = "random_model")]
    pub model: Option<String>,
    /// A random-weight benchmark model at a real architecture: sd-turbo, sd15 or sdxl-turbo (written once under
    /// --random-model-dir, then loaded like any model); tiny-test: the bundled tiny configs, for CPU checks.
    #[arg(long)]
    pub random_model: Option<String>,
    /// Where random-weight benchmark models are written (default: the system temp folder).
    #[arg(long)]
    pub random_model_dir: Option<PathBuf>,
    /// The autoencoder: a folder or id (e.g. a TAESD). With --random-model: `taesd` (default) or `vae` (the
    /// model's AutoencoderKL).
    #[arg(long)]
    pub vae: Option<String>,
    /// For a single-file checkpoint: a diffusers folder or id giving its configs and tokenizer.
    #[arg(long)]
    pub model_config: Option<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    #[arg(long, default_value_t = 512)]
    pub width: i64,
    #[arg(long, default_value_t = 512)]
    pub height: i64,
    /// Measured frames per stream in the end-to-end runs.
    #[arg(long, default_value_t = 100)]
    pub frames: usize,
    /// End to end: one stream, then this many concurrent streams (when more than one).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Denoising stages (1 to 4): t_index_list [35], [32,45], [20,32,45] or [0,16,32,45].
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// Explicit denoising stages (overrides --stages), e.g. 20,32,45.
    #[arg(long, value_delimiter = ',')]
    pub t_index_list: Option<Vec<usize>>,
    /// none, full, self or initialize (default: none for one stage, self with guidance 1.2 otherwise).
    #[arg(long, value_enum)]
    pub cfg_type: Option<CfgType>,
    #[arg(long, default_value = "a cinematic portrait, oil painting")]
    pub prompt: String,
    /// Time an IP-Adapter too (the component timings): `plain` or `plus` make a random-weight TEST adapter of
    /// h94/IP-Adapter's architecture for the model (4 or 16 image tokens, a ViT-H/14 image encoder); a path or
    /// hub file loads that adapter (and its image_encoder/ folder, or --ip-image-encoder).
    #[arg(long, value_name = "plain|plus|PATH")]
    pub ip_adapter: Option<String>,
    /// The image encoder for a loaded --ip-adapter (a folder or Hugging Face id).
    #[arg(long, value_name = "DIR_OR_ID")]
    pub ip_image_encoder: Option<String>,
    /// Run the component timings (with neither --components nor --e2e, both run).
    #[arg(long)]
    pub components: bool,
    /// Run the end-to-end daemon runs.
    #[arg(long)]
    pub e2e: bool,
    /// Timed iterations per component.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed warm-up iterations per component, and warm-up frames per stream (at least the stages).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// UNet batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub batch_sizes: Vec<i64>,
    /// Frames per second each client sends (0: as fast as replies come).
    #[arg(long, default_value_t = 0.0)]
    pub fps: f64,
    /// The most unanswered frames per client (1 or 2).
    #[arg(long, default_value_t = 2)]
    pub in_flight: usize,
    /// Seconds a client waits for a reply before counting its frames as lost.
    #[arg(long, default_value_t = 120)]
    pub reply_timeout: u64,
    #[arg(long, default_value_t = 85)]
    pub jpeg_quality: u8,
    /// Synchronise the device around each stage in the daemon, for exact per-stage times (costs a host sync per
    /// stage). Default: the engine's (on for CPU, off for CUDA, where stage times then show enqueue time).
    #[arg(long)]
    pub stage_sync: Option<bool>,
    /// Capture the engine's tick once and replay it: auto = CUDA graphs on a GPU, eager on the CPU; `on` on
    /// the CPU runs the graph runner's CPU stand-in. The components then time the captured tick beside the
    /// eager one.
    #[arg(long, value_enum, default_value_t = crate::graph::GraphMode::Auto)]
    pub cuda_graphs: crate::graph::GraphMode,
    /// The report as JSON.
    #[arg(long)]
    pub json: PathBuf,
    /// The latency distribution as SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// An earlier report: print the ratios now / previous.
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

/// The t_index_list for `n` stages (StreamDiffusion's usual choices).
pub fn stages_t_index_list(n: usize) -> Result<Vec<usize>> {
    Ok(match n {
        1 => vec![35],
        2 => vec![32, 45],
        3 => vec![20, 32, 45],
        4 => vec![0, 16, 32, 45],
        _ => return Err(Error::invalid("stages", format!("{n} is not in 1..=4"))),
    })
}

impl BenchArgs {
    /// Checks everything that can be checked before any work, so a bad flag fails at once.
    fn validate(&self) -> Result<()> {
        if self.streams == 0 || self.streams > 64 {
            return Err(Error::invalid("streams", format!("{} is not in 1..=64", self.streams)));
        }
        if self.frames == 0 {
            return Err(Error::invalid("frames", "must be at least 1"));
        }
        if self.iters == 0 {
            return Err(Error::invalid("iters", "must be at least 1"));
        }
        if !(1..=2).contains(&self.in_flight) {
            return Err(Error::invalid("in-flight", format!("{} is not 1 or 2", self.in_flight)));
        }
        if !self.fps.is_finite() || self.fps < 0.0 {
            return Err(Error::invalid("fps", format!("{} is not a rate >= 0", self.fps)));
        }
        if self.batch_sizes.iter().any(|&b| !(1..=64).contains(&b)) {
            return Err(Error::invalid(
                "batch-sizes",
                format!("{:?}: each must be in 1..=64", self.batch_sizes),
            ));
        }
        if let Some(name) = &self.random_model {
            name.parse::<random_model::RandomArch>()?;
            if let Some(v) = &self.vae {
                if v != "taesd" && v != "vae" {
                    return Err(Error::invalid(
                        "vae",
                        format!("`{v}`: with --random-model, use taesd or vae"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn settings(&self) -> Result<StreamSettings> {
        let t_index_list = match &self.t_index_list {
            Some(v) => v.clone(),
            None => stages_t_index_list(self.stages)?,
        };
        let single = t_index_list.len() == 1;
        let cfg = self.cfg_type.unwrap_or(if single { CfgType::None } else { CfgType::SelfNoise });
        StreamSettings::default().patched(&StreamSettingsPatch {
            prompt: Some(self.prompt.clone()),
            t_index_list: Some(t_index_list),
            cfg_type: Some(cfg),
            guidance: Some(if cfg == CfgType::None { 1.0 } else { 1.2 }),
            width: Some(self.width),
            height: Some(self.height),
            ..Default::default()
        })
    }
}

/// Fails early when `path` cannot be written (a missing folder, no permission), naming the flag.
fn check_writable(path: &Path, flag: &str) -> Result<()> {
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::invalid(flag, format!("cannot write {}: {e}", path.display())))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// The model to load: its spec, the autoencoder option and how to name it.
struct ModelChoice {
    spec: String,
    vae: Option<String>,
    kind_label: String,
}

fn choose_model(a: &BenchArgs, load: &LoadOptions) -> Result<ModelChoice> {
    if let Some(name) = &a.random_model {
        let arch: random_model::RandomArch = name.parse()?;
        let dir = a.random_model_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("sdstream-bench"));
        let m = random_model::materialise(arch, &dir, load.device, load.kind)?;
        let vae = match a.vae.as_deref() {
            Some("vae") => None,
            _ => Some(m.taesd.display().to_string()),
        };
        return Ok(ModelChoice { spec: m.root.display().to_string(), vae, kind_label: m.label() });
    }
    let spec =
        a.model.clone().ok_or_else(|| Error::invalid("model", "pass --model M or --random-model NAME"))?;
    Ok(ModelChoice { spec, vae: a.vae.clone(), kind_label: String::new() })
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs `sdstream bench` as the flags say; prints the table (and the comparison) and writes the files.
pub fn run(a: &BenchArgs) -> Result<report::BenchReport> {
    a.validate()?;
    let settings = a.settings()?;
    check_writable(&a.json, "json")?;
    if let Some(p) = &a.plot {
        check_writable(p, "plot")?;
    }
    let previous = a.compare.as_deref().map(report::read_previous).transpose()?;
    let load = LoadOptions {
        device: crate::device::parse_device(&a.device)?,
        kind: crate::device::parse_dtype(&a.dtype)?,
        vae: None,
        controlnet: None,
        model_config: a.model_config.clone(),
    };
    let choice = choose_model(a, &load)?;
    let load = LoadOptions { vae: choice.vae.clone(), ..load };
    let (run_components, run_e2e) = match (a.components, a.e2e) {
        (false, false) => (true, true),
        other => other,
    };

    let mut sd = StableDiffusion::load(&choice.spec, &load)?;
    match a.ip_adapter.as_deref() {
        None => {}
        Some(kind @ ("plain" | "plus")) => {
            let kind = if kind == "plain" {
                crate::models::ip_adapter::ProjectionKind::Plain
            } else {
                crate::models::ip_adapter::ProjectionKind::Plus
            };
            sd.image_prompt =
                Some(crate::models::ip_adapter::random_test_adapter(&sd.unet, kind, load.device, load.kind)?);
            tracing::warn!("timing a random-weight TEST IP-Adapter ({kind:?}) and image encoder (ViT-H/14)");
        }
        Some(spec) => sd.load_ip_adapter(spec, a.ip_image_encoder.as_deref())?,
    }
    let test_model = crate::models::is_test_model(&sd.source.root);
    let meta = meta(a, &choice, &sd, &settings, test_model);
    let plan = components::ComponentPlan {
        batch_sizes: a.batch_sizes.clone(),
        warmup: a.warmup,
        iters: a.iters,
        jpeg_quality: a.jpeg_quality,
        graphs: a.cuda_graphs.backend(load.device),
        ip_adapter: sd.image_prompt.is_some(),
    };
    let scenarios: Vec<usize> = if a.streams > 1 { vec![1, a.streams] } else { vec![1] };
    let warmup_frames = a.warmup.max(settings.t_index_list.len());
    let e2e_frames: usize = scenarios.iter().map(|k| k * (a.frames + warmup_frames)).sum();
    let bar = progress_bar(
        if run_components { plan.count() as u64 } else { 0 } + if run_e2e { e2e_frames as u64 } else { 0 },
    );

    let components = if run_components { components::run(&sd, &settings, &plan, &bar)? } else { Vec::new() };
    let graph_check = match (run_components, plan.graphs) {
        (true, Some(backend)) => {
            let streams: Vec<usize> = [1, 2, 4].into_iter().filter(|&k| k <= a.streams.max(1)).collect();
            graph_check::run(&sd, &settings, backend, &streams, warmup_frames + 3)?
        }
        _ => Vec::new(),
    };
    drop(sd);
    let e2e = if run_e2e {
        let mut config = EngineConfig::new(choice.spec.clone(), load.clone());
        config.max_streams = a.streams.max(1) + 1;
        config.cuda_graphs = a.cuda_graphs;
        if let Some(v) = a.stage_sync {
            config.measure_stages = v;
        }
        let plan = e2e::E2ePlan {
            frames: a.frames,
            warmup_frames,
            target_fps: (a.fps > 0.0).then_some(a.fps),
            in_flight: a.in_flight,
            reply_timeout: Duration::from_secs(a.reply_timeout.max(1)),
            jpeg_quality: a.jpeg_quality,
        };
        e2e::run(config, &settings, &scenarios, &plan, &bar)?
    } else {
        Vec::new()
    };
    bar.finish_and_clear();

    let report = report::BenchReport { schema: report::SCHEMA.into(), meta, components, e2e, graph_check };
    report.write_json(&a.json)?;
    print!("{}", report.table());
    if let Some(capacity) = report::capacity(&report, a.fps) {
        print!("{capacity}");
    }
    if let Some(p) = &a.plot {
        report::plot_latency(&report, p)?;
    }
    if let Some(prev) = &previous {
        print!("{}", report::compare(prev, &report));
    }
    println!(
        "\nwrote {}{}",
        a.json.display(),
        a.plot.as_ref().map(|p| format!(" and {}", p.display())).unwrap_or_default()
    );
    Ok(report)
}

fn meta(
    a: &BenchArgs,
    choice: &ModelChoice,
    sd: &StableDiffusion,
    settings: &StreamSettings,
    test_model: bool,
) -> report::Meta {
    let model_kind = if !choice.kind_label.is_empty() {
        choice.kind_label.clone()
    } else if test_model {
        "random-weight test model".into()
    } else {
        "weights".into()
    };
    report::Meta {
        sdstream_version: env!("CARGO_PKG_VERSION").into(),
        date: utc_now(),
        command: std::env::args().collect(),
        machine: read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".into()),
        cpu: cpu_name(),
        device: format!("{:?}", sd.device),
        device_name: device_name(sd.device),
        dtype: crate::device::dtype_name(sd.kind).into(),
        width: a.width,
        height: a.height,
        model: choice.spec.clone(),
        model_kind,
        autoencoder: sd.autoencoder.name().into(),
        t_index_list: settings.t_index_list.clone(),
        cfg_type: serde_json::to_value(settings.cfg_type)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        git_commit: git_commit(),
        torch_threads: tch::get_num_threads(),
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.into())
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The GPU's name from nvidia-smi, or the CPU's.
fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => {
            command_output("nvidia-smi", &["--query-gpu=name", "--format=csv,noheader", &format!("--id={i}")])
                .unwrap_or_else(|| format!("CUDA device {i}"))
        }
        _ => cpu_name(),
    }
}

/// The commit: `SDSTREAM_GIT_COMMIT` (set by scripts/gpu-bench.sh where no .git travels), else git's HEAD,
/// marked `-dirty` when tracked files changed.
fn git_commit() -> Option<String> {
    if let Ok(c) = std::env::var("SDSTREAM_GIT_COMMIT") {
        return Some(c).filter(|c| !c.is_empty());
    }
    let head = command_output("git", &["rev-parse", "HEAD"])?;
    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_some();
    Some(if dirty { format!("{head}-dirty") } else { head })
}

/// Now in UTC as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
