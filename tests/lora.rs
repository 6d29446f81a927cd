//! LoRA fusing against diffusers: tests/fixtures/lora (made by tools/make_lora_fixtures.py) holds tiny LoRAs
//! for the tiny models in the PEFT, kohya and older diffusers namings, and what StableDiffusionPipeline makes
//! with them loaded and fused (`load_lora_weights` + `fuse_lora(lora_scale=...)`). Same model, LoRA, prompt and
//! seed on CPU in fp32: latents within 1e-4, PNG within 2/255. Unfusing restores the base weights; scale
//! changes match diffusers at the new scale; bad files are refused naming the file and the key.
mod common;

use common::*;
use sdstream::models::lora::LoraSpec;
use sdstream::models::stable_diffusion::{LoadOptions, StableDiffusion};
use sdstream::pipeline;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

fn load(model: &str) -> StableDiffusion {
    load_with(model, cpu_fp32(None))
}

fn load_with(model: &str, opts: LoadOptions) -> StableDiffusion {
    StableDiffusion::load(&fixture(&format!("tests/fixtures/models/{model}")).display().to_string(), &opts)
        .unwrap()
}

fn spec(file: &str, scale: f64) -> LoraSpec {
    LoraSpec { path: fixture(&format!("tests/fixtures/lora/{file}")).display().to_string(), scale }
}

/// Runs the reference case `name` on `sd` (with whatever LoRAs it has fused) and compares.
fn check(sd: &StableDiffusion, name: &str) {
    let base = format!("tests/fixtures/lora/{name}");
    let case = json(&format!("{base}.json"));
    let p = generate_params(&case, 64, 64);
    let latents = pipeline::txt2img_latents(sd, &p).unwrap();
    let reference = tensors(&format!("{base}.safetensors"));
    assert_close(&format!("{name}: latents"), &latents, &reference["latents"], 1e-4, 1e-4);
    assert_png_matches(name, sd, &latents, &format!("{base}.png"));
}

/// Copies of every weight the UNet and text encoder hold.
fn snapshot(sd: &StableDiffusion) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for (tag, w) in [("unet", &sd.unet_weights), ("te", &sd.text_encoder_weights)] {
        for n in w.loaded_names() {
            m.insert(format!("{tag}:{n}"), w.loaded(&n).unwrap().copy());
        }
    }
    m
}

/// Largest difference between the weights now and a snapshot, and how many weights differ at all.
fn weight_diff(sd: &StableDiffusion, snap: &BTreeMap<String, Tensor>) -> (f64, usize) {
    let now = snapshot(sd);
    assert_eq!(now.len(), snap.len());
    let mut worst = 0.0f64;
    let mut changed = 0;
    for (k, a) in &now {
        let d = max_abs_diff(a, &snap[k]);
        if d > 0.0 {
            changed += 1;
        }
        worst = worst.max(d);
    }
    (worst, changed)
}

#[test]
fn peft_lora_matches_diffusers_at_each_scale_and_unfuses() {
    let mut sd = load("sd1-tiny");
    let base = snapshot(&sd);
    sd.load_lora(&spec("sd1_peft.safetensors", 1.0)).unwrap();
    let info = sd.loras.list();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].name, "sd1_peft");
    assert!(info[0].unet_layers > 0 && info[0].text_encoder_layers > 0, "{info:?}");
    check(&sd, "peft_ddim_g7.5");
    check(&sd, "peft_euler_g1.0");

    sd.set_lora_scale("sd1_peft", 0.5).unwrap();
    assert_eq!(sd.loras.list()[0].scale, 0.5);
    check(&sd, "peft_ddim_g7.5_scale0.5");

    sd.loras.unfuse(0).unwrap();
    let (worst, _) = weight_diff(&sd, &base);
    assert!(worst <= 1e-6, "unfused weights differ from the base by {worst}");

    // Fused again after unfusing, from scale 0.
    sd.set_lora_scale("0", 1.0).unwrap();
    check(&sd, "peft_ddim_g7.5");
    sd.loras.remove(0).unwrap();
    assert!(sd.loras.is_empty());
    assert!(weight_diff(&sd, &base).0 <= 1e-6);
}

