//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, autoencoder (VAE or TAESD) and the
//! scheduler config, on one device in one dtype.
use super::clip::{ClipTextConfig, ClipTextModel};
use super::loader::{class_name, ModelSource};
use super::taesd::{AutoencoderTiny, AutoencoderTinyConfig};
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::{read_config, Weights};
use crate::error::{Error, Result};
use crate::schedulers::SchedulerConfig;
use tch::{Device, Kind, Tensor};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub kind: Kind,
    /// A separate autoencoder folder or model id (TAESD or another AutoencoderKL) replacing the model's VAE.
    pub vae: Option<String>,
    /// For a single-file checkpoint: a diffusers folder or model id giving its configs, tokenizer and scheduler
    /// (see `models::single_file`; unset: built-in SD 1.5 configs when the shapes say SD 1.x).
    pub model_config: Option<String>,
}

/// The image autoencoder in use: the model's AutoencoderKL or a TAESD (AutoencoderTiny).
#[allow(clippy::large_enum_variant)] // one per loaded model: boxing buys nothing
pub enum Autoencoder {
    Kl(AutoencoderKL),
    Tiny(AutoencoderTiny),
}

impl Autoencoder {
    /// Latents of an image in [-1, 1], in the UNet's scale (multiplied by the scaling factor).
    /// For the VAE, `sample_noise` gives the noise for sampling the latent distribution (diffusers draws it
    /// from the pipeline's generator); TAESD is deterministic and draws nothing.
    pub fn encode_scaled(
        &self,
        image: &Tensor,
        sample_noise: impl FnOnce(&[i64]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => {
                let dist = vae.encode(image)?;
                let noise = sample_noise(&dist.mean.size())?;
                Ok(dist.sample(&noise)?.f_mul_scalar(vae.scaling_factor())?)
            }
            Autoencoder::Tiny(taesd) => Ok(taesd.encode(image)?.f_mul_scalar(taesd.scaling_factor())?),
        }
    }

    /// The image in [-1, 1] for latents in the UNet's scale.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => vae.decode(&latents.f_div_scalar(vae.scaling_factor())?),
            Autoencoder::Tiny(taesd) => taesd.decode(&latents.f_div_scalar(taesd.scaling_factor())?),
        }
    }

    /// Pixels per latent along each side (8 for Stable Diffusion).
    pub fn downscale_factor(&self) -> i64 {
        match self {
            Autoencoder::Kl(vae) => vae.downscale_factor(),
            Autoencoder::Tiny(taesd) => taesd.downscale_factor(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Autoencoder::Kl(_) => "AutoencoderKL",
            Autoencoder::Tiny(_) => "AutoencoderTiny (TAESD)",
        }
    }
}

/// Every part of a Stable Diffusion pipeline, loaded.
pub struct StableDiffusion {
    pub source: ModelSource,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNetConfig,
    pub autoencoder: Autoencoder,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
    /// The UNet's and the text encoder's weight stores: they reach the tensors the modules hold, so LoRAs can
    /// be fused (and unfused) in place after loading.
    pub unet_weights: Weights,
    pub text_encoder_weights: Weights,
    /// The LoRAs fused into the weights (empty after `load`; see `models::lora`).
    pub loras: super::lora::LoraSet,
}

fn warn_unused(w: &Weights, what: &str) {
    let unused = w.unused();
    if !unused.is_empty() {
        tracing::warn!("{what}: {} stored tensors were not used, e.g. {}", unused.len(), unused[0]);
    }
}

