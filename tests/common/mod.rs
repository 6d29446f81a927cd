//! Helpers shared by the integration tests: fixture paths, reference tensors, comparisons.
#![allow(dead_code)]
pub mod daemon;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// A path under the repository root; panics (fails the test) naming the fixture when it does not exist.
/// The repository root is the one the tests were built in, or `SDSTREAM_FIXTURE_ROOT` (a test binary run on
/// another machine, e.g. the GPU check in scripts/gpu-bench.sh).
pub fn fixture(rel: &str) -> PathBuf {
    let root = std::env::var("SDSTREAM_FIXTURE_ROOT").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let p = PathBuf::from(root).join(rel);
    assert!(p.exists(), "missing fixture {} (regenerate with the scripts in tools/)", p.display());
    p
}

/// All tensors of a safetensors file by name.
pub fn tensors(rel: &str) -> HashMap<String, Tensor> {
    let p = fixture(rel);
    Tensor::read_safetensors(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).into_iter().collect()
}

pub fn json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Largest absolute difference (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let a = a.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    let b = b.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    (a - b).abs().max().double_value(&[])
}

/// Asserts |a - b| <= atol + rtol * |b| elementwise, naming `what`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(a.size(), b.size(), "{what}: shape {:?} vs {:?}", a.size(), b.size());
    let a = a.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    let b = b.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    let excess = ((&a - &b).abs() - (b.abs() * rtol + atol)).max().double_value(&[]);
    assert!(excess <= 0.0, "{what}: max abs diff {} exceeds atol {atol} + rtol {rtol}", max_abs_diff(&a, &b));
}

pub fn cpu_fp32(vae: Option<String>) -> sdstream::models::stable_diffusion::LoadOptions {
    sdstream::models::stable_diffusion::LoadOptions {
        device: tch::Device::Cpu,
        kind: tch::Kind::Float,
        vae,
        controlnet: None,
        model_config: None,
    }
}

/// The device the device-aware tests run on: `SDSTREAM_TEST_DEVICE` (e.g. `cuda`, for the GPU check), else
/// the CPU.
pub fn test_device() -> tch::Device {
    match std::env::var("SDSTREAM_TEST_DEVICE") {
        Ok(d) => sdstream::device::parse_device(&d).expect("SDSTREAM_TEST_DEVICE names a device"),
        Err(_) => tch::Device::Cpu,
    }
}

/// [`cpu_fp32`] on [`test_device`].
pub fn test_fp32(vae: Option<String>) -> sdstream::models::stable_diffusion::LoadOptions {
    sdstream::models::stable_diffusion::LoadOptions { device: test_device(), ..cpu_fp32(vae) }
}

/// All tensors of a safetensors file (any path).
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// A named tensor of a fixture, failing the test with the file and name when it is absent.
pub fn tensor<'a>(m: &'a HashMap<String, Tensor>, name: &str, file: &Path) -> &'a Tensor {
    m.get(name).unwrap_or_else(|| panic!("fixture {} has no tensor `{name}`", file.display()))
}

/// Asserts the largest absolute difference is below `tol` (and reports it).
pub fn assert_max_abs(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let diff = max_abs_diff(got, want);
    assert!(diff < tol, "{what}: max abs diff {diff:e} >= {tol:e}");
    eprintln!("{what}: max abs diff {diff:e}");
}

/// Decodes `latents` with the model's autoencoder and asserts the 8-bit picture is within 2/255 per pixel of
/// the reference PNG (diffusers' own output).
pub fn assert_png_matches(
    what: &str,
    sd: &sdstream::models::stable_diffusion::StableDiffusion,
    latents: &Tensor,
    png: &str,
) {
    let image = sd.autoencoder.decode_scaled(latents).unwrap();
    let rgb = sdstream::io::image::to_rgb8(&image).unwrap();
    let want = sdstream::io::image::read(&fixture(png)).unwrap();
    assert_eq!(rgb.dimensions(), want.dimensions(), "{what}: size");
    let worst = rgb.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 2, "{what}: PNG differs by {worst}/255");
}

/// The generation parameters a reference case's JSON names (prompt, negative prompt, seed, steps, scheduler, a
/// `timestep_spacing` override, guidance), at the given size.
pub fn generate_params(
    case: &serde_json::Value,
    width: i64,
    height: i64,
) -> sdstream::pipeline::GenerateParams {
    sdstream::pipeline::GenerateParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_string),
        seed: case["seed"].as_u64().unwrap(),
        steps: case["steps"].as_u64().unwrap() as usize,
        scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
        timestep_spacing: case["timestep_spacing"].as_str().map(|s| s.parse().unwrap()),
        guidance: case["guidance"].as_f64().unwrap(),
        width,
        height,
        clip_skip: case["clip_skip"].as_u64().map(|k| k as usize),
        micro: sdstream::pipeline::MicroConditioning {
            original_size: pair(&case["original_size"]),
            crops_coords_top_left: pair(&case["crops_coords_top_left"]).unwrap_or((0, 0)),
            target_size: pair(&case["target_size"]),
        },
    }
}

/// A JSON `[a, b]` as a pair.
fn pair(v: &serde_json::Value) -> Option<(i64, i64)> {
    let a = v.as_array()?;
    Some((a.first()?.as_i64()?, a.get(1)?.as_i64()?))
}

/// Runs the `sdstream` binary from the repository root (offline, no backtraces) with `envs` added; gives whether
/// it succeeded and its stdout + stderr. A panic fails the test: bad input must give a message, never a panic.
pub fn run_sdstream(args: &[&str], envs: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdstream"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).env("HF_HUB_OFFLINE", "1").env("RUST_BACKTRACE", "0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "sdstream {args:?} panicked:\n{text}");
    (out.status.success(), text)
}

/// The stream settings of a StreamDiffusion fixture case (tests/fixtures/stream/*.json).
pub fn stream_case_settings(case: &serde_json::Value) -> sdstream::stream::settings::StreamSettings {
    sdstream::stream::settings::StreamSettings {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap_or("").into(),
        mode: if case["mode"] == "txt2img" {
            sdstream::stream::settings::Mode::Txt2img
        } else {
            sdstream::stream::settings::Mode::Img2img
        },
        t_index_list: case["t_index_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect(),
        cfg_type: serde_json::from_value(case["cfg_type"].clone()).unwrap(),
        guidance: case["guidance_scale"].as_f64().unwrap(),
        delta: case["delta"].as_f64().unwrap(),
        add_noise: case["do_add_noise"].as_bool().unwrap(),
        denoising_batch: case["use_denoising_batch"].as_bool().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        width: case["width"].as_i64().unwrap(),
        height: case["height"].as_i64().unwrap(),
        ..Default::default()
    }
}
