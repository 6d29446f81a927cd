//! The command line with bad input: every case exits non-zero with a message naming the file, field or flag,
//! and never panics. Plus the single-image commands on the bundled tiny TEST model.
mod common;

use std::path::{Path, PathBuf};

fn sdstream(args: &[&str]) -> (bool, String) {
    let (ok, text) = common::run_sdstream(args, &[]);
    assert!(!text.contains("cannot be used multiple times"), "test bug: a flag given twice: {args:?}");
    (ok, text)
}

fn fails_naming(args: &[&str], needle: &str) {
    let (ok, text) = sdstream(args);
    assert!(!ok, "sdstream {args:?} should fail:\n{text}");
    assert!(text.contains(needle), "sdstream {args:?}: the message should name `{needle}`:\n{text}");
}

/// A copy of the tiny test model in a temporary folder, to break.
fn model_copy(name: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("sdstream-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&common::fixture("models/tiny-sd-test"), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// `txt2img` on `model` with defaults for every flag that `extra` does not set.
fn txt2img(model: &str, extra: &[&str]) -> Vec<String> {
    let defaults = [
        ("--device", "cpu"),
        ("--output", "/tmp/sdstream-cli-out.png"),
        ("--prompt", "a fox"),
        ("--steps", "2"),
        ("--width", "64"),
        ("--height", "64"),
    ];
    let mut v: Vec<String> = vec!["txt2img".into(), "--model".into(), model.into()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.extend([flag.to_string(), value.to_string()]);
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn bad_flags_are_named() {
    let m = "models/tiny-sd-test";
    fails_naming(&run(&txt2img(m, &["--width", "100"])), "width");
    fails_naming(&run(&txt2img(m, &["--scheduler", "pndm"])), "scheduler");
    fails_naming(&run(&txt2img(m, &["--device", "tpu"])), "device");
    fails_naming(&run(&txt2img(m, &["--device", "cuda:7"])), "cuda:7");
    fails_naming(&run(&txt2img(m, &["--dtype", "int3"])), "dtype");
    fails_naming(&run(&txt2img("no/such-model-anywhere", &[])), "--model");
    fails_naming(&run(&txt2img("/no/such/folder", &[])), "/no/such/folder");
    fails_naming(
        &["img2img", "--model", m, "--prompt", "x", "--image", "/no/such.png", "--device", "cpu"],
        "/no/such.png",
    );
    let bad = std::env::temp_dir().join("sdstream-cli-not-an-image.png");
    std::fs::write(&bad, b"definitely not a png").unwrap();
    fails_naming(
        &["img2img", "--model", m, "--prompt", "x", "--image", bad.to_str().unwrap(), "--device", "cpu"],
        "not-an-image",
    );
    fails_naming(&["serve", "--config", "configs/tiny.toml", "--listen", "0.0.0.0:8765"], "--token");
    fails_naming(&["serve", "--config", "/no/such.toml"], "/no/such.toml");
    fails_naming(&["stream", "--model", m, "--input", "/no/such/dir", "--output", "/tmp/x"], "/no/such/dir");
    fails_naming(
        &["stream", "--model", m, "--input", "models", "--output", "/tmp/x", "--cfg-type", "half"],
        "--cfg-type",
    );
    // Enum settings are clap value enums: the message lists the choices.
    fails_naming(
        &["serve", "--config", "configs/tiny.toml", "--cfg-type", "half"],
        "none, full, self, initialize",
    );
    fails_naming(&["serve", "--config", "configs/tiny.toml", "--mode", "img3img"], "img2img, txt2img");
}

/// `--timestep-spacing` takes diffusers' three values on txt2img, img2img and stream (and serve's stream
/// settings); anything else is refused, naming the flag, the value and the choices, before a model is loaded.
#[test]
fn a_bad_timestep_spacing_names_the_choices() {
    let m = "models/tiny-sd-test";
    let bad = ["--timestep-spacing", "sideways"];
    let img2img = ["img2img", "--model", m, "--prompt", "x", "--image", "/no/such.png", "--device", "cpu"];
    let stream = ["stream", "--model", m, "--input", "models", "--output", "/tmp/x"];
    let serve = ["serve", "--config", "configs/tiny.toml"];
    let t2i = txt2img(m, &[]);
    for base in [run(&t2i), img2img.to_vec(), stream.to_vec(), serve.to_vec()] {
        let args: Vec<&str> = base.iter().copied().chain(bad).collect();
        let (ok, text) = sdstream(&args);
        assert!(!ok, "sdstream {args:?} should fail:\n{text}");
        for needle in ["--timestep-spacing", "sideways", "leading, trailing, linspace"] {
            assert!(text.contains(needle), "sdstream {args:?}: the message should name `{needle}`:\n{text}");
        }
    }
    // A client's `settings` message names the field and the choices.
    use sdstream::server::protocol::ClientMessage;
    let e = ClientMessage::parse(r#"{"type":"settings","timestep_spacing":"sideways"}"#).unwrap_err();
    assert!(
        e.message.contains("timestep_spacing")
            && e.message.contains("leading")
            && e.message.contains("linspace"),
        "{e:?}"
    );
}

/// A valid `--timestep-spacing` changes the image where the scheduler uses it (Euler), exactly as the same run
/// through the library with the override does (tests/pipeline.rs checks that against diffusers).
#[test]
fn timestep_spacing_reaches_the_scheduler() {
    let dir = std::env::temp_dir().join(format!("sdstream-cli-spacing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run_with = |spacing: Option<&str>, out: &str| -> Vec<u8> {
        let path = dir.join(out);
        let mut args = txt2img("tests/fixtures/models/sd1-tiny", &["--output", path.to_str().unwrap()]);
        args.extend(["--scheduler", "euler", "--guidance", "1.0"].map(String::from));
        if let Some(s) = spacing {
            args.extend(["--timestep-spacing".to_string(), s.to_string()]);
        }
        let (ok, text) = sdstream(&run(&args));
        assert!(ok, "{text}");
        std::fs::read(&path).unwrap()
    };
    let plain = run_with(None, "plain.png");
    assert_eq!(plain, run_with(Some("leading"), "leading.png"), "sd1-tiny's config says leading");
    assert_ne!(plain, run_with(Some("trailing"), "trailing.png"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_reports_a_port_in_use_before_loading_the_model() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // A hub id that no cache has (run_sdstream sets HF_HUB_OFFLINE): loading it would fail with its own
    // message, so getting the port's message instead shows the port is bound before the model is looked at.
    let t0 = std::time::Instant::now();
    let (ok, text) = sdstream(&["serve", "--model", "test-org/in-no-cache", "--listen", &addr]);
    assert!(!ok, "serve on a port in use should fail:\n{text}");
    assert!(text.contains(&format!("cannot listen on {addr}")), "the message names the address:\n{text}");
    assert!(text.contains("in use") && text.contains("--listen"), "it says why and what to do:\n{text}");
    assert!(!text.contains("in-no-cache"), "the model is not loaded first:\n{text}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "reported at once");
    drop(taken);
}

#[test]
fn broken_model_files_are_named() {
    // A truncated weights file.
    let dir = model_copy("truncated");
    let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    fails_naming(&run(&txt2img(dir.to_str().unwrap(), &[])), "diffusion_pytorch_model.safetensors");
    // A missing weights file.
    std::fs::remove_file(&unet).unwrap();
    fails_naming(&run(&txt2img(dir.to_str().unwrap(), &[])), "unet/diffusion_pytorch_model");
    // A config whose shapes do not match the weights: the tensor and both shapes are named.
    let dir = model_copy("shape");
    let cfg_path = dir.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["cross_attention_dim"] = 40.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    fails_naming(&run(&txt2img(dir.to_str().unwrap(), &[])), "attn2.to_k.weight");
    // An unsupported config.
    cfg["cross_attention_dim"] = 48.into();
    cfg["addition_embed_type"] = "image".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    fails_naming(&run(&txt2img(dir.to_str().unwrap(), &[])), "addition_embed_type");
    // Bad JSON.
    std::fs::write(&cfg_path, "{ not json").unwrap();
    fails_naming(&run(&txt2img(dir.to_str().unwrap(), &[])), "config.json");
}

#[test]
fn single_image_commands_write_pngs() {
    let out = std::env::temp_dir().join(format!("sdstream-cli-{}.png", std::process::id()));
    let (ok, text) = sdstream(&[
        "txt2img",
        "--model",
        "models/tiny-sd-test",
        "--prompt",
        "a fox",
        "--seed",
        "3",
        "--steps",
        "2",
        "--scheduler",
        "euler",
        "--guidance",
        "1.0",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("random-weight TEST model"), "the log names the test model:\n{text}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    let out2 = std::env::temp_dir().join(format!("sdstream-cli-{}-i2i.png", std::process::id()));
    let (ok, text) = sdstream(&[
        "img2img",
        "--model",
        "models/tiny-sd-test",
        "--prompt",
        "a fox",
        "--image",
        out.to_str().unwrap(),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--scheduler",
        "lcm",
        "--device",
        "cpu",
        "--output",
        out2.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert_eq!(image::open(&out2).unwrap().width(), 64);
}

/// `--scheduler auto` (the default) runs the model's own scheduler class, as diffusers does: LCM for the LCM
/// test model, Euler ancestral where the config names it, DDIM for a class not implemented (SD 1.5's PNDM).
#[test]
fn the_default_scheduler_is_the_models_own() {
    let dir = std::env::temp_dir().join(format!("sdstream-cli-auto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |model: &str, scheduler: Option<&str>, out: &str| -> Vec<u8> {
        let path = dir.join(out);
        let mut args = txt2img(model, &["--output", path.to_str().unwrap()]);
        if let Some(s) = scheduler {
            args.extend(["--scheduler".to_string(), s.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, text) = sdstream(&args);
        assert!(ok, "{text}");
        std::fs::read(&path).unwrap()
    };
    let lcm = "tests/fixtures/models/lcm-tiny";
    assert_eq!(run(lcm, None, "lcm-auto.png"), run(lcm, Some("lcm"), "lcm-lcm.png"));
    assert_ne!(run(lcm, None, "lcm-auto2.png"), run(lcm, Some("ddim"), "lcm-ddim.png"));
    let sd1 = "tests/fixtures/models/sd1-tiny";
    assert_eq!(run(sd1, None, "sd1-auto.png"), run(sd1, Some("ddim"), "sd1-ddim.png"));
    let _ = std::fs::remove_dir_all(&dir);
}
