//! Parity of the CLIP tokenizer and text encoder with transformers (fixtures from tools/make_fixtures.py), both
//! key layouts of the text encoder's weights, plus the errors a broken tokenizer folder or weights file gives.
mod common;

use common::{assert_max_abs, read_tensors, tensor};
use sdstream::models::clip::{ClipKeyLayout, ClipTextConfig, ClipTextModel};
use sdstream::models::tokenizer::ClipTokenizer;
use sdstream::models::weights::stored_shapes;
use sdstream::models::{read_config, Weights};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

const MODELS: [&str; 3] = ["sd1-tiny", "sd2-tiny", "lcm-tiny"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture path that must exist (run tools/make_fixtures.py to create them).
fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(p.exists(), "missing test fixture {} (generate with tools/make_fixtures.py)", p.display());
    p
}

#[test]
fn tokenizer_matches_transformers() {
    for model in MODELS {
        let tok = ClipTokenizer::from_dir(&fixture(&format!("models/{model}/tokenizer"))).unwrap();
        assert_eq!(tok.max_length(), 77);
        let ref_path = fixture(&format!("reference/{model}/tokenizer.json"));
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&ref_path).unwrap()).unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want: Vec<i64> =
                case["input_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let got = tok.encode(text).unwrap();
            assert_eq!(got, want, "{model}: ids for {text:?}");
        }
    }
}

#[test]
fn tokenizer_pad_tokens() {
    let sd1 = ClipTokenizer::from_dir(&fixture("models/sd1-tiny/tokenizer")).unwrap();
    let sd2 = ClipTokenizer::from_dir(&fixture("models/sd2-tiny/tokenizer")).unwrap();
    // SD 1.x pads with <|endoftext|>, SD 2.x with "!"
    assert_eq!(sd1.pad_id(), sd1.eos_id());
    assert_ne!(sd2.pad_id(), sd2.eos_id());
    let ids = sd2.encode("a cat").unwrap();
    assert_eq!(ids[0], sd2.bos_id());
    assert_eq!(*ids.last().unwrap(), sd2.pad_id());
    // truncation keeps the end-of-text token
    let long = sd1.encode(&"cat ".repeat(200)).unwrap();
    assert_eq!(long.len(), 77);
    assert_eq!(long[76], sd1.eos_id());
}

