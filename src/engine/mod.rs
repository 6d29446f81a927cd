//! The inference thread. It owns every tch object (the model, every stream's tensors, the prompt cache);
//! other threads talk to it through bounded crossbeam channels. Frames are latest-frame-wins per stream: when
//! the engine falls behind, a stream's older waiting frame is replaced (and counted as dropped), never queued.
//! Each tick batches every stream that has a frame waiting into one UNet call per latent size.
pub mod pool;

use crate::error::{Error, Result};
use crate::graph::GraphMode;
use crate::models::stable_diffusion::{LoadOptions, StableDiffusion, TextEmbedding};
use crate::stream::batch::{self, TickInput};
use crate::stream::prompts::{PromptCache, PromptKey};
use crate::stream::resident::{self, OutputMeta, ResidentInput, ResidentTick};
use crate::stream::settings::{Mode, StreamSettings, StreamSettingsPatch};
use crate::stream::Stream;
use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};
use image::RgbImage;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to start an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A diffusers folder or Hugging Face model id.
    pub model: String,
    pub load: LoadOptions,
    /// The most streams open at once.
    pub max_streams: usize,
    /// Prompt embeddings kept in the LRU cache.
    pub prompt_cache: usize,
    /// Synchronise the device around each stage so per-stage timings are exact. Free on the CPU; on a GPU it
    /// costs a host synchronisation per stage, so it is off there unless asked for (timings then show the
    /// time to enqueue each stage, and `total_ms` stays exact because the output is read back).
    pub measure_stages: bool,
    /// Outputs waiting for a slow consumer, per stream, before new ones are dropped.
    pub output_queue: usize,
    /// LoRAs fused right after the model loads.
    pub loras: Vec<crate::models::lora::LoraSpec>,
    /// Whether ticks are captured and replayed (CUDA graphs; the CPU stand-in with `on` on the CPU).
    pub cuda_graphs: GraphMode,
    /// Failed ticks or commands in a row after which the engine reports itself unhealthy (until one
    /// succeeds).
    pub max_consecutive_failures: u32,
}

impl EngineConfig {
    pub fn new(model: impl Into<String>, load: LoadOptions) -> Self {
        let on_gpu = load.device.is_cuda();
        EngineConfig {
            model: model.into(),
            load,
            max_streams: 16,
            prompt_cache: 64,
            measure_stages: !on_gpu,
            output_queue: 4,
            loras: Vec::new(),
            cuda_graphs: GraphMode::Auto,
            max_consecutive_failures: 3,
        }
    }
}

/// What the engine knows of its model, for clients.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub autoencoder: String,
    pub test_model: bool,
    pub vae_scale_factor: i64,
    /// The ControlNet loaded with the model (streams may then set `control`).
    pub controlnet: Option<String>,
    /// An SDXL model (two text encoders).
    pub sdxl: bool,
    /// How ticks run: `eager`, `cuda-graph` or `cpu-stand-in` (the `--cuda-graphs` setting as applied).
    pub tick: String,
    /// The `--cuda-graphs` setting asked for.
    pub cuda_graphs: GraphMode,
}

/// One frame handed to a stream.
pub struct Frame {
    pub id: u64,
    /// The decoded picture (img2img); `None` asks a txt2img stream for its next frame.
    pub image: Option<RgbImage>,
    pub received: Instant,
}

/// Per-stage times of one output, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StageTimes {
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub encode_ms: f64,
    pub unet_ms: f64,
    pub decode_ms: f64,
    pub postprocess_ms: f64,
    /// From the frame's arrival at the engine to the output leaving it.
    pub total_ms: f64,
}

/// One output frame of a stream.
pub struct Output {
    pub stream_id: u64,
    /// The input frame id this output answers (for a multi-stage stream, the frame that entered n - 1 frames
    /// earlier); during warm-up, the frame just given.
    pub answers: u64,
    /// The frame whose arrival produced this output.
    pub frame_id: u64,
    pub image: RgbImage,
    pub warmup: bool,
    pub skipped: bool,
    pub times: StageTimes,
    /// Streams and UNet items batched in the tick that made this output.
    pub batched_streams: usize,
    pub unet_batch: i64,
}

/// A stream's counters, readable from any thread.
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    /// Frames replaced by a newer one before the engine took them.
    pub dropped_input: AtomicU64,
    /// Outputs dropped because the consumer did not keep up.
    pub dropped_output: AtomicU64,
    pub skipped: AtomicU64,
    pub errors: AtomicU64,
}

/// Engine-wide counters.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub ticks: AtomicU64,
    pub prompt_cache_hits: AtomicU64,
    pub prompt_cache_misses: AtomicU64,
    pub text_encoder_calls: AtomicU64,
    pub streams_open: AtomicU64,
}

/// The engine's health as the inference thread last reported it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineHealth {
    /// Failed ticks and commands since the start.
    pub failures_total: u64,
    /// Failed ticks and commands since the last success.
    pub consecutive_failures: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Set when `consecutive_failures` reached `max_consecutive_failures`, or the inference thread stopped.
    pub unhealthy: Option<String>,
}

