//! The stream engine against StreamDiffusion: fixtures from tools/make_stream_fixtures.py, which follows
//! StreamDiffusion's pipeline.py step by step and is verified there against the real `streamdiffusion`
//! package (max difference 0); its SDXL cases (pooled text and time ids per UNet row) extend that algorithm
//! the way StreamDiffusion's SDXL forks do, and are checked against the reference alone. Tolerance: atol 1e-4 + rtol 1e-4 (the reference feeds the VAE an NHWC-strided
//! view, which alone moves results by ~1e-5).
mod common;

use common::*;
use sdstream::models::stable_diffusion::StableDiffusion;
use sdstream::schedulers::TimestepSpacing;
use sdstream::stream::batch::{tick, TickInput};
use sdstream::stream::settings::StreamSettings;
use sdstream::stream::Stream;
use std::collections::HashMap;
use tch::Tensor;

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

fn load(case: &serde_json::Value) -> StableDiffusion {
    let model = case["model"].as_str().unwrap();
    let vae = case["vae"].as_str().map(|v| fixture(v).display().to_string());
    StableDiffusion::load(&fixture(model).display().to_string(), &cpu_fp32(vae)).unwrap()
}

fn settings(case: &serde_json::Value) -> StreamSettings {
    stream_case_settings(case)
}

fn frame_tensor(rel: &str) -> Tensor {
    let img = sdstream::io::image::read(&fixture(rel)).unwrap();
    sdstream::io::image::to_tensor(&img, tch::Device::Cpu, tch::Kind::Float).unwrap()
}

fn run_case(name: &str) {
    run_case_with(name, None)
}

/// Runs stream case `name` with `timestep_spacing` set to `spacing`.
fn run_case_with(name: &str, spacing: Option<TimestepSpacing>) {
    let case = json(&format!("tests/fixtures/stream/{name}.json"));
    let reference = tensors(&format!("tests/fixtures/stream/{name}.safetensors"));
    let sd = load(&case);
    let s = StreamSettings { timestep_spacing: spacing, ..settings(&case) };
    let cond = sd.encode_text(&s.prompt, None).unwrap();
    assert_close(&format!("{name}: prompt_embeds"), &cond.hidden, &reference["prompt_embeds"], ATOL, RTOL);
    if let Some(want) = reference.get("pooled_prompt_embeds") {
        assert_close(&format!("{name}: pooled"), cond.pooled.as_ref().unwrap(), want, ATOL, RTOL);
    }
    let uncond = sd.encode_text(&s.negative_prompt, None).unwrap();
    let mut stream = Stream::new(0, &sd, s, cond, uncond).unwrap();
    let frames: Vec<Option<String>> = case["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().map(|p| format!("tests/fixtures/stream/{p}")))
        .collect();
    let warmup = case["warmup_frames"].as_u64().unwrap();
    for (i, frame) in frames.iter().enumerate() {
        let image = frame.as_deref().map(frame_tensor);
        let (outs, _) =
            tick(&sd, vec![TickInput { stream: &mut stream, frame_id: i as u64, image }], false).unwrap();
        let out = &outs[0];
        assert_eq!(out.warmup, (i as u64) < warmup, "{name}: frame {i} warm-up flag");
        if !out.warmup {
            assert_eq!(out.answers, i as u64 - warmup, "{name}: frame {i} answers the wrong input");
        }
        let latent = stream.last_latent().expect("a latent after a tick");
        assert_close(
            &format!("{name}: latent_out_{i}"),
            &latent,
            &reference[&format!("latent_out_{i}")],
            ATOL,
            RTOL,
        );
        if let Some(want) = reference.get(&format!("image_out_{i}")) {
            assert_close(&format!("{name}: image_out_{i}"), out.image.as_ref().unwrap(), want, 1e-3, 1e-3);
        }
    }
}

#[test]
fn every_streamdiffusion_case_matches() {
    let dir = fixture("tests/fixtures/stream");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".json") && n != "similar_filter.json")
        .map(|n| n.trim_end_matches(".json").to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 20, "expected the 20 stream cases, found {}", names.len());
    assert!(names.iter().any(|n| n.starts_with("sdxl_")), "the SDXL stream cases are missing");
    for name in &names {
        run_case(name);
    }
}

