//! Webcam -> stream -> JPEG files, with the library alone (no server): captures camera INDEX with nokhwa on its
//! own thread, runs every frame through one stream on the inference thread and writes the outputs.
//! Needs the `camera` feature:
//!
//! ```sh
//! cargo run --release --features camera --example webcam -- [INDEX] [--model M] [--frames N] [--out DIR]
//! ```
use sdstream::engine::{Engine, EngineConfig};
use sdstream::models::stable_diffusion::LoadOptions;
use sdstream::stream::settings::StreamSettings;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut index, mut model, mut frames, mut out) =
        (0u32, "models/tiny-sd-test".to_string(), 100usize, "webcam-out".to_string());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model = args.next().unwrap_or(model),
            "--frames" => frames = args.next().and_then(|v| v.parse().ok()).unwrap_or(frames),
            "--out" => out = args.next().unwrap_or(out),
            other => index = other.parse()?,
        }
    }
    let cameras = sdstream::io::camera::list()?;
    println!("cameras: {cameras:?}");
    let load = LoadOptions {
        device: sdstream::device::parse_device("auto")?,
        kind: tch::Kind::Float,
        vae: None,
        controlnet: None,
        model_config: None,
    };
    let engine = Engine::start(EngineConfig::new(model, load))?;
    let settings =
        StreamSettings { width: 256, height: 256, prompt: "an oil painting".into(), ..Default::default() };
    let stream = engine.handle().open_stream(settings, 4)?;
    let submit = stream.submitter();
    let capture = sdstream::io::camera::start(
        index,
        Box::new(move |img| {
            submit.submit(Some(img));
        }),
    )?;
    println!("capturing from {}", capture.description);
    std::fs::create_dir_all(&out)?;
    let outputs = stream.outputs.as_ref().expect("opened with a channel");
    for i in 0..frames {
        let o = outputs.recv_timeout(Duration::from_secs(30))?;
        let path = format!("{out}/{i:05}.jpg");
        std::fs::write(&path, sdstream::io::image::encode_jpeg(&o.image, 90)?)?;
        println!("{path}: unet {:.1} ms, total {:.1} ms", o.times.unet_ms, o.times.total_ms);
    }
    capture.stop();
    Ok(())
}