impl EngineHealth {
    /// Why the engine cannot serve now, if it cannot.
    pub fn unhealthy(&self) -> Option<&str> {
        self.unhealthy.as_deref()
    }
}

/// Faults a test can make the inference thread run into, to prove that it survives them (the
/// `fault-injection` feature; never in a daemon's build).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next tick panics after the streams' state has advanced.
    PanicInTick,
    /// The next tick fails with an error after the streams' state has advanced.
    ErrorInTick,
    /// The next command panics.
    PanicInCommand,
}

/// Where a stream's outputs go: called on the inference thread, it must not block; it returns whether the
/// output was taken (false: the consumer is full or gone, and the output is counted as dropped).
pub type OutputSink = Box<dyn Fn(Output) -> bool + Send + Sync>;

/// Told on the inference thread when a stream's frame was lost to a failed tick: the frame's id and why. It
/// must not block.
pub type FailureSink = Box<dyn Fn(u64, &str) + Send + Sync>;

enum Command {
    Open {
        settings: StreamSettings,
        outputs: OutputSink,
        failures: Option<FailureSink>,
        counters: Arc<StreamCounters>,
        reply: Sender<Result<u64>>,
    },
    Close {
        id: u64,
    },
    Settings {
        id: u64,
        patch: StreamSettingsPatch,
        reply: Sender<Result<StreamSettings>>,
    },
    LoraScale {
        name: String,
        scale: f64,
        reply: Sender<Result<Vec<crate::models::lora::LoraInfo>>>,
    },
    ControlImage {
        id: u64,
        image: RgbImage,
        reply: Sender<Result<()>>,
    },
    Shutdown,
}

struct Shared {
    pending: Mutex<HashMap<u64, Frame>>,
    counters: EngineCounters,
    health: Mutex<EngineHealth>,
    #[cfg(feature = "fault-injection")]
    faults: Mutex<Vec<Fault>>,
    /// The fused LoRAs and their scales, as the inference thread last set them.
    loras: Mutex<Vec<crate::models::lora::LoraInfo>>,
}

/// The running engine; dropping it shuts the thread down and joins it.
pub struct Engine {
    handle: EngineHandle,
    thread: Option<JoinHandle<()>>,
    pub info: ModelInfo,
}

/// A cheap, cloneable way to talk to the engine from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    wake: Sender<()>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the inference thread and loads the model on it; returns when the model is ready (or failed).
    pub fn start(config: EngineConfig) -> Result<Engine> {
        let (commands, command_rx) = bounded::<Command>(256);
        let (wake, wake_rx) = bounded::<()>(1);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            counters: EngineCounters::default(),
            health: Mutex::new(EngineHealth::default()),
            #[cfg(feature = "fault-injection")]
            faults: Mutex::new(Vec::new()),
            loras: Mutex::new(Vec::new()),
        });
        let (ready_tx, ready_rx) = bounded::<Result<ModelInfo>>(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sdstream-inference".into())
            .spawn(move || {
                let mut sd = match StableDiffusion::load(&config.model, &config.load) {
                    Ok(sd) => sd,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = sd.load_loras(&config.loras) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                *thread_shared.loras.lock() = sd.loras.list();
                let info = ModelInfo {
                    model: config.model.clone(),
                    device: format!("{:?}", sd.device),
                    dtype: crate::device::dtype_name(sd.kind).into(),
                    autoencoder: sd.autoencoder.name().into(),
                    test_model: crate::models::is_test_model(&sd.source.root),
                    vae_scale_factor: sd.vae_scale_factor(),
                    controlnet: sd.controlnet.as_ref().and(config.load.controlnet.clone()),
                    sdxl: sd.is_sdxl(),
                    tick: config.cuda_graphs.backend(sd.device).map_or("eager", |b| b.name()).into(),
                    cuda_graphs: config.cuda_graphs,
                };
                let _ = ready_tx.send(Ok(info));
                let resident = config.cuda_graphs.backend(sd.device).map(ResidentTick::new);
                let mut worker = Worker {
                    sd,
                    resident,
                    eager_noted: std::collections::HashSet::new(),
                    delivery: None,
                    delivery_thread: None,
                    config,
                    streams: HashMap::new(),
                    cache: None,
                    shared: thread_shared,
                    next_id: 1,
                };
                worker.cache = Some(PromptCache::new(worker.config.prompt_cache));
                let health = worker.shared.clone();
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker.run(command_rx, wake_rx)
                }));
                if let Err(panic) = run {
                    let reason = format!("the inference thread stopped: {}", panic_message(&panic));
                    tracing::error!("{reason}");
                    health.health.lock().unhealthy = Some(reason);
                }
            })
            .map_err(|e| Error::Model(format!("cannot start the inference thread: {e}")))?;
        let info =
            ready_rx.recv().map_err(|_| Error::Model("the inference thread died while loading".into()))??;
        Ok(Engine { handle: EngineHandle { commands, wake, shared }, thread: Some(thread), info })
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.handle.shared.counters
    }

    /// Stops the inference thread after the current tick and waits for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.handle.commands.send(Command::Shutdown);
        let _ = self.handle.wake.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One open stream, from the client side. Dropping it closes the stream.
