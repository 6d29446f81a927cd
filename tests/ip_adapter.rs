//! IP-Adapter parity with diffusers 0.42.1 (fixtures made by tools/make_ip_adapter_fixtures.py: random-weight
//! TEST adapters and TEST CLIP vision encoders for the tiny models):
//! - the image encoder's preprocessing (transformers' CLIPImageProcessor, PIL backend) bit for bit, and its
//!   outputs (`image_embeds`, the penultimate hidden states) within 1e-5;
//! - the projections (plain and plus) and the negative "no image" tokens, within 1e-5; both key layouts give the
//!   same adapter;
//! - the UNet with the decoupled cross-attention at scales 1, 0.5, 0 and a per-block dictionary, within 1e-5;
//! - StableDiffusion(XL)Pipeline / ...Img2ImgPipeline with `ip_adapter_image` on sd1-tiny and sdxl-tiny, plain
//!   and plus, same seed on CPU fp32: latents within 1e-4 (abs + rel), PNG within 2/255 per pixel;
//! - per-row scales: rows without an image (scale 0) share a UNet call with rows that have one, and a stream
//!   batch with and without an image prompt gives each stream what it gets alone;
//! - the CLI (`txt2img`: diffusers' picture; `stream`) and `sdstream bench --ip-adapter`'s rows;
//! - bad input (a non-image, an adapter for another model family, a pickle) gets a clear error.
mod common;

use common::*;
use sdstream::models::clip_vision::ClipVisionModel;
use sdstream::models::ip_adapter::{layer_scales, IpScale};
use sdstream::models::stable_diffusion::StableDiffusion;
use sdstream::models::unet::{AddedCond, ImageCond, UNetExtra};
use sdstream::pipeline::{self, Guides, ImagePrompt};
use tch::{Device, Kind, Tensor};

const IP: &str = "tests/fixtures/ip_adapter";
const IP_IMAGE: &str = "tests/fixtures/ip_adapter/reference/ip_image_40x56.png";

fn model_dir(name: &str) -> String {
    fixture(&format!("tests/fixtures/models/{name}")).display().to_string()
}

fn family_model(family: &str) -> &'static str {
    if family == "sdxl" {
        "sdxl-tiny"
    } else {
        "sd1-tiny"
    }
}

fn adapters(family: &str) -> Vec<&'static str> {
    if family == "sdxl" {
        vec!["ip-adapter_sdxl-tiny", "ip-adapter-plus_sdxl-tiny"]
    } else {
        vec!["ip-adapter_sd15-tiny", "ip-adapter-plus_sd15-tiny"]
    }
}

fn load(family: &str, adapter_file: &str) -> StableDiffusion {
    let mut sd = StableDiffusion::load(&model_dir(family_model(family)), &cpu_fp32(None)).unwrap();
    let path = fixture(&format!("{IP}/{family}/{adapter_file}")).display().to_string();
    sd.load_ip_adapter(&path, None).unwrap();
    sd
}

fn ip_image() -> image::RgbImage {
    sdstream::io::image::read(&fixture(IP_IMAGE)).unwrap()
}