/// The stream builds its 50-step LCM schedule as `LCMScheduler.from_config(config, timestep_spacing=...)` would:
/// diffusers' LCMScheduler ignores the option, so with any override the stream still gives StreamDiffusion's
/// frames (the schedule itself is checked against diffusers in tests/schedulers.rs).
#[test]
fn a_timestep_spacing_override_leaves_the_stream_as_diffusers_would() {
    for spacing in [TimestepSpacing::Trailing, TimestepSpacing::Linspace, TimestepSpacing::Leading] {
        run_case_with("sd1_img2img_n2_self", Some(spacing));
    }
    run_case_with("lcm_img2img_n2_self", Some(TimestepSpacing::Trailing));
}

#[test]
fn similarity_filter_matches_streamdiffusion() {
    let spec = json("tests/fixtures/stream/similar_filter.json");
    for sc in spec["scenarios"].as_array().unwrap() {
        let name = sc["name"].as_str().unwrap();
        let mut filter = sdstream::stream::similarity::SimilarityFilter::new(0);
        let samples: Vec<f64> =
            sc["samples"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let mut next = samples.into_iter();
        for (i, (input, want)) in
            sc["inputs"].as_array().unwrap().iter().zip(sc["expected"].as_array().unwrap()).enumerate()
        {
            let x = frame_tensor(&format!("tests/fixtures/stream/{}", input.as_str().unwrap()));
            let d = filter
                .decide(
                    &x,
                    sc["threshold"].as_f64().unwrap(),
                    sc["max_skip_frame"].as_u64().unwrap() as u32,
                    || next.next().expect("a recorded sample per call"),
                )
                .unwrap();
            assert_eq!(d.skip, want["skipped"].as_bool().unwrap(), "{name}: call {i}");
            if let Some(p) = want["skip_prob"].as_f64() {
                assert!(
                    (d.skip_probability - p).abs() < 1e-4,
                    "{name}: call {i} skip probability {} vs {p}",
                    d.skip_probability
                );
            }
        }
    }
}

/// Two streams batched into one UNet call give what each gives alone, and never each other's frames.
#[test]
fn batched_streams_keep_their_own_outputs() {
    let case = json("tests/fixtures/stream/sd1_img2img_n2_self.json");
    let sd = load(&case);
    let mk = |seed: u64, prompt: &str| {
        let mut s = settings(&case);
        s.seed = seed;
        s.prompt = prompt.into();
        let cond = sd.encode_text(prompt, None).unwrap();
        let uncond = sd.encode_text("", None).unwrap();
        Stream::new(seed, &sd, s, cond, uncond).unwrap()
    };
    let frames: Vec<Tensor> =
        (0..4).map(|i| frame_tensor(&format!("tests/fixtures/stream/frames/frame_00{i}.png"))).collect();
    let reversed: Vec<Tensor> = frames.iter().rev().map(|t| t.shallow_clone()).collect();
    let run_alone = |seed, prompt, inputs: &[Tensor]| {
        let mut s = mk(seed, prompt);
        inputs
            .iter()
            .enumerate()
            .map(|(i, f)| {
                tick(
                    &sd,
                    vec![TickInput { stream: &mut s, frame_id: i as u64, image: Some(f.shallow_clone()) }],
                    false,
                )
                .unwrap()
                .0
                .remove(0)
                .image
                .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let alone_a = run_alone(7, "a cat", &frames);
    let alone_b = run_alone(8, "a dog", &reversed);
    let (mut a, mut b) = (mk(7, "a cat"), mk(8, "a dog"));
    for i in 0..frames.len() {
        let inputs = vec![
            TickInput { stream: &mut b, frame_id: i as u64, image: Some(reversed[i].shallow_clone()) },
            TickInput { stream: &mut a, frame_id: i as u64, image: Some(frames[i].shallow_clone()) },
        ];
        let (outs, timings) = tick(&sd, inputs, false).unwrap();
        assert_eq!(timings.unet_batch, 4, "both streams' slots in one UNet call");
        let by_id: HashMap<u64, &Tensor> =
            outs.iter().map(|o| (o.stream_id, o.image.as_ref().unwrap())).collect();
        assert_close(&format!("stream a frame {i}"), by_id[&7], &alone_a[i], 1e-4, 1e-4);
        assert_close(&format!("stream b frame {i}"), by_id[&8], &alone_b[i], 1e-4, 1e-4);
        assert!(max_abs_diff(by_id[&7], by_id[&8]) > 1e-3, "the two streams' outputs must differ");
    }
}

/// ControlNet streams (tools/make_stream_fixtures.py's ControlNet cases, diffusers' ControlNetModel on the same
/// per-slot inputs): each slot denoises with its own frame's control image (client-sent, none for frame 0),
/// and `controlnet_scale` changes live between frames without a re-prime. The SDXL case gives the ControlNet
/// each row's pooled text and time ids too.
#[test]
fn controlnet_streams_match_the_reference() {
    for name in [
        "sd1_img2img_n2_self_controlnet_image",
        "sd1_img2img_n3_full_controlnet_image",
        "sdxl_img2img_n2_full_controlnet_image",
    ] {
        let case = json(&format!("tests/fixtures/stream/controlnet/{name}.json"));
        let reference = tensors(&format!("tests/fixtures/stream/controlnet/{name}.safetensors"));
        let controlnet = Some(fixture(case["controlnet"].as_str().unwrap()).display().to_string());
        let opts = sdstream::models::stable_diffusion::LoadOptions { controlnet, ..cpu_fp32(None) };
        let sd =
            StableDiffusion::load(&fixture(case["model"].as_str().unwrap()).display().to_string(), &opts)
                .unwrap();
        let mut s = settings(&case);
        s.control = sdstream::stream::settings::ControlSource::Image;
        let cond = sd.encode_text(&s.prompt, None).unwrap();
        let uncond = sd.encode_text(&s.negative_prompt, None).unwrap();
        let mut stream = Stream::new(0, &sd, s, cond, uncond).unwrap();
        let scales = case["controlnet_scales"].as_array().unwrap();
        let last = case["num_frames"].as_u64().unwrap() as usize - 1;
        for (i, frame) in case["frames"].as_array().unwrap().iter().enumerate() {
            let patch = sdstream::stream::settings::StreamSettingsPatch {
                controlnet_scale: scales[i].as_f64(),
                ..Default::default()
            };
            let next = stream.settings().patched(&patch).unwrap();
            assert!(!stream.settings().needs_reprime(&next), "a scale change must not re-prime");
            stream.apply_settings(&sd, next).unwrap();
            if let Some(c) = case["control_images"][i].as_str() {
                let img = sdstream::io::image::read(&fixture(&format!("tests/fixtures/stream/{c}"))).unwrap();
                stream.set_control_image(&img).unwrap();
            }
            let image = Some(frame_tensor(&format!("tests/fixtures/stream/{}", frame.as_str().unwrap())));
            let (outs, _) =
                tick(&sd, vec![TickInput { stream: &mut stream, frame_id: i as u64, image }], false).unwrap();
            let latent = stream.last_latent().unwrap();
            assert_close(
                &format!("{name}: latent_out_{i}"),
                &latent,
                &reference[&format!("latent_out_{i}")],
                ATOL,
                RTOL,
            );
            if i == last {
                let want = &reference[&format!("image_out_{i}")];
                assert_close(
                    &format!("{name}: image_out_{i}"),
                    outs[0].image.as_ref().unwrap(),
                    want,
                    1e-3,
                    1e-3,
                );
            }
        }
    }
}

/// Two ControlNet streams (different control sources and scales) and one without, in one tick: one UNet and
/// one ControlNet call, and each stream gets what it gets alone.
#[test]
fn controlnet_streams_batch_with_others() {
    use sdstream::stream::settings::ControlSource;
    let case = json("tests/fixtures/stream/controlnet/sd1_img2img_n2_self_controlnet_image.json");
    let opts = sdstream::models::stable_diffusion::LoadOptions {
        controlnet: Some(fixture("tests/fixtures/models/controlnet-tiny").display().to_string()),
        ..cpu_fp32(None)
    };
    let sd = StableDiffusion::load(&fixture("tests/fixtures/models/sd1-tiny").display().to_string(), &opts)
        .unwrap();
    let control_png =
        sdstream::io::image::read(&fixture("tests/fixtures/stream/controlnet/control_002.png")).unwrap();
    let mk = |seed: u64, control: ControlSource, scale: f64| {
        let mut s = settings(&case);
        s.seed = seed;
        s.control = control;
        s.controlnet_scale = scale;
        let cond = sd.encode_text(&s.prompt, None).unwrap();
        let uncond = sd.encode_text("", None).unwrap();
        let mut st = Stream::new(seed, &sd, s, cond, uncond).unwrap();
        if control == ControlSource::Image {
            st.set_control_image(&control_png).unwrap();
        }
        st
    };
    let frames: Vec<Tensor> =
        (0..3).map(|i| frame_tensor(&format!("tests/fixtures/stream/frames/frame_00{i}.png"))).collect();
    let specs =
        [(7, ControlSource::Image, 1.0), (8, ControlSource::None, 1.0), (9, ControlSource::Canny, 0.5)];
    let alone: Vec<Vec<Tensor>> = specs
        .iter()
        .map(|&(seed, c, scale)| {
            let mut s = mk(seed, c, scale);
            frames
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let input =
                        TickInput { stream: &mut s, frame_id: i as u64, image: Some(f.shallow_clone()) };
                    tick(&sd, vec![input], false).unwrap().0.remove(0).image.unwrap()
                })
                .collect()
        })
        .collect();
    let mut streams: Vec<Stream> = specs.iter().map(|&(seed, c, scale)| mk(seed, c, scale)).collect();
    for (i, f) in frames.iter().enumerate() {
        let inputs = streams
            .iter_mut()
            .map(|s| TickInput { stream: s, frame_id: i as u64, image: Some(f.shallow_clone()) })
            .collect();
        let (outs, timings) = tick(&sd, inputs, false).unwrap();
        assert_eq!(timings.unet_batch, 6);
        for (o, want) in outs.iter().zip(&alone) {
            assert_close(
                &format!("stream {} frame {i}", o.stream_id),
                o.image.as_ref().unwrap(),
                &want[i],
                1e-4,
                1e-4,
            );
        }
    }
    // The control changes the output (after the warm-up frame): the Image stream differs from a stream with
    // the same seed and none.
    let mut plain = mk(7, ControlSource::None, 1.0);
    let mut out = None;
    for (i, f) in frames.iter().enumerate() {
        let input = TickInput { stream: &mut plain, frame_id: i as u64, image: Some(f.shallow_clone()) };
        out = tick(&sd, vec![input], false).unwrap().0.remove(0).image;
    }
    assert!(max_abs_diff(&out.unwrap(), &alone[0][2]) > 1e-3);
    // control without a ControlNet is refused, naming the setting.
    let plain_sd = StableDiffusion::load(
        &fixture("tests/fixtures/models/sd1-tiny").display().to_string(),
        &cpu_fp32(None),
    )
    .unwrap();
    let mut s = settings(&case);
    s.control = ControlSource::Canny;
    let cond = plain_sd.encode_text("", None).unwrap();
    let e = Stream::new(0, &plain_sd, s, cond.shallow_clone(), cond).err().unwrap().to_string();
    assert!(e.contains("control") && e.contains("--controlnet"), "{e}");
}