pub struct StreamHandle {
    pub id: u64,
    /// The outputs, when the stream was opened with [`EngineHandle::open_stream`].
    pub outputs: Option<Receiver<Output>>,
    pub counters: Arc<StreamCounters>,
    submitter: Submitter,
    /// The engine slot this stream holds when it was opened through a [`pool::PoolHandle`].
    pub(crate) lease: Option<pool::Lease>,
}

/// Hands frames to one stream from any thread (a camera thread, say); cheap to clone. It does not keep the
/// stream open: frames for a closed stream are discarded by the engine.
#[derive(Clone)]
pub struct Submitter {
    id: u64,
    engine: EngineHandle,
    counters: Arc<StreamCounters>,
    next_frame: Arc<AtomicU64>,
}

impl Submitter {
    /// Hands a frame over, replacing any frame of this stream still waiting (counted as dropped); returns the
    /// frame's id. Never blocks on the engine.
    pub fn submit(&self, image: Option<RgbImage>) -> u64 {
        let id = self.next_frame.fetch_add(1, Ordering::Relaxed);
        self.submit_with_id(id, image);
        id
    }

    /// Like [`Submitter::submit`] with a caller-chosen frame id.
    pub fn submit_with_id(&self, id: u64, image: Option<RgbImage>) {
        self.counters.frames_in.fetch_add(1, Ordering::Relaxed);
        let frame = Frame { id, image, received: Instant::now() };
        if self.engine.shared.pending.lock().insert(self.id, frame).is_some() {
            self.counters.dropped_input.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.engine.wake.try_send(());
    }
}

impl EngineHandle {
    fn request<T>(&self, make: impl FnOnce(Sender<Result<T>>) -> Command) -> Result<T> {
        let (tx, rx) = bounded(1);
        self.commands.send_timeout(make(tx), Duration::from_secs(5)).map_err(|_| {
            Error::Model("the engine is not accepting commands (shutting down or stalled)".into())
        })?;
        let _ = self.wake.try_send(());
        rx.recv_timeout(Duration::from_secs(120))
            .map_err(|_| Error::Model("the engine did not answer".into()))?
    }

    /// The engine's health: failures, and why it cannot serve when it cannot.
    pub fn health(&self) -> EngineHealth {
        self.shared.health.lock().clone()
    }

    /// Makes the inference thread run into `fault` (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&self, fault: Fault) {
        self.shared.faults.lock().push(fault);
        let _ = self.wake.try_send(());
    }

    /// The fused LoRAs with their current scales.
    pub fn loras(&self) -> Vec<crate::models::lora::LoraInfo> {
        self.shared.loras.lock().clone()
    }

    /// Changes the scale of a fused LoRA (by name, its file stem, or index; 0 unfuses it) between ticks;
    /// returns every LoRA with its scale.
    pub fn set_lora_scale(&self, name: &str, scale: f64) -> Result<Vec<crate::models::lora::LoraInfo>> {
        self.request(|reply| Command::LoraScale { name: name.to_string(), scale, reply })
    }

    /// Opens a stream with `settings`; fails with a clear message when the settings are invalid or the engine
    /// is full.
    /// Outputs arrive on the handle's `outputs` channel, which holds `output_queue` frames before dropping.
    pub fn open_stream(&self, settings: StreamSettings, output_queue: usize) -> Result<StreamHandle> {
        let (tx, rx) = bounded(output_queue.max(1));
        let sink: OutputSink = Box::new(move |out| match tx.try_send(out) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
        let mut handle = self.open_stream_with_sink(settings, sink)?;
        handle.outputs = Some(rx);
        Ok(handle)
    }

    /// Opens a stream whose outputs are handed to `sink` on the inference thread.
    pub fn open_stream_with_sink(&self, settings: StreamSettings, sink: OutputSink) -> Result<StreamHandle> {
        self.open_stream_with_sinks(settings, sink, None)
    }

    /// Opens a stream whose outputs are handed to `sink`, and whose frames lost to a failed tick are told to
    /// `failures`, on the inference thread.
    pub fn open_stream_with_sinks(
        &self,
        settings: StreamSettings,
        sink: OutputSink,
        failures: Option<FailureSink>,
    ) -> Result<StreamHandle> {
        settings.validate()?;
        let counters = Arc::new(StreamCounters::default());
        let c = counters.clone();
        let id =
            self.request(|reply| Command::Open { settings, outputs: sink, failures, counters: c, reply })?;
        let submitter = Submitter {
            id,
            engine: self.clone(),
            counters: counters.clone(),
            next_frame: Arc::new(AtomicU64::new(0)),
        };
        Ok(StreamHandle { id, outputs: None, counters, submitter, lease: None })
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.shared.counters
    }

    /// Whether the inference thread still runs (its wake-up channel has a receiver). Nudges it awake, which
    /// costs it one look at its queues.
    pub fn is_running(&self) -> bool {
        !matches!(self.wake.try_send(()), Err(TrySendError::Disconnected(_)))
    }

    /// Streams with a frame waiting for the next tick.
    pub fn pending_frames(&self) -> usize {
        self.shared.pending.lock().len()
    }
}

impl StreamHandle {
    /// Hands a frame to the stream (see [`Submitter::submit`]).
    pub fn submit(&self, image: Option<RgbImage>) -> u64 {
        self.submitter.submit(image)
    }

