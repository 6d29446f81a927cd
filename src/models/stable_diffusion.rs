//! A loaded Stable Diffusion model: tokenizer, text encoder, UNet, autoencoder (VAE or TAESD) and the
//! scheduler config, on one device in one dtype.
use super::clip::{ClipTextConfig, ClipTextModel};
use super::controlnet::ControlNetModel;
use super::loader::{class_name, ModelSource};
use super::taesd::{AutoencoderTiny, AutoencoderTinyConfig};
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::{read_config, LoadTimer, Weights};
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
    /// A ControlNet folder or model id loaded next to the model (see `models::controlnet`).
    pub controlnet: Option<String>,

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
    /// An upcast VAE (SDXL's `force_upcast` under fp16) computes in fp32 and returns the caller's dtype.
    pub fn encode_scaled(
        &self,
        image: &Tensor,
        sample_noise: impl FnOnce(&[i64]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => {
                let kind = image.f_kind()?;
                let dist = vae.encode(&image.f_to_kind(vae.kind())?)?;
                let noise = sample_noise(&dist.mean.size())?.f_to_kind(vae.kind())?;
                Ok(dist.sample(&noise)?.f_to_kind(kind)?.f_mul_scalar(vae.scaling_factor())?)
            }
            Autoencoder::Tiny(taesd) => Ok(taesd.encode(image)?.f_mul_scalar(taesd.scaling_factor())?),
        }
    }

    /// The image in [-1, 1] for latents in the UNet's scale.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => {
                let kind = latents.f_kind()?;
                let z = latents.f_div_scalar(vae.scaling_factor())?.f_to_kind(vae.kind())?;
                Ok(vae.decode(&z)?.f_to_kind(kind)?)
            }
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

/// A prompt's text conditioning: the hidden states the UNet cross-attends to, (B, 77, D), and for SDXL the
/// pooled, projected output of the second text encoder, (B, projection_dim).
#[derive(Debug)]
pub struct TextEmbedding {
    pub hidden: Tensor,
    pub pooled: Option<Tensor>,
}

