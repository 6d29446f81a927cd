//! Parity of AutoencoderKL and AutoencoderTiny (TAESD) with diffusers (fixtures from tools/make_fixtures.py).
mod common;

use common::{assert_max_abs, read_tensors, tensor};
use sdstream::models::taesd::{AutoencoderTiny, AutoencoderTinyConfig};
use sdstream::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use sdstream::models::{read_config, Weights};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const MODELS: [&str; 3] = ["sd1-tiny", "sd2-tiny", "lcm-tiny"];

/// A fixture path that must exist (run tools/make_fixtures.py to create them).
fn fixture(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel);
    assert!(p.exists(), "missing test fixture {} (generate with tools/make_fixtures.py)", p.display());
    p
}

fn load_vae(model: &str) -> (AutoencoderKL, Weights) {
    let cfg: AutoencoderKLConfig = read_config(&fixture(&format!("models/{model}/vae/config.json"))).unwrap();
    let file = fixture(&format!("models/{model}/vae/diffusion_pytorch_model.safetensors"));
    let w = Weights::from_safetensors(&[file], Device::Cpu, Kind::Float).unwrap();
    (AutoencoderKL::new(&w, cfg).unwrap(), w)
}

#[test]
fn vae_matches_diffusers() {
    tch::set_num_threads(1);
    let _guard = tch::no_grad_guard();
    for model in MODELS {
        let (vae, w) = load_vae(model);
        assert_eq!(w.unused(), Vec::<String>::new(), "{model}: unused VAE weights");
        assert_eq!(vae.downscale_factor(), 1 << (vae.config().block_out_channels.len() - 1));
        let ref_path = fixture(&format!("reference/{model}/vae.safetensors"));
        let r = read_tensors(&ref_path);
        let dist = vae.encode(tensor(&r, "image", &ref_path)).unwrap();
        assert_max_abs(&format!("{model} mean"), &dist.mean, tensor(&r, "mean", &ref_path), 1e-4);
        assert_max_abs(&format!("{model} logvar"), &dist.logvar, tensor(&r, "logvar", &ref_path), 1e-4);
        let noise = dist.mean.randn_like();
        let sample = dist.sample(&noise).unwrap();
        let want = tensor(&r, "mean", &ref_path)
            + tensor(&r, "logvar", &ref_path).multiply_scalar(0.5).exp() * &noise;
        assert_max_abs(&format!("{model} sample"), &sample, &want, 1e-4);
        let decoded = vae.decode(tensor(&r, "latent_in", &ref_path)).unwrap();
        assert_max_abs(&format!("{model} decoded"), &decoded, tensor(&r, "decoded", &ref_path), 1e-4);
    }
}

/// Checkpoints saved before diffusers 0.14 name the mid-block attention `query/key/value/proj_attn`.
#[test]
fn vae_loads_deprecated_attention_names() {
    let _guard = tch::no_grad_guard();
    let model = "sd1-tiny";
    let file = fixture(&format!("models/{model}/vae/diffusion_pytorch_model.safetensors"));
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, t)
        })
        .collect();
    assert!(renamed.iter().any(|(k, _)| k.contains("proj_attn")));
    let dir = std::env::temp_dir().join(format!("sdstream-test-{}-oldvae", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("vae.safetensors");
    Tensor::write_safetensors(&renamed, &p).unwrap();
    let cfg: AutoencoderKLConfig = read_config(&fixture(&format!("models/{model}/vae/config.json"))).unwrap();
    let w = Weights::from_safetensors(&[&p], Device::Cpu, Kind::Float).unwrap();
    let vae = AutoencoderKL::new(&w, cfg).unwrap();
    assert_eq!(w.unused(), Vec::<String>::new());
    let ref_path = fixture(&format!("reference/{model}/vae.safetensors"));
    let r = read_tensors(&ref_path);
    let decoded = vae.decode(tensor(&r, "latent_in", &ref_path)).unwrap();
    assert_max_abs("old-name VAE decoded", &decoded, tensor(&r, "decoded", &ref_path), 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vae_config_defaults() {
    let cfg: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, AutoencoderKLConfig::default());
    assert_eq!((cfg.scaling_factor, cfg.layers_per_block, cfg.norm_num_groups), (0.18215, 1, 32));
    let bad: AutoencoderKLConfig = serde_json::from_str(
        r#"{"down_block_types": ["DownBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    assert!(AutoencoderKL::new(&Weights::shapes_only(Kind::Float), bad).is_err());
}

#[test]
fn taesd_matches_diffusers() {
    tch::set_num_threads(1);
    let _guard = tch::no_grad_guard();
    let dir = fixture("models/taesd-tiny");
    let cfg: AutoencoderTinyConfig = read_config(&dir.join("config.json")).unwrap();
    let w = Weights::from_safetensors(
        &[fixture("models/taesd-tiny/diffusion_pytorch_model.safetensors")],
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let taesd = AutoencoderTiny::new(&w, cfg).unwrap();
    assert_eq!(w.unused(), Vec::<String>::new(), "unused TAESD weights");
    assert_eq!(taesd.scaling_factor(), 1.0);
    assert_eq!(taesd.downscale_factor(), 8);
    let ref_path = fixture("reference/taesd-tiny/taesd.safetensors");
    let r = read_tensors(&ref_path);
    let latents = taesd.encode(tensor(&r, "image", &ref_path)).unwrap();
    assert_max_abs("taesd latents", &latents, tensor(&r, "latents", &ref_path), 1e-4);
    let decoded = taesd.decode(tensor(&r, "latent_in", &ref_path)).unwrap();
    assert_max_abs("taesd decoded", &decoded, tensor(&r, "decoded", &ref_path), 1e-4);
}

#[test]
fn taesd_default_config_builds() {
    let cfg: AutoencoderTinyConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, AutoencoderTinyConfig::default());
    let w = Weights::random(Device::Cpu, Kind::Float);
    let taesd = AutoencoderTiny::new(&w, cfg).unwrap();
    let _guard = tch::no_grad_guard();
    let img = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let z = taesd.encode(&img).unwrap();
    assert_eq!(z.size(), [1, 4, 4, 4]);
    assert_eq!(taesd.decode(&z).unwrap().size(), [1, 3, 32, 32]);
}