    /// Hands a frame with a caller-chosen id to the stream.
    pub fn submit_with_id(&self, id: u64, image: Option<RgbImage>) {
        self.submitter.submit_with_id(id, image)
    }

    /// A cloneable way to submit frames from another thread.
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// Sets the stream's control image (for `control = "image"`): the frames submitted after it use it.
    pub fn set_control_image(&self, image: RgbImage) -> Result<()> {
        let id = self.id;
        self.submitter.engine.request(|reply| Command::ControlImage { id, image, reply })
    }

    /// Changes the settings the patch names; on error the old settings stay.
    pub fn update_settings(&self, patch: StreamSettingsPatch) -> Result<StreamSettings> {
        let id = self.id;
        self.submitter.engine.request(|reply| Command::Settings { id, patch, reply })
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let engine = &self.submitter.engine;
        engine.shared.pending.lock().remove(&self.id);
        let _ = engine.commands.send_timeout(Command::Close { id: self.id }, Duration::from_secs(5));
        let _ = engine.wake.try_send(());
    }
}

struct OpenStream {
    stream: Stream,
    outputs: Arc<OutputSink>,
    failures: Option<FailureSink>,
    counters: Arc<StreamCounters>,
    /// The captured tick has produced an output for this stream (which a skipped frame repeats).
    has_output: bool,
}

struct Worker {
    sd: StableDiffusion,
    /// The captured tick, when `cuda_graphs` gives a backend on this device.
    resident: Option<ResidentTick>,
    /// Streams already reported as taking the eager tick (one log line each).
    eager_noted: std::collections::HashSet<u64>,
    /// The captured tick's outputs go to this thread, which waits for their pixels (off the inference
    /// thread) and hands them to the streams' sinks; started with the first captured tick.
    delivery: Option<Sender<Delivery>>,
    delivery_thread: Option<JoinHandle<()>>,
    config: EngineConfig,
    streams: HashMap<u64, OpenStream>,
    cache: Option<PromptCache>,
    shared: Arc<Shared>,
    next_id: u64,
}

impl Worker {
    fn run(&mut self, commands: Receiver<Command>, wake: Receiver<()>) {
        loop {
            // Commands first (settings land before the next frame), then every waiting frame in one tick.
            loop {
                match commands.try_recv() {
                    Ok(Command::Shutdown) => return,
                    Ok(cmd) => self.handle_safely(cmd),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                }
            }
            let frames: Vec<(u64, Frame)> = self.shared.pending.lock().drain().collect();
            if frames.is_empty() {
                select! {
                    recv(commands) -> cmd => match cmd {
                        Ok(Command::Shutdown) | Err(_) => return,
                        Ok(cmd) => self.handle_safely(cmd),
                    },
                    recv(wake) -> _ => {},
                }
                continue;
            }
            self.tick_safely(frames);
        }
    }

