//! ControlNet parity with diffusers (fixtures made by tools/make_controlnet_fixtures.py):
//! - the model: raw residuals of the tiny test ControlNets for fixed inputs (per-item timesteps, scales, guess
//!   mode, global pooling, an SD 2.x-style "bgr" ControlNet), max abs diff < 1e-5;
//! - the pipelines: StableDiffusion(XL)ControlNetPipeline / StableDiffusion(XL)ControlNetImg2ImgPipeline on
//!   the tiny models (SDXL included, with an SDXL ControlNet), same seed on CPU fp32: latents within 1e-4 (abs + rel), PNG within 2/255 per pixel;
//! - bad inputs give errors naming what is wrong.
mod common;

use common::*;
use sdstream::models::controlnet::{ControlNetConfig, ControlNetModel, ControlScale};
use sdstream::models::stable_diffusion::{LoadOptions, StableDiffusion};
use sdstream::models::unet::AddedCond;
use sdstream::models::Weights;
use sdstream::pipeline::{self, Control};
use tch::{Device, Kind, Tensor};

fn model_dir(name: &str) -> String {
    fixture(&format!("tests/fixtures/models/{name}")).display().to_string()
}

fn check_residuals(
    what: &str,
    got: &sdstream::models::unet::ControlResiduals,
    refs: &std::collections::HashMap<String, Tensor>,
    prefix: &str,
) {
    let n = refs.keys().filter(|k| k.starts_with(&format!("{prefix}.down."))).count();
    assert!(n > 0, "{what}: no reference residuals");
    assert_eq!(got.down.len(), n, "{what}: number of down residuals");
    for (i, d) in got.down.iter().enumerate() {
        let want = &refs[&format!("{prefix}.down.{i}")];
        assert!(want.abs().max().double_value(&[]) > 1e-3, "{what}: reference residual {i} is all zeros");
        assert_max_abs(&format!("{what} down.{i}"), d, want, 1e-5);
    }
    assert_max_abs(&format!("{what} mid"), &got.mid, &refs[&format!("{prefix}.mid")], 1e-5);
}

#[test]
fn controlnet_residuals_match_diffusers() {
    let _g = tch::no_grad_guard();
    for name in ["controlnet-tiny", "controlnet-sd2-tiny", "controlnet-lcm-tiny", "controlnet-sdxl-tiny"] {
        let net = ControlNetModel::load(&model_dir(name), Device::Cpu, Kind::Float).unwrap();
        let refs = tensors(&format!("tests/fixtures/reference/controlnet/model_{name}.safetensors"));
        // SDXL ControlNets take the pooled text and time ids, like the SDXL UNet.
        let added = refs.get("text_embeds").map(|te| AddedCond {
            text_embeds: te.shallow_clone(),
            time_ids: refs["time_ids"].shallow_clone(),
        });
        assert_eq!(added.is_some(), name == "controlnet-sdxl-tiny");
        let run = |scale: ControlScale, guess: bool| {
            net.forward(
                &refs["sample"],
                &refs["timesteps"],
                &refs["encoder_hidden_states"],
                added.as_ref(),
                &refs["cond"],
                scale,
                guess,
            )
            .unwrap()
        };
        check_residuals(&format!("{name} plain"), &run(ControlScale::One(1.0), false), &refs, "plain");
        check_residuals(&format!("{name} scaled"), &run(ControlScale::One(0.7), false), &refs, "scaled");
        check_residuals(&format!("{name} guess"), &run(ControlScale::One(0.7), true), &refs, "guess");
        // One scale per batch item (a stream batch mixing clients) gives the same as one for all.
        check_residuals(
            &format!("{name} per-item"),
            &run(ControlScale::PerItem(&[0.7, 0.7]), false),
            &refs,
            "scaled",
        );
        check_residuals(
            &format!("{name} per-item guess"),
            &run(ControlScale::PerItem(&[0.7, 0.7]), true),
            &refs,
            "guess",
        );
        if name == "controlnet-tiny" {
            // global_pool_conditions: same weights, the config flag on.
            let dir = fixture("tests/fixtures/models/controlnet-tiny");
            let mut config = ControlNetConfig::from_file(dir.join("config.json")).unwrap();
            config.global_pool_conditions = true;
            let w = Weights::from_safetensors(
                &[dir.join("diffusion_pytorch_model.safetensors")],
                Device::Cpu,
                Kind::Float,
            )
            .unwrap();
            let pooled = ControlNetModel::new(&w, &config).unwrap();
            assert!(pooled.forces_guess_mode());
            let r = pooled
                .forward(
                    &refs["sample"],
                    &refs["timesteps"],
                    &refs["encoder_hidden_states"],
                    None,
                    &refs["cond"],
                    ControlScale::One(0.7),
                    true,
                )
                .unwrap();
            check_residuals("controlnet-tiny pooled", &r, &refs, "pooled");
        }
    }
}

