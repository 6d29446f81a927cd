//! Several engines in one daemon, one per device (`--device cuda:0,cuda:1`): each is an [`Engine`] with its own
//! inference thread and model copy. A new stream goes to the live engine with the most free capacity and stays
//! there (its state lives on that device). Each engine takes at most `limit` streams; when every engine is full
//! a new stream is refused with a retry hint ([`OpenError::Full`]) rather than slowing every client down.
//!
//! A monitor thread samples every engine four times a second: an engine is *live* while its thread runs and
//! the frames waiting for it are taken within `stall_after` (an idle engine is live). `/health/live` is every
//! engine live; `/health/ready` is one more stream fitting on a live engine.
use super::{
    Engine, EngineConfig, EngineCounters, EngineHandle, FailureSink, ModelInfo, OutputSink, StreamHandle,
};
use crate::error::{Error, Result};
use crate::stream::settings::StreamSettings;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// The seconds a refused client is told to wait before it tries again (`retry_after_s`). Streams are
/// long-lived, so a slot rarely frees sooner; behind a load balancer the retry usually lands elsewhere.
pub const RETRY_AFTER_S: u64 = 5;

/// How often the monitor samples the engines.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Why a stream was not opened.
#[derive(Debug)]
pub enum OpenError {
    /// Every live engine runs its maximum of streams: try again after `retry_after_s` (or elsewhere).
    Full { retry_after_s: u64, message: String },
    /// No engine can serve (stopped, stalled, or its ticks keep failing): try again later or elsewhere.
    Unavailable { retry_after_s: u64, message: String },
    /// The engine refused the stream (invalid settings, a stalled engine, ...).
    Engine(Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Full { message, .. } | OpenError::Unavailable { message, .. } => f.write_str(message),
            OpenError::Engine(e) => write!(f, "{e}"),
        }
    }
}

/// A stream opened through the pool, and the engine (its index) that serves it.
pub struct Opened {
    pub stream: StreamHandle,
    pub engine: usize,
}

/// Holds one of an engine's stream slots; released when the stream's handle is dropped.
pub struct Lease {
    leased: Arc<AtomicUsize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.leased.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One engine's load and health, as `/metrics`, `/health` and `ready` report it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineLoad {
    pub index: usize,
    pub device: String,
    /// Streams this engine serves now (slots taken).
    pub streams: usize,
    /// The most streams it takes.
    pub limit: usize,
    pub live: bool,
    /// Why it is not live (empty when it is).
    pub reason: String,
    pub ticks: u64,
    /// Streams with a frame waiting for this engine now.
    pub pending_frames: usize,
    /// Streams opened on it since start.
    pub opened_total: u64,
    /// Seconds since it last made progress (a tick, or nothing waiting).
    pub progress_age_s: f64,
}

struct Progress {
    ticks: u64,
    at: Instant,
}

struct Member {
    handle: EngineHandle,
    info: ModelInfo,
    limit: usize,
    leased: Arc<AtomicUsize>,
    opened_total: AtomicU64,
    live: AtomicBool,
    reason: Mutex<String>,
    progress: Mutex<Progress>,
}

impl Member {
    /// Whether it can take a new stream's work: live (as the monitor last saw it) and healthy now.
    fn usable(&self) -> bool {
        self.live.load(Ordering::Relaxed) && self.handle.health().unhealthy.is_none()
    }
}

struct PoolShared {
    members: Vec<Member>,
    /// Held while choosing an engine and taking its slot, so two clients never take the last slot twice.
    choose: Mutex<()>,
    stall_after: Duration,
}

/// The running engines; dropping it (or [`EnginePool::shutdown`]) stops every inference thread.
pub struct EnginePool {
    engines: Vec<Engine>,
    handle: PoolHandle,
}