#[test]
fn preprocessing_and_encoder_match_transformers() {
    let _g = tch::no_grad_guard();
    for family in ["sd15", "sdxl"] {
        let enc = ClipVisionModel::load(
            &fixture(&format!("{IP}/{family}/image_encoder")),
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        let refs = tensors(&format!("{IP}/reference/{family}/{}.safetensors", adapters(family)[0]));
        let pixels = enc.preprocess(&ip_image()).unwrap();
        assert_max_abs(&format!("{family} pixel_values"), &pixels, &refs["pixel_values"], 1e-6);
        let square = sdstream::io::image::read(&fixture("tests/fixtures/reference/input_64.png")).unwrap();
        let sq = enc.preprocess(&square).unwrap();
        assert_max_abs(&format!("{family} pixel_values 64x64"), &sq, &refs["pixel_values_input_64"], 1e-6);
        let x = &refs["pixel_values"];
        assert_max_abs(
            &format!("{family} image_embeds"),
            &enc.image_embeds(x).unwrap(),
            &refs["encoder.image_embeds"],
            1e-5,
        );
        assert_max_abs(
            &format!("{family} penultimate"),
            &enc.penultimate(x).unwrap(),
            &refs["encoder.penultimate"],
            1e-5,
        );
        assert_max_abs(
            &format!("{family} last_hidden_state"),
            &enc.last_hidden_state(x).unwrap(),
            &refs["encoder.last_hidden_state"],
            1e-5,
        );
    }
}

/// The UNet output for the reference's inputs with `tokens` (B, T, D) at `scale` on every row.
fn unet_with(
    sd: &StableDiffusion,
    refs: &std::collections::HashMap<String, Tensor>,
    scale: &IpScale,
) -> Tensor {
    let model = sd.image_prompt.as_ref().unwrap();
    let tokens = Tensor::cat(&[&refs["negative_tokens"], &refs["tokens"]], 0);
    let per_layer = sd.ip_layer_scales(scale).unwrap();
    let image = ImageCond { layers: model.adapter.layers(), tokens, scales: vec![per_layer; 2] };
    let added = refs
        .get("text_embeds")
        .map(|te| AddedCond { text_embeds: te.shallow_clone(), time_ids: refs["time_ids"].shallow_clone() });
    let extra = UNetExtra { added_cond: added.as_ref(), image: Some(&image), ..Default::default() };
    sd.unet.forward_with(&refs["sample"], &refs["timesteps"], &refs["encoder_hidden_states"], &extra).unwrap()
}

fn per_block() -> IpScale {
    IpScale::from_json(
        &serde_json::json!({"down": {"block_1": [0.0, 1.0]}, "up": {"block_0": [0.5, 1.0, 0.0]}, "mid": 0.8}),
    )
    .unwrap()
}

#[test]
fn projections_and_unet_match_diffusers_in_both_key_layouts() {
    let _g = tch::no_grad_guard();
    for family in ["sd15", "sdxl"] {
        for adapter in adapters(family) {
            let refs = tensors(&format!("{IP}/reference/{family}/{adapter}.safetensors"));
            let mut files = vec![format!("{adapter}.safetensors")];
            if family == "sd15" {
                files.push(format!("{adapter}.diffusers.safetensors"));
            }
            let mut outputs = Vec::new();
            for file in files {
                let what = format!("{family}/{file}");
                let sd = load(family, &file);
                let model = sd.image_prompt.as_ref().unwrap();
                let e = model.embed(&ip_image()).unwrap();
                assert_max_abs(&format!("{what} tokens"), &e.cond, &refs["tokens"], 1e-5);
                assert_max_abs(&format!("{what} negative tokens"), &e.uncond, &refs["negative_tokens"], 1e-5);
                let proj = model.adapter.project(&refs["image_embeds"]).unwrap();
                assert_max_abs(
                    &format!("{what} projection of the reference embeds"),
                    &proj,
                    &refs["tokens"],
                    1e-5,
                );
                let mut outs = Vec::new();
                for (label, scale) in [
                    ("scale1", IpScale::One(1.0)),
                    ("scale0.5", IpScale::One(0.5)),
                    ("scale0", IpScale::One(0.0)),
                    ("per_block", per_block()),
                ] {
                    let out = unet_with(&sd, &refs, &scale);
                    assert_max_abs(
                        &format!("{what} unet {label}"),
                        &out,
                        &refs[&format!("unet.{label}")],
                        1e-5,
                    );
                    outs.push(out);
                }
                assert!(max_abs_diff(&outs[0], &outs[2]) > 1e-3, "{what}: the adapter changed nothing");
                outputs.push(outs);
            }
            // The two layouts are one adapter: bit-equal outputs.
            if let [a, b] = outputs.as_slice() {
                for (x, y) in a.iter().zip(b) {
                    assert_eq!(max_abs_diff(x, y), 0.0, "{family}/{adapter}: the key layouts differ");
                }
            }
        }
    }
}

fn check_pipelines(family: &str) {
    let index = json(&format!("{IP}/reference/index.json"));
    let cases: Vec<&str> = index[family].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(!cases.is_empty());
    let mut loaded: Option<(String, StableDiffusion)> = None;
    for name in cases {
        let base = format!("{IP}/reference/{family}/{name}");
        let case = json(&format!("{base}.json"));
        let reference = tensors(&format!("{base}.safetensors"));
        let adapter = case["ip_adapter"].as_str().unwrap().to_string();
        if loaded.as_ref().map(|(a, _)| a != &adapter).unwrap_or(true) {
            let mut sd =
                StableDiffusion::load(&model_dir(case["model"].as_str().unwrap()), &cpu_fp32(None)).unwrap();
            sd.load_ip_adapter(&fixture(&adapter).display().to_string(), None).unwrap();
            loaded = Some((adapter.clone(), sd));
        }
        let sd = &loaded.as_ref().unwrap().1;
        let p = generate_params(&case, 64, 64);
        let prompt = ImagePrompt {
            image: sdstream::io::image::read(&fixture(case["ip_image"].as_str().unwrap())).unwrap(),
            scale: IpScale::from_json(&case["ip_scale"]).unwrap(),
        };
        let guides = Guides { control: None, image_prompt: Some(&prompt) };
        let run = |guides: Guides<'_>| match case["mode"].as_str().unwrap() {
            "txt2img" => pipeline::txt2img_latents_guided(sd, &p, guides).unwrap(),
            "img2img" => {
                let input =
                    sdstream::io::image::read(&fixture(case["input_image"].as_str().unwrap())).unwrap();
                let image = sdstream::io::image::to_tensor(&input, Device::Cpu, Kind::Float).unwrap();
                let strength = case["strength"].as_f64().unwrap();
                pipeline::img2img_latents_guided(sd, &p, &image, strength, guides).unwrap()
            }
            other => panic!("{name}: unknown mode {other}"),
        };
        let latents = run(guides);
        assert_close(&format!("{family}/{name}: latents"), &latents, &reference["latents"], 1e-4, 1e-4);
        eprintln!(
            "{family}/{name}: latents max abs diff {:e}",
            max_abs_diff(&latents, &reference["latents"])
        );
        assert_png_matches(&format!("{family}/{name}"), sd, &latents, &format!("{base}.png"));
        let plain = run(Guides::default());
        assert!(max_abs_diff(&plain, &latents) > 1e-3, "{name}: the image prompt changed nothing");
    }
}

