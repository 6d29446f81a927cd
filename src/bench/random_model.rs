//! Random-weight BENCHMARK models at real architectures (SD-Turbo, SD 1.5, SDXL-Turbo), for speed runs where real weights
//! cannot be brought (speed does not depend on weight values; pictures are noise).
//!
//! The model is written once as an ordinary diffusers-layout folder (configs plus random safetensors drawn by
//! [`Weights::random`] on the chosen device and dtype) and then loaded through the normal loading path, so the
//! engine, the daemon and the component timings all run exactly the code real weights run. The folder holds a
//! standalone TAESD (`taesd/`, diffusers' default AutoencoderTiny config) next to the model's AutoencoderKL
//! (`vae/`), and reuses the bundled tiny test model's tokenizer. It is marked as a test model (`TEST_MODEL`),
//! so the daemon names it as such wherever it shows.
use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::taesd::{AutoencoderTiny, AutoencoderTinyConfig};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::Weights;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The architectures a random-weight benchmark model can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomArch {
    /// stabilityai/sd-turbo: SD 2.1 UNet (linear projections, head dims 5/10/20/20), OpenCLIP ViT-H text
    /// encoder (23 layers used, width 1024).
    SdTurbo,
    /// runwayml/stable-diffusion-v1-5: SD 1.5 UNet (8 heads), CLIP ViT-L/14 text encoder (12 layers, 768).
    Sd15,
    /// stabilityai/sdxl-turbo: SDXL UNet (2.6 B parameters, text_time embedding), CLIP ViT-L and OpenCLIP
    /// ViT-bigG text encoders, the SDXL VAE.
    SdxlTurbo,
    /// The bundled tiny test model's configs (tiny widths): exercises this path in seconds on a CPU.
    TinyTest,
}

pub const RANDOM_ARCH_NAMES: [&str; 4] = ["sd-turbo", "sd15", "sdxl-turbo", "tiny-test"];

const SD_TURBO_UNET: &str = include_str!("../../configs/models/sd-turbo-unet.json");
const SD15_UNET: &str = include_str!("../../configs/models/sd15-unet.json");
const SDXL_TURBO_UNET: &str = include_str!("../../configs/models/sdxl-turbo-unet.json");
/// The bundled tiny test model's tokenizer (its ids all fall inside the real vocabulary of 49408).
const TOKENIZER_FILES: [(&str, &str); 4] = [
    ("vocab.json", include_str!("../../models/tiny-sd-test/tokenizer/vocab.json")),
    ("merges.txt", include_str!("../../models/tiny-sd-test/tokenizer/merges.txt")),
    ("tokenizer_config.json", include_str!("../../models/tiny-sd-test/tokenizer/tokenizer_config.json")),
    ("special_tokens_map.json", include_str!("../../models/tiny-sd-test/tokenizer/special_tokens_map.json")),
];
const TINY_UNET: &str = include_str!("../../models/tiny-sd-test/unet/config.json");
const TINY_TEXT_ENCODER: &str = include_str!("../../models/tiny-sd-test/text_encoder/config.json");
const TINY_VAE: &str = include_str!("../../models/tiny-sd-test/vae/config.json");
const TINY_TAESD: &str = include_str!("../../models/tiny-taesd-test/config.json");
const SCHEDULER: &str = include_str!("../../models/tiny-sd-test/scheduler/scheduler_config.json");

impl std::str::FromStr for RandomArch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sd-turbo" => Ok(RandomArch::SdTurbo),
            "sd15" => Ok(RandomArch::Sd15),
            "sdxl-turbo" => Ok(RandomArch::SdxlTurbo),
            "tiny-test" => Ok(RandomArch::TinyTest),
            other => Err(Error::invalid(
                "random-model",
                format!(
                    "`{other}` is not a known architecture; expected one of {}",
                    RANDOM_ARCH_NAMES.join(", ")
                ),
            )),
        }
    }
}