#[test]
fn parameter_count_matches_the_weights() {
    let dir = fixture("tests/fixtures/models/controlnet-tiny");
    let config = ControlNetConfig::from_file(dir.join("config.json")).unwrap();
    let n = sdstream::models::controlnet::parameter_count(&config).unwrap();
    let stored: i64 = read_tensors(&dir.join("diffusion_pytorch_model.safetensors"))
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(n, stored);
}

fn control_of(case: &serde_json::Value) -> Control {
    let img = sdstream::io::image::read(&fixture(case["control_image"].as_str().unwrap())).unwrap();
    let image =
        pipeline::control_image(&img, case["width"].as_i64().unwrap(), case["height"].as_i64().unwrap())
            .unwrap();
    Control {
        image,
        scale: case["controlnet_scale"].as_f64().unwrap(),
        guess_mode: case["guess_mode"].as_bool().unwrap(),
        guidance_start: case["control_guidance_start"].as_f64().unwrap(),
        guidance_end: case["control_guidance_end"].as_f64().unwrap(),
    }
}

fn load_with(model: &str, controlnet: &str) -> StableDiffusion {
    let opts = LoadOptions { controlnet: Some(model_dir(controlnet)), ..cpu_fp32(None) };
    StableDiffusion::load(&model_dir(model), &opts).unwrap()
}

fn check_pipeline(model: &str, controlnet: &str) {
    let sd = load_with(model, controlnet);
    let dir = format!("tests/fixtures/reference/controlnet/{model}");
    let index = json(&format!("{dir}/index.json"));
    let cases: Vec<&str> = index.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(!cases.is_empty());
    for name in cases {
        let base = format!("{dir}/{name}");
        let case = json(&format!("{base}.json"));
        let reference = tensors(&format!("{base}.safetensors"));
        let p = generate_params(&case, case["width"].as_i64().unwrap(), case["height"].as_i64().unwrap());
        let control = control_of(&case);
        let latents = match case["mode"].as_str().unwrap() {
            "txt2img" => pipeline::txt2img_latents_with(&sd, &p, Some(&control)).unwrap(),
            "img2img" => {
                let input =
                    sdstream::io::image::read(&fixture(case["input_image"].as_str().unwrap())).unwrap();
                let image = sdstream::io::image::to_tensor(&input, Device::Cpu, Kind::Float).unwrap();
                let strength = case["strength"].as_f64().unwrap();
                pipeline::img2img_latents_with(&sd, &p, &image, strength, Some(&control)).unwrap()
            }
            other => panic!("{name}: unknown mode {other}"),
        };
        assert_close(&format!("{model}/{name}: latents"), &latents, &reference["latents"], 1e-4, 1e-4);
        assert_png_matches(&format!("{model}/{name}"), &sd, &latents, &format!("{base}.png"));
        // The ControlNet matters: without it the latents differ.
        if case["mode"] == "txt2img" {
            let plain = pipeline::txt2img_latents(&sd, &p).unwrap();
            assert!(max_abs_diff(&plain, &latents) > 1e-3, "{name}: the ControlNet changed nothing");
        }
    }
}

#[test]
fn sd1_tiny_controlnet_pipelines_match_diffusers() {
    check_pipeline("sd1-tiny", "controlnet-tiny");
}

#[test]
fn lcm_tiny_controlnet_pipelines_match_diffusers() {
    check_pipeline("lcm-tiny", "controlnet-lcm-tiny");
}