impl TextEmbedding {
    /// Applies `f` to the hidden states and to the pooled output alike.
    pub fn map(&self, mut f: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<TextEmbedding> {
        Ok(TextEmbedding { hidden: f(&self.hidden)?, pooled: self.pooled.as_ref().map(&mut f).transpose()? })
    }

    /// Combines two embeddings part by part (`pooled` only when both have it).
    pub fn zip(
        &self,
        other: &TextEmbedding,
        mut f: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<TextEmbedding> {
        let pooled = match (&self.pooled, &other.pooled) {
            (Some(a), Some(b)) => Some(f(a, b)?),
            (None, None) => None,
            _ => return Err(Error::Model("text embeddings: one has a pooled output, the other not".into())),
        };
        Ok(TextEmbedding { hidden: f(&self.hidden, &other.hidden)?, pooled })
    }

    /// Concatenates along the batch dimension.
    pub fn cat(parts: &[&TextEmbedding]) -> Result<TextEmbedding> {
        let hidden = Tensor::f_cat(&parts.iter().map(|p| &p.hidden).collect::<Vec<_>>(), 0)?;
        let pooled: Option<Vec<&Tensor>> = parts.iter().map(|p| p.pooled.as_ref()).collect();
        let pooled = match pooled {
            Some(v) => Some(Tensor::f_cat(&v, 0)?),
            None if parts.iter().all(|p| p.pooled.is_none()) => None,
            None => return Err(Error::Model("text embeddings: mixed pooled and unpooled".into())),
        };
        Ok(TextEmbedding { hidden, pooled })
    }

    pub fn shallow_clone(&self) -> TextEmbedding {
        TextEmbedding {
            hidden: self.hidden.shallow_clone(),
            pooled: self.pooled.as_ref().map(|p| p.shallow_clone()),
        }
    }
}

/// Every part of a Stable Diffusion pipeline, loaded.
pub struct StableDiffusion {
    pub source: ModelSource,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second tokenizer and text encoder (OpenCLIP ViT-bigG with its projection).
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder_2: Option<ClipTextModel>,
    /// SDXL pipelines' rule: with guidance and no negative prompt, the negative conditioning is zeros.
    pub force_zeros_for_empty_prompt: bool,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNetConfig,
    /// The ControlNet loaded with the model, if any.
    pub controlnet: Option<ControlNetModel>,
    pub autoencoder: Autoencoder,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
    /// The UNet's and the text encoder's weight stores: they reach the tensors the modules hold, so LoRAs can
    /// be fused (and unfused) in place after loading.
    pub unet_weights: Weights,
    pub text_encoder_weights: Weights,
    pub text_encoder_2_weights: Option<Weights>,
    /// The LoRAs fused into the weights (empty after `load`; see `models::lora`).
    pub loras: super::lora::LoraSet,
    /// The IP-Adapter and its image encoder, when one is loaded (`load_ip_adapter`; see `models::ip_adapter`).
    pub image_prompt: Option<super::ip_adapter::ImagePromptModel>,
}

fn warn_unused(w: &Weights, what: &str) {
    let unused = w.unused();
    if !unused.is_empty() {
        tracing::warn!("{what}: {} stored tensors were not used, e.g. {}", unused.len(), unused[0]);
    }
}

/// Loads an autoencoder from a folder holding config.json and its weights (`subdir` "" for a standalone one).
/// With `honour_upcast` (SDXL pipelines), an AutoencoderKL whose config says `force_upcast` is kept in fp32
/// under an fp16 model, as diffusers' SDXL pipelines upcast it (the SDXL VAE overflows in fp16).
pub fn load_autoencoder(
    src: &ModelSource,
    subdir: &str,
    device: Device,
    kind: Kind,
    honour_upcast: bool,
) -> Result<Autoencoder> {
    let timer = LoadTimer::start();
    let rel = |f: &str| if subdir.is_empty() { f.to_string() } else { format!("{subdir}/{f}") };
    let config_path = src.file(&rel("config.json"))?;
    let class = class_name(&config_path)?.unwrap_or_else(|| "AutoencoderKL".into());
    let files = src.weights(subdir, "diffusion_pytorch_model", kind)?;
    let ae = match class.as_str() {
        "AutoencoderKL" => {
            let config = read_config::<AutoencoderKLConfig>(&config_path)?;
            let vae_kind =
                if honour_upcast && config.force_upcast && kind == Kind::Half { Kind::Float } else { kind };
            let w = Weights::from_safetensors(&files, device, vae_kind)?;
            let vae = AutoencoderKL::new(&w, config)?;
            warn_unused(&w, &format!("{} autoencoder", src.spec));
            Autoencoder::Kl(vae)
        }
        "AutoencoderTiny" => {
            let w = Weights::from_safetensors(&files, device, kind)?;
            let taesd = AutoencoderTiny::new(&w, read_config::<AutoencoderTinyConfig>(&config_path)?)?;
            warn_unused(&w, &format!("{} autoencoder", src.spec));
            Autoencoder::Tiny(taesd)
        }
        other => {
            return Err(Error::config(config_path, format!("autoencoder class `{other}` is not supported")));
        }
    };
    timer.done(&format!("{} ({class})", if subdir.is_empty() { src.spec.as_str() } else { subdir }));
    Ok(ae)
}

fn load_text_encoder(
    src: &ModelSource,
    dir: &str,
    device: Device,
    kind: Kind,
) -> Result<(ClipTextModel, Weights)> {
    let timer = LoadTimer::start();
    let config: ClipTextConfig = read_config(&src.file(&format!("{dir}/config.json"))?)?;
    let (te, w) = ClipTextModel::load(&src.weights(dir, "model", kind)?, config, device, kind)?;
    warn_unused(&w, dir);
    timer.done(dir);
    Ok((te, w))
}

/// The classic vocab.json + merges.txt, or the tokenizer.json alone that transformers 5 saves; for a hub id this
/// fetches whichever exist. The tokenizer names what is missing.
fn load_tokenizer(src: &ModelSource, dir: &str) -> Result<ClipTokenizer> {
    let timer = LoadTimer::start();
    for f in
        ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    {
        let _ = src.optional_file(&format!("{dir}/{f}"));
    }
    let tokenizer = ClipTokenizer::from_dir(&src.root.join(dir))?;
    timer.done(dir);
    Ok(tokenizer)
}

/// Loads a ControlNet and checks that it fits the model's UNet (cross-attention width, down blocks).
pub fn load_controlnet(spec: &str, unet: &UNetConfig, device: Device, kind: Kind) -> Result<ControlNetModel> {
    let timer = LoadTimer::start();
    let net = ControlNetModel::load(spec, device, kind)?;
    net.config().check_fits(unet).map_err(|e| match e {
        Error::InvalidArgument { what, msg } => {
            Error::InvalidArgument { what: format!("{what} {spec}"), msg }
        }
        e => e,
    })?;
    timer.done(&format!("controlnet {spec}"));
    Ok(net)
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
        let sdxl = index.get("text_encoder_2").is_some_and(|v| !v.is_null() && v[0].is_string());
        if index.get("_class_name").and_then(|c| c.as_str()).is_some_and(|c| c.contains("XL")) && !sdxl {
            return Err(Error::Unsupported(format!(
                "{}: SDXL pipelines without a second text encoder (the refiner) are not supported",
                index_path.display()
            )));
        }

        let timer = LoadTimer::start();
        let unet_config = UNetConfig::from_file(&src.file("unet/config.json")?)?;
        let unet_w =
            Weights::from_safetensors(&src.weights("unet", "diffusion_pytorch_model", kind)?, device, kind)?;
        let unet = UNet2DConditionModel::new(&unet_w, &unet_config)?;
        warn_unused(&unet_w, "unet");
        timer.done("unet");
        if sdxl != unet.takes_added_cond() {
            return Err(Error::config(
                index_path,
                if sdxl {
                    "an SDXL pipeline (two text encoders) whose UNet has no text_time added embedding"
                } else {
                    "a UNet with SDXL's text_time added embedding needs the pipeline's second text encoder"
                },
            ));
        }

        let (text_encoder, te_w) = load_text_encoder(&src, "text_encoder", device, kind)?;
        let tokenizer = load_tokenizer(&src, "tokenizer")?;
        let (tokenizer_2, text_encoder_2, te2_w) = if sdxl {
            let (te, w) = load_text_encoder(&src, "text_encoder_2", device, kind)?;
            if !te.has_projection() {
                return Err(Error::config(
                    src.file("text_encoder_2/config.json")?,
                    "SDXL's second text encoder must be a CLIPTextModelWithProjection",
                ));
            }
            let width = te.config().hidden_size + text_encoder.config().hidden_size;
            let cross = unet.cross_attention_width();
            if width != cross {
                return Err(Error::config(
                    src.file("text_encoder_2/config.json")?,
                    format!("the text encoders give {width}-wide states, the UNet attends to {cross}"),
                ));
            }
            (Some(load_tokenizer(&src, "tokenizer_2")?), Some(te), Some(w))
        } else {
            (None, None, None)
        };
        let force_zeros_for_empty_prompt =
            sdxl && index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true);

        let autoencoder = match &opts.vae {
            Some(v) => load_autoencoder(&ModelSource::resolve_component(v)?, "", device, kind, sdxl)?,
            None => load_autoencoder(&src, "vae", device, kind, sdxl)?,
        };
        let scheduler_config = SchedulerConfig::from_file(&src.file("scheduler/scheduler_config.json")?)?;
        let controlnet = match &opts.controlnet {
            Some(spec) => Some(load_controlnet(spec, &unet_config, device, kind)?),
            None => None,
        };
        Ok(StableDiffusion {
            source: src,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            force_zeros_for_empty_prompt,
            unet,
            unet_config,
            controlnet,
            autoencoder,
            scheduler_config,
            device,
            kind,
            unet_weights: unet_w,
            text_encoder_weights: te_w,
            text_encoder_2_weights: te2_w,
            loras: super::lora::LoraSet::new(),
            image_prompt: None,
        })
    }