    /// Runs a command; a panic fails only that command (its caller gets an error, the stream it was for is
    /// reset) and counts as a failure.
    fn handle_safely(&mut self, cmd: Command) {
        let stream = match &cmd {
            Command::Settings { id, .. } | Command::ControlImage { id, .. } => Some(*id),
            _ => None,
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(feature = "fault-injection")]
            self.fault(Fault::PanicInCommand);
            self.handle(cmd)
        }));
        match run {
            Ok(()) => {}
            Err(panic) => {
                let reason = format!("a command panicked: {}", panic_message(&panic));
                tracing::error!("{reason} (a bug; the engine carries on)");
                self.reset_streams(stream.into_iter());
                self.failed(reason);
            }
        }
    }

    /// Runs a tick; when it panics or fails, every stream in it is reset to a consistent state (re-primed,
    /// nothing in flight, so later outputs answer the right frames), each is counted an error and told, and
    /// the failure counts towards the engine's health.
    fn tick_safely(&mut self, frames: Vec<(u64, Frame)>) {
        let in_tick: Vec<(u64, u64)> = frames.iter().map(|(id, f)| (*id, f.id)).collect();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.tick(frames)));
        let reason = match run {
            Ok(Ok(())) => {
                self.succeeded();
                return;
            }
            Ok(Err(e)) => format!("a tick failed: {e}"),
            Err(panic) => format!("a tick panicked: {}", panic_message(&panic)),
        };
        tracing::error!("{reason}; its {} streams are reset", in_tick.len());
        for (id, frame_id) in &in_tick {
            if let Some(open) = self.streams.get(id) {
                open.counters.errors.fetch_add(1, Ordering::Relaxed);
                if let Some(tell) = &open.failures {
                    tell(*frame_id, &reason);
                }
            }
        }
        self.reset_streams(in_tick.iter().map(|(id, _)| *id));
        self.failed(reason);
    }

    fn reset_streams(&mut self, ids: impl Iterator<Item = u64>) {
        for id in ids {
            let Some(open) = self.streams.get_mut(&id) else { continue };
            open.has_output = false;
            if let Err(e) = open.stream.reset(&self.sd) {
                tracing::error!("stream {id} could not be reset ({e}); it is closed");
                self.streams.remove(&id);
                self.shared.counters.streams_open.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(d) = &self.delivery {
                let _ = d.send(Delivery::Forget(id));
            }
        }
    }

    fn succeeded(&self) {
        let mut h = self.shared.health.lock();
        if h.consecutive_failures > 0 {
            h.consecutive_failures = 0;
            if h.unhealthy.take().is_some() {
                tracing::info!("the engine recovered: a tick succeeded");
            }
        }
    }

    fn failed(&self, reason: String) {
        let mut h = self.shared.health.lock();
        h.failures_total += 1;
        h.consecutive_failures += 1;
        if h.consecutive_failures >= self.config.max_consecutive_failures && h.unhealthy.is_none() {
            let why = format!("{} failures in a row, the last: {reason}", h.consecutive_failures);
            tracing::error!("the engine is unhealthy: {why}");
            h.unhealthy = Some(why);
        }
        h.last_error = Some(reason);
    }

    /// Runs into `fault` when a test asked for it.
    #[cfg(feature = "fault-injection")]
    fn fault(&self, fault: Fault) {
        let mut faults = self.shared.faults.lock();
        if let Some(i) = faults.iter().position(|f| *f == fault) {
            faults.remove(i);
            drop(faults);
            panic!("injected fault: {fault:?}");
        }
    }

    /// Whether a test asked for `fault` (taken once).
    #[cfg(feature = "fault-injection")]
    fn take_fault(&self, fault: Fault) -> bool {
        let mut faults = self.shared.faults.lock();
        let i = faults.iter().position(|f| *f == fault);
        i.map(|i| faults.remove(i)).is_some()
    }

    fn embeddings(&mut self, text: &str) -> Result<TextEmbedding> {
        let key = PromptKey { model: self.config.model.clone(), text: text.to_string(), clip_skip: None };
        let sd = &self.sd;
        let counters = &self.shared.counters;
        let cache = self.cache.as_mut().expect("cache is set before run");
        let before = cache.misses;
        let t = cache.get_or_encode(key, |text| {
            counters.text_encoder_calls.fetch_add(1, Ordering::Relaxed);
            sd.encode_text(text, None)
        })?;
        if cache.misses > before {
            counters.prompt_cache_misses.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.prompt_cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(t)
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Open { settings, outputs, failures, counters, reply } => {
                let result = self.open(settings, outputs, failures, counters);
                let _ = reply.send(result);
            }
            Command::Close { id } => {
                if self.streams.remove(&id).is_some() {
                    self.shared.counters.streams_open.fetch_sub(1, Ordering::Relaxed);
                }
                self.eager_noted.remove(&id);
                if let Some(d) = &self.delivery {
                    let _ = d.send(Delivery::Forget(id));
                }
            }
            Command::Settings { id, patch, reply } => {
                let result = self.update(id, &patch);
                let _ = reply.send(result);
            }
            Command::LoraScale { name, scale, reply } => {
                let result = self.set_lora_scale(&name, scale);
                *self.shared.loras.lock() = self.sd.loras.list();
                let _ = reply.send(result);
            }
            Command::ControlImage { id, image, reply } => {
                let result = match self.streams.get_mut(&id) {
                    Some(open) => open.stream.set_control_image(&image),
                    None => Err(Error::invalid("stream", "is closed")),
                };
                let _ = reply.send(result);
            }
            Command::Shutdown => {}
        }
    }

    fn open(
        &mut self,
        settings: StreamSettings,
        outputs: OutputSink,
        failures: Option<FailureSink>,
        counters: Arc<StreamCounters>,
    ) -> Result<u64> {
        if self.streams.len() >= self.config.max_streams {
            return Err(Error::invalid(
                "stream",
                format!("the engine already runs its maximum of {} streams", self.config.max_streams),
            ));
        }
        let cond = self.embeddings(&settings.prompt)?;
        let uncond = self.embeddings(&settings.negative_prompt)?;
        let id = self.next_id;
        self.next_id += 1;
        let stream = Stream::new(id, &self.sd, settings, cond, uncond)?;
        self.streams.insert(
            id,
            OpenStream { stream, outputs: Arc::new(outputs), failures, counters, has_output: false },
        );
        self.shared.counters.streams_open.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Changes a fused LoRA's scale between ticks. A LoRA on the text encoder changes prompt embeddings: the
    /// cache is emptied and every open stream's prompts are encoded again.
    fn set_lora_scale(&mut self, name: &str, scale: f64) -> Result<Vec<crate::models::lora::LoraInfo>> {
        let i = self.sd.loras.find(name)?;
        self.sd.loras.set_scale(i, scale)?;
        if self.sd.loras.touches_text_encoder(i) {
            self.cache = Some(PromptCache::new(self.config.prompt_cache));
            let prompts: Vec<(u64, String, String)> = self
                .streams
                .iter()
                .map(|(id, o)| {
                    (*id, o.stream.settings().prompt.clone(), o.stream.settings().negative_prompt.clone())
                })
                .collect();
            for (id, prompt, negative) in prompts {
                let (cond, uncond) = (self.embeddings(&prompt)?, self.embeddings(&negative)?);
                if let Some(open) = self.streams.get_mut(&id) {
                    open.stream.set_prompt_embeddings(cond, uncond);
                }
            }
        }
        Ok(self.sd.loras.list())
    }

    fn update(&mut self, id: u64, patch: &StreamSettingsPatch) -> Result<StreamSettings> {
        let current = self
            .streams
            .get(&id)
            .ok_or_else(|| Error::invalid("stream", "is closed"))?
            .stream
            .settings()
            .clone();
        let next = current.patched(patch)?;
        let prompts_changed =
            next.prompt != current.prompt || next.negative_prompt != current.negative_prompt;
        let embeddings = if prompts_changed {
            Some((self.embeddings(&next.prompt)?, self.embeddings(&next.negative_prompt)?))
        } else {
            None
        };
        let open = self.streams.get_mut(&id).ok_or_else(|| Error::invalid("stream", "is closed"))?;
        open.stream.apply_settings(&self.sd, next.clone())?;
        if let Some((cond, uncond)) = embeddings {
            open.stream.set_prompt_embeddings(cond, uncond);
        }
        Ok(next)
    }

    fn tick(&mut self, frames: Vec<(u64, Frame)>) -> Result<()> {
        let tick_start = Instant::now();
        let mut frames: HashMap<u64, Frame> = frames.into_iter().collect();
        if self.resident.is_some() {
            let mut ids: Vec<u64> = frames.keys().copied().collect();
            ids.sort_unstable();
            let captured: Vec<(u64, Frame)> = ids
                .into_iter()
                .filter(|id| self.capturable(*id))
                .filter_map(|id| frames.remove_entry(&id))
                .collect();
            if !captured.is_empty() {
                self.tick_captured(captured, tick_start)?;
            }
        }
        if !frames.is_empty() {
            self.tick_eager(frames, tick_start)?;
        }
        Ok(())
    }

    /// Whether stream `id` takes the captured tick; a stream that cannot is named once in the log.
    fn capturable(&mut self, id: u64) -> bool {
        let Some(open) = self.streams.get(&id) else { return false };
        match resident::uncapturable(&self.sd, &open.stream) {
            None => true,
            Some(why) => {
                if self.eager_noted.insert(id) {
                    tracing::info!("stream {id} takes the eager tick: {why}");
                }
                false
            }
        }
    }

    /// The captured tick ([`ResidentTick`]): the similarity filter decides on the host, the device part is one
    /// replay per bucket, and the outputs come back as 8-bit images.
    fn tick_captured(&mut self, frames: Vec<(u64, Frame)>, tick_start: Instant) -> Result<()> {
        struct Prepared {
            frame_id: u64,
            image: Option<RgbImage>,
            received: Instant,
            queue_ms: f64,
            preprocess_ms: f64,
        }
        let mut ready: HashMap<u64, Prepared> = HashMap::new();
        let mut skipped: Vec<Pending> = Vec::new();
        for (id, frame) in frames {
            let Some(open) = self.streams.get_mut(&id) else { continue };
            let t0 = Instant::now();
            let s = open.stream.settings();
            let image = match (s.mode, frame.image) {
                // Resized on the device by the captured tick when not at the stream's size.
                (Mode::Img2img, Some(img)) => Some(img),
                (Mode::Img2img, None) => {
                    open.counters.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                (Mode::Txt2img, _) => None,
            };
            let queue_ms = tick_start.duration_since(frame.received).as_secs_f64() * 1e3;
            let skip = image.as_ref().is_some_and(|img| open.stream.should_skip_rgb(img));
            if skip && open.has_output {
                open.counters.skipped.fetch_add(1, Ordering::Relaxed);
                skipped.push(Pending {
                    sink: open.outputs.clone(),
                    counters: open.counters.clone(),
                    meta: OutputMeta { stream_id: id, answers: frame.id, frame_id: frame.id, warmup: false },
                    received: frame.received,
                    queue_ms,
                    preprocess_ms: t0.elapsed().as_secs_f64() * 1e3,
                    batched: 0,
                    row: None,
                });
                continue;
            }
            let preprocess_ms = t0.elapsed().as_secs_f64() * 1e3;
            ready.insert(
                id,
                Prepared { frame_id: frame.id, image, received: frame.received, queue_ms, preprocess_ms },
            );
        }
        if ready.is_empty() {
            self.send_delivery(Delivery::Tick { buckets: Vec::new(), skipped, started: tick_start });
            return Ok(());
        }
        self.shared.counters.ticks.fetch_add(1, Ordering::Relaxed);
        let mut streams: Vec<(&u64, &mut OpenStream)> =
            self.streams.iter_mut().filter(|(id, _)| ready.contains_key(id)).collect();
        streams.sort_by_key(|(id, _)| **id);
        let inputs: Vec<ResidentInput<'_>> = streams
            .into_iter()
            .map(|(id, open)| {
                let p = &ready[id];
                ResidentInput { stream: &mut open.stream, frame_id: p.frame_id, image: p.image.as_ref() }
            })
            .collect();
        let batched = inputs.len();
        let (sd, resident) = (&self.sd, self.resident.as_mut().expect("checked by the caller"));
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resident.start(sd, inputs)))
            .unwrap_or_else(|_| {
                Err(Error::Model("the captured tick panicked (a bug; the engine carries on)".into()))
            });
        let in_flight = match result {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("captured tick failed: {e}; every stream takes the eager tick from now on");
                self.resident = None;
                self.send_delivery(Delivery::Tick { buckets: Vec::new(), skipped, started });
                return Err(e);
            }
        };
        #[cfg(feature = "fault-injection")]
        {
            if self.take_fault(Fault::ErrorInTick) {
                return Err(Error::Model("injected fault: ErrorInTick".into()));
            }
            self.fault(Fault::PanicInTick);
        }
        let mut buckets = Vec::with_capacity(in_flight.len());
        for bucket in in_flight {
            let pending = bucket
                .outputs
                .iter()
                .enumerate()
                .filter_map(|(row, meta)| {
                    let open = self.streams.get_mut(&meta.stream_id)?;
                    open.has_output = true;
                    let p = &ready[&meta.stream_id];
                    Some(Pending {
                        sink: open.outputs.clone(),
                        counters: open.counters.clone(),
                        meta: *meta,
                        received: p.received,
                        queue_ms: p.queue_ms,
                        preprocess_ms: p.preprocess_ms,
                        batched,
                        row: Some(row),
                    })
                })
                .collect();
            buckets.push((bucket.readback, pending));
        }
        self.send_delivery(Delivery::Tick { buckets, skipped, started });
        Ok(())
    }

    /// Hands a captured tick's outputs to the delivery thread. The hand-over waits until that thread has
    /// finished the previous tick, so at most two ticks are on the device at once and the host buffers of the
    /// tick before are free again.
    fn send_delivery(&mut self, d: Delivery) {
        if let Delivery::Tick { buckets, skipped, .. } = &d {
            if buckets.is_empty() && skipped.is_empty() {
                return;
            }
        }
        if self.delivery.is_none() {
            let (tx, rx) = bounded::<Delivery>(0);
            match std::thread::Builder::new()
                .name("sdstream-delivery".into())
                .spawn(move || delivery_loop(rx))
            {
                Ok(handle) => {
                    self.delivery = Some(tx);
                    self.delivery_thread = Some(handle);
                }
                Err(e) => {
                    tracing::error!("cannot start the delivery thread: {e}");
                    return;
                }
            }
        }
        if let Some(tx) = &self.delivery {
            let _ = tx.send(d);
        }
    }

    /// The eager tick ([`batch::tick`]) for the streams the captured one does not take.
    fn tick_eager(&mut self, mut frames: HashMap<u64, Frame>, tick_start: Instant) -> Result<()> {
        let (device, kind) = (self.sd.device, self.sd.kind);
        let mut inputs = Vec::new();
        let mut meta = HashMap::new();
        let mut streams: Vec<(&u64, &mut OpenStream)> = self.streams.iter_mut().collect();
        streams.sort_by_key(|(id, _)| **id);
        for (id, open) in streams {
            let Some(frame) = frames.remove(id) else { continue };
            let t0 = Instant::now();
            let s = open.stream.settings();
            let image = match (s.mode, frame.image) {
                (Mode::Img2img, Some(img)) => {
                    let img = crate::io::image::resize(img, s.width as u32, s.height as u32);
                    match crate::io::image::to_tensor(&img, device, kind) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            tracing::warn!("stream {id}: frame {} dropped: {e}", frame.id);
                            open.counters.errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                (Mode::Img2img, None) => {
                    open.counters.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                (Mode::Txt2img, _) => None,
            };
            let queue_ms = tick_start.duration_since(frame.received).as_secs_f64() * 1e3;
            meta.insert(*id, (frame.received, queue_ms, t0.elapsed().as_secs_f64() * 1e3));
            inputs.push(TickInput { stream: &mut open.stream, frame_id: frame.id, image });
        }
        if inputs.is_empty() {
            return Ok(());
        }
        self.shared.counters.ticks.fetch_add(1, Ordering::Relaxed);
        // A failure (or a panic, caught by the caller) resets the streams of this tick: see `tick_safely`.
        let (outputs, timings) = batch::tick(&self.sd, inputs, self.config.measure_stages)?;
        #[cfg(feature = "fault-injection")]
        {
            if self.take_fault(Fault::ErrorInTick) {
                return Err(Error::Model("injected fault: ErrorInTick".into()));
            }
            self.fault(Fault::PanicInTick);
        }
        for out in outputs {
            let Some(open) = self.streams.get(&out.stream_id) else { continue };
            let Some(image) = out.image else { continue };
            let t0 = Instant::now();
            let rgb = match crate::io::image::to_rgb8(&image) {
                Ok(rgb) => rgb,
                Err(e) => {
                    tracing::warn!("stream {}: output conversion failed: {e}", out.stream_id);
                    continue;
                }
            };
            let (received, queue_ms, preprocess_ms) =
                meta.get(&out.stream_id).copied().unwrap_or((tick_start, 0.0, 0.0));
            let times = StageTimes {
                queue_ms,
                preprocess_ms,
                encode_ms: timings.encode.as_secs_f64() * 1e3,
                unet_ms: timings.unet.as_secs_f64() * 1e3,
                decode_ms: timings.decode.as_secs_f64() * 1e3,
                postprocess_ms: t0.elapsed().as_secs_f64() * 1e3,
                total_ms: received.elapsed().as_secs_f64() * 1e3,
            };
            if out.skipped {
                open.counters.skipped.fetch_add(1, Ordering::Relaxed);
            }
            let output = Output {
                stream_id: out.stream_id,
                answers: out.answers,
                frame_id: out.frame_id,
                image: rgb,
                warmup: out.warmup,
                skipped: out.skipped,
                times,
                batched_streams: timings.streams,
                unet_batch: timings.unet_batch,
            };
            deliver(open, output);
        }
        Ok(())
    }
}

/// The message a panic carried.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Hands an output to its stream's consumer, counting it as sent or dropped.
fn deliver(open: &OpenStream, output: Output) {
    if (open.outputs)(output) {
        open.counters.frames_out.fetch_add(1, Ordering::Relaxed);
    } else {
        open.counters.dropped_output.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Outputs still on their way are delivered before the engine is gone.
        self.delivery = None;
        if let Some(t) = self.delivery_thread.take() {
            let _ = t.join();
        }
    }
}

/// One output of the captured tick on its way to its stream.
struct Pending {
    sink: Arc<OutputSink>,
    counters: Arc<StreamCounters>,
    meta: OutputMeta,
    received: Instant,
    queue_ms: f64,
    preprocess_ms: f64,
    batched: usize,
    /// Its row in the bucket's readback; `None` for a frame the similarity filter skipped (the stream's last
    /// output is repeated).
    row: Option<usize>,
}

enum Delivery {
    Tick {
        buckets: Vec<(crate::transfer::Readback, Vec<Pending>)>,
        skipped: Vec<Pending>,
        /// When the device part of the tick was started (its time is counted to the pixels' arrival).
        started: Instant,
    },
    /// A stream closed: forget its last output.
    Forget(u64),
}

fn delivery_loop(rx: Receiver<Delivery>) {
    let mut last: HashMap<u64, RgbImage> = HashMap::new();
    let send = |p: Pending, image: RgbImage, device_ms: f64| {
        let times = StageTimes {
            queue_ms: p.queue_ms,
            preprocess_ms: p.preprocess_ms,
            unet_ms: device_ms,
            total_ms: p.received.elapsed().as_secs_f64() * 1e3,
            ..Default::default()
        };
        let output = Output {
            stream_id: p.meta.stream_id,
            answers: p.meta.answers,
            frame_id: p.meta.frame_id,
            image,
            warmup: p.meta.warmup,
            skipped: p.row.is_none(),
            times,
            batched_streams: p.batched,
            unet_batch: 0,
        };
        if (p.sink)(output) {
            p.counters.frames_out.fetch_add(1, Ordering::Relaxed);
        } else {
            p.counters.dropped_output.fetch_add(1, Ordering::Relaxed);
        }
    };
    for d in rx {
        match d {
            Delivery::Forget(id) => {
                last.remove(&id);
            }
            Delivery::Tick { buckets, skipped, started } => {
                for p in skipped {
                    if let Some(image) = last.get(&p.meta.stream_id).cloned() {
                        send(p, image, 0.0);
                    }
                }
                for (readback, pending) in buckets {
                    let images = match readback.wait() {
                        Ok(images) => images,
                        Err(e) => {
                            tracing::error!("reading the captured tick's outputs back failed: {e}");
                            for p in &pending {
                                p.counters.errors.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                    };
                    let device_ms = started.elapsed().as_secs_f64() * 1e3;
                    let mut images: Vec<Option<RgbImage>> = images.into_iter().map(Some).collect();
                    for p in pending {
                        let Some(image) = p.row.and_then(|r| images.get_mut(r)?.take()) else { continue };
                        last.insert(p.meta.stream_id, image.clone());
                        send(p, image, device_ms);
                    }
                }
            }
        }
    }
}
