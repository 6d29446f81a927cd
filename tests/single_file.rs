//! Single-file checkpoints (original LDM layout) against diffusers: tests/fixtures/single_file (made by
//! tools/make_single_file_fixtures.py, which checks with diffusers' own `from_single_file` that the files hold
//! the intended weights bit for bit) holds sd1-tiny and sd2-tiny (OpenCLIP text encoder) in the LDM layout and a
//! second UNet/VAE layout, variant-tiny, with references from `StableDiffusionPipeline.from_single_file`. The
//! sd1-tiny and sd2-tiny single files hold exactly the weights of tests/fixtures/models/<model>, so their
//! references are those models' pipeline references (the fixture tool checks diffusers gives bit-equal latents
//! from the single files). Same seed on CPU in fp32: latents within 1e-4
//! (abs + rel), PNG within 2/255. Bad files are refused with a message, from the library and the CLI.
mod common;

use common::*;
use sdstream::models::stable_diffusion::{LoadOptions, StableDiffusion};
use sdstream::pipeline;
use std::path::{Path, PathBuf};

const SD1_FILE: &str = "tests/fixtures/single_file/sd1-tiny.safetensors";
const SD1_CONFIG: &str = "tests/fixtures/models/sd1-tiny";
const SD2_FILE: &str = "tests/fixtures/single_file/sd2-tiny.safetensors";
const SD2_CONFIG: &str = "tests/fixtures/models/sd2-tiny";
const VARIANT_FILE: &str = "tests/fixtures/single_file/variant-tiny.safetensors";
const VARIANT_CONFIG: &str = "tests/fixtures/single_file/variant-tiny";

fn opts(config: Option<&str>) -> LoadOptions {
    LoadOptions { model_config: config.map(|c| fixture(c).display().to_string()), ..cpu_fp32(None) }
}

fn load(file: &str, config: &str) -> StableDiffusion {
    StableDiffusion::load(&fixture(file).display().to_string(), &opts(Some(config))).unwrap()
}

fn load_err(file: &Path, config: Option<&str>) -> String {
    match StableDiffusion::load(&file.display().to_string(), &opts(config)) {
        Ok(_) => panic!("{} should be refused", file.display()),
        Err(e) => e.to_string(),
    }
}