#[test]
fn kohya_and_old_diffusers_namings_fuse_the_same_weights() {
    let mut sd = load("sd1-tiny");
    let base = snapshot(&sd);
    sd.load_lora(&spec("sd1_peft.safetensors", 1.0)).unwrap();
    let fused = snapshot(&sd);
    let (_, changed) = weight_diff(&sd, &base);
    sd.loras.remove(0).unwrap();
    for file in ["sd1_kohya.safetensors", "sd1_old.safetensors"] {
        sd.load_lora(&spec(file, 1.0)).unwrap();
        let (worst, n) = weight_diff(&sd, &fused);
        assert!(worst <= 1e-6, "{file}: fused weights differ from sd1_peft's by {worst}");
        assert_eq!(n, 0, "{file}: {n} weights differ from sd1_peft's");
        assert_eq!(weight_diff(&sd, &base).1, changed, "{file}: patches another set of weights");
        if file == "sd1_kohya.safetensors" {
            check(&sd, "peft_ddim_g7.5");
        }
        sd.loras.remove(0).unwrap();
    }
    assert!(weight_diff(&sd, &base).0 <= 1e-6);
}

/// SDXL: a LoRA on the UNet and both text encoders, in the PEFT and kohya (`lora_te1_`, `lora_te2_`) namings,
/// against diffusers' StableDiffusionXLPipeline with it loaded and fused.
#[test]
fn sdxl_lora_on_both_text_encoders_matches_diffusers() {
    let mut sd = load("sdxl-tiny");
    let te2_before = sd.encode_text("a fox", None).unwrap();
    for file in ["sdxl_peft.safetensors", "sdxl_kohya.safetensors"] {
        sd.load_lora(&spec(file, 0.8)).unwrap();
        let info = &sd.loras.list()[0];
        assert!(info.unet_layers > 0 && info.text_encoder_layers > 0, "{info:?}");
        check(&sd, "sdxl_peft_euler_g5.0_scale0.8");
        // The pooled output comes from the second text encoder alone: it moved, so that LoRA part was fused.
        let after = sd.encode_text("a fox", None).unwrap();
        let moved = max_abs_diff(after.pooled.as_ref().unwrap(), te2_before.pooled.as_ref().unwrap());
        assert!(moved > 1e-4, "{file}: the second text encoder's LoRA changed nothing");
        sd.loras.remove(0).unwrap();
    }
    // A second-text-encoder LoRA on an SD 1.x model is refused, naming the key.
    let mut sd1 = load("sd1-tiny");
    let e = sd1.load_lora(&spec("sdxl_peft.safetensors", 1.0)).unwrap_err().to_string();
    assert!(e.contains("sdxl_peft.safetensors"), "{e}");
}

/// A copy of LoRA fixture `file` in `dir` with its text-encoder keys named without `text_model.` (as a LoRA
/// trained on transformers 5's `CLIPTextModel` names them: `text_encoder.encoder.layers.0...`,
/// `lora_te_encoder_layers_0_...`, `lora_te1_encoder_...`).
fn flat_named_copy(file: &str, dir: &std::path::Path) -> LoraSpec {
    let src = fixture(&format!("tests/fixtures/lora/{file}"));
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(&src)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let k = k
                .replacen("text_encoder.text_model.", "text_encoder.", 1)
                .replacen("text_encoder_2.text_model.", "text_encoder_2.", 1)
                .replacen("_text_model_", "_", 1);
            (k, t)
        })
        .collect();
    assert!(renamed.iter().all(|(k, _)| !k.contains("text_model")));
    let path = dir.join(format!("flat_{file}"));
    Tensor::write_safetensors(&renamed, &path).unwrap();
    LoraSpec { path: path.display().to_string(), scale: 1.0 }
}