/// StableDiffusionPipeline / StableDiffusionImg2ImgPipeline with `ip_adapter_image` (plain and plus, with and
/// without guidance, a per-block scale).
#[test]
fn sd15_ip_adapter_pipelines_match_diffusers() {
    check_pipelines("sd15");
}

/// StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline with `ip_adapter_image`.
#[test]
fn sdxl_ip_adapter_pipelines_match_diffusers() {
    check_pipelines("sdxl");
}

/// Rows with and without an image prompt in one UNet call equal each row run alone (with its own adapter input,
/// or with none at all).
#[test]
fn rows_without_an_image_batch_with_rows_that_have_one() {
    let _g = tch::no_grad_guard();
    let sd = load("sd15", "ip-adapter-plus_sd15-tiny.safetensors");
    let model = sd.image_prompt.as_ref().unwrap();
    let refs = tensors(&format!("{IP}/reference/sd15/ip-adapter-plus_sd15-tiny.safetensors"));
    let (sample, t, ehs) = (&refs["sample"], &refs["timesteps"], &refs["encoder_hidden_states"]);
    let layers = sd.unet.cross_attention_layers();
    let n = layers.len();
    let tokens = refs["tokens"].shallow_clone();
    // Row 0: the image at a per-block scale; row 1: no image.
    let row0 = layer_scales(&per_block(), layers).unwrap();
    let both = ImageCond {
        layers: model.adapter.layers(),
        tokens: Tensor::cat(&[&tokens, &tokens.zeros_like()], 0),
        scales: vec![row0.clone(), vec![0.0; n]],
    };
    let extra = UNetExtra { image: Some(&both), ..Default::default() };
    let batched = sd.unet.forward_with(sample, t, ehs, &extra).unwrap();
    let one = |i: i64| (sample.narrow(0, i, 1), t.narrow(0, i, 1), ehs.narrow(0, i, 1));
    let (s0, t0, e0) = one(0);
    let alone0 =
        ImageCond { layers: model.adapter.layers(), tokens: tokens.shallow_clone(), scales: vec![row0] };
    let out0 = sd
        .unet
        .forward_with(&s0, &t0, &e0, &UNetExtra { image: Some(&alone0), ..Default::default() })
        .unwrap();
    let (s1, t1, e1) = one(1);
    let out1 = sd.unet.forward(&s1, &t1, &e1, None).unwrap();
    assert_max_abs("row with an image", &batched.narrow(0, 0, 1), &out0, 1e-5);
    assert_max_abs("row without one", &batched.narrow(0, 1, 1), &out1, 1e-5);
    // The scale rows are checked against the batch.
    let bad = ImageCond { layers: model.adapter.layers(), tokens, scales: vec![vec![1.0; n]] };
    let e = sd.unet.forward_with(sample, t, ehs, &UNetExtra { image: Some(&bad), ..Default::default() });
    assert!(e.unwrap_err().to_string().contains("rows of scales"));
}

