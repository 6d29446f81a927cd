//! SDXL's parts against diffusers/transformers on the tiny random-weight TEST model `sdxl-tiny` (made by
//! tools/make_sdxl_fixtures.py): both text encoders (penultimate states, clip_skip, the pooled and projected
//! output), `encode_prompt`, and the UNet with its `text_time` added embedding. The whole pipelines are checked
//! in tests/pipeline.rs.
mod common;

use common::*;
use sdstream::models::stable_diffusion::StableDiffusion;
use sdstream::models::unet::{AddedCond, UNetExtra};

const MODEL: &str = "tests/fixtures/models/sdxl-tiny";

fn load() -> StableDiffusion {
    StableDiffusion::load(&fixture(MODEL).display().to_string(), &cpu_fp32(None)).unwrap()
}

#[test]
fn text_encoders_and_encode_prompt_match_transformers() {
    let sd = load();
    assert!(sd.is_sdxl() && sd.force_zeros_for_empty_prompt);
    let r = tensors("tests/fixtures/reference/sdxl-tiny/model.safetensors");
    let te2 = sd.text_encoder_2.as_ref().unwrap();
    for (i, te) in [(1, &sd.text_encoder), (2, te2)] {
        let ids = &r[&format!("te{i}_input_ids")];
        let (pen, pooled) = te.hidden_and_pooled(ids, 1).unwrap();
        assert_close(&format!("te{i} penultimate"), &pen, &r[&format!("te{i}_penultimate")], 1e-5, 1e-5);
        let (skip1, _) = te.hidden_and_pooled(ids, 2).unwrap();
        assert_close(&format!("te{i} skip 1"), &skip1, &r[&format!("te{i}_skip1")], 1e-5, 1e-5);
        assert_eq!(pooled.is_some(), i == 2);
        if let Some(p) = pooled {
            assert_close("te2 text_embeds", &p, &r["te2_text_embeds"], 1e-5, 1e-5);
        }
    }
    let cond = sd.encode_text("a photo of a cat sitting on a red chair", None).unwrap();
    assert_close("prompt_embeds", &cond.hidden, &r["prompt_embeds"], 1e-5, 1e-5);
    assert_close("pooled", cond.pooled.as_ref().unwrap(), &r["pooled"], 1e-5, 1e-5);
    let neg = sd.encode_negative(Some("a blurry photo"), &cond).unwrap();
    assert_close("negative_prompt_embeds", &neg.hidden, &r["negative_prompt_embeds"], 1e-5, 1e-5);
    assert_close("negative pooled", neg.pooled.as_ref().unwrap(), &r["negative_pooled"], 1e-5, 1e-5);
    // force_zeros_for_empty_prompt: no negative prompt gives zeros, an empty one is encoded.
    let zeros = sd.encode_negative(None, &cond).unwrap();
    assert_eq!(zeros.hidden.abs().max().double_value(&[]), 0.0);
    assert_eq!(zeros.pooled.unwrap().abs().max().double_value(&[]), 0.0);
    let empty = sd.encode_negative(Some(""), &cond).unwrap();
    assert!(empty.hidden.abs().max().double_value(&[]) > 0.0);
}

