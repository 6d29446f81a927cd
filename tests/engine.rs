//! The inference thread and stream behaviour on the bundled tiny TEST model: latest-frame-wins, the prompt
//! cache, settings changes mid-stream without a reset, refused settings, the offline `stream` runner, and the
//! throughput of batched streams (reported, never asserted as a time).
mod common;

use sdstream::engine::{Engine, EngineConfig, Output, StreamHandle};
use sdstream::stream::batch::{tick, TickInput};
use sdstream::stream::settings::StreamSettings;
use sdstream::stream::Stream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn engine() -> Engine {
    let load = common::cpu_fp32(Some(common::fixture("models/tiny-taesd-test").display().to_string()));
    Engine::start(EngineConfig::new(common::fixture("models/tiny-sd-test").display().to_string(), load))
        .unwrap()
}

fn settings() -> StreamSettings {
    StreamSettings {
        width: 64,
        height: 64,
        t_index_list: vec![32, 45],
        prompt: "a fox".into(),
        ..Default::default()
    }
}

fn frame(seed: u8) -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, seed]))
}

fn next(stream: &StreamHandle) -> Output {
    stream.outputs.as_ref().unwrap().recv_timeout(Duration::from_secs(60)).expect("an output in time")
}

#[test]
fn latest_frame_wins_and_drops_are_counted() {
    let engine = engine();
    let stream = engine.handle().open_stream(settings(), 64).unwrap();
    for i in 0..200u64 {
        stream.submit_with_id(i, Some(frame(i as u8)));
    }
    // Outputs arrive until the last submitted frame has been taken; older waiting frames were replaced.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while Instant::now() < deadline {
        match stream.outputs.as_ref().unwrap().recv_timeout(Duration::from_secs(2)) {
            Ok(o) => last = Some(o.frame_id),
            Err(_) => break,
        }
    }
    assert_eq!(last, Some(199), "the newest frame is always processed");
    let c = &stream.counters;
    let (inn, out, dropped) = (
        c.frames_in.load(Ordering::Relaxed),
        c.frames_out.load(Ordering::Relaxed),
        c.dropped_input.load(Ordering::Relaxed),
    );
    assert_eq!(inn, 200);
    assert!(dropped > 0, "a flood of frames must drop some");
    assert_eq!(out + dropped, inn, "every frame is either processed or counted as dropped");
}