impl RandomArch {
    pub fn name(self) -> &'static str {
        match self {
            RandomArch::SdTurbo => "sd-turbo",
            RandomArch::Sd15 => "sd15",
            RandomArch::SdxlTurbo => "sdxl-turbo",
            RandomArch::TinyTest => "tiny-test",
        }
    }

    fn unet_config(self) -> &'static str {
        match self {
            RandomArch::SdTurbo => SD_TURBO_UNET,
            RandomArch::Sd15 => SD15_UNET,
            RandomArch::SdxlTurbo => SDXL_TURBO_UNET,
            RandomArch::TinyTest => TINY_UNET,
        }
    }

    /// transformers' CLIPTextConfig of the architecture's text encoder. Token ids follow the bundled
    /// tokenizer that the model reuses.
    fn text_encoder_config(self) -> Value {
        let (hidden, inter, heads, layers, act, proj) = match self {
            RandomArch::SdTurbo => (1024, 4096, 16, 23, "gelu", 512),
            RandomArch::Sd15 | RandomArch::SdxlTurbo => (768, 3072, 12, 12, "quick_gelu", 768),
            RandomArch::TinyTest => return serde_json::from_str(TINY_TEXT_ENCODER).expect("bundled JSON"),
        };
        clip_config("CLIPTextModel", hidden, inter, heads, layers, act, proj)
    }

    /// SDXL's second text encoder (OpenCLIP ViT-bigG/14 with its projection).
    fn text_encoder_2_config(self) -> Option<Value> {
        (self == RandomArch::SdxlTurbo)
            .then(|| clip_config("CLIPTextModelWithProjection", 1280, 5120, 20, 32, "gelu", 1280))
    }

    /// diffusers' AutoencoderKL config of Stable Diffusion (the same blocks for SD 1.5 and SD 2.x).
    fn vae_config(self) -> Value {
        if self == RandomArch::TinyTest {
            return serde_json::from_str(TINY_VAE).expect("bundled JSON");
        }
        let sample_size = if self == RandomArch::SdTurbo { 768 } else { 512 };
        let scaling_factor = if self == RandomArch::SdxlTurbo { 0.13025 } else { 0.18215 };
        json!({
            "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "sample_size": sample_size, "scaling_factor": scaling_factor, "force_upcast": true,
            "use_quant_conv": true, "use_post_quant_conv": true, "mid_block_add_attention": true
        })
    }
    /// diffusers' default AutoencoderTiny config (madebyollin/taesd); the tiny test TAESD's for `tiny-test`.
    fn taesd_config(self) -> Value {
        if self == RandomArch::TinyTest {
            return serde_json::from_str(TINY_TAESD).expect("bundled JSON");
        }
        json!({
        "_class_name": "AutoencoderTiny", "act_fn": "relu", "in_channels": 3, "out_channels": 3,
        "encoder_block_out_channels": [64, 64, 64, 64], "decoder_block_out_channels": [64, 64, 64, 64],
        "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1], "latent_channels": 4,
        "latent_magnitude": 3, "latent_shift": 0.5, "upsampling_scaling_factor": 2, "upsample_fn": "nearest",
        "force_upcast": false, "scaling_factor": 1.0, "shift_factor": 0.0
        })
    }
}

/// transformers' CLIPTextConfig with the real vocabulary; token ids follow the bundled tokenizer.
fn clip_config(arch: &str, hidden: i64, inter: i64, heads: i64, layers: i64, act: &str, proj: i64) -> Value {
    json!({
        "architectures": [arch], "model_type": "clip_text_model",
        "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
        "num_hidden_layers": layers, "hidden_act": act, "projection_dim": proj,
        "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
        "bos_token_id": 912, "eos_token_id": 913, "pad_token_id": 0
    })
}

/// Where a random-weight benchmark model was written.
#[derive(Debug, Clone)]
pub struct RandomModel {
    pub arch: RandomArch,
    /// The diffusers-layout model folder (unet, vae, text_encoder, tokenizer, scheduler).
    pub root: PathBuf,
    /// The standalone TAESD folder.
    pub taesd: PathBuf,
}