/// LoRAs fuse the same into a model whose text encoder is stored without `text_model.` (sd1-tiny-flat,
/// sdxl-tiny-flat) as into the hub layout, whichever way the LoRA names the text encoder's modules, and give
/// diffusers' images.
#[test]
fn loras_fuse_the_same_on_both_text_encoder_layouts() {
    let dir = std::env::temp_dir().join(format!("sdstream-lora-layouts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut nested = load("sd1-tiny");
    let mut flat = load("sd1-tiny-flat");
    let base = snapshot(&nested);
    assert_eq!(weight_diff(&flat, &base), (0.0, 0), "the two layouts load different weights");
    sd_fuse(&mut nested, spec("sd1_peft.safetensors", 1.0));
    let fused = snapshot(&nested);
    let te_changed = fused.iter().filter(|(k, v)| k.starts_with("te:") && !v.equal(&base[*k])).count();
    assert!(te_changed > 0, "the LoRA patched no text-encoder weight");
    let mut specs: Vec<LoraSpec> =
        ["sd1_peft.safetensors", "sd1_kohya.safetensors", "sd1_old.safetensors"].map(|f| spec(f, 1.0)).into();
    specs.extend(["sd1_peft.safetensors", "sd1_kohya.safetensors"].map(|f| flat_named_copy(f, &dir)));
    for s in specs {
        for (tag, sd) in [("sd1-tiny", &mut nested), ("sd1-tiny-flat", &mut flat)] {
            while !sd.loras.is_empty() {
                sd.loras.remove(0).unwrap();
            }
            sd_fuse(sd, s.clone());
            let (worst, n) = weight_diff(sd, &fused);
            assert!(
                worst <= 1e-6 && n == 0,
                "{tag} + {}: {n} weights differ from sd1_peft's by {worst}",
                s.path
            );
        }
    }
    check(&flat, "peft_ddim_g7.5");

    let mut xl_flat = load("sdxl-tiny-flat");
    for s in [spec("sdxl_peft.safetensors", 0.8), spec("sdxl_kohya.safetensors", 0.8), {
        LoraSpec { scale: 0.8, ..flat_named_copy("sdxl_peft.safetensors", &dir) }
    }] {
        xl_flat.load_lora(&s).unwrap();
        check(&xl_flat, "sdxl_peft_euler_g5.0_scale0.8");
        xl_flat.loras.remove(0).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn sd_fuse(sd: &mut StableDiffusion, s: LoraSpec) {
    sd.load_lora(&s).unwrap_or_else(|e| panic!("{}: {e}", s.path));
    let info = &sd.loras.list()[0];
    assert!(info.text_encoder_layers > 0 && info.unet_layers > 0, "{info:?}");
}

#[test]
fn alpha_from_diffusers_metadata_matches() {
    let mut sd = load("sd1-tiny");
    sd.load_lora(&spec("sd1_alpha.safetensors", 0.8)).unwrap();
    check(&sd, "alpha_lcm_g1.0_scale0.8");
}

#[test]
fn kohya_conv_lora_with_alpha_matches() {
    let mut sd = load("sd1-tiny");
    sd.load_lora(&spec("sd1_conv_kohya.safetensors", 1.0)).unwrap();
    assert_eq!(sd.loras.list()[0].text_encoder_layers, 0);
    check(&sd, "conv_ddim_g7.5");
}

#[test]
fn two_loras_at_once() {
    let mut sd = load("sd1-tiny");
    let base = snapshot(&sd);
    sd.load_loras(&[spec("sd1_peft.safetensors", 1.0), spec("sd1_conv_kohya.safetensors", 0.7)]).unwrap();
    let names: Vec<String> = sd.loras.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["sd1_peft", "sd1_conv_kohya"]);
    check(&sd, "two_euler_g7.5");
    // The same file twice gets its own name.
    sd.load_lora(&spec("sd1_conv_kohya.safetensors", 0.0)).unwrap();
    assert_eq!(sd.loras.list()[2].name, "sd1_conv_kohya#2");
    sd.loras.unfuse_all().unwrap();
    assert!(weight_diff(&sd, &base).0 <= 1e-6);
    assert!(sd.set_lora_scale("nope", 1.0).unwrap_err().to_string().contains("sd1_peft"));
}

#[test]
fn half_precision_scale_changes_do_not_drift_and_unfuse_exactly() {
    let opts = LoadOptions { kind: Kind::Half, ..cpu_fp32(None) };
    let mut sd = load_with("sd1-tiny", opts);
    let base = snapshot(&sd);
    sd.load_loras(&[spec("sd1_peft.safetensors", 1.0), spec("sd1_conv_kohya.safetensors", 0.7)]).unwrap();
    let fused = snapshot(&sd);
    for s in [0.3, -0.4, 0.9, 0.123, 1.0] {
        sd.set_lora_scale("sd1_peft", s).unwrap();
    }
    assert_eq!(weight_diff(&sd, &fused).0, 0.0, "repeated scale changes drifted");
    // fp16 weights = fp16(original + delta), the delta in fp32.
    let w = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let got = sd.unet_weights.loaded(w).unwrap();
    assert_eq!(got.kind(), Kind::Half);
    let lora = tensors("tests/fixtures/lora/sd1_peft.safetensors");
    let delta = lora[&format!("unet.{}.lora_B.weight", w.trim_end_matches(".weight"))]
        .matmul(&lora[&format!("unet.{}.lora_A.weight", w.trim_end_matches(".weight"))]);
    let want = (base[&format!("unet:{w}")].to_kind(Kind::Float) + delta).to_kind(Kind::Half);
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    sd.loras.unfuse_all().unwrap();
    assert_eq!(weight_diff(&sd, &base).0, 0.0, "unfusing in fp16 is not exact");
}

#[test]
fn lcm_style_lora_on_every_layer_matches_and_runs_in_the_stream() {
    let mut sd = load("lcm-tiny");
    let dir = std::env::temp_dir().join(format!("sdstream-lora-stream-{}", std::process::id()));
    let input = fixture("tests/fixtures/reference/input_64.png");
    let files = vec![input.clone(), input.clone(), input];
    let settings = sdstream::stream::settings::StreamSettings {
        prompt: "a watercolor fox".into(),
        width: 64,
        height: 64,
        t_index_list: vec![32, 45],
        ..Default::default()
    };
    let run = |sd: &StableDiffusion, tag: &str| -> Vec<Vec<u8>> {
        let out = dir.join(tag);
        let reports = sdstream::stream::offline::run_files(sd, settings.clone(), &files, &out, None).unwrap();
        reports
            .iter()
            .filter_map(|r| r.output.as_ref())
            .map(|p| sdstream::io::image::read(p).unwrap().into_raw())
            .collect()
    };
    let plain = run(&sd, "plain");
    sd.load_lora(&spec("lcm_kohya.safetensors", 1.0)).unwrap();
    let info = &sd.loras.list()[0];
    assert!(info.unet_layers > 50, "{info:?}");
    check(&sd, "lcm_tiny_lcm_g1.0");
    let fused = run(&sd, "fused");
    assert_eq!(plain.len(), fused.len());
    assert!(!plain.is_empty());
    assert_ne!(plain, fused, "the LoRA changed nothing in the stream");
    sd.loras.unfuse(0).unwrap();
    let again = run(&sd, "again");
    for (a, b) in plain.iter().zip(&again) {
        let worst = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(worst <= 1, "after unfusing, the stream differs by {worst}/255");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn write(path: &PathBuf, tensors: &[(&str, Tensor)]) {
    Tensor::write_safetensors(tensors, path).unwrap();
}

#[test]
fn bad_files_are_refused_naming_the_file_and_the_key() {
    let mut sd = load("sd1-tiny");
    let base = snapshot(&sd);
    let dir = std::env::temp_dir().join(format!("sdstream-bad-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let z = |s: &[i64]| Tensor::zeros(s, (Kind::Float, tch::Device::Cpu));
    let ok_a = || z(&[2, 8]);
    let ok_b = || z(&[8, 2]);
    type Case<'a> = (&'a str, Vec<(String, Tensor)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown_module",
            vec![
                (format!("{q}.lora_A.weight"), ok_a()),
                (format!("{q}.lora_B.weight"), ok_b()),
                ("unet.down_blocks.0.attentions.0.nope.lora_A.weight".into(), ok_a()),
                ("unet.down_blocks.0.attentions.0.nope.lora_B.weight".into(), ok_b()),
            ],
            "unet.down_blocks.0.attentions.0.nope.lora_A.weight",
        ),
        (
            "shape",
            vec![(format!("{q}.lora_A.weight"), z(&[2, 9])), (format!("{q}.lora_B.weight"), ok_b())],
            "to_q.lora_A.weight",
        ),
        ("loha", vec![("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a".into(), ok_a())], "LoHa"),
        (
            "dora",
            vec![
                (format!("{q}.lora_A.weight"), ok_a()),
                (format!("{q}.lora_B.weight"), ok_b()),
                (format!("{q}.lora_magnitude_vector"), z(&[8])),
            ],
            "DoRA",
        ),
        ("missing_up", vec![(format!("{q}.lora_A.weight"), ok_a())], "up (lora_B)"),
        (
            "kohya_unknown",
            vec![("lora_unet_input_blocks_99_1_proj_in.lora_down.weight".into(), ok_a())],
            "lora_unet_input_blocks_99_1_proj_in.lora_down.weight",
        ),
        ("garbage", vec![("weird.key".into(), ok_a())], "weird.key"),
    ];
    for (name, tensors, needle) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        let refs: Vec<(&str, Tensor)> =
            tensors.iter().map(|(k, t)| (k.as_str(), t.shallow_clone())).collect();
        write(&path, &refs);
        let e =
            sd.load_lora(&LoraSpec { path: path.display().to_string(), scale: 1.0 }).unwrap_err().to_string();
        assert!(e.contains(&format!("{name}.safetensors")), "{name}: error does not name the file: {e}");
        assert!(e.contains(needle), "{name}: error does not say `{needle}`: {e}");
        assert!(sd.loras.is_empty());
    }
    // Not a safetensors file at all; an empty folder; a missing path.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not safetensors").unwrap();
    let e = sd.load_lora(&LoraSpec { path: junk.display().to_string(), scale: 1.0 }).unwrap_err().to_string();
    assert!(e.contains("junk.safetensors"), "{e}");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e =
        sd.load_lora(&LoraSpec { path: empty.display().to_string(), scale: 1.0 }).unwrap_err().to_string();
    assert!(e.contains("no .safetensors"), "{e}");
    let e = sd.load_lora(&LoraSpec { path: "/no/such/lora.safetensors".into(), scale: 1.0 }).unwrap_err();
    assert!(e.to_string().contains("/no/such/lora.safetensors"), "{e}");
    // A folder holding exactly one file works.
    let one = dir.join("one");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::copy(fixture("tests/fixtures/lora/sd1_conv_kohya.safetensors"), one.join("x.safetensors"))
        .unwrap();
    assert!(weight_diff(&sd, &base).0 == 0.0, "a refused file patched weights");
    sd.load_lora(&LoraSpec { path: one.display().to_string(), scale: 1.0 }).unwrap();
    assert_eq!(sd.loras.list()[0].name, "x");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn engine_fuses_config_loras_at_load_and_changes_scales_live() {
    use sdstream::engine::{Engine, EngineConfig};
    let mut config =
        EngineConfig::new(fixture("tests/fixtures/models/sd1-tiny").display().to_string(), cpu_fp32(None));
    config.loras = vec![spec("sd1_peft.safetensors", 1.0), spec("sd1_conv_kohya.safetensors", 0.5)];
    let engine = Engine::start(config).unwrap();
    let settings = sdstream::stream::settings::StreamSettings { width: 64, height: 64, ..Default::default() };
    let stream = engine.handle().open_stream(settings, 4).unwrap();
    let list = engine.handle().set_lora_scale("sd1_peft", 0.25).unwrap();
    assert_eq!(list.iter().map(|l| l.scale).collect::<Vec<_>>(), [0.25, 0.5]);
    let list = engine.handle().set_lora_scale("1", 0.0).unwrap();
    assert_eq!(list[1].scale, 0.0);
    let e = engine.handle().set_lora_scale("nope", 1.0).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("sd1_conv_kohya"), "{e}");
    assert!(engine.handle().set_lora_scale("sd1_peft", f64::NAN).is_err());
    stream.submit(Some(image::RgbImage::new(64, 64)));
    let out = stream.outputs.as_ref().unwrap().recv_timeout(std::time::Duration::from_secs(60)).unwrap();
    drop(out);
    drop(stream);
    engine.shutdown();

    // A bad LoRA fails the engine's start with the file named.
    let mut config =
        EngineConfig::new(fixture("tests/fixtures/models/sd1-tiny").display().to_string(), cpu_fp32(None));
    config.loras = vec![spec("lcm_kohya.safetensors", 1.0)];
    let e = Engine::start(config).err().expect("lcm-tiny's LoRA does not fit sd1-tiny").to_string();
    assert!(e.contains("lcm_kohya.safetensors"), "{e}");
}

#[test]
fn configs_and_flags_name_loras() {
    let c = sdstream::config::DaemonConfig::from_file(&fixture("configs/sd15-lcm-lora.toml")).unwrap();
    assert_eq!(c.model.loras, [LoraSpec { path: "latent-consistency/lcm-lora-sdv1-5".into(), scale: 1.0 }]);
    let c: sdstream::config::DaemonConfig =
        toml::from_str("[model]\nloras = [{ path = \"a.safetensors\" }, { path = \"b\", scale = 0.5 }]")
            .unwrap();
    assert_eq!(c.model.loras[0].scale, 1.0);
    assert_eq!(c.model.loras[1].scale, 0.5);
    assert!(toml::from_str::<sdstream::config::DaemonConfig>("[model]\nloras = [{ file = \"a\" }]").is_err());
}