/// Runs the reference case `<dir>/<name>` on `sd` and compares latents and PNG.
fn check_case(sd: &StableDiffusion, dir: &str, name: &str) {
    let base = format!("{dir}/{name}");
    let case = json(&format!("{base}.json"));
    let p =
        generate_params(&case, case["width"].as_i64().unwrap_or(64), case["height"].as_i64().unwrap_or(64));
    let latents = match case["mode"].as_str().unwrap_or("txt2img") {
        "txt2img" => pipeline::txt2img_latents(sd, &p).unwrap(),
        "img2img" => {
            let input = sdstream::io::image::read(&fixture(case["input_image"].as_str().unwrap())).unwrap();
            let image = sdstream::io::image::to_tensor(&input, tch::Device::Cpu, tch::Kind::Float).unwrap();
            pipeline::img2img_latents(sd, &p, &image, case["strength"].as_f64().unwrap()).unwrap()
        }
        other => panic!("{name}: unknown mode {other}"),
    };
    let reference = tensors(&format!("{base}.safetensors"));
    assert_close(&format!("{name}: latents"), &latents, &reference["latents"], 1e-4, 1e-4);
    assert_png_matches(name, sd, &latents, &format!("{base}.png"));
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdstream-single-file-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A safetensors file of zero-filled U8 tensors with the given names and shapes (only headers matter here).
fn write_fake(path: &Path, tensors: &[(&str, &[i64])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0i64;
    for (name, shape) in tensors {
        let n: i64 = shape.iter().product();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "U8", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.resize(bytes.len() + offset as usize, 0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn sd1_tiny_single_file_holds_the_folder_weights_and_matches_diffusers() {
    let single = load(SD1_FILE, SD1_CONFIG);
    let folder = StableDiffusion::load(&fixture(SD1_CONFIG).display().to_string(), &cpu_fp32(None)).unwrap();
    assert_same_weights(&single, &folder);
    let reference = "tests/fixtures/reference/sd1-tiny/pipeline";
    for name in ["txt2img_ddim_g7.5", "txt2img_euler_g7.5_neg", "txt2img_ddim_g7.5_96x64", "img2img_lcm_g7.5"]
    {
        check_case(&single, reference, name);
    }
}

/// The single file's UNet and text-encoder weights are bit-equal to those of the diffusers folder.
fn assert_same_weights(single: &StableDiffusion, folder: &StableDiffusion) {
    for (what, a, b) in [
        ("unet", &single.unet_weights, &folder.unet_weights),
        ("text encoder", &single.text_encoder_weights, &folder.text_encoder_weights),
    ] {
        // The SD 1.x single file also carries CLIP's `position_ids` buffer (read as used, not a weight).
        let names = b.loaded_names();
        let mut got = a.loaded_names();
        got.retain(|n| !n.ends_with("position_ids"));
        assert_eq!(got, names, "{what}: the modules asked for other tensors");
        for n in &names {
            assert!(a.loaded(n).unwrap().equal(&b.loaded(n).unwrap()), "{what}: `{n}` differs");
        }
    }
}

#[test]
fn sd2_tiny_single_file_with_open_clip_matches_diffusers() {
    let single = load(SD2_FILE, SD2_CONFIG);
    let folder = StableDiffusion::load(&fixture(SD2_CONFIG).display().to_string(), &cpu_fp32(None)).unwrap();
    assert_same_weights(&single, &folder);
    let reference = "tests/fixtures/reference/sd2-tiny/pipeline";
    for name in ["txt2img_ddim_g7.5", "txt2img_euler_g7.5_neg", "img2img_euler_g1.0"] {
        check_case(&single, reference, name);
    }
    // Without --model-config an SD 2.x file is refused: its configs cannot be told from its shapes.
    let e = load_err(&fixture(SD2_FILE), None);
    assert!(e.contains("SD 2.x") && e.contains("--model-config"), "{e}");
}

#[test]
fn second_layout_matches_diffusers_from_single_file() {
    let sd = load(VARIANT_FILE, VARIANT_CONFIG);
    assert!(sd.unet_weights.unused().is_empty(), "{:?}", sd.unet_weights.unused());
    let dir = "tests/fixtures/single_file/reference";
    let index = json(&format!("{dir}/index.json"));
    let cases: Vec<&str> = index.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(cases.len(), 3);
    for name in cases {
        check_case(&sd, dir, name);
    }
}

#[test]
fn bad_files_are_refused_with_a_message() {
    let sd1 = fixture(SD1_FILE);
    let bytes = std::fs::read(&sd1).unwrap();

    let truncated = tmp("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&truncated, Some(SD1_CONFIG));
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(&truncated, &bytes[..100]).unwrap();
    let e = load_err(&truncated, Some(SD1_CONFIG));
    assert!(e.contains("truncated") && e.contains("truncated.safetensors"), "{e}");

    let unrelated = tmp("unrelated.safetensors");
    write_fake(&unrelated, &[("encoder.weight", &[4, 4]), ("head.bias", &[4])]);
    let e = load_err(&unrelated, Some(SD1_CONFIG));
    assert!(
        e.contains("not a Stable Diffusion single-file checkpoint") && e.contains("encoder.weight"),
        "{e}"
    );

    let e = load_err(&fixture("tests/fixtures/lora/sd1_kohya.safetensors"), None);
    assert!(e.contains("LoRA") && e.contains("--lora"), "{e}");
    let e =
        load_err(&fixture("tests/fixtures/models/sd1-tiny/unet/diffusion_pytorch_model.safetensors"), None);
    assert!(e.contains("diffusers component"), "{e}");

    let sd2 = tmp("sd2.safetensors");
    write_fake(
        &sd2,
        &[
            ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
            ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", &[3072, 1024]),
        ],
    );
    let e = load_err(&sd2, None);
    assert!(e.contains("SD 2.x"), "{e}");
    let sdxl = tmp("sdxl.safetensors");
    write_fake(&sdxl, &[("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", &[768])]);
    let e = load_err(&sdxl, None);
    assert!(e.contains("SDXL"), "{e}");

    let ckpt = tmp("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    let e = load_err(&ckpt, None);
    assert!(e.contains("pickle"), "{e}");
    let e = load_err(&tmp("absent.safetensors"), None);
    assert!(e.contains("absent.safetensors"), "{e}");
}

#[test]
fn config_mismatches_name_the_tensor() {
    // The tiny file is not SD 1.5-shaped: without --model-config it is refused naming what differs.
    let e = load_err(&fixture(SD1_FILE), None);
    assert!(e.contains("not a standard SD 1.x") && e.contains("cross-attention width 32"), "{e}");
    assert!(e.contains("--model-config"), "{e}");

    // Another layout's config: a stored tensor with no place in it, named.
    let e = load_err(&fixture(SD1_FILE), Some(VARIANT_CONFIG));
    assert!(e.contains("model.diffusion_model.") && e.contains("has no place in the UNet"), "{e}");

    // A tensor missing from the file: named with its diffusers and its LDM name.
    let src = sdstream::models::weights::stored_shapes(&fixture(SD1_FILE)).unwrap();
    assert!(src.contains_key("model.diffusion_model.input_blocks.1.0.in_layers.2.weight"));
    let all = tensors(SD1_FILE);
    let kept: Vec<(String, tch::Tensor)> = all
        .iter()
        .filter(|(k, _)| *k != "model.diffusion_model.input_blocks.1.0.in_layers.2.weight")
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let missing = tmp("missing.safetensors");
    tch::Tensor::write_safetensors(&kept, &missing).unwrap();
    let e = load_err(&missing, Some(SD1_CONFIG));
    assert!(
        e.contains("down_blocks.0.resnets.0.conv1.weight")
            && e.contains("model.diffusion_model.input_blocks.1.0.in_layers.2.weight"),
        "{e}"
    );
}

#[test]
fn cli_txt2img_from_a_single_file_matches_diffusers() {
    let case = json("tests/fixtures/reference/sd1-tiny/pipeline/txt2img_ddim_g7.5.json");
    let out = tmp("cli.png");
    let (seed, steps) = (case["seed"].to_string(), case["steps"].to_string());
    let args = [
        "txt2img",
        "--model",
        SD1_FILE,
        "--model-config",
        SD1_CONFIG,
        "--device",
        "cpu",
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--seed",
        &seed,
        "--steps",
        &steps,
        "--scheduler",
        "ddim",
        "--guidance",
        "7.5",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        out.to_str().unwrap(),
    ];
    let (ok, text) = run_sdstream(&args, &[]);
    assert!(ok, "{text}");
    let got = sdstream::io::image::read(&out).unwrap();
    let want = sdstream::io::image::read(&fixture(
        "tests/fixtures/reference/sd1-tiny/pipeline/txt2img_ddim_g7.5.png",
    ))
    .unwrap();
    let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 2, "CLI image differs from diffusers' by {worst}/255");
}

#[test]
fn cli_refuses_bad_single_files() {
    let base = [
        "txt2img", "--device", "cpu", "--prompt", "a fox", "--steps", "1", "--width", "64", "--height", "64",
    ];
    let out = tmp("never.png");
    let run = |model: &str, extra: &[&str], envs: &[(&str, &Path)]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend(["--model", model, "--output", out.to_str().unwrap()]);
        a.extend(extra);
        let (ok, text) = run_sdstream(&a, envs);
        assert!(!ok, "{a:?} should fail:\n{text}");
        assert!(text.contains("error:"), "{text}");
        text
    };
    let unrelated = tmp("cli-unrelated.safetensors");
    write_fake(&unrelated, &[("head.weight", &[2, 2])]);
    let t = run(unrelated.to_str().unwrap(), &["--model-config", SD1_CONFIG], &[]);
    assert!(t.contains("not a Stable Diffusion single-file checkpoint"), "{t}");

    // An SD 1.x-shaped file without --model-config takes the built-in configs and needs the CLIP tokenizer
    // from the hub: offline with an empty cache, the error says to pass --model-config.
    let sd15 = tmp("sd15-shaped.safetensors");
    write_fake(
        &sd15,
        &[
            ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", &[320, 768]),
            ("cond_stage_model.transformer.text_model.final_layer_norm.weight", &[768]),
        ],
    );
    let empty_cache = tmp("empty-hf-home");
    std::fs::create_dir_all(&empty_cache).unwrap();
    let t = run(sd15.to_str().unwrap(), &[], &[("HF_HOME", &empty_cache), ("HF_HUB_CACHE", &empty_cache)]);
    assert!(t.contains("openai/clip-vit-large-patch14") && t.contains("--model-config"), "{t}");
}

/// Copies of every UNet and text-encoder weight the modules hold.
fn snapshot(sd: &StableDiffusion) -> Vec<(String, tch::Tensor)> {
    let mut v = Vec::new();
    for (tag, w) in [("unet", &sd.unet_weights), ("te", &sd.text_encoder_weights)] {
        for n in w.loaded_names() {
            v.push((format!("{tag}:{n}"), w.loaded(&n).unwrap().copy()));
        }
    }
    v
}

fn lora(file: &str) -> sdstream::models::lora::LoraSpec {
    sdstream::models::lora::LoraSpec { path: fixture(file).display().to_string(), scale: 1.0 }
}

/// kohya LoRAs with the UNet's LDM names (`lora_unet_input_blocks_1_1_proj_in`, resnet `in_layers_2`,
/// samplers, `time_embed_0`, `out_2`) fuse exactly the weights their diffusers-named originals fuse, on a
/// folder-loaded and a single-file model; the fixture tool checks diffusers does the same.
#[test]
fn kohya_loras_with_ldm_names_fuse_like_their_diffusers_named_originals() {
    let mut sd = load(SD1_FILE, SD1_CONFIG);
    let base = snapshot(&sd);
    for (original, ldm) in [
        (
            "tests/fixtures/lora/sd1_kohya.safetensors",
            "tests/fixtures/single_file/lora/sd1_kohya_ldm.safetensors",
        ),
        (
            "tests/fixtures/lora/sd1_conv_kohya.safetensors",
            "tests/fixtures/single_file/lora/sd1_conv_kohya_ldm.safetensors",
        ),
    ] {
        sd.load_lora(&lora(original)).unwrap();
        let want = snapshot(&sd);
        sd.loras.remove(0).unwrap();
        sd.load_lora(&lora(ldm)).unwrap();
        let info = &sd.loras.list()[0];
        assert!(info.unet_layers > 0, "{ldm}: {info:?}");
        let got = snapshot(&sd);
        let mut changed = 0;
        for (((name, g), (_, w)), (_, b)) in got.iter().zip(&want).zip(&base) {
            assert!(g.equal(w), "{ldm}: `{name}` differs from what {original} fuses");
            changed += usize::from(!g.equal(b));
        }
        assert!(changed > 0, "{ldm} changed nothing");
        sd.loras.remove(0).unwrap();
    }
    // The same images as diffusers with the (equivalent) PEFT LoRA fused.
    sd.load_lora(&lora("tests/fixtures/single_file/lora/sd1_kohya_ldm.safetensors")).unwrap();
    check_case(&sd, "tests/fixtures/lora", "peft_ddim_g7.5");
}

/// Without --model-config an SD 1.x-shaped file is loaded with the built-in SD 1.5 configs and the tokenizer of
/// openai/clip-vit-large-patch14 from the Hugging Face cache (here a fake cache holding the tiny tokenizer):
/// loading then proceeds to the weights, and this header-only file's missing tensors are named in both layouts.
#[test]
fn builtin_sd15_configs_take_the_tokenizer_from_the_hub_cache() {
    let hf_home = tmp("fake-hf-home");
    let snapshot = hf_home.join("hub/models--openai--clip-vit-large-patch14/snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(hf_home.join("hub/models--openai--clip-vit-large-patch14/refs")).unwrap();
    std::fs::write(hf_home.join("hub/models--openai--clip-vit-large-patch14/refs/main"), "0123abcd").unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(fixture(&format!("tests/fixtures/models/sd1-tiny/tokenizer/{f}")), snapshot.join(f))
            .unwrap();
    }
    let sd15 = tmp("sd15-shaped-2.safetensors");
    write_fake(
        &sd15,
        &[
            ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", &[320, 768]),
            ("cond_stage_model.transformer.text_model.final_layer_norm.weight", &[768]),
        ],
    );
    let args = [
        "txt2img",
        "--model",
        sd15.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "a fox",
        "--steps",
        "1",
    ];
    let (ok, text) = run_sdstream(&args, &[("HF_HOME", &hf_home)]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("is missing from the weights")
            && text.contains("looked for it as `model.diffusion_model."),
        "{text}"
    );
}