/// Loads an autoencoder from a folder holding config.json and its weights (`subdir` "" for a standalone one).
pub fn load_autoencoder(src: &ModelSource, subdir: &str, device: Device, kind: Kind) -> Result<Autoencoder> {
    let rel = |f: &str| if subdir.is_empty() { f.to_string() } else { format!("{subdir}/{f}") };
    let config_path = src.file(&rel("config.json"))?;
    let class = class_name(&config_path)?.unwrap_or_else(|| "AutoencoderKL".into());
    let w = Weights::from_safetensors(&src.weights(subdir, "diffusion_pytorch_model", kind)?, device, kind)?;
    let ae = match class.as_str() {
        "AutoencoderKL" => {
            Autoencoder::Kl(AutoencoderKL::new(&w, read_config::<AutoencoderKLConfig>(&config_path)?)?)
        }
        "AutoencoderTiny" => {
            Autoencoder::Tiny(AutoencoderTiny::new(&w, read_config::<AutoencoderTinyConfig>(&config_path)?)?)
        }
        other => {
            return Err(Error::config(config_path, format!("autoencoder class `{other}` is not supported")));
        }
    };
    warn_unused(&w, &format!("{} autoencoder", src.spec));
    Ok(ae)
}

impl StableDiffusion {
    /// Loads the model named by `spec` (a diffusers folder, a Hugging Face model id, or a single-file
    /// `.safetensors` checkpoint: see `models::single_file`).
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        if super::single_file::is_single_file(spec) {
            return super::single_file::load(spec, opts);
        }
        let (device, kind) = (opts.device, opts.kind);
        let src = ModelSource::resolve(spec)?;
        let index_path = src.file("model_index.json")?;
        let index: serde_json::Value = read_config(&index_path)?;
        if index.get("text_encoder_2").is_some()
            || index.get("_class_name").and_then(|c| c.as_str()).is_some_and(|c| c.contains("XL"))
        {
            return Err(Error::Unsupported(format!(
                "{}: SDXL models (two text encoders) are not supported yet",
                index_path.display()
            )));
        }

        let unet_config = UNetConfig::from_file(&src.file("unet/config.json")?)?;
        let unet_w =
            Weights::from_safetensors(&src.weights("unet", "diffusion_pytorch_model", kind)?, device, kind)?;
        let unet = UNet2DConditionModel::new(&unet_w, &unet_config)?;
        warn_unused(&unet_w, "unet");

        let te_config: ClipTextConfig = read_config(&src.file("text_encoder/config.json")?)?;
        let te_w = Weights::from_safetensors(&src.weights("text_encoder", "model", kind)?, device, kind)?;
        let text_encoder = ClipTextModel::new(&te_w, te_config)?;
        warn_unused(&te_w, "text_encoder");

        // The classic vocab.json + merges.txt, or the tokenizer.json alone that transformers 5 saves; for a hub
        // id this fetches whichever exist. The tokenizer names what is missing.
        for f in
            ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        {
            let _ = src.optional_file(&format!("tokenizer/{f}"));
        }
        let tokenizer = ClipTokenizer::from_dir(&src.root.join("tokenizer"))?;

        let autoencoder = match &opts.vae {
            Some(v) => load_autoencoder(&ModelSource::resolve_component(v)?, "", device, kind)?,
            None => load_autoencoder(&src, "vae", device, kind)?,
        };
        let scheduler_config = SchedulerConfig::from_file(&src.file("scheduler/scheduler_config.json")?)?;
        Ok(StableDiffusion {
            source: src,
            tokenizer,
            text_encoder,
            unet,
            unet_config,
            autoencoder,
            scheduler_config,
            device,
            kind,
            unet_weights: unet_w,
            text_encoder_weights: te_w,
            loras: super::lora::LoraSet::new(),
        })
    }

    /// Prompt embeddings (1, 77, D) for one text, as diffusers' encode_prompt computes them.
    pub fn encode_text(&self, text: &str, clip_skip: Option<usize>) -> Result<Tensor> {
        let ids = self.tokenizer.encode(text)?;
        let ids = Tensor::f_from_slice(&ids)?.f_unsqueeze(0)?.f_to_device(self.device)?;
        let _guard = tch::no_grad_guard();
        let h = match clip_skip {
            Some(n) if n > 0 => self.text_encoder.forward_with_skip(&ids, n)?,
            _ => self.text_encoder.forward(&ids)?,
        };
        Ok(h.f_to_kind(self.kind)?)
    }

    /// Pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.autoencoder.downscale_factor()
    }
}