#[test]
fn unet_with_added_conditions_matches_diffusers() {
    let sd = load();
    let r = tensors("tests/fixtures/reference/sdxl-tiny/model.safetensors");
    let added =
        AddedCond { text_embeds: r["text_embeds"].shallow_clone(), time_ids: r["time_ids"].shallow_clone() };
    let extra = UNetExtra { added_cond: Some(&added), ..Default::default() };
    let out = tch::no_grad(|| {
        sd.unet.forward_with(&r["sample"], &r["timestep"], &r["encoder_hidden_states"], &extra)
    })
    .unwrap();
    assert_close("unet out", &out, &r["unet_out"], 1e-5, 1e-5);
    // The time ids matter (per item: the second row has another size and crop).
    let other =
        AddedCond { text_embeds: added.text_embeds.shallow_clone(), time_ids: added.time_ids.flip([0]) };
    let extra = UNetExtra { added_cond: Some(&other), ..Default::default() };
    let moved = tch::no_grad(|| {
        sd.unet.forward_with(&r["sample"], &r["timestep"], &r["encoder_hidden_states"], &extra)
    })
    .unwrap();
    assert!(max_abs_diff(&moved, &out) > 1e-4);
    // An SDXL UNet without its added conditions is an error naming them, not a panic.
    let err = sd.unet.forward(&r["sample"], &r["timestep"], &r["encoder_hidden_states"], None).unwrap_err();
    assert!(err.to_string().contains("added_cond"), "{err}");
}

/// `sdxl-tiny-flat` is `sdxl-tiny` with both text encoders stored without `text_model.` (`text_projection` at the
/// top level): the same conditioning and images, bit for bit (diffusers' too: tools/make_sdxl_fixtures.py).
#[test]
fn both_text_encoder_layouts_give_the_same_images() {
    let flat = StableDiffusion::load(
        &fixture("tests/fixtures/models/sdxl-tiny-flat").display().to_string(),
        &cpu_fp32(None),
    )
    .unwrap();
    let nested = load();
    let (a, b) = (nested.encode_text("a fox", Some(1)).unwrap(), flat.encode_text("a fox", Some(1)).unwrap());
    assert!(a.hidden.equal(&b.hidden) && a.pooled.unwrap().equal(&b.pooled.unwrap()));
    for name in ["txt2img_euler_g5.0_neg", "txt2img_euler_g1.0_skip1"] {
        let base = format!("tests/fixtures/reference/sdxl-tiny/pipeline/{name}");
        let case = json(&format!("{base}.json"));
        let p = generate_params(&case, case["width"].as_i64().unwrap(), case["height"].as_i64().unwrap());
        let la = sdstream::pipeline::txt2img_latents(&nested, &p).unwrap();
        let lb = sdstream::pipeline::txt2img_latents(&flat, &p).unwrap();
        assert!(la.equal(&lb), "{name}: the flat layout's latents differ by {}", max_abs_diff(&la, &lb));
        assert_close(name, &lb, &tensors(&format!("{base}.safetensors"))["latents"], 1e-4, 1e-4);
    }
}

#[test]
fn default_size_follows_the_unet_sample_size() {
    let sd = load();
    assert_eq!(sd.default_size(), (64, 64));
}

#[test]
fn the_sdxl_vae_stays_fp32_under_an_fp16_model() {
    let opts = sdstream::models::stable_diffusion::LoadOptions { kind: tch::Kind::Half, ..cpu_fp32(None) };
    let sd = StableDiffusion::load(&fixture(MODEL).display().to_string(), &opts).unwrap();
    let sdstream::models::stable_diffusion::Autoencoder::Kl(vae) = &sd.autoencoder else { panic!("a VAE") };
    assert!(vae.config().force_upcast);
    assert_eq!(vae.kind(), tch::Kind::Float);
    // Latents in the model's dtype go in, the image comes back in it.
    let z = tch::Tensor::zeros([1, 4, 8, 8], (tch::Kind::Half, tch::Device::Cpu));
    let image = tch::no_grad(|| sd.autoencoder.decode_scaled(&z)).unwrap();
    assert_eq!(image.kind(), tch::Kind::Half);
    // An SD 1.x model does not upcast (diffusers' SD pipelines ignore force_upcast).
    let sd1 = StableDiffusion::load(&fixture("tests/fixtures/models/sd1-tiny").display().to_string(), &opts)
        .unwrap();
    let sdstream::models::stable_diffusion::Autoencoder::Kl(vae) = &sd1.autoencoder else { panic!("a VAE") };
    assert_eq!(vae.kind(), tch::Kind::Half);
}