impl EnginePool {
    /// Starts one engine per config, loading their models in parallel; fails (stopping the others) when any
    /// fails. Each engine takes at most `limit` streams; an engine is not live once frames wait longer than
    /// `stall_after` for it.
    pub fn start(configs: Vec<EngineConfig>, limit: usize, stall_after: Duration) -> Result<EnginePool> {
        if configs.is_empty() {
            return Err(Error::invalid("device", "no device to start an engine on"));
        }
        let starting: Vec<_> = configs
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                std::thread::Builder::new()
                    .name(format!("sdstream-load-{i}"))
                    .spawn(move || Engine::start(c))
                    .map_err(|e| Error::Model(format!("cannot start engine {i}: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut engines = Vec::new();
        let mut failure = None;
        for (i, t) in starting.into_iter().enumerate() {
            match t.join() {
                Ok(Ok(e)) => engines.push(e),
                Ok(Err(e)) => failure = failure.or(Some(Error::Model(format!("engine {i}: {e}")))),
                Err(_) => {
                    failure = failure.or(Some(Error::Model(format!("engine {i} panicked while loading"))))
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(Self::from_engines(engines, limit, stall_after))
    }

    /// A pool of engines already started.
    pub fn from_engines(engines: Vec<Engine>, limit: usize, stall_after: Duration) -> EnginePool {
        let members = engines.iter().map(|e| (e.handle(), e.info.clone())).collect();
        let handle = PoolHandle::new(members, limit, stall_after);
        EnginePool { engines, handle }
    }

    pub fn handle(&self) -> PoolHandle {
        self.handle.clone()
    }

    pub fn engines(&self) -> &[Engine] {
        &self.engines
    }

    /// Stops every inference thread (each after its current tick) and waits for them.
    pub fn shutdown(self) {
        for e in self.engines {
            e.shutdown();
        }
    }
}

/// A cheap, cloneable way to reach the pool's engines from any thread.
#[derive(Clone)]
pub struct PoolHandle {
    shared: Arc<PoolShared>,
}

impl PoolHandle {
    /// A pool over running engines (their handles and model infos); starts the monitor thread, which ends
    /// with the last handle.
    pub fn new(engines: Vec<(EngineHandle, ModelInfo)>, limit: usize, stall_after: Duration) -> PoolHandle {
        let now = Instant::now();
        let members = engines
            .into_iter()
            .map(|(handle, info)| Member {
                handle,
                info,
                limit: limit.max(1),
                leased: Arc::new(AtomicUsize::new(0)),
                opened_total: AtomicU64::new(0),
                live: AtomicBool::new(true),
                reason: Mutex::new(String::new()),
                progress: Mutex::new(Progress { ticks: 0, at: now }),
            })
            .collect();
        let shared = Arc::new(PoolShared { members, choose: Mutex::new(()), stall_after });
        let weak = Arc::downgrade(&shared);
        let spawned =
            std::thread::Builder::new().name("sdstream-monitor".into()).spawn(move || monitor(weak));
        if let Err(e) = spawned {
            tracing::error!("cannot start the engine monitor: {e}; engines are reported live without checks");
        }
        PoolHandle { shared }
    }

    /// How many engines.
    pub fn len(&self) -> usize {
        self.shared.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.members.is_empty()
    }

    /// Engine `i`'s handle (engine 0 also runs the camera stream of `sdstream webcam`).
    pub fn engine(&self, i: usize) -> &EngineHandle {
        &self.shared.members[i].handle
    }

    /// What engine `i` runs, and on which device.
    pub fn info(&self, i: usize) -> &ModelInfo {
        &self.shared.members[i].info
    }

    /// Opens a stream on the live engine with the most free slots (the lowest index among equals); the slot
    /// is held until the returned stream's handle is dropped. Blocks on the chosen engine: call it off the
    /// async threads.
    pub fn open_stream_with_sink(
        &self,
        settings: StreamSettings,
        sink: OutputSink,
    ) -> std::result::Result<Opened, OpenError> {
        self.open_stream_with_sinks(settings, sink, None)
    }

    /// [`PoolHandle::open_stream_with_sink`], with frames lost to a failed tick told to `failures`.
    pub fn open_stream_with_sinks(
        &self,
        settings: StreamSettings,
        sink: OutputSink,
        failures: Option<FailureSink>,
    ) -> std::result::Result<Opened, OpenError> {
        let (index, lease) = self.take_slot()?;
        let member = &self.shared.members[index];
        let mut stream =
            member.handle.open_stream_with_sinks(settings, sink, failures).map_err(OpenError::Engine)?;
        stream.lease = Some(lease);
        member.opened_total.fetch_add(1, Ordering::Relaxed);
        Ok(Opened { stream, engine: index })
    }

    fn take_slot(&self) -> std::result::Result<(usize, Lease), OpenError> {
        let _choosing = self.shared.choose.lock();
        let best = self
            .shared
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.usable())
            .map(|(i, m)| (i, m.limit.saturating_sub(m.leased.load(Ordering::Relaxed))))
            .filter(|(_, free)| *free > 0)
            .max_by_key(|(i, free)| (*free, std::cmp::Reverse(*i)));
        let Some((index, _)) = best else {
            let usable = self.shared.members.iter().filter(|m| m.usable()).count();
            if usable == 0 {
                let why = self.unhealthy().join("; ");
                let message =
                    format!("no engine can serve on this server ({why}); try again later or another server");
                return Err(OpenError::Unavailable { retry_after_s: RETRY_AFTER_S, message });
            }
            let message = {
                let total: usize = self.shared.members.iter().map(|m| m.limit).sum();
                format!(
                    "the server is full ({total} streams on {} engine(s)); try again in {RETRY_AFTER_S} s or \
                     another server",
                    self.len()
                )
            };
            return Err(OpenError::Full { retry_after_s: RETRY_AFTER_S, message });
        };
        let leased = self.shared.members[index].leased.clone();
        leased.fetch_add(1, Ordering::Relaxed);
        Ok((index, Lease { leased }))
    }

    /// Each unhealthy engine (its ticks or commands keep failing), with why.
    pub fn unhealthy(&self) -> Vec<String> {
        let members = self.shared.members.iter().enumerate();
        members
            .filter_map(|(i, m)| {
                Some(format!("engine {i} ({}): {}", m.info.device, m.handle.health().unhealthy?))
            })
            .collect()
    }

    /// Every engine's health, in order.
    pub fn health(&self) -> Vec<crate::engine::EngineHealth> {
        self.shared.members.iter().map(|m| m.handle.health()).collect()
    }

    /// Failed ticks and commands, every engine.
    pub fn failures_total(&self) -> u64 {
        self.shared.members.iter().map(|m| m.handle.health().failures_total).sum()
    }

    /// Free stream slots on live engines.
    pub fn free(&self) -> usize {
        self.shared
            .members
            .iter()
            .filter(|m| m.live.load(Ordering::Relaxed))
            .map(|m| m.limit.saturating_sub(m.leased.load(Ordering::Relaxed)))
            .sum()
    }

    /// Stream slots of every engine together.
    pub fn capacity(&self) -> usize {
        self.shared.members.iter().map(|m| m.limit).sum()
    }

    /// Whether every engine is live (its thread runs and takes its frames).
    pub fn live(&self) -> bool {
        self.shared.members.iter().all(|m| m.live.load(Ordering::Relaxed))
    }

    /// Each engine's load and health.
    pub fn loads(&self) -> Vec<EngineLoad> {
        self.shared
            .members
            .iter()
            .enumerate()
            .map(|(index, m)| EngineLoad {
                index,
                device: m.info.device.clone(),
                streams: m.leased.load(Ordering::Relaxed),
                limit: m.limit,
                live: m.live.load(Ordering::Relaxed),
                reason: m.reason.lock().clone(),
                ticks: m.handle.counters().ticks.load(Ordering::Relaxed),
                pending_frames: m.handle.pending_frames(),
                opened_total: m.opened_total.load(Ordering::Relaxed),
                progress_age_s: m.progress.lock().at.elapsed().as_secs_f64(),
            })
            .collect()
    }

    /// A counter summed over every engine.
    pub fn total(&self, counter: impl Fn(&EngineCounters) -> &AtomicU64) -> u64 {
        self.shared.members.iter().map(|m| counter(m.handle.counters()).load(Ordering::Relaxed)).sum()
    }

    /// The fused LoRAs with their scales (the same on every engine).
    pub fn loras(&self) -> Vec<crate::models::lora::LoraInfo> {
        self.shared.members.first().map(|m| m.handle.loras()).unwrap_or_default()
    }

    /// Changes a LoRA's scale on every engine (each between its ticks); returns the LoRAs as engine 0 has
    /// them. An error on one engine stops there (the engines before it have the new scale).
    pub fn set_lora_scale(&self, name: &str, scale: f64) -> Result<Vec<crate::models::lora::LoraInfo>> {
        let mut first = None;
        for m in &self.shared.members {
            let loras = m.handle.set_lora_scale(name, scale)?;
            first.get_or_insert(loras);
        }
        Ok(first.unwrap_or_default())
    }
}

/// Samples every engine until the pool is gone: an engine is live while its thread runs and, whenever frames
/// wait for it, its tick counter moves within `stall_after`.
fn monitor(pool: Weak<PoolShared>) {
    loop {
        let Some(shared) = pool.upgrade() else { return };
        for (i, m) in shared.members.iter().enumerate() {
            let ticks = m.handle.counters().ticks.load(Ordering::Relaxed);
            let waiting = m.handle.pending_frames();
            let mut p = m.progress.lock();
            if ticks != p.ticks || waiting == 0 {
                p.ticks = ticks;
                p.at = Instant::now();
            }
            let stalled = p.at.elapsed();
            drop(p);
            let reason = if !m.handle.is_running() {
                "the inference thread has stopped".to_string()
            } else if let Some(why) = m.handle.health().unhealthy {
                why
            } else if stalled > shared.stall_after {
                format!(
                    "frames have waited {:.0} s without a tick (stalled over {} s)",
                    stalled.as_secs_f64(),
                    shared.stall_after.as_secs()
                )
            } else {
                String::new()
            };
            let live = reason.is_empty();
            if m.live.swap(live, Ordering::Relaxed) != live {
                if live {
                    tracing::info!("engine {i} ({}) is live again", m.info.device);
                } else {
                    tracing::error!("engine {i} ({}) is not live: {reason}", m.info.device);
                }
            }
            *m.reason.lock() = reason;
        }
        drop(shared);
        std::thread::sleep(SAMPLE_EVERY);
    }
}