fn load_text_encoder(model: &str) -> (ClipTextModel, Weights) {
    let dir = fixture(&format!("models/{model}/text_encoder"));
    let cfg: ClipTextConfig = read_config(&dir.join("config.json")).unwrap();
    let w = Weights::from_safetensors(
        &[fixture(&format!("models/{model}/text_encoder/model.safetensors"))],
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let m = ClipTextModel::new(&w, cfg).unwrap();
    (m, w)
}

#[test]
fn text_encoder_matches_transformers() {
    tch::set_num_threads(1);
    for model in MODELS {
        let (m, w) = load_text_encoder(model);
        assert_eq!(w.unused(), Vec::<String>::new(), "{model}: unused text encoder weights");
        let ref_path = fixture(&format!("reference/{model}/text_encoder.safetensors"));
        let r = read_tensors(&ref_path);
        let ids = tensor(&r, "input_ids", &ref_path);
        let _guard = tch::no_grad_guard();
        let last = m.forward(ids).unwrap();
        assert_max_abs(
            &format!("{model} last_hidden_state"),
            &last,
            tensor(&r, "last_hidden_state", &ref_path),
            1e-4,
        );
        let pen = m.hidden_state(ids, 1).unwrap();
        assert_max_abs(
            &format!("{model} penultimate"),
            &pen,
            tensor(&r, "hidden_state_penultimate", &ref_path),
            1e-4,
        );
        if let Some(normed) = r.get("hidden_state_penultimate_normed") {
            let skip1 = m.forward_with_skip(ids, 1).unwrap();
            assert_max_abs(&format!("{model} clip_skip=1"), &skip1, normed, 1e-4);
        }
        let n = m.config().num_hidden_layers;
        assert!(
            m.forward_with_skip(ids, n).is_ok(),
            "clip_skip up to the layer count reaches the embeddings"
        );
        assert!(
            m.forward_with_skip(ids, n + 1).is_err(),
            "clip_skip beyond the layer count must be an error"
        );
    }
}

#[test]
fn text_encoder_config_defaults() {
    let cfg: ClipTextConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, ClipTextConfig::default());
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act.as_str()), (512, 12, "quick_gelu"));
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdstream-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn missing_vocab_is_an_error_naming_it() {
    let src = fixture("models/sd1-tiny/tokenizer");
    let d = scratch_dir("novocab");
    for f in ["merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let err = ClipTokenizer::from_dir(&d).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "error does not name vocab.json: {err}");
    std::fs::copy(src.join("vocab.json"), d.join("vocab.json")).unwrap();
    std::fs::remove_file(d.join("merges.txt")).unwrap();
    let err = ClipTokenizer::from_dir(&d).unwrap_err().to_string();
    assert!(err.contains("merges.txt"), "error does not name merges.txt: {err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn truncated_weights_are_an_error_naming_the_file() {
    let src = fixture("models/sd1-tiny/text_encoder/model.safetensors");
    let d = scratch_dir("truncated");
    let bytes = std::fs::read(&src).unwrap();
    for (i, keep) in [bytes.len() / 2, 20, 4].into_iter().enumerate() {
        let p = d.join(format!("model{i}.safetensors"));
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let err = match Weights::from_safetensors(&[&p], Device::Cpu, Kind::Float) {
            Ok(_) => panic!("a file cut to {keep} bytes loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&p.display().to_string()), "error does not name the file: {err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// The text encoder of `models/{model}/{dir}`, loaded as the pipelines load it (either key layout).
fn load_any_layout(model: &str, dir: &str) -> (ClipTextModel, Weights) {
    let d = fixture(&format!("models/{model}/{dir}"));
    let cfg: ClipTextConfig = read_config(&d.join("config.json")).unwrap();
    ClipTextModel::load(&[d.join("model.safetensors")], cfg, Device::Cpu, Kind::Float).unwrap()
}

fn layout_of(file: &Path) -> Option<ClipKeyLayout> {
    let names = stored_shapes(file).unwrap();
    ClipKeyLayout::detect(names.keys().map(String::as_str))
}

/// tests/fixtures/models/*-flat hold the tiny models' text encoders without the `text_model.` level, as
/// transformers 5 saves `CLIPTextModel` (and with `text_projection` at the top level for SDXL's
/// `CLIPTextModelWithProjection`): the same tensors under other names (tools/make_fixtures.py and
/// make_sdxl_fixtures.py check transformers and diffusers give the same outputs for both). Both load to the very
/// same model, under the same names.
#[test]
fn both_key_layouts_load_the_same_text_encoder() {
    tch::set_num_threads(1);
    let _guard = tch::no_grad_guard();
    for (model, dir) in [
        ("sd1-tiny", "text_encoder"),
        ("sd2-tiny", "text_encoder"),
        ("sdxl-tiny", "text_encoder"),
        ("sdxl-tiny", "text_encoder_2"),
    ] {
        let flat_model = format!("{model}-flat");
        let nested_file = fixture(&format!("models/{model}/{dir}/model.safetensors"));
        let flat_file = fixture(&format!("models/{flat_model}/{dir}/model.safetensors"));
        assert_eq!(layout_of(&nested_file), Some(ClipKeyLayout::Nested), "{model}/{dir}");
        assert_eq!(layout_of(&flat_file), Some(ClipKeyLayout::Flat), "{flat_model}/{dir}");
        assert!(
            stored_shapes(&flat_file).unwrap().keys().all(|k| !k.starts_with("text_model.")),
            "{flat_model}/{dir} is not in the flat layout"
        );

        let (a, wa) = load_any_layout(model, dir);
        let (b, wb) = load_any_layout(&flat_model, dir);
        assert_eq!(wb.unused(), Vec::<String>::new(), "{flat_model}/{dir}: unused tensors");
        assert_eq!(wa.loaded_names(), wb.loaded_names(), "{dir}: the layouts load under other names");
        assert!(wb
            .loaded_names()
            .iter()
            .all(|n| n.starts_with("text_model.") || n.starts_with("text_projection.")));
        for n in wa.loaded_names() {
            assert!(
                wa.loaded(&n).unwrap().equal(&wb.loaded(&n).unwrap()),
                "{flat_model}/{dir}: `{n}` differs"
            );
        }
        assert_eq!(a.has_projection(), dir == "text_encoder_2");

        let ids = tch::Tensor::arange_start(0, 154, (Kind::Int64, Device::Cpu)).remainder(900).view([2, 77]);
        assert!(a.forward(&ids).unwrap().equal(&b.forward(&ids).unwrap()), "{flat_model}/{dir}: last state");
        let (ha, pa) = a.hidden_and_pooled(&ids, 1).unwrap();
        let (hb, pb) = b.hidden_and_pooled(&ids, 1).unwrap();
        assert!(ha.equal(&hb), "{flat_model}/{dir}: penultimate state");
        assert_eq!(pa.is_some(), pb.is_some());
        if let (Some(pa), Some(pb)) = (pa, pb) {
            assert!(pa.equal(&pb), "{flat_model}/{dir}: pooled, projected output");
        }
    }
}

/// Writes `tensors` (renamed by `rename`; `None` drops one) as a safetensors file.
fn write_renamed(src: &Path, dst: &Path, rename: impl Fn(&str) -> Option<String>) {
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(src)
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| rename(&k).map(|k| (k, t)))
        .collect();
    tch::Tensor::write_safetensors(&tensors, dst).unwrap();
}

#[test]
fn text_encoder_files_in_neither_layout_or_incomplete_are_errors_naming_what_is_missing() {
    let src = fixture("models/sd1-tiny/text_encoder/model.safetensors");
    let cfg: ClipTextConfig = read_config(&fixture("models/sd1-tiny/text_encoder/config.json")).unwrap();
    let d = scratch_dir("layouts");
    let load = |p: &Path| match ClipTextModel::load(&[p], cfg.clone(), Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    };

    // Neither layout: the error names the file and both places the token embedding is looked for.
    let other = d.join("other.safetensors");
    write_renamed(&src, &other, |k| Some(format!("clip.{k}")));
    let e = load(&other);
    for needle in [
        other.display().to_string().as_str(),
        "`text_model.embeddings.token_embedding.weight`",
        "`embeddings.token_embedding.weight`",
    ] {
        assert!(e.contains(needle), "the error does not name {needle}: {e}");
    }

    // The flat layout with a tensor missing: named as the modules ask for it, with the layout it was looked for in.
    let gap = d.join("gap.safetensors");
    write_renamed(&src, &gap, |k| {
        let flat = k.strip_prefix("text_model.").unwrap_or(k);
        (flat != "encoder.layers.1.mlp.fc2.weight").then(|| flat.to_string())
    });
    let e = load(&gap);
    for needle in
        ["text_model.encoder.layers.1.mlp.fc2.weight", "without the `text_model.` prefix", "gap.safetensors"]
    {
        assert!(e.contains(needle), "the error does not say {needle}: {e}");
    }
    // The nested layout with a tensor missing says what it always said.
    let gap2 = d.join("gap2.safetensors");
    write_renamed(&src, &gap2, |k| (k != "text_model.final_layer_norm.bias").then(|| k.to_string()));
    let e = load(&gap2);
    assert!(
        e.contains("`text_model.final_layer_norm.bias` is missing") && e.contains("gap2.safetensors"),
        "{e}"
    );

    // A renaming store refuses two stored tensors that would read as one.
    let e = match Weights::from_safetensors_renamed(&[&src], Device::Cpu, Kind::Float, |_| "x".into(), "test")
    {
        Ok(_) => panic!("two tensors under one name"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("both stand for `x`"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