impl RandomModel {
    /// How the model is named in reports.
    pub fn label(&self) -> String {
        format!("random-weight benchmark model ({} architecture)", self.arch.name())
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    write(path, &serde_json::to_string_pretty(value).expect("JSON values serialise"))
}

/// Writes every tensor handed out by `w` (the module built from it asked for them all) as safetensors.
fn save_weights(w: &Weights, path: &Path) -> Result<()> {
    let tensors = w
        .loaded_names()
        .into_iter()
        .map(|name| {
            let t = w.loaded(&name).expect("a handed-out name").f_to_device(Device::Cpu)?.f_contiguous()?;
            Ok((name, t))
        })
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    Tensor::write_safetensors(&tensors, path)
        .map_err(|e| Error::WeightFile { path: path.to_path_buf(), msg: e.to_string() })
}

/// Builds one component on random weights (drawn on `device`) and saves it to `dir/file`.
fn random_component<T>(
    dir: &Path,
    file: &str,
    device: Device,
    kind: Kind,
    build: impl FnOnce(&Weights) -> Result<T>,
) -> Result<()> {
    let w = Weights::random(device, kind);
    let module = build(&w)?;
    save_weights(&w, &dir.join(file))?;
    drop(module);
    Ok(())
}

/// Writes (or reuses, when already complete) the random-weight benchmark model of `arch` in `kind` under
/// `parent`. Weights are drawn on `device` with a fixed seed.
pub fn materialise(arch: RandomArch, parent: &Path, device: Device, kind: Kind) -> Result<RandomModel> {
    let root =
        parent.join(format!("random-weight-benchmark-{}-{}", arch.name(), crate::device::dtype_name(kind)));
    let model = RandomModel { arch, taesd: root.join("taesd"), root: root.clone() };
    let complete = root.join("COMPLETE");
    if complete.exists() {
        return Ok(model);
    }
    tracing::info!("writing the {} to {} (once)", model.label(), root.display());
    tch::manual_seed(0);
    let _guard = tch::no_grad_guard();

    write(&root.join("unet/config.json"), arch.unet_config())?;
    let unet_config = UNetConfig::from_file(root.join("unet/config.json"))?;
    random_component(&root.join("unet"), "diffusion_pytorch_model.safetensors", device, kind, |w| {
        UNet2DConditionModel::new(w, &unet_config)
    })?;

    let te = arch.text_encoder_config();
    write_json(&root.join("text_encoder/config.json"), &te)?;
    let te_config: ClipTextConfig = serde_json::from_value(te).map_err(|e| Error::Model(e.to_string()))?;
    random_component(&root.join("text_encoder"), "model.safetensors", device, kind, |w| {
        ClipTextModel::new(w, te_config)
    })?;

    let mut index = json!({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]
    });
    if let Some(te2) = arch.text_encoder_2_config() {
        write_json(&root.join("text_encoder_2/config.json"), &te2)?;
        let config: ClipTextConfig = serde_json::from_value(te2).map_err(|e| Error::Model(e.to_string()))?;
        random_component(&root.join("text_encoder_2"), "model.safetensors", device, kind, |w| {
            ClipTextModel::new(w, config)
        })?;
        for (name, text) in TOKENIZER_FILES {
            write(&root.join("tokenizer_2").join(name), text)?;
        }
        index["_class_name"] = "StableDiffusionXLPipeline".into();
        index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = true.into();
    }

    let vae = arch.vae_config();
    write_json(&root.join("vae/config.json"), &vae)?;
    let vae_config: AutoencoderKLConfig =
        serde_json::from_value(vae).map_err(|e| Error::Model(e.to_string()))?;
    random_component(&root.join("vae"), "diffusion_pytorch_model.safetensors", device, kind, |w| {
        AutoencoderKL::new(w, vae_config)
    })?;

    let taesd = arch.taesd_config();
    write_json(&model.taesd.join("config.json"), &taesd)?;
    let taesd_config: AutoencoderTinyConfig =
        serde_json::from_value(taesd).map_err(|e| Error::Model(e.to_string()))?;
    random_component(&model.taesd, "diffusion_pytorch_model.safetensors", device, kind, |w| {
        AutoencoderTiny::new(w, taesd_config)
    })?;

    for (name, text) in TOKENIZER_FILES {
        write(&root.join("tokenizer").join(name), text)?;
    }
    write(&root.join("scheduler/scheduler_config.json"), SCHEDULER)?;
    write_json(&root.join("model_index.json"), &index)?;
    let readme = format!(
        "# {}: random-weight test model\n\nA random-weight BENCHMARK model written by `sdstream bench \
         --random-model {}`: the real architecture with random weights, for speed measurements only. Its \
         pictures are noise.\n",
        model.label(),
        arch.name()
    );
    write(&root.join("README.md"), &readme)?;
    write(&root.join("TEST_MODEL"), "random-weight benchmark model\n")?;
    write(&model.taesd.join("TEST_MODEL"), "random-weight benchmark model\n")?;
    write(&complete, "")?;
    Ok(model)
}
