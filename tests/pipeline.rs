//! End-to-end txt2img and img2img against diffusers' StableDiffusion(XL)Pipeline / (XL)Img2ImgPipeline:
//! every case in tests/fixtures/reference/<model>/pipeline (made by tools/make_fixtures.py and
//! tools/make_sdxl_fixtures.py: every scheduler, with and without a `timestep_spacing` override,
//! guidance 1 and > 1, negative prompts, non-square sizes), and both text-encoder key layouts. Same model, prompt and seed on CPU in fp32:
//! latents within 1e-4 (abs + rel), PNG within 2/255 per pixel.
mod common;

use common::*;
use sdstream::models::stable_diffusion::StableDiffusion;
use sdstream::pipeline::{self, GenerateParams};

fn params(case: &serde_json::Value) -> GenerateParams {
    generate_params(case, case["width"].as_i64().unwrap(), case["height"].as_i64().unwrap())
}

fn check_model(model: &str) {
    let sd = StableDiffusion::load(
        &fixture(&format!("tests/fixtures/models/{model}")).display().to_string(),
        &cpu_fp32(None),
    )
    .unwrap();
    let index = json(&format!("tests/fixtures/reference/{model}/pipeline/index.json"));
    let cases: Vec<&str> = index.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(cases.len() >= 5, "{model}: too few pipeline cases");
    for name in cases {
        let base = format!("tests/fixtures/reference/{model}/pipeline/{name}");
        let case = json(&format!("{base}.json"));
        let reference = tensors(&format!("{base}.safetensors"));
        let p = params(&case);
        let latents = match case["mode"].as_str().unwrap() {
            "txt2img" => pipeline::txt2img_latents(&sd, &p).unwrap(),
            "img2img" => {
                let input =
                    sdstream::io::image::read(&fixture(case["input_image"].as_str().unwrap())).unwrap();
                let image =
                    sdstream::io::image::to_tensor(&input, tch::Device::Cpu, tch::Kind::Float).unwrap();
                pipeline::img2img_latents(&sd, &p, &image, case["strength"].as_f64().unwrap()).unwrap()
            }
            other => panic!("{name}: unknown mode {other}"),
        };
        assert_close(&format!("{model}/{name}: latents"), &latents, &reference["latents"], 1e-4, 1e-4);
        assert_png_matches(&format!("{model}/{name}"), &sd, &latents, &format!("{base}.png"));
        // A `timestep_spacing` override (diffusers' `from_config(config, timestep_spacing=...)`) must matter for
        // every scheduler but LCM, which ignores it in diffusers too.
        if let Some(spacing) = p.timestep_spacing {
            assert_eq!(case["scheduler_config"]["timestep_spacing"], spacing.as_str(), "{name}");
            if case["mode"] == "txt2img" {
                let plain = GenerateParams { timestep_spacing: None, ..p.clone() };
                let without = pipeline::txt2img_latents(&sd, &plain).unwrap();
                let moved = max_abs_diff(&without, &latents);
                if p.scheduler == sdstream::schedulers::SchedulerKind::Lcm {
                    assert_eq!(moved, 0.0, "{model}/{name}: LCM's timesteps moved with the spacing");
                } else {
                    assert!(moved > 1e-3, "{model}/{name}: the override changed nothing");
                }
            }
        }
    }
}

#[test]
fn sd1_tiny_matches_diffusers() {
    check_model("sd1-tiny");
}

#[test]
fn sd2_tiny_matches_diffusers() {
    check_model("sd2-tiny");
}

#[test]
fn lcm_tiny_matches_diffusers() {
    check_model("lcm-tiny");
}

/// SDXL (StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline): two text encoders, pooled text and
/// time ids, force_zeros_for_empty_prompt (with and without a negative prompt, and with an empty one),
/// clip_skip, the model's own scheduler config (no SD load-time overrides), made by tools/make_sdxl_fixtures.py.
#[test]
fn sdxl_tiny_matches_diffusers() {
    check_model("sdxl-tiny");
}

/// The latents of reference case `name` of `model`'s pipeline references, generated with `sd`.
fn latents_of(sd: &StableDiffusion, model: &str, name: &str) -> tch::Tensor {
    let case = json(&format!("tests/fixtures/reference/{model}/pipeline/{name}.json"));
    let p = params(&case);
    match case["mode"].as_str().unwrap() {
        "txt2img" => pipeline::txt2img_latents(sd, &p).unwrap(),
        _ => {
            let input = sdstream::io::image::read(&fixture(case["input_image"].as_str().unwrap())).unwrap();
            let image = sdstream::io::image::to_tensor(&input, tch::Device::Cpu, tch::Kind::Float).unwrap();
            pipeline::img2img_latents(sd, &p, &image, case["strength"].as_f64().unwrap()).unwrap()
        }
    }
}

/// `<model>-flat` is `<model>` with its text encoder stored without `text_model.` (transformers 5's layout; see
/// tools/README.md): the same images, bit for bit, and diffusers' (tools/make_fixtures.py checks diffusers gives
/// the same image for both folders, so the references are `<model>`'s).
#[test]
fn both_text_encoder_layouts_give_the_same_images() {
    for model in ["sd1-tiny", "sd2-tiny"] {
        let load = |m: &str| {
            StableDiffusion::load(
                &fixture(&format!("tests/fixtures/models/{m}")).display().to_string(),
                &cpu_fp32(None),
            )
            .unwrap()
        };
        let (nested, flat) = (load(model), load(&format!("{model}-flat")));
        for name in ["txt2img_euler_g7.5_neg", "img2img_ddim_g7.5"] {
            let (a, b) = (latents_of(&nested, model, name), latents_of(&flat, model, name));
            assert!(
                a.equal(&b),
                "{model}-flat/{name}: latents differ from {model}'s by {}",
                max_abs_diff(&a, &b)
            );
            let base = format!("tests/fixtures/reference/{model}/pipeline/{name}");
            assert_close(
                &format!("{model}-flat/{name}"),
                &b,
                &tensors(&format!("{base}.safetensors"))["latents"],
                1e-4,
                1e-4,
            );
            assert_png_matches(&format!("{model}-flat/{name}"), &flat, &b, &format!("{base}.png"));
        }
    }
}

#[test]
fn bad_sizes_and_strengths_are_refused_with_the_flag_named() {
    let sd = StableDiffusion::load(
        &fixture("tests/fixtures/models/sd1-tiny").display().to_string(),
        &cpu_fp32(None),
    )
    .unwrap();
    let mut p = params(&json("tests/fixtures/reference/sd1-tiny/pipeline/txt2img_ddim_g1.0.json"));
    p.width = 100;
    let e = pipeline::txt2img(&sd, &p).unwrap_err().to_string();
    assert!(e.contains("width"), "{e}");
    p.width = 64;
    p.steps = 0;
    assert!(pipeline::txt2img(&sd, &p).unwrap_err().to_string().contains("steps"));
    p.steps = 2;
    let img = tch::Tensor::zeros([1, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
    let e = pipeline::img2img(&sd, &p, &img, 1.5).unwrap_err().to_string();
    assert!(e.contains("strength"), "{e}");
    let e = pipeline::img2img(&sd, &p, &img, 0.1).unwrap_err().to_string();
    assert!(e.contains("strength"), "{e}");
}