#[test]
fn prompt_changes_hit_the_cache_and_keep_the_stream_flowing() {
    let engine = engine();
    let stream = engine.handle().open_stream(settings(), 8).unwrap();
    let calls = || engine.counters().text_encoder_calls.load(Ordering::Relaxed);
    let after_open = calls();
    assert_eq!(after_open, 2, "prompt and negative prompt encoded once");
    let mut outputs = Vec::new();
    for i in 0..3u64 {
        stream.submit_with_id(i, Some(frame(1)));
        outputs.push(next(&stream));
    }
    assert!(outputs[0].warmup && !outputs[1].warmup && !outputs[2].warmup, "two stages: one warm-up frame");
    stream.update_settings(patch(r#"{"prompt": "a neon city"}"#)).unwrap();
    assert_eq!(calls(), after_open + 1, "a new prompt costs one encoder call");
    stream.submit_with_id(3, Some(frame(1)));
    let changed = next(&stream);
    assert!(!changed.warmup, "a prompt change does not re-prime the stream");
    assert_ne!(changed.image.as_raw(), outputs[2].image.as_raw(), "the new prompt changes the output");
    stream.update_settings(patch(r#"{"prompt": "a fox"}"#)).unwrap();
    stream.update_settings(patch(r#"{"prompt": "a neon city"}"#)).unwrap();
    assert_eq!(calls(), after_open + 1, "prompts seen before come from the cache");
    assert!(engine.counters().prompt_cache_hits.load(Ordering::Relaxed) >= 2);
    // A refused setting names itself and leaves everything as it was.
    let e = stream.update_settings(patch(r#"{"width": 65, "prompt": "x"}"#)).unwrap_err().to_string();
    assert!(e.contains("width"), "{e}");
    let now = stream.update_settings(patch(r#"{"guidance": 1.3}"#)).unwrap();
    assert_eq!((now.width, now.prompt.as_str()), (64, "a neon city"));
    // A seed change re-primes: the next output is a warm-up frame again.
    stream.update_settings(patch(r#"{"seed": 99}"#)).unwrap();
    stream.submit_with_id(4, Some(frame(1)));
    assert!(next(&stream).warmup);
}

#[test]
fn frames_of_another_size_are_resized_to_the_stream() {
    let engine = engine();
    let stream = engine.handle().open_stream(settings(), 8).unwrap();
    stream.submit(Some(image::RgbImage::from_pixel(200, 120, image::Rgb([10, 200, 30]))));
    let o = next(&stream);
    assert_eq!(o.image.dimensions(), (64, 64));
}

#[test]
fn offline_stream_writes_one_png_per_input_and_survives_a_bad_file() {
    let dir = std::env::temp_dir().join(format!("sdstream-offline-{}", std::process::id()));
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..4u8 {
        frame(i * 50).save(input.join(format!("f{i}.png"))).unwrap();
    }
    std::fs::write(input.join("f2b.png"), b"not a png at all").unwrap();
    let sd = sdstream::models::stable_diffusion::StableDiffusion::load(
        &common::fixture("models/tiny-sd-test").display().to_string(),
        &common::cpu_fp32(None),
    )
    .unwrap();
    let files = sdstream::stream::offline::collect_inputs(std::slice::from_ref(&input)).unwrap();
    let reports =
        sdstream::stream::offline::run_files(&sd, settings(), &files, &dir.join("out"), None).unwrap();
    assert_eq!(reports.len(), 5);
    let bad: Vec<_> = reports.iter().filter(|r| r.error.is_some()).collect();
    assert_eq!(bad.len(), 1, "only the bad file fails");
    assert!(bad[0].error.as_ref().unwrap().contains("f2b.png"), "the error names the file");
    let written: Vec<_> = reports.iter().filter_map(|r| r.output.clone()).collect();
    assert_eq!(written.len(), 4);
    assert!(written.iter().all(|p| p.exists()));
    assert!(reports[0].warmup && !reports[1].warmup);
    // Deterministic for a given seed.
    let again =
        sdstream::stream::offline::run_files(&sd, settings(), &files, &dir.join("out2"), None).unwrap();
    for (a, b) in reports.iter().zip(&again) {
        if let (Some(a), Some(b)) = (&a.output, &b.output) {
            assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two streams sharing one UNet call per tick against the same two streams in separate ticks: reports the
/// frame throughput of each (not asserted as a time: CI machines are noisy), asserts the batching itself.
#[test]
fn batched_streams_throughput_is_reported() {
    let sd = sdstream::models::stable_diffusion::StableDiffusion::load(
        &common::fixture("models/tiny-sd-test").display().to_string(),
        &common::cpu_fp32(Some(common::fixture("models/tiny-taesd-test").display().to_string())),
    )
    .unwrap();
    let mk = |seed| {
        let s = StreamSettings { seed, ..settings() };
        Stream::new(seed, &sd, s, sd.encode_text("a fox", None).unwrap(), sd.encode_text("", None).unwrap())
            .unwrap()
    };
    let img = sdstream::io::image::to_tensor(&frame(3), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let ticks = 30;
    let run = |batched: bool| {
        let (mut a, mut b) = (mk(1), mk(2));
        let t0 = Instant::now();
        for i in 0..ticks {
            if batched {
                let inputs = vec![
                    TickInput { stream: &mut a, frame_id: i, image: Some(img.shallow_clone()) },
                    TickInput { stream: &mut b, frame_id: i, image: Some(img.shallow_clone()) },
                ];
                let (_, t) = tick(&sd, inputs, false).unwrap();
                assert_eq!(t.unet_batch, 4, "both streams' two slots in one UNet call");
            } else {
                for s in [&mut a, &mut b] {
                    tick(
                        &sd,
                        vec![TickInput { stream: s, frame_id: i, image: Some(img.shallow_clone()) }],
                        false,
                    )
                    .unwrap();
                }
            }
        }
        (2 * ticks) as f64 / t0.elapsed().as_secs_f64()
    };
    let _ = run(true); // warm-up
    let serial = run(false);
    let batched = run(true);
    eprintln!(
        "tiny test model, CPU, 64x64, 2 stages: two streams one tick each {serial:.1} frames/s, batched into one UNet call \
         {batched:.1} frames/s ({:.2}x)",
        batched / serial
    );
}

/// A settings patch from JSON (as a client's `settings` message carries it).
fn patch(json: &str) -> sdstream::stream::settings::StreamSettingsPatch {
    serde_json::from_str(json).unwrap()
}