    /// Whether this is an SDXL model (two text encoders, added time and text conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// The conditioning for one text, as diffusers' `encode_prompt` computes it: for SD 1.x/2.x the final
    /// (layer-normed) hidden states (1, 77, D); for SDXL the penultimate hidden states of both text encoders
    /// side by side, and the second one's pooled output. `clip_skip` skips that many more final layers.
    pub fn encode_text(&self, text: &str, clip_skip: Option<usize>) -> Result<TextEmbedding> {
        let _guard = tch::no_grad_guard();
        let ids = |tok: &ClipTokenizer| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(&tok.encode(text)?)?.f_unsqueeze(0)?.f_to_device(self.device)?)
        };
        let skip = clip_skip.unwrap_or(0);
        let (Some(tok2), Some(te2)) = (&self.tokenizer_2, &self.text_encoder_2) else {
            let ids = ids(&self.tokenizer)?;
            let h = if skip > 0 {
                self.text_encoder.forward_with_skip(&ids, skip)?
            } else {
                self.text_encoder.forward(&ids)?
            };
            return Ok(TextEmbedding { hidden: h.f_to_kind(self.kind)?, pooled: None });
        };
        let (h1, _) = self.text_encoder.hidden_and_pooled(&ids(&self.tokenizer)?, skip + 1)?;
        let (h2, pooled) = te2.hidden_and_pooled(&ids(tok2)?, skip + 1)?;
        let pooled = pooled.ok_or_else(|| Error::Model("text_encoder_2 gave no pooled output".into()))?;
        Ok(TextEmbedding {
            hidden: Tensor::f_cat(&[h1, h2], -1)?.f_to_kind(self.kind)?,
            pooled: Some(pooled.f_to_kind(self.kind)?),
        })
    }

    /// The negative conditioning diffusers' pipelines use for `negative_prompt`: SDXL's
    /// `force_zeros_for_empty_prompt` gives zeros when none is given (an empty string is encoded); otherwise
    /// the text ("" when none). diffusers encodes the negative prompt without `clip_skip`, in every pipeline.
    pub fn encode_negative(
        &self,
        negative_prompt: Option<&str>,
        cond: &TextEmbedding,
    ) -> Result<TextEmbedding> {
        match negative_prompt {
            None if self.force_zeros_for_empty_prompt => cond.map(|t| Ok(t.f_zeros_like()?)),
            n => self.encode_text(n.unwrap_or(""), None),
        }
    }

    /// The default image size (diffusers: the UNet's `sample_size` times the VAE factor), as (height, width).
    pub fn default_size(&self) -> (i64, i64) {
        let (h, w) = self.unet_config.sample_size_hw().unwrap_or((64, 64));
        (h * self.vae_scale_factor(), w * self.vae_scale_factor())
    }

    /// Pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> i64 {
        self.autoencoder.downscale_factor()
    }
}