/// StableDiffusionXLControlNetPipeline / StableDiffusionXLControlNetImg2ImgPipeline.
#[test]
fn sdxl_tiny_controlnet_pipelines_match_diffusers() {
    check_pipeline("sdxl-tiny", "controlnet-sdxl-tiny");
}

#[test]
fn bad_inputs_are_refused_clearly() {
    // A ControlNet made for another cross-attention width (SD 2.x-style for an SD 1.x model).
    let opts = LoadOptions { controlnet: Some(model_dir("controlnet-sd2-tiny")), ..cpu_fp32(None) };
    let e = StableDiffusion::load(&model_dir("sd1-tiny"), &opts).err().unwrap().to_string();
    assert!(e.contains("cross_attention_dim"), "{e}");
    // Not a ControlNet at all.
    let opts = LoadOptions { controlnet: Some(model_dir("taesd-tiny")), ..cpu_fp32(None) };
    let e = StableDiffusion::load(&model_dir("sd1-tiny"), &opts).err().unwrap().to_string();
    assert!(e.contains("ControlNetModel"), "{e}");

    let sd = load_with("sd1-tiny", "controlnet-tiny");
    let case = json("tests/fixtures/reference/controlnet/sd1-tiny/txt2img_ddim_g1.0_s1.0.json");
    let p = generate_params(&case, 64, 64);
    // A control image of the wrong size.
    let mut c = control_of(&case);
    c.image = Tensor::zeros([1, 3, 32, 64], (Kind::Float, Device::Cpu));
    let e = pipeline::txt2img_latents_with(&sd, &p, Some(&c)).unwrap_err().to_string();
    assert!(e.contains("control image") && e.contains("64x32"), "{e}");
    // A bad guidance window.
    let mut c = control_of(&case);
    c.guidance_start = 0.8;
    c.guidance_end = 0.2;
    let e = pipeline::txt2img_latents_with(&sd, &p, Some(&c)).unwrap_err().to_string();
    assert!(e.contains("start"), "{e}");
    // A control image without a ControlNet.
    let plain = StableDiffusion::load(&model_dir("sd1-tiny"), &cpu_fp32(None)).unwrap();
    let e = pipeline::txt2img_latents_with(&plain, &p, Some(&control_of(&case))).unwrap_err().to_string();
    assert!(e.contains("--controlnet"), "{e}");
    // An SDXL ControlNet for an SD 1.x model, and an SD 1.x ControlNet for an SDXL model.
    let opts = LoadOptions { controlnet: Some(model_dir("controlnet-sdxl-tiny")), ..cpu_fp32(None) };
    let e = StableDiffusion::load(&model_dir("sd1-tiny"), &opts).err().unwrap().to_string();
    assert!(e.contains("controlnet"), "{e}");
    let opts = LoadOptions { controlnet: Some(model_dir("controlnet-tiny")), ..cpu_fp32(None) };
    let e = StableDiffusion::load(&model_dir("sdxl-tiny"), &opts).err().unwrap().to_string();
    assert!(e.contains("controlnet"), "{e}");
    // Unsupported configs are refused naming the field.
    let config = ControlNetConfig { addition_embed_type: Some("image".into()), ..Default::default() };
    let e = config.unet_config().unwrap_err().to_string();
    assert!(e.contains("addition_embed_type"), "{e}");
    let config =
        ControlNetConfig { controlnet_conditioning_channel_order: "grb".into(), ..Default::default() };
    let e = config.unet_config().unwrap_err().to_string();
    assert!(e.contains("controlnet_conditioning_channel_order"), "{e}");
    let config = ControlNetConfig { class_embed_type: Some("timestep".into()), ..Default::default() };
    let e = config.unet_config().unwrap_err().to_string();
    assert!(e.contains("controlnet config `class_embed_type`"), "{e}");
}

