//! The daemon: the inference engines (one per device), the server, optionally a camera feeding a shared stream, and a graceful
//! shutdown on SIGINT/SIGTERM (stop accepting, close every socket with a close frame, join the camera and
//! inference threads).
use crate::config::DaemonConfig;
use crate::engine::pool::EnginePool;
use crate::engine::{EngineConfig, OutputSink};
use crate::error::{Error, Result};
use crate::models::stable_diffusion::LoadOptions;
use crate::server::Server;
use std::path::PathBuf;
use std::time::Duration;

/// A camera feeding one stream whose output goes to the viewers (and optionally to a folder of frames).
#[derive(Debug, Clone)]
pub struct CameraOptions {
    pub index: u32,
    pub save_dir: Option<PathBuf>,
}

/// One engine config per device of `[model] devices` (or `device`).
fn engine_configs(config: &DaemonConfig) -> Result<Vec<EngineConfig>> {
    let one = engine_config(config)?;
    let devices = config.model.device_list();
    if devices.len() == 1 {
        return Ok(vec![one]);
    }
    devices
        .iter()
        .map(|d| {
            let mut c = one.clone();
            c.load.device = crate::device::parse_device(d)?;
            if let Some(m) = config.server.measure_stages {
                c.measure_stages = m;
            } else {
                c.measure_stages = !c.load.device.is_cuda();
            }
            Ok(c)
        })
        .collect()
}

fn engine_config(config: &DaemonConfig) -> Result<EngineConfig> {
    let m = &config.model;
    if m.model.is_empty() {
        return Err(Error::invalid("model", "no model given: pass --model or a --config with [model].model"));
    }
    let load = LoadOptions {
        device: crate::device::parse_device(&m.device_list()[0])?,
        kind: crate::device::parse_dtype(&m.dtype)?,
        vae: m.vae.clone(),
        controlnet: m.controlnet.clone(),
        model_config: m.model_config.clone(),
    };
    let mut e = EngineConfig::new(m.model.clone(), load);
    e.max_streams = config.server.max_clients + 1;
    if let Some(m) = config.server.measure_stages {
        e.measure_stages = m;
    }
    e.loras = m.loras.clone();
    e.cuda_graphs = m.cuda_graphs;
    Ok(e)
}

/// Runs until SIGINT or SIGTERM. Returns after a clean shutdown.
pub fn run(config: DaemonConfig, camera: Option<CameraOptions>) -> Result<()> {
    config.validate()?;
    // Bind the port before loading anything: a port in use, or a non-loopback address without a token, is
    // reported at once rather than after a long load (or download). Connections wait in the backlog meanwhile.
    let listener = crate::server::bind(&config.server)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("bound {addr}; loading model {}", config.model.model);
    }
    let t0 = std::time::Instant::now();
    let pool = EnginePool::start(
        engine_configs(&config)?,
        config.server.streams_per_engine(),
        Duration::from_secs(config.server.engine_stall_s),
    )?;
    for (i, engine) in pool.engines().iter().enumerate() {
        let info = &engine.info;
        tracing::info!(
            "engine {i}: model {} ready on {} in {}, up to {} streams ({:.1}s)",
            info.model,
            info.device,
            info.dtype,
            config.server.streams_per_engine(),
            t0.elapsed().as_secs_f64()
        );
    }
    let info = pool.engines()[0].info.clone();
    if info.test_model {
        tracing::warn!("{} is a random-weight TEST model: its pictures are noise-like by design; pass --model for real weights", info.model);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("sdstream-io")
        .build()
        .map_err(|e| Error::Model(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(async {
        let server =
            Server::start_pool_on(listener, pool.handle(), config.server.clone(), config.stream_settings()?)
                .await?;
        let capture = match &camera {
            Some(cam) => Some(start_camera(&pool, &server, &config, cam)?),
            None => None,
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        server.shutdown(Duration::from_secs(5)).await;
        if let Some((capture, stream)) = capture {
            capture.stop();
            drop(stream);
        }
        Ok::<(), Error>(())
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    pool.shutdown();
    tracing::info!("stopped");
    result
}

/// The camera's stream runs on engine 0, outside the pool's per-engine limit.
fn start_camera(
    pool: &EnginePool,
    server: &Server,
    config: &DaemonConfig,
    cam: &CameraOptions,
) -> Result<(crate::io::camera::Capture, crate::engine::StreamHandle)> {
    let state = server.state.clone();
    let quality = config.server.jpeg_quality;
    let save_dir = cam.save_dir.clone();
    if let Some(dir) = &save_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // Encoding happens on a worker thread so the inference thread only hands the picture over.
    let (tx, rx) = crossbeam_channel::bounded::<crate::engine::Output>(2);
    std::thread::Builder::new()
        .name("sdstream-camera-out".into())
        .spawn(move || {
            for out in rx {
                if let Ok(jpeg) = crate::io::image::encode_jpeg(&out.image, quality) {
                    if let Some(dir) = &save_dir {
                        let path = dir.join(format!("{:08}.jpg", out.answers));
                        if let Err(e) = std::fs::write(&path, &jpeg) {
                            tracing::warn!("{}: {e}", path.display());
                        }
                    }
                    crate::server::viewers::publish(&state, bytes::Bytes::from(jpeg));
                }
            }
        })
        .map_err(|e| Error::Model(format!("cannot start the camera output thread: {e}")))?;
    let sink: OutputSink = Box::new(move |o| tx.try_send(o).is_ok());
    let stream = pool.engines()[0].handle().open_stream_with_sink(config.stream_settings()?, sink)?;
    let submit = stream.submitter();
    let capture = crate::io::camera::start(
        cam.index,
        Box::new(move |img| {
            submit.submit(Some(img));
        }),
    )?;
    tracing::info!("camera {}: {} -> viewers at /view and /mjpeg", cam.index, capture.description);
    Ok((capture, stream))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