/// Two streams, one with an image prompt (with classifier-free guidance, so its "no image" tokens ride on the
/// guidance rows) and one without, share each UNet call and each get what they get alone.
#[test]
fn stream_batch_with_and_without_an_image_prompt() {
    use sdstream::stream::batch::{tick, TickInput};
    use sdstream::stream::image_prompt::{ImagePromptCache, StreamImagePrompt};
    use sdstream::stream::settings::CfgType;
    use sdstream::stream::Stream;
    let sd = load("sd15", "ip-adapter_sd15-tiny.safetensors");
    let case = json("tests/fixtures/stream/sd1_img2img_n1_full.json");
    let mut cache = ImagePromptCache::new(4);
    let mk = |seed: u64, with_image: bool, cache: &mut ImagePromptCache| {
        let mut s = stream_case_settings(&case);
        s.seed = seed;
        s.t_index_list = vec![20, 35];
        s.cfg_type = CfgType::Full;
        s.guidance = 1.5;
        let cond = sd.encode_text(&s.prompt, None).unwrap();
        let uncond = sd.encode_text("", None).unwrap();
        let mut st = Stream::new(seed, &sd, s, cond, uncond).unwrap();
        if with_image {
            st.set_image_prompt(Some(
                StreamImagePrompt::new(&sd, cache, &ip_image(), &IpScale::One(0.8)).unwrap(),
            ));
        }
        st
    };
    let frames: Vec<Tensor> = (0..3)
        .map(|i| {
            let img =
                sdstream::io::image::read(&fixture(&format!("tests/fixtures/stream/frames/frame_00{i}.png")))
                    .unwrap();
            sdstream::io::image::to_tensor(&img, Device::Cpu, Kind::Float).unwrap()
        })
        .collect();
    let specs = [(7u64, true), (8, false)];
    let alone: Vec<Vec<Tensor>> = specs
        .iter()
        .map(|&(seed, with)| {
            let mut s = mk(seed, with, &mut cache);
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
    // The image is encoded once, then served from the cache.
    assert_eq!((cache.misses, cache.hits), (1, 0));
    let mut streams: Vec<Stream> = specs.iter().map(|&(seed, with)| mk(seed, with, &mut cache)).collect();
    assert_eq!((cache.misses, cache.hits), (1, 1));
    for (i, f) in frames.iter().enumerate() {
        let inputs = streams
            .iter_mut()
            .map(|s| TickInput { stream: s, frame_id: i as u64, image: Some(f.shallow_clone()) })
            .collect();
        let (outs, timings) = tick(&sd, inputs, false).unwrap();
        assert_eq!((timings.streams, timings.unet_batch), (2, 8), "one UNet call for both streams");
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
    // The image prompt matters: the same seed without it differs.
    let mut plain = mk(7, false, &mut cache);
    let mut out = None;
    for (i, f) in frames.iter().enumerate() {
        let input = TickInput { stream: &mut plain, frame_id: i as u64, image: Some(f.shallow_clone()) };
        out = tick(&sd, vec![input], false).unwrap().0.remove(0).image;
    }
    assert!(max_abs_diff(&out.unwrap(), &alone[0][2]) > 1e-3);
}

#[test]
fn per_block_scales_expand_as_diffusers_does() {
    let sd = StableDiffusion::load(&model_dir("sdxl-tiny"), &cpu_fp32(None)).unwrap();
    let layers = sd.unet.cross_attention_layers();
    assert_eq!(layers.len(), 17);
    assert_eq!(layers[0].name, "down_blocks.1.attentions.0.transformer_blocks.0.attn2");
    assert_eq!(layers[16].name, "mid_block.attentions.0.transformer_blocks.1.attn2");
    let s = IpScale::from_json(
        &serde_json::json!({"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}),
    )
    .unwrap();
    let v = layer_scales(&s, layers).unwrap();
    // down 1 (2 layers) 0; down 2: attention 0 (2 transformer blocks) 0, attention 1 1; up 0: 0, 1, 0 (two
    // transformer blocks each); up 1: 0; mid 0.
    let want = [0., 0., 0., 0., 1., 1., 0., 0., 1., 1., 0., 0., 0., 0., 0., 0., 0.];
    assert_eq!(v, want);
    assert_eq!(layer_scales(&"0.3".parse().unwrap(), layers).unwrap(), vec![0.3; 17]);
    let bad = |j: serde_json::Value| layer_scales(&IpScale::from_json(&j)?, layers).map(|_| ());
    // diffusers skips blocks without attention (down block 0 of this UNet has none).
    let skipped = IpScale::from_json(&serde_json::json!({"down": {"block_0": 1.0}})).unwrap();
    assert_eq!(layer_scales(&skipped, layers).unwrap(), vec![0.0; 17]);
    assert!(bad(serde_json::json!({"up": {"block_0": [1.0, 2.0]}}))
        .unwrap_err()
        .to_string()
        .contains("expected 3"));
    assert!(bad(serde_json::json!({"left": 1.0})).unwrap_err().to_string().contains("left"));
    assert!("{not json".parse::<IpScale>().is_err());
}

#[test]
fn bad_inputs_are_refused_clearly() {
    let mut sd1 = StableDiffusion::load(&model_dir("sd1-tiny"), &cpu_fp32(None)).unwrap();
    // An SDXL adapter on an SD 1.x model, and the other way round.
    let xl = fixture(&format!("{IP}/sdxl/ip-adapter_sdxl-tiny.safetensors")).display().to_string();
    let e = sd1.load_ip_adapter(&xl, None).unwrap_err().to_string();
    assert!(e.contains("cross-attention width 72") && e.contains("model family"), "{e}");
    let mut sdxl = StableDiffusion::load(&model_dir("sdxl-tiny"), &cpu_fp32(None)).unwrap();
    let sd15 =
        fixture(&format!("{IP}/sd15/ip-adapter-plus_sd15-tiny.diffusers.safetensors")).display().to_string();
    let e = sdxl.load_ip_adapter(&sd15, None).unwrap_err().to_string();
    assert!(e.contains("model family"), "{e}");
    // The SDXL adapter's image encoder for an SD 1.5 adapter.
    let plain = fixture(&format!("{IP}/sd15/ip-adapter_sd15-tiny.safetensors")).display().to_string();
    let xl_enc = fixture(&format!("{IP}/sdxl/image_encoder")).display().to_string();
    let e = sd1.load_ip_adapter(&plain, Some(&xl_enc)).unwrap_err().to_string();
    assert!(e.contains("projection_dim") && e.contains("image encoder"), "{e}");
    // A pickle is refused with a message, before anything is read.
    let dir = std::env::temp_dir().join(format!("sdstream-ip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("ip-adapter_sd15.bin");
    std::fs::write(&bin, b"not read").unwrap();
    let e = sd1.load_ip_adapter(&bin.display().to_string(), None).unwrap_err().to_string();
    assert!(e.contains("only .safetensors"), "{e}");
    // Not an adapter at all (a text encoder's weights), and no image encoder beside a file.
    let te = fixture("tests/fixtures/models/sd1-tiny/text_encoder/model.safetensors").display().to_string();
    let e = sd1.load_ip_adapter(&te, Some(&xl_enc)).unwrap_err().to_string();
    assert!(e.contains("not an IP-Adapter"), "{e}");
    let lonely = dir.join("ip-adapter.safetensors");
    std::fs::copy(fixture(&format!("{IP}/sd15/ip-adapter_sd15-tiny.safetensors")), &lonely).unwrap();
    let e = sd1.load_ip_adapter(&lonely.display().to_string(), None).unwrap_err().to_string();
    assert!(e.contains("--ip-image-encoder"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    // An image prompt without an adapter loaded.
    let case = json(&format!("{IP}/reference/sd15/ip-adapter_sd15-tiny_txt2img_ddim_g7.5_s0.6.json"));
    let p = generate_params(&case, 64, 64);
    let plain_sd = StableDiffusion::load(&model_dir("sd1-tiny"), &cpu_fp32(None)).unwrap();
    let prompt = ImagePrompt { image: ip_image(), scale: IpScale::One(1.0) };
    let e = pipeline::txt2img_latents_guided(
        &plain_sd,
        &p,
        Guides { control: None, image_prompt: Some(&prompt) },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--ip-adapter"), "{e}");
}

#[test]
fn cli_runs_ip_adapter_and_refuses_bad_input() {
    let case = json(&format!("{IP}/reference/sd15/ip-adapter_sd15-tiny_txt2img_ddim_g7.5_s0.6.json"));
    let out = std::env::temp_dir().join(format!("sdstream-ip-adapter-{}.png", std::process::id()));
    let out_s = out.display().to_string();
    let seed = case["seed"].to_string();
    let adapter = case["ip_adapter"].as_str().unwrap();
    let base: Vec<String> = [
        "txt2img",
        "--model",
        "tests/fixtures/models/sd1-tiny",
        "--device",
        "cpu",
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--steps",
        "3",
        "--scheduler",
        "ddim",
        "--guidance",
        "7.5",
        "--seed",
        seed.as_str(),
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        out_s.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = |extra: &[&str]| {
        let mut v = base.clone();
        v.extend(extra.iter().map(|s| s.to_string()));
        run_sdstream(&v.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    let (ok, text) = run(&["--ip-adapter", adapter, "--ip-image", IP_IMAGE, "--ip-scale", "0.6"]);
    assert!(ok, "{text}");
    // The same picture as diffusers' (within 2/255 per pixel).
    let got = sdstream::io::image::read(&out).unwrap();
    let want = sdstream::io::image::read(&fixture(&format!(
        "{IP}/reference/sd15/ip-adapter_sd15-tiny_txt2img_ddim_g7.5_s0.6.png"
    )))
    .unwrap();
    let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 2, "the CLI's picture differs from diffusers' by {worst}/255");
    let _ = std::fs::remove_file(&out);

    let (ok, text) = run(&["--ip-adapter", adapter]);
    assert!(!ok && text.contains("--ip-image"), "{text}");
    let (ok, text) = run(&["--ip-image", IP_IMAGE]);
    assert!(!ok && text.contains("--ip-adapter"), "{text}");
    // A non-image as the image prompt.
    let (ok, text) = run(&["--ip-adapter", adapter, "--ip-image", "Cargo.toml"]);
    assert!(!ok && text.contains("--ip-image") && text.contains("Cargo.toml"), "{text}");
    let (ok, text) = run(&["--ip-adapter", adapter, "--ip-image", IP_IMAGE, "--ip-scale", "lots"]);
    assert!(!ok && text.contains("--ip-scale"), "{text}");
    let xl = "tests/fixtures/ip_adapter/sdxl/ip-adapter_sdxl-tiny.safetensors";
    let (ok, text) = run(&["--ip-adapter", xl, "--ip-image", IP_IMAGE]);
    assert!(!ok && text.contains("model family"), "{text}");
}

/// `sdstream stream` takes the same flags: the image prompt rides along with every frame of the stream.
#[test]
fn cli_stream_takes_an_image_prompt() {
    let dir = std::env::temp_dir().join(format!("sdstream-ip-stream-{}", std::process::id()));
    let adapter = "tests/fixtures/ip_adapter/sd15/ip-adapter-plus_sd15-tiny.safetensors";
    let run = |out: &str, extra: &[&str]| -> Vec<Vec<u8>> {
        let out = dir.join(out);
        let out_s = out.display().to_string();
        let mut args = vec![
            "stream",
            "--model",
            "tests/fixtures/models/sd1-tiny",
            "--device",
            "cpu",
            "--input",
            "tests/fixtures/stream/frames",
            "--output",
            out_s.as_str(),
            "--width",
            "64",
            "--height",
            "64",
            "--t-index-list",
            "20,35",
            "--cfg-type",
            "full",
            "--guidance",
            "1.5",
        ];
        args.extend_from_slice(extra);
        let (ok, text) = run_sdstream(&args, &[]);
        assert!(ok, "{text}");
        let mut files: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(files.len() >= 3, "{text}");
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    };
    let with = run("with", &["--ip-adapter", adapter, "--ip-image", IP_IMAGE, "--ip-scale", "0.8"]);
    let without = run("without", &[]);
    assert_ne!(with.last(), without.last(), "the image prompt changed nothing");
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, text) = run_sdstream(
        &["stream", "--model", "m", "--input", "models", "--output", "/tmp/x", "--ip-image", IP_IMAGE],
        &[],
    );
    assert!(!ok && text.contains("--ip-adapter"), "{text}");
}

/// `sdstream bench --ip-adapter` adds the adapter's rows: the UNet with the decoupled cross-attention beside the
/// plain UNet at each batch size, and the image encoder once per image. Structure only: no time is asserted.
#[test]
fn bench_reports_the_adapter_cost() {
    let json = std::env::temp_dir().join(format!("sdstream-ip-bench-{}.json", std::process::id()));
    let json_s = json.display().to_string();
    let (ok, text) = run_sdstream(
        &[
            "bench",
            "--model",
            "tests/fixtures/models/sd1-tiny",
            "--ip-adapter",
            "tests/fixtures/ip_adapter/sd15/ip-adapter_sd15-tiny.safetensors",
            "--components",
            "--device",
            "cpu",
            "--width",
            "64",
            "--height",
            "64",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--batch-sizes",
            "1,2",
            "--json",
            json_s.as_str(),
        ],
        &[],
    );
    assert!(ok, "{text}");
    let report = json_of(&json);
    let names: Vec<&str> =
        report["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in
        ["unet b=1", "unet+ip-adapter b=1", "unet b=2", "unet+ip-adapter b=2", "ip-adapter image embed"]
    {
        assert!(names.contains(&want), "no `{want}` row in {names:?}");
    }
    let _ = std::fs::remove_file(&json);
}

fn json_of(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