#[test]
fn cli_runs_controlnet_and_refuses_bad_input() {
    let out = std::env::temp_dir().join(format!("sdstream-controlnet-{}.png", std::process::id()));
    let out_s = out.display().to_string();
    let base = [
        "--model",
        "tests/fixtures/models/sd1-tiny",
        "--device",
        "cpu",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        out_s.as_str(),
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["txt2img".into()];
        v.extend(base.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| run_sdstream(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let control = "tests/fixtures/reference/controlnet/control_96x64.png";
    let (ok, text) = run(with(&[
        "--controlnet",
        "tests/fixtures/models/controlnet-tiny",
        "--control-image",
        control,
        "--controlnet-scale",
        "0.8",
    ]));
    assert!(ok, "{text}");
    assert_eq!(image::image_dimensions(&out).unwrap(), (64, 64));
    let _ = std::fs::remove_file(&out);

    let (ok, text) = run(with(&["--controlnet", "tests/fixtures/models/controlnet-tiny"]));
    assert!(!ok && text.contains("--control-image"), "{text}");
    let (ok, text) = run(with(&["--control-image", control]));
    assert!(!ok && text.contains("--controlnet"), "{text}");
    let (ok, text) =
        run(with(&["--controlnet", "tests/fixtures/models/controlnet-sd2-tiny", "--control-image", control]));
    assert!(!ok && text.contains("cross_attention_dim"), "{text}");
    let (ok, text) = run(with(&[
        "--controlnet",
        "tests/fixtures/models/controlnet-tiny",
        "--control-image",
        "/no/such.png",
    ]));
    assert!(!ok && text.contains("/no/such.png"), "{text}");
}

/// The daemon: a client switches its stream to `control: "image"`, sends a control image (announced with a
/// `control_image` message), gets it acknowledged, and frames come back; garbage as a control image is a
/// non-fatal `bad_control_image` error; `control` without a ControlNet loaded is a `bad_setting`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_accepts_control_images() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

    let load = LoadOptions { controlnet: Some(model_dir("controlnet-tiny")), ..cpu_fp32(None) };
    let mut c = sdstream::engine::EngineConfig::new(model_dir("sd1-tiny"), load);
    c.max_streams = 4;
    let engine = sdstream::engine::Engine::start(c).unwrap();
    let config = sdstream::config::ServerConfig {
        listen: "127.0.0.1:0".into(),
        max_fps: 1000.0,
        ..sdstream::config::ServerConfig::default()
    };
    let defaults = sdstream::stream::settings::StreamSettings {
        width: 64,
        height: 64,
        t_index_list: vec![32, 45],
        ..Default::default()
    };
    let server = sdstream::server::Server::start(engine.handle(), engine.info.clone(), config, defaults)
        .await
        .unwrap();
    let url = format!("ws://{}/ws", server.local_addr);
    let (mut ws, _) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    let next_json = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> serde_json::Value {
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] != "stats" {
                        return v;
                    }
                }
                Some(Ok(Message::Binary(_))) => return serde_json::json!({"type": "binary"}),
                other => panic!("connection ended: {other:?}"),
            }
        }
    };
    assert_eq!(next_json(&mut ws).await["type"], "ready");
    ws.send(Message::text(r#"{"type":"settings","control":"image","controlnet_scale":0.8}"#)).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(v["settings"]["control"], "image", "{v}");
    let png = std::fs::read(fixture("tests/fixtures/reference/controlnet/control_96x64.png")).unwrap();
    ws.send(Message::text(r#"{"type":"control_image"}"#)).await.unwrap();
    ws.send(Message::binary(png)).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!((v["type"].as_str(), v["width"].as_u64()), (Some("control_image"), Some(96)), "{v}");
    ws.send(Message::text(r#"{"type":"control_image"}"#)).await.unwrap();
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!((v["code"].as_str(), v["fatal"].as_bool()), (Some("bad_control_image"), Some(false)), "{v}");
    let frame = std::fs::read(fixture("tests/fixtures/reference/input_64.png")).unwrap();
    for _ in 0..2 {
        ws.send(Message::binary(frame.clone())).await.unwrap();
        let v = next_json(&mut ws).await;
        assert_eq!(v["type"], "frame", "{v}");
        assert_eq!(next_json(&mut ws).await["type"], "binary");
    }
    ws.send(Message::text(r#"{"type":"settings","control":"canny","canny_low":50}"#)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["settings"]["control"], "canny");
    ws.send(Message::binary(frame)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "frame");
    drop(ws);
    server.shutdown(std::time::Duration::from_secs(5)).await;
}
